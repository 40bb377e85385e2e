"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): fp8 (e4m3) tensors that hold
NaN. A checkpoint check (per-row amax of |x| over an e4m3 tensor wider than a tile, NaN propagating as torch's amax)
with a dequantization to bf16 by per-row scales, and an e4m3 GEMM with per-tensor scales whose NaN entries spoil
exactly their rows and columns; every one of the 256 e4m3 codes read into each float dtype.

Bug this found, fixed in the Triton backend, kept here as its regression test:
- Triton's interpreter: an e4m3 NaN (0x7F, 0xFF) read from memory was the finite +-480 (the interpreter converts fp8
  as an IEEE-style format, with no NaN at the top of its range), so loads, copies, reductions and products made 480,
  or 448 once stored back, where the GPU, torch and the reference make NaN; an interpreted conversion from f8e4m3
  goes through its bits now (backends.triton.interp_helpers._from_f8e4m3, codegen up / cast_to):
  test_every_e4m3_code_reads_as_torch_reads_it, test_fp8_row_amax_and_dequant, test_fp8_gemm_with_nan_entries.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, close, launch, randn

import tilestack.lang as ts

F8 = torch.float8_e4m3fn


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


@ts.kernel(grid=lambda X: (1,))
def read_codes(X, Y, Z, *, BN: int = 256):
    """Y = X through a tile of Y's dtype (the load converts); Z = X through an f8 tile copied into Z's dtype."""
    y = ts.RegVec[Y.dtype, BN]()
    x8 = ts.RegVec[X.dtype, BN]()
    z = ts.RegVec[Z.dtype, BN]()
    ts.load(y, X, at=(0,))
    ts.store(Y, y, at=(0,))
    ts.load(x8, X, at=(0,))
    ts.copy(z, x8)
    ts.store(Z, z, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF, torch.float64, F8])
def test_every_e4m3_code_reads_as_torch_reads_it(backend, dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(F8)
    y, z = poisoned(256, dtype=dtype, value=7), poisoned(256, dtype=dtype, value=7)
    launch(read_codes, backend, codes, y, z)
    want = codes.to(dtype)
    for got in (y, z):
        same = (got.double() == want.double()) | (got.double().isnan() & want.double().isnan())
        assert same.all(), (got.double()[~same], want.double()[~same])


# ---- 1. per-row amax of an e4m3 tensor and its dequantization ------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def fp8_amax_dequant(X, SCALE, AMAX, Y, *, BM: int = 16, BN: int = 32):
    """X (M, N) e4m3, SCALE (M,) f32: AMAX (M,) f32 = max |x| of each row (NaN if the row holds one), Y (M, N) =
    x * scale in Y's dtype. The f8 tile is reduced as it is (no copy to f32 first)."""
    i = ts.block_id(0)
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    a8 = ts.RegVec[X.dtype, BM]()
    a = ts.RegVec[ts.f32, BM]()
    amax = ts.RegVec[ts.f32, BM]()
    ts.load(s, SCALE, at=(i,))
    ts.zero(amax)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.copy(y, x)
        ts.mul(y, y, ts.per_row(s))
        ts.copy(out, y)
        ts.store(Y, out, at=(i, j))
        ts.abs(x, x)
        ts.row_max(a8, x)
        ts.copy(a, a8)
        ts.max(amax, amax, a)                        # (max propagates NaN, as torch.maximum)
    ts.store(AMAX, amax, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [BF, F16, torch.float32])
@pytest.mark.parametrize(("M", "N"), [(21, 70), (16, 32), (0, 8)])
def test_fp8_row_amax_and_dequant(backend, out_dtype, M, N, rng):
    """Rows with a NaN in their first, middle or last column tile; e4m3's largest (+-448) and smallest subnormal."""
    x = (randn(rng, M, N) * 100).to(F8)
    if M >= 4:
        x[0, 0] = math.nan
        x[1, N // 2] = math.nan
        x[2, N - 1] = -math.nan
        x[3, :2] = torch.tensor([-448.0, 2.0 ** -9])
    scale = (torch.from_numpy(rng.uniform(0.5, 2.0, M)).float())
    amax, y = poisoned(M, value=-1.0), poisoned(M, N, dtype=out_dtype)
    launch(fp8_amax_dequant, backend, x, scale, amax, y)
    x64 = x.double()
    close(amax, x64.abs().amax(-1).float() if N else torch.zeros(M))
    close(y, (x64 * scale.double()[:, None]).to(out_dtype))


# ---- 2. an e4m3 GEMM with per-tensor scales --------------------------------------------------------------------------
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[0], BN)))
def fp8_gemm(A, B, C, scale: float, *, BM: int = 16, BN: int = 16, BK: int = 32):
    """C (M, N) = scale * A (M, K) @ B (N, K)^T, A and B e4m3, accumulated in f32."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(j, k))
        ts.mma_ABt(acc, a, b, acc)
    ts.mul(acc, acc, scale)
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "K"), [(20, 24, 70), (16, 16, 32)])
def test_fp8_gemm_with_nan_entries(backend, M, N, K, rng):
    """A NaN in A's row 1 and one in B's row 2: row 1 and column 2 of C are NaN, the rest exact products."""
    a = (randn(rng, M, K) * 8).to(F8)
    b = (randn(rng, N, K) * 8).to(F8)
    a[1, K - 1] = math.nan
    b[2, 0] = math.nan
    c = poisoned(M, N, value=0.0)
    launch(fp8_gemm, backend, a, b, c, 0.25)
    want = (a.double().nan_to_num(0) @ b.double().nan_to_num(0).T) * 0.25
    want[1, :] = math.nan
    want[:, 2] = math.nan
    close(c, want.float())
