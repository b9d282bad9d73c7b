"""evaluate.py / m2cnn_tf.evaluation: the paper's two test methods and the extra figures.

References are independent: sklearn's cohen_kappa_score and roc_auc_score, plain loops written
here, Keras's own model on flipped inputs, and hand calculations.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from m2cnn_tf import evaluation
from m2cnn_tf.checkpoints import save_best, stage_dir
from m2cnn_tf.metrics import scores_to_grades
from m2cnn_tf.model import build_m2cnn
from m2cnn_tf.records import make_example

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96


def qwk(a, b) -> float:
    return cohen_kappa_score(a, b, weights="quadratic", labels=list(range(5)))


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
    """A tiny stage-1 checkpoint with spread-out heads, and val/test TFRecords (PNG, 96 px)."""
    root = tmp_path_factory.mktemp("eval")
    model = build_m2cnn(SIZE, preset="tiny")
    rng = np.random.default_rng(7)
    splits = {}
    for split, n in (("val", 40), ("test", 30)):
        grades = np.arange(n) % 5
        rng.shuffle(grades)
        images = np.stack([_image(rng, int(g)) for g in grades])
        splits[split] = (images, grades)
    _spread_heads(model, splits["val"][0])
    model_dir = root / "model"
    save_best(model, stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE, "preset": "tiny"})
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


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_kappa_equals_sklearn_on_predictions_csv(workspace):
    out = workspace["root"] / "report_test"
    report = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "test", out, n_boot=200
    )
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0])[:12] == list(evaluation.CSV_COLUMNS)
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


def test_model_pass_matches_keras_predict_in_record_order(workspace):
    out = workspace["root"] / "report_val_plain"
    evaluation.run_evaluation(workspace["model_dir"], 1, workspace["data"], "val", out, n_boot=10)
    rows = _read_csv(out / "predictions.csv")
    images, grades = workspace["val"]
    expected = workspace["model"].predict(images.astype(np.float32) / 127.5 - 1, verbose=0)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected["score"].ravel(),
                               atol=1e-4)  # fmt: skip
    assert [int(r["grade"]) for r in rows] == grades.tolist()
    assert rows[0]["id"] == "100_left" and rows[0]["patient"] == "100" and rows[1]["eye"] == "right"


def test_fitted_cutpoints_never_score_lower_than_rounding_on_val(workspace):
    rng = np.random.default_rng(3)
    for trial in range(25):
        grades = rng.integers(0, 5, 200)
        scores = grades * rng.uniform(0.5, 1.2) + rng.normal(rng.uniform(-1, 1), 0.8, 200)
        cuts = evaluation.fit_cutpoints(scores, grades)
        assert list(cuts) == sorted(cuts), trial
        assert qwk(grades, scores_to_grades(scores, cuts)) >= qwk(
            grades, scores_to_grades(scores)
        ), trial
    # A biased regressor: fitting clearly helps.
    grades = rng.integers(0, 5, 300)
    scores = 0.6 * grades + rng.normal(0, 0.3, 300)
    cuts = evaluation.fit_cutpoints(scores, grades)
    assert (
        qwk(grades, scores_to_grades(scores, cuts)) > qwk(grades, scores_to_grades(scores)) + 0.05
    )
    # End to end on val: the report with fitted cut points beats or equals rounding on val.
    fit = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "val", workspace["root"] / "r_fit",
        fit_thresholds=True, n_boot=10,
    )  # fmt: skip
    plain = json.loads((workspace["root"] / "report_val_plain" / "report.json").read_text())
    assert fit["scores"]["kappa"] >= plain["scores"]["kappa"]
    assert fit["fitted_on_evaluated_split"] is True
    rows = _read_csv(workspace["root"] / "r_fit" / "predictions.csv")
    assert fit["scores"]["kappa"] == pytest.approx(
        qwk([int(r["grade"]) for r in rows], [int(r["pred_score"]) for r in rows]), abs=1e-9
    )


def _reference_bootstrap(y_true, y_pred, groups, n_boot, seed, level=0.95):
    """A plain loop: resample groups, concatenate their images, sklearn kappa, percentiles."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = sorted(set(groups))
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in names}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(names), size=len(names))
        idx = [i for k in picked for i in members[names[k]]]
        t, p = y_true[idx], y_pred[idx]
        # Kappa is undefined (sklearn: nan) when the expected disagreement is zero: skip.
        expected = np.outer(np.bincount(t, minlength=5), np.bincount(p, minlength=5))
        if ((np.arange(5)[:, None] - np.arange(5)[None, :]) ** 2 * expected).sum() == 0:
            continue
        values.append(qwk(t, p))
    tail = (1 - level) / 2 * 100
    return tuple(np.percentile(values, [tail, 100 - tail]))


