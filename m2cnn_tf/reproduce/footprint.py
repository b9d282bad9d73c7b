"""What a training run costs: GPU memory and hours, estimated from measurements of the real graph.

Memory. `measure` runs the real train step (forward in training mode, Eq. (4)'s loss, the
gradients of every trainable variable) of the real Keras graph on the CPU at two batch sizes
and reads TensorFlow's own allocator statistics (`tf.config.experimental.get_memory_info`,
kept by oneDNN's CPU allocator: `benchmarks/paper_smoke.py` turns oneDNN on to measure):
the peak grows by `per_image` bytes per image, on top of `step_fixed` bytes (gradients and
buffers that do not grow with the batch). `MEASURED` holds those figures, measured by
`benchmarks/paper_smoke.py` in float32 on the CPU. A GPU estimate is derived from them:

    weights (4 B/param) + Adam's two slots (8 B/param) + step_fixed
        + per_image × images per GPU × (with mixed precision: 0.5 to 0.83)

Mixed precision gives a range, not a halving: float16 halves what a convolution keeps for the
backward pass, but Keras's BatchNormalization computes in float32 and keeps the float32 copy of
its input. Per conv-BN-ReLU block (every cell of Fig. 2 is made of them) float32 training keeps
three tensors of 4 bytes (the block's input, BN's input, the activation); mixed precision keeps
2 + 4 + 2 bytes of them when BN's float32 input is kept (10/12 = 0.83), 2 + 2 + 2 when it is not
(0.5). The GPU figure is derived, not measured (no GPU was available): cuDNN's workspaces come
on top.

Time. Fig. 4 gives the paper's hours: 224@20k 1.4 h (0.25 s/step), 448@20k 4.2 h (0.76 s/step).
720 px is not in Fig. 4; its rate is 448's times the ratio of forward FLOPs
(benchmarks/README.md "FLOPs"). That is the paper's GPU at the paper's (unknown) batch: a rough
guide to the relative cost of the runs, not a promise for another machine.
Kept free of TensorFlow at import; `measure` imports it.
"""

from __future__ import annotations

import dataclasses
import math
import time

from m2cnn_tf.config import multi_cell_path

MB = 1e6
GB = 1e9
BYTES_WEIGHTS_AND_ADAM = 12  # float32 weights 4 B + Adam's m and v 8 B, per parameter
# Per-image activations under mixed precision, relative to float32 (the module docstring).
MIXED_PRECISION_ACTIVATIONS = (0.5, 10 / 12)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The train step's memory of one graph, float32, as `measure` reads it."""

    params: int  # trainable and non-trainable
    per_image: float  # bytes the peak grows by per image in the batch
    step_fixed: float  # bytes of the step's peak that do not grow with the batch


# (preset, size, Multi-Cell path) -> Footprint, measured on the CPU in float32 at batches 1
# and 2 by benchmarks/paper_smoke.py (--measure-only), TF 2.21, with the fused BatchNorm (within
# the noise of the earlier figures with Keras's). The allocator's peak varies by about 20 %
# between repeats; the figures are single runs.
MEASURED: dict[tuple[str, int, str], Footprint] = {
    ("paper", 224, "small"): Footprint(54_345_958, 71.4 * MB, 213.9 * MB),
    ("paper", 448, "small"): Footprint(54_345_958, 413.6 * MB, 224.7 * MB),
    ("paper", 448, "medium"): Footprint(86_555_366, 420.7 * MB, 359.6 * MB),
    ("paper", 720, "small"): Footprint(54_345_958, 1148.7 * MB, 261.5 * MB),
    ("paper", 720, "large"): Footprint(106_717_414, 1217.9 * MB, 420.8 * MB),
    ("tiny", 224, "small"): Footprint(13_487_030, 43.8 * MB, 54.4 * MB),
    ("tiny", 448, "small"): Footprint(13_487_030, 176.5 * MB, 60.4 * MB),
    ("tiny", 448, "medium"): Footprint(24_011_190, 160.2 * MB, 114.4 * MB),
    ("tiny", 720, "small"): Footprint(13_487_030, 425.2 * MB, 95.6 * MB),
    ("tiny", 720, "large"): Footprint(34_535_350, 419.1 * MB, 186.8 * MB),
}


