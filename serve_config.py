"""The server's settings (api.py, and the peers it is benchmarked against), read from CATER_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import get_type_hints

from config import ConfigError, check


MAX_BATCH_IMAGES = 1024  # the schema's cap on a batch request's list, whatever CATER_MAX_BATCH_IMAGES says
MAX_DEFAULT_WORKERS = 4  # CATER_WORKERS=0 starts one process per core up to this many: each holds its own model


@dataclass(frozen=True)
class ServeConfig:
    """Serving settings (api.py), read from the environment by from_env(): each field F from CATER_<F>, e.g. CATER_PORT."""

    model_path: str = "models/cnn.pt"  # checkpoint written by train.py
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    tta: int = 0  # test-time augmentation level at serving: 0 off, 1 flip, 2 flip + shifts (see transforms.tta_views)
    top_k: int = 3  # classes returned when the request does not say
    review_below: float = 0.0  # an answer whose confidence is below this says "review": true (0 = never)
    max_batch_size: int = 0  # images per forward pass; 0 = device default (CPU 32, CUDA 128)
    max_wait_ms: float = 0.0  # extra wait for a fuller batch; 0 = take what is queued (batches still form under load)
    max_body_bytes: int = 4 * 1024 * 1024  # request body limit, enforced while reading (413 above it)
    max_pixels: int = 16_000_000  # width x height of one image, checked from its header before decoding (413 above it)
    max_request_pixels: int = 32_000_000  # the same summed over one request's images: bounds the decoding a request costs
    max_batch_images: int = 64  # images per /predict/batch request
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this (else 408, connection closed)
    body_timeout_s: float = 30.0  # and then the body (else 408); a request takes a queue place only once it has arrived
    max_connections: int = 1000  # connections and requests at once (uvicorn's limit_concurrency): 503 above it
    workers: int = 0  # server processes (python api.py), sharing the cores and adding up their metrics; 0 = one per core
    # on the CPU (at most MAX_DEFAULT_WORKERS), one on a GPU
    queue_budget_ms: float = 2000.0  # admit work only while the measured throughput answers it within this; else 503
    max_queue: int = 4096  # images admitted at once, at most (memory bound whatever the throughput)
    timeout_s: float = 30.0  # a request not answered by then gets 504; a forward pass running longer marks the server down
    drain_s: float = 0.0  # after SIGTERM: /ready answers 503 and requests are still served this long, then shutdown
    api_key: str = ""  # when set, the predict routes need X-API-Key: <key> or Authorization: Bearer <key>
    cors_origins: str = ""  # comma-separated allowed origins; empty = no CORS headers
    threads: int = 0  # torch CPU threads; 0 = one per core minus one for the event loop (at least 1)
    access_log: bool = False  # uvicorn's per-request log line (Prometheus /metrics counts requests either way)

    def __post_init__(self):
        check(bool(self.model_path), "CATER_MODEL_PATH must name a file")
        check(0 <= self.port <= 65535, "CATER_PORT must be in [0, 65535]")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "CATER_DEVICE must be auto, cpu, cuda or cuda:N")
        check(self.tta in (0, 1, 2), "CATER_TTA must be 0, 1 or 2")
        check(self.top_k >= 1, "CATER_TOP_K must be >= 1")
        check(0.0 <= self.review_below <= 1.0, "CATER_REVIEW_BELOW must be in [0, 1]")
        check(self.max_batch_size >= 0, "CATER_MAX_BATCH_SIZE must be >= 0")
        check(self.max_wait_ms >= 0, "CATER_MAX_WAIT_MS must be >= 0")
        check(self.max_body_bytes >= 1024, "CATER_MAX_BODY_BYTES must be >= 1024")
        check(self.max_pixels >= 1, "CATER_MAX_PIXELS must be >= 1")
        check(self.max_request_pixels >= self.max_pixels, "CATER_MAX_REQUEST_PIXELS must be >= CATER_MAX_PIXELS")
        check(1 <= self.max_batch_images <= MAX_BATCH_IMAGES, f"CATER_MAX_BATCH_IMAGES must be in [1, {MAX_BATCH_IMAGES}]")
        check(self.header_timeout_s > 0 and self.body_timeout_s > 0, "CATER_HEADER_TIMEOUT_S and CATER_BODY_TIMEOUT_S must be > 0")
        check(self.max_connections >= 1, "CATER_MAX_CONNECTIONS must be >= 1")
        check(self.workers >= 0, "CATER_WORKERS must be >= 0 (0: one per core)")
        check(self.threads >= 0, "CATER_THREADS must be >= 0")
        check(self.queue_budget_ms > 0, "CATER_QUEUE_BUDGET_MS must be > 0")
        check(self.max_queue >= 1, "CATER_MAX_QUEUE must be >= 1")
        check(self.timeout_s > 0, "CATER_TIMEOUT_S must be > 0")
        check(self.drain_s >= 0, "CATER_DRAIN_S must be >= 0")

    @classmethod
    def from_env(cls, env=None) -> "ServeConfig":
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            name = "CATER_" + f.name.upper()
            raw = env.get(name)
            if raw is None:
                continue
            kind = hints[f.name]
            if kind is bool:
                if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")
                kwargs[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                continue
            try:
                kwargs[f.name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)
