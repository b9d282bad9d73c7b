"""Evaluation of a trained stage: the paper's two test methods and the clinical view.

§III-A "Evaluation Metric" and Table II/III: the quadratic weighted kappa, read two ways:
*scores* (the regression output cut into grades by rounding, or by cut points fitted on val) and
*prob.* (argmax of the softmax). On top of the paper: a 95% bootstrap confidence interval, the
confusion matrix, per-grade sensitivity/specificity, and referable DR (grade >= 2), which is
what a screening programme acts on.

Two additions that the best Kaggle 2015 teams used and the paper does not:
- test-time augmentation (TTA) over the symmetries of the fundus (flips, optionally rot90);
- per-patient blending of the two eyes (see `blend_eyes`).
Everything here is numpy on top of one batched model pass, so the figures can be recomputed
from predictions.csv alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.metrics import (
    DEFAULT_CUTPOINTS,
    confusion_matrix,
    kappa_from_confusion,
    probs_to_grades,
    quadratic_weighted_kappa,
    scores_to_grades,
)

REFERABLE_GRADE = 2  # moderate NPDR or worse: refer to an ophthalmologist
WAYS = ("scores", "prob")  # Table II's two test methods
CSV_COLUMNS = (
    "id", "patient", "eye", "grade", "score",
    *(f"p{k}" for k in range(NUM_CLASSES)),
    "pred_score", "pred_prob",
)  # fmt: skip
TTA_MODES = ("none", "flips", "flips+rot90")


# ---------------------------------------------------------------------------------------------
# Model outputs


def tta_views(images: tf.Tensor, mode: str) -> list[tf.Tensor]:
    """The views TTA averages over; a fundus has no preferred orientation (§II-A).

    "flips": identity, left-right, up-down, both (4 views). "flips+rot90": the 8 symmetries of
    the square (the 4 flips, each also transposed).
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")
    views = [images]
    if mode in ("flips", "flips+rot90"):
        lr = tf.reverse(images, axis=[2])
        views += [lr, tf.reverse(images, axis=[1]), tf.reverse(lr, axis=[1])]
    if mode == "flips+rot90":
        views += [tf.transpose(v, [0, 2, 1, 3]) for v in views]
    return views


