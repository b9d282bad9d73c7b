"""reproduce.py: the plan against the paper, the GPU check, and a miniature of every experiment.

The expected inits and step counts are written out by hand from §III-A, Table II/III and Fig. 4,
not derived from m2cnn_tf/reproduce/protocol.py. The miniature trains every run of Table II,
Table III and Fig. 4 with the nano preset at 80/352/704 px (one per Multi-Cell path) for a step
or three each: every experiment straight through; then Fig. 4's six runs (`--experiments fig4`)
in a second folder that starts with copies of its two BaseNet runs (224@20k, 448@20k), so that
the M²CNN run 448*@32k trains again from the copy of 224@20k, and 224@60k carries that copy
on again, stopped by a real Ctrl-C and resumed (at this scale the other two longer runs round to
their source's step count: copies). Every prediction of the second folder (all six evaluated
again) must be the same bytes as the first's, and so must Fig. 4's tables and the weights of
the runs trained again (deterministic runs, exact resume); a rerun then only rebuilds the
report, to the same bytes. The BaseNet runs are not trained twice here: repeating them is the
twice and kill/resume tests' job (tests/test_training_runs.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _subprocess import ENV
from _tfrecords import grade_images, write_split

from m2cnn_tf import checkpoints
from m2cnn_tf.commands import reproduce
from m2cnn_tf.reproduce import figures, protocol
from m2cnn_tf.reproduce import plan as reproduction
from m2cnn_tf.reproduce import report as reproduction_report
from m2cnn_tf.reproduce import runs as reproduction_runs
from m2cnn_tf.reproduce.options import Options

ROOT = Path(__file__).resolve().parents[1]
MINI_SIZES = (80, 352, 704)
# name: (loss, Multi-Cell, size, init, steps from its init, steps from ImageNet)
PAPER_PLAN = {
    # Table II's ablation columns, each from ImageNet at its own size (§III-A "for BaseNet").
    "mse224": ("mse", False, 224, "imagenet", 20000, 20000),
    "mse448": ("mse", False, 448, "imagenet", 20000, 20000),
    "mse720": ("mse", False, 720, "imagenet", 20000, 20000),
    "ce224": ("ce", False, 224, "imagenet", 20000, 20000),
    "ce448": ("ce", False, 448, "imagenet", 20000, 20000),
    "ce720": ("ce", False, 720, "imagenet", 20000, 20000),
    "mt224": ("multitask", False, 224, "imagenet", 20000, 20000),  # Fig. 4's 224@20k
    "mt448": ("multitask", False, 448, "imagenet", 20000, 20000),  # 448@20k
    "mt720": ("multitask", False, 720, "imagenet", 20000, 20000),
    # M²CNN from BaseNet+MT, 224 -> 448 -> 720 (§III-A, §II-C); 448*@32k = 224@20k + 12k.
    "m2cnn448": ("multitask", True, 448, "run:mt224", 12000, 32000),
    "m2cnn720": ("multitask", True, 720, "run:m2cnn448", 12000, 44000),
    "mt224_60k": ("multitask", False, 224, "imagenet", 60000, 60000),  # 224@60k
    "mt448_26k": ("multitask", False, 448, "imagenet", 26000, 26000),  # 448@26k
    "m2cnn448_40k": ("multitask", True, 448, "run:mt224", 20000, 40000),  # 448*@40k
}


def _reproduce(capsys, *flags: str) -> tuple[int, str, str]:
    code = reproduce.run(["reproduce.py", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _plan(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def _tables(out: Path) -> dict:
    return json.loads((out / "tables.json").read_text())


def test_the_dry_run_plans_every_run_with_the_papers_inits_and_steps(tmp_path, capsys):
    code, printed, _ = _reproduce(
        capsys, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--dry-run"
    )
    assert code == 0
    runs = {r["name"]: r for r in _plan(tmp_path / "o")["runs"]}
    assert set(runs) == set(PAPER_PLAN)
    for name, (loss, cells, size, init, steps, total) in PAPER_PLAN.items():
        r = runs[name]
        got = (r["loss"], r["multi_cell"], r["image_size"], r["init"], r["steps"])
        assert got == (loss, cells, size, init, steps), name
        assert r["total_steps"] == total, name
        assert r["batch_size"] == 16 and r["epochs"] * r["steps_per_epoch"] == steps
    order = list(runs)
    for name, r in runs.items():  # every run comes after the runs it starts from
        for source in (r["init"].removeprefix("run:"), r["continues"]):
            if source in runs:
                assert order.index(source) < order.index(name), name
    assert runs["m2cnn720"]["stage"] == 3 and runs["mse720"]["stage"] == 1
    assert any(a.startswith("--init=") for a in runs["m2cnn448"]["train_args"])
    assert "--nomulti-cell" in runs["mt448"]["train_args"]
    assert runs["m2cnn448"]["config"]["model"]["init"].endswith("runs/mt224/stage1/last.keras")
    assert runs["m2cnn448"]["init_checkpoint"] == "last"
    assert runs["mt224"]["init_checkpoint"] is None  # from ImageNet
    for name in PAPER_PLAN:  # the printed table: one line per run with its estimates
        line = next(x for x in printed.splitlines() if x.startswith(name + " "))
        assert re.search(r"\d+(\.\d)? GB .*\d+\.\d h", line), line
    evaluated = {
        (e["run"], e["split"], e["checkpoint"]) for e in _plan(tmp_path / "o")["evaluations"]
    }
    # Every cell with the last checkpoint and best-on-val beside it; Fig. 4's runs on val with
    # the last only, for the paired comparisons (the curves read each run's own validations).
    assert {("m2cnn720", "test", "last"), ("m2cnn720", "test", "best")} <= evaluated
    assert ("mt224_60k", "val", "last") in evaluated
    assert ("mt224_60k", "val", "best") not in evaluated


def test_steps_scale_multiplies_every_step_count_and_keeps_the_plan_shape(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, _ = _reproduce(capsys, "--data", "d", "--out", str(out), "--dry-run",
                            "--steps-scale", "0.001")  # fmt: skip
    assert code == 0
    runs = {r["name"]: r for r in _plan(out)["runs"]}
    for name, (*_, steps, total) in PAPER_PLAN.items():
        assert runs[name]["steps"] == steps // 1000, name
        assert runs[name]["total_steps"] == total // 1000, name
        assert runs[name]["epochs"] * runs[name]["steps_per_epoch"] == steps // 1000
    assert {r["steps_per_epoch"] for r in runs.values()} == {2}  # 2,000 × 0.001


def test_ablation_init_stage_fine_tunes_the_ablation_columns_and_is_labelled_ours(tmp_path, capsys):
    out = tmp_path / "o"
    flags = ("--data", "d", "--out", str(out), "--dry-run", "--ablation-init", "stage")
    assert _reproduce(capsys, *flags)[0] == 0
    runs = {r["name"]: r for r in _plan(out)["runs"]}
    assert runs["mse448_ft"]["init"] == "run:mse224" and runs["mse448_ft"]["steps"] == 12000
    assert runs["ce720_ft"]["init"] == "run:ce448_ft" and runs["ce720_ft"]["stage"] == 3
    assert runs["mt720_ft"]["multi_cell"] is False
    assert runs["mt448"]["init"] == "imagenet"  # Fig. 4's 448@20k stays as the paper has it
    assert "mse448" not in runs
    options = Options(data="d", out=str(out), ablation_init="stage")
    notes = reproduction_report.notes(reproduction.make_plan(options))
    assert any("no paper reports" in n for n in notes)


def test_a_second_plan_that_would_change_a_run_in_the_same_folder_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert _reproduce(capsys, "--data", "d", "--out", out, "--dry-run")[0] == 0
    code, _, err = _reproduce(capsys, "--data", "d", "--out", out, "--dry-run",
                              "--batch-size", "8")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 16 -> 8" in err and err.startswith("reproduce.py: error: --out")
    # Another choice of experiments keeps every shared run as it was: accepted.
    assert _reproduce(capsys, "--data", "d", "--out", out, "--dry-run", "--experiments",
                      "fig4")[0] == 0  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--sizes", "80,300,704", "--sizes: need three sizes"),
        ("--sizes", "80,352", "--sizes: need three sizes"),
        ("--sizes", "80,x,704", "--sizes: not integers"),
        ("--steps-scale", "0", "--steps-scale: must be positive"),
        ("--experiments", "table4", "--experiments: choose from"),
        ("--weights", "/no/such/file.h5", "--weights:"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, capsys, flag, value, says):
    code, _, err = _reproduce(capsys, "--data", "d", "--out", str(tmp_path), "--dry-run",
                              flag, value)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"reproduce.py: error: {says}")


def test_without_a_gpu_it_refuses_to_train_in_one_line_naming_the_fix(
    tmp_path, capsys, monkeypatch
):
    import tensorflow as tf

    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: [] if kind == "GPU" else real(kind)
    )
    code, _, err = _reproduce(capsys, "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f'pip install "tensorflow[and-cuda]=={tf.__version__}"' in err
    assert "Docker" in err and "--allow-cpu" in err and "no GPU" in err
    assert not (tmp_path / "o" / "runs").exists()


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("records")
    for size in MINI_SIZES:
        for split, n, seed in (("train", 4, 1), ("val", 4, 2), ("test", 4, 3)):
            grades = [i % 5 for i in range(n)]
            write_split(data, size, split, grade_images(grades, size, seed), grades)
    return data


def _start(flags: list[str], log: Path) -> subprocess.Popen:
    """`python reproduce.py FLAGS` in its own process group (a fresh TensorFlow each)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "reproduce.py"), *flags], stdout=out,
            stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, start_new_session=True,
        )  # fmt: skip


