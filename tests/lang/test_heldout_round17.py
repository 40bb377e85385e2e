"""Round 17 of held-out kernels (after rounds 2-16): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch or a hand computation, outputs poisoned (NaN, or an impossible
integer) first, seeds fixed (the ``rng`` fixture of this file); each also generates Triton and Gluon source.

Levenshtein edit distance (a program per string pair, the DP row carried by a loop over the first string's runtime
length read with load_scalar; each row's left-to-right dependency solved as a min-plus prefix scan, D[i, j] = j +
min_{k <= j} (t_k - k), by a triangle of compares and a column min; the second string's characters shifted one place
by a one-hot column max; characters as u8, i32 and i64 token ids past 2**31); greedy non-maximum suppression as
torchvision.ops.nms (the IoU matrix from per_row / per_col broadcasts of the box coordinates, a bool vector of removed
boxes carried by a loop over the image's runtime box count, the kept boxes' indices compacted by an exclusive prefix
count and a one-hot row max; zero-area boxes whose 0/0 IoU suppresses nothing, duplicates, thresholds 0 and 1); and
FlexAttention-style block-sparse attention (each query block's key blocks listed, in any order, in a per-(batch, head,
block) table read with load_scalar, a document mask_mod and causality applied inside the listed blocks, query blocks
with no listed block or no visible key giving 0 and a log-sum-exp of -inf). More kernels of this round are in
test_heldout_round17_more.py (an MXFP4 GEMM, CRC-32, deformable attention's sampling, every dtype pair).

What this round found: no kernel gave a wrong answer on either executor. Fixed, kept as its test:
- reference and Triton's interpreter: an f64 value (or an integer past 2**24) written into a bf16 tile went through f32
  and was rounded twice (1 + 2**-8 + 2**-40 became 1.0, 2**24 + 2**16 + 1 became 2**24), where the GPU's
  cvt.rn.bf16.f64 / .s32 rounds once (1 + 2**-7, 2**24 + 2**17); ir.types.round_to rounds from the float64 value and
  the interpreter goes through f32 rounded to odd now (c7ee8c5):
  test_heldout_round17_more.py::test_f64_and_wide_integers_round_once_into_16_bit_floats.
Refused by name, as they should be (tested): Gluon's wgmma with 16 accumulator rows, or with f32 operands; Triton's
tiles that are not powers of two (the reference runs them).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import BackendError

FLOAT_DTYPES = [torch.float32, F16, BF]
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
BIG = 1 << 30                       # larger than any edit distance here: the min-plus scan's "no path"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261700)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. Levenshtein edit distance ------------------------------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def levenshtein(A, LA, B, LB, ROW, DIST, *, BN: int = 32):
    """A (P, NA) and B (P, NB) strings (any integer dtype), LA, LB (P,) their lengths (LA <= NA). ROW (P, NB + 1) i32:
    the DP's last row, D[LA, j] = the edit distance of A[:LA] and B[:j] for every j <= NB (so NB + 1 <= BN); DIST (P,)
    the distance of A[:LA] and B[:LB]. Grid: (P,)."""
    p = ts.block_id(0)
    la = ts.load_scalar(LA, p)
    lb = ts.load_scalar(LB, p)
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(cols)
    left = ts.RegVec[ts.i32, BN]()
    ts.arange(left, -1)
    pick = ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(pick, ts.per_row(cols), ts.per_col(left))     # pick[k, j]: k == j - 1
    braw = ts.RegVec[B.dtype, BN]()
    ts.load(braw, B, at=(p, 0))
    sh = ts.RegTile[B.dtype, BN, BN]()
    ts.where(sh, pick, ts.per_row(braw), 0)
    cb = ts.RegVec[B.dtype, BN]()
    ts.col_sum(cb, sh)                                   # cb[j] = B[j - 1], one term (column 0: 0, unused)
    upto = ts.RegTile[ts.bool_, BN, BN]()
    ts.le(upto, ts.per_row(cols), ts.per_col(cols))     # k <= j
    first = ts.RegVec[ts.bool_, BN]()
    ts.eq(first, cols, 0)
    prev = ts.RegVec[ts.i32, BN]()
    ts.arange(prev)                                      # D[0, j] = j
    for i in ts.range(1, la + 1):
        ai = ts.load_scalar(A, p, i - 1)
        neq = ts.RegVec[ts.bool_, BN]()
        ts.ne(neq, cb, ai)
        cost = ts.RegVec[ts.i32, BN]()
        ts.where(cost, neq, 1, 0)
        t = ts.RegTile[ts.i32, BN, BN]()
        ts.where(t, pick, ts.per_row(prev), BIG)
        diag = ts.RegVec[ts.i32, BN]()
        ts.col_min(diag, t)                              # D[i - 1, j - 1] (BIG at j = 0)
        ts.add(diag, diag, cost)
        best = ts.RegVec[ts.i32, BN]()
        ts.add(best, prev, 1)                            # D[i - 1, j] + 1
        ts.min(best, best, diag)
        ts.where(best, first, i, best)                   # D[i, 0] = i
        ts.sub(best, best, cols)
        ts.where(t, upto, ts.per_row(best), BIG)
        ts.col_min(prev, t)                              # min over k <= j of (t_k - k) ...
        ts.add(prev, prev, cols)                         # ... + j: the insertions along the row
    ts.store(ROW, prev, at=(p, 0))
    last = ts.RegTile[ts.i32, 1, BN]()
    hit = ts.RegTile[ts.bool_, 1, BN]()
    ts.eq(hit, ts.per_col(cols), lb)
    ts.where(last, hit, ts.per_col(prev), -1)
    d = ts.RegVec[ts.i32, 1]()
    ts.row_max(d, last)
    out = ts.RegVec[DIST.dtype, 1]()
    ts.copy(out, d)
    ts.store(DIST, out, at=(p,))


def levenshtein_rows(a: list, b: list) -> list[int]:
    """The textbook DP's last row: D[len(a), j] for j <= len(b)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        nxt = [i]
        for j, cb in enumerate(b, 1):
            nxt.append(min(row[j] + 1, nxt[j - 1] + 1, row[j - 1] + (ca != cb)))
        row = nxt
    return row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("char", "lo", "hi"), [(torch.uint8, 0, 0), (I32, -3, 0), (I64, 0, 2**32)])
