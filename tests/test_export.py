"""export.py / m2cnn_tf.export / m2cnn_tf.backends: deployable files and the runtimes behind them.

Reference: the Keras model itself (`model(x, training=False)`, through the Keras backend) on
held-out images. The tiny model is trained cheaply but for real: one training-mode pass sets
every BatchNorm's statistics to the training images' (momentum 0), then both heads are fitted
by ridge regression on the pooled features, so the scores spread over all five grades (a few
SGD steps at this size leave BN statistics behind and every score on one grade, which would
let the int8 agreement test pass whatever the quantisation did).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _subprocess import run_json_script
from _tfrecords import grade_images, write_split
from synthetic_fundus import fundus

from m2cnn_tf import backends, checkpoints, cli, export
from m2cnn_tf.checkpoints import save_checkpoint, stage_dir
from m2cnn_tf.commands import evaluate as evaluate_cmd
from m2cnn_tf.commands import export as command
from m2cnn_tf.commands import predict as predict_cmd
from m2cnn_tf.errors import UsageError
from m2cnn_tf.metrics import scores_to_grades
from m2cnn_tf.model import POOL, build_m2cnn

SIZE = 96
N_TRAIN, N_TEST = 48, 40
PARAMS = {"alpha": 3.0, "beta": -3.0, "rho": 6.0, "gamma": 128.0, "base_size": 256}


def _fit_heads(model: keras.Model, images: np.ndarray, grades: np.ndarray) -> None:
    """Ridge-regress the score head on the grades and the logits head on one-hot grades."""
    features = keras.Model(model.input, model.get_layer(POOL).output)(images).numpy()
    mean = features.mean(0)
    centred = features - mean
    gram = centred.T @ centred + 1e-2 * np.eye(centred.shape[1])
    for name, target in (("score", grades[:, None] * 1.0), ("logits", 4.0 * np.eye(5)[grades])):
        kernel = np.linalg.solve(gram, centred.T @ (target - target.mean(0)))
        bias = target.mean(0) - mean @ kernel
        model.get_layer(name).set_weights([kernel.astype("float32"), bias.astype("float32")])


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    grades = np.arange(N_TRAIN + N_TEST) % 5
    images = grade_images(grades, SIZE, seed=3)
    data = root / "data"
    write_split(data, SIZE, "train", images[:N_TRAIN], grades[:N_TRAIN])
    write_split(data, SIZE, "test", images[N_TRAIN:], grades[N_TRAIN:])
    (data / "manifest.json").write_text(json.dumps({"preprocess": PARAMS}))
    scaled = images.astype("float32") / 127.5 - 1.0
    keras.utils.set_random_seed(7)
    model = build_m2cnn(SIZE, preset="tiny", bn_momentum=0.0)
    model(scaled[:N_TRAIN], training=True)  # BN moving statistics := the training images'
    _fit_heads(model, scaled[:N_TRAIN], grades[:N_TRAIN])
    model_dir = root / "model"
    save_checkpoint(
        model, stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE, "preset": "tiny"}
    )
    (stage_dir(model_dir, 1) / "config.json").write_text(json.dumps({"data": str(data)}))
    keras_backend = backends.load_backend("keras", model_dir=model_dir, stage=1)
    return {
        "root": root,
        "data": data,
        "model_dir": model_dir,
        "images": scaled[N_TRAIN:],
        "keras": keras_backend.predict(scaled[N_TRAIN:]),
        "exports": {},
    }


def _export(stage, quantize: str) -> tuple[Path, str]:
    """The stage's LiteRT export with `quantize` through the CLI, made once per module."""
    if quantize not in stage["exports"]:
        args = [f"--model-dir={stage['model_dir']}", "--stage=1", "--format=litert"]
        args.append(f"--quantize={quantize}")
        if quantize == "int8":
            args.append(f"--calibration={stage['data']}")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert command.run(["export.py", *args]) == 0
        path = backends.default_litert_path(stage["model_dir"], 1, quantize)
        stage["exports"][quantize] = (path, err.getvalue())
    return stage["exports"][quantize]


