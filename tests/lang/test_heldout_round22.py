"""Round 22 of held-out kernels (after rounds 2-21): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch, outputs poisoned with NaN first, seeds fixed (the ``rng``
fixture of this file); each is also compiled for sm_90a on this CPU through the Triton and Gluon backends
(test_heldout_round22_hw.py).

Griffin / RecurrentGemma's RG-LRU (the real-gated linear recurrence: a_t = exp(-c softplus(lambda) r_t), h_t = a_t
h_(t-1) + sqrt(1 - a_t^2) (i_t x_t), the gates' sigmoids and the softplus computed in the kernel, one program per
(batch, channel block) walking time a row at a time with the state carried in registers from H0 to HT; f32 / f16 /
bf16 / f64, T = 0 giving HT = H0, lambda of -30 and +30 (a = 1: the state held, the input's weight exactly 0; a = 0:
the state forgotten)); adaptive average pooling (F.adaptive_avg_pool2d, channels-last: each output's window rows
[floor(o H / OH), ceil((o + 1) H / OH)) computed by index arithmetic in the kernel and walked by loops with run-time
bounds, windows that overlap (H not a multiple of OH) and repeat (OH > H), channel blocks past C; every float dtype,
f16 values of 6e4 whose sums overflow f16 but not the f32 work); and xLSTM's mLSTM in its parallel form (a causal,
gated linear attention: D_ij = F_i - F_j + I_j from the cumulated log-sigmoid forget gates F and the input gates I,
stabilized by the row max m_i carried online over key blocks, h_i = sum_j (q_i k_j / sqrt(d)) exp(D_ij - m_i) v_j /
max(|sum_j ...|, exp(-m_i)); gates of +-30, T ragged); and the recurrence's backward, a scan walked in reverse time
by a loop of step -1 (T = 0 and 1, decays of 0 and 1). More kernels of this round are in test_heldout_round22_more.py.

What this round found (test_heldout_round22_hw.py's docstring has the details): no kernel gave a wrong answer on
either executor, nor through Triton on an H100; the Gluon backend aborted in Triton's LLVM lowering on an f8 product
whose B tile is (K, N) (wgmma reads 8-bit operands K-major only), fixed by its kmajor_8bit pass.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32
FLOAT_DTYPES = [F32, F16, BF, F64]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262201)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def work_dtype(dt):
    """The dtype a kernel computes in for elements of ``dt``: f64 for f64, else f32."""
    return ts.f64 if dt is ts.f64 else ts.f32


# ---- 1. Griffin's RG-LRU: a gated linear recurrence with its state carried ------------------------------------------
def _softplus(dst, x, tmp):
    """dst = log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)), without overflow for large x."""
    ts.abs(tmp, x)
    ts.neg(tmp, tmp)
    ts.exp(tmp, tmp)
    ts.add(tmp, tmp, 1.0)
    ts.log(tmp, tmp)
    ts.relu(dst, x)
    ts.add(dst, dst, tmp)


@ts.kernel(grid=lambda X, BD: (X.shape[0], ts.cdiv(X.shape[2], BD)))
def rglru_scan(X, GR, GI, LAM, H0, Y, HT, c: float = 8.0, *, BD: int = 32):
    """Y (B, T, D), HT (B, D) = the RG-LRU over X (B, T, D) from state H0 (B, D), with the recurrence and input gates'
    pre-activations GR, GI (B, T, D) and the per-channel LAM (1, D): a = exp(-c softplus(LAM) sigmoid(GR)),
    h = a h + sqrt(1 - a^2) sigmoid(GI) x, y = h. Grid: (batch, channel blocks)."""
    b, j = ts.block_id(0), ts.block_id(1)
    W = work_dtype(X.dtype)
    lam, tmp = ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD]()
    ts.load(lam, LAM, at=(0, j))
    sp = ts.RegTile[W, 1, BD]()
    _softplus(sp, lam, tmp)
    ts.mul(sp, sp, -c)                                # (1, BD) -c softplus(lambda): log a per unit of r
    h = ts.RegTile[W, 1, BD]()
    ts.load(h, H0, at=(b, j))                         # the carried state
    x, r, g = ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD]()
    la, a = ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD]()
    y = ts.RegTile[Y.dtype, 1, BD]()
    for t in ts.range(X.shape[1]):
        ts.load(x, X, at=(b, t, j))
        ts.load(r, GR, at=(b, t, j))
        ts.load(g, GI, at=(b, t, j))
        ts.sigmoid(r, r)
        ts.sigmoid(g, g)
        ts.mul(la, sp, r)                             # log a
        ts.exp(a, la)
        ts.mul(h, h, a)
        ts.mul(la, la, 2.0)
        ts.exp(la, la)                                # a^2
        ts.neg(la, la)
        ts.add(la, la, 1.0)
        ts.max(la, la, 0.0)
        ts.sqrt(la, la)                               # sqrt(1 - a^2): the input's weight
        ts.mul(x, x, g)
        ts.mul(x, x, la)
        ts.add(h, h, x)
        ts.copy(y, h)
        ts.store(Y, y, at=(b, t, j))
    ts.store(HT, h, at=(b, j))


def rglru_ref(x, gr, gi, lam, h0, c):
    """float64, step by step."""
    x, gr, gi, lam, h = (v.double() for v in (x, gr, gi, lam, h0))
    la = -c * F.softplus(lam) * torch.sigmoid(gr)     # (B, T, D)
    a = la.exp()
    w = (1 - (2 * la).exp()).clamp_min(0).sqrt()
    ys = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + w[:, t] * torch.sigmoid(gi[:, t]) * x[:, t]
        ys.append(h)
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
    return y, h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T", [0, 13])
def test_rglru_scan(backend, dtype, T, rng):
    """B = 2, D = 40 (a ragged channel block of 32); lambda of -30 (a = 1 - tiny: the state held), +30 (a = exp(-8 r):
    near 0 for r ~ 1) and ordinary; T = 0 returns H0 and writes nothing."""
    B, D, c = 2, 40, 8.0
    x, gr, gi = (randn(rng, B, T, D, dtype=dtype) for _ in range(3))
    lam = randn(rng, 1, D, dtype=dtype)
    lam[0, :4], lam[0, 4:8] = -30.0, 30.0
    gr[..., 8:10] = 40.0                              # r = 1
    h0 = randn(rng, B, D, dtype=F64 if dtype is F64 else F32) * 3
    y, ht = poisoned(B, T, D, dtype=dtype), poisoned(B, D, dtype=h0.dtype)
    launch(rglru_scan, backend, x, gr, gi, lam, h0, y, ht, c, BD=32)
    want_y, want_h = rglru_ref(x, gr, gi, lam, h0, c)
    close(y, want_y, scale=4)
    close(ht, want_h, dtype=dtype, scale=4)
    if T == 0:
        torch.testing.assert_close(ht, h0, rtol=0, atol=0)


# ---- 2. adaptive average pooling, channels-last, windows from index arithmetic -------------------------------------
@ts.kernel(grid=lambda Y, BC: (Y.shape[0] * Y.shape[1], Y.shape[2], ts.cdiv(Y.shape[3], BC)))
def adaptive_avg_pool2d(X, Y, *, BC: int = 16):
    """Y (N, OH, OW, C) = F.adaptive_avg_pool2d of X (N, H, W, C) (channels-last views): output (oh, ow) averages
    rows [oh H // OH, ceil((oh + 1) H / OH)) and columns likewise. Grid: (N * OH, OW, channel blocks)."""
    p, ow, cb = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H, W, OH, OW = X.shape[1], X.shape[2], Y.shape[1], Y.shape[2]
    n, oh = p // OH, p % OH
    h0, h1 = oh * H // OH, ts.cdiv((oh + 1) * H, OH)
    w0, w1 = ow * W // OW, ts.cdiv((ow + 1) * W, OW)
    acc = ts.RegTile[work_dtype(X.dtype), 1, BC]()
    x = ts.RegTile[work_dtype(X.dtype), 1, BC]()
    ts.zero(acc)
    for h in ts.range(h0, h1):
        for w in ts.range(w0, w1):
            ts.load(x, X, at=(n, h, w, cb))
            ts.add(acc, acc, x)
    ts.mul(acc, acc, 1.0 / ((h1 - h0) * (w1 - w0)))
    out = ts.RegTile[Y.dtype, 1, BC]()
    ts.copy(out, acc)
    ts.store(Y, out, at=(n, oh, ow, cb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("H", "W", "OH", "OW", "dtype"), [(7, 10, 3, 4, F32), (5, 3, 9, 7, F16), (6, 6, 1, 1, BF),
                                                         (4, 4, 4, 4, F64), (7, 10, 3, 4, F16)])
def test_adaptive_avg_pool2d(backend, dtype, H, W, OH, OW, rng):
    """Overlapping windows (7 -> 3), repeated ones (5 -> 9), the global pool, the identity; C = 20 (a ragged block
    of 16); f16 inputs of 6e4 whose window sums overflow f16 (not the f32 work)."""
    N, C = 2, 20
    x = randn(rng, N, C, H, W, dtype=dtype)
    if dtype is F16:
        x[0, :3] = 6e4
    xl = x.permute(0, 2, 3, 1)                        # (N, H, W, C) channels-last view
    y = poisoned(N, C, OH, OW, dtype=dtype).permute(0, 2, 3, 1)
    launch(adaptive_avg_pool2d, backend, xl, y)
    want = F.adaptive_avg_pool2d(x.double(), (OH, OW)).permute(0, 2, 3, 1)
    close(y, want, scale=max(1.0, want.abs().max().item() / 4))


# ---- 3. xLSTM's mLSTM, parallel form: a causal gated linear attention with a row-max stabilizer ----------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[1], BM), Q.shape[0]))
def mlstm_parallel(Q, K, V, FC, IG, O, eps: float = 1e-6, *, D: int = 16, BM: int = 16):
    """O (BH, T, D) = mLSTM over Q, K, V (BH, T, D) with FC (BH, T) the cumulated log-sigmoid forget gates and IG
    (BH, T) the input gates' pre-activations: D_ij = FC_i - FC_j + IG_j (j <= i), m_i = max_j D_ij, C_ij = (q_i k_j /
    sqrt(D)) exp(D_ij - m_i), o_i = sum_j C_ij v_j / (max(|sum_j C_ij|, exp(-m_i)) + eps). Grid: (query blocks,
    batch x heads); key blocks of BM up to the diagonal, m carried online."""
    i, bh = ts.block_id(0), ts.block_id(1)
    T = Q.shape[1]
    q, k, v = ts.SharedTile[Q.dtype, BM, D](), ts.SharedTile[K.dtype, BM, D](), ts.SharedTile[V.dtype, BM, D]()
    ts.load(q, Q, at=(bh, i, 0))
    fq = ts.RegVec[ts.f32, BM]()
    ts.load(fq, FC, at=(bh, i))                       # (BM,) F of the queries
    m, rs = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    ts.neg_infty(m)
    ts.zero(rs)
    acc = ts.RegTile[ts.f32, BM, D]()
    ts.zero(acc)
    qpos, kpos = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BM]()
    ts.arange(qpos, i * BM)
    fk, ik = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    s, d = ts.RegTile[ts.f32, BM, BM](), ts.RegTile[ts.f32, BM, BM]()
    keep = ts.RegTile[ts.bool_, BM, BM]()
    mb, m_new, alpha = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    c16 = ts.RegTile[V.dtype, BM, BM]()
    for j in ts.range(i + 1):
        ts.load(k, K, at=(bh, j, 0))
        ts.load(v, V, at=(bh, j, 0))
        ts.load(fk, FC, at=(bh, j))
        ts.load(ik, IG, at=(bh, j))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, D ** -0.5)
        ts.zero(d)
        ts.add(d, d, ts.per_row(fq))
        ts.sub(d, d, ts.per_col(fk))
        ts.add(d, d, ts.per_col(ik))                  # F_i - F_j + I_j
        ts.arange(kpos, j * BM)
        ts.ge(keep, ts.per_row(qpos), ts.per_col(kpos))
        ts.where(d, keep, d, -math.inf)
        ts.right_fill(d, d, T - j * BM, -math.inf)    # keys past T
        ts.row_max(mb, d)
        ts.max(m_new, m, mb)
        ts.sub(alpha, m, m_new)
        ts.exp(alpha, alpha)                          # exp(m_old - m_new); 0 on the first block (m_old = -inf)
        ts.sub_row(d, d, m_new)
        ts.exp(d, d)
        ts.mul(s, s, d)                               # C_ij
        ts.mul(rs, rs, alpha)
        ts.row_sum(rs, s, rs)
        ts.mul_row(acc, acc, alpha)
        ts.copy(c16, s)
        ts.mma_AB(acc, c16, v, acc)
        ts.copy(m, m_new)
    den = ts.RegVec[ts.f32, BM]()
    ts.abs(rs, rs)
    ts.neg(den, m)
    ts.exp(den, den)
    ts.max(den, den, rs)
    ts.add(den, den, eps)
    ts.div_row(acc, acc, den)
    out = ts.RegTile[O.dtype, BM, D]()
    ts.copy(out, acc)
    ts.store(O, out, at=(bh, i, 0))


