"""Check a labelled image folder before trusting a score on it: `make check-data DATA_DIR=<folder>`.

Finds unreadable files, identical and near-duplicate images (within a class, across classes: conflicting labels;
across train/val/test: leaks), small classes and odd sizes, and writes them to <out>/index.html and findings.csv.
label_issues ranks likely label errors from out-of-sample probabilities (cleanlab), for the training and evaluation
reports.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from atomic import atomic_path
from data import SMALL_CLASS, SPLITS, class_folders, train_folder
from decode import DataError, bombs_refused, list_images, open_image
from fingerprint import Fingerprints, copy_groups, fingerprint, near_pairs

CHUNK = 256  # files per worker task
TINY_SIDE = 16  # pixels: a shorter side than this holds next to nothing
ASPECT = 4.0  # width / height (or the reverse) beyond which an image is squashed or cropped badly
SIZE_FACTOR = 4.0  # a side this many times above or below the folder's median is listed
LISTED = 50  # duplicate groups and odd files shown with thumbnails on the page (the CSV has them all)
THUMB_SIDE = 64


def folder_files(root: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(classes, [(split, class, path)]) of a dataset folder laid out as training reads it: train/<class>/ with
    optional val/ and test/, or <class>/ directly. Empty class folders are kept (a finding, not an error)."""
    train = train_folder(root)
    classes = class_folders(train)
    files = []
    for split, folder in [("train", train)] + [(s, root / s) for s in SPLITS[1:] if train != root and (root / s).is_dir()]:
        for name in class_folders(folder):
            files += [(split, name, path) for path in list_images(folder / name)]
    return classes, files


def inspect(paths: list[str]) -> list[tuple]:
    """(width, height, hash, thumbnail, error) of each file, fully decoded (at a reduced scale for large JPEGs)."""
    found = []
    for path in paths:
        try:
            image = open_image(path, THUMB_SIDE)
            with bombs_refused(), Image.open(path) as header:  # the size before a JPEG draft reduced it
                width, height = header.size
            found.append((width, height, *fingerprint(image), ""))
        except Exception as e:  # open_image's DataError names the file; anything else here is as unreadable
            found.append((0, 0, 0, None, str(e) if isinstance(e, DataError) else f"cannot read image {path}: {e}"))
    return found


def inspect_all(paths: list[str], workers: int) -> list[tuple]:
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results = []
    with tqdm(total=len(paths), desc="check files", unit="img") as progress:
        if workers <= 0:
            mapped = map(inspect, chunks)
        else:
            pool = ProcessPoolExecutor(workers)
            mapped = pool.map(inspect, chunks)
        for chunk in mapped:
            results += chunk
            progress.update(len(chunk))
        if workers > 0:
            pool.shutdown()
    return results


def find_problems(classes: list[str], files: list[tuple[str, str, str]], results: list[tuple]) -> dict:
    """Everything the report lists, from the files and what inspect found in them."""
    readable = [i for i, r in enumerate(results) if not r[4]]
    unreadable = [(files[i][2], results[i][4]) for i, r in enumerate(results) if r[4]]
    prints = Fingerprints.empty(len(readable))
    for row, i in enumerate(readable):
        prints.hashes[row], prints.thumbs[row] = results[i][2], results[i][3]
    groups = []
    for members in copy_groups(len(readable), near_pairs(prints)):
        index = [readable[m] for m in members]
        labels = {files[i][1] for i in index}
        splits = {files[i][0] for i in index}
        kinds = (["conflicting labels"] if len(labels) > 1 else []) + (["across splits"] if len(splits) > 1 else [])
        identical = bool(np.all(prints.thumbs[members] == prints.thumbs[members[0]]))
        groups.append({"members": index, "kind": ", ".join(kinds) or "within a class",
                       "match": "identical" if identical else "near"})
    groups.sort(key=lambda g: ("conflicting" not in g["kind"], "across" not in g["kind"], -len(g["members"])))
    counts = {(split, name): 0 for split in {f[0] for f in files} | {"train"} for name in classes}
    for split, name, _ in files:
        counts[split, name] = counts.get((split, name), 0) + 1
    train_counts = [counts["train", name] for name in classes]
    typical = statistics.median(train_counts) if train_counts else 0
    small = [(split, name, n) for (split, name), n in sorted(counts.items())
             if split == "train" and (n < SMALL_CLASS or n < typical / 10)]
    sizes = [(results[i][0], results[i][1]) for i in readable]
    odd = []
    if sizes:
        mid_w, mid_h = statistics.median(w for w, _ in sizes), statistics.median(h for _, h in sizes)
        for i in readable:
            w, h = results[i][0], results[i][1]
            if min(w, h) < TINY_SIDE:
                odd.append((files[i][2], f"{w}x{h}: under {TINY_SIDE} px"))
            elif max(w / h, h / w) > ASPECT:
                odd.append((files[i][2], f"{w}x{h}: aspect ratio over {ASPECT:g}:1"))
            elif max(w / mid_w, h / mid_h) > SIZE_FACTOR or min(w / mid_w, h / mid_h) < 1 / SIZE_FACTOR:
                odd.append((files[i][2], f"{w}x{h}: far from the typical {mid_w:g}x{mid_h:g}"))
    return {"classes": classes, "files": files, "unreadable": unreadable, "groups": groups, "small": small,
            "odd": odd, "counts": counts}


