"""Grade raw fundus photographs with a trained stage, or export it as a TF SavedModel.

    python predict.py --model-dir DIR --stage N [--out preds.csv] [--gradcam OUT_DIR]
        IMAGE_OR_DIR...
    python predict.py --model-dir DIR --stage N --export EXPORT_DIR

One CSV row per image (stdout without --out): grade (from the score), grade_prob (argmax), score,
p0-p4, and an error column for files that could not be graded. Exit code: 0 if all images were
graded, 1 if any failed, 2 for usage errors and missing checkpoints.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from m2cnn_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model-dir", None, "Folder holding stage{N}/best.keras (train.py --model-dir).")
flags.DEFINE_integer("stage", None, "Stage whose best checkpoint to use (1, 2 or 3).")
flags.DEFINE_string("out", None, "CSV file for the predictions (default: stdout).")
flags.DEFINE_string("gradcam", None, "Folder for one Grad-CAM overlay PNG per image.")
flags.DEFINE_string("export", None, "Write a TF SavedModel here instead of predicting.")
flags.DEFINE_string(
    "data", None, "data_prep OUT folder whose manifest.json holds the preprocessing parameters "
    "(default: the one in the stage's config.json)."
)  # fmt: skip
flags.DEFINE_integer("batch-size", 16, "Images per model call.")
flags.DEFINE_integer("workers", None, "Preprocessing threads (default: min(4, cores)).")
flags.DEFINE_bool("tta", False, "Average the outputs over the 4 flips.")
flags.DEFINE_bool("tta-rotations", False, "With --tta, also over 90° rotations (8 views).")
flags.DEFINE_list("cutpoints", None, "Four score cut points, e.g. from evaluate.py's report.json.")


def _fail(message: str) -> NoReturn:
    cli.fail("predict.py", message)


def main(argv: list[str]) -> None:
    inputs = argv[1:]
    model_dir, stage = FLAGS["model-dir"].value, FLAGS.stage
    if model_dir is None or stage is None:
        _fail("pass --model-dir DIR and --stage N")
    if FLAGS.export and inputs:
        _fail("--export takes no images")
    if not FLAGS.export and not inputs:
        _fail("no images given: pass image files or folders (or --export EXPORT_DIR)")
    if FLAGS["tta-rotations"].value and not FLAGS.tta:
        _fail("--tta-rotations needs --tta")
    if FLAGS["batch-size"].value < 1:
        _fail("--batch-size must be positive")
    cutpoints = None
    if FLAGS.cutpoints is not None:
        try:
            cutpoints = [float(c) for c in FLAGS.cutpoints]
        except ValueError:
            cutpoints = []
        if len(cutpoints) != 4:
            _fail("--cutpoints needs four numbers, e.g. 0.5,1.5,2.5,3.5")

    from m2cnn_tf import checkpoints, prediction

    try:
        model, _ = checkpoints.load_stage(model_dir, stage)
    except checkpoints.CheckpointMissing as err:
        _fail(str(err))

    if FLAGS.export:
        path = prediction.export_saved_model(model, FLAGS.export)
        print(f"SavedModel written to {path} (signature serving_default: image -> logits, "
              "score, probabilities)")  # fmt: skip
        return

    params, source = prediction.preprocess_params_for(model_dir, stage, FLAGS.data)
    print(f"preprocessing parameters from {source}", file=sys.stderr)
    paths = prediction.expand_inputs(inputs)
    if not paths:
        _fail(f"no image files found in {' '.join(inputs)}")
    tta = "none"
    if FLAGS.tta:
        tta = "flips+rot90" if FLAGS["tta-rotations"].value else "flips"
    predictor = prediction.Predictor(
        model,
        params,
        tta=tta,
        batch_size=FLAGS["batch-size"].value,
        workers=FLAGS.workers,
        **({"cutpoints": cutpoints} if cutpoints else {}),
    )
    from tqdm import tqdm

    try:
        if FLAGS.out:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        out = open(FLAGS.out, "w", newline="") if FLAGS.out else sys.stdout  # noqa: SIM115
        if FLAGS.gradcam:
            os.makedirs(FLAGS.gradcam, exist_ok=True)
    except OSError as err:
        _fail(f"cannot write output: {err}")
    try:
        with tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr) as bar:
            rows = predictor.rows(paths, gradcam_dir=FLAGS.gradcam, progress=bar)
            written, failed = prediction.write_rows(rows, out)
    except KeyboardInterrupt:
        print("predict.py: interrupted; the rows written so far are complete", file=sys.stderr)
        sys.exit(130)
    finally:
        if out is not sys.stdout:
            out.close()
    summary = f"{written - failed} of {written} images graded"
    if failed:
        summary += f", {failed} failed (see the error column)"
    print(summary, file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("predict.py"))