@pytest.mark.parametrize(("NA", "NB", "la", "lb"), [(13, 20, (13, 0, 1, 7, 13), (20, 5, 0, 20, 1)),
                                                    (31, 31, (31, 30), (31, 31)), (1, 1, (1, 0), (1, 1))])
def test_levenshtein(backend, char, lo, hi, NA, NB, la, lb, rng):
    """Four-letter alphabets (many matches): u8, negative i32 characters, and i64 token ids c + 2**32 k that agree in
    their low 32 bits (compares narrowed to 32 bits would take them as equal); empty first strings (no trips), empty
    second strings, one-character strings, the widest second string the tile holds (31 + 1 = 32 columns)."""
    P = len(la)
    a, b = (torch.from_numpy(rng.integers(lo, lo + 4, (P, n)) + hi * rng.integers(0, 2, (P, n))).to(char)
            for n in (NA, NB))
    if P > 3:
        b[3, :NA] = a[3]                                 # a prefix of b: distance NB - LA for j = NB
    lat, lbt = torch.tensor(la, dtype=I32), torch.tensor(lb, dtype=I64)
    row = poisoned(P, NB + 1, dtype=I32, value=-9)
    dist = poisoned(P, dtype=I64, value=-9)
    launch(levenshtein, backend, a, lat, b, lbt, row, dist)
    for k in range(P):
        want = levenshtein_rows(a[k, :la[k]].tolist(), b[k].tolist())
        assert row[k].tolist() == want, (k, row[k].tolist(), want)
        assert int(dist[k]) == want[lb[k]], (k, int(dist[k]), want[lb[k]])


