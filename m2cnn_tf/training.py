"""Staged two-learning-rate training (§II-C, §III-A "Parameter Initialization", "Hyper-parameters").

One `run(config)` per stage: stage 1 (224 px) starts the BaseNet from ImageNet, stage N>1 copies
every layer of stage N−1's best model that matches by name and shape. The copied (or ImageNet)
layers train at LR1, the rest at LR2 (`train_step.TwoRateTrainer`).

`run` is a sequence of named steps: `prepare_stage` (the stage folder and the resume point),
`make_datasets`, `make_trainer` (with `initialise`), `make_callbacks` and `fit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from m2cnn_tf import checkpoints, data, distribution
from m2cnn_tf.callbacks import (
    Backup,
    DeferInterrupt,
    EpochsCsv,
    KeepBest,
    KeepLast,
    StopOnNonFinite,
    TensorBoard,
    best_metric,
)
from m2cnn_tf.common import prepare_determinism, versions
from m2cnn_tf.config import Config, OptimConfig, RuntimeConfig, check_config
from m2cnn_tf.errors import Interrupted
from m2cnn_tf.model import (
    build_from_settings,
    copy_weights_by_name,
    load_backbone_weights,
    sync_bn_enabled,
)
from m2cnn_tf.train_step import TrainingError, TwoRateTrainer, make_optimizer

BACKUP = "backup"


@dataclasses.dataclass(frozen=True)
class Stage:
    """Where this process writes a stage's results, and where a backup resumes it: the epoch
    (0-based) and the train steps done (None: at that epoch's start)."""

    directory: Path  # DIR/stageN
    backup_dir: Path  # DIR/stageN/backup, or backup/workerN for a non-chief worker
    chief: bool  # writes the checkpoint, config.json and the logs
    start_epoch: int
    start_step: int | None = None

    @property
    def resumed(self) -> bool:
        return self.start_epoch > 0 or bool(self.start_step)


@dataclasses.dataclass(frozen=True)
class Datasets:
    train: tf.data.Dataset  # the train stream, after the steps done before (`first_step`)
    train_from: Callable[[int], tf.data.Dataset]  # the same after N steps done
    val: tf.data.Dataset
    steps: int  # train steps per epoch
    val_steps: int
    first_step: int  # the steps the run has done when it starts (a resumed run's)


@dataclasses.dataclass(frozen=True)
class Callbacks:
    ordered: list[keras.callbacks.Callback]  # as fit runs them (see make_callbacks)
    keep_best: KeepBest
    backup: Backup
    interrupt: DeferInterrupt
    non_finite: StopOnNonFinite

    def continue_after_first_fit(self) -> None:
        """Between the fit that finishes an interrupted epoch and the next: the epoch log
        appends, and step numbers count whole epochs again."""
        self.non_finite.offset = 0
        for callback in self.ordered:
            if isinstance(callback, EpochsCsv):
                callback.append = True


def run(config: Config, log=print) -> dict[str, Any]:
    """Train one stage as `config` says; returns the final epoch's logs, the best value, the
    stage folder, the wall time in seconds and `interrupted`: a Ctrl-C that came during the
    last step, after which nothing was left to stop (the stage is complete), for the caller to
    honour once it has recorded that."""
    started = time.monotonic()
    check_config(config)
    config = _without_xla_augment(config, log)
    config = _seeded_if_deterministic(config, log)
    if config.runtime.deterministic:
        prepare_determinism()  # a UsageError if TensorFlow started without it
    if config.stage > 1 and not config.model.init:  # fail before any work if the start is missing
        checkpoints.checkpoint_path(config.model_dir, config.stage - 1)
    strategy = distribution.make_strategy(config.runtime.strategy)  # the first TF work
    _set_runtime(config.runtime)
    stage = prepare_stage(config, strategy)
    datasets = make_datasets(config, strategy, stage)
    trainer, origin = make_trainer(config, strategy, log)
    old, new = trainer.groups()
    replicas = strategy.num_replicas_in_sync
    sync = ", synchronised BatchNorm" if sync_bn_enabled(config.model, replicas) else ""
    log(
        f"groups: {len(old)} trainable variables at LR1={config.optim.lr_pretrained:g}, "
        f"{len(new)} at LR2={config.optim.lr_new:g}; {datasets.steps} steps/epoch, "
        f"{replicas} replica(s){sync}"
    )
    callbacks = make_callbacks(config, trainer, stage, datasets, origin, log)
    history = fit(trainer, datasets, callbacks, config.optim, stage, log)
    return {
        "final": {k: float(v[-1]) for k, v in history.history.items() if v},
        "best_metric": callbacks.keep_best.metric,
        "best_val_kappa": callbacks.keep_best.best,
        "stage_dir": str(stage.directory),
        "seconds": time.monotonic() - started,
        "interrupted": callbacks.interrupt.pending,
    }


def _without_xla_augment(config: Config, log) -> Config:
    """ImageProjectiveTransformV3 has no XLA kernel, so it cannot sit in a jit-compiled step."""
    if config.runtime.xla and config.augment.enabled and config.augment.on == "step":
        log("xla: the projective transform cannot be XLA-compiled; augmenting in tf.data")
        return dataclasses.replace(
            config, augment=dataclasses.replace(config.augment, on="pipeline")
        )
    return config


def _seeded_if_deterministic(config: Config, log) -> Config:
    """A deterministic run needs a seed: 0 unless one was given (saved in config.json)."""
    if not config.runtime.deterministic or config.runtime.seed is not None:
        return config
    log("deterministic: seed 0 (none given)")
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, seed=0))


