"""Two-learning-rate training (m2cnn_tf.train_step, callbacks, training; train.py): the update
rule, stage transfer, the settings and their flags, the validation schedule, the CLI.

The slower, multi-process checks (resume after kill, distribution, learning) live in
test_training_runs.py.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf
from _tfrecords import grade_images, write_split

from m2cnn_tf import callbacks, checkpoints, config, distribution, training
from m2cnn_tf.commands import config_flags
from m2cnn_tf.commands import train as train_cmd
from m2cnn_tf.config import (
    AugmentConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
)
from m2cnn_tf.errors import Interrupted, UsageError
from m2cnn_tf.model import backbone_layer_names, build_m2cnn
from m2cnn_tf.train_step import TrainingError, TwoRateTrainer, make_optimizer

SIZE = 80


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    grades = [i % 5 for i in range(20)]
    write_split(out, SIZE, "train", grade_images(grades, SIZE, seed=1), grades)
    write_split(out, SIZE, "val", grade_images(grades[:10], SIZE, seed=2), grades[:10])
    return out


def _reference_parts(net, images, grades, weight_decay, training):
    """Eq. (2)-(4) written independently: softmax CE, MSE, wd * Σ‖kernel‖²/2 (tf.nn.l2_loss)."""
    out = net(images, training=training)
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(grades, out["logits"]))
    mse = tf.reduce_mean(tf.square(out["score"][:, 0] - tf.cast(grades, tf.float32)))
    kernels = [v for v in net.trainable_variables if v.path.endswith("/kernel")]
    reg = weight_decay * tf.add_n([tf.nn.l2_loss(k) for k in kernels])
    return {"ce": ce, "mse": mse, "reg": reg}


# Table II's objectives: which of Eq. (2) and (3) each --loss adds to L_reg.
TERMS = {"multitask": ("ce", "mse"), "ce": ("ce",), "mse": ("mse",)}


def _reference_gradients(net, images, grades, weight_decay, loss="multitask"):
    variables = net.trainable_variables
    with tf.GradientTape() as tape:
        parts = _reference_parts(net, images, grades, weight_decay, training=True)
        total = parts["reg"] + tf.add_n([parts[t] for t in TERMS[loss]])
    return {
        v.path: np.zeros(v.shape, "float32") if g is None else g.numpy()
        for v, g in zip(variables, tape.gradient(total, variables), strict=True)
    }


def _one_sgd_step(net, pretrained, *, wd, lr_pre, lr_new, grades, seed, loss="multitask"):
    """One two-rate SGD step on random images: (trainer, reference gradients, weights before)."""
    trainer = TwoRateTrainer(net, pretrained, weight_decay=wd, loss=loss)
    trainer.compile_two_rates(
        make_optimizer("sgd", lr_pre),
        make_optimizer("sgd", lr_new),
        mixed_precision=False,
        jit_compile=False,
    )
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.uniform(-1, 1, (4, 75, 75, 3)), tf.float32)
    grades = tf.constant(grades, tf.int32)
    grads = _reference_gradients(net, images, grades, wd, loss)
    before = {v.path: v.numpy() for v in net.trainable_variables}
    trainer.train_step((images, {"grade": grades}))
    return trainer, grads, before


def test_one_sgd_step_moves_each_variable_by_its_groups_rate_times_its_gradient():
    net = build_m2cnn(75, preset="tiny")
    backbone = backbone_layer_names(net)
    pretrained = backbone[: len(backbone) // 2]  # any split will do; both groups non-empty
    lr_pre, lr_new = 1.0, 0.1
    trainer, grads, before = _one_sgd_step(
        net, pretrained, wd=0.01, lr_pre=lr_pre, lr_new=lr_new, grades=[0, 1, 3, 4], seed=0
    )

    in_pretrained = {v.path for name in pretrained for v in net.get_layer(name).trainable_weights}
    assert 0 < len(in_pretrained) < len(net.trainable_variables)
    for v in net.trainable_variables:
        lr = lr_pre if v.path in in_pretrained else lr_new
        expected = -lr * grads[v.path]
        # The delta is a difference of float32 weights: allow a few ulps of the weights.
        ulps = 4 * np.finfo(np.float32).eps * float(np.abs(before[v.path]).max())
        np.testing.assert_allclose(
            v.numpy() - before[v.path], expected, rtol=1e-3, atol=ulps, err_msg=v.path
        )
    assert trainer.optimizer.iterations.numpy() == 1
    assert trainer.optimizer_new.iterations.numpy() == 1


@pytest.mark.parametrize(
    ("loss", "frozen_head", "trained_head"), [("ce", "score", "logits"), ("mse", "logits", "score")]
)
def test_single_task_step_leaves_the_other_head_to_weight_decay_alone(
    loss, frozen_head, trained_head
):
    net = build_m2cnn(75, preset="tiny")
    pretrained = backbone_layer_names(net)[:10]
    wd, lr = 0.01, 0.1
    _, grads, before = _one_sgd_step(
        net, pretrained, wd=wd, lr_pre=lr, lr_new=lr, grades=[0, 2, 3, 4], seed=1, loss=loss
    )

    frozen = net.get_layer(frozen_head)
    # No task loss reaches the untrained head: its bias stays put, its kernel only decays.
    np.testing.assert_array_equal(frozen.bias.numpy(), before[frozen.bias.path])
    np.testing.assert_allclose(
        frozen.kernel.numpy(), (1 - lr * wd) * before[frozen.kernel.path], rtol=1e-6, atol=1e-9
    )
    trained = net.get_layer(trained_head)
    assert np.abs(trained.bias.numpy() - before[trained.bias.path]).max() > 1e-4
    for v in net.trainable_variables:  # every variable follows this objective's gradient
        ulps = 4 * np.finfo(np.float32).eps * float(np.abs(before[v.path]).max())
        np.testing.assert_allclose(
            v.numpy() - before[v.path], -lr * grads[v.path], rtol=1e-3, atol=ulps, err_msg=v.path
        )


def test_each_loss_mode_optimises_its_parts_of_eq_4_and_logs_all_of_them():
    net = build_m2cnn(75, preset="tiny")
    rng = np.random.default_rng(2)
    images = tf.constant(rng.uniform(-1, 1, (3, 75, 75, 3)), tf.float32)
    grades = tf.constant([1, 0, 4], tf.int32)
    ref = {k: float(v) for k, v in _reference_parts(net, images, grades, 0.02, False).items()}
    assert min(ref.values()) > 0
    for loss, terms in TERMS.items():
        trainer = TwoRateTrainer(net, [], weight_decay=0.02, loss=loss)
        _, parts = trainer._loss(images, grades, training=False)
        for key in ("ce", "mse", "reg"):
            assert float(parts[key]) == pytest.approx(ref[key], rel=1e-5), (loss, key)
        expected = ref["reg"] + sum(ref[t] for t in terms)
        assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5), loss
    with pytest.raises(UsageError, match="unknown loss 'foo'; choose one of multitask, ce, mse"):
        TwoRateTrainer(net, [], weight_decay=0.0, loss="foo")


def test_keep_best_judges_a_ce_run_by_probabilities_and_others_by_scores(tmp_path):
    net = build_m2cnn(75, preset="tiny")
    epochs = [
        {"val_kappa_scores": 0.9, "val_kappa_probs": 0.1},
        {"val_kappa_scores": 0.2, "val_kappa_probs": 0.5},
    ]
    for loss, best_epoch in (("ce", 2), ("mse", 1)):
        directory = tmp_path / loss
        metric = callbacks.best_metric(loss)
        keep = callbacks.KeepBest(
            net, directory, {"loss": loss}, None, True, lambda *_: None, metric
        )
        for epoch, logs in enumerate(epochs):
            keep.on_epoch_end(epoch, logs)
        meta = json.loads((directory / checkpoints.BEST_META).read_text())
        assert (meta["epoch"], meta["best_metric"], meta["loss"]) == (best_epoch, metric, loss)


@pytest.mark.slow
def test_stage_two_without_multi_cell_loads_all_of_stage_one_and_builds_no_cells(tmp_path):
    stage1 = build_m2cnn(SIZE, preset="tiny")
    checkpoints.save_checkpoint(stage1, checkpoints.stage_dir(tmp_path, 1), {"stage": 1})
    config = Config(
        stage=2,
        image_size=352,
        model_dir=str(tmp_path),
        model=ModelConfig(preset="tiny", multi_cell=False),
    )
    net, loaded, _ = training.initialise(config, log=lambda *_: None)
    assert net.input_shape[1] == 352
    assert not [layer.name for layer in net.layers if layer.name.startswith("medium_")]
    assert set(loaded) == {layer.name for layer in net.layers if layer.weights}
    assert config.resolved_multi_cell_path() == "small"
    with_cells = dataclasses.replace(config, model=ModelConfig(preset="tiny"))
    assert with_cells.resolved_multi_cell_path() == "medium"


@pytest.mark.slow
def test_stage_two_loads_stage_one_by_name_and_shape_into_the_lr1_group(tmp_path, capsys):
    stage1 = build_m2cnn(SIZE, preset="tiny")
    rng = np.random.default_rng(3)
    for v in stage1.weights:  # distinctive values, not an initialiser's
        v.assign(rng.normal(size=v.shape).astype("float32"))
    checkpoints.save_checkpoint(stage1, checkpoints.stage_dir(tmp_path, 1), {"stage": 1})

    config = Config(
        stage=2, image_size=448, model_dir=str(tmp_path), model=ModelConfig(preset="tiny")
    )
    net, loaded, origin = training.initialise(config)
    stage1_layers = {layer.name for layer in stage1.layers if layer.weights}
    assert set(loaded) == stage1_layers  # every stage-1 layer, heads included, carries over
    for name in stage1_layers:
        for a, b in zip(net.get_layer(name).weights, stage1.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    new_layers = {layer.name for layer in net.layers if layer.weights} - stage1_layers
    assert new_layers and all(n.startswith("medium_") for n in new_layers)

    trainer = TwoRateTrainer(net, loaded, weight_decay=4e-5)
    old, new = trainer.groups()
    assert {v.path for v in old} == {
        v.path for n in stage1_layers for v in net.get_layer(n).trainable_weights
    }
    assert {v.path for v in new} == {
        v.path for n in new_layers for v in net.get_layer(n).trainable_weights
    }
    n_loaded = sum(len(stage1.get_layer(n).weights) for n in stage1_layers)
    printed = capsys.readouterr().out
    assert f"init: {n_loaded} variables" in printed
    assert f"{len(net.weights) - n_loaded} variables new" in printed
    assert "stage1/best.keras" in origin


BASE = ("--preset", "tiny", "--weights", "none", "--image-size", str(SIZE), "--batch-size", "4")
RUN = ("--stage", "1", "--data", "{data}", "--model-dir", "{dir}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--stage"),
        (("--stage", "4", "--data", "{data}", "--model-dir", "{dir}"), "--stage"),
        ((*RUN, "--bogus"), "bogus"),
        ((*RUN, "--loss", "foo"), "--loss"),
        (("--stage", "1", "--data", "/nonexistent", "--model-dir", "{dir}"), "not a directory"),
        ((*RUN, *BASE, "--batch-size", "0"), "--batch-size: batch size must be positive, got 0"),
        ((*RUN, *BASE, "--validation-freq", "0"), "--validation-freq: validation freq must be"),
        ((*RUN, *BASE, "--image-size", "64"), "--image-size: image size must be at least 75"),
        ((*RUN, *BASE, "--image-size", "224"), "--image-size: no 224 px records"),
        ((*RUN, *BASE, "--batch-size", "64"), "--batch-size: batch size 64 is larger than the"),
        (("--stage", "2", "--data", "{data}", "--model-dir", "{dir}", *BASE), "no checkpoint for"),
        ((*RUN, *BASE, "--weights", "/no.h5"), "--weights: weights file not found"),
        ((*RUN, *BASE, "--preset", "nano", "--weights", "imagenet"), "--weights: the nano preset"),
        ((*RUN, "--augment=maybe"), "--augment"),
        ((*RUN, "--augment", "maybe"), "unexpected arguments: maybe"),
        # `--augment none` parses (the batch is what is wrong here), and so do the old forms.
        ((*RUN, *BASE, "--augment", "none", "--batch-size", "64"), "batch size 64 is larger"),
        ((*RUN, *BASE, "--noaugment", "--batch-size", "64"), "batch size 64 is larger"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(capsys, tmp_path, records_dir, args, message):
    args = [a.format(data=records_dir, dir=tmp_path) for a in args]
    code = train_cmd.run(["train.py", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    assert message in err


def _config(records_dir, model_dir, **optim) -> Config:
    """A tiny, seeded, unaugmented stage-1 run on the 80 px records."""
    return Config(
        stage=1,
        image_size=SIZE,
        data=str(records_dir),
        model_dir=str(model_dir),
        model=ModelConfig(preset="tiny", weights="none"),
        augment=AugmentConfig(enabled=False),
        optim=OptimConfig(**{"epochs": 1, "batch_size": 4, **optim}),
        runtime=RuntimeConfig(seed=0),
    )


@pytest.mark.slow
def test_nan_loss_stops_training_naming_the_step(tmp_path, records_dir):
    config = _config(records_dir, tmp_path, optimizer="sgd", lr_new=1e35, steps_per_epoch=4)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step [2-4] ") as err:
        training.run(config, log=lambda *_: None)
    assert "--" not in str(err.value)
    assert not (tmp_path / "stage1" / "best.keras").exists()


def test_mixed_precision_step_updates_both_groups_and_skips_an_overflowing_step():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores float32
    net = build_m2cnn(75, preset="tiny")
    pretrained = backbone_layer_names(net)[:10]
    trainer = TwoRateTrainer(net, pretrained, weight_decay=4e-5)
    trainer.compile_two_rates(
        make_optimizer("sgd", 0.1),
        make_optimizer("sgd", 0.01),
        mixed_precision=True,
        jit_compile=False,
    )
    rng = np.random.default_rng(0)
    batch = (
        tf.constant(rng.uniform(-1, 1, (4, 75, 75, 3)), tf.float32),
        {"grade": tf.constant([0, 1, 3, 4], tf.int32)},
    )
    old, new = trainer.groups()
    for opt in (trainer.optimizer, trainer.optimizer_new):
        opt.dynamic_scale.assign(1.0)  # a random net's float16 gradients overflow at 2**15
    first = [v.numpy() for v in old + new]
    trainer.train_step(batch)
    moved = [not np.array_equal(v.numpy(), f) for v, f in zip(old + new, first, strict=True)]
    assert any(moved[: len(old)]) and any(moved[len(old) :])
    assert all(np.isfinite(v.numpy()).all() for v in old + new)

    # A loss scale so large that the scaled loss overflows: no variable may change, and both
    # scales halve for the next step.
    for opt in (trainer.optimizer, trainer.optimizer_new):
        opt.dynamic_scale.assign(3e38)
    second = [v.numpy() for v in old + new]
    trainer.train_step(batch)
    for v, s in zip(old + new, second, strict=True):
        np.testing.assert_array_equal(v.numpy(), s)
    for opt in (trainer.optimizer, trainer.optimizer_new):
        assert float(opt.dynamic_scale.numpy()) == pytest.approx(1.5e38, rel=1e-6)


def test_out_of_memory_stops_in_one_line_suggesting_a_smaller_batch_size(
    tmp_path, records_dir, monkeypatch, capsys
):
    """The line docs/training.md shows under "Failures", as train.py prints it."""

    def oom(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(TwoRateTrainer, "fit", oom)
    argv = ["train.py", "--stage=1", f"--data={records_dir}", f"--model-dir={tmp_path}"]
    argv += ["--image-size=80", "--preset=tiny", "--weights=none", "--batch-size=8"]
    assert train_cmd.run(argv) == 1
    assert capsys.readouterr().err.strip() == (
        "train.py: error: --batch-size: out of memory at batch size 8; try a smaller one (e.g. 4)"
    )


def test_ctrl_c_takes_effect_at_the_next_batch_and_a_second_one_at_once():
    callback = callbacks.DeferInterrupt()
    previous = signal.getsignal(signal.SIGINT)
    callback.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised: the step goes on
        assert callback.pending
        with pytest.raises(KeyboardInterrupt):
            callback.on_train_batch_begin(1)
        assert signal.getsignal(signal.SIGINT) is previous
        callback.install()
        with pytest.raises(KeyboardInterrupt):  # the impatient second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 30  # the handler runs at once; this guards a hang
            while time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        callback.restore()
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.slow
def test_a_ctrl_c_during_the_last_step_is_reported_once_the_stage_is_complete(
    tmp_path, records_dir, monkeypatch
):
    """No batch follows the last one, so the deferred Ctrl-C used to be dropped and the run (or
    the whole reproduction) went on."""

    class CtrlCInLastStep(callbacks.DeferInterrupt):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:  # the second and last step of the only epoch
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "DeferInterrupt", CtrlCInLastStep)
    result = training.run(_config(records_dir, tmp_path, steps_per_epoch=2), log=lambda *_: None)
    assert result["interrupted"]
    assert (tmp_path / "stage1" / "last.keras").is_file()
    assert (tmp_path / "stage1" / "best.keras").is_file()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, records_dir) -> Path:
    """A stage 1 of one epoch (one step), for runs carried on from it."""
    out = tmp_path_factory.mktemp("one_epoch")
    training.run(_config(records_dir, out, steps_per_epoch=1), log=lambda *_: None)
    return out


@pytest.mark.parametrize("ctrl_c", [1, 2], ids=["once", "twice"])
@pytest.mark.slow
def test_a_ctrl_c_as_a_resumed_fit_builds_its_callbacks_keeps_the_state_it_resumes_from(
    tmp_path, records_dir, one_epoch_run, monkeypatch, ctrl_c
):
    """A run carried on for more epochs (reproduce's longer Fig. 4 runs), stopped as Keras's
    fit builds its callbacks: TensorBoard's set_model writes its first file there, before the
    backup's. Once: it waits for the first epoch, and the backup still says epoch 1 (it used to
    record Keras's initial 0, so the resumed run trained every epoch again; and with the handler
    installed in on_train_begin the Ctrl-C was raised at once and saving a backup without a
    model ended in a traceback). Twice: it stops at once, and the backup on disk is kept."""
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    backup = tmp_path / "stage1" / "backup"
    before = {p.name: p.read_bytes() for p in backup.rglob("*") if p.is_file()}

    class CtrlCInSetModel(callbacks.TensorBoard):
        def set_model(self, model):
            super().set_model(model)
            for _ in range(ctrl_c):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "TensorBoard", CtrlCInSetModel)
    config = _config(records_dir, tmp_path, steps_per_epoch=1, epochs=3)
    said = "state saved in" if ctrl_c == 1 else "before its first step"
    with pytest.raises(Interrupted, match=said):
        training.run(config, log=lambda *_: None)
    meta = json.loads((backup / "training_metadata.json").read_text())
    assert (meta["epoch"], meta["steps"]) == (1, 1)
    if ctrl_c == 2:
        assert {p.name: p.read_bytes() for p in backup.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_last_keras_is_the_final_weights_whether_copied_from_best_or_saved(tmp_path):
    """KeepLast copies best.keras when KeepBest has just saved the same (final) epoch, and
    saves the model itself when the best is an earlier epoch: either way last.keras holds the
    weights after the final epoch, with last.json's own epoch."""
    import keras

    inputs = keras.Input((2,))
    net = keras.Model(inputs, keras.layers.Dense(1, name="d")(inputs))
    meta = {"stage": 1}
    for final_val, copied in ((0.9, True), (0.1, False)):  # the final epoch best, or not
        folder = tmp_path / str(copied)
        keep_best = callbacks.KeepBest(net, folder, meta, None, True, log=lambda *_: None)
        keep_last = callbacks.KeepLast(net, folder, meta, 2, True, keep_best=keep_best)
        for epoch, val in enumerate((0.5, final_val)):
            net.get_layer("d").set_weights([np.full((2, 1), epoch + 1.0), np.zeros(1)])
            for callback in (keep_best, keep_last):
                callback.on_epoch_end(epoch, {"val_kappa_scores": val})
        best, last = (folder / f"{which}.keras" for which in ("best", "last"))
        assert (best.read_bytes() == last.read_bytes()) is copied
        np.testing.assert_array_equal(checkpoints.load_model(last).get_weights()[0], 2.0)
        assert json.loads((folder / "last.json").read_text())["epoch"] == 2
        assert json.loads((folder / "best.json").read_text())["epoch"] == (2 if copied else 1)


