"""`make predict` against the server on the same model and images: is classifying a folder at least as fast as
sending its files to `api.py` at concurrency 32?

The same N CIFAR-10 images (data_batch_5.bin records, the official test batch is not in ../shared/data) are written
as PNG files into a temporary folder. Then, one after the other and alone on the machine:
  1. `python predict.py --data-dir <folder>`, a real process, timed from start to exit (model loading included);
  2. `python api.py` on a free port, sent each file as one /predict request by 32 concurrent clients (the load
     generator of serve_load.py), after a warm-up; its images/s is the measured requests/s.
Both print images/s side by side, with calib_img_s read before and after.

    python benchmarks/predict_speed.py --checkpoint models/cnn.pt --images 5000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from machine import calib_img_s, cpu_name, markdown_table  # noqa: E402
from serve_load import PORT, Result, Server, cifar_images, drive, start, stop  # noqa: E402


def write_pngs(data_dir: Path, count: int, folder: Path) -> list[bytes]:
    """count CIFAR-10 images as PNG files in folder; returns their bytes."""
    files = []
    for i, image in enumerate(cifar_images(data_dir, count)):
        path = folder / f"{i:05d}.png"
        image.save(path, "PNG")
        files.append(path.read_bytes())
    return files


def time_predict(checkpoint: Path, folder: Path, out: Path) -> float:
    """Seconds for predict.py to classify the folder, process start to exit."""
    start_time = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "predict.py"), "--data-dir", str(folder), "--model", str(checkpoint),
                    "--out", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start_time


def serve_rate(checkpoint: Path, files: list[bytes], concurrency: int, requests: int, logs: Path) -> Result:
    """api.py answering one /predict request per file at the given concurrency."""
    env = {"CATER_MODEL_PATH": str(checkpoint), "CATER_PORT": PORT, "CATER_HOST": "127.0.0.1"}
    server = Server("api", [sys.executable, str(REPO / "api.py")], env, "/ready", "/predict", "base64")
    bodies = [("png32", json.dumps({"image_base64": base64.b64encode(d).decode()}).encode()) for d in files]
    proc, base = start(server, logs / "predict_speed_api.log", timeout=180)
    try:
        result = Result("api", concurrency, requests, 0.0)
        asyncio.run(drive(base + "/predict", bodies, concurrency, requests, psutil.Process(proc.pid), result))
    finally:
        stop(proc)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="models/cnn.pt", help="checkpoint written by train.py")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding cifar-10-batches-bin/")
    parser.add_argument("--images", type=int, default=5000, help="PNG files in the folder (at most 10,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="the server's concurrent clients")
    parser.add_argument("--logs", default="bench-results", help="folder for the server's log")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 10_000:
        parser.error("--images must be in [1, 10000]")
    checkpoint = Path(args.checkpoint).resolve()
    try:
        _, meta = load_checkpoint(checkpoint)
    except CheckpointError as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {checkpoint} ({meta['model_config'].get('arch')}, {meta['image_size']} px); "
          f"{args.images} CIFAR-10 32x32 PNGs; {cpu_name()}, {os.cpu_count()} CPUs")
    calib_before = calib_img_s()
    with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = write_pngs(Path(args.data_dir), args.images, folder)
        predict_s = time_predict(checkpoint, folder, Path(tmp) / "predictions.csv")
        served = serve_rate(checkpoint, files, args.concurrency, args.images, logs)
    calib_after = calib_img_s()
    if served.errors:
        print(f"warning: {served.errors} server errors, the first: {served.first_error}", file=sys.stderr)
    if served.errors == args.images:
        print("error: the server answered no request (its log is in --logs)", file=sys.stderr)
        return 1
    predict_rate = args.images / predict_s
    print(markdown_table([
        ["how", "images", "seconds", "images/s"],
        ["`make predict` (process start to exit)", str(args.images), f"{predict_s:.1f}", f"{predict_rate:.0f}"],
        [f"api.py, /predict at concurrency {args.concurrency}", str(args.images - served.errors),
         f"{served.seconds:.1f}", f"{served.rps:.0f}"],
    ]))
    print(f"predict / server: {predict_rate / served.rps:.2f}x  (calib_img_s {calib_before} -> {calib_after})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
