"""Carry out a reproduction plan: train each run once, evaluate, and resume where it stopped.

Each run is one `training.run(config)` and each evaluation one `evaluation.run_evaluation`,
library calls in this process, one after the other, so TensorFlow loads once; their errors
propagate as they are (`errors.Interrupted`, `RunFailed`, `UsageError`) with the run's name
added, and the command line maps them to exit codes. A run is finished when its model
directory holds `reproduce.json` with `done`; then it is skipped. An unfinished run is started
again with the same config, and training resumes it from its own backup. A run that carries on a
shorter one (`continues`, Fig. 4's longer runs) starts as a copy of that run's finished
directory, so train.py resumes it from the shorter run's last epoch. An evaluation is done when
its report.json is newer than the run's checkpoint.

Time: while a run trains, a thread watches its epochs.csv and records the wall time at which
each epoch's row appears, counted from the start of each attempt (model building included),
added to the time of the epochs before it. Time lost in an interrupted epoch is not counted.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m2cnn_tf import checkpoints
from m2cnn_tf.backends import KerasModels
from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import Interrupted, M2cnnError, RunFailed
from m2cnn_tf.reports import REPORT
from m2cnn_tf.reproduce import protocol
from m2cnn_tf.reproduce.plan import Plan, PlannedEvaluation, PlannedRun, with_settings
from m2cnn_tf.sessions import fresh_session

STATE = "reproduce.json"  # in each run's model directory
CKPTS = ("best", "last")
POLL_SECONDS = 0.5

Log = Callable[[str], None]


def _in(name: str, call: Callable[[], Any]) -> Any:
    """`call()`, its library errors raised again with the run's name in front, then a fresh
    session for the next run (`sessions.fresh_session`: nothing of this one is kept)."""
    try:
        with fresh_session():
            return call()
    except M2cnnError as err:
        raise type(err)(f"{name}: {err}", setting=err.setting) from None


def load_state(run: PlannedRun) -> dict[str, Any]:
    path = Path(run.model_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else {"done": False, "seconds": {}}


def epoch_rows(csv_path: Path) -> dict[int, dict[str, str]]:
    """epochs.csv by 1-based epoch; the last row wins (a resumed epoch is written again)."""
    rows: dict[int, dict[str, str]] = {}
    if not csv_path.is_file():
        return rows
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = str(row.get("epoch", ""))
            if epoch.isdigit():
                rows[int(epoch) + 1] = row
    return rows


class EpochClock:
    """Records, in the run's reproduce.json, the wall seconds at the end of each epoch."""

    def __init__(self, run: PlannedRun, state: dict[str, Any]):
        self.run, self.state = run, state
        self.seconds: dict[str, float] = state.setdefault("seconds", {})
        self.offset = max(self.seconds.values(), default=0.0)
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> EpochClock:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()

    def _watch(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        new = [e for e in epoch_rows(self.run.epochs_csv()) if str(e) not in self.seconds]
        if new:
            now = self.offset + time.monotonic() - self.start
            self.seconds.update({str(e): round(now, 3) for e in new})
            save_state(self.run, self.state)


def save_state(run: PlannedRun, state: dict[str, Any]) -> None:
    atomic_write_json(Path(run.model_dir) / STATE, state)


def _start_from(source: PlannedRun, run: PlannedRun, log: Log) -> None:
    """A run that carries on `source` starts as a copy of its finished directory."""
    if not load_state(source).get("done"):
        raise RunFailed(f"{run.label} carries on {source.label}, which has not finished")
    target = Path(run.model_dir)
    partial = target.with_name(target.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source.model_dir, partial)
    state = load_state(source)
    atomic_write_json(partial / STATE, {"done": False, "seconds": state.get("seconds", {})})
    partial.rename(target)
    log(f"{run.label}: starts from a copy of {source.name} (its first {source.steps} steps)")


def runtime_settings(gpus: int) -> dict[str, Any]:
    """Settings for this machine, not part of the plan: mixed precision on a GPU (protocol),
    and every GPU when there are several (tf.distribute's mirrored strategy, whose BatchNorm
    is synchronised, so the global batch is the protocol's batch)."""
    found: dict[str, Any] = {}
    if gpus and protocol.MIXED_PRECISION.value:
        found["mixed_precision"] = True
    if gpus > 1:
        found["strategy"] = protocol.MULTI_GPU.value
    return found


def train(plan: Plan, run: PlannedRun, *, gpus: int, log: Log, tag: str = "") -> bool:
    """Train `run` unless it is done; True when it trained now."""
    state = load_state(run)
    if state.get("done"):
        log(f"{tag}{run.label}: done, skipped")
        return False
    if run.continues and not Path(run.model_dir).exists():
        source = plan.run(run.continues, run.seed)
        _start_from(source, run, log)
        state = load_state(run)
        if run.steps == source.steps:  # --steps-scale rounded both to the same count
            state["done"] = True
            save_state(run, state)
            return False
    from m2cnn_tf import training

    config = with_settings(run.config, runtime_settings(gpus))
    log(f"{tag}{run.label}: training (by hand: train.py {' '.join(run.train_args)})")
    Path(run.model_dir).mkdir(parents=True, exist_ok=True)
    with EpochClock(run, state):
        result = _in(f"run {run.label}", lambda: training.run(config, log=log))
    state["done"] = True
    save_state(run, state)
    if result["interrupted"]:  # Ctrl-C during its last step: recorded as done, then honoured
        raise Interrupted(f"run {run.label}: interrupted as it finished; rerun to carry on")
    return True


def evaluate(
    plan: Plan, evaluation: PlannedEvaluation, *, log: Log, models: KerasModels | None = None
) -> bool:
    """Evaluate unless its report is newer than the checkpoint it evaluates; True when it ran
    now. `models`: the Keras models built by the evaluations before it, to load into."""
    e = evaluation
    what = f"{plan.run(e.run, e.seed).label} on {e.split} ({e.checkpoint})"
    report = Path(e.out) / REPORT
    checkpoint = Path(plan.run(e.run, e.seed).checkpoint(e.checkpoint))
    fresh = checkpoint.is_file() and report.is_file()
    if fresh and report.stat().st_mtime >= checkpoint.stat().st_mtime:
        log(f"{what}: evaluated, skipped")
        return False
    if _same_as_last(plan, e, log):
        return True
    from m2cnn_tf import evaluation as evaluating

    log(f"{what}: evaluating (by hand: evaluate.py {' '.join(e.args)})")
    _in(
        f"evaluating {what}",
        lambda: evaluating.run_evaluation(
            e.model_dir, e.stage, e.data, e.split, e.out, fit_thresholds=e.thresholds == "fit",
            tta=e.tta, n_boot=e.bootstrap, checkpoint=e.checkpoint, log=log, models=models,
        ),
    )  # fmt: skip
    return True


def _same_as_last(plan: Plan, e: PlannedEvaluation, log: Log) -> bool:
    """When the best checkpoint is the last one (the same epoch: the same weights), its report
    is the last one's with the checkpoint record changed, not a second evaluation."""
    last = plan.evaluation(e.run, e.split, "last", e.seed)
    run = plan.run(e.run, e.seed)
    if e.checkpoint != "best" or last is None or not (Path(last.out) / REPORT).is_file():
        return False
    metas = [Path(run.checkpoint(w)).with_name(checkpoints.CHECKPOINTS[w][1]) for w in CKPTS]
    if not all(m.is_file() for m in metas):
        return False
    best, final = (json.loads(m.read_text()) for m in metas)
    if best.get("epoch") != final.get("epoch"):
        return False
    report = json.loads((Path(last.out) / REPORT).read_text())
    report["checkpoint"] = {**report["checkpoint"], "which": "best", "meta": best,
                            "path": str(Path(run.checkpoint("best")).resolve())}  # fmt: skip
    shutil.rmtree(e.out, ignore_errors=True)
    shutil.copytree(last.out, e.out)
    atomic_write_json(Path(e.out) / REPORT, report)
    log(f"{run.label} on {e.split} (best): the last checkpoint's epoch, its report reused")
    return True


def carry_out(plan: Plan, *, gpus: int, log: Log = print) -> dict[str, int]:
    """Train every run, then evaluate, one seed after the other (seed 0's tables are complete
    before seed 1 starts); returns how many of each ran now (not skipped)."""
    done = {"trained": 0, "evaluated": 0}
    for seed in range(plan.options.seeds):
        runs = [r for r in plan.runs if r.seed == seed]
        for i, run in enumerate(runs, 1):
            done["trained"] += train(plan, run, gpus=gpus, log=log, tag=f"[{i}/{len(runs)}] ")
        models = KerasModels()  # one network built per architecture, not per checkpoint
        for evaluation in (e for e in plan.evaluations if e.seed == seed):
            done["evaluated"] += evaluate(plan, evaluation, log=log, models=models)
    return done
