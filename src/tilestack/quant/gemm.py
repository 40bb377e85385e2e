"""Quantized GEMMs for linear layers, written in the tile language: y = x @ W^T with W stored in 8 bits, one
f32 scale per output channel (a row of W), applied to the f32 accumulator with the bias in the epilogue.

    q, s = quantize_weight(w, "int8")                 # w: (N, K) float -> q: (N, K) int8, s: (N,) f32
    y = quantized_linear(x, q, s, bias)               # weight-only: x (M, K) f32/bf16/f16 -> (M, N), x's dtype
    q, s = quantize_weight(w, "fp8")                  # q: (N, K) float8_e4m3fn
    y = quantized_linear(x, q, s, bias, x_scale=0.02) # fp8 weights and activations: x -> fp8 (x / x_scale)

Weight-only (int8 or fp8): a W tile is loaded in 8 bits and widened to x's dtype in shared memory (exact:
an int8 or an E4M3 value is a bf16 value), then multiplied on the matrix units as usual; the memory traffic of
the weights halves against bf16. Weights and activations in fp8: x is quantized by ``quantize_fp8_kernel``
(x / x_scale, clamped to +-448, rounded to E4M3) and both operands of the mma are fp8 (the H100/H200 fp8
tensor cores, twice bf16's rate); the accumulator is scaled by x_scale * s[n].

Programs walk the output in groups of GROUP_M block-rows, as ``tilestack.kernels.gemm``.
"""

from __future__ import annotations

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.ir.types import F8E4M3_MAX
from tilestack.kernels._checks import check_same_device, check_tensor, nothing_to_launch
from tilestack.kernels.gemm import ACTIVATIONS, epilogue, grouped_tile, torch_activation

INT8_MAX = 127                                       # symmetric int8: [-127, 127], zero exactly representable
MODES = ("int8", "fp8")


def _grid(X, W, BM, BN):
    return (ts.cdiv(X.shape[0], BM) * ts.cdiv(W.shape[0], BN),)


@ts.kernel(grid=_grid, options=dict(num_warps=8, num_stages=3))   # Triton's launch options by default
def qgemm_kernel(X, W, S, Bias, R, Y, x_scale: float, *,
                 BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                 BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                 BK: int = ts.tunable(64, (16, 32, 64, 128)),
                 GROUP_M: int = ts.tunable(8, (1, 4, 8, 16)),
                 HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False, activation: str | None = None):
    # X: (M, K) f32/bf16/f16, or fp8 when W is fp8 too; W: (N, K) int8 or fp8; S: (N,) f32; Bias: (N,), read
    # only with HAS_BIAS; R: (M, N), read only with HAS_RESIDUAL; Y: (M, N).
    # Y = activation(x_scale * (X @ W^T) * S[None, :] + Bias) + R: kernels.gemm's epilogue after the scales
    M, K = X.shape
    N = W.shape[0]
    i, j = grouped_tile(M, N, BM, BN, GROUP_M)

    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[X.dtype, BM, BK]()
    w = ts.SharedTile[W.dtype, BN, BK]()
    widen = X.dtype != W.dtype                       # weight-only: W widened to X's dtype before the mma
    wx = ts.SharedTile[X.dtype, BN, BK]() if widen else w
    ts.zero(acc)
    for k in ts.range(ts.cdiv(K, BK)):
        ts.load(a, X, at=(i, k))                     # (BM, BK)
        ts.load(w, W, at=(j, k))                     # (BN, BK): W's rows are K-major, as fp8 mma wants B
        if widen:
            ts.copy(wx, w)
        ts.mma_ABt(acc, a, wx, acc)
    s = ts.RegVec[ts.f32, BN]()
    ts.load(s, S, at=(j,))                           # (BN,) per output channel
    ts.mul_col(acc, acc, s)
    ts.mul(acc, acc, x_scale)
    epilogue(acc, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, i, j, activation=activation,
             BM=BM, BN=BN)
    c = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(c, acc)
    ts.store(Y, c, at=(i, j))


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)),
           options=dict(num_warps=4, num_stages=1))
