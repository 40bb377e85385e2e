"""Round 4 of held-out kernels (after test_heldout_kernels.py, test_heldout_round2.py and test_heldout_round3.py):
kernels an outsider would write with the tile language, run on the reference executor and Triton's interpreter
against float64 / exact-integer NumPy and torch, outputs poisoned first, then compiled for Hopper (sm_90a) on this
CPU by the Triton and Gluon backends.

Index arithmetic past 2**31 on an expanded (65536, 65537) tensor (its numel, flat positions row * N), band masks
built on bool_ masks by tril/triu and combined with the & | ~ operators while a loop carries them, float scalar
arithmetic (a runtime float and sizes past 2**24 meeting constants), a 64-bit xorshift whose state a loop carries,
Python's floor division and modulo built from C's truncating div and rem with per-column divisors, column min-max
scaling and double centering (reductions along both axes broadcast back, padding masked out), a temporal difference
on a 3-D grid whose leading coordinate reaches -1 on a transposed view, 1x1 tiles with atomic adds at coordinates past
the edges, nested loops whose inner bound is the outer counter, nan_to_num with runtime replacements, conversions
between 16-bit floats, bools and wide integers, integer sums that wrap, int arguments and int constants chosen into
integer and float tiles, fp8 tiles made by fill/tril/arange, the work dtype of ops with f64 results, grids that
cannot launch, and misuse of Python's operators on tiles.

Bugs these found, fixed in the compiler, each kept here as its regression test:
- Triton/Gluon: an index product of two runtime values (X.shape[0] * X.shape[1]) wrapped at 2**31;
- Triton/Gluon: tril/triu/right_fill/lower_fill of a bool_ mask made it an i32 tile, so ~ (logical_not) of it was true;
- Triton/Gluon: where of an int argument into a narrower integer tile left it unwrapped for the ops after it;
- Triton/Gluon: where of two indices (sizes, int constants) into a float tile left an int tile (exp of it failed);
- Triton/Gluon: fill/tril/arange of fp8 tiles failed in the interpreter (no f8 constants) and did not saturate;
- Triton/Gluon: where into an f64 tile chose in f32 (0.1 became f32(0.1)) unless an operand was f64;
- reference: float scalar arithmetic ran in float64 (the backends' is f32); integer operands of a float reduction
  were summed exactly (the backends convert each to f32 first); a float scalar was kept f64 by an f64 result whose
  work was f32;
- language: `if tile:` was silently true, `x > 0` a bare TypeError; a negative grid a NumPy error (reference) or
  nothing (interpreter).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I8, I32, I64, ints, launch, meta, randn, wrap
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import LaunchError, TileDTypeError, TileShapeError, TraceError

POISON = -77                       # no integer result below can be this
U64 = 2**64 - 1


# ---- 1. index arithmetic past 2**31: the numel and flat positions of an expanded (65536, 65537) tensor --------------
@ts.kernel(grid=lambda X: (1,))
def flat_positions(X, Pos, Inv, row: int, *, BN: int = 16):
    """Pos[0] = row * N + k (flat positions of row `row`'s first BN elements), Pos[1] = numel - BN + k (the last BN),
    Inv = X's first BN elements of that row / numel, for an (M, N) X."""
    numel = X.shape[0] * X.shape[1]
    p = ts.RegVec[ts.i64, BN]()
    ts.arange(p, row * X.shape[1])
    ts.store(Pos, p, at=(0, 0))
    ts.arange(p, numel - BN)
    ts.store(Pos, p, at=(1, 0))
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(row, 0))
    ts.div(x, x, numel)                                # an index scalar in f32 work: f32(numel)
    ts.store(Inv, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "row"), [(65536, 65537, 65535), (3, 40, 2), (46341, 46341, 46340)])
def test_index_products_past_2_31(backend, M, N, row, rng):
    BN = 16
    base = randn(rng, 1, BN) + 2
    x = base.expand(M, BN) if N == BN else torch.cat([base, torch.zeros(1, N - BN)], 1).expand(M, N)  # no memory
    pos, inv = torch.full((2, BN), POISON, dtype=I64), torch.full((BN,), math.nan)
    launch(flat_positions, backend, x, pos, inv, row)
    k = torch.arange(BN, dtype=I64)
    assert torch.equal(pos[0], row * N + k) and torch.equal(pos[1], M * N - BN + k)
    numel32 = torch.tensor(float(M * N), dtype=torch.float32)         # the index scalar as f32 work takes it
    assert torch.equal(inv, base[0] / numel32)


