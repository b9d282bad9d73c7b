"""What is fitted on val and applied to the evaluated split: score cut points and eye blending;
and the referable-DR operating point that external validation carries to other sets.

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
from pathlib import Path
from typing import Any

import numpy as np

from m2cnn_tf.common import finite_or_none
from m2cnn_tf.errors import UsageError
from m2cnn_tf.metrics import (
    DEFAULT_CUTPOINTS,
    REFERABLE_GRADE,
    WAYS,
    Predictions,
    figures_at,
    probs_to_grades,
    quadratic_weighted_kappa,
    referable_output,
    scores_to_grades,
)
from m2cnn_tf.reports import load_predictions, load_report

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


# ---------------------------------------------------------------------------------------------
# The referable-DR operating point of external validation (ours): chosen on the development
# set's val split, then applied unchanged to every other set, as Gulshan et al. (JAMA 2016) did
# for Messidor-2.

OPERATING_POINT_HELP = (
    "youden (the point maximising sensitivity + specificity - 1), or spec=F / sens=F: the "
    "highest sensitivity at a specificity of at least F (the highest specificity at a "
    "sensitivity of at least F); F a fraction (0.9) or a percentage (90%)"
)


@dataclasses.dataclass(frozen=True)
class OperatingRule:
    """How a referable-DR threshold is chosen on a development split."""

    kind: str  # "youden", "specificity" or "sensitivity"
    target: float | None = None  # the floor on specificity or sensitivity

    def describe(self) -> str:
        if self.kind == "youden":
            return "Youden point (max sensitivity + specificity - 1)"
        other = "sensitivity" if self.kind == "specificity" else "specificity"
        return f"{self.kind} >= {self.target:.2f} (max {other})"


def parse_operating_point(text: str) -> OperatingRule:
    """ "youden", "spec=0.9", "specificity=90%", "sens=0.85" → an OperatingRule."""
    name, _, value = text.strip().lower().partition("=")
    kinds = {"spec": "specificity", "specificity": "specificity"}
    kinds |= {"sens": "sensitivity", "sensitivity": "sensitivity"}
    if name == "youden" and not value:
        return OperatingRule("youden")
    try:
        target = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        target = float("nan")
    if name not in kinds or not 0 < target < 1:
        raise UsageError(
            f"must be youden, spec=F or sens=F with 0 < F < 1 (or a percentage), got {text!r}",
            setting="operating_point",
        )
    return OperatingRule(kinds[name], target)


def _rates(truth: np.ndarray, continuous: np.ndarray, thresholds: np.ndarray):
    """Sensitivity and specificity of `continuous >= t` for every t in `thresholds`."""
    pos, neg = np.sort(continuous[truth]), np.sort(continuous[~truth])
    sens = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    spec = np.searchsorted(neg, thresholds, side="left") / len(neg)
    return sens, spec


def choose_threshold(grades, continuous, rule: OperatingRule) -> float | None:
    """The threshold (referable iff output >= it) that `rule` picks on a development split,
    among its distinct output values and +inf (nobody referred); None without both classes.

    spec=F: the highest sensitivity with specificity >= F, ties to the higher specificity;
    sens=F: the highest specificity with sensitivity >= F, ties to the higher sensitivity;
    youden: the highest sensitivity + specificity - 1, ties to the higher specificity.
    """
    truth = np.ravel(grades) >= REFERABLE_GRADE
    continuous = np.ravel(np.asarray(continuous, np.float64))
    if truth.all() or not truth.any():
        return None
    candidates = np.append(np.unique(continuous), np.inf)
    sens, spec = _rates(truth, continuous, candidates)
    eps = 1e-12  # a floor of 0.9 is met by 9 of 10, whatever the float rounding
    if rule.kind == "specificity":
        keys, feasible = (sens, spec), spec >= rule.target - eps
    elif rule.kind == "sensitivity":
        keys, feasible = (spec, sens), sens >= rule.target - eps
    else:
        # rounded: equal sums of fractions with other denominators must tie exactly
        keys, feasible = (np.round(sens + spec, 12), spec), np.ones_like(sens, bool)
    order = np.lexsort((keys[1], keys[0]))  # ascending by keys[0], then keys[1]
    # Never empty: +inf meets any specificity floor, the lowest output any sensitivity floor.
    best = [i for i in order if feasible[i]][-1]
    return float(candidates[best])


def operating_thresholds(dev: Predictions, rule: OperatingRule) -> dict[str, float]:
    """Each way's threshold (on the score; on P(grade >= 2)) that `rule` picks on the
    development predictions; a UsageError when they lack referable or non-referable images."""
    thresholds = {
        way: choose_threshold(dev.grades, referable_output(dev, way), rule) for way in WAYS
    }
    if None in thresholds.values():
        raise UsageError(
            "an operating point needs referable and non-referable images in the development split",
            setting="development",
        )
    return thresholds


def _external_row(
    report_dir: str | Path, cutpoints: Sequence[float], thresholds: dict[str, float], **boot
) -> dict[str, Any]:
    """One report re-graded with the development cut points and operating point."""
    report, preds = load_report(report_dir), load_predictions(report_dir)
    return {
        "report": str(report_dir),
        "dataset": report.get("dataset")
        or Path(report.get("data", {}).get("dir", report_dir)).name,
        "split": report.get("split"),
        "image_size": report.get("image_size"),
        "n_images": len(preds),
        "n_excluded": report.get("n_excluded"),
        **figures_at(preds, cutpoints, thresholds, **boot),
    }


def external_validation(
    development: str | Path,
    report_dirs: Sequence[str | Path],
    rule: OperatingRule,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every report side by side at one referable-DR operating point, chosen by `rule` on the
    development set's val report (`development`) and applied unchanged to every set, as
    Gulshan et al. (JAMA 2016) did for Messidor-2; every report's predictions.csv is re-graded
    with the development report's cut points too, so that one grader is compared."""
    dev = load_report(development)
    if dev.get("split") != "val":
        raise UsageError(
            f"{development} is a {dev.get('split')} report: the operating point is chosen on the "
            "development set's val split",
            setting="development",
        )
    thresholds = operating_thresholds(load_predictions(development), rule)
    cutpoints = tuple(dev.get("cutpoints") or DEFAULT_CUTPOINTS)
    others = [d for d in report_dirs if Path(d).resolve() != Path(development).resolve()]
    boot = {"n_boot": n_boot, "seed": seed}
    rows = [_external_row(d, cutpoints, thresholds, **boot) for d in [development, *others]]
    rows[0]["development"] = True
    return {
        "operating_point": {
            "rule": rule.describe(),
            "thresholds": {way: finite_or_none(t) for way, t in thresholds.items()},  # inf: None
            "chosen_on": {
                key: rows[0][key] for key in ("report", "dataset", "split", "image_size")
            },
        },
        "cutpoints": {
            "values": list(cutpoints),
            "from": str(development),
            "how": dev.get("thresholds", "rounding"),
        },
        "bootstrap": {**boot, "unit": "patient where every image has one", "method": "percentile"},
        "rows": rows,
    }
