"""Confidence that means what it says: temperature scaling fitted on held-out logits, and how calibrated answers are
(expected calibration error, reliability bins, accuracy against coverage when low-confidence answers go to review).

Temperature scaling (Guo et al. 2017) divides every logit by one scalar T fitted to minimize the negative
log-likelihood on the validation split: the predicted class never changes, only how sure the model says it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 15  # equal-width confidence bins, as in Guo et al.
REVIEW_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
T_RANGE = (0.05, 20.0)
MIN_MISTAKES = 5  # wrong answers on validation below which a temperature is not fitted (kept at 1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str]:
    """(T, "") for the T > 0 that minimizes the mean cross-entropy of softmax(logits / T) against labels; (1.0, why)
    when the data cannot tell: no images, fewer than MIN_MISTAKES mistakes (a handful of them run T towards 0: every
    answer ~100% sure, and nothing left for review), or a fit outside T_RANGE. Rows with a non-finite logit are left
    out."""
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    finite = torch.isfinite(logits).all(1)
    logits, labels = logits[finite], labels[finite]
    if len(logits) == 0:
        return 1.0, "no finite logits to fit on"
    mistakes = int((logits.argmax(1) != labels).sum())
    if mistakes < MIN_MISTAKES:
        return 1.0, f"{mistakes} mistake(s) on validation: too few to fit on"
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t): positive by construction
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0, "the fit did not converge"
    if not T_RANGE[0] < temperature < T_RANGE[1]:
        return 1.0, f"the fit ran to {temperature:.3g}, outside [{T_RANGE[0]}, {T_RANGE[1]}]"
    return temperature, ""


def check_temperatures(meta: dict) -> None:
    """ValueError unless a model's stored temperatures (plain, and per TTA level) are numbers in T_RANGE."""
    tta = meta.get("tta_temperatures") or {}
    if not isinstance(tta, dict):
        raise ValueError(f"tta_temperatures {tta!r} is not a mapping")
    for value in (meta.get("temperature", 1.0), *tta.values()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not T_RANGE[0] <= value <= T_RANGE[1]:
            raise ValueError(f"temperature {value!r} is not a number in [{T_RANGE[0]}, {T_RANGE[1]}]")


def temperature_for(meta: dict, tta: int) -> float:
    """The temperature a model's answers at a TTA level take: the one fitted at that level, else the plain one."""
    return (meta.get("tta_temperatures") or {}).get(str(tta), meta.get("temperature", 1.0))


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T): the served probabilities."""
    return torch.softmax(logits.float() / temperature, dim=1)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, how many answers fell in it, their mean confidence and accuracy."""
    confidence, correct = confidence.double().cpu(), correct.double().cpu()
    index = (confidence * bins).long().clamp(0, bins - 1)  # a confidence of exactly 1 joins the top bin
    rows = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": n,
                     "confidence": float(confidence[mask].mean()) if n else 0.0,
                     "accuracy": float(correct[mask].mean()) if n else 0.0})
    return rows


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> float:
    """Sum over bins of (share of answers) x |accuracy - mean confidence|: 0 when confidence matches accuracy."""
    total = len(confidence)
    if not total:
        return 0.0
    return sum(row["n"] / total * abs(row["accuracy"] - row["confidence"])
               for row in reliability(confidence, correct, bins))


def coverage(confidence: torch.Tensor, correct: torch.Tensor, thresholds=REVIEW_THRESHOLDS) -> list[dict]:
    """For each review threshold p: the share of answers at or above p (answered automatically) and their accuracy;
    the rest would go to a person. How to pick CATER_REVIEW_BELOW / --review-below."""
    confidence, correct = confidence.double().cpu(), correct.double().cpu()
    rows = []
    for p in thresholds:
        kept = confidence >= p
        n = int(kept.sum())
        rows.append({"review_below": p, "coverage": n / max(len(confidence), 1),
                     "accuracy": float(correct[kept].mean()) if n else float("nan"), "reviewed": len(confidence) - n})
    return rows


def held_out_ece(logits: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """The calibration error a fitted temperature leaves on images it was not fitted on: the split is halved at
    random, a temperature fitted on each half is scored on the other, and the two errors are averaged. Scoring the
    temperature on the split it was fitted on flatters it."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    errors = []
    for fit, score in (halves, halves[::-1]):
        confidence, predicted = probabilities(logits[score], fit_temperature(logits[fit], labels[fit])[0]).max(1)
        errors.append(expected_calibration_error(confidence, predicted == labels[score]))
    return sum(errors) / 2
