"""How a run is spread over devices and machines: the tf.distribute strategy, which process
writes the shared outputs, and how the input is split between workers."""

from __future__ import annotations

import os

import tensorflow as tf

from m2cnn_tf.config import STRATEGIES, unknown_choice
from m2cnn_tf.errors import RunFailed, UsageError


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
            raise RunFailed(
                f"cannot join the cluster in TF_CONFIG: {err.message.strip().splitlines()[0]}"
            ) from None
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
