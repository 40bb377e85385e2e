"""Round 15's held-out kernels with the explicit-hardware ops, continued (test_heldout_round15.py has the GEMMs):
one ring stage read by several matrix products, warp roles taking turns, roles without matrix products, a B2B GEMM
and a sliding-window attention with a sink token. Checked against float64 torch on the reference executor and under
Triton's interpreter (roles dropped), ragged sizes, poisoned outputs; their Gluon source and sm_90a compiles are in
test_heldout_round15_gluon.py.

- three_readers: A's stage read by three async products in a trip (C = A B, D = A B2 + A B), one waited between
- sync_and_async: A's and B's stages read by an async product and a synchronous one in the same trip
- gemm_three_turns: three consumer warpgroups (a row block each) issue their products in turn (ts.turn)
- scale_shift_colsum: roles doing element-wise work only: consumer0 writes Y = X * S + R, consumer1 sums X's columns
- ffn_b2b: O = relu(A W1) W2, the hidden block in registers between the two products (W1, W2 streamed)
- swa_sink: attention with a sliding window of W keys and key 0 always visible (a sink), two consumers of half the
  query rows each; the sink block in a loop of its own before the window's, one ring threaded through both
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, launch, randn

import tilestack.lang as ts

PRODUCER = dict(warps=4, registers=40)
CONSUMER = dict(warps=8, registers=232)
HALF = dict(warps=4, registers=232)
ROLES = ("consumer0", "consumer1")
TRIO = ("consumer0", "consumer1", "consumer2")
THIRD = dict(warps=4, registers=152)         # three consumers and a producer: 3 x 128 x 152 + 128 x 40 <= 65536
LOG2E = math.log2(math.e)


@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def three_readers(A, B, B2, C, D, *, BM: int = 128, BK: int = 64, BN: int = 64, STAGES: int = 3):
    """C = A @ B, D = A @ B2 + A @ B (N one block): A's stage read by three async products of a trip."""
    i = ts.block_id(0)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    b2_ring = ts.SharedStages[B2.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    b2 = ts.SharedTile[B2.dtype, BK, BN]()
    with ts.partition("consumer", **CONSUMER):
        c = ts.RegTile[ts.f32, BM, BN]()
        d = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(c)
        ts.zero(d)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(a_ring, s, A, at=(i, k))
            ts.async_load(b_ring, s, B, at=(k, 0))
            ts.async_load(b2_ring, s, B2, at=(k, 0))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.wait_load(b2, b2_ring, s)
            ts.mma_AB_async(c, a, b, c)
            ts.mma_wait(c)                   # a's first reader retired: a is read twice more
            ts.mma_AB_async(d, a, b2, d)
            ts.mma_AB_async(d, a, b, d)
            ts.mma_wait(d)
    with ts.partition("consumer", **CONSUMER):
        o = ts.RegTile[C.dtype, BM, BN]()
        ts.copy(o, c)
        ts.store(C, o, at=(i, 0))
        ts.copy(o, d)
        ts.store(D, o, at=(i, 0))


@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def sync_and_async(A, B, B2, C, D, *, BM: int = 128, BK: int = 64, BN: int = 64, STAGES: int = 2):
    """C = A @ B (async, in flight across trips), D = A @ B2 (synchronous): A's stage read by both in a trip."""
    i = ts.block_id(0)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    b2_ring = ts.SharedStages[B2.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    b2 = ts.SharedTile[B2.dtype, BK, BN]()
    with ts.partition("consumer", **CONSUMER):
        c = ts.RegTile[ts.f32, BM, BN]()
        d = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(c)
        ts.zero(d)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(a_ring, s, A, at=(i, k))
            ts.async_load(b_ring, s, B, at=(k, 0))
            ts.async_load(b2_ring, s, B2, at=(k, 0))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.wait_load(b2, b2_ring, s)
            ts.mma_AB_async(c, a, b, c)
            ts.mma_AB(d, a, b2, d)
    with ts.partition("consumer", **CONSUMER):
        ts.mma_wait(c)
        o = ts.RegTile[C.dtype, BM, BN]()
        ts.copy(o, c)
        ts.store(C, o, at=(i, 0))
        ts.copy(o, d)
        ts.store(D, o, at=(i, 0))


@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], 3 * BM), ts.cdiv(B.shape[1], BN)))
def gemm_three_turns(A, B, C, *, BM: int = 64, BN: int = 128, BK: int = 64, STAGES: int = 2):
    """C = A @ B; consumer g owns row block 3i + g of the program's 3 BM x BN tile, the three issue their products
    in turn (ts.turn over three roles); B's stage read by all three."""
    i, j = ts.block_id(0), ts.block_id(1)
    a_ring = [ts.SharedStages[A.dtype, STAGES, BM, BK]() for _ in TRIO]
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = [ts.SharedTile[A.dtype, BM, BK]() for _ in TRIO]
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = []
    for g, role in enumerate(TRIO):
        with ts.partition(role, **THIRD):
            acc.append(ts.RegTile[ts.f32, BM, BN]())
            ts.zero(acc[g])
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(b_ring, s, B, at=(k, j))
            for g in range(3):
                ts.async_load(a_ring[g], s, A, at=(3 * i + g, k))
        for g, role in enumerate(TRIO):
            with ts.partition(role, **THIRD):
                ts.wait_load(a[g], a_ring[g], s)
                ts.wait_load(b, b_ring, s)
                with ts.turn(*TRIO):
                    ts.mma_AB_async(acc[g], a[g], b, acc[g])
                ts.mma_wait(acc[g])
    for g, role in enumerate(TRIO):
        with ts.partition(role, **THIRD):
            c = ts.RegTile[C.dtype, BM, BN]()
            ts.copy(c, acc[g])
            ts.store(C, c, at=(3 * i + g, j))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def scale_shift_colsum(X, S, R, Y, COLSUM, *, BM: int = 64, BN: int = 64, STAGES: int = 3):
    """Y = X * S + R (element-wise, S and R like X) by consumer0; COLSUM[i, :] = the column sums of X's row block i
    by consumer1. Both read X's stage; no matrix products."""
    i = ts.block_id(0)
    x_ring = ts.SharedStages[X.dtype, STAGES, BM, BN]()
    s_ring = ts.SharedStages[S.dtype, STAGES, BM, BN]()
    r_ring = ts.SharedStages[R.dtype, STAGES, BM, BN]()
    x = ts.SharedTile[X.dtype, BM, BN]()
    sc = ts.SharedTile[S.dtype, BM, BN]()
    r = ts.SharedTile[R.dtype, BM, BN]()
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        st = j % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(x_ring, st, X, at=(i, j))
            ts.async_load(s_ring, st, S, at=(i, j))
            ts.async_load(r_ring, st, R, at=(i, j))
        with ts.partition("consumer0", **HALF):
            ts.wait_load(x, x_ring, st)
            ts.wait_load(sc, s_ring, st)
            ts.wait_load(r, r_ring, st)
            y = ts.RegTile[ts.f32, BM, BN]()
            t = ts.RegTile[ts.f32, BM, BN]()
            ts.copy(y, x)
            ts.copy(t, sc)
            ts.mul(y, y, t)
            ts.copy(t, r)
            ts.add(y, y, t)
            out = ts.RegTile[Y.dtype, BM, BN]()
            ts.copy(out, y)
            ts.store(Y, out, at=(i, j))
        with ts.partition("consumer1", **HALF):
            ts.wait_load(x, x_ring, st)
            xs = ts.RegTile[ts.f32, BM, BN]()
            ts.copy(xs, x)
            cs = ts.RegVec[ts.f32, BN]()
            ts.col_sum(cs, xs)
            ts.store(COLSUM, cs, at=(i, j))


