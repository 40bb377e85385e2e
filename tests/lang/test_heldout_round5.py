"""Round 5 of held-out kernels (after test_heldout_kernels.py and rounds 2-4): kernels a kernel engineer would write
with the tile language, run on the reference executor and Triton's interpreter against float64 / exact-integer torch,
outputs poisoned first, then compiled for Hopper (sm_90a) on this CPU by the Triton and Gluon backends.

A segmented prefix sum along a tile's columns (packed sequences) by a masked triangular matmul, argmax with ties
across column tiles (all -inf rows too), an online logsumexp over rows of -inf, +inf and NaN, clamp with runtime bounds
and NaN/inf/lo > hi (in place: the output is the input), f64 kernels whose float arguments are f64, index sums and
differences of sizes and int arguments past 2**31, layer norm's input gradient by hand, RoPE on a 3-D grid over a
transposed (B, S, H, D) view, a grouped GEMM whose groups pick their weights by tile coordinate with a bias + ReLU
epilogue and K = 0 (a loop of no trips), sliding-window attention with a runtime window, SWAR popcount and byte
unpacking of i32, wrapping and saturating i8 arithmetic, f16 rows summed into an f64 accumulator, a transposing cast
between strided views with ragged edges, and misuse refused with a message naming the argument.

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
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, ints, launch, meta, randn, wrap
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


# ---- 11. SWAR popcount and the bytes of an i32 (sign-extended), packed back; wrapping and saturating i8 -------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def popcount_bytes(X, Pop, Bytes, Packed, *, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[ts.i32, BN]()
    t = ts.RegVec[ts.i32, BN]()
    byte = ts.RegVec[ts.i32, BN]()
    packed = ts.RegVec[ts.i32, BN]()
    b8 = ts.RegVec[ts.i8, BN]()
    ts.load(x, X, at=(i,))
    ts.sub(t, x, (x >> 1) & 0x55555555)           # (the mask clears the sign bits the shift brings in)
    ts.add(t, t & 0x33333333, (t >> 2) & 0x33333333)
    ts.bit_and(t, t + (t >> 4), 0x0F0F0F0F)
    ts.mul(t, t, 0x01010101)                      # wraps: the top byte is the count (at most 32)
    ts.shr(t, t, 24)
    ts.store(Pop, t, at=(i,))
    ts.zero(packed)
    for k in range(4):                             # unrolled when traced: byte k, sign-extended, in row k
        ts.shl(byte, x, 24 - 8 * k)
        ts.shr(byte, byte, 24)
        ts.copy(b8, byte)
        ts.store(Bytes, b8, at=(k, i))
        ts.bit_or(packed, packed, (byte & 0xFF) << (8 * k))
    ts.store(Packed, packed, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [32, 45, 1])
def test_popcount_and_bytes_of_i32(backend, n, rng):
    x = ints(rng, -(2**31), 2**31, (n,), I32)
    x[:min(n, 4)] = torch.tensor([-1, -(2**31), 0, 0x7F80FF01], dtype=I32)[:min(n, 4)]
    pop, packed = torch.full((n,), POISON, dtype=I32), torch.full((n,), POISON, dtype=I32)
    by = torch.full((4, n), POISON, dtype=I8)
    launch(popcount_bytes, backend, x, pop, by, packed)
    assert pop.tolist() == [bin(v & 0xFFFFFFFF).count("1") for v in x.tolist()]
    assert torch.equal(by, x.view(I8).view(n, 4).T) and torch.equal(packed, x)


@ts.kernel(grid=lambda A: (1,))
def int8_wrap_saturate(A, B, Wrap, Sat, Abs, *, N: int = 64):
    """Wrap = a * b + a in i8 (wrapping), Sat = clamp(a * b + a, -128, 127) in i32, Abs = |a| in i8 (|-128| = -128)."""
    a = ts.RegVec[ts.i8, N]()
    b = ts.RegVec[ts.i8, N]()
    w = ts.RegVec[ts.i8, N]()
    a32 = ts.RegVec[ts.i32, N]()
    b32 = ts.RegVec[ts.i32, N]()
    ts.load(a, A, at=(0,))
    ts.load(b, B, at=(0,))
    ts.mul(w, a, b)
    ts.add(w, w, a)
    ts.store(Wrap, w, at=(0,))
    ts.copy(a32, a)
    ts.copy(b32, b)
    ts.mul(b32, a32, b32)
    ts.add(b32, b32, a32)
    ts.max(b32, b32, -128)
    ts.min(b32, b32, 127)
    ts.copy(w, b32)
    ts.store(Sat, w, at=(0,))
    ts.abs(w, a)
    ts.store(Abs, w, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_wrapping_and_saturating_arithmetic(backend, rng):
    a, b = ints(rng, -128, 128, (64,), I8), ints(rng, -128, 128, (64,), I8)
    a[:3], b[:3] = torch.tensor([-128, 127, -128], dtype=I8), torch.tensor([-1, 127, -128], dtype=I8)
    wrap_, sat, abs_ = (torch.full((64,), 7, dtype=I8) for _ in range(3))
    launch(int8_wrap_saturate, backend, a, b, wrap_, sat, abs_)
    exact = [x * y + x for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    assert wrap_.tolist() == [wrap(v, 8) for v in exact]
    assert sat.tolist() == [max(-128, min(127, v)) for v in exact]
    assert torch.equal(abs_, a.abs())                  # torch's int8 abs wraps too


# ---- 12. f16 rows summed into an f64 accumulator across column tiles (exact), and into f32 ------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def wide_row_sums(X, S64, S32, *, BM: int = 8, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegTile[X.dtype, BM, BN]()
    s64 = ts.RegVec[ts.f64, BM]()
    s32 = ts.RegVec[ts.f32, BM]()
    ts.zero(s64)
    ts.zero(s32)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.row_sum(s64, x, s64)                    # f64 work: the acc is f64
        ts.row_sum(s32, x, s32)
    ts.store(S64, s64, at=(i,))
    ts.store(S32, s32, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 1000), (5, 33), (3, 0)])
def test_f16_rows_into_an_f64_accumulator(backend, M, N, rng):
    x = (randn(rng, M, N) * 1000).to(F16)
    x[0, :2] = torch.tensor([60000.0, 2.0**-24])[:N] if N >= 2 else x[0, :2]
    s64, s32 = torch.full((M,), math.nan, dtype=F64), torch.full((M,), math.nan)
    launch(wide_row_sums, backend, x, s64, s32)
    assert torch.equal(s64, x.double().sum(1))                       # every f16 and their sums exact in f64
    close(s32, x.double().sum(1), dtype=torch.float32, scale=100)


# ---- 13. a transposing cast between strided views: a column-strided input into a transposed window of a buffer -----
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def transpose_cast(X, Y, *, BM: int = 16, BN: int = 32):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BN, BM]()
    ts.load(x, X, at=(i, j))
    ts.copy(y, x.T)
    ts.store(Y, y, at=(j, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(37, 45), (16, 32), (1, 70), (0, 3)])
@pytest.mark.parametrize(("xdt", "ydt"), [(F16, BF), (torch.float32, F16), (BF, torch.float32)])
def test_transposing_cast_between_strided_views(backend, M, N, xdt, ydt, rng):
    x = randn(rng, M, 2 * N, dtype=xdt)[:, ::2]                      # every other column
    buf = torch.full((M + 3, N + 2), math.nan, dtype=ydt)
    y = buf.T[1:N + 1, 2:M + 2]                                      # (N, M), transposed, inside a NaN frame
    launch(transpose_cast, backend, x, y)
    assert torch.equal(y, x.T.to(ydt))
    frame = torch.ones_like(buf, dtype=torch.bool)
    frame[2:M + 2, 1:N + 1] = False
    assert buf[frame].isnan().all()


# ---- 14. roll and flip along the columns by a runtime shift: x @ P, P a permutation made of compares ---------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def roll_flip(X, Roll, Flip, shift: int, *, BM: int = 16, BN: int = 32):
    """Roll = torch.roll(X, shift, 1), Flip = X.flip(1), for rows of 0 < N <= BN columns."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    k = ts.RegVec[ts.i32, BN]()
    dest = ts.RegVec[ts.i32, BN]()
    neg = ts.RegVec[ts.bool_, BN]()
    hit = ts.RegTile[ts.bool_, BN, BN]()
    p = ts.RegTile[ts.f32, BN, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.arange(k, 0)
    ts.add(dest, k, shift)
    ts.rem(dest, dest, n)                          # C's remainder: the sign of k + shift
    ts.lt(neg, dest, 0)
    ts.where(dest, neg, dest + n, dest)            # column k goes to (k + shift) mod n
    for out, d in ((Roll, dest), (Flip, (k * -1) + (n - 1))):   # flip: column k goes to n - 1 - k
        ts.eq(hit, ts.per_row(d), ts.per_col(k))
        ts.where(p, hit, 1.0, 0.0)                 # (padding columns of x are 0: where they land adds nothing)
        ts.zero(y)
        ts.mma_AB(y, x, p, y)
        ts.store(out, y, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 32), (21, 19), (2, 1)])
