"""Train-split augmentation (ours, all of it: the paper describes none; `AugmentConfig`).

The fundus has no "up" (§II-A), so any rotation. Flips in both axes, rotation by any angle, a
small zoom and shift, all composed into ONE affine map applied by one bilinear
`ImageProjectiveTransformV3` with γ fill (Eq. (1): the masked background is γ=128); then
brightness and contrast as one multiply-add. Contrast pivots on γ (0 after scaling), the level
Eq. (1) centres every image on, so no per-image mean is needed.

Two entry points with the same seeds giving the same transform: `augment_scaled` inside the
train step, on the accelerator (the default: measured on one core at 720 px, the transform
costs several times the JPEG decode, benchmarks/input_pipeline.py, so CPU-side geometry cannot
feed a GPU), and `augment_batch` in tf.data on uint8 (`data.make_dataset`, `on="pipeline"`).
Randomness is stateless, keyed by the seeds given: reproducible, and it resumes exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

from m2cnn_tf.config import AugmentConfig


def affine_transforms(
    seeds: tf.Tensor, batch: int, image_size: int, config: AugmentConfig
) -> tf.Tensor:
    """[batch, 8] output→input maps: flips, rotation, zoom and shift composed about the centre."""
    keys = tf.random.experimental.stateless_split(seeds, 6)
    u = [
        tf.random.stateless_uniform([batch], seed=keys[i], minval=-1.0, maxval=1.0)
        for i in range(5)
    ]
    if config.flip:
        flips = tf.sign(
            tf.random.stateless_uniform([batch, 2], seed=keys[5], minval=-1.0, maxval=1.0)
        )
        fx, fy = flips[:, 0], flips[:, 1]
    else:
        fx = fy = tf.ones([batch])
    theta = u[0] * (config.rotation * math.pi / 180.0)
    zoom = tf.exp(u[1] * math.log1p(config.zoom))  # symmetric in and out
    tx = u[2] * config.shift * image_size
    ty = u[3] * config.shift * image_size
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    # input = A (output - c) + c + t, with A = R(θ) · diag(fx, fy) / zoom
    a00, a01 = cos * fx, -sin * fy
    a10, a11 = sin * fx, cos * fy
    c = (image_size - 1) / 2.0
    a2 = c + tx - a00 * c - a01 * c
    b2 = c + ty - a10 * c - a11 * c
    zeros = tf.zeros([batch])
    return tf.stack([a00, a01, a2, a10, a11, b2, zeros, zeros], axis=1)


def _geometry(images: tf.Tensor, key: tf.Tensor, config: AugmentConfig, fill: float) -> tf.Tensor:
    if not (config.flip or config.rotation or config.zoom or config.shift):
        return images
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=affine_transforms(key, tf.shape(images)[0], images.shape[1], config),
        output_shape=tf.shape(images)[1:3],
        fill_value=fill,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _photometric(key: tf.Tensor, batch, config: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image (gain, offset): contrast around γ and brightness, on the [-1, 1] scale."""
    keys = tf.random.experimental.stateless_split(key, 2)
    gain = 1.0 + config.contrast * tf.random.stateless_uniform(
        [batch, 1, 1, 1], seed=keys[0], minval=-1.0, maxval=1.0
    )
    offset = config.brightness * tf.random.stateless_uniform(
        [batch, 1, 1, 1], seed=keys[1], minval=-1.0, maxval=1.0
    )
    return gain, offset


def augment_batch(images: tf.Tensor, seeds: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """uint8 batch → augmented float32 batch in [-1, 1] (geometry at uint8, then one FMA).

    The tf.data variant (AugmentConfig.on == "pipeline"): cheapest on a CPU.
    """
    keys = tf.random.experimental.stateless_split(seeds, 2)
    images = _geometry(images, keys[0], config, float(config.fill_value))
    gain, offset = _photometric(keys[1], tf.shape(images)[0], config)
    # ((x / 127.5 - 1) * gain + offset), clipped to the input range, as one multiply-add.
    out = tf.cast(images, tf.float32) * (gain / 127.5) + (offset - gain)
    return tf.clip_by_value(out, -1.0, 1.0)


def augment_scaled(images: tf.Tensor, seeds: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """The same augmentation on a float batch already in [-1, 1]: for the accelerator, inside
    the train step (AugmentConfig.on == "step"), where the projective transform has a GPU
    kernel and costs little next to the network. Same seeds → same transform as augment_batch.
    """
    keys = tf.random.experimental.stateless_split(seeds, 2)
    fill = config.fill_value / 127.5 - 1.0  # γ on the [-1, 1] scale, as scale_image maps it
    images = _geometry(images, keys[0], config, fill)
    gain, offset = _photometric(keys[1], tf.shape(images)[0], config)
    return tf.clip_by_value(images * gain + offset, -1.0, 1.0)
