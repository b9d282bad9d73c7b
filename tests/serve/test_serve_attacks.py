"""serve.py (a real process, with a token) against issue 19's attacks on what a request carries:
files whose header and decoder disagree on their size, bodies and heads over every limit, an
unusable boundary, log injection, token guessing and framing. Each case checks the status, the
JSON reason, that no answer shows how the server is built, and that a good photograph is still
graded afterwards.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from _attacks import (
    connect,
    jpeg_hidden_frame,
    read_answer,
    read_until_closed,
    tiff_repeated_size,
)
from _served import TOKEN, serving, upload, upload_bytes, wait_for

from m2cnn_tf.commands import serve as serve_command

# What an answer must never show: a library's build path, version banner, source file or stack.
SERVER_DETAIL = re.compile(r"OpenCV|/io/|\.cpp|\.py\b|site-packages|Traceback|cv2|PIL|line \d")
BOUNDARY = "b0undary"


def _still_grades(server, photos) -> None:
    with server.client() as client:
        reply = client.post("/v1/grade", files=upload([photos["good_jpeg"]]))
    assert reply.status_code == 200
    assert reply.json()["results"][0]["error"] is None


def _secured(reply: httpx.Response) -> None:
    """The headers every answer carries, whatever produced it."""
    assert reply.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "server" not in reply.headers  # no "uvicorn"


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def _chunked(server, pieces) -> httpx.Response:
    """POST /v1/grade with a body of unknown length (chunked), from an iterator of bytes."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with server.client() as client:
        return client.post("/v1/grade", content=iter(pieces), headers=headers)


# ---------------------------------------------------------------------------------------------
# The pixel limit: the header check and the decoder see one size


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("decoy.tif", tiff_repeated_size(), "tag 256 is repeated"),
        ("decoy.jpeg", jpeg_hidden_frame(), "7300 × 7124 px, over the limit of 50 megapixels"),
        ("giga.tif", tiff_repeated_size((40_000, 40_000)), "tag 256 is repeated"),
    ],
    ids=["tiff-repeated-size-tags", "jpeg-frame-behind-ff00", "tiff-1.6-gigapixels"],
)
def test_files_whose_size_a_checker_could_misread_are_refused(server, photos, name, data, reason):
    with server.client() as client:
        reply = client.post("/v1/grade", files=upload_bytes((name, data)))
    assert reply.status_code == 200
    (result,) = reply.json()["results"]
    assert result["grade"] is None and reason in result["error"]
    assert not SERVER_DETAIL.search(reply.text)
    _still_grades(server, photos)


# ---------------------------------------------------------------------------------------------
# Limits on everything a request carries


def test_non_file_fields_are_bounded_in_count_and_size_without_content_length(server, photos):
    photo = _part("files", photos["good_jpeg"].read_bytes(), "a.jpeg")
    many = _chunked(server, [_part(f"note{i}", b"x") for i in range(5000)] + [photo])
    assert many.status_code == 413
    assert many.json() == {"detail": "more than 16 form fields that are not 'files'"}
    large = _chunked(server, [_part("note", b"x" * 40_000) for _ in range(2)] + [photo])
    assert large.status_code == 413 and "hold over 64 KB" in large.json()["detail"]
    _still_grades(server, photos)


def test_data_after_the_closing_boundary_is_refused(server, photos):
    photo = _part("files", photos["good_jpeg"].read_bytes(), "a.jpeg")
    end = f"--{BOUNDARY}--\r\n".encode()
    reply = _chunked(server, [photo, end] + [b"e" * 65536] * 32)  # 2 MB of epilogue
    assert reply.status_code == 413
    assert reply.json() == {"detail": "too much data after the end of the multipart body"}
    assert _chunked(server, [photo, end, b"\r\n"]).status_code == 200  # a CRLF is fine
    _still_grades(server, photos)


def test_a_body_declared_over_the_limits_is_refused_before_it_is_sent(server, photos):
    """Content-Length over what --max-files files of --max-upload-mb can need: 413 at once,
    with not a byte of the body sent."""
    sock = connect(server.url)
    try:
        sock.sendall(
            f"POST /v1/grade HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            "Content-Length: 1000000000\r\n\r\n".encode()
        )
        head, body = read_answer(sock)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body) == {"detail": "the request is larger than the server's limits allow"}
    _still_grades(server, photos)


def test_a_header_over_16_kb_gets_431_whole_or_in_pieces(server, photos):
    with server.client() as client:
        reply = client.get("/v1/model", headers={"X-Big": "y" * 20_000})
    assert reply.status_code == 431
    assert reply.json() == {"detail": "the request's headers are larger than 16 KB"}
    _secured(reply)
    sock = connect(server.url)  # a head that grows past the limit before it ends
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(24):
            sock.sendall(b"X-Pad: " + b"p" * 1000 + b"\r\n")
        answer = read_until_closed(sock)
    except ConnectionResetError:
        pytest.fail("the connection was reset instead of answered")
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert json.loads(body) == {"detail": "the request's headers are larger than 16 KB"}
    _still_grades(server, photos)


