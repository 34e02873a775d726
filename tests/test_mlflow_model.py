"""The MLflow model train.py logs (mlflow_model.py): base64 image files in, classes and probabilities out, also
through MLflow's own scoring server (`mlflow models serve`)."""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

import data
import train
from checkpoint import load_checkpoint
from conftest import RECORDS_PER_BATCH, class_image, write_cifar_batch
from transforms import normalize, pil_to_uint8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short CIFAR-format training run logged to a fresh MLflow store: (run id, checkpoint path, tracking uri)."""
    root = tmp_path_factory.mktemp("mlflow-model")
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}.bin", np.arange(RECORDS_PER_BATCH) % 10, rng)
    (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR_CLASSES) + "\n")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CIFAR_BATCH_RECORDS", RECORDS_PER_BATCH)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        out = root / "models" / "cnn.pt"
        assert train.main(["--data-dir", str(root), "--epochs", "1", "--batch-size", "64", "--out", str(out),
                           "--precision", "fp32", "--experiment", "model-test"]) == 0
    return load_checkpoint(out)[1]["mlflow_run_id"], out, uri


def png_b64(seed: int, size=(32, 32)) -> str:
    image = Image.fromarray(class_image(seed % 10, np.random.default_rng(seed), size=size[0]))
    buf = io.BytesIO()
    image.resize(size).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def checkpoint_probs(path: Path, images_b64: list[str]) -> torch.Tensor:
    model, meta = load_checkpoint(path)
    x = torch.stack([pil_to_uint8(Image.open(io.BytesIO(base64.b64decode(b))), meta["image_size"], meta["channels"],
                                  meta["resize"]) for b in images_b64])
    with torch.no_grad():
        return torch.softmax(model(normalize(x, meta["mean"], meta["std"])), dim=1)


def test_logged_model_takes_base64_images(trained, monkeypatch):
    run_id, checkpoint, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    images = [png_b64(i) for i in range(4)] + [png_b64(9, size=(57, 41))]
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out.columns) == ["class_index", "class_name", "confidence", "probabilities"] and len(out) == 5
    expected = checkpoint_probs(checkpoint, images)
    got = torch.tensor(np.stack(out["probabilities"].to_numpy()), dtype=torch.float32)
    assert torch.allclose(got, expected, atol=1e-5)
    assert out["class_index"].tolist() == expected.argmax(1).tolist()
    assert out["class_name"].tolist() == [data.CIFAR_CLASSES[i] for i in expected.argmax(1).tolist()]
    with pytest.raises(MlflowException, match="row 1: 'image' is not valid base64"):
        model.predict(pd.DataFrame({"image": [images[0], "!!!"]}))
    with pytest.raises(MlflowException, match="row 0: cannot read the image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_scoring_server_answers_an_image(trained, tmp_path):
    run_id, checkpoint, uri = trained
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,  # mlflow execs `uvicorn` by name: this venv's first on PATH
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "mlflow models serve did not start in 120 s"
            time.sleep(0.5)
        image = png_b64(3)
        r = httpx.post(f"{url}/invocations", timeout=30,
                       json={"dataframe_split": {"columns": ["image"], "data": [[image], ["data:image/png;base64," + image]]}})
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        expected = checkpoint_probs(checkpoint, [image])[0]
        for p in predictions:
            assert p["class_index"] == int(expected.argmax()) and abs(p["confidence"] - float(expected.max())) < 1e-5
        r = httpx.post(f"{url}/invocations", timeout=30, json={"dataframe_split": {"columns": ["image"], "data": [["!!!"]]}})
        assert r.status_code == 400 and "not valid base64" in r.text
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()
