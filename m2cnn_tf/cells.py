"""The cells of Fig. 2: Inception-ResNet-v2's building blocks with explicit, stable layer names.

Szegedy et al. (2017) define the cells; Keras's `inception_resnet_v2.py` defines the layout we
must match weight for weight. Unlike Keras's builder, every layer here gets a name, because a
later stage loads an earlier one by name (§III-A "Parameter Initialization") and auto-numbered
names like `conv2d_57` change with whatever was built before in the process.
"""

from __future__ import annotations

import keras
from keras import layers

from m2cnn_tf import fused_batchnorm

# Residual scales of Keras's IRv2 (and TF-slim's): block35 0.17, block17 0.1, block8 0.2.
BLOCK_SCALES = {"block35": 0.17, "block17": 0.1, "block8": 0.2}


@keras.saving.register_keras_serializable(package="m2cnn")
class ResidualScale(layers.Layer):
    """x + scale * residual. A registered layer (not a Lambda), so checkpoints load in safe mode."""

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, inputs):
        shortcut, residual = inputs
        return shortcut + residual * self.scale

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def widths(width: float):
    """Filter counts scaled by a preset's width (1 for the paper's and Keras's IRv2)."""
    return lambda filters: max(1, round(filters * width))


def conv2d_bn(
    x,
    filters: int,
    kernel_size: int | tuple[int, int],
    name: str,
    strides: int = 1,
    padding: str = "same",
    activation: str | None = "relu",
    use_bias: bool = False,
):
    """Conv2D + BatchNorm(scale=False) + activation, named `name`, `name_bn`, `name_ac`."""
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias, name=name
    )(x)
    if not use_bias:
        x = fused_batchnorm.BatchNormalization(axis=3, scale=False, name=f"{name}_bn")(x)
    if activation is not None:
        x = layers.Activation(activation, name=f"{name}_ac")(x)
    return x


def stem(x, width: float = 1.0):
    """IRv2 stem up to mixed_5b (Inception-A): 35x35x320 at 299 px; 'valid' padding as Keras."""
    w = widths(width)
    x = conv2d_bn(x, w(32), 3, "conv2d_1a", strides=2, padding="valid")
    x = conv2d_bn(x, w(32), 3, "conv2d_2a", padding="valid")
    x = conv2d_bn(x, w(64), 3, "conv2d_2b")
    x = layers.MaxPooling2D(3, strides=2, name="maxpool_3a")(x)
    x = conv2d_bn(x, w(80), 1, "conv2d_3b", padding="valid")
    x = conv2d_bn(x, w(192), 3, "conv2d_4a", padding="valid")
    x = layers.MaxPooling2D(3, strides=2, name="maxpool_5a")(x)
    b0 = conv2d_bn(x, w(96), 1, "mixed_5b_b0_1x1")
    b1 = conv2d_bn(x, w(48), 1, "mixed_5b_b1_1x1")
    b1 = conv2d_bn(b1, w(64), 5, "mixed_5b_b1_5x5")
    b2 = conv2d_bn(x, w(64), 1, "mixed_5b_b2_1x1")
    b2 = conv2d_bn(b2, w(96), 3, "mixed_5b_b2_3x3a")
    b2 = conv2d_bn(b2, w(96), 3, "mixed_5b_b2_3x3b")
    bp = layers.AveragePooling2D(3, strides=1, padding="same", name="mixed_5b_pool")(x)
    bp = conv2d_bn(bp, w(64), 1, "mixed_5b_pool_1x1")
    return layers.Concatenate(axis=3, name="mixed_5b")([b0, b1, b2, bp])


