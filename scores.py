"""Classification scores from a confusion matrix (rows: true class, columns: predicted), and class weights for imbalance."""

from __future__ import annotations

import torch


def class_scores(confusion: torch.Tensor) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, and their unweighted (macro) means.

    A class never predicted has precision 0, a class with no examples recall 0 (scikit-learn's zero_division=0).
    """
    confusion = confusion.double()
    hits = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = hits / predicted.clamp_min(1)
    recall = hits / support.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return {"acc": float(hits.sum() / confusion.sum().clamp_min(1)),
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.long().tolist(),
            "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean())}


def class_weights(labels: torch.Tensor, num_classes: int, power: float = 0.5) -> torch.Tensor:
    """Loss weight per class, proportional to count ** -power and scaled so the average example weighs 1.

    power 1 is full inverse frequency; 0.5 (the default) lifts rare classes without letting a handful of examples
    dominate the loss.
    """
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    weights = counts.clamp_min(1) ** -power
    weights *= counts.sum() / (weights * counts).sum()
    return weights.float()
