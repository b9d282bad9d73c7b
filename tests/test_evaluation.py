"""evaluate.py / m2cnn_tf.evaluation: a stage evaluated on a split, end to end, and its CLI.

The parts (inference, calibration, metrics, reports) have their own tests; here they run
together. References are independent: sklearn's cohen_kappa_score and roc_auc_score, Keras's own
model.predict, numpy flips and rotations, and hand calculations.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _cutpoints import assert_a_fixed_point_of_the_coordinate_search, grades_by_hand, qwk
from _reports import fake_report
from _subprocess import run_group
from _tfrecords import write_split
from sklearn.metrics import roc_auc_score

from m2cnn_tf import backends, calibration, evaluation, metrics, reports, tta
from m2cnn_tf.checkpoints import save_checkpoint, stage_dir
from m2cnn_tf.commands import evaluate as evaluate_cmd
from m2cnn_tf.errors import UsageError
from m2cnn_tf.metrics import scores_to_grades
from m2cnn_tf.model import build_m2cnn
from m2cnn_tf.records import make_example

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96


def _spread_heads(model, val_images: np.ndarray, seed: int = 0) -> None:
    """An untrained model's outputs barely vary; random head weights, with the score rescaled
    to cover about 0-4 on val, make kappa, confusion matrices and cut points non-degenerate."""
    rng = np.random.default_rng(seed)
    for name in ("score", "logits"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, 3, kernel.shape).astype(np.float32), bias])
    raw = model.predict(val_images.astype(np.float32) / 127.5 - 1, verbose=0)["score"].ravel()
    layer = model.get_layer("score")
    kernel, _ = layer.get_weights()
    scale = 1.6 / max(float(raw.std()), 1e-6)
    layer.set_weights([kernel * scale, np.array([2.0 - raw.mean() * scale], np.float32)])


def _image(rng: np.random.Generator, grade: int) -> np.ndarray:
    img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    img[: 10 + 15 * grade] //= 2  # something grade-related for the features to pick up
    return img


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A nano stage-1 checkpoint with spread-out heads, and val/test TFRecords (PNG, 96 px)."""
    root = tmp_path_factory.mktemp("eval")
    keras.utils.set_random_seed(6)  # a module fixture: its own seed, whatever ran before
    model = build_m2cnn(SIZE, preset="nano")
    rng = np.random.default_rng(7)
    splits = {}
    for split, n in (("val", 40), ("test", 30)):
        grades = np.arange(n // 2) % 5  # per patient: both eyes share the grade (DR is
        rng.shuffle(grades)  # systemic), so blending eyes has something to find
        grades = np.repeat(grades, 2)
        images = np.stack([_image(rng, int(g)) for g in grades])
        splits[split] = (images, grades)
    _spread_heads(model, splits["val"][0])
    model_dir = root / "model"
    save_checkpoint(
        model, stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE, "preset": "nano"}
    )
    data = root / "data"
    (data / str(SIZE)).mkdir(parents=True)
    for split, (images, grades) in splits.items():
        path = data / str(SIZE) / f"{split}-00000-of-00001.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i, (img, g) in enumerate(zip(images, grades, strict=True)):
                ok, buf = cv2.imencode(".png", img[..., ::-1])  # cv2 writes BGR
                assert ok
                eye = ("left", "right")[i % 2]
                writer.write(
                    make_example(
                        buf.tobytes(),
                        image_format="png",
                        height=SIZE,
                        width=SIZE,
                        grade=int(g),
                        image_id=f"{100 + i // 2}_{eye}",
                    )
                )
    return {"root": root, "model_dir": model_dir, "data": data, "model": model, **splits}


