"""m2cnn_tf.common: what the commands share that is not a command-line contract."""

import gc
import weakref

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
