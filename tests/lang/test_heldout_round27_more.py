"""Round 27 of held-out kernels, continued (test_heldout_round27.py has the first five): on the reference executor and
Triton's interpreter against float64 torch, outputs poisoned first, ragged sizes, seeds fixed.

- Mamba's causal depthwise conv1d (the short conv before the SSM), forward and backward: channels-last (B, T, C),
  one program per (sequence, channel tile, chunk of time) walking its rows one at a time, each tap's row read at an
  element coordinate t - (KW - 1) + k that is negative before the sequence starts (read as 0), the (C, KW) weights
  through their transposed view; SiLU or none (a str constant); the backward recomputes the pre-activation for SiLU's
  derivative in a first launch, then dx (rows t + KW - 1 - k past the end read as 0) and dW / dbias summed over
  programs by atomic adds into f32; checked against torch.autograd of F.conv1d in float64.
- torch.histc by atomics: each program's elements binned (x == max into the last bin, outside [min, max], NaN and
  inf left out), counted per bin tile by a one-hot compare and a column sum, added atomically into f32 or i32 counts.
- A strided copy of non-contiguous views (transposed, sliced with steps, at storage offsets, expanded with stride 0,
  permuted 3-D) into contiguous or transposed outputs, converting dtypes; and an explicit tile transpose (X^T by
  ts.transpose of each tile, the tile stored at the swapped coordinates); integers compared bit for bit.
- Misuse: wrong ranks, dtypes and runtime argument kinds, out-of-range constants, each refused before any work with
  a message naming the argument; then this round's kernels compiled for sm_90a through the Triton backend.

What this round found: no kernel gave a wrong answer on either executor, and each compiled for sm_90a through Triton
without spills. Fixed, each kept as its test here:
- launch: a written tensor sharing elements at other indices with another argument (a Jacobi step written into the
  buffer its halo is read from; X = buf[:48] read, Y = buf[16:] written) ran, the reference executor (on copies) and
  Triton's interpreter (in place, in program order) disagreeing, a GPU's answer up to its schedule; refused now on
  every launch by an exact strided-overlap search (lang.layout.check_no_partial_overlap, lang.launch.overlap_guard),
  disjoint views of one buffer (q / k / v, even / odd, column halves) and one tensor passed twice still taken:
  test_partially_overlapping_arguments_are_refused_on_every_launch (and test_lang_misuse_round2_more.py's xfail);
- language: Triton's value-returning calls (y = ts.exp(x), ts.where(m, a, b), ts.max(x, axis=1), mma without acc,
  ts.arange(0, BN)) and torch's tile methods (x.sum(1), x.to(dtype)) failed with Python's bare TypeError /
  AttributeError; refused at the kernel's line with the op's signature and the language's way (lang.ops.OpCallError,
  lang.tiles.Tile.__getattr__): test_value_returning_calls_say_how_the_language_writes_them;
- language: `//` of an offset read by ts.load_scalar from a float tensor said only "got float // index"; it names
  the tensor now (lang.tiles.Scalar._op): test_offsets_and_positions_in_float_tensors_are_named.
Met, not changed: sub(dst, 1.0, t) is refused with its recipe (`1.0 - t`), as round 18 decided; the Gluon backend
spills a little (8 stores) on the int8 group GEMM at BM=64, BN=128 with one warpgroup (Triton does not).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a
from test_heldout_round27 import (
    capacity_router,
    halo_view,
    jacobi_step,
    jagged_reduce,
    qkv_rope_split,
    rope_tables,
    w8_group_gemm,
)

import tilestack.lang as ts

F32 = torch.float32
I8, U8 = torch.int8, torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262702)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. causal depthwise conv1d, forward and backward ------------------------------------------------------------
def _silu(dst, src, sig):
    ts.sigmoid(sig, src)
    ts.mul(dst, src, sig)


def _pre_row(pre, X, WT, BIAS, b, t, j, KW: int, BC: int):
    """pre (BC,) = BIAS + sum_k WT[k] * X[b, t - (KW - 1) + k] (rows before 0 read as 0)."""
    xr, w = ts.RegVec[ts.f32, BC](), ts.RegVec[ts.f32, BC]()
    ts.load(pre, BIAS, at=(j,))
    for k in range(KW):
        ts.load(xr, X, at=(b, t - (KW - 1) + k, j))   # an element coordinate, negative before the start
        ts.load(w, WT, at=(k, j))
        ts.mul(xr, xr, w)
        ts.add(pre, pre, xr)


def _conv_grid(X, BC, CHUNK):
    return (X.shape[0], ts.cdiv(X.shape[2], BC), ts.cdiv(X.shape[1], CHUNK))


@ts.kernel(grid=lambda X, BC, CHUNK: _conv_grid(X, BC, CHUNK))
def causal_conv1d_fwd(X, WT, BIAS, Y, *, KW: int = 4, ACT: str = "silu", BC: int = 16, CHUNK: int = 8):
    """Y (B, T, C) = act(BIAS + causal depthwise conv of X (B, T, C) with the taps WT (KW, C))."""
    if ACT not in ("silu", "none"):                   # a constant checked when traced, before any work
        raise ValueError(f"causal_conv1d_fwd: ACT={ACT!r}; expected 'silu' or 'none'")
    if KW < 1:
        raise ValueError(f"causal_conv1d_fwd: KW={KW}; expected a filter width of at least 1")
    b, j, c = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    T = X.shape[1]
    pre, sig = ts.RegVec[ts.f32, BC](), ts.RegVec[ts.f32, BC]()
    y = ts.RegVec[Y.dtype, BC]()
    for t in ts.range(c * CHUNK, ts.smin((c + 1) * CHUNK, T)):
        _pre_row(pre, X, WT, BIAS, b, t, j, KW, BC)
        if ACT == "silu":
            _silu(pre, pre, sig)
        ts.copy(y, pre)
        ts.store(Y, y, at=(b, t, j))


@ts.kernel(grid=lambda X, BC, CHUNK: _conv_grid(X, BC, CHUNK))
def causal_conv1d_dpre(X, WT, BIAS, DY, DPRE, *, KW: int = 4, BC: int = 16, CHUNK: int = 8):
    """DPRE (B, T, C) f32 = DY * silu'(pre), the pre-activation recomputed."""
    b, j, c = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    T = X.shape[1]
    pre, sig, d, tmp = (ts.RegVec[ts.f32, BC]() for _ in range(4))
    for t in ts.range(c * CHUNK, ts.smin((c + 1) * CHUNK, T)):
        _pre_row(pre, X, WT, BIAS, b, t, j, KW, BC)
        ts.sigmoid(sig, pre)                           # silu'(p) = s (1 + p (1 - s))
        ts.neg(tmp, sig)
        ts.add(tmp, tmp, 1.0)
        ts.mul(tmp, tmp, pre)
        ts.add(tmp, tmp, 1.0)
        ts.mul(tmp, tmp, sig)
        ts.load(d, DY, at=(b, t, j))
        ts.mul(d, d, tmp)
        ts.store(DPRE, d, at=(b, t, j))


