"""Round 22 of held-out kernels, continued (see test_heldout_round22.py's docstring): NATTEN's 1-D neighborhood
attention (each query attends to the KS keys of a window centred on it and shifted inward at the sequence's ends, not
truncated: start = clamp(i - KS // 2, 0, L - KS), plus a relative-position bias RPB[h, j - i + KS - 1] gathered by a
loop of compares over the 2 KS - 1 offsets; key tiles from the first row's window start to the last row's window
end, so a row may see a whole tile masked and the online softmax must not make NaN of it; KS = 1, KS = L, L ragged);
Liger's fused linear cross-entropy, forward and backward in one kernel (the logits X W^T never stored: an online
log-sum-exp over vocabulary tiles with the target's logit picked by compares, then a second pass making p - onehot,
times Gemma 2's softcap derivative, into dX by a product and dW by atomic adds of g^T X; ignore_index rows, a ragged
vocabulary, logits of +-100 capped at 30, all rows ignored); and a batched GEMM with a bias and a transposed-store
epilogue (C^T written (N, M) tiles at a time into a (B, N, M) view) whose A is a permuted, non-contiguous 3-D view;
f32 / f16 / bf16 / f8e4m3 operands, an empty batch (a grid of 0 programs), f64 refused with a message naming it.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import TraceError

F32 = torch.float32
F8 = torch.float8_e4m3fn


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262202)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. NATTEN 1-D neighborhood attention with relative-position bias ----------------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[1], BM), Q.shape[0]))
def neighborhood_attn1d(Q, K, V, RPB, O, scale: float, *, KS: int = 7, D: int = 16, BM: int = 16, BN: int = 16):
    """O (BH, L, D) = softmax(Q K^T scale + RPB[h, j - i + KS - 1]) V over each query's window of KS keys starting at
    clamp(i - KS // 2, 0, L - KS) (L >= KS); Q, K, V (BH, L, D), RPB (H, 2 KS - 1) f32, head h = bh % H. Grid:
    (query blocks, batch x heads)."""
    i, bh = ts.block_id(0), ts.block_id(1)
    L, HALF = Q.shape[1], KS // 2
    h = bh % RPB.shape[0]
    q = ts.SharedTile[Q.dtype, BM, D]()
    k, v = ts.SharedTile[K.dtype, BN, D](), ts.SharedTile[V.dtype, BN, D]()
    ts.load(q, Q, at=(bh, i, 0))
    rows, ws, we = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BM]()
    ts.arange(rows, i * BM)
    ts.sub(ws, rows, HALF)
    ts.min(ws, ws, L - KS)
    ts.max(ws, ws, 0)                                 # (BM,) each row's window start
    ts.add(we, ws, KS)
    lo = ts.smax(ts.smin(i * BM - HALF, L - KS), 0)
    last = ts.smin(i * BM + BM - 1, L - 1)
    hi = ts.smax(ts.smin(last - HALF, L - KS), 0) + KS
    m, m_use, l, alpha = (ts.RegVec[ts.f32, BM]() for _ in range(4))
    ts.neg_infty(m)
    ts.zero(l)
    acc = ts.RegTile[ts.f32, BM, D]()
    ts.zero(acc)
    cols = ts.RegVec[ts.i32, BN]()
    rel = ts.RegTile[ts.i32, BM, BN]()
    s, bias = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    hit, keep, inside = (ts.RegTile[ts.bool_, BM, BN]() for _ in range(3))
    empty = ts.RegVec[ts.bool_, BM]()
    p = ts.RegTile[V.dtype, BM, BN]()
    for j in ts.range(lo // BN, ts.cdiv(hi, BN)):
        ts.load(k, K, at=(bh, j, 0))
        ts.load(v, V, at=(bh, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.arange(cols, j * BN)
        ts.zero(rel)
        ts.add(rel, rel, ts.per_col(cols))
        ts.sub(rel, rel, ts.per_row(rows))            # j - i
        ts.zero(bias)
        for r in ts.range(2 * KS - 1):
            b = ts.load_scalar(RPB, h, r)
            ts.eq(hit, rel, r - (KS - 1))
            ts.where(bias, hit, b, bias)
        ts.add(s, s, bias)
        ts.ge(keep, ts.per_col(cols), ts.per_row(ws))
        ts.lt(inside, ts.per_col(cols), ts.per_row(we))
        ts.logical_and(keep, keep, inside)
        ts.where(s, keep, s, -math.inf)
        ts.row_max(alpha, s)
        ts.max(alpha, alpha, m)                       # the new max
        ts.eq(empty, alpha, -math.inf)                # rows with nothing seen yet: subtract 0, not -inf
        ts.where(m_use, empty, 0.0, alpha)
        ts.sub(m, m, m_use)
        ts.exp(m, m)                                  # exp(m_old - m_new): the rescale of l and acc
        ts.mul(l, l, m)
        ts.mul_row(acc, acc, m)
        ts.copy(m, alpha)
        ts.sub_row(s, s, m_use)
        ts.exp(s, s)
        ts.row_sum(l, s, l)
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
    ts.div_row(acc, acc, l)
    out = ts.RegTile[O.dtype, BM, D]()
    ts.copy(out, acc)
    ts.store(O, out, at=(bh, i, 0))


def natten_ref(q, k, v, rpb, scale, KS):
    """float64, window by window."""
    q, k, v, rpb = q.double(), k.double(), v.double(), rpb.double()
    BH, L, D = q.shape
    H = rpb.shape[0]
    o = torch.empty_like(q)
    for bh in range(BH):
        for i in range(L):
            s0 = min(max(i - KS // 2, 0), L - KS)
            js = torch.arange(s0, s0 + KS)
            logits = q[bh, i] @ k[bh, js].T * scale + rpb[bh % H, js - i + KS - 1]
            o[bh, i] = torch.softmax(logits, -1) @ v[bh, js]
    return o


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("L", "KS", "dtype"), [(37, 7, F32), (37, 5, BF), (20, 1, F16), (9, 9, F32), (40, 13, F16)])
def test_neighborhood_attn1d(backend, L, KS, dtype, rng):
    """BH = 4 over H = 2 heads of bias, D = 16; windows shifted inward at both ends; KS = 1 (each query its own key),
    KS = L (global attention); KS = 13 over BN = 16 tiles: a row's window may miss the first key tile entirely."""
    BH, H, D = 4, 2, 16
    q, k, v = (randn(rng, BH, L, D, dtype=dtype) for _ in range(3))
    rpb = randn(rng, H, 2 * KS - 1) * 3
    o = poisoned(BH, L, D, dtype=dtype)
    launch(neighborhood_attn1d, backend, q, k, v, rpb, o, D ** -0.5, KS=KS, D=D)
    close(o, natten_ref(q, k, v, rpb, D ** -0.5, KS), scale=2.0)


# ---- 2. fused linear cross-entropy, forward and backward (Liger), with Gemma 2's softcap ----------------------------
def _tanh(dst, src, tmp):
    """dst = tanh(src) = 2 sigmoid(2 src) - 1."""
    ts.mul(tmp, src, 2.0)
    ts.sigmoid(tmp, tmp)
    ts.mul(tmp, tmp, 2.0)
    ts.sub(dst, tmp, 1.0)


def _logits(z, x, w, W, v, CAP, th, tmp):
    """z (BM, BV) = x w^T for vocabulary tile v, capped CAP tanh(z / CAP) when CAP (th keeps the tanh)."""
    ts.load(w, W, at=(v, 0))
    ts.zero(z)
    ts.mma_ABt(z, x, w, z)
    if CAP:
        ts.mul(z, z, 1.0 / CAP)
        _tanh(th, z, tmp)
        ts.mul(z, th, CAP)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def linear_ce(X, W, TGT, LOSS, DX, DW, inv_n: float, *, D: int = 32, BM: int = 16, BV: int = 32, CAP: float = 0.0,
              IGNORE: int = -100):
    """Cross-entropy of logits X W^T (X (N, D), W (V, D)) against TGT (N,) (IGNORE rows give loss 0 and no gradient),
    capped CAP tanh(. / CAP) when CAP > 0: LOSS (N,) f32 per row, DX (N, D) and DW (V, D) f32 (zeroed by the
    caller: atomic adds) the gradients of inv_n times their sum. Grid: (row blocks,)."""
    i = ts.block_id(0)
    V = W.shape[0]
    x = ts.SharedTile[X.dtype, BM, D]()
    w = ts.SharedTile[W.dtype, BV, D]()
    ts.load(x, X, at=(i, 0))
    tg = ts.RegVec[TGT.dtype, BM]()
    ts.load(tg, TGT, at=(i,))
    cols = ts.RegVec[TGT.dtype, BV]()
    z, th, tmp, t = (ts.RegTile[ts.f32, BM, BV]() for _ in range(4))
    hit = ts.RegTile[ts.bool_, BM, BV]()
    m, l, zt, mb = (ts.RegVec[ts.f32, BM]() for _ in range(4))
    ts.neg_infty(m)
    ts.zero(l)
    ts.zero(zt)
    for v in ts.range(ts.cdiv(V, BV)):                # pass 1: the log-sum-exp and the target's logit
        _logits(z, x, w, W, v, CAP, th, tmp)
        ts.arange(cols, v * BV)
        ts.eq(hit, ts.per_col(cols), ts.per_row(tg))
        ts.where(t, hit, z, 0.0)
        ts.row_sum(zt, t, zt)
        ts.right_fill(z, z, V - v * BV, -math.inf)
        ts.row_max(mb, z)
        ts.max(mb, mb, m)
        ts.sub(m, m, mb)
        ts.exp(m, m)
        ts.mul(l, l, m)
        ts.sub_row(z, z, mb)
        ts.exp(z, z)
        ts.row_sum(l, z, l)
        ts.copy(m, mb)
    lse = ts.RegVec[ts.f32, BM]()
    ts.log(lse, l)
    ts.add(lse, lse, m)
    valid = ts.RegVec[ts.bool_, BM]()
    ts.ne(valid, tg, IGNORE)
    loss = ts.RegVec[ts.f32, BM]()
    ts.sub(loss, lse, zt)
    ts.where(loss, valid, loss, 0.0)
    ts.store(LOSS, loss, at=(i,))
    dx = ts.RegTile[ts.f32, BM, D]()
    ts.zero(dx)
    g = ts.RegTile[W.dtype, BM, BV]()
    dw = ts.RegTile[ts.f32, BV, D]()
    for v in ts.range(ts.cdiv(V, BV)):                # pass 2: g = (softmax - onehot) inv_n, into dX and dW
        _logits(z, x, w, W, v, CAP, th, tmp)
        ts.sub_row(z, z, lse)
        ts.exp(z, z)
        ts.arange(cols, v * BV)
        ts.eq(hit, ts.per_col(cols), ts.per_row(tg))
        ts.where(t, hit, 1.0, 0.0)
        ts.sub(z, z, t)
        if CAP:                                       # d(CAP tanh(y / CAP)) / dy = 1 - tanh^2
            ts.mul(th, th, th)
            ts.neg(th, th)
            ts.add(th, th, 1.0)
            ts.mul(z, z, th)
        ts.mul(z, z, inv_n)
        ts.where(z, ts.per_row(valid), z, 0.0)
        ts.copy(g, z)
        ts.mma_AB(dx, g, w, dx)
        ts.zero(dw)
        ts.mma_AtB(dw, g, x, dw)
        ts.atomic_add(DW, dw, at=(v, 0))
    out = ts.RegTile[DX.dtype, BM, D]()
    ts.copy(out, dx)
    ts.store(DX, out, at=(i, 0))


def linear_ce_ref(x, w, tgt, cap, ignore=-100):
    """float64 torch autograd: per-row losses and the gradients of their mean over the rows not ignored."""
    x = x.double().requires_grad_()
    w = w.double().requires_grad_()
    z = x @ w.T
    if cap:
        z = cap * torch.tanh(z / cap)
    loss = torch.nn.functional.cross_entropy(z, tgt.long(), ignore_index=ignore, reduction="none")
    n = max(int((tgt != ignore).sum()), 1)
    (loss.sum() / n).backward()
    return loss.detach(), x.grad, w.grad, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "tdtype", "cap", "case"), [(F32, I64, 0.0, "plain"), (BF, I32, 30.0, "large"),
                                                              (F16, I64, 30.0, "plain"), (F32, I32, 0.0, "ignored")])
