"""predict.py / m2cnn_tf.prediction / m2cnn_tf.gradcam: grading raw images, explaining, exporting.

References: data_prep's own worker for the preprocessed arrays, Keras's model.predict for the
outputs (on numpy-rotated views for TTA), a constructed network whose evidence location is
known for Grad-CAM, cut points applied by hand. The model's heads are scaled up
(`_spread_heads`), so that its outputs differ between images by far more than the tolerances:
rows in the wrong order, or TTA left out, cannot pass for the right ones.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _subprocess import run_group

from data_prep import worker
from m2cnn_tf import checkpoints, gradcam, prediction
from m2cnn_tf.checkpoints import CheckpointMissing, save_checkpoint, stage_dir
from m2cnn_tf.commands import predict as predict_cmd
from m2cnn_tf.errors import UsageError
from m2cnn_tf.export import export_saved_model
from m2cnn_tf.manifest import preprocess_params_for
from m2cnn_tf.model import build_m2cnn
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_file

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128  # the tiny model's last feature map is 2×2 here (1×1 at 96)


def _fundus(seed: int, width: int = 360, height: int = 240) -> np.ndarray:
    """BGR: a textured orange disc with a few bright and dark spots on a black field."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    centre, radius = (width // 2, height // 2), int(0.45 * height)
    cv2.circle(img, centre, radius, (40, 90, 190), -1)
    for _ in range(8):
        p = (int(centre[0] + rng.integers(-80, 80)), int(centre[1] + rng.integers(-70, 70)))
        colour = (200, 230, 250) if rng.random() < 0.5 else (10, 20, 60)
        cv2.circle(img, p, int(rng.integers(2, 6)), colour, -1)
    noise = rng.normal(0, 4, img.shape) * (img > 0)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


ATOL = 1e-4  # outputs of batches of other shapes (oneDNN), and the CSV's six decimals


def _spread_heads(model: keras.Model) -> None:
    """An untrained head says about the same for every image; scaled up 400 times, its scores
    spread over about 0-4 and differ between images by 1e-2 or more."""
    for name, bias in (("score", 2.0), ("logits", 0.0)):
        layer = model.get_layer(name)
        kernel, b = layer.get_weights()
        layer.set_weights([kernel * 400.0, np.full_like(b, bias)])


