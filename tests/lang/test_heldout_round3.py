"""Round 3 of held-out kernels (after test_heldout_kernels.py and test_heldout_round2.py): kernels an ML engineer
would write with the tile language, run on the reference executor and Triton's interpreter against float64 torch,
outputs poisoned first (NaN, or an integer no result can be), then compiled for Hopper (sm_90a) on this CPU.

A fused SwiGLU projection (two accumulators in one K loop, biases in the epilogue), group norm over a 4-D
(N, G, C/G, HW) view, layer norm's dW/dB by atomic column sums, log-softmax with a runtime temperature over rows
wider than a tile, cross-entropy with label smoothing and ignore_index, a causal depthwise conv1d (Mamba's short
conv) on a 3-D grid reading rows before the sequence start, a 3x3 box blur whose halo tiles lie at negative tile
coordinates, a top-1 MoE router with a one-hot gather and per-expert counts, masked mean pooling over NaN-padded
sequences, int8 per-row dynamic quantization (round half to even, clamp) and its dequantization, row statistics
carried in f64, i32 and the input's own dtype at once, a GEMM with per-row and per-column scales, where/compare
over operands of mixed dtypes (a runtime float chosen into an integer tile too), float -> integer conversions past the
integer's range, exp/log at the edges of each float format (bf16 subnormals in and out), the sign of a negated zero,
and float scalars meeting f32 work as f32s.

Bugs these found, fixed in the compiler, each kept here as its regression test: float -> int conversions that wrapped
in the Triton interpreter and (into i8) on the GPU, and 2**63 wrapping in the reference; where into integer tiles
computing in f32 (and Gluon storing that f32 into an integer buffer); integer-vs-float compares exact in the reference
but f32 in Triton; float scalars used in float64 by the reference; bf16 subnormals garbled by Triton's interpreter;
neg(+0.0) = +0.0 on Triton and Gluon.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, FLOATS, I8, I32, I64, close, ints, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts

POISON = -99                      # no integer result below can be this
ROUND_MAGIC = 1.5 * 2.0**23       # x + MAGIC - MAGIC rounds an f32 |x| < 2**22 to an integer, half to even
INT8_MAX = 127


# ---- 1. SwiGLU projection: silu(X @ Wg + bg) * (X @ Wu + bu), two accumulators fed by one K loop -------------------
@ts.kernel(grid=lambda Y, BM, BN: (ts.cdiv(Y.shape[0], BM), ts.cdiv(Y.shape[1], BN)))
def swiglu_linear(X, Wg, Wu, Bg, Bu, Y, *, BM: int = 16, BN: int = 16, BK: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.SharedTile[X.dtype, BM, BK]()
    wg = ts.SharedTile[Wg.dtype, BK, BN]()
    wu = ts.SharedTile[Wu.dtype, BK, BN]()
    g = ts.RegTile[ts.f32, BM, BN]()
    u = ts.RegTile[ts.f32, BM, BN]()
    bg = ts.RegVec[ts.f32, BN]()
    bu = ts.RegVec[ts.f32, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(g)
    ts.zero(u)
    for k in ts.range(ts.cdiv(X.shape[1], BK)):
        ts.load(x, X, at=(i, k))
        ts.load(wg, Wg, at=(k, j))
        ts.load(wu, Wu, at=(k, j))
        ts.mma_AB(g, x, wg, g)
        ts.mma_AB(u, x, wu, u)
    ts.load(bg, Bg, at=(j,))
    ts.load(bu, Bu, at=(j,))
    ts.add_col(g, g, bg)
    ts.add_col(u, u, bu)
    ts.sigmoid(s, g)
    ts.store(Y, g * s * u, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("M", "N", "K"), [(16, 16, 16), (37, 29, 45), (0, 16, 16)])
def test_swiglu_linear(backend, dt, M, N, K, rng):
    dtype = FLOATS[dt]
    x, wg, wu = randn(rng, M, K, dtype=dtype), randn(rng, K, N, dtype=dtype) / 4, randn(rng, K, N, dtype=dtype) / 4
    bg, bu = randn(rng, N), randn(rng, N, dtype=dtype)
    bg[:3] = torch.tensor([-300.0, 300.0, 0.0])                 # silu of a large negative is -0, of a large positive x
    y = torch.full((M, N), math.nan, dtype=dtype)
    launch(swiglu_linear, backend, x, wg, wu, bg, bu, y)
    g = x.double() @ wg.double() + bg.double()
    want = F.silu(g) * (x.double() @ wu.double() + bu.double())
    close(y, want, scale=300.0)        # columns 0 and 1 scale u's rounding (of a sum that may cancel) by up to 300
    assert not torch.isnan(y).any()


# ---- 2. group norm over (N, G, C/G, HW): two passes per (n, g) program, a group's sum from a row sum broadcast -----
def _group_total(v, BC: int):
    """The sum of the (BC,) vector ``v`` in every element of a (BC,) vector (a row sum of v broadcast down)."""
    t = ts.RegTile[ts.f32, BC, BC]()
    out = ts.RegVec[ts.f32, BC]()
    ts.zero(t)
    ts.add_col(t, t, v)
    ts.row_sum(out, t)
    return out


@ts.kernel(grid=lambda X: (X.shape[1], X.shape[0]))
def group_norm(X, W, B, Y, eps: float, *, BC: int = 8, BL: int = 16):
    """Y[n, g] = (X[n, g] - mean) / sqrt(var + eps) * W[g, c] + B[g, c] over each (C/G, HW) group; C/G <= BC."""
    g, n = ts.block_id(0), ts.block_id(1)
    cg, hw = X.shape[2], X.shape[3]
    x = ts.RegTile[ts.f32, BC, BL]()
    acc = ts.RegVec[ts.f32, BC]()
    w = ts.RegVec[ts.f32, BC]()
    b = ts.RegVec[ts.f32, BC]()
    count = cg * hw
    ts.zero(acc)
    for k in ts.range(ts.cdiv(hw, BL)):
        ts.load(x, X, at=(n, g, 0, k))
        ts.row_sum(acc, x, acc)                       # padding reads as 0
    mean = _group_total(acc, BC)
    ts.div(mean, mean, count)
    ts.zero(acc)
    for k in ts.range(ts.cdiv(hw, BL)):
        ts.load(x, X, at=(n, g, 0, k))
        ts.sub_row(x, x, mean)
        ts.right_fill(x, x, hw - k * BL, 0.0)         # padding is -mean now: masked out of the variance
        ts.lower_fill(x, x, cg, 0.0)
        ts.row_sum(acc, x * x, acc)
    rstd = _group_total(acc, BC)
    ts.div(rstd, rstd, count)
    ts.add(rstd, rstd, eps)
    ts.rsqrt(rstd, rstd)
    ts.load(w, W, at=(g, 0))
    ts.load(b, B, at=(g, 0))
    ts.mul(w, w, rstd)
    for k in ts.range(ts.cdiv(hw, BL)):
        ts.load(x, X, at=(n, g, 0, k))
        ts.sub_row(x, x, mean)
        ts.mul_row(x, x, w)
        ts.add_row(x, x, b)
        ts.store(Y, x, at=(n, g, 0, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("N", "G", "CG", "H", "W"), [(2, 2, 8, 4, 4), (1, 3, 3, 5, 7), (0, 2, 4, 3, 3)])
def test_group_norm(backend, dt, N, G, CG, H, W, rng):
    dtype = FLOATS[dt]
    x = (randn(rng, N, G * CG, H, W) * 3 + 100).to(dtype)   # an offset a one-pass variance would lose in f32
    w, b = randn(rng, G * CG), randn(rng, G * CG)
    y = torch.full((N, G, CG, H * W), math.nan, dtype=dtype)
    launch(group_norm, backend, x.view(N, G, CG, H * W), w.view(G, CG), b.view(G, CG), y, 1e-5)
    want = F.group_norm(x.double(), G, w.double(), b.double(), eps=1e-5).view(N, G, CG, H * W)
    close(y, want, scale=4.0)


# ---- 3. layer norm backward, dW and dB: per-block column sums added atomically across row blocks -------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def layernorm_dwdb(DY, X, Mean, Rstd, DW, DB, *, BM: int = 16, BN: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    dy = ts.RegTile[ts.f32, BM, BN]()
    x = ts.RegTile[ts.f32, BM, BN]()
    mu = ts.RegVec[ts.f32, BM]()
    rs = ts.RegVec[ts.f32, BM]()
    dw = ts.RegVec[ts.f32, BN]()
    db = ts.RegVec[ts.f32, BN]()
    ts.load(dy, DY, at=(i, j))
    ts.load(x, X, at=(i, j))
    ts.load(mu, Mean, at=(i,))
    ts.load(rs, Rstd, at=(i,))
    ts.sub_row(x, x, mu)
    ts.mul_row(x, x, rs)                              # x_hat
    ts.col_sum(dw, dy * x)
    ts.col_sum(db, dy)
    ts.atomic_add(DW, dw, at=(j,))
    ts.atomic_add(DB, db, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdt", "odt"), [("f32", torch.float64), ("bf16", torch.float32), ("f16", torch.float32)])
@pytest.mark.parametrize(("M", "N"), [(16, 16), (53, 37), (0, 5)])
def test_layernorm_dw_db(backend, xdt, odt, M, N, rng):
    dtype = FLOATS[xdt]
    x, dy = randn(rng, M, N, dtype=dtype) * 2 + 1, randn(rng, M, N, dtype=dtype)
    xd = x.double().requires_grad_(False)
    mean = xd.mean(1) if M else torch.zeros(0, dtype=torch.float64)
    rstd = (xd.var(1, unbiased=False) + 1e-5).rsqrt() if M else torch.zeros(0, dtype=torch.float64)
    dw, db = torch.zeros(N, dtype=odt), torch.zeros(N, dtype=odt)
    launch(layernorm_dwdb, backend, dy, x, mean.float(), rstd.float(), dw, db)
    w = torch.ones(N, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    F.layer_norm(xd, (N,), w, bias, eps=1e-5).backward(dy.double())
    torch.testing.assert_close(dw.double(), w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), bias.grad, rtol=1e-5, atol=1e-5)


# ---- 4. log-softmax with a runtime temperature, online over rows wider than a tile; -inf logits and empty rows ------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def log_softmax_t(X, Y, temperature: float, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    inv_t = 1.0 / temperature
    x = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    none = ts.RegVec[ts.bool_, BM]()
    s = ts.RegVec[ts.f32, BM]()
    ts.neg_infty(m)
    ts.zero(s)
    for k in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, k))
        ts.mul(x, x, inv_t)
        ts.right_fill(x, x, n - k * BN, -math.inf)
        ts.row_max(m_new, x, m)
        ts.eq(none, m_new, -math.inf)                 # nothing finite yet: shift by 0, not by -inf (-inf - -inf)
        ts.where(safe, none, 0.0, m_new)
        ts.sub(m, m, safe)
        ts.exp(m, m)
        ts.mul(s, s, m)
        ts.sub_row(x, x, safe)
        ts.exp(x, x)
        ts.row_sum(s, x, s)
        ts.copy(m, m_new)
    ts.eq(none, m, -math.inf)
    ts.where(safe, none, 0.0, m)
    ts.log(s, s)
    ts.add(s, s, safe)                                # logsumexp of the row (-inf if every logit is -inf)
    for k in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, k))
        ts.mul(x, x, inv_t)
        ts.sub_row(x, x, s)
        ts.store(Y, x, at=(i, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("M", "N", "temperature"), [(8, 16, 1.0), (11, 53, 0.5), (5, 37, 7.25), (3, 0, 1.0)])
def test_log_softmax_with_temperature(backend, dt, M, N, temperature, rng):
    dtype = FLOATS[dt]
    x = randn(rng, M, N) * 4
    if N:
        x[0, : N // 2] = -math.inf                     # masked logits, the first tiles all -inf
        x[1] = -math.inf                               # a fully masked row: NaN, as torch gives
        x[2] = randn(rng, N) - (1e30 if dtype is not torch.float16 else 1e4)    # very negative row
        x[-1, N // 3] = 1e30 if dtype is not torch.float16 else 1e4              # one huge logit
    x = x.to(dtype)
    y = torch.full((M, N), math.nan if dtype is torch.float32 else 12.0, dtype=dtype)
    launch(log_softmax_t, backend, x, y, temperature)
    want = torch.log_softmax(x.double() / temperature, dim=1)
    close(y, want, scale=float(x.double()[x.isfinite()].abs().max()) * 1e-3 if N else 1.0)
    assert torch.equal(torch.isnan(y), torch.isnan(want))


# ---- 5. cross-entropy with label smoothing and ignore_index, online over the vocabulary ----------------------------
@ts.kernel(grid=lambda Logits, BM: (ts.cdiv(Logits.shape[0], BM),))
def cross_entropy_ls(Logits, Labels, Loss, ignore_index: int, smoothing: float, *, BM: int = 8, BN: int = 16):
    """Loss[r] = (1 - eps) (lse - x[y]) + eps (lse - mean(x)), 0 where Labels[r] == ignore_index."""
    i = ts.block_id(0)
    V = Logits.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    xm = ts.RegTile[ts.f32, BM, BN]()
    lab = ts.RegVec[Labels.dtype, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    tgt = ts.RegVec[ts.f32, BM]()
    tot = ts.RegVec[ts.f32, BM]()
    keep = ts.RegVec[ts.bool_, BM]()
    ts.load(lab, Labels, at=(i,))
    ts.neg_infty(m)
    ts.zero(s)
    ts.zero(tgt)
    ts.zero(tot)
    for k in ts.range(ts.cdiv(V, BN)):
        ts.load(x, Logits, at=(i, k))
        ts.arange(cols, k * BN)
        ts.eq(hit, ts.per_col(cols), ts.per_row(lab))   # i32 columns against i64 (or i32) labels
        ts.where(xm, hit, x, 0.0)
        ts.row_sum(tgt, xm, tgt)                       # the label's logit
        ts.row_sum(tot, x, tot)                        # padding reads as 0
        ts.right_fill(xm, x, V - k * BN, -math.inf)
        ts.row_max(m_new, xm, m)
        ts.sub(m, m, m_new)
        ts.exp(m, m)
        ts.mul(s, s, m)
        ts.sub_row(xm, xm, m_new)
        ts.exp(xm, xm)
        ts.row_sum(s, xm, s)
        ts.copy(m, m_new)
    ts.log(s, s)
    ts.add(s, s, m)                                    # logsumexp
    ts.div(tot, tot, V)
    loss = (s - tgt) * (1.0 - smoothing) + (s - tot) * smoothing
    ts.ne(keep, lab, ignore_index)
    ts.where(loss, keep, loss, 0.0)
    ts.store(Loss, loss, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("ldt", [torch.int64, torch.int32])
@pytest.mark.parametrize(("M", "V", "ignore_index", "eps"), [(8, 16, -100, 0.1), (13, 45, 3, 0.0), (5, 7, 0, 0.3)])
def test_cross_entropy_label_smoothing_ignore_index(backend, dt, ldt, M, V, ignore_index, eps, rng):
    dtype = FLOATS[dt]
    x = randn(rng, M, V) * 3
    x[0] = x[0] * 1e3                                  # large magnitudes
    x[1] -= 1e4                                         # a very negative row
    x = x.to(dtype)
    labels = torch.from_numpy(rng.integers(0, V, M)).to(ldt)
    labels[2] = ignore_index if ignore_index >= 0 else -100
    labels[3] = ignore_index
    loss = torch.full((M,), math.nan)
    launch(cross_entropy_ls, backend, x, labels, loss, ignore_index, eps)
    want = F.cross_entropy(x.double(), labels.long(), reduction="none", ignore_index=ignore_index,
                           label_smoothing=eps)
    if ignore_index < 0:
        want[2] = 0.0                                   # -100 is ignored too only when it is the ignore_index
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=2e-2 if x.abs().max() > 1e3 else 1e-4)
    assert (loss[labels == ignore_index] == 0).all()


# ---- 6. causal depthwise conv1d (Mamba's short conv), a 3-D grid, rows before the sequence start read as zero -------
@ts.kernel(grid=lambda X, BT, BD: (ts.cdiv(X.shape[1], BT), ts.cdiv(X.shape[2], BD), X.shape[0]))
def causal_conv1d(X, Wt, Bias, Y, *, TAPS: int = 4, SILU: bool = True, BT: int = 8, BD: int = 16):
    """Y[b, t, d] = act(Bias[d] + sum_k Wt[k, d] X[b, t - TAPS + 1 + k, d]) for X (B, L, D), Wt (TAPS, D)."""
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    taps = [ts.RegVec[ts.f32, BD]() for _ in range(TAPS)]
    for k, w in enumerate(taps):
        ts.load(w, Wt, at=(k, j))
    bias = ts.RegVec[ts.f32, BD]()
    ts.load(bias, Bias, at=(j,))
    xv = ts.RegVec[ts.f32, BD]()
    acc = ts.RegVec[ts.f32, BD]()
    gate = ts.RegVec[ts.f32, BD]()
    for t in ts.range(i * BT, i * BT + BT):
        ts.copy(acc, bias)
        for k, w in enumerate(taps):
            ts.load(xv, X, at=(b, t - (TAPS - 1 - k), j))      # t - 3 < 0 at the start: zeros
            ts.add(acc, acc, xv * w)
        if SILU:
            ts.sigmoid(gate, acc)
            ts.mul(acc, acc, gate)
        ts.store(Y, acc, at=(b, t, j))                 # rows past the sequence end are dropped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize(("B", "L", "D"), [(2, 8, 16), (1, 13, 20), (2, 1, 3), (1, 0, 16)])
def test_causal_conv1d(backend, dt, silu, B, L, D, rng):
    dtype = FLOATS[dt]
    taps = 4
    x, w, bias = randn(rng, B, L, D, dtype=dtype), randn(rng, D, taps, dtype=dtype), randn(rng, D, dtype=dtype)
    y = torch.full((B, L, D), math.nan, dtype=dtype)
    launch(causal_conv1d, backend, x, w.T.contiguous(), bias, y, SILU=silu)
    xp = F.pad(x.double().transpose(1, 2), (taps - 1, 1))                 # (B, D, taps + L): one extra step,
    want = F.conv1d(xp, w.double()[:, None, :], bias.double(), groups=D).transpose(1, 2)[:, :L]   # dropped here
    close(y, F.silu(want) if silu else want, scale=2.0)


# ---- 7. a 3x3 box blur (zero padding) by banded matmuls over the 3x3 neighbouring tiles, halo at negative coords -----
def _band(dst, shift: int, B: int) -> None:
    """dst[p, q] = 1 where |shift * B + p - q| <= 1: input index p of the tile ``shift`` tiles over reaches q."""
    lo = ts.RegVec[ts.i32, B]()
    hi = ts.RegVec[ts.i32, B]()
    q = ts.RegVec[ts.i32, B]()
    near = ts.RegTile[ts.bool_, B, B]()
    far = ts.RegTile[ts.bool_, B, B]()
    ts.arange(lo, shift * B - 1)
    ts.arange(hi, shift * B + 1)
    ts.arange(q)
    ts.le(near, ts.per_row(lo), ts.per_col(q))
    ts.ge(far, ts.per_row(hi), ts.per_col(q))
    ts.logical_and(near, near, far)
    ts.where(dst, near, 1.0, 0.0)


@ts.kernel(grid=lambda X, B: (ts.cdiv(X.shape[0], B), ts.cdiv(X.shape[1], B)))
def box_blur3(X, Y, *, B: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    bands = {d: ts.SharedTile[X.dtype, B, B]() for d in (-1, 0, 1)}    # in X's dtype: 0 and 1 are exact
    bands_f32 = {d: ts.SharedTile[ts.f32, B, B]() for d in (-1, 0, 1)}
    band = ts.RegTile[ts.f32, B, B]()
    for d in bands:
        _band(band, d, B)
        ts.copy(bands_f32[d], band)
        ts.copy(bands[d], band)
    x = ts.SharedTile[X.dtype, B, B]()
    h = ts.RegTile[ts.f32, B, B]()
    acc = ts.RegTile[ts.f32, B, B]()
    ts.zero(acc)
    for di in (-1, 0, 1):
        ts.zero(h)
        for dj in (-1, 0, 1):
            ts.load(x, X, at=(i + di, j + dj))             # tile -1 or past the end: zeros (the padding)
            ts.mma_AB(h, x, bands[dj], h)                    # horizontal 3-sums of row block i + di
        ts.mma_AtB(acc, bands_f32[di], h, acc)               # vertical 3-sums into row block i
    ts.store(Y, acc * (1.0 / 9.0), at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("H", "W"), [(16, 16), (37, 23), (1, 1), (5, 40)])
def test_box_blur_halo(backend, dt, H, W, rng):
    dtype = FLOATS[dt]
    x = randn(rng, H, W, dtype=dtype)
    y = torch.full((H, W), math.nan)
    launch(box_blur3, backend, x, y)
    want = F.conv2d(x.double()[None, None], torch.full((1, 1, 3, 3), 1 / 9, dtype=torch.float64), padding=1)[0, 0]
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


# ---- 8. a top-1 MoE router: softmax, first argmax, the expert's scale row gathered by a one-hot matmul, counts -----
@ts.kernel(grid=lambda Logits, BM: (ts.cdiv(Logits.shape[0], BM),))
def moe_top1(Logits, Scale, X, Idx, Prob, Out, Counts, *, BM: int = 16, BE: int = 16, BD: int = 16):
    """Idx[t] = argmax_e Logits[t, e] (the first), Prob[t] = softmax(Logits[t])[Idx[t]], Out[t] = X[t] * Prob[t] *
    Scale[Idx[t]], Counts[e] += tokens routed to e. E = Logits.shape[1] <= BE."""
    i = ts.block_id(0)
    T, E = Logits.shape[0], Logits.shape[1]
    x = ts.RegTile[ts.f32, BM, BE]()
    cols = ts.RegVec[ts.i32, BE]()
    rows = ts.RegVec[ts.i32, BM]()
    hit = ts.RegTile[ts.bool_, BM, BE]()
    cand = ts.RegTile[ts.i32, BM, BE]()
    m = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.i32, BM]()
    valid = ts.RegVec[ts.bool_, BM]()
    onehot = ts.RegTile[ts.f32, BM, BE]()
    ones = ts.RegTile[ts.i32, BM, BE]()
    counts = ts.RegVec[ts.i32, BE]()
    ts.load(x, Logits, at=(i, 0))
    ts.right_fill(x, x, E, -math.inf)
    ts.arange(cols)
    ts.arange(rows, i * BM)
    ts.row_max(m, x)
    ts.eq(hit, x, ts.per_row(m))
    ts.where(cand, hit, ts.per_col(cols), BE)
    ts.row_min(best, cand)
    ts.store(Idx, best, at=(i,))
    ts.sub_row(x, x, m)
    ts.exp(x, x)
    ts.row_sum(s, x)
    p = 1.0 / s                                       # the top logit's exp(0) = 1 over the sum
    ts.store(Prob, p, at=(i,))
    ts.eq(hit, ts.per_col(cols), ts.per_row(best))
    ts.lt(valid, rows, T)
    ts.logical_and(hit, hit, ts.per_row(valid))
    ts.where(onehot, hit, 1.0, 0.0)
    ts.where(ones, hit, 1, 0)
    ts.col_sum(counts, ones)
    ts.atomic_add(Counts, counts, at=(0,))
    sc = ts.RegTile[ts.f32, BE, BD]()
    xs = ts.RegTile[ts.f32, BM, BD]()
    for k in ts.range(ts.cdiv(X.shape[1], BD)):
        ts.load(sc, Scale, at=(0, k))
        ts.load(xs, X, at=(i, k))
        gathered = onehot @ sc                        # row t: Scale[Idx[t]]
        ts.mul(xs, xs, gathered)
        ts.mul_row(xs, xs, p)
        ts.store(Out, xs, at=(i, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize(("T", "E", "D"), [(16, 8, 16), (13, 6, 20), (3, 1, 5)])
def test_moe_top1_router(backend, dt, T, E, D, rng):
    dtype = FLOATS[dt]
    logits = torch.from_numpy(rng.integers(-3, 3, (T, E)).astype(np.float32)).to(dtype)   # ties: the first wins
    logits[0] = -1e30 if T > 1 else logits[0]          # all equal: expert 0
    scale, x = randn(rng, E, D), randn(rng, T, D, dtype=dtype)
    idx = torch.full((T,), POISON, dtype=torch.int32)
    prob, out = torch.full((T,), math.nan), torch.full((T, D), math.nan, dtype=dtype)
    counts = torch.zeros(E, dtype=torch.int32)
    launch(moe_top1, backend, logits, scale, x, idx, prob, out, counts)
    lg = logits.double()
    want_idx = torch.from_numpy(np.argmax(lg.numpy(), axis=1))      # NumPy's argmax: the first maximum
    assert torch.equal(idx.long(), want_idx)
    want_p = torch.softmax(lg, 1).gather(1, want_idx[:, None])[:, 0]
    torch.testing.assert_close(prob.double(), want_p, rtol=1e-6, atol=1e-7)
    close(out, x.double() * want_p[:, None] * scale.double()[want_idx])
    assert torch.equal(counts.long(), torch.bincount(want_idx, minlength=E))


# ---- 9. masked mean pooling over a padded batch of sequences: padding holds NaN and inf, never read into the sum ----
@ts.kernel(grid=lambda X, BD: (ts.cdiv(X.shape[2], BD), X.shape[0]))
def masked_mean(X, Mask, Out, *, BL: int = 8, BD: int = 16):
    """Out[b, d] = sum_t Mask[b, t] X[b, t, d] / max(sum_t Mask[b, t], 1)."""
    j, b = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BL, BD]()
    keep = ts.RegVec[ts.bool_, BL]()
    ones = ts.RegTile[ts.f32, BL, BD]()
    acc = ts.RegVec[ts.f32, BD]()
    n = ts.RegVec[ts.f32, BD]()
    ts.zero(acc)
    ts.zero(n)
    for k in ts.range(ts.cdiv(X.shape[1], BL)):
        ts.load(x, X, at=(b, k, j))
        ts.load(keep, Mask, at=(b, k))
        ts.where(x, ts.per_row(keep), x, 0.0)          # not x * mask: NaN * 0 is NaN
        ts.col_sum(acc, x, acc)
        ts.where(ones, ts.per_row(keep), 1.0, 0.0)
        ts.col_sum(n, ones, n)
    ts.max(n, n, 1.0)
    ts.store(Out, acc / n, at=(b, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("mdt", [torch.int8, torch.int32, torch.float32])
@pytest.mark.parametrize(("B", "L", "D"), [(3, 8, 16), (4, 19, 21), (2, 0, 5)])
def test_masked_mean_pooling(backend, dt, mdt, B, L, D, rng):
    dtype = FLOATS[dt]
    x = randn(rng, B, L, D, dtype=dtype)
    lengths = torch.from_numpy(rng.integers(0, L + 1, B))
    lengths[0] = L
    lengths[-1] = 0                                     # an all-padding sequence: 0
    mask = torch.arange(L)[None, :] < lengths[:, None]
    pad = torch.from_numpy(rng.random((int((~mask).sum()), D)) < 0.5)
    x[~mask] = torch.where(pad, math.nan, -math.inf).to(dtype)
    out = torch.full((B, D), math.nan, dtype=dtype)
    launch(masked_mean, backend, x, mask.to(mdt), out)
    xd = torch.where(mask[..., None], x.double(), 0.0)
    want = xd.sum(1) / lengths.clamp_min(1).double()[:, None]
    close(out, want)


# ---- 10. int8 per-row dynamic quantization (absmax, round half to even, clamp) and its dequantization ---------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def quantize_rows(X, Q, Scale, *, BM: int = 8, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    ax = ts.RegTile[ts.f32, BM, BN]()
    amax = ts.RegVec[ts.f32, BM]()
    inv = ts.RegVec[ts.f32, BM]()
    zero_row = ts.RegVec[ts.bool_, BM]()
    q = ts.RegTile[ts.i8, BM, BN]()
    ts.zero(amax)
    for k in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, k))
        ts.abs(ax, x)
        ts.row_max(amax, ax, amax)
    ts.store(Scale, amax * (1.0 / INT8_MAX), at=(i,))
    ts.eq(zero_row, amax, 0.0)
    ts.where(inv, zero_row, 0.0, INT8_MAX / amax)
    for k in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, k))
        ts.mul_row(x, x, inv)
        ts.add(x, x, ROUND_MAGIC)                     # rounds to an integer, half to even (f32 has 23 bits)
        ts.sub(x, x, ROUND_MAGIC)
        ts.min(x, x, float(INT8_MAX))
        ts.max(x, x, float(-INT8_MAX))
        ts.copy(q, x)
        ts.store(Q, q, at=(i, k))


@ts.kernel(grid=lambda Q, BM, BN: (ts.cdiv(Q.shape[0], BM), ts.cdiv(Q.shape[1], BN)))
def dequantize_rows(Q, Scale, Y, *, BM: int = 8, BN: int = 32):
    i, j = ts.block_id(0), ts.block_id(1)
    q = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(i, j))                          # i8 -> f32 on load
    ts.load(s, Scale, at=(i,))
    ts.mul_row(q, q, s)
    ts.store(Y, q, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("M", "N"), [(8, 32), (13, 75), (0, 9)])
def test_int8_rowwise_quantize_dequantize(backend, dt, M, N, rng):
    dtype = FLOATS[dt]
    x = randn(rng, M, N) * 3
    if M:
        x[0] = 0.0                                      # scale 0: all zeros, no NaN
        x[1, :] = torch.linspace(-INT8_MAX, INT8_MAX, N).round() + 0.5     # exact halves: to even
        x[1, 0] = INT8_MAX + 0.5 if N > 1 else x[1, 0]
        x[2] *= 1e30 if dtype is not torch.float16 else 1e3
        x[3] *= 1e-30 if dtype is not torch.float16 else 1e-3
    x = x.to(dtype)
    q, scale = torch.full((M, N), POISON, dtype=torch.int8), torch.full((M,), math.nan)
    launch(quantize_rows, backend, x, q, scale)
    xf = x.float()
    amax = xf.abs().amax(1) if N else torch.zeros(M)
    torch.testing.assert_close(scale.double(), amax.double() / INT8_MAX, rtol=2**-23, atol=0)
    inv = torch.where(amax == 0, 0.0, torch.full_like(amax, INT8_MAX) / amax)   # (127 / t is 127 * (1 / t) in torch)
    want_q = (xf * inv[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    assert torch.equal(q, want_q)
    y = torch.full((M, N), math.nan, dtype=dtype)
    launch(dequantize_rows, backend, q, scale, y)
    close(y, q.double() * scale.double()[:, None])


# ---- 11. row statistics with accumulators of three dtypes carried through one loop: f64 sum, i32 count, max in the --
# input's own dtype (f32 sums of 3e38 would overflow; a bf16 max stays bf16)
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_stats(X, Sum, Count, Max, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[X.dtype, BM, BN]()
    x64 = ts.RegTile[ts.f64, BM, BN]()
    pos = ts.RegTile[ts.bool_, BM, BN]()
    one = ts.RegTile[ts.i32, BM, BN]()
    total = ts.RegVec[ts.f64, BM]()
    count = ts.RegVec[ts.i32, BM]()
    mx = ts.RegVec[X.dtype, BM]()
    ts.zero(total)
    ts.zero(count)
    ts.neg_infty(mx)
    for k in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, k))
        ts.copy(x64, x)
        ts.row_sum(total, x64, total)
        ts.gt(pos, x, 0.0)
        ts.where(one, pos, 1, 0)
        ts.row_sum(count, one, count)
        ts.right_fill(x, x, n - k * BN, -math.inf)
        ts.row_max(mx, x, mx)
    ts.store(Sum, total, at=(i,))
    ts.store(Count, count, at=(i,))
    ts.store(Max, mx, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 45), (4, 0)])
def test_row_stats_mixed_dtype_accumulators(backend, dt, M, N, rng):
    dtype = FLOATS[dt]
    big = torch.finfo(dtype).max / 2
    x = randn(rng, M, N)
    if N > 2:
        x[0, :3] = torch.tensor([big, big, -big])        # f64 sum: big (an f32 or f16 sum overflows)
        x[1, N // 2] = math.nan                          # NaN: sum and max NaN, not counted as positive
        x[2] = -math.inf
        x[3, :2] = torch.tensor([1e-40, -3e-39])         # bf16/f32 subnormals summed exactly in f64
    x = x.to(dtype)
    total, mx = torch.full((M,), math.nan, dtype=torch.float64), torch.full((M,), 7.0, dtype=dtype)
    count = torch.full((M,), POISON, dtype=torch.int64)
    launch(row_stats, backend, x, total, count, mx)
    xd = x.double()
    torch.testing.assert_close(total, xd.sum(1), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(count, (xd > 0).sum(1))
    want_max = xd.amax(1) if N else torch.full((M,), -math.inf, dtype=torch.float64)
    torch.testing.assert_close(mx.double(), want_max, rtol=0, atol=0, equal_nan=True)


# ---- 12. f16 GEMM (A @ B^T) with a per-row and a per-column scale in the epilogue, bf16 out ------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def scaled_gemm(A, B, Sa, Sb, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """C = (A @ B^T) * Sa[:, None] * Sb[None, :] (A (M, K), B (N, K)), clipped to +-Sa[r] * Sb[c] * 1e4."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    sa = ts.RegVec[ts.f32, BM]()
    sb = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(j, k))
        ts.mma_ABt(acc, a, b, acc)
    ts.load(sa, Sa, at=(i,))
    ts.load(sb, Sb, at=(j,))
    ts.mul(acc, acc, ts.per_row(sa))
    ts.mul(acc, acc, ts.per_col(sb))
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize(("M", "N", "K"), [(16, 16, 32), (29, 35, 41)])
def test_scaled_gemm_row_and_column_scales(backend, dt, M, N, K, rng):
    dtype = FLOATS[dt]
    a, b = randn(rng, M, K, dtype=dtype), randn(rng, N, K, dtype=dtype)
    sa, sb = torch.rand(M) + 0.1, torch.rand(N) * 100
    c = torch.full((M, N), math.nan, dtype=BF)
    launch(scaled_gemm, backend, a, b, sa, sb, c)
    want = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :]
    close(c, want, scale=100.0)