@pytest.fixture(scope="module")
def val_plain(workspace):
    """The val report with rounding, no TTA, no blending: (its folder, report.json's content)."""
    out = workspace["root"] / "report_val_plain"
    report = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "val", out, n_boot=10
    )
    return out, report


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_report_kappa_equals_sklearn_on_predictions_csv(workspace):
    out = workspace["root"] / "report_test"
    report = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "test", out, n_boot=200
    )
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0])[:12] == list(reports.CSV_COLUMNS)
    truth = [int(r["grade"]) for r in rows]
    by_score = [int(r["pred_score"]) for r in rows]
    by_prob = [int(r["pred_prob"]) for r in rows]
    assert len(set(by_score)) >= 3, "fixture should spread the predictions"
    assert report["scores"]["kappa"] == pytest.approx(qwk(truth, by_score), abs=1e-9)
    assert report["prob"]["kappa"] == pytest.approx(qwk(truth, by_prob), abs=1e-9)
    # The CSV's grades follow from its own scores and probabilities.
    scores = np.array([float(r["score"]) for r in rows])
    probs = np.array([[float(r[f"p{k}"]) for k in range(5)] for r in rows])
    assert by_score == scores_to_grades(scores).tolist()
    assert by_prob == np.argmax(probs, axis=1).tolist()
    # Referable AUC against sklearn on the CSV's own columns.
    referable = np.array(truth) >= 2
    ref_auc = report["scores"]["referable"]["auc"]
    assert ref_auc == pytest.approx(roc_auc_score(referable, scores), abs=1e-6)
    assert report["prob"]["referable"]["auc"] == pytest.approx(
        roc_auc_score(referable, probs[:, 2:].sum(axis=1)), abs=1e-5
    )
    lo, hi = report["scores"]["kappa_ci95"]
    assert lo <= report["scores"]["kappa"] <= hi
    assert report["checkpoint"]["path"].endswith("stage1/best.keras")
    assert report["data"]["shards"][0].endswith("test-00000-of-00001.tfrecord")
    for name in ("confusion_matrix.png", "roc_referable.png"):
        assert cv2.imread(str(out / name)) is not None
    assert json.loads((out / "report.json").read_text())["n_images"] == 30


def _pixels_of(png: Path, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    """(x, y) of the pixels of a PNG within `tol` of a colour, per channel."""
    image = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB).astype(int)
    ys, xs = np.nonzero((np.abs(image - np.array(rgb)) <= tol).all(axis=-1))
    return np.stack([xs, ys], axis=1)


def test_the_confusion_plot_draws_each_ways_matrix(tmp_path):
    """A diagonal matrix for the scores, every image predicted 0 for the probabilities: the
    darkest cells (Blues at a rate of 1, #08306b) run down the diagonal of the left panel and
    down the first column of the right one."""
    eye, first = np.eye(5, dtype=int) * 6, np.zeros((5, 5), int)
    first[:, 0] = 6
    report = {w: {"confusion_matrix": m.tolist(), "kappa": None} for w, m in
              zip(metrics.WAYS, (eye, first), strict=True)}  # fmt: skip
    reports.plot_confusion(tmp_path / "cm.png", report)
    dark = _pixels_of(tmp_path / "cm.png", (8, 48, 107), tol=12)
    width = cv2.imread(str(tmp_path / "cm.png")).shape[1]
    left, right = dark[dark[:, 0] < width / 2], dark[dark[:, 0] >= width / 2]
    assert len(left) > 500 and len(right) > 500  # five cells each
    assert np.corrcoef(left[:, 0], left[:, 1])[0, 1] > 0.95  # down the diagonal
    assert right[:, 0].std() < 0.3 * right[:, 1].std()  # one column
    assert right[:, 0].max() - right[:, 0].min() < 0.3 * (left[:, 0].max() - left[:, 0].min())


def test_the_roc_plot_draws_each_ways_curve(tmp_path):
    """A perfect ROC for the scores (tab:blue: up the left edge, along the top) and the worst
    one for the probabilities (tab:orange: along the bottom, up the right edge)."""
    perfect = {"fpr": [0, 0, 1], "tpr": [0, 1, 1]}
    worst = {"fpr": [0, 1, 1], "tpr": [0, 0, 1]}
    report = {
        w: {"referable": {"auc": auc, "roc": roc, "sensitivity": auc, "specificity": auc}}
        for w, roc, auc in zip(metrics.WAYS, (perfect, worst), (1.0, 0.0), strict=True)
    }
    reports.plot_roc(tmp_path / "roc.png", report)
    blue = _pixels_of(tmp_path / "roc.png", (31, 119, 180))
    orange = _pixels_of(tmp_path / "roc.png", (255, 127, 14))
    (x0, y0), (x1, y1) = np.vstack([blue, orange]).min(0), np.vstack([blue, orange]).max(0)
    margin_x, margin_y = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
    near_left_or_top = (blue[:, 0] < x0 + margin_x) | (blue[:, 1] < y0 + margin_y)
    near_right_or_bottom = (orange[:, 0] > x1 - margin_x) | (orange[:, 1] > y1 - margin_y)
    assert len(blue) > 300 and len(orange) > 300
    assert near_left_or_top.mean() > 0.8 and near_right_or_bottom.mean() > 0.8


