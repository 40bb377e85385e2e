"""Round 16 of held-out kernels, continued (see test_heldout_round16.py's docstring): Viterbi decoding of an HMM /
linear CRF (a program per sequence, its length read with load_scalar as the loop bound; the (S, S) max-plus step as a
column max of the previous scores broadcast down the transitions, the backpointer as the first row attaining it,
forbidden transitions and impossible emissions -inf; then a second launch walking the backpointers down from the
end, the state a one-element vector carried by a loop counting down, each step a gather by a one-hot row sum);
a multi-tensor LAMB step over one flat buffer holding several tensors at offsets that are not multiples of the tile
(each program's tile masked to its own segment, the moments stored with masks beside a neighbour's elements, the
norms of the weights and of the updates summed per tensor by masked atomic adds, the trust ratios applied in a
second launch; an empty tensor and an all-zero tensor); AlphaFold's triangle multiplicative update, outgoing and
incoming from one kernel given permuted views of channels-last pair tensors (tiles whose inner stride is C), a
pair mask and a sigmoid gate; and an MoE token permutation by a stable counting sort (each expert's count and
offset, each token's slot from the offsets, the tokens of its expert before it in earlier tiles and in its own
tile by a triangle of compares, then the inverse permutation gathered by one-hot row sums).
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
    return np.random.default_rng(20261601)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. Viterbi decoding ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda EM: (EM.shape[0],))
def viterbi_forward(EM, TRANS, START, LENS, BP, SCORE, LAST, *, BS: int = 16):
    """EM (B, T, S) emission scores, TRANS (S, S) transition scores (row: from, column: to), START (S,), LENS (B,) in
    [1, T]. BP (B, T, S) i32: at t in [1, L), the first previous state of the best path into each state; SCORE (B,)
    f32 the best path's score; LAST (B,) i32 its last state (the first best). S <= BS. Grid: (B,)."""
    b = ts.block_id(0)
    S = TRANS.shape[0]
    L = ts.load_scalar(LENS, b)
    tr = ts.RegTile[ts.f32, BS, BS]()
    ts.load(tr, TRANS, at=(0, 0))
    ts.right_fill(tr, tr, S, -math.inf)                  # states past S: never reached, never left
    ts.lower_fill(tr, tr, S, -math.inf)
    state = ts.RegVec[ts.i32, BS]()
    ts.arange(state)
    real = ts.RegVec[ts.bool_, BS]()
    ts.lt(real, state, S)
    delta = ts.RegVec[ts.f32, BS]()
    em = ts.RegVec[ts.f32, BS]()
    ts.load(delta, START, at=(0,))
    ts.load(em, EM, at=(b, 0, 0))
    ts.add(delta, delta, em)
    ts.where(delta, real, delta, -math.inf)
    cand = ts.RegTile[ts.f32, BS, BS]()
    best = ts.RegTile[ts.bool_, BS, BS]()
    frm = ts.RegTile[ts.i32, BS, BS]()
    arg = ts.RegVec[ts.i32, BS]()
    for t in ts.range(1, L):
        ts.add(cand, tr, ts.per_row(delta))              # cand[i, j] = delta[i] + TRANS[i, j]
        ts.col_max(delta, cand)                          # (delta is rewritten: the loop carries it)
        ts.eq(best, cand, ts.per_col(delta))
        ts.where(frm, best, ts.per_row(state), BS)
        ts.col_min(arg, frm)                             # the first i attaining the max
        ts.min(arg, arg, S - 1)                          # (a column of -inf everywhere: -inf == -inf holds at i = 0)
        ts.store(BP, arg, at=(b, t, 0))
        ts.load(em, EM, at=(b, t, 0))
        ts.add(delta, delta, em)
    ts.where(delta, real, delta, -math.inf)
    row = ts.RegTile[ts.f32, 1, BS]()
    ts.zero(row)
    ts.add(row, row, ts.per_col(delta))
    top = ts.RegVec[ts.f32, 1]()
    ts.row_max(top, row)
    ts.store(SCORE, top, at=(b,))
    hit = ts.RegTile[ts.bool_, 1, BS]()
    ts.eq(hit, row, ts.per_row(top))
    idx = ts.RegTile[ts.i32, 1, BS]()
    ts.where(idx, hit, ts.per_col(state), BS)
    first = ts.RegVec[ts.i32, 1]()
    ts.row_min(first, idx)
    ts.store(LAST, first, at=(b,))