def test_linear_ce(backend, dtype, tdtype, cap, case, rng):
    """N = 21 rows (a ragged block), V = 75 (a ragged vocabulary tile), D = 32; targets at 0 and V - 1, some -100;
    "large": logits of +-100 (capped at 30: the softmax saturates); "ignored": every row ignored (loss 0, no
    gradient)."""
    N, V, D = 21, 75, 32
    x, w = randn(rng, N, D, dtype=dtype), (randn(rng, V, D) * 0.3).to(dtype)
    if case == "large":
        x = (x.float() * 10).to(dtype)
    tgt = torch.from_numpy(rng.integers(0, V, N)).to(tdtype)
    tgt[0], tgt[1], tgt[5], tgt[-1] = 0, V - 1, -100, -100
    if case == "ignored":
        tgt[:] = -100
    want_loss, want_dx, want_dw, n = linear_ce_ref(x, w, tgt, cap)
    loss, dx, dw = poisoned(N), poisoned(N, D, dtype=dtype), torch.zeros(V, D)
    launch(linear_ce, backend, x, w, tgt, loss, dx, dw, 1.0 / n, D=D, CAP=cap)
    s = 1.0 if dtype is F32 else 4.0                  # g rounded to the operands' dtype for the products
    close(loss, want_loss, dtype=F32 if dtype is F32 else dtype, scale=s)
    close(dx, want_dx, scale=s / n)
    close(dw, want_dw, dtype=dtype, scale=s / n)
    if case == "ignored":
        assert (loss == 0).all() and (dx == 0).all() and (dw == 0).all()


