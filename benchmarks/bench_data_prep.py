"""Data preparation speed and memory (issue 3). Not a test: run it and read the table.

    python benchmarks/bench_data_prep.py [--images 16] [--rounds 3] [--no-rss]

1. Per-image time, one worker, on Kaggle-size 3888×2592 JPEGs generated from the real fundus
   photograph scikit-image ships, for:
     (a) the decode floor:  cv2.imread(path, IMREAD_REDUCED_COLOR_2) alone;
     ours:                  data_prep's worker (decode at 1/2 → disc crop → 720 → Eq. (1) → mask
                            → JPEG q95 at 224, 448, 720), and the same without the three
                            resizes and encodes (where the time goes);
     (b) a naive pipeline:  full-resolution PIL decode → the same crop and resize → exact Eq. (1)
                            → the same encodes.
   Targets: ours ≥ 3× faster than (b), and ≤ 1.5× the time of (a).
2. End to end: `python -m data_prep.kaggle` on the same files with all workers.
3. Memory: peak RSS of the whole conversion (parent + workers) for 200 vs 2,000 images;
   flat memory means within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import worker  # noqa: E402
from m2cnn_tf import preprocessing as pp  # noqa: E402

KAGGLE_W, KAGGLE_H = 3888, 2592
SIZES = (224, 448, 720)


def kaggle_like(seed: int, width: int = KAGGLE_W, height: int = KAGGLE_H) -> np.ndarray:
    """The skimage retina photograph scaled to a Kaggle frame, varied per seed (BGR)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    retina = cv2.cvtColor(data.retina(), cv2.COLOR_RGB2BGR)
    d = int(height * rng.uniform(0.95, 1.05))  # some discs are cut at top and bottom
    disc = cv2.resize(retina, (d, d), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        disc = disc[:, ::-1]
    disc = cv2.convertScaleAbs(disc, alpha=rng.uniform(0.7, 1.2), beta=rng.uniform(-10, 10))
    canvas = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - d) // 2, (height - d) // 2
    sy0, dy0 = max(0, -y0), max(0, y0)
    rows = min(d - sy0, height - dy0)
    canvas[dy0 : dy0 + rows, x0 : x0 + d] = disc[sy0 : sy0 + rows]
    noise = rng.normal(0, 2.0, canvas.shape).astype(np.float32)  # sensor noise
    return cv2.add(canvas, noise, dtype=cv2.CV_8U)