@ts.kernel(grid=lambda BP: (BP.shape[0],))
def viterbi_backtrack(BP, LAST, LENS, PATH, *, BS: int = 16):
    """PATH (B, T) i32: the best path's states at t < L, -1 after. Grid: (B,)."""
    b = ts.block_id(0)
    T = BP.shape[1]
    L = ts.load_scalar(LENS, b)
    cur = ts.RegVec[ts.i32, 1]()
    ts.load(cur, LAST, at=(b,))
    ts.store(PATH, cur, at=(b, L - 1))
    cols = ts.RegVec[ts.i32, BS]()
    ts.arange(cols)
    back = ts.RegTile[ts.i32, 1, BS]()
    pick = ts.RegTile[ts.bool_, 1, BS]()
    for t in ts.range(L - 1, 0, -1):
        ts.load(back, BP, at=(b, t, 0))                  # row t of BP, a tile of one row
        ts.eq(pick, ts.per_col(cols), ts.per_row(cur))
        ts.where(back, pick, back, 0)
        ts.row_sum(cur, back)                            # cur = BP[b, t, cur]
        ts.store(PATH, cur, at=(b, t - 1))
    pad = ts.RegVec[ts.i32, 1]()
    ts.fill(pad, -1)
    for t in ts.range(L, T):
        ts.store(PATH, pad, at=(b, t))


def viterbi_ref(em, trans, start, lens):
    """float64 NumPy, ties to the first state (np.argmax)."""
    em, trans, start = em.double().numpy(), trans.double().numpy(), start.double().numpy()
    B, T, S = em.shape
    paths, scores = np.full((B, T), -1), np.zeros(B)
    for b in range(B):
        L = int(lens[b])
        delta, bps = start + em[b, 0], []
        for t in range(1, L):
            cand = delta[:, None] + trans
            bps.append(cand.argmax(0))
            delta = cand.max(0) + em[b, t]
        last = int(delta.argmax())
        scores[b] = delta[last]
        path = [last]
        for bp in reversed(bps):
            path.append(int(bp[path[-1]]))
        paths[b, :L] = path[::-1]
    return torch.from_numpy(paths), torch.from_numpy(scores)


def path_score(em, trans, start, path, L):
    e, tr = em.double(), trans.double()
    s = start.double()[path[0]] + e[0, path[0]]
    for t in range(1, L):
        s = s + tr[path[t - 1], path[t]] + e[t, path[t]]
    return float(s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("len_dtype", [I32, I64])
def test_viterbi_with_ties_and_forbidden_moves(backend, dtype, len_dtype, rng):
    """Scores in quarters (sums exact in f32: ties everywhere, broken to the first state as np.argmax), 5 states in a
    16-wide tile, lengths 23 (all of T), 1 (no step: the start's argmax), 9; transitions from state 4 forbidden (-inf)
    but into it allowed, state 2 impossible at t = 3 (-inf emission), and one sequence all -inf at t = 5 (every path
    impossible: score -inf, the first states). Compared exactly."""
    B, T, S = 4, 23, 5
    em = torch.from_numpy(rng.integers(-8, 8, (B, T, S)) / 4).float()
    trans = torch.from_numpy(rng.integers(-4, 4, (S, S)) / 4).float()
    start = torch.from_numpy(rng.integers(-4, 4, (S,)) / 4).float()
    trans[4, :] = -math.inf
    em[:, 3, 2] = -math.inf
    em[3, 5, :] = -math.inf
    lens = torch.tensor([23, 1, 9, 20], dtype=len_dtype)
    em = em.to(dtype)
    bp, score, last = poisoned(B, T, S, dtype=I32, value=-7), poisoned(B), poisoned(B, dtype=I32, value=-7)
    launch(viterbi_forward, backend, em, trans, start, lens, bp, score, last)
    path = poisoned(B, T, dtype=I32, value=-7)
    launch(viterbi_backtrack, backend, bp, last, lens, path)
    want_path, want_score = viterbi_ref(em, trans, start, lens)
    assert torch.equal(score.double(), want_score), (score, want_score)
    assert torch.equal(path.long(), want_path), (path, want_path)
    assert score[3] == -math.inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("S", "T"), [(16, 30), (11, 17)])
