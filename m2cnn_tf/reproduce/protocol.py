"""The paper's experiments as data: every run that Table II, Table III and Fig. 4 need, and how
each is trained and evaluated (`figures` says which run stands for which figure).

This is the one declaration of the reproduction protocol. `plan.py` plans the runs from it,
`report.py` sets our figures beside the paper's, and the README's deviations table states its
`ours` values (tests/test_reproduce.py keeps the two in step).

Every value is `Tagged`: `paper` with where the paper says it (§, table, figure), or `ours`
with the reason, the README row that states it (`topic`) and the text that row shows.

A run is named after what it trains: `mse`, `ce`, `mt` (Multi-Task, Eq. (4)) are BaseNet runs
without the Multi-Cell (Table II's ablation columns, "BaseNet" and "BaseNet+MT" of Table III);
`m2cnn` runs carry the Multi-Cell (§II-C) and start from the run before them in the chain
224 -> 448 -> 720 (the slides' three stages, Table II's rows). A suffix `_ft` marks an ablation
run fine-tuned from the previous size (`--ablation-init stage`, ours); `_60k`, `_26k`, `_40k`
mark Fig. 4's longer runs. Sizes are the paper's nominal ones; `--sizes` maps them to others
for miniatures. Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PAPER, OURS = "paper", "ours"
IMAGENET = "imagenet"  # the init of a run that starts from the ImageNet backbone (§III-A)
RUN_PREFIX = "run:"  # the init of a run that starts from another run's best checkpoint


@dataclasses.dataclass(frozen=True)
class Tagged:
    """A value of the protocol and where it comes from.

    source: PAPER or OURS. note: for PAPER where the paper says it, for OURS why we chose it.
    topic: for OURS, the README deviations-table row that states it; shown: the text that row's
    "here" cell must hold ("{value}" is replaced by the value).
    """

    value: Any
    source: str
    note: str
    topic: str = ""
    shown: str = ""

    def rendered(self) -> str:
        return self.shown.format(value=_plain(self.value))


def paper(value: Any, where: str) -> Tagged:
    return Tagged(value, PAPER, where)


def ours(value: Any, why: str, *, topic: str, shown: str = "{value}") -> Tagged:
    return Tagged(value, OURS, why, topic, shown)


def _plain(value: Any) -> str:
    """4e-05 -> 4e-5, 2000 -> 2,000, 20000 -> 20k: numbers as the README writes them."""
    if isinstance(value, float):
        mantissa, _, exponent = f"{value:g}".partition("e")
        return f"{mantissa}e{int(exponent)}" if exponent else mantissa
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1000:
        return f"{value // 1000}k" if value >= 10000 and value % 1000 == 0 else f"{value:,}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Sizes, and the settings every run shares

SIZES = paper((224, 448, 720), "Table II's rows; the slides' training stages 224 -> 448 -> 720")

# Passed to train.py as --<name with dashes> for every run, so that no run depends on a default.
TRAIN_SETTINGS: dict[str, Tagged] = {
    "preset": paper("paper", "§III-A 'Hyper-parameters': N1=10, N2=20, N3=10, N4=5"),
    "lr_pretrained": paper(1e-4, "§III-A 'Hyper-parameters': LR1 for fine-tuned weights"),
    "lr_new": paper(1e-3, "§III-A 'Hyper-parameters': LR2 for the other weights"),
    "optimizer": ours(
        "adam",
        "the paper names none; Adam copes with the tenfold gap between LR1 and LR2 and the scale "
        "gap between the CE and MSE heads without tuning",
        topic="optimizer, schedule, batch",
        shown="Adam",
    ),
    "weight_decay": ours(
        4e-5,
        "Eq. (4) names L_reg without a coefficient; TF-slim's Inception-ResNet-v2 value",
        topic="L_reg",
    ),
    "batch_size": ours(
        16,
        "the paper gives none; one batch at every size keeps a step of Fig. 4 the same number of "
        "images at 224, 448 and 720 px, and 16 at 720 px takes 11-17 GB with mixed precision by "
        "the dry run's estimate: it fits a 24 GB GPU with room for what the estimate leaves out",
        topic="optimizer, schedule, batch",
        shown="batch {value} at every size",
    ),
    "bn_momentum": ours(
        0.99,
        "the paper gives none; Keras's Inception-ResNet-v2 value, right for runs of 12k steps "
        "and more (0.9 is only for runs of a few hundred steps)",
        topic="BatchNorm momentum",
    ),
    "seed": ours(
        0,
        "the paper gives none; a fixed seed makes input order, augmentation and new weights "
        "repeatable",
        topic="optimizer, schedule, batch",
        shown="seed {value}",
    ),
    "deterministic": ours(
        True,
        "the paper gives none; with op determinism, one op at a time and a deterministic input "
        "pipeline, the same command gives the same weights bit for bit, so a difference between "
        "two runs is the models' own and not the summation order of the hardware",
        topic="optimizer, schedule, batch",
        shown="bit-for-bit reruns (`--deterministic`)",
    ),
}

# Train-time settings that are not flags of their own: train.py already behaves so.
AUGMENTATION = ours(
    "on",
    "the paper describes none; the fundus has no preferred orientation, and Kaggle's photographs "
    "vary in framing and exposure (train.py's default flips, rotation, zoom, shift, brightness, "
    "contrast)",
    topic="augmentation",
    shown="{value} by default",
)
LR_SCHEDULE = ours(
    "constant",
    "the paper gives none; a constant rate makes a run's first k steps the same whatever its "
    "length, so Fig. 4's 224@60k, 448@26k and 448*@40k continue 224@20k, 448@20k and 448*@32k",
    topic="optimizer, schedule, batch",
    shown="{value} learning rates",
)
MIXED_PRECISION = ours(
    True,
    "the paper gives none; mixed_float16 with loss scaling halves the activations, so that the "
    "batch fits at 720 px; only where a GPU is (on a CPU it is slower, not smaller)",
    topic="GPUs",
    shown="mixed precision on with a GPU",
)
MULTI_GPU = ours(
    "mirrored",
    "the paper gives none; with several GPUs every one of them trains (tf.distribute's mirrored "
    "strategy), each on its share of the same global batch, with synchronised BatchNorm",
    topic="GPUs",
    shown="every GPU when there are several",
)
VALIDATE_EVERY = ours(
    2000,
    "Fig. 4 plots val kappa against steps; every 2,000 steps gives 10 points per 20k run, and "
    "every step count of the plan is a multiple",
    topic="optimizer, schedule, batch",
    shown="val every {value} steps",
)

# ---------------------------------------------------------------------------------------------
# Steps: Fig. 4 where it gives them, ours elsewhere

STEPS: dict[str, Tagged] = {
    "224": paper(20000, "Fig. 4: 224@20k, from ImageNet"),
    "224_60k": paper(60000, "Fig. 4: 224@60k, from ImageNet"),
    "448": paper(20000, "Fig. 4: 448@20k, 'without fine-tuning'"),
    "448_26k": paper(26000, "Fig. 4: 448@26k, from ImageNet"),
    "448_ft": paper(12000, "Fig. 4: 448*@32k = 224@20k + 12k steps at 448"),
    "448_ft_40k": paper(20000, "Fig. 4: 448*@40k = 224@20k + 20k steps at 448"),
    "720": ours(
        20000,
        "the paper gives no 720 schedule; Fig. 4 trains every run from ImageNet for 20k steps "
        "(224@20k, 448@20k)",
        topic="steps the paper does not give",
        shown="{value} steps at 720 from ImageNet",
    ),
    "720_ft": ours(
        12000,
        "the paper gives no 720 schedule; as many steps as 448* adds after 224 (Fig. 4: 32k - 20k)",
        topic="steps the paper does not give",
        shown="{value} steps at 720 after 448*",
    ),
}

ABLATION_STEPS = ours(
    "as Multi-Task",
    "Fig. 4 gives the schedules of Multi-Task runs only (§III-B); the MSE and CE columns of "
    "Table II train as long, so that only the loss differs",
    topic="steps the paper does not give",
    shown="MSE and CE {value}",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: one model directory, trained once, used by every cell that needs it.

    init: IMAGENET (the backbone weights the user picks: imagenet, none or a path) or
    RUN_PREFIX + name (that run's checkpoint; stage N+1 of the slides' chain).
    steps: the run's own steps, from its init. continues: a run with the same settings and
    fewer steps whose training this one carries on (possible because the rate is constant).
    """

    name: str
    loss: str  # train.py --loss: multitask (Eq. (4)), ce (Eq. (2)), mse (Eq. (3))
    multi_cell: bool
    size: int  # nominal: 224, 448 or 720
    init: str
    steps: Tagged
    continues: str = ""


