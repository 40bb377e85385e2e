"""Round 21 of held-out kernels, continued (see test_heldout_round21.py's docstring): stream compaction as
torch.masked_select and torch.nonzero do it, in three launches (each block's count of true mask elements; one
program's exclusive scan of the counts into i64 offsets, a triangle of compares per tile and the running total carried
across tiles as the one-element row vector of a (1, BS) tile; then a program per output tile gathering its elements
from every input block by one-hot compares of the elements' positions and exact sums, a -0.0's sign carried beside (a
sum of zeros is +0.0 on both executors, as in NumPy and torch), so that -0.0, NaN and inf arrive bit for bit; values
of f32 / f16 / bf16 / f64 / i32 / i64, empty and all-true masks, N not a multiple of the block); the Differential
Transformer's attention (two causal softmax maps from the two halves of each head's q and k, online in one loop over
key blocks, their difference lam weighted applied to V of twice the head dimension, then the per-head RMSNorm (subln)
and the (1 - lambda_init) scale; lam = 0, lam = 1 with equal halves giving exactly 0, scores in the hundreds); and the
Chamfer distance between batches of ragged point clouds (each point's nearest neighbour in the other cloud, its
squared distance and first index, over tiles of the other cloud whose padding past a per-batch length read with
load_scalar is NaN; f32 / f16 / bf16 / f64 points, duplicate neighbours, an empty cloud); and a cumsum along rows
wider than a tile restarted at flags (a segmented scan: each tile's segment numbers and in-segment sums from triangles
of compares, the carry into the next tile its last inclusive sum; a NaN confined to its segment; floats and wrapping
integers).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262102)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def work_dtype(dt):
    """The dtype a kernel computes in for elements of ``dt``: f64 for f64, f32 for other floats, integers as is."""
    return dt if dt is ts.f64 or not dt.is_float else ts.f32


# ---- 1. stream compaction: masked_select and nonzero ----------------------------------------------------------------
@ts.kernel(grid=lambda MASK, BLK: (ts.cdiv(MASK.shape[1], BLK),))
def block_counts(MASK, COUNTS, *, BLK: int = 64):
    """COUNTS[b] = the number of true elements of MASK (1, N) (bool) in block b of BLK. Grid: (blocks,)."""
    b = ts.block_id(0)
    m = ts.RegTile[ts.i32, 1, BLK]()
    ts.load(m, MASK, at=(0, b))                       # bools read as 0 / 1; past the end 0
    c = ts.RegVec[ts.i32, 1]()
    ts.row_sum(c, m)
    ts.store(COUNTS, c, at=(b,))


def _triangle(tri, n):
    """tri[r, c] = r <= c: the (n, n) mask whose column sums under per_row(v) are v's inclusive prefix sums."""
    r, c = ts.RegVec[ts.i32, n](), ts.RegVec[ts.i32, n]()
    ts.arange(r)
    ts.arange(c)
    ts.le(tri, ts.per_row(r), ts.per_col(c))


@ts.kernel(grid=lambda COUNTS: (1,))
def exclusive_scan(COUNTS, OFFS, *, BS: int = 32):
    """OFFS (1, nb + 1) = 0, c0, c0 + c1, ... the exclusive prefix sums of COUNTS (1, nb) and the total last, in i64.
    One program; the running total carried across tiles as the one-element row vector of a (1, BS) tile."""
    nb = COUNTS.shape[1]
    tri = ts.RegTile[ts.bool_, BS, BS]()
    _triangle(tri, BS)
    carry = ts.RegVec[ts.i64, 1]()
    ts.zero(carry)
    c = ts.RegTile[ts.i64, 1, BS]()
    cv, incl = ts.RegVec[ts.i64, BS](), ts.RegVec[ts.i64, BS]()
    sel = ts.RegTile[ts.i64, BS, BS]()
    e = ts.RegTile[ts.i64, 1, BS]()
    for t in ts.range(ts.cdiv(nb, BS)):
        ts.load(c, COUNTS, at=(0, t))
        ts.col_sum(cv, c)                             # (BS,) the row as a vector
        ts.where(sel, tri, ts.per_row(cv), 0)
        ts.col_sum(incl, sel)                         # (BS,) inclusive prefix sums inside the tile
        ts.zero(e)
        ts.add(e, e, ts.per_col(incl))
        ts.sub(e, e, c)                               # exclusive
        ts.add_row(e, e, carry)                       # plus every earlier tile's total
        ts.store(OFFS, e, at=(0, t))
        ts.row_sum(carry, c, carry)
    ts.store(OFFS, carry, at=(0, nb))                 # the total, at index nb