def test_bootstrap_ci_matches_reference_and_contains_the_estimate():
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 5, 60)
    y_pred = np.clip(y_true + rng.integers(-1, 2, 60), 0, 4)
    groups = [str(i // 2) for i in range(60)]  # two eyes per patient
    for g in (None, groups):
        got = evaluation.bootstrap_kappa_ci(y_true, y_pred, groups=g, n_boot=300, seed=5)
        ref_groups = g if g is not None else [str(i).zfill(3) for i in range(60)]
        ref = _reference_bootstrap(y_true, y_pred, ref_groups, 300, 5)
        np.testing.assert_allclose(got, ref, atol=1e-9)
        assert got[0] <= qwk(y_true, y_pred) <= got[1]
        assert got[0] < got[1]


def test_bootstrap_ci_hand_cases():
    # Perfect agreement: every defined replicate has kappa 1, so the CI is exactly [1, 1].
    y = np.array([0, 1, 2, 3, 4] * 4)
    assert evaluation.bootstrap_kappa_ci(y, y, n_boot=200) == (1.0, 1.0)
    # Two images, 0 and 4, both predicted 2: resamples {0,0}, {4,4} are undefined (nan) and
    # dropped; {0,4} (in either order) has kappa 0. So the CI is [0, 0].
    assert evaluation.bootstrap_kappa_ci([0, 4], [2, 2], n_boot=200) == (0.0, 0.0)


def test_per_patient_blend_on_constructed_example():
    patients = ["10", "10", "11", "12", "12", "13"]
    eyes = ["left", "right", "left", "right", "left", ""]
    partner = evaluation.partner_index(patients, eyes)
    assert partner.tolist() == [1, 0, -1, 4, 3, -1]
    scores = np.array([1.0, 3.0, 2.0, 0.0, 4.0, 1.5])
    blended = evaluation.blend_eyes(scores, partner, 0.25)
    # Hand calculation: 0.75*own + 0.25*other; patients 11 and 13 have no fellow eye.
    np.testing.assert_allclose(blended, [1.5, 2.5, 2.0, 1.0, 3.0, 1.5])
    probs = np.eye(5)[[0, 4, 2, 1, 3, 0]]
    np.testing.assert_allclose(evaluation.blend_eyes(probs, partner, 0.5)[0], [0.5, 0, 0, 0, 0.5])

    # Both eyes share the grade; each eye's score has large independent noise, so averaging
    # the eyes helps and the fitted weight must be well above 0, with kappa not lower.
    rng = np.random.default_rng(2)
    n_patients = 150
    grade = np.repeat(rng.integers(0, 5, n_patients), 2)
    patients = np.repeat(np.arange(n_patients).astype(str), 2)
    eyes = np.tile(["left", "right"], n_patients)
    scores = grade + rng.normal(0, 0.9, 2 * n_patients)
    partner = evaluation.partner_index(patients, eyes)
    w, k = evaluation.fit_blend_weight(scores_to_grades, scores, partner, grade)
    assert w >= 0.3
    assert k == pytest.approx(
        qwk(grade, scores_to_grades(evaluation.blend_eyes(scores, partner, w)))
    )
    assert k > qwk(grade, scores_to_grades(scores))


def test_per_patient_report_blends_with_the_weight_fitted_on_val(workspace):
    out = workspace["root"] / "r_pp"
    report = evaluation.run_evaluation(
        workspace["model_dir"], 1, workspace["data"], "test", out, per_patient=True, n_boot=10
    )
    rows = _read_csv(out / "predictions.csv")
    own = {r["id"]: float(r["score_own"]) for r in rows}
    w = report["per_patient"]["weight_score"]
    for r in rows:
        other = f"{r['patient']}_{'right' if r['eye'] == 'left' else 'left'}"
        expected = (1 - w) * own[r["id"]] + w * own[other] if other in own else own[r["id"]]
        assert float(r["score"]) == pytest.approx(expected, abs=2e-6)


def test_tta_equals_manual_average_of_flipped_predictions(workspace):
    model = workspace["model"]
    x = workspace["test"][0][:3].astype(np.float32) / 127.5 - 1
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    for mode, all_views in (
        ("flips", views),
        ("flips+rot90", views + [v.transpose(0, 2, 1, 3) for v in views]),
    ):
        outs = [model.predict(np.ascontiguousarray(v), verbose=0) for v in all_views]
        probs = np.mean([tf.nn.softmax(o["logits"]).numpy() for o in outs], axis=0)
        score = np.mean([o["score"].ravel() for o in outs], axis=0)
        got = evaluation.make_predict_fn(model, mode)(x)
        np.testing.assert_allclose(got["probabilities"].numpy(), probs, atol=1e-5)
        np.testing.assert_allclose(got["score"].numpy(), score, atol=1e-4)
        assert not np.allclose(score, model.predict(x, verbose=0)["score"].ravel(), atol=1e-4)


def _fake_report(path: Path, model_dir: str, split: str, size: int, ks: float, kp: float):
    way = {
        "kappa_ci95": [ks - 0.01, ks + 0.01], "accuracy": 0.5,
        "referable": {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.7},
    }  # fmt: skip
    report = {
        "split": split, "image_size": size, "checkpoint": {"model_dir": model_dir},
        "scores": {**way, "kappa": ks}, "prob": {**way, "kappa": kp},
    }  # fmt: skip
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))