def write_kaggle_dir(root: Path, n: int, width: int, height: int, quality: int) -> Path:
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = ["image,level"]
    base = None
    for i in range(n):
        name = f"{i // 2 + 1}_{'left' if i % 2 == 0 else 'right'}"
        if width == KAGGLE_W or base is None:
            base = kaggle_like(i, width, height)
        img = base if width == KAGGLE_W else np.roll(base, i, axis=1)  # cheap variation
        cv2.imwrite(str(root / "train" / f"{name}.jpeg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        lines.append(f"{name},{i % 5}")
    (root / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    return root


def copies_dir(src: Path, root: Path, n: int) -> Path:
    """n images in the Kaggle layout, cycling through src's files (decoding cost stays real)."""
    (root / "train").mkdir(parents=True)
    files = sorted((src / "train").glob("*.jpeg"))
    lines = ["image,level"]
    for i in range(n):
        name = f"{i // 2 + 1}_{'left' if i % 2 == 0 else 'right'}"
        os.link(files[i % len(files)], root / "train" / f"{name}.jpeg")
        lines.append(f"{name},{i % 5}")
    (root / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Per-image pipelines


def decode_floor(path: str) -> None:
    cv2.imread(path, cv2.IMREAD_REDUCED_COLOR_2)


def ours(path: str) -> None:
    result = worker.encode_image(path)
    assert isinstance(result, dict), result


def ours_no_encode(path: str) -> None:
    pp.preprocess_bgr_file(path, pp.PreprocessParams())


def naive(path: str) -> None:
    rgb = np.asarray(Image.open(path).convert("RGB"))  # full resolution
    params = pp.PreprocessParams(mask=True)
    square = pp.crop_to_square(rgb, params.base_size)
    blurred = pp.gaussian_blur(square, params.rho, fast=False)  # exact Eq. (1)
    out = cv2.addWeighted(square, params.alpha, blurred, params.beta, params.gamma, dtype=cv2.CV_8U)
    out[~pp.circular_mask(params.base_size, params.mask_fraction)] = 128
    bgr = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
    for s in SIZES:
        small = cv2.resize(bgr, (s, s), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])


def time_pipelines(paths: list[str], rounds: int) -> dict[str, float]:
    """Median seconds per image; pipelines interleaved per file so machine load hits all alike."""
    pipelines = {
        "(a) decode floor": decode_floor,
        "ours": ours,
        "  ours, no encodes": ours_no_encode,
        "(b) naive": naive,
    }
    for fn in pipelines.values():  # warm caches and lazy imports
        fn(paths[0])
    times: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(rounds):
        for p in paths:
            for name, fn in pipelines.items():
                t = time.perf_counter()
                fn(p)
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# End to end and memory


def run_converter(src: Path, out: Path, extra: list[str]) -> tuple[dict, float, float]:
    """(manifest, peak RSS of the whole process tree in MB, of the parent alone in MB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "data_prep.kaggle", "--kaggle-dir", str(src), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress", *extra], env=env, cwd=REPO, stdout=subprocess.DEVNULL
    )
    parent = psutil.Process(proc.pid)
    peak_tree = peak_parent = 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            rss = [p.memory_info().rss for p in tree]
            peak_tree, peak_parent = max(peak_tree, sum(rss)), max(peak_parent, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed with exit code {proc.returncode}")
    return json.loads((out / "manifest.json").read_text()), peak_tree / 1e6, peak_parent / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16, help="Kaggle-size JPEGs to time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--e2e-images", type=int, default=240, help="images for the end-to-end run")
    ap.add_argument("--quality", type=int, default=92, help="JPEG quality of the inputs")
    ap.add_argument("--rss-small", type=int, default=200)
    ap.add_argument("--rss-large", type=int, default=2000)
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()

    cv2.setNumThreads(1)  # per worker: each pipeline on one core
    settings = worker.Settings(sizes=SIZES, params=pp.PreprocessParams())
    worker.init_worker(settings, in_process=True)
    print(f"machine: {os.cpu_count()} cores, {platform_line()}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_kaggle_dir(tmp / "kaggle", args.images, KAGGLE_W, KAGGLE_H, args.quality)
        paths = sorted(str(p) for p in (src / "train").glob("*.jpeg"))
        mb = np.mean([os.path.getsize(p) for p in paths]) / 1e6
        print(f"inputs: {len(paths)} JPEGs {KAGGLE_W}×{KAGGLE_H} q{args.quality}, {mb:.2f} MB each")
        t = time_pipelines(paths, args.rounds)
        print(f"\nper image, one worker (median of {len(paths) * args.rounds}):")
        print(f"{'pipeline':<20}{'ms/img':>9}{'img/s':>8}{'vs (a)':>9}{'(b) / x':>9}")
        for name, sec in t.items():
            ratio_a = sec / t["(a) decode floor"]
            ratio_b = t["(b) naive"] / sec
            print(f"{name:<20}{sec * 1e3:>9.1f}{1 / sec:>8.1f}{ratio_a:>8.2f}×{ratio_b:>8.2f}×")
        print(
            f"targets: ours ≤ 1.50× (a): {t['ours'] / t['(a) decode floor']:.2f}×; "
            f"ours ≥ 3× faster than (b): {t['(b) naive'] / t['ours']:.2f}×"
        )

        e2e = copies_dir(src, tmp / "e2e", args.e2e_images)
        manifest, tree, parent = run_converter(e2e, tmp / "out", ["--sizes", "224,448,720"])
        tm = manifest["timings"]
        print(
            f"\nend to end, data_prep.kaggle --workers {tm['workers']} on {args.e2e_images} "
            f"of these images: {tm['this_run_images_per_second']:.1f} img/s in total "
            f"(pool start-up and size pilot included; peak RSS {tree:.0f} MB)"
        )
        for size, shards in manifest["shards"].items():
            per = sum(s["bytes"] for s in shards) / manifest["counts"]["train"]["records"]
            print(f"  {size:>4} px: {per / 1e3:.0f} kB per image")

        if not args.no_rss:
            print("\npeak RSS, whole conversion tree (sizes 224,448,720; 512×384 inputs):")
            rows = []
            for n in (args.rss_small, args.rss_large):
                small = write_kaggle_dir(tmp / f"rss{n}", n, 512, 384, 90)
                _, tree, parent = run_converter(small, tmp / f"rss_out{n}", ["--shard-mb", "20"])
                rows.append((n, tree, parent))
                print(f"  {n:>5} images: tree {tree:7.0f} MB, parent {parent:6.0f} MB")
            growth = rows[1][1] / rows[0][1] - 1
            print(f"  growth {args.rss_small} → {args.rss_large}: {growth:+.1%} (target ≤ +10%)")


def platform_line() -> str:
    import platform

    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.processor() or platform.machine()}, {mem:.0f} GiB RAM, no GPU used"


if __name__ == "__main__":
    main()
