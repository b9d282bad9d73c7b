"""Our figures beside the paper's: OUT/tables.json, OUT/tables.md, OUT/timings.json, fig4.png.

Every cell of Table II (val) and Table III (val, test): the run it comes from (tagged `paper` or
`ours`, with the reason), our kappa with the plan's checkpoint (last by default) and its 95%
bootstrap CI (evaluate.py's report.json), best-on-val beside it (labelled as selected on the
split it was selected on), the mean ± sd over seeds (`--seeds N`), the paper's figure and the
difference. Then the paper's comparisons as paired differences (`comparisons`), Fig. 4's runs
with the paper's steps beside ours, val kappa from scores at the run's last validation, and
§III-B's claims checked on our runs. Wall-clock hours go to timings.json only, so that two
deterministic runs of the same command give a byte-identical tables.json. fig4.png plots val
kappa against steps and against hours, one line per Fig. 4 run, counted from the backbone
weights (a 448* run starts where the checkpoint it starts from was written). It reads only
files, so a rerun rebuilds it without training anything. Kept free of TensorFlow.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from m2cnn_tf.common import atomic_write_json, atomic_write_text, finite_or_none
from m2cnn_tf.reports import REPORT
from m2cnn_tf.reproduce import comparisons, figures, footprint, protocol
from m2cnn_tf.reproduce.plan import ESTIMATES_NOTE, Plan, PlannedRun
from m2cnn_tf.reproduce.protocol import Tagged
from m2cnn_tf.reproduce.runs import epoch_rows, load_state


def _kappa(plan: Plan, run: str, split: str, which: str, way: str, seed: int = 0) -> dict:
    """Kappa, its CI and the image count of a run's evaluation (None before it exists)."""
    e = plan.evaluation(run, split, which, seed)
    path = Path(e.out) / REPORT if e else None
    report = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    found = report.get(way, {})
    ci = [finite_or_none(v) for v in found.get("kappa_ci95", [None, None])]
    return {"kappa": finite_or_none(found.get("kappa")), "ci95": ci, "n": report.get("n_images")}


def _cell(plan: Plan, source: Tagged | None, split: str, way: str, paper: float | None) -> dict:
    """One cell: the run and its tag, our kappa and CI, best-on-val, seeds, the paper's."""
    o = plan.options
    run = source.value if source is not None else None
    run = run if run in {r.name for r in plan.runs} else None
    main = _kappa(plan, run or "", split, o.checkpoint, way)
    cell = {
        "run": run,
        "source": None if run is None else {"tag": source.source, "why": source.note},
        "split": split,
        "way": way,
        "checkpoint": o.checkpoint,
        "kappa": main["kappa"],
        "ci95": main["ci95"],
        "paper": paper,
        "difference": None if None in (main["kappa"], paper) else round(main["kappa"] - paper, 4),
        "n_images": main["n"],
        "selected_on": "val" if run and o.checkpoint != "best" else None,
        "selected": None,
        "seeds": None,
    }
    if cell["selected_on"]:
        best = _kappa(plan, run, split, "best", way)
        cell["selected"] = {"kappa": best["kappa"], "ci95": best["ci95"]}
    if run and o.seeds > 1:
        kappas = [_kappa(plan, run, split, o.checkpoint, way, s)["kappa"] for s in range(o.seeds)]
        known = [k for k in kappas if k is not None]
        spread = len(known) == len(kappas)
        cell["seeds"] = {
            "kappas": kappas,
            "mean": statistics.fmean(known) if spread else None,
            "sd": statistics.stdev(known) if spread else None,
        }
    return cell


def table2(plan: Plan) -> list[dict[str, Any]]:
    cells = []
    for size, paper in figures.TABLE2_PAPER.items():
        for column, (_, way) in figures.TABLE2_COLUMNS.items():
            source = figures.table2_cell(column, size, plan.options.ablation_init)
            cells.append({"size": size, "column": column,
                          **_cell(plan, source, "val", way, paper[column])})  # fmt: skip
    return cells


def table3(plan: Plan) -> list[dict[str, Any]]:
    cells = []
    for row, paper in figures.TABLE3_PAPER.items():
        source = figures.table3_cell(row, plan.options.ablation_init)
        for split, figure in paper.items():
            cells.append({"row": row, **_cell(plan, source, split, "scores", figure)})
    for row, paper in figures.TABLE3_OTHERS.items():
        for split, figure in paper.items():
            cells.append({"row": row, **_cell(plan, None, split, "scores", figure)})
    return cells


def curve(plan: Plan, run: PlannedRun) -> list[dict[str, float | None]]:
    """The run's validations: step and hours from the backbone weights, val kappa (scores)."""
    steps0, hours0 = _start(plan, run)
    seconds = load_state(run).get("seconds", {})
    points = []
    for epoch, row in sorted(epoch_rows(run.epochs_csv()).items()):
        kappa = finite_or_none(row.get("val_kappa_scores"))
        spent = finite_or_none(seconds.get(str(epoch)))
        points.append(
            {
                "step": steps0 + epoch * run.steps_per_epoch,
                "hours": None if spent is None or hours0 is None else hours0 + spent / 3600,
                "val_kappa": kappa,
            }
        )
    return points


