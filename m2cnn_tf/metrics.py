"""Quadratic weighted kappa (§III-A, the Kaggle metric) and the two ways to read a grade (Fig. 2).

"Scores" cuts the regression output into grades; "prob." takes the argmax of the softmax.
Table II reports both, and the paper prefers scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from m2cnn_tf.config import NUM_CLASSES

# Rounding to the nearest grade, clipped to 0-4.
DEFAULT_CUTPOINTS: tuple[float, ...] = (0.5, 1.5, 2.5, 3.5)


def scores_to_grades(scores, cutpoints: Sequence[float] = DEFAULT_CUTPOINTS) -> np.ndarray:
    """Grade = how many cut points the score reaches; the default rounds and clips to 0-4."""
    return np.digitize(np.ravel(np.asarray(scores, dtype=np.float64)), np.sort(cutpoints))


def probs_to_grades(probs) -> np.ndarray:
    """Argmax over the class axis (probabilities or logits alike)."""
    return np.argmax(np.asarray(probs), axis=-1)


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Rows: true grade, columns: predicted grade."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.ravel(y_true).astype(int), np.ravel(y_pred).astype(int)), 1)
    return cm


def _quadratic_weights(num_classes: int):
    idx = np.arange(num_classes, dtype=np.float64)
    return (idx[:, None] - idx[None, :]) ** 2


def kappa_from_confusion(cm: np.ndarray) -> float:
    """1 - sum(W*O) / sum(W*E), W_ij = (i-j)^2; nan when undefined (one class only), as sklearn."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / max(total, 1.0)
    weights = _quadratic_weights(cm.shape[0])
    denominator = (weights * expected).sum()
    if denominator == 0:
        return float("nan")
    return float(1.0 - (weights * cm).sum() / denominator)


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    return kappa_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


class QuadraticKappa(keras.metrics.Metric):
    """Streaming quadratic weighted kappa over a confusion matrix (replaces tfa's CohenKappa).

    `y_pred` is the regression score (B, 1) when `from_scores`, else logits/probabilities (B, K).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        from_scores: bool = True,
        cutpoints: Sequence[float] = DEFAULT_CUTPOINTS,
        name: str = "kappa",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.from_scores = from_scores
        self.cutpoints = tuple(float(c) for c in sorted(cutpoints))
        self.confusion = self.add_variable(
            shape=(num_classes, num_classes),
            initializer="zeros",
            name="confusion",
            dtype="float32",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        if self.from_scores:
            score = ops.reshape(ops.cast(y_pred, "float32"), (-1, 1))
            cuts = ops.convert_to_tensor(self.cutpoints, dtype="float32")
            pred = ops.sum(ops.cast(score >= cuts[None, :], "int32"), axis=1)
        else:
            pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        cells = y_true * self.num_classes + pred
        counts = ops.bincount(cells, minlength=self.num_classes**2)
        counts = ops.reshape(
            ops.cast(counts[: self.num_classes**2], "float32"), (self.num_classes, self.num_classes)
        )
        self.confusion.assign_add(counts)

    def result(self):
        cm = self.confusion
        total = ops.maximum(ops.sum(cm), 1.0)
        expected = ops.outer(ops.sum(cm, axis=1), ops.sum(cm, axis=0)) / total
        idx = ops.arange(self.num_classes, dtype="float32")
        weights = ops.square(idx[:, None] - idx[None, :])
        denominator = ops.sum(weights * expected)
        numerator = ops.sum(weights * cm)
        safe = ops.where(denominator > 0, denominator, 1.0)
        return ops.where(denominator > 0, 1.0 - numerator / safe, float("nan"))

    def reset_state(self):
        self.confusion.assign(ops.zeros_like(self.confusion))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "from_scores": self.from_scores,
            "cutpoints": list(self.cutpoints),
        }