def test_viterbi_random_scores(backend, S, T, rng):
    """Continuous scores (no ties; near-ties may pick another path of the same score within rounding): the path the
    kernel found scores, in float64, the best score to 1e-4."""
    B = 3
    em, trans, start = randn(rng, B, T, S) * 3, randn(rng, S, S), randn(rng, S)
    lens = torch.tensor([T, T - 5, 2], dtype=I32)
    bp, score, last = poisoned(B, T, S, dtype=I32, value=-7), poisoned(B), poisoned(B, dtype=I32, value=-7)
    launch(viterbi_forward, backend, em, trans, start, lens, bp, score, last)
    path = poisoned(B, T, dtype=I32, value=-7)
    launch(viterbi_backtrack, backend, bp, last, lens, path)
    _, want = viterbi_ref(em, trans, start, lens)
    for b in range(B):
        L = int(lens[b])
        assert (path[b, L:] == -1).all() and ((path[b, :L] >= 0) & (path[b, :L] < S)).all()
        assert abs(path_score(em[b], trans, start, path[b].long(), L) - float(want[b])) < 1e-4
        assert abs(float(score[b]) - float(want[b])) < 1e-4


# ---- 2. multi-tensor LAMB over one flat buffer ---------------------------------------------------------------------
@ts.kernel(grid=lambda OFFS, W, BLK: (ts.cdiv(W.shape[1], BLK) + 1, OFFS.shape[0] - 1))
def lamb_moments(W, G, M, V, U, OFFS, WN2, UN2, beta1: float, beta2: float, eps: float, wd: float, bc1: float,
                 bc2: float, *, BLK: int = 16):
    """W, M, V, U (1, N) f32 (flat buffers viewed as one row), G (1, N) the gradients (any float dtype); tensor s holds
    elements [OFFS[s], OFFS[s + 1]). Program (c, s) takes tile start // BLK + c of tensor s, masked to the tensor:
    M, V <- the Adam moments; U = (M / bc1) / (sqrt(V / bc2) + eps) + wd W; WN2[s] += sum W^2, UN2[s] += sum U^2
    (atomically, f32 (S,)). Grid: (tiles + 1, tensors)."""
    c, s = ts.block_id(0), ts.block_id(1)
    start, end = ts.load_scalar(OFFS, s), ts.load_scalar(OFFS, s + 1)
    j = start // BLK + c
    idx = ts.RegVec[ts.i64, BLK]()
    ts.arange(idx, j * BLK)
    mine = ts.RegVec[ts.bool_, BLK]()
    past = ts.RegVec[ts.bool_, BLK]()
    ts.ge(mine, idx, start)
    ts.lt(past, idx, end)
    ts.logical_and(mine, mine, past)
    keep = ts.RegTile[ts.bool_, 1, BLK]()
    ts.fill(keep, True)
    ts.logical_and(keep, keep, ts.per_col(mine))
    w = ts.RegTile[ts.f32, 1, BLK]()
    g = ts.RegTile[ts.f32, 1, BLK]()
    m = ts.RegTile[ts.f32, 1, BLK]()
    v = ts.RegTile[ts.f32, 1, BLK]()
    for t, X in ((w, W), (g, G), (m, M), (v, V)):
        ts.load(t, X, at=(0, j))
    ts.mul(m, m, beta1)
    t1 = ts.RegTile[ts.f32, 1, BLK]()
    ts.mul(t1, g, 1.0 - beta1)
    ts.add(m, m, t1)
    ts.mul(v, v, beta2)
    ts.mul(t1, g, g)
    ts.mul(t1, t1, 1.0 - beta2)
    ts.add(v, v, t1)
    ts.store(M, m, at=(0, j), mask=keep)                 # a neighbour tensor's elements in this tile are not ours
    ts.store(V, v, at=(0, j), mask=keep)
    u = ts.RegTile[ts.f32, 1, BLK]()
    ts.div(t1, v, bc2)
    ts.sqrt(t1, t1)
    ts.add(t1, t1, eps)
    ts.div(u, m, bc1)
    ts.div(u, u, t1)
    ts.mul(t1, w, wd)
    ts.add(u, u, t1)
    ts.store(U, u, at=(0, j), mask=keep)
    sq = ts.RegVec[ts.f32, 1]()
    ts.mul(t1, w, w)
    ts.where(t1, keep, t1, 0.0)
    ts.row_sum(sq, t1)
    ts.atomic_add(WN2, sq, at=(s,))
    ts.mul(t1, u, u)
    ts.where(t1, keep, t1, 0.0)
    ts.row_sum(sq, t1)
    ts.atomic_add(UN2, sq, at=(s,))


