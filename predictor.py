"""Run the served model on batches of uint8 images: a PyTorch checkpoint (models/cnn.pt) or its ONNX export.

Both backends take what transforms.pil_to_uint8 makes (N x C x H x W uint8, size and channels from the model's
metadata) and return class probabilities, calibrated by the model's temperature (calibration.py), with the same
test-time augmentation (transforms.tta_views): its flips and
reflect-padded shifts commute with the per-channel normalization, so the ONNX file (normalization inside) gets the
views as uint8 images and matches the checkpoint run by PyTorch.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from pathlib import Path

import torch

from calibration import check_temperatures, probabilities, temperature_for
from checkpoint import READABLE_VERSIONS, CheckpointError, load_checkpoint
from model import predict_logits
from transforms import normalize, tta_views

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
METADATA_KEY = "cater"  # export.py stores the checkpoint's metadata as JSON under this key in both exported formats


class TorchPredictor:
    """A train.py checkpoint on a torch device (channels_last: ~1.6x faster convolutions on CPU, same results)."""

    backend = "torch"

    def __init__(self, path: str | Path, device: torch.device):
        self.model, self.meta = load_checkpoint(path, device)
        self.model.to(memory_format=torch.channels_last)
        self.device = device
        self.eager = self.model  # kept for explanations: gradients need the modules, not the frozen graph
        self.model = frozen_graph(self.model, self.meta, device)

    def probabilities(self, images: torch.Tensor, tta: int) -> torch.Tensor:
        with torch.inference_mode():
            x = normalize(images.to(self.device, non_blocking=True), self.meta["mean"], self.meta["std"])
            x = x.contiguous(memory_format=torch.channels_last)
            return probabilities(predict_logits(self.model, x, tta), temperature_for(self.meta, tta)).cpu()

    @functools.cached_property
    def explainer(self):
        """Grad-CAM on the eager model (explain.py), made on first use: in the inference thread, not at startup."""
        from explain import Explainer

        return Explainer(self.eager, self.meta)


def frozen_graph(model: torch.nn.Module, meta: dict, device: torch.device) -> torch.nn.Module:
    """The model as a frozen TorchScript graph, which runs its whole forward pass without Python's GIL: eager mode
    takes the GIL back between operators, and beside a busy event loop (a server under load) that cut its throughput
    ~9x on 2 CPU cores; the graph lost ~3x. Falls back to the eager model if tracing fails or changes the result."""
    def example(batch: int) -> torch.Tensor:
        x = torch.randn(batch, meta.get("channels", 3), meta["image_size"], meta["image_size"], device=device)
        return x.contiguous(memory_format=torch.channels_last)

    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
            warnings.simplefilter("error", torch.jit.TracerWarning)  # a shape or branch baked into the graph
            graph = torch.jit.freeze(torch.jit.trace(model, example(2), check_trace=False))
            for batch in (1, 3, 2):  # other batch sizes than the traced one, and the traced one
                x = example(batch)
                if not torch.allclose(graph(x), model(x), atol=1e-4, rtol=1e-4):
                    raise ValueError(f"the graph's output differs from the model's at batch size {batch}")
    except Exception as e:  # a model torch.jit cannot trace faithfully: eager is correct, only slower under load
        log.warning("serving the model in eager mode (%s: %s)", e.__class__.__name__, e)
        return model
    return graph


class OnnxPredictor:
    """An export.py ONNX file in ONNX Runtime, on the CPU, with `threads` intra-op threads."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int):
        import onnxruntime as ort

        path = Path(path)
        hint = "export one with `make export`, or point CATER_MODEL_PATH at a checkpoint (.pt)"
        if not path.is_file():
            raise CheckpointError(f"no ONNX model at {path}: {hint}")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as e:  # not ONNX, truncated, or exported by something else (no metadata)
            raise CheckpointError(f"cannot read ONNX model {path}: {e.__class__.__name__}: {e}. {hint}") from None
        try:
            check_temperatures(self.meta)
        except ValueError as e:
            raise CheckpointError(f"{path}: a bad calibration temperature in its metadata ({e}). {hint}") from None
        version = self.meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{path} carries metadata format version {version!r}; this code reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}. Re-export it: {hint}")
        self.device = torch.device("cpu")

    def probabilities(self, images: torch.Tensor, tta: int) -> torch.Tensor:
        views = tta_views(images.float(), tta)  # exact integer pixels: flips and shifts move them, nothing mixes
        logits = sum(weight * torch.from_numpy(self.session.run(["logits"], {"images": view.to(torch.uint8).numpy()})[0])
                     for weight, view in views)
        return probabilities(logits, temperature_for(self.meta, tta))


def load_predictor(path: str | Path, device: torch.device, threads: int) -> TorchPredictor | OnnxPredictor:
    """The backend the file calls for: ONNX Runtime for .onnx, PyTorch for a checkpoint."""
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        return OnnxPredictor(path, threads)
    return TorchPredictor(path, device)
