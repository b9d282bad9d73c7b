"""data_prep.kaggle / data_prep.folder (and what every conversion command shares): splits, bad
inputs, strictness, usage errors, resume. The published sets' own layouts: test_external_sets.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import tensorflow as tf
from _subprocess import group_members, started
from synthetic_fundus import fundus, kaggle_dir, write_fundus

from data_prep import aptos, cli, ddr, folder, idrid, kaggle, messidor2, options
from data_prep import convert as engine
from data_prep.worker import Settings
from m2cnn_tf import errors, records
from m2cnn_tf import manifest as manifest_reader
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_bgr_file

REPO = Path(__file__).resolve().parents[1]
FAST = ["--sizes", "32,64", "--base-size", "64", "--workers", "1", "--no-progress"]


def run(command, argv: list[str]) -> int:
    """A data_prep command as its command line runs it: absl flags, exit code."""
    return command.run([command.PROG, *argv])


def read_split(out: Path, size: int, split: str) -> list[dict]:
    rows = []
    for path in records.shard_paths(out, size, split):
        for ser in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = {k: v.numpy() for k, v in records.parse_example(ser).items()}
            f["raw"] = ser
            rows.append(f)
    return rows


def ids(rows: list[dict]) -> set[str]:
    return {r["image/id"].decode() for r in rows}


def csv_rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def kaggle_src(tmp_path_factory) -> Path:
    return kaggle_dir(tmp_path_factory.mktemp("kaggle"), patients=10, test_patients=4)


@pytest.fixture(scope="module")
def kaggle_out(kaggle_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "records"
    assert run(kaggle, ["--kaggle-dir", str(kaggle_src), "--out", str(out), *FAST]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Splits


def test_kaggle_splits_follow_the_two_csvs(kaggle_src, kaggle_out):
    train = {r[0]: int(r[1]) for r in csv_rows(kaggle_src / "trainLabels.csv")}
    solution = csv_rows(kaggle_src / "retinopathy_solution.csv")
    public = {r[0]: int(r[1]) for r in solution if r[2] == "Public"}
    private = {r[0]: int(r[1]) for r in solution if r[2] == "Private"}
    for size in (32, 64):
        for split, expected in (("train", train), ("val", public), ("test", private)):
            rows = read_split(kaggle_out, size, split)
            got = {r["image/id"].decode(): int(r["image/grade"]) for r in rows}
            assert got == expected, (size, split)
            assert all(r["image/height"] == r["image/width"] == size for r in rows)
            decoded = tf.io.decode_jpeg(rows[0]["image/encoded"]).numpy()
            assert decoded.shape == (size, size, 3)
    first = read_split(kaggle_out, 64, "train")[0]
    patient, eye = first["image/id"].decode().split("_")
    assert first["image/patient"].decode() == patient and first["image/eye"].decode() == eye


def test_manifest_records_counts_shards_params_and_versions(kaggle_src, kaggle_out):
    m = json.loads((kaggle_out / "manifest.json").read_text())
    train = csv_rows(kaggle_src / "trainLabels.csv")
    grades = [int(r[1]) for r in train]
    assert m["counts"]["train"]["records"] == len(train)
    assert m["counts"]["train"]["grades"] == {str(g): grades.count(g) for g in range(5)}
    assert m["params"]["preprocess"]["alpha"] == 4.0 and m["params"]["sizes"] == [32, 64]
    assert m["params"]["jpeg_quality"] == 95
    assert m["source"]["kind"] == "kaggle" and set(m["source"]["csv"]) == {
        "trainLabels.csv",
        "retinopathy_solution.csv",
    }
    assert {"tensorflow", "opencv", "numpy", "python"} <= set(m["versions"])
    assert m["timings"]["this_run_images"] == 28 and m["skipped"] == []
    for size in ("32", "64"):
        listed = {s["path"] for s in m["shards"][size]}
        on_disk = {p.relative_to(kaggle_out).as_posix() for p in (kaggle_out / size).iterdir()}
        assert listed == on_disk
        for shard in m["shards"][size]:
            path = kaggle_out / shard["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == shard["records"]
    assert not (kaggle_out / ".state").exists()


def test_val_from_train_keeps_both_eyes_of_a_patient_in_one_split(kaggle_src, tmp_path):
    def carve(seed: int, out: Path) -> tuple[set[str], set[str]]:
        argv = ["--kaggle-dir", str(kaggle_src), "--out", str(out), "--val-from-train", "0.3"]
        assert run(kaggle, [*argv, "--seed", str(seed), *FAST, "--sizes", "32"]) == 0
        return ids(read_split(out, 32, "train")), ids(read_split(out, 32, "val"))

    train, val = carve(0, tmp_path / "a")
    train_patients = {i.split("_")[0] for i in train}
    val_patients = {i.split("_")[0] for i in val}
    assert not train_patients & val_patients
    assert len(val_patients) == 3  # round(0.3 × 10 patients)
    assert all(f"{p}_left" in val and f"{p}_right" in val for p in val_patients)
    assert train | val == {r[0] for r in csv_rows(kaggle_src / "trainLabels.csv")}
    # test stays Usage=Private; the Public rows are left out, not mixed in
    private = {r[0] for r in csv_rows(kaggle_src / "retinopathy_solution.csv") if r[2] == "Private"}
    assert ids(read_split(tmp_path / "a", 32, "test")) == private
    # deterministic under --seed, and the seed matters
    assert carve(0, tmp_path / "b") == (train, val)
    others = [carve(s, tmp_path / f"s{s}")[1] for s in (1, 2)]
    assert any(o != val for o in others)


def test_without_solution_file_only_train_is_converted(tmp_path):
    src = kaggle_dir(tmp_path / "k", patients=3, solution=False)
    out = tmp_path / "out"
    assert run(kaggle, ["--kaggle-dir", str(src), "--out", str(out), *FAST]) == 0
    assert len(read_split(out, 64, "train")) == 6
    assert records.shard_paths(out, 64, "val") == [] == records.shard_paths(out, 64, "test")


def test_folder_split_column_and_patient_level_ratio(tmp_path):
    images = tmp_path / "imgs"
    lines = ["id_code,diagnosis,subset,pid"]
    for i in range(12):
        write_fundus(images / "nested" / f"img{i}.png", seed=i)
        lines.append(f"img{i},{i % 5},{['train', 'Validation', 'test'][i % 3]},p{i // 2}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    common = ["--images", str(images), "--labels", str(labels), "--id-column", "id_code"]
    common += ["--grade-column", "diagnosis", *FAST, "--sizes", "32"]
    out = tmp_path / "by_column"
    assert run(folder, [*common, "--out", str(out), "--split-column", "subset"]) == 0
    for k, split in enumerate(("train", "val", "test")):
        rows = read_split(out, 32, split)
        assert ids(rows) == {f"img{i}" for i in range(12) if i % 3 == k}
        assert all(int(r["image/grade"]) == int(r["image/id"][3:]) % 5 for r in rows)

    out = tmp_path / "by_ratio"
    argv = [*common, "--out", str(out), "--split-ratio", "0.5,0.5", "--patient-column", "pid"]
    assert run(folder, argv) == 0
    train, val = read_split(out, 32, "train"), read_split(out, 32, "val")
    assert len(train) == len(val) == 6
    assert not {r["image/patient"] for r in train} & {r["image/patient"] for r in val}


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A Kaggle layout with one of every bad input the issue lists, plus good images."""
    root = tmp_path_factory.mktemp("bad")
    train = root / "train"
    rows = []
    for i in range(1, 4):
        write_fundus(train / f"{i}_left.jpeg", seed=i)
        rows.append(f"{i}_left,{i}")
    expected = {
        "20_left": "missing file",
        "21_left": "empty file",
        "22_left": "not an image",
        "23_left": "truncated JPEG",
        "24_left": "no fundus visible (all dark)",
        "25_left": "no fundus visible (blown out)",
        "26_left": "grade '7' is outside 0–4",
        "27_left": "grade 'x' is not an integer",
        "28_left": "grade '2.5' is not an integer",
        "29_left": "duplicate id with conflicting grades (2 rows)",
        "30_left": "duplicate id (first row kept)",
    }
    (train / "21_left.jpeg").write_bytes(b"")
    (train / "22_left.jpeg").write_text("this is not a JPEG\n")
    write_fundus(train / "23_left.jpeg", seed=23)
    data = (train / "23_left.jpeg").read_bytes()
    (train / "23_left.jpeg").write_bytes(data[: len(data) // 2])
    cv2.imwrite(str(train / "24_left.jpeg"), np.zeros((96, 128, 3), np.uint8))
    cv2.imwrite(str(train / "25_left.jpeg"), np.full((96, 128, 3), 255, np.uint8))
    for i in (26, 27, 28, 29, 30):
        write_fundus(train / f"{i}_left.jpeg", seed=i)
    rows += ["20_left,1", "21_left,1", "22_left,1", "23_left,1", "24_left,1", "25_left,1"]
    rows += ["26_left,7", "27_left,x", "28_left,2.5", "29_left,1", "29_left,2"]
    rows += ["30_left,3", "30_left,3"]
    (root / "trainLabels.csv").write_text("image,level\n" + "\n".join(rows) + "\n")
    return root, expected


def test_every_bad_input_is_skipped_with_its_reason(bad_src, tmp_path, capsys):
    src, expected = bad_src
    out = tmp_path / "out"
    assert run(kaggle, ["--kaggle-dir", str(src), "--out", str(out), *FAST]) == 0
    m = json.loads((out / "manifest.json").read_text())
    reasons: dict[str, list[str]] = {}
    for s in m["skipped"]:
        reasons.setdefault(s["image_id"], []).append(s["reason"])
    assert set(reasons) == set(expected)
    for image_id, reason in expected.items():
        assert reason in reasons[image_id], image_id
    assert len(reasons["29_left"]) == 2  # conflicting grades: neither copy is trusted
    assert len(reasons["30_left"]) == 1  # same grade: the first copy is kept
    assert ids(read_split(out, 64, "train")) == {"1_left", "2_left", "3_left", "30_left"}
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("data_prep.kaggle: skipped 12 input(s):")
    assert "1 truncated JPEG" in summary and "manifest.json" in summary


def test_strict_exits_nonzero_and_writes_nothing(bad_src, tmp_path, capsys):
    src, _ = bad_src
    out = tmp_path / "out"
    assert run(kaggle, ["--kaggle-dir", str(src), "--out", str(out), *FAST, "--strict"]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "--strict: 12 bad input(s); nothing written" in err  # all of them, in one go
    assert "20_left: missing file" in err and "23_left: truncated JPEG" in err


def test_strict_checks_every_image_before_writing(tmp_path, capsys):
    # CSV-level checks pass; only decoding finds the truncated JPEG, which is the last item.
    src = kaggle_dir(tmp_path / "k", patients=3, solution=False)
    data = (src / "train" / "3_right.jpeg").read_bytes()
    (src / "train" / "3_right.jpeg").write_bytes(data[:-200])
    out = tmp_path / "out"
    argv = ["--kaggle-dir", str(src), "--out", str(out), *FAST, "--strict"]
    assert run(kaggle, argv) == 1
    assert not out.exists()
    assert "3_right: truncated JPEG" in capsys.readouterr().err
    assert run(kaggle, [a for a in argv if a != "--strict"]) == 0
    assert len(read_split(out, 64, "train")) == 5


def test_val_and_test_keep_every_image_that_decodes_and_flag_the_imperfect(tmp_path, capsys):
    # Public rows (patients 1001, 1003) are val, Private (1002, 1004) test; see kaggle_dir.
    src = kaggle_dir(tmp_path / "k", patients=3, test_patients=4)
    for path in (src / "train" / "1_left.jpeg", src / "test" / "1001_left.jpeg"):
        data = path.read_bytes()  # truncated: skipped from train, kept in val
        path.write_bytes(data[: len(data) // 2])
    cv2.imwrite(str(src / "test" / "1002_left.jpeg"), np.zeros((96, 128, 3), np.uint8))
    (src / "test" / "1002_right.jpeg").write_bytes(b"")  # no pixels at all: skipped
    (src / "test" / "1003_right.jpeg").unlink()  # missing: skipped by the listing
    out = tmp_path / "out"
    assert run(kaggle, ["--kaggle-dir", str(src), "--out", str(out), *FAST]) == 0
    m = json.loads((out / "manifest.json").read_text())
    flagged = {f["image_id"]: (f["split"], f["reason"]) for f in m["flagged"]}
    assert flagged == {
        "1001_left": ("val", "truncated JPEG"),
        "1002_left": ("test", "no fundus visible (all dark)"),
    }
    skipped = {s["image_id"]: (s["split"], s["reason"]) for s in m["skipped"]}
    assert skipped == {
        "1_left": ("train", "truncated JPEG"),
        "1002_right": ("test", "empty file"),
        "1003_right": ("val", "missing file"),
    }
    assert ids(read_split(out, 64, "val")) == {"1001_left", "1001_right", "1003_left"}
    assert ids(read_split(out, 64, "test")) == {"1002_left", "1004_left", "1004_right"}
    assert "1_left" not in ids(read_split(out, 64, "train"))
    assert m["expected"] == {"train": 6, "val": 4, "test": 4}  # the CSV rows of each split
    assert m["flagged_summary"] == {"truncated JPEG": 1, "no fundus visible (all dark)": 1}
    log = capsys.readouterr().out
    assert "kept 2 imperfect val/test image(s): 1 truncated JPEG, 1 no fundus" in log
    # What an evaluation of the split reads back (m2cnn_tf.manifest).
    graded = ids(read_split(out, 64, "val"))
    val = manifest_reader.completeness(out, "val", graded)
    assert (val.n_expected, val.missing) == (4, ["1003_right"])
    assert val.flagged == [{"id": "1001_left", "reason": "truncated JPEG"}]


def test_the_manifest_counts_are_what_training_reads_instead_of_the_records(kaggle_out):
    for size in (32, 64):
        for split in ("train", "val", "test"):
            files = records.shard_paths(kaggle_out, size, split)
            known = manifest_reader.split_counts(kaggle_out, size, split, files)
            rows = read_split(kaggle_out, size, split)
            assert known is not None and known.records == len(rows)
            grades = [int(r["image/grade"]) for r in rows]
            assert known.grades == [grades.count(g) for g in range(5)]


def test_greyscale_rgba_and_16_bit_inputs_are_converted_not_skipped(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    bgr = fundus(seed=4)
    cv2.imwrite(str(images / "grey.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(images / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(images / "deep.png"), bgr.astype(np.uint16) * 257)
    (tmp_path / "l.csv").write_text("image,level\ngrey.png,0\nrgba.png,1\ndeep.png,2\n")
    out = tmp_path / "out"
    argv = ["--images", str(images), "--labels", str(tmp_path / "l.csv"), "--out", str(out)]
    assert run(folder, [*argv, *FAST, "--split-ratio", "1,0"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == []
    assert ids(read_split(out, 64, "train")) == {"grey", "rgba", "deep"}


# ---------------------------------------------------------------------------------------------
# Usage errors (exit 2, one line)


def test_csv_without_required_columns_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "k"
    (src / "train").mkdir(parents=True)
    (src / "trainLabels.csv").write_text("name,grade\n1_left,0\n")
    assert run(kaggle, ["--kaggle-dir", str(src), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lacks required column(s) 'image', 'level'" in err
    assert not (tmp_path / "o").exists()


def test_folder_with_wrong_grade_column_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "l.csv").write_text("id_code,diagnosis\na,0\n")
    argv = ["--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "l.csv")]
    assert run(folder, [*argv, "--out", str(tmp_path / "o"), "--id-column", "id_code"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'level'" in err and "id_code, diagnosis" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sizes", "32,abc"], "--sizes: must be integers"),
        (["--sizes", "128"], "--base-size: 64 is below the largest size 128"),
        (["--val-from-train", "1.5"], "--val-from-train: must be between 0 and 1"),
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--workers", "many"], "--workers=many"),
        (["--rho", "0"], "--rho: must be positive"),
        (["--format", "gif"], "--format=gif"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(kaggle_src, tmp_path, capsys, extra, message):
    argv = ["--kaggle-dir", str(kaggle_src), "--out", str(tmp_path / "o"), *FAST, *extra]
    assert run(kaggle, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.kaggle: error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_missing_kaggle_dir_and_missing_flag_exit_2(tmp_path, capsys):
    assert run(kaggle, ["--kaggle-dir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "--kaggle-dir: " in capsys.readouterr().err
    assert run(kaggle, ["--kaggle-dir", str(tmp_path)]) == 2  # no --out
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "\n" not in err


@pytest.mark.parametrize("command", [kaggle, folder, aptos, messidor2, idrid, ddr])
def test_help_exits_0_and_lists_the_processing_flags(command, capsys):
    assert run(command, ["--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(command.__doc__.strip().splitlines()[0])
    assert options.EPILOG.strip() in shown  # the shared end: bad inputs, resuming, exit codes
    names = ("out", "sizes", "base-size", "alpha", "no-mask", "workers", "strict")
    for name in names:
        assert f"--{name}:" in shown or f"--[no]{name}:" in shown, name


def test_processing_flags_make_the_settings_they_name(capsys):
    argv = ["--kaggle-dir", "k", "--out", "o", "--sizes", "64,32", "--base-size", "96"]
    argv += ["--alpha", "3", "--beta", "-3", "--rho", "5", "--gamma", "100", "--no-mask"]
    argv += ["--mask-fraction", "0.8", "--format", "png", "--jpeg-quality", "80", "--seed", "4"]
    argv += ["--shard-mb", "2", "--workers", "3", "--strict", "--no-progress"]
    argv += ["--rho-scale", "graham"]
    kaggle.FLAGS.unparse_flags()
    kaggle.FLAGS([kaggle.PROG, *argv])
    expected = Settings(
        sizes=(32, 64),
        params=PreprocessParams(
            alpha=3.0, beta=-3.0, rho=5.0, gamma=100.0, mask=False, mask_fraction=0.8,
            base_size=96, rho_scale="graham",
        ),
        image_format="png",
        jpeg_quality=80,
        seed=4,
        shard_mb=2.0,
        workers=3,
        strict=True,
        progress=False,
    )  # fmt: skip
    assert options.settings_from_flags(kaggle.FLAGS) == expected
    kaggle.FLAGS.unparse_flags()
    kaggle.FLAGS([kaggle.PROG, "--kaggle-dir", "k", "--out", "o"])
    assert options.settings_from_flags(kaggle.FLAGS) == Settings()  # the dataclass defaults
    assert Settings().sizes == (224, 448, 720) and Settings().params == PreprocessParams()


def test_other_settings_on_a_finished_output_are_refused(kaggle_src, kaggle_out, capsys):
    argv = ["--kaggle-dir", str(kaggle_src), "--out", str(kaggle_out), *FAST]
    assert run(kaggle, argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert run(kaggle, [*argv, "--gamma", "100"]) == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "choose another output folder" in err


# ---------------------------------------------------------------------------------------------
# The m2cnn-prep dispatcher


def test_m2cnn_prep_runs_the_same_commands(kaggle_src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["m2cnn-prep", "kaggle", "--kaggle-dir", str(kaggle_src), "--out", str(out), *FAST]
    assert cli.run([*argv, "--sizes", "32"]) == 0
    assert "m2cnn-prep kaggle: wrote 28 images" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["tool"] == "data_prep.kaggle" and m["command"][:2] == ["m2cnn-prep", "kaggle"]
    assert m["counts"]["train"]["records"] == len(csv_rows(kaggle_src / "trainLabels.csv"))
    assert cli.run(["m2cnn-prep", "folder", "--workers", "0", "--images", "i"]) == 2
    assert capsys.readouterr().err.startswith("m2cnn-prep folder: error: ")


def test_m2cnn_prep_help_lists_every_command_and_refuses_others(capsys):
    assert cli.run(["m2cnn-prep", "--help"]) == 0
    shown = capsys.readouterr().out
    for name in ("kaggle", "folder", "aptos", "messidor2", "idrid", "ddr", "demo"):
        assert f"  {name} " in shown
    for argv, word in ((["reshape"], "'reshape'"), ([], "missing command")):
        assert cli.run(["m2cnn-prep", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("m2cnn-prep: error: ") and word in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# The engine as a library: a result, typed errors, lines through `log`


def test_convert_returns_its_result_and_reports_only_through_log(kaggle_src, tmp_path, capsys):
    from data_prep.sources import kaggle_listing

    settings = Settings(sizes=(32,), params=PreprocessParams(base_size=64), progress=False)
    listing = kaggle_listing(kaggle_src, None, seed=0)
    lines: list[str] = []
    result = engine.convert(listing, tmp_path / "o", settings, command=["x"], log=lines.append)
    assert capsys.readouterr() == ("", "")  # nothing printed by the library
    m = json.loads(result.manifest.read_text())
    assert result.records == {s: c["records"] for s, c in m["counts"].items()}
    assert result.records == {"train": 20, "val": 4, "test": 4}
    assert (result.skipped, result.resumed, result.already_complete) == (0, 0, False)
    assert lines[0].startswith("wrote 28 images") and lines[-1] == "no inputs skipped"
    again = engine.convert(listing, tmp_path / "o", settings, log=lines.append)
    assert again.already_complete and again.records == result.records
    with pytest.raises(errors.UsageError) as e:
        engine.convert(listing, tmp_path / "o", dataclasses.replace(settings, seed=1), log=print)
    assert e.value.setting == "out" and "--" not in str(e.value)


def test_strict_failure_is_a_typed_error_listing_every_bad_input(bad_src, tmp_path):
    from data_prep.sources import kaggle_listing

    params = PreprocessParams(base_size=64)
    settings = Settings(sizes=(32,), params=params, strict=True, progress=False)
    with pytest.raises(engine.BadInputs) as e:
        engine.convert(kaggle_listing(bad_src[0], None, 0), tmp_path / "o", settings, log=print)
    assert isinstance(e.value, errors.RunFailed) and e.value.exit_code == 1
    assert str(e.value) == "12 bad input(s); nothing written" and e.value.setting == "strict"
    assert len(e.value.problems) == 12  # 29_left twice: neither conflicting copy is trusted
    assert {p.image_id for p in e.value.problems} == set(bad_src[1])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Flags reach the pixels


def outside_circle(size: int, fraction: float) -> np.ndarray:
    """The pixels of a size×size square farther than fraction·size/2 from its centre: where
    Graham's mask puts γ, written out here."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - c, xx - c) > fraction * size / 2


@pytest.fixture(scope="module")
def four_eyes(tmp_path_factory) -> Path:
    return kaggle_dir(tmp_path_factory.mktemp("four"), patients=2, solution=False)


def png_records(src: Path, out: Path, *flags: str) -> dict[str, np.ndarray]:
    """Convert `src` to PNG records with `flags`: image id -> its 64 px image (the base size:
    Eq. (1)'s output itself), BGR like preprocessing's."""
    argv = ["--kaggle-dir", str(src), "--out", str(out), *FAST, "--format", "png", *flags]
    assert run(kaggle, argv) == 0
    rows = read_split(out, 64, "train")
    assert rows and all(r["image/format"] == b"png" for r in rows)
    return {
        r["image/id"].decode(): tf.io.decode_png(r["image/encoded"]).numpy()[..., ::-1]
        for r in rows
    }


def test_the_mask_puts_gamma_on_the_whole_outside_and_no_mask_leaves_eq_1_there(
    four_eyes, tmp_path
):
    outside = outside_circle(64, 0.9)
    masked = png_records(four_eyes, tmp_path / "masked", "--gamma", "100")
    unmasked = png_records(four_eyes, tmp_path / "unmasked", "--gamma", "100", "--no-mask")
    assert masked.keys() == unmasked.keys() and len(masked) == 4
    for image_id, image in masked.items():
        path = four_eyes / "train" / f"{image_id}.jpeg"
        assert (image[outside] == 100).all(), image_id  # every outside pixel, every channel
        assert (image[~outside] != 100).any(axis=-1).mean() > 0.5  # inside: Eq. (1)
        free = unmasked[image_id]
        assert (free[outside] != 100).any(axis=-1).mean() > 0.9, image_id  # Eq. (1) there too
        params = PreprocessParams(gamma=100.0, base_size=64, mask=False)
        np.testing.assert_array_equal(free, preprocess_bgr_file(path, params))


# Eq. (1)'s constants and the mask radius, each away from its default.
EQ1_FLAGS = {"alpha": 3.0, "beta": -2.0, "rho": 5.0, "gamma": 100.0, "mask_fraction": 0.8}


def test_eq_1_and_mask_flags_reach_the_pixels(four_eyes, tmp_path):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in EQ1_FLAGS.items()]
    got = png_records(four_eyes, tmp_path / "o", *flags)
    params = PreprocessParams(base_size=64, **EQ1_FLAGS)
    ring = outside_circle(64, 0.7) & ~outside_circle(64, 0.8)
    for image_id, image in got.items():
        path = four_eyes / "train" / f"{image_id}.jpeg"
        np.testing.assert_array_equal(image, preprocess_bgr_file(path, params), err_msg=image_id)
        for name in EQ1_FLAGS:  # with any one of them at its default, other pixels
            default = dataclasses.replace(params, **{name: getattr(PreprocessParams(), name)})
            assert (preprocess_bgr_file(path, default) != image).any(), (image_id, name)
        assert (image[outside_circle(64, 0.8)] == 100).all()  # the 80 % circle's outside
        assert (image[ring] != 100).any(axis=-1).mean() > 0.5  # 70-80 %: Eq. (1), not the mask


# Annex K's luminance quantisation table (ITU-T T.81), which libjpeg scales by the quality.
LUMINANCE = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40,
             57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35,
             55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112,
             100, 103, 99]  # fmt: skip


def quantisation_table(quality: int) -> list[int]:
    """libjpeg's luminance table at `quality` (jpeg_quality_scaling, baseline), sorted."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sorted(min(255, max(1, (q * scale + 50) // 100)) for q in LUMINANCE)


def table_in(jpeg: bytes) -> list[int]:
    """The luminance table a JPEG file carries (its first DQT segment), sorted."""
    i = jpeg.index(b"\xff\xdb")
    assert jpeg[i + 4] == 0  # 8-bit values, table 0
    return sorted(jpeg[i + 5 : i + 69])


def test_jpeg_quality_reaches_the_encoded_records(four_eyes, kaggle_out, tmp_path):
    default = read_split(kaggle_out, 64, "train")
    assert {bytes(r["image/format"]) for r in default} == {b"jpeg"}
    assert all(table_in(r["image/encoded"]) == quantisation_table(95) for r in default)
    sizes = {}
    for quality in (20, 60):
        out = tmp_path / str(quality)
        argv = ["--kaggle-dir", str(four_eyes), "--out", str(out), *FAST]
        assert run(kaggle, [*argv, "--jpeg-quality", str(quality)]) == 0
        rows = read_split(out, 64, "train")
        assert all(table_in(r["image/encoded"]) == quantisation_table(quality) for r in rows)
        bases = {  # what each image is before encoding (RGB, as the records decode)
            p.stem: preprocess_bgr_file(p, PreprocessParams(base_size=64))[..., ::-1].astype(int)
            for p in (four_eyes / "train").glob("*.jpeg")
        }
        for r in rows:  # the picture is this image's, nearer to it than to any other
            decoded = tf.io.decode_jpeg(r["image/encoded"]).numpy().astype(int)
            nearest = min(bases, key=lambda k: np.abs(decoded - bases[k]).mean())
            assert nearest == r["image/id"].decode()
        sizes[quality] = sum(len(r["image/encoded"]) for r in rows)
    assert sizes[20] < sizes[60]


# ---------------------------------------------------------------------------------------------
# The folder command: --ext, split spellings, the default split


def test_folder_ext_picks_the_files_of_that_extension(tmp_path, capsys):
    """Every id has a .png and a .jpg of different photographs: ambiguous without --ext; with
    it, the records are the named extension's images."""
    images = tmp_path / "imgs"
    lines = ["image,level"]
    for i in range(4):
        write_fundus(images / f"e{i}.jpg", seed=i)
        cv2.imwrite(str(images / f"e{i}.png"), fundus(seed=100 + i))
        lines.append(f"e{i},{i}")
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    argv = ["--images", str(images), "--labels", str(tmp_path / "l.csv"), *FAST]
    argv += ["--sizes", "64", "--format", "png", "--split-ratio", "1,0"]
    assert run(folder, [*argv, "--out", str(tmp_path / "none")]) == 2  # no usable image:
    assert "1 ambiguous file name (e3.jpg, e3.png)" in capsys.readouterr().err  # two files each
    for ext in (".jpg", "png"):
        out = tmp_path / ext.strip(".")
        assert run(folder, [*argv, "--out", str(out), "--ext", ext]) == 0
        rows = read_split(out, 64, "train")
        assert ids(rows) == {f"e{i}" for i in range(4)}
        for r in rows:
            path = images / f"{r['image/id'].decode()}.{ext.strip('.')}"
            expected = preprocess_bgr_file(path, PreprocessParams(base_size=64))[..., ::-1]
            np.testing.assert_array_equal(tf.io.decode_png(r["image/encoded"]).numpy(), expected)


# Each spelling of a split column's value and the split it means (data_prep.folder's help).
SPELLINGS = {"train": "train", "Training": "train", "TRAIN": "train", "val": "val",
             "valid": "val", "Validation": "val", "dev": "val", "test": "test",
             "Testing": "test"}  # fmt: skip


def test_folder_split_column_reads_every_spelling_and_skips_an_unknown_one(tmp_path):
    images = tmp_path / "imgs"
    lines = ["image,level,subset"]
    for i, spelling in enumerate([*SPELLINGS, "holdout"]):
        write_fundus(images / f"s{i}.png", seed=i)
        lines.append(f"s{i},{i % 5},{spelling}")
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["--images", str(images), "--labels", str(tmp_path / "l.csv"), "--out", str(out)]
    assert run(folder, [*argv, *FAST, "--sizes", "32", "--split-column", "subset"]) == 0
    for split in ("train", "val", "test"):
        expected = {f"s{i}" for i, s in enumerate(SPELLINGS) if SPELLINGS[s] == split}
        assert ids(read_split(out, 32, split)) == expected, split
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [(s["image_id"], s["reason"]) for s in skipped] == [("s9", "unknown split 'holdout'")]


def test_folder_default_split_is_80_10_10_by_patient(tmp_path):
    images = tmp_path / "imgs"
    lines = ["image,level"]
    for p in range(20):
        for eye in ("left", "right"):
            write_fundus(images / f"{p}_{eye}.jpeg", seed=2 * p + (eye == "left"), width=96)
            lines.append(f"{p}_{eye},{p % 5}")
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["--images", str(images), "--labels", str(tmp_path / "l.csv"), "--out", str(out)]
    assert run(folder, [*argv, *FAST, "--sizes", "32"]) == 0
    patients = {}
    for split in ("train", "val", "test"):
        rows = read_split(out, 32, split)
        patients[split] = {r["image/patient"].decode() for r in rows}
        assert len(rows) == 2 * len(patients[split])  # both eyes of each patient, together
    assert {k: len(v) for k, v in patients.items()} == {"train": 16, "val": 2, "test": 2}
    assert set.union(*patients.values()) == {str(p) for p in range(20)}
    recorded = json.loads((out / "manifest.json").read_text())["params"]["split_ratio"]
    assert recorded == {"train": 0.8, "val": 0.1, "test": 0.1}


# ---------------------------------------------------------------------------------------------
# Ctrl-C and kill -9 of a real conversion, then the same command resumes


def _shard_files(out: Path) -> dict[str, bytes]:
    """Every shard file's bytes by its path: equal files hold the same records in the same order
    (a TFRecord file is its records and their checksums, nothing else). Read as bytes: a
    tf.data pass over each of the ~500 small shards took 5 s per comparison."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.tfrecord"))}


IMAGES = 120


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[list[str], Path]:
    """(the flags of a conversion of IMAGES photographs into 5 kB shards, one image per chunk,
    so an interruption lands between many small commits; its uninterrupted output)."""
    root = tmp_path_factory.mktemp("many")
    src = root / "k"
    lines = ["image,level"]
    for i in range(IMAGES):
        name = f"{i // 2}_{'left' if i % 2 else 'right'}"
        write_fundus(src / "train" / f"{name}.jpeg", seed=i, height=180, width=240)
        lines.append(f"{name},{i % 5}")
    (src / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    common = ["--kaggle-dir", str(src), "--sizes", "64,128", "--base-size", "128"]
    common += ["--shard-mb", "0.005", "--no-progress", "--val-from-train", "0.2"]
    assert run(kaggle, [*common, "--out", str(root / "reference"), "--workers", "1"]) == 0
    return common, root / "reference"


@contextlib.contextmanager
def _conversion(common: list[str], out: Path, err: Path) -> Iterator[subprocess.Popen]:
    """The conversion as a command line runs it, with 2 workers, in its own process group (killed
    with it at the end); its stderr in `err`."""
    cmd = [sys.executable, "-m", "data_prep.kaggle", *common, "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with err.open("wb") as sink, started(cmd, cwd=REPO, env=env, stderr=sink) as process:
        yield process


def _frozen_after(process: subprocess.Popen, chunks: Path, n: int) -> list[psutil.Process]:
    """Poll the conversion's done chunks until there are `n`, then stop it (SIGSTOP) so that it
    cannot finish before the signal the test sends; returns its descendants (the forkserver and
    the workers). A deadline only guards against a hang."""
    deadline = time.monotonic() + 300
    while not (chunks.is_dir() and len(list(chunks.glob("*.json"))) >= n):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the conversion ended or hung before {n} chunks (exit {process.poll()})")
        time.sleep(0.01)
    process.send_signal(signal.SIGSTOP)
    assert process.poll() is None and not (chunks.parents[1] / "manifest.json").exists()
    return psutil.Process(process.pid).children(recursive=True)


# TensorFlow's C++ start-up logging, which TF_CPP_MIN_LOG_LEVEL does not silence in TF 2.21.
TF_LOGGING = re.compile(r"WARNING: All log messages before absl::|[IWEF]\d{4} [\d:.]+ +\d+ \S+\] ")


def own_lines(stderr: str) -> list[str]:
    """The lines a command printed itself: stderr without TensorFlow's start-up logging."""
    return [line for line in stderr.strip().splitlines() if not TF_LOGGING.match(line)]


def _resume_gives_the_reference(common, out, reference, capsys) -> None:
    """The same command again (in this process: a fresh one proves nothing more) finishes the
    conversion: the same shard files with the same records, byte for byte, in the same order."""
    done = len(list((out / ".state" / "chunks").glob("*.json")))
    assert 10 <= done < IMAGES
    assert run(kaggle, [*common, "--out", str(out), "--workers", "2"]) == 0
    assert "resumed:" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["timings"]["resumed_images"] >= done
    assert m["timings"]["this_run_images"] == IMAGES - m["timings"]["resumed_images"]
    expected, got = _shard_files(reference), _shard_files(out)
    assert expected and list(got) == list(expected)
    for name, data in expected.items():
        assert got[name] == data, name
    assert not list(out.rglob("*.tmp*"))
    assert m["shards"] == json.loads((reference / "manifest.json").read_text())["shards"]


@pytest.mark.slow
def test_ctrl_c_stops_a_real_conversion_with_130_in_one_line_no_worker_left_and_it_resumes(
    many, tmp_path, capsys
):
    common, reference = many
    out, log = tmp_path / "out", tmp_path / "log"
    with _conversion(common, out, log) as process:
        workers = _frozen_after(process, out / ".state" / "chunks", 10)
        assert len(workers) >= 3  # the forkserver and its 2 workers
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        process.send_signal(signal.SIGCONT)
        code = process.wait(timeout=120)  # a hang guard
        _, alive = psutil.wait_procs(workers, timeout=30)
        left = group_members(process.pid)
    assert code == 130, log.read_text()[-3000:]
    assert own_lines(log.read_text()) == [
        "data_prep.kaggle: error: interrupted; run the same conversion again to resume"
    ]  # no traceback, no worker's KeyboardInterrupt
    assert not alive and not left, (alive, left)  # no worker outlived the conversion
    assert not (out / "manifest.json").exists()
    _resume_gives_the_reference(common, out, reference, capsys)


@pytest.mark.slow
def test_kill_9_of_a_real_conversion_leaves_no_worker_and_it_resumes(many, tmp_path, capsys):
    common, reference = many
    out, log = tmp_path / "out", tmp_path / "log"
    with _conversion(common, out, log) as process:
        workers = _frozen_after(process, out / ".state" / "chunks", 10)
        process.send_signal(signal.SIGKILL)  # kill -9 of the conversion alone
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=30)  # a hang guard: they die with it
        left = group_members(process.pid)
    assert process.returncode == -signal.SIGKILL
    assert not alive and not left, (alive, left)  # no worker outlived the killed conversion
    assert not (out / "manifest.json").exists()
    _resume_gives_the_reference(common, out, reference, capsys)


def test_a_second_conversion_into_the_same_out_is_refused(kaggle_src, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    (out / ".state").mkdir(parents=True)
    with open(out / ".state" / "lock", "w") as held:  # as a running conversion holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(kaggle, ["--kaggle-dir", str(kaggle_src), "--out", str(out), *FAST]) == 2
    assert "another conversion is writing to" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
