"""Export a checkpoint (models/cnn.pt) to TorchScript, ONNX and int8 ONNX files beside it, for serving without this code.

Both take uint8 images, N x C x H x W as transforms.pil_to_uint8 makes them (C, H and W from the checkpoint), and return
logits: the checkpoint's normalization is inside the graph, test-time augmentation is not; calibrated probabilities
are softmax(logits / temperature). Both carry the checkpoint's metadata as JSON (classes, image_size, channels,
resize, mean, std, temperature, tta_temperatures, model_config, format_version, metrics, mlflow_run_id): ONNX in
its metadata_props under "cater", TorchScript as the extra file "cater.json". Files are written atomically.
The int8 model (quantize.py) is calibrated on the checkpoint's training images and scored beside fp32 on its
validation images: the data the checkpoint names, or --data-dir.

    python export.py                              # models/cnn.pt -> models/cnn.torchscript.pt, .onnx, .int8.onnx
    python export.py --checkpoint other.pt --formats onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from tqdm import tqdm
from torch import nn

from atomic import atomic_path
from checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from config import ConfigError, DataConfig
from data import DataError, Dataset, holds_cifar10, load_dataset
from predictor import METADATA_KEY
from quantize import CALIBRATION_IMAGES, compare, quantize, uint8_images

FORMATS = ("torchscript", "onnx", "int8")
META_FIELDS = ("classes", "image_size", "channels", "resize", "mean", "std", "temperature", "tta_temperatures",
               "model_config", "metrics", "mlflow_run_id")


class Uint8Classifier(nn.Module):
    """uint8 images -> logits, with the checkpoint's per-channel normalization (transforms.normalize) in front."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() / 255.0 - self.mean) / self.std).float()


def metadata(meta: dict) -> str:
    """What a server needs besides the graph, as JSON; the input layout is spelled out for other tools."""
    info = {k: meta.get(k) for k in META_FIELDS}
    info.update(format_version=meta.get("format_version", FORMAT_VERSION), input="uint8 NxCxHxW",
                output="logits; probabilities = softmax(logits / temperature)")
    return json.dumps(info)


def output_paths(checkpoint: Path, out_dir: Path | None) -> dict[str, Path]:
    folder = out_dir or checkpoint.parent
    return {"torchscript": folder / f"{checkpoint.stem}.torchscript.pt", "onnx": folder / f"{checkpoint.stem}.onnx",
            "int8": folder / f"{checkpoint.stem}.int8.onnx"}


def example_input(meta: dict, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = (batch, meta["channels"], meta["image_size"], meta["image_size"])
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)


def export_torchscript(module: Uint8Classifier, meta: dict, path: Path) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; C++ and older runtimes still load it
        traced = torch.jit.trace(module, example_input(meta), check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={f"{METADATA_KEY}.json": metadata(meta)})
    return path


