"""The demo dataset generator (issue 3, "Demo dataset"): layout, determinism, lesion signal."""

from __future__ import annotations

import csv
import dataclasses
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep import demo

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 320  # small images keep every test fast


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    demo.generate(out, per_grade=3, eval_per_grade=2, seed=7, width=WIDTH)
    return out


def test_same_seed_writes_identical_bytes(small_set: Path, tmp_path: Path) -> None:
    demo.generate(tmp_path / "again", per_grade=3, eval_per_grade=2, seed=7, width=WIDTH)
    first, second = _files(small_set), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_different_seed_gives_different_images(small_set: Path, tmp_path: Path) -> None:
    demo.generate(tmp_path / "other", per_grade=3, eval_per_grade=2, seed=8, width=WIDTH)
    jpegs = {v for k, v in _files(small_set).items() if k.endswith(".jpeg")}
    other = {v for k, v in _files(tmp_path / "other").items() if k.endswith(".jpeg")}
    assert len(jpegs) == len(other) == 3 * 5 + 2 * 2 * 5
    assert not jpegs & other


def test_kaggle_layout_csv_columns_and_split_counts(small_set: Path) -> None:
    train_cols, train = _read_csv(small_set / "trainLabels.csv")
    sol_cols, solution = _read_csv(small_set / "retinopathy_solution.csv")
    assert train_cols == ["image", "level"]
    assert sol_cols == ["image", "level", "Usage"]
    assert Counter(int(r["level"]) for r in train) == {g: 3 for g in range(5)}
    for usage in ("Public", "Private"):  # Public → val, Private → test
        rows = [r for r in solution if r["Usage"] == usage]
        assert Counter(int(r["level"]) for r in rows) == {g: 2 for g in range(5)}
    assert {r["Usage"] for r in solution} == {"Public", "Private"}
    names = [r["image"] for r in train + solution]
    assert all(re.fullmatch(r"\d+_(left|right)", n) for n in names)
    assert len(set(names)) == len(names)
    assert {p.name for p in (small_set / "train").iterdir()} == {
        f"{r['image']}.jpeg" for r in train
    }
    assert {p.name for p in (small_set / "test").iterdir()} == {
        f"{r['image']}.jpeg" for r in solution
    }


