"""m2cnn_tf.sessions: one model after another in one process, nothing of the earlier kept."""

import gc
import weakref

import keras
import numpy as np
import tensorflow as tf
from _nets import small_net

from m2cnn_tf.sessions import fresh_session
from m2cnn_tf.train_step import TwoRateTrainer, make_optimizer


def _fit_once() -> weakref.ref:
    """One epoch of the two-rate train step on `small_net`; a weak reference to
    the resource handle of its first kernel, which holds the kernel's buffer."""
    net = small_net()
    trainer = TwoRateTrainer(net, ["conv", "conv_bn"], weight_decay=0.01)
    trainer.compile_two_rates(
        make_optimizer("adam", 1e-4), make_optimizer("adam", 1e-3),
        mixed_precision=False, jit_compile=False,
    )  # fmt: skip
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype("float32")
    data = tf.data.Dataset.from_tensors((images, {"grade": np.array([0, 1, 3, 4], "int32")}))
    trainer.fit(data, epochs=1, shuffle=False, verbose=0)
    return weakref.ref(net.get_layer("conv").kernel.value.handle)


def test_a_finished_fit_keeps_neither_its_graph_nor_its_weights_after_a_fresh_session():
    # TensorFlow's leak, which the session plugs: clearing the Keras session alone keeps the
    # traced train step's graph, and through its captures the weights' buffers.
    handle = _fit_once()
    keras.backend.clear_session()
    assert handle() is not None, (
        "TensorFlow no longer keeps a finished fit's graph: m2cnn_tf/sessions.py's workaround "
        "can go"
    )
    with fresh_session():
        handle = _fit_once()
        assert handle() is not None  # alive while the block runs
    gc.collect()
    assert handle() is None
