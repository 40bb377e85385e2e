"""Round 28 of held-out kernels (after rounds 2-27): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch / exact Python integers, outputs poisoned with NaN (or a
sentinel) first, ragged sizes (not tile multiples), seeds fixed (the ``rng`` fixture of this file).

- A stable sort of each row by rank counting (torch.sort(stable=True), ascending and descending, values and
  indices): each element's rank is the number of elements before it in the order, from a (BN, BN) tile of compares of
  the row against itself (a per_col against a per_row broadcast), ties broken by index; NaN ordered last (first when
  descending) as torch orders it; the sorted row gathered exactly by a one-hot column max; f32 / f16 / bf16 / f64 /
  f8e4m3 / i32 / i64 / i8 / u8 (each integer type's extremes), ragged widths, padding past N kept out of every rank.
- The matrix exponential of a batch of small matrices (torch.linalg.matrix_exp) by scaling and squaring: a Taylor
  polynomial of A / 2^s by Horner's rule in register products (both operands register tiles), then s squarings in a
  loop whose trip count is a runtime int argument; a zero matrix, a nilpotent one (the series ends), a rotation
  generator (exp is a rotation) and norms up to 20 (s = 6).
- Modular exponentiation a^e mod p in int64 tiles (right-to-left binary powering: a loop over e's bits, its trip
  count a runtime int, each bit read by shift and mask, the products reduced by rem before they pass 2^63); p up to
  2^31 - 1, e of 0, 1 and past 2^40, a of 0 and multiples of p; and Fermat's little theorem as a check.
- A quaternion rotation of 3-vectors (v' = q v q*, by the two cross products of Rodrigues' form) with the quaternions
  and vectors read through stride-4 / stride-3 views of (N, 4) / (N, 3) tensors (one component a view), the result
  written through the stride-3 views of an (N, 3) output and each quaternion's norm into a second output of shape (N,).
- Nucleus (top-p) filtering of a row's softmax without sorting: each token's mass of the tokens ranked before it (a
  (BN, BN) tile of compares, ties by index, times the probabilities per column, summed along rows), kept while that
  mass is below p (the top token always), renormalized; temperature a runtime float, -inf logits (masked tokens),
  p = 0 (greedy), p = 1 (all), ragged vocabularies.

test_heldout_round28_more.py has the rest of this round (radix select, GEMM + log-softmax with its log-sum-exp as a
second output, Gauss-Jordan inversion with partial pivoting, misuse).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32
I8, U8, E4M3 = torch.int8, torch.uint8, torch.float8_e4m3fn


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262801)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. stable sort of rows by rank counting ---------------------------------------------------------------------
LOWEST = {"i8": -(2**7), "u8": 0, "i32": -(2**31), "i64": -(2**63)}   # below every value: the one-hot gather's fill
@ts.kernel(grid=lambda X: (X.shape[0],))
def rank_sort(X, Y, IDX, *, BN: int = 32, descending: bool = False):
    """Y[r], IDX[r] = torch.sort(X[r], stable=True, descending=descending) for the rows of X (R, N), N <= BN:
    rank[i] = #{j : x[j] before x[i] in the order} + #{j < i : x[j] ties x[i]}, NaN after every number."""
    r = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(r, 0))
    pos = ts.RegVec[ts.i32, BN]()
    ts.arange(pos, 0)
    valid, nan = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.bool_, BN]()
    ts.lt(valid, pos, n)
    ts.ne(nan, x, x)
    # before[i, j]: x[j] comes before x[i]  (i the row, j the column)
    before, tie, t = ts.RegTile[ts.bool_, BN, BN](), ts.RegTile[ts.bool_, BN, BN](), ts.RegTile[ts.bool_, BN, BN]()
    if descending:
        ts.gt(before, ts.per_col(x), ts.per_row(x))
    else:
        ts.lt(before, ts.per_col(x), ts.per_row(x))
    notnan = ts.RegVec[ts.bool_, BN]()
    ts.logical_not(notnan, nan)
    if descending:                                     # NaN first: a NaN x[j] precedes every number x[i]
        ts.logical_and(t, ts.per_col(nan), ts.per_row(notnan))
    else:                                              # NaN last: every number x[j] precedes a NaN x[i]
        ts.logical_and(t, ts.per_col(notnan), ts.per_row(nan))
    ts.logical_or(before, before, t)
    ts.eq(tie, ts.per_col(x), ts.per_row(x))
    ts.logical_and(t, ts.per_col(nan), ts.per_row(nan))  # two NaN tie
    ts.logical_or(tie, tie, t)
    ts.lt(t, ts.per_col(pos), ts.per_row(pos))          # j < i
    ts.logical_and(tie, tie, t)
    ts.logical_or(before, before, tie)
    ts.logical_and(before, before, ts.per_col(valid))   # padding precedes nothing
    ones = ts.RegTile[ts.i32, BN, BN]()
    ts.where(ones, before, 1, 0)
    rank = ts.RegVec[ts.i32, BN]()
    ts.row_sum(rank, ones)
    # one-hot: hit[i, j] = rank[i] == j for the valid i; Y[j] = x[i], IDX[j] = i
    hit = ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(hit, ts.per_row(rank), ts.per_col(pos))
    ts.logical_and(hit, hit, ts.per_row(valid))
    pick = ts.RegTile[X.dtype, BN, BN]()
    low = -math.inf if X.dtype.is_float else LOWEST[X.dtype.name]
    ts.where(pick, hit, ts.per_row(x), low)
    y = ts.RegVec[X.dtype, BN]()
    ts.col_max(y, pick)
    ts.where(ones, hit, ts.per_row(pos), 0)
    idx = ts.RegVec[ts.i32, BN]()
    ts.col_sum(idx, ones)
    out = ts.RegVec[IDX.dtype, BN]()
    ts.copy(out, idx)
    ts.store(Y, y, at=(r, 0))
    ts.store(IDX, out, at=(r, 0))