def test_index_products_of_runtime_values_are_64_bit_in_generated_source():
    traced = flat_positions.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.i64, 2), ts.ArgSpec(ts.f32, 1), 3)
    for backend, ns in (("triton", "tl"), ("gluon", "gl")):
        src = traced.source(backend)
        assert f"{ns}.cast(X_d0, {ns}.int64) * X_d1" in src and f"{ns}.cast(row, {ns}.int64) * X_d1" in src


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM) * ts.cdiv(X.shape[1], BN),))
def tiles_in_order(X, Y, *, BM: int = 16, BN: int = 16):
    """A product of sizes that bounds a loop and makes tile coordinates: address math, which stays 32-bit (the copy
    engine takes 32-bit coordinates; a 64-bit loop counter would make every offset in the loop 64-bit)."""
    cols = ts.cdiv(X.shape[1], BN)
    x = ts.RegTile[X.dtype, BM, BN]()
    for t in ts.range(ts.block_id(0), ts.cdiv(X.shape[0], BM) * cols, ts.num_blocks(0)):
        ts.load(x, X, at=(t // cols, t % cols))
        ts.store(Y, x, at=(t // cols, t % cols))


def test_index_products_of_address_math_stay_32_bit():
    traced = tiles_in_order.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2))
    assert "int64" not in traced.source("triton")
    check_triton_sm90a(tiles_in_order, (meta(4096, 4096, dtype=BF), meta(4096, 4096, dtype=BF)), {})


# ---- 2. band masks on bool_ masks: tril/triu of a mask, & | ~ operators, a mask and a count carried by a loop --------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def band_mask(X, Count, Any, Y, lo: int, hi: int, *, BM: int = 8, BN: int = 16):
    """Per row r: Count = #{c : x[r, c] > 0 and lo <= c - r <= hi}, Any = whether that set is non-empty or the row
    has a NaN; Y = x there, else -x."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    band = ts.RegTile[ts.bool_, BM, BN]()
    nan = ts.RegTile[ts.bool_, BM, BN]()
    hit = ts.RegVec[ts.bool_, BM]()
    seen = ts.RegVec[ts.bool_, BM]()
    count = ts.RegVec[ts.i32, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.fill(seen, 0)
    ts.zero(count)
    for k in ts.range(ts.cdiv(n, BN)):
        shift = k * BN - i * BM                        # (global col - global row) - (tile col - tile row)
        ts.load(x, X, at=(i, k))
        ts.gt(band, x, 0.0)
        ts.tril(band, band, hi - shift, 0)             # col - row <= hi: masks of masks stay masks
        ts.triu(band, band, lo - shift, 0)
        ts.ne(nan, x, x)
        ts.row_sum(count, band, count)                 # bool_ counted in i32
        ts.row_max(hit, band | nan)
        ts.logical_or(seen, seen, hit)
        ts.where(y, ~band, -x, x)                       # (-NaN is NaN)
        ts.store(Y, y, at=(i, k))
    c8 = ts.RegVec[ts.i8, BM]()
    ts.copy(c8, seen)
    ts.store(Count, count, at=(i,))
    ts.store(Any, c8, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "lo", "hi"), [(8, 16, 0, 0), (13, 37, -3, 5), (21, 19, 2, 30), (5, 0, 0, 1)])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
def test_band_mask_on_bool_masks(backend, M, N, lo, hi, ydt, rng):
    x = randn(rng, M, N)
    if M > 4 and N > 4:
        x[4, 3] = math.nan
    count, any_ = torch.full((M,), POISON, dtype=I32), torch.full((M,), POISON, dtype=I8)
    y = torch.full((M, N), 99.0, dtype=ydt)
    launch(band_mask, backend, x, count, any_, y, lo, hi)
    d = torch.arange(N)[None, :] - torch.arange(M)[:, None]
    band = (x > 0) & (d >= lo) & (d <= hi)
    assert torch.equal(count, band.sum(1).to(I32))
    assert torch.equal(any_, (band | x.isnan()).any(1).to(I8))
    torch.testing.assert_close(y, torch.where(band, x, -x).to(ydt), rtol=0, atol=0, equal_nan=True)


# ---- 3. float scalar arithmetic runs in f32 on every backend: a runtime float, sizes past 2**24, constants ---------
@ts.kernel(grid=lambda X: (1,))
def scalar_chain(X, Y, a: float, *, N: int = 8):
    x = ts.RegVec[ts.f32, N]()
    ts.load(x, X, at=(0,))
    n = X.shape[0]
    exprs = [(a + 3.0) + 3.0, n * 3.0 - a, a / 7 * 1e-3, -a - 1.0, n / 3, 1.0 / (n * n * 1.0) * a]
    for k, s in enumerate(exprs):
        ts.store(Y, x + s, at=(k,))


def _scalar_chain_f32(a: float, n: int) -> list[np.float32]:
    """The expressions of scalar_chain, each step in f32 (a runtime float is an f32, an index meeting a float too)."""
    f = np.float32
    a32, n32 = f(a), f(n)
    with np.errstate(all="ignore"):
        return [(a32 + f(3)) + f(3), n32 * f(3) - a32, a32 / f(7) * f(1e-3), f(0) - a32 - f(1), n32 / f(3),
                f(1) / (f(n * n) * f(1)) * a32]


# a runtime float is an f32 argument on the GPU; these are f32 values, as Triton's interpreter keeps a Python float
# until its first operation
F32_ARGS = [float(np.float32(v)) for v in (1e8, 0.1, 3.3e7, -2.5e-39, 1e30)]


@pytest.mark.parametrize(("n", "a"), zip((8, 2**24 + 1, 2**25 + 7, 3, 46341), F32_ARGS, strict=True))
def test_float_scalar_arithmetic_is_f32(n, a):
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 7.0, -2.0, 3.0]).repeat((n + 7) // 8)[:n] if n < 100 else \
        torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 7.0, -2.0, 3.0])[:1].expand(n)
    outs = []
    for backend in BACKENDS:
        y = torch.full((8 * 6,), math.nan)
        launch(scalar_chain, backend, x, y, a)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, equal_nan=True)
    want = [torch.from_numpy(x[:8].numpy() + s) if n >= 8 else None for s in _scalar_chain_f32(a, n)]
    for k, w in enumerate(want):
        if w is not None:
            torch.testing.assert_close(outs[0][8 * k:8 * k + 8], w, rtol=0, atol=0, equal_nan=True)


# ---- 4. xorshift64 over a loop-carried i64 state: logical shifts from arithmetic ones, ~ of integers ---------------
@ts.kernel(grid=lambda S, BN: (ts.cdiv(S.shape[0], BN),))
def xorshift64(S, Out, Low, *, STEPS: int = 5, BN: int = 16):
    """STEPS rounds of x ^= x << 13; x ^= x >>> 7; x ^= x << 17 on each 64-bit state (>>> logical); Out = ~x,
    Low = the wrapping i32 sum of each round's low 32 bits."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.i64, BN]()
    t = ts.RegVec[ts.i64, BN]()
    low = ts.RegVec[ts.i32, BN]()
    lo32 = ts.RegVec[ts.i32, BN]()
    ts.load(x, S, at=(i,))
    ts.zero(low)
    for _ in ts.range(STEPS):
        ts.bit_xor(x, x, x << 13)
        ts.shr(t, x, 7)
        ts.bit_and(t, t, (1 << 57) - 1)               # x >>> 7: the sign bits shifted in are cleared
        ts.bit_xor(x, x, t)
        ts.bit_xor(x, x, x << 17)
        ts.copy(lo32, x)                              # i64 -> i32 keeps the low 32 bits
        ts.add(low, low, lo32)
    ts.store(Out, ~x, at=(i,))
    ts.store(Low, low, at=(i,))


def _xorshift64(x: int, steps: int) -> tuple[int, int]:
    low = 0
    for _ in range(steps):
        x ^= (x << 13) & U64
        x ^= x >> 7
        x ^= (x << 17) & U64
        low += x & 0xFFFFFFFF
    return x, low


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "steps"), [(16, 1), (37, 5), (0, 3)])
def test_xorshift64_state_carried_by_a_loop(backend, n, steps, rng):
    seeds = [int(v) for v in rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)]
    if n:
        seeds[:3] = [-1, -(2**63), 1]
    s = torch.tensor(seeds, dtype=I64)
    out, low = torch.full((n,), POISON, dtype=I64), torch.full((n,), POISON, dtype=I32)
    launch(xorshift64, backend, s, out, low, STEPS=steps)
    want = [_xorshift64(v & U64, steps) for v in seeds]
    assert out.tolist() == [wrap(~x, 64) for x, _ in want]
    assert low.tolist() == [wrap(lo, 32) for _, lo in want]


