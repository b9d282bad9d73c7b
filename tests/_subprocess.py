"""Test helper: commands and Python run as real processes (a fresh TensorFlow, e.g. with 2 logical
CPUs), each in a process group of its own that is killed whatever happens (a timeout, a failed
assertion, Ctrl-C of the test run): nothing a command started outlives its test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process's whole group (its own: `start_new_session`), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_group(args: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` in a process group of its own, the whole group killed afterwards; a run
    past `timeout` (a liveness bound) raises `TimeoutExpired`."""
    process = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def run_json_script(script: str, timeout: float) -> dict[str, Any]:
    """Run `script` with `python -c` from the repository root; the JSON object it prints last.

    A failed run fails the test with the end of its stderr."""
    done = run_group(
        [sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def started(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """`Popen(args)` in a process group of its own, for a test that acts on the running process
    (signals it, polls its output); the whole group is killed on leaving the block."""
    process = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        kill_group(process)


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid` (zombies hold nothing: left out)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found
