"""How a stage becomes int8 without changing its diagnosis: TF Lite's quantization debugger
measures each layer's int8 error on calibration records, and the few layers that carry it stay
float (selective quantisation); every other layer runs on int8 kernels.

Why (docs/quantization.md has the measurements): on the demo's stage-3 model, full int8 took
the test kappa from 0.628 / 0.839 (scores / prob.) to 0.541 / 0.716, and dynamic-range
quantisation did the same. Both round the weights of the Multi-Cell's 1x1 projections
(`medium_conv`, `large_conv`) to int8. They start as an identity (model.py, `cell_init`), so
each output channel keeps one weight near 1 beside 2527 small learned ones, and a per-channel
int8 step of max|w|/127 rounds half of those to zero (12 % relative weight error, against 0.5 %
in every other convolution). The debugger shows them at 5-20 times their quantisation step
(rounding alone gives 0.29).

Choices the paper leaves open (ours):
- A layer stays float when its error, measured by the debugger layer by layer (float and int8
  op fed the same int8 input), has an RMSE above `RMSE_SCALE_LIMIT` times its output's
  quantisation step: TF's debugger tutorial's cut, 2.4 times pure rounding's 1/sqrt(12).
- The pooling, both heads and the softmax (`FLOAT_TAIL_OPS`) always run in float, and the
  model's input and output are float32: the outputs are the diagnosis, an int8 output would be
  clipped to the calibration images' range (the demo's score at 3.6 where test images reach
  7.6), and these ops cost under 0.01 % of the model's arithmetic.
- Weights are quantised per output channel (the converter's default, kept explicitly).
- The debugger runs on the first `DEBUG_RECORDS` calibration records.
TensorFlow is imported inside the functions, as in export.py.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

RMSE_SCALE_LIMIT = 0.7
ROUNDING_RMSE_SCALE = 1 / math.sqrt(12)  # uniform rounding error over one step
FLOAT_TAIL_OPS = ("MEAN", "FULLY_CONNECTED", "SOFTMAX")
DEBUG_RECORDS = 16
KEEP_FLOAT_CHOICES = ("auto", "none")  # auto: selective (default); none: every layer int8

Log = Callable[[str], None]


@dataclass(frozen=True)
class LayerError:
    """One quantised op's error as the debugger measured it."""

    op: str  # the LiteRT op, e.g. CONV_2D
    tensor: str  # its output tensor's name in the LiteRT graph (what a denylist names)
    layer: str  # the Keras layer it comes from, when its name says so, else the tensor name
    scale: float  # the output's int8 quantisation step
    rmse: float

    @property
    def rmse_over_scale(self) -> float:
        return self.rmse / self.scale if self.scale > 0 else math.inf


def keras_layer(tensor: str, layer_names: Iterable[str]) -> str:
    """The Keras layer a LiteRT tensor was converted from: its name's second scope, e.g.
    'm2cnn_tiny_720_1/medium_conv_ac_1/Relu;...' -> 'medium_conv_ac' (the converter's fused
    names list the last op first; tracing adds a '_N' suffix to scopes)."""
    names = set(layer_names)
    for part in tensor.split(";")[0].split("/")[1:]:
        if part in names:
            return part
        stripped = re.sub(r"_\d+$", "", part)
        if stripped in names:
            return stripped
    return tensor


def layer_errors(debugger, layer_names: Iterable[str]) -> list[LayerError]:
    """Run the debugger on its data and read back every quantised op's RMSE and step."""
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    names = list(layer_names)
    found = []
    for row in csv.DictReader(dump):
        found.append(
            LayerError(
                op=row["op_name"],
                tensor=row["tensor_name"],
                layer=keras_layer(row["tensor_name"], names),
                scale=float(row["scale"]),
                rmse=math.sqrt(max(float(row["mean_squared_error"]), 0.0)),
            )
        )
    return found


def _carry_error(errors: list[LayerError]) -> list[LayerError]:
    """The layers above the limit, outside the tail (which stays float anyway)."""
    return [
        e
        for e in errors
        if e.op not in FLOAT_TAIL_OPS and not e.rmse_over_scale <= RMSE_SCALE_LIMIT
    ]


def measure(
    saved_model_dir: str,
    representative: Callable[[], Iterator[list]],
    debug_data: Callable[[], Iterator[list]],
    layer_names: Iterable[str],
):
    """Calibrate an int8 conversion of a SavedModel on `representative` and measure every
    quantised op's error on `debug_data`: (the debugger, which can then quantise with a
    denylist, and the errors in graph order)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_disable_per_channel = False  # per-channel weights, said explicitly
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=debug_data,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(),
    )
    return debugger, layer_errors(debugger, layer_names)


def selective_int8(
    saved_model_dir: str,
    representative: Callable[[], Iterator[list]],
    debug_data: Callable[[], Iterator[list]],
    debug_count: int,
    layer_names: Iterable[str],
    log: Log = print,
) -> tuple[bytes, dict[str, Any]]:
    """The selective int8 flatbuffer and what the sidecar records about it: the layers kept in
    float with their measured error and why, and the worst layers left int8. `debug_data`
    yields `debug_count` of the calibration images."""
    import tensorflow as tf

    log("measuring each layer's int8 error (quantization debugger)")
    debugger, errors = measure(saved_model_dir, representative, debug_data, layer_names)
    carry = _carry_error(errors)
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=[e.tensor for e in carry] or None,
        denylisted_ops=list(FLOAT_TAIL_OPS),
    )
    flat = debugger.get_nondebug_quantized_model()
    rest = sorted(
        (e for e in errors if e not in carry and e.op not in FLOAT_TAIL_OPS),
        key=lambda e: -e.rmse_over_scale,
    )
    limit = f"{RMSE_SCALE_LIMIT} (rounding alone: {ROUNDING_RMSE_SCALE:.2f})"
    report = {
        "scheme": "selective int8: int8 weights (per channel) and activations, float32 input "
        "and output; the layers below stay float",
        "kept_float": [
            {
                "layer": e.layer,
                "op": e.op,
                "rmse_over_scale": round(e.rmse_over_scale, 3),
                "why": f"int8 error {e.rmse_over_scale:.2f} x its quantisation step, above {limit}",
            }
            for e in carry
        ],
        "kept_float_ops": {
            "ops": list(FLOAT_TAIL_OPS),
            "why": "the pooling, the heads and the softmax: the outputs are the diagnosis, "
            "an int8 output would be clipped to the calibration images' range, and they cost "
            "under 0.01 % of the arithmetic",
        },
        "rmse_over_scale_limit": RMSE_SCALE_LIMIT,
        "debug_records": debug_count,
        "worst_int8_layers": [
            {"layer": e.layer, "op": e.op, "rmse_over_scale": round(e.rmse_over_scale, 3)}
            for e in rest[:3]
        ],
    }
    kept = ", ".join(f"{e.layer} ({e.rmse_over_scale:.1f})" for e in carry) or "none"
    log(f"kept in float: {kept}; and the tail ({', '.join(FLOAT_TAIL_OPS)})")
    return flat, report