# ---------------------------------------------------------------------------------------------
# Settings: one declaration per field, flags derived from it, config.json old and new

# train.py's documented flags and their defaults: a contract, written out here by hand.
DOCUMENTED_FLAGS = {
    "stage": None,
    "data": None,
    "model-dir": None,
    "image-size": None,
    "weights": "imagenet",
    "init": "",
    "epochs": 30,
    "steps-per-epoch": None,
    "batch-size": 32,
    "preset": "paper",
    "loss": "multitask",
    "multi-cell": True,
    "lr-pretrained": 1e-4,
    "lr-new": 1e-3,
    "optimizer": "adam",
    "weight-decay": 4e-5,
    "bn-momentum": None,
    "mixed-precision": False,
    "xla": False,
    "strategy": "default",
    "seed": None,
    "balance": False,
    "resume": True,
    "augment": True,
    "augment-on": "step",
    "backup-steps": None,
    "validation-freq": 1,
}


def test_documented_flags_keep_their_names_and_defaults():
    flags = train_cmd.FLAGS
    for name, default in DOCUMENTED_FLAGS.items():
        assert name in flags, name
        assert flags[name].default == default, name
    assert flags["stage"].parser.enum_values == ["1", "2", "3"]
    assert flags["optimizer"].parser.enum_values == ["adam", "sgd", "momentum", "rmsprop"]
    assert flags["strategy"].parser.enum_values == ["default", "mirrored", "multiworker"]
    assert flags["loss"].parser.enum_values == ["multitask", "ce", "mse"]
    assert flags["augment-on"].parser.enum_values == ["step", "pipeline"]
    assert flags["preset"].parser.enum_values == ["paper", "tiny", "nano"]


