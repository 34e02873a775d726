"""Several server processes for api.py: uvicorn's supervisor, which replaces them one at a time on SIGHUP (/reload).

Two changes to uvicorn's own: a replacement gets `ready_s` to load and warm up its model (uvicorn's one timeout
would also make every liveness ping wait that long for a dying process), and SIGINT or SIGTERM stops it at once,
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


class Supervisor(Multiprocess):
    def __init__(self, config: Config, ready_s: float):
        super().__init__(config, sockets=[config.bind_socket()])
        self.ready_s = ready_s
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)

    def _stop(self, signum, frame) -> None:
        self.signal_queue.append(signum)
        self.should_exit.set()  # read by restart_all and while a replacement starts, not only between checks

    def restart_all(self) -> None:
        pings = self.config.timeout_worker_healthcheck
        self.config.timeout_worker_healthcheck = self.ready_s
        try:
            super().restart_all()
        finally:
            self.config.timeout_worker_healthcheck = pings

    def serve(self) -> int:
        """Run until stopped; uvicorn's STARTUP_FAILURE if a process could not start, else 0."""
        os.environ[PID_VARIABLE] = str(os.getpid())  # spawned processes inherit it
        self.run()
        return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in self.processes) else 0


def supervisor_pid() -> int | None:
    """The pid of the Supervisor that started this process, while it is still this process's parent."""
    pid = os.environ.get(PID_VARIABLE, "")
    return int(pid) if pid.isdigit() and int(pid) == os.getppid() else None