# ---- 3. batched GEMM + bias with a transposed-store epilogue, A a permuted 3-D view ---------------------------------
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[1], BM), ts.cdiv(B.shape[2], BN), A.shape[0]))
def bmm_bias_t(A, B, BIAS, CT, *, BM: int = 32, BN: int = 32, BK: int = 32):
    """CT (Bt, N, M) = (A[b] @ B[b] + BIAS[:, None])^T for A (Bt, M, K), B (Bt, K, N), BIAS (M,) f32: each (BM, BN)
    accumulator transposed and stored as a (BN, BM) tile. Grid: (row blocks, column blocks, batch)."""
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    a, bt = ts.SharedTile[A.dtype, BM, BK](), ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[2], BK)):
        ts.load(a, A, at=(b, i, k))
        ts.load(bt, B, at=(b, k, j))
        ts.mma_AB(acc, a, bt, acc)
    bias = ts.RegVec[ts.f32, BM]()
    ts.load(bias, BIAS, at=(i,))
    ts.add_row(acc, acc, bias)
    t = ts.RegTile[ts.f32, BN, BM]()
    ts.transpose(t, acc)
    out = ts.RegTile[CT.dtype, BN, BM]()
    ts.copy(out, t)
    ts.store(CT, out, at=(b, j, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "odtype", "Bt"), [(F32, F32, 3), (BF, BF, 2), (F16, F32, 2), (F8, BF, 2),
                                                     (F16, F16, 0)])
