"""The Dockerfile: clean under hadolint, and the image holds everything the service imports and nothing it does not.

Building and running the image needs a Docker engine and a base image (README, "A container"); these tests check what
can go wrong without one: a module left out by .dockerignore, or a serving path that imports a training-only package.
"""

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import export
import registry
from test_export import checkpoint

REPO = Path(__file__).resolve().parents[1]
# Packages the Dockerfile installs beside requirements-serve.txt (TORCH_PACKAGES, EXTRA_PACKAGES).
IMAGE_EXTRAS = {"torch", "torchvision", "timm"}

CLOSURE = """
import json, sys, torch
import api
from predictor import load_predictor
for path in sys.argv[1:]:
    load_predictor(path, torch.device("cpu"), 1)
print(json.dumps({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}))
"""


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


@pytest.mark.full
def test_dockerfile_is_clean_under_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.full
def test_the_image_has_what_serving_imports(tmp_path):
    pt = checkpoint(tmp_path, "airbench", 3, 32, "squash")
    onnx_file = export.export(pt, ["onnx"])["onnx"]
    result = subprocess.run([sys.executable, "-c", CLOSURE, str(pt), str(onnx_file)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])

    local = {Path(f).name for f in modules.values() if f and Path(f).parent == REPO}
    copied = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert local - copied == set(), "add these to .dockerignore's list, or the image cannot start"

    serve = requirement_names(REPO / "requirements-serve.txt") | IMAGE_EXTRAS
    training_only = requirement_names(REPO / "requirements.txt") - serve
    owners = packages_distributions()
    imported = {d.lower().replace("_", "-") for name in modules for d in owners.get(name.split(".")[0], [])}
    assert imported & training_only == set(), "the service imports packages the image does not install"


def test_registry_uri_without_mlflow_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as in the image: import mlflow raises ImportError
    with pytest.raises(registry.RegistryError, match="needs the mlflow package"):
        registry.fetch_checkpoint("models:/cater-cifar10@champion", tmp_path)
