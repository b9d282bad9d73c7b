"""What an evaluation leaves behind and how it reads: report.json, predictions.csv, the two
plots, the Table II layout across runs (`evaluate.py --compare`), the `--min-kappa` gate, and
the one table across datasets of external validation (`--compare --operating-point`).

Table II of the paper: one column per training objective, split into its "scores" and "prob."
test methods, one row per test split and resolution. Each report is one cell pair; a run
(one --model-dir) fills a column. Every file is written atomically (`common.atomic_write_*`),
so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2cnn_tf.common import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.errors import UsageError
from m2cnn_tf.metrics import (
    WAYS,
    Predictions,
    probs_to_grades,
    scores_to_grades,
)

REPORT = "report.json"
CSV_COLUMNS = (
    "id", "patient", "eye", "grade", "score",
    *(f"p{k}" for k in range(NUM_CLASSES)),
    "pred_score", "pred_prob",
)  # fmt: skip
# Each way's figures that the tables read: a report.json without them is not one of ours.
_WAY_KEYS = ("kappa", "kappa_ci95", "accuracy", "referable")

# ---------------------------------------------------------------------------------------------
# Files


def predictions_csv(preds: Predictions, cutpoints: Sequence[float], extra=None) -> str:
    """predictions.csv's text; `extra` maps additional column names to per-row arrays."""
    extra = extra or {}
    pred_score = scores_to_grades(preds.scores, cutpoints)
    pred_prob = probs_to_grades(preds.probs)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
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
    return buffer.getvalue()


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: str | Path, report: dict[str, Any], title: str = "") -> None:
    """confusion_matrix.png: counts, coloured by row-normalised rate, one panel per way."""
    plt = _pyplot()
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
    atomic_write_bytes(path, _figure_bytes(fig))


def plot_roc(path: str | Path, report: dict[str, Any], title: str = "") -> None:
    """roc_referable.png: ROC of grade >= 2 for both ways, with each grader's operating point."""
    plt = _pyplot()
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
    if ax.get_legend_handles_labels()[1]:  # no curve when the split has one class only
        ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write_bytes(path, _figure_bytes(fig))


def write_report(
    out_dir: str | Path, report: dict[str, Any], preds: Predictions, extra=None
) -> None:
    """predictions.csv, the two plots, then report.json (last: its presence means complete)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the report folder {out}: {err.strerror}") from None
    atomic_write_text(out / "predictions.csv", predictions_csv(preds, report["cutpoints"], extra))
    title = f"{report.get('split', '')} {report.get('image_size', '')} px".strip()
    plot_confusion(out / "confusion_matrix.png", report, title)
    plot_roc(out / "roc_referable.png", report, f"referable DR (grade >= 2), {title}")
    atomic_write_json(out / REPORT, report)


def load_report(report_dir: str | Path) -> dict[str, Any]:
    """A report.json written by `write_report`, or a UsageError saying why not."""
    path = Path(report_dir) / REPORT
    if not path.is_file():
        raise UsageError(f"no {REPORT} in {report_dir}")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    for way in WAYS:
        if not isinstance(report, dict) or not all(k in report.get(way, {}) for k in _WAY_KEYS):
            raise UsageError(f"{path} is not an evaluation report: no {way!r} figures")
    return report


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pair(scores: str, prob: str, width: int) -> str:
    """A run's two sub-columns (scores, prob.), right-aligned in a `width` column."""
    half = (width - 1) // 2
    return scores.rjust(half) + " " + prob.rjust(width - half - 1)


def table_ii(reports: Iterable[tuple[str, dict[str, Any]]]) -> str:
    """A text table shaped like the paper's Table II: columns = run x (scores, prob.), rows =
    split and resolution. Each report lands in its run's column and its split's row."""
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
    header = "Train".ljust(first) + " | " + " | ".join(r.center(width) for r in runs)
    ways = " | ".join(_pair("scores", "prob.", width) for _ in runs)
    lines = [header, "-" * len(header), "Test".ljust(first) + " | " + ways]
    for row in rows:
        pairs = []
        for run in runs:
            rep = cells.get((run, row))
            kappas = ("-", "-") if rep is None else (_fmt(rep[w]["kappa"]) for w in WAYS)
            pairs.append(_pair(*kappas, width))
        lines.append(row.ljust(first) + " | " + " | ".join(pairs))
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


