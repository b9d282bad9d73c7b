"""How a trained stage becomes a deployable file: a TF SavedModel, or a LiteRT (.tflite) model
in float32, float16, dynamic-range or int8 (selective by default), each with a JSON sidecar
that says what it is and where it came from (`checkpoints` reads and checks it).

The LiteRT model is converted by TF's own `TFLiteConverter.from_saved_model` from the very
SavedModel `export_saved_model` writes, so both formats serve the same signature: `image`
float32 (B, S, S, 3) scaled to [-1, 1] -> `logits`, `score`, `probabilities`.

Choices the paper leaves open (ours, §II-C trains on CPUs' opposite, GPUs):
- int8 is post-training quantisation with int8 weights and activations, selective by default
  (`quantization.selective_int8`: the layers whose int8 error the quantization debugger finds
  too large, and the heads, stay float; float32 input and output); `keep_float="none"` gives
  the full-integer model, int8 input and output included, every op on integer kernels. Its
  activation ranges are calibrated on `DEFAULT_CALIBRATION` preprocessed training records of
  the stage's own size, at least `MIN_CALIBRATION`; docs/quantization.md has the curve the
  default comes from.
- The sidecar sits beside a .tflite (`model_int8.json`) and inside a SavedModel folder.
TensorFlow is imported inside the functions that convert, so export.py's flags and request
checks answer before it loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from m2cnn_tf import checkpoints, manifest, quantization
from m2cnn_tf.checkpoints import FORMATS, QUANTIZATIONS, SIDECAR_SCHEMA, file_identity
from m2cnn_tf.common import atomic_write_bytes, atomic_write_json, versions
from m2cnn_tf.errors import UsageError, one_line
from m2cnn_tf.quantization import DEBUG_RECORDS, KEEP_FLOAT_CHOICES

# Twice the smallest count at which the selective int8 demo model stopped improving (32 of 16,
# 32, 64, 128, 200: docs/quantization.md); 200 took twice as long as 64 for the same grades.
DEFAULT_CALIBRATION = 64
MIN_CALIBRATION = 16
CALIBRATION_SPLIT = "train"

Log = Callable[[str], None]


class ExportError(UsageError):
    """The export cannot be made from what was given (exit 2); the message says why."""


# ---------------------------------------------------------------------------------------------
# Calibration data for int8


def calibration_records(data_dir: str | Path, size: int, count: int, log: Log) -> list[bytes]:
    """Up to `count` serialized train records at `size` px, a seeded sample across the shards.

    Fewer than `count` are used as they are, with a note; fewer than MIN_CALIBRATION, wrong-size
    data or no data are an ExportError that says which sizes and how many records there are.
    """
    import tensorflow as tf

    from m2cnn_tf import records

    files = _calibration_files(data_dir, size, count)
    raw = tf.data.TFRecordDataset(files).shuffle(4 * count, seed=0).take(count)
    chosen = [bytes(r) for r in raw.as_numpy_iterator()]
    if len(chosen) < MIN_CALIBRATION:
        raise ExportError(
            f"only {len(chosen)} {CALIBRATION_SPLIT} records at {size} px in {data_dir}; int8 "
            f"calibration needs at least {MIN_CALIBRATION}",
            setting="calibration",
        )
    spec = {k: records.FEATURES[k] for k in ("image/height", "image/width")}
    shapes = [tf.io.parse_single_example(r, spec) for r in chosen]
    wrong = [(int(s["image/height"]), int(s["image/width"])) for s in shapes]
    wrong = [hw for hw in wrong if hw != (size, size)]
    if wrong:
        raise ExportError(
            f"{len(wrong)} of {len(chosen)} calibration records in {data_dir}/{size} are "
            f"{wrong[0][0]}x{wrong[0][1]} px, not {size}x{size}: the data was converted at "
            "another size",
            setting="calibration",
        )
    fewer = f"all {len(chosen)}" if len(chosen) < count else str(count)
    log(f"calibrating on {fewer} {CALIBRATION_SPLIT} records at {size} px"
        + (f" ({count} wanted)" if len(chosen) < count else ""))  # fmt: skip
    return chosen


def _calibration_files(data_dir: str | Path, size: int, count: int) -> list[str]:
    from m2cnn_tf import records

    if not Path(data_dir).is_dir():
        raise ExportError(f"calibration data {data_dir} does not exist", setting="calibration")
    try:
        files = records.shard_paths(data_dir, size, CALIBRATION_SPLIT)
    except FileNotFoundError as err:
        raise ExportError(str(err), setting="calibration") from None
    if files:
        return files
    there = []
    for other in records.available_sizes(data_dir):
        shards = records.shard_paths(data_dir, other, CALIBRATION_SPLIT)
        n = _count(shards, cap=count)
        there.append(f"{other} px: {n}{'+' if n >= count else ''} {CALIBRATION_SPLIT} records")
    raise ExportError(
        f"calibration data {data_dir} has no {CALIBRATION_SPLIT} records at {size} px, the "
        f"model's size (it has {'; '.join(there) if there else 'no records at all'})",
        setting="calibration",
    )


def _count(files: list[str], cap: int) -> int:
    import tensorflow as tf

    if not files:
        return 0
    return int(tf.data.TFRecordDataset(files).take(cap).reduce(0, lambda n, _: n + 1))


def representative_images(chosen: list[bytes], log: Log = print) -> Callable[[], Iterator[list]]:
    """The converter's representative dataset: one scaled image (1, S, S, 3) per record, with
    a progress line every 50 (at 720 px the calibration of a paper model takes minutes)."""
    import tensorflow as tf

    from m2cnn_tf import records
    from m2cnn_tf.data import scale_image

    def generate():
        for i, serialized in enumerate(chosen, 1):
            image = records.decode_image(records.parse_example(serialized))
            yield [scale_image(image)[tf.newaxis].numpy()]
            if i % 50 == 0:
                log(f"calibrated {i} of {len(chosen)}")

    return generate


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_litert(
    saved_model_dir: str | Path,
    quantize: str,
    representative: Callable[[], Iterator[list]] | None = None,
) -> bytes:
    """A .tflite flatbuffer from a SavedModel, quantised as asked (see the module docstring)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    except Exception as err:  # the converter's errors are long MLIR dumps
        raise ExportError(f"LiteRT conversion ({quantize}) failed: {one_line(err)}") from None


