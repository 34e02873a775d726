"""HTTP inference server: FastAPI app serving the checkpoint written by train.py, with micro-batching.

Run with `python api.py` or `uvicorn api:app`; settings come from CATER_* environment variables (config.ServeConfig).
Request path: bytes -> PIL (format, size and decode checks) -> transforms.pil_to_uint8 -> MicroBatcher queue ->
one forward pass per batch in a worker thread (predictor.py: PyTorch or ONNX Runtime, softmax) -> top-k JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import io
import itertools
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, Security, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from checkpoint import CheckpointError
from decode import UPLOAD_FORMATS
from config import ConfigError, ServeConfig, available_cores, pick_device
from predictor import ONNX_SUFFIX, OnnxPredictor, TorchPredictor, load_predictor
from registry import RegistryError, fetch_checkpoint
from transforms import pil_to_uint8

log = logging.getLogger("uvicorn.error")

MAX_TOP_K = 1000
# A 2x2 PNG, so the OpenAPI examples can be sent as they are.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="


# ---------------------------------------------------------------------------------------------------------------
# Request and response bodies


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image_base64": EXAMPLE_PNG, "top_k": 3}]})

    image_base64: str = Field(min_length=1, description="the image file (PNG, JPEG, BMP, GIF or WebP), base64-encoded; "
                                                        "a data:image/...;base64, prefix is accepted")
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K,
                              description="how many classes to return (default: the server's CATER_TOP_K)")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [EXAMPLE_PNG, EXAMPLE_PNG], "top_k": 2}]})

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="base64-encoded image files (as image_base64 in /predict); at most CATER_MAX_BATCH_IMAGES")
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)


class ClassScore(BaseModel):
    class_index: int
    class_name: str
    confidence: float = Field(description="softmax probability")


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "class_index": 5, "class_name": "dog", "confidence": 0.45, "tta": 0,
        "top_k": [{"class_index": 5, "class_name": "dog", "confidence": 0.45},
                  {"class_index": 3, "class_name": "cat", "confidence": 0.31},
                  {"class_index": 2, "class_name": "bird", "confidence": 0.08}]}]})

    class_index: int
    class_name: str
    confidence: float
    top_k: list[ClassScore]
    tta: int = Field(description="test-time augmentation level used (0 = off)")


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
    max_batch_size: int
    max_wait_ms: float
    torch_threads: int


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid base64, empty or undecodable image"), (401, "missing or wrong API key (only when one is configured)"),
    (409, "reload failed: the served model stays"),
    (413, "body, image dimensions or image count over the limit"), (415, "image format not accepted"),
    (503, "model not loaded yet"))}


# ---------------------------------------------------------------------------------------------------------------
# Preprocess -> predict -> postprocess


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise HTTPException(400, "a data URL must be base64-encoded: data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "the image is not valid base64 (standard alphabet, with padding)") from None


def image_error(e: Exception, what: str) -> HTTPException:
    # PIL reports pixel bombs as DecompressionBombError and oversized PNG text chunks as "... too large" ValueErrors.
    if isinstance(e, Image.DecompressionBombError) or (isinstance(e, ValueError) and "too large" in str(e)):
        return HTTPException(413, f"image too large: {e}")
    return HTTPException(400, f"{what}: {e}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decoded PIL image, its format and pixel count checked from the header before any pixel data is decoded."""
    if not data:
        raise HTTPException(400, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise HTTPException(400, "the data is not an image: send a PNG, JPEG, BMP, GIF or WebP file") from None
    except Exception as e:  # a malformed header: PIL raises SyntaxError, ValueError, struct.error, ...
        raise image_error(e, "cannot read the image header") from None
    if image.format not in UPLOAD_FORMATS:
        raise HTTPException(415, f"image format {image.format} is not accepted: send PNG, JPEG, BMP, GIF or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise HTTPException(413, f"image too large: {width}x{height} is over the limit of {max_pixels} pixels")
    try:
        image.load()  # GIF and WebP: the first frame
    except Exception as e:  # truncated or corrupt pixel data
        raise image_error(e, f"cannot decode the {image.format} image") from None
    return image


def preprocess(data: bytes, meta: dict, max_pixels: int) -> torch.Tensor:
    """Image file bytes -> CxHxW uint8 tensor, by the shared evaluation pipeline (transforms.pil_to_uint8) with the
    checkpoint's size, channels and resize policy."""
    image = open_image(data, max_pixels)
    try:
        return pil_to_uint8(image, meta["image_size"], meta["channels"], meta["resize"])
    except Exception as e:  # broken EXIF or an unusual mode that cannot be converted
        raise HTTPException(400, f"cannot convert the image to RGB: {e}") from None


def postprocess(probs: torch.Tensor, classes: list[str], k: int, tta: int) -> PredictResponse:
    values, indices = probs.topk(min(k, len(classes)))
    top = [ClassScore(class_index=i, class_name=classes[i], confidence=v) for v, i in zip(values.tolist(), indices.tolist())]
    return PredictResponse(class_index=top[0].class_index, class_name=top[0].class_name,
                           confidence=top[0].confidence, top_k=top, tta=tta)


class MicroBatcher:
    """Gathers concurrent requests into batches and runs one forward pass at a time in a worker thread.

    While a batch runs, new requests queue up and form the next batch, so batches grow with load without
    any waiting at low load; max_wait_ms > 0 additionally waits that long for a fuller batch.
    """

    def __init__(self, run_batch: Callable[[list], torch.Tensor], max_batch_size: int, max_wait_ms: float):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, item) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self.queue.put_nowait(None)
        await self.worker
        self.executor.shutdown()

    async def _next_batch(self) -> tuple[list, bool]:
        """(items, closing): blocks for the first item, then takes what is queued, up to max_batch_size."""
        loop = asyncio.get_running_loop()
        first = await self.queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                item = self.queue.get_nowait()
            elif deadline > loop.time():
                try:
                    item = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
            else:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        closing = False
        while not closing:
            batch, closing = await self._next_batch()
            batch = [(item, future) for item, future in batch if not future.done()]  # drop cancelled requests
            if not batch:
                continue
            try:
                probs = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), row in zip(batch, probs):
                if not future.done():
                    future.set_result(row)


