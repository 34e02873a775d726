"""Data checks on real images with planted problems: duplicate recall per kind of copy, and label-error recall.

    python benchmarks/data_checks.py [--source ../shared/data/fashion-mnist/train] [--per-class 600] [--copies 500]
                                     [--flip 0.05] [--seeds 0 1 2] [--no-train]

1. Builds a folder of --per-class real images per class (train/ and a test/ of a tenth), plants --copies copies of
   training images (identical, JPEG q75, resized 1.5x, brighter, lower contrast), within a class, under another class
   and into test/, runs `datacheck.py` on it and prints the recall of each kind with the groups found that hold no
   planted copy (the real data's own duplicates, or false alarms), and the time it took.
2. Flips --flip of the training labels, trains the default model on it per seed (`train.py`, the folder defaults) and
   prints the recall of the flipped validation images among cleanlab's top-ranked (as many as were flipped).
Also prints how long fingerprinting and the all-pairs search take on every image of --source.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image, ImageEnhance  # noqa: E402

KINDS = ("identical", "jpeg", "resized", "brighter", "contrast")
VAL_FRACTION = 0.1
SHARED = REPO.parent / "shared" / "data" / "fashion-mnist" / "train"


def copy_of(image: Image.Image, kind: str) -> tuple[Image.Image, str]:
    """A planted copy of the image and the file suffix it is saved with."""
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buffer, "JPEG", quality=75)
        return Image.open(io.BytesIO(buffer.getvalue())), ".jpg"
    if kind == "resized":
        return image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.BILINEAR), ".png"
    if kind == "brighter":
        return ImageEnhance.Brightness(image).enhance(1.15), ".png"
    if kind == "contrast":
        return ImageEnhance.Contrast(image).enhance(0.85), ".png"
    return image, ".png"


def build_folder(source: Path, out: Path, per_class: int, copies: int, seed: int = 0) -> list[dict]:
    """out/train/<class>/ and out/test/<class>/ from the first per_class images of each of source's classes, with
    `copies` planted copies; returns them as {original, copy, kind, where} (where: same class, other class, test)."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    originals = []
    for name in classes:
        files = sorted(p for p in (source / name).iterdir() if p.is_file())[:per_class]
        for split in ("train", "test"):
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(files):
            split = "test" if i < max(1, per_class // 10) else "train"
            shutil.copy(path, out / split / name / path.name)
            if split == "train":
                originals.append((name, out / split / name / path.name))
    planted = []
    for k, (name, path) in enumerate(rng.sample(originals, copies)):
        kind = KINDS[k % len(KINDS)]
        where = ("same class", "other class", "test")[k * 3 // copies]
        split, target = ("test", name) if where == "test" else ("train", name)
        if where == "other class":
            target = rng.choice([c for c in classes if c != name])
        with Image.open(path) as image:
            image.load()
            made, suffix = copy_of(image, kind)
        destination = out / split / target / f"copy_{k}{suffix}"
        made.save(destination, **({"quality": 75} if suffix == ".jpg" else {}))
        planted.append({"original": str(path), "copy": str(destination), "kind": kind, "where": where})
    return planted


def duplicate_recall(findings_csv: Path, planted: list[dict], root: Path) -> tuple[dict, int]:
    """({kind: (found, planted)}, groups found holding no planted copy) from datacheck's findings.csv on root."""
    rows = [r for r in csv.DictReader(open(findings_csv)) if r["check"].startswith("duplicate")]
    group = {str(root / r["path"]): r["group"] for r in rows}
    recall = {}
    for p in planted:
        found = group.get(p["original"]) is not None and group.get(p["original"]) == group.get(p["copy"])
        hit, total = recall.get(p["kind"], (0, 0))
        recall[p["kind"]] = (hit + found, total + 1)
    planted_groups = {group.get(p["copy"]) for p in planted}
    return recall, len(set(group.values()) - planted_groups)


def flip_labels(folder: Path, share: float, seed: int) -> set[str]:
    """Moves `share` of folder/train's images into another class's folder; returns the moved files' new paths."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    files = sorted(p for name in classes for p in (folder / "train" / name).iterdir())
    moved = set()
    for path in rng.sample(files, round(share * len(files))):
        target = folder / "train" / rng.choice([c for c in classes if c != path.parent.name]) / f"flipped_{path.name}"
        path.rename(target)
        moved.add(str(target))
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(SHARED), help="an image folder of <class>/ folders")
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-train", action="store_true", help="the duplicate part only")
    args = parser.parse_args(argv)
    source = Path(args.source)
    import numpy as np

    from decode import decode_files, list_images
    from fingerprint import Fingerprints, near_pairs
    from machine import calib_img_s, cpu_name

    print(f"machine: {cpu_name()}")
    calib_img_s()
    paths = list_images(source)
    prints = Fingerprints.empty(len(paths))
    start = time.perf_counter()
    decode_files(paths, 28, 1, workers=2, prints=prints, desc="fingerprint")
    hashed = time.perf_counter() - start
    start = time.perf_counter()
    pairs = near_pairs(prints)
    print(f"all of {source}: {len(paths)} images fingerprinted in {hashed:.1f} s (decoded with them), all pairs "
          f"searched in {time.perf_counter() - start:.1f} s: {len(pairs)} near-duplicate pairs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "planted"
        planted = build_folder(source, folder, args.per_class, args.copies)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "datacheck.py"), "--data-dir", str(folder), "--out-dir",
                        str(Path(tmp) / "report")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = time.perf_counter() - start
        recall, other = duplicate_recall(Path(tmp) / "report" / "findings.csv", planted, folder)
        files = sum(1 for _ in folder.rglob("*.*"))
        print(f"\nplanted copies in {files} real images (make check-data: {took:.1f} s)")
        print(f"{'kind':<12} {'found':>6} {'planted':>8} {'recall':>7}")
        for kind in KINDS:
            hit, total = recall.get(kind, (0, 0))
            print(f"{kind:<12} {hit:>6} {total:>8} {hit / max(total, 1):>7.1%}")
        hit, total = (sum(v[i] for v in recall.values()) for i in (0, 1))
        print(f"{'all':<12} {hit:>6} {total:>8} {hit / max(total, 1):>7.1%}   groups with no planted copy: {other}")
        if args.no_train:
            return 0
        print(f"\nlabel errors: {args.flip:.0%} of the training labels flipped, default training, cleanlab on "
              f"validation")
        print(f"{'seed':>4} {'flipped in val':>14} {'found in top':>12} {'recall':>7} {'issues listed':>13}")
        recalls = []
        for seed in args.seeds:
            noisy = Path(tmp) / f"noisy{seed}"
            shutil.copytree(folder, noisy)
            for p in noisy.rglob("copy_*"):
                p.unlink()
            flipped = flip_labels(noisy, args.flip, seed)
            out = Path(tmp) / f"run{seed}"
            subprocess.run([sys.executable, str(REPO / "train.py"), "--data-dir", str(noisy), "--out",
                            str(out / "cnn.pt"), "--no-register", "--seed", str(seed), "--experiment", "data-checks",
                            "--val-fraction", str(VAL_FRACTION)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db"})
            issues = latest_label_issues(f"sqlite:///{out}/mlflow.db", out)
            listed = [str(noisy / row["image"]) for row in issues]
            val_flipped = flipped & validation_files(noisy)
            k = len(val_flipped)
            found = len(set(listed[:k]) & set(val_flipped))
            recalls.append(found / max(k, 1))
            print(f"{seed:>4} {k:>14} {found:>12} {found / max(k, 1):>7.1%} {len(listed):>13}")
        print(f"mean recall {np.mean(recalls):.1%} +- {np.std(recalls, ddof=1) if len(recalls) > 1 else 0:.1%}")
    return 0


def latest_label_issues(uri: str, out: Path) -> list[dict]:
    """The label_issues.csv of the newest run logged at uri."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("data-checks")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    path = client.download_artifacts(run.info.run_id, "label_issues.csv", str(out))
    return list(csv.DictReader(open(path)))


def validation_files(folder: Path) -> set[str]:
    """The files of the validation split train.py drew from folder (the same function, split seed and share)."""
    from config import DataConfig
    from data import load_dataset

    data = load_dataset(DataConfig(dataset="folder", data_dir=str(folder), val_fraction=VAL_FRACTION, image_size=28,
                                   channels=1))
    return set(data.val.paths)


if __name__ == "__main__":
    sys.exit(main())
