"""Round 18 of held-out kernels (after rounds 2-17): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch / NumPy or a hand computation, outputs poisoned (NaN, or an
impossible integer) first, seeds fixed (the ``rng`` fixture of this file).

RWKV-4's WKV recurrence (the numerically stable form of the official CUDA kernel: a running maximum exponent carried
beside the numerator and denominator, keys up to 40 where a naive exp overflows f16 and f32's sum; K and V as
transposed views); multi-LoRA SGMV (Punica / S-LoRA: tokens sorted into segments at offsets that are not multiples of
the tile, each segment's adapter read with load_scalar, -1 for none, each adapter's own rank the trip count of the
inner product's loop, a per-group K, the padded ranks NaN so that an unmasked read shows; the down projections as
transposed views as PEFT stores them; the update read-modified-written under a row mask beside neighbouring
segments); vLLM's sampling penalties (repetition over the prompt and the output, frequency and presence over the
output, the token counts built per vocabulary tile by compares of the padded histories); NumPy's packbits and
unpackbits of boolean masks (eight columns weighted and summed into a byte by an exact f32 product with a 0/1
grouping matrix, unpacked by the product's transpose and a per-column division; little and big bit order, a count not
a multiple of 8); a graph-attention edge softmax over CSR segments (an online maximum and sum per head over the
segment's edge tiles, written under a row mask, empty segments and segments inside one tile); and a batched LU
factorization with partial pivoting in f64 and f32 (the pivot the first largest |a[r, k]| by a broadcast row max and
a row min of indices, rows swapped by one-hot column sums, pivots 1-based as LAPACK's getrf and torch.linalg.lu_factor).
More kernels of this round are in test_heldout_round18_more.py and test_heldout_round18_loops.py.

What this round found: no kernel gave a wrong answer on either executor, and every bad launch tried was refused before
any work, naming the argument. Fixed, kept as its test: a number or Scalar as an op's first operand (`sub(kf, 7.0,
kf)`, as one writes 7 - k, first written for this file's packbits bit weights) was refused as "sub: a must be a tile
or vector, got float 7.0", the form left to find; ops that commute take it now, the others name the way to write it
(lang.ops._binary): test_heldout_round18_loops.py::test_a_number_as_the_first_operand.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]
RWKV_MIN = -1e38                    # the official kernel's "no term yet" exponent (finite: exp(MIN - x) is 0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261800)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. RWKV-4 WKV ------------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda K, BC: (K.shape[0], ts.cdiv(K.shape[2], BC)))
def rwkv4_wkv(W, U, K, V, Y, *, BC: int = 16):
    """W (C,) time_decay (the decay per step is exp(W)), U (C,) time_first, K, V (B, T, C); Y (B, T, C) =
    (sum_{i<t} e^{k_i - (t-1-i) e^w} v_i + e^{u + k_t} v_t) / (the same without v). Grid: (B, channel blocks)."""
    b, j = ts.block_id(0), ts.block_id(1)
    w = ts.RegVec[ts.f32, BC]()
    u = ts.RegVec[ts.f32, BC]()
    ts.load(w, W, at=(j,))
    ts.load(u, U, at=(j,))
    ts.exp(w, w)
    ts.neg(w, w)                                         # log of the per-step decay
    aa = ts.RegVec[ts.f32, BC]()                         # numerator, denominator, both scaled by e^-pp
    bb = ts.RegVec[ts.f32, BC]()
    pp = ts.RegVec[ts.f32, BC]()
    ts.zero(aa)
    ts.zero(bb)
    ts.fill(pp, RWKV_MIN)
    kk = ts.RegVec[ts.f32, BC]()
    vv = ts.RegVec[ts.f32, BC]()
    p = ts.RegVec[ts.f32, BC]()
    e1 = ts.RegVec[ts.f32, BC]()
    e2 = ts.RegVec[ts.f32, BC]()
    y = ts.RegVec[Y.dtype, BC]()
    for t in ts.range(K.shape[1]):
        ts.load(kk, K, at=(b, t, j))
        ts.load(vv, V, at=(b, t, j))
        ww = u + kk
        ts.max(p, pp, ww)
        ts.exp(e1, pp - p)
        ts.exp(e2, ww - p)
        ts.copy(y, (e1 * aa + e2 * vv) / (e1 * bb + e2))
        ts.store(Y, y, at=(b, t, j))
        ww = w + pp
        ts.max(p, ww, kk)
        ts.exp(e1, ww - p)
        ts.exp(e2, kk - p)
        ts.mul(aa, aa, e1)
        ts.add(aa, aa, e2 * vv)
        ts.mul(bb, bb, e1)
        ts.add(bb, bb, e2)
        ts.copy(pp, p)


def rwkv4_ref(w, u, k, v):
    """float64 by the definition: each output a softmax over its weighted log-terms, times v."""
    B, T, C = k.shape
    k, v, decay = k.double(), v.double(), torch.exp(w.double())
    t, i = torch.arange(T)[:, None], torch.arange(T)[None, :]
    logw = k.permute(0, 2, 1)[:, :, None, :] - ((t - 1 - i).double() * decay[:, None, None])   # (B, C, T, T)
    diag = (u.double() + k).permute(0, 2, 1)                                                   # (B, C, T)
    logw = torch.where(i < t, logw, -math.inf)
    logw = torch.where(i == t, diag[..., None].expand_as(logw), logw)
    return (torch.softmax(logw, -1) @ v.permute(0, 2, 1)[..., None])[..., 0].permute(0, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "T", "C"), [(2, 23, 37), (1, 1, 16), (3, 9, 5), (2, 0, 8)])
def test_rwkv4_wkv(backend, dtype, B, T, C, rng):
    """Decays from 0.05 to 2.7 per step, keys of scale 3 with some at +-40 (e^40 overflows f16, and a naive running
    sum of several overflows f32), K and V transposed views of (B, C, T) storage, channels not a multiple of the block,
    one step (y = v), no steps (nothing written)."""
    w = torch.from_numpy(rng.uniform(-3, 1, C)).float()
    u = torch.from_numpy(rng.normal(0, 0.5, C)).float()
    k = randn(rng, B, C, T, dtype=dtype) * 3
    if T > 4:
        k[:, :, 2] = 40
        k[:, :, 4] = -40
    v = randn(rng, B, C, T, dtype=dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    y = poisoned(B, T, C, dtype=dtype)
    launch(rwkv4_wkv, backend, w, u, k, v, y)
    want = rwkv4_ref(w, u, k, v)
    close(y, want, scale=1 if dtype is not torch.float32 else 4)
    if T == 1:
        close(y, v)


# ---- 2. multi-LoRA SGMV -------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda SEG, Y, BN: (SEG.shape[0] - 1, ts.cdiv(Y.shape[1], BN)))
def sgmv_lora(X, SEG, ADAPTER, RANKS, LA, LB, Y, scale: float, *, BM: int = 16, BN: int = 16, BK: int = 16,
              BR: int = 8):
    """Y[t] += scale * X[t] @ LA[a][:, :r] @ LB[a][:r] for the tokens t of segment s (rows SEG[s] to SEG[s + 1] of X
    and Y), a = ADAPTER[s] (-1: none, Y unchanged), r = RANKS[a]. X (T, H), LA (A, H, R), LB (A, R, O), Y (T, O); the
    ranks past r hold anything (NaN) and are never used. Grid: (segments, output column blocks)."""
    s, j = ts.block_id(0), ts.block_id(1)
    start = ts.load_scalar(SEG, s)
    end = ts.load_scalar(SEG, s + 1)
    a = ts.load_scalar(ADAPTER, s)
    r = ts.load_scalar(RANKS, a)                         # 0 for a = -1 (outside RANKS): no rank tile, Y + 0
    x = ts.SharedTile[X.dtype, BM, BK]()
    la = ts.SharedTile[LA.dtype, BK, BR]()
    lb = ts.RegTile[ts.f32, BR, BN]()
    lbs = ts.SharedTile[ts.f32, BR, BN]()
    xa = ts.RegTile[ts.f32, BM, BR]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    yt = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    rk_idx = ts.RegVec[ts.i32, BR]()
    in_rank = ts.RegVec[ts.bool_, BR]()
    rows = ts.RegVec[ts.i32, BM]()
    mine = ts.RegVec[ts.bool_, BM]()
    before_end = ts.RegVec[ts.bool_, BM]()
    m = ts.RegTile[ts.bool_, BM, BN]()
    for i in ts.range(start // BM, ts.cdiv(end, BM)):
        ts.zero(acc)
        for rk in ts.range(ts.cdiv(r, BR)):              # this adapter's rank: the second product's K
            ts.zero(xa)
            for kk in ts.range(ts.cdiv(X.shape[1], BK)):
                ts.load(x, X, at=(i, kk))
                ts.load(la, LA, at=(a, kk, rk))
                ts.mma_AB(xa, x, la, xa)
            ts.arange(rk_idx, rk * BR)
            ts.lt(in_rank, rk_idx, r)
            ts.where(xa, ts.per_col(in_rank), xa, 0.0)   # padded ranks (NaN) out of both operands
            ts.load(lb, LB, at=(a, rk, j))
            ts.where(lb, ts.per_row(in_rank), lb, 0.0)
            ts.copy(lbs, lb)
            ts.mma_AB(acc, xa, lbs, acc)
        ts.load(yt, Y, at=(i, j))
        ts.mul(acc, acc, scale)
        ts.add(acc, acc, yt)
        ts.copy(out, acc)
        ts.arange(rows, i * BM)
        ts.ge(mine, rows, start)
        ts.lt(before_end, rows, end)
        ts.logical_and(mine, mine, before_end)
        ts.fill(m, 1)
        ts.logical_and(m, m, ts.per_row(mine))
        ts.store(Y, out, at=(i, j), mask=m)              # the tile's other rows belong to other segments


def sgmv_ref(y, x, seg, adapter, ranks, la, lb, scale):
    out = y.double().clone()
    for s in range(len(adapter)):
        a = int(adapter[s])
        if a < 0:
            continue
        r, st, en = int(ranks[a]), int(seg[s]), int(seg[s + 1])
        out[st:en] += scale * (x[st:en].double() @ la[a, :, :r].double() @ lb[a, :r].double())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("lens", "adapters", "ranks", "H", "O"), [
    ((5, 0, 19, 1, 12, 7), (2, 0, -1, 1, 2, 3), (8, 3, 16, 0), 40, 24),
    ((16, 16), (0, 0), (16,), 16, 16),
    ((3,), (-1,), (4,), 8, 5),
    ((0, 0), (1, 0), (5, 2), 8, 8),
])
def test_sgmv_lora(backend, dtype, lens, adapters, ranks, H, O, rng):
    """Segments of lengths 0 to 19 at unaligned offsets (several in one row tile, one across three), an adapter used by
    two segments, one of rank 0, none (-1), ranks not a multiple of the rank block (3, 5) and the widest (16); the
    ranks past each adapter's filled with NaN (any read of them would show); LA a transposed view of (A, R, H) storage;
    Y's values outside the launch's segments (none here) and each segment's rows of other segments left as they were."""
    A, R = len(ranks), max(ranks)
    seg = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=I32)
    T = int(seg[-1])
    x = randn(rng, T, H, dtype=dtype)
    la_store = randn(rng, A, R, H, dtype=dtype) / math.sqrt(H)
    lb = randn(rng, A, R, O, dtype=dtype)
    for a, r in enumerate(ranks):
        la_store[a, r:] = math.nan
        lb[a, r:] = math.nan
    la = la_store.transpose(1, 2)                        # (A, H, R)
    y0 = randn(rng, T, O, dtype=dtype)
    y = y0.clone()
    adapter = torch.tensor(adapters, dtype=I64)
    rk = torch.tensor(ranks, dtype=I32)
    launch(sgmv_lora, backend, x, seg, adapter, rk, la, lb, y, 0.5)
    want = sgmv_ref(y0, x, seg, adapter, rk, la, lb, 0.5)
    close(y, want, scale=4)
    for s, a in enumerate(adapters):
        if a < 0 or ranks[a] == 0:
            st, en = int(seg[s]), int(seg[s + 1])
            assert torch.equal(y[st:en], y0[st:en])      # exactly unchanged


