"""Round 12 of held-out kernels, continued (see test_heldout_round12.py's docstring): a depthwise 3x3 convolution over
NHWC images (the column shifts as three views of one padded tensor, the row shifts as coordinates, dilation a
constant; a 3-D grid); Mamba-2's chunked state-space scan (SSD: the decays' prefix sums inside a chunk from a
triangle, exp of their differences masked before the exp so the upper triangle's overflow never lands, the (N, P)
state carried across chunks, the final state an f32 output beside the input-dtype Y); an L2 normalization of rows
safe at 1e30 and 1e-30 (scaled by the row's largest magnitude first; rows given as a transposed view; the norm as f32
and a bool output); and batch-norm training statistics over a channels-last view of NCHW memory, summed across
programs by atomic adds with a per-channel shift (a mean of 1e3 and a spread of 0.1 in f32), then applied, the
running statistics written by one program (the others' stores land past the tensor and are dropped).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1212)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. depthwise 3x3 convolution, NHWC ----------------------------------------------------------------------------
@ts.kernel(grid=lambda Y, BW, BC: (ts.cdiv(Y.shape[2], BW), ts.cdiv(Y.shape[3], BC), Y.shape[0] * Y.shape[1]))
def depthwise3x3(X0, X1, X2, W, BIAS, Y, *, DIL: int = 1, BW: int = 16, BC: int = 16):
    """Xp (N, H + 2 DIL, W + 2 DIL, C), the input zero-padded by DIL; X0, X1, X2 its views from columns 0, DIL and
    2 DIL; W (3, 3, C) a filter per channel, BIAS (C,); Y (N, H, W, C) = conv2d(groups=C, padding=DIL, dilation=DIL)
    in NHWC. Grid: (column blocks, channel blocks, N H)."""
    j, c, nh = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H = Y.shape[1]
    n, y = nh // H, nh % H
    x = ts.RegTile[ts.f32, BW, BC]()
    acc = ts.RegTile[ts.f32, BW, BC]()
    out = ts.RegTile[Y.dtype, BW, BC]()
    w = ts.RegVec[ts.f32, BC]()
    ts.zero(acc)
    for dy in range(3):                              # (Python loops: nine taps, unrolled)
        for dx, X in enumerate((X0, X1, X2)):
            ts.load(x, X, at=(n, y + dy * DIL, j, c))
            ts.load(w, W, at=(dy, dx, c))
            ts.mul(x, x, ts.per_col(w))
            ts.add(acc, acc, x)
    ts.load(w, BIAS, at=(c,))
    ts.add(acc, acc, ts.per_col(w))
    ts.copy(out, acc)
    ts.store(Y, out, at=(n, y, j, c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "H", "W", "C", "dil"), [(2, 5, 19, 20, 1), (1, 1, 1, 3, 1), (1, 7, 33, 16, 2),
                                                       (2, 3, 4, 1, 3)])
def test_depthwise_conv3x3_nhwc(backend, dtype, N, H, W, C, dil):
    """Widths and channel counts off the tile, one pixel, one channel, a dilation past the image (every tap but the
    centre reads padding)."""
    rng = np.random.default_rng(N * 1000 + H * 100 + W + C)
    x = randn(rng, N, H, W, C, dtype=dtype)
    w = randn(rng, 3, 3, C, dtype=dtype)
    bias = randn(rng, C)
    xp = F.pad(x, (0, 0, dil, dil, dil, dil))        # (N, H + 2 dil, W + 2 dil, C)
    views = [xp[:, :, dx * dil:, :] for dx in range(3)]
    y = poisoned(N, H, W, C, dtype=dtype)
    launch(depthwise3x3, backend, *views, w, bias, y, DIL=dil)
    want = F.conv2d(x.double().permute(0, 3, 1, 2), w.double().permute(2, 0, 1)[:, None], bias.double(),
                    padding=dil, dilation=dil, groups=C).permute(0, 2, 3, 1)
    close(y, want.to(dtype), scale=4)


# ---- 2. Mamba-2's chunked scan (SSD) -------------------------------------------------------------------------------
def _lower(mask, BT: int, strict: bool = False) -> None:
    """mask (BT, BT) bool: s <= t (s < t if strict) at (t, s)."""
    r = ts.RegVec[ts.i32, BT]()
    ts.arange(r)
    (ts.gt if strict else ts.ge)(mask, ts.per_row(r), ts.per_col(r))


@ts.kernel(grid=lambda X, BP: (ts.cdiv(X.shape[3], BP), X.shape[1], X.shape[0]))
def ssd_scan(X, DA, BM_, CM, H0, Y, HT, *, BT: int = 16, N: int = 16, BP: int = 16):
    """X (B, H, T, P) inputs; DA (B, H, T) f32 log-decays (dt A, <= 0); BM_ and CM (B, T, N) the input and output
    projections (one group, shared by the heads); H0 (B, H, N, P) f32 the state before t = 0. The recurrence
    h_t = exp(da_t) h_{t-1} + B_t^T x_t, y_t = C_t h_t, chunk by chunk: inside a chunk y = (C B^T * L) X with
    L[t, s] = exp(cum_t - cum_s) for s <= t, plus exp(cum_t) C_t h0; then h0 = exp(cum_end) h0 + (B * exp(cum_end -
    cum))^T X. Y (B, H, T, P) in X's dtype, HT (B, H, N, P) f32 the last state. Grid: (P blocks, heads, batch)."""
    pj, h, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    T = X.shape[2]
    x = ts.RegTile[ts.f32, BT, BP]()
    bm = ts.RegTile[ts.f32, BT, N]()
    cm = ts.RegTile[ts.f32, BT, N]()
    st = ts.RegTile[ts.f32, N, BP]()
    y = ts.RegTile[ts.f32, BT, BP]()
    out = ts.RegTile[Y.dtype, BT, BP]()
    g = ts.RegTile[ts.f32, BT, BT]()
    dec = ts.RegTile[ts.f32, BT, BT]()
    lower = ts.RegTile[ts.bool_, BT, BT]()
    da = ts.RegVec[ts.f32, BT]()
    cum = ts.RegVec[ts.f32, BT]()
    tot = ts.RegVec[ts.f32, BT]()
    w = ts.RegVec[ts.f32, BT]()
    spread = ts.RegTile[ts.f32, N, BT]()
    wn = ts.RegVec[ts.f32, N]()
    _lower(lower, BT)
    ts.load(st, H0, at=(b, h, 0, pj))
    for c in ts.range(ts.cdiv(T, BT)):
        ts.load(x, X, at=(b, h, c, pj))              # (rows past T read 0: they add nothing)
        ts.load(bm, BM_, at=(b, c, 0))
        ts.load(cm, CM, at=(b, c, 0))
        ts.load(da, DA, at=(b, h, c))
        ts.where(dec, lower, ts.per_col(da), 0.0)
        ts.row_sum(cum, dec)                         # cum_t = sum of da_s, s <= t
        ts.zero(dec)
        ts.add(dec, dec, ts.per_col(da))
        ts.row_sum(tot, dec)                         # the chunk's total, in every element
        ts.zero(dec)
        ts.add(dec, dec, ts.per_row(cum))
        ts.sub(dec, dec, ts.per_col(cum))            # cum_t - cum_s
        ts.where(dec, lower, dec, -math.inf)         # masked before the exp: above the diagonal it overflows
        ts.exp(dec, dec)
        ts.zero(g)
        ts.mma_ABt(g, cm, bm, g)                     # C B^T
        ts.mul(g, g, dec)
        ts.zero(y)
        ts.mma_AB(y, g, x, y)                        # inside the chunk
        ts.exp(w, cum)
        ts.mul(cm, cm, ts.per_row(w))
        ts.mma_AB(y, cm, st, y)                      # from the state before the chunk: exp(cum_t) C_t h0
        ts.copy(out, y)
        ts.store(Y, out, at=(b, h, c, pj))
        ts.sub(w, tot, cum)
        ts.exp(w, w)
        ts.mul(bm, bm, ts.per_row(w))                # B_s exp(cum_end - cum_s)
        ts.zero(spread)
        ts.add(spread, spread, ts.per_col(da))
        ts.row_sum(wn, spread)                       # the chunk's total again, one per state row
        ts.exp(wn, wn)
        ts.mul(st, st, ts.per_row(wn))               # exp(cum_end) h0
        ts.mma_AtB(st, bm, x, st)                    # + (B exp(cum_end - cum))^T X
    ts.store(HT, st, at=(b, h, 0, pj))