def test_every_setting_but_the_class_count_is_a_flag_with_its_help():
    leaves = list(config.leaf_fields())
    keys = [config.flat_key(f) for _, f in leaves]
    assert len(keys) == len(set(keys))  # one flat name (flag, old JSON key) per setting
    flagged = {k.replace("_", "-") for k, (_, f) in zip(keys, leaves, strict=True)}
    assert flagged - {"num-classes"} == set(train_cmd.FLAGS) - {"num-classes"}
    assert "num-classes" not in train_cmd.FLAGS
    for _, f in leaves:
        assert f.metadata["help"].strip(), f.name


def test_parsed_flags_land_in_their_sections(tmp_path):
    argv = [
        "train.py",
        "--stage=2",
        f"--data={tmp_path}",
        "--model-dir=m",
        "--loss=mse",
        "--nomulti-cell",
        "--noaugment",
        "--augment-on=pipeline",
        "--balance",
        "--seed=7",
        "--batch-size=8",
        "--validation-freq=3",
        "--rotation=30",
    ]
    train_cmd.FLAGS.unparse_flags()
    train_cmd.FLAGS(argv)
    try:
        got = config_flags.from_flags(train_cmd.FLAGS)
    finally:
        train_cmd.FLAGS.unparse_flags()
    assert (got.stage, got.data, got.model_dir, got.image_size) == (2, str(tmp_path), "m", None)
    assert got.model == ModelConfig(multi_cell=False)
    assert got.input == DataConfig(balance=True)
    assert got.augment == AugmentConfig(enabled=False, on="pipeline", rotation=30.0)
    assert got.optim == OptimConfig(loss="mse", batch_size=8, validation_freq=3)
    assert got.runtime == RuntimeConfig(seed=7)


