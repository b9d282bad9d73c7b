"""Staged two-learning-rate training (§II-C, §III-A "Parameter Initialization", "Hyper-parameters").

One `run(config)` per stage: stage 1 (224 px) starts the BaseNet from ImageNet, stage N>1 copies
every layer of stage N−1's best model that matches by name and shape. Copied (or ImageNet)
variables train at LR1 = 1e-4, the fresh ones at LR2 = 1e-3, by two optimizers in one custom
train step that computes the gradients once (this replaces tensorflow-addons' MultiOptimizer).

The trainer is a thin `keras.Model` around the plain functional M²CNN, so Keras's `fit` gives the
progress bar, callbacks and tf.distribute; only the functional model is ever saved as the best
checkpoint, so it loads anywhere in safe mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from m2cnn_tf import checkpoints, data
from m2cnn_tf.config import LOSSES, Config, get_preset, multi_cell_path
from m2cnn_tf.losses import multitask_loss, regularized_variables
from m2cnn_tf.metrics import QuadraticKappa
from m2cnn_tf.model import (
    build_m2cnn,
    copy_weights_by_name,
    load_backbone_weights,
    split_lr_groups,
)

OPTIMIZERS = ("adam", "sgd", "momentum", "rmsprop")
STRATEGIES = ("default", "mirrored", "multiworker")
BACKUP = "backup"


class TrainingError(RuntimeError):
    """Training had to stop; the message is one line saying why and what to do."""


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam by default: the paper names none; Adam is robust to the 10× LR gap between groups and
    is what fine-tuning recipes for IRv2 on Kaggle DR used. L_reg lives in the loss (Eq. (4)),
    so no optimizer applies decoupled weight decay."""
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":  # TF-slim's IRv2 ImageNet recipe
        return keras.optimizers.RMSprop(learning_rate, rho=0.9, momentum=0.9, epsilon=1.0)
    raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class TwoRateTrainer(keras.Model):
    """Wraps the functional M²CNN with §III-A's two-learning-rate train step.

    `self.optimizer` (from compile) updates the pretrained group at LR1, `self.optimizer_new`
    the new group at LR2. Under mixed precision both are LossScaleOptimizers and the loss is
    scaled once by the smaller of their scales; each group's gradients are then rescaled to
    its own optimizer's scale, so each unscales and skips non-finite steps on its own, and a
    group that overflows lowers the common scale for the next step.

    `loss` picks Table II's objective: "multitask" optimises Eq. (4), "ce" Eq. (2) + L_reg, "mse"
    Eq. (3) + L_reg. All parts are still logged, so the untrained head's loss stays visible.
    """

    def __init__(
        self,
        net: keras.Model,
        pretrained_layers: Sequence[str],
        weight_decay: float,
        augment: Config | None = None,
        seed: int = 0,
        loss: str = "multitask",
        **kwargs,
    ):
        super().__init__(name="trainer", **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_mode = loss
        self.net = net
        self.augment = augment  # augment on the accelerator (data.augment_scaled), or None
        self.seed = int(seed)
        self.weight_decay = float(weight_decay)
        self.pretrained_layers = tuple(pretrained_layers)
        self.optimizer_new = None
        self.loss_mean = keras.metrics.Mean(name="loss")
        self.ce_mean = keras.metrics.Mean(name="ce")
        self.mse_mean = keras.metrics.Mean(name="mse")
        self.reg_mean = keras.metrics.Mean(name="reg")
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

    def make_test_function(self, force=False):
        """--xla compiles the train step only: the kappa metric's bincount has no XLA kernel,
        and validation runs once an epoch."""
        jit, self._jit_compile = self._jit_compile, False
        try:
            return super().make_test_function(force)
        finally:
            self._jit_compile = jit

    @property
    def metrics(self):
        return [
            self.loss_mean,
            self.ce_mean,
            self.mse_mean,
            self.reg_mean,
            self.accuracy,
            self.kappa_scores,
            self.kappa_probs,
        ]

    def _loss(self, images, grades, training: bool):
        outputs = self.net(images, training=training)
        parts = multitask_loss(grades, outputs, regularized_variables(self.net), self.weight_decay)
        if self.loss_mode != "multitask":
            parts = {**parts, "loss": parts[self.loss_mode] + parts["reg"]}
        return outputs, parts

    def _track(self, grades, outputs, parts) -> dict:
        for tracker, key in (
            (self.loss_mean, "loss"),
            (self.ce_mean, "ce"),
            (self.mse_mean, "mse"),
            (self.reg_mean, "reg"),
        ):
            tracker.update_state(parts[key])
        self.accuracy.update_state(grades, outputs["logits"])
        return {
            "loss": self.loss_mean.result(),
            "ce": self.ce_mean.result(),
            "mse": self.mse_mean.result(),
            "reg": self.reg_mean.result(),
            "accuracy": self.accuracy.result(),
        }

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
        return data.augment_scaled(images, seeds, self.augment)

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


# ---------------------------------------------------------------------------------------------
# Initialisation and stage transfer


def count_variables(net: keras.Model, layer_names: Sequence[str]) -> tuple[int, int]:
    """(variables in the named layers, variables elsewhere), counting every weight tensor."""
    named = set(layer_names)
    inside = sum(len(layer.weights) for layer in net.layers if layer.name in named)
    return inside, len(net.weights) - inside


def initialise(config: Config, log=print) -> tuple[keras.Model, list[str], str]:
    """Build the stage's model and load what §III-A says it starts from.

    Returns (model, names of layers that arrived trained = the LR1 group, description).
    """
    size = config.resolved_image_size()
    extra = {} if config.bn_momentum is None else {"bn_momentum": config.bn_momentum}
    net = build_m2cnn(
        size,
        weights=None,
        preset=config.preset,
        num_classes=config.num_classes,
        multi_cell=config.multi_cell,
        **extra,
    )
    if config.init or config.stage > 1:
        path = config.init or checkpoints.best_model_path(config.model_dir, config.stage - 1)
        source = checkpoints.load_model(path)
        loaded = copy_weights_by_name(source, net)
        origin = f"{path}"
        del source
    elif config.weights and config.weights != "none":
        loaded = load_backbone_weights(net, config.weights, preset=config.preset)
        origin = f"ImageNet ({config.weights})" if config.weights == "imagenet" else config.weights
    else:
        loaded, origin = [], "random initialisation (--weights none)"
    n_loaded, n_new = count_variables(net, loaded)
    log(
        f"init: {n_loaded} variables ({len(loaded)} layers) loaded from {origin}; "
        f"{n_new} variables new"
    )
    return net, loaded, origin


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def versions() -> dict[str, str]:
    from m2cnn_tf import __version__

    return {
        "m2cnn_tf": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Callbacks


class Backup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, knowing the epoch it is in after a resume.

    Keras only counts epochs as they end, so a step-level (or Ctrl-C) backup taken in the first
    epoch after a resume would record epoch 0 and restart the schedule.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch


class DeferInterrupt(keras.callbacks.Callback):
    """Ctrl-C takes effect at the next batch boundary, where nothing can swallow it.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside TF's
    tracing or a callback whose exceptions are ignored it can be lost, so the run went on. The
    handler only records the request; the next batch raises it from the fit loop, and `run`
    saves the state. A second Ctrl-C stops at once.
    """

    def __init__(self):
        super().__init__()
        self.pending = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _raise_if_pending(self, *args, **kwargs):
        if self.pending:
            self.restore()
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_begin = _raise_if_pending


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first NaN/inf loss, naming the step; runs before any backup is written."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = self.epoch * self.steps_per_epoch + batch + 1
            raise TrainingError(
                f"loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, batch "
                f"{batch + 1}); the last backup is kept. Lower --lr-new/--lr-pretrained or check "
                "the data"
            )


def best_metric(loss: str) -> str:
    """The val kappa a run is judged by: from scores (Table II's preferred test), except for a
    CE-only run, whose regression head is never trained, so it is judged by its probabilities."""
    return "val_kappa_probs" if loss == "ce" else "val_kappa_scores"


class KeepBest(keras.callbacks.Callback):
    """Keep the functional model with the best val kappa by `metric` (see `best_metric`)."""

    def __init__(
        self,
        net: keras.Model,
        directory: Path,
        meta: dict[str, Any],
        best: float,
        write: bool,
        log=print,
        metric: str = "val_kappa_scores",
    ):
        super().__init__()
        self.net, self.directory, self.meta, self.best = net, directory, meta, best
        self.write, self.log, self.metric = write, log, metric

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = float(logs.get(self.metric, float("nan")))
        comparable = value if math.isfinite(value) else -math.inf
        if self.best is not None and comparable <= self.best:
            return
        self.best = comparable
        if self.write:
            meta = {
                **self.meta,
                "epoch": epoch + 1,
                "best_metric": self.metric,
                "val_kappa_scores": float(logs.get("val_kappa_scores", float("nan"))),
                "val_kappa_probs": float(logs.get("val_kappa_probs", float("nan"))),
                "val_loss": float(logs.get("val_loss", float("nan"))),
            }
            checkpoints.save_best(self.net, self.directory, meta)
            way = "prob." if self.metric == "val_kappa_probs" else "scores"
            self.log(
                f"\nepoch {epoch + 1}: val kappa ({way}) {value:.4f}, new best -> "
                f"{self.directory / checkpoints.BEST_MODEL}"
            )


# ---------------------------------------------------------------------------------------------
# The run


def _backup_epoch(backup_dir: Path) -> int:
    meta = backup_dir / "training_metadata.json"
    if meta.is_file():
        return int(json.loads(meta.read_text()).get("epoch", 0))
    return 0


def _previous_best(directory: Path, metric: str) -> float | None:
    meta = directory / checkpoints.BEST_META
    if not meta.is_file():
        return None
    value = json.loads(meta.read_text()).get(metric)
    return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def check_config(config: Config) -> None:
    """Reject a config that cannot run, before any work, with a one-line ValueError."""
    size = config.resolved_image_size()
    if size < 75:
        raise ValueError(
            f"--image-size must be at least 75 (Inception-ResNet-v2's stem), got {size}"
        )
    get_preset(config.preset)
    if config.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}"
        )
    if config.strategy not in STRATEGIES:
        raise ValueError(
            f"--strategy must be one of {', '.join(STRATEGIES)}, got {config.strategy!r}"
        )
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}"
            )
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be positive, got {config.steps_per_epoch}")
    for name in ("lr_pretrained", "lr_new"):
        if not getattr(config, name) > 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}"
            )
    if config.bn_momentum is not None and not 0 <= config.bn_momentum < 1:
        raise ValueError(f"--bn-momentum must be in [0, 1), got {config.bn_momentum}")
    if config.augment_on not in ("step", "pipeline"):
        raise ValueError(f"--augment-on must be step or pipeline, got {config.augment_on!r}")
    if config.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not config.data or not os.path.isdir(config.data):
        raise ValueError(f"--data {config.data!r} is not a directory (the OUT folder of data_prep)")
    if not config.model_dir:
        raise ValueError("--model-dir is required")


