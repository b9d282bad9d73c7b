"""What happens around each batch and epoch of `fit`: backups, Ctrl-C, the NaN stop, the best
checkpoint and the epoch log. `training.make_callbacks` puts them in the order that matters."""

from __future__ import annotations

import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import keras

from m2cnn_tf import checkpoints
from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.config import OBJECTIVES
from m2cnn_tf.train_step import TrainingError


class Backup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, knowing the epoch it is in and the steps done.

    Keras only counts epochs as they end, so a step-level (or Ctrl-C) backup taken in the first
    epoch after a resume would record epoch 0 and restart the schedule. Keras also resumes a
    backup taken inside an epoch at that epoch's start, which would train its first steps
    twice; here training_metadata.json also records `steps`, the train steps done, so that
    `training.fit` resumes at that exact step. Counted from the batches the fit ran (not from
    an optimizer's counter, which a skipped mixed-precision step does not advance).
    """

    def __init__(self, backup_dir: str, first_step: int = 0, first_epoch: int = 0, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.steps = first_step
        # The epoch a backup records before this fit's first on_epoch_begin: a Ctrl-C raised
        # there (DeferInterrupt runs first) would otherwise record Keras's initial 0, and the
        # resumed run would train its epochs again from the first.
        self._current_epoch = first_epoch
        self.restored = False  # whether the model holds the backup's state (or a fresh start)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.restored = True

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        """Every epoch ends with a backup that says so, also with step-level backups (whose
        last one says "inside the epoch"), so that a resumed run starts the next epoch."""
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self._save_model()

    def _save_model(self):
        super()._save_model()
        path = Path(self._training_metadata_path)
        atomic_write_json(path, {**json.loads(path.read_text()), "steps": self.steps})


class DeferInterrupt(keras.callbacks.Callback):
    """Ctrl-C takes effect at the next batch boundary, where nothing can swallow it.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside TF's
    tracing or a callback whose exceptions are ignored it can be lost, so the run went on. The
    handler only records the request; the next batch raises it from the fit loop, and
    `training.fit` saves the state. A second Ctrl-C stops at once. `training.fit` installs the
    handler before Keras's fit: fit builds its callbacks first (TensorBoard writes its first
    file then), and a Ctrl-C there must wait until the backup has restored the state too.
    """

    def __init__(self):
        super().__init__()
        self.pending = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def install(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        if main and self._previous is None:  # once, over the fits of one run
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _raise_if_pending(self, *args, **kwargs):
        if self.pending:
            self.restore()
            raise KeyboardInterrupt

    # Before the next train batch or epoch, not after this one: every callback has then seen
    # the batch done (the backup counts it), and an epoch's validation and end (its best
    # checkpoint, its backup) are never cut short, so the state saved is exactly the steps
    # trained and a resumed run does what an uninterrupted one would.
    on_train_batch_begin = on_epoch_begin = _raise_if_pending


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first NaN/inf loss, naming the step; runs before any backup is written."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.offset = 0  # steps of this epoch done before this fit (a resumed epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = self.epoch * self.steps_per_epoch + self.offset + batch + 1
            raise TrainingError(
                f"loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, batch "
                f"{batch + 1}); the last backup is kept. Lower the learning rates or check the data"
            )


def best_metric(loss: str) -> str:
    """The val kappa a run of objective `loss` is judged by (`config.OBJECTIVES`)."""
    return OBJECTIVES[loss].judged_by


def metric_label(metric: str) -> str:
    """How the log and the final line name the kappa a run is judged by."""
    return "prob." if metric == "val_kappa_probs" else "scores"


class KeepBest(keras.callbacks.Callback):
    """Keep the functional model with the best val kappa by `metric` (see `best_metric`).

    Only validated epochs compete: with a validation frequency above 1, an epoch without
    validation logs has no kappa and is skipped. A validated epoch whose kappa is undefined
    (NaN) ranks below every number, so the first validated epoch always leaves a checkpoint.
    """

    def __init__(
        self,
        net: keras.Model,
        directory: Path,
        meta: dict[str, Any],
        best: float | None,
        write: bool,
        log=print,
        metric: str = "val_kappa_scores",
    ):
        super().__init__()
        self.net, self.directory, self.meta, self.best = net, directory, meta, best
        self.write, self.log, self.metric = write, log, metric
        self.saved_epoch: int | None = None  # the 0-based epoch best.keras holds, if written now

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.metric not in logs:
            return
        value = float(logs[self.metric])
        comparable = value if math.isfinite(value) else -math.inf
        if self.best is not None and comparable <= self.best:
            return
        self.best = comparable
        if self.write:
            meta = epoch_meta(self.meta, epoch, logs, self.metric)
            checkpoints.save_checkpoint(self.net, self.directory, meta, "best")
            self.saved_epoch = epoch
            self.log(
                f"\nepoch {epoch + 1}: val kappa ({metric_label(self.metric)}) {value:.4f}, "
                f"new best -> {self.directory / checkpoints.BEST_MODEL}"
            )


def epoch_meta(meta: dict[str, Any], epoch: int, logs: dict, metric: str) -> dict[str, Any]:
    """best.json / last.json: the run's facts, the epoch (1-based) and its val figures."""
    return {
        **meta,
        "epoch": epoch + 1,
        "best_metric": metric,
        "val_kappa_scores": float(logs.get("val_kappa_scores", float("nan"))),
        "val_kappa_probs": float(logs.get("val_kappa_probs", float("nan"))),
        "val_loss": float(logs.get("val_loss", float("nan"))),
    }