@ts.kernel(grid=lambda X, BC, CHUNK: _conv_grid(X, BC, CHUNK))
def causal_conv1d_bwd(X, WT, G, DX, DWT, DBIAS, *, KW: int = 4, BC: int = 16, CHUNK: int = 8):
    """From G = dL/dpre (B, T, C): DX[b, t] = sum_k WT[k] G[b, t + KW - 1 - k]; DWT (KW, C) and DBIAS (C,), f32,
    += this program's sum over its rows of G[b, t] X[b, t - (KW - 1) + k] and of G[b, t] (atomically)."""
    b, j, c = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    T = X.shape[1]
    dx, g, w, xr = (ts.RegVec[ts.f32, BC]() for _ in range(4))
    dws = [ts.RegVec[ts.f32, BC]() for _ in range(KW)]
    db = ts.RegVec[ts.f32, BC]()
    for v in (*dws, db):
        ts.zero(v)
    out = ts.RegVec[DX.dtype, BC]()
    for t in ts.range(c * CHUNK, ts.smin((c + 1) * CHUNK, T)):
        ts.zero(dx)
        for k in range(KW):
            ts.load(g, G, at=(b, t + (KW - 1) - k, j))   # rows past T read as 0
            ts.load(w, WT, at=(k, j))
            ts.mul(g, g, w)
            ts.add(dx, dx, g)
        ts.copy(out, dx)
        ts.store(DX, out, at=(b, t, j))
        ts.load(g, G, at=(b, t, j))
        ts.add(db, db, g)
        for k in range(KW):
            ts.load(xr, X, at=(b, t - (KW - 1) + k, j))
            ts.mul(xr, xr, g)
            ts.add(dws[k], dws[k], xr)
    for k in range(KW):
        ts.atomic_add(DWT, dws[k], at=(k, j))
    ts.atomic_add(DBIAS, db, at=(j,))


def conv_ref(x, w, bias, act: str):
    """y and the float64 graph of torch's causal depthwise conv1d (channels-last in and out)."""
    B, T, C = x.shape
    KW = w.shape[1]
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    bd = bias.double().requires_grad_()
    pre = F.conv1d(xd.transpose(1, 2), wd[:, None, :], bd, padding=KW - 1, groups=C)[..., :T].transpose(1, 2)
    y = F.silu(pre) if act == "silu" else pre
    return y, (xd, wd, bd)


def run_conv(backend, x, w, bias, act, dy, **consts):
    B, T, C = x.shape
    KW = w.shape[1]
    wt = w.t()                                         # (KW, C), strides (1, KW): a transposed view
    y = poisoned(B, T, C, dtype=x.dtype)
    launch(causal_conv1d_fwd, backend, x, wt, bias, y, KW=KW, ACT=act, **consts)
    g = dy.float()
    if act == "silu":
        g = poisoned(B, T, C)
        launch(causal_conv1d_dpre, backend, x, wt, bias, dy, g, KW=KW, **consts)
    dx, dwt, db = poisoned(B, T, C, dtype=x.dtype), torch.zeros(KW, C), torch.zeros(C)
    launch(causal_conv1d_bwd, backend, x, wt, g, dx, dwt, db, KW=KW, **consts)
    return y, dx, dwt.t(), db