@pytest.mark.parametrize(
    ("args", "enabled"),
    [
        (["--augment", "none"], False),
        (["--augment=none"], False),
        (["--augment", "NONE"], False),
        (["--noaugment"], False),
        (["--augment=false"], False),
        (["--augment"], True),
        (["--augment=true"], True),
        ([], True),
    ],
)
def test_augment_none_turns_augmentation_off_and_the_old_spellings_still_work(
    tmp_path, args, enabled
):
    argv = ["train.py", "--stage=1", f"--data={tmp_path}", "--model-dir=m", *args, "--seed=3"]
    train_cmd.FLAGS.unparse_flags()
    train_cmd.FLAGS(config_flags.join_switch_words(argv))
    try:
        got = config_flags.from_flags(train_cmd.FLAGS)
    finally:
        train_cmd.FLAGS.unparse_flags()
    assert got.augment == AugmentConfig(enabled=enabled)
    assert got.runtime.seed == 3  # the word did not swallow the flag after it


def test_join_switch_words_joins_only_a_switchs_off_word():
    argv = ["train.py", "--augment", "none", "-augment", "none", "--noaugment", "none", "none"]
    assert config_flags.join_switch_words(argv) == [
        "train.py", "--augment=none", "-augment=none", "--noaugment", "none", "none",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "sync"), [([], None), (["--sync-bn"], True), (["--nosync-bn"], False)]
)
def test_sync_bn_flag_is_automatic_by_default(tmp_path, args, sync):
    train_cmd.FLAGS.unparse_flags()
    train_cmd.FLAGS(["train.py", "--stage=1", f"--data={tmp_path}", "--model-dir=m", *args])
    try:
        assert config_flags.from_flags(train_cmd.FLAGS).model.sync_bn is sync
    finally:
        train_cmd.FLAGS.unparse_flags()