# ---- 3. vLLM's sampling penalties ----------------------------------------------------------------------------------
@ts.kernel(grid=lambda LOGITS, BV: (LOGITS.shape[0], ts.cdiv(LOGITS.shape[1], BV)))
def apply_penalties(LOGITS, PROMPT, OUTPUT, REP, FREQ, PRES, OUT, *, BV: int = 32, BT: int = 16):
    """OUT (B, V) = LOGITS with vLLM's penalties: a token in the prompt or the output (PROMPT (B, P), OUTPUT (B, G),
    padded with V) is divided by REP[b] if positive, else multiplied; then FREQ[b] * its count in the output and
    PRES[b] if it occurs there are subtracted. Grid: (B, vocabulary blocks)."""
    b, j = ts.block_id(0), ts.block_id(1)
    vocab = ts.RegVec[ts.i32, BV]()
    ts.arange(vocab, j * BV)
    seen = ts.RegVec[ts.i32, BV]()
    count = ts.RegVec[ts.i32, BV]()
    ts.zero(seen)
    ts.zero(count)
    pos = ts.RegVec[ts.i32, BT]()
    inside = ts.RegVec[ts.bool_, BT]()
    hit = ts.RegTile[ts.bool_, BT, BV]()
    ones = ts.RegTile[ts.i32, BT, BV]()
    for src, dst in ((PROMPT, seen), (OUTPUT, count)):
        ids = ts.RegVec[src.dtype, BT]()
        for t in ts.range(ts.cdiv(src.shape[1], BT)):
            ts.load(ids, src, at=(b, t))
            ts.arange(pos, t * BT)
            ts.lt(inside, pos, src.shape[1])             # past the history a load reads 0: token 0, not counted
            ts.eq(hit, ts.per_row(ids), ts.per_col(vocab))
            ts.logical_and(hit, hit, ts.per_row(inside))
            ts.where(ones, hit, 1, 0)
            ts.col_sum(dst, ones, dst)
    x = ts.RegVec[ts.f32, BV]()
    ts.load(x, LOGITS, at=(b, j))
    rep = ts.load_scalar(REP, b)
    occurs = ts.RegVec[ts.bool_, BV]()
    ts.gt(occurs, seen + count, 0)
    positive = ts.RegVec[ts.bool_, BV]()
    ts.gt(positive, x, 0.0)
    scaled = ts.RegVec[ts.f32, BV]()
    ts.where(scaled, positive, x / rep, x * rep)
    ts.where(x, occurs, scaled, x)
    cf = ts.RegVec[ts.f32, BV]()
    ts.copy(cf, count)
    ts.sub(x, x, cf * ts.load_scalar(FREQ, b))
    ts.gt(occurs, count, 0)
    ts.where(cf, occurs, ts.load_scalar(PRES, b), 0.0)
    ts.sub(x, x, cf)
    out = ts.RegVec[OUT.dtype, BV]()
    ts.copy(out, x)
    ts.store(OUT, out, at=(b, j))


