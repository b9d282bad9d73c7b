"""How good the grades are: quadratic weighted kappa (§III-A, the Kaggle metric), the two ways
to read a grade (Fig. 2), and the statistics a report adds to the paper's figures.

"Scores" cuts the regression output into grades; "prob." takes the argmax of the softmax.
Table II reports both, and the paper prefers scores. On top of the paper (ours): a 95%
bootstrap confidence interval of kappa, the confusion matrix, per-grade sensitivity and
specificity, and referable DR (grade >= 2), which is what a screening programme acts on.
All numpy (the trainer's streaming kappa is `train_step.QuadraticKappa`), so that prediction
needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from m2cnn_tf.common import finite_or_none
from m2cnn_tf.config import NUM_CLASSES


@dataclasses.dataclass
class Predictions:
    """What the model said about a split, one row per image, aligned with the labels and ids of
    the records it came from: every figure of a report is computed from these."""

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


# Rounding to the nearest grade, clipped to 0-4.
DEFAULT_CUTPOINTS: tuple[float, ...] = (0.5, 1.5, 2.5, 3.5)
REFERABLE_GRADE = 2  # moderate NPDR or worse: refer to an ophthalmologist
WAYS = ("scores", "prob")  # Table II's two test methods
OPERATING_POINT = (
    "referable iff the graded output is >= 2 (scores: score >= the second cut point; prob.: "
    "argmax >= 2)"
)


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


# ---------------------------------------------------------------------------------------------
# A report's figures (ours, on top of Table II's kappa)


def _per_group_cells(y_true, y_pred, group_index, n_groups: int, num_classes: int):
    """One flattened confusion matrix per group: a resample's matrix is counts @ this."""
    cells = np.ravel(y_true).astype(int) * num_classes + np.ravel(y_pred).astype(int)
    per_group = np.zeros((n_groups, num_classes * num_classes), np.float64)
    np.add.at(per_group, (group_index, cells), 1.0)
    return per_group


