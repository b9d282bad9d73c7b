"""Shared test setup: quiet TensorFlow, and seed every fixture and test.

Groups and order of the tests under pytest-xdist: tests/_groups.py.

Seeds: pytest builds fixtures of a wider scope first, so a function-scoped seed would come
after a module fixture had already built its model; here every scope is seeded before the
fixtures of that scope (autouse fixtures come first within a scope), so a module's models do
not depend on which tests ran before it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest
from _groups import pytest_collection_modifyitems  # noqa: F401  (a hook)

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
