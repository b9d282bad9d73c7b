"""Which runs and evaluations reproduce the chosen experiments, as train.py / evaluate.py
command lines: the plan that `reproduce.py` writes to OUT/plan.json and then carries out.

Every value comes from `protocol.py`; the options only pick experiments, scale the steps, map
the paper's sizes to others, and replace the batch size or the backbone weights. A run needed
by several cells (Table II's Multi-Task 224 is also Fig. 4's 224@20k and the start of M²CNN's
chain) is planned once. Runs are in an order where each comes after the runs it starts from.

Layout of OUT: `runs/<name>/` is each run's model directory (train.py --model-dir, with its one
stage folder), `reports/<name>-<split>/` each evaluation (evaluate.py --out), `plan.json`,
then the report (`reproduction_report.py`). Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from m2cnn_tf import footprint, protocol
from m2cnn_tf.common import BEST_MODEL, atomic_write_json, stage_dir
from m2cnn_tf.config import MIN_IMAGE_SIZE, PRESETS, multi_cell_path
from m2cnn_tf.errors import UsageError

PLAN = "plan.json"
WEIGHTS_CHOICES = ("imagenet", "none")  # or a path (train.py --weights)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user chose; the defaults reproduce every experiment as the protocol says."""

    data: str
    out: str
    experiments: tuple[str, ...] = protocol.EXPERIMENTS
    preset: str = protocol.TRAIN_SETTINGS["preset"].value
    batch_size: int = protocol.TRAIN_SETTINGS["batch_size"].value
    steps_scale: float = 1.0
    weights: str = "imagenet"
    sizes: tuple[int, ...] = protocol.SIZES.value
    ablation_init: str = "imagenet"

    def check(self) -> None:
        """A UsageError naming the setting, before any work."""
        unknown = [e for e in self.experiments if e not in protocol.EXPERIMENTS]
        if unknown or not self.experiments:
            raise UsageError(
                f"choose from {', '.join(protocol.EXPERIMENTS)}, got {','.join(self.experiments)}",
                setting="experiments",
            )
        if self.preset not in PRESETS:
            raise UsageError(f"choose one of {', '.join(PRESETS)}", setting="preset")
        if self.batch_size < 1:
            raise UsageError(f"must be positive, got {self.batch_size}", setting="batch_size")
        if not (self.steps_scale > 0 and math.isfinite(self.steps_scale)):
            raise UsageError(f"must be positive, got {self.steps_scale}", setting="steps_scale")
        if self.ablation_init not in protocol.ABLATION_INITS:
            raise UsageError(
                f"choose one of {', '.join(protocol.ABLATION_INITS)}", setting="ablation_init"
            )
        if self.weights not in WEIGHTS_CHOICES and not Path(self.weights).is_file():
            raise UsageError(
                f"{self.weights!r} is neither imagenet, none nor a file", setting="weights"
            )
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Three sizes that take the paper's three Multi-Cell paths (§II-C), in order."""
        nominal = protocol.SIZES.value
        paths = [multi_cell_path(s) for s in nominal]
        if len(self.sizes) != len(nominal) or any(
            s < MIN_IMAGE_SIZE or multi_cell_path(s) != p
            for s, p in zip(self.sizes, paths, strict=False)
        ):
            raise UsageError(
                f"need three sizes that take the Multi-Cell paths of {nominal} ({', '.join(paths)}"
                f": {MIN_IMAGE_SIZE}-349, 350-699, 700 and above), got "
                f"{','.join(map(str, self.sizes))}",
                setting="sizes",
            )

    def size(self, nominal: int) -> int:
        return dict(zip(protocol.SIZES.value, self.sizes, strict=True))[nominal]

    def steps(self, paper_steps: int) -> int:
        """--steps-scale: every step count times the scale, at least 1."""
        return max(1, round(paper_steps * self.steps_scale))


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of the plan; plan.json's `runs` hold these fields."""

    name: str
    uses: tuple[str, ...]  # "table2: MSE scores 448", "fig4: 224@20k", "init of m2cnn448"
    loss: str
    multi_cell: bool
    nominal_size: int
    image_size: int
    init: str  # imagenet | none | PATH | run:<name>
    steps: int  # from its init
    total_steps: int  # from the backbone weights, through the runs it starts from (Fig. 4)
    continues: str  # the finished run whose training this one carries on, or ""
    stage: int  # train.py --stage: 1 from the backbone, one more per run it starts from
    epochs: int
    steps_per_epoch: int
    batch_size: int
    model_dir: str
    est_gpu_memory_gb: float | None
    est_hours: float | None  # of its own steps, at the paper's speed (footprint.paper_hours)
    train_args: tuple[str, ...]  # train.py's flags (--mixed-precision added where a GPU is)

    def checkpoint(self) -> str:
        return str(stage_dir(self.model_dir, self.stage) / BEST_MODEL)

    def epochs_csv(self) -> Path:
        return stage_dir(self.model_dir, self.stage) / "epochs.csv"


