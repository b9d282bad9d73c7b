"""Grad-CAM (Selvaraju et al., 2017) on M²CNN's last convolutional feature map.

The map explained is the input of `avg_pool`: the BaseNet's `conv_7b_ac` at stage 1, the
Multi-Cell's `medium_conv_ac` / `large_conv_ac` at stages 2 and 3 (Fig. 2, §II-C). By default the
target is the regression *score*, the output the paper grades with ("scores", Table II): red
regions are those whose features push the predicted grade up. A healthy eye (score near 0)
therefore often gets a faint or empty map; that is the method, not a failure.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf

from m2cnn_tf.errors import RunFailed, UsageError
from m2cnn_tf.model import POOL

_FONT = cv2.FONT_HERSHEY_SIMPLEX


class GradCam:
    """Batched Grad-CAM: `cams(images)` -> (B, h, w) in [0, 1] at the feature map's size.

    target: "score" (the regression output) or "class" (the logit of the predicted grade).
    """

    def __init__(self, model: keras.Model, target: str = "score"):
        if target not in ("score", "class"):
            raise UsageError(f"Grad-CAM target must be 'score' or 'class', got {target!r}")
        self.target = target
        self._model = keras.Model(
            model.inputs,
            [
                model.get_layer(POOL).input,
                model.get_layer("score").output,
                model.get_layer("logits").output,
            ],
            name="gradcam",
        )

    @tf.function(reduce_retracing=True)
    def _cams(self, images):
        with tf.GradientTape() as tape:
            features, score, logits = self._model(images, training=False)
            features = tf.cast(features, tf.float32)
            if self.target == "score":
                target = tf.reshape(tf.cast(score, tf.float32), [-1])
            else:
                chosen = tf.argmax(logits, axis=-1)
                target = tf.gather(tf.cast(logits, tf.float32), chosen, batch_dims=1)
            # Images are independent in inference mode, so one gradient of the batch sum holds
            # every image's own gradient.
            total = tf.reduce_sum(target)
        grads = tape.gradient(total, features)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)  # alpha_k: pooled gradients
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        return tf.math.divide_no_nan(cam, peak)

    def cams(self, images) -> np.ndarray:
        return self._cams(tf.convert_to_tensor(images, tf.float32)).numpy()


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A feature-map heatmap at image resolution, still in [0, 1]."""
    up = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(up, 0.0, 1.0)


def overlay(rgb: np.ndarray, cam: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """The preprocessed image with the heatmap blended in (JET: blue = none, red = most)."""
    heat = upsample(cam, rgb.shape[0])
    colours = cv2.applyColorMap(np.uint8(np.round(heat * 255)), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    alpha = (strength * heat)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_panel(path, rgb: np.ndarray, cam: np.ndarray, caption: str = "") -> None:
    """PNG: the preprocessed image beside its Grad-CAM overlay, with a one-line caption."""
    panel = np.concatenate([rgb, overlay(rgb, cam)], axis=1)
    if caption:
        width = panel.shape[1]
        scale = max(0.3, width / 1200)  # shrink until the caption fits the panel's width
        while scale > 0.3 and cv2.getTextSize(caption, _FONT, scale, 1)[0][0] > width - 12:
            scale -= 0.05
        (_, text_h), _ = cv2.getTextSize(caption, _FONT, scale, 1)
        bar = np.full((text_h + 14, width, 3), 255, np.uint8)
        cv2.putText(bar, caption, (6, text_h + 6), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
        panel = np.concatenate([panel, bar], axis=0)
    if not cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):
        raise RunFailed(f"cannot write the Grad-CAM panel {path}")
