"""Evaluate a trained stage as in Table II / III (quadratic kappa from scores and from prob.).

    python evaluate.py --model-dir DIR --stage N --data OUT --split val|test --out REPORT_DIR
        [--thresholds fit] [--tta] [--tta-rotations] [--per-patient]
    python evaluate.py --compare REPORT_DIR1 REPORT_DIR2 ...

Usage errors and missing checkpoints/records end in one line on stderr and exit code 2.
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
flags.DEFINE_integer("stage", None, "Stage to evaluate: 1 (224 px), 2 (448 px), 3 (720 px).")
flags.DEFINE_string("data", None, "data_prep's OUT folder (OUT/<size>/<split>-*.tfrecord).")
flags.DEFINE_enum("split", None, ["val", "test"], "Split to evaluate.")
flags.DEFINE_string("out", None, "Report folder: report.json, predictions.csv, plots.")
flags.DEFINE_enum(
    "thresholds", "round", ["round", "fit"], "Score cut points: round, or fit on val."
)
flags.DEFINE_bool("tta", False, "Average the outputs over the 4 flips.")
flags.DEFINE_bool("tta-rotations", False, "With --tta, also over 90° rotations (8 views).")
flags.DEFINE_bool("per-patient", False, "Blend each eye with the fellow eye (weight fit on val).")
flags.DEFINE_integer("batch-size", 16, "Images per model call.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap replicates for the kappa 95% CI.")
flags.DEFINE_list("compare", [], "Report folders to print side by side (space or comma separated).")
flags.DEFINE_float(
    "min-kappa",
    None,
    "Exit 1 if the kappa from scores is below this: a gate for scripts and CI. With --compare, "
    "the last report listed is checked.",
)


def _fail(message: str) -> NoReturn:
    cli.fail("evaluate.py", message)


def main(argv: list[str]) -> None:
    compare = [*FLAGS.compare, *argv[1:]] if FLAGS.compare else []
    if len(argv) > 1 and not FLAGS.compare:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    evaluating = FLAGS["model-dir"].value is not None
    if not evaluating and not compare:
        _fail("pass --model-dir, --stage, --data, --split and --out (or --compare DIR ...)")

    if evaluating:
        missing = [f"--{n}" for n in ("stage", "data", "split", "out") if FLAGS[n].value is None]
        if missing:
            _fail(f"missing {', '.join(missing)}")
        if FLAGS["tta-rotations"].value and not FLAGS.tta:
            _fail("--tta-rotations needs --tta")
    missing_reports = [d for d in compare if not os.path.isfile(os.path.join(d, "report.json"))]
    if missing_reports:
        _fail(f"no report.json in {missing_reports[0]}")

    from m2cnn_tf import evaluation

    if evaluating:
        from m2cnn_tf.checkpoints import CheckpointMissing

        tta = "none"
        if FLAGS.tta:
            tta = "flips+rot90" if FLAGS["tta-rotations"].value else "flips"
        try:
            report = evaluation.run_evaluation(
                FLAGS["model-dir"].value,
                FLAGS.stage,
                FLAGS.data,
                FLAGS.split,
                FLAGS.out,
                fit_thresholds=FLAGS.thresholds == "fit",
                tta=tta,
                per_patient=FLAGS["per-patient"].value,
                batch_size=FLAGS["batch-size"].value,
                n_boot=FLAGS.bootstrap,
            )
        except (CheckpointMissing, OSError, ValueError) as err:
            _fail(str(err).splitlines()[0])
        label = evaluation.run_label(FLAGS.out, report)
        print(evaluation.table_ii([(label, report)]))
        print()
        print(evaluation.details_table([(label, report)]))
        print(f"\nreport written to {FLAGS.out}")
        if not compare:
            _check_gate(report)
        if compare:
            compare.append(FLAGS.out)
    if compare:
        try:
            print(evaluation.compare_reports(compare))
        except (FileNotFoundError, ValueError, KeyError) as err:
            _fail(str(err).splitlines()[0])
        _check_gate(evaluation.load_report(compare[-1]))


def _check_gate(report: dict) -> None:
    """--min-kappa: print the verdict, exit 1 below the bar."""
    gate = FLAGS["min-kappa"].value
    if gate is None:
        return
    kappa = report["scores"]["kappa"]
    passed = kappa is not None and kappa >= gate
    shown = "undefined" if kappa is None else f"{kappa:.3f}"
    verdict = f">= {gate} (pass)" if passed else f"< {gate} (FAIL)"
    print(f"check: kappa from scores {shown} {verdict}")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("evaluate.py"))