# ---- 2. greedy non-maximum suppression ---------------------------------------------------------------------------
def _broadcast_pair(fn, v, BN):
    """A (BN, BN) f32 tile of fn(v[r], v[c])."""
    t = ts.RegTile[ts.f32, BN, BN]()
    ts.zero(t)
    ts.add(t, t, ts.per_row(v))
    fn(t, t, ts.per_col(v))
    return t


@ts.kernel(grid=lambda BOXES: (BOXES.shape[0],))
def nms(BOXES, COUNT, KEEP, ORDER, NKEPT, thr: float, *, BN: int = 32):
    """BOXES (I, N, 4) (x1, y1, x2, y2) per image, sorted by descending score; COUNT (I,) the image's boxes (<= N <=
    BN). As torchvision.ops.nms: box i is kept unless a kept box before it has IoU > thr with it. KEEP (I, N) bool;
    ORDER (I, N) i64 the kept boxes' indices in order, then -1; NKEPT (I,) i32. Grid: (I,)."""
    g = ts.block_id(0)
    n = ts.load_scalar(COUNT, g)
    bx = ts.RegTile[ts.f32, BN, 4]()
    ts.load(bx, BOXES, at=(g, 0, 0))
    four = ts.RegVec[ts.i32, 4]()
    ts.arange(four)
    is_c = ts.RegTile[ts.bool_, BN, 4]()
    one = ts.RegTile[ts.f32, BN, 4]()
    coord = []
    for c in range(4):                                   # column c of the boxes as a vector (a sum of it and zeros)
        ts.eq(is_c, ts.per_col(four), c)
        ts.where(one, is_c, bx, 0.0)
        v = ts.RegVec[ts.f32, BN]()
        ts.row_sum(v, one)
        coord.append(v)
    x1, y1, x2, y2 = coord
    w = ts.RegVec[ts.f32, BN]()
    area = ts.RegVec[ts.f32, BN]()
    ts.sub(w, x2, x1)
    ts.sub(area, y2, y1)
    ts.mul(area, area, w)
    iw = _broadcast_pair(ts.min, x2, BN)
    ts.sub(iw, iw, _broadcast_pair(ts.max, x1, BN))
    ts.relu(iw, iw)
    ih = _broadcast_pair(ts.min, y2, BN)
    ts.sub(ih, ih, _broadcast_pair(ts.max, y1, BN))
    ts.relu(ih, ih)
    inter = iw * ih
    union = _broadcast_pair(ts.add, area, BN)
    ts.sub(union, union, inter)
    iou = inter / union                                  # 0 / 0 between zero-area boxes: NaN, never "over"
    idx = ts.RegVec[ts.i32, BN]()
    ts.arange(idx)
    later = ts.RegTile[ts.bool_, BN, BN]()
    ts.lt(later, ts.per_row(idx), ts.per_col(idx))      # (k, j): k before j
    over = ts.RegTile[ts.bool_, BN, BN]()
    ts.gt(over, iou, thr)
    ts.logical_and(over, over, later)
    over_n = ts.RegTile[ts.i32, BN, BN]()
    ts.where(over_n, over, 1, 0)
    removed = ts.RegVec[ts.bool_, BN]()
    ts.ge(removed, idx, n)                               # boxes past the count: never kept
    for i in ts.range(n):
        alive = ts.RegVec[ts.bool_, BN]()
        ts.eq(alive, idx, i)
        ts.logical_and(alive, alive, ~removed)           # box i, if nothing before it removed it
        row = ts.RegTile[ts.i32, BN, BN]()
        ts.where(row, ts.per_row(alive), over_n, 0)      # box i's row of overlaps, if it is kept
        hits = ts.RegVec[ts.i32, BN]()
        ts.col_max(hits, row)
        gone = ts.RegVec[ts.bool_, BN]()
        ts.gt(gone, hits, 0)
        removed |= gone
    keep = ~removed
    ts.store(KEEP, keep, at=(g, 0))
    keep_n = ts.RegVec[ts.i32, BN]()
    ts.where(keep_n, keep, 1, 0)
    kept = ts.RegTile[ts.i32, BN, BN]()
    ts.where(kept, later, ts.per_row(keep_n), 0)         # kept[k, j] = keep[k] and k < j
    pos = ts.RegVec[ts.i32, BN]()
    ts.col_sum(pos, kept)                                # kept boxes before each box: its place in ORDER
    slot = ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(slot, ts.per_row(idx), ts.per_col(pos))       # (s, j): box j goes to slot s
    ts.logical_and(slot, slot, ts.per_col(keep))
    who = ts.RegTile[ts.i32, BN, BN]()
    ts.where(who, slot, ts.per_col(idx), -1)
    order = ts.RegVec[ts.i32, BN]()
    ts.row_max(order, who)
    out = ts.RegVec[ts.i64, BN]()
    ts.copy(out, order)
    ts.store(ORDER, out, at=(g, 0))
    total = ts.RegTile[ts.i32, 1, BN]()
    ts.where(total, ts.per_col(keep), 1, 0)
    nk = ts.RegVec[ts.i32, 1]()
    ts.row_sum(nk, total)
    ts.store(NKEPT, nk, at=(g,))


