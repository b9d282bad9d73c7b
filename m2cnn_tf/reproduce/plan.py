"""Which runs and evaluations reproduce the chosen experiments, each as the typed arguments of
a library call (a training `Config`; `evaluation.run_evaluation`'s arguments): the plan that
`reproduce.py` writes to OUT/plan.json and then carries out (`runs`).

Every value comes from `protocol.py`; the options only pick experiments, scale the steps, map
the paper's sizes to others, and replace the batch size or the backbone weights. A run needed
by several cells (Table II's Multi-Task 224 is also Fig. 4's 224@20k and the start of M²CNN's
chain) is planned once. Runs are in an order where each comes after the runs it starts from.

Layout of OUT: `runs/<name>/` is each run's model directory (train.py --model-dir, with its one
stage folder), `reports/<name>-<split>-<checkpoint>/` each evaluation (evaluate.py --out),
`plan.json`, then the report (`report.py`). With `--seeds N`, seed s > 0 has the same layout
under `seeds/<s>/`. plan.json also gives each run and evaluation as the train.py / evaluate.py
command line that repeats it by hand. Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from m2cnn_tf import checkpoints
from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.config import (
    Config,
    ModelConfig,
    OptimConfig,
    flat_key,
    leaf_fields,
)
from m2cnn_tf.errors import UsageError
from m2cnn_tf.reproduce import figures, footprint, protocol
from m2cnn_tf.reproduce.options import WEIGHTS_CHOICES, Options

PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of the plan; plan.json's `runs` hold these fields."""

    name: str
    seed: int
    uses: tuple[str, ...]  # "table2: MSE scores 448", "fig4: 224@20k", "init of m2cnn448"
    loss: str
    multi_cell: bool
    nominal_size: int
    image_size: int
    init: str  # imagenet | none | PATH | run:<name>
    init_checkpoint: str | None  # which checkpoint of run:<name> it starts from: last | best
    steps: int  # from its init
    total_steps: int  # from the backbone weights, through the last checkpoints it starts from
    continues: str  # the finished run whose training this one carries on, or ""
    stage: int  # train.py --stage: 1 from the backbone, one more per run it starts from
    epochs: int
    steps_per_epoch: int
    batch_size: int
    model_dir: str
    est_gpu_memory_gb: tuple[float, float] | None  # (low, high): footprint.gpu_bytes
    est_hours: float | None  # of its own steps, at the paper's speed (footprint.paper_hours)
    config: Config  # what training.run trains (runs.runtime_settings added for this machine)
    train_args: tuple[str, ...]  # the same as train.py's flags, to repeat the run by hand

    @property
    def label(self) -> str:
        """How logs name the run: its protocol name, and its seed when it is not seed 0."""
        return self.name if self.seed == 0 else f"{self.name} (seed {self.seed})"

    def checkpoint(self, which: str) -> str:
        name = checkpoints.CHECKPOINTS[which][0]
        return str(checkpoints.stage_dir(self.model_dir, self.stage) / name)

    def epochs_csv(self) -> Path:
        return checkpoints.stage_dir(self.model_dir, self.stage) / "epochs.csv"


@dataclasses.dataclass(frozen=True)
class PlannedEvaluation:
    """One evaluation: `evaluation.run_evaluation`'s arguments, and its report folder `out`."""

    run: str
    seed: int
    split: str
    checkpoint: str  # last | best
    out: str  # the report folder (evaluate.py --out)
    model_dir: str
    stage: int
    data: str
    thresholds: str  # round | fit
    tta: str
    bootstrap: int
    args: tuple[str, ...]  # the same as evaluate.py's flags, to repeat it by hand


