"""The one source of every training setting: its default, help text, choices and valid range.

Shaped like TF Model Garden's `official/vision` configs: nested dataclasses, one section per part
of the run, each part receiving only its own section: `model` (the network and its start, read by
`model` and `training.initialise`), `input` (how the train split is read, by `data`; named so
because the top-level `data` is the records folder), `augment` (ours, all of it: the paper
describes none; by `augmentation`, in tf.data or in the train step, never both), `optim` (the
objective and schedule, by the train step and the fit loop) and `runtime` (precision, devices,
seed, resuming: speed and robustness, not what an ideal run learns). The top level says which
run this is and where its inputs and outputs are.

Each field declares its help, choice list and valid range in its metadata (`setting`).
`commands/config_flags.py` derives train.py's flags from them through `SECTIONS`, `leaf_fields`,
`flat_key` and `assemble`, and `check_config` validates, so adding a setting is one edit: a
field here. The resolved `Config` is saved as nested JSON beside every checkpoint. Kept free of
TensorFlow, so that a usage error is reported before TF loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import UsageError

# §II-C and the slides: stage 1 trains the BaseNet at 224 px, stage 2 adds the medium cells at
# 448 px, stage 3 adds the large cells at 720 px. Each stage starts from the previous one.
STAGE_SIZES: dict[int, int] = {1: 224, 2: 448, 3: 720}

# §II-C: the Multi-Cell switch. Resolutions from MEDIUM_MIN get the medium cells
# (Reduction-B + N3 Cell-C), from LARGE_MIN also the large cells (Reduction-B + N4 Cell-C).
MEDIUM_MIN = 350
LARGE_MIN = 700

NUM_CLASSES = 5  # grades 0-4: none, mild, moderate, severe NPDR, PDR
MIN_IMAGE_SIZE = 75  # Inception-ResNet-v2's stem needs at least 75 px


@dataclasses.dataclass(frozen=True)
class Objective:
    """A Table II objective: the terms of Eq. (4) it minimises (`losses.TERMS`; L_reg always)
    and the val kappa that judges its runs. Adding one: an entry here, a term in losses.py."""

    terms: tuple[str, ...]
    judged_by: str  # "val_kappa_scores" or "val_kappa_probs"
    why: str


OBJECTIVES: dict[str, Objective] = {
    "multitask": Objective(("ce", "mse"), "val_kappa_scores", "Eq. (4): CE + MSE + L_reg"),
    # A CE-only run never trains its regression head, so its scores mean nothing: it is judged
    # by its probabilities. The others by their scores, Table II's preferred test (§III-B).
    "ce": Objective(("ce",), "val_kappa_probs", "Eq. (2) + L_reg"),
    "mse": Objective(("mse",), "val_kappa_scores", "Eq. (3) + L_reg"),
}

# The choice lists, defined here only.
LOSSES = tuple(OBJECTIVES)  # Table II's columns: Eq. (4) in full, or one task's loss + L_reg
# The paper names no optimizer; train_step.make_optimizer says what each one is and why Adam.
OPTIMIZERS = ("adam", "sgd", "momentum", "rmsprop")
STRATEGIES = ("default", "mirrored", "multiworker")  # tf.distribute; multiworker reads TF_CONFIG
# Where augmentation runs: in the train step on the accelerator, or in tf.data on the CPU.
AUGMENT_ON = ("step", "pipeline")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Block counts of the network (Fig. 2): N1 block35, N2 block17, N3/N4 Multi-Cell Cell-C;
    and a width (ours: nano's, for tests)."""

    name: str
    n1: int  # Inception-ResNet-A (block35) repeats
    n2: int  # Inception-ResNet-B (block17) repeats
    n_c: int  # Inception-ResNet-C (block8) repeats in the BaseNet, the last one linear
    n3: int  # Cell-C repeats after the medium Reduction-B
    n4: int  # Cell-C repeats after the large Reduction-B
    width: float = 1.0  # every filter count × width; 1 is IRv2's, the only one ImageNet fits


