"""Real training runs in subprocesses: kill and resume, Ctrl-C, distribution, and learning.

Each run uses the tiny preset at small images so the whole file stays around 3 minutes on
2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _tfrecords import grade_images, write_split
from sklearn.metrics import cohen_kappa_score

ROOT = Path(__file__).resolve().parents[1]
SIZE = 80
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    grades = [i % 5 for i in range(32)]
    write_split(out, SIZE, "train", grade_images(grades, SIZE, seed=1), grades)
    write_split(out, SIZE, "val", grade_images(grades[:10], SIZE, seed=2), grades[:10])
    return out


def _train_cmd(data, model_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--stage",
        "1",
        "--data",
        str(data),
        "--model-dir",
        str(model_dir),
        "--image-size",
        str(SIZE),
        "--preset",
        "tiny",
        "--weights",
        "none",
        "--batch-size",
        "4",
        "--seed",
        "0",
        *extra,
    ]


def _metadata(backup: Path) -> dict | None:
    try:
        return json.loads((backup / "training_metadata.json").read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None


def _iterations(backup: Path) -> int:
    with h5py.File(backup / "latest.weights.h5", "r") as f:
        return int(f["optimizer_new/vars/0"][()])  # the LR2 optimizer's step counter


def test_a_killed_run_and_an_interrupted_run_both_resume_where_they_stopped(tmp_path, records_dir):
    # Enough epochs that the resumed run is still training when Ctrl-C arrives, however fast
    # the machine (an idle 2-core machine runs one of these epochs in about half a second).
    steps, epochs = 8, 20
    cmd = _train_cmd(
        records_dir, tmp_path, "--epochs", str(epochs), "--steps-per-epoch", str(steps)
    )
    backup = tmp_path / "stage1" / "backup"

    # 1. kill -9 once the first epoch is backed up.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        meta = _metadata(backup)
        if meta and meta["epoch"] >= 1:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    killed_epoch = _metadata(backup)["epoch"]
    assert 1 <= killed_epoch < epochs, "the run was not killed mid-training"
    assert _iterations(backup) == killed_epoch * steps

    # 2. resume; Ctrl-C in the middle of its first epoch.
    log = tmp_path / "resume.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        marker = f"Epoch {killed_epoch + 1}/"
        while time.monotonic() < deadline and proc.poll() is None:
            if marker in log.read_text():
                break  # the resumed run has started its first epoch
            time.sleep(0.02)
        time.sleep(0.3)  # into that epoch's tracing or first steps; many epochs remain
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert "Epoch 1/" not in text  # resumed, not restarted
    assert code == 130, text[-2000:]
    assert "interrupted; state saved" in text
    interrupted = _metadata(backup)
    saved_steps = _iterations(backup)
    assert interrupted["epoch"] >= killed_epoch
    # Saved at the moment of Ctrl-C: the steps already done in this epoch are kept.
    assert killed_epoch * steps <= saved_steps < (interrupted["epoch"] + 1) * steps

    # 3. finish; the schedule picks up at the interrupted epoch with the saved optimizer state.
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Epoch {interrupted['epoch'] + 1}/{epochs}" in done.stdout
    assert _iterations(backup) == saved_steps + (epochs - interrupted["epoch"]) * steps
    rows = (tmp_path / "stage1" / "epochs.csv").read_text().splitlines()[1:]
    assert int(rows[-1].split(",")[0]) == epochs - 1
    assert (tmp_path / "stage1" / "best.keras").is_file()


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, keras, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    from m2cnn_tf import training

    def small_net():
        # The trainer takes any functional model with M²CNN's outputs; a small, well-conditioned
        # one keeps the comparison about gradient aggregation, not float noise of a random IRv2.
        x = inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(x)
        x = keras.layers.BatchNormalization(scale=False, name="conv_bn")(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, {"logits": keras.layers.Dense(5, name="logits")(x),
                                    "score": keras.layers.Dense(1, name="score")(x)})

    rng = np.random.default_rng(0)
    half = rng.uniform(-1, 1, (4, 16, 16, 3)).astype("float32")
    # Each replica sees the same four images, so per-replica BatchNorm statistics equal the
    # full batch's and only the gradient aggregation differs between the strategies.
    images = np.concatenate([half, half])
    grades = np.array([0, 1, 3, 4] * 2, "int32")
    ds = tf.data.Dataset.from_tensors((images, {"grade": grades})).repeat()
    keras.utils.set_random_seed(0)
    start = small_net().get_weights()

    def one_step(strategy):
        with strategy.scope():
            net = small_net()
            net.set_weights(start)
            trainer = training.TwoRateTrainer(net, ["conv", "conv_bn"], weight_decay=0.01)
            trainer.compile_two_rates(training.make_optimizer("sgd", 0.1),
                                      training.make_optimizer("sgd", 0.01),
                                      mixed_precision=False, jit_compile=False)
        before = [v.numpy() for v in net.trainable_weights]
        trainer.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
        return [v.numpy() - b for v, b in zip(net.trainable_weights, before)], strategy

    base, _ = one_step(tf.distribute.get_strategy())
    mirrored, strategy = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    scale = max(float(np.abs(b).max()) for b in base)
    err = max(float(np.abs(a - b).max()) for a, b in zip(base, mirrored))
    ratio = float(np.sqrt(sum((m**2).sum() for m in mirrored) / sum((b**2).sum() for b in base)))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "scale": scale, "err": err,
                      "ratio": ratio}))
    """
)


