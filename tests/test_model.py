"""The model of Fig. 2 against Keras's own IRv2, Table I and the paper's block counts."""

import re

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from m2cnn_tf import model as m2
from m2cnn_tf.checkpoints import load_stage, save_checkpoint, stage_dir
from m2cnn_tf.config import ModelConfig
from m2cnn_tf.model import (
    WeightsUnavailable,
    backbone_layer_names,
    build_m2cnn,
    copy_weights_by_name,
    spatial_sizes,
    split_lr_groups,
)

KERAS_IRV2_PARAMS = 54_336_736
PROBE = 160  # any size >= 75 works for the backbone; small keeps the test quick


@pytest.fixture(scope="module")
def keras_irv2():
    return keras.applications.InceptionResNetV2(
        include_top=False, weights=None, input_shape=(PROBE, PROBE, 3)
    )


@pytest.fixture(scope="module")
def keras_weight_files(keras_irv2, tmp_path_factory):
    """Keras's notop file format (legacy .h5, as downloaded) and a Keras 3 .weights.h5."""
    folder = tmp_path_factory.mktemp("weights")
    legacy = folder / m2.IMAGENET_NOTOP
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_irv2)
    modern = folder / "irv2_notop.weights.h5"
    keras_irv2.save_weights(modern)
    return {"legacy": legacy, "modern": modern}


def _features(model):
    return keras.Model(model.input, model.get_layer(m2.BACKBONE_OUTPUT).output)


def _run(model, x):
    """The model's inference pass, eagerly: `predict` would first trace the model (seconds for
    IRv2) to compute the same layers once."""
    return keras.tree.map_structure(np.asarray, model(x, training=False))


@pytest.mark.slow
def test_backbone_at_paper_counts_is_keras_inception_resnet_v2(keras_irv2):
    ours = _features(build_m2cnn(PROBE, preset="paper"))
    assert ours.count_params() == keras_irv2.count_params() == KERAS_IRV2_PARAMS
    ours.set_weights(keras_irv2.get_weights())
    x = np.random.default_rng(0).uniform(-1, 1, (2, PROBE, PROBE, 3)).astype("float32")
    diff = np.abs(_run(ours, x) - _run(keras_irv2, x)).max()
    assert diff < 1e-4


@pytest.mark.parametrize(
    ("size", "before", "after"),
    [(224, 5, 5), (448, 12, 5), (720, 21, 4), (256, 6, 6)],  # 256: 6, not 8 (README)
)
def test_feature_map_sizes_reproduce_table_i(size, before, after):
    assert spatial_sizes(build_m2cnn(size, preset="tiny")) == (before, after)


@pytest.mark.parametrize(
    ("size", "medium", "large"),
    [(349, False, False), (350, True, False), (699, True, False), (700, True, True)],
)
def test_multi_cell_switch_follows_the_resolution(size, medium, large):
    names = {layer.name for layer in build_m2cnn(size, preset="tiny").layers}
    assert ("medium_reduction_b" in names) is medium
    assert ("large_reduction_b" in names) is large


@pytest.mark.slow
def test_paper_preset_has_the_papers_block_counts():
    names = [layer.name for layer in build_m2cnn(720, preset="paper").layers]

    def count(pattern):
        return sum(bool(re.fullmatch(pattern, n)) for n in names)

    assert count(r"block35_\d+_mixed") == 10  # N1
    assert count(r"block17_\d+_mixed") == 20  # N2
    assert count(r"block8_\d+_mixed") == 10  # IRv2's own Cell-C stack
    assert count(r"medium_block8_\d+_mixed") == 10  # N3
    assert count(r"large_block8_\d+_mixed") == 5  # N4
    assert count(r"(medium|large)_reduction_b") == 2


def test_layer_names_are_stable_and_never_auto_numbered():
    keras.layers.Dense(3)  # bump Keras's global name counters between the two builds
    first = [layer.name for layer in build_m2cnn(448, preset="tiny").layers]
    second = [layer.name for layer in build_m2cnn(448, preset="tiny").layers]
    assert first == second
    auto = re.compile(
        r"(conv2d|batch_normalization|activation|dense|concatenate|max_pooling2d|"
        r"average_pooling2d|residual_scale|input_layer)(_\d+)?"
    )
    assert [n for n in first if auto.fullmatch(n)] == []
    assert "conv_7b_ac" in first and "avg_pool" in first and "mixed_5b" in first


