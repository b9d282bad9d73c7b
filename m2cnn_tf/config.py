"""The one configuration object: training stages, model presets and every run setting.

Flags (train.py, evaluate.py) override the defaults here, and the resolved `Config` is saved as
JSON next to every checkpoint so that a stage can always be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# §II-C and the slides: stage 1 trains the BaseNet at 224 px, stage 2 adds the medium cells at
# 448 px, stage 3 adds the large cells at 720 px. Each stage starts from the previous one.
STAGE_SIZES: dict[int, int] = {1: 224, 2: 448, 3: 720}

# §II-C: the Multi-Cell switch. Resolutions from MEDIUM_MIN get the medium cells
# (Reduction-B + N3 Cell-C), from LARGE_MIN also the large cells (Reduction-B + N4 Cell-C).
MEDIUM_MIN = 350
LARGE_MIN = 700

NUM_CLASSES = 5  # grades 0-4: none, mild, moderate, severe NPDR, PDR

# Table II's training objectives: Eq. (4) in full, or one task's loss (Eq. (2) or (3)) + L_reg.
LOSSES = ("multitask", "ce", "mse")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Block counts of the network (Fig. 2): N1 block35, N2 block17, N3/N4 Multi-Cell Cell-C."""

    name: str
    n1: int  # Inception-ResNet-A (block35) repeats
    n2: int  # Inception-ResNet-B (block17) repeats
    n_c: int  # Inception-ResNet-C (block8) repeats in the BaseNet, the last one linear
    n3: int  # Cell-C repeats after the medium Reduction-B
    n4: int  # Cell-C repeats after the large Reduction-B


PRESETS: dict[str, Preset] = {
    # §III-A "Hyper-parameters": N1=10, N2=20, N3=10, N4=5; IRv2 itself has 10 block8.
    "paper": Preset("paper", n1=10, n2=20, n_c=10, n3=10, n4=5),
    # Every count 1: the same graph shape at a fraction of the cost, for CPU tests and the demo.
    "tiny": Preset("tiny", n1=1, n2=1, n_c=1, n3=1, n4=1),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def multi_cell_path(image_size: int) -> str:
    """§II-C: which cells a resolution goes through: 'small', 'medium' or 'large'."""
    if image_size >= LARGE_MIN:
        return "large"
    if image_size >= MEDIUM_MIN:
        return "medium"
    return "small"


@dataclasses.dataclass
class Config:
    """Everything that defines a run. Defaults are the paper's (§III-A) where it gives one."""

    # What to build
    stage: int = 1
    image_size: int | None = None  # None: the stage's resolution from STAGE_SIZES
    preset: str = "paper"
    num_classes: int = NUM_CLASSES
    multi_cell: bool = True  # False: the plain BaseNet+MT at any size (Table II "Multi-Task")
    loss: str = "multitask"  # one of LOSSES (Table II's MSE / CE / Multi-Task columns)
    # Where things are
    data: str = ""
    model_dir: str = ""
    weights: str = "imagenet"  # stage 1 backbone: imagenet | none | PATH
    init: str = ""  # stage N>1: checkpoint to start from instead of stage N-1's best
    # Optimisation (§III-A: LR1 for weights that arrived trained, LR2 for new ones)
    lr_pretrained: float = 1e-4
    lr_new: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 4e-5  # L_reg of Eq. (4); TF-slim's IRv2 value
    bn_momentum: float | None = None  # None: the model's (Keras IRv2: 0.99); lower for short runs
    epochs: int = 30
    steps_per_epoch: int | None = None
    batch_size: int = 32
    # Input pipeline (m2cnn_tf.data). Augmentation: the fundus has no "up", so any rotation.
    augment: bool = True  # master switch for the train split; val/test are never augmented
    # Where: "step" = in the train step on the accelerator (default: tf.data cannot feed a GPU
    # at 720 px otherwise, benchmarks/input_pipeline.py), "pipeline" = in tf.data on the CPU.
    augment_on: str = "step"
    flip: bool = True  # left-right and up-down
    rotation: float = 180.0  # max |angle| in degrees
    zoom: float = 0.1  # max relative zoom in or out
    shift: float = 0.05  # max shift, fraction of the side
    brightness: float = 0.1  # max additive shift on the [-1, 1] scale
    contrast: float = 0.1  # max relative contrast change around γ (0 on the [-1, 1] scale)
    fill_value: int = 128  # γ of Eq. (1): the grey of the masked background
    shuffle_buffer: int = 2048
    balance: bool = False  # resample grades, decaying toward the natural distribution
    balance_decay: float = 0.975  # per-epoch factor of the balanced part (team o_O, 2015)
    # Runtime
    mixed_precision: bool = False
    xla: bool = False
    strategy: str = "default"
    seed: int | None = None
    resume: bool = True
    backup_steps: int | None = None  # also back up every N steps (None: each epoch)
    log_steps: int = 50  # TensorBoard batch-level logging interval

    def resolved_image_size(self) -> int:
        if self.image_size:
            return self.image_size
        if self.stage not in STAGE_SIZES:
            raise ValueError(f"--stage must be one of {sorted(STAGE_SIZES)}, got {self.stage}")
        return STAGE_SIZES[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))
