"""Shared test setup: quiet TensorFlow, and seed every fixture and test.

Groups and order of the tests under pytest-xdist: tests/_groups.py.

Seeds: pytest builds fixtures of a wider scope first, so a function-scoped seed would come
after a module fixture had already built its model; here every scope is seeded before the
fixtures of that scope (autouse fixtures come first within a scope), so a module's models do
not depend on which tests ran before it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA's CPU backend without LLVM's optimisation passes and with its older elemental emitter
# for fusions (read at the first XLA compile; the subprocesses inherit it): the XLA tests check
# what --xla does to a run (the step compiled, augmentation in tf.data) and numbers to a
# tolerance, not the speed of the generated code. Measured here, train.py --xla, one step of
# the nano preset at 80 px: 81 CPU-s at the default level, 46 at 0 (an older machine); 25 at
# 0 and 13 with the fusion emitters off as well (this one).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)
if "PYTEST_XDIST_WORKER" in os.environ:
    # Under `pytest -n 2` two workers, and the processes they start, share the 2 cores: each
    # TensorFlow gets one intra-op thread (read when it starts; subprocesses inherit it), so
    # no kernel waits on a thread that the other worker's process holds. Measured here: two
    # train.py runs side by side took 37 s with TensorFlow's default (a thread per core) and
    # 28 s with one, at the same CPU time (docs/development.md).
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import pytest
from _groups import pytest_collection_modifyitems  # noqa: F401  (a hook)

SEED = 1234


def _hands_out_tests_only(config: pytest.Config) -> bool:
    """pytest-xdist's controller: it starts the workers and hands them tests, runs none."""
    return not hasattr(config, "workerinput") and bool(config.getoption("numprocesses", None))


def pytest_configure(config: pytest.Config) -> None:
    """In each process that runs tests: TensorFlow and Keras imported as the commands import
    them (`common.importing`: without the cyclic collector, then their objects frozen out of its
    sight); done here, so that a command the tests call in this process does not freeze the
    tests' objects. The controller never loads TensorFlow: it did for this module, 4-5 s
    before any worker started (docs/development.md)."""
    if _hands_out_tests_only(config):
        return
    from m2cnn_tf import common

    with common.importing():
        import keras  # noqa: F401  (TensorFlow with it)


def _seed() -> None:
    import keras

    keras.utils.set_random_seed(SEED)


@pytest.fixture(autouse=True, scope="session")
def _seed_session():
    _seed()


@pytest.fixture(autouse=True, scope="module")
def _seed_module():
    _seed()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    _seed()
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")
