"""More kernels a user of the tile language would write, beyond test_heldout_kernels.py, run as a user would run
them: on the reference executor and Triton's interpreter against float64 / exact-integer NumPy or torch, outputs
poisoned first (NaN, or an integer no result can be), then compiled for Hopper (sm_90a) on this CPU by the Triton
and Gluon backends.

Integer work first (a 32-bit hash that must wrap, 64-bit products past 2**53, division and remainder of negatives
as C truncates them, shifts and bit operations), then a dropout mask from that hash, a column prefix sum carried
over row blocks, a per-row top-k with ties, an integer histogram by atomic adds, strided and transposed views in
and out, a 3-D grid over a batch, ragged stores at every edge of an output that is a window of a larger buffer,
f16 in / f32 accumulate / bf16 out, reductions over rows that masking leaves empty, runtime scalars of each kind,
and what the language cannot express, refused when traced with a message that names it.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, I32, I64, ints, launch, meta, randn, wrap
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import LaunchError, TileDTypeError, TraceError

POISON = -12345          # no integer result below can be this
M32 = 0xFFFFFFFF


def as_i32(u: np.ndarray) -> np.ndarray:
    """uint32 (or wider unsigned) bits as the int32 of the same bits."""
    return (np.asarray(u, dtype=np.uint64) & M32).astype(np.uint32).view(np.int32)


# ---- 0. every integer op swept: each dtype, a tile or a constant operand, against exact Python integers -------------
INT_FNS = ("add", "sub", "mul", "div", "rem", "max", "min", "bit_and", "bit_or", "bit_xor", "shl", "shr")
INT_DTYPES = {"i8": (torch.int8, ts.i8), "i32": (torch.int32, ts.i32), "i64": (torch.int64, ts.i64)}


@ts.kernel(grid=lambda X: (1,))
def int_binary(X, Y, Out, *, FN: str, CONST: int | None, R: int = 4, C: int = 16):
    x = ts.RegTile[X.dtype, R, C]()
    y = ts.RegTile[Y.dtype, R, C]()
    ts.load(x, X, at=(0, 0))
    ts.load(y, Y, at=(0, 0))
    getattr(ts, FN)(x, x, y if CONST is None else CONST)
    ts.store(Out, x, at=(0, 0))


@ts.kernel(grid=lambda X: (1,))
def int_unary(X, Out, *, FN: str, N: int = 64):
    x = ts.RegVec[X.dtype, N]()
    ts.load(x, X, at=(0,))
    getattr(ts, FN)(x, x)
    ts.store(Out, x, at=(0,))


def _c_int(fn: str, a: int, b: int) -> int:
    """fn(a, b) on exact integers, C's way (division truncates; shr is arithmetic)."""
    if fn in ("div", "rem"):
        q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)
        return q if fn == "div" else a - q * b
    ops = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "max": lambda: max(a, b),
           "min": lambda: min(a, b), "bit_and": lambda: a & b, "bit_or": lambda: a | b, "bit_xor": lambda: a ^ b,
           "shl": lambda: a << b, "shr": lambda: a >> b}
    return ops[fn]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", INT_DTYPES)
@pytest.mark.parametrize("fn", INT_FNS)
@pytest.mark.parametrize("const", [False, True])
def test_integer_ops_swept(backend, dt, fn, const, rng):
    tdt, tsdt = INT_DTYPES[dt]
    bits, work = 8 * tdt.itemsize, 64 if tdt is torch.int64 else 32      # i8 works in i32, as C promotes it
    info = torch.iinfo(tdt)
    x = ints(rng, info.min + 1, info.max + 1, (4, 16), tdt)
    if fn in ("shl", "shr"):
        y = ints(rng, 0, work, (4, 16), tdt)                             # counts within the work dtype's width
    elif fn in ("div", "rem"):
        y = ints(rng, 1, min(info.max, 2**20), (4, 16), tdt) * torch.from_numpy(rng.choice([-1, 1], (4, 16))).to(tdt)
    else:
        y = ints(rng, info.min, info.max + 1, (4, 16), tdt)
    k = int(y[0, 0]) if const else None
    out = torch.full((4, 16), 7, dtype=tdt)
    launch(int_binary, backend, x, y, out, FN=fn, CONST=k)
    ys = [[k] * 16] * 4 if const else y.tolist()
    want = [[wrap(wrap(_c_int(fn, a, b), work), bits) for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(x.tolist(), ys, strict=True)]
    assert out.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", INT_DTYPES)
@pytest.mark.parametrize("fn", ["abs", "neg", "relu"])
def test_integer_unary_ops_swept(backend, dt, fn, rng):
    tdt, _ = INT_DTYPES[dt]
    info = torch.iinfo(tdt)
    x = ints(rng, info.min, info.max + 1, 64, tdt)
    x[:3] = torch.tensor([info.min, -1, 0], dtype=tdt)          # abs and neg of the minimum wrap to it
    out = torch.full((64,), 7, dtype=tdt)
    launch(int_unary, backend, x, out, FN=fn)
    bits = 8 * tdt.itemsize
    f = {"abs": abs, "neg": lambda v: -v, "relu": lambda v: max(v, 0)}[fn]
    assert out.tolist() == [wrap(f(v), bits) for v in x.tolist()]


# ---- 1. a 32-bit integer hash (murmur3's finalizer) on i32 tiles: products wrap, logical shifts by masking ---------
FMIX1, FMIX2 = 0x85EBCA6B, 0xC2B2AE35     # constants past 2**31: the i32 of the same bits


def _lsr(h, s: int) -> None:
    """h ^= h >>> s (a logical shift of an i32: the arithmetic one, its sign bits masked off)."""
    t = ts.RegTile[h.dtype, *h.shape]()
    ts.shr(t, h, s)
    ts.bit_and(t, t, (1 << (32 - s)) - 1)
    ts.bit_xor(h, h, t)


def fmix32(h) -> None:
    _lsr(h, 16)
    ts.mul(h, h, FMIX1)
    _lsr(h, 13)
    ts.mul(h, h, FMIX2)
    _lsr(h, 16)


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def hash_i32(X, H, seed: int, *, BM: int = 8, BN: int = 16):
    """H = fmix32(X ^ seed) on 32-bit words."""
    i, j = ts.block_id(0), ts.block_id(1)
    h = ts.RegTile[ts.i32, BM, BN]()
    ts.load(h, X, at=(i, j))
    ts.bit_xor(h, h, seed)
    fmix32(h)
    ts.store(H, h, at=(i, j))


def fmix32_np(x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, dtype=np.int64).astype(np.uint64) & M32
    h ^= h >> 16
    h = (h * FMIX1) & M32
    h ^= h >> 13
    h = (h * FMIX2) & M32
    h ^= h >> 16
    return as_i32(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "seed"), [(8, 16, 0), (19, 37, 0x9E3779B9), (5, 3, -7)])
