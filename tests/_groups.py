"""How `make test` shares its work between two pytest-xdist workers (`--dist loadgroup`).

Each worker builds its own copy of a module or session fixture, so the modules whose module
fixtures build a model or an export run on one worker each, and build it once; so do all the
serve tests (tests/serve/), whose session fixtures start the servers. Free of TensorFlow: the test
of the groups (test_xdist_groups.py) runs this hook in a pytest of its own.
"""

from __future__ import annotations

import pytest

# Modules whose module-scoped fixtures build models or LiteRT exports (seconds each).
ONE_WORKER_MODULES = ("test_evaluation", "test_export", "test_model", "test_precision",
                      "test_prediction")  # fmt: skip
# The modules of the longest slow tests (minutes each: the reproduce miniature, the demo and
# paper-smoke recipes, the multi-process training runs), longest first: handed out before the
# other slow tests, so that the longest starts at once and the other worker takes the rest.
LONGEST_FIRST = ("test_reproduce", "test_end_to_end", "test_training_runs")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """The groups above; and the slow tests first, those of `LONGEST_FIRST` before the others,
    so that pytest-xdist, which hands out work in this order, starts the longest early instead
    of leaving one to run alone at the end."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if item.path.parent.name == "serve":
            item.add_marker(pytest.mark.xdist_group("serve"))
        elif item.path.stem in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))

    def order(item) -> tuple[bool, int]:
        stem = item.path.stem
        first = LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST)
        return item.get_closest_marker("slow") is None, first

    items.sort(key=order)
