"""Round 16 of held-out kernels (after rounds 2-15): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch, outputs poisoned (NaN, or an impossible integer) first, seeds
fixed (the ``rng`` fixture of this file).

Multi-head latent attention decode (DeepSeek's MLA with the up-projections absorbed: every head of a sequence reads
one shared latent cache as both keys and values, the scores a sum of two products, the no-rope part against the
latent and the rope part against its own small cache; the heads are the rows of the query tile, fewer than the tile;
split-KV over a per-sequence length read with load_scalar, the splits merged by their log-sum-exps in a second
launch, empty splits and empty sequences giving 0); T5's relative-position-bias attention (the log-spaced bucket of
j - i made in the kernel by compares against thresholds fixed at trace time, both the bidirectional encoder's and
the causal decoder's, the per-head bias of each bucket read with load_scalar, keys past a per-batch length masked,
a batch with no keys at all); 2-D axial rotary embedding for vision transformers (a patch's row and column from its
token index by integer division and remainder of a runtime grid width, a prefix of class / register tokens left
unrotated, the head dimension's quarters addressed as tile coordinates, in place); and speculative decoding's
rejection sampler (the draft tokens' target and draft probabilities gathered across vocabulary tiles by compares,
the accepted prefix's length, then in a second launch the replacement token drawn from max(0, p - q) renormalized by
an inverse CDF carried across vocabulary tiles, or the bonus token from the target's extra row when all are
accepted). More kernels of this round are in test_heldout_round16_more.py; the explicit-hardware kernel and the
sm_90a compiles are in test_heldout_round16_hw.py.

What this round found: no kernel gave a wrong answer on either executor. Fixed, each kept as its test:
- Gluon: a thin tile (a (1, 1024) row of a flat buffer) put every warp down its one row, 7 of 8 warps holding copies:
  the multi-tensor LAMB step spilled 284 bytes per thread at 255 registers on sm_90a; warps go across the columns
  where the rows run out now (backends.gluon.layouts.blocked_params):
  test_heldout_round16_hw.py::test_thin_tiles_spread_their_warps_across_columns_on_gluon;
- language: a vector given to a reduction (row_sum(s, v), the sum of a vector, written five times by this round's
  kernels) said only "src must be a tile"; it names the vector and the way to write it now (lang.ops._reduce):
  test_reducing_a_vector_names_the_recipe_and_the_recipe_runs.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261600)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. MLA decode: a shared latent cache, split-KV, a log-sum-exp merge ------------------------------------------
@ts.kernel(grid=lambda QN, SPLITS: (SPLITS, QN.shape[0]))
def mla_decode_split(QN, QP, CKV, KPE, LENS, OP, LSE, scale: float, *, BH: int = 16, BT: int = 16, DC: int = 64,
                     DR: int = 16, SPLITS: int = 4):
    """QN (B, H, DC) the no-rope queries with W_UK absorbed, QP (B, H, DR) the rope queries, CKV (B, T, DC) the latent
    cache (keys and values), KPE (B, T, DR) the rope keys, LENS (B,) the cached lengths (<= T). Split s of sequence b
    takes key tiles [s * per, (s + 1) * per) of its cdiv(L, BT), per = cdiv(cdiv(L, BT), SPLITS). OP (B, SPLITS, H, DC)
    f32: the split's softmax-weighted latent (0 for an empty split), LSE (B, SPLITS, H) f32: the split's natural
    log-sum-exp of the scaled scores (-inf when empty). Grid: (SPLITS, B)."""
    sp, b = ts.block_id(0), ts.block_id(1)
    L = ts.load_scalar(LENS, b)
    tiles = ts.cdiv(L, BT)
    per = ts.cdiv(tiles, SPLITS)
    lo = sp * per
    hi = ts.smin(lo + per, tiles)
    qn = ts.SharedTile[QN.dtype, BH, DC]()
    qp = ts.SharedTile[QP.dtype, BH, DR]()
    ts.load(qn, QN, at=(b, 0, 0))                       # heads past H read 0 (their rows are dropped when stored)
    ts.load(qp, QP, at=(b, 0, 0))
    c = ts.SharedTile[CKV.dtype, BT, DC]()
    kp = ts.SharedTile[KPE.dtype, BT, DR]()
    acc = ts.RegTile[ts.f32, BH, DC]()
    m = ts.RegVec[ts.f32, BH]()
    lsum = ts.RegVec[ts.f32, BH]()
    ts.zero(acc)
    ts.neg_infty(m)
    ts.zero(lsum)
    for j in ts.range(lo, hi):
        ts.load(c, CKV, at=(b, j, 0))
        ts.load(kp, KPE, at=(b, j, 0))
        s = ts.RegTile[ts.f32, BH, BT]()
        ts.zero(s)
        ts.mma_ABt(s, qn, c, s)                         # the latent as keys
        ts.mma_ABt(s, qp, kp, s)                        # + the decoupled rope part
        ts.mul(s, s, scale * LOG2E)
        ts.right_fill(s, s, L - j * BT, -math.inf)      # cached positions past L
        m_new = ts.RegVec[ts.f32, BH]()
        ts.row_max(m_new, s, m)
        alpha = ts.RegVec[ts.f32, BH]()
        ts.sub(alpha, m, m_new)
        ts.exp2(alpha, alpha)
        ts.sub_row(s, s, m_new)
        ts.exp2(s, s)
        ts.mul_row(acc, acc, alpha)
        ts.mul(lsum, lsum, alpha)
        ts.row_sum(lsum, s, lsum)
        p = ts.RegTile[CKV.dtype, BH, BT]()
        ts.copy(p, s)
        ts.mma_AB(acc, p, c, acc)                       # the same latent tile as values
        ts.copy(m, m_new)
    empty = ts.RegVec[ts.bool_, BH]()
    ts.eq(empty, lsum, 0.0)
    safe = ts.RegVec[ts.f32, BH]()
    ts.where(safe, empty, 1.0, lsum)
    ts.div_row(acc, acc, safe)
    lse = ts.RegVec[ts.f32, BH]()
    ts.log2(lse, safe)
    ts.add(lse, lse, m)
    ts.mul(lse, lse, LN2)
    ts.where(lse, empty, -math.inf, lse)
    ts.store(OP, acc, at=(b, sp, 0, 0))
    ts.store(LSE, lse, at=(b, sp, 0))


@ts.kernel(grid=lambda OP: (OP.shape[0],))
def mla_merge(OP, LSE, O, LSE_OUT, *, BH: int = 16, DC: int = 64, SPLITS: int = 4):
    """O (B, H, DC) = sum_s exp(LSE_s - LSE) OP_s, LSE = log sum_s exp(LSE_s), in O's dtype; a sequence with no keys: O
    0, LSE -inf. Grid: (B,)."""
    b = ts.block_id(0)
    mx = ts.RegVec[ts.f32, BH]()
    ts.neg_infty(mx)
    lse = ts.RegVec[ts.f32, BH]()
    for sp in ts.range(SPLITS):
        ts.load(lse, LSE, at=(b, sp, 0))
        ts.max(mx, mx, lse)
    none = ts.RegVec[ts.bool_, BH]()
    ts.eq(none, mx, -math.inf)
    ts.where(mx, none, 0.0, mx)                         # no split saw a key: every weight below is exp(-inf) = 0
    acc = ts.RegTile[ts.f32, BH, DC]()
    part = ts.RegTile[ts.f32, BH, DC]()
    total = ts.RegVec[ts.f32, BH]()
    w = ts.RegVec[ts.f32, BH]()
    ts.zero(acc)
    ts.zero(total)
    for sp in ts.range(SPLITS):
        ts.load(lse, LSE, at=(b, sp, 0))
        ts.load(part, OP, at=(b, sp, 0, 0))
        ts.sub(w, lse, mx)
        ts.exp(w, w)
        ts.add(total, total, w)
        ts.mul_row(part, part, w)
        ts.add(acc, acc, part)
    safe = ts.RegVec[ts.f32, BH]()
    ts.where(safe, none, 1.0, total)
    ts.div_row(acc, acc, safe)
    out = ts.RegTile[O.dtype, BH, DC]()
    ts.copy(out, acc)
    ts.store(O, out, at=(b, 0, 0))
    ts.log(total, total)
    ts.add(total, total, mx)
    ts.where(total, none, -math.inf, total)
    ts.store(LSE_OUT, total, at=(b, 0))


def mla_ref(qn, qp, ckv, kpe, lens, scale):
    """float64: per sequence, softmax over its first L positions of (qn c^T + qp kpe^T) * scale, times c."""
    B, H, DC = qn.shape
    o = torch.zeros(B, H, DC, dtype=torch.float64)
    lse = torch.full((B, H), -math.inf, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        c = ckv[b, :n].double()
        s = (qn[b].double() @ c.T + qp[b].double() @ kpe[b, :n].double().T) * scale
        lse[b] = torch.logsumexp(s, -1)
        o[b] = torch.softmax(s, -1) @ c
    return o, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("H", "T", "lens", "splits"), [(5, 70, (70, 0, 1, 33), 4), (16, 16, (16, 9), 3),
                                                         (3, 40, (40, 17), 8)])
def test_mla_decode_split_kv(backend, dtype, H, T, lens, splits, rng):
    """H fewer than the head tile (5, 3) and equal to it; lengths of a whole cache, 0 (every split empty), 1 (one split
    with a key), off the tile (33, 17, 9); more splits than a sequence has tiles (8 over 3 tiles: splits past its
    end are empty). Queries at 4x scale: peaky softmaxes."""
    B, DC, DR = len(lens), 64, 16
    qn, qp = randn(rng, B, H, DC, dtype=dtype) * 4, randn(rng, B, H, DR, dtype=dtype) * 4
    ckv, kpe = randn(rng, B, T, DC, dtype=dtype), randn(rng, B, T, DR, dtype=dtype)
    ln = torch.tensor(lens, dtype=I32)
    scale = 1 / math.sqrt(DC + DR)
    op, lse = poisoned(B, splits, H, DC), poisoned(B, splits, H)
    launch(mla_decode_split, backend, qn, qp, ckv, kpe, ln, op, lse, scale, SPLITS=splits)
    o, lse_out = poisoned(B, H, DC, dtype=dtype), poisoned(B, H)
    launch(mla_merge, backend, op, lse, o, lse_out, SPLITS=splits)
    o_ref, lse_ref = mla_ref(qn, qp, ckv, kpe, ln, scale)
    close(o, o_ref, scale=4 if dtype is not torch.float32 else 1)   # p rounded to the cache's dtype before p c
    torch.testing.assert_close(lse_out.double(), lse_ref, rtol=1e-5, atol=1e-4)
    for b, n in enumerate(lens):                         # splits past a sequence's tiles are empty: -inf, not NaN
        tiles = -(-n // 16)
        per = -(-tiles // splits)
        busy = torch.tensor([s * per < tiles for s in range(splits)])
        assert torch.isneginf(lse[b, ~busy]).all() and torch.isfinite(lse[b, busy]).all(), (b, lse[b])


def test_mla_empty_splits_are_exactly_empty(rng):
    """A split with no keys writes 0 and -inf (not NaN) on both executors; the merge of a sequence of no keys is 0."""
    qn, qp = randn(rng, 1, 4, 64), randn(rng, 1, 4, 16)
    ckv, kpe = randn(rng, 1, 20, 64), randn(rng, 1, 20, 16)
    for backend in BACKENDS:
        for n in (0, 20):
            op, lse = poisoned(1, 4, 4, 64), poisoned(1, 4, 4)
            launch(mla_decode_split, backend, qn, qp, ckv, kpe, torch.tensor([n], dtype=I64), op, lse, 0.1)
            # 20 keys are 2 tiles: splits 0 and 1 hold one each, 2 and 3 none
            empty = list(range(4)) if n == 0 else [2, 3]
            assert (op[0, empty] == 0).all() and torch.isneginf(lse[0, empty]).all(), (backend, n)
            assert not torch.isnan(op).any() and not torch.isnan(lse).any(), (backend, n)


# ---- 2. T5 relative-position-bias attention ---------------------------------------------------------------------
def t5_bucket_thresholds(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple[int, list[int]]:
    """(max_exact, thresholds): distance n falls in bucket n below max_exact, else in max_exact + the number of
    thresholds <= n (at most nb - max_exact - 1 of them). Threshold k is the least n with
    log(n / max_exact) / log(max_distance / max_exact) * (nb - max_exact) >= k, decided in integers:
    n^(nb - me) me^k >= max_distance^k me^(nb - me)."""
    nb = num_buckets // 2 if bidirectional else num_buckets
    me = nb // 2
    thr, n = [], me
    for k in range(1, nb - me):
        while n ** (nb - me) * me ** k < max_distance ** k * me ** (nb - me):
            n += 1
        thr.append(n)
    return me, thr


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def t5_attention(Q, K, V, BIAS, KLEN, O, *, NB: int = 32, MAXD: int = 128, BIDIR: bool = True, BM: int = 16,
                 BN: int = 16, D: int = 16):
    """O = softmax(Q K^T + BIAS[bucket(j - i), h]) V per (batch, head) (T5: no 1/sqrt(d) scale); BIAS (NB, H) f32 as
    T5's relative_attention_bias weight; keys j >= KLEN[b] masked; BIDIR False: also keys after the query (the decoder).
    A query that sees no key gets 0. Grid: (query blocks, B * H)."""
    i, bh = ts.block_id(0), ts.block_id(1)
    H = Q.shape[1]
    b, h = bh // H, bh % H
    n_keys = ts.load_scalar(KLEN, b)
    me, thresholds = t5_bucket_thresholds(NB, MAXD, BIDIR)
    half = NB // 2
    bias_of = [ts.load_scalar(BIAS, k, h) for k in range(NB)]     # this head's bias per bucket, read once
    q = ts.SharedTile[Q.dtype, BM, D]()
    ts.load(q, Q, at=(b, h, i, 0))
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, D]()
    acc = ts.RegTile[ts.f32, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    lsum = ts.RegVec[ts.f32, BM]()
    ts.zero(acc)
    ts.neg_infty(m)
    ts.zero(lsum)
    rows = ts.RegVec[ts.i32, BM]()
    ts.arange(rows, i * BM)
    stop = ts.cdiv(n_keys, BN) if BIDIR else ts.smin(ts.cdiv(n_keys, BN), ts.cdiv((i + 1) * BM, BN))
    for j in ts.range(stop):
        ts.load(k_s, K, at=(b, h, j, 0))
        ts.load(v_s, V, at=(b, h, j, 0))
        s = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(s)
        ts.mma_ABt(s, q, k_s, s)
        cols = ts.RegVec[ts.i32, BN]()
        ts.arange(cols, j * BN)
        rel = ts.RegTile[ts.i32, BM, BN]()               # memory position - query position
        ts.zero(rel)
        ts.add(rel, rel, ts.per_col(cols))
        ts.sub(rel, rel, ts.per_row(rows))
        bucket = ts.RegTile[ts.i32, BM, BN]()
        dist = ts.RegTile[ts.i32, BM, BN]()
        if BIDIR:
            after = ts.RegTile[ts.bool_, BM, BN]()
            ts.gt(after, rel, 0)
            ts.where(bucket, after, half, 0)
            ts.abs(dist, rel)
        else:
            ts.zero(bucket)
            ts.neg(dist, rel)
            ts.max(dist, dist, 0)
        large = ts.RegTile[ts.i32, BM, BN]()
        ts.fill(large, me)
        past = ts.RegTile[ts.bool_, BM, BN]()
        for t in thresholds:                             # log-spaced: one compare per bucket past the exact ones
            ts.ge(past, dist, t)
            step = ts.RegTile[ts.i32, BM, BN]()
            ts.where(step, past, 1, 0)
            ts.add(large, large, step)
        small = ts.RegTile[ts.bool_, BM, BN]()
        ts.lt(small, dist, me)
        ts.where(dist, small, dist, large)
        ts.add(bucket, bucket, dist)
        bias = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(bias)
        hit = ts.RegTile[ts.bool_, BM, BN]()
        for k in range(NB):
            ts.eq(hit, bucket, k)
            ts.where(bias, hit, bias_of[k], bias)
        ts.add(s, s, bias)
        ts.right_fill(s, s, n_keys - j * BN, -math.inf)
        if not BIDIR:
            ts.make_causal(s, s, i * BM - j * BN)
        m_new = ts.RegVec[ts.f32, BM]()
        ts.row_max(m_new, s, m)
        m_use = ts.RegVec[ts.f32, BM]()                  # a row with every key masked so far: subtract 0, not -inf
        none = ts.RegVec[ts.bool_, BM]()
        ts.eq(none, m_new, -math.inf)
        ts.where(m_use, none, 0.0, m_new)
        alpha = ts.RegVec[ts.f32, BM]()
        ts.sub(alpha, m, m_use)
        ts.exp(alpha, alpha)
        ts.sub_row(s, s, m_use)
        ts.exp(s, s)
        ts.mul_row(acc, acc, alpha)
        ts.mul(lsum, lsum, alpha)
        ts.row_sum(lsum, s, lsum)
        p = ts.RegTile[V.dtype, BM, BN]()
        ts.copy(p, s)
        ts.mma_AB(acc, p, v_s, acc)
        ts.copy(m, m_new)
    seen = ts.RegVec[ts.bool_, BM]()
    ts.gt(seen, lsum, 0.0)
    ts.where(lsum, seen, lsum, 1.0)
    ts.div_row(acc, acc, lsum)
    out = ts.RegTile[O.dtype, BM, D]()
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


def t5_bucket_ref(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Hugging Face's T5Attention._relative_position_bucket, in float64."""
    ret = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret += (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (torch.log(n.double() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


def t5_ref(q, k, v, bias, klen, bidirectional, nb, maxd):
    B, H, N, _ = q.shape
    Nk = k.shape[2]
    rel = torch.arange(Nk)[None, :] - torch.arange(N)[:, None]
    bucket = t5_bucket_ref(rel, bidirectional, nb, maxd)             # (N, Nk)
    s = q.double() @ k.double().transpose(-1, -2) + bias.double()[bucket].permute(2, 0, 1)[None]
    seen = torch.arange(Nk)[None, None, None, :] < klen.long()[:, None, None, None]
    if not bidirectional:
        seen = seen & (rel <= 0)[None, None]
    s = s.masked_fill(~seen, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)                           # rows that see nothing: 0
    return p @ v.double()


def test_t5_thresholds_are_hugging_faces_buckets():
    """The thresholds the kernel compares against give Hugging Face's buckets for every distance up to 4x max_distance
    (its float formula, in float64; at the distances where it lands exactly on an integer, such as 16 of max_exact 8
    and max_distance 128, exact arithmetic and Hugging Face's float32 agree with it)."""
    for nb, maxd in ((32, 128), (16, 40), (8, 20)):
        for bidir in (True, False):
            me, thr = t5_bucket_thresholds(nb, maxd, bidir)
            n = torch.arange(0, 4 * maxd)
            mine = torch.where(n < me, n, me + sum((n >= t).long() for t in thr))
            for rel in (-n, n) if bidir else (-n,):          # keys before the query, and (encoder) after it
                want = t5_bucket_ref(rel, bidir, nb, maxd) - (nb // 2) * (rel > 0).long()
                assert torch.equal(mine, want), (nb, maxd, bidir)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("bidir", "N", "Nk", "klen", "nb", "maxd"), [(True, 37, 45, (45, 0), 32, 128),
                                                                      (False, 40, 40, (40, 23), 32, 128),
                                                                      (True, 20, 130, (130, 129), 16, 40)])
def test_t5_relative_bias_attention(backend, dtype, bidir, N, Nk, klen, nb, maxd, rng):
    """Ragged queries and keys (37 x 45, 20 x 130: distances past max_distance, the last bucket), a batch with no keys
    (its outputs 0), a decoder batch shorter than its queries (rows past the keys see only their masked-out future:
    their outputs are the average over the keys before them). Biases up to +-8: some buckets dominate."""
    B, H, D = len(klen), 3, 16
    q, k, v = (randn(rng, B, H, n, D, dtype=dtype) for n in (N, Nk, Nk))
    bias = randn(rng, nb, H) * 8
    kl = torch.tensor(klen, dtype=I64)
    o = poisoned(B, H, N, D, dtype=dtype)
    launch(t5_attention, backend, q, k, v, bias, kl, o, NB=nb, MAXD=maxd, BIDIR=bidir, BM=16, BN=16, D=D)
    close(o, t5_ref(q, k, v, bias, kl, bidir, nb, maxd), scale=2)


# ---- 3. 2-D axial rotary embedding (vision) ---------------------------------------------------------------------
@ts.kernel(grid=lambda X, BT: (ts.cdiv(X.shape[2], BT), X.shape[1], X.shape[0]))
def rope_axial(X, OUT, GW: int, PREFIX: int, *, THETA: float = 100.0, BT: int = 16, DQ: int = 16):
    """X, OUT (B, H, N, 4 DQ) (a (B, N, H, D) tensor's transposed view: a tile spans tokens and head dims): tokens
    [PREFIX, N) are the patches of a grid GW wide in row-major order; patch p at row p // GW, column p % GW. The head
    dimension's first half turns by the row, its second by the column, each half as rotate-half pairs (quarter 0 with
    1, 2 with 3) at frequencies THETA^(-k / DQ), k < DQ. The first PREFIX tokens (class and register tokens) are copied
    unturned. OUT may be X. Grid: (token blocks, H, B)."""
    i, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    tok = ts.RegVec[ts.i32, BT]()
    ts.arange(tok, i * BT)
    ts.sub(tok, tok, PREFIX)
    patch = ts.RegVec[ts.bool_, BT]()
    ts.ge(patch, tok, 0)
    ts.max(tok, tok, 0)                                  # prefix tokens: angle 0 below
    row = ts.RegVec[ts.i32, BT]()
    col = ts.RegVec[ts.i32, BT]()
    ts.div(row, tok, GW)
    ts.rem(col, tok, GW)
    freq = ts.RegVec[ts.f32, DQ]()
    ts.arange(freq)
    ts.mul(freq, freq, -math.log2(THETA) / DQ)
    ts.exp2(freq, freq)
    x = [ts.RegTile[ts.f32, BT, DQ]() for _ in range(4)]
    for qt in range(4):
        ts.load(x[qt], X, at=(b, h, i, qt))              # quarter qt of the head dimension, as a tile coordinate
    for half, pos in ((0, row), (1, col)):
        posf = ts.RegVec[ts.f32, BT]()
        ts.copy(posf, pos)
        ts.where(posf, patch, posf, 0.0)
        ang = ts.RegTile[ts.f32, BT, DQ]()
        ts.zero(ang)
        ts.add(ang, ang, ts.per_row(posf))
        ts.mul(ang, ang, ts.per_col(freq))
        cs = ts.RegTile[ts.f32, BT, DQ]()
        sn = ts.RegTile[ts.f32, BT, DQ]()
        ts.cos(cs, ang)
        ts.sin(sn, ang)
        a, c = x[2 * half], x[2 * half + 1]
        t0 = ts.RegTile[ts.f32, BT, DQ]()
        t1 = ts.RegTile[ts.f32, BT, DQ]()
        ts.mul(t0, a, cs)
        ts.mul(t1, c, sn)
        ts.sub(t0, t0, t1)                               # a cos - c sin
        ts.mul(t1, c, cs)
        ts.mul(c, a, sn)
        ts.add(t1, t1, c)                                # c cos + a sin
        for qt, t in ((2 * half, t0), (2 * half + 1, t1)):
            out = ts.RegTile[OUT.dtype, BT, DQ]()
            ts.copy(out, t)
            ts.store(OUT, out, at=(b, h, i, qt))


def rope_axial_ref(x, gw, prefix, theta):
    """float64: rows and columns of the patch grid turn the two halves of the head dimension (rotate-half each)."""
    B, N, H, D = x.shape
    dq = D // 4
    p = (torch.arange(N) - prefix).clamp(min=0)
    pos = torch.stack([p // gw, p % gw]).double() * (torch.arange(N) >= prefix)          # (2, N)
    freq = theta ** (-torch.arange(dq, dtype=torch.float64) / dq)
    out = x.double().clone()
    for half in range(2):
        ang = pos[half][:, None] * freq[None, :]                                          # (N, dq)
        cs, sn = ang.cos()[None, :, None], ang.sin()[None, :, None]
        a = x[..., 2 * half * dq:(2 * half + 1) * dq].double()
        c = x[..., (2 * half + 1) * dq:(2 * half + 2) * dq].double()
        out[..., 2 * half * dq:(2 * half + 1) * dq] = a * cs - c * sn
        out[..., (2 * half + 1) * dq:(2 * half + 2) * dq] = c * cs + a * sn
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("gh", "gw", "prefix", "dq"), [(5, 7, 1, 16), (4, 4, 5, 8), (3, 11, 0, 16)])
def test_rope_axial_2d(backend, dtype, gh, gw, prefix, dq, rng):
    """Grids of 5 x 7 (+ a class token: 36 tokens over 3 tiles), 4 x 4 (+ a class token and 4 registers), 3 x 11; head
    dims 64 and 32; magnitudes to 1e3 in a few rows; once out of place and once in place (OUT is X)."""
    B, H = 2, 3
    N = gh * gw + prefix
    x = randn(rng, B, N, H, 4 * dq)
    x[0, 3] *= 1e3
    x = x.to(dtype)
    want = rope_axial_ref(x, gw, prefix, 100.0)
    out = poisoned(B, N, H, 4 * dq, dtype=dtype)
    launch(rope_axial, backend, x.transpose(1, 2), out.transpose(1, 2), gw, prefix, BT=16, DQ=dq)
    close(out, want, scale=1 if dtype is torch.float32 else 2)
    assert torch.equal(out[:, :prefix], x[:, :prefix])                # the prefix tokens unturned, bit for bit
    launch(rope_axial, backend, x.transpose(1, 2), x.transpose(1, 2), gw, prefix, BT=16, DQ=dq)
    assert torch.equal(x, out)


# ---- 4. speculative decoding: the rejection sampler -------------------------------------------------------------
@ts.kernel(grid=lambda DRAFT: (DRAFT.shape[0],))
def spec_accept(DRAFT, Q, P, U, NACC, *, BK: int = 8, BV: int = 16):
    """DRAFT (B, K) the draft tokens, Q (B, K, V) the draft's probabilities, P (B, K + 1, V) the target's, U (B, K) f32
    uniforms. Token k is accepted when U[k] Q[k, tok_k] < P[k, tok_k] (u < p / q); NACC (B,) i32 = the number accepted
    before the first rejection (K if none). K <= BK. Grid: (B,)."""
    b = ts.block_id(0)
    K, V = DRAFT.shape[1], Q.shape[2]
    tok = ts.RegVec[DRAFT.dtype, BK]()
    ts.load(tok, DRAFT, at=(b, 0))
    p_tok = ts.RegVec[ts.f32, BK]()
    q_tok = ts.RegVec[ts.f32, BK]()
    ts.zero(p_tok)
    ts.zero(q_tok)
    p = ts.RegTile[ts.f32, BK, BV]()
    q = ts.RegTile[ts.f32, BK, BV]()
    hit = ts.RegTile[ts.bool_, BK, BV]()
    for j in ts.range(ts.cdiv(V, BV)):
        ts.load(p, P, at=(b, 0, j))
        ts.load(q, Q, at=(b, 0, j))
        cols = ts.RegVec[ts.i64, BV]()
        ts.arange(cols, j * BV)
        ts.eq(hit, ts.per_col(cols), ts.per_row(tok))    # the draft token's column of each row
        ts.where(p, hit, p, 0.0)
        ts.where(q, hit, q, 0.0)
        ts.row_sum(p_tok, p, p_tok)
        ts.row_sum(q_tok, q, q_tok)
    u = ts.RegVec[ts.f32, BK]()
    ts.load(u, U, at=(b, 0))
    ts.mul(u, u, q_tok)
    ok = ts.RegVec[ts.bool_, BK]()
    ts.lt(ok, u, p_tok)
    k = ts.RegVec[ts.i32, BK]()
    ts.arange(k)
    first = ts.RegVec[ts.i32, BK]()
    ts.where(first, ok, K, k)                            # a rejected row's index, else K
    grid = ts.RegTile[ts.i32, 1, BK]()
    ts.zero(grid)
    ts.add(grid, grid, ts.per_col(first))
    n = ts.RegVec[ts.i32, 1]()
    ts.row_min(n, grid)
    ts.min(n, n, K)                                      # (rows past K read u = 0: accepted, index K)
    ts.store(NACC, n, at=(b,))


@ts.kernel(grid=lambda DRAFT: (DRAFT.shape[0],))
def spec_resample(DRAFT, Q, P, NACC, R, OUT, *, BK1: int = 8, BV: int = 16):
    """OUT (B, K + 1) i64: the accepted draft tokens, then one drawn from max(0, P[n] - Q[n]) renormalized (n = NACC[b]
    < K), or from P[K] when all K were accepted (Q's row K is past Q and reads 0), by the inverse CDF at R[b] in [0, 1)
    (the first token whose cumulative mass passes R[b] times the total), then -1. K + 1 <= BK1. Grid: (B,)."""
    b = ts.block_id(0)
    V = P.shape[2]
    n = ts.load_scalar(NACC, b)
    r = ts.load_scalar(R, b)
    p = ts.RegTile[ts.f32, 1, BV]()
    q = ts.RegTile[ts.f32, 1, BV]()
    total = ts.RegVec[ts.f32, 1]()
    ts.zero(total)
    last = ts.RegVec[ts.i32, 1]()                        # the last token of positive mass
    ts.fill(last, -1)
    cols = ts.RegVec[ts.i32, BV]()
    idx = ts.RegTile[ts.i32, 1, BV]()
    pos = ts.RegTile[ts.bool_, 1, BV]()
    for j in ts.range(ts.cdiv(V, BV)):
        ts.load(p, P, at=(b, n, j))                      # row n, a tile of one row
        ts.load(q, Q, at=(b, n, j))
        ts.sub(p, p, q)
        ts.max(p, p, 0.0)
        ts.row_sum(total, p, total)
        ts.arange(cols, j * BV)
        ts.gt(pos, p, 0.0)
        ts.zero(idx)
        ts.add(idx, idx, ts.per_col(cols))
        ts.where(idx, pos, idx, -1)
        ts.row_max(last, idx, last)
    thr = ts.RegVec[ts.f32, 1]()
    ts.mul(thr, total, r)
    ones = ts.RegTile[ts.f32, BV, BV]()                  # upper triangle: an inclusive prefix sum as a product
    ts.one(ones)
    ts.triu(ones, ones)
    run = ts.RegVec[ts.f32, 1]()
    ts.zero(run)
    count = ts.RegVec[ts.i32, 1]()
    ts.zero(count)
    cum = ts.RegTile[ts.f32, 1, BV]()
    below = ts.RegTile[ts.bool_, 1, BV]()
    inside = ts.RegTile[ts.bool_, 1, BV]()
    for j in ts.range(ts.cdiv(V, BV)):
        ts.load(p, P, at=(b, n, j))
        ts.load(q, Q, at=(b, n, j))
        ts.sub(p, p, q)
        ts.max(p, p, 0.0)
        ts.zero(cum)
        ts.mma_AB(cum, p, ones, cum)
        ts.add(cum, cum, ts.per_row(run))
        ts.le(below, cum, ts.per_row(thr))
        ts.arange(cols, j * BV)
        ts.lt(inside, ts.per_col(cols), V)
        ts.logical_and(below, below, inside)
        ts.where(idx, below, 1, 0)
        ts.row_sum(count, idx, count)
        ts.row_sum(run, p, run)
    ts.min(count, count, last)                           # mass lost to rounding past the last token: that token
    k = ts.RegVec[ts.i64, BK1]()
    ts.arange(k)
    draft = ts.RegVec[ts.i64, BK1]()
    ts.load(draft, DRAFT, at=(b, 0))
    res = ts.RegTile[ts.i64, 1, BK1]()
    ts.fill(res, -1)
    at_n = ts.RegTile[ts.bool_, 1, BK1]()
    ts.eq(at_n, ts.per_col(k), n)
    ts.where(res, at_n, ts.per_row(count), res)
    ts.lt(at_n, ts.per_col(k), n)
    ts.where(res, at_n, ts.per_col(draft), res)
    ts.store(OUT, res, at=(b, 0))


def _spec_case(rng, B, K, V, dtype):
    """Draft and target distributions (softmaxes of logits at 3x scale: peaky), draft tokens drawn from the draft,
    uniforms; batch row 0 has its target equal to its draft (every token accepted), row 1 a target that gives the
    first draft token no mass (rejected at 0)."""
    ql = torch.from_numpy(rng.standard_normal((B, K, V)) * 3)
    pl = torch.from_numpy(rng.standard_normal((B, K + 1, V)) * 3)
    q, p = torch.softmax(ql, -1), torch.softmax(pl, -1)
    p[0, :K] = q[0]
    draft = torch.multinomial(q.reshape(-1, V).float(), 1, generator=torch.Generator().manual_seed(7)).reshape(B, K)
    if B > 1:
        p[1, 0, draft[1, 0]] = 0.0
        p[1, 0] /= p[1, 0].sum()
    u = torch.from_numpy(rng.uniform(0, 1, (B, K))).float()
    r = torch.from_numpy(rng.uniform(0, 1, (B,))).float()
    return draft, q.to(dtype), p.to(dtype), u, r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tok_dtype", [I32, I64])
@pytest.mark.parametrize(("B", "K", "V"), [(4, 5, 50), (3, 7, 16), (2, 1, 33)])
def test_speculative_rejection_sampling(backend, dtype, tok_dtype, B, K, V, rng):
    draft, q, p, u, r = _spec_case(rng, B, K, V, dtype)
    draft = draft.to(tok_dtype)
    nacc = poisoned(B, dtype=I32, value=-7)
    launch(spec_accept, backend, draft, q, p, u, nacc)
    qd, pd = q.double(), p.double()
    d = draft.long()
    p_tok = pd[:, :K].gather(2, d[..., None])[..., 0]
    q_tok = qd.gather(2, d[..., None])[..., 0]
    ok = u.double() * q_tok.float().double() < p_tok.float().double()
    want_n = torch.where(ok.all(1), K, (~ok).long().argmax(1))
    assert torch.equal(nacc.long(), want_n), (nacc, want_n)
    assert int(nacc[0]) == K                             # target == draft: everything accepted
    out = poisoned(B, K + 1, dtype=I64, value=-7)
    launch(spec_resample, backend, draft, q, p, nacc, r, out)
    for b in range(B):
        n = int(want_n[b])
        assert torch.equal(out[b, :n], d[b, :n]) and (out[b, n + 1:] == -1).all(), (b, out[b])
        w = (pd[b, n] - (qd[b, n] if n < K else 0)).clamp(min=0)
        cum = w.cumsum(0)
        t, thr = int(out[b, n]), float(r[b]) * float(cum[-1])
        # the token passes the threshold by the float64 sums, up to f32 rounding of the running sum
        assert w[t] > 0 and cum[t] - w[t] <= thr + 1e-5 and cum[t] >= thr - 1e-5, (b, t, thr, cum)


# ---- 5. the sum of a vector: what the refusal says to write, and that it runs --------------------------------------
def test_reducing_a_vector_names_the_recipe_and_the_recipe_runs():
    """This round's kernels reduce vectors five times (the accepted count, a segment's norms, Viterbi's best score). A
    vector given to row_sum said only "src must be a tile, got RegVec[f32, 16]"; it names the vector and says how to
    write the reduction now (lang.ops._reduce), and what it says gives the vector's sum on both executors."""
    from tilestack.errors import TileShapeError

    @ts.kernel(grid=lambda X: (1,))
    def vec_sum_wrong(X, Y):
        v = ts.RegVec[ts.f32, 16]()
        ts.load(v, X, at=(0,))
        s = ts.RegVec[ts.f32, 1]()
        ts.row_sum(s, v)
        ts.store(Y, s, at=(0,))

    with pytest.raises(TileShapeError, match=r"row_sum: src `v` is a vector, RegVec\[f32, 16\]; reductions take a "
                                             r"2-D tile\. To reduce a vector, make it the one row of a \(1, 16\) tile, "
                                             r"t = RegTile\[f32, 1, 16\]\(\); zero\(t\); add\(t, t, per_col\(v\)\), "
                                             r"then row_sum\(dst, t\)"):
        vec_sum_wrong(torch.ones(16), torch.zeros(1), backend="reference")

    @ts.kernel(grid=lambda X: (1,))
    def vec_sum(X, Y):
        v = ts.RegVec[ts.f32, 16]()
        ts.load(v, X, at=(0,))
        t = ts.RegTile[ts.f32, 1, 16]()
        ts.zero(t)
        ts.add(t, t, ts.per_col(v))
        s = ts.RegVec[ts.f32, 1]()
        ts.row_sum(s, t)
        ts.store(Y, s, at=(0,))

    x = torch.arange(13.0) - 100.0                       # 13 of 16: the tile's tail reads 0
    for backend in BACKENDS:
        y = poisoned(1)
        launch(vec_sum, backend, x, y)
        assert float(y) == float(x.sum()), backend
