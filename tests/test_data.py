import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
from config import DataConfig
from conftest import RECORDS_PER_BATCH, write_cifar_batch


def test_reads_cifar_binary_and_splits_stratified(cifar_dir):
    ds = data.load_dataset(DataConfig(data_dir=str(cifar_dir), val_fraction=0.2))
    assert ds.classes == data.CIFAR_CLASSES
    assert len(ds.train) + len(ds.val) == 5 * RECORDS_PER_BATCH and ds.test is None
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(ds.val.labels).tolist() == [6] * 10  # 20% of each class's 30


def test_record_layout_is_label_then_rgb_planes(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_BATCH_RECORDS", 10)
    records = np.zeros((10, data.CIFAR_RECORD), dtype=np.uint8)
    records[:, 0] = np.arange(10)
    records[:, 1:1025] = 200  # red plane
    records[:, 1025 + 32 * 5 + 3] = 77  # green plane, row 5, column 3
    for i in range(1, 6):
        records.tofile(tmp_path / f"data_batch_{i}.bin")
    images, labels, test, classes = data.read_cifar10_binary(tmp_path)
    assert labels[:10].tolist() == list(range(10)) and test is None and classes == data.CIFAR_CLASSES
    assert (images[:, 0] == 200).all() and images[0, 1, 5, 3] == 77 and images[0, 1].sum() == 77
    assert (images[:, 2] == 0).all()


def test_split_is_deterministic_and_seed_dependent():
    labels = torch.arange(1000) % 10
    a = data.stratified_split(labels, 0.1, seed=0)
    b = data.stratified_split(labels, 0.1, seed=0)
    c = data.stratified_split(labels, 0.1, seed=1)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert torch.bincount(labels[a[1]]).tolist() == [10] * 10
    assert len(set(a[0].tolist()) & set(a[1].tolist())) == 0


def test_limit_keeps_classes_balanced(cifar_dir):
    ds = data.load_dataset(DataConfig(data_dir=str(cifar_dir), limit=100, val_fraction=0.2))
    assert len(ds.train) + len(ds.val) == 100
    assert torch.bincount(ds.train.labels).tolist() == [8] * 10


def test_uses_test_batch_when_present(cifar_dir):
    write_cifar_batch(cifar_dir / "cifar-10-batches-bin" / "test_batch.bin", np.arange(RECORDS_PER_BATCH) % 10,
                      np.random.default_rng(3))
    ds = data.load_dataset(DataConfig(data_dir=str(cifar_dir / "cifar-10-batches-bin")))
    assert ds.test is not None and len(ds.test) == RECORDS_PER_BATCH


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), "not a whole number"),
    (lambda p: p.write_bytes(b"\x0c" + p.read_bytes()[1:]), "label 12"),
    (lambda p: p.write_bytes(p.read_bytes()[: 3 * data.CIFAR_RECORD]), "records"),
    (lambda p: p.unlink(), "missing data_batch_3.bin"),
])
def test_damaged_cifar_is_reported_with_the_file(cifar_dir, damage, message):
    path = cifar_dir / "cifar-10-batches-bin" / "data_batch_3.bin"
    damage(path)
    with pytest.raises(data.DataError, match=message) as err:
        data.load_dataset(DataConfig(data_dir=str(cifar_dir)))
    assert "cifar-10-batches-bin" in str(err.value)


def test_missing_cifar_without_download_names_the_folder(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path)):
        data.load_dataset(DataConfig(data_dir=str(tmp_path), download=False))


def test_download_failure_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class OfflineCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(data.DataError, match="Offline\\? Point --data-dir at a local copy"):
        data.load_dataset(DataConfig(data_dir=str(tmp_path)))
    assert calls == [(str(tmp_path), True, True)]


def test_reads_torchvision_python_format(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10 exposes after a download
        def __init__(self, root, train=True, download=False):
            n = 40 if train else 10
            self.data = np.full((n, 32, 32, 3), 9, dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            self.classes = list(data.CIFAR_CLASSES)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").touch()
    (tmp_path / "cifar-10-batches-py" / "test_batch").touch()
    ds = data.load_dataset(DataConfig(data_dir=str(tmp_path), download=False, val_fraction=0.25))
    assert len(ds.train) == 30 and len(ds.val) == 10 and len(ds.test) == 10
    assert ds.train.images.shape[1:] == (3, 32, 32) and int(ds.train.images[0, 0, 0, 0]) == 9


def test_image_folder_in_memory(folder_dir):
    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), image_size=24, workers=0))
    assert ds.classes == ["crack", "ok", "scratch"]
    assert ds.train.images.shape[1:] == (3, 24, 24) and len(ds.test) == 12
    assert len(ds.val) == 6 and len(ds.mean) == 3 and all(0 < s for s in ds.std)


def test_image_folder_streaming_keeps_paths(folder_dir):
    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), in_memory=False, workers=0))
    assert ds.train.images is None and len(ds.train.paths) == len(ds.train)
    x, y = next(data.eval_batches(ds.val, ds.mean, ds.std, 4, DataConfig(dataset="folder"), torch.device("cpu"), workers=0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_images_of_every_split_are_reported_by_path_at_once(folder_dir, in_memory):
    (folder_dir / "train" / "ok" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder_dir / "test" / "crack" / "empty.png").write_bytes(b"")
    with pytest.raises(data.DataError) as error:
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), workers=0, in_memory=in_memory))
    message = str(error.value)
    assert message.startswith("2 unreadable image(s)") and "ok/broken.png" in message and "crack/empty.png" in message


