"""Where a stage's files live, what they are, and the only way to read them back.

Layout of `--model-dir DIR` (one folder per stage: the slides' 224 -> 448 -> 720 stages):
    DIR/stage{N}/best.keras   the best model so far (by the val kappa its objective is judged by)
    DIR/stage{N}/best.json    what it is: stage, resolution, preset, Multi-Cell path, epoch, metric
    DIR/stage{N}/last.keras   the weights after the run's final step, and last.json
    DIR/stage{N}/config.json  the resolved `Config` of the run (nested JSON, `Config.load`)
    DIR/stage{N}/export/      its deployable files (export.py), each with a JSON sidecar that
                              says what it is and which checkpoint it came from
Free of TensorFlow: Keras is imported only to save or load a model, so a LiteRT runtime finds,
reads and checks its files without it. Models load with Keras's safe_mode on, so a checkpoint
from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import UsageError

BEST_MODEL = "best.keras"
BEST_META = "best.json"
CONFIG = "config.json"
# Which of a stage's checkpoints: the best on val (selected on that split), or the last (the
# weights after the final step, what a run of N steps is); each with its metadata file.
CHECKPOINTS = {"best": (BEST_MODEL, BEST_META), "last": ("last.keras", "last.json")}
EXPORT_DIR = "export"
SIDECAR_IN_DIR = "export.json"  # a SavedModel folder holds its own sidecar
SIDECAR_SCHEMA = 1

# What export.py writes: formats, LiteRT quantisations and the file tag of each.
FORMATS = ("savedmodel", "litert")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
FILE_TAGS = {"none": "float32", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}


class ModelFileError(UsageError):
    """A model file is missing, corrupt, or does not match its sidecar (exit 2)."""


class CheckpointMissing(ModelFileError):
    """No usable checkpoint where one was expected; the message is one actionable line."""


# ---------------------------------------------------------------------------------------------
# Paths


def stage_dir(model_dir: str | Path, stage: int) -> Path:
    """DIR/stage{N}: where a stage's checkpoint, metadata, config and exports live."""
    return Path(model_dir) / f"stage{stage}"


def _names(which: str) -> tuple[str, str]:
    if which not in CHECKPOINTS:
        choices = ", ".join(CHECKPOINTS)
        raise UsageError(f"choose one of {choices}, got {which!r}", setting="checkpoint")
    return CHECKPOINTS[which]


def checkpoint_path(model_dir: str | Path, stage: int, which: str = "best") -> Path:
    """DIR/stage{N}/best.keras (or last.keras), or CheckpointMissing naming the stages that have
    one."""
    name = _names(which)[0]
    path = stage_dir(model_dir, stage) / name
    if not path.is_file():
        found = sorted(Path(model_dir).glob(f"stage*/{name}"))
        there = ", ".join(p.parent.name for p in found)
        raise CheckpointMissing(
            f"no checkpoint for stage {stage}: {path} does not exist"
            + (f" (stages with one: {there})" if there else "")
            + f"; train stage {stage} into {model_dir} first",
            setting="model_dir",
        )
    return path


def export_path(model_dir: str | Path, stage: int, fmt: str, quantize: str = "none") -> Path:
    """DIR/stage{N}/export/savedmodel, or DIR/stage{N}/export/model_<float32|...>.tflite."""
    folder = stage_dir(model_dir, stage) / EXPORT_DIR
    if fmt == "savedmodel":
        return folder / "savedmodel"
    return folder / f"model_{FILE_TAGS[quantize]}.tflite"


def sidecar_path(model_path: str | Path) -> Path:
    """model_int8.tflite -> model_int8.json; a SavedModel folder holds its own export.json."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / SIDECAR_IN_DIR
    return model_path.with_suffix(".json")


# ---------------------------------------------------------------------------------------------
# What a stage's files say


def read_json(path: Path, setting: str | None = None) -> dict[str, Any]:
    """A JSON object from a file, or a UsageError that names the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", setting=setting) from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a JSON object", setting=setting)
    return value


def read_meta(model_dir: str | Path, stage: int, which: str = "best") -> dict[str, Any]:
    """What a stage's best (or last) model is (best.json; empty when there is none)."""
    meta_path = checkpoint_path(model_dir, stage, which).with_name(_names(which)[1])
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def training_data(model_dir: str | Path, stage: int) -> str | None:
    """The records folder the stage was trained on (its config.json's `data`), if recorded."""
    path = stage_dir(model_dir, stage) / CONFIG
    return (read_json(path, "model_dir").get("data") or None) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Saving and loading (Keras, imported here only)


def save_checkpoint(
    model, directory: str | Path, meta: dict[str, Any], which: str = "best"
) -> Path:
    """Write the model then its metadata, each under a temporary name first: never half a file."""
    return _write(directory, which, meta, model.save)


def copy_checkpoint(directory: str | Path, source: str, target: str, meta: dict[str, Any]) -> Path:
    """`target` as a copy of `source`'s model file (the same weights) with its own metadata,
    written as `save_checkpoint` writes."""
    model_file = Path(directory) / _names(source)[0]
    return _write(directory, target, meta, lambda tmp: shutil.copyfile(model_file, tmp))


