"""Quantized GEMMs for linear layers, written in the tile language: y = x @ W^T with W stored in 8 bits, one
f32 scale per output channel (a row of W), applied to the f32 accumulator with the bias in the epilogue.

    q, s = quantize_weight(w, "int8")                 # w: (N, K) float -> q: (N, K) int8, s: (N,) f32
    y = quantized_linear(x, q, s, bias)               # weight-only: x (M, K) f32/bf16/f16 -> (M, N), x's dtype
    q, s = quantize_weight(w, "fp8")                  # q: (N, K) float8_e4m3fn
    y = quantized_linear(x, q, s, bias, x_scale=0.02) # fp8 weights and activations: x -> fp8(x * (1 / x_scale))

Kernels (each launch picks one; tile sizes are ``ts.tunable``, launch options default to Hopper's):

- ``qgemm_kernel`` with a float X (weight-only int8 or fp8, what ``quantized_linear`` launches): the W tile is
  widened to x's dtype in registers (exact: an int8 or an E4M3 value is a bf16 value) and written back to shared
  memory as the mma's second operand each step (0.56-0.89x bf16 cuBLAS on GPT-2's layers on the H200).
- ``qgemm_wonly_kernel`` (weight-only, an alternative kept for measurement: ``bench_inference.py``'s ``int8-w``
  row): computes Y^T = W X^T so that the widened W tile is the mma's first operand, read from registers. In
  principle the faster form; measured slower on the H200 (0.49-0.70x) because the transposed output view loses
  TMA for the whole kernel (the launcher falls back to pointer loads).
- ``qgemm_act_kernel`` (fp8 weights and activations): loads x's tile in its own dtype, multiplies by 1 / x_scale
  (the static per-tensor scale calibrated beforehand), clamps to +-448, rounds to E4M3 in registers
  (``quantize_tile_fp8``) and feeds it with the fp8 W tile to the fp8 mma (H100/H200: twice bf16's rate);
  the accumulator is scaled by x_scale * s[n]. No pass over x of its own.
- ``qgemm_kernel``: activations already in fp8 (or weight-only, the slow form kept as the plain spelling);
  ``quantize_fp8_kernel`` quantizes activations in a pass of their own for that.

Programs walk the output in groups of GROUP_M block-rows, as ``tilestack.kernels.gemm``.
"""

from __future__ import annotations

import math

import torch

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.ir.types import F8E4M3_MAX
from tilestack.kernels._checks import check_same_device, check_tensor, finite_real, nothing_to_launch, refuse_derived
from tilestack.kernels._plan import planned
from tilestack.kernels.gemm import ACTIVATIONS, epilogue, grouped_tile, torch_activation
from tilestack.tune.lookup import DEFAULT_BACKEND, launch_config, take_backend, tuned_launcher

INT8_MAX = 127                                       # symmetric int8: [-127, 127], zero exactly representable
# an activation or output scale's range: an f32 normal whose inverse (what the kernels multiply by) is finite in f32
MIN_SCALE, MAX_SCALE = 2.0 ** -126, 3.4028234663852886e38
MODES = ("int8", "fp8")


def _grid(X, W, BM, BN):
    return (ts.cdiv(X.shape[0], BM) * ts.cdiv(W.shape[0], BN),)


def _grid_t(X, W, BM, BN):
    return (ts.cdiv(W.shape[0], BN) * ts.cdiv(X.shape[0], BM),)


def quantize_tile_fp8(q, x, inv_scale, BM: int, BN: int) -> None:
    """q (BM, BN) f8e4m3 = E4M3(clamp(x * inv_scale, -448, 448)) for a tile x of any float dtype, rounded to
    nearest even; NaN stays NaN (the comparisons are False for it, so neither bound replaces it). The static
    per-tensor activation quantizer, shared by ``quantize_fp8_kernel`` and ``qgemm_act_kernel``."""
    xf = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[ts.bool_, BM, BN]()
    ts.copy(xf, x)
    ts.mul(xf, xf, inv_scale)
    ts.gt(out, xf, F8E4M3_MAX)                       # saturate: E4M3 has no infinity
    ts.where(xf, out, F8E4M3_MAX, xf)
    ts.lt(out, xf, -F8E4M3_MAX)
    ts.where(xf, out, -F8E4M3_MAX, xf)
    ts.copy(q, xf)


