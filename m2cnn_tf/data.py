"""The tf.data input pipeline over data_prep's TFRecords (one image size per pipeline).

Order: interleave shards → (train: shuffle the serialized records) → parse + decode (parallel)
→ batch → (augment, see below) + scale (parallel, one vectorised op per batch) → prefetch.

Why this order: shuffling serialized records instead of decoded images keeps the buffer ~20×
smaller at the same depth; batching before augmenting runs one projective-transform op per
batch instead of one per image. Everything is TF graph code: no py_function, no numpy.

Where the train split's augmentation runs (`AugmentConfig.on`, the ops in `augmentation`): by
default ("step") the trainer applies it inside the train step, on the accelerator, and tf.data
only decodes and scales; "pipeline" applies `augmentation.augment_batch` here, on uint8 (a
CPU-only machine loses nothing).

Randomness is stateless and keyed by (seed, batch index or training step), so a seed makes the
whole stream reproducible; without a seed a random one is drawn.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import tensorflow as tf

from m2cnn_tf import manifest, records
from m2cnn_tf.augmentation import augment_batch
from m2cnn_tf.config import NUM_CLASSES, AugmentConfig, DataConfig
from m2cnn_tf.errors import UsageError

AUTOTUNE = tf.data.AUTOTUNE


class DataError(UsageError):
    """The data cannot feed the requested run; the message is one actionable line."""


def scale_image(images: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] → float32 [-1, 1], Inception-ResNet-v2's input scaling (x / 127.5 − 1)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def split_files(data_dir: str | os.PathLike, image_size: int, split: str) -> list[str]:
    """The shards of one split at one size, or a DataError that lists what is there."""
    size_dir = os.path.join(str(data_dir), str(int(image_size)))
    if not os.path.isdir(size_dir):
        sizes = records.available_sizes(data_dir)
        there = ", ".join(map(str, sizes)) if sizes else "none"
        raise DataError(
            f"no {image_size} px records: {size_dir} does not exist (sizes in {data_dir}: "
            f"{there}); convert that size with data_prep or train at a size that is there",
            setting="image_size",
        )
    try:
        files = records.shard_paths(data_dir, image_size, split)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    if not files:
        raise DataError(f"no {split} shards in {size_dir}")
    return files


def split_size(
    data_dir: str | os.PathLike, image_size: int, split: str, files: Sequence[str] | None = None
) -> int:
    """Records in a split: from data_prep's manifest.json when it describes these very shards
    (`manifest.split_counts`), otherwise counted by reading them, which at 720 px means reading
    the whole split (about 14 GB for Kaggle's train and val)."""
    files = split_files(data_dir, image_size, split) if files is None else files
    known = manifest.split_counts(data_dir, image_size, split, files)
    return known.records if known is not None else count_records(files)


def split_grade_counts(
    data_dir: str | os.PathLike, image_size: int, split: str, files: Sequence[str] | None = None
) -> list[int]:
    """Records per grade in a split: from the manifest as `split_size`, otherwise by parsing
    every record's grade."""
    files = split_files(data_dir, image_size, split) if files is None else files
    known = manifest.split_counts(data_dir, image_size, split, files)
    return known.grades if known is not None else grade_counts(files)


def count_records(files: Sequence[str]) -> int:
    """Records in the shards (one pass over the bytes, no parsing)."""
    ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=AUTOTUNE)
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def grade_counts(files: Sequence[str]) -> list[int]:
    """Records per grade; parses only the grade feature."""
    spec = {"image/grade": records.FEATURES["image/grade"]}
    ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=AUTOTUNE).map(
        lambda s: tf.io.parse_single_example(s, spec)["image/grade"], num_parallel_calls=AUTOTUNE
    )
    counts = ds.reduce(
        tf.zeros([NUM_CLASSES], tf.int64),
        lambda acc, g: acc + tf.one_hot(g, NUM_CLASSES, dtype=tf.int64),
    )
    return [int(c) for c in counts.numpy()]


def balance_weights(counts: Sequence[int], epoch, decay: float) -> tf.Tensor:
    """Sampling weights per grade at `epoch`: uniform over present grades at epoch 0, decaying
    toward the natural distribution as decay**epoch (team o_O's schedule, Kaggle DR 2015)."""
    counts = tf.constant(counts, tf.float64)
    present = tf.cast(counts > 0, tf.float64)
    natural = counts / tf.reduce_sum(counts)
    uniform = present / tf.reduce_sum(present)
    r = tf.pow(tf.constant(decay, tf.float64), tf.cast(epoch, tf.float64))
    return r * uniform + (1.0 - r) * natural


def _parse_and_decode(image_size: int):
    def fn(serialized):
        features = records.parse_example(serialized)
        image = records.decode_image(features)
        image = tf.cond(
            tf.reduce_all(tf.shape(image)[:2] == image_size),
            lambda: image,
            lambda: tf.cast(
                tf.clip_by_value(tf.image.resize(image, [image_size, image_size]), 0, 255),
                tf.uint8,
            ),
        )
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        meta = {
            "grade": tf.cast(features["image/grade"], tf.int32),
            "id": features["image/id"],
            "patient": features["image/patient"],
            "eye": features["image/eye"],
        }
        return image, meta

    return fn