@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def ffn_b2b(A, W1, W2, O, *, BM: int = 128, D: int = 64, BH: int = 64, DO: int = 64, STAGES: int = 2):
    """O = relu(A @ W1) @ W2 (A (M, D), W1 (D, H), W2 (H, DO); D and DO one tile wide): the producer streams W1's
    column blocks and W2's row blocks; the hidden block goes from one product's accumulator to the next's operand
    in registers."""
    i = ts.block_id(0)
    w1_ring = ts.SharedStages[W1.dtype, STAGES, D, BH]()
    w2_ring = ts.SharedStages[W2.dtype, STAGES, BH, DO]()
    w1 = ts.SharedTile[W1.dtype, D, BH]()
    w2 = ts.SharedTile[W2.dtype, BH, DO]()
    with ts.partition("consumer", **CONSUMER):
        a = ts.SharedTile[A.dtype, BM, D]()
        ts.load(a, A, at=(i, 0))
        acc = ts.RegTile[ts.f32, BM, DO]()
        ts.zero(acc)
    for j in ts.range(ts.cdiv(W1.shape[1], BH)):
        s = j % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(w1_ring, s, W1, at=(0, j))
            ts.async_load(w2_ring, s, W2, at=(j, 0))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(w1, w1_ring, s)
            h = ts.RegTile[ts.f32, BM, BH]()
            ts.zero(h)
            ts.mma_AB_async(h, a, w1, h)
            ts.mma_wait(h)
            ts.relu(h, h)
            p = ts.RegTile[W2.dtype, BM, BH]()
            ts.copy(p, h)
            ts.wait_load(w2, w2_ring, s)
            ts.mma_AB_async(acc, p, w2, acc)
            ts.mma_wait(acc)
    with ts.partition("consumer", **CONSUMER):
        o = ts.RegTile[O.dtype, BM, DO]()
        ts.copy(o, acc)
        ts.store(O, o, at=(i, 0))


