"""A team tracking server, for real: MLflow on PostgreSQL with an S3 artifact store (moto's S3 server), started here;
a tiny model is trained against it, registered as champion, and served from the registry by api.py.

Needs PostgreSQL's server programs (Debian: apt-get install postgresql; .ci/run installs them when missing).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

import api
import train
from serve_config import ServeConfig
from conftest import class_image, free_port, server_process

BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
pytestmark = [pytest.mark.full,
              pytest.mark.skipif(not (shutil.which("initdb") or BIN),
                                 reason="PostgreSQL server programs not installed (apt-get install postgresql)")]
BUCKET = "mlflow-artifacts"


def pg_tool(name: str) -> str:
    return shutil.which(name) or str(Path(BIN) / name)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free port; initdb and the server run as a non-root user."""
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="cater-pg-"))  # not under pytest's tmp dir: that one is private to root
    data = root / "data"
    if as_user:
        shutil.chown(root, "nobody")
    os.chmod(root, 0o755)
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(pg_tool("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "--no-sync")
        run(pg_tool("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start")
        run(pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, pg_tool("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port with an empty bucket; the credentials are moto's dummies."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


@pytest.fixture(scope="module")
def tracking_server(postgres, s3, tmp_path_factory):
    """`mlflow server` on PostgreSQL with artifacts proxied to S3, as `make mlflow-server` starts it."""
    env_s3, _ = s3
    port = free_port()
    env = {**os.environ, **env_s3}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination",
           f"s3://{BUCKET}", "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, env, tmp_path_factory.mktemp("mlflow-server") / "server.log", f"{url}/health", 180):
        yield url


def test_train_register_and_serve_the_champion_through_postgres_and_s3(tracking_server, s3, tmp_path, monkeypatch):
    _, s3_client = s3
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    from PIL import Image

    for label, name in enumerate(["crack", "ok", "scratch"]):
        (folder / "train" / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(class_image(label, rng, size=32)).save(folder / "train" / name / f"{i}.png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "cnn.pt"
    assert train.main(["--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--batch-size", "16",
                       "--workers", "0", "--precision", "fp32", "--out", str(out), "--experiment", "team"]) == 0

    client = mlflow.MlflowClient(tracking_server)
    champion = client.get_model_version_by_alias("cater-images", "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["champion"] == "True"
    keys = [o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.endswith("checkpoint/cnn.pt") for k in keys)  # the run's artifacts went to S3
    assert any(k.endswith("artifacts/cnn.pt") for k in keys)  # and the logged model with its checkpoint

    config = ServeConfig(model_path="models:/cater-images@champion", device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as c:
        info = c.get("/model").json()
        assert info["model_version"] == str(champion.version) and info["mlflow_run_id"] == champion.run_id
        import base64
        import io

        buf = io.BytesIO()
        Image.fromarray(class_image(1, rng, size=32)).save(buf, "PNG")
        r = c.post("/predict", json={"image_base64": base64.b64encode(buf.getvalue()).decode()})
        assert r.status_code == 200 and r.json()["class_name"] in {"crack", "ok", "scratch"}