def make_predict_fn(model, tta: str = "none") -> Callable[[Any], dict[str, tf.Tensor]]:
    """A compiled batch function: images -> {"logits", "score", "probabilities"}.

    With TTA, the softmax probabilities, the logits and the score are each the mean over views
    (probabilities are averaged, not re-derived from the mean logits). The views go through the
    model as one concatenated batch, so TTA costs one call per batch.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose one of {TTA_MODES}")

    @tf.function(reduce_retracing=True)
    def predict(images):
        images = tf.convert_to_tensor(images, tf.float32)
        views = tta_views(images, tta)
        out = model(tf.concat(views, axis=0) if len(views) > 1 else images, training=False)
        logits = tf.cast(out["logits"], tf.float32)
        score = tf.reshape(tf.cast(out["score"], tf.float32), [-1])
        probs = tf.nn.softmax(logits, axis=-1)
        n = len(views)
        if n > 1:
            batch = tf.shape(images)[0]

            def mean(x):
                return tf.reduce_mean(tf.reshape(x, tf.concat([[n, batch], tf.shape(x)[1:]], 0)), 0)

            logits, score, probs = mean(logits), mean(score), mean(probs)
        return {"logits": logits, "score": score, "probabilities": probs}

    return predict


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
    """Run the model over a `data.make_dataset(..., training=False)` dataset of (images, meta)."""
    predict = make_predict_fn(model, tta)
    parts: dict[str, list] = {k: [] for k in ("id", "patient", "eye", "grade", "score", "probs")}
    for images, meta in dataset:
        out = predict(images)
        parts["score"].append(out["score"].numpy())
        parts["probs"].append(out["probabilities"].numpy())
        for key in ("id", "patient", "eye", "grade"):
            parts[key].append(meta[key].numpy())
        if progress is not None:
            progress.update(int(images.shape[0]))
    if not parts["score"]:
        raise ValueError("the dataset is empty: nothing to evaluate")
    return Predictions(
        ids=_text(np.concatenate(parts["id"])),
        patients=_text(np.concatenate(parts["patient"])),
        eyes=_text(np.concatenate(parts["eye"])),
        grades=np.concatenate(parts["grade"]).astype(np.int64).ravel(),
        scores=np.concatenate(parts["score"]).astype(np.float64).ravel(),
        probs=np.concatenate(parts["probs"]).astype(np.float64),
    )


# ---------------------------------------------------------------------------------------------
# Grading and metrics


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

    def kappa(c):
        value = quadratic_weighted_kappa(grades, scores_to_grades(scores, c))
        return -np.inf if math.isnan(value) else value

    best = kappa(cuts)
    distinct = np.unique(scores)
    midpoints = (distinct[1:] + distinct[:-1]) / 2 if len(distinct) > 1 else distinct
    for _ in range(max_rounds):
        moved = False
        for i in range(len(cuts)):
            lo = cuts[i - 1] if i > 0 else -np.inf
            hi = cuts[i + 1] if i + 1 < len(cuts) else np.inf
            cand = midpoints[(midpoints > lo) & (midpoints < hi)]
            if len(cand) > max_candidates:
                cand = np.quantile(cand, np.linspace(0, 1, max_candidates))
            for value in cand:
                trial = cuts.copy()
                trial[i] = value
                k = kappa(trial)
                if k > best + 1e-12:
                    best, cuts, moved = k, trial, True
        if not moved:
            break
    return tuple(float(c) for c in cuts)


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
    y_true = np.ravel(np.asarray(y_true)).astype(int)
    y_pred = np.ravel(np.asarray(y_pred)).astype(int)
    if groups is None:
        group_index = np.arange(len(y_true))
    else:
        _, group_index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    # One flattened confusion matrix per group; a replicate's matrix is counts @ per_group.
    cells = y_true * num_classes + y_pred
    per_group = np.zeros((n_groups, num_classes * num_classes), np.float64)
    np.add.at(per_group, (group_index, cells), 1.0)
    rng = np.random.default_rng(seed)
    kappas = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        cm = (counts @ per_group).reshape(num_classes, num_classes)
        kappas[b] = kappa_from_confusion(cm)
    kappas = kappas[~np.isnan(kappas)]
    if not len(kappas):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(kappas, [tail, 100 - tail])
    return float(low), float(high)


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


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def referable_metrics(
    grades, continuous, predicted_grades, threshold: float | None
) -> dict[str, Any]:
    """Referable DR (grade >= 2): ROC AUC of a continuous output, and the operating point.

    The operating point is the grader's own decision: referable iff its predicted grade is >= 2
    (score >= the second cut point; or argmax >= 2). So the sensitivity/specificity reported are
    those of the grades in predictions.csv, not of a threshold tuned on the split itself.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

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
        "kappa": _finite(kappa),
        "kappa_ci95": [_finite(low), _finite(high)],
        "accuracy": float((grades == predicted).mean()),
        "confusion_matrix": cm.tolist(),
        "per_grade": per_grade_rates(cm),
        "referable": referable_metrics(grades, continuous, predicted, threshold),
    }


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


# ---------------------------------------------------------------------------------------------
# Per-patient blending


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


def fit_blend_weight(grade_fn, values, partner, grades, grid=None) -> tuple[float, float]:
    """The weight in `grid` (default 0, 0.01, ..., 0.5) that maximises kappa; ties -> smaller.

    `grade_fn` turns blended values into grades. Returns (weight, kappa at that weight); w=0
    (no blending) is in the grid, so fitting never lowers kappa on the data it is fitted on.
    """
    grid = np.round(np.arange(0.0, 0.5001, 0.01), 4) if grid is None else np.asarray(grid)
    best_w, best_k = 0.0, -np.inf
    for w in grid:
        k = quadratic_weighted_kappa(grades, grade_fn(blend_eyes(values, partner, float(w))))
        k = -np.inf if math.isnan(k) else k
        if k > best_k + 1e-12:
            best_w, best_k = float(w), k
    return best_w, float(best_k)