@dataclasses.dataclass(frozen=True)
class Plan:
    options: Options
    runs: tuple[PlannedRun, ...]
    evaluations: tuple[PlannedEvaluation, ...]

    def run(self, name: str, seed: int = 0) -> PlannedRun:
        return next(r for r in self.runs if r.name == name and r.seed == seed)

    def evaluation(
        self, run: str, split: str, checkpoint: str, seed: int = 0
    ) -> PlannedEvaluation | None:
        for e in self.evaluations:
            if (e.run, e.split, e.checkpoint, e.seed) == (run, split, checkpoint, seed):
                return e
        return None

    def to_json(self) -> dict[str, Any]:
        values = figures.tagged_values()
        return {
            "options": dataclasses.asdict(self.options),
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "evaluations": [dataclasses.asdict(e) for e in self.evaluations],
            "protocol": {k: dataclasses.asdict(v) for k, v in values.items()},
            "estimates": ESTIMATES_NOTE,
        }


ESTIMATES_NOTE = (
    "est_gpu_memory_gb: one GPU, mixed precision, derived from the train step's memory measured "
    "on the CPU with TensorFlow's allocator statistics (m2cnn_tf/footprint.py); est_hours: the "
    "run's own steps at the paper's speed (Fig. 4; 720 px scaled by forward FLOPs)"
)


def _needed(options: Options) -> dict[str, list[str]]:
    """Run name -> what it is used for, over the chosen experiments and the runs they start
    from, in the protocol's order (where each run comes after those it starts from)."""
    uses: dict[str, list[str]] = {}
    if "table2" in options.experiments:
        for size in protocol.SIZES.value:
            for column in figures.TABLE2_COLUMNS:
                name = figures.table2_run(column, size, options.ablation_init)
                if name:
                    uses.setdefault(name, []).append(f"table2: {column} {size}")
    if "table3" in options.experiments:
        for row in figures.TABLE3_ROWS:
            uses.setdefault(figures.table3_run(row, options.ablation_init), []).append(
                f"table3: {row}"
            )
    if "fig4" in options.experiments:
        for fig in figures.FIG4:
            uses.setdefault(fig.run, []).append(f"fig4: {fig.label}")
    needed = set(uses)
    for name in reversed(protocol.RUNS):  # later runs start from earlier ones
        if name in needed:
            needed.update(_sources(protocol.RUNS[name]).values())
    for name in protocol.RUNS:
        for how, source in _sources(protocol.RUNS[name]).items() if name in needed else ():
            uses.setdefault(source, []).append(f"{how} of {name}")
            if how == "first steps":
                uses.setdefault(name, []).append(f"carries on {source}")
    return {name: uses[name] for name in protocol.RUNS if name in needed}


def _sources(run: protocol.Run) -> dict[str, str]:
    """The runs a run needs finished: {"init": name, "first steps": name}."""
    found = {}
    if run.init.startswith(protocol.RUN_PREFIX):
        found["init"] = run.init.removeprefix(protocol.RUN_PREFIX)
    if run.continues:
        found["first steps"] = run.continues
    return found


def steps_per_epoch(options: Options) -> int:
    """Validate every VALIDATE_EVERY steps, scaled, and at the end of every run: the greatest
    common divisor of the scaled interval and every run's scaled steps (of the whole protocol,
    so that the choice of experiments does not change a run)."""
    scaled = [options.steps(r.steps.value) for r in protocol.RUNS.values()]
    return math.gcd(options.steps(protocol.VALIDATE_EVERY.value), *scaled)


def make_plan(options: Options) -> Plan:
    """The runs and evaluations of the chosen experiments (see the module docstring), for
    every seed: seed 0's runs first, then seed 1's, ..."""
    options.check()
    if options.weights not in WEIGHTS_CHOICES:  # a file: the same run from any folder
        options = dataclasses.replace(options, weights=str(Path(options.weights).resolve()))
    out, data = Path(options.out).resolve(), str(Path(options.data).resolve())
    runs: list[PlannedRun] = []
    evaluations: list[PlannedEvaluation] = []
    for seed in range(options.seeds):
        planned = _seed_runs(options, seed, seed_dir(out, seed), data)
        runs += planned.values()
        evaluations += _evaluations(options, planned, data, seed_dir(out, seed))
    return Plan(options, tuple(runs), tuple(evaluations))


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed `seed`'s runs and reports go: OUT itself for seed 0, else OUT/seeds/<seed>."""
    return out if seed == 0 else out / "seeds" / str(seed)