def _write(directory: str | Path, which: str, meta: dict[str, Any], write_model) -> Path:
    """`write_model(tmp)`, then tmp renamed to `which`'s model file, then its metadata."""
    name, meta_name = _names(which)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = directory / f"tmp.{name}"  # Keras wants the .keras suffix
    write_model(tmp)
    os.replace(tmp, target)
    atomic_write_json(directory / meta_name, meta)
    return target


def load_model(path: str | Path):
    """Load a `.keras` checkpoint in safe mode, without its optimizer state."""
    import keras

    from m2cnn_tf import cells  # noqa: F401  (registers its layers for deserialisation)

    path = Path(path)
    if not path.is_file():
        raise CheckpointMissing(f"checkpoint not found: {path}")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # corrupt zip, foreign or unsafe content
        raise CheckpointMissing(f"cannot load checkpoint {path}: {err}") from None


def architecture(path: str | Path) -> str | None:
    """The network a `.keras` checkpoint holds, as comparable text: its config.json without
    Keras's `shared_object_id`s (the ids of the Python objects that layers shared when it was
    saved, which differ between two saves of one architecture). None when it cannot be read."""

    def without_ids(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: without_ids(v) for k, v in node.items() if k != "shared_object_id"}
        return [without_ids(v) for v in node] if isinstance(node, list) else node

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # load_model says what is wrong with it
    return json.dumps(without_ids(config), sort_keys=True)


def load_weights(model, path: str | Path) -> None:
    """A `.keras` checkpoint's weights into `model`, built from the same architecture."""
    try:
        model.load_weights(path)
    except Exception as err:  # corrupt weights, or another architecture after all
        raise CheckpointMissing(f"cannot load checkpoint {path}: {err}") from None


def load_stage(
    model_dir: str | Path, stage: int, which: str = "best"
) -> tuple[Any, dict[str, Any]]:
    """A stage's best (or last) model and its metadata (best.json, last.json)."""
    model = load_model(checkpoint_path(model_dir, stage, which))
    return model, read_meta(model_dir, stage, which)


# ---------------------------------------------------------------------------------------------
# Exports: the sidecar and its checks


def file_identity(path: str | Path, *, digest: bool = True) -> dict[str, Any]:
    """Path, size, mtime and (unless digest=False) sha256 of a file."""
    path = Path(path)
    stat = path.stat()
    found: dict[str, Any] = {"path": str(path.resolve()), "bytes": stat.st_size}
    found["mtime"] = stat.st_mtime
    if digest:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
        found["sha256"] = sha.hexdigest()
    return found


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise ModelFileError(
            f"{model_path} has no sidecar {path.name}: export the stage with export.py, which "
            "writes both"
        )
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"cannot read the sidecar {path}: {err}") from None
    if not isinstance(sidecar, dict) or sidecar.get("schema") != SIDECAR_SCHEMA:
        raise ModelFileError(f"{path} is not an m2cnn export sidecar (schema {SIDECAR_SCHEMA})")
    return sidecar


def same_file(path: str | Path, recorded: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether a file is the one `file_identity` recorded, and its sha256 if it had to be read.

    Unchanged size and mtime are taken as the same file without hashing it (a 430 MB checkpoint
    costs ~1 s); anything else, a copy included, is decided by the sha256.
    """
    now = file_identity(path, digest=False)
    if now["bytes"] == recorded.get("bytes") and now["mtime"] == recorded.get("mtime"):
        return True, None
    sha = file_identity(path)["sha256"]
    return sha == recorded.get("sha256"), sha


def check_model_file(model_path: str | Path, sidecar: dict[str, Any]) -> None:
    """The file is the one the sidecar describes, not another export or a copy cut short."""
    same, sha = same_file(model_path, sidecar.get("file") or {})
    if not same:
        raise ModelFileError(
            f"{model_path} does not match its sidecar (sha256 {str(sha)[:12]}…, recorded "
            f"{str((sidecar.get('file') or {}).get('sha256'))[:12]}…): the file was changed or "
            "cut short; export it again"
        )


def check_source(
    model_path: str | Path, sidecar: dict[str, Any], model_dir: str | Path | None, stage: int | None
) -> None:
    """The exported model comes from this stage, and from the checkpoint now at
    DIR/stage{N}/best.keras when there is one (a file shipped without it stands alone)."""
    name = Path(model_path).name
    if stage is not None and sidecar.get("stage") != stage:
        raise ModelFileError(f"{name} was exported from stage {sidecar.get('stage')}, not {stage}")
    if model_dir is None or stage is None:
        return
    checkpoint = stage_dir(model_dir, stage) / BEST_MODEL
    if not checkpoint.is_file():
        return
    claimed = sidecar.get("source_checkpoint") or {}
    same, sha = same_file(checkpoint, claimed)
    if not same:
        raise ModelFileError(
            f"{name} does not match the checkpoint it claims: it was exported from "
            f"{claimed.get('path')} (sha256 {str(claimed.get('sha256'))[:12]}…), and {checkpoint} "
            f"is now another model (sha256 {str(sha)[:12]}…); export the stage again"
        )


def check_image_size(model_path: str | Path, sidecar: dict[str, Any], image_size: int) -> None:
    if sidecar.get("image_size") != image_size:
        raise ModelFileError(
            f"{Path(model_path).name} takes {sidecar.get('image_size')} px images, the data is "
            f"{image_size} px; export the stage that matches, or use data of its size",
            setting="image_size",
        )
