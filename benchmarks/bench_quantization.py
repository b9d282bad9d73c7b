"""Does each fast format give Keras's diagnosis? (issue 21; a measurement, not a test.)

Given a trained stage and its records, this exports every format with `export.export_stage`
(the path export.py runs) into a scratch folder (the stage's own export/ is not touched),
evaluates each on a split, and prints one table: the quadratic kappa from scores and from
probabilities, how often the grade (both ways) equals the Keras float32 model's, the mean and
largest |score difference|, the model's time per image on this split (model calls only, batch
16, after a warm-up batch; the machine's load average beside it) and the file size.

    python benchmarks/bench_quantization.py --model-dir runs/demo/models --stage 3 \\
        --data data/demo/records [--split test] [--formats keras,bfloat16,float32,float16,\\
        dynamic,int8,int8-full] [--calibration-count N]
    ... --curve 16,32,64,128,200   the selective int8 model calibrated on each count of records
    ... --layers                   the quantization debugger's per-layer error, worst first
    python benchmarks/bench_quantization.py --layers --preset paper --size 224 \\
        --data data/demo/records   the same for a random-weight model of a preset (no training)

Formats: keras (float32, the reference), bfloat16 (Keras under mixed_bfloat16), float32,
float16, dynamic (LiteRT), int8 (selective, export.py's default), int8-full (every layer int8,
`--keep-float none`: the model before issue 21).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tensorflow as tf

from m2cnn_tf import backends, checkpoints, export, quantization
from m2cnn_tf.evaluation import predict_split
from m2cnn_tf.metrics import probs_to_grades, quadratic_weighted_kappa, scores_to_grades

FORMATS = ("keras", "bfloat16", "float32", "float16", "dynamic", "int8", "int8-full")
EXPORTED = {  # format -> export_stage's quantize and keep_float
    "float32": ("none", "auto"),
    "float16": ("float16", "auto"),
    "dynamic": ("dynamic", "auto"),
    "int8": ("int8", "auto"),
    "int8-full": ("int8", "none"),
}
BATCH = 16
COLUMNS = (
    "kappa scores / prob.", "grade = Keras's (scores / prob.)", "score diff, mean / max abs.",
    "ms/image", "file", "notes",
)  # fmt: skip


def _load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def _quiet(_: str) -> None:
    pass


def _export(args, fmt: str, work: Path, count: int) -> tuple[Path, float]:
    quantize, keep_float = EXPORTED[fmt]
    start = time.perf_counter()
    path = export.export_stage(
        args.model_dir, args.stage, fmt="litert", quantize=quantize,
        calibration=args.data if quantize == "int8" else None, calibration_count=count,
        keep_float=keep_float, out=work / f"{fmt}-{count}.tflite", log=_quiet,
    )  # fmt: skip
    return path, time.perf_counter() - start


def _backend(args, fmt: str, path: Path | None):
    if fmt in ("keras", "bfloat16"):
        precision = "bfloat16" if fmt == "bfloat16" else "float32"
        return backends.load_backend(
            "keras", model_dir=args.model_dir, stage=args.stage, precision=precision
        )
    return backends.load_backend(
        "litert", model_dir=args.model_dir, stage=args.stage, litert_model=path
    )


def _predict(args, backend) -> tuple[object, float, str]:
    """The split's predictions, the model's ms per image, and the load while it ran."""
    size = backend.image_size
    backend.predict(np.zeros((BATCH, size, size, 3), np.float32))  # warm-up: tracing, kernels
    spent = [0.0, 0]

    def timed(images):
        start = time.perf_counter()
        out = backend.predict(images)
        spent[0] += time.perf_counter() - start
        spent[1] += len(images)
        return out

    before = _load()
    preds, _ = predict_split(timed, args.data, size, args.split, tta="none", batch_size=BATCH)
    return preds, 1000 * spent[0] / spent[1], f"{before} -> {_load()}"


def _row(name: str, preds, ref, ms: float, size_mb: float | None, note: str) -> str:
    grades = (scores_to_grades(preds.scores), probs_to_grades(preds.probs))
    ref_grades = (scores_to_grades(ref.scores), probs_to_grades(ref.probs))
    kappas = [quadratic_weighted_kappa(preds.grades, g) for g in grades]
    agree = [float(np.mean(g == r)) for g, r in zip(grades, ref_grades, strict=True)]
    diff = np.abs(preds.scores - ref.scores)
    size = f"{size_mb:.1f} MB" if size_mb is not None else "–"
    return (
        f"| {name} | {kappas[0]:.3f} / {kappas[1]:.3f} | {agree[0]:.1%} / {agree[1]:.1%} | "
        f"{diff.mean():.3f} / {diff.max():.3f} | {ms:.0f} | {size} | {note} |"
    )


def _header(first: str) -> None:
    print(f"| {first} | {' | '.join(COLUMNS)} |")
    print("|---" * (1 + len(COLUMNS)) + "|")


def _kept(path: Path) -> str:
    int8 = checkpoints.read_sidecar(path).get("int8") or {}
    if not int8.get("kept_float_ops"):
        return "every layer int8" if int8 else ""
    layers = [f"{k['layer']} ({k['rmse_over_scale']:.1f})" for k in int8["kept_float"]]
    return f"float: {', '.join(layers) or 'no layer'} + heads"


def table(args, work: Path) -> None:
    _header("format")
    ref = None
    for fmt in ["keras", *(f for f in args.formats if f != "keras")]:
        path, seconds, size_mb, note = None, 0.0, None, ""
        if fmt in EXPORTED:
            path, seconds = _export(args, fmt, work, args.calibration_count)
            size_mb = path.stat().st_size / 1e6
            note = f"export {seconds:.0f} s; {_kept(path)}".rstrip("; ")
        else:
            size_mb = checkpoints.checkpoint_path(args.model_dir, args.stage).stat().st_size / 1e6
        preds, ms, load = _predict(args, _backend(args, fmt, path))
        ref = preds if fmt == "keras" else ref
        name = {"keras": "Keras float32", "bfloat16": "Keras bfloat16"}.get(fmt, f"LiteRT {fmt}")
        print(_row(name, preds, ref, ms, size_mb, f"{note}; {load}".lstrip("; ")), flush=True)


def curve(args, work: Path) -> None:
    """The selective int8 model calibrated on each count: is the default count enough?"""
    ref, _, _ = _predict(args, _backend(args, "keras", None))
    _header("calibration records")
    for count in args.curve:
        path, seconds = _export(args, "int8", work, count)
        used = checkpoints.read_sidecar(path)["calibration"]["count"]
        preds, ms, load = _predict(args, _backend(args, "int8", path))
        note = f"export {seconds:.0f} s; {_kept(path)}; {load}"
        print(_row(f"{used}", preds, ref, ms, path.stat().st_size / 1e6, note), flush=True)


def layers(args, work: Path) -> None:
    """Every quantised op's int8 error, worst first, as the debugger measures it."""
    if args.preset:
        from m2cnn_tf.model import build_m2cnn

        model = build_m2cnn(args.size, preset=args.preset)
        what = f"{args.preset} preset, random weights, {args.size} px"
    else:
        model, _ = checkpoints.load_stage(args.model_dir, args.stage)
        what = f"{args.model_dir} stage {args.stage}"
    size = int(model.input_shape[1])
    chosen = export.calibration_records(args.data, size, args.calibration_count, _quiet)
    saved = export.export_saved_model(model, work / "savedmodel")
    debug = chosen[: quantization.DEBUG_RECORDS]
    start = time.perf_counter()
    _, errors = quantization.measure(
        str(saved), export.representative_images(chosen, _quiet),
        export.representative_images(debug, _quiet), [layer.name for layer in model.layers],
    )  # fmt: skip
    seconds = time.perf_counter() - start
    ratios = np.array([e.rmse_over_scale for e in errors])
    above = int(np.sum(ratios > quantization.RMSE_SCALE_LIMIT))
    print(f"{what}: {len(errors)} quantised ops, calibrated on {len(chosen)} records, measured "
          f"on {len(debug)}, {seconds:.0f} s; RMSE / scale median {np.median(ratios):.3f}, "
          f"above {quantization.RMSE_SCALE_LIMIT}: {above}")  # fmt: skip
    print("| op | layer | RMSE / scale | RMSE | output range |")
    print("|---|---|---|---|---|")
    for e in sorted(errors, key=lambda e: -e.rmse_over_scale)[: args.top]:
        print(f"| {e.op} | {e.layer[:60]} | {e.rmse_over_scale:.3f} | {e.rmse:.4f} | "
              f"{255 * e.scale:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--stage", type=int)
    parser.add_argument("--data", required=True, help="data_prep folder: the split and calibration")
    parser.add_argument("--split", default="test")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--calibration-count", type=int, default=export.DEFAULT_CALIBRATION)
    parser.add_argument("--curve", help="calibration counts, e.g. 16,32,64,128,200")
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--preset", help="--layers on a random-weight model of this preset")
    parser.add_argument("--size", type=int, default=224, help="its image size")
    parser.add_argument("--top", type=int, default=12, help="--layers: rows shown")
    args = parser.parse_args()
    args.formats = args.formats.split(",")
    unknown = set(args.formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
    if not args.preset and (args.model_dir is None or args.stage is None):
        parser.error("--model-dir and --stage are needed (or --layers --preset)")
    print(f"{platform.platform()}, TF {tf.__version__}, {os.cpu_count()} cores, start {_load()}")
    with tempfile.TemporaryDirectory(prefix="bench_quantization-") as tmp:
        if args.layers:
            layers(args, Path(tmp))
        elif args.curve:
            args.curve = [int(c) for c in args.curve.split(",")]
            curve(args, Path(tmp))
        else:
            table(args, Path(tmp))
    print(f"end {_load()}")


if __name__ == "__main__":
    main()
