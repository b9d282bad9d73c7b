"""The flags that say which trained stage a command runs and on which runtime: one definition
for evaluate.py, predict.py and serve.py, so their names, help and choices cannot drift."""

from __future__ import annotations

from absl import flags

from m2cnn_tf import cli
from m2cnn_tf.backends import BACKENDS


def define_stage(fv: flags.FlagValues, stage_help: str) -> None:
    """--model-dir and --stage: the best checkpoint of DIR/stageN."""
    flags.DEFINE_string(
        "model-dir", None, "Folder holding stage{N}/best.keras (train.py --model-dir).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("stage", None, stage_help, lower_bound=1, upper_bound=3, flag_values=fv)


def define_backend(fv: flags.FlagValues) -> None:
    """--backend, --litert-model and --threads (export.py makes the LiteRT files)."""
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


def define_inference(fv: flags.FlagValues) -> None:
    """--tta and --batch-size."""
    flags.DEFINE_enum(
        "tta", "none", cli.TTA_CHOICES,
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
    }
