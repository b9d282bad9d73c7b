"""One grading server for the serve tests: a tiny model built in this session, served by a real
`python serve.py` on a free loopback port, with a token; photographs good and bad.

The server runs with --max-batch 2: a request's two good photographs then go through the model
in a call of the same shape as predict.py's batch of those two, so their numbers can be
compared bit for bit (oneDNN's CPU kernels round differently for other batch shapes).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from _served import PARAMS, SIZE, Served, png_claiming, start_server, stop_server
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
        "grayscale": _encode(".jpeg", cv2.cvtColor(good[2], cv2.COLOR_BGR2GRAY)),
        "sixteen_bit": _encode(".png", good[3].astype(np.uint16) * 257),
        "truncated": jpeg[: len(jpeg) // 2],
        "text": b"this is a text file, not a photograph\n",
        "empty": b"",
        "bomb": png_claiming(60_000, 60_000),
    }
    names = {"good_png": "1.png", "good_png_2": "3.png", "sixteen_bit": "16bit.png"}
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
def predict_rows(model_dir):
    """predict.py's rows for a list of files: its own library path (load_stage, the
    manifest's preprocessing parameters, Predictor with predict.py's defaults)."""
    from m2cnn_tf import checkpoints, manifest, prediction

    model, _ = checkpoints.load_stage(model_dir, 1)
    params, source = manifest.preprocess_params_for(model_dir, 1)
    assert params == PARAMS and source.endswith("manifest.json")
    predictor = prediction.Predictor(model, params)

    def rows(paths: list[Path]) -> list[dict]:
        return list(predictor.rows(paths))

    def csv_text(paths: list[Path]) -> str:
        out = io.StringIO()
        prediction.write_rows(rows(paths), out)
        return out.getvalue()

    rows.csv_text = csv_text
    return rows


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test`), every serve test goes to one worker: one server."""
    for item in items:
        if "tests/serve/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.xdist_group("serve"))