_CONV_CASES = [(backend, dtype, shape) for backend in BACKENDS for dtype in (F32, F16, BF)
               for shape in ((2, 11, 21, 4), (1, 3, 5, 4), (1, 1, 1, 3))
               if backend == "reference" or dtype is F32 or shape[0] == 1]   # (interpreter time)


@pytest.mark.parametrize(("backend", "dtype", "shape"), _CONV_CASES)
@pytest.mark.parametrize("act", ["silu", "none"])
def test_causal_conv1d_fwd_bwd(backend, dtype, shape, act, rng):
    B, T, C, KW = shape
    x = randn(rng, B, T, C, dtype=dtype)
    w = randn(rng, C, KW, dtype=dtype) * 0.5
    bias = randn(rng, C, dtype=dtype)
    dy = randn(rng, B, T, C, dtype=dtype)
    y, dx, dw, db = run_conv(backend, x, w, bias, act, dy)
    want, (xd, wd, bd) = conv_ref(x, w, bias, act)
    want.backward(dy.double())
    close(y, want.detach(), scale=2)
    close(dx, xd.grad, scale=2)
    n = math.sqrt(B * T)
    close(dw, wd.grad, dtype=dtype, scale=2 * n)
    close(db, bd.grad, dtype=dtype, scale=2 * n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_is_causal_and_saturates(backend):
    """A spike at time s reaches outputs s .. s + KW - 1 only (never earlier: the conv is causal) and the gradient
    of one output reaches inputs t - KW + 1 .. t only; pre-activations of +-1e4 give silu = x and -0 (no NaN)."""
    B, T, C, KW = 1, 12, 3, 4
    x = torch.zeros(B, T, C)
    x[0, 5] = 1.0
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * C)
    bias = torch.zeros(C)
    dy = torch.zeros(B, T, C)
    dy[0, 9] = 1.0
    y, dx, dw, db = run_conv(backend, x, w, bias, "none", dy)
    assert y[0, :, 0].tolist() == [0, 0, 0, 0, 0, 4, 3, 2, 1, 0, 0, 0]
    assert dx[0, :, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0]
    assert dw[0].tolist() == [0.0, 0.0, 0.0, 0.0] and db.tolist() == [1.0, 1.0, 1.0]
    big = torch.full((B, T, C), 2500.0)
    big[0, :, 1] = -2500.0
    y, dx, dw, db = run_conv(backend, big, w, bias, "silu", dy)
    assert torch.equal(y[0, 3:, 0], torch.full((T - 3,), 25000.0))
    assert (y[0, 3:, 1] == 0).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()


# ---- 2. torch.histc by atomics -------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def histc(X, HIST, lo: float, hi: float, *, BN: int = 32, BB: int = 16):
    """HIST (bins,) += counts of X's elements in [lo, hi] split into bins equal bins (hi into the last); elements
    outside, NaN and infinities past the range counted nowhere."""
    i = ts.block_id(0)
    bins = HIST.shape[0]
    x, pos = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    idx, ok = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.bool_, BN]()
    inside, rows = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.i32, BN]()
    ts.load(x, X, at=(i,))
    ts.arange(rows, i * BN)
    ts.lt(inside, rows, X.shape[0])
    ts.ge(ok, x, lo)                                   # (False for NaN)
    ts.logical_and(ok, ok, inside)
    ts.le(inside, x, hi)
    ts.logical_and(ok, ok, inside)
    ts.sub(pos, x, lo)
    ts.mul(pos, pos, bins)
    ts.div(pos, pos, hi - lo)
    ts.where(pos, ok, pos, 0.0)                        # (no NaN or inf into the integer conversion)
    ts.copy(idx, pos)                                  # truncates toward zero: the bin
    ts.min(idx, idx, bins - 1)                         # x == hi into the last bin
    ts.where(idx, ok, idx, -1)                         # bin -1 matches no bin
    hit = ts.RegTile[ts.bool_, BN, BB]()
    one = ts.RegTile[ts.f32, BN, BB]()
    cols = ts.RegVec[ts.i32, BB]()
    counts = ts.RegVec[ts.f32, BB]()
    out = ts.RegVec[HIST.dtype, BB]()
    for kb in ts.range(ts.cdiv(bins, BB)):
        ts.arange(cols, kb * BB)
        ts.eq(hit, ts.per_row(idx), ts.per_col(cols))
        ts.where(one, hit, 1.0, 0.0)
        ts.col_sum(counts, one)
        ts.copy(out, counts)
        ts.atomic_add(HIST, out, at=(kb,))


