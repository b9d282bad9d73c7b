"""Keras's BatchNormalization with its training-mode step in one TensorFlow kernel.

Why: Keras 3 writes BatchNorm in training as element-wise ops (moments, the moving averages,
the normalisation) and the tape adds their gradients: about 48 graph ops per layer, which were
35 % of a traced tiny train step. TensorFlow's `FusedBatchNormV3` computes the same batch
normalisation in one op and its gradient in one more, on CPU, on GPU (cuDNN's kernel) and under
XLA. A run pays for every op in tracing and in Grappler before its first step (the figures:
benchmarks/fused_kernels.py, docs/training.md "BatchNorm").

Ours, not the paper's (it says nothing of kernels): the arithmetic is Keras's up to rounding.
The batch is normalised by its mean and biased variance, and the moving averages follow Keras's
formula with the biased variance: the kernel returns the variance with Bessel's correction
n/(n-1) applied, so it is scaled back by (n-1)/n here (n = values per channel). Inference,
synchronised statistics (moments all-reduced over replicas), masks, renormalisation and any
layout but channels-last 4-D take Keras's own path; a layer saved by Keras's class loads as is.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


@keras.saving.register_keras_serializable(package="m2cnn")
class BatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training step is `FusedBatchNormV3`; the same weights, config
    and inference as Keras's layer. Named as Keras's class on purpose: `.weights.h5` files (the
    backups, Keras's IRv2 weights) key each layer by its class name, so the same name keeps them
    interchangeable with files written with Keras's layer."""

    def _fusable(self, inputs, training, mask) -> bool:
        return bool(
            training
            and self.trainable
            and not self.synchronized
            and not self.renorm
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, "float32")  # as Keras: BN computes in float32 under mixed precision
        channels = self.moving_mean.shape[0]
        empty = tf.zeros([0], "float32")  # population statistics: for inference only
        y, mean, corrected, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels]),
            offset=tf.cast(self.beta, "float32") if self.center else tf.zeros([channels]),
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            is_training=True,
        )
        n = tf.cast(tf.size(x, out_type=tf.int64) // channels, "float32")
        variance = corrected * (tf.maximum(n - 1.0, 1.0) / n)  # the kernel's n-1 is at least 1
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return tf.cast(y, self.compute_dtype)
