"""Round 30 of held-out kernels (after rounds 2-29): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch (or exact integers), outputs poisoned with NaN (or a
sentinel) first, ragged sizes (not tile multiples), seeds fixed (the ``rng`` fixture of this file).

- Softened gravitational accelerations of an N-body system (a_i = sum_j m_j (x_j - x_i) / (|x_j - x_i|^2 + eps^2)^1.5):
  positions read as three coordinate vectors through the transposed view of P (N, 3), the pair terms a (BI, BJ) tile
  from per_row / per_col broadcasts, the self pair masked by index so that eps = 0 is exact; coincident bodies.
- Black-Scholes prices of European calls and puts (the normal CDF by Abramowitz-Stegun 26.2.17, its odd symmetry by
  where), r and sigma runtime floats; deep in and out of the money, f32 / f64 / f16 / bf16 inputs.
- A bilateral filter along rows (radius R a constant, spatial and range Gaussians): the 2R + 1 shifted neighbours
  read through a (2R + 1, M, N) overlapping view of the NaN-padded rows, the padding masked by column index before
  any arithmetic (NaN there must not leak); step edges kept; f32 / f64 / f16 / bf16.
- A Kronecker product (torch.kron) by one program per element of A: B's tile scaled by load_scalar(A, i, j) and
  stored through the (m, n, p, q) permuted view of C; f32 / f64 / i32 / i64 (exact, past 2**31).
- The triplet margin loss per row (F.triplet_margin_loss, reduction="none", torch's eps added to each difference,
  swap as a constant) over D wider than a tile; f32 / f64 / f16 / bf16.
- Clenshaw's evaluation of Chebyshev series (numpy.polynomial.chebyshev.chebval), each row its own coefficients, the
  degree a runtime loop walked down by load_scalar; one coefficient, x outside [-1, 1], f32 / f64.
- The 32-bit FNV-1a hash of byte strings of per-row lengths (u8 rows, the multiply kept in i64 and masked to 32
  bits), written as i64 and wrapped into i32; empty strings (the offset basis).
More kernels of this round, the misuse checks and the source checks are in test_heldout_round30_more.py.
What this round found (test_heldout_round30_more.py's docstring has the details): kron and Clenshaw in f64 were off by
4e-8 relative on every backend, load_scalar having read each f64 element as its f32; fixed (ir.scalars.f64_floats).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn, wrap

import tilestack.lang as ts

F32, U8 = torch.float32, torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20263001)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def _work(dtype):
    return ts.f64 if dtype is ts.f64 else ts.f32


# ---- 1. N-body accelerations ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda PT, BI: (ts.cdiv(PT.shape[1], BI),))
def nbody_accel(PT, MASS, AT, eps: float, *, BI: int = 16, BJ: int = 16):
    """AT (3, N) = the accelerations of bodies at PT (3, N) (the transposed views of (N, 3) tensors), masses MASS (N,),
    softened by eps (the self pair never counted)."""
    b = ts.block_id(0)
    n = PT.shape[1]
    W = _work(PT.dtype)
    xi = [ts.RegVec[W, BI]() for _ in range(3)]
    for d in range(3):
        ts.load(xi[d], PT, at=(d, b))
    rows, cols = ts.RegVec[ts.i32, BI](), ts.RegVec[ts.i32, BJ]()
    ts.arange(rows, b * BI)
    xj = [ts.RegVec[W, BJ]() for _ in range(3)]
    m = ts.RegVec[W, BJ]()
    acc = [ts.RegVec[W, BI]() for _ in range(3)]
    for d in range(3):
        ts.zero(acc[d])
    dx = [ts.RegTile[W, BI, BJ]() for _ in range(3)]
    r2, inv, t = ts.RegTile[W, BI, BJ](), ts.RegTile[W, BI, BJ](), ts.RegTile[W, BI, BJ]()
    other = ts.RegTile[ts.bool_, BI, BJ]()
    for j in ts.range(ts.cdiv(n, BJ)):
        ts.arange(cols, j * BJ)
        ts.load(m, MASS, at=(j,))                      # 0 past N: those bodies weigh nothing
        ts.fill(r2, eps * eps)
        for d in range(3):
            ts.load(xj[d], PT, at=(d, j))
            ts.zero(dx[d])
            ts.add(dx[d], dx[d], ts.per_col(xj[d]))
            ts.sub(dx[d], dx[d], ts.per_row(xi[d]))    # (BI, BJ): x_j - x_i
            ts.mul(t, dx[d], dx[d])
            ts.add(r2, r2, t)
        ts.ne(other, ts.per_row(rows), ts.per_col(cols))
        ts.where(r2, other, r2, 1.0)                   # the self pair: any finite r2, its weight is zeroed below
        ts.rsqrt(inv, r2)
        ts.mul(t, inv, inv)
        ts.mul(inv, t, inv)                            # r^-3
        ts.mul(inv, inv, ts.per_col(m))
        ts.where(inv, other, inv, 0.0)
        for d in range(3):
            ts.mul(t, dx[d], inv)
            ts.row_sum(acc[d], t, acc[d])
    out = ts.RegVec[AT.dtype, BI]()
    for d in range(3):
        ts.copy(out, acc[d])
        ts.store(AT, out, at=(d, b))


def _nbody_want(p, m, eps):
    p, m = p.double(), m.double()
    d = p[None, :, :] - p[:, None, :]                   # (N, N, 3): x_j - x_i
    r2 = (d * d).sum(-1) + eps * eps
    w = m[None, :] * r2.pow(-1.5)
    w.fill_diagonal_(0.0)
    return (w[:, :, None] * d).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("N", "eps", "BI"), [(37, 0.1, 16), (5, 0.0, 16), (16, 1e-3, 16), (1, 0.5, 16),
                                              (0, 0.1, 16), (50, 0.05, 32)])
def test_nbody_accel(backend, dtype, N, eps, BI, rng):
    p = randn(rng, N, 3, dtype=dtype)
    m = torch.from_numpy(rng.uniform(0.5, 2.0, N)).to(dtype)
    if N >= 4 and eps > 0:
        p[3] = p[2]                                    # two coincident bodies: eps keeps their pull finite
    a = poisoned(N, 3, dtype=dtype)
    launch(nbody_accel, backend, p.T, m, a.T, eps, BI=BI)
    close(a, _nbody_want(p, m, eps), scale=1e3 if eps < 0.01 else 10)


# ---- 2. Black-Scholes ----------------------------------------------------------------------------------------------
# Abramowitz and Stegun 26.2.17: N(x) = 1 - phi(x) (b1 t + ... + b5 t^5), t = 1 / (1 + P x), x >= 0 (|error| < 7.5e-8)
AS_P = 0.2316419
AS_B = (0.319381530, -0.356563782, 1.781477937, -1.821255978, 1.330274429)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(dst, x, a, t, neg):
    """dst = N(x); a, t scratch tiles, neg a bool scratch tile (all of x's shape)."""
    ts.abs(a, x)
    ts.mul(t, a, AS_P)
    ts.add(t, t, 1.0)
    ts.rsqrt(t, t)
    ts.mul(t, t, t)                                    # 1 / (1 + P |x|)
    ts.fill(dst, AS_B[4])
    for coef in reversed(AS_B[:4]):                    # Horner in t
        ts.mul(dst, dst, t)
        ts.add(dst, dst, coef)
    ts.mul(dst, dst, t)
    ts.mul(a, a, a)
    ts.mul(a, a, -0.5)
    ts.exp(a, a)
    ts.mul(a, a, INV_SQRT_2PI)                         # phi(|x|)
    ts.mul(dst, dst, a)                                # the upper tail Q(|x|)
    ts.neg(a, dst)
    ts.add(a, a, 1.0)
    ts.lt(neg, x, 0.0)
    ts.where(dst, neg, dst, a)                         # N(x) = Q(|x|) for x < 0, 1 - Q(x) otherwise


@ts.kernel(grid=lambda S, BN: (ts.cdiv(S.shape[0], BN),))
def black_scholes(S, K, T, CALL, PUT, r: float, sigma: float, *, BN: int = 32):
    """European call and put prices of spots S, strikes K and expiries T (N,) at rate r and volatility sigma."""
    b = ts.block_id(0)
    W = _work(S.dtype)
    s, k, t = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.load(s, S, at=(b,))
    ts.load(k, K, at=(b,))
    ts.load(t, T, at=(b,))
    vol, d1, d2, disc = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.sqrt(vol, t)
    ts.mul(vol, vol, sigma)                            # sigma sqrt(T)
    ts.div(d1, s, k)
    ts.log(d1, d1)
    ts.mul(d2, t, r + 0.5 * sigma * sigma)
    ts.add(d1, d1, d2)
    ts.div(d1, d1, vol)
    ts.sub(d2, d1, vol)
    ts.mul(disc, t, -r)
    ts.exp(disc, disc)
    ts.mul(disc, disc, k)                              # K e^(-rT)
    n1, n2 = ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    a, u = ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    neg = ts.RegVec[ts.bool_, BN]()
    _normal_cdf(n1, d1, a, u, neg)
    _normal_cdf(n2, d2, a, u, neg)
    call, put = ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.mul(call, s, n1)
    ts.mul(a, disc, n2)
    ts.sub(call, call, a)                              # S N(d1) - K e^(-rT) N(d2)
    ts.sub(put, call, s)
    ts.add(put, put, disc)                             # parity: C - S + K e^(-rT)
    out = ts.RegVec[CALL.dtype, BN]()
    ts.copy(out, call)
    ts.store(CALL, out, at=(b,))
    ts.copy(out, put)
    ts.store(PUT, out, at=(b,))


def _bs_want(s, k, t, r, sigma):
    s, k, t = s.double(), k.double(), t.double()
    nd = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    vol = sigma * t.sqrt()
    d1 = (torch.log(s / k) + (r + sigma * sigma / 2) * t) / vol
    d2 = d1 - vol
    disc = k * torch.exp(-r * t)
    return s * nd.cdf(d1) - disc * nd.cdf(d2), disc * nd.cdf(-d2) - s * nd.cdf(-d1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF])
