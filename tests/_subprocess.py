"""Test helper: run Python in a fresh process (a fresh TensorFlow, e.g. with 2 logical CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


def run_json_script(script: str, timeout: float) -> dict[str, Any]:
    """Run `script` with `python -c` from the repository root; the JSON object it prints last.

    A failed run fails the test with the end of its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
