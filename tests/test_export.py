"""export.py: TorchScript and ONNX files that match the checkpoint's logits on real images, with its metadata."""

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import data
import export
import quantize
import train
from checkpoint import load_checkpoint, save_checkpoint
from config import DataConfig, ModelConfig
from conftest import class_image
from model import build_model
from predictor import OnnxPredictor
from transforms import normalize, pil_to_uint8

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist" / "train"
TOLERANCE = 1e-4  # max |logit difference| against the checkpoint run by PyTorch


def real_images(n: int = 8) -> list[Image.Image]:
    """Fashion-MNIST photos from ../shared when present (real data), else the tests' own striped images."""
    files = sorted(FASHION.glob("*/*.png"))[:: 997][:n] if FASHION.is_dir() else []
    if len(files) == n:
        return [Image.open(io.BytesIO(f.read_bytes())) for f in files]
    rng = np.random.default_rng(0)
    return [Image.fromarray(class_image(i % 3, rng, size=37)) for i in range(n)]


def checkpoint(tmp_path: Path, arch: str, channels: int, image_size: int, resize: str) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, widths=(8, 16, 16)) if arch == "airbench" else ModelConfig(arch=arch, pretrained=False)
    model = build_model(cfg, num_classes=3, image_size=image_size, in_chans=channels).eval()
    if arch == "airbench":
        with torch.no_grad():  # a non-trivial whitening layer, so predictions differ from image to image
            model.whiten.weight.normal_()
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, model_config=cfg, classes=["crack", "ok", "scratch"], mean=[0.4] * channels,
                    std=[0.3] * channels, image_size=image_size, channels=channels, resize=resize,
                    metrics={"val_acc": 0.5}, mlflow_run_id="run123")
    return path


@pytest.mark.parametrize("arch, channels, image_size, resize", [
    ("airbench", 3, 32, "squash"),
    pytest.param("tf_efficientnet_lite0", 1, 64, "pad", marks=pytest.mark.full),  # a real backbone: ~15 s
])
def test_exports_match_the_checkpoint_on_real_images(tmp_path, arch, channels, image_size, resize):
    path = checkpoint(tmp_path, arch, channels, image_size, resize)
    paths = export.export(path, ["torchscript", "onnx"])
    assert paths == {"torchscript": tmp_path / "cnn.torchscript.pt", "onnx": tmp_path / "cnn.onnx"}

    model, meta = load_checkpoint(path)
    images = torch.stack([pil_to_uint8(im, image_size, channels, resize) for im in real_images()])
    with torch.no_grad():
        expected = model(normalize(images, meta["mean"], meta["std"])).numpy()
        scripted = torch.jit.load(str(paths["torchscript"]), map_location="cpu")(images).numpy()
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for batch in (images[:1], images):  # the batch dimension is dynamic
        onnx_logits = session.run(["logits"], {"images": batch.numpy()})[0]
        assert np.abs(onnx_logits - expected[: len(batch)]).max() <= TOLERANCE
    assert np.abs(scripted - expected).max() <= TOLERANCE
    assert np.ptp(expected[:, 0]) > 1e-3  # the logits depend on the image: the comparison means something

    for fmt in paths:
        info = export.read_metadata(paths[fmt])
        assert info["classes"] == ["crack", "ok", "scratch"] and info["image_size"] == image_size
        assert info["channels"] == channels and info["resize"] == resize and info["input"] == "uint8 NxCxHxW"
        assert info["format_version"] == meta["format_version"] and info["mlflow_run_id"] == "run123"


def test_failed_export_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = checkpoint(tmp_path, "airbench", 3, 32, "squash")
    onnx_path = export.export(path, ["onnx"])["onnx"]
    before = onnx_path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.export(path, ["onnx"])
    assert onnx_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "cnn.pt"]


