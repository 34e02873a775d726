"""Collect: read CIFAR-10 or an image folder, split it into train/validation(/test), and feed batches to training."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoconfig import FolderStats
from config import DataConfig
from decode import (IMAGE_EXTENSIONS, DataError, UnreadableImages, check_files, decode_files, iter_images, list_images,
                    open_image, probe_images)
from fingerprint import Fingerprints, near_pairs
from transforms import CIFAR10_MEAN, CIFAR10_STD, augment_batch, channel_stats, eval_transform, flip_mask, normalize, train_transform

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_BATCH_RECORDS = 10_000  # records in each official batch file
CIFAR_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# PIL modes without colour: such a folder is kept single-channel
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class ImageSet:
    """Labelled images, either decoded (uint8 N x 3 x H x W) or as file paths decoded on demand; folders' images
    carry their fingerprints (fingerprint.py) once decoded or checked."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    prints: Fingerprints | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index.tolist()],
            prints=None if self.prints is None else self.prints.subset(index.numpy()),
        )

    def joined(self, other: "ImageSet") -> "ImageSet":
        """This set followed by other's images."""
        def join(a, b, cat):
            return None if a is None or b is None else cat(a, b)
        return ImageSet(
            labels=torch.cat([self.labels, other.labels]),
            images=join(self.images, other.images, lambda a, b: torch.cat([a, b])),
            paths=join(self.paths, other.paths, lambda a, b: a + b),
            prints=join(self.prints, other.prints, lambda a, b: Fingerprints.concat([a, b])),
        )


@dataclass
class Dataset:
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    checks: list[str] = ()  # what the data checks found (copies across splits, conflicting labels, tiny classes)


