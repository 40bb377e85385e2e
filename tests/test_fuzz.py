"""The seeded fuzzer (tilestack.testing.fuzz): a small budget of every kernel on both CPU backends (the reference
executor and Triton's interpreter) must find nothing, and the fuzzer itself must catch a wrong element, a
forgotten one and a crash.

A larger run: ``PYTHONPATH=src python scripts/fuzz.py --budget 2000`` (docs/reliability.md has the counts).
Set TILESTACK_FUZZ_SEED to fuzz other problems than CI's.
"""

import math
import os

import pytest
import torch

import tilestack.kernels
from tilestack.testing import fuzz

SEED = int(os.environ.get("TILESTACK_FUZZ_SEED", "0"))
# problems per kind on the CPU: about 2.5 minutes in all on 2 cores (attention's backward is the slowest)
CI_BUDGET = {"gemm": 30, "softmax": 24, "layer_norm": 20, "rms_norm": 14, "layer_norm_bwd": 12, "rms_norm_bwd": 10,
             "attention": 40}


@pytest.mark.parametrize("kind", list(CI_BUDGET))
def test_small_budget_finds_nothing(kind):
    report = fuzz.fuzz(CI_BUDGET[kind], seed=SEED, device="cpu", kinds=(kind,))
    print(report.summary())
    assert report.tried == CI_BUDGET[kind]
    assert {o.backend for o in report.outcomes} == {"reference", "triton"}
    assert not report.failures, report.summary()


# ---- the fuzzer catches what it is for -------------------------------------------------------------------------
def _fuzz_gemm_with(monkeypatch, wrong) -> fuzz.Report:
    real = tilestack.kernels.gemm

    def patched(a, b, **kw):
        return wrong(real(a, b, **kw))

    monkeypatch.setattr(tilestack.kernels, "gemm", patched)
    return fuzz.fuzz(12, seed=3, device="cpu", backends=("reference",), kinds=("gemm",))


def _nonempty(report: fuzz.Report) -> list[fuzz.Outcome]:
    return [o for o in report.outcomes if " M=0 " not in o.problem and " N=0 " not in o.problem]


def test_a_wrong_element_is_a_mismatch(monkeypatch):
    def off_by_a_percent(c):
        if c.numel():
            c[c.shape[0] // 2, 0] += 0.02 * c.abs().max() + 1
        return c

    report = _fuzz_gemm_with(monkeypatch, off_by_a_percent)
    assert all(o.status == "mismatch" for o in _nonempty(report)), report.summary()
    assert "error" in report.failures[0].detail and "bound" in report.failures[0].detail


def test_a_forgotten_element_is_nan(monkeypatch):
    def forget_one(c):
        if c.numel():
            c[-1, -1] = math.nan          # as a kernel that skips the last ragged tile leaves its poison
        return c

    report = _fuzz_gemm_with(monkeypatch, forget_one)
    assert all(o.status == "nan" for o in _nonempty(report)), report.summary()


def test_an_exception_is_a_crash(monkeypatch):
    def boom(c):
        raise RuntimeError("illegal memory access")

    report = _fuzz_gemm_with(monkeypatch, boom)
    assert report.count("crash") == report.tried
    assert "RuntimeError: illegal memory access" in report.failures[0].detail


def test_problems_replay_alone():
    caps = fuzz.attention_capabilities()
    first = [fuzz.draw(i, 7, "cpu", ("reference", "triton"), caps)[2][0] for i in range(30)]
    again = [fuzz.draw(i, 7, "cpu", ("reference", "triton"), caps)[2][0] for i in (29, 3, 0)]
    assert again == [first[29], first[3], first[0]]
    assert len(set(first)) == 30


def test_poisoned_allocations_poison_and_restore():
    empty = torch.empty
    with fuzz.poisoned_allocations():
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2)).isnan().all()
        assert torch.zeros(1).new_empty(4).isnan().all()
        assert torch.empty(2, dtype=torch.int32).dtype == torch.int32      # integers left alone
    assert torch.empty is empty


@pytest.mark.parametrize("got,want,tol,status", [
    ([1.0, 2.0], [1.0, 2.0 + 1e-4], 1e-3, None),
    ([1.0, 2.1], [1.0, 2.0], 1e-3, "mismatch"),
    ([1.0, math.nan], [1.0, 2.0], 1e-6, "nan"),
    ([1.0, math.inf], [1.0, 2.0], 1e-6, "nan"),
    ([1.0, math.nan], [1.0, math.nan], 1e-6, None),       # NaN where float64 is NaN (torch's own answer)
    ([1.0, 3.0], [1.0, math.nan], 1e-6, "mismatch"),
    ([-math.inf], [-math.inf], 1e-6, None),
    ([math.inf], [-math.inf], 1e-6, "mismatch"),
    ([1.0, 2.0], [1.0, 2.0, 3.0], 1e-6, "mismatch"),
    ([math.inf], [7e4], 1.0, None),                       # fp16 overflows at 65520: inf is the right answer
    ([-math.inf], [7e4], 1.0, "nan"),
    ([math.inf], [6e4], 1.0, "nan"),
], ids=("within", "outside", "nan", "inf", "nan-nan", "finite-for-nan", "same-inf", "other-inf", "shape",
        "overflow", "overflow-sign", "no-overflow"))
def test_check(got, want, tol, status):
    got, want = torch.tensor(got, dtype=torch.float16), torch.tensor(want, dtype=torch.float64)
    if status is None:
        fuzz.check("t", got, want, torch.tensor(tol))
    else:
        with pytest.raises(fuzz.Mismatch) as e:
            fuzz.check("t", got, want, torch.tensor(tol))
        assert e.value.status == status


def test_accumulation_error_covers_a_truncating_tensor_core_dot():
    """A depth-256 dot whose 16-product k-steps are added to an f32 accumulator rounding toward zero (the worst
    a tensor core may do), on scores of one sign as the fuzzer's "negative" attention style makes them: the
    error grows with the number of k-steps, and fuzz.accumulation_error bounds it for every row."""
    import numpy as np

    rng = np.random.default_rng(0)
    D, rows = 256, 2000
    q = (1 + 0.1 * np.abs(rng.standard_normal((rows, D)))).astype(np.float16).astype(np.float64)
    k = (-13.0 * (1 + 0.1 * np.abs(rng.standard_normal((rows, D))))).astype(np.float16).astype(np.float64)
    exact = (q * k).sum(1)
    acc = np.zeros(rows, dtype=np.float32)
    for j in range(0, D, fuzz.TENSOR_CORE_K):
        step = acc.astype(np.float64) + (q[:, j:j + 16] * k[:, j:j + 16]).sum(1)   # exact within the step
        rounded = step.astype(np.float32)
        away = np.abs(rounded.astype(np.float64)) > np.abs(step)
        acc = np.where(away, np.nextafter(rounded, np.float32(0)), rounded)          # toward zero
    err = np.abs(acc.astype(np.float64) - exact)
    smax = float(np.abs(q * k).sum(1).max())
    assert err.max() <= fuzz.accumulation_error(D, smax)
    assert err.max() > 4 * fuzz.U32 * smax          # more than a few roundings: the term is needed
