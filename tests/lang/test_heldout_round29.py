"""Round 29 of held-out kernels (after rounds 2-28): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch (or exact integers), outputs poisoned with NaN (or a
sentinel) first, ragged sizes (not tile multiples), seeds fixed (the ``rng`` fixture of this file).

- A whole GRU layer in one launch (torch.nn.GRU, one direction, batch_first=False): the hidden state carried across a
  runtime number of time steps as a register tile, the three gates' weights read through (3, H, *) views so that a
  ragged H pads with zeros (which the recurrence keeps at 0), tanh composed as 2 sigmoid(2x) - 1, every step's h
  and the last one written (two outputs); T = 0 (h0 copied through), f32 / bf16 / f16 (f32 work: mma takes no f64).
- Forward substitution (torch.linalg.solve_triangular, lower, several right-hand sides): a loop over a runtime n
  rows, row i of L picked by a one-hot column sum, the solved row written into the carried X tile by a per-row
  mask; unit diagonal as a bool constant (the diagonal then never read: NaN there must not leak), f32 / f64.
- Batched searchsorted (torch.searchsorted, left and right, out_int32 or int64) of values into per-row sorted
  sequences wider than a tile: counts of the boundaries before each value over the sequence's tiles, NaN values
  after every boundary, +-inf, i32 / i64 / f16 sequences, a 1-D sequence as an expanded (stride-0) row.
- Huber loss with its gradient (F.huber_loss, delta a runtime float): the element-wise gradient as one output, the
  mean added by atomics into an f32 scalar (a (1,) tensor) as the other; f32 / f16 / bf16 inputs.
- Mish forward and backward (x tanh(softplus(x)); softplus as log(1 + exp(x)) past the overflow of exp kept exact
  by a threshold), against torch.autograd in float64, inputs out to +-100.
- Hamming distances between binary codes packed 8 bits a byte (u8 (N, NB)): each byte column read as a vector through
  the transposed view, XORed query-against-key as a (BQ, BK) u8 tile, bits counted by the SWAR popcount in u8 (shifts
  and masks, no wrap past 8), summed over the bytes in i32; all-zero and all-ones codes (distance 8 NB).
- torch.trapezoid along the rows of Y (R, N) at sample points X (R, N): (y[i] + y[i + 1]) (x[i + 1] - x[i]) / 2 summed
  over tiles, the i + 1 terms read through the views Y[:, 1:], X[:, 1:] (at a storage offset of one element), the last
  pair masked; N = 1 (an empty sum) and N = 2, f32 / f64 / bf16.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262901)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. a GRU layer over a runtime number of steps ---------------------------------------------------------------
def _tanh(dst, src):
    """dst = tanh(src) = 2 sigmoid(2 src) - 1."""
    ts.mul(dst, src, 2.0)
    ts.sigmoid(dst, dst)
    ts.mul(dst, dst, 2.0)
    ts.sub(dst, dst, 1.0)


@ts.kernel(grid=lambda X, BB: (ts.cdiv(X.shape[1], BB),))
def gru_layer(X, H0, WI, WH, BI_, BH_, HS, HN, steps: int, *, BB: int = 16, BI: int = 16, BH: int = 16):
    """torch.nn.GRU over X (T, B, I) from H0 (B, H): WI (3, H, I), WH (3, H, H) the gates r, z, n; BI_, BH_ (3, H).
    HS (T, B, H) every step's h, HN (B, H) the last. ``steps`` = T, a runtime int."""
    b = ts.block_id(0)
    W = ts.f64 if X.dtype is ts.f64 else ts.f32
    wi = [ts.RegTile[W, BH, BI]() for _ in range(3)]   # (BH, BI) per gate
    wh = [ts.RegTile[W, BH, BH]() for _ in range(3)]   # (BH, BH) per gate
    bi = [ts.RegVec[W, BH]() for _ in range(3)]
    bh = [ts.RegVec[W, BH]() for _ in range(3)]
    for g in range(3):
        ts.load(wi[g], WI, at=(g, 0, 0))
        ts.load(wh[g], WH, at=(g, 0, 0))
        ts.load(bi[g], BI_, at=(g, 0))
        ts.load(bh[g], BH_, at=(g, 0))
    h = ts.RegTile[W, BB, BH]()
    ts.load(h, H0, at=(b, 0))
    x = ts.RegTile[W, BB, BI]()
    gi = [ts.RegTile[W, BB, BH]() for _ in range(3)]
    gh = [ts.RegTile[W, BB, BH]() for _ in range(3)]
    r, z, n = ts.RegTile[W, BB, BH](), ts.RegTile[W, BB, BH](), ts.RegTile[W, BB, BH]()
    out = ts.RegTile[HS.dtype, BB, BH]()
    for t in ts.range(steps):
        ts.load(x, X, at=(t, b, 0))
        for g in range(3):
            ts.zero(gi[g])
            ts.mma_ABt(gi[g], x, wi[g], gi[g])         # (BB, BI) @ (BI, BH)
            ts.add(gi[g], gi[g], ts.per_col(bi[g]))
            ts.zero(gh[g])
            ts.mma_ABt(gh[g], h, wh[g], gh[g])
            ts.add(gh[g], gh[g], ts.per_col(bh[g]))
        ts.add(r, gi[0], gh[0])
        ts.sigmoid(r, r)
        ts.add(z, gi[1], gh[1])
        ts.sigmoid(z, z)
        ts.mul(n, r, gh[2])
        ts.add(n, n, gi[2])
        _tanh(n, n)
        # h = (1 - z) n + z h = n + z (h - n)
        ts.sub(h, h, n)
        ts.mul(h, h, z)
        ts.add(h, h, n)
        ts.copy(out, h)
        ts.store(HS, out, at=(t, b, 0))
    last = ts.RegTile[HN.dtype, BB, BH]()
    ts.copy(last, h)
    ts.store(HN, last, at=(b, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "B", "I", "H", "dtype"), [(4, 3, 5, 7, F32), (3, 17, 16, 9, F32), (0, 2, 3, 4, F32),
                                                          (2, 5, 6, 16, BF), (3, 4, 7, 5, F16)])