def test_hash_i32_wraps_as_uint32_math(backend, M, N, seed, rng):
    x = ints(rng, -2**31, 2**31, (M, N), torch.int32)
    h = torch.full((M, N), POISON, dtype=torch.int32)
    launch(hash_i32, backend, x, h, seed)
    want = fmix32_np(x.numpy().astype(np.int64) ^ seed)     # the seed's low 32 bits, as the i32 work takes it
    assert np.array_equal(h.numpy(), want)


# ---- 2. 64-bit integer products, sums and shifts past 2**53 (where a float64 reference would round) ----------------
@ts.kernel(grid=lambda A: (1,))
def int64_math(A, B, Prod, RowSum, Mixed, *, R: int = 4, C: int = 16):
    a = ts.RegTile[ts.i64, R, C]()
    b = ts.RegTile[ts.i64, R, C]()
    p = ts.RegTile[ts.i64, R, C]()
    s = ts.RegVec[ts.i64, R]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.mul(p, a, b)                       # wraps mod 2**64
    ts.store(Prod, p, at=(0, 0))
    ts.row_sum(s, p)
    ts.store(RowSum, s, at=(0,))
    m = (a << 3) ^ (b >> 5) | (a & 0xFF)
    ts.add(m, m, -(2**62))
    ts.store(Mixed, m, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_products_wrap_exactly(backend, rng):
    R, C = 4, 16
    a = ints(rng, -2**62, 2**62, (R, C), torch.int64)
    b = ints(rng, -2**40, 2**40, (R, C), torch.int64)
    a[0, :4] = torch.tensor([2**53 + 1, -(2**53) - 3, 2**63 - 1, -(2**63)])
    prod, mixed = (torch.full((R, C), POISON, dtype=torch.int64) for _ in range(2))
    rsum = torch.full((R,), POISON, dtype=torch.int64)
    launch(int64_math, backend, a, b, prod, rsum, mixed)
    A, B = a.tolist(), b.tolist()
    want_p = [[wrap(x * y, 64) for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(A, B, strict=True)]
    assert prod.tolist() == want_p
    assert rsum.tolist() == [wrap(sum(r), 64) for r in want_p]
    want_m = [[wrap((wrap(x << 3, 64) ^ (y >> 5) | (x & 0xFF)) - 2**62, 64) for x, y in zip(ra, rb, strict=True)]
              for ra, rb in zip(A, B, strict=True)]
    assert mixed.tolist() == want_m


# ---- 3. integer division and remainder of negatives truncate toward zero (C, Triton), not floor (Python) -----------
@ts.kernel(grid=lambda A: (1,))
def int_divmod(A, B, Q, R, QS, RS, *, DIVISOR: int, N: int = 64):
    a = ts.RegVec[A.dtype, N]()
    b = ts.RegVec[B.dtype, N]()
    q = ts.RegVec[Q.dtype, N]()
    r = ts.RegVec[R.dtype, N]()
    ts.load(a, A, at=(0,))
    ts.load(b, B, at=(0,))
    ts.div(q, a, b)
    ts.rem(r, a, b)
    ts.store(Q, q, at=(0,))
    ts.store(R, r, at=(0,))
    ts.div(q, a, DIVISOR)
    ts.rem(r, a, DIVISOR)
    ts.store(QS, q, at=(0,))
    ts.store(RS, r, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.int32, torch.int64, torch.int8])
@pytest.mark.parametrize("divisor", [7, -3])
def test_int_div_rem_truncate_toward_zero(backend, dt, divisor, rng):
    N = 64
    info = torch.iinfo(dt)
    a = ints(rng, info.min + 1, info.max, N, dt)
    a[:8] = torch.tensor([-7, 7, -1, 0, -6, 6, info.max, info.min + 1], dtype=dt)
    b = ints(rng, 1, 20, N, dt) * torch.from_numpy(rng.choice([-1, 1], N)).to(dt)
    b[:8] = torch.tensor([2, -2, 3, -5, -3, 4, -1, 1], dtype=dt)
    q, r, qs, rs = (torch.full((N,), -99, dtype=dt) for _ in range(4))
    launch(int_divmod, backend, a, b, q, r, qs, rs, DIVISOR=divisor)
    al, bl = a.long(), b.long()
    assert torch.equal(q.long(), torch.div(al, bl, rounding_mode="trunc"))
    assert torch.equal(r.long(), torch.fmod(al, bl))
    assert torch.equal(qs.long(), torch.div(al, divisor, rounding_mode="trunc"))
    assert torch.equal(rs.long(), torch.fmod(al, divisor))
    assert torch.equal(q.long() * bl + r.long(), al)               # the pair is a division


# ---- 3b. integer operator sugar (C's precedence is Python's here), a number divided by a tile, adds into globals ---
@ts.kernel(grid=lambda X: (1,))
def int_sugar(X, Y, Acc, *, N: int = 16):
    x = ts.RegVec[X.dtype, N]()
    ts.load(x, X, at=(0,))
    y = (x * 3 + 7 - x) ^ (x >> 2) & 0xFF | (x << 1)
    ts.store(Y, y + (1000 / x) - (2 - x), at=(0,))
    f = ts.RegVec[ts.f32, N]()
    ts.copy(f, x)
    ts.mul(f, f, -0.75)
    ts.atomic_add(Acc, f, at=(0,))        # f32 into an integer global: truncated first, then added


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.int32, torch.int64])
def test_int_operator_sugar_and_adds_into_integer_globals(backend, dt, rng):
    x = ints(rng, -1000, 1000, 16, dt)
    x[x == 0] = 9
    y = torch.full((16,), POISON, dtype=dt)
    acc = torch.full((16,), 5, dtype=dt)
    launch(int_sugar, backend, x, y, acc)
    xl = x.long()
    want = ((xl * 3 + 7 - xl) ^ ((xl >> 2) & 0xFF)) | (xl << 1)
    assert torch.equal(y.long(), want + torch.div(1000, xl, rounding_mode="trunc") - (2 - xl))
    assert torch.equal(acc.long(), 5 + (x.float() * -0.75).trunc().long())


