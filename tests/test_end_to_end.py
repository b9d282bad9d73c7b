"""The demo recipe end to end, in miniature: the real Makefile targets on a tiny data set.

`make demo` itself takes ~12 minutes; this runs the same steps (data_prep.demo ->
data_prep.kaggle -> train.py stages 1-3 -> evaluate.py -> predict.py --gradcam -> compare) with
the nano preset, small images and one short epoch per stage, so every CLI and every hand-over
between them is exercised on each CI run. Learning itself is tested in test_training_runs.py.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _subprocess import run_group

pytestmark = pytest.mark.slow  # make test-quick leaves these out

ROOT = Path(__file__).resolve().parents[1]
SIZES = (80, 352, 704)  # one per Multi-Cell path: small, medium, large


def _make(tmp_path: Path, *targets: str, **overrides: str) -> subprocess.CompletedProcess:
    variables = {
        "PY": sys.executable,
        "DEMO": str(tmp_path / "run"),
        "DEMO_DATA": str(tmp_path / "data"),
        "DEMO_GEN": "--per-grade 3 --eval-per-grade 2 --width 320",
        "DEMO_TRAIN": "--preset nano --seed 0 --deterministic",
        "DEMO_SIZES": ",".join(map(str, SIZES)),
        "DEMO_STAGE1": f"--weights none --epochs 1 --batch-size 4 --image-size {SIZES[0]}",
        "DEMO_STAGE2": f"--epochs 1 --batch-size 2 --steps-per-epoch 2 --image-size {SIZES[1]}",
        "DEMO_STAGE3": f"--epochs 1 --batch-size 2 --steps-per-epoch 1 --image-size {SIZES[2]}",
        "DEMO_EVAL": "--bootstrap 20",
        "DEMO_MIN_KAPPA": "-1",  # learning is not the point here; the gate is tested below
        **overrides,
    }
    command = ["make", "-C", str(ROOT), "-o", ".venv/.installed", *targets]
    command += [f"{k}={v}" for k, v in variables.items()]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # make's own group, killed afterwards: on a timeout, train.py (make's child) dies with it.
    # Below pytest-timeout's 600 s, so that this timeout, not pytest's, ends a hang.
    return run_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     timeout=540, env=env)  # fmt: skip


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_demo_recipe_runs_every_stage_end_to_end_and_a_rerun_redoes_nothing(tmp_path):
    first = _make(tmp_path, "demo")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "run"

    for stage, size in zip((1, 2, 3), SIZES, strict=True):
        report = json.loads((run / "reports" / f"stage{stage}" / "report.json").read_text())
        assert report["image_size"] == size and report["split"] == "test"
        assert report["n_images"] == 10  # 2 per grade
        meta = json.loads((run / "models" / f"stage{stage}" / "best.json").read_text())
        assert meta["stage"] == stage
    # Stage 3 carries the large cells; stage 2 only the medium ones.
    assert json.loads((run / "models/stage3/best.json").read_text())["multi_cell_path"] == "large"
    assert json.loads((run / "models/stage2/best.json").read_text())["multi_cell_path"] == "medium"

    panels = sorted((run / "gradcam").glob("*_gradcam.png"))
    assert len(panels) == 6
    rows = (run / "gradcam" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6
    summary = (run / "summary.txt").read_text()
    assert "check: kappa from scores" in summary and "(pass)" in summary
    assert "test 704×704" in summary
    timed = summary[summary.index("wall time per step") :].splitlines()[1:]
    assert [line.split()[0] for line in timed] == [
        "data", "records", "stage1", "stage2", "stage3",
        "evaluate1", "evaluate2", "evaluate3", "gradcam", "total",
    ]  # fmt: skip
    seconds = [float(line.split()[1]) for line in timed]
    assert all(s > 0 for s in seconds) and seconds[-1] == pytest.approx(sum(seconds[:-1]), abs=0.6)

    stamps = {p: p.stat().st_mtime_ns for p in run.glob("stage*.done")}
    again = _make(tmp_path, "demo")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train.py" not in again.stdout and "data_prep" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in run.glob("stage*.done")} == stamps

    # The kappa gate of the summary: the stage-3 kappa itself passes, the next float up fails.
    kappa = json.loads((run / "reports/stage3/report.json").read_text())["scores"]["kappa"]
    (run / "summary.txt").unlink()
    above = _make(tmp_path, "demo", DEMO_MIN_KAPPA=repr(math.nextafter(kappa, 2.0)))
    assert above.returncode != 0 and "(FAIL)" in above.stdout, above.stdout[-2000:]
    assert not (run / "summary.txt").exists()
    equal = _make(tmp_path, "demo", DEMO_MIN_KAPPA=repr(kappa))
    assert equal.returncode == 0 and "(pass)" in equal.stdout, equal.stdout[-2000:]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_demo_clean_removes_the_run_and_the_demo_data(tmp_path):
    for folder in ("run", "data"):
        (tmp_path / folder / "x").mkdir(parents=True)
    result = _make(tmp_path, "demo-clean")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_paper_smoke_trains_the_three_stage_chain_and_reports_each_stage(tmp_path):
    """`make paper-smoke` shrunk through PAPER_SMOKE_FLAGS (the nano preset at SIZES) on records
    written here: one table row per stage with its measurements, and the chain's checkpoints
    (stage 3 carries the large cells) whose sizes the table reports."""
    from _tfrecords import grade_images, write_split

    data = tmp_path / "data"
    records = data / "records"
    for size in SIZES:
        for split, grades in (("train", [0, 1, 2, 3]), ("val", [1, 4])):
            write_split(records, size, split, grade_images(grades, size, seed=size), grades)
    (data / "raw").mkdir()
    (data / "raw" / "retinopathy_solution.csv").write_text("image,level\n")
    (records / "manifest.json").write_text("{}")  # no counts: train.py reads the shards
    for i, stamp in enumerate(
        (data / "raw" / "retinopathy_solution.csv", records / "manifest.json")
    ):
        os.utime(stamp, (1_000_000 + i, 1_000_000 + i))  # make: the records are up to date

    flags = f"--preset nano --sizes {','.join(map(str, SIZES))}"
    done = _make(tmp_path, "paper-smoke", PAPER_SMOKE_FLAGS=flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data_prep" not in done.stdout and "--preset nano" in done.stdout
    row = re.compile(
        r"^\s*(\d)\s+(\d+)\s+([\d.]+)\s+(\d+) MB\s+(\d+) MB\s+(-?\d+) MB\s+(-?\d+) MB\s+\S.*$", re.M
    )
    rows = row.findall(done.stdout)
    stages = [(int(r[0]), int(r[1])) for r in rows]
    assert stages == [(1, SIZES[0]), (2, SIZES[1]), (3, SIZES[2])], done.stdout[-3000:]
    out = tmp_path / "run" / "paper-smoke"
    per_image = []
    for (stage, size, step_s, rss_mb, ckpt_mb, image_mb, _), path in zip(
        rows, ("small", "medium", "large"), strict=True
    ):
        meta = json.loads((out / f"stage{stage}" / "best.json").read_text())
        assert meta["stage"] == int(stage) and meta["resolution"] == int(size)
        assert meta["preset"] == "nano" and meta["multi_cell_path"] == path
        best = out / f"stage{stage}" / "best.keras"
        assert int(ckpt_mb) == round(best.stat().st_size / 1e6)
        assert float(step_s) > 0 and int(rss_mb) > 100  # a TensorFlow process: > 100 MB
        per_image.append(int(image_mb))
    assert per_image == sorted(per_image) and per_image[-1] > 0  # grows with the image size
