"""int8 ONNX models: ONNX Runtime static quantization of an exported fp32 model, calibrated on training images, and
the comparison with fp32 on validation images (accuracy, top-1 agreement, images/s) in one run.

QDQ format, weights int8 per output channel, activations uint8 with ranges read from the calibration images
(MinMax); the first convolution (it sees the raw normalized pixels; in a net with skip connections, every one before
the first Add) and the classifier layer stay in fp32, as ONNX Runtime's guide advises for the layers most sensitive to
rounding (excluded_nodes). The file keeps the fp32 model's metadata, so the server loads it like any export.py ONNX
file.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from atomic import atomic_path
from config import DataConfig
from data import ImageSet
from decode import decode_files
from predictor import METADATA_KEY, OnnxPredictor

CALIBRATION_IMAGES = 512  # training images whose activations set the int8 ranges
CALIBRATION_BATCH = 32
TIMING_BATCH = 64


def excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes kept in fp32: the last Gemm/MatMul, and the first Conv or, in a graph with an Add (taken as its
    first skip connection), every Conv before the first Add when they are at most a quarter of its Convs. That
    chain at the highest resolutions is where a fine-tuned backbone's rounding errors start, and every later layer
    amplifies them: in fp32 they took EfficientNet-Lite0's agreement with fp32 from ~90 % to ~96 %
    (docs/operating.md). An unnamed node cannot be named here (ONNX Runtime matches by name): it is quantized."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    first_add = next((i for i, n in enumerate(nodes) if n.op_type == "Add"), len(nodes))
    chain = [i for i in convs if i < first_add]
    kept = chain if first_add < len(nodes) and 0 < len(chain) <= len(convs) / 4 else convs[:1]
    dense = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return [nodes[i].name for i in kept if nodes[i].name] + [name for name in dense[-1:] if name]


def quantize(fp32_path: Path, int8_path: Path, calibration: torch.Tensor) -> Path:
    """Write the int8 model of fp32_path (an export.py ONNX file) to int8_path, atomically; calibration: uint8
    NCHW training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: b.numpy()} for b in calibration.split(CALIBRATION_BATCH)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    model = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as tmp_dir:
        out = Path(tmp_dir) / "int8.onnx"
        quantize_static(str(fp32_path), str(out), Batches(model.graph.input[0].name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded_nodes(model))
        quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    for entry in model.metadata_props:  # the classes, sizes and temperatures the server reads
        if entry.key == METADATA_KEY:
            info = {**json.loads(entry.value), "quantized": "int8 (ONNX Runtime static, QDQ, per channel)"}
            quantized.metadata_props.add(key=entry.key, value=json.dumps(info))
    with atomic_path(int8_path) as tmp:
        onnx.save(quantized, str(tmp))
    return int8_path


def uint8_images(split: ImageSet, cfg: DataConfig, count: int = 0, seed: int = 0) -> torch.Tensor:
    """The split's images as the model takes them (uint8 NCHW): all, or a seeded sample of `count`."""
    if count and count < len(split):
        picked = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count]
        split = split.subset(picked.sort().values)
    if split.images is not None:
        return split.images
    return decode_files(split.paths, cfg.image_size, cfg.channels, cfg.resize, cfg.workers, desc="decode")


def predict(path: Path, images: torch.Tensor, threads: int = 0) -> tuple[np.ndarray, float]:
    """(top-1 class per image, images/s) of an ONNX model over uint8 images, TIMING_BATCH at a time, after one
    warm-up batch."""
    session = OnnxPredictor(path, threads).session  # as the server runs it
    name = session.get_inputs()[0].name
    session.run(None, {name: images[:TIMING_BATCH].numpy()})
    start = time.perf_counter()
    top = [session.run(None, {name: b.numpy()})[0].argmax(1) for b in images.split(TIMING_BATCH)]
    return np.concatenate(top), len(images) / (time.perf_counter() - start)


def nudged(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The images with every pixel moved by -1, 0 or +1 gray level at random: a change no one can see."""
    noise = torch.randint(-1, 2, images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int16)
    return (images.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def compare(fp32_path: Path, int8_path: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy and images/s of both models on the same labelled images, how often their top-1 answers agree, and,
    as the yardstick for that agreement, how often fp32 keeps its own answer when every pixel moves by one gray
    level: a model whose answers flip under that is fragile, and int8's rounding flips them too."""
    fp32, fp32_speed = predict(fp32_path, images)
    int8, int8_speed = predict(int8_path, images)
    fp32_nudged, _ = predict(fp32_path, nudged(images))
    truth = labels.numpy()
    return {"images": len(images), "fp32_acc": float((fp32 == truth).mean()), "int8_acc": float((int8 == truth).mean()),
            "agreement": float((fp32 == int8).mean()), "noise_agreement": float((fp32 == fp32_nudged).mean()),
            "fp32_img_s": fp32_speed, "int8_img_s": int8_speed}
