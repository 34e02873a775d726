"""The peers of `make bench-serve`, benchmarks/litserve_server.py (LitServe) and benchmarks/bentoml_service.py
(BentoML), are real server processes here: each must answer what api.py answers for the same image, or the benchmark
compares different work."""

import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from api import postprocess
from checkpoint import save_checkpoint
from config import ModelConfig
from conftest import free_port, server_process
from model import CnnClassifier
from predictor import TorchPredictor
from transforms import CIFAR10_MEAN, CIFAR10_STD, pil_to_uint8

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"c{i}" for i in range(10)]


def litserve(path: Path, port: int) -> tuple[list[str], dict, str]:
    return ([sys.executable, str(REPO / "benchmarks" / "litserve_server.py"), "--checkpoint", str(path),
             "--port", str(port), "--workers", "1"], {}, "/health")


def bentoml(path: Path, port: int) -> tuple[list[str], dict, str]:
    return ([sys.executable, "-m", "bentoml", "serve", "benchmarks.bentoml_service:Classifier", "--host", "127.0.0.1",
             "--port", str(port)], {"BENTO_CHECKPOINT": str(path), "BENTO_WORKERS": "1"}, "/readyz")


@pytest.mark.full
@pytest.mark.parametrize("peer", [litserve, bentoml])
def test_peer_server_answers_as_api_does(peer, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = CnnClassifier(ModelConfig(arch="airbench", widths=(8, 16, 16)), num_classes=10).eval()
    with torch.no_grad():
        model.whiten.weight.normal_()  # predictions that differ from image to image
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, model_config=model.cfg, classes=CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    image_size=32, metrics={})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    predictor = TorchPredictor(path, torch.device("cpu"))
    meta = predictor.meta
    pixels = pil_to_uint8(image, meta["image_size"], meta["channels"], meta["resize"])[None]
    expected = postprocess(predictor.probabilities(pixels, 0)[0], CLASSES, 3, 0).model_dump()

    port = free_port()
    cmd, env, ready = peer(path, port)
    monkeypatch.chdir(REPO)  # bentoml serve imports the service as a module of the repo
    with server_process(cmd, env, tmp_path / "peer.log", f"http://127.0.0.1:{port}{ready}", timeout=120):
        url = f"http://127.0.0.1:{port}/predict"

        def post(data: bytes) -> httpx.Response:
            image = base64.b64encode(data).decode()  # BentoML's batchable API takes a list, and answers one
            return httpx.post(url, json={"image_base64": [image] if peer is bentoml else image}, timeout=30)

        answer = post(buf.getvalue())
        assert answer.status_code == 200, answer.text
        got = answer.json()[0] if peer is bentoml else answer.json()
        assert got["class_index"] == expected["class_index"] and got["class_name"] == expected["class_name"]
        assert [c["class_index"] for c in got["top_k"]] == [c["class_index"] for c in expected["top_k"]]
        assert abs(got["confidence"] - expected["confidence"]) < 1e-4
        bad = post(b"not an image")
        assert bad.status_code == 400 and "not an image" in bad.text