def test_saved_config_is_nested_json_and_loads_back(tmp_path):
    original = _config(tmp_path / "data", tmp_path / "models", loss="ce", validation_freq=2)
    original.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"] == str(tmp_path / "data")  # predict.py reads the records folder here
    assert saved["optim"]["loss"] == "ce" and saved["model"]["preset"] == "tiny"
    assert saved["augment"]["enabled"] is False and saved["runtime"]["seed"] == 0
    assert Config.load(tmp_path / "config.json") == original


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"optim": OptimConfig(batch_size=0)}, "batch_size"),
        ({"optim": OptimConfig(optimizer="adagrad")}, "optimizer"),
        ({"model": ModelConfig(bn_momentum=1.0)}, "bn_momentum"),
        ({"augment": AugmentConfig(on="gpu")}, "augment_on"),
        ({"runtime": RuntimeConfig(backup_steps=0)}, "backup_steps"),
        ({"stage": 4}, "stage"),
        ({"data": "/nonexistent"}, "data"),
        ({"model_dir": ""}, "model_dir"),
    ],
)
def test_check_config_names_the_setting_in_library_words(tmp_path, change, setting):
    good = _config(tmp_path, tmp_path)
    config.check_config(good)
    with pytest.raises(UsageError) as err:
        config.check_config(dataclasses.replace(good, **change))
    assert err.value.setting == setting
    assert "--" not in str(err.value)


