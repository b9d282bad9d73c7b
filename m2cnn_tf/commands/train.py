"""Train one stage of M²CNN.

    python train.py --stage {1,2,3} --data OUT --model-dir DIR [flags]

Stage 1 (224 px) trains the BaseNet + Multi-Task heads from ImageNet; stage 2 (448 px) adds the
medium cells and starts from stage 1's best; stage 3 (720 px) adds the large cells and starts
from stage 2's best (§II-C, §III-A). `--loss ce|mse` and `--nomulti-cell` train Table II's
ablation columns instead. Every flag is a field of `m2cnn_tf.config.Config`. It prints first
the devices it will use (a GPU host that sees no GPU shows at once), then the resolved
configuration, which it saves as DIR/stageN/config.json.
Exit codes: 0 done, 1 training stopped (NaN, out of memory), 2 usage error,
130 interrupted (state saved; rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from m2cnn_tf import cli, common, config
from m2cnn_tf.commands import config_flags
from m2cnn_tf.errors import Interrupted

FLAGS = flags.FlagValues()
config_flags.define_flags(FLAGS)
PROG = "train.py"


def duration(seconds: float) -> str:
    """Wall time for people: "48 s", "5 min 12 s", "2 h 03 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _body(rest: list[str]) -> None:
    settings = config_flags.from_flags(FLAGS)
    config.check_config(settings)  # before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if settings.runtime.deterministic:
        common.prepare_determinism()
    with common.importing():
        from m2cnn_tf import distribution, training
        from m2cnn_tf.callbacks import metric_label

    runtime = settings.runtime
    for line in distribution.describe_devices(runtime.strategy, runtime.mixed_precision):
        print(line, flush=True)
    print("resolved configuration:\n" + settings.describe(), flush=True)
    result = training.run(settings)
    print(
        f"done in {duration(result['seconds'])}: best val kappa "
        f"({metric_label(result['best_metric'])}) {result['best_val_kappa']:.4f}; "
        f"checkpoint in {result['stage_dir']}"
    )
    if result["interrupted"]:  # Ctrl-C during the last step: nothing was left to stop
        raise Interrupted("interrupted as the stage finished; it is complete")


def run(argv: list[str] | None = None) -> int:
    argv = config_flags.join_switch_words(sys.argv if argv is None else argv)  # `--augment none`
    return cli.run(PROG, __doc__, FLAGS, _body, argv)


def main() -> None:
    """Console-script entry point (m2cnn-train) and the top-level train.py."""
    sys.exit(run())