def _litert(stage, quantize: str, **kw) -> backends.Backend:
    path, _ = _export(stage, quantize)
    return backends.load_backend(
        "litert", model_dir=stage["model_dir"], stage=1, litert_model=path, **kw
    )


def _one_line_error(capsys, args: list[str]) -> str:
    assert command.run(["export.py", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("export.py: error: "), err
    return err


# ---------------------------------------------------------------------------------------------
# Accuracy against the Keras model


@pytest.mark.parametrize("quantize, tolerance", [("none", 1e-4), ("float16", 1e-2)])
def test_float_exports_give_the_keras_scores_within_tolerance(stage, quantize, tolerance):
    out = _litert(stage, quantize).predict(stage["images"])
    diff = np.abs(out["score"] - stage["keras"]["score"])
    print(f"{quantize}: score max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert out["score"].shape == (N_TEST, 1) and out["logits"].shape == (N_TEST, 5)
    assert diff.max() <= tolerance


@pytest.mark.parametrize("quantize", ["int8", "dynamic"])
def test_integer_exports_give_the_keras_grade_on_at_least_90_percent(stage, quantize):
    reference = scores_to_grades(stage["keras"]["score"][:, 0])
    assert len(set(reference.tolist())) >= 4  # the scores span the cut points: agreement can fail
    out = _litert(stage, quantize).predict(stage["images"])
    grades = scores_to_grades(out["score"][:, 0])
    agree = float(np.mean(grades == reference))
    mad = float(np.mean(np.abs(out["score"] - stage["keras"]["score"])))
    print(f"{quantize}: grades equal on {agree:.0%} of {N_TEST}, score mean |diff| {mad:.4f}")
    assert agree >= 0.9


def test_litert_answers_any_batch_size_alike(stage):
    backend = _litert(stage, "int8")
    whole = backend.predict(stage["images"])
    one = backend.predict(stage["images"][:1])
    seven = backend.predict(stage["images"][3:10])
    np.testing.assert_allclose(one["score"], whole["score"][:1], atol=1e-6)
    np.testing.assert_allclose(seven["logits"], whole["logits"][3:10], atol=1e-6)


def test_savedmodel_export_serves_the_keras_outputs_with_its_sidecar_inside(stage, capsys):
    out = stage["root"] / "served"
    assert command.run(["export.py", f"--model-dir={stage['model_dir']}", "--stage=1",
                        "--format=savedmodel", f"--out={out}"]) == 0  # fmt: skip
    assert "savedmodel model written" in capsys.readouterr().out
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    got = serve(image=tf.constant(stage["images"]))
    np.testing.assert_allclose(got["score"].numpy(), stage["keras"]["score"], atol=1e-5)
    sidecar = checkpoints.read_sidecar(out)
    assert (sidecar["format"], sidecar["quantization"]) == ("savedmodel", "none")
    assert sidecar["file"] is None and sidecar["image_size"] == SIZE


# ---------------------------------------------------------------------------------------------
# predict.py and evaluate.py with --backend litert


def _predict_csv(stage, photos: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    argv = ["predict.py", f"--model-dir={stage['model_dir']}", "--stage=1", f"--out={out}"]
    assert predict_cmd.run([*argv, *extra, str(photos)]) == 0
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predict_with_the_float32_litert_backend_writes_the_keras_csv(stage, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        cv2.imwrite(str(photos / f"{i}.png"), fundus(180, 240, seed=i))
    path, _ = _export(stage, "none")
    keras_rows = _predict_csv(stage, photos, tmp_path / "keras.csv")
    lite_rows = _predict_csv(
        stage, photos, tmp_path / "litert.csv", "--backend=litert", f"--litert-model={path}",
        f"--gradcam={tmp_path / 'cams'}",
    )  # fmt: skip
    assert [r["path"] for r in lite_rows] == [r["path"] for r in keras_rows]
    for k, lite in zip(keras_rows, lite_rows, strict=True):
        assert lite["grade"] == k["grade"] and lite["grade_prob"] == k["grade_prob"]
        for key in ("score", "p0", "p1", "p2", "p3", "p4"):
            assert abs(float(lite[key]) - float(k[key])) <= 1e-4
    # Grad-CAM needs gradients: the Keras model is loaded for it.
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 6


def test_predict_with_the_litert_backend_never_imports_tensorflow(stage, tmp_path):
    """A fresh process: the LiteRT path of predict.py grades without loading TensorFlow (or
    Keras), which alone takes seconds to import; the same run with Keras does load it."""
    cv2.imwrite(str(tmp_path / "eye.png"), fundus(180, 240, seed=0))
    path, _ = _export(stage, "int8")
    ran = {}
    for name, extra in (("litert", ["--backend=litert", f"--litert-model={path}"]), ("keras", [])):
        argv = ["predict.py", f"--model-dir={stage['model_dir']}", "--stage=1", *extra,
                f"--out={tmp_path / name}.csv", str(tmp_path / "eye.png")]  # fmt: skip
        ran[name] = run_json_script(
            "import json, sys\n"
            "from m2cnn_tf.commands import predict\n"
            f"code = predict.run({argv!r})\n"
            "print(json.dumps({'code': code, 'tf': 'tensorflow' in sys.modules,"
            " 'keras': 'keras' in sys.modules}))",
            timeout=300,
        )
        assert ran[name]["code"] == 0, name
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open(newline="")))
        assert len(rows) == 1 and rows[0]["error"] == "" and rows[0]["grade"] != ""
    assert ran["litert"] == {"code": 0, "tf": False, "keras": False}
    assert ran["keras"] == {"code": 0, "tf": True, "keras": True}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_evaluate_with_the_litert_backend_reports_beside_the_keras_kappa(stage, tmp_path, quantize):
    path, _ = _export(stage, quantize)
    reports = {}
    for name, extra in (("keras", []), (quantize, ["--backend=litert", f"--litert-model={path}"])):
        out = tmp_path / name
        argv = [
            "evaluate.py",
            f"--model-dir={stage['model_dir']}",
            "--stage=1",
            f"--data={stage['data']}",
            "--split=test",
            f"--out={out}",
            "--bootstrap=20",
        ]
        assert evaluate_cmd.run([*argv, *extra]) == 0  # fmt: skip
        reports[name] = json.loads((out / "report.json").read_text())
    keras_kappa, lite_kappa = (reports[n]["scores"]["kappa"] for n in ("keras", quantize))
    print(f"test kappa from scores: keras {keras_kappa:.4f}, litert {quantize} {lite_kappa:.4f}")
    assert reports[quantize]["backend"]["backend"] == "litert"
    assert reports[quantize]["backend"]["quantization"] == quantize
    assert reports[quantize]["n_images"] == reports["keras"]["n_images"] == N_TEST
    if quantize == "none":  # float32: the same grades, so the same kappa
        assert lite_kappa == pytest.approx(keras_kappa, abs=1e-9)
    else:
        assert abs(lite_kappa - keras_kappa) <= 0.1


# ---------------------------------------------------------------------------------------------
# The sidecar and the default file


def test_sidecar_records_source_stage_size_quantisation_calibration_and_preprocessing(stage):
    path, log = _export(stage, "int8")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    best = stage_dir(stage["model_dir"], 1) / "best.keras"
    assert sidecar["source_checkpoint"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert sidecar["file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (sidecar["stage"], sidecar["image_size"], sidecar["quantization"]) == (1, SIZE, "int8")
    # Fewer records than wanted: all of them are used, and the export says how many.
    assert sidecar["calibration"]["count"] == N_TRAIN
    assert sidecar["calibration"]["requested"] == export.DEFAULT_CALIBRATION
    assert f"calibrating on all {N_TRAIN} train records at {SIZE} px" in log
    assert {k: sidecar["preprocessing"]["params"][k] for k in PARAMS} == PARAMS
    assert sidecar["preprocessing"]["source"].endswith("manifest.json")


def _stand_in_model() -> keras.Model:
    """A network of M²CNN's interface (input `image`, heads `logits` and `score` after
    `avg_pool`) small enough to convert in a second: what is tested here is the calibration."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
    heads = {"logits": keras.layers.Dense(5, name="logits")(x)}
    heads["score"] = keras.layers.Dense(1, name="score")(x)
    return keras.Model(inputs, heads)


def test_calibration_count_is_how_many_train_records_calibrate_int8(stage, tmp_path, monkeypatch):
    """--calibration-count 20 of the 48 train records: 20 images reach the converter, and the
    sidecar says 20; 100 asked of 48: all 48, the sidecar says so (and that 100 were asked),
    and so does the export's log."""
    model_dir = tmp_path / "model"
    save_checkpoint(_stand_in_model(), stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE})
    fed: list[tuple] = []
    original = export.representative_images

    def counted(chosen, log=print):
        generate = original(chosen, log)

        def counting():
            for item in generate():
                fed.append(item[0].shape)
                yield item

        return counting

    monkeypatch.setattr(export, "representative_images", counted)
    for asked, used in ((20, 20), (100, N_TRAIN)):
        fed.clear()
        out = tmp_path / f"int8_{asked}.tflite"
        args = [f"--model-dir={model_dir}", "--stage=1", "--format=litert", "--quantize=int8",
                f"--calibration={stage['data']}", f"--calibration-count={asked}",
                f"--out={out}"]  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert command.run(["export.py", *args]) == 0, err.getvalue()
        assert fed == [(1, SIZE, SIZE, 3)] * used
        calibration = checkpoints.read_sidecar(out)["calibration"]
        assert (calibration["count"], calibration["requested"]) == (used, asked)
        said = f"calibrating on {'all ' if used < asked else ''}{used} train records at {SIZE} px"
        assert said + (f" ({asked} wanted)" if used < asked else "") in err.getvalue()


def test_litert_backend_without_a_file_takes_the_stages_fastest_export(stage):
    _export(stage, "none")
    _export(stage, "int8")
    backend = backends.load_backend("litert", model_dir=stage["model_dir"], stage=1, threads=1)
    assert backend.describe() == {
        "backend": "litert",
        "model": str(checkpoints.export_path(stage["model_dir"], 1, "litert", "int8")),
        "quantization": "int8",
        "threads": 1,
    }
    assert backend.image_size == SIZE


# ---------------------------------------------------------------------------------------------
# Bad model files: one line, UsageError (exit 2)


def _refused(match: str, **kw) -> str:
    with pytest.raises(UsageError, match=match) as info:
        backends.load_backend("litert", **kw)
    line = cli.error_line("predict.py", info.value)
    assert "\n" not in line
    return line


def _copy_export(stage, quantize: str, folder: Path) -> Path:
    path, _ = _export(stage, quantize)
    folder.mkdir(parents=True, exist_ok=True)
    for f in (path, path.with_suffix(".json")):
        shutil.copy(f, folder / f.name)
    return folder / path.name


def test_missing_model_file_or_export_or_sidecar_is_refused(stage, tmp_path):
    _refused("does not exist", litert_model=tmp_path / "nothing.tflite")
    line = _refused("no LiteRT export of stage 2", model_dir=stage["model_dir"], stage=2)
    assert line.startswith("predict.py: error: --litert-model: ")
    copy = _copy_export(stage, "int8", tmp_path)
    copy.with_suffix(".json").unlink()
    _refused("has no sidecar model_int8.json", litert_model=copy)


def test_corrupt_model_file_is_refused(stage, tmp_path):
    copy = _copy_export(stage, "int8", tmp_path)
    copy.write_bytes(copy.read_bytes()[: 1 << 16])  # cut short
    _refused("does not match its sidecar", litert_model=copy)
    # Garbage that its sidecar vouches for still cannot run.
    sidecar = json.loads(copy.with_suffix(".json").read_text())
    copy.write_bytes(b"not a flatbuffer" * 64)
    sidecar["file"] = checkpoints.file_identity(copy)
    copy.with_suffix(".json").write_text(json.dumps(sidecar))
    _refused("cannot run on LiteRT", litert_model=copy)


def test_model_for_another_size_than_the_data_is_refused(stage):
    _refused(f"takes {SIZE} px images, the data is 128 px",
             model_dir=stage["model_dir"], stage=1, image_size=128)  # fmt: skip
    backend = _litert(stage, "int8")
    with pytest.raises(UsageError, match=rf"takes \({SIZE}, {SIZE}, 3\) images"):
        backend.predict(np.zeros((2, 128, 128, 3), np.float32))
    with pytest.raises(UsageError, match="takes 96 px images, the data is 128 px"):
        backends.load_backend("keras", model_dir=stage["model_dir"], stage=1, image_size=128)


def test_sidecar_that_does_not_match_the_claimed_checkpoint_is_refused(stage, tmp_path):
    model_dir = tmp_path / "model"
    best = stage_dir(stage["model_dir"], 1) / "best.keras"
    shutil.copytree(best.parent, stage_dir(model_dir, 1), ignore=shutil.ignore_patterns("export"))
    copy = _copy_export(stage, "int8", stage_dir(model_dir, 1) / "export")
    # A copy of the same checkpoint (new mtime, same bytes) is the same model.
    assert backends.load_backend("litert", model_dir=model_dir, stage=1).image_size == SIZE
    _refused("exported from stage 1, not 2", model_dir=model_dir, stage=2, litert_model=copy)
    other = build_m2cnn(SIZE, preset="tiny")
    save_checkpoint(other, stage_dir(model_dir, 1), {"stage": 1, "resolution": SIZE})
    _refused("does not match the checkpoint it claims", model_dir=model_dir, stage=1)


def test_bad_backend_or_thread_count_is_refused(stage):
    with pytest.raises(UsageError, match="backend must be one of keras, litert"):
        backends.load_backend("onnx", model_dir=stage["model_dir"], stage=1)
    _refused("must be at least 1", model_dir=stage["model_dir"], stage=1, threads=0)


# ---------------------------------------------------------------------------------------------
# The command line: bad requests and calibration data


def test_help_and_a_bad_flag_value(capsys):
    assert command.run(["export.py", "--help"]) == 0
    assert "--calibration-count" in capsys.readouterr().out
    assert "--quantize" in _one_line_error(capsys, ["--quantize=int4"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format=litert", "--quantize=int8"], "--calibration: int8 needs calibration data"),
        (["--format=litert", "--quantize=float16", "--calibration=x"], "used by int8 only"),
        (["--format=savedmodel", "--quantize=int8"], "--quantize: a SavedModel is float32"),
        (["--format=litert", "--out=m.json"], "--out: m.json would be taken for a sidecar"),
        (["--quantize=none"], "--format: is required"),
    ],
)
def test_bad_requests_are_one_line_usage_errors(capsys, stage, extra, message):
    args = [f"--model-dir={stage['model_dir']}", "--stage=1", *extra]
    assert message in _one_line_error(capsys, args)


def test_missing_checkpoint_is_a_usage_error(capsys, tmp_path):
    err = _one_line_error(capsys, [f"--model-dir={tmp_path}", "--stage=2", "--format=litert"])
    assert "no checkpoint for stage 2" in err


def _int8_with(capsys, stage, data: Path, *extra: str) -> str:
    args = [f"--model-dir={stage['model_dir']}", "--stage=1", "--format=litert",
            "--quantize=int8", f"--calibration={data}", *extra]  # fmt: skip
    return _one_line_error(capsys, args)


def test_calibration_data_of_another_size_says_which_and_how_many(capsys, stage, tmp_path):
    write_split(tmp_path, 64, "train", grade_images([0] * 20, 64), [0] * 20)
    err = _int8_with(capsys, stage, tmp_path)
    assert f"no train records at {SIZE} px" in err and "64 px: 20 train records" in err
    # Records of another size filed under the model's.
    (tmp_path / "64").rename(tmp_path / str(SIZE))
    assert f"20 of 20 calibration records in {tmp_path}/{SIZE} are 64x64 px" in _int8_with(
        capsys, stage, tmp_path
    )


def test_too_few_calibration_records_are_refused_naming_the_minimum(capsys, stage, tmp_path):
    n = export.MIN_CALIBRATION - 1
    write_split(tmp_path, SIZE, "train", grade_images([1] * n, SIZE), [1] * n)
    err = _int8_with(capsys, stage, tmp_path)
    assert f"only {n} train records at {SIZE} px" in err
    assert f"needs at least {export.MIN_CALIBRATION}" in err
    low = _int8_with(capsys, stage, tmp_path, "--calibration-count=4")
    assert f"--calibration-count: at least {export.MIN_CALIBRATION}, got 4" in low