def test_a_boundary_over_70_characters_is_a_400_not_a_500(server, photos):
    boundary = "q" * 300
    with server.client() as client:
        reply = client.post(
            "/v1/grade",
            content=f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert reply.status_code == 400
    assert reply.json() == {
        "detail": "the multipart boundary is longer than 70 characters (RFC 2046)"
    }
    _secured(reply)
    _still_grades(server, photos)


# ---------------------------------------------------------------------------------------------
# Logs, token, headers


def test_a_crlf_in_the_path_cannot_forge_a_log_line(server, photos):
    sock = connect(server.url)
    try:
        sock.sendall(
            b"GET /x%0D%0AFORGED%20200%20OK HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert read_until_closed(sock).startswith(b"HTTP/1.1 404 ")
    finally:
        sock.close()

    def logged() -> str | None:
        text = server.log.read_text(errors="replace")
        return text if "FORGED" in text else None

    log = wait_for(logged, "the request's log line")
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "GET /x\\x0d\\x0aFORGED 200 OK 404" in log
    _still_grades(server, photos)


def test_the_token_page_posts_and_the_form_opens_the_page(server):
    with server.client(token=None, follow_redirects=False) as anonymous:
        asking = anonymous.get("/")
        assert asking.status_code == 401 and '<form method="post" action="/">' in asking.text
        wrong = anonymous.post("/", data={"token": "not-the-token-at-all"})
        assert wrong.status_code == 401 and "not the right one" in wrong.text
        opened = anonymous.post("/", data={"token": TOKEN})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert TOKEN not in opened.headers["location"]
        assert anonymous.get("/").status_code == 200  # the cookie stands for the token


def test_wrong_tokens_are_limited_per_client_after_a_burst(server):
    """From 127.0.0.2 (its own address to the limiter): a burst of 401s, then 429 with
    Retry-After for every attempt, the right token too, while 127.0.0.1 is unaffected; after
    Retry-After the right token is accepted again."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    guesser = httpx.Client(base_url=server.url, transport=transport, timeout=120, trust_env=False)
    try:
        codes = [
            guesser.get("/v1/model", headers={"Authorization": f"Bearer guess-{i:012d}"})
            for i in range(30)
        ]
        statuses = [r.status_code for r in codes]
        first_429 = statuses.index(429)
        assert 1 <= first_429 <= 10 and set(statuses[first_429:]) == {429}
        limited = codes[first_429]
        assert limited.json()["detail"].startswith("too many wrong tokens")
        assert int(limited.headers["retry-after"]) >= 1
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert guesser.get("/v1/model", headers=right).status_code == 429  # not checked
        with server.client() as other:
            assert other.get("/v1/model").status_code == 200
        wait_for(
            lambda: guesser.get("/v1/model", headers=right).status_code == 200,
            "the limiter to let the right token through again",
        )
    finally:
        guesser.close()


@pytest.mark.parametrize("source", ["flag", "environment"])
def test_a_token_shorter_than_16_characters_is_a_usage_error(source, capsys, monkeypatch):
    args = ["serve.py", "--model-dir", "m", "--stage", "1"]
    if source == "flag":
        args += ["--token", "x" * 15]
    else:
        monkeypatch.setenv(serve_command.TOKEN_ENV, "x" * 15)
    code = serve_command.run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("serve.py: error: --token: must be at least 16 characters (got 15")


def test_every_answer_carries_the_security_headers_docs_included(server):
    with server.client() as client:
        answers = [
            client.get("/docs"),
            client.get("/v1/model"),
            client.get("/no-such-page"),
            client.get("/static/grader.js"),
            client.post("/v1/grade"),
        ]
    with server.client(token=None) as anonymous:
        answers += [anonymous.get("/healthz"), anonymous.get("/v1/model")]
    assert [a.status_code for a in answers] == [200, 200, 404, 200, 422, 200, 401]
    for answer in answers:
        _secured(answer)
    docs_policy = answers[0].headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in docs_policy and "unsafe-eval" not in docs_policy


def test_every_request_gives_back_its_share_of_the_budget_and_the_queue(server):
    """After this module's refused, failed and graded requests, nothing is still held."""
    counters = serving(server)
    assert counters["max_inflight_mb"] == 1024 and counters["max_queue"] == 64
    assert counters["inflight_mb"] == 0 and counters["images_admitted"] == 0
    assert counters["images_queued"] == 0


def test_serve_py_sets_its_decoders_limit_before_opencv_loads(server):
    """What `limit_decoders` does (test_serve_decoding.py) is done in the served process."""
    assert serving(server)["decoder_max_megapixels"] == 50
