"""Test helper: a minimal report.json with the figures the tables read."""

from __future__ import annotations

import json
from pathlib import Path


def fake_report(
    path: Path, model_dir: str, split: str, size: int, ks: float | None, kp: float | None, **extra
) -> Path:
    """REPORT_DIR/report.json with kappas `ks` (scores) and `kp` (prob.); `extra` keys added."""
    way = {
        "kappa_ci95": [None, None], "accuracy": 0.5,
        "referable": {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.7},
    }  # fmt: skip
    report = {
        "split": split, "image_size": size, "checkpoint": {"model_dir": model_dir},
        "scores": {**way, "kappa": ks}, "prob": {**way, "kappa": kp}, **extra,
    }  # fmt: skip
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return path