def _swa_trip(j, t, *, q, acc, m, lsum, k_ring, v_ring, k_s, v_s, K, V, b, h, i, Nk, qk_scale, HALF_M: int,
              BN: int, WINDOW: int, STAGES: int):
    """Key block j, the t-th trip of the program (the rings' stage t % STAGES)."""
    st = t % STAGES
    with ts.partition("producer", **PRODUCER):
        ts.async_load(k_ring, st, K, at=(b, h, j, 0))
        ts.async_load(v_ring, st, V, at=(b, h, j, 0))
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            ts.wait_load(k_s, k_ring, st)
            s = ts.RegTile[ts.f32, HALF_M, BN]()
            ts.zero(s)
            ts.mma_ABt_async(s, q[g], k_s, s)
            ts.mma_wait(s)
            rows = ts.RegVec[ts.i32, HALF_M]()
            ts.arange(rows, (2 * i + g) * HALF_M)
            cols = ts.RegVec[ts.i32, BN]()
            ts.arange(cols, j * BN)
            lo = ts.RegVec[ts.i32, HALF_M]()
            ts.sub(lo, rows, WINDOW)
            seen = ts.RegTile[ts.bool_, HALF_M, BN]()
            ts.le(seen, ts.per_col(cols), ts.per_row(rows))          # causal: key <= query
            near = ts.RegTile[ts.bool_, HALF_M, BN]()
            ts.gt(near, ts.per_col(cols), ts.per_row(lo))            # within the window: key > query - W
            ts.logical_and(seen, seen, near)
            sink = ts.RegTile[ts.bool_, HALF_M, BN]()
            ts.eq(sink, ts.per_col(cols), 0)                         # key 0: always seen
            ts.logical_or(seen, seen, sink)
            ts.mul(s, s, qk_scale)
            ts.where(s, seen, s, -math.inf)
            ts.right_fill(s, s, Nk - j * BN, -math.inf)              # keys past the end
            m_new = ts.RegVec[ts.f32, HALF_M]()
            ts.row_max(m_new, s, m[g])
            alpha = ts.RegVec[ts.f32, HALF_M]()
            ts.sub(alpha, m[g], m_new)
            ts.exp2(alpha, alpha)
            ts.sub_row(s, s, m_new)
            ts.exp2(s, s)
            ts.mul_row(acc[g], acc[g], alpha)
            ts.mul(lsum[g], lsum[g], alpha)
            ts.row_sum(lsum[g], s, lsum[g])
            p = ts.RegTile[V.dtype, HALF_M, BN]()
            ts.copy(p, s)
            ts.wait_load(v_s, v_ring, st)
            ts.mma_AB_async(acc[g], p, v_s, acc[g])
            ts.mma_wait(acc[g])
            ts.copy(m[g], m_new)


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def swa_sink(Q, K, V, O, scale: float, *, WINDOW: int, BM: int = 128, BN: int = 64, D: int = 64,
             STAGES: int = 2):
    """O = softmax(Q K^T * scale, masked) V per (batch, head): query r sees keys c with r - WINDOW < c <= r, and key
    0 (the sink) always. Key block 0 first (a loop of one trip), then the window's blocks past it."""
    i, bh = ts.block_id(0), ts.block_id(1)
    H, Nk = Q.shape[1], K.shape[2]
    b, h = bh // H, bh % H
    HALF_M = BM // 2
    k_ring = ts.SharedStages[K.dtype, STAGES, BN, D]()
    v_ring = ts.SharedStages[V.dtype, STAGES, BN, D]()
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, D]()
    q, acc, m, lsum = [], [], [], []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            q.append(ts.SharedTile[Q.dtype, HALF_M, D]())
            ts.load(q[g], Q, at=(b, h, 2 * i + g, 0))
            acc.append(ts.RegTile[ts.f32, HALF_M, D]())
            ts.zero(acc[g])
            m.append(ts.RegVec[ts.f32, HALF_M]())
            ts.neg_infty(m[g])
            lsum.append(ts.RegVec[ts.f32, HALF_M]())
            ts.zero(lsum[g])
    first = ts.smax(i * BM - WINDOW + 1, 0) // BN                   # the first block the window reaches
    start = ts.smax(first, 1)
    stop = ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(Nk, BN))      # past the block's last query: unseen
    tiles = dict(q=q, acc=acc, m=m, lsum=lsum, k_ring=k_ring, v_ring=v_ring, k_s=k_s, v_s=v_s, K=K, V=V, b=b, h=h,
                 i=i, Nk=Nk, qk_scale=scale * LOG2E, HALF_M=HALF_M, BN=BN, WINDOW=WINDOW, STAGES=STAGES)
    for j in ts.range(0, 1):                                        # the sink's block
        _swa_trip(j, j, **tiles)
    for j in ts.range(start, stop):
        _swa_trip(j, 1 + j - start, **tiles)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            ts.div_row(acc[g], acc[g], lsum[g])
            o = ts.RegTile[O.dtype, HALF_M, D]()
            ts.copy(o, acc[g])
            ts.store(O, o, at=(b, h, 2 * i + g, 0))


