"""Round 10 of held-out kernels, continued (see test_heldout_round10.py's docstring): small dense linear algebra in
one tile per matrix. A batched Cholesky factorization and solve (X = A^-1 B for SPD A): right-looking rank-1
updates over a runtime loop of n steps, row k / column k / the pivot picked out by masks from the loop counter and
broadcast by reductions; a forward substitution and a backward one (a loop counting down); f64 work for f64
matrices, f32 otherwise.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, close, launch, randn

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
@pytest.mark.parametrize(("batch", "n", "R"), [(3, 7, 5), (2, 16, 19), (1, 1, 1), (0, 4, 3), (2, 3, 0)])
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
    if R:
        close(lo, want_l.to(dtype), scale=40)
    else:                                            # no right-hand sides: no programs, nothing written
        assert lo.isnan().all()
    want_x = torch.linalg.solve(ad, rhs.double()) if batch and R else rhs.double()
    close(x, want_x.to(dtype), scale=40)
