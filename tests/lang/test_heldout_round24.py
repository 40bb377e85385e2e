"""Round 24 of held-out kernels (after rounds 2-23): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch (or exact Python integers), outputs poisoned with NaN (or a
sentinel) first, seeds fixed (the ``rng`` fixture of this file).

A summed-area table (the 2-D inclusive prefix sum of images: one program per column block, a loop over row tiles
carrying the column totals above it, an inner loop bound by the block index summing the rows' parts left of it, the
in-tile prefix by triangular 0/1 matrices through the tensor cores: exact on integer-valued pixels); power iteration
for the dominant eigenpair of a batch of symmetric matrices (a runtime trip count, the iterate carried as a vector
used per column and reduced along both axes, padded rows and columns of a ragged N kept at zero); and a QR
factorization by modified Gram-Schmidt of a tall matrix in one tile (columns picked out by masks, Q and R written
column by column in a loop that carries A, Q and R), least squares from it by back substitution in a loop counting
down; and suffix sums by column tile, the tiles walked from the last by a constant negative step through a shared
tile. test_heldout_round24_more.py has more kernels of this round, the misuse checks and the sm_90a compiles.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262401)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. a summed-area table: S[n, r, c] = sum of X[n, :r+1, :c+1] ----------------------------------------------------
def _ones_triangle(dst, upper: bool, B: int) -> None:
    """dst (B, B) = 1 on and below the diagonal (upper=False: L, L @ x sums down the rows) or on and above it
    (upper=True: U, x @ U sums along the columns), else 0."""
    p, q = ts.RegVec[ts.i32, B](), ts.RegVec[ts.i32, B]()
    keep = ts.RegTile[ts.bool_, B, B]()
    ts.arange(p)
    ts.arange(q)
    if upper:
        ts.le(keep, ts.per_row(p), ts.per_col(q))
    else:
        ts.ge(keep, ts.per_row(p), ts.per_col(q))
    ts.where(dst, keep, 1.0, 0.0)


@ts.kernel(grid=lambda X, BN: (X.shape[0], ts.cdiv(X.shape[2], BN)))
def summed_area(X, S, *, BM: int = 16, BN: int = 16):
    """S (N, H, W) = the summed-area table of X (N, H, W). Program (n, j) owns columns [j BN, (j+1) BN) and walks
    down the row tiles i: Z = X_ij U + per_row(left), left[r] = the sum of row r left of the block (an inner loop over
    the column tiles k < j), then S_ij = per_col(top) + L Z and top += col_sum(Z). Rows and columns past the edges
    read as 0 and add nothing."""
    n, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    xl = ts.RegTile[ts.f32, BM, BN]()
    z, s = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    lo, up = ts.RegTile[ts.f32, BM, BM](), ts.RegTile[ts.f32, BN, BN]()
    _ones_triangle(lo, False, BM)
    _ones_triangle(up, True, BN)
    top, left = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BM]()
    ts.zero(top)
    for i in ts.range(ts.cdiv(X.shape[1], BM)):
        ts.zero(left)
        for k in ts.range(j):
            ts.load(xl, X, at=(n, i, k))
            ts.row_sum(left, xl, left)
        ts.load(x, X, at=(n, i, j))
        ts.zero(z)
        ts.mma_AB(z, x, up, z)
        ts.add(z, z, ts.per_row(left))
        ts.zero(s)
        ts.add(s, s, ts.per_col(top))
        ts.mma_AB(s, lo, z, s)
        ts.col_sum(top, z, top)
        out = ts.RegTile[S.dtype, BM, BN]()
        ts.copy(out, s)
        ts.store(S, out, at=(n, i, j))


def summed_area_ref(x: torch.Tensor) -> torch.Tensor:
    return x.double().cumsum(1).cumsum(2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, torch.uint8])
@pytest.mark.parametrize(("N", "H", "W"), [(2, 37, 45), (1, 16, 16), (3, 1, 50), (1, 29, 1)])
def test_summed_area_table_exact_on_integer_pixels(backend, dtype, N, H, W, rng):
    """Integer-valued pixels (0..255, uint8 too): every partial sum is an integer below 2**24, so the f32 table is
    exact; ragged rows and columns (37 x 45 in 16s), one row, one column, a single tile."""
    x = torch.from_numpy(rng.integers(0, 256, (N, H, W))).to(dtype)
    s = poisoned(N, H, W)
    launch(summed_area, backend, x, s)
    assert torch.equal(s.double(), summed_area_ref(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("BM", "BN"), [(16, 32), (32, 16)])
def test_summed_area_table_of_floats_and_box_sums(backend, BM, BN, rng):
    """Gaussian pixels into an f64 table (f32 sums: a relative error of the table's scale); a box sum read from four
    corners of the table matches the box's direct sum."""
    x = randn(rng, 2, 50, 70)
    s = poisoned(2, 50, 70, dtype=F64)
    launch(summed_area, backend, x, s, BM=BM, BN=BN)
    want = summed_area_ref(x)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-4)
    r0, r1, c0, c1 = 11, 43, 5, 66
    box = s[:, r1, c1] - s[:, r0 - 1, c1] - s[:, r1, c0 - 1] + s[:, r0 - 1, c0 - 1]
    torch.testing.assert_close(box, x[:, r0:r1 + 1, c0:c1 + 1].double().sum((1, 2)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_summed_area_table_of_extremes_and_empty(backend):
    """Pixels of +-1e30 and 3e38 among zeros (exact: every sum is one of them, or two of them cancelling to 0 or
    leaving the other); an empty batch writes nothing. (An inf pixel would make NaN across its tile: the in-tile
    prefix is a product with 0/1 matrices, and 0 * inf is NaN.)"""
    x = torch.zeros(1, 20, 20)
    x[0, 3, 17] = 1e30
    x[0, 18, 2] = -1e30
    x[0, 0, 0] = 0.0
    x2 = torch.zeros(1, 20, 20)
    x2[0, 19, 19] = 3e38
    for img in (x, x2):
        s = poisoned(1, 20, 20)
        launch(summed_area, backend, img, s)
        assert torch.equal(s.double(), summed_area_ref(img))
    launch(summed_area, backend, torch.empty(0, 5, 5), torch.empty(0, 5, 5))


def work_dtype(dt):
    """The dtype a kernel computes in for elements of ``dt``: f64 for f64, else f32."""
    return ts.f64 if dt is ts.f64 else ts.f32


def _spread_rows(dst, vec) -> None:
    """dst (R, C) = vec (R,) down every column: dst[r, c] = vec[r]."""
    ts.zero(dst)
    ts.add(dst, dst, ts.per_row(vec))


# ---- 2. power iteration: the dominant eigenpair of a batch of symmetric matrices ------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def power_iteration(A, V, LAM, iters: int, *, BN: int = 32):
    """For each symmetric A[b] (N, N), N <= BN: v <- A v / |A v| for ``iters`` trips from v = (1, ..., 1) over the
    first N entries, then V[b] = v and LAM[b, 0] = v . A v (the Rayleigh quotient). |A v|^2 is a column sum of the
    squares spread down the rows (every element of the vector holds it); padded rows and columns of A read as 0 and
    keep v's padding at 0."""
    b = ts.block_id(0)
    W = work_dtype(A.dtype)
    a = ts.RegTile[W, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    idx = ts.RegVec[ts.i32, BN]()
    ts.arange(idx)
    inside = ts.RegVec[ts.bool_, BN]()
    ts.lt(inside, idx, A.shape[1])
    v, w, nrm = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.where(v, inside, 1.0, 0.0)
    t = ts.RegTile[W, BN, BN]()
    for _ in ts.range(iters):
        ts.mul(t, a, ts.per_col(v))
        ts.row_sum(w, t)                          # w = A v
        _spread_rows(t, w)
        ts.mul(t, t, t)
        ts.col_sum(nrm, t)                        # |w|^2 in every element
        ts.sqrt(nrm, nrm)
        ts.div(v, w, nrm)
    ts.mul(t, a, ts.per_col(v))
    ts.row_sum(w, t)
    ts.mul(w, w, v)                               # v_r (A v)_r
    _spread_rows(t, w)
    lam = ts.RegVec[W, BN]()
    ts.col_sum(lam, t)                            # v . A v in every element
    ts.store(V, v, at=(b, 0))
    ts.store(LAM, lam, at=(b, 0))                 # LAM (B, 1): element 0 only, the rest past the edge


def sym_with_spectrum(rng, eigs) -> torch.Tensor:
    """Q diag(eigs) Q^T for a random orthogonal Q, in float64."""
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((n, n))))
    return q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T


def power_case(rng, ns_and_lead):
    """A (B, N, N) of one N: each matrix's dominant eigenvalue `lead` (either sign) and the others in (-|lead|/2,
    |lead|/2), so 60 trips converge to f32's precision."""
    mats = []
    for n, lead in ns_and_lead:
        rest = rng.uniform(-0.5, 0.5, n - 1) * abs(lead)
        mats.append(sym_with_spectrum(rng, [lead, *rest]))
    return torch.stack(mats)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, BF])
