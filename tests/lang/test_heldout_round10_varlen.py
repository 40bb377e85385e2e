"""Round 10 of held-out kernels, continued (see test_heldout_round10.py's docstring): attention over variable-length
batches. Packed (varlen) causal attention: the sequences concatenated along one token axis, cu_seqlens giving their
boundaries; each token's sequence id counted from cu_seqlens by compares, keys attended only within the query's
sequence and not after it (a key tile loop that stops at the diagonal). Chunked prefill: a chunk of new queries
attending to a cache plus themselves, causal aligned to the bottom right (query r of a chunk of Q at position
L - Q + r of a sequence of L keys), with per-sequence lengths, some chunks longer than what is left (those rows get 0).
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. packed varlen causal attention: sequence ids from cu_seqlens ------------------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[1], BM), Q.shape[0]))
def varlen_causal(Q, K, V, ENDS, O, scale: float, *, BM: int = 16, BN: int = 16, NS: int = 16, D: int = 16):
    """Q, K, V, O (H, T, D) views of packed (T, H, D) tensors; ENDS (NS_real,) i32 = cu_seqlens[1:] (the sequences'
    ends, NS_real <= NS). Token t's sequence id is the number of ends <= t; key s is seen by query t when their ids
    match and s <= t."""
    i, h = ts.block_id(0), ts.block_id(1)
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.SharedTile[Q.dtype, BN, D]()
    v = ts.SharedTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    same = ts.RegTile[ts.bool_, BM, BN]()
    bq = ts.RegTile[ts.bool_, BM, NS]()
    bk = ts.RegTile[ts.bool_, BN, NS]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    cq = ts.RegTile[ts.i32, BM, NS]()
    ck = ts.RegTile[ts.i32, BN, NS]()
    ends = ts.RegVec[ts.i32, NS]()
    eidx = ts.RegVec[ts.i32, NS]()
    ereal = ts.RegVec[ts.bool_, NS]()
    qpos = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    qseg = ts.RegVec[ts.i32, BM]()
    kseg = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    ts.load(ends, ENDS, at=(0,))
    ts.arange(eidx, 0)
    ts.lt(ereal, eidx, ENDS.shape[0])
    ts.where(ends, ereal, ends, 2**30)               # (entries past the real ends never count)
    ts.arange(qpos, i * BM)
    ts.le(bq, ts.per_col(ends), ts.per_row(qpos))
    ts.where(cq, bq, 1, 0)
    ts.row_sum(qseg, cq)                             # the queries' sequence ids
    ts.load(q, Q, at=(h, i, 0))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(K.shape[1], BN))):
        ts.arange(kpos, j * BN)
        ts.load(k, K, at=(h, j, 0))
        ts.load(v, V, at=(h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.le(bk, ts.per_col(ends), ts.per_row(kpos))
        ts.where(ck, bk, 1, 0)
        ts.row_sum(kseg, ck)
        ts.ge(keep, ts.per_row(qpos), ts.per_col(kpos))
        ts.eq(same, ts.per_row(qseg), ts.per_col(kseg))
        ts.logical_and(keep, keep, same)
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
    ts.copy(out, acc)
    ts.store(O, out, at=(h, i, 0))


def varlen_ref(q, k, v, cu, scale):
    """q, k, v (T, H, D) packed; float64 causal attention within each sequence."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if b > a:
            qq, kk, vv = (t[a:b].double().transpose(0, 1) for t in (q, k, v))    # (H, n, D)
            sc = qq @ kk.transpose(1, 2) * scale
            n = b - a
            sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            out[a:b] = (sc.softmax(-1) @ vv).transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lens", [(5, 0, 23, 1, 9), (40,), (1, 1, 1), ()])