@ts.kernel(grid=lambda OUT, BO: (ts.cdiv(OUT.shape[0], BO),))
def compact_gather(X, MASK, OFFS, OUT, IDX, *, BLK: int = 64, BO: int = 32):
    """OUT[k] = X[i_k], IDX[k] = i_k for i_0 < i_1 < ... the indices where MASK (N,) is true (torch.masked_select,
    torch.nonzero); block b's true elements go to OFFS[b] on (exclusive_scan's offsets). A program per output tile
    visits every input block and picks its elements by one-hot compares of their positions. Grid: (output tiles,)."""
    o = ts.block_id(0)
    wd = work_dtype(X.dtype)
    orow = ts.RegVec[ts.i64, BO]()
    ts.arange(orow, o * BO)                           # (BO,) the output positions of this program
    acc, iacc, nacc = ts.RegVec[wd, BO](), ts.RegVec[ts.i64, BO](), ts.RegVec[ts.i32, BO]()
    for a in (acc, iacc, nacc):
        ts.zero(a)
    tri = ts.RegTile[ts.bool_, BLK, BLK]()
    _triangle(tri, BLK)
    mv, incl, negz = ts.RegVec[ts.i32, BLK](), ts.RegVec[ts.i32, BLK](), ts.RegVec[ts.i32, BLK]()
    mb, zb = ts.RegVec[ts.bool_, BLK](), ts.RegVec[ts.bool_, BLK]()
    xv, recip = ts.RegVec[wd, BLK](), ts.RegVec[wd, BLK]()
    pos, lane = ts.RegVec[ts.i64, BLK](), ts.RegVec[ts.i64, BLK]()
    sel = ts.RegTile[ts.i32, BLK, BLK]()
    hit = ts.RegTile[ts.bool_, BO, BLK]()
    val, ival = ts.RegTile[wd, BO, BLK](), ts.RegTile[ts.i64, BO, BLK]()
    for b in ts.range(ts.cdiv(X.shape[0], BLK)):
        off = ts.load_scalar(OFFS, b)
        ts.load(mv, MASK, at=(b,))
        ts.load(xv, X, at=(b,))
        ts.where(sel, tri, ts.per_row(mv), 0)
        ts.col_sum(incl, sel)                         # (BLK,) true elements up to and including each
        ts.copy(pos, incl)
        ts.add(pos, pos, off - 1)                     # (BLK,) each true element's output position
        ts.ne(mb, mv, 0)
        ts.eq(hit, ts.per_row(orow), ts.per_col(pos))
        ts.logical_and(hit, hit, ts.per_col(mb))      # (BO, BLK) one-hot: element c lands at output row r
        ts.where(val, hit, ts.per_col(xv), 0)
        ts.row_sum(acc, val, acc)                     # one term a row is x, the rest 0: exact, NaN and inf too
        ts.arange(lane, b * BLK)
        ts.where(ival, hit, ts.per_col(lane), 0)
        ts.row_sum(iacc, ival, iacc)
        if wd.is_float:                               # 0 + -0.0 is +0.0: carry which picks were -0.0 (1/x < 0)
            ts.one(recip)
            ts.div(recip, recip, xv)
            ts.eq(zb, xv, 0.0)
            ts.lt(mb, recip, 0.0)
            ts.logical_and(zb, zb, mb)
            ts.where(negz, zb, 1, 0)
            ts.where(ival, hit, ts.per_col(negz), 0)
            ts.row_sum(nacc, ival, nacc)
    if wd.is_float:
        flag = ts.RegVec[ts.bool_, BO]()
        ts.ne(flag, nacc, 0)
        ts.where(acc, flag, -0.0, acc)
    out = ts.RegVec[OUT.dtype, BO]()
    ts.copy(out, acc)
    ts.store(OUT, out, at=(o,))
    ts.store(IDX, iacc, at=(o,))


