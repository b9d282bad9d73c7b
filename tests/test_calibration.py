"""m2cnn_tf.calibration: score cut points and eye blending, fitted on val.

References: sklearn's cohen_kappa_score and hand calculations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _cutpoints import assert_a_fixed_point_of_the_coordinate_search, qwk

from m2cnn_tf import calibration
from m2cnn_tf.metrics import Predictions, scores_to_grades


def rounded(scores) -> np.ndarray:
    """Grades by rounding, clipped to 0-4, written out (not metrics.scores_to_grades)."""
    return np.clip(np.floor(np.asarray(scores, np.float64) + 0.5), 0, 4).astype(int)


def hand_blend(values, patients, eyes, w: float) -> np.ndarray:
    """(1 - w)·own + w·fellow eye, row by row, for images whose fellow eye is there."""
    values = np.asarray(values, np.float64)
    row = {(p, e): i for i, (p, e) in enumerate(zip(patients, eyes, strict=True))}
    out = values.copy()
    for i, (p, e) in enumerate(zip(patients, eyes, strict=True)):
        j = row.get((p, {"left": "right", "right": "left"}.get(e)))
        if j is not None:
            out[i] = (1 - w) * values[i] + w * values[j]
    return out


def grid_search(grades, grade_fn, blended) -> float:
    """The smallest w of 0, 0.01, ..., 0.5 with the highest sklearn kappa of
    grade_fn(blended(w)): a brute-force search of its own."""
    grid = [i / 100 for i in range(51)]
    kappas = [qwk(grades, grade_fn(blended(w))) for w in grid]
    return grid[int(np.argmax(kappas))]  # argmax: the first of equal maxima


def test_fitted_cutpoints_are_sorted_and_never_score_lower_than_rounding():
    rng = np.random.default_rng(3)
    for trial in range(25):
        grades = rng.integers(0, 5, 200)
        scores = grades * rng.uniform(0.5, 1.2) + rng.normal(rng.uniform(-1, 1), 0.8, 200)
        cuts = calibration.fit_cutpoints(scores, grades)
        assert list(cuts) == sorted(cuts), trial
        assert qwk(grades, scores_to_grades(scores, cuts)) >= qwk(
            grades, scores_to_grades(scores)
        ), trial


def test_fitted_cutpoints_clearly_help_a_biased_regressor():
    rng = np.random.default_rng(4)
    grades = rng.integers(0, 5, 300)
    scores = 0.6 * grades + rng.normal(0, 0.3, 300)  # shrunk towards 0: rounding under-grades
    cuts = calibration.fit_cutpoints(scores, grades)
    fitted = qwk(grades, scores_to_grades(scores, cuts))
    assert fitted > qwk(grades, scores_to_grades(scores)) + 0.05


def test_partner_index_and_blend_eyes_match_a_hand_calculation():
    patients = ["10", "10", "11", "12", "12", "13"]
    eyes = ["left", "right", "left", "right", "left", ""]
    partner = calibration.partner_index(patients, eyes)
    assert partner.tolist() == [1, 0, -1, 4, 3, -1]
    scores = np.array([1.0, 3.0, 2.0, 0.0, 4.0, 1.5])
    blended = calibration.blend_eyes(scores, partner, 0.25)
    # Hand calculation: 0.75*own + 0.25*other; patients 11 and 13 have no fellow eye.
    np.testing.assert_allclose(blended, [1.5, 2.5, 2.0, 1.0, 3.0, 1.5])
    probs = np.eye(5)[[0, 4, 2, 1, 3, 0]]
    np.testing.assert_allclose(calibration.blend_eyes(probs, partner, 0.5)[0], [0.5, 0, 0, 0, 0.5])


def test_fitted_blend_weight_is_the_smallest_grid_weight_that_corrects_the_weak_eye():
    # Patient 0 has grade 2 in both eyes, but its right eye scores 1.2 (rounds to 1). Every
    # other patient's eyes agree, so blending changes nothing there. The right eye reaches
    # 1.5 when 1.2 + w * (2.0 - 1.2) >= 1.5, i.e. w >= 0.375; the left eye stays at
    # 2.0 - 0.8 w >= 1.6 for every w <= 0.5. So kappa is 1 from w = 0.38 on the 0.01 grid,
    # and below 1 before: the fitted weight is 0.38, with kappa 1.
    grades = np.array([2, 2, 0, 0, 4, 4, 1, 1])
    scores = np.array([2.0, 1.2, 0.0, 0.1, 4.0, 3.9, 1.0, 1.1])
    patients = ["0", "0", "1", "1", "2", "2", "3", "3"]
    partner = calibration.partner_index(patients, ["left", "right"] * 4)
    w, k = calibration.fit_blend_weight(scores_to_grades, scores, partner, grades)
    assert w == pytest.approx(math.ceil(0.375 * 100) / 100)  # 0.38
    assert k == pytest.approx(1.0)
    assert qwk(grades, scores_to_grades(scores)) < 1.0  # without blending
    before = calibration.blend_eyes(scores, partner, 0.37)
    assert scores_to_grades(before)[1] == 1  # 0.37 is not enough: 1.2 + 0.296 < 1.5


def test_blend_weight_fitted_on_noisy_eyes_is_well_above_zero_and_raises_kappa():
    # Both eyes share the grade; each eye's score has large independent noise, so averaging
    # the eyes helps and the fitted weight must be well above 0, with kappa higher than w=0.
    rng = np.random.default_rng(2)
    n_patients = 150
    grade = np.repeat(rng.integers(0, 5, n_patients), 2)
    patients = np.repeat(np.arange(n_patients).astype(str), 2)
    eyes = np.tile(["left", "right"], n_patients)
    scores = grade + rng.normal(0, 0.9, 2 * n_patients)
    partner = calibration.partner_index(patients, eyes)
    w, k = calibration.fit_blend_weight(scores_to_grades, scores, partner, grade)
    assert w >= 0.3
    assert k == pytest.approx(qwk(grade, rounded(hand_blend(scores, patients, eyes, w))))
    assert k > qwk(grade, rounded(scores))


def _predictions(scores, grades, patients, eyes, probs=None) -> Predictions:
    n = len(scores)
    return Predictions(
        ids=np.array([f"{p}_{e}" for p, e in zip(patients, eyes, strict=True)]),
        patients=np.array(patients),
        eyes=np.array(eyes),
        grades=np.array(grades),
        scores=np.array(scores, np.float64),
        probs=np.full((n, 5), 0.2) if probs is None else np.asarray(probs, np.float64),
    )


def test_calibration_fits_the_blend_first_then_cut_points_on_the_blended_scores():
    """Every fitted value against a reference of its own: the weights by a brute-force grid
    search of sklearn's kappa on a hand blend; the cut points as a coordinate-wise optimum of
    sklearn's kappa on those blended scores (no move of one cut point to any midpoint between
    its neighbours raises it)."""
    rng = np.random.default_rng(5)
    n_patients = 60
    grades = np.repeat(rng.integers(0, 5, n_patients), 2)
    patients = list(np.repeat(np.arange(n_patients).astype(str), 2))
    eyes = ["left", "right"] * n_patients
    scores = 0.7 * grades + rng.normal(0, 0.6, 2 * n_patients)
    probs = np.eye(5)[np.clip(grades + rng.integers(-1, 2, 2 * n_patients), 0, 4)]
    val = _predictions(scores, grades, patients, eyes, probs)
    cal = calibration.fit_calibration(val, fit_thresholds=True, per_patient=True)

    w_score = grid_search(grades, rounded, lambda w: hand_blend(scores, patients, eyes, w))
    w_prob = grid_search(
        grades, lambda p: p.argmax(axis=1), lambda w: hand_blend(probs, patients, eyes, w)
    )
    assert (cal.blend_score, cal.blend_prob) == (w_score, w_prob) and w_score > 0
    blended = hand_blend(scores, patients, eyes, w_score)
    applied = cal.apply(val)
    np.testing.assert_allclose(applied.scores, blended, rtol=0, atol=1e-12)
    np.testing.assert_allclose(applied.probs, hand_blend(probs, patients, eyes, w_prob), atol=1e-12)

    cuts = list(cal.cutpoints)
    assert cuts == sorted(cuts) and len(cuts) == 4

    best = assert_a_fixed_point_of_the_coordinate_search(cuts, blended, grades)
    assert best > qwk(grades, rounded(blended)) + 0.02  # the cut points do something here
    # Nothing asked, nothing changed.
    plain = calibration.fit_calibration(val, fit_thresholds=False, per_patient=False)
    assert plain == calibration.Calibration() and plain.apply(val) is val


# ---------------------------------------------------------------------------------------------
# The external-validation operating point

# A development val split: 6 non-referable images (grades 0-1) and 4 referable ones.
DEV_GRADES = np.array([0, 0, 0, 0, 0, 2, 2, 3, 4, 1])
DEV_SCORES = np.array([0.1, 0.4, 0.9, 1.2, 2.1, 1.8, 2.6, 3.1, 3.9, 1.5])


@pytest.mark.parametrize(
    ("text", "threshold"),
    [
        # spec >= 0.8 needs 5 of the 6 negatives (0.1 0.4 0.9 1.2 1.5 | 2.1) below the
        # threshold: 1.8 is the lowest such value; it refers all 4 positives.
        ("spec=0.8", 1.8),
        # spec >= 0.9 needs all 6 below: above 2.1, so 2.6; sensitivity 3/4.
        ("specificity=90%", 2.6),
        # sens >= 0.75: at most 2.6 (2.6, 3.1, 3.9 referred); the best specificity there, 6/6.
        ("sens=0.75", 2.6),
        # Youden: 1.8 gives 1 + 5/6 - 1; 2.6 gives 3/4 + 1 - 1; every other value less.
        ("youden", 1.8),
    ],
)
def test_the_operating_point_is_chosen_by_its_rule_as_a_hand_calculation(text, threshold):
    rule = calibration.parse_operating_point(text)
    assert calibration.choose_threshold(DEV_GRADES, DEV_SCORES, rule) == threshold


def test_the_operating_point_equals_the_best_roc_point_of_sklearn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    grades = rng.integers(0, 5, 300)
    scores = np.round(grades + rng.normal(0, 1.2, 300), 1)  # ties included
    fpr, tpr, thr = roc_curve(grades >= 2, scores, drop_intermediate=False)
    for floor in (0.8, 0.9, 0.95):
        ok = 1 - fpr >= floor
        best = thr[ok][np.argmax(tpr[ok])]  # ties: roc_curve lists the higher threshold first
        rule = calibration.OperatingRule("specificity", floor)
        assert calibration.choose_threshold(grades, scores, rule) == best
    youden = thr[np.argmax(np.round(tpr - fpr, 12))]
    assert calibration.choose_threshold(grades, scores, calibration.OperatingRule("youden")) == (
        youden
    )


def test_without_both_classes_there_is_no_operating_point():
    rule = calibration.OperatingRule("youden")
    assert calibration.choose_threshold([0, 1, 1], [0.2, 0.5, 0.9], rule) is None
    preds = Predictions(
        ids=np.array(["a", "b"]), patients=np.array(["a", "b"]), eyes=np.array(["", ""]),
        grades=np.array([2, 3]), scores=np.array([2.0, 3.0]), probs=np.full((2, 5), 0.2),
    )  # fmt: skip
    with pytest.raises(calibration.UsageError, match="referable and non-referable"):
        calibration.operating_thresholds(preds, rule)


@pytest.mark.parametrize("text", ["spec", "spec=1.5", "spec=0", "sens=x", "youden=1", "auc=0.9"])
def test_a_bad_operating_point_is_a_usage_error_naming_its_setting(text):
    with pytest.raises(calibration.UsageError) as e:
        calibration.parse_operating_point(text)
    assert e.value.setting == "operating_point" and "youden, spec=F or sens=F" in str(e.value)