def histc_ref(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    v = x.double().numpy()
    v = v[(v >= lo) & (v <= hi)]
    idx = np.minimum(((v - lo) * bins / (hi - lo)).astype(np.int64), bins - 1)
    return torch.from_numpy(np.bincount(idx, minlength=bins)).double()


def off_edges(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """``x`` with every value within 1e-3 of a bin edge moved to the bin's middle (the f32 and float64 bin
    computations then agree)."""
    u = (x.double() - lo) * bins / (hi - lo)
    near = (u - u.round()).abs() < 1e-3
    return torch.where(near, (u.floor() + 0.5) * (hi - lo) / bins + lo, x.double()).to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize("count_dtype", [F32, I32])
@pytest.mark.parametrize(("N", "bins", "lo", "hi"), [(301, 37, -2.0, 2.5), (1, 1, 0.0, 1.0), (64, 16, -1.0, 1.0)])
def test_histc(backend, dtype, count_dtype, N, bins, lo, hi, rng):
    x = off_edges(randn(rng, N, dtype=dtype) * 1.5, bins, lo, hi)
    hist = torch.zeros(bins, dtype=count_dtype)
    launch(histc, backend, x, hist, lo, hi)
    want = histc_ref(x, bins, lo, hi)
    assert torch.equal(hist.double(), want), (hist, want)
    if dtype is F32:
        assert torch.equal(hist.double(), torch.histc(x.double(), bins, lo, hi))


@pytest.mark.parametrize("backend", BACKENDS)
def test_histc_edges_nan_inf_and_empty(backend):
    """lo into bin 0, hi into the last bin, below lo / above hi / NaN / +-inf nowhere; counts add into what HIST
    held (a second launch doubles them); an empty X adds nothing."""
    x = torch.tensor([0.0, 4.0, 1.0, 2.0, 3.999, -0.001, 4.001, math.nan, math.inf, -math.inf, 2.0, 0.5])
    hist = torch.zeros(4, dtype=I32)
    launch(histc, backend, x, hist, 0.0, 4.0, BN=8, BB=2)
    assert hist.tolist() == [2, 1, 2, 2]
    launch(histc, backend, x, hist, 0.0, 4.0, BN=8, BB=2)
    assert hist.tolist() == [4, 2, 4, 4]
    launch(histc, backend, torch.empty(0), hist, 0.0, 4.0)
    assert hist.tolist() == [4, 2, 4, 4]
    assert torch.equal(torch.histc(x[~x.isnan()], 4, 0.0, 4.0).int() * 2, hist)


# ---- 3. strided copies and transposes of non-contiguous views -----------------------------------------------------
@ts.kernel(grid=lambda OUT, BM, BN: (OUT.shape[0], ts.cdiv(OUT.shape[1], BM), ts.cdiv(OUT.shape[2], BN)))
def strided_copy(X, OUT, *, BM: int = 8, BN: int = 16):
    """OUT (A, M, N) = X (A, M, N) converted to OUT's dtype, whatever the strides of either."""
    a, i, j = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    t = ts.RegTile[X.dtype, BM, BN]()
    o = ts.RegTile[OUT.dtype, BM, BN]()
    ts.load(t, X, at=(a, i, j))
    ts.copy(o, t)
    ts.store(OUT, o, at=(a, i, j))


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def tile_transpose(X, OUT, *, BM: int = 8, BN: int = 16):
    """OUT (N, M) = X (M, N)^T: each tile transposed in registers and stored at the swapped coordinates."""
    i, j = ts.block_id(0), ts.block_id(1)
    t = ts.RegTile[X.dtype, BM, BN]()
    tt = ts.RegTile[X.dtype, BN, BM]()
    ts.load(t, X, at=(i, j))
    ts.transpose(tt, t)
    ts.store(OUT, tt, at=(j, i))


def _views(base: torch.Tensor) -> dict:
    """Non-contiguous (A, M, N) views of ``base`` (4, 24, 30)."""
    return {
        "transposed": base.transpose(1, 2)[:, :19, :13],                 # inner stride 30
        "stepped": base[:, 1::2, ::3],                                    # strides (720, 60, 3), offset 30
        "permuted": base.permute(2, 0, 1)[:5],                            # (5, 4, 24): every stride unusual
        "expanded": base[:1, :1, :].expand(3, 17, 30),                    # stride 0 on two axes
        "offset": base[1:, 3:, 5:],                                       # storage offset, contiguous rows
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "stepped", "permuted", "expanded", "offset"])
@pytest.mark.parametrize(("src", "dst"), [(F32, F32), (I64, I32), (BF, F32), (F16, BF), (U8, I64), (I32, F16)])
def test_strided_copy(backend, view, src, dst):
    base = torch.arange(4 * 24 * 30, dtype=torch.int64).view(4, 24, 30) % 251 - 100
    base = base.clamp(min=0) if src is U8 else base
    x = _views(base.to(src))[view]
    out = poisoned(*x.shape, dtype=dst, value=-77 if not dst.is_floating_point else math.nan)
    launch(strided_copy, backend, x, out)
    assert torch.equal(out, x.to(dst)), view


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_copy_into_a_transposed_output(backend, rng):
    """The output a transposed view of a contiguous buffer (inner stride M), the input a stepped view: the buffer
    holds X^T exactly; columns of the buffer outside the view keep their poison."""
    x = randn(rng, 2, 40, 25, dtype=F16)[:, ::2, :]      # (2, 20, 25)
    buf = poisoned(2, 25, 21, dtype=F16)
    launch(strided_copy, backend, x, buf[:, :, :20].transpose(1, 2))
    assert torch.equal(buf[:, :, :20], x.transpose(1, 2)) and buf[:, :, 20].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF, I8, I64])