def test_validation_runs_every_nth_epoch_and_after_the_last():
    assert training.validation_epochs(7, 3) == [3, 6, 7]
    assert training.validation_epochs(6, 3) == [3, 6]
    assert training.validation_epochs(4, 1) == [1, 2, 3, 4]
    assert training.validation_epochs(2, 5) == [2]


def test_keep_best_skips_epochs_without_validation(tmp_path):
    net = build_m2cnn(75, preset="tiny")
    keep = callbacks.KeepBest(net, tmp_path, {}, None, True, lambda *_: None)
    keep.on_epoch_end(0, {"loss": 1.0})  # not validated: no kappa to judge
    assert keep.best is None and not (tmp_path / checkpoints.BEST_META).exists()
    keep.on_epoch_end(1, {"loss": 0.9, "val_kappa_scores": float("nan")})
    assert keep.best == -math.inf  # validated, undefined kappa: still the first checkpoint
    assert json.loads((tmp_path / checkpoints.BEST_META).read_text())["epoch"] == 2


def _epochs_csv(directory) -> list[dict[str, str]]:
    with (directory / "epochs.csv").open() as f:
        return list(csv.DictReader(f))


def test_epoch_log_keeps_every_column_when_an_epoch_is_not_validated(tmp_path):
    names = ["loss", "kappa_scores"]
    path = str(tmp_path / "epochs.csv")
    first = callbacks.EpochsCsv(path, names, append=False)
    first.on_train_begin()
    first.on_epoch_end(0, {"loss": 1.0})  # Keras's CSVLogger would drop val_kappa_scores here
    first.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.7, "val_kappa_scores": 0.3})
    first.on_train_end()
    resumed = callbacks.EpochsCsv(path, names, append=True)
    resumed.on_train_begin()
    resumed.on_epoch_end(2, {"loss": 0.4})
    resumed.on_train_end()
    assert _epochs_csv(tmp_path) == [
        {"epoch": "0", "loss": "1.0", "val_kappa_scores": "NA", "val_loss": "NA"},
        {"epoch": "1", "loss": "0.5", "val_kappa_scores": "0.3", "val_loss": "0.7"},
        {"epoch": "2", "loss": "0.4", "val_kappa_scores": "NA", "val_loss": "NA"},
    ]


