"""Round 10 of held-out kernels, continued (see test_heldout_round10.py's docstring): small dense linear algebra in
one tile per matrix or row. A batched Cholesky factorization and solve (X = A^-1 B for SPD A): right-looking rank-1
updates over a runtime loop of n steps, row k / column k / the pivot picked out by masks from the loop counter and
broadcast by reductions; a forward substitution and a backward one (a loop counting down); f64 work for f64
matrices, f32 otherwise. A bitonic argsort of each row (torch.sort(stable=True): NaN last, ties by index), the
partner of each compare-exchange gathered exactly by a where and a column max.

Bugs found: a NaN constant (where(x, m, x, math.nan)) was written into Triton and Gluon kernels as the bare name
`nan` (python_dsl.literal: repr), a NameError when the kernel module ran: test_nan_as_a_constant_operand; a -0.0
constant became +0.0 there: test_negative_zero_constants_keep_their_sign; and under Triton's interpreter so did a
float argument of -0.0: test_runtime_float_argument_of_negative_zero.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, close, launch, randn

import tilestack.lang as ts


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. Cholesky factorization and solve: A = L L^T, then L Y = B, L^T X = Y ---------------------------------------
@ts.kernel(grid=lambda B, BR: (B.shape[0], ts.cdiv(B.shape[2], BR)))
def cho_solve(A, B, L_OUT, X, *, BN: int = 16, BR: int = 16):
    """A (batch, n, n) SPD (n <= BN), B (batch, n, R), L_OUT (batch, n, n) the lower factor, X (batch, n, R).
    Padding rows / columns past n read 0; their diagonal is set to 1, so they factor to the identity."""
    W = ts.f64 if A.dtype is ts.f64 else ts.f32
    b, jr = ts.block_id(0), ts.block_id(1)
    n = A.shape[1]
    a = ts.RegTile[W, BN, BN]()
    lo = ts.RegTile[W, BN, BN]()
    t = ts.RegTile[W, BN, BN]()
    rhs = ts.RegTile[W, BN, BR]()
    tr = ts.RegTile[W, BN, BR]()
    rk = ts.RegTile[ts.bool_, BN, BN]()
    ck = ts.RegTile[ts.bool_, BN, BN]()
    pk = ts.RegTile[ts.bool_, BN, BN]()
    rkr = ts.RegTile[ts.bool_, BN, BR]()
    idx = ts.RegVec[ts.i32, BN]()
    live = ts.RegVec[ts.bool_, BN]()
    col = ts.RegVec[W, BN]()
    piv = ts.RegVec[W, BN]()
    diag = ts.RegVec[W, BN]()
    dr = ts.RegVec[W, BR]()
    yk = ts.RegVec[W, BR]()
    out = ts.RegTile[L_OUT.dtype, BN, BN]()
    xo = ts.RegTile[X.dtype, BN, BR]()
    ts.load(a, A, at=(b, 0, 0))
    ts.load(rhs, B, at=(b, 0, jr))
    ts.arange(idx, 0)
    ts.eq(pk, ts.per_row(idx), ts.per_col(idx))
    ts.ge(live, idx, n)
    ts.logical_and(pk, pk, ts.per_row(live))
    ts.where(a, pk, 1.0, a)
    ts.zero(lo)
    ts.zero(diag)
    for k in ts.range(n):
        ts.eq(ck, ts.per_col(idx), k)
        ts.eq(rk, ts.per_row(idx), k)
        ts.logical_and(pk, rk, ck)
        ts.where(t, pk, a, 0.0)
        ts.col_sum(piv, t)                           # a[k, k] at column k, 0 elsewhere
        ts.zero(t)
        ts.add(t, t, ts.per_col(piv))
        ts.row_sum(piv, t)                           # a[k, k] in every row
        ts.sqrt(piv, piv)
        ts.where(t, ck, a, 0.0)
        ts.row_sum(col, t)                           # a[:, k]
        ts.div(col, col, piv)
        ts.ge(live, idx, k)
        ts.where(col, live, col, 0.0)                # L[:, k], zero above the diagonal
        ts.where(lo, ck, ts.per_row(col), lo)
        ts.eq(live, idx, k)
        ts.where(diag, live, piv, diag)
        ts.zero(t)
        ts.add(t, t, ts.per_row(col))
        ts.mul(t, t, ts.per_col(col))
        ts.sub(a, a, t)                              # the trailing matrix's update; row and column k become 0
    ts.copy(out, lo)
    ts.store(L_OUT, out, at=(b, 0, 0))
    for k in ts.range(n):                            # forward: L Y = B
        ts.eq(rkr, ts.per_row(idx), k)
        ts.where(tr, rkr, rhs, 0.0)
        ts.col_sum(yk, tr)                           # rhs[k, :]
        ts.eq(live, idx, k)
        ts.where(col, live, diag, 0.0)
        ts.zero(tr)
        ts.add(tr, tr, ts.per_row(col))
        ts.col_sum(dr, tr)                           # L[k, k] in every column
        ts.div(yk, yk, dr)
        ts.where(rhs, rkr, ts.per_col(yk), rhs)
        ts.eq(ck, ts.per_col(idx), k)
        ts.where(t, ck, lo, 0.0)
        ts.row_sum(col, t)                           # L[:, k]
        ts.gt(live, idx, k)
        ts.where(col, live, col, 0.0)
        ts.zero(tr)
        ts.add(tr, tr, ts.per_row(col))
        ts.mul(tr, tr, ts.per_col(yk))
        ts.sub(rhs, rhs, tr)
    for k in ts.range(n - 1, -1, -1):                # backward: L^T X = Y
        ts.eq(rkr, ts.per_row(idx), k)
        ts.where(tr, rkr, rhs, 0.0)
        ts.col_sum(yk, tr)
        ts.eq(live, idx, k)
        ts.where(col, live, diag, 0.0)
        ts.zero(tr)
        ts.add(tr, tr, ts.per_row(col))
        ts.col_sum(dr, tr)
        ts.div(yk, yk, dr)
        ts.where(rhs, rkr, ts.per_col(yk), rhs)
        ts.eq(rk, ts.per_row(idx), k)
        ts.where(t, rk, lo, 0.0)
        ts.col_sum(col, t)                           # L[k, :] (as a vector over rows of L^T's column k)
        ts.lt(live, idx, k)
        ts.where(col, live, col, 0.0)
        ts.zero(tr)
        ts.add(tr, tr, ts.per_row(col))
        ts.mul(tr, tr, ts.per_col(yk))
        ts.sub(rhs, rhs, tr)
    ts.copy(xo, rhs)
    ts.store(X, xo, at=(b, 0, jr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, BF])
@pytest.mark.parametrize(("batch", "n", "R"), [(3, 7, 5), (1, 16, 19), (1, 1, 1), (0, 4, 3)])
def test_cholesky_solve(backend, dtype, batch, n, R, rng):
    """SPD matrices M M^T / n + I (condition ~ 10) with entries scaled by 1e3 in one batch (the factor by ~30);
    the factor against torch.linalg.cholesky (written by every program of a batch, alike) and X against
    torch.linalg.solve, in float64."""
    m = randn(rng, batch, n, n, dtype=torch.float64)
    a = m @ m.transpose(1, 2) / n + torch.eye(n, dtype=torch.float64)
    if batch > 1:
        a[1] *= 1e3
    a = a.to(dtype)
    rhs = randn(rng, batch, n, R, dtype=dtype)
    lo, x = poisoned(batch, n, n, dtype=dtype), poisoned(batch, n, R, dtype=dtype)
    launch(cho_solve, backend, a, rhs, lo, x)
    ad = a.double()
    want_l = torch.linalg.cholesky(ad) if batch else ad
    close(lo, want_l.to(dtype), scale=40)
    want_x = torch.linalg.solve(ad, rhs.double()) if batch else rhs.double()
    close(x, want_x.to(dtype), scale=40)


# ---- 2. bitonic argsort of each row: compare-exchange stages, partners gathered by where + column max ---------------
@ts.kernel(grid=lambda X: (X.shape[0],))
def bitonic_argsort(X, VALS, IDX, *, NP: int = 32):
    """VALS, IDX (M, N) = torch.sort(X, stable=True) of each row of X (M, N), N <= NP (a power of two): ascending,
    NaN last, equal values in index order. Keys (nan, value, index) are compared as a total order; the NP - N padding
    slots are NaN with indices past N, so they sort after every real element and are not stored. Stage (size, stride)
    pairs position p with p ^ stride; a block of `size` ascends where p & size == 0. The partner's value is gathered
    exactly, inf, NaN and -0.0 alike, as a column max over a where (no product)."""
    r = ts.block_id(0)
    x = ts.RegVec[ts.f32, NP]()
    xi = ts.RegVec[ts.i32, NP]()
    pos = ts.RegVec[ts.i32, NP]()
    pp = ts.RegVec[ts.i32, NP]()
    pv = ts.RegVec[ts.f32, NP]()
    pi = ts.RegVec[ts.i32, NP]()
    bits = ts.RegVec[ts.i32, NP]()
    sel = ts.RegTile[ts.bool_, NP, NP]()
    gv = ts.RegTile[ts.f32, NP, NP]()
    gi = ts.RegTile[ts.i32, NP, NP]()
    na = ts.RegVec[ts.bool_, NP]()
    nb = ts.RegVec[ts.bool_, NP]()
    t1 = ts.RegVec[ts.bool_, NP]()
    t2 = ts.RegVec[ts.bool_, NP]()
    gt = ts.RegVec[ts.bool_, NP]()
    want_min = ts.RegVec[ts.bool_, NP]()
    take = ts.RegVec[ts.bool_, NP]()
    out = ts.RegVec[ts.i64, NP]()
    ts.load(x, X, at=(r, 0))
    ts.arange(pos, 0)
    ts.copy(xi, pos)
    ts.lt(t1, pos, X.shape[1])
    ts.where(x, t1, x, math.nan)                     # padding: NaN, after every real NaN by its index
    size = 2
    while size <= NP:
        stride = size // 2
        while stride >= 1:
            ts.bit_xor(pp, pos, stride)
            ts.eq(sel, ts.per_row(pos), ts.per_col(pp))
            ts.where(gv, sel, ts.per_row(x), -math.inf)
            ts.col_max(pv, gv)                       # pv[c] = x[c ^ stride]
            ts.where(gi, sel, ts.per_row(xi), -1)
            ts.col_max(pi, gi)
            ts.ne(na, x, x)
            ts.ne(nb, pv, pv)
            ts.gt(gt, x, pv)                         # self > partner, as keys (nan, value, index):
            ts.eq(t1, x, pv)
            ts.logical_or(t1, t1, na)                # equal values, or both NaN (when na == nb) ...
            ts.gt(t2, xi, pi)
            ts.logical_and(t1, t1, t2)               # ... then the larger index
            ts.logical_or(gt, gt, t1)
            ts.logical_not(t2, nb)
            ts.logical_and(t2, na, t2)               # NaN beats a number
            ts.logical_not(t1, na)
            ts.logical_and(t1, t1, nb)               # a number loses to NaN
            ts.logical_not(t1, t1)
            ts.logical_and(gt, gt, t1)
            ts.logical_or(gt, gt, t2)
            ts.bit_and(bits, pos, size)
            ts.eq(want_min, bits, 0)                 # an ascending block ...
            ts.bit_and(bits, pos, stride)
            ts.eq(t1, bits, 0)                       # ... the lower of the pair ...
            ts.logical_and(t2, want_min, t1)
            ts.logical_or(want_min, want_min, t1)
            ts.logical_not(want_min, want_min)
            ts.logical_or(want_min, want_min, t2)    # ... keeps the min where both or neither hold
            ts.logical_and(t1, gt, want_min)
            ts.logical_or(t2, gt, want_min)
            ts.logical_not(t2, t2)
            ts.logical_or(take, t1, t2)              # take the partner: self > partner == want_min
            ts.where(x, take, pv, x)
            ts.where(xi, take, pi, xi)
            stride //= 2
        size *= 2
    ts.store(VALS, x, at=(r, 0))
    ts.copy(out, xi)
    ts.store(IDX, out, at=(r, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "M", "N", "NP"), [(torch.float32, 1, 32, 32), (F16, 2, 13, 16), (BF, 2, 16, 16),
                                                     (torch.float32, 3, 1, 2), (BF, 0, 8, 8)])
def test_bitonic_argsort(backend, dtype, M, N, NP, rng):
    """Rows with repeated values (ties in index order), +-inf, NaN (last, in index order), -0.0 and 0.0 (equal:
    index order, each keeping its sign); against torch.sort(stable=True)."""
    x = torch.from_numpy(rng.integers(-4, 5, (M, N))).to(dtype) if N > 2 else randn(rng, M, N, dtype=dtype)
    if M > 1 and N > 8:
        x[0, :6] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, math.nan], dtype=dtype)
        x[1] = x[1, 0]                               # all equal
    vals, idx = poisoned(M, N, dtype=dtype), torch.full((M, N), -7, dtype=torch.int64)
    launch(bitonic_argsort, backend, x, vals, idx, NP=NP)
    want_v, want_i = torch.sort(x, dim=-1, stable=True)
    assert torch.equal(idx, want_i)
    bits = torch.int16 if dtype != torch.float32 else torch.int32   # (the sign of each zero too; NaN as NaN)
    nan = want_v.isnan()
    assert torch.equal(vals.isnan(), nan)
    assert torch.equal(vals.view(bits)[~nan], want_v.view(bits)[~nan])


# ---- 3. NaN as a constant operand ----------------------------------------------------------------------------------
@ts.kernel(grid=lambda X: (1,))
def nan_constants(X, Y, *, BN: int = 16):
    """Y = where(X > 0, X + 1, NaN) + NaN * (X == 7), and Y[0] = fill NaN: the Triton backend wrote the constant as
    the bare name `nan` ("NameError: name 'nan' is not defined" in the interpreter and the compiler alike)."""
    x = ts.RegVec[ts.f32, BN]()
    y = ts.RegVec[ts.f32, BN]()
    m = ts.RegVec[ts.bool_, BN]()
    ts.load(x, X, at=(0,))
    ts.gt(m, x, 0.0)
    ts.add(y, x, 1.0)
    ts.where(y, m, y, math.nan)
    ts.eq(m, x, 7.0)
    ts.where(x, m, math.nan, 0.0)
    ts.add(y, y, x)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_as_a_constant_operand(backend):
    x = torch.tensor([1.0, -1.0, 7.0, 0.0, 2.5, math.inf, -math.inf, math.nan] * 2)
    y = torch.zeros(16)
    launch(nan_constants, backend, x, y)
    want = torch.where(x > 0, x + 1, math.nan) + torch.where(x == 7, math.nan, 0.0)
    torch.testing.assert_close(y, want, equal_nan=True)


@ts.kernel(grid=lambda X: (1,))
def neg_zero_constants(X, Y, Z, *, BN: int = 16):
    """Y = where(X < 0, -0.0, X * -0.0 + -0.0) in X's dtype; Z = fill(-0.0). Triton (and Gluon) made every constant
    equal to 0 their +0.0, so X * -0.0 was +0.0 for X > 0 (as was the fill)."""
    x = ts.RegVec[X.dtype, BN]()
    y = ts.RegVec[X.dtype, BN]()
    m = ts.RegVec[ts.bool_, BN]()
    ts.load(x, X, at=(0,))
    ts.mul(y, x, -0.0)
    ts.add(y, y, -0.0)
    ts.lt(m, x, 0.0)
    ts.where(y, m, -0.0, y)
    ts.store(Y, y, at=(0,))
    ts.fill(y, -0.0)
    ts.store(Z, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF, torch.float64])
def test_negative_zero_constants_keep_their_sign(backend, dtype):
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0, 1e-3, 100.0, -7.0] * 2, dtype=dtype)
    y, z = torch.full((16,), math.nan, dtype=dtype), torch.full((16,), math.nan, dtype=dtype)
    launch(neg_zero_constants, backend, x, y, z)
    want = torch.where(x < 0, torch.tensor(-0.0, dtype=dtype), x * -0.0 + -0.0)
    assert torch.equal(y.signbit(), want.signbit()) and torch.equal(y, want)
    assert torch.equal(z.signbit(), torch.ones(16, dtype=torch.bool)) and (z == 0).all()


@ts.kernel(grid=lambda X: (1,))
def scale_shift(X, Y, s: float, *, BN: int = 16):
    """Y = X s + s in X's dtype (f64 work for f64)."""
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(0,))
    ts.mul(x, x, s)
    ts.add(x, x, s)
    ts.store(Y, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF])
@pytest.mark.parametrize("s", [-0.0, 0.0, -math.inf, math.nan])
def test_runtime_float_argument_of_negative_zero(backend, dtype, s):
    """Triton's interpreter passed a float argument as the Python float, a constant to Triton: -0.0 became +0.0.
    (f64 work's float arguments still lose the sign there: open.)"""
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0, 1e-3, 100.0, -7.0] * 2, dtype=dtype)
    y = torch.full((16,), 5.0, dtype=dtype)
    launch(scale_shift, backend, x, y, s)
    want = x * s + s
    assert torch.equal(y.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(y[keep], want[keep]) and torch.equal(y[keep].signbit(), want[keep].signbit())
