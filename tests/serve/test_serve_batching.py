"""m2cnn_tf.serve.batching: which waiting items share a model call, and where that call runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from m2cnn_tf.serve.batching import MicroBatcher

# A liveness bound, not a speed assertion: a batcher that never closes a full batch, or runs
# the call on the event loop, would hang; the tests fail after this instead.
_HANG = 60.0


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, _HANG))


def test_items_waiting_together_share_calls_of_at_most_max_batch_in_order():
    calls = []

    def process(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(process, max_batch=2, max_wait=_HANG)  # closes when full
        batcher.start()
        try:
            return await batcher.submit([1, 2, 3, 4])
        finally:
            await batcher.stop()

    assert _run(main()) == [10, 20, 30, 40]
    assert calls == [[1, 2], [3, 4]]


def test_requests_arriving_within_max_wait_are_graded_in_one_call():
    calls = []

    async def main():
        batcher = MicroBatcher(lambda xs: calls.append(xs) or xs, max_batch=8, max_wait=0.5)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await asyncio.sleep(0)  # the batch is open and waiting for company
            second = await batcher.submit(["b", "c"])
            return await first, second
        finally:
            await batcher.stop()

    assert _run(main()) == (["a"], ["b", "c"])
    assert calls == [["a", "b", "c"]]


def test_the_call_runs_off_the_event_loop_which_keeps_serving_meanwhile():
    release = threading.Event()
    seen = {}

    def process(items):
        seen["thread"] = threading.current_thread().name
        assert release.wait(_HANG)  # blocks until the event loop has answered something
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch=1, max_wait=0)
        batcher.start()
        try:
            pending = asyncio.ensure_future(batcher.submit([1]))
            while "thread" not in seen:  # the call has started ...
                await asyncio.sleep(0.01)
            release.set()  # ... and this coroutine still runs: the loop is free
            return await pending
        finally:
            await batcher.stop()

    assert _run(main()) == [1]
    assert seen["thread"].startswith("model") and seen["thread"] != threading.main_thread().name


def test_a_failing_call_fails_its_own_batch_only():
    def process(items):
        if "bad" in items:
            raise RuntimeError("model call failed")
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch=1, max_wait=0)
        batcher.start()
        try:
            failed = await asyncio.gather(batcher.submit(["bad"]), return_exceptions=True)
            return failed[0], await batcher.submit(["good"])
        finally:
            await batcher.stop()

    error, good = _run(main())
    assert isinstance(error, RuntimeError) and good == ["good"]


@pytest.mark.parametrize("kw", [{"max_batch": 0, "max_wait": 0}, {"max_batch": 1, "max_wait": -1}])
def test_limits_must_make_sense(kw):
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, **kw)