def penalties_ref(logits, prompt, output, rep, freq, pres):
    B, V = logits.shape
    x = logits.double().clone()
    for b in range(B):
        cnt = torch.bincount(output[b][output[b] < V].long(), minlength=V).double()
        seen = torch.bincount(prompt[b][prompt[b] < V].long(), minlength=V) > 0
        occ = seen | (cnt > 0)
        x[b] = torch.where(occ, torch.where(x[b] > 0, x[b] / float(rep[b]), x[b] * float(rep[b])), x[b])
        x[b] -= float(freq[b]) * cnt + float(pres[b]) * (cnt > 0).double()
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "id_dtype"), [(torch.float32, I64), (BF, I32), (F16, I64)])
@pytest.mark.parametrize(("V", "P", "G"), [(100, 21, 17), (32, 16, 16), (7, 1, 0), (50, 0, 33)])
def test_apply_penalties(backend, dtype, id_dtype, V, P, G, rng):
    """Histories padded with V (ragged lengths; a row with an empty prompt and output), tokens repeated up to many
    times (frequency penalties grow with the count), token 0 absent from row 0 (a read past a history reads 0 and
    must not count it), a repetition penalty of 1 (no change), below 1, and a negative frequency penalty; the vocabulary
    not a multiple of the block; empty prompts (P = 0) and outputs (G = 0)."""
    B = 4
    logits = randn(rng, B, V, dtype=dtype) * 3
    prompt = torch.from_numpy(rng.integers(0, min(V, 12), (B, P))).to(id_dtype)
    output = torch.from_numpy(rng.integers(0, min(V, 12), (B, G))).to(id_dtype)
    for h in (prompt, output):
        if h.shape[1]:
            h[0][h[0] == 0] = 1                          # row 0: token 0 never seen
            h[1, h.shape[1] // 2:] = V                   # row 1: a shorter history, padded
            h[3] = V                                     # row 3: empty
    rep = torch.tensor([1.3, 1.0, 0.7, 2.0])
    freq = torch.tensor([0.5, 0.0, -0.2, 0.1])
    pres = torch.tensor([0.3, 0.2, 0.0, 1.0])
    out = poisoned(B, V, dtype=dtype)
    launch(apply_penalties, backend, logits, prompt, output, rep, freq, pres, out)
    want = penalties_ref(logits, prompt, output, rep, freq, pres)
    close(out, want, scale=4)
    assert torch.equal(out[3], logits[3])
    if V > 1:
        assert out[0, 0] == logits[0, 0]


# ---- 4. packbits / unpackbits --------------------------------------------------------------------------------------
def _byte_groups(t, BW, transposed):
    """t[c, w] = 1.0 where column c of a (., 8 BW) bit tile is in byte w (or its transpose): sums 8 columns into one."""
    c = ts.RegVec[ts.i32, 8 * BW]()
    ts.arange(c)
    ts.div(c, c, 8)
    w = ts.RegVec[ts.i32, BW]()
    ts.arange(w)
    same = ts.RegTile[ts.bool_, *t.shape]()
    if transposed:
        ts.eq(same, ts.per_row(w), ts.per_col(c))
    else:
        ts.eq(same, ts.per_row(c), ts.per_col(w))
    g = ts.RegTile[ts.f32, *t.shape]()
    ts.where(g, same, 1.0, 0.0)
    ts.copy(t, g)


def _bit_weights(BW, big):
    """(8 BW,) f32: 2 ** (bit of each column in its byte), 2 ** (c % 8), or 2 ** (7 - c % 8) for big-endian order."""
    k = ts.RegVec[ts.i32, 8 * BW]()
    ts.arange(k)
    ts.rem(k, k, 8)
    kf = ts.RegVec[ts.f32, 8 * BW]()
    ts.copy(kf, k)
    if big:
        ts.neg(kf, kf)
        ts.add(kf, kf, 7.0)
    ts.exp2(kf, kf)
    return kf


@ts.kernel(grid=lambda P, BM, BW: (ts.cdiv(P.shape[0], BM), ts.cdiv(P.shape[1], BW)))
def packbits(M, P, *, BIG: bool = False, BM: int = 16, BW: int = 4):
    """P (R, cdiv(C, 8)) u8 = np.packbits(M (R, C) bool, axis=1, bitorder='big' if BIG else 'little'). Grid: (row
    blocks, byte blocks)."""
    i, w = ts.block_id(0), ts.block_id(1)
    bits = ts.RegTile[ts.bool_, BM, 8 * BW]()
    ts.load(bits, M, at=(i, w))                          # columns past C read False: the last byte's padding
    val = ts.RegTile[ts.f32, BM, 8 * BW]()
    ts.where(val, bits, ts.per_col(_bit_weights(BW, BIG)), 0.0)
    groups = ts.SharedTile[ts.f32, 8 * BW, BW]()
    _byte_groups(groups, BW, transposed=False)
    acc = ts.RegTile[ts.f32, BM, BW]()
    ts.zero(acc)
    ts.mma_AB(acc, val, groups, acc)                     # exact: sums of distinct powers of two below 256
    out = ts.RegTile[ts.u8, BM, BW]()
    ts.copy(out, acc)
    ts.store(P, out, at=(i, w))


@ts.kernel(grid=lambda M, BM, BW: (ts.cdiv(M.shape[0], BM), ts.cdiv(M.shape[1], 8 * BW)))
def unpackbits(P, M, *, BIG: bool = False, BM: int = 16, BW: int = 4):
    """M (R, C) bool = np.unpackbits(P (R, NB) u8, axis=1, count=C, bitorder=...), C <= 8 NB. Grid: (row blocks,
    blocks of 8 BW columns)."""
    i, w = ts.block_id(0), ts.block_id(1)
    byt = ts.RegTile[ts.f32, BM, BW]()
    ts.load(byt, P, at=(i, w))
    spread = ts.SharedTile[ts.f32, BW, 8 * BW]()
    _byte_groups(spread, BW, transposed=True)
    each = ts.RegTile[ts.f32, BM, 8 * BW]()
    ts.zero(each)
    ts.mma_AB(each, byt, spread, each)                   # each column its byte's value
    n = ts.RegTile[ts.i32, BM, 8 * BW]()
    ts.copy(n, each)
    weight = ts.RegVec[ts.i32, 8 * BW]()
    ts.copy(weight, _bit_weights(BW, BIG))
    ts.div(n, n, ts.per_col(weight))
    ts.bit_and(n, n, 1)
    bits = ts.RegTile[ts.bool_, BM, 8 * BW]()
    ts.ne(bits, n, 0)
    ts.store(M, bits, at=(i, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize(("R", "C"), [(19, 45), (16, 32), (1, 1), (5, 0), (0, 9), (3, 77)])
def test_packbits_roundtrip(backend, big, R, C, rng):
    """Against np.packbits / np.unpackbits(count=C): widths not a multiple of 8 (the last byte's high or low bits 0),
    rows not a multiple of the block, an all-ones row (bytes of 255) and an all-zeros row, one bit, no columns (no
    bytes), no rows; the mask a column slice of a wider one (strided rows)."""
    wide = torch.from_numpy(rng.integers(0, 2, (R, C + 3))).bool()
    m = wide[:, 2:2 + C]
    if R > 2 and C:
        m[0], m[1] = True, False
    order = "big" if big else "little"
    NB = -(-C // 8)
    p = poisoned(R, NB, dtype=torch.uint8, value=77)
    launch(packbits, backend, m, p, BIG=big)
    want = np.packbits(m.numpy(), axis=1, bitorder=order)
    assert np.array_equal(p.numpy(), want.reshape(R, NB)), (p, want)
    if R > 2 and C >= 8:
        assert (p[0, :C // 8] == 255).all() and (p[1] == 0).all()
    back = poisoned(R, C, dtype=torch.bool, value=True)
    if R > 1 and C > 1:
        back[1, 0] = False                               # both values poisoned somewhere
    launch(unpackbits, backend, p, back, BIG=big)
    assert torch.equal(back, m)
    rnd = torch.from_numpy(rng.integers(0, 256, (R, NB))).to(torch.uint8)
    bits = poisoned(R, C, dtype=torch.bool, value=True)
    launch(unpackbits, backend, rnd, bits, BIG=big)
    want_bits = np.unpackbits(rnd.numpy(), axis=1, count=C, bitorder=order).astype(bool)
    assert np.array_equal(bits.numpy(), want_bits.reshape(R, C))


# ---- 5. graph-attention edge softmax over CSR segments -------------------------------------------------------------
@ts.kernel(grid=lambda PTR, S, BH: (PTR.shape[0] - 1, ts.cdiv(S.shape[1], BH)))
def segment_softmax(S, PTR, OUT, *, BE: int = 16, BH: int = 8):
    """OUT (E, H) = the softmax over each destination node's edges (rows PTR[n] to PTR[n + 1] of S (E, H)), per head;
    a node with no edges writes nothing. Grid: (nodes, head blocks)."""
    n, h = ts.block_id(0), ts.block_id(1)
    start = ts.load_scalar(PTR, n)
    end = ts.load_scalar(PTR, n + 1)
    rows = ts.RegVec[ts.i32, BE]()
    keep = ts.RegVec[ts.bool_, BE]()
    below = ts.RegVec[ts.bool_, BE]()
    s = ts.RegTile[ts.f32, BE, BH]()
    m = ts.RegVec[ts.f32, BH]()
    m_new = ts.RegVec[ts.f32, BH]()
    total = ts.RegVec[ts.f32, BH]()
    ts.neg_infty(m)
    ts.zero(total)

    def edge_tile(i):
        ts.load(s, S, at=(i, h))
        ts.arange(rows, i * BE)
        ts.ge(keep, rows, start)
        ts.lt(below, rows, end)
        ts.logical_and(keep, keep, below)
        ts.where(s, ts.per_row(keep), s, -math.inf)      # the neighbours' edges in this tile

    for i in ts.range(start // BE, ts.cdiv(end, BE)):
        edge_tile(i)
        ts.col_max(m_new, s, m)
        alpha = ts.RegVec[ts.f32, BH]()
        ts.exp(alpha, m - m_new)
        ts.mul(total, total, alpha)
        ts.sub(s, s, ts.per_col(m_new))
        ts.exp(s, s)
        ts.col_sum(total, s, total)
        ts.copy(m, m_new)
    out = ts.RegTile[OUT.dtype, BE, BH]()
    mask = ts.RegTile[ts.bool_, BE, BH]()
    for i in ts.range(start // BE, ts.cdiv(end, BE)):
        edge_tile(i)
        ts.sub(s, s, ts.per_col(m))
        ts.exp(s, s)
        ts.div(s, s, ts.per_col(total))
        ts.copy(out, s)
        ts.fill(mask, 1)
        ts.logical_and(mask, mask, ts.per_row(keep))
        ts.store(OUT, out, at=(i, h), mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("degrees", "H"), [((3, 0, 40, 1, 0, 7, 16, 2), 8), ((1,), 3), ((16, 16), 4),
                                            ((0, 5, 0), 12)])
def test_segment_softmax(backend, dtype, degrees, H, rng):
    """Degrees 0 to 40 (a node without edges, one with one edge: probability exactly 1, one across three tiles, several
    in one tile), heads not a multiple of the block (3, 12), scores of scale 30 (e^30 overflows f16, and a sum without
    the maximum subtracted overflows f32 at the largest); the edges' rows of other nodes and the rows of empty nodes
    are never written by the wrong program (E covers every row, so the poison must all be gone)."""
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(degrees)]), dtype=I64)
    E = int(ptr[-1])
    s = randn(rng, E, H, dtype=dtype) * 30
    out = poisoned(E, H, dtype=dtype)
    launch(segment_softmax, backend, s, ptr, out)
    want = torch.zeros(E, H, dtype=F64)
    for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        if b > a:
            want[a:b] = torch.softmax(s[a:b].double(), 0)
    close(out, want)
    for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        if b == a + 1:
            assert (out[a] == 1).all()


# ---- 6. batched LU with partial pivoting ---------------------------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def lu_factor(A, LU, PIV, *, BN: int = 16):
    """LU (B, n, n), PIV (B, n) i32 = torch.linalg.lu_factor(A (B, n, n)), n <= BN: L's multipliers below the
    diagonal, U on and above it, PIV[k] the 1-based row swapped with row k at step k (the first largest |a[r, k]|,
    r >= k, as LAPACK's getrf). Grid: (B,)."""
    b = ts.block_id(0)
    n = A.shape[1]
    dt = A.dtype
    a = ts.RegTile[dt, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    idx = ts.RegVec[ts.i32, BN]()
    ts.arange(idx)
    piv = ts.RegVec[ts.i32, BN]()
    ts.zero(piv)
    t = ts.RegTile[dt, BN, BN]()
    ti = ts.RegTile[ts.i32, BN, BN]()
    tb = ts.RegTile[ts.bool_, BN, BN]()
    is_k = ts.RegVec[ts.bool_, BN]()
    is_p = ts.RegVec[ts.bool_, BN]()
    in_n = ts.RegVec[ts.bool_, BN]()
    cand = ts.RegVec[ts.bool_, BN]()
    v = ts.RegVec[dt, BN]()
    av = ts.RegVec[dt, BN]()
    mx = ts.RegVec[dt, BN]()
    pv = ts.RegVec[ts.i32, BN]()
    row_k = ts.RegVec[dt, BN]()
    row_p = ts.RegVec[dt, BN]()
    d = ts.RegVec[dt, BN]()
    ts.lt(in_n, idx, n)

    def column_k():                                      # v[r] = a[r, k]
        ts.where(t, ts.per_col(is_k), a, 0.0)
        ts.row_sum(v, t)

    def broadcast_cols(dst, vec, reduce):                # dst[r] = reduce over c of vec[c], for every r
        ts.zero(t)
        ts.add(t, t, ts.per_col(vec))
        reduce(dst, t)

    for k in ts.range(n):
        ts.eq(is_k, idx, k)
        column_k()
        ts.ge(cand, idx, k)
        ts.logical_and(cand, cand, in_n)
        ts.abs(av, v)
        ts.where(av, cand, av, -1.0)
        broadcast_cols(mx, av, ts.row_max)
        ts.zero(t)
        ts.add(t, t, ts.per_col(av))
        ts.eq(tb, t, ts.per_row(mx))
        ts.where(ti, tb, ts.per_col(idx), BN)
        ts.row_min(pv, ti)                               # the first row of the largest: every element p
        ts.eq(is_p, idx, pv)
        ts.where(t, ts.per_row(is_k), a, 0.0)
        ts.col_sum(row_k, t)
        ts.where(t, ts.per_row(is_p), a, 0.0)
        ts.col_sum(row_p, t)
        ts.where(a, ts.per_row(is_k), ts.per_col(row_p), a)
        ts.where(a, ts.per_row(is_p), ts.per_col(row_k), a)
        ts.where(piv, is_k, pv + 1, piv)
        ts.where(d, is_k, row_p, 0.0)                    # the pivot a[k, k], broadcast
        broadcast_cols(d, d, ts.row_sum)
        column_k()
        below = ts.RegVec[ts.bool_, BN]()
        ts.gt(below, idx, k)
        ts.logical_and(below, below, in_n)
        ell = ts.RegVec[dt, BN]()
        ts.div(ell, v, d)
        ts.where(ell, below, ell, 0.0)
        ts.fill(tb, 1)
        ts.logical_and(tb, tb, ts.per_row(below))
        ts.logical_and(tb, tb, ts.per_col(is_k))
        ts.where(a, tb, ts.per_row(ell), a)              # the multipliers into column k
        right = ts.RegVec[ts.bool_, BN]()
        ts.gt(right, idx, k)
        ts.where(row_p, right, row_p, 0.0)
        ts.zero(t)
        ts.add(t, t, ts.per_row(ell))
        ts.mul(t, t, ts.per_col(row_p))
        ts.sub(a, a, t)                                  # the trailing update
    out = ts.RegTile[LU.dtype, BN, BN]()
    ts.copy(out, a)
    ts.store(LU, out, at=(b, 0, 0))
    ts.store(PIV, piv, at=(b, 0))


def _pivot_margins(a: torch.Tensor) -> float:
    """The smallest relative gap, over every step of a float64 elimination with partial pivoting, between the largest
    |a[r, k]| and the next: near 0 means the f32 pivots may differ from torch's."""
    a = a.double().clone()
    n, gap = a.shape[0], math.inf
    for k in range(n - 1):
        col = a[k:, k].abs()
        top = col.topk(2).values
        gap = min(gap, float((top[0] - top[1]) / top[0]))
        p = k + int(col.argmax())
        a[[k, p]] = a[[p, k]]
        a[k + 1:, k] /= a[k, k]
        a[k + 1:, k + 1:] -= a[k + 1:, k:k + 1] * a[k, k + 1:]
    return gap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(("B", "n"), [(3, 16), (4, 7), (2, 1), (0, 5)])
def test_lu_factor(backend, dtype, B, n, rng):
    """Against torch.linalg.lu_factor (LAPACK's getrf) in the same dtype: the pivots exactly (matrices whose pivots
    are clear: a relative gap of 1e-3 at every step), LU to the dtype's precision times the growth, and P L U = A in
    float64; a matrix whose first column's largest entry is last (a swap at step 0), a matrix needing no swap (a
    diagonally dominant one: PIV = 1..n), n = 1 and B = 0. The input a transposed view (column-major batches)."""
    a = randn(rng, B, n, n, dtype=dtype).transpose(1, 2)
    if B > 1 and n > 1:
        a[0, -1, 0] = 10.0
        a[1] += 4 * n * torch.eye(n, dtype=dtype)
    for m in a:
        assert n < 2 or _pivot_margins(m) > 1e-3
    lu = poisoned(B, n, n, dtype=dtype)
    piv = poisoned(B, n, dtype=I32, value=-5)
    launch(lu_factor, backend, a, lu, piv)
    want_lu, want_piv = torch.linalg.lu_factor(a)
    assert torch.equal(piv, want_piv), (piv, want_piv)
    if B > 1 and n > 1:
        assert int(piv[0, 0]) == n and piv[1].tolist() == list(range(1, n + 1))
    rt = 1e-12 if dtype is F64 else 1e-5
    torch.testing.assert_close(lu.double(), want_lu.double(), rtol=rt * 10, atol=rt * 10)
    eye = torch.eye(n, dtype=F64)
    for m in range(B):
        low = torch.tril(lu[m].double(), -1) + eye
        up = torch.triu(lu[m].double())
        perm = torch.arange(n)
        for k, p in enumerate(piv[m].tolist()):
            perm[[k, p - 1]] = perm[[p - 1, k]]
        torch.testing.assert_close((low @ up), a[m].double()[perm], rtol=rt * 100, atol=rt * 100)
