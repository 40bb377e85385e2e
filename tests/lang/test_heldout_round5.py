"""Round 5 of held-out kernels (after test_heldout_kernels.py and rounds 2-4): kernels a kernel engineer would write
with the tile language, run on the reference executor and Triton's interpreter against float64 / exact-integer torch,
outputs poisoned first, then compiled for Hopper (sm_90a) on this CPU by the Triton and Gluon backends.

A segmented prefix sum along a tile's columns (packed sequences) by a masked triangular matmul, argmax with ties
across column tiles (all -inf rows too), an online logsumexp over rows of -inf, +inf and NaN, clamp with runtime bounds
and NaN/inf/lo > hi (in place: the output is the input), f64 kernels whose float arguments are f64, index sums and
differences of sizes and int arguments past 2**31, tile counts and floor division at the int32 edges, float -> i64
conversions of NaN and infinities, layer norm's input gradient by hand, RoPE on a 3-D grid over a transposed
(B, S, H, D) view, a grouped GEMM whose groups pick their weights by tile coordinate with a bias + ReLU epilogue and
K = 0 (a loop of no trips), sliding-window attention with a runtime window, and misuse refused with a message naming
the argument. More kernels of this round (integer, summation and GEMM kernels) are in test_heldout_round5_more.py.

Bugs these found, fixed in the compiler, each kept here as its regression test (scripts/gpu/check_heldout_round5.py
runs the GPU-only ones on the GPU):
- Triton/Gluon: a float argument of an f64 kernel was an f32 on the GPU (Triton passes a Python float as fp32):
  `x64 + a` at a = 1 + 2**-40 added 1.0. Such arguments are now f64 parameters, converted to f32 for f32 work and
  scalar arithmetic, as the reference takes them (ir.scalars.f64_float_args);
- Triton/Gluon: cdiv of a size within the divisor of 2**31 ((n + BN - 1) // BN) wrapped negative, so a loop to
  cdiv(len(X), BN) over a tensor of 2**31 - 5 elements ran no trips; cdiv of an int argument of -2**31 negated it
  (-(-a // b)) and wrapped: now a // b plus one where a remainder is left (python_dsl);
- Triton/Gluon: sums and differences of sizes and int arguments (`off + X.shape[0]`, `X.shape[0] - off`) and their
  products with a constant (`off * 3`) were i32 and wrapped past 2**31; they are i64 now where they are data
  (ir.scalars.wide_index), a mask bound made of them clamped back to i32 (its compares stay 32-bit);
- Triton's interpreter took a float (argument or constant) of f64 max/min as an f32 (0.1 -> 0.10000000149), and Gluon
  on the GPU a float constant of f64 work (where(m, 0.1, 0.2) into f64: round 4's work_dtypes, found on the GPU): f64
  work takes float scalars as f64 values (tl.full((), x, tl.float64); gl.full(shape, x, gl.float64, layout=...));
- Triton/Gluon on the GPU: a float converted to i64 made NaN -2**63 (the H200's cvt.rzi.s64; the reference and
  s32's make 0): NaN is 0 and the range saturated before the conversion (found by scripts/gpu/run_heldout_on_gpu.py
  running round 3's float -> int test on the GPU);
- language: an int argument past 64 bits was a bare OverflowError from NumPy or Triton's specialization, and an index
  divided by a constant 0 (a constexpr of 0) a ZeroDivisionError in the reference and nothing on Triton: both are
  refused naming the argument or the op.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, ints, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import BackendError, LaunchError, TileDTypeError, TileShapeError, TraceError

POISON = -55                      # no integer result below can be this
INT32_MAX = 2**31 - 1


# ---- 1. a segmented prefix sum along the columns (packed sequences): x @ M, M[k, j] = k <= j and seg[k] == seg[j] ---
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def segmented_cumsum(X, Seg, Y, *, BM: int = 16, BN: int = 32):
    """Y[r, j] = sum of X[r, k] over k <= j in j's segment (Seg: a segment id per column, N <= BN columns)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    seg = ts.RegVec[ts.i32, BN]()
    k = ts.RegVec[ts.i32, BN]()
    same = ts.RegTile[ts.bool_, BN, BN]()
    upper = ts.RegTile[ts.bool_, BN, BN]()
    m = ts.RegTile[ts.f32, BN, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.load(seg, Seg, at=(0,))                     # (padding reads segment 0: its x columns are 0)
    ts.arange(k, 0)
    ts.eq(same, ts.per_row(seg), ts.per_col(seg))
    ts.le(upper, ts.per_row(k), ts.per_col(k))
    ts.where(m, same & upper, 1.0, 0.0)
    ts.zero(y)
    ts.mma_AB(y, x, m, y)
    ts.store(Y, y, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N"), [(16, 32), (21, 19), (1, 1), (0, 5)])
def test_segmented_cumsum(backend, dt, M, N, rng):
    x = randn(rng, M, N, dtype=dt)
    seg = torch.from_numpy(np.cumsum(rng.random(N) < 0.3)).to(I64)      # sorted ids, runs of random length
    y = torch.full((M, N), math.nan, dtype=dt)
    launch(segmented_cumsum, backend, x, seg, y)
    xd = x.double()
    want = torch.stack([torch.where(seg == seg[j], xd, 0.0)[:, :j + 1].sum(1) for j in range(N)], 1) if N else xd
    close(y, want.reshape(M, N), scale=4)


# ---- 2. argmax across column tiles: ties to the first index, all -inf rows to 0 (torch.argmax) ----------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_argmax_first(X, Idx, Val, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    col = ts.RegVec[ts.i32, BN]()
    at_max = ts.RegTile[ts.bool_, BM, BN]()
    cand = ts.RegTile[ts.i32, BM, BN]()
    tmax = ts.RegVec[ts.f32, BM]()
    targ = ts.RegVec[ts.i32, BM]()
    best = ts.RegVec[ts.f32, BM]()
    arg = ts.RegVec[ts.i32, BM]()
    better = ts.RegVec[ts.bool_, BM]()
    ts.neg_infty(best)
    ts.zero(arg)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, n - j * BN, -math.inf)
        ts.row_max(tmax, x)
        ts.arange(col, j * BN)
        ts.eq(at_max, x, ts.per_row(tmax))
        ts.where(cand, at_max, ts.per_col(col), INT32_MAX)
        ts.row_min(targ, cand)                     # the first column holding the tile's maximum
        ts.gt(better, tmax, best)                  # strictly: an equal maximum in a later tile keeps the first
        ts.where(arg, better, targ, arg)
        ts.max(best, best, tmax)
    ts.store(Idx, arg, at=(i,))
    ts.store(Val, best, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 48), (13, 37), (3, 1), (0, 7)])
