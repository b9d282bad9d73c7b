"""Which waiting images go into one model call: micro-batching for a server with one model.

Requests that arrive together are graded in one call: the first waiting item opens a batch,
which closes when it holds `max_batch` items or when that first item has waited `max_wait`
seconds, whichever comes first. The call runs on one dedicated thread, so the event loop (and
`/healthz`) stays free while a batch computes, and calls never overlap on the model. Items that
arrive during a call wait in the queue and form the next batch at once.

An item whose request has gone (its future cancelled: the client disconnected) leaves the queue
at once and never reaches the model. A failing call fails the items in it only. If the batcher
itself stops (shut down, or a bug), every item waiting is failed with `BatcherStopped` and new
ones are refused at once, so nothing waits for ever; `alive` says so (and `/healthz`). The queue's
bound is the caller's (`admission`). Free of TensorFlow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherStopped(RuntimeError):
    """The batcher is not running: nothing can be graded."""


@dataclasses.dataclass(frozen=True)
class _Entry(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float


class MicroBatcher(Generic[T, R]):
    """`await submit(items)` -> results in order; `process(batch)` sees at most `max_batch`.

    `process` maps a list of items to a list of results of the same length, on the model thread.
    If it raises, every item of that batch gets the exception.
    """

    def __init__(
        self, process: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_wait: float
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.calls = 0  # model calls so far, and the items they held (for /v1/model)
        self.items = 0
        self.call_seconds = 0.0  # how long the last model call took
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._current: list[_Entry] = []  # the batch in the model call now
        self._changed = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Items waiting for a model call (those of gone requests excluded)."""
        return sum(not entry.future.done() for entry in self._waiting)

    def retry_after(self) -> int:
        """Seconds until the queue as it stands has been through the model, at the last call's
        pace: what a refused client is told to wait (1 to 60)."""
        calls = math.ceil(self.queued / self.max_batch) + 1
        return min(60, max(1, math.ceil(calls * max(self.call_seconds, self.max_wait))))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True)

    async def run_on_model_thread(self, fn: Callable[[], R]) -> R:
        """Run `fn` on the model's thread (e.g. a warm-up call), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue the items together (one request's files stay adjacent) and await their results.
        Cancelling this (the request went away) takes its items out of the queue."""
        if not self.alive:
            raise BatcherStopped("the model's batcher is not running")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._waiting.append(_Entry(item, future, now))
            future.add_done_callback(lambda _: self._changed.set())
        self._changed.set()
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[_Entry]:
        while True:  # woken by every arrival and every cancellation
            self._waiting = collections.deque(e for e in self._waiting if not e.future.done())
            timeout = None
            if self._waiting:
                deadline = self._waiting[0].arrived + self.max_wait  # from the first's arrival
                timeout = deadline - time.monotonic()
                if len(self._waiting) >= self.max_batch or timeout <= 0:
                    count = min(self.max_batch, len(self._waiting))
                    return [self._waiting.popleft() for _ in range(count)]
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._current = await self._next_batch()
                items = [entry.item for entry in self._current]
                started = time.monotonic()
                try:
                    results = await loop.run_in_executor(self._thread, self.process, items)
                except Exception as err:  # the batch fails, the server goes on
                    self._settle(self._current, error=err)
                    continue
                finally:
                    self.call_seconds = time.monotonic() - started
                self.calls += 1
                self.items += len(items)
                for entry, result in zip(self._current, results, strict=True):
                    if not entry.future.done():
                        entry.future.set_result(result)
        finally:  # stopped: whatever waits is told so, now
            stopped = BatcherStopped("the model's batcher has stopped")
            self._settle([*self._current, *self._waiting], error=stopped)
            self._waiting.clear()

    @staticmethod
    def _settle(entries: Sequence[_Entry], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
