"""The paper's claims as paired differences: kappa(a) − kappa(b) on the same images, with a CI.

Each comparison of `figures.comparisons()` sets two runs' evaluations of one split against each
other, image by image (predictions.csv, matched by id). With one seed the CI is the paired
percentile bootstrap over patients (`metrics.paired_kappa_difference`, the protocol's
replicates, seeded); with `--seeds N` (N ≥ 2) the difference is the mean of the N seeds' and
the CI is Student's t across them (`metrics.mean_ci_across_seeds`), which adds what another
seed would change to what other images would. `paper_inside_ci` says whether the paper's
difference lies in our CI: the paper's effect reproduced, or not ruled out. Kept free of
TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from m2cnn_tf.common import finite_or_none
from m2cnn_tf.metrics import (
    mean_ci_across_seeds,
    paired_kappa_difference,
    probs_to_grades,
    scores_to_grades,
)
from m2cnn_tf.reports import REPORT, load_predictions, load_report
from m2cnn_tf.reproduce import figures, protocol
from m2cnn_tf.reproduce.plan import Plan

BOOTSTRAP = "paired bootstrap over patients"
ACROSS_SEEDS = "Student's t across seeds"


def _graded(plan: Plan, run: str, split: str, seed: int) -> dict[str, tuple] | None:
    """id -> (patient, grade, score-way grade, prob-way grade) of the run's evaluation with the
    plan's checkpoint (predictions.csv, graded with its report's cut points), or None before
    it exists."""
    e = plan.evaluation(run, split, plan.options.checkpoint, seed)
    if e is None or not (Path(e.out) / REPORT).is_file():
        return None
    preds = load_predictions(e.out)
    by_scores = scores_to_grades(preds.scores, load_report(e.out)["cutpoints"])
    by_prob = probs_to_grades(preds.probs)
    rows = zip(preds.ids, preds.patients, preds.grades, by_scores, by_prob, strict=True)
    return {i: (p, int(g), int(s), int(q)) for i, p, g, s, q in rows}


def _paired(a: dict[str, tuple], b: dict[str, tuple], way: str) -> tuple[np.ndarray, ...] | None:
    """(grades, a's, b's, patients) over the images both graded, or None if they differ."""
    if set(a) != set(b):
        return None
    ids = sorted(a)
    column = 2 if way == "scores" else 3
    grades = np.array([a[i][1] for i in ids])
    return (grades, np.array([a[i][column] for i in ids]), np.array([b[i][column] for i in ids]),
            np.array([a[i][0] for i in ids]))  # fmt: skip


def comparison(plan: Plan, c: figures.Comparison) -> dict[str, Any]:
    """One comparison's row of tables.json (its keys are the issue's contract)."""
    run_a, run_b = figures.comparison_runs(c, plan.options.ablation_init)
    n_boot = protocol.EVALUATION["bootstrap"].value
    differences, bootstrap, n_images = [], [None, None], None
    for seed in range(plan.options.seeds):
        a, b = _graded(plan, run_a, c.split, seed), _graded(plan, run_b, c.split, seed)
        pairs = _paired(a, b, c.way) if a is not None and b is not None else None
        if pairs is None:
            differences.append(None)
            continue
        grades, graded_a, graded_b, patients = pairs
        groups = patients if all(patients) else None
        difference, low, high = paired_kappa_difference(
            grades, graded_a, graded_b, groups=groups, n_boot=n_boot, seed=0
        )
        differences.append(finite_or_none(difference))
        if seed == 0:
            bootstrap, n_images = [finite_or_none(low), finite_or_none(high)], len(grades)
    ours, ci, method = _aggregate(differences, bootstrap)
    inside = None
    if c.paper is not None and None not in ci:
        inside = bool(ci[0] <= c.paper <= ci[1])
    return {
        "table": c.table, "claim": c.claim, "a": c.a, "b": c.b, "run_a": run_a, "run_b": run_b,
        "split": c.split, "size": c.size, "way": c.way,
        "checkpoint": plan.options.checkpoint, "n_images": n_images,
        "ours": ours, "ci_low": ci[0], "ci_high": ci[1], "ci_method": method,
        "paper": c.paper, "paper_inside_ci": inside,
        "seed_0": {"difference": differences[0], "ci95": bootstrap},
        "seeds": differences if plan.options.seeds > 1 else None,
    }  # fmt: skip


def _aggregate(
    differences: list[float | None], bootstrap: list[float | None]
) -> tuple[float | None, list[float | None], str]:
    """(our difference, its CI, how the CI was made): seed 0's with its bootstrap CI, or the
    mean over every seed with the t interval across them."""
    if len(differences) == 1:
        return differences[0], bootstrap, BOOTSTRAP
    if any(d is None for d in differences):
        return None, [None, None], ACROSS_SEEDS
    mean, low, high = mean_ci_across_seeds(differences)
    rounded = [finite_or_none(low), finite_or_none(high)]
    return finite_or_none(mean), rounded, ACROSS_SEEDS


def comparisons(plan: Plan) -> list[dict[str, Any]]:
    """Every comparison whose experiment the plan reproduces."""
    return [
        comparison(plan, c) for c in figures.comparisons() if c.table in plan.options.experiments
    ]


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The comparisons as a Markdown table: ours beside the paper's difference."""
    if not rows:
        return []
    lines = ["## The paper's comparisons (paired: a − b on the same images)", ""]
    lines += ["| a − b | split | size | way | ours | 95% CI | paper | paper inside our CI |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci_low"], r["ci_high"]
        ci = "–" if None in (low, high) else f"[{low:+.3f}, {high:+.3f}]"
        inside = {True: "yes", False: "no", None: "–"}[r["paper_inside_ci"]]
        ours = "–" if r["ours"] is None else f"{r['ours']:+.3f}"
        paper = "–" if r["paper"] is None else f"{r['paper']:+.3f}"
        lines.append(f"| {r['a']} − {r['b']} | {r['split']} | {r['size']} | {r['way']} | {ours} "
                     f"| {ci} | {paper} | {inside} |")  # fmt: skip
    method = rows[0]["ci_method"]
    lines += ["", f"CI: {method}; paper: the paper's difference (– where it states only which "
              "is better)."]  # fmt: skip
    return [*lines, ""]