@ts.kernel(grid=lambda OFFS, W, BLK: (ts.cdiv(W.shape[1], BLK) + 1, OFFS.shape[0] - 1))
def lamb_apply(W, U, OFFS, WN2, UN2, lr: float, *, BLK: int = 16):
    """W -= lr * trust_s * U, trust_s = ||W_s|| / ||U_s|| (1 where either norm is 0), masked to tensor s."""
    c, s = ts.block_id(0), ts.block_id(1)
    start, end = ts.load_scalar(OFFS, s), ts.load_scalar(OFFS, s + 1)
    j = start // BLK + c
    idx = ts.RegVec[ts.i64, BLK]()
    ts.arange(idx, j * BLK)
    keep = ts.RegTile[ts.bool_, 1, BLK]()
    lo = ts.RegTile[ts.bool_, 1, BLK]()
    ts.ge(keep, ts.per_col(idx), start)
    ts.lt(lo, ts.per_col(idx), end)
    ts.logical_and(keep, keep, lo)
    wn = ts.RegVec[ts.f32, 1]()
    un = ts.RegVec[ts.f32, 1]()
    ts.load(wn, WN2, at=(s,))
    ts.load(un, UN2, at=(s,))
    both = ts.RegVec[ts.bool_, 1]()
    other = ts.RegVec[ts.bool_, 1]()
    ts.gt(both, wn, 0.0)
    ts.gt(other, un, 0.0)
    ts.logical_and(both, both, other)
    ts.where(un, both, un, 1.0)
    ts.div(wn, wn, un)
    ts.sqrt(wn, wn)
    ts.where(wn, both, wn, 1.0)
    ts.mul(wn, wn, -lr)
    w = ts.RegTile[ts.f32, 1, BLK]()
    u = ts.RegTile[ts.f32, 1, BLK]()
    ts.load(w, W, at=(0, j))
    ts.load(u, U, at=(0, j))
    ts.mul(u, u, ts.per_row(wn))
    ts.add(w, w, u)
    ts.store(W, w, at=(0, j), mask=keep)


def lamb_ref(ws, gs, ms, vs, step, lr, b1, b2, eps, wd):
    out = []
    for w, g, m, v in zip(ws, gs, ms, vs, strict=True):
        w, g, m, v = w.double(), g.double(), m.double(), v.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps) + wd * w
        wn, un = w.norm(), u.norm()
        trust = wn / un if wn > 0 and un > 0 else 1.0
        out.append((w - lr * trust * u, m, v))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gdtype", FLOAT_DTYPES)
