"""Round 8 of held-out kernels, continued (see test_heldout_round8.py's docstring): a k-means step (nearest centroid
by ||x||^2 - 2 x.c + ||c||^2 with ties to the first centroid, then the centroids' sums and counts by a one-hot mma_AtB
added atomically, rows past the end masked out of the counts); cross-entropy's backward with ignored labels, online
over the vocabulary; grouped-query attention with a tanh logit soft-cap and per-batch key lengths read from a stride-0
view; a weighted histogram of floats (a floor made from a truncating conversion, the right edge closed, NaN and inf
outside); a stable descending sort of each row (ranks by pairwise compares in a three-deep loop nest, NaN first, as
torch); a fused residual add + RMSNorm written in place; and products with dimensions under 16 on Triton.

Bugs these found, fixed in the compiler, each kept here as its regression test:
- Triton: an mma with a dimension under 16 (an 8-row block, a (D/2, D) widening matrix, a rank-4 factor) was
  refused ("the Triton backend's mma needs every tile dimension >= 16") though the reference ran it; such products
  are now summed from their f32 products, a (M, K, N) broadcast (backends.triton.codegen._e_mma):
  test_small_products_on_triton and test_rope_interleaved_by_pair_swap (test_heldout_round8.py);
- language: a Python bool as a bool_ mask's value (fill(m, True), tril(m, m, d, False)) was refused ("value must be
  a Python number"); it is the mask's value now, and still refused for a tile of numbers (lang.ops._element_value):
  test_masks_filled_with_python_bools, test_a_bool_into_a_number_tile_is_refused;
- language: an integer div / rem of a tile by the constant 0 made 0 on the reference (undefined on a GPU); refused
  naming the op and the tile (lang.ops._int_scalar): test_an_integer_division_by_a_constant_zero_is_refused.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]
POISON = -77.0


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. k-means: the nearest centroid (ties to the first), then the centroids' sums and counts, atomically ---------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def nearest_centroid(X, C, IDX, DIST, *, BM: int = 16, BK: int = 16, D: int = 16):
    """IDX[r] = argmin_k ||X[r] - C[k]||^2 (the first k of the least), DIST[r] that least squared distance; X (N, D),
    C (K, D) with D <= the tile's D. K = 0 leaves IDX 0 and DIST inf."""
    i = ts.block_id(0)
    K = C.shape[0]
    x = ts.RegTile[ts.f32, BM, D]()
    c = ts.RegTile[ts.f32, BK, D]()
    s = ts.RegTile[ts.f32, BM, BK]()
    xx = ts.RegVec[ts.f32, BM]()
    cc = ts.RegVec[ts.f32, BK]()
    col = ts.RegVec[ts.i64, BK]()
    idx = ts.RegTile[ts.i64, BM, BK]()
    hit = ts.RegTile[ts.bool_, BM, BK]()
    tmin = ts.RegVec[ts.f32, BM]()
    targ = ts.RegVec[ts.i64, BM]()
    best = ts.RegVec[ts.f32, BM]()
    besti = ts.RegVec[ts.i64, BM]()
    better = ts.RegVec[ts.bool_, BM]()
    ts.load(x, X, at=(i, 0))
    ts.row_sum(xx, x * x)
    ts.pos_infty(best)
    ts.zero(besti)
    for kb in ts.range(ts.cdiv(K, BK)):
        ts.load(c, C, at=(kb, 0))
        ts.row_sum(cc, c * c)
        ts.zero(s)
        ts.mma_ABt(s, x, c, s)
        ts.mul(s, s, -2.0)
        ts.add(s, s, ts.per_row(xx))
        ts.add(s, s, ts.per_col(cc))
        ts.right_fill(s, s, K - kb * BK, math.inf)   # centroids past K
        ts.row_min(tmin, s)
        ts.arange(col, kb * BK)
        ts.eq(hit, s, ts.per_row(tmin))
        ts.where(idx, hit, ts.per_col(col), 2**62)
        ts.row_min(targ, idx)                        # the first column of the tile's least
        ts.lt(better, tmin, best)                    # strictly less: an earlier tile keeps a tie
        ts.where(best, better, tmin, best)
        ts.where(besti, better, targ, besti)
    ts.store(IDX, besti, at=(i,))
    ts.store(DIST, best, at=(i,))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def centroid_sums(X, IDX, SUMS, COUNTS, *, BM: int = 16, BK: int = 16, D: int = 16):
    """SUMS[k] += sum of the rows X[r] with IDX[r] == k, COUNTS[k] += their number (ids outside [0, K) in no
    centroid): a one-hot (BM, BK) tile per centroid block, its transpose times X, added atomically."""
    i = ts.block_id(0)
    n, K = X.shape[0], SUMS.shape[0]
    x = ts.RegTile[ts.f32, BM, D]()
    a = ts.RegVec[ts.i64, BM]()
    pos = ts.RegVec[ts.i32, BM]()
    inside = ts.RegVec[ts.bool_, BM]()
    ids = ts.RegVec[ts.i64, BK]()
    hit = ts.RegTile[ts.bool_, BM, BK]()
    oh = ts.RegTile[ts.f32, BM, BK]()
    ohc = ts.RegTile[COUNTS.dtype, BM, BK]()
    cnt = ts.RegVec[COUNTS.dtype, BK]()
    sums = ts.RegTile[ts.f32, BK, D]()
    ts.load(x, X, at=(i, 0))
    ts.load(a, IDX, at=(i,))
    ts.arange(pos, i * BM)
    ts.lt(inside, pos, n)                            # rows past N read id 0: they must not count for centroid 0
    for kb in ts.range(ts.cdiv(K, BK)):
        ts.arange(ids, kb * BK)
        ts.eq(hit, ts.per_row(a), ts.per_col(ids))
        ts.logical_and(hit, hit, ts.per_row(inside))
        ts.where(oh, hit, 1.0, 0.0)
        ts.zero(sums)
        ts.mma_AtB(sums, oh, x, sums)
        ts.atomic_add(SUMS, sums, at=(kb, 0))
        ts.where(ohc, hit, 1, 0)
        ts.col_sum(cnt, ohc)
        ts.atomic_add(COUNTS, cnt, at=(kb,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "K", "D"), [(50, 21, 5), (16, 16, 16), (7, 1, 3), (0, 4, 4), (5, 0, 4)])
