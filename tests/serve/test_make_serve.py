"""`make serve`: the Makefile's recipe serves the demo's stage-3 model (not another stage), and
Ctrl-C stops make and the server with nothing left behind.

The demo folder is built by hand, each step's file older than the next, so make finds the chain
up to date and trains nothing: a nano stage-3 model (and a stage-1 one beside it, with other
facts, which a recipe serving the wrong stage would show), the data manifest the grader reads
its preprocessing from, and the .done stamps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import keras
import pytest
from _served import PARAMS, SIZE, wait_for
from _subprocess import ROOT, group_members, started

from m2cnn_tf.checkpoints import CONFIG, save_checkpoint, stage_dir
from m2cnn_tf.config import multi_cell_path
from m2cnn_tf.model import build_m2cnn

# Ours: facts no default would produce, to recognise the model served.
STAGE3_META = {"stage": 3, "epoch": 5, "val_kappa_scores": 0.6543}
STAGE1_META = {"stage": 1, "epoch": 2, "val_kappa_scores": 0.1234}


def _demo_folder(tmp_path: Path) -> tuple[Path, Path]:
    """DEMO and DEMO_DATA as `make demo` leaves them, with nano models; make's chain of stamps
    (raw CSV -> records manifest -> stage1/2/3.done) in increasing mtime order."""
    demo, data = tmp_path / "demo", tmp_path / "data"
    records = data / "records"
    records.mkdir(parents=True)
    (data / "raw").mkdir()
    manifest = {
        "tool": "data_prep.kaggle",
        "source": {"kind": "kaggle"},
        "params": {"sizes": [SIZE], "preprocess": PARAMS.to_dict()},
        "counts": {"train": {"records": 40}, "val": {"records": 10}, "test": {"records": 10}},
    }
    models = demo / "models"
    keras.utils.set_random_seed(3)
    for meta in (STAGE1_META, STAGE3_META):
        model = build_m2cnn(SIZE, preset="nano")
        facts = {**meta, "resolution": SIZE, "preset": "nano"}
        facts |= {"multi_cell_path": multi_cell_path(SIZE), "best_metric": "val_kappa_scores"}
        save_checkpoint(model, stage_dir(models, meta["stage"]), facts)
        (stage_dir(models, meta["stage"]) / CONFIG).write_text(json.dumps({"data": str(records)}))
    chain = [data / "raw" / "retinopathy_solution.csv", records / "manifest.json"]
    chain += [demo / f"stage{s}.done" for s in (1, 2, 3)]
    (data / "raw" / "retinopathy_solution.csv").write_text("image,level\n")
    (records / "manifest.json").write_text(json.dumps(manifest))
    for i, path in enumerate(chain):
        path.touch()
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    return demo, data


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.slow
def test_make_serve_serves_the_demo_stage_3_model_and_ctrl_c_stops_everything(tmp_path):
    """The served model is stage 3 of DEMO/models (its best.json's facts); SIGINT to make's
    group, as a terminal's Ctrl-C sends it, ends make with the interrupt and leaves no process."""
    demo, data = _demo_folder(tmp_path)
    log = tmp_path / "make.log"
    command = ["make", "-C", str(ROOT), "-o", ".venv/.installed", "serve"]
    # --port 0: serve.py binds a free port itself and prints it (no race for a port chosen here).
    command += [f"PY={sys.executable}", f"DEMO={demo}", f"DEMO_DATA={data}", "SERVE_FLAGS=--port 0"]
    env = {k: v for k, v in os.environ.items() if k != "M2CNN_SERVE_TOKEN"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with (
        open(log, "wb") as out,
        started(command, stdout=out, stderr=subprocess.STDOUT, env=env) as make,
    ):

        def said() -> str:
            return log.read_text(errors="replace")

        found = wait_for(
            lambda: (
                make.poll() is not None
                or re.search(r"serving stage (\d) on (http://\S+?)/? ", said())
            ),
            "make serve to say where it serves",
            seconds=120,
            pause=0.2,
        )
        assert make.poll() is None, said()[-3000:]
        assert found.group(1) == "3"
        assert "train.py" not in said() and "data_prep" not in said(), said()[-3000:]
        with httpx.Client(base_url=found.group(2), timeout=60, trust_env=False) as client:
            health = wait_for(
                lambda: _answer(client, "/healthz"), "GET /healthz", seconds=120, pause=0.2
            )
            assert health.json() == {"status": "ok"}
            facts = client.get("/v1/model").json()
        assert facts["stage"] == 3 and facts["epoch"] == STAGE3_META["epoch"]
        assert facts["val_kappa"] == STAGE3_META["val_kappa_scores"]
        assert facts["resolution"] == SIZE
        assert facts["preprocessing"]["source"] == str(data / "records" / "manifest.json")

        os.killpg(make.pid, signal.SIGINT)
        code = make.wait(timeout=120)  # a hang guard
        # serve.py shuts the server down and exits 130; GNU make, interrupted too, reports
        # that status, then dies of the same signal (a shell sees 130 either way).
        assert code == -signal.SIGINT, said()[-3000:]
        assert "Application shutdown complete" in said(), said()[-3000:]
        # make[1] when make itself runs under make (make test in CI)
        stopped = r"serve\.py: interrupted\nmake(\[\d+\])?: \*\*\* \[(Makefile:\d+: )?serve\] "
        stopped += r"Error 130\s*$"
        assert re.search(stopped, said()), said()[-3000:]
        assert wait_for(lambda: not group_members(make.pid), "make's group to be gone", 60)


def _answer(client: httpx.Client, path: str) -> httpx.Response | None:
    """The response once the server answers; None while it refuses connections."""
    try:
        return client.get(path)
    except httpx.TransportError:
        return None
