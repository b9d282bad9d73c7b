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
    model = build_m2cnn(96, preset="tiny")
    decayed = regularized_variables(model)
    expected = [
        layer.kernel.path for layer in model.layers if type(layer).__name__ in ("Conv2D", "Dense")
    ]
    assert [v.path for v in decayed] == expected
    assert not any("bias" in v.path or "_bn/" in v.path for v in decayed)
    by_hand = 4e-5 * sum(float(np.sum(v.numpy().astype("float64") ** 2)) for v in decayed) / 2
    assert float(weight_decay_loss(decayed, 4e-5)) == pytest.approx(by_hand, rel=1e-4)