def mlstm_ref(q, k, v, fc, ig, eps):
    """float64, the whole (T, T) matrix per head."""
    q, k, v, fc, ig = (t.double() for t in (q, k, v, fc, ig))
    T, D = q.shape[1], q.shape[2]
    dm = fc[:, :, None] - fc[:, None, :] + ig[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    dm = dm.masked_fill(~causal, -math.inf)
    m = dm.amax(-1, keepdim=True)
    c = (q @ k.transpose(1, 2)) / math.sqrt(D) * (dm - m).exp()
    n = torch.maximum(c.sum(-1, keepdim=True).abs(), (-m).exp())
    return (c @ v) / (n + eps)


def _mlstm_inputs(rng, BH, T, D, dtype, gates="normal"):
    q, k, v = (randn(rng, BH, T, D, dtype=dtype) for _ in range(3))
    f = randn(rng, BH, T, dtype=F64) + 3.0
    ig = randn(rng, BH, T, dtype=F64)
    if gates == "extreme":
        f[0, ::3], ig[0, 1::4] = -30.0, 30.0          # forget everything / write hard
        ig[-1, :] = -30.0                             # inputs weighted exp(-30): the exp(-m) floor decides
    fc = F.logsigmoid(f).cumsum(-1)
    return q, k, v, fc.float(), ig.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "gates", "dtype"), [(37, "normal", F32), (37, "extreme", BF), (1, "normal", F16),
                                                   (16, "extreme", F32), (37, "extreme", F16)])
