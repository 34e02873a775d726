"""The ASGI layers around the prediction app: Prometheus metrics, the body limit, the gate (API key, readiness and
admission before a request's body is read) and quiet startup errors. api.py stacks them."""

from __future__ import annotations

import asyncio
import hmac
import os
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from batcher import Overloaded, WorkerDown

AUTH_MESSAGE = "missing or wrong API key: send it as X-API-Key: <key> or Authorization: Bearer <key>"


class Metrics:
    """Prometheus collectors on a registry of their own, so several apps can live in one process (tests).

    With several server processes (make serve WORKERS=N), PROMETHEUS_MULTIPROC_DIR names a folder they share: each
    process writes its values there and /metrics, whichever process answers, adds them all up (the client's
    multiprocess mode). Without it, /metrics shows this process's own values.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        ms = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.requests = Counter("cater_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cater_http_request_duration_seconds", "time from request to response, by route",
                                 ["route"], buckets=ms, registry=self.registry)
        self.batch_size = Histogram("cater_batch_size", "images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.inference = Histogram("cater_inference_duration_seconds", "time of one batched forward pass",
                                   buckets=ms, registry=self.registry)
        self.model: Gauge | None = None  # made by serving(), with the label names api.Served.labels gives
        self.rejected = Counter("cater_rejected_requests", "requests refused before any work: overload (503 with "
                                "Retry-After), unavailable (not ready or worker down: 503), unauthorized (401), "
                                "slow (body late: 408), too_large (body over the limit: 413)",
                                ["reason"], registry=self.registry)
        self.admitted = Gauge("cater_admitted_images", "images admitted and not answered yet",
                              multiprocess_mode="livesum", registry=self.registry)
        self.served: dict[str, str] | None = None

    def serving(self, labels: dict[str, str]) -> None:
        """The model this process now serves (the one before, after a reload, drops to 0)."""
        if self.model is None:  # an info-style gauge (always 1) rather than Info, which multiprocess mode lacks
            self.model = Gauge("cater_model_info", "the served model (value 1)", list(labels),
                               multiprocess_mode="livemax", registry=self.registry)
        if self.served is not None:
            self.model.labels(**self.served).set(0)
        self.model.labels(**labels).set(1)
        self.served = labels

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def close(self) -> None:
        """This process is ending: its live gauges leave the sums."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class StatusRecorder:
    """An ASGI send that passes every message on and keeps the response's status (None until it starts)."""

    def __init__(self, send):
        self.send, self.status = send, None

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class MetricsMiddleware:
    """Counts every response by route template (not raw path, so unknown URLs cannot blow up the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.paths: frozenset[str] | None = None  # the app's route paths, known once it has its routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.paths is None:
            self.paths = frozenset(r.path for r in scope["app"].routes)
        start, sent, failed = time.perf_counter(), StatusRecorder(send), False
        try:
            await self.app(scope, receive, sent)
        except BaseException:
            failed = True
            raise
        finally:
            # no response at all: 500 when the app failed, else the client went away (nginx's 499)
            status = sent.status or (500 if failed else 499)
            route = scope.get("route")
            if route is not None:
                route = route.path
            else:  # not routed: a 404, or refused before routing (401, 413, 503), counted under its path if it has one
                route = scope["path"] if scope["path"] in self.paths else "unmatched"
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


# The page and its files: nothing from other origins, no inline code, never inside another site's frame.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


class SecurityHeadersMiddleware:
    """nosniff on every response (a JSON or text answer is never run as a script or page); the page's CSP on / and
    /ui/, and frame-ancestors 'none' on everything else, /docs included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        csp = PAGE_CSP if path == "/" or path.startswith("/ui/") else "frame-ancestors 'none'"

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                                  (b"content-security-policy", csp.encode())]}
            await send(message)

        await self.app(scope, receive, with_headers)


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


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def given_key(headers: dict[bytes, bytes]) -> str:
    """The key of X-API-Key, else of Authorization: Bearer."""
    key = headers.get(b"x-api-key", b"").decode("latin-1")
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return key or (token.strip() if scheme.lower() == "bearer" else "")


class BodyRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(scope, receive, max_bytes: int, timeout_s: float) -> bytes | None:
    """The whole request body, within timeout_s (BodyRefused 408) and max_bytes (413, from Content-Length up front
    or as soon as the count passes it); None when the client went away."""
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > max_bytes:
        raise BodyRefused(413, f"request body over the limit of {max_bytes} bytes")
    chunks, received = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return None
                chunk = event.get("body", b"")
                received += len(chunk)
                if received > max_bytes:
                    raise BodyRefused(413, f"request body over the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if not event.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyRefused(408, f"the request body did not arrive within {timeout_s:g} s (CATER_BODY_TIMEOUT_S)") from None


def replay(body: bytes, receive):
    """A receive that hands the app the body already read, then waits on the connection as usual."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class GateMiddleware:
    """Refuses what the server should not start on: before the body is read, and before anything is decoded.

    Routes in `guarded` need the API key when one is set (401). Routes in `admitted` also need a ready server
    (503 while starting or with its batching task down); then their body is read whole, within the body deadline
    (408, the connection closed) and the body limit (413), and only then do they ask for room in the batcher's
    queue: a client that stalls mid-upload holds a connection, never a queue place. When admitting one more
    request would make the wait exceed the queue budget, 503 with Retry-After at once. The admitted request is
    counted until its response is sent; routes that carry several images admit the rest themselves.
    """

    def __init__(self, app, guarded: set[str], admitted: set[str]):
        self.app, self.guarded, self.admitted = app, guarded, admitted

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in self.guarded or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        metrics = state.metrics
        expected = state.config.api_key
        if expected and not key_matches(given_key(dict(scope["headers"])), expected):
            metrics.rejected.labels("unauthorized").inc()
            # Connection: close whenever the body is left unread: the client may still be sending it
            return await JSONResponse({"detail": AUTH_MESSAGE}, 401, {"WWW-Authenticate": "Bearer", "Connection": "close"})(
                scope, receive, send)
        if path not in self.admitted:
            return await self.app(scope, receive, send)
        if not state.ready:  # while draining it still serves: /ready alone tells the load balancer to stop
            metrics.rejected.labels("unavailable").inc()
            return await JSONResponse({"detail": "the model is not loaded yet"}, 503, {"Connection": "close"})(
                scope, receive, send)
        config = state.config
        try:
            body = await read_body(scope, receive, config.max_body_bytes, config.body_timeout_s)
        except BodyRefused as e:
            metrics.rejected.labels("slow" if e.status == 408 else "too_large").inc()
            return await JSONResponse({"detail": str(e)}, e.status, {"Connection": "close"})(scope, receive, send)
        if body is None:  # the client went away mid-upload: nothing to answer
            return
        receive = replay(body, receive)
        batcher = state.batcher
        try:
            batcher.admit(1)
        except Overloaded as e:
            metrics.rejected.labels("overload").inc()
            return await JSONResponse({"detail": str(e)}, 503, e.headers)(scope, receive, send)
        except WorkerDown as e:
            metrics.rejected.labels("unavailable").inc()
            return await JSONResponse({"detail": f"inference is down: {e}"}, 503)(scope, receive, send)
        metrics.admitted.set(batcher.admitted)
        sent = StatusRecorder(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            batcher.release(1, ok=sent.status is not None and sent.status < 400)  # only answers count for throughput
            metrics.admitted.set(batcher.admitted)