@pytest.mark.parametrize("N", [7, 32, 1, 19])
def test_power_iteration_finds_the_dominant_eigenpair(backend, dtype, N, rng):
    """Ragged N (7, 19 of a 32 tile), a full tile, 1 x 1 matrices; dominant eigenvalues of +3, -250 and 1e-3 (a
    negative one flips v each trip: the Rayleigh quotient still finds it; the vector up to sign)."""
    a = power_case(rng, [(N, 3.0), (N, -250.0), (N, 1e-3)]).to(dtype)
    B = a.shape[0]
    v, lam = poisoned(B, N, dtype=F64 if dtype is F64 else F32), poisoned(B, 1, dtype=F64 if dtype is F64 else F32)
    launch(power_iteration, backend, a, v, lam, 60)
    evals, evecs = torch.linalg.eigh(a.double())
    top = evals.abs().argmax(1)
    want_lam = evals[torch.arange(B), top]
    want_v = evecs[torch.arange(B), :, top]
    t = dict(rtol=1e-10, atol=1e-10) if dtype is F64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lam[:, 0].double(), want_lam, **t)
    sign = torch.sign((v.double() * want_v).sum(1, keepdim=True))
    torch.testing.assert_close(v.double() * sign, want_v, **(t if dtype is F64 else dict(rtol=1e-4, atol=1e-4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_iteration_with_no_trips_and_of_a_zero_matrix(backend):
    """0 trips: v is the start vector and LAM its Rayleigh quotient (the sum of A's entries); a zero matrix gives
    0 / 0 = NaN, not a made-up eigenpair."""
    a = torch.arange(25, dtype=F32).reshape(1, 5, 5)
    a = a + a.transpose(1, 2)
    v, lam = poisoned(1, 5), poisoned(1, 1)
    launch(power_iteration, backend, a, v, lam, 0, BN=16)
    assert torch.equal(v, torch.ones(1, 5)) and lam.item() == a.sum().item()
    v, lam = poisoned(1, 5), poisoned(1, 1)
    launch(power_iteration, backend, torch.zeros(1, 5, 5), v, lam, 3, BN=16)
    assert torch.isnan(v).all() and torch.isnan(lam).all()


# ---- 3. QR by modified Gram-Schmidt in one tile ----------------------------------------------------------------------
def _mgs(a, q, r, n) -> None:
    """Modified Gram-Schmidt of the register tile a (BM, BN) over its first n columns, in place: q (BM, BN) gets
    Q's columns, r (BN, BN) R's rows, a what is left (zeros). Trip j takes column j of the remaining a (a mask picks
    it, a row sum gathers it), writes q_j = a_j / |a_j| into column j of q and r_j = q_j^T a into row j of r (columns
    >= j), and takes q_j r_j off the columns right of j."""
    BM, BN = a.shape
    W = a.dtype
    ts.zero(q)
    ts.zero(r)
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(cols)
    col_j, right = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.bool_, BN]()
    pick, row_j, keep = ts.RegTile[ts.bool_, BM, BN](), ts.RegTile[ts.bool_, BN, BN](), ts.RegTile[ts.bool_, BN, BN]()
    t, qj = ts.RegTile[W, BM, BN](), ts.RegTile[W, BM, BN]()
    u = ts.RegVec[W, BM]()
    nrm, rj = ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    for j in ts.range(n):
        ts.eq(col_j, cols, j)
        ts.gt(right, cols, j)
        ts.fill(pick, True)
        ts.logical_and(pick, pick, ts.per_col(col_j))
        ts.where(t, pick, a, 0.0)
        ts.row_sum(u, t)                              # u = a[:, j]
        _spread_rows(qj, u)
        ts.mul(t, qj, qj)
        ts.col_sum(nrm, t)
        ts.sqrt(nrm, nrm)                             # |u| in every element
        ts.div(qj, qj, ts.per_col(nrm))               # every column of qj is q_j
        ts.where(q, pick, qj, q)
        ts.mul(t, a, qj)
        ts.col_sum(rj, t)                             # rj[c] = q_j . a[:, c]
        ts.eq(row_j, ts.per_row(cols), j)
        ts.ge(keep, ts.per_col(cols), j)
        ts.logical_and(keep, keep, row_j)
        ts.where(r, keep, ts.per_col(rj), r)          # R[j, c] = rj[c] for c >= j
        ts.mul(t, qj, ts.per_col(rj))
        ts.where(t, ts.per_col(right), t, 0.0)
        ts.sub(a, a, t)                               # a[:, c] -= q_j rj[c] for c > j


@ts.kernel(grid=lambda A: (A.shape[0],))
def mgs_qr(A, Q, R, *, BM: int = 32, BN: int = 16):
    """A[b] (M, N) = Q[b] R[b] for M <= BM, N <= BN, M >= N, by modified Gram-Schmidt in one tile (_mgs). R's
    diagonal comes out positive."""
    b = ts.block_id(0)
    W = work_dtype(A.dtype)
    a, q = ts.RegTile[W, BM, BN](), ts.RegTile[W, BM, BN]()
    r = ts.RegTile[W, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    _mgs(a, q, r, A.shape[2])
    ts.store(Q, q, at=(b, 0, 0))
    ts.store(R, r, at=(b, 0, 0))


@ts.kernel(grid=lambda A: (A.shape[0],))
def qr_lstsq(A, Y, X, *, BM: int = 32, BN: int = 16):
    """X[b] (N,) = argmin |A[b] x - Y[b]| for A[b] (M, N) of full column rank: A = Q R (_mgs), z = Q^T y (a column
    sum), then back substitution in a loop counting down from N - 1 to 0: x_j = (z_j - sum_{c > j} R[j, c] x_c) /
    R[j, j], row j of R picked out by a mask; x's entries past N stay 0."""
    b = ts.block_id(0)
    W = work_dtype(A.dtype)
    a, q = ts.RegTile[W, BM, BN](), ts.RegTile[W, BM, BN]()
    r = ts.RegTile[W, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    n = A.shape[2]
    _mgs(a, q, r, n)
    y = ts.RegVec[W, BM]()
    ts.load(y, Y, at=(b, 0))
    z = ts.RegVec[W, BN]()
    ts.mul(q, q, ts.per_row(y))
    ts.col_sum(z, q)                                  # z = Q^T y
    idx = ts.RegVec[ts.i32, BN]()
    ts.arange(idx)
    x, s, d, xj = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.zero(x)
    row_j, diag = ts.RegTile[ts.bool_, BN, BN](), ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(diag, ts.per_row(idx), ts.per_col(idx))
    t = ts.RegTile[W, BN, BN]()
    ts.where(t, diag, r, 0.0)
    ts.row_sum(d, t)                                  # d[j] = R[j, j]
    at_j = ts.RegVec[ts.bool_, BN]()
    for j in ts.range(n - 1, -1, -1):
        ts.eq(row_j, ts.per_row(idx), j)
        ts.mul(t, r, ts.per_col(x))                   # x is 0 at j and left of it: only c > j count
        ts.where(t, row_j, t, 0.0)
        ts.row_sum(s, t)                              # s[j] = sum_{c > j} R[j, c] x_c (0 elsewhere)
        ts.sub(xj, z, s)
        ts.div(xj, xj, d)
        ts.eq(at_j, idx, j)
        ts.where(x, at_j, xj, x)
    ts.store(X, x, at=(b, 0))

def qr_case(rng, B, M, N, dtype):
    """B tall matrices (M, N) of full column rank: one with a column scaled by 1e3, one with two nearly parallel
    columns (angle 1e-2) where classical Gram-Schmidt would lose orthogonality faster."""
    a = torch.from_numpy(rng.standard_normal((B, M, N)))
    if N > 1:
        a[0, :, 0] *= 1e3
        if B > 1:
            a[1, :, 1] = a[1, :, 0] + 1e-2 * a[1, :, 1]
    return a.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, BF])
@pytest.mark.parametrize(("M", "N"), [(29, 11), (32, 16), (5, 5), (7, 1)])
def test_mgs_qr(backend, dtype, M, N, rng):
    """Q R = A, Q^T Q = I, R upper triangular with a positive diagonal, and (Q, R) equal to LAPACK's with its signs
    made the same; ragged M and N (29 x 11 in a 32 x 16 tile), a full tile, a square matrix, one column."""
    a = qr_case(rng, 3, M, N, dtype)
    wd = F64 if dtype is F64 else F32
    q, r = poisoned(3, M, N, dtype=wd), poisoned(3, N, N, dtype=wd)
    launch(mgs_qr, backend, a, q, r)
    ad = a.double()
    qd, rd = q.double(), r.double()
    scale = ad.abs().amax((1, 2), keepdim=True)
    t = 1e-11 if dtype is F64 else 2e-5
    torch.testing.assert_close((qd @ rd) / scale, ad / scale, rtol=0, atol=t * 10)
    eye = torch.eye(N, dtype=F64).expand(3, N, N)
    torch.testing.assert_close(qd.transpose(1, 2) @ qd, eye, rtol=0, atol=1e-9 if dtype is F64 else 2e-3)
    assert (torch.triu(rd) == rd).all() and (torch.diagonal(rd, dim1=1, dim2=2) > 0).all()
    q0, r0 = torch.linalg.qr(ad)
    s = torch.sign(torch.diagonal(r0, dim1=1, dim2=2))
    torch.testing.assert_close(rd / scale, r0 * s[:, :, None] / scale, rtol=0, atol=t * 10)
    torch.testing.assert_close(qd[0], q0[0] * s[0], rtol=0, atol=1e-9 if dtype is F64 else 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("M", "N"), [(29, 11), (16, 16), (9, 1), (32, 3)])
def test_qr_least_squares_by_back_substitution(backend, dtype, M, N, rng):
    """Against LAPACK's least squares in f64: ragged M and N, square, one column; the right-hand side off A's
    range (a residual), and one in it exactly (the solution recovered)."""
    a = qr_case(rng, 3, M, N, dtype)
    a[0, :, 0] /= 1e3 if N > 1 else 1.0               # (qr_case's 1e3 column: keep the solution's scale moderate)
    y = randn(rng, 3, M, dtype=dtype)
    x_true = torch.from_numpy(rng.standard_normal((N,))).to(dtype)
    y[2] = (a[2].double() @ x_true.double()).to(dtype)
    x = poisoned(3, N, dtype=dtype)
    launch(qr_lstsq, backend, a, y, x)
    want = torch.linalg.lstsq(a.double(), y.double()[..., None]).solution[..., 0]
    t = dict(rtol=1e-9, atol=1e-9) if dtype is F64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.double(), want, **t)
    torch.testing.assert_close(x[2].double(), x_true.double(), **t)


# ---- 4. suffix sums by column tile, the tiles walked backwards by a constant step ---------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def suffix_tile_sums(X, Y, *, BM: int = 16, BN: int = 32, STEP: int = 1):
    """Y[j, r] = the sum of X[r] over column tiles j, j + STEP, ... (to the last tile), for the tiles j the loop
    visits: from the last tile down to 0 by -STEP, X staged through a shared tile; the other rows of Y are not
    written."""
    i = ts.block_id(0)
    x = ts.SharedTile[X.dtype, BM, BN]()
    xr = ts.RegTile[ts.f32, BM, BN]()
    acc = ts.RegVec[ts.f32, BM]()
    ts.zero(acc)
    for j in ts.range(ts.cdiv(X.shape[1], BN) - 1, -1, -STEP):
        ts.load(x, X, at=(i, j))
        ts.load(xr, x)
        ts.row_sum(acc, xr, acc)
        out = ts.RegVec[Y.dtype, BM]()
        ts.copy(out, acc)
        ts.store(Y, out, at=(j, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize(("M", "N", "dtype"), [(37, 300, BF), (5, 32, F32), (3, 0, F32)])
def test_suffix_tile_sums_walked_backwards(backend, step, M, N, dtype, rng):
    """Ragged last tiles (300 in 32s: 10 tiles, the last of 12 columns), steps that do not divide the tile count
    (the loop ends at tile 1 or 0), one tile, no tiles (no trips: Y untouched)."""
    x = randn(rng, M, N, dtype=dtype)
    nt = -(-N // 32)
    y = poisoned(max(nt, 1), M)
    launch(suffix_tile_sums, backend, x, y, STEP=step)
    want = torch.full((max(nt, 1), M), math.nan, dtype=F64)
    for j in range(nt - 1, -1, -step):
        want[j] = sum(x[:, k * 32:(k + 1) * 32].double().sum(1) for k in range(j, nt, step))
    close(y, want, dtype=F32, scale=10)
