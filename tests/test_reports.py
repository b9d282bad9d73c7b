"""m2cnn_tf.reports: the Table II layout across runs, reading report.json back, the kappa gate.

References: the numbers written into hand-made reports.
"""

from __future__ import annotations

import json

import pytest
from _reports import fake_report

from m2cnn_tf import reports
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