def test_kmeans_step(backend, dtype, N, K, D, rng):
    """Small integers: every distance exact in f32, so ties are real ties (torch.argmin takes the first too)."""
    x = torch.from_numpy(rng.integers(-3, 4, (N, D))).to(dtype)
    c = torch.from_numpy(rng.integers(-3, 4, (K, D))).to(dtype)
    if K > 2:
        c[K - 1] = c[1]                              # a duplicate centroid: never chosen over the first
    idx, dist = torch.full((N,), -5, dtype=I64), poisoned(N)
    launch(nearest_centroid, backend, x, c, idx, dist)
    d2 = ((x.double()[:, None, :] - c.double()[None, :, :]) ** 2).sum(-1)
    if K:
        assert torch.equal(idx, d2.argmin(1)) and torch.equal(dist.double(), d2.min(1).values)
    else:
        assert (idx == 0).all() and (dist == math.inf).all()
    ids = idx.clone()
    if N > 3:
        ids[0], ids[1] = -1, K                       # in no centroid
    for cdt in (I32, torch.float32):
        sums, counts = torch.zeros(K, D), torch.zeros(K, dtype=cdt)
        launch(centroid_sums, backend, x, ids, sums, counts)
        ok = (ids >= 0) & (ids < K)
        want = torch.zeros(K, D, dtype=F64).index_add_(0, ids[ok], x.double()[ok])
        assert torch.equal(sums.double(), want)      # sums of small integers: exact
        assert torch.equal(counts, torch.bincount(ids[ok], minlength=K).to(cdt))