@pytest.mark.slow
def test_model_pass_matches_keras_predict_in_record_order(workspace, val_plain):
    out, _ = val_plain
    rows = _read_csv(out / "predictions.csv")
    images, grades = workspace["val"]
    expected = workspace["model"].predict(images.astype(np.float32) / 127.5 - 1, verbose=0)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected["score"].ravel(),
                               atol=1e-4)  # fmt: skip
    assert [int(r["grade"]) for r in rows] == grades.tolist()
    assert rows[0]["id"] == "100_left" and rows[0]["patient"] == "100" and rows[1]["eye"] == "right"


@pytest.mark.slow
def test_report_with_cutpoints_fitted_on_val_scores_at_least_rounding_on_val(workspace, val_plain):
    _, plain = val_plain
    fit = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "val", workspace["root"] / "r_fit",
        fit_thresholds=True, n_boot=10,
    )  # fmt: skip
    assert fit["scores"]["kappa"] >= plain["scores"]["kappa"]
    assert fit["fitted_on_evaluated_split"] is True and fit["thresholds"] == "fit on val"
    rows = _read_csv(workspace["root"] / "r_fit" / "predictions.csv")
    assert fit["scores"]["kappa"] == pytest.approx(
        qwk([int(r["grade"]) for r in rows], [int(r["pred_score"]) for r in rows]), abs=1e-9
    )


# ---------------------------------------------------------------------------------------------
# Eye blending end to end, on a model whose scores are known by hand

BLEND_SIZE = 32
# Both eyes of a patient share the grade. The score of a uniform image of value v is v / 63.75
# (`_mean_model`). Patient 0's right eye (v=77, score 1.21) rounds to grade 1, not 2.
VAL_EYES = [(2, 128, 77), (0, 0, 0), (4, 255, 255), (1, 64, 64), (3, 191, 191)]
TEST_VALUES = [10, 200, 100, 100, 30, 250, 140]  # the last image has no fellow eye


