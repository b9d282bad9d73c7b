"""Evaluate a trained stage as in Table II / III (quadratic kappa from scores and from prob.).

    python evaluate.py --model-dir DIR --stage N --data OUT --split val|test --out REPORT_DIR
        [--checkpoint best|last] [--thresholds fit] [--tta none|flips|dihedral] [--per-patient]
        [--min-kappa K]
        [--backend keras|litert] [--litert-model FILE] [--threads N]
    python evaluate.py --compare REPORT_DIR1 REPORT_DIR2 ... [--min-kappa K]
    python evaluate.py --compare REPORT_DIR1 ... --operating-point spec=0.9 --development DEV

Writes REPORT_DIR/report.json, predictions.csv, confusion_matrix.png and roc_referable.png, and
prints the Table II layout; --compare prints several reports side by side (with an evaluation,
its report comes last). With --operating-point, one more table puts the reports' datasets side
by side (external validation): images and excluded ungradable, kappa both ways and referable-DR
AUC, sensitivity and specificity with CIs, at a referable-DR operating point chosen on the
development set's val report DEV and applied unchanged to every set (docs/external.md).
--min-kappa gates the kappa from scores of the last report.
Exit codes: 0 done, 1 below --min-kappa, 2 usage (also a missing checkpoint or missing
records), 130 interrupted.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from m2cnn_tf import calibration, checkpoints, cli, common
from m2cnn_tf.calibration import OPERATING_POINT_HELP, OperatingRule, parse_operating_point
from m2cnn_tf.commands import model_flags
from m2cnn_tf.errors import UsageError

PROG = "evaluate.py"
FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
model_flags.define_stage(FLAGS, "Stage to evaluate: 1 (224 px), 2 (448 px), 3 (720 px).")
model_flags.define_backend(FLAGS)
model_flags.define_inference(FLAGS)
flags.DEFINE_string("data", None, "data_prep's OUT folder (OUT/<size>/<split>-*.tfrecord).", **_F)
flags.DEFINE_enum("split", None, ["val", "test"], "Split to evaluate.", **_F)
flags.DEFINE_enum(
    "checkpoint", "best", list(checkpoints.CHECKPOINTS),
    "Which checkpoint of the stage: best (selected on val: optimistic when evaluated on val) or "
    "last (the weights after the final step).",
    **_F,
)  # fmt: skip
flags.DEFINE_string("out", None, "Report folder: report.json, predictions.csv, plots.", **_F)
flags.DEFINE_enum(
    "thresholds", "round", ["round", "fit"], "Score cut points: round, or fit on val.", **_F
)
flags.DEFINE_bool(
    "per-patient", False, "Blend each eye with the fellow eye (weight fit on val).", **_F
)
flags.DEFINE_integer(
    "bootstrap", 1000, "Bootstrap replicates for the kappa 95% CI.", lower_bound=1, **_F
)
flags.DEFINE_list(
    "compare", [], "Report folders to print side by side (space or comma separated).", **_F
)
flags.DEFINE_string(
    "operating-point",
    None,
    "With --compare: the external-validation table, at the referable-DR operating point chosen "
    "on --development: " + OPERATING_POINT_HELP + ".",
    **_F,
)
flags.DEFINE_string(
    "development",
    None,
    "The development set's val report folder (evaluate.py --split val on the training data): "
    "--operating-point is chosen on it, and its cut points re-grade every report.",
    **_F,
)
flags.DEFINE_float(
    "min-kappa",
    None,
    "Exit 1 if the kappa from scores is below this: a gate for scripts and CI. With --compare, "
    "the last report listed is checked.",
    **_F,
)

_NEEDED = ("stage", "data", "split", "out")


def _check_usage(rest: list[str]) -> tuple[list[str], OperatingRule | None]:
    """The report folders to compare and the operating-point rule; a UsageError for an
    incomplete command line."""
    if rest and not FLAGS.compare:
        raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    compare = [*FLAGS.compare, *rest]
    if FLAGS["model-dir"].value is None:
        if not compare:
            raise UsageError(
                "pass --model-dir, --stage, --data, --split and --out (or --compare DIR ...)"
            )
    else:
        missing = [cli.flag_name(n) for n in _NEEDED if FLAGS[n].value is None]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}")
    if (FLAGS["operating-point"].value is None) != (FLAGS.development is None):
        raise UsageError("--operating-point and --development go together")
    if FLAGS.development is None:
        return compare, None
    if not compare:
        raise UsageError("--operating-point goes with --compare REPORT_DIR ...")
    return compare, parse_operating_point(FLAGS["operating-point"].value)


def _evaluate() -> dict:
    """Evaluate the stage, print its tables, return its report."""
    with common.importing():
        from m2cnn_tf import evaluation, reports
    report = evaluation.run_evaluation(
        FLAGS["model-dir"].value,
        FLAGS.stage,
        FLAGS.data,
        FLAGS.split,
        FLAGS.out,
        fit_thresholds=FLAGS.thresholds == "fit",
        tta=FLAGS.tta,
        per_patient=FLAGS["per-patient"].value,
        batch_size=FLAGS["batch-size"].value,
        n_boot=FLAGS.bootstrap,
        backend=FLAGS.backend,
        checkpoint=FLAGS.checkpoint,
        **model_flags.backend_options(FLAGS),
    )
    print(reports.tables([(reports.run_label(FLAGS.out, report), report)]))
    print(f"\nreport written to {FLAGS.out}")
    return report


def _body(rest: list[str]) -> int:
    compare, rule = _check_usage(rest)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m2cnn_tf import reports

    last = None
    if FLAGS["model-dir"].value is not None:
        last = _evaluate()
        if compare:
            compare.append(FLAGS.out)
    if compare:
        print(reports.compare_reports(compare))
        last = reports.load_report(compare[-1])
    if rule is not None:
        result = calibration.external_validation(
            FLAGS.development, compare, rule, n_boot=FLAGS.bootstrap
        )
        print("\n" + reports.external_table(result))
    if FLAGS["min-kappa"].value is None:
        return cli.EXIT_OK
    passed, verdict = reports.kappa_gate(last, FLAGS["min-kappa"].value)
    print(verdict)
    return cli.EXIT_OK if passed else cli.EXIT_FAILED


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv, positional=True)


def main() -> None:
    sys.exit(run())
