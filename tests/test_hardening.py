"""A server that no slow or hostile client can stall (issue 20).

In-process (TestClient): validation errors are bounded and never echo the input; a batch's summed pixel count is
refused from the image headers; /reload is refused to remote clients without a key and never leaks why a load
failed; base64 with line breaks is accepted; security headers; no /docs behind an API key.

Full tier: one real `python api.py` process for the module, with short header and body deadlines, attacked over raw
sockets: stalled uploads, half-sent request lines, a 2-million-item list, a batch of cheap-to-send pixel bombs,
concurrent reloads, more connections than allowed; normal requests keep their latency and memory stays bounded.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import api
from conftest import free_port, many_files, server_process, tiny_checkpoint
from serve_config import ServeConfig
from transforms import pil_to_uint8

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]

HEADER_TIMEOUT_S = 2.0  # the real server's deadlines (the defaults, 10 and 30 s, would make the tests slow)
BODY_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 300
MAX_BODY_BYTES = 4 * 1024 * 1024  # the default CATER_MAX_BODY_BYTES
SMALL_422 = 2048  # a 422 body stays under this, whatever the input


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("hardening-ckpt") / "cnn.pt", CLASSES)


def app_for(checkpoint: Path, **settings):
    settings = {"device": "cpu", "threads": torch.get_num_threads(), **settings}
    config = ServeConfig(model_path=str(checkpoint), **settings)
    return api.create_app(config)


@contextmanager
def serving(checkpoint: Path, client_host: str | None = None, **settings):
    """A started app (lifespan run); requests come from client_host (TestClient's own "testclient" unless told)."""
    app = app_for(checkpoint, **settings)
    kwargs = {"client": (client_host, 50000)} if client_host else {}
    with TestClient(app, **kwargs) as client:
        yield client


@pytest.fixture(scope="module")
def client(checkpoint_path):
    with serving(checkpoint_path) as c:
        yield c


def png(image: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **params)
    return buf.getvalue()


def noise_png(seed: int = 0, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def palette_bomb() -> bytes:
    """A 4000x4000 palette PNG with a transparent colour: 16 MP (passes the per-image limit), a few KB to send,
    and 64 MB as RGBA once decoded and converted."""
    return png(Image.new("P", (4000, 4000)), transparency=0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with no usable pixel data: decoding it fails (400), so a 413 for it
    shows the size was refused from the header, before any decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def keys_in(value) -> set[str]:
    """Every key of every object in a JSON value."""
    if isinstance(value, dict):
        return set(value) | set().union(*(keys_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_in(v) for v in value))
    return set()


def assert_short_422(status: int, content: bytes, max_entries: int = 5) -> None:
    """FastAPI's 422 shape, a few entries, small, and nothing of the input echoed."""
    assert status == 422, content[:500]
    assert len(content) < SMALL_422, f"a {len(content)}-byte 422: {content[:500]!r}"
    body = json.loads(content)
    detail = body["detail"]
    assert isinstance(detail, list) and 1 <= len(detail) <= max_entries, body
    for entry in detail:
        assert {"loc", "msg", "type"} <= set(entry), entry
        assert isinstance(entry["loc"], list) and isinstance(entry["msg"], str) and entry["msg"]
    assert "input" not in keys_in(body), body


def many_zeros(n: int) -> bytes:
    """{"images":[0,0,...,0]} with n items."""
    return b'{"images":[' + b"0," * (n - 1) + b"0]}"


def many_unknown_keys(n: int, image: str) -> bytes:
    """A /predict body with a valid image and n unknown 3-character keys (8 bytes each)."""
    alphabet = [chr(c) for c in range(0x23, 0x7F) if chr(c) != "\\"]  # no quote, no backslash
    assert n <= len(alphabet) ** 3
    a = len(alphabet)
    keys = (alphabet[i // (a * a)] + alphabet[i // a % a] + alphabet[i % a] for i in range(n))
    return ('{"image_base64":"%s",' % image + ",".join(f'"{k}":0' for k in keys) + "}").encode()


# ---------------------------------------------------------------------------------------------------------------
# In-process: bounded validation (item 3)


def test_batch_images_have_a_schema_max_length(client):
    spec = client.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["BatchRequest"]["properties"]["images"]
    assert 1 <= schema.get("maxItems", 10 ** 9) <= 1024, schema


def test_a_huge_list_gets_one_short_422_without_the_input(client):
    body = many_zeros(200_000)
    start = time.perf_counter()
    r = client.post("/predict/batch", content=body, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    assert_short_422(r.status_code, r.content)
    assert elapsed < 5, f"{elapsed:.1f} s to refuse a 200,000-item list"


def test_many_unknown_keys_get_one_short_422_without_the_input(client):
    body = many_unknown_keys(100_000, b64(noise_png()))
    start = time.perf_counter()
    r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    assert_short_422(r.status_code, r.content)
    assert elapsed < 5, f"{elapsed:.1f} s to refuse 100,000 unknown keys"


@pytest.mark.parametrize("route, body", [
    ("/predict", {"image_base64": "SECRET-INPUT-" + "A" * 3000, "top_k": "SECRET-TOP-K"}),
    ("/predict", {"image_base64": 12345678, "unknown": "SECRET-INPUT"}),
    ("/predict/batch", {"images": ["SECRET-INPUT", 7, None, {"x": "SECRET"}], "top_k": -1}),
    ("/predict/batch", {"images": "SECRET-INPUT"}),
    ("/predict/batch", ["SECRET-INPUT"] * 100),
])
def test_a_422_never_echoes_the_input(client, route, body):
    r = client.post(route, json=body)
    assert_short_422(r.status_code, r.content, max_entries=10)
    assert b"SECRET" not in r.content, r.content


def test_a_non_json_body_gets_a_short_422(client):
    r = client.post("/predict", content=b"{" + b"x" * 100_000, headers={"Content-Type": "application/json"})
    assert_short_422(r.status_code, r.content)
    assert b"xxxxxxxxxx" not in r.content


# ---------------------------------------------------------------------------------------------------------------
# In-process: the request pixel budget, from the headers (item 4)


def test_the_request_pixel_budget_is_checked_from_the_headers(checkpoint_path):
    with serving(checkpoint_path, max_pixels=10_000, max_request_pixels=20_000) as client:
        real = b64(png(Image.new("RGB", (100, 100), "red")))
        assert client.post("/predict/batch", json={"images": [real, real]}).status_code == 200  # 20,000: at the budget
        r = client.post("/predict/batch", json={"images": [real, real, real]})
        assert r.status_code == 413 and "pixel" in r.json()["detail"].lower(), r.text
        # headers alone over the budget: a 413 before any decode (decoding these would fail with a 400)
        fake = b64(png_header_only(100, 100))
        r = client.post("/predict/batch", json={"images": [fake, fake, fake]})
        assert r.status_code == 413 and "pixel" in r.json()["detail"].lower(), r.text
        # the per-image limit still holds
        r = client.post("/predict", json={"image_base64": b64(png_header_only(101, 100))})
        assert r.status_code == 413, r.text


def test_one_palette_bomb_is_served(checkpoint_path):
    with serving(checkpoint_path) as client:
        r = client.post("/predict", json={"image_base64": b64(palette_bomb())})
        assert r.status_code == 200, r.text


def test_a_batch_of_palette_bombs_is_refused_from_the_headers(checkpoint_path):
    with serving(checkpoint_path) as client:
        bomb = b64(palette_bomb())
        start = time.perf_counter()
        r = client.post("/predict/batch", json={"images": [bomb] * 64})
        elapsed = time.perf_counter() - start
        assert r.status_code == 413 and "pixel" in r.json()["detail"].lower(), r.text
        assert elapsed < 3, f"{elapsed:.1f} s to refuse 64 palette bombs: they were decoded"


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_the_same_everywhere(tmp_path):
    """A 12-megapixel photo is decoded by libjpeg at 1/8 scale (short side still >= 2x the model's size), and the
    training folder, predict and the server all get the same pixels from it."""
    import predict
    from decode import decode_files, open_image
    from upload import preprocess_upload

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).resize((4000, 3000))  # smooth, as photos are
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)
    data = path.read_bytes()
    meta = {"image_size": 32, "channels": 3, "resize": "squash"}

    assert open_image(str(path), 32).size == (500, 375)  # drafted: scale 1/8
    assert open_image(str(path)).size == (4000, 3000)  # no size given: the whole image (thumbnails)
    served = preprocess_upload(data, meta, 16_000_000)
    assert torch.equal(served, decode_files([str(path)], 32, workers=0)[0])
    assert torch.equal(served, predict.preprocess(str(path), meta))

    with Image.open(path) as image:  # pil_to_uint8 drafts a JPEG it gets unloaded: libjpeg decodes it at 1/8 scale
        assert torch.equal(pil_to_uint8(image, 32), served)
        assert image.size == (500, 375)
    with Image.open(path) as image:  # one the caller has loaded is decoded whole: close, not the same pixels
        image.load()
        assert not torch.equal(pil_to_uint8(image, 32), served)
        assert image.size == (4000, 3000)


# ---------------------------------------------------------------------------------------------------------------
# In-process: /reload (item 5)


def test_reload_from_a_remote_client_without_a_key_is_forbidden(checkpoint_path):
    with serving(checkpoint_path) as client:  # TestClient's host is "testclient": not loopback
        r = client.post("/reload")
        assert r.status_code == 403, r.text
        assert r.json()["detail"]


@pytest.mark.parametrize("fails", [False, True])
def test_reload_under_a_supervisor_asks_it_to_replace_the_processes(checkpoint_path, monkeypatch, fails):
    """Started by supervisor.py with others, the answering process swaps its model, then sends the supervisor
    SIGHUP; a supervisor already gone is logged, and the reload still answers 200 (this process serves the new one)."""
    sent = []

    def kill(pid, sig):
        sent.append((pid, sig))
        if fails:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(api, "supervisor_pid", lambda: 12345)
    monkeypatch.setattr(api.os, "kill", kill)
    with serving(checkpoint_path, client_host="127.0.0.1") as client:
        r = client.post("/reload")
        assert r.status_code == 200 and r.json()["classes"] == CLASSES, r.text
    assert sent == [(12345, signal.SIGHUP)]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_reload_from_loopback_needs_no_key(checkpoint_path, host):
    with serving(checkpoint_path, client_host=host) as client:
        r = client.post("/reload")
        assert r.status_code == 200, r.text
        assert r.json()["classes"] == CLASSES
        assert client.post("/predict", json={"image_base64": b64(noise_png())}).status_code == 200


def test_reload_with_a_key_needs_the_key(checkpoint_path):
    with serving(checkpoint_path, api_key="s3cret") as client:
        assert client.post("/reload").status_code == 401
        assert client.post("/reload", headers={"X-API-Key": "wrong"}).status_code == 401
        r = client.post("/reload", headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200, r.text
        assert client.post("/reload", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with serving(checkpoint_path, client_host="127.0.0.1", api_key="s3cret") as client:
        assert client.post("/reload").status_code == 401  # a key set is needed from loopback too


@contextmanager
def captured(logger_name: str):
    """The messages logged to a logger meanwhile (a handler of its own: uvicorn's logging config may stop
    propagation to the root logger that caplog listens on)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage() + (str(record.exc_info[1]) if record.exc_info else ""))

    logger, handler = logging.getLogger(logger_name), Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_a_failed_reload_says_nothing_of_why(checkpoint_path, tmp_path):
    """The 409 is generic: no exception text (it names paths, URIs, hosts); the reason goes to the server log."""
    folder = tmp_path / "private-models-dir"
    folder.mkdir()
    path = folder / "secret-name.pt"
    shutil.copy(checkpoint_path, path)
    image = {"image_base64": b64(noise_png())}
    leaks = [str(folder), "private-models-dir", "no checkpoint", "make train", "No such file", "Errno", "Traceback",
             "pickle", "zip", "Error"]
    with serving(path, api_key="k") as client, captured("uvicorn.error") as log:
        key = {"X-API-Key": "k"}
        for damage in (path.unlink, lambda: path.write_bytes(b"not a checkpoint at all" * 100)):  # gone, corrupt
            damage()
            before = len(log)
            r = client.post("/reload", headers=key)
            assert r.status_code == 409, r.text
            detail = r.json()["detail"]
            assert detail and not any(leak in detail for leak in leaks), detail
            logged = "\n".join(log[before:])
            assert str(path) in logged or "secret-name" in logged, f"the reason belongs in the server log: {logged!r}"
            reasons = [line.split(": ", 1)[1] for line in log[before:] if ": " in line]
            assert not any(reason and reason in detail for reason in reasons), (detail, reasons)
            assert client.post("/predict", json=image, headers=key).status_code == 200  # the served model stays


# ---------------------------------------------------------------------------------------------------------------
# In-process: base64 with line breaks (item 6)


def test_base64_with_line_breaks_is_accepted(client):
    data = noise_png(seed=3)
    assert len(data) > 200  # several lines
    wrapped = base64.encodebytes(data).decode()  # 76-character lines, as `base64` writes them
    assert "\n" in wrapped.rstrip("\n")
    crlf = wrapped.replace("\n", "\r\n")
    want = client.post("/predict", json={"image_base64": b64(data)}).json()
    for text in (wrapped, crlf, wrapped.rstrip("\n"), "data:image/png;base64," + wrapped):
        r = client.post("/predict", json={"image_base64": text})
        assert r.status_code == 200, (repr(text[-10:]), r.text)
        assert r.json() == want
    r = client.post("/predict/batch", json={"images": [wrapped, crlf]})
    # a batch of two runs in one forward pass: the same answer up to float rounding
    assert r.status_code == 200 and len(r.json()) == 2, r.text
    for got in r.json():
        assert [c["class_index"] for c in got["top_k"]] == [c["class_index"] for c in want["top_k"]]
        assert [c["confidence"] for c in got["top_k"]] == pytest.approx([c["confidence"] for c in want["top_k"]], rel=1e-5)


@pytest.mark.parametrize("text", ["!!!", "abc$def=", "aGVsbG8=\x00", "aGVs bG8=é", "-_-_"],
                         ids=["bangs", "dollar", "nul", "non-ascii", "url-safe"])
def test_other_non_base64_is_a_400(client, text):
    r = client.post("/predict", json={"image_base64": text})
    assert r.status_code == 400, r.text
    assert "base64" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------------
# In-process: headers and docs (item 7)


def test_the_page_has_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, csp
    sources = [token for directive in csp.split(";") for token in directive.split()[1:]]
    third_party = [s for s in sources if "://" in s or s in ("*", "http:", "https:") or "." in s.strip("'")]
    assert not third_party, csp
    assert r.headers.get("x-content-type-options") == "nosniff"


def test_every_response_says_nosniff(client, checkpoint_path):
    responses = [client.get(path) for path in ("/", "/health", "/ready", "/model", "/metrics", "/openapi.json",
                                               "/docs", "/ui/app.js", "/no-such-route")]
    responses += [client.post("/predict", json={}), client.post("/predict", json={"image_base64": "!!!"}),
                  client.put("/predict"), client.post("/reload"),
                  client.post("/predict", content=b"x" * (MAX_BODY_BYTES + 1),
                              headers={"Content-Type": "application/json"})]
    with serving(checkpoint_path, api_key="k") as keyed:
        responses += [keyed.post("/predict", json={"image_base64": b64(noise_png())}), keyed.get("/docs")]
    statuses = {r.status_code for r in responses}
    assert {200, 400, 401, 403, 404, 405, 413, 422} <= statuses, statuses
    for r in responses:
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.method, r.request.url, r.status_code)


def test_docs_are_hidden_behind_an_api_key(checkpoint_path, client):
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()  # no key: served
    with serving(checkpoint_path, api_key="k") as keyed:
        assert keyed.get("/docs").status_code == 404
        assert keyed.get("/redoc").status_code == 404
        assert keyed.get("/docs", headers={"X-API-Key": "k"}).status_code == 404
        assert keyed.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Full tier: a real server process, attacked over raw sockets


class Server:
    def __init__(self, proc, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.rss_start = 0
        self.body = ('{"image_base64": "%s"}' % b64(noise_png())).encode()

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def predict(self, client: httpx.Client) -> float:
        """One normal /predict; its latency in seconds."""
        start = time.perf_counter()
        r = client.post(f"{self.base}/predict", content=self.body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - start
        assert r.status_code == 200, (r.status_code, r.text[:300])
        return elapsed

    def usual_latency(self, client: httpx.Client, n: int = 7) -> float:
        return statistics.median(self.predict(client) for _ in range(n))

    def connect(self, timeout: float = 5) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def server(checkpoint_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening-server")
    model = folder / "cnn.pt"
    shutil.copy(checkpoint_path, model)
    port = free_port()
    env = {**os.environ, "CATER_MODEL_PATH": str(model), "CATER_HOST": "127.0.0.1", "CATER_PORT": str(port),
           "CATER_DEVICE": "cpu", "CATER_THREADS": "1", "CATER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
           "CATER_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "CATER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
           "CATER_WORKERS": "1"}  # one process: the tests read its memory, count its connections, race its reloads
    env.pop("CATER_API_KEY", None)
    log = folder / "api.log"
    with many_files(), server_process([sys.executable, str(REPO / "api.py")], env, log,
                                      f"http://127.0.0.1:{port}/ready", 120) as proc:
        s = Server(proc, port, log)
        with httpx.Client(timeout=30) as c:
            s.usual_latency(c, 5)  # warm-up
        s.rss_start = s.rss()
        yield s


def read_all(socks: list[socket.socket], deadline: float, dribble=None) -> dict:
    """Reads every socket until it is closed by the server (EOF or reset) or until the deadline:
    {sock: (bytes received, time.monotonic() when closed, or None if still open)}."""
    results = {s: [b"", None] for s in socks}
    selector = selectors.DefaultSelector()
    try:
        for s in socks:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        open_count = len(socks)
        while open_count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset: closed too
                    chunk = b""
                if chunk:
                    results[s][0] += chunk
                else:
                    results[s][1] = time.monotonic()
                    selector.unregister(s)
                    open_count -= 1
    finally:
        selector.close()
    return {s: tuple(v) for s, v in results.items()}


def assert_408_or_closed(data: bytes) -> None:
    """The server answered 408 (and said it closes), or closed without a word."""
    if data:
        assert data.startswith(b"HTTP/1.1 408"), data[:300]
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        assert b"connection: close" in head, data[:300]


def raw_response(sock: socket.socket, deadline: float) -> bytes:
    """One whole response on a blocking socket (by Content-Length), or what came before EOF or the deadline."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if length and len(body) >= int(length[0]):
                break
    return data


def stalled_upload_head(length: int = 100_000) -> bytes:
    return (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length + b'{"image_base64": "iVBORw0KGgo')


def admitted(server: Server) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("cater_admitted_images")]
    return sum(values)


@pytest.mark.full
def test_stalled_uploads_take_no_queue_place_and_get_408(server):
    n = 200
    socks: list[socket.socket] = []
    try:
        with httpx.Client(timeout=30) as client:
            usual = server.usual_latency(client)
            allowed = max(1.0, 5 * usual)
            sent_at = time.monotonic()
            for _ in range(n):
                s = server.connect()
                socks.append(s)
                s.sendall(stalled_upload_head())
            opened = time.monotonic() - sent_at
            # meanwhile: normal requests at their usual latency; nothing admitted while they stall
            latencies = [server.predict(client) for _ in range(8)]
            assert max(latencies) < allowed, (f"/predict took {max(latencies):.3f} s with {n} stalled uploads "
                                              f"(usual {usual * 1000:.0f} ms, allowed {allowed:.2f} s)")
            assert admitted(server) == 0, "stalled uploads hold queue places"
            # after the body deadline: 408 (or closed), and closed
            results = read_all(socks, sent_at + opened + BODY_TIMEOUT_S + 4)
        still_open = sum(closed is None for _, closed in results.values())
        assert still_open == 0, f"{still_open} of {n} stalled uploads still open {BODY_TIMEOUT_S + 4:g} s later"
        for data, closed in results.values():
            assert_408_or_closed(data)
            assert closed - sent_at >= BODY_TIMEOUT_S - 0.5, "a slow upload was cut before the body deadline"
        answered = sum(bool(data) for data, _ in results.values())
        print(f"usual /predict {usual * 1000:.1f} ms; with {n} stalled uploads max {max(latencies) * 1000:.1f} ms; "
              f"{answered} of them answered 408, all closed within "
              f"{max(c for _, c in results.values()) - sent_at:.2f} s")
        with httpx.Client(timeout=30) as client:
            server.predict(client)
    finally:
        for s in socks:
            s.close()


def dribble(sock: socket.socket, stop: threading.Event) -> None:
    """A slowloris: a header byte every 0.25 s, for at most 10 s."""
    data = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100
    for i in range(len(data)):
        if stop.wait(0.25):
            return
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return


@pytest.mark.full
def test_half_sent_request_lines_and_headers_are_closed_after_the_header_deadline(server):
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        with httpx.Client(timeout=30) as client:
            usual = server.usual_latency(client, 3)
        start = time.monotonic()
        silent = server.connect()  # connects, sends nothing
        partial_line = server.connect()
        partial_line.sendall(b"POST /predict HT")
        partial_headers = server.connect()
        partial_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        kept_alive = server.connect()  # a whole request answered, then half of the next
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = raw_response(kept_alive, time.monotonic() + 5)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        kept_alive.sendall(b"GET /hea")
        slowloris = server.connect()
        socks += [silent, partial_line, partial_headers, kept_alive, slowloris]
        thread = threading.Thread(target=dribble, args=(slowloris, stop), daemon=True)
        thread.start()
        results = read_all(socks, start + HEADER_TIMEOUT_S + 4)
        stop.set()
        thread.join(timeout=5)
        names = ["silent", "partial request line", "partial headers", "kept-alive, half the next request", "slowloris"]
        for name, s in zip(names, socks):
            data, closed = results[s]
            assert closed is not None, f"{name}: still open {HEADER_TIMEOUT_S + 4:g} s later"
            assert_408_or_closed(data)
            assert closed - start < HEADER_TIMEOUT_S + 3, f"{name}: closed after {closed - start:.2f} s"
            print(f"{name}: {data[:12].decode(errors='replace') or 'no answer'}, closed after {closed - start:.2f} s")
        with httpx.Client(timeout=30) as client:
            assert server.predict(client) < max(1.0, 5 * usual)
    finally:
        stop.set()
        for s in socks:
            s.close()


@pytest.mark.full
def test_the_header_deadline_counts_from_the_connection_spares_pipelined_answers_and_unread_bodies_close(server):
    """The review's three cases: a first byte late in the deadline does not restart it; a late pipelined request
    does not cut off the answer before it; an answer sent before its body has arrived closes the connection."""
    socks: list[socket.socket] = []
    try:
        start = time.monotonic()
        late = server.connect()  # waits most of the deadline, then sends one byte: closed at the deadline all the same
        socks.append(late)
        time.sleep(HEADER_TIMEOUT_S * 0.6)
        late.sendall(b"G")
        unread = server.connect()  # a body that never ends, on a route that does not read it
        unread.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nab")
        socks.append(unread)
        pipelined = server.connect()  # a whole /predict, then half of the next request's headers
        body = b'{"image_base64": "%s"}' % base64.b64encode(noise_png(1))
        pipelined.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body + b"GET /hea")
        socks.append(pipelined)
        answered = raw_response(pipelined, time.monotonic() + 10)
        assert answered.startswith(b"HTTP/1.1 200"), answered[:200]
        results = read_all([late, unread], start + HEADER_TIMEOUT_S + 4)
        data, closed = results[late]
        assert closed is not None and closed - start < HEADER_TIMEOUT_S + 0.8, f"closed after {closed and closed - start}"
        assert_408_or_closed(data)
        data, closed = results[unread]
        assert data.startswith(b"HTTP/1.1 405") or data.startswith(b"HTTP/1.1 200"), data[:100]
        assert closed is not None, "an answer sent before its body arrived left the connection open"
    finally:
        for sock in socks:
            sock.close()


def poll_while(thread: threading.Thread, call, every: float, limit_s: float) -> list[float]:
    """call() every `every` seconds while thread runs (at most limit_s); the durations."""
    durations, end = [], time.monotonic() + limit_s
    while thread.is_alive() and time.monotonic() < end:
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
        time.sleep(every)
    return durations


@pytest.mark.full
def test_a_two_million_item_list_is_refused_quickly_and_health_keeps_answering(server):
    body = many_zeros(2_000_000)
    keys = many_unknown_keys(500_000, b64(noise_png()))
    assert len(body) < MAX_BODY_BYTES and len(keys) < MAX_BODY_BYTES  # under the body limit: validation must cope
    for route, payload in (("/predict/batch", body), ("/predict", keys)):
        result = {}

        def send():
            start = time.perf_counter()
            try:
                with httpx.Client(timeout=60) as big:
                    result["response"] = big.post(f"{server.base}{route}", content=payload,
                                                  headers={"Content-Type": "application/json"})
            except Exception as e:  # reported below
                result["error"] = e
            result["elapsed"] = time.perf_counter() - start

        thread = threading.Thread(target=send, daemon=True)
        with httpx.Client(timeout=10) as health:
            health.get(f"{server.base}/health")  # connected before the attack
            thread.start()

            def check():
                r = health.get(f"{server.base}/health")
                assert r.status_code == 200, r.text

            durations = poll_while(thread, check, 0.05, 60)
        thread.join(timeout=30)
        assert "error" not in result, result.get("error")
        r = result["response"]
        assert_short_422(r.status_code, r.content)
        print(f"{route} with {len(payload) / 1e6:.1f} MB: 422 of {len(r.content)} bytes in {result['elapsed']:.2f} s; "
              f"{len(durations)} /health, slowest {max(durations, default=0) * 1000:.0f} ms")
        assert result["elapsed"] < 5, f"{route}: {result['elapsed']:.1f} s to refuse {len(payload) / 1e6:.1f} MB"
        assert max(durations, default=0) < 1, f"/health took {max(durations):.2f} s while {route} was validated"


@pytest.mark.full
def test_a_batch_of_palette_bombs_is_refused_and_predict_stays_fast(server):
    bomb = b64(palette_bomb())
    batch = ('{"images": [%s]}' % ",".join(['"%s"' % bomb] * 64)).encode()
    result = {"elapsed": []}

    def attack():
        try:
            with httpx.Client(timeout=60) as c:
                end = time.monotonic() + 2  # an attacker that keeps sending them, for 2 s (100 at most)
                for _ in range(100):
                    if time.monotonic() > end:
                        break
                    start = time.perf_counter()
                    r = c.post(f"{server.base}/predict/batch", content=batch,
                               headers={"Content-Type": "application/json"})
                    result["elapsed"].append(time.perf_counter() - start)
                    result.setdefault("responses", []).append(r)
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=attack, daemon=True)
    with httpx.Client(timeout=30) as client:
        server.predict(client)
        thread.start()
        answers = []

        def predict():
            r = client.post(f"{server.base}/predict", content=server.body, headers={"Content-Type": "application/json"})
            answers.append((r.status_code, r.text[:200]))

        latencies = poll_while(thread, predict, 0.02, 60)
        thread.join(timeout=30)
        assert "error" not in result, result.get("error")
        refused = [a for a in answers if a[0] != 200]
        statuses = sorted({r.status_code for r in result["responses"]})
        print(f"64 palette bombs ({len(batch) / 1e6:.2f} MB), sent {len(result['responses'])} times in 2 s: "
              f"statuses {statuses}, slowest {max(result['elapsed']):.2f} s; "
              f"/predict meanwhile: {len(answers)}, {len(refused)} refused, "
              f"slowest {max(latencies, default=0) * 1000:.0f} ms")
        problems = []
        not_413 = [(r.status_code, r.text[:120]) for r in result["responses"] if r.status_code != 413]
        if not_413:
            problems.append(f"{len(not_413)} of {len(result['responses'])} batches of palette bombs not refused with "
                            f"413 (from the request pixel budget): {not_413[:2]}")
        details = {r.json()["detail"] for r in result["responses"] if r.status_code == 413}
        if not all("pixel" in d.lower() for d in details):
            problems.append(f"a 413 that does not mention the pixel budget: {details}")
        if max(result["elapsed"]) >= 3:
            problems.append(f"{max(result['elapsed']):.1f} s to refuse the batch: it was decoded")
        if max(latencies, default=0) >= 2:
            problems.append(f"/predict took {max(latencies):.2f} s during the palette bombs")
        if refused:
            problems.append(f"{len(refused)} of {len(answers)} normal /predict refused while batches of 64 palette "
                            f"bombs (to be refused from their headers) were checked: {refused[:2]}")
        assert not problems, "\n".join(problems)
        # one such image on its own is within the limits and served
        start = time.perf_counter()
        r = client.post(f"{server.base}/predict", json={"image_base64": bomb})
        assert r.status_code == 200, r.text
        print(f"one palette bomb alone: 200 in {time.perf_counter() - start:.2f} s")


def reload_pair(server: Server) -> list[tuple[int, bytes]]:
    """Two POST /reload from 127.0.0.1 (no key), their last bytes sent back to back: (status, response) each."""
    request = b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    socks = []
    try:
        for _ in range(2):
            s = server.connect(timeout=30)
            s.sendall(request[:-1])
            socks.append(s)
        time.sleep(0.1)
        for s in socks:
            s.sendall(request[-1:])
        out = []
        for s in socks:
            data = raw_response(s, time.monotonic() + 60)
            out.append((int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0, data))
        return out
    finally:
        for s in socks:
            s.close()


@pytest.mark.full
def test_concurrent_reloads_one_at_a_time(server):
    tries = []
    for _ in range(3):  # a reload shorter than the time between the two requests would let both through
        pair = reload_pair(server)
        statuses = sorted(status for status, _ in pair)
        tries.append(statuses)
        for status, data in pair:
            assert status in (200, 409), data[:500]
            if status == 409:
                assert b"already" in data.lower(), data[:500]
        if statuses == [200, 409]:
            break
    print(f"two concurrent /reload: {tries}")
    assert [200, 409] in tries, f"two concurrent reloads got {tries}"
    with httpx.Client(timeout=30) as client:
        server.predict(client)


@pytest.mark.full
def test_connections_over_the_limit_get_503(server):
    socks: list[socket.socket] = []
    try:
        start = time.monotonic()
        for _ in range(MAX_CONNECTIONS):
            socks.append(server.connect())
        statuses = []
        while time.monotonic() < start + HEADER_TIMEOUT_S - 0.3:  # before the idle ones are closed
            with httpx.Client(timeout=5) as c:
                statuses.append(c.get(f"{server.base}/health").status_code)
            if statuses[-1] == 503:
                break
            time.sleep(0.05)
        assert 503 in statuses, f"{MAX_CONNECTIONS} connections open, /health still got {statuses}"
        results = read_all(socks, start + HEADER_TIMEOUT_S + 4)  # the header deadline frees them
        assert all(closed is not None for _, closed in results.values())
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{server.base}/health").status_code == 200
            server.predict(client)
    finally:
        for s in socks:
            s.close()


@pytest.mark.full
def test_memory_stays_bounded(server):
    """Last in the module: after every attack above, the server's memory is about what it was."""
    rss = server.rss()
    print(f"server RSS {server.rss_start / 1e6:.0f} MB at start, {rss / 1e6:.0f} MB after the attacks")
    assert rss - server.rss_start < 300e6, f"RSS grew from {server.rss_start / 1e6:.0f} to {rss / 1e6:.0f} MB"
    assert server.proc.poll() is None, server.log_tail()