# ---- 2. cross-entropy's backward: softmax minus the one-hot label, times g / n, online over the vocabulary -----------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def xent_backward(X, Y, DX, LOSS, g_over_n: float, ignore: int, *, BM: int = 8, BN: int = 32):
    """LOSS[r] = logsumexp(X[r]) - X[r, Y[r]] (0 where Y[r] == ignore); DX = (softmax(X) - onehot(Y)) g_over_n, rows
    with Y == ignore 0. Pass 1 carries the max, the sum and the label's logit across the vocabulary's tiles."""
    i = ts.block_id(0)
    V = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    dx = ts.RegTile[DX.dtype, BM, BN]()
    y = ts.RegVec[ts.i64, BM]()
    col = ts.RegVec[ts.i64, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    xy = ts.RegVec[ts.f32, BM]()
    valid = ts.RegVec[ts.bool_, BM]()
    coef = ts.RegVec[ts.f32, BM]()
    ts.load(y, Y, at=(i,))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(xy)
    for j in ts.range(ts.cdiv(V, BN)):
        ts.load(x, X, at=(i, j))
        ts.right_fill(x, x, V - j * BN, -math.inf)
        ts.row_max(mn, x, m)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(t, x, ts.per_row(safe))
        ts.exp(t, t)
        ts.row_sum(l_, t, l_)
        ts.copy(m, mn)
        ts.arange(col, j * BN)
        ts.eq(hit, ts.per_col(col), ts.per_row(y))
        ts.where(t, hit, x, 0.0)
        ts.row_sum(xy, t, xy)
    ts.ne(valid, y, ignore)
    ts.sub(xy, m, xy)                                # the max less the label's logit first: no cancellation
    ts.log(alpha, l_)
    ts.add(xy, xy, alpha)                            # logsumexp - x_y
    ts.where(xy, valid, xy, 0.0)
    ts.store(LOSS, xy, at=(i,))
    ts.where(coef, valid, g_over_n, 0.0)
    for j in ts.range(ts.cdiv(V, BN)):
        ts.load(x, X, at=(i, j))
        ts.sub(x, x, ts.per_row(m))
        ts.exp(x, x)
        ts.div(x, x, ts.per_row(l_))
        ts.arange(col, j * BN)
        ts.eq(hit, ts.per_col(col), ts.per_row(y))
        ts.where(t, hit, 1.0, 0.0)
        ts.sub(x, x, t)
        ts.mul(x, x, ts.per_row(coef))
        ts.copy(dx, x)
        ts.store(DX, dx, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "V"), [(13, 100), (8, 32), (1, 1), (3, 7), (0, 10)])
def test_cross_entropy_backward(backend, dtype, M, V, rng):
    x = randn(rng, M, V, dtype=dtype) * 4
    y = torch.from_numpy(rng.integers(0, V, M)).to(I64)
    if M > 4 and V > 4:
        y[1] = -100                                  # ignored
        x[2, (y[2] + 1) % V] = -6e4 if dtype == F16 else -1e30
        x[3] = 3e4 if dtype == F16 else 1e4          # huge logits: the max is subtracted first
        x[4, y[4]] = -math.inf                       # the label's logit -inf: loss inf, its gradient -g/n
    n_valid, g = int((y != -100).sum()), 3.0
    xd = x.double().requires_grad_()
    loss = F.cross_entropy(xd, y, ignore_index=-100, reduction="none")
    (loss.sum() * g / max(n_valid, 1)).backward()
    dx, lo = poisoned(M, V, dtype=dtype), poisoned(M)
    launch(xent_backward, backend, x, y, dx, lo, g / max(n_valid, 1), -100)
    close(lo, loss.detach().float(), scale=8)
    close(dx, xd.grad.to(dtype), scale=2)