@pytest.mark.parametrize(("N", "r", "sigma"), [(45, 0.05, 0.2), (32, 0.0, 0.8), (1, 0.1, 0.05), (0, 0.05, 0.2)])
def test_black_scholes(backend, dtype, N, r, sigma, rng):
    s = torch.from_numpy(rng.uniform(50, 150, N)).to(dtype)
    k = torch.from_numpy(rng.uniform(50, 150, N)).to(dtype)
    t = torch.from_numpy(rng.uniform(0.05, 3.0, N)).to(dtype)
    if N > 3:
        s[0], k[0] = 1000.0, 10.0                      # deep in the money: N(d1) = N(d2) = 1
        s[1], k[1] = 10.0, 1000.0                      # deep out of it: the call is 0
        s[2], k[2] = 100.0, 100.0                      # at the money
    call, put = poisoned(N, dtype=dtype), poisoned(N, dtype=dtype)
    launch(black_scholes, backend, s, k, t, call, put, r, sigma)
    want_call, want_put = _bs_want(s, k, t, r, sigma)
    # 7.5e-8 from the CDF's approximation, times prices up to 1000; parity's cancellations in f32
    atol = 2e-4 if dtype is F64 else {F32: 1e-3, F16: 0.06, BF: 1.0}[dtype] * 4
    torch.testing.assert_close(call.double(), want_call, rtol=tol_rel(dtype), atol=atol)
    torch.testing.assert_close(put.double(), want_put, rtol=tol_rel(dtype), atol=atol)


