"""Grade raw fundus photographs with a trained stage.

    python predict.py --model-dir DIR --stage N [--out preds.csv] [--gradcam OUT_DIR]
        [--tta none|flips|dihedral] [--cutpoints a,b,c,d]
        [--backend keras|litert] [--litert-model FILE] [--threads N] IMAGE_OR_DIR...

One CSV row per image (stdout without --out), in input order: grade (from the score),
grade_prob (argmax), score, p0-p4, and an error column for files that could not be graded.
Rows are written as they are graded, so an interrupted run leaves complete rows.
Exit codes: 0 every image graded, 1 any image failed, 2 usage (also a missing checkpoint),
130 interrupted.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TextIO

from absl import flags

from m2cnn_tf import cli, common
from m2cnn_tf.commands import model_flags
from m2cnn_tf.errors import UsageError

PROG = "predict.py"
FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
model_flags.define_stage(FLAGS, "Stage whose best checkpoint to use (1, 2 or 3).")
model_flags.define_backend(FLAGS)
model_flags.define_inference(FLAGS)
model_flags.define_grading(FLAGS)
flags.DEFINE_string("out", None, "CSV file for the predictions (default: stdout).", **_F)
flags.DEFINE_string("gradcam", None, "Folder for one Grad-CAM overlay PNG per image.", **_F)


def _output() -> AbstractContextManager[TextIO]:
    """The CSV's destination (stdout without --out); creates --out's and --gradcam's folders."""
    try:
        if FLAGS.gradcam:
            os.makedirs(FLAGS.gradcam, exist_ok=True)
        if not FLAGS.out:
            return nullcontext(sys.stdout)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        return open(FLAGS.out, "w", newline="")  # the caller's `with` closes it
    except OSError as err:
        raise UsageError(f"cannot write output: {err}") from None


def _grade(backend, inputs: list[str], cutpoints: list[float] | None) -> int:
    """Grade every image into the CSV; exit 1 if any failed."""
    from tqdm import tqdm

    from m2cnn_tf import backends, manifest, prediction

    model_dir, stage = FLAGS["model-dir"].value, FLAGS.stage
    params, source = manifest.preprocess_params_for(model_dir, stage, FLAGS.data)
    print(f"preprocessing parameters from {source}", file=sys.stderr)
    paths = prediction.expand_inputs(inputs)
    if not paths:
        raise UsageError(f"no image files found in {' '.join(inputs)}")
    predictor = prediction.Predictor(
        backend,
        params,
        gradcam_model=lambda: backends.load_keras(model_dir, stage).model,
        tta=FLAGS.tta,
        batch_size=FLAGS["batch-size"].value,
        workers=FLAGS.workers,
        **({"cutpoints": cutpoints} if cutpoints is not None else {}),
    )
    with (
        _output() as out,
        tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr) as bar,
    ):
        rows = predictor.rows(paths, gradcam_dir=FLAGS.gradcam, progress=bar)
        written, failed = prediction.write_rows(rows, out)
    summary = f"{written - failed} of {written} images graded"
    if failed:
        summary += f", {failed} failed (see the error column)"
    print(summary, file=sys.stderr)
    return cli.EXIT_FAILED if failed else cli.EXIT_OK


def _body(rest: list[str]) -> int:
    if FLAGS["model-dir"].value is None or FLAGS.stage is None:
        raise UsageError("pass --model-dir DIR and --stage N")
    if not rest:
        raise UsageError("no images given: pass image files or folders")
    cutpoints = model_flags.cutpoints(FLAGS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with common.importing():
        from m2cnn_tf import backends

        model_dir, stage = FLAGS["model-dir"].value, FLAGS.stage
        backend = backends.load_backend(
            FLAGS.backend, model_dir=model_dir, stage=stage, **model_flags.backend_options(FLAGS)
        )
    return _grade(backend, rest, cutpoints)


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv, positional=True)


def main() -> None:
    sys.exit(run())