def test_mirrored_over_two_cpus_gives_the_same_first_update_as_default():
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["scale"] > 1e-4  # the step moved the weights
    # Summing instead of averaging over replicas would double the update (ratio 2).
    assert result["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert result["err"] <= 1e-5 * result["scale"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_localhost_finish_a_short_epoch(tmp_path, records_dir):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {
            **ENV,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        cmd = _train_cmd(
            records_dir,
            tmp_path,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--strategy",
            "multiworker",
        )
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "2 replica(s)" in out
    assert (tmp_path / "stage1" / "best.keras").is_file()  # written by the chief only
    assert (tmp_path / "stage1" / "backup" / "worker1").is_dir()


def _val_kappa(model_path_or_model, data_dir, size):
    from m2cnn_tf import checkpoints, data

    model = (
        checkpoints.load_model(model_path_or_model)
        if isinstance(model_path_or_model, str | Path)
        else model_path_or_model
    )
    scores, grades = [], []
    for x, meta in data.make_dataset(data_dir, size, "val", batch_size=25, training=False):
        scores.append(model(x, training=False)["score"].numpy().ravel())
        grades.append(meta["grade"].numpy())
    predicted = np.clip(np.rint(np.concatenate(scores)), 0, 4).astype(int)
    return cohen_kappa_score(np.concatenate(grades), predicted, weights="quadratic")


def test_stage_one_on_the_demo_data_learns(tmp_path):
    """demo → data_prep.kaggle → train.py: val kappa clearly above the untrained model's."""
    size = 128
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.demo",
            "--out",
            str(tmp_path / "kaggle"),
            "--per-grade",
            "40",
            "--eval-per-grade",
            "10",
            "--width",
            "384",
        ],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.kaggle",
            "--kaggle-dir",
            str(tmp_path / "kaggle"),
            "--out",
            str(tmp_path / "out"),
            "--sizes",
            str(size),
            "--base-size",
            "256",
            "--workers",
            "2",
            "--no-progress",
        ],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--stage",
            "1",
            "--data",
            str(tmp_path / "out"),
            "--model-dir",
            str(tmp_path / "model"),
            "--image-size",
            str(size),
            "--preset",
            "tiny",
            "--weights",
            "none",
            "--epochs",
            "6",
            "--batch-size",
            "16",
            "--seed",
            "0",
            "--bn-momentum",
            "0.9",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]

    import keras

    from m2cnn_tf.model import build_m2cnn

    keras.utils.set_random_seed(0)
    untrained = _val_kappa(build_m2cnn(size, preset="tiny"), tmp_path / "out", size)
    trained = _val_kappa(tmp_path / "model" / "stage1" / "best.keras", tmp_path / "out", size)
    best = json.loads((tmp_path / "model" / "stage1" / "best.json").read_text())
    assert trained == pytest.approx(best["val_kappa_scores"], abs=1e-5)
    assert trained >= 0.5 and trained >= untrained + 0.3, (untrained, trained)
    assert seconds < 180