def _seed_runs(options: Options, seed: int, out: Path, data: str) -> dict[str, PlannedRun]:
    every = steps_per_epoch(options)
    planned: dict[str, PlannedRun] = {}
    for name, uses in _needed(options).items():
        spec = protocol.RUNS[name]
        parent = spec.init.removeprefix(protocol.RUN_PREFIX)
        start = planned.get(parent) if spec.init.startswith(protocol.RUN_PREFIX) else None
        steps, size = options.steps(spec.steps.value), options.size(spec.size)
        before = planned[spec.continues].steps if spec.continues else 0
        run = PlannedRun(
            name=name,
            seed=seed,
            uses=tuple(uses),
            loss=spec.loss,
            multi_cell=spec.multi_cell,
            nominal_size=spec.size,
            image_size=size,
            init=f"{protocol.RUN_PREFIX}{parent}" if start else options.weights,
            init_checkpoint=options.checkpoint if start else None,
            steps=steps,
            total_steps=steps + (start.total_steps if start else 0),
            continues=spec.continues,
            stage=start.stage + 1 if start else 1,
            epochs=steps // every,
            steps_per_epoch=every,
            batch_size=options.batch_size,
            model_dir=str(out / "runs" / name),
            est_gpu_memory_gb=footprint.gpu_memory_gb(
                options.preset,
                size,
                spec.multi_cell,
                options.batch_size,
                mixed_precision=protocol.MIXED_PRECISION.value,
            ),
            est_hours=_hours(options, spec, steps - before),
            config=Config(),
            train_args=(),
        )
        config = _run_config(options, run, data, start)
        planned[name] = dataclasses.replace(run, config=config, train_args=command_line(config))
    return planned


def _run_config(options: Options, run: PlannedRun, data: str, start: PlannedRun | None) -> Config:
    """The run's training Config: every protocol setting given, no default relied on."""
    model = ModelConfig(
        preset=options.preset,
        multi_cell=run.multi_cell,
        **(
            {"init": start.checkpoint(options.checkpoint)}
            if start
            else {"weights": options.weights}
        ),
    )
    optim = OptimConfig(
        loss=run.loss,
        epochs=run.epochs,
        steps_per_epoch=run.steps_per_epoch,
        batch_size=options.batch_size,
    )
    config = Config(
        stage=run.stage, data=data, model_dir=run.model_dir, image_size=run.image_size,
        model=model, optim=optim,
    )  # fmt: skip
    shared = {k: v.value for k, v in protocol.TRAIN_SETTINGS.items()}
    shared.pop("preset"), shared.pop("batch_size")  # the options' own
    shared["seed"] += run.seed  # seed s of --seeds N: the protocol's seed + s
    return with_settings(config, shared)


def with_settings(config: Config, values: dict[str, Any]) -> Config:
    """`config` with settings replaced by their flat names (`lr_new`, `mixed_precision`)."""
    where = {flat_key(f): (section, f.name) for section, f in leaf_fields()}
    for key, value in values.items():
        section, name = where[key]
        if section is None:
            config = dataclasses.replace(config, **{name: value})
        else:
            changed = dataclasses.replace(getattr(config, section), **{name: value})
            config = dataclasses.replace(config, **{section: changed})
    return config


def command_line(config: Config) -> tuple[str, ...]:
    """train.py's flags that give `config` (`--batch-size=16`, `--nomulti-cell`), every
    setting spelled out: how a run is repeated by hand (plan.json's `train_args`)."""
    args = []
    for section, f in leaf_fields():
        value = getattr(config if section is None else getattr(config, section), f.name)
        name = flat_key(f).replace("_", "-")
        if not f.metadata["flag"] or value is None:
            continue
        args.append((f"--{name}" if value else f"--no{name}") if isinstance(value, bool)
                    else f"--{name}={value}")  # fmt: skip
    return tuple(args)