@pytest.mark.parametrize(("M", "N", "BM", "BN"), [(37, 21, 8, 16), (1, 1, 8, 16), (16, 64, 16, 16)])
def test_tile_transpose(backend, dtype, M, N, BM, BN, rng):
    x = torch.from_numpy(rng.integers(-100, 100, (M, N + 3))).to(dtype)[:, 3:]   # a storage offset, rows N + 3
    out = poisoned(N, M, dtype=dtype, value=-7 if not dtype.is_floating_point else math.nan)
    launch(tile_transpose, backend, x, out, BM=BM, BN=BN)
    assert torch.equal(out, x.t())
    out2 = poisoned(M, N, dtype=dtype, value=-7 if not dtype.is_floating_point else math.nan)
    launch(tile_transpose, backend, x.t(), out2, BM=BN, BN=BM)     # the transposed view back again
    assert torch.equal(out2, x)


# ---- empty extents and misuse ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_extents_launch_nothing_or_write_identities(backend):
    """N = 0 values (every segment empty: sums 0, log-sum-exps -inf), T = 0 tokens (loads 0), K = 0 (Y = 0),
    zero-size grids (T = 0, C = 0, M = 0, bins = 0): nothing fails, nothing outside the outputs is written."""
    s, m, lse = run_jagged_empty(backend)
    assert (s == 0).all() and (m == 0).all() and (lse == -math.inf).all()
    load = torch.full((4,), -1, dtype=I32)
    launch(capacity_router, backend, torch.zeros(0, 4), torch.zeros(0, 4), load, 0.1, 3)
    assert load.tolist() == [0, 0, 0, 0]
    y = poisoned(3, 5)
    launch(w8_group_gemm, backend, torch.zeros(3, 0), torch.zeros(0, 5, dtype=I8), torch.zeros(0, 5), y)
    assert (y == 0).all()
    launch(causal_conv1d_fwd, backend, torch.zeros(2, 0, 3), torch.zeros(3, 4).t(), torch.zeros(3),
           torch.zeros(2, 0, 3))
    launch(causal_conv1d_fwd, backend, torch.zeros(2, 5, 0), torch.zeros(0, 4).t(), torch.zeros(0),
           torch.zeros(2, 5, 0))
    launch(tile_transpose, backend, torch.zeros(0, 4), torch.zeros(4, 0))
    hist = torch.zeros(0)
    launch(histc, backend, torch.randn(10), hist, 0.0, 1.0)
    pad = torch.zeros(2, 2)
    launch(jacobi_step, backend, halo_view(pad), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool),
           pad[1:-1, 1:-1], 0.5, 0.1)
    assert (pad == 0).all()


def run_jagged_empty(backend):
    offsets = torch.zeros(4, dtype=I64)
    s, m, lse = poisoned(3, 5), poisoned(3, 5), poisoned(3, 5)
    launch(jagged_reduce, backend, torch.zeros(0, 5), offsets, s, m, lse)
    return s, m, lse


def _w8_args():
    return torch.randn(4, 64), torch.zeros(64, 16, dtype=I8), torch.ones(2, 16), poisoned(4, 16)


@pytest.mark.parametrize(("change", "error", "fragment"), [
    (dict(X=torch.randn(1, 4, 64)), Exception, "`X` has rank 3"),
    (dict(S=torch.ones(16)), Exception, "`S` has rank 1"),
    (dict(X=torch.ones(4, 64, dtype=I32)), Exception, "mma_AB: a `a` is i32"),
    (dict(X=torch.ones(4, 64, dtype=F64)), Exception, "mma_AB: a `a` is f64"),
    (dict(X=torch.ones(4, 64, dtype=torch.complex64)), Exception, "argument X has dtype torch.complex64"),
    (dict(X=np.ones((4, 64), np.float32)), Exception, "argument X must be a torch.Tensor"),
    (dict(Y=torch.zeros(16).expand(4, 16)), Exception, "output Y has shape (4, 16) and strides (0, 1)"),
    (dict(BM=0), Exception, "the constant BM=0 of this launch"),
    (dict(BM=-16), Exception, "the constant BM=-16 of this launch"),
    (dict(BN=True), Exception, "constant BN is declared int; got bool True"),
    (dict(BN=16.0), Exception, "constant BN is declared int; got float 16.0"),
    (dict(GROUP=64), Exception, "unknown constant(s) ['GROUP']"),
])
def test_w8_group_gemm_misuse_is_named(change, error, fragment):
    x, wq, s, y = _w8_args()
    args = dict(X=x, WQ=wq, S=s, Y=y)
    consts = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(error) as e:
        launch(w8_group_gemm, "reference", *args.values(), **consts)
    assert fragment in str(e.value), str(e.value)
    assert y.isnan().all()                             # refused before any work


