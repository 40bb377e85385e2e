"""Fuzz round seventeen, part one: the performance API (``perf.measure``, ``perf.time_fn``, ``perf.place``,
``perf.roofs_for``, ``perf.Store``) and the tuner's device keys (``tune.device_key``, ``tune.size_bucket``) under
seeded bad arguments.

Rounds 12-16 fuzzed the PyTorch ops and the command line; round 13 swept ``tune.tune`` and ``SearchSpace``, round 12
the store's ``append`` of an unknown run. This round draws, with a fixed seed per argument, values of the wrong
kind for each argument of the library functions behind ``tilestack bench`` and ``tilestack tune`` in turn (a str,
a float, a bool, None, a list, a NumPy array, a 0-d tensor, NaN, inf, 1 << 70): each must be refused by a
TilestackError (or ValueError / TypeError) that names the argument, before any work (the timed function is never
called), and NumPy scalars must be taken as the numbers they are.

What this round found (each test below failed before its fix):
- ``perf.measure`` read ``items`` only after timing ``fn`` (a bad count refused after the work); ``ceilings="x"``
  (any non-Ceilings) timed ``fn`` and then failed with "'str' object has no attribute 'peak'"; a str or list
  ``window_s`` / ``budget_s`` / ``target_rel_ci`` failed inside the timing loop and was reported as ``fn``'s own
  error ("'k' raised TypeError while being timed"); ``energy="no"`` measured energy, ``graph=[]`` / ``nvtx=[]``
  were taken by their truth, ``dtype=0`` meant "read it off the arguments";
- ``perf.time_fn(budget_s=inf)`` ended in ``int(inf)`` (OverflowError) once a noisy fn had not converged in its
  first round; a non-number window or budget failed in a bare comparison;
- ``perf.place(kind=[...])`` failed "unhashable type" in the tip table, ``kind=1.5`` got the GPU's tips;
  ``perf.roofs_for(dev, "x", dtype)`` an AttributeError;
- ``perf.Store(path=1.5)`` failed inside pathlib; ``start_run(device=1.5)`` (or a list, True, NaN) stored a run on
  a device named "1.5"; a list label or command, or a ``run_id`` / ``latest_result`` name of a list or dict,
  failed inside sqlite3's binding ("Error binding parameter"), 1 << 70 with "Python int too large to convert to
  SQLite INTEGER"; ``versions="x"`` inside dict();
- ``tune.device_key(0)`` on a machine without CUDA was torch's bare AssertionError ("Torch not compiled with CUDA
  enabled"), ``device_key([1])`` "unhashable type: 'list'" from its cache; ``size_bucket(0)`` answered 2, above
  ``size_bucket(1) == 1``.
(The planner's and the federated API's findings are in part two, test_fuzz_round17_more.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _fuzz_round17 import POOL, draws, refused
from tilestack import perf
from tilestack.perf.roofline import Roof
from tilestack.perf.store import Store
from tilestack.tune import device_key, size_bucket


# ---- perf.measure: every argument checked before fn runs ------------------------------------------------------------
class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def measure_base() -> dict:
    return dict(args_sets=None, flops=1.0, bytes_read=1.0, bytes_written=1.0, name="k", ceilings=False, energy=False,
                repeats=3, device="cpu")


# argument -> the wrong kinds to draw from (values the argument rightly takes are left out)
MEASURE_BAD = {
    "items": ("str", "list", "nan", "inf", "neg", "array", "tensor"),
    "ceilings": ("str", "float", "bool", "list", "neg", "huge", "tensor", "array", "zero", "empty", "dict"),
    "energy": ("str", "float", "list", "empty", "dict", "array", "zero"),
    "graph": ("str", "float", "none", "list", "empty", "dict", "array", "zero"),
    "nvtx": ("str", "float", "none", "list", "nan", "array", "zero"),
    "window_s": ("str", "list", "nan", "inf", "neg", "zero", "array", "bool"),
    "budget_s": ("str", "list", "nan", "inf", "neg", "zero", "array", "bool"),
    "target_rel_ci": ("str", "list", "nan", "neg", "zero", "array", "bool"),
    "dtype": ("float", "zero", "empty", "dict", "array", "list"),
}
MEASURE_CASES = [(arg, label) for arg, labels in MEASURE_BAD.items() for label in draws(arg, labels)]


@pytest.mark.parametrize("arg, label", MEASURE_CASES, ids=[f"{a}-{b}" for a, b in MEASURE_CASES])
def test_measure_refuses_a_bad_argument_by_name_before_fn_runs(arg, label):
    fn = Counting()
    kw = measure_base() | {arg: POOL[label]}
    if arg == "budget_s" or arg == "window_s" or arg == "target_rel_ci":
        kw["repeats"] = None            # the knobs of a run timed until its median is known
    refused(lambda: perf.measure(fn, **kw), arg, POOL[label])
    assert fn.calls == 0, f"{arg}={POOL[label]!r}: fn ran {fn.calls} times before the refusal"


def test_measure_takes_numpy_scalars_as_numbers():
    fn = Counting()
    m = perf.measure(fn, **measure_base() | dict(flops=np.float64(2e6), bytes_read=np.int64(4096),
                                                   items=np.int64(10), repeats=3))
    assert fn.calls >= 3 and m.flops == 2e6 and m.bytes_read == 4096 and m.items == 10
    assert m.flops_per_s == pytest.approx(2e6 / m.latency_s)


@pytest.mark.parametrize("arg, value", [("budget_s", math.inf), ("window_s", math.inf), ("budget_s", "2"),
                                        ("window_s", [0.1]), ("target_rel_ci", "0.02")])
def test_time_fn_refuses_a_window_or_budget_that_is_no_finite_time(arg, value):
    fn = Counting()
    message = refused(lambda: perf.time_fn(fn, **{arg: value}), arg, value)
    assert "expected a positive" in message and fn.calls == 0


# ---- perf.place / roofs_for ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["list", "float", "none", "array", "dict"])
def test_place_refuses_a_kind_that_is_no_name(label):
    roof = Roof(peak_flops_per_s=1e12, bandwidth=1e11)
    refused(lambda: perf.place(flops=1e9, bytes_moved=1e8, seconds=1e-3, roof=roof, kind=POOL[label]), "kind",
            POOL[label])


def test_place_against_a_hand_computation():
    # 1e9 FLOPs, 1e8 bytes in 1 ms under (1e12 FLOP/s, 1e11 B/s): intensity 10 < ridge 10? ridge = 1e12 / 1e11 = 10,
    # so intensity 10 is compute-bound at 1e12 FLOP/s achieved: fraction 1.0
    p = perf.place(flops=np.float64(1e9), bytes_moved=np.int64(10 ** 8), seconds=np.float64(1e-3),
                   roof=Roof(1e12, 1e11), kind="cpu")
    assert p.intensity == 10.0 and p.bound == "compute" and p.fraction == pytest.approx(1.0)


@pytest.mark.parametrize("label", ["str", "float", "list", "tensor", "huge"])
def test_roofs_for_refuses_ceilings_that_are_no_ceilings(label):
    dev = perf.detect("cpu")
    refused(lambda: perf.roofs_for(dev, POOL[label], "fp32"), "ceilings", POOL[label])


# ---- perf.Store ----------------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "results.db")
    run = st.start_run(device="cpu: test", versions={})
    m = perf.compute_metrics(name="k", latency_s=1e-3, flops=1e9, bytes_read=1e6, bytes_written=1e6,
                             device="cpu: test")
    st.append(run, m)
    yield st, run, m
    st.close()


def _rows(st: Store) -> tuple[int, int]:
    count = lambda table: st._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
    return count("runs"), count("results")


STORE_BAD = {
    "device": ("float", "bool", "list", "nan", "huge", "empty", "dict", "tensor", "array", "zero"),
    "label": ("list", "huge", "empty", "dict", "tensor", "float", "array"),
    "command": ("list", "huge", "dict", "tensor", "bool"),
    "versions": ("str", "float", "list", "tensor", "array", "neg"),
    "ceilings": ("str", "float", "list", "dict", "zero"),
}
STORE_CASES = [(arg, label) for arg, labels in STORE_BAD.items() for label in draws(arg, labels)]


@pytest.mark.parametrize("arg, label", STORE_CASES, ids=[f"{a}-{b}" for a, b in STORE_CASES])
def test_start_run_refuses_a_bad_argument_by_name_and_stores_nothing(store, arg, label):
    st, _, _ = store
    before = _rows(st)
    kw = dict(device="cpu: test", versions={}) | {arg: POOL[label]}
    refused(lambda: st.start_run(**kw), arg, POOL[label])
    assert _rows(st) == before


@pytest.mark.parametrize("label", ["list", "huge", "dict", "tensor"])
def test_append_and_latest_result_refuse_a_key_sqlite_cannot_bind(store, label):
    st, _, m = store
    before = _rows(st)
    refused(lambda: st.append(POOL[label], m), "run_id", POOL[label])
    refused(lambda: st.latest_result(POOL[label]), "name", POOL[label])
    assert _rows(st) == before
    run_id, latest = st.latest_result("k")          # the store still answers
    assert latest.latency_s == m.latency_s and st.run(run_id).n_results == 1


@pytest.mark.parametrize("label", ["float", "bool", "list", "dict", "tensor"])
def test_store_refuses_a_path_that_is_no_path(label, tmp_path):
    refused(lambda: Store(POOL[label]), "path", POOL[label])


# ---- tune.device_key / size_bucket ---------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["str", "float", "bool", "none", "list", "neg", "nan", "array", "dict"])
def test_device_key_refuses_an_index_that_is_no_device_index(label):
    refused(lambda: device_key(POOL[label]), "index", POOL[label])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_device_key_without_cuda_says_so_naming_the_index():
    message = refused(lambda: device_key(0), "index", 0)
    assert "0 CUDA device" in message and "DeviceKey.parse" in message


def test_size_bucket_is_the_next_power_of_two_and_never_falls():
    sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 3000, 4096, 4097, 1 << 40, (1 << 40) + 1]
    buckets = [size_bucket(n) for n in sizes]
    expected = []
    for n in sizes:                                     # by hand: double from 1 until the size fits
        b = 1
        while b < n:
            b *= 2
        expected.append(b)
    assert buckets == expected
    assert all(a <= b for a, b in zip(buckets, buckets[1:], strict=False))
    assert size_bucket(np.int64(3000)) == 4096           # a NumPy int is a size
