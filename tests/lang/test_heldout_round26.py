"""Round 26 of held-out kernels (after rounds 2-25): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch (or exact integers), outputs poisoned with NaN (or a
sentinel) first, ragged sizes, seeds fixed (the ``rng`` fixture of this file).

- A CSR sparse x dense product (SpMM): one program per (sparse row, column tile of the dense matrix), its loop bounds
  the row's [ROWPTR[r], ROWPTR[r + 1]) read with load_scalar, each nonzero's column index and value read with
  load_scalar, the dense row picked by the column index as the element coordinate of a vector load; i32 and i64
  index tensors, empty rows, duplicate column indices (summed, as torch's CSR product sums them), an all-empty matrix
  (nnz = 0), NaN rows of the dense matrix no nonzero refers to (must not leak in).
- Distance covariance / correlation (Szekely's dCov^2, dVar^2, dCor^2) of a batch of paired samples, in two launches:
  the row means of the |x_i - x_j| distance matrices (also its column means, by symmetry), then the double-centred
  products A_ij B_ij summed over every tile pair, the grand mean made in registers from the row means (a column
  broadcast reduced along rows); reductions along both axes, per_row / per_col broadcasts, ragged edges masked to 0
  (a padded x reads as 0, whose distance to the samples is not 0).
- A number divided by a tile (``c / t``, operator sugar) of a 16-bit float or 8-bit integer tile: the number was
  first stored in a tile of t's dtype (0.1 rounded to bf16, 300 wrapped to u8) and then divided, rounding twice (or
  wrapping the numerator); now one rounding, as ``t * c`` and ``c - t`` have (fixed this round, lang/tiles.py).

- Log-domain Sinkhorn (entropic optimal transport) of a batch of small cost matrices, the whole matrix in one tile:
  a run-time number of rounds, each a log-sum-exp along the rows and then along the columns with the potentials
  carried as vectors of both orientations; padded rows and columns at -inf, their maxima held finite so that no
  inf - inf appears; 0 rounds, one point, eps from 1 down to 0.01
  (costs / eps of 100).
- Kahan-compensated row sums over column tiles (the running sum and compensation carried as tiles), beside the plain
  sum in a second output of the same launch: the compensation must survive the backends (no reassociation), a sum of
  1 and 3999 terms of 1e-8 within 2 ulp where the plain f32 sum loses all of them.

test_heldout_round26_more.py has more kernels of this round, the misuse checks and the sm_90a compiles.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32
U8, I8 = torch.uint8, torch.int8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262601)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. CSR sparse x dense ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda ROWPTR, B, BN: (ROWPTR.shape[0] - 1, ts.cdiv(B.shape[1], BN)))
def csr_spmm(ROWPTR, COL, VAL, B, C, *, BN: int = 16):
    """C (M, N) = S @ B for the CSR matrix S (ROWPTR (M + 1,), COL and VAL (nnz,)) and B (K, N); accumulates in f32
    (f64 for an f64 B)."""
    r, j = ts.block_id(0), ts.block_id(1)
    start, end = ts.load_scalar(ROWPTR, r), ts.load_scalar(ROWPTR, r + 1)
    W = ts.f64 if B.dtype is ts.f64 else ts.f32
    acc, row = ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.zero(acc)
    for k in ts.range(start, end):
        c = ts.load_scalar(COL, k)
        v = ts.load_scalar(VAL, k)
        ts.load(row, B, at=(c, j))                    # row c of B (an element coordinate), column tile j
        ts.mul(row, row, v)
        ts.add(acc, acc, row)
    out = ts.RegVec[C.dtype, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(r, j))


def csr_of(dense: torch.Tensor, idx_dtype) -> tuple:
    """(rowptr, col, val) of ``dense`` (M, K), in ``idx_dtype`` and dense's dtype."""
    m = dense.shape[0]
    nz = dense.nonzero()
    counts = torch.bincount(nz[:, 0], minlength=m)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return rowptr.to(idx_dtype), nz[:, 1].to(idx_dtype).contiguous(), dense[nz[:, 0], nz[:, 1]].contiguous()