def _scale_and_store(acc, S, Bias, R, Y, x_scale, i, j, *, activation, BM: int, BN: int,
                     y_inv_scale=None) -> None:
    """acc (BM, BN) f32 of tile (i, j) of X @ W^T -> Y: times x_scale * S[n], then kernels.gemm's epilogue;
    with ``y_inv_scale`` (an fp8 Y: the next layer's activations) times that, saturated to +-448 by the cast."""
    s = ts.RegVec[ts.f32, BN]()
    ts.load(s, S, at=(j,))                           # (BN,) per output channel
    ts.mul(s, s, x_scale)                            # x_scale * S[n] once per column: one multiply per acc element
    ts.mul_col(acc, acc, s)
    epilogue(acc, Bias, R, i, j, activation=activation, BM=BM, BN=BN)
    if y_inv_scale is not None:
        ts.mul(acc, acc, y_inv_scale)
    c = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(c, acc)
    ts.store(Y, c, at=(i, j))


@ts.kernel(grid=_grid, options=dict(num_warps=8, num_stages=4))
def qgemm_kernel(X, W, S, Bias, R, Y, x_scale: float, *,
                 BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                 BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                 BK: int = ts.tunable(128, (16, 32, 64, 128)),
                 GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                 HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # X: (M, K) fp8 (activations quantized beforehand) or f32/bf16/f16 (weight-only: W widened to X's dtype in
    # the loop; ``qgemm_wonly_kernel`` is the transposed alternative); W: (N, K) int8 or fp8; S: (N,) f32; Bias: (N,),
    # read only with HAS_BIAS; R: (M, N), read only with HAS_RESIDUAL; Y: (M, N).
    # Y = activation(x_scale * (X @ W^T) * S[None, :] + Bias) + R: kernels.gemm's epilogue after the scales
    i, j = grouped_tile(X.shape[0], W.shape[0], BM, BN, GROUP_M)
    _output_tile(X, W, S, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, Y, x_scale, i, j,
                 _tiles(X, W, BM, BN, BK), activation=activation, BM=BM, BN=BN, BK=BK)


def _tiles(X, W, BM: int, BN: int, BK: int):
    """(acc, a, w, wx) of qgemm_kernel's body: wx is W's tile widened to X's dtype (weight-only), else w."""
    w = ts.SharedTile[W.dtype, BN, BK]()
    widen = X.dtype != W.dtype                       # weight-only: W widened to X's dtype before the mma
    return (ts.RegTile[ts.f32, BM, BN](), ts.SharedTile[X.dtype, BM, BK](), w,
            ts.RegTile[X.dtype, BN, BK]() if widen else w)


def _output_tile(X, W, S, Bias, R, Y, x_scale, i, j, tiles, *, activation, BM: int, BN: int, BK: int,
                 y_inv_scale=None) -> None:
    """Output tile (i, j) of qgemm_kernel: the K loop of X @ W^T into the f32 accumulator, then the scales and
    the epilogue (``Bias``, ``R``: None when absent; ``y_inv_scale``: an fp8 Y's quantizing factor)."""
    acc, a, w, wx = tiles
    ts.zero(acc)
    for k in ts.range(ts.smax(ts.cdiv(X.shape[1], BK), 1)):  # >= 1 trip: ptxas serializes the wgmmas otherwise
        ts.load(a, X, at=(i, k))                     # (BM, BK)
        ts.load(w, W, at=(j, k))                     # (BN, BK): W's rows are K-major, as fp8 mma wants B
        if wx is not w:
            ts.copy(wx, w)
        ts.mma_ABt(acc, a, wx, acc)
    _scale_and_store(acc, S, Bias, R, Y, x_scale, i, j, activation=activation, BM=BM, BN=BN,
                     y_inv_scale=y_inv_scale)


@ts.kernel(grid=_grid, options=dict(num_warps=4, num_stages=3))
def qgemm_fp8_out_kernel(X, W, S, Bias, R, Y, x_scale: float, y_inv_scale: float, *,
                         BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                         BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                         BK: int = ts.tunable(128, (16, 32, 64, 128)),
                         GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                         HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # qgemm_kernel writing the next layer's fp8 activations: Y (M, N) float8_e4m3fn =
    # fp8((activation(x_scale * (X @ W^T) * S[None, :] + Bias) + R) * y_inv_scale), y_inv_scale = 1 / the next
    # layer's calibrated x_scale; the cast rounds to nearest even and saturates to +-448 (NaN stays NaN). The
    # producer side of a chain of fp8 linear layers (GPT-2's c_fc + GELU feeding c_proj), as TensorRT fuses the
    # quantize into the op before it. X fp8 (or float, weight-only), W fp8; tiles as qgemm_kernel's.
    i, j = grouped_tile(X.shape[0], W.shape[0], BM, BN, GROUP_M)
    _output_tile(X, W, S, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, Y, x_scale, i, j,
                 _tiles(X, W, BM, BN, BK), activation=activation, BM=BM, BN=BN, BK=BK, y_inv_scale=y_inv_scale)


def _grid_persistent(X, W, BM, BN, PROGRAMS):
    return (ts.smin(ts.cdiv(X.shape[0], BM) * ts.cdiv(W.shape[0], BN), PROGRAMS),)


@ts.kernel(grid=_grid_persistent, options=dict(num_warps=8, num_stages=4))
def qgemm_persistent_kernel(X, W, S, Bias, R, Y, x_scale: float, *,
                            BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                            BN: int = ts.tunable(256, (16, 32, 64, 128, 256)),
                            BK: int = ts.tunable(64, (16, 32, 64, 128)),
                            GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                            PROGRAMS: int = 132,
                            HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # qgemm_kernel's arguments and result, persistent: min(tiles, PROGRAMS) programs (PROGRAMS: the GPU's SM
    # count, from the launcher) each walk output tiles t = program, program + PROGRAMS, ... in grouped order. For
    # short K (GPT-2's K = 768 is 12 k-steps of 64) a tile's prologue loads and epilogue weigh as much as its
    # mainloop; the tile loop is flattened with the K loop (``flatten``), so Triton's pipeliner issues the next
    # tile's first loads while this tile's epilogue runs, instead of draining and refilling per tile.
    M, N = X.shape[0], W.shape[0]
    tiles = _tiles(X, W, BM, BN, BK)
    for t in ts.range(ts.block_id(0), ts.cdiv(M, BM) * ts.cdiv(N, BN), ts.num_blocks(0), flatten=True):
        i, j = grouped_tile(M, N, BM, BN, GROUP_M, tile=t)
        _output_tile(X, W, S, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, Y, x_scale, i, j, tiles,
                     activation=activation, BM=BM, BN=BN, BK=BK)


@ts.kernel(grid=_grid, options=dict(num_warps=8, num_stages=4))
def qgemm_act_kernel(X, W, S, Bias, R, Y, x_scale: float, inv_x_scale: float, *,
                     BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                     BN: int = ts.tunable(256, (16, 32, 64, 128, 256)),
                     BK: int = ts.tunable(64, (16, 32, 64, 128)),
                     GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                     HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # fp8 weights and activations, the activations quantized in the loop (no pass of their own): X (M, K)
    # f32/bf16/f16, each (BM, BK) tile loaded in its dtype, times inv_x_scale (1 / x_scale, the calibrated static
    # per-tensor scale), clamped to +-448 and rounded to E4M3 in registers, then the fp8 x fp8 mma with W (N, K)
    # fp8; S, Bias, R, Y and the epilogue as qgemm_kernel. A wide BN spreads the quantizing (BM x BK per step)
    # over more mma work (BM x BN x BK). Defaults for sm_90a (Triton 3.6, bf16 X): 189 registers, no spills,
    # 120 KiB of shared memory in 4 stages (BK = 128 needs 3 stages to fit: 176 KiB, 226 registers); the loop is
    # QGMMA.64x256x32.F32.E4M3.E4M3 with the quantized tile as the register operand.
    M, K = X.shape
    N = W.shape[0]
    i, j = grouped_tile(M, N, BM, BN, GROUP_M)

    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[X.dtype, BM, BK]()
    a8 = ts.RegTile[ts.f8e4m3, BM, BK]()
    w = ts.SharedTile[W.dtype, BN, BK]()
    ts.zero(acc)
    for k in ts.range(ts.smax(ts.cdiv(K, BK), 1)):  # >= 1 trip: ptxas serializes the wgmmas otherwise
        ts.load(a, X, at=(i, k))                     # (BM, BK) in X's dtype; zeros past the edges stay zeros
        ts.load(w, W, at=(j, k))                     # (BN, BK) fp8, K-major
        quantize_tile_fp8(a8, a, inv_x_scale, BM, BK)
        ts.mma_ABt(acc, a8, w, acc)
    _scale_and_store(acc, S, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, Y, x_scale, i, j,
                     activation=activation, BM=BM, BN=BN)


@ts.kernel(grid=_grid_t, options=dict(num_warps=8, num_stages=4))
def qgemm_wonly_kernel(X, W, S, Bias, RT, YT, *,
                       BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                       BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                       BK: int = ts.tunable(64, (16, 32, 64, 128)),
                       GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                       HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # Weight-only int8/fp8, computed transposed: YT (N, M) = activation((W * S[:, None]) @ X^T + Bias[:, None])
    # + RT, with YT and RT the (N, M) views y.t() and r.t() of the (M, N) output and residual. The widened W tile
    # is the mma's first operand, which may come from registers: converted there it goes straight to the tensor
    # cores, where as the second operand it has to be written back to shared memory first, and the mma of one
    # step cannot overlap the conversion of the next. W's BN rows are the mma's rows (64 per warpgroup), so a
    # decode step's few rows of X fit a narrow BM. X: (M, K) f32/bf16/f16; W: (N, K) int8 or fp8; S: (N,) f32.
    M, K = X.shape
    N = W.shape[0]
    j, i = grouped_tile(N, M, BN, BM, GROUP_M)

    acc = ts.RegTile[ts.f32, BN, BM]()               # a tile of Y^T
    a = ts.SharedTile[X.dtype, BM, BK]()
    w = ts.SharedTile[W.dtype, BN, BK]()
    wx = ts.RegTile[X.dtype, BN, BK]()
    ts.zero(acc)
    for k in ts.range(ts.smax(ts.cdiv(K, BK), 1)):  # >= 1 trip: ptxas serializes the wgmmas otherwise
        ts.load(w, W, at=(j, k))                     # (BN, BK) 8-bit
        ts.load(a, X, at=(i, k))                     # (BM, BK)
        ts.copy(wx, w)                               # exact: int8 and E4M3 values are bf16 (and f16) values
        ts.mma_ABt(acc, wx, a, acc)                  # (BN, BM) += W (BN, BK) @ X^T (BK, BM)
    s = ts.RegVec[ts.f32, BN]()
    ts.load(s, S, at=(j,))                           # (BN,) per output channel: a row of Y^T
    ts.mul_row(acc, acc, s)
    if HAS_BIAS:
        b = ts.RegVec[Bias.dtype, BN]()
        ts.load(b, Bias, at=(j,))
        b32 = ts.RegVec[ts.f32, BN]()
        ts.copy(b32, b)
        ts.add_row(acc, acc, b32)
    epilogue(acc, None, RT if HAS_RESIDUAL else None, j, i, activation=activation, BM=BN, BN=BM)
    c = ts.RegTile[YT.dtype, BN, BM]()
    ts.copy(c, acc)
    ts.store(YT, c, at=(j, i))


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)),
           options=dict(num_warps=4, num_stages=1))
def quantize_fp8_kernel(X, Q, inv_scale: float, *,
                        BM: int = ts.tunable(32, (8, 16, 32, 64, 128)),
                        BN: int = ts.tunable(128, (32, 64, 128, 256))):
    # Q = fp8(clamp(X * inv_scale, -448, 448)); X: (M, K) float, Q: (M, K) fp8 E4M3. quantized_linear does this
    # inside the GEMM (qgemm_act_kernel); this pass is for activations quantized once and used more than once.
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    q = ts.RegTile[ts.f8e4m3, BM, BN]()
    ts.load(x, X, at=(i, j))
    quantize_tile_fp8(q, x, inv_scale, BM, BN)
    ts.store(Q, q, at=(i, j))


# ---- plain PyTorch references -----------------------------------------------------------------------------------
def quantize_weight(w, mode: str):
    """(q, scale): w (N, K) float quantized per output channel (row) to int8 (symmetric, [-127, 127]) or fp8
    E4M3, with w ~= q * scale[:, None]. A row of zeros gets scale 1; a scale is at least f32's smallest normal
    (a row of subnormal weights gave amax / top = 0 in f32: int8 zeros, and fp8 NaN from 0 / 0)."""
    import torch

    check_tensor("quantize_weight", "w", w, rank=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if mode not in MODES:
        raise LaunchError(f"quantize_weight: mode={mode!r}; expected one of {MODES}")
    top = INT8_MAX if mode == "int8" else F8E4M3_MAX
    wf = w.detach().float()
    if not w.is_meta and not bool(torch.isfinite(wf).all()):      # (meta: shapes only, no values to check)
        raise LaunchError(f"quantize_weight: w {tuple(w.shape)} holds NaN or infinite values; expected finite "
                          "weights (a scale made from them would poison every output of the channel)")
    amax = wf.abs().amax(dim=1) if w.shape[1] else wf.new_zeros(w.shape[0])   # (N,)
    scale = torch.where(amax > 0, (amax / top).clamp(min=MIN_SCALE), torch.ones_like(amax))
    ratio = wf / scale[:, None]
    if mode == "int8":
        q = ratio.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = ratio.clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def activation_scale(amax: float) -> float:
    """The per-tensor fp8 scale for activations whose calibrated largest magnitude is ``amax``: the smallest power
    of two with amax / scale <= 448 (amax lands in (224, 448]; 1 for amax 0, at least ``MIN_SCALE``).

    A power of two because E4M3 is a floating-point format: dividing by 2^e only shifts exponents, so x / scale
    rounds exactly as x itself would (same relative error, whatever amax is), and values already on the E4M3 grid
    stay exact: the digits' pixels k / 16 (k = 0..16) quantize without error, where amax / 448 maps them to 28 k,
    off the grid from k = 3 on (docs/inference.md, "Accuracy"). Its inverse is exact in f32 too, so the kernels'
    f32(1 / x_scale) and the fp8_chain pass's norm weights times 1 / x_scale round nothing. The cost: at most one
    of E4M3's 18 binades left unused at the top."""
    if not amax > 0:
        return 1.0
    amax = float(amax)
    scale = math.ldexp(1.0, math.frexp(amax / F8E4M3_MAX)[1])     # 2^e > amax / 448 (frexp's mantissa is < 1)
    if amax <= F8E4M3_MAX * (scale / 2):                           # amax / 448 a power of two itself
        scale /= 2
    return max(scale, MIN_SCALE)


def inverse_scale(x_scale: float) -> float:
    """1 / x_scale rounded to f32: the factor the kernels multiply activations by (an f32 argument on a GPU), so
    that the reference and every backend quantize with the same number."""
    import numpy as np

    return float(np.float32(1.0 / float(x_scale)))


def quantize_activation(x, x_scale: float):
    """x (float) -> E4M3 x * inv_x_scale, clamped to +-448, NaN kept: what the kernels do to activations, by
    torch (f32 product, then its round-to-nearest-even cast)."""
    import torch

    return (x.float() * inverse_scale(x_scale)).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)


def reference(x, q, scale, bias=None, x_scale=None, *, activation: str | None = None, residual=None):
    """What ``quantized_linear`` computes, in float64 then rounded to x's dtype: the same fp8 rounding of x
    (``quantize_activation``) when x_scale is given."""
    xf = x.double()
    if x_scale is not None:
        xf = quantize_activation(x, x_scale).double() * x_scale
    y = xf @ (q.double() * scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    y = torch_activation(y, activation)
    if residual is not None:
        y = y + residual.double()
    return y.to(x.dtype)


# ---- the public function ----------------------------------------------------------------------------------------
# weight-only on a GPU: BK 64 in 3 stages (the first H200 run's config, 0.56-0.89x bf16 cuBLAS on GPT-2's layers)
WEIGHT_ONLY_CUDA_CONFIG = dict(BK=64, num_stages=3)
# fp8 x fp8 on a GPU without a tuned entry (tune/tables/qgemm_*): the H200's best single config over GPT-2's four
# linear layers (scripts/gpu/probe_fp8_gemm.py, 2026-12-03: 1.44-1.57x bf16 cuBLAS, kernel time), one warpgroup
# with a 128 x 128 accumulator (2 blocks per SM)
FP8_CUDA_CONFIG = dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=3)
# How fp8 weights-and-activations quantize a float x, by device type: "gemm" in the GEMM's loop (qgemm_act_kernel:
# no pass of its own, but each x tile is quantized once per column block and goes through shared memory on the
# critical path), "pass" a quantizing pass then the fp8 x fp8 GEMM (qgemm_kernel); docs/inference.md
ACT_QUANT = {"cuda": "pass"}
ACT_QUANT_MODES = ("gemm", "pass")


def quantized_linear(x, q, scale, bias=None, *, x_scale: float | None = None, activation: str | None = None,
                     residual=None, out_dtype=None, out_scale: float | None = None, act_quant: str | None = None,
                     backend: str | None = None, **config):
    """y = activation(x @ (q * scale[:, None])^T + bias) + residual for x (M, K), q (N, K) int8 or
    float8_e4m3fn, scale (N,) f32, bias (N,) float or None, activation None or one of
    ``tilestack.kernels.gemm.ACTIVATIONS``, residual (M, N) float or None.

    x f32/bf16/f16: weight-only without ``x_scale``; with it (fp8 q only) x is quantized to fp8 (x / x_scale,
    saturated) and the product runs in fp8, the quantizing done as ``act_quant`` says ("gemm": in the GEMM's
    loop, "pass": a pass of its own first; None: ``ACT_QUANT`` by device, "gemm" off a GPU). y in x's dtype.
    x float8_e4m3fn: activations quantized already (by their producer, as TensorRT's fp8 graphs carry them),
    ``x_scale`` required (x's values times x_scale are the activations); y in ``out_dtype`` (default bf16).
    ``out_scale`` (fp8 q and x_scale only): y itself quantized, float8_e4m3fn y / out_scale saturated to +-448,
    the next fp8 layer's activations (``qgemm_fp8_out_kernel``; a float x takes a quantizing pass first).
    The epilogue is ``tilestack.kernels.gemm``'s, on the f32 accumulator. Meta tensors give a meta result.
    Checks, config and launcher are planned once per launch signature (``kernels._plan``)."""
    # NumPy's numbers as Python floats (the kernels' scalar arguments); anything else is refused by the checks
    x_scale = float(x_scale) if finite_real(x_scale) else x_scale
    out_scale = float(out_scale) if finite_real(out_scale) else out_scale
    return _planned_linear(x, q, scale, bias, x_scale=x_scale, activation=activation, residual=residual,
                           out_dtype=out_dtype, out_scale=out_scale, act_quant=act_quant, backend=backend, **config)


def _check_scale(name: str, value) -> None:
    if not finite_real(value) or not MIN_SCALE <= value <= MAX_SCALE:
        raise LaunchError(f"quantized_linear: {name} must be a finite number > 0, got {value!r} (at least "
                          f"{MIN_SCALE:.4g} and at most {MAX_SCALE:.4g}: it and its inverse are f32 in the kernels)")


def _check_linear(x, q, scale, bias, x_scale, activation, residual, out_dtype, act_quant, out_scale=None) -> None:
    """Every check of quantized_linear's arguments, before any work (once per signature)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor("quantized_linear", "x", x, rank=2, dtypes=(*floats, torch.float8_e4m3fn))
    check_tensor("quantized_linear", "q", q, rank=2, dtypes=(torch.int8, torch.float8_e4m3fn))
    check_tensor("quantized_linear", "scale", scale, rank=1, dtypes=(torch.float32,))
    if q.shape[1] != x.shape[1]:
        raise LaunchError(f"quantized_linear: x is {tuple(x.shape)} and q is {tuple(q.shape)}; q.shape[1] must "
                          "equal x.shape[1] (q is (out_features, in_features))")
    if scale.shape[0] != q.shape[0]:
        raise LaunchError(f"quantized_linear: scale has {scale.shape[0]} elements; expected q.shape[0] = "
                          f"{q.shape[0]} (one per output channel)")
    if bias is not None:
        check_tensor("quantized_linear", "bias", bias, rank=1, dtypes=floats)
        if bias.shape[0] != q.shape[0]:
            raise LaunchError(f"quantized_linear: bias has {bias.shape[0]} elements; expected q.shape[0] = "
                              f"{q.shape[0]}")
    if activation is not None and activation not in ACTIVATIONS:
        raise LaunchError(f"quantized_linear: activation={activation!r}; expected None or one of {ACTIVATIONS}")
    if residual is not None:
        check_tensor("quantized_linear", "residual", residual, rank=2, dtypes=floats)
        if tuple(residual.shape) != (x.shape[0], q.shape[0]):
            raise LaunchError(f"quantized_linear: residual is {tuple(residual.shape)}; expected the output's shape "
                              f"(x.shape[0], q.shape[0]) = {(x.shape[0], q.shape[0])}")
    fp8_x = x.dtype == torch.float8_e4m3fn
    if fp8_x and x_scale is None:
        raise LaunchError("quantized_linear: x is float8_e4m3fn (activations quantized already) and needs "
                          "x_scale=<the scale they were quantized with>")
    if x_scale is not None:
        if q.dtype != torch.float8_e4m3fn:
            raise LaunchError(f"quantized_linear: x_scale is for fp8 weights and activations; q is {q.dtype}")
        _check_scale("x_scale", x_scale)
    if out_scale is not None:
        if x_scale is None:
            raise LaunchError("quantized_linear: out_scale (an fp8 output) is for fp8 weights and activations; "
                              "give x_scale too")
        _check_scale("out_scale", out_scale)
        if out_dtype is not None:
            raise LaunchError(f"quantized_linear: out_dtype={out_dtype!r} and out_scale: the output of out_scale "
                              "is float8_e4m3fn; give one of them")
    if out_dtype is not None and (not fp8_x or out_dtype not in floats):
        raise LaunchError(f"quantized_linear: out_dtype={out_dtype!r} is for a float8_e4m3fn x (the output of a "
                          "float x is in x's dtype); expected None or one of torch.float32, torch.bfloat16, "
                          "torch.float16")
    if act_quant is not None and (act_quant not in ACT_QUANT_MODES or x_scale is None or fp8_x or (
            out_scale is not None and act_quant != "pass")):
        raise LaunchError(f"quantized_linear: act_quant={act_quant!r}; expected None, or one of {ACT_QUANT_MODES} "
                          "with a float x and x_scale (how the activations are quantized; with out_scale only "
                          "'pass')")
    check_same_device("quantized_linear", x=x, q=q, scale=scale, bias=bias, residual=residual)


def fp8_config(m: int, n: int, k: int, device, backend: str | None = DEFAULT_BACKEND) -> dict:
    """The fp8 x fp8 GEMM's config for this size: tune's tables ("qgemm", by the largest dimension), else
    ``FP8_CUDA_CONFIG`` on a GPU, else the kernel's defaults."""
    default = FP8_CUDA_CONFIG if getattr(device, "type", device) == "cuda" else {}
    return launch_config("qgemm", "float8_e4m3fn", device, max(m, n, k), dict(default), backend)


# the kernels' epilogue flags quantized_linear sets from its arguments (a caller's clashed: a bare TypeError)
QGEMM_DERIVED = {"HAS_BIAS": "its bias argument", "HAS_RESIDUAL": "its residual argument",
                 "activation": "its activation argument"}


@planned(name="quantized_linear")
def _planned_linear(x, q, scale, bias=None, *, x_scale=None, activation=None, residual=None, out_dtype=None,
                    out_scale=None, act_quant=None, backend=None, **config):
    import torch

    _check_linear(x, q, scale, bias, x_scale, activation, residual, out_dtype, act_quant, out_scale)
    refuse_derived("quantized_linear", config, QGEMM_DERIVED)
    run = _linear_run(x, q, scale, bias, x_scale=x_scale, activation=activation, residual=residual,
                      out_dtype=out_dtype, out_scale=out_scale, act_quant=act_quant, backend=backend, **config)
    # scale among them: a scale that requires grad (a learned one, being fine-tuned) got a y outside the graph, so a
    # loss with other terms trained them and left the scale's gradient None without a word
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, bias, residual))):
        return run
    # a gradient may be asked for: y joins the graph through a node whose backward refuses (inference only),
    # so a backward through it is an error, not a gradient silently dropped

    def run_recorded(x, q, scale, bias=None, *, residual=None, **kwargs):
        return _InferenceOnly.apply(run, (x, q, scale, bias), dict(kwargs, residual=residual), x, scale, bias,
                                    residual)
    return run_recorded