@pytest.mark.parametrize("idt", [I32, I64])
def test_row_argmax_ties_and_neg_inf_rows(backend, M, N, idt, rng):
    x = ints(rng, -3, 4, (M, N), torch.float32)             # few values: many ties, within and across tiles
    if M > 2:
        x[1] = -math.inf
        x[2, N // 2:] = 3.0 if N > 1 else x[2]
    idx, val = torch.full((M,), POISON, dtype=idt), torch.full((M,), math.nan)
    launch(row_argmax_first, backend, x, idx, val)
    assert torch.equal(idx, x.argmax(1).to(idt)) if N else True
    assert torch.equal(val, x.max(1).values)


# ---- 3. an online logsumexp over column tiles: rows of -inf (-> -inf), with +inf (-> inf), with NaN (-> NaN) -------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_logsumexp(X, Out, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    ps = ts.RegVec[ts.f32, BM]()
    finite = ts.RegVec[ts.bool_, BM]()
    ts.neg_infty(m)
    ts.zero(s)
    ts.zero(safe)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, n - j * BN, -math.inf)
        ts.row_max(mn, x, m)
        ts.abs(safe, mn)
        ts.lt(finite, safe, math.inf)             # (NaN is not)
        ts.where(safe, finite, mn, 0.0)           # shift by the max only where it is finite: -inf - -inf is NaN
        ts.sub(x, x, ts.per_row(safe))
        ts.exp(x, x)
        ts.row_sum(ps, x)
        ts.sub(m, m, safe)
        ts.exp(m, m)
        ts.mul(s, s, m)
        ts.add(s, s, ps)
        ts.copy(m, mn)
    ts.log(s, s)
    ts.add(s, s, safe)
    ts.store(Out, s, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 41), (4, 0)])
