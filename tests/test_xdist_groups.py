"""`make test`'s worker groups hold: a group's tests run on one pytest-xdist worker, so a module
fixture that builds a model is built once (tests/_groups.py). pytest 9.2 silently undid this
(pytest-dev/pytest-xdist#1386); requirements.txt pins a pytest under which it holds."""

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from _subprocess import ENV, ROOT, run_group, run_json_script

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


def _run_pytest(project: Path, workers: str) -> None:
    """pytest with the suite's settings and tests/_groups.py's hook (without the TensorFlow
    seeding of tests/conftest.py) on the test files in `project`."""
    tests = str(ROOT / "tests")
    (project / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\n"
        "from _groups import pytest_collection_modifyitems  # noqa: F401\n"
    )
    done = run_group(  # its group killed afterwards: the xdist workers too
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-n", workers,
         "-p", "no:cacheprovider", "--rootdir", str(project), str(project)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=project,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.slow
def test_a_groups_tests_run_on_one_worker_by_mark_by_module_list_and_for_serve(tmp_path):
    project, out = tmp_path / "tests", tmp_path / "out"
    (project / "serve").mkdir(parents=True), out.mkdir()
    modules = {
        "test_marked": 'pytestmark = pytest.mark.xdist_group("marked")',
        "test_export": "",  # one of _groups.ONE_WORKER_MODULES
        "serve/test_serve_a": "",  # tests/serve/: one group
        "serve/test_serve_b": "",
        "test_free": "",
    }
    for name, mark in modules.items():
        (project / f"{name}.py").write_text(RECORD.format(mark=mark, out=str(out)))
    _run_pytest(project, "2")
    workers = defaultdict(set)
    for record in out.iterdir():
        workers[record.name.rsplit("-", 1)[0]].add(record.read_text())
    assert len(workers["test_marked"]) == 1 and len(workers["test_export"]) == 1, dict(workers)
    serve = workers["test_serve_a"] | workers["test_serve_b"]
    assert len(serve) == 1 and len(workers["test_serve_a"]) == 1, dict(workers)
    assert set().union(*workers.values()) == {"gw0", "gw1"}  # two workers ran, one a group each


def test_the_slow_tests_are_handed_out_first_the_longest_modules_before_the_others(tmp_path):
    """pytest-xdist hands out work in collection order: the slow tests go first, those of
    `_groups.LONGEST_FIRST` (test_training_runs is one) before the other slow ones, so that the
    longest do not start last and run alone at the end."""
    project, order = tmp_path / "tests", tmp_path / "order.txt"
    project.mkdir()
    slow = "pytestmark = pytest.mark.slow"
    for name, mark in (("test_a_fast", ""), ("test_b_slow", slow), ("test_training_runs", slow)):
        (project / f"{name}.py").write_text(
            f"import pytest\n{mark}\n\ndef test_runs():\n"
            f"    with open({str(order)!r}, 'a') as f:\n        f.write('{name}\\n')\n"
        )
    _run_pytest(project, "0")
    assert order.read_text().split() == ["test_training_runs", "test_b_slow", "test_a_fast"]


CONFIGURE = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import conftest
from m2cnn_tf import common

frozen = []
common.freeze_imports = lambda: frozen.append(True)

class Controller:  # pytest -n 2: hands out tests
    def getoption(self, name, default=None):
        return 2 if name == "numprocesses" else default

class Worker(Controller):  # pytest-xdist's workers carry their input
    workerinput = {{"workerid": "gw0"}}

conftest.pytest_configure(Controller())
found = {{"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
          "frozen": len(frozen)}}
sys.modules["keras"] = type(sys)("keras")  # a worker's import, without its seconds
conftest.pytest_configure(Worker())
print(json.dumps({{**found, "worker_frozen": len(frozen)}}))
"""


def test_the_controller_never_loads_tensorflow_and_each_worker_freezes_its_imports():
    """pytest-xdist's controller loads tests/conftest.py but runs no test: TensorFlow there
    only delayed the workers' start by its import (4-5 s); each worker still freezes its
    import-time objects once (common.freeze_imports)."""
    found = run_json_script(CONFIGURE.format(tests=str(ROOT / "tests"), root=str(ROOT)), 120)
    assert found == {"tensorflow": False, "keras": False, "frozen": 0, "worker_frozen": 1}
