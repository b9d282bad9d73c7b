"""Test helper: fitted cut points checked by hand, with scikit-learn's kappa as the reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score


def qwk(a, b) -> float:
    """Quadratic weighted kappa over the five grades, by scikit-learn."""
    return cohen_kappa_score(a, b, weights="quadratic", labels=list(range(5)))


def grades_by_hand(scores, cutpoints: Sequence[float]) -> list[int]:
    """A grade is the number of cut points its score reaches."""
    return [int(sum(s >= c for c in cutpoints)) for s in scores]


# predictions.csv writes scores to 6 decimals, the fit saw them in full: a midpoint of the
# written scores within this of a cut point is the place of that cut point itself, which the
# fit's search never offers its neighbours (strictly between them, so no grade is emptied).
CSV_ROUNDING = 1e-6


def assert_a_fixed_point_of_the_coordinate_search(cutpoints, scores, grades) -> float:
    """No cut point, moved alone to any midpoint between distinct scores within its neighbours,
    raises scikit-learn's kappa: what the fit's coordinate search stops at. Returns that kappa."""
    cuts = list(cutpoints)
    best = qwk(grades, grades_by_hand(scores, cuts))
    distinct = np.unique(scores)
    midpoints = (distinct[1:] + distinct[:-1]) / 2
    for i in range(4):
        lo = cuts[i - 1] + CSV_ROUNDING if i else -np.inf
        hi = cuts[i + 1] - CSV_ROUNDING if i < 3 else np.inf
        for m in midpoints[(midpoints > lo) & (midpoints < hi)]:
            trial = [*cuts[:i], m, *cuts[i + 1 :]]
            assert qwk(grades, grades_by_hand(scores, trial)) <= best + 1e-12, (i, m)
    return best
