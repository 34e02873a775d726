"""Score a model on labelled images: loss, confusion matrix and per-class scores over batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import distributed
from model import CnnClassifier, predict_logits
from runtime import Runtime
from scores import class_scores


EVAL_PIXELS = 1000 * 32 * 32  # pixels per evaluation batch for our nets: 1000 CIFAR-sized images
BACKBONE_EVAL_PIXELS = 64 * 160 * 160  # and for an ImageNet backbone: 1000 images at 160 px peaked at 8.5 GB


def eval_batch_size(model: torch.nn.Module, image_size: int) -> int:
    """Evaluation batch size that keeps activation memory about constant whatever the input size."""
    pixels = EVAL_PIXELS if isinstance(model, CnnClassifier) else BACKBONE_EVAL_PIXELS
    return max(8, min(1000, pixels // image_size ** 2))


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
