"""Tiny datasets the tests make themselves: a CIFAR-10 binary folder and an image-folder dataset."""

import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import httpx

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from benchmarks.machine import free_port  # noqa: E402,F401  (tests import it from here)

RECORDS_PER_BATCH = 60


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An HxWx3 uint8 image whose colour and stripe direction depend on the label: learnable, but noisy."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 180
    stripes = (np.arange(size) // 4 % 2) * 60
    base += stripes[None, :, None] if label % 2 else stripes[:, None, None]
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def mlflow_tables(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made and no experiment in it: making the tables (MLflow's migrations)
    takes 1.3-2 s per store here, copying this file a few milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-tables") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM experiments")  # the Default one is made again where each copy is first opened
    return path


def fresh_store(mlflow_tables: Path, folder: Path) -> str:
    """The tracking URI of a new, empty sqlite store at folder/mlflow.db."""
    shutil.copyfile(mlflow_tables, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def write_cifar_batch(path: Path, labels, rng) -> None:
    records = [np.concatenate([[label], class_image(label, rng).transpose(2, 0, 1).reshape(-1)]) for label in labels]
    np.asarray(records, dtype=np.uint8).tofile(path)


def write_cifar_folder(root: Path) -> Path:
    """root/cifar-10-batches-bin/: data_batch_1..5.bin with RECORDS_PER_BATCH records each (all 10 classes), plus
    batches.meta.txt; data.CIFAR_BATCH_RECORDS must be patched to RECORDS_PER_BATCH to read it. Returns root."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}.bin", np.arange(RECORDS_PER_BATCH) % 10, rng)
    (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR_CLASSES) + "\n\n")
    return root


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_BATCH_RECORDS", RECORDS_PER_BATCH)
    return write_cifar_folder(tmp_path)


def tiny_checkpoint(path: Path, classes: list[str]) -> Path:
    """A small seeded airbench checkpoint with a random whitening layer (so predictions differ from image to image)."""
    import torch

    from checkpoint import save_checkpoint
    from config import ModelConfig
    from model import CnnClassifier
    from transforms import CIFAR10_MEAN, CIFAR10_STD

    torch.manual_seed(0)
    model = CnnClassifier(ModelConfig(arch="airbench", widths=(8, 16, 16)), num_classes=len(classes)).eval()
    with torch.no_grad():
        model.whiten.weight.normal_()
    save_checkpoint(path, model, model_config=model.cfg, classes=classes, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    image_size=32, metrics={"val_acc": 0.5}, mlflow_run_id="run123")
    return path


@contextmanager
def many_files(n: int = 8192):
    """Room for over a thousand sockets in this process and the servers and clients it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def server_process(cmd: list[str], env: dict, log_path: Path, ready_url: str, timeout: float):
    """A server started as its own process group, waited for until ready_url answers 200, stopped at the end;
    its output goes to log_path, whose tail is shown when it dies or does not get ready."""
    env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}  # this venv first
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"{cmd[:4]} not ready in {timeout:.0f} s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:  # a test may have stopped it already
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture
def folder_dir(tmp_path):
    """train/<class>/*.png for 3 classes (odd sizes and modes), plus a test/ split."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for split, per_class in (("train", 20), ("test", 4)):
        for label, name in enumerate(["crack", "ok", "scratch"]):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = Image.fromarray(class_image(label, rng, size=40))
                if i % 5 == 1:
                    image = image.convert("L")
                elif i % 5 == 2:
                    image = image.convert("RGBA")
                image.save(root / split / name / f"{i}.png")
    return root
