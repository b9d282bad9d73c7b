"""serve.py's HTTP API through a real uvicorn server: grades equal predict.py's, the Grad-CAM
panel is the model's input beside its overlay, every bad file gets its own error and a doubtful
one its warning, request limits give 413/422, the token guards the page and the API, its cookie
and every answer's headers are strict, and nothing of an upload reaches the log.

References: predict.py's own CSV (its CLI, run in its own process) for the numbers,
`preprocess_file` and a hand-blended overlay for the panel, the policy written out directive by
directive, and the file formats' specifications (through Pillow's header reader) for the header
sizes.
"""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from _served import (
    MAX_FILES,
    MAX_UPLOAD_MB,
    PARAMS,
    SIZE,
    TOKEN,
    assert_printed_as,
    png_claiming,
    serving,
    upload,
    wait_for,
)
from PIL import Image
from synthetic_fundus import fundus

from m2cnn_tf.commands import serve as serve_command
from m2cnn_tf.preprocessing import preprocess_file
from m2cnn_tf.serve import image_headers

KEYS = {"filename", "grade", "score", "probabilities", "referable", "warnings", "error"}


def _grade(server, paths, names=None, **params) -> httpx.Response:
    with server.client() as client:
        return client.post("/v1/grade", files=upload(paths, names), params=params)