def _set_runtime(runtime: RuntimeConfig) -> None:
    """Seeds, op determinism and the dtype policy, before anything is built."""
    if runtime.seed is not None:
        keras.utils.set_random_seed(runtime.seed)  # Python, NumPy and TF
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    if runtime.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")


def prepare_stage(config: Config, strategy: tf.distribute.Strategy) -> Stage:
    """The stage folder (config.json written by the chief) and the epoch a backup resumes at."""
    directory = checkpoints.stage_dir(config.model_dir, config.stage)
    chief = distribution.is_chief(strategy)
    worker = distribution.worker_name(strategy)
    backup_dir = directory / BACKUP / worker if worker else directory / BACKUP
    if not config.runtime.resume and chief and (directory / BACKUP).exists():
        shutil.rmtree(directory / BACKUP)
    start_epoch, start_step = _backup_point(backup_dir) if config.runtime.resume else (0, None)
    if chief:
        directory.mkdir(parents=True, exist_ok=True)
        config.save(directory / checkpoints.CONFIG)
    return Stage(directory, backup_dir, chief, start_epoch, start_step)


def _backup_point(backup_dir: Path) -> tuple[int, int | None]:
    """(epoch, steps done) of the backup, ((0, None) without one); see `callbacks.Backup`."""
    meta = backup_dir / "training_metadata.json"
    if not meta.is_file():
        return 0, None
    values = json.loads(meta.read_text())
    steps = values.get("steps")
    return int(values.get("epoch", 0)), None if steps is None else int(steps)


def make_datasets(config: Config, strategy: tf.distribute.Strategy, stage: Stage) -> Datasets:
    """The train stream (after the steps a resumed run has done) and the val split, ready for
    `strategy`."""
    size, batch = config.resolved_image_size(), config.optim.batch_size
    n_train = data.split_size(config.data, size, "train")
    n_val = data.split_size(config.data, size, "val")
    steps = config.optim.steps_per_epoch or n_train // batch
    first = stage.start_step if stage.start_step is not None else stage.start_epoch * steps

    def only_grades(ds: tf.data.Dataset) -> tf.data.Dataset:
        # The step needs only the grade; string ids cannot be reduced across replicas.
        return distribution.for_replicas(ds, strategy).map(lambda x, m: (x, {"grade": m["grade"]}))

    def train_from(done: int) -> tf.data.Dataset:
        return only_grades(
            data.make_dataset(
                config.data, size, "train", batch_size=batch, training=True,
                seed=config.runtime.seed, settings=config.input, augment=config.augment,
                start_step=done, steps_per_epoch=steps,
            )
        )  # fmt: skip

    val = only_grades(data.make_dataset(config.data, size, "val", batch_size=batch, training=False))
    return Datasets(train_from(first), train_from, val, steps, math.ceil(n_val / batch), first)