def test_model_is_one_flat_graph_with_float32_heads_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_m2cnn(96, preset="tiny")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    out = model(np.zeros((2, 96, 96, 3), "float32"))
    assert out["logits"].shape == (2, 5) and out["score"].shape == (2, 1)
    assert out["logits"].dtype == "float32" and out["score"].dtype == "float32"
    assert model.get_layer("conv_7b").compute_dtype == "float16"


@pytest.fixture(scope="module")
def keras_irv2_on_an_image(keras_irv2) -> tuple[np.ndarray, np.ndarray]:
    """An image and Keras's IRv2 features of it: the reference both weight files are checked
    against (an eager IRv2 pass takes about a second)."""
    x = np.random.default_rng(1).uniform(-1, 1, (1, PROBE, PROBE, 3)).astype("float32")
    return x, _run(keras_irv2, x)


@pytest.mark.parametrize("kind", ["legacy", "modern"])
@pytest.mark.slow
def test_backbone_weights_load_from_a_local_keras_file(
    kind, keras_irv2_on_an_image, keras_weight_files
):
    model = build_m2cnn(PROBE, weights=str(keras_weight_files[kind]), preset="paper")
    x, reference = keras_irv2_on_an_image
    assert np.abs(_run(_features(model), x) - reference).max() < 1e-4


@pytest.mark.slow
def test_stage1_groups_imagenet_backbone_at_lr1_and_heads_at_lr2(keras_irv2, keras_weight_files):
    model = build_m2cnn(224, preset="tiny")
    loaded = m2.load_backbone_weights(model, str(keras_weight_files["legacy"]), preset="tiny")
    assert loaded == backbone_layer_names(model)
    # tiny takes the first block of each stack from the paper-count file (written from
    # keras_irv2, whose own layer is the reference)
    np.testing.assert_array_equal(
        model.get_layer("block17_1_conv").get_weights()[0],
        keras_irv2.get_layer("block17_1_conv").get_weights()[0],
    )
    old, new = split_lr_groups(model, loaded)
    assert sorted(v.path for v in new) == sorted(
        ["logits/kernel", "logits/bias", "score/kernel", "score/bias"]
    )
    assert len(old) + len(new) == len(model.trainable_weights)


def test_stage2_groups_stage1_weights_at_lr1_and_medium_cells_at_lr2():
    stage1 = build_m2cnn(224, preset="tiny")
    stage2 = build_m2cnn(448, preset="tiny")
    copied = copy_weights_by_name(stage1, stage2)
    assert sorted(copied) == sorted(layer.name for layer in stage1.layers if layer.weights)
    for name in ("conv2d_1a", "block8_1_conv", "conv_7b_bn", "logits", "score"):
        for a, b in zip(
            stage1.get_layer(name).weights, stage2.get_layer(name).weights, strict=True
        ):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    old, new = split_lr_groups(stage2, copied)
    new_layers = {v.path.split("/")[0] for v in new}
    assert new_layers and all(name.startswith("medium_") for name in new_layers)
    assert len(old) == len(stage1.trainable_weights)


