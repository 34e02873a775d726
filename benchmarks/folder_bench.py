"""Image folders: train.py's default flags, seeded runs side by side with other flag sets, on real folder datasets.

(a) Fashion-MNIST (../shared/data/fashion-mnist: train/<class>/ only, 60,000 28x28 grayscale PNGs; validation only)
(b) ELPV (benchmarks/make_elpv.py: 2,624 300x300 grayscale solar-cell crops in 4 imbalanced classes, with a held-out
    test/ split that model selection never sees; built on first use)
(c) --rss-check: peak memory of default flags at 10,000 224x224 RGB JPEGs (Fashion-MNIST upscaled and tinted per
    class; built once under data/), one epoch capped at 5 steps.

Each run is a real `train.py --dataset folder` process (MLflow experiment `bench-folder`), its output streamed here and
saved under bench-results/folder_bench-logs/. Wall time is the whole process; peak RSS is polled every 0.2 s over the
process and all its children (the tree figure sums them, so pages the data-loader workers share with the parent count
more than once: an upper bound). Metrics and the settings the defaults chose come from the checkpoint train.py wrote.
calib.py runs at the start and at the end; normalized seconds = seconds * mean calib_img_s / 1000.

    python benchmarks/folder_bench.py                                       # defaults, 3 seeds each (long: use the machine alone)
    python benchmarks/folder_bench.py --datasets elpv --flagsets default,oversample --seeds 3   # a direction against the defaults
    python benchmarks/folder_bench.py --extra "--limit 400 --epochs 1 --max-steps 3" --rss-images 200   # smoke test
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import psutil
import torch
from PIL import Image, ImageOps

from machine import calib_img_s, cpu_name, markdown_table, mean_sd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench-results"
REFERENCE_IMG_S = 1000  # calib.py's reference machine
GB = 1e9

DATASETS = {"fashion": "fashion-mnist", "elpv": "elpv"}
FLAGSETS = {  # name -> dataset -> flags; a flag set runs on the datasets it names
    "default": {"fashion": [], "elpv": []},
    # what the README hinted before the defaults learned image folders
    "readme-hint": {"fashion": ["--image-size", "32", "--workers", "0", "--arch", "airbench"],
                    "elpv": ["--image-size", "96", "--batch-size", "64", "--epochs", "30", "--arch", "airbench"]},
    # the defaults at a smaller input, fewer epochs: minutes, for iterating on ELPV (a direction the same way:
    # --flagsets oversample --extra "--image-size 128 --epochs 6")
    "proxy": {"elpv": ["--image-size", "128", "--epochs", "6"]},
    # the directions of issue 21, each the defaults with one change
    "oversample": {"elpv": ["--balance", "sample"]},
    "average3": {"elpv": ["--average-best", "3"], "fashion": ["--average-best", "3"]},
    "lookahead": {"elpv": ["--lookahead"]},
    "lite1": {"elpv": ["--arch", "tf_efficientnet_lite1"]},
    "lite2": {"elpv": ["--arch", "tf_efficientnet_lite2"]},
    "288px": {"elpv": ["--image-size", "288"]},
    "erase": {"fashion": ["--erase", "0.5"]},
    "erase-25ep": {"fashion": ["--erase", "0.5", "--epochs", "25"]},
}
RSS_FLAGS = ["--epochs", "1", "--max-steps", "5", "--no-mlflow"]
TARGETS = {  # dataset -> (minimum accuracy, minimum macro-F1 or None, maximum normalized seconds), default flags
    "fashion": (0.950, None, 600),
    "elpv": (0.85, 0.70, 900),
}
RSS_TARGET_GB = 4.0
TINTS = [(255, 96, 96), (96, 255, 96), (96, 96, 255), (255, 224, 64), (255, 64, 255),
         (64, 255, 255), (255, 160, 32), (160, 96, 255), (128, 255, 160), (255, 255, 255)]


def run_process(cmd: list[str], log_path: Path) -> dict:
    """Run cmd in the repo, streaming its output to the console and log_path; wall time and peak RSS of its tree."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def pump():  # raw chunks, not lines, so tqdm's carriage-return progress shows as it happens
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        root = psutil.Process(proc.pid)
        peak_tree = peak_single = 0
        try:
            while proc.poll() is None:
                total = 0
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    procs = []
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    peak_single = max(peak_single, rss)
                peak_tree = max(peak_tree, total)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.terminate()
            returncode = proc.wait()
            reader.join()
            wall = time.perf_counter() - start
    return {"returncode": returncode, "wall_s": wall, "rss_tree": peak_tree, "rss_single": peak_single, "log": log_path}


