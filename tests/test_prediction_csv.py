"""predict.py's CSV against formula injection (OWASP's rule): a text cell a spreadsheet would run
as a formula gets a leading "'"; numbers, negative ones included, are written as numbers.

The reference is the rule written out by hand, cell by cell, read back with the csv module.
"""

from __future__ import annotations

import csv
import io

from m2cnn_tf.prediction import CSV_COLUMNS, write_rows


def _row(path: str, error: str = "", score: float = -0.1234564) -> dict:
    values = {"grade": 0, "grade_prob": 1, "score": score}
    values |= {f"p{k}": 0.2 for k in range(5)}
    return {**values, "path": path, "error": error}


def test_text_cells_that_would_run_as_formulas_are_neutralised_and_numbers_are_not():
    names = ["=cmd|' /C calc'!A0.jpg", "+1.jpg", "-2.jpg", "@SUM(A1).jpg", "\ttab.jpg", "\rcr.jpg"]
    rows = [_row(name) for name in names]
    rows += [_row("plain.jpg"), _row("a=b.jpg"), _row("x.jpg", error="-unreadable", score=1.5)]
    out = io.StringIO()
    assert write_rows(rows, out) == (len(rows), 1)
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(table[0]) == list(CSV_COLUMNS)
    paths = [r["path"] for r in table]
    assert paths == [
        "'=cmd|' /C calc'!A0.jpg", "'+1.jpg", "'-2.jpg", "'@SUM(A1).jpg", "'\ttab.jpg",
        "'\rcr.jpg", "plain.jpg", "a=b.jpg", "x.jpg",
    ]  # fmt: skip
    assert [r["score"] for r in table[:-1]] == ["-0.123456"] * (len(rows) - 1)
    assert table[-1]["error"] == "'-unreadable" and table[-1]["score"] == "1.500000"