def ssd_ref(x, da, bm, cm, h0):
    """The recurrence, step by step, in float64."""
    B, H, T, P = x.shape
    x, da, bm, cm, h = x.double(), da.double(), bm.double(), cm.double(), h0.double().clone()
    y = torch.zeros(B, H, T, P, dtype=torch.float64)
    for t in range(T):
        h = torch.exp(da[:, :, t])[..., None, None] * h + bm[:, None, t, :, None] * x[:, :, t, None, :]
        y[:, :, t] = torch.einsum("bn,bhnp->bhp", cm[:, t], h)
    return y, h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "T", "P", "decay"), [(2, 2, 37, 20, 0.5), (1, 1, 1, 16, 0.1), (1, 2, 40, 8, 50.0),
                                                         (1, 1, 0, 16, 0.5)])
def test_mamba2_chunked_scan(backend, dtype, B, H, T, P, decay, rng):
    """T off the chunk (37, 40) and of one step; P off the tile; decays so strong (up to 50 a step) that exp of the
    upper triangle's differences would be inf times a 0 mask; a zero decay (exp 1) at some steps; T = 0 (HT = H0)."""
    N = 16
    x = randn(rng, B, H, T, P, dtype=dtype)
    da = -torch.from_numpy(rng.uniform(0, decay, (B, H, T))).float()
    if T > 3:
        da[:, :, ::4] = 0.0
    bm = randn(rng, B, T, N, dtype=torch.float32) * 0.5
    cm = randn(rng, B, T, N, dtype=torch.float32) * 0.5
    h0 = randn(rng, B, H, N, P)
    y, ht = poisoned(B, H, T, P, dtype=dtype), poisoned(B, H, N, P)
    launch(ssd_scan, backend, x, da, bm, cm, h0, y, ht, N=N)
    want_y, want_h = ssd_ref(x, da, bm, cm, h0)
    close(y, want_y.to(dtype), scale=20 if dtype is torch.float32 else 4)
    close(ht, want_h.float(), scale=20)