def _ablation(loss: str, short: str) -> list[Run]:
    """An ablation column at the three sizes, from ImageNet (§III-A "for BaseNet, it is
    initialized with parameters trained for ImageNet classification") and, for
    --ablation-init stage, fine-tuned from the size before (ours; the `_ft` runs)."""
    return [
        Run(f"{short}224", loss, False, 224, IMAGENET, STEPS["224"]),
        Run(f"{short}448", loss, False, 448, IMAGENET, STEPS["448"]),
        Run(f"{short}720", loss, False, 720, IMAGENET, STEPS["720"]),
        Run(f"{short}448_ft", loss, False, 448, f"{RUN_PREFIX}{short}224", STEPS["448_ft"]),
        Run(f"{short}720_ft", loss, False, 720, f"{RUN_PREFIX}{short}448_ft", STEPS["720_ft"]),
    ]


RUNS: dict[str, Run] = {
    r.name: r
    for r in [
        *_ablation("mse", "mse"),
        *_ablation("ce", "ce"),
        *_ablation("multitask", "mt"),
        # §III-A: "For M²CNN, it is trained based on the weights of BaseNet+MT"; the slides'
        # chain 224 -> 448 -> 720.
        Run("m2cnn448", "multitask", True, 448, f"{RUN_PREFIX}mt224", STEPS["448_ft"]),
        Run("m2cnn720", "multitask", True, 720, f"{RUN_PREFIX}m2cnn448", STEPS["720_ft"]),
        # Fig. 4's longer runs carry on the shorter ones (LR_SCHEDULE).
        Run("mt224_60k", "multitask", False, 224, IMAGENET, STEPS["224_60k"], "mt224"),
        Run("mt448_26k", "multitask", False, 448, IMAGENET, STEPS["448_26k"], "mt448"),
        Run(
            "m2cnn448_40k",
            "multitask",
            True,
            448,
            f"{RUN_PREFIX}mt224",
            STEPS["448_ft_40k"],
            "m2cnn448",
        ),
    ]
}

