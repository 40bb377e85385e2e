"""RMS norm over the last dim of a 2-D tensor, forward and backward, any width.

    y, rstd = tilestack.kernels.rms_norm(x, weight, eps=1e-6)     # y = x / sqrt(mean(x^2) + eps) * weight
    dx, dw = tilestack.kernels.rms_norm_backward(dy, x, weight, rstd)

The forward saves 1/rms per row (f32) for the backward. A row that fits one tile (``ONE_TILE``) is read once;
a wider one takes two passes (sum of squares, then normalise). The backward is the shared norm backward
(``tilestack.kernels.layernorm_bwd``) without the centring.
"""

from __future__ import annotations

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_same_device, check_tensor
from tilestack.kernels.layernorm_bwd import check_norm_bwd_args, norm_backward
from tilestack.kernels.softmax import resolve_row_config


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def rms_norm_kernel(X, W, Y, Rstd, eps: float, *,
                    BM: int = ts.tunable(4, (1, 2, 4, 8, 16)),
                    BN: int = ts.tunable(1024, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)),
                    num_warps: int = ts.tunable(4, (2, 4, 8, 16)),
                    num_stages: int = ts.tunable(1, (1, 2)),
                    ONE_TILE: bool = False):
    # X, Y: (M, N); W: (N,); Rstd: (M,) f32. ONE_TILE needs BN >= N (checked by rms_norm())
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    ms = ts.RegVec[ts.f32, BM]()
    w = ts.RegVec[ts.f32, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    if ONE_TILE:                                 # the whole row in registers: one read of x, one write of y
        ts.load(x, X, at=(i, 0))                 # (BM, BN); past N reads zero, which adds nothing to sum x^2
        ts.mul(sq, x, x)
        ts.row_sum(ms, sq)
        ts.div(ms, ms, N * 1.0)
        ts.add(ms, ms, eps)
        ts.rsqrt(ms, ms)                         # 1 / rms
        ts.load(w, W, at=(0,))
        ts.mul_row(x, x, ms)
        ts.mul_col(x, x, w)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, 0))
        ts.store(Rstd, ms, at=(i,))
        return
    ts.zero(ms)
    for j in ts.range(ts.cdiv(N, BN)):          # pass 1: sum of squares
        ts.load(x, X, at=(i, j))                 # (BM, BN)
        ts.mul(sq, x, x)
        ts.row_sum(ms, sq, ms)
    ts.div(ms, ms, N * 1.0)
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    for j in ts.range(ts.cdiv(N, BN)):          # pass 2: y = x * rstd * w
        ts.load(x, X, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul_row(x, x, ms)
        ts.mul_col(x, x, w)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, j))
    ts.store(Rstd, ms, at=(i,))


def reference(x, weight, eps: float = 1e-6):
    """Plain PyTorch in f32, returned in x's dtype."""
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def check_rms_norm_args(fn: str, x, weight, eps) -> None:
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor(fn, "x", x, rank=2, dtypes=floats)
    check_tensor(fn, "weight", weight, rank=1, dtypes=floats)
    if weight.shape[0] != x.shape[1]:
        raise LaunchError(f"{fn}: weight has {weight.shape[0]} elements; expected x.shape[1] = {x.shape[1]}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise LaunchError(f"{fn}: eps must be a number >= 0, got {eps!r}")
    check_same_device(fn, x=x, weight=weight)


def rms_norm(x, weight, eps: float = 1e-6, *, backend: str | None = None, **config):
    """(y, rstd) of RMS norm over the last dim of a 2-D f32/bf16/f16 tensor; weight of shape (N,); y in x's
    dtype, rstd (M,) f32."""
    import torch

    check_rms_norm_args("rms_norm", x, weight, eps)
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    cfg = resolve_row_config("rms_norm", x.shape[1], x.device.type, config)
    rms_norm_kernel(x, weight, y, rstd, float(eps), backend=backend, **cfg)
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, *, backend: str | None = None, **config):
    """(dx, dw) of RMS norm given the forward's ``rstd``; dx in x's dtype, dw in weight's."""
    check_norm_bwd_args("rms_norm_backward", dy, x, weight, {"rstd": rstd})
    dx, sums = norm_backward(dy, x, weight, None, rstd, centered=False, backend=backend, config=config)
    return dx, sums[0]