# ---- 3. L2 normalization safe at 1e30 and 1e-30 --------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def safe_l2_normalize(X, Y, NORM, SMALL, eps: float, *, BM: int = 8, BN: int = 16):
    """Y = X / max(||X||, eps) row by row (F.normalize), in X's dtype; NORM (M,) f32 the norms; SMALL (M,) bool where
    the norm is below eps. The sum of squares is of x / max|x| (the row's largest magnitude), so 1e30 does not
    overflow f32 (1e60) and 1e-30 does not underflow to 0; rows wider than a tile take three passes."""
    i = ts.block_id(0)
    Ncols = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    a = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    amax = ts.RegVec[ts.f32, BM]()
    inv = ts.RegVec[ts.f32, BM]()
    ssq = ts.RegVec[ts.f32, BM]()
    norm = ts.RegVec[ts.f32, BM]()
    small = ts.RegVec[ts.bool_, BM]()
    ts.zero(amax)
    for j in ts.range(ts.cdiv(Ncols, BN)):
        ts.load(x, X, at=(i, j))
        ts.abs(a, x)
        ts.row_max(amax, a, amax)
    ts.gt(small, amax, 0.0)
    ts.where(inv, small, amax, 1.0)                  # (a zero row: scaled by 1, its sum 0)
    ts.fill(norm, 1.0)
    ts.div(inv, norm, inv)
    ts.zero(ssq)
    for j in ts.range(ts.cdiv(Ncols, BN)):
        ts.load(x, X, at=(i, j))
        ts.mul(x, x, ts.per_row(inv))
        ts.mul(x, x, x)
        ts.row_sum(ssq, x, ssq)
    ts.sqrt(norm, ssq)
    ts.mul(norm, norm, amax)
    ts.lt(small, norm, eps)
    ts.store(NORM, norm, at=(i,))
    ts.store(SMALL, small, at=(i,))
    ts.max(norm, norm, eps)
    for j in ts.range(ts.cdiv(Ncols, BN)):
        ts.load(x, X, at=(i, j))
        ts.div(x, x, ts.per_row(norm))
        ts.copy(out, x)
        ts.store(Y, out, at=(i, j))


