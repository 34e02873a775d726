"""int8 against fp32 on checkpoints' own data: for each checkpoint, export.py's fp32 ONNX file and its int8 model
(quantize.py, calibrated on the training images as export.py does), scored side by side on the validation split
and, where the data has one, the held-out test split: accuracy, top-1 agreement, fp32's agreement with itself
under a one-gray-level nudge (the yardstick), and images/s in ONNX Runtime. Several checkpoints (seeds) give the drop's mean and spread.

    python benchmarks/int8_accuracy.py --data-dir data/elpv --checkpoints runs/s0.pt runs/s1.pt runs/s2.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import export  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from data import DataError  # noqa: E402
from machine import calib_img_s, cpu_name, markdown_table  # noqa: E402
from quantize import CALIBRATION_IMAGES, compare, quantize, uint8_images  # noqa: E402


def scores(checkpoint: Path, data_dir: str) -> dict[str, dict]:
    """{split: quantize.compare's scores} for the checkpoint's fp32 ONNX file and its int8 model, quantized as
    export.py does, from one load of the data."""
    _, meta = load_checkpoint(checkpoint)
    cfg, data = export.int8_dataset(meta, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export.export(checkpoint, ["onnx"], out_dir=Path(tmp))["onnx"]
        int8 = quantize(fp32, Path(tmp) / "int8.onnx", uint8_images(data.train, cfg, CALIBRATION_IMAGES))
        splits = {"val": data.val, "test": data.test} if data.test is not None else {"val": data.val}
        return {name: compare(fp32, int8, uint8_images(split, cfg), split.labels) for name, split in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints written by train.py")
    parser.add_argument("--data-dir", required=True, help="the folder they were trained on")
    args = parser.parse_args(argv)
    missing = [c for c in args.checkpoints if not Path(c).is_file()]
    if missing:
        parser.error(f"--checkpoints: no such file: {', '.join(missing)}")
    before = calib_img_s()
    rows = [["checkpoint", "split", "images", "fp32", "int8", "drop (fp32 - int8, points)", "agreement", "fp32 nudged",
             "images/s fp32 -> int8"]]
    drops: dict[str, list[float]] = {}
    for checkpoint in args.checkpoints:
        try:
            found = scores(Path(checkpoint), args.data_dir)
        except (CheckpointError, DataError) as e:
            parser.error(f"{checkpoint}: {e}")
        for split, s in found.items():
            drop = 100 * (s["fp32_acc"] - s["int8_acc"])
            drops.setdefault(split, []).append(drop)
            rows.append([Path(checkpoint).name, split, str(s["images"]), f"{100 * s['fp32_acc']:.2f}%",
                         f"{100 * s['int8_acc']:.2f}%", f"{drop:+.2f}", f"{100 * s['agreement']:.2f}%",
                         f"{100 * s['noise_agreement']:.2f}%",
                         f"{s['fp32_img_s']:.0f} -> {s['int8_img_s']:.0f} ({s['int8_img_s'] / s['fp32_img_s']:.2f}x)"])
    after = calib_img_s()
    print(f"machine: {cpu_name()}, calib_img_s {before} before, {after} after")
    print(markdown_table(rows))
    for split, values in drops.items():
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"{split}: accuracy drop fp32 -> int8 {round(statistics.mean(values), 2) + 0.0:.2f}{spread} points "
              f"(mean{' ± sd' if spread else ''} over {len(values)} checkpoint(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
