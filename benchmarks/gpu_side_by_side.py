"""On one CUDA GPU, the public airbench94_muon.py (Keller Jordan, github.com/KellerJordan/cifar10-airbench) and
`train.py --preset best` trained for the same number of epochs on the same stand-in data, timed side by side.

    python benchmarks/gpu_side_by_side.py --airbench path/to/airbench94_muon.py \
        --cifar-batch ../shared/data/cifar-10-batches-bin/data_batch_1.bin

The stand-in data is one official CIFAR-10 binary batch (10,000 images) repeated to a 50,000-image training set,
so that the whole thing fits on a machine that the full set cannot reach: timings count, accuracies do not.
airbench94_muon.py is not part of this repo: fetch it yourself. It is run as published (its own model, Muon
optimizer, data loader and `torch.compile(mode="max-autotune")`), driven through its main() so that a few timed
runs follow one warm-up run; its epoch times come from its own CUDA-event timer, as it prints it (training steps;
the first epoch also holds the whitening layer's initialization). Ours is a real train.py process without MLflow; its training time is the sum
of its epochs' seconds (training steps only), read from the checkpoint it writes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from machine import markdown_table, timed_train

REPO = Path(__file__).resolve().parents[1]
RECORD = 1 + 3 * 32 * 32  # label byte + CHW image
REPEATS = 5  # one 10,000-image batch -> 50,000 training images, CIFAR-10's size

# Drives the published script: import it as a module (its top level only defines things), compile its net once,
# one warm-up run (compilation), then timed runs. Its main() prints a table whose last column is its timer.
AIRBENCH_DRIVER = """
import importlib.util, sys, time, torch
path, runs = sys.argv[1], int(sys.argv[2])
sys.argv = [path]
spec = importlib.util.spec_from_file_location("airbench94_muon", path)
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)
model = ab.CifarNet().cuda().to(memory_format=torch.channels_last)
model.compile(mode="max-autotune")
ab.print_columns(ab.logging_columns_list, is_head=True)
start = time.perf_counter()
ab.main("warmup", model)
print(f"WARMUP_WALL {time.perf_counter() - start:.3f}", flush=True)
for run in range(runs):
    start = time.perf_counter()
    ab.main(run, model)
    torch.cuda.synchronize()
    print(f"RUN_WALL {time.perf_counter() - start:.3f}", flush=True)
