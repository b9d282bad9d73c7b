"""The train step with our fused kernels against Keras's own layers: Adam
(m2cnn_tf/fused_adam.py) and BatchNormalization (m2cnn_tf/fused_batchnorm.py).

Same model, batch and two-rate train step; three variants: `keras` (Keras's Adam and
BatchNormalization), `fused_adam` (the fused Adam, Keras's BatchNormalization) and `fused`
(both fused: what train.py runs). Each variant runs in a fresh process (a process traces a
model once, as each train.py run does), the three alternating, `--repeats` times each. Prints,
per variant, the ops in the traced step, the seconds to trace and run the first step, and the
median seconds per step after it; then the ratios of the medians.

    python benchmarks/fused_kernels.py [--preset tiny] [--size 80] [--batch 2] [--steps 10]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("keras", "fused_adam", "fused")


def measure(variant: str, preset: str, size: int, batch: int, steps: int) -> dict:
    """One variant in this process: traced ops, first step (trace included), later steps."""
    import keras
    import numpy as np
    import tensorflow as tf

    from m2cnn_tf import fused_batchnorm
    from m2cnn_tf.model import backbone_layer_names, build_m2cnn
    from m2cnn_tf.train_step import TwoRateTrainer, make_optimizer

    if variant != "fused":  # Keras's own BatchNormalization in every conv2d_bn
        fused_batchnorm.BatchNormalization = keras.layers.BatchNormalization
    keras.utils.set_random_seed(0)
    net = build_m2cnn(size, preset=preset)
    trainer = TwoRateTrainer(net, backbone_layer_names(net), weight_decay=4e-5)
    adam = keras.optimizers.Adam if variant == "keras" else (lambda lr: make_optimizer("adam", lr))
    trainer.compile_two_rates(adam(1e-4), adam(1e-3), mixed_precision=False, jit_compile=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    grades = rng.integers(0, 5, batch).astype("int32")
    batches = iter(tf.data.Dataset.from_tensors((images, {"grade": grades})).repeat())
    trainer.make_train_function()
    start = time.perf_counter()
    trainer.train_function(batches)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_function(batches)
        times.append(time.perf_counter() - start)
    # Counted on a trace of its own (Keras wraps its traced step in a Python function).
    graph = tf.function(trainer.train_step).get_concrete_function(next(batches)).graph
    return {"ops": len(graph.get_operations()), "first": first, "step": statistics.median(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=80)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.preset, args.size, args.batch, args.steps)))
        return 0
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            flags = [f"--{k}={getattr(args, k)}" for k in ("preset", "size", "batch", "steps")]
            out = subprocess.run(
                [sys.executable, __file__, *flags, "--child", variant],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, {args.size} px, batch {args.batch}, {args.repeats} processes each")
    print(f"{'variant':<10} {'ops':>7} {'trace + first step (s)':>23} {'s/step':>8}")
    medians = {}
    for variant, runs in results.items():
        medians[variant] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = medians[variant]
        print(f"{variant:<10} {m['ops']:>7.0f} {m['first']:>23.2f} {m['step']:>8.3f}")
    for a, b in (("fused_adam", "keras"), ("fused", "fused_adam"), ("fused", "keras")):
        ratio = {k: medians[a][k] / medians[b][k] for k in medians[b]}
        print(f"{a}/{b}: ops {ratio['ops']:.2f}×, trace + first step {ratio['first']:.2f}×, "
              f"step {ratio['step']:.2f}×")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