# ---- 5. Python's // and % from C's truncating div and rem: per-column divisors, masks, where ----------------------
@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def floor_divmod(A, B, Q, R, *, BM: int = 8, BN: int = 16):
    """Q = A // B and R = A % B as Python's (floor), for an integer (M, N) A and per-column divisors B (N,)."""
    i = ts.block_id(0)
    a = ts.RegTile[A.dtype, BM, BN]()
    b = ts.RegVec[A.dtype, BN]()
    bt = ts.RegTile[A.dtype, BM, BN]()
    q = ts.RegTile[A.dtype, BM, BN]()
    r = ts.RegTile[A.dtype, BM, BN]()
    fix = ts.RegTile[ts.bool_, BM, BN]()
    rneg = ts.RegTile[ts.bool_, BM, BN]()
    bneg = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(a, A, at=(i, 0))
    ts.load(b, B, at=(0,))
    ts.zero(bt)
    ts.add_col(bt, bt, b)                             # b broadcast down the rows (rem takes tiles, not vectors)
    ts.div_col(q, a, b)                               # truncated toward zero
    ts.rem(r, a, bt)                                  # the sign of a
    ts.lt(rneg, r, 0)
    ts.lt(bneg, ts.per_col(b), 0)
    ts.ne(fix, r, 0)
    ts.logical_and(fix, fix, (rneg & ~bneg) | (~rneg & bneg))   # r != 0 and its sign is not b's
    ts.where(q, fix, q - 1, q)
    ts.where(r, fix, r + bt, r)
    ts.store(Q, q, at=(i, 0))
    ts.store(R, r, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [I8, I32, I64])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (19, 11)])
