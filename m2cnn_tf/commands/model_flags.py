"""The flags that say which trained stage a command runs, on which runtime and how it grades:
one definition for evaluate.py, predict.py, serve.py and export.py, so their names, help,
choices and checks cannot drift."""

from __future__ import annotations

from absl import flags

from m2cnn_tf.backends import BACKENDS, BFLOAT16_CPU_FLAGS, PRECISIONS
from m2cnn_tf.errors import UsageError
from m2cnn_tf.metrics import DEFAULT_CUTPOINTS
from m2cnn_tf.tta import TTA_CHOICES


def define_stage(fv: flags.FlagValues, stage_help: str) -> None:
    """--model-dir and --stage: the best checkpoint of DIR/stageN."""
    flags.DEFINE_string(
        "model-dir", None, "Folder holding stage{N}/best.keras (train.py --model-dir).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("stage", None, stage_help, lower_bound=1, upper_bound=3, flag_values=fv)


def define_backend(fv: flags.FlagValues) -> None:
    """--backend, --litert-model, --threads, --precision and --force-precision (export.py makes
    the LiteRT files)."""
    flags.DEFINE_enum(
        "backend", "keras", BACKENDS,
        "Runtime of the model: keras (the checkpoint itself) or litert (its export.py export: "
        "faster on a CPU; Grad-CAM still loads the Keras model).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "litert-model", None,
        "The .tflite file for --backend litert (default: the stage's own export, "
        "DIR/stageN/export/model_<int8|dynamic|float16|float32>.tflite, fastest first).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer(
        "threads", None, "LiteRT interpreter threads (default: every core this process may use).",
        lower_bound=1, flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_enum(
        "precision", "float32", PRECISIONS,
        "Number format of --backend keras: float32, or bfloat16 (Keras's mixed_bfloat16: the "
        "layers compute in bfloat16, the pooling and heads in float32; for CPUs with "
        f"{' or '.join(BFLOAT16_CPU_FLAGS)}, refused elsewhere).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "force-precision", False,
        "Run --precision bfloat16 on a CPU that does not report native bfloat16 (TensorFlow "
        "then emulates it).",
        flag_values=fv,
    )  # fmt: skip


def define_inference(fv: flags.FlagValues) -> None:
    """--tta and --batch-size."""
    flags.DEFINE_enum(
        "tta", "none", TTA_CHOICES,
        "Test-time augmentation: average the outputs over the 4 flips, or over the 8 "
        "symmetries of the square (dihedral: flips and 90° rotations).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("batch-size", 16, "Images per model call.", lower_bound=1, flag_values=fv)


def backend_options(fv: flags.FlagValues) -> dict:
    """The keyword arguments `backends.load_backend` takes, from the parsed flags."""
    return {
        "litert_model": fv["litert-model"].value,
        "threads": fv.threads,
        "precision": fv.precision,
        "force_precision": fv["force-precision"].value,
    }


def define_grading(fv: flags.FlagValues) -> None:
    """--data, --workers and --cutpoints: how predict.py and serve.py grade photographs."""
    flags.DEFINE_string(
        "data", None,
        "data_prep OUT folder whose manifest.json holds the preprocessing parameters "
        "(default: the one in the stage's config.json).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer(
        "workers", None, "Decoding and preprocessing threads (default: min(4, cores)).",
        lower_bound=1, flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_list(
        "cutpoints", None, "Four score cut points, e.g. from evaluate.py's report.json.",
        flag_values=fv,
    )  # fmt: skip


def cutpoints(fv: flags.FlagValues) -> list[float] | None:
    """--cutpoints as four numbers (None when not given), or a UsageError."""
    if fv.cutpoints is None:
        return None
    try:
        values = [float(c) for c in fv.cutpoints]
    except ValueError:
        values = []
    if len(values) != len(DEFAULT_CUTPOINTS):
        raise UsageError("needs four numbers, e.g. 0.5,1.5,2.5,3.5", setting="cutpoints")
    return values