@dataclasses.dataclass(frozen=True)
class PlannedEvaluation:
    run: str
    split: str
    out: str  # evaluate.py --out
    args: tuple[str, ...]  # evaluate.py's flags


@dataclasses.dataclass(frozen=True)
class Plan:
    options: Options
    runs: tuple[PlannedRun, ...]
    evaluations: tuple[PlannedEvaluation, ...]

    def run(self, name: str) -> PlannedRun:
        return next(r for r in self.runs if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "options": dataclasses.asdict(self.options),
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "evaluations": [dataclasses.asdict(e) for e in self.evaluations],
            "protocol": {k: dataclasses.asdict(v) for k, v in protocol.tagged_values().items()},
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
            for column in protocol.TABLE2_COLUMNS:
                name = protocol.table2_run(column, size, options.ablation_init)
                if name:
                    uses.setdefault(name, []).append(f"table2: {column} {size}")
    if "table3" in options.experiments:
        for row in protocol.TABLE3_ROWS:
            uses.setdefault(protocol.table3_run(row, options.ablation_init), []).append(
                f"table3: {row}"
            )
    if "fig4" in options.experiments:
        for fig in protocol.FIG4:
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
    """The runs and evaluations of the chosen experiments (see the module docstring)."""
    options.check()
    if options.weights not in WEIGHTS_CHOICES:  # a file: the same run from any folder
        options = dataclasses.replace(options, weights=str(Path(options.weights).resolve()))
    out, data = Path(options.out).resolve(), str(Path(options.data).resolve())
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
            uses=tuple(uses),
            loss=spec.loss,
            multi_cell=spec.multi_cell,
            nominal_size=spec.size,
            image_size=size,
            init=f"{protocol.RUN_PREFIX}{parent}" if start else options.weights,
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
            train_args=(),
        )
        planned[name] = dataclasses.replace(run, train_args=_train_args(options, run, data, start))
    return Plan(options, tuple(planned.values()), _evaluations(options, planned, data, out))


def _train_args(
    options: Options, run: PlannedRun, data: str, start: PlannedRun | None
) -> tuple[str, ...]:
    """train.py's flags for the run: every protocol setting spelled out, no default relied on."""
    args = [
        *("--stage", str(run.stage), "--data", data, "--model-dir", run.model_dir),
        *("--image-size", str(run.image_size), "--preset", options.preset, "--loss", run.loss),
        "--multi-cell" if run.multi_cell else "--nomulti-cell",
        *(("--init", start.checkpoint()) if start else ("--weights", options.weights)),
        *("--epochs", str(run.epochs), "--steps-per-epoch", str(run.steps_per_epoch)),
        *("--batch-size", str(options.batch_size)),
    ]
    for key, value in protocol.TRAIN_SETTINGS.items():
        if key not in ("preset", "batch_size"):  # the options' own
            args += [f"--{key.replace('_', '-')}", str(value.value)]
    return tuple(args)


def _hours(options: Options, spec: protocol.Run, trained: int) -> float | None:
    """The hours of the steps a run trains itself (a run that carries on another trains only
    the steps beyond it), at the paper's speed; estimated for the paper preset only."""
    if options.preset != "paper":
        return None
    return footprint.paper_hours(options.size(spec.size), spec.multi_cell, trained, spec.size)


