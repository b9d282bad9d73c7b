"""What `--deterministic` costs in train-step time on this CPU (issue 18).

The same two-learning-rate train step (`TwoRateTrainer`, Eq. (4), augmentation in the step as in
training) on the same in-memory batches, timed in two fresh processes: one as train.py runs by
default, one as `--deterministic` does (op determinism, seeded, one inter-op thread). Each
process traces and warms up, then times several epochs; the two are run alternately, so that
the machine's load hits both alike. Prints the median seconds per step of each and their ratio.

    python benchmarks/determinism.py [--preset paper] [--size 224] [--batch 4] [--steps 8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import json, sys, time
sys.path.insert(0, {root!r})
from m2cnn_tf import common
if {deterministic}:
    common.prepare_determinism()
import keras, numpy as np, tensorflow as tf
if {deterministic}:
    tf.config.experimental.enable_op_determinism()
keras.utils.set_random_seed(0)
from m2cnn_tf.config import AugmentConfig
from m2cnn_tf.model import backbone_layer_names, build_m2cnn
from m2cnn_tf.train_step import TwoRateTrainer, make_optimizer

rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, ({batch}, {size}, {size}, 3)).astype("float32")
grades = rng.integers(0, 5, {batch}).astype("int32")
net = build_m2cnn({size}, preset={preset!r})
trainer = TwoRateTrainer(net, backbone_layer_names(net), 4e-5, augment=AugmentConfig(), seed=0)
trainer.compile_two_rates(make_optimizer("adam", 1e-4), make_optimizer("adam", 1e-3),
                          mixed_precision=False, jit_compile=False)
ds = tf.data.Dataset.from_tensors((images, {{"grade": grades}})).repeat()
trainer.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)  # trace and warm up
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    trainer.fit(ds, epochs=1, steps_per_epoch={steps}, verbose=0)
    times.append((time.perf_counter() - start) / {steps})
print(json.dumps(times))
"""


def seconds_per_step(args: argparse.Namespace, deterministic: bool) -> list[float]:
    values = {k: getattr(args, k) for k in ("preset", "size", "batch", "steps", "repeats")}
    script = STEP.format(root=str(ROOT), deterministic=deterministic, **values)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_NUM_INTEROP_THREADS", None)  # each process as its command would set it
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating process pairs")
    args = p.parse_args()
    found: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for deterministic in (False, True):
            found[deterministic] += seconds_per_step(args, deterministic)
    default, deterministic = (statistics.median(found[k]) for k in (False, True))
    load = os.getloadavg()[0]
    print(
        f"preset {args.preset}, {args.size} px, batch {args.batch}: default "
        f"{default * 1e3:.0f} ms/step, --deterministic {deterministic * 1e3:.0f} ms/step, "
        f"ratio {deterministic / default:.2f} (load average {load:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
