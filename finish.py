"""The end of a training run: the best weights scored on validation (and test), calibrated, saved, and logged to MLflow
with their plots, model and registration."""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration import expected_calibration_error, fit_temperature, held_out_ece, probabilities
from checkpoint import save_checkpoint
from config import DataConfig, TrainConfig
from data import Dataset, ImageSet, eval_batches
from datacheck import label_issues
from decode import decode_files, open_image
from evaluate import eval_batch_size, evaluate, score, worst_mistakes, write_report
from report import plot_class_scores, plot_confusion, plot_curves, plot_mistakes
from runtime import Runtime, unwrap
from tracking import Tracker, log_model, metric_names, register


def thumbnails(split: ImageSet, picked: list[int]) -> list[np.ndarray]:
    """The images of a split at these indices as HxW(xC) uint8 arrays at most 128 px, for report.plot_mistakes."""
    images = []
    for i in picked:
        if split.images is not None:
            image = split.images[i].permute(1, 2, 0).numpy()
        else:
            thumbnail = open_image(split.paths[i])
            thumbnail.thumbnail((128, 128))
            image = np.asarray(thumbnail.convert("RGB"))
        images.append(image[..., 0] if image.shape[-1] == 1 else image)
    return images


def confident_mistakes(val: dict, split: ImageSet, classes: list[str], count: int = 16):
    """The images of a split (validation, test) predicted wrong with the highest confidence: (thumbnails, true
    names, predicted names, confidences), for report.plot_mistakes."""
    picked = worst_mistakes({**val, "labels": split.labels}, count)
    return (thumbnails(split, picked), [classes[int(split.labels[i])] for i in picked],
            [classes[int(val["predicted"][i])] for i in picked], [float(val["confidence"][i]) for i in picked])


def model_inputs(split: ImageSet, picked: list[int], data_cfg: DataConfig) -> torch.Tensor:
    """The uint8 model inputs of a split's images at these indices (decoded again when the split streams)."""
    if split.images is not None:
        return split.images[picked]
    return decode_files([split.paths[i] for i in picked], data_cfg.image_size, data_cfg.channels, data_cfg.resize,
                        workers=0)


def explain_mistakes(model, val: dict, data: Dataset, data_cfg: DataConfig, path: Path, count: int = 16) -> bool:
    """mistakes_why.png: Grad-CAM heat maps of the predicted class over the worst validation mistakes. A model the
    explanation cannot handle costs the picture, never the run (False, with a warning)."""
    from explain import Explainer, overlays

    picked = worst_mistakes({**val, "labels": data.val.labels}, count)
    predicted = [int(val["predicted"][i]) for i in picked]
    meta = {"image_size": data_cfg.image_size, "channels": data_cfg.channels, "mean": data.mean, "std": data.std}
    try:
        drawn = overlays(Explainer(unwrap(model).eval(), meta), model_inputs(data.val, picked, data_cfg), predicted)
    except Exception as e:
        print(f"warning: no heat maps of the mistakes ({e.__class__.__name__}: {str(e)[:200]})", file=sys.stderr)
        return False
    plot_mistakes(drawn, [data.classes[int(data.val.labels[i])] for i in picked], [data.classes[c] for c in predicted],
                  [float(val["confidence"][i]) for i in picked], path,
                  title="where the model looked: Grad-CAM of the predicted class on the worst validation mistakes")
    return True


def write_label_issues(val: dict, split: ImageSet, classes: list[str], folder: Path, data_dir: str) -> int:
    """label_issues.csv (every likely label error in the split, most likely first) and label_issues.png (the first
    16), from the split's calibrated out-of-sample probabilities (cleanlab). Returns how many were found."""
    probs = val["probabilities"].float().numpy()
    ranked, why = label_issues(probs, split.labels.numpy())
    if why:
        print(f"likely label errors: not looked for ({why})")
        return 0
    name = (lambda i: os.path.relpath(split.paths[i], data_dir)) if split.paths is not None else (lambda i: f"val[{i}]")
    with open(folder / "label_issues.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image", "label", "model_says", "model_confidence", "confidence_in_label"])
        for rank, i in enumerate(ranked, 1):
            given, said = int(split.labels[i]), int(probs[i].argmax())
            writer.writerow([rank, name(i), classes[given], classes[said], f"{probs[i, said]:.4f}", f"{probs[i, given]:.4f}"])
    top = ranked[:16]
    plot_mistakes(thumbnails(split, top), [classes[int(split.labels[i])] for i in top],
                  [classes[int(probs[i].argmax())] for i in top], [float(probs[i].max()) for i in top],
                  folder / "label_issues.png", labels=("labelled", "model says"),
                  title="likely label errors in validation (cleanlab, most likely first)")
    print(f"likely label errors in validation: {len(ranked)} of {len(split)} (cleanlab; label_issues.csv in the run)")
    return len(ranked)