def test_mlstm_parallel(backend, dtype, T, gates, rng):
    """BH = 3, D = 16, T ragged (37 = 2 blocks and 5) and single; gates of +-30."""
    BH, D = 3, 16
    q, k, v, fc, ig = _mlstm_inputs(rng, BH, T, D, dtype, gates)
    o = poisoned(BH, T, D, dtype=dtype)
    launch(mlstm_parallel, backend, q, k, v, fc, ig, o, 1e-6, D=D, BM=16)
    want = mlstm_ref(q, k, v, fc, ig, 1e-6)
    # C is rounded to V's dtype for the product (as flash attention's P)
    close(o, want, scale=1.0 if dtype is F32 else 2.0 * max(1.0, want.abs().max().item()))


# ---- 4. the recurrence's backward: a scan walked in reverse time (a negative loop step) ----------------------------
@ts.kernel(grid=lambda A, BD: (A.shape[0], ts.cdiv(A.shape[2], BD)))
def linear_recurrence_bwd(A, DY, DHT, DU, DH0, *, BD: int = 32):
    """For h_t = a_t h_(t-1) + u_t (t = 0..T-1, A (B, T, D)) with y_t = h_t: DU (B, T, D) = dL/du_t and DH0 (B, D) =
    dL/dh_(-1) from DY = dL/dy (B, T, D) and DHT = dL/dh_(T-1) (B, D): g_t = dy_t + a_(t+1) g_(t+1), walked from
    t = T - 1 down to 0 (g_(T-1) = dy_(T-1) + DHT). Grid: (batch, channel blocks)."""
    b, j = ts.block_id(0), ts.block_id(1)
    W = work_dtype(A.dtype)
    g, a, dy = ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD](), ts.RegTile[W, 1, BD]()
    ts.load(g, DHT, at=(b, j))
    ts.one(a)                                         # a_T: nothing after the last step
    du = ts.RegTile[DU.dtype, 1, BD]()
    for t in ts.range(A.shape[1] - 1, -1, -1):
        ts.mul(g, g, a)
        ts.load(dy, DY, at=(b, t, j))
        ts.add(g, g, dy)
        ts.copy(du, g)
        ts.store(DU, du, at=(b, t, j))
        ts.load(a, A, at=(b, t, j))
    ts.mul(g, g, a)
    ts.store(DH0, g, at=(b, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "dtype"), [(0, F32), (1, BF), (11, F32), (11, F64), (9, F16)])
