"""Reproduce the paper: every run of Table II, Table III and Fig. 4, then the comparison report.

    python reproduce.py --data DATA --out OUT [--experiments table2,table3,fig4]
        [--preset paper|tiny|nano] [--batch-size N] [--steps-scale F] [--weights imagenet|none|PATH]
        [--sizes 224,448,720] [--ablation-init imagenet|stage] [--checkpoint last|best]
        [--seeds N] [--allow-cpu] [--dry-run]

DATA is data_prep's output (DATA/224, DATA/448, DATA/720). The runs, their initialisation and
their steps are the protocol's (m2cnn_tf/reproduce/protocol.py; the paper's values and ours, each
tagged). Each run is trained once into OUT/runs/<name>/ (an ordinary train.py model
directory), each evaluation goes to OUT/reports/<name>-<split>/, and the comparison with the
paper to OUT/tables.md, OUT/tables.json and OUT/fig4.png. A rerun skips what is done and
resumes an interrupted run; once all is done it only rebuilds the report.
--dry-run trains nothing: it writes OUT/plan.json and prints the plan with estimated GPU memory
and time per run. Without a GPU, it refuses to train unless --allow-cpu.
--steps-scale multiplies every step count (a CPU miniature keeps the plan's shape); --sizes maps
224,448,720 to other sizes with the same Multi-Cell paths.
Exit codes: 0 done, 1 a run failed, 2 usage (also: no GPU), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from m2cnn_tf import cli, common
from m2cnn_tf.config import PRESET_HELP, PRESETS
from m2cnn_tf.errors import UsageError
from m2cnn_tf.reproduce import plan as planning
from m2cnn_tf.reproduce import protocol
from m2cnn_tf.reproduce.options import Options

PROG = "reproduce.py"
FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
flags.DEFINE_string("data", None, "data_prep's output folder (DATA/<size>/*.tfrecord).", **_F)
flags.DEFINE_string("out", None, "Folder of the runs, the reports and the tables.", **_F)
flags.DEFINE_list(
    "experiments", list(protocol.EXPERIMENTS), "Which of table2, table3, fig4 to reproduce.", **_F
)
flags.DEFINE_enum(
    "preset",
    Options.preset,
    list(PRESETS),
    PRESET_HELP,
    **_F,
)
flags.DEFINE_integer(
    "batch-size",
    Options.batch_size,
    "Global batch of every run (protocol: ours, the same at every size).",
    lower_bound=1,
    **_F,
)
flags.DEFINE_float(
    "steps-scale", 1.0, "Multiply every step count (e.g. 0.0005 for a CPU miniature).", **_F
)
flags.DEFINE_string(
    "weights", "imagenet", "Backbone of the runs from ImageNet: imagenet, none or PATH.", **_F
)
flags.DEFINE_list(
    "sizes",
    [str(s) for s in protocol.SIZES.value],
    "The three sizes that stand for 224,448,720 (below 350, 350-699, 700 and above).",
    **_F,
)
flags.DEFINE_enum(
    "ablation-init",
    Options.ablation_init,
    list(protocol.ABLATION_INITS),
    "Table II's ablation columns at 448/720: from ImageNet (§III-A) or fine-tuned from the "
    "previous size (ours, labelled so in the report).",
    **_F,
)
flags.DEFINE_enum(
    "checkpoint",
    Options.checkpoint,
    list(protocol.CHECKPOINTS),
    "What a chained run starts from and a cell reports: the weights after the last step (the "
    "paper's step counts) or the best on val (shown beside the cells in any case).",
    **_F,
)
flags.DEFINE_integer(
    "seeds", Options.seeds, "Repeat every run with seeds 0..N-1 (tables: mean ± sd).",
    lower_bound=1, **_F,
)  # fmt: skip
flags.DEFINE_bool("allow-cpu", False, "Train even where TensorFlow sees no GPU.", **_F)
flags.DEFINE_bool("dry-run", False, "Write OUT/plan.json and print the plan; train nothing.", **_F)


def _options() -> Options:
    missing = [cli.flag_name(n) for n in ("data", "out") if FLAGS[n].value is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    try:
        sizes = tuple(int(s) for s in FLAGS.sizes)
    except ValueError:
        raise UsageError(f"not integers: {','.join(FLAGS.sizes)}", setting="sizes") from None
    return Options(
        data=FLAGS.data,
        out=FLAGS.out,
        experiments=tuple(FLAGS.experiments),
        preset=FLAGS.preset,
        batch_size=FLAGS["batch-size"].value,
        steps_scale=FLAGS["steps-scale"].value,
        weights=FLAGS.weights,
        sizes=sizes,
        ablation_init=FLAGS["ablation-init"].value,
        checkpoint=FLAGS.checkpoint,
        seeds=FLAGS.seeds,
    )


def _devices() -> list[str]:
    """The GPUs TensorFlow sees; without one and without --allow-cpu, a UsageError that names
    the cause and the fix."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    if not gpus and not FLAGS["allow-cpu"].value:
        raise UsageError(
            "TensorFlow sees no GPU (a CPU-only TensorFlow, or no CUDA libraries): "
            f'pip install "tensorflow[and-cuda]=={tf.__version__}", or run the Docker image '
            '(README, "Docker"); --allow-cpu trains on the CPU anyway'
        )
    return gpus


def _body(rest: list[str]) -> int:
    plan = planning.make_plan(_options())
    missing = planning.missing_records(plan)
    if FLAGS["dry-run"].value:
        path = planning.save_plan(plan)
        from m2cnn_tf.reproduce.report import plan_table

        print(plan_table(plan))
        if missing:
            print(f"not there yet: {', '.join(missing)}")
        print(f"plan written to {path}")
        return cli.EXIT_OK
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with common.importing():
        gpus = _devices()  # imports TensorFlow, but starts nothing yet
        if missing:
            raise UsageError(
                f"no records {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
                + "; convert those sizes with data_prep",
                setting="data",
            )
        if protocol.TRAIN_SETTINGS["deterministic"].value:
            common.prepare_determinism()  # before TensorFlow starts its first op
        from m2cnn_tf import evaluation, training  # noqa: F401  (what the runs load)
        from m2cnn_tf.reproduce import report, runs

    settings = runs.runtime_settings(len(gpus))
    extra = ", ".join(f"{k} {v}" for k, v in settings.items()) or "none"
    where = f"{len(gpus)} GPU(s)" if gpus else "CPU only (--allow-cpu)"
    print(f"reproduce.py: {where}; settings for this machine: {extra}", flush=True)
    planning.save_plan(plan)
    done = runs.carry_out(plan, gpus=len(gpus))
    paths = report.build(plan)
    print(
        f"trained {done['trained']} of {len(plan.runs)} runs and evaluated "
        f"{done['evaluated']} of {len(plan.evaluations)} now (the rest were done); "
        f"report: {', '.join(str(p) for p in paths.values())}"
    )
    return cli.EXIT_OK


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv)


def main() -> None:
    """Console-script entry point (m2cnn-reproduce) and the top-level reproduce.py."""
    sys.exit(run())