def spmm_ref(rowptr, col, val, b) -> torch.Tensor:
    m = rowptr.shape[0] - 1
    out = torch.zeros(m, b.shape[1], dtype=F64)
    for r in range(m):
        for k in range(int(rowptr[r]), int(rowptr[r + 1])):
            out[r] += float(val[k]) * b[int(col[k])].double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF, F16, F64])
@pytest.mark.parametrize("idx_dtype", [I32, I64])
@pytest.mark.parametrize(("M", "K", "N"), [(9, 13, 21), (1, 1, 1), (4, 30, 16), (6, 5, 40)])
def test_csr_spmm(backend, dtype, idx_dtype, M, K, N, rng):
    dense = torch.from_numpy(rng.standard_normal((M, K)) * (rng.random((M, K)) < 0.35)).to(dtype)
    if M > 2:
        dense[1] = 0                                  # an empty row: C's row is 0
        dense[2, K - 1] = 2.5                         # the last row of B
    rowptr, col, val = csr_of(dense, idx_dtype)
    b = randn(rng, K, N, dtype=dtype)
    c = poisoned(M, N, dtype=dtype)
    launch(csr_spmm, backend, rowptr, col, val, b, c)
    # load_scalar keeps an f64 element f64 where f64 work takes it (session 32; it was rounded to f32 before, which
    # this test once pinned by rounding the reference's values too)
    want = spmm_ref(rowptr, col, val, b)
    close(c, want, scale=math.sqrt(K))
    if M > 2:
        assert (c[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_spmm_duplicates_unreferenced_nan_and_empty(backend):
    """Duplicate (row, column) entries are summed; B's rows no nonzero names are NaN and must not reach C; a
    row's nonzeros in any column order; nnz = 0 gives zeros; M = 0 launches nothing."""
    b = torch.arange(20, dtype=F32).view(5, 4) + 1
    b[1] = math.nan
    b[3] = math.inf
    rowptr = torch.tensor([0, 3, 3, 5], dtype=I32)
    col = torch.tensor([4, 0, 4, 2, 0], dtype=I32)
    val = torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0])
    c = poisoned(3, 4)
    launch(csr_spmm, backend, rowptr, col, val, b, c)
    want = torch.stack([2 * b[0], torch.zeros(4), 0.5 * b[2] + b[0]])  # row 0: b4 - b4 + 2 b0 (exact)
    assert torch.equal(c, want), c
    c0 = poisoned(3, 4)
    launch(csr_spmm, backend, torch.zeros(4, dtype=I64), torch.zeros(0, dtype=I64), torch.zeros(0), b, c0)
    assert (c0 == 0).all()
    launch(csr_spmm, backend, torch.zeros(1, dtype=I32), torch.zeros(0, dtype=I32), torch.zeros(0), b,
           torch.empty(0, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_spmm_value_times_inf_is_nan_only_where_referenced(backend):
    """A nonzero of value 0.0 stored explicitly against an inf row gives NaN (0 * inf);
    the same row not referenced leaves C finite."""
    b = torch.ones(3, 4)
    b[2, 1] = math.inf
    rowptr = torch.tensor([0, 1, 2], dtype=I64)
    col = torch.tensor([2, 0], dtype=I64)
    val = torch.tensor([0.0, 3.0])
    c = poisoned(2, 4)
    launch(csr_spmm, backend, rowptr, col, val, b, c)
    want = spmm_ref(rowptr, col, val, b).float()
    assert torch.isnan(c[0, 1]) and torch.isnan(want[0, 1])
    torch.testing.assert_close(c, want, equal_nan=True)


# ---- 2. distance covariance / correlation of paired samples -------------------------------------------------------
def _inside(i, j, n, BM: int, BN: int):
    """(BM, BN) mask of the elements of tile (i, j) inside the n x n matrix."""
    r, c = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BN]()
    ts.arange(r, i * BM)
    ts.arange(c, j * BN)
    rin, cin = ts.RegVec[ts.bool_, BM](), ts.RegVec[ts.bool_, BN]()
    ts.lt(rin, r, n)
    ts.lt(cin, c, n)
    inside = ts.RegTile[ts.bool_, BM, BN]()
    ts.fill(inside, True)
    ts.logical_and(inside, inside, ts.per_row(rin))
    ts.logical_and(inside, inside, ts.per_col(cin))
    return inside


def _distances(d, X, b, i, j, n, BM: int, BN: int) -> None:
    """d (BM, BN) = |X[b, i-th BM rows] - X[b, j-th BN columns]|, 0 outside the n x n matrix."""
    xi, xj = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BN]()
    ts.load(xi, X, at=(b, i))
    ts.load(xj, X, at=(b, j))
    ts.zero(d)
    ts.add(d, d, ts.per_row(xi))
    ts.sub(d, d, ts.per_col(xj))
    ts.abs(d, d)
    ts.where(d, _inside(i, j, n, BM, BN), d, 0.0)


