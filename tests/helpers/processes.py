"""Processes for tests of what mt does about other processes (locks, stale temp files)."""

from __future__ import annotations

import subprocess
import sys


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid
