"""Round 9 of held-out kernels (after test_heldout_kernels.py and rounds 2-8): kernels of kinds no earlier round
wrote, each on the reference executor and Triton's interpreter against float64 torch, outputs poisoned first (NaN,
or a finite value where the result may be NaN).

Attention with ALiBi biases (per-head slopes read from a stride-0 view, symmetric or causal); split-KV decoding
(flash-decoding: each split writes its partial output and logsumexp, a second launch merges the splits, splits past a
sequence's length empty); Mamba's selective-scan decode step (softplus'd dt with torch's threshold, the (D, N) state
updated in place, a skip and a SiLU gate); Mamba's causal conv1d decode update over a few new tokens, the rolling
window state shifted by a shift-matrix product and carried in registers; an NF4 GEMV (two 4-bit codes to a byte,
decoded through the 16-entry NormalFloat table by compares, a per-block absmax); and nucleus (top-p) sampling's
mask with a temperature (each token's mass before it in descending order, ties by index, by pairwise compares).
More kernels of this round are in test_heldout_round9_more.py and test_heldout_round9_opt.py (whose docstring lists
the bugs the round found in them), test_heldout_round9_api.py (kernels called as Python functions: runtime arguments
by keyword and default, runtime loop steps), test_heldout_round9_masks.py (torch.bool arguments) and
test_heldout_round9_bytes.py (torch.uint8 arguments and u8 tiles). (No kernel of this file found a bug.)
"""

import math

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I8, I32, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. attention with ALiBi: s = q k^T scale - slope_h |q_pos - k_pos|, optionally causal --------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def alibi_attention(Q, K, V, SLOPE, O, scale: float, *, CAUSAL: bool = False, BM: int = 16, BN: int = 16,
                    D: int = 16):
    """O[b, h] = softmax(Q K^T scale - slope_h |i - j|) V for Q (B, H, T, D), K and V (B, H, S, D); SLOPE (H, T) f32
    is the heads' slopes expanded along T (stride 0), read as a per-row vector. CAUSAL keeps keys j <= i."""
    i, bh = ts.block_id(0), ts.block_id(1)
    h = bh % Q.shape[1]
    b = bh // Q.shape[1]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.RegTile[Q.dtype, BN, D]()
    v = ts.RegTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dist = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    slope = ts.RegVec[ts.f32, BM]()
    qpos = ts.RegVec[ts.f32, BM]()
    kpos = ts.RegVec[ts.f32, BN]()
    kidx = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.load(slope, SLOPE, at=(h, i))
    ts.arange(qpos, i * BM)
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(K.shape[2], BN)):
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.arange(kpos, j * BN)
        ts.zero(dist)
        ts.add(dist, dist, ts.per_col(kpos))
        ts.sub(dist, dist, ts.per_row(qpos))
        ts.abs(dist, dist)
        ts.mul(dist, dist, ts.per_row(slope))
        ts.sub(s, s, dist)
        ts.arange(kidx, j * BN)
        ts.lt(keep, ts.per_col(kidx), K.shape[2])     # keys past S read zeros: masked out
        if CAUSAL:
            ts.make_causal(s, s, i * BM - j * BN)    # key j' > query i' gets -inf
        ts.where(s, keep, s, -math.inf)
        ts.row_max(mn, s, m)                         # key 0 is always kept: mn is finite after the first tile
        ts.sub(alpha, m, mn)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(s, s, ts.per_row(mn))
        ts.exp(s, s)
        ts.row_sum(l_, s, l_)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, mn)
    ts.div(acc, acc, ts.per_row(l_))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


def alibi_ref(q, k, v, slopes, scale, causal):
    T, S = q.shape[2], k.shape[2]
    dist = (torch.arange(T, dtype=torch.float64)[:, None] - torch.arange(S, dtype=torch.float64)[None, :]).abs()
    s = q.double() @ k.double().transpose(2, 3) * scale - slopes.double()[None, :, None, None] * dist
    if causal:
        s = s.masked_fill(torch.arange(S)[None, :] > torch.arange(T)[:, None], -math.inf)
    return s.softmax(-1) @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("B", "H", "T", "S"), [(2, 3, 21, 37), (1, 2, 37, 37), (1, 4, 1, 5), (2, 2, 0, 9)])
def test_alibi_attention(backend, dtype, causal, B, H, T, S, rng):
    """Slopes 2^(-8 h / H) as ALiBi's, one head's 0 (plain attention) and one's 8 (each query sees mostly its own
    position); queries scaled by 4 so some rows' scores are far apart. Causal runs take T == S (square)."""
    if causal:
        S = T
    D = 16
    q = randn(rng, B, H, T, D, dtype=dtype) * 4
    k, v = randn(rng, B, H, S, D, dtype=dtype), randn(rng, B, H, S, D, dtype=dtype)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    slopes[0], slopes[-1] = 0.0, 8.0
    o = poisoned(B, H, T, D, dtype=dtype)
    launch(alibi_attention, backend, q, k, v, slopes[:, None].expand(H, T), o, D ** -0.5, CAUSAL=causal)
    close(o, alibi_ref(q, k, v, slopes, D ** -0.5, causal).to(dtype), scale=4)


# ---- 2. split-KV decoding: partial outputs and logsumexps per split, then a second launch merges the splits ---------
@ts.kernel(grid=lambda K, Q, SPLIT: (ts.cdiv(K.shape[2], SPLIT), Q.shape[0] * Q.shape[1]))
def decode_split(Q, K, V, LEN, OP, LSE, scale: float, *, SPLIT: int = 32, BG: int = 16, BN: int = 16, D: int = 16):
    """One split of SPLIT keys per program: for the G query heads sharing a KV head (Q (B, Hkv, G, D), K and V (B, Hkv,
    S, D)), OP[b, h, s] = softmax-weighted V over keys [s SPLIT, (s + 1) SPLIT) below the cache length LEN[b] (LEN
    (B, G) i32, stride 0 along G), f32 (B, Hkv, NS, G, D); LSE[b, h, s] (B, Hkv, NS, G) their logsumexp, -inf for a
    split with no key (OP 0 there)."""
    sp, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    q = ts.RegTile[Q.dtype, BG, D]()
    k = ts.RegTile[Q.dtype, BN, D]()
    v = ts.RegTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BG, BN]()
    p = ts.RegTile[Q.dtype, BG, BN]()
    keep = ts.RegTile[ts.bool_, BG, BN]()
    acc = ts.RegTile[ts.f32, BG, D]()
    ln = ts.RegVec[ts.i32, BG]()
    kpos = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BG]()
    mn = ts.RegVec[ts.f32, BG]()
    safe = ts.RegVec[ts.f32, BG]()
    live = ts.RegVec[ts.bool_, BG]()
    alpha = ts.RegVec[ts.f32, BG]()
    l_ = ts.RegVec[ts.f32, BG]()
    ts.load(q, Q, at=(b, h, 0, 0))
    ts.load(ln, LEN, at=(b, 0))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for t in ts.range(SPLIT // BN):
        j = sp * (SPLIT // BN) + t
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.arange(kpos, j * BN)
        ts.lt(keep, ts.per_col(kpos), ts.per_row(ln))
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
    ts.where(safe, live, l_, 1.0)
    ts.div(acc, acc, ts.per_row(safe))
    ts.log(safe, safe)
    ts.add(safe, safe, m)
    ts.where(safe, live, safe, -math.inf)            # log l + m; -inf where the split had no key
    ts.store(OP, acc, at=(b, h, sp, 0, 0))
    ts.store(LSE, safe, at=(b, h, sp, 0))


@ts.kernel(grid=lambda O: (O.shape[0] * O.shape[1],))
def decode_merge(OP, LSE, O, *, BG: int = 16, D: int = 16):
    """O[b, h] = sum_s exp(LSE_s - lse) OP_s with lse = log sum_s exp(LSE_s), over the NS splits, carried online (a
    running max); a sequence of no key at all (every LSE -inf) gets 0. O (B, Hkv, G, D)."""
    bh = ts.block_id(0)
    b, h = bh // O.shape[1], bh % O.shape[1]
    op = ts.RegTile[ts.f32, BG, D]()
    acc = ts.RegTile[ts.f32, BG, D]()
    out = ts.RegTile[O.dtype, BG, D]()
    ls = ts.RegVec[ts.f32, BG]()
    m = ts.RegVec[ts.f32, BG]()
    mn = ts.RegVec[ts.f32, BG]()
    safe = ts.RegVec[ts.f32, BG]()
    live = ts.RegVec[ts.bool_, BG]()
    w = ts.RegVec[ts.f32, BG]()
    z = ts.RegVec[ts.f32, BG]()
    ts.neg_infty(m)
    ts.zero(z)
    ts.zero(acc)
    for sp in ts.range(LSE.shape[2]):
        ts.load(ls, LSE, at=(b, h, sp, 0))
        ts.load(op, OP, at=(b, h, sp, 0, 0))
        ts.max(mn, m, ls)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)
        ts.sub(w, m, safe)
        ts.exp(w, w)                                 # the old terms' rescale
        ts.mul(z, z, w)
        ts.mul(acc, acc, ts.per_row(w))
        ts.sub(w, ls, safe)
        ts.exp(w, w)                                 # this split's weight (0 for an empty split)
        ts.add(z, z, w)
        ts.mul(op, op, ts.per_row(w))
        ts.add(acc, acc, op)
        ts.copy(m, mn)
    ts.gt(live, z, 0.0)
    ts.where(z, live, z, 1.0)
    ts.div(acc, acc, ts.per_row(z))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "Hkv", "G", "S", "SPLIT"), [(3, 2, 4, 70, 32), (1, 1, 7, 16, 16), (2, 1, 1, 5, 32),
                                                          (1, 2, 16, 0, 16)])