def masked_select(backend, x, mask, BLK=64, BS=32, BO=32):
    """(values, indices, counts, offsets) of x where mask, by the three launches; the output length from the total."""
    N = x.shape[0]
    nb = -(-N // BLK)
    counts = torch.full((nb,), -5, dtype=I32)
    launch(block_counts, backend, mask.view(1, N), counts, BLK=BLK)
    offs = torch.full((nb + 1,), -5, dtype=I64)
    launch(exclusive_scan, backend, counts.view(1, nb), offs.view(1, nb + 1), BS=BS)
    total = int(offs[-1])
    out = poisoned(total, dtype=x.dtype, value=math.nan if x.is_floating_point() else -7)
    idx = torch.full((total,), -7, dtype=I64)
    launch(compact_gather, backend, x, mask, offs, out, idx, BLK=BLK, BO=BO)
    return out, idx, counts, offs


def check_compaction(backend, x, mask, **tiles):
    out, idx, counts, offs = masked_select(backend, x, mask, **tiles)
    BLK = tiles.get("BLK", 64)
    want_counts = torch.tensor([int(mask[k:k + BLK].sum()) for k in range(0, x.shape[0], BLK)], dtype=I32)
    assert torch.equal(counts, want_counts)
    assert torch.equal(offs, torch.cat([torch.zeros(1, dtype=I64), want_counts.long().cumsum(0)]))
    assert torch.equal(idx, torch.nonzero(mask).flatten())
    want = torch.masked_select(x, mask)
    # bit for bit: -0.0 keeps its sign, NaN stays NaN
    assert torch.equal(out.isnan(), want.isnan())
    fin = ~want.isnan()
    assert torch.equal(out[fin], want[fin])
    if x.is_floating_point():
        assert torch.equal(out[fin].signbit(), want[fin].signbit())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, F64, I32, I64])
def test_masked_select_and_nonzero(backend, dtype, rng):
    """N = 1000 (16 blocks of 64, the last ragged), a mask of density 0.3: against torch.masked_select and
    torch.nonzero; values -0.0, NaN, +-inf (floats) or the extremes of the integer type among the selected ones;
    counts and offsets against a hand count."""
    N = 1000
    mask = torch.from_numpy(rng.random(N) < 0.3)
    mask[[0, 5, 999]] = True
    if dtype.is_floating_point:
        x = randn(rng, N, dtype=dtype) * 100
        x[0], x[5], x[999] = -0.0, math.nan, -math.inf
        x[mask.nonzero()[3]] = math.inf
    else:
        info = torch.iinfo(dtype)
        x = torch.from_numpy(rng.integers(info.min, info.max, N, dtype=np.int64)).to(dtype)
        x[0], x[5] = info.min, info.max
    check_compaction(backend, x, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("N", "which"), [(100, "none"), (100, "all"), (0, "none"), (1, "all"), (64, "last"),
                                          (129, "first")])
def test_masked_select_edges(backend, N, which, rng):
    """An all-false mask (no output: the gather's grid is empty), an all-true one (the identity), N = 0 (no blocks,
    the offsets [0]), one element, one true element at the end of an exact block, one at the start of a block left
    over (129 = 2 x 64 + 1); the scan's tiles of 8 counts (several tiles, the total carried)."""
    x = randn(rng, N) if N else torch.zeros(0)
    mask = torch.zeros(N, dtype=torch.bool)
    if which == "all":
        mask[:] = True
    elif which == "last":
        mask[-1] = True
    elif which == "first":
        mask[128] = True
    check_compaction(backend, x, mask, BS=8)


