"""MLflow for a training run: the run itself (Tracker), the logged model, its registration, and metric names.

Without a run (--no-mlflow, or torchrun's other ranks) every call does nothing.
"""

from __future__ import annotations

import base64
import http.client
import importlib.metadata
import io
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from config import ConfigError, DataConfig, TrainConfig
from data import Dataset, split_fingerprint
from registry import CHAMPION, DEFAULT_TRACKING_URI, default_name, register_and_promote
from resume import ResumeError

REPO = Path(__file__).resolve().parent


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def check_tracking_server() -> None:
    """A tracking server named by MLFLOW_TRACKING_URI answers (checked before training, not after it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # a server answered (behind auth or a proxy, say): MLflow will say more if it is the wrong one
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, unresolvable, not HTTP at all
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers ({reason}). Start it (make "
                          "mlflow-server), unset MLFLOW_TRACKING_URI to log to mlflow.db, or pass --no-mlflow") from None


class Tracker:
    """MLflow logging, or nothing when disabled; every call is a no-op without an active run."""

    def __init__(self, enabled: bool, experiment: str, run_name: str, parent_run: str = "", run_id: str = ""):
        """A new run, or with run_id the existing run reopened (a resumed training run)."""
        self.run = None
        self.mlflow = None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=(REPO / "mlruns" / experiment.replace("/", "_")).as_uri())
        mlflow.set_experiment(experiment)
        # system metrics (CPU, memory, disk, GPU when present) sampled by MLflow in the background
        if run_id:
            try:
                self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            except mlflow.exceptions.MlflowException as e:
                raise ResumeError(f"cannot reopen MLflow run {run_id} in {mlflow.get_tracking_uri()}: {e.message}. "
                                  "Set MLFLOW_TRACKING_URI as it was for that run") from None
        else:
            self.run = mlflow.start_run(run_name=run_name or None, parent_run_id=parent_run or None, log_system_metrics=True)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    # The calls train.py and sweep.py make, each a no-op without an open run.
    def _call(self, name: str, *args, **kwargs) -> None:
        if self.run is not None:
            getattr(self.mlflow, name)(*args, **kwargs)

    def log_params(self, params: dict) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._call("log_metrics", metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path=artifact_path)

    def log_table(self, data: dict, artifact_file: str) -> None:
        self._call("log_table", data, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    def logged_epochs(self, metric: str = "val_acc") -> set[int]:
        """The steps (epochs) at which this run has the metric logged."""
        if self.run is None:
            return set()
        return {m.step for m in self.mlflow.MlflowClient().get_metric_history(self.run_id, metric)}

    def tag(self, name: str) -> str | None:
        """A tag of the run as it was opened (a resumed run's earlier tags)."""
        return self.run.data.tags.get(name) if self.run is not None else None

    def end(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            self.mlflow.end_run(status=status)
            self.run = None


# What the logged pyfunc model (mlflow_model.py) imports, copied into the model so it loads without this repo.
MODEL_CODE = ("mlflow_model.py", "predictor.py", "calibration.py", "checkpoint.py", "atomic.py", "config.py", "model.py",
              "transforms.py", "upload.py")


def log_model(tracker: Tracker, checkpoint: Path, meta: dict):
    """The checkpoint as an MLflow pyfunc model that takes base64 image files (mlflow_model.py, logged as code, no
    pickles); returns the ModelInfo (its model_uri is what the registry registers), or None without a run."""
    if tracker.run is None:
        return None
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L" if meta["channels"] == 1 else "RGB", (meta["image_size"],) * 2).save(buf, "PNG")
    example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("long", "class_index"), ColSpec("string", "class_name"), ColSpec("double", "confidence"),
                        ColSpec(Array("double"), "probabilities")]))
    versions = {name: importlib.metadata.version(name) for name in ("torch", "numpy", "pillow", "pandas", "timm", "tqdm")}
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(REPO / "mlflow_model.py"), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(REPO / f) for f in MODEL_CODE[1:]], signature=signature, input_example=example,
        pip_requirements=[f"{name}=={version.split('+')[0]}" for name, version in versions.items()],
    )


def register(tracker: Tracker, model_uri: str, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, score: float) -> None:
    """A registry version for this run's model; the champion alias moves to it only when it is better (registry.py).
    A registry that fails leaves the finished run and its checkpoint as they are, with a warning."""
    name = cfg.model_name or default_name(data_cfg.dataset, data_cfg.data_dir)
    try:
        result = register_and_promote(model_uri, name, metric=cfg.select_metric, score=score,
                                      split=split_fingerprint(data, data_cfg.data_dir))
    except Exception as e:  # a tracking server that refuses or is gone: the run itself is complete
        print(f"warning: could not register the model as {name!r}: {e.__class__.__name__}: {e}", file=sys.stderr)
        tracker.set_tags({"registry_error": str(e)[:500]})
        return
    tracker.set_tags({"registered_model": name, "model_version": result.version, "champion": str(result.promoted),
                      "champion_decision": result.reason})
    if result.previous_score is not None:
        tracker.log_metrics({"champion_previous_score": result.previous_score})
    state = f"now {CHAMPION}" if result.promoted else f"{CHAMPION} stays version {result.previous_version}"
    print(f"registered {name} version {result.version}, {state}: {result.reason}")


def log_missing_epochs(tracker: Tracker, history: list[dict]) -> None:
    """Epochs a killed run had finished but not yet logged (it dies between writing the last checkpoint and
    logging): logged now, so that every epoch is in the run exactly once."""
    logged = tracker.logged_epochs()
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))


def metric_names(classes: list[str]) -> list[str]:
    """Class names as MLflow accepts them in metric names (letters, digits, _ - . / and space); names that come out
    alike ("a:b" and "a?b") get their class index appended, so no class overwrites another's metrics."""
    names = [re.sub(r"[^\w\-./ ]", "_", name) for name in classes]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