def test_linear_recurrence_bwd(backend, T, dtype, rng):
    """Against float64 autograd of the forward recurrence; B = 2, D = 40 (a ragged block); decays in (0, 1), some
    exactly 0 (the gradient cut) and 1; T = 0: DH0 = DHT."""
    B, D = 2, 40
    a = torch.from_numpy(rng.uniform(0, 1, (B, T, D))).to(dtype)
    if T > 2:
        a[:, 2, :5], a[:, 1, 5:10] = 0.0, 1.0
    dy = randn(rng, B, T, D, dtype=dtype)
    dht = randn(rng, B, D, dtype=F64 if dtype is F64 else F32)
    u = torch.zeros(B, T, D, dtype=F64, requires_grad=True)
    h0 = torch.zeros(B, D, dtype=F64, requires_grad=True)
    h, ys = h0, []
    for t in range(T):
        h = a[:, t].double() * h + u[:, t]
        ys.append(h)
    loss = (h * dht.double()).sum() + sum((y * dy[:, t].double()).sum() for t, y in enumerate(ys))
    loss.backward()
    want_du = u.grad if T else torch.zeros(B, T, D, dtype=F64)   # (T = 0: u unused, no gradient made)
    du, dh0 = poisoned(B, T, D, dtype=dtype), poisoned(B, D, dtype=dht.dtype)
    launch(linear_recurrence_bwd, backend, a, dy, dht, du, dh0)
    close(du, want_du, scale=4)
    close(dh0, h0.grad, dtype=dtype, scale=4)
