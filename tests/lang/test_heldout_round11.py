"""Round 11 of held-out kernels (after test_heldout_kernels.py and rounds 2-10): kernels of kinds no earlier round
wrote, each on the reference executor and Triton's interpreter against float64 torch, outputs poisoned first.

A Lion optimizer step (sign of the interpolated momentum, decoupled weight decay; the parameters a transposed view
updated in place in their own dtype, the f32 momentum beside them); a MoE top-k router (softmax over a ragged number
of experts, the k best by repeated row maxima with ties to the lower expert, weights renormalized or not, tokens per
expert added atomically with rows past the end left out); a cumulative product along rows wider than a tile (one
column at a time, the running product carried across column tiles; zeros, infinities and NaN propagate as torch's);
a distillation loss (KL(teacher || student) at a temperature, online over the vocabulary in one pass, the student's
gradient in a second, ignored rows 0); and GEGLU's backward with the tanh GELU (tanh from sigmoid), its two halves
strided views of one (M, 2H) tensor. More kernels of this round are in test_heldout_round11_more.py,
test_heldout_round11_models.py, test_heldout_round11_segments.py and test_heldout_round11_fp8.py; the language as
outsiders first write it (`**`, `abs()`, fixed grids, Triton's habits and other mistakes named) in
test_heldout_round11_api.py; tiles, names and f64 arguments past what the Triton backend held in
test_heldout_round11_limits.py; most of them compiled for sm_90a in test_heldout_round11_aot.py. (No kernel of this
file found a bug.)

Bugs and gaps this round found, fixed, each kept as its regression test (the files' docstrings say more):
- Triton's interpreter: an e4m3 NaN read from memory was the finite +-480 (test_heldout_round11_fp8.py);
- Triton: a tile of more than 2**20 elements, or a thin product whose broadcast sum is, failed inside Triton; a
  parameter named as the generated source names its own (`X_d0` beside `X`, `tl`, `t1_o0`) failed there or stored
  through the wrong name; under the interpreter an f64 kernel's float argument of -0.0 was +0.0 (round 10's open
  item) (test_heldout_round11_limits.py);
- launch: a sparse or MKL-DNN tensor failed inside torch while the launch key was made;
- language: `t ** e`, `t **= e` and `abs(t)` on tiles were Python TypeErrors; a fixed grid was "not a callable
  object"; a positional parameter annotated bool / ts.f32 / torch.float32 was taken for a tensor; a kernel called in a
  kernel, `@ts.kernel` with no grid, `k[grid](...)`, Triton's spellings, an op's None result, a stored t.T, Python's
  range over a Scalar, a torch dtype in a tile type and None operands said nothing of what to write
  (test_heldout_round11_api.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. a Lion step: p -= lr (sign(b1 m + (1 - b1) g) + wd p); m = b2 m + (1 - b2) g -----------------------------
@ts.kernel(grid=lambda P, BM, BN: (ts.cdiv(P.shape[0], BM), ts.cdiv(P.shape[1], BN)))
def lion_step(P, G, M, lr: float, beta1: float, beta2: float, wd: float, *, BM: int = 16, BN: int = 16):
    """One Lion step on (R, C) tensors: P the parameters in any float dtype and M the f32 momentum, both read and
    written in place; G the gradient. sign(0) is 0, as torch.sign."""
    i, j = ts.block_id(0), ts.block_id(1)
    p = ts.RegTile[ts.f32, BM, BN]()
    g = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegTile[ts.f32, BM, BN]()
    u = ts.RegTile[ts.f32, BM, BN]()
    sgn = ts.RegTile[ts.f32, BM, BN]()
    pos = ts.RegTile[ts.bool_, BM, BN]()
    neg = ts.RegTile[ts.bool_, BM, BN]()
    out = ts.RegTile[P.dtype, BM, BN]()
    ts.load(p, P, at=(i, j))
    ts.load(g, G, at=(i, j))
    ts.load(m, M, at=(i, j))
    ts.mul(u, m, beta1)
    ts.mul(sgn, g, 1.0 - beta1)
    ts.add(u, u, sgn)                                # the interpolation whose sign is the update
    ts.gt(pos, u, 0.0)
    ts.lt(neg, u, 0.0)
    ts.where(sgn, neg, -1.0, 0.0)
    ts.where(sgn, pos, 1.0, sgn)
    ts.mul(p, p, 1.0 - lr * wd)                      # decoupled weight decay first
    ts.mul(sgn, sgn, lr)
    ts.sub(p, p, sgn)
    ts.copy(out, p)
    ts.store(P, out, at=(i, j))
    ts.mul(m, m, beta2)
    ts.mul(g, g, 1.0 - beta2)
    ts.add(m, m, g)
    ts.store(M, m, at=(i, j))


def lion_ref(p, g, m, lr, b1, b2, wd):
    p, g, m = p.double(), g.double(), m.double()
    p = p * (1 - lr * wd)
    p = p - lr * torch.sign(b1 * m + (1 - b1) * g)
    return p, b2 * m + (1 - b2) * g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("R", "C"), [(37, 21), (16, 16), (0, 5)])
def test_lion_step(backend, dtype, R, C, rng):
    """Three steps; the parameters are stored (C, R) and given as their transpose; some gradient entries cancel the
    momentum exactly (sign 0, no update); a zero weight decay on the last step."""
    store = randn(rng, C, R, dtype=dtype)
    p = store.t()
    m = randn(rng, R, C) * 0.1
    for step, wd in enumerate((0.1, 0.01, 0.0)):
        g = randn(rng, R, C, dtype=dtype)
        b1, b2, lr = 0.9, 0.99, 1e-2 * (step + 1)
        if R:
            g[0, :] = 0
            m[0, :] = 0                               # u exactly 0: sign 0
        want_p, want_m = lion_ref(p, g, m, lr, b1, b2, wd)
        launch(lion_step, backend, p, g, m, lr, b1, b2, wd)
        close(p, want_p.to(dtype))
        close(m, want_m.float())


# ---- 2. a MoE top-k router: softmax over E experts, the K best with their weights, tokens per expert -------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def topk_router(X, W, IDX, COUNT, *, K: int = 2, RENORM: bool = True, BM: int = 16, BE: int = 16):
    """X (T, E) router logits, E <= BE; W (T, K) f32 the chosen experts' probabilities (divided by their sum with
    RENORM), IDX (T, K) i32 the experts, best first (ties: the lower expert); COUNT (E,) i32 += tokens routed to
    each expert (rows past T add nothing)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BE]()
    left = ts.RegTile[ts.f32, BM, BE]()
    hit = ts.RegTile[ts.bool_, BM, BE]()
    idx = ts.RegTile[ts.i32, BM, BE]()
    chosen = ts.RegTile[ts.i32, BM, BE]()
    w = ts.RegTile[ts.f32, BM, K]()
    at = ts.RegTile[ts.i32, BM, K]()
    in_slot = ts.RegTile[ts.bool_, BM, K]()
    cols = ts.RegVec[ts.i32, BE]()
    slot = ts.RegVec[ts.i32, K]()
    rows = ts.RegVec[ts.i32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    m = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.i32, BM]()
    count = ts.RegVec[ts.i32, BE]()
    ts.load(x, X, at=(i, 0))
    ts.right_fill(x, x, X.shape[1], -math.inf)       # experts past E
    ts.arange(cols)
    ts.arange(slot)
    ts.arange(rows, i * BM)
    ts.row_max(m, x)
    ts.sub(x, x, ts.per_row(m))
    ts.exp(x, x)
    ts.row_sum(s, x)
    ts.div(x, x, ts.per_row(s))                      # probabilities; 0 past E
    ts.copy(left, x)
    ts.right_fill(left, left, X.shape[1], -1.0)      # (a 0 probability may still be chosen, never a padded expert)
    ts.zero(w)
    ts.zero(at)
    ts.zero(chosen)
    for t in range(K):                               # unrolled when traced
        ts.row_max(m, left)
        ts.eq(hit, left, ts.per_row(m))
        ts.where(idx, hit, ts.per_col(cols), BE)
        ts.row_min(best, idx)
        ts.eq(in_slot, ts.per_col(slot), t)
        ts.where(w, in_slot, ts.per_row(m), w)
        ts.where(at, in_slot, ts.per_row(best), at)
        ts.eq(hit, ts.per_col(cols), ts.per_row(best))
        ts.where(left, hit, -2.0, left)              # taken
        ts.where(chosen, hit, 1, chosen)
    if RENORM:
        ts.row_sum(s, w)
        ts.div(w, w, ts.per_row(s))
    ts.store(W, w, at=(i, 0))
    ts.store(IDX, at, at=(i, 0))
    ts.lt(live, rows, X.shape[0])
    ts.where(chosen, ts.per_row(live), chosen, 0)
    ts.col_sum(count, chosen)
    ts.atomic_add(COUNT, count, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "E", "K", "renorm"), [(37, 8, 2, True), (20, 13, 4, False), (5, 16, 1, True),
                                                     (0, 8, 2, True)])
