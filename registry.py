"""The MLflow model registry: register each run's model, keep the alias `champion` on the best version measured on
the same validation split, and fetch a registered model's checkpoint for serving.

A version carries tags `split` (data.split_fingerprint), `select_metric` and `score` (its validation value of that
metric). A new version takes the alias only from a champion with the same split and metric and a lower score; from
anything else (another split, another metric, a version registered by hand) it does not, and says so. The compare and
the alias move are two calls: two runs finishing at the same moment on one server can both win against the old
champion, and the later move stands.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHAMPION = "champion"
DEFAULT_TRACKING_URI = f"sqlite:///{Path(__file__).resolve().parent / 'mlflow.db'}"  # train.py's store without MLFLOW_TRACKING_URI
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(RuntimeError):
    """A model URI that cannot be served; the message says why."""


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    previous_version: str | None = None
    previous_score: float | None = None


def default_name(dataset: str, data_dir: str) -> str:
    """cater-cifar10, or cater-<folder name> for an image folder."""
    if dataset == "cifar10":
        return "cater-cifar10"
    return "cater-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data_dir).resolve().name).strip("-.") or "folder")


def register_and_promote(model_uri: str, name: str, *, metric: str, score: float, split: str) -> Promotion:
    """Register model_uri as a new version of `name`; move `champion` to it when it beats the champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    version = mlflow.register_model(model_uri, name, tags={"split": split, "select_metric": metric,
                                                           "score": repr(float(score))}).version
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    label = f"val {metric} {score:.4f}"
    if champion is None:
        promoted, reason, previous = True, f"first champion of {name} ({label})", None
    else:
        tags, previous = champion.tags, str(champion.version)
        try:
            previous_score = float(tags["score"])
        except (KeyError, ValueError):
            previous_score = None
        if previous_score is None or tags.get("select_metric") != metric:
            promoted, reason = False, (f"champion version {previous} has no val {metric} of ours to compare with "
                                       f"(registered by hand, or with another --select-metric)")
        elif tags.get("split") != split:
            promoted, reason = False, (f"champion version {previous} was measured on another validation split "
                                       f"({tags.get('split')} vs {split}): not comparable")
        elif score > previous_score:
            promoted, reason = True, f"{label} beats champion version {previous} ({previous_score:.4f})"
        else:
            promoted, reason = False, f"{label} does not beat champion version {previous} ({previous_score:.4f})"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_decision", reason)
    return Promotion(name, str(version), promoted, reason, previous,
                     None if champion is None else previous_score)


def fetch_checkpoint(uri: str, dst: str | Path) -> tuple[Path, dict]:
    """models:/<name>@<alias> or models:/<name>/<version> -> (its checkpoint file under dst, registry info)."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:  # the container installs only what serving files needs (requirements-serve.txt)
        raise RegistryError(f"serving {uri} needs the mlflow package: pip install -r requirements.txt, or build the "
                            "image with --build-arg EXTRA_PACKAGES='timm>=1.0.20 mlflow==3.17.2'") from None

    match = URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r} is not a registered model URI: use models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = match["name"], match["alias"], match["version"]
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        client = mlflow.MlflowClient(tracking_uri)
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                         dst_path=str(tempfile.mkdtemp(dir=dst)), tracking_uri=tracking_uri))
    except MlflowException as e:
        raise RegistryError(f"cannot fetch {uri} from {tracking_uri}: {e.message}") from None
    except Exception as e:  # an unreachable server, a store that cannot be opened
        raise RegistryError(f"cannot fetch {uri} from {tracking_uri}: {e.__class__.__name__}: {e}") from None
    checkpoints = sorted(local.glob("artifacts/*.pt"))
    if not checkpoints:
        raise RegistryError(f"{uri} (version {mv.version}) holds no checkpoint: register a model logged by train.py")
    return checkpoints[0], {"registered_model": name, "model_version": str(mv.version), "model_alias": alias,
                            "run_id": mv.run_id}
