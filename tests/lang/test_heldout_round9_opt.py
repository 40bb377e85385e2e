"""Round 9 of held-out kernels, continued (see test_heldout_round9.py's docstring): an Adafactor step in four launches
(factored second moments by row and column sums, the latter and the norms added atomically, the update's RMS clip)
checked step by step against torch.optim.Adafactor; CLIP's symmetric contrastive loss (one kernel launched on (A, B)
and (B, A), its row losses added atomically into one element); misuse named at launch; and the kernels of this round
compiled for Hopper (sm_90a) on this CPU by the Triton backend and, where it lowers them, Gluon.

Bugs this round found, fixed in the compiler, each kept as its regression test:
- Triton's interpreter: a conversion to f8e4m3 made -0.0 (and a negative value rounding to 0) +0.0 (the interpreted
  conversion's helper took the sign by `x < 0` and negated by Triton's `-r`, 0 - r), and NaN 384.0 (the interpreter's
  own conversion clamps NaN's exponent); the helper puts x's sign bit on the rounded magnitude and makes NaN E4M3's
  0x7F now (backends.triton.interp_helpers, _to_f8e4m3): test_f8_conversion_keeps_the_sign_of_zero_and_nan, and
  test_mx_fp8_quantize (test_heldout_round9_more.py);
- reference: an empty tensor made by torch.from_numpy (strides of 0) was taken as an expanded one and passed as a
  read-only NumPy view; written back as an output, torch warned of undefined behaviour (backends.reference.executor
  _numpy): test_empty_outputs_of_any_strides_run_without_warnings;
- Gluon: no emitter for rand, so a kernel with dropout could not be compiled for Hopper by it ("cannot lower op
  rand"); it draws tl.rand (rand4x, randint4x's halves) on the Triton backend's counters now, interleaved as
  tl.interleave does (backends.gluon.emit_compute._e_rand): test_compiles_for_sm90a_with_gluon[dropout_add_layernorm],
  test_gluon_draws_philox_uniforms_as_triton_does, test_gluon_draws_several_numbers_per_counter (the library's
  attention forward with dropout compiles with Gluon now).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I8, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round9 import alibi_attention, decode_merge, decode_split, nf4_gemv, ssm_step, top_p
from test_heldout_round9_more import (
    dropout_add_layernorm,
    max_pool2d,
    moe_gemm,
    mx_quantize,
    prune_2_4,
    scan_blocks,
    scan_offsets,
    scan_totals,
    windows,
)

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. an Adafactor step in four launches, against torch.optim.Adafactor --------------------------------------------
def _sum_into(dst1, v, t):
    """dst1 (1,) = the sum of vector v (BM,), through the (BM, 1) tile t."""
    ts.zero(t)
    ts.add(t, t, ts.per_row(v))
    ts.col_sum(dst1, t)


@ts.kernel(grid=lambda G, BM: (ts.cdiv(G.shape[0], BM),))
def adafactor_rows(P, G, RV, COLSQ, PSQ, w: float, *, BM: int = 8, BN: int = 16):
    """RV (M,) = lerp(RV, mean of g^2 along each row, w); COLSQ (N,) += sums of g^2 down the columns, PSQ (1,) +=
    the sum of p^2 (both f32, atomically across row blocks)."""
    i = ts.block_id(0)
    n = G.shape[1]
    g = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[ts.f32, BM, BN]()
    cs = ts.RegVec[ts.f32, BN]()
    rs = ts.RegVec[ts.f32, BM]()
    ps = ts.RegVec[ts.f32, BM]()
    rv = ts.RegVec[ts.f32, BM]()
    t = ts.RegTile[ts.f32, BM, 1]()
    one = ts.RegVec[ts.f32, 1]()
    ts.zero(rs)
    ts.zero(ps)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(g, G, at=(i, j))
        ts.load(p, P, at=(i, j))
        ts.mul(g, g, g)
        ts.row_sum(rs, g, rs)
        ts.col_sum(cs, g)
        ts.atomic_add(COLSQ, cs, at=(j,))
        ts.mul(p, p, p)
        ts.row_sum(ps, p, ps)
    _sum_into(one, ps, t)
    ts.atomic_add(PSQ, one, at=(0,))
    ts.div(rs, rs, n)
    ts.load(rv, RV, at=(i,))
    ts.sub(rs, rs, rv)
    ts.mul(rs, rs, w)
    ts.add(rv, rv, rs)
    ts.store(RV, rv, at=(i,))


@ts.kernel(grid=lambda CV, BN: (ts.cdiv(CV.shape[0], BN),))
def adafactor_cols(CV, COLSQ, m: int, w: float, *, BN: int = 16):
    """CV (N,) = lerp(CV, COLSQ / m, w)."""
    j = ts.block_id(0)
    cv = ts.RegVec[ts.f32, BN]()
    cs = ts.RegVec[ts.f32, BN]()
    ts.load(cv, CV, at=(j,))
    ts.load(cs, COLSQ, at=(j,))
    ts.div(cs, cs, m)
    ts.sub(cs, cs, cv)
    ts.mul(cs, cs, w)
    ts.add(cv, cv, cs)
    ts.store(CV, cv, at=(j,))


@ts.kernel(grid=lambda G, BM: (ts.cdiv(G.shape[0], BM),))
def adafactor_apply(P, G, RV, CV, PSQ, USQ, eps1: float, lr: float, wd: float, rho: float, eps2: float, d: float,
                    *, APPLY: bool = False, BM: int = 8, BN: int = 16):
    """u = g rsqrt(max(RV CV^T / max(mean RV, eps1), eps1^2)). APPLY False: USQ (1,) += sum u^2 (atomically).
    APPLY True: P = P (1 - lr wd) - u max(eps2, rms(P)) rho / max(1, rms(u) / d), the RMS from PSQ and USQ (read
    through stride-0 (M,) views as per-row vectors). The mean of RV is summed by every program (M values)."""
    i = ts.block_id(0)
    m, n = G.shape[0], G.shape[1]
    u = ts.RegTile[ts.f32, BM, BN]()
    v = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[ts.f32, BM, BN]()
    rv = ts.RegVec[ts.f32, BM]()
    cv = ts.RegVec[ts.f32, BN]()
    us = ts.RegVec[ts.f32, BM]()
    rall = ts.RegTile[ts.f32, BM, 1]()
    acc1 = ts.RegVec[ts.f32, 1]()
    tot = ts.RegVec[ts.f32, 1]()
    rsum = ts.RegTile[ts.f32, 1, BM]()
    rmean = ts.RegVec[ts.f32, BM]()
    coef = ts.RegVec[ts.f32, BM]()
    den = ts.RegVec[ts.f32, BM]()
    t = ts.RegTile[ts.f32, BM, 1]()
    ts.zero(tot)
    for r in ts.range(ts.cdiv(m, BM)):
        ts.load(rv, RV, at=(r,))
        _sum_into(acc1, rv, rall)
        ts.add(tot, tot, acc1)
    ts.zero(rsum)
    ts.add(rsum, rsum, ts.per_row(tot))
    ts.col_sum(rmean, rsum)                          # the (1,) sum as a (BM,) vector, each element the sum
    ts.div(rmean, rmean, m)
    ts.max(rmean, rmean, eps1)
    ts.load(rv, RV, at=(i,))
    ts.div(rv, rv, rmean)
    if APPLY:
        ts.load(coef, PSQ, at=(i,))
        ts.div(coef, coef, m * n)
        ts.sqrt(coef, coef)
        ts.max(coef, coef, eps2)
        ts.mul(coef, coef, rho)                      # alpha
        ts.load(den, USQ, at=(i,))
        ts.div(den, den, m * n)
        ts.sqrt(den, den)
        ts.div(den, den, d)
        ts.max(den, den, 1.0)
        ts.div(coef, coef, den)
    ts.zero(us)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(u, G, at=(i, j))
        ts.load(cv, CV, at=(j,))
        ts.zero(v)
        ts.add(v, v, ts.per_row(rv))
        ts.mul(v, v, ts.per_col(cv))
        ts.max(v, v, eps1 * eps1)
        ts.rsqrt(v, v)
        ts.mul(u, u, v)
        if APPLY:
            ts.load(p, P, at=(i, j))
            ts.mul(p, p, 1.0 - lr * wd)
            ts.mul(u, u, ts.per_row(coef))
            ts.sub(p, p, u)
            ts.store(P, p, at=(i, j))
        else:
            ts.mul(u, u, u)
            ts.row_sum(us, u, us)
    if not APPLY:
        _sum_into(acc1, us, t)
        ts.atomic_add(USQ, acc1, at=(0,))


def adafactor_step(backend, p, g, rv, cv, step, lr, wd):
    """One Adafactor step of the (M, N) f32 parameter p in place (rv (M,), cv (N,) its factored moments), as torch's
    _single_tensor_adafactor with eps1 = f32's eps, eps2 = 1e-3, d = 1, beta2_decay = -0.8."""
    M, N = p.shape
    w = step ** -0.8
    rho = min(lr, 1 / step ** 0.5)
    colsq, psq, usq = torch.zeros(N), torch.zeros(1), torch.zeros(1)
    eps1 = torch.finfo(torch.float32).eps
    launch(adafactor_rows, backend, p, g, rv, colsq, psq, w)
    launch(adafactor_cols, backend, cv, colsq, M, w)
    consts = (eps1, lr, wd, rho, 1e-3, 1.0)
    launch(adafactor_apply, backend, p, g, rv, cv, psq.expand(M), usq, *consts)     # USQ written: (1,) itself
    launch(adafactor_apply, backend, p, g, rv, cv, psq.expand(M), usq.expand(M), *consts, APPLY=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(37, 45), (8, 16), (1, 3), (20, 1)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adafactor_steps_match_torch(backend, M, N, wd, rng):
    """Three steps with fresh gradients: one gradient row all zeros (its variance clamps at eps1^2, its update 0), one
    column 1e3 times the rest (the update's RMS clip engages); parameters, row and column moments each step."""
    p0 = randn(rng, M, N)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adafactor([ref], lr=0.05, weight_decay=wd)
    p, rv, cv = p0.clone(), torch.zeros(M), torch.zeros(N)
    for step in range(1, 4):
        g = randn(rng, M, N)
        if M > 2 and N > 2:
            g[1] = 0.0
            g[:, 2] *= 1e3
        ref.grad = g.clone()
        opt.step()
        adafactor_step(backend, p, g, rv, cv, step, 0.05, wd)
        st = opt.state[ref]
        close(rv, st["row_var"].reshape(M), scale=1, dtype=torch.float32)
        torch.testing.assert_close(cv, st["col_var"].reshape(N), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=1e-5)


# ---- 2. CLIP's symmetric contrastive loss: one kernel for both directions, row losses added atomically -------------
@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def clip_loss_rows(A, B, ROW, LOSS, scale: float, *, BM: int = 16, BN: int = 16, D: int = 32):
    """For logits L = scale A B^T (A, B (n, D), matching pairs on the diagonal): ROW[i] = logsumexp(L[i]) - L[i, i]
    (f32, n), and LOSS (1,) += sum_i ROW[i] / (2 n). Launched on (A, B) and on (B, A), LOSS is CLIP's loss. Operands
    in shared tiles (Gluon's wgmma takes them from there)."""
    i = ts.block_id(0)
    n = A.shape[0]
    a = ts.SharedTile[A.dtype, BM, D]()
    b = ts.SharedTile[A.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dsel = ts.RegTile[ts.f32, BM, BN]()
    diag = ts.RegTile[ts.bool_, BM, BN]()
    qi = ts.RegVec[ts.i32, BM]()
    kj = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    rows_in = ts.RegVec[ts.bool_, BM]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    dv = ts.RegVec[ts.f32, BM]()
    t = ts.RegTile[ts.f32, BM, 1]()
    one = ts.RegVec[ts.f32, 1]()
    ts.load(a, A, at=(i, 0))
    ts.arange(qi, i * BM)
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(dv)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(b, B, at=(j, 0))
        ts.zero(s)
        ts.mma_ABt(s, a, b, s)
        ts.mul(s, s, scale)
        ts.arange(kj, j * BN)
        ts.eq(diag, ts.per_row(qi), ts.per_col(kj))
        ts.where(dsel, diag, s, 0.0)
        ts.row_sum(dv, dsel, dv)                     # L[i, i], from the tile holding it
        ts.lt(inside, kj, n)
        ts.where(s, ts.per_col(inside), s, -math.inf)
        ts.row_max(mn, s, m)                         # column 0 is inside: finite from the first tile on
        ts.sub(alpha, m, mn)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(s, s, ts.per_row(mn))
        ts.exp(s, s)
        ts.row_sum(l_, s, l_)
        ts.copy(m, mn)
    ts.log(l_, l_)
    ts.add(l_, l_, m)
    ts.sub(l_, l_, dv)
    ts.store(ROW, l_, at=(i,))
    ts.lt(rows_in, qi, n)
    ts.where(l_, rows_in, l_, 0.0)                   # rows past n (their lse is of zeros) add nothing
    ts.div(l_, l_, 2 * n)
    _sum_into(one, l_, t)
    ts.atomic_add(LOSS, one, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [45, 16, 1, 0])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_clip_contrastive_loss(backend, dtype, n, scale, rng):
    """L2-normalized embeddings (logits in [-scale, scale]); scale 100 is CLIP's largest (a row's softmax is then one
    hot, its lse its max); the two directions' row losses and the symmetric loss against F.cross_entropy."""
    a = torch.nn.functional.normalize(randn(rng, n, 32, dtype=torch.float64), dim=1).to(dtype)
    b = torch.nn.functional.normalize(randn(rng, n, 32, dtype=torch.float64), dim=1).to(dtype)
    ra, rb, loss = poisoned(n), poisoned(n), torch.zeros(1)
    launch(clip_loss_rows, backend, a, b, ra, loss, scale)
    launch(clip_loss_rows, backend, b, a, rb, loss, scale)
    lg = a.double() @ b.double().T * scale
    lab = torch.arange(n)
    want_a = torch.nn.functional.cross_entropy(lg, lab, reduction="none")
    want_b = torch.nn.functional.cross_entropy(lg.T, lab, reduction="none")
    close(ra, want_a.float(), scale=scale)
    close(rb, want_b.float(), scale=scale)
    want = (want_a.mean() + want_b.mean()) / 2 if n else torch.tensor(0.0, dtype=torch.float64)
    close(loss, want.reshape(1).float(), scale=scale)


# ---- 3. the bugs this round found, each alone ----------------------------------------------------------------------
@ts.kernel(grid=lambda X: (1,))
def to_f8(X, Q, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    q = ts.RegVec[ts.f8e4m3, BN]()
    ts.load(x, X, at=(0,))
    ts.copy(q, x)
    ts.store(Q, q, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_f8_conversion_keeps_the_sign_of_zero_and_nan(backend):
    """-0.0 and negatives that round to 0 in e4m3 (below 2^-10) are -0.0 (0x80), as torch's and the GPU's cvt, and
    NaN is NaN; Triton's interpreter made the zeros +0.0 and NaN 384.0."""
    x = torch.tensor([-0.0, 0.0, -1e-4, 1e-4, -2.0 ** -10, -2.0 ** -9, -1.0, -500.0, math.nan, -math.inf])
    q = torch.full((10,), 3.0).to(torch.float8_e4m3fn)
    launch(to_f8, backend, x, q)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert q.view(I8)[:8].tolist() == want.view(I8)[:8].tolist()
    assert q[8].float().isnan() and q[9].float() == -448.0


@ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
def row_copy(X, Y, *, BN: int = 16):
    x = ts.RegTile[ts.f32, 16, BN]()
    i = ts.block_id(0)
    ts.load(x, X, at=(i, 0))
    ts.store(Y, x, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_outputs_of_any_strides_run_without_warnings(backend):
    """An empty output made by torch.from_numpy has strides of 0 (as an expanded tensor's): the reference wrote it
    back from a read-only view and torch warned of undefined behaviour."""
    x = torch.from_numpy(np.zeros((0, 8), dtype=np.float32))
    y = torch.from_numpy(np.zeros((0, 8), dtype=np.float32))
    assert y.stride() == (0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch(row_copy, backend, x, y)
    assert y.shape == (0, 8)


# ---- 4. misuse named at launch ---------------------------------------------------------------------------------------
def test_misuse_of_this_rounds_kernels_is_named():
    """Each error names the argument (or tile) and what was expected, before anything is written."""
    x, w, ends = torch.randn(20, 16), torch.randn(2, 16, 16), torch.tensor([5, 20], dtype=I32)
    y = torch.full((20, 16), 7.0)
    with pytest.raises(LaunchError, match=r"moe_gemm: output Y has shape \(20, 16\) and strides \(1, 1\)"):
        launch(moe_gemm, "reference", x, w, ends, torch.zeros(40).as_strided((20, 16), (1, 1)))
    with pytest.raises(LaunchError, match=r"argument X must be a torch.Tensor .*got ndarray"):
        launch(moe_gemm, "reference", x.numpy(), w, ends, y)
    with pytest.raises(LaunchError, match=r"argument ENDS must be a torch.Tensor .*got list"):
        launch(moe_gemm, "triton", x, w, [5, 20], y)
    with pytest.raises(TraceError, match=r"load: at=.* has 2 coordinates but `X` has rank 3"):
        launch(moe_gemm, "reference", x[None], w, ends, y)
    xx = torch.randn(2, 9, 9)
    with pytest.raises(LaunchError, match=r"max_pool2d: argument width is a runtime int; got float 9.0"):
        launch(max_pool2d, "triton", windows(xx, 2, 2, 1), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=I64), 9.0)
    with pytest.raises(LaunchError, match=r"top_p: argument inv_temp is a runtime float; got Tensor"):
        launch(top_p, "reference", x, y, torch.tensor(1.0), 0.5)
    with pytest.raises(LaunchError, match=r"top_p takes 4 arguments \(X, Y, inv_temp, p_top\); got 3"):
        launch(top_p, "reference", x, y, 1.0)
    with pytest.raises(LaunchError, match=r"argument KG has dtype torch.int16, which tiles cannot hold"):
        g = torch.randn(4, 3, 4)
        launch(prune_2_4, "reference", g, g.clone(), torch.zeros(4, 3, 4, dtype=torch.int16), torch.zeros(2, 3, 4),
               torch.zeros(2, 3, 4, dtype=I8))
    q = torch.randn(1, 2, 5, 16, dtype=BF)
    with pytest.raises(TraceError, match=r"mma_AB: a `p` is bf16 and b `v` is f16"):
        # (K and V are loaded into tiles of Q's dtype, so the product sees p and v: V given as an f16 tile type)
        launch(alibi_mixed, "reference", q, q, q.half(), torch.ones(2, 5), torch.zeros_like(q), 0.25)
    assert (y == 7.0).all()
    with pytest.raises(Exception, match=r"power-of-two tile sizes; load uses a RegTile\[f32, 1, 12\]"):
        launch(top_p, "triton", x, y, 1.0, 0.5, BN=12)
    assert (y == 7.0).all()


@ts.kernel(grid=lambda Q: (1,))
def alibi_mixed(Q, K, V, SLOPE, O, scale: float, *, D: int = 16):
    """p (Q's dtype) times a V tile of V's own dtype: refused when the dtypes differ."""
    q = ts.RegTile[Q.dtype, 16, D]()
    k = ts.RegTile[Q.dtype, 16, D]()
    v = ts.RegTile[V.dtype, 16, D]()
    s = ts.RegTile[ts.f32, 16, 16]()
    p = ts.RegTile[Q.dtype, 16, 16]()
    acc = ts.RegTile[ts.f32, 16, D]()
    ts.load(q, Q, at=(0, 0, 0, 0))
    ts.load(k, K, at=(0, 0, 0, 0))
    ts.load(v, V, at=(0, 0, 0, 0))
    ts.zero(s)
    ts.mma_ABt(s, q, k, s)
    ts.copy(p, s)
    ts.zero(acc)
    ts.mma_AB(acc, p, v, acc)
    ts.store(O, acc, at=(0, 0, 0, 0))


# ---- 5. this round's kernels compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ----
_S, _M = 4096, 8192
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "alibi_attention": (alibi_attention, (meta(2, 16, _S, 64, dtype=BF),) * 3 + (meta(16, _S),
                                                                             meta(2, 16, _S, 64, dtype=BF), 0.125),
                        dict(CAUSAL=True, BM=64, BN=64, D=64)),
    "decode_split": (decode_split, (meta(8, 8, 4, 128, dtype=BF), meta(8, 8, _M, 128, dtype=BF),
                                    meta(8, 8, _M, 128, dtype=BF), meta(8, 4, dtype=I32), meta(8, 8, 16, 4, 128),
                                    meta(8, 8, 16, 4), 0.088), dict(SPLIT=512, BG=16, BN=64, D=128)),
    "decode_merge": (decode_merge, (meta(8, 8, 16, 4, 128), meta(8, 8, 16, 4), meta(8, 8, 4, 128, dtype=BF)),
                     dict(BG=16, D=128)),
    "ssm_step": (ssm_step, (meta(64, _S, 16), meta(64, _S, dtype=BF), meta(64, _S, dtype=BF), meta(_S), meta(_S, 16),
                            meta(64, 16, dtype=BF), meta(64, 16, dtype=BF), meta(_S), meta(64, _S, dtype=BF),
                            meta(64, _S, dtype=BF)), dict(BD=64, N=16)),
    "nf4_gemv": (nf4_gemv, (meta(4, _S // 2, dtype=BF), meta(4, _S // 2, dtype=BF), meta(_M, _S // 2, dtype=I8),
                            meta(_S // 64, _M), meta(4, _M, dtype=BF)), dict(BN=64, BK2=32)),
    "top_p": (top_p, (meta(64, 32000), meta(64, 32000, dtype=BF), 1.0, 0.9), dict(BN=128)),
    "max_pool2d": (max_pool2d, (meta(256, 3, 3, 55, 55, dtype=BF), meta(256, 55, 55, dtype=BF),
                                meta(256, 55, 55, dtype=I64), 111), dict(K=3, S=2, BH=16, BW=32)),
    "dropout_add_layernorm": (dropout_add_layernorm, (meta(_M, _S, dtype=BF),) * 2 + (meta(_S),) * 2
                              + (meta(_M, _S, dtype=BF),) * 2 + (0.1, 1234, 1e-5), dict(BM=4, BN=512)),
    "scan_totals": (scan_totals, (meta(1, 1 << 24, dtype=I32), meta(1 << 14, dtype=I32)), dict(BN=1024)),
    "scan_offsets": (scan_offsets, (meta(1 << 14),), dict(BN=64)),
    "scan_blocks": (scan_blocks, (meta(1 << 24, dtype=F16), meta(1 << 14, 64), meta(1 << 24)), dict(BN=64)),
    "prune_2_4": (prune_2_4, (meta(4, _S, _S // 4, dtype=BF),) * 2 + (meta(4, _S, _S // 4, dtype=torch.bool),
                                                                       meta(2, _S, _S // 4, dtype=BF),
                                                                       meta(2, _S, _S // 4, dtype=I8)),
                  dict(BM=32, BG=32)),
    "mx_quantize": (mx_quantize, (meta(_S, _S, dtype=BF), meta(_S, _S, dtype=torch.float8_e4m3fn),
                                  meta(_S // 32, _S, dtype=I32)), dict(BM=64)),
    "moe_gemm": (moe_gemm, (meta(_M, _S, dtype=BF), meta(8, _S, _S, dtype=BF), meta(8, dtype=I32),
                            meta(_M, _S, dtype=BF)), dict(BM=128, BN=64, BK=32, EB=16)),
    "adafactor_rows": (adafactor_rows, (meta(_S, _S), meta(_S, _S), meta(_S), meta(_S), meta(1), 0.5),
                       dict(BM=16, BN=256)),
    "adafactor_apply": (adafactor_apply, (meta(_S, _S), meta(_S, _S), meta(_S), meta(_S), meta(_S), meta(_S))
                        + (1e-7, 1e-2, 0.0, 1e-2, 1e-3, 1.0), dict(APPLY=True, BM=16, BN=256)),
    "clip_loss_rows": (clip_loss_rows, (meta(_M, 128, dtype=BF), meta(_M, 128, dtype=BF), meta(_M), meta(1), 100.0),
                       dict(BM=128, BN=64, D=128)),
}
# Gluon multiplies 16-bit operands from shared memory only (wgmma): the register-operand products (alibi_attention,
# decode_split, nf4_gemv) are refused there by name
GLUON_CASES = ("ssm_step", "top_p", "max_pool2d", "dropout_add_layernorm", "scan_totals", "scan_offsets",
               "scan_blocks", "prune_2_4", "mx_quantize", "decode_merge", "adafactor_rows", "adafactor_apply",
               "clip_loss_rows", "moe_gemm")


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", GLUON_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])


def test_gluon_draws_philox_uniforms_as_triton_does():
    """Gluon had no emitter for rand ("cannot lower op rand"): it calls Triton's tl.rand on the same 64-bit counters
    now, offset + (row + r) stride + col + c, in the tile's own layout (Philox is element-wise)."""
    kernel, args, consts = AOT_CASES["dropout_add_layernorm"]
    src = kernel.trace(*args, **consts).source("gluon")
    rand = [line.strip() for line in src.splitlines() if "tl.rand(" in line]
    assert len(rand) == 3 and all("tl.rand(seed, " in r and ".to(gl.int64)" in r and "gl.SliceLayout(1, L" in r
                                  and "gl.SliceLayout(0, L" in r for r in rand), rand


@ts.kernel(grid=lambda U: (1,))
def rand_n(U, seed: int, *, BN: int = 64, N: int = 4):
    u = ts.RegTile[ts.f32, 16, BN]()
    ts.rand(u, seed, 0, per_counter=N)
    ts.store(U, u, at=(0, 0))


@pytest.mark.parametrize("n", [4, 8])
def test_gluon_draws_several_numbers_per_counter(n):
    """per_counter 4 (tl.rand4x) and 8 (randint4x's 16-bit halves) interleaved as the Triton backend's tl.interleave
    does it (join, then reshape), so the library's attention forward with dropout (8 per counter) compiles for
    Hopper with Gluon, without spills."""
    src = rand_n.trace(meta(16, 64), 7, N=n).source("gluon")
    draw = "tl.rand4x(seed, " if n == 4 else "tl.randint4x(seed, "
    assert draw in src and src.count("gl.join(") == n - 1 and "gl.reshape(" in src
    compile_gluon_sm90a(rand_n, (meta(16, 64), 7), dict(N=n))
    from tilestack.kernels import attention_fwd
    b4 = ts.ArgSpec(ts.bf16, 4)
    compile_gluon_sm90a(attention_fwd.attention_fwd_dropout_kernel, (b4, b4, b4, b4, ts.ArgSpec(ts.f32, 3), 0.125, 7,
                                                                     0, 0.1, 1 / 0.9), dict(D=64, DV=64))


@pytest.mark.parametrize("n", [1, 4, 8])
def test_several_numbers_per_counter_on_the_cpu_backends(n):
    """The same uniforms on Triton's interpreter as on the reference for each per_counter (the stream the Gluon
    source above reproduces), in [0, 1) and not all alike."""
    u, ref = torch.full((16, 64), math.nan), torch.full((16, 64), math.nan)
    launch(rand_n, "triton", u, 1234, N=n)
    launch(rand_n, "reference", ref, 1234, N=n)
    assert torch.equal(u, ref) and ((u >= 0) & (u < 1)).all() and u.unique().numel() > 900
