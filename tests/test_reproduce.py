"""reproduce.py: the plan against the paper, the GPU check, and a miniature of every experiment.

The expected inits and step counts are written out by hand from §III-A, Table II/III and Fig. 4,
not derived from m2cnn_tf/protocol.py. The miniature trains every run of Table II, Table III and
Fig. 4 with the tiny preset at 80/352/704 px (one per Multi-Cell path) for a step or three each,
is interrupted once, resumed, and then rerun to rebuild only the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _tfrecords import grade_images, write_split

from m2cnn_tf import evaluation, training
from m2cnn_tf.commands import reproduce
from m2cnn_tf.reproduce import plan as reproduction
from m2cnn_tf.reproduce import protocol
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
    assert runs["m2cnn448"]["config"]["model"]["init"].endswith("runs/mt224/stage1/best.keras")
    for name in PAPER_PLAN:  # the printed table: one line per run with its estimates
        line = next(x for x in printed.splitlines() if x.startswith(name + " "))
        assert re.search(r"\d+(\.\d)? GB .*\d+\.\d h", line), line
    evaluated = {(e["run"], e["split"]) for e in _plan(tmp_path / "o")["evaluations"]}
    assert ("m2cnn720", "test") in evaluated and ("mt224", "val") in evaluated
    assert ("mt224_60k", "val") not in evaluated  # Fig. 4 reads the runs' own validations


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


def test_a_miniature_of_every_experiment_resumes_and_a_rerun_only_rebuilds_the_report(
    tmp_path, capsys, monkeypatch, mini_data
):
    out = tmp_path / "out"
    flags = [
        *("--data", str(mini_data), "--out", str(out), "--preset", "tiny", "--weights", "none"),
        *("--sizes", ",".join(map(str, MINI_SIZES)), "--steps-scale", "0.00005"),
        *("--batch-size", "2", "--allow-cpu"),
    ]
    # 1. Interrupted (Ctrl-C) as the third run starts: exit 130, two runs finished.
    real_train, calls = training.run, []

    def interrupt_third(config, log=print):
        calls.append(config.model_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(config, log=log)

    monkeypatch.setattr(training, "run", interrupt_third)
    assert _reproduce(capsys, *flags)[0] == 130
    done = [d.name for d in (out / "runs").iterdir() if (d / "reproduce.json").is_file()]
    assert sorted(done) == ["mse224", "mse448"]

    # 2. The rerun skips those two and does the rest.
    monkeypatch.setattr(training, "run", real_train)
    code, printed, _ = _reproduce(capsys, *flags)
    assert code == 0
    assert "mse224: done, skipped" in printed and "mse448: done, skipped" in printed
    assert "m2cnn448_40k: starts from a copy of m2cnn448" in printed
    plan = _plan(out)
    runs = {r["name"]: r for r in plan["runs"]}
    assert runs["m2cnn448"]["init"] == "run:mt224" and runs["m2cnn720"]["image_size"] == 704
    assert runs["mse720"]["init"] == "none" and runs["mt224_60k"]["steps"] == 3
    for name, r in runs.items():
        assert json.loads((Path(r["model_dir"]) / "reproduce.json").read_text())["done"], name
    best = json.loads((out / "runs/m2cnn720/stage3/best.json").read_text())
    assert best["multi_cell_path"] == "large" and best["resolution"] == 704
    assert not json.loads((out / "runs/mt448/stage1/best.json").read_text())["multi_cell"]
    # 224@60k carries on 224@20k: its first epoch is 224@20k's, then two more.
    rows = reproduction_runs.epoch_rows(out / "runs/mt224_60k/stage1/epochs.csv")
    assert sorted(rows) == [1, 2, 3]

    tables = json.loads((out / "tables.json").read_text())
    cell = next(c for c in tables["table2"] if (c["size"], c["column"]) == (448, "M²CNN scores"))
    assert cell["paper"] == 0.830 and cell["run"] == "m2cnn448" and cell["kappa"] is not None
    assert cell["difference"] == round(cell["kappa"] - 0.830, 4) and len(cell["ci95"]) == 2
    row = next(c for c in tables["table3"] if (c["row"], c["split"]) == ("M²CNN", "test"))
    assert row["paper"] == 0.841 and row["kappa"] is not None and row["n_images"] == 4
    fig = {p["label"]: p for p in tables["fig4"]}
    assert fig["448*@32k"]["paper_hours"] == 4.0 and fig["448*@32k"]["steps"] == 2  # 1 + 1
    assert fig["224@60k"]["steps"] == 3 and fig["224@60k"]["hours"] > fig["224@20k"]["hours"]
    assert len(tables["fig4_claims"]) == 3 and any("miniature" in n for n in tables["notes"])
    assert "| 448 | M²CNN scores |" in (out / "tables.md").read_text()
    assert (out / "fig4.png").stat().st_size > 10_000

    # 3. Everything done: the rerun trains and evaluates nothing, it only rebuilds the report.
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    (out / "tables.md").unlink()

    def no_work(*args, **kwargs):
        raise AssertionError("a run or an evaluation ran on a finished reproduction")

    monkeypatch.setattr(training, "run", no_work)
    monkeypatch.setattr(evaluation, "run_evaluation", no_work)
    code, printed, _ = _reproduce(capsys, *flags)
    assert code == 0 and "trained 0 of 14 runs and evaluated 0 of 14" in printed
    assert (out / "tables.md").is_file()
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}


def test_the_protocol_is_consistent_with_itself():
    for run in protocol.RUNS.values():
        if run.continues:  # a run carries on one with the same settings and fewer steps
            base = protocol.RUNS[run.continues]
            same = (base.loss, base.multi_cell, base.size, base.init)
            assert same == (run.loss, run.multi_cell, run.size, run.init), run.name
            assert base.steps.value < run.steps.value
    for fig in protocol.FIG4:
        assert fig.run in protocol.RUNS
    for value in protocol.tagged_values().values():
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
    for topic, texts in protocol.deviation_rows().items():
        assert topic in table, f"README deviations table lacks the row {topic!r}"
        for text in texts:
            assert text in table[topic], f"README row {topic!r} does not say {text!r}"