# ---------------------------------------------------------------------------------------------------------------
# Middleware, metrics, auth


class Metrics:
    """Prometheus collectors on a registry of their own, so several apps can live in one process (tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ms = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.requests = Counter("cater_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cater_http_request_duration_seconds", "time from request to response, by route",
                                 ["route"], buckets=ms, registry=self.registry)
        self.batch_size = Histogram("cater_batch_size", "images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.inference = Histogram("cater_inference_duration_seconds", "time of one batched forward pass",
                                   buckets=ms, registry=self.registry)
        self.model = Info("cater_model", "the served checkpoint", registry=self.registry)


class MetricsMiddleware:
    """Counts every response by route template (not raw path, so unknown URLs cannot blow up the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            if route is not None:
                route = route.path
            else:  # not routed: a 404, or a body refused before routing (413), counted under its path if it has one
                route = scope["path"] if scope["path"] in {r.path for r in scope["app"].routes} else "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 when the body is over max_bytes: up front from Content-Length, else as soon as the count passes it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)  # FastAPI's body parsing lets HTTPException through
            return event

        await self.app(scope, limited_receive, send)


class StartupErrorMiddleware:
    """A startup failure the log already explains (no or a bad checkpoint) is not repeated as a traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def quiet_send(message):
            if message["type"] == "lifespan.startup.failed" and scope["app"].state.startup_error:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, quiet_send)


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when CATER_API_KEY is set")
bearer = HTTPBearer(auto_error=False, description="alternative to X-API-Key: Authorization: Bearer <key>")


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)] = None,
                          token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    expected = request.app.state.config.api_key
    if not expected:
        return
    given = key or (token.credentials if token else "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key: send it as X-API-Key: <key> or Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------------------------------------------------
# The app


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
        version = f" version {self.info.model_version}" if self.info.model_version else ""
        return f"{self.info.registered_model or self.info.checkpoint}{version}"


def load_model(cfg: ServeConfig, threads: int) -> tuple[TorchPredictor | OnnxPredictor, dict]:
    """What CATER_MODEL_PATH names, loaded: a checkpoint, an ONNX file, or a registered model (models:/<name>@<alias>,
    fetched from MLFLOW_TRACKING_URI); returns (predictor, registry info, empty for files)."""
    if cfg.model_path.lower().endswith(ONNX_SUFFIX) and cfg.device.startswith("cuda"):
        raise ConfigError(f"CATER_DEVICE={cfg.device}: an ONNX model runs on the CPU (onnxruntime); "
                          "serve the .pt checkpoint for CUDA")
    device = pick_device(cfg.device, "CATER_DEVICE")
    if not cfg.model_path.startswith("models:/"):
        return load_predictor(cfg.model_path, device, threads), {}
    with tempfile.TemporaryDirectory(prefix="cater-model-") as tmp:  # the checkpoint is read whole: no need to keep it
        path, registered = fetch_checkpoint(cfg.model_path, tmp)
        return load_predictor(path, device, threads), registered


def load_served(cfg: ServeConfig, threads: int) -> Served:
    """Load, warm up batch sizes 1, 2, 4 ... max and describe the model; blocking (run it in a thread)."""
    start = time.perf_counter()
    predictor, registered = load_model(cfg, threads)
    meta, device = predictor.meta, predictor.device
    max_batch = cfg.max_batch_size or (128 if device.type == "cuda" else 32)
    blank = torch.zeros(meta["channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)
    for n in dict.fromkeys([2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch] + [max_batch]):
        predictor.probabilities(blank.expand(n, -1, -1, -1), cfg.tta)
    preprocess(base64.b64decode(EXAMPLE_PNG), meta, cfg.max_pixels)
    info = ModelInfo(
        checkpoint=str(cfg.model_path), mlflow_run_id=meta.get("mlflow_run_id"), classes=meta["classes"],
        image_size=meta["image_size"], channels=meta["channels"], resize=meta["resize"], mean=meta["mean"],
        std=meta["std"], model_config=meta["model_config"], metrics=meta.get("metrics", {}),
        registered_model=registered.get("registered_model"), model_version=registered.get("model_version"),
        model_alias=registered.get("model_alias"), backend=predictor.backend, device=str(device), tta=cfg.tta,
        max_batch_size=max_batch, max_wait_ms=cfg.max_wait_ms, torch_threads=threads)
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
    threads = cfg.threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    try:
        served = await asyncio.to_thread(load_served, cfg, threads)
    except (CheckpointError, ConfigError, RegistryError) as e:
        app.state.startup_error = str(e)
        log.error("cannot start: %s", e)
        raise
    metrics: Metrics = app.state.metrics

    def run_batch(items: list[tuple[Any, torch.Tensor]]) -> list[torch.Tensor]:
        """(predictor, image) pairs -> one probability row each; during a reload a batch may hold both models."""
        start, rows = time.perf_counter(), []
        for predictor, group in itertools.groupby(items, key=lambda item: item[0]):
            rows += list(predictor.probabilities(torch.stack([x for _, x in group]), cfg.tta))
        metrics.inference.observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(items))
        return rows

    app.state.served, app.state.threads, app.state.reload_lock = served, threads, asyncio.Lock()
    metrics.model.info(served.labels)
    app.state.batcher = MicroBatcher(run_batch, served.info.max_batch_size, cfg.max_wait_ms)
    # Decoding off the event loop, one thread per core: more threads only queue for the GIL and add memory.
    app.state.decode_pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="decode")
    # Everything alive now (torch, FastAPI, the model) lives as long as the server: keep it out of the cyclic GC,
    # whose full passes over it stalled every in-flight request for ~100 ms on a 2-core machine.
    gc.freeze()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        await app.state.batcher.close()
        app.state.decode_pool.shutdown()


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The app, without loading anything: the checkpoint is read when the server starts (lifespan)."""
    config = config or ServeConfig.from_env()
    app = FastAPI(title="CIFAR-10 image classifier", version="1.0", lifespan=lifespan,
                  description="Classifies an image (any size or mode; PNG, JPEG, BMP, GIF or WebP) with the CNN "
                              "trained by train.py. Concurrent requests are batched into one forward pass.")
    app.state.config = config
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.startup_error = ""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in config.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type", "X-API-Key", "Authorization"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(StartupErrorMiddleware)

    async def ready_state(request: Request) -> Request:
        if not request.app.state.ready:
            raise HTTPException(503, "the model is not loaded yet")
        return request

    async def classify(request: Request, data_list: list, k: int | None, decode: Callable[[Any], bytes]) -> list[PredictResponse]:
        state = request.app.state
        served: Served = state.served  # this request stays with this model, even if /reload swaps in another
        meta, classes = served.meta, served.meta["classes"]

        def prepare_all() -> list[torch.Tensor]:
            out = []
            for i, data in enumerate(data_list):
                try:
                    out.append(preprocess(decode(data), meta, config.max_pixels))
                except HTTPException as e:
                    if len(data_list) > 1:
                        e.detail = f"images[{i}]: {e.detail}"
                    raise
            return out

        images = await asyncio.get_running_loop().run_in_executor(state.decode_pool, prepare_all)
        probs = await asyncio.gather(*(state.batcher.submit((served.predictor, x)) for x in images))
        return [postprocess(p, classes, k or config.top_k, config.tta) for p in probs]

    predict_deps = [Depends(require_api_key), Depends(ready_state)]

    @app.get("/health", response_model=HealthResponse, tags=["status"])
    async def health(request: Request):
        """Liveness: the process answers."""
        return HealthResponse(model_loaded=request.app.state.ready)

    @app.get("/ready", response_model=ReadyResponse, tags=["status"], responses={503: {"model": ReadyResponse}})
    async def ready(request: Request):
        """Readiness: the model is loaded and warmed up (503 until then)."""
        if not request.app.state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return ReadyResponse(status="ready")

    @app.get("/model", response_model=ModelInfo, response_model_by_alias=True, tags=["status"],
             responses={503: ERRORS[503]})
    async def model_info(request: Request = Depends(ready_state)):
        """The served model: classes, model config, metrics, MLflow run id and registry version, serving settings."""
        return request.app.state.served.info

    @app.post("/reload", response_model=ModelInfo, response_model_by_alias=True, tags=["status"],
              dependencies=[Depends(require_api_key)], responses={401: ERRORS[401], 409: ERRORS[409], 503: ERRORS[503]})
    async def reload(request: Request = Depends(ready_state)):
        """Load CATER_MODEL_PATH again (for models:/<name>@champion: the current champion) and swap it in. Requests in
        flight finish on the model they started with; a load that fails keeps the served model (409, with why)."""
        state = request.app.state
        async with state.reload_lock:
            try:
                served = await asyncio.to_thread(load_served, config, state.threads)
            except Exception as e:  # whatever went wrong, the served model stays
                log.warning("reload failed, still serving %s: %s", state.served.describe(), e)
                raise HTTPException(409, f"reload failed, still serving {state.served.describe()}: {e}") from None
            log.info("reloaded: %s replaces %s", served.describe(), state.served.describe())
            state.served = served
            state.metrics.model.info(served.labels)
            # the old model was frozen out of the cyclic GC at startup: let it go, and freeze the new one
            gc.unfreeze()
            await asyncio.to_thread(gc.collect)
            gc.freeze()
        return served.info

    @app.post("/predict", response_model=PredictResponse, tags=["predict"], dependencies=predict_deps, responses=ERRORS)
    async def predict(body: PredictRequest, request: Request):
        """Classify one base64-encoded image."""
        return (await classify(request, [body.image_base64], body.top_k, decode_base64))[0]

    @app.post("/predict/file", response_model=PredictResponse, tags=["predict"], dependencies=predict_deps,
              responses=ERRORS)
    async def predict_file(request: Request, file: Annotated[UploadFile, File(description="the image file")],
                           top_k: Annotated[int | None, Form(ge=1, le=MAX_TOP_K)] = None):
        """Classify one image sent as a multipart upload (curl -F file=@cat.png)."""
        data = await file.read()
        return (await classify(request, [data], top_k, lambda b: b))[0]

    @app.post("/predict/batch", response_model=list[PredictResponse], tags=["predict"], dependencies=predict_deps,
              responses=ERRORS)
    async def predict_batch(body: BatchRequest, request: Request):
        """Classify several base64-encoded images; the results come in the order of the images."""
        if len(body.images) > config.max_batch_images:
            raise HTTPException(413, f"{len(body.images)} images in one request; the limit is {config.max_batch_images}")
        return await classify(request, body.images, body.top_k, decode_base64)

    @app.get("/metrics", tags=["status"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"}})
    async def metrics(request: Request):
        """Prometheus metrics: requests, latency, batch sizes, inference time, model info."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> int:
    import uvicorn

    try:
        config = ServeConfig.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(config), host=config.host, port=config.port, access_log=config.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

app = create_app()  # for `uvicorn api:app`: reads CATER_* settings, loads nothing until the server starts
