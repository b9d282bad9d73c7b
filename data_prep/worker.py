"""What a conversion worker process runs: one image in, encoded sizes (or a skip reason) out.

Kept free of TensorFlow and pandas so worker processes start in a fraction of a second and
hold little memory; the parent alone serializes Examples and writes TFRecords.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
from typing import Any

import cv2

from m2cnn_tf.errors import UsageError, one_line
from m2cnn_tf.preprocessing import (
    FORMATS,
    BadImage,
    PreprocessParams,
    encode,
    preprocess_bgr_file,
    preprocess_bgr_file_kept,
    resize_to,
)

# The splits a kappa is reported on (§III-A, Table II/III): an image that decodes is never
# dropped from them, or the kappa would not be comparable with the paper's or the leaderboard's.
KEEP_SPLITS = ("val", "test")


def default_workers() -> int:
    """The cores this process may use: one worker process per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _setting(default: Any = dataclasses.MISSING, **metadata: Any) -> Any:
    """A field whose metadata (`help`, and `flag` when the flag is not the field's name) makes
    its command-line flag (data_prep.options)."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a conversion runs: output sizes, Eq. (1) (`params`), encoding, sharding, execution."""

    # §II-A: the three input sizes of M²CNN's cells.
    sizes: tuple[int, ...] = _setting((224, 448, 720), help="output sizes, comma separated")
    params: PreprocessParams = dataclasses.field(default_factory=PreprocessParams)
    image_format: str = _setting(
        "jpeg", flag="format", choices=FORMATS, help="how images are stored; PNG is lossless"
    )
    jpeg_quality: int = _setting(95, help="JPEG quality, 1–100")
    seed: int = _setting(0, help="split and record order")
    # Target shard size: tf.data reads 100–200 MB files efficiently (ours).
    shard_mb: float = _setting(150.0, help="target shard size in MB")
    chunk_max: int = 64  # images per chunk: the most work a kill can lose per chunk
    workers: int = _setting(default_workers, help="worker processes; the default is one per core")
    strict: bool = _setting(False, help="any bad input fails the conversion; nothing written")
    progress: bool = _setting(True, flag="no-progress", help="no progress bar")

    def __post_init__(self) -> None:
        sizes = tuple(sorted({int(s) for s in self.sizes}))
        object.__setattr__(self, "sizes", sizes)  # one order, whatever the caller's
        if not sizes or sizes[0] < 8:
            raise UsageError(f"must be at least 8 pixels, got {sizes}", setting="sizes")
        if sizes[-1] > self.params.base_size:
            raise UsageError(
                f"{self.params.base_size} is below the largest size {sizes[-1]}; every size is "
                "resized from the base image",
                setting="base_size",
            )
        if self.image_format not in FORMATS:
            raise UsageError(f"must be one of {', '.join(FORMATS)}", setting="image_format")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"must be 1–100, got {self.jpeg_quality}", setting="jpeg_quality")
        if self.workers < 1:
            raise UsageError(f"must be at least 1, got {self.workers}", setting="workers")
        if self.shard_mb <= 0:
            raise UsageError(f"must be positive, got {self.shard_mb}", setting="shard_mb")
        if self.chunk_max < 1:
            raise UsageError(f"must be at least 1, got {self.chunk_max}", setting="chunk_max")

    def output_key(self) -> dict[str, Any]:
        """Everything that changes the bytes written (not workers, strictness or progress)."""
        return {
            "sizes": list(self.sizes),
            "preprocess": self.params.to_dict(),
            "format": self.image_format,
            "jpeg_quality": self.jpeg_quality if self.image_format == "jpeg" else None,
            "seed": self.seed,
            "shard_mb": self.shard_mb,
            "chunk_max": self.chunk_max,
        }


_settings: Settings | None = None


def init_worker(settings: Settings, in_process: bool = False) -> None:
    global _settings
    _settings = settings
    if in_process:
        return
    cv2.setNumThreads(1)  # one process per core already
    with contextlib.suppress(OSError, AttributeError):
        # Die with the parent: after kill -9 of a conversion no orphan keeps working.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


def _error_reason(e: Exception) -> str:
    return f"error: {type(e).__name__}" + (f": {one_line(e)}" if str(e).strip() else "")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One image at every size, and why it is kept although imperfect ("" when it is sound)."""

    images: dict[int, bytes]
    flag: str = ""


def encode_item(path: str, keep: bool) -> Encoded | str:
    """One image → its encoded sizes, every size resized from the one base image; or the reason
    it is skipped. With `keep` (val and test) a partly decodable image is kept and flagged
    (`preprocessing.preprocess_bgr_file_kept`); only one with no pixels at all is skipped."""
    assert _settings is not None, "init_worker first"
    s = _settings
    try:
        if keep:
            base, flag = preprocess_bgr_file_kept(path, s.params)
        else:
            base, flag = preprocess_bgr_file(path, s.params), ""
        sizes = {
            size: encode(resize_to(base, size), s.image_format, s.jpeg_quality) for size in s.sizes
        }
        return Encoded(sizes, flag)
    except BadImage as e:
        return e.reason
    except Exception as e:  # one odd file must not end an hours-long run; it is reported
        return _error_reason(e)


def encode_image(path: str) -> dict[int, bytes] | str:
    """One sound image → {size: encoded bytes}, or the reason it is skipped (the train split's
    rule, and the plan's pilot images)."""
    result = encode_item(path, keep=False)
    return result.images if isinstance(result, Encoded) else result


def check_image(path: str) -> str | None:
    """The strict mode's validation pass: the reason this image would be skipped, or None."""
    assert _settings is not None, "init_worker first"
    try:
        preprocess_bgr_file(path, _settings.params)
    except BadImage as e:
        return e.reason
    except Exception as e:
        return _error_reason(e)
    return None
