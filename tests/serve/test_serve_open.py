"""serve.py without a token (the loopback default), a real process with short deadlines: only its
own Host names are answered (DNS rebinding), no other site's page may post to it, and clients
that send their head, their body or nothing too slowly are answered 408 or closed.

The deadlines are one second here; the checks wait for the server to act with generous bounds
(`wait_for`, the trickles' lengths), so a slow machine makes them slower, never wrong.
"""

from __future__ import annotations

import json

import pytest
from _attacks import connect, read_answer, read_until_closed, trickle
from _served import start_server, stop_server, upload

ALLOWED = "grader.example.org"


@pytest.fixture(scope="module")
def open_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("open") / "server.log"
    process, served = start_server(
        model_dir, log, "--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1",
        "--allowed-hosts", ALLOWED, token=None,
    )  # fmt: skip
    yield served
    stop_server(process)


def _still_grades(served, photos) -> None:
    with served.client(token=None) as client:
        reply = client.post("/v1/grade", files=upload([photos["good_jpeg"]]))
    assert reply.status_code == 200 and reply.json()["results"][0]["error"] is None


@pytest.mark.slow
def test_only_its_own_host_names_are_answered(open_server, photos):
    port = open_server.url.rsplit(":", 1)[1]
    with open_server.client(token=None) as client:
        for host in (f"attacker.example:{port}", "attacker.example", f"192.0.2.7:{port}"):
            for reply in (
                client.get("/v1/model", headers={"Host": host}),
                client.get("/", headers={"Host": host}),
                client.post(
                    "/v1/grade", files=upload([photos["good_jpeg"]]), headers={"Host": host}
                ),
            ):
                assert reply.status_code == 400, host
                assert reply.json() == {
                    "detail": "this server does not answer for that Host (its own address only)"
                }
            assert client.get("/healthz", headers={"Host": host}).status_code == 200
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", ALLOWED):
            assert client.get("/v1/model", headers={"Host": host}).status_code == 200, host
    _still_grades(open_server, photos)


@pytest.mark.slow
def test_another_sites_page_cannot_post(open_server, photos):
    port = open_server.url.rsplit(":", 1)[1]
    files = upload([photos["good_jpeg"]])
    with open_server.client(token=None) as client:
        for origin in ("http://attacker.example", "null", f"http://127.0.0.1:{int(port) + 1}"):
            reply = client.post("/v1/grade", files=files, headers={"Origin": origin})
            assert reply.status_code == 403, origin
            assert reply.json() == {
                "detail": "cross-origin request refused: send it from the grader's own page"
            }
        for origin in (open_server.url, f"https://{ALLOWED}", None):
            headers = {"Origin": origin} if origin else {}
            reply = client.post("/v1/grade", files=files, headers=headers)
            assert reply.status_code == 200, origin
    _still_grades(open_server, photos)


@pytest.mark.slow
def test_slow_heads_and_silent_connections_are_closed(open_server, photos):
    """Issue 19's case: 64 connections sending their head a byte at a time and 16 sending
    nothing; each is answered 408 (or, having sent nothing, closed) soon after its second."""
    slow = [connect(open_server.url) for _ in range(64)]
    silent = [connect(open_server.url) for _ in range(16)]
    try:
        head = b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 600
        assert trickle(slow, head) == []  # each answered before its head (60 s) ran out
        for sock in slow:
            answer = read_until_closed(sock)
            status, _, body = answer.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 408 ")
            assert json.loads(body) == {"detail": "the request's head arrived too slowly"}
        assert [read_until_closed(sock) for sock in silent] == [b""] * 16
    finally:
        for sock in slow + silent:
            sock.close()
    _still_grades(open_server, photos)


@pytest.mark.slow
def test_a_body_that_trickles_is_cut_off(open_server, photos):
    sock = connect(open_server.url)
    try:
        sock.sendall(
            b"POST /v1/grade HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
        )
        assert trickle([sock], b"--b0undary\r\n" + b"x" * 1000) == []  # 100 s at most
        status, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    finally:
        sock.close()
    assert status.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body) == {"detail": "the request's body arrived too slowly"}
    _still_grades(open_server, photos)


@pytest.mark.slow
def test_kept_alive_connections_are_closed_when_idle_or_slow(open_server, photos):
    idle, slow = connect(open_server.url), connect(open_server.url)
    try:
        for sock in (idle, slow):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"status": "ok"}
        slow.sendall(b"G")  # a next request begun at once, never finished: its head is late
        assert read_until_closed(idle) == b""  # nothing more sent: closed without a word
        status, _, body = read_until_closed(slow).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body) == {"detail": "the request's head arrived too slowly"}
    finally:
        idle.close()
        slow.close()
    _still_grades(open_server, photos)
