"""Shared test setup: quiet TensorFlow, and seed every fixture and test.

Groups: under pytest-xdist (`make test`, `--dist loadgroup`) each worker builds its own copy of a
module fixture, so the modules whose module fixtures build a model or an export run on one
worker each, and build it once.

Seeds: pytest builds fixtures of a wider scope first, so a function-scoped seed would come
after a module fixture had already built its model; here every scope is seeded before the
fixtures of that scope (autouse fixtures come first within a scope), so a module's models do
not depend on which tests ran before it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest

SEED = 1234


@pytest.fixture(autouse=True, scope="session")
def _seed_session():
    keras.utils.set_random_seed(SEED)


@pytest.fixture(autouse=True, scope="module")
def _seed_module():
    keras.utils.set_random_seed(SEED)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(SEED)
    yield
    keras.mixed_precision.set_global_policy("float32")


# Modules whose module-scoped fixtures build models or LiteRT exports (seconds each).
ONE_WORKER_MODULES = ("test_evaluation", "test_export", "test_model", "test_precision",
                      "test_prediction")  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """The groups above; and the slow tests first, so that pytest-xdist, which hands out work
    in this order, starts the longest early instead of leaving one to run alone at the end."""
    for item in items:
        name = item.path.stem
        if name in ONE_WORKER_MODULES and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(name))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