def test_varlen_causal_attention(backend, dtype, lens, rng):
    """Sequences of lengths 0 (an empty one between others), 1, and longer than a tile, packed with no padding; no
    sequences at all (T = 0); queries scaled by 4 so rows are peaked."""
    H, D = 2, 16
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=I32)
    T = int(cu[-1])
    q = randn(rng, T, H, D, dtype=dtype) * 4
    k, v = randn(rng, T, H, D, dtype=dtype), randn(rng, T, H, D, dtype=dtype)
    o = poisoned(T, H, D, dtype=dtype)
    tr = lambda t: t.transpose(0, 1)                 # noqa: E731 - (T, H, D) -> (H, T, D) views
    launch(varlen_causal, backend, tr(q), tr(k), tr(v), cu[1:], tr(o), D ** -0.5)
    close(o, varlen_ref(q, k, v, cu, D ** -0.5).to(dtype), scale=4)


# ---- 2. chunked prefill: a chunk of queries over cache + chunk keys, causal aligned to the bottom right -------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def chunked_prefill(Q, K, V, LEN, NQ, O, scale: float, *, BM: int = 16, BN: int = 16, D: int = 16):
    """Q, O (B, H, C, D) a chunk of C query slots; K, V (B, H, S, D) each sequence's keys, its first LEN[b] real;
    LEN, NQ (B, BM) i32 (stride 0): sequence b's key count and how many of the chunk's slots are real (its last
    NQ[b] keys are those queries'). Slot r (< NQ[b]) sits at position LEN - NQ + r and sees keys s <= that; slots past
    NQ[b] get 0."""
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.SharedTile[Q.dtype, BN, D]()
    v = ts.SharedTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    ln = ts.RegVec[ts.i32, BM]()
    nq = ts.RegVec[ts.i32, BM]()
    slot = ts.RegVec[ts.i32, BM]()
    qpos = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    real = ts.RegVec[ts.bool_, BM]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    ts.load(ln, LEN, at=(b, 0))
    ts.load(nq, NQ, at=(b, 0))
    ts.arange(slot, i * BM)
    ts.lt(real, slot, nq)
    ts.sub(qpos, ln, nq)
    ts.add(qpos, qpos, slot)
    ts.where(qpos, real, qpos, -1)                   # a slot past NQ sees no key
    ts.load(q, Q, at=(b, h, i, 0))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(K.shape[2], BN)):
        ts.arange(kpos, j * BN)
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.le(keep, ts.per_col(kpos), ts.per_row(qpos))
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
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "C", "S"), [(3, 1, 20, 45), (1, 1, 5, 5), (0, 2, 4, 8)])
def test_chunked_prefill_bottom_right_causal(backend, dtype, B, H, C, S, rng):
    """Per sequence: a full chunk after a cache, a chunk with fewer real queries than slots (the rest get 0), and a
    chunk that is the whole sequence (no cache: plain causal); keys past LEN hold NaN (masked out of the scores) and
    values there the format's max (weighted by 0)."""
    D = 16
    q = randn(rng, B, H, C, D, dtype=dtype) * 4
    k, v = randn(rng, B, H, S, D, dtype=dtype), randn(rng, B, H, S, D, dtype=dtype)
    nq = torch.from_numpy(rng.integers(1, C + 1, B)).to(I32)
    ln = torch.from_numpy(rng.integers(0, S + 1, B)).to(I32)
    for r in range(B):
        nq[r] = min(int(nq[r]), C if r != 1 else max(C // 2, 1), S)
        ln[r] = max(int(ln[r]), int(nq[r])) if r != 2 else int(nq[r])
        k[r, :, int(ln[r]):] = math.nan
        v[r, :, int(ln[r]):] = torch.finfo(dtype).max        # (times a probability of 0: 0; NaN would not be)
    o = poisoned(B, H, C, D, dtype=dtype)
    launch(chunked_prefill, backend, q, k, v, ln[:, None].expand(B, 16), nq[:, None].expand(B, 16), o, D ** -0.5)
    want = torch.zeros(B, H, C, D, dtype=torch.float64)
    for r in range(B):
        n, L = int(nq[r]), int(ln[r])
        sc = q[r, :, :n].double() @ k[r, :, :L].double().transpose(1, 2) * D ** -0.5     # (H, n, L)
        hide = torch.arange(L)[None, :] > (L - n + torch.arange(n))[:, None]
        want[r, :, :n] = sc.masked_fill(hide, -math.inf).softmax(-1) @ v[r, :, :L].double()
    close(o, want.to(dtype), scale=4)