def test_offline_imagenet_download_fails_with_one_actionable_line(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        build_m2cnn(96, weights="imagenet", preset="tiny")
    message = str(err.value)
    assert "\n" not in message and "--" not in message
    assert m2.IMAGENET_NOTOP in message and "~/.keras/models" in message
    assert err.value.setting == "weights"  # the command line names its flag


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # the foreign file, as intended
@pytest.mark.slow
def test_missing_or_foreign_weights_file_is_a_one_line_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        build_m2cnn(96, weights=str(tmp_path / "nope.h5"), preset="tiny")
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    foreign = tmp_path / "other.weights.h5"
    other.save_weights(foreign)
    with pytest.raises(WeightsUnavailable) as err:
        build_m2cnn(96, weights=str(foreign), preset="tiny")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_checkpoint_round_trips_in_safe_mode(tmp_path):
    model = build_m2cnn(96, preset="tiny")
    save_checkpoint(model, stage_dir(tmp_path, 1), {"stage": 1})
    loaded, meta = load_stage(tmp_path, 1)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype("float32")
    for key in ("logits", "score"):
        np.testing.assert_allclose(_run(loaded, x)[key], _run(model, x)[key], atol=1e-6)
    assert meta == {"stage": 1}


@pytest.mark.slow
def test_new_cells_start_as_a_max_pool_of_the_features_the_heads_know():
    stage2 = build_m2cnn(448, preset="tiny")  # cell_init="identity" by default
    probe = keras.Model(
        stage2.input,
        [stage2.get_layer("conv_7b_ac").output, stage2.get_layer("avg_pool").input],
    )
    x = np.random.default_rng(3).uniform(-1, 1, (1, 448, 448, 3)).astype("float32")
    before, after = _run(probe, x)
    # Reference: a plain 3x3/2 'valid' max-pool in numpy, then inference-mode BN with its
    # initial statistics (mean 0, variance 1, epsilon 1e-3), then ReLU (a no-op here).
    side = (before.shape[1] - 3) // 2 + 1
    pooled = np.stack(
        [
            [before[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(0, 1)) for j in range(side)]
            for i in range(side)
        ]
    )
    np.testing.assert_allclose(after[0], pooled / np.sqrt(1 + 1e-3), rtol=1e-4, atol=1e-5)


def test_random_cell_init_keeps_keras_default_initialisers():
    # Keras's Conv2D defaults: kernel glorot_uniform, U(±√(6 / (fan_in + fan_out))) with
    # variance limit² / 3; bias zeros. The identity start would give an all-zero kernel.
    model = build_m2cnn(448, preset="tiny", cell_init="random")
    conv = model.get_layer("medium_block8_1_conv")
    kernel = conv.kernel.numpy()
    kh, kw, fan_in, fan_out = kernel.shape
    limit = np.sqrt(6 / (kh * kw * (fan_in + fan_out)))
    assert np.abs(kernel).max() <= limit
    assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.01)  # ~10^6 draws
    assert abs(kernel.mean()) < 0.01 * limit
    np.testing.assert_array_equal(conv.bias.numpy(), 0)
    projection = model.get_layer("medium_conv").kernel.numpy()  # not the pass-through
    _, _, fan_in, fan_out = projection.shape
    assert projection.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.01)


@pytest.mark.slow
def test_bn_momentum_is_set_on_every_batchnorm_and_survives_saving(tmp_path):
    model = build_m2cnn(96, preset="tiny", bn_momentum=0.9)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == 0.9 for layer in norms)
    save_checkpoint(model, stage_dir(tmp_path, 1), {})
    loaded, _ = load_stage(tmp_path, 1)
    assert loaded.get_layer("conv_7b_bn").momentum == 0.9
    assert build_m2cnn(96, preset="tiny").get_layer("conv_7b_bn").momentum == 0.99


def test_without_multi_cell_any_resolution_is_the_plain_basenet():
    model = build_m2cnn(448, preset="tiny", multi_cell=False)
    assert not any(layer.name.startswith(("medium_", "large_")) for layer in model.layers)
    assert spatial_sizes(model) == (12, 12)


def _norms(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.slow
def test_sync_bn_defaults_to_on_with_more_than_one_replica_and_can_be_turned_off():
    def synchronised(settings, replicas):
        net = m2.build_from_settings(96, settings, replicas)
        return {layer.synchronized for layer in _norms(net)}

    assert synchronised(ModelConfig(preset="tiny"), 1) == {False}
    assert synchronised(ModelConfig(preset="tiny"), 2) == {True}
    assert synchronised(ModelConfig(preset="tiny", sync_bn=False), 8) == {False}
    assert synchronised(ModelConfig(preset="tiny", sync_bn=True), 1) == {True}


@pytest.mark.slow
def test_a_checkpoint_with_synchronised_bn_loads_in_safe_mode_and_transfers_by_name(tmp_path):
    model = build_m2cnn(96, preset="tiny", sync_bn=True)
    rng = np.random.default_rng(4)
    for layer in _norms(model):  # non-trivial statistics, so a lost value would show
        mean, var = layer.moving_mean, layer.moving_variance
        mean.assign(rng.normal(0, 0.1, mean.shape).astype("float32"))
        var.assign(rng.uniform(0.5, 2.0, var.shape).astype("float32"))
    save_checkpoint(model, stage_dir(tmp_path, 1), {"stage": 1})
    loaded, _ = load_stage(tmp_path, 1)  # safe mode, outside any tf.distribute strategy
    assert all(layer.synchronized for layer in _norms(loaded))
    x = rng.uniform(-1, 1, (2, 96, 96, 3)).astype("float32")
    for key in ("logits", "score"):
        np.testing.assert_allclose(_run(loaded, x)[key], _run(model, x)[key], atol=1e-6)
    # Stage transfer into a model built without synchronisation (one device) copies everything.
    plain = build_m2cnn(96, preset="tiny")
    copied = copy_weights_by_name(loaded, plain)
    assert set(copied) == {layer.name for layer in plain.layers if layer.weights}
    for a, b in zip(plain.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