def tol_rel(dtype):
    return {F64: 1e-9, F32: 1e-5, F16: 2e-3, BF: 1.6e-2}[dtype]


# ---- 3. bilateral filter along rows --------------------------------------------------------------------------------
@ts.kernel(grid=lambda XS, BM, BN: (ts.cdiv(XS.shape[1], BM), ts.cdiv(XS.shape[2], BN)))
def bilateral_rows(XS, Y, sigma_s: float, sigma_r: float, *, R: int = 2, BM: int = 8, BN: int = 16):
    """Y (M, N): the bilateral filter of each row over the neighbours i - R .. i + R inside the row; XS (2R + 1, M, N)
    is the overlapping view with XS[k, :, i] = the padded row's element i + k (element i - R + k of the row)."""
    bi, bj = ts.block_id(0), ts.block_id(1)
    n = XS.shape[2]
    W = _work(XS.dtype)
    cols = ts.RegVec[ts.i64, BN]()
    center, x = ts.RegTile[W, BM, BN](), ts.RegTile[W, BM, BN]()
    ts.load(center, XS, at=(R, bi, bj))
    num, den = ts.RegTile[W, BM, BN](), ts.RegTile[W, BM, BN]()
    ts.zero(num)
    ts.zero(den)
    w = ts.RegTile[W, BM, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    t = ts.RegVec[ts.bool_, BN]()
    spatial = -0.5 / (sigma_s * sigma_s)
    rng_scale = -0.5 / (sigma_r * sigma_r)
    for k in range(2 * R + 1):
        ts.arange(cols, bj * BN + (k - R))               # the neighbour's column in the row
        ts.ge(inside, cols, 0)
        ts.lt(t, cols, n)
        ts.logical_and(inside, inside, t)
        ts.load(x, XS, at=(k, bi, bj))
        ts.where(x, ts.per_col(inside), x, 0.0)          # the NaN padding never reaches the arithmetic
        ts.sub(w, x, center)
        ts.mul(w, w, w)
        ts.mul(w, w, rng_scale)
        ts.add(w, w, spatial * float((k - R) * (k - R)))
        ts.exp(w, w)
        ts.where(w, ts.per_col(inside), w, 0.0)
        ts.add(den, den, w)
        ts.mul(w, w, x)
        ts.add(num, num, w)
    ts.div(num, num, den)
    out = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(out, num)
    ts.store(Y, out, at=(bi, bj))


def _shifted_view(x, R):
    """(2R + 1, M, N) with [k, r, i] = x[r, i - R + k], NaN outside the row."""
    M, N = x.shape
    xp = torch.full((M, N + 2 * R), math.nan, dtype=x.dtype)
    xp[:, R:R + N] = x
    return xp.as_strided((2 * R + 1, M, N), (1, N + 2 * R, 1))


def _bilateral_want(x, R, ss, sr):
    x = x.double()
    M, N = x.shape
    num, den = torch.zeros_like(x), torch.zeros_like(x)
    for k in range(-R, R + 1):
        lo, hi = max(0, -k), min(N, N - k)
        if lo >= hi:
            continue
        nb = x[:, lo + k:hi + k]
        w = torch.exp(-(k * k) / (2 * ss * ss) - (nb - x[:, lo:hi]) ** 2 / (2 * sr * sr))
        num[:, lo:hi] += w * nb
        den[:, lo:hi] += w
    return num / den


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF])
@pytest.mark.parametrize(("M", "N", "R"), [(5, 37, 2), (9, 16, 1), (3, 2, 3), (1, 1, 2), (0, 5, 1)])
def test_bilateral_rows(backend, dtype, M, N, R, rng):
    x = randn(rng, M, N, dtype=dtype)
    if M and N > 4:
        x[0, N // 2:] += 10.0                           # a step edge: the range weight keeps it sharp
    y = poisoned(M, N, dtype=dtype)
    launch(bilateral_rows, backend, _shifted_view(x, R), y, 1.5, 0.7, R=R)
    close(y, _bilateral_want(x, R, 1.5, 0.7), scale=4)
    if M and N > 4:
        assert (y[0, N // 2:] > 5).all()


# ---- 4. Kronecker product ------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0], A.shape[1]))
def kron(A, B, C4, *, BP: int = 16, BQ: int = 16):
    """C = kron(A, B) with C4 (m, n, p, q) the permuted view of C (m p, n q): C4[i, j] = A[i, j] B."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.load_scalar(A, i, j)
    b = ts.RegTile[B.dtype, BP, BQ]()
    ts.load(b, B, at=(0, 0))
    ts.mul(b, b, a)
    ts.store(C4, b, at=(i, j, 0, 0))


def _kron_view(c, m, n, p, q):
    return c.view(m, p, n, q).permute(0, 2, 1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, I32, I64])
@pytest.mark.parametrize(("m", "n", "p", "q"), [(3, 2, 5, 7), (1, 4, 16, 16), (2, 3, 1, 9), (0, 2, 3, 3)])
def test_kron(backend, dtype, m, n, p, q, rng):
    if dtype.is_floating_point:
        a, b = randn(rng, m, n, dtype=dtype), randn(rng, p, q, dtype=dtype)
        if dtype is F64 and m:
            a[0, 0] = 1.0 + 2.0**-40                    # a value f32 cannot hold
    else:
        hi = 2**40 if dtype is I64 else 2**15
        a = torch.from_numpy(rng.integers(-hi, hi, (m, n))).to(dtype)
        b = torch.from_numpy(rng.integers(-2**15, 2**15, (p, q))).to(dtype)
    sentinel = math.nan if dtype.is_floating_point else -7
    c = torch.full((m * p, n * q), sentinel, dtype=dtype)
    launch(kron, backend, a, b, _kron_view(c, m, n, p, q))
    if dtype is I32:
        want = torch.kron(a.long(), b.long()).apply_(lambda v: wrap(v, 32)).int()
    else:
        want = torch.kron(a.double() if dtype.is_floating_point else a, b.double() if dtype.is_floating_point else b)
    if dtype.is_floating_point:
        close(c, want)
    else:
        assert torch.equal(c, want)


# ---- 5. triplet margin loss ----------------------------------------------------------------------------------------
PAIRWISE_EPS = 1e-6    # F.pairwise_distance adds it to each difference


@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def triplet_loss(A, P, NEG, OUT, margin: float, *, BM: int = 8, BD: int = 16, SWAP: bool = False):
    """OUT (M,) = max(d(a, p) - d(a, n) + margin, 0), d(x, y) = |x - y + eps|_2; SWAP: d(a, n) = min(d(a, n),
    d(p, n))."""
    b = ts.block_id(0)
    D = A.shape[1]
    W = _work(A.dtype)
    a, p, q = ts.RegTile[W, BM, BD](), ts.RegTile[W, BM, BD](), ts.RegTile[W, BM, BD]()
    t = ts.RegTile[W, BM, BD]()
    cols = ts.RegVec[ts.i64, BD]()
    ok = ts.RegVec[ts.bool_, BD]()
    eps = ts.RegVec[W, BD]()
    ap, an, pn = ts.RegVec[W, BM](), ts.RegVec[W, BM](), ts.RegVec[W, BM]()
    ts.zero(ap)
    ts.zero(an)
    ts.zero(pn)
    for k in ts.range(ts.cdiv(D, BD)):
        ts.arange(cols, k * BD)
        ts.lt(ok, cols, D)
        ts.where(eps, ok, PAIRWISE_EPS, 0.0)           # no eps on the columns past D
        ts.load(a, A, at=(b, k))
        ts.load(p, P, at=(b, k))
        ts.load(q, NEG, at=(b, k))
        for (x, y, acc) in ((a, p, ap), (a, q, an), (p, q, pn)):
            ts.sub(t, x, y)
            ts.add(t, t, ts.per_col(eps))
            ts.mul(t, t, t)
            ts.row_sum(acc, t, acc)
    for acc in (ap, an, pn):
        ts.sqrt(acc, acc)
    if SWAP:
        ts.min(an, an, pn)
    ts.sub(ap, ap, an)
    ts.add(ap, ap, margin)
    ts.max(ap, ap, 0.0)
    out = ts.RegVec[OUT.dtype, BM]()
    ts.copy(out, ap)
    ts.store(OUT, out, at=(b,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(("M", "D", "margin"), [(13, 37, 1.0), (8, 16, 0.3), (1, 1, 2.0), (0, 4, 1.0)])
def test_triplet_loss(backend, dtype, swap, M, D, margin, rng):
    a, p, n = (randn(rng, M, D, dtype=dtype) for _ in range(3))
    if M > 2:
        p[1] = a[1]                                     # d(a, p) = sqrt(D) eps
        n[2] = a[2]
    out = poisoned(M, dtype=dtype)
    launch(triplet_loss, backend, a, p, n, out, margin, SWAP=swap)
    want = F.triplet_margin_loss(a.double(), p.double(), n.double(), margin=margin, swap=swap, reduction="none")
    close(out, want, scale=4)


# ---- 6. Chebyshev series by Clenshaw's recurrence ------------------------------------------------------------------
@ts.kernel(grid=lambda X, BN: (X.shape[0], ts.cdiv(X.shape[1], BN)))
def chebval_rows(X, C, Y, *, BN: int = 32):
    """Y[r, i] = sum_k C[r, k] T_k(X[r, i]): b_k = 2 x b_(k+1) - b_(k+2) + c_k for k = n-1 .. 1, then
    y = c_0 + x b_1 - b_2."""
    r, bj = ts.block_id(0), ts.block_id(1)
    n = C.shape[1]
    W = _work(X.dtype)
    x = ts.RegVec[W, BN]()
    ts.load(x, X, at=(r, bj))
    b1, b2, t = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.zero(b1)
    ts.zero(b2)
    for s in ts.range(n - 1):
        c = ts.load_scalar(C, r, n - 1 - s)
        ts.mul(t, x, b1)
        ts.mul(t, t, 2.0)
        ts.sub(t, t, b2)
        ts.add(t, t, c)
        ts.copy(b2, b1)
        ts.copy(b1, t)
    ts.mul(t, x, b1)
    ts.sub(t, t, b2)
    ts.add(t, t, ts.load_scalar(C, r, 0))              # 0 when there is no coefficient
    out = ts.RegVec[Y.dtype, BN]()
    ts.copy(out, t)
    ts.store(Y, out, at=(r, bj))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("R", "L", "n"), [(3, 45, 7), (2, 32, 1), (1, 5, 20), (2, 3, 0)])
def test_chebval_rows(backend, dtype, R, L, n, rng):
    x = torch.from_numpy(rng.uniform(-1.2, 1.2, (R, L))).to(dtype)
    x[0, 0], x[-1, -1] = -1.0, 1.0
    c = torch.from_numpy(rng.standard_normal((R, n)) / (1 + np.arange(n))).to(dtype)
    y = poisoned(R, L, dtype=dtype)
    launch(chebval_rows, backend, x, c, y)
    want = torch.tensor(np.stack([np.polynomial.chebyshev.chebval(x[i].double().numpy(), c[i].double().numpy())
                                  if n else np.zeros(L) for i in range(R)]))
    close(y, want, scale=10)


# ---- 7. FNV-1a hashes of byte strings ------------------------------------------------------------------------------
FNV_OFFSET = 2166136261
FNV_PRIME = 16777619
LOW32 = 2**32 - 1


@ts.kernel(grid=lambda BYTES_T, BR: (ts.cdiv(BYTES_T.shape[1], BR),))
def fnv1a(BYTES_T, LENS, H64, H32, *, BR: int = 16):
    """H64 (R,) = the 32-bit FNV-1a hash of row r's first LENS[r] bytes (BYTES_T (L, R), the transposed view of the
    u8 rows), H32 the same bits as an i32."""
    b = ts.block_id(0)
    n = BYTES_T.shape[0]
    lens = ts.RegVec[ts.i32, BR]()
    ts.load(lens, LENS, at=(b,))
    h = ts.RegVec[ts.i64, BR]()
    ts.fill(h, FNV_OFFSET)
    byte = ts.RegVec[ts.u8, BR]()
    wide, nxt = ts.RegVec[ts.i64, BR](), ts.RegVec[ts.i64, BR]()
    live = ts.RegVec[ts.bool_, BR]()
    for j in ts.range(n):
        ts.load(byte, BYTES_T, at=(j, b))
        ts.copy(wide, byte)
        ts.bit_xor(nxt, h, wide)
        ts.mul(nxt, nxt, FNV_PRIME)                     # < 2**56: no i64 wrap
        ts.bit_and(nxt, nxt, LOW32)
        ts.gt(live, lens, j)
        ts.where(h, live, nxt, h)
    ts.store(H64, h, at=(b,))
    h32 = ts.RegVec[ts.i32, BR]()
    ts.copy(h32, h)                                    # the low 32 bits, two's complement
    ts.store(H32, h32, at=(b,))


def _fnv1a(data: bytes) -> int:
    h = FNV_OFFSET
    for c in data:
        h = ((h ^ c) * FNV_PRIME) & LOW32
    return h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("R", "L"), [(21, 13), (16, 1), (3, 40), (5, 0), (0, 3)])
def test_fnv1a(backend, R, L, rng):
    data = torch.from_numpy(rng.integers(0, 256, (R, L), dtype=np.uint8))
    lens = torch.from_numpy(rng.integers(0, L + 1, R)).to(I32)
    if R > 2 and L:
        lens[0], lens[1] = 0, L
        data[2] = 255
    h64, h32 = torch.full((R,), -1, dtype=I64), torch.full((R,), -1, dtype=I32)
    launch(fnv1a, backend, data.T, lens, h64, h32)
    want = [_fnv1a(bytes(data[r, :int(lens[r])].tolist())) for r in range(R)]
    assert h64.tolist() == want
    assert h32.tolist() == [wrap(v, 32) for v in want]
    if R:
        assert _fnv1a(b"a") == 0xE40C292C               # the published test vector