def _check_request(
    fmt: str, quantize: Sequence[str], calibration: str | None, count: int, keep_float: str
) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}", setting="format")
    unknown = [q for q in quantize if q not in QUANTIZATIONS]
    if unknown or not quantize:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZATIONS)}", setting="quantize")
    if len(set(quantize)) < len(quantize):
        raise ExportError(f"named twice in {','.join(quantize)}", setting="quantize")
    if fmt == "savedmodel" and quantize != ["none"]:
        raise ExportError("a SavedModel is float32; quantisation needs litert", setting="quantize")
    if "int8" in quantize and not calibration:
        raise ExportError(
            "int8 needs calibration data: a data_prep folder with train records at the stage's "
            "size",
            setting="calibration",
        )
    if calibration and "int8" not in quantize:
        raise ExportError("calibration data is used by int8 only", setting="calibration")
    if "int8" in quantize and count < MIN_CALIBRATION:
        raise ExportError(f"at least {MIN_CALIBRATION}, got {count}", setting="calibration_count")
    if keep_float not in KEEP_FLOAT_CHOICES:
        raise ExportError(
            f"must be one of {', '.join(KEEP_FLOAT_CHOICES)}, got {keep_float!r}",
            setting="keep_float",
        )
    if keep_float != "auto" and "int8" not in quantize:
        raise ExportError("which layers stay float is a choice of int8 only", setting="keep_float")


def export_stage(
    model_dir: str | Path,
    stage: int,
    *,
    fmt: str,
    quantize: str = "none",
    calibration: str | None = None,
    calibration_count: int = DEFAULT_CALIBRATION,
    keep_float: str = "auto",
    out: str | Path | None = None,
    log: Log = print,
) -> Path:
    """Export the best checkpoint of a stage as `fmt`; returns the model's path (sidecar beside).
    int8 only: `keep_float` "auto" (selective, the default) or "none" (every layer int8).

    Bad requests fail before the checkpoint loads, bad calibration data before any conversion;
    the model file and then its sidecar are written atomically: a reader never sees half of one.
    """
    return export_stages(
        model_dir, stage, fmt=fmt, quantize=[quantize], calibration=calibration,
        calibration_count=calibration_count, keep_float=keep_float, out=out, log=log,
    )[0]  # fmt: skip