def test_images_are_kaggle_like_jpegs_with_black_borders(small_set: Path) -> None:
    height = round(WIDTH * 2 / 3)
    for path in sorted((small_set / "train").glob("*.jpeg"))[:6]:
        assert path.read_bytes()[:2] == b"\xff\xd8"  # a real JPEG, not PNG bytes with .jpeg
        img = cv2.imread(str(path))
        assert img.shape == (height, WIDTH, 3)
        corners = [img[:8, :8], img[:8, -8:], img[-8:, :8], img[-8:, -8:]]
        assert all(c.mean() < 20 for c in corners)  # black border
        disc = img[height // 2 - 20 : height // 2 + 20, WIDTH // 2 - 20 : WIDTH // 2 + 20]
        assert disc[..., 2].mean() > 60  # the reddish fundus in the middle (BGR)
        dark_cols = (img.max(axis=(0, 2)) < 30).sum()
        assert dark_cols > WIDTH * 0.15  # left/right black margins: a disc on a 3:2 canvas


def test_both_eyes_of_a_patient_share_a_folder_split_and_close_grade(small_set: Path) -> None:
    _, train = _read_csv(small_set / "trainLabels.csv")
    _, solution = _read_csv(small_set / "retinopathy_solution.csv")
    split_of = {r["image"]: "train" for r in train}
    split_of |= {r["image"]: r["Usage"] for r in solution}
    grade_of = {r["image"]: int(r["level"]) for r in train + solution}
    eyes: dict[str, list[str]] = {}
    for name in grade_of:
        eyes.setdefault(name.split("_")[0], []).append(name)
    # 15 train images (7 patients + 1 with a single eye), 10 per eval split (5 patients each).
    assert sorted(Counter(len(v) for v in eyes.values()).items()) == [(1, 1), (2, 17)]
    for names in eyes.values():
        assert len({split_of[n] for n in names}) == 1  # same folder and same split
        assert max(grade_of[n] for n in names) - min(grade_of[n] for n in names) <= 1
        for n in names:
            folder = "train" if split_of[n] == "train" else "test"
            assert (small_set / folder / f"{n}.jpeg").is_file()


def test_eye_grades_are_correlated_but_not_always_equal() -> None:
    specs = demo.plan(per_grade=40, eval_per_grade=0, seed=0, width=WIDTH)
    by_patient: dict[str, list[int]] = {}
    for s in specs:
        by_patient.setdefault(s.name.split("_")[0], []).append(s.grade)
    diffs = Counter(abs(a - b) for a, b in by_patient.values())
    assert set(diffs) == {0, 1}  # like real data: mostly equal, sometimes one grade apart
    assert diffs[0] > diffs[1] > 0


def _graham(img: np.ndarray, sigma: float) -> np.ndarray:
    """Eq. (1), written out here as the reference: 4·I − 4·G(σ)∗I + 128."""
    f = img.astype(np.float64)
    return np.clip(4 * f - 4 * cv2.GaussianBlur(f, (0, 0), sigma) + 128, 0, 255)


def test_lesion_signal_increases_with_grade() -> None:
    """Anomalous pixels against the lesion-free render of the same pose, measured here."""
    specs = demo.plan(per_grade=1, eval_per_grade=0, seed=3, width=480)[:4]
    dark, bright, local = np.zeros(5), np.zeros(5), np.zeros(5)
    for spec in specs:
        clean = demo.render(dataclasses.replace(spec, grade=0)).astype(np.int16)
        disc = np.zeros(clean.shape[:2], np.uint8)
        cx, cy = spec.centre
        cv2.circle(disc, (round(cx), round(cy)), round(0.9 * spec.diameter / 2), 1, -1)
        # Eq. (1)'s σ=10 at 720 px, scaled to this disc diameter.
        sigma = 10 * spec.diameter / 720
        g_clean = _graham(clean.astype(np.uint8), sigma)
        for g in range(5):
            img = demo.render(dataclasses.replace(spec, grade=g)).astype(np.int16)
            diff = img - clean
            r, gr, b = diff[..., 0], diff[..., 1], diff[..., 2]
            dark[g] += ((r < -15) & (gr < -5) & (b <= 0) & (disc > 0)).sum()  # red-brown dots
            bright[g] += ((r >= 0) & (gr > 20) & (gr > b) & (disc > 0)).sum()  # yellow/pale
            local[g] += np.abs(_graham(img.astype(np.uint8), sigma) - g_clean)[disc > 0].mean()
    assert dark[0] == bright[0] == local[0] == 0  # grade 0: the untouched photograph
    assert dark[1] > 0 and bright[1] == 0  # grade 1: microaneurysms only
    assert all(np.diff(dark) > 0), dark
    assert bright[2] > 0 and bright[3] > bright[2], bright
    assert all(np.diff(local) > 0), local  # the signal survives local contrast normalisation


def test_background_is_the_skimage_retina_photograph_loaded_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    demo._base_fundus.cache_clear()
    from skimage import data

    reference = data.retina()  # the photograph shipped in the scikit-image wheel
    size = 400
    scale = size / reference.shape[1]
    ys, xs = np.nonzero(reference.max(axis=2) > 20)  # its disc, to place the render on it
    spec = dataclasses.replace(
        demo.plan(per_grade=1, eval_per_grade=0, seed=0, width=600)[0],
        grade=0,
        width=size,
        height=size,
        diameter=scale * (np.ptp(xs) + np.ptp(ys)) / 2,
        centre=(scale * (xs.min() + xs.max()) / 2, scale * (ys.min() + ys.max()) / 2),
        angle=0.0,
        mirror=False,
        gain=(1.0, 1.0, 1.0),
        gamma=1.0,
        gradient=(0.0, 0.0),
        vignette=0.0,
        blur=0.0,
        black_level=0.0,
        noise=0.0,
    )
    rendered = demo.render(spec).astype(np.float64)
    expected = cv2.resize(reference, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
    inner = np.zeros((size, size), np.uint8)
    cv2.circle(inner, (size // 2, size // 2), int(size * 0.45), 1, -1)
    a, b = rendered[inner > 0], expected[inner > 0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97
    assert np.abs(a - b).mean() < 8


def test_rerun_replaces_a_previous_demo_dataset(tmp_path: Path) -> None:
    out = tmp_path / "d"
    demo.generate(out, per_grade=2, eval_per_grade=0, seed=1, width=160)
    demo.generate(out, per_grade=1, eval_per_grade=0, seed=1, width=160)
    _, rows = _read_csv(out / "trainLabels.csv")
    assert {p.name for p in (out / "train").iterdir()} == {f"{r['image']}.jpeg" for r in rows}
    assert len(rows) == 5


def test_cli_writes_dataset_and_reports_counts(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.demo",
            "--out",
            str(out),
            "--per-grade",
            "1",
            "--eval-per-grade",
            "1",
            "--seed",
            "2",
            "--width",
            "160",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "15 images" in proc.stdout
    assert len(list((out / "test").glob("*.jpeg"))) == 10


def test_cli_rejects_bad_counts_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.run([demo.PROG, "--out", str(tmp_path / "x"), "--per-grade", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.demo: error: --per-grade: ") and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert demo.run([demo.PROG, "--out", str(tmp_path / "x"), "--width", "wide"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.demo: error: ") and "--width" in err and "\n" not in err
    assert demo.run([demo.PROG, "--per-grade", "1"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.run([demo.PROG, "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--per-grade" in shown and "--eval-per-grade" in shown and "--width" in shown


def test_cli_refuses_a_foreign_non_empty_folder_and_keeps_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.jpeg").write_bytes(b"user data")
    assert demo.run([demo.PROG, "--out", str(tmp_path), "--per-grade", "1"]) == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "not empty" in err
    assert (tmp_path / "train" / "precious.jpeg").read_bytes() == b"user data"
