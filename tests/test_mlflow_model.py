"""The MLflow model train.py logs (mlflow_model.py): base64 image files in, classes and probabilities out, also
through MLflow's own scoring server (`mlflow models serve`); its registry versions and the champion alias."""

import base64
import io
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

import data
import registry
import tracking
import train
from checkpoint import load_checkpoint
from conftest import RECORDS_PER_BATCH, class_image, free_port, fresh_store, server_process, write_cifar_folder
from transforms import normalize, pil_to_uint8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_tables):
    """One short CIFAR-format training run logged to a fresh MLflow store: (run id, checkpoint path, tracking uri)."""
    root = write_cifar_folder(tmp_path_factory.mktemp("mlflow-model"))
    uri = fresh_store(mlflow_tables, root)
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
    """What the checkpoint answers, calibrated by its temperature (fitted at the end of training: not 1)."""
    model, meta = load_checkpoint(path)
    assert meta["temperature"] != 1.0
    x = torch.stack([pil_to_uint8(Image.open(io.BytesIO(base64.b64decode(b))), meta["image_size"], meta["channels"],
                                  meta["resize"]) for b in images_b64])
    with torch.no_grad():
        return torch.softmax(model(normalize(x, meta["mean"], meta["std"])) / meta["temperature"], dim=1)


def test_logged_model_takes_base64_images(trained, monkeypatch, tmp_path):
    run_id, checkpoint, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=str(tmp_path))  # not a folder left in /tmp
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    images = [png_b64(i) for i in range(4)] + [png_b64(9, size=(57, 41))]
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out.columns) == ["class_index", "class_name", "confidence", "probabilities"] and len(out) == 5
    expected = checkpoint_probs(checkpoint, images)
    got = torch.tensor(np.stack(out["probabilities"].to_numpy()), dtype=torch.float32)
    assert torch.allclose(got, expected, atol=1e-5)
    assert out["class_index"].tolist() == expected.argmax(1).tolist()
    assert out["class_name"].tolist() == [data.CIFAR_CLASSES[i] for i in expected.argmax(1).tolist()]
    with pytest.raises(MlflowException, match="row 1: the image is not valid base64"):
        model.predict(pd.DataFrame({"image": [images[0], "!!!"]}))
    with pytest.raises(MlflowException, match="row 0: the data is not an image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))


@pytest.mark.full
def test_mlflow_scoring_server_answers_an_image(trained, tmp_path):
    run_id, checkpoint, uri = trained
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp_path)}  # it downloads the model to a temp dir
    with server_process(cmd, env, tmp_path / "serve.log", f"{url}/ping", 120):
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


# ---------------------------------------------------------------------------------------------------------------
# The registry: each run registers a version; the champion alias moves only for a better score on the same split


def test_first_run_is_registered_as_champion(trained, monkeypatch):
    run_id, checkpoint, uri = trained
    client = mlflow.MlflowClient(uri)
    first = client.get_model_version("cater-cifar10", "1")  # later tests may register more versions
    assert first.run_id == run_id and first.tags["select_metric"] == "acc"
    meta = load_checkpoint(checkpoint)[1]
    assert float(first.tags["score"]) == pytest.approx(meta["metrics"]["val_acc"])
    tags = client.get_run(run_id).data.tags
    assert tags["registered_model"] == "cater-cifar10" and tags["champion"] == "True"
    assert tags["champion_decision"].startswith("first champion")


def test_champion_moves_only_for_a_better_score_on_the_same_split(trained, monkeypatch):
    run_id, _, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    name = "decisions"
    first = registry.register_and_promote(f"runs:/{run_id}/model", name, metric="acc", score=0.5, split="s1")
    assert first.promoted and first.previous_version is None

    def attempt(score, split="s1", metric="acc"):
        result = registry.register_and_promote(f"runs:/{run_id}/model", name, metric=metric, score=score, split=split)
        champion = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
        return result, champion

    worse, champion = attempt(0.4)
    assert not worse.promoted and champion == "1" and "does not beat" in worse.reason and worse.previous_score == 0.5
    tie, champion = attempt(0.5)
    assert not tie.promoted and champion == "1"
    other_split, champion = attempt(0.9, split="s2")
    assert not other_split.promoted and champion == "1" and "another validation split" in other_split.reason
    other_metric, champion = attempt(0.9, metric="macro_f1")
    assert not other_metric.promoted and champion == "1"
    better, champion = attempt(0.6)
    assert better.promoted and champion == better.version == "6" and "beats champion version 1" in better.reason
    assert client.get_model_version(name, "2").tags["champion_decision"] == worse.reason


@pytest.mark.full
def test_retraining_the_same_way_keeps_the_champion_and_smoke_runs_do_not_register(trained, monkeypatch, capsys):
    run_id, checkpoint, uri = trained
    client = mlflow.MlflowClient(uri)
    root = checkpoint.parents[1]
    monkeypatch.setattr(data, "CIFAR_BATCH_RECORDS", RECORDS_PER_BATCH)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    args = ["--data-dir", str(root), "--epochs", "1", "--batch-size", "64", "--precision", "fp32", "--experiment", "model-test"]
    versions = len(client.search_model_versions("name='cater-cifar10'"))
    champion = client.get_model_version_by_alias("cater-cifar10", registry.CHAMPION).version
    assert train.main(args + ["--out", str(root / "again.pt")]) == 0  # same seed, same data: the same score, not better
    out = capsys.readouterr().out
    assert f"registered cater-cifar10 version {versions + 1}, champion stays version {champion}: val acc" in out
    assert client.get_model_version_by_alias("cater-cifar10", registry.CHAMPION).version == champion
    assert train.main(args + ["--out", str(root / "smoke.pt"), "--smoke"]) == 0
    assert "registered" not in capsys.readouterr().out
    assert len(client.search_model_versions("name='cater-cifar10'")) == versions + 1