def quantize_fp8_kernel(X, Q, inv_scale: float, *,
                        BM: int = ts.tunable(32, (8, 16, 32, 64, 128)),
                        BN: int = ts.tunable(128, (32, 64, 128, 256))):
    # Q = fp8(clamp(X * inv_scale, -448, 448)); X: (M, K) float, Q: (M, K) fp8 E4M3
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    xc = ts.RegTile[ts.f32, BM, BN]()
    nan = ts.RegTile[ts.bool_, BM, BN]()
    q = ts.RegTile[ts.f8e4m3, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.mul(x, x, inv_scale)
    ts.min(xc, x, F8E4M3_MAX)                        # saturate: E4M3 has no infinity
    ts.max(xc, xc, -F8E4M3_MAX)
    ts.ne(nan, x, x)                                 # a GPU's min/max return the number beside a NaN:
    ts.where(x, nan, x, xc)                          # keep NaN NaN
    ts.copy(q, x)
    ts.store(Q, q, at=(i, j))


# ---- plain PyTorch references -----------------------------------------------------------------------------------
def quantize_weight(w, mode: str):
    """(q, scale): w (N, K) float quantized per output channel (row) to int8 (symmetric, [-127, 127]) or fp8
    E4M3, with w ~= q * scale[:, None]. A row of zeros gets scale 1."""
    import torch

    check_tensor("quantize_weight", "w", w, rank=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if mode not in MODES:
        raise LaunchError(f"quantize_weight: mode={mode!r}; expected one of {MODES}")
    top = INT8_MAX if mode == "int8" else F8E4M3_MAX
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise LaunchError(f"quantize_weight: w {tuple(w.shape)} holds NaN or infinite values; expected finite "
                          "weights (a scale made from them would poison every output of the channel)")
    amax = wf.abs().amax(dim=1) if w.shape[1] else wf.new_zeros(w.shape[0])   # (N,)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    ratio = wf / scale[:, None]
    if mode == "int8":
        q = ratio.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = ratio.clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def activation_scale(amax: float) -> float:
    """The per-tensor fp8 scale for activations whose calibrated largest magnitude is ``amax``."""
    return float(amax) / F8E4M3_MAX if amax > 0 else 1.0


def reference(x, q, scale, bias=None, x_scale=None, *, activation: str | None = None, residual=None):
    """What ``quantized_linear`` computes, in float64 then rounded to x's dtype: the same fp8 rounding of x
    (through torch's cast) when x_scale is given."""
    import torch

    xf = x.double()
    if x_scale is not None:
        xf = (x.float() / x_scale).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn).double() * x_scale
    y = xf @ (q.double() * scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    y = torch_activation(y, activation)
    if residual is not None:
        y = y + residual.double()
    return y.to(x.dtype)


# ---- the public function ----------------------------------------------------------------------------------------
def quantized_linear(x, q, scale, bias=None, *, x_scale: float | None = None, activation: str | None = None,
                     residual=None, backend: str | None = None, **config):
    """y = activation(x @ (q * scale[:, None])^T + bias) + residual for x (M, K) f32/bf16/f16, q (N, K) int8 or
    float8_e4m3fn, scale (N,) f32, bias (N,) float or None, activation None or one of
    ``tilestack.kernels.gemm.ACTIVATIONS``, residual (M, N) float or None; y in x's dtype. With ``x_scale`` (fp8
    q only) x is quantized to fp8 first (x / x_scale) and the product runs in fp8 (module docstring). The
    epilogue is ``tilestack.kernels.gemm``'s, on the f32 accumulator. Meta tensors give a meta result."""
    import math

    import torch

    check_tensor("quantized_linear", "x", x, rank=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("quantized_linear", "q", q, rank=2, dtypes=(torch.int8, torch.float8_e4m3fn))
    check_tensor("quantized_linear", "scale", scale, rank=1, dtypes=(torch.float32,))
    if q.shape[1] != x.shape[1]:
        raise LaunchError(f"quantized_linear: x is {tuple(x.shape)} and q is {tuple(q.shape)}; q.shape[1] must "
                          "equal x.shape[1] (q is (out_features, in_features))")
    if scale.shape[0] != q.shape[0]:
        raise LaunchError(f"quantized_linear: scale has {scale.shape[0]} elements; expected q.shape[0] = "
                          f"{q.shape[0]} (one per output channel)")
    if bias is not None:
        check_tensor("quantized_linear", "bias", bias, rank=1,
                     dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if bias.shape[0] != q.shape[0]:
            raise LaunchError(f"quantized_linear: bias has {bias.shape[0]} elements; expected q.shape[0] = "
                              f"{q.shape[0]}")
    if activation is not None and activation not in ACTIVATIONS:
        raise LaunchError(f"quantized_linear: activation={activation!r}; expected None or one of {ACTIVATIONS}")
    if residual is not None:
        check_tensor("quantized_linear", "residual", residual, rank=2,
                     dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if tuple(residual.shape) != (x.shape[0], q.shape[0]):
            raise LaunchError(f"quantized_linear: residual is {tuple(residual.shape)}; expected the output's shape "
                              f"(x.shape[0], q.shape[0]) = {(x.shape[0], q.shape[0])}")
    if x_scale is not None:
        if q.dtype != torch.float8_e4m3fn:
            raise LaunchError(f"quantized_linear: x_scale is for fp8 weights and activations; q is {q.dtype}")
        if isinstance(x_scale, bool) or not isinstance(x_scale, int | float) or not (
                math.isfinite(x_scale) and x_scale > 0):
            raise LaunchError(f"quantized_linear: x_scale must be a finite number > 0, got {x_scale!r}")
    check_same_device("quantized_linear", x=x, q=q, scale=scale, bias=bias, residual=residual)
    y = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    if nothing_to_launch(y):
        return y
    xin = x
    if x_scale is not None and x.numel() == 0:        # K = 0: nothing to quantize; the epilogue still runs
        xin = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    elif x_scale is not None:
        xin = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        quantize_fp8_kernel(x, xin, 1.0 / float(x_scale), backend=backend)
    cfg = dict(config)
    # an absent bias or residual: scale stands in for it, never read (HAS_BIAS / HAS_RESIDUAL are False)
    qgemm_kernel(xin, q, scale, scale if bias is None else bias, scale if residual is None else residual, y,
                 float(x_scale or 1.0), backend=backend, HAS_BIAS=bias is not None,
                 HAS_RESIDUAL=residual is not None, activation=activation, **cfg)
    return y
