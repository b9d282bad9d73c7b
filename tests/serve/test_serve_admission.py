"""The grader's admission and failure handling, in this process (no model, no TensorFlow): the
budget and queue (`admission`), the wrong-token limiter and the host rule, the escaped log, the
batcher dropping gone requests and failing fast once stopped, and the app around a stand-in model
whose calls fail: a failing call fails its own images only, a stopped batcher makes /healthz fail.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import numpy as np
import pytest

from m2cnn_tf.serve import access
from m2cnn_tf.serve.admission import MB, REQUEST_OVERHEAD, Admission, Busy, TooLarge
from m2cnn_tf.serve.app import GRADING_FAILED, ServeSettings, create_app
from m2cnn_tf.serve.batching import BatcherStopped, MicroBatcher
from m2cnn_tf.serve.grader import Prepared
from m2cnn_tf.serve.guard import EscapeControlCharacters, HostRule, printable
from m2cnn_tf.serve.uploads import Limits

_HANG = 60.0  # a liveness bound (see test_serve_batching.py)
FAILS, STOPS = 0xF0, 0xF1  # first byte of an upload whose model call fails / kills the batcher


def test_tickets_hold_the_budget_and_the_queue_and_give_both_back():
    admission = Admission(10 * MB, max_queue=4)
    with admission.ticket() as first:
        first.hold_body(4 * MB)
        first.admit(3, MB)
        assert admission.used == REQUEST_OVERHEAD + 7 * MB and admission.images == 3
        with admission.ticket() as second:
            with pytest.raises(Busy, match="queue is full"):
                second.admit(2, 1)  # 3 + 2 > 4
            with pytest.raises(Busy, match="memory budget is in use"):
                second.hold_body(3 * MB)
            with pytest.raises(TooLarge, match="more than the server's memory budget"):
                second.hold_body(10 * MB)  # could never fit
            second.hold_body(MB)
            second.hold_body(MB // 2)  # holds only grow
            assert admission.used == 2 * REQUEST_OVERHEAD + 8 * MB
        assert admission.used == REQUEST_OVERHEAD + 7 * MB
    assert admission.used == 0 and admission.images == 0
    with admission.ticket() as alone:
        alone.admit(9, 1)  # an empty queue takes a request larger than its bound
        with pytest.raises(Busy):
            admission.check_queue()


def test_wrong_tokens_allow_a_burst_then_one_a_second_per_client(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: now[0])
    limiter = access.FailureLimiter(burst=3, seconds=1.0)
    for _ in range(3):
        assert limiter.wait("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.wait("10.0.0.1") == 1 and limiter.wait("10.0.0.2") == 0  # per client
    now[0] += 1.0
    assert limiter.wait("10.0.0.1") == 0  # one more, a second later
    limiter.failed("10.0.0.1")
    assert limiter.wait("10.0.0.1") == 1
    for address in ("2001:db8::1", "2001:db8::ffff"):  # one /64: one client
        limiter.failed(address)
    assert limiter._bucket("2001:db8::2").tokens == 1


@pytest.mark.parametrize(
    "host, token, allowed, answered",
    [
        ("127.0.0.1:8000", False, [], True),
        ("localhost:8000", False, [], True),
        ("[::1]:8000", False, [], True),
        ("127.1.2.3", False, [], True),
        ("attacker.example:8000", False, [], False),
        ("attacker.example:8000", True, [], True),  # a token: Host not checked ...
        ("attacker.example:8000", True, ["grader.example.org"], False),  # ... unless given
        ("Grader.Example.Org.", False, ["grader.example.org"], True),
        ("anything", False, ["*"], True),
        (None, False, [], False),
    ],
)
def test_the_host_rule(host, token, allowed, answered):
    assert HostRule.for_server("127.0.0.1", allowed, token=token).allows_host(host) == answered


def test_control_characters_are_escaped_in_every_logged_field():
    assert printable("GET /x\r\nFORGED\x1b[31m\u2028\u202e\\") == (
        "GET /x\\x0d\\x0aFORGED\\x1b[31m\\u2028\\u202e\\\\"
    )
    record = logging.LogRecord("m2cnn_tf.serve", logging.INFO, "", 0, "%s %s", ("a\nb", 7), None)
    EscapeControlCharacters().filter(record)
    assert record.getMessage() == "a\\x0ab 7"


# ---------------------------------------------------------------------------------------------
# The batcher


def test_a_gone_requests_items_leave_the_queue_before_any_call():
    calls = []

    async def main():
        batcher = MicroBatcher(lambda xs: calls.append(xs) or xs, max_batch=3, max_wait=_HANG)
        batcher.start()
        try:
            gone = asyncio.ensure_future(batcher.submit([1, 2]))
            while batcher.queued != 2:
                await asyncio.sleep(0.01)
            gone.cancel()  # the client disconnected
            while batcher.queued:
                await asyncio.sleep(0.01)
            return await batcher.submit([3, 4, 5])  # a full batch, called at once
        finally:
            await batcher.stop()

    assert asyncio.run(asyncio.wait_for(main(), _HANG)) == [3, 4, 5]
    assert calls == [[3, 4, 5]]


def test_a_stopped_batcher_fails_what_waits_and_refuses_what_comes():
    async def main():
        batcher = MicroBatcher(lambda xs: xs, max_batch=2, max_wait=_HANG)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit([1]))
        while batcher.queued != 1:
            await asyncio.sleep(0.01)
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await waiting
        with pytest.raises(BatcherStopped):
            await batcher.submit([2])
        return batcher.alive

    assert asyncio.run(asyncio.wait_for(main(), _HANG)) is False


# ---------------------------------------------------------------------------------------------
# The app around a stand-in model


class _Fatal(BaseException):
    """What kills the batcher's task (a bug, say): not an Exception, so no batch catches it."""