def test_cli_errors_name_the_flag(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--formats", "tflite"])
    assert exc.value.code == 2 and "--formats" in capsys.readouterr().err


def test_cli_writes_both_files(tmp_path, capsys):
    path = checkpoint(tmp_path, "airbench", 3, 32, "squash")
    assert export.main(["--checkpoint", str(path), "--formats", "torchscript,onnx", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "cnn.torchscript.pt" in out and "cnn.onnx" in out
    assert onnx.load(str(tmp_path / "out" / "cnn.onnx")).graph.input[0].name == "images"
    assert export.main(["--checkpoint", str(path), "--formats", "onnx", "--out-dir", str(tmp_path / "new" / "dir")]) == 0
    assert (tmp_path / "new" / "dir" / "cnn.onnx").is_file()


def test_int8_model_is_calibrated_on_the_training_data_and_served_like_fp32(folder_dir, tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    assert train.main(["--preset", "baseline", "--data-dir", str(folder_dir), "--image-size", "32", "--epochs", "8",
                       "--batch-size", "16", "--out", str(path), "--no-mlflow", "--workers", "0"]) == 0
    capsys.readouterr()
    assert export.main(["--checkpoint", str(path)]) == 0  # every format, int8 from the fp32 ONNX file
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("int8 against fp32"))
    agreement = float(line.split("same top-1 answer for ")[1].split("%")[0])
    assert agreement >= 95 and "images/s" in line and "cnn.int8.onnx" in out  # 3 classes that look unalike
    yardstick = float(line.split("moved by one gray level: ")[1].split("%")[0])
    assert yardstick >= 90  # fp32 against itself on images no one could tell apart
    fp32_graph, graph = onnx.load(str(tmp_path / "cnn.onnx")).graph, onnx.load(str(tmp_path / "cnn.int8.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # quantized, in QDQ form
    weights = {i.name for i in graph.initializer}
    kept = [n for n in graph.node if n.name in quantize.excluded_nodes(onnx.load(str(tmp_path / "cnn.onnx")))]
    assert len(kept) == 2 and all(n.input[1] in weights for n in kept)  # first conv and classifier: fp32 weights
    assert len(graph.node) > len(fp32_graph.node)
    served = OnnxPredictor(tmp_path / "cnn.int8.onnx", threads=1)  # what CATER_MODEL_PATH=...int8.onnx loads
    assert served.meta["classes"] == ["crack", "ok", "scratch"] and served.meta["quantized"].startswith("int8")
    images = torch.stack([pil_to_uint8(im, 32, 3, "squash") for im in real_images()])
    probs = served.probabilities(images, tta=0)
    assert probs.shape == (8, 3) and torch.allclose(probs.sum(1), torch.ones(8), atol=1e-4)


def test_int8_needs_its_training_data_unless_it_was_not_asked_for(folder_dir, tmp_path, capsys):
    path = checkpoint(tmp_path, "airbench", 3, 32, "squash")  # written without a data_config
    assert export.main(["--checkpoint", str(path), "--formats", "int8"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(path), "--formats", "int8", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "cnn.int8.onnx").exists()
    assert export.main(["--checkpoint", str(path)]) == 0  # plain `make export`: the other formats, and a note
    out = capsys.readouterr().out
    assert "int8 skipped" in out and "cnn.onnx" in out and not (tmp_path / "cnn.int8.onnx").exists()
    assert export.main(["--checkpoint", str(path), "--formats", "int8", "--data-dir", str(folder_dir)]) == 0
    assert (tmp_path / "cnn.int8.onnx").is_file()  # a checkpoint that does not name its data, given a folder


def test_nudged_images_move_by_at_most_one_gray_level_and_stay_in_range():
    images = torch.tensor([[[[0, 255, 128, 1, 254] * 40]]], dtype=torch.uint8)
    moved = quantize.nudged(images)
    diff = moved.to(torch.int16) - images.to(torch.int16)
    assert moved.dtype == torch.uint8 and diff.abs().max() == 1 and set(diff.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(moved, quantize.nudged(images))  # seeded: the same yardstick run to run


def graph_of(op_types: list[str]) -> onnx.ModelProto:
    nodes = [onnx.helper.make_node(op, [], [], name=f"{op}_{i}") for i, op in enumerate(op_types)]
    return onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], []))


@pytest.mark.parametrize("ops, kept", [
    # a backbone: a stem convolution, then residual blocks (3 of 13 convolutions before the first Add: the stem and
    # the first block's)
    (["Cast", "Sub", "Conv"] + ["Conv", "Conv", "Add"] * 6 + ["ReduceMean", "Gemm"],
     ["Conv_2", "Conv_3", "Conv_4", "Gemm_22"]),
    # no skip connection (the airbench net): the first convolution only
    (["Cast", "Div", "Conv", "Gelu", "Conv", "MaxPool", "Conv", "Gemm"], ["Conv_2", "Gemm_7"]),
    # a long chain before the first Add (7 of 9 convolutions): the first convolution only
    (["Conv"] * 5 + ["Conv", "Conv", "Add"] * 2 + ["Gemm"], ["Conv_0", "Gemm_11"]),
])
def test_int8_keeps_the_layers_most_sensitive_to_rounding_in_fp32(ops, kept):
    assert quantize.excluded_nodes(graph_of(ops)) == kept


def test_int8_of_a_residual_net_keeps_its_convolutions_before_the_first_skip_in_fp32(tmp_path):
    """On a real export: the exporter's node order puts the first block's convolutions before its Add."""
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), *[Residual() for _ in range(6)],
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    meta = {"image_size": 16, "channels": 3, "classes": ["a", "b", "c"]}
    path = export.export_onnx(export.Uint8Classifier(net, [0.5] * 3, [0.25] * 3), meta, tmp_path / "net.onnx")
    nodes = onnx.load(str(path)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    kept = quantize.excluded_nodes(onnx.load(str(path)))
    assert len(convs) == 13 and kept[:3] == convs[:3] and len(kept) == 4  # the stem and the first block's two
    assert next(n for n in nodes if n.name == kept[3]).op_type in ("Gemm", "MatMul")
    calibration = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    graph = onnx.load(str(quantize.quantize(path, tmp_path / "net.int8.onnx", calibration))).graph
    fp32_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    fed = {n.output[0]: n.op_type for n in graph.node}  # a quantized weight reaches its Conv through DequantizeLinear
    quantized = [n for n in graph.node if n.op_type == "Conv" and fed.get(n.input[1]) == "DequantizeLinear"]
    assert len(quantized) == 10  # the 10 later convolutions in int8, the kept 3 read fp32 weights
    assert all(n.input[1] in fp32_weights for n in graph.node if n.name in kept[:3])


def test_int8_benchmark_scores_validation_and_test_beside_fp32(folder_dir, tmp_path, capsys, monkeypatch):
    # the benchmarks import each other by name
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import int8_accuracy

    monkeypatch.setattr(int8_accuracy, "calib_img_s", lambda: None)  # calib.py's own run is not what is tested here
    path = tmp_path / "cnn.pt"
    assert train.main(["--preset", "baseline", "--data-dir", str(folder_dir), "--image-size", "32", "--epochs", "2",
                       "--batch-size", "16", "--out", str(path), "--no-mlflow", "--workers", "0"]) == 0
    capsys.readouterr()
    assert int8_accuracy.main(["--data-dir", str(folder_dir), "--checkpoints", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {cells[2]: cells for cells in ([c.strip() for c in line.split("|")] for line in out.splitlines())
            if len(cells) > 9}
    val = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), workers=0)).val
    assert rows["val"][3] == str(len(val)) and rows["test"][3] == "12"  # test/: 4 images of each of 3 classes
    assert rows["test"][9].endswith("x)") and float(rows["test"][7].rstrip("%")) >= 50  # images/s; agreement
    assert "val: accuracy drop fp32 -> int8" in out and "test: accuracy drop fp32 -> int8" in out
    with pytest.raises(SystemExit):
        int8_accuracy.main(["--data-dir", str(folder_dir), "--checkpoints", str(tmp_path / "missing.pt")])
    assert "--checkpoints: no such file" in capsys.readouterr().err