def box_iou64(bx: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.box_iou in float64."""
    bx = bx.double()
    area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
    lt = torch.maximum(bx[:, None, :2], bx[None, :, :2])
    rb = torch.minimum(bx[:, None, 2:], bx[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


def nms_ref(bx: torch.Tensor, n: int, thr: float) -> list[int]:
    """torchvision's greedy NMS over the first n boxes (already in score order), in float64."""
    iou = box_iou64(bx[:n])
    removed, kept = [False] * n, []
    for i in range(n):
        if removed[i]:
            continue
        kept.append(i)
        for j in range(i + 1, n):
            removed[j] = removed[j] or bool(iou[i, j] > thr)
    return kept


def _boxes(rng, I, N, dtype):
    """Boxes on a 100 x 100 canvas, sizes 5-40, each image's box 3 a copy of box 0 (IoU 1), boxes 5 and 6 of zero
    area at one point (their IoU 0 / 0), box 7 touching box 0's right edge (IoU exactly 0)."""
    xy = rng.uniform(0, 100, (I, N, 2))
    wh = rng.uniform(5, 40, (I, N, 2))
    bx = torch.from_numpy(np.concatenate([xy, xy + wh], -1))
    if N > 7:
        bx[:, 3] = bx[:, 0]
        bx[:, 5, 2:] = bx[:, 5, :2]
        bx[:, 6] = bx[:, 5]
        bx[:, 7, 0] = bx[:, 0, 2]
        bx[:, 7, 2] = bx[:, 0, 2] + 10
    return bx.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "counts", "thr"), [(30, (30, 0, 1, 17), 0.5), (32, (32, 9), 0.0), (12, (12,), 0.3),
                                                 (1, (1, 0), 0.5), (9, (9,), 1.0)])
