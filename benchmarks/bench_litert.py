"""CPU inference speed: Keras float32 against Keras bfloat16 and LiteRT float32 / float16 /
int8 (issues 11 and 21; not a timed test).

For the paper preset (random weights: speed does not depend on them) at 224 px (stage 1) and
720 px (stage 3), each model is saved as a checkpoint and exported by `export.export_stage`, the
path `export.py` runs (int8 calibrated on 16 synthetic records, the minimum: a speed
measurement needs ranges, not good ones). int8 is timed twice: as export.py makes it by
default (selective: the layers the quantization debugger finds too lossy, and the heads, stay
float) and with every layer int8 (`--keep-float none`). Random weights would leave the
Multi-Cell projections an exact identity, which int8 rounds without error, so the benchmark
gives them the coherent small weights training adds (as tests/test_export.py does): the
debugger then keeps them float, as it does for the trained demo model, and their float cost
is in the timing. Keras bfloat16 is the Keras model under `--precision bfloat16`. Then, at
batch 1 and 8 and the default thread count
(`backends.default_threads()`, all cores; TF uses all cores too), the ms per image of each
backend's `predict` on preprocessed [-1, 1] batches: the best of --repeats calls after one
warm-up, the backends interleaved so that load from other processes hits them alike. Also:
file sizes, export times, load times in this process (TF already imported) and the first image
after loading, and `predict.py` on one photograph from a cold start (a fresh process: imports,
load, preprocessing, one prediction, the CSV), where the LiteRT path never imports TF.

    python benchmarks/bench_litert.py [--sizes 224,720] [--batches 1,8] [--repeats 3]
        [--preset paper]   (tiny: a quick check that the script runs)

Targets, at 720 px, per image against Keras float32: int8 >= 3.5x (issue 21; issue 11 asked
5x), float32 >= 1.3x (issue 11); bfloat16 is adopted as an option at >= 1.5x (issue 21).
The machine's load average is printed with every figure: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np
import tensorflow as tf
from flops import forward_flops

from m2cnn_tf import backends, checkpoints, export, records
from m2cnn_tf.checkpoints import save_checkpoint, stage_dir
from m2cnn_tf.config import STAGE_SIZES
from m2cnn_tf.model import build_m2cnn

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = {  # name -> export_stage's quantize and keep_float
    "float32": ("none", "auto"),
    "float16": ("float16", "auto"),
    "int8": ("int8", "auto"),
    "int8-full": ("int8", "none"),
}
# At 720 px, speed-up over Keras float32 per image (issues 11 and 21).
TARGETS = {"litert int8": 3.5, "litert float32": 1.3, "keras bfloat16": 1.5}
COLD = """
import sys, time
start = time.perf_counter()
from m2cnn_tf.commands import predict
code = predict.run(["predict.py", *sys.argv[1:]])
print(time.perf_counter() - start, "tensorflow" in sys.modules, code, file=sys.stderr)
"""


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def _calibration_data(root: Path, size: int, count: int = export.MIN_CALIBRATION) -> Path:
    """`count` grey fundus-like discs with noise, as data_prep's train records at `size`."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2)[..., None]
    path = root / str(size) / records.shard_name("train", 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(count):
            image = np.where(disc, 128 + rng.normal(0, 20, (size, size, 3)), 128)
            encoded = tf.io.encode_png(np.clip(image, 0, 255).astype(np.uint8)).numpy()
            example = records.make_example(
                encoded, image_format="png", height=size, width=size, grade=i % 5,
                image_id=f"{i}_left",
            )  # fmt: skip
            writer.write(example)
    return root


def _projections_as_trained(model, rate: float = 0.0045) -> None:
    """Each Multi-Cell projection's identity plus coherent small weights, as a dozen Adam steps
    leave it (tests/test_export.py, `_projection_as_trained`, says why)."""
    rng = np.random.default_rng(5)
    for name in ("medium_conv", "large_conv"):
        try:
            layer = model.get_layer(name)
        except ValueError:  # 224 px: no Multi-Cell
            continue
        kernel = layer.get_weights()[0]
        signs = rng.choice([-1.0, 1.0], kernel.shape[-1])
        kernel += (rate * signs * (1 + 0.5 * rng.normal(size=kernel.shape))).astype("float32")
        layer.set_weights([kernel])


def _timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _ms_per_image(runners: dict, batch: int, size: int, repeats: int) -> dict[str, float]:
    images = np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    for run in runners.values():
        run(images)  # warm-up: tracing, kernel selection, tensor allocation
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            _, seconds = _timed(lambda run=run: run(images))
            best[name] = min(best[name], seconds)
    return {name: 1000 * s / batch for name, s in best.items()}


def _photos(work: Path, n: int) -> list[Path]:
    """`n` raw 1536×1024 fundus-like JPEG photographs (a noisy disc on black)."""
    import cv2

    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(n):
        img = np.zeros((1024, 1536, 3), np.uint8)
        cv2.circle(img, (768, 512), 470, tuple(int(v) for v in rng.integers(60, 200, 3)), -1)
        noise = rng.normal(0, 12, img.shape)
        cv2.imwrite(str(photos / f"{i}.jpeg"), np.clip(img + noise, 0, 255).astype(np.uint8))
    return sorted(photos.glob("*.jpeg"))


def _cold_start(model_dir: Path, stage: int, photo: Path, *backend: str) -> str:
    """`predict.py --model-dir DIR --stage N [backend flags] PHOTO` in a fresh process."""
    argv = [sys.executable, "-c", COLD, f"--model-dir={model_dir}", f"--stage={stage}", *backend]
    start = time.perf_counter()
    done = subprocess.run([*argv, str(photo)], capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - start
    inside, tf_loaded, code = done.stderr.split()[-3:]
    if code != "0":
        raise SystemExit(f"predict.py failed (exit {code}):\n{done.stderr[-2000:]}")
    return f"{total:.1f} s (in Python {float(inside):.1f} s; TensorFlow imported: {tf_loaded})"


def _through_predict(loaded: dict, work: Path, n: int = 32) -> list[str]:
    """predict.py's own path (`prediction.Predictor` with predict.py's defaults: decode, §II-A
    crop, Eq. (1), resize, batches of 16, the model) on `n` raw 1536×1024 photographs, start-up
    excluded: Keras against LiteRT int8."""
    from m2cnn_tf.prediction import Predictor
    from m2cnn_tf.preprocessing import PreprocessParams

    paths = _photos(work, n)
    seconds = {}
    for name in ("keras", "litert int8"):
        predictor = Predictor(loaded[name], PreprocessParams())
        list(predictor.rows(paths[:8]))  # warm-up: tracing, kernels, thread pools
        _, seconds[name] = _timed(lambda p=predictor: list(p.rows(paths)))
    ratio = seconds["keras"] / seconds["litert int8"]
    verdict = "met" if ratio >= 4 else "MISSED"
    return [
        f"through predict.py's Predictor, {n} raw photographs, batch 16 ({_load()}):",
        *(f"   {k:16s} {1000 * v / n:9.1f} ms/image" for k, v in seconds.items()),
        f"   litert int8 {ratio:5.2f}x Keras (target at 720 px >= 4x: {verdict})",
    ]


def _verdicts(best: dict[str, tuple[float, int]], size: int, gflop: float) -> list[str]:
    """Each runtime at its fastest batch size against Keras at its own, and the targets; the
    arithmetic rate each reaches (`gflop` per image, a multiply-add counted as 2) shows how
    close to the CPU's peak it runs."""
    keras_ms, keras_batch = best.pop("keras")
    lines = [
        f"fastest per image ({gflop:.1f} GFLOP each): keras {keras_ms:.1f} ms (batch "
        f"{keras_batch}), {gflop / keras_ms * 1000:.0f} GFLOP/s"
    ]
    for name, (ms, batch) in best.items():
        line = (
            f"   {name:16s} {ms:9.1f} ms (batch {batch}), {gflop / ms * 1000:4.0f} G-op/s: "
            f"{keras_ms / ms:5.2f}x Keras"
        )
        target = TARGETS.get(name) if size == 720 else None
        if target:
            verdict = "met" if keras_ms / ms >= target else "MISSED"
            line += f" (target at 720 px >= {target}x: {verdict})"
        lines.append(line)
    return lines


def bench_size(size: int, work: Path, batches: list[int], repeats: int, preset: str) -> list[str]:
    stage = next(s for s, px in STAGE_SIZES.items() if px == size)
    model_dir, lines = work / "model", [f"\n== {preset} preset, {size} px (stage {stage}) =="]
    model = build_m2cnn(size, preset=preset)
    _projections_as_trained(model)
    gflop = forward_flops(model, size) / 1e9
    save_checkpoint(model, stage_dir(model_dir, stage),
              {"stage": stage, "resolution": size, "preset": preset})  # fmt: skip
    del model
    keras.backend.clear_session()
    gc.collect()
    checkpoint = checkpoints.checkpoint_path(model_dir, stage)
    lines.append(f"checkpoint {checkpoint.stat().st_size / 1e6:.0f} MB")
    data = _calibration_data(work / "data", size)
    files = {}
    for tag, (q, keep) in EXPORTS.items():
        calibration = str(data) if q == "int8" else None
        files[tag], seconds = _timed(
            lambda q=q, c=calibration, k=keep, t=tag: export.export_stage(
                model_dir, stage, fmt="litert", quantize=q, calibration=c, keep_float=k,
                calibration_count=export.MIN_CALIBRATION, out=work / f"model_{t}.tflite",
                log=lambda _: None,
            )
        )  # fmt: skip
        int8 = checkpoints.read_sidecar(files[tag]).get("int8") or {}
        kept = [k["layer"] for k in int8.get("kept_float", [])]
        float_part = f"; float: {', '.join(kept) or 'no layer'} + heads" if kept or (
            int8.get("kept_float_ops")) else ""  # fmt: skip
        lines.append(f"export {tag:9s} {files[tag].stat().st_size / 1e6:7.1f} MB "
                     f"in {seconds:5.1f} s{float_part}")  # fmt: skip
        gc.collect()
    where, loaded = {"model_dir": model_dir, "stage": stage}, {}
    one = np.zeros((1, size, size, 3), np.float32)
    runtimes = {
        "keras": ("keras", {}),
        "keras bfloat16": ("keras", {"precision": "bfloat16"}),
        **{f"litert {t}": ("litert", {"litert_model": f}) for t, f in files.items()},
    }
    for name, (kind, extra) in runtimes.items():  # load, then one image (kernels are prepared)
        loaded[name], seconds = _timed(
            lambda k=kind, e=extra: backends.load_backend(k, **where, **e)
        )
        _, first = _timed(lambda b=loaded[name]: b.predict(one))
        lines.append(f"load {name:15s} {seconds:6.2f} s, then first image {first:6.2f} s")
    threads = loaded["litert int8"].threads
    lines.append(f"threads: LiteRT {threads}, TF intra-op default (all {os.cpu_count()} cores)")
    best: dict[str, tuple[float, int]] = {}
    for batch in batches:
        lines.append(f"-- batch {batch}  ({_load()})")
        ms = _ms_per_image({n: b.predict for n, b in loaded.items()}, batch, size, repeats)
        for name, value in ms.items():
            speedup = "" if name == "keras" else f"  {ms['keras'] / value:5.2f}x Keras"
            lines.append(f"   {name:16s} {value:9.1f} ms/image{speedup}")
            best[name] = min(best.get(name, (value, batch)), (value, batch))
    lines += _verdicts(best, size, gflop)
    if size == 720:
        lines += _through_predict(loaded, work)
    loaded.clear()
    gc.collect()
    photo = _photos(work, 1)[0]
    litert = ("--backend=litert", f"--litert-model={files['int8']}")
    lines.append("predict.py from a cold start, 1 photograph (process start to CSV):")
    lines.append(f"   keras:       {_cold_start(model_dir, stage, photo)}")
    lines.append(f"   litert int8: {_cold_start(model_dir, stage, photo, *litert)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,720")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="paper")
    args = parser.parse_args()
    machine = f"{platform.platform()}, {platform.processor() or platform.machine()}"
    print(f"{machine}, python {platform.python_version()}, TF {tf.__version__}, "
          f"Keras {keras.__version__}")  # fmt: skip
    print(f"start: {_load()} (the machine is shared: other jobs' load slows every row alike)")
    with tempfile.TemporaryDirectory(prefix="bench_litert-") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            batches = [int(b) for b in args.batches.split(",")]
            lines = bench_size(size, Path(tmp) / str(size), batches, args.repeats, args.preset)
            print("\n".join(lines), flush=True)
            keras.backend.clear_session()
            gc.collect()
    print(f"\nend: {_load()}")


if __name__ == "__main__":
    main()