def export_stages(
    model_dir: str | Path,
    stage: int,
    *,
    fmt: str,
    quantize: Sequence[str],
    calibration: str | None = None,
    calibration_count: int = DEFAULT_CALIBRATION,
    keep_float: str = "auto",
    out: str | Path | None = None,
    log: Log = print,
) -> list[Path]:
    """`export_stage` for several LiteRT quantisations at once, in their order: the checkpoint
    is loaded, and its SavedModel written, once for all of them (4-5 s each on the tests' tiny
    model, as long as a float conversion). `out` only with one quantisation."""
    quantize = list(quantize)
    _check_request(fmt, quantize, calibration, calibration_count, keep_float)
    if out and len(quantize) > 1:
        raise ExportError(f"one path for {len(quantize)} quantisations; leave it to the "
                          "defaults", setting="out")  # fmt: skip
    outs = (
        [Path(out)]
        if out
        else [checkpoints.export_path(model_dir, stage, fmt, q) for q in quantize]
    )
    if out and outs[0].suffix == ".json":
        raise ExportError(f"{out} would be taken for a sidecar; name the model otherwise",
                          setting="out")  # fmt: skip
    source = file_identity(checkpoints.checkpoint_path(model_dir, stage))
    model, meta = checkpoints.load_stage(model_dir, stage)
    size = int(model.input_shape[1])
    chosen = calibration_records(calibration, size, calibration_count, log) if calibration else []
    params, params_source = manifest.preprocess_params_for(model_dir, stage)
    outs[0].parent.mkdir(parents=True, exist_ok=True)  # the default paths share one folder
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=outs[0].parent, prefix=".export-") as tmp:
        saved = export_saved_model(model, Path(tmp) / "savedmodel")
        saved_seconds = time.perf_counter() - start
        for q, path in zip(quantize, outs, strict=True):
            start, int8 = time.perf_counter(), None
            if fmt == "savedmodel":
                _replace_dir(saved, path)
            else:
                flat, int8 = _convert(saved, q, keep_float, chosen, model, log)
                atomic_write_bytes(path, flat)
            sidecar = {
                "schema": SIDECAR_SCHEMA,
                "format": fmt,
                "quantization": q,
                "file": None if fmt == "savedmodel" else file_identity(path),
                "stage": stage,
                "image_size": size,
                "preset": meta.get("preset"),
                "source_checkpoint": source,
                "calibration": {"count": len(chosen), "requested": calibration_count,
                                "data": str(calibration), "split": CALIBRATION_SPLIT}
                if q == "int8" else None,
                "int8": int8,
                "preprocessing": {"params": params.to_dict(), "source": params_source},
                "signature": {"input": "image: float32 (B, S, S, 3) in [-1, 1]",
                              "outputs": ["logits", "probabilities", "score"]},
                # With the SavedModel's share: what this file alone would have taken.
                "export_seconds": round(time.perf_counter() - start + saved_seconds, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": versions(),
            }  # fmt: skip
            atomic_write_json(checkpoints.sidecar_path(path), sidecar)
    return outs


def _convert(
    saved: Path, quantize: str, keep_float: str, chosen: list[bytes], model, log: Log
) -> tuple[bytes, dict[str, Any] | None]:
    """The .tflite bytes, and for int8 what the sidecar says about its float layers."""
    if quantize != "int8":
        return convert_litert(saved, quantize), None
    if keep_float == "none":
        flat = convert_litert(saved, quantize, representative_images(chosen, log))
        return flat, {"scheme": "full int8: every op, the input and the outputs int8",
                      "kept_float": [], "kept_float_ops": None}  # fmt: skip
    debug = chosen[:DEBUG_RECORDS]
    try:
        return quantization.selective_int8(
            str(saved), representative_images(chosen, log),
            representative_images(debug, lambda _: None), len(debug),
            [layer.name for layer in model.layers], log,
        )  # fmt: skip
    except Exception as err:  # the converter's errors are long MLIR dumps
        raise ExportError(f"LiteRT conversion (int8) failed: {one_line(err)}") from None


def export_saved_model(model, export_dir: str | Path) -> Path:
    """A TF SavedModel whose `serving_default` maps a preprocessed batch to the outputs.

    Input `image`: float32 (B, S, S, 3), already preprocessed and scaled to [-1, 1] (as
    `data.scale_image`). Outputs: `logits` (B, 5), `score` (B, 1), `probabilities` (B, 5).
    Serving systems outside Python get the model without Keras and without any Python code.
    """
    import keras
    import tensorflow as tf

    size = int(model.input_shape[1])
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image):
        out = model(image, training=False)
        return {
            "logits": out["logits"],
            "score": out["score"],
            "probabilities": tf.nn.softmax(out["logits"], axis=-1),
        }

    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="image")],
    )
    archive.write_out(str(export_dir), verbose=False)
    return Path(export_dir)


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the move."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