def _sort_input(rng, R, N, dtype):
    if not dtype.is_floating_point:
        x = torch.from_numpy(rng.integers(0 if dtype is U8 else -5, 5, (R, N))).to(dtype)   # many ties
        info = torch.iinfo(dtype)
        x[0, 0], x[R - 1, N - 1] = info.max, info.min    # the extremes (u8's 0 is its fill too)
        return x
    if dtype is E4M3:                                  # no inf in e4m3fn: NaN and ties only
        x = torch.from_numpy(np.round(rng.standard_normal((R, N)) * 4) / 4).to(dtype)
        x[0, N // 2] = math.nan
        return x
    x = torch.from_numpy(np.round(rng.standard_normal((R, N)) * 4) / 4).to(dtype)   # ties after rounding
    if R > 2 and N > 3:
        x[0, 1] = math.nan
        x[0, N - 1] = math.nan
        x[1, 0] = math.inf
        x[1, 2] = -math.inf
        x[2, :] = x[2, 0]                              # one value repeated: indices in order
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, F64, E4M3, I32, I64, I8, U8])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize(("R", "N", "BN"), [(5, 13, 16), (3, 32, 32), (2, 1, 16)])
def test_rank_sort(backend, dtype, descending, R, N, BN, rng):
    x = _sort_input(rng, R, N, dtype)
    y = poisoned(R, N, dtype=dtype, value=math.nan if dtype.is_floating_point else 77)   # no value of the input
    idx = torch.full((R, N), -7, dtype=I64)
    launch(rank_sort, backend, x, y, idx, BN=BN, descending=descending)
    want_y, want_i = torch.sort(x.double() if dtype.is_floating_point else x.long(), dim=1, stable=True,
                                descending=descending)
    assert torch.equal(idx, want_i), (idx, want_i)
    assert torch.equal(y.double(), want_y.double()) or torch.allclose(y.double(), want_y.double(), equal_nan=True)
    assert torch.equal(torch.isnan(y.double()), torch.isnan(want_y.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sort_keeps_signed_zeros_in_place(backend):
    """-0.0 and 0.0 tie (as in torch): they keep their order, each with its sign (the gather is exact)."""
    x = torch.tensor([[0.0, -0.0, -1.0, 0.0, -0.0]])
    y, idx = poisoned(1, 5), torch.full((1, 5), -7, dtype=I32)
    launch(rank_sort, backend, x, y, idx, BN=8)
    assert idx.tolist() == [[2, 0, 1, 3, 4]]
    assert [math.copysign(1, v) for v in y[0].tolist()] == [-1, 1, -1, 1, -1]


# ---- 2. matrix exponential by scaling and squaring ---------------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def matrix_exp(A, E, squarings: int, *, BN: int = 16, TERMS: int = 14):
    """E[b] = exp(A[b]) for A (B, n, n), n <= BN, in f32 work: T = sum_{k < TERMS} (A / 2^s)^k / k! by Horner's
    rule, then squared ``squarings`` = s times (a runtime int)."""
    b = ts.block_id(0)
    a, t, eye = ts.RegTile[ts.f32, BN, BN](), ts.RegTile[ts.f32, BN, BN](), ts.RegTile[ts.f32, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))                        # past n: zero rows and columns, so exp keeps them 0 off I
    for _ in ts.range(squarings):
        ts.mul(a, a, 0.5)                              # A / 2^s, exactly (powers of two)
    r, c = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN]()
    ts.arange(r, 0)
    ts.arange(c, 0)
    diag = ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(diag, ts.per_row(r), ts.per_col(c))
    ts.where(eye, diag, 1.0, 0.0)
    # Horner: T = I + a (I + a/2 (I + ... (I + a/(K-1)))...) / 1
    ts.copy(t, eye)
    p = ts.RegTile[ts.f32, BN, BN]()
    for k in range(TERMS - 1, 0, -1):
        ts.zero(p)
        ts.mma_AB(p, a, t, p)
        ts.mul(p, p, 1.0 / k)
        ts.add(t, p, eye)
    for _ in ts.range(squarings):
        ts.zero(p)
        ts.mma_AB(p, t, t, p)
        ts.copy(t, p)
    out = ts.RegTile[E.dtype, BN, BN]()
    ts.copy(out, t)
    ts.store(E, out, at=(b, 0, 0))


