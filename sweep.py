"""Compare training settings as one MLflow study: a grid of train.py runs, each a child run of one parent run.

The grid crosses learning-rate scales (times the learning rate the run would otherwise use), network widths (of the
from-scratch nets; a pretrained backbone's are fixed) and augmentation on/off. Every other flag goes to every run unchanged (e.g. --dataset folder --data-dir DIR). By default
each run trains on a 5,000-image stratified subset for 4 epochs, so the default grid of 8 runs fits in well under 30
minutes on 2 CPU cores; raise --limit/--epochs, or widen the grid, for a real study. Child runs write their checkpoints
to a temporary folder (models/cnn.pt is left alone) and do not register models. At the end a table compares them,
best first, and names the best run with its MLflow UI address.

    python sweep.py                                               # the default grid on CIFAR-10
    python sweep.py --lr-scales 0.5,1,2 --widths fast --augment on --limit 0 --epochs 15
    python sweep.py --dataset folder --data-dir ~/images          # any train.py flag is passed through
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from config import PRESETS, ConfigError
from settings import decide
from tracking import Tracker

REPO = Path(__file__).resolve().parent
AUG_OFF = ["--flip", "none", "--translate", "0", "--crop-scale", "0", "--no-rotate90"]
NAMED_WIDTHS = {name: PRESETS[name]["widths"] for name in ("fast", "best")}
UI_PORT = 5000  # make mlflow-ui


def parse_list(text: str, flag: str, kind=str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: cannot read {text!r} as a comma-separated list") from None
    if not values:
        raise ConfigError(f"{flag}: give at least one value")
    return values


def parse_widths(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """'fast,best' or '32-64-64,fast': (label, widths) pairs."""
    out = []
    for item in parse_list(text, "--widths"):
        if item in NAMED_WIDTHS:
            out.append((item, NAMED_WIDTHS[item]))
            continue
        try:
            widths = tuple(int(w) for w in item.split("-"))
        except ValueError:
            raise ConfigError(f"--widths: {item!r} is neither fast, best nor channels like 32-64-64") from None
        if not widths or min(widths) < 1:
            raise ConfigError(f"--widths: {item!r} needs positive channel counts")
        out.append((item, widths))
    return out


def resolved(train_args: list[str]) -> tuple[str, float]:
    """The network and learning rate train.py would use with these flags (preset, settings chosen from a folder)."""
    chosen = decide(train_args)
    return chosen.model.arch, chosen.train.lr


def ui_link(experiment_id: str, run_id: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def table(rows: list[dict], metric: str) -> str:
    header = f"{'#':>2}  {'lr':>9}  {'widths':<12} {'aug':<4} {'val ' + metric:>14} {'val macro-F1':>12} {'train s':>8}  run"
    lines = [header, "-" * len(header)]
    for i, r in enumerate(rows, 1):
        score = "failed" if r["score"] is None else f"{r['score']:.4f}"
        f1 = "-" if r.get("macro_f1") is None else f"{r['macro_f1']:.4f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"{i:>2}  {r['lr']:>9.4g}  {r['widths']:<12} {r['aug']:<4} {score:>14} {f1:>12} {secs:>8}  {r['run_id'] or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--lr-scales", default="0.5,1", help="learning-rate multipliers, comma-separated")
    parser.add_argument("--widths", default="fast,best", help="fast, best, or channels per block like 32-64-64")
    parser.add_argument("--augment", default="on,off", help="on, off or both: training augmentation (flips, "
                                                           "translations, crops, rotations) as configured, or none")
    parser.add_argument("--limit", type=int, default=5000, help="images per run, a stratified subset (0 = all)")
    parser.add_argument("--epochs", type=float, default=4.0, help="epochs per run")
    parser.add_argument("--experiment", default="cv-image-classification", help="MLflow experiment of all runs")
    args, train_args = parser.parse_known_args(argv)
    if "--no-mlflow" in train_args:
        parser.error("a sweep lives in MLflow: drop --no-mlflow")
    try:
        scales = parse_list(args.lr_scales, "--lr-scales", float)
        widths = parse_widths(args.widths)
        augment = parse_list(args.augment, "--augment")
        if bad := [a for a in augment if a not in ("on", "off")]:
            raise ConfigError(f"--augment: {', '.join(bad)} is not on or off")
        if min(scales) <= 0 or args.limit < 0 or args.epochs <= 0:
            raise ConfigError("--lr-scales must be > 0, --limit >= 0 and --epochs > 0")
        common = [*train_args, "--epochs", str(args.epochs), "--experiment", args.experiment, "--no-register"]
        if args.limit:
            common += ["--limit", str(args.limit)]
        arch, lr = resolved(common)
        if arch not in ("airbench", "baseline") and len(widths) > 1:
            raise ConfigError(f"--widths: {arch} is a pretrained backbone of fixed width; give one value, or sweep "
                              "--arch airbench")
        if arch == "baseline" and any(len(w) != 2 for _, w in widths):
            raise ConfigError("--widths: the baseline net takes two widths, like 32-64")
    except ConfigError as e:
        parser.error(str(e))

    grid = list(itertools.product(scales, widths, augment))
    parent = Tracker(True, args.experiment, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    parent.log_params({"arch": arch, "lr_scales": args.lr_scales, "widths": args.widths, "augment": args.augment,
                       "limit": args.limit, "epochs": args.epochs, "base_lr": lr, "runs": len(grid),
                       "train_args": shlex.join(train_args)})
    experiment_id = parent.run.info.experiment_id
    print(f"sweep {parent.run_id}: {len(grid)} runs in experiment {args.experiment!r}, base lr {lr:g}")
    rows, status = [], "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
            for i, (scale, (width_label, width), aug) in enumerate(grid, 1):
                name = f"lr{lr * scale:.4g}-w{width_label}-aug{aug}"
                out = Path(tmp) / f"{i}.pt"
                cmd = [sys.executable, str(REPO / "train.py"), *common, "--lr", repr(lr * scale),
                       "--widths", *map(str, width), *([] if aug == "on" else AUG_OFF),
                       "--run-name", name, "--parent-run", parent.run_id, "--out", str(out)]
                print(f"\n[{i}/{len(grid)}] {name}\n$ {shlex.join(cmd[1:])}", flush=True)
                code = subprocess.run(cmd, cwd=REPO).returncode
                rows.append({"lr": lr * scale, "widths": width_label, "aug": aug, **result(out, code)})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print("\ninterrupted: comparing the runs that finished", file=sys.stderr)
    finally:
        done = sorted(rows, key=lambda r: -1 if r["score"] is None else r["score"], reverse=True)
        metric = next((r["metric"] for r in done if r.get("metric")), "acc")
        text = table(done, metric)
        print("\n" + text)
        if rows:
            parent.log_text(text + "\n", "comparison.txt")
        best = next((r for r in done if r["score"] is not None), None)
        if best:
            parent.log_metrics({f"best_val_{metric}": best["score"]})
            parent.set_tags({"best_run_id": best["run_id"], "best_settings": f"lr {best['lr']:g}, widths "
                                                                             f"{best['widths']}, augment {best['aug']}"})
            print(f"\nbest: lr {best['lr']:.4g}, widths {best['widths']}, augmentation {best['aug']}: val {metric} "
                  f"{best['score']:.4f}\n      {ui_link(experiment_id, best['run_id'])}  (make mlflow-ui)")
        parent.end(status)
    return 0 if status == "FINISHED" and best else 1


def result(checkpoint: Path, code: int) -> dict:
    """A child's run id and validation scores, read from the checkpoint it wrote (train.py's exit code otherwise)."""
    import torch

    if code != 0 or not checkpoint.is_file():
        return {"score": None, "run_id": None}
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    metric = meta.get("train_config", {}).get("select_metric", "acc")
    metrics = meta.get("metrics", {})
    return {"score": metrics.get(f"val_{metric}"), "metric": metric, "macro_f1": metrics.get("val_macro_f1"),
            "seconds": metrics.get("train_seconds"), "run_id": meta.get("mlflow_run_id")}


if __name__ == "__main__":
    sys.exit(main())