def test_split_kv_decoding(backend, dtype, B, Hkv, G, S, SPLIT, rng):
    """Cache lengths per sequence: one 0 (output 0), one S, one short (later splits empty: LSE -inf); queries scaled
    by 8 so one key dominates a row."""
    D = 16
    q = randn(rng, B, Hkv, G, D, dtype=dtype) * 8
    k, v = randn(rng, B, Hkv, S, D, dtype=dtype), randn(rng, B, Hkv, S, D, dtype=dtype)
    lens = torch.from_numpy(rng.integers(1, S + 1, B)).to(I32) if S else torch.zeros(B, dtype=I32)
    if B > 2:
        lens[0], lens[1], lens[2] = 0, S, 3
    ns = -(-S // SPLIT)
    op, lse = poisoned(B, Hkv, ns, G, D), poisoned(B, Hkv, ns, G)
    o = poisoned(B, Hkv, G, D, dtype=dtype)
    scale = D ** -0.5
    launch(decode_split, backend, q, k, v, lens[:, None].expand(B, G), op, lse, scale, SPLIT=SPLIT)
    launch(decode_merge, backend, op, lse, o)
    sc = q.double() @ k.double().transpose(2, 3) * scale               # (B, Hkv, G, S)
    keep = torch.arange(S)[None, :] < lens[:, None].long()              # (B, S)
    sc = sc.masked_fill(~keep[:, None, None, :], -math.inf)
    want = (sc.softmax(-1) @ v.double()).nan_to_num(0.0)
    close(o, want.to(dtype), scale=4)
    for sp in range(ns):                             # each split's logsumexp, -inf where it has no key
        part = sc[..., sp * SPLIT:(sp + 1) * SPLIT].logsumexp(-1)
        close(lse[:, :, sp], part.float(), scale=10)


# ---- 3. Mamba's selective-scan decode step: the (D, N) state per sequence updated in place --------------------------
@ts.kernel(grid=lambda X, BD: (ts.cdiv(X.shape[1], BD), X.shape[0]))
def ssm_step(STATE, X, DT, DT_BIAS, A, BX, CX, DSKIP, Z, Y, *, BD: int = 16, N: int = 16):
    """dt = softplus(DT + DT_BIAS) (x past 20 taken as is, as torch's; log1p by Goldberg's correction, so a very
    negative x keeps its relative accuracy); STATE = STATE exp(dt A) + (dt x) B;
    Y = (STATE . C + DSKIP x) silu(Z). STATE (B, D, N) f32, X / DT / Z / Y (B, D), DT_BIAS / DSKIP (D,) f32,
    A (D, N) f32, BX / CX (B, N)."""
    j, b = ts.block_id(0), ts.block_id(1)
    st = ts.RegTile[ts.f32, BD, N]()
    da = ts.RegTile[ts.f32, BD, N]()
    t = ts.RegTile[ts.f32, BD, N]()
    x = ts.RegVec[ts.f32, BD]()
    dt = ts.RegVec[ts.f32, BD]()
    sp = ts.RegVec[ts.f32, BD]()
    big = ts.RegVec[ts.bool_, BD]()
    tiny = ts.RegVec[ts.bool_, BD]()
    u = ts.RegVec[ts.f32, BD]()
    w1 = ts.RegVec[ts.f32, BD]()
    d1 = ts.RegVec[ts.f32, BD]()
    bias = ts.RegVec[ts.f32, BD]()
    z = ts.RegVec[ts.f32, BD]()
    y = ts.RegVec[ts.f32, BD]()
    yo = ts.RegVec[Y.dtype, BD]()
    bv = ts.RegVec[ts.f32, N]()
    cv = ts.RegVec[ts.f32, N]()
    ts.load(st, STATE, at=(b, j, 0))
    ts.load(x, X, at=(b, j))
    ts.load(dt, DT, at=(b, j))
    ts.load(bias, DT_BIAS, at=(j,))
    ts.load(z, Z, at=(b, j))
    ts.load(bv, BX, at=(b, 0))
    ts.load(cv, CX, at=(b, 0))
    ts.load(da, A, at=(j, 0))
    ts.add(dt, dt, bias)
    ts.gt(big, dt, 20.0)
    ts.exp(u, dt)
    ts.add(w1, u, 1.0)
    ts.sub(d1, w1, 1.0)
    ts.log(sp, w1)
    ts.mul(sp, sp, u)
    ts.div(sp, sp, d1)                               # log1p(u) = log(1 + u) u / ((1 + u) - 1): exact for small u
    ts.eq(tiny, d1, 0.0)
    ts.where(sp, tiny, u, sp)                        # (1 + u rounds to 1: log1p(u) = u)
    ts.where(dt, big, dt, sp)                        # softplus, threshold 20
    ts.mul(da, da, ts.per_row(dt))
    ts.exp(da, da)
    ts.mul(st, st, da)
    ts.mul(sp, dt, x)
    ts.zero(t)
    ts.add(t, t, ts.per_col(bv))
    ts.mul(t, t, ts.per_row(sp))
    ts.add(st, st, t)
    ts.store(STATE, st, at=(b, j, 0))
    ts.mul(t, st, ts.per_col(cv))
    ts.row_sum(y, t)
    ts.load(bias, DSKIP, at=(j,))
    ts.mul(sp, bias, x)
    ts.add(y, y, sp)
    ts.sigmoid(sp, z)
    ts.mul(sp, sp, z)
    ts.mul(y, y, sp)
    ts.copy(yo, y)
    ts.store(Y, yo, at=(b, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "D", "N"), [(2, 37, 16), (1, 16, 8), (3, 5, 16), (0, 8, 16)])
def test_selective_scan_step(backend, dtype, B, D, N, rng):
    """dt's pre-activations span -30 .. 30 (softplus ~ 0 and past its threshold); A negative (decaying states), one
    channel's A very negative (its state resets to dt x B)."""
    st = randn(rng, B, D, N)
    x, z = randn(rng, B, D, dtype=dtype), randn(rng, B, D, dtype=dtype) * 3
    dt = torch.from_numpy(rng.uniform(-30, 30, (B, D))).to(dtype)
    bias = randn(rng, D)
    a = -torch.from_numpy(rng.uniform(0.1, 4, (D, N))).float()
    a[0] = -1e4
    bx, cx = randn(rng, B, N, dtype=dtype), randn(rng, B, N, dtype=dtype)
    dskip = randn(rng, D)
    y = poisoned(B, D, dtype=dtype)
    st_k = st.clone()
    launch(ssm_step, backend, st_k, x, dt, bias, a, bx, cx, dskip, z, y, N=N)
    d = F.softplus(dt.double() + bias.double())                         # (B, D)
    want_st = st.double() * torch.exp(d[..., None] * a.double()) + (d * x.double())[..., None] * bx.double()[:, None]
    want_y = (want_st * cx.double()[:, None]).sum(-1) + dskip.double() * x.double()
    want_y = want_y * F.silu(z.double())
    close(st_k, want_st.float(), scale=4)
    close(y, want_y.to(dtype), scale=8)


# ---- 4. Mamba's causal conv1d decode update: a rolling (D, W) window per sequence, carried over T new tokens --------
@ts.kernel(grid=lambda X, BD: (ts.cdiv(X.shape[2], BD), X.shape[0]))
def conv1d_update(X, STATE, W, BIAS, Y, *, SILU: bool = True, BD: int = 16, WB: int = 4):
    """For each new token t of X (B, T, D): the window STATE[b] (B, D, w) shifts left by one (a product with
    P[k, c] = (k == c + 1)) and takes x_t in its last column; Y[b, t] = sum_k window W + BIAS (then SiLU). W (D, w)
    f32, BIAS (D,) f32, w <= WB; STATE is written back (the last w inputs). Window columns past w stay 0."""
    j, b = ts.block_id(0), ts.block_id(1)
    w_ = STATE.shape[2]
    st = ts.RegTile[ts.f32, BD, WB]()
    wt = ts.RegTile[ts.f32, BD, WB]()
    t2 = ts.RegTile[ts.f32, BD, WB]()
    shift = ts.RegTile[ts.f32, WB, WB]()
    sel = ts.RegTile[ts.bool_, WB, WB]()
    last = ts.RegTile[ts.bool_, BD, WB]()
    ks = ts.RegVec[ts.i32, WB]()
    cs = ts.RegVec[ts.i32, WB]()
    x = ts.RegVec[ts.f32, BD]()
    bias = ts.RegVec[ts.f32, BD]()
    y = ts.RegVec[ts.f32, BD]()
    sg = ts.RegVec[ts.f32, BD]()
    yo = ts.RegVec[Y.dtype, BD]()
    ts.arange(ks)
    ts.arange(cs, 1)
    ts.eq(sel, ts.per_row(ks), ts.per_col(cs))       # P[k, c] = 1 where k == c + 1
    ts.where(shift, sel, 1.0, 0.0)
    ts.eq(last, ts.per_col(ks), w_ - 1)
    ts.load(st, STATE, at=(b, j, 0))
    ts.load(wt, W, at=(j, 0))
    ts.load(bias, BIAS, at=(j,))
    for t in ts.range(X.shape[1]):
        ts.load(x, X, at=(b, t, j))
        ts.zero(t2)
        ts.mma_AB(t2, st, shift, t2)                 # column c takes column c + 1 (exact: one product per element)
        ts.where(st, last, ts.per_row(x), t2)
        ts.mul(t2, st, wt)
        ts.row_sum(y, t2)
        ts.add(y, y, bias)
        if SILU:
            ts.sigmoid(sg, y)
            ts.mul(y, y, sg)
        ts.copy(yo, y)
        ts.store(Y, yo, at=(b, t, j))
    ts.store(STATE, st, at=(b, j, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "T", "D", "w"), [(2, 3, 37, 4), (1, 1, 16, 3), (3, 5, 5, 2), (1, 0, 8, 4),
                                               (0, 2, 8, 4)])
@pytest.mark.parametrize("silu", [True, False])
def test_causal_conv1d_update(backend, dtype, B, T, D, w, silu, rng):
    """Against torch's conv1d over the old window followed by the new tokens; a state of 1e30s in one channel (its
    output overflows to inf... or not, once the big values have shifted out of a w-wide window)."""
    x = randn(rng, B, T, D, dtype=dtype)
    st = randn(rng, B, D, w)
    if B and D > 2:
        st[0, 1] = 1e30
    wt, bias = randn(rng, D, w), randn(rng, D)
    y = poisoned(B, T, D, dtype=dtype)
    st_k = st.clone()
    launch(conv1d_update, backend, x, st_k, wt, bias, y, SILU=silu)
    seq = torch.cat([st.double(), x.double().transpose(1, 2)], 2)      # (B, D, w + T)
    want = F.conv1d(seq, wt.double()[:, None, :], bias.double(), groups=D)[..., 1:]   # outputs after each new token
    if silu:
        want = F.silu(want)
    close(y, want.transpose(1, 2).to(dtype), scale=8)
    assert torch.equal(st_k, seq[..., seq.shape[2] - w:].float())    # the last w inputs, exactly


# ---- 5. an NF4 GEMV: two 4-bit NormalFloat codes to a byte, decoded through the 16-entry table, absmax per block ----
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


@ts.kernel(grid=lambda XE, P: (ts.cdiv(XE.shape[0], 16), ts.cdiv(P.shape[0], 16)))
def nf4_gemv(XE, XO, P, ABSMAX, Y, *, BN: int = 16, BK2: int = 32):
    """Y = X W^T for a few rows X (M, K) and W (N, K) in NF4: P (N, K/2) int8 holds W[n, 2i] in its high nibble and
    W[n, 2i + 1] in its low one, each a code c in [0, 16) meaning NF4[c] * absmax of its block of 2 BK2 elements
    along K (ABSMAX (K / (2 BK2), N) f32, a transposed view). XE / XO are X's even / odd columns (strided views)."""
    i, j = ts.block_id(0), ts.block_id(1)
    p = ts.RegTile[ts.i32, BN, BK2]()
    code = ts.RegTile[ts.i32, BN, BK2]()
    hit = ts.RegTile[ts.bool_, BN, BK2]()
    wf = ts.RegTile[ts.f32, BN, BK2]()
    w = ts.RegTile[XE.dtype, BN, BK2]()
    x = ts.RegTile[XE.dtype, 16, BK2]()
    am = ts.RegVec[ts.f32, BN]()
    acc = ts.RegTile[ts.f32, 16, BN]()
    out = ts.RegTile[Y.dtype, 16, BN]()
    ts.zero(acc)
    for kb in ts.range(ts.cdiv(P.shape[1], BK2)):
        ts.load(p, P, at=(j, kb))                    # i8 -> i32, sign-extended: nibbles by shift and mask
        ts.load(am, ABSMAX, at=(kb, j))
        for half in range(2):
            if half == 0:
                ts.shr(code, p, 4)
                ts.bit_and(code, code, 15)
            else:
                ts.bit_and(code, p, 15)
            ts.zero(wf)
            for c, val in enumerate(NF4):
                ts.eq(hit, code, c)
                ts.where(wf, hit, val, wf)
            ts.mul(wf, wf, ts.per_row(am))
            ts.copy(w, wf)                           # dequantized into X's dtype, as bitsandbytes does
            ts.load(x, XE if half == 0 else XO, at=(i, kb))
            ts.mma_ABt(acc, x, w, acc)
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, j))