def _wait(process: subprocess.Popen, log: Path, timeout: float = 900) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reproduce.py did not finish:\n{log.read_text()[-3000:]}")
    finally:
        _kill(process)


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _stop_and_resume(out: Path, flags: list[str], logs: Path) -> None:
    """1. Ctrl-C inside 224@60k, a copy of 224@20k's folder carried on, as its fit begins: when
    TensorBoard writes a file the copy did not bring (a step is too short a window to aim at).
    2. The same command resumes: the finished runs are skipped, the stopped one trains again."""
    a = _start(flags, logs / "stopped.log")
    copied, events = (
        out / "runs" / r / "stage1" / "tensorboard" / "train" for r in ("mt224", "mt224_60k")
    )
    try:
        while a.poll() is None and not (
            {p.name for p in events.glob("events.*")} - {p.name for p in copied.glob("events.*")}
        ):
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGINT)
    finally:
        code = _wait(a, logs / "stopped.log")
    log = (logs / "stopped.log").read_text()
    assert code == 130 and "interrupted" in log, log[-3000:]
    assert "mt224: done, skipped" in log and "m2cnn448: training" in log  # mt224: the copy
    assert "mt224_60k: done" not in log and not _done(out / "runs" / "mt224_60k"), log[-3000:]
    a = _start(flags, logs / "resumed.log")
    assert _wait(a, logs / "resumed.log") == 0, (logs / "resumed.log").read_text()[-3000:]
    resumed = (logs / "resumed.log").read_text()
    assert "mt224: done, skipped" in resumed and "mt224_60k: training" in resumed, resumed[-3000:]
    # At this scale the other two round to their source's step count: copies, done at once.
    assert "mt448_26k: starts from a copy of mt448" in resumed, resumed[-3000:]


