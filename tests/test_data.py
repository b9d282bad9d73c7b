"""The tf.data input pipeline (m2cnn_tf.data) against numpy references."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from _tfrecords import write_split

from m2cnn_tf import augmentation, data, training, tta
from m2cnn_tf.config import AugmentConfig, Config, DataConfig, OptimConfig

SIZE = 32
NO_AUG = dict(
    flip=False,
    rotation=0.0,
    zoom=0.0,
    shift=0.0,
    brightness=0.0,
    contrast=0.0,
    on="pipeline",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8)
    train_grades = [0] * 32 + [1, 2, 3, 4] * 2  # skewed like Kaggle (80 % grade 0)
    val = rng.integers(0, 256, (11, SIZE, SIZE, 3), dtype=np.uint8)
    val_grades = [i % 5 for i in range(11)]
    write_split(out, SIZE, "train", train, train_grades, shards=3)
    write_split(out, SIZE, "val", val, val_grades, shards=2)
    return out, train, np.array(train_grades), val, np.array(val_grades)


def _unscale(x: np.ndarray) -> np.ndarray:
    """Back to uint8, to compare pipelines up to float rounding."""
    return np.rint((x + 1.0) * 127.5).astype(np.uint8)


def _collect(ds):
    images, grades, ids = [], [], []
    for x, meta in ds:
        images.append(x.numpy())
        grades.append(meta["grade"].numpy())
        ids.extend(meta["id"].numpy().tolist())
    return np.concatenate(images), np.concatenate(grades), ids


def test_scale_image_maps_uint8_to_minus_one_one_like_irv2():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_allclose(data.scale_image(x).numpy(), x / 127.5 - 1.0, atol=1e-6)


def test_prediction_scales_every_uint8_value_exactly_as_the_input_pipeline():
    """tta.model_range (numpy, for prediction without TF) is data.scale_image bit for bit."""
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    got = tta.model_range(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data.scale_image(x).numpy())


def test_eval_split_is_exact_ordered_and_keeps_remainder(dataset):
    out, _, _, val, val_grades = dataset
    ds = data.make_dataset(out, SIZE, "val", batch_size=4, training=False)
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [4, 4, 3]
    images, grades, ids = _collect(ds)
    # Shards hold records round-robin (0, 2, 4, ... in shard 0), read shard by shard in order.
    order = [i for s in range(2) for i in range(s, 11, 2)]
    np.testing.assert_allclose(images, val[order] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(grades, val_grades[order])
    assert ids[0] == b"0_left" and ids[1] == b"1_left"
    x, meta = next(iter(ds))
    assert x.dtype == tf.float32 and meta["grade"].dtype == tf.int32
    assert set(meta) == {"grade", "id", "patient", "eye"}
    assert meta["eye"].numpy()[0] == b"left" and meta["patient"].numpy()[0] == b"0"


def test_train_without_augmentation_yields_the_records_shuffled_and_repeated(dataset):
    out, train, _, _, _ = dataset
    cfg = AugmentConfig(**NO_AUG)
    ds = data.make_dataset(out, SIZE, "train", batch_size=8, training=True, seed=3, augment=cfg)
    images = _unscale(np.concatenate([x.numpy() for x, _ in ds.take(10)]))  # two passes
    first = [im.tobytes() for im in images[:40]]
    assert sorted(first) == sorted(im.tobytes() for im in train)  # a permutation of the split
    assert first != [im.tobytes() for im in train]
    assert sorted(im.tobytes() for im in images[40:]) == sorted(first)


def test_same_seed_gives_the_same_stream_and_another_seed_does_not(dataset):
    out = dataset[0]

    def stream(seed):
        ds = data.make_dataset(
            out,
            SIZE,
            "train",
            batch_size=8,
            training=True,
            seed=seed,
            augment=AugmentConfig(on="pipeline"),
        )
        return [x.numpy() for x, _ in ds.take(3)]

    a, b, c = stream(5), stream(5), stream(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_flips_alone_give_one_of_the_four_mirror_images_exactly(dataset):
    out, train, _, _, _ = dataset
    cfg = AugmentConfig(**{**NO_AUG, "flip": True})
    ds = data.make_dataset(out, SIZE, "train", batch_size=8, training=True, seed=1, augment=cfg)
    scaled = {im.tobytes() for im in train}
    seen = set()
    for x, _ in ds.take(5):
        for im in _unscale(x.numpy()):
            variants = {"id": im, "lr": im[:, ::-1], "ud": im[::-1], "both": im[::-1, ::-1]}
            match = [k for k, v in variants.items() if np.ascontiguousarray(v).tobytes() in scaled]
            assert match, "a flipped image is not a mirror of any record"
            seen.add(match[0])
    assert seen == {"id", "lr", "ud", "both"}


def test_affine_maps_are_flip_rotation_zoom_about_the_shifted_centre():
    cfg = AugmentConfig(rotation=180.0, zoom=0.2, shift=0.1)
    t = augmentation.affine_transforms(tf.constant([1, 2], tf.int64), 64, 100, cfg).numpy()
    a = t[:, [0, 1, 3, 4]].reshape(-1, 2, 2)
    gram = np.einsum("bij,bkj->bik", a, a)
    inv_zoom2 = gram[:, 0, 0]
    np.testing.assert_allclose(gram[:, 1, 1], inv_zoom2, rtol=1e-5)  # similarity transform
    np.testing.assert_allclose(gram[:, 0, 1], 0, atol=1e-5)
    assert np.all(inv_zoom2 >= 1 / 1.2**2 - 1e-5) and np.all(inv_zoom2 <= 1.2**2 + 1e-5)
    angles = np.degrees(np.arctan2(np.abs(a[:, 1, 0]), np.abs(a[:, 0, 0])))
    assert angles.max() > 60  # any angle, not just small tilts
    c = 99 / 2
    centre = a @ np.array([c, c]) + t[:, [2, 5]]  # where the output centre samples the input
    assert np.all(np.abs(centre - c) <= 0.1 * 100 + 1e-3)
    np.testing.assert_array_equal(t[:, 6:], 0)


def test_rotation_and_zoom_fill_the_corners_with_gamma_and_keep_the_centre():
    # Noise around a constant disc of radius R at the centre. Rotation and zoom act about the
    # centre, and an output pixel at distance r samples the input within r * 1.3 (zoom ≤ 30 %),
    # so inside R / 1.3 − 1 (one pixel for the bilinear weights) every output pixel is the disc.
    size, radius, disc = 64, 20, 200
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    images[:, r <= radius] = disc
    cfg = AugmentConfig(**{**NO_AUG, "rotation": 45.0, "zoom": 0.3})
    x = augmentation.augment_batch(tf.constant(images), tf.constant([2, 9], tf.int64), cfg).numpy()

    assert np.abs(x - data.scale_image(images).numpy()).max() > 0.5  # it did transform
    centre = x[:, r <= radius / 1.3 - 1]
    np.testing.assert_allclose(centre, disc / 127.5 - 1.0, atol=1e-6)
    gamma = 128 / 127.5 - 1.0
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    # A corner is outside the source for rotations beyond a few degrees or zoom-out: γ fill.
    assert np.isclose(corners, gamma, atol=1e-6).mean() > 0.5


def test_brightness_and_contrast_are_an_affine_map_within_their_ranges(dataset):
    out = dataset[0]
    cfg = AugmentConfig(**{**NO_AUG, "brightness": 0.2, "contrast": 0.3})
    ds = data.make_dataset(out, SIZE, "train", batch_size=8, training=True, seed=4, augment=cfg)
    plain = data.make_dataset(
        out, SIZE, "train", batch_size=8, training=True, seed=4, augment=AugmentConfig(**NO_AUG)
    )
    (x, _), (ref, _) = next(iter(ds)), next(iter(plain))
    gains = []
    for im, r in zip(x.numpy(), ref.numpy(), strict=True):
        inside = np.abs(im) < 0.999  # unclipped pixels
        gain, offset = np.polyfit(r[inside].ravel(), im[inside].ravel(), 1)
        assert 0.7 - 1e-4 <= gain <= 1.3 + 1e-4 and abs(offset) <= 0.2 + 1e-4
        gains.append(gain)
    assert np.ptp(gains) > 0.01


def test_grade_counts_match_numpy(dataset):
    out, _, train_grades, _, _ = dataset
    files = data.split_files(out, SIZE, "train")
    assert data.grade_counts(files) == np.bincount(train_grades, minlength=5).tolist()


def test_balance_weights_decay_from_uniform_to_natural():
    counts = [70, 10, 10, 10, 0]
    natural = np.array(counts) / 100
    uniform = np.array([0.25, 0.25, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(data.balance_weights(counts, 0, 0.5), uniform)
    np.testing.assert_allclose(
        data.balance_weights(counts, 2, 0.5), 0.25 * uniform + 0.75 * natural
    )
    np.testing.assert_allclose(data.balance_weights(counts, 200, 0.5), natural, atol=1e-12)


@pytest.mark.slow
def test_balance_resamples_a_skewed_split_toward_uniform(dataset):
    out = dataset[0]
    # Per-grade buffers of 10 records: the default (2048 / 5) fills grade 4's from its 2 records
    # by reading the split ~200 times over, seconds of tf.data work that the weights never see.
    cfg = DataConfig(balance=True, balance_decay=0.5, shuffle_buffer=50)
    ds = data.make_dataset(
        out, SIZE, "train", batch_size=10, training=True, seed=0, settings=cfg, steps_per_epoch=100
    )
    grades = np.concatenate([m["grade"].numpy() for _, m in ds.take(60)])
    freq = np.bincount(grades, minlength=5) / grades.size
    np.testing.assert_allclose(freq, 0.2, atol=0.05)  # natural would be 0.8 for grade 0
    later = data.make_dataset(
        out,
        SIZE,
        "train",
        batch_size=10,
        training=True,
        seed=0,
        settings=cfg,
        start_step=100,  # 10 epochs of 10 steps done: the weights have decayed to natural
        steps_per_epoch=10,  # (without the skip, these 6 epochs would average 0.6 for grade 0)
    )
    grades = np.concatenate([m["grade"].numpy() for _, m in later.take(60)])
    assert abs((grades == 0).mean() - 0.8) < 0.06


def test_missing_size_lists_the_sizes_present(dataset):
    with pytest.raises(data.DataError, match=rf"no 224 px records.*sizes in .*: {SIZE}\)") as err:
        data.make_dataset(dataset[0], 224, "train", batch_size=2, training=True)
    assert err.value.setting == "image_size" and "--" not in str(err.value)


def test_batch_larger_than_the_split_is_a_clear_error(dataset):
    with pytest.raises(data.DataError, match="batch size 64 is larger than the train split") as err:
        data.make_dataset(dataset[0], SIZE, "train", batch_size=64, training=True)
    assert err.value.setting == "batch_size" and "--" not in str(err.value)


def test_no_python_in_the_per_example_path(dataset):
    ds = data.make_dataset(
        dataset[0],
        SIZE,
        "train",
        batch_size=4,
        training=True,
        seed=0,
        settings=DataConfig(balance=True),
        augment=AugmentConfig(on="pipeline"),
    )
    graph = ds._as_serialized_graph().numpy()
    assert b"PyFunc" not in graph and b"EagerPyFunc" not in graph
    assert b"ImageProjectiveTransformV3" in graph and b"ParallelMapDataset" in graph


def test_the_accelerator_variant_applies_the_same_augmentation_to_scaled_images(dataset):
    train = dataset[1][:8]
    seeds = tf.constant([11, 3], tf.int64)
    cfg = AugmentConfig(rotation=180.0, zoom=0.2, shift=0.1, brightness=0.1, contrast=0.2)
    on_cpu = augmentation.augment_batch(tf.constant(train), seeds, cfg).numpy()
    on_device = augmentation.augment_scaled(data.scale_image(train), seeds, cfg).numpy()
    assert np.abs(on_cpu - train / 127.5 + 1.0).max() > 0.5  # it did augment
    # Only the uint8 output of the interpolation differs (it truncates): under one grey level,
    # times the contrast gain (at most 1.2).
    np.testing.assert_allclose(on_device, on_cpu, atol=1.2 / 127.5 + 1e-5)


def test_default_training_pipeline_leaves_augmentation_to_the_train_step(dataset):
    out, train = dataset[0], dataset[1]
    for augment in (None, AugmentConfig()):  # no settings (evaluation's call), the run's default
        ds = data.make_dataset(
            out, SIZE, "train", batch_size=40, training=True, seed=0, augment=augment
        )
        images = _unscale(next(iter(ds))[0].numpy())
        assert sorted(im.tobytes() for im in images) == sorted(im.tobytes() for im in train)


# ---------------------------------------------------------------------------------------------
# Record counts: from data_prep's manifest.json, by reading only without one


def _with_manifest(records_dir: Path, target: Path, splits: dict[str, np.ndarray]) -> Path:
    """A copy of `records_dir` with a manifest.json as data_prep writes it (its `counts` and
    `shards` sections) for the shards `write_split` wrote (record i in shard i % n)."""
    shutil.copytree(records_dir, target)
    shards, counts = [], {}
    for split, grades in splits.items():
        files = data.split_files(target, SIZE, split)
        for j, path in enumerate(files):
            shards.append(
                {
                    "path": Path(path).relative_to(target).as_posix(),
                    "split": split,
                    "records": len(range(j, len(grades), len(files))),
                    "bytes": os.path.getsize(path),
                }
            )
        bincount = np.bincount(grades, minlength=5)
        counts[split] = {
            "records": len(grades),
            "grades": {str(g): int(n) for g, n in enumerate(bincount)},
        }
    manifest = {"counts": counts, "shards": {str(SIZE): shards}}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _make_unreadable(records_dir: Path) -> None:
    """Zero every shard, keeping its size: any attempt to read a record now fails."""
    for path in (records_dir / str(SIZE)).iterdir():
        path.write_bytes(bytes(path.stat().st_size))


def test_counts_come_from_the_manifest_without_reading_a_record(dataset, tmp_path):
    out, _, train_grades, _, val_grades = dataset
    copy = _with_manifest(out, tmp_path / "r", {"train": train_grades, "val": val_grades})
    _make_unreadable(copy)
    with pytest.raises(tf.errors.DataLossError):
        data.count_records(data.split_files(copy, SIZE, "train"))  # the records are unreadable
    assert data.split_size(copy, SIZE, "train") == 40
    assert data.split_grade_counts(copy, SIZE, "train") == np.bincount(train_grades).tolist()
    config = Config(
        data=str(copy), model_dir=str(tmp_path / "m"), image_size=SIZE,
        optim=OptimConfig(batch_size=4), input=DataConfig(balance=True),
    )  # fmt: skip
    stage = training.Stage(tmp_path / "m", tmp_path / "b", chief=True, start_epoch=0)
    datasets = training.make_datasets(config, tf.distribute.get_strategy(), stage)
    assert (datasets.steps, datasets.val_steps) == (10, 3)  # 40 // 4 and ceil(11 / 4)


def test_without_a_manifest_the_records_are_counted_by_reading(dataset, monkeypatch):
    out, _, train_grades, _, _ = dataset
    assert not (out / "manifest.json").exists()
    read = []
    count_records, grade_counts = data.count_records, data.grade_counts
    monkeypatch.setattr(data, "count_records", lambda f: read.append(f) or count_records(f))
    monkeypatch.setattr(data, "grade_counts", lambda f: read.append(f) or grade_counts(f))
    assert data.split_size(out, SIZE, "train") == 40
    assert data.split_size(out, SIZE, "val") == 11
    assert data.split_grade_counts(out, SIZE, "train") == np.bincount(train_grades).tolist()
    assert len(read) == 3


@pytest.mark.parametrize("change", ["bytes", "records", "missing shard"])
def test_a_manifest_that_does_not_describe_the_shards_is_not_trusted(dataset, tmp_path, change):
    out, _, train_grades, _, val_grades = dataset
    copy = _with_manifest(out, tmp_path / "r", {"train": train_grades, "val": val_grades})
    manifest = json.loads((copy / "manifest.json").read_text())
    shards = manifest["shards"][str(SIZE)]
    if change == "bytes":  # a shard was rewritten since
        shards[0]["bytes"] += 1
        manifest["counts"]["train"]["records"] = shards[0]["records"] = 999
    elif change == "records":  # counts disagree with the shards
        manifest["counts"]["train"]["records"] = 999
    else:  # the manifest lists fewer shards than are there
        manifest["shards"][str(SIZE)] = [
            s for s in shards if not s["path"].startswith("32/train-00000")
        ]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert data.split_size(copy, SIZE, "train") == 40
