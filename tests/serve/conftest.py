"""The serve tests' shared pieces: a tiny model built in this session, served by a real
`python serve.py` on a free loopback port, with a token (and a second one, without, whose
batches close only when full); photographs good and bad; predict.py's own CSV for them.

The server runs with --max-batch 2 (every call padded to 2) and predict.py with --batch-size 2
on files that make full pairs: every photograph goes through a model call of the same shape
both ways, so under oneDNN their numbers are equal bit for bit, and equal as printed (oneDNN's
CPU kernels round differently for other batch shapes, in the last bits). Under TensorFlow's
Eigen kernels (CPUs without AVX512_VNNI, AVX512_BF16 or AMX) a photograph's place in the call
can change its last bits too: the tests that compare numbers allow `_served.PLACE_ROUNDING`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from _served import (
    FORMULA_NAME,
    MAX_BATCH,
    PARAMS,
    ROOT,
    SIZE,
    Served,
    png_claiming,
    start_server,
    stop_server,
)
from _subprocess import run_group
from synthetic_fundus import fundus

from m2cnn_tf.checkpoints import CONFIG, save_checkpoint, stage_dir
from m2cnn_tf.model import build_m2cnn


def _spread_heads(model: keras.Model) -> None:
    """An untrained head says ~0 for every photograph; scaled up, its grades spread over 0-4,
    so that equal results cannot come from equal outputs."""
    for name, bias in (("score", 2.0), ("logits", 0.0)):
        layer = model.get_layer(name)
        kernel, b = layer.get_weights()
        layer.set_weights([kernel * 400.0, np.full_like(b, bias)])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Stage 1 of a tiny model at 96 px, with best.json, config.json and its data's manifest."""
    root = tmp_path_factory.mktemp("served")
    keras.utils.set_random_seed(7)
    model = build_m2cnn(SIZE, preset="tiny")
    _spread_heads(model)
    data = root / "data"
    data.mkdir()
    manifest = {
        "tool": "data_prep.folder",
        "source": {"kind": "folder"},
        "params": {"sizes": [SIZE], "preprocess": PARAMS.to_dict()},
        "counts": {"train": {"records": 40}, "val": {"records": 10}, "test": {"records": 10}},
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    models = root / "models"
    meta = {"stage": 1, "resolution": SIZE, "preset": "tiny", "epoch": 3}
    meta |= {"best_metric": "val_kappa_scores", "val_kappa_scores": 0.4321}
    save_checkpoint(model, stage_dir(models, 1), meta)
    (stage_dir(models, 1) / CONFIG).write_text(json.dumps({"data": str(data)}))
    return models


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Good photographs (JPEG, PNG, grayscale, 16-bit) and bad files, by role."""
    root = tmp_path_factory.mktemp("photos")
    good = [fundus(300, 400, seed=s, radius=0.47) for s in range(4)]
    jpeg = _encode(".jpeg", good[0])
    files = {
        "good_jpeg": jpeg,
        "good_png": _encode(".png", good[1]),
        "good_jpeg_2": _encode(".jpeg", good[2]),
        "good_png_2": _encode(".png", good[3]),
        "formula": _encode(".jpeg", good[2]),  # a file named like a spreadsheet formula
        "grayscale": _encode(".jpeg", cv2.cvtColor(good[2], cv2.COLOR_BGR2GRAY)),
        "sixteen_bit": _encode(".png", good[3].astype(np.uint16) * 257),
        "truncated": jpeg[: len(jpeg) // 2],
        "text": b"this is a text file, not a photograph\n",
        "empty": b"",
        "bomb": png_claiming(60_000, 60_000),
    }
    names = {"good_png": "1.png", "good_png_2": "3.png", "sixteen_bit": "16bit.png"}
    names |= {"formula": FORMULA_NAME}
    names |= {"text": "notes.jpg", "empty": "empty.jpeg", "bomb": "bomb.png"}
    paths = {}
    for role, data in files.items():
        path = root / names.get(role, f"{role}.jpeg")
        path.write_bytes(data)
        paths[role] = path
    return paths


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory) -> Served:
    """`python serve.py` with the token from the environment, until the session ends."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process, served = start_server(model_dir, log)
    with served.client(token=None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    yield served
    stop_server(process)


@pytest.fixture(scope="session")
def queue_server(model_dir, tmp_path_factory) -> Served:
    """Without a token; a batch of 4 closes only when full (--max-wait-ms of ten minutes), so
    what is queued stays queued until a test fills the batch; 4 images may wait. A test that
    queues images fills the batch before it ends."""
    log = tmp_path_factory.mktemp("queue") / "server.log"
    process, served = start_server(
        model_dir, log, "--max-batch", "4", "--max-wait-ms", "600000", "--max-queue", "4",
        token=None,
    )  # fmt: skip
    yield served
    stop_server(process)


# The files predict.py grades once for the whole session, in an order that gives each model call
# two graded photographs (the server's --max-batch, padded): bit-equal outputs need the same
# batch shape. good_jpeg twice, so that the seven good photographs make full pairs.
PREDICTED = (
    "good_jpeg", "good_png", "good_jpeg_2", "good_png_2", "grayscale", "sixteen_bit", "formula",
    "good_jpeg", "truncated", "text",
)  # fmt: skip


@pytest.fixture(scope="session")
def predict_rows(model_dir, photos, tmp_path_factory):
    """predict.py's own CLI, run once in its own process on the photographs (`PREDICTED`):
    `predict_rows(paths)` its CSV rows for those paths (as text, as it wrote them),
    `predict_rows.csv_text(paths)` its CSV's header and those rows' lines."""
    out = tmp_path_factory.mktemp("predicted") / "predictions.csv"
    argv = [
        sys.executable, str(ROOT / "predict.py"), "--model-dir", str(model_dir), "--stage", "1",
        "--batch-size", str(MAX_BATCH), "--out", str(out), *(str(photos[r]) for r in PREDICTED),
    ]  # fmt: skip
    started = time.monotonic()
    done = run_group(
        argv,
        timeout=600,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    print(f"predict.py took {time.monotonic() - started:.1f} s")
    assert done.returncode == 1, done.stderr[-3000:]  # 1: some files failed, as they should
    assert f"preprocessing parameters from {model_dir.parent / 'data' / 'manifest.json'}" in (
        done.stderr
    )
    text = out.read_bytes().decode()
    header, *lines = text.split("\r\n")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == len(PREDICTED) and lines[-1] == ""
    by_path = {r["path"]: (r, line) for r, line in zip(rows, lines, strict=False)}

    def rows_for(paths: list[Path]) -> list[dict[str, str]]:
        return [by_path[str(p)][0] for p in paths]

    def csv_text(paths: list[Path]) -> str:
        return "\r\n".join([header, *(by_path[str(p)][1] for p in paths), ""])

    rows_for.csv_text = csv_text
    return rows_for


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()
