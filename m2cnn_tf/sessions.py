"""How one process trains one model after another (reproduce.py's 14 runs and 31 evaluations)
without keeping what the earlier ones used.

`keras.backend.clear_session()` is not enough under TensorFlow 2.21: `tf.custom_gradient`,
traced into a graph, registers its gradient function in TensorFlow's process-wide gradient
registry under a new name ("CustomGradient-<n>") and never removes it, and the function's
closure holds tensors of the traced graph. Every Keras train step traces one (the optimizer
sums gradients over replicas through `ReplicaContext.all_reduce`, which has a custom gradient),
so each finished run's whole train graph stays alive, and with it the buffers of its weights
and optimizer slots (tensorflow/tensorflow#97697 and #80895, open). Measured here (2 cores,
2026-12-07, benchmarks/process_costs.py): a 10M-parameter Keras model fitted five times in
one process, with `clear_session` after each fit, grew the process by 128 MB per fit (its
weights and Adam's slots: 120 MB); with the registrations dropped, by none. On a GPU, a
reproduction of the paper preset would hold every finished run's weights and Adam slots until
it runs out of memory. In the tests' miniature reproduction, the graphs kept alive also made
each `clear_session` collection scan them: from 37,577 objects alive after the first run to
382,959 after the last.

`fresh_session` drops the registrations made inside its block, once the block is over, and
then clears the Keras session, whose collection frees those graphs. A gradient registered
there belongs to a graph traced there, which nothing differentiates again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

CUSTOM_GRADIENT = "CustomGradient-"  # tf.custom_gradient's names: custom_gradient.generate_name


def _gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's gradient registry (private: `ops._gradient_registry._registry`), or None
    where a TensorFlow version no longer has it (the leak stays; tests/test_sessions.py fails)."""
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


@contextlib.contextmanager
def fresh_session() -> Iterator[None]:
    """A block after which nothing it built is kept: its custom gradients are dropped from
    TensorFlow's registry, then the Keras session is cleared (a full collection: the block's
    graphs go now), however the block ends."""
    import keras

    registry = _gradient_registry()
    before = set(registry) if registry is not None else set()
    try:
        yield
    finally:
        if registry is not None:
            for name in set(registry) - before:
                if name.startswith(CUSTOM_GRADIENT):
                    del registry[name]
        keras.backend.clear_session()