def split_fingerprint(data: Dataset, data_dir: str | Path) -> str:
    """A short hash naming the validation split: the same images with the same labels give the same hash, whatever
    the input size or training settings (folders: file paths relative to the data folder; CIFAR-10: the pixels)."""
    digest = hashlib.sha256("\n".join(data.classes).encode())
    digest.update(data.val.labels.numpy().astype(np.int64).tobytes())
    if data.val.paths is not None:
        digest.update("\n".join(os.path.relpath(p, data_dir) for p in data.val.paths).encode())
    else:
        digest.update(data.val.images.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- CIFAR-10

def read_cifar10_binary(folder: Path):
    """The official binary version: data_batch_1..5.bin, optional test_batch.bin and batches.meta.txt."""
    def read(path: Path):
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise DataError(f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records")
        records = raw.reshape(-1, CIFAR_RECORD)
        if len(records) != CIFAR_BATCH_RECORDS:
            raise DataError(f"{path}: {len(records)} records, an official CIFAR-10 batch holds {CIFAR_BATCH_RECORDS}")
        labels = torch.from_numpy(records[:, 0].astype(np.int64))
        if labels.max() > 9:
            raise DataError(f"{path}: label {int(labels.max())} found, CIFAR-10 labels are 0-9")
        images = torch.from_numpy(records[:, 1:].copy()).view(-1, 3, 32, 32)
        return images, labels

    missing = [name for name in CIFAR_TRAIN_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (expected data_batch_1.bin ... data_batch_5.bin)")
    parts = [read(folder / name) for name in CIFAR_TRAIN_FILES]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    counts = torch.bincount(labels, minlength=10)
    if counts.min() == 0:
        raise DataError(f"{folder}: classes {torch.nonzero(counts == 0).flatten().tolist()} have no training images")
    test = read(folder / "test_batch.bin") if (folder / "test_batch.bin").is_file() else None
    meta = folder / "batches.meta.txt"
    classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else CIFAR_CLASSES
    if len(classes) != 10:
        raise DataError(f"{meta}: expected 10 class names, found {len(classes)}")
    return images, labels, test, classes


def read_cifar10_torchvision(root: Path, download: bool):
    """torchvision's python-pickle copy under root/cifar-10-batches-py, downloaded there when asked."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{root}: no CIFAR-10 copy found ({e})") from None
    except OSError as e:  # no network, DNS failure, disk full
        raise DataError(f"could not download CIFAR-10 into {root}: {e}. Offline? Point --data-dir at a local copy "
                        f"(a folder holding cifar-10-batches-bin/ or cifar-10-batches-py/)") from None
    images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    test = None
    if (root / "cifar-10-batches-py" / "test_batch").is_file():
        t = CIFAR10(str(root), train=False, download=False)
        test = (torch.from_numpy(t.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(t.targets))
    return images, torch.tensor(train.targets), test, list(train.classes)


def holds_cifar10(data_dir: Path) -> bool:
    return ((data_dir / "data_batch_1.bin").is_file() or (data_dir / "cifar-10-batches-bin").is_dir()
            or (data_dir / "cifar-10-batches-py").is_dir())


def looks_like_folder(data_dir: Path) -> bool:
    """No CIFAR-10 files, and a sub-folder (train/ or a class) holding image files: what --dataset folder reads."""
    if not data_dir.is_dir() or holds_cifar10(data_dir):
        return False
    return any(holds_images(data_dir / name) for name in class_folders(data_dir)[:8])


def holds_images(folder: Path) -> bool:
    """Whether an image file list_images would read is under folder, at any depth (stops at the first)."""
    return next(iter_images(folder), None) is not None


def find_cifar10(data_dir: Path, download: bool):
    for folder in (data_dir, data_dir / "cifar-10-batches-bin"):
        if (folder / "data_batch_1.bin").is_file():
            return (*read_cifar10_binary(folder), str(folder))
    if (data_dir / "cifar-10-batches-py" / "data_batch_1").is_file() or download:
        return (*read_cifar10_torchvision(data_dir, download), str(data_dir / "cifar-10-batches-py"))
    raise DataError(f"{data_dir}: no CIFAR-10 found (looked for data_batch_1.bin, cifar-10-batches-bin/, "
                    f"cifar-10-batches-py/) and --no-download was given")


# ---------------------------------------------------------------- image folders

def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], torch.Tensor, list[str]]:
    """Files under root/<class>/ (recursively, hidden files and folders skipped), labelled by folder name in sorted order."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    found = class_folders(root)
    training = classes is None  # the training folder defines the classes: each must hold images
    if training:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders {unknown} do not exist in train/")
    paths, labels, empty = [], [], []
    for index, name in enumerate(classes):
        files = list_images(root / name) if (root / name).is_dir() else []
        paths += files
        labels += [index] * len(files)
        if not files and training:
            empty.append(name)
    if empty:
        raise DataError(f"{root}: class folders {empty} hold no images (extensions: {sorted(IMAGE_EXTENSIONS)}); "
                        f"add images or remove the folders")
    if not paths:
        raise DataError(f"{root}: no images found in class sub-folders (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return paths, torch.tensor(labels), classes


def summarize_folder(data_dir: Path, sample: int = 256) -> FolderStats:
    """Class counts of the training folder and the typical size and colour of a seeded sample of its images."""
    root = Path(data_dir)
    folder, paths, labels, classes = scan_training(root)
    probed = probe_images(paths, sample=sample)
    if not probed:
        raise DataError(f"{folder}: none of {min(sample, len(paths))} sampled files could be opened as an image")
    sides = sorted(math.sqrt(w * h) for w, h, _ in probed)
    return FolderStats(class_counts=tuple(torch.bincount(labels, minlength=len(classes)).tolist()),
                       side=round(sides[len(sides) // 2]), grayscale=all(mode in GRAYSCALE_MODES for _, _, mode in probed),
                       has_val=(root / "val").is_dir())


def class_folders(root: Path) -> list[str]:
    """Names of root's sub-folders, sorted, hidden ones and macOS zip junk left out."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")


SPLITS = ("train", "val", "test")
LAYOUT = "expected train/<class>/ image folders (optional val/ and test/), or <class>/ folders directly"


def train_folder(root: Path) -> Path:
    """root/train; or root itself when it holds the class folders directly (root/<class>/..., as torchvision's
    ImageFolder and Keras read it): all of it is then training data, and the validation split is drawn from it."""
    if (root / "train").is_dir():
        return root / "train"
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; {LAYOUT}")
    splits = [name for name in SPLITS[1:] if (root / name).is_dir()]
    if splits:
        raise DataError(f"{root}: has {' and '.join(s + '/' for s in splits)} but no train/ (a class of that name "
                        f"must sit under train/); {LAYOUT}")
    siblings = [name for name in SPLITS[1:] if root.name in SPLITS and (root.parent / name).is_dir()]
    if siblings:  # pointed at dataset/train: its val/ and test/ would be left out without a word
        raise DataError(f"{root}: {' and '.join(s + '/' for s in siblings)} sit beside it: point --data-dir at "
                        f"{root.parent}, which holds the splits")
    folders = class_folders(root)
    # a folder of datasets (each with its own train/) would otherwise train on the datasets' names
    datasets = [name for name in folders if any((root / name / split).is_dir() for split in SPLITS)]
    if datasets:
        raise DataError(f"{root}: {datasets} hold train/, val/ or test/ folders of their own: point --data-dir at one of them")
    if not folders:
        raise DataError(f"{root}: no sub-folders; {LAYOUT}")
    return root


def scan_training(root: Path) -> tuple[Path, list[str], torch.Tensor, list[str]]:
    """(the training folder, its files, their labels, the classes); without train/, an error says that root's
    sub-folders were read as classes."""
    folder = train_folder(root)
    try:
        return folder, *scan_folder(folder)
    except DataError as e:
        if folder == root:
            raise DataError(f"{e}\n({root} has no train/, so its sub-folders were read as classes; {LAYOUT})") from None
        raise


def read_folder(cfg: DataConfig):
    root = Path(cfg.data_dir)
    folder, train_paths, train_labels, classes = scan_training(root)
    if len(classes) < 2:
        raise DataError(f"{folder}: found {len(classes)} class folder(s), need at least 2")
    splits = {"train": ImageSet(train_labels, paths=train_paths)}
    for name in ("val", "test"):
        if (root / name).is_dir():
            paths, labels, _ = scan_folder(root / name, classes)
            splits[name] = ImageSet(labels, paths=paths)
    return splits, classes, folder


# ---------------------------------------------------------------- splitting and loading

def held_count(n: int, fraction: float) -> int:
    """How many of a class's n images stratified_split holds out: round(fraction * n), at least 1 of 2 or more."""
    n_held = int(round(fraction * n))
    return 1 if n_held == 0 and fraction > 0 and n >= 2 else n_held


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, held_out) indices: held_count of each class held out, chosen by a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = held_count(len(members), fraction)
        held.append(members[:n_held])
        keep.append(members[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def training_count(class_counts: tuple[int, ...], limit: int, val_fraction: float, has_val: bool) -> int:
    """The size of the training split load_dataset will draw from a training pool with these class counts."""
    total = sum(class_counts)
    if limit and limit < total:
        class_counts = tuple(held_count(n, limit / total) for n in class_counts)
    if has_val:
        return sum(class_counts)
    return sum(n - held_count(n, val_fraction) for n in class_counts)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read the configured dataset and return seeded, stratified train/val splits (and test when present)."""
    data_dir = Path(cfg.data_dir)
    if cfg.dataset == "cifar10":
        images, labels, test, classes, source = find_cifar10(data_dir, cfg.download)
        splits = {"train": ImageSet(labels, images=images)}
        if test is not None:
            splits["test"] = ImageSet(test[1], images=test[0])
    else:
        splits, classes, folder = read_folder(cfg)
        source = str(data_dir) if folder != data_dir else f"{data_dir} (its <class>/ folders, no train/)"

    pool = splits["train"]
    if cfg.limit and cfg.limit < len(pool):
        _, picked = stratified_split(pool.labels, cfg.limit / len(pool), cfg.split_seed + 1)
        pool = pool.subset(picked)
    if "val" in splits:
        train, val = pool, splits["val"]
    else:
        keep, held = stratified_split(pool.labels, cfg.val_fraction, cfg.split_seed)
        train, val = pool.subset(keep), pool.subset(held)
    if len(val) == 0:
        raise DataError(f"{data_dir}: the validation split is empty; raise --val-fraction or add a val/ folder")
    if len(train) == 0:
        raise DataError(f"{data_dir}: no training images left after the validation split; raise --limit or lower --val-fraction")
    test = splits.get("test")

    decode = lambda paths, desc, prints=None: decode_files(  # noqa: E731
        paths, cfg.image_size, cfg.channels, cfg.resize, cfg.workers, desc, prints)
    checks = []
    if cfg.dataset == "folder":
        named = [("train", train), ("val", val)] + ([("test", test)] if test is not None else [])
        for name, split in named:  # every file read once, fingerprinted on the way
            split.prints = Fingerprints.empty(len(split))
        if cfg.in_memory:
            unreadable = []  # every split decoded before failing: one error lists every bad file, as streaming does
            for name, split in named:
                try:
                    split.images = decode(split.paths, f"decode {name}", split.prints)
                except UnreadableImages as e:
                    unreadable += e.errors
            if unreadable:
                raise UnreadableImages(unreadable)
        else:
            prints = Fingerprints.empty(sum(len(split) for _, split in named))
            check_files([p for _, split in named for p in split.paths], cfg.workers, cfg.channels, cfg.resize, prints)
            start = 0
            for _, split in named:
                split.prints = prints.subset(np.arange(start, start + len(split)))
                start += len(split)
        train, val, checks = check_splits(train, val, test, drawn="val" not in splits, classes=classes)
        if len(val) == 0:
            raise DataError(f"{data_dir}: every validation image has a near-copy in training (make check-data lists "
                            f"them); add distinct images or a val/ folder")
    if cfg.dataset == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif train.images is not None:  # a sample keeps the float copy small
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10_000]
        mean, std = channel_stats(train.images, sample)
    else:
        sample = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000])
        mean, std = channel_stats(decode(sample.paths, "decode stats sample"))
    return Dataset(classes, train, val, test, mean, std, source, checks)


SMALL_CLASS = 10  # training images under which a class gets a warning


def check_splits(train: ImageSet, val: ImageSet, test: ImageSet | None, drawn: bool,
                 classes: list[str]) -> tuple[ImageSet, ImageSet, list[str]]:
    """The cheap data checks, on fingerprinted splits: a copy on both sides of a split inflates its score. Drawn
    validation images with a near-copy in training move to training; copies across folders a user made (val/,
    test/) get a warning. Identical images with different labels and small classes get one too (make check-data
    lists near-duplicates within a split, and much more). Returns (train, val, the lines to print)."""
    lines = []
    copied = np.unique(near_pairs(val.prints, train.prints)[:, 0]) if len(val) and len(train) else []
    if len(copied) and drawn:
        stay = torch.from_numpy(np.setdiff1d(np.arange(len(val)), copied))
        train, val = train.joined(val.subset(torch.from_numpy(copied))), val.subset(stay)
        lines.append(f"{len(copied)} validation image(s) had a near-copy in training: moved to training, so they "
                     f"do not inflate the validation score ({len(val)} validation images left)")
    elif len(copied):
        lines.append(f"warning: {len(copied)} of val/'s {len(val)} images have a near-copy in train/: the validation "
                     f"score is inflated; remove the copies from one side")
    # fingerprints and labels only from here: joining the splits' images would copy them all
    seen = Fingerprints.concat([train.prints, val.prints])
    if test is not None and len(test):
        leaked = np.unique(near_pairs(test.prints, seen)[:, 0])
        if len(leaked):
            lines.append(f"warning: {len(leaked)} of test/'s {len(test)} images have a near-copy in train/ or "
                         f"val/: the test score is inflated; remove the copies from one side")
    labels_of: dict[tuple, set] = {}
    for h, thumb, label in zip(seen.hashes.tolist(), seen.thumbs, torch.cat([train.labels, val.labels]).tolist()):
        labels_of.setdefault((h, thumb.tobytes()), set()).add(label)
    conflicts = sum(len(found) > 1 for found in labels_of.values())
    if conflicts:
        lines.append(f"warning: {conflicts} image(s) appear under two or more classes (identical copies with "
                     f"different labels)")
    counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    small = [f"{classes[c]} ({n})" for c, n in enumerate(counts) if n < SMALL_CLASS]
    if small:
        lines.append(f"warning: class(es) with under {SMALL_CLASS} training images: {', '.join(small[:10])}")
    if lines:
        lines.append("`make check-data DATA_DIR=<folder>` lists every file concerned, with near-duplicates within "
                     "a split, unreadable files and odd sizes")
    return train, val, lines


# ---------------------------------------------------------------- batches

class InMemoryLoader:
    """Training batches from a uint8 tensor kept on the device, augmented a whole batch at a time.

    Drops the last partial batch; each epoch is a fresh seeded shuffle, translation and flip pattern, or with
    `draw` (a weight per image) as many images drawn with replacement in proportion to it.
    With shard=(rank, world) (distributed training) every rank draws the same global batches and keeps its slice
    of each: together the ranks see exactly what one process would.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, cfg: DataConfig,
                 seed: int, device: torch.device, shard: tuple[int, int] = (0, 1), draw: torch.Tensor | None = None):
        self.images, self.labels = images.to(device), labels.to(device)
        self.draw = draw
        self.batch_size = batch_size
        self.mean, self.std, self.cfg = mean, std, cfg
        self.rank, self.world = shard
        self.generator = torch.Generator().manual_seed(seed)
        self.base_flips = torch.rand(len(labels), generator=self.generator) < 0.5
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self):
        cfg = self.cfg
        if self.draw is None:
            order = torch.randperm(len(self.labels), generator=self.generator)[:len(self) * self.batch_size]
        else:
            order = torch.multinomial(self.draw, len(self) * self.batch_size, replacement=True, generator=self.generator)
        flips = flip_mask(self.epoch, self.base_flips, cfg.flip, self.generator)
        self.epoch += 1
        # On a GPU a batch's augmentation is a dozen tiny kernel launches that cost more than the math:
        # augment 16 batches per call there. On the CPU one batch at a time keeps the memory small.
        chunk = self.batch_size * (16 if self.images.is_cuda else 1)
        for start in range(0, len(order), chunk):
            index = order[start:start + chunk]
            device_index = index.to(self.images.device)
            x = augment_batch(self.images[device_index], flips[index], self.mean, self.std, cfg.translate,
                              self.generator, cfg.crop_scale, cfg.rotate90, cfg.erase)
            for xb, yb in zip(x.split(self.batch_size), self.labels[device_index].split(self.batch_size)):
                yield xb.tensor_split(self.world)[self.rank], yb.tensor_split(self.world)[self.rank]


class _FileImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], labels: torch.Tensor, transform, size: int):
        self.paths, self.labels, self.transform, self.size = paths, labels, transform, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i], self.size)), self.labels[i]


