"""What a conversion worker process runs: one image in, encoded sizes (or a skip reason) out.

Kept free of TensorFlow and pandas so worker processes start in a fraction of a second and
hold little memory; the parent alone serializes Examples and writes TFRecords.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import signal
from typing import Any

import cv2

from m2cnn_tf.preprocessing import BadImage, PreprocessParams, preprocess_bgr_file, resize_to

SPLITS = ("train", "val", "test")  # == m2cnn_tf.records.SPLITS (a test checks), without TF


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    params: PreprocessParams
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    seed: int = 0
    shard_mb: float = 150.0  # target shard size: the issue asks for about 100–200 MB
    chunk_max: int = 64  # images per chunk: the most work a kill can lose per chunk
    workers: int = 1
    strict: bool = False
    progress: bool = True

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
    text = str(e).splitlines()[0] if str(e) else ""
    return f"error: {type(e).__name__}: {text}".rstrip(": ")


def encode_image(path: str) -> dict[int, bytes] | str:
    """One image → {size: encoded bytes}, every size resized from the one base image."""
    assert _settings is not None, "init_worker first"
    s = _settings
    try:
        base = preprocess_bgr_file(path, s.params)
        out = {}
        for size in s.sizes:
            img = resize_to(base, size)
            if s.image_format == "jpeg":
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
            else:
                ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
            if not ok:
                return f"could not encode {s.image_format.upper()}"
            out[size] = buf.tobytes()
        return out
    except BadImage as e:
        return e.reason
    except Exception as e:  # one odd file must not end an hours-long run; it is reported
        return _error_reason(e)


def check_image(path: str) -> str | None:
    """--strict's validation pass: the reason this image would be skipped, or None."""
    assert _settings is not None, "init_worker first"
    try:
        preprocess_bgr_file(path, _settings.params)
    except BadImage as e:
        return e.reason
    except Exception as e:
        return _error_reason(e)
    return None