def test_fetch_checkpoint_of_the_champion(trained, monkeypatch, tmp_path):
    run_id, checkpoint, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias("cater-cifar10", registry.CHAMPION)
    path, info = registry.fetch_checkpoint("models:/cater-cifar10@champion", tmp_path)
    assert info == {"registered_model": "cater-cifar10", "model_version": str(champion.version),
                    "model_alias": "champion", "run_id": run_id}
    assert path.read_bytes() == checkpoint.read_bytes()
    assert registry.fetch_checkpoint("models:/cater-cifar10/1", tmp_path)[1]["model_alias"] is None
    with pytest.raises(registry.RegistryError, match="not a registered model URI"):
        registry.fetch_checkpoint("models:/", tmp_path)
    with pytest.raises(registry.RegistryError, match="cannot fetch models:/cater-cifar10@nope"):
        registry.fetch_checkpoint("models:/cater-cifar10@nope", tmp_path)
    with pytest.raises(registry.RegistryError, match="cannot fetch models:/missing/3"):
        registry.fetch_checkpoint("models:/missing/3", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# api.py serving the champion from the registry, and /reload


def test_api_serves_the_champion_and_reloads_a_new_one_without_failing_requests(trained, monkeypatch, tmp_path):
    import threading

    from fastapi.testclient import TestClient

    import api
    from serve_config import ServeConfig

    run_id, checkpoint, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client_ml = mlflow.MlflowClient(uri)
    champion = client_ml.get_model_version_by_alias("cater-cifar10", registry.CHAMPION)
    config = ServeConfig(model_path="models:/cater-cifar10@champion", device="cpu", api_key="k",
                         threads=torch.get_num_threads())
    image = png_b64(5)
    with TestClient(api.create_app(config)) as client:
        info = client.get("/model").json()
        assert (info["registered_model"], info["model_version"], info["model_alias"]) == \
               ("cater-cifar10", str(champion.version), "champion")
        assert info["mlflow_run_id"] == run_id
        assert f'model_version="{champion.version}"' in client.get("/metrics").text
        expected = checkpoint_probs(checkpoint, [image])[0]
        r = client.post("/predict", json={"image_base64": image}, headers={"X-API-Key": "k"})
        assert r.status_code == 200 and abs(r.json()["confidence"] - float(expected.max())) < 1e-5

        # a better version, with other weights, arrives: the alias moves, the server picks it up on /reload
        other = tmp_path / "other.pt"
        payload = torch.load(checkpoint, weights_only=True)
        head = [k for k in payload["state_dict"] if payload["state_dict"][k].dim() == 2][-1]
        payload["state_dict"][head] = payload["state_dict"][head].roll(1, dims=0) * 3  # other classes, sharper
        torch.save(payload, other)
        new_expected = checkpoint_probs(other, [image])[0]
        assert abs(float(new_expected.max()) - float(expected.max())) > 1e-3
        mlflow.set_experiment("model-test")
        with mlflow.start_run() as run:
            logged = tracking.log_model(SimpleNamespace(run=run), other, load_checkpoint(other)[1])
        better = registry.register_and_promote(logged.model_uri, "cater-cifar10", metric="acc",
                                               score=float(champion.tags["score"]) + 0.1, split=champion.tags["split"])
        assert better.promoted
        assert client.post("/reload").status_code == 401
        results, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                results.append(client.post("/predict", json={"image_base64": image}, headers={"X-API-Key": "k"}).status_code)

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        r = client.post("/reload", headers={"X-API-Key": "k"})
        stop.set()
        for w in workers:
            w.join()
        assert r.status_code == 200 and r.json()["model_version"] == better.version
        assert results and set(results) == {200}
        assert client.get("/model").json()["model_version"] == better.version
        assert f'model_version="{better.version}"' in client.get("/metrics").text
        r = client.post("/predict", json={"image_base64": image}, headers={"X-API-Key": "k"})
        assert abs(r.json()["confidence"] - float(new_expected.max())) < 1e-5  # the new weights answer

        # the alias now points at a model that is not one of ours: the reload fails, the served model stays
        code = tmp_path / "echo_model.py"
        code.write_text("import mlflow\n\n\nclass Echo(mlflow.pyfunc.PythonModel):\n"
                        "    def predict(self, context, model_input, params=None):\n        return model_input\n\n\n"
                        "mlflow.models.set_model(Echo())\n")
        mlflow.set_experiment("model-test")
        with mlflow.start_run():
            foreign = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=[])
        broken = mlflow.register_model(foreign.model_uri, "cater-cifar10").version
        client_ml.set_registered_model_alias("cater-cifar10", registry.CHAMPION, broken)
        r = client.post("/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 409 and f"still serving cater-cifar10 version {better.version}" in r.json()["detail"]
        assert "holds no checkpoint" not in r.json()["detail"]  # why goes to the server's log only
        assert client.get("/model").json()["model_version"] == better.version
        assert client.post("/predict", json={"image_base64": image}, headers={"X-API-Key": "k"}).status_code == 200
    client_ml.set_registered_model_alias("cater-cifar10", registry.CHAMPION, better.version)  # for any later test


@pytest.mark.full
def test_the_logged_code_is_all_the_model_needs(tmp_path):
    """The modules logged with the model (tracking.MODEL_CODE) import on their own, without this repo on the path:
    what `mlflow models serve` does on another machine."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    for name in tracking.MODEL_CODE:
        shutil.copy(repo / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import mlflow_model"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