def test_multi_tensor_lamb(backend, gdtype, rng):
    """Tensors of 37, 0, 1, 100, 16 and 5 elements back to back (none starting on a tile but the first), the fifth all
    zero (trust 1: only the moments move it), the fourth at 1e10 (its squares 1e20, still f32), two steps."""
    sizes = [37, 0, 1, 100, 16, 5]
    offs = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=I64)
    N = int(offs[-1])
    w = randn(rng, 1, N)
    w[0, offs[3]:offs[4]] *= 1e10
    w[0, offs[4]:offs[5]] = 0.0
    m, v = torch.zeros(1, N), torch.zeros(1, N)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.01
    split = lambda x: [x[0, offs[k]:offs[k + 1]] for k in range(len(sizes))]   # noqa: E731
    ws, ms, vs = split(w.clone()), split(m.clone()), split(v.clone())
    for step in (1, 2):
        g = randn(rng, 1, N, dtype=gdtype)
        ref = lamb_ref(ws, split(g), ms, vs, step, lr, b1, b2, eps, wd)
        ws, ms, vs = ([r[k] for r in ref] for k in range(3))
        u, wn2, un2 = poisoned(1, N), torch.zeros(len(sizes)), torch.zeros(len(sizes))
        launch(lamb_moments, backend, w, g, m, v, u, offs, wn2, un2, b1, b2, eps, wd, 1 - b1 ** step, 1 - b2 ** step)
        launch(lamb_apply, backend, w, u, offs, wn2, un2, lr)
        for got, want in ((w, ws), (m, ms), (v, vs)):
            for k, (a, e) in enumerate(zip(split(got), want, strict=True)):
                torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=1e-6, msg=lambda s, k=k: f"tensor {k}: {s}")
    assert not torch.isnan(w).any() and (w[0, offs[4]:offs[5]] != 0).all()


# ---- 3. AlphaFold's triangle multiplicative update -------------------------------------------------------------
@ts.kernel(grid=lambda OUT, BI, BJ: (ts.cdiv(OUT.shape[2], BI), ts.cdiv(OUT.shape[3], BJ),
                                     OUT.shape[0] * OUT.shape[1]))
