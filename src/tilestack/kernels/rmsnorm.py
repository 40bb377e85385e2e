"""RMS norm over the last dim of a 2-D tensor, forward and backward, any width; and the residual add fused
into the norm that follows it, for RMS norm and layer norm (the pre-norm block's ``h = h + f(h); y = norm(h)``).

    y, rstd = tilestack.kernels.rms_norm(x, weight, eps=1e-6)     # y = x / sqrt(mean(x^2) + eps) * weight
    dx, dw = tilestack.kernels.rms_norm_backward(dy, x, weight, rstd)
    y, h, rstd = tilestack.kernels.add_rms_norm(x, r, weight)            # h = x + r (x's dtype), y = rms_norm(h)
    y, h, mean, rstd = tilestack.kernels.add_layer_norm(x, r, weight, bias)

The forward kernels, ``rms_norm_kernel`` and ``norm_fwd_kernel`` (the residual add, then RMS norm or, with
``CENTERED``, layer norm), trace one body: h = x + r is written out, rounded to its dtype as torch would, and
normalised as rounded. It saves 1/std (and the mean) per row, f32, for the backward. A row that fits one
tile (``ONE_TILE``) is read once; a wider one is read once per pass (largest |h|, mean, variance about it,
normalise; RMS norm has no mean pass). A row past f32's range for squares (|h| > 2^32), or below it
(|h| < 2^-32), has its statistics taken scaled (``layernorm.row_scale``). The backward is the shared norm
backward (``tilestack.kernels.layernorm_bwd``), which also adds the residual stream's gradient into dx.
"""

from __future__ import annotations

import math
import numbers

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_same_device, check_tensor, refuse_derived
from tilestack.kernels._plan import checked_once, no_backward, planned
from tilestack.kernels.layernorm import recenter, row_abs_max, row_scale, scaled_rstd
from tilestack.kernels.layernorm_bwd import check_norm_bwd_args, norm_backward
from tilestack.kernels.softmax import resolve_row_config


def _row_tile(x, hq, r, X, R, i, j, residual: bool) -> None:
    """x = the (i, j) tile of X (+ R, rounded to hq's dtype through hq, which keeps it for the store of H)."""
    ts.load(x, X, at=(i, j))                     # (BM, BN); past the edges reads zero
    if residual:
        ts.load(r, R, at=(i, j))
        ts.add(x, x, r)
        ts.copy(hq, x)
        ts.copy(x, hq)


_BM = ts.tunable(4, (1, 2, 4, 8, 16))
_BN = ts.tunable(1024, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
# Triton's launch options by default (not tunables of the kernel: the tuner searches them as the backend's)
_OPTIONS = dict(num_warps=4, num_stages=1)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),), options=_OPTIONS)
def rms_norm_kernel(X, W, Y, Rstd, eps: float, *, BM: int = _BM, BN: int = _BN, ONE_TILE: bool = False):
    # X, Y: (M, N); W: (N,); Rstd: (M,) f32. ONE_TILE needs BN >= N (checked by rms_norm())
    _norm_forward(X, None, W, None, Y, None, None, Rstd, eps, centered=False, residual=False, BM=BM, BN=BN,
                  one_tile=ONE_TILE)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),), options=_OPTIONS)
def norm_fwd_kernel(X, R, W, B, Y, H, Mean, Rstd, eps: float, *, CENTERED: bool = False, BM: int = _BM,
                    BN: int = _BN, ONE_TILE: bool = False):
    # h = X + R written to H (M, N), then y = norm(h): layer norm if CENTERED (B (N,) and Mean (M,) f32 too;
    # unused otherwise), else RMS norm. ONE_TILE needs BN >= N (checked by the callers)
    _norm_forward(X, R, W, B, Y, H, Mean, Rstd, eps, centered=CENTERED, residual=True, BM=BM, BN=BN,
                  one_tile=ONE_TILE)