@pytest.mark.parametrize("dt", [torch.float32, BF])
def test_logsumexp_of_infinite_and_nan_rows(backend, M, N, dt, rng):
    x = (randn(rng, M, N) * 30).to(dt)
    if N:
        x[1] = -math.inf
        x[2, -1] = math.inf
        x[3, 0] = math.nan
    out = torch.full((M,), 7.0)
    launch(row_logsumexp, backend, x, out)
    close(out, torch.logsumexp(x.double(), 1), dtype=torch.float32, scale=10)


# ---- 4. clamp with runtime bounds: NaN stays NaN, lo > hi gives hi (torch.clamp), relu6; in place -------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def clamp_relu6(X, Y, R6, lo: float, hi: float, *, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    y = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.relu(y, x)
    ts.min(y, y, 6.0)
    ts.store(R6, y, at=(i,))
    ts.max(y, x, lo)
    ts.min(y, y, hi)
    ts.store(Y, y, at=(i,))


SPECIAL = [math.nan, math.inf, -math.inf, 0.5, -0.5, 6.5, -7.0, 0.1, 1e-30, 65504.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, F16, BF, F64])
@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 0.25), (1.0, -1.0), (-math.inf, math.inf), (0.1, 0.3)])
def test_clamp_nan_inf_and_in_place(backend, dt, lo, hi, rng):
    x = torch.cat([torch.tensor(SPECIAL), randn(rng, 27)]).to(dt)
    y, r6 = torch.full_like(x, 7.0), torch.full_like(x, 7.0)
    launch(clamp_relu6, backend, x, y, r6, lo, hi)
    # f32 work takes a float argument as the f32 nearest it (f64 work as it is), then rounds to the tile's dtype
    b = (lambda v: v) if dt is F64 else (lambda v: float(np.float32(v)))
    want = torch.clamp(x.double(), min=b(lo), max=b(hi)).to(dt)
    assert torch.equal(y.isnan(), x.isnan()) and torch.equal(y[~x.isnan()], want[~x.isnan()])
    assert torch.equal(r6.isnan(), x.isnan()) and torch.equal(r6[~x.isnan()], F.relu6(x.double()).to(dt)[~x.isnan()])
    inplace = x.clone()
    launch(clamp_relu6, backend, inplace, inplace, r6, lo, hi)          # Y is X: each program reads, then writes
    assert torch.equal(inplace.isnan(), x.isnan()) and torch.equal(inplace[~x.isnan()], want[~x.isnan()])