def test_folder_without_train_is_explained(tmp_path):
    with pytest.raises(data.DataError, match="train/<class>"):
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path)))


def test_class_folders_without_train_are_the_training_data(folder_dir):
    """root/<class>/ as torchvision's ImageFolder reads it: all of it trains, and validation is drawn from it."""
    shutil.rmtree(folder_dir / "test")  # else pointing at train/ would leave test/ out: refused below
    flat = folder_dir / "train"
    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(flat), image_size=24, workers=0))
    assert ds.classes == ["crack", "ok", "scratch"] and ds.test is None
    assert len(ds.train) == 54 and len(ds.val) == 6 and "no train/" in ds.source
    stats = data.summarize_folder(flat)
    assert stats.class_counts == (20, 20, 20) and not stats.has_val


@pytest.mark.parametrize("files, message", [
    (["val/a/0.png", "val/b/0.png"], "has val/ but no train/"),
    (["fashion/train/a/0.png", "cifar/train/b/0.png"], r"\['cifar', 'fashion'\] hold train/, val/ or test/"),
    (["0.png"], "no sub-folders"),
    (["cifar-10-batches-bin/data_batch_1.bin"], "hold no images .*\n.*no train/, so its sub-folders were read as classes"),
    (["train/a/0.png", "test/a/0.png"], "test/ sit beside it: point --data-dir at"),
])
def test_folders_without_train_that_are_not_class_folders_are_refused(tmp_path, files, message):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name, "PNG")
    data_dir = tmp_path / "train" if "train/a/0.png" in files else tmp_path
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(data_dir)))


def test_val_class_not_in_train_is_refused(folder_dir):
    (folder_dir / "val" / "dent").mkdir(parents=True)
    with pytest.raises(data.DataError, match="dent"):
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), workers=0))


def test_in_memory_loader_batches_are_seeded_and_augmented(cifar_dir):
    ds = data.load_dataset(DataConfig(data_dir=str(cifar_dir)))

    def first_batch(seed):
        loader = data.InMemoryLoader(ds.train.images, ds.train.labels, 32, ds.mean, ds.std,
                                     DataConfig(translate=2, flip="alternate"), seed, torch.device("cpu"))
        return next(iter(loader)), len(loader)

    (x1, y1), steps = first_batch(0)
    (x2, y2), _ = first_batch(0)
    (x3, _), _ = first_batch(1)
    assert steps == len(ds.train) // 32
    assert x1.shape == (32, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_streaming_mode_checks_every_file_before_training(folder_dir):
    (folder_dir / "test" / "ok" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="broken.jpg"):
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), in_memory=False, workers=0))


def test_empty_training_split_is_explained(cifar_dir):
    with pytest.raises(data.DataError, match="--limit"):
        data.load_dataset(DataConfig(data_dir=str(cifar_dir), limit=10, val_fraction=0.9))


def test_streaming_loader_works_with_spawned_workers(folder_dir):
    """Workers started by spawn (macOS, Windows) must be able to pickle the dataset and its transform."""
    import multiprocessing

    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), in_memory=False, workers=0))
    loader = data.train_loader(ds.train, DataConfig(dataset="folder", workers=1, flip="random"), 8, 0,
                               ds.mean, ds.std, torch.device("cpu"))
    loader.multiprocessing_context = multiprocessing.get_context("spawn")
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


@pytest.mark.parametrize("in_memory", [True, False])
def test_oversampling_draws_every_class_about_equally(folder_dir, in_memory):
    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), in_memory=in_memory, workers=0))
    keep = torch.cat([torch.nonzero(ds.train.labels == 0).flatten(), torch.nonzero(ds.train.labels == 1).flatten()[:4]])
    split = ds.train.subset(keep.sort().values)  # all of one class's images against 4 of another's
    counts = torch.bincount(split.labels)
    assert counts.max() >= 3 * counts.min()
    cfg = DataConfig(dataset="folder", workers=0, flip="random")
    seen = torch.zeros(2)
    for seed in range(20):
        loader = data.train_loader(split, cfg, 4, seed, ds.mean, ds.std, torch.device("cpu"), oversample=True)
        for _x, y in loader:
            seen += torch.bincount(y, minlength=2)
    assert len(loader) == len(split) // 4  # an epoch is still as long as the split
    assert 0.35 < seen[0] / seen.sum() < 0.65


def test_oversampling_under_torchrun_needs_decoded_images(folder_dir):
    ds = data.load_dataset(DataConfig(dataset="folder", data_dir=str(folder_dir), in_memory=False, workers=0))
    with pytest.raises(data.DataError, match="--balance weights"):
        data.train_loader(ds.train, DataConfig(dataset="folder", workers=0), 8, 0, ds.mean, ds.std,
                          torch.device("cpu"), shard=(0, 2), oversample=True)
