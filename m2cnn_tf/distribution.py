"""How a run is spread over devices and machines: which devices TensorFlow sees and a run will
use, the tf.distribute strategy, which process writes the shared outputs, and how the input is
split between workers."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import tensorflow as tf

from m2cnn_tf.config import STRATEGIES, unknown_choice
from m2cnn_tf.errors import RunFailed, UsageError, one_line


def gpu_names() -> list[str]:
    """The GPUs TensorFlow sees, by name ("GPU" when the driver gives none).

    Lists physical devices only, which leaves the TF context uninitialised: it may run before
    `make_strategy`, and before logical devices are configured.
    """
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except (ValueError, tf.errors.OpError):
            details = {}
        names.append(details.get("device_name") or "GPU")
    return names


def device_line(gpus: Sequence[str], strategy: str, mixed_precision: bool) -> str:
    """`devices: 2 × GPU (NVIDIA H100 80GB HBM3), mixed precision on`, or `devices: CPU only
    (no GPU visible to TensorFlow)`: what a run with `strategy` computes on, given the GPUs seen.

    The default strategy computes on the first GPU only; mirrored and multiworker on every local
    one. GPUs seen but unused are named, so a forgotten strategy shows.
    """
    if not gpus:
        return "devices: CPU only (no GPU visible to TensorFlow)"
    used = list(gpus) if strategy in ("mirrored", "multiworker") else list(gpus[:1])
    kinds = collections.Counter(used)
    if len(kinds) == 1:
        what = f"{len(used)} × GPU ({used[0]})"
    else:
        what = f"{len(used)} × GPU (" + ", ".join(f"{n} × {k}" for k, n in kinds.items()) + ")"
    line = f"devices: {what}, mixed precision {'on' if mixed_precision else 'off'}"
    if len(used) < len(gpus):
        line += f"; {len(gpus)} GPUs visible, the mirrored strategy would use all"
    return line


def mixed_precision_warning(gpus: Sequence[str], mixed_precision: bool) -> str | None:
    """The one-line warning for mixed precision without a GPU, or None."""
    if mixed_precision and not gpus:
        return (
            "warning: mixed precision without a GPU: the CPU has no fast float16 arithmetic, so "
            "the run is slower than in float32; mixed precision is meant for GPUs"
        )
    return None


def describe_devices(strategy: str = "default", mixed_precision: bool = False) -> list[str]:
    """What train.py prints before anything else: the device line, then any warning."""
    gpus = gpu_names()
    warning = mixed_precision_warning(gpus, mixed_precision)
    return [device_line(gpus, strategy, mixed_precision)] + ([warning] if warning else [])


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: one device; mirrored: all local GPUs; multiworker: the cluster in TF_CONFIG.

    Must be the process's first TF work: MultiWorkerMirroredStrategy configures collective ops
    before anything initialises the TF context.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UsageError(
                "the multiworker strategy needs the TF_CONFIG environment variable",
                setting="strategy",
            )
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.OpError as err:  # e.g. this worker's port is taken
            raise RunFailed(f"cannot join the cluster in TF_CONFIG: {one_line(err)}") from None
    raise unknown_choice("strategy", name, STRATEGIES)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The process that writes checkpoints and logs: the chief, or worker 0 without one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def worker_name(strategy: tf.distribute.Strategy) -> str:
    """ "" for the chief, "workerN" for the others (each keeps its own backup)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if is_chief(strategy) or resolver is None:
        return ""
    return f"worker{resolver.task_id}"


def for_replicas(ds: tf.data.Dataset, strategy: tf.distribute.Strategy) -> tf.data.Dataset:
    """Shard by record under more than one replica: few shards for many workers still work."""
    if strategy.num_replicas_in_sync == 1 and not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