@ts.kernel(grid=lambda X, BM: (X.shape[0], ts.cdiv(X.shape[1], BM)))
def distance_row_means(X, Y, MX, MY, *, BM: int = 16, BN: int = 16):
    """MX[b, i] = mean_j |X[b, i] - X[b, j]| (and MY of Y): the row (and, by symmetry, column) means."""
    b, i = ts.block_id(0), ts.block_id(1)
    n = X.shape[1]
    d = ts.RegTile[ts.f32, BM, BN]()
    for src, dst in ((X, MX), (Y, MY)):
        m = ts.RegVec[ts.f32, BM]()
        ts.zero(m)
        for j in ts.range(ts.cdiv(n, BN)):
            _distances(d, src, b, i, j, n, BM, BN)
            ts.row_sum(m, d, m)
        ts.div(m, m, n)
        ts.store(dst, m, at=(b, i))


@ts.kernel(grid=lambda X: (X.shape[0],))
def distance_correlation(X, Y, MX, MY, OUT, *, BM: int = 16, BN: int = 16):
    """OUT[b] = (dCov^2, dVar^2(X), dVar^2(Y), dCor^2) of the samples X[b], Y[b] (n each): A_ij = a_ij - a_i. -
    a_.j + a_.. (and B), dCov^2 = mean(A B), dCor^2 = dCov^2 / sqrt(dVar^2(X) dVar^2(Y)), 0 where that is 0."""
    b = ts.block_id(0)
    n = X.shape[1]
    gx, gy = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()    # every element: the grand mean
    spread = ts.RegTile[ts.f32, BM, BN]()
    mj = ts.RegVec[ts.f32, BN]()
    for means, g in ((MX, gx), (MY, gy)):
        ts.zero(g)
        for j in ts.range(ts.cdiv(n, BN)):
            ts.load(mj, means, at=(b, j))             # past n: 0
            ts.zero(spread)
            ts.add(spread, spread, ts.per_col(mj))
            ts.row_sum(g, spread, g)
        ts.div(g, g, n)
    sxy, sxx, syy = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    for s in (sxy, sxx, syy):
        ts.zero(s)
    dx, dy, p = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    mxi, myi = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    mxj, myj = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    for i in ts.range(ts.cdiv(n, BM)):
        ts.load(mxi, MX, at=(b, i))
        ts.load(myi, MY, at=(b, i))
        ts.sub(mxi, mxi, gx)                          # a_i. - a_..
        ts.sub(myi, myi, gy)
        for j in ts.range(ts.cdiv(n, BN)):
            ts.load(mxj, MX, at=(b, j))
            ts.load(myj, MY, at=(b, j))
            _distances(dx, X, b, i, j, n, BM, BN)
            _distances(dy, Y, b, i, j, n, BM, BN)
            ts.sub(dx, dx, ts.per_row(mxi))
            ts.sub(dx, dx, ts.per_col(mxj))
            ts.sub(dy, dy, ts.per_row(myi))
            ts.sub(dy, dy, ts.per_col(myj))
            inside = _inside(i, j, n, BM, BN)         # the padding holds -(means) now: keep it out of the sums
            ts.where(dx, inside, dx, 0.0)
            ts.where(dy, inside, dy, 0.0)
            ts.mul(p, dx, dy)
            ts.row_sum(sxy, p, sxy)
            ts.mul(p, dx, dx)
            ts.row_sum(sxx, p, sxx)
            ts.mul(p, dy, dy)
            ts.row_sum(syy, p, syy)
    cov, vx, vy = ts.RegVec[ts.f32, 1](), ts.RegVec[ts.f32, 1](), ts.RegVec[ts.f32, 1]()
    one_row = ts.RegTile[ts.f32, 1, BM]()
    for k, (s, total) in enumerate(((sxy, cov), (sxx, vx), (syy, vy))):
        ts.zero(one_row)
        ts.add(one_row, one_row, ts.per_col(s))
        ts.row_sum(total, one_row)
        ts.div(total, total, n * n)
        ts.store(OUT, total, at=(b, k))
    den, r = ts.RegVec[ts.f32, 1](), ts.RegVec[ts.f32, 1]()
    pos = ts.RegVec[ts.bool_, 1]()
    ts.mul(den, vx, vy)
    ts.sqrt(den, den)
    ts.gt(pos, den, 0.0)
    ts.where(den, pos, den, 1.0)
    ts.div(r, cov, den)
    ts.where(r, pos, r, 0.0)
    ts.store(OUT, r, at=(b, 3))