# ---- 13. where and compare over operands of mixed dtypes: a bf16 tile or an i32 one into f32/i32/f16 -------------
@ts.kernel(grid=lambda A: (1,))
def select_mixed(A, Bi, R, C, Y, Z, *, M: int = 8, N: int = 16):
    """Y = where(R[r] > C[c], A, Bi) and Z = where(A < Bi, R[r], C[c]), each in Y's / Z's dtype."""
    a = ts.RegTile[A.dtype, M, N]()
    bi = ts.RegTile[Bi.dtype, M, N]()
    r = ts.RegVec[R.dtype, M]()
    c = ts.RegVec[C.dtype, N]()
    m = ts.RegTile[ts.bool_, M, N]()
    y = ts.RegTile[Y.dtype, M, N]()
    z = ts.RegTile[Z.dtype, M, N]()
    ts.load(a, A, at=(0, 0))
    ts.load(bi, Bi, at=(0, 0))
    ts.load(r, R, at=(0,))
    ts.load(c, C, at=(0,))
    ts.gt(m, ts.per_row(r), ts.per_col(c))
    ts.where(y, m, a, bi)
    ts.store(Y, y, at=(0, 0))
    ts.lt(m, a, bi)
    ts.where(z, m, ts.per_row(r), ts.per_col(c))
    ts.store(Z, z, at=(0, 0))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 or int64 values as ``dtype`` holds them: floats into integers truncated and saturated, NaN as 0."""
    if dtype.is_floating_point:
        return x.to(dtype)
    info = torch.iinfo(dtype)
    vals = [0 if math.isnan(v) else info.max if v >= -info.min else info.min if v <= info.min else int(v)
            for v in x.double().flatten().tolist()]
    return torch.tensor(vals, dtype=dtype).view(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("adt", "bdt"), [(BF, torch.int32), (torch.float32, torch.int32), (torch.float16, BF),
                                         (torch.int32, torch.int8)])
@pytest.mark.parametrize("ydt", [torch.float32, torch.int32, torch.float16, BF])
def test_where_and_compare_with_mixed_dtypes(backend, adt, bdt, ydt, rng):
    M, N = 8, 16
    a = (randn(rng, M, N) * 1e3).to(adt) if adt.is_floating_point else ints(rng, -128, 128, (M, N), adt)
    bi = ints(rng, -3000, 3000, (M, N), bdt) if bdt is not torch.int8 else ints(rng, -128, 128, (M, N), bdt)
    if bdt is torch.int32:
        bi[0, :4] = torch.tensor([2**24 + 1, -(2**24) - 3, 2**31 - 1, -(2**31)], dtype=bdt)
        if adt is torch.float32:
            a[0, 0] = 2.0**24                            # equal to 2**24 + 1 once that is an f32: not less
    r, c = randn(rng, M) * 3, torch.from_numpy(rng.integers(-3, 4, N)).to(torch.int32)
    r[:2] = torch.tensor([1.0, -1.0])                   # ties with the integers: not greater
    y, z = torch.full((M, N), 7, dtype=ydt), torch.full((M, N), 7, dtype=ydt)
    launch(select_mixed, backend, a, bi, r, c, y, z)
    ad, bd = a.double(), bi.double() if bdt.is_floating_point else bi.long()
    m = r.double()[:, None] > c.double()[None, :]
    assert torch.equal(y, torch.where(m, _as(ad, ydt), _as(bd, ydt)))
    both_int = not (adt.is_floating_point or bdt.is_floating_point)
    lt = ad < bd if both_int else ad < bd.float().double()          # compared in f32, their work dtype, if not ints
    assert torch.equal(z, torch.where(lt, _as(r.double()[:, None].expand(M, N), ydt),
                                      _as(c.double()[None, :].expand(M, N), ydt)))


# ---- 13a. integer vectors and index scalars in f32 work are converted to f32 first, as the GPU converts them ---------
@ts.kernel(grid=lambda X: (1,))
def ints_into_f32_work(X, V, W, Y, *, R: int = 4, C: int = 16):
    """Y = (X + V[r]) * W[c] + (rows * 4194305 + 1), all in f32: V (R,) i32 and W (C,) i64 past 2**24."""
    x = ts.RegTile[ts.f32, R, C]()
    v = ts.RegVec[V.dtype, R]()
    w = ts.RegVec[W.dtype, C]()
    ts.load(x, X, at=(0, 0))
    ts.load(v, V, at=(0,))
    ts.load(w, W, at=(0,))
    ts.add_row(x, x, v)
    ts.mul_col(x, x, w)
    ts.add(x, x, X.shape[0] * 4194305 + 1)           # an index scalar: 16777221, not an f32
    ts.store(Y, x, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_operands_of_f32_work_are_f32(backend, rng):
    R, C = 4, 16
    x = torch.from_numpy(rng.random((R, C))).float() + 0.5
    v = torch.tensor([2**24 + 1, -(2**24) - 3, 2**31 - 1, 7], dtype=torch.int32)
    w = torch.from_numpy(rng.integers(-3, 4, C)).long()
    w[:3] = torch.tensor([2**40 + 1, 1, -(2**25) - 1])
    y = torch.full((R, C), math.nan)
    launch(ints_into_f32_work, backend, x, v, w, y)
    n32 = torch.tensor(R * 4194305 + 1, dtype=torch.float32)
    assert torch.equal(y, (x + v.float()[:, None]) * w.float()[None, :] + n32)      # each step rounded to f32


# ---- 13a'. f32 work into an i32 or f16 tile: the f32 result is converted (rounded twice, as on the GPU) -------------
@ts.kernel(grid=lambda X: (1,))
def f32_work_into_narrow(X, V, Y, Z, *, R: int = 4, C: int = 16):
    x = ts.RegTile[X.dtype, R, C]()
    v = ts.RegVec[V.dtype, R]()
    y = ts.RegTile[Y.dtype, R, C]()
    z = ts.RegTile[Z.dtype, R, C]()
    ts.load(x, X, at=(0, 0))
    ts.load(v, V, at=(0,))
    ts.add_row(y, x, v)                              # f32 sum, then truncated into Y's integers
    ts.div_row(z, x, v)                              # f32 quotient, then rounded into Z's f16
    ts.store(Y, y, at=(0, 0))
    ts.store(Z, z, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", [BF, torch.float16, torch.float32])
def test_f32_work_then_converted_into_narrower_tiles(backend, xdt, rng):
    R, C = 4, 16
    x = torch.from_numpy(rng.standard_normal((R, C)) * 100).to(xdt)
    x[0, :2] = torch.tensor([2.0**24 if xdt is not torch.float16 else 2.0**14, 0.0999755859375])
    v = torch.tensor([1.5, 0.1, -3.0, 7.0])
    y, z = torch.full((R, C), POISON, dtype=torch.int32), torch.full((R, C), math.nan, dtype=torch.float16)
    launch(f32_work_into_narrow, backend, x, v, y, z)
    assert torch.equal(y, (x.float() + v[:, None]).trunc().to(torch.int32))   # 2**24 + 1.5 is 16777218 in f32
    assert torch.equal(z, (x.float() / v[:, None]).to(torch.float16))


# ---- 13b. a runtime float chosen into an integer tile: truncated and saturated (NaN as 0), as a float tile is ----
@ts.kernel(grid=lambda X: (1,))
def where_float_into_int(X, Y, a: float, *, N: int = 16):
    x = ts.RegVec[X.dtype, N]()
    pos = ts.RegVec[ts.bool_, N]()
    ts.load(x, X, at=(0,))
    ts.gt(pos, x, 0)
    ts.where(x, pos, a, x)
    ts.store(Y, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("a", [2.7, -2.7, 1e10, -1e10, math.nan, math.inf])
def test_where_float_scalar_into_integer_tile(backend, dt, a, rng):
    x = torch.from_numpy(rng.integers(-100, 100, 16)).to(dt)
    y = torch.full((16,), POISON, dtype=dt)
    launch(where_float_into_int, backend, x, y, a)
    a32 = torch.tensor([a], dtype=torch.float32).double()            # the scalar meets the work as an f32
    assert torch.equal(y, torch.where(x > 0, _as(a32, dt).expand(16), x))


# ---- 14. float -> integer conversions saturate (NaN -> 0), as the GPU's cvt.rzi.sat: f32/bf16/f16 into i8/i32/i64 ---
@ts.kernel(grid=lambda X: (1,))
def to_int(X, Y, *, N: int = 32):
    x = ts.RegVec[X.dtype, N]()
    y = ts.RegVec[Y.dtype, N]()
    ts.load(x, X, at=(0,))
    ts.copy(y, x)
    ts.store(Y, y, at=(0,))


SPECIAL = [math.nan, math.inf, -math.inf, 1e10, -1e10, 3e9, -3e9, 300.5, -300.5, 127.9, -128.9, 128.0, -129.0,
           2.5, -2.5, 0.0, -0.0, 1.0, 65504.0, -65504.0, 2.0**31, -(2.0**31), 2.0**63, -(2.0**63), 1e30, -1e30,
           0.999, -0.999, 16777216.0, 255.0, -1.5, 3.0e38]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", FLOATS)
@pytest.mark.parametrize("ydt", [torch.int8, torch.int32, torch.int64])
def test_float_to_int_conversions_saturate(backend, xdt, ydt):
    x = torch.tensor(SPECIAL, dtype=torch.float64).to(FLOATS[xdt])
    y = torch.full((32,), POISON, dtype=ydt)
    launch(to_int, backend, x, y)
    assert y.tolist() == _as(x.double(), ydt).tolist()


# ---- 15. exp and log at the edges of each format: softplus and log-sigmoid in stable form, exp rounded into the ----
# output's dtype (overflowing to inf past its largest value), log of subnormals
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def exp_edges(X, Softplus, LogSig, Exp, Log, *, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    t = ts.RegVec[ts.f32, BN]()
    e = ts.RegVec[Exp.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.abs(t, x)
    ts.neg(t, t)
    ts.exp(t, t)
    ts.add(t, t, 1.0)
    ts.log(t, t)                                      # log(1 + exp(-|x|)) in (0, log 2]
    sp = ts.RegVec[ts.f32, BN]()
    ts.relu(sp, x)
    ts.store(Softplus, sp + t, at=(i,))
    ls = ts.RegVec[ts.f32, BN]()
    ts.min(ls, x, 0.0)
    ts.store(LogSig, ls - t, at=(i,))
    ts.exp(e, x)
    ts.store(Exp, e, at=(i,))
    ts.abs(t, x)
    ts.log(t, t)
    ts.store(Log, t, at=(i,))


EDGES = {   # values around where exp overflows or underflows each format
    torch.float32: [88.7, 88.8, -87.3, -103.0, -104.0, 1e4, -1e4, 1e-45, 1e-38, 3e38],
    torch.float16: [11.08, 11.1, -9.7, -16.6, -17.4, 6e4, -6e4, 6e-8, 6.1e-5, 65504.0],
    torch.bfloat16: [88.5, 89.0, -87.3, -92.0, -93.0, 1e4, -1e4, 1e-38, 1e-40, 3e38],   # subnormal in and out
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
def test_exp_and_log_at_the_edges_of_each_format(backend, dt, rng):
    dtype = FLOATS[dt]
    vals = torch.tensor(EDGES[dtype] + [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0], dtype=torch.float64)
    x = torch.cat([vals, torch.from_numpy(rng.standard_normal(23) * 20)]).to(dtype)
    n = x.numel()
    sp, ls, lg = (torch.full((n,), 3.0, dtype=dtype) for _ in range(3))
    ex = torch.full((n,), 3.0, dtype=dtype)
    launch(exp_edges, backend, x, sp, ls, ex, lg)
    xd = x.double()
    close(sp, F.softplus(xd))
    close(ls, F.logsigmoid(xd))
    want_exp = xd.exp().to(dtype).double()             # the f64 exp rounded once into the format
    assert torch.equal(torch.isinf(ex), torch.isinf(want_exp)) and torch.equal(ex == 0, want_exp == 0)
    close(ex, want_exp)
    close(lg, xd.abs().log())


# ---- 15a. negation flips the sign of zero (Triton's unary minus, 0 - x, does not): 1 / neg(+-0) is -+inf ---------
@ts.kernel(grid=lambda X: (1,))
def neg_recip(X, Y, *, N: int = 8):
    x = ts.RegVec[X.dtype, N]()
    ts.load(x, X, at=(0,))
    ts.neg(x, x)
    ts.store(Y, 1.0 / x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", FLOATS)
def test_neg_flips_the_sign_of_zero(backend, dt):
    x = torch.tensor([0.0, -0.0, 2.0, -4.0, math.inf, -math.inf, math.nan, 1.0], dtype=FLOATS[dt])
    y = torch.full((8,), 3.0, dtype=FLOATS[dt])
    launch(neg_recip, backend, x, y)
    want = 1.0 / -x.double()
    torch.testing.assert_close(y.double(), want.to(FLOATS[dt]).double(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y[:6]), torch.signbit(want[:6]))


# ---- 15b. a float scalar (an argument or a constant) meets f32 work as an f32, as Triton converts it: the reference --
# and Triton agree bit for bit on x * a + 0.1 and on x > 0.1 at x = f32(0.1); f64 work takes both as they are
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def float_scalars(X, Y, Above, Y64, a: float, *, BN: int = 64):
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    above = ts.RegVec[ts.bool_, BN]()
    x64 = ts.RegVec[ts.f64, BN]()
    ts.load(x, X, at=(i,))
    ts.store(Y, x * a + 0.1, at=(i,))
    ts.gt(above, x, 0.1)
    flag = ts.RegVec[ts.f32, BN]()
    ts.where(flag, above, 1.0, 0.0)
    ts.store(Above, flag, at=(i,))
    ts.copy(x64, x)
    ts.store(Y64, x64 * 0.1 + a, at=(i,))              # f64 work: scalars as they are


@pytest.mark.parametrize("a", [0.7, 1e-3, 3.0])
def test_float_scalars_are_f32_on_every_backend(a, rng):
    N = 200
    x = torch.from_numpy(rng.random(N) * 10).float()
    x[0] = torch.tensor(0.1, dtype=torch.float32)          # above 0.1 in f64, equal to it in f32
    outs = {}
    for backend in BACKENDS:
        y, above, y64 = torch.full((N,), math.nan), torch.full((N,), math.nan), torch.full((N,), math.nan,
                                                                                        dtype=torch.float64)
        launch(float_scalars, backend, x, y, above, y64, a)
        outs[backend] = (y, above, y64)
    for got, want in zip(outs["reference"], outs["triton"], strict=True):
        assert torch.equal(got, want)
    f32 = torch.float32
    a32, tenth = torch.tensor(a, dtype=f32), torch.tensor(0.1, dtype=f32)
    y, above, y64 = outs["reference"]
    assert torch.equal(y, x * a32 + tenth)                                       # each op rounded to f32
    assert above[0] == 0 and torch.equal(above, (x > tenth).float())
    torch.testing.assert_close(y64, x.double() * 0.1 + a, rtol=1e-15, atol=0)


# ---- 16. every kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ----
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "swiglu_linear": (swiglu_linear, (meta(256, 256, dtype=BF), meta(256, 256, dtype=BF), meta(256, 256, dtype=BF),
                                      meta(256), meta(256, dtype=BF), meta(256, 256, dtype=BF)),
                      dict(BM=128, BN=64, BK=64)),
    "group_norm": (group_norm, (meta(4, 8, 16, 1024, dtype=BF), meta(8, 16), meta(8, 16),
                                meta(4, 8, 16, 1024, dtype=BF), 1e-5), dict(BC=16, BL=128)),
    "layernorm_dwdb": (layernorm_dwdb, (meta(512, 256, dtype=BF), meta(512, 256, dtype=BF), meta(512), meta(512),
                                        meta(256), meta(256)), dict(BM=64, BN=64)),
    "log_softmax_t": (log_softmax_t, (meta(256, 4096, dtype=BF), meta(256, 4096, dtype=BF), 0.7),
                      dict(BM=16, BN=128)),
    "cross_entropy_ls": (cross_entropy_ls, (meta(256, 32000, dtype=BF), meta(256, dtype=I64), meta(256), -100,
                                            0.1), dict(BM=16, BN=128)),
    "causal_conv1d": (causal_conv1d, (meta(2, 1024, 256, dtype=BF), meta(4, 256), meta(256),
                                      meta(2, 1024, 256, dtype=BF)), dict(BT=16, BD=128)),
    "masked_mean": (masked_mean, (meta(8, 512, 256, dtype=BF), meta(8, 512, dtype=I8), meta(8, 256)),
                    dict(BL=32, BD=128)),
    "quantize_rows": (quantize_rows, (meta(256, 1024, dtype=BF), meta(256, 1024, dtype=I8), meta(256)),
                      dict(BM=16, BN=128)),
    "dequantize_rows": (dequantize_rows, (meta(256, 1024, dtype=I8), meta(256), meta(256, 1024, dtype=BF)),
                        dict(BM=32, BN=128)),
    "row_stats": (row_stats, (meta(256, 1024, dtype=BF), meta(256, dtype=torch.float64), meta(256, dtype=I64),
                              meta(256, dtype=BF)), dict(BM=16, BN=128)),
    "scaled_gemm": (scaled_gemm, (meta(256, 256, dtype=F16), meta(256, 256, dtype=F16), meta(256), meta(256),
                                  meta(256, 256, dtype=BF)), dict(BM=128, BN=128, BK=64)),
    "select_mixed": (select_mixed, (meta(8, 16, dtype=BF), meta(8, 16, dtype=I32), meta(8), meta(16, dtype=I32),
                                    meta(8, 16, dtype=I32), meta(8, 16, dtype=F16)), {}),
    "ints_into_f32_work": (ints_into_f32_work, (meta(4, 16), meta(4, dtype=I32), meta(16, dtype=I64),
                                                meta(4, 16)), {}),
    "where_float_into_int": (where_float_into_int, (meta(16, dtype=I8), meta(16, dtype=I8), 0.5), {}),
    "neg_recip": (neg_recip, (meta(8, dtype=F16), meta(8, dtype=F16)), {}),
    "to_int_i8": (to_int, (meta(32), meta(32, dtype=I8)), {}),
    "to_int_i64": (to_int, (meta(32, dtype=BF), meta(32, dtype=I64)), {}),
    "float_scalars": (float_scalars, (meta(4096), meta(4096), meta(4096), meta(4096, dtype=torch.float64), 0.7),
                      dict(BN=256)),
    "exp_edges": (exp_edges, (meta(4096, dtype=F16), meta(4096, dtype=F16), meta(4096, dtype=F16),
                              meta(4096, dtype=F16), meta(4096, dtype=F16)), dict(BN=256)),
}
F32_MMA_CASES = {   # products of f32 tiles: Triton only (Gluon's wgmma takes 16-bit operands)
    "box_blur3_f32": (box_blur3, (meta(512, 512), meta(512, 512)), dict(B=16)),
    "box_blur3_bf16": (box_blur3, (meta(512, 512, dtype=BF), meta(512, 512)), dict(B=32)),
    "moe_top1": (moe_top1, (meta(512, 8), meta(8, 256), meta(512, 256, dtype=BF), meta(512, dtype=I32),
                            meta(512), meta(512, 256, dtype=BF), meta(8, dtype=I32)), dict(BM=64, BE=16, BD=64)),
}


@pytest.mark.parametrize("name", [*AOT_CASES, *F32_MMA_CASES])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **F32_MMA_CASES}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compiled = compile_gluon_sm90a(*AOT_CASES[name])
    if name == "to_int_i8":      # clamped first: the GPU's own conversion to i8 goes through s16 and keeps the low byte
        assert "max.NaN.f32" in compiled.asm["ptx"] and "min.NaN.f32" in compiled.asm["ptx"]