def nf4_pack(codes):
    """codes (N, K) in [0, 16) -> (N, K/2) int8: element 2i in the high nibble, 2i + 1 in the low one."""
    c = codes.to(torch.int32)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8).view(I8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N", "K"), [(1, 37, 128), (3, 16, 64), (20, 5, 192), (1, 0, 64), (0, 8, 64),
                                           (2, 8, 0)])
def test_nf4_gemv(backend, dtype, M, N, K, rng):
    """Every code appears (codes 0 and 15 in every row: the table's ends -1 and 1, bytes past 0x7f too); absmax
    spans 1e-3 .. 1e3 across blocks."""
    codes = torch.from_numpy(rng.integers(0, 16, (N, K)))
    if K:
        codes[:, 0], codes[:, 1] = 15, 0
    nb = K // 64
    absmax = torch.from_numpy(10.0 ** rng.uniform(-3, 3, (N, nb))).float()
    x = randn(rng, M, K, dtype=dtype)
    y = poisoned(M, N, dtype=dtype)
    launch(nf4_gemv, backend, x[:, 0::2], x[:, 1::2], nf4_pack(codes), absmax.T, y)
    wq = torch.tensor(NF4, dtype=torch.float64)[codes] * absmax.double().repeat_interleave(64, 1)
    want = x.double() @ wq.to(dtype).double().T                        # W rounded to X's dtype before the product
    mag = x.double().abs() @ wq.to(dtype).double().abs().T
    t = {torch.float32: 1e-5, F16: 2e-3, BF: 1.6e-2}[dtype]
    assert ((y.double() - want).abs() <= t * (mag + 1)).all(), (y.double() - want).abs().max()


