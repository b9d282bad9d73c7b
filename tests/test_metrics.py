"""Quadratic weighted kappa against sklearn, the two ways to read a grade, and the report's
statistics (bootstrap CI, per-grade and referable rates) against plain loops and hand counts."""

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score

from m2cnn_tf.metrics import (
    bootstrap_kappa_ci,
    mean_ci_across_seeds,
    paired_kappa_difference,
    per_grade_rates,
    probs_to_grades,
    quadratic_weighted_kappa,
    referable_metrics,
    scores_to_grades,
)
from m2cnn_tf.train_step import QuadraticKappa

LABELS = list(range(5))


def sklearn_kappa(y_true, y_pred):
    return cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=LABELS)


def streaming_kappa(y_true, y_pred, batch=7, **kwargs):
    metric = QuadraticKappa(**kwargs)
    for i in range(0, len(y_true), batch):
        metric.update_state(y_true[i : i + batch], y_pred[i : i + batch])
    return float(metric.result())


@pytest.mark.parametrize("seed", range(5))
def test_streaming_kappa_equals_sklearn_on_random_grades(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.clip(y_true + rng.integers(-2, 3, 200), 0, 4)
    one_hot = np.eye(5)[y_pred]
    assert streaming_kappa(y_true, one_hot, from_scores=False) == pytest.approx(
        sklearn_kappa(y_true, y_pred), abs=1e-6
    )
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(
        sklearn_kappa(y_true, y_pred), abs=1e-6
    )


def test_streaming_kappa_from_scores_rounds_and_clips_before_comparing():
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 5, 150)
    scores = y_true + rng.normal(0, 0.9, 150)
    expected = sklearn_kappa(y_true, np.clip(np.floor(scores + 0.5), 0, 4).astype(int))
    assert streaming_kappa(y_true, scores[:, None], from_scores=True) == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [
        ([0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 4, 2]),  # perfect agreement
        ([0, 0, 4, 4], [4, 4, 0, 0]),  # total disagreement
        ([0, 0, 0], [4, 4, 4]),  # each side one class
        ([1, 2, 3], [2, 2, 2]),  # a constant prediction
    ],
)
def test_kappa_edge_cases_equal_sklearn(y_true, y_pred):
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    want = sklearn_kappa(y_true, y_pred)
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(want, abs=1e-6)
    got = streaming_kappa(y_true, np.eye(5)[y_pred], from_scores=False)
    assert got == pytest.approx(want, abs=1e-6)


def test_kappa_of_a_single_class_is_undefined_like_sklearn():
    y = np.array([2, 2, 2, 2])
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(sklearn_kappa(y, y))
    assert np.isnan(quadratic_weighted_kappa(y, y))
    assert np.isnan(streaming_kappa(y, np.eye(5)[y], from_scores=False))


def test_reset_state_forgets_earlier_batches():
    metric = QuadraticKappa(from_scores=False)
    metric.update_state(np.array([0, 4]), np.eye(5)[[4, 0]])
    metric.reset_state()
    metric.update_state(np.array([0, 1, 2]), np.eye(5)[[0, 1, 2]])
    assert float(metric.result()) == pytest.approx(1.0)


def test_scores_round_to_the_nearest_grade_and_clip_to_0_4():
    scores = [-0.7, 0.49, 0.5, 1.49, 2.6, 3.5, 7.0]
    np.testing.assert_array_equal(scores_to_grades(scores), [0, 0, 1, 1, 3, 4, 4])


def test_scores_use_given_cut_points():
    np.testing.assert_array_equal(
        scores_to_grades([0.2, 0.9, 2.0, 2.9, 3.1], cutpoints=(0.3, 1.0, 2.95, 3.0)),
        [0, 1, 2, 2, 4],
    )


def test_probabilities_take_the_argmax():
    probs = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(probs_to_grades(probs), [1, 4])


