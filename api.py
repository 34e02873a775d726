"""HTTP inference server: FastAPI app serving the checkpoint written by train.py, with micro-batching.

Run with `python api.py` or `uvicorn api:app`; settings come from CATER_* environment variables
(serve_config.ServeConfig). Request path: the gate (middleware.py: API key, readiness, admission; before the body is
read) -> bytes -> PIL (upload.py: format, size and decode checks) -> transforms.pil_to_uint8 -> batcher.py's queue
-> one forward pass per batch in a worker thread (predictor.py: PyTorch or ONNX Runtime, softmax) -> top-k JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from PIL import Image
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator
from uvicorn.config import STARTUP_FAILURE

from batcher import MicroBatcher, Overloaded, WorkerDown
from calibration import temperature_for
from checkpoint import CheckpointError
from config import ConfigError
from explain import overlay, peak, png_base64
from middleware import (AUTH_MESSAGE, BodyLimitMiddleware, GateMiddleware, Metrics, MetricsMiddleware,
                        SecurityHeadersMiddleware, StartupErrorMiddleware, key_matches)
from loading import load_model
from predictor import ONNX_SUFFIX, OnnxPredictor, TorchPredictor
from registry import RegistryError
from runtime import available_cores
from serve_config import MAX_BATCH_IMAGES, MAX_DEFAULT_WORKERS, ServeConfig
from supervisor import Supervisor, Watchdog, exit_now, supervisor_pid
from upload import UploadError, check_request_pixels, decode_upload, open_upload, preprocess_upload, upload_bytes

log = logging.getLogger("uvicorn.error")

MAX_TOP_K = 1000
EXPLAIN_COST = 4  # images' worth of inference one /explain takes, for admission
# A request's one image is opened and decoded on the event loop when that costs less than a trip to a decode thread
# and back (a 32 x 32 PNG: ~0.1 ms) and its size bounds the work: a PNG (its pixels are decoded in C; a JPEG's scans,
# however many, and a BMP's RLE, in Python, are not bounded by the pixel count) of few bytes (few chunks to parse) and
# pixels, without a chunk Pillow inflates as it opens the file (compressed text or an ICC profile: up to 64 MB out of
# 64 KiB). Any other image goes to the decode threads.
INLINE_BYTES = 16 * 1024  # of the upload as sent: base64 text, or the file
INLINE_PIXELS = 128 * 128
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INFLATED_PNG_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")
MAX_CLASSES = 100_000  # a bound for class_index in the schema; the served model's own count is checked per request
MAX_ERRORS = 5  # validation errors listed in a 422
UI = Path(__file__).resolve().parent / "ui"  # the prediction page (GET /) and its files, served as they are
# A 2x2 PNG, so the OpenAPI examples can be sent as they are.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="


# ---------------------------------------------------------------------------------------------------------------
# Request and response bodies


class StrictBody(BaseModel):
    """A request body whose unknown keys are refused with one error (extra="forbid" alone makes one per key: a body
    of half a million keys would keep the event loop busy for seconds building them)."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def no_unknown_keys(cls, data):
        if isinstance(data, dict):
            unknown = [key for key in itertools.islice(data, 1000) if key not in cls.model_fields]
            if unknown or len(data) > len(cls.model_fields):
                names = ", ".join(repr(str(key)[:40]) for key in unknown[:3]) or "too many"
                raise ValueError(f"unknown field(s): {names}; the fields are {', '.join(cls.model_fields)}")
        return data


class PredictRequest(StrictBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image_base64": EXAMPLE_PNG, "top_k": 3}]})

    image_base64: str = Field(min_length=1, description="the image file (PNG, JPEG, BMP, GIF or WebP), base64-encoded; "
                                                        "a data:image/...;base64, prefix is accepted")
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K,
                              description="how many classes to return (default: the server's CATER_TOP_K)")


class BatchRequest(StrictBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [EXAMPLE_PNG, EXAMPLE_PNG], "top_k": 2}]})

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=MAX_BATCH_IMAGES,  # checked before the items: a long list costs one error, not one each
        description="base64-encoded image files (as image_base64 in /predict); at most CATER_MAX_BATCH_IMAGES")
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)


