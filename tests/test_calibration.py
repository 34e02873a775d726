"""Calibrated confidence (issue 22): temperature scaling fitted on validation logits, stored in the checkpoint, and
applied by every way of serving it (PyTorch, ONNX, the server, the MLflow model); the review threshold."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import api
import calibration
from checkpoint import load_checkpoint, save_checkpoint
from conftest import tiny_checkpoint
from predictor import OnnxPredictor, TorchPredictor
from serve_config import ServeConfig

CLASSES = ["cat", "dog", "frog"]


def calibrated_logits(n: int = 4000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is right by construction: each label is drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_temperature_undoes_over_and_under_confidence(scale):
    logits, labels = calibrated_logits()
    temperature, why = calibration.fit_temperature(logits * scale, labels)
    assert temperature == pytest.approx(scale, rel=0.1) and why == ""
    confidence, predicted = calibration.probabilities(logits * scale, temperature).max(1)
    before = calibration.probabilities(logits * scale).max(1)
    assert torch.equal(predicted, before.indices)  # the answer never changes, only how sure it is
    ece = calibration.expected_calibration_error(confidence, predicted == labels)
    assert ece < 0.03
    if scale != 1.0:
        assert calibration.expected_calibration_error(before.values, predicted == labels) > 2 * ece


def test_the_held_out_error_is_what_a_fitted_temperature_leaves_on_new_images():
    logits, labels = calibrated_logits(n=2000)
    held_out = calibration.held_out_ece(logits * 3, labels)
    confidence, predicted = calibration.probabilities(logits * 3).max(1)
    assert held_out < 0.05 < calibration.expected_calibration_error(confidence, predicted == labels)


def test_a_temperature_is_only_fitted_where_the_data_can_tell():
    logits, labels = calibrated_logits(n=500)
    assert calibration.fit_temperature(logits, logits.argmax(1)) == (1.0, "0 mistake(s) on validation: too few to fit on")
    one_wrong = logits.argmax(1)
    one_wrong[0] = (one_wrong[0] + 1) % 10  # a single near-certain set of answers would run T to ~0: every answer 100%
    assert calibration.fit_temperature(logits * 5, one_wrong)[0] == 1.0
    assert calibration.fit_temperature(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))[0] == 1.0
    broken = logits.clone()
    broken[0, 0], broken[1, 1] = float("inf"), float("nan")  # an overflow on two images: left out, not NaN
    temperature, why = calibration.fit_temperature(broken * 3, labels)
    assert temperature == pytest.approx(calibration.fit_temperature(logits[2:] * 3, labels[2:])[0]) and why == ""


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    # bin of 0.95: accuracy 0.75, gap 0.20, 4/6 of answers; bin of 0.55: accuracy 0.5, gap 0.05, 2/6
    assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    assert calibration.expected_calibration_error(torch.ones(3), torch.ones(3, dtype=torch.bool)) == 0.0


def test_coverage_rises_in_accuracy_as_answers_go_to_review():
    logits, labels = calibrated_logits()
    confidence, predicted = calibration.probabilities(logits).max(1)
    rows = calibration.coverage(confidence, predicted == labels)
    assert [r["review_below"] for r in rows] == list(calibration.REVIEW_THRESHOLDS)
    assert all(a["coverage"] >= b["coverage"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["accuracy"] < rows[3]["accuracy"]
    assert all(r["reviewed"] == round(len(labels) * (1 - r["coverage"])) for r in rows)


@pytest.fixture(scope="module")
def hot_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a temperature of 4 (2 at TTA level 2): its served probabilities are much flatter."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("calib") / "cnn.pt", CLASSES)
    model, meta = load_checkpoint(path)
    hot = path.with_name("hot.pt")
    save_checkpoint(hot, model, model_config=model.cfg, classes=meta["classes"], mean=meta["mean"], std=meta["std"],
                    image_size=meta["image_size"], metrics={}, temperature=4.0,
                    tta_temperatures={"2": 2.0})
    return path, hot


def test_a_bad_temperature_in_an_onnx_export_is_refused(hot_checkpoint, tmp_path):
    import json

    import onnx

    import export
    from checkpoint import CheckpointError

    path = export.export(hot_checkpoint[1], ["onnx"], tmp_path)["onnx"]
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "cater":
            entry.value = json.dumps({**json.loads(entry.value), "temperature": float("nan")})
    onnx.save(proto, str(path))
    with pytest.raises(CheckpointError, match="temperature"):
        OnnxPredictor(path, 1)


def images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_the_checkpoint_temperature_is_applied_by_pytorch_and_onnx(hot_checkpoint, tmp_path):
    import export

    plain_path, hot_path = hot_checkpoint
    assert load_checkpoint(plain_path)[1]["temperature"] == 1.0  # written without one: raw softmax
    plain, hot = TorchPredictor(plain_path, torch.device("cpu")), TorchPredictor(hot_path, torch.device("cpu"))
    x = images()
    logits = torch.log(plain.probabilities(x, 0))
    assert torch.allclose(hot.probabilities(x, 0), torch.softmax(logits / 4, 1), atol=1e-5)
    assert torch.allclose(hot.probabilities(x, 2), torch.softmax(torch.log(plain.probabilities(x, 2)) / 2, 1), atol=1e-5)
    assert torch.allclose(hot.probabilities(x, 1), torch.softmax(torch.log(plain.probabilities(x, 1)) / 4, 1), atol=1e-5)
    onnx_path = export.export(hot_path, ["onnx"], tmp_path)["onnx"]
    assert export.read_metadata(onnx_path)["temperature"] == 4.0
    onnx = OnnxPredictor(onnx_path, 1)
    for tta in (0, 2):
        assert torch.allclose(onnx.probabilities(x, tta), hot.probabilities(x, tta), atol=1e-4)


def png(seed: int) -> str:
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_server_says_review_below_the_threshold_and_shows_the_temperature(hot_checkpoint):
    _, hot_path = hot_checkpoint
    answers = {}
    for below in (0.0, 0.5, 1.0):
        config = ServeConfig(model_path=str(hot_path), device="cpu", review_below=below)
        with TestClient(api.create_app(config)) as client:
            r = client.post("/predict/batch", json={"images": [png(i) for i in range(8)]})
            assert r.status_code == 200, r.text
            answers[below] = r.json()
            info = client.get("/model").json()
            assert info["temperature"] == 4.0 and info["review_below"] == below
    assert not any(a["review"] for a in answers[0.0])
    assert all(a["review"] for a in answers[1.0])
    assert all(a["review"] == (a["confidence"] < 0.5) for a in answers[0.5])
    assert all(a["confidence"] < 0.6 for a in answers[0.0])  # temperature 4 over 3 classes: flat


def test_review_below_is_checked():
    with pytest.raises(Exception, match="CATER_REVIEW_BELOW"):
        ServeConfig.from_env({"CATER_REVIEW_BELOW": "1.5"})
