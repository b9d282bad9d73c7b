"""What is fitted on val and applied to the evaluated split: score cut points and eye blending.

Both are ours, on top of the paper, and off by default (evaluate.py `--thresholds fit`,
`--per-patient`):
- Table II's "scores" way cuts the regression output into grades; the paper rounds (cut points
  0.5, 1.5, 2.5, 3.5). A regressor trained with MSE shrinks towards the mean grade, so cut
  points fitted to maximise kappa on val recover some of that, as Kaggle 2015 entries did.
- DR is a systemic disease, so the fellow eye's output is evidence too (see `blend_eyes`).
Fitting only ever uses val; numpy only, so it can be redone from predictions.csv.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from m2cnn_tf.metrics import (
    DEFAULT_CUTPOINTS,
    Predictions,
    probs_to_grades,
    quadratic_weighted_kappa,
    scores_to_grades,
)

# How report.json describes the blend.
BLEND_METHOD = (
    "(1-w)*own + w*other eye, w in [0,0.5] fitted on val; scores and probabilities each get "
    "their own w"
)


def _kappa_or_worst(grades, predicted) -> float:
    """Quadratic kappa, with an undefined kappa (one class only) ranked below every value."""
    value = quadratic_weighted_kappa(grades, predicted)
    return -np.inf if math.isnan(value) else value


def _candidates(midpoints: np.ndarray, lo: float, hi: float, max_candidates: int) -> np.ndarray:
    cand = midpoints[(midpoints > lo) & (midpoints < hi)]
    if len(cand) > max_candidates:
        cand = np.quantile(cand, np.linspace(0, 1, max_candidates))
    return cand


def fit_cutpoints(
    scores,
    grades,
    init: Sequence[float] = DEFAULT_CUTPOINTS,
    *,
    max_rounds: int = 20,
    max_candidates: int = 256,
) -> tuple[float, ...]:
    """Four cut points on the score that maximise quadratic kappa (coordinate search).

    Starting from `init` (rounding), each cut point in turn is moved to the best value between
    its neighbours, over the midpoints between sorted distinct scores there (subsampled to
    `max_candidates` quantiles); a move is taken only if it strictly raises kappa, so the result
    is never worse than `init` on the data it was fitted on. Stops when a round moves nothing.
    """
    scores = np.ravel(np.asarray(scores, np.float64))
    grades = np.ravel(np.asarray(grades)).astype(int)
    cuts = np.sort(np.asarray(init, np.float64))
    best = _kappa_or_worst(grades, scores_to_grades(scores, cuts))
    distinct = np.unique(scores)
    midpoints = (distinct[1:] + distinct[:-1]) / 2 if len(distinct) > 1 else distinct
    for _ in range(max_rounds):
        moved = False
        for i in range(len(cuts)):
            lo = cuts[i - 1] if i > 0 else -np.inf
            hi = cuts[i + 1] if i + 1 < len(cuts) else np.inf
            for value in _candidates(midpoints, lo, hi, max_candidates):
                trial = cuts.copy()
                trial[i] = value
                k = _kappa_or_worst(grades, scores_to_grades(scores, trial))
                if k > best + 1e-12:
                    best, cuts, moved = k, trial, True
        if not moved:
            break
    return tuple(float(c) for c in cuts)


def partner_index(patients: Sequence[str], eyes: Sequence[str]) -> np.ndarray:
    """For each image, the row of the same patient's other eye, or -1 if there is none."""
    rows: dict[tuple[str, str], int] = {}
    for i, (p, e) in enumerate(zip(patients, eyes, strict=True)):
        if p and e in ("left", "right"):
            rows[(p, e)] = i
    other = {"left": "right", "right": "left"}
    return np.array(
        [rows.get((p, other.get(e, "")), -1) for p, e in zip(patients, eyes, strict=True)],
        dtype=np.int64,
    )


def blend_eyes(values, partner: np.ndarray, weight: float) -> np.ndarray:
    """Per-patient blend: (1 - w) * own eye + w * other eye, where the other eye exists.

    DR is a systemic disease, so the fellow eye's grade is strong evidence: in Kaggle 2015 most
    of the top teams fed both eyes' outputs to a second-level model. This is the simplest form
    of that idea, a single weight `w` in [0, 0.5], applied to the score (and separately to the
    probability vectors, with their own weight). Images without a fellow eye are unchanged.
    """
    values = np.asarray(values, np.float64)
    out = values.copy()
    has = partner >= 0
    out[has] = (1.0 - weight) * values[has] + weight * values[partner[has]]
    return out


def fit_blend_weight(
    grade_fn: Callable[[np.ndarray], np.ndarray], values, partner, grades, grid=None
) -> tuple[float, float]:
    """The weight in `grid` (default 0, 0.01, ..., 0.5) that maximises kappa; ties -> smaller.

    `grade_fn` turns blended values into grades. Returns (weight, kappa at that weight); w=0
    (no blending) is in the grid, so fitting never lowers kappa on the data it is fitted on.
    """
    grid = np.round(np.arange(0.0, 0.5001, 0.01), 4) if grid is None else np.asarray(grid)
    best_w, best_k = 0.0, -np.inf
    for w in grid:
        k = _kappa_or_worst(grades, grade_fn(blend_eyes(values, partner, float(w))))
        if k > best_k + 1e-12:
            best_w, best_k = float(w), k
    return best_w, float(best_k)


@dataclasses.dataclass
class Calibration:
    """What is fitted on val and applied to the evaluated split (the defaults change nothing)."""

    cutpoints: tuple[float, ...] = DEFAULT_CUTPOINTS
    blend_score: float = 0.0
    blend_prob: float = 0.0
    per_patient: bool = False

    def apply(self, preds: Predictions) -> Predictions:
        """The predictions with each eye blended with its fellow eye (cut points are applied
        when grading, see `metrics.evaluate_predictions`)."""
        if not self.per_patient:
            return preds
        partner = partner_index(preds.patients, preds.eyes)
        return preds.replace(
            scores=blend_eyes(preds.scores, partner, self.blend_score),
            probs=blend_eyes(preds.probs, partner, self.blend_prob),
        )


def fit_calibration(val: Predictions, *, fit_thresholds: bool, per_patient: bool) -> Calibration:
    """Fit on val: first the blend weights (with rounding), then the cut points on the blend."""
    cal = Calibration(per_patient=per_patient)
    if per_patient:
        partner = partner_index(val.patients, val.eyes)
        cal.blend_score, _ = fit_blend_weight(scores_to_grades, val.scores, partner, val.grades)
        cal.blend_prob, _ = fit_blend_weight(probs_to_grades, val.probs, partner, val.grades)
    if fit_thresholds:
        cal.cutpoints = fit_cutpoints(cal.apply(val).scores, val.grades)
    return cal