BIG = {torch.float32: 1e30, BF: 1e30, F16: 1e4}
TINY = {torch.float32: 1e-30, BF: 1e-30, F16: 1e-4}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(11, 40), (3, 1), (9, 16), (0, 5)])
def test_l2_normalize_at_extreme_magnitudes(backend, dtype, M, N, rng):
    """Rows scaled to 1e30 and 1e-30 (1e4 and 1e-4 in f16), a zero row, a row whose norm is below eps; the rows are a
    transposed view of (N, M) memory."""
    x = randn(rng, N, M, dtype=torch.float32).t()
    if M >= 4:
        x[0] *= BIG[dtype]
        x[1] *= TINY[dtype]
        x[2] = 0.0
        x[3] *= 1e-13
    x = x.to(dtype)
    eps = 1e-12
    y, norm = poisoned(M, N, dtype=dtype), poisoned(M)
    small = torch.ones(M, dtype=torch.bool) if M % 2 else torch.zeros(M, dtype=torch.bool)
    launch(safe_l2_normalize, backend, x, y, norm, small, eps)
    n64 = torch.linalg.vector_norm(x.double(), dim=1)
    close(y, F.normalize(x.double(), dim=1, eps=eps).to(dtype), scale=4)
    torch.testing.assert_close(norm.double(), n64, rtol=1e-5, atol=0)
    assert torch.equal(small, n64 < eps)
    if M >= 4 and dtype is not F16:
        assert norm[0].item() > 1e29 and 0 < norm[1].item() < 1e-28 and small[2] and small[3]


# ---- 4. batch-norm training statistics by atomic adds, then applied -----------------------------------------------
def _bn_grid(X, BW, BC):
    return (ts.cdiv(X.shape[2], BW), ts.cdiv(X.shape[3], BC), X.shape[0] * X.shape[1])


@ts.kernel(grid=_bn_grid)
def bn_stats(X, SUM, SUMSQ, *, BW: int = 16, BC: int = 16):
    """X (N, H, W, C), any strides (here NCHW memory seen channels-last); SUM, SUMSQ (C,) f32, zeroed, += the sums of
    d = x - x[0, 0, 0, c] and of d^2 over this program's (BW, BC) block (shifted by the first pixel, so a large mean
    does not cancel the variance away)."""
    j, c, nh = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H, W = X.shape[1], X.shape[2]
    n, y = nh // H, nh % H
    x = ts.RegTile[ts.f32, BW, BC]()
    shift = ts.RegVec[ts.f32, BC]()
    s = ts.RegVec[ts.f32, BC]()
    ts.load(shift, X, at=(0, 0, 0, c))
    ts.load(x, X, at=(n, y, j, c))
    ts.sub(x, x, ts.per_col(shift))
    ts.lower_fill(x, x, W - j * BW, 0.0)             # pixels past W read 0, less the shift: out
    ts.col_sum(s, x)
    ts.atomic_add(SUM, s, at=(c,))
    ts.mul(x, x, x)
    ts.col_sum(s, x)
    ts.atomic_add(SUMSQ, s, at=(c,))