# ---- 5. an f64 kernel's float arguments are f64 (not the f32 Triton passes a float as); f32 work takes f32s ----------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def axpby64(X, Y, Out, Low, a: float, b: float, *, BN: int = 16):
    """Out = min(a x + b y, a) + 0.1 in f64; Low = x + a in f32 work (a as an f32) and (a + 1.0) in scalar
    arithmetic (f32)."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f64, BN]()
    y = ts.RegVec[ts.f64, BN]()
    big = ts.RegVec[ts.bool_, BN]()
    x32 = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(i,))
    ts.load(y, Y, at=(i,))
    ts.mul(x, x, a)
    ts.mul(y, y, b)
    ts.add(x, x, y)
    ts.gt(big, x, a)                               # compared in f64
    ts.where(x, big, a, x)                         # chosen in f64
    ts.add(x, x, 0.1)                              # an f64 constant: 0.1 exactly, not an f32's 0.10000000149
    ts.store(Out, x, at=(i,))
    ts.load(x32, X, at=(i,))
    ts.add(x32, x32, a + 1.0)
    ts.store(Low, x32, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("a", "b"), [(1.0 + 2.0**-40, -(1.0 - 2.0**-45)), (0.1, 1e-300), (3.0, 2.5)])
def test_f64_kernels_take_float_arguments_as_f64(backend, a, b, rng):
    x, y = randn(rng, 37, dtype=F64), randn(rng, 37, dtype=F64)
    out, low = torch.full((37,), math.nan, dtype=F64), torch.full((37,), math.nan)
    launch(axpby64, backend, x, y, out, low, a, b)
    ax = x * a + y * b
    assert torch.equal(out, torch.where(ax > a, a, ax) + 0.1)
    assert torch.equal(low, x.float() + (np.float32(a) + np.float32(1.0)))


def test_f64_float_arguments_are_f64_parameters_on_the_gpu():
    traced = axpby64.trace(ts.ArgSpec(ts.f64, 1), ts.ArgSpec(ts.f64, 1), ts.ArgSpec(ts.f64, 1),
                           ts.ArgSpec(ts.f32, 1), 0.5, 0.5)
    for backend, ns in (("triton", "tl"), ("gluon", "gl")):
        src = traced.source(backend)
        assert f"a: {ns}.float64" in src and f"b: {ns}.float64" in src, src
        assert f"{ns}.cast(a, {ns}.float32) + 1.0" in src          # scalar arithmetic stays f32
    # an f64 constant in f64 work: an f64 (a Python float is an f32 to both DSLs: 0.1 would be 0.10000000149)
    assert "tl.full((), 0.1, tl.float64)" in traced.source("triton")
    assert "gl.full([16], 0.1, gl.float64, layout=" in traced.source("gluon")
    plain = clamp_relu6.trace(ts.ArgSpec(ts.f32, 1), ts.ArgSpec(ts.f32, 1), ts.ArgSpec(ts.f32, 1), 0.5, 0.5)
    assert "float64" not in plain.source("triton")                # f32 kernels keep f32 parameters
    from tilestack.backends.gluon.codegen import generate
    low = generate(traced.ir, warps=4, stages=1)
    assert low.signature["a"] == "fp64" and low.signature["b"] == "fp64"


# ---- 6. index sums and differences of sizes and int arguments past 2**31 (data: positions given to arange, masks) ----
@ts.kernel(grid=lambda X: (1,))
def positions_past_2_31(X, P, M, off: int, *, BN: int = 16):
    """P[0] = off + len(X) + k, P[1] = len(X) - off + k, P[2] = 3 off + k; M = 1 where k < len(X) - off."""
    p = ts.RegVec[ts.i64, BN]()
    ts.arange(p, off + X.shape[0])
    ts.store(P, p, at=(0, 0))
    ts.arange(p, X.shape[0] - off)
    ts.store(P, p, at=(1, 0))
    ts.arange(p, off * 3)
    ts.store(P, p, at=(2, 0))
    m = ts.RegTile[ts.f32, 4, BN]()
    ts.one(m)
    ts.right_fill(m, m, X.shape[0] - off, 0.0)
    ts.store(M, m, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("off", [INT32_MAX - 10, -(2**31) + 3, 2**30 + 1, 5, 95])
def test_index_sums_and_differences_past_2_31(backend, off):
    n, BN = 100, 16
    p, m = torch.full((3, BN), POISON, dtype=I64), torch.full((4, BN), math.nan)
    launch(positions_past_2_31, backend, torch.zeros(n), p, m, off)
    k = torch.arange(BN, dtype=I64)
    assert torch.equal(p, torch.stack([off + n + k, n - off + k, 3 * off + k]))
    assert torch.equal(m, (k < n - off).float().expand(4, BN))


def test_wide_index_data_is_64_bit_and_its_mask_bound_32_bit():
    src = positions_past_2_31.trace(ts.ArgSpec(ts.f32, 1), ts.ArgSpec(ts.i64, 2), ts.ArgSpec(ts.f32, 2), 5).source(
        "triton")
    assert "(tl.cast(off, tl.int64) + X_d0)" in src and "(tl.cast(X_d0, tl.int64) - off)" in src
    assert "(tl.cast(off, tl.int64) * 3)" in src
    assert ".to(tl.int32)" in src                                  # the right_fill bound, clamped into 32 bits


@ts.kernel(grid=lambda X: (1,))
def last_tiles(X, Y, T, a: int, b: int, *, BN: int = 16):
    """Y = X's last tile, loaded by a loop over the last two tiles up to cdiv(len(X), BN); T = [cdiv(len(X), BN),
    a // b, a % b, cdiv(a, b)] as Python's (floor, ceil)."""
    nt = ts.cdiv(X.shape[0], BN)
    v = ts.RegVec[ts.f32, BN]()
    t = ts.RegVec[ts.i64, BN]()
    ts.zero(v)
    for k in ts.range(ts.smax(nt - 2, 0), nt):
        ts.load(v, X, at=(k,))
    ts.store(Y, v, at=(0,))
    for row, e in enumerate((nt, a // b, a % b, ts.cdiv(a, b))):
        ts.arange(t, e)
        ts.store(T, t, at=(row, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "a", "b"), [(2**31 - 5, -(2**31), 7), (2**31 - 16, 2**31 - 1, -3), (37, -7, 2),
                                           (0, -(2**40) - 3, -5), (16, 7, 2)])
def test_tile_counts_and_floor_division_at_the_int32_edges(backend, n, a, b):
    x = (torch.arange(16.0) + 1)[n % 16:n % 16 + 1].expand(n)   # no memory: one value repeated
    y, t = torch.full((16,), math.nan), torch.full((4, 16), POISON, dtype=I64)
    launch(last_tiles, backend, x, y, t, a, b)
    nt, last = -(-n // 16), n - (-(-n // 16) - 1) * 16
    assert torch.equal(y, torch.cat([x[:last], torch.zeros(16 - last)]) if n else torch.zeros(16))
    assert t[:, 0].tolist() == [nt, a // b, a % b, -(-a // b)]


@ts.kernel(grid=lambda X: (1,))
def to_i64(X, Y, *, N: int = 128):
    x = ts.RegVec[X.dtype, N]()
    y = ts.RegVec[ts.i64, N]()
    ts.load(x, X, at=(0,))
    ts.copy(y, x)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", [torch.float32, F64, BF])
def test_float_to_i64_makes_nan_0_and_saturates(backend, xdt):
    vals = [math.nan, -math.nan, math.inf, -math.inf, 9.3e18, -9.3e18, 2.0**63, -(2.0**63), -2.5, 2.5, 1e10, 0.0]
    x = torch.tensor(vals + [0.0] * (128 - len(vals)), dtype=F64).to(xdt)
    y = torch.full((128,), POISON, dtype=I64)
    launch(to_i64, backend, x, y)
    hi, lo = 2**63 - 1, -(2**63)
    want = [0 if math.isnan(v) else hi if v >= 2.0**63 else lo if v < -(2.0**63) else int(v) for v in x.tolist()]
    assert y.tolist() == want


def test_float_to_i64_on_the_gpu_goes_through_the_saturating_conversion():
    traced = to_i64.trace(ts.ArgSpec(ts.f32, 1), ts.ArgSpec(ts.i64, 1))
    assert "_to_int_sat(" in traced.source("triton")              # (the H200's cvt.rzi.s64 makes NaN -2**63)
    assert "!= x_" in traced.source("gluon")


# ---- 7. layer norm's input gradient by hand: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w -----------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def layernorm_dx(DY, X, W, Mean, Rstd, DX, *, BM: int = 8, BN: int = 32):
    """For rows of N <= BN columns; Mean and Rstd as the forward saved them."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    g = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    c1 = ts.RegVec[ts.f32, BM]()
    c2 = ts.RegVec[ts.f32, BM]()
    dx = ts.RegTile[DX.dtype, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.load(g, DY, at=(i, 0))
    ts.load(w, W, at=(0,))
    ts.load(mean, Mean, at=(i,))
    ts.load(rstd, Rstd, at=(i,))
    ts.sub(x, x, ts.per_row(mean))
    ts.mul(x, x, ts.per_row(rstd))                 # xhat
    ts.right_fill(x, x, n, 0.0)                   # padding columns: -mean * rstd, out of every sum
    ts.mul(g, g, ts.per_col(w))
    ts.row_sum(c1, g)
    ts.div(c1, c1, n)
    ts.mul(t, g, x)
    ts.row_sum(c2, t)
    ts.div(c2, c2, n)
    ts.mul(x, x, ts.per_row(c2))
    ts.sub(g, g, ts.per_row(c1))
    ts.sub(g, g, x)
    ts.mul(g, g, ts.per_row(rstd))
    ts.copy(dx, g)
    ts.store(DX, dx, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N"), [(8, 32), (13, 20), (3, 7), (0, 4)])
def test_layernorm_input_gradient(backend, dt, M, N, rng):
    x, dy = (randn(rng, M, N) * 3 + 1).to(dt), randn(rng, M, N, dtype=dt)
    w = randn(rng, N) + 1
    xd = x.double().requires_grad_()
    y = F.layer_norm(xd, (N,), w.double(), None, 1e-5)
    (want,) = torch.autograd.grad(y, xd, dy.double()) if M else (torch.zeros(M, N, dtype=F64),)
    mean = x.double().mean(1)
    rstd = (x.double().var(1, unbiased=False) + 1e-5).rsqrt()
    dx = torch.full((M, N), math.nan, dtype=dt)
    launch(layernorm_dx, backend, dy, x, w, mean.float(), rstd.float(), dx)
    close(dx, want, scale=8)


# ---- 8. RoPE (rotate half) on a 3-D grid over a (B, S, H, D) tensor viewed as (B, H, S, D) -------------------------
@ts.kernel(grid=lambda X, BS: (ts.cdiv(X.shape[2], BS), X.shape[1], X.shape[0]))
def rope(X, Cos, Sin, Y, *, BS: int = 8, HALF: int = 16):
    """Y = [x1 cos - x2 sin, x2 cos + x1 sin] for x = [x1, x2] halves of D = 2 HALF; Cos, Sin: (S, HALF)."""
    s, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x1 = ts.RegTile[ts.f32, BS, HALF]()
    x2 = ts.RegTile[ts.f32, BS, HALF]()
    c = ts.RegTile[ts.f32, BS, HALF]()
    sn = ts.RegTile[ts.f32, BS, HALF]()
    ts.load(x1, X, at=(b, h, s, 0))
    ts.load(x2, X, at=(b, h, s, 1))
    ts.load(c, Cos, at=(s, 0))
    ts.load(sn, Sin, at=(s, 0))
    ts.store(Y, x1 * c - x2 * sn, at=(b, h, s, 0))
    ts.store(Y, x2 * c + x1 * sn, at=(b, h, s, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "S", "H", "D"), [(2, 13, 3, 32), (1, 8, 1, 16), (3, 1, 2, 32), (1, 0, 2, 16)])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
def test_rope_on_a_transposed_view(backend, B, S, H, D, ydt, rng):
    x = randn(rng, B, S, H, D).transpose(1, 2)                       # (B, H, S, D), strided
    freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=F64) / D)
    ang = torch.arange(S, dtype=F64)[:, None] * freq[None, :]        # (S, D/2)
    y = torch.full((B, H, S, D), math.nan, dtype=ydt)
    launch(rope, backend, x, ang.cos().float(), ang.sin().float(), y, HALF=D // 2)
    x1, x2 = x.double()[..., :D // 2], x.double()[..., D // 2:]
    c, s = ang.cos().float().double(), ang.sin().float().double()
    close(y, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), dtype=ydt, scale=2)


# ---- 9. a grouped GEMM: row block i takes group g = i BM // MG's weights by tile coordinate; bias + ReLU epilogue ----
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[2], BN)))
def grouped_gemm_relu(A, B, Bias, C, *, MG: int, BM: int = 16, BN: int = 16, BK: int = 16):
    """C[rows of group g] = relu(A[rows of g] @ B[g] + Bias[g]) for groups of MG rows (a multiple of BM); K may be 0."""
    i, j = ts.block_id(0), ts.block_id(1)
    g = i * BM // MG
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    bias = ts.RegVec[ts.f32, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):   # no trips when K = 0
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(g, k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.load(bias, Bias, at=(g, j))
    ts.add_col(acc, acc, bias)
    ts.relu(acc, acc)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("G", "K", "N", "last"), [(3, 40, 24, 32), (2, 0, 16, 5), (1, 16, 7, 1)])
@pytest.mark.parametrize("dt", [BF, F16])
def test_grouped_gemm_bias_relu(backend, G, K, N, last, dt, rng):
    MG = 32
    M = (G - 1) * MG + last                                          # the last group is ragged
    a, b = randn(rng, M, K, dtype=dt), randn(rng, G, K, N, dtype=dt)
    bias = randn(rng, G, N)
    c = torch.full((M, N), math.nan, dtype=dt)
    launch(grouped_gemm_relu, backend, a, b, bias, c, MG=MG)
    group = torch.arange(M) // MG
    want = torch.relu(torch.einsum("mk,mkn->mn", a.double(), b.double()[group]) + bias.double()[group])
    close(c, want, dtype=dt, scale=4)


# ---- 10. sliding-window attention: key j visible to query q where q - window < j <= q; online softmax ---------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[0], BM),))
def window_attention(Q, K, V, O, window: int, scale: float, *, BM: int = 16, BN: int = 16, D: int = 16):
    i = ts.block_id(0)
    n = K.shape[0]
    q = ts.RegTile[ts.f32, BM, D]()
    k = ts.RegTile[ts.f32, BN, D]()
    v = ts.RegTile[ts.f32, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    ts.load(q, Q, at=(i, 0))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(k, K, at=(j, 0))
        ts.load(v, V, at=(j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        diag = i * BM - j * BN                      # key col - query row, shifted to this tile
        ts.tril(s, s, diag, -math.inf)             # keys at or before the query
        ts.triu(s, s, diag - window + 1, -math.inf)   # ... and inside the window
        ts.right_fill(s, s, n - j * BN, -math.inf)
        ts.row_max(mn, s, m)
        ts.gt(live, mn, -math.inf)                  # rows with no visible key yet shift by 0
        ts.where(safe, live, mn, 0.0)
        ts.sub(s, s, ts.per_row(safe))
        ts.exp(s, s)
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.row_sum(l_, s, l_)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.mma_AB(acc, s, v, acc)
        ts.copy(m, mn)
    ts.div(acc, acc, ts.per_row(l_))
    ts.store(O, acc, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("N", "window"), [(40, 5), (16, 1), (23, 100), (33, 16)])
def test_sliding_window_attention(backend, N, window, rng):
    D = 16
    q, k, v = (randn(rng, N, D) for _ in range(3))
    o = torch.full((N, D), math.nan)
    launch(window_attention, backend, q, k, v, o, window, D**-0.5)
    pos = torch.arange(N)
    keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    s = (q.double() @ k.double().T * float(np.float32(D**-0.5))).masked_fill(~keep, -math.inf)
    close(o, s.softmax(1) @ v.double(), scale=4)


# ---- 11. misuse: refused with a message naming the argument, before any backend runs -----------------------------
@ts.kernel(grid=lambda X: (1,))
def copy16(X, Y, *, N: int = 16):
    x = ts.RegVec[ts.f32, N]()
    ts.load(x, X, at=(0,))
    ts.store(Y, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "ydt", "bad"), [(torch.uint32, torch.float32, "X"), (torch.int16, torch.float32, "X"),
                                                 (torch.uint16, torch.float32, "X"),
                                                 (torch.float32, torch.complex64, "Y")])
def test_tensors_of_dtypes_tiles_cannot_hold_are_named(backend, xdt, ydt, bad):
    x, y = torch.zeros(16, dtype=xdt), torch.zeros(16, dtype=ydt)
    named = xdt if bad == "X" else ydt
    with pytest.raises(LaunchError, match=rf"copy16: argument {bad} has dtype {named}, which tiles cannot hold"):
        launch(copy16, backend, x, y)


def test_a_tile_size_triton_cannot_take_is_named():
    x, y = torch.arange(16.0), torch.zeros(16)
    launch(copy16, "reference", x, y, N=12)                          # the reference takes any size
    assert torch.equal(y[:12], x[:12]) and not y[12:].any()
    with pytest.raises(BackendError, match=r"power-of-two tile sizes; load uses a RegVec\[f32, 12\]"):
        launch(copy16, "triton", x, y, N=12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("off", [2**64, -(2**63) - 1, 2**63])
def test_an_int_argument_past_64_bits_is_named(backend, off):
    with pytest.raises(LaunchError, match=rf"positions_past_2_31: argument off is a runtime int, at most 64 bits; "
                                          rf"got {off}"):
        launch(positions_past_2_31, backend, torch.zeros(10), torch.zeros(3, 16, dtype=I64), torch.zeros(4, 16), off)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_divisor_of_0_is_named_when_traced(backend):
    a, b = torch.zeros(32, 16, dtype=BF), torch.zeros(1, 16, 16, dtype=BF)
    with pytest.raises(TraceError, match=r"`//` of an index by the constant 0 .* check the kernel's constants"):
        launch(grouped_gemm_relu, backend, a, b, torch.zeros(1, 16), torch.zeros(32, 16, dtype=BF), MG=0)


def _vec(X):
    x = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(0,))
    return x


MISUSE = {   # name -> (body(X), error, message)
    "float_coordinate": (lambda X: ts.load(ts.RegVec[ts.f32, 16](), X, at=(X.shape[0] / 2,)), TraceError,
                         r"load: at\[0\] must be an index, got a float scalar"),
    "float_loop_bound": (lambda X: [None for _ in ts.range(X.shape[0] * 0.5)], TraceError,
                         r"range: an operand must be an index, got a float scalar"),
    "arange_into_a_tile": (lambda X: ts.arange(ts.RegTile[ts.i32, 4, 4](), 0), TileShapeError,
                           r"arange: dst must be a vector, got RegTile\[i32, 4, 4\]"),
    "atomic_add_into_bf16": (lambda X: ts.atomic_add(X, _vec(X), at=(0,)), TileDTypeError,
                             r"atomic_add: `X` is bf16; atomic adds go into f64, f32, f16, i32, i64 tensors"),
    "mma_of_int8_tiles": (lambda X: ts.mma_AB(ts.RegTile[ts.f32, 16, 16](), *(ts.RegTile[ts.i8, 16, 16]()
                                                                             for _ in range(2)),
                                              ts.RegTile[ts.f32, 16, 16]()), TileDTypeError,
                          r"mma_AB: a `.*` is i8 and b `.*` is i8; expected both bf16, both f16 or both f32"),
    "shift_past_the_width": (lambda X: ts.shl(ts.RegVec[ts.i32, 16](), ts.RegVec[ts.i32, 16](), 32), TraceError,
                             r"shl: shift count 32 for i32 work; expected 0 <= count < 32"),
    "rem_of_floats_by_per_row": (lambda X: ts.rem(ts.RegTile[ts.f32, 4, 16](), ts.RegTile[ts.f32, 4, 16](),
                                                  ts.per_row(ts.RegVec[ts.f32, 4]())), TraceError,
                                 r"rem: b is per_row\(...\); rem takes a tile of a's shape or a scalar"),
}


@pytest.mark.parametrize("name", MISUSE)
def test_misuse_is_refused_when_traced(name):
    body, err, msg = MISUSE[name]
    k = ts.kernel(body, grid=lambda X: (1,))
    with pytest.raises(err, match=msg):
        k.trace(ts.ArgSpec(ts.bf16, 1))


# ---- 12. every kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ----
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "row_argmax_first": (row_argmax_first, (meta(1024, 4096), meta(1024, dtype=I64), meta(1024)), dict(BM=32, BN=128)),
    "row_logsumexp": (row_logsumexp, (meta(1024, 4096, dtype=BF), meta(1024)), dict(BM=32, BN=128)),
    "clamp_relu6_f64": (clamp_relu6, (meta(4096, dtype=F64),) * 3 + (0.1, 0.3), dict(BN=256)),
    "axpby64": (axpby64, (meta(4096, dtype=F64),) * 3 + (meta(4096), 0.5, 2.0), dict(BN=256)),
    "positions_past_2_31": (positions_past_2_31, (meta(100), meta(3, 32, dtype=I64), meta(4, 32), 5), dict(BN=32)),
    "layernorm_dx": (layernorm_dx, (meta(4096, 128, dtype=BF), meta(4096, 128, dtype=BF), meta(128), meta(4096),
                                    meta(4096), meta(4096, 128, dtype=BF)), dict(BM=32, BN=128)),
    "rope": (rope, (meta(4, 1024, 16, 128, dtype=BF).transpose(1, 2), meta(1024, 64), meta(1024, 64),
                    meta(4, 16, 1024, 128, dtype=BF)), dict(BS=64, HALF=64)),
    "grouped_gemm_relu": (grouped_gemm_relu, (meta(1024, 512, dtype=BF), meta(8, 512, 256, dtype=BF), meta(8, 256),
                                              meta(1024, 256, dtype=BF)), dict(MG=128, BM=128, BN=64, BK=64)),
    "to_i64": (to_i64, (meta(128), meta(128, dtype=I64)), {}),
}
TRITON_ONLY = {   # f32 operands of the matrix units: Gluon takes bf16, f16 and f8 products only
    "segmented_cumsum": (segmented_cumsum, (meta(1024, 64), meta(64, dtype=I64), meta(1024, 64)), dict(BN=64)),
    "window_attention": (window_attention, (meta(2048, 32),) * 4 + (256, 0.125), dict(BM=32, BN=32, D=32)),
}


@pytest.mark.parametrize("name", [*AOT_CASES, *TRITON_ONLY])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **TRITON_ONLY}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