def test_gru_layer(backend, T, B, I, H, dtype, rng):
    torch.manual_seed(29)
    gru = torch.nn.GRU(I, H).double()
    x = randn(rng, T, B, I, dtype=dtype)
    h0 = randn(rng, B, H, dtype=dtype)
    wi = gru.weight_ih_l0.detach().to(dtype).view(3, H, I)
    wh = gru.weight_hh_l0.detach().to(dtype).view(3, H, H)
    bi = gru.bias_ih_l0.detach().to(dtype).view(3, H)
    bh = gru.bias_hh_l0.detach().to(dtype).view(3, H)
    hs, hn = poisoned(T, B, H, dtype=dtype), poisoned(B, H, dtype=dtype)
    launch(gru_layer, backend, x, h0, wi, wh, bi, bh, hs, hn, T)
    with torch.no_grad():
        for p, q in ((gru.weight_ih_l0, wi), (gru.weight_hh_l0, wh), (gru.bias_ih_l0, bi), (gru.bias_hh_l0, bh)):
            p.copy_(q.reshape(p.shape).double())       # the reference sees the weights as rounded to dtype
        want_hs, want_hn = gru(x.double(), h0.double()[None]) if T else (x.double()[:, :, :0], h0.double()[None])
    close(hs, want_hs.reshape(T, B, H), scale=4)
    close(hn, want_hn[0], scale=4)