def tables(pairs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Table II, a blank line, then the details table."""
    return table_ii(pairs) + "\n\n" + details_table(pairs)


def run_kind(meta: dict[str, Any]) -> str | None:
    """Table II's column name of a run from its best.json: "MSE", "CE", "Multi-Task" (no
    Multi-Cell) or "M²CNN"; "+MC" marks a single-task run with cells. None for checkpoints
    that predate the loss and Multi-Cell settings."""
    flags = meta.get("flags", {})
    loss = meta.get("loss", flags.get("loss"))
    if loss is None:
        return None
    multi_cell = bool(meta.get("multi_cell", flags.get("multi_cell", True)))
    if loss == "multitask":
        return "M²CNN" if multi_cell else "Multi-Task"
    return loss.upper() + ("+MC" if multi_cell else "")


def run_label(report_dir: str | Path, report: dict[str, Any]) -> str:
    """The column a report goes in: the name of its model folder (one run, several stages),
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
        (label, r.get("split"), r.get("image_size"))
        for label, (_, r) in zip(labels, loaded, strict=True)
    ]
    clashing = {k[0] for k in keys if keys.count(k) > 1}
    pairs = []
    for label, (report_dir, report) in zip(labels, loaded, strict=True):
        pairs.append((Path(report_dir).name if label in clashing else label, report))
    return tables(pairs)


def kappa_gate(report: dict[str, Any], min_kappa: float) -> tuple[bool, str]:
    """Whether the kappa from scores reaches `min_kappa` (an undefined kappa does not), and
    the verdict line to print."""
    kappa = report["scores"]["kappa"]
    passed = kappa is not None and kappa >= min_kappa
    shown = "undefined" if kappa is None else f"{kappa:.3f}"
    verdict = f">= {min_kappa} (pass)" if passed else f"< {min_kappa} (FAIL)"
    return passed, f"check: kappa from scores {shown} {verdict}"


# ---------------------------------------------------------------------------------------------
# External validation: one table across datasets, at the development set's operating point


def load_predictions(report_dir: str | Path) -> Predictions:
    """A report's predictions.csv back as Predictions (the final scores and probabilities:
    after TTA and any blending), or a UsageError saying why not."""
    path = Path(report_dir) / "predictions.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return Predictions(
            ids=np.array([r["id"] for r in rows]),
            patients=np.array([r["patient"] for r in rows]),
            eyes=np.array([r["eye"] for r in rows]),
            grades=np.array([int(r["grade"]) for r in rows], np.int64),
            scores=np.array([float(r["score"]) for r in rows]),
            probs=np.array([[float(r[f"p{k}"]) for k in range(NUM_CLASSES)] for r in rows]),
        )
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None


# The external table's figures: (column, key in a way's figures), each with its 95% CI.
_FIGURES = (("kappa", "kappa"), ("refAUC", "auc"), ("sens", "sensitivity"), ("spec", "specificity"))


def _ci(values: Sequence[float | None]) -> str:
    return f"[{_fmt(values[0])}, {_fmt(values[1])}]"


def external_table(result: dict[str, Any]) -> str:
    """external_validation's result as text: where the operating point and the cut points came
    from, then one line per (dataset, way)."""
    op, cuts = result["operating_point"], result["cutpoints"]
    dev = op["chosen_on"]
    thresholds = ", ".join(  # None: +inf, chosen when no threshold meets the rule otherwise
        f"{way} {'+inf (refers nobody)' if t is None else _fmt(t)}"
        for way, t in op["thresholds"].items()
    )
    lines = [
        "External validation: referable DR (grade >= 2) at one operating point, chosen on the "
        "development set's val split and applied unchanged to every set",
        f"  operating point: {op['rule']}, chosen on {dev['dataset']} "
        f"{dev['split']}@{dev['image_size']} ({dev['report']}); thresholds: {thresholds} "
        "(scores: the score; prob: P(grade >= 2))",
        f"  cut points: {', '.join(f'{c:g}' for c in cuts['values'])}, from the same report "
        f"({cuts['how']}); every report's predictions.csv is re-graded with them",
        "",
    ]
    header = f"{'dataset':<28} {'split':<9} {'images':>6} {'excl.':>5} {'way':<6}"
    header += "".join(f" {label:>6} {'95% CI':>14} " for label, _ in _FIGURES)
    lines += [header.rstrip(), "-" * len(header.rstrip())]
    for row in result["rows"]:
        name = row["dataset"][:26] + (" *" if row.get("development") else "")
        split = f"{row['split']}@{row['image_size']}"
        excluded = "-" if row["n_excluded"] is None else str(row["n_excluded"])
        for way in WAYS:
            m = row[way]
            cells = "".join(f" {_fmt(m[k]):>6} {_ci(m[k + '_ci95']):>14} " for _, k in _FIGURES)
            lines.append(
                f"{name:<28} {split:<9} {row['n_images']:>6} {excluded:>5} {way:<6}{cells}".rstrip()
            )
    lines.append(
        "* the development set: its operating point was chosen on these images, so its "
        "sensitivity and specificity are optimistic"
    )
    return "\n".join(lines)