def test_bmm_bias_t(backend, dtype, odtype, Bt, rng):
    """M = 45, N = 38, K = 50 (none a multiple of 32); A a (M, Bt, K) tensor permuted to (Bt, M, K); CT stored into a
    transposed view and into a contiguous (Bt, N, M) tensor; Bt = 0 launches no program and writes nothing."""
    M, N, K = 45, 38, 50
    a = randn(rng, M, Bt, K).to(dtype).permute(1, 0, 2)
    b = randn(rng, Bt, K, N).to(dtype)
    bias = randn(rng, M) * 100
    want = (a.double() @ b.double() + bias.double()[:, None]).transpose(1, 2)
    ct = poisoned(Bt, N, M, dtype=odtype)
    launch(bmm_bias_t, backend, a, b, bias, ct)
    close(ct, want, scale=4.0)
    c = poisoned(Bt, M, N, dtype=odtype)
    launch(bmm_bias_t, backend, a, b, bias, c.transpose(1, 2))
    close(c, want.transpose(1, 2), scale=4.0)


def test_bmm_bias_t_refuses_f64_operands_naming_them():
    """Products run on the matrix units in 16-bit, f32 or f8 operands; f64 is refused when traced."""
    a, b = torch.zeros(1, 4, 4, dtype=torch.float64), torch.zeros(1, 4, 4, dtype=torch.float64)
    with pytest.raises(TraceError, match=r"mma_AB.*f64"):
        launch(bmm_bias_t, "reference", a, b, torch.zeros(4), torch.zeros(1, 4, 4))