# ---- 3. grouped-query attention with a tanh soft-cap on the logits and per-batch key lengths (stride-0 view) -----
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def gqa_softcap(Q, K, V, LEN, O, scale: float, cap: float, *, CAUSAL: bool = False, BM: int = 16, BN: int = 16,
                D: int = 16):
    """O[b, h] = softmax(cap tanh(Q K^T scale / cap), keys < LEN[b, q] (and <= q if CAUSAL)) V for Q (B, Hq, T, D),
    K and V (B, Hkv, S, D), query head h reading kv head h // (Hq / Hkv); LEN (B, T) i32 (a (B,) expanded: stride 0
    along T). tanh(z) = 2 sigmoid(2 z) - 1. A query with no key gets 0."""
    i, bh = ts.block_id(0), ts.block_id(1)
    hq = Q.shape[1]
    b, h = bh // hq, bh % hq
    hk = h // (hq // K.shape[1])
    n = K.shape[2]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.RegTile[Q.dtype, BN, D]()
    v = ts.RegTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    causal = ts.RegTile[ts.bool_, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    ln = ts.RegVec[ts.i32, BM]()
    qpos = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.load(ln, LEN, at=(b, i))
    ts.arange(qpos, i * BM)
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(k, K, at=(b, hk, j, 0))
        ts.load(v, V, at=(b, hk, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, 2.0 * scale / cap)
        ts.sigmoid(s, s)
        ts.mul(s, s, 2.0 * cap)
        ts.sub(s, s, cap)                            # cap tanh(s scale / cap)
        ts.arange(kpos, j * BN)
        ts.lt(keep, ts.per_col(kpos), ts.per_row(ln))
        if CAUSAL:
            ts.le(causal, ts.per_col(kpos), ts.per_row(qpos))
            ts.logical_and(keep, keep, causal)
        ts.where(s, keep, s, -math.inf)
        ts.row_max(mn, s, m)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(s, s, ts.per_row(safe))
        ts.exp(s, s)
        ts.row_sum(l_, s, l_)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, mn)
    ts.gt(live, l_, 0.0)
    ts.where(l_, live, l_, 1.0)                      # no key: acc is 0, and stays 0
    ts.div(acc, acc, ts.per_row(l_))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("B", "Hq", "Hkv", "T", "S", "Dh"), [(2, 4, 2, 21, 37, 16), (1, 3, 1, 16, 5, 12),
                                                              (2, 2, 2, 1, 1, 16), (1, 2, 1, 0, 8, 16)])
def test_gqa_softcap_attention(backend, dtype, causal, B, Hq, Hkv, T, S, Dh, rng):
    q = randn(rng, B, Hq, T, Dh, dtype=dtype) * 3      # scores well past the cap: the tanh saturates
    k, v = randn(rng, B, Hkv, S, Dh, dtype=dtype), randn(rng, B, Hkv, S, Dh, dtype=dtype)
    lens = torch.from_numpy(rng.integers(0, S + 1, B)).to(I32)
    if B > 1:
        lens[0], lens[1] = 0, S                      # a batch with no keys (all zeros out), one with all
    scale, cap = Dh ** -0.5, 5.0
    o = poisoned(B, Hq, T, Dh, dtype=dtype)
    launch(gqa_softcap, backend, q, k, v, lens[:, None].expand(B, T), o, scale, cap, CAUSAL=causal)
    g = Hq // Hkv
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kd.transpose(2, 3) * scale
    s = cap * torch.tanh(s / cap)
    keep = torch.arange(S)[None, None, :] < lens[:, None, None].long()       # (B, 1, S)
    keep = keep[:, None] & (torch.arange(S)[None, :] <= torch.arange(T)[:, None] if causal else True)
    p = s.masked_fill(~keep, -math.inf).softmax(-1).nan_to_num(0.0)
    close(o, (p @ vd).to(dtype), scale=4)