def test_triton_tile_limits_are_named():
    x, wq, s, y = _w8_args()
    with pytest.raises(Exception, match=r"power-of-two tile sizes.*RegTile\[f32, 12, 16\]"):
        launch(w8_group_gemm, "triton", x, wq, s, y, BM=12)
    with pytest.raises(Exception, match=r"131072, 16\], 2097152 elements.*at most 1048576"):
        launch(w8_group_gemm, "triton", x, wq, s, y, BM=1 << 17)
    assert y.isnan().all()


def test_runtime_arguments_of_the_wrong_kind_are_named():
    logits, gates, load = torch.randn(8, 4), poisoned(8, 4), torch.full((4,), -7, dtype=I32)
    for args, fragment in [((0.1, 2.5), "argument capacity is a runtime int; got float 2.5"),
                           ((torch.tensor(0.1), 2), "argument tau is a runtime float; got Tensor"),
                           (("0.1", 2), "argument tau is a runtime float; got str '0.1'"),
                           ((0.1, True), "argument capacity is a runtime int; got bool True"),
                           ((0.1, 2**70), "argument capacity is a runtime int, at most 64 bits"),
                           ((0.1,), "missing ['capacity']")]:
        with pytest.raises(Exception) as e:
            launch(capacity_router, "reference", logits, gates, load, *args)
        assert fragment in str(e.value), str(e.value)
    assert gates.isnan().all() and (load == -7).all()


def test_offsets_and_positions_in_float_tensors_are_named():
    """An offsets or positions tensor of floats: the error names the tensor (the `//` of a float offset said only
    "got float // index" before this round's fix, lang/tiles.py)."""
    v = torch.randn(10, 5)
    outs = [poisoned(2, 5) for _ in range(3)]
    with pytest.raises(Exception, match=r"`//` is for index scalars.*ts.load_scalar of `OFFSETS`, a float tensor"):
        launch(jagged_reduce, "reference", v, torch.tensor([0.0, 4.0, 10.0]), *outs)
    with pytest.raises(Exception, match="1 indices for `OFFSETS` of rank 2"):
        launch(jagged_reduce, "reference", v, torch.tensor([[0, 4, 10]]), *outs)
    assert all(o.isnan().all() for o in outs)
    heads = [torch.zeros(2, 2, 2)] * 5
    with pytest.raises(Exception, match=r"load: at\[0\] must be an index.*ts.load_scalar of `POS`, a float tensor"):
        launch(qkv_rope_split, "triton", *heads, torch.zeros(2), torch.zeros(4, 2), torch.zeros(4, 2), *heads)