def test_topk_router(backend, dtype, T, E, K, renorm, rng):
    """Logits with ties (rounded to halves, so softmax probabilities tie exactly) and one row of all equal logits
    (the first K experts, in order)."""
    x = (randn(rng, T, E) * 2).round().div(2).to(dtype)
    if T:
        x[0] = 0.5
    w = poisoned(T, K)
    idx = torch.full((T, K), -7, dtype=I32)
    count = torch.full((E,), 3, dtype=I32)
    launch(topk_router, backend, x, w, idx, count, K=K, RENORM=renorm)
    probs = x.double().softmax(-1)
    order = torch.from_numpy(probs.neg().numpy().argsort(axis=1, kind="stable")[:, :K].copy()).long()
    want_w = probs.gather(1, order)
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(idx.long(), order)
    close(w, want_w.float())
    want_count = 3 + torch.bincount(order.flatten(), minlength=E)
    assert torch.equal(count.long(), want_count)


# ---- 3. a cumulative product along rows wider than a tile --------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_cumprod(X, Y, *, BM: int = 8, BN: int = 16):
    """Y[r, c] = X[r, 0] ... X[r, c] for X, Y (M, N): column by column within a tile, the running product of each
    row carried across the column tiles (a loop over cdiv(N, BN) tiles, each a loop over its BN columns)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    col = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    here = ts.RegTile[ts.bool_, BM, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    run = ts.RegVec[ts.f32, BM]()
    xc = ts.RegVec[ts.f32, BM]()
    ts.arange(cols)
    ts.one(run)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.zero(y)
        for c in ts.range(BN):
            ts.eq(here, ts.per_col(cols), c)
            ts.where(col, here, x, 0.0)
            ts.row_sum(xc, col)                      # column c alone: x + 0 + ... keeps inf and NaN
            ts.mul(run, run, xc)
            ts.where(y, here, ts.per_row(run), y)
        ts.copy(out, y)
        ts.store(Y, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(11, 37), (8, 16), (3, 1), (0, 4), (4, 0)])
def test_row_cumprod(backend, dtype, M, N, rng):
    """Factors in [0.6, 1.6) of either sign; one row meets a zero, one an inf then a zero (NaN from there on), one a
    NaN."""
    x = torch.from_numpy(rng.uniform(0.6, 1.6, (M, N)) * rng.choice([-1, 1], (M, N))).to(dtype)
    if M >= 3 and N >= 6:
        x[0, 4] = 0
        x[1, 2], x[1, 5] = math.inf, 0
        x[2, 3] = math.nan
    y = poisoned(M, N, dtype=dtype)
    launch(row_cumprod, backend, x, y)
    close(y, x.double().cumprod(1).to(dtype))


# ---- 4. a distillation loss: T^2 KL(softmax(t / T) || softmax(s / T)) per row, and its gradient in s --------------
@ts.kernel(grid=lambda S, BM: (ts.cdiv(S.shape[0], BM),))
def distill_kl(S, TE, KEEP, LOSS, DS, temp: float, grad_scale: float, *, BM: int = 8, BV: int = 32):
    """S, TE (N, V) student and teacher logits; KEEP (N,) i32, rows with 0 ignored (loss and gradient 0). With
    a = s / T, b = t / T: LOSS[r] = T^2 (sum_v q_v (b_v - a_v) - lse(b) + lse(a)), q = softmax(b), from one online
    pass (the maxima, the sums of exponentials and sum_v e^(b_v - mb) (b_v - a_v), each rescaled when its maximum
    grows); DS = grad_scale T (softmax(a) - q) in a second pass."""
    i = ts.block_id(0)
    a = ts.RegTile[ts.f32, BM, BV]()
    b = ts.RegTile[ts.f32, BM, BV]()
    e = ts.RegTile[ts.f32, BM, BV]()
    d = ts.RegTile[ts.f32, BM, BV]()
    ds = ts.RegTile[DS.dtype, BM, BV]()
    ma = ts.RegVec[ts.f32, BM]()
    mb = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    la = ts.RegVec[ts.f32, BM]()
    lb = ts.RegVec[ts.f32, BM]()
    cross = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    loss = ts.RegVec[ts.f32, BM]()
    lse = ts.RegVec[ts.f32, BM]()
    keep = ts.RegVec[ts.i32, BM]()
    kept = ts.RegVec[ts.bool_, BM]()
    V = S.shape[1]
    inv_t = 1.0 / temp
    ts.neg_infty(ma)
    ts.neg_infty(mb)
    ts.zero(la)
    ts.zero(lb)
    ts.zero(cross)
    for j in ts.range(ts.cdiv(V, BV)):
        ts.load(a, S, at=(i, j))
        ts.load(b, TE, at=(i, j))
        ts.mul(a, a, inv_t)
        ts.mul(b, b, inv_t)
        ts.sub(d, b, a)
        ts.right_fill(a, a, V - j * BV, -math.inf)
        ts.right_fill(b, b, V - j * BV, -math.inf)
        ts.right_fill(d, d, V - j * BV, 0.0)
        ts.row_max(mn, a, ma)                        # the student's running lse
        ts.sub(alpha, ma, mn)
        ts.exp(alpha, alpha)
        ts.mul(la, la, alpha)
        ts.sub(e, a, ts.per_row(mn))
        ts.exp(e, e)
        ts.row_sum(la, e, la)
        ts.copy(ma, mn)
        ts.row_max(mn, b, mb)                        # the teacher's, and the cross term under its weights
        ts.sub(alpha, mb, mn)
        ts.exp(alpha, alpha)
        ts.mul(lb, lb, alpha)
        ts.mul(cross, cross, alpha)
        ts.sub(e, b, ts.per_row(mn))
        ts.exp(e, e)
        ts.row_sum(lb, e, lb)
        ts.mul(e, e, d)
        ts.row_sum(cross, e, cross)
        ts.copy(mb, mn)
    ts.load(keep, KEEP, at=(i,))
    ts.ne(kept, keep, 0)
    ts.div(loss, cross, lb)
    ts.log(lse, lb)
    ts.sub(loss, loss, lse)
    ts.sub(loss, loss, mb)
    ts.log(lse, la)
    ts.add(loss, loss, lse)
    ts.add(loss, loss, ma)
    ts.mul(loss, loss, temp * temp)
    ts.where(loss, kept, loss, 0.0)
    ts.store(LOSS, loss, at=(i,))
    ts.log(la, la)
    ts.add(ma, ma, la)                               # lse(a), lse(b): the log-normalizers
    ts.log(lb, lb)
    ts.add(mb, mb, lb)
    for j in ts.range(ts.cdiv(V, BV)):
        ts.load(a, S, at=(i, j))
        ts.load(b, TE, at=(i, j))
        ts.mul(a, a, inv_t)
        ts.mul(b, b, inv_t)
        ts.sub(a, a, ts.per_row(ma))
        ts.exp(a, a)
        ts.sub(b, b, ts.per_row(mb))
        ts.exp(b, b)
        ts.sub(a, a, b)
        ts.mul(a, a, grad_scale * temp)
        ts.where(a, ts.per_row(kept), a, 0.0)
        ts.copy(ds, a)
        ts.store(DS, ds, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "V", "temp"), [(11, 77, 2.0), (8, 32, 1.0), (3, 5, 0.5), (0, 9, 1.0)])
def test_distillation_kl(backend, dtype, N, V, temp, rng):
    """Against torch's F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True) * T^2 with autograd for the
    gradient (batchmean: grad_scale 1 / kept rows); logits scaled by 5 so the maxima move between tiles; every other
    row kept, the first row's teacher equal to its student (KL 0)."""
    s = (randn(rng, N, V) * 5).to(dtype)
    t = (randn(rng, N, V) * 5).to(dtype)
    if N:
        t[0] = s[0]
    keep = torch.tensor([(r + 1) % 2 for r in range(N)], dtype=I32)
    kept = keep.bool()
    scale = 1.0 / max(int(kept.sum()), 1)
    loss = poisoned(N)
    ds = poisoned(N, V, dtype=dtype)
    launch(distill_kl, backend, s, t, keep, loss, ds, temp, scale)
    s64 = s.double().requires_grad_()
    rows = F.kl_div(F.log_softmax(s64 / temp, -1), F.log_softmax(t.double() / temp, -1), reduction="none",
                    log_target=True).sum(-1) * temp**2
    rows = torch.where(kept, rows, 0.0)
    (rows.sum() * scale).backward()
    close(loss, rows.detach().float(), scale=10)     # (a difference of lse's of logits up to ~20: f32 rounding)
    close(ds, s64.grad.to(dtype))