# ---- 4. a dropout mask from the hash of each element's position, fused with a scale --------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def hash_dropout(X, Y, seed: int, keep_below: int, scale: float, *, BM: int = 16, BN: int = 16):
    """y = x * scale where fmix32(flat index ^ seed) & 0xFFFF < keep_below, else 0."""
    i, j = ts.block_id(0), ts.block_id(1)
    rows = ts.RegVec[ts.i32, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    h = ts.RegTile[ts.i32, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.arange(rows, i * BM)
    ts.arange(cols, j * BN)
    ts.zero(h)
    ts.add_row(h, h, rows)
    ts.mul(h, h, X.shape[1])
    ts.add_col(h, h, cols)                 # the element's flat index
    ts.bit_xor(h, h, seed)
    fmix32(h)
    ts.bit_and(h, h, 0xFFFF)
    ts.lt(keep, h, keep_below)
    ts.load(x, X, at=(i, j))
    ts.where(x, keep, x * scale, 0.0)
    ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (37, 29)])
def test_hash_dropout(backend, M, N, rng):
    p = 0.3
    keep_below, seed = int((1 - p) * 65536), int(rng.integers(0, 2**31))
    x = randn(rng, M, N)
    y = torch.full((M, N), math.nan)
    launch(hash_dropout, backend, x, y, seed, keep_below, 1 / (1 - p))
    flat = np.arange(M * N, dtype=np.int64).reshape(M, N)
    keep = (fmix32_np(flat ^ seed).astype(np.int64) & 0xFFFF) < keep_below
    want = np.where(keep, x.double().numpy() * np.float32(1 / (1 - p)), 0.0)
    torch.testing.assert_close(y.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    assert 0.5 < keep.mean() < 0.9


# ---- 5. prefix sum down the columns (each column's cumsum), carried across row blocks ------------------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def col_cumsum(X, Y, *, BM: int = 16, BN: int = 16):
    j = ts.block_id(0)
    k = ts.RegVec[ts.i32, BM]()
    lower = ts.RegTile[ts.bool_, BM, BM]()
    ones = ts.RegTile[ts.f32, BM, BM]()
    x = ts.RegTile[ts.f32, BM, BN]()
    xs = ts.SharedTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    carry = ts.RegVec[ts.f32, BN]()
    ts.arange(k)
    ts.ge(lower, ts.per_row(k), ts.per_col(k))         # L[r, c] = 1 where c <= r
    ts.where(ones, lower, 1.0, 0.0)
    ts.zero(carry)
    for i in ts.range(ts.cdiv(X.shape[0], BM)):
        ts.load(x, X, at=(i, j))
        ts.copy(xs, x)
        ts.zero(y)
        ts.mma_AB(y, ones, xs, y)                     # y[r, c] = sum of x[:r + 1, c]
        ts.add_col(y, y, carry)
        ts.col_sum(carry, x, carry)
        ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (53, 21), (1, 5)])