@pytest.mark.parametrize("shift", [3, -5, 0, 1007, -(2**31) + 1])
def test_roll_and_flip_by_a_permutation(backend, M, N, shift, rng):
    x = randn(rng, M, N)
    roll, flip = torch.full((M, N), math.nan), torch.full((M, N), math.nan)
    launch(roll_flip, backend, x, roll, flip, shift)
    assert torch.equal(roll, torch.roll(x, shift % N, 1)) and torch.equal(flip, x.flip(1))


# ---- 15. Kahan-compensated sums across column tiles (each lane), against the naive f32 sum ---------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def kahan_row_sum(X, Naive, Kahan, *, BM: int = 8, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    naive = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegVec[ts.f32, BM]()
    ts.zero(s)
    ts.zero(c)
    ts.zero(naive)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.add(naive, naive, x)
        ts.sub(y, x, c)
        ts.add(t, s, y)
        ts.sub(c, t, s)
        ts.sub(c, c, y)                            # what t lost of y (the compiler must not simplify it to 0)
        ts.copy(s, t)
    ts.row_sum(out, naive)
    ts.store(Naive, out, at=(i,))
    ts.row_sum(out, s)
    ts.store(Kahan, out, at=(i,))


@pytest.mark.parametrize("N", [4096, 100])
def test_kahan_sums_keep_what_naive_sums_lose(N, rng):
    x = torch.ones(4, N)
    x[:, 0] = 1e8                                  # every later 1.0 in lane 0 is lost to a naive f32 sum
    x[1] = torch.from_numpy(rng.random(N)).float()
    x[2] = torch.from_numpy(rng.standard_normal(N) * 100).float()
    outs = []
    for backend in BACKENDS:
        naive, kahan = torch.full((4,), math.nan), torch.full((4,), math.nan)
        launch(kahan_row_sum, backend, x, naive, kahan)
        outs.append((naive, kahan))
    for a, b in zip(*outs, strict=True):          # the same f32 operations per lane (the row sums' order may differ)
        close(a, b, dtype=torch.float32, scale=10)
    exact = x.double().sum(1)
    naive, kahan = outs[0]
    assert (kahan.double() - exact).abs()[0] <= 8 and (naive.double() - exact).abs()[0] >= (N // 32 - 1) * 0.99
    close(kahan[1:], exact[1:], dtype=torch.float32, scale=10)


# ---- 16. Welford's mean and variance merged across column tiles: a large offset, constant rows ---------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def welford_rows(X, Mean, Var, *, BM: int = 8, BN: int = 32):
    """Mean and population variance of each row, merging each tile's (count, mean, M2) into the running ones."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    m2 = ts.RegVec[ts.f32, BM]()
    tm = ts.RegVec[ts.f32, BM]()
    tm2 = ts.RegVec[ts.f32, BM]()
    delta = ts.RegVec[ts.f32, BM]()
    ts.zero(mean)
    ts.zero(m2)
    for j in ts.range(ts.cdiv(n, BN)):
        seen = j * BN
        count = ts.smin(BN, n - seen)             # this tile's real columns
        ts.load(x, X, at=(i, j))
        ts.row_sum(tm, x)
        ts.div(tm, tm, count)
        ts.sub(x, x, ts.per_row(tm))
        ts.right_fill(x, x, count, 0.0)          # padding columns are not part of the tile's M2
        ts.mul(x, x, x)
        ts.row_sum(tm2, x)
        ts.sub(delta, tm, mean)
        ts.mul(tm, delta, count / (seen + count))     # the mean moves by delta * n_b / (n_a + n_b)
        ts.add(mean, mean, tm)
        ts.mul(delta, delta, delta)
        ts.mul(delta, delta, seen * (count / (seen + count)))
        ts.add(m2, m2, tm2)
        ts.add(m2, m2, delta)
    ts.div(m2, m2, n)
    ts.store(Mean, mean, at=(i,))
    ts.store(Var, m2, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 1000), (5, 33), (3, 1)])
def test_welford_mean_and_variance(backend, M, N, rng):
    x = randn(rng, M, N) * 0.1 + 1e4                 # E[x^2] - E[x]^2 in f32 would be noise
    x[0] = 3.25
    mean, var = torch.full((M,), math.nan), torch.full((M,), math.nan)
    launch(welford_rows, backend, x, mean, var)
    xd = x.double()
    close(mean, xd.mean(1), dtype=torch.float32)
    torch.testing.assert_close(var.double(), xd.var(1, unbiased=False), rtol=2e-2, atol=1e-6)
    assert var[0] == 0.0


# ---- 17. C = alpha A B + beta C in place (A a transposed view), BLAS's beta = 0: C's NaNs are not read ---------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_alpha_beta(A, B, C, alpha: float, beta: float, *, BM: int = 16, BN: int = 16, BK: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[ts.f32, BM, BN]()
    ignore = ts.RegTile[ts.bool_, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.load(c, C, at=(i, j))
    beta_t = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(beta_t)
    ts.add(beta_t, beta_t, beta)
    ts.eq(ignore, beta_t, 0.0)                     # beta == 0, as a mask (two scalars cannot be compared)
    ts.mul(c, c, beta)
    ts.where(c, ignore, 0.0, c)
    ts.mul(acc, acc, alpha)
    ts.add(acc, acc, c)
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "K"), [(32, 48, 40), (17, 5, 0), (1, 1, 1)])
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 2.0), (1.0, 0.0), (-1.5, 1.0)])
def test_gemm_alpha_beta_in_place(backend, M, N, K, alpha, beta, rng):
    a = randn(rng, K, M, dtype=BF).T                  # (M, K), transposed
    b = randn(rng, K, N, dtype=BF)
    c0 = randn(rng, M, N)
    c0[0, 0] = math.nan                               # ignored when beta = 0 (torch.addmm's rule)
    c = c0.clone()
    launch(gemm_alpha_beta, backend, a, b, c, alpha, beta)
    want = torch.addmm(c0.double(), a.double(), b.double(), beta=beta, alpha=alpha)
    close(c, want, scale=4)


# ---- 18. an fp8 (e4m3) GEMM with per-tensor scales given at run time, f32 accumulate, bf16 out --------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_f8_scaled(A, B, C, scale_a: float, scale_b: float, *, BM: int = 16, BN: int = 16, BK: int = 32):
    """C = (A @ B) * scale_a * scale_b for f8e4m3 A (M, K) and B given as (N, K) (K-major, as the matrix units want)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[ts.f8e4m3, BM, BK]()
    b = ts.SharedTile[ts.f8e4m3, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(j, k))
        ts.mma_ABt(acc, a, b, acc)
    ts.mul(acc, acc, scale_a * scale_b)            # one f32 scale (scalar arithmetic is f32)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "K"), [(32, 16, 64), (19, 7, 45), (4, 4, 0)])
def test_f8_gemm_with_runtime_scales(backend, M, N, K, rng):
    F8 = torch.float8_e4m3fn
    a, b = (randn(rng, M, K) * 4).to(F8), (randn(rng, N, K) * 4).to(F8)
    sa, sb = 0.037, 1.9
    c = torch.full((M, N), math.nan, dtype=BF)
    launch(gemm_f8_scaled, backend, a, b, c, sa, sb)
    scale = float(np.float32(np.float32(sa) * np.float32(sb)))
    close(c, (a.double() @ b.double().T) * scale, dtype=BF, scale=4)


# ---- 19. a vertical window sum by 1-row tiles: a loop of 2 radius + 1 trips (none for a negative radius) ----------
@ts.kernel(grid=lambda X, BN: (X.shape[0], ts.cdiv(X.shape[1], BN)))
def row_window_sum(X, Y, radius: int, *, BN: int = 32):
    """Y[r] = X[r - radius] + ... + X[r + radius], rows past either end reading zeros."""
    r, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, 1, BN]()
    acc = ts.RegTile[ts.f32, 1, BN]()
    ts.zero(acc)
    for d in ts.range(-radius, radius + 1):
        ts.load(x, X, at=(r + d, j))                # 1-row tiles: the row coordinate is the row
        ts.add(acc, acc, x)
    ts.store(Y, acc, at=(r, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(9, 40), (1, 3), (0, 4)])
