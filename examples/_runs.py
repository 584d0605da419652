"""Shared by the study scripts of this folder: run one m4oe command with its output in a log file."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with stdout and stderr in ``log``; the seconds it took. A failure stops the study, naming the log."""
    start = time.time()
    with open(log, "w") as stream:
        code = subprocess.call(cmd, stdout=stream, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}; see {log}")
    return time.time() - start
