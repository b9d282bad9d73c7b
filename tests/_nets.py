"""Test helper: a small functional network with M²CNN's two outputs, for tests of the train
step that need no IRv2. The trainer takes any functional model with M²CNN's outputs; a small,
well-conditioned one keeps a comparison about the step itself, not the float noise of a random
IRv2. Its "conv" and "conv_bn" layers stand in for a pretrained group."""

from __future__ import annotations

import keras


def small_net() -> keras.Model:
    """16×16 RGB → one 3×3 convolution, BatchNorm, ReLU, pooling → {"logits": 5, "score": 1}."""
    x = inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(scale=False, name="conv_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(x))
    return keras.Model(
        inputs, {"logits": keras.layers.Dense(5, name="logits")(x),
                 "score": keras.layers.Dense(1, name="score")(x)},
    )  # fmt: skip