def _done(run_dir: Path) -> bool:
    state = run_dir / reproduction_runs.STATE
    return state.is_file() and json.loads(state.read_text())["done"]


# A guard against hangs, not a speed check: the whole test took 383 s on an AVX-512 CPU (oneDNN)
# and 539 s on an AVX2 one (Eigen kernels), too close to the suite's 600 s per test.
@pytest.mark.timeout(1500)
@pytest.mark.slow
def test_a_miniature_of_every_experiment_is_bit_for_bit_repeatable_and_resumes_exactly(
    tmp_path, mini_data
):
    def flags(out: Path, *more: str) -> list[str]:
        return [
            *("--data", str(mini_data), "--out", str(out), "--preset", "nano"),
            *("--weights", "none", "--sizes", ",".join(map(str, MINI_SIZES))),
            *("--steps-scale", "0.00005", "--batch-size", "2", "--allow-cpu", *more),
        ]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    code = _wait(_start(flags(straight), tmp_path / "straight.log"), tmp_path / "straight.log")
    assert code == 0, (tmp_path / "straight.log").read_text()[-3000:]
    for basenet in ("mt224", "mt448"):  # 224@20k and 448@20k: the BaseNet runs carried on
        shutil.copytree(straight / "runs" / basenet, stopped / "runs" / basenet)
    _stop_and_resume(stopped, [*flags(stopped), "--experiments", "fig4"], tmp_path)
    # 3. Bit for bit, although one run was stopped and resumed: the same predictions (each of
    # the six evaluated again), Fig. 4's tables and the weights of the runs trained again
    # (448*@40k is a copy of 448*@32k, trained again from the copy of 224@20k).
    assert len(list((straight / "reports").glob("*/predictions.csv"))) == 31  # the whole plan
    reports = sorted((stopped / "reports").glob("*/predictions.csv"))
    assert len(reports) == 6  # Fig. 4's runs on val
    for predicted in reports:
        again = straight / predicted.relative_to(stopped)
        assert again.read_bytes() == predicted.read_bytes(), predicted.parent.name
    repeated, tables = _tables(stopped), _tables(straight)
    assert repeated["fig4"] == tables["fig4"] and repeated["fig4_claims"] == tables["fig4_claims"]
    assert [c for c in tables["comparisons"] if c["table"] == "fig4"] == repeated["comparisons"]
    for name, stage in (("mt224_60k", 1), ("m2cnn448_40k", 2)):
        weights = [
            checkpoints.load_model(checkpoints.checkpoint_path(out / "runs" / name, stage, "last"))
            for out in (stopped, straight)
        ]
        assert all(map(np.array_equal, weights[0].get_weights(), weights[1].get_weights())), name

    plan = _plan(straight)
    runs = {r["name"]: r for r in plan["runs"]}
    assert runs["m2cnn448"]["init"] == "run:mt224" and runs["m2cnn720"]["image_size"] == 704
    assert runs["m2cnn720"]["init_checkpoint"] == "last" and runs["mse720"]["init"] == "none"
    assert (
        runs["mt224_60k"]["steps"] == 3 and runs["m2cnn720"]["config"]["runtime"]["deterministic"]
    )
    assert {e["checkpoint"] for e in plan["evaluations"]} == {"last", "best"}
    for name, r in runs.items():
        assert json.loads((Path(r["model_dir"]) / "reproduce.json").read_text())["done"], name
        stage = Path(r["model_dir"]) / f"stage{r['stage']}"
        assert (stage / "last.keras").is_file() and (stage / "best.keras").is_file(), name
    best = json.loads((straight / "runs/m2cnn720/stage3/last.json").read_text())
    assert best["multi_cell_path"] == "large" and best["resolution"] == 704
    assert not json.loads((straight / "runs/mt448/stage1/best.json").read_text())["multi_cell"]
    # 224@60k carries on 224@20k: its first epoch is 224@20k's, then two more.
    rows = reproduction_runs.epoch_rows(stopped / "runs/mt224_60k/stage1/epochs.csv")
    assert sorted(rows) == [1, 2, 3]

    cell = next(c for c in tables["table2"] if (c["size"], c["column"]) == (448, "M²CNN scores"))
    assert cell["paper"] == 0.830 and cell["run"] == "m2cnn448" and cell["kappa"] is not None
    assert cell["difference"] == round(cell["kappa"] - 0.830, 4) and len(cell["ci95"]) == 2
    assert cell["source"]["tag"] == "ours" and cell["selected"]["kappa"] is not None
    cell = next(c for c in tables["table2"] if (c["size"], c["column"]) == (224, "MSE scores"))
    assert cell["source"]["tag"] == "paper" and cell["checkpoint"] == "last"
    row = next(c for c in tables["table3"] if (c["row"], c["split"]) == ("BaseNet", "test"))
    assert row["paper"] == 0.828 and row["run"] == "mse720" and row["source"]["tag"] == "ours"
    assert row["kappa"] is not None and row["n_images"] == 4
    compared = {(c["a"], c["b"], c["split"], c["size"], c["way"]) for c in tables["comparisons"]}
    assert ("M²CNN scores", "Multi-Task scores", "val", 720, "scores") in compared
    assert ("M²CNN", "BaseNet+MT", "test", 720, "scores") in compared
    assert ("448*@40k", "448@26k", "val", 448, "scores") in compared
    keys = {"a", "b", "split", "size", "ours", "ci_low", "ci_high", "paper", "paper_inside_ci"}
    assert all(keys <= set(c) for c in tables["comparisons"]) and len(compared) == 17
    fig = {p["label"]: p for p in tables["fig4"]}
    assert fig["448*@32k"]["paper_hours"] == 4.0 and fig["448*@32k"]["steps"] == 2  # 1 + 1
    assert fig["224@60k"]["steps"] == 3 and "hours" not in fig["224@60k"]
    hours = json.loads((stopped / "timings.json").read_text())["fig4_hours"]
    assert hours["224@60k"][-1] > hours["224@20k"][-1]
    assert len(tables["fig4_claims"]) == 3 and any("miniature" in n for n in tables["notes"])
    assert "| 448 | M²CNN scores |" in (straight / "tables.md").read_text()
    assert (straight / "fig4.png").stat().st_size > 10_000

    # 4. Everything done: the rerun trains and evaluates nothing, it only rebuilds the report,
    # to the same bytes.
    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (straight / "runs").rglob("*") if p.is_file()}

    before = stamps()
    written = (straight / "tables.json").read_bytes()
    for name in ("tables.md", "tables.json"):
        (straight / name).unlink()
    a = _start(flags(straight), tmp_path / "rerun.log")
    assert _wait(a, tmp_path / "rerun.log") == 0
    assert "trained 0 of 14 runs and evaluated 0 of 31" in (tmp_path / "rerun.log").read_text()
    assert (straight / "tables.md").is_file()
    assert (straight / "tables.json").read_bytes() == written
    assert before == stamps()


