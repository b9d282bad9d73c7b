"""Every command keeps the one CLI contract: --help exits 0; a bad flag value is one line on
stderr, no traceback, exit 2 — before any TensorFlow work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command, a flag value it must refuse)
COMMANDS = [
    (["train.py"], ["--stage", "7", "--data", "d", "--model-dir", "m"]),
    (["evaluate.py"], ["--split", "holdout"]),
    (["predict.py"], ["--tta", "sideways"]),
    (["serve.py"], ["--port", "http"]),
    (["export.py"], ["--quantize", "int4"]),
    (["reproduce.py"], ["--ablation-init", "sideways"]),
    (["-m", "data_prep.kaggle"], ["--workers", "many"]),
    (["-m", "data_prep.folder"], ["--workers", "many"]),
    (["-m", "data_prep.aptos"], ["--workers", "many"]),
    (["-m", "data_prep.messidor2"], ["--workers", "many"]),
    (["-m", "data_prep.idrid"], ["--workers", "many"]),
    (["-m", "data_prep.ddr"], ["--workers", "many"]),
    (["-m", "data_prep.demo"], ["--per-grade", "lots"]),
    (["-m", "data_prep.cli"], ["reshape"]),
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


@pytest.mark.parametrize(("command", "bad"), COMMANDS, ids=lambda c: " ".join(c))
def test_help_exits_0_and_a_bad_flag_value_is_one_line_exit_2(command, bad):
    shown = _run([*command, "--help"])
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip()

    refused = _run([*command, *bad])
    assert refused.returncode == 2, refused.stdout[-1000:] + refused.stderr[-1000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "error" in lines[0] and "Traceback" not in refused.stderr