# ---- 2. differential attention (Diff Transformer) -------------------------------------------------------------------
def _online_update(s, m, l, acc, vt, p16):
    """One key block of an online softmax: m, l, acc updated by the (BM, BN) scores s (masked to -inf), values vt."""
    mnew = ts.RegVec[ts.f32, s.shape[0]]()
    ts.row_max(mnew, s, m)                            # m is -inf only while every score so far is masked
    alpha = ts.RegVec[ts.f32, s.shape[0]]()
    ts.sub(alpha, m, mnew)
    ts.exp(alpha, alpha)
    ts.sub_row(s, s, mnew)
    ts.exp(s, s)
    ts.mul(l, l, alpha)
    ts.row_sum(l, s, l)
    ts.mul_row(acc, acc, alpha)
    ts.copy(p16, s)
    ts.mma_AB(acc, p16, vt, acc)
    ts.copy(m, mnew)


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[1], BM), Q.shape[0]))
def diff_attention(Q, K, V, SUBW, O, lam: float, scale: float, out_scale: float, eps: float, *, D: int = 16,
                   BM: int = 16, BN: int = 16):
    """O = RMSNorm_2D((softmax(q1 k1^T scale) - lam softmax(q2 k2^T scale)) V) SUBW out_scale, causal: Q, K (BH, T,
    2D) each head's two halves q1 | q2, k1 | k2; V, O (BH, T, 2D). Grid: (query blocks, BH)."""
    i, bh = ts.block_id(0), ts.block_id(1)
    T = Q.shape[1]
    q1, q2 = ts.SharedTile[Q.dtype, BM, D](), ts.SharedTile[Q.dtype, BM, D]()
    ts.load(q1, Q, at=(bh, i, 0))
    ts.load(q2, Q, at=(bh, i, 1))
    k1, k2 = ts.SharedTile[K.dtype, BN, D](), ts.SharedTile[K.dtype, BN, D]()
    vt = ts.SharedTile[V.dtype, BN, 2 * D]()
    m1, m2, l1, l2 = (ts.RegVec[ts.f32, BM]() for _ in range(4))
    for m in (m1, m2):
        ts.neg_infty(m)
    for l in (l1, l2):
        ts.zero(l)
    acc1, acc2 = ts.RegTile[ts.f32, BM, 2 * D](), ts.RegTile[ts.f32, BM, 2 * D]()
    ts.zero(acc1)
    ts.zero(acc2)
    s1, s2 = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    p16 = ts.RegTile[V.dtype, BM, BN]()
    rows, cols = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BN]()
    ts.arange(rows, i * BM)
    keep = ts.RegTile[ts.bool_, BM, BN]()
    kin = ts.RegVec[ts.bool_, BN]()
    for j in ts.range(ts.cdiv(ts.smin((i + 1) * BM, T), BN)):   # key blocks up to the diagonal
        ts.load(k1, K, at=(bh, j, 0))
        ts.load(k2, K, at=(bh, j, 1))
        ts.load(vt, V, at=(bh, j, 0))
        ts.arange(cols, j * BN)
        ts.ge(keep, ts.per_row(rows), ts.per_col(cols))           # causal: key <= query
        ts.lt(kin, cols, T)
        ts.logical_and(keep, keep, ts.per_col(kin))               # keys past T
        for s, q, k, m, l, acc in ((s1, q1, k1, m1, l1, acc1), (s2, q2, k2, m2, l2, acc2)):
            ts.zero(s)
            ts.mma_ABt(s, q, k, s)
            ts.mul(s, s, scale)
            ts.where(s, keep, s, -math.inf)
            _online_update(s, m, l, acc, vt, p16)
    ts.div_row(acc1, acc1, l1)
    ts.div_row(acc2, acc2, l2)
    ts.mul(acc2, acc2, lam)
    ts.sub(acc1, acc1, acc2)                          # (BM, 2D) the differential attention's output
    sq = ts.RegTile[ts.f32, BM, 2 * D]()
    ms = ts.RegVec[ts.f32, BM]()
    ts.mul(sq, acc1, acc1)
    ts.row_sum(ms, sq)
    ts.mul(ms, ms, 1.0 / (2 * D))
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    ts.mul_row(acc1, acc1, ms)
    w = ts.RegVec[ts.f32, 2 * D]()
    ts.load(w, SUBW, at=(0,))
    ts.mul(acc1, acc1, ts.per_col(w))
    ts.mul(acc1, acc1, out_scale)
    out = ts.RegTile[O.dtype, BM, 2 * D]()
    ts.copy(out, acc1)
    ts.store(O, out, at=(bh, i, 0))


