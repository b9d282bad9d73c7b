"""data_prep.aptos / messidor2 / idrid / ddr: each set converted from a small tree in its exact
published layout (the real folder, file and column names; generated fundus images), and the
external-validation table over two converted sets with a tiny trained model.

References: the trees' own label files (what each image's grade, split, patient and fate must
be), and, for the table, sklearn's roc_curve / roc_auc_score and numpy on predictions.csv.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score, roc_curve
from synthetic_fundus import write_fundus

from data_prep import aptos, cli, ddr, idrid, messidor2
from m2cnn_tf import calibration, records
from m2cnn_tf.calibration import OperatingRule
from m2cnn_tf.commands import evaluate as evaluate_cmd
from m2cnn_tf.commands import train as train_cmd
from m2cnn_tf.manifest import completeness

SIZE = 80  # the smallest IRv2 takes is 75
FAST = ["--sizes", str(SIZE), "--base-size", str(SIZE), "--workers", "1", "--no-progress"]


def convert(command, flag: str, source: Path, out: Path) -> int:
    return command.run([command.PROG, flag, str(source), "--out", str(out), *FAST])


def converted(tmp_path: Path, tree, command, folder: str) -> tuple[dict, Path]:
    """Build `tree` in tmp_path/folder and convert it with `command` (its -dir flag naming the
    folder) into tmp_path/out: the tree's kept grades, and out."""
    kept = tree(tmp_path / folder)
    flag = next(f for f in command.FLAGS if f.endswith("-dir"))
    assert convert(command, f"--{flag}", tmp_path / folder, tmp_path / "out") == 0
    return kept, tmp_path / "out"


def read_split(out: Path, split: str) -> dict[str, dict[str, str | int]]:
    """id → grade, patient, eye of every record of a split."""
    rows = {}
    for path in records.shard_paths(out, SIZE, split):
        for ser in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = records.parse_example(ser)
            rows[f["image/id"].numpy().decode()] = {
                "grade": int(f["image/grade"]),
                "patient": f["image/patient"].numpy().decode(),
                "eye": f["image/eye"].numpy().decode(),
            }
    return rows


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def fates(m: dict, key: str) -> dict[str, tuple[str, str]]:
    """id → (split, reason) of the manifest's skipped or excluded images."""
    return {s["image_id"]: (s["split"], s["reason"]) for s in m[key]}


# ---------------------------------------------------------------------------------------------
# APTOS 2019: train.csv (id_code, diagnosis) + train_images/<id_code>.png; test.csv unlabelled


def aptos_tree(root: Path) -> dict[str, int]:
    """The Kaggle download: 6 sound images, one with an upper-case extension, one missing,
    one empty (unreadable), one id with two files (.png and .jpg). Returns the kept grades."""
    images = root / "train_images"
    kept = {f"{k:012x}": k % 5 for k in range(6)}
    for k, image_id in enumerate(kept):
        write_fundus(images / f"{image_id}.png", seed=k)
    write_fundus(images / "0000000000ff.PNG", seed=9)
    kept["0000000000ff"] = 3
    (images / "0000000000ee.png").write_bytes(b"")  # unreadable
    write_fundus(images / "0000000000dd.png", seed=10)
    write_fundus(images / "0000000000dd.jpg", seed=11)
    labels = {**kept, "0000000000aa": 1, "0000000000ee": 2, "0000000000dd": 0}  # aa: missing
    rows = "".join(f"{i},{g}\n" for i, g in labels.items())
    (root / "train.csv").write_text("id_code,diagnosis\n" + rows)
    (root / "test.csv").write_text("id_code\n0000000000c1\n0000000000c2\n")
    (root / "sample_submission.csv").write_text("id_code,diagnosis\n0000000000c1,0\n")
    return kept


