"""Score a model on labelled images: loss, confusion matrix and per-class scores over batches (training's validation
and test splits), and `make evaluate`: the served model scored on a labelled folder, with a report and an MLflow run.

    python evaluate.py --data-dir D [--model models/cnn.pt | model.onnx | models:/<name>@champion]
                       [--out-dir reports/evaluate-<D's name>] [--tta 1] [--experiment cater-evaluate] [--no-mlflow]

D holds one folder per class, named as the model names its classes (any depth of images below each), or a test/
folder laid out that way. Images go through predict.classify, the server's preprocessing, batching and calibrated
probabilities, so the scores are those of the served answers: accuracy, macro-F1, per-class precision / recall / F1,
confusion matrices, calibration (ECE, reliability diagram), accuracy against coverage when answers below a confidence
go to review, and the most confidently wrong images. Unreadable files are listed and left out of the scores.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import report
from atomic import atomic_path
from calibration import REVIEW_THRESHOLDS, coverage, expected_calibration_error, reliability, temperature_for
from data import class_folders
from decode import DataError, list_images, open_image
from model import CnnClassifier, predict_logits
from datacheck import label_issues
from predict import add_model_arguments, classify, open_model, preprocess
from runtime import Runtime
from scores import class_scores


# Pixels per evaluation batch, (our nets, an ImageNet backbone). A GPU wants large batches (1000 images of 160 px
# through a backbone peaked at 8.5 GB); a CPU runs small ones faster, their activations staying in its caches: on
# the 2-core Xeon 100 CIFAR-sized images went 1.5x faster than 1000 through airbench, 8 of 224 px 1.6x faster than
# 32 through Lite0 (docs/results.md#own-images-the-directions-of-issue-21-2026-12-05).
CPU_EVAL_PIXELS = (100 * 32 * 32, 8 * 224 * 224)
GPU_EVAL_PIXELS = (1000 * 32 * 32, 64 * 160 * 160)


def eval_batch_size(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """Evaluation batch size for the device that keeps activation memory about constant whatever the input size."""
    cpu = device.type == "cpu"
    ours, backbone = CPU_EVAL_PIXELS if cpu else GPU_EVAL_PIXELS
    pixels = ours if isinstance(model, CnnClassifier) else backbone
    return max(4 if cpu else 8, min(1000, pixels // image_size ** 2))


@torch.no_grad()
def evaluate(model, batches, num_classes: int, rt: Runtime, tta: int = 0, across_ranks: bool = False,
             per_image: bool = False) -> dict:
    """Loss, confusion matrix (rows: true class, columns: predicted) and the scores.class_scores over batches;
    across_ranks: each rank holds a shard of the split, and the counts are summed over all ranks first;
    per_image: also each image's logits, predicted class and its probability ("logits", "predicted", "confidence")."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    kept = []
    for x, y in batches:
        with rt.autocast():
            logits = predict_logits(model, rt.prepare(x), tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(y)
        confusion += torch.bincount((y * num_classes + logits.argmax(1)).cpu(), minlength=num_classes ** 2).view(num_classes, num_classes)
        if per_image:
            kept.append(logits.float().cpu())
    if across_ranks:
        distributed.sum_across(confusion)
        loss_sum, n = distributed.sum_across(torch.tensor([loss_sum, n], dtype=torch.float64)).tolist()
    result = {"loss": loss_sum / max(n, 1), "confusion": confusion, **class_scores(confusion)}
    if per_image:
        result["logits"] = torch.cat(kept) if kept else torch.zeros(0, num_classes)
        result["confidence"], result["predicted"] = result["logits"].softmax(1).max(1)
    return result


# ---------------------------------------------------------------- make evaluate: the served model on a labelled folder

MISTAKES = 16  # the most confidently wrong images shown
LISTED = 10  # unreadable files printed (the page lists up to PAGE_LISTED)
PAGE_LISTED = 200
REPORT_FILES = ("index.html", "metrics.json", "predictions.csv", "confusion_matrix.png",
                "confusion_matrix_normalized.png", "reliability.png", "coverage.png", "mistakes.png")


def labelled_files(data_dir: Path, classes: list[str]) -> tuple[Path, list[str], list[int]]:
    """The folder scored (data_dir, or data_dir/test when there is one), its image files and each one's index in the
    model's classes, matched by folder NAME; a DataError names class folders the model does not know, or no images."""
    root = data_dir / "test" if (data_dir / "test").is_dir() and "test" not in classes else data_dir
    folders = [root / name for name in class_folders(root)]
    unknown = [d.name for d in folders if d.name not in classes]
    if unknown:
        raise DataError(f"{root}: {len(unknown)} class folder(s) the model does not know: {', '.join(unknown)}. "
                        f"The model's classes: {', '.join(classes)}")
    paths, labels = [], []
    for folder in folders:
        files = list_images(folder)
        paths += files
        labels += [classes.index(folder.name)] * len(files)
    if not paths:
        raise DataError(f"{root}: no images in class folders; expected {root}/<class>/<image files>, with <class> one "
                        f"of the model's classes: {', '.join(classes)}")
    return root, paths, labels


def score(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Everything evaluate reports about N answers (probs N x K, labels N indices into classes), no I/O: accuracy,
    scores.class_scores over the K x K confusion matrix (rows true, columns predicted), ECE, reliability bins, accuracy
    against coverage (from p = 0, everything answered), and per image the predicted class, its confidence, the label."""
    k = len(classes)
    labels = labels.long().cpu()
    confidence, predicted = probs.float().cpu().max(1)
    correct = predicted == labels
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    result = class_scores(confusion)
    result["accuracy"] = result.pop("acc")
    result.update(classes=list(classes), n=len(labels), confusion=confusion,
                  ece=expected_calibration_error(confidence, correct), reliability=reliability(confidence, correct),
                  coverage=coverage(confidence, correct, (0.0, *REVIEW_THRESHOLDS)),
                  labels=labels, predicted=predicted, confidence=confidence)
    return result


def score_files(paths: list[str], labels: list[int], predictor, tta: int,
                threads: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]]]:
    """The files through predict.classify, as the server answers them: (probabilities of the readable ones, their
    labels, their paths, (path, why) for each unreadable one)."""
    probs, scored, kept, unreadable = [], [], [], []
    for (path, p, error), label in zip(classify(paths, predictor, tta, threads, len(paths), "evaluate"), labels):
        if p is None:
            unreadable.append((path, error))
        else:
            probs.append(p)
            scored.append(label)
            kept.append(path)
    probs = torch.stack(probs) if probs else torch.zeros(0, len(predictor.meta["classes"]))
    return probs, torch.tensor(scored, dtype=torch.long), kept, unreadable


def metrics_json(result: dict) -> dict:
    """The JSON-able part of a score() result: headline numbers, per class, coverage rows (NaN as null), bins."""
    per_class = {name: {kind: result[kind][i] for kind in ("precision", "recall", "f1", "support")}
                 for i, name in enumerate(result["classes"])}
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in result["coverage"]]
    headline = {k: result[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "ece", "n")}
    return {**headline, "per_class": per_class, "coverage": rows, "reliability": result["reliability"],
            "classes": result["classes"], "confusion": result["confusion"].tolist()}


def worst_mistakes(result: dict, count: int = MISTAKES) -> list[int]:
    """Indices of the wrong answers with the highest confidence, most confident first."""
    wrong = (result["predicted"] != result["labels"]).nonzero().squeeze(1)
    return wrong[result["confidence"][wrong].argsort(descending=True, stable=True)][:count].tolist()


def files_shown(result: dict, picked: list[int], paths: list[str], root: Path, predicted: torch.Tensor,
                confidence: torch.Tensor, predictor=None, pictured: int = MISTAKES) -> list[dict]:
    """Images picked for a report as write_report takes them: path (under root), true and predicted class names,
    confidence; for the first `pictured`, a 128 px thumbnail (HxWx3 uint8) and, with a PyTorch predictor, "why": the
    Grad-CAM heat map of the predicted class over the model's input (explain.py)."""
    classes, found = result["classes"], []
    explaining = getattr(predictor, "backend", "") == "torch"
    for n, i in enumerate(picked):
        shown = {"path": os.path.relpath(paths[i], root), "true": classes[int(result["labels"][i])],
                 "predicted": classes[int(predicted[i])], "confidence": float(confidence[i])}
        found.append(shown)
        if n >= pictured:
            continue
        try:
            thumbnail = open_image(paths[i])
        except DataError:  # decoded a moment ago; gone or changed since: listed without its picture
            continue
        thumbnail.thumbnail((128, 128))
        shown["image"] = np.asarray(thumbnail.convert("RGB"))
        x = preprocess(paths[i], predictor.meta) if explaining else None
        if isinstance(x, torch.Tensor):
            from explain import overlays

            try:
                shown["why"] = overlays(predictor.explainer, x[None], [int(predicted[i])])[0]
            except Exception as e:  # the report stands without its heat maps
                print(f"warning: no heat maps of the mistakes ({e.__class__.__name__}: {str(e)[:200]})", file=sys.stderr)
                explaining = False
    return found


def mistakes_from_files(result: dict, paths: list[str], root: Path, count: int = MISTAKES, predictor=None) -> list[dict]:
    """The worst mistakes as write_report takes them (files_shown)."""
    return files_shown(result, worst_mistakes(result, count), paths, root, result["predicted"], result["confidence"],
                       predictor)


def issues_from_files(result: dict, probs: torch.Tensor, paths: list[str], root: Path) -> tuple[list[dict], str]:
    """Likely label errors among the scored files (datacheck.label_issues: cleanlab on these probabilities, out of
    sample when the model never trained on them), most likely first, as write_report takes them; and why none were
    looked for ('' when they were)."""
    ranked, why = label_issues(probs.float().numpy(), result["labels"].numpy())
    said = probs.max(1)
    return files_shown(result, ranked, paths, root, said.indices, said.values), why


def write_predictions(result: dict, paths: list[str], root: Path, out: Path) -> None:
    """One CSV row per scored image: its path under root, true and predicted class, confidence, correct or not."""
    classes = result["classes"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "confidence", "correct"])
        for path, label, predicted, confidence in zip(paths, result["labels"].tolist(), result["predicted"].tolist(),
                                                      result["confidence"].tolist()):
            writer.writerow([os.path.relpath(path, root), classes[label], classes[predicted], f"{confidence:.6f}",
                             str(label == predicted).lower()])


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def plot_shown(shown: list[dict], picture: str, path: Path, **options) -> None:
    """report.plot_mistakes of the files_shown rows that hold a `picture` ("image" or "why")."""
    rows = [m for m in shown if picture in m]
    report.plot_mistakes([m[picture] for m in rows], [m["true"] for m in rows], [m["predicted"] for m in rows],
                         [m["confidence"] for m in rows], path, **options)


def write_report(result: dict, out_dir: Path, title: str, details: list[tuple[str, str]] = (),
                 mistakes: list[dict] = (), unreadable: list[tuple[str, str]] = (), split: str = "labelled",
                 issues: tuple[list[dict], str] | None = None) -> Path:
    """out_dir/index.html and metrics.json for a score() result, with the pictures the page shows (confusion matrices,
    reliability diagram, coverage plot, worst mistakes, where the model looked on them). details: (name, value) rows
    at the top (model, data...); mistakes: dicts as mistakes_from_files makes them; unreadable: (path, reason); split
    names the images in the mistakes picture; issues: issues_from_files's (likely label errors, why none), written to
    label_issues.csv and shown. Every file is replaced whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, esc = result["classes"], html.escape
    # Plotted beside the report, then each renamed into place: matplotlib picks the format from the file's suffix,
    # which atomic_path's temporary name does not have.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".plots-") as tmp:
        tmp = Path(tmp)
        report.plot_confusion(result["confusion"], classes, tmp / "confusion_matrix.png")
        report.plot_confusion(result["confusion"], classes, tmp / "confusion_matrix_normalized.png", normalized=True)
        report.plot_reliability(result["reliability"], result["ece"], tmp / "reliability.png")
        report.plot_coverage(result["coverage"], tmp / "coverage.png")
        plot_shown(mistakes, "image", tmp / "mistakes.png", split=split)
        explained = [m for m in mistakes if "why" in m]
        if explained:
            plot_shown(explained, "why", tmp / "mistakes_why.png",
                       title=f"where the model looked: Grad-CAM of the predicted class on the worst {split} mistakes")
        if issues is not None:
            plot_shown(issues[0], "image", tmp / "label_issues.png", labels=("labelled", "model says"),
                       title="likely label errors (cleanlab, most likely first)")
        for picture in tmp.iterdir():
            os.replace(picture, out_dir / picture.name)
    metrics = {**metrics_json(result), "unreadable": len(unreadable)}
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    def table(header: list[str], rows: list[list]) -> str:
        cells = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + cells + "</table>"

    missing = [name for name, support in zip(classes, result["support"]) if not support]
    parts = [f"<h1>{esc(title)}</h1>",
             "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in details) + "</table>",
             "<h2>Result</h2>", table(["accuracy", "macro-F1", "ECE", "images scored", "unreadable files"],
                                     [[f"{result['accuracy']:.4f}", f"{result['macro_f1']:.4f}", f"{result['ece']:.4f}",
                                       result["n"], len(unreadable)]])]
    if missing:
        parts.append(f"<p>Macro means are over the model's {len(classes)} classes; {len(missing)} of them have no "
                     f"images here and count as F1 0: {esc(', '.join(missing))}.</p>")
    parts += ["<h2>Per class</h2>",
              table(["class", "precision", "recall", "F1", "support"],
                    [[name, f"{result['precision'][i]:.3f}", f"{result['recall'][i]:.3f}", f"{result['f1'][i]:.3f}",
                      result["support"][i]] for i, name in enumerate(classes)]),
              "<h2>Confusion matrix (counts)</h2><img src=\"confusion_matrix.png\" alt=\"confusion matrix, counts\">",
              "<h2>Confusion matrix (share of each true class)</h2>"
              "<img src=\"confusion_matrix_normalized.png\" alt=\"confusion matrix, normalized\">",
              f"<h2>Calibration: ECE {result['ece']:.4f}</h2>"
              "<p>Answers grouped by confidence: a calibrated model is right as often as it says (the diagonal). "
              "ECE is the answer-weighted mean gap.</p><img src=\"reliability.png\" alt=\"reliability diagram\">",
              "<h2>Review: accuracy against coverage</h2>",
              table(["send answers below p to review", "coverage", "accuracy of the rest", "reviewed"],
                    [[f"{r['review_below']:g}", f"{r['coverage']:.3f}",
                      "-" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.4f}", r["reviewed"]]
                     for r in result["coverage"]]),
              "<img src=\"coverage.png\" alt=\"accuracy against coverage\">",
              f"<h2>Worst mistakes ({len(mistakes)})</h2>"
              "<p>The wrong answers given with the highest confidence.</p>"
              "<img src=\"mistakes.png\" alt=\"worst mistakes\">"]
    if mistakes:
        parts.append(table(["file", "true", "predicted", "confidence"],
                           [[m.get("path", ""), m["true"], m["predicted"], f"{m['confidence']:.3f}"]
                            for m in mistakes]))
    if explained:
        parts.append("<h2>Where the model looked on those mistakes</h2><p>Grad-CAM heat maps of the predicted class "
                     "over the image as the model saw it: red is what raised that class's score most.</p>"
                     "<img src=\"mistakes_why.png\" alt=\"heat maps of the worst mistakes\">")
    if issues is not None:
        found, why = issues
        with atomic_path(out_dir / "label_issues.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "path", "label", "model_says", "model_confidence"])
            writer.writerows([rank, m.get("path", ""), m["true"], m["predicted"], f"{m['confidence']:.4f}"]
                             for rank, m in enumerate(found, 1))
        parts.append(f"<h2>Likely label errors ({len(found)})</h2>"
                     + (f"<p>Not looked for: {esc(why)}.</p>" if why else
                        "<p>cleanlab's find_label_issues on these answers' probabilities, most likely first. They are "
                        "out of sample, and so trustworthy, only if the model never trained on these images. All of "
                        "them are in <a href=\"label_issues.csv\">label_issues.csv</a>.</p>"
                        "<img src=\"label_issues.png\" alt=\"likely label errors\">"))
        if found:
            parts.append(table(["file", "labelled", "model says", "confidence"],
                               [[m.get("path", ""), m["true"], m["predicted"], f"{m['confidence']:.3f}"]
                                for m in found[:PAGE_LISTED]]))
    parts.append(f"<h2>Unreadable files ({len(unreadable)})</h2>")
    if unreadable:
        more = len(unreadable) - PAGE_LISTED
        parts.append(table(["file", "why"], [list(u) for u in unreadable[:PAGE_LISTED]])
                     + (f"<p>... and {more} more</p>" if more > 0 else ""))
    else:
        parts.append("<p>None: every image was scored.</p>")
    page = out_dir / "index.html"
    write_text(page, report.PAGE.format(title=esc(title), body="\n".join(parts)))
    return page


def summary(result: dict) -> str:
    """The headline numbers and the per-class table, for the terminal."""
    lines = [f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  ECE {result['ece']:.4f}  "
             f"n {result['n']}",
             f"{'class':<24} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>7}"]
    lines += [f"{name[:24]:<24} {result['precision'][i]:>9.3f} {result['recall'][i]:>7.3f} {result['f1'][i]:>6.3f} "
              f"{result['support'][i]:>7}" for i, name in enumerate(result["classes"])]
    missing = [name for name, support in zip(result["classes"], result["support"]) if not support]
    if missing:
        lines.append(f"macro means are over the model's {len(result['classes'])} classes; no images here of "
                     f"{len(missing)} (F1 0): {', '.join(missing)}")
    return "\n".join(lines)


def log_to_mlflow(result: dict, out_dir: Path, experiment: str, run_name: str, tags: dict,
                  unreadable: int = 0) -> tuple[str, dict]:
    """One MLflow run in `experiment` (MLFLOW_TRACKING_URI, else the repo's mlflow.db, as training): the tags, MLflow's
    own classifier evaluation of the answers (mlflow.models.evaluate on true and predicted class names), our metrics
    and per-class F1, and the report files as artifacts. Returns (run id, MLflow's computed metrics)."""
    import mlflow.models
    import pandas as pd

    from tracking import Tracker, check_tracking_server, metric_names

    check_tracking_server()  # an unreachable server fails now, not after minutes of retries
    tracker = Tracker(True, experiment, run_name)
    status = "FAILED"
    try:
        tracker.set_tags({k: str(v) for k, v in tags.items() if v not in (None, "")})
        classes = result["classes"]
        answers = pd.DataFrame({"label": [classes[i] for i in result["labels"].tolist()],
                                "prediction": [classes[i] for i in result["predicted"].tolist()]})
        # No model is given, only its answers: nothing to explain (SHAP) or to run; all the model's classes count.
        found = mlflow.models.evaluate(data=answers, targets="label", predictions="prediction", model_type="classifier",
                                       evaluators="default",
                                       evaluator_config={"log_model_explainability": False, "label_list": classes,
                                                         "average": "macro"})
        tracker.log_metrics({"accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "ece": result["ece"],
                             "n": result["n"], "unreadable": unreadable,
                             **{f"f1_{name}": result["f1"][i] for i, name in enumerate(metric_names(classes))}})
        for name in REPORT_FILES:  # what the report wrote, nothing else the folder may hold
            if (out_dir / name).is_file():
                tracker.log_artifact(str(out_dir / name), artifact_path="report")
        status = "FINISHED"
        return tracker.run_id, dict(found.metrics)
    finally:
        tracker.end(status)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True,
                        help="the labelled folder: <class>/ subfolders of images, or a test/ subfolder laid out so")
    add_model_arguments(parser)
    parser.add_argument("--out-dir", default="", help="where the report goes (default: reports/evaluate-<data folder>)")
    parser.add_argument("--experiment", default="cater-evaluate", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the report only, no MLflow run")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a folder")
    args.out_dir = Path(args.out_dir or Path("reports") / f"evaluate-{Path(args.data_dir).resolve().name}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (opened := open_model(args)) is None:
        return 2
    predictor, registered, threads = opened
    meta, data_dir = predictor.meta, Path(args.data_dir)
    try:
        root, paths, labels = labelled_files(data_dir, meta["classes"])
    except DataError as e:
        print(f"error: --data-dir {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be listed
        print(f"error: --data-dir {args.data_dir}: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    if root != data_dir:
        print(f"scoring {root}: the test split of {data_dir}")
    try:
        probs, labels, kept, unreadable = score_files(paths, labels, predictor, args.tta, threads)
    except KeyboardInterrupt:
        print("interrupted: no report written", file=sys.stderr)
        return 130
    unreadable = [(os.path.relpath(path, root), why) for path, why in unreadable]
    for path, why in unreadable[:LISTED]:
        print(f"unreadable: {path}: {why}", file=sys.stderr)
    if len(unreadable) > LISTED:
        print(f"... and {len(unreadable) - LISTED} more unreadable files", file=sys.stderr)
    if not len(probs):
        print(f"error: no image under {root} could be read ({len(unreadable)} files tried)", file=sys.stderr)
        return 1
    result = score(probs, labels, meta["classes"])
    details = [("model", args.model), ("data", str(root)), ("images scored", str(result["n"])),
               ("unreadable files", str(len(unreadable))), ("test-time augmentation", str(args.tta)),
               ("temperature", f"{temperature_for(meta, args.tta):.3f}"),
               ("training run", meta.get("mlflow_run_id") or "unknown")]
    details += [(k.replace("_", " "), str(v)) for k, v in registered.items() if v]
    try:
        write_predictions(result, kept, root, args.out_dir / "predictions.csv")
        page = write_report(result, args.out_dir, f"{Path(args.model).name} on {root.name}", details,
                            mistakes_from_files(result, kept, root, predictor=predictor), unreadable,
                            issues=issues_from_files(result, probs, kept, root))
    except OSError as e:
        print(f"error: --out-dir {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(summary(result))
    if unreadable:
        print(f"{len(unreadable)} unreadable file(s) left out of the scores (listed in the report)")
    if not args.no_mlflow:
        tags = {"model": args.model, "model_run_id": meta.get("mlflow_run_id") or registered.get("run_id"),
                "data_dir": str(root.resolve()), "tta": args.tta,
                **{k: v for k, v in registered.items() if k in ("registered_model", "model_version", "model_alias")}}
        try:
            run_id, theirs = log_to_mlflow(result, args.out_dir, args.experiment, f"evaluate-{root.resolve().name}",
                                           tags, len(unreadable))
            print(f"mlflow run {run_id} in experiment {args.experiment} (MLflow's accuracy_score "
                  f"{theirs.get('accuracy_score', float('nan')):.4f})")
        except Exception as e:  # the report stands without its MLflow run
            print(f"warning: no MLflow run logged ({e.__class__.__name__}: {str(e)[:300]}); the report is written",
                  file=sys.stderr)
    print(f"report: {page}  (open it in a browser: file://{page.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
