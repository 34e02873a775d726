"""Several server processes for api.py: uvicorn's supervisor, which replaces them one at a time on SIGHUP (/reload).

Two changes to uvicorn's own: a replacement gets READY_S to load and warm up its model, while a liveness ping
waits PING_S (uvicorn has one timeout for both: 5 s, too short for a model, or 120 s, which a hung process, or one
still exiting after a failed start, would keep the supervisor waiting for); and SIGINT or SIGTERM stops it at once,
even in the middle of a replacement (uvicorn reads them only between its checks, so a `docker stop` during a
/reload would end in SIGKILL).
"""

from __future__ import annotations

import os
import signal

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

PID_VARIABLE = "CATER_SUPERVISOR_PID"  # set for the server processes: the supervisor to send SIGHUP to
PING_S = 30  # a process must answer a liveness ping within this, its first (torch imported, on a slow CPU) included
READY_S = 120  # a replacement (after /reload) must load and warm up its model within this


class Supervisor(Multiprocess):
    def __init__(self, config: Config):
        config.timeout_worker_healthcheck = PING_S
        super().__init__(config, sockets=[config.bind_socket()])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)

    def _stop(self, signum, frame) -> None:
        self.should_exit.set()  # read by restart_all and while a replacement starts, not only between checks

    def restart_all(self) -> None:
        self.config.timeout_worker_healthcheck = READY_S
        try:
            super().restart_all()
        finally:
            self.config.timeout_worker_healthcheck = PING_S

    def serve(self) -> int:
        """Run until stopped; uvicorn's STARTUP_FAILURE if a process could not start, else 0."""
        os.environ[PID_VARIABLE] = str(os.getpid())  # spawned processes inherit it
        try:
            self.run()
        finally:
            os.environ.pop(PID_VARIABLE, None)
        return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in self.processes) else 0


def supervisor_pid() -> int | None:
    """The pid of the Supervisor that started this process, while it is still this process's parent."""
    pid = os.environ.get(PID_VARIABLE, "")
    return int(pid) if pid.isdigit() and int(pid) == os.getppid() else None
