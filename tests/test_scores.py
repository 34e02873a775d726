import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_recall_fscore_support

from scores import class_scores, class_weights


def test_scores_match_scikit_learn_including_a_never_predicted_class():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 3, 300))  # class 3 is predicted only when right
    y_pred[y_pred == 3] = 0  # ... and now never: its precision and F1 are 0
    confusion = torch.bincount(torch.tensor(y_true * 4 + y_pred), minlength=16).view(4, 4)
    scores = class_scores(confusion)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    assert scores["precision"] == pytest.approx(precision.tolist())
    assert scores["recall"] == pytest.approx(recall.tolist())
    assert scores["f1"] == pytest.approx(f1.tolist())
    assert scores["support"] == support.tolist()
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert scores["acc"] == pytest.approx((y_true == y_pred).mean())


def test_class_weights_are_inverse_square_root_of_counts_averaging_one_per_example():
    labels = torch.tensor([0] * 100 + [1] * 25 + [2] * 4)
    weights = class_weights(labels, 3)
    scale = 129 / (100 / 10 + 25 / 5 + 4 / 2)  # sum of n_c * n_c ** -0.5 over classes
    assert weights.tolist() == pytest.approx([scale / 10, scale / 5, scale / 2])
    assert (weights[labels].sum() / len(labels)).item() == pytest.approx(1.0)
    assert class_weights(labels, 3, power=1.0)[2] / class_weights(labels, 3, power=1.0)[0] == pytest.approx(25)


def test_weighted_loss_counts_a_rare_example_more():
    weights = class_weights(torch.tensor([0] * 90 + [1] * 10), 2)
    logits = torch.zeros(2, 2)
    per_example = F.cross_entropy(logits, torch.tensor([0, 1]), weight=weights, reduction="none")
    assert per_example[1] / per_example[0] == pytest.approx(3.0)  # sqrt(90 / 10)