def _reference_bootstrap(y_true, y_pred, groups, n_boot, seed, level=0.95):
    """A plain loop: resample groups, concatenate their images, sklearn kappa, percentiles."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = sorted(set(groups))
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in names}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(names), size=len(names))
        idx = [i for k in picked for i in members[names[k]]]
        t, p = y_true[idx], y_pred[idx]
        # Kappa is undefined (sklearn: nan) when the expected disagreement is zero: skip.
        expected = np.outer(np.bincount(t, minlength=5), np.bincount(p, minlength=5))
        if ((np.arange(5)[:, None] - np.arange(5)[None, :]) ** 2 * expected).sum() == 0:
            continue
        values.append(sklearn_kappa(t, p))
    tail = (1 - level) / 2 * 100
    return tuple(np.percentile(values, [tail, 100 - tail]))


def test_bootstrap_ci_matches_reference_and_contains_the_estimate():
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 5, 60)
    y_pred = np.clip(y_true + rng.integers(-1, 2, 60), 0, 4)
    groups = [str(i // 2) for i in range(60)]  # two eyes per patient
    for g in (None, groups):
        got = bootstrap_kappa_ci(y_true, y_pred, groups=g, n_boot=300, seed=5)
        ref_groups = g if g is not None else [str(i).zfill(3) for i in range(60)]
        ref = _reference_bootstrap(y_true, y_pred, ref_groups, 300, 5)
        np.testing.assert_allclose(got, ref, atol=1e-9)
        assert got[0] <= sklearn_kappa(y_true, y_pred) <= got[1]
        assert got[0] < got[1]


def test_bootstrap_ci_hand_cases():
    # Perfect agreement: every defined replicate has kappa 1, so the CI is exactly [1, 1].
    y = np.array([0, 1, 2, 3, 4] * 4)
    assert bootstrap_kappa_ci(y, y, n_boot=200) == (1.0, 1.0)
    # Two images, 0 and 4, both predicted 2: resamples {0,0}, {4,4} are undefined (nan) and
    # dropped; {0,4} (in either order) has kappa 0. So the CI is [0, 0].
    assert bootstrap_kappa_ci([0, 4], [2, 2], n_boot=200) == (0.0, 0.0)


def test_paired_difference_ci_is_a_hand_written_paired_bootstrap_over_patients():
    """Both models graded on the SAME resample in every replicate (the images both got right
    cancel): the reference draws the same patients with a plain loop and sklearn's kappa."""
    rng = np.random.default_rng(21)
    y = rng.integers(0, 5, 80)
    a = np.clip(y + rng.integers(-1, 2, 80), 0, 4)  # the better model
    b = np.where(rng.random(80) < 0.3, rng.integers(0, 5, 80), a)  # a, with 30 % replaced
    groups = [str(i // 2) for i in range(80)]  # two eyes per patient
    got = paired_kappa_difference(y, a, b, groups=groups, n_boot=300, seed=4)

    names = sorted(set(groups))
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in names}
    draws = np.random.default_rng(4)
    differences = []
    for _ in range(300):
        idx = [i for k in draws.integers(0, len(names), len(names)) for i in members[names[k]]]
        differences.append(sklearn_kappa(y[idx], a[idx]) - sklearn_kappa(y[idx], b[idx]))
    low, high = np.percentile(differences, [2.5, 97.5])
    assert got[0] == pytest.approx(sklearn_kappa(y, a) - sklearn_kappa(y, b), abs=1e-12)
    np.testing.assert_allclose(got[1:], (low, high), atol=1e-9)
    # Paired: a model against itself differs by exactly 0 in every resample, although its own
    # kappa spreads over the resamples (unpaired intervals would not cancel that).
    assert paired_kappa_difference(y, a, a, groups=groups, n_boot=300) == (0.0, 0.0, 0.0)
    own = bootstrap_kappa_ci(y, a, groups=groups, n_boot=300)
    assert own[1] - own[0] > 0.05


def test_the_mean_over_seeds_has_students_t_interval_by_hand():
    values = [0.012, 0.030, -0.004]
    mean, low, high = mean_ci_across_seeds(values)
    sd = np.sqrt(sum((v - 0.012666667) ** 2 for v in values) / 2)
    half = 4.302653 * sd / np.sqrt(3)  # t(0.975, 2 degrees of freedom), from a table
    assert mean == pytest.approx(0.038 / 3) and (low, high) == pytest.approx(
        (mean - half, mean + half), rel=1e-5
    )
    assert np.isnan(mean_ci_across_seeds([0.01])[1])  # one seed: no spread to measure


def test_per_grade_and_referable_rates_equal_hand_counts():
    y_true = np.array([0, 0, 0, 1, 2, 2, 3, 4])
    y_pred = np.array([0, 1, 0, 1, 1, 2, 4, 4])
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (y_true, y_pred), 1)
    rates = per_grade_rates(cm)
    # Grade 0: 3 true, 2 found; none of the 5 others called 0. Grade 1: 1 true, found; of the
    # 7 others, 2 (a 0 and a 2) called 1, so specificity 5/7.
    assert rates[0] == {"grade": 0, "support": 3, "sensitivity": 2 / 3, "specificity": 1.0}
    assert rates[1] == {"grade": 1, "support": 1, "sensitivity": 1.0, "specificity": 5 / 7}
    assert rates[3]["sensitivity"] == 0.0
    # Referable (>= 2): true for 4 of 8 images; predicted for 3 (the 2 and the two 4s), all
    # true; the 2 called 1 is missed. Sensitivity 3/4; no image below 2 is referred: 4/4.
    ref = referable_metrics(y_true, y_pred.astype(float), y_pred, threshold=1.5)
    assert (ref["sensitivity"], ref["specificity"], ref["prevalence"]) == (0.75, 1.0, 0.5)
    assert ref["threshold"] == 1.5


def test_referable_figures_and_their_bootstrap_cis_equal_a_plain_resampling_loop():
    from sklearn.metrics import roc_auc_score

    from m2cnn_tf.metrics import referable_at

    rng = np.random.default_rng(4)
    grades = rng.integers(0, 5, 40)
    scores = grades + rng.normal(0, 1.5, 40)
    groups = [str(i // 2) for i in range(40)]  # two eyes per patient
    got = referable_at(grades, scores, 1.7, groups=groups, n_boot=200, seed=3)
    truth, refer = grades >= 2, scores >= 1.7
    assert got["auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert got["sensitivity"] == (refer & truth).sum() / truth.sum()
    assert got["specificity"] == (~refer & ~truth).sum() / (~truth).sum()
    # The reference: resample patients as bootstrap_kappa_ci does, concatenate their images.
    names = sorted(set(groups))
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in names}
    draw = np.random.default_rng(3)
    values: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": []}
    for _ in range(200):
        idx = [i for k in draw.integers(0, len(names), len(names)) for i in members[names[k]]]
        t, s, r = truth[idx], scores[idx], refer[idx]
        if t.any() and (~t).any():
            values["auc"].append(roc_auc_score(t, s))
        if t.any():
            values["sensitivity"].append((r & t).sum() / t.sum())
        if (~t).any():
            values["specificity"].append((~r & ~t).sum() / (~t).sum())
    for name, reference in values.items():
        np.testing.assert_allclose(got[f"{name}_ci95"], np.percentile(reference, [2.5, 97.5]))
        assert got[f"{name}_ci95"][0] <= got[name] <= got[f"{name}_ci95"][1]