def inception_resnet_block(
    x,
    block_type: str,
    name: str,
    scale: float | None = None,
    activation: str | None = "relu",
    width: float = 1.0,
):
    """Cell-A (block35), Cell-B (block17) or Cell-C (block8): a normal cell that keeps the shape."""
    w = widths(width)
    if block_type == "block35":
        b0 = conv2d_bn(x, w(32), 1, f"{name}_b0_1x1")
        b1 = conv2d_bn(x, w(32), 1, f"{name}_b1_1x1")
        b1 = conv2d_bn(b1, w(32), 3, f"{name}_b1_3x3")
        b2 = conv2d_bn(x, w(32), 1, f"{name}_b2_1x1")
        b2 = conv2d_bn(b2, w(48), 3, f"{name}_b2_3x3a")
        b2 = conv2d_bn(b2, w(64), 3, f"{name}_b2_3x3b")
        branches = [b0, b1, b2]
    elif block_type == "block17":
        b0 = conv2d_bn(x, w(192), 1, f"{name}_b0_1x1")
        b1 = conv2d_bn(x, w(128), 1, f"{name}_b1_1x1")
        b1 = conv2d_bn(b1, w(160), (1, 7), f"{name}_b1_1x7")
        b1 = conv2d_bn(b1, w(192), (7, 1), f"{name}_b1_7x1")
        branches = [b0, b1]
    elif block_type == "block8":
        b0 = conv2d_bn(x, w(192), 1, f"{name}_b0_1x1")
        b1 = conv2d_bn(x, w(192), 1, f"{name}_b1_1x1")
        b1 = conv2d_bn(b1, w(224), (1, 3), f"{name}_b1_1x3")
        b1 = conv2d_bn(b1, w(256), (3, 1), f"{name}_b1_3x1")
        branches = [b0, b1]
    else:
        raise ValueError(f"unknown block type {block_type!r}")
    mixed = layers.Concatenate(axis=3, name=f"{name}_mixed")(branches)
    up = conv2d_bn(mixed, x.shape[3], 1, f"{name}_conv", activation=None, use_bias=True)
    scale = BLOCK_SCALES[block_type] if scale is None else scale
    x = ResidualScale(scale, name=f"{name}_scale")([x, up])
    if activation is not None:
        x = layers.Activation(activation, name=f"{name}_ac")(x)
    return x


def reduction_a(x, name: str = "mixed_6a", width: float = 1.0):
    """Reduction-A (mixed_6a): 35x35x320 -> 17x17x1088 at 299 px."""
    w = widths(width)
    b0 = conv2d_bn(x, w(384), 3, f"{name}_b0_3x3", strides=2, padding="valid")
    b1 = conv2d_bn(x, w(256), 1, f"{name}_b1_1x1")
    b1 = conv2d_bn(b1, w(256), 3, f"{name}_b1_3x3a")
    b1 = conv2d_bn(b1, w(384), 3, f"{name}_b1_3x3b", strides=2, padding="valid")
    bp = layers.MaxPooling2D(3, strides=2, padding="valid", name=f"{name}_pool")(x)
    return layers.Concatenate(axis=3, name=name)([b0, b1, bp])


def reduction_b(x, name: str, width: float = 1.0):
    """Reduction Cell-B (mixed_7a): halves the grid and adds 992 channels to its input."""
    w = widths(width)
    b0 = conv2d_bn(x, w(256), 1, f"{name}_b0_1x1")
    b0 = conv2d_bn(b0, w(384), 3, f"{name}_b0_3x3", strides=2, padding="valid")
    b1 = conv2d_bn(x, w(256), 1, f"{name}_b1_1x1")
    b1 = conv2d_bn(b1, w(288), 3, f"{name}_b1_3x3", strides=2, padding="valid")
    b2 = conv2d_bn(x, w(256), 1, f"{name}_b2_1x1")
    b2 = conv2d_bn(b2, w(288), 3, f"{name}_b2_3x3a")
    b2 = conv2d_bn(b2, w(320), 3, f"{name}_b2_3x3b", strides=2, padding="valid")
    bp = layers.MaxPooling2D(3, strides=2, padding="valid", name=f"{name}_pool")(x)
    return layers.Concatenate(axis=3, name=name)([b0, b1, b2, bp])


def cell_c_stack(x, count: int, prefix: str, width: float = 1.0):
    """`count` Cell-C (block8), the last linear with scale 1.0, exactly as IRv2 ends its C stack."""
    for i in range(1, count + 1):
        last = i == count
        x = inception_resnet_block(
            x,
            "block8",
            f"{prefix}_{i}",
            scale=1.0 if last else None,
            activation=None if last else "relu",
            width=width,
        )
    return x
