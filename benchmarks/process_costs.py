"""What a TensorFlow process pays that is not its work: the collector while it imports, and
what each finished fit leaves behind.

1. Import: fresh processes run `from m2cnn_tf import training, evaluation` as the commands
   import it (`common.importing`: the cyclic collector off, then the objects frozen) and with
   the collector on, alternating; each reports its CPU time and the collections it ran.
2. Fits in one process (reproduce.py's case): a dense model of `--params` parameters fitted
   with Adam `--fits` times, each followed by `keras.backend.clear_session()` alone, or inside
   `sessions.fresh_session()`; the process's resident memory after each fit.

    python benchmarks/process_costs.py [--rounds 4] [--fits 5] [--params 10000000]

Results and the machine: benchmarks/README.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 4, "Fresh processes per import mode.")
flags.DEFINE_integer("fits", 5, "Fits per process.")
flags.DEFINE_integer("params", 10_000_000, "Parameters of the fitted model (Adam adds 2x).")

IMPORT = """
import gc, json, sys, time
from m2cnn_tf import common
runs = []
gc.callbacks.append(lambda phase, info: runs.append(1) if phase == "start" else None)
start = time.process_time()
if sys.argv[1] == "importing":
    with common.importing():
        from m2cnn_tf import training, evaluation
else:
    from m2cnn_tf import training, evaluation
print(json.dumps({"cpu": time.process_time() - start, "collections": len(runs)}))
"""

FITS = """
import json, sys
import keras, numpy as np
from m2cnn_tf.sessions import fresh_session

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6

mode, fits, params = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
width = params // 2000
x = np.random.default_rng(0).random((8, 2000), "float32")
y = np.zeros((8, 1), "float32")

def fit():
    model = keras.Sequential([keras.Input((2000,)), keras.layers.Dense(width),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)

sizes = []
for _ in range(fits):
    if mode == "fresh_session":
        with fresh_session():
            fit()
    else:
        fit()
        keras.backend.clear_session()
    sizes.append(rss_mb())
print(json.dumps({"rss_mb": sizes}))
"""


def _run(script: str, *args: str) -> dict:
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    cpu: dict[str, list[float]] = {"importing": [], "collector on": []}
    collections: dict[str, int] = {}
    for _ in range(FLAGS.rounds):
        for mode in cpu:
            found = _run(IMPORT, mode)
            cpu[mode].append(found["cpu"])
            collections[mode] = found["collections"]
    print(f"1. import of training and evaluation, {FLAGS.rounds} fresh processes each:")
    for mode, times in cpu.items():
        print(f"   {mode:13s} median {statistics.median(times):.2f} CPU-s "
              f"({min(times):.2f}-{max(times):.2f}), {collections[mode]} collections")  # fmt: skip
    ratio = statistics.median(cpu["importing"]) / statistics.median(cpu["collector on"])
    print(f"   importing / collector on: {ratio:.2f}x the CPU")

    print(f"2. {FLAGS.fits} fits of a {FLAGS.params / 1e6:g}M-parameter model in one process:")
    growth = {}
    for mode in ("clear_session", "fresh_session"):
        sizes = _run(FITS, mode, str(FLAGS.fits), str(FLAGS.params))["rss_mb"]
        growth[mode] = (sizes[-1] - sizes[0]) / (len(sizes) - 1)
        print(f"   {mode:13s} RSS after each fit: {', '.join(f'{s:.0f}' for s in sizes)} MB; "
              f"{growth[mode]:+.0f} MB per fit after the first")  # fmt: skip
    weights = FLAGS.params * 4 * 3 / 1e6
    print(f"   the weights and Adam's two slots: {weights:.0f} MB per fit")


if __name__ == "__main__":
    app.run(main)
