"""m2cnn_tf.common: what the commands share that is not a command-line contract."""

import gc
import weakref

import pytest

from m2cnn_tf import common


class _Node:
    """An object that can hold itself in a cycle and be watched through a weak reference."""

    def __init__(self):
        self.me = self


def test_the_imports_are_frozen_once_per_process_and_later_cycles_are_still_collected():
    frozen = gc.get_freeze_count()
    assert frozen > 100_000  # conftest froze TensorFlow's and Keras's import-time objects
    node = _Node()
    common.freeze_imports()  # what a command called in this process does
    assert gc.get_freeze_count() == frozen  # once: the caller's objects (node) stay collectable
    watched = weakref.ref(node)
    del node
    gc.collect()
    assert watched() is None


def _collections_while(make) -> int:
    """How many collections the cyclic collector ran while `make()` ran."""
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(count)
    try:
        make()
    finally:
        gc.callbacks.remove(count)
    return len(runs)


def test_importing_runs_without_the_collector_and_turns_it_back_on_however_it_ends():
    def cycles():
        return [_Node() for _ in range(20_000)]  # far past gen 0's threshold (700)

    assert gc.isenabled() and _collections_while(cycles) > 0  # the collector would run
    with common.importing():
        assert _collections_while(cycles) == 0
    assert gc.isenabled()
    with pytest.raises(KeyError), common.importing():
        raise KeyError("an import that fails")
    assert gc.isenabled()
