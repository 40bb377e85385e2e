"""Round 12 of held-out kernels (after test_heldout_kernels.py and rounds 2-11): kernels of kinds no earlier round
wrote, each on the reference executor and Triton's interpreter against float64 torch, outputs poisoned (NaN) first.
Seeds are fixed (the ``rng`` fixture of this file).

A fused sampling step (temperature, min-p filter, inverse-CDF draw over a vocabulary wider than a tile: the
cumulative sum inside a tile as a product with a triangle of ones, carried across tiles; the token as i64, its
log-probability as f32 and the number of tokens kept as i32); attention with per-head sink logits and a sliding
window (gpt-oss), on a 3-D grid (query block, head, batch) with grouped heads and queries given as a transposed view;
and a real DFT of rows (torch.fft.rfft) by products with twiddles made in the kernel from n k mod N. More kernels
of this round are in test_heldout_round12_more.py (depthwise convolution, Mamba-2's chunked scan, L2 normalization at
1e30, batch norm by atomics, ragged pooling); all of them compiled for sm_90a in test_heldout_round12_aot.py.

What this round found: no kernel gave a wrong answer on either backend (strided, transposed and expanded inputs,
negative and past-the-end tile coordinates, empty grids, K = 0 products, -inf float arguments, runtime ints past
2**31 against i32 tiles were probed too, all right). The language reads no loop bound from memory (a data-dependent
trip count is an upper bound and a mask: test_heldout_round12_more.py's ragged pooling); a tile given as a loop bound
said only "an operand must be an index", and now says how to write it (lang/control.py).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260412)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. sampling: temperature, min-p, inverse CDF ------------------------------------------------------------------
def _upper_ones(tri, BN: int) -> None:
    """tri (BN, BN) f32: tri[k, j] = 1 where k <= j, so (e @ tri)[r, j] is the inclusive prefix sum of row r."""
    r = ts.RegVec[ts.i32, BN]()
    mask = ts.RegTile[ts.bool_, BN, BN]()
    ts.arange(r)
    ts.le(mask, ts.per_row(r), ts.per_col(r))
    ts.copy(tri, mask)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def minp_sample(X, U, TOK, LOGP, KEPT, inv_temp: float, log_min_p: float, *, BM: int = 4, BN: int = 32):
    """X (R, V) logits (each row with a finite entry); U (R,) uniforms in [0, 1). z = x * inv_temp; a token is kept
    when z - max(z) >= log_min_p (min-p: p >= min_p * p_max) and z is finite. TOK (R,) i64: the first kept token whose
    inclusive cumulative kept mass exceeds u times the kept total; LOGP (R,) f32: its log-probability among the kept
    tokens; KEPT (R,) i32: how many were kept."""
    i = ts.block_id(0)
    V = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    e = ts.RegTile[ts.f32, BM, BN]()
    cum = ts.RegTile[ts.f32, BM, BN]()
    tri = ts.RegTile[ts.f32, BN, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    flag = ts.RegTile[ts.bool_, BM, BN]()
    pos = ts.RegTile[ts.i32, BM, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    tmax = ts.RegVec[ts.f32, BM]()
    total = ts.RegVec[ts.f32, BM]()
    target = ts.RegVec[ts.f32, BM]()
    carry = ts.RegVec[ts.f32, BM]()
    tsum = ts.RegVec[ts.f32, BM]()
    zsel = ts.RegVec[ts.f32, BM]()
    zlast = ts.RegVec[ts.f32, BM]()
    u = ts.RegVec[ts.f32, BM]()
    cnt = ts.RegVec[ts.i32, BM]()
    kept = ts.RegVec[ts.i32, BM]()
    tcnt = ts.RegVec[ts.i32, BM]()
    last = ts.RegVec[ts.i32, BM]()
    tlast = ts.RegVec[ts.i32, BM]()
    found = ts.RegVec[ts.bool_, BM]()
    now = ts.RegVec[ts.bool_, BM]()
    tok = ts.RegVec[ts.i64, BM]()
    _upper_ones(tri, BN)
    ts.neg_infty(m)
    for j in ts.range(ts.cdiv(V, BN)):               # pass 1: the row max of z
        ts.load(x, X, at=(i, j))
        ts.mul(x, x, inv_temp)
        ts.right_fill(x, x, V - j * BN, -math.inf)    # columns past V
        ts.row_max(m, x, m)
    ts.zero(total)
    ts.zero(kept)
    for j in ts.range(ts.cdiv(V, BN)):               # pass 2: the kept mass and count
        ts.load(x, X, at=(i, j))
        ts.mul(x, x, inv_temp)
        ts.right_fill(x, x, V - j * BN, -math.inf)
        ts.sub(x, x, ts.per_row(m))
        ts.ge(keep, x, log_min_p)
        ts.gt(flag, x, -math.inf)
        ts.logical_and(keep, keep, flag)
        ts.exp(e, x)
        ts.where(e, keep, e, 0.0)
        ts.row_sum(total, e, total)
        ts.where(pos, keep, 1, 0)
        ts.row_sum(kept, pos, kept)
    ts.load(u, U, at=(i,))
    ts.mul(target, u, total)
    ts.zero(carry)
    ts.zero(cnt)
    ts.fill(last, -1)
    ts.zero(zlast)
    ts.zero(zsel)
    ts.fill(found, False)
    for j in ts.range(ts.cdiv(V, BN)):               # pass 3: count the tokens whose cumulative mass <= target
        ts.load(x, X, at=(i, j))
        ts.mul(x, x, inv_temp)
        ts.right_fill(x, x, V - j * BN, -math.inf)
        ts.sub(x, x, ts.per_row(m))
        ts.ge(keep, x, log_min_p)
        ts.gt(flag, x, -math.inf)
        ts.logical_and(keep, keep, flag)
        ts.exp(e, x)
        ts.where(e, keep, e, 0.0)
        ts.zero(cum)
        ts.mma_AB(cum, e, tri, cum)                  # inclusive prefix sums inside the tile
        ts.add(cum, cum, ts.per_row(carry))
        ts.le(flag, cum, ts.per_row(target))
        ts.where(pos, flag, 1, 0)
        ts.row_sum(tcnt, pos)
        ts.add(cnt, cnt, tcnt)
        ts.row_sum(tsum, e)
        ts.add(carry, carry, tsum)
        ts.arange(cols, j * BN)
        ts.logical_not(now, found)                   # the draw lands in this tile: take its z
        ts.lt(found, cnt, (j + 1) * BN)
        ts.logical_and(now, now, found)
        ts.eq(flag, ts.per_col(cols), ts.per_row(cnt))
        ts.where(cum, flag, x, 0.0)
        ts.row_sum(tmax, cum)
        ts.where(zsel, now, tmax, zsel)
        ts.logical_or(found, found, now)
        ts.zero(pos)                                 # the last kept token so far, and its z (rounding at u ~ 1)
        ts.add(pos, pos, ts.per_col(cols))
        ts.where(pos, keep, pos, -1)
        ts.row_max(tlast, pos)
        ts.eq(flag, pos, ts.per_row(tlast))
        ts.logical_and(flag, flag, keep)
        ts.where(cum, flag, x, 0.0)
        ts.row_sum(tmax, cum)
        ts.ge(now, tlast, 0)
        ts.where(zlast, now, tmax, zlast)
        ts.max(last, last, tlast)
    ts.gt(now, cnt, last)                            # past the last kept token: that one
    ts.min(cnt, cnt, last)
    ts.where(zsel, now, zlast, zsel)
    ts.log(tmax, total)
    ts.sub(zsel, zsel, tmax)
    ts.copy(tok, cnt)
    ts.store(TOK, tok, at=(i,))
    ts.store(LOGP, zsel, at=(i,))
    ts.store(KEPT, kept, at=(i,))


def minp_sample_ref(x, u, inv_temp, min_p):
    """(token, log-prob, kept) per row in float64, and the smallest distance of u * total from a cumulative mass (the
    draw's margin) and of z - max from log(min_p) (the filter's)."""
    z = x.double() * inv_temp
    m = z.max(dim=1, keepdim=True).values
    d = z - m
    keep = (d >= math.log(min_p) if min_p > 0 else torch.ones_like(d, dtype=torch.bool)) & (z > -math.inf)
    e = torch.where(keep, torch.exp(d), torch.zeros_like(d))
    tot = e.sum(1)
    cdf = torch.cumsum(e, 1)
    target = u.double() * tot
    tok = (cdf <= target[:, None]).sum(1)
    last = torch.where(keep, torch.arange(x.shape[1]), -1).max(1).values
    tok = torch.minimum(tok, last)
    logp = d.gather(1, tok[:, None])[:, 0] - torch.log(tot)
    gap = (cdf - target[:, None]).abs() / tot[:, None]
    draw_margin = gap[e > 0].min().item() if x.numel() else 1.0   # (only where the cumulative mass steps)
    filt = (d - math.log(min_p)).abs() if min_p > 0 else torch.ones_like(d)
    filt_margin = filt[z > -math.inf].min().item() if x.numel() else 1.0
    return tok, logp, keep.sum(1), draw_margin, filt_margin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("R", "V", "temp", "min_p"),
                         [(9, 100, 0.7, 0.05), (5, 33, 1.3, 0.0), (3, 1, 1.0, 0.1), (6, 64, 0.5, 0.3)])
def test_minp_sampling(backend, dtype, R, V, temp, min_p, rng):
    """Rows with -inf logits (a masked vocabulary), a row with a single finite logit (always drawn, log-prob 0), a row
    of 1e30 logits in f32 (two tied at the top), u of 0 and near 1; min_p 0 keeps every finite token (log_min_p is
    -inf, a float argument)."""
    x = randn(rng, R, V) * 3
    if V > 4:
        x[0, ::3] = -math.inf
        x[1, :] = -math.inf
        x[1, V // 2] = 2.0
        if dtype is torch.float32:
            x[2, :] = x[2, :] * 1e29
            x[2, 1] = x[2, 3] = 1e30
    x = x.to(dtype)
    for _ in range(50):                               # draws away from a boundary, so f32 and f64 agree
        u = torch.from_numpy(rng.uniform(0, 1, R)).float()
        u[0] = 0.0
        u[-1] = 0.999
        tok_w, logp_w, kept_w, dm, fm = minp_sample_ref(x, u, 1 / temp, min_p)
        if dm > 1e-4:
            break
    assert dm > 1e-4 and fm > 1e-4, (dm, fm)
    tok, logp, kept = poisoned(R, dtype=I64, value=-7), poisoned(R), poisoned(R, dtype=I32, value=-7)
    log_min_p = math.log(min_p) if min_p > 0 else -math.inf
    launch(minp_sample, backend, x, u, tok, logp, kept, 1 / temp, log_min_p)
    assert torch.equal(kept, kept_w.to(I32)), (kept, kept_w)
    assert torch.equal(tok, tok_w), (tok, tok_w)
    close(logp, logp_w.float(), scale=10)
    if V > 4:
        assert tok[1].item() == V // 2 and logp[1].item() == 0.0


# ---- 2. attention with sinks and a sliding window, on a 3-D grid ---------------------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[1], Q.shape[0]))
def sink_window_attention(Q, K, V, SINK, O, scale: float, window: int, *, BM: int = 16, BN: int = 16,
                          D: int = 16):
    """Q (B, H, T, D), K and V (B, Hkv, T, D) with H a multiple of Hkv (head h reads kv head h // (H / Hkv));
    SINK (H,) f32 a logit per head that joins every row's softmax and adds nothing to the output (-inf: none);
    O (B, H, T, D). Query t sees keys s with t - window < s <= t. Grid: (query blocks, heads, batch)."""
    i, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    T = Q.shape[2]
    hk = h // (Q.shape[1] // K.shape[1])
    q = ts.SharedTile[Q.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[V.dtype, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    seen = ts.RegTile[ts.bool_, BM, BN]()
    near = ts.RegTile[ts.bool_, BM, BN]()
    dist = ts.RegTile[ts.i32, BM, BN]()
    col = ts.RegTile[ts.f32, BM, 1]()
    qpos = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    m_use = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()  # noqa: E741
    rs = ts.RegVec[ts.f32, BM]()
    dead = ts.RegVec[ts.bool_, BM]()
    sink = ts.RegVec[ts.f32, 1]()
    ts.load(sink, SINK, at=(h,))                     # the head's sink, a vector of one
    ts.zero(col)
    ts.add(col, col, ts.per_col(sink))
    ts.row_sum(m, col)                               # the softmax starts from the sink: m = sink, l = exp(0) = 1
    ts.one(l)
    ts.load(q, Q, at=(b, h, i, 0))
    ts.arange(qpos, i * BM)
    ts.zero(acc)
    lo = ts.smax(i * BM - window + 1, 0) // BN
    hi = ts.cdiv(ts.smin(i * BM + BM, T), BN)
    for j in ts.range(lo, hi):
        ts.load(k, K, at=(b, hk, j, 0))
        ts.load(v, V, at=(b, hk, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.arange(kpos, j * BN)
        ts.zero(dist)
        ts.add(dist, dist, ts.per_row(qpos))
        ts.sub(dist, dist, ts.per_col(kpos))         # t - s
        ts.ge(seen, dist, 0)                         # causal
        ts.lt(near, dist, window)                    # inside the window
        ts.logical_and(seen, seen, near)
        ts.where(s, seen, s, -math.inf)
        ts.right_fill(s, s, T - j * BN, -math.inf)   # keys past T
        ts.row_max(m_new, s, m)
        ts.eq(dead, m_new, -math.inf)                # nothing seen yet and no sink: exp against 0
        ts.where(m_use, dead, 0.0, m_new)
        ts.sub(alpha, m, m_use)
        ts.exp(alpha, alpha)
        ts.sub(s, s, ts.per_row(m_use))
        ts.exp(s, s)
        ts.row_sum(rs, s)
        ts.mul(l, l, alpha)
        ts.add(l, l, rs)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, m_new)
    ts.div(acc, acc, ts.per_row(l))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


def sink_window_ref(q, k, v, sink, scale, window):
    """float64: softmax over [the window's scores, the sink], the sink's share dropped."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale                  # (B, H, T, T)
    t = torch.arange(T)
    ok = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    s = s.masked_fill(~ok, -math.inf)
    sk = sink.double()[None, :, None, None].expand(B, H, T, 1)
    p = torch.softmax(torch.cat([s, sk], -1), -1)[..., :T]
    return p @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("B", "H", "Hkv", "T", "window"), [(2, 4, 2, 37, 8), (1, 2, 1, 16, 1), (1, 3, 3, 50, 100),
                                                           (2, 2, 1, 1, 4)])
def test_attention_with_sinks_and_a_sliding_window(backend, dtype, B, H, Hkv, T, window, rng):
    """Sinks of -inf (none), 0, a large logit (30: the rows' mass mostly in the sink, outputs near 0) and a negative
    one; a window of 1 (each query its own key); a window past T (plain causal); T of 1. Q is a transposed view of
    (B, T, H, D) memory; the window is a runtime int."""
    D = 16
    q = randn(rng, B, T, H, D, dtype=dtype).transpose(1, 2)
    k = randn(rng, B, Hkv, T, D, dtype=dtype)
    v = randn(rng, B, Hkv, T, D, dtype=dtype)
    sink = torch.tensor([-math.inf, 0.0, 30.0, -2.5][:H] + [1.0] * max(0, H - 4))
    o = poisoned(B, H, T, D, dtype=dtype)
    launch(sink_window_attention, backend, q, k, v, sink, o, D ** -0.5, window, D=D)
    want = sink_window_ref(q, k, v, sink, D ** -0.5, window)
    close(o, want.to(dtype))


# ---- 3. a real DFT of rows by products with twiddles made in the kernel -------------------------------------------
TWO_PI = 2 * math.pi


@ts.kernel(grid=lambda X, RE, BM, BF: (ts.cdiv(X.shape[0], BM), ts.cdiv(RE.shape[1], BF)))
def rfft_rows(X, RE, IM, *, BM: int = 16, BF: int = 16, BK: int = 16):
    """X (M, N) real rows; RE, IM (M, N // 2 + 1) f32: torch.fft.rfft(X).real and .imag, as X @ cos and -(X @ sin) of
    the angles 2 pi (n f mod N) / N (the product reduced mod N in integers first, so a large n f loses no bits to
    f32)."""
    i, jf = ts.block_id(0), ts.block_id(1)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BK]()
    nf = ts.RegTile[ts.i32, BK, BF]()
    ang = ts.RegTile[ts.f32, BK, BF]()
    tw = ts.RegTile[ts.f32, BK, BF]()
    re = ts.RegTile[ts.f32, BM, BF]()
    im = ts.RegTile[ts.f32, BM, BF]()
    n = ts.RegVec[ts.i32, BK]()
    f = ts.RegVec[ts.i32, BF]()
    ts.arange(f, jf * BF)
    ts.zero(re)
    ts.zero(im)
    step = TWO_PI / N                                # a float Scalar
    for k in ts.range(ts.cdiv(N, BK)):
        ts.load(x, X, at=(i, k))                     # (columns past N read as 0: they add nothing)
        ts.arange(n, k * BK)
        ts.zero(nf)
        ts.add(nf, nf, ts.per_row(n))
        ts.mul(nf, nf, ts.per_col(f))
        ts.rem(nf, nf, N)
        ts.copy(ang, nf)
        ts.mul(ang, ang, step)
        ts.cos(tw, ang)
        ts.mma_AB(re, x, tw, re)
        ts.sin(tw, ang)
        ts.mma_AB(im, x, tw, im)
    ts.neg(im, im)
    ts.store(RE, re, at=(i, jf))
    ts.store(IM, im, at=(i, jf))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(5, 64), (17, 45), (3, 1), (2, 2), (1, 300), (0, 8)])
def test_rfft_rows(backend, dtype, M, N, rng):
    """Odd and even N, N of 1 (the row itself) and 2, a row wider than a tile (300: n f up to 45,000), no rows. The
    first row is a constant (all its mass at frequency 0, the rest exactly 0 in f64)."""
    x = randn(rng, M, N, dtype=dtype)
    if M:
        x[0] = 1.5
    F = N // 2 + 1
    re, im = poisoned(M, F), poisoned(M, F)
    launch(rfft_rows, backend, x, re, im)
    want = torch.fft.rfft(x.double(), dim=1) if M else torch.zeros(0, F, dtype=torch.complex128)
    scale = math.sqrt(max(N, 1)) * 4                 # f32 sums of N terms, twiddles rounded to f32
    close(re, want.real, torch.float32, scale=scale)
    close(im, want.imag, torch.float32, scale=scale)
