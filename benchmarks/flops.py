"""Benchmark 3: FLOPs per image for each stage, counted from the model, and the projected GPU
training throughput and epoch time (issue 4).

FLOPs are counted by TensorFlow's profiler on the frozen inference graph (one image; a
multiply-add counts 2). A training step costs ≈ 3× the forward pass (forward, and a backward
pass of about twice the forward), so on an accelerator sustaining R FLOP/s:
images/s ≈ R / (3 · F), epoch ≈ 35,126 Kaggle train images / (images/s).

    python benchmarks/flops.py [--preset paper] [--sustained-tflops 350]

The default R = 350 TFLOP/s is ~35 % of an H100 SXM's dense BF16/FP16 peak (989 TFLOP/s), a
typical sustained utilisation for a mixed-precision CNN; pass your own measured rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KAGGLE_TRAIN = 35_126  # §III-A


def forward_flops(model, size: int) -> int:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, size, size, 3], tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
    )
    return int(info.total_float_ops)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--sizes", default="224,448,720")
    p.add_argument("--sustained-tflops", type=float, default=350.0)
    args = p.parse_args()

    import keras

    from m2cnn_tf.config import multi_cell_path
    from m2cnn_tf.model import BACKBONE_OUTPUT, build_m2cnn

    rate = args.sustained_tflops * 1e12
    rows = []
    for stage, size in enumerate((int(s) for s in args.sizes.split(",")), start=1):
        model = build_m2cnn(size, preset=args.preset)
        backbone = keras.Model(model.input, model.get_layer(BACKBONE_OUTPUT).output)
        total, base = forward_flops(model, size), forward_flops(backbone, size)
        per_s = rate / (3 * total)
        rows.append(
            {
                "stage": stage,
                "size": size,
                "path": multi_cell_path(size),
                "params": model.count_params(),
                "gflops_forward": total / 1e9,
                "gflops_irv2_backbone": base / 1e9,
                "train_img_per_s": per_s,
                "epoch_minutes": KAGGLE_TRAIN / per_s / 60,
            }
        )
        r = rows[-1]
        print(
            f"stage {stage} {size:4d} px ({r['path']:6s}) params {r['params'] / 1e6:6.1f} M  "
            f"forward {r['gflops_forward']:7.1f} GFLOP "
            f"(IRv2 BaseNet {r['gflops_irv2_backbone']:7.1f})"
            f"  → {per_s:7.0f} img/s, epoch {r['epoch_minutes']:5.1f} min at "
            f"{args.sustained_tflops:g} TFLOP/s sustained",
            flush=True,
        )
        keras.backend.clear_session()
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
