"""api.py: every route (a 200 and a 4xx), the malformed-input corpus, image modes, batching, auth, CORS, metrics,
TTA, startup failure and graceful shutdown. A tiny checkpoint is made here; nothing outside tmp_path is read."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, PngImagePlugin
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

import api
import upload
from batcher import MicroBatcher
from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, ModelConfig
from conftest import free_port, tiny_checkpoint
from serve_config import ServeConfig
from model import CnnClassifier, predict_logits
from transforms import eval_transform, normalize, pil_to_uint8

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "cnn.pt", CLASSES)


@pytest.fixture(scope="session")
def reference(checkpoint_path):
    """The checkpoint loaded the plain way, for predictions to compare with."""
    model, meta = load_checkpoint(checkpoint_path)
    return model, meta


@contextmanager
def serving(checkpoint_path, **settings):
    """A started app (lifespan run). On the CPU unless told, so results compare exactly with the reference;
    with the test process's torch thread count, which the server would otherwise change for the tests after these."""
    config = ServeConfig(model_path=str(checkpoint_path), **{"device": "cpu", "threads": torch.get_num_threads(), **settings})
    with TestClient(api.create_app(config)) as client:
        yield client


@pytest.fixture(scope="module")
def client(checkpoint_path):
    with serving(checkpoint_path) as c:
        yield c


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(size=(32, 32), mode="RGB", seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = len(mode) if mode in ("RGB", "RGBA", "CMYK", "LA") else 1
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.squeeze(-1).numpy(), mode if channels > 1 else "L").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A PNG whose header claims width x height, with a token of pixel data: a bomb that costs nothing to send."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra_chunks
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def expected_probs(reference, data: bytes, tta: int = 0) -> torch.Tensor:
    model, meta = reference
    x = eval_transform(meta["image_size"], meta["mean"], meta["std"])(Image.open(io.BytesIO(data))).unsqueeze(0)
    return torch.softmax(predict_logits(model, x, tta), dim=1)[0]


def assert_matches(result: dict, probs: torch.Tensor, k: int = 3):
    values, indices = probs.topk(k)
    assert result["class_index"] == int(indices[0])
    assert result["class_name"] == CLASSES[int(indices[0])]
    assert [p["class_index"] for p in result["top_k"]] == indices.tolist()
    for got, want in zip([p["confidence"] for p in result["top_k"]], values.tolist()):
        assert abs(got - want) < 1e-5
    assert result["confidence"] == result["top_k"][0]["confidence"]


# ---------------------------------------------------------------------------------------------------------------
# Routes


def test_health_ready_model(client):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["image_size"] == 32 and info["mlflow_run_id"] == "run123"
    assert info["model_config"]["widths"] == [8, 16, 16] and info["metrics"] == {"val_acc": 0.5}
    assert info["tta"] == 0 and info["max_batch_size"] == 32 and info["torch_threads"] >= 1
    assert info["backend"] == "torch"


def test_not_ready_before_startup(checkpoint_path):
    client = TestClient(api.create_app(ServeConfig(model_path=str(checkpoint_path))))  # no `with`: no lifespan
    assert client.get("/health").json() == {"status": "ok", "model_loaded": False}
    assert client.get("/ready").status_code == 503
    assert client.get("/model").status_code == 503
    r = client.post("/predict", json={"image_base64": b64(encode(noise()))})
    assert r.status_code == 503 and "not loaded" in r.json()["detail"]


def test_predict(client, reference):
    data = encode(noise())
    r = client.post("/predict", json={"image_base64": b64(data)})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"class_index", "class_name", "confidence", "review", "top_k", "tta"} and body["tta"] == 0
    assert body["review"] is False  # CATER_REVIEW_BELOW unset: never
    assert_matches(body, expected_probs(reference, data))
    # a data URL prefix; top_k larger than the number of classes is capped
    r = client.post("/predict", json={"image_base64": "data:image/png;base64," + b64(data), "top_k": 50})
    assert r.status_code == 200 and len(r.json()["top_k"]) == len(CLASSES)
    assert len(client.post("/predict", json={"image_base64": b64(data), "top_k": 1}).json()["top_k"]) == 1


