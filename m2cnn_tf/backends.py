"""Which runtime computes a stage's outputs: the Keras model itself, or its LiteRT export.

Both sit behind one interface, `Backend`: `predict(images)` maps a float32 NHWC batch,
preprocessed (§II-A, Eq. (1)) and scaled to [-1, 1] as `data.scale_image` does, to numpy
{"logits": (N, 5), "score": (N, 1)}, the two heads of Fig. 2; `image_size` is the side the
model takes. Callers (prediction, evaluation, serving) never see which runtime answered.

Choices the paper leaves open (ours):
- LiteRT runs on the `ai_edge_litert` interpreter (not the deprecated `tf.lite.Interpreter`)
  with all the cores this process may use unless told otherwise: its own default is one
  thread, while TF, which it is compared with, uses every core.
- Any batch size: the interpreter's input is resized when the batch size changes.
- Grad-CAM needs gradients, so only the Keras backend offers `model`; a LiteRT caller loads
  the Keras model only when it is asked for.
- The Keras backend computes in float32, or in bfloat16 where the CPU has it (`precision`);
  a LiteRT file's number format is its quantisation. bfloat16 keeps float32's exponent range
  with 8 bits of mantissa. oneDNN, which TF's CPU kernels use, runs bfloat16 convolutions
  natively on CPUs with AVX512_BF16 or AMX-BF16 and emulates them elsewhere: with oneDNN held
  to AVX512-VNNI, the paper preset at 224 px ran bfloat16 at 0.39x float32's speed, against
  1.37x natively (docs/quantization.md). So bfloat16 is refused where /proc/cpuinfo lists
  neither flag, unless forced. It is for inference only (training is unchanged; the paper
  trains and tests in float32 on GPUs): the model is rebuilt under Keras's `mixed_bfloat16`
  policy with the trained float32 weights (variables stay float32, each layer computes in
  bfloat16), but for the pooling and both heads (`model.POOL`, `model.HEAD_LAYERS`), which
  stay float32 as `build_m2cnn` keeps the heads under any policy: the mean over the last
  feature map and the two outputs are computed at full precision from bfloat16 features.
- This module does not import TensorFlow unless the Keras backend is asked for, so the LiteRT
  path starts in a fraction of a second instead of ~5 s.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from m2cnn_tf import checkpoints
from m2cnn_tf.checkpoints import ModelFileError
from m2cnn_tf.errors import UsageError, one_line
from m2cnn_tf.tta import ModelCall

BACKENDS = ("keras", "litert")
OUTPUTS = ("logits", "score")
SIGNATURE = "serving_default"  # export_saved_model's endpoint, kept by the LiteRT converter
# The default LiteRT file of a stage, when several were exported: the fastest first.
LITERT_PREFERENCE = ("int8", "dynamic", "float16", "none")
PRECISIONS = ("float32", "bfloat16")  # the Keras backend's number formats
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


class Backend(Protocol):
    kind: str
    image_size: int
    info: dict[str, Any]  # best.json (keras) or the export's sidecar (litert)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


def default_threads() -> int:
    """The cores this process may run on (its affinity), as TF uses them all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _checked(images: np.ndarray, image_size: int) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise UsageError(
            f"the model takes ({image_size}, {image_size}, 3) images, got a batch of shape "
            f"{images.shape}",
            setting="image_size",
        )
    return images


# ---------------------------------------------------------------------------------------------
# The Keras backend's precision


def cpu_bfloat16_flags(cpuinfo: Path | None = None) -> list[str] | None:
    """The bfloat16 flags the CPU reports in `cpuinfo` (default CPUINFO; empty: none), or None
    where it cannot be read."""
    cpuinfo = cpuinfo or CPUINFO
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [f for f in BFLOAT16_CPU_FLAGS if f in flags]


def check_precision(precision: str, *, force: bool = False, cpuinfo: Path | None = None) -> None:
    """A UsageError for an unknown precision, or for bfloat16 on a CPU without it (unforced)."""
    cpuinfo = cpuinfo or CPUINFO
    if precision not in PRECISIONS:
        raise UsageError(
            f"must be one of {', '.join(PRECISIONS)}, got {precision!r}", setting="precision"
        )
    if precision != "bfloat16" or force:
        return
    found = cpu_bfloat16_flags(cpuinfo)
    if found:
        return
    where = (
        f"{cpuinfo} lists neither {' nor '.join(BFLOAT16_CPU_FLAGS)}"
        if found is not None
        else f"{cpuinfo} cannot be read to check for {' or '.join(BFLOAT16_CPU_FLAGS)}"
    )
    raise UsageError(
        f"bfloat16 needs a CPU with native bfloat16 ({where}); elsewhere TensorFlow emulates "
        "it, slower than float32: use float32, or force bfloat16 to run anyway",
        setting="precision",
    )