def test_compare_prints_runs_side_by_side_like_table_ii(tmp_path):
    _fake_report(tmp_path / "a", "/runs/mse", "val", 224, 0.720, 0.5)
    _fake_report(tmp_path / "b", "/runs/multitask", "val", 224, 0.742, 0.718)
    _fake_report(tmp_path / "c", "/runs/multitask", "val", 448, 0.812, 0.782)
    table = evaluation.compare_reports([tmp_path / d for d in "abc"])
    lines = table.splitlines()
    assert "mse" in lines[0] and "multitask" in lines[0]
    row224 = next(line for line in lines if line.startswith("val 224×224"))
    row448 = next(line for line in lines if line.startswith("val 448×448"))
    assert row224.replace("|", " ").split()[-4:] == ["0.720", "0.500", "0.742", "0.718"]
    assert row448.replace("|", " ").split()[-4:] == ["-", "-", "0.812", "0.782"]


def test_compare_labels_runs_by_their_table_ii_column_from_best_json(tmp_path):
    metas = {
        "a": {"loss": "mse", "multi_cell": False},
        "b": {"loss": "ce", "multi_cell": True},
        "c": {"flags": {"loss": "multitask", "multi_cell": False}},
        "d": {"loss": "multitask", "multi_cell": True},
        "e": {},  # a checkpoint from before the switches: the folder name alone
    }
    for name, meta in metas.items():
        _fake_report(tmp_path / name, f"/runs/{name}", "val", 448, 0.8, 0.7)
        path = tmp_path / name / "report.json"
        report = json.loads(path.read_text())
        report["checkpoint"]["meta"] = meta
        path.write_text(json.dumps(report))
    header = evaluation.compare_reports([tmp_path / d for d in metas]).splitlines()[0]
    assert [c.strip() for c in header.split("|")[1:]] == [
        "MSE: a",
        "CE+MC: b",
        "Multi-Task: c",
        "M²CNN: d",
        "e",
    ]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_evaluate_cli_usage_errors_exit_2_with_one_line(tmp_path, workspace):
    cases = [
        [],
        ["--model-dir", "m", "--stage", "1"],  # missing --data/--split/--out
        ["--model-dir", "m", "--stage", "1", "--data", "d", "--split", "train", "--out", "o"],
        ["--model-dir", "m", "--stage", "1", "--data", "d", "--split", "val", "--out", "o", "x"],
        ["--compare", str(tmp_path / "nothing")],
    ]
    for args in cases:
        proc = _run("evaluate.py", *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    # A stage without a checkpoint, and a size without records: one line each, exit 2.
    model_dir = str(workspace["model_dir"])
    for stage, data in (("2", str(workspace["data"])), ("1", str(tmp_path))):
        proc = _run(
            "evaluate.py", "--model-dir", model_dir, "--stage", stage, "--data", data,
            "--split", "val", "--out", "o", cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        message = [line for line in proc.stderr.splitlines() if "evaluate.py: error" in line]
        assert len(message) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_min_kappa_gate_exits_1_below_and_0_at_or_above(tmp_path, workspace):
    common = [
        "evaluate.py", "--model-dir", str(workspace["model_dir"]), "--stage", "1",
        "--data", str(workspace["data"]), "--split", "test", "--bootstrap", "50",
    ]  # fmt: skip
    failing = _run(*common, "--out", str(tmp_path / "a"), "--min-kappa", "1.01", cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr
    rows = _read_csv(tmp_path / "a" / "predictions.csv")
    kappa = qwk([int(r["grade"]) for r in rows], [int(r["pred_score"]) for r in rows])
    assert f"check: kappa from scores {kappa:.3f} < 1.01 (FAIL)" in failing.stdout
    # With --compare, the last report listed is the one checked.
    compared = _run("evaluate.py", "--compare", str(tmp_path / "a"), "--min-kappa", "-1",
                    cwd=tmp_path)  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert f"check: kappa from scores {kappa:.3f} >= -1.0 (pass)" in compared.stdout