# ---- meaning ----------------------------------------------------------------------------------------------------
def _close(got, want, tol=1e-4):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def _nan(*shape):
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k"), [(37, 50), (16, 16), (5, 100)])
def test_one_stage_read_by_several_products(backend, m, k):
    rng = np.random.default_rng(m + k)
    a, b, b2 = randn(rng, m, k), randn(rng, k, 16), randn(rng, k, 16)
    ab, ab2 = a.double() @ b.double(), a.double() @ b2.double()
    c, d = _nan(m, 16), _nan(m, 16)
    launch(three_readers, backend, a, b, b2, c, d, BM=16, BK=16, BN=16)
    _close(c, ab)
    _close(d, ab + ab2)
    c, d = _nan(m, 16), _nan(m, 16)
    launch(sync_and_async, backend, a, b, b2, c, d, BM=16, BK=16, BN=16)
    _close(c, ab)
    _close(d, ab2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k", "n"), [(50, 40, 33), (16, 16, 16), (100, 17, 40)])
def test_three_roles_taking_turns(backend, m, k, n):
    rng = np.random.default_rng(m * k)
    a, b = randn(rng, m, k), randn(rng, k, n)
    c = _nan(m, n)
    launch(gemm_three_turns, backend, a, b, c, BM=16, BN=16, BK=16)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "n"), [(37, 70), (16, 16), (90, 5)])
def test_roles_with_element_wise_work_only(backend, m, n):
    rng = np.random.default_rng(m + 3 * n)
    x, s, r = (randn(rng, m, n) for _ in range(3))
    y, colsum = _nan(m, n), _nan(math.ceil(m / 16), n)
    launch(scale_shift_colsum, backend, x, s, r, y, colsum, BM=16, BN=16)
    _close(y, x.double() * s.double() + r.double())
    want = torch.nn.functional.pad(x.double(), (0, 0, 0, -m % 16)).view(-1, 16, n).sum(1)
    _close(colsum, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "hidden"), [(37, 50), (16, 16), (70, 100)])
def test_b2b_ffn_keeps_the_hidden_block_in_registers(backend, m, hidden):
    rng = np.random.default_rng(m + hidden)
    a, w1, w2 = randn(rng, m, 16), randn(rng, 16, hidden), randn(rng, hidden, 16)
    o = _nan(m, 16)
    launch(ffn_b2b, backend, a, w1, w2, o, BM=16, D=16, BH=16, DO=16)
    _close(o, torch.relu(a.double() @ w1.double()) @ w2.double())


def swa_sink64(q, k, v, scale, window):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    r = torch.arange(q.shape[2])[:, None]
    c = torch.arange(k.shape[2])[None, :]
    seen = ((c <= r) & (c > r - window)) | (c == 0)
    return torch.softmax(s.masked_fill(~seen, -math.inf), -1) @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "window"), [(70, 20), (33, 1), (48, 100), (90, 16)])
def test_sliding_window_attention_with_a_sink(backend, n, window):
    rng = np.random.default_rng(n + window)
    q, k, v = (randn(rng, 2, 2, n, 16) for _ in range(3))
    o = torch.full_like(q, float("nan"))
    launch(swa_sink, backend, q, k, v, o, 0.3, WINDOW=window, BM=32, BN=16, D=16)
    _close(o, swa_sink64(q, k, v, 0.3, window), 1e-5)