def _records(files: list[str], *, shuffle: bool, seed: int, deterministic: bool) -> tf.data.Dataset:
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return names.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def make_dataset(
    data_dir: str | os.PathLike,
    image_size: int,
    split: str,
    *,
    batch_size: int,
    training: bool,
    seed: int | None = None,
    settings: DataConfig | None = None,
    augment: AugmentConfig | None = None,
    start_step: int = 0,
    steps_per_epoch: int | None = None,
) -> tf.data.Dataset:
    """(images float32 [B, S, S, 3] in [-1, 1], meta {"grade", "id", "patient", "eye"}).

    training=True: shuffled, repeated forever, remainder dropped; augmented here if `augment`
    is enabled with on="pipeline" (with "step" the trainer augments on the accelerator); with
    `settings.balance`, grades are resampled (weights from `balance_weights`, the epoch counted
    in units of `steps_per_epoch` batches). `start_step`: the batches a resumed run has already
    trained on, skipped (as serialized records, before decoding) so that the stream, its
    augmentation seeds and its balancing carry on exactly where the run stopped: a resumed run
    sees the batches an uninterrupted one would. training=False: the records in
    file order, unaugmented, once, remainder kept; `settings` and `augment` are not used.
    """
    files = split_files(data_dir, image_size, split)
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}", setting="batch_size")
    decode = _parse_and_decode(image_size)
    if not training:
        options = tf.data.Options()
        options.deterministic = True
        ds = tf.data.TFRecordDataset(files).map(decode, num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=False)
        ds = ds.map(lambda x, m: (scale_image(x), m), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(options)
    here = augment is not None and augment.enabled and augment.on == "pipeline"
    settings = settings or DataConfig()
    counts, total = _train_counts(data_dir, image_size, split, files, settings, batch_size)
    return _training_dataset(
        files,
        decode,
        counts=counts,
        total=total,
        batch_size=batch_size,
        seed=seed,
        settings=settings,
        augment=augment if here else None,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
    )


def _train_counts(
    data_dir, image_size: int, split: str, files: list[str], settings: DataConfig, batch: int
) -> tuple[list[int], int]:
    """(records per grade, or [] unless balancing; records), checked against the batch size."""
    if settings.balance:
        counts = split_grade_counts(data_dir, image_size, split, files)
        total = sum(counts)
    else:
        counts, total = [], split_size(data_dir, image_size, split, files)
    if batch > total:
        raise DataError(
            f"batch size {batch} is larger than the {split} split ({total} images in "
            f"{os.path.dirname(files[0])}); use a batch of at most {total}",
            setting="batch_size",
        )
    return counts, total


def _training_dataset(
    files: list[str],
    decode,
    *,
    counts: list[int],
    total: int,
    batch_size: int,
    seed: int | None,
    settings: DataConfig,
    augment: AugmentConfig | None,
    start_step: int,
    steps_per_epoch: int | None,
) -> tf.data.Dataset:
    deterministic = seed is not None
    options = tf.data.Options()
    options.deterministic = deterministic
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    raw = _records(files, shuffle=True, seed=seed, deterministic=deterministic)
    if settings.balance:
        per_epoch = (steps_per_epoch or total // batch_size) * batch_size
        raw = _balanced(raw, counts, settings, seed, per_epoch)
    else:
        raw = raw.shuffle(settings.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        raw = raw.repeat()
    raw = raw.skip(start_step * batch_size)  # a resumed run: what it has trained on already

    ds = raw.map(decode, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment is not None:
        ds = ds.enumerate(start=start_step).map(
            lambda i, xm: (
                augment_batch(xm[0], tf.stack([tf.cast(seed, tf.int64), i]), augment),
                xm[1],
            ),
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )
    else:
        ds = ds.map(lambda x, m: (scale_image(x), m), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(options)


def _balanced(
    raw: tf.data.Dataset,
    counts: list[int],
    settings: DataConfig,
    seed: int,
    per_epoch: int,
) -> tf.data.Dataset:
    """Records resampled per grade with `balance_weights` of each record's epoch."""
    grade_spec = {"image/grade": records.FEATURES["image/grade"]}

    def of_grade(g):
        ds = raw.filter(
            lambda s: tf.equal(tf.io.parse_single_example(s, grade_spec)["image/grade"], g)
        )
        return ds.repeat().shuffle(max(1, settings.shuffle_buffer // NUM_CLASSES), seed=seed + g)

    weights = tf.data.Dataset.range(2**62).map(
        lambda i: balance_weights(counts, i // per_epoch, settings.balance_decay)
    )
    present = [g for g in range(NUM_CLASSES) if counts[g] > 0]
    return tf.data.Dataset.sample_from_datasets(
        [of_grade(g) for g in present],
        weights=weights.map(lambda w: tf.gather(w, present)),
        seed=seed,
    )
