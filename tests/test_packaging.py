"""The package installs with pip and its m2cnn-* commands run the same mains as the scripts."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirement_lines(section_end: str) -> list[str]:
    """requirements.txt's pins above the `section_end` comment (the runtime part)."""
    lines = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith(section_end):
            break
        if line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    return lines


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_project_dependencies_are_the_runtime_pins_of_requirements_txt():
    runtime = _requirement_lines("# Development")
    assert runtime, "requirements.txt lost its runtime section"
    assert all("==" in pin for pin in runtime)
    assert sorted(_project()["dependencies"]) == sorted(runtime)


@pytest.mark.slow
def test_pip_install_no_deps_gives_working_commands_outside_the_source_tree(tmp_path):
    """A fresh venv that sees the pinned requirements (through a .pth file pointing at this
    interpreter's site-packages) takes `pip install --no-deps .`; each m2cnn-* command then
    answers --help from the installed copy, not from the checkout."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "*cache*")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    site = subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "pinned_requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    for name in _project()["scripts"]:
        done = subprocess.run(
            [bin_dir / name, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert "flags" in done.stdout.lower() or "usage" in done.stdout.lower(), name
    where = subprocess.run(
        [bin_dir / "python", "-c", "import m2cnn_tf, data_prep; print(m2cnn_tf.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(site)