def _hours(options: Options, spec: protocol.Run, trained: int) -> float | None:
    """The hours of the steps a run trains itself (a run that carries on another trains only
    the steps beyond it), at the paper's speed; estimated for the paper preset only."""
    if options.preset != "paper":
        return None
    return footprint.paper_hours(options.size(spec.size), spec.multi_cell, trained, spec.size)


def _evaluations(
    options: Options, runs: dict[str, PlannedRun], data: str, out: Path
) -> list[PlannedEvaluation]:
    """Each cell's run on its split with the chosen checkpoint, and with best-on-val beside it
    when that is another; Table II's on val, Table III's on val and test; Fig. 4's runs on val
    for its paired comparisons (its curves read each run's own validations). Each once."""
    cells: list[tuple[str, str]] = []
    if "table2" in options.experiments:
        for size in protocol.SIZES.value:
            for column in figures.TABLE2_COLUMNS:
                name = figures.table2_run(column, size, options.ablation_init)
                cells += [(name, split) for split in protocol.EVAL_SPLITS["table2"].value if name]
    if "table3" in options.experiments:
        for row in figures.TABLE3_ROWS:
            name = figures.table3_run(row, options.ablation_init)
            cells += [(name, split) for split in protocol.EVAL_SPLITS["table3"].value]
    shown = dict.fromkeys([options.checkpoint, "best"])  # the cells', and best-on-val beside
    wanted = {(n, s, c): None for n, s in cells for c in shown}
    if "fig4" in options.experiments:
        wanted |= {(f.run, "val", options.checkpoint): None for f in figures.FIG4}
    settings = {key: value.value for key, value in protocol.EVALUATION.items()}
    found = []
    for name, split, which in wanted:
        run, report = runs[name], out / "reports" / f"{name}-{split}-{which}"
        args = [
            *("--model-dir", run.model_dir, "--stage", str(run.stage), "--data", data),
            *("--split", split, "--checkpoint", which, "--out", str(report)),
        ]
        args += [f"--{key}={value}" for key, value in settings.items()]
        evaluation = PlannedEvaluation(
            name, run.seed, split, which, str(report), run.model_dir, run.stage, data,
            **settings, args=tuple(args),
        )  # fmt: skip
        found.append(evaluation)
    return found


def missing_records(plan: Plan) -> list[str]:
    """The record shards the plan reads that OUT/<size>/ lacks (data_prep's layout)."""
    needed = {(r.image_size, split) for r in plan.runs for split in ("train", "val")}
    needed |= {(plan.run(e.run, e.seed).image_size, e.split) for e in plan.evaluations}
    data = Path(plan.options.data)
    return [
        str(data / str(size) / f"{split}-*.tfrecord")
        for size, split in sorted(needed)
        if not any((data / str(size)).glob(f"{split}-*-of-*.tfrecord"))
    ]


def save_plan(plan: Plan) -> Path:
    """Write OUT/plan.json, refusing to change a run that an earlier plan in the same folder
    already holds (its results would no longer match)."""
    out = Path(plan.options.out)
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        before = {(r["name"], r.get("seed")): r.get("config") for r in old.get("runs", [])}
        for run in plan.runs:
            now = dataclasses.asdict(run.config)
            key = (run.name, run.seed)
            if key in before and before[key] != now:
                raise UsageError(
                    f"{out} holds a plan whose run {run.label} was trained differently "
                    f"({_difference(before[key], now)}); give the same options as before, "
                    "or another output folder",
                    setting="out",
                )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan.to_json())
    return path


def _difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """The first setting whose value differs, as `--flag old -> new`."""
    old = old or {}
    for section, f in leaf_fields():
        where_old = old if section is None else old.get(section) or {}
        where_new = new if section is None else new.get(section) or {}
        was, now = where_old.get(f.name), where_new.get(f.name)
        if was != now:
            return f"--{flat_key(f).replace('_', '-')} {was} -> {now}"
    return "the settings differ"
