import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py and other test helpers

# Winograd wherever a layer can take it, without timing the machine (ddpm.nn.winograd.pays): every test runs the
# same kernels on every machine, as before the choice was measured; test_winograd covers the measured choice
os.environ.setdefault("DDPM_WINOGRAD", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's `pytest -n 2`: one thread per worker, and
    os.environ["OMP_NUM_THREADS"] = "1"  # so the ddpm commands they start (a run trained in a subprocess must equal
    torch.set_num_threads(1)  # one trained in the test's process bit for bit: the same thread count, one sum order)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on the shared 2-core machines a second OpenMP thread waits on a busy
    core (the 1000-step sampling runs took 42 s against 8 s, network tests ~10x longer)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# make test's two workers take whole files (`--dist loadfile --no-loadscope-reorder`) in collection order, each the
# next file when it is free: the longest first, so that neither is left with a long file at the end while the other
# idles. pytest-xdist's own order (by the number of tests) put test_distributed (3 tests, 66 s) and
# test_compiled (3, 43 s) last: 343 s of wall for 605 s of tests (the Xeon, family 6 model 167, session 13).
LONGEST_FIRST = ("test_diffusion.py", "test_distributed.py", "test_metrics.py", "test_survival.py",
                 "test_compiled.py", "test_readme.py", "test_fashion.py", "test_winograd.py", "test_fused.py",
                 "test_sampling.py", "test_lock.py", "test_importance.py", "test_runtime.py", "test_conditional.py",
                 "test_train_cli.py", "test_restoration.py", "test_evaluate_cli.py", "test_convert.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
