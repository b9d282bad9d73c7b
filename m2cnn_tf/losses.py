"""The Multi-Task loss of §II-B: L = L1 + L2 + L_reg (Eq. (4)), and its terms by name.

`TERMS` maps a term's name to its function; `config.OBJECTIVES` says which terms each of Table
II's objectives minimises. `objective_loss` computes every term (all are logged, so an untrained
head's loss stays visible) and the objective's sum.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from m2cnn_tf.config import OBJECTIVES, unknown_choice


def classification_loss(grades, outputs: dict):
    """Eq. (2): mean softmax cross-entropy of the 5-class head."""
    return ops.mean(
        keras.losses.sparse_categorical_crossentropy(
            ops.cast(grades, "int32"), ops.cast(outputs["logits"], "float32"), from_logits=True
        )
    )


def regression_loss(grades, outputs: dict):
    """Eq. (3): mean squared distance of the score to the grade, so far misses cost more."""
    target = ops.reshape(ops.cast(grades, "float32"), (-1,))
    score = ops.reshape(ops.cast(outputs["score"], "float32"), (-1,))
    return ops.mean(ops.square(score - target))


# A term's name (its log column, its entry in an objective) -> (grades, outputs) -> scalar.
TERMS: dict[str, Callable] = {"ce": classification_loss, "mse": regression_loss}


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


def objective_loss(
    objective: str, grades, outputs: dict, reg_variables, weight_decay: float
) -> dict:
    """Every term of `TERMS`, "reg" (L_reg) and "loss": the objective's terms plus L_reg."""
    if objective not in OBJECTIVES:
        raise unknown_choice("loss", objective, OBJECTIVES)
    parts = {name: term(grades, outputs) for name, term in TERMS.items()}
    parts["reg"] = weight_decay_loss(reg_variables, weight_decay)
    loss = parts["reg"]
    for name in OBJECTIVES[objective].terms:
        loss = loss + parts[name]
    return {**parts, "loss": loss}


def multitask_loss(grades, outputs: dict, reg_variables, weight_decay: float) -> dict:
    """Eq. (4) and its parts, for logging: {"ce", "mse", "reg", "loss"}."""
    return objective_loss("multitask", grades, outputs, reg_variables, weight_decay)