def test_nms(backend, dtype, N, counts, thr, rng):
    """Against a float64 greedy NMS of the same (rounded) boxes: images with no boxes (ORDER all -1), one box, a count
    below N (boxes past it neither kept nor suppressing), threshold 0 (any overlap suppresses, touching boxes do not),
    threshold 1 (nothing is over it: every box kept). Each IoU is at least 1e-4 away from the threshold or exactly on
    it from exact arithmetic (0 or 1), so f32 and float64 decide alike."""
    I = len(counts)
    bx = _boxes(rng, I, N, dtype)
    for g, n in enumerate(counts):
        iou = box_iou64(bx[g, :n])
        near = ((iou - thr).abs() < 1e-4) & (iou != 0) & (iou != 1)
        assert not near.any(), "the case must not sit on the threshold"
    cnt = torch.tensor(counts, dtype=I64)
    keep = poisoned(I, N, dtype=torch.bool, value=True)
    order = poisoned(I, N, dtype=I64, value=-7)
    nk = poisoned(I, dtype=I32, value=-7)
    launch(nms, backend, bx, cnt, keep, order, nk, thr)
    for g, n in enumerate(counts):
        want = nms_ref(bx[g], n, thr)
        assert order[g].tolist() == want + [-1] * (N - len(want)), (g, order[g].tolist(), want)
        assert keep[g].nonzero().flatten().tolist() == want, (g, keep[g])
        assert int(nk[g]) == len(want)
        if thr == 1.0:
            assert want == list(range(n))
        if n == N and N > 7 and thr < 1:
            assert 3 not in want                         # box 0's copy


# ---- 3. FlexAttention-style block-sparse attention ---------------------------------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[1], Q.shape[0]))
def block_sparse_attention(Q, K, V, KV_NUM, KV_IDX, DOC, O, LSE, scale: float, *, CAUSAL: bool = True, BM: int = 16,
                           BN: int = 16, D: int = 32):
    """Q, K, V (B, H, N, D); query block i of (b, h) attends to the KV_NUM[b, h, i] key blocks KV_IDX[b, h, i, :num]
    (any order; entries past num are never read), inside them to keys of its own document (DOC (B, N) ids) and, when
    CAUSAL, not after the query (FlexAttention's block mask and mask_mod). O (B, H, N, D) in Q's dtype (0 for a query
    that sees no key), LSE (B, H, N) f32 natural log-sum-exp of the scaled scores (-inf when none). Grid: (query
    blocks, H, B)."""
    i, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    N = K.shape[2]
    nblk = ts.load_scalar(KV_NUM, b, h, i)
    q = ts.SharedTile[Q.dtype, BM, D]()
    ts.load(q, Q, at=(b, h, i, 0))
    qdoc = ts.RegVec[DOC.dtype, BM]()
    ts.load(qdoc, DOC, at=(b, i))
    qpos = ts.RegVec[ts.i32, BM]()
    ts.arange(qpos, i * BM)
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, D]()
    acc = ts.RegTile[ts.f32, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    lsum = ts.RegVec[ts.f32, BM]()
    ts.zero(acc)
    ts.neg_infty(m)
    ts.zero(lsum)
    for t in ts.range(nblk):
        j = ts.load_scalar(KV_IDX, b, h, i, t)
        ts.load(k_s, K, at=(b, h, j, 0))
        ts.load(v_s, V, at=(b, h, j, 0))
        s = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(s)
        ts.mma_ABt(s, q, k_s, s)
        ts.mul(s, s, scale * LOG2E)
        kdoc = ts.RegVec[DOC.dtype, BN]()
        ts.load(kdoc, DOC, at=(b, j))
        kpos = ts.RegVec[ts.i32, BN]()
        ts.arange(kpos, j * BN)
        ok = ts.RegTile[ts.bool_, BM, BN]()
        cond = ts.RegTile[ts.bool_, BM, BN]()
        ts.eq(ok, ts.per_row(qdoc), ts.per_col(kdoc))
        if CAUSAL:
            ts.ge(cond, ts.per_row(qpos), ts.per_col(kpos))
            ts.logical_and(ok, ok, cond)
        ts.lt(cond, ts.per_col(kpos), N)                 # the last block's keys past N (their DOC reads 0)
        ts.logical_and(ok, ok, cond)
        ts.where(s, ok, s, -math.inf)
        m_new = ts.RegVec[ts.f32, BM]()
        ts.row_max(m_new, s, m)
        none = ts.RegVec[ts.bool_, BM]()
        ts.eq(none, m_new, -math.inf)
        m_use = ts.RegVec[ts.f32, BM]()                  # a row with no visible key yet: subtract 0, not -inf
        ts.where(m_use, none, 0.0, m_new)
        alpha = ts.RegVec[ts.f32, BM]()
        ts.sub(alpha, m, m_use)
        ts.exp2(alpha, alpha)
        ts.sub_row(s, s, m_use)
        ts.exp2(s, s)
        ts.mul_row(acc, acc, alpha)
        ts.mul(lsum, lsum, alpha)
        ts.row_sum(lsum, s, lsum)
        p = ts.RegTile[V.dtype, BM, BN]()
        ts.copy(p, s)
        ts.mma_AB(acc, p, v_s, acc)
        ts.copy(m, m_new)
    empty = ts.RegVec[ts.bool_, BM]()
    ts.eq(empty, lsum, 0.0)
    safe = ts.RegVec[ts.f32, BM]()
    ts.where(safe, empty, 1.0, lsum)
    ts.div_row(acc, acc, safe)
    out = ts.RegTile[O.dtype, BM, D]()
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))
    lse = ts.RegVec[ts.f32, BM]()
    ts.log2(lse, safe)
    ts.add(lse, lse, m)
    ts.mul(lse, lse, LN2)
    ts.where(lse, empty, -math.inf, lse)
    ts.store(LSE, lse, at=(b, h, i))


