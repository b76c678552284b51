import dataclasses
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# torch threads per test process: 2, or the cores each pytest-xdist worker has (the default run starts one worker
# per core: `-n auto` in setup.cfg); IWD_TEST_THREADS=1 beside a background run. Oversubscribed threads slow torch
# down 10-40x here.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("IWD_TEST_THREADS", max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))))


@pytest.fixture(autouse=True, scope="session")
def _expert_cache(tmp_path_factory):
    """The one artefact cache (feature networks, expert buffers) is a temporary folder, never the user's ~/.cache."""
    os.environ["IWD_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def digits():
    from benchmark.data.datasets import get_dataset
    return get_dataset("digits")


@pytest.fixture(scope="session")
def digits64(digits):
    """The digits dataset in float64, for checking math."""
    return dataclasses.replace(digits, x_train=digits.x_train.double(), x_test=digits.x_test.double())


@pytest.fixture
def task_of():
    from benchmark.core.method import Task

    def make(ds, ipc=1, seed=0, **kw):
        return Task(ds, ipc, seed, **kw)
    return make


@pytest.fixture
def interrupt_at():
    """interrupt_at(method, k): make the method stop (KeyboardInterrupt, as from Ctrl-C or a killed session) when it
    reaches iteration k."""
    def wrap(method, iteration):
        orig = method.iteration

        def stopping(task, state, it, gen):
            if it == iteration:
                raise KeyboardInterrupt
            return orig(task, state, it, gen)
        method.iteration = stopping
        return method
    return wrap
