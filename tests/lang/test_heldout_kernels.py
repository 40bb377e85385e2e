"""Kernels a user of the tile language would write that the library does not have, run as a user would run them:
on the reference executor and Triton's interpreter against float64 torch, over ragged shapes and several dtypes,
then compiled for Hopper (sm_90a) on this CPU by the Triton backend and, where it lowers them, the Gluon backend.

Each kernel is short and self-contained: fused bias + GELU + residual, row L2 normalisation over rows wider than a
tile, column sums by atomic_add over row blocks, batched GEMMs with each transposed form and a ragged K, a two-pass
softmax over a wide dimension, a row max/argmax, row and column broadcasts, an int8/f16/f32 mix with casts, a
grid-stride loop, a 4-D tensor addressed at (b, h, i, 0), empty tensors, integer tiles past 2**24, a transpose,
matmul sugar, a row cumsum by a triangular matmul, a row sum used twice after its loop, a hand-pipelined GEMM,
conversions to bf16 and fp8, sizes past 2**31 (traced and costed on meta tensors only), and misuse that must be
refused with a message naming the argument.
"""

import math

import numpy as np
import pytest
import torch
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack import config
from tilestack.errors import TileDTypeError, TileShapeError, TraceError

BACKENDS = ("reference", "triton")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BF = torch.bfloat16
GELU_C = math.sqrt(2.0 / math.pi)     # tanh-GELU: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
GELU_A = 0.044715


def launch(kernel, backend, *args, **consts) -> None:
    with config.override(triton_interpret=True):
        kernel(*args, backend=backend, **consts)


def tol(dtype: torch.dtype) -> dict:
    """Tolerances of a result stored in ``dtype`` (computed in f32)."""
    return {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-4, atol=1e-5)}[dtype]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), **tol(dtype or got.dtype))


def randn(rng, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


# ---- 1. fused bias + tanh-GELU + residual over 2-D tiles ---------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def bias_gelu_residual(X, Bias, R, Y, *, BM: int = 16, BN: int = 32):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegTile[ts.f32, BM, BN]()
    b = ts.RegVec[ts.f32, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(r, R, at=(i, j))
    ts.load(b, Bias, at=(j,))
    ts.add_col(x, x, b)                               # x[r, c] += bias[c]
    u = (x + x * x * x * GELU_A) * (2.0 * GELU_C)     # tanh(z) = 2 sigmoid(2z) - 1
    ts.sigmoid(s, u)
    y = x * s + r
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "f16", "bf16"])
@pytest.mark.parametrize(("M", "N"), [(16, 32), (37, 50)])
def test_bias_gelu_residual(backend, dt, M, N, rng):
    dtype = FLOATS[dt]
    x, r, b = randn(rng, M, N, dtype=dtype), randn(rng, M, N, dtype=dtype), randn(rng, N, dtype=dtype)
    y = torch.full((M, N), math.nan, dtype=dtype)
    launch(bias_gelu_residual, backend, x, b, r, y)
    z = x.double() + b.double()
    close(y, torch.nn.functional.gelu(z, approximate="tanh") + r.double())


# ---- 2. row L2 normalisation of rows wider than one tile (two passes over the columns) --------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def l2_normalize(X, Y, eps: float, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    ss = ts.RegVec[ts.f32, BM]()
    ts.zero(ss)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.row_sum(ss, x * x, ss)
    ts.add(ss, ss, eps)
    ts.rsqrt(ss, ss)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.mul_row(x, x, ss)
        ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (13, 70)])
def test_l2_normalize(backend, dt, M, N, rng):
    dtype = FLOATS[dt]
    x = randn(rng, M, N, dtype=dtype)
    y = torch.full((M, N), math.nan, dtype=dtype)
    launch(l2_normalize, backend, x, y, 1e-6)
    xd = x.double()
    close(y, xd / torch.sqrt((xd * xd).sum(1, keepdim=True) + 1e-6))


# ---- 3. column sums split over row blocks with atomic_add --------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def col_sums(X, Out, *, BM: int = 8, BN: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    v = ts.RegVec[Out.dtype, BN]()
    ts.load(x, X, at=(i, j))
    ts.col_sum(v, x)
    ts.atomic_add(Out, v, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "odt"), [("f16", torch.float32), ("f32", torch.float64), ("bf16", torch.float32)])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (45, 33), (0, 20)])
def test_col_sums(backend, xdt, odt, M, N, rng):
    x = randn(rng, M, N, dtype=FLOATS[xdt])
    out = torch.zeros(N, dtype=odt)
    launch(col_sums, backend, x, out)
    close(out, x.double().sum(0), torch.float32)