def log_tail(path: Path, n: int = 12) -> str:
    text = path.read_bytes().decode(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def read_checkpoint(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    metrics, data_cfg = ckpt.get("metrics", {}), ckpt.get("data_config", {})
    model_cfg, train_cfg = ckpt.get("model_config", {}), ckpt.get("train_config", {})
    return {
        **{k: metrics.get(k) for k in ("val_acc", "val_macro_f1", "test_acc", "test_macro_f1")},
        "image_size": data_cfg.get("image_size"), "arch": model_cfg.get("arch"),
        "epochs": train_cfg.get("epochs"), "batch_size": train_cfg.get("batch_size"),
    }


def train_run(dataset: str, data_dir: Path, flagset: str, flags: list[str], seed: int | None, extra: list[str]) -> dict:
    name = f"{dataset}-{flagset}" + (f"-seed{seed}" if seed is not None else "")
    result = {"dataset": dataset, "flagset": flagset, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="folder-bench-") as tmp:
        out = Path(tmp) / "cnn.pt"
        cmd = [sys.executable, "train.py", "--dataset", "folder", "--data-dir", str(data_dir), "--out", str(out),
               "--experiment", "bench-folder", "--run-name", f"bench-folder-{name}", *flags,
               *(["--seed", str(seed)] if seed is not None else []), *extra]
        result.update(run_process(cmd, RESULTS / "folder_bench-logs" / f"{name}.log"))
        if result["returncode"] != 0:
            result["failed"] = f"failed (exit {result['returncode']})"
        elif not out.is_file():
            result["failed"] = "failed (no checkpoint)"
        else:
            result.update(read_checkpoint(out))
    if "failed" in result:
        print(f"\n{name}: {result['failed']}; last lines of {result['log']}:\n{log_tail(result['log'])}", flush=True)
    return result


# ---- the 224 px folder for --rss-check ------------------------------------------------------------------------


def write_tinted(job: tuple[str, str, tuple[int, int, int]]) -> None:
    src, dst, tint = job
    with Image.open(src) as im:
        gray = im.convert("L").resize((224, 224), Image.BILINEAR)
    ImageOps.colorize(gray, black=(0, 0, 0), white=tint).save(dst, quality=90)


def build_rss_folder(fashion_dir: Path, n_images: int) -> Path:
    """data/rss-check-224px-N/train/<class>/*.jpg: N Fashion-MNIST images (N/10 per class), 224x224 RGB, built once."""
    out = REPO / "data" / f"rss-check-224px-{n_images}"
    if (out / "COMPLETE").is_file():
        print(f"{out}: already built", flush=True)
        return out
    classes = sorted(d.name for d in (fashion_dir / "train").iterdir() if d.is_dir())
    per_class = n_images // len(classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)  # an earlier build was interrupted (ours: the COMPLETE marker is missing)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        jobs = []
        for i, cls in enumerate(classes):
            (tmp / "train" / cls).mkdir(parents=True)
            for src in sorted((fashion_dir / "train" / cls).glob("*.png"))[:per_class]:
                jobs.append((str(src), str(tmp / "train" / cls / f"{src.stem}.jpg"), TINTS[i % len(TINTS)]))
        print(f"building {out}: {len(jobs)} 224x224 RGB JPEGs from {fashion_dir} ...", flush=True)
        start = time.perf_counter()
        with Pool(2) as pool:
            for _ in pool.imap_unordered(write_tinted, jobs, chunksize=64):
                pass
        (tmp / "COMPLETE").write_text(f"{len(jobs)} images\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"built {out} in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def rss_run(fashion_dir: Path, n_images: int, extra: list[str]) -> dict:
    data_dir = build_rss_folder(fashion_dir, n_images)
    result = train_run("rss-check", data_dir, "default", RSS_FLAGS, None, extra)
    result["n_images"] = n_images
    return result


# ---- table ------------------------------------------------------------------------------------------------------


def fmt(values: list, kind: str) -> str:
    return mean_sd(values, *{"pct": (100, "%", 2), "f1": (1, "", 3), "s": (1, "", 0), "gb": (1 / GB, " GB", 2)}[kind])


def chosen(run: dict) -> str:
    epochs = run.get("epochs")
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = int(epochs)
    return "/".join("-" if v is None else str(v) for v in (run.get("image_size"), run.get("arch"), epochs,
                                                           run.get("batch_size")))


COLUMNS = [("val acc", "val_acc", "pct"), ("val macro-F1", "val_macro_f1", "f1"), ("test acc", "test_acc", "pct"),
           ("test macro-F1", "test_macro_f1", "f1"), ("wall s", "wall_s", "s"), ("normalized s", "norm_s", "s"),
           ("peak RSS (tree)", "rss_tree", "gb"), ("peak RSS (1 proc)", "rss_single", "gb")]


def groups(results: list[dict]) -> list[tuple[str, str, list[dict]]]:
    keys = dict.fromkeys((r["dataset"], r["flagset"]) for r in results)
    return [(d, f, [r for r in results if (r["dataset"], r["flagset"]) == (d, f)]) for d, f in keys]


def label(dataset: str, results: list[dict]) -> str:
    if dataset == "rss-check":
        n = results[0]["n_images"]
        return f"{n // 1000}k x 224px" if n % 1000 == 0 else f"{n} x 224px"
    return DATASETS[dataset]


def table(results: list[dict], calib: float) -> str:
    rows = [["dataset", "flags", "runs", "chosen (size/arch/epochs/batch)"] + [c[0] for c in COLUMNS]]
    for dataset, flagset, runs in groups(results):
        ok = [{**r, "norm_s": r["wall_s"] * calib / REFERENCE_IMG_S} for r in runs if "failed" not in r]
        failed = [r["failed"] for r in runs if "failed" in r]
        flags = flagset + (" +5 steps" if dataset == "rss-check" else "")
        row = [label(dataset, runs), flags, str(len(runs)) + (f" ({len(failed)} failed)" if failed and ok else "")]
        if not ok:
            rows.append(row + [", ".join(dict.fromkeys(failed))] + ["-"] * len(COLUMNS))
            continue
        row.append(chosen(ok[0]))
        row += [fmt([r[key] for r in ok], kind) for _, key, kind in COLUMNS]
        rows.append(row)
    return markdown_table(rows)


def seeds_table(results: list[dict]) -> str:
    """One row per training run: the spread that the mean ± sd above sums up."""
    rows = [["dataset", "flags", "seed", "val acc", "val macro-F1", "test acc", "test macro-F1", "wall s"]]
    for r in results:
        if r["dataset"] == "rss-check":
            continue
        seed = "default" if r["seed"] is None else str(r["seed"])
        if "failed" in r:
            rows.append([DATASETS[r["dataset"]], r["flagset"], seed, r["failed"], "-", "-", "-", "-"])
            continue
        rows.append([DATASETS[r["dataset"]], r["flagset"], seed] + [fmt([r.get(key)], kind) for key, kind in (
            ("val_acc", "pct"), ("val_macro_f1", "f1"), ("test_acc", "pct"), ("test_macro_f1", "f1"), ("wall_s", "s"))])
    return markdown_table(rows)


def mean_of(runs: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in runs if "failed" not in r]
    return None if not values or None in values else statistics.mean(values)


def targets(results: list[dict], calib: float) -> list[str]:
    """One line per target with met / missed from the measured means (default flags)."""
    lines = []
    by_group = {(d, f): runs for d, f, runs in groups(results)}
    for dataset, (min_acc, min_f1, max_norm) in TARGETS.items():
        text = f"{DATASETS[dataset]}, default flags: acc >= {100 * min_acc:.1f}%" + \
               (f" and macro-F1 >= {min_f1:.2f}" if min_f1 else "") + f" in <= {max_norm} normalized s"
        runs = by_group.get((dataset, "default"))
        if not runs:
            lines.append(f"{text}: not run")
            continue
        split = "test" if mean_of(runs, "test_acc") is not None else "val"
        acc, f1, wall = mean_of(runs, f"{split}_acc"), mean_of(runs, f"{split}_macro_f1"), mean_of(runs, "wall_s")
        if wall is None:
            lines.append(f"{text}: missed (run failed)")
            continue
        norm = wall * calib / REFERENCE_IMG_S
        measured = [f"{split} acc {'-' if acc is None else f'{100 * acc:.2f}%'}"]
        checks = [acc is not None and acc >= min_acc, norm <= max_norm]
        if min_f1:
            measured.append(f"{split} macro-F1 {'-' if f1 is None else f'{f1:.3f}'}")
            checks.append(f1 is not None and f1 >= min_f1)
        measured.append(f"{norm:.0f} normalized s")
        unknown = acc is None or (min_f1 and f1 is None)
        verdict = "met" if all(checks) else ("missed (a metric is missing)" if unknown else "missed")
        lines.append(f"{text}: {verdict} ({', '.join(measured)})")
    rss = [r for r in results if r["dataset"] == "rss-check"]
    text = f"peak RSS (tree) <= {RSS_TARGET_GB:.0f} GB at 10k x 224px, default flags"
    if not rss:
        lines.append(f"{text}: not run")
    elif "failed" in rss[0]:
        lines.append(f"{text}: missed ({rss[0]['failed']})")
    else:
        note = "" if rss[0]["n_images"] == 10000 else f"; measured at {rss[0]['n_images']} images, not 10k"
        verdict = "met" if rss[0]["rss_tree"] <= RSS_TARGET_GB * GB else "missed"
        lines.append(f"{text}: {verdict} ({rss[0]['rss_tree'] / GB:.2f} GB{note})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fashion,elpv", help="comma-separated, from: " + ", ".join(DATASETS))
    parser.add_argument("--flagsets", default="default", help="comma-separated, from: " + ", ".join(FLAGSETS))
    parser.add_argument("--seeds", type=int, default=3, help="runs per dataset and flag set, --seed 0..N-1 (1: the "
                                                            "default seed)")
    parser.add_argument("--extra", default="", help='flags appended to every train.py run, one quoted string, e.g. '
                                                   '--extra "--limit 400 --epochs 1 --max-steps 3" (or --extra=--no-mlflow)')
    parser.add_argument("--fashion-dir", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"),
                        help="Fashion-MNIST as train/<class>/*.png")
    parser.add_argument("--elpv-dir", default=str(REPO / "data" / "elpv"), help="ELPV folder; made by make_elpv.py if missing")
    parser.add_argument("--rss-check", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure peak RSS of default flags on 10k 224x224 RGB images")
    parser.add_argument("--rss-images", type=int, default=10000, help=argparse.SUPPRESS)  # smaller, to test the builder
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    flagsets = [f for f in args.flagsets.split(",") if f]
    if bad := [d for d in datasets if d not in DATASETS] + [f for f in flagsets if f not in FLAGSETS]:
        parser.error(f"unknown dataset or flag set: {', '.join(bad)}")
    if idle := [f for f in flagsets if not any(d in FLAGSETS[f] for d in datasets)]:
        parser.error(f"flag set {', '.join(idle)} runs on none of --datasets {','.join(datasets)}")
    if args.seeds < 1 or args.rss_images < 10:
        parser.error("--seeds must be >= 1 and --rss-images >= 10")
    extra = shlex.split(args.extra)
    fashion_dir, elpv_dir = Path(args.fashion_dir).resolve(), Path(args.elpv_dir).resolve()
    if ("fashion" in datasets or args.rss_check) and not (fashion_dir / "train").is_dir():
        parser.error(f"--fashion-dir {fashion_dir} has no train/ folder")
    if "elpv" in datasets and not (elpv_dir / "train").is_dir():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_elpv.py"), "--out", str(elpv_dir)], check=True)

    calib_start = calib_img_s()
    results = []
    for dataset in datasets:
        data_dir = fashion_dir if dataset == "fashion" else elpv_dir
        for flagset in (f for f in flagsets if dataset in FLAGSETS[f]):
            for seed in (range(args.seeds) if args.seeds > 1 else [None]):
                results.append(train_run(dataset, data_dir, flagset, FLAGSETS[flagset][dataset], seed, extra))
                print("\n" + table(results, calib_start), flush=True)
    if args.rss_check:
        results.append(rss_run(fashion_dir, args.rss_images, extra))
    calib_end = calib_img_s()
    calib = (calib_start + calib_end) / 2

    notes = [
        f"machine: {os.cpu_count()} CPU cores ({cpu_name()}), {psutil.virtual_memory().total / GB:.0f} GB RAM, "
        f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        f"calib_img_s: {calib:.0f} = mean of {calib_start:.0f} (start) and {calib_end:.0f} (end); "
        f"normalized s = wall s x {calib:.0f} / {REFERENCE_IMG_S}",
        "flags: " + "; ".join(f"{f} = " + (", ".join(f"{DATASETS[d]}: {shlex.join(flags)}" for d, flags in
                                                        FLAGSETS[f].items() if flags) or "none") for f in flagsets)
        + f"; rss-check = default + {shlex.join(RSS_FLAGS)}" + (f"; every run + {shlex.join(extra)}" if extra else ""),
        "wall s: the whole train.py process; peak RSS (tree): sum over the process and its children, polled every "
        "0.2 s (pages shared between processes count once per process: an upper bound); GB = 10^9 bytes; "
        "acc/F1 of the checkpoint's best epoch",
    ]
    failures = [f"{r['dataset']}-{r['flagset']}" + (f"-seed{r['seed']}" if r["seed"] is not None else "")
                + f": {r['failed']}, last lines of {r['log'].relative_to(REPO)}:\n{log_tail(r['log'])}"
                for r in results if "failed" in r]
    report = "\n".join([table(results, calib), "", "every run:", "", seeds_table(results), "",
                        "targets (mean over seeds; ELPV on test/ when present, else val):",
                        *(f"- {line}" for line in targets(results, calib)), "", *(f"- {n}" for n in notes)])
    if failures:
        report += "\n\nfailed runs:\n" + "\n\n".join(failures)
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "folder_bench.md").write_text("# train.py on image folders: default vs README-hint flags\n\n"
                                             + report.replace("failed runs:\n", "failed runs:\n```\n")
                                             + ("\n```" if failures else "") + "\n")
    print(f"\nwrote {(RESULTS / 'folder_bench.md').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
