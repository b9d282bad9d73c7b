"""Benchmark 1: input-pipeline images/s per CPU core at 224 / 448 / 720 (issue 4).

Records: the demo dataset (real fundus photograph, Eq. (1) preprocessing, JPEG q95) converted
by data_prep.kaggle, so decoding costs what it costs on Kaggle records. Each variant runs on ONE
core (tf.data private thread pool of 1, intra-op 1, and the process pinned with
sched_setaffinity) and reports images/s after a warm-up:

  decode   parse + decode + scale: the floor any pipeline pays;
  ours     m2cnn_tf.data training pipeline: flips + any-angle rotation + zoom + shift as one
           uint8 projective transform with γ fill, brightness/contrast fused into the scaling;
  keras    the plain float32 alternative: scale, then keras.layers.RandomFlip,
           RandomRotation, RandomZoom, RandomTranslation, RandomBrightness, RandomContrast;
  step     the default design: tf.data decodes and scales only (= the decode row), and the
           train step applies augmentation.augment_scaled on the accelerator; this row times that
           augmentation alone on one CPU core, as a bound on its cost where no GPU runs it.

    python benchmarks/input_pipeline.py [--sizes 224,448,720] [--images 96] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_records(work: Path, sizes: list[int], images: int) -> Path:
    per_grade = max(1, images // 5)
    kaggle, out = work / "kaggle", work / "out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.demo",
            "--out",
            str(kaggle),
            "--per-grade",
            str(per_grade),
            "--eval-per-grade",
            "2",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.kaggle",
            "--kaggle-dir",
            str(kaggle),
            "--out",
            str(out),
            "--sizes",
            ",".join(map(str, sizes)),
            "--no-progress",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


def measure(ds, seconds: float) -> float:
    it = iter(ds)
    for _ in range(2):  # warm-up: tracing, autotune
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = next(it)[0]
        n += int(x.shape[0])
    return n / (time.perf_counter() - start)


def variants(out: Path, size: int, batch: int):
    import keras
    import tensorflow as tf

    from m2cnn_tf import data
    from m2cnn_tf.config import AugmentConfig

    one_core = tf.data.Options()
    one_core.threading.private_threadpool_size = 1
    one_core.threading.max_intra_op_parallelism = 1
    cfg = AugmentConfig(on="pipeline")
    plain = AugmentConfig(enabled=False)
    decode = data.make_dataset(
        out, size, "train", batch_size=batch, training=True, seed=0, augment=plain
    )
    ours = data.make_dataset(
        out, size, "train", batch_size=batch, training=True, seed=0, augment=cfg
    )
    layers = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=1),
            keras.layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=2),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=3),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=4),
            keras.layers.RandomBrightness(0.05, value_range=(-1, 1), seed=5),
            keras.layers.RandomContrast(0.1, seed=6),
        ]
    )
    keras_ds = decode.map(
        lambda x, m: (layers(x, training=True), m), num_parallel_calls=tf.data.AUTOTUNE
    )
    return {
        "decode": decode.with_options(one_core),
        "ours": ours.with_options(one_core),
        "keras": keras_ds.with_options(one_core),
    }


def step_augment_rate(size: int, batch: int, seconds: float) -> float:
    import numpy as np
    import tensorflow as tf

    from m2cnn_tf import augmentation
    from m2cnn_tf.config import AugmentConfig

    cfg = AugmentConfig()
    images = tf.constant(
        np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), tf.float32
    )
    fn = tf.function(
        lambda x, i: augmentation.augment_scaled(x, tf.stack([tf.constant(0, tf.int64), i]), cfg)
    )
    fn(images, tf.constant(0, tf.int64)).numpy()
    n, start, i = 0, time.perf_counter(), 1
    while time.perf_counter() - start < seconds:
        fn(images, tf.constant(i, tf.int64)).numpy()
        n, i = n + batch, i + 1
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="224,448,720")
    p.add_argument("--images", type=int, default=96, help="records per size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = make_records(Path(tmp), sizes, args.images)
        results = {}
        for size in sizes:
            rates = {
                k: measure(ds, args.seconds) for k, ds in variants(out, size, args.batch).items()
            }
            rates["step"] = step_augment_rate(size, args.batch, args.seconds)
            results[size] = rates
            print(
                f"{size:4d} px  decode {rates['decode']:7.1f}  ours {rates['ours']:7.1f} "
                f"({rates['ours'] / rates['decode']:.2f} of decode)  keras-float32 "
                f"{rates['keras']:7.1f}  step-augment alone {rates['step']:7.1f} img/s per core; "
                f"16 cores feed {16 * rates['decode']:.0f} img/s (step design) or "
                f"{16 * rates['ours']:.0f} (tf.data augmentation)",
                flush=True,
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
