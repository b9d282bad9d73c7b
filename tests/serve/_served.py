"""Constants and helpers shared by the serve tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest
from _subprocess import kill_group

from m2cnn_tf.preprocessing import PreprocessParams

SIZE = 96
TOKEN = "test-token-7f3a-c91e2d"  # serve.py refuses fewer than 16 characters
MAX_UPLOAD_MB = 1
MAX_FILES = 8
MAX_BATCH = 2
# Ours, for speed: Eq. (1) at 256 px instead of 720 (any value works; the manifest says which).
PARAMS = PreprocessParams(rho=4.0, base_size=256)
ROOT = Path(__file__).resolve().parents[2]
FORMULA_NAME = "=cmd|' -C calc'!A0.jpg"  # issue 19's, with no '/' (a file name on disk)
_STARTUP_SECONDS = 240


def _onednn_enabled() -> bool:
    """TensorFlow's oneDNN kernels: on by default only on CPUs with AVX512_VNNI, AVX512_BF16 or
    AMX (or with TF_ENABLE_ONEDNN_OPTS=1); the server, started from here, decides the same."""
    from tensorflow.python.util import _pywrap_util_port

    return _pywrap_util_port.IsMklEnabled()


# How far a photograph's numbers may move with its place in a model call of fixed shape (the
# grader pads every call): not at all under oneDNN; under TensorFlow's Eigen kernels (an AVX2
# CPU, say) the last bits can (measured: 1e-6 on a score of 3.76). Relative, and absolute.
PLACE_ROUNDING = 0.0 if _onednn_enabled() else 2e-6


def assert_same_result(got: dict, want: dict) -> None:
    """One photograph's result: every field equal, score and probabilities to PLACE_ROUNDING."""
    numbers = ("score", "probabilities")
    assert {k: v for k, v in got.items() if k not in numbers} == {
        k: v for k, v in want.items() if k not in numbers
    }
    for key in numbers:
        assert got[key] == pytest.approx(want[key], rel=PLACE_ROUNDING, abs=PLACE_ROUNDING), key


def assert_printed_as(value: float, printed: str) -> None:
    """`value` is what predict.py printed with six decimals, give or take PLACE_ROUNDING."""
    if PLACE_ROUNDING:
        assert abs(value - float(printed)) <= 5e-7 + PLACE_ROUNDING * (1 + abs(value)), printed
    else:
        assert f"{value:.6f}" == printed


def assert_same_csv(got: str, want: str) -> None:
    """Two prediction CSVs: the same text under oneDNN; elsewhere the same lines and cells, each
    number printed with six decimals equal give or take PLACE_ROUNDING (one printed digit)."""
    if not PLACE_ROUNDING:
        assert got == want
        return
    assert got.count("\r\n") == want.count("\r\n")
    rows = [list(csv.reader(io.StringIO(text, newline=""))) for text in (got, want)]
    assert [len(r) for r in rows[0]] == [len(r) for r in rows[1]] and rows[0][0] == rows[1][0]
    for ours, theirs in zip(rows[0][1:], rows[1][1:], strict=True):
        for a, b in zip(ours, theirs, strict=True):
            if a != b:
                assert abs(float(a) - float(b)) <= 1e-6 + PLACE_ROUNDING * (1 + abs(float(b))), (
                    ours, theirs,
                )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    log: Path

    def client(self, token: str | None = TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, trust_env=False, **kw)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height px: IHDR, an empty IDAT, IEND (valid CRCs)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def upload_bytes(*named: tuple[str, bytes]) -> list[tuple]:
    """httpx's multipart `files` for (file name, bytes) pairs."""
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def upload(paths: list[Path], names: list[str] | None = None) -> list[tuple]:
    """httpx's multipart `files` for the paths (file names as given, or the paths' names)."""
    names = names or [p.name for p in paths]
    return [
        ("files", (n, p.read_bytes(), "application/octet-stream"))
        for n, p in zip(names, paths, strict=True)
    ]


def start_server(
    model_dir: Path, log: Path, *extra: str, token: str | None = TOKEN
) -> tuple[subprocess.Popen, Served]:
    """`python serve.py` on a free loopback port with the token from the environment (none with
    `token=None`); returns once it says where it serves (or fails the test with its log)."""
    args = [
        sys.executable, str(ROOT / "serve.py"), "--model-dir", str(model_dir), "--stage", "1",
        "--port", "0", "--max-batch", str(MAX_BATCH), "--max-wait-ms", "20",
        "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-files", str(MAX_FILES), "--workers", "2",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "M2CNN_SERVE_TOKEN"}
    env |= {"TF_CPP_MIN_LOG_LEVEL": "3", **({"M2CNN_SERVE_TOKEN": token} if token else {})}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
    try:
        found = wait_for(
            lambda: (
                process.poll() is not None
                or re.search(
                    r"serving stage 1 on (http://\S+?)/? ", log.read_text(errors="replace")
                )
            ),
            "serve.py to say where it serves",
            seconds=_STARTUP_SECONDS,
            pause=0.2,
        )
        if process.poll() is not None:
            pytest.fail(f"serve.py did not start:\n{log.read_text(errors='replace')[-3000:]}")
    except BaseException:
        kill_group(process)
        raise
    return process, Served(found.group(1), log)


def stop_server(process: subprocess.Popen) -> int:
    """Ctrl-C (SIGINT to its process group, as a terminal sends it); its exit code. Whatever
    is left of the group after a grace period (a liveness bound) is killed."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        return process.returncode
    finally:
        kill_group(process)


def serving(served: Served, token: str | None = TOKEN) -> dict:
    """The server's counters (/v1/model's `serving`)."""
    with served.client(token) as client:
        return client.get("/v1/model").json()["serving"]


def wait_for(condition, what: str, seconds: float = 120.0, pause: float = 0.05):
    """Poll `condition()` until it is truthy (returned); a liveness bound, not a speed limit."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {seconds:g} s for {what}")
        time.sleep(pause)
    return value


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (its peak) of a process, from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = {k: re.search(rf"^{k}:\s+(\d+) kB", status, re.M) for k in ("VmRSS", "VmHWM")}
    return {k: int(match.group(1)) for k, match in found.items()}


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from VmRSS (Linux's clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