def test_conv_constants_out_of_range_and_atomic_dtypes_are_named():
    x, w, bias, y = torch.randn(1, 5, 3), torch.randn(3, 4), torch.zeros(3), poisoned(1, 5, 3)
    with pytest.raises(ValueError, match="ACT='gelu'; expected 'silu' or 'none'"):
        launch(causal_conv1d_fwd, "reference", x, w.t(), bias, y, ACT="gelu")
    with pytest.raises(ValueError, match="KW=0; expected a filter width of at least 1"):
        launch(causal_conv1d_fwd, "triton", x, w.t(), bias, y, KW=0)
    with pytest.raises(Exception, match="constant ACT is declared str; got int 1"):
        launch(causal_conv1d_fwd, "reference", x, w.t(), bias, y, ACT=1)
    with pytest.raises(Exception, match=r"the constant CHUNK=0 of this launch"):
        launch(causal_conv1d_fwd, "reference", x, w.t(), bias, y, CHUNK=0)
    with pytest.raises(Exception, match=r"grid is \(1, 1, -1\).*none may be negative"):
        launch(causal_conv1d_fwd, "reference", x, w.t(), bias, y, CHUNK=-4)
    assert y.isnan().all()
    for dt, name in ((BF, "bf16"), (I8, "i8"), (U8, "u8")):   # no atomic adds into these
        dwt = torch.zeros(4, 3, dtype=dt)
        with pytest.raises(Exception, match=f"atomic_add: `DWT` is {name}"):
            launch(causal_conv1d_bwd, "reference", x, w.t(), x, y, dwt, torch.zeros(3))
    with pytest.raises(Exception, match="atomic_add: `HIST` is bool"):
        launch(histc, "reference", torch.randn(10), torch.zeros(4, dtype=torch.bool), 0.0, 1.0)
    assert y.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_partially_overlapping_arguments_are_refused_on_every_launch(backend):
    """A Jacobi step written into the buffer its halo is read from (a Gauss-Seidel race), a square matrix written
    through its own transposed view, and a copy into an overlapping shift of its input are refused before any work, naming both
    arguments, also when the launch signature was seen before with separate tensors (the launch key holds no
    addresses: the check runs per launch). Views sharing storage but no element (column halves, q / k / v of one
    packed qkv, the even and odd elements of a head), one tensor passed twice, and a tensor reinterpreted in place
    through a view of another dtype of its size are taken. Fixed this round (lang.layout.check_no_partial_overlap)."""
    a = torch.arange(6 * 6, dtype=F32).view(6, 6)
    before = a.clone()
    args = (torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(Exception, match=r"jacobi_step: HALO \(read.*and OUT \(written.*overlap"):
        launch(jacobi_step, backend, halo_view(a), *args, a[1:-1, 1:-1], 0.5, 0.1)
    x = torch.arange(16 * 16, dtype=F32).view(16, 16)
    launch(tile_transpose, backend, x.clone(), torch.zeros(16, 16))   # the signature, seen with separate tensors
    with pytest.raises(Exception, match=r"tile_transpose: X \(read.*and OUT \(written.*overlap"):
        launch(tile_transpose, backend, x, x.t())                      # the output a transposed view of the input
    buf = torch.arange(2 * 24 * 16, dtype=F32).view(2, 24, 16)
    launch(strided_copy, backend, buf[:, :16].clone(), torch.zeros(2, 16, 16))
    with pytest.raises(Exception, match=r"strided_copy: X \(read.*and OUT \(written.*overlap"):
        launch(strided_copy, backend, buf[:, :16], buf[:, 8:])
    assert torch.equal(a, before) and torch.equal(x, torch.arange(256, dtype=F32).view(16, 16))
    # taken: disjoint views of one buffer, one tensor twice, an in-place reinterpretation
    halves = torch.arange(2 * 8 * 32, dtype=F32).view(2, 8, 32)
    launch(strided_copy, backend, halves[:, :, :16], halves[:, :, 16:])
    assert torch.equal(halves[:, :, 16:], halves[:, :, :16])
    launch(strided_copy, backend, halves, halves)
    bits = torch.tensor([1.0, -2.0, 0.5] * 3).view(1, 3, 3)
    launch(strided_copy, backend, bits.view(I32), bits)              # the bits, converted to floats, in place
    assert bits.flatten().tolist() == [float(v) for v in torch.tensor([1.0, -2.0, 0.5] * 3).view(I32).tolist()]
    T, HQ, HKV, D = 3, 2, 1, 4
    qkv = torch.randn(T, (HQ + 2 * HKV) * D)
    cos, sin = rope_tables(4, D // 2)
    from test_heldout_round27 import run_qkv_rope
    run_qkv_rope(backend, qkv, torch.tensor([0, 1, 3], dtype=I32), cos, sin, HQ, HKV, D)


@ts.kernel(grid=(1,))
def triton_style(X, Y, *, FORM: str = "exp", BN: int = 8):
    """One of the value-returning forms a Triton or torch user writes first (FORM picks it)."""
    x = ts.RegTile[ts.f32, BN, BN]()
    ts.load(x, X, at=(0, 0))
    if FORM == "exp":
        ts.exp(x)
    elif FORM == "where":
        m = ts.RegTile[ts.bool_, BN, BN]()
        ts.gt(m, x, 0.0)
        ts.where(m, x, 0.0)
    elif FORM == "max_axis":
        ts.max(x, axis=1)
    elif FORM == "mma_no_acc":
        y = ts.RegTile[ts.f32, BN, BN]()
        ts.mma_AB(y, x, x)
    elif FORM == "arange":
        ts.arange(0, BN)
    elif FORM == "sum_method":
        x.sum(1)
    elif FORM == "to_method":
        x.to(ts.f16)
    elif FORM == "store_hint":
        ts.store(Y, x, at=(0, 0), eviction_policy="evict_last")


@pytest.mark.parametrize(("form", "error", "fragments"), [
    ("exp", TypeError, ["ts.exp(dst, src): missing a required argument: 'src'", "return None", "ts.exp(y, ...)"]),
    ("where", TypeError, ["ts.where(dst, mask, a, b): missing a required argument: 'b'", "return None"]),
    ("max_axis", TypeError, ["ts.max(dst, a, b)", "ts.row_max(v, t)"]),
    ("mma_no_acc", TypeError, ["missing a required argument: 'acc'", "ts.mma_AB(acc, a, b, acc)"]),
    ("arange", Exception, ["arange: dst is 0", "r = ts.RegVec[ts.i32, BN](); ts.arange(r, start)"]),
    ("sum_method", AttributeError, ["`x.sum`", "ts.row_sum(v, x)"]),
    ("to_method", AttributeError, ["`x.to`", "ts.copy(u, x) into a tile u of the dtype"]),
    ("store_hint", TypeError, ["ts.store(dst, src, at=None, mask=None)", "'eviction_policy'"]),
])
def test_value_returning_calls_say_how_the_language_writes_them(form, error, fragments):
    """Triton's and torch's value-returning forms (y = ts.exp(x), ts.where(m, a, b), ts.max(x, axis=1),
    tl.dot without an accumulator, tl.arange(0, BN), x.sum(1), x.to(dtype)) failed with Python's bare "exp()
    missing 1 required positional argument: 'src'" or "'Tile' object has no attribute 'sum'"; now refused at the
    kernel's line with the op's signature and the language's way (a TypeError still; fixed this round,
    lang/ops.py OpCallError, lang/tiles.py Tile.__getattr__)."""
    with pytest.raises(error) as e:
        launch(triton_style, "reference", torch.ones(8, 8), poisoned(8, 8), FORM=form)
    message = str(e.value)
    assert "test_heldout_round27_more.py:" in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---- sm_90a compiles -----------------------------------------------------------------------------------------------
def _packed_qkv_views(T: int, HQ: int, HKV: int, D: int, dtype) -> tuple:
    """The stride-2 even / odd views of a packed (T, (HQ + 2 HKV) D) meta projection, its V heads, and the same
    views of separate Q and K outputs."""
    qkv = meta(T, (HQ + 2 * HKV) * D, dtype=dtype)
    q = qkv[:, :HQ * D].view(T, HQ, D // 2, 2)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D // 2, 2)
    v = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
    oq = meta(T, HQ, D // 2, 2, dtype=dtype)
    ok = meta(T, HKV, D // 2, 2, dtype=dtype)
    return (q[..., 0], q[..., 1], k[..., 0], k[..., 1], v), (oq[..., 0], oq[..., 1], ok[..., 0], ok[..., 1],
                                                             meta(T, HKV, D, dtype=dtype))


def _qkv_case(dtype):
    ins, outs = _packed_qkv_views(4096, 32, 8, 128, dtype)
    return (qkv_rope_split, (*ins, meta(4096, dtype=I64), meta(8192, 64), meta(8192, 64), *outs), dict(BH=8, BD=64))


def _halo_meta(H: int, W: int, dtype):
    pad = meta(H + 2, W + 2, dtype=dtype)
    return halo_view(pad), pad[1:-1, 1:-1]


def _jacobi_case(dtype):
    halo, interior = _halo_meta(2048, 2048, dtype)
    return (jacobi_step, (halo, meta(2048, 2048, dtype=dtype), meta(2048, 2048, dtype=torch.bool), interior, 0.8,
                          1e-4), dict(BM=32, BN=64))


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "qkv_rope_split_bf16": _qkv_case(BF),
    "qkv_rope_split_f32": _qkv_case(F32),
    "jagged_reduce_bf16": (jagged_reduce, (meta(1 << 20, 256, dtype=BF), meta(4097, dtype=I64),
                                           meta(4096, 256, dtype=BF), meta(4096, 256, dtype=BF), meta(4096, 256)),
                           dict(BM=64, BD=64)),
    "capacity_router": (capacity_router, (meta(8192, 60), meta(8192, 60, dtype=F16), meta(60, dtype=I32), 0.05, 512),
                        dict(BT=64, BE=64)),
    "jacobi_f32": _jacobi_case(F32),
    "jacobi_f16": _jacobi_case(F16),
    "w8_group_gemm_f16": (w8_group_gemm, (meta(4096, 4096, dtype=F16), meta(4096, 11008, dtype=I8),
                                          meta(128, 11008, dtype=F16), meta(4096, 11008, dtype=F16)),
                          dict(BM=64, BN=128)),
    "w8_group_gemm_bf16_gemv": (w8_group_gemm, (meta(1, 4096, dtype=BF), meta(4096, 4096, dtype=I8),
                                                meta(128, 4096, dtype=BF), meta(1, 4096, dtype=BF)),
                                dict(BM=16, BN=64)),
    "conv1d_fwd": (causal_conv1d_fwd, (meta(8, 4096, 2048, dtype=BF), meta(2048, 4, dtype=BF).t(),
                                       meta(2048, dtype=BF), meta(8, 4096, 2048, dtype=BF)),
                   dict(KW=4, BC=128, CHUNK=64)),
    "conv1d_dpre": (causal_conv1d_dpre, (meta(8, 4096, 2048, dtype=BF), meta(2048, 4, dtype=BF).t(),
                                         meta(2048, dtype=BF), meta(8, 4096, 2048, dtype=BF), meta(8, 4096, 2048)),
                    dict(KW=4, BC=128, CHUNK=64)),
    "conv1d_bwd": (causal_conv1d_bwd, (meta(8, 4096, 2048, dtype=BF), meta(2048, 4, dtype=BF).t(),
                                       meta(8, 4096, 2048), meta(8, 4096, 2048, dtype=BF), meta(4, 2048),
                                       meta(2048)), dict(KW=4, BC=128, CHUNK=64)),
    "histc_i32": (histc, (meta(1 << 24, dtype=BF), meta(1000, dtype=I32), -4.0, 4.0), dict(BN=256, BB=64)),
    "strided_copy_permuted": (strided_copy, (meta(16, 4096, 128, dtype=BF).permute(0, 2, 1),
                                             meta(16, 128, 4096, dtype=F32)), dict(BM=64, BN=64)),
    "tile_transpose_i8": (tile_transpose, (meta(4096, 4096, dtype=I8), meta(4096, 4096, dtype=I8)),
                          dict(BM=64, BN=64)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round27_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])
