"""What data_prep's OUT/manifest.json says, the one reader of it: how many records a split holds
(so training need not read them to count), which of the images its source listed are missing or
were kept although imperfect (so an evaluation says when its kappa covers less than the split),
the preprocessing parameters the records were made with (so prediction applies the very same
Eq. (1)), and a summary for the grader's model panel.

data_prep.manifest writes the file. The counting readers accept its absence, an older manifest
and records that no longer match it: they then return None (or nothing known), and the caller
falls back to reading the records. Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from m2cnn_tf import checkpoints
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.preprocessing import PreprocessParams

MANIFEST = "manifest.json"
DEFAULTS_SOURCE = "defaults (no manifest.json of the training data found)"


@dataclasses.dataclass(frozen=True)
class SplitCounts:
    records: int
    grades: list[int]  # records per grade 0–4


@dataclasses.dataclass(frozen=True)
class Completeness:
    """How an evaluated split compares with what its source listed."""

    n_expected: int | None  # distinct images the source listed; None when no manifest says
    missing: list[str]  # ids the source listed that were not evaluated, as far as known
    flagged: list[dict[str, str]]  # evaluated, but kept although imperfect: {"id", "reason"}
    excluded: int | None = None  # left out by the dataset's protocol (ungradable)
    dataset: str | None = None  # a published set's name (data_prep.external), when it is one


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """OUT/manifest.json as a dict, or None when it is absent or not JSON."""
    path = os.path.join(os.fspath(data_dir), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def split_counts(
    data_dir: str | os.PathLike, image_size: int, split: str, files: Sequence[str]
) -> SplitCounts | None:
    """A split's records and grades from the manifest, without reading a record.

    Only when the manifest lists exactly `files` as the split's shards at `image_size`, each
    with the byte size it has on disk, and its counts agree with the shards'; None otherwise
    (no manifest, an older one, shards replaced, added or removed since).
    """
    manifest = read_manifest(data_dir)
    if manifest is None:
        return None
    try:
        listed = [s for s in manifest["shards"][str(int(image_size))] if s["split"] == split]
        on_disk = {os.path.realpath(f) for f in files}
        shards = {os.path.realpath(os.path.join(data_dir, s["path"])): s for s in listed}
        if set(shards) != on_disk or len(shards) != len(listed):
            return None
        if any(os.path.getsize(path) != int(s["bytes"]) for path, s in shards.items()):
            return None
        records = sum(int(s["records"]) for s in listed)
        counts = manifest["counts"][split]
        grades = [int(counts["grades"].get(str(g), 0)) for g in range(NUM_CLASSES)]
        total = int(counts["records"])
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        return None
    if records != total or sum(grades) != total:
        return None
    return SplitCounts(records, grades)


def completeness(
    data_dir: str | os.PathLike, split: str, evaluated_ids: Iterable[str]
) -> Completeness:
    """The images of `split` its source listed, against those evaluated.

    The missing ids are those the manifest lists as skipped from the split that were not
    evaluated; the excluded ones, those the dataset's protocol left out of it (not expected).
    `n_expected` is the manifest's `expected` count; for a manifest written before it existed,
    the split's records plus the missing ids.
    """
    manifest = read_manifest(data_dir)
    if manifest is None:
        return Completeness(None, [], [])
    try:
        skipped = {s["image_id"] for s in manifest.get("skipped", []) if s.get("split") == split}
        flagged = [
            {"id": s["image_id"], "reason": s["reason"]}
            for s in manifest.get("flagged", [])
            if s.get("split") == split
        ]
        missing = sorted(skipped - set(evaluated_ids))
        expected = manifest.get("expected", {}).get(split)
        if expected is None and split in manifest.get("counts", {}):
            expected = int(manifest["counts"][split]["records"]) + len(missing)
        excluded = sum(s.get("split") == split for s in manifest.get("excluded", []))
        dataset = (manifest.get("dataset") or {}).get("name")
    except (KeyError, TypeError, ValueError, AttributeError):
        return Completeness(None, [], [])
    n_expected = None if expected is None else int(expected)
    return Completeness(n_expected, missing, flagged, excluded, dataset)


# ---------------------------------------------------------------------------------------------
# Preprocessing parameters and the model panel's summary


def preprocess_params(data_dir: str | os.PathLike | None) -> tuple[PreprocessParams, str]:
    """The PreprocessParams DATA/manifest.json records, and where they came from; the paper's
    Eq. (1) constants (`PreprocessParams()`) when there is no manifest. A manifest that is there
    but unreadable is a UsageError."""
    path = Path(data_dir) / MANIFEST if data_dir else None
    if path is None or not path.is_file():
        return PreprocessParams(), DEFAULTS_SOURCE
    values = _find_params(checkpoints.read_json(path, "data"))
    if values is None:
        return PreprocessParams(), DEFAULTS_SOURCE
    known = PreprocessParams.__dataclass_fields__
    return PreprocessParams(**{k: v for k, v in values.items() if k in known}), str(path)


def preprocess_params_for(
    model_dir: str | os.PathLike, stage: int, data_dir: str | os.PathLike | None = None
) -> tuple[PreprocessParams, str]:
    """The parameters a stage's training data was made with: from `data_dir`'s manifest, or by
    default from that of the records folder the stage's config.json names."""
    return preprocess_params(data_dir or checkpoints.training_data(model_dir, stage))


def _find_params(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing block of a manifest: under a 'preprocess*' key, possibly nested."""
    for key, value in manifest.items():
        if isinstance(value, dict):
            if key.startswith("preprocess") and "alpha" in value:
                return value
            found = _find_params(value)
            if found is not None:
                return found
    return None


def summary(source: str) -> dict[str, Any] | None:
    """A manifest in brief: what it was made from, how many images per split (None when
    `source` is not a readable manifest.json)."""
    path = Path(source)
    if path.name != MANIFEST or not path.is_file():
        return None
    manifest = read_manifest(path.parent)
    if manifest is None:
        return None
    counts = manifest.get("counts", {})
    origin = manifest.get("source")
    return {
        "manifest": str(path),
        "tool": manifest.get("tool"),
        "source": origin.get("kind") if isinstance(origin, dict) else origin,
        "sizes": manifest.get("params", {}).get("sizes"),
        "images": {split: c.get("records") for split, c in counts.items()},
        "grades": {split: c.get("grades") for split, c in counts.items()},
        "finished_utc": manifest.get("timings", {}).get("finished_utc"),
    }