def test_healthz_and_the_model_panel_facts(server):
    with server.client(token=None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    with server.client() as client:
        facts = client.get("/v1/model").json()
    assert (facts["stage"], facts["resolution"], facts["preset"]) == (1, SIZE, "tiny")
    assert facts["val_kappa"] == pytest.approx(0.4321) and facts["date"]
    assert facts["training_data"]["images"] == {"train": 40, "val": 10, "test": 10}
    assert facts["preprocessing"]["base_size"] == 256
    assert facts["notice"] == "research use only, not a medical device"


def test_grades_scores_and_probabilities_equal_predict_pys_csv(server, photos, predict_rows):
    """The reference is predict.py's own CSV (its CLI, in its own process, on the same files):
    grades exactly, the numbers to the six decimals it prints (to the last bits, off oneDNN:
    `PLACE_ROUNDING`)."""
    paths = [photos[r] for r in ("good_jpeg", "good_png", "truncated", "good_jpeg_2", "grayscale")]
    response = _grade(server, paths)
    assert response.status_code == 200
    results = response.json()["results"]
    expected = predict_rows(paths)
    assert [r["filename"] for r in results] == [p.name for p in paths]
    for got, want in zip(results, expected, strict=True):
        assert set(got) == KEYS
        if want["error"]:
            assert got["error"] == want["error"] and got["grade"] is None
            continue
        assert got["error"] is None
        assert got["grade"] == int(want["grade"])
        assert_printed_as(got["score"], want["score"])
        for k, p in enumerate(got["probabilities"]):
            assert_printed_as(p, want[f"p{k}"])
        assert got["referable"] == (int(want["grade"]) >= 2)
    # The outputs differ between the photographs, so equality is not a constant's.
    graded = [r for r in results if r["error"] is None]
    assert len({r["score"] for r in graded}) == len(graded) == 4
    assert len({r["grade"] for r in graded}) >= 2


def test_each_bad_file_gets_its_own_error_and_the_rest_is_graded(server, photos):
    roles = ["good_jpeg", "truncated", "text", "empty", "bomb", "grayscale", "sixteen_bit"]
    response = _grade(server, [photos[r] for r in roles])
    assert response.status_code == 200
    results = dict(zip(roles, response.json()["results"], strict=True))
    assert results["truncated"]["error"] == "truncated JPEG"
    assert results["text"]["error"].startswith("not an image")
    assert results["empty"]["error"] == "empty file"
    assert "60000 × 60000 px" in results["bomb"]["error"]
    assert "refused before decoding" in results["bomb"]["error"]
    for role in ("truncated", "text", "empty", "bomb"):
        assert results[role]["grade"] is None and results[role]["probabilities"] is None
    for role in ("good_jpeg", "grayscale", "sixteen_bit"):  # graded, as predict.py does
        assert results[role]["error"] is None and results[role]["grade"] in range(5)
    assert any("grayscale" in w for w in results["grayscale"]["warnings"])
    assert any("16-bit" in w for w in results["sixteen_bit"]["warnings"])
    assert results["good_jpeg"]["warnings"] == []
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_a_borderless_or_small_fundus_is_graded_with_a_warning_saying_so(server, tmp_path):
    """A photograph cropped inside the disc (bright corners: no dark border to find the disc
    by) and one whose fundus is about 57 px across, under the model's 96: each is graded, with
    the one warning that says why its grade may be less reliable."""
    whole = fundus(300, 400, seed=5, radius=0.47)
    borderless, small = tmp_path / "inside.png", tmp_path / "small.png"
    cv2.imwrite(str(borderless), whole[60:240, 110:290])  # every pixel within the disc
    cv2.imwrite(str(small), fundus(60, 80, seed=6, radius=0.47))
    diameter = 2 * int(0.47 * 60) + 1  # cv2.circle's, in pixels
    results = _grade(server, [borderless, small]).json()["results"]
    assert [r["error"] for r in results] == [None, None]
    assert all(r["grade"] in range(5) for r in results)
    (no_border,) = results[0]["warnings"]
    assert no_border.startswith("no clear fundus: no dark border around a disc was found")
    (low,) = results[1]["warnings"]
    found = re.fullmatch(
        r"low resolution: the fundus is (\d+) px across, enlarged to (\d+) px", low
    )
    assert found and int(found.group(2)) == SIZE
    assert abs(int(found.group(1)) - diameter) <= 2, low


def test_type_is_decided_by_content_not_by_file_name(server, photos):
    paths = [photos["good_png"], photos["good_jpeg"], photos["text"]]
    names = ["looks_like.jpg", "no_extension", "../../etc/passwd.png"]
    results = _grade(server, paths, names).json()["results"]
    assert [r["filename"] for r in results] == names  # echoed, never used as a path
    assert results[0]["error"] is None and results[1]["error"] is None
    assert results[2]["error"].startswith("not an image")


def _panel(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """A result's Grad-CAM panel as RGB: its left and right halves."""
    png = np.frombuffer(base64.b64decode(result["gradcam_png"]), np.uint8)
    panel = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert panel.shape == (SIZE, 2 * SIZE, 3)
    return panel[:, :SIZE], panel[:, SIZE:]


def test_gradcam_png_is_the_preprocessed_image_beside_its_overlay(server, photos):
    """Left: exactly preprocess_file's pixels for the file at the model's size, with the
    manifest's parameters. Right: the overlay, by hand. At 96 px the tiny model's last feature
    map is 1×1 and the score head is linear on its average, so the score's Grad-CAM is
    ReLU(score - bias), normalised: 1 (JET's deepest red, (128, 0, 0), blended in at 0.45
    everywhere) when the score is above the head's bias (2, conftest's `_spread_heads`), else 0
    (the overlay is the image itself)."""
    roles = ["good_jpeg", "good_png", "good_jpeg_2", "good_png_2", "grayscale", "text"]
    reply = _grade(server, [photos[r] for r in roles], gradcam="1")
    results = dict(zip(roles, reply.json()["results"], strict=True))
    assert set(results["good_jpeg"]) == KEYS | {"gradcam_png"}
    assert results["text"]["gradcam_png"] is None
    red = np.array([128, 0, 0], np.float32)
    hot = 0
    for role in roles[:-1]:
        left, right = _panel(results[role])
        expected = preprocess_file(photos[role], [SIZE], PARAMS)[SIZE]
        np.testing.assert_array_equal(left, expected)
        if results[role]["score"] > 2.0:
            hot += 1
            blended = np.round(left.astype(np.float32) * 0.55 + red * 0.45)
            assert np.abs(right.astype(np.float32) - blended).max() <= 1, role
            assert (right != left).any(axis=-1).mean() > 0.9, role
        else:
            np.testing.assert_array_equal(right, left)
    assert 0 < hot < len(roles) - 1  # both cases seen
    assert "gradcam_png" not in _grade(server, [photos["good_jpeg"]]).json()["results"][0]


def test_request_limits_answer_413_or_422_with_a_json_reason(server, photos, tmp_path):
    big = tmp_path / "big.jpeg"
    big.write_bytes(photos["good_jpeg"].read_bytes() + bytes(MAX_UPLOAD_MB * 1024 * 1024))
    too_big = _grade(server, [photos["good_jpeg"], big])
    assert too_big.status_code == 413 and "MB" in too_big.json()["detail"]
    too_many = _grade(server, [photos["good_jpeg"]] * (MAX_FILES + 1))
    assert too_many.status_code == 413 and str(MAX_FILES) in too_many.json()["detail"]
    with server.client() as client:
        only_a_field = client.post("/v1/grade", files={"note": (None, "hello")})
        no_body = client.post("/v1/grade")
        after = client.post("/v1/grade", files=upload([photos["good_jpeg"]]))
    assert only_a_field.status_code == 422 and "no files" in only_a_field.json()["detail"]
    assert no_body.status_code == 422 and "multipart" in no_body.json()["detail"]
    assert after.status_code == 200 and after.json()["results"][0]["error"] is None


def test_the_token_guards_the_page_and_the_api_but_not_healthz(server, photos):
    with server.client(token=None, follow_redirects=False) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/v1/model").status_code == 401
        assert anonymous.post("/v1/grade", files=upload([photos["good_jpeg"]])).status_code == 401
        assert anonymous.get("/docs").status_code == 401
        assert anonymous.get("/").status_code == 401  # the page that asks for the token
        assert anonymous.get("/", params={"token": "wrong"}).status_code == 401
        opened = anonymous.get("/", params={"token": TOKEN})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "httponly" in opened.headers["set-cookie"].lower()
        page = anonymous.get("/")  # the cookie now stands for the token
        assert page.status_code == 200 and 'id="results"' in page.text
    with server.client(token="wrong") as impostor:
        assert impostor.get("/v1/model").status_code == 401


def test_the_token_cookie_is_httponly_strict_and_secure_only_over_https(server):
    """Over plain HTTP the cookie cannot be Secure (the browser would drop it); behind a TLS
    proxy on this machine (X-Forwarded-Proto: https, trusted from loopback) it is."""
    with server.client(token=None, follow_redirects=False) as anonymous:
        plain = anonymous.get("/", params={"token": TOKEN})
        https = anonymous.get("/", params={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
    for reply, secure in ((plain, False), (https, True)):
        assert reply.status_code == 303
        cookie = SimpleCookie(reply.headers["set-cookie"])
        (morsel,) = cookie.values()
        assert morsel.value == TOKEN and morsel["path"] == "/"
        assert morsel["httponly"] is True and morsel["samesite"].lower() == "strict"
        assert bool(morsel["secure"]) is secure


def test_answers_forbid_sniffing_referrers_framing_and_any_other_sites_content(server):
    """The page's policy, directive by directive: its own scripts and styles only, images also
    from blob: and data: (the Grad-CAM panels), no plugins, no <base>, no framing, forms post
    to itself only; no MIME sniffing, no Referer."""
    with server.client() as client:
        answers = [client.get("/"), client.get("/v1/model"), client.get("/static/grader.js")]
    for reply in answers:
        assert reply.status_code == 200
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["referrer-policy"] == "no-referrer"
        policy = reply.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives == {
            "default-src": "'self'",
            "img-src": "'self' blob: data:",
            "object-src": "'none'",
            "base-uri": "'none'",
            "frame-ancestors": "'none'",
            "form-action": "'self'",
        }


def test_openapi_docs_are_served_from_the_package(server):
    with server.client() as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in docs.text
        assert "cdn" not in docs.text.lower()
        assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
        schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/v1/grade"]["post"]["requestBody"]["content"]


def test_uploads_and_the_token_never_reach_the_log(server, photos, tmp_path):
    secret = tmp_path / "secret.jpeg"
    secret.write_bytes(b"CONTENT-MARKER-93ac" * 100)
    _grade(server, [secret, photos["good_jpeg"]], ["NAME-MARKER-5d1e.jpeg", "x.jpeg"])
    with server.client(token=None) as client:
        client.get("/", params={"token": TOKEN})
    log = server.log.read_text(errors="replace")
    assert "POST /v1/grade 200" in log  # requests are logged ...
    for marker in ("CONTENT-MARKER", "NAME-MARKER", TOKEN):  # ... their contents are not
        assert marker not in log


@pytest.mark.slow
def test_healthz_answers_while_a_request_is_being_graded(queue_server, photos, predict_rows):
    """On the server whose batches close only when full (4): a request's three photographs wait
    in the queue, its grading under way by the server's own counters, while /healthz answers;
    a fourth photograph fills the batch, and the request gets predict.py's grades."""
    paths = [photos[r] for r in ("good_jpeg", "good_png", "good_jpeg_2")]

    def post(files: list[Path]) -> httpx.Response:
        with queue_server.client(token=None) as client:
            return client.post("/v1/grade", files=upload(files))

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, paths)
        wait_for(lambda: serving(queue_server, None)["images_queued"] == 3, "3 images queued")
        with queue_server.client(token=None) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
        counters = serving(queue_server, None)
        assert (counters["images_queued"], counters["images_admitted"]) == (3, 3)
        assert not pending.done()
        filler = post([photos["good_png_2"]])  # completes the batch
        reply = pending.result(timeout=600)
    assert reply.status_code == filler.status_code == 200
    results = reply.json()["results"]
    expected = predict_rows(paths)
    assert [r["error"] for r in results] == [None] * 3
    assert [r["grade"] for r in results] == [int(row["grade"]) for row in expected]
    # One call of 4 here, of 2 in predict.py: the last bits may differ (oneDNN), not more.
    got = [r["score"] for r in results]
    np.testing.assert_allclose(got, [float(row["score"]) for row in expected], atol=2e-6)


def test_server_binds_loopback_by_default_and_warns_elsewhere(server, capsys, tmp_path):
    assert server.url.startswith("http://127.0.0.1:")
    assert serve_command.FLAGS["host"].default == "127.0.0.1"
    code = serve_command.run(
        [
            "serve.py",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model-dir",
            str(tmp_path),
            "--stage",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "NO authentication" in err and "no checkpoint for stage 2" in err


def test_the_start_up_line_is_the_one_the_help_describes(server):
    """--help tells how to learn the port --port 0 picked: by the start-up line it quotes. That
    line, with the server's stage and address put in, is in the server's output."""
    (described,) = re.findall(r'start-up line "([^"]+)"', " ".join(serve_command.__doc__.split()))
    expected = described.replace("stage N", "stage 1").replace("URL", server.url)
    assert expected in server.log.read_text(errors="replace").splitlines()


@pytest.mark.parametrize("bad", [["--stage", "4"], ["--max-batch", "0"], ["--backend", "onnx"]])
def test_bad_flags_are_one_line_usage_errors(bad, capsys):
    code = serve_command.run(["serve.py", "--model-dir", "m", "--stage", "1", *bad])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("serve.py: error:")


# ---------------------------------------------------------------------------------------------
# Header sizes, without decoding (TF-free, no server)


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "I;16"),
                  ("TIFF", "RGB"), ("BMP", "RGB"), ("WEBP", "RGB"), ("WEBP", "RGBA")],
)  # fmt: skip
def test_header_sizes_match_pillows_reading(fmt, mode):
    image = Image.new(mode, (321, 123))
    data = io.BytesIO()
    image.save(data, fmt, **({"lossless": True} if mode == "RGBA" else {}))
    info = image_headers.inspect(data.getvalue())
    with Image.open(data) as reference:
        assert (info.width, info.height) == reference.size
    assert info.kind == fmt.lower().replace("webp", "webp")
    assert info.grayscale == (mode in ("L", "I;16"))


def test_a_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(image_headers.RefusedImage, match="refused before decoding"):
        image_headers.inspect(png_claiming(60_000, 60_000))
    assert image_headers.inspect(png_claiming(7000, 7000)).width == 7000  # 49 MP: accepted