class ClassScore(BaseModel):
    class_index: int
    class_name: str
    confidence: float = Field(description="probability, calibrated on validation (softmax of logits / temperature)")


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "class_index": 5, "class_name": "dog", "confidence": 0.45, "review": False, "tta": 0,
        "top_k": [{"class_index": 5, "class_name": "dog", "confidence": 0.45},
                  {"class_index": 3, "class_name": "cat", "confidence": 0.31},
                  {"class_index": 2, "class_name": "bird", "confidence": 0.08}]}]})

    class_index: int
    class_name: str
    confidence: float
    review: bool = Field(description="true when confidence is below CATER_REVIEW_BELOW: send it to a person")
    top_k: list[ClassScore]
    tta: int = Field(description="test-time augmentation level used (0 = off)")


class ExplainRequest(PredictRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image_base64": EXAMPLE_PNG, "top_k": 3}]})

    class_index: int | None = Field(default=None, ge=0, le=MAX_CLASSES,
                                    description="the class to explain (default: the predicted one)")


class ExplainResponse(PredictResponse):
    explained_class_index: int = Field(description="the class whose evidence the heat map shows")
    explained_class_name: str
    heatmap_png: str = Field(description="base64 PNG: the image as the model saw it (its input size, squared as "
                                         "the model's resize says, drawn at least 224 px) with the heat map over it")
    peak_x: float = Field(description="where the heat is highest, as a fraction of the image's width (0 = left)")
    peak_y: float = Field(description="... and of its height (0 = top)")
    method: str = Field(description="how the map was made: Grad-CAM on the layer named")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "the data is not an image: send a PNG, JPEG, "
                                                                         "BMP, GIF or WebP file"}]})

    detail: str


class HealthResponse(BaseModel):
    status: str = "ok"
    model_loaded: bool


class ReadyResponse(BaseModel):
    status: str = Field(description="ready, or starting (with HTTP 503)")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    checkpoint: str
    mlflow_run_id: str | None
    classes: list[str]
    image_size: int
    channels: int
    resize: str
    temperature: float = Field(description="calibration at the served TTA level: probabilities = softmax(logits / it)")
    mean: list[float]
    std: list[float]
    model_config_: dict[str, Any] = Field(alias="model_config", serialization_alias="model_config")
    metrics: dict[str, float]
    registered_model: str | None = Field(description="MLflow registered model, when served from models:/...")
    model_version: str | None = Field(description="its version")
    model_alias: str | None = Field(description="the alias it was resolved by (e.g. champion)")
    backend: str = Field(description="torch (a .pt checkpoint) or onnxruntime (an exported .onnx file)")
    device: str
    tta: int
    review_below: float
    max_batch_size: int
    max_wait_ms: float
    torch_threads: int


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid base64, empty or undecodable image"), (401, "missing or wrong API key (only when one is configured)"),
    (403, "reload from another machine without CATER_API_KEY set"),
    (408, "the request body did not arrive within CATER_BODY_TIMEOUT_S"),
    (409, "reload failed, or another reload is running: the served model stays; /explain: the served model is "
          "an ONNX file, which has no gradients to explain with"),
    (413, "body, image dimensions or image count over the limit"), (415, "image format not accepted"),
    (503, "not ready (starting, or inference down), or at capacity: retry after the Retry-After header's seconds"),
    (504, "no answer within CATER_TIMEOUT_S"))}
PREDICT_ERRORS = {code: answer for code, answer in ERRORS.items() if code not in (403, 409)}
EXPLAIN_ERRORS = {code: answer for code, answer in ERRORS.items() if code != 403}


# ---------------------------------------------------------------------------------------------------------------
# Preprocess -> predict -> postprocess


def postprocess(probs: torch.Tensor, classes: list[str], k: int, tta: int, review_below: float = 0.0) -> PredictResponse:
    values, indices = probs.topk(min(k, len(classes)))
    top = [ClassScore(class_index=i, class_name=classes[i], confidence=v) for v, i in zip(values.tolist(), indices.tolist())]
    return PredictResponse(class_index=top[0].class_index, class_name=top[0].class_name, confidence=top[0].confidence,
                           review=top[0].confidence < review_below, top_k=top, tta=tta)


