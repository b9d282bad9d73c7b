"""Prediction throughput on the CPU (issue 5's benchmark; not a timed test).

1. Images/s of the prediction path the CLI runs (`prediction.Predictor.rows` -> CSV rows, with
   its thread window, batching, compiled model call and progress bar), against the bare
   `model.predict` on the same images, at 224 px for the tiny and paper presets, with and
   without TTA (flips: 4 views; the bare reference then predicts the 4 flipped copies).
   Preprocessing from JPEG is excluded here: the Predictor gets the already preprocessed
   arrays. Target: overhead ratio <= 1.1.
2. Preprocessing time per raw Kaggle-size photograph (3888×2592 JPEG, generated), separately.

    python benchmarks/bench_predict.py [--images 32] [--repeats 2] [--presets tiny,paper]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from m2cnn_tf import prediction
from m2cnn_tf.model import build_m2cnn
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_file

SIZE = 224


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: tracing, oneDNN kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _best_pair(a, b, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best-of-N (wall, CPU) seconds of two functions, interleaved so that load from other
    processes on a shared machine hits both alike. CPU time (all threads of this process) is
    the steadier measure of the work each does when other jobs share the cores."""
    a(), b()
    times: dict[int, list] = {0: [], 1: []}
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[i].append((time.perf_counter() - wall, time.process_time() - cpu))
    best = [tuple(min(t[k] for t in times[i]) for k in range(2)) for i in range(2)]
    return best[0], best[1]


def bench_model(preset: str, n_images: int, batch: int, repeats: int) -> list[dict]:
    model = build_m2cnn(SIZE, preset=preset)
    rng = np.random.default_rng(0)
    arrays = {f"img{i}": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
              for i in range(n_images)}  # fmt: skip
    x = np.stack(list(arrays.values())).astype(np.float32) / 127.5 - 1
    paths = [Path(name) for name in arrays]
    results = []
    for tta in ("none", "flips"):
        if tta == "none":
            reference = x
        else:
            views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
            reference = np.ascontiguousarray(np.concatenate(views))
        predictor = prediction.Predictor(model, PreprocessParams(), tta=tta, batch_size=batch)
        predictor.preprocess = lambda p: arrays[p.name]

        views = 4 if tta == "flips" else 1

        def bare(reference=reference, views=views):
            model.predict(reference, batch_size=batch * views, verbose=0)

        def cli_path(predictor=predictor):
            with tqdm(total=len(paths), file=io.StringIO()) as bar:
                prediction.write_rows(predictor.rows(paths, progress=bar), io.StringIO())

        (t_bare, c_bare), (t_cli, c_cli) = _best_pair(bare, cli_path, repeats)
        results.append(
            {
                "preset": preset,
                "tta": tta,
                "bare_img_s": n_images / t_bare,
                "cli_img_s": n_images / t_cli,
                "ratio": t_cli / t_bare,
                "cpu_ratio": c_cli / c_bare,
            }
        )
        print(f"  {preset:5s} tta={tta:5s} bare {n_images / t_bare:7.1f} img/s, "
              f"predict path {n_images / t_cli:7.1f} img/s, ratio {t_cli / t_bare:.3f} "
              f"(CPU time ratio {c_cli / c_bare:.3f})", flush=True)  # fmt: skip
    return results


def kaggle_like_jpeg(path: Path, width: int = 3888, height: int = 2592) -> None:
    """A Kaggle-size fundus-like photograph: textured orange disc, vessels, black border."""
    rng = np.random.default_rng(0)
    small = np.zeros((height // 8, width // 8, 3), np.uint8)
    centre, radius = (width // 16, height // 16), int(0.47 * height / 8)
    cv2.circle(small, centre, radius, (40, 90, 190), -1)
    for _ in range(40):
        p = tuple(int(v) for v in rng.integers(0, [width // 8, height // 8]))
        q = tuple(int(v) for v in rng.integers(0, [width // 8, height // 8]))
        cv2.line(small, p, q, (20, 40, 120), 1)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 6, img.shape).astype(np.float32)
    img = np.clip(img + noise * (img > 0), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def bench_preprocessing(repeats: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kaggle_like.jpeg"
        kaggle_like_jpeg(path)
        mb = path.stat().st_size / 1e6
        for sizes in ([224], [224, 448, 720]):
            t = _best(lambda sizes=sizes: preprocess_file(path, sizes, PreprocessParams()),
                      max(repeats, 5))  # fmt: skip
            results.append({"sizes": sizes, "ms": 1000 * t, "jpeg_mb": mb})
            print(f"  preprocess 3888x2592 JPEG ({mb:.1f} MB) -> {sizes}: {1000 * t:.0f} ms/image",
                  flush=True)  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", default="tiny,paper")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TF {tf.__version__}, GPUs: {len(tf.config.list_physical_devices('GPU'))}")  # fmt: skip
    print(f"prediction at {SIZE} px, {args.images} images, batch {args.batch}:")
    rows = []
    for preset in args.presets.split(","):
        rows += bench_model(preset, args.images, args.batch, args.repeats)
    print("preprocessing (excluded above):")
    prep = bench_preprocessing(args.repeats)
    print(
        "\n| preset | TTA | bare model.predict (img/s) | predict path (img/s) "
        "| wall-time ratio | CPU-time ratio |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['tta']} | {r['bare_img_s']:.1f} | {r['cli_img_s']:.1f} | "
              f"{r['ratio']:.3f} | {r['cpu_ratio']:.3f} |")  # fmt: skip
    for p in prep:
        sizes = ", ".join(map(str, p["sizes"]))
        print(f"\npreprocessing, 3888×2592 JPEG -> {sizes} px: {p['ms']:.0f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