def _squarings(a: torch.Tensor) -> int:
    """s with ||A / 2^s||_1 <= 1/2 for the batch's largest 1-norm."""
    norm = float(a.double().abs().sum(-2).amax()) if a.numel() else 0.0
    return max(0, math.ceil(math.log2(norm)) + 1) if norm > 0 else 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "n", "BN"), [(3, 5, 16), (2, 16, 16), (1, 1, 16), (2, 9, 32)])
@pytest.mark.parametrize("dtype", [F32, BF])
def test_matrix_exp(backend, B, n, BN, dtype, rng):
    a = randn(rng, B, n, n, dtype=dtype)
    a[0] *= 5.0 if dtype is F32 else 4.0               # a norm of ~20: several squarings
    s = _squarings(a)
    e = poisoned(B, n, n)
    launch(matrix_exp, backend, a, e, s, BN=BN)
    want = torch.linalg.matrix_exp(a.double())
    # relative to the result's size: each squaring doubles the relative error of f32's products
    scale = float(want.abs().amax()) * (2 ** s) * n
    torch.testing.assert_close(e.double(), want, rtol=1e-4 * 2 ** s, atol=1e-6 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_exp_exact_cases(backend):
    """exp(0) = I; a strictly upper-triangular (nilpotent) A whose series ends: exp = I + A + A^2 / 2 exactly in
    binary; the generator of a rotation by theta gives the rotation (also after squarings)."""
    z = torch.zeros(1, 6, 6)
    e = poisoned(1, 6, 6)
    launch(matrix_exp, backend, z, e, 0)
    assert torch.equal(e[0], torch.eye(6))
    nil = torch.zeros(1, 3, 3)
    nil[0, 0, 1], nil[0, 1, 2], nil[0, 0, 2] = 2.0, 4.0, 1.0
    e = poisoned(1, 3, 3, dtype=F64)
    launch(matrix_exp, backend, nil, e, 0)
    want = torch.eye(3, dtype=F64) + nil[0].double() + nil[0].double() @ nil[0].double() / 2
    assert torch.equal(e[0], want), e
    theta = 3.0
    g = torch.tensor([[[0.0, -theta], [theta, 0.0]]])
    for s in (0, 3):
        e = poisoned(1, 2, 2)
        launch(matrix_exp, backend, g, e, s, TERMS=20)
        rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        torch.testing.assert_close(e[0], rot, rtol=0, atol=2e-6)


# ---- 3. modular exponentiation in int64 --------------------------------------------------------------------------
@ts.kernel(grid=lambda A, BS: (ts.cdiv(A.shape[0], BS),))
def modpow(A, E, P, R, bits: int, *, BS: int = 16):
    """R[k] = A[k] ** E[k] mod P[k] (in [0, P[k])) for i64 A, E >= 0, 0 < P < 2^31: right-to-left binary powering
    over the low ``bits`` bits of E (a runtime int), products of two residues below 2^62."""
    i = ts.block_id(0)
    a, e, p = ts.RegVec[ts.i64, BS](), ts.RegVec[ts.i64, BS](), ts.RegVec[ts.i64, BS]()
    ts.load(a, A, at=(i,))
    ts.load(e, E, at=(i,))
    ts.load(p, P, at=(i,))
    ts.max(p, p, 1)                                    # the padding past the end: mod 1, no division by 0
    base, r, t = ts.RegVec[ts.i64, BS](), ts.RegVec[ts.i64, BS](), ts.RegVec[ts.i64, BS]()
    ts.rem(base, a, p)                                 # C's remainder has a's sign: lift it into [0, p)
    ts.add(base, base, p)
    ts.rem(base, base, p)
    ts.one(r)
    ts.rem(r, r, p)                                    # 1 mod 1 = 0
    bit = ts.RegVec[ts.bool_, BS]()
    for k in ts.range(bits):
        ts.shr(t, e, k)
        ts.bit_and(t, t, 1)
        ts.eq(bit, t, 1)
        ts.mul(t, r, base)
        ts.rem(t, t, p)
        ts.where(r, bit, t, r)
        ts.mul(base, base, base)
        ts.rem(base, base, p)
    ts.store(R, r, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("N", "BS"), [(37, 16), (5, 8), (1, 16)])
def test_modpow(backend, N, BS, rng):
    primes = [2, 3, 65537, 2**31 - 1, 1_000_000_007, 998_244_353]
    p = torch.tensor([primes[k % len(primes)] if k % 5 else int(rng.integers(1, 2**31)) for k in range(N)],
                     dtype=I64)
    a = torch.from_numpy(rng.integers(-(2**40), 2**40, N)).to(I64)
    e = torch.from_numpy(rng.integers(0, 2**41, N)).to(I64)
    if N > 8:
        a[0], e[0] = 5, 0                             # a^0 = 1 (mod p > 1)
        a[1], e[1] = 0, 7                             # 0
        a[2], e[2], p[2] = 3 * 65537, 9, 65537        # a multiple of p: 0
        a[3], e[3] = -1, 2**40 + 1                    # odd power of -1: p - 1
        a[4], e[4], p[4] = 12345, 999, 1              # mod 1: 0
        a[5], e[5] = 2, 1
    r = torch.full((N,), -99, dtype=I64)
    launch(modpow, backend, a, e, p, r, 42, BS=BS)
    want = [pow(int(x), int(y), int(m)) for x, y, m in zip(a, e, p, strict=True)]
    assert r.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_modpow_fermat(backend):
    """a^(p-1) = 1 mod p for a prime p not dividing a; a^p = a. bits = 31 covers every exponent below 2^31."""
    p = 2**31 - 1
    a = torch.arange(1, 41, dtype=I64) * 7919
    r1, r2 = torch.full((40,), -1, dtype=I64), torch.full((40,), -1, dtype=I64)
    launch(modpow, backend, a, torch.full((40,), p - 1, dtype=I64), torch.full((40,), p, dtype=I64), r1, 31)
    launch(modpow, backend, a, torch.full((40,), p, dtype=I64), torch.full((40,), p, dtype=I64), r2, 31)
    assert (r1 == 1).all() and torch.equal(r2, a % p)
    r0 = torch.full((40,), -1, dtype=I64)
    launch(modpow, backend, a, torch.full((40,), p, dtype=I64), torch.full((40,), p, dtype=I64), r0, 0)
    assert (r0 == 1).all()                             # no bits walked: a^0


# ---- 4. quaternion rotation through strided component views ------------------------------------------------------
@ts.kernel(grid=lambda QW, BS: (ts.cdiv(QW.shape[0], BS),))
def quat_rotate(QW, QX, QY, QZ, VX, VY, VZ, OX, OY, OZ, NORM, *, BS: int = 16):
    """(OX, OY, OZ)[k] = the vector V[k] rotated by Q[k] / |Q[k]| (q v q^-1), NORM[k] = |Q[k]|. Every argument but
    NORM is a stride-4 or stride-3 component view of an (N, 4) or (N, 3) tensor; work in f32."""
    i = ts.block_id(0)
    q = [ts.RegVec[ts.f32, BS]() for _ in range(4)]
    v = [ts.RegVec[ts.f32, BS]() for _ in range(3)]
    for dst, src in zip(q + v, (QW, QX, QY, QZ, VX, VY, VZ), strict=True):
        ts.load(dst, src, at=(i,))
    n2, norm = ts.RegVec[ts.f32, BS](), ts.RegVec[ts.f32, BS]()
    ts.zero(n2)
    for c in q:
        n2 += c * c
    ts.sqrt(norm, n2)
    for c in q:
        ts.div(c, c, norm)
    w, u = q[0], q[1:]

    def cross(a, b):
        return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]

    t = [2.0 * c for c in cross(u, v)]                 # t = 2 u x v;  v' = v + w t + u x t
    ut = cross(u, t)
    for k, dst in enumerate((OX, OY, OZ)):
        o = ts.RegVec[dst.dtype, BS]()
        ts.copy(o, v[k] + w * t[k] + ut[k])
        ts.store(dst, o, at=(i,))
    out = ts.RegVec[NORM.dtype, BS]()
    ts.copy(out, norm)
    ts.store(NORM, out, at=(i,))