# ---------------------------------------------------------------------------------------------------------------
# Middleware, metrics, auth


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when CATER_API_KEY is set")
bearer = HTTPBearer(auto_error=False, description="alternative to X-API-Key: Authorization: Bearer <key>")


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)] = None,
                          token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    expected = request.app.state.config.api_key
    if not expected:
        return
    given = key or (token.credentials if token else "")
    if not key_matches(given, expected):  # GateMiddleware refused it already; kept here for the OpenAPI security
        raise HTTPException(401, AUTH_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------------------------------------------------
# The app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "testclient", a Unix socket's empty host
        return False


@dataclass(frozen=True)
class Served:
    """The model being served and what goes with it; replaced whole by /reload."""

    predictor: TorchPredictor | OnnxPredictor
    info: ModelInfo

    @property
    def meta(self) -> dict:
        return self.predictor.meta

    @property
    def labels(self) -> dict[str, str]:
        """Of the Prometheus cater_model info metric."""
        info = self.info
        return {"checkpoint": info.checkpoint, "mlflow_run_id": info.mlflow_run_id or "",
                "registered_model": info.registered_model or "", "model_version": info.model_version or "",
                "arch": str(info.model_config_.get("arch", "")), "classes": str(len(info.classes)),
                "image_size": str(info.image_size), "backend": info.backend, "device": info.device, "tta": str(info.tta)}

    def describe(self) -> str:
        """The registered model and version, or the file's name (not its folder: answers go to clients)."""
        version = f" version {self.info.model_version}" if self.info.model_version else ""
        return f"{self.info.registered_model or Path(self.info.checkpoint).name}{version}"


def load_served(cfg: ServeConfig, threads: int) -> Served:
    """Load, warm up batch sizes 1, 2, 4 ... max and describe the model; blocking (run it in a thread)."""
    start = time.perf_counter()
    predictor, registered = load_model(cfg.model_path, cfg.device, threads, "CATER_DEVICE")
    meta, device = predictor.meta, predictor.device
    max_batch = cfg.max_batch_size or (128 if device.type == "cuda" else 32)
    blank = torch.zeros(meta["channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)
    for n in dict.fromkeys([2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch] + [max_batch]):
        predictor.probabilities(blank.expand(n, -1, -1, -1), cfg.tta)
    preprocess_upload(base64.b64decode(EXAMPLE_PNG), meta, cfg.max_pixels)
    info = ModelInfo(
        checkpoint=str(cfg.model_path), mlflow_run_id=meta.get("mlflow_run_id"), classes=meta["classes"],
        image_size=meta["image_size"], channels=meta["channels"], resize=meta["resize"],
        temperature=temperature_for(meta, cfg.tta), mean=meta["mean"],
        std=meta["std"], model_config=meta["model_config"], metrics=meta.get("metrics", {}),
        registered_model=registered.get("registered_model"), model_version=registered.get("model_version"),
        model_alias=registered.get("model_alias"), backend=predictor.backend, device=str(device), tta=cfg.tta,
        review_below=cfg.review_below, max_batch_size=max_batch, max_wait_ms=cfg.max_wait_ms, torch_threads=threads)
    log.info("loaded %s (%s, %d classes) on %s, %d torch threads, batches up to %d, in %.0f ms",
             cfg.model_path + (f" = version {info.model_version}" if info.model_version else ""),
             meta["model_config"].get("arch"), len(meta["classes"]), device, threads, max_batch,
             (time.perf_counter() - start) * 1000)
    return Served(predictor, info)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load the model once and warm it up, serve; on shutdown finish queued work."""
    cfg: ServeConfig = app.state.config
    # The event loop (HTTP, JSON, decoding) needs a core of its own; the forward pass gets the others.
    cores = available_cores()
    cores = max(1, cores // process_count())  # several server processes share the cores
    threads = cfg.threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    try:
        served = await asyncio.to_thread(load_served, cfg, threads)
    except (CheckpointError, ConfigError, RegistryError) as e:
        app.state.startup_error = str(e)
        if supervisor_pid():  # one of several: exit now, as the supervisor's pings would wait out a slow exit
            exit_now(STARTUP_FAILURE, f"cannot start: {e}")
        log.error("cannot start: %s", e)
        raise
    metrics: Metrics = app.state.metrics

    def run_batch(items: list[tuple[Any, Any]]) -> list:
        """(predictor, image) pairs -> one probability row each; (("explain", predictor), (image, class)) pairs ->
        one Grad-CAM heat map each. During a reload a batch may hold both models."""
        start, rows = time.perf_counter(), []
        for key, group in itertools.groupby(items, key=lambda item: item[0]):
            inputs = [x for _, x in group]
            if isinstance(key, tuple):  # a failed explanation is its requests' answer, not the whole batch's
                try:
                    rows += list(key[1].explainer.heat(torch.stack([x for x, _ in inputs]), [c for _, c in inputs]))
                except Exception as e:
                    rows += [e] * len(inputs)
            else:
                rows += list(key.probabilities(torch.stack(inputs), cfg.tta))
        metrics.inference.observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(items))
        return rows

    app.state.served, app.state.threads, app.state.reload_lock = served, threads, asyncio.Lock()
    metrics.serving(served.labels)
    app.state.batcher = MicroBatcher(run_batch, served.info.max_batch_size, cfg.max_wait_ms,
                                     queue_budget_ms=cfg.queue_budget_ms, max_queue=cfg.max_queue, stall_s=cfg.timeout_s)
    # Decoding off the event loop, one thread per core: more threads only queue for the GIL and add memory.
    app.state.decode_pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="decode")
    # Everything alive now (torch, FastAPI, the model) lives as long as the server: keep it out of the cyclic GC,
    # whose full passes over it stalled every in-flight request for ~100 ms on a 2-core machine.
    gc.freeze()
    drain_on_sigterm(app, cfg.drain_s)
    # One of several processes: uvicorn's supervisor replaces it if it dies, but its pings are answered by a thread
    # of their own, so a hung event loop or forward pass must make it exit.
    watchdog = Watchdog(app.state.batcher.problem) if supervisor_pid() else None
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        finished = await app.state.batcher.close()
        if watchdog:
            watchdog.stop()
            if not finished:  # its thread would keep this process from exiting, and its supervisor waiting for it
                watchdog.on_hung("a forward pass still hangs as it stops")
        app.state.decode_pool.shutdown()
        metrics.close()


def drain_on_sigterm(app: FastAPI, drain_s: float) -> None:
    """On SIGTERM, /ready answers 503 at once, so a load balancer stops sending; requests are still served for
    drain_s seconds, then the server's own handler (uvicorn's) stops accepting and finishes what is in flight."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return  # not under a server that handles SIGTERM itself (the tests' in-process client)
    loop = asyncio.get_running_loop()

    def on_sigterm(signum, frame):
        if drain_s <= 0 or app.state.draining:  # no drain, or a second SIGTERM: stop now
            app.state.draining = True
            return previous(signum, frame)
        app.state.draining = True
        log.info("SIGTERM: /ready answers 503; serving %g s more, then shutting down", drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, previous, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


# ---------------------------------------------------------------------------------------------------------------
# Routes: each reads the settings, the served model, the batcher and the metrics from request.app.state; add_routes
# gives them their paths


async def ready_state(request: Request) -> Request:
    if not request.app.state.ready:
        raise HTTPException(503, "the model is not loaded yet")
    return request


def label(i: int, n: int) -> str:
    return f"images[{i}]: " if n > 1 else ""


def open_all(data_list: list, decode: Callable[[Any], bytes], config: ServeConfig) -> list[Image.Image]:
    """Every image of a request opened and checked from its header, and the request's pixels summed: no pixel is
    decoded yet, so a request refused here cost next to nothing."""
    opened = []
    for i, data in enumerate(data_list):
        try:
            opened.append(open_upload(decode(data), config.max_pixels))
        except UploadError as e:
            raise HTTPException(e.status, f"{label(i, len(data_list))}{e}") from None
    try:
        check_request_pixels(opened, config.max_request_pixels)
    except UploadError as e:
        raise HTTPException(e.status, str(e)) from None
    return opened


def as_is(data: bytes) -> bytes:
    return data


def decoded(data: Any, decode: Callable[[Any], bytes]) -> bytes:
    """One upload's file (decode: base64 or as_is), a 400 if it cannot be had."""
    try:
        return decode(data)
    except UploadError as e:
        raise HTTPException(e.status, str(e)) from None


def cheap_to_open(data: bytes) -> bool:
    """Whether a small file is a PNG that Pillow can open without inflating anything (see INLINE_BYTES)."""
    return data.startswith(PNG_SIGNATURE) and not any(chunk in data for chunk in INFLATED_PNG_CHUNKS)


def decode_all(opened: list[Image.Image], meta: dict, stop: threading.Event) -> list[torch.Tensor]:
    """The opened images decoded and preprocessed, one by one until `stop` is set (the request's time is up)."""
    out = []
    for i, image in enumerate(opened):
        if stop.is_set():
            raise TimeoutError
        try:
            out.append(decode_upload(image, meta))
        except UploadError as e:
            raise HTTPException(e.status, f"{label(i, len(opened))}{e}") from None
    return out


async def classify(request: Request, data_list: list, k: int | None, decode: Callable[[Any], bytes],
                   explain: int | None | bool = False) -> list[PredictResponse] | list[ExplainResponse]:
    """The answers for a request's images, within its deadline; explain (a class index, or None for the predicted
    class) adds a Grad-CAM heat map to each answer, computed in the inference thread after the prediction."""
    state = request.app.state
    config: ServeConfig = state.config
    served: Served = state.served  # this request stays with this model, even if /reload swaps in another
    meta, classes = served.meta, served.meta["classes"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.timeout_s
    inline = explain is False and len(data_list) == 1 and len(data_list[0]) <= INLINE_BYTES
    if inline:  # see INLINE_BYTES: the file itself is had here (for so few bytes, cheaper than a thread's trip)
        data_list, decode = [decoded(data_list[0], decode)], as_is
        inline = cheap_to_open(data_list[0])
    opened = (open_all(data_list, decode, config) if inline
              else await loop.run_in_executor(state.decode_pool, open_all, data_list, decode, config))
    inline = inline and opened[0].width * opened[0].height <= INLINE_PIXELS

    batcher: MicroBatcher = state.batcher
    # GateMiddleware admitted one image; a batch that passed the checks admits the rest here, and an explanation
    # (a prediction, then a forward and backward pass of the eager model) counts as EXPLAIN_COST images
    extra = len(opened) - 1 + (EXPLAIN_COST - 1) * len(opened) * (explain is not False)
    if extra:
        try:
            batcher.admit(extra, held=1)
        except Overloaded as e:
            state.metrics.rejected.labels("overload").inc()
            raise HTTPException(503, str(e), headers=e.headers) from None
        except WorkerDown as e:
            raise HTTPException(503, f"inference is down: {e}") from None
    stop, answered, decoding = threading.Event(), False, None
    try:
        if inline:
            images = decode_all(opened, meta, stop)
        else:
            decoding = loop.run_in_executor(state.decode_pool, decode_all, opened, meta, stop)
        async with asyncio.timeout_at(deadline):
            if decoding is not None:
                images = await asyncio.shield(decoding)
            probs = await asyncio.gather(*(batcher.submit((served.predictor, x)) for x in images))
            if explain is not False:
                targets = [int(p.argmax()) if explain is None else explain for p in probs]
                heats = await asyncio.gather(*(batcher.submit((("explain", served.predictor), (x, c)))
                                               for x, c in zip(images, targets)))
                failed = next((h for h in heats if isinstance(h, Exception)), None)
                if isinstance(failed, torch.OutOfMemoryError):
                    raise HTTPException(503, "out of memory while explaining: retry later", {"Retry-After": "5"})
                if failed is not None:  # a network Grad-CAM cannot follow (no spatial layer...)
                    log.warning("cannot explain with %s: %r", served.describe(), failed)
                    raise HTTPException(409, f"this model cannot be explained: {str(failed)[:200]}")
        answered = True
    except TimeoutError:
        # A thread cannot be killed: tell it to stop, and keep the request's queue places until it has (one
        # image's decode at most, bounded by the pixel limits), so admission never counts work that still runs.
        stop.set()
        if decoding is not None:
            with contextlib.suppress(Exception):
                await decoding
        raise HTTPException(504, f"no answer within {config.timeout_s:g} s (CATER_TIMEOUT_S)") from None
    except WorkerDown as e:
        raise HTTPException(503, f"inference is down: {e}") from None
    finally:
        batcher.release(extra, ok=answered)
    answers = [postprocess(p, classes, k or config.top_k, config.tta, config.review_below) for p in probs]
    if explain is False:
        return answers
    layer = served.predictor.explainer.layer_name
    return [ExplainResponse(**answer.model_dump(), explained_class_index=c, explained_class_name=classes[c],
                            heatmap_png=png, peak_x=x, peak_y=y, method=f"grad-cam on {layer}")
            for answer, c, (png, x, y) in zip(answers, targets, await loop.run_in_executor(
                state.decode_pool, drawn, images, heats))]


def drawn(images: list[torch.Tensor], heats: list) -> list[tuple[str, float, float]]:
    """(overlay PNG as base64, peak x, peak y) of each image's heat map."""
    return [(png_base64(overlay(x, heat)), *peak(heat)) for x, heat in zip(images, heats)]


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in FastAPI's shape, bounded: the first few errors, short messages, and never the input echoed back (it
    can be megabytes of base64, or what a client should not see again)."""
    errors = [{"loc": list(e.get("loc", ()))[:5], "msg": str(e.get("msg", ""))[:200], "type": str(e.get("type", ""))}
              for e in itertools.islice(exc.errors(), MAX_ERRORS)]
    return JSONResponse({"detail": errors}, status_code=422)


async def health(request: Request):
    """Liveness: the process answers, and its inference has not stopped or hung (503 then: restart it)."""
    state = request.app.state
    problem = state.batcher.problem() if state.ready else ""
    if problem:
        return JSONResponse({"status": f"inference is down: {problem}", "model_loaded": True}, status_code=503)
    return HealthResponse(model_loaded=state.ready)


async def ready(request: Request):
    """Readiness: the model is loaded and warmed up (503 until then)."""
    state = request.app.state
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining: shutting down"}, status_code=503)
    problem = state.batcher.problem()
    if problem:
        return JSONResponse({"status": f"inference is down: {problem}"}, status_code=503)
    return ReadyResponse(status="ready")


async def model_info(request: Request = Depends(ready_state)):
    """The served model: classes, model config, metrics, MLflow run id and registry version, serving settings."""
    return request.app.state.served.info


async def reload(request: Request = Depends(ready_state)):
    """Load CATER_MODEL_PATH again (for models:/<name>@champion: the current champion) and swap it in. Requests in
    flight finish on the model they started with; a load that fails keeps the served model (409; why is in the
    server's log, since the error can name paths or a tracking URI with its credentials). One reload at a time: a
    second one meanwhile gets 409 at once. Without CATER_API_KEY only this machine (loopback) may reload."""
    state = request.app.state
    client = request.client.host if request.client else ""
    if not state.config.api_key and not is_loopback(client):
        raise HTTPException(403, "reloading from another machine needs an API key: set CATER_API_KEY on the server")
    if state.reload_lock.locked():
        raise HTTPException(409, "a reload is already running: the served model stays until it ends")
    async with state.reload_lock:
        try:
            served = await asyncio.to_thread(load_served, state.config, state.threads)
        except Exception as e:  # whatever went wrong, the served model stays
            log.warning("reload failed, still serving %s: %s", state.served.describe(), e)
            raise HTTPException(409, f"reload failed, still serving {state.served.describe()}; the reason is in "
                                     "the server's log") from None
        log.info("reloaded: %s replaces %s", served.describe(), state.served.describe())
        state.served = served
        state.metrics.serving(served.labels)
        # the old model was frozen out of the cyclic GC at startup: let it go, and freeze the new one
        gc.unfreeze()
        await asyncio.to_thread(gc.collect)
        gc.freeze()
        if parent := supervisor_pid():  # the other processes still serve the old model: replace them all in turn
            log.info("asking the supervisor (pid %d) to replace all %d server processes with ones that load %s",
                     parent, process_count(), state.config.model_path)
            try:
                os.kill(parent, signal.SIGHUP)
            except OSError as e:  # it went away meanwhile: this process serves the new model, the answer stands
                log.warning("could not ask the supervisor to replace the server processes: %s", e)
    return served.info


async def predict(body: PredictRequest, request: Request):
    """Classify one base64-encoded image."""
    return (await classify(request, [body.image_base64], body.top_k, upload_bytes))[0]


async def predict_file(request: Request, file: Annotated[UploadFile, File(description="the image file")],
                       top_k: Annotated[int | None, Form(ge=1, le=MAX_TOP_K)] = None):
    """Classify one image sent as a multipart upload (curl -F file=@cat.png)."""
    data = await file.read()
    return (await classify(request, [data], top_k, as_is))[0]


async def explain(body: ExplainRequest, request: Request):
    """Classify one base64-encoded image and show why: a Grad-CAM heat map of the regions that raised the score of
    the predicted class (or of class_index), drawn over the image as the model saw it."""
    served: Served = request.app.state.served
    if served.predictor.backend != "torch":
        raise HTTPException(409, f"explanations need the PyTorch checkpoint: this server serves {served.describe()}, "
                                 "an ONNX file, which has no gradients to follow; serve the .pt it was exported from "
                                 "(CATER_MODEL_PATH=models/cnn.pt)")
    n = len(served.meta["classes"])
    if body.class_index is not None and body.class_index >= n:
        raise HTTPException(400, f"class_index {body.class_index}: the model has {n} classes (0 to {n - 1})")
    return (await classify(request, [body.image_base64], body.top_k, upload_bytes, explain=body.class_index))[0]


async def predict_batch(body: BatchRequest, request: Request):
    """Classify several base64-encoded images; the results come in the order of the images."""
    limit = request.app.state.config.max_batch_images
    if len(body.images) > limit:
        raise HTTPException(413, f"{len(body.images)} images in one request; the limit is {limit}")
    return await classify(request, body.images, body.top_k, upload_bytes)


async def page():
    """The prediction page: choose, drop or paste an image and see the top classes (ui/)."""
    return FileResponse(UI / "index.html")


async def metrics(request: Request):
    """Prometheus metrics: requests, latency, batch sizes, inference time, model info."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------------------------
# Wiring


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The app, without loading anything: the checkpoint is read when the server starts (lifespan)."""
    config = config or ServeConfig.from_env()
    # With a key, the interactive docs are off: swagger-ui's scripts come from a CDN, on the origin that holds the key.
    docs = {"docs_url": None, "redoc_url": None} if config.api_key else {}
    app = FastAPI(title="CIFAR-10 image classifier", version="1.0", lifespan=lifespan, **docs,
                  description="Classifies an image (any size or mode; PNG, JPEG, BMP, GIF or WebP) with the CNN "
                              "trained by train.py. Concurrent requests are batched into one forward pass.")
    app.state.config = config
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False
    app.state.startup_error = ""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(GateMiddleware, guarded={"/predict", "/predict/file", "/predict/batch", "/explain", "/reload"},
                       admitted={"/predict", "/predict/file", "/predict/batch", "/explain"})
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in config.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type", "X-API-Key", "Authorization"])
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(StartupErrorMiddleware)
    app.add_exception_handler(RequestValidationError, invalid_request)
    add_routes(app)
    return app


def add_routes(app: FastAPI) -> None:
    """Each handler on its path. Added to the app itself rather than through an APIRouter: this FastAPI keeps an
    included router as one lazy entry in app.routes, where MetricsMiddleware could no longer read the paths."""
    # GateMiddleware checks the key and readiness first; the dependencies document them in the OpenAPI schema (the
    # key only when one is set: its two security schemes were most of FastAPI's dependency solving, ~9 % of the event
    # loop's time at concurrency 32 in py-spy)
    keyed = [Depends(require_api_key)] if app.state.config.api_key else []
    predict_deps = keyed + [Depends(ready_state)]
    app.get("/health", response_model=HealthResponse, tags=["status"],
            responses={503: {"model": HealthResponse}})(health)
    app.get("/ready", response_model=ReadyResponse, tags=["status"], responses={503: {"model": ReadyResponse}})(ready)
    app.get("/model", response_model=ModelInfo, response_model_by_alias=True, tags=["status"],
            responses={503: ERRORS[503]})(model_info)
    app.post("/reload", response_model=ModelInfo, response_model_by_alias=True, tags=["status"],
             dependencies=keyed,
             responses={401: ERRORS[401], 403: ERRORS[403], 409: ERRORS[409], 503: ERRORS[503]})(reload)
    app.post("/predict", response_model=PredictResponse, tags=["predict"], dependencies=predict_deps,
             responses=PREDICT_ERRORS)(predict)
    app.post("/predict/file", response_model=PredictResponse, tags=["predict"], dependencies=predict_deps,
             responses=PREDICT_ERRORS)(predict_file)
    app.post("/predict/batch", response_model=list[PredictResponse], tags=["predict"], dependencies=predict_deps,
             responses=PREDICT_ERRORS)(predict_batch)
    app.post("/explain", response_model=ExplainResponse, tags=["predict"], dependencies=predict_deps,
             responses=EXPLAIN_ERRORS)(explain)
    app.get("/", include_in_schema=False)(page)
    app.mount("/ui", StaticFiles(directory=UI), name="ui")
    app.get("/metrics", tags=["status"], response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"}})(metrics)


def process_count() -> int:
    """Server processes started together: WEB_CONCURRENCY, which main() sets (uvicorn --workers reads it too)."""
    count = os.environ.get("WEB_CONCURRENCY", "1")
    return int(count) if count.isdigit() and int(count) > 0 else 1


def server_processes(config: ServeConfig) -> int:
    """CATER_WORKERS, or by default one process per core on the CPU, at most MAX_DEFAULT_WORKERS (one process's
    event loop, HTTP, JSON and decoding, takes a core's worth of Python alone: on 2 cores two processes answered
    1.1-1.6x one's requests/s in three runs, docs/results.md), and one on a GPU (the device runs one forward pass
    at a time; an ONNX file runs on the CPU)."""
    if config.workers:
        return config.workers
    onnx = config.model_path.lower().endswith(ONNX_SUFFIX)
    gpu = not onnx and (config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()))
    return 1 if gpu else min(available_cores(), MAX_DEFAULT_WORKERS)


def main() -> int:
    """`python api.py` (make serve, the container): uvicorn with the request-header deadline (protocol.py) and the
    connection bound, in server_processes() processes adding up their metrics."""
    import uvicorn

    try:
        config = ServeConfig.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workers = server_processes(config)
    os.environ["WEB_CONCURRENCY"] = str(workers)  # each process's lifespan takes its share of the cores
    settings = dict(host=config.host, port=config.port, access_log=config.access_log,
                    http="protocol:HeaderDeadlineProtocol", limit_concurrency=config.max_connections)
    if workers == 1:
        uvicorn.run("api:app", **settings)  # exits with uvicorn's STARTUP_FAILURE if the model does not load
        return 0
    metrics_dir = None  # made here, removed at the end; one the caller set is theirs
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cater-metrics-")
    try:
        return Supervisor(uvicorn.Config("api:app", workers=workers, **settings)).serve()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

app = create_app()  # for `uvicorn api:app`: reads CATER_* settings, loads nothing until the server starts