def _resamples(n: int, groups, n_boot: int, seed: int):
    """(each image's group, its number of groups, the replicates): replicate b draws the groups
    with replacement, `rng.integers(0, G, size=G)` from `np.random.default_rng(seed)`, and
    yields how often it drew each group. Every bootstrap here uses these draws, so that figures
    from one seed resample the same patients."""
    if groups is None:
        index = np.arange(n)
    else:
        _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    draws = (
        np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        for _ in range(n_boot)
    )
    return index, n_groups, draws


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_kappa_ci(
    y_true,
    y_pred,
    *,
    groups=None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the quadratic kappa.

    Resamples *groups* with replacement (pass the patient ids: the two eyes of a patient are
    correlated, so resampling images would understate the spread); without groups each image is
    its own group. Replicate b draws `rng.integers(0, G, size=G)` from
    `np.random.default_rng(seed)`; replicates with an undefined kappa (one class only) are
    dropped. Returns (low, high) at `level`.
    """
    index, n_groups, draws = _resamples(len(np.ravel(y_true)), groups, n_boot, seed)
    per_group = _per_group_cells(y_true, y_pred, index, n_groups, num_classes)
    shape = (num_classes, num_classes)
    kappas = np.array([kappa_from_confusion((c @ per_group).reshape(shape)) for c in draws])
    return _percentiles(kappas, level)


def paired_kappa_difference(
    y_true,
    pred_a,
    pred_b,
    *,
    groups=None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
) -> tuple[float, float, float]:
    """kappa(a) − kappa(b) on the same images, and its paired percentile bootstrap CI.

    Both models are graded on the same resample of groups (patients) in every replicate, drawn
    as in `bootstrap_kappa_ci`, so the CI is that of the difference itself: the images both got
    right or wrong cancel out, where two independent CIs would count their spread twice.
    Replicates in which either kappa is undefined are dropped. Returns (difference, low, high).
    """
    y_true = np.ravel(y_true)
    if not len(y_true) == len(np.ravel(pred_a)) == len(np.ravel(pred_b)):
        raise ValueError("a paired difference needs both models' grades of the same images")
    index, n_groups, draws = _resamples(len(y_true), groups, n_boot, seed)
    cells_a = _per_group_cells(y_true, pred_a, index, n_groups, num_classes)
    cells_b = _per_group_cells(y_true, pred_b, index, n_groups, num_classes)
    shape = (num_classes, num_classes)

    def difference(counts) -> float:
        a = kappa_from_confusion((counts @ cells_a).reshape(shape))
        return a - kappa_from_confusion((counts @ cells_b).reshape(shape))

    observed = difference(np.ones(n_groups))
    differences = np.array([difference(c) for c in draws])
    return (float(observed), *_percentiles(differences, level))


def mean_ci_across_seeds(values, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of per-seed figures and its Student-t CI (mean ± t·sd/√N): how far another set
    of seeds could move it. Needs two seeds or more (else the CI is NaN)."""
    from scipy import stats  # scikit-learn's own dependency

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5
    return mean, mean - float(half), mean + float(half)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def per_grade_rates(cm: np.ndarray) -> list[dict[str, Any]]:
    """One-vs-rest sensitivity (recall of grade g) and specificity for every grade."""
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    rows = []
    for g in range(cm.shape[0]):
        tp = cm[g, g]
        positives = cm[g].sum()
        fp = cm[:, g].sum() - tp
        negatives = total - positives
        rows.append(
            {
                "grade": g,
                "support": int(positives),
                "sensitivity": _ratio(tp, positives),
                "specificity": _ratio(negatives - fp, negatives),
            }
        )
    return rows


def referable_metrics(
    grades, continuous, predicted_grades, threshold: float | None
) -> dict[str, Any]:
    """Referable DR (grade >= 2): ROC AUC of a continuous output, and the operating point.

    The operating point is the grader's own decision: referable iff its predicted grade is >= 2
    (score >= the second cut point; or argmax >= 2). So the sensitivity/specificity reported are
    those of the grades in predictions.csv, not of a threshold tuned on the split itself.
    """
    from sklearn.metrics import roc_auc_score, roc_curve  # slow to import; only needed here

    truth = np.ravel(grades) >= REFERABLE_GRADE
    decision = np.ravel(predicted_grades) >= REFERABLE_GRADE
    both = truth.any() and (~truth).any()
    auc = float(roc_auc_score(truth, continuous)) if both else None
    fpr, tpr, _ = roc_curve(truth, continuous) if both else (np.array([]), np.array([]), None)
    return {
        "prevalence": float(truth.mean()),
        "auc": auc,
        "threshold": None if threshold is None else float(threshold),
        "sensitivity": _ratio(float((decision & truth).sum()), float(truth.sum())),
        "specificity": _ratio(float((~decision & ~truth).sum()), float((~truth).sum())),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def referable_probability(probs) -> np.ndarray:
    """P(grade >= 2) from the softmax: the prob. way's continuous referable output."""
    return np.asarray(probs)[:, REFERABLE_GRADE:].sum(axis=1)


def way_metrics(
    grades,
    predicted,
    continuous,
    threshold: float | None,
    *,
    groups=None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure for one test method (scores or prob.)."""
    grades = np.ravel(grades).astype(int)
    predicted = np.ravel(predicted).astype(int)
    cm = confusion_matrix(grades, predicted)
    kappa = kappa_from_confusion(cm)
    low, high = bootstrap_kappa_ci(grades, predicted, groups=groups, n_boot=n_boot, seed=seed)
    return {
        "kappa": finite_or_none(kappa),
        "kappa_ci95": [finite_or_none(low), finite_or_none(high)],
        "accuracy": float((grades == predicted).mean()),
        "confusion_matrix": cm.tolist(),
        "per_grade": per_grade_rates(cm),
        "referable": referable_metrics(grades, continuous, predicted, threshold),
    }


def evaluate_predictions(
    preds: Predictions,
    cutpoints: Sequence[float] = DEFAULT_CUTPOINTS,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both test methods' figures for (already calibrated) predictions: report.json's body.

    The bootstrap resamples patients when every image has one, else images.
    """
    groups = preds.patients if all(preds.patients) else None
    cuts = tuple(sorted(float(c) for c in cutpoints))
    common = {"groups": groups, "n_boot": n_boot, "seed": seed}
    return {
        "scores": way_metrics(
            preds.grades,
            scores_to_grades(preds.scores, cuts),
            preds.scores,
            threshold=cuts[REFERABLE_GRADE - 1],
            **common,
        ),
        "prob": way_metrics(
            preds.grades,
            probs_to_grades(preds.probs),
            referable_probability(preds.probs),
            threshold=None,
            **common,
        ),
        "cutpoints": list(cuts),
        "bootstrap": {
            "replicates": n_boot,
            "seed": seed,
            "unit": "patient" if groups is not None else "image",
            "method": "percentile",
        },
        "n_images": len(preds),
        "grade_counts": np.bincount(preds.grades, minlength=NUM_CLASSES).tolist(),
        "operating_point": OPERATING_POINT,
    }


# ---------------------------------------------------------------------------------------------
# External validation (ours): referable DR at an operating point chosen elsewhere
# (calibration.choose_threshold), with bootstrap CIs.


def referable_output(preds: Predictions, way: str) -> np.ndarray:
    """The continuous referable-DR output of a way: the score, or P(grade >= 2)."""
    return preds.scores if way == "scores" else referable_probability(preds.probs)


def referable_at(
    grades, continuous, threshold: float | None, *, groups=None, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Referable DR at a given threshold (referable iff output >= it): ROC AUC, sensitivity and
    specificity, each with its percentile bootstrap CI over `groups` (patients). A replicate
    without referable (non-referable) images has no AUC and no sensitivity (specificity): it is
    left out of those figures' CIs."""
    from sklearn.metrics import roc_auc_score  # slow to import; only needed here

    truth = np.ravel(grades) >= REFERABLE_GRADE
    continuous = np.ravel(np.asarray(continuous, np.float64))
    decision = continuous >= (np.inf if threshold is None else threshold)

    def figures(w: np.ndarray) -> tuple[float, float, float]:
        pos, neg = (w * truth).sum(), (w * ~truth).sum()
        auc = roc_auc_score(truth, continuous, sample_weight=w) if pos and neg else np.nan
        sens = (w * (decision & truth)).sum() / pos if pos else np.nan
        spec = (w * (~decision & ~truth)).sum() / neg if neg else np.nan
        return auc, sens, spec

    point = figures(np.ones(len(truth)))
    index, _, draws = _resamples(len(truth), groups, n_boot, seed)
    replicates = np.array([figures(c[index].astype(np.float64)) for c in draws])
    names = ("auc", "sensitivity", "specificity")
    shown = None if threshold is None else finite_or_none(threshold)  # +inf: nobody referred
    result: dict[str, Any] = {"threshold": shown, "prevalence": float(truth.mean())}
    for k, name in enumerate(names):
        result[name] = finite_or_none(point[k])
        ci = _percentiles(replicates[:, k] if len(replicates) else np.array([]), level)
        result[f"{name}_ci95"] = [finite_or_none(v) for v in ci]
    return result


def figures_at(
    preds: Predictions, cutpoints: Sequence[float], thresholds: dict[str, float], **boot
) -> dict[str, dict[str, Any]]:
    """Both ways' kappa (the scores cut by `cutpoints`) and referable-DR figures at their
    `thresholds`, with bootstrap CIs over patients when every image has one (`boot`: n_boot,
    seed)."""
    groups = preds.patients if all(preds.patients) else None
    figures = {}
    for way in WAYS:
        graded = (
            scores_to_grades(preds.scores, cutpoints)
            if way == "scores"
            else probs_to_grades(preds.probs)
        )
        ci = bootstrap_kappa_ci(preds.grades, graded, groups=groups, **boot)
        figures[way] = {
            "kappa": finite_or_none(quadratic_weighted_kappa(preds.grades, graded)),
            "kappa_ci95": [finite_or_none(v) for v in ci],
            **referable_at(
                preds.grades, referable_output(preds, way), thresholds[way], groups=groups, **boot
            ),
        }
    return figures
