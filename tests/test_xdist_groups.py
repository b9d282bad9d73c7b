"""`make test`'s worker groups hold: a group's tests run on one pytest-xdist worker, so a module
fixture that builds a model is built once (tests/conftest.py). pytest 9.2 silently undid this
(pytest-dev/pytest-xdist#1386); requirements.txt pins a pytest under which it holds."""

import shutil
import subprocess
import sys
from collections import defaultdict

from _subprocess import ENV, ROOT

RECORD = """
import os
from pathlib import Path

import pytest
{mark}

@pytest.mark.parametrize("i", range(6))
def test_records_its_worker(i):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    Path({out!r}, f"{{__name__}}-{{i}}").write_text(worker)
"""


def test_a_groups_tests_run_on_one_worker_by_mark_and_by_conftest_module_list(tmp_path):
    project, out = tmp_path / "tests", tmp_path / "out"
    project.mkdir(), out.mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", project / "conftest.py")
    modules = {
        "test_marked": 'pytestmark = pytest.mark.xdist_group("marked")',
        "test_export": "",  # one of conftest.ONE_WORKER_MODULES
        "test_free": "",
    }
    for name, mark in modules.items():
        (project / f"{name}.py").write_text(RECORD.format(mark=mark, out=str(out)))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-n", "2",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(project)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    workers = defaultdict(set)
    for record in out.iterdir():
        workers[record.name.rsplit("-", 1)[0]].add(record.read_text())
    assert len(workers["test_marked"]) == 1 and len(workers["test_export"]) == 1, dict(workers)
    assert set().union(*workers.values()) == {"gw0", "gw1"}  # two workers ran, one a group each