# ---------------------------------------------------------------------------------------------
# Which checkpoint stands for a run, and how a run is repeated

ABLATION_INITS = ("imagenet", "stage")  # --ablation-init: §III-A, or ours (no paper reports it)
CHECKPOINTS = ("last", "best")  # --checkpoint
CHECKPOINT = paper(
    "last",
    "Fig. 4 counts a run by its steps (448*@32k is 224@20k + 12k steps), so a run hands on, "
    "and is reported by, the weights after its last step; best-on-val is shown beside it, "
    "labelled as selected on the split it was selected on",
)
SEEDS = ours(
    1,
    "the paper reports one run per cell; --seeds N repeats every run with seeds 0..N-1, so that "
    "the tables give the spread a seed alone makes",
    topic="optimizer, schedule, batch",
    shown="--seeds N",
)

# ---------------------------------------------------------------------------------------------
# Evaluation

EXPERIMENTS = ("table2", "table3", "fig4")
EVAL_SPLITS: dict[str, Tagged] = {
    "table2": paper(("val",), "§III-B: Table II and Fig. 4 'are evaluated on validation set'"),
    "table3": paper(("val", "test"), "Table III: val set and test set"),
    "fig4": paper(("val",), "§III-B; read from each run's validations (epochs.csv)"),
}
EVALUATION: dict[str, Tagged] = {
    "thresholds": ours(
        "round",
        "the paper does not say how a score becomes a grade; rounding is the plain reading",
        topic="evaluation",
        shown="scores rounded to grades",
    ),
    "tta": ours(
        "none", "the paper mentions no test-time augmentation", topic="evaluation", shown="no TTA"
    ),
    "bootstrap": ours(
        1000,
        "the paper gives no interval; a 95% percentile bootstrap over patients says how far a "
        "difference from the paper's figure is noise",
        topic="evaluation",
        shown="95% CI from {value} bootstrap replicates",
    ),
}


def tagged_values() -> dict[str, Tagged]:
    """The protocol's tagged values by a dotted name (`figures.tagged_values` adds the cells')."""
    values = {
        "sizes": SIZES,
        "augmentation": AUGMENTATION,
        "lr_schedule": LR_SCHEDULE,
        "mixed_precision": MIXED_PRECISION,
        "multi_gpu": MULTI_GPU,
        "validate_every": VALIDATE_EVERY,
        "ablation_steps": ABLATION_STEPS,
        "checkpoint": CHECKPOINT,
        "seeds": SEEDS,
    }
    values.update({f"train.{k}": v for k, v in TRAIN_SETTINGS.items()})
    values.update({f"steps.{k}": v for k, v in STEPS.items()})
    values.update({f"eval_splits.{k}": v for k, v in EVAL_SPLITS.items()})
    values.update({f"evaluation.{k}": v for k, v in EVALUATION.items()})
    return values
