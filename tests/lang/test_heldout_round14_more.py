"""Round 14 of held-out kernels, continued (see test_heldout_round14.py's docstring): CTC loss's forward (the alpha
recursion in log space over the blank-extended target, one program per sample, its frame and target counts read with
ts.load_scalar as a loop bound and a mask; the extended labels, their shift by two and the frame's log-probabilities
gathered exactly by a where and a row max; impossible alignments inf, a log-probability of -inf, targets as int32 and
int64), log-domain Sinkhorn for entropic optimal transport (a runtime number of iterations carrying the two potentials,
row and column log-sum-exps, forbidden pairs of cost +inf, a row of zero mass, ragged sizes masked to -inf), the
Pearson correlation matrix of rows (torch.corrcoef: centred in a first pass, the products by mma_ABt, clipped to
[-1, 1], a constant row or a NaN observation NaN as torch's), and a persistent LSTM over a whole sequence (the weights
loaded once, h and c carried by the time loop, h fed back into the products as a register tile; inputs at 1e4
saturating every gate). No kernel of this file gave a wrong answer; one message was unclear and is fixed: a loop bound
read by ts.load_scalar from a float tensor was refused saying only that `/` makes a float (lang.tiles.as_index):
test_ctc_lengths_in_a_float_tensor_are_named.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]
NEG_INF = -math.inf


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261401)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. CTC loss, forward ------------------------------------------------------------------------------------------
def _shift_sel(sel, k: int, n: int) -> None:
    """sel (n, n) bool: column == row - k (row s picks element s - k)."""
    r = ts.RegVec[ts.i32, n]()
    rk = ts.RegVec[ts.i32, n]()
    ts.arange(r)
    ts.sub(rk, r, k)
    ts.eq(sel, ts.per_row(rk), ts.per_col(r))


def _lse_parts(dst, a, b, c, m, msafe, e, ninf) -> None:
    """dst = log(exp a + exp b + exp c), -inf where all three are (vectors; dst is none of a, b, c)."""
    ts.max(m, a, b)
    ts.max(m, m, c)
    ts.eq(ninf, m, NEG_INF)
    ts.where(msafe, ninf, 0.0, m)
    ts.sub(e, a, msafe)
    ts.exp(dst, e)
    ts.sub(e, b, msafe)
    ts.exp(e, e)
    ts.add(dst, dst, e)
    ts.sub(e, c, msafe)
    ts.exp(e, e)
    ts.add(dst, dst, e)
    ts.log(dst, dst)
    ts.add(dst, dst, msafe)


@ts.kernel(grid=lambda LP: (LP.shape[1],))
def ctc_nll(LP, TGT, IN_LEN, TGT_LEN, LOSS, *, BL: int = 16, BS: int = 8, BC: int = 8):
    """LP (T, N, C) log-probabilities, blank 0; TGT (N, S) padded targets in 1..C-1; IN_LEN, TGT_LEN (N,) ints;
    LOSS (N,) f32 = -log p(target | frames), inf when no alignment exists (F.ctc_loss, reduction='none').
    BL >= 2 S + 1, BS >= S, BC >= C. Grid: (N,)."""
    b = ts.block_id(0)
    frames = ts.load_scalar(IN_LEN, b)
    n_tgt = ts.load_scalar(TGT_LEN, b)
    s = ts.RegVec[ts.i32, BL]()
    half = ts.RegVec[ts.i32, BL]()
    odd = ts.RegVec[ts.bool_, BL]()
    valid = ts.RegVec[ts.bool_, BL]()
    skip = ts.RegVec[ts.bool_, BL]()
    ext = ts.RegVec[ts.i32, BL]()
    ext2 = ts.RegVec[ts.i32, BL]()
    jv = ts.RegVec[ts.i32, BS]()
    tg = ts.RegVec[ts.i32, BS]()
    cv = ts.RegVec[ts.i32, BC]()
    pick = ts.RegTile[ts.bool_, BL, BS]()
    picked = ts.RegTile[ts.i32, BL, BS]()
    sel1 = ts.RegTile[ts.bool_, BL, BL]()
    sel2 = ts.RegTile[ts.bool_, BL, BL]()
    ishift = ts.RegTile[ts.i32, BL, BL]()
    fshift = ts.RegTile[ts.f32, BL, BL]()
    onehot = ts.RegTile[ts.bool_, BL, BC]()
    gath = ts.RegTile[ts.f32, BL, BC]()
    lpv = ts.RegVec[ts.f32, BC]()
    lpe = ts.RegVec[ts.f32, BL]()
    alpha = ts.RegVec[ts.f32, BL]()
    a1 = ts.RegVec[ts.f32, BL]()
    a2 = ts.RegVec[ts.f32, BL]()
    nxt = ts.RegVec[ts.f32, BL]()
    m = ts.RegVec[ts.f32, BL]()
    msafe = ts.RegVec[ts.f32, BL]()
    e = ts.RegVec[ts.f32, BL]()
    ninf = ts.RegVec[ts.bool_, BL]()
    row = ts.RegTile[ts.f32, 1, BL]()
    m1 = ts.RegVec[ts.f32, 1]()
    tot = ts.RegVec[ts.f32, 1]()
    ninf1 = ts.RegVec[ts.bool_, 1]()
    # the extended labels: ext[s] = TGT[b, (s - 1) / 2] at odd s, blank at even s
    ts.arange(s)
    ts.arange(jv)
    ts.arange(cv)
    ts.rem(half, s, 2)
    ts.eq(odd, half, 1)
    ts.sub(half, s, 1)
    ts.div(half, half, 2)
    ts.load(tg, TGT, at=(b, 0))
    ts.eq(pick, ts.per_row(half), ts.per_col(jv))
    ts.where(picked, pick, ts.per_col(tg), 0)
    ts.row_max(ext, picked)
    ts.where(ext, odd, ext, 0)
    ts.lt(valid, s, 2 * n_tgt + 1)
    _shift_sel(sel1, 1, BL)
    _shift_sel(sel2, 2, BL)
    ts.where(ishift, sel2, ts.per_col(ext), -1)
    ts.row_max(ext2, ishift)                         # ext[s - 2], -1 for s < 2
    ts.ne(skip, ext, ext2)
    ts.logical_and(skip, skip, odd)                  # s - 2 -> s: a label unlike the one before it
    ts.eq(onehot, ts.per_row(ext), ts.per_col(cv))
    # frame 0: the blank or the first label
    ts.load(lpv, LP, at=(0, b, 0))
    ts.where(gath, onehot, ts.per_col(lpv), NEG_INF)
    ts.row_max(lpe, gath)
    ts.lt(ninf, s, 2)
    ts.logical_and(ninf, ninf, valid)
    ts.where(alpha, ninf, lpe, NEG_INF)
    for t in ts.range(1, frames):
        ts.where(fshift, sel1, ts.per_col(alpha), NEG_INF)
        ts.row_max(a1, fshift)
        ts.where(fshift, sel2, ts.per_col(alpha), NEG_INF)
        ts.row_max(a2, fshift)
        ts.where(a2, skip, a2, NEG_INF)
        ts.load(lpv, LP, at=(t, b, 0))
        ts.where(gath, onehot, ts.per_col(lpv), NEG_INF)
        ts.row_max(lpe, gath)
        _lse_parts(nxt, alpha, a1, a2, m, msafe, e, ninf)
        ts.add(nxt, nxt, lpe)
        ts.where(alpha, valid, nxt, NEG_INF)
    # the last label or the blank after it
    ts.eq(ninf, s, 2 * n_tgt)
    ts.eq(odd, s, 2 * n_tgt - 1)
    ts.logical_or(ninf, ninf, odd)
    ts.where(alpha, ninf, alpha, NEG_INF)
    ts.zero(row)
    ts.add(row, row, ts.per_col(alpha))
    ts.row_max(m1, row)
    ts.eq(ninf1, m1, NEG_INF)
    ts.where(m1, ninf1, 0.0, m1)
    ts.sub(row, row, ts.per_row(m1))
    ts.exp(row, row)
    ts.row_sum(tot, row)
    ts.log(tot, tot)
    ts.add(tot, tot, m1)
    ts.neg(tot, tot)
    ts.store(LOSS, tot, at=(b,))


def _ctc_case(rng, T, N, C, S, dtype, tdtype, sharp=1.0):
    lp = F.log_softmax(randn(rng, T, N, C) * sharp, dim=-1)
    tgt = torch.from_numpy(rng.integers(1, C, (N, S))).to(tdtype)
    in_len = torch.from_numpy(rng.integers(max(1, T // 2), T + 1, (N,)))
    tgt_len = torch.from_numpy(rng.integers(0, S + 1, (N,)))
    in_len[0] = T
    return lp.to(dtype), tgt, in_len, tgt_len


def _ctc_check(backend, lp, tgt, in_len, tgt_len, dtype):
    N = lp.shape[1]
    loss = poisoned(N)
    launch(ctc_nll, backend, lp, tgt, in_len, tgt_len, loss)
    want = F.ctc_loss(lp.double(), tgt.long(), in_len, tgt_len, blank=0, reduction="none", zero_infinity=False)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4, equal_nan=False)
    return loss, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "tdtype"), [(torch.float32, I64), (F16, I32), (BF, I64)])
def test_ctc_loss_forward(backend, dtype, tdtype, rng):
    """Ragged frame and target counts (a target of length 0: all blanks), repeated labels (they need a blank between
    them), a sample with too few frames for its repeats (inf), and peaky log-probabilities (-300 and below)."""
    T, N, C, S = 14, 5, 7, 6
    lp, tgt, in_len, tgt_len = _ctc_case(rng, T, N, C, S, dtype, tdtype)
    tgt[1, :4] = torch.tensor([3, 3, 3, 2])
    tgt_len[1], in_len[1] = 4, 7                     # 3 _ 3 _ 3 2: 6 frames at least
    tgt[2, :3] = torch.tensor([4, 4, 4])
    tgt_len[2], in_len[2] = 3, 4                     # needs 5 frames: impossible
    tgt_len[3] = 0
    lp[:, 4] = F.log_softmax(randn(rng, T, C) * 60, dim=-1).to(dtype)
    loss, want = _ctc_check(backend, lp, tgt, in_len, tgt_len, dtype)
    assert loss[2].item() == math.inf and math.isfinite(loss[1].item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctc_loss_with_a_class_never_emitted(backend, rng):
    """A class whose log-probability is -inf in every frame: a target holding it is inf, the others are finite; one
    frame only (T = 1): a target of one label is -lp[0, label], of none -lp[0, blank]."""
    T, N, C = 12, 3, 5
    logits = randn(rng, T, N, C)
    logits[..., 4] = NEG_INF
    lp = F.log_softmax(logits, dim=-1)
    tgt = torch.tensor([[1, 2, 4, 1], [1, 2, 3, 1], [2, 1, 1, 3]], dtype=I32)
    in_len, tgt_len = torch.tensor([12, 12, 9]), torch.tensor([3, 4, 2])
    loss, _ = _ctc_check(backend, lp, tgt, in_len, tgt_len, torch.float32)
    assert loss[0].item() == math.inf and math.isfinite(loss[1].item()) and math.isfinite(loss[2].item())
    lp1 = lp[:1]
    loss1, _ = _ctc_check(backend, lp1, tgt, torch.tensor([1, 1, 1]), torch.tensor([1, 0, 2]), torch.float32)
    assert loss1[0].item() == pytest.approx(-lp1[0, 0, 1].item(), rel=1e-6)
    assert loss1[1].item() == pytest.approx(-lp1[0, 1, 0].item(), rel=1e-6) and loss1[2].item() == math.inf


def test_ctc_lengths_in_a_float_tensor_are_named():
    """Frame counts kept in a float tensor (as a user converting from another framework might): load_scalar reads a
    float from it, and the loop bound made of it is refused, the message saying where such a float comes from (it
    spoke of `/` only, a puzzle for a kernel with no division)."""
    T, N, C, S = 6, 2, 5, 3
    lp, tgt, in_len, tgt_len = _ctc_case(np.random.default_rng(0), T, N, C, S, torch.float32, I32)
    with pytest.raises(TraceError, match=r"test_heldout_round14_more.py:\d+: range: an operand must be an index, got "
                                         r"a float scalar \(ts\.load_scalar of `IN_LEN`, a float tensor\): "
                                         r".*ts.load_scalar of a float tensor \(read counts"):
        # (held-out round 24: the message also names the argument the float came from)
        launch(ctc_nll, "reference", lp, tgt, in_len.float(), tgt_len, poisoned(N))


# ---- 2. log-domain Sinkhorn ----------------------------------------------------------------------------------------
def _lse_rows(dst, t, m, msafe, ninf) -> None:
    """dst (R,) = log sum_j exp t[:, j], -inf for a row of -inf (t is overwritten)."""
    ts.row_max(m, t)
    ts.eq(ninf, m, NEG_INF)
    ts.where(msafe, ninf, 0.0, m)
    ts.sub(t, t, ts.per_row(msafe))
    ts.exp(t, t)
    ts.row_sum(dst, t)
    ts.log(dst, dst)
    ts.add(dst, dst, msafe)


def _lse_cols(dst, t, m, msafe, ninf) -> None:
    ts.col_max(m, t)
    ts.eq(ninf, m, NEG_INF)
    ts.where(msafe, ninf, 0.0, m)
    ts.sub(t, t, ts.per_col(msafe))
    ts.exp(t, t)
    ts.col_sum(dst, t)
    ts.log(dst, dst)
    ts.add(dst, dst, msafe)


@ts.kernel(grid=lambda COST: (COST.shape[0],))
def sinkhorn(COST, LOGA, LOGB, P, FP, GP, eps: float, iters: int, *, BN: int = 16, BM: int = 32):
    """COST (B, N, M); LOGA (B, N), LOGB (B, M) log marginals (-inf: no mass). iters rounds of
    f = eps (log a - LSE_j((g_j - C_ij) / eps)), then g = eps (log b - LSE_i((f_i - C_ij) / eps)); P (B, N, M) f32 =
    exp((f_i + g_j - C_ij) / eps), FP (B, N), GP (B, M) f32 the potentials. Cells past N or M cost +inf and have no
    mass; their potentials are -inf. One tile per problem (N <= BN, M <= BM). Grid: (B,)."""
    bi = ts.block_id(0)
    N, M = COST.shape[1], COST.shape[2]
    c = ts.RegTile[ts.f32, BN, BM]()
    t = ts.RegTile[ts.f32, BN, BM]()
    la = ts.RegVec[ts.f32, BN]()
    f = ts.RegVec[ts.f32, BN]()
    lse_r = ts.RegVec[ts.f32, BN]()
    mr = ts.RegVec[ts.f32, BN]()
    msr = ts.RegVec[ts.f32, BN]()
    nr = ts.RegVec[ts.bool_, BN]()
    rin = ts.RegVec[ts.bool_, BN]()
    ri = ts.RegVec[ts.i32, BN]()
    lb = ts.RegVec[ts.f32, BM]()
    g = ts.RegVec[ts.f32, BM]()
    lse_c = ts.RegVec[ts.f32, BM]()
    mc = ts.RegVec[ts.f32, BM]()
    msc = ts.RegVec[ts.f32, BM]()
    nc = ts.RegVec[ts.bool_, BM]()
    cin = ts.RegVec[ts.bool_, BM]()
    ci = ts.RegVec[ts.i32, BM]()
    ts.load(c, COST, at=(bi, 0, 0))
    ts.right_fill(c, c, M, math.inf)
    ts.lower_fill(c, c, N, math.inf)
    ts.arange(ri)
    ts.arange(ci)
    ts.lt(rin, ri, N)
    ts.lt(cin, ci, M)
    ts.load(la, LOGA, at=(bi, 0))
    ts.where(la, rin, la, NEG_INF)
    ts.load(lb, LOGB, at=(bi, 0))
    ts.where(lb, cin, lb, NEG_INF)
    ts.zero(f)
    ts.zero(g)
    for _ in ts.range(iters):
        ts.neg(t, c)
        ts.add(t, t, ts.per_col(g))
        ts.div(t, t, eps)
        _lse_rows(lse_r, t, mr, msr, nr)
        ts.sub(f, la, lse_r)
        ts.mul(f, f, eps)
        ts.where(f, rin, f, NEG_INF)                 # (past N: -inf - -inf would be NaN)
        ts.neg(t, c)
        ts.add(t, t, ts.per_row(f))
        ts.div(t, t, eps)
        _lse_cols(lse_c, t, mc, msc, nc)
        ts.sub(g, lb, lse_c)
        ts.mul(g, g, eps)
        ts.where(g, cin, g, NEG_INF)
    ts.neg(t, c)
    ts.add(t, t, ts.per_row(f))
    ts.add(t, t, ts.per_col(g))
    ts.div(t, t, eps)
    ts.exp(t, t)
    ts.store(P, t, at=(bi, 0, 0))
    ts.store(FP, f, at=(bi, 0))
    ts.store(GP, g, at=(bi, 0))


def sinkhorn_ref(cost, loga, logb, eps, iters):
    c, la, lb = cost.double(), loga.double(), logb.double()
    f = torch.zeros(la.shape, dtype=torch.float64)
    g = torch.zeros(lb.shape, dtype=torch.float64)
    for _ in range(iters):
        f = eps * (la - torch.logsumexp((g[:, None, :] - c) / eps, dim=2))
        g = eps * (lb - torch.logsumexp((f[:, :, None] - c) / eps, dim=1))
    return torch.exp((f[:, :, None] + g[:, None, :] - c) / eps), f, g


def _run_sinkhorn(backend, cost, loga, logb, eps, iters):
    B, N, M = cost.shape
    p, f, g = poisoned(B, N, M), poisoned(B, N), poisoned(B, M)
    launch(sinkhorn, backend, cost, loga, logb, p, f, g, eps, iters)
    return p, f, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "M", "iters"), [(13, 21, 12), (16, 32, 3), (1, 1, 2), (5, 3, 0)])
def test_sinkhorn_log_domain(backend, dtype, N, M, iters, rng):
    """N, M off the tile, whole tiles, one point each, no iterations (P = exp(-C / eps)); the second problem's costs
    offset by 50 (P is invariant to it), forbidden pairs of cost +inf (P exactly 0 there), a row of zero mass."""
    B, eps = 2, 0.1
    x, y = randn(rng, B, N, 2), randn(rng, B, M, 2)
    cost = torch.cdist(x, y) ** 2 / 4
    cost[1] += 50.0
    a = torch.from_numpy(rng.uniform(0.5, 1.5, (B, N))).float()
    b = torch.from_numpy(rng.uniform(0.5, 1.5, (B, M))).float()
    if N > 4 and M > 4:
        cost[0, 1, :3] = math.inf
        cost[0, 2, 2] = math.inf
        a[0, 3] = 0.0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost = cost.to(dtype)
    if iters == 0:
        eps = 1.0                                    # (exp(-C / 0.1) of costs 50: zero in f32 and float64 alike)
    p, f, g = _run_sinkhorn(backend, cost, a.log(), b.log(), eps, iters)
    want_p, want_f, want_g = sinkhorn_ref(cost, a.log(), b.log(), eps, iters)
    torch.testing.assert_close(p.double(), want_p, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(f.double(), want_f, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-4, atol=1e-3)
    if N > 4 and M > 4:
        assert (p[0, 1, :3] == 0).all() and p[0, 2, 2].item() == 0.0 and (p[0, 3] == 0).all()
        assert f[0, 3].item() == NEG_INF
    if iters:
        torch.testing.assert_close(p.sum(1).double(), b.double(), rtol=1e-4, atol=1e-6)   # columns: the last update


# ---- 3. the Pearson correlation matrix of rows ---------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[0], BM)))
def corrcoef(X, R, *, BM: int = 16, BK: int = 16):
    """X (V, K): V variables of K observations; R (V, V) in R's dtype = torch.corrcoef(X): the means in a first pass,
    the centred products and squares in a second (observations past K masked), cov / (sd_i sd_j) clipped to
    [-1, 1]. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    K = X.shape[1]
    xi = ts.RegTile[ts.f32, BM, BK]()
    xj = ts.RegTile[ts.f32, BM, BK]()
    sq = ts.RegTile[ts.f32, BM, BK]()
    inside = ts.RegTile[ts.bool_, BM, BK]()
    cols = ts.RegVec[ts.i32, BK]()
    mi = ts.RegVec[ts.f32, BM]()
    mj = ts.RegVec[ts.f32, BM]()
    si = ts.RegVec[ts.f32, BM]()
    sj = ts.RegVec[ts.f32, BM]()
    acc = ts.RegTile[ts.f32, BM, BM]()
    out = ts.RegTile[R.dtype, BM, BM]()
    ts.zero(mi)
    ts.zero(mj)
    for k in ts.range(ts.cdiv(K, BK)):
        ts.load(xi, X, at=(i, k))
        ts.load(xj, X, at=(j, k))
        ts.row_sum(mi, xi, mi)
        ts.row_sum(mj, xj, mj)
    ts.div(mi, mi, K)
    ts.div(mj, mj, K)
    ts.zero(acc)
    ts.zero(si)
    ts.zero(sj)
    for k in ts.range(ts.cdiv(K, BK)):
        ts.arange(cols, k * BK)
        ts.lt(inside, ts.per_col(cols), K)
        ts.load(xi, X, at=(i, k))
        ts.load(xj, X, at=(j, k))
        ts.sub(xi, xi, ts.per_row(mi))
        ts.where(xi, inside, xi, 0.0)
        ts.sub(xj, xj, ts.per_row(mj))
        ts.where(xj, inside, xj, 0.0)
        ts.mma_ABt(acc, xi, xj, acc)
        ts.mul(sq, xi, xi)
        ts.row_sum(si, sq, si)
        ts.mul(sq, xj, xj)
        ts.row_sum(sj, sq, sj)
    ts.sqrt(si, si)
    ts.sqrt(sj, sj)
    ts.div(acc, acc, ts.per_row(si))
    ts.div(acc, acc, ts.per_col(sj))
    ts.max(acc, acc, -1.0)
    ts.min(acc, acc, 1.0)
    ts.copy(out, acc)
    ts.store(R, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("V", "K"), [(21, 37), (16, 16), (1, 5), (3, 1), (4, 0)])