@ts.kernel(grid=_bn_grid)
def bn_apply(X, SUM, SUMSQ, WEIGHT, BIAS, RMEAN, RVAR, Y, eps: float, momentum: float, *, BW: int = 16,
             BC: int = 16):
    """Y = (x - mean) / sqrt(var + eps) * weight + bias (biased var), in Y's dtype and strides; RMEAN, RVAR (C,) f32
    the running statistics, (1 - momentum) r + momentum (mean, unbiased var): written by program (0, c, 0) alone (the
    others aim past the tensor, where stores are dropped)."""
    j, c, nh = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H, W = X.shape[1], X.shape[2]
    n, y = nh // H, nh % H
    count = X.shape[0] * H * W
    x = ts.RegTile[ts.f32, BW, BC]()
    out = ts.RegTile[Y.dtype, BW, BC]()
    shift = ts.RegVec[ts.f32, BC]()
    mean = ts.RegVec[ts.f32, BC]()
    var = ts.RegVec[ts.f32, BC]()
    t = ts.RegVec[ts.f32, BC]()
    r = ts.RegVec[ts.f32, BC]()
    ts.load(shift, X, at=(0, 0, 0, c))
    ts.load(mean, SUM, at=(c,))
    ts.load(var, SUMSQ, at=(c,))
    ts.mul(mean, mean, 1.0 / count)                  # E[d], the mean less the shift
    ts.mul(var, var, 1.0 / count)                    # E[d^2]
    ts.mul(t, mean, mean)
    ts.sub(var, var, t)                              # the biased variance
    own = c + (j + nh) * ts.cdiv(X.shape[3], BC)     # c for program (0, c, 0), past the channels for the rest
    ts.load(r, RMEAN, at=(c,))
    ts.mul(r, r, 1.0 - momentum)
    ts.add(t, mean, shift)
    ts.mul(t, t, momentum)
    ts.add(r, r, t)
    ts.store(RMEAN, r, at=(own,))
    ts.load(r, RVAR, at=(c,))
    ts.mul(r, r, 1.0 - momentum)
    ts.mul(t, var, momentum * count / ts.smax(count - 1, 1))
    ts.add(r, r, t)
    ts.store(RVAR, r, at=(own,))
    ts.add(var, var, eps)
    ts.rsqrt(var, var)
    ts.load(t, WEIGHT, at=(c,))
    ts.mul(var, var, t)                              # weight / sqrt(var + eps)
    ts.load(x, X, at=(n, y, j, c))
    ts.sub(x, x, ts.per_col(shift))                  # (x - shift) - E[d]: both small, so no bits of x are lost
    ts.sub(x, x, ts.per_col(mean))
    ts.mul(x, x, ts.per_col(var))
    ts.load(t, BIAS, at=(c,))
    ts.add(x, x, ts.per_col(t))
    ts.copy(out, x)
    ts.store(Y, out, at=(n, y, j, c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "C", "H", "W"), [(2, 20, 3, 19), (1, 3, 1, 1), (3, 16, 2, 5), (4, 1, 2, 2)])
def test_batchnorm_training_step(backend, dtype, N, C, H, W, rng):
    """NCHW memory given as its channels-last permutation (channels the slow, strided axis of the tiles); a mean of
    1e3 (1e2 in f16) with a spread of 0.1 (the shift keeps the variance: without it f32's E[x^2] - E[x]^2 loses
    it); one pixel per channel (N H W = 1: biased variance 0, the running variance's count - 1 kept at 1)."""
    loc = 1e2 if dtype is F16 else 1e3
    x = (loc + 0.1 * randn(rng, N, C, H, W)).to(dtype)
    weight, bias = randn(rng, C), randn(rng, C)
    rmean, rvar = randn(rng, C), torch.rand(C) + 0.5
    xv = x.permute(0, 2, 3, 1)                       # (N, H, W, C) over NCHW memory
    s, q = torch.zeros(C), torch.zeros(C)
    launch(bn_stats, backend, xv, s, q)
    y = poisoned(N, C, H, W, dtype=dtype)
    rm, rv = rmean.clone(), rvar.clone()
    eps, momentum = 1e-5, 0.1
    launch(bn_apply, backend, xv, s, q, weight, bias, rm, rv, y.permute(0, 2, 3, 1), eps, momentum)
    want_rm, want_rv = rmean.double(), rvar.double()
    want = F.batch_norm(x.double(), want_rm, want_rv, weight.double(), bias.double(), training=True,
                        momentum=momentum, eps=eps) if N * H * W > 1 else None
    if want is None:                                 # (torch refuses one value per channel in training)
        want = bias.double()[None, :, None, None].expand(N, C, H, W)
        want_rm = (1 - momentum) * rmean.double() + momentum * x.double().reshape(C)
        want_rv = (1 - momentum) * rvar.double()
    close(y, want.to(dtype), scale=10 if dtype is torch.float32 else 4)
    close(rm, want_rm.float(), scale=10)
    close(rv, want_rv.float(), scale=10)