def measure(
    preset: str, size: int, multi_cell: bool, batches: tuple[int, int] = (1, 2)
) -> tuple[Footprint, float]:
    """Measure the real graph's train step on the CPU (see the module docstring): its memory,
    and its seconds per step at the larger batch."""
    import keras
    import tensorflow as tf

    from m2cnn_tf.losses import multitask_loss, regularized_variables
    from m2cnn_tf.model import build_m2cnn

    keras.backend.clear_session()  # it runs gc.collect()
    net = build_m2cnn(size, weights=None, preset=preset, multi_cell=multi_cell)
    reg = regularized_variables(net)

    # One trace serves both batches: the batch dimension is left open.
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ]
    )
    def step(images, grades):
        with tf.GradientTape() as tape:
            loss = multitask_loss(grades, net(images, training=True), reg, 4e-5)["loss"]
        return tape.gradient(loss, net.trainable_variables)

    peaks, seconds = [], 0.0
    for batch in batches:
        images = tf.random.uniform([batch, size, size, 3], -1.0, 1.0)
        grades = tf.zeros([batch], tf.int32)
        step(images, grades)  # trace (the first batch), and let the allocator settle
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
        except ValueError:
            raise RuntimeError(
                "footprint.measure needs the CPU allocator's statistics, which TensorFlow keeps "
                "with oneDNN on: set TF_ENABLE_ONEDNN_OPTS=1 before it starts"
            ) from None
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        start = time.perf_counter()
        grads = step(images, grades)
        seconds = time.perf_counter() - start
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
        del grads
    per_image = (peaks[1] - peaks[0]) / (batches[1] - batches[0])
    found = Footprint(net.count_params(), per_image, max(0.0, peaks[0] - batches[0] * per_image))
    keras.backend.clear_session()  # it runs gc.collect()
    return found, seconds


def _nearest(preset: str, size: int, path: str) -> tuple[Footprint, float] | None:
    """The measured footprint of the same preset and path nearest in size, and the factor by
    which activations scale to `size` (with the pixel count)."""
    same = [(s, f) for (p, s, q), f in MEASURED.items() if p == preset and q == path]
    if not same:
        return None
    near, found = min(same, key=lambda sf: abs(sf[0] - size))
    return found, (size / near) ** 2


def gpu_memory_gb(
    preset: str, size: int, multi_cell: bool, batch_per_gpu: int, mixed_precision: bool
) -> tuple[float, float] | None:
    """The derived GPU memory of a run's train step, (low, high) in GB, or None when nothing
    was measured (the same twice without mixed precision)."""
    path = multi_cell_path(size) if multi_cell else "small"
    near = _nearest(preset, size, path)
    if near is None:
        return None
    found, scale = near
    low, high = gpu_bytes(found, batch_per_gpu, mixed_precision, scale)
    return low / GB, high / GB


def gpu_bytes(
    found: Footprint, batch: int, mixed_precision: bool, scale: float = 1.0
) -> tuple[float, float]:
    """The module docstring's formula, (low, high); `scale` multiplies the activations (another
    size)."""
    fixed = found.params * BYTES_WEIGHTS_AND_ADAM + found.step_fixed
    factors = MIXED_PRECISION_ACTIVATIONS if mixed_precision else (1.0, 1.0)
    low, high = (fixed + found.per_image * scale * f * batch for f in factors)
    return low, high


# Fig. 4: the paper's seconds per training step (224@20k/1.4h, 448@20k/4.2h).
PAPER_SECONDS_PER_STEP = {224: 1.4 * 3600 / 20000, 448: 4.2 * 3600 / 20000}
# benchmarks/README.md "FLOPs": forward GFLOP per image of the paper preset,
# (size, Multi-Cell path) -> GFLOP; the BaseNet alone is the "small" path.
FORWARD_GFLOP = {
    (224, "small"): 13.0,
    (448, "small"): 61.0,
    (448, "medium"): 63.1,
    (720, "small"): 168.2,
    (720, "large"): 176.9,
}


def paper_hours(size: int, multi_cell: bool, steps: int, nominal: int) -> float:
    """Hours of `steps` at the paper's speed (Fig. 4), for a run at `nominal` size scaled to
    `size` by the pixel count. 720 px: 448's rate times the ratio of forward FLOPs."""
    path = multi_cell_path(nominal) if multi_cell else "small"
    if nominal in PAPER_SECONDS_PER_STEP:
        rate = PAPER_SECONDS_PER_STEP[nominal]
        if path != "small":
            rate *= FORWARD_GFLOP[(nominal, path)] / FORWARD_GFLOP[(nominal, "small")]
    else:
        rate = PAPER_SECONDS_PER_STEP[448] * FORWARD_GFLOP[(nominal, path)]
        rate /= FORWARD_GFLOP[(448, "small")]
    return steps * rate * (size / nominal) ** 2 / 3600


def describe_gb(value: tuple[float, float] | None) -> str:
    """ "4.2–6.0 GB", or "–" when not estimated."""
    if value is None or not all(math.isfinite(v) for v in value):
        return "–"
    low, high = value
    return f"{low:.1f} GB" if round(low, 1) == round(high, 1) else f"{low:.1f}–{high:.1f} GB"