def balanced_draw(labels: torch.Tensor) -> torch.Tensor:
    """A weight per image that draws every class equally often (oversampling the rare ones), as --balance sample."""
    counts = torch.bincount(labels.cpu()).double()
    return (1.0 / counts)[labels.cpu()]


def train_loader(split: ImageSet, cfg: DataConfig, batch_size: int, seed: int, mean, std, device: torch.device,
                 shard: tuple[int, int] = (0, 1), oversample: bool = False):
    """In-memory batches when the split is decoded, else per-image PIL transforms in worker processes; augmented
    as cfg says, shuffled and augmented from seed; with oversample, drawn with replacement so that every class
    comes equally often (an epoch is still as many images as the split holds).

    batch_size is the global batch: with shard=(rank, world) each rank gets 1/world of every step's batch
    (streaming: a DistributedSampler, reshuffled per epoch by set_epoch)."""
    draw = balanced_draw(split.labels) if oversample else None
    if split.images is not None:
        return InMemoryLoader(split.images, split.labels, batch_size, mean, std, cfg, seed, device, shard, draw)
    transform = train_transform(cfg.image_size, mean, std, cfg.translate, cfg.flip != "none", cfg.channels,
                                cfg.resize, cfg.crop_scale, cfg.rotate90, cfg.erase)
    workers = cfg.workers
    images = _FileImages(split.paths, split.labels, transform, cfg.image_size)
    rank, world = shard
    if draw is not None:
        if world > 1:
            raise DataError("--balance sample under torchrun needs the training images in memory (--in-memory), "
                            "or use --balance weights")
        sampler = torch.utils.data.WeightedRandomSampler(draw, steps_per_epoch(len(images), batch_size) * batch_size,
                                                         generator=torch.Generator().manual_seed(seed))
        return torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=sampler, drop_last=True,
                                           num_workers=workers, persistent_workers=workers > 0,
                                           pin_memory=device.type == "cuda")
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(images, world, rank, shuffle=True, seed=seed, drop_last=True)
        return torch.utils.data.DataLoader(images, batch_size=batch_size // world, sampler=sampler, drop_last=True,
                                           num_workers=workers, persistent_workers=workers > 0,
                                           pin_memory=device.type == "cuda")
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")


def eval_batches(split: ImageSet, mean, std, batch_size: int, cfg: DataConfig, device: torch.device, workers: int | None = None):
    """Normalized (x, y) batches in order, no augmentation: the evaluation path."""
    if split.images is not None:
        for start in range(0, len(split), batch_size):
            x = split.images[start:start + batch_size].to(device, non_blocking=True)
            yield normalize(x, mean, std), split.labels[start:start + batch_size].to(device)
        return
    transform = eval_transform(cfg.image_size, mean, std, cfg.channels, cfg.resize)
    loader = torch.utils.data.DataLoader(_FileImages(split.paths, split.labels, transform, cfg.image_size), batch_size=batch_size,
                                         num_workers=cfg.workers if workers is None else workers)
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size)


def total_steps(n_train: int, batch_size: int, epochs: float) -> int:
    return math.ceil(steps_per_epoch(n_train, batch_size) * epochs)