PRESETS: dict[str, Preset] = {
    # §III-A "Hyper-parameters": N1=10, N2=20, N3=10, N4=5; IRv2 itself has 10 block8.
    "paper": Preset("paper", n1=10, n2=20, n_c=10, n3=10, n4=5),
    # Every count 1: the same graph shape at a fraction of the cost, for CPU tests and the demo.
    "tiny": Preset("tiny", n1=1, n2=1, n_c=1, n3=1, n4=1),
    # Ours, for the tests' whole-pipeline runs (the demo and reproduce miniatures, the
    # training-run checks): tiny's graph at a quarter of every width, about 1/16 of its
    # multiply-adds and weights. No ImageNet weights fit it.
    "nano": Preset("nano", n1=1, n2=1, n_c=1, n3=1, n4=1, width=0.25),
}

PRESET_HELP = (
    "Block counts and width: paper (§III-A), tiny (every count 1; the demo) or nano "
    "(tiny at 1/4 width; tests)."
)


def unknown_choice(key: str, value: Any, choices: Iterable) -> UsageError:
    """The error for a value outside a setting's choice list, naming the setting."""
    listed = ", ".join(map(str, choices))
    return UsageError(
        f"unknown {key.replace('_', ' ')} {value!r}; choose one of {listed}", setting=key
    )


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise unknown_choice("preset", name, PRESETS) from None


def multi_cell_path(image_size: int) -> str:
    """§II-C: which cells a resolution goes through: 'small', 'medium' or 'large'."""
    if image_size >= LARGE_MIN:
        return "large"
    if image_size >= MEDIUM_MIN:
        return "medium"
    return "small"


# ---------------------------------------------------------------------------------------------
# Field declarations

