"""Write and read the self-describing model checkpoint (models/cnn.pt): weights plus everything needed to rebuild and feed the model."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from atomic import atomic_path
from calibration import check_temperatures
from config import ConfigError, ModelConfig
from model import build_model

FORMAT_VERSION = 3  # 2 added channels and resize (a version-1 file is RGB, squashed); 3 the calibration temperatures
READABLE_VERSIONS = (1, 2, 3)
REQUIRED = ("state_dict", "model_config", "classes", "mean", "std", "image_size")


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or not one of ours; the message says how to get a good one."""


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """The checkpoint's folder exists (made if need be) and takes files: checked before training, not after it."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {folder}: {e.strerror or e}") from None


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, model_config: ModelConfig, classes, mean, std,
                    image_size: int, channels: int = 3, resize: str = "squash", metrics: dict, temperature: float = 1.0,
                    tta_temperatures: dict[str, float] | None = None,
                    mlflow_run_id: str | None = None, extra: dict | None = None) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint in place."""
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "model_config": dataclasses.asdict(model_config),
        "classes": list(classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "image_size": int(image_size),
        "channels": int(channels),
        "resize": str(resize),
        "temperature": float(temperature),  # calibration: served probabilities are softmax(logits / temperature)
        "tta_temperatures": {str(k): float(v) for k, v in (tta_temperatures or {}).items()},  # per TTA level, if fitted
        "metrics": {k: float(v) for k, v in metrics.items()},
        "mlflow_run_id": mlflow_run_id,
        "torch_version": str(torch.__version__),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from the file alone (weights_only=True: nothing but tensors and plain data is unpickled)."""
    path = Path(path)
    hint = "train one with `make train`, or set CATER_MODEL_PATH (e.g. to models/smoke.pt, which `make smoke` writes)"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {hint}")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects outside the allow-list
        raise CheckpointError(f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}. Re-create it: {hint}") from None
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (needs {', '.join(REQUIRED)}): {hint}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this code reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}. Re-create it: {hint}")
    meta.setdefault("channels", 3)
    meta.setdefault("resize", "squash")
    meta.setdefault("temperature", 1.0)  # written before calibration: probabilities as the model gives them
    meta["tta_temperatures"] = meta.get("tta_temperatures") or {}
    try:
        check_temperatures(meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: a bad calibration temperature ({e}). Re-create it: {hint}") from None
    try:
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
        model = build_model(cfg, num_classes=len(meta["classes"]), image_size=meta["image_size"], in_chans=meta["channels"])
        model.load_state_dict(meta["state_dict"])
    except (ConfigError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this code's model: {e}. Re-create it: {hint}") from None
    model.to(device).eval()
    return model, meta