def hamilton(a, b):
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("N", "BS"), [(45, 16), (3, 8)])
def test_quat_rotate(backend, dtype, N, BS, rng):
    q = randn(rng, N, 4, dtype=dtype) * 3
    v = randn(rng, N, 3, dtype=dtype)
    q[N - 1] = 0                                       # a zero quaternion: 0 / 0, NaN as the reference's
    q[0] = torch.tensor([0.0, 0.0, 0.0, 2.0])          # a half turn about z: (x, y, z) -> (-x, -y, z)
    out = poisoned(N, 3, dtype=dtype)
    norm = poisoned(N, dtype=F32 if dtype is F32 else dtype)
    launch(quat_rotate, backend, *q.unbind(1), *v.unbind(1), *out.unbind(1), norm, BS=BS)
    qd = q.double() / q.double().norm(dim=1, keepdim=True)
    conj = qd * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=F64)
    vq = torch.cat([torch.zeros(N, 1, dtype=F64), v.double()], 1)
    want = hamilton(hamilton(qd, vq), conj)[:, 1:]
    close(out, want, scale=4.0)
    close(norm, q.double().norm(dim=1))
    assert torch.isnan(out[N - 1]).all() and norm[N - 1] == 0
    assert torch.equal(out[0].double(), (v[0].double() * torch.tensor([-1.0, -1.0, 1.0], dtype=F64)).to(dtype)
                       .double())