@pytest.mark.parametrize("radius", [0, 2, 20, -1])
def test_row_window_sum_with_a_runtime_radius(backend, M, N, radius, rng):
    x = ints(rng, -5, 6, (M, N), torch.float32)
    y = torch.full((M, N), math.nan)
    launch(row_window_sum, backend, x, y, radius)
    pad = torch.cat([torch.zeros(max(radius, 0), N), x, torch.zeros(max(radius, 0), N)])
    want = torch.stack([pad[r:r + 2 * radius + 1].sum(0) for r in range(M)]) if radius >= 0 and M else \
        torch.zeros(M, N)
    assert torch.equal(y, want)


# ---- 20. an activation chosen by a constexpr string, on a 3-D grid over a (B, M, N) tensor ---------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[2], BN), ts.cdiv(X.shape[1], BM), X.shape[0]))
def activation(X, Y, *, ACT: str, BM: int = 8, BN: int = 32):
    j, i, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(b, i, j))
    if ACT == "silu":
        ts.sigmoid(y, x)
        ts.mul(y, y, x)
    elif ACT == "gelu_tanh":                       # 0.5 x (1 + tanh(u)), tanh(u) = 2 sigmoid(2u) - 1
        ts.mul(t, x, x)
        ts.mul(t, t, 0.044715)
        ts.add(t, t, 1.0)
        ts.mul(t, t, x)
        ts.mul(t, t, 2.0 * math.sqrt(2.0 / math.pi))
        ts.sigmoid(t, t)
        ts.mul(y, x, t)
    else:                                          # softplus, stable: relu(x) + log(1 + exp(-|x|))
        ts.abs(t, x)
        ts.neg(t, t)
        ts.exp(t, t)
        ts.add(t, t, 1.0)
        ts.log(t, t)
        ts.relu(y, x)
        ts.add(y, y, t)
    out = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(out, y)
    ts.store(Y, out, at=(b, i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "softplus"])
