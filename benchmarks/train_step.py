"""Benchmark 2: the two-optimizer train step against a single-optimizer `model.fit` (issue 4).

Same model (tiny preset, to stay quick on a CPU), same in-memory batch, no augmentation, so
only the step differs:
  single  keras `Model.compile(Adam, CE + MSE)` + `fit` on the functional M²CNN;
  two     `TwoRateTrainer` (fused Adam at LR1 for the BaseNet and at LR2 for the rest, one
          gradient computation, plus L_reg of Eq. (4) that the single variant does not compute).
Reports the median seconds per step over several timed epochs and their ratio (target ≤ 1.05).

    python benchmarks/train_step.py [--size 128] [--batch 8] [--steps 15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from m2cnn_tf.model import backbone_layer_names, build_m2cnn
    from m2cnn_tf.train_step import TwoRateTrainer

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype("float32")
    grades = rng.integers(0, 5, args.batch).astype("int32")

    keras.utils.set_random_seed(0)
    single = build_m2cnn(args.size, preset=args.preset)
    single.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss={
            "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "score": "mse",
        },
    )
    single_ds = (
        tf.data.Dataset.from_tensors(
            (images, {"logits": grades, "score": grades.astype("float32")[:, None]})
        )
        .repeat()
        .cache()
    )

    keras.utils.set_random_seed(0)
    net = build_m2cnn(args.size, preset=args.preset)
    two = TwoRateTrainer(net, backbone_layer_names(net), weight_decay=4e-5)
    two.compile_two_rates(
        keras.optimizers.Adam(1e-4),
        keras.optimizers.Adam(1e-3),
        mixed_precision=False,
        jit_compile=False,
    )
    two_ds = tf.data.Dataset.from_tensors((images, {"grade": grades})).repeat().cache()

    def timed(model, ds) -> float:
        start = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
        return (time.perf_counter() - start) / args.steps

    for model, ds in ((single, single_ds), (two, two_ds)):  # trace and warm up
        model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    times: dict[str, list[float]] = {"single": [], "two": []}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        times["single"].append(timed(single, single_ds))
        times["two"].append(timed(two, two_ds))
    s, t = statistics.median(times["single"]), statistics.median(times["two"])
    print(
        f"preset {args.preset}, {args.size} px, batch {args.batch}: single-optimizer fit "
        f"{s * 1e3:.1f} ms/step, two-optimizer step {t * 1e3:.1f} ms/step, ratio {t / s:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