# ---- 5. nucleus (top-p) filtering by mass-before counting ---------------------------------------------------------
@ts.kernel(grid=lambda L: (L.shape[0],))
def top_p_filter(L, P, KEEP, p: float, temperature: float, *, BN: int = 32):
    """P[r] = softmax(L[r] / temperature) restricted to its nucleus and renormalized, KEEP[r] the nucleus (bool): a
    token is kept when the probability of the tokens ranked before it (higher, or equal and earlier) is below p, or it
    ranks first. L (R, V), V <= BN."""
    r = ts.block_id(0)
    v = L.shape[1]
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, L, at=(r, 0))
    ts.div(x, x, temperature)
    pos = ts.RegVec[ts.i32, BN]()
    ts.arange(pos, 0)
    valid = ts.RegVec[ts.bool_, BN]()
    ts.lt(valid, pos, v)
    ts.where(x, valid, x, -math.inf)
    m, s = ts.RegVec[ts.f32, 1](), ts.RegVec[ts.f32, 1]()
    xt = ts.RegTile[ts.f32, 1, BN]()
    ts.zero(xt)
    ts.add(xt, xt, ts.per_col(x))
    ts.row_max(m, xt)
    ts.sub(xt, xt, ts.per_row(m))
    ts.exp(xt, xt)
    ts.row_sum(s, xt)
    ts.div(xt, xt, ts.per_row(s))
    prob = ts.RegVec[ts.f32, BN]()
    ts.col_sum(prob, xt)                               # the (1, BN) row back as a vector
    before, t = ts.RegTile[ts.bool_, BN, BN](), ts.RegTile[ts.bool_, BN, BN]()
    ts.gt(before, ts.per_col(prob), ts.per_row(prob))  # before[i, j]: token j ranks before token i
    ts.eq(t, ts.per_col(prob), ts.per_row(prob))
    lower = ts.RegTile[ts.bool_, BN, BN]()
    ts.lt(lower, ts.per_col(pos), ts.per_row(pos))
    ts.logical_and(t, t, lower)
    ts.logical_or(before, before, t)
    mass = ts.RegTile[ts.f32, BN, BN]()
    ts.where(mass, before, ts.per_col(prob), 0.0)
    ahead = ts.RegVec[ts.f32, BN]()
    ts.row_sum(ahead, mass)
    keep, first = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.bool_, BN]()
    ts.lt(keep, ahead, p)
    cnt = ts.RegTile[ts.i32, BN, BN]()
    ts.where(cnt, before, 1, 0)
    rank = ts.RegVec[ts.i32, BN]()
    ts.row_sum(rank, cnt)
    ts.eq(first, rank, 0)
    ts.logical_or(keep, keep, first)
    ts.logical_and(keep, keep, valid)
    ts.where(prob, keep, prob, 0.0)
    kt = ts.RegTile[ts.f32, 1, BN]()
    ts.zero(kt)
    ts.add(kt, kt, ts.per_col(prob))
    ts.row_sum(s, kt)
    ts.div(kt, kt, ts.per_row(s))
    ts.col_sum(prob, kt)
    out = ts.RegVec[P.dtype, BN]()
    ts.copy(out, prob)
    ts.store(P, out, at=(r, 0))
    ts.store(KEEP, keep, at=(r, 0))


