"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): pieces of recent models. A W8A8
GEMM as SmoothQuant runs it (int8 activations and weights, products exact in bf16 tiles with f32 sums, per-token and
per-channel f32 scales, a bias, bf16 out); DeepSeek-V3's group-limited router (sigmoid scores, a per-expert bias for
the choice only, each group scored by its two best, the best TG groups kept, the top K experts among them, weights the
unbiased scores normalized and scaled); and sigmoid attention (Apple's: sigmoid(q k^T scale + b), b = -log(n), no
row normalization), causal with a ragged tail.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I8, I32, close, ints, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. a W8A8 GEMM: C = (A_q B_q^T) * sa[m] * sb[n] + bias[n] -------------------------------------------------------
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[0], BN)))
def w8a8_gemm(A, B, SA, SB, BIAS, C, *, BM: int = 16, BN: int = 16, BK: int = 32):
    """A (M, K) i8 per-token quantized activations, B (N, K) i8 per-channel quantized weights, SA (M,), SB (N,), BIAS
    (N,) f32; C (M, N). int8 values are exact in bf16 and each K tile's products sum exactly in f32 (|sum| < 2**24 for
    K <= 1024)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a8 = ts.RegTile[ts.i8, BM, BK]()
    b8 = ts.RegTile[ts.i8, BN, BK]()
    a = ts.RegTile[ts.bf16, BM, BK]()
    b = ts.SharedTile[ts.bf16, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[C.dtype, BM, BN]()
    sa = ts.RegVec[ts.f32, BM]()
    sb = ts.RegVec[ts.f32, BN]()
    bias = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a8, A, at=(i, k))
        ts.load(b8, B, at=(j, k))
        ts.copy(a, a8)
        ts.copy(b, b8)
        ts.mma_ABt(acc, a, b, acc)
    ts.load(sa, SA, at=(i,))
    ts.load(sb, SB, at=(j,))
    ts.load(bias, BIAS, at=(j,))
    ts.mul(acc, acc, ts.per_row(sa))
    ts.mul(acc, acc, ts.per_col(sb))
    ts.add(acc, acc, ts.per_col(bias))
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [BF, torch.float32])
@pytest.mark.parametrize(("M", "N", "K"), [(19, 23, 70), (16, 32, 64), (1, 16, 1000), (0, 8, 16)])
def test_w8a8_gemm(backend, out_dtype, M, N, K, rng):
    """Quantized from float activations and weights as SmoothQuant does (absmax / 127, rounded); the integer product
    checked exactly in int64 first (unit scales, no bias), then the scaled one; -128 and 127 included."""
    a = ints(rng, -128, 128, (M, K), I8)
    b = ints(rng, -128, 128, (N, K), I8)
    if M and K > 1:
        a[0, :2] = torch.tensor([-128, 127], dtype=I8)
    exact = a.long() @ b.long().T
    c = poisoned(M, N)
    launch(w8a8_gemm, backend, a, b, torch.ones(M), torch.ones(N), torch.zeros(N), c)
    assert torch.equal(c.double(), exact.double())
    sa = torch.from_numpy(rng.uniform(1e-3, 2e-2, M)).float()
    sb = torch.from_numpy(rng.uniform(1e-3, 2e-2, N)).float()
    bias = randn(rng, N)
    c = poisoned(M, N, dtype=out_dtype)
    launch(w8a8_gemm, backend, a, b, sa, sb, bias, c)
    want = exact.double() * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    close(c, want.to(out_dtype))


# ---- 2. DeepSeek-V3's group-limited router ---------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def group_router(X, BIAS, W, IDX, routed_scale: float, *, G: int = 4, TG: int = 2, K: int = 4, BM: int = 16,
                 E: int = 16):
    """X (T, E) router logits; BIAS (E,) f32 the balancing bias. s = sigmoid(x); the choice uses s + bias: group g
    (experts [g E/G, (g + 1) E/G)) is scored by the sum of its two best, the TG best groups kept (ties: the lower
    group), the K best experts among them chosen (ties: the lower expert). W (T, K) f32 = s of the chosen normalized
    to sum 1, times routed_scale; IDX (T, K) i32, best first."""
    per = E // G
    i = ts.block_id(0)
    s = ts.RegTile[ts.f32, BM, E]()
    c = ts.RegTile[ts.f32, BM, E]()
    t = ts.RegTile[ts.f32, BM, E]()
    hit = ts.RegTile[ts.bool_, BM, E]()
    idx = ts.RegTile[ts.i32, BM, E]()
    grp = ts.RegTile[ts.i32, BM, E]()
    gsc = ts.RegTile[ts.f32, BM, G]()
    gsel = ts.RegTile[ts.bool_, BM, G]()
    ghit = ts.RegTile[ts.bool_, BM, G]()
    gidx = ts.RegTile[ts.i32, BM, G]()
    gkeep = ts.RegTile[ts.i32, BM, G]()
    w = ts.RegTile[ts.f32, BM, K]()
    at = ts.RegTile[ts.i32, BM, K]()
    in_slot = ts.RegTile[ts.bool_, BM, K]()
    cols = ts.RegVec[ts.i32, E]()
    gcols = ts.RegVec[ts.i32, G]()
    slot = ts.RegVec[ts.i32, K]()
    bias = ts.RegVec[ts.f32, E]()
    m = ts.RegVec[ts.f32, BM]()
    m2 = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.i32, BM]()
    sw = ts.RegVec[ts.f32, BM]()
    dropped = ts.RegVec[ts.bool_, BM]()
    ts.load(s, X, at=(i, 0))
    ts.sigmoid(s, s)
    ts.load(bias, BIAS, at=(0,))
    ts.add(c, s, ts.per_col(bias))                   # the choice's scores
    ts.arange(cols)
    ts.arange(gcols)
    ts.arange(slot)
    ts.zero(grp)
    ts.add(grp, grp, ts.per_col(cols))
    ts.div(grp, grp, per)                            # each column's group
    ts.zero(gsc)
    for g in range(G):                               # a group's score: its best two (unrolled when traced)
        ts.eq(hit, grp, g)
        ts.where(t, hit, c, -math.inf)
        ts.row_max(m, t)
        ts.eq(hit, t, ts.per_row(m))
        ts.where(idx, hit, ts.per_col(cols), E)
        ts.row_min(best, idx)
        ts.eq(hit, ts.per_col(cols), ts.per_row(best))
        ts.where(t, hit, -math.inf, t)
        ts.row_max(m2, t)
        ts.add(m, m, m2)
        ts.eq(ghit, ts.per_col(gcols), g)
        ts.where(gsc, ghit, ts.per_row(m), gsc)
    ts.fill(gsel, False)
    for _ in range(TG):                              # the TG best groups
        ts.row_max(m, gsc)
        ts.eq(ghit, gsc, ts.per_row(m))
        ts.where(gidx, ghit, ts.per_col(gcols), G)
        ts.row_min(best, gidx)
        ts.eq(ghit, ts.per_col(gcols), ts.per_row(best))
        ts.logical_or(gsel, gsel, ghit)
        ts.where(gsc, ghit, -math.inf, gsc)
    ts.where(gidx, gsel, 1, 0)
    for g in range(G):                               # experts of groups not kept leave the choice
        ts.eq(ghit, ts.per_col(gcols), g)
        ts.where(gkeep, ghit, gidx, 0)
        ts.row_max(best, gkeep)                      # 1 where the row keeps group g
        ts.eq(dropped, best, 0)
        ts.eq(hit, grp, g)
        ts.logical_and(hit, hit, ts.per_row(dropped))
        ts.where(c, hit, -math.inf, c)
    ts.right_fill(c, c, X.shape[1], -math.inf)
    ts.zero(w)
    ts.zero(at)
    for k in range(K):
        ts.row_max(m, c)
        ts.eq(hit, c, ts.per_row(m))
        ts.where(idx, hit, ts.per_col(cols), E)
        ts.row_min(best, idx)
        ts.eq(hit, ts.per_col(cols), ts.per_row(best))
        ts.where(t, hit, s, 0.0)
        ts.row_sum(m, t)                             # the chosen expert's unbiased score
        ts.eq(in_slot, ts.per_col(slot), k)
        ts.where(w, in_slot, ts.per_row(m), w)
        ts.where(at, in_slot, ts.per_row(best), at)
        ts.where(c, hit, -math.inf, c)
    ts.row_sum(sw, w)
    ts.div(w, w, ts.per_row(sw))
    ts.mul(w, w, routed_scale)
    ts.store(W, w, at=(i, 0))
    ts.store(IDX, at, at=(i, 0))


def group_router_ref(x, bias, G, TG, K, scale):
    """The router in float64, with torch.topk's ties made stable (the lower index first) by argsort."""
    T, E = x.shape
    s = torch.sigmoid(x.double())
    c = s + bias.double()
    grouped = c.view(T, G, E // G)
    top2 = torch.from_numpy(np.sort(grouped.numpy(), axis=-1)[..., ::-1][..., :2].copy()).sum(-1)    # (T, G)
    groups = torch.from_numpy(np.argsort(-top2.numpy(), axis=1, kind="stable")[:, :TG].copy())
    keep = torch.zeros(T, G, dtype=torch.bool).scatter_(1, groups, True)
    c = c.masked_fill(~keep.repeat_interleave(E // G, dim=1), -math.inf)
    idx = torch.from_numpy(np.argsort(-c.numpy(), axis=1, kind="stable")[:, :K].copy())
    w = s.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * scale, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "G", "TG", "K"), [(37, 4, 2, 4), (16, 8, 3, 2), (5, 2, 1, 1), (0, 4, 2, 4)])
def test_group_router(backend, dtype, T, G, TG, K, rng):
    """E = 16 experts; logits rounded to quarters (ties between experts and between groups); a bias that pushes one
    group down; routed_scale 2.5 (DeepSeek-V3's)."""
    E = 16
    x = (randn(rng, T, E) * 2 * 4).round().div(4).to(dtype)
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, E)).float()
    bias[: E // G] -= 0.5
    w, idx = poisoned(T, K), torch.full((T, K), -7, dtype=I32)
    launch(group_router, backend, x, bias, w, idx, 2.5, G=G, TG=TG, K=K)
    want_w, want_idx = group_router_ref(x, bias, G, TG, K, 2.5)
    assert torch.equal(idx.long(), want_idx)
    close(w, want_w.float())


# ---- 3. sigmoid attention: O = sigmoid(Q K^T scale + b) V, causal, b = -log(n) ---------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def sigmoid_attention(Q, K, V, O, scale: float, bias: float, *, CAUSAL: bool = True, BM: int = 16, BN: int = 16,
                      D: int = 32):
    """Q, O (B, H, S, D), K, V (B, H, L, D); each query row's weights sigmoid(s + bias) on its own, no normalization.
    Keys past L (and after the query when CAUSAL, aligned at the start) weigh 0; the key loop stops at the diagonal's
    block when CAUSAL."""
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    L = K.shape[2]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[V.dtype, BM, BN]()
    seen = ts.RegTile[ts.bool_, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    qpos = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.arange(qpos, i * BM)
    ts.zero(acc)
    stop = ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(L, BN)) if CAUSAL else ts.cdiv(L, BN)
    for j in ts.range(stop):
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.add(s, s, bias)
        ts.sigmoid(s, s)
        ts.arange(kpos, j * BN)
        ts.lt(seen, ts.per_col(kpos), L)
        if CAUSAL:
            ts.logical_and(seen, seen, _causal(qpos, kpos, BM, BN))
        ts.where(s, seen, s, 0.0)
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