"""


def stand_in_data(batch_file: Path, work: Path) -> tuple[Path, Path]:
    """The one batch as train.py's CIFAR-10 binary folder (the file five times) and as airbench's train.pt/test.pt."""
    raw = np.fromfile(batch_file, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        sys.exit(f"--cifar-batch {batch_file}: not a CIFAR-10 binary batch ({raw.size} bytes)")
    records = raw.reshape(-1, RECORD)
    ours = work / "ours"
    ours.mkdir(parents=True, exist_ok=True)
    for i in range(1, REPEATS + 1):
        target = ours / f"data_batch_{i}.bin"
        if not target.exists():
            target.symlink_to(batch_file.resolve())
    theirs = work / "airbench"
    (theirs / "cifar10").mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(records[:, 1:].copy()).view(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous()  # NHWC
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    classes = [f"class{i}" for i in range(10)]
    torch.save({"images": images.repeat(REPEATS, 1, 1, 1), "labels": labels.repeat(REPEATS), "classes": classes},
               theirs / "cifar10" / "train.pt")
    torch.save({"images": images, "labels": labels, "classes": classes}, theirs / "cifar10" / "test.pt")
    return ours, theirs


def run_airbench(script: Path, folder: Path, runs: int) -> dict:
    """Per run: its own timer (s) and epoch times from its printed table, and the wall time of its main()."""
    cmd = [sys.executable, "-c", AIRBENCH_DRIVER, str(script.resolve()), str(runs)]
    print(f"\n$ airbench94_muon.py: 1 warm-up + {runs} timed runs", flush=True)
    out = subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, flush=True)
    return parse_airbench(out)


def parse_airbench(out: str) -> dict:
    """Its table rows carry its timer's running total (last column): the epochs' differences are their times (the
    first one includes the whitening layer's initialization); the "eval" row's TTA evaluation is left out."""
    results, epochs, previous, warmup = [], [], 0.0, float("nan")
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("RUN_WALL"):
            results.append({"timer_s": sum(epochs[:-1]), "epoch_s": epochs[:-1], "wall_s": float(line.split()[1])})
            epochs, previous = [], 0.0
        elif line.startswith("WARMUP_WALL"):
            epochs, previous, warmup = [], 0.0, float(line.split()[1])
        elif len(cells) == 6 and cells[-1].replace(".", "").isdigit():
            epochs.append(float(cells[-1]) - previous)
            previous = float(cells[-1])
    return {"runs": results, "warmup_wall_s": warmup}


def run_ours(folder: Path, epochs: int, runs: int, compile_: bool, extra: list[str]) -> dict:
    results = []
    for run in range(runs):
        out = folder / f"cnn-{'compiled' if compile_ else 'eager'}-{run}.pt"
        cmd = [sys.executable, str(REPO / "train.py"), "--preset", "best", "--epochs", str(epochs), "--data-dir", str(folder),
               "--out", str(out), "--no-mlflow", "--device", "cuda", "--seed", str(run), *(["--compile"] if compile_ else []),
               *extra]
        wall, checkpoint = timed_train(cmd, out)
        seconds = [h["epoch_seconds"] for h in checkpoint["history"]]
        results.append({"timer_s": sum(seconds), "epoch_s": seconds, "wall_s": wall})
    return {"runs": results}


def later_epoch_s(result: dict) -> float:
    """Mean time of the epochs after the first (which holds any compilation and warming up)."""
    return statistics.mean(s for r in result["runs"] for s in r["epoch_s"][1:])


def summary(name: str, result: dict, images_per_epoch: int) -> list[str]:
    runs = result["runs"]
    timer = [r["timer_s"] for r in runs]
    first = [r["epoch_s"][0] for r in runs]
    wall = [r["wall_s"] for r in runs]
    steady = later_epoch_s(result)
    return [name, str(len(runs[0]["epoch_s"])), f"{statistics.mean(first):.3f}", f"{steady:.3f}",
            f"{images_per_epoch / steady:,.0f}", f"{statistics.mean(timer):.2f}"
            + (f" ±{statistics.stdev(timer):.2f}" if len(timer) > 1 else ""), f"{statistics.mean(wall):.1f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--airbench", type=Path, required=True, help="the public airbench94_muon.py")
    parser.add_argument("--cifar-batch", type=Path, required=True, help="one CIFAR-10 binary batch (data_batch_1.bin)")
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "gpu", help="folder for the stand-in data")
    parser.add_argument("--epochs", type=int, default=8, help="epochs for ours (airbench94_muon.py trains 8)")
    parser.add_argument("--runs", type=int, default=3, help="timed airbench runs (after its warm-up)")
    parser.add_argument("--our-runs", type=int, default=1, help="train.py runs per variant")
    parser.add_argument("--variants", nargs="+", choices=["eager", "compile"], default=["eager", "compile"],
                        help="train.py as is, and with --compile")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (airbench94_muon.py runs only there)")
    for flag, path in (("--airbench", args.airbench), ("--cifar-batch", args.cifar_batch)):
        if not path.is_file():
            parser.error(f"{flag} {path}: no such file")

    ours_dir, theirs_dir = stand_in_data(args.cifar_batch, args.work)
    theirs = run_airbench(args.airbench, theirs_dir, args.runs)
    ours = {name: run_ours(ours_dir, args.epochs, args.our_runs, name == "compile", args.extra) for name in args.variants}

    n_ours = int(0.9 * REPEATS * 10_000)  # train.py holds out 10% for validation
    header = ["trainer", "epochs", "1st epoch s", "later epochs s", "img/s", "training s", "wall s (process or main())"]
    rows = [header, summary("airbench94_muon.py (max-autotune)", theirs, REPEATS * 10_000)]
    rows += [summary("train.py --preset best" + (" --compile" if name == "compile" else ""), result, n_ours)
             for name, result in ours.items()]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; stand-in data: one CIFAR-10 batch x{REPEATS}; "
          f"airbench's compile warm-up run took {theirs['warmup_wall_s']:.1f} s (not in its training s)")
    print(markdown_table(rows))
    base = statistics.mean(r["timer_s"] for r in theirs["runs"])
    per_image = later_epoch_s(theirs) / (REPEATS * 10_000)
    for name, result in ours.items():
        total = statistics.mean(r["timer_s"] for r in result["runs"])
        ours_per_image = later_epoch_s(result) / n_ours
        print(f"ours {name} / airbench94_muon: training time {total / base:.2f}x (target <= 1.2x), "
              f"time per image in later epochs {ours_per_image / per_image:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