def test_wall_time_is_written_for_people():
    assert train_cmd.duration(48.4) == "48 s"
    assert train_cmd.duration(312) == "5 min 12 s"
    assert train_cmd.duration(7380) == "2 h 03 min"


def test_a_deterministic_run_is_refused_where_tensorflow_started_with_parallel_ops(
    tmp_path, records_dir, monkeypatch
):
    """This test's process started TensorFlow long ago, without one inter-op thread: the run
    cannot be bit-for-bit, so it is refused in one line naming the setting, before any work."""
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    config = _config(records_dir, tmp_path / "m")
    config = dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, deterministic=True)
    )
    with pytest.raises(UsageError, match="fresh process") as err:
        training.run(config)
    assert err.value.setting == "deterministic" and not (tmp_path / "m").exists()
    assert "TF_NUM_INTEROP_THREADS" not in os.environ


# ---------------------------------------------------------------------------------------------
# Runs of train.py in this process: --xla, --noresume, the TensorBoard logs


def _train(argv: list[str]) -> tuple[int, str]:
    """train.py's exit code and what it printed (Keras's progress included)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = train_cmd.run(["train.py", *argv])
    return code, printed.getvalue()


def _lr2_steps(backup) -> int:
    """The train steps a backup holds: its LR2 optimizer's step counter."""
    with h5py.File(backup / "latest.weights.h5", "r") as f:
        return int(f["optimizer_new/vars/0"][()])


@dataclasses.dataclass(frozen=True)
class TwoRuns:
    stage: Path  # the stage folder both wrote
    xla: tuple[int, str]  # the first run's exit code and output
    xla_config: dict  # its config.json
    xla_epochs: list[dict[str, str]]  # its epochs.csv
    xla_steps: int  # the steps its backup holds
    fresh: tuple[int, str]  # the second run's
    events_before: set[Path]  # the TensorBoard files before the second run
    backed_up: list[int]  # the steps each of the second run's backups recorded, in order
    strategies: list[tf.distribute.Strategy]  # the strategy the second run built
    trained_variables: list  # the second run's model's variables


# The tests of the two runs share them: one xdist worker (--dist loadgroup) builds them once.
# Slow: XLA compiles the train and validation steps (about half a minute of CPU).
def TWO_RUNS(test):
    return pytest.mark.slow(pytest.mark.xdist_group("test_training_two_runs")(test))


@pytest.fixture(scope="module")
def two_runs(records_dir, tmp_path_factory) -> TwoRuns:
    """In one model folder: train.py --xla (augmentation on, 1 epoch of 1 step), then, with a
    stray file in its backup, --noresume --backup-steps 1 --strategy mirrored for 2 epochs of
    2 steps, watching its backups and its strategy."""
    model_dir = tmp_path_factory.mktemp("two_runs")
    common = [*RUN, *BASE, "--preset", "nano", "--seed", "0"]
    common = [a.format(data=records_dir, dir=model_dir) for a in common]
    stage = model_dir / "stage1"
    xla = _train([*common, "--xla", "--epochs", "1", "--steps-per-epoch", "1"])
    found = {
        "xla_config": json.loads((stage / "config.json").read_text()) if xla[0] == 0 else {},
        "xla_epochs": _epochs_csv(stage) if xla[0] == 0 else [],
        "xla_steps": _lr2_steps(stage / "backup") if xla[0] == 0 else -1,
    }
    (stage / "backup" / "stray").write_text("from the run before")
    events = set(stage.glob("tensorboard/*/events.out.tfevents.*"))
    backed_up, strategies, trainers = [], [], []
    save, make_strategy, make_trainer = (
        callbacks.Backup._save_model, distribution.make_strategy, training.make_trainer
    )  # fmt: skip

    def saved(self):  # what the backup file says right after each backup
        save(self)
        backed_up.append(json.loads(Path(self._training_metadata_path).read_text())["steps"])

    def built(name):
        strategies.append(make_strategy(name))
        return strategies[-1]

    def made(*args, **kwargs):
        trainers.append(make_trainer(*args, **kwargs))
        return trainers[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks.Backup, "_save_model", saved)
        patch.setattr(distribution, "make_strategy", built)
        patch.setattr(training, "make_trainer", made)
        fresh = _train(
            [*common, "--noresume", "--noaugment", "--epochs", "2", "--steps-per-epoch", "2",
             "--backup-steps", "1", "--strategy", "mirrored"]
        )  # fmt: skip
    variables = trainers[0][0].variables if trainers else []
    return TwoRuns(stage, xla, fresh=fresh, events_before=events, backed_up=backed_up,
                   strategies=strategies, trained_variables=variables, **found)  # fmt: skip