def bfloat16_model(model):
    """The same network and weights, computing in bfloat16 but for the pooling and the heads."""
    import keras

    from m2cnn_tf.model import HEAD_LAYERS, POOL

    def rebuilt(layer):
        config = layer.get_config()
        if layer.name not in (POOL, *HEAD_LAYERS):
            config["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=rebuilt)
    clone.set_weights(model.get_weights())
    return clone


# ---------------------------------------------------------------------------------------------
# The backends


class KerasBackend:
    """The Keras model, called in inference mode through one compiled function, in float32 or
    bfloat16 (`bfloat16_model`; `model` stays the float32 one, for Grad-CAM)."""

    kind = "keras"

    def __init__(
        self,
        model,
        info: dict[str, Any] | None = None,
        source: str | None = None,
        precision: str = "float32",
    ):
        import tensorflow as tf

        self.model = model
        self.image_size = int(model.input_shape[1])
        self.info = info or {}
        self.source = source
        self.precision = precision
        runs = bfloat16_model(model) if precision == "bfloat16" else model
        self._call = tf.function(lambda x: runs(x, training=False), reduce_retracing=True)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self._call(_checked(images, self.image_size))
        return {k: np.asarray(out[k]) for k in OUTPUTS}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.source, "precision": self.precision}


class KerasModels:
    """Keras backends kept by architecture, for a process that evaluates many checkpoints of a
    few architectures (reproduce.py: 31 evaluations of 5 networks). A checkpoint whose
    architecture (`checkpoints.architecture`) is one already built is loaded as weights into
    that model, whose compiled call is then not traced again. Measured in the tests' miniature
    reproduction (nano, 2 cores): its 17 evaluations took 61 s instead of 89. Holds the `keep`
    most recently used architectures (each holds its weights in memory, a GPU's too)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._built: OrderedDict[str, KerasBackend] = OrderedDict()

    def load(self, path: Path, meta: dict[str, Any]) -> KerasBackend:
        key = checkpoints.architecture(path)
        built = self._built.pop(key, None) if key is not None else None
        if built is None:
            built = KerasBackend(checkpoints.load_model(path))
        else:
            checkpoints.load_weights(built.model, path)
        if key is not None:
            self._built[key] = built
            while len(self._built) > self.keep:
                self._built.popitem(last=False)
        backend = copy.copy(built)  # the same model and call, this checkpoint's facts
        backend.info, backend.source = meta, str(path)
        return backend


class LiteRTBackend:
    """A .tflite export on the LiteRT interpreter; int8 inputs and outputs are (de)quantised
    here with the scale and zero point the file carries."""

    kind = "litert"

    def __init__(self, path: str | Path, sidecar: dict[str, Any], threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.info = sidecar
        self.threads = threads or default_threads()
        try:
            interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            self._runner = interpreter.get_signature_runner(SIGNATURE)
            self._input = self._runner.get_input_details()["image"]
            outputs = self._runner.get_output_details()
            self._outputs = {k: outputs[k] for k in OUTPUTS}
        except Exception as err:  # not a flatbuffer, another model's signature, a bad op
            raise ModelFileError(f"{self.path} cannot run on LiteRT: {one_line(err)}") from None
        self.image_size = int(self._input["shape_signature"][1])
        if sidecar.get("image_size") != self.image_size:
            raise ModelFileError(
                f"{self.path} takes {self.image_size} px images, its sidecar says "
                f"{sidecar.get('image_size')}: export it again"
            )

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = _checked(images, self.image_size)
        dtype = self._input["dtype"]
        if dtype != np.float32:
            scale, zero = self._input["quantization"]
            info = np.iinfo(dtype)
            images = np.clip(np.round(images / scale + zero), info.min, info.max).astype(dtype)
        out = self._runner(image=images)  # resizes the input when the batch size changes
        return {k: self._dequantised(k, out[k]) for k in OUTPUTS}

    def _dequantised(self, name: str, values: np.ndarray) -> np.ndarray:
        details = self._outputs[name]
        if details["dtype"] == np.float32:
            return np.array(values)  # a copy: the runner's buffer is reused by the next call
        scale, zero = details["quantization"]
        return (values.astype(np.float32) - zero) * np.float32(scale)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "model": str(self.path),
            "quantization": self.info.get("quantization"),
            "threads": self.threads,
        }


def runtime_of(model) -> tuple[ModelCall, int, Any]:
    """(the call `tta.make_predict_fn` wraps, the image side, the Keras model or None) for a
    Backend or a Keras model (which gets a Keras backend's compiled call)."""
    if isinstance(model, LiteRTBackend):
        return model.predict, model.image_size, None
    if not isinstance(model, KerasBackend):
        model = KerasBackend(model)
    return model.predict, model.image_size, model.model


def default_litert_path(model_dir: str | Path, stage: int, quantize: str | None = None) -> Path:
    """The stage's exported .tflite: DIR/stage{N}/export/model_<float32|float16|dynamic|int8>
    .tflite for `quantize`, or without it the first that exists in LITERT_PREFERENCE order."""
    if quantize is not None:
        return checkpoints.export_path(model_dir, stage, "litert", quantize)
    for q in LITERT_PREFERENCE:
        path = checkpoints.export_path(model_dir, stage, "litert", q)
        if path.is_file():
            return path
    raise ModelFileError(
        f"no LiteRT export of stage {stage} in {checkpoints.stage_dir(model_dir, stage)}/"
        f"{checkpoints.EXPORT_DIR}: export one with export.py, or name the .tflite file",
        setting="litert_model",
    )


def load_litert(
    path: str | Path,
    *,
    model_dir: str | Path | None = None,
    stage: int | None = None,
    threads: int | None = None,
    image_size: int | None = None,
) -> LiteRTBackend:
    """A checked LiteRT backend: the file exists, matches its sidecar, comes from `stage` and
    from the checkpoint now in `model_dir` (when there is one), and takes `image_size` images."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"LiteRT model {path} does not exist", setting="litert_model")
    sidecar = checkpoints.read_sidecar(path)
    checkpoints.check_model_file(path, sidecar)
    checkpoints.check_source(path, sidecar, model_dir, stage)
    if image_size is not None:
        checkpoints.check_image_size(path, sidecar, image_size)
    return LiteRTBackend(path, sidecar, threads)


def load_keras(
    model_dir: str | Path,
    stage: int,
    image_size: int | None = None,
    checkpoint: str = "best",
    precision: str = "float32",
    force_precision: bool = False,
    models: KerasModels | None = None,
) -> KerasBackend:
    """A stage's best (or last) checkpoint as a Keras backend (from `models` in float32, when
    given); bfloat16 is refused before it loads where the CPU lacks it (unless
    `force_precision`)."""
    check_precision(precision, force=force_precision)
    path = checkpoints.checkpoint_path(model_dir, stage, checkpoint)
    if models is not None and precision == "float32":
        backend = models.load(path, checkpoints.read_meta(model_dir, stage, checkpoint))
    else:
        model, meta = checkpoints.load_stage(model_dir, stage, checkpoint)
        backend = KerasBackend(model, meta, str(path), precision)
    if image_size is not None and image_size != backend.image_size:
        raise ModelFileError(
            f"the stage-{stage} model takes {backend.image_size} px images, the data is "
            f"{image_size} px",
            setting="image_size",
        )
    return backend


def load_backend(
    kind: str,
    *,
    model_dir: str | Path | None = None,
    stage: int | None = None,
    litert_model: str | Path | None = None,
    threads: int | None = None,
    image_size: int | None = None,
    checkpoint: str = "best",
    precision: str = "float32",
    force_precision: bool = False,
    models: KerasModels | None = None,
) -> Backend:
    """The backend `kind` for a stage: its best (or last) checkpoint (keras), or
    `litert_model`, by default the stage's exported file (litert, exported from best.keras).
    `threads` (LiteRT only): default all cores. `precision` (Keras only): float32 or bfloat16,
    refused where the CPU lacks it unless `force_precision`. `models` (Keras only): the built
    models to load into. `image_size`, when given, must be the model's. Every failure is a
    one-line UsageError."""
    if kind not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {kind!r}",
                         setting="backend")  # fmt: skip
    if threads is not None and threads < 1:
        raise UsageError(f"must be at least 1, got {threads}", setting="threads")
    if (kind == "keras" or litert_model is None) and (model_dir is None or stage is None):
        raise UsageError("a model directory and a stage are needed", setting="model_dir")
    if kind == "keras":
        return load_keras(
            model_dir, stage, image_size, checkpoint, precision, force_precision, models
        )
    if checkpoint != "best":
        raise UsageError(
            "a LiteRT export is made from the best checkpoint; evaluate the last one with the "
            "keras backend",
            setting="checkpoint",
        )
    if precision not in PRECISIONS:
        check_precision(precision)  # the one message for an unknown precision
    if precision != "float32":
        raise UsageError(
            f"{precision} is a precision of the Keras backend; a LiteRT file computes in the "
            "format it was exported in",
            setting="precision",
        )
    path = litert_model if litert_model is not None else default_litert_path(model_dir, stage)
    return load_litert(
        path, model_dir=model_dir, stage=stage, threads=threads, image_size=image_size
    )
