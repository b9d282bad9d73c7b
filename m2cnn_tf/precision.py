"""Which number format the Keras backend computes in: float32, or bfloat16 where the CPU has it.

bfloat16 keeps float32's exponent range with 8 bits of mantissa. oneDNN, which TensorFlow's
CPU kernels use, runs bfloat16 convolutions natively on CPUs with AVX512_BF16 or AMX-BF16 and
emulates them elsewhere: with oneDNN held to AVX512-VNNI, the paper preset at 224 px ran
bfloat16 at 0.39x float32's speed, against 1.37x natively (docs/quantization.md). So bfloat16
is refused where /proc/cpuinfo lists neither flag, unless forced.

Choices the paper leaves open (ours; the paper trains and tests in float32 on GPUs):
- Inference only: the model is rebuilt under Keras's `mixed_bfloat16` policy with the trained
  float32 weights (variables stay float32, each layer computes in bfloat16); training is
  unchanged.
- The pooling and both heads (`model.POOL`, `model.HEAD_LAYERS`) stay float32, as
  `build_m2cnn` keeps the heads under any policy: the mean over the last feature map and the
  two outputs are computed at full precision from the bfloat16 features.
Free of TensorFlow: Keras is imported only to rebuild the model.
"""

from __future__ import annotations

from pathlib import Path

from m2cnn_tf.errors import UsageError

PRECISIONS = ("float32", "bfloat16")
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_bfloat16_flags(cpuinfo: Path | None = None) -> list[str] | None:
    """The bfloat16 flags the CPU reports in `cpuinfo` (default CPUINFO; empty: none), or None
    where it cannot be read."""
    cpuinfo = cpuinfo or CPUINFO
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [f for f in BFLOAT16_CPU_FLAGS if f in flags]


def check_precision(precision: str, *, force: bool = False, cpuinfo: Path | None = None) -> None:
    """A UsageError for an unknown precision, or for bfloat16 on a CPU without it (unforced)."""
    cpuinfo = cpuinfo or CPUINFO
    if precision not in PRECISIONS:
        raise UsageError(
            f"must be one of {', '.join(PRECISIONS)}, got {precision!r}", setting="precision"
        )
    if precision != "bfloat16" or force:
        return
    found = cpu_bfloat16_flags(cpuinfo)
    if found:
        return
    where = (
        f"{cpuinfo} lists neither {' nor '.join(BFLOAT16_CPU_FLAGS)}"
        if found is not None
        else f"{cpuinfo} cannot be read to check for {' or '.join(BFLOAT16_CPU_FLAGS)}"
    )
    raise UsageError(
        f"bfloat16 needs a CPU with native bfloat16 ({where}); elsewhere TensorFlow emulates "
        "it, slower than float32: use float32, or force bfloat16 to run anyway",
        setting="precision",
    )


def bfloat16_model(model):
    """The same network and weights, computing in bfloat16 but for the pooling and the heads."""
    import keras

    from m2cnn_tf.model import HEAD_LAYERS, POOL

    def rebuilt(layer):
        config = layer.get_config()
        if layer.name not in (POOL, *HEAD_LAYERS):
            config["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=rebuilt)
    clone.set_weights(model.get_weights())
    return clone