def test_the_protocol_is_consistent_with_itself():
    for run in protocol.RUNS.values():
        if run.continues:  # a run carries on one with the same settings and fewer steps
            base = protocol.RUNS[run.continues]
            same = (base.loss, base.multi_cell, base.size, base.init)
            assert same == (run.loss, run.multi_cell, run.size, run.init), run.name
            assert base.steps.value < run.steps.value
    for fig in figures.FIG4:
        assert fig.run in protocol.RUNS
    for value in figures.tagged_values().values():
        assert value.source in (protocol.PAPER, protocol.OURS) and value.note
        assert value.source == protocol.PAPER or (value.topic and value.rendered())


def _readme_deviations() -> dict[str, str]:
    """The README's deviations table: topic -> its "here" cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Deviations from the paper", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:3] == ["topic", "the paper", "here"], header
    found = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found[cells[0]] = cells[2].replace("\\", "")  # 448\* in Markdown is 448*
    return found


def test_the_readme_deviations_table_states_every_value_the_protocol_tags_ours():
    table = _readme_deviations()
    for topic, texts in figures.deviation_rows().items():
        assert topic in table, f"README deviations table lacks the row {topic!r}"
        for text in texts:
            assert text in table[topic], f"README row {topic!r} does not say {text!r}"


def test_seeds_repeat_every_run_in_their_own_folders_and_the_hours_scale(tmp_path, capsys):
    one, three = tmp_path / "one", tmp_path / "three"
    for out, seeds in ((one, "1"), (three, "3")):
        code, printed, _ = _reproduce(
            capsys, "--data", str(tmp_path), "--out", str(out), "--dry-run", "--seeds", seeds
        )
        assert code == 0
    plan = _plan(three)
    runs = [(r["name"], r["seed"]) for r in plan["runs"]]
    assert len(runs) == 3 * len(PAPER_PLAN) and {s for _, s in runs} == {0, 1, 2}
    for r in plan["runs"]:
        assert r["config"]["runtime"]["seed"] == r["seed"]  # the protocol's seed 0, plus s
        expected = three / "runs" if r["seed"] == 0 else three / "seeds" / str(r["seed"]) / "runs"
        assert Path(r["model_dir"]) == (expected / r["name"]).resolve()
        if r["init"].startswith("run:"):  # a chain stays within its seed
            assert f"/{r['seed']}/runs/" in r["config"]["model"]["init"] or r["seed"] == 0
    assert {e["seed"] for e in plan["evaluations"]} == {0, 1, 2}
    assert len(plan["evaluations"]) == 3 * len(_plan(one)["evaluations"])

    def total(out):
        return sum(r["est_hours"] for r in _plan(out)["runs"])

    assert total(three) == pytest.approx(3 * total(one))
    assert "(3 seeds)" in printed


def test_missing_records_for_a_needed_size_is_a_one_line_usage_error_naming_it(tmp_path, capsys):
    """Records at two of the three sizes: the run must stop before any training, exit 2, and
    name the size that lacks them (not the ones that are there) and the tool that converts."""
    data = tmp_path / "data"
    for size in MINI_SIZES[:2]:
        for split in ("train", "val", "test"):
            write_split(data, size, split, grade_images([0, 1], size), [0, 1])
    out = tmp_path / "o"
    code, _, err = _reproduce(capsys, "--data", str(data), "--out", str(out), "--allow-cpu",
                              "--sizes", ",".join(map(str, MINI_SIZES)))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"reproduce.py: error: --data: no records {data.resolve()}/704/")
    assert "more)" in err and "convert those sizes with data_prep" in err
    assert "/80/" not in err and "/352/" not in err
    assert not (out / "runs").exists()


def _evaluation_on_disk(tmp_path: Path) -> tuple[reproduction.Plan, reproduction.PlannedEvaluation]:
    """Fig. 4's plan, every run marked trained, every evaluation's checkpoint and report.json
    on disk with the report the newer (all evaluated); returns the plan and one evaluation of a
    last checkpoint (a best one may reuse the last one's report instead of evaluating)."""
    options = Options(data=str(tmp_path / "d"), out=str(tmp_path / "o"), experiments=("fig4",),
                      sizes=MINI_SIZES)  # fmt: skip
    plan = reproduction.make_plan(options)
    for run in plan.runs:
        Path(run.model_dir).mkdir(parents=True, exist_ok=True)
        reproduction_runs.save_state(run, {"done": True, "seconds": {}})
    for e in plan.evaluations:
        checkpoint = Path(plan.run(e.run, e.seed).checkpoint(e.checkpoint))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"weights")
        os.utime(checkpoint, (1_000_000, 1_000_000))
        report = Path(e.out) / "report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("{}")
        os.utime(report, (2_000_000, 2_000_000))
    return plan, next(e for e in plan.evaluations if e.checkpoint == "last")