def top_p_ref(logits, p, temperature):
    prob = torch.softmax(logits.double() / temperature, 1)
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    sorted_p = prob.gather(1, order)
    ahead = sorted_p.cumsum(1) - sorted_p
    keep_sorted = ahead < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, prob, 0.0)
    return kept / kept.sum(1, keepdim=True), keep, ahead.gather(1, order.argsort(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.5])
@pytest.mark.parametrize(("R", "V", "BN"), [(6, 29, 32), (2, 1, 16), (3, 64, 64)])
@pytest.mark.parametrize("dtype", [F32, BF])
def test_top_p_filter(backend, p, R, V, BN, dtype, rng):
    logits = randn(rng, R, V, dtype=dtype) * 2
    if V > 4:
        logits[0, 3] = -math.inf                       # a masked token: probability 0, never kept past p < 1
        logits[1, :4] = logits[1, 4]                   # ties, ranked by index
    temperature = 0.8
    want, want_keep, ahead = top_p_ref(logits, p, temperature)
    margin = (ahead - p).abs()[ahead > 0].amin() if (ahead > 0).any() else 1.0   # the first token is always kept
    if margin < 1e-4:                                  # a token at the edge of the nucleus: f32 may round it either way
        pytest.skip(f"mass ahead within {margin:.1e} of p")
    out, keep = poisoned(R, V, dtype=dtype), torch.ones(R, V, dtype=torch.bool)
    keep[:, ::2] = False
    launch(top_p_filter, backend, logits, out, keep, p, temperature, BN=BN)
    assert torch.equal(keep, want_keep)
    close(out, want)
    if p == 0.0:
        assert (keep.sum(1) == 1).all()                # greedy: the top token alone, with all the mass
