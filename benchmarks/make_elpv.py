"""Assemble ELPV (solar-cell electroluminescence crops) as an image folder: OUT/train/<class>/ and OUT/test/<class>/.

ELPV (Deitsch et al.; PyPI package `elpv-dataset`, installed here when it is not importable) holds 2,624 grayscale
300x300 PNG crops of solar cells; labels.csv gives each a defect probability (0, 1/3, 2/3, 1) from expert raters and
the cell type (mono, poly). The probability becomes the class, named so that sorted order is severity order. The
split is seeded and stratified by class and cell type; test/ is a held-out test split (train.py carves its own
validation from train/ and never selects on test/). Files are hard-linked from the package (copied where linking
fails), byte for byte.

    python benchmarks/make_elpv.py                      # -> data/elpv, 75/25, seed 0
    python benchmarks/make_elpv.py --out /tmp/elpv --seed 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from machine import markdown_table

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "elpv-dataset"
CLASSES = ("p000_functional", "p033_possibly_defective", "p067_likely_defective", "p100_defective")  # by 3 * probability
MANIFEST = "elpv_split.json"  # written last: its presence means the folder is complete


def package_dir() -> Path:
    """The folder of the installed package's labels.csv, installing the package with pip if needed."""
    try:
        module = importlib.import_module("elpv_dataset")
    except ImportError:
        print(f"{PACKAGE} is not installed; installing it (a ~90 MB wheel from PyPI)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", PACKAGE], check=True)
        importlib.invalidate_caches()
        module = importlib.import_module("elpv_dataset")
    return Path(module.__file__).resolve().parent / "data"


def read_labels(data_dir: Path) -> list[tuple[str, str, str]]:
    """(relative image path, class name, cell type) for each line of labels.csv (whitespace-separated)."""
    rows = []
    for line in (data_dir / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        path, prob, cell_type = line.split()
        level = round(float(prob) * 3)
        if abs(float(prob) * 3 - level) > 1e-6 or not 0 <= level <= 3:
            raise ValueError(f"labels.csv: unexpected defect probability {prob!r} for {path}")
        rows.append((path, CLASSES[level], cell_type))
    return rows


def split(rows: list[tuple[str, str, str]], test_fraction: float, seed: int) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(path, class)], "test": [...]}: within each (class, cell type) stratum, a seeded shuffle."""
    strata: dict[tuple[str, str], list[str]] = {}
    for path, cls, cell_type in rows:
        strata.setdefault((cls, cell_type), []).append(path)
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for (cls, _), paths in sorted(strata.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        n_test = round(len(paths) * test_fraction)
        parts["test"] += [(p, cls) for p in paths[:n_test]]
        parts["train"] += [(p, cls) for p in paths[n_test:]]
    return parts


def place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def is_complete(out: Path) -> dict | None:
    """The manifest when OUT holds every file it lists, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files", {})
    ok = files and all((out / part / cls / name).is_file() for part, names in files.items() for cls, name in names)
    return manifest if ok else None


def counts_table(parts: dict[str, list[tuple[str, str]]]) -> str:
    count = {part: Counter(cls for _, cls in items) for part, items in parts.items()}
    rows = [["class", "train", "test", "total"]]
    for cls in CLASSES:
        rows.append([cls, str(count["train"][cls]), str(count["test"][cls]), str(count["train"][cls] + count["test"][cls])])
    rows.append(["all", *(str(sum(count[p].values())) for p in ("train", "test")),
                 str(sum(len(v) for v in parts.values()))])
    return markdown_table(rows, right=True)


def build(out: Path, seed: int, test_fraction: float) -> Path:
    manifest = is_complete(out)
    if manifest is not None:
        if (manifest.get("seed"), manifest.get("test_fraction")) != (seed, test_fraction):
            raise SystemExit(f"error: {out} already holds an ELPV split with seed {manifest.get('seed')} and test "
                             f"fraction {manifest.get('test_fraction')}; remove it or pick another --out")
        parts = {part: [(f"{cls}/{name}", cls) for cls, name in names] for part, names in manifest["files"].items()}
        print(f"{out} already holds a complete ELPV split (seed {seed}, test fraction {test_fraction}); nothing to do")
        print(counts_table(parts))
        return out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists, is not empty and is not a complete ELPV split; remove it or pick another --out")

    data_dir = package_dir()
    parts = split(read_labels(data_dir), test_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside OUT and rename at the end, so an interrupted run never leaves a half-written OUT behind.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        files: dict[str, list[tuple[str, str]]] = {}
        for part, items in parts.items():
            for cls in CLASSES:
                (tmp / part / cls).mkdir(parents=True)
            for path, cls in items:
                place(data_dir / path, tmp / part / cls / Path(path).name)
            files[part] = sorted((cls, Path(path).name) for path, cls in items)
        manifest = {"source": f"{PACKAGE} ({data_dir})", "seed": seed, "test_fraction": test_fraction,
                    "stratified_by": ["class", "cell type"], "classes": list(CLASSES), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: {sum(len(v) for v in parts.values())} images (seed {seed}, test fraction {test_fraction})")
    print(counts_table(parts))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "data" / "elpv"), help="folder to write train/ and test/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of each class held out as test/")
    args = parser.parse_args()
    if not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")
    build(Path(args.out), args.seed, args.test_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