def dcor_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def centred(v):
        a = (v.double()[:, :, None] - v.double()[:, None, :]).abs()
        return a - a.mean(2, keepdim=True) - a.mean(1, keepdim=True) + a.mean((1, 2), keepdim=True)
    a, b = centred(x), centred(y)
    cov, vx, vy = (a * b).mean((1, 2)), (a * a).mean((1, 2)), (b * b).mean((1, 2))
    den = (vx * vy).sqrt()
    r = torch.where(den > 0, cov / torch.where(den > 0, den, 1.0), 0.0)
    return torch.stack([cov, vx, vy, r], 1)


def run_dcor(backend, x, y, **consts):
    bt, n = x.shape
    mx, my = poisoned(bt, n), poisoned(bt, n)
    launch(distance_row_means, backend, x, y, mx, my, **consts)
    d = x.double()
    torch.testing.assert_close(mx.double(), (d[:, :, None] - d[:, None, :]).abs().mean(2), rtol=1e-5, atol=1e-5)
    out = poisoned(bt, 4)
    launch(distance_correlation, backend, x, y, mx, my, out, **consts)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Bt", "N"), [(3, 37), (1, 1), (2, 16), (2, 50), (1, 2)])
@pytest.mark.parametrize(("BM", "BN"), [(16, 16), (32, 16)])
def test_distance_correlation(backend, Bt, N, BM, BN, rng):
    x = randn(rng, Bt, N)
    y = x ** 2 + 0.3 * randn(rng, Bt, N)              # dependent but uncorrelated: dCor sees it
    out = run_dcor(backend, x, y, BM=BM, BN=BN)
    torch.testing.assert_close(out.double(), dcor_ref(x, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distance_correlation_extremes(backend, rng):
    """y = 3x + 1 has dCor^2 = 1; a constant y has dVar^2 = 0 and dCor^2 = 0 (not 0/0); bf16 and f16 samples
    (converted exactly into the f32 work); samples offset by 1e3 (distances do not see the offset)."""
    x = randn(rng, 3, 29)
    y = 3 * x + 1
    y[1] = 7.0
    out = run_dcor(backend, x, y)
    torch.testing.assert_close(out.double(), dcor_ref(x, y), rtol=1e-4, atol=1e-5)
    assert abs(out[0, 3].item() - 1) < 1e-5 and out[1, 2].item() == 0 and out[1, 3].item() == 0
    for dt in (BF, F16):
        xs, ys = x.to(dt), (x * x).to(dt)
        torch.testing.assert_close(run_dcor(backend, xs, ys).double(), dcor_ref(xs, ys), rtol=1e-4, atol=1e-5)
    shifted = run_dcor(backend, x + 1e3, y - 1e3)
    torch.testing.assert_close(shifted.double(), dcor_ref(x, y), rtol=1e-3, atol=1e-3)


# ---- 3. a number divided by a tile: one rounding ---------------------------------------------------------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def number_over_tile(X, Y, c: float, *, BN: int = 64):
    """Y[0] = 0.1 / x, Y[1] = c / x (c a run-time float), Y[2] = 2.7 - x, Y[3] = x ** -1, in x's dtype."""
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.store(Y, 0.1 / x, at=(0, i))
    ts.store(Y, c / x, at=(1, i))
    ts.store(Y, 2.7 - x, at=(2, i))
    ts.store(Y, x ** -1, at=(3, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF, F16, F32, F64])
def test_a_number_over_a_16bit_tile_rounds_once(backend, dtype):
    """As torch's opmath: the quotient of the f32 number (f64 for f64) and the f32 value of x, rounded once into
    x's dtype. Before the fix 0.1 / x on bf16 was bf16(bf16(0.1) / x): 25 of these 200 were 1 ulp off."""
    x = torch.linspace(0.5, 9.5, 200, dtype=F64).to(dtype)
    work = F64 if dtype is F64 else F32
    xw = x.to(work)
    y = poisoned(4, 200, dtype=dtype)
    launch(number_over_tile, backend, x, y, 0.3)
    c = torch.tensor(0.3, dtype=F64).to(work)
    for k, want in enumerate((torch.tensor(0.1, dtype=F64).to(work) / xw, c / xw,
                              torch.tensor(2.7, dtype=F64).to(work) - xw, 1 / xw)):
        assert torch.equal(y[k], want.to(dtype)), (k, (y[k] != want.to(dtype)).sum())


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def int_over_tile(X, Y, n: int, *, BN: int = 16):
    """Y[0] = 300 / x, Y[1] = n / x, Y[2] = -1000 / x: quotients truncated toward zero in the integer work (i32 for
    i8 and u8 tiles), then wrapped into x's dtype."""
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.store(Y, 300 / x, at=(0, i))
    ts.store(Y, n / x, at=(1, i))
    ts.store(Y, -1000 / x, at=(2, i))


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [U8, I8, I32, I64])
def test_a_number_over_an_integer_tile_is_not_wrapped_first(backend, dtype):
    """300 / x for a u8 tile: 300 // x, then wrapped into u8 (before the fix 300 was wrapped to 44 first)."""
    vals = [1, 2, 3, 7, 100, 200, 255, 9] if dtype is U8 else [1, 2, 3, 7, 100, 127, -1, -5]
    x = torch.tensor(vals, dtype=dtype)
    bits = torch.iinfo(dtype).bits

    def into(v: int) -> int:
        return v % 256 if dtype is U8 else (v + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)

    want = torch.tensor([[into(_trunc_div(c, v)) for v in vals] for c in (300, 1000, -1000)], dtype=dtype)
    y = torch.full((3, len(vals)), 99, dtype=dtype)
    launch(int_over_tile, backend, x, y, 1000)
    assert torch.equal(y, want), (y, want)


# ---- 4. log-domain Sinkhorn ------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda C: (C.shape[0],))
def sinkhorn_log(C, LA, LB, P, iters: int, eps: float, *, BM: int = 32, BN: int = 32):
    """For each batch b, C (B, M, N) costs and LA (B, M), LB (B, N) log marginals: ``iters`` rounds of f = LA -
    LSE_j(g_j - C_ij / eps), then g = LB - LSE_i(f_i - C_ij / eps), from f = g = 0; P = exp(f_i + g_j - C_ij / eps).
    M <= BM and N <= BN (one tile); padded rows and columns held at -inf."""
    b = ts.block_id(0)
    M, N = C.shape[1], C.shape[2]
    k = ts.RegTile[ts.f32, BM, BN]()
    ts.load(k, C, at=(b, 0, 0))
    ts.mul(k, k, -1.0 / eps)                          # -C / eps (1.0 / eps: a float Scalar)
    r, c = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BN]()
    ts.arange(r)
    ts.arange(c)
    rin, cin = ts.RegVec[ts.bool_, BM](), ts.RegVec[ts.bool_, BN]()
    ts.lt(rin, r, M)
    ts.lt(cin, c, N)
    inside = ts.RegTile[ts.bool_, BM, BN]()
    ts.fill(inside, True)
    ts.logical_and(inside, inside, ts.per_row(rin))
    ts.logical_and(inside, inside, ts.per_col(cin))
    ts.where(k, inside, k, -math.inf)
    la, lb = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BN]()
    ts.load(la, LA, at=(b, 0))
    ts.load(lb, LB, at=(b, 0))
    f, g = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BN]()
    ts.zero(f)
    ts.zero(g)
    t = ts.RegTile[ts.f32, BM, BN]()
    mr, mc = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BN]()
    for _ in ts.range(iters):
        ts.add(t, k, ts.per_col(g))
        ts.row_max(mr, t)
        ts.where(mr, rin, mr, 0.0)                    # a padded row is all -inf: its max held finite
        ts.sub(t, t, ts.per_row(mr))
        ts.exp(t, t)
        ts.row_sum(f, t)
        ts.log(f, f)
        ts.add(f, f, mr)
        ts.sub(f, la, f)
        ts.where(f, rin, f, -math.inf)
        ts.add(t, k, ts.per_row(f))
        ts.col_max(mc, t)
        ts.where(mc, cin, mc, 0.0)
        ts.sub(t, t, ts.per_col(mc))
        ts.exp(t, t)
        ts.col_sum(g, t)
        ts.log(g, g)
        ts.add(g, g, mc)
        ts.sub(g, lb, g)
        ts.where(g, cin, g, -math.inf)
    ts.add(t, k, ts.per_row(f))
    ts.add(t, t, ts.per_col(g))
    ts.exp(t, t)
    out = ts.RegTile[P.dtype, BM, BN]()
    ts.copy(out, t)
    ts.store(P, out, at=(b, 0, 0))


