"""Paper scale on the CPU: the M²CNN chain with the paper preset, 224 -> 448 -> 720, 2 steps each.

    python benchmarks/paper_smoke.py [--data data/demo/records] [--out runs/paper-smoke]
        [--batch 2] [--measure-only] [--preset paper] [--sizes 224,448,720]

Per stage it trains `train.py --stage N --preset paper --weights none` for 2 steps of the given
batch on DATA (the demo records at 224/448/720: `make demo`'s first two steps), each stage in
its own process, and prints:
- seconds per train step of the real graph (forward, Eq. (4), gradients) at that batch;
- the peak RSS of the train.py process (os.wait4);
- the size of the stage's best.keras;
- the memory the real graph's train step needs per image, and the part that does not grow with
  the batch, from TensorFlow's allocator statistics (reproduce.footprint.measure, float32);
- the GPU memory that reproduce.footprint derives for the protocol's batch with mixed precision.
--measure-only skips the training and measures every (preset, size, Multi-Cell path) that
footprint.MEASURED holds, printing its lines. --preset and --sizes shrink the chain (a test runs
it with the nano preset on small records); the defaults are the paper's. Each measurement runs
after the training, all in one process of their own (TensorFlow starts once): each reads the
allocator's peak above what was in use before its step, so one measurement does not inflate the
next. Not a test: expect 20-40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from m2cnn_tf.reproduce import footprint, protocol  # noqa: E402  (after sys.path)

STAGES = ((1, 224, "small"), (2, 448, "medium"), (3, 720, "large"))
# argv: batch, then (preset, size, multi_cell 0/1) triples; one JSON line per triple.
MEASURE = (
    "import json, sys; from m2cnn_tf.reproduce import footprint; b = int(sys.argv[1]); "
    "specs = [sys.argv[i:i + 3] for i in range(2, len(sys.argv), 3)]\n"
    "for p, s, mc in specs:\n"
    "    f, sec = footprint.measure(p, int(s), mc == '1', (b // 2 or 1, b))\n"
    "    print(json.dumps({'params': f.params, 'per_image': f.per_image, "
    "'step_fixed': f.step_fixed, 'seconds_per_step': sec}), flush=True)"
)


def _child(command: list[str], **env_vars: str) -> tuple[int, float, float, str]:
    """Run a child process: (exit code, wall seconds, peak RSS in MB, its stdout)."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - start, usage.ru_maxrss / 1024, out


def measure(specs: list[tuple[str, int, bool]], batch: int) -> list[dict]:
    """footprint.measure of each (preset, size, Multi-Cell) in one child process, in order.

    With oneDNN on: its CPU allocator keeps the statistics `measure` reads. TensorFlow turns
    oneDNN on by itself only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX (where MEASURED was
    taken); on others (AVX2, say) the default allocator keeps none."""
    args = [str(v) for p, size, mc in specs for v in (p, size, "1" if mc else "0")]
    command = [sys.executable, "-c", MEASURE, str(batch), *args]
    code, _, _, out = _child(command, TF_ENABLE_ONEDNN_OPTS="1")
    if code != 0:
        raise SystemExit(f"paper_smoke: measuring {specs} failed (exit {code})")
    return [json.loads(line) for line in out.strip().splitlines()[-len(specs) :]]


def train_stage(
    stage: int, data: str, out: str, batch: int, preset: str = "paper", size: int = 0
) -> dict:
    """train.py for 2 steps of stage `stage` (at `size` px, 0: the preset's size for it)."""
    command = [
        *(sys.executable, str(ROOT / "train.py"), "--stage", str(stage), "--data", data),
        *("--model-dir", out, "--preset", preset, "--weights", "none", "--epochs", "1"),
        *(("--image-size", str(size)) if size else ()),
        *("--steps-per-epoch", "2", "--batch-size", str(batch), "--seed", "0", "--noresume"),
    ]
    code, seconds, rss_mb, _ = _child(command)
    if code != 0:
        raise SystemExit(f"paper_smoke: stage {stage} failed (train.py exit {code})")
    best = Path(out) / f"stage{stage}" / "best.keras"
    return {"seconds": seconds, "peak_rss_mb": rss_mb, "checkpoint_mb": best.stat().st_size / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/demo/records")
    p.add_argument("--out", default="runs/paper-smoke")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--measure-only", action="store_true")
    p.add_argument("--preset", default="paper", help="the presets of m2cnn_tf.config")
    p.add_argument("--sizes", default=",".join(str(s) for _, s, _ in STAGES),
                   help="stage 1, 2, 3 sizes (records at each in DATA/<size>/)")  # fmt: skip
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: not integers: {args.sizes}")
    if len(sizes) != len(STAGES):
        p.error(f"--sizes: need {len(STAGES)} sizes, got {args.sizes}")
    if args.measure_only:
        specs = [(p, size, path != "small") for p, size, path in footprint.MEASURED]
        for (preset, size, path), m in zip(footprint.MEASURED, measure(specs, 2), strict=True):
            print(
                f'    ("{preset}", {size}, "{path}"): Footprint({m["params"]:_}, '
                f"{m['per_image'] / 1e6:.1f} * MB, {m['step_fixed'] / 1e6:.1f} * MB),",
                flush=True,
            )
        return 0
    batch16 = protocol.TRAIN_SETTINGS["batch_size"].value
    head = f"stage  size  s/step (CPU, batch {args.batch})  peak RSS  best.keras  "
    print(f"{head}train step per image (fp32)  + fixed  GPU est. (batch {batch16}, mixed)")
    trained = [
        train_stage(stage, args.data, args.out, args.batch, args.preset, size)
        for (stage, _, _), size in zip(STAGES, sizes, strict=True)
    ]
    measured = measure([(args.preset, size, True) for size in sizes], args.batch)
    for (stage, _, _), size, t, m in zip(STAGES, sizes, trained, measured, strict=True):
        found = footprint.Footprint(m["params"], m["per_image"], m["step_fixed"])
        gpu = tuple(b / footprint.GB for b in footprint.gpu_bytes(found, batch16, True))
        print(
            f"{stage:5d}  {size:4d}  {m['seconds_per_step']:21.2f}  "
            f"{t['peak_rss_mb']:6.0f} MB  {t['checkpoint_mb']:7.0f} MB  "
            f"{m['per_image'] / 1e6:23.0f} MB  {m['step_fixed'] / 1e6:4.0f} MB  "
            f"{footprint.describe_gb(gpu)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