@dataclasses.dataclass
class Calibration:
    """What is fitted on val and applied to the evaluated split."""

    cutpoints: tuple[float, ...] = DEFAULT_CUTPOINTS
    blend_score: float = 0.0
    blend_prob: float = 0.0
    per_patient: bool = False

    def apply(self, preds: Predictions) -> Predictions:
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
# Report


def evaluate_predictions(
    preds: Predictions,
    cutpoints: Sequence[float] = DEFAULT_CUTPOINTS,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both test methods' figures for (already calibrated) predictions."""
    groups = preds.patients if all(preds.patients) else None
    cuts = tuple(sorted(float(c) for c in cutpoints))
    return {
        "scores": way_metrics(
            preds.grades,
            scores_to_grades(preds.scores, cuts),
            preds.scores,
            threshold=cuts[REFERABLE_GRADE - 1],
            groups=groups,
            n_boot=n_boot,
            seed=seed,
        ),
        "prob": way_metrics(
            preds.grades,
            probs_to_grades(preds.probs),
            referable_probability(preds.probs),
            threshold=None,
            groups=groups,
            n_boot=n_boot,
            seed=seed,
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
    }


def write_predictions_csv(
    path: str | Path, preds: Predictions, cutpoints: Sequence[float], extra: dict | None = None
) -> None:
    """predictions.csv; `extra` maps additional column names to per-row arrays (appended)."""
    extra = extra or {}
    pred_score = scores_to_grades(preds.scores, cutpoints)
    pred_prob = probs_to_grades(preds.probs)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, *extra])
        for i in range(len(preds)):
            writer.writerow(
                [
                    preds.ids[i],
                    preds.patients[i],
                    preds.eyes[i],
                    int(preds.grades[i]),
                    f"{preds.scores[i]:.6f}",
                    *(f"{p:.6f}" for p in preds.probs[i]),
                    int(pred_score[i]),
                    int(pred_prob[i]),
                    *(f"{v[i]:.6f}" for v in extra.values()),
                ]
            )