def _count_evaluations(monkeypatch) -> list[str]:
    """Replace the evaluation itself (TensorFlow's part) by a recorder of its `out` folders."""
    from m2cnn_tf import evaluation

    calls: list[str] = []

    def fake(model_dir, stage, data_dir, split, out, **kwargs) -> None:
        calls.append(str(out))

    monkeypatch.setattr(evaluation, "run_evaluation", fake)
    return calls


def test_an_evaluation_is_redone_when_its_checkpoint_is_newer_than_its_report(
    tmp_path, monkeypatch
):
    """evaluate() decides by mtimes: a report newer than its checkpoint is skipped, one older
    (the run trained again after it was evaluated) or missing is evaluated again."""
    plan, e = _evaluation_on_disk(tmp_path)
    calls = _count_evaluations(monkeypatch)
    checkpoint = Path(plan.run(e.run, e.seed).checkpoint(e.checkpoint))
    report = Path(e.out) / "report.json"

    assert reproduction_runs.evaluate(plan, e, log=lambda _: None) is False
    os.utime(report, (1_000_000, 1_000_000))  # the same second as the checkpoint: up to date
    assert reproduction_runs.evaluate(plan, e, log=lambda _: None) is False
    assert calls == []
    os.utime(checkpoint, (3_000_000, 3_000_000))
    assert reproduction_runs.evaluate(plan, e, log=lambda _: None) is True
    assert calls == [e.out]
    report.unlink()
    assert reproduction_runs.evaluate(plan, e, log=lambda _: None) is True
    assert calls == [e.out, e.out]


def test_carry_out_re_evaluates_only_the_run_whose_checkpoint_is_newer_than_its_report(
    tmp_path, monkeypatch
):
    """The command's loop (runs.carry_out, trained runs skipped): with every report newer
    nothing is evaluated; after one checkpoint changes, exactly its evaluations run again."""
    plan, e = _evaluation_on_disk(tmp_path)
    calls = _count_evaluations(monkeypatch)
    logged: list[str] = []
    assert reproduction_runs.carry_out(plan, gpus=0, log=logged.append) == {
        "trained": 0, "evaluated": 0,
    }  # fmt: skip
    assert calls == [] and all("skipped" in line for line in logged)
    checkpoint = Path(plan.run(e.run, e.seed).checkpoint(e.checkpoint))
    os.utime(checkpoint, (3_000_000, 3_000_000))
    again = [x.out for x in plan.evaluations
             if (x.run, x.seed, x.checkpoint) == (e.run, e.seed, "last")]  # fmt: skip
    assert reproduction_runs.carry_out(plan, gpus=0, log=logged.append) == {
        "trained": 0, "evaluated": len(again),
    }  # fmt: skip
    assert sorted(calls) == sorted(again) and e.out in calls