# ---- 6. nucleus (top-p) sampling's distribution: softmax(x / T), tokens past the top-p mass dropped, renormalized ---
def _probs(xr, pv, inside, idx, X, r, c, m, s, inv_temp, BN):
    """pv (BN,) = softmax probabilities of row r's column tile c (0 past the row's end), through the (1, BN) tile xr;
    m and s (1,) the row's max and sum (s unused when None: xr is then exp(x - m) unnormalized)."""
    ts.load(xr, X, at=(r, c))
    ts.arange(idx, c * BN)
    ts.lt(inside, idx, X.shape[1])
    ts.mul(xr, xr, inv_temp)
    ts.where(xr, ts.per_col(inside), xr, -math.inf)
    if m is not None:
        ts.sub(xr, xr, ts.per_row(m))
        ts.exp(xr, xr)
    if s is not None:
        ts.div(xr, xr, ts.per_row(s))
        ts.col_sum(pv, xr)                           # the one row as a vector


@ts.kernel(grid=lambda X: (X.shape[0],))
def top_p(X, Y, inv_temp: float, p_top: float, *, BN: int = 16):
    """Y[r] = softmax(X[r] inv_temp) kept where the probability mass strictly before the token (tokens by descending
    probability, ties by ascending index) is < p_top, renormalized over those kept; 0 elsewhere. One row per
    program: pass 1 the max, pass 2 the sum, pass 3 the kept mass Z, pass 4 the output (the mass before each token
    of a column tile summed from compares against every tile of the row)."""
    r = ts.block_id(0)
    nt = ts.cdiv(X.shape[1], BN)
    xr = ts.RegTile[ts.f32, 1, BN]()
    pj = ts.RegVec[ts.f32, BN]()
    pk = ts.RegVec[ts.f32, BN]()
    jid = ts.RegVec[ts.i32, BN]()
    kid = ts.RegVec[ts.i32, BN]()
    before = ts.RegTile[ts.bool_, BN, BN]()
    tie = ts.RegTile[ts.bool_, BN, BN]()
    lower = ts.RegTile[ts.bool_, BN, BN]()
    ahead = ts.RegTile[ts.f32, BN, BN]()
    mass = ts.RegVec[ts.f32, BN]()
    keep = ts.RegVec[ts.bool_, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    m = ts.RegVec[ts.f32, 1]()
    s = ts.RegVec[ts.f32, 1]()
    z = ts.RegVec[ts.f32, 1]()
    kept = ts.RegTile[ts.f32, 1, BN]()
    yv = ts.RegTile[Y.dtype, 1, BN]()
    ts.neg_infty(m)
    for c in ts.range(nt):
        _probs(xr, None, inside, jid, X, r, c, None, None, inv_temp, BN)
        ts.row_max(m, xr, m)
    ts.zero(s)
    for c in ts.range(nt):
        _probs(xr, None, inside, jid, X, r, c, m, None, inv_temp, BN)
        ts.row_sum(s, xr, s)
    ts.zero(z)
    for rnd in range(2):                              # 0: the kept mass Z; 1: the output
        for c in ts.range(nt):
            _probs(xr, pj, inside, jid, X, r, c, m, s, inv_temp, BN)
            ts.zero(mass)
            for kc in ts.range(nt):
                _probs(xr, pk, inside, kid, X, r, kc, m, s, inv_temp, BN)
                ts.gt(before, ts.per_row(pk), ts.per_col(pj))
                ts.eq(tie, ts.per_row(pk), ts.per_col(pj))
                ts.lt(lower, ts.per_row(kid), ts.per_col(jid))
                ts.logical_and(tie, tie, lower)
                ts.logical_or(before, before, tie)
                ts.where(ahead, before, ts.per_row(pk), 0.0)
                ts.col_sum(mass, ahead, mass)
            ts.lt(keep, mass, p_top)
            ts.zero(kept)
            ts.add(kept, kept, ts.per_col(pj))
            ts.where(kept, ts.per_col(keep), kept, 0.0)
            if rnd == 0:
                ts.row_sum(z, kept, z)
            else:
                ts.div(kept, kept, ts.per_row(z))
                ts.copy(yv, kept)
                ts.store(Y, yv, at=(r, c))


def top_p_ref(x, inv_temp, p_top):
    """(probabilities, keep mask, the mass before each token) in float64; the temperature's factor as the kernel's
    f32."""
    p = (x.double() * float(torch.tensor(inv_temp, dtype=torch.float32))).softmax(-1)
    order = p.sort(dim=-1, descending=True, stable=True).indices
    ps = p.gather(-1, order)
    before = torch.empty_like(p).scatter_(-1, order, ps.cumsum(-1) - ps)
    return p, before < p_top, before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("R", "V"), [(3, 45), (2, 16), (1, 1), (4, 7), (0, 9)])