def run(config: Config, log=print) -> dict[str, Any]:
    """Train one stage as `config` says; returns the final epoch's logs and the best value."""
    check_config(config)
    size = config.resolved_image_size()
    if config.xla and config.augment and config.augment_on == "step":
        # ImageProjectiveTransformV3 has no XLA kernel, so it cannot sit in a jit-compiled step.
        log("--xla: the projective transform cannot be XLA-compiled; augmenting in tf.data")
        config = dataclasses.replace(config, augment_on="pipeline")
    if config.stage > 1 and not config.init:  # fail before any work when the start is missing
        checkpoints.best_model_path(config.model_dir, config.stage - 1)
    # First TF work of the process: MultiWorkerMirroredStrategy must configure collective ops
    # before anything initialises the TF context.
    strategy = make_strategy(config.strategy)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    chief = is_chief(strategy)
    directory = checkpoints.stage_dir(config.model_dir, config.stage)
    resolver = getattr(strategy, "cluster_resolver", None)
    worker = f"worker{resolver.task_id}" if not chief and resolver is not None else ""
    backup_dir = directory / BACKUP / worker if worker else directory / BACKUP
    if not config.resume and chief and (directory / BACKUP).exists():
        import shutil

        shutil.rmtree(directory / BACKUP)
    start_epoch = _backup_epoch(backup_dir) if config.resume else 0
    if chief:
        directory.mkdir(parents=True, exist_ok=True)
        config.save(directory / checkpoints.CONFIG)

    train_files = data.split_files(config.data, size, "train")
    n_train = data.count_records(train_files)
    val_steps = math.ceil(
        data.count_records(data.split_files(config.data, size, "val")) / config.batch_size
    )
    steps = config.steps_per_epoch or n_train // config.batch_size
    if config.batch_size > n_train:
        raise data.DataError(
            f"--batch-size {config.batch_size} is larger than the train split ({n_train} images)"
        )
    train_ds = data.make_dataset(
        config.data,
        size,
        "train",
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        config=config,
        start_epoch=start_epoch,
        steps_per_epoch=steps,
    )
    val_ds = data.make_dataset(
        config.data, size, "val", batch_size=config.batch_size, training=False, config=config
    )
    if strategy.num_replicas_in_sync > 1 or config.strategy == "multiworker":
        # Few shards for many workers: shard by record rather than fail.
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_ds, val_ds = train_ds.with_options(opts), val_ds.with_options(opts)
    # The step needs only the grade; string ids cannot be reduced across replicas.
    train_ds, val_ds = (
        ds.map(lambda x, m: (x, {"grade": m["grade"]})) for ds in (train_ds, val_ds)
    )

    with strategy.scope():
        net, loaded, origin = initialise(config, log=log)
        on_device = config.augment and config.augment_on == "step"
        trainer = TwoRateTrainer(
            net,
            loaded,
            config.weight_decay,
            augment=config if on_device else None,
            seed=config.seed if config.seed is not None else random.SystemRandom().randrange(2**31),
            loss=config.loss,
        )
        trainer.compile_two_rates(
            make_optimizer(config.optimizer, config.lr_pretrained),
            make_optimizer(config.optimizer, config.lr_new),
            mixed_precision=config.mixed_precision,
            jit_compile=config.xla,
        )
    old, new = trainer.groups()
    log(
        f"groups: {len(old)} trainable variables at LR1={config.lr_pretrained:g}, "
        f"{len(new)} at LR2={config.lr_new:g}; {steps} steps/epoch, "
        f"{strategy.num_replicas_in_sync} replica(s)"
    )

    meta = {
        "stage": config.stage,
        "resolution": size,
        "preset": config.preset,
        "multi_cell_path": run_path(config),
        "multi_cell": config.multi_cell,
        "loss": config.loss,
        "init": origin,
        "flags": config.to_dict(),
        "versions": versions(),
    }
    metric = best_metric(config.loss)
    best = _previous_best(directory, metric) if start_epoch > 0 else None
    backup = Backup(
        str(backup_dir),
        save_freq=config.backup_steps or "epoch",
        double_checkpoint=True,
        delete_checkpoint=False,
    )
    keep_best = KeepBest(net, directory, meta, best, write=chief, log=log, metric=metric)
    # Order matters: the NaN check runs before anything is saved, and the epoch is logged and
    # the best model kept before the backup marks the epoch as done.
    interrupt = DeferInterrupt()
    callbacks: list[keras.callbacks.Callback] = [interrupt, StopOnNonFinite(steps), keep_best]
    if chief:
        callbacks += [
            keras.callbacks.CSVLogger(str(directory / "epochs.csv"), append=start_epoch > 0),
            keras.callbacks.TensorBoard(
                str(directory / "tensorboard"), update_freq=max(1, config.log_steps)
            ),
        ]
    callbacks.append(backup)
    try:
        history = trainer.fit(
            train_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            steps_per_epoch=steps,
            callbacks=callbacks,
            shuffle=False,
            validation_steps=val_steps,
            verbose=1 if chief else 2,
        )
    except KeyboardInterrupt:
        backup._save_model()  # weights and optimizer state now; resume redoes this epoch
        raise TrainingError(
            f"interrupted; state saved in {backup_dir}; rerun the same command to resume"
        ) from None
    except tf.errors.ResourceExhaustedError:
        raise TrainingError(
            f"out of memory at --batch-size {config.batch_size}; try a smaller --batch-size "
            f"(e.g. {max(1, config.batch_size // 2)})"
        ) from None
    finally:
        interrupt.restore()
    final = {k: float(v[-1]) for k, v in history.history.items() if v}
    return {
        "final": final,
        "best_metric": metric,
        "best_val_kappa": keep_best.best,
        "stage_dir": str(directory),
    }


def run_path(config: Config) -> str:
    """§II-C's Multi-Cell path of the run's model: 'small' whenever the cells are switched off."""
    return multi_cell_path(config.resolved_image_size()) if config.multi_cell else "small"


def describe(config: Config) -> str:
    """The resolved configuration, printed at start."""
    values = config.to_dict()
    values["resolved_image_size"] = config.resolved_image_size()
    values["multi_cell_path"] = run_path(config)
    return json.dumps(values, indent=2, sort_keys=True)