def final_scores(model, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, rt: Runtime, best_epoch: int,
                 train_seconds: float) -> tuple[dict, dict | None, dict]:
    """The best weights scored on validation (per image too, and with TTA when cfg.tta) and on test when there is
    one; calibrated; printed with a per-class table. Returns (the validation result, the test result or None, the
    final metrics)."""
    size = eval_batch_size(model, data_cfg.image_size, rt.device)

    def batches(split, name: str):
        return tqdm(eval_batches(split, data.mean, data.std, size, data_cfg, rt.device), desc=f"evaluate {name}",
                    unit="batch", total=math.ceil(len(split) / size), leave=False)

    val = evaluate(model, batches(data.val, "val"), len(data.classes), rt, per_image=True)
    final = {"best_epoch": best_epoch, "val_acc": val["acc"], "val_macro_f1": val["macro_f1"],
             "val_loss": val["loss"], "train_seconds": train_seconds}
    line = f"best epoch {best_epoch} (by {cfg.select_metric}): val acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}"
    tta = None
    if cfg.tta:
        tta = evaluate(model, batches(data.val, "val with TTA"), len(data.classes), rt, tta=cfg.tta, per_image=True)
        final.update(val_acc_tta=tta["acc"], val_macro_f1_tta=tta["macro_f1"])
        line += f"  with TTA level {cfg.tta}: {tta['acc']:.4f}"
    test = None
    if data.test is not None:  # reported, never used to choose anything; served without TTA, so measured without
        test = evaluate(model, batches(data.test, "test"), len(data.classes), rt, per_image=True)
        final.update(test_acc=test["acc"], test_macro_f1=test["macro_f1"], test_loss=test["loss"])
        line += f"  test acc {test['acc']:.4f} macro-F1 {test['macro_f1']:.4f}"
    print(line + f"  ({train_seconds:.0f}s training)")
    final.update(calibrate(val, data.val.labels, test, data.test.labels if test is not None else None))
    if tta is not None:  # the server's CATER_TTA at this level gets its own temperature: averaged views are less sure
        temperature, why = fit_temperature(tta["logits"], data.val.labels)
        if why:
            print(f"calibration at TTA level {cfg.tta}: no temperature of its own ({why}): the plain one serves it")
        else:
            final["temperature_tta"] = temperature
            print(f"calibration at TTA level {cfg.tta}: temperature {temperature:.3f}")
    print(f"{'class':<24} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>7}")
    for i, name in enumerate(data.classes):
        print(f"{name[:24]:<24} {val['precision'][i]:>9.3f} {val['recall'][i]:>7.3f} {val['f1'][i]:>6.3f} {val['support'][i]:>7}")
    return val, test, final