# ---- 4. a weighted histogram of floats: a floor from a truncating conversion, the last bin's right edge closed ------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def histogram(X, W, HIST, lo: float, inv_width: float, *, BN: int = 64, BB: int = 16):
    """HIST[b] += sum of W[e] over the elements with floor((X[e] - lo) inv_width) == b, for nb = len(HIST) bins over
    [lo, lo + nb / inv_width]; an element at the right edge falls in the last bin (torch.histogram's rule); NaN,
    +-inf and everything outside in none."""
    j = ts.block_id(0)
    n, nb = X.shape[0], HIST.shape[0]
    x = ts.RegVec[ts.f32, BN]()
    w = ts.RegVec[ts.f32, BN]()
    back = ts.RegVec[ts.f32, BN]()
    bi = ts.RegVec[ts.i32, BN]()
    one = ts.RegVec[ts.i32, BN]()
    pos = ts.RegVec[ts.i32, BN]()
    ok = ts.RegVec[ts.bool_, BN]()
    t = ts.RegVec[ts.bool_, BN]()
    ids = ts.RegVec[ts.i32, BB]()
    hit = ts.RegTile[ts.bool_, BN, BB]()
    wt = ts.RegTile[ts.f32, BN, BB]()
    hs = ts.RegVec[ts.f32, BB]()
    hout = ts.RegVec[HIST.dtype, BB]()
    ts.load(x, X, at=(j,))
    ts.load(w, W, at=(j,))
    ts.sub(x, x, lo)
    ts.mul(x, x, inv_width)                          # the bin's position, fractional
    ts.copy(bi, x)                                   # truncated toward zero (and saturated)
    ts.copy(back, bi)
    ts.gt(t, back, x)                                # truncation went up (x < 0): floor is one less
    ts.where(one, t, 1, 0)
    ts.sub(bi, bi, one)
    ts.eq(t, x, nb)
    ts.where(bi, t, nb - 1, bi)                      # the right edge: the last bin
    ts.ge(ok, x, 0.0)
    ts.le(t, x, nb)
    ts.logical_and(ok, ok, t)                        # (NaN compares false: in no bin)
    ts.arange(pos, j * BN)
    ts.lt(t, pos, n)
    ts.logical_and(ok, ok, t)
    for bb in ts.range(ts.cdiv(nb, BB)):
        ts.arange(ids, bb * BB)
        ts.eq(hit, ts.per_row(bi), ts.per_col(ids))
        ts.logical_and(hit, hit, ts.per_row(ok))
        ts.where(wt, hit, ts.per_row(w), 0.0)
        ts.col_sum(hs, wt)
        ts.copy(hout, hs)
        ts.atomic_add(HIST, hout, at=(bb,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hdt", [torch.float32, F64, I32])
@pytest.mark.parametrize(("N", "nb"), [(1000, 37), (64, 16), (5, 1), (0, 3), (20, 0)])
def test_weighted_histogram(backend, dtype, hdt, N, nb, rng):
    """Values k / 8 (exact in every dtype, as are their bins' positions) over bins of width 1/4 from lo = -1; integer
    weights for an i32 histogram."""
    lo, width = -1.0, 0.25
    x = torch.from_numpy(rng.integers(-24, 8 * (lo + nb * width) + 24, N) / 8).to(dtype)
    if N > 6:
        x[:6] = torch.tensor([math.nan, math.inf, -math.inf, lo + nb * width, lo, -1e30 if dtype != F16 else -6e4])
    w = torch.from_numpy(rng.integers(1, 5, N)).float() if hdt is I32 else randn(rng, N)
    hist = torch.zeros(nb, dtype=hdt)
    launch(histogram, backend, x, w, hist, lo, 1 / width)
    f = (x.double() - lo) / width
    b = torch.where(f == nb, nb - 1, f.floor().nan_to_num(-1).clamp(-1, nb + 1)).long()
    ok = (b >= 0) & (b < nb)
    want = torch.zeros(nb, dtype=F64).index_add_(0, b[ok], w.double()[ok])
    close(hist.double(), want, torch.float32, scale=10)


# ---- 5. a stable descending sort of each row: ranks by pairwise compares (a three-deep loop nest), NaN first -------
@ts.kernel(grid=lambda X: (X.shape[0],))
def sort_rows(X, VALS, IDX, *, B: int = 16):
    """VALS[r], IDX[r] = torch.sort(X[r], descending=True, stable=True): element c goes to position rank(c), the
    number of elements c' that come before it (greater, or NaN over a number, or equal / both NaN with c' < c). Each
    output block gathers its elements by a one-hot sum over the candidates' blocks (exact: one term and zeros)."""
    r = ts.block_id(0)
    n = X.shape[1]
    xc = ts.RegVec[ts.f32, B]()
    xo = ts.RegVec[ts.f32, B]()
    pc = ts.RegVec[ts.i64, B]()
    po = ts.RegVec[ts.i64, B]()
    pout = ts.RegVec[ts.i64, B]()
    nanc = ts.RegVec[ts.bool_, B]()
    numc = ts.RegVec[ts.bool_, B]()
    nano = ts.RegVec[ts.bool_, B]()
    real = ts.RegVec[ts.bool_, B]()
    beats = ts.RegTile[ts.bool_, B, B]()
    t = ts.RegTile[ts.bool_, B, B]()
    cnt = ts.RegTile[ts.i64, B, B]()
    rank = ts.RegVec[ts.i64, B]()
    vsel = ts.RegTile[ts.f32, B, B]()
    isel = ts.RegTile[ts.i64, B, B]()
    vacc = ts.RegVec[ts.f32, B]()
    iacc = ts.RegVec[ts.i64, B]()
    vout = ts.RegVec[VALS.dtype, B]()
    nblk = ts.cdiv(n, B)
    for pb in ts.range(nblk):                        # output positions pb B ... pb B + B - 1
        ts.arange(pout, pb * B)
        ts.zero(vacc)
        ts.zero(iacc)
        for cb in ts.range(nblk):                    # candidates (the rows of the compare tiles)
            ts.load(xc, X, at=(r, cb))
            ts.arange(pc, cb * B)
            ts.ne(nanc, xc, xc)
            ts.logical_not(numc, nanc)
            ts.zero(rank)
            for ob in ts.range(nblk):                # the others (its columns)
                ts.load(xo, X, at=(r, ob))
                ts.arange(po, ob * B)
                ts.ne(nano, xo, xo)
                ts.eq(t, ts.per_col(xo), ts.per_row(xc))                  # equal numbers
                ts.logical_and(beats, ts.per_col(nano), ts.per_row(nanc))  # both NaN
                ts.logical_or(t, t, beats)
                ts.lt(beats, ts.per_col(po), ts.per_row(pc))
                ts.logical_and(t, t, beats)                               # tied, and c' before c
                ts.gt(beats, ts.per_col(xo), ts.per_row(xc))
                ts.logical_or(beats, beats, t)
                ts.logical_and(t, ts.per_col(nano), ts.per_row(numc))     # NaN over a number
                ts.logical_or(beats, beats, t)
                ts.lt(real, po, n)
                ts.logical_and(beats, beats, ts.per_col(real))            # past the row: nothing
                ts.where(cnt, beats, 1, 0)
                ts.row_sum(rank, cnt, rank)
            ts.eq(t, ts.per_row(rank), ts.per_col(pout))
            ts.lt(real, pc, n)
            ts.logical_and(t, t, ts.per_row(real))
            ts.where(vsel, t, ts.per_row(xc), 0.0)
            ts.col_sum(vacc, vsel, vacc)
            ts.where(isel, t, ts.per_row(pc), 0)
            ts.col_sum(iacc, isel, iacc)
        ts.copy(vout, vacc)
        ts.store(VALS, vout, at=(r, pb))
        ts.store(IDX, iacc, at=(r, pb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(3, 37), (2, 16), (4, 1), (0, 5), (3, 0)])
def test_stable_descending_sort(backend, dtype, M, N, rng):
    """Values from few distinct ones (many ties), with NaN, +-inf, -0.0 and 0.0 among them."""
    x = torch.from_numpy(rng.integers(-3, 4, (M, N)) / 2).to(dtype)
    if M and N > 8:
        x[0, :8] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, math.nan, -math.inf, 1e30]).to(dtype)
    vals, idx = poisoned(M, N, dtype=dtype), torch.full((M, N), -5, dtype=I64)
    launch(sort_rows, backend, x, vals, idx)
    want = torch.sort(x, dim=1, descending=True, stable=True)
    assert torch.equal(idx, want.indices)
    assert torch.equal(vals.isnan(), want.values.isnan())
    assert torch.equal(vals.nan_to_num(7.0), want.values.nan_to_num(7.0))


