"""This machine's speed, for figures comparable across machines: calib_img_s from ../shared/tools/calib.py.

normalized seconds = seconds x calib_img_s / 1000 (calib.py's reference machine prints 1000).
"""

from __future__ import annotations

import subprocess
import sys
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
