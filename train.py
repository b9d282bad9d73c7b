"""Train one stage of M²CNN: `python train.py --stage {1,2,3} --data OUT --model-dir DIR [flags]`.

Stage 1 (224 px) trains the BaseNet + Multi-Task heads from ImageNet; stage 2 (448 px) adds the
medium cells and starts from stage 1's best; stage 3 (720 px) adds the large cells and starts
from stage 2's best (§II-C, §III-A). `--loss ce|mse` and `--nomulti-cell` train Table II's
ablation columns instead. Exit codes: 0 done, 1 training stopped (NaN, OOM),
2 usage error, 130 interrupted (state saved; rerun to resume).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from m2cnn_tf.config import LOSSES, STAGE_SIZES, Config

FLAGS = flags.FlagValues()
_defaults = Config()
flags.DEFINE_enum(
    "stage",
    None,
    [str(s) for s in STAGE_SIZES],
    "Training stage: 1 → 224 px, 2 → 448 px, 3 → 720 px.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "data", None, "OUT folder of data_prep (holds OUT/<size>/*.tfrecord).", flag_values=FLAGS
)
flags.DEFINE_string(
    "model-dir", None, "Folder of all stages: DIR/stage1/, DIR/stage2/, ...", flag_values=FLAGS
)
flags.DEFINE_integer(
    "image-size", None, "Override the stage's resolution (experiments).", flag_values=FLAGS
)
flags.DEFINE_string(
    "weights", _defaults.weights, "Stage-1 backbone: imagenet, none or PATH.", flag_values=FLAGS
)
flags.DEFINE_string(
    "init", "", "Start from this .keras checkpoint instead of stage N-1's best.", flag_values=FLAGS
)
flags.DEFINE_integer("epochs", _defaults.epochs, "Epochs.", flag_values=FLAGS)
flags.DEFINE_integer(
    "steps-per-epoch", None, "Steps per epoch (default: train size // batch).", flag_values=FLAGS
)
flags.DEFINE_integer("batch-size", _defaults.batch_size, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_enum("preset", _defaults.preset, ["paper", "tiny"], "Block counts.", flag_values=FLAGS)
flags.DEFINE_enum(
    "loss",
    _defaults.loss,
    list(LOSSES),
    "Objective (Table II): multitask = CE + MSE + L_reg (Eq. (4)); ce or mse = that task + L_reg.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "multi-cell",
    _defaults.multi_cell,
    "Add the Multi-Cell groups at 448/720 px (§II-C); --nomulti-cell: plain BaseNet+MT.",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "lr-pretrained", _defaults.lr_pretrained, "LR1, for loaded weights.", flag_values=FLAGS
)
flags.DEFINE_float("lr-new", _defaults.lr_new, "LR2, for new weights.", flag_values=FLAGS)
flags.DEFINE_enum(
    "optimizer",
    _defaults.optimizer,
    ["adam", "sgd", "momentum", "rmsprop"],
    "Optimizer of both groups.",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "weight-decay", _defaults.weight_decay, "L_reg coefficient (Eq. (4)).", flag_values=FLAGS
)
flags.DEFINE_float(
    "bn-momentum",
    None,
    "BatchNorm moving-average momentum for this run "
    "(default: the model's 0.99; ~0.9 suits short runs).",
    flag_values=FLAGS,
)
flags.DEFINE_bool("mixed-precision", False, "mixed_float16 with loss scaling.", flag_values=FLAGS)
flags.DEFINE_bool("xla", False, "Compile the train step with XLA.", flag_values=FLAGS)
flags.DEFINE_enum(
    "strategy",
    "default",
    ["default", "mirrored", "multiworker"],
    "tf.distribute strategy (multiworker reads TF_CONFIG).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "seed", None, "Seed: deterministic input order, augmentation and init.", flag_values=FLAGS
)
flags.DEFINE_bool(
    "balance",
    False,
    "Resample grades; weights decay to the natural distribution.",
    flag_values=FLAGS,
)
flags.DEFINE_bool("resume", True, "Resume from DIR/stageN/backup if present.", flag_values=FLAGS)
flags.DEFINE_bool("augment", _defaults.augment, "Augment the train split.", flag_values=FLAGS)
flags.DEFINE_enum(
    "augment-on",
    _defaults.augment_on,
    ["step", "pipeline"],
    "Augment in the train step on the accelerator, or in tf.data on the CPU.",
    flag_values=FLAGS,
)
flags.DEFINE_integer("backup-steps", None, "Also back up every N steps.", flag_values=FLAGS)
for _name in ("stage", "data", "model-dir"):
    flags.mark_flag_as_required(_name, flag_values=FLAGS)


def _usage_error(message: str) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return 2


def config_from_flags() -> Config:
    f = {name: FLAGS[name].value for name in FLAGS}
    return Config(
        stage=int(f["stage"]),
        image_size=f["image-size"],
        preset=f["preset"],
        loss=f["loss"],
        multi_cell=f["multi-cell"],
        data=f["data"],
        model_dir=f["model-dir"],
        weights=f["weights"],
        init=f["init"],
        lr_pretrained=f["lr-pretrained"],
        lr_new=f["lr-new"],
        optimizer=f["optimizer"],
        weight_decay=f["weight-decay"],
        bn_momentum=f["bn-momentum"],
        epochs=f["epochs"],
        steps_per_epoch=f["steps-per-epoch"],
        batch_size=f["batch-size"],
        mixed_precision=f["mixed-precision"],
        xla=f["xla"],
        strategy=f["strategy"],
        seed=f["seed"],
        resume=f["resume"],
        balance=f["balance"],
        augment=f["augment"],
        augment_on=f["augment-on"],
        backup_steps=f["backup-steps"],
    )


def main(argv: list[str]) -> int:
    FLAGS.unparse_flags()  # main() may run twice in one process (tests)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\n" + FLAGS.get_help())
        return 0
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        return _usage_error(str(err).splitlines()[0])
    if len(rest) > 1:
        return _usage_error(f"unexpected arguments: {' '.join(rest[1:])}")
    config = config_from_flags()

    from m2cnn_tf import checkpoints, data, training
    from m2cnn_tf.model import WeightsUnavailable

    try:
        training.check_config(config)
    except ValueError as err:
        return _usage_error(str(err))
    print("resolved configuration:\n" + training.describe(config), flush=True)
    try:
        result = training.run(config)
    except (data.DataError, checkpoints.CheckpointMissing, WeightsUnavailable) as err:
        return _usage_error(str(err))
    except training.TrainingError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 130 if str(err).startswith("interrupted") else 1
    way = "prob." if result["best_metric"] == "val_kappa_probs" else "scores"
    print(
        f"done: best val kappa ({way}) {result['best_val_kappa']:.4f}; "
        f"checkpoint in {result['stage_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