# ---- 6. a fused residual add + RMSNorm in place: R <- X + R, X <- rmsnorm(R) w (one tile per row) -----------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def add_rmsnorm_(X, R, W, eps: float, *, BM: int = 8, BN: int = 64):
    """h = X + R in f32; R = h (in R's dtype), X = h rstd(h) W (in X's dtype), rows of N <= BN elements."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegTile[ts.f32, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    ss = ts.RegVec[ts.f32, BM]()
    rs = ts.RegTile[R.dtype, BM, BN]()
    xs = ts.RegTile[X.dtype, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.load(r, R, at=(i, 0))
    ts.load(w, W, at=(0,))
    x += r
    ts.copy(rs, x)
    ts.store(R, rs, at=(i, 0))
    ts.row_sum(ss, x * x)
    ts.div(ss, ss, n)
    ts.add(ss, ss, eps)
    ts.rsqrt(ss, ss)
    ts.mul(x, x, ts.per_row(ss))
    ts.mul(x, x, ts.per_col(w))
    ts.copy(xs, x)
    ts.store(X, xs, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(19, 50), (8, 64), (1, 1), (0, 8)])
def test_fused_add_rmsnorm_in_place(backend, dtype, M, N, rng):
    x, r, w = randn(rng, M, N, dtype=dtype), randn(rng, M, N, dtype=dtype) * 2, randn(rng, N, dtype=dtype)
    if M > 2:
        r[1] = -x[1]                                 # h = 0 exactly: rstd = 1 / sqrt(eps), output 0
        x[2, 0] = 6e4 if dtype == F16 else 1e30      # a huge element: the row is (nearly) one-hot
    h = x.double() + r.double()
    want = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6) * w.double()
    if M > 2 and dtype != F16:
        want[2] = 0.0                                # 1e60 overflows f32's sum of squares: rstd 0, as torch's f32
    launch(add_rmsnorm_, backend, x, r, w, 1e-6)
    close(r, h.to(dtype))
    close(x, want.to(dtype), scale=4)


# ---- 7. products with a dimension under 16, each transposition, on every backend (Triton: not tl.dot) -------------
@ts.kernel(grid=lambda C: (1,))
def small_product(A, B, C, *, TA: bool = False, TB: bool = False, M: int = 8, N: int = 4, K: int = 2,
                  PREC: str = "ieee"):
    """C += op(A) @ op(B), op a transpose where TA / TB; one (M, N) tile."""
    a = ts.RegTile[A.dtype, *((K, M) if TA else (M, K))]()
    b = ts.RegTile[B.dtype, *((N, K) if TB else (K, N))]()
    acc = ts.RegTile[ts.f32, M, N]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.load(acc, C, at=(0, 0))
    mma = {(False, False): ts.mma_AB, (False, True): ts.mma_ABt, (True, False): ts.mma_AtB,
           (True, True): ts.mma_AtBt}[TA, TB]
    mma(acc, a, b, acc, input_precision=PREC)
    ts.store(C, acc, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float8_e4m3fn])
@pytest.mark.parametrize(("TA", "TB"), [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize(("M", "N", "K"), [(8, 4, 2), (1, 1, 1), (16, 2, 32), (2, 16, 16), (4, 8, 64)])
def test_small_products_on_triton(backend, dtype, TA, TB, M, N, K, rng):
    """Triton refused these (tl.dot takes no dimension under 16); ragged edges (a 5 x 3 A into an 8 x 2 tile) read
    zeros. 16-bit operands: exact products, an f32 sum."""
    m, n, k = max(M - 3, 1), max(N - 1, 1), max(K - 1, 1)
    a, b = randn(rng, *((k, m) if TA else (m, k)), dtype=dtype), randn(rng, *((n, k) if TB else (k, n)), dtype=dtype)
    c = randn(rng, m, n)
    want = (a.double().T if TA else a.double()) @ (b.double().T if TB else b.double()) + c.double()
    launch(small_product, backend, a, b, c, TA=TA, TB=TB, M=M, N=N, K=K)
    close(c, want.float(), scale=K)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_tf32_product_rounds_its_operands(backend):
    """input_precision="tf32" on a small product rounds the operands to 10 mantissa bits, as a large one does."""
    a = torch.full((4, 8), 1 + 2**-12)
    b = torch.ones(8, 2)
    c = torch.zeros(4, 2)
    launch(small_product, backend, a, b, c, M=4, N=2, K=8, PREC="tf32")
    assert torch.equal(c, torch.full((4, 2), 8.0))
    c = torch.zeros(4, 2)
    launch(small_product, backend, a, b, c, M=4, N=2, K=8)
    assert torch.equal(c, torch.full((4, 2), 8 * (1 + 2**-12)))


# ---- 7b. masks filled with Python bools: fill(m, True), tril / right_fill with value=False ---------------------------
@ts.kernel(grid=lambda Y, BM: (ts.cdiv(Y.shape[0], BM),))
def visible_keys(Y, n_keys: int, *, BM: int = 8, BN: int = 16):
    """Y[q] = the number of keys k < n_keys with k <= q, counted over key tiles of a mask made from True by
    tril(..., value=False) and right_fill(..., False)."""
    i = ts.block_id(0)
    m = ts.RegTile[ts.bool_, BM, BN]()
    c = ts.RegTile[ts.i32, BM, BN]()
    cnt = ts.RegVec[ts.i32, BM]()
    ts.zero(cnt)
    for j in ts.range(ts.cdiv(n_keys, BN)):
        ts.fill(m, True)
        ts.tril(m, m, i * BM - j * BN, False)
        ts.right_fill(m, m, n_keys - j * BN, value=False)
        ts.where(c, m, 1, 0)
        ts.row_sum(cnt, c, cnt)
    ts.store(Y, cnt, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Q", "n_keys"), [(37, 21), (5, 40), (16, 0)])
def test_masks_filled_with_python_bools(backend, Q, n_keys):
    """A Python bool is a bool_ mask's value (it was refused: "value must be a Python number ..., got bool True")."""
    y = torch.full((Q,), -5, dtype=I32)
    launch(visible_keys, backend, y, n_keys)
    assert torch.equal(y, (torch.arange(Q) + 1).clamp(max=n_keys).to(I32))


