"""Where a stage's results live, and the only way to read them back.

Layout of `--model-dir DIR` (one folder per stage, §II-C's 224 -> 448 -> 720 procedure):
    DIR/stage{N}/best.keras   the best model so far (by val kappa; from scores unless loss "ce")
    DIR/stage{N}/best.json    what it is: stage, resolution, preset, Multi-Cell path, epoch, metric
    DIR/stage{N}/config.json  the resolved `Config` of the run (nested JSON, `Config.load`)
Models load with Keras's safe_mode on, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras

from m2cnn_tf import cells  # noqa: F401  (registers ResidualScale for deserialisation)
from m2cnn_tf.common import BEST_META, BEST_MODEL, CONFIG, atomic_write_json, stage_dir
from m2cnn_tf.errors import UsageError

__all__ = ["BEST_META", "BEST_MODEL", "CONFIG", "CheckpointMissing", "stage_dir"]


class CheckpointMissing(UsageError):
    """No usable checkpoint where one was expected; the message is one actionable line."""


def save_best(model: keras.Model, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write the model then its metadata, each under a temporary name first: never half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / BEST_MODEL
    tmp = directory / f"tmp.{BEST_MODEL}"  # Keras wants the .keras suffix
    model.save(tmp)
    os.replace(tmp, target)
    atomic_write_json(directory / BEST_META, meta)
    return target


def best_model_path(model_dir: str | Path, stage: int) -> Path:
    path = stage_dir(model_dir, stage) / BEST_MODEL
    if not path.is_file():
        found = sorted(Path(model_dir).glob(f"stage*/{BEST_MODEL}"))
        there = ", ".join(p.parent.name for p in found)
        raise CheckpointMissing(
            f"no checkpoint for stage {stage}: {path} does not exist"
            + (f" (stages with a checkpoint: {there})" if there else "")
            + f"; train stage {stage} into {model_dir} first",
            setting="model_dir",
        )
    return path


def load_model(path: str | Path) -> keras.Model:
    """Load a `.keras` checkpoint in safe mode, without its optimizer state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissing(f"checkpoint not found: {path}")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # corrupt zip, foreign or unsafe content
        raise CheckpointMissing(f"cannot load checkpoint {path}: {err}") from None


def read_meta(model_dir: str | Path, stage: int) -> dict[str, Any]:
    """What the best model of a stage is (best.json; empty when there is none)."""
    meta_path = best_model_path(model_dir, stage).with_name(BEST_META)
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def load_stage(model_dir: str | Path, stage: int) -> tuple[keras.Model, dict[str, Any]]:
    """The best model of a stage and its metadata (best.json)."""
    return load_model(best_model_path(model_dir, stage)), read_meta(model_dir, stage)
