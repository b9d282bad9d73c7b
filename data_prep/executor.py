"""How images reach the worker processes: an ordered, bounded map over a process pool."""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from data_prep.worker import Settings, init_worker

TASK_TIMEOUT = 300  # seconds; one image takes well under one


class Executor:
    """Ordered map of an image's arguments (its path, ...) → result over worker processes, with
    a bounded window so memory stays flat however large the dataset. One worker runs in-process.

    Workers fork from a forkserver that imported only data_prep.worker: they never inherit
    TensorFlow (or its threads) from the parent, whatever the parent has imported.
    """

    def __init__(self, settings: Settings):
        self.workers = settings.workers
        self.pool = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["data_prep.worker"])
            self.pool = ctx.Pool(self.workers, initializer=init_worker, initargs=(settings,))
        else:
            init_worker(settings, in_process=True)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(
        self, fn: Callable[..., Any], tasks: Iterable[Any], args: Callable[[Any], tuple]
    ) -> Iterator[tuple[Any, Any]]:
        """(task, fn(*args(task))) in task order; only the plain arguments (a path, a switch)
        cross to the workers."""
        if self.pool is None:
            for task in tasks:
                yield task, fn(*args(task))
            return
        window: collections.deque = collections.deque()
        for task in tasks:
            window.append((task, self.pool.apply_async(fn, args(task))))
            if len(window) >= 4 * self.workers:
                yield self._next(window)
        while window:
            yield self._next(window)

    @staticmethod
    def _next(window: collections.deque) -> tuple[Any, Any]:
        # A worker killed by a crashing decoder never answers; Pool would wait forever.
        head, result = window.popleft()
        try:
            return head, result.get(timeout=TASK_TIMEOUT)
        except multiprocessing.TimeoutError:
            return head, f"worker crashed or took over {TASK_TIMEOUT} s"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