class _StandInGrader:
    """What create_app needs of a Grader: each upload becomes an 8×8 image of its first byte;
    the model fails for FAILS and kills its batcher for STOPS."""

    size, max_batch, max_decode_bytes = 8, 1, None

    def prepare(self, filename: str, data: bytes) -> Prepared:
        return Prepared(filename, np.full((8, 8, 3), data[0], np.uint8), None)

    def infer(self, jobs):
        marks = {int(job.image[0, 0, 0]) for job in jobs}
        if FAILS in marks:
            raise RuntimeError("model call failed in /opt/secret/libmodel.so")
        if STOPS in marks:
            raise _Fatal()
        probs = {f"p{k}": 0.2 for k in range(5)}
        return [{"grade": 1, "score": 1.0, **probs, "error": ""} for _ in jobs]

    def warm_up(self) -> None:
        pass

    def facts(self) -> dict:
        return {"stage": 1}


def _serve(scenario):
    """Run `await scenario(client)` against the app around the stand-in model, its lifespan
    (the batcher) started and stopped around it."""
    settings = ServeSettings(
        Limits(MB, 8), max_wait_ms=0, hosts=HostRule.for_server("testserver", (), token=False)
    )
    guarded = create_app(_StandInGrader(), settings)

    async def main():
        async with guarded.app.router.lifespan_context(guarded.app):
            transport = httpx.ASGITransport(app=guarded)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await scenario(c)

    return asyncio.run(asyncio.wait_for(main(), _HANG))


def _files(*first_bytes: int) -> list[tuple]:
    return [("files", (f"{b}.png", bytes([b]), "image/png")) for b in first_bytes]


def test_a_failing_model_call_fails_its_own_images_only(caplog):
    async def scenario(client):
        return await client.post("/v1/grade", files=_files(1, FAILS, 2)), await client.get(
            "/healthz"
        )

    with caplog.at_level(logging.ERROR, logger="m2cnn_tf.serve"):
        reply, health = _serve(scenario)
    assert reply.status_code == 200
    errors = [r["error"] for r in reply.json()["results"]]
    assert errors == [None, GRADING_FAILED, None]
    assert "/opt/secret" not in reply.text and "/opt/secret/libmodel.so" in caplog.text
    assert health.json() == {"status": "ok"}


def test_a_stopped_batcher_makes_healthz_fail_and_grading_answer_at_once():
    async def scenario(client):
        first = await client.post("/v1/grade", files=_files(STOPS))
        health = await client.get("/healthz")
        later = await client.post("/v1/grade", files=_files(1))  # at once, not left waiting
        return first, health, later

    first, health, later = _serve(scenario)
    assert first.status_code == 200 and first.json()["results"][0]["error"] == GRADING_FAILED
    assert health.status_code == 503
    assert health.json() == {"status": "failing", "detail": "the model's batcher has stopped"}
    assert later.status_code == 200 and later.json()["results"][0]["error"] == GRADING_FAILED