# ---- 4. batched GEMM, each operand possibly transposed, K not a multiple of the tile --------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[1], BM), ts.cdiv(C.shape[2], BN), C.shape[0]))
def batched_gemm(A, B, C, *, TA: bool, TB: bool, BM: int = 16, BN: int = 16, BK: int = 16):
    """C[z] = op(A[z]) @ op(B[z]); A is (Z, K, M) when TA else (Z, M, K), B is (Z, N, K) when TB else (Z, K, N)."""
    i, j, z = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BK, BM]() if TA else ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]() if TB else ts.SharedTile[B.dtype, BK, BN]()
    mma = {(False, False): ts.mma_AB, (False, True): ts.mma_ABt, (True, False): ts.mma_AtB,
           (True, True): ts.mma_AtBt}[TA, TB]
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1] if TA else A.shape[2], BK)):
        ts.load(a, A, at=(z, k, i) if TA else (z, i, k))
        ts.load(b, B, at=(z, j, k) if TB else (z, k, j))
        mma(acc, a, b, acc)
    ts.store(C, acc, at=(z, i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f16", "bf16", "f32"])
@pytest.mark.parametrize(("ta", "tb"), [(False, False), (False, True), (True, False), (True, True)])
def test_batched_gemm(backend, dt, ta, tb, rng):
    Z, M, N, K = 2, 19, 24, 37              # K = 2 full tiles and a ragged one
    dtype = FLOATS[dt]
    a = randn(rng, Z, K, M, dtype=dtype) if ta else randn(rng, Z, M, K, dtype=dtype)
    b = randn(rng, Z, N, K, dtype=dtype) if tb else randn(rng, Z, K, N, dtype=dtype)
    c = torch.full((Z, M, N), math.nan, dtype=torch.float32)
    launch(batched_gemm, backend, a, b, c, TA=ta, TB=tb)
    ad = a.double().transpose(1, 2) if ta else a.double()
    bd = b.double().transpose(1, 2) if tb else b.double()
    torch.testing.assert_close(c.double(), ad @ bd, rtol=1e-4, atol=1e-4)


# ---- 5. softmax over rows wider than a tile: online max and sum, then a second pass that writes ------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def wide_softmax(X, Y, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    scale = ts.RegVec[ts.f32, BM]()
    total = ts.RegVec[ts.f32, BM]()
    ts.neg_infty(m)
    ts.zero(total)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, n - j * BN, -math.inf)       # columns past the end take no part
        ts.row_max(m_new, x, m)
        ts.sub(scale, m, m_new)
        ts.exp(scale, scale)
        ts.mul(total, total, scale)
        ts.sub_row(x, x, m_new)
        ts.exp(x, x)
        ts.row_sum(total, x, total)
        ts.copy(m, m_new)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.sub_row(x, x, m)
        ts.exp(x, x)
        ts.div_row(x, x, total)
        ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 71)])
def test_wide_softmax(backend, dt, M, N, rng):
    dtype = FLOATS[dt]
    x = randn(rng, M, N, dtype=dtype) * 4
    y = torch.full((M, N), math.nan, dtype=dtype)
    launch(wide_softmax, backend, x, y)
    close(y, torch.softmax(x.double(), dim=1))