def block_sparse_ref(q, k, v, blocks, doc, scale, causal, BM, BN):
    """float64 dense attention under the mask: (query, key) visible when key's block is listed for query's block,
    both in one document and (causal) key <= query; a query seeing nothing gives 0 and -inf."""
    B, H, N, _ = q.shape
    qi, ki = torch.arange(N)[:, None], torch.arange(N)[None, :]
    o = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((B, H, N), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            allowed = blocks[b, h][qi // BM, ki // BN] & (doc[b][:, None] == doc[b][None, :])
            if causal:
                allowed &= ki <= qi
            s = (q[b, h].double() @ k[b, h].double().T * scale).masked_fill(~allowed, -math.inf)
            seen = allowed.any(1)
            lse[b, h, seen] = torch.logsumexp(s[seen], -1)
            o[b, h, seen] = torch.softmax(s[seen], -1) @ v[b, h].double()
    return o, lse


def _block_tables(rng, B, H, N, BM, BN, density, causal):
    """A random block mask (B, H, query blocks, key blocks) (causal: no block wholly after the diagonal), as
    FlexAttention's kv_num_blocks and kv_indices (each row's blocks shuffled, the rest of the row -5: never read)."""
    nq, nk = -(-N // BM), -(-N // BN)
    blocks = torch.from_numpy(rng.uniform(size=(B, H, nq, nk)) < density)
    if causal:
        blocks &= torch.arange(nk)[None, :] * BN <= torch.arange(nq)[:, None] * BM + BM - 1
    blocks[0, 0, 0] = False                              # a query block with no key block at all
    num = blocks.sum(-1).to(I32)
    idx = torch.full((B, H, nq, nk), -5, dtype=I32)
    for b, h, i in np.ndindex(B, H, nq):
        listed = blocks[b, h, i].nonzero().flatten().numpy()
        idx[b, h, i, :len(listed)] = torch.from_numpy(rng.permutation(listed))
    return blocks, num, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "D", "causal", "density", "doc_dtype"), [(45, 32, True, 0.7, I32),
                                                                        (64, 16, False, 0.5, I64),
                                                                        (16, 32, True, 1.0, I32)])
def test_block_sparse_attention(backend, dtype, N, D, causal, density, doc_dtype, rng):
    """Ragged N (45: the last key block partial), a query block with no listed block, blocks listed out of order,
    documents of lengths 1 to 20 packed (a query whose listed blocks hold none of its document sees nothing: 0 and
    -inf), one block in all (N = 16). Queries at 3x scale: peaky softmaxes."""
    B, H, BM, BN = 2, 2, 16, 16
    q = randn(rng, B, H, N, D, dtype=dtype) * 3
    k, v = randn(rng, B, H, N, D, dtype=dtype), randn(rng, B, H, N, D, dtype=dtype)
    lengths = rng.integers(1, 21, size=(B, N))
    doc = torch.from_numpy(np.stack([np.repeat(np.arange(N), lengths[b])[:N] for b in range(B)])).to(doc_dtype)
    blocks, num, idx = _block_tables(rng, B, H, N, BM, BN, density, causal)
    scale = 1 / math.sqrt(D)
    o, lse = poisoned(B, H, N, D, dtype=dtype), poisoned(B, H, N)
    launch(block_sparse_attention, backend, q, k, v, num, idx, doc, o, lse, scale, CAUSAL=causal, BM=BM, BN=BN, D=D)
    o_ref, lse_ref = block_sparse_ref(q, k, v, blocks, doc, scale, causal, BM, BN)
    close(o, o_ref, scale=4 if dtype is not torch.float32 else 1)   # p rounded to V's dtype before p v
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-4)
    assert torch.isneginf(lse[0, 0, :BM]).all() and (o[0, 0, :BM] == 0).all()