def count_variables(net: keras.Model, layer_names: Sequence[str]) -> tuple[int, int]:
    """(variables in the named layers, variables elsewhere), counting every weight tensor."""
    named = set(layer_names)
    inside = sum(len(layer.weights) for layer in net.layers if layer.name in named)
    return inside, len(net.weights) - inside


def initialise(config: Config, log=print, replicas: int = 1) -> tuple[keras.Model, list[str], str]:
    """Build the stage's model for a strategy of `replicas` replicas and load what §III-A says
    it starts from.

    Returns (model, names of layers that arrived trained = the LR1 group, where they came from).
    """
    settings = config.model
    net = build_from_settings(config.resolved_image_size(), settings, replicas)
    if settings.init or config.stage > 1:
        path = settings.init or checkpoints.checkpoint_path(config.model_dir, config.stage - 1)
        source = checkpoints.load_model(path)
        loaded = copy_weights_by_name(source, net)
        origin = str(path)
        del source
    elif settings.weights and settings.weights != "none":
        loaded = load_backbone_weights(net, settings.weights, preset=settings.preset)
        imagenet = settings.weights == "imagenet"
        origin = f"ImageNet ({settings.weights})" if imagenet else settings.weights
    else:
        loaded, origin = [], "random initialisation (weights: none)"
    n_loaded, n_new = count_variables(net, loaded)
    log(
        f"init: {n_loaded} variables ({len(loaded)} layers) loaded from {origin}; "
        f"{n_new} variables new"
    )
    return net, loaded, origin


def make_trainer(
    config: Config, strategy: tf.distribute.Strategy, log=print
) -> tuple[TwoRateTrainer, str]:
    """The initialised model in a compiled two-rate trainer, under `strategy`; and its origin."""
    optim, runtime = config.optim, config.runtime
    seed = runtime.seed if runtime.seed is not None else random.SystemRandom().randrange(2**31)
    with strategy.scope():
        net, loaded, origin = initialise(config, log=log, replicas=strategy.num_replicas_in_sync)
        trainer = TwoRateTrainer(
            net, loaded, optim.weight_decay, augment=config.augment, seed=seed, loss=optim.loss
        )
        trainer.compile_two_rates(
            make_optimizer(optim.optimizer, optim.lr_pretrained),
            make_optimizer(optim.optimizer, optim.lr_new),
            mixed_precision=runtime.mixed_precision,
            jit_compile=runtime.xla,
        )
    return trainer, origin


def make_callbacks(
    config: Config,
    trainer: TwoRateTrainer,
    stage: Stage,
    datasets: Datasets,
    origin: str,
    log=print,
) -> Callbacks:
    """Order matters: the NaN check runs before anything is saved, and the epoch is logged and
    the best and the last model kept before the backup marks the epoch as done."""
    meta = {
        "stage": config.stage,
        "resolution": config.resolved_image_size(),
        "preset": config.model.preset,
        "multi_cell_path": config.resolved_multi_cell_path(),
        "multi_cell": config.model.multi_cell,
        "sync_bn": any(getattr(layer, "synchronized", False) for layer in trainer.net.layers),
        "loss": config.optim.loss,
        "init": origin,
        "flags": config.to_dict(),
        "versions": versions(),
    }
    metric = best_metric(config.optim.loss)
    best = _previous_best(stage.directory, metric) if stage.resumed else None
    keep_best = KeepBest(trainer.net, stage.directory, meta, best, stage.chief, log, metric)
    epochs = config.optim.epochs
    keep_last = KeepLast(trainer.net, stage.directory, meta, epochs, stage.chief, metric, keep_best)
    backup = Backup(
        str(stage.backup_dir),
        datasets.first_step,
        stage.start_epoch,
        save_freq=config.runtime.backup_steps or "epoch",
        double_checkpoint=True,
        delete_checkpoint=False,
    )
    interrupt = DeferInterrupt()
    non_finite = StopOnNonFinite(datasets.steps)
    ordered: list[keras.callbacks.Callback] = [interrupt, non_finite, keep_best, keep_last]
    if stage.chief:
        names = [m.name for m in trainer.metrics]
        ordered += [
            EpochsCsv(str(stage.directory / "epochs.csv"), names, append=stage.resumed),
            TensorBoard(str(stage.directory / "tensorboard"), update_freq=config.runtime.log_steps),
        ]
    ordered.append(backup)
    return Callbacks(ordered, keep_best, backup, interrupt, non_finite)


