"""Small utilities shared by `data_prep` and the library, free of TensorFlow: atomic writes,
the versions recorded with every artefact, and the names every part agrees on."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m2cnn_tf.errors import UsageError

# §III-A: Kaggle's train set trains, its Public part validates, its Private part tests.
SPLITS: tuple[str, ...] = ("train", "val", "test")

# What a folder of photographs may hold (data_prep.folder, predict.py, serve.py).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")

_PACKAGES = ("tensorflow", "keras", "numpy", "opencv-python-headless", "pillow")

# Measured here (2 cores, tiny preset, 224 px, batch 16, 12 steps over 3 epochs): with TF's op
# determinism on, one CPU run in four still ended with other weights, with oneDNN's kernels or
# without, and also with one intra-op thread; with ops run one at a time (one inter-op thread,
# each op still using every core), every run was bit-for-bit the same. When two ops run at
# once, a kernel finds the thread pool busy and splits its sums differently. TensorFlow reads
# this variable when it starts, so it is set before the first import.
INTER_OP_THREADS = "TF_NUM_INTEROP_THREADS"


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """A block that loads what lives as long as the process (TensorFlow, Keras, a served
    model), without the cyclic collector, then frozen (`freeze_imports`).

    Importing TensorFlow and Keras creates ~400,000 objects; as they pile up, the collector's
    thresholds trigger full collections that scan them all, again and again, and find almost
    nothing to free: without them the import takes 0.77x the CPU (benchmarks/README.md,
    "Process costs"). The collector is back on when the block ends, however it ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        freeze_imports()
    finally:
        if enabled:
            gc.enable()


def freeze_imports() -> None:
    """Take the objects alive now out of the cyclic collector's sight, once per process.

    Called at the end of `importing`, once a command has imported its modules (predict.py and
    serve.py: and loaded their model): TensorFlow's and Keras's ~400,000 import-time objects
    live as long as the process, yet every full collection scans them (Keras's `clear_session`
    runs one), and so does the last one at exit. Measured here (2 cores): `import keras` then
    exit took 1.3 s less, and reproduce.py's 29 `clear_session` calls 12 s instead of 21. What
    the command makes later is still collected. Nothing is collected first: the imports leave
    4,129 unreachable objects among 666,839, and building the paper preset's model 4,511 more;
    they stay, where collecting them took 0.35 s per process (Python's documentation gives the
    same recipe, the collector off early and `gc.freeze()` later, for a process about to
    fork). Once per process (nothing frozen yet), so that a command called from other code
    (the tests, a notebook) freezes that code's objects at most once."""
    if gc.get_freeze_count():
        return
    gc.freeze()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part:
    a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Indented, key-sorted JSON, so that the same object always gives the same bytes."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_determinism() -> None:
    """What a deterministic run needs from TensorFlow's runtime: one op at a time. Set in the
    environment before TensorFlow loads (train.py and reproduce.py call this first), or through
    TensorFlow's API while it has not started; once it has, a UsageError (a fresh process is
    needed)."""
    if os.environ.get(INTER_OP_THREADS) == "1":
        return  # set by this process's launcher, or by an earlier call
    os.environ[INTER_OP_THREADS] = "1"
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        os.environ.pop(INTER_OP_THREADS)
        raise UsageError(
            "a deterministic run needs TensorFlow started with one inter-op thread, and it has "
            "already started in this process: run it in a fresh process (train.py and "
            "reproduce.py do)",
            setting="deterministic",
        ) from None


def versions() -> dict[str, str]:
    """The versions that decide a result, read from package metadata (no import needed)."""
    from m2cnn_tf import __version__

    found = {"m2cnn_tf": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def finite_or_none(value: Any) -> float | None:
    """A number as a float, or None for a missing, non-numeric, NaN or infinite value (JSON
    has no NaN, and a report shows "–" for it)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