def test_corrcoef(backend, dtype, V, K, rng):
    """V and K off the tile, whole tiles, one variable (1), one observation (every entry 0 / 0: NaN), none (NaN); a
    constant row (NaN row and column), a NaN observation (its row and column NaN), a row offset by 1e3, a row scaled
    by 1e15 (1e30 squares), a row and its negation (exactly -1 after the clip)."""
    x = randn(rng, V, K)
    if V >= 16 and K >= 8:
        x[2] = 4.0
        x[5, 3] = math.nan
        x[7] += 1e3
        x[8] *= 1e15
        x[10] = -x[9]
        x[11] = x[9] * 3 + 1
    x = x.to(dtype)
    r = poisoned(V, V, dtype=dtype)
    launch(corrcoef, backend, x, r)
    want = torch.corrcoef(x.double()) if K else torch.full((V, V), math.nan, dtype=torch.float64)
    if V == 1 and K > 1:
        want = want.reshape(1, 1)
    close(r, want.to(dtype), scale=8)
    assert (r.double().abs() <= 1).logical_or(r.isnan()).all()
    if V >= 16 and K >= 8:
        assert r[2].isnan().all() and r[:, 5].isnan().all()
        assert r[9, 10].item() == pytest.approx(-1.0, abs=2e-2) and r[9, 11].item() == pytest.approx(1.0, abs=2e-2)