def export_onnx(module: Uint8Classifier, meta: dict, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(module, (example_input(meta),), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes={"images": {0: batch}}, verbose=False)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        program.save(str(Path(tmp_dir) / "model.onnx"))
        proto = onnx.load(str(Path(tmp_dir) / "model.onnx"))  # weights inline: one self-contained file
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata(meta)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def int8_data(meta: dict, data_dir: str | None) -> DataConfig:
    """Where the int8 model's calibration and validation images come from: the data the checkpoint was trained on,
    at data_dir when given; never downloaded."""
    known = {f.name for f in dataclasses.fields(DataConfig)}  # a checkpoint from another version may name others
    saved = {k: v for k, v in (meta.get("data_config") or {}).items() if k in known}
    if not saved and not data_dir:
        raise DataError("the checkpoint does not say what data it was trained on: pass --data-dir")
    if not saved:  # the checkpoint's own input settings, the split settings' defaults
        saved = {"image_size": meta["image_size"], "channels": meta["channels"], "resize": meta["resize"],
                 "dataset": "cifar10" if holds_cifar10(Path(data_dir)) else "folder"}
    try:
        return DataConfig(**{**saved, "in_memory": False, "download": False,
                             **({"data_dir": data_dir} if data_dir else {})})
    except ConfigError as e:  # e.g. CIFAR-10 for a model whose input is not 32 px RGB
        raise DataError(f"{data_dir}: does not fit this model ({e})") from None


def int8_dataset(meta: dict, data_dir: str | None) -> tuple[DataConfig, Dataset]:
    """The data the checkpoint was trained on (int8_data), loaded, with its classes checked against the checkpoint's."""
    cfg = int8_data(meta, data_dir)
    data = load_dataset(cfg)
    if data.classes != meta["classes"]:
        raise DataError(f"{cfg.data_dir} holds classes {data.classes}, the checkpoint {meta['classes']}: pass the "
                        f"--data-dir it was trained on")
    return cfg, data


def export_int8(module: Uint8Classifier, meta: dict, path: Path, fp32: Path | None, data_dir: str | None) -> Path:
    """The int8 model, from the fp32 ONNX file (written to a temporary one when not asked for), calibrated on the
    checkpoint's training images; prints its validation scores beside fp32's."""
    cfg, data = int8_dataset(meta, data_dir)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        fp32 = fp32 or export_onnx(module, meta, Path(tmp_dir) / "fp32.onnx")
        quantize(fp32, path, uint8_images(data.train, cfg, CALIBRATION_IMAGES))
        scores = compare(fp32, path, uint8_images(data.val, cfg), data.val.labels)
    tqdm.write(f"int8 against fp32 on {scores['images']} validation images: accuracy {100 * scores['int8_acc']:.2f}% "
               f"(fp32 {100 * scores['fp32_acc']:.2f}%), same top-1 answer for {100 * scores['agreement']:.2f}% "
               f"(fp32 against itself with every pixel moved by one gray level: {100 * scores['noise_agreement']:.2f}%); "
               f"{scores['int8_img_s']:.0f} images/s (fp32 {scores['fp32_img_s']:.0f}, "
               f"{scores['int8_img_s'] / scores['fp32_img_s']:.2f}x) in ONNX Runtime")
    return path


def export(checkpoint: Path, formats: list[str], out_dir: Path | None = None, data_dir: str | None = None,
           int8_optional: bool = False) -> dict[str, Path]:
    """Write the requested formats for the checkpoint; returns {format: path}. With int8_optional, an int8 model
    whose training data cannot be read is skipped with a note instead of failing the export."""
    model, meta = load_checkpoint(checkpoint)
    model = model.float().to("cpu", memory_format=torch.contiguous_format).eval()
    module = Uint8Classifier(model, meta["mean"], meta["std"]).eval()
    paths = output_paths(checkpoint, out_dir)
    paths["onnx"].parent.mkdir(parents=True, exist_ok=True)
    writers = {"torchscript": export_torchscript, "onnx": export_onnx,
               "int8": lambda m, meta, path: export_int8(m, meta, path, written.get("onnx"), data_dir)}
    written = {}
    # ONNX of a backbone takes a while
    with tqdm(total=len(formats), desc="export", unit="format", leave=False) as progress:
        for fmt in sorted(formats, key=FORMATS.index):  # int8 starts from the fp32 ONNX file
            progress.set_postfix_str(fmt)
            try:
                written[fmt] = writers[fmt](module, meta, paths[fmt])
            except DataError as e:
                if not (fmt == "int8" and int8_optional):
                    raise
                tqdm.write(f"int8 skipped: the data to calibrate it on cannot be read ({e}); "
                           f"`--formats int8 --data-dir <training data>` writes it")
            progress.update()
    return written


def read_metadata(path: Path) -> dict:
    """The metadata JSON of an exported file (either format)."""
    if path.suffix.lower() == ".onnx":
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[f"{METADATA_KEY}.json"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/cnn.pt", help="checkpoint written by train.py")
    parser.add_argument("--formats", default=None, help=f"comma-separated, from: {', '.join(FORMATS)} (default: all; "
                                                         f"int8 is skipped when its training data cannot be read)")
    parser.add_argument("--out-dir", default=None, help="folder for the exported files (default: the checkpoint's)")
    parser.add_argument("--data-dir", default=None, help="int8: the training data to calibrate on and score with "
                                                         "(default: the data the checkpoint was trained on)")
    args = parser.parse_args(argv)
    formats = [f for f in (args.formats or ",".join(FORMATS)).split(",") if f]
    if not formats or (bad := [f for f in formats if f not in FORMATS]):
        parser.error(f"--formats: pick from {', '.join(FORMATS)}" + (f" (unknown: {', '.join(bad)})" if formats else ""))
    try:
        paths = export(Path(args.checkpoint), formats, Path(args.out_dir) if args.out_dir else None, args.data_dir,
                       int8_optional=args.formats is None and args.data_dir is None)
    except CheckpointError as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: int8 calibration data: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the exporter refused the model, or the folder is not writable
        print(f"error: export of {args.checkpoint} failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    for fmt, path in paths.items():
        print(f"wrote {path} ({fmt}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