def test_floor_divmod_from_truncating_div_and_rem(backend, dt, M, N, rng):
    lo, hi = {I8: (-128, 128), I32: (-(2**31), 2**31), I64: (-(2**63), 2**63)}[dt]
    a = ints(rng, lo // 2, hi // 2, (M, N), dt)
    a[0, :4] = torch.tensor([hi - 1, lo, -7, 7], dtype=dt)      # (lo // -1 overflows: undefined, as in C)
    b = ints(rng, -9, 10, (N,), dt)
    b[b == 0] = 3
    b[:4] = torch.tensor([-1, 2, -2, -1], dtype=dt)
    if N > 5:
        b[4], b[5] = lo, hi - 1
    q, r = torch.full((M, N), POISON, dtype=dt), torch.full((M, N), POISON, dtype=dt)
    launch(floor_divmod, backend, a, b, q, r)
    bits = 8 * a.element_size()
    want_q = [[wrap(x // y, bits) for x, y in zip(row, b.tolist(), strict=True)] for row in a.tolist()]
    want_r = [[wrap(x % y, bits) for x, y in zip(row, b.tolist(), strict=True)] for row in a.tolist()]
    assert q.tolist() == want_q and r.tolist() == want_r


# ---- 6. column min-max scaling and double centering: reductions along both axes, broadcast back, padding masked ---
@ts.kernel(grid=lambda X: (1,))
def scale_and_center(X, S, C, *, BM: int = 32, BN: int = 16):
    """For an (M, N) X in one tile: S = (X - colmin) / (colmax - colmin), 0 where a column is constant;
    C = X - rowmean - colmean + mean (double centering)."""
    m, n = X.shape[0], X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    lo = ts.RegVec[ts.f32, BN]()
    hi = ts.RegVec[ts.f32, BN]()
    flat = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(x, X, at=(0, 0))
    ts.lower_fill(t, x, m, math.inf)                  # padding rows out of the column minimum
    ts.col_min(lo, t)
    ts.lower_fill(t, x, m, -math.inf)
    ts.col_max(hi, t)
    ts.sub(hi, hi, lo)
    ts.eq(flat, ts.per_col(hi), 0.0)
    ts.sub_col(t, x, lo)
    ts.div(t, t, ts.per_col(hi))                      # 0 / 0 in a constant column: NaN, replaced next
    ts.where(t, flat, 0.0, t)
    ts.store(S, t, at=(0, 0))
    rmean = ts.RegVec[ts.f32, BM]()
    cmean = ts.RegVec[ts.f32, BN]()
    total = ts.RegVec[ts.f32, BM]()
    ts.row_sum(rmean, x)                              # padding reads as 0: sums are right
    ts.div(rmean, rmean, n)
    ts.col_sum(cmean, x)
    ts.div(cmean, cmean, m)
    ts.zero(t)
    ts.add_col(t, t, cmean)
    ts.row_sum(total, t)                              # every row: the sum of the column means (padding adds 0)
    ts.div(total, total, n)                           # the grand mean, in every row
    ts.sub(x, x, ts.per_row(rmean))
    ts.sub(x, x, ts.per_col(cmean))
    ts.add(x, x, ts.per_row(total))
    ts.store(C, x, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, F16, BF])
@pytest.mark.parametrize(("M", "N"), [(32, 16), (17, 5), (1, 9), (3, 1)])
def test_column_scaling_and_double_centering(backend, dt, M, N, rng):
    x = (randn(rng, M, N) * 5 - 3).to(dt)
    x[:, N // 2] = 2.5                                 # a constant column
    s, c = torch.full((M, N), math.nan, dtype=dt), torch.full((M, N), math.nan, dtype=dt)
    launch(scale_and_center, backend, x, s, c)
    xd = x.double()
    lo, hi = xd.min(0).values, xd.max(0).values
    want_s = torch.where(hi == lo, 0.0, (xd - lo) / (hi - lo))
    want_c = xd - xd.mean(1, keepdim=True) - xd.mean(0, keepdim=True) + xd.mean()
    tol = {torch.float32: 1e-5, F16: 2e-3, BF: 1.6e-2}[dt]
    torch.testing.assert_close(s.double(), want_s, rtol=tol, atol=tol)
    torch.testing.assert_close(c.double(), want_c, rtol=tol, atol=tol * 8)
    assert not s.isnan().any() and not c.isnan().any()


# ---- 7. a temporal difference on a 3-D grid: the leading coordinate reaches -1 (reads zeros) and T (store dropped) --
@ts.kernel(grid=lambda X, BH, BW: (ts.cdiv(X.shape[1], BH), ts.cdiv(X.shape[2], BW), X.shape[0]))
def time_diff(X, Y, decay: float, *, BH: int = 8, BW: int = 16):
    """Y[t] = X[t] - decay * X[t - 1] (X[-1] = 0) over a (T, H, W) X; each program also stores into Y[t + T], which
    is past the end and must be dropped."""
    i, j, t = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x = ts.RegTile[ts.f32, BH, BW]()
    prev = ts.RegTile[ts.f32, BH, BW]()
    ts.load(x, X, at=(t, i, j))
    ts.load(prev, X, at=(t - 1, i, j))
    ts.mul(prev, prev, decay)
    ts.store(Y, x - prev, at=(t, i, j))
    ts.store(Y, x, at=(t + X.shape[0], i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "H", "W"), [(3, 8, 16), (4, 13, 21), (1, 5, 3), (0, 4, 4)])
@pytest.mark.parametrize("view", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
def test_time_diff_3d_grid_negative_leading_coordinate(backend, T, H, W, view, ydt, rng):
    base = randn(rng, T, W, H) if view == "transposed" else randn(rng, T, H, 2 * W)
    x = {"contiguous": base[:, :, :W].contiguous(), "transposed": base.transpose(1, 2),
         "strided": base[:, :, ::2]}[view]
    y = torch.full((T, H, W), math.nan, dtype=ydt)
    launch(time_diff, backend, x, y, 0.5)
    prev = torch.cat([torch.zeros(1, H, W, dtype=torch.float64), x.double()[:-1]]) if T else x.double()
    torch.testing.assert_close(y.double(), (x.double() - 0.5 * prev).to(ydt).double(),
                               rtol=1e-6 if ydt is torch.float32 else 8e-3, atol=1e-6)


# ---- 8. 1x1 tiles: one program per element, atomic adds of row sums, programs past the edges ------------------------
@ts.kernel(grid=lambda X: (X.shape[0] + 1, X.shape[1] + 2))
def per_element(X, Y, RowSum, Count, *, ONE: int = 1):
    """Y = 2 x + 1 element by element; RowSum[r] += x and Count[r] += 1 by atomic adds from every program of row r.
    The grid is one row and two columns larger than X: those programs read zeros and their writes are dropped."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, ONE, ONE]()
    s = ts.RegVec[ts.f32, ONE]()
    c = ts.RegVec[ts.i32, ONE]()
    inside = ts.RegVec[ts.bool_, ONE]()
    col = ts.RegVec[ts.i32, ONE]()
    ts.load(x, X, at=(i, j))
    ts.store(Y, x * 2.0 + 1.0, at=(i, j))
    ts.row_sum(s, x)
    ts.atomic_add(RowSum, s, at=(i,))
    ts.arange(col, j)
    ts.lt(inside, col, X.shape[1])
    ts.where(c, inside, 1, 0)
    ts.atomic_add(Count, c, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, F16])
@pytest.mark.parametrize("sdt", [torch.float32, F16, torch.float64])
@pytest.mark.parametrize(("M", "N"), [(3, 5), (1, 1), (0, 2)])
def test_one_by_one_tiles_and_atomic_adds(backend, dt, sdt, M, N, rng):
    x = ints(rng, -8, 9, (M, N), dt)                   # small integers: every sum exact in any order
    y = torch.full((M, N), math.nan, dtype=dt)
    rs_all, cnt_all = torch.zeros(M + 1, dtype=sdt), torch.full((M + 1,), 7, dtype=I64)
    launch(per_element, backend, x, y, rs_all[:M], cnt_all[:M])   # windows: the element past each must stay
    assert torch.equal(y, x * 2 + 1)
    assert torch.equal(rs_all, torch.cat([x.to(sdt).sum(1), torch.zeros(1, dtype=sdt)]))
    assert cnt_all.tolist() == [7 + N] * M + [7]


# ---- 9. nested loops whose inner bound is the outer counter: block prefix sums, tiles of three shapes carried ------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def block_prefix(X, P, Total, Nonzero, *, BM: int = 8, BN: int = 16):
    """P[:, k-th column block] = the sum of X's column blocks 0..k (an inclusive prefix over blocks, not columns);
    Total = each row's sum; Nonzero = each row's count of nonzero elements (i64)."""
    i = ts.block_id(0)
    nb = ts.cdiv(X.shape[1], BN)
    x = ts.RegTile[ts.f32, BM, BN]()                  # loads convert X's dtype
    acc = ts.RegTile[ts.f32, BM, BN]()
    total = ts.RegVec[ts.f32, BM]()
    nz = ts.RegVec[ts.i64, BM]()
    ne = ts.RegTile[ts.bool_, BM, BN]()
    ts.zero(total)
    ts.zero(nz)
    for k in ts.range(nb):
        ts.zero(acc)
        for j in ts.range(k + 1):                     # the inner bound is the outer counter
            ts.load(x, X, at=(i, j))
            ts.add(acc, acc, x)
        ts.store(P, acc, at=(i, k))
        ts.load(x, X, at=(i, k))
        ts.row_sum(total, x, total)
        ts.ne(ne, x, 0.0)
        ts.row_sum(nz, ne, nz)
    ts.store(Total, total, at=(i,))
    ts.store(Nonzero, nz, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N"), [(8, 48), (13, 37), (5, 0), (3, 16)])
def test_nested_loops_inner_bound_is_outer_counter(backend, dt, M, N, rng):
    BN = 16
    x = ints(rng, -3, 4, (M, N), dt)                   # small integers: block sums exact
    p, total = torch.full((M, N), math.nan, dtype=dt), torch.full((M,), math.nan)
    nz = torch.full((M,), POISON, dtype=I64)
    launch(block_prefix, backend, x, p, total, nz)
    nb = -(-N // BN)
    pad = torch.zeros(M, nb * BN, dtype=torch.float64)
    pad[:, :N] = x.double()
    blocks = pad.view(M, nb, BN).cumsum(1).view(M, nb * BN)[:, :N]
    assert torch.equal(p.double(), blocks) and torch.equal(total.double(), x.double().sum(1))
    assert torch.equal(nz, (x != 0).sum(1))


# ---- 10. nan_to_num with runtime replacements, into each float dtype ------------------------------------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def nan_to_num(X, Y, nan: float, posinf: float, neginf: float, *, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    y = ts.RegVec[Y.dtype, BN]()
    isnan = ts.RegVec[ts.bool_, BN]()
    pos = ts.RegVec[ts.bool_, BN]()
    neg = ts.RegVec[ts.bool_, BN]()
    ts.load(x, X, at=(i,))
    ts.copy(y, x)                                     # (past Y's range: infinite, then replaced)
    ts.ne(isnan, y, y)
    ts.eq(pos, y, math.inf)
    ts.eq(neg, y, -math.inf)
    ts.where(y, isnan, nan, y)
    ts.where(y, pos, posinf, y)
    ts.where(y, neg, neginf, y)
    ts.store(Y, y, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "ydt"), [(torch.float32, torch.float32), (F16, F16), (BF, BF), (torch.float32, F16),
                                          (torch.float64, BF)])
def test_nan_to_num(backend, xdt, ydt, rng):
    vals = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, -2.5, 65504.0, 1e-40, 3e38, -3e38]
    x = torch.cat([torch.tensor(vals, dtype=torch.float64), torch.from_numpy(rng.standard_normal(30) * 100)])
    x = x.to(xdt)
    big = torch.finfo(ydt).max
    y = torch.full((x.numel(),), 7.0, dtype=ydt)
    launch(nan_to_num, backend, x, y, 0.25, big, -big)
    want = torch.nan_to_num(x.to(ydt), nan=0.25, posinf=big, neginf=-big)
    assert torch.equal(y, want) and torch.equal(torch.signbit(y), torch.signbit(want))


# ---- 11. conversions between 16-bit floats, masks and wide integers, checked against torch's .to() ---------------
@ts.kernel(grid=lambda X: (1,))
def convert_chain(X, I, H, B, M, W, *, N: int = 32):
    """H = f16(X), B = bf16(H), M = f16(I) + (X != 0), W = i8(I) (the low byte)."""
    x = ts.RegVec[X.dtype, N]()
    i = ts.RegVec[ts.i64, N]()
    h = ts.RegVec[ts.f16, N]()
    b = ts.RegVec[ts.bf16, N]()
    m = ts.RegVec[ts.bool_, N]()
    w = ts.RegVec[ts.i8, N]()
    ts.load(x, X, at=(0,))
    ts.load(i, I, at=(0,))
    ts.copy(h, x)                                     # bf16 -> f16: past 65504 infinite, tiny ones subnormal
    ts.store(H, h, at=(0,))
    ts.copy(b, h)                                     # f16 -> bf16: 8 bits of mantissa
    ts.store(B, b, at=(0,))
    ts.copy(m, x)                                     # x != 0 (NaN is true)
    mh = ts.RegVec[ts.f16, N]()
    ts.copy(mh, m)                                    # a mask as 0.0 / 1.0
    ts.copy(h, i)                                     # i64 -> f16: past 65504 infinite
    ts.add(h, h, mh)
    ts.store(M, h, at=(0,))
    ts.copy(w, i)                                     # i64 -> i8: the low byte
    ts.store(W, w, at=(0,))


def test_conversions_between_16_bit_floats_masks_and_wide_ints():
    vals = [0.0, -0.0, 1e5, -1e5, 65504.0, 65520.0, 1e-6, -3e-8, 1e-9, math.nan, math.inf, 1.0 / 3.0, 2.0**-24,
            -(2.0**-25), 3.0e38, 0.5] * 2
    x = torch.tensor(vals, dtype=torch.float64).to(BF)
    iv = torch.tensor([0, 1, -1, 255, 256, -129, 70000, -70000, 2**40 + 3, -(2**63), 2**63 - 1, 2049, 4097, 65519,
                       65520, -5] * 2, dtype=I64)
    outs = []
    for backend in BACKENDS:
        h, b, m = (torch.full((32,), 7.0, dtype=dt) for dt in (F16, BF, F16))
        w = torch.full((32,), POISON, dtype=I8)
        launch(convert_chain, backend, x, iv, h, b, m, w)
        outs.append((h, b, m, w))
        want_h = x.to(F16)
        assert torch.equal(h.isnan(), want_h.isnan()) and torch.equal(h[~h.isnan()], want_h[~want_h.isnan()])
        assert torch.equal(torch.signbit(h[~h.isnan()]), torch.signbit(want_h[~want_h.isnan()]))   # -0.0, -3e-8
        want_b = want_h.to(BF)
        assert torch.equal(b.isnan(), want_b.isnan()) and torch.equal(b[~b.isnan()], want_b[~want_b.isnan()])
        want_m = iv.to(F16).float() + (x != 0).float()     # the f16 and the mask meet in f32, then f16
        assert torch.equal(m, want_m.to(F16))
        assert torch.equal(w, iv.to(I8))


# ---- 12. integer sums that wrap: row and column sums of i32 into i32 (wrapping) and i64 (exact), i8 into i8 -------
@ts.kernel(grid=lambda X: (1,))
def int_sums(X, R32, R64, C8, Mx, *, BM: int = 8, BN: int = 16):
    x = ts.RegTile[X.dtype, BM, BN]()
    r32 = ts.RegVec[ts.i32, BM]()
    r64 = ts.RegVec[ts.i64, BM]()
    x8 = ts.RegTile[ts.i8, BM, BN]()
    c8 = ts.RegVec[ts.i8, BN]()
    mx = ts.RegVec[ts.i64, BN]()
    ts.load(x, X, at=(0, 0))
    ts.row_sum(r32, x)                                # i32 work: wraps
    ts.row_sum(r64, x)                                # an i64 result: i64 work, exact
    ts.copy(x8, x)                                    # the low bytes
    ts.col_sum(c8, x8)                                # i32 work, then the low byte
    ts.lower_fill(x, x, X.shape[0], -(2**31))          # padding out of the maximum
    ts.col_max(mx, x)
    ts.store(R32, r32, at=(0,))
    ts.store(R64, r64, at=(0,))
    ts.store(C8, c8, at=(0,))
    ts.store(Mx, mx, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 16), (5, 11)])
def test_integer_sums_wrap_in_their_work_dtype(backend, M, N, rng):
    x = ints(rng, -(2**31), 2**31, (M, N), I32)
    x[0] = 2**31 - 1                                   # a row whose sum passes 2**31 many times over
    x[1, :3] = torch.tensor([-(2**31), -(2**31), -1], dtype=I32)
    r32, r64 = torch.full((M,), POISON, dtype=I32), torch.full((M,), POISON, dtype=I64)
    c8, mx = torch.full((N,), POISON, dtype=I8), torch.full((N,), POISON, dtype=I64)
    launch(int_sums, backend, x, r32, r64, c8, mx)
    exact = x.long().sum(1)
    assert r64.tolist() == exact.tolist()
    assert r32.tolist() == [wrap(v, 32) for v in exact.tolist()]
    assert c8.tolist() == [wrap(v, 8) for v in x.long().to(I8).long().sum(0).tolist()]
    assert torch.equal(mx, x.long().max(0).values)


# ---- 12a. an int argument chosen into integer tiles of each width: wrapped to the tile's dtype, as a C cast ----------
@ts.kernel(grid=lambda L, BN: (ts.cdiv(L.shape[0], BN),))
def relabel(L, Y, fill: int, *, BN: int = 16):
    """Y = ((L < 0 ? fill : L) >> 1) + 1 in L's dtype (the chosen value wrapped to it before the shift)."""
    i = ts.block_id(0)
    lab = ts.RegVec[L.dtype, BN]()
    neg = ts.RegVec[ts.bool_, BN]()
    ts.load(lab, L, at=(i,))
    ts.lt(neg, lab, 0)
    ts.where(lab, neg, fill, lab)
    ts.store(Y, (lab >> 1) + 1, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [I8, I32, I64])
@pytest.mark.parametrize("fill", [-100, 300, 2**31, -(2**33) - 7, 2**40 + 5])
def test_where_of_an_int_argument_wraps_to_the_tile(backend, dt, fill, rng):
    lab = ints(rng, -3, 100, (37,), dt)
    lab[:4] = torch.tensor([-1, 0, -3, 99])
    y = torch.full((37,), POISON, dtype=dt)
    launch(relabel, backend, lab, y, fill)
    bits = 8 * lab.element_size()
    want = [wrap((wrap(fill, bits) if v < 0 else v) >> 1, bits) + 1 for v in lab.tolist()]
    assert y.tolist() == [wrap(v, bits) for v in want]


# ---- 12b. integers chosen into float tiles (a size, an int argument, int constants), then float math on them -------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def int_choices_as_floats(X, Y, Z, n: int, *, BN: int = 16):
    """Y = log(x > 0 ? n : len(X)) in Y's float dtype; Z = sqrt(x > 0 ? 3 : -2) (NaN where negative)."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    pos = ts.RegVec[ts.bool_, BN]()
    y = ts.RegVec[Y.dtype, BN]()
    z = ts.RegVec[Z.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.gt(pos, x, 0.0)
    ts.where(y, pos, n, X.shape[0])
    ts.log(y, y)
    ts.store(Y, y, at=(i,))
    ts.where(z, pos, 3, -2)
    ts.sqrt(z, z)
    ts.store(Z, z, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF, F16, torch.float64])
@pytest.mark.parametrize("n", [1000, 2**24 + 3])
def test_ints_chosen_into_float_tiles(backend, dt, n, rng):
    x = randn(rng, 37)
    y, z = torch.full((37,), 7.0, dtype=dt), torch.full((37,), 7.0, dtype=dt)
    launch(int_choices_as_floats, backend, x, y, z, n)
    nf = torch.tensor(float(n), dtype=torch.float64 if dt is torch.float64 else torch.float32).double()
    want = torch.where(x > 0, nf, 37.0).to(dt).double().log().to(dt)      # (2**24 + 3 in an f16 tile: inf)
    torch.testing.assert_close(y, want, rtol=1e-6 if dt in (torch.float32, torch.float64) else 1e-2, atol=0)
    assert torch.equal(z.isnan(), x <= 0) and torch.equal(z[x > 0], torch.full_like(z[x > 0], 3.0).sqrt())


# ---- 12c. fp8 (e4m3) tiles made without a conversion: fills, masks and aranges saturate to +-448 --------------------
@ts.kernel(grid=lambda X: (1,))
def f8_tiles(X, Causal, Big, Pos, Sel, *, R: int = 8, C: int = 16):
    """Causal = tril(x, 0, -inf), Big = 1000 everywhere, Pos[r, c] = x[r, c] + (c - 8), Sel = x > 0.5 ? x : -1000,
    all f8e4m3 tiles (no infinities: -inf and +-1000 become -448 and 448)."""
    x = ts.RegTile[ts.f8e4m3, R, C]()
    y = ts.RegTile[ts.f8e4m3, R, C]()
    pos = ts.RegVec[ts.f8e4m3, C]()
    m = ts.RegTile[ts.bool_, R, C]()
    ts.load(x, X, at=(0, 0))
    ts.tril(y, x, 0, -math.inf)
    ts.store(Causal, y, at=(0, 0))
    ts.fill(y, 1000.0)
    ts.store(Big, y, at=(0, 0))
    ts.arange(pos, -8)
    ts.add_col(y, x, pos)
    ts.store(Pos, y, at=(0, 0))
    ts.gt(m, x, 0.5)
    ts.where(y, m, x, -1000.0)
    ts.store(Sel, y, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_f8_tiles_made_without_a_conversion_saturate(backend, rng):
    F8 = torch.float8_e4m3fn
    x = (randn(rng, 8, 16) * 20).to(F8)
    outs = [torch.full((8, 16), 7.0).to(F8) for _ in range(4)]
    launch(f8_tiles, backend, x, *outs)
    xf = x.float()
    causal = torch.where(torch.ones(8, 16, dtype=torch.bool).tril(), xf, -math.inf)
    want = [causal, torch.full((8, 16), 1000.0), xf + (torch.arange(16) - 8.0), torch.where(xf > 0.5, xf, -1000.0)]
    for got, w in zip(outs, want, strict=True):
        assert torch.equal(got.float(), w.to(F8).float())


# ---- 12d. the work dtype of ops with an f64 result or integer operands: f64 only where an f64 tile is --------------
@ts.kernel(grid=lambda X: (1,))
def work_dtypes(X, H, I, Sel, Add, Sum, a: float, *, N: int = 8):
    """Sel = [x > 0 ? 0.1 : 0.2, x > 0 ? h : a] into f64 (f64 work: 0.1 and a as they are, h exact); Add = x + a
    computed in f32 (x is f32) into f64; Sum = the row sums of an i64 tile with an f32 accumulator (each integer an
    f32 first, as float work takes integer operands)."""
    x = ts.RegVec[ts.f32, N]()
    h = ts.RegVec[ts.f16, N]()
    y = ts.RegVec[ts.f64, N]()
    pos = ts.RegVec[ts.bool_, N]()
    ts.load(x, X, at=(0,))
    ts.load(h, H, at=(0,))
    ts.gt(pos, x, 0.0)
    ts.where(y, pos, 0.1, 0.2)
    ts.store(Sel, y, at=(0,))
    ts.where(y, pos, h, a)
    ts.store(Sel, y, at=(1,))
    ts.add(y, x, a)
    ts.store(Add, y, at=(0,))
    big = ts.RegTile[ts.i64, 2, N]()
    acc = ts.RegVec[ts.f32, 2]()
    s = ts.RegVec[ts.f32, 2]()
    ts.load(big, I, at=(0, 0))
    ts.zero(acc)
    ts.row_sum(s, big, acc)
    ts.store(Sum, s, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_work_dtypes_of_f64_results_and_integer_operands(backend):
    x = torch.tensor([1.0, -1.0, 2.0**24, -3.0, 0.5, -0.5, 2.0**24, 7.0])
    h = torch.tensor([0.1, 2.0, 3.0, 4.0, 1e-4, 6.0, 7.0, 8.0], dtype=F16)
    a = 1.0000000001                                    # f32(a) is 1.0: 2**24 + a is 2**24 + 2 in f64, 2**24 in f32
    big = torch.zeros(2, 8, dtype=I64)
    big[0, :2] = torch.tensor([2**40 + 2**16, -(2**40)])           # 65536 exactly; 0 once each is an f32
    big[1, :3] = torch.tensor([2, 2**24 + 1, -(2**24)])             # 3 exactly; 2 in f32, in any order
    sel, add = torch.full((16,), math.nan, dtype=torch.float64), torch.full((8,), math.nan, dtype=torch.float64)
    total = torch.full((2,), math.nan)
    launch(work_dtypes, backend, x, h, big, sel, add, total, a)
    assert sel[:8].tolist() == [0.1 if v > 0 else 0.2 for v in x.tolist()]
    assert torch.equal(sel[8:], torch.where(x > 0, h.double(), a))
    assert torch.equal(add, (x + torch.tensor(a, dtype=torch.float32)).double())
    assert total.tolist() == [0.0, 2.0]


# ---- 13. Python's operators misused on tiles: refused when traced, naming the tile and the op to use ---------------
def _x(X):
    x = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(0,))
    return x


def _m(X):
    m = ts.RegVec[ts.bool_, 16]()
    ts.gt(m, _x(X), 0.0)
    return m


def _branch_on_tile(X):
    x = _x(X)
    if x:
        ts.store(X, x, at=(0,))


def _where_on_python_equality(X):
    x = _x(X)
    ts.where(x, x == 0.0, 1.0, x)


MISUSE = {   # name -> (body(X), error, message)
    "if_on_a_tile": (_branch_on_tile, TraceError, r"`bool\(\)` on a tile: .* Python `if`/`while`/`and`/`or` cannot"),
    "while_and_or": (lambda X: _x(X) and _x(X), TraceError, r"`bool\(\)` on a tile"),
    "python_comparison": (lambda X: _x(X) > 0, TraceError, r"`>` on a tile: .* ts.gt\(mask, a, b\)"),
    "reflected_comparison": (lambda X: 0.5 <= _x(X), TraceError, r"`>=` on a tile: .* ts.ge\(mask, a, b\)"),
    "python_equality_as_mask": (_where_on_python_equality, TraceError, r"`==` on a tile: .* ts.eq\(mask, a, b\)"),
    "python_bool_as_mask": (lambda X: ts.where(_x(X), True, 1.0, 0.0), TraceError,
                            r"where: mask must be a bool_ mask tile, got bool True; Python's == .* ts.eq"),
    "size_compared_in_python": (lambda X: 1 if X.shape[0] == 16 else 2, TraceError, r"`==` on a Scalar in `.*`"),
    "tile_type_not_called": (lambda X: ts.zero(ts.RegVec[ts.f32, 16]), TraceError,
                             r"fill: dst must be a tile .* declare the tile by calling it, RegVec\[f32, 16\]\(\)"),
    "invert_a_float_tile": (lambda X: ~_x(X), TraceError, r"`~` on a tile: .* f32; ~ is the logical not of a bool_"),
    "arithmetic_on_a_mask": (lambda X: _m(X) + 1, TileDTypeError, r"`\+` on `.*`, a bool_ mask: masks combine with &"),
    "mask_xor": (lambda X: _m(X) ^ _m(X), TileDTypeError, r"`\^` on `.*`, a bool_ mask"),
    "mask_and_a_number": (lambda X: _m(X) & 1, TraceError, r"logical_and: b must be a bool_ mask tile, got int 1"),
    "compare_two_scalars": (lambda X: ts.lt(ts.RegVec[ts.bool_, 4](), X.shape[0], 3), TraceError,
                            r"lt: compares tiles or vectors; a and b are both scalars"),
    "per_row_of_the_wrong_length": (lambda X: ts.where(ts.RegTile[ts.f32, 4, 16](), ts.per_row(_m(X)), 1.0, 0.0),
                                    TileShapeError, r"where: mask per_row\(`.*`\) has 16 elements but dst .* 4 rows"),
}


@pytest.mark.parametrize("name", MISUSE)
def test_python_operators_misused_on_tiles_are_refused_when_traced(name):
    body, err, msg = MISUSE[name]
    k = ts.kernel(body, grid=lambda X: (1,))
    with pytest.raises(err, match=msg):
        k.trace(ts.ArgSpec(ts.f32, 1))


@ts.kernel(grid=lambda X: (1,))
def mask_operators(X, Y, *, N: int = np.int64(16)):
    """Operators that do work on masks and integer tiles: & | ~, and a NumPy integer as a tile size."""
    x = ts.RegVec[ts.f32, N]()
    pos = ts.RegVec[ts.bool_, N]()
    big = ts.RegVec[ts.bool_, N]()
    k = ts.RegVec[ts.i32, N]()
    y = ts.RegVec[ts.i32, N]()
    ts.load(x, X, at=(0,))
    ts.gt(pos, x, 0.0)
    ts.gt(big, x, 1.0)
    ts.arange(k, -8)
    ts.where(y, (pos & ~big) | (~pos & big), ~k, k)      # (pos xor big: never true, big implies pos)
    ts.where(y, ~pos | big, y, (y << 4) | 3)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_integer_operators(backend, rng):
    x = randn(rng, 16) * 2
    y = torch.full((16,), POISON, dtype=I32)
    launch(mask_operators, backend, x, y)
    k = torch.arange(-8, 8, dtype=I32)
    pos, big = x > 0, x > 1
    y1 = torch.where(pos ^ big, ~k, k)
    assert torch.equal(y, torch.where(~pos | big, y1, (y1 << 4) | 3))


# ---- 13a. grids that cannot be launched: a negative program count (any backend), CUDA's 65535 on axes 1 and 2 -------
def _windows_grid(X, BN, CLAMP):
    n = (X.shape[0] - 20) // BN + 1                   # negative for fewer than 12 elements
    return (ts.smax(0, n) if CLAMP else n,)


@ts.kernel(grid=_windows_grid)
def windows_past_20(X, Y, *, BN: int = 8, CLAMP: bool = False):
    """Copies X's windows of BN from window 2 on, one program per window for (len(X) - 20) // BN + 1 of them."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(i + 20 // BN,))
    ts.store(Y, x, at=(i + 20 // BN,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_grid_is_refused_naming_it_and_smax_clamps_it(backend):
    x, y = torch.arange(4.0), torch.full((4,), 7.0)
    with pytest.raises(LaunchError, match=r"windows_past_20: the grid is \(-1,\) .* none may be negative .* ts.smax"):
        launch(windows_past_20, backend, x, y)
    launch(windows_past_20, backend, x, y, CLAMP=True)
    assert torch.equal(y, torch.full((4,), 7.0))
    x, y = torch.arange(40.0), torch.zeros(40)
    launch(windows_past_20, backend, x, y, CLAMP=True)
    assert torch.equal(y[16:], x[16:]) and not y[:16].any()


def test_cuda_grid_limits_are_named():
    from tilestack.backends.base import check_cuda_grid
    check_cuda_grid("k", (2**31 - 1, 65535, 65535))
    with pytest.raises(LaunchError, match=r"k: grid axis 1 has 65536 programs; .* at most 65535 on axis 1 .* axis 0"):
        check_cuda_grid("k", (4, 65536, 1))


# ---- 14. every kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ----
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "flat_positions": (flat_positions, (meta(65536, 65537), meta(2, 16, dtype=I64), meta(16), 65535), {}),
    "band_mask": (band_mask, (meta(4096, 4096), meta(4096, dtype=I32), meta(4096, dtype=I8),
                              meta(4096, 4096, dtype=BF), -3, 5), dict(BM=64, BN=64)),
    "scalar_chain": (scalar_chain, (meta(64), meta(48), 0.5), {}),
    "xorshift64": (xorshift64, (meta(4096, dtype=I64), meta(4096, dtype=I64), meta(4096, dtype=I32)),
                   dict(STEPS=8, BN=256)),
    "floor_divmod_i32": (floor_divmod, (meta(1024, 64, dtype=I32), meta(64, dtype=I32), meta(1024, 64, dtype=I32),
                                        meta(1024, 64, dtype=I32)), dict(BM=32, BN=64)),
    "floor_divmod_i8": (floor_divmod, (meta(1024, 64, dtype=I8), meta(64, dtype=I8), meta(1024, 64, dtype=I8),
                                       meta(1024, 64, dtype=I8)), dict(BM=32, BN=64)),
    "scale_and_center": (scale_and_center, (meta(100, 60, dtype=BF), meta(100, 60, dtype=BF),
                                            meta(100, 60, dtype=BF)), dict(BM=128, BN=64, num_warps=8)),
    # (8 warps: 60-element rows of bf16 take no TMA descriptor, and the pointer variant a launch runs spills 14
    # registers at 4 warps; tune.aot compiled the TMA variant whatever the arguments until e54dce9)
    "time_diff": (time_diff, (meta(8, 512, 512), meta(8, 512, 512, dtype=BF), 0.9), dict(BH=32, BW=64)),
    "block_prefix": (block_prefix, (meta(1024, 1024, dtype=BF), meta(1024, 1024, dtype=BF), meta(1024),
                                    meta(1024, dtype=I64)), dict(BM=32, BN=64)),
    "nan_to_num": (nan_to_num, (meta(4096, dtype=BF), meta(4096, dtype=F16), 0.0, 65504.0, -65504.0),
                   dict(BN=256)),
    "convert_chain": (convert_chain, (meta(32, dtype=BF), meta(32, dtype=I64), meta(32, dtype=F16),
                                      meta(32, dtype=BF), meta(32, dtype=F16), meta(32, dtype=I8)), {}),
    "int_sums": (int_sums, (meta(8, 16, dtype=I32), meta(8, dtype=I32), meta(8, dtype=I64), meta(16, dtype=I8),
                            meta(16, dtype=I64)), {}),
    "mask_operators": (mask_operators, (meta(16), meta(16, dtype=I32)), {}),
    "relabel_i8": (relabel, (meta(4096, dtype=I8), meta(4096, dtype=I8), 300), dict(BN=256)),
    "f8_tiles": (f8_tiles, (meta(8, 16, dtype=torch.float8_e4m3fn),) * 5, {}),
    "work_dtypes": (work_dtypes, (meta(8), meta(8, dtype=F16), meta(2, 8, dtype=I64), meta(16, dtype=torch.float64),
                                  meta(8, dtype=torch.float64), meta(2), 0.5), {}),
    "int_choices_as_floats": (int_choices_as_floats, (meta(4096), meta(4096, dtype=BF), meta(4096, dtype=F16), 7),
                              dict(BN=256)),
}
TRITON_ONLY = {   # 1x1 tiles: Gluon's layouts take tiles of at least a warp's 32 elements
    "per_element": (per_element, (meta(64, 64, dtype=F16), meta(64, 64, dtype=F16), meta(64, dtype=F16),
                                  meta(64, dtype=I64)), {}),
}


@pytest.mark.parametrize("name", [*AOT_CASES, *TRITON_ONLY])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **TRITON_ONLY}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