@TWO_RUNS
def test_xla_moves_the_augmentation_into_tf_data_says_so_and_trains(two_runs):
    code, printed = two_runs.xla
    assert code == 0, printed[-3000:]
    assert "xla: the projective transform cannot be XLA-compiled; augmenting in tf.data" in printed
    config = two_runs.xla_config
    assert config["runtime"]["xla"] is True
    assert config["augment"] == {**config["augment"], "enabled": True, "on": "pipeline"}
    assert two_runs.xla_steps == 1  # the one step was trained, compiled by XLA
    assert [row["epoch"] for row in two_runs.xla_epochs] == ["0"]
    assert math.isfinite(float(two_runs.xla_epochs[0]["loss"]))
    assert math.isfinite(float(two_runs.xla_epochs[0]["val_kappa_scores"]))


@TWO_RUNS
def test_noresume_discards_the_backup_and_starts_at_epoch_1(two_runs):
    code, printed = two_runs.fresh
    assert code == 0, printed[-3000:]
    backup = two_runs.stage / "backup"
    assert not (backup / "stray").exists()  # the old backup folder is gone
    # 2 epochs of 2 steps from scratch: 4 (resumed after the first run's epoch: 1 + 2).
    assert _lr2_steps(backup) == 4
    assert "Epoch 1/2" in printed and "Epoch 2/2" in printed
    assert [row["epoch"] for row in _epochs_csv(two_runs.stage)] == ["0", "1"]


@TWO_RUNS
def test_backup_steps_backs_up_after_every_that_many_steps_and_at_each_epoch_end(two_runs):
    code, printed = two_runs.fresh
    assert code == 0, printed[-3000:]
    # --backup-steps 1: after steps 1 and 2, the end of epoch 1 (step 2), 3, 4, the end (4);
    # at epoch ends only (the default), it would be [2, 4].
    assert two_runs.backed_up == [1, 2, 2, 3, 4, 4]


@TWO_RUNS
def test_strategy_mirrored_trains_the_model_under_a_mirrored_strategy(two_runs):
    """On this machine (no GPU) MirroredStrategy has one replica, the CPU; with GPUs it takes
    them all (tests/test_training_runs.py checks its update over two replicas)."""
    code, printed = two_runs.fresh
    assert code == 0, printed[-3000:]
    (strategy,) = two_runs.strategies
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.extended.worker_devices == ("/job:localhost/replica:0/task:0/device:CPU:0",)
    assert "steps/epoch, 1 replica(s)" in printed
    variables = two_runs.trained_variables
    assert variables and all(
        strategy.extended.variable_created_in_scope(v.value) for v in variables
    )
    assert json.loads((two_runs.stage / "config.json").read_text())["runtime"]["strategy"] == (
        "mirrored"
    )


def _scalars(paths) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar summary in TensorBoard event files."""
    found = {}
    for path in paths:
        for event in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            parsed = tf.compat.v1.Event.FromString(event)
            for value in parsed.summary.value:
                found[(value.tag, parsed.step)] = float(tf.make_ndarray(value.tensor))
    return found


@TWO_RUNS
def test_tensorboard_logs_every_epochs_losses_and_val_kappas(two_runs):
    """The scalars TensorBoard shows for each epoch are the run's own: equal to epochs.csv."""
    new = set(two_runs.stage.glob("tensorboard/*/events.out.tfevents.*")) - two_runs.events_before
    train = _scalars(p for p in new if p.parent.name == "train")
    val = _scalars(p for p in new if p.parent.name == "validation")
    rows = _epochs_csv(two_runs.stage)
    for epoch, row in enumerate(rows):
        for name in ("loss", "ce", "mse", "reg", "accuracy"):
            assert train[(f"epoch_{name}", epoch)] == pytest.approx(float(row[name]), rel=1e-6)
        for name in ("loss", "kappa_scores", "kappa_probs"):
            got = val[(f"epoch_{name}", epoch)]
            assert got == pytest.approx(float(row[f"val_{name}"]), rel=1e-6, abs=1e-7)
