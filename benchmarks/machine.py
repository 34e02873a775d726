"""What the benchmarks (and the tests, for free_port) share: this machine's speed and CPU, a free port on it, a timed
train.py process, and the markdown table their figures are printed in.

calib_img_s comes from ../shared/tools/calib.py: normalized seconds = seconds x calib_img_s / 1000 (calib.py's
reference machine prints 1000), comparable across machines of different speed.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO.parent / "shared" / "tools" / "calib.py"


def calib_img_s() -> float | None:
    """Images/s of calib.py's fixed net here (printed as it is read), or None where the tool is not beside the repo."""
    if not CALIB.exists():
        return None
    out = subprocess.run([sys.executable, str(CALIB)], cwd=REPO, check=True, capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("calib_img_s="))
    print(line, flush=True)
    return float(line.split()[0].split("=", 1)[1])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows where there is none."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS's pick), for a server started next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_train(cmd: list[str], out: Path) -> tuple[float, dict]:
    """Run a train.py command line (echoed first) in the repo without progress bars; its wall time in seconds and the
    checkpoint it wrote to `out`."""
    import torch  # here, not above: make_elpv.py and the tests import this module for the rest

    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    return wall, torch.load(out, map_location="cpu", weights_only=True)


def mean_sd(values: list, scale: float = 1, unit: str = "", digits: int = 0) -> str:
    """A table cell: the mean of the values that are not None, times scale, with unit, then ± their standard deviation
    where there are several; "-" where there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = f"{statistics.mean(values) * scale:.{digits}f}{unit}"
    if len(values) > 1:
        text += f" ±{statistics.stdev(values) * scale:.{digits}f}"
    return text


def markdown_table(rows: list[list[str]], right: bool = False) -> str:
    """rows[0] is the header; columns padded to their widest cell, left-aligned (right: all but the first one
    right-aligned, for columns of numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.rjust(w) if right and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
