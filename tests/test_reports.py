"""m2cnn_tf.reports: the Table II layout across runs, reading report.json back, the kappa gate,
and the external-validation table across datasets.

References: the numbers written into hand-made reports, hand calculations, sklearn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _reports import fake_report

from m2cnn_tf import calibration, reports
from m2cnn_tf.calibration import OperatingRule
from m2cnn_tf.errors import UsageError


def test_compare_prints_runs_side_by_side_like_table_ii(tmp_path):
    fake_report(tmp_path / "a", "/runs/mse", "val", 224, 0.720, 0.5)
    fake_report(tmp_path / "b", "/runs/multitask", "val", 224, 0.742, 0.718)
    fake_report(tmp_path / "c", "/runs/multitask", "val", 448, 0.812, 0.782)
    table = reports.compare_reports([tmp_path / d for d in "abc"])
    lines = table.splitlines()
    assert "mse" in lines[0] and "multitask" in lines[0]
    assert lines[2].replace("|", " ").split() == ["Test", "scores", "prob.", "scores", "prob."]
    row224 = next(line for line in lines if line.startswith("val 224×224"))
    row448 = next(line for line in lines if line.startswith("val 448×448"))
    assert row224.replace("|", " ").split()[-4:] == ["0.720", "0.500", "0.742", "0.718"]
    assert row448.replace("|", " ").split()[-4:] == ["-", "-", "0.812", "0.782"]
    assert all(len(line) == len(lines[0]) for line in lines[:5])  # the columns line up


def test_compare_labels_runs_by_their_table_ii_column_from_best_json(tmp_path):
    metas = {
        "a": {"loss": "mse", "multi_cell": False},
        "b": {"loss": "ce", "multi_cell": True},
        "c": {"flags": {"loss": "multitask", "multi_cell": False}},
        "d": {"loss": "multitask", "multi_cell": True},
        "e": {},  # a checkpoint from before the switches: the folder name alone
    }
    for name, meta in metas.items():
        fake_report(tmp_path / name, f"/runs/{name}", "val", 448, 0.8, 0.7)
        path = tmp_path / name / "report.json"
        report = json.loads(path.read_text())
        report["checkpoint"]["meta"] = meta
        path.write_text(json.dumps(report))
    header = reports.compare_reports([tmp_path / d for d in metas]).splitlines()[0]
    assert [c.strip() for c in header.split("|")[1:]] == [
        "MSE: a",
        "CE+MC: b",
        "Multi-Task: c",
        "M²CNN: d",
        "e",
    ]


def test_two_reports_of_one_run_in_the_same_cell_are_labelled_by_their_folders(tmp_path):
    fake_report(tmp_path / "plain", "/runs/m2cnn", "test", 720, 0.8, 0.7)
    fake_report(tmp_path / "tta", "/runs/m2cnn", "test", 720, 0.81, 0.72)
    header = reports.compare_reports([tmp_path / "plain", tmp_path / "tta"]).splitlines()[0]
    assert [c.strip() for c in header.split("|")[1:]] == ["plain", "tta"]


def test_a_missing_or_foreign_report_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"no report\.json"):
        reports.load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        reports.load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"scores": {"kappa": 0.5}}))
    with pytest.raises(UsageError, match="not an evaluation report"):
        reports.load_report(tmp_path)


@pytest.mark.parametrize(
    ("kappa", "bar", "passed"),
    [(0.7, 0.7, True), (0.7, 0.7000000000000001, False), (0.71, 0.7, True), (None, -1.0, False)],
)
def test_kappa_gate_passes_from_the_bar_up(kappa, bar, passed):
    ok, line = reports.kappa_gate({"scores": {"kappa": kappa}}, bar)
    assert ok is passed
    assert line.endswith("(pass)" if passed else "(FAIL)")


# ---------------------------------------------------------------------------------------------
# External validation: one table across datasets at the development set's operating point


def _with_predictions(path, grades, scores, *, dataset, cutpoints, excluded=0, probs=None):
    """A fake report (see _reports.fake_report) with its predictions.csv: p0-p4 put all the
    mass on grade 0 or 4 (`probs`: True refers), so P(grade >= 2) is 0 or 1."""
    report = json.loads((path / "report.json").read_text())
    report |= {"dataset": dataset, "cutpoints": cutpoints, "n_excluded": excluded}
    (path / "report.json").write_text(json.dumps(report))
    probs = [s >= 2 for s in scores] if probs is None else probs
    lines = [",".join(reports.CSV_COLUMNS)]
    for i, (g, s, p) in enumerate(zip(grades, scores, probs, strict=True)):
        mass = "0,0,0,0,1" if p else "1,0,0,0,0"
        lines.append(f"{i}_left,{i},left,{g},{s},{mass},0,0")
    (path / "predictions.csv").write_text("\n".join(lines) + "\n")


# The development val split of test_calibration's hand calculation: spec >= 0.9 picks 2.6.
DEV = ([0, 0, 0, 0, 0, 2, 2, 3, 4, 1], [0.1, 0.4, 0.9, 1.2, 2.1, 1.8, 2.6, 3.1, 3.9, 1.5])
# An external test split: at 2.6 it refers 2.7, 2.65 and 3.0, so of the referable (grades 2, 3,
# 4: scores 2.7, 2.2, 3.0) 2 of 3, and of the others (2.5, 0.3, 2.65) 2 of 3 are right.
EXT = ([0, 0, 2, 3, 1, 4], [2.5, 0.3, 2.7, 2.2, 2.65, 3.0])


def test_external_validation_applies_the_development_operating_point_unchanged(tmp_path):
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    dev = fake_report(tmp_path / "dev", "/runs/m", "val", 224, 0.8, 0.7)
    _with_predictions(dev, *DEV, dataset="EyePACS", cutpoints=[0.5, 1.5, 2.5, 3.5])
    ext = fake_report(tmp_path / "ext", "/runs/m", "test", 224, 0.5, 0.4)
    _with_predictions(ext, *EXT, dataset="Messidor-2", cutpoints=[1, 2, 3, 3.9], excluded=4)
    rule = OperatingRule("specificity", 0.9)
    result = calibration.external_validation(dev, [ext, dev], rule, n_boot=100)
    assert result["operating_point"]["thresholds"]["scores"] == 2.6
    assert result["operating_point"]["chosen_on"]["dataset"] == "EyePACS"
    assert result["cutpoints"] == {
        "values": [0.5, 1.5, 2.5, 3.5], "from": str(dev), "how": "rounding",
    }  # fmt: skip
    dev_row, ext_row = result["rows"]  # the development report once, first
    assert dev_row["development"] and "development" not in ext_row
    assert (ext_row["dataset"], ext_row["n_images"], ext_row["n_excluded"]) == ("Messidor-2", 6, 4)
    m = ext_row["scores"]
    assert (m["threshold"], m["sensitivity"], m["specificity"]) == (2.6, 2 / 3, 2 / 3)
    assert m["auc"] == pytest.approx(roc_auc_score(np.array(EXT[0]) >= 2, EXT[1]))
    # The scores are re-graded with the development cut points, not the report's own.
    rounded = np.digitize(EXT[1], [0.5, 1.5, 2.5, 3.5])
    kappa = cohen_kappa_score(EXT[0], rounded, weights="quadratic", labels=list(range(5)))
    assert m["kappa"] == pytest.approx(kappa)
    table = reports.external_table(result)
    assert "specificity >= 0.90 (max sensitivity), chosen on EyePACS val@224" in table
    assert "thresholds: scores 2.600" in table and "cut points: 0.5, 1.5, 2.5, 3.5" in table
    row = next(line for line in table.splitlines() if line.startswith("Messidor-2 "))
    assert row.split()[:5] == ["Messidor-2", "test@224", "6", "4", "scores"]
    assert next(line for line in table.splitlines() if line.startswith("EyePACS *"))


def test_the_operating_point_is_only_chosen_on_a_val_report(tmp_path):
    ext = fake_report(tmp_path / "ext", "/runs/m", "test", 224, 0.5, 0.4)
    _with_predictions(ext, *EXT, dataset="Messidor-2", cutpoints=[0.5, 1.5, 2.5, 3.5])
    with pytest.raises(UsageError, match="is a test report") as e:
        calibration.external_validation(ext, [ext], OperatingRule("youden"))
    assert e.value.setting == "development"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--operating-point", "youden"], "--operating-point and --development go together"),
        (["--operating-point", "spec=2", "--development", "d"], "--operating-point: must be"),
    ],
)
def test_evaluate_refuses_an_incomplete_operating_point_in_one_line(
    tmp_path, capsys, extra, message
):
    from m2cnn_tf.commands import evaluate

    dev = fake_report(tmp_path / "dev", "/runs/m", "val", 224, 0.8, 0.7)
    assert evaluate.run(["evaluate.py", "--compare", str(dev), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: ") and message in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# The figures: what they draw, read back from the figure before it is saved


def _drawn(monkeypatch, plot, report, tmp_path):
    """`plot`'s figure (its artists, kept open) and the PNG it wrote."""
    figures = []
    save = reports._figure_bytes

    def keep(fig):
        figures.append(fig)
        return save(fig)

    monkeypatch.setattr(reports, "_figure_bytes", keep)
    plot(tmp_path / "f.png", report)
    import cv2

    return figures[0], cv2.imread(str(tmp_path / "f.png"))