@pytest.mark.parametrize(("B", "M", "N"), [(2, 9, 40), (1, 1, 1)])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
def test_activation_chosen_by_a_constexpr_string(backend, act, B, M, N, ydt, rng):
    x = randn(rng, B, M, N) * 5
    x.view(-1)[:3] = torch.tensor([100.0, -100.0, 0.0])[:x.numel()]
    y = torch.full((B, M, N), math.nan, dtype=ydt)
    launch(activation, backend, x, y, ACT=act)
    fn = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "softplus": F.softplus}[act]
    close(y, fn(x.double()), dtype=ydt, scale=2)


# ---- 21. misuse: refused with a message naming the argument, before any backend runs -----------------------------
@ts.kernel(grid=lambda X: (1,))
def copy16(X, Y, *, N: int = 16):
    x = ts.RegVec[ts.f32, N]()
    ts.load(x, X, at=(0,))
    ts.store(Y, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "ydt", "bad"), [(torch.uint8, torch.float32, "X"), (torch.int16, torch.float32, "X"),
                                                 (torch.bool, torch.float32, "X"),
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


# ---- 22. every kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ----
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
    "popcount_bytes": (popcount_bytes, (meta(4096, dtype=I32), meta(4096, dtype=I32), meta(4, 4096, dtype=I8),
                                        meta(4096, dtype=I32)), dict(BN=256)),
    "to_i64": (to_i64, (meta(128), meta(128, dtype=I64)), {}),
    "int8_wrap_saturate": (int8_wrap_saturate, (meta(64, dtype=I8),) * 5, {}),
    "wide_row_sums": (wide_row_sums, (meta(1024, 4096, dtype=F16), meta(1024, dtype=F64), meta(1024)),
                      dict(BM=32, BN=128)),
    "transpose_cast": (transpose_cast, (meta(1024, 2048, dtype=F16)[:, ::2], meta(1024, 1024, dtype=BF).T),
                       dict(BM=64, BN=64)),
    "kahan_row_sum": (kahan_row_sum, (meta(1024, 4096), meta(1024), meta(1024)), dict(BM=32, BN=128)),
    "welford_rows": (welford_rows, (meta(1024, 4096), meta(1024), meta(1024)), dict(BM=32, BN=128)),
    "gemm_alpha_beta": (gemm_alpha_beta, (meta(512, 1024, dtype=BF).T, meta(512, 256, dtype=BF), meta(1024, 256),
                                          0.5, 1.0), dict(BM=128, BN=64, BK=64)),
    "gemm_f8_scaled": (gemm_f8_scaled, (meta(1024, 512, dtype=torch.float8_e4m3fn),
                                        meta(256, 512, dtype=torch.float8_e4m3fn), meta(1024, 256, dtype=BF), 0.5,
                                        2.0), dict(BM=128, BN=64, BK=64)),
    "row_window_sum": (row_window_sum, (meta(1024, 1024), meta(1024, 1024), 3), dict(BN=256)),
    "activation_gelu": (activation, (meta(4, 512, 1024), meta(4, 512, 1024, dtype=BF)), dict(ACT="gelu_tanh", BM=32,
                                                                                            BN=128)),
}
TRITON_ONLY = {   # f32 operands of the matrix units: Gluon takes bf16, f16 and f8 products only
    "segmented_cumsum": (segmented_cumsum, (meta(1024, 64), meta(64, dtype=I64), meta(1024, 64)), dict(BN=64)),
    "roll_flip": (roll_flip, (meta(1024, 32), meta(1024, 32), meta(1024, 32), 3), dict(BM=64, BN=32)),
    "window_attention": (window_attention, (meta(2048, 32),) * 4 + (256, 0.125), dict(BM=32, BN=32, D=32)),
}


@pytest.mark.parametrize("name", [*AOT_CASES, *TRITON_ONLY])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **TRITON_ONLY}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
