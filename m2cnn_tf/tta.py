"""What the model answers for one batch: IRv2's input scaling, the views test-time augmentation
averages over, one model call, the softmax and the mean over the views.

The model's two heads (Fig. 2): the 5-way logits of the classification task and the regression
score (§II-B). Each image gets the softmax probabilities and the score; grading them into 0-4
is `metrics`' job (Table II's "scores" and "prob." ways).

Test-time augmentation (TTA) is ours: the paper does not say how its Table II figures were
tested beyond the metric (§III-A), and the default here is one view per image. A fundus has no
preferred orientation (§II-A), so the outputs may be averaged over its symmetries, as the best
Kaggle 2015 teams did.

numpy only (ours): the same code serves every runtime (`backends`), and the LiteRT path of
predict.py and serve.py starts without importing TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from m2cnn_tf.errors import UsageError

# The views averaged per image (ours: the paper mentions no TTA); one list for every command.
TTA_CHOICES = ("none", "flips", "dihedral")

# A runtime's call: float32 NHWC batch in [-1, 1] -> {"logits": (B, 5), "score": (B,) or (B, 1)}.
ModelCall = Callable[[np.ndarray], dict[str, np.ndarray]]
PredictFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def check_tta(mode: str) -> None:
    """Refuse an unknown TTA mode before anything is loaded."""
    if mode not in TTA_CHOICES:
        raise UsageError(
            f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_CHOICES)}", setting="tta"
        )


def model_range(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as `data.scale_image` does in the
    input pipeline); float images are taken as already scaled."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images.astype(np.float32, copy=False)


def tta_views(images: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of an NHWC batch that TTA averages over.

    "none": the batch itself. "flips": identity, left-right, up-down and both (4 views).
    "dihedral": the 8 symmetries of the square, i.e. the 4 flips and the 4 rotations by 90°
    (here: the 4 flips, each also transposed, which is the same set).
    """
    check_tta(mode)
    views = [images]
    if mode in ("flips", "dihedral"):
        lr = images[:, :, ::-1]
        views += [lr, images[:, ::-1], lr[:, ::-1]]
    if mode == "dihedral":
        views += [v.transpose(0, 2, 1, 3) for v in views]
    return views


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def make_predict_fn(call: ModelCall, mode: str = "none") -> PredictFn:
    """A batch function: images (uint8, or float32 in [-1, 1]) -> numpy float32 {"logits",
    "score", "probabilities"}.

    With TTA the views go through `call` as one concatenated batch (one call per batch), and the
    softmax probabilities, logits and score are each the mean over the views (probabilities are
    averaged, not re-derived from the mean logits).
    """
    check_tta(mode)

    def predict(images) -> dict[str, np.ndarray]:
        images = model_range(images)
        views = tta_views(images, mode)
        batch = np.concatenate(views) if len(views) > 1 else images
        out = call(np.ascontiguousarray(batch))
        logits = np.asarray(out["logits"], np.float32)
        score = np.asarray(out["score"], np.float32).reshape(-1)
        result = {"logits": logits, "score": score, "probabilities": softmax(logits)}
        n = len(images)
        return {k: v.reshape(len(views), n, *v.shape[1:]).mean(axis=0) for k, v in result.items()}

    return predict
