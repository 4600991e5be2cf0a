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
