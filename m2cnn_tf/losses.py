"""The Multi-Task loss of §II-B: L = L1 + L2 + L_reg (Eq. (4))."""

from __future__ import annotations

import keras
from keras import ops


def classification_loss(grades, logits):
    """Eq. (2): mean softmax cross-entropy of the 5-class head."""
    return ops.mean(
        keras.losses.sparse_categorical_crossentropy(
            ops.cast(grades, "int32"), ops.cast(logits, "float32"), from_logits=True
        )
    )


def regression_loss(grades, score):
    """Eq. (3): mean squared distance of the score to the grade, so far misses cost more."""
    target = ops.reshape(ops.cast(grades, "float32"), (-1,))
    return ops.mean(ops.square(ops.reshape(ops.cast(score, "float32"), (-1,)) - target))


def regularized_variables(model: keras.Model) -> list:
    """Kernels of every conv and dense layer; biases and BatchNorm are not decayed (TF-slim)."""
    return [
        layer.kernel
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]


def weight_decay_loss(variables, coeff: float):
    """L_reg of Eq. (4): coeff * sum(w^2) / 2, the TF-slim l2_regularizer convention."""
    if not variables or coeff == 0:
        return ops.convert_to_tensor(0.0)
    return (
        coeff
        * ops.sum(ops.stack([ops.sum(ops.square(ops.cast(v, "float32"))) for v in variables]))
        / 2.0
    )


def multitask_loss(grades, outputs: dict, reg_variables, weight_decay: float) -> dict:
    """Eq. (4) and its parts, for logging: {"ce", "mse", "reg", "loss"}."""
    ce = classification_loss(grades, outputs["logits"])
    mse = regression_loss(grades, outputs["score"])
    reg = weight_decay_loss(reg_variables, weight_decay)
    return {"ce": ce, "mse": mse, "reg": reg, "loss": ce + mse + reg}