class KeepLast(keras.callbacks.Callback):
    """Keep the functional model after the run's final step (last.keras, last.json).

    The paper's runs are given by their step counts (Fig. 4: 448* is 224@20k + 12k steps), so
    the model a run of N steps stands for is its last, not the one selected on val. Written at
    the end of the final epoch (which always validates), so an interrupted run writes it when it
    resumes and finishes. When `keep_best` (which runs first) has just saved the same epoch, its
    file is copied: the same weights, without serialising the model a second time.
    """

    def __init__(self, net: keras.Model, directory: Path, meta: dict[str, Any], epochs: int,
                 write: bool, metric: str = "val_kappa_scores",
                 keep_best: KeepBest | None = None):  # fmt: skip
        super().__init__()
        self.net, self.directory, self.meta, self.epochs = net, directory, meta, epochs
        self.write, self.metric, self.keep_best = write, metric, keep_best

    def on_epoch_end(self, epoch, logs=None):
        if self.write and epoch + 1 == self.epochs:
            meta = epoch_meta(self.meta, epoch, logs or {}, self.metric)
            if self.keep_best is not None and self.keep_best.saved_epoch == epoch:
                checkpoints.copy_checkpoint(self.directory, "best", "last", meta)
            else:
                checkpoints.save_checkpoint(self.net, self.directory, meta, "last")


class EpochsCsv(keras.callbacks.CSVLogger):
    """Keras's CSVLogger with every column from the first row on.

    Keras takes the columns from the first epoch's logs, so a first epoch without validation
    (validation frequency above 1, or after a resume) would drop the val columns from the whole
    file. Here they are fixed up front: an epoch without validation gets NA in them, and a
    resumed run appends rows with the same columns as the header it finds.
    """

    def __init__(self, filename: str, metric_names: list[str], append: bool):
        super().__init__(filename, append=append)
        self.val_keys = {f"val_{name}" for name in metric_names}

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None:
            self.keys = sorted(set(logs or {}) | self.val_keys)
        super().on_epoch_end(epoch, logs)


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard with every epoch's scalars written.

    With an integer `update_freq` Keras leaves `tf.summary.record_if` set by the epoch's last
    batch, so the epoch scalars (loss, Eq. (4)'s terms, the val kappas) were only written when
    that batch's number was a multiple of it (tensorflow/tensorboard#4975): with 12 steps per
    epoch and `log_steps` 50, one epoch in 25. Batch-level scalars keep their interval.
    """

    def _log_epoch_metrics(self, epoch, logs):
        with self.summary.record_if(True):
            super()._log_epoch_metrics(epoch, logs)