def _plotted_report() -> dict:
    cm = {"scores": [[5, 1, 0, 0, 0], [2, 3, 0, 0, 0], [0, 1, 4, 1, 0], [0, 0, 0, 2, 0],
                     [0, 0, 0, 1, 3]],
          "prob": [[6, 0, 0, 0, 0], [0, 5, 0, 0, 0], [0, 0, 0, 6, 0], [0, 0, 0, 2, 0],
                   [0, 0, 0, 0, 0]]}  # fmt: skip
    roc = {"scores": ([0, 0.1, 0.5, 1], [0, 0.6, 0.9, 1]), "prob": ([0, 0.3, 1], [0, 0.8, 1])}
    return {
        way: {
            "confusion_matrix": cm[way],
            "kappa": {"scores": 0.8125, "prob": None}[way],
            "referable": {
                "auc": {"scores": 0.875, "prob": 0.75}[way],
                "roc": {"fpr": roc[way][0], "tpr": roc[way][1]},
                "sensitivity": 0.9,
                "specificity": 0.75 if way == "scores" else None,
            },
        }
        for way in ("scores", "prob")
    }


def test_the_confusion_figure_shows_each_ways_counts_row_rates_and_kappa(monkeypatch, tmp_path):
    report = _plotted_report()
    fig, png = _drawn(monkeypatch, reports.plot_confusion, report, tmp_path)
    assert png.shape == (484, 1100, 3)  # 10 × 4.4 inches at 110 dpi
    for ax, way in zip(fig.axes, ("scores", "prob"), strict=True):
        cm = np.array(report[way]["confusion_matrix"], float)
        # Row-normalised by hand; an empty row (no image of that grade) stays 0.
        totals = cm.sum(axis=1, keepdims=True)
        rates = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
        np.testing.assert_allclose(ax.images[0].get_array(), rates)
        counts = {(t.get_position()[1], t.get_position()[0]): t.get_text() for t in ax.texts}
        assert counts == {(i, j): str(int(cm[i, j])) for i in range(5) for j in range(5)}
        assert ax.get_xlabel() == "predicted grade" and ax.get_ylabel() == "true grade"
    assert [ax.get_title() for ax in fig.axes] == ["scores: kappa 0.812", "prob"]


def test_the_roc_figure_draws_each_ways_curve_operating_point_and_auc(monkeypatch, tmp_path):
    report = _plotted_report()
    fig, png = _drawn(monkeypatch, reports.plot_roc, report, tmp_path)
    assert png.shape == (550, 572, 3)  # 5.2 × 5 inches at 110 dpi
    (ax,) = fig.axes
    lines = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
    assert lines == [
        ([0, 0.1, 0.5, 1], [0, 0.6, 0.9, 1]),  # scores' ROC
        ([0.25], [0.9]),  # its operating point: (1 - specificity, sensitivity)
        ([0, 0.3, 1], [0, 0.8, 1]),  # prob's ROC (no operating point: no specificity)
        ([0, 1], [0, 1]),  # chance
    ]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["scores (AUC 0.875)", "prob (AUC 0.750)"]
