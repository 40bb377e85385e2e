"""Federated tests: single-threaded BLAS and Flower offline, set before numpy or flwr load; helpers importable."""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("flwr")
# the tests' helper modules (_fl_round5.py) import by name under any --import-mode
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="module")
def _old_objects_out_of_flowers_collections():
    """Flower's ArrayRecord.to_numpy_ndarrays(keep_input=False) forces gc.collect() on every call, and a full
    collection's cost grows with every object alive in the process: late in a whole test session (thousands of
    tests' worth of kernels, graphs and modules) a Bulyan run with a resume made enough of them to pass the
    120 s timeout. The objects alive when a module starts are frozen (never collected, never scanned) until it
    ends; what the module's own tests make is collected as usual."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