def _causal(qpos, kpos, bm, bn):
    m = ts.RegTile[ts.bool_, bm, bn]()
    ts.ge(m, ts.per_row(qpos), ts.per_col(kpos))
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "S", "L", "causal"), [(2, 2, 37, 37, True), (1, 3, 20, 45, False),
                                                          (1, 1, 16, 16, True), (1, 2, 5, 0, False)])
def test_sigmoid_attention(backend, dtype, B, H, S, L, causal, rng):
    """b = -log(L) (the paper's); scores scaled up so some weights saturate at 0 and 1; L = 0: O is 0."""
    D = 32
    q = randn(rng, B, H, S, D, dtype=dtype) * 3
    k, v = randn(rng, B, H, L, D, dtype=dtype), randn(rng, B, H, L, D, dtype=dtype)
    bias = -math.log(max(L, 1))
    o = poisoned(B, H, S, D, dtype=dtype)
    launch(sigmoid_attention, backend, q, k, v, o, D ** -0.5, bias, CAUSAL=causal)
    w = torch.sigmoid(q.double() @ k.double().transpose(-1, -2) * D ** -0.5 + bias)
    if causal:
        w = w.masked_fill(torch.ones(S, L, dtype=torch.bool).triu(1), 0.0)
    if dtype is not torch.float32:
        w = w.to(dtype).double()                     # (p rounded to V's dtype before its product)
    close(o, (w @ v.double()).to(dtype), scale=4)