# ---- 5. GEGLU's backward: h = gelu_tanh(a) b, with a and b the two halves of one (M, 2H) tensor -----------------
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


@ts.kernel(grid=lambda A, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(A.shape[1], BN)))
def geglu_bwd(A, B, DH, DA, DB, *, BM: int = 16, BN: int = 16):
    """A, B, DA, DB (M, H) views (the halves of x and of dx), DH (M, H): DA = DH b gelu'(a), DB = DH gelu(a), with
    gelu(a) = a (1 + tanh(u)) / 2, u = sqrt(2/pi) (a + 0.044715 a^3), tanh(u) = 2 sigmoid(2u) - 1."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[ts.f32, BM, BN]()
    b = ts.RegTile[ts.f32, BM, BN]()
    dh = ts.RegTile[ts.f32, BM, BN]()
    th = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    du = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[DA.dtype, BM, BN]()
    ts.load(a, A, at=(i, j))
    ts.load(b, B, at=(i, j))
    ts.load(dh, DH, at=(i, j))
    ts.mul(t, a, a)
    ts.mul(du, t, 3.0 * GELU_CUBIC * SQRT_2_OVER_PI)
    ts.add(du, du, SQRT_2_OVER_PI)                   # du/da
    ts.mul(t, t, GELU_CUBIC)
    ts.add(t, t, 1.0)
    ts.mul(t, t, a)
    ts.mul(t, t, 2.0 * SQRT_2_OVER_PI)               # 2u
    ts.sigmoid(th, t)
    ts.mul(th, th, 2.0)
    ts.sub(th, th, 1.0)                              # tanh(u)
    ts.add(t, th, 1.0)
    ts.mul(t, t, a)
    ts.mul(t, t, 0.5)                                # gelu(a)
    ts.mul(t, t, dh)
    ts.copy(out, t)
    ts.store(DB, out, at=(i, j))
    ts.mul(t, th, th)
    ts.neg(t, t)
    ts.add(t, t, 1.0)                                # 1 - tanh^2
    ts.mul(t, t, a)
    ts.mul(t, t, du)
    ts.add(t, t, th)
    ts.add(t, t, 1.0)
    ts.mul(t, t, 0.5)                                # gelu'(a)
    ts.mul(t, t, b)
    ts.mul(t, t, dh)
    ts.copy(out, t)
    ts.store(DA, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "H"), [(19, 21), (16, 32), (1, 3)])
def test_geglu_backward(backend, dtype, M, H, rng):
    """Against autograd of F.gelu(a, approximate="tanh") * b in float64; a reaches +-1e4 and +-30 (tanh saturated:
    gelu'(a) is 1 or 0)."""
    x = (randn(rng, M, 2 * H) * 2).to(dtype)
    x[0, 0], x[-1, H - 1] = 1e4, -1e4
    x[0, 1], x[-1, 0] = 30.0, -30.0
    dh = randn(rng, M, H, dtype=dtype)
    dx = poisoned(M, 2 * H, dtype=dtype)
    launch(geglu_bwd, backend, x[:, :H], x[:, H:], dh, dx[:, :H], dx[:, H:])
    x64 = x.double().requires_grad_()
    a, b = x64.chunk(2, dim=-1)
    (F.gelu(a, approximate="tanh") * b).backward(dh.double())
    close(dx, x64.grad.to(dtype), scale=4)
