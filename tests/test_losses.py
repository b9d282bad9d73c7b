"""Eq. (2)-(4) against hand calculations."""

import math

import keras
import numpy as np
import pytest

from m2cnn_tf.losses import multitask_loss, regularized_variables, weight_decay_loss
from m2cnn_tf.model import build_m2cnn


def test_multitask_loss_is_ce_plus_mse_plus_weight_decay_by_hand():
    logits = np.array([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0, -1.0]], "float32")
    score = np.array([[0.5], [1.0]], "float32")
    grades = np.array([0, 2])
    kernel = keras.Variable(np.array([[1.0, -2.0], [0.5, 0.0]], "float32"))

    ce0 = -(2.0 - math.log(math.exp(2.0) + 4.0))
    ce1 = -(3.0 - math.log(1.0 + math.e + math.exp(3.0) + 1.0 + math.exp(-1.0)))
    ce = (ce0 + ce1) / 2
    mse = ((0.5 - 0) ** 2 + (1.0 - 2) ** 2) / 2
    reg = 0.01 * (1.0 + 4.0 + 0.25) / 2

    parts = multitask_loss(grades, {"logits": logits, "score": score}, [kernel], 0.01)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(parts["reg"]) == pytest.approx(reg, rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(ce + mse + reg, rel=1e-6)


def test_weight_decay_covers_conv_and_dense_kernels_only():
    # A small model with every kind of weight M²CNN has, the decayed ones listed by hand.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(scale=False, name="stem_bn")(x)
    x = keras.layers.Conv2D(4, 1, use_bias=True, name="up")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = {
        "logits": keras.layers.Dense(5, name="logits")(x),
        "score": keras.layers.Dense(1, name="score")(x),
    }
    small = keras.Model(inputs, outputs)
    decayed = [v.path for v in regularized_variables(small)]
    assert decayed == ["stem/kernel", "up/kernel", "logits/kernel", "score/kernel"]


def test_weight_decay_of_m2cnn_is_half_the_squared_kernels_by_hand():
    model = build_m2cnn(96, preset="tiny")
    decayed = regularized_variables(model)
    # Independently: by variable name, every kernel of the model and nothing else.
    kernels = {v.path for v in model.weights if v.path.endswith("/kernel")}
    assert {v.path for v in decayed} == kernels and len(decayed) == len(kernels)
    by_hand = 4e-5 * sum(float(np.sum(v.numpy().astype("float64") ** 2)) for v in decayed) / 2
    assert float(weight_decay_loss(decayed, 4e-5)) == pytest.approx(by_hand, rel=1e-4)