def _norm_forward(X, R, W, B, Y, H, Mean, Rstd, eps, *, centered: bool, residual: bool, BM: int, BN: int,
                  one_tile: bool) -> None:
    """The body both kernels trace: y = norm(x [+ r]), one program per BM rows."""
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegTile[ts.f32, BM, BN]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    hq = ts.RegTile[H.dtype, BM, BN]() if residual else None
    mean = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    w = ts.RegVec[ts.f32, BN]()
    b = ts.RegVec[ts.f32, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    c = ts.RegVec[ts.f32, BM]()                  # the rows' scale and its inverse (layernorm.row_scale)
    inv = ts.RegVec[ts.f32, BM]()
    if one_tile:                                 # the whole row in registers: one read of x (and r), one write
        _row_tile(x, hq, r, X, R, i, 0, residual)
        if residual:
            ts.store(H, hq, at=(i, 0))
        row_abs_max(c, x, sq)
        row_scale(c, inv, c, BM)
        if centered:                             # the statistics of x / c
            ts.mul_row(x, x, inv)
            ts.row_sum(mean, x)
            ts.div(mean, mean, N * 1.0)
            ts.sub_row(x, x, mean)
            ts.right_fill(x, x, N, 0.0)          # the padding must not count in the variance
            recenter(x, mean, N, N, BM)
            ts.mul(sq, x, x)
        else:
            ts.mul_row(sq, x, inv)
            ts.mul(sq, sq, sq)
        ts.row_sum(rstd, sq)
        ts.div(rstd, rstd, N * 1.0)
        scaled_rstd(rstd, rstd, inv, eps, BM)
        if centered:                             # x - mean and the mean, of x itself
            ts.mul_row(x, x, c)
            ts.mul(mean, mean, c)
            ts.store(Mean, mean, at=(i,))
        ts.load(w, W, at=(0,))
        ts.mul_row(x, x, rstd)
        ts.mul_col(x, x, w)
        if centered:
            ts.load(b, B, at=(0,))
            ts.add_col(x, x, b)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, 0))
        ts.store(Rstd, rstd, at=(i,))
        return
    ts.zero(mean)
    ts.zero(c)
    for j in ts.range(ts.cdiv(N, BN)):          # the rows' largest |h|, for their scale; h is written here
        _row_tile(x, hq, r, X, R, i, j, residual)
        if residual:
            ts.store(H, hq, at=(i, j))
        row_abs_max(c, x, sq, c)
    row_scale(c, inv, c, BM)
    if centered:
        for j in ts.range(ts.cdiv(N, BN)):      # the mean of h / c (layer norm)
            _row_tile(x, hq, r, X, R, i, j, residual)
            ts.mul_row(x, x, inv)
            ts.row_sum(mean, x, mean)
        ts.div(mean, mean, N * 1.0)
    ts.zero(rstd)
    corr = ts.RegVec[ts.f32, BM]() if centered else None
    if centered:
        ts.zero(corr)
    for j in ts.range(ts.cdiv(N, BN)):          # sum of squares of h / c about the mean (two-pass: no cancellation)
        _row_tile(x, hq, r, X, R, i, j, residual)
        ts.mul_row(x, x, inv)
        if centered:
            ts.sub_row(x, x, mean)
            ts.right_fill(x, x, N - j * BN, 0.0)
            ts.row_sum(corr, x, corr)            # sum(h - mean): the mean's rounding (layernorm.recenter)
        ts.mul(sq, x, x)
        ts.row_sum(rstd, sq, rstd)
    ts.div(rstd, rstd, N * 1.0)
    if centered:                                 # the variance about the corrected mean, at least 0
        ts.div(corr, corr, N * 1.0)
        ts.add(mean, mean, corr)
        ts.mul(corr, corr, corr)
        ts.sub(rstd, rstd, corr)
        ts.max(rstd, rstd, 0.0)
        ts.mul(mean, mean, c)                    # the mean of h itself
        ts.store(Mean, mean, at=(i,))
    scaled_rstd(rstd, rstd, inv, eps, BM)
    for j in ts.range(ts.cdiv(N, BN)):          # y = (h - mean) * rstd * w (+ b)
        _row_tile(x, hq, r, X, R, i, j, residual)
        ts.load(w, W, at=(j,))
        if centered:
            ts.sub_row(x, x, mean)
        ts.mul_row(x, x, rstd)
        ts.mul_col(x, x, w)
        if centered:
            ts.load(b, B, at=(j,))
            ts.add_col(x, x, b)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, j))
    ts.store(Rstd, rstd, at=(i,))