def triangle_mult(A, B, MA, MB, GATE, OUT, *, BI: int = 16, BJ: int = 16, BK: int = 16):
    """OUT[n, c, i, j] = sigmoid(GATE[n, c, i, j]) sum_k MA[n, i, k] A[n, c, i, k] MB[n, j, k] B[n, c, j, k].
    A, B, GATE, OUT (N, C, L, L): channels-last pair tensors' permuted views ((0, 3, 1, 2); A and B as (0, 3, 2, 1) for
    the incoming edges, their masks transposed); MA, MB (N, L, L) pair masks. Grid: (row blocks, column blocks,
    N * C)."""
    i, j, nc = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    C = A.shape[1]
    n, c = nc // C, nc % C
    a = ts.RegTile[ts.f32, BI, BK]()
    bt = ts.RegTile[ts.f32, BJ, BK]()
    ma = ts.RegTile[ts.f32, BI, BK]()
    mb = ts.RegTile[ts.f32, BJ, BK]()
    a16 = ts.RegTile[A.dtype, BI, BK]()
    b16 = ts.SharedTile[B.dtype, BJ, BK]()              # (wgmma reads its b operand from shared memory)
    acc = ts.RegTile[ts.f32, BI, BJ]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[3], BK)):
        ts.load(a, A, at=(n, c, i, k))
        ts.load(bt, B, at=(n, c, j, k))
        ts.load(ma, MA, at=(n, i, k))
        ts.load(mb, MB, at=(n, j, k))
        ts.mul(a, a, ma)
        ts.mul(bt, bt, mb)
        ts.copy(a16, a)
        ts.copy(b16, bt)
        ts.mma_ABt(acc, a16, b16, acc)
    g = ts.RegTile[ts.f32, BI, BJ]()
    ts.load(g, GATE, at=(n, c, i, j))
    ts.sigmoid(g, g)
    ts.mul(acc, acc, g)
    out = ts.RegTile[OUT.dtype, BI, BJ]()
    ts.copy(out, acc)
    ts.store(OUT, out, at=(n, c, i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
@pytest.mark.parametrize(("L", "C"), [(37, 3), (16, 2)])
def test_triangle_multiplication(backend, dtype, direction, L, C, rng):
    """Channels-last (N, L, L, C) tensors read through permuted views (inner stride C); a residue masked out of the
    pair mask (its rows and columns 0 everywhere but the gate's); gates from -30 (closed) to +30; L = 37 ragged."""
    N = 2
    a, b = randn(rng, N, L, L, C, dtype=dtype), randn(rng, N, L, L, C, dtype=dtype)
    gate = (randn(rng, N, L, L, C) * 10).clamp(-30, 30).to(dtype)
    mask = torch.ones(N, L, L)
    mask[0, 5, :] = 0.0
    mask[0, :, 5] = 0.0
    out = poisoned(N, L, L, C, dtype=dtype)
    perm = (0, 3, 1, 2) if direction == "outgoing" else (0, 3, 2, 1)
    mperm = (0, 1, 2) if direction == "outgoing" else (0, 2, 1)
    launch(triangle_mult, backend, a.permute(perm), b.permute(perm), mask.permute(mperm), mask.permute(mperm),
           gate.permute(0, 3, 1, 2), out.permute(0, 3, 1, 2))
    ad, bd, md = a.double(), b.double(), mask.double()
    if direction == "outgoing":      # sum_k a_ik b_jk
        want = torch.einsum("nikc,njkc->nijc", ad * md[..., None], bd * md[..., None])
    else:                            # sum_k a_ki b_kj
        want = torch.einsum("nkic,nkjc->nijc", ad * md[..., None], bd * md[..., None])
    want = want * torch.sigmoid(gate.double())
    close(out, want, scale=math.sqrt(L))
    if L > 5:
        assert (out[0, 5] == 0).all() and (out[0, :, 5] == 0).all()


# ---- 4. MoE token permutation: a stable counting sort ----------------------------------------------------------
@ts.kernel(grid=lambda IDS: (1,))
def moe_count_sort(IDS, COUNTS, OFFSETS, POS, *, BM: int = 16, BE: int = 16):
    """IDS (M,) expert ids in [0, E); COUNTS (E,) i32 tokens per expert; OFFSETS (E + 1,) i32 their exclusive prefix
    sum (the last M); POS (M,) i64 each token's slot in the expert-sorted order, stable (torch.sort(stable=True)).
    E < BE. One program: two passes over the tokens."""
    M = IDS.shape[0]
    ex = ts.RegVec[ts.i32, BE]()
    ts.arange(ex)
    counts = ts.RegVec[ts.i32, BE]()
    ts.zero(counts)
    ids = ts.RegVec[IDS.dtype, BM]()
    tok = ts.RegVec[ts.i32, BM]()
    valid = ts.RegVec[ts.bool_, BM]()
    hot = ts.RegTile[ts.bool_, BM, BE]()
    one = ts.RegTile[ts.i32, BM, BE]()
    for t in ts.range(ts.cdiv(M, BM)):
        ts.load(ids, IDS, at=(t,))
        ts.arange(tok, t * BM)
        ts.lt(valid, tok, M)                             # ids past M read 0: expert 0's, unless masked
        ts.eq(hot, ts.per_row(ids), ts.per_col(ex))
        ts.logical_and(hot, hot, ts.per_row(valid))
        ts.where(one, hot, 1, 0)
        ts.col_sum(counts, one, counts)
    ts.store(COUNTS, counts, at=(0,))
    before = ts.RegTile[ts.i32, BE, BE]()
    lower = ts.RegTile[ts.bool_, BE, BE]()
    ts.lt(lower, ts.per_col(ex), ts.per_row(ex))
    ts.where(before, lower, ts.per_col(counts), 0)
    offs = ts.RegVec[ts.i32, BE]()
    ts.row_sum(offs, before)                             # offs[e] = sum of counts[e'] for e' < e
    ts.store(OFFSETS, offs, at=(0,))
    seen = ts.RegVec[ts.i32, BE]()                       # tokens of each expert in earlier tiles
    ts.zero(seen)
    same = ts.RegTile[ts.bool_, BM, BM]()
    rank = ts.RegTile[ts.i32, BM, BM]()
    base = ts.RegTile[ts.i32, BM, BE]()
    pos = ts.RegVec[ts.i32, BM]()
    r = ts.RegVec[ts.i32, BM]()
    slot = ts.RegVec[ts.i64, BM]()
    for t in ts.range(ts.cdiv(M, BM)):
        ts.load(ids, IDS, at=(t,))
        ts.arange(tok, t * BM)
        ts.lt(valid, tok, M)
        ts.eq(hot, ts.per_row(ids), ts.per_col(ex))
        ts.logical_and(hot, hot, ts.per_row(valid))
        ts.zero(base)
        ts.add(base, base, ts.per_col(offs))
        ts.add(base, base, ts.per_col(seen))
        ts.where(base, hot, base, 0)
        ts.row_sum(pos, base)                            # offs[id] + seen[id]
        ts.eq(same, ts.per_row(ids), ts.per_col(ids))
        ts.tril(same, same, -1, False)                   # earlier tokens of this tile with the same id
        ts.where(rank, same, 1, 0)
        ts.row_sum(r, rank)
        ts.add(pos, pos, r)
        ts.copy(slot, pos)
        ts.store(POS, slot, at=(t,))
        ts.where(one, hot, 1, 0)
        ts.col_sum(seen, one, seen)


@ts.kernel(grid=lambda POS, BO: (ts.cdiv(POS.shape[0], BO),))
def moe_gather_order(POS, SORTED, *, BO: int = 16, BM: int = 16):
    """SORTED (M,) i32: the token in each slot (the inverse of POS). Grid: (slot blocks,)."""
    o = ts.block_id(0)
    M = POS.shape[0]
    slots = ts.RegVec[ts.i64, BO]()
    ts.arange(slots, o * BO)
    pos = ts.RegVec[ts.i64, BM]()
    tok = ts.RegVec[ts.i32, BM]()
    hit = ts.RegTile[ts.bool_, BO, BM]()
    inside = ts.RegTile[ts.bool_, BO, BM]()
    val = ts.RegTile[ts.i32, BO, BM]()
    acc = ts.RegVec[ts.i32, BO]()
    ts.zero(acc)
    for t in ts.range(ts.cdiv(M, BM)):
        ts.load(pos, POS, at=(t,))
        ts.arange(tok, t * BM)
        ts.eq(hit, ts.per_row(slots), ts.per_col(pos))
        ts.lt(inside, ts.per_col(tok), M)                # positions past M read 0: slot 0's, unless masked
        ts.logical_and(hit, hit, inside)
        ts.where(val, hit, ts.per_col(tok), 0)
        ts.row_sum(acc, val, acc)
    ts.store(SORTED, acc, at=(o,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [I32, I64])
@pytest.mark.parametrize(("M", "E"), [(37, 5), (100, 15), (1, 3), (16, 1)])
def test_moe_token_permutation(backend, id_dtype, M, E, rng):
    """Token counts off the tile (37, 100), of one token and one whole tile; 15 experts in a 16-wide tile (OFFSETS
    fills it); expert 0 left empty in the first case (the padding reads id 0: a missed mask counts it), and one expert
    for all 16 tokens (ranks from the triangle alone)."""
    ids = torch.from_numpy(rng.integers(0, E, M)).to(id_dtype)
    if M == 37:
        ids[ids == 0] = 1
    counts, offsets = poisoned(E, dtype=I32, value=-7), poisoned(E + 1, dtype=I32, value=-7)
    pos, order = poisoned(M, dtype=I64, value=-7), poisoned(M, dtype=I32, value=-7)
    launch(moe_count_sort, backend, ids, counts, offsets, pos)
    launch(moe_gather_order, backend, pos, order)
    want_order = torch.sort(ids, stable=True).indices
    want_counts = torch.bincount(ids.long(), minlength=E)
    assert torch.equal(counts.long(), want_counts)
    assert torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=I64), want_counts.cumsum(0)]))
    assert torch.equal(order.long(), want_order)
    assert torch.equal(pos[want_order], torch.arange(M))