def test_predict_file(client, reference):
    data = encode(noise(seed=1), "JPEG")
    r = client.post("/predict/file", files={"file": ("x.jpg", data, "image/jpeg")}, data={"top_k": "2"})
    assert r.status_code == 200
    assert_matches(r.json(), expected_probs(reference, data), k=2)
    assert client.post("/predict/file").status_code == 422  # no file
    assert client.post("/predict/file", files={"other": ("x.jpg", data)}).status_code == 422
    assert client.post("/predict/file", files={"file": ("x.txt", b"hello")}).status_code == 400
    assert client.post("/predict/file", files={"file": ("x.png", b"")}).status_code == 400
    r = client.post("/predict/file", content=b"--nope\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500


def test_predict_batch(client, reference):
    files = [encode(noise(seed=i)) for i in range(5)]
    r = client.post("/predict/batch", json={"images": [b64(d) for d in files], "top_k": 2})
    assert r.status_code == 200
    results = r.json()
    assert len(results) == 5
    for result, data in zip(results, files):  # in order
        assert_matches(result, expected_probs(reference, data), k=2)
    assert client.post("/predict/batch", json={"images": []}).status_code == 422
    r = client.post("/predict/batch", json={"images": [b64(files[0]), "!!!"]})
    assert r.status_code == 400 and r.json()["detail"].startswith("images[1]: ")


def test_batch_cap(checkpoint_path):
    with serving(checkpoint_path, max_batch_images=2) as client:
        image = b64(encode(noise()))
        assert client.post("/predict/batch", json={"images": [image] * 2}).status_code == 200
        r = client.post("/predict/batch", json={"images": [image] * 3})
        assert r.status_code == 413 and "limit is 2" in r.json()["detail"]


def test_openapi_documents_bodies_and_examples(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/ready", "/model", "/predict", "/predict/file", "/predict/batch", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["PredictRequest"]["examples"] and schemas["PredictResponse"]["examples"]
    example = schemas["PredictRequest"]["examples"][0]
    assert client.post("/predict", json=example).status_code == 200  # the documented example works as is
    assert "415" in spec["paths"]["/predict"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Malformed input: always a 4xx with a message, never a 500, and the server keeps serving


def gif_with_screen(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",\0\0\0\0\1\0\1\0\0\2\2D\1\0;"


def truncated_png() -> bytes:
    data = encode(noise((64, 64)))
    return data[: len(data) // 2]


def corrupt_idat() -> bytes:
    data = bytearray(encode(noise()))
    start = data.index(b"IDAT") + 4
    data[start + 2: start + 40] = bytes(38)
    return bytes(data)


def text_bomb_png() -> bytes:
    ztxt = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"a" * 4_000_000))
    return png_with_header(8, 8, ztxt)


MALFORMED = {
    # name: (json body or raw bytes, expected status)
    "invalid base64": ({"image_base64": "not base64!!"}, 400),
    "bad padding": ({"image_base64": "abc"}, 400),
    "non-ascii base64": ({"image_base64": "ïmage"}, 400),
    "data url not base64": ({"image_base64": "data:image/png," + b64(b"x")}, 400),
    "not an image": ({"image_base64": b64(b"hello, this is text")}, 400),
    "zero bytes": ({"image_base64": b64(b"\0" * 100)}, 400),
    "empty string": ({"image_base64": ""}, 422),
    "missing field": ({}, 422),
    "extra field": ({"image_base64": b64(b"x"), "path": "/etc/passwd"}, 422),
    "wrong type int": ({"image_base64": 123}, 422),
    "wrong type list": ({"image_base64": ["a"]}, 422),
    "null": ({"image_base64": None}, 422),
    "top_k zero": ({"image_base64": b64(b"x"), "top_k": 0}, 422),
    "top_k string": ({"image_base64": b64(b"x"), "top_k": "many"}, 422),
    "body is a list": ([1, 2], 422),
    "body is a string": ("image", 422),
    "empty body": (b"", 422),
    "invalid json": (b"{not json", 422),
    "binary body": (b"\xff\xfe\x00garbage", 422),
    "truncated png": ({"image_base64": b64(truncated_png())}, 400),
    "truncated jpeg": ({"image_base64": b64(encode(noise((64, 64)), "JPEG")[:300])}, 400),
    "png corrupt pixel data": ({"image_base64": b64(corrupt_idat())}, 400),
    "png absurd header": ({"image_base64": b64(png_with_header(100_000, 100_000))}, 413),
    "png over max_pixels": ({"image_base64": b64(png_with_header(5000, 5000))}, 413),
    "png text bomb": ({"image_base64": b64(text_bomb_png())}, 413),
    "gif absurd screen": ({"image_base64": b64(gif_with_screen(65535, 65535))}, 413),
    "tiff": ({"image_base64": b64(encode(noise(), "TIFF"))}, 415),
    "ico": ({"image_base64": b64(encode(noise(), "ICO"))}, 415),
    "pdf": ({"image_base64": b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")}, 400),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input(client, name):
    body, status = MALFORMED[name]
    if isinstance(body, bytes):
        r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail and (isinstance(detail, list) or isinstance(detail, str))
    assert client.post("/predict", json={"image_base64": b64(encode(noise()))}).status_code == 200


def test_real_decompression_bomb(client):
    """A 20-megapixel PNG of zeros: 20 kB on the wire, rejected from its header before decoding."""
    data = encode(Image.new("L", (4500, 4500)))
    assert len(data) < 100_000
    r = client.post("/predict/file", files={"file": ("bomb.png", data)})
    assert r.status_code == 413 and "4500x4500" in r.json()["detail"]


def test_body_limit(checkpoint_path):
    with serving(checkpoint_path, max_body_bytes=20_000) as client:
        big = {"image_base64": b64(encode(noise((128, 128))))}  # ~65 kB of base64
        r = client.post("/predict", json=big)  # Content-Length says too much: rejected before reading
        assert r.status_code == 413 and "20000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: rejected while reading
            for _ in range(10):
                yield b"x" * 4096

        r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = client.post("/predict/file", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        assert client.post("/predict", json={"image_base64": b64(encode(noise()))}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'cater_http_requests_total{method="POST",route="/predict",status="413"} 2.0' in metrics
    assert 'cater_http_requests_total{method="POST",route="/predict/file",status="413"} 1.0' in metrics


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/predict").status_code == 405


# ---------------------------------------------------------------------------------------------------------------
# Image modes and the shared preprocessing


def exif_rotated_jpeg() -> bytes:
    image = Image.new("RGB", (48, 24), (255, 0, 0))
    image.paste((0, 0, 255), (24, 0, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    return encode(image, "JPEG", exif=exif, quality=95)


def palette_with_transparency() -> bytes:
    image = noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [noise(seed=1).convert("P"), noise(seed=2).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


MODES = {
    "rgba png": lambda: encode(noise(mode="RGBA")),
    "la png": lambda: encode(noise(mode="LA")),
    "grayscale png": lambda: encode(noise(mode="L")),
    "palette+transparency png": palette_with_transparency,
    "16-bit png": lambda: encode(Image.fromarray((torch.arange(40 * 30, dtype=torch.int32) * 50).view(30, 40)
                                                 .numpy().astype("uint16"))),
    "1-bit bmp": lambda: encode(noise(mode="L").convert("1"), "BMP"),
    "cmyk jpeg": lambda: encode(noise(mode="CMYK"), "JPEG"),
    "mpo (camera jpeg)": lambda: encode(noise(seed=4), "MPO", save_all=True, append_images=[noise(seed=5)]),
    "grayscale jpeg": lambda: encode(noise(mode="L"), "JPEG"),
    "exif-rotated jpeg": exif_rotated_jpeg,
    "large jpeg photo": lambda: encode(noise((640, 480)), "JPEG"),
    "animated gif": animated_gif,
    "webp with alpha": lambda: encode(noise(mode="RGBA"), "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", list(MODES))
def test_image_modes(client, reference, name):
    data = MODES[name]()
    r = client.post("/predict", json={"image_base64": b64(data)})
    assert r.status_code == 200, r.text
    assert_matches(r.json(), expected_probs(reference, data))


@pytest.mark.parametrize("name", ["rgba png", "16-bit png", "cmyk jpeg", "exif-rotated jpeg", "large jpeg photo",
                                  "animated gif"])
@pytest.mark.parametrize("channels, resize", [(3, "squash"), (1, "pad"), (3, "crop")])
def test_preprocessing_equals_evaluation_path(reference, name, channels, resize):
    """The server's tensors are the evaluation pipeline's (transforms.eval_transform), bit for bit, for every
    channel count and resize policy a checkpoint can carry."""
    meta = {**reference[1], "channels": channels, "resize": resize}
    mean, std = meta["mean"][:channels], meta["std"][:channels]
    data = MODES[name]()
    served = normalize(upload.preprocess_upload(data, meta, 10**8), mean, std)
    evaluated = eval_transform(meta["image_size"], mean, std, channels, resize)(Image.open(io.BytesIO(data)))
    assert served.shape == (channels, 32, 32) and torch.equal(served, evaluated)


def test_exif_orientation_applied():
    data = exif_rotated_jpeg()
    stored = Image.open(io.BytesIO(data))
    served = upload.preprocess_upload(data, {"image_size": 32, "channels": 3, "resize": "squash"}, 10**8)
    assert torch.equal(served, pil_to_uint8(ImageOps.exif_transpose(stored), 32))
    # Stored wide, red left and blue right; displayed (rotated 90 degrees clockwise) tall, red on top.
    assert stored.size == (48, 24)
    red, blue = torch.tensor([255, 0, 0]), torch.tensor([0, 0, 255])
    assert (served[:, 2, 29].int() - red).abs().max() < 40 and (served[:, 29, 2].int() - blue).abs().max() < 40


# ---------------------------------------------------------------------------------------------------------------
# Micro-batching


def test_batched_equals_single(checkpoint_path, reference):
    """Concurrent requests share forward passes, and give what one image alone through the model gives."""
    files = [encode(noise(seed=i)) for i in range(16)]
    with serving(checkpoint_path, max_wait_ms=100) as client:
        results = [None] * len(files)

        def send(i):
            results[i] = client.post("/predict", json={"image_base64": b64(files[i])})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = client.get("/metrics").text
    assert all(r.status_code == 200 for r in results)
    for r, data in zip(results, files):
        assert_matches(r.json(), expected_probs(reference, data))
    batches = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("cater_batch_size_count")))
    images = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("cater_batch_size_sum")))
    assert images == len(files) and batches < len(files)  # some requests were batched together


def test_small_pngs_are_decoded_on_the_event_loop_and_others_in_the_decode_threads(client, reference, monkeypatch):
    """One small PNG costs less to open and decode than a trip to a decode thread. A large one, a batch request's
    several, and files whose work their size does not bound (a JPEG's scans, a PNG's compressed text inflated by
    Pillow as it opens the file) must not hold up the event loop. Either way the answer is the same."""
    where = []

    def recording(step, real):
        def run(*args):
            where.append((step, threading.current_thread().name.startswith("decode")))
            return real(*args)
        return run

    monkeypatch.setattr(api, "open_all", recording("open", api.open_all))
    monkeypatch.setattr(api, "decode_all", recording("decode", api.decode_all))
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "a" * 10_000, zip=True)
    small = encode(noise())
    cases = {  # name: (file, route, opened in a decode thread, decoded in a decode thread)
        "small PNG": (small, "/predict", False, False),
        "small PNG as a file": (small, "/predict/file", False, False),
        "small PNG, alone in a batch request": (small, "/predict/batch", False, False),
        "small PNGs, two in a batch request": (small, "two", True, True),
        "few bytes, many pixels": (encode(Image.new("RGB", (160, 160))), "/predict", False, True),
        "PNG with compressed text": (encode(noise(), "PNG", pnginfo=text), "/predict", True, True),
        "small baseline JPEG": (encode(noise(), "JPEG"), "/predict", True, True),
    }
    for name, (data, route, opened_in_thread, decoded_in_thread) in cases.items():
        assert len(b64(data)) <= api.INLINE_BYTES, name
        if route == "/predict/file":
            r = client.post(route, files={"file": ("x.png", data, "image/png")})
        elif route in ("/predict/batch", "two"):
            r = client.post("/predict/batch", json={"images": [b64(data)] * (2 if route == "two" else 1)})
        else:
            r = client.post(route, json={"image_base64": b64(data)})
        assert r.status_code == 200, (name, r.text)
        for answer in r.json() if isinstance(r.json(), list) else [r.json()]:
            assert_matches(answer, expected_probs(reference, data))
        assert where == [("open", opened_in_thread), ("decode", decoded_in_thread)], name
        where.clear()
    bad = client.post("/predict", json={"image_base64": b64(truncated_png())})  # a clear 400 from the loop too
    assert bad.status_code == 400 and "truncated" in bad.json()["detail"] and where[-1] == ("decode", False)
    where.clear()
    bad = client.post("/predict", json={"image_base64": "not base64!!"})
    assert bad.status_code == 400 and "base64" in bad.json()["detail"] and not where


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serving_matches_cpu(checkpoint_path, reference):
    files = [encode(noise(seed=i)) for i in range(8)]
    with serving(checkpoint_path, device="cuda") as client:
        assert client.get("/model").json()["device"].startswith("cuda")
        assert client.get("/model").json()["max_batch_size"] == 128
        results = client.post("/predict/batch", json={"images": [b64(d) for d in files]}).json()
    for result, data in zip(results, files):
        probs = torch.zeros(len(CLASSES))
        for p in result["top_k"]:
            probs[p["class_index"]] = p["confidence"]
        assert torch.allclose(probs, expected_probs(reference, data), atol=5e-3)  # TF32 convolutions on CUDA


def test_micro_batcher_groups_in_order_and_drains_on_close():
    sizes = []

    def run_batch(items):
        sizes.append(len(items))
        time.sleep(0.01)
        return torch.tensor(items, dtype=torch.float32).view(-1, 1) * 10

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_ms=0)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        late = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        await batcher.close()  # queued work still finishes
        return [float(r) for r in results], [float(f.result()) for f in late]

    results, late = asyncio.run(scenario())
    assert results == [10.0 * i for i in range(10)] and late == [0.0, 10.0, 20.0]
    assert sizes[:3] == [4, 4, 2] and max(sizes) <= 4


def test_micro_batcher_reports_errors_to_every_caller_and_keeps_going():
    calls = []

    def run_batch(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return torch.ones(len(items), 1)

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_ms=1)
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        after = await batcher.submit(0)
        await batcher.close()
        return failed, after

    failed, after = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in failed) and float(after) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# TTA, auth, CORS, metrics


def test_tta_reported_and_applied(checkpoint_path, reference):
    data = encode(noise(seed=3))
    with serving(checkpoint_path, tta=2) as client:
        body = client.post("/predict", json={"image_base64": b64(data)}).json()
        assert client.get("/model").json()["tta"] == 2
    assert body["tta"] == 2
    assert_matches(body, expected_probs(reference, data, tta=2))


def test_api_key(checkpoint_path):
    image = {"image_base64": b64(encode(noise()))}
    with serving(checkpoint_path, api_key="s3cret") as client:
        assert client.post("/predict", json=image).status_code == 401
        assert client.post("/predict", json=image, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/predict", json=image, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/predict", json=image, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        assert client.post("/predict", json=image, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.post("/predict", json=image, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/predict/file", files={"file": ("x.png", b"")}).status_code == 401
        assert client.post("/predict/batch", json={"images": ["x"]}).status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        assert "detail" in client.post("/predict", json=image).json()


def test_no_api_key_by_default(client):
    assert client.post("/predict", json={"image_base64": b64(encode(noise()))}).status_code == 200


def test_cors_off_by_default_and_on_when_configured(client, checkpoint_path):
    preflight = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    r = client.options("/predict", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://example.com"}).headers
    with serving(checkpoint_path, cors_origins="https://example.com") as cors_client:
        r = cors_client.options("/predict", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.com"
        r = cors_client.options("/predict", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_metrics(checkpoint_path):
    with serving(checkpoint_path) as client:
        client.post("/predict", json={"image_base64": b64(encode(noise()))})
        client.post("/predict", json={"image_base64": "!!!"})
        client.get("/no/such/route")
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('cater_http_requests_total{method="POST",route="/predict",status="200"} 1.0',
                 'cater_http_requests_total{method="POST",route="/predict",status="400"} 1.0',
                 'cater_http_requests_total{method="GET",route="unmatched",status="404"} 1.0',
                 'cater_http_request_duration_seconds_count{route="/predict"} 2.0',
                 "cater_batch_size_count 1.0", "cater_inference_duration_seconds_count 1.0"):
        assert line in text, line
    assert 'cater_model_info{' in text and 'mlflow_run_id="run123"' in text and 'classes="3"' in text


# ---------------------------------------------------------------------------------------------------------------
# The ONNX backend: CATER_MODEL_PATH=models/cnn.onnx (made by export.py)


@pytest.fixture(scope="module")
def onnx_path(checkpoint_path, tmp_path_factory) -> Path:
    import export

    return export.export(checkpoint_path, ["onnx"], tmp_path_factory.mktemp("onnx"))["onnx"]


@pytest.mark.parametrize("tta", [0, 2])
def test_onnx_backend_serves_what_the_checkpoint_predicts(onnx_path, reference, tta):
    files = [encode(noise(size=(40, 30), seed=i)) for i in range(6)]
    with serving(onnx_path, tta=tta) as client:
        info = client.get("/model").json()
        assert info["backend"] == "onnxruntime" and info["device"] == "cpu" and info["classes"] == CLASSES
        assert info["model_config"]["widths"] == [8, 16, 16] and info["mlflow_run_id"] == "run123"
        results = client.post("/predict/batch", json={"images": [b64(d) for d in files], "top_k": 3}).json()
        single = client.post("/predict", json={"image_base64": b64(files[0])}).json()
        assert 'backend="onnxruntime"' in client.get("/metrics").text
    for result, data in zip(results, files):
        assert result["tta"] == tta
        assert_matches(result, expected_probs(reference, data, tta))
    assert_matches(single, expected_probs(reference, files[0], tta))


def test_onnx_backend_refuses_cuda(onnx_path):
    with pytest.raises(ConfigError, match="CATER_DEVICE=cuda.*CPU"):
        with serving(onnx_path, device="cuda"):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Startup, configuration, the real server


@pytest.mark.parametrize("suffix, missing, unreadable", [(".pt", "make train", "cannot read checkpoint"),
                                                         (".onnx", "make export", "cannot read ONNX model")])
def test_missing_or_bad_model_file_stops_startup(tmp_path, suffix, missing, unreadable):
    with pytest.raises(CheckpointError, match=missing):
        with serving(tmp_path / f"missing{suffix}"):
            pass
    (tmp_path / f"bad{suffix}").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=unreadable):
        with serving(tmp_path / f"bad{suffix}"):
            pass


def test_serve_config_from_env():
    cfg = ServeConfig.from_env({"CATER_PORT": "9000", "CATER_TTA": "1", "CATER_ACCESS_LOG": "yes",
                                "CATER_MAX_WAIT_MS": "2.5", "CATER_API_KEY": "k"})
    assert (cfg.port, cfg.tta, cfg.access_log, cfg.max_wait_ms, cfg.api_key) == (9000, 1, True, 2.5, "k")
    assert ServeConfig.from_env({}) == ServeConfig()
    for env in ({"CATER_PORT": "http"}, {"CATER_TTA": "5"}, {"CATER_ACCESS_LOG": "maybe"}, {"CATER_DEVICE": "tpu"}):
        with pytest.raises(ConfigError, match="CATER_"):
            ServeConfig.from_env(env)


def test_import_does_no_work():
    """Importing api builds the app object only: no checkpoint read, no threads set."""
    code = ("import torch; n = torch.get_num_threads(); import api; "
            "assert not api.app.state.ready and torch.get_num_threads() == n; print('ok')")
    env = {**os.environ, "CATER_MODEL_PATH": "/nonexistent/cnn.pt"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.full)])
def test_server_refuses_to_start_without_checkpoint(tmp_path, workers):
    env = {**os.environ, "CATER_MODEL_PATH": str(tmp_path / "missing.pt"), "CATER_PORT": str(free_port()),
           "CATER_WORKERS": workers}
    out = subprocess.run([sys.executable, "api.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3  # uvicorn's STARTUP_FAILURE, from the supervisor of several processes too
    assert "no checkpoint at" in out.stderr and "make train" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.full
def test_graceful_shutdown_finishes_in_flight_request(checkpoint_path):
    """SIGTERM while a request is half sent: the request still completes, then the server exits cleanly."""
    port = free_port()
    env = {**os.environ, "CATER_MODEL_PATH": str(checkpoint_path), "CATER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "api.py"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # its server processes die with it
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in s.recv(1024):
                        break
            except OSError:
                pass
            time.sleep(0.1)
        body = ('{"image_base64": "%s"}' % b64(encode(noise()))).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(body[20:])
            response = b""
            while chunk := s.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert b'"class_name"' in response
        # uvicorn re-raises the signal once shut down, the Unix convention for a clean exit on SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: requests generated from the OpenAPI spec (valid and invalid), and random or mutated image files


@pytest.fixture(scope="module")
def api_schema(checkpoint_path):
    app = api.create_app(ServeConfig(model_path=str(checkpoint_path), max_body_bytes=256 * 1024,
                                     threads=torch.get_num_threads()))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# Every operation with data that fits the spec; those that take a body or parameters also with data that breaks it
# (/reload takes neither when no API key is set).
OPERATIONS = [(path, method.upper(), mode) for path, methods in api.app.openapi()["paths"].items()
              for method, operation in methods.items()
              for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
                           if method == "post" and ("requestBody" in operation or operation.get("parameters"))
                           else [GenerationMode.POSITIVE])]


@pytest.mark.parametrize("path, method, mode", [  # /reload loads the model again per example: ~25 s a mode
    pytest.param(*op, marks=pytest.mark.full) if op[0] == "/reload" else op for op in OPERATIONS])
def test_openapi_fuzzing_gives_no_server_error(api_schema, path, method, mode):
    """Requests generated from the OpenAPI spec, fitting it (positive) or breaking it (negative)."""

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        assert response.status_code < 500, (response.status_code, response.text[:500])
        # documented status codes, and bodies that match the declared response schemas
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 response_schema_conformance, content_type_conformance])

    check()


SEED_FILES = [encode(noise((24, 20)), fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP")] + [animated_gif()]


@st.composite
def damaged_images(draw):
    data = bytearray(draw(st.sampled_from(SEED_FILES)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@given(data=st.binary(max_size=512) | damaged_images())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_damaged_image_files_give_no_server_error(client, data):
    r = client.post("/predict/file", files={"file": ("x", data)})
    assert r.status_code == 200 or (400 <= r.status_code < 500 and r.json()["detail"]), (r.status_code, r.text)


def test_the_served_graph_falls_back_to_eager_when_tracing_is_not_faithful():
    from predictor import frozen_graph

    class BatchDependent(torch.nn.Module):  # Python ints from shapes get frozen into a traced graph
        def forward(self, x):
            return x.flatten(1)[:, :3] * int(x.shape[0])

    meta = {"channels": 3, "image_size": 8}
    assert frozen_graph(BatchDependent(), meta, torch.device("cpu")).__class__ is BatchDependent
    net = CnnClassifier(ModelConfig(arch="airbench", widths=(8, 16, 16)), num_classes=3).eval()
    graph = frozen_graph(net, {"channels": 3, "image_size": 32}, torch.device("cpu"))
    assert isinstance(graph, torch.jit.ScriptModule)
    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(graph(x), net(x), atol=1e-5)