def plot_confusion(path: str | Path, report: dict[str, Any], title: str = "") -> None:
    """confusion_matrix.png: counts, coloured by row-normalised rate, one panel per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, way in zip(axes, WAYS, strict=True):
        cm = np.asarray(report[way]["confusion_matrix"], np.float64)
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, f"{int(count)}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.6 else "black", fontsize=9)  # fmt: skip
        ax.set_xticks(range(NUM_CLASSES))
        ax.set_yticks(range(NUM_CLASSES))
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("true grade")
        kappa = report[way]["kappa"]
        ax.set_title(f"{way}: kappa {kappa:.3f}" if kappa is not None else way)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path: str | Path, report: dict[str, Any], title: str = "") -> None:
    """roc_referable.png: ROC of grade >= 2 for both ways, with each grader's operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for way, colour in zip(WAYS, ("tab:blue", "tab:orange"), strict=True):
        ref = report[way]["referable"]
        if ref["auc"] is None:
            continue
        ax.plot(ref["roc"]["fpr"], ref["roc"]["tpr"], color=colour,
                label=f"{way} (AUC {ref['auc']:.3f})")  # fmt: skip
        if ref["sensitivity"] is not None and ref["specificity"] is not None:
            ax.plot(1 - ref["specificity"], ref["sensitivity"], "o", color=colour)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or "referable DR (grade >= 2)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: str | Path, report: dict[str, Any], preds: Predictions, extra=None
) -> None:
    """report.json, predictions.csv and the two plots into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", preds, report["cutpoints"], extra)
    title = f"{report.get('split', '')} {report.get('image_size', '')} px".strip()
    plot_confusion(out / "confusion_matrix.png", report, title)
    plot_roc(out / "roc_referable.png", report, f"referable DR (grade >= 2), {title}")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "report.json")


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table_ii(reports: Iterable[tuple[str, dict[str, Any]]]) -> str:
    """A text table shaped like the paper's Table II: columns = run x (scores, prob.), rows =
    split and resolution. Each report lands in its run's column and its split's row."""
    reports = list(reports)
    runs: list[str] = []
    rows: list[str] = []
    cells: dict[tuple[str, str], dict] = {}
    for run, rep in reports:
        row = f"{rep.get('split', '?')} {rep.get('image_size', '?')}×{rep.get('image_size', '?')}"
        if run not in runs:
            runs.append(run)
        if row not in rows:
            rows.append(row)
        cells[(run, row)] = rep
    rows.sort(key=lambda r: (r.split()[0] != "val", r))
    first = max(len("Train / Test"), *(len(r) for r in rows))
    width = max(13, *(len(r) for r in runs))
    half = (width - 1) // 2
    lines = [
        "Train".ljust(first) + " | " + " | ".join(r.center(width) for r in runs),
        "Test".ljust(first)
        + " | "
        + " | ".join("scores".rjust(half) + " " + "prob.".rjust(width - half - 1) for _ in runs),
    ]
    lines.insert(1, "-" * len(lines[0]))
    for row in rows:
        parts = []
        for run in runs:
            rep = cells.get((run, row))
            if rep is None:
                parts.append("-".rjust(half) + " " + "-".rjust(width - half - 1))
            else:
                parts.append(
                    _fmt(rep["scores"]["kappa"]).rjust(half)
                    + " "
                    + _fmt(rep["prob"]["kappa"]).rjust(width - half - 1)
                )
        lines.append(row.ljust(first) + " | " + " | ".join(parts))
    return "\n".join(lines)


def details_table(reports: Iterable[tuple[str, dict[str, Any]]]) -> str:
    """CI, accuracy and referable-DR figures per report, one line per (run, way)."""
    header = (
        f"{'run':<16} {'split':<10} {'way':<6} {'kappa':>6} {'95% CI':>15} {'acc':>6} "
        f"{'refAUC':>6} {'refSens':>7} {'refSpec':>7}"
    )
    lines = [header, "-" * len(header)]
    for run, rep in reports:
        split = f"{rep.get('split', '?')}@{rep.get('image_size', '?')}"
        for way in WAYS:
            m = rep[way]
            ci = f"[{_fmt(m['kappa_ci95'][0])}, {_fmt(m['kappa_ci95'][1])}]"
            ref = m["referable"]
            lines.append(
                f"{run[:16]:<16} {split:<10} {way:<6} {_fmt(m['kappa']):>6} {ci:>15} "
                f"{_fmt(m['accuracy']):>6} {_fmt(ref['auc']):>6} {_fmt(ref['sensitivity']):>7} "
                f"{_fmt(ref['specificity']):>7}"
            )
    return "\n".join(lines)


def load_report(report_dir: str | Path) -> dict[str, Any]:
    path = Path(report_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report.json in {report_dir}")
    return json.loads(path.read_text())


def run_kind(meta: dict[str, Any]) -> str | None:
    """Table II's column name of a run from its best.json: "MSE", "CE", "Multi-Task" (no
    Multi-Cell) or "M²CNN"; "+MC" marks a single-task run with cells. None for checkpoints
    that predate the --loss/--multi-cell switches."""
    flags = meta.get("flags", {})
    loss = meta.get("loss", flags.get("loss"))
    if loss is None:
        return None
    multi_cell = bool(meta.get("multi_cell", flags.get("multi_cell", True)))
    if loss == "multitask":
        return "M²CNN" if multi_cell else "Multi-Task"
    return loss.upper() + ("+MC" if multi_cell else "")


def run_label(report_dir: str | Path, report: dict[str, Any]) -> str:
    """The column a report goes in: the name of its --model-dir (one run, several stages),
    prefixed by the run's Table II column (loss, Multi-Cell) when best.json records it."""
    checkpoint = report.get("checkpoint", {})
    model_dir = checkpoint.get("model_dir")
    name = Path(model_dir).name if model_dir else Path(report_dir).name
    kind = run_kind(checkpoint.get("meta") or {})
    return f"{kind}: {name}" if kind else name


