"""Several server processes for api.py: uvicorn's supervisor, which replaces them one at a time on SIGHUP (/reload)
and replaces one that dies or hangs, and the watchdog in each process that makes a hung one exit.

Changes to uvicorn's own: a replacement gets READY_S to load and warm up its model, while a liveness ping waits
PING_S (uvicorn has one timeout for both: 5 s, too short for a model, or 120 s, which a hung process, or one still
exiting after a failed start, would keep the supervisor waiting for); SIGINT or SIGTERM stops it at once, even in
the middle of a replacement (uvicorn reads them only between its checks, so a `docker stop` during a /reload would
end in SIGKILL); a process that dies soon after it started (out of memory while loading, say) is replaced after a
pause that grows while they keep dying, so a crash loop does not take the cores from the processes serving; and a
dead process's live gauges leave /metrics. uvicorn's pings are answered by a thread of their own, which goes on
answering while the event loop or the forward pass hangs: the Watchdog covers those.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from time import monotonic, process_time

from prometheus_client import multiprocess
from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

PID_VARIABLE = "CATER_SUPERVISOR_PID"  # set for the server processes: the supervisor to send SIGHUP to
PING_S = 30  # a process must answer a liveness ping within this, its first (torch imported, on a slow CPU) included
READY_S = 120  # a replacement (after /reload) must load and warm up its model within this
HUNG_S = 30  # a process whose event loop has not run, or whose inference has been down, this long exits
HUNG_EXIT = 1  # its exit status (not STARTUP_FAILURE, which stops the supervisor)
STEADY_S = 60  # a process that dies sooner than this after it started is replaced after a pause...
MAX_PAUSE_S = 60  # ...of 1 s, doubling while they keep dying young, up to this

log = logging.getLogger("uvicorn.error")


class Supervisor(Multiprocess):
    def __init__(self, config: Config):
        config.timeout_worker_healthcheck = PING_S
        super().__init__(config, sockets=[config.bind_socket()])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        self.started: dict[int, float] = {}  # pid -> when first seen alive
        self.waiting: dict[Process, float] = {}  # a dead process -> when its replacement starts
        self.pause = 0.0  # before replacing the next process that dies young

    def _stop(self, signum, frame) -> None:
        self.should_exit.set()  # read by restart_all and while a replacement starts, not only between checks

    def restart_all(self) -> None:
        self.config.timeout_worker_healthcheck = READY_S
        try:
            super().restart_all()
        finally:
            self.config.timeout_worker_healthcheck = PING_S

    def keep_subprocess_alive(self) -> None:
        """uvicorn's check of every process (twice a second): one that died or does not answer a ping is killed
        and replaced, at once if it had run STEADY_S, else after the pause; the server stops if one failed to
        start (it would fail the same way again)."""
        if self.should_exit.is_set():
            return
        now = monotonic()
        self.waiting = {p: at for p, at in self.waiting.items() if p in self.processes}  # /reload replaces some
        self.started = {pid: at for pid, at in self.started.items() if pid in {p.pid for p in self.processes}}
        for idx, process in enumerate(self.processes):
            if process not in self.waiting:
                if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                    self.started.setdefault(process.pid, now)
                    continue
                if not self._retire(process, now):
                    return
            if self.waiting[process] <= now:
                del self.waiting[process]
                new = self.processes[idx] = Process(self.config, self.sockets)
                new.start()
                self.started[new.pid] = now  # its age counts from its start
        if not self.waiting and all(now - self.started[p.pid] >= STEADY_S for p in self.processes):
            self.pause = 0.0  # every process has served a while: any crash loop is over
        self._drop_dead_gauges()

    def _drop_dead_gauges(self) -> None:
        """The live gauges of every process that has ended leave the shared metrics folder (what it counted stays):
        one killed here, one replaced by /reload, one removed by SIGTTOU or never ready."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return
        serving = {p.pid for p in self.processes if p not in self.waiting} | {os.getpid()}
        for path in list(Path(folder).glob("gauge_live*_*.db")):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and int(pid) not in serving and not running(int(pid)):  # (a folder someone shares)
                multiprocess.mark_process_dead(int(pid), folder)

    def _retire(self, process: Process, now: float) -> bool:
        """Kill a dead or hung process and set when its replacement starts; False if the supervisor stops instead."""
        process.kill()
        process.join()
        if process.exitcode == STARTUP_FAILURE:
            log.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
            self.should_exit.set()
        if self.should_exit.is_set():
            return False
        lived = now - self.started.pop(process.pid, now)
        self.pause = 0.0 if lived >= STEADY_S else min(MAX_PAUSE_S, max(1.0, 2 * self.pause))
        log.warning("Child process [%s] died (exit status %s) %.0f s after it started; starting a new one%s",
                    process.pid, process.exitcode, lived, f" in {self.pause:g} s" if self.pause else "")
        self.waiting[process] = now + self.pause
        return True

    def serve(self) -> int:
        """Run until stopped; uvicorn's STARTUP_FAILURE if a process could not start, else 0."""
        os.environ[PID_VARIABLE] = str(os.getpid())  # spawned processes inherit it
        try:
            self.run()
        finally:
            os.environ.pop(PID_VARIABLE, None)
        return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in self.processes) else 0


