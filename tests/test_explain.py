"""explain.py and POST /explain: the heat map follows the object, for our nets and a timm backbone; the endpoint's
answers and refusals (ONNX: 409)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import api
import export
from checkpoint import save_checkpoint
from config import ModelConfig
from explain import Explainer, cam_layer, overlay, peak
from model import CnnClassifier, build_model
from serve_config import ServeConfig
from transforms import normalize

CLASSES = ["red", "green", "blue"]
MEAN, STD = (0.45, 0.45, 0.45), (0.12, 0.12, 0.12)
SIZE, SQUARE = 32, 8


def scene(label: int, x: int, y: int, rng: np.random.Generator) -> np.ndarray:
    """A 3 x 32 x 32 uint8 image: grey noise, and an 8 px square of the label's colour at (x, y)."""
    image = rng.normal(110, 20, (3, SIZE, SIZE)).clip(0, 255)
    image[label, y:y + SQUARE, x:x + SQUARE] = 250
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An airbench net trained to name the colour of a square anywhere in the image, and its checkpoint."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = torch.arange(360) % 3
    images = torch.from_numpy(np.stack([scene(int(c), *rng.integers(0, SIZE - SQUARE, 2), rng) for c in labels]))
    model = CnnClassifier(ModelConfig(arch="airbench", widths=(16, 32, 32)), num_classes=3)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 3e-3)
    for _ in range(5):
        for index in torch.randperm(len(labels)).split(40):
            loss = torch.nn.functional.cross_entropy(9 * model(normalize(images[index], MEAN, STD)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    path = save_checkpoint(tmp_path_factory.mktemp("explain") / "cnn.pt", model, model_config=model.cfg,
                           classes=CLASSES, mean=MEAN, std=STD, image_size=SIZE, metrics={"val_acc": 1.0})
    return model, path


def corners(label: int) -> torch.Tensor:
    """The same square pasted top-left in one image and bottom-right in the other, on the same noise."""
    rng = np.random.default_rng(7)
    left = scene(label, 1, 1, rng)
    right = left.copy()
    right[:, 1:1 + SQUARE, 1:1 + SQUARE] = right[:, 20:20 + SQUARE, 20:20 + SQUARE]
    right[:, 23:23 + SQUARE, 23:23 + SQUARE] = left[:, 1:1 + SQUARE, 1:1 + SQUARE]
    return torch.from_numpy(np.stack([left, right]))


def png(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("label", [0, 2])
def test_the_heat_map_follows_the_object(trained, label):
    model, _ = trained
    images = corners(label)
    assert model(normalize(images, MEAN, STD)).argmax(1).tolist() == [label, label]
    heat = Explainer(model, {"image_size": SIZE, "channels": 3, "mean": MEAN, "std": STD}).heat(images, [label, label])
    assert heat.shape == (2, SIZE, SIZE) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    (x0, y0), (x1, y1) = peak(heat[0]), peak(heat[1])
    assert x0 < 0.5 and y0 < 0.5, (x0, y0)  # the square at the top left
    assert x1 > 0.5 and y1 > 0.5, (x1, y1)  # ... and at the bottom right


def test_explain_answers_with_the_prediction_and_a_map_that_moves_with_the_object(trained):
    _, path = trained
    config = ServeConfig(model_path=str(path), device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as client:
        left, right = corners(1)
        answers = [client.post("/explain", json={"image_base64": png(x), "top_k": 2}) for x in (left, right)]
        for response in answers:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["class_name"] == "green" and body["explained_class_name"] == "green"
            assert len(body["top_k"]) == 2 and body["method"].startswith("grad-cam on ")
            drawn = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
            assert drawn.format == "PNG" and drawn.size == (224, 224)
            # the same answer /predict gives
            assert client.post("/predict", json={"image_base64": png(left if response is answers[0] else right),
                                                 "top_k": 2}).json()["top_k"] == body["top_k"]
        first, second = (r.json() for r in answers)
        assert first["peak_x"] < 0.5 < second["peak_x"] and first["peak_y"] < 0.5 < second["peak_y"]

        other = client.post("/explain", json={"image_base64": png(left), "class_index": 2}).json()
        assert other["class_name"] == "green" and other["explained_class_index"] == 2
        assert other["explained_class_name"] == "blue"

        wrong = client.post("/explain", json={"image_base64": png(left), "class_index": 3})
        assert wrong.status_code == 400 and "3 classes" in wrong.json()["detail"]
        assert client.post("/explain", json={"image_base64": base64.b64encode(b"not an image").decode()}).status_code == 400
        assert client.post("/explain", json={"image_base64": png(left), "extra": 1}).status_code == 422
        assert client.post("/explain", json={"image_base64": png(left), "class_index": -1}).status_code == 422
        assert "/explain" in client.get("/openapi.json").json()["paths"]


def test_a_model_grad_cam_cannot_follow_gets_a_409_and_predictions_go_on(trained):
    _, path = trained
    config = ServeConfig(model_path=str(path), device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as client:
        image = png(corners(0)[0])
        assert client.post("/explain", json={"image_base64": image}).status_code == 200  # the explainer exists now

        def broken(images, targets):
            raise ValueError("no spatial layer")

        client.app.state.served.predictor.explainer.heat = broken
        response = client.post("/explain", json={"image_base64": image})
        assert response.status_code == 409 and "no spatial layer" in response.json()["detail"]
        assert client.post("/predict", json={"image_base64": image}).status_code == 200
        assert client.get("/ready").status_code == 200


def test_explain_with_an_onnx_model_is_refused_with_the_reason(trained, tmp_path):
    _, path = trained
    onnx = export.export(path, ["onnx"], tmp_path)["onnx"]
    config = ServeConfig(model_path=str(onnx), device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as client:
        response = client.post("/explain", json={"image_base64": png(corners(0)[0])})
        assert response.status_code == 409
        assert "ONNX" in response.json()["detail"] and ".pt" in response.json()["detail"]
        assert client.post("/predict", json={"image_base64": png(corners(0)[0])}).status_code == 200


@pytest.mark.parametrize("arch, size, channels, layer", [("airbench", 32, 3, "features.4.conv1"),
                                                         ("airbench", 28, 1, "features.4.conv1"),
                                                         ("baseline", 32, 3, "features.7"),
                                                         ("tf_efficientnet_lite0", 224, 1, "bn2"),
                                                         ("tf_efficientnet_lite0", 160, 3, "bn2")])
def test_the_layer_explained_is_the_last_with_a_fine_enough_map(arch, size, channels, layer):
    cfg = ModelConfig(arch=arch, widths=(8, 16) if arch == "baseline" else (64, 128, 128), pretrained=False)
    assert cam_layer(build_model(cfg, num_classes=3, image_size=size, in_chans=channels).eval(), channels, size)[0] == layer


@pytest.mark.parametrize("arch, size", [("tf_efficientnet_lite0", 64), ("baseline", 32)])
def test_other_networks_get_a_map_of_their_own_size(arch, size):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, widths=(8, 16) if arch == "baseline" else (64, 128, 128))
    model = build_model(cfg, num_classes=3, image_size=size, in_chans=1).eval()
    name, _ = cam_layer(model, 1, size)
    assert name and not name.startswith(("classifier", "head", "global_pool"))
    images = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    heat = Explainer(model, {"image_size": size, "channels": 1, "mean": (0.5,), "std": (0.2,)}).heat(images, [0, 2])
    assert heat.shape == (2, size, size) and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    drawn = overlay(images[0], heat[0])
    assert drawn.size == (224, 224) and drawn.mode == "RGB"