def test_a_bool_into_a_number_tile_is_refused():
    @ts.kernel(grid=lambda Y: (1,))
    def fill_true(Y):
        y = ts.RegVec[ts.f32, 16]()
        ts.fill(y, True)
        ts.store(Y, y, at=(0,))

    y = poisoned(16)
    with pytest.raises(TraceError, match=r"fill: value must be a Python number .*got bool True"):
        launch(fill_true, "reference", y)
    assert (y == POISON).all()


@pytest.mark.parametrize("how", ["div", "rem", "sugar"])
@pytest.mark.parametrize("dtype", [ts.i32, ts.i64, ts.i8])
def test_an_integer_division_by_a_constant_zero_is_refused(how, dtype):
    """Undefined (the reference made 0 and a GPU's quotient is not 0): refused when traced, naming the op and tile."""
    @ts.kernel(grid=lambda Y: (1,))
    def div0(Y):
        x = ts.RegVec[dtype, 16]()
        ts.arange(x)
        if how == "sugar":
            x = x / 0
        else:
            getattr(ts, how)(x, x, 0)
        ts.store(Y, x, at=(0,))

    y = torch.full((16,), -5, dtype=I64)
    op = "rem" if how == "rem" else "div"
    with pytest.raises(TraceError, match=rf"{op}: b is the constant 0: an integer {op} of `x` \({dtype}\) by zero"):
        launch(div0, "reference", y)
    assert (y == -5).all()

