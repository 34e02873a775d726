"""Real-data smoke: train briefly on a slice of ../shared/data, serve with uvicorn, POST a PNG over HTTP."""

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, fresh_store

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "cifar-10-batches-bin"

pytestmark = [pytest.mark.full,
              pytest.mark.skipif(not (SHARED / "data_batch_1.bin").is_file(), reason="../shared/data not present")]


def test_train_then_serve_real_cifar(tmp_path, mlflow_tables):
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh_store(mlflow_tables, tmp_path), "TQDM_DISABLE": "1"}
    checkpoint = tmp_path / "cnn.pt"
    subprocess.run([sys.executable, "train.py", "--data-dir", str(SHARED.parent), "--limit", "3000", "--epochs", "2",
                    "--batch-size", "256", "--tta", "0", "--out", str(checkpoint), "--experiment", "ci-smoke"],
                   cwd=REPO, env=env, check=True, timeout=600)
    meta = torch.load(checkpoint, weights_only=True)
    assert meta["metrics"]["val_acc"] > 0.2  # 10 classes: chance is 0.1

    record = np.fromfile(SHARED / "data_batch_5.bin", dtype=np.uint8, count=3073)
    image = Image.fromarray(record[1:].reshape(3, 32, 32).transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {"image_base64": base64.b64encode(buffer.getvalue()).decode()}

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env={**env, "CATER_MODEL_PATH": str(checkpoint)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not come up:\n" + server.stdout.read1().decode(errors="replace"))
        response = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert response.status_code == 200, response.text
        result = response.json()
        assert set(result) >= {"class_index", "class_name", "confidence"}
        assert result["class_name"] == meta["classes"][result["class_index"]]
        assert 0.0 <= result["confidence"] <= 1.0
        assert httpx.post(f"{url}/predict", json={"image_base64": "%%%"}, timeout=30).status_code == 400
    finally:
        server.terminate()
        server.wait(timeout=30)