class _InferenceOnly(torch.autograd.Function):
    """y = run(*args, **kwargs) recorded against the tensors that may need a gradient; its backward refuses."""

    @staticmethod
    def forward(ctx, run, args, kwargs, *tensors):
        return run(*args, **kwargs)

    @staticmethod
    def backward(ctx, *_):
        raise LaunchError("quantized_linear: a backward through a quantized linear layer; it runs inference only "
                          "(no gradient for x, the scale, the bias or the residual): keep it out of training, or call "
                          "it under torch.no_grad() / torch.inference_mode()")


def _linear_run(x, q, scale, bias=None, *, x_scale=None, activation=None, residual=None, out_dtype=None,
                out_scale=None, act_quant=None, backend=None, **config):
    """``run`` of one checked signature: the config and the launcher chosen; ``run`` allocates and launches."""
    import torch

    fp8_x = x.dtype == torch.float8_e4m3fn
    dtype = torch.float8_e4m3fn if out_scale is not None else (out_dtype or torch.bfloat16) if fp8_x else x.dtype
    shape = (x.shape[0], q.shape[0])

    def output(x):
        return torch.empty(shape, dtype=dtype, device=x.device)

    if nothing_to_launch(output(x)):
        return lambda x, *_, **__: output(x)
    # an absent bias or residual: scale stands in for it, never read (HAS_BIAS / HAS_RESIDUAL are False)
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, activation=activation)

    def tail(bias, residual):
        return (scale if bias is None else bias), (scale if residual is None else residual)

    b0, r0 = tail(bias, residual)
    if x_scale is None:   # weight-only: the direct form (the transposed qgemm_wonly_kernel measured slower on the
        # H200: 0.49-0.70x bf16 cuBLAS against 0.56-0.89x, docs/inference.md), with its H200-measured tiles
        tiles = WEIGHT_ONLY_CUDA_CONFIG if x.device.type == "cuda" else {}
        launch = qgemm_kernel.launcher_for((x, q, scale, b0, r0, output(x), 1.0), backend, **flags,
                                           **(tiles | config))

        def run_weight_only(x, q, scale, bias=None, *, residual=None, **_):
            y = output(x)
            launch((x, q, scale, *tail(bias, residual), y, 1.0))
            return y
        return run_weight_only
    xs = float(x_scale)
    how = act_quant or ACT_QUANT.get(x.device.type, "gemm")
    if not fp8_x and how == "gemm" and out_scale is None:   # x quantized in the GEMM's loop (K = 0: nothing to do)
        inv = inverse_scale(xs)
        launch = qgemm_act_kernel.launcher_for((x, q, scale, b0, r0, output(x), xs, inv), backend, **flags,
                                               **config)

        def run_in_gemm(x, q, scale, bias=None, *, residual=None, **_):
            y = output(x)
            launch((x, q, scale, *tail(bias, residual), y, xs, inv))
            return y
        return run_in_gemm
    # fp8 x (quantized by its producer), or a quantizing pass first: the fp8 x fp8 GEMM on both tiles from
    # shared memory at its tuned config
    cfg = fp8_config(x.shape[0], q.shape[0], x.shape[1], x.device, backend) | config
    asked, chosen = backend, take_backend(cfg, backend)
    xq0 = x if fp8_x else torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if out_scale is None:
        kernel, extra = qgemm_kernel, (xs,)
    else:             # the next layer's fp8 activations: times 1 / out_scale in the epilogue, cast saturating
        kernel, extra = qgemm_fp8_out_kernel, (xs, inverse_scale(out_scale))
    launch = tuned_launcher(kernel, (xq0, q, scale, b0, r0, output(x), *extra), chosen, asked, **flags, **cfg)
    if fp8_x:
        def run_fp8(x, q, scale, bias=None, *, residual=None, **_):
            y = output(x)
            launch((x, q, scale, *tail(bias, residual), y, *extra))
            return y
        return run_fp8
    inv = inverse_scale(xs)
    # K = 0: nothing to quantize (the GEMM gives the epilogue of zeros)
    quantize = quantize_fp8_kernel.launcher_for((x, xq0, inv), backend) if x.shape[1] else (lambda args: None)

    def run_two_pass(x, q, scale, bias=None, *, residual=None, **_):
        xq, y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device), output(x)
        quantize((x, xq, inv))
        launch((xq, q, scale, *tail(bias, residual), y, *extra))
        return y
    return run_two_pass