def test_aptos_converts_train_csv_into_test_and_says_test_csv_is_unlabelled(tmp_path, capsys):
    kept, out = converted(tmp_path, aptos_tree, aptos, "aptos2019-blindness-detection")
    got = read_split(out, "test")
    assert {i: r["grade"] for i, r in got.items()} == kept
    assert all(r["patient"] == i and r["eye"] == "" for i, r in got.items())  # no patient ids
    assert not records.shard_paths(out, SIZE, "train") and not records.shard_paths(out, SIZE, "val")
    m = manifest(out)
    assert fates(m, "skipped") == {
        "0000000000aa": ("test", "missing file"),
        "0000000000ee": ("test", "empty file"),
        "0000000000dd": ("test", "ambiguous file name (0000000000dd.jpg, 0000000000dd.png)"),
    }
    assert m["excluded"] == [] and m["expected"] == {"test": 10}
    assert m["dataset"]["name"] == "APTOS 2019"
    assert m["dataset"]["citation"] and m["dataset"]["licence"]
    shown = capsys.readouterr().out
    assert "wrote 7 images (test 7)" in shown
    assert "test.csv (2 images) has no labels" in shown and "not used" in shown


# ---------------------------------------------------------------------------------------------
# Messidor-2: ADCIS's IMAGES/ + messidor-2.csv (left;right), Kaggle's messidor_data.csv


EXAMS = [  # (left, right): Messidor-Original exams are PNG, Messidor-Extension ones JPG
    ("20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png"),
    ("20051020_44261_0100_PP.png", "20051020_44284_0100_PP.png"),
    ("IM000001.JPG", "IM000002.JPG"),
    ("IM000003.JPG", "IM000004.JPG"),
]


def messidor2_tree(root: Path) -> dict[str, int]:
    """The ADCIS download with Kaggle's grades beside it: messidor_data.csv names the JPGs in
    lower case (as the real file does), one image is ungradable (empty grades), one unreadable.
    Returns the kept grades by id."""
    for k, (left, right) in enumerate(EXAMS):
        write_fundus(root / "IMAGES" / left, seed=2 * k)
        write_fundus(root / "IMAGES" / right, seed=2 * k + 1)
    (root / "IMAGES" / "IM000004.JPG").write_bytes(b"\xff\xd8")  # unreadable: header cut
    pairs = "".join(f"{left};{right}\n" for left, right in EXAMS)
    (root / "messidor-2.csv").write_text("left;right\n" + pairs)
    names = [n for pair in EXAMS for n in pair]
    grades = {n: k % 5 for k, n in enumerate(names)}
    lines = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    for name, grade in grades.items():
        listed = name.replace(".JPG", ".jpg")
        if name == "20051020_44284_0100_PP.png":
            lines.append(f"{listed},,,0")  # ungradable: no grades
        else:
            lines.append(f"{listed},{grade},{grade % 2},1")
    (root / "messidor_data.csv").write_text("\n".join(lines) + "\n")
    kept = {n.rsplit(".", 1)[0]: g for n, g in grades.items()}
    del kept["20051020_44284_0100_PP"], kept["IM000004"]
    return kept


def test_messidor2_excludes_ungradable_images_and_groups_the_two_eyes_of_an_exam(tmp_path, capsys):
    kept, out = converted(tmp_path, messidor2_tree, messidor2, "messidor-2")
    got = read_split(out, "test")
    assert {i: r["grade"] for i, r in got.items()} == kept
    for k, (left, right) in enumerate(EXAMS):
        for name, eye in ((left, "left"), (right, "right")):
            image_id = name.rsplit(".", 1)[0]
            if image_id in got:
                assert (got[image_id]["patient"], got[image_id]["eye"]) == (f"exam{k + 1:03d}", eye)
    assert got["IM000001"]["patient"] == got["IM000002"]["patient"] != got["IM000003"]["patient"]
    m = manifest(out)
    assert fates(m, "excluded") == {
        "20051020_44284_0100_PP": ("test", "ungradable (adjudicated_gradable 0)")
    }
    assert m["excluded_summary"] == {"ungradable (adjudicated_gradable 0)": 1}
    assert fates(m, "skipped") == {"IM000004": ("test", "not an image")}
    assert m["expected"] == {"test": 7}  # the ungradable image is not expected
    assert "Krause" in m["dataset"]["citation"] and set(m["source"]["csv"]) == {
        "messidor_data.csv",
        "messidor-2.csv",
    }
    shown = capsys.readouterr().out
    assert "wrote 6 images (test 6)" in shown
    assert "excluded 1 image(s) by the dataset's protocol: 1 ungradable" in shown


