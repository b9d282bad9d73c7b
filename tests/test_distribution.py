"""m2cnn_tf.distribution and synchronised BatchNorm: which devices a run says it uses, and
BatchNorm's statistics over 2 replicas (2 logical CPU devices), checked by hand with numpy."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from _subprocess import run_json_script
from _tfrecords import grade_images, write_split

from m2cnn_tf import distribution
from m2cnn_tf.commands import train as train_cmd

H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    ("gpus", "strategy", "mixed", "line"),
    [
        ([], "default", False, "devices: CPU only (no GPU visible to TensorFlow)"),
        ([], "mirrored", True, "devices: CPU only (no GPU visible to TensorFlow)"),
        ([H100, H100], "mirrored", True, f"devices: 2 × GPU ({H100}), mixed precision on"),
        ([H100], "multiworker", False, f"devices: 1 × GPU ({H100}), mixed precision off"),
        (
            [H100, H100],
            "default",
            True,
            f"devices: 1 × GPU ({H100}), mixed precision on; 2 GPUs visible, the mirrored "
            "strategy would use all",
        ),
        (
            ["A", "B", "A"],
            "mirrored",
            False,
            "devices: 3 × GPU (2 × A, 1 × B), mixed precision off",
        ),
    ],
)
def test_device_line_names_the_devices_the_strategy_computes_on(gpus, strategy, mixed, line):
    assert distribution.device_line(gpus, strategy, mixed) == line


def test_mixed_precision_without_a_gpu_is_warned_in_one_line(monkeypatch):
    monkeypatch.setattr(distribution, "gpu_names", lambda: [])
    lines = distribution.describe_devices("default", mixed_precision=True)
    assert lines[0] == "devices: CPU only (no GPU visible to TensorFlow)"
    assert len(lines) == 2 and lines[1].startswith("warning: mixed precision without a GPU")
    assert distribution.describe_devices("default", mixed_precision=False) == lines[:1]
    monkeypatch.setattr(distribution, "gpu_names", lambda: [H100])
    assert len(distribution.describe_devices("default", mixed_precision=True)) == 1


def test_gpu_names_come_from_the_drivers_details_or_say_gpu(monkeypatch):
    """Two GPUs TensorFlow lists: one the driver names, one whose details fail."""
    import tensorflow as tf

    assert distribution.gpu_names() == []  # this machine: the CPU wheel sees none
    devices = ["gpu0", "gpu1"]
    details = {"gpu0": {"device_name": "NVIDIA H100 80GB HBM3"}}

    def get_details(device):
        if device not in details:
            raise ValueError("no details")
        return details[device]

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: devices)
    monkeypatch.setattr(tf.config.experimental, "get_device_details", get_details)
    assert distribution.gpu_names() == ["NVIDIA H100 80GB HBM3", "GPU"]


def test_train_prints_its_devices_before_anything_else(tmp_path, monkeypatch, capsys):
    grades = [0, 1, 2, 3]
    write_split(tmp_path, 80, "train", grade_images(grades, 80), grades)
    write_split(tmp_path, 80, "val", grade_images(grades, 80), grades)
    monkeypatch.setattr(distribution, "gpu_names", lambda: [])
    argv = ["train.py", "--stage=1", f"--data={tmp_path}", f"--model-dir={tmp_path / 'm'}"]
    argv += ["--image-size=80", "--preset=tiny", "--weights=none", "--mixed-precision"]
    # A batch larger than the split stops the run early, after the start has been printed.
    assert train_cmd.run([*argv, "--batch-size=64"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "devices: CPU only (no GPU visible to TensorFlow)"
    assert out[1].startswith("warning: mixed precision without a GPU")
    assert out[2] == "resolved configuration:"


# One train step of TwoRateTrainer under MirroredStrategy over 2 logical CPUs. The BatchNorm sits
# on the input, so its batch statistics are those of the images themselves; momentum 0 makes
# the moving averages equal the statistics of the one step.
SYNC_BN_SCRIPT = textwrap.dedent(
    """
    import json, keras, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from m2cnn_tf.model import set_batchnorm
    from m2cnn_tf.train_step import TwoRateTrainer, make_optimizer

    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (8, 6, 6, 3)).astype("float32")
    images[4:] = images[4:] * 2 + 3  # the second replica's half has other statistics
    grades = np.array([0, 1, 2, 3] * 2, "int32")
    ds = tf.data.Dataset.from_tensors((images, {"grade": grades})).repeat()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def moving_statistics(synchronized):
        with strategy.scope():
            x = inputs = keras.Input((6, 6, 3))
            x = keras.layers.BatchNormalization(name="bn")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            net = keras.Model(inputs, {"logits": keras.layers.Dense(5, name="logits")(x),
                                       "score": keras.layers.Dense(1, name="score")(x)})
            set_batchnorm(net, momentum=0.0, synchronized=synchronized)
            trainer = TwoRateTrainer(net, [], weight_decay=0.0)
            trainer.compile_two_rates(make_optimizer("sgd", 0.1), make_optimizer("sgd", 0.1),
                                      mixed_precision=False, jit_compile=False)
        trainer.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
        bn = net.get_layer("bn")
        local = strategy.experimental_local_results
        return {
            "mean": [v.numpy().tolist() for v in local(bn.moving_mean.value)],
            "var": [v.numpy().tolist() for v in local(bn.moving_variance.value)],
            "saved_mean": bn.moving_mean.numpy().tolist(),
        }

    def adam_weights(adam):
        # Each replica's copy of every weight after three two-rate Adam steps.
        keras.utils.set_random_seed(0)
        with strategy.scope():
            x = inputs = keras.Input((6, 6, 3))
            x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="c")(x))
            net = keras.Model(inputs, {"logits": keras.layers.Dense(5, name="logits")(x),
                                       "score": keras.layers.Dense(1, name="score")(x)})
            trainer = TwoRateTrainer(net, ["c"], weight_decay=0.0)
            trainer.compile_two_rates(adam(1e-3), adam(1e-2), mixed_precision=False,
                                      jit_compile=False)
        trainer.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
        local = strategy.experimental_local_results
        return [[v.numpy().tolist() for v in local(w.value)] for w in net.trainable_weights]

    print(json.dumps({"images": images.tolist(), "on": moving_statistics(True),
                      "off": moving_statistics(False),
                      "fused_adam": adam_weights(lambda lr: make_optimizer("adam", lr)),
                      "keras_adam": adam_weights(keras.optimizers.Adam)}))
    """
)


@pytest.fixture(scope="module")
def mirrored() -> dict:
    """SYNC_BN_SCRIPT's results: one process for the module's tests under MirroredStrategy."""
    return run_json_script(SYNC_BN_SCRIPT, timeout=300)


@pytest.mark.slow
def test_synchronised_bn_uses_the_global_batch_and_unsynchronised_each_replicas_half(mirrored):
    result = mirrored
    images = np.asarray(result["images"])
    axes = (0, 1, 2)
    whole_mean, whole_var = images.mean(axes), images.var(axes)  # Keras: biased variance
    halves = [images[:4], images[4:]]  # what each replica is given
    # On: every replica's copy holds the whole batch's statistics.
    for k in range(2):
        np.testing.assert_allclose(result["on"]["mean"][k], whole_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result["on"]["var"][k], whole_var, rtol=1e-4, atol=1e-5)
    # Off: each replica normalised by, and kept, its own half's statistics; the checkpoint
    # (the first copy) holds one half's mean, far from the whole batch's.
    for k, half in enumerate(halves):
        np.testing.assert_allclose(result["off"]["mean"][k], half.mean(axes), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result["off"]["var"][k], half.var(axes), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(result["off"]["saved_mean"]) - whole_mean).min() > 0.5


@pytest.mark.slow
def test_fused_adam_under_mirrored_strategy_updates_every_replicas_copy_as_keras_adam(mirrored):
    """The fused kernel runs once per replica's copy (`extended.update`): both copies stay
    equal and both moved as Keras's own Adam moves them."""
    fused, reference = mirrored["fused_adam"], mirrored["keras_adam"]
    assert len(fused) == len(reference) == 6  # conv, logits and score: kernels and biases
    for copies, expected in zip(fused, reference, strict=True):
        np.testing.assert_array_equal(copies[0], copies[1])
        for copy in copies:
            np.testing.assert_allclose(copy, expected[0], rtol=0, atol=1e-6)