def sinkhorn_ref(c, la, lb, iters: int, eps: float) -> torch.Tensor:
    k = -c.double() / eps
    f, g = torch.zeros(la.shape, dtype=F64), torch.zeros(lb.shape, dtype=F64)
    for _ in range(iters):
        f = la.double() - torch.logsumexp(k + g[:, None, :], 2)
        g = lb.double() - torch.logsumexp(k + f[:, :, None], 1)
    return torch.exp(k + f[:, :, None] + g[:, None, :])


def log_marginal(rng, *shape) -> torch.Tensor:
    w = torch.from_numpy(rng.random(shape) + 0.1)
    return (w / w.sum(-1, keepdim=True)).log().float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "M", "N", "iters", "eps", "out_dtype"),
                         [(2, 7, 11, 6, 0.1, F32), (1, 1, 1, 3, 1.0, BF), (3, 32, 17, 0, 0.5, F32),
                          (1, 19, 32, 8, 0.01, F32), (1, 5, 3, 4, 0.2, BF)])
def test_log_domain_sinkhorn(backend, B, M, N, iters, eps, out_dtype, rng):
    c = torch.from_numpy(rng.random((B, M, N))).float()
    la, lb = log_marginal(rng, B, M), log_marginal(rng, B, N)
    p = poisoned(B, M, N, dtype=out_dtype)
    launch(sinkhorn_log, backend, c, la, lb, p, iters, eps)
    want = sinkhorn_ref(c, la, lb, iters, eps)
    assert torch.isfinite(p).all()
    close(p, want, scale=1e-1 if out_dtype is F32 else 1.0)
    if iters and out_dtype is F32:                    # after a g update the column marginals hold
        torch.testing.assert_close(p.double().sum(1), lb.double().exp(), rtol=1e-5, atol=1e-6)