def running(pid: int) -> bool:
    """Whether a process with this pid exists (one not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervisor_pid() -> int | None:
    """The pid of the Supervisor that started this process, while it is still this process's parent."""
    pid = os.environ.get(PID_VARIABLE, "")
    return int(pid) if pid.isdigit() and int(pid) == os.getppid() else None


def exit_now(status: int, message: str) -> None:
    """Log why and end this server process at once (no clean-up: the supervisor's pings would wait it out)."""
    exit_anyway = threading.Timer(5, os._exit, (status,))  # if logging blocks (on a full stderr pipe, say)
    exit_anyway.daemon = True
    exit_anyway.start()
    log.error(message)
    logging.shutdown()
    os._exit(status)


def exit_for_replacement(why: str) -> None:
    exit_now(HUNG_EXIT, f"this server process hangs ({why}): exiting, for the supervisor to start a new one")


class Watchdog:
    """In a server process under the Supervisor: calls on_hung (exit_for_replacement) once its event loop has not
    run for hung_s, or problem() has named a problem (a forward pass that hangs, a batching task that stopped) for
    hung_s without a break."""

    def __init__(self, problem: Callable[[], str], hung_s: float | None = None,
                 on_hung: Callable[[str], None] | None = None):
        self.problem = problem
        self.hung_s = HUNG_S if hung_s is None else hung_s
        self.on_hung = on_hung or exit_for_replacement
        self.check_s = min(1.0, self.hung_s / 4)
        self.loop = asyncio.get_running_loop()
        self.ticked = monotonic()
        self.stopped = threading.Event()
        self.loop.call_soon(self._tick)
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _tick(self) -> None:
        self.ticked = monotonic()
        if not self.stopped.is_set():
            self.loop.call_later(self.check_s, self._tick)

    def _watch(self) -> None:
        down_since, woke, used = None, monotonic(), process_time()
        while not self.stopped.wait(self.check_s):
            now = monotonic()
            cpu = process_time()
            if now - woke > self.check_s + self.hung_s / 2 and cpu - used < (now - woke) / 4:
                self.ticked, down_since = now, None  # this thread did not run either, nor any other: the process
            woke, used = now, cpu                    # was stopped (Ctrl-Z, docker pause), not hung
            problem = self.problem()
            down_since = (down_since or now) if problem else None
            if now - self.ticked >= self.hung_s:
                return self.on_hung(f"its event loop has not run for {now - self.ticked:.0f} s")
            if down_since is not None and now - down_since >= self.hung_s:
                return self.on_hung(f"its inference has been down for {now - down_since:.0f} s: {problem}")