def summary_lines(found: dict) -> list[str]:
    groups = found["groups"]

    def count(kind):
        picked = [g for g in groups if kind in g["kind"]]
        return f"{len(picked)} group(s), {sum(len(g['members']) for g in picked)} images"

    return [f"files: {len(found['files'])} in {len(found['classes'])} classes",
            f"unreadable: {len(found['unreadable'])}",
            f"duplicates within a class: {count('within a class')}",
            f"conflicting labels (copies under different classes): {count('conflicting labels')}",
            f"leaks (copies across train/val/test): {count('across splits')}",
            f"small classes: {len(found['small'])}" + (f" ({', '.join(f'{n}: {c}' for _, n, c in found['small'][:5])})"
                                                        if found["small"] else ""),
            f"odd sizes: {len(found['odd'])}"]


def thumbnail(path: str) -> str:
    """An <img> of the file, at most THUMB_SIDE px, inline (the page works when moved)."""
    try:
        image = open_image(path, THUMB_SIDE)
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    except DataError:
        return "(unreadable)"
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="">'


def write_report(found: dict, root: Path, out_dir: Path) -> Path:
    """out_dir/findings.csv (every finding, a row per file) and out_dir/index.html (the summary, thumbnails)."""
    files, esc = found["files"], html.escape
    rel = lambda path: os.path.relpath(path, root)  # noqa: E731
    with atomic_path(out_dir / "findings.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["check", "group", "split", "class", "path", "detail"])
        for path, why in found["unreadable"]:
            writer.writerow(["unreadable", "", "", "", rel(path), why])
        for g, group in enumerate(found["groups"]):
            for i in group["members"]:
                writer.writerow([f"duplicate ({group['kind']})", g, files[i][0], files[i][1], rel(files[i][2]),
                                 group["match"]])
        for split, name, n in found["small"]:
            writer.writerow(["small class", "", split, name, "", f"{n} images"])
        for path, why in found["odd"]:
            writer.writerow(["odd size", "", "", "", rel(path), why])
    parts = [f"<h1>Data check: {esc(str(root))}</h1>",
             "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in summary_lines(found)) + "</ul>",
             "<p>Every finding is in <a href=\"findings.csv\">findings.csv</a>, one row per file.</p>",
             f"<h2>Duplicate groups ({len(found['groups'])}: conflicting labels first, then leaks, then the "
             "largest)</h2>"]
    for g, group in enumerate(found["groups"][:LISTED]):
        cells = "".join(f"<figure>{thumbnail(files[i][2])}<figcaption>{esc(files[i][0])}/{esc(files[i][1])}<br>"
                        f"{esc(os.path.basename(files[i][2]))}</figcaption></figure>" for i in group["members"][:12])
        more = f"<p>... and {len(group['members']) - 12} more</p>" if len(group["members"]) > 12 else ""
        parts.append(f"<h3>group {g}: {esc(group['match'])}, {esc(group['kind'])}, {len(group['members'])} images</h3>"
                     f"<div class=\"row\">{cells}</div>{more}")
    for title, rows in (("Unreadable files", found["unreadable"]), ("Odd sizes", found["odd"])):
        parts.append(f"<h2>{title} ({len(rows)})</h2><table>" + "".join(
            f"<tr><td>{esc(rel(path))}</td><td>{esc(why)}</td></tr>" for path, why in rows[:LISTED]) + "</table>")
    parts.append(f"<h2>Small classes ({len(found['small'])})</h2><table>" + "".join(
        f"<tr><td>{esc(name)}</td><td>{n} training images</td></tr>" for _, name, n in found["small"]) + "</table>")
    from report import PAGE

    page = out_dir / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text(PAGE.format(title=esc(f"Data check: {root.name}"), body="\n".join(parts)).replace(
            "</style>", ".row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:11px}"
            "figure img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated}</style>"))
    return page


def label_issues(probs: np.ndarray, labels: np.ndarray) -> tuple[list[int], str]:
    """(indices of likely label errors, most likely first; '' or why none could be computed) from out-of-sample
    class probabilities (N x K) and the given labels: cleanlab's find_label_issues, ranked by self-confidence."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 2 * probs.shape[1] or len(np.unique(labels)) < 2:
        return [], f"too few images ({len(labels)}) for {probs.shape[1]} classes"
    from cleanlab.filter import find_label_issues

    try:
        ranked = find_label_issues(labels, np.asarray(probs, dtype=np.float64), n_jobs=1,
                                   return_indices_ranked_by="self_confidence")
    except (ValueError, AssertionError) as e:  # e.g. a class with no image here
        return [], f"cleanlab: {e}"
    return [int(i) for i in ranked], ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the folder: train/<class>/ (optional val/, test/) or <class>/")
    parser.add_argument("--out-dir", default="", help="where the report goes (default: reports/check-<folder name>)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes reading files")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a folder")
    args.out_dir = Path(args.out_dir or Path("reports") / f"check-{Path(args.data_dir).resolve().name}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.data_dir)
    try:
        classes, files = folder_files(root)
    except DataError as e:
        print(f"error: --data-dir {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: --data-dir {root}: no image files in its class folders", file=sys.stderr)
        return 2
    found = find_problems(classes, files, inspect_all([f[2] for f in files], args.workers))
    try:
        page = write_report(found, root, args.out_dir)
    except OSError as e:
        print(f"error: --out-dir {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(found)))
    print(f"report: {page}  (every finding: {args.out_dir / 'findings.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
