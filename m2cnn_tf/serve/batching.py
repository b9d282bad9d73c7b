"""Which waiting images go into one model call: micro-batching for a server with one model.

Requests that arrive together are graded in one call: the first waiting item opens a batch,
which closes when it holds `max_batch` items or when that first item has waited `max_wait`
seconds, whichever comes first. The call runs on one dedicated thread, so the event loop (and
`/healthz`) stays free while a batch computes, and calls never overlap on the model. Items that
arrive during a call wait in the queue and form the next batch at once. Free of TensorFlow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
        self._queue: asyncio.Queue[tuple[T, asyncio.Future, float]] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

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
        """Queue the items together (one request's files stay adjacent) and await their results."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._queue.put_nowait((item, future, now))
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[T, asyncio.Future, float]]:
        batch = [await self._queue.get()]
        deadline = batch[0][2] + self.max_wait  # counted from when the first item arrived
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        return [entry for entry in batch if not entry[1].done()]  # drop cancelled requests

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            items = [item for item, _, _ in batch]
            try:
                results = await loop.run_in_executor(self._thread, self.process, items)
            except Exception as err:  # the batch fails, the server goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.calls += 1
            self.items += len(items)
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
