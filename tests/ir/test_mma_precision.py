"""The mma op's input precision: f32 operands exact ("ieee", the default) or rounded to tf32 (the tensor cores'
10-bit mantissa, to nearest even), the same on the reference executor and under Triton's interpreter, and the
error of a tf32 product against float64 within its bound.
"""

import math

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import TraceError
from tilestack.ir.ops import round_tf32

ULP = 2.0**-10     # tf32's spacing at 1


def test_round_tf32_is_round_to_nearest_even():
    x = np.array([1.0, 1 + ULP / 2, 1 + 3 * ULP / 2, 1 + ULP / 2 + 2.0**-20, -(1 + ULP / 2 + 2.0**-20),
                  1 + ULP / 4, 3.0e-39, math.inf, -math.inf, np.finfo(np.float32).max, math.nan])
    want = [1.0, 1.0, 1 + 2 * ULP, 1 + ULP, -(1 + ULP), 1.0, None, math.inf, -math.inf, math.inf, None]
    got = round_tf32(x)
    for g, w in zip(got[:6], want[:6], strict=True):
        assert g == w
    assert got[6] == pytest.approx(3.0e-39, rel=2 * ULP)     # a subnormal keeps its 10 leading mantissa bits
    assert list(got[7:10]) == want[7:10] and math.isnan(got[10])
    tenths = np.float32(0.1) * np.arange(100)
    assert np.array_equal(round_tf32(tenths), round_tf32(round_tf32(tenths)))   # idempotent


@ts.kernel(grid=lambda A, B, C, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], BN)))
def gemm_kernel(A, B, C, *, BM: int, BN: int, BK: int, precision: str = "ieee"):
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc, input_precision=precision)
    ts.store(C, acc, at=(i, j))


def _gemm(a, b, backend, precision):
    c = torch.full((a.shape[0], b.shape[1]), math.nan)
    gemm_kernel(a, b, c, BM=16, BN=16, BK=16, precision=precision, backend=backend)
    return c.double()


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("m,k,n", [(33, 70, 21), (16, 256, 16)], ids=str)
def test_tf32_products_on_both_backends(m, k, n, rng):
    a = torch.from_numpy(rng.standard_normal((m, k))).float()
    b = torch.from_numpy(rng.standard_normal((k, n))).float()
    exact = a.double() @ b.double()
    tf32_truth = torch.from_numpy(round_tf32(a.numpy())) @ torch.from_numpy(round_tf32(b.numpy()))
    out = {(be, p): _gemm(a, b, be, p) for be in ("reference", "triton") for p in ("ieee", "tf32")}
    for be in ("reference", "triton"):
        assert _rel(out[be, "ieee"], exact) < 1e-6                   # f32 products: f32 rounding only
        assert _rel(out[be, "tf32"], tf32_truth) < 1e-6              # the operands were rounded, nothing else
        # the bound: each operand off by at most 2^-11 relative, so each product by 2^-10 (random signs: far less)
        err = _rel(out[be, "tf32"], exact)
        assert 20 * _rel(out[be, "ieee"], exact) < err < ULP, err
    assert _rel(out["triton", "tf32"], out["reference", "tf32"]) < 1e-6


def test_half_operands_are_the_same_either_way(rng):
    a = torch.from_numpy(rng.standard_normal((16, 32))).to(torch.bfloat16)
    b = torch.from_numpy(rng.standard_normal((32, 16))).to(torch.bfloat16)
    assert torch.equal(_gemm(a, b, "reference", "tf32"), _gemm(a, b, "reference", "ieee"))


def test_the_precision_is_in_the_ir_and_the_source():
    t = gemm_kernel.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), BM=16, BN=16, BK=16,
                          precision="tf32")
    assert "input_precision=tf32" in str(t.ir)
    assert 'input_precision="tf32"' in t.source("triton")
    ieee = gemm_kernel.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), BM=16, BN=16, BK=16)
    assert "input_precision" not in str(ieee.ir) and 'input_precision="ieee"' in ieee.source("triton")


def test_an_unknown_precision_is_refused():
    with pytest.raises(TraceError, match=r"mma_AB: input_precision is 'tf32x3'; expected one of \('ieee', 'tf32'\)"):
        gemm_kernel.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), BM=16, BN=16, BK=16,
                          precision="tf32x3")