def diff_attention_ref(q, k, v, w, lam, scale, out_scale, eps):
    q, k, v, w = q.double(), k.double(), v.double(), w.double()
    D = q.shape[-1] // 2
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a = [torch.softmax((q[..., h * D:(h + 1) * D] @ k[..., h * D:(h + 1) * D].transpose(1, 2) * scale)
                       .masked_fill(~causal, -math.inf), -1) for h in (0, 1)]
    o = (a[0] - lam * a[1]) @ v
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * w * out_scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("BH", "T", "lam", "qscale"), [(3, 37, 0.8, 1.0), (2, 16, 0.0, 1.0), (1, 21, 0.3, 30.0),
                                                        (1, 1, 0.5, 1.0)])
def test_diff_attention(backend, dtype, BH, T, lam, qscale, rng):
    """Against float64 torch: T = 37 (three query blocks, the last ragged, key blocks to the diagonal), lam = 0 (the
    first map alone), scores of +-hundreds (q times 30: the online maximum moves by hundreds between blocks), one
    token (each map the identity: (1 - lam) v, normalized)."""
    D = 16
    q, k, v = (randn(rng, BH, T, 2 * D, dtype=dtype) for _ in range(3))
    q = (q.float() * qscale).to(dtype)
    w = randn(rng, 2 * D) * 0.2 + 1
    scale, out_scale, eps = 1 / math.sqrt(D), 1 - 0.8, 1e-5
    o = poisoned(BH, T, 2 * D, dtype=dtype)
    launch(diff_attention, backend, q, k, v, w, o, lam, scale, out_scale, eps, D=D)
    want = diff_attention_ref(q, k, v, w, lam, scale, out_scale, eps)
    # 16-bit probabilities before the product, then a normalization that divides by a small RMS: relative error
    torch.testing.assert_close(o.double(), want, rtol={F32: 1e-4, F16: 2e-2, BF: 1e-1}[dtype],
                               atol={F32: 1e-4, F16: 2e-2, BF: 1e-1}[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_diff_attention_of_equal_halves_is_zero(backend, rng):
    """lam = 1 and q1 = q2, k1 = k2: the two maps are the same numbers computed the same way, so the difference is
    exactly 0 and its RMSNorm 0 (0 * rsqrt(eps)), with no NaN from padding keys or rows past T."""
    BH, T, D = 2, 29, 16
    half = randn(rng, BH, T, D)
    q = torch.cat([half, half], -1)
    kh = randn(rng, BH, T, D)
    k = torch.cat([kh, kh], -1)
    v = randn(rng, BH, T, 2 * D)
    o = poisoned(BH, T, 2 * D)
    launch(diff_attention, backend, q, k, v, torch.ones(2 * D), o, 1.0, 0.25, 0.2, 1e-5, D=D)
    assert (o == 0).all()


# ---- 3. Chamfer distance: nearest neighbours between ragged point clouds ---------------------------------------------
@ts.kernel(grid=lambda P, BN: (ts.cdiv(P.shape[2], BN), P.shape[0]))
def nearest(P, Q, PLEN, QLEN, DIST, IDX, *, BN: int = 16, BM: int = 32):
    """For each point n < PLEN[b] of P (B, 3, N) its nearest m < QLEN[b] of Q (B, 3, M) (coordinate-major views of
    (B, N, 3) clouds): DIST[b, n] its squared distance, IDX[b, n] the first m attaining it; an empty Q gives inf and
    -1. Points past the lengths are padding (any value); DIST and IDX are not written past PLEN[b]. Grid: (point
    blocks, B)."""
    i, b = ts.block_id(0), ts.block_id(1)
    wd = work_dtype(P.dtype)
    plen, qlen = ts.load_scalar(PLEN, b), ts.load_scalar(QLEN, b)
    pc = [ts.RegVec[wd, BN]() for _ in range(3)]
    qc = [ts.RegVec[wd, BM]() for _ in range(3)]
    for c in range(3):
        ts.load(pc[c], P, at=(b, c, i))
    best, tmin = ts.RegVec[wd, BN](), ts.RegVec[wd, BN]()
    bidx, tidx = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN]()   # i32 in registers: a cloud of < 2**31 points
    ts.pos_infty(best)
    ts.fill(bidx, -1)
    d, t = ts.RegTile[wd, BN, BM](), ts.RegTile[wd, BN, BM]()
    cols = ts.RegVec[ts.i32, BM]()
    keep = ts.RegVec[ts.bool_, BM]()
    at = ts.RegTile[ts.bool_, BN, BM]()
    cand = ts.RegTile[ts.i32, BN, BM]()
    better = ts.RegVec[ts.bool_, BN]()
    for j in ts.range(ts.cdiv(qlen, BM)):
        ts.zero(d)
        for c in range(3):
            ts.load(qc[c], Q, at=(b, c, j))
            ts.zero(t)
            ts.add(t, t, ts.per_row(pc[c]))
            ts.sub(t, t, ts.per_col(qc[c]))           # p_c - q_c, exact differences (no |p|^2 - 2pq + |q|^2)
            ts.mul(t, t, t)
            ts.add(d, d, t)
        ts.arange(cols, j * BM)
        ts.lt(keep, cols, qlen)
        ts.where(d, ts.per_col(keep), d, math.inf)    # padding (NaN in the tests) is never a neighbour
        ts.row_min(tmin, d)
        ts.eq(at, d, ts.per_row(tmin))
        ts.where(cand, at, ts.per_col(cols), 2**31 - 1)
        ts.row_min(tidx, cand)                        # the first column attaining the tile's minimum
        ts.lt(better, tmin, best)                     # strictly: an earlier tile keeps a tie
        ts.where(best, better, tmin, best)
        ts.where(bidx, better, tidx, bidx)
    rows = ts.RegVec[ts.i64, BN]()
    ts.arange(rows, i * BN)
    mine = ts.RegVec[ts.bool_, BN]()
    ts.lt(mine, rows, plen)
    out = ts.RegVec[DIST.dtype, BN]()
    ts.copy(out, best)
    ts.store(DIST, out, at=(b, i), mask=mine)
    idx = ts.RegVec[IDX.dtype, BN]()
    ts.copy(idx, bidx)
    ts.store(IDX, idx, at=(b, i), mask=mine)


def nearest_ref(p, q, plen, qlen):
    """float64 squared distances to the nearest point and its first index, per batch, over the valid prefixes."""
    B, N = p.shape[:2]
    dist, idx = torch.full((B, N), math.nan, dtype=F64), torch.full((B, N), -9, dtype=I64)
    for b in range(B):
        n, m = int(plen[b]), int(qlen[b])
        if m == 0:
            dist[b, :n], idx[b, :n] = math.inf, -1
            continue
        dd = ((p[b, :n, None].double() - q[b, None, :m].double()) ** 2).sum(-1)
        dist[b, :n], idx[b, :n] = dd.min(1)
    return dist, idx


def chamfer(backend, p, q, plen, qlen, ddtype=F32):
    """(dist, idx) of p's points in q, by one launch over coordinate-major views; outputs poisoned."""
    dist = poisoned(*p.shape[:2], dtype=ddtype)
    idx = torch.full(p.shape[:2], -9, dtype=I64)
    launch(nearest, backend, p.transpose(1, 2), q.transpose(1, 2), plen, qlen, dist, idx)
    return dist, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, F64])
