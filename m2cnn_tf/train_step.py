"""The train step of §III-A: one gradient, two learning rates, Table II's objectives.

`TwoRateTrainer` is a thin `keras.Model` around the plain functional M²CNN, so Keras's `fit`
gives the progress bar, callbacks and tf.distribute. Copied (or ImageNet) variables train at
LR1 = 1e-4, the fresh ones at LR2 = 1e-3, by two optimizers in one custom train step that
computes the gradients once (this replaces tensorflow-addons' MultiOptimizer). Only the
functional model is ever saved as the best checkpoint, so it loads anywhere in safe mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from m2cnn_tf import augmentation
from m2cnn_tf.config import NUM_CLASSES, OBJECTIVES, OPTIMIZERS, AugmentConfig, unknown_choice
from m2cnn_tf.errors import RunFailed
from m2cnn_tf.fused_adam import FusedAdam
from m2cnn_tf.losses import TERMS, objective_loss, regularized_variables
from m2cnn_tf.metrics import DEFAULT_CUTPOINTS
from m2cnn_tf.model import split_lr_groups


class TrainingError(RunFailed):
    """Training had to stop (non-finite loss, out of memory); the message says why and what to
    do, in one line."""


class QuadraticKappa(keras.metrics.Metric):
    """Streaming quadratic weighted kappa over a confusion matrix (replaces tfa's CohenKappa).

    `y_pred` is the regression score (B, 1) when `from_scores`, else logits/probabilities (B, K).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        from_scores: bool = True,
        cutpoints: Sequence[float] = DEFAULT_CUTPOINTS,
        name: str = "kappa",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.from_scores = from_scores
        self.cutpoints = tuple(float(c) for c in sorted(cutpoints))
        self.confusion = self.add_variable(
            shape=(num_classes, num_classes),
            initializer="zeros",
            name="confusion",
            dtype="float32",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        if self.from_scores:
            score = ops.reshape(ops.cast(y_pred, "float32"), (-1, 1))
            cuts = ops.convert_to_tensor(self.cutpoints, dtype="float32")
            pred = ops.sum(ops.cast(score >= cuts[None, :], "int32"), axis=1)
        else:
            pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        # The batch's confusion matrix as one-hot(true)ᵀ · one-hot(predicted): sums of exact
        # small integers, so the same on every device and in any order (TF's bincount has no
        # deterministic GPU kernel: it would stop a --deterministic run on a GPU).
        true_1h = ops.one_hot(y_true, self.num_classes, dtype="float32")
        pred_1h = ops.one_hot(pred, self.num_classes, dtype="float32")
        self.confusion.assign_add(ops.matmul(ops.transpose(true_1h), pred_1h))

    def result(self):
        cm = self.confusion
        total = ops.maximum(ops.sum(cm), 1.0)
        expected = ops.outer(ops.sum(cm, axis=1), ops.sum(cm, axis=0)) / total
        idx = ops.arange(self.num_classes, dtype="float32")
        weights = ops.square(idx[:, None] - idx[None, :])
        denominator = ops.sum(weights * expected)
        numerator = ops.sum(weights * cm)
        safe = ops.where(denominator > 0, denominator, 1.0)
        return ops.where(denominator > 0, 1.0 - numerator / safe, float("nan"))

    def reset_state(self):
        self.confusion.assign(ops.zeros_like(self.confusion))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "from_scores": self.from_scores,
            "cutpoints": list(self.cutpoints),
        }


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam by default: the paper names none; Adam is robust to the 10× LR gap between groups and
    is what fine-tuning recipes for IRv2 on Kaggle DR used. L_reg lives in the loss (Eq. (4)),
    so no optimizer applies decoupled weight decay. Adam's update runs as one fused kernel per
    variable (`fused_adam`): the same update, in half the tracing."""
    if name == "adam":
        return FusedAdam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":  # TF-slim's IRv2 ImageNet recipe
        return keras.optimizers.RMSprop(learning_rate, rho=0.9, momentum=0.9, epsilon=1.0)
    raise unknown_choice("optimizer", name, OPTIMIZERS)


class TwoRateTrainer(keras.Model):
    """Wraps the functional M²CNN with §III-A's two-learning-rate train step.

    `self.optimizer` (from compile) updates the pretrained group at LR1, `self.optimizer_new`
    the new group at LR2. Under mixed precision both are LossScaleOptimizers and the loss is
    scaled once by the smaller of their scales; each group's gradients are then rescaled to
    its own optimizer's scale, so each unscales and skips non-finite steps on its own, and a
    group that overflows lowers the common scale for the next step.

    `loss` picks Table II's objective (`config.OBJECTIVES`): which terms of Eq. (4) it
    minimises. Every term is still logged, so the untrained head's loss stays visible.

    `augment` is the run's AugmentConfig: the step augments when it is enabled with on="step"
    (with "pipeline", `data.make_dataset` does instead).
    """

    def __init__(
        self,
        net: keras.Model,
        pretrained_layers: Sequence[str],
        weight_decay: float,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        loss: str = "multitask",
        **kwargs,
    ):
        super().__init__(name="trainer", **kwargs)
        if loss not in OBJECTIVES:
            raise unknown_choice("loss", loss, OBJECTIVES)
        self.loss_mode = loss
        self.net = net
        on_device = augment is not None and augment.enabled and augment.on == "step"
        self.augment = augment if on_device else None  # for augmentation.augment_scaled, or None
        self.seed = int(seed)
        self.weight_decay = float(weight_decay)
        self.pretrained_layers = tuple(pretrained_layers)
        self.optimizer_new = None
        # One running mean per logged part: the objective's sum, every term, L_reg.
        self.means = {k: keras.metrics.Mean(name=k) for k in ("loss", *TERMS, "reg")}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.kappa_scores = QuadraticKappa(from_scores=True, name="kappa_scores")
        self.kappa_probs = QuadraticKappa(from_scores=False, name="kappa_probs")
        self.built = True  # the functional net is built; fit and BackupAndRestore need to know

    def call(self, images, training=False):
        return self.net(images, training=training)

    def groups(self) -> tuple[list, list]:
        """(pretrained vars at LR1, new vars at LR2)."""
        return split_lr_groups(self.net, self.pretrained_layers)

    def compile_two_rates(
        self, optimizer_pre, optimizer_new, *, mixed_precision: bool, jit_compile: bool
    ) -> None:
        if mixed_precision:
            optimizer_pre = keras.optimizers.LossScaleOptimizer(optimizer_pre, name="scale_pre")
            optimizer_new = keras.optimizers.LossScaleOptimizer(optimizer_new, name="scale_new")
        self.compile(optimizer=optimizer_pre, jit_compile=jit_compile)
        self.optimizer_new = optimizer_new
        old, new = self.groups()
        # Each optimizer holds slots for its own group only.
        self.optimizer.build(old)
        self.optimizer_new.build(new)
        self._mixed = mixed_precision

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: net, optimizers and metrics are built in `compile_two_rates`.

        Keras's version all-reduces a data batch to trace a symbolic step, which fails on
        MultiWorkerMirroredStrategy's PerReplica batches (Keras 3.15); skipping it is safe here.
        """

    @property
    def metrics(self):
        return [*self.means.values(), self.accuracy, self.kappa_scores, self.kappa_probs]

    def _loss(self, images, grades, training: bool):
        outputs = self.net(images, training=training)
        reg = regularized_variables(self.net)
        return outputs, objective_loss(self.loss_mode, grades, outputs, reg, self.weight_decay)

    def _track(self, grades, outputs, parts) -> dict:
        for key, mean in self.means.items():
            mean.update_state(parts[key])
        self.accuracy.update_state(grades, outputs["logits"])
        logs = {k: m.result() for k, m in self.means.items()}
        return {**logs, "accuracy": self.accuracy.result()}

    def train_step(self, batch):
        images, meta = batch
        grades = meta["grade"]
        old, new = self.groups()
        if self.augment is not None:
            images = self._augment(images, (self.optimizer_new if new else self.optimizer))
        with tf.GradientTape() as tape:
            outputs, parts = self._loss(images, grades, training=True)
            # Gradients are summed over replicas, so each replica's loss is divided by their number.
            loss = parts["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
            if self._mixed:
                scale = tf.minimum(self.optimizer.dynamic_scale, self.optimizer_new.dynamic_scale)
                loss = loss * scale
        # Once, for both groups. A single-task loss leaves the other head's bias unconnected:
        # a zero gradient keeps it still under every optimizer and loss scaling.
        grads = tape.gradient(loss, old + new)
        grads = [
            tf.zeros_like(v) if g is None else g for v, g in zip(old + new, grads, strict=True)
        ]
        g_old, g_new = grads[: len(old)], grads[len(old) :]
        if self._mixed:
            g_old = [g * (self.optimizer.dynamic_scale / scale) for g in g_old]
            g_new = [g * (self.optimizer_new.dynamic_scale / scale) for g in g_new]
        if old:
            self.optimizer.apply(g_old, old)
        if new:
            self.optimizer_new.apply(g_new, new)
        return self._logs(self._track(grades, outputs, parts))

    def _augment(self, images, optimizer):
        """Stateless per (seed, step, replica): reproducible, and it resumes with the optimizer."""
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seeds = tf.stack(
            [
                tf.cast(self.seed, tf.int64) + 7919 * tf.cast(replica, tf.int64),
                tf.cast(optimizer.iterations, tf.int64),
            ]
        )
        return augmentation.augment_scaled(images, seeds, self.augment)

    def test_step(self, batch):
        images, meta = batch
        grades = meta["grade"]
        outputs, parts = self._loss(images, grades, training=False)
        self.kappa_scores.update_state(grades, outputs["score"])
        self.kappa_probs.update_state(grades, outputs["logits"])
        logs = self._track(grades, outputs, parts)
        logs["kappa_scores"] = self.kappa_scores.result()
        logs["kappa_probs"] = self.kappa_probs.result()
        return self._logs(logs)

    def _logs(self, logs: dict) -> dict:
        """Keras 3.15 reduces each log over workers with `reduce(MEAN, axis=0)`, which needs a
        batch axis: give scalars one under MultiWorkerMirroredStrategy only."""
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs
