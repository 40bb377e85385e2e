"""Round 21 of held-out kernels (after rounds 2-20): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch or a hand computation, outputs poisoned (NaN, or an impossible
integer) first, seeds fixed (the ``rng`` fixture of this file); each is also compiled for sm_90a on this CPU through
the Triton and Gluon backends (test_heldout_round21_hw.py).

Qwen3 / OLMo-2's fused QK-norm + rotary embedding (one program per token and block of heads: the q and k heads of a
packed (T, (HQ + 2 HKV) D) projection read through (T, H, D) views, each head RMS-normalized over D with its own
weight, q's and k's, then rotated by neox's rotate-half with the cos / sin rows of the token's position gathered
from a cache with load_scalar; written in place, the v heads beside them untouched, k's head block past HKV reading
0 and storing nothing; f32 / f16 / bf16, i32 and i64 positions, heads of zeros and of 2e3 / 1e16); and a 2-D
transposed convolution (F.conv_transpose2d with stride, padding, dilation, output_padding) as a GEMM per kernel tap
whose (W, Cout) products are scattered col2im-style by atomic adds through one 6-D as_strided view of a padded
channels-last f32 output ((N, KH, KW, H, W, Cout) -> (n, s h + d kh, s w + d kw, c): the taps of neighbouring inputs
overlap wherever the kernel is wider than the stride), then a second launch cropping the padding, adding the bias and
casting; and a GPTQ-style W8A16 GEMM with act-order (desc_act: each K row's group from g_idx, the groups in any
order along K; each K tile's scales and u8 zero points gathered row by row by one-hot products with the (G, N) tables,
exact on the matrix units; the dequantized tile in the activations' dtype staged into a shared tile as the product's
B operand; f16 / bf16, i32 / i64 g_idx, a ragged last group, codes and zero points 0 and 255, a GEMV). More kernels
of this round are in test_heldout_round21_more.py (stream compaction: masked_select and nonzero in three launches;
differential attention; Chamfer distance; a segmented cumsum restarted at flags).

What this round found (test_heldout_round21_hw.py's docstring has the details): no kernel gave a wrong answer on
either executor, and each compiled for sm_90a through Triton without spills. The W8A16 GEMM found three Gluon bugs,
fixed: a load into a shared tile of another dtype than its global (u8 zero points into an f16 tile) went through the
copy engine, which does not convert (Triton's LLVM lowering failed; f16 into bf16 would have been reinterpreted)
(c04d0b4); its K loop's accumulation chain kept in flight beside a nested loop of wgmmas made ptxas serialize every
wgmma of the kernel (6ce8223); and so did a chain kept in flight while reading a shared tile each trip rewrites (the
converted loads, copies from registers), whose next trip's store would overwrite what the wgmma reads (b542b32).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262101)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. fused QK-norm + rotary embedding (Qwen3), in place in a packed qkv ---------------------------------------
def _rms_rope(X, W, C, S, t, hb, eps, D, BH):
    """Head block hb of token t of X (T, H, D) RMS-normalized over D with weight W (D,), rotated by the cos / sin
    rows C, S (D/2,) (neox: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)), stored back in place."""
    H2 = D // 2
    x1, x2 = ts.RegTile[ts.f32, BH, H2](), ts.RegTile[ts.f32, BH, H2]()
    ts.load(x1, X, at=(t, hb, 0))                     # (BH, D/2) the first halves of BH heads
    ts.load(x2, X, at=(t, hb, 1))                     # (BH, D/2) the second halves
    sq = ts.RegTile[ts.f32, BH, H2]()
    ms = ts.RegVec[ts.f32, BH]()
    ts.mul(sq, x1, x1)
    ts.row_sum(ms, sq)
    ts.mul(sq, x2, x2)
    ts.row_sum(ms, sq, ms)                            # (BH,) sum of squares over all D (f32: 1e4 ** 2 fits)
    ts.mul(ms, ms, 1.0 / D)
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    ts.mul_row(x1, x1, ms)
    ts.mul_row(x2, x2, ms)
    w1, w2 = ts.RegVec[ts.f32, H2](), ts.RegVec[ts.f32, H2]()
    ts.load(w1, W, at=(0,))
    ts.load(w2, W, at=(1,))
    ts.mul(x1, x1, ts.per_col(w1))
    ts.mul(x2, x2, ts.per_col(w2))
    o1, o2 = ts.RegTile[ts.f32, BH, H2](), ts.RegTile[ts.f32, BH, H2]()
    ts.mul(o1, x1, ts.per_col(C))
    ts.mul(sq, x2, ts.per_col(S))
    ts.sub(o1, o1, sq)                                # x1 c - x2 s
    ts.mul(o2, x2, ts.per_col(C))
    ts.mul(sq, x1, ts.per_col(S))
    ts.add(o2, o2, sq)                                # x2 c + x1 s
    out = ts.RegTile[X.dtype, BH, H2]()
    ts.copy(out, o1)
    ts.store(X, out, at=(t, hb, 0))                   # rows past X's heads are dropped (k's block past HKV)
    ts.copy(out, o2)
    ts.store(X, out, at=(t, hb, 1))


@ts.kernel(grid=lambda Q, K, BH: (Q.shape[0], ts.cdiv(ts.smax(Q.shape[1], K.shape[1]), BH)))
def qk_norm_rope(Q, K, QW, KW, COS, SIN, POS, eps: float, *, D: int = 32, BH: int = 16):
    """Q (T, HQ, D) and K (T, HKV, D), views of one packed qkv projection, in place: every head RMS-normalized over D
    (weights QW / KW (D,)), then rotated by rows POS[t] of the (P, D/2) COS / SIN caches. Grid: (tokens, head
    blocks of the larger of HQ, HKV); a program does head block hb of both q and k."""
    t, hb = ts.block_id(0), ts.block_id(1)
    pos = ts.load_scalar(POS, t)
    c, s = ts.RegVec[ts.f32, D // 2](), ts.RegVec[ts.f32, D // 2]()
    ts.load(c, COS, at=(pos, 0))                      # the cache row of this token's position
    ts.load(s, SIN, at=(pos, 0))
    _rms_rope(Q, QW, c, s, t, hb, eps, D, BH)
    _rms_rope(K, KW, c, s, t, hb, eps, D, BH)


def rope_cache(P: int, D: int, base: float = 1e6):
    """cos, sin (P, D/2) in f32, made in float64: angle[p, k] = p base^(-2k/D) (Qwen3's rope_theta 1e6)."""
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()


def qk_norm_rope_ref(x, w, cos, sin, pos, eps):
    """float64: x (T, H, D) RMS-normalized over D, times w, neox-rotated by cos / sin[pos]."""
    x, w = x.double(), w.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    c, s = cos.double()[pos.long()][:, None], sin.double()[pos.long()][:, None]    # (T, 1, D/2)
    y1, y2 = y.chunk(2, -1)
    return torch.cat([y1 * c - y2 * s, y2 * c + y1 * s], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "HQ", "HKV", "D", "pdtype"), [(5, 6, 2, 32, I64), (3, 20, 4, 16, I32),
                                                            (1, 1, 1, 32, I64)])
def test_qk_norm_rope(backend, dtype, T, HQ, HKV, D, pdtype, rng):
    """Against float64 torch: q and k views of one packed (T, (HQ + 2 HKV) D) tensor (20 q heads: two head blocks,
    the second ragged; k's second block past HKV entirely), positions 0 (no rotation), 70000 and random ones of a
    (131072, D/2) cache; a q head of zeros (0 stays 0), a k head of 2e3 (f16) / 1e16 (its squares past f16 / bf16's
    range, f32's in reach); the v heads bit for bit untouched."""
    qkv = randn(rng, T, HQ + 2 * HKV, D, dtype=dtype) * 3
    big = 2e3 if dtype is F16 else 1e16
    qkv[0, 0] = 0.0
    qkv[0, HQ] = randn(rng, D, dtype=dtype) * big             # finite in f16 (< 1e4), its squares not
    assert qkv.isfinite().all()
    qkv_in = qkv.clone()
    pos = torch.from_numpy(rng.integers(0, 131072, T)).to(pdtype)
    pos[0] = 0
    if T > 1:
        pos[1] = 70000
    cos, sin = rope_cache(131072, D)
    qw, kw = randn(rng, D) * 0.5 + 1, randn(rng, D) * 0.5 + 1
    eps = 1e-6
    q, k = qkv[:, :HQ], qkv[:, HQ:HQ + HKV]
    launch(qk_norm_rope, backend, q, k, qw, kw, cos, sin, pos, eps, D=D)
    wq = qk_norm_rope_ref(qkv_in[:, :HQ], qw, cos, sin, pos, eps)
    wk = qk_norm_rope_ref(qkv_in[:, HQ:HQ + HKV], kw, cos, sin, pos, eps)
    close(qkv[:, :HQ], wq, scale=4)
    close(qkv[:, HQ:HQ + HKV], wk, scale=4)
    assert torch.equal(qkv[:, HQ + HKV:], qkv_in[:, HQ + HKV:])      # v untouched
    assert (qkv[0, 0] == 0).all()
    # position 0: cos 1, sin 0, so q's last head of token 0 is its normalization alone
    x = qkv_in[0, HQ - 1].double()
    close(qkv[0, HQ - 1], x * torch.rsqrt(x.pow(2).mean() + eps) * qw.double(), scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_rope_leaves_poisoned_neighbours_alone(backend, rng):
    """The packed tensor's v heads and a padding head between k and v all NaN: nothing of them is read into q or k
    (no NaN reaches them) and nothing is written over them (still NaN)."""
    T, HQ, HKV, D = 4, 3, 1, 16
    qkv = randn(rng, T, HQ + 2 * HKV + 1, D)
    qkv[:, HQ + HKV:] = math.nan
    qkv_in = qkv.clone()
    cos, sin = rope_cache(16, D)
    pos = torch.tensor([3, 0, 15, 7], dtype=I32)
    q, k = qkv[:, :HQ], qkv[:, HQ:HQ + HKV]
    launch(qk_norm_rope, backend, q, k, torch.ones(D), torch.ones(D), cos, sin, pos, 1e-6, D=D, BH=16)
    assert not qkv[:, :HQ + HKV].isnan().any()
    assert qkv[:, HQ + HKV:].isnan().all()
    close(qkv[:, HQ:HQ + HKV], qk_norm_rope_ref(qkv_in[:, HQ:HQ + HKV], torch.ones(D), cos, sin, pos, 1e-6))


# ---- 2. transposed convolution: a GEMM per tap, col2im by atomic adds through an overlapping view --------------------
@ts.kernel(grid=lambda X, WT, BN, KH, KW: (ts.cdiv(WT.shape[3], BN), X.shape[1] * KH * KW, X.shape[0]))
def convt_col2im(X, WT, YV, *, KH: int = 3, KW: int = 3, BW: int = 16, BN: int = 16, BK: int = 16):
    """YV[n, kh, kw, h, w, :] += X[n, h, w, :] @ WT[kh, kw] for every input pixel and tap: X (N, H, W, Cin)
    channels-last, WT (KH, KW, Cin, Cout) the (Cin, Cout, KH, KW) weight permuted, YV (N, KH, KW, H, W, Cout) an
    as_strided view of the padded f32 output at (n, s h + d kh, s w + d kw, c) (overlapping: atomic adds).
    Grid: (Cout blocks, H x taps, N)."""
    j, r, n = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    h, tap = r // (KH * KW), r % (KH * KW)
    kh, kw = tap // KW, tap % KW
    acc = ts.RegTile[ts.f32, BW, BN]()
    a = ts.SharedTile[X.dtype, BW, BK]()
    b = ts.SharedTile[WT.dtype, BK, BN]()
    for wt in ts.range(ts.cdiv(X.shape[2], BW)):
        ts.zero(acc)
        for kc in ts.range(ts.cdiv(X.shape[3], BK)):
            ts.load(a, X, at=(n, h, wt, kc))          # (BW, BK) pixels of row h, channels kc
            ts.load(b, WT, at=(kh, kw, kc, j))        # (BK, BN) the tap's (Cin, Cout) block
            ts.mma_AB(acc, a, b, acc)
        ts.atomic_add(YV, acc, at=(n, kh, kw, h, wt, j))


@ts.kernel(grid=lambda Y, BN: (ts.cdiv(Y.shape[3], BN), Y.shape[1], Y.shape[0]))
def convt_finish(YP, BIAS, Y, *, HAS_BIAS: bool = True, BW: int = 16, BN: int = 16):
    """Y (N, OH, OW, Cout) = YP (the padded sum's cropped view) + BIAS, in Y's dtype. Grid: (Cout blocks, OH, N)."""
    j, oh, n = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    bias = ts.RegVec[ts.f32, BN]()
    if HAS_BIAS:
        ts.load(bias, BIAS, at=(j,))
    y = ts.RegTile[ts.f32, BW, BN]()
    out = ts.RegTile[Y.dtype, BW, BN]()
    for wt in ts.range(ts.cdiv(Y.shape[2], BW)):
        ts.load(y, YP, at=(n, oh, wt, j))
        if HAS_BIAS:
            ts.add(y, y, ts.per_col(bias))
        ts.copy(out, y)
        ts.store(Y, out, at=(n, oh, wt, j))


def conv_transpose2d(backend, x, w, bias, stride, padding, dilation, output_padding, out_dtype, **tiles):
    """F.conv_transpose2d(x, w, bias, stride, padding, output_padding, dilation=dilation) by the two launches:
    x (N, Cin, H, W), w (Cin, Cout, KH, KW); the result (N, Cout, OH, OW) as a permuted channels-last tensor."""
    N, Cin, H, W = x.shape
    Cout, KH, KW = w.shape[1:]
    s, p, d, op = stride, padding, dilation, output_padding
    OH, OW = (H - 1) * s - 2 * p + d * (KH - 1) + op + 1, (W - 1) * s - 2 * p + d * (KW - 1) + op + 1
    OHp = max((H - 1) * s + d * (KH - 1) + 1, p + OH)             # every tap lands inside; the crop too
    OWp = max((W - 1) * s + d * (KW - 1) + 1, p + OW)
    ypad = torch.zeros(N, OHp, OWp, Cout)                           # f32 sums, channels-last
    sn, sh, sw, _ = ypad.stride()
    yv = ypad.as_strided((N, KH, KW, H, W, Cout), (sn, d * sh, d * sw, s * sh, s * sw, 1))
    launch(convt_col2im, backend, x.permute(0, 2, 3, 1), w.permute(2, 3, 0, 1), yv, KH=KH, KW=KW, **tiles)
    y = poisoned(N, OH, OW, Cout, dtype=out_dtype)
    launch(convt_finish, backend, ypad[:, p:p + OH, p:p + OW], bias if bias is not None else torch.zeros(Cout), y,
           HAS_BIAS=bias is not None)
    return y.permute(0, 3, 1, 2)


CONVT_CASES = [   # (N, Cin, H, W, Cout, KH, KW, stride, padding, dilation, output_padding)
    (2, 5, 5, 6, 7, 3, 3, 2, 1, 1, 1),      # the usual 2x upsampler; taps overlap (3 > 2)
    (1, 20, 4, 17, 18, 4, 2, 2, 1, 1, 0),   # K = 4 over stride 2; Cin, Cout, W past one tile, ragged
    (1, 3, 3, 3, 2, 3, 3, 1, 2, 2, 1),      # dilation 2, stride 1: every output a sum of many taps; padding 2
    (2, 1, 1, 1, 1, 1, 1, 3, 0, 1, 2),      # one pixel, a 1x1 kernel, output_padding 2: a bias-only border
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CONVT_CASES)
def test_conv_transpose2d(backend, dtype, case, rng):
    """Against F.conv_transpose2d in float64 on the same rounded inputs; the output in the input's dtype."""
    N, Cin, H, W, Cout, KH, KW, s, p, d, op = case
    x, w, bias = randn(rng, N, Cin, H, W, dtype=dtype), randn(rng, Cin, Cout, KH, KW, dtype=dtype), randn(rng, Cout)
    y = conv_transpose2d(backend, x, w, bias, s, p, d, op, dtype)
    want = F.conv_transpose2d(x.double(), w.double(), bias.double(), stride=s, padding=p, output_padding=op,
                              dilation=d)
    assert y.shape == want.shape
    close(y, want, scale=4 * math.sqrt(Cin * KH * KW))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_transpose2d_extremes(backend, rng):
    """f32, no bias: an input pixel of 1e30 (its taps' products 1e30-sized, the rest exact beside them), a NaN pixel
    reaching exactly the outputs its KH x KW taps land on, an inf weight of one tap spreading inf (or NaN where an
    inf meets the NaN or a zero's 0 * inf) only where that tap lands."""
    N, Cin, H, W, Cout, K, s, p = 1, 2, 4, 5, 3, 3, 2, 1
    x, w = randn(rng, N, Cin, H, W), randn(rng, Cin, Cout, K, K)
    x[0, 0, 0, 0] = 1e30
    x[0, 1, 3, 4] = math.nan
    y = conv_transpose2d(backend, x, w, None, s, p, 1, 1, torch.float32)
    want = F.conv_transpose2d(x.double(), w.double(), None, stride=s, padding=p, output_padding=1)
    assert torch.equal(y.isnan(), want.isnan())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4, equal_nan=True)
    w[0, 1, 2, 2] = math.inf
    x[0, 1, 3, 4] = 0.5
    y = conv_transpose2d(backend, x, w, None, s, p, 1, 0, torch.float32)
    want = F.conv_transpose2d(x.double(), w.double(), None, stride=s, padding=p)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    fin = want.isfinite()
    torch.testing.assert_close(y.double()[fin], want[fin], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_transpose2d_of_an_empty_batch_and_no_input_channels(backend, rng):
    """N = 0: no programs, an empty output; Cin = 0: a K loop of no trips, the output the bias alone (bf16)."""
    y = conv_transpose2d(backend, torch.zeros(0, 3, 4, 4), torch.zeros(3, 2, 3, 3), torch.ones(2), 2, 1, 1, 0,
                         torch.float32)
    assert y.shape == (0, 2, 7, 7)
    bias = randn(rng, 5)
    y = conv_transpose2d(backend, torch.zeros(1, 0, 3, 2, dtype=BF), torch.zeros(0, 5, 2, 2, dtype=BF), bias, 2, 0,
                         1, 0, BF)
    assert y.shape == (1, 5, 6, 4)
    assert torch.equal(y, bias.to(BF)[None, :, None, None].expand(1, 5, 6, 4))


# ---- 3. GPTQ-style W8A16 GEMM with act-order: each K row's group from g_idx ------------------------------------------
@ts.kernel(grid=lambda A, QW, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(QW.shape[1], BN)))
def w8a16_act_order(A, QW, SCALES, ZEROS, GIDX, C, *, BM: int = 16, BN: int = 16, BK: int = 16, BG: int = 16):
    """C (M, N) = A (M, K) @ W, W[k, n] = (QW[k, n] - ZEROS[g, n]) SCALES[g, n] for g = GIDX[k] (GPTQ's desc_act: the
    groups in any order along K): QW, ZEROS u8 codes, SCALES (G, N) f16 / bf16. Each K tile's scales and zero points
    are gathered row by row by one-hot products with the (G, N) tables in SCALES' dtype on the matrix units (one
    product of 1 a row, exact in f32; codes up to 255 exact in 16 bits); the dequantized tile in A's dtype is the
    product's B operand. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    G = SCALES.shape[0]
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    a = ts.SharedTile[A.dtype, BM, BK]()
    q = ts.RegTile[ts.f32, BK, BN]()
    s, z = ts.RegTile[ts.f32, BK, BN](), ts.RegTile[ts.f32, BK, BN]()
    g = ts.RegVec[ts.i32, BK]()
    gcol = ts.RegVec[ts.i32, BG]()
    pick = ts.RegTile[ts.bool_, BK, BG]()
    onehot = ts.RegTile[SCALES.dtype, BK, BG]()
    st, zt = ts.SharedTile[SCALES.dtype, BG, BN](), ts.SharedTile[SCALES.dtype, BG, BN]()
    w = ts.RegTile[A.dtype, BK, BN]()
    w_s = ts.SharedTile[A.dtype, BK, BN]()          # wgmma's B operand lives in shared memory
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(q, QW, at=(k, j))                    # (BK, BN) codes 0..255
        ts.load(g, GIDX, at=(k,))                    # (BK,) each row's group (rows past K: group 0, A's zeros)
        ts.zero(s)
        ts.zero(z)
        for gt in ts.range(ts.cdiv(G, BG)):
            ts.arange(gcol, gt * BG)
            ts.eq(pick, ts.per_row(g), ts.per_col(gcol))
            ts.where(onehot, pick, 1.0, 0.0)         # (BK, BG) row k picks its group's row of the table
            ts.load(st, SCALES, at=(gt, j))
            ts.load(zt, ZEROS, at=(gt, j))
            ts.mma_AB(s, onehot, st, s)
            ts.mma_AB(z, onehot, zt, z)
        ts.sub(q, q, z)
        ts.mul(q, q, s)
        ts.copy(w, q)                                # dequantized in A's dtype, as GPTQ's kernels do
        ts.copy(w_s, w)
        ts.mma_AB(acc, a, w_s, acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("M", "K", "N", "gs", "gdtype"), [(5, 70, 37, 32, I32), (1, 128, 48, 16, I64),
                                                          (33, 20, 16, 20, I32)])
def test_w8a16_act_order(backend, dtype, M, K, N, gs, gdtype, rng):
    """Against float64 torch on the dequantized weights rounded to A's dtype as the kernel rounds them: act-order
    groups (g_idx = perm // group size for a random permutation of K, so every K tile mixes groups), a ragged last
    group (70 = 2 x 32 + 6), codes 0 and 255 with zero points 0 and 255, a GEMV (M = 1), one group (K = group size);
    the scales' table of more groups than one tile of BG."""
    G = -(-K // gs)
    perm = torch.from_numpy(rng.permutation(K))
    gidx = (perm // gs).to(gdtype)
    qw = torch.from_numpy(rng.integers(0, 256, (K, N))).to(torch.uint8)
    qw[0, :3] = torch.tensor([0, 255, 255], dtype=torch.uint8)
    zeros = torch.from_numpy(rng.integers(100, 156, (G, N))).to(torch.uint8)
    zeros[int(gidx[0]), :3] = torch.tensor([255, 0, 255], dtype=torch.uint8)
    scales = (torch.from_numpy(rng.random((G, N))) * 0.02 + 1e-3).to(dtype)
    a = randn(rng, M, K, dtype=dtype)
    c = poisoned(M, N, dtype=dtype)
    launch(w8a16_act_order, backend, a, qw, scales, zeros, gidx, c, BG=min(16, 2 ** max(0, (G - 1).bit_length())))
    g = gidx.long()
    w = ((qw.double() - zeros.double()[g]) * scales.double()[g]).to(dtype).double()
    want = a.double() @ w
    close(c, want, scale=math.sqrt(K))
