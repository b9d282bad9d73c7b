"""serve.py --backend litert: the grader on the LiteRT runtime grades without TensorFlow.

A fresh `serve.py` process on the served model's float32 LiteRT export: its first grading
request is answered, with predict.py's grades and its Keras numbers within the float32 export's
1e-4 (docs/prediction.md), while the process has mapped no TensorFlow library (Keras, which
imports TensorFlow, neither); only a request for Grad-CAM, which needs the Keras model, loads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _served import start_server, stop_server, upload

from m2cnn_tf.commands import export as export_cmd


def tensorflow_mapped(pid: int) -> list[str]:
    """The TensorFlow shared libraries a process has mapped (its /proc/PID/maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in maps if "/" in line}
    return sorted(p for p in paths if "/tensorflow/" in p or "libtensorflow" in p)


@pytest.mark.slow
def test_the_litert_grader_answers_without_ever_loading_tensorflow(
    model_dir, photos, predict_rows, tmp_path
):
    args = [f"--model-dir={model_dir}", "--stage=1", "--format=litert", "--quantize=none"]
    assert export_cmd.run(["export.py", *args]) == 0
    process, served = start_server(model_dir, tmp_path / "server.log", "--backend", "litert")
    paths = [photos[r] for r in ("good_jpeg", "good_png", "good_jpeg_2", "grayscale")]
    try:
        with served.client() as client:
            assert client.get("/v1/model").json()["backend"] == "litert"
            reply = client.post("/v1/grade", files=upload(paths))
            assert reply.status_code == 200, reply.text
            results = reply.json()["results"]
            assert tensorflow_mapped(process.pid) == []
            expected = predict_rows(paths)  # predict.py's CSV, from the Keras checkpoint
            assert [r["error"] for r in results] == [None] * len(paths)
            assert [r["grade"] for r in results] == [int(row["grade"]) for row in expected]
            np.testing.assert_allclose(
                [[r["score"], *r["probabilities"]] for r in results],
                [[float(row[k]) for k in ("score", "p0", "p1", "p2", "p3", "p4")]
                 for row in expected],
                atol=1e-4,
            )  # fmt: skip
            assert len({r["score"] for r in results}) == len(paths)  # not a constant's
            # Grad-CAM needs gradients: the Keras model (and TensorFlow) load now, not before.
            reply = client.post("/v1/grade?gradcam=1", files=upload([photos["good_jpeg"]]))
            assert reply.status_code == 200 and reply.json()["results"][0]["gradcam_png"]
            assert tensorflow_mapped(process.pid) != []
    finally:
        stop_server(process)