def _start(plan: Plan, run: PlannedRun) -> tuple[int, float | None]:
    """Steps and hours spent before the run's first step: those of the runs it starts from, up
    to the checkpoint it starts from (the last one's epoch, or the one best.json names)."""
    if not run.init.startswith(protocol.RUN_PREFIX):
        return 0, 0.0
    parent = plan.run(run.init.removeprefix(protocol.RUN_PREFIX), run.seed)
    epoch = parent.epochs
    if run.init_checkpoint == "best":
        meta = _json(parent.checkpoint("best"), "best.json")
        epoch = int(meta.get("epoch") or parent.epochs)
    steps0, hours0 = _start(plan, parent)
    spent = finite_or_none(load_state(parent).get("seconds", {}).get(str(epoch)))
    hours = None if spent is None or hours0 is None else hours0 + spent / 3600
    return steps0 + epoch * parent.steps_per_epoch, hours


def _json(checkpoint: str, name: str) -> dict[str, Any]:
    path = Path(checkpoint).with_name(name)
    return json.loads(path.read_text()) if path.is_file() else {}


def fig4(plan: Plan) -> list[dict[str, Any]]:
    """Fig. 4's runs (seed 0): steps from the backbone and val kappa; hours as a separate
    field that `build` moves to timings.json."""
    names = {r.name for r in plan.runs}
    found = []
    for fig in figures.FIG4:
        points = curve(plan, plan.run(fig.run)) if fig.run in names else []
        last = points[-1] if points else {}
        kappas = [p["val_kappa"] for p in points if p["val_kappa"] is not None]
        found.append(
            {
                "label": fig.label,
                "run": fig.run if fig.run in names else None,
                "paper_steps": fig.steps,
                "paper_hours": fig.hours,
                "steps": last.get("step"),
                "val_kappa": last.get("val_kappa"),
                "best_val_kappa": max(kappas, default=None),
                "curve": points,
            }
        )
    return found


