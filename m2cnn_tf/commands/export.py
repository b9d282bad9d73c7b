"""Export a trained stage as a deployable model: a TF SavedModel or a LiteRT (.tflite) file.

    python export.py --model-dir DIR --stage N --format savedmodel|litert
        [--quantize none|float16|dynamic|int8[,...]] [--calibration DATA] [--out PATH]
        [--calibration-count N] [--keep-float auto|none]

LiteRT quantisations: none (float32), float16 (half the size, float32 speed), dynamic (int8
weights) and int8 (int8 weights and activations: the fastest on a CPU; its ranges are
calibrated on train records of the stage's size from the data_prep folder DATA). int8 is
selective by default (--keep-float auto): TF Lite's quantization debugger measures each
layer's int8 error on the calibration records, and the layers where it is far above rounding,
with the heads, stay float, so the grades stay Keras's; --keep-float none makes every layer
int8 (the full-integer model, int8 input and output). The default output is
DIR/stageN/export/savedmodel or DIR/stageN/export/model_<float32|float16|dynamic|int8>.tflite,
where predict.py and evaluate.py look for it; several quantisations (`--quantize none,int8`)
are converted from one load of the checkpoint and one SavedModel, each to its default path. A
JSON sidecar beside the file (inside the SavedModel folder) records the source checkpoint,
stage, size, quantisation, calibration count, the layers kept in float and why, and the
preprocessing parameters.
Exit codes: 0 done, 1 failed, 2 usage, 130 interrupted.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from m2cnn_tf import checkpoints, cli, common, export  # TF-free: usage errors come before TF loads
from m2cnn_tf.commands import model_flags
from m2cnn_tf.errors import UsageError
from m2cnn_tf.quantization import KEEP_FLOAT_CHOICES

PROG = "export.py"

FLAGS = flags.FlagValues()
model_flags.define_stage(FLAGS, "Stage whose best checkpoint to export (1, 2 or 3).")
flags.DEFINE_enum("format", None, checkpoints.FORMATS, "What to write.", flag_values=FLAGS)
flags.DEFINE_list(
    "quantize",
    ["none"],
    f"LiteRT quantisation (litert only): {'|'.join(checkpoints.QUANTIZATIONS)}, or several "
    "separated by commas, each written to its default path from one load of the checkpoint.",
    flag_values=FLAGS,
)
flags.register_validator(
    "quantize",
    lambda chosen: bool(chosen) and set(chosen) <= set(checkpoints.QUANTIZATIONS),
    f"value should be one or more of {'|'.join(checkpoints.QUANTIZATIONS)}, separated by commas",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "calibration", None, "data_prep folder whose train records at the stage's size calibrate "
    "int8.", flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_integer(
    "calibration-count", export.DEFAULT_CALIBRATION,
    "Calibration records to use (fewer if the data has fewer).", flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_enum(
    "keep-float", "auto", KEEP_FLOAT_CHOICES,
    "int8 only: auto (the layers whose measured int8 error is far above rounding, and the "
    "heads, stay float) or none (every layer int8, int8 input and output).", flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_string(
    "out", None, "Model path (default under DIR/stageN/export/).", flag_values=FLAGS
)


def _body(rest: list[str]) -> int | None:
    for name in ("model-dir", "stage", "format"):
        if FLAGS[name].value is None:
            raise UsageError("is required", setting=name.replace("-", "_"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with common.importing():
        import keras  # noqa: F401  (TensorFlow with it: what every export loads first)
    paths = export.export_stages(
        FLAGS["model-dir"].value,
        FLAGS.stage,
        fmt=FLAGS.format,
        quantize=FLAGS.quantize,
        calibration=FLAGS.calibration,
        calibration_count=FLAGS["calibration-count"].value,
        keep_float=FLAGS["keep-float"].value,
        out=FLAGS.out,
        log=lambda line: print(line, file=sys.stderr),
    )
    for path in paths:
        sidecar = checkpoints.read_sidecar(path)
        what = "savedmodel" if FLAGS.format == "savedmodel" else f"LiteRT {sidecar['quantization']}"
        size = f", {sidecar['file']['bytes'] / 1e6:.1f} MB" if sidecar["file"] else ""
        calibrated = sidecar["calibration"]
        note = f", calibrated on {calibrated['count']} records" if calibrated else ""
        if sidecar.get("int8") and sidecar["int8"]["kept_float_ops"]:
            kept = [k["layer"] for k in sidecar["int8"]["kept_float"]]
            note += f", float: {', '.join(kept) or 'no layer'} and the heads"
        print(f"{what} model written to {path}{size}{note} in {sidecar['export_seconds']} s; "
              f"sidecar {checkpoints.sidecar_path(path)}")  # fmt: skip
    return None


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv)


def main() -> None:
    sys.exit(run())
