"""What the model says about a split: `Predictions`, the per-image outputs every figure of the
report is computed from, aligned with the labels and ids of the records they came from. Each
batch goes through `tta.make_predict_fn` (test-time augmentation, one call per batch).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from m2cnn_tf.errors import UsageError
from m2cnn_tf.tta import ModelCall, make_predict_fn

if TYPE_CHECKING:
    import tensorflow as tf


@dataclasses.dataclass
class Predictions:
    """Model outputs for one split, one row per image, aligned with its labels and ids."""

    ids: np.ndarray  # str
    patients: np.ndarray  # str
    eyes: np.ndarray  # str: "left", "right" or ""
    grades: np.ndarray  # int, ground truth
    scores: np.ndarray  # float, the regression output (after TTA / blending)
    probs: np.ndarray  # (N, 5) softmax (after TTA / blending)

    def __len__(self) -> int:
        return len(self.grades)

    def replace(self, **changes) -> Predictions:
        return dataclasses.replace(self, **changes)


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(values)])


def predict_dataset(
    call: ModelCall, dataset: tf.data.Dataset, *, tta: str = "none", progress=None
) -> Predictions:
    """Run a runtime's call (`backends.runtime_of`) over a `data.make_dataset(...,
    training=False)` dataset of (images, meta), in record order; `progress` (a tqdm bar, say) is
    advanced by each batch's size."""
    predict = make_predict_fn(call, tta)
    parts: dict[str, list] = {k: [] for k in ("id", "patient", "eye", "grade", "score", "probs")}
    for images, meta in dataset:
        out = predict(images)
        parts["score"].append(out["score"])
        parts["probs"].append(out["probabilities"])
        for key in ("id", "patient", "eye", "grade"):
            parts[key].append(meta[key].numpy())
        if progress is not None:
            progress.update(int(images.shape[0]))
    if not parts["score"]:
        raise UsageError("the dataset is empty: nothing to predict")
    return Predictions(
        ids=_text(np.concatenate(parts["id"])),
        patients=_text(np.concatenate(parts["patient"])),
        eyes=_text(np.concatenate(parts["eye"])),
        grades=np.concatenate(parts["grade"]).astype(np.int64).ravel(),
        scores=np.concatenate(parts["score"]).astype(np.float64).ravel(),
        probs=np.concatenate(parts["probs"]).astype(np.float64),
    )