def log_final(tracker: Tracker, model, checkpoint: Path, val: dict, test: dict | None, final: dict, data: Dataset,
              data_cfg: DataConfig, cfg: TrainConfig, history: list[dict]) -> None:
    """The run's end in MLflow: final and per-class metrics, the pictures, the test split's report (make evaluate's:
    test/index.html), the checkpoint, the pyfunc model and its registration (champion or not)."""
    best_epoch = final["best_epoch"]
    # End-of-run values under their own names (per-epoch val_acc etc. keep their curves), at the best epoch's step.
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=best_epoch)
    if tracker.run is None:
        return
    tracker.log_metrics({f"val_{kind}_{name}": val[kind][i] for i, name in enumerate(metric_names(data.classes))
                         for kind in ("precision", "recall", "f1")}, step=best_epoch)
    tracker.log_table({"class": data.classes, "precision": [round(v, 4) for v in val["precision"]],
                       "recall": [round(v, 4) for v in val["recall"]], "f1": [round(v, 4) for v in val["f1"]],
                       "support": val["support"]}, artifact_file="per_class_metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot_confusion(val["confusion"], data.classes, Path(tmp) / "confusion_matrix.png")
        plot_confusion(val["confusion"], data.classes, Path(tmp) / "confusion_matrix_normalized.png", normalized=True)
        plot_curves(history, Path(tmp) / "curves.png")
        plot_class_scores(data.classes, val["precision"], val["recall"], Path(tmp) / "per_class.png")
        plot_mistakes(*confident_mistakes(val, data.val, data.classes), Path(tmp) / "mistakes.png")
        names = ["confusion_matrix.png", "confusion_matrix_normalized.png", "curves.png", "per_class.png", "mistakes.png"]
        if explain_mistakes(model, val, data, data_cfg, Path(tmp) / "mistakes_why.png"):
            names.append("mistakes_why.png")
        if write_label_issues(val, data.val, data.classes, Path(tmp), data_cfg.data_dir):
            names += ["label_issues.png", "label_issues.csv"]
        for name in names:
            tracker.log_artifact(str(Path(tmp) / name))
        if test is not None:
            for path in test_report(test, data, final["temperature"], Path(tmp) / "test").iterdir():
                tracker.log_artifact(str(path), artifact_path="test")
    tracker.log_artifact(str(checkpoint), artifact_path="checkpoint")
    print("logging the model to MLflow (pyfunc with its code and checkpoint)...", flush=True)
    try:
        logged = log_model(tracker, checkpoint, {"channels": data_cfg.channels, "image_size": data_cfg.image_size})
    except Exception as e:  # the checkpoint and everything above are saved and logged; the run stays a success
        print(f"warning: could not log the MLflow model (the checkpoint {checkpoint} is saved and logged): "
              f"{e.__class__.__name__}: {str(e)[:300]}", file=sys.stderr)
        tracker.set_tags({"model_logging_error": str(e)[:500]})
        logged = None
    if cfg.register and logged is not None:
        register(tracker, logged.model_uri, data, data_cfg, cfg, final[f"val_{cfg.select_metric}"])
    print(f"mlflow run {tracker.run_id} ({tracker.mlflow.get_tracking_uri()})")


def test_report(test: dict, data: Dataset, temperature: float, folder: Path) -> Path:
    """The test split's answers, as served (calibrated), scored and written up by make evaluate's code: confusion
    matrices, calibration, coverage, the worst mistakes. Returns the folder."""
    result = score(probabilities(test["logits"], temperature), data.test.labels, data.classes)
    images, true, predicted, confidence = confident_mistakes(test, data.test, data.classes)
    mistakes = [{"image": i, "true": t, "predicted": p, "confidence": c}
                for i, t, p, c in zip(images, true, predicted, confidence)]
    write_report(result, folder, "The test split, scored once at the end of training",
                 [("images", str(result["n"])), ("temperature", f"{temperature:.3f}")], mistakes, split="test")
    return folder


def calibrate(val: dict, val_labels: torch.Tensor, test: dict | None, test_labels: torch.Tensor | None) -> dict:
    """Temperature scaling fitted on the validation logits (what the checkpoint's temperature will be), with the
    calibration error before and after on validation and, held out from the fit, on test. val's "confidence" becomes
    the calibrated one, as served."""
    temperature, why = fit_temperature(val["logits"], val_labels)
    metrics = {"temperature": temperature}
    line = f"calibration: temperature {temperature:.3f}" + (f" (kept at 1: {why})" if why else "") + "; ECE"
    for name, result, labels in (("val", val, val_labels), ("test", test, test_labels)):
        if result is None:
            continue
        correct = result["predicted"] == labels
        before = expected_calibration_error(result["confidence"], correct)
        result["probabilities"] = probabilities(result["logits"], temperature).cpu()
        result["confidence"] = result["probabilities"].max(1).values
        after = expected_calibration_error(result["confidence"], correct)
        metrics.update({f"{name}_ece_uncalibrated": before, f"{name}_ece": after})
        line += f" on {name} {before:.4f} -> {after:.4f}" + (" (fitted there)" if name == "val" else "")
    metrics["val_ece_held_out"] = held_out_ece(val["logits"], val_labels)
    print(line + f"; held out (fitted on half of val, scored on the other) {metrics['val_ece_held_out']:.4f}")
    return metrics


def final_report(model, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, rt: Runtime, tracker: Tracker,
                 ckpt_info: dict, train_seconds: float, best_epoch: int, history: list[dict], interrupted: bool) -> None:
    """The end of a training run: the best weights (in model) scored, saved to cfg.out with the history, and,
    unless the run was interrupted (then a --resume logs it once, when it finishes), logged to MLflow."""
    val, test, final = final_scores(model, data, data_cfg, cfg, rt, best_epoch, train_seconds)
    history = [{k: float(v) for k, v in h.items()} for h in history]
    temperatures = {str(cfg.tta): final["temperature_tta"]} if "temperature_tta" in final else {}
    path = save_checkpoint(cfg.out, model, metrics=final, temperature=final["temperature"],
                           tta_temperatures=temperatures, **{**ckpt_info, "extra": {**ckpt_info["extra"], "history": history}})
    print(f"saved {path}")
    if interrupted:
        print("stopped early: the plots, the MLflow model and its registration are logged when the run finishes")
        return
    log_final(tracker, model, path, val, test, final, data, data_cfg, cfg, history)
