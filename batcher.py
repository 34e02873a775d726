"""Micro-batching for the server: concurrent requests become one forward pass, within a bounded wait, under watch.

Requests are admitted while the images already admitted would be answered within the queue budget at the measured
throughput; beyond that, Overloaded at once (api.py answers 503 with Retry-After), so a burst makes some requests
fail fast instead of every request slow. If the batching task stops or a forward pass hangs, `problem` says so
(/ready and /health turn 503) and new requests fail fast with WorkerDown instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from serve_config import ServeConfig


MAX_RETRY_AFTER_S = 30


class Overloaded(Exception):
    """More work is admitted than can be answered within the queue budget; retry_after is in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        """Of the 503 that answers it. Connection: close, so a client that retries at once pays for a new
        connection: under a retry storm from a thousand connections this halves the event loop's time on refusals,
        and the 200s keep flowing."""
        return {"Retry-After": str(self.retry_after), "Connection": "close"}


class WorkerDown(Exception):
    """The batching task stopped: nothing admitted now would ever be answered."""


class MicroBatcher:
    """Gathers concurrent requests into batches and runs one forward pass at a time in a worker thread.

    While a batch runs, new requests queue up and form the next batch, so batches grow with load without
    any waiting at low load; max_wait_ms > 0 additionally waits that long for a fuller batch.
    """

    def __init__(self, run_batch: Callable[[list], list[torch.Tensor]], max_batch_size: int, max_wait_ms: float,
                 queue_budget_ms: float = ServeConfig.queue_budget_ms, max_queue: int = ServeConfig.max_queue,
                 stall_s: float = ServeConfig.timeout_s):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_budget = queue_budget_ms / 1000
        self.max_queue = max_queue
        self.stall_s = stall_s
        self.admitted = 0  # images admitted and not answered yet (decoding, queued or in a forward pass)
        self.images_per_s = 0.0  # images answered per second while any were admitted (0 until measured)
        self.answered, self.busy = 0, 0.0  # since the last measurement: images answered, seconds with any admitted
        self.busy_since = time.monotonic()  # the last time `busy` was counted up to, while any are admitted
        self.batch_started: float | None = None
        self.taken: list = []  # (item, future) pairs the batching task has taken from the queue
        self.failure = ""
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.worker = asyncio.get_running_loop().create_task(self._work())
        self.worker.add_done_callback(self._stopped)

    # --- admission ----------------------------------------------------------------------------------------------

    def capacity(self) -> int:
        """Images that can be admitted at once: what the measured throughput answers within the queue budget (at
        least two full batches, so a slow first measurement cannot starve the server), at most max_queue."""
        return min(self.max_queue, max(2 * self.max_batch_size, int(self.images_per_s * self.queue_budget)))

    def admit(self, images: int = 1, held: int = 0) -> None:
        """Count `images` more in for a request that holds `held` already, or raise Overloaded (or WorkerDown)
        without counting them; release() them after. A request that finds nobody else admitted always gets in,
        whatever its size, so a large batch request cannot be refused forever."""
        if self.problem():
            raise WorkerDown(self.problem())
        if images <= 0:
            return
        others = self.admitted - held
        if others > 0 and self.admitted + images > self.capacity():
            rate = self.images_per_s or self.max_batch_size
            raise Overloaded(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.admitted / rate))))
        if self.admitted == 0:  # work starts: the time until none is admitted again counts
            self.busy_since = time.monotonic()
        self.admitted += images

    def release(self, images: int = 1, ok: bool = True) -> None:
        """Count `images` out, and measure the throughput; `ok`: they were answered. Failed ones (a bad image, a
        refusal of a batch's rest) count only their time, so a flood of cheap failures cannot raise the limit."""
        now = time.monotonic()
        self.busy += now - self.busy_since
        self.busy_since = now
        self.admitted -= images
        self.answered += images if ok else 0
        self._measure()

    def _measure(self) -> None:
        """The throughput admission relies on: images answered per second of the time any were admitted, over
        every half second of such time, at whatever load. It spans decoding, the queue, the forward pass and the
        answer, so the slowest of them sets it. Under light load one request's latency bounds it: below what a
        model that gains much from batching answers under load (a burst is admitted conservatively until measured
        again), about it for a small one."""
        if self.busy >= 0.5:
            rate = self.answered / self.busy
            self.images_per_s = rate if not self.images_per_s else 0.7 * self.images_per_s + 0.3 * rate
            self.answered, self.busy = 0, 0.0

    # --- health -------------------------------------------------------------------------------------------------

    def problem(self) -> str:
        """Why the batcher cannot answer ('' while it can): its task stopped, or a forward pass hangs."""
        if self.failure:
            return self.failure
        started = self.batch_started
        if started is not None and time.monotonic() - started > self.stall_s:
            return f"a forward pass has been running for over {self.stall_s:g} s"
        return ""

    def _stopped(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.failure = "the batching task was cancelled"
        elif task.exception() is not None:
            self.failure = f"the batching task failed: {task.exception()!r}"
        else:
            self.failure = "the batching task has stopped"
        waiting = list(self.taken)  # whoever is still waiting gets an answer now: taken for a batch, or queued
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for entry in waiting:
            if entry is not None and not entry[1].done():
                entry[1].set_exception(WorkerDown(self.failure))
        self.taken = []

    # --- work ---------------------------------------------------------------------------------------------------

    async def submit(self, item) -> torch.Tensor:
        if self.failure:
            raise WorkerDown(self.failure)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def close(self) -> bool:
        """Finish what is queued, then stop, waiting at most stall_s for a forward pass that hangs; False if one
        did (its thread goes on, and keeps the process from exiting)."""
        finished = True
        if not self.worker.done():
            self.queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.gather(self.worker, return_exceptions=True), self.stall_s)
            except TimeoutError:
                self.worker.cancel()
                finished = False
        self.executor.shutdown(wait=False, cancel_futures=True)
        return finished

    async def _next_batch(self) -> tuple[list, bool]:
        """(items, closing): blocks for the first item, then takes what is queued, up to max_batch_size."""
        loop = asyncio.get_running_loop()
        first = await self.queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], loop.time() + self.max_wait
        self.taken = batch  # what this task holds, failed by _stopped if the task dies with it
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
            self.taken = batch
            self.batch_started = time.monotonic()
            try:
                probs = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:
                self.batch_started = None
            for (_, future), row in zip(batch, probs):
                if not future.done():
                    future.set_result(row)
            self.taken = []