def _mean_model() -> keras.Model:
    """score = 2 * (mean pixel in [-1, 1]) + 2 = v / 63.75 for a uniform uint8 image of value v;
    logits all 0."""
    inputs = keras.Input((BLEND_SIZE, BLEND_SIZE, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    score = keras.layers.Dense(1, name="score")(pooled)
    logits = keras.layers.Dense(5, name="logits", kernel_initializer="zeros")(pooled)
    model = keras.Model(inputs, {"logits": logits, "score": score})
    model.get_layer("score").set_weights([np.full((3, 1), 2 / 3, np.float32), np.array([2.0])])
    return model


def _uniform(values) -> np.ndarray:
    return np.stack([np.full((BLEND_SIZE, BLEND_SIZE, 3), v, np.uint8) for v in values])


@pytest.fixture(scope="module")
def blend_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    save_checkpoint(_mean_model(), stage_dir(root / "model", 1), {"stage": 1})
    val_values = [v for _, left, right in VAL_EYES for v in (left, right)]
    val_grades = [g for g, _, _ in VAL_EYES for _ in range(2)]
    write_split(root / "data", BLEND_SIZE, "val", _uniform(val_values), val_grades)
    write_split(root / "data", BLEND_SIZE, "test", _uniform(TEST_VALUES), [0] * 7)
    return root


def test_per_patient_report_blends_each_eye_with_the_weight_fitted_on_val(blend_workspace):
    root = blend_workspace
    report = evaluation.run_evaluation(
        root / "model", 1, root / "data", "test", root / "report", per_patient=True, n_boot=10
    )
    # By hand: blending leaves every val patient but 0 unchanged (equal eyes); patient 0's right
    # eye reaches grade 2 once 77 + w * (128 - 77) >= 1.5 * 63.75, and then kappa is 1. The
    # fitted w is the smallest such w on the 0.01 grid: 0.37.
    w = math.ceil((1.5 * 63.75 - 77) / (128 - 77) * 100) / 100
    assert w == 0.37
    assert report["per_patient"]["weight_score"] == pytest.approx(w)
    assert report["per_patient"]["enabled"] is True
    assert report["per_patient"]["weight_prob"] == 0.0  # constant logits: nothing to gain
    rows = _read_csv(root / "report" / "predictions.csv")
    own = np.array(TEST_VALUES) / 63.75
    other = np.array([TEST_VALUES[i ^ 1] if i < 6 else TEST_VALUES[i] for i in range(7)]) / 63.75
    # float32 means over 32×32 pixels: about 1e-5 from the exact v / 63.75.
    np.testing.assert_allclose([float(r["score_own"]) for r in rows], own, atol=1e-4)
    np.testing.assert_allclose(
        [float(r["score"]) for r in rows], (1 - w) * own + w * other, atol=1e-4
    )
    assert rows[6]["score"] == rows[6]["score_own"]  # no fellow eye: unchanged


# ---------------------------------------------------------------------------------------------
# TTA


def _keras_call(model):
    return backends.runtime_of(model)[0]


def _reference_mean(model, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Keras predict on every view separately; the mean softmax and the mean score."""
    outs = [model.predict(np.ascontiguousarray(v), verbose=0) for v in views]
    probs = np.mean([tf.nn.softmax(o["logits"]).numpy() for o in outs], axis=0)
    return probs, np.mean([o["score"].ravel() for o in outs], axis=0)


@pytest.mark.slow
def test_tta_equals_the_mean_over_numpy_flips_and_rotations(workspace):
    model = workspace["model"]
    x = workspace["test"][0][:3].astype(np.float32) / 127.5 - 1
    flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    # The dihedral group of the square: the 4 rotations by 90° of the image and of its mirror.
    dihedral = [np.rot90(v, k, axes=(1, 2)) for v in (x, x[:, :, ::-1]) for k in range(4)]
    plain = model.predict(x, verbose=0)["score"].ravel()
    scores = {}
    for mode, views in (("flips", flips), ("dihedral", dihedral)):
        probs, score = _reference_mean(model, views)
        got = tta.make_predict_fn(_keras_call(model), mode)(x)
        np.testing.assert_allclose(got["probabilities"], probs, atol=1e-5)
        np.testing.assert_allclose(got["score"], score, atol=1e-4)
        assert not np.allclose(score, plain, atol=1e-4)
        scores[mode] = score
    assert not np.allclose(scores["flips"], scores["dihedral"], atol=1e-4)
    # uint8 input is scaled like data.scale_image inside the same call.
    raw = workspace["test"][0][:3]
    got = tta.make_predict_fn(_keras_call(model), "none")(raw)["score"]
    np.testing.assert_allclose(got, plain, atol=1e-4)


def test_tta_sends_all_views_through_one_call_of_any_runtime(workspace):
    """A non-Keras backend (LiteRT, say) is any callable from the batch to the two heads."""
    model = workspace["model"]
    calls = []

    def backend(images):
        calls.append(images.shape[0])
        out = model(np.asarray(images), training=False)
        return {"logits": out["logits"].numpy(), "score": out["score"].numpy()}

    x = workspace["test"][0][:2].astype(np.float32) / 127.5 - 1
    got = tta.make_predict_fn(backend, "flips")(x)
    expected = tta.make_predict_fn(_keras_call(model), "flips")(x)
    assert calls == [8]  # 4 views x 2 images in one call
    np.testing.assert_allclose(got["score"], expected["score"], atol=1e-5)


def test_unknown_tta_mode_is_a_usage_error_naming_the_setting():
    for mode in ("flips+rot90", "rot90", ""):
        with pytest.raises(UsageError) as info:
            tta.check_tta(mode)
        assert info.value.setting == "tta"


# ---------------------------------------------------------------------------------------------
# The command line (run() in-process; one real script run for the top-level shim)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = evaluate_cmd.run(["evaluate.py", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:"), err


def test_evaluate_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    common = ["--model-dir", "m", "--stage", "1", "--data", "d"]
    cases = [
        [],
        ["--model-dir", "m", "--stage", "1"],  # missing --data/--split/--out
        [*common, "--split", "train", "--out", "o"],
        [*common, "--split", "val", "--out", "o", "x"],
        [*common, "--split", "val", "--out", "o", "--tta"],  # --tta takes a mode now
        [*common, "--split", "val", "--out", "o", "--tta", "flips+rot90"],
        [*common, "--split", "val", "--out", "o", "--tta-rotations"],  # merged into --tta
        ["--compare", tmp_path / "nothing"],
    ]
    for args in cases:
        code, _, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        _assert_one_error_line(err)


def test_top_level_script_is_the_command(tmp_path):
    proc = run_group([sys.executable, str(ROOT / "evaluate.py"), "--split", "train"],
               cwd=tmp_path, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "evaluate.py: error: flag --split=train: value should be one of <val|test>"
    ]


def test_missing_checkpoint_or_records_exit_2_with_one_line(tmp_path, workspace, capsys):
    model_dir = workspace["model_dir"]
    for stage, data in (("2", workspace["data"]), ("1", tmp_path)):
        code, _, err = _cli(
            capsys, "--model-dir", model_dir, "--stage", stage, "--data", data, "--split", "val",
            "--out", tmp_path / "o",
        )  # fmt: skip
        assert code == 2, err
        _assert_one_error_line(err)
        assert ("stage 2" if stage == "2" else f"no {SIZE} px records") in err


def test_min_kappa_gate_passes_at_exactly_the_bar_and_fails_just_below(tmp_path, capsys):
    fake_report(tmp_path / "r", "/runs/x", "val", 224, 0.7, 0.6)
    code, out, _ = _cli(capsys, "--compare", tmp_path / "r", "--min-kappa", "0.7")
    assert code == 0 and "check: kappa from scores 0.700 >= 0.7 (pass)" in out
    # The next float above 0.7: the report's kappa is now just below the bar.
    bar = repr(float(np.nextafter(0.7, 1.0)))
    code, out, _ = _cli(capsys, "--compare", tmp_path / "r", "--min-kappa", bar)
    assert code == 1 and f"check: kappa from scores 0.700 < {bar} (FAIL)" in out
    # An undefined kappa never passes.
    fake_report(tmp_path / "u", "/runs/x", "val", 224, None, 0.6)
    code, out, _ = _cli(capsys, "--compare", tmp_path / "u", "--min-kappa", "-1")
    assert code == 1 and "check: kappa from scores undefined < -1.0 (FAIL)" in out


@pytest.mark.slow
def test_min_kappa_gate_after_an_evaluation_checks_its_report(tmp_path, workspace, capsys):
    common = [
        "--model-dir", workspace["model_dir"], "--stage", "1", "--data", workspace["data"],
        "--split", "test", "--bootstrap", "50", "--out", tmp_path / "a",
    ]  # fmt: skip
    code, out, err = _cli(capsys, *common, "--min-kappa", "1.01")
    assert code == 1, err
    rows = _read_csv(tmp_path / "a" / "predictions.csv")
    kappa = qwk([int(r["grade"]) for r in rows], [int(r["pred_score"]) for r in rows])
    assert f"check: kappa from scores {kappa:.3f} < 1.01 (FAIL)" in out
    assert "report written to" in out and "Train" in out  # the Table II layout
    # With --compare, the last report listed is the one checked: its kappa exactly passes.
    exact = repr(json.loads((tmp_path / "a" / "report.json").read_text())["scores"]["kappa"])
    code, out, _ = _cli(capsys, "--compare", tmp_path / "a", "--min-kappa", exact)
    assert code == 0 and "(pass)" in out
    above = repr(float(np.nextafter(float(exact), 2.0)))
    code, _, _ = _cli(capsys, "--compare", tmp_path / "a", "--min-kappa", above)
    assert code == 1


# ---------------------------------------------------------------------------------------------
# --tta and --thresholds fit (--per-patient) end to end, through the command line, against
# Keras on numpy views and against fits redone by hand from val's predictions.csv


def _evaluate_cli(capsys, workspace, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    """evaluate.py on the test split: its report.json and predictions.csv."""
    code, _, err = _cli(
        capsys, "--model-dir", workspace["model_dir"], "--stage", "1", "--data",
        workspace["data"], "--split", "test", "--bootstrap", "10", "--out", out, *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((out / "report.json").read_text()), _read_csv(out / "predictions.csv")


def _partners_by_hand(rows: list[dict[str, str]]) -> np.ndarray:
    """Each row's fellow eye (same patient, the other eye) from the CSV's columns, or itself."""
    where = {(r["patient"], r["eye"]): i for i, r in enumerate(rows)}
    other = {"left": "right", "right": "left"}
    return np.array([where.get((r["patient"], other[r["eye"]]), i) for i, r in enumerate(rows)])


@pytest.mark.slow
def test_tta_through_the_command_line_grades_the_test_split_by_the_mean_over_flips(
    workspace, capsys, tmp_path
):
    report, rows = _evaluate_cli(capsys, workspace, tmp_path / "flips", "--tta", "flips")
    assert report["tta"] == "flips"
    model = workspace["model"]
    x = workspace["test"][0].astype(np.float32) / 127.5 - 1
    probs, score = _reference_mean(model, [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]])
    got = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(got, score, atol=1e-4)
    got_probs = np.array([[float(r[f"p{k}"]) for k in range(5)] for r in rows])
    np.testing.assert_allclose(got_probs, probs, atol=1e-4)
    plain = model.predict(x, verbose=0)["score"].ravel()
    assert np.median(np.abs(score - plain)) > 1e-2  # TTA moved the scores
    truth = [int(r["grade"]) for r in rows]
    assert report["scores"]["kappa"] == pytest.approx(
        qwk(truth, grades_by_hand(got, (0.5, 1.5, 2.5, 3.5)))
    )


@pytest.mark.slow
def test_cutpoints_fitted_on_val_grade_the_test_split(workspace, val_plain, capsys, tmp_path):
    """--thresholds fit on the test split: the cut points are fitted on val (redone from val's
    predictions.csv: calibration's fit, and a scan with scikit-learn around its result) and
    the test split's grades follow from them."""
    val_dir, _ = val_plain
    val = _read_csv(val_dir / "predictions.csv")
    val_scores = np.array([float(r["score"]) for r in val])
    val_grades = [int(r["grade"]) for r in val]
    report, rows = _evaluate_cli(capsys, workspace, tmp_path / "fit", "--thresholds", "fit")
    assert report["thresholds"] == "fit on val" and report["fitted_on_evaluated_split"] is False
    cuts = report["cutpoints"]
    np.testing.assert_allclose(cuts, calibration.fit_cutpoints(val_scores, val_grades), atol=1e-5)
    assert not np.allclose(cuts, [0.5, 1.5, 2.5, 3.5], atol=1e-3)
    assert_a_fixed_point_of_the_coordinate_search(cuts, val_scores, val_grades)
    scores = [float(r["score"]) for r in rows]
    by_hand = grades_by_hand(scores, cuts)
    assert [int(r["pred_score"]) for r in rows] == by_hand
    assert by_hand != grades_by_hand(scores, (0.5, 1.5, 2.5, 3.5))  # the fit changed grades
    truth = [int(r["grade"]) for r in rows]
    assert report["scores"]["kappa"] == pytest.approx(qwk(truth, by_hand), abs=1e-9)


def _blend(values: np.ndarray, partner: np.ndarray, w: float) -> np.ndarray:
    return (1 - w) * values + w * values[partner]


def _best_weight_by_hand(grade, values, partner, truth) -> float:
    """The smallest w of 0, 0.01, ..., 0.5 with the highest scikit-learn kappa on val."""
    kappas = [qwk(truth, grade(_blend(values, partner, w / 100))) for w in range(51)]
    return float(np.argmax(np.round(kappas, 12))) / 100


@pytest.mark.slow
def test_fit_and_per_patient_blend_eyes_then_fit_cut_points_on_the_blend(
    workspace, val_plain, capsys, tmp_path
):
    """--thresholds fit --per-patient on the test split, redone by hand from val's
    predictions.csv: the blend weights that maximise val's kappa (scores rounded; argmax of the
    blended probabilities), then cut points fitted on val's blended scores; on the test split
    each eye's score blended with its fellow eye's and graded by those cut points."""
    val_dir, _ = val_plain
    val = _read_csv(val_dir / "predictions.csv")
    v_scores = np.array([float(r["score"]) for r in val])
    v_probs = np.array([[float(r[f"p{k}"]) for k in range(5)] for r in val])
    truth = [int(r["grade"]) for r in val]
    partner = _partners_by_hand(val)
    assert (partner != np.arange(len(val))).all()  # every val eye has its fellow
    w_score = _best_weight_by_hand(
        lambda s: grades_by_hand(s, (0.5, 1.5, 2.5, 3.5)), v_scores, partner, truth
    )
    w_prob = _best_weight_by_hand(lambda p: np.argmax(p, axis=1), v_probs, partner, truth)
    report, rows = _evaluate_cli(
        capsys, workspace, tmp_path / "both", "--thresholds", "fit", "--per-patient"
    )
    blend = report["per_patient"]
    assert blend["enabled"] is True
    assert (blend["weight_score"], blend["weight_prob"]) == pytest.approx((w_score, w_prob))
    assert w_score > 0 or w_prob > 0, "the fixture should make blending worth something"
    blended_val = _blend(v_scores, partner, w_score)
    cuts = report["cutpoints"]
    np.testing.assert_allclose(cuts, calibration.fit_cutpoints(blended_val, truth), atol=1e-5)
    assert_a_fixed_point_of_the_coordinate_search(cuts, blended_val, truth)
    own = np.array([float(r["score_own"]) for r in rows])
    expected = _blend(own, _partners_by_hand(rows), w_score)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, atol=2e-6)
    assert [int(r["pred_score"]) for r in rows] == grades_by_hand(expected, cuts)


# ---------------------------------------------------------------------------------------------
# Nothing disappears unnoticed: n_images against the images the split's source lists


def test_without_a_manifest_the_report_counts_its_images_and_expects_nothing(val_plain):
    _, report = val_plain
    assert report["n_images"] == 40
    assert (report["n_expected"], report["missing_ids"], report["flagged"]) == (None, [], [])


def _data_with_manifest(workspace, target: Path, manifest: dict) -> Path:
    shutil.copytree(workspace["data"], target)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.slow
def test_evaluate_warns_in_one_line_when_the_split_lacks_images_its_source_lists(
    tmp_path, workspace, capsys
):
    manifest = {
        "expected": {"val": 42, "test": 30},
        "skipped": [
            {"image_id": "900_right", "path": "x", "reason": "empty file", "split": "val"},
            {"image_id": "900_left", "path": "y", "reason": "missing file", "split": "val"},
            {"image_id": "901_left", "path": "z", "reason": "missing file", "split": "test"},
        ],
        "flagged": [
            {"image_id": "100_left", "path": "w", "reason": "truncated JPEG", "split": "val"}
        ],
    }
    data = _data_with_manifest(workspace, tmp_path / "data", manifest)
    code, out, err = _cli(
        capsys, "--model-dir", workspace["model_dir"], "--stage", "1", "--data", data,
        "--split", "val", "--bootstrap", "10", "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: evaluated 40 val images, but the split's source lists 42 (2 known missing, by "
        "id in report.json's missing_ids); this kappa is not comparable with one over the whole "
        "split"
    ]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (report["n_images"], report["n_expected"]) == (40, 42)
    assert report["missing_ids"] == ["900_left", "900_right"]
    assert report["flagged"] == [{"id": "100_left", "reason": "truncated JPEG"}]


def _predictions(ids: list[str]) -> metrics.Predictions:
    n = len(ids)
    return metrics.Predictions(
        ids=np.array(ids), patients=np.array(ids), eyes=np.array([""] * n),
        grades=np.zeros(n, int), scores=np.zeros(n), probs=np.full((n, 5), 0.2),
    )  # fmt: skip


def test_a_complete_split_gives_no_warning_and_an_older_manifest_still_counts(tmp_path):
    lines: list[str] = []
    (tmp_path / "manifest.json").write_text(json.dumps({"expected": {"test": 3}}))
    record = evaluation.completeness_record(
        tmp_path, "test", _predictions(["a", "b", "c"]), lines.append
    )
    assert (record["n_images"], record["n_expected"], record["missing_ids"]) == (3, 3, [])
    assert lines == []
    # A manifest from before `expected`: the split's records plus its skipped images.
    older = {
        "counts": {"test": {"records": 3, "grades": {}}},
        "skipped": [{"image_id": "d", "path": "", "reason": "empty file", "split": "test"}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    record = evaluation.completeness_record(
        tmp_path, "test", _predictions(["a", "b", "c"]), lines.append
    )
    assert (record["n_expected"], record["missing_ids"]) == (4, ["d"])
    assert len(lines) == 1 and lines[0].startswith("warning: evaluated 3 test images")


@pytest.fixture(scope="module")
def best_and_last(workspace, tmp_path_factory):
    """A nano stage whose last checkpoint is another model than its best (other heads), each
    evaluated on test from a fresh load: {"model_dir", "out": {which: folder}, "reports"}."""
    root = tmp_path_factory.mktemp("best_and_last")
    model_dir = root / "m"
    for which, seed in (("best", 0), ("last", 5)):
        model = build_m2cnn(SIZE, preset="nano")
        _spread_heads(model, workspace["val"][0], seed=seed)
        meta = {
            "stage": 1,
            "resolution": SIZE,
            "preset": "nano",
            "epoch": 3 if which == "best" else 6,
        }
        save_checkpoint(model, stage_dir(model_dir, 1), meta, which)
    out = {which: root / which for which in ("best", "last")}
    reports = {
        which: evaluation.run_evaluation(
            model_dir, 1, workspace["data"], "test", out[which], n_boot=10, checkpoint=which
        )
        for which in out
    }
    return {"model_dir": model_dir, "out": out, "reports": reports}


@pytest.mark.slow
def test_checkpoint_last_evaluates_the_weights_after_the_final_step(
    workspace, best_and_last, tmp_path
):
    """`checkpoint="last"` grades with last.keras (kappa from its own predictions, by sklearn)
    and says so."""
    reports = best_and_last["reports"]
    assert reports["last"]["checkpoint"]["which"] == "last"
    assert reports["last"]["checkpoint"]["path"].endswith("stage1/last.keras")
    assert reports["last"]["checkpoint"]["meta"]["epoch"] == 6
    rows = list(csv.DictReader((best_and_last["out"]["last"] / "predictions.csv").open()))
    expected = qwk([int(r["grade"]) for r in rows], [int(r["pred_score"]) for r in rows])
    assert reports["last"]["scores"]["kappa"] == pytest.approx(expected)
    assert reports["last"]["scores"]["kappa"] != reports["best"]["scores"]["kappa"]
    with pytest.raises(UsageError, match="LiteRT export is made from the best") as err:
        evaluation.run_evaluation(
            best_and_last["model_dir"], 1, workspace["data"], "test", tmp_path / "x",
            backend="litert", checkpoint="last",
        )  # fmt: skip
    assert err.value.setting == "checkpoint"


@pytest.mark.slow
def test_built_models_take_each_checkpoints_weights_and_grade_as_a_fresh_load(
    workspace, best_and_last, tmp_path, monkeypatch
):
    """reproduce.py's evaluations through one `KerasModels`: best, last, then best again, of
    one architecture, build the network once, and each writes the predictions that loading its
    checkpoint afresh wrote, byte for byte."""
    from m2cnn_tf import checkpoints

    fresh = {w: (d / "predictions.csv").read_bytes() for w, d in best_and_last["out"].items()}
    assert fresh["best"] != fresh["last"]
    built = []
    load_model = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda p: built.append(p) or load_model(p))
    models = backends.KerasModels()
    for i, which in enumerate(("best", "last", "best")):
        evaluation.run_evaluation(
            best_and_last["model_dir"], 1, workspace["data"], "test", tmp_path / str(i),
            n_boot=10, checkpoint=which, models=models,
        )  # fmt: skip
        assert (tmp_path / str(i) / "predictions.csv").read_bytes() == fresh[which], (i, which)
    assert len(built) == 1