def _previous_best(directory: Path, metric: str) -> float | None:
    meta = directory / checkpoints.BEST_META
    if not meta.is_file():
        return None
    value = json.loads(meta.read_text()).get(metric)
    return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def validation_epochs(epochs: int, every: int) -> list[int]:
    """The 1-based epochs that validate: every `every`-th and always the last."""
    return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]


def fit(
    trainer: TwoRateTrainer,
    datasets: Datasets,
    callbacks: Callbacks,
    optim: OptimConfig,
    stage: Stage,
    log=print,
) -> keras.callbacks.History:
    """Keras's fit, from the backup on; Ctrl-C saves the state and ends as Interrupted.

    A backup taken inside an epoch (Ctrl-C, or `--backup-steps`) resumes at its exact step:
    first the rest of that epoch (a fit of the steps it lacks), then the remaining epochs, on
    the stream after the steps done, so that a resumed run trains the same batches, with the
    same augmentation, as an uninterrupted one (bit for bit with `--deterministic`).
    """
    common = {
        "validation_data": datasets.val,
        "callbacks": callbacks.ordered,
        "shuffle": False,
        "validation_steps": datasets.val_steps,
        "validation_freq": validation_epochs(optim.epochs, optim.validation_freq),
        "verbose": 1 if stage.chief else 2,
    }
    done = datasets.first_step - stage.start_epoch * datasets.steps
    callbacks.interrupt.install()
    try:
        if 0 < done < datasets.steps:  # finish the interrupted epoch first
            log(f"resuming epoch {stage.start_epoch + 1} after its step {done}: its "
                f"{datasets.steps - done} remaining steps first")  # fmt: skip
            callbacks.non_finite.offset = done
            history = trainer.fit(datasets.train, initial_epoch=stage.start_epoch,
                                  epochs=stage.start_epoch + 1,
                                  steps_per_epoch=datasets.steps - done, **common)  # fmt: skip
            if stage.start_epoch + 1 == optim.epochs:
                return history
            callbacks.continue_after_first_fit()
            first = stage.start_epoch + 1
            train = datasets.train_from(first * datasets.steps)
        else:
            first, train = stage.start_epoch, datasets.train
        return trainer.fit(train, initial_epoch=first, epochs=optim.epochs,
                           steps_per_epoch=datasets.steps, **common)  # fmt: skip
    except KeyboardInterrupt:
        # A second Ctrl-C can land before the backup has restored the model: its weights are
        # then not the run's, and the backup on disk already holds every step trained.
        saved = callbacks.backup.restored
        if saved:
            callbacks.backup._save_model()  # weights, optimizer state and the exact step, now
        where = f"state saved in {stage.backup_dir}" if saved else "before its first step"
        raise Interrupted(f"interrupted; {where}; rerun the same command to resume") from None
    except tf.errors.ResourceExhaustedError:
        batch = optim.batch_size
        raise TrainingError(
            f"out of memory at batch size {batch}; try a smaller one (e.g. {max(1, batch // 2)})",
            setting="batch_size",
        ) from None
    finally:
        callbacks.interrupt.restore()
