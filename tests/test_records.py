"""m2cnn_tf.records: the TFRecord schema shared by data_prep and the training input pipeline."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tensorflow as tf

from m2cnn_tf import records


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_example_round_trips_through_a_tfrecord_file(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(3)]
    meta = [("10_left", 0), ("10_right", 4), ("IDRiD_001", 2)]
    path = tmp_path / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for img, (image_id, grade) in zip(images, meta, strict=True):
            ser = records.make_example(
                _png(img), image_format="png", height=12, width=12, grade=grade, image_id=image_id
            )
            w.write(ser)
    ds = tf.data.TFRecordDataset(str(path)).map(records.parse_example)
    ds = ds.map(lambda f: (f, records.decode_image(f)))  # graph mode: no py_function
    got = list(ds.as_numpy_iterator())
    assert len(got) == 3
    expected_patient_eye = [(b"10", b"left"), (b"10", b"right"), (b"IDRiD_001", b"")]
    for (features, image), img, (image_id, grade), (patient, eye) in zip(
        got, images, meta, expected_patient_eye, strict=True
    ):
        assert features["image/id"] == image_id.encode()
        assert features["image/grade"] == grade
        assert features["image/format"] == b"png"
        assert features["image/height"] == 12 and features["image/width"] == 12
        assert features["image/patient"] == patient and features["image/eye"] == eye
        assert np.array_equal(image, img)  # PNG is lossless, and RGB order is kept
        assert set(features) == set(records.FEATURES)


def test_jpeg_records_decode_like_opencv(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    ser = records.make_example(
        data, image_format="jpeg", height=16, width=16, grade=1, image_id="3"
    )
    image = records.decode_image(records.parse_example(tf.constant(ser))).numpy()
    assert image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - rgb).max() <= 3


def test_explicit_patient_and_eye_override_the_id():
    ser = records.make_example(
        b"x",
        image_format="jpeg",
        height=1,
        width=1,
        grade=0,
        image_id="a",
        patient="p7",
        eye="left",
    )
    f = records.parse_example(ser)
    assert f["image/patient"].numpy() == b"p7" and f["image/eye"].numpy() == b"left"


@pytest.mark.parametrize("grade", [-1, 5])
def test_make_example_rejects_grades_outside_0_to_4(grade):
    with pytest.raises(ValueError, match="grade"):
        records.make_example(b"", image_format="png", height=1, width=1, grade=grade, image_id="a")


@pytest.mark.parametrize(
    ("image_id", "expected"),
    [
        ("10_left", ("10", "left")),
        ("10_right", ("10", "right")),
        ("abc_def_RIGHT", ("abc_def", "right")),
        ("IDRiD_001", ("IDRiD_001", "")),
        ("left", ("left", "")),
    ],
)
def test_split_id_gives_patient_and_eye(image_id, expected):
    assert records.split_id(image_id) == expected


def test_shard_paths_lists_final_shards_in_order(tmp_path):
    d = tmp_path / "224"
    d.mkdir()
    for i in (2, 0, 1):
        (d / f"train-{i:05d}-of-00003.tfrecord").write_bytes(b"")
    (d / "train-00003-of-00003.tfrecord.tmp123").write_bytes(b"")
    (d / "val-00000-of-00001.tfrecord").write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in records.shard_paths(tmp_path, 224, "train")] == [
        "train-00000-of-00003.tfrecord",
        "train-00001-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord",
    ]
    assert len(records.shard_paths(tmp_path, 224, "val")) == 1
    assert records.shard_paths(tmp_path, 224, "test") == []
    assert records.shard_paths(tmp_path, 448, "train") == []


def test_shard_paths_refuses_an_unfinished_split(tmp_path):
    d = tmp_path / "64"
    d.mkdir()
    (d / "train-00000-of-00003.tfrecord").write_bytes(b"")
    (d / "train-00002-of-00003.tfrecord").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 of 3"):
        records.shard_paths(tmp_path, 64, "train")


def test_available_sizes_lists_sizes_with_shards(tmp_path):
    for size, has_shard in ((720, True), (224, True), (448, False)):
        (tmp_path / str(size)).mkdir()
        if has_shard:
            (tmp_path / str(size) / "test-00000-of-00001.tfrecord").write_bytes(b"")
    (tmp_path / ".state").mkdir()
    assert records.available_sizes(tmp_path) == [224, 720]
    assert records.available_sizes(tmp_path / "missing") == []


def test_shard_name_numbers_the_shard_and_the_count_in_five_digits():
    assert records.shard_name("val", 3, 12) == "val-00003-of-00012.tfrecord"