Check = tuple[Callable[[Any], bool], str]  # (is the value valid?, what it must be)
POSITIVE: Check = (lambda v: v > 0, "must be positive")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    check: Check | None = None,
    key: str | None = None,
    flag: bool = True,
    required: bool = False,
    off_word: str | None = None,
) -> Any:
    """A config field with what the flag and the checks need.

    key: the field's flat name, its flag with `_` for `-` (default: the field name).
    flag=False keeps a field off the command line.
    required: the flag has no default and must be given (the field's default serves the library).
    off_word: a bool field's flag also takes this word for False (`--augment none`).
    """
    metadata = dict(help=help, choices=choices, check=check, key=key, flag=flag)
    metadata.update(required=required, off_word=off_word)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network (Fig. 2) and its starting weights (§III-A "Parameter Initialization").

    `sync_bn` is ours: the paper does not say how it spread training over devices. Under the
    mirrored and multiworker strategies each replica sees its share of the global batch, so
    without synchronisation BatchNorm normalises by per-replica statistics (at 720 px, a global
    batch of 16 on 8 GPUs gives 2 images per BatchNorm) and keeps one replica's moving
    averages. Synchronised, every BatchNorm uses the global batch's statistics, as on one device.
    """

    preset: str = setting(
        "paper",
        PRESET_HELP,
        choices=tuple(PRESETS),
    )
    num_classes: int = setting(NUM_CLASSES, "Grades of the classification head.", flag=False)
    multi_cell: bool = setting(
        True, "Add the Multi-Cell groups at 448/720 px (§II-C); off: plain BaseNet+MT (Table II)."
    )
    bn_momentum: float | None = setting(
        None,
        "BatchNorm moving-average momentum (default: the model's 0.99; ~0.9 suits short runs).",
        check=FRACTION,
    )
    sync_bn: bool | None = setting(
        None,
        "Synchronise BatchNorm's batch statistics over all replicas (default: on with more "
        "than one replica, off with one).",
    )
    weights: str = setting("imagenet", "Stage-1 backbone: imagenet, none or PATH.")
    init: str = setting("", "Start from this .keras checkpoint instead of stage N-1's best.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the train split is read (m2cnn_tf.data); val and test are always read as they are."""

    shuffle_buffer: int = setting(2048, "Shuffle buffer of serialized records.", check=POSITIVE)
    balance: bool = setting(False, "Resample grades; weights decay to the natural distribution.")
    balance_decay: float = setting(
        0.975,
        "Per-epoch factor of the balanced part (team o_O, Kaggle DR 2015).",
        check=(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train-split augmentation (m2cnn_tf.data): the fundus has no "up", so any rotation.

    Ours, all of it: the paper describes no augmentation (README, deviations table). On by
    default because Kaggle's photographs vary in orientation, framing and exposure; `enabled`
    False (`none`) turns every part off, in tf.data and in the train step alike.
    """

    enabled: bool = setting(
        True,
        "Augment the train split (ours: the paper describes none); none or false: no "
        "augmentation at all.",
        key="augment",
        off_word="none",
    )
    on: str = setting(
        "step",
        "Augment in the train step on the accelerator, or in tf.data on the CPU.",
        choices=AUGMENT_ON,
        key="augment_on",
    )
    flip: bool = setting(True, "Random left-right and up-down flips.")
    rotation: float = setting(180.0, "Max rotation in degrees.", check=NON_NEGATIVE)
    zoom: float = setting(0.1, "Max relative zoom in or out.", check=NON_NEGATIVE)
    shift: float = setting(0.05, "Max shift, fraction of the side.", check=NON_NEGATIVE)
    brightness: float = setting(
        0.1, "Max brightness shift on the [-1, 1] scale.", check=NON_NEGATIVE
    )
    contrast: float = setting(0.1, "Max relative contrast change around γ.", check=NON_NEGATIVE)
    fill_value: int = setting(
        128,
        "Fill of pixels from outside the image: γ of Eq. (1), the masked background.",
        check=(lambda v: 0 <= v <= 255, "must be in [0, 255]"),
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The objective and the schedule (§III-A: LR1 for weights that arrived trained, LR2 new)."""

    loss: str = setting(
        "multitask",
        "Objective (Table II): multitask = CE + MSE + L_reg (Eq. (4)); ce or mse = that task + "
        "L_reg.",
        choices=LOSSES,
    )
    optimizer: str = setting("adam", "Optimizer of both groups.", choices=OPTIMIZERS)
    lr_pretrained: float = setting(1e-4, "LR1, for loaded weights.", check=POSITIVE)
    lr_new: float = setting(1e-3, "LR2, for new weights.", check=POSITIVE)
    weight_decay: float = setting(
        4e-5, "L_reg coefficient (Eq. (4)); TF-slim's IRv2 value.", check=NON_NEGATIVE
    )
    epochs: int = setting(30, "Epochs.", check=POSITIVE)
    steps_per_epoch: int | None = setting(
        None, "Steps per epoch (default: train size // batch).", check=POSITIVE
    )
    batch_size: int = setting(32, "Global batch size.", check=POSITIVE)
    validation_freq: int = setting(
        1,
        "Validate after every N-th epoch and after the last; the best checkpoint is chosen "
        "among validated epochs.",
        check=POSITIVE,
    )


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the run executes: speed and robustness, not what an ideal run learns."""

    mixed_precision: bool = setting(False, "mixed_float16 with loss scaling.")
    xla: bool = setting(False, "Compile the train step with XLA.")
    strategy: str = setting(
        "default", "tf.distribute strategy (multiworker reads TF_CONFIG).", choices=STRATEGIES
    )
    seed: int | None = setting(None, "Seed: deterministic input order, augmentation and init.")
    deterministic: bool = setting(
        False,
        "Bit-for-bit reruns: op determinism, Python/NumPy/TF seeded (seed 0 unless given), "
        "deterministic tf.data.",
    )
    resume: bool = setting(True, "Resume from DIR/stageN/backup if present.")
    backup_steps: int | None = setting(
        None, "Also back up every N steps (default: each epoch).", check=POSITIVE
    )
    log_steps: int = setting(50, "TensorBoard batch-level logging interval.", check=POSITIVE)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. Defaults are the paper's (§III-A) where it gives one."""

    stage: int = setting(
        1,
        "Training stage: 1 → 224 px, 2 → 448 px, 3 → 720 px.",
        choices=tuple(STAGE_SIZES),
        required=True,
    )
    data: str = setting("", "OUT folder of data_prep (holds OUT/<size>/*.tfrecord).", required=True)
    model_dir: str = setting(
        "", "Folder of all stages: DIR/stage1/, DIR/stage2/, ...", required=True
    )
    image_size: int | None = setting(
        None,
        "Override the stage's resolution (experiments).",
        check=(lambda v: v >= MIN_IMAGE_SIZE, f"must be at least {MIN_IMAGE_SIZE} (IRv2's stem)"),
    )
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    input: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def resolved_image_size(self) -> int:
        if self.image_size:
            return self.image_size
        if self.stage not in STAGE_SIZES:
            raise UsageError(
                f"stage must be one of {', '.join(map(str, STAGE_SIZES))}, got {self.stage}",
                setting="stage",
            )
        return STAGE_SIZES[self.stage]

    def resolved_multi_cell_path(self) -> str:
        """§II-C's path of the run's model: 'small' whenever the cells are switched off."""
        if not self.model.multi_cell:
            return "small"
        return multi_cell_path(self.resolved_image_size())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The resolved configuration, printed at start."""
        values = self.to_dict()
        values["resolved_image_size"] = self.resolved_image_size()
        values["multi_cell_path"] = self.resolved_multi_cell_path()
        return json.dumps(values, indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Nested values, as `save` writes them; unknown keys are ignored, missing ones take
        their defaults."""
        found = []
        for section, f in leaf_fields():
            where = values if section is None else values.get(section)
            if isinstance(where, dict) and f.name in where:
                found.append((section, f.name, where[f.name]))
        return assemble(found)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in dataclasses.fields(Config) if not f.metadata
}


def leaf_fields() -> Iterator[tuple[str | None, dataclasses.Field]]:
    """(section name or None for the top level, field) of every setting, in declaration order."""
    for f in dataclasses.fields(Config):
        if f.metadata:
            yield None, f
        else:
            for g in dataclasses.fields(SECTIONS[f.name]):
                yield f.name, g


def flat_key(f: dataclasses.Field) -> str:
    """The field's flat name: its flag without `--`, with `_` for `-`."""
    return f.metadata["key"] or f.name


def assemble(values: Iterable[tuple[str | None, str, Any]]) -> Config:
    """A Config from (section or None, field name, value); what is not given keeps its default."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, name, value in values:
        (top if section is None else sections[section])[name] = value
    return Config(**top, **{k: SECTIONS[k](**v) for k, v in sections.items()})


# ---------------------------------------------------------------------------------------------
# Validation


def check_config(config: Config) -> None:
    """Reject a config that cannot run, before any work: a UsageError naming the setting."""
    for section, f in leaf_fields():
        value = getattr(config if section is None else getattr(config, section), f.name)
        key, choices, check = flat_key(f), f.metadata["choices"], f.metadata["check"]
        if choices is not None and value not in choices:
            raise unknown_choice(key, value, choices)
        if check is not None and value is not None and not check[0](value):
            raise UsageError(f"{key.replace('_', ' ')} {check[1]}, got {value}", setting=key)
    if not config.data or not os.path.isdir(config.data):
        raise UsageError(
            f"{config.data!r} is not a directory (the OUT folder of data_prep)", setting="data"
        )
    if not config.model_dir:
        raise UsageError("no model folder given", setting="model_dir")