def test_messidor2_takes_the_grades_from_elsewhere_and_without_exams_each_image_alone(
    tmp_path, capsys
):
    kept = messidor2_tree(tmp_path / "m")
    (tmp_path / "m" / "messidor-2.csv").unlink()
    grades = (tmp_path / "m" / "messidor_data.csv").rename(tmp_path / "grades.csv")
    argv = ["--messidor2-dir", str(tmp_path / "m"), "--grades", str(grades)]
    assert messidor2.run([messidor2.PROG, *argv, "--out", str(tmp_path / "out"), *FAST]) == 0
    got = read_split(tmp_path / "out", "test")
    assert {i: r["grade"] for i, r in got.items()} == kept
    assert all(r["patient"] == i and r["eye"] == "" for i, r in got.items())
    assert "no messidor-2.csv (ADCIS's exam list) found" in capsys.readouterr().out


def test_messidor2_without_the_kaggle_grades_is_a_one_line_usage_error(tmp_path, capsys):
    messidor2_tree(tmp_path / "m")
    (tmp_path / "m" / "messidor_data.csv").unlink()
    assert convert(messidor2, "--messidor2-dir", tmp_path / "m", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.messidor2: error: --grades: no file 'messidor_data.csv'")
    assert "google-brain/messidor2-dr-grades" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# IDRiD: "B. Disease Grading" with its own train/test split and both folders from IDRiD_001


IDRID_HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"  # as published


def idrid_tree(root: Path) -> dict[str, dict[str, int]]:
    """IEEE DataPort's download, unpacked as its zip nests it ("B. Disease Grading/B. Disease
    Grading/..."): train IDRiD_001-004, test IDRiD_001-003 (one unreadable), the CSVs with
    their padding columns and rows. Returns the kept grades per split."""
    grading = root / "B. Disease Grading" / "B. Disease Grading"
    kept: dict[str, dict[str, int]] = {}
    for split, n, letter, folder, csv_name in (
        ("train", 4, "a", "a. Training Set", "Training"),
        ("test", 3, "b", "b. Testing Set", "Testing"),
    ):
        lines = [IDRID_HEADER]
        for k in range(1, n + 1):
            write_fundus(grading / "1. Original Images" / folder / f"IDRiD_{k:03d}.jpg", seed=k)
            lines.append(f"IDRiD_{k:03d},{(k + n) % 5},{k % 3},,,,,,,,,")
        lines += [",,,,,,,,,,,"] * 3
        gt = grading / "2. Groundtruths" / f"{letter}. IDRiD_Disease Grading_{csv_name} Labels.csv"
        gt.parent.mkdir(parents=True, exist_ok=True)
        gt.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")  # with a BOM
        kept[split] = {f"{split}/IDRiD_{k:03d}": (k + n) % 5 for k in range(1, n + 1)}
    (grading / "1. Original Images" / "b. Testing Set" / "IDRiD_003.jpg").write_bytes(b"")
    del kept["test"]["test/IDRiD_003"]
    return kept


def test_idrid_keeps_its_train_test_split_and_tells_apart_the_same_names(tmp_path, capsys):
    kept, out = converted(tmp_path, idrid_tree, idrid, "IDRiD")
    for split in ("train", "test"):
        got = read_split(out, split)
        assert {i: r["grade"] for i, r in got.items()} == kept[split]
        assert all(r["patient"] == i for i, r in got.items())  # each image its own patient
    assert not records.shard_paths(out, SIZE, "val")
    m = manifest(out)
    assert fates(m, "skipped") == {"test/IDRiD_003": ("test", "empty file")}
    assert m["excluded"] == [] and m["expected"] == {"train": 4, "test": 3}
    assert m["dataset"]["name"] == "IDRiD disease grading"
    assert "wrote 6 images (train 4, test 2)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# DDR: DR_grading/{train,valid,test}/ + train.txt, valid.txt, test.txt; grade 5 ungradable


def ddr_tree(root: Path, per_split: int = 6) -> dict[str, dict[str, int]]:
    """DDR-dataset/DR_grading with `per_split` gradable images a split (grades cycling 0-4),
    plus one grade-5 image in train and in test, a missing file in train and an unreadable one
    in valid. Returns the kept grades per split (ours: valid → val)."""
    grading = root / "DDR-dataset" / "DR_grading"
    kept: dict[str, dict[str, int]] = {}
    for n, (theirs, ours) in enumerate((("train", "train"), ("valid", "val"), ("test", "test"))):
        lines, kept[ours] = [], {}
        for k in range(per_split):
            name = f"00{n + 1}-{k:04d}-000"
            write_fundus(grading / theirs / f"{name}.jpg", seed=100 * n + k)
            lines.append(f"{name}.jpg {k % 5}")
            kept[ours][name] = k % 5
        if theirs != "valid":
            write_fundus(grading / theirs / f"00{n + 1}-0099-000.jpg", seed=99)
            lines.append(f"00{n + 1}-0099-000.jpg 5")  # ungradable
        (grading / f"{theirs}.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8-sig")
    with open(grading / "train.txt", "a") as f:
        f.write("001-0098-000.jpg 2\n")  # no such file
    (grading / "valid" / "002-0097-000.jpg").write_text("not a JPEG\n")
    with open(grading / "valid.txt", "a") as f:
        f.write("002-0097-000.jpg 1\n")
    return kept


def test_ddr_keeps_its_three_splits_and_excludes_grade_5(tmp_path, capsys):
    kept, out = converted(tmp_path, ddr_tree, ddr, "ddr")  # DR_grading is found below it
    for split in ("train", "val", "test"):
        got = read_split(out, split)
        assert {i: r["grade"] for i, r in got.items()} == kept[split], split
        assert all(r["patient"] == i for i, r in got.items())
    m = manifest(out)
    assert fates(m, "excluded") == {
        "001-0099-000": ("train", "ungradable (grade 5)"),
        "003-0099-000": ("test", "ungradable (grade 5)"),
    }
    assert fates(m, "skipped") == {
        "001-0098-000": ("train", "missing file"),
        "002-0097-000": ("val", "not an image"),
    }
    assert m["expected"] == {"train": 7, "val": 7, "test": 6}
    # What an evaluation of the test split records (report.json's n_excluded and dataset).
    found = completeness(out, "test", read_split(out, "test"))
    assert (found.n_expected, found.excluded, found.dataset) == (6, 1, "DDR DR grading")
    shown = capsys.readouterr().out
    assert "wrote 18 images (train 6, val 6, test 6)" in shown
    assert "excluded 2 image(s) by the dataset's protocol: 2 ungradable (grade 5)" in shown


# ---------------------------------------------------------------------------------------------
# The commands: m2cnn-prep, --help, usage errors


def test_m2cnn_prep_runs_the_published_set_commands(tmp_path, capsys):
    ddr_tree(tmp_path / "d", per_split=2)
    out = tmp_path / "out"
    argv = ["m2cnn-prep", "ddr", "--ddr-dir", str(tmp_path / "d"), "--out", str(out), *FAST]
    assert cli.run(argv) == 0
    assert "m2cnn-prep ddr: wrote 6 images" in capsys.readouterr().out
    m = manifest(out)
    assert m["tool"] == "data_prep.ddr" and m["command"][:2] == ["m2cnn-prep", "ddr"]


@pytest.mark.parametrize("command", [aptos, messidor2, idrid, ddr])
def test_a_missing_or_wrong_folder_is_a_one_line_usage_error(command, tmp_path, capsys):
    flag = next(f for f in command.FLAGS if f.endswith("-dir"))
    assert convert(command, f"--{flag}", tmp_path / "absent", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "empty").mkdir()
    assert convert(command, f"--{flag}", tmp_path / "empty", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{command.PROG}: error: ") and "\n" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# One table across datasets, at the development set's operating point


def _predictions(report_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(report_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["grade"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def _evaluate(model: Path, data: Path, split: str, out: Path) -> None:
    argv = ["evaluate.py", "--model-dir", str(model), "--stage", "1", "--data", str(data)]
    assert evaluate_cmd.run([*argv, "--split", split, "--out", str(out), "--bootstrap", "20"]) == 0


@pytest.mark.slow
def test_the_operating_point_comes_from_the_development_val_split_and_is_applied_unchanged(
    tmp_path, capsys
):
    # Two converted sets: DDR develops (a tiny model trains on its train split, the operating
    # point is chosen on its val split), IDRiD's test split validates externally.
    ddr_tree(tmp_path / "ddr", per_split=10)
    idrid_tree(tmp_path / "idrid")
    assert convert(ddr, "--ddr-dir", tmp_path / "ddr", tmp_path / "ddr_out") == 0
    assert convert(idrid, "--idrid-dir", tmp_path / "idrid", tmp_path / "idrid_out") == 0
    train = ["train.py", "--stage", "1", "--data", str(tmp_path / "ddr_out")]
    train += ["--model-dir", str(tmp_path / "model"), "--image-size", str(SIZE)]
    train += ["--preset", "nano", "--weights", "none", "--batch-size", "4", "--epochs", "1"]
    assert train_cmd.run([*train, "--seed", "0"]) == 0, capsys.readouterr().err[-2000:]
    dev, ext = tmp_path / "dev_val", tmp_path / "idrid_test"
    _evaluate(tmp_path / "model", tmp_path / "ddr_out", "val", dev)
    _evaluate(tmp_path / "model", tmp_path / "idrid_out", "test", ext)
    capsys.readouterr()

    argv = ["evaluate.py", "--compare", str(dev), str(ext), "--operating-point", "youden"]
    assert evaluate_cmd.run([*argv, "--development", str(dev), "--bootstrap", "50"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("Train ")  # the Table II comparison comes first, unchanged
    assert (
        "operating point: Youden point" in shown and f"chosen on DDR DR grading val@{SIZE}" in shown
    )
    assert any(x.startswith("IDRiD disease grading") for x in shown.splitlines())
    # The threshold is Youden's point on the development val scores (sklearn's ROC) ...
    result = calibration.external_validation(dev, [ext], OperatingRule("youden"), n_boot=50)
    grades, scores = _predictions(dev)
    fpr, tpr, thr = roc_curve(grades >= 2, scores, drop_intermediate=False)
    youden = thr[np.argmax(np.round(tpr - fpr, 12))]
    assert result["operating_point"]["thresholds"]["scores"] == pytest.approx(youden)
    assert f"thresholds: scores {youden:.3f}" in shown
    # ... and IDRiD's sensitivity and specificity are those of that very threshold.
    dev_row, ext_row = result["rows"]
    assert dev_row["development"] and dev_row["dataset"] == "DDR DR grading"
    assert (ext_row["dataset"], ext_row["split"], ext_row["n_images"]) == (
        "IDRiD disease grading", "test", 2,
    )  # fmt: skip
    assert ext_row["n_excluded"] == 0 and dev_row["n_excluded"] == 0  # valid has no grade 5
    g, s = _predictions(ext)
    assert ext_row["scores"]["sensitivity"] == (s[g >= 2] >= youden).mean()
    assert ext_row["scores"]["specificity"] == (s[g < 2] < youden).mean()
    assert ext_row["scores"]["auc"] == pytest.approx(roc_auc_score(g >= 2, s))
