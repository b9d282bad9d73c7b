"""The TFRecord schema shared by data_prep (writer) and the training input pipeline (reader).

Layout: OUT/<size>/<split>-<iiiii>-of-<nnnnn>.tfrecord (split: one of m2cnn_tf.common.SPLITS),
one tf.train.Example per image with:
  image/encoded  bytes   JPEG (or PNG) of the preprocessed size×size image (§II-A)
  image/format   bytes   b"jpeg" or b"png"
  image/height   int64   pixels
  image/width    int64   pixels
  image/grade    int64   DR grade 0–4 (Fig. 1)
  image/id       bytes   e.g. b"10_left"
  image/patient  bytes   e.g. b"10" (both eyes of a patient share it)
  image/eye      bytes   b"left", b"right" or b"" when the id names no eye
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import tensorflow as tf

from m2cnn_tf.preprocessing import FORMATS

FEATURES: dict[str, tf.io.FixedLenFeature] = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/grade": tf.io.FixedLenFeature([], tf.int64),
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/patient": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "image/eye": tf.io.FixedLenFeature([], tf.string, default_value=b""),
}

_EYE = re.compile(r"^(?P<patient>.+)[_-](?P<eye>left|right)$", re.IGNORECASE)
_SHARD = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def split_id(image_id: str) -> tuple[str, str]:
    """(patient, eye) from an id: "10_left" → ("10", "left"); "IDRiD_001" → ("IDRiD_001", "")."""
    m = _EYE.match(image_id)
    if m is None:
        return image_id, ""
    return m["patient"], m["eye"].lower()


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(
    encoded: bytes,
    *,
    image_format: str,
    height: int,
    width: int,
    grade: int,
    image_id: str,
    patient: str | None = None,
    eye: str | None = None,
) -> bytes:
    """A serialized tf.train.Example; patient and eye default to `split_id(image_id)`."""
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {FORMATS}, got {image_format!r}")
    if not 0 <= int(grade) <= 4:
        raise ValueError(f"grade must be 0–4, got {grade}")
    default_patient, default_eye = split_id(image_id)
    feature = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(image_format.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/grade": _int(grade),
        "image/id": _bytes(image_id.encode()),
        "image/patient": _bytes((default_patient if patient is None else patient).encode()),
        "image/eye": _bytes((default_eye if eye is None else eye).encode()),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # map order fixed: resume is byte-exact


def parse_example(serialized: tf.Tensor | bytes) -> dict[str, tf.Tensor]:
    """Parse one serialized Example into scalar tensors (graph-safe: use inside Dataset.map)."""
    return tf.io.parse_single_example(serialized, FEATURES)


def decode_image(features: dict[str, tf.Tensor]) -> tf.Tensor:
    """uint8 [height, width, 3] from parsed features; JPEG and PNG alike (graph-safe)."""
    image = tf.io.decode_image(features["image/encoded"], channels=3, expand_animations=False)
    shape = tf.stack([features["image/height"], features["image/width"], 3])
    return tf.reshape(image, tf.cast(shape, tf.int32))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_paths(out_dir: str | os.PathLike, size: int, split: str) -> list[str]:
    """The final shards of one split at one size, in order.

    Raises FileNotFoundError when some shards are missing (an unfinished conversion), so
    training never runs silently on part of a split. An absent split gives [].
    """
    directory = Path(out_dir) / str(int(size))
    found: dict[int, Path] = {}
    counts: set[int] = set()
    if directory.is_dir():
        for path in directory.iterdir():
            m = _SHARD.match(path.name)
            if m and m["split"] == split:
                found[int(m["index"])] = path
                counts.add(int(m["count"]))
    if not found:
        return []
    if len(counts) != 1:
        raise FileNotFoundError(f"{directory}: {split} shards from different conversions")
    (count,) = counts
    missing = [i for i in range(count) if i not in found]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {split} has {len(found)} of {count} shards; the conversion has not "
            "finished (rerun the same data_prep command to complete it)"
        )
    return [str(found[i]) for i in range(count)]


def available_sizes(out_dir: str | os.PathLike) -> list[int]:
    """Image sizes that have at least one shard under out_dir, ascending."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(d.name)
        for d in root.iterdir()
        if d.is_dir() and d.name.isdigit() and any(_SHARD.match(p.name) for p in d.iterdir())
    )