def test_chamfer_distance(backend, dtype, rng):
    """Both directions of the Chamfer distance of 3 ragged batches (lengths 37 / 70 / 1 in P, 70 / 5 / 0 in Q: an empty
    cloud gives inf and -1), the padding past each length NaN; a point of P equal to two points of Q in different
    tiles (distance 0, index the first), two equal points in one tile; the loss as pytorch3d's chamfer_distance sums
    it, from the kernel's distances, against float64."""
    B, N, M = 3, 70, 70
    p, q = randn(rng, B, N, 3, dtype=dtype), randn(rng, B, M, 3, dtype=dtype)
    plen, qlen = torch.tensor([37, 70, 1], dtype=I32), torch.tensor([70, 5, 0], dtype=I64)
    q[0, 40] = q[0, 5]
    q[0, 9] = q[0, 7]
    p[0, 3] = q[0, 5]
    p[0, 4] = q[0, 9]
    for b in range(B):
        p[b, plen[b]:] = math.nan
        q[b, qlen[b]:] = math.nan
    wd = F64 if dtype is F64 else F32
    for a, c, alen, clen in ((p, q, plen, qlen), (q, p, qlen, plen)):
        dist, idx = chamfer(backend, a, c, alen, clen, ddtype=wd)
        wdist, widx = nearest_ref(a, c, alen, clen)
        valid = ~wdist.isnan()
        assert torch.equal(dist.isnan(), ~valid) and bool((idx[~valid] == -9).all())   # nothing past a length
        close(dist[valid], wdist[valid], scale=4)
        fin = wdist.isfinite()
        # the index attains the minimum (a near-tie may round either way in f32); exact where ties are exact
        got_at = torch.tensor([((a[b, n].double() - c[b, idx[b, n]].double()) ** 2).sum().item()
                               for b, n in fin.nonzero().tolist()], dtype=F64)
        close(got_at, wdist[fin], dtype=wd, scale=4)
        assert bool((idx[valid & ~fin] == -1).all())
    dist, idx = chamfer(backend, p, q, plen, qlen, ddtype=wd)
    assert dist[0, 3].item() == 0 and idx[0, 3].item() == 5
    assert dist[0, 4].item() == 0 and idx[0, 4].item() == 7
    assert torch.isinf(dist[2, 0]) and idx[2, 0].item() == -1
    loss = sum(dist[b, :plen[b]].double().mean() for b in (0, 1))         # batch 2's Q is empty: left out
    want = sum(nearest_ref(p, q, plen, qlen)[0][b, :plen[b]].mean() for b in (0, 1))
    close(loss, want, dtype=wd, scale=4)