def _evaluations(
    options: Options, runs: dict[str, PlannedRun], data: str, out: Path
) -> tuple[PlannedEvaluation, ...]:
    """Table II's runs on val, Table III's on val and test (Fig. 4 reads each run's own
    validations). Each (run, split) once."""
    wanted: dict[tuple[str, str], None] = {}
    if "table2" in options.experiments:
        for size in protocol.SIZES.value:
            for column in protocol.TABLE2_COLUMNS:
                name = protocol.table2_run(column, size, options.ablation_init)
                for split in protocol.EVAL_SPLITS["table2"].value:
                    if name:
                        wanted[(name, split)] = None
    if "table3" in options.experiments:
        for row in protocol.TABLE3_ROWS:
            for split in protocol.EVAL_SPLITS["table3"].value:
                wanted[(protocol.table3_run(row, options.ablation_init), split)] = None
    found = []
    for name, split in wanted:
        run, report = runs[name], out / "reports" / f"{name}-{split}"
        args = [
            *("--model-dir", run.model_dir, "--stage", str(run.stage), "--data", data),
            *("--split", split, "--out", str(report)),
        ]
        for key, value in protocol.EVALUATION.items():
            args += [f"--{key}", str(value.value)]
        found.append(PlannedEvaluation(name, split, str(report), tuple(args)))
    return tuple(found)


def missing_records(plan: Plan) -> list[str]:
    """The record shards the plan reads that OUT/<size>/ lacks (data_prep's layout)."""
    needed = {(r.image_size, split) for r in plan.runs for split in ("train", "val")}
    needed |= {(plan.run(e.run).image_size, e.split) for e in plan.evaluations}
    data = Path(plan.options.data)
    return [
        str(data / str(size) / f"{split}-*.tfrecord")
        for size, split in sorted(needed)
        if not any((data / str(size)).glob(f"{split}-*-of-*.tfrecord"))
    ]


def save_plan(plan: Plan) -> Path:
    """Write OUT/plan.json, refusing to change a run or evaluation that an earlier plan in the
    same folder already holds (its results would no longer match)."""
    out = Path(plan.options.out)
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        before = {r["name"]: r["train_args"] for r in old.get("runs", [])}
        for run in plan.runs:
            if run.name in before and list(before[run.name]) != list(run.train_args):
                raise UsageError(
                    f"{out} holds a plan whose run {run.name} was trained differently "
                    f"({_difference(before[run.name], run.train_args)}); give the same options "
                    "as before, or another output folder",
                    setting="out",
                )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan.to_json())
    return path


def _difference(old: list[str], new: tuple[str, ...]) -> str:
    """The first flag whose value differs, as `--flag old -> new`."""
    pairs_old, pairs_new = dict(itertools.pairwise(old)), dict(itertools.pairwise(new))
    for flag in dict.fromkeys([*old, *new]):
        if flag.startswith("--") and pairs_old.get(flag) != pairs_new.get(flag):
            return f"{flag} {pairs_old.get(flag)} -> {pairs_new.get(flag)}"
    return "the flags differ"


def plan_table(plan: Plan) -> str:
    """The plan as a table: one line per run, then the totals."""
    head = (
        "run",
        "loss",
        "multi-cell",
        "size",
        "init",
        "steps",
        "batch",
        "est. GPU mem",
        "est. time",
    )
    rows = [head]
    for r in plan.runs:
        hours = "–" if r.est_hours is None else f"{r.est_hours:.1f} h"
        rows.append(
            (
                r.name,
                r.loss,
                "on" if r.multi_cell else "off",
                str(r.image_size),
                r.init if len(r.init) <= 24 else "…" + r.init[-23:],
                f"{r.steps:,}",
                str(r.batch_size),
                footprint.describe_gb(r.est_gpu_memory_gb),
                hours,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "what each run is for:"]
    lines += [f"  {r.name}: {'; '.join(r.uses)}" for r in plan.runs]
    hours = [r.est_hours for r in plan.runs if r.est_hours is not None]
    if hours:
        lines.append(f"total at the paper's speed: {sum(hours):.0f} h of training")
    lines += [f"evaluations: {len(plan.evaluations)}", f"estimates: {ESTIMATES_NOTE}"]
    return "\n".join(lines)
