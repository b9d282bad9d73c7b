"""What the user of reproduce.py chose: which experiments, at which scale, from which weights.

The defaults reproduce every experiment as the protocol says; the options only pick experiments,
scale the steps, map the paper's sizes to others (a miniature), and replace the batch size or
the backbone weights. Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from m2cnn_tf.config import MIN_IMAGE_SIZE, PRESETS, multi_cell_path
from m2cnn_tf.errors import UsageError
from m2cnn_tf.reproduce import protocol

WEIGHTS_CHOICES = ("imagenet", "none")  # or a path (train.py --weights)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user chose; the defaults reproduce every experiment as the protocol says."""

    data: str
    out: str
    experiments: tuple[str, ...] = protocol.EXPERIMENTS
    preset: str = protocol.TRAIN_SETTINGS["preset"].value
    batch_size: int = protocol.TRAIN_SETTINGS["batch_size"].value
    steps_scale: float = 1.0
    weights: str = "imagenet"
    sizes: tuple[int, ...] = protocol.SIZES.value
    ablation_init: str = "imagenet"
    checkpoint: str = protocol.CHECKPOINT.value  # what a chained run starts from, a cell shows
    seeds: int = protocol.SEEDS.value

    def check(self) -> None:
        """A UsageError naming the setting, before any work."""
        unknown = [e for e in self.experiments if e not in protocol.EXPERIMENTS]
        if unknown or not self.experiments:
            raise UsageError(
                f"choose from {', '.join(protocol.EXPERIMENTS)}, got {','.join(self.experiments)}",
                setting="experiments",
            )
        if self.preset not in PRESETS:
            raise UsageError(f"choose one of {', '.join(PRESETS)}", setting="preset")
        if self.batch_size < 1:
            raise UsageError(f"must be positive, got {self.batch_size}", setting="batch_size")
        if not (self.steps_scale > 0 and math.isfinite(self.steps_scale)):
            raise UsageError(f"must be positive, got {self.steps_scale}", setting="steps_scale")
        if self.checkpoint not in protocol.CHECKPOINTS:
            raise UsageError(
                f"choose one of {', '.join(protocol.CHECKPOINTS)}", setting="checkpoint"
            )
        if self.seeds < 1:
            raise UsageError(f"must be at least 1, got {self.seeds}", setting="seeds")
        if self.ablation_init not in protocol.ABLATION_INITS:
            raise UsageError(
                f"choose one of {', '.join(protocol.ABLATION_INITS)}", setting="ablation_init"
            )
        if self.weights not in WEIGHTS_CHOICES and not Path(self.weights).is_file():
            raise UsageError(
                f"{self.weights!r} is neither imagenet, none nor a file", setting="weights"
            )
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Three sizes that take the paper's three Multi-Cell paths (§II-C), in order."""
        nominal = protocol.SIZES.value
        paths = [multi_cell_path(s) for s in nominal]
        if len(self.sizes) != len(nominal) or any(
            s < MIN_IMAGE_SIZE or multi_cell_path(s) != p
            for s, p in zip(self.sizes, paths, strict=False)
        ):
            raise UsageError(
                f"need three sizes that take the Multi-Cell paths of {nominal} ({', '.join(paths)}"
                f": {MIN_IMAGE_SIZE}-349, 350-699, 700 and above), got "
                f"{','.join(map(str, self.sizes))}",
                setting="sizes",
            )

    def size(self, nominal: int) -> int:
        return dict(zip(protocol.SIZES.value, self.sizes, strict=True))[nominal]

    def steps(self, paper_steps: int) -> int:
        """--steps-scale: every step count times the scale, at least 1."""
        return max(1, round(paper_steps * self.steps_scale))