@pytest.mark.parametrize(("temp", "p_top"), [(1.0, 0.9), (0.5, 0.3), (3.0, 1.0), (1.0, 1e-6)])
def test_top_p_mask(backend, dtype, R, V, temp, p_top, rng):
    """Rows with -inf logits (vocabulary masked out: never kept), duplicated logits (ties kept in index order: one
    row of all-equal logits keeps the first ceil(p V)), and one very negative but finite logit. A token whose mass
    before it is within 1e-5 of p_top may go either way (f32 sums in another order)."""
    x = randn(rng, R, V, dtype=dtype) * 2
    if R > 2 and V > 4:
        x[0, :3] = -math.inf
        x[1] = 0.5
        x[2, 1], x[2, 3] = x[2, 2], -1e4
    y = poisoned(R, V, dtype=dtype)
    launch(top_p, backend, x, y, 1.0 / temp, p_top)
    p, keep, before = top_p_ref(x, 1.0 / temp, p_top)
    edge = (before - p_top).abs() < 1e-5
    got_keep = y.double() > 0
    assert torch.equal(got_keep[~edge & (p > 1e-30)], keep[~edge & (p > 1e-30)])
    keep = torch.where(edge, got_keep, keep)
    want = p * keep / (p * keep).sum(-1, keepdim=True)
    close(y, want.to(dtype), scale=4)