# ---- 4. a persistent LSTM over a whole sequence --------------------------------------------------------------------
def _tanh(dst, src) -> None:
    """dst = tanh(src) = 2 sigmoid(2 src) - 1 (saturates to +-1, no inf / inf)."""
    ts.mul(dst, src, 2.0)
    ts.sigmoid(dst, dst)
    ts.mul(dst, dst, 2.0)
    ts.sub(dst, dst, 1.0)


@ts.kernel(grid=lambda X, BB: (ts.cdiv(X.shape[1], BB),))
def lstm_seq(X, WIH, WHH, BIAS, H0, C0, Y, HN, CN, *, BB: int = 16, BH: int = 16, BI: int = 16):
    """X (T, B, I); WIH (4, H, I) and WHH (4, H, H) torch's weight_ih / weight_hh viewed per gate (i, f, g, o);
    BIAS (4, H) f32 (b_ih + b_hh); H0, C0 (B, H) f32. Y (T, B, H) in X's dtype, HN, CN (B, H) f32. The weights are
    loaded once; h and c are carried by the time loop, h a register tile fed back into the products. Hidden units
    past H have zero weights and biases, so they stay 0. Grid: (batch blocks,)."""
    bb = ts.block_id(0)
    T = X.shape[0]
    x = ts.RegTile[ts.f32, BB, BI]()
    h = ts.RegTile[ts.f32, BB, BH]()
    c = ts.RegTile[ts.f32, BB, BH]()
    gi = ts.RegTile[ts.f32, BB, BH]()
    gf = ts.RegTile[ts.f32, BB, BH]()
    gg = ts.RegTile[ts.f32, BB, BH]()
    go = ts.RegTile[ts.f32, BB, BH]()
    out = ts.RegTile[Y.dtype, BB, BH]()
    wi = [ts.RegTile[ts.f32, BH, BI]() for _ in range(4)]
    wh = [ts.RegTile[ts.f32, BH, BH]() for _ in range(4)]
    bias = [ts.RegVec[ts.f32, BH]() for _ in range(4)]
    for k in range(4):                               # (a Python loop: the four gates' weights, unrolled)
        ts.load(wi[k], WIH, at=(k, 0, 0))
        ts.load(wh[k], WHH, at=(k, 0, 0))
        ts.load(bias[k], BIAS, at=(k, 0))
    ts.load(h, H0, at=(bb, 0))
    ts.load(c, C0, at=(bb, 0))
    for t in ts.range(T):
        ts.load(x, X, at=(t, bb, 0))
        for k, gate in enumerate((gi, gf, gg, go)):
            ts.zero(gate)
            ts.add(gate, gate, ts.per_col(bias[k]))
            ts.mma_ABt(gate, x, wi[k], gate)
            ts.mma_ABt(gate, h, wh[k], gate)
        ts.sigmoid(gi, gi)
        ts.sigmoid(gf, gf)
        _tanh(gg, gg)
        ts.sigmoid(go, go)
        ts.mul(c, c, gf)
        ts.mul(gi, gi, gg)
        ts.add(c, c, gi)
        _tanh(h, c)
        ts.mul(h, h, go)
        ts.copy(out, h)
        ts.store(Y, out, at=(t, bb, 0))
    ts.store(HN, h, at=(bb, 0))
    ts.store(CN, c, at=(bb, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "B", "I", "H"), [(9, 19, 10, 12), (1, 1, 1, 1), (4, 16, 16, 16), (0, 3, 5, 7)])
