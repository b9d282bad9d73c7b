"""Our figures beside the paper's: OUT/tables.json, OUT/tables.md and OUT/fig4.png.

Every cell of Table II (val) and Table III (val, test) with our kappa, its 95% bootstrap CI
(evaluate.py's report.json), the paper's figure and the difference (ours − paper); Fig. 4's
runs with the paper's steps and hours beside ours, val kappa from scores at the run's last
validation, and §III-B's three claims checked on our runs. fig4.png plots val kappa against
steps and against hours, one line per Fig. 4 run: each run's validations (epochs.csv) at its
step counted from the backbone weights (a 448* run starts at 224@20k's steps and hours).
It reads only files, so a rerun rebuilds it without training anything. Kept free of TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m2cnn_tf.common import atomic_write_json, atomic_write_text, finite_or_none
from m2cnn_tf.reports import REPORT
from m2cnn_tf.reproduce import protocol
from m2cnn_tf.reproduce.plan import Plan, PlannedRun
from m2cnn_tf.reproduce.runs import epoch_rows, load_state


def _report(plan: Plan, run: str, split: str) -> dict[str, Any] | None:
    """The report of the plan's evaluation of `run` on `split`, if there is one yet."""
    for e in plan.evaluations:
        if e.run == run and e.split == split:
            path = Path(e.out) / REPORT
            return json.loads(path.read_text()) if path.is_file() else None
    return None


def _cell(plan: Plan, run: str | None, split: str, way: str, paper: float | None) -> dict:
    """One cell: our kappa and CI from the run's report, the paper's figure, the difference."""
    report = _report(plan, run, split) if run else None
    figures = (report or {}).get(way, {})
    kappa = finite_or_none(figures.get("kappa"))
    ci = [finite_or_none(v) for v in figures.get("kappa_ci95", [None, None])]
    return {
        "run": run,
        "split": split,
        "way": way,
        "kappa": kappa,
        "ci95": ci,
        "paper": paper,
        "difference": None if kappa is None or paper is None else round(kappa - paper, 4),
        "n_images": (report or {}).get("n_images"),
    }


def table2(plan: Plan) -> list[dict[str, Any]]:
    cells = []
    for size, figures in protocol.TABLE2_PAPER.items():
        for column, (_, way) in protocol.TABLE2_COLUMNS.items():
            run = protocol.table2_run(column, size, plan.options.ablation_init)
            planned = run if run in {r.name for r in plan.runs} else None
            cell = _cell(plan, planned, "val", way, figures[column])
            cells.append({"size": size, "column": column, **cell})
    return cells


def table3(plan: Plan) -> list[dict[str, Any]]:
    cells = []
    names = {r.name for r in plan.runs}
    for row, figures in protocol.TABLE3_PAPER.items():
        run = protocol.table3_run(row, plan.options.ablation_init)
        for split, paper in figures.items():
            cell = _cell(plan, run if run in names else None, split, "scores", paper)
            cells.append({"row": row, **cell})
    for row, figures in protocol.TABLE3_OTHERS.items():
        for split, paper in figures.items():
            cells.append({"row": row, **_cell(plan, None, split, "scores", paper)})
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
    """Steps and hours spent before the run's first step: those of the runs it starts from."""
    if not run.init.startswith(protocol.RUN_PREFIX):
        return 0, 0.0
    parent = plan.run(run.init.removeprefix(protocol.RUN_PREFIX))
    seconds = load_state(parent).get("seconds", {})
    steps0, hours0 = _start(plan, parent)
    spent = finite_or_none(seconds.get(str(parent.epochs)))
    hours = None if spent is None or hours0 is None else hours0 + spent / 3600
    return steps0 + parent.steps, hours


def fig4(plan: Plan) -> list[dict[str, Any]]:
    names = {r.name for r in plan.runs}
    found = []
    for fig in protocol.FIG4:
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
                "hours": last.get("hours"),
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
    for better, worse in protocol.FIG4_CLAIMS:
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
    if o.ablation_init == "stage":
        found.append(
            "Table II's MSE, CE and Multi-Task columns at 448 and 720 are fine-tuned from the "
            "previous size (--ablation-init stage): our addition, which no paper reports; the "
            "paper's figures beside them are for runs from ImageNet."
        )
    return found


def build(plan: Plan) -> dict[str, Path]:
    """Write tables.json, tables.md and (with Fig. 4) fig4.png into OUT; returns their paths."""
    out = Path(plan.options.out)
    points = fig4(plan) if "fig4" in plan.options.experiments else []
    tables = {
        "notes": notes(plan),
        "ablation_init": plan.options.ablation_init,
        "table2": table2(plan) if "table2" in plan.options.experiments else [],
        "table3": table3(plan) if "table3" in plan.options.experiments else [],
        "fig4": points,
        "fig4_claims": claims(points) if points else [],
    }
    paths = {"tables.json": out / "tables.json", "tables.md": out / "tables.md"}
    atomic_write_json(paths["tables.json"], tables)
    atomic_write_text(paths["tables.md"], markdown(tables))
    if points:
        paths["fig4.png"] = out / "fig4.png"
        plot_fig4(points, paths["fig4.png"])
    return paths


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
    names = " | ".join("algorithm" if k == "row" else k for k in keys)
    lines = [f"## {title}", "", f"| {names} | ours | 95% CI | paper | ours − paper | run |"]
    lines.append("|---|---|---|---|---|---|---|")
    for c in cells:
        lines.append(
            f"| {c[keys[0]]} | {c[keys[1]]} | {_k(c['kappa'])} | {_ci(c['ci95'])} | "
            f"{_k(c['paper'])} | {_signed(c['difference'])} | {c['run'] or '–'} |"
        )
    return [*lines, ""]


def markdown(tables: dict[str, Any]) -> str:
    lines = ["# Reproduction of M²CNN (Zhou et al., EMBC 2018)", ""]
    lines += [f"> {n}" for n in tables["notes"]] + ([""] if tables["notes"] else [])
    lines += _kappa_table("Table II (val, quadratic weighted kappa)", ("size", "column"),
                          tables["table2"])  # fmt: skip
    lines += _kappa_table("Table III (kappa from scores)", ("row", "split"), tables["table3"])
    if tables["fig4"]:
        lines += ["## Fig. 4 (val kappa from scores at each run's last validation)", ""]
        lines += ["| run | paper: steps | paper: hours | ours: steps | ours: hours | val kappa |"]
        lines += ["|---|---|---|---|---|---|"]
        for p in tables["fig4"]:
            hours = "–" if p["hours"] is None else f"{p['hours']:.2f}"
            steps = "–" if p["steps"] is None else f"{p['steps']:,}"
            lines.append(
                f"| {p['label']} | {p['paper_steps']:,} | {p['paper_hours']} | {steps} | "
                f"{hours} | {_k(p['val_kappa'])} |"
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
