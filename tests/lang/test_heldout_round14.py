"""Round 14 of held-out kernels (after rounds 2-13): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch, outputs poisoned (NaN) first, seeds fixed.

DeltaNet's chunked delta rule (S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t, a chunk at a
time by the WY form: the unit lower-triangular (I + tril(diag(beta) K K^T, -1)) inverted in registers by a product
of log2(BT) factors (I + L^(2^j)), the (Dk, Dv) state carried across chunks, an initial and a final state); GroupNorm's
forward and backward over an (N, G, C/G, HW) view (dX from the saved mean and rstd, dgamma / dbeta summed over the
batch by a program per group, no atomics, rows of a group past C/G masked); and a 7-point 3-D heat-equation step over
a zero-padded volume, a program walking the depth axis with the planes above and below carried in registers (two
launches ping-pong; NaN reaches exactly a cell's six neighbours). More kernels of this round are in
test_heldout_round14_more.py (CTC loss, log-domain Sinkhorn, Pearson correlation); the sm_90a compiles in
test_heldout_round14_aot.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261400)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. DeltaNet: the chunked delta rule ---------------------------------------------------------------------------
def _eye(dst, n: int) -> None:
    """dst (n, n) f32 = the identity."""
    r = ts.RegVec[ts.i32, n]()
    diag = ts.RegTile[ts.bool_, n, n]()
    ts.arange(r)
    ts.eq(diag, ts.per_row(r), ts.per_col(r))
    ts.where(dst, diag, 1.0, 0.0)


@ts.kernel(grid=lambda Q, BT: (Q.shape[1], Q.shape[0]))
def delta_rule(Q, K, V, BETA, S0, O, ST, *, BT: int = 16, DK: int = 16, DV: int = 16, PREC: str = "ieee"):
    """Q, K (B, H, T, DK), V (B, H, T, DV), BETA (B, H, T) f32 in [0, 1], S0 (B, H, DK, DV) f32 the state before t = 0.
    O (B, H, T, DV) in V's dtype, ST (B, H, DK, DV) f32 the state after the last step. Per chunk of BT steps (WY form):
    A = tril(diag(beta) K K^T, -1), X = (I + A)^-1, W = X diag(beta) K, U = X diag(beta) V - W S,
    O = Q S + tril(Q K^T) U, S += K^T U. Rows past T read 0 (beta 0: they change nothing). PREC: how the products
    read their f32 operands ("ieee" exactly, "tf32" on the tensor cores). Grid: (heads, batch)."""
    h, b = ts.block_id(0), ts.block_id(1)
    T = Q.shape[2]
    q = ts.RegTile[ts.f32, BT, DK]()
    k = ts.RegTile[ts.f32, BT, DK]()
    kb = ts.RegTile[ts.f32, BT, DK]()
    w = ts.RegTile[ts.f32, BT, DK]()
    v = ts.RegTile[ts.f32, BT, DV]()
    u = ts.RegTile[ts.f32, BT, DV]()
    o = ts.RegTile[ts.f32, BT, DV]()
    out = ts.RegTile[O.dtype, BT, DV]()
    s = ts.RegTile[ts.f32, DK, DV]()
    a = ts.RegTile[ts.f32, BT, BT]()
    p = ts.RegTile[ts.f32, BT, BT]()
    x = ts.RegTile[ts.f32, BT, BT]()
    eye = ts.RegTile[ts.f32, BT, BT]()
    beta = ts.RegVec[ts.f32, BT]()
    _eye(eye, BT)
    ts.load(s, S0, at=(b, h, 0, 0))
    for c in ts.range(ts.cdiv(T, BT)):
        ts.load(q, Q, at=(b, h, c, 0))
        ts.load(k, K, at=(b, h, c, 0))
        ts.load(v, V, at=(b, h, c, 0))
        ts.load(beta, BETA, at=(b, h, c))
        ts.mul(kb, k, ts.per_row(beta))
        ts.mul(v, v, ts.per_row(beta))
        ts.zero(a)
        ts.mma_ABt(a, kb, k, a, input_precision=PREC)              # beta_i k_i . k_j
        ts.tril(a, a, -1)                            # strictly below the diagonal: nilpotent, A^BT = 0
        ts.sub(x, eye, a)                            # X = I - A
        ts.copy(p, a)
        span = 2
        while span < BT:                             # (a Python loop: log2(BT) - 1 factors, unrolled)
            ts.zero(a)
            ts.mma_AB(a, p, p, a, input_precision=PREC)            # A^span
            ts.copy(p, a)
            ts.mma_AB(x, x, p, x, input_precision=PREC)            # X (I + A^span)
            span *= 2
        ts.zero(w)
        ts.mma_AB(w, x, kb, w, input_precision=PREC)               # W = X diag(beta) K
        ts.zero(u)
        ts.mma_AB(u, x, v, u, input_precision=PREC)                # X diag(beta) V
        ts.zero(o)
        ts.mma_AB(o, w, s, o, input_precision=PREC)
        ts.sub(u, u, o)                              # U = X diag(beta) V - W S
        ts.zero(a)
        ts.mma_ABt(a, q, k, a, input_precision=PREC)
        ts.tril(a, a)                                # q_i . k_j, j <= i
        ts.zero(o)
        ts.mma_AB(o, q, s, o, input_precision=PREC)
        ts.mma_AB(o, a, u, o, input_precision=PREC)
        ts.copy(out, o)
        ts.store(O, out, at=(b, h, c, 0))
        ts.mma_AtB(s, k, u, s, input_precision=PREC)               # S += K^T U
    ts.store(ST, s, at=(b, h, 0, 0))


def delta_rule_ref(q, k, v, beta, s0):
    """The recurrence, one step at a time, in float64."""
    q, k, v, beta, s = q.double(), k.double(), v.double(), beta.double(), s0.double().clone()
    B, H, T, _ = q.shape
    o = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        kt, vt = k[:, :, t], v[:, :, t]                                  # (B, H, DK), (B, H, DV)
        err = vt - torch.einsum("bhk,bhkv->bhv", kt, s)
        s = s + beta[:, :, t, None, None] * kt[..., :, None] * err[..., None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], s)
    return o, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "T", "DK", "DV"), [(2, 2, 37, 16, 32), (1, 1, 1, 16, 16), (1, 2, 32, 32, 16),
                                                       (1, 1, 0, 16, 16)])
def test_delta_rule_chunked(backend, dtype, B, H, T, DK, DV, rng):
    """T off the chunk (37), of one step, two whole chunks, and 0 (ST = S0, O empty); DK != DV both ways; L2-normalized
    keys; some betas 0 (no update) and 1 with a key repeated at once (the repeat overwrites its value exactly)."""
    q = randn(rng, B, H, T, DK, dtype=dtype)
    k = F.normalize(randn(rng, B, H, T, DK), dim=-1)
    v = randn(rng, B, H, T, DV, dtype=dtype)
    beta = torch.from_numpy(rng.uniform(0, 1, (B, H, T))).float()
    if T >= 8:
        beta[:, :, 3] = 0.0
        beta[:, :, 5:7] = 1.0
        k[:, :, 6] = k[:, :, 5]
    k = k.to(dtype)
    s0 = randn(rng, B, H, DK, DV) * 0.5
    o, st = poisoned(B, H, T, DV, dtype=dtype), poisoned(B, H, DK, DV)
    launch(delta_rule, backend, q, k, v, beta, s0, o, st, DK=DK, DV=DV)
    want_o, want_s = delta_rule_ref(q, k, v, beta, s0)
    close(o, want_o.to(dtype), scale=30 if dtype is torch.float32 else 4)
    close(st, want_s.float(), scale=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_on_tf32_products(backend, rng):
    """The products on tf32 (operands rounded to 10 mantissa bits, as the tensor cores read f32): within tf32's error
    of float64 over three chunks."""
    B, H, T, D = 1, 2, 40, 16
    q, v = randn(rng, B, H, T, D), randn(rng, B, H, T, D)
    k = F.normalize(randn(rng, B, H, T, D), dim=-1)
    beta = torch.from_numpy(rng.uniform(0, 1, (B, H, T))).float()
    s0 = randn(rng, B, H, D, D) * 0.5
    o, st = poisoned(B, H, T, D), poisoned(B, H, D, D)
    launch(delta_rule, backend, q, k, v, beta, s0, o, st, PREC="tf32")
    want_o, want_s = delta_rule_ref(q, k, v, beta, s0)
    torch.testing.assert_close(o.double(), want_o, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(st.double(), want_s, rtol=2e-2, atol=2e-2)


def test_delta_rule_with_beta_one_erases_the_old_value(rng):
    """beta = 1 and orthonormal keys: the state after a chunk maps each k_t to v_t exactly (S^T k_t = v_t), whatever
    S0 held; the reference executor and Triton agree with each other too."""
    B, H, T, D = 1, 1, 16, 16
    k = torch.eye(D)[torch.from_numpy(rng.permutation(D))].reshape(B, H, T, D)
    v, q = randn(rng, B, H, T, D), randn(rng, B, H, T, D)
    s0 = randn(rng, B, H, D, D) * 3
    beta = torch.ones(B, H, T)
    got = {}
    for backend in BACKENDS:
        o, st = poisoned(B, H, T, D), poisoned(B, H, D, D)
        launch(delta_rule, backend, q, k, v, beta, s0, o, st, DK=D, DV=D)
        torch.testing.assert_close(torch.einsum("tk,kv->tv", k[0, 0], st[0, 0]), v[0, 0], rtol=1e-4, atol=1e-4)
        got[backend] = (o, st)
    torch.testing.assert_close(got["triton"][0], got["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["triton"][1], got["reference"][1], rtol=1e-5, atol=1e-5)


# ---- 2. GroupNorm forward and backward over an (N, G, C/G, HW) view -----------------------------------------------
def _spread(dst, part, sq) -> None:
    """dst (BC,) = sum(part) in every element, through the (BC, BC) scratch ``sq``."""
    ts.zero(sq)
    ts.add(sq, sq, ts.per_col(part))
    ts.row_sum(dst, sq)


def _first(dst1, vec, t1) -> None:
    """dst1 (1,) = max(vec): a vector whose elements are all one value, as one element to store."""
    ts.zero(t1)
    ts.add(t1, t1, ts.per_col(vec))
    ts.row_max(dst1, t1)


@ts.kernel(grid=lambda X, BC: (X.shape[1], X.shape[0]))
def group_norm_fwd(X, GAMMA, BETA, Y, MEAN, RSTD, eps: float, *, BC: int = 4, BW: int = 16):
    """X (N, G, CG, HW) a view of (N, C, H, W) memory; GAMMA, BETA (G, CG) views of (C,); Y like X, in its dtype;
    MEAN, RSTD (N, G) f32. Two passes for the statistics (the mean, then the centred squares, so an offset of 1e3
    does not cancel), a third for Y. BC >= CG: rows past CG read 0, and are masked out of the squares. Grid: (G, N)."""
    g, n = ts.block_id(0), ts.block_id(1)
    CG, HW = X.shape[2], X.shape[3]
    x = ts.RegTile[ts.f32, BC, BW]()
    out = ts.RegTile[Y.dtype, BC, BW]()
    valid = ts.RegTile[ts.bool_, BC, BW]()
    incol = ts.RegTile[ts.bool_, BC, BW]()
    rows = ts.RegVec[ts.i32, BC]()
    cols = ts.RegVec[ts.i32, BW]()
    part = ts.RegVec[ts.f32, BC]()
    mean = ts.RegVec[ts.f32, BC]()
    rstd = ts.RegVec[ts.f32, BC]()
    gam = ts.RegVec[ts.f32, BC]()
    bet = ts.RegVec[ts.f32, BC]()
    sq = ts.RegTile[ts.f32, BC, BC]()
    t1 = ts.RegTile[ts.f32, 1, BC]()
    one = ts.RegVec[ts.f32, 1]()
    count = CG * HW
    ts.arange(rows)
    ts.zero(part)
    for j in ts.range(ts.cdiv(HW, BW)):
        ts.load(x, X, at=(n, g, 0, j))
        ts.row_sum(part, x, part)
    _spread(mean, part, sq)
    ts.div(mean, mean, count)
    ts.zero(part)
    for j in ts.range(ts.cdiv(HW, BW)):
        ts.load(x, X, at=(n, g, 0, j))
        ts.arange(cols, j * BW)
        ts.lt(valid, ts.per_row(rows), CG)
        ts.lt(incol, ts.per_col(cols), HW)
        ts.logical_and(valid, valid, incol)
        ts.sub(x, x, ts.per_row(mean))
        ts.where(x, valid, x, 0.0)
        ts.mul(x, x, x)
        ts.row_sum(part, x, part)
    _spread(rstd, part, sq)
    ts.div(rstd, rstd, count)
    ts.add(rstd, rstd, eps)
    ts.rsqrt(rstd, rstd)
    ts.load(gam, GAMMA, at=(g, 0))
    ts.load(bet, BETA, at=(g, 0))
    for j in ts.range(ts.cdiv(HW, BW)):
        ts.load(x, X, at=(n, g, 0, j))
        ts.sub(x, x, ts.per_row(mean))
        ts.mul(x, x, ts.per_row(rstd))
        ts.mul(x, x, ts.per_row(gam))
        ts.add(x, x, ts.per_row(bet))
        ts.copy(out, x)
        ts.store(Y, out, at=(n, g, 0, j))
    _first(one, mean, t1)
    ts.store(MEAN, one, at=(n, g))
    _first(one, rstd, t1)
    ts.store(RSTD, one, at=(n, g))


@ts.kernel(grid=lambda X: (X.shape[1],))
def group_norm_bwd(X, DY, GAMMA, MEAN, RSTD, DX, DGAMMA, DBETA, *, BC: int = 4, BW: int = 16):
    """X, DY (N, G, CG, HW); GAMMA (G, CG); MEAN, RSTD (N, G) f32 from the forward, read one element at a time with
    load_scalar. DX like X in its dtype: rstd (dy g - mean(dy g) - xhat mean(dy g xhat)), the means over the group;
    DGAMMA, DBETA (G, CG) f32: sum over n and HW of dy xhat and dy, each group's channels summed by its one program over
    the whole batch (no atomics). Elements past the tensor read dy = 0 and add nothing. Grid: (G,)."""
    g = ts.block_id(0)
    N, CG, HW = X.shape[0], X.shape[2], X.shape[3]
    x = ts.RegTile[ts.f32, BC, BW]()
    dy = ts.RegTile[ts.f32, BC, BW]()
    t = ts.RegTile[ts.f32, BC, BW]()
    out = ts.RegTile[DX.dtype, BC, BW]()
    gam = ts.RegVec[ts.f32, BC]()
    dg = ts.RegVec[ts.f32, BC]()
    db = ts.RegVec[ts.f32, BC]()
    p1 = ts.RegVec[ts.f32, BC]()
    p2 = ts.RegVec[ts.f32, BC]()
    c1 = ts.RegVec[ts.f32, BC]()
    c2 = ts.RegVec[ts.f32, BC]()
    sq = ts.RegTile[ts.f32, BC, BC]()
    count = CG * HW
    ts.load(gam, GAMMA, at=(g, 0))
    ts.zero(dg)
    ts.zero(db)
    for n in ts.range(N):
        mean = ts.load_scalar(MEAN, n, g)
        rstd = ts.load_scalar(RSTD, n, g)
        ts.zero(p1)
        ts.zero(p2)
        for j in ts.range(ts.cdiv(HW, BW)):
            ts.load(x, X, at=(n, g, 0, j))
            ts.load(dy, DY, at=(n, g, 0, j))
            ts.sub(x, x, mean)
            ts.mul(x, x, rstd)                       # xhat
            ts.row_sum(db, dy, db)
            ts.mul(t, dy, x)
            ts.row_sum(dg, t, dg)
            ts.mul(dy, dy, ts.per_row(gam))          # dy g
            ts.row_sum(p2, dy, p2)
            ts.mul(t, dy, x)
            ts.row_sum(p1, t, p1)
        _spread(c1, p1, sq)
        _spread(c2, p2, sq)
        ts.div(c1, c1, count)
        ts.div(c2, c2, count)
        for j in ts.range(ts.cdiv(HW, BW)):
            ts.load(x, X, at=(n, g, 0, j))
            ts.load(dy, DY, at=(n, g, 0, j))
            ts.sub(x, x, mean)
            ts.mul(x, x, rstd)
            ts.mul(dy, dy, ts.per_row(gam))
            ts.sub(dy, dy, ts.per_row(c2))
            ts.mul(x, x, ts.per_row(c1))
            ts.sub(dy, dy, x)
            ts.mul(dy, dy, rstd)
            ts.copy(out, dy)
            ts.store(DX, out, at=(n, g, 0, j))
    ts.store(DGAMMA, dg, at=(g, 0))
    ts.store(DBETA, db, at=(g, 0))


def _gn_case(rng, N, C, H, W, G, dtype):
    x = randn(rng, N, C, H, W) * 2 + 0.5
    if N >= 2 and C // G >= 1:
        x[1, : C // G] += 1e3                        # one group far from 0: the squares must be centred
    gamma, beta = randn(rng, C) + 1, randn(rng, C)
    return x.to(dtype), gamma.to(dtype), beta.to(dtype)


GN_SHAPES = [(3, 6, 5, 7, 2), (2, 4, 1, 1, 4), (1, 12, 4, 9, 3), (0, 6, 3, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "C", "H", "W", "G"), GN_SHAPES)
def test_group_norm_forward(backend, dtype, N, C, H, W, G, rng):
    """HW off the tile (35, 36), a channel per group and one pixel (variance 0: y = beta), CG = 3 of BC = 4 rows,
    an empty batch; a group offset by 1e3."""
    eps = 1e-5
    x, gamma, beta = _gn_case(rng, N, C, H, W, G, dtype)
    xv = x.view(N, G, C // G, H * W)
    y = poisoned(N, C, H, W, dtype=dtype)
    mean, rstd = poisoned(N, G), poisoned(N, G)
    launch(group_norm_fwd, backend, xv, gamma.view(G, -1), beta.view(G, -1), y.view(N, G, C // G, H * W), mean, rstd,
           eps)
    x64 = x.double().view(N, G, C // G * H * W)
    want_mean = x64.mean(-1)
    want_rstd = (x64.var(-1, unbiased=False) + eps).rsqrt()
    close(y, F.group_norm(x.double(), G, gamma.double(), beta.double(), eps).to(dtype), scale=8)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "C", "H", "W", "G"), GN_SHAPES)
def test_group_norm_backward(backend, dtype, N, C, H, W, G, rng):
    """dX, dgamma, dbeta against float64 autograd of F.group_norm, from the float64 statistics rounded to f32."""
    eps = 1e-5
    x, gamma, beta = _gn_case(rng, N, C, H, W, G, dtype)
    dy = randn(rng, N, C, H, W, dtype=dtype)
    x64 = x.double().requires_grad_()
    g64, b64 = gamma.double().requires_grad_(), beta.double().requires_grad_()
    F.group_norm(x64, G, g64, b64, eps).backward(dy.double())
    xg = x.double().view(N, G, C // G * H * W)
    mean, rstd = xg.mean(-1).float(), (xg.var(-1, unbiased=False) + eps).rsqrt().float()
    dx, dgamma, dbeta = poisoned(N, C, H, W, dtype=dtype), poisoned(C), poisoned(C)
    view = (N, G, C // G, H * W)
    launch(group_norm_bwd, backend, x.view(view), dy.view(view), gamma.view(G, -1), mean, rstd, dx.view(view),
           dgamma.view(G, -1), dbeta.view(G, -1))
    close(dx, x64.grad.to(dtype), scale=10)
    torch.testing.assert_close(dgamma.double(), g64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbeta.double(), b64.grad, rtol=1e-5, atol=1e-4)


# ---- 3. a 7-point 3-D heat-equation step ---------------------------------------------------------------------------
@ts.kernel(grid=lambda U, BH, BW: (ts.cdiv(U.shape[2], BH), ts.cdiv(U.shape[3], BW), U.shape[0]))
def heat3d(PC, PN, PS, PW, PE, U, alpha: float, *, BH: int = 8, BW: int = 16):
    """P (B, D + 2, H + 2, W + 2) the volume zero-padded by one cell on every side (Dirichlet boundaries); PC =
    P[:, :, 1:, 1:] (the cells), PN / PS = P[:, :, 0:, 1:] / P[:, :, 2:, 1:] (the rows above / below), PW / PE =
    P[:, :, 1:, 0:] / P[:, :, 1:, 2:] (the columns left / right); the depth neighbours are planes z and z + 2 of PC.
    U (B, D, H, W) = u + alpha (sum of the six neighbours - 6 u). A program walks the depth axis with the planes
    below and above carried in registers. Grid: (row blocks, column blocks, B)."""
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    D = U.shape[1]
    below = ts.RegTile[ts.f32, BH, BW]()
    cur = ts.RegTile[ts.f32, BH, BW]()
    above = ts.RegTile[ts.f32, BH, BW]()
    nb = ts.RegTile[ts.f32, BH, BW]()
    acc = ts.RegTile[ts.f32, BH, BW]()
    out = ts.RegTile[U.dtype, BH, BW]()
    ts.load(below, PC, at=(b, 0, i, j))
    ts.load(cur, PC, at=(b, 1, i, j))
    for z in ts.range(D):
        ts.load(above, PC, at=(b, z + 2, i, j))
        ts.add(acc, below, above)
        for P in (PN, PS, PW, PE):                   # (a Python loop: four views, unrolled)
            ts.load(nb, P, at=(b, z + 1, i, j))
            ts.add(acc, acc, nb)
        ts.mul(nb, cur, 6.0)
        ts.sub(acc, acc, nb)
        ts.mul(acc, acc, alpha)
        ts.add(acc, acc, cur)
        ts.copy(out, acc)
        ts.store(U, out, at=(b, z, i, j))
        ts.copy(below, cur)
        ts.copy(cur, above)


def heat_step(backend, u, alpha):
    B, D, H, W = u.shape
    p = F.pad(u, (1, 1, 1, 1, 1, 1))                 # (B, D + 2, H + 2, W + 2)
    out = poisoned(B, D, H, W, dtype=u.dtype)
    launch(heat3d, backend, p[:, :, 1:, 1:], p[:, :, 0:, 1:], p[:, :, 2:, 1:], p[:, :, 1:, 0:], p[:, :, 1:, 2:], out,
           alpha)
    return out


def heat_ref(u, alpha):
    p = F.pad(u.double(), (1, 1, 1, 1, 1, 1))
    c = p[:, 1:-1, 1:-1, 1:-1]
    nbrs = (p[:, :-2, 1:-1, 1:-1] + p[:, 2:, 1:-1, 1:-1] + p[:, 1:-1, :-2, 1:-1] + p[:, 1:-1, 2:, 1:-1]
            + p[:, 1:-1, 1:-1, :-2] + p[:, 1:-1, 1:-1, 2:])
    return c + alpha * (nbrs - 6 * c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "D", "H", "W"), [(2, 5, 11, 19), (1, 1, 1, 1), (1, 3, 8, 16), (1, 0, 4, 4)])
def test_heat3d_two_steps(backend, dtype, B, D, H, W, rng):
    """Two steps (ping-pong, each re-padded), H and W off the tile, one cell (every neighbour is boundary), tile
    multiples, an empty depth; each step checked against the float64 step of the kernel's own input."""
    alpha = 1 / 7
    u0 = randn(rng, B, D, H, W, dtype=dtype)
    u1 = heat_step(backend, u0, alpha)
    close(u1, heat_ref(u0, alpha).to(dtype), scale=4)
    u2 = heat_step(backend, u1, alpha)
    close(u2, heat_ref(u1, alpha).to(dtype), scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heat3d_nan_reaches_exactly_the_six_neighbours(backend, rng):
    """A NaN cell makes NaN of itself and its six neighbours after one step, nothing else; an infinite cell is NaN
    (u - 6 alpha u: inf - inf), its neighbours infinite, and a cell between +inf and -inf NaN; a cell of 3e38 is -inf in
    f32 (six times it overflows before alpha scales it), where float64 keeps it finite."""
    B, D, H, W = 1, 4, 9, 17
    u = randn(rng, B, D, H, W)
    u[0, 2, 4, 8] = math.nan
    u[0, 0, 0, 0] = math.inf
    u[0, 0, 0, 2] = -math.inf
    u[0, 3, 8, 16] = 3e38
    got = heat_step(backend, u, 0.1)
    want = heat_ref(u, 0.1)
    nan = torch.zeros(B, D, H, W, dtype=torch.bool)
    for dz, dy, dx in [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
        nan[0, 2 + dz, 4 + dy, 8 + dx] = True
    nan[0, 0, 0, :3] = True
    assert torch.equal(torch.isnan(want), nan)
    assert torch.equal(torch.isnan(got), nan)
    assert got[0, 1, 0, 0].item() == math.inf and got[0, 0, 1, 2].item() == -math.inf
    assert got[0, 3, 8, 16].item() == -math.inf and math.isfinite(want[0, 3, 8, 16].item())
    keep = torch.ones(B, D, H, W, dtype=torch.bool)
    keep[0, 3, 8, 16] = False
    close(got[keep], want[keep].float())
