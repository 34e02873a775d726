"""Pictures of training runs: the plots train.py logs to MLflow, and pages built from MLflow runs.

    python report.py                          the latest run's report: reports/<run id>/index.html
    python report.py --run 3f2a...            a given run (make report RUN=3f2a...)
    python report.py --compare RUN RUN ...    several runs' curves overlaid (make compare RUNS="a b")
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
CURVES = (("loss", "train_loss", "val_loss"), ("top-1 accuracy", "train_acc", "val_acc"))
PICTURES = (("confusion_matrix.png", "Confusion matrix (counts)"),
            ("confusion_matrix_normalized.png", "Confusion matrix (share of each true class)"),
            ("per_class.png", "Precision and recall per class"),
            ("mistakes.png", "The most confidently wrong validation images"),
            ("mistakes_why.png", "Where the model looked on those mistakes (Grad-CAM of the predicted class)"),
            ("label_issues.png", "Likely label errors in validation (cleanlab; every one in label_issues.csv)"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- the plots

def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, train_key, val_key) in zip(axes, CURVES):
        ax.plot(epochs, [h[train_key] for h in history], "o-", label="train")
        ax.plot(epochs, [h[val_key] for h in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=title, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, normalized: bool = False) -> None:
    """Heat map coloured by each true class's share; cells show counts, or that share (recall per row) when normalized."""
    plt = _pyplot()
    size = max(5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title=f"validation confusion matrix ({'share of each true class' if normalized else 'counts'})")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                text = f"{rates[i, j]:.2f}" if normalized else int(confusion[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_class_scores(classes: list[str], precision: list[float], recall: list[float], path: Path) -> None:
    """Horizontal bars: precision and recall of every class on the validation split."""
    plt = _pyplot()
    y = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(8, max(3, 0.35 * len(classes) + 1.5)))
    ax.barh(y - 0.2, precision, height=0.4, label="precision")
    ax.barh(y + 0.2, recall, height=0.4, label="recall")
    ax.set(yticks=y, xlim=(0, 1), xlabel="validation score", title="precision and recall per class")
    ax.set_yticklabels(classes)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mistakes(images: list[np.ndarray], true: list[str], predicted: list[str], confidence: list[float],
                  path: Path, split: str = "validation", title: str = "", labels: tuple[str, str] = ("true", "predicted")) -> None:
    """A grid of HxW(xC) uint8 images, each titled with its true and (wrongly) predicted class (or what `labels`
    names them)."""
    plt = _pyplot()
    cols = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images, true, predicted, confidence):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"{labels[0]}: {t}\n{labels[1]}: {p} ({100 * c:.0f}%)", fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, f"no mistakes on {split}" if not title else "none", ha="center", va="center")
    fig.suptitle(title or f"most confidently wrong {split} images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    """Several runs' validation accuracy and train/validation loss per epoch in one picture."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, history) in enumerate(runs):
        colour = f"C{i % 10}"
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h.get("train_loss") for h in history], "--", color=colour, alpha=0.6)
        loss_ax.plot(epochs, [h.get("val_loss") for h in history], "o-", color=colour, label=name)
        acc_ax.plot(epochs, [h.get("val_acc") for h in history], "o-", color=colour, label=name)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (solid: validation, dashed: train)")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(bins: list[dict], ece: float, path: Path) -> None:
    """Reliability diagram from calibration.reliability's bins: accuracy against confidence per bin (a calibrated
    model sits on the diagonal), with how many answers fell in each bin underneath."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    filled = [b["n"] > 0 for b in bins]
    ax.bar([c for c, f in zip(centers, filled) if f], [b["accuracy"] for b in bins if b["n"]], width=width * 0.95,
           color="C0", edgecolor="white", label="accuracy of the answers in the bin")
    ax.plot([b["confidence"] for b in bins if b["n"]], [b["accuracy"] for b in bins if b["n"]], "o", color="C1",
            label="at their mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"reliability (ECE {ece:.4f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    counts.bar(centers, [b["n"] for b in bins], width=width * 0.95, color="C2")
    counts.set(xlabel="confidence (top probability)", ylabel="answers")
    counts.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coverage(rows: list[dict], path: Path) -> None:
    """Accuracy of the answers kept against the share kept, one point per review threshold (calibration.coverage):
    the cost of sending answers below p to a person."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    kept = [r for r in rows if r["coverage"] > 0]
    ax.plot([r["coverage"] for r in kept], [r["accuracy"] for r in kept], "o-")
    for r in kept:
        ax.annotate(f"p={r['review_below']:g}", (r["coverage"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set(xlim=(0, 1.05), xlabel="coverage (share answered automatically)", ylabel="accuracy of those answers",
           title="accuracy against coverage")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- pages from MLflow runs

class ReportError(RuntimeError):
    """No such run, or no runs at all: the message says where it looked."""


def client():
    import mlflow

    from registry import DEFAULT_TRACKING_URI

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return mlflow.MlflowClient(uri), uri


def find_run(mlflow_client, uri: str, run_id: str | None, experiment: str):
    """The run asked for, or the latest top-level run of the experiment."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return mlflow_client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"no run {run_id!r} in {uri} (set MLFLOW_TRACKING_URI to where it was logged)") from None
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = mlflow_client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=500) if found else []
    # a training run: not a sweep's child, and not a sweep's parent (no epochs of its own)
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "val_acc" in r.data.metrics]
    if not runs:
        raise ReportError(f"no runs in experiment {experiment!r} at {uri}: train one with `make train`")
    return runs[0]


def epoch_history(mlflow_client, run_id: str) -> list[dict]:
    """Per-epoch metrics as train.py logs them (step = epoch), one dict per epoch."""
    by_epoch: dict[int, dict] = {}
    for name in ("train_loss", "val_loss", "train_acc", "val_acc", "val_macro_f1", "epoch_seconds"):
        for m in mlflow_client.get_metric_history(run_id, name):
            by_epoch.setdefault(m.step, {"epoch": m.step})[name] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def write_report(run_id: str | None, out: Path, experiment: str) -> Path:
    """reports/<run id>/index.html with the run's curves, the pictures it logged, its final metrics and settings."""
    mlflow_client, uri = client()
    run = find_run(mlflow_client, uri, run_id, experiment)
    run_id = run.info.run_id
    folder = out / run_id
    folder.mkdir(parents=True, exist_ok=True)
    history = epoch_history(mlflow_client, run_id)
    sections = []
    if history:
        plot_curves(history, folder / "curves.png")
        sections.append(("Loss and accuracy per epoch", "curves.png"))
    logged = {a.path for a in mlflow_client.list_artifacts(run_id)}
    for name, title in PICTURES:
        if name in logged:
            mlflow_client.download_artifacts(run_id, name, str(folder))
            sections.append((title, name))
    final = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("final_")}
    name = run.data.tags.get("mlflow.runName", run_id)
    esc = html.escape
    parts = [f"<h1>Run {esc(name)}</h1>",
             f"<p>{esc(run_id)} · {esc(run.info.status)} · {len(history)} epochs · tracking: "
             f"{esc(re.sub(r'//[^/@]*@', '//', uri))}</p>",  # without a user and password in the URI
             "<h2>Result</h2><table>" + "".join(f"<tr><th>{esc(k[6:])}</th><td>{v:.4f}</td></tr>" for k, v in final.items())
             + "</table>" if final else "<p>No final metrics: the run stopped before its report.</p>"]
    parts += [f"<h2>{esc(title)}</h2><img src=\"{file}\" alt=\"{esc(title)}\">" for title, file in sections]
    parts.append("<h2>Settings</h2><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                                       for k, v in sorted(run.data.params.items())) + "</table>")
    page = folder / "index.html"
    page.write_text(PAGE.format(title=esc(f"Run {name}"), body="\n".join(parts)))
    return page


def write_comparison(run_ids: list[str], out: Path) -> Path:
    """One picture (and a page) with the curves of several runs."""
    mlflow_client, uri = client()
    runs = [find_run(mlflow_client, uri, run_id, "") for run_id in run_ids]
    named = [(r.data.tags.get("mlflow.runName", r.info.run_id[:8]), epoch_history(mlflow_client, r.info.run_id)) for r in runs]
    folder = out / ("compare-" + "-".join(r.info.run_id[:8] for r in runs))
    folder.mkdir(parents=True, exist_ok=True)
    plot_comparison(named, folder / "comparison.png")
    rows = "".join(f"<tr><th>{html.escape(n)}</th><td>{r.data.metrics.get('final_val_acc', float('nan')):.4f}</td>"
                   f"<td>{len(h)}</td><td>{html.escape(r.info.run_id)}</td></tr>" for (n, h), r in zip(named, runs))
    body = (f"<h1>{len(runs)} runs compared</h1><img src=\"comparison.png\" alt=\"curves of the runs\">"
            f"<table><tr><th>run</th><th>final val acc</th><th>epochs</th><th>id</th></tr>{rows}</table>")
    page = folder / "index.html"
    page.write_text(PAGE.format(title="Runs compared", body=body))
    return page


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:0 auto;padding:1rem;color:#1a1a1a}}
img{{max-width:100%;height:auto;border:1px solid #ddd}}table{{border-collapse:collapse}}
th,td{{text-align:left;padding:2px 12px 2px 0;border-bottom:1px solid #eee;vertical-align:top}}</style>
</head><body>
{body}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="MLflow run id (default: the latest run of --experiment)")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="overlay the curves of these runs instead")
    parser.add_argument("--experiment", default="cv-image-classification", help="where to find the latest run")
    parser.add_argument("--out", default="reports", help="folder the pages are written under")
    args = parser.parse_args(argv)
    try:
        if args.compare:
            page = write_comparison(args.compare, Path(args.out))
        else:
            page = write_report(args.run or None, Path(args.out), args.experiment)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {page}  (open it in a browser: file://{page.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