def test_col_cumsum(backend, M, N, rng):
    x = randn(rng, M, N)
    y = torch.full((M, N), math.nan)
    launch(col_cumsum, backend, x, y)
    torch.testing.assert_close(y.double(), x.double().cumsum(0), rtol=1e-4, atol=1e-4)


# ---- 6. top-k per row (k rounds of max, first index of it, mask it out), ragged widths, ties -----------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_topk(X, Vals, Idx, *, K: int, BM: int = 8, BN: int = 32):
    """Vals[r, t], Idx[r, t]: the t-th largest of row r and its first column (ties: the lower column first)."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    idx = ts.RegTile[ts.i32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.i32, BM]()
    vals = ts.RegTile[ts.f32, BM, K]()
    where = ts.RegTile[ts.i32, BM, K]()
    slot = ts.RegVec[ts.i32, K]()
    at_slot = ts.RegTile[ts.bool_, BM, K]()
    ts.load(x, X, at=(i, 0))
    ts.right_fill(x, x, n, -math.inf)
    ts.arange(cols)
    ts.arange(slot)
    ts.zero(vals)
    ts.zero(where)
    for t in range(K):                                  # unrolled when traced
        ts.row_max(m, x)
        ts.eq(hit, x, ts.per_row(m))
        ts.where(idx, hit, ts.per_col(cols), BN)
        ts.row_min(best, idx)
        ts.eq(at_slot, ts.per_col(slot), t)
        ts.where(vals, at_slot, ts.per_row(m), vals)
        ts.where(where, at_slot, ts.per_row(best), where)
        ts.eq(hit, ts.per_col(cols), ts.per_row(best))
        ts.where(x, hit, -math.inf, x)                  # that one is taken
    ts.store(Vals, vals, at=(i, 0))
    ts.store(Idx, where, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 32), (11, 19)])
def test_row_topk_with_ties(backend, M, N, rng):
    K = 4
    x = torch.from_numpy(rng.integers(0, 6, (M, N)).astype(np.float32))   # many ties
    vals = torch.full((M, K), math.nan)
    idx = torch.full((M, K), POISON, dtype=torch.int64)
    launch(row_topk, backend, x, vals, idx, K=K)
    order = np.argsort(-x.numpy(), axis=1, kind="stable")[:, :K]           # ties: the lower column first
    assert np.array_equal(idx.numpy(), order)
    assert torch.equal(vals, torch.gather(x, 1, torch.from_numpy(order)))


# ---- 7. an integer histogram: per block, counts by comparing against every bin; atomic adds across blocks ----------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def histogram(X, Hist, *, BINS: int = 16, BM: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BM]()
    rows = ts.RegVec[ts.i32, BM]()
    bins = ts.RegVec[X.dtype, BINS]()
    valid = ts.RegVec[ts.bool_, BM]()
    hit = ts.RegTile[ts.bool_, BM, BINS]()
    one = ts.RegTile[Hist.dtype, BM, BINS]()
    counts = ts.RegVec[Hist.dtype, BINS]()
    ts.load(x, X, at=(i,))
    ts.arange(rows, i * BM)
    ts.lt(valid, rows, X.shape[0])                       # elements past the end read as 0: not bin 0's
    ts.arange(bins)
    ts.eq(hit, ts.per_row(x), ts.per_col(bins))
    ts.logical_and(hit, hit, ts.per_row(valid))
    ts.where(one, hit, 1, 0)
    ts.col_sum(counts, one)
    ts.atomic_add(Hist, counts, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", [torch.int32, torch.int64])
@pytest.mark.parametrize("hdt", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [32, 101, 3])
def test_histogram(backend, xdt, hdt, n, rng):
    x = ints(rng, -2, 18, n, xdt)                      # some values outside the 16 bins
    hist = torch.zeros(16, dtype=hdt)
    launch(histogram, backend, x, hist)
    xs = x.numpy()
    want = np.bincount(xs[(xs >= 0) & (xs < 16)], minlength=16)
    assert np.array_equal(hist.numpy(), want)


# ---- 8. strided and transposed views in and out (the kernel addresses by strides, not by a contiguous layout) ------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def axpy(X, Y, Out, alpha: float, *, BM: int = 16, BN: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(y, Y, at=(i, j))
    ts.store(Out, x * alpha + y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "every_other_column", "expanded_row", "negative_free_slice"])
def test_strided_views(backend, view, rng):
    M, N = 23, 37
    if view == "transposed":
        x = randn(rng, N, M).t()
        y = randn(rng, M, N)
        base = torch.full((N, M), math.nan)
        out = base.t()                                  # written through its transposed strides
    elif view == "every_other_column":
        x = randn(rng, M, 2 * N)[:, ::2]
        y = randn(rng, M, 3 * N)[:, 1::3]
        base = torch.full((M, 2 * N), math.nan)
        out = base[:, 1::2]
    elif view == "expanded_row":
        x = randn(rng, 1, N).expand(M, N)               # stride 0 on the rows (read only)
        y = randn(rng, M, N)
        base = torch.full((M, N), math.nan)
        out = base
    else:
        x = randn(rng, M + 5, N + 3)[2:2 + M, 3:]
        y = randn(rng, M, N)
        base = torch.full((M + 4, N + 4), math.nan)
        out = base[4:, :N]
    launch(axpy, backend, x, y, out, 0.75)
    torch.testing.assert_close(out.double(), x.double() * 0.75 + y.double(), rtol=1e-6, atol=1e-6)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.view(-1)[torch.as_strided(torch.arange(base.numel()), out.shape, out.stride(),
                                        out.storage_offset()).reshape(-1)] = False
    assert torch.isnan(base[untouched]).all()          # nothing outside the view was written


# ---- 9. a 3-D grid over (row blocks, column blocks, batch): a per-(batch, row) scale read from an expanded tensor, ---
# row sums added across the column blocks
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[1], BM), ts.cdiv(X.shape[2], BN), X.shape[0]))
def batched_scale_rowsum(X, S, Y, Total, *, BM: int = 8, BN: int = 16):
    """Y[b] = X[b] * S[b, :, None]; Total[b, r] += the row sums of Y[b] (S is (B, M), maybe expanded)."""
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    r = ts.RegVec[ts.f32, BM]()
    ts.load(x, X, at=(b, i, j))
    ts.load(s, S, at=(b, i))
    ts.mul_row(x, x, s)
    ts.store(Y, x, at=(b, i, j))
    ts.row_sum(r, x)
    ts.atomic_add(Total, r, at=(b, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 8, 16), (2, 13, 35)])
@pytest.mark.parametrize("expanded", [False, True])
def test_batched_3d_grid(backend, shape, expanded, rng):
    B, M, N = shape
    x = randn(rng, B, M, N)
    s = randn(rng, B, 1).expand(B, M) if expanded else randn(rng, B, M)
    y = torch.full((B, M, N), math.nan)
    total = torch.zeros(B, M)
    launch(batched_scale_rowsum, backend, x, s, y, total)
    want = x.double() * s.double()[:, :, None]
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total.double(), want.sum(2), rtol=1e-4, atol=1e-4)


# ---- 10. ragged stores at every edge: an output that is a window of a poisoned buffer, sizes around the tile's -----
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def tile_and_rowmax(X, Y, RowMax, *, BM: int = 16, BN: int = 8):
    """Y = x + 1 tile by tile; RowMax[j, r] = the max of row r within column block j."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    ts.load(x, X, at=(i, j))
    ts.store(Y, x + 1.0, at=(i, j))
    ts.right_fill(x, x, X.shape[1] - j * BN, -math.inf)
    ts.row_max(m, x)
    ts.store(RowMax, m, at=(j, i))       # a vector lies along the last axis: block i of RowMax's row j


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(1, 1), (15, 7), (16, 8), (17, 9), (33, 1), (1, 25)])
def test_ragged_stores_stay_inside_their_window(backend, M, N, rng):
    BM, BN = 16, 8
    nb = -(-N // BN)
    x = randn(rng, M, N)
    ybuf, mbuf = torch.full((M + 3, N + 5), math.nan), torch.full((nb + 2, M + 3), math.nan)
    y, rmax = ybuf[1:M + 1, 2:N + 2], mbuf[2:, 1:M + 1]        # windows, rows strided past their width
    launch(tile_and_rowmax, backend, x, y, rmax, BM=BM, BN=BN)
    torch.testing.assert_close(y, x + 1.0)
    pad = torch.full((M, nb * BN), -math.inf)
    pad[:, :N] = x
    torch.testing.assert_close(rmax, pad.view(M, nb, BN).amax(2).T)
    ybuf[1:M + 1, 2:N + 2] = math.nan
    mbuf[2:, 1:M + 1] = math.nan
    assert torch.isnan(ybuf).all() and torch.isnan(mbuf).all()     # nothing written outside the windows


# ---- 11. mixed precision: f16 operands, f32 accumulation and bias, bf16 out ----------------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_bias_bf16(A, B, Bias, C, *, BM: int = 16, BN: int = 32, BK: int = 16):
    """C = bf16(A @ B + bias): A (M, K) f16, B (K, N) f16, bias (N,) f32."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[ts.f16, BM, BK]()
    b = ts.SharedTile[ts.f16, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    bias = ts.RegVec[ts.f32, BN]()
    out = ts.RegTile[ts.bf16, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.load(bias, Bias, at=(j,))
    ts.add_col(acc, acc, bias)
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "K"), [(16, 32, 16), (29, 45, 70)])
def test_f16_in_f32_accumulate_bf16_out(backend, M, N, K, rng):
    a, b = randn(rng, M, K, dtype=torch.float16), randn(rng, K, N, dtype=torch.float16)
    bias = randn(rng, N)
    c = torch.full((M, N), math.nan, dtype=BF)
    launch(gemm_bias_bf16, backend, a, b, bias, c)
    want = a.double() @ b.double() + bias.double()
    assert c.dtype is BF
    torch.testing.assert_close(c.double(), want, rtol=1.6e-2, atol=1.6e-2)
    # the bf16 result is the f32 sum rounded once (to nearest even): within half a bf16 ulp of the float64 value
    assert ((c.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-3).all()


# ---- 12. reductions over rows that masking leaves empty: a length-masked softmax with zero-length rows -------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def masked_softmax(X, Lengths, Y, Max, Sum, *, BM: int = 8, BN: int = 32):
    """Row r keeps its first Lengths[r] columns; an empty row has max -inf, sum 0 and all-zero probabilities."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    n = ts.RegVec[ts.i32, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    empty = ts.RegVec[ts.bool_, BM]()
    m = ts.RegVec[ts.f32, BM]()
    shift = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    ts.load(x, X, at=(i, 0))
    ts.load(n, Lengths, at=(i,))
    ts.arange(cols)
    ts.lt(keep, ts.per_col(cols), ts.per_row(n))
    ts.where(x, keep, x, -math.inf)
    ts.row_max(m, x)
    ts.store(Max, m, at=(i,))
    ts.eq(empty, m, -math.inf)
    ts.where(shift, empty, 0.0, m)                # exp(-inf - 0) = 0, not exp(-inf - -inf) = NaN
    ts.sub_row(x, x, shift)
    ts.exp(x, x)
    ts.row_sum(s, x)
    ts.store(Sum, s, at=(i,))
    ts.where(s, empty, 1.0, s)
    ts.div_row(x, x, s)
    ts.store(Y, x, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 32), (13, 20)])
