"""FusedBatchNormalization (m2cnn_tf/fused_batchnorm.py) against Keras's own BatchNormalization,
the independent reference: training outputs, gradients and moving statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from m2cnn_tf import checkpoints
from m2cnn_tf.fused_batchnorm import BatchNormalization as FusedBatchNormalization
from m2cnn_tf.model import build_m2cnn

STEPS = 4


def _net(norm: type[keras.layers.BatchNormalization], scale: bool) -> keras.Model:
    """conv -> BN -> relu -> pool -> dense, the same start weights for either BN class."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, name="conv")(inputs)
    x = norm(axis=3, scale=scale, momentum=0.8, name="conv_bn")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def _trained(norm, scale: bool, size: int, batch: int, jit_compile: bool) -> list[np.ndarray]:
    """Training-mode outputs and gradients of STEPS random batches, then the BN's weights and
    moving statistics (which the steps updated; the weights are not stepped)."""
    model = _net(norm, scale)
    rng = np.random.default_rng(1)

    def step(x):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(tf.square(y - 1.0))
        return [y, *tape.gradient(loss, model.trainable_variables)]

    step = tf.function(step, jit_compile=jit_compile)
    found = []
    for i in range(STEPS):
        x = rng.normal(i, 1 + i, (batch, size, size, 3)).astype("float32")
        found += [t.numpy() for t in step(tf.constant(x))]
    return found + [w.numpy() for w in model.get_layer("conv_bn").weights]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    ("scale", "size", "batch"),
    [(False, 9, 4), (True, 5, 2), (False, 3, 1)],  # 4×4, 2×2 and 1×1 values per channel
    ids=["n64", "n8-scale", "n1"],
)
def test_fused_batchnorm_trains_as_keras_batchnorm_up_to_rounding(scale, size, batch, jit_compile):
    fused = _trained(FusedBatchNormalization, scale, size, batch, jit_compile)
    reference = _trained(keras.layers.BatchNormalization, scale, size, batch, jit_compile)
    assert len(fused) == len(reference)
    assert np.abs(reference[-1] - 1.0).min() > 1e-2  # every moving variance moved
    for ours, theirs in zip(fused, reference, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5)


def test_inference_and_saved_checkpoints_are_keras_batchnorms(tmp_path):
    model = _net(FusedBatchNormalization, scale=False)
    keras_bn = _net(keras.layers.BatchNormalization, scale=False)
    x = np.random.default_rng(2).normal(0, 2, (3, 7, 7, 3)).astype("float32")
    np.testing.assert_array_equal(model(x, training=False), keras_bn(x, training=False))
    model.save(tmp_path / "m.keras")
    loaded = checkpoints.load_model(tmp_path / "m.keras")  # safe mode
    assert type(loaded.get_layer("conv_bn")) is FusedBatchNormalization
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


def test_weights_files_of_keras_batchnorm_models_load_into_fused_ones_and_back(tmp_path):
    """`.weights.h5` files (backups, Keras's IRv2 weights) key layers by class name."""
    rng = np.random.default_rng(3)
    theirs, ours = _net(keras.layers.BatchNormalization, True), _net(FusedBatchNormalization, True)
    for source, target in ((theirs, ours), (ours, theirs)):
        source.set_weights([rng.normal(1, 0.1, w.shape) for w in source.get_weights()])
        source.save_weights(tmp_path / "w.weights.h5")
        target.load_weights(tmp_path / "w.weights.h5")
        assert all(map(np.array_equal, source.get_weights(), target.get_weights()))


def test_every_batchnorm_of_the_network_is_fused():
    net = build_m2cnn(704, preset="tiny")
    norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 30 and all(type(n) is FusedBatchNormalization for n in norms)