# ---- 2. forward substitution with several right-hand sides --------------------------------------------------------
@ts.kernel(grid=lambda L: (L.shape[0],))
def forward_subst(L, RHS, X, n: int, *, BN: int = 16, BK: int = 16, UNIT: bool = False):
    """X[b] = L[b]^-1 RHS[b] for lower-triangular L (B, n, n) and RHS (B, n, k): row i of X is
    (RHS[i] - L[i, :i] X[:i]) / L[i, i] (no division when UNIT, and the diagonal is not read)."""
    b = ts.block_id(0)
    W = ts.f64 if L.dtype is ts.f64 else ts.f32
    lo, rhs = ts.RegTile[W, BN, BN](), ts.RegTile[W, BN, BK]()
    ts.load(lo, L, at=(b, 0, 0))
    ts.load(rhs, RHS, at=(b, 0, 0))
    rows, cols = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN]()
    ts.arange(rows, 0)
    ts.arange(cols, 0)
    below = ts.RegTile[ts.bool_, BN, BN]()
    ts.gt(below, ts.per_row(rows), ts.per_col(cols))    # strictly below the diagonal: only these are read
    strict = ts.RegTile[W, BN, BN]()
    ts.where(strict, below, lo, 0.0)
    diag = ts.RegVec[W, BN]()
    if not UNIT:
        on = ts.RegTile[ts.bool_, BN, BN]()
        ts.eq(on, ts.per_row(rows), ts.per_col(cols))
        pick = ts.RegTile[W, BN, BN]()
        ts.where(pick, on, lo, 0.0)
        ts.row_sum(diag, pick)                        # diag[r] = L[r, r]
    x = ts.RegTile[W, BN, BK]()
    ts.zero(x)
    is_i = ts.RegVec[ts.bool_, BN]()
    li = ts.RegVec[W, BN]()
    sel = ts.RegTile[W, BN, BN]()
    prod, new = ts.RegTile[W, BN, BK](), ts.RegTile[W, BN, BK]()
    s = ts.RegVec[W, BK]()
    for i in ts.range(n):
        ts.eq(is_i, rows, i)
        ts.where(sel, ts.per_row(is_i), strict, 0.0)
        ts.col_sum(li, sel)                           # li[c] = L[i, c] for c < i
        ts.mul(prod, x, ts.per_row(li))
        ts.col_sum(s, prod)                           # s[j] = sum_c L[i, c] X[c, j]
        ts.sub(new, rhs, ts.per_col(s))
        if not UNIT:
            ts.div(new, new, ts.per_row(diag))
        ts.where(x, ts.per_row(is_i), new, x)
    out = ts.RegTile[X.dtype, BN, BK]()
    ts.copy(out, x)
    ts.store(X, out, at=(b, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize(("B", "n", "k", "BN"), [(3, 7, 3, 16), (2, 16, 1, 16), (1, 1, 5, 16), (2, 20, 2, 32)])
def test_forward_subst(backend, dtype, unit, B, n, k, BN, rng):
    a = randn(rng, B, n, n, dtype=F64) * 0.3
    low = torch.tril(a, -1) + torch.diag_embed(1.0 + torch.from_numpy(rng.uniform(0.5, 2.0, (B, n))))
    want_l = low.to(dtype).double()
    if unit:
        want_l = torch.tril(want_l, -1) + torch.eye(n, dtype=F64)
        low.diagonal(dim1=-2, dim2=-1).fill_(math.nan)   # never read under UNIT
    low = low.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), math.nan).to(dtype)  # nor above it
    rhs = randn(rng, B, n, k, dtype=dtype)
    x = poisoned(B, n, k, dtype=dtype)
    launch(forward_subst, backend, low, rhs, x, n, BN=BN, UNIT=unit)
    want = torch.linalg.solve_triangular(want_l, rhs.double(), upper=False)
    close(x, want, scale=10)


# ---- 3. batched searchsorted ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda V, BV: (V.shape[0], ts.cdiv(V.shape[1], BV)))
def searchsorted(S, V, OUT, *, BV: int = 16, BS: int = 16, RIGHT: bool = False):
    """OUT[r, i] = #{j : S[r, j] < V[r, i]} (<= when RIGHT) for each row's ascending S[r] (R, M); a NaN value
    after every boundary (torch's order), NaN boundaries at the end never counted."""
    r, vb = ts.block_id(0), ts.block_id(1)
    m = S.shape[1]
    v = ts.RegVec[V.dtype, BV]()
    ts.load(v, V, at=(r, vb))
    vnan = ts.RegVec[ts.bool_, BV]()
    ts.ne(vnan, v, v)
    cnt = ts.RegVec[ts.i64, BV]()
    ts.zero(cnt)
    s = ts.RegVec[S.dtype, BS]()
    pos = ts.RegVec[ts.i64, BS]()
    ok = ts.RegVec[ts.bool_, BS]()
    before, t = ts.RegTile[ts.bool_, BV, BS](), ts.RegTile[ts.bool_, BV, BS]()
    ones = ts.RegTile[ts.i64, BV, BS]()
    for j in ts.range(ts.cdiv(m, BS)):
        ts.load(s, S, at=(r, j))
        ts.arange(pos, j * BS)
        ts.lt(ok, pos, m)
        if RIGHT:
            ts.le(before, ts.per_col(s), ts.per_row(v))
        else:
            ts.lt(before, ts.per_col(s), ts.per_row(v))
        ts.eq(t, ts.per_col(s), ts.per_col(s))        # a non-NaN boundary ...
        ts.logical_and(t, t, ts.per_row(vnan))        # ... precedes a NaN value
        ts.logical_or(before, before, t)
        ts.logical_and(before, before, ts.per_col(ok))
        ts.where(ones, before, 1, 0)
        ts.row_sum(cnt, ones, cnt)
    out = ts.RegVec[OUT.dtype, BV]()
    ts.copy(out, cnt)
    ts.store(OUT, out, at=(r, vb))