def _assert_rows_match(got, expected) -> None:
    """`got` equals `expected` row for row, and the rows are told apart by far more than the
    tolerance, so that two rows swapped would fail."""
    expected = np.asarray(expected, np.float64)
    gaps = np.abs(expected[:, None] - expected[None, :])[~np.eye(len(expected), dtype=bool)]
    assert gaps.min() > 10 * ATOL, expected
    np.testing.assert_allclose(got, expected, atol=ATOL)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    keras.utils.set_random_seed(11)  # a module fixture: its own seed, whatever ran before
    model = build_m2cnn(SIZE, preset="tiny")
    _spread_heads(model)
    model_dir = root / "model"
    save_checkpoint(
        model, stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE, "preset": "tiny"}
    )
    images = root / "images"
    images.mkdir()
    for i in range(3):
        ext = ".png" if i == 2 else ".jpeg"
        cv2.imwrite(str(images / f"{i}_left{ext}"), _fundus(i))
    return {"root": root, "model": model, "model_dir": model_dir, "images": images}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = predict_cmd.run(["predict.py", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_predict_arrays_identical_to_data_prep_with_the_manifest_params(workspace, tmp_path):
    # Training data made with non-default Eq. (1) constants; the stage's config.json points there.
    params = PreprocessParams(alpha=3.0, beta=-3.0, rho=6.0, base_size=256)
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"params": worker.Settings(sizes=(SIZE,), params=params).output_key()}
    (data / "manifest.json").write_text(json.dumps(manifest))
    model_dir = tmp_path / "model"
    stage = stage_dir(model_dir, 1)
    stage.mkdir(parents=True)
    (stage / checkpoints.CONFIG).write_text(json.dumps({"data": str(data)}))
    found, source = preprocess_params_for(model_dir, 1)
    assert found == params and source.endswith("manifest.json")

    # data_prep's worker writes exactly these pixels into the TFRecords (PNG: lossless).
    worker.init_worker(
        worker.Settings(sizes=(SIZE,), params=params, image_format="png"), in_process=True
    )
    paths = sorted(workspace["images"].iterdir())
    expected = []
    for path in paths:
        encoded = worker.encode_image(str(path))[SIZE]
        bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
        expected.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    seen = []
    predictor = prediction.Predictor(workspace["model"], found, batch_size=2)
    inner = predictor.predict_fn
    predictor.predict_fn = lambda images: (seen.append(np.asarray(images)), inner(images))[1]
    rows = list(predictor.rows(paths))
    assert [r["error"] for r in rows] == ["", "", ""]
    np.testing.assert_array_equal(np.concatenate(seen), np.stack(expected))
    # ... and the defaults would have given different arrays.
    default = preprocess_file(paths[0], [SIZE], PreprocessParams())[SIZE]
    assert not np.array_equal(default, expected[0])


@pytest.mark.slow
def test_bad_files_get_error_rows_and_nonzero_exit_while_the_rest_is_predicted(workspace, capsys):
    root = workspace["root"]
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.png").write_bytes(b"this is not an image")
    good_jpeg = (workspace["images"] / "0_left.jpeg").read_bytes()
    (bad / "cut.jpeg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    cv2.imwrite(str(bad / "black.png"), np.zeros((200, 300, 3), np.uint8))
    # --out and --gradcam name folders that do not exist yet: predict.py creates them.
    out, cams, images = root / "new" / "preds.csv", root / "cams", workspace["images"]
    code, _, err = _cli(
        capsys, "--model-dir", workspace["model_dir"], "--stage", "1", "--out", out,
        "--gradcam", cams, "--batch-size", "2",
        images / "0_left.jpeg", bad, images / "1_left.jpeg", root / "missing.jpeg",
        images / "2_left.png",
    )  # fmt: skip
    assert code == 1, err
    assert "3 of 7 images graded, 4 failed" in err
    rows = _read_csv(out)
    names = [Path(r["path"]).name for r in rows]
    assert names == [
        "0_left.jpeg", "black.png", "cut.jpeg", "notes.png", "1_left.jpeg", "missing.jpeg",
        "2_left.png",
    ]  # fmt: skip
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"black.png", "cut.jpeg", "notes.png", "missing.jpeg"}
    assert all("\n" not in e and e for e in errors.values())
    assert all(r["score"] == "" for r in rows if r["error"])

    # The graded rows equal Keras's model on the same preprocessed arrays.
    good = [r for r in rows if not r["error"]]
    pixels = np.stack([preprocess_file(r["path"], [SIZE], PreprocessParams())[SIZE] for r in good])
    expected = workspace["model"].predict(pixels.astype(np.float32) / 127.5 - 1, verbose=0)
    _assert_rows_match([float(r["score"]) for r in good], expected["score"].ravel())
    probs = tf.nn.softmax(expected["logits"]).numpy()
    got = np.array([[float(r[f"p{k}"]) for k in range(5)] for r in good])
    np.testing.assert_allclose(got, probs, atol=ATOL)
    assert [int(r["grade_prob"]) for r in good] == np.argmax(probs, axis=1).tolist()
    # One Grad-CAM panel per graded image: exactly the model's input (preprocess_file's
    # pixels) beside its overlay, a caption bar below. The score head is linear on avg_pool
    # of the last feature map A (2×2 here), so the score's Grad-CAM is ReLU(A · w / 4), w the
    # head's kernel (by hand, from Keras's own A): where no cell is positive the overlay is the
    # image itself, elsewhere a heatmap is blended in.
    model = workspace["model"]
    features = keras.Model(model.inputs, model.get_layer("avg_pool").input)
    maps = features.predict(pixels.astype(np.float32) / 127.5 - 1, verbose=0)
    hot = ((maps @ model.get_layer("score").get_weights()[0][:, 0]) > 0).any(axis=(1, 2))
    assert 0 < hot.sum() < len(hot)  # both cases seen
    panels = sorted(p.name for p in cams.iterdir())
    assert panels == ["0_left_gradcam.png", "1_left_gradcam.png", "2_left_gradcam.png"]
    for name, image, heat in zip(panels, pixels, hot, strict=True):
        panel = cv2.cvtColor(cv2.imread(str(cams / name)), cv2.COLOR_BGR2RGB)
        assert panel.shape[1] == 2 * SIZE and panel.shape[0] > SIZE
        np.testing.assert_array_equal(panel[:SIZE, :SIZE], image)
        changed = (panel[:SIZE, SIZE:] != image).any(axis=-1).mean()
        assert changed > 0.1 if heat else changed == 0, (name, changed)
        assert (panel[SIZE:] == 255).all(axis=-1).mean() > 0.8  # the caption's white bar


@pytest.mark.slow
def test_stream_keeps_input_order_and_never_reads_far_ahead(workspace):
    rng = np.random.default_rng(0)
    arrays = {f"f{i}": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(9)}
    calls = []

    def preprocess(path):
        calls.append(path)
        if path.name in ("f2", "f5"):
            raise ValueError(f"cannot read {path.name}")
        return arrays[path.name]

    predictor = prediction.Predictor(
        workspace["model"], PreprocessParams(), batch_size=2, workers=1
    )
    predictor.preprocess = preprocess
    paths = [Path(name) for name in arrays]
    stream = predictor.rows(paths)
    first = next(stream)
    assert len(calls) <= 2 * predictor.batch_size + 1  # a bounded window, not the whole list
    rows = [first, *stream]
    assert [Path(r["path"]).name for r in rows] == list(arrays)
    assert [bool(r["error"]) for r in rows] == [n in ("f2", "f5") for n in arrays]
    good = [n for n in arrays if n not in ("f2", "f5")]
    x = np.stack([arrays[n] for n in good]).astype(np.float32) / 127.5 - 1
    expected = workspace["model"].predict(x, verbose=0)["score"].ravel()
    got = [r["score"] for r in rows if not r["error"]]
    _assert_rows_match(got, expected)


@pytest.mark.slow
def test_savedmodel_reload_outputs_equal_the_keras_model(workspace, tmp_path):
    model = workspace["model"]
    export = export_saved_model(model, tmp_path / "export")
    loaded = tf.saved_model.load(str(export))
    serve = loaded.signatures["serving_default"]
    x = np.random.default_rng(1).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    got = serve(image=tf.constant(x))
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(got["logits"].numpy(), expected["logits"], atol=ATOL)
    np.testing.assert_allclose(got["score"].numpy(), expected["score"], atol=ATOL)
    np.testing.assert_allclose(
        got["probabilities"].numpy(), tf.nn.softmax(expected["logits"]).numpy(), atol=1e-6
    )


def test_checkpoint_with_a_lambda_layer_is_refused_in_safe_mode(tmp_path, monkeypatch, capsys):
    # The lambda writes a marker file when it runs: loading must never run it.
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("M2CNN_TEST_MARKER", str(marker))

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Lambda(
        lambda t: (open(__import__("os").environ["M2CNN_TEST_MARKER"], "w").close(), t)[1]
    )(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(
        inputs, {"logits": keras.layers.Dense(5)(x), "score": keras.layers.Dense(1)(x)}
    )
    save_checkpoint(model, stage_dir(tmp_path / "m", 1), {"stage": 1})
    marker.unlink()
    with pytest.raises(CheckpointMissing, match="Lambda"):
        checkpoints.load_stage(tmp_path / "m", 1)
    assert not marker.exists()
    code, _, err = _cli(capsys, "--model-dir", tmp_path / "m", "--stage", "1", tmp_path / "x.png")
    assert code == 2
    assert err.strip().splitlines() == [ln for ln in err.splitlines() if "predict.py: error" in ln]
    assert "Lambda" in err and not marker.exists()


def test_gradcam_heatmap_shape_and_range_on_the_model(workspace):
    model = workspace["model"]
    x = np.random.default_rng(2).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    for target in ("score", "class"):
        cams = gradcam.GradCam(model, target).cams(x)
        side = model.get_layer("avg_pool").input.shape[1]
        assert cams.shape == (3, side, side)
        assert cams.min() >= 0 and cams.max() <= 1
        assert all(c.max() in (0.0, 1.0) for c in cams)  # normalised per image (or all zero)
    rgb = np.full((SIZE, SIZE, 3), 100, np.uint8)
    assert gradcam.overlay(rgb, cams[0]).shape == rgb.shape


def _evidence_model() -> keras.Model:
    """Score = mean over 8×8 cells of ReLU(brightness - 0.5): a bright patch is the evidence."""
    inputs = keras.Input((64, 64, 3), name="image")
    conv = keras.layers.Conv2D(1, 8, strides=8, name="feature", activation="relu")
    x = conv(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    score = keras.layers.Dense(1, name="score")(x)
    logits = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, {"logits": logits, "score": score})
    conv.set_weights([np.full((8, 8, 3, 1), 1 / 192, np.float32), np.array([-0.5], np.float32)])
    model.get_layer("score").set_weights([np.ones((1, 1), np.float32), np.zeros(1, np.float32)])
    return model


def test_gradcam_points_at_the_evidence():
    model = _evidence_model()
    cam = gradcam.GradCam(model)
    for top, left in ((8, 8), (40, 48), (16, 40)):
        x = np.zeros((1, 64, 64, 3), np.float32)
        x[0, top : top + 16, left : left + 16] = 1.0
        heat = cam.cams(x)[0]
        assert heat.shape == (8, 8)
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        assert (top // 8 <= peak[0] < (top + 16) // 8) and (left // 8 <= peak[1] < (left + 16) // 8)
        outside = np.ones_like(heat, bool)
        outside[top // 8 : (top + 16) // 8, left // 8 : (left + 16) // 8] = False
        assert heat[outside].max() == 0 and heat.max() == 1
        big = gradcam.upsample(heat, 64)
        assert big[top + 8, left + 8] > 0.9 and big[(top + 40) % 64, (left + 40) % 64] < 0.1


def test_predict_cli_usage_errors_exit_2_with_one_line(tmp_path, workspace, capsys):
    model = ["--model-dir", workspace["model_dir"], "--stage", "1"]
    cases = [
        [],
        ["--stage", "1", "x.jpeg"],
        ["--model-dir", "m", "--stage", "1"],
        ["--model-dir", "m", "--stage", "1", "--cutpoints", "1,2,x,4", "x.jpeg"],
        ["--model-dir", "m", "--stage", "one", "x.jpeg"],
        ["--model-dir", "m", "--stage", "1", "--no-such-flag", "x.jpeg"],
        ["--model-dir", "m", "--stage", "1", "--batch-size", "0", "x.jpeg"],
        ["--model-dir", "m", "--stage", "1", "--tta", "x.jpeg"],  # --tta takes a mode now
        ["--model-dir", "m", "--stage", "1", "--tta-rotations", "x.jpeg"],  # merged into --tta
        # Past the flags: a checked model, then the library's own checks.
        [*model, "--cutpoints", "1,2", workspace["images"]],
        [*model, tmp_path],  # a folder without images
        [*model, "--out", tmp_path / "file.csv" / "below", workspace["images"]],
    ]
    (tmp_path / "file.csv").write_text("")
    for args in cases:
        code, _, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("predict.py: error:"), (args, err)
    assert "--cutpoints: needs four numbers" in _cli(capsys, *cases[-3])[2]


def test_top_level_script_is_the_command(tmp_path):
    proc = run_group([sys.executable, str(ROOT / "predict.py"), "--stage", "1", "x.jpeg"],
               cwd=tmp_path, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "predict.py: error: pass --model-dir DIR and --stage N"
    ]


def _dihedral_mean(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras on each numpy view of a [-1, 1] batch (the rotations by 90° of the image and of its
    mirror): the mean score and the mean softmax."""
    views = [np.rot90(v, k, axes=(1, 2)) for v in (x, x[:, :, ::-1]) for k in range(4)]
    outs = [model.predict(np.ascontiguousarray(v), verbose=0) for v in views]
    score = np.mean([o["score"].ravel() for o in outs], axis=0)
    return score, np.mean([tf.nn.softmax(o["logits"]).numpy() for o in outs], axis=0)


@pytest.mark.slow
def test_dihedral_tta_grades_the_mean_over_numpy_rotations_and_mirrors(workspace):
    model = workspace["model"]
    rng = np.random.default_rng(3)
    arrays = {f"f{i}": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(3)}
    predictor = prediction.Predictor(model, PreprocessParams(), tta="dihedral", batch_size=2)
    predictor.preprocess = lambda p: arrays[p.name]
    rows = list(predictor.rows([Path(n) for n in arrays]))
    x = np.stack(list(arrays.values())).astype(np.float32) / 127.5 - 1
    score, probs = _dihedral_mean(model, x)
    _assert_rows_match([r["score"] for r in rows], score)
    np.testing.assert_allclose([[r[f"p{k}"] for k in range(5)] for r in rows], probs, atol=ATOL)
    # TTA changes every image's outputs, by far more than the tolerance.
    plain = model.predict(x, verbose=0)["score"].ravel()
    assert np.abs(score - plain).min() > 10 * ATOL, (score, plain)


# ---------------------------------------------------------------------------------------------
# predict.py's flags, through its command line (in-process: a fresh process proves nothing here)


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _model_args(workspace) -> list:
    return ["--model-dir", workspace["model_dir"], "--stage", "1"]


def _keras_inputs(paths) -> np.ndarray:
    """Keras's input for files: preprocess_file's arrays (Eq. (1)'s defaults), in [-1, 1]."""
    arrays = np.stack([preprocess_file(p, [SIZE], PreprocessParams())[SIZE] for p in paths])
    return arrays.astype(np.float32) / 127.5 - 1


@pytest.fixture(scope="module")
def plain_run(workspace) -> tuple[int, str, str]:
    """predict.py on the workspace's photographs, no --out: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict_cmd.run(["predict.py", *map(str, _model_args(workspace)),
                                str(workspace["images"])])  # fmt: skip
    return code, out.getvalue(), err.getvalue()


def test_without_out_the_csv_goes_to_stdout_and_defaults_are_said(workspace, plain_run):
    """No --out: the CSV on stdout. The stage has no config.json, so no manifest: the paper's
    Eq. (1) constants (Keras on preprocess_file's arrays with them), and stderr says so."""
    code, out, err = plain_run
    assert code == 0, err
    assert "preprocessing parameters from defaults (no manifest.json of the training data " \
        "found)" in err  # fmt: skip
    assert out.startswith(",".join(prediction.CSV_COLUMNS) + "\r\n")
    rows = _csv_rows(out)
    paths = sorted(workspace["images"].iterdir())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    expected = workspace["model"].predict(_keras_inputs(paths), verbose=0)["score"].ravel()
    _assert_rows_match([float(r["score"]) for r in rows], expected)


def test_cutpoints_grade_the_scores_by_the_cut_points_given(workspace, plain_run, capsys):
    """Cut points between the images' sorted scores: each image's grade is then its score's
    rank, by hand; rounding would give other grades."""
    scores = np.array([float(r["score"]) for r in _csv_rows(plain_run[1])])
    low, mid, high = np.sort(scores)
    cuts = [(low + mid) / 2, (mid + high) / 2, high + 1, high + 2]
    ranks = np.argsort(np.argsort(scores)).tolist()
    assert ranks != np.clip(np.floor(scores + 0.5), 0, 4).astype(int).tolist()  # not rounding's
    code, out, err = _cli(
        capsys, *_model_args(workspace), "--cutpoints", ",".join(f"{c:.6f}" for c in cuts),
        workspace["images"],
    )  # fmt: skip
    assert code == 0, err
    rows = _csv_rows(out)
    assert [int(r["grade"]) for r in rows] == ranks
    assert [float(r["score"]) for r in rows] == scores.tolist()  # only the grades change


@pytest.mark.slow
def test_tta_through_the_command_line_grades_the_mean_over_the_dihedral_views(workspace, capsys):
    images = workspace["images"]
    paths = sorted(images.iterdir())
    x = _keras_inputs(paths)
    plain = workspace["model"].predict(x, verbose=0)["score"].ravel()
    code, out, err = _cli(capsys, *_model_args(workspace), "--tta", "dihedral", images)
    assert code == 0, err
    rows = _csv_rows(out)
    score, probs = _dihedral_mean(workspace["model"], x)
    _assert_rows_match([float(r["score"]) for r in rows], score)
    got = [[float(r[f"p{k}"]) for k in range(5)] for r in rows]
    np.testing.assert_allclose(got, probs, atol=ATOL)
    assert np.abs(score - plain).min() > 10 * ATOL, (score, plain)


def test_folders_are_searched_for_tif_and_bmp_photographs_too(workspace, capsys, tmp_path):
    """One photograph saved lossless as PNG, TIFF and BMP (and a .TIF, upper case) in a folder
    tree with files that are not images: every copy is found, and graded alike."""
    bgr = _fundus(7)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.tif", "c.tiff", "sub/d.bmp", "sub/e.TIF"]
    for name in names:
        assert cv2.imwrite(str(folder / name), bgr)
    (folder / "notes.txt").write_text("not a photograph")
    (folder / "sub" / "list.csv").write_text("a,b\n")
    code, out, err = _cli(capsys, *_model_args(workspace), "--batch-size", "5", folder)
    assert code == 0, err
    rows = _csv_rows(out)
    assert [r["path"] for r in rows] == [str(folder / n) for n in names]
    assert [r["error"] for r in rows] == [""] * len(names)
    scores = [float(r["score"]) for r in rows]
    np.testing.assert_allclose(scores, scores[0], atol=2e-6)


def test_predictor_refuses_bad_settings_naming_them(workspace):
    for kwargs, setting in (
        ({"batch_size": 0}, "batch_size"),
        ({"cutpoints": (0.5, 1.5)}, "cutpoints"),
        ({"tta": "flips+rot90"}, "tta"),
    ):
        with pytest.raises(UsageError) as info:
            prediction.Predictor(workspace["model"], PreprocessParams(), **kwargs)
        assert info.value.setting == setting
