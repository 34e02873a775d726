"""The `last` checkpoint: everything a training run needs to continue after its last finished epoch (weights,
optimizer, schedule, RNG states, history, MLflow run id), written atomically after every epoch and read back by
`train.py --resume`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atomic import atomic_path
from config import DataConfig, ModelConfig, TrainConfig, flat_params

FORMAT = "cater-last-1"
# Settings that may differ between a run and its resumption: they change neither the result nor what was logged.
MAY_CHANGE = ("resume", "threads", "workers")


class ResumeError(RuntimeError):
    """The last checkpoint cannot be read, or belongs to a run with other settings; the message says what to do."""


def last_path(out: str | Path) -> Path:
    """models/cnn.pt -> models/cnn.last.pt"""
    out = Path(out)
    return out.with_name(out.stem + ".last" + out.suffix)


def rng_states(loader) -> dict:
    """The random generators that decide what the next epoch sees: torch's, CUDA's, and the loader's shuffle."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(loader, "generator", None) is not None:
        states["loader"] = loader.generator.get_state()
    if hasattr(loader, "epoch"):
        states["loader_epoch"] = loader.epoch
    return states


def restore_rng(states: dict, loader) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "loader" in states and getattr(loader, "generator", None) is not None:
        loader.generator.set_state(states["loader"])
    if "loader_epoch" in states and hasattr(loader, "epoch"):
        loader.epoch = states["loader_epoch"]


def save_last(path: Path, **state) -> None:
    """Write atomically: a kill mid-write leaves the previous epoch's file."""
    payload = {"format": FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_last(path: Path, settings: dict) -> dict | None:
    """The state saved by save_last, or None when there is no file (a fresh start). `settings` (flat_params of this
    command) must match the saved run's, except MAY_CHANGE: a resumed run continues the same schedule."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        raise ResumeError(f"cannot read {path} ({e.__class__.__name__}: {str(e)[:200]}): delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a last checkpoint this version of train.py wrote: delete it to start over")
    # a setting newer than the saved run's train.py counts as its default: that is how the saved run trained
    saved = {**flat_params(DataConfig(), ModelConfig(), TrainConfig()), **state["settings"]}
    changed = [f"--{k.replace('_', '-')} {settings[k]!r} (the run had {saved.get(k)!r})"
               for k in settings if k not in MAY_CHANGE and settings[k] != saved.get(k)]
    if changed:
        raise ResumeError(f"--resume continues the run in {path}, which had other settings: {'; '.join(changed)}. "
                          "Use its settings, or delete the file (or pick another --out) to start a new run")
    return state