# ---- 4. every kernel of this file generates Triton and Gluon source --------------------------------------------
def _source_cases():
    i32, i64, f32 = (lambda *s, d=d: torch.zeros(*s, dtype=d) for d in (I32, I64, torch.float32))
    bf = lambda *s: torch.zeros(*s, dtype=BF)                                                    # noqa: E731
    return {
        "levenshtein": (levenshtein, (i64(2, 9), i32(2), i64(2, 9), i32(2), i32(2, 10), i64(2)), {}),
        "nms": (nms, (f32(2, 9, 4), i64(2), torch.zeros(2, 9, dtype=torch.bool), i64(2, 9), i32(2), 0.5), {}),
        "block_sparse_attention": (block_sparse_attention, (bf(1, 2, 40, 32), bf(1, 2, 40, 32), bf(1, 2, 40, 32),
                                                            i32(1, 2, 3), i32(1, 2, 3, 3), i32(1, 40),
                                                            bf(1, 2, 40, 32), f32(1, 2, 40), 0.2),
                                   dict(BM=128, BN=64)),
    }


@pytest.mark.parametrize("name", list(_source_cases()))
@pytest.mark.parametrize("target", ["triton", "gluon"])
def test_generates_source(name, target):
    """The generated module parses as Python and holds the kernel's function; the IR's loads from memory become the
    target's loads (Gluon's `gl.load`, or its copy engine for shared tiles)."""
    kernel, args, consts = _source_cases()[name]
    traced = kernel.trace(*args, **consts)
    try:
        src = traced.source(backend=target)
    except BackendError as e:                            # a refusal must name what it does not lower
        pytest.fail(f"{target} refused {name}: {e}")
    compile(src, f"<{target}:{name}>", "exec")
    assert f"def {name}" in src or name in src, src[:400]
    assert ("tl.load" if target == "triton" else "gl.") in src


def test_gluon_names_a_product_of_too_few_rows():
    """Gluon's wgmma takes accumulators of 64-row multiples per warpgroup: the attention at its CPU-test block of 16
    query rows is refused, naming the line, the op and the rows; Triton generates it."""
    kernel, args, _ = _source_cases()["block_sparse_attention"]
    traced = kernel.trace(*args, BM=16, BN=16)
    assert "tl.dot" in traced.source(backend="triton")
    with pytest.raises(BackendError, match=r"test_heldout_round17\.py:\d+: .*mma accumulates 16 rows"):
        traced.source(backend="gluon")
