"""Time the training presets end to end on CIFAR-10 and print them side by side with the seed baseline.

Each run is a real `train.py` process (MLflow logging included, experiment `bench-train`); wall time is the
whole process, time-to-X is from the start of training to the end of the first epoch whose validation
accuracy (no TTA) reaches X.

    python benchmarks/train_speed.py --data-dir ../shared/data                      # fast x3 seeds, best, baseline
    python benchmarks/train_speed.py --presets fast --seeds 1 --extra --epochs 2    # a quick look
    python benchmarks/train_speed.py --presets fast --seeds 1 --procs 1 2 --extra --epochs 2   # 1 vs 2 processes
    python benchmarks/train_speed.py --presets fast --seeds 1 --batch-sizes 1024 256 --extra --epochs 8   # batch sizes

The machine's calib_img_s (../shared/tools/calib.py) is read before and after the runs; normalized seconds =
seconds x mean calib_img_s / 1000, comparable across machines of different speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from machine import CALIB, calib_img_s, cpu_name, markdown_table, mean_sd, timed_train

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.90, 0.93, 0.94)


def run_once(preset: str, seed: int, procs: int, batch: int | None, args) -> dict:
    name = f"{preset}-seed{seed}" + (f"-x{procs}" if procs > 1 else "") + (f"-b{batch}" if batch else "")
    out = REPO / "bench-results" / f"{name}.pt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
    cmd = [*launch, str(REPO / "train.py"), "--preset", preset, "--seed", str(seed), "--data-dir", args.data_dir,
           "--out", str(out), "--experiment", "bench-train", "--run-name", f"bench-{name}",
           *(["--batch-size", str(batch)] if batch else []), *args.extra]
    wall, meta = timed_train(cmd, out)
    history, metrics = meta["history"], meta["metrics"]
    images = sum(h["images_per_s"] * h["epoch_seconds"] for h in history)
    train_seconds = sum(h["epoch_seconds"] for h in history)
    return {
        "preset": preset + (f" x{procs} processes" if procs > 1 else "") + f", batch {meta['train_config']['batch_size']}",
        "seed": seed, "wall_s": wall,
        **{f"to_{int(t * 100)}": next((h["elapsed_s"] for h in history if h["val_acc"] >= t), None) for t in THRESHOLDS},
        "val_acc": metrics["val_acc"], "val_acc_tta": metrics.get("val_acc_tta"),
        "images_per_s": images / train_seconds,
        "data_share": sum(h["data_share"] * h["epoch_seconds"] for h in history) / train_seconds,
        "epochs": len(history),
    }


def fmt(values: list, kind: str) -> str:
    scale, unit = {"pct": (100, "%"), "s": (1, "s"), "n": (1, ""), "share": (100, "%")}[kind]
    return mean_sd(values, scale, unit, digits=2 if kind == "pct" else (1 if kind == "share" else 0))


COLUMNS = [
    ("runs", None, None), ("wall", "wall_s", "s"), ("to 90%", "to_90", "s"), ("to 93%", "to_93", "s"),
    ("to 94%", "to_94", "s"), ("val acc", "val_acc", "pct"), ("val acc TTA", "val_acc_tta", "pct"),
    ("img/s", "images_per_s", "n"), ("data", "data_share", "share"),
]


def table(results: list[dict], calib: float | None = None) -> str:
    rows = [["preset"] + [c[0] for c in COLUMNS] + (["wall, normalized"] if calib else [])]
    for preset in dict.fromkeys(r["preset"] for r in results):
        runs = [r for r in results if r["preset"] == preset]
        row = [preset]
        for title, key, kind in COLUMNS:
            if key is None:
                row.append(str(len(runs)))
            else:
                values = [r[key] for r in runs]
                cell = fmt(values, kind)
                if key.startswith("to_") and None in values:
                    cell = f"{cell} ({values.count(None)}/{len(values)} never)" if cell != "-" else "never"
                row.append(cell)
        if calib:
            row.append(fmt([r["wall_s"] * calib / 1000 for r in runs], "s"))
        rows.append(row)
    return markdown_table(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="a folder holding a CIFAR-10 copy")
    parser.add_argument("--presets", nargs="+", default=["fast", "best", "baseline"], help="presets to run, in order")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the first preset (the others run once)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1],
                        help="processes per run (each count runs every preset; >1 launches torchrun with gloo)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[None],
                        help="batch sizes to run every preset at (default: train.py's own: 1024 on a GPU, 256 on a CPU)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to every train.py run")
    args = parser.parse_args()
    if not Path(args.data_dir).exists():
        parser.error(f"--data-dir {args.data_dir} does not exist")

    calib_start = calib_img_s()
    results = []
    for procs in args.procs:
        for batch in args.batch_sizes:
            for i, preset in enumerate(args.presets):
                for seed in range(args.seeds if i == 0 else 1):
                    results.append(run_once(preset, seed, procs, batch, args))
                print("\n" + table(results), flush=True)
    calib_end = calib_img_s()
    calib = (calib_start + calib_end) / 2 if calib_start and calib_end else None

    print(f"\nmachine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print("time-to-X: from start of training to the end of the first epoch at X validation accuracy (no TTA)")
    if calib:
        print(f"calib_img_s: {calib:.0f} = mean of {calib_start:.0f} (start) and {calib_end:.0f} (end); "
              "normalized seconds = seconds x calib_img_s / 1000")
    else:
        print(f"calib_img_s: not measured ({CALIB} not found), so no normalized times")
    print(table(results, calib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