# ---- 4. segmented cumsum along rows wider than a tile, restarted at flags --------------------------------------------
@ts.kernel(grid=lambda X: (X.shape[0],))
def segmented_cumsum(X, FLAGS, Y, *, BN: int = 16):
    """Y[r, c] = sum of X[r, c'] for c' <= c in c's segment: a segment starts at every column whose FLAGS[r, c] is
    true (and at column 0). A program per row, its (1, BN) tiles in turn: inside a tile each element's segment number
    (the flags up to it) from a triangle of compares, the in-segment sums by an (BN, BN) mask's column sums; the carry
    into the next tile is the last segment's sum, or the old carry plus the tile's sum where the tile has no flag.
    Only the elements of a segment reach its sums: a NaN stays in its segment. Grid: (rows,)."""
    r = ts.block_id(0)
    wd = work_dtype(X.dtype)
    tri = ts.RegTile[ts.bool_, BN, BN]()
    _triangle(tri, BN)                                # tri[c', c] = c' <= c
    carry = ts.RegVec[wd, 1]()
    ts.zero(carry)
    x, f = ts.RegTile[wd, 1, BN](), ts.RegTile[ts.i32, 1, BN]()
    xv, fv = ts.RegVec[wd, BN](), ts.RegVec[ts.i32, BN]()
    seg, sums = ts.RegVec[ts.i32, BN](), ts.RegVec[wd, BN]()
    cnt = ts.RegTile[ts.i32, BN, BN]()
    same = ts.RegTile[ts.bool_, BN, BN]()
    part = ts.RegTile[wd, BN, BN]()
    y = ts.RegTile[wd, 1, BN]()
    head = ts.RegTile[ts.bool_, 1, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(cols)
    last_col = ts.RegTile[ts.bool_, 1, BN]()
    ts.zero(f)
    ts.add(f, f, ts.per_col(cols))
    ts.eq(last_col, f, BN - 1)
    out = ts.RegTile[Y.dtype, 1, BN]()
    for t in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(r, t))
        ts.load(f, FLAGS, at=(r, t))                  # bools as 0 / 1; past the row's end 0
        ts.col_sum(xv, x)                             # (BN,) the tile's row as vectors
        ts.col_sum(fv, f)
        ts.where(cnt, tri, ts.per_row(fv), 0)
        ts.col_sum(seg, cnt)                          # (BN,) flags up to each column: its segment in the tile
        ts.eq(same, ts.per_row(seg), ts.per_col(seg))
        ts.logical_and(same, same, tri)               # [c', c]: c' <= c in c's segment
        ts.where(part, same, ts.per_row(xv), 0)
        ts.col_sum(sums, part)                        # (BN,) in-tile segmented inclusive sums
        ts.zero(y)
        ts.add(y, y, ts.per_col(sums))
        ts.zero(f)
        ts.add(f, f, ts.per_col(seg))
        ts.eq(head, f, 0)                             # columns still in the segment carried in
        ts.add_row(x, y, carry)
        ts.where(y, head, x, y)
        ts.copy(out, y)
        ts.store(Y, out, at=(r, t))
        # the carry: y's last column (columns past the row's end add 0 to the last segment, so the same there)
        ts.where(x, last_col, y, 0)
        ts.row_sum(carry, x)