def _sorted_rows(rng, R, M, dtype):
    if dtype.is_floating_point:
        s = torch.from_numpy(np.sort(np.round(rng.standard_normal((R, M)) * 4) / 4, axis=1)).to(dtype)
        s[0, -1] = math.inf
        s[-1, 0] = -math.inf
        return s
    return torch.from_numpy(np.sort(rng.integers(-20, 20, (R, M)), axis=1)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, I32, I64])
@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize(("R", "M", "N"), [(3, 37, 21), (2, 1, 5), (1, 16, 16)])
def test_searchsorted(backend, dtype, right, R, M, N, rng):
    s = _sorted_rows(rng, R, M, dtype)
    if dtype.is_floating_point:
        v = torch.from_numpy(np.round(rng.standard_normal((R, N)) * 4) / 4).to(dtype)   # ties with boundaries
        v[0, 0], v[-1, -1] = math.nan, math.inf
        v[0, N // 2] = -math.inf
    else:
        v = torch.from_numpy(rng.integers(-25, 25, (R, N))).to(dtype)
        v[0, 0] = torch.iinfo(dtype).max
        v[-1, -1] = torch.iinfo(dtype).min
    for out_dtype in (I32, I64):
        out = torch.full((R, N), -7, dtype=out_dtype)
        launch(searchsorted, backend, s, v, out, RIGHT=right)
        want = torch.searchsorted(s, v, right=right)
        assert torch.equal(out.long(), want), (out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_searchsorted_of_one_sequence_expanded_over_rows(backend, rng):
    """torch.searchsorted's 1-D boundaries: the one row passed as an expanded (R, M) view, stride 0."""
    s = torch.from_numpy(np.sort(rng.standard_normal(23))).float()
    v = randn(rng, 4, 9)
    out = torch.full((4, 9), -7, dtype=I64)
    launch(searchsorted, backend, s.expand(4, 23), v, out, BS=8)
    assert torch.equal(out, torch.searchsorted(s, v))


# ---- 4. Huber loss and its gradient ---------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def huber(X, Y, G, LOSS, delta: float, *, BM: int = 16, BN: int = 16):
    """G = d mean(huber(X - Y)) / dX, LOSS[0] += this tile's share of the mean (f32)."""
    i, j = ts.block_id(0), ts.block_id(1)
    inv = 1.0 / (X.shape[0] * X.shape[1])
    x, y = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(y, Y, at=(i, j))
    d, a = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.sub(d, x, y)
    ts.abs(a, d)
    small = ts.RegTile[ts.bool_, BM, BN]()
    ts.le(small, a, delta)
    quad, lin = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.mul(quad, d, d)
    ts.mul(quad, quad, 0.5)                           # d^2 / 2
    ts.mul(lin, a, delta)
    ts.sub(lin, lin, 0.5 * delta * delta)             # delta (|d| - delta / 2)
    loss = ts.RegTile[ts.f32, BM, BN]()
    ts.where(loss, small, quad, lin)
    ts.mul(loss, loss, inv)                           # padding: d = 0, loss 0
    part, tot = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, 1]()
    ts.row_sum(part, loss)
    one = ts.RegTile[ts.f32, 1, BM]()
    ts.zero(one)
    ts.add(one, one, ts.per_col(part))
    ts.row_sum(tot, one)
    ts.atomic_add(LOSS, tot, at=(0,))
    clip = ts.RegTile[ts.f32, BM, BN]()               # grad: d inside, delta sign(d) outside
    ts.min(clip, d, delta)
    ts.max(clip, clip, -delta)
    ts.mul(clip, clip, inv)
    g = ts.RegTile[G.dtype, BM, BN]()
    ts.copy(g, clip)
    ts.store(G, g, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("M", "N", "delta"), [(19, 37, 1.0), (5, 3, 0.25), (33, 16, 3.5)])
def test_huber(backend, dtype, M, N, delta, rng):
    x, y = randn(rng, M, N, dtype=dtype) * 3, randn(rng, M, N, dtype=dtype)
    x[0, 0] = y[0, 0] + delta if M * N > 1 else x[0, 0]   # on the seam
    g, loss = poisoned(M, N, dtype=dtype), torch.zeros(1)
    launch(huber, backend, x, y, g, loss, delta)
    xd = x.double().requires_grad_()
    want = F.huber_loss(xd, y.double(), delta=delta)
    want.backward()
    close(loss[0], want.detach(), dtype=F32, scale=4)
    close(g, xd.grad)


# ---- 5. Mish forward and backward ---------------------------------------------------------------------------------
SOFTPLUS_LINEAR = 20.0   # past it log(1 + e^x) is x in f32 (and e^x may overflow)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def mish_fwd_bwd(X, DY, Y, DX, *, BN: int = 32):
    """Y = x tanh(sp), DX = DY (tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)), sp = softplus(x)."""
    i = ts.block_id(0)
    x, dy = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(i,))
    ts.load(dy, DY, at=(i,))
    e, sp = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    big = ts.RegVec[ts.bool_, BN]()
    ts.gt(big, x, SOFTPLUS_LINEAR)
    ts.min(e, x, SOFTPLUS_LINEAR)
    ts.exp(e, e)
    ts.add(sp, e, 1.0)
    ts.log(sp, sp)
    ts.where(sp, big, x, sp)
    th = ts.RegVec[ts.f32, BN]()
    _tanh(th, sp)
    y = ts.RegVec[ts.f32, BN]()
    ts.mul(y, x, th)
    sg, d = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    ts.sigmoid(sg, x)
    ts.mul(d, th, th)
    ts.mul(d, d, -1.0)
    ts.add(d, d, 1.0)                                 # sech^2(sp) = 1 - tanh(sp)^2
    ts.mul(d, d, sg)
    ts.mul(d, d, x)
    ts.add(d, d, th)
    ts.mul(d, d, dy)
    yo, do = ts.RegVec[Y.dtype, BN](), ts.RegVec[DX.dtype, BN]()
    ts.copy(yo, y)
    ts.copy(do, d)
    ts.store(Y, yo, at=(i,))
    ts.store(DX, do, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize("N", [77, 5])
def test_mish(backend, dtype, N, rng):
    x = (randn(rng, N) * 4).to(dtype)
    x[0] = 100.0
    x[N - 1] = -100.0
    x[N // 2] = 20.5 if N > 2 else x[N // 2]
    dy = randn(rng, N, dtype=dtype)
    y, dx = poisoned(N, dtype=dtype), poisoned(N, dtype=dtype)
    launch(mish_fwd_bwd, backend, x, dy, y, dx)
    xd = x.double().requires_grad_()
    want = F.mish(xd)
    want.backward(dy.double())
    close(y, want.detach(), scale=2)
    close(dx, xd.grad, scale=2)


# ---- 6. Hamming distances of packed binary codes -------------------------------------------------------------------
@ts.kernel(grid=lambda QT, KT, BQ, BK: (ts.cdiv(QT.shape[1], BQ), ts.cdiv(KT.shape[1], BK)))
def hamming(QT, KT, D, *, BQ: int = 16, BK: int = 16):
    """D[q, k] = the number of bits in which codes Q[q] and K[k] differ; QT (NB, NQ), KT (NB, NK) the transposed
    views of the u8 codes, so that byte b of every code in a block is one vector at element row b."""
    i, j = ts.block_id(0), ts.block_id(1)
    qb, kb = ts.RegVec[ts.u8, BQ](), ts.RegVec[ts.u8, BK]()
    x, t = ts.RegTile[ts.u8, BQ, BK](), ts.RegTile[ts.u8, BQ, BK]()
    acc, c = ts.RegTile[ts.i32, BQ, BK](), ts.RegTile[ts.i32, BQ, BK]()
    ts.zero(acc)
    for b in ts.range(QT.shape[0]):
        ts.load(qb, QT, at=(b, i))
        ts.load(kb, KT, at=(b, j))
        ts.zero(x)
        ts.add(x, x, ts.per_row(qb))                 # (BQ, BK): q's byte down the rows
        ts.zero(t)
        ts.add(t, t, ts.per_col(kb))
        ts.bit_xor(x, x, t)
        ts.shr(t, x, 1)                              # x - ((x >> 1) & 0x55): 2-bit counts
        ts.bit_and(t, t, 0x55)
        ts.sub(x, x, t)
        ts.shr(t, x, 2)                              # (x & 0x33) + ((x >> 2) & 0x33): 4-bit counts
        ts.bit_and(t, t, 0x33)
        ts.bit_and(x, x, 0x33)
        ts.add(x, x, t)
        ts.shr(t, x, 4)                              # (x + (x >> 4)) & 0x0f: the byte's count
        ts.add(x, x, t)
        ts.bit_and(x, x, 0x0F)
        ts.copy(c, x)
        ts.add(acc, acc, c)
    ts.store(D, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("NQ", "NK", "NB"), [(19, 37, 5), (3, 1, 1), (16, 16, 8)])
def test_hamming(backend, NQ, NK, NB, rng):
    q = torch.from_numpy(rng.integers(0, 256, (NQ, NB), dtype=np.int64)).to(torch.uint8)
    k = torch.from_numpy(rng.integers(0, 256, (NK, NB), dtype=np.int64)).to(torch.uint8)
    q[0] = 0
    k[0] = 255                                       # all bits differ: 8 NB
    if NQ > 1:
        q[1] = k[NK - 1]                             # equal codes: 0
    d = torch.full((NQ, NK), -7, dtype=I32)
    launch(hamming, backend, q.T, k.T, d)
    bits = np.unpackbits((q.numpy()[:, None, :] ^ k.numpy()[None, :, :]), axis=-1).sum(-1)
    assert torch.equal(d, torch.from_numpy(bits.astype(np.int32)))
    assert d[0, 0] == 8 * NB


# ---- 7. trapezoidal integration along rows -------------------------------------------------------------------------
@ts.kernel(grid=lambda Y: (Y.shape[0],))
def trapezoid(Y, Y1, X, X1, OUT, *, BN: int = 16):
    """OUT[r] = sum_i (Y[r, i] + Y[r, i + 1]) (X[r, i + 1] - X[r, i]) / 2, i < N - 1; Y1, X1 the views Y[:, 1:],
    X[:, 1:] (the i + 1 terms at the same tile coordinates)."""
    r = ts.block_id(0)
    W = ts.f64 if Y.dtype is ts.f64 else ts.f32
    n1 = Y1.shape[1]                                 # N - 1 pairs
    y, y1, x, x1 = (ts.RegVec[W, BN]() for _ in range(4))
    pos = ts.RegVec[ts.i32, BN]()
    ok = ts.RegVec[ts.bool_, BN]()
    acc = ts.RegVec[W, BN]()
    ts.zero(acc)
    for j in ts.range(ts.cdiv(n1, BN)):
        ts.load(y, Y, at=(r, j))
        ts.load(y1, Y1, at=(r, j))
        ts.load(x, X, at=(r, j))
        ts.load(x1, X1, at=(r, j))
        ts.add(y, y, y1)
        ts.sub(x1, x1, x)
        ts.mul(y, y, x1)
        ts.arange(pos, j * BN)
        ts.lt(ok, pos, n1)                           # Y[:, n1] is a sample but no pair's first
        ts.where(y, ok, y, 0.0)
        ts.add(acc, acc, y)
    tot = ts.RegVec[W, 1]()
    one = ts.RegTile[W, 1, BN]()
    ts.zero(one)
    ts.add(one, one, ts.per_col(acc))
    ts.row_sum(tot, one)
    ts.mul(tot, tot, 0.5)
    out = ts.RegVec[OUT.dtype, 1]()
    ts.copy(out, tot)
    ts.store(OUT, out, at=(r,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, BF])
@pytest.mark.parametrize(("R", "N"), [(3, 37), (2, 16), (2, 17), (1, 2), (2, 1)])
def test_trapezoid(backend, dtype, R, N, rng):
    x = torch.from_numpy(np.sort(rng.uniform(-3, 3, (R, N)), axis=1)).to(dtype)
    y = randn(rng, R, N, dtype=dtype)
    out = poisoned(R, dtype=dtype)
    launch(trapezoid, backend, y, y[:, 1:], x, x[:, 1:], out)
    close(out, torch.trapezoid(y.double(), x.double(), dim=1), scale=10)