def test_reductions_over_rows_masking_empties(backend, M, N, rng):
    x = randn(rng, M, N) * 3
    lengths = torch.from_numpy(rng.integers(0, N + 1, M)).to(torch.int32)
    lengths[0], lengths[-1] = 0, N
    y, mx, sm = torch.full((M, N), math.nan), torch.full((M,), math.nan), torch.full((M,), math.nan)
    launch(masked_softmax, backend, x, lengths, y, mx, sm)
    keep = torch.arange(N)[None, :] < lengths.long()[:, None]
    xd = x.double().masked_fill(~keep, -math.inf)
    want_max = xd.max(1).values
    torch.testing.assert_close(mx.double(), want_max)
    shift = torch.where(torch.isinf(want_max), 0.0, want_max)
    e = (xd - shift[:, None]).exp()
    torch.testing.assert_close(sm.double(), e.sum(1), rtol=1e-5, atol=1e-6)
    want = torch.where(lengths[:, None] > 0, e / e.sum(1, keepdim=True).clamp_min(1e-300), 0.0)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    assert (y[0] == 0).all() and torch.isinf(mx[0]) and sm[0] == 0


# ---- 13. runtime scalars of each kind: floats (inf and huge), ints (0, 1, negative, past 2**31), a loop bound ------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def scalar_kinds(X, I, Y, J, a: float, n: int, trips: int, *, BN: int = 16):
    """y = x * a + n + trips; j = i * n + trips (i32 work: n converted to i32, wrapping), summed over trips loads."""
    k = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    i = ts.RegVec[ts.i32, BN]()
    acc = ts.RegVec[ts.i32, BN]()
    ts.load(x, X, at=(k,))
    ts.load(i, I, at=(k,))
    ts.mul(x, x, a)
    ts.add(x, x, n)
    ts.add(x, x, trips)
    ts.store(Y, x, at=(k,))
    ts.zero(acc)
    for _ in ts.range(trips):
        ts.add(acc, acc, i * n)
    ts.add(acc, acc, trips)
    ts.store(J, acc, at=(k,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("a", "n", "trips"), [(0.5, 0, 0), (-1.5, 1, 1), (1e30, -7, 3), (math.inf, 2**31 + 3, 2),
                                               (2.0, -(2**40) - 1, 1), (3, 5, 2),
                                               (np.float32(-1.5), np.int64(-7), np.int32(3))])   # NumPy's too
def test_scalar_arguments_of_each_kind(backend, a, n, trips, rng):
    N = 37
    x = randn(rng, N)
    i = ints(rng, -2**31, 2**31, N, torch.int32)
    y, j = torch.full((N,), math.nan), torch.full((N,), POISON, dtype=torch.int32)
    launch(scalar_kinds, backend, x, i, y, j, a, n, trips)
    a, n, trips = float(a), int(n), int(trips)
    want = (x.double() * a).float().double() + n + trips      # x * a rounded to f32, then the ints added
    torch.testing.assert_close(y.double(), want.float().double(), rtol=1e-6, atol=1e-6)
    n32 = wrap(n, 32)                                             # i32 work converts n to i32 first
    assert j.tolist() == [wrap(wrap(v * n32, 32) * trips + trips, 32) for v in i.tolist()]


def test_scalar_arguments_are_checked_when_launched():
    x, i = torch.zeros(16), torch.zeros(16, dtype=torch.int32)
    y, j = torch.zeros(16), torch.zeros(16, dtype=torch.int32)
    with pytest.raises(LaunchError, match=r"argument n is a runtime int; got float 2.0"):
        scalar_kinds(x, i, y, j, 1.0, 2.0, 1, backend="reference")
    with pytest.raises(LaunchError, match=r"argument a is a runtime float; got bool True"):
        scalar_kinds(x, i, y, j, True, 2, 1, backend="reference")
    with pytest.raises(LaunchError, match=r"argument trips is a runtime int; got Tensor"):
        scalar_kinds(x, i, y, j, 1.0, 2, torch.tensor(1), backend="reference")
    with pytest.raises(LaunchError, match=r"argument n is a runtime int; got float 2.0"):
        scalar_kinds(x, i, y, j, 1.0, np.float64(2.0), 1, backend="reference")
    with pytest.raises(LaunchError, match=r"argument n is a runtime int; got bool True"):
        scalar_kinds(x, i, y, j, 1.0, np.bool_(True), 1, backend="reference")


# ---- 13b. shared tiles and vectors stored straight to global memory (no register copy written by the user) -------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def store_shared(X, Y, V, *, BM: int = 64, BN: int = 64):
    """Y = X (in Y's dtype), tile by tile through shared memory; V[i] = the first row of each row block."""
    i, j = ts.block_id(0), ts.block_id(1)
    s = ts.SharedTile[X.dtype, BM, BN]()
    v = ts.SharedVec[X.dtype, BN]()
    ts.load(s, X, at=(i, j))
    ts.store(Y, s, at=(i, j))
    ts.load(v, X, at=(i * BM, j))
    ts.store(V, v, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "ydt"), [(BF, torch.float32), (torch.float32, torch.float32)])