def segmented_cumsum_ref(x, flags):
    y = torch.empty_like(x, dtype=torch.float64 if x.is_floating_point() else torch.int64)
    for r in range(x.shape[0]):
        s = 0
        for c in range(x.shape[1]):
            s = (0 if flags[r, c] or c == 0 else s) + (x[r, c].double() if x.is_floating_point() else int(x[r, c]))
            y[r, c] = s
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, F64, I32, I64])
def test_segmented_cumsum(backend, dtype, rng):
    """Against a hand loop (float64 / exact integers): rows of 53 (four tiles of 16, the last ragged) with flags at
    random, a flag on a tile's first column (the carry dropped there) and on its last, a row with no flag (one segment
    across every tile), a row all flags (y = x); a NaN (floats) poisoning only its own segment; i32 sums wrapping."""
    R, N = 5, 53
    flags = torch.from_numpy(rng.random((R, N)) < 0.15)
    flags[0, 17:31] = False
    flags[0, [16, 31, 32]] = True
    flags[1] = False
    flags[2] = True
    x = randn(rng, R, N, dtype=dtype) * 4 if dtype.is_floating_point else \
        torch.from_numpy(rng.integers(-2**30, 2**30, (R, N))).to(dtype)
    if dtype.is_floating_point:
        x[0, 20] = math.nan                           # poisons columns 20..30 of row 0 only
    y = poisoned(R, N, dtype=dtype, value=math.nan if dtype.is_floating_point else -7)
    launch(segmented_cumsum, backend, x, flags, y)
    want = segmented_cumsum_ref(x, flags)
    if dtype.is_floating_point:
        assert torch.equal(y.isnan(), want.isnan())
        assert bool(y[0, 20:31].isnan().all()) and not y[0, 31:].isnan().any()
        close(y, want, dtype=dtype, scale=8)
        assert torch.equal(y[2], x[2])
    else:
        bits = 32 if dtype is I32 else 64
        assert torch.equal(y.long(), (want + 2**(bits - 1)) % 2**bits - 2**(bits - 1) if bits == 32 else want)
