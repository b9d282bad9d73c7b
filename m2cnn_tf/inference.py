"""What the model says about a batch or a split: test-time augmentation, one call per batch, and
`Predictions`, the per-image outputs every figure of the report is computed from.

The model's two heads (Fig. 2): the 5-way logits of the classification task and the regression
score (§II-B). Each image gets the softmax probabilities and the score; grading them into 0-4
is `metrics`' job (Table II's "scores" and "prob." ways).

Test-time augmentation (TTA) is ours: the paper does not say how its Table II figures were
tested beyond the metric (§III-A), and the default here is one view per image. A fundus has no
preferred orientation (§II-A), so the outputs may be averaged over its symmetries, as the best
Kaggle 2015 teams did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from m2cnn_tf.cli import TTA_CHOICES
from m2cnn_tf.data import scale_image
from m2cnn_tf.errors import UsageError

PredictFn = Callable[[Any], dict[str, tf.Tensor]]


def check_tta(mode: str) -> None:
    """Refuse an unknown TTA mode before anything is loaded."""
    if mode not in TTA_CHOICES:
        raise UsageError(
            f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_CHOICES)}", setting="tta"
        )


def tta_views(images: tf.Tensor, mode: str) -> list[tf.Tensor]:
    """The views of an NHWC batch that TTA averages over.

    "none": the batch itself. "flips": identity, left-right, up-down and both (4 views).
    "dihedral": the 8 symmetries of the square, i.e. the 4 flips and the 4 rotations by 90°
    (here: the 4 flips, each also transposed, which is the same set).
    """
    check_tta(mode)
    views = [images]
    if mode in ("flips", "dihedral"):
        lr = tf.reverse(images, axis=[2])
        views += [lr, tf.reverse(images, axis=[1]), tf.reverse(lr, axis=[1])]
    if mode == "dihedral":
        views += [tf.transpose(v, [0, 2, 1, 3]) for v in views]
    return views


def _mean_over_views(x: tf.Tensor, n_views: int) -> tf.Tensor:
    """(n_views * B, ...) stacked view by view -> (B, ...), the mean over the views."""
    shape = tf.shape(x)
    per_view = tf.concat([[n_views, shape[0] // n_views], shape[1:]], axis=0)
    return tf.reduce_mean(tf.reshape(x, per_view), axis=0)


def make_predict_fn(model, tta: str = "none") -> PredictFn:
    """A batch function: images -> {"logits", "score", "probabilities"}, float32.

    `model` is any callable from a float32 NHWC batch in [-1, 1] (as `data.scale_image` makes)
    to a dict with "logits" (B, 5) and "score" (B,) or (B, 1). A Keras model is called with
    training=False inside one compiled tf.function. Any other callable (a LiteRT interpreter, a
    SavedModel signature) is called eagerly with a tf.Tensor, so it may take `.numpy()` of it.

    Images may also be uint8 [0, 255]: they are scaled first, inside the same call. With TTA
    the views go through the model as one concatenated batch (one call per batch), and the
    softmax probabilities, logits and score are each the mean over the views (probabilities
    are averaged, not re-derived from the mean logits).
    """
    check_tta(tta)
    is_keras = isinstance(model, keras.Layer)

    def predict(images):
        images = tf.convert_to_tensor(images)
        if images.dtype == tf.uint8:
            images = scale_image(images)
        images = tf.cast(images, tf.float32)
        views = tta_views(images, tta)
        batch = tf.concat(views, axis=0) if len(views) > 1 else images
        out = model(batch, training=False) if is_keras else model(batch)
        logits = tf.cast(out["logits"], tf.float32)
        score = tf.reshape(tf.cast(out["score"], tf.float32), [-1])
        probs = tf.nn.softmax(logits, axis=-1)
        if len(views) > 1:
            logits, score, probs = (_mean_over_views(t, len(views)) for t in (logits, score, probs))
        return {"logits": logits, "score": score, "probabilities": probs}

    return tf.function(predict, reduce_retracing=True) if is_keras else predict


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
    model, dataset: tf.data.Dataset, *, tta: str = "none", progress=None
) -> Predictions:
    """Run the model over a `data.make_dataset(..., training=False)` dataset of (images, meta),
    in record order; `progress` (a tqdm bar, say) is advanced by each batch's size."""
    predict = make_predict_fn(model, tta)
    parts: dict[str, list] = {k: [] for k in ("id", "patient", "eye", "grade", "score", "probs")}
    for images, meta in dataset:
        out = predict(images)
        parts["score"].append(np.asarray(out["score"]))
        parts["probs"].append(np.asarray(out["probabilities"]))
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
