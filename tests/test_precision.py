"""--precision float32|bfloat16: the Keras backend's precision (m2cnn_tf.backends), and the
commands that take it (predict.py, evaluate.py, serve.py).

Reference: the float32 Keras model itself. The CPU's flags are read from a /proc/cpuinfo written
here, so the refusal is tested on any machine, with or without bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from _subprocess import run_json_script
from synthetic_fundus import fundus

from m2cnn_tf import backends, cli
from m2cnn_tf.checkpoints import save_checkpoint, stage_dir
from m2cnn_tf.commands import evaluate as evaluate_cmd
from m2cnn_tf.commands import predict as predict_cmd
from m2cnn_tf.errors import UsageError
from m2cnn_tf.model import HEAD_LAYERS, POOL, build_m2cnn

SIZE = 96


def _cpuinfo(folder: Path, *extra_flags: str) -> Path:
    """A two-core /proc/cpuinfo whose flags are AVX-512 with VNNI, plus `extra_flags`."""
    flags = " ".join(["fpu", "sse2", "avx2", "avx512f", "avx512_vnni", *extra_flags])
    path = folder / f"cpuinfo-{'-'.join(extra_flags) or 'plain'}"
    path.write_text("".join(f"processor\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2)))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny stage-1 model whose BatchNorms hold real statistics (one training-mode pass)."""
    root = tmp_path_factory.mktemp("precision")
    keras.utils.set_random_seed(3)
    model = build_m2cnn(SIZE, preset="tiny", bn_momentum=0.0)
    images = np.random.default_rng(0).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype("float32")
    model(images, training=True)
    save_checkpoint(model, stage_dir(root, 1), {"stage": 1, "resolution": SIZE, "preset": "tiny"})
    return root


def test_bfloat16_flags_are_read_from_cpuinfo(tmp_path):
    assert backends.cpu_bfloat16_flags(_cpuinfo(tmp_path)) == []
    assert backends.cpu_bfloat16_flags(_cpuinfo(tmp_path, "avx512_bf16")) == ["avx512_bf16"]
    assert backends.cpu_bfloat16_flags(_cpuinfo(tmp_path, "amx_bf16")) == ["amx_bf16"]
    assert backends.cpu_bfloat16_flags(tmp_path / "absent") is None


def test_bfloat16_is_refused_where_the_cpu_lacks_it_unless_forced(tmp_path):
    plain = _cpuinfo(tmp_path)
    with pytest.raises(UsageError, match="lists neither avx512_bf16 nor amx_bf16") as info:
        backends.check_precision("bfloat16", cpuinfo=plain)
    assert info.value.setting == "precision"
    line = cli.error_line("predict.py", info.value)
    assert line.startswith("predict.py: error: --precision: bfloat16 needs") and "\n" not in line
    with pytest.raises(UsageError, match="cannot be read"):
        backends.check_precision("bfloat16", cpuinfo=tmp_path / "absent")
    backends.check_precision("bfloat16", cpuinfo=plain, force=True)
    backends.check_precision("bfloat16", cpuinfo=_cpuinfo(tmp_path, "avx512_bf16"))
    backends.check_precision("float32", cpuinfo=plain)
    with pytest.raises(UsageError, match="must be one of float32, bfloat16, got 'float16'"):
        backends.check_precision("float16")