def claims(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """§III-B's claims on Fig. 4, checked on our last validations."""
    kappa = {p["label"]: p["val_kappa"] for p in points}
    found = []
    for better, worse in figures.FIG4_CLAIMS:
        a, b = kappa.get(better), kappa.get(worse)
        found.append(
            {"better": better, "worse": worse, "holds": None if a is None or b is None else a > b}
        )
    return found


def notes(plan: Plan) -> list[str]:
    """What makes our figures not comparable with the paper's, one sentence each."""
    o, found = plan.options, []
    if o.preset != "paper" or o.steps_scale != 1 or tuple(o.sizes) != protocol.SIZES.value:
        found.append(
            f"A miniature (preset {o.preset}, steps × {o.steps_scale:g}, sizes "
            f"{','.join(map(str, o.sizes))}): not comparable with the paper."
        )
    if o.weights != "imagenet":
        found.append(f"Backbone weights {o.weights}: the paper starts from ImageNet (§III-A).")
    if o.checkpoint == "best":
        found.append(
            "Each cell is the run's best checkpoint on val: on Table II and Table III's val "
            "column it is selected on the split it reports, so it is optimistic."
        )
    if o.seeds > 1:
        found.append(
            f"Figures are seed 0's, with the mean ± sd over seeds 0-{o.seeds - 1} beside them; "
            "the comparisons are the mean over seeds with the t interval across them."
        )
    if o.ablation_init == "stage":
        found.append(
            "Table II's MSE, CE and Multi-Task columns at 448 and 720 are fine-tuned from the "
            "previous size (--ablation-init stage): our addition, which no paper reports; the "
            "paper's figures beside them are for runs from ImageNet."
        )
    return found


def build(plan: Plan) -> dict[str, Path]:
    """Write tables.json, tables.md, timings.json and (with Fig. 4) fig4.png into OUT; returns
    their paths."""
    out = Path(plan.options.out)
    timed = fig4(plan) if "fig4" in plan.options.experiments else []
    untimed = [{**p, "curve": [_without(c, "hours") for c in p["curve"]]} for p in timed]
    tables = {
        "notes": notes(plan),
        "ablation_init": plan.options.ablation_init,
        "checkpoint": plan.options.checkpoint,
        "seeds": plan.options.seeds,
        "table2": table2(plan) if "table2" in plan.options.experiments else [],
        "table3": table3(plan) if "table3" in plan.options.experiments else [],
        "comparisons": comparisons.comparisons(plan),
        "fig4": untimed,
        "fig4_claims": claims(timed) if timed else [],
    }
    hours = {p["label"]: [c["hours"] for c in p["curve"]] for p in timed}
    timings = {
        "fig4_hours": hours,
        "run_seconds": {r.label: load_state(r).get("seconds", {}) for r in plan.runs},
    }
    paths = {name: out / name for name in ("tables.json", "tables.md", "timings.json")}
    atomic_write_json(paths["tables.json"], tables)
    atomic_write_json(paths["timings.json"], timings)
    atomic_write_text(paths["tables.md"], markdown(tables, hours))
    if timed:
        paths["fig4.png"] = out / "fig4.png"
        plot_fig4(timed, paths["fig4.png"])
    return paths


def _without(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}


def _k(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(ci: list[float | None]) -> str:
    return "–" if None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _kappa_table(title: str, keys: tuple[str, str], cells: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of kappa cells, ours beside the paper's; the first two columns are the
    cells' `keys` ("row" is shown as "algorithm")."""
    if not cells:
        return []
    seeds = any(c["seeds"] for c in cells)
    columns = ["algorithm" if k == "row" else k for k in keys]
    columns += ["ours", "95% CI", "best on val (selected on val)"]
    columns += ["mean ± sd over seeds"] * seeds + ["paper", "ours − paper", "run (source)"]
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for c in cells:
        best = "–" if c["selected"] is None else f"{_k(c['selected']['kappa'])}"
        spread = ""
        if seeds:
            s = c["seeds"] or {}
            known = s.get("mean") is not None
            spread = f" {s['mean']:.3f} ± {s['sd']:.3f} |" if known else " – |"
        source = f" ({c['source']['tag']})" if c["source"] else ""
        lines.append(
            f"| {c[keys[0]]} | {c[keys[1]]} | {_k(c['kappa'])} | {_ci(c['ci95'])} | {best} |"
            f"{spread} {_k(c['paper'])} | {_signed(c['difference'])} | "
            f"{c['run'] or '–'}{source} |"
        )
    return [*lines, ""]


def markdown(tables: dict[str, Any], hours: dict[str, list[float | None]]) -> str:
    lines = ["# Reproduction of M²CNN (Zhou et al., EMBC 2018)", ""]
    lines += [f"> {n}" for n in tables["notes"]] + ([""] if tables["notes"] else [])
    what = f"the {tables['checkpoint']} checkpoint of each run, seed 0"
    lines += _kappa_table(f"Table II (val, quadratic weighted kappa; {what})", ("size", "column"),
                          tables["table2"])  # fmt: skip
    lines += _kappa_table(f"Table III (kappa from scores; {what})", ("row", "split"),
                          tables["table3"])  # fmt: skip
    lines += comparisons.markdown(tables["comparisons"])
    if tables["fig4"]:
        lines += ["## Fig. 4 (val kappa from scores at each run's last validation)", ""]
        lines += ["| run | paper: steps | paper: hours | ours: steps | ours: hours | val kappa |"]
        lines += ["|---|---|---|---|---|---|"]
        for p in tables["fig4"]:
            last = (hours.get(p["label"]) or [None])[-1]
            shown = "–" if last is None else f"{last:.2f}"
            steps = "–" if p["steps"] is None else f"{p['steps']:,}"
            lines.append(
                f"| {p['label']} | {p['paper_steps']:,} | {p['paper_hours']} | {steps} | "
                f"{shown} | {_k(p['val_kappa'])} |"
            )
        lines += ["", "§III-B's claims on our runs:", ""]
        for c in tables["fig4_claims"]:
            verdict = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
            lines.append(f"- {c['better']} better than {c['worse']}: {verdict}")
        lines += ["", "![Fig. 4](fig4.png)", ""]
    return "\n".join(lines)


def plot_fig4(points: list[dict[str, Any]], path: Path) -> None:
    """Val kappa against steps and against hours, one line per Fig. 4 run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_hour) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for p in points:
        kept = [c for c in p["curve"] if c["val_kappa"] is not None]
        if not kept:
            continue
        by_step.plot([c["step"] / 1000 for c in kept], [c["val_kappa"] for c in kept], "o-",
                     label=p["label"], markersize=3)  # fmt: skip
        timed = [c for c in kept if c["hours"] is not None]
        by_hour.plot([c["hours"] for c in timed], [c["val_kappa"] for c in timed], "o-",
                     label=p["label"], markersize=3)  # fmt: skip
    by_step.set_xlabel("training steps (thousands, from the backbone weights)")
    by_hour.set_xlabel("hours (ours, from the backbone weights)")
    by_step.set_ylabel("val kappa (scores)")
    by_step.legend(fontsize=8)
    fig.suptitle("Fig. 4: training with and without the Multi-Cell's fine-tuning")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.replace(path)


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
                r.label,
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
    lines += [f"  {r.name}: {'; '.join(r.uses)}" for r in plan.runs if r.seed == 0]
    hours = [r.est_hours for r in plan.runs if r.est_hours is not None]
    if hours:
        seeds = plan.options.seeds
        each = f" ({seeds} seeds)" if seeds > 1 else ""
        lines.append(f"total at the paper's speed: {sum(hours):.0f} h of training{each}")
    lines += [f"evaluations: {len(plan.evaluations)}", f"estimates: {ESTIMATES_NOTE}"]
    return "\n".join(lines)
