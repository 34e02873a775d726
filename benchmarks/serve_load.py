"""Serving load benchmark: api.py (PyTorch, ONNX Runtime fp32 and int8 backends), a naive one-forward-per-request
FastAPI handler, the same model behind LitServe and BentoML with their batching (benchmarks/litserve_server.py,
benchmarks/bentoml_service.py), and `mlflow models serve`.

Each server is started here on a free loopback port, one at a time, and driven by the same asyncio load generator
(aiohttp) with the same images at each concurrency level, for a fixed number of requests per level; then a burst:
--burst connections at once for --burst-seconds, each sending its next request when the last one was answered or
gave up after --burst-timeout seconds (a client's timeout), or with --burst-polite after waiting as a 503's
Retry-After says. The burst reports the answers by status, the goodput (200s per second), the p99 of the 200s, and
the requests that timed out or lost their connection; then the server is stopped.

Images: 256 32x32 PNGs of CIFAR-10 records (data_batch_5.bin: the official test batch is not in ../shared/data),
plus 8 "photos": other CIFAR-10 images upscaled to 640x480 and saved as JPEG, sent after every 33 PNGs (1 request
in 34). Peak RSS is that of the server's whole process tree (mlflow serve runs uvicorn in a child process).
api-onnx is api.py serving the checkpoint exported by export.py to a temporary ONNX file (CATER_MODEL_PATH=....onnx),
api-int8 the same with the int8 file export.py writes beside it (calibrated on the checkpoint's training data).
Every server gets the image file bytes, base64 in JSON: api.py, LitServe and the naive server as {"image_base64": ...},
BentoML as its batchable API takes them, {"image_base64": [...]}, mlflow as its pyfunc signature (mlflow_model.py)
takes them, {"dataframe_split": {"columns": ["image"], "data": [[...]]}}.

    python benchmarks/serve_load.py --checkpoint models/cnn.pt                 # the full run, every server
    python benchmarks/serve_load.py --requests 200 --servers api naive         # a quick look

CATER_* variables in the environment reach api.py (e.g. CATER_THREADS, CATER_MAX_BATCH_SIZE, CATER_MAX_WAIT_MS; not
CATER_WORKERS, which --api-workers sets: `--api-workers 0 1` runs each api server as `make serve` starts it, one
process per core, labelled api, and in one process, api x1),
and the LitServe and BentoML servers' top-k, TTA and pixel limit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import export  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from machine import calib_img_s, cpu_name, free_port  # noqa: E402

SERVERS = ["api", "api-onnx", "api-int8", "naive", "litserve", "bentoml", "mlflow"]
PEERS = ["litserve", "bentoml", "naive", "mlflow"]  # the other servers of the same model, for the targets
PNGS_PER_PHOTO = 33  # a 640x480 JPEG request after every 33 PNG requests
PORT = "{port}"  # in a server's command and environment: the free port picked as it starts


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict
    ready_path: str
    predict_path: str
    payload: str  # "base64" (api, naive, litserve), "list" (bentoml) or "dataframe" (mlflow)


@dataclass
class Result:
    server: str
    concurrency: int
    requests: int
    seconds: float
    latencies: dict = field(default_factory=dict)  # kind -> list of seconds (successful requests)
    errors: int = 0
    first_error: str = ""
    rss_start: float = 0.0
    rss_end: float = 0.0
    rss_peak: float = 0.0

    def all_latencies(self) -> np.ndarray:
        return np.concatenate([np.asarray(v) for v in self.latencies.values()]) if self.latencies else np.zeros(0)

    def pct(self, q: float, kind: str | None = None) -> float:
        values = np.asarray(self.latencies.get(kind, [])) if kind else self.all_latencies()
        return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds


@dataclass
class Burst:
    server: str
    connections: int
    seconds: float = 0.0  # from the first request to the last answer or timeout (the backlog's drain included)
    statuses: dict = field(default_factory=dict)  # HTTP status -> answers
    ok_latencies: list = field(default_factory=list)  # seconds, the 200s
    timeouts: int = 0  # requests not answered within the client's timeout
    errors: int = 0  # connections refused, reset or closed without an answer
    first_error: str = ""
    rss_peak: float = 0.0

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())

    @property
    def goodput(self) -> float:
        return self.statuses.get(200, 0) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ok_latencies, q)) * 1000 if self.ok_latencies else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Images and request bodies


def cifar_images(data_dir: Path, count: int) -> list[Image.Image]:
    """The first records of data_batch_5.bin (1 label byte + 3x1024 bytes of R, G, B planes each)."""
    path = data_dir / "cifar-10-batches-bin" / "data_batch_5.bin"
    records = np.fromfile(path, dtype=np.uint8, count=3073 * count).reshape(-1, 3073)
    return [Image.fromarray(r[1:].reshape(3, 32, 32).transpose(1, 2, 0)) for r in records]


def image_files(data_dir: Path, n_small: int, n_photos: int) -> list[tuple[str, bytes]]:
    """(kind, file bytes): n_small 32x32 PNGs, then n_photos 640x480 JPEGs."""
    out = []
    images = cifar_images(data_dir, n_small + n_photos)
    for image in images[:n_small]:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append(("png32", buf.getvalue()))
    for image in images[n_small:]:
        buf = io.BytesIO()
        image.resize((640, 480), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(("jpeg640", buf.getvalue()))
    return out


def request_bodies(files: list[tuple[str, bytes]], kind: str, meta: dict) -> list[tuple[str, bytes]]:
    """The request sequence: PNGs in turn, with a photo after every PNGS_PER_PHOTO of them."""
    small = [f for f in files if f[0] == "png32"]
    photos = [f for f in files if f[0] != "png32"]
    def body(data: bytes) -> bytes:
        image = base64.b64encode(data).decode()
        if kind == "base64":
            return json.dumps({"image_base64": image}).encode()
        if kind == "list":
            return json.dumps({"image_base64": [image]}).encode()
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}).encode()

    small_bodies = [body(d) for _, d in small]
    photo_bodies = [body(d) for _, d in photos]
    sequence = []
    for i in range(len(small_bodies)):
        sequence.append(("png32", small_bodies[i]))
        if photo_bodies and i % PNGS_PER_PHOTO == PNGS_PER_PHOTO - 1:
            sequence.append(("jpeg640", photo_bodies[(i // PNGS_PER_PHOTO) % len(photo_bodies)]))
    return sequence


# ---------------------------------------------------------------------------------------------------------------
# Servers


def tree_rss_mb(proc: psutil.Process) -> float:
    """RSS of the server process and all its children (mlflow serve runs uvicorn in a child); 0 once it is gone."""
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def measured(proc: psutil.Process, clients: list) -> tuple[float, float]:
    """Run the client coroutines to their end: (seconds they took, the highest tree_rss_mb meanwhile, sampled every
    0.1 s)."""
    stop = asyncio.Event()

    async def peak_rss_mb() -> float:
        peak = 0.0
        while not stop.is_set():
            peak = max(peak, tree_rss_mb(proc))
            await asyncio.sleep(0.1)
        return peak

    sampler = asyncio.create_task(peak_rss_mb())
    start = time.perf_counter()
    try:
        await asyncio.gather(*clients)
    finally:
        stop.set()
    return time.perf_counter() - start, await sampler


def start(server: Server, log_path: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """The server started on a port free right now (a burst cycles thousands of client ports), and its base URL."""
    port = str(free_port())
    command = [c.replace(PORT, port) for c in server.command]
    env = {k: v.replace(PORT, port) for k, v in server.env.items()}
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout

    async def poll() -> bool:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                try:
                    async with session.get(base + server.ready_path) as r:
                        if r.status == 200:
                            return True
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        return False

    if not asyncio.run(poll()):
        stop(proc)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{server.name} did not become ready (log {log_path}):\n    " + "\n    ".join(tail))
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it runs in a session of its own), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:  # the whole group is gone already
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Load generator


async def drive(url: str, bodies: list[tuple[str, bytes]], concurrency: int, n_requests: int,
                proc: psutil.Process, result: Result) -> None:
    """concurrency workers share a counter of n_requests; each sends its next request when the last one answered."""
    headers = {"Content-Type": "application/json"}
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session, n):
        while (i := next(counter)) < n:
            kind, body = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok, error = r.status == 200, f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                ok, error = False, f"{e.__class__.__name__}: {e}"
            if ok:
                result.latencies.setdefault(kind, []).append(time.perf_counter() - start)
            else:
                result.errors += 1
                result.first_error = result.first_error or error

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session, 2 * concurrency) for _ in range(concurrency)))  # warm-up, not counted
        counter = itertools.count()
        result.latencies, result.errors, result.first_error = {}, 0, ""
        result.rss_start = tree_rss_mb(proc)
        result.seconds, peak = await measured(proc, [worker(session, n_requests) for _ in range(concurrency)])
        result.rss_end = tree_rss_mb(proc)
        result.rss_peak = max(peak, result.rss_end)


async def burst(url: str, bodies: list[tuple[str, bytes]], seconds: float, timeout: float, proc: psutil.Process,
                result: Burst, polite: bool = False) -> None:
    """result.connections clients at once, each on its own connection, for `seconds`: each sends its next request as
    soon as the last one was answered (whatever the status) or gave up after `timeout` seconds, as wrk does; or,
    `polite`, after a 503 first waits the seconds its Retry-After says (1 without one), as HTTP clients can."""
    headers = {"Content-Type": "application/json"}
    n = result.connections
    connector = aiohttp.TCPConnector(limit=n)

    async def client(session, i, deadline):
        while time.perf_counter() < deadline:
            _, body = bodies[i % len(bodies)]
            i += n
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                result.statuses[r.status] = result.statuses.get(r.status, 0) + 1
                if r.status == 200:
                    result.ok_latencies.append(time.perf_counter() - start)
                elif r.status == 503 and polite:
                    retry = r.headers.get("Retry-After", "1")
                    wait = float(retry) if retry.isdigit() else 1.0
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
            except asyncio.TimeoutError:
                result.timeouts += 1
            except aiohttp.ClientError as e:
                result.errors += 1
                result.first_error = result.first_error or f"{e.__class__.__name__}: {e}"

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        deadline = time.perf_counter() + seconds
        result.seconds, result.rss_peak = await measured(proc, [client(session, i, deadline) for i in range(n)])


# ---------------------------------------------------------------------------------------------------------------
# Report


def print_table(results: list[Result]) -> None:
    header = f"{'server':<12} {'conc':>4} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} " \
             f"{'errors':>6} {'peak RSS MB':>11} {'RSS start->end MB':>17}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.server:<12} {r.concurrency:>4} {r.requests:>8} {r.rps:>8.1f} {r.pct(50):>8.2f} {r.pct(95):>8.2f} "
              f"{r.pct(99):>8.2f} {r.errors:>6} {r.rss_peak:>11.0f} {r.rss_start:>8.0f}->{r.rss_end:<8.0f}")
        if r.errors:
            print(f"         first error: {r.first_error}")


def print_bursts(bursts: list[Burst]) -> None:
    header = f"{'server':<12} {'conns':>5} {'seconds':>7} {'answers/s':>9} {'200s/s':>7} {'200 p50 ms':>10} " \
             f"{'200 p99 ms':>10} {'503s':>6} {'other':>6} {'timeouts':>8} {'conn errors':>11} {'peak RSS MB':>11}"
    print(header)
    print("-" * len(header))
    for b in bursts:
        other = {k: v for k, v in b.statuses.items() if k not in (200, 503)}
        print(f"{b.server:<12} {b.connections:>5} {b.seconds:>7.1f} {b.answers / b.seconds:>9.1f} {b.goodput:>7.1f} "
              f"{b.pct(50):>10.0f} {b.pct(99):>10.0f} {b.statuses.get(503, 0):>6} {sum(other.values()):>6} "
              f"{b.timeouts:>8} {b.errors:>11} {b.rss_peak:>11.0f}")
        if other:
            print(f"          other statuses: {other}")
        if b.errors:
            print(f"          first connection error: {b.first_error}")


def median_of(rounds: list, figure: str):
    """The round whose `figure` (Result.rps, Burst.goodput) is the median (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda r: getattr(r, figure))[(len(rounds) - 1) // 2]


def measure_server(server: Server, bodies: list[tuple[str, bytes]], log: Path,
                   args: argparse.Namespace) -> tuple[list[Result], Burst | None]:
    """One server started (its output to `log`), warmed up, measured at each level and in the burst, and stopped:
    ([], None) if it does not start."""
    try:
        proc, base = start(server, log, args.startup_timeout)
    except RuntimeError as e:
        print(f"{e}\n{server.name}: skipped\n")
        return [], None
    url, process = base + server.predict_path, psutil.Process(proc.pid)
    levels, result = [], None
    try:
        # Some servers are slow for their first hundreds of requests (mlflow's took ~300 ms each): not measured.
        asyncio.run(drive(url, bodies, 8, args.warmup, process, Result(server.name, 8, args.warmup, 0.0)))
        for concurrency in args.concurrency:
            levels.append(Result(server.name, concurrency, args.requests, 0.0))
            asyncio.run(drive(url, bodies, concurrency, args.requests, process, levels[-1]))
            print(f"  {server.name:<11} c={concurrency:<3} {levels[-1].rps:8.1f} req/s  p99 {levels[-1].pct(99):7.2f} "
                  f"ms  errors {levels[-1].errors}", flush=True)
        if args.burst:
            result = Burst(server.name, args.burst)
            asyncio.run(burst(url, bodies, args.burst_seconds, args.burst_timeout, process, result, args.burst_polite))
            print(f"  {server.name:<11} burst of {args.burst}: {result.goodput:.1f} 200s/s, p99 of the 200s "
                  f"{result.pct(99):.0f} ms, statuses {result.statuses}, timeouts {result.timeouts}, "
                  f"connection errors {result.errors}", flush=True)
    finally:
        stop(proc)
    return levels, result


def print_targets(results: list[Result], bursts: list[Burst], rounds: list[Result] | None = None,
                  burst_rounds: list[Burst] | None = None) -> None:
    """results, bursts: one per server (and level), the median round; rounds, burst_rounds: every round measured,
    for the counts of errors and timeouts."""
    def find(server, concurrency):
        return next((r for r in results if r.server == server and r.concurrency == concurrency), None)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    api32, naive32, mlflow32, api1 = find("api", 32), find("naive", 32), find("mlflow", 32), find("api", 1)
    onnx32 = find("api-onnx", 32)
    print(f"\ntargets (set for a 2-core machine; this one has {os.cpu_count()} CPUs, the load generator on it too):")
    if api32 and naive32:
        ratio = api32.rps / naive32.rps
        print(f"  concurrency 32: api / naive = {ratio:.2f}x req/s (target >= 3x: {verdict(ratio >= 3)})")
    if api32 and mlflow32:
        ratio = api32.rps / mlflow32.rps
        print(f"  concurrency 32: api / mlflow = {ratio:.2f}x req/s (target >= 5x: {verdict(ratio >= 5)})")
    peers32 = [r for r in results if r.server in PEERS and r.concurrency == 32]
    ours32 = [r for r in results if r.server.startswith("api") and r.concurrency == 32]
    if peers32:
        best = max(peers32, key=lambda r: r.rps)
        for r in ours32:
            ratio = r.rps / best.rps
            print(f"  concurrency 32: {r.server} / the best peer ({best.server}) = {ratio:.2f}x req/s (target >= 1.2x: "
                  f"{verdict(ratio >= 1.2)}), p99 {r.pct(99):.1f} ms vs {best.pct(99):.1f} ms "
                  f"(target lower: {verdict(r.pct(99) < best.pct(99))})")
    if api32 and onnx32:
        print(f"  concurrency 32: api-onnx / api = {onnx32.rps / api32.rps:.2f}x req/s, p99 {onnx32.pct(99):.1f} ms "
              f"vs {api32.pct(99):.1f} ms (ONNX Runtime vs PyTorch behind the same server)")
    int8_32 = find("api-int8", 32)
    if onnx32 and int8_32:
        print(f"  concurrency 32: api-int8 / api-onnx = {int8_32.rps / onnx32.rps:.2f}x req/s, p99 "
              f"{int8_32.pct(99):.1f} ms vs {onnx32.pct(99):.1f} ms (int8 vs fp32 in ONNX Runtime, same server)")
    peer_bursts = [b for b in bursts if b.server in PEERS]
    if peer_bursts:
        best = max(peer_bursts, key=lambda b: b.goodput)
        for b in [b for b in bursts if b.server.startswith("api")]:
            every = [x for x in burst_rounds or bursts if x.server == b.server]
            timeouts, errors = sum(x.timeouts for x in every), sum(x.errors for x in every)
            print(f"  burst of {b.connections}: {b.server} {b.goodput:.1f} 200s/s, the best peer ({best.server}) "
                  f"{best.goodput:.1f} (target the most: {verdict(b.goodput > best.goodput)}); timeouts "
                  f"{timeouts}, connection errors {errors}{f' in {len(every)} bursts' if len(every) > 1 else ''} "
                  f"(target none: {verdict(timeouts + errors == 0)})")
    if api32:
        print(f"  concurrency 32: api p99 = {api32.pct(99):.1f} ms (target <= 50 ms: {verdict(api32.pct(99) <= 50)})")
    if api1:
        p50 = api1.pct(50, "png32")
        print(f"  concurrency 1: api p50 for a 32x32 PNG = {p50:.2f} ms (target <= 5 ms: {verdict(p50 <= 5)})")
    api = [r for r in results if r.server == "api"]
    if api:
        every = [r for r in rounds or results if r.server == "api"]
        total, errors = sum(r.requests for r in every), sum(r.errors for r in every)
        print(f"  api errors: {errors} over {total} requests (target: 0 over >= 20,000: "
              f"{verdict(errors == 0 and total >= 20000)})")
        last = every[-len(api):]  # one process's levels: the last round's, as each round starts the server again
        print(f"  api RSS: {last[0].rss_start:.0f} MB after the first warm-up, {last[-1].rss_end:.0f} MB at the end"
              f"{' (of the last round)' if len(every) > len(api) else ''}, peak {max(r.rss_peak for r in every):.0f} MB")


def processes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: one per core), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test api.py against a naive handler and mlflow models serve.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="models/cnn.pt", help="checkpoint written by train.py")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding cifar-10-batches-bin/")
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per server and concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=1, help="measure every server this many times, in turn (each "
                        "round starts each server again), and count each level's and burst's median round: on a "
                        "machine whose speed drifts, one slow spell then decides less, and no server meets it alone")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent to each server before measuring")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument("--api-workers", type=processes, nargs="+", default=[0],
                        help="api.py's server processes (CATER_WORKERS), each count a server of its own: 0 (the "
                             "default) as `make serve` starts it, one per core on the CPU, labelled api; N: api xN")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}",
                        help="MLflow store holding the run that logged the checkpoint's model")
    # LitServe's settings: the best of a sweep at concurrency 32 on the 2-core machine (README, Results)
    parser.add_argument("--litserve-batch", type=int, default=32, help="LitServe's max_batch_size")
    parser.add_argument("--litserve-timeout", type=float, default=0.005, help="LitServe's batch_timeout (seconds)")
    parser.add_argument("--litserve-workers", type=int, default=2, help="LitServe's workers_per_device (the cores are "
                                                                         "split among them for torch's threads)")
    parser.add_argument("--litserve-fast-queue", action=argparse.BooleanOptionalAction, default=True,
                        help="LitServe's fast_queue (ZeroMQ)")
    parser.add_argument("--burst", type=int, default=1024, help="connections of the burst after the levels (0: none); "
                                                                "its 200s/s count the backlog's drain after it too")
    parser.add_argument("--burst-seconds", type=float, default=8.0, help="how long the burst sends requests")
    parser.add_argument("--burst-timeout", type=float, default=5.0, help="a burst client gives up on a request after "
                                                                        "this many seconds (counted as a timeout)")
    parser.add_argument("--burst-polite", action="store_true", help="burst clients wait as a 503's Retry-After says "
                                                                    "before their next request (default: at once, as wrk)")
    # BentoML's settings (benchmarks/bentoml_service.py): as its guides advise for a CPU model with adaptive batching
    parser.add_argument("--bentoml-batch", type=int, default=32, help="BentoML's max_batch_size (and concurrency)")
    parser.add_argument("--bentoml-latency-ms", type=int, default=0, help="BentoML's max_latency_ms: requests that "
                        "would wait longer get 503 (0: api.py's queue budget, CATER_QUEUE_BUDGET_MS or its default)")
    parser.add_argument("--bentoml-workers", type=int, default=0, help="BentoML's workers (0: one per core)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for a server to be ready")
    parser.add_argument("--logs", default="bench-results", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")

    checkpoint, data_dir = Path(args.checkpoint).resolve(), Path(args.data_dir).resolve()
    try:
        _, meta = load_checkpoint(checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.burst:  # the load generator's connections and the server's, on the same machine
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 4 * args.burst:
            print(f"error: --burst {args.burst} needs about {4 * args.burst} open files; the hard limit is {hard} "
                  f"(a smaller --burst, or --burst 0 for none)", file=sys.stderr)
            return 2
        # The servers started here inherit the raised limit; api.py bounds its connections itself (1,000).
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * args.burst), hard))
    files = image_files(data_dir, n_small=256, n_photos=8)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {checkpoint}  ({meta['model_config'].get('arch')}, {len(meta['classes'])} classes)")
    print(f"images: 256 CIFAR-10 32x32 PNGs (data_batch_5.bin), 8 CIFAR-10 images upscaled to 640x480 JPEG "
          f"(1 request in {PNGS_PER_PHOTO + 1}); per server {args.warmup} warm-up requests, then per level "
          f"2x concurrency more and {args.requests} measured"
          f"{f'; {args.rounds} rounds of all servers in turn (the median round counts)' if args.rounds > 1 else ''}")
    calib_img_s()  # prints its line, at the start and at the end
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}\n")

    servers = []
    exports = tempfile.TemporaryDirectory(prefix="serve-load-")  # the ONNX files of api-onnx and api-int8, removed at exit
    formats = [f for f, name in (("onnx", "api-onnx"), ("int8", "api-int8")) if name in args.servers]
    exported = export.export(checkpoint, formats, Path(exports.name), int8_optional=True) if formats else {}
    for name in args.servers:
        env = {}
        if name in ("api", "api-onnx", "api-int8"):
            model = checkpoint
            if name != "api":
                model = exported.get(name.removeprefix("api-"))
                if model is None:
                    print(f"{name}: skipped, export.py wrote no {name.removeprefix('api-')} file (see above)\n")
                    continue
                print(f"{name}: serving {model}, exported from the checkpoint\n")
            for workers in args.api_workers:  # a server per process count: "api" (as make serve), "api x1", ...
                env = {"CATER_MODEL_PATH": str(model), "CATER_HOST": "127.0.0.1", "CATER_PORT": PORT,
                       "CATER_WORKERS": str(workers)}
                servers.append(Server(f"{name} x{workers}" if workers else name, [sys.executable, str(REPO / "api.py")],
                                      env, "/ready", "/predict", "base64"))
        elif name == "litserve":
            servers.append(Server(name, [sys.executable, str(REPO / "benchmarks" / "litserve_server.py"),
                                         "--checkpoint", str(checkpoint), "--port", PORT,
                                         "--max-batch-size", str(args.litserve_batch), "--batch-timeout",
                                         str(args.litserve_timeout), "--workers", str(args.litserve_workers),
                                         *(["--fast-queue"] if args.litserve_fast_queue else [])],
                                  env, "/health", "/predict", "base64"))
        elif name == "bentoml":
            env.update(BENTO_CHECKPOINT=str(checkpoint), BENTO_MAX_BATCH_SIZE=str(args.bentoml_batch),
                       BENTO_MAX_LATENCY_MS=str(args.bentoml_latency_ms), BENTO_WORKERS=str(args.bentoml_workers))
            servers.append(Server(name, [sys.executable, "-m", "bentoml", "serve", "benchmarks.bentoml_service:Classifier",
                                         "--host", "127.0.0.1", "--port", PORT],
                                  env, "/readyz", "/predict", "list"))
        elif name == "naive":
            servers.append(Server(name, [sys.executable, str(REPO / "benchmarks" / "naive_server.py"),
                                         "--checkpoint", str(checkpoint), "--port", PORT],
                                  env, "/health", "/predict", "base64"))
        else:
            run_id = meta.get("mlflow_run_id")
            if not run_id:
                print("mlflow: skipped, the checkpoint has no MLflow run id (trained with --no-mlflow?)\n")
                continue
            # mlflow execs `uvicorn` by name: put this interpreter's bin folder (the virtualenv's) first on PATH.
            env.update(MLFLOW_TRACKING_URI=args.tracking_uri,
                       PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
            servers.append(Server(name, [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                                         "--env-manager", "local", "-p", PORT, "-h", "127.0.0.1"],
                                  env, "/ping", "/invocations", "dataframe"))
    if any(s.name == "mlflow" for s in servers):
        print(f"mlflow: serving runs:/{meta['mlflow_run_id']}/model from {args.tracking_uri}, the logged pyfunc model "
              "(mlflow_model.py): base64 image files in a dataframe_split body\n")

    every_round, every_burst = [], []  # every measurement: rounds x servers x levels, and the bursts
    for round_no in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {round_no} of {args.rounds}: every server in turn", flush=True)
        for server in servers:
            log = logs / f"serve_{server.name.replace(' ', '_')}{f'_round{round_no}' if args.rounds > 1 else ''}.log"
            levels, burst_result = measure_server(server, request_bodies(files, server.payload, meta), log, args)
            every_round += levels
            every_burst += [burst_result] if burst_result else []
    exports.cleanup()
    print()
    calib_img_s()
    print()
    results = [median_of([r for r in every_round if (r.server, r.concurrency) == key], "rps")
               for key in dict.fromkeys((r.server, r.concurrency) for r in every_round)]
    bursts = [median_of([b for b in every_burst if b.server == name], "goodput")
              for name in dict.fromkeys(b.server for b in every_burst)]
    if args.rounds > 1:
        print(f"each level and burst as its median round of {args.rounds} (by req/s, by 200s/s), its latencies and "
              f"RSS too; the targets' errors and timeouts count every round's. Each round's req/s:")
        for r in results:
            each = [f"{x.rps:.1f}" for x in every_round if (x.server, x.concurrency) == (r.server, r.concurrency)]
            print(f"  {r.server:<12} c={r.concurrency:<4} {', '.join(each)}")
        print()
    print_table(results)
    if bursts:
        print(f"\nburst: {args.burst} connections for {args.burst_seconds:g} s, each request given up after "
              f"{args.burst_timeout:g} s; after a 503 the next request "
              f"{'waits as Retry-After says' if args.burst_polite else 'goes at once'}")
        print_bursts(bursts)
    print_targets(results, bursts, every_round, every_burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
