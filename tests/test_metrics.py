"""Quadratic weighted kappa against sklearn, and the two ways to read a grade."""

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score

from m2cnn_tf.metrics import (
    QuadraticKappa,
    probs_to_grades,
    quadratic_weighted_kappa,
    scores_to_grades,
)

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
