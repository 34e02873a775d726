"""Tiny datasets the tests make themselves: a CIFAR-10 binary folder and an image-folder dataset."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402

RECORDS_PER_BATCH = 60


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An HxWx3 uint8 image whose colour and stripe direction depend on the label: learnable, but noisy."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 180
    stripes = (np.arange(size) // 4 % 2) * 60
    base += stripes[None, :, None] if label % 2 else stripes[:, None, None]
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def write_cifar_batch(path: Path, labels, rng) -> None:
    records = [np.concatenate([[label], class_image(label, rng).transpose(2, 0, 1).reshape(-1)]) for label in labels]
    np.asarray(records, dtype=np.uint8).tofile(path)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """data_batch_1..5.bin with RECORDS_PER_BATCH records each (all 10 classes), plus batches.meta.txt."""
    monkeypatch.setattr(data, "CIFAR_BATCH_RECORDS", RECORDS_PER_BATCH)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}.bin", np.arange(RECORDS_PER_BATCH) % 10, rng)
    (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR_CLASSES) + "\n\n")
    return tmp_path


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
