"""What happens around each batch and epoch of `fit`: backups, Ctrl-C, the NaN stop, the best
checkpoint and the epoch log. `training.make_callbacks` puts them in the order that matters."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any

import keras

from m2cnn_tf import checkpoints
from m2cnn_tf.config import OBJECTIVES
from m2cnn_tf.train_step import TrainingError


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
    handler only records the request; the next batch raises it from the fit loop, and
    `training.fit` saves the state. A second Ctrl-C stops at once.
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
            meta = {
                **self.meta,
                "epoch": epoch + 1,
                "best_metric": self.metric,
                "val_kappa_scores": float(logs.get("val_kappa_scores", float("nan"))),
                "val_kappa_probs": float(logs.get("val_kappa_probs", float("nan"))),
                "val_loss": float(logs.get("val_loss", float("nan"))),
            }
            checkpoints.save_best(self.net, self.directory, meta)
            self.log(
                f"\nepoch {epoch + 1}: val kappa ({metric_label(self.metric)}) {value:.4f}, "
                f"new best -> {self.directory / checkpoints.BEST_MODEL}"
            )


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
