"""Grading throughput and latency through serve.py, against predict.py's batch path (issue 10).

1. Single-request latency: one client, one photograph per request, one after another.
2. 16 concurrent clients, one photograph per request: images/s, p50 and p95 latency, and
   /healthz's latency meanwhile (polled every 50 ms while the batches compute).
3. predict.py's batch throughput on the same files and model (`Predictor.rows` -> CSV, batch
   16, its preprocessing threads), in this process while the server idles.
Every path starts from the JPEG files, so decoding and preprocessing are included. Targets:
server throughput >= 0.8 × predict.py's; p95 at 16 clients <= 3 × the single-request latency.

    python benchmarks/bench_serve.py [--model-dir DIR --stage N | --size 224 --preset tiny]
        [--images 32] [--requests 160] [--clients 16] [--max-batch 8] [--max-wait-ms 20]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np

from benchmarks.bench_predict import kaggle_like_jpeg

ROOT = Path(__file__).resolve().parents[1]


def start_server(model_dir: Path, stage: int, args, log: Path) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, str(ROOT / "serve.py"), "--model-dir", str(model_dir), "--stage",
        str(stage), "--port", "0", "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms),
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"serving stage \d on (http://\S+?)/ ", log.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"serve.py did not start:\n{log.read_text(errors='replace')[-2000:]}")


def post(client: httpx.Client, path: Path) -> float:
    start = time.perf_counter()
    response = client.post("/v1/grade", files=[("files", (path.name, path.read_bytes()))])
    response.raise_for_status()
    assert response.json()["results"][0]["error"] is None
    return time.perf_counter() - start


def bench_single(url: str, files: list[Path], n: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as client:
        post(client, files[0])  # warm: connection, first-request paths
        return [post(client, files[i % len(files)]) for i in range(n)]


def bench_concurrent(url: str, files: list[Path], requests: int, clients: int):
    """(seconds, per-request latencies, /healthz latencies meanwhile)."""
    pool = [httpx.Client(base_url=url, timeout=600, trust_env=False) for _ in range(clients)]
    health: list[float] = []
    done = threading.Event()

    def poll_health():
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            while not done.wait(0.05):
                start = time.perf_counter()
                client.get("/healthz").raise_for_status()
                health.append(time.perf_counter() - start)

    def client_loop(c: int) -> list[float]:
        return [post(pool[c], files[i % len(files)]) for i in range(c, requests, clients)]

    watcher = threading.Thread(target=poll_health)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        latencies = [t for ts in executor.map(client_loop, range(clients)) for t in ts]
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    for client in pool:
        client.close()
    return seconds, latencies, health


def bench_predict(model_dir: Path, stage: int, files: list[Path], repeats: int) -> float:
    """Best-of-N seconds of predict.py's path over the files."""
    from m2cnn_tf import checkpoints, manifest, prediction

    model, _ = checkpoints.load_stage(model_dir, stage)
    params, _ = manifest.preprocess_params_for(model_dir, stage)
    predictor = prediction.Predictor(model, params, batch_size=16)
    list(predictor.rows(files[:16]))  # warm-up: tracing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        prediction.write_rows(predictor.rows(files), io.StringIO())
        best = min(best, time.perf_counter() - start)
    return best


def build_model(root: Path, size: int, preset: str) -> Path:
    from m2cnn_tf.checkpoints import save_checkpoint, stage_dir
    from m2cnn_tf.model import build_m2cnn

    model_dir = root / "models"
    meta = {"stage": 1, "resolution": size, "preset": preset}
    save_checkpoint(build_m2cnn(size, preset=preset), stage_dir(model_dir, 1), meta)
    return model_dir


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a trained model (default: build one)")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="built model's resolution")
    parser.add_argument("--preset", default="tiny", help="built model's preset")
    parser.add_argument("--images", type=int, default=32, help="distinct photographs")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--single", type=int, default=10, help="single requests timed")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import tensorflow as tf

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TF {tf.__version__}, GPUs: {len(tf.config.list_physical_devices('GPU'))}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model_dir or build_model(root, args.size, args.preset)
        stage = args.stage if args.model_dir else 1
        files = []
        for i in range(args.images):  # 2048×1536 JPEGs, about a fundus camera's output
            files.append(root / f"photo_{i:03d}.jpeg")
            kaggle_like_jpeg(files[-1], 2048, 1536)
        process, url = start_server(model_dir, stage, args, root / "server.log")
        try:
            facts = httpx.get(f"{url}/v1/model", trust_env=False).json()
            print(f"model: stage {facts['stage']}, {facts['resolution']} px, preset "
                  f"{facts['preset']}; server --max-batch {args.max_batch} --max-wait-ms "
                  f"{args.max_wait_ms:g}; {args.images} photographs 2048×1536 JPEG")  # fmt: skip
            single = bench_single(url, files, args.single)
            before = httpx.get(f"{url}/v1/model", trust_env=False).json()["serving"]
            seconds, latencies, health = bench_concurrent(url, files, args.requests, args.clients)
            after = httpx.get(f"{url}/v1/model", trust_env=False).json()["serving"]
        finally:
            process.terminate()
            process.wait(60)
        t_predict = bench_predict(model_dir, stage, files, args.repeats)

    served = args.requests / seconds
    batch = len(files) / t_predict
    p50, p95 = np.percentile(latencies, [50, 95])
    one = float(np.median(single))
    print(f"\nsingle request (1 client, {args.single} requests): p50 {ms(one)}")
    print(f"{args.clients} clients, {args.requests} single-photo requests: {served:.2f} img/s, "
          f"p50 {ms(p50)}, p95 {ms(p95)}")  # fmt: skip
    calls = after["model_calls"] - before["model_calls"]
    fill = (after["images_graded"] - before["images_graded"]) / max(1, calls)
    print(f"  {calls} model calls, {fill:.1f} photographs per call of {args.max_batch}")
    print(f"/healthz meanwhile ({len(health)} polls): p95 {ms(np.percentile(health, 95))}, "
          f"max {ms(max(health))}")  # fmt: skip
    print(f"predict.py batch path ({len(files)} files, batch 16): {batch:.2f} img/s")
    ok_rate, ok_tail = served >= 0.8 * batch, p95 <= 3 * one
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| throughput, server / predict.py | {served / batch:.2f}× | ≥ 0.8× "
          f"{'(met)' if ok_rate else '(MISSED)'} |")  # fmt: skip
    print(f"| p95 at {args.clients} clients / single p50 | {p95 / one:.2f}× | ≤ 3× "
          f"{'(met)' if ok_tail else '(MISSED)'} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