@pytest.mark.slow
def test_bfloat16_model_computes_in_bfloat16_but_the_pooling_and_heads(model_dir):
    model = backends.load_keras(model_dir, 1).model
    clone = backends.bfloat16_model(model)
    policies = {layer.name: layer.dtype_policy.name for layer in clone.layers}
    assert {policies[name] for name in (POOL, *HEAD_LAYERS)} == {"float32"}
    assert policies["conv2d_1a"] == policies["block8_1_conv"] == "mixed_bfloat16"
    assert all(w.dtype == "float32" for w in clone.weights)  # the trained weights, unchanged
    for mine, theirs in zip(clone.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
def test_bfloat16_backend_gives_the_float32_outputs_to_bfloat16_precision(model_dir):
    """Each head is a dot product of 1536 pooled features: bfloat16 features (8-bit mantissa,
    random-sign rounding through the network) move it by a small fraction of the sum of its
    terms' magnitudes, sum |w_i f_i| of the float32 model (on this untrained backbone the
    features move ~10 %, on the demo's trained one the score by 0.01 on average)."""
    images = np.random.default_rng(1).uniform(-1, 1, (6, SIZE, SIZE, 3)).astype("float32")
    f32_backend = backends.load_backend("keras", model_dir=model_dir, stage=1)
    f32 = f32_backend.predict(images)
    b16 = backends.load_backend(
        "keras", model_dir=model_dir, stage=1, precision="bfloat16", force_precision=True
    )
    out = b16.predict(images)
    assert b16.describe()["precision"] == "bfloat16"
    assert out["score"].dtype == out["logits"].dtype == np.float32  # float32 heads
    model = f32_backend.model
    features = keras.Model(model.input, model.get_layer(POOL).output)(images).numpy()
    for key in HEAD_LAYERS:
        kernel = model.get_layer(key).get_weights()[0]
        terms = np.abs(features[:, :, None] * kernel[None]).sum(1)  # (N, outputs)
        ratio = np.abs(out[key] - f32[key]) / terms
        print(f"{key}: |bfloat16 - float32| / sum |w f| at most {ratio.max():.4f}")
        assert 0 < ratio.max() <= 0.03  # it computed in bfloat16, and only that far off


def _one_line(capsys, code: int, prog: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.slow
def test_predict_and_evaluate_refuse_bfloat16_in_one_line_where_the_cpu_lacks_it(
    model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(backends, "CPUINFO", _cpuinfo(tmp_path))
    photo = tmp_path / "eye.png"
    cv2.imwrite(str(photo), fundus(180, 240, seed=0))
    base = [f"--model-dir={model_dir}", "--stage=1"]
    out = tmp_path / "p.csv"
    argv = ["predict.py", *base, f"--out={out}", str(photo)]
    code = predict_cmd.run([*argv[:-1], "--precision=bfloat16", argv[-1]])
    assert "--precision: bfloat16 needs a CPU with native bfloat16" in _one_line(
        capsys, code, "predict.py"
    )
    evaluate = ["evaluate.py", *base, "--data=x", "--split=test", f"--out={tmp_path / 'r'}"]
    code = evaluate_cmd.run([*evaluate, "--precision=bfloat16"])
    assert "--precision: bfloat16 needs" in _one_line(capsys, code, "evaluate.py")
    code = predict_cmd.run(
        ["predict.py", *base, "--backend=litert", "--precision=bfloat16", str(photo)]
    )
    assert "--precision: bfloat16 is a precision of the Keras backend" in _one_line(
        capsys, code, "predict.py"
    )
    # Forced, it runs, and grades the photograph.
    argv = [*base, "--precision=bfloat16", "--force-precision", f"--out={out}", str(photo)]
    assert predict_cmd.run(["predict.py", *argv]) == 0
    assert out.read_text().count("\n") == 2  # header and one row


def test_serve_passes_the_precision_to_the_grader(model_dir, tmp_path):
    """In a fresh process (serve.py would serve, not return, if the precision did not reach
    the model loader): refused in one line on a CPU without bfloat16."""
    fake = _cpuinfo(tmp_path)
    argv = ["serve.py", f"--model-dir={model_dir}", "--stage=1", "--port=0", "--precision=bfloat16"]
    ran = run_json_script(
        "import contextlib, io, json\n"
        "from pathlib import Path\n"
        "from m2cnn_tf import backends\n"
        "from m2cnn_tf.commands import serve\n"
        f"backends.CPUINFO = Path({str(fake)!r})\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    code = serve.run({argv!r})\n"
        "print(json.dumps({'code': code, 'err': err.getvalue()}))",
        timeout=120,
    )
    assert ran["code"] == 2
    lines = ran["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve.py: error: --precision: bfloat16 needs")