def reference(x, weight, eps: float = 1e-6):
    """Plain PyTorch in f32, returned in x's dtype."""
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@checked_once
def check_norm_args(fn: str, x, weight, eps, *, bias=None, residual=None) -> None:
    """Every check on a norm forward's inputs, before any work (once per signature)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor(fn, "x", x, rank=2, dtypes=floats)
    check_tensor(fn, "weight", weight, rank=1, dtypes=floats)
    if weight.shape[0] != x.shape[1]:
        raise LaunchError(f"{fn}: weight has {weight.shape[0]} elements; expected x.shape[1] = {x.shape[1]}")
    if bias is not None:
        check_tensor(fn, "bias", bias, rank=1, dtypes=(weight.dtype,))
        if bias.shape[0] != x.shape[1]:
            raise LaunchError(f"{fn}: bias has {bias.shape[0]} elements; expected x.shape[1] = {x.shape[1]}")
    if residual is not None:
        check_tensor(fn, "r", residual, rank=2, dtypes=(x.dtype,))
        if tuple(residual.shape) != tuple(x.shape):
            raise LaunchError(f"{fn}: r is {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
    try:       # (an int past float's range overflows in float())
        ok = not isinstance(eps, bool) and isinstance(eps, numbers.Real) and float(eps) >= 0   # NumPy's too
    except OverflowError:
        ok = False
    if not ok:
        raise LaunchError(f"{fn}: eps must be a number >= 0, got {eps!r}")
    check_same_device(fn, x=x, weight=weight, bias=bias, r=residual)


def norm_forward(x, weight, bias, residual, eps: float, *, backend: str | None, config: dict):
    """(y, h or None, mean or None, rstd) after the checks: layer norm if ``bias`` is given (with ``residual``
    only), else RMS norm, of x (+ residual). The config and the launcher are planned once per launch signature."""
    return _planned_forward(x, weight, bias, residual, eps, backend, tuple(config.items()))


@planned(name="norm_forward")
def _planned_forward(x, weight, bias, residual, eps, backend: str | None, config: tuple):
    """The plan of ``norm_forward``: the config and the launcher; ``run`` allocates and launches."""
    import torch

    centered = bias is not None
    public = ("add_layer_norm" if centered else "add_rms_norm") if residual is not None else "rms_norm"
    refuse_derived(public, dict(config), {"CENTERED": "whether it is a layer norm (the bias)"})
    m, n = x.shape
    if x.numel() == 0:   # nothing to launch: no rows, or rows of width 0 (mean 0, rstd NaN, as torch's norms)
        def empty(x, weight, bias, residual, *_, **__):
            y = torch.empty_like(x)
            rstd = torch.full((m,), math.nan, dtype=torch.float32, device=x.device)
            h = None if residual is None else x + residual
            return y, h, (torch.zeros_like(rstd) if centered else None), rstd
        return empty

    def new_stats(x):
        return x.new_empty(m, dtype=torch.float32)          # half torch.empty's host cost

    if residual is None:
        cfg = resolve_row_config("rms_norm", n, x.device.type, dict(config), x=x)
        y, rstd = torch.empty_like(x), new_stats(x)
        launch = rms_norm_kernel.launcher_for((x, weight, y, rstd, float(eps)), backend, **cfg)

        def run_rms(x, weight, bias, residual, eps, *_, stats=None):
            y, rstd = torch.empty_like(x), (new_stats(x) if stats is None else stats)
            launch((x, weight, y, rstd, float(eps)))
            return y, None, None, rstd
        return run_rms

    fn = "add_layer_norm" if centered else "add_rms_norm"
    cfg = resolve_row_config(fn, n, x.device.type, dict(config), x=x)

    def args(x, weight, bias, residual, eps, stats=None):
        y, h = torch.empty_like(x), torch.empty_like(x)
        if stats is None:
            rstd = new_stats(x)
            mean = new_stats(x) if centered else None
        else:       # a sink the caller will not read: the mean, then 1/std, written to it
            rstd, mean = stats, (stats if centered else None)
        # RMS norm's kernel reads no bias and writes no mean: any tensor of the right kind stands in for them
        return (x, residual, weight, bias if centered else weight, y, h, mean if centered else rstd, rstd,
                float(eps)), (y, h, mean, rstd)

    launch = norm_fwd_kernel.launcher_for(args(x, weight, bias, residual, eps)[0], backend, CENTERED=centered, **cfg)

    def run_add(x, weight, bias, residual, eps, *_, stats=None):
        kargs, outs = args(x, weight, bias, residual, eps, stats)
        launch(kargs)
        return outs
    return run_add


@no_backward("rms_norm")     # the backward is rms_norm_backward: a backward through it raises, naming it
def rms_norm(x, weight, eps: float = 1e-6, *, backend: str | None = None, **config):
    """(y, rstd) of RMS norm over the last dim of a 2-D f32/bf16/f16 tensor; weight of shape (N,); y in x's
    dtype, rstd (M,) f32."""
    check_norm_args("rms_norm", x, weight, eps)
    y, _, _, rstd = norm_forward(x, weight, None, None, eps, backend=backend, config=config)
    return y, rstd


@no_backward("add_rms_norm")
def add_rms_norm(x, r, weight, eps: float = 1e-6, *, backend: str | None = None, **config):
    """(y, h, rstd): h = x + r in x's dtype, y = RMS norm of h (the backward: rms_norm_backward with the
    gradient reaching h from elsewhere passed as ``dh``)."""
    check_norm_args("add_rms_norm", x, weight, eps, residual=r)
    y, h, _, rstd = norm_forward(x, weight, None, r, eps, backend=backend, config=config)
    return y, h, rstd


@no_backward("add_layer_norm")
def add_layer_norm(x, r, weight, bias, eps: float = 1e-5, *, backend: str | None = None, **config):
    """(y, h, mean, rstd): h = x + r in x's dtype, y = layer norm of h (the backward: layer_norm_backward with
    ``dh``)."""
    if bias is None:     # norm_forward takes no bias for RMS norm: a layer norm's is required, as layer_norm's is
        raise LaunchError("add_layer_norm: bias must be a torch.Tensor, got NoneType (a layer norm without a bias: "
                          "pass torch.zeros_like(weight))")
    check_norm_args("add_layer_norm", x, weight, eps, bias=bias, residual=r)
    return norm_forward(x, weight, bias, r, eps, backend=backend, config=config)


@no_backward("rms_norm_backward")
def rms_norm_backward(dy, x, weight, rstd, *, dh=None, backend: str | None = None, **config):
    """(dx, dw) of RMS norm given the forward's ``rstd``; dx in x's dtype, dw in weight's. ``dh``: a gradient
    that reaches x (the residual stream h) by another path, added into dx."""
    check_norm_bwd_args("rms_norm_backward", dy, x, weight, {"rstd": rstd}, dh=dh)
    dx, sums = norm_backward(dy, x, weight, None, rstd, dh=dh, centered=False, backend=backend, config=config)
    return dx, sums[0]