# ---- 6. row max and argmax (first index of the max) over rows wider than a tile ------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_argmax(X, Max, Arg, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    idx = ts.RegTile[ts.i32, BM, BN]()
    best = ts.RegVec[ts.i32, BM]()
    ts.neg_infty(m)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, n - j * BN, -math.inf)
        ts.row_max(m, x, m)
    ts.fill(best, 2**30)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, n - j * BN, -math.inf)
        ts.arange(cols, j * BN)
        ts.eq(hit, x, ts.per_row(m))
        ts.where(idx, hit, ts.per_col(cols), 2**30)
        ts.row_min(best, idx, best)
    ts.store(Max, m, at=(i,))
    ts.store(Arg, best, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adt", [torch.int32, torch.int64])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (13, 45)])
def test_row_argmax(backend, adt, M, N, rng):
    # distinct values per row but for a planted tie: the first index wins
    x = torch.from_numpy(np.stack([rng.permutation(N) for _ in range(M)]).astype(np.float32))
    x[0, N - 1] = x[0].max()
    mx, arg = torch.full((M,), math.nan), torch.full((M,), -1, dtype=adt)
    launch(row_argmax, backend, x, mx, arg)
    want = x.double().max(1)
    torch.testing.assert_close(mx.double(), want.values)
    torch.testing.assert_close(arg.long(), x.double().argmax(1))


# ---- 7. elementwise with a row vector and a column vector broadcast, both spellings ------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def outer_affine(X, Rv, Cv, Y, *, SUGAR: bool, BM: int = 16, BN: int = 16):
    """y = (x * r[:, None] + c[None, :]) / max(r[:, None], c[None, :])."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegVec[ts.f32, BM]()
    c = ts.RegVec[ts.f32, BN]()
    d = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(r, Rv, at=(i,))
    ts.load(c, Cv, at=(j,))
    if SUGAR:
        y = x * ts.per_row(r) + ts.per_col(c)
        ts.zero(d)
        ts.max(d, d + ts.per_row(r), ts.per_col(c))
        y = y / d
    else:
        y = ts.RegTile[ts.f32, BM, BN]()
        ts.mul_row(y, x, r)
        ts.add_col(y, y, c)
        ts.zero(d)
        ts.add_row(d, d, r)
        ts.max_col(d, d, c)
        ts.div(y, y, d)
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sugar", [False, True])
@pytest.mark.parametrize("ydt", ["f32", "bf16"])
def test_outer_affine(backend, sugar, ydt, rng):
    M, N = 21, 35
    x = randn(rng, M, N)
    r = torch.from_numpy(rng.uniform(1, 2, M).astype(np.float32))
    c = torch.from_numpy(rng.uniform(1, 2, N).astype(np.float32))
    y = torch.full((M, N), math.nan, dtype=FLOATS[ydt])
    launch(outer_affine, backend, x, r, c, y, SUGAR=sugar)
    rd, cd = r.double()[:, None], c.double()[None, :]
    close(y, (x.double() * rd + cd) / torch.maximum(rd, cd))


# ---- 8. int8 weights, f16 activations, f32 math: dequantise, add, and cast back to integers ------------------------
@ts.kernel(grid=lambda W, BM, BN: (ts.cdiv(W.shape[0], BM), ts.cdiv(W.shape[1], BN)))
def dequant_add(W, Scale, X, Y, Q, *, BM: int = 16, BN: int = 16):
    """y = f16(f32(w) * scale[:, None] + x); q = y truncated toward zero (as torch's float -> int cast)."""
    i, j = ts.block_id(0), ts.block_id(1)
    wq = ts.RegTile[ts.i8, BM, BN]()
    w = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    x = ts.RegTile[ts.f16, BM, BN]()
    xf = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f16, BM, BN]()
    q = ts.RegTile[Q.dtype, BM, BN]()
    ts.load(wq, W, at=(i, j))
    ts.copy(w, wq)
    ts.load(s, Scale, at=(i,))
    ts.load(x, X, at=(i, j))
    ts.copy(xf, x)
    ts.mul_row(w, w, s)
    ts.add(w, w, xf)
    ts.copy(y, w)
    ts.store(Y, y, at=(i, j))
    ts.copy(q, w)
    ts.store(Q, q, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qdt", [torch.int32, torch.int8])
def test_dequant_add(backend, qdt, rng):
    M, N = 19, 40
    w = torch.from_numpy(rng.integers(-128, 128, (M, N)).astype(np.int8))
    s = torch.from_numpy(rng.uniform(0.01, 0.2, M).astype(np.float32))
    x = randn(rng, M, N, dtype=torch.float16)
    y = torch.full((M, N), math.nan, dtype=torch.float16)
    q = torch.full((M, N), 99, dtype=qdt)
    launch(dequant_add, backend, w, s, x, y, q)
    f = w.double() * s.double()[:, None] + x.double()
    close(y, f)
    # float -> int truncates toward zero; values within an ulp of an integer may go either way in f32
    exact = (f - f.round()).abs() > 1e-4
    torch.testing.assert_close(q.long()[exact], f.to(torch.float32).trunc().long()[exact])


# ---- 9. a grid-stride loop over flattened tiles -------------------------------------------------------------------
@ts.kernel(grid=lambda PROGRAMS: (PROGRAMS,))
def grid_stride_axpb(X, Y, a: float, *, PROGRAMS: int = 3, BM: int = 8, BN: int = 16):
    cols = ts.cdiv(X.shape[1], BN)
    tiles = ts.cdiv(X.shape[0], BM) * cols
    x = ts.RegTile[ts.f32, BM, BN]()
    for t in ts.range(ts.block_id(0), tiles, ts.num_blocks(0)):
        ts.load(x, X, at=(t // cols, t % cols))
        ts.mul(x, x, a)
        ts.add(x, x, 1.0)
        ts.store(Y, x, at=(t // cols, t % cols))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "programs"), [(8, 16, 3), (29, 50, 4), (5, 3, 7)])
def test_grid_stride(backend, M, N, programs, rng):
    x = randn(rng, M, N)
    y = torch.full((M, N), math.nan)
    launch(grid_stride_axpb, backend, x, y, -1.5, PROGRAMS=programs)
    close(y, x.double() * -1.5 + 1.0)


# ---- 10. a 4-D tensor addressed at (b, h, i, 0): per-head RMSNorm with a weight -----------------------------------
@ts.kernel(grid=lambda X, BS: (ts.cdiv(X.shape[2], BS), X.shape[1], X.shape[0]))
def head_rmsnorm(X, W, Y, eps: float, *, BS: int = 8, D: int = 32):
    i, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x = ts.RegTile[ts.f32, BS, D]()
    w = ts.RegVec[ts.f32, D]()
    ms = ts.RegVec[ts.f32, BS]()
    ts.load(x, X, at=(b, h, i, 0))
    ts.load(w, W, at=(0,))
    ts.row_sum(ms, x * x)
    ts.mul(ms, ms, 1.0 / X.shape[3])
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    ts.mul_row(x, x, ms)
    ts.mul_col(x, x, w)
    ts.store(Y, x, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 32), (1, 2, 13, 24)])
def test_head_rmsnorm(backend, dt, shape, rng):
    dtype = FLOATS[dt]
    x, w = randn(rng, *shape, dtype=dtype), randn(rng, shape[3], dtype=dtype)
    y = torch.full(shape, math.nan, dtype=dtype)
    launch(head_rmsnorm, backend, x, w, y, 1e-5)
    xd = x.double()
    close(y, xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * w.double())


# ---- 11. empty tensors: a launch with no programs writes nothing -------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 32), (16, 0), (0, 0)])
def test_empty_tensors(backend, shape, rng):
    M, N = shape
    x, r, b = torch.empty(M, N), torch.empty(M, N), torch.empty(N)
    y = torch.empty(M, N)
    launch(bias_gelu_residual, backend, x, b, r, y)
    out = torch.full((N,), 7.0)
    launch(col_sums, backend, x, out)
    torch.testing.assert_close(out, torch.full((N,), 7.0))
    z = torch.empty(M, N)
    launch(wide_softmax, backend, x, z)      # rows of width 0: the loops run no iteration


# ---- 12. integer tiles: reductions, broadcasts, fills and masks stay exact past 2**24 ------------------------------
@ts.kernel(grid=lambda X: (1,))
def int_tile_math(X, V, RowSum, ColMax, RowMin, Shifted, *, R: int = 8, C: int = 16):
    x = ts.RegTile[X.dtype, R, C]()
    v = ts.RegVec[V.dtype, C]()
    rs = ts.RegVec[RowSum.dtype, R]()
    cm = ts.RegVec[X.dtype, C]()
    rm = ts.RegVec[X.dtype, R]()
    y = ts.RegTile[X.dtype, R, C]()
    ts.load(x, X, at=(0, 0))
    ts.load(v, V, at=(0,))
    ts.row_sum(rs, x)
    ts.col_max(cm, x)
    ts.fill(rm, 2**30 + 1)
    ts.row_min(rm, x, rm)
    ts.add_col(y, x, v)
    ts.right_fill(y, y, C - 3, -7)                  # the last 3 columns become -7
    ts.store(RowSum, rs, at=(0,))
    ts.store(ColMax, cm, at=(0,))
    ts.store(RowMin, rm, at=(0,))
    ts.store(Shifted, y, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
def test_int_tile_math(backend, idt, rng):
    R, C = 8, 16
    x = torch.from_numpy(2**25 + rng.integers(0, 1000, (R, C))).to(idt)   # f32 rounds these to even numbers
    v = torch.from_numpy(rng.integers(-9, 10, C) * 2 + 1).to(idt)          # odd: x + v is exact only in ints
    rs, cm, rm = torch.zeros(R, dtype=torch.int64), torch.zeros(C, dtype=idt), torch.zeros(R, dtype=idt)
    y = torch.zeros(R, C, dtype=idt)
    launch(int_tile_math, backend, x, v, rs, cm, rm, y)
    xl = x.long()
    torch.testing.assert_close(rs, xl.sum(1))
    torch.testing.assert_close(cm.long(), xl.max(0).values)
    torch.testing.assert_close(rm.long(), xl.min(1).values)
    want = xl + v.long()
    want[:, C - 3:] = -7
    torch.testing.assert_close(y.long(), want)


def test_fill_value_must_fit_the_tile():
    @ts.kernel(grid=lambda: (1,))
    def bad(Out, *, VALUE: float, DT: str):
        t = ts.RegVec[getattr(ts, DT), 16]()
        ts.fill(t, VALUE)
        ts.store(Out, t, at=(0,))

    out = ts.ArgSpec(ts.i32, 1)
    for value, dt in ((-math.inf, "i32"), (2.5, "i32"), (2.0, "bool_"), (2**31, "i32"), (-129, "i8")):
        with pytest.raises(TileDTypeError, match=rf"fill: .*value {value!r} does not fit"):
            bad.trace(out, VALUE=value, DT=dt)
    bad.trace(out, VALUE=3.0, DT="i32")


# ---- 13. matrix transpose, from registers or from a shared tile, with a dtype change -------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def transpose_k(X, Y, *, SHARED: bool, NAMED: bool = False, BM: int = 16, BN: int = 32):
    """Y = X.T (Y in its own dtype): tile (i, j) of X is tile (j, i) of Y; ``NAMED``: spelled ts.transpose."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.SharedTile[X.dtype, BM, BN]() if SHARED else ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BN, BM]()
    ts.load(x, X, at=(i, j))
    if NAMED:
        ts.transpose(y, x)
    else:
        ts.copy(y, x.T)
    ts.store(Y, y, at=(j, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("xdt", "ydt"), [("f32", "f32"), ("bf16", "f32"), ("f32", "f16")])
@pytest.mark.parametrize(("M", "N"), [(16, 32), (37, 45)])
@pytest.mark.parametrize("named", [False, True])
def test_transpose(backend, shared, xdt, ydt, M, N, named, rng):
    x = randn(rng, M, N, dtype=FLOATS[xdt])
    y = torch.full((N, M), math.nan, dtype=FLOATS[ydt])
    launch(transpose_k, backend, x, y, SHARED=shared, NAMED=named)
    close(y, x.double().T)


def test_transpose_shape_mismatch_names_both_tiles():
    @ts.kernel(grid=lambda: (1,))
    def bad(X, Y):
        x = ts.RegTile[ts.f32, 16, 32]()
        y = ts.RegTile[ts.f32, 16, 32]()
        ts.load(x, X, at=(0, 0))
        ts.copy(y, x.T)
        ts.store(Y, y, at=(0, 0))

    want = r"copy: src `x` is \(16, 32\), so dst of its .T must be \(32, 16\); dst `y`"
    with pytest.raises(TileShapeError, match=want):
        bad.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2))


# ---- 14. sizes past 2**31 elements: traced, costed and generated from meta tensors (no memory) --------------------
def test_sizes_past_int32_trace_cost_and_index_in_64_bits():
    from tilestack.backends.triton.codegen import generate, wide_globals

    M, N = 3 * 2**15, 2**16 + 5                     # 6.4e9 elements per operand
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, r, y, b = torch.empty(M, N, **meta), torch.empty(M, N, **meta), torch.empty(M, N, **meta), torch.empty(N, **meta)
    traced = bias_gelu_residual.trace(x, b, r, y)
    assert traced.grid(x, b, r, y) == (M // 16, -(-N // 32))
    cost = traced.cost(x, b, r, y)
    assert cost.bytes_read >= 2 * M * N * 2 and cost.bytes_written >= M * N * 2    # X and R read, Y written
    wide = wide_globals(traced.ir, (x, b, r, y))
    assert wide == {0, 2, 3}                          # the bias vector's offsets fit int32
    src = generate(traced.ir, index64=wide).source
    assert src.count("tl.int64") >= 3 and "Bias_s0" in src


# ---- 15. operator sugar for the four products: a @ b, a @ b.T, a.T @ b, a.T @ b.T ----------------------------------
@ts.kernel(grid=lambda: (1,))
def matmul_sugar(A, B, C, *, TA: bool, TB: bool, M: int = 16, N: int = 32, K: int = 16):
    a = ts.RegTile[A.dtype, K, M]() if TA else ts.RegTile[A.dtype, M, K]()
    b = ts.SharedTile[B.dtype, N, K]() if TB else ts.SharedTile[B.dtype, K, N]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    c = (a.T if TA else a) @ (b.T if TB else b)
    ts.store(C, c * 0.5, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("ta", "tb"), [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_sugar(backend, ta, tb, rng):
    M, N, K = 16, 32, 16
    a = randn(rng, *((K, M) if ta else (M, K)), dtype=torch.float16)
    b = randn(rng, *((N, K) if tb else (K, N)), dtype=torch.float16)
    c = torch.full((M, N), math.nan)
    launch(matmul_sugar, backend, a, b, c, TA=ta, TB=tb)
    want = (a.double().T if ta else a.double()) @ (b.double().T if tb else b.double())
    torch.testing.assert_close(c.double(), want * 0.5, rtol=1e-4, atol=1e-4)


# ---- 16. conversions to bf16 round to nearest even on every backend (as torch and the GPU do) ----------------------
@ts.kernel(grid=lambda: (1,))
def to_bf16(X, Y, F, A, *, R: int = 16, C: int = 64):
    x = ts.RegTile[ts.f32, R, C]()
    y = ts.RegTile[ts.bf16, R, C]()
    f = ts.RegTile[ts.bf16, R, C]()
    a = ts.RegVec[ts.bf16, C]()
    ts.load(x, X, at=(0, 0))
    ts.copy(y, x)                                # a cast
    ts.add(y, y, 0.0)                            # element-wise math in f32, rounded back
    ts.fill(f, 0.1)                              # a fill value bf16 cannot hold
    ts.arange(a, 301)                            # integers past 256 that bf16 cannot all hold
    ts.store(Y, y, at=(0, 0))
    ts.store(F, f, at=(0, 0))
    ts.store(A, a, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversions_to_bf16_round_to_nearest_even(backend, rng):
    R, C = 16, 64
    x = randn(rng, R, C) * 100
    y, f, a = (torch.zeros(R, C, dtype=BF), torch.zeros(R, C, dtype=BF), torch.zeros(C, dtype=BF))
    launch(to_bf16, backend, x, y, f, a)
    assert torch.equal(y, x.to(BF))
    assert torch.equal(f, torch.full((R, C), 0.1).to(BF))
    assert torch.equal(a, torch.arange(301, 301 + C, dtype=torch.float32).to(BF))


# ---- 17. a process that interprets a Triton kernel, then compiles Gluon kernels (as a test session does) -----------
_INTERPRET_THEN_GLUON = """
import torch
import tilestack.lang as ts
from tilestack import config
from tilestack.backends import get_backend
from tilestack.backends.gluon import aot

@ts.kernel(grid=lambda: (1,))
def softmax_rows(X, Y):
    x = ts.RegTile[ts.f32, 16, 16]()
    m = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(0, 0))
    ts.row_max(m, x)
    ts.sub_row(x, x, m)
    ts.exp(x, x)
    ts.row_sum(m, x)
    ts.div_row(x, x, m)
    ts.store(Y, x, at=(0, 0))

x, y = torch.randn(16, 16), torch.zeros(16, 16)
with config.override(triton_interpret=True):
    softmax_rows(x, y, backend="triton")
assert torch.allclose(y, torch.softmax(x, 1))
be = get_backend("gluon")
spec = ts.ArgSpec(ts.f32, 2)
res = aot.resources(be.aot(softmax_rows.trace(spec, spec), be.Options()))
print("spills", res["spill_stores"])
"""


def test_interpreting_triton_first_leaves_gluon_compiling(tmp_path):
    # Triton's interpreter imports Gluon lazily while it has tl's builtins replaced; a fresh process and an empty
    # Triton cache, so the Gluon compile really runs after the interpreted launch
    import os
    import subprocess
    import sys

    from tilestack.backends.gluon import aot
    try:
        aot.tool("ptxas")
    except aot.ToolMissing as e:
        pytest.skip(str(e))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TILESTACK_CACHE_DIR=str(tmp_path / "ts"))
    out = subprocess.run([sys.executable, "-c", _INTERPRET_THEN_GLUON], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "spills 0" in out.stdout, out.stderr[-3000:]


# ---- 18. row-wise cumulative sum over rows wider than a tile: x @ (upper-triangular ones), plus a carried offset ---
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_cumsum(X, Y, *, BM: int = 16, BN: int = 16):
    i = ts.block_id(0)
    k = ts.RegVec[ts.i32, BN]()
    upper = ts.RegTile[ts.bool_, BN, BN]()
    ones = ts.RegTile[ts.f32, BN, BN]()
    u = ts.SharedTile[ts.f32, BN, BN]()
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    carry = ts.RegVec[ts.f32, BM]()
    ts.arange(k)
    ts.le(upper, ts.per_row(k), ts.per_col(k))        # u[r, c] = 1 where r <= c
    ts.where(ones, upper, 1.0, 0.0)
    ts.copy(u, ones)
    ts.zero(carry)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.zero(y)
        ts.mma_AB(y, x, u, y)                         # y[r, c] = sum of x[r, :c + 1]
        ts.add_row(y, y, carry)
        ts.row_sum(carry, x, carry)
        ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (21, 75)])
def test_row_cumsum(backend, M, N, rng):
    x = randn(rng, M, N)
    y = torch.full((M, N), math.nan)
    launch(row_cumsum, backend, x, y)
    torch.testing.assert_close(y.double(), x.double().cumsum(1), rtol=1e-4, atol=1e-4)


def test_an_argument_dtype_tiles_cannot_hold_lists_those_they_can():
    from tilestack.errors import LaunchError
    with pytest.raises(LaunchError, match=r"argument X has dtype torch.int16, which tiles cannot hold; expected one of "
                                          r".*torch.int8.*torch.float8_e4m3fn.*torch.bool"):
        col_sums.trace(torch.zeros(4, 4, dtype=torch.int16), torch.zeros(4))


# ---- 19. a row sum over a loop of loads, used twice after the loop; a kernel whose work is all dead ---------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_sums_twice(X, S, T, *, BM: int = 16, BN: int = 16):
    """s = x.sum(1), t = 2 s / max over the columns."""
    i = ts.block_id(0)
    x = ts.RegTile[X.dtype, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    m = ts.RegVec[ts.f32, BM]()
    ts.zero(s)
    ts.neg_infty(m)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.row_sum(s, x, s)
        ts.row_max(m, x, m)       # (zeros past the edge count: X's values are positive)
    ts.store(S, s, at=(i,))
    ts.mul(s, s, 2.0)
    ts.div(s, s, m)
    ts.store(T, s, at=(i,))


@ts.kernel(grid=lambda X: (1,))
def all_dead(X, Y, *, BM: int = 16, BN: int = 16):
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(0, 0))
    ts.exp(x, x)                  # nothing is stored: the kernel does nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (19, 70)])
def test_row_sums_twice(backend, M, N, rng):
    x = torch.from_numpy(rng.uniform(0.5, 2.0, (M, N)).astype(np.float32))
    s, t = torch.full((M,), math.nan), torch.full((M,), math.nan)
    launch(row_sums_twice, backend, x, s, t)
    xd = x.double()
    close(s, xd.sum(1))
    close(t, 2 * xd.sum(1) / xd.max(1).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_with_nothing_to_store_runs(backend):
    x, y = torch.randn(16, 16), torch.full((16, 16), 3.0)
    launch(all_dead, backend, x, y)
    assert torch.equal(y, torch.full((16, 16), 3.0))


# ---- 20. a hand-pipelined GEMM (explicit stages, async loads and mmas), rows of K not 16-byte aligned ------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def staged_gemm(A, B, C, *, BM: int = 64, BN: int = 64, BK: int = 32, STAGES: int = 3):
    """C = A @ B.T, A (M, K), B (N, K), through rings of STAGES shared tiles."""
    i, j = ts.block_id(0), ts.block_id(1)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BN, BK]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        ts.async_load(a_ring, s, A, at=(i, k))
        ts.async_load(b_ring, s, B, at=(j, k))
        ts.wait_load(a, a_ring, s)
        ts.wait_load(b, b_ring, s)
        ts.mma_ABt_async(acc, a, b, acc)
        ts.mma_wait(acc)
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [100, 128])       # 100 bf16 = 200-byte rows: no copy engine, loads through pointers
def test_staged_gemm(backend, K, rng):
    M, N = 70, 80
    a, b = randn(rng, M, K, dtype=BF), randn(rng, N, K, dtype=BF)
    c = torch.full((M, N), math.nan)
    launch(staged_gemm, backend, a, b, c)
    torch.testing.assert_close(c.double(), a.double() @ b.double().T, rtol=1e-4, atol=1e-4)


# ---- 21. conversions to f8e4m3 (from floats and integers) round to nearest even and saturate, on every backend -------
@ts.kernel(grid=lambda: (1,))
def to_f8(X, N, Y, Z, *, R: int = 16, C: int = 64):
    x = ts.RegTile[ts.f32, R, C]()
    n = ts.RegTile[N.dtype, R, C]()
    y = ts.RegTile[ts.f8e4m3, R, C]()
    z = ts.RegTile[ts.f8e4m3, R, C]()
    ts.load(x, X, at=(0, 0))
    ts.load(n, N, at=(0, 0))
    ts.copy(y, x)
    ts.copy(z, n)                                # integers into fp8 (through f32)
    ts.store(Y, y, at=(0, 0))
    ts.store(Z, z, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndt", [torch.int32, torch.int8])
def test_conversions_to_f8e4m3_round_and_saturate(backend, ndt, rng):
    R, C = 16, 64
    mag = np.exp2(rng.uniform(-12, 10, (R, C)))             # subnormals (below 2**-6) to past 448
    x = torch.from_numpy((mag * rng.choice([-1, 1], (R, C))).astype(np.float32))
    x[0, :8] = torch.tensor([1.96, 1.9375, 0.4873, 7.9, 460.0, 470.0, 2.0**-10, 3 * 2.0**-10])   # carries and ties
    n = torch.from_numpy(rng.integers(-128, 128, (R, C))).to(ndt)
    y, z = torch.zeros(R, C, dtype=torch.float8_e4m3fn), torch.zeros(R, C, dtype=torch.float8_e4m3fn)
    launch(to_f8, backend, x, n, y, z)
    assert torch.equal(y.float(), x.to(torch.float8_e4m3fn).float())
    assert torch.equal(z.float(), n.float().to(torch.float8_e4m3fn).float())


# ---- 22. a triangular matmul: a loop bound by the block index, a masked diagonal tile, a register a operand -------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def trmm(A, B, C, *, BM: int = 16, BN: int = 16):
    """C = tril(A) @ B for a square A: block row i reads only the tiles of A at or left of its diagonal."""
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.RegTile[A.dtype, BM, BM]()
    b = ts.SharedTile[B.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(i):                       # the tiles left of the diagonal
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.load(a, A, at=(i, i))
    ts.tril(a, a)                               # the diagonal tile, its upper triangle zeroed
    ts.load(b, B, at=(i, j))
    ts.mma_AB(acc, a, b, acc)
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (45, 20)])
def test_trmm(backend, M, N, rng):
    a, b = randn(rng, M, M, dtype=torch.float16), randn(rng, M, N, dtype=torch.float16)
    c = torch.full((M, N), math.nan)
    launch(trmm, backend, a, b, c)
    torch.testing.assert_close(c.double(), torch.tril(a.double()) @ b.double(), rtol=1e-4, atol=1e-4)


# ---- 23. NaN: max, min, relu and the row/column max and min propagate it, as torch does ------------------------------
@ts.kernel(grid=lambda: (1,))
def nan_max_min(X, Relu, RowMax, ColMin, Max):
    x = ts.RegTile[ts.f32, 16, 16]()
    y = ts.RegTile[ts.f32, 16, 16]()
    r = ts.RegVec[ts.f32, 16]()
    c = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(0, 0))
    ts.relu(y, x)
    ts.store(Relu, y, at=(0, 0))
    ts.row_max(r, x)
    ts.store(RowMax, r, at=(0,))
    ts.col_min(c, x)
    ts.store(ColMin, c, at=(0,))
    ts.max(y, x, 0.5)
    ts.store(Max, y, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_through_max_min_relu(backend, rng):
    x = randn(rng, 16, 16)
    x[2, 5] = x[7, 1] = math.nan
    relu, mx = torch.zeros(16, 16), torch.zeros(16, 16)
    rmax, cmin = torch.zeros(16), torch.zeros(16)
    launch(nan_max_min, backend, x, relu, rmax, cmin, mx)
    torch.testing.assert_close(relu, torch.relu(x), equal_nan=True)
    torch.testing.assert_close(rmax, x.max(1).values, equal_nan=True)
    torch.testing.assert_close(cmin, x.min(0).values, equal_nan=True)
    torch.testing.assert_close(mx, torch.maximum(x, torch.tensor(0.5)), equal_nan=True)


# ---- 24. every kernel above compiled for Hopper (sm_90a) on this CPU -------------------------------------------------
def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "bias_gelu_residual": (bias_gelu_residual, (_meta(256, 256, dtype=BF), _meta(256, dtype=BF),
                                                _meta(256, 256, dtype=BF), _meta(256, 256, dtype=BF)), {}),
    "l2_normalize": (l2_normalize, (_meta(256, 512), _meta(256, 512), 1e-6), {}),
    "col_sums": (col_sums, (_meta(256, 512, dtype=torch.float16), _meta(512)), {}),
    "batched_gemm_AtBt": (batched_gemm, (_meta(4, 256, 256, dtype=BF), _meta(4, 256, 256, dtype=BF),
                                         _meta(4, 256, 256)), dict(TA=True, TB=True, BM=128, BN=128, BK=64)),
    "batched_gemm_ABt": (batched_gemm, (_meta(4, 256, 256, dtype=torch.float16),
                                        _meta(4, 256, 256, dtype=torch.float16), _meta(4, 256, 256)),
                         dict(TA=False, TB=True, BM=128, BN=128, BK=64)),
    "wide_softmax": (wide_softmax, (_meta(256, 1024), _meta(256, 1024)), {}),
    "row_argmax": (row_argmax, (_meta(256, 1024), _meta(256), _meta(256, dtype=torch.int64)), {}),
    "outer_affine": (outer_affine, (_meta(256, 256), _meta(256), _meta(256), _meta(256, 256, dtype=BF)),
                     dict(SUGAR=True)),
    "dequant_add": (dequant_add, (_meta(256, 256, dtype=torch.int8), _meta(256), _meta(256, 256, dtype=torch.float16),
                                  _meta(256, 256, dtype=torch.float16), _meta(256, 256, dtype=torch.int32)), {}),
    "grid_stride_axpb": (grid_stride_axpb, (_meta(256, 256), _meta(256, 256), 2.0), {}),
    "head_rmsnorm": (head_rmsnorm, (_meta(2, 4, 128, 32, dtype=BF), _meta(32, dtype=BF),
                                    _meta(2, 4, 128, 32, dtype=BF), 1e-5), {}),
    "int_tile_math": (int_tile_math, (_meta(8, 16, dtype=torch.int32), _meta(16, dtype=torch.int32),
                                      _meta(8, dtype=torch.int64), _meta(16, dtype=torch.int32),
                                      _meta(8, dtype=torch.int32), _meta(8, 16, dtype=torch.int32)), {}),
    "transpose_reg": (transpose_k, (_meta(256, 512, dtype=BF), _meta(512, 256)), dict(SHARED=False)),
    "transpose_shared": (transpose_k, (_meta(256, 512, dtype=BF), _meta(512, 256)), dict(SHARED=True)),
    "row_sums_twice": (row_sums_twice, (_meta(256, 1024), _meta(256), _meta(256)), dict(BM=64, BN=64)),
    "all_dead": (all_dead, (_meta(64, 64), _meta(64, 64)), {}),
    "to_f8": (to_f8, (_meta(16, 64), _meta(16, 64, dtype=torch.int32), _meta(16, 64, dtype=torch.float8_e4m3fn),
                      _meta(16, 64, dtype=torch.float8_e4m3fn)), {}),
    "trmm": (trmm, (_meta(512, 512, dtype=BF), _meta(512, 256, dtype=BF), _meta(512, 256)), dict(BM=128, BN=128)),
    "nan_max_min": (nan_max_min, (_meta(16, 16), _meta(16, 16), _meta(16), _meta(16), _meta(16, 16)), {}),
    "staged_gemm": (staged_gemm, (_meta(512, 512, dtype=BF), _meta(512, 512, dtype=BF), _meta(512, 512)),
                    dict(BM=128, BN=128, BK=64)),
}
# f32 products: the Gluon backend refuses them (wgmma would round f32 to tf32), Triton multiplies them exactly
F32_MMA_CASES = {"row_cumsum": (row_cumsum, (_meta(256, 1024), _meta(256, 1024)), dict(BM=64, BN=32))}


@pytest.mark.parametrize("name", [*AOT_CASES, *F32_MMA_CASES])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **F32_MMA_CASES}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    kernel = AOT_CASES[name][0]
    compiled = compile_gluon_sm90a(*AOT_CASES[name])
    if kernel in (batched_gemm, staged_gemm):
        from tilestack.backends.gluon import aot as gaot
        assert "HGMMA.64x128x16.F32" in gaot.sass(compiled)


@pytest.mark.parametrize("name", F32_MMA_CASES)
def test_gluon_refuses_f32_products_naming_the_op_and_dtype(name):
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError, TraceError
    kernel, args, consts = F32_MMA_CASES[name]
    be = get_backend("gluon")
    with pytest.raises((BackendError, TraceError), match=r"mma has f32 operands"):
        be.aot(kernel.trace(*args, **consts), be.Options())


def test_gluon_says_which_accumulator_rows_or_warps_a_wgmma_takes():
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError
    be = get_backend("gluon")
    spec = ts.ArgSpec(ts.bf16, 3)
    traced = batched_gemm.trace(spec, spec, ts.ArgSpec(ts.f32, 3), TA=False, TB=False, BM=64, BN=128, BK=64)
    with pytest.raises(BackendError, match=r"accumulates 64 rows \(need a multiple of 128, >= 64: .* or num_warps=4\)"):
        be.source(traced)
    assert "warpgroup_mma" in be.source(traced, be.Options(num_warps=4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fill_with_a_runtime_scalar(backend):
    """A run-time value fills a float tile (-0.0, inf and NaN as they are: -0.0 + value keeps the sign) and an integer
    one; a float value into an integer tile, and any run-time value into a bool_ mask, are refused naming fill."""
    @ts.kernel(grid=lambda Out, s: (1,))
    def fill_runtime(Out, s: float):
        t = ts.RegVec[ts.f32, 16]()
        ts.fill(t, s)
        ts.store(Out, t, at=(0,))

    @ts.kernel(grid=lambda Out, n: (1,))
    def fill_int(Out, n: int):
        t = ts.RegVec[ts.i32, 16]()
        ts.fill(t, n - 1)
        ts.store(Out, t, at=(0,))

    for value in (3.25, -0.0, float("inf"), float("nan"), -1e30):
        out = torch.full((16,), 7.0)
        fill_runtime(out, value, backend=backend)
        want = torch.full((16,), value)
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~out.isnan()], want[~want.isnan()])
        assert torch.equal(out.signbit(), want.signbit()), value
    out = torch.full((16,), 7, dtype=torch.int32)
    fill_int(out, -4, backend=backend)
    assert torch.equal(out, torch.full((16,), -5, dtype=torch.int32))

    @ts.kernel(grid=lambda Out, s: (1,))
    def fill_int_float(Out, s: float):
        t = ts.RegVec[ts.i32, 16]()
        ts.fill(t, s)
        ts.store(Out, t, at=(0,))

    @ts.kernel(grid=lambda Out, s: (1,))
    def fill_mask(Out, s: float):
        t = ts.RegVec[ts.bool_, 16]()
        ts.fill(t, s)

    with pytest.raises(TileDTypeError, match=r"fill: `t` is i32 and value is a float Scalar"):
        fill_int_float.trace(ts.ArgSpec(ts.i32, 1), "float")
    with pytest.raises(TraceError, match=r"fill: value must be a Python number .* got Scalar"):
        fill_mask.trace(ts.ArgSpec(ts.i32, 1), "float")


def test_a_float_grid_is_refused_naming_the_axis():
    @ts.kernel(grid=lambda X: (X.shape[0] / 16,))
    def float_grid(X):
        x = ts.RegTile[ts.f32, 16, 16]()
        ts.load(x, X, at=(ts.block_id(0), 0))
        ts.store(X, x, at=(ts.block_id(0), 0))

    with pytest.raises(TraceError, match=r"float_grid: grid axis 0 is a float Scalar; expected .* ts.cdiv"):
        float_grid.trace(ts.ArgSpec(ts.f32, 2))


def test_where_refuses_a_number_an_integer_dst_cannot_hold():
    @ts.kernel(grid=lambda: (1,))
    def pick(X, Out, *, VALUE: float):
        x = ts.RegVec[ts.i32, 16]()
        m = ts.RegVec[ts.bool_, 16]()
        ts.load(x, X, at=(0,))
        ts.gt(m, x, 0)
        ts.where(x, m, x, VALUE)
        ts.store(Out, x, at=(0,))

    spec = ts.ArgSpec(ts.i32, 1)
    with pytest.raises(TileDTypeError, match=r"where: `x` is i32; value 2.5 does not fit"):
        pick.trace(spec, spec, VALUE=2.5)
    x = torch.tensor([3, -1, 0, 7] * 4, dtype=torch.int32)
    out = torch.zeros_like(x)
    for backend in BACKENDS:
        launch(pick, backend, x, out, VALUE=-4.0)
        assert out.tolist() == torch.where(x > 0, x, -4).tolist()