# ---- 5. a data-dependent trip count: ragged sequences pooled, the loop bounded by the longest --------------------
@ts.kernel(grid=lambda X, BD: (X.shape[0], ts.cdiv(X.shape[2], BD)))
def ragged_pool(X, LEN, MEAN, LAST, max_len: int, *, BL: int = 8, BD: int = 16):
    """X (B, L, D) a padded batch; LEN (B,) i32 each sequence's length (<= max_len <= L); MEAN (B, D) in X's dtype the
    mean of its first LEN rows (0 for an empty one), LAST (B, D) f32 its last row (0 for an empty one). The language
    reads no loop bound from memory: the loop runs to the longest sequence, max_len (an int argument, the host's
    LEN.max()), not L, and masks the rows past each length."""
    b, d = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BL, BD]()
    col = ts.RegTile[ts.i32, BL, 1]()
    live = ts.RegTile[ts.bool_, BL, BD]()
    one = ts.RegVec[LEN.dtype, 1]()
    n = ts.RegVec[ts.i32, BL]()                      # the length, in every element
    pos = ts.RegVec[ts.i32, BL]()
    acc = ts.RegVec[ts.f32, BD]()
    last = ts.RegVec[ts.f32, BD]()
    cnt = ts.RegVec[ts.f32, BD]()
    out = ts.RegVec[MEAN.dtype, BD]()
    onef = ts.RegVec[ts.f32, 1]()
    row = ts.RegTile[ts.f32, 1, BD]()
    ts.load(one, LEN, at=(b,))
    ts.zero(col)
    ts.add(col, col, ts.per_col(one))
    ts.row_sum(n, col)
    ts.zero(acc)
    ts.zero(last)
    for t in ts.range(ts.cdiv(max_len, BL)):
        ts.load(x, X, at=(b, t, d))
        ts.arange(pos, t * BL)
        ts.lt(live, ts.per_row(pos), ts.per_row(n))
        ts.where(x, live, x, 0.0)
        ts.col_sum(acc, x, acc)
        ts.add(pos, pos, 1)
        ts.eq(live, ts.per_row(pos), ts.per_row(n))  # the last row, if in this tile
        ts.where(x, live, x, 0.0)
        ts.col_sum(cnt, x)
        ts.add(last, last, cnt)
    ts.copy(onef, one)
    ts.zero(row)
    ts.add(row, row, ts.per_row(onef))
    ts.col_sum(cnt, row)                             # the length, in every element
    ts.max(cnt, cnt, 1.0)                            # (an empty sequence: 0 / 1)
    ts.div(acc, acc, cnt)
    ts.copy(out, acc)
    ts.store(MEAN, out, at=(b, d))
    ts.store(LAST, last, at=(b, d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lens", [(5, 0, 17, 8), (1,), (0, 0), (24, 3)])
def test_ragged_pool_bounded_by_the_longest(backend, dtype, lens, rng):
    """Lengths off the tile, empty sequences (all of them: max_len 0, a loop of no trips), one of one row. The padding
    past each length holds NaN and 1e30, so a row read past its length shows."""
    B, L, D = len(lens), 24, 20
    x = randn(rng, B, L, D, dtype=dtype)
    for b, n in enumerate(lens):
        x[b, n:] = math.nan
        x[b, n + 1:n + 2] = 1e30 if dtype is not F16 else 6e4
    ln = torch.tensor(lens, dtype=torch.int32)
    mean, last = poisoned(B, D, dtype=dtype), poisoned(B, D)
    launch(ragged_pool, backend, x, ln, mean, last, max(lens))
    want_m = torch.stack([x[b, :n].double().sum(0) / max(n, 1) for b, n in enumerate(lens)])
    want_l = torch.stack([x[b, n - 1].double() if n else torch.zeros(D, dtype=torch.float64)
                          for b, n in enumerate(lens)])
    close(mean, want_m.to(dtype))
    close(last, want_l.float())


def test_a_trip_count_read_from_memory_is_named():
    """A loop bound taken from a loaded tile (Triton's `for i in range(tl.load(p))`): refused when traced, saying how
    a data-dependent trip count is written (it named only "an operand must be an index")."""
    @ts.kernel(grid=(1,))
    def count_from_memory(LEN, Y, *, BN: int = 16):
        n = ts.RegVec[ts.i32, 1]()
        y = ts.RegVec[ts.f32, BN]()
        ts.load(n, LEN, at=(0,))
        ts.zero(y)
        for _ in ts.range(n):
            ts.add(y, y, 1.0)
        ts.store(Y, y, at=(0,))

    with pytest.raises(TraceError,
                       match=r"range: an operand is a tile, `n` \(RegVec\[i32, 1\]\).*bound the loop by an upper "
                             r"bound \(an int argument such as the largest count"):
        count_from_memory(torch.ones(1, dtype=torch.int32), torch.zeros(16), backend="reference")
