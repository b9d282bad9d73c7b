"""serve.py's own flags, each by what it does to a real server: --token given on the command line
(the environment variable is the session server's), --cutpoints grading by those cut points,
--data taking that manifest's preprocessing parameters; Ctrl-C stops it with exit 130, and a
port already taken is a one-line usage error (exit 2).

One server (a real `python serve.py`) carries all three flags; the Ctrl-C test stops it, and a
test that runs after that starts it again, so the tests hold in any order.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from _served import SIZE, TOKEN, Served, start_server, stop_server, upload

from m2cnn_tf.commands import serve as serve_command
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_file

FLAG_TOKEN = "flag-token-0b9d-4e2f-a7c3"  # not the session server's TOKEN
CUTPOINTS = (0.25, 0.5, 0.75, 1.0)  # far from rounding's, so most grades move
# Other Eq. (1) constants, mask and base size than the model's own data (conftest's PARAMS).
OTHER = PreprocessParams(alpha=3.0, beta=-3.0, rho=8.0, mask_fraction=0.8, base_size=192)
ROLES = ("good_jpeg", "good_png", "good_jpeg_2", "good_png_2", "grayscale")


class FlaggedServer:
    """serve.py with --token, --cutpoints and --data, started when first asked for (again after
    a test stopped it)."""

    def __init__(self, model_dir: Path, root: Path):
        self.model_dir, self.root = model_dir, root
        self.data = root / "other_data"
        self.data.mkdir()
        manifest = {"params": {"sizes": [SIZE], "preprocess": OTHER.to_dict()}}
        (self.data / "manifest.json").write_text(json.dumps(manifest))
        self.process, self.served, self.starts = None, None, 0

    def get(self) -> Served:
        if self.process is None:
            self.starts += 1
            self.process, self.served = start_server(
                self.model_dir, self.root / f"server{self.starts}.log",
                "--token", FLAG_TOKEN, "--cutpoints", ",".join(map(str, CUTPOINTS)),
                "--data", str(self.data), token=None,
            )  # fmt: skip
        return self.served

    def stop(self) -> int | None:
        code = None if self.process is None else stop_server(self.process)
        self.process = None
        return code


@pytest.fixture(scope="module")
def flagged(model_dir, tmp_path_factory):
    server = FlaggedServer(model_dir, tmp_path_factory.mktemp("flagged"))
    try:
        yield server
    finally:
        server.stop()


def _grade(served: Served, paths: list[Path], **params) -> list[dict]:
    with served.client(token=FLAG_TOKEN) as client:
        reply = client.post("/v1/grade", files=upload(paths), params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["results"]


@pytest.mark.slow
def test_the_token_given_as_a_flag_is_the_one_required(flagged, photos):
    served = flagged.get()
    files = upload([photos["good_jpeg"]])
    with served.client(token=None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.post("/v1/grade", files=files).status_code == 401
    with served.client(token=TOKEN) as other:  # the environment's token elsewhere: not this one
        assert other.get("/v1/model").status_code == 401
    with served.client(token=FLAG_TOKEN) as client:
        assert client.get("/v1/model").status_code == 200
        assert client.post("/v1/grade", files=files).json()["results"][0]["error"] is None


@pytest.mark.slow
def test_cutpoints_grade_each_score_by_the_cut_points_given(flagged, photos):
    served = flagged.get()
    results = _grade(served, [photos[r] for r in ROLES])
    moved = 0
    for result in results:
        score = result["score"]
        by_hand = sum(score >= c for c in CUTPOINTS)  # a grade: how many cut points it passes
        assert result["grade"] == by_hand, (score, result["grade"])
        assert result["referable"] == (by_hand >= 2)
        moved += by_hand != min(4, max(0, int(np.floor(score + 0.5))))  # rounding's grade
    assert moved >= 1, [r["score"] for r in results]
    with served.client(token=FLAG_TOKEN) as client:
        assert client.get("/v1/model").json()["cutpoints"] == list(CUTPOINTS)


@pytest.mark.slow
def test_data_gives_the_preprocessing_parameters_of_its_manifest(flagged, photos):
    """The model's input (the Grad-CAM panel's left half) is exactly preprocess_file's with the
    --data manifest's parameters, not with those of the model's own training data."""
    served = flagged.get()
    source = str(flagged.data / "manifest.json")
    log = served.log.read_text(errors="replace")
    assert f"serve.py: preprocessing parameters from {source}" in log
    with served.client(token=FLAG_TOKEN) as client:
        facts = client.get("/v1/model").json()["preprocessing"]
    assert facts == {**OTHER.to_dict(), "source": source}
    results = _grade(served, [photos["good_jpeg"], photos["good_png"]], gradcam="1")
    for role, result in zip(("good_jpeg", "good_png"), results, strict=True):
        png = np.frombuffer(base64.b64decode(result["gradcam_png"]), np.uint8)
        left = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)[:, :SIZE]
        np.testing.assert_array_equal(left, preprocess_file(photos[role], [SIZE], OTHER)[SIZE])
        default = preprocess_file(photos[role], [SIZE], PreprocessParams())[SIZE]
        assert not np.array_equal(left, default)


@pytest.mark.slow
def test_ctrl_c_stops_serve_py_with_exit_130_and_frees_its_port(flagged):
    served = flagged.get()
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    assert flagged.stop() == 130
    assert "serve.py: interrupted" in served.log.read_text(errors="replace")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10).close()


def test_a_port_already_taken_is_a_one_line_usage_error(server, model_dir, capsys):
    """The session server's port: refused before anything is loaded."""
    port = server.url.rsplit(":", 1)[1]
    args = ["--model-dir", str(model_dir), "--stage", "1", "--port", port]
    code = serve_command.run(["serve.py", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"serve.py: error: --port: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in err