# ---- 5. Kahan-compensated row sums -----------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def kahan_row_sum(X, S, NAIVE, *, BM: int = 4, BN: int = 32):
    """S[r] = sum_c X[r, c] with Kahan compensation per lane (the BN columns of a tile), the lanes' sums and
    compensations reduced at the end; NAIVE[r] = the plain f32 sum."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    s, c, y, t = (ts.RegTile[ts.f32, BM, BN]() for _ in range(4))
    naive = ts.RegVec[ts.f32, BM]()
    ts.zero(s)
    ts.zero(c)
    ts.zero(naive)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.row_sum(naive, x, naive)
        ts.sub(y, x, c)                               # y = x - c
        ts.add(t, s, y)                               # t = s + y
        ts.sub(c, t, s)
        ts.sub(c, c, y)                               # c = (t - s) - y: what t lost of y
        ts.copy(s, t)
    total, comp = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    ts.row_sum(total, s)
    ts.row_sum(comp, c)
    ts.sub(total, total, comp)
    ts.store(S, total, at=(i,))
    ts.store(NAIVE, naive, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_row_sum_keeps_what_the_plain_sum_loses(backend, rng):
    M, N = 5, 4001
    x = torch.full((M, N), 1e-8)
    x[:, 0] = 1.0                                     # 1 + 4000e-8: each 1e-8 is below half an ulp of 1
    x[1] = randn(rng, N)
    x[2, ::2], x[2, 1::2] = 1e4, 1e-3
    x[3] = 0.0
    x[4, 5] = math.inf
    s, naive = poisoned(M), poisoned(M)
    launch(kahan_row_sum, backend, x, s, naive)
    want = x.double().sum(1)
    ulp = 2.0**-23
    assert abs(s[0].item() - want[0].item()) <= 2 * ulp, s[0].item() - want[0].item()
    assert abs(naive[0].item() - want[0].item()) > 30 * ulp   # the plain sum lost them (the test can fail)
    torch.testing.assert_close(s[1:3].double(), want[1:3], rtol=4 * ulp, atol=1e-5)
    assert s[3].item() == 0 and math.isnan(s[4].item())      # inf - inf in the compensation: NaN, as Kahan's is


@ts.kernel(grid=(1,))
def vector_over_tile(X, V, Y, Z, *, BM: int = 4, BN: int = 8):
    """Y = per_row(V) / X (a marked vector over a tile, 16-bit X rounding once) and Z = -0.0 / X (the sign kept)."""
    x = ts.RegTile[X.dtype, BM, BN]()
    v = ts.RegVec[X.dtype, BM]()
    ts.load(x, X, at=(0, 0))
    ts.load(v, V, at=(0,))
    ts.store(Y, ts.per_row(v) / x, at=(0, 0))
    ts.store(Z, -0.0 / x, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF])
def test_a_marked_vector_or_negative_zero_over_a_tile(backend, dtype):
    x = (torch.arange(1, 33, dtype=F32).view(4, 8) * 0.37).to(dtype)
    v = torch.tensor([1.0, 0.1, -3.0, 7.7]).to(dtype)
    y, z = poisoned(4, 8, dtype=dtype), poisoned(4, 8, dtype=dtype)
    launch(vector_over_tile, backend, x, v, y, z)
    assert torch.equal(y, (v.float()[:, None] / x.float()).to(dtype))
    assert (z == 0).all() and torch.signbit(z).all()
