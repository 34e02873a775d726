"""Use a model on a folder: every file under it (any depth) classified by the served model, one CSV row each.

    python predict.py --data-dir DIR [--model models/cnn.pt | model.onnx | models:/<name>@champion]
                      [--out predictions.csv] [--review-below 0.6]

Files are streamed in batches (memory stays bounded whatever the folder's size), decoded in threads and preprocessed
as training evaluated them (decode.open_image, transforms.pil_to_uint8), and run through the server's predictor with
its TTA level (classify(), which evaluate.py uses too). A file that is not a readable image gets a row with the
reason in `error` and the run goes on; the exit status is 1 only when no image at all could be read. The CSV is
written atomically.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from atomic import atomic_path
from checkpoint import CheckpointError
from config import ConfigError
from decode import DataError, open_image
from loading import load_model
from registry import RegistryError
from runtime import available_cores
from serve_config import ServeConfig
from transforms import pil_to_uint8

BATCH = 64  # images decoded and classified together


def walk_files(folder: Path) -> Iterator[str]:
    """Every file under folder, in sorted order, lazily; hidden files and folders (and macOS zip junk) skipped."""
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(parent, name)


def preprocess(path: str, meta: dict) -> torch.Tensor | str:
    """The file as the model's input, or why it cannot be (a readable message, for the error column)."""
    try:
        return pil_to_uint8(open_image(path, meta["image_size"]), meta["image_size"], meta["channels"], meta["resize"])
    except DataError as e:
        return str(e).removeprefix(f"cannot read image {path}: ")
    except Exception as e:  # an image that opens but does not convert (broken EXIF, an unusual mode)
        return f"cannot convert the image: {e or type(e).__name__}"


def header(classes: list[str], top_k: int) -> list[str]:
    tops = [f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "confidence")]
    return ["path", "class_name", "class_index", "confidence", "review", "error", *tops, *(f"p_{c}" for c in classes)]


def row(path: str, probs: torch.Tensor | None, error: str, classes: list[str], top_k: int, review_below: float) -> list:
    if probs is None:
        return [path, "", "", "", "", error] + [""] * (2 * top_k + len(classes))
    values, indices = probs.topk(top_k)
    tops = [x for v, i in zip(values.tolist(), indices.tolist()) for x in (classes[i], f"{v:.6f}")]
    best, index = float(values[0]), int(indices[0])
    return [path, classes[index], index, f"{best:.6f}", str(best < review_below).lower(), "", *tops,
            *(f"{p:.6f}" for p in probs.tolist())]


def classify(paths: Iterable[str], predictor, tta: int, threads: int, total: int | None = None,
             desc: str = "predict") -> Iterator[tuple[str, torch.Tensor | None, str]]:
    """(path, its K probabilities or None, why not) for every path, in order, as the server answers: BATCH files at a
    time decoded in `threads` threads (the next chunk while this one is classified) and classified together, so memory
    stays bounded (two chunks) whatever the number of files.
    The progress bar (images/s, files failed) runs while the caller consumes the results."""
    meta = predictor.meta
    failed = 0
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True) as bar:
        files = iter(paths)

        def next_chunk():  # the next BATCH paths, their decoding started
            chunk = list(itertools.islice(files, BATCH))
            return chunk, [pool.submit(preprocess, path, meta) for path in chunk]

        chunk, decoding = next_chunk()
        while chunk:
            inputs = [job.result() for job in decoding]
            following, decoding = next_chunk()  # decoded while this chunk is classified
            good = [x for x in inputs if isinstance(x, torch.Tensor)]
            probs = iter(predictor.probabilities(torch.stack(good), tta) if good else [])
            for path, x in zip(chunk, inputs):
                ok = isinstance(x, torch.Tensor)
                yield path, next(probs) if ok else None, "" if ok else x
            failed += len(chunk) - len(good)
            bar.update(len(chunk))
            bar.set_postfix(failed=failed)
            chunk = following


def predict_folder(folder: Path, predictor, out: Path, tta: int, top_k: int, review_below: float,
                   threads: int) -> tuple[int, int]:
    """Classify every file under folder into the CSV at out; returns (images classified, files that failed)."""
    classes = predictor.meta["classes"]
    top_k = min(top_k, len(classes))
    total = sum(1 for _ in walk_files(folder))  # a first pass that only counts: the progress bar's total
    done = failed = 0
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header(classes, top_k))
        for path, probs, error in classify(walk_files(folder), predictor, tta, threads, total):
            writer.writerow(row(os.path.relpath(path, folder), probs, error, classes, top_k, review_below))
            done, failed = done + (probs is not None), failed + (probs is None)
    return done, failed


def add_model_arguments(parser: argparse.ArgumentParser) -> ServeConfig:
    """--model, --tta and --device, defaulting to what `make serve` would do (CATER_MODEL_PATH, CATER_TTA,
    CATER_DEVICE); returns the server's settings, for the other defaults (CATER_TOP_K, CATER_REVIEW_BELOW)."""
    used = {f"CATER_{name.upper()}" for name in ("model_path", "tta", "device", "top_k", "review_below")}
    try:  # only the settings used here: a server-only one set wrong is the server's error, not this tool's
        serve = ServeConfig.from_env({k: v for k, v in os.environ.items() if k in used})
    except ConfigError as e:
        parser.error(str(e))
    parser.add_argument("--model", default=serve.model_path,
                        help="a checkpoint, an ONNX export or models:/<name>@<alias> (default: what make serve serves, "
                             "CATER_MODEL_PATH or %(default)s)")
    parser.add_argument("--tta", type=int, choices=(0, 1, 2), default=serve.tta,
                        help="test-time augmentation level (default: CATER_TTA or %(default)s)")
    parser.add_argument("--device", default=serve.device,
                        help="auto, cpu, cuda or cuda:N (default: CATER_DEVICE or %(default)s)")
    return serve


def open_model(args: argparse.Namespace):
    """(predictor, registry info, threads) for args.model on args.device; None after printing why it cannot be."""
    threads = available_cores()
    torch.set_num_threads(threads)
    try:
        predictor, registered = load_model(args.model, args.device, threads, "--device")
    except (CheckpointError, ConfigError, RegistryError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return None
    return predictor, registered, threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder of images (searched at any depth)")
    serve = add_model_arguments(parser)
    parser.add_argument("--out", default="predictions.csv", help="the CSV written (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=serve.top_k,
                        help="classes listed per image (default: CATER_TOP_K or %(default)s)")
    parser.add_argument("--review-below", type=float, default=serve.review_below,
                        help="mark answers whose confidence is below this with review=true "
                             "(default: CATER_REVIEW_BELOW, else 0: none; now %(default)s)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if not 0.0 <= args.review_below <= 1.0:
        parser.error("--review-below must be in [0, 1]")
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (opened := open_model(args)) is None:
        return 2
    predictor, _, threads = opened
    start = time.perf_counter()
    try:
        done, failed = predict_folder(Path(args.data_dir), predictor, Path(args.out), args.tta, args.top_k,
                                      args.review_below, threads)
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    print(f"{done} images classified in {seconds:.1f} s ({done / seconds:.0f} images/s), {failed} files could not "
          f"be read: {args.out}")
    if not done:
        print(f"error: no image under {args.data_dir} could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