def test_lstm_sequence(backend, dtype, T, B, I, H, rng):
    """Batch, input and hidden sizes off the tile, one of each, whole tiles, an empty sequence (HN = H0, CN = C0); one
    sample's inputs at 1e4 (every gate saturated: tanh and sigmoid at +-1 and 0 / 1, no NaN); against torch's LSTM in
    float64 on the same rounded inputs."""
    lstm = torch.nn.LSTM(I, H).double()
    x = randn(rng, T, B, I)
    if T and B > 2:
        x[:, 2] *= 1e4
    x = x.to(dtype)
    h0, c0 = randn(rng, 1, B, H) * 0.5, randn(rng, 1, B, H)
    wih, whh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    y, hn, cn = poisoned(T, B, H, dtype=dtype), poisoned(B, H), poisoned(B, H)
    launch(lstm_seq, backend, x, wih.float().view(4, H, I), whh.float().view(4, H, H), bias.float().view(4, H), h0[0],
           c0[0], y, hn, cn)
    with torch.no_grad():                            # the float64 model holds the f32-rounded parameters
        lstm.weight_ih_l0.copy_(wih.float().double())
        lstm.weight_hh_l0.copy_(whh.float().double())
        lstm.bias_ih_l0.copy_(bias.float().double())
        lstm.bias_hh_l0.zero_()
        if T:
            want_y, (want_h, want_c) = lstm(x.double(), (h0.double(), c0.double()))
        else:                                        # (torch's LSTM takes no empty sequence)
            want_y, want_h, want_c = torch.zeros(0, B, H, dtype=torch.float64), h0.double(), c0.double()
    close(y, want_y.to(dtype), scale=10)
    close(hn, want_h[0].float(), scale=10)
    close(cn, want_c[0].float(), scale=10)
    assert not y.isnan().any()
