"""Test helper: commands run as real processes, each in its own process group, which is killed
in `finally` whatever happens (a timeout, a failed assertion, Ctrl-C of the test run), so that
neither the command nor anything it started outlives the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process's whole group (its own: `start_new_session`), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run(argv: Sequence[str], *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)` in a new process group, killed in
    `finally`; a run past `timeout` (a liveness bound) raises `TimeoutExpired`."""
    process = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
