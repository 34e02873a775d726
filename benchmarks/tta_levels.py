"""What test-time augmentation costs and buys when serving: a checkpoint's validation accuracy and images/s at
each CATER_TTA level (0: none, 1: mirror, 2: mirror + 1-pixel shifts), through the server's own predictor.

The validation split is rebuilt as train.py draws it with its default flags (--val-fraction 0.1, --split-seed 0),
so use it on checkpoints trained that way. calib_img_s is printed in the same run.

    python benchmarks/tta_levels.py --checkpoint models/cnn.pt --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, however this is started

import torch  # noqa: E402

from config import DataConfig  # noqa: E402
from data import load_dataset  # noqa: E402
from machine import calib_img_s  # noqa: E402
from predictor import TorchPredictor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/cnn.pt")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", choices=["cifar10", "folder"], default="cifar10")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    predictor = TorchPredictor(args.checkpoint, torch.device("cpu"))
    meta = predictor.meta
    data = load_dataset(DataConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=meta["image_size"],
                                   channels=meta["channels"], resize=meta["resize"]))
    images, labels = data.val.images, data.val.labels
    calib_img_s()
    print(f"{args.checkpoint} on {len(labels)} validation images, {torch.get_num_threads()} threads\n")
    print("| TTA | val acc | images/s |\n|---|---:|---:|")
    for tta in (0, 1, 2):
        start, correct = time.perf_counter(), 0
        for i in range(0, len(labels), args.batch_size):
            probs = predictor.probabilities(images[i:i + args.batch_size], tta)
            correct += int((probs.argmax(1) == labels[i:i + args.batch_size]).sum())
        print(f"| {tta} | {100 * correct / len(labels):.2f}% | {len(labels) / (time.perf_counter() - start):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
