"""Open what a model setting names as a predictor: a checkpoint, an ONNX export, or a registered model (models:/...)."""

from __future__ import annotations

import tempfile

from config import ConfigError
from predictor import ONNX_SUFFIX, OnnxPredictor, TorchPredictor, load_predictor
from registry import fetch_checkpoint
from runtime import pick_device


def load_model(path: str, device: str, threads: int, setting: str) -> tuple[TorchPredictor | OnnxPredictor, dict]:
    """A checkpoint, an ONNX file, or a registered model (models:/<name>@<alias> or /<version>, fetched from
    MLFLOW_TRACKING_URI), loaded on `device` (auto, cpu, cuda[:N]); returns (predictor, registry info, empty for
    files). `setting` names where the values came from, for errors (CATER_MODEL_PATH, --model)."""
    if path.lower().endswith(ONNX_SUFFIX) and device.startswith("cuda"):
        raise ConfigError(f"{setting}={device}: an ONNX model runs on the CPU (onnxruntime); "
                          "use the .pt checkpoint for CUDA")
    chosen = pick_device(device, setting)
    if not path.startswith("models:/"):
        return load_predictor(path, chosen, threads), {}
    with tempfile.TemporaryDirectory(prefix="cater-model-") as tmp:  # the checkpoint is read whole: no need to keep it
        local, registered = fetch_checkpoint(path, tmp)
        return load_predictor(local, chosen, threads), registered