def compare_reports(report_dirs: Sequence[str | Path]) -> str:
    """Table II over several report dirs, plus the details table. When two reports of a run
    would share a cell (same split and size), that run's reports are labelled by their dirs."""
    loaded = [(d, load_report(d)) for d in report_dirs]
    labels = [run_label(d, r) for d, r in loaded]
    keys = [
        (lab, r.get("split"), r.get("image_size"))
        for lab, (_, r) in zip(labels, loaded, strict=True)
    ]
    clashing = {k[0] for k in keys if keys.count(k) > 1}
    labels = [
        Path(d).name if lab in clashing else lab for lab, (d, _) in zip(labels, loaded, strict=True)
    ]
    pairs = [(lab, r) for lab, (_, r) in zip(labels, loaded, strict=True)]
    return table_ii(pairs) + "\n\n" + details_table(pairs)


# ---------------------------------------------------------------------------------------------
# The whole evaluation (what evaluate.py runs)


def load_split_predictions(
    model, data_dir: str | Path, image_size: int, split: str, *, tta: str, batch_size: int
) -> Predictions:
    """Predict one split of data_prep's TFRecords with the training pipeline's reader."""
    from tqdm import tqdm

    from m2cnn_tf import data

    dataset = data.make_dataset(
        str(data_dir), image_size, split, batch_size=batch_size, training=False
    )
    with tqdm(desc=f"{split}@{image_size}", unit="img", leave=False) as bar:
        return predict_dataset(model, dataset, tta=tta, progress=bar)


def run_evaluation(
    model_dir: str | Path,
    stage: int,
    data_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    fit_thresholds: bool = False,
    tta: str = "none",
    per_patient: bool = False,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the best checkpoint of a stage on a split and write the report files.

    Anything fitted (cut points, blend weights) is fitted on val and applied to `split`; when
    `split` is val itself the figures are optimistic, and report.json says so.
    """
    from m2cnn_tf import checkpoints, data

    model, meta = checkpoints.load_stage(model_dir, stage)
    image_size = int(model.input_shape[1])
    shards = data.split_files(data_dir, image_size, split)  # one-line DataError if absent
    preds = load_split_predictions(
        model, data_dir, image_size, split, tta=tta, batch_size=batch_size
    )
    calibration = Calibration()
    if fit_thresholds or per_patient:
        val = (
            preds
            if split == "val"
            else load_split_predictions(
                model, data_dir, image_size, "val", tta=tta, batch_size=batch_size
            )
        )
        calibration = fit_calibration(val, fit_thresholds=fit_thresholds, per_patient=per_patient)
    final = calibration.apply(preds)
    report = evaluate_predictions(final, calibration.cutpoints, n_boot=n_boot, seed=seed)
    report.update(
        {
            "split": split,
            "image_size": image_size,
            "stage": stage,
            "checkpoint": {
                "model_dir": str(Path(model_dir).resolve()),
                "path": str(checkpoints.best_model_path(model_dir, stage).resolve()),
                "meta": meta,
            },
            "data": {"dir": str(Path(data_dir).resolve()), "shards": shards},
            "tta": tta,
            "thresholds": "fit on val" if fit_thresholds else "rounding",
            "per_patient": {
                "enabled": per_patient,
                "weight_score": calibration.blend_score,
                "weight_prob": calibration.blend_prob,
                "method": "(1-w)*own + w*other eye, w in [0,0.5] fitted on val; scores and "
                "probabilities each get their own w",
            },
            "fitted_on_evaluated_split": split == "val" and (fit_thresholds or per_patient),
            "operating_point": "referable iff the graded output is >= 2 (scores: score >= the "
            "second cut point; prob.: argmax >= 2)",
        }
    )
    extra = {"score_own": preds.scores} if per_patient else None
    write_report(out_dir, report, final, extra)
    return report