# ---- 8. the kernels above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "nearest_centroid": (nearest_centroid, (meta(1 << 16, 16, dtype=BF), meta(1024, 16, dtype=BF), meta(1 << 16,
                                            dtype=I64), meta(1 << 16)), dict(BM=64, BK=32)),
    "centroid_sums": (centroid_sums, (meta(1 << 16, 16), meta(1 << 16, dtype=I64), meta(1024, 16),
                                      meta(1024, dtype=I32)), dict(BM=64, BK=32)),
    "xent_backward": (xent_backward, (meta(4096, 50000, dtype=BF), meta(4096, dtype=I64), meta(4096, 50000, dtype=BF),
                                      meta(4096), 1e-3, -100), dict(BM=16, BN=256)),
    "gqa_softcap": (gqa_softcap, (meta(2, 8, 4096, 64, dtype=BF), meta(2, 2, 4096, 64, dtype=BF),
                                  meta(2, 2, 4096, 64, dtype=BF), meta(2, 4096, dtype=I32),
                                  meta(2, 8, 4096, 64, dtype=BF), 0.125, 30.0),
                    dict(CAUSAL=True, BM=64, BN=64, D=64)),
    "histogram": (histogram, (meta(1 << 20, dtype=F16), meta(1 << 20), meta(100), -1.0, 4.0), dict(BN=256, BB=32)),
    "sort_rows": (sort_rows, (meta(512, 4096), meta(512, 4096), meta(512, 4096, dtype=I64)), dict(B=64)),
    "add_rmsnorm": (add_rmsnorm_, (meta(4096, 1024, dtype=BF), meta(4096, 1024, dtype=BF), meta(1024, dtype=BF),
                                   1e-6), dict(BM=4, BN=1024)),
    "small_product": (small_product, (meta(64, 8, dtype=BF), meta(8, 64, dtype=BF), meta(64, 64)),
                      dict(M=64, N=64, K=8)),
}


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


GLUON_CASES = ("xent_backward", "histogram", "sort_rows", "add_rmsnorm")   # (the others' products: f32 or registers)


@pytest.mark.parametrize("name", GLUON_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