def test_shared_tiles_stored_to_global(backend, xdt, ydt, rng):
    M, N = 70, 100
    x = randn(rng, M, N, dtype=xdt)
    y, v = torch.full((M, N), math.nan, dtype=ydt), torch.full((2, N), math.nan, dtype=ydt)
    launch(store_shared, backend, x, y, v)
    assert torch.equal(y, x.to(ydt)) and torch.equal(v, x[::64].to(ydt))


# ---- 14. what the language cannot express is refused when traced, naming the op, the tile and what it takes --------
def _int_kernel(body):
    @ts.kernel(grid=lambda X: (1,))
    def k(X, Y, f: float, *, N: int = 16):
        x = ts.RegVec[X.dtype, N]()
        v = ts.RegTile[X.dtype, N, N]()
        ts.load(x, X, at=(0,))
        ts.zero(v)
        body(x, v, f)
        ts.store(Y, x, at=(0,))
    return k


MISUSE = {   # name -> (body, dtype of X, error, message)
    "shift_past_width": (lambda x, v, f: ts.shl(x, x, 32), ts.i32, TraceError,
                         r"shl: shift count 32 for i32 work; expected 0 <= count < 32"),
    "negative_shift": (lambda x, v, f: ts.shr(x, x, -1), ts.i64, TraceError,
                       r"shr: shift count -1 for i64 work; expected 0 <= count < 64"),
    "fraction_into_int_work": (lambda x, v, f: ts.add(x, x, 0.5), ts.i32, TileDTypeError,
                               r"add: a `x` is i32; b = 0.5 is not a whole number"),
    "float_scalar_into_int_work": (lambda x, v, f: ts.mul(x, x, f), ts.i32, TileDTypeError,
                                   r"mul: a `x` is i32 and b is a float Scalar"),
    "constant_past_i32": (lambda x, v, f: ts.add(x, x, 2**32), ts.i32, TileDTypeError,
                          r"add: b = 4294967296 does not fit i32 .* \[-2147483648, 4294967295\]"),
    "bits_of_floats": (lambda x, v, f: ts.bit_xor(x, x, 1), ts.f32, TileDTypeError,
                       r"bit_xor: a `x` is f32; expected an integer dtype"),
    "floor_division_sugar": (lambda x, v, f: x // 2, ts.i32, TraceError, r"`//` on a tile: .* ts.div\(dst, a, b\)"),
    "python_modulo_sugar": (lambda x, v, f: x % 3, ts.i32, TraceError, r"`%` on a tile: .* ts.rem\(dst, a, b\)"),
    "number_shifted_by_tile": (lambda x, v, f: 1 << x, ts.i32, TraceError, r"`<<` on a tile: .* ts.shl"),
    "rem_by_a_broadcast_vector": (lambda x, v, f: ts.rem(v, v, ts.per_row(x)), ts.i32, TraceError,
                                  r"rem: b is per_row\(...\); rem takes a tile of a's shape or a scalar"),
    "exp_of_integers": (lambda x, v, f: ts.exp(x, x), ts.i32, TileDTypeError,
                        r"exp: src `x` is i32; expected a float dtype"),
    "mma_of_integers": (lambda x, v, f: ts.mma_AB(ts.RegTile[ts.f32, 16, 16](), v, v, v), ts.i32, TileDTypeError,
                        r"mma_AB: a `v` is i32 and b `v` is i32; expected both bf16"),
    "arithmetic_on_masks": (lambda x, v, f: ts.add(ts.RegVec[ts.bool_, 16](), _mask(x), 1), ts.i32,
                            TileDTypeError, r"add: dst .* is a bool_ mask"),
}


def _mask(x):
    m = ts.RegVec[ts.bool_, 16]()
    ts.gt(m, x, 0)
    return m


@pytest.mark.parametrize("name", MISUSE)
def test_what_the_language_cannot_express_is_refused_when_traced(name):
    body, dt, err, msg = MISUSE[name]
    with pytest.raises(err, match=msg):
        _int_kernel(body).trace(ts.ArgSpec(dt, 1), ts.ArgSpec(dt, 1), "float")


def test_a_tile_first_written_in_a_loop_is_refused_after_it_naming_it():
    @ts.kernel(grid=lambda X: (1,))
    def last_block(X, Y, *, N: int = 16):
        x = ts.RegVec[ts.f32, N]()              # declared before the loop, but first written in it
        for k in ts.range(ts.cdiv(X.shape[0], N)):
            ts.load(x, X, at=(k,))
        ts.store(Y, x, at=(0,))

    with pytest.raises(TraceError, match=r"store: `x` was made inside the loop at .* the loop does not carry it: "
                                         r"a tile carried out of a loop needs a value before the loop too"):
        last_block.trace(ts.ArgSpec(ts.f32, 1), ts.ArgSpec(ts.f32, 1))


def test_integer_constants_past_31_bits_are_the_same_bits():
    # 0x85EBCA6B (past 2**31) in i32 work is the i32 of the same bits; in i64 work it is itself
    from tilestack.ir.ops import Op
    for dt, want in ((ts.i32, 0x85EBCA6B - 2**32), (ts.i64, 0x85EBCA6B)):
        traced = _int_kernel(lambda x, v, f: ts.mul(x, x, FMIX1)).trace(ts.ArgSpec(dt, 1), ts.ArgSpec(dt, 1), "float")
        consts = [ins.attrs.value for ins in traced.ir.walk() if ins.op is Op.CONST]
        assert want in consts and FMIX1 not in consts if dt is ts.i32 else want in consts


# ---- 15. every kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and by Gluon -----------------------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "hash_i32": (hash_i32, (meta(256, 256, dtype=I32), meta(256, 256, dtype=I32), 7), {}),
    "int64_math": (int64_math, (*(meta(4, 16, dtype=I64) for _ in range(3)), meta(4, dtype=I64),
                                meta(4, 16, dtype=I64)), {}),
    "int_divmod": (int_divmod, tuple(meta(64, dtype=I32) for _ in range(6)), dict(DIVISOR=-3)),
    "int_sugar": (int_sugar, (meta(16, dtype=I64), meta(16, dtype=I64), meta(16, dtype=I32)), {}),
    "hash_dropout": (hash_dropout, (meta(256, 256), meta(256, 256), 1, 40000, 1.25), dict(BM=64, BN=64)),
    "row_topk": (row_topk, (meta(256, 32), meta(256, 4), meta(256, 4, dtype=I64)), dict(K=4)),
    "histogram": (histogram, (meta(1000, dtype=I32), meta(16, dtype=I32)), dict(BM=128)),
    "axpy": (axpy, (meta(256, 256), meta(256, 256), meta(256, 256), 0.5), {}),
    "batched_scale_rowsum": (batched_scale_rowsum, (meta(4, 128, 256), meta(4, 128), meta(4, 128, 256),
                                                    meta(4, 128)), dict(BM=64, BN=64)),
    "tile_and_rowmax": (tile_and_rowmax, (meta(256, 256), meta(256, 256), meta(32, 256)), {}),
    "gemm_bias_bf16": (gemm_bias_bf16, (meta(256, 256, dtype=torch.float16), meta(256, 256, dtype=torch.float16),
                                        meta(256), meta(256, 256, dtype=BF)), dict(BM=128, BN=128, BK=64)),
    "masked_softmax": (masked_softmax, (meta(256, 128), meta(256, dtype=I32), meta(256, 128), meta(256),
                                        meta(256)), dict(BM=32, BN=128)),
    "store_shared": (store_shared, (meta(256, 256, dtype=BF), meta(256, 256), meta(4, 256)), {}),
    "scalar_kinds": (scalar_kinds, (meta(256), meta(256, dtype=I32), meta(256), meta(256, dtype=I32), 0.5, 3, 2),
                     {}),
}
F32_MMA_CASES = {"col_cumsum": (col_cumsum, (meta(256, 256), meta(256, 256)), dict(BM=32, BN=32))}


@pytest.mark.parametrize("name", [*AOT_CASES, *F32_MMA_CASES])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **F32_MMA_CASES}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    kernel = AOT_CASES[name][0]
    compiled = compile_gluon_sm90a(*AOT_CASES[name])
    if kernel is int_divmod:          # signed division, which PTX rounds toward zero (as the reference's div)
        assert "div.s32" in compiled.asm["ptx"]


def test_gluon_max_min_and_relu_propagate_nan_in_the_ptx():
    # the held-out NaN kernel (relu, row max, column min, max with a number) through Gluon: NaN-propagating max/min
    from test_heldout_kernels import AOT_CASES as ROUND1

    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    kernel, args, consts = ROUND1["nan_max_min"]
    be = get_backend("gluon")
    traced = kernel.trace(*args, **consts)
    src = be.source(traced)
    assert src.count("propagate_nan=tl.PropagateNan.ALL") >= 4 and "gl.max(" not in src and "gl.min(" not in src
    ptx = be.aot(traced, be.Options()).asm["ptx"]
    assert "max.NaN.f32" in ptx and "min.NaN.f32" in ptx
    assert not any(w in ptx for w in ("max.f32 ", "min.f32 "))
