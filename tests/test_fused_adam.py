"""FusedAdam (m2cnn_tf/fused_adam.py) against Keras's own Adam, the independent reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from m2cnn_tf.fused_adam import FusedAdam
from m2cnn_tf.train_step import make_optimizer

SHAPES = ((3, 3, 4, 8), (8,), (17, 5))
STEPS = 20


def _start() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 1, s).astype("float32") for s in SHAPES]


def _trained(optimizer: keras.optimizers.Optimizer, jit_compile: bool) -> list[np.ndarray]:
    """The weights and both moments after STEPS updates by the same random gradients."""
    rng = np.random.default_rng(1)
    variables = [keras.Variable(w) for w in _start()]
    grads = [[rng.normal(0, s, w.shape).astype("float32") for w in variables]
             for s in np.linspace(0.1, 3.0, STEPS)]  # fmt: skip
    optimizer.build(variables)
    step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=jit_compile)
    for g in grads:
        step([tf.constant(x) for x in g])
    slots = [*optimizer._momentums, *optimizer._velocities]
    return [v.numpy() for v in (*variables, *slots)]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_fused_adam_moves_weights_and_moments_as_keras_adam_up_to_rounding(jit_compile):
    fused = _trained(FusedAdam(1e-2), jit_compile)
    reference = _trained(keras.optimizers.Adam(1e-2), jit_compile)
    start = _start() + [np.zeros(s, "float32") for s in SHAPES * 2]  # moments start at 0
    for ours, theirs, before in zip(fused, reference, start, strict=True):
        assert np.abs(theirs - before).max() > 1e-3  # each moved, far beyond the tolerance
        # The kernel forms 1-β2 from float32 β2 (1.0000047e-3), Keras from the Python float
        # (1e-3): the second moments differ by 5e-5 relative, the weights by float32 rounding.
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-6)


def test_the_train_steps_adam_is_fused_with_keras_adams_state_names():
    """Backups hold optimizer variables by path: the fused Adam's must be Keras Adam's."""
    optimizer = make_optimizer("adam", 1e-3)
    assert isinstance(optimizer, FusedAdam)
    weights = [keras.Variable(np.zeros((2, 3), "float32"), name="w")]
    names = []
    for opt in (optimizer, keras.optimizers.Adam(1e-3)):
        opt.build(weights)
        names.append([v.path.split("/", 1)[1] for v in opt.variables])
    assert names[0] == names[1] and len(names[0]) == 4  # iterations, lr, m, v


def test_fused_adam_refuses_the_options_its_kernel_would_ignore():
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdam(1e-3, amsgrad=True)
