"""Test helper: write small TFRecord splits in data_prep's schema (via records.make_example)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from m2cnn_tf import records


def write_split(
    out_dir: Path,
    size: int,
    split: str,
    images: np.ndarray,
    grades: Sequence[int],
    *,
    shards: int = 1,
    image_format: str = "png",
) -> list[str]:
    """Write uint8 images [N, size, size, 3] with their grades; ids are f"{i}_left"/"_right"."""
    directory = Path(out_dir) / str(size)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [str(directory / records.shard_name(split, s, shards)) for s in range(shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, (image, grade) in enumerate(zip(images, grades, strict=True)):
        encode = tf.io.encode_png if image_format == "png" else tf.io.encode_jpeg
        writers[i % shards].write(
            records.make_example(
                encode(image).numpy(),
                image_format=image_format,
                height=size,
                width=size,
                grade=int(grade),
                image_id=f"{i // 2}_{'left' if i % 2 == 0 else 'right'}",
            )
        )
    for w in writers:
        w.close()
    return paths


def grade_images(grades: Sequence[int], size: int, seed: int = 0) -> np.ndarray:
    """Grey γ=128 fundus-like images whose central square brightens with the grade, plus noise:
    learnable, so a short training run must raise kappa."""
    rng = np.random.default_rng(seed)
    images = np.full((len(grades), size, size, 3), 128.0, np.float32)
    lo, hi = size // 4, 3 * size // 4
    for i, g in enumerate(grades):
        images[i, lo:hi, lo:hi] += 25.0 * g
    images += rng.normal(0, 8, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)
