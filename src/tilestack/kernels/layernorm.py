"""Layer norm forward over the last dim of a 2-D tensor, any width; saves mean and 1/std for a backward.
A row that fits one tile (``ONE_TILE``) is read once; a wider one takes four passes (largest |x|, mean, variance
about the mean, normalise). A row past f32's range for squares (|x| > 2^32), or below it (|x| < 2^-32), has its
statistics taken scaled (``row_scale``).

    y, mean, rstd = tilestack.kernels.layer_norm(x, weight, bias, eps=1e-5)
"""

from __future__ import annotations

import math

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_real, check_same_device, check_tensor, nothing_to_launch
from tilestack.kernels._plan import forward_only, planned
from tilestack.kernels.softmax import resolve_row_config


def recenter(d, mean, n, cols_left, BM: int) -> None:
    """Take the rounding of a row's sum out of its mean, in place: ``d`` = x - mean (padding past ``cols_left``
    zero) sums to n times the mean's error, which is not small against d itself where the row hardly varies (a
    row of one f32 value 10000.123 gives d = one ulp of 1e4 everywhere, which 1 / sqrt(eps) turned into an output
    0.3 away from the bias, where torch's Welford mean is exact). mean += sum(d) / n and d -= sum(d) / n."""
    corr = ts.RegVec[ts.f32, BM]()
    ts.row_sum(corr, d)
    ts.div(corr, corr, n * 1.0)
    ts.add(mean, mean, corr)
    ts.sub_row(d, d, corr)
    ts.right_fill(d, d, cols_left, 0.0)


# A row whose largest |x| passes BIG_ROW has its statistics taken of x / c, c a power of two at most that largest |x|
# (and at most MAX_ROW_SCALE, so that 1 / c stays a normal f32): its squares would pass f32's range (|x| past about
# 1.8e19; a row of 1e30 gave rstd 0 and y = 0 in RMS norm, NaN in layer norm, where torch's float64 answers). A row
# whose largest |x| is below SMALL_ROW (and not 0) likewise, c a power of two within a factor 2 of it and at least
# MIN_ROW_SCALE (1 / c a finite f32): its squares would fall below f32's range (|x| under about 1e-19; with eps = 0
# a row of 1e-25 gave rstd inf and y = inf, where float64 answers about +-1). Scaling by a power of two is exact, so
# the statistics are the unscaled arithmetic's, moved by c (a constant row's mean is still its value exactly). Every
# other row, a row of zeros and a row holding an infinity or a NaN (whose NaN and infinities are torch's) take c = 1:
# the same arithmetic as before, bit for bit.
BIG_ROW = 2.0 ** 32
MAX_ROW_SCALE = 2.0 ** 96
SMALL_ROW = 2.0 ** -32
MIN_ROW_SCALE = 2.0 ** -126


def row_scale(c, inv, amax, BM: int) -> None:
    """c and inv = 1 / c per row (the rule above) from ``amax``, the rows' largest |x| (c and amax may be one)."""
    scaled = ts.RegVec[ts.bool_, BM]()
    test = ts.RegVec[ts.bool_, BM]()
    exponent = ts.RegVec[ts.f32, BM]()
    ts.gt(scaled, amax, BIG_ROW)                 # big: past BIG_ROW and finite
    ts.lt(test, amax, math.inf)
    ts.logical_and(scaled, scaled, test)
    ts.lt(test, amax, SMALL_ROW)                 # small: below SMALL_ROW and above 0 (a NaN compares false)
    ts.logical_or(scaled, scaled, test)
    ts.gt(test, amax, 0.0)
    ts.logical_and(scaled, scaled, test)
    ts.min(exponent, amax, MAX_ROW_SCALE)
    ts.max(exponent, exponent, MIN_ROW_SCALE)
    ts.where(exponent, scaled, exponent, 1.0)
    # e = log2 of it, in [-126, 96]; e - rem(e, 1) is e rounded toward 0 (floor for a big row, ceil for a small one),
    # and 2 to that power exactly
    ts.log2(exponent, exponent)
    ts.rem(inv, exponent, 1.0)
    ts.sub(exponent, exponent, inv)
    ts.exp2(c, exponent)
    ts.fill(inv, 1.0)
    ts.div(inv, inv, c)


def scaled_rstd(rstd, var, inv, eps, BM: int) -> None:
    """rstd = 1 / sqrt(var * c^2 + eps) from ``var``, the variance (or mean square) of x / c: rsqrt(var + eps / c^2)
    / c, at most 1 / sqrt(eps) (a constant row of 1e30: its eps / c^2 underflows to 0, and the rsqrt of 0 is inf).
    eps / c^2 is taken as eps * inv * inv (inv * inv first passes f32's range for a small row's scale); where it
    passes f32's range (a small row, eps > 0), var is nothing beside it, and rstd is 1 / sqrt(eps)."""
    cap = ts.RegVec[ts.f32, BM]()
    fits = ts.RegVec[ts.bool_, BM]()
    ts.mul(cap, inv, eps)
    ts.mul(cap, cap, inv)
    ts.lt(fits, cap, math.inf)
    ts.add(rstd, var, cap)
    ts.rsqrt(rstd, rstd)
    ts.mul(rstd, rstd, inv)
    ts.fill(cap, eps)
    ts.rsqrt(cap, cap)
    ts.min(rstd, rstd, cap)
    ts.where(rstd, fits, rstd, cap)


def row_abs_max(amax, x, scratch, acc=None) -> None:
    """amax = the rows' largest |x| (with ``acc``: the larger of it and acc); ``scratch`` a tile of x's shape."""
    ts.abs(scratch, x)
    ts.row_max(amax, scratch, acc)


def _grid(X, BM, PROGRAMS):
    blocks = ts.cdiv(X.shape[0], BM)
    return (ts.smin(blocks, PROGRAMS) if PROGRAMS else blocks,)


@ts.kernel(grid=_grid, options=dict(num_warps=4, num_stages=1))
def layer_norm_kernel(X, W, B, Y, Mean, Rstd, eps: float, *,
                      BM: int = ts.tunable(4, (1, 2, 4, 8, 16)),
                      BN: int = ts.tunable(1024, (128, 256, 512, 1024, 2048, 4096, 8192, 16384)),
                      ONE_TILE: bool = False, PROGRAMS: int = 0):
    # ONE_TILE needs BN >= the row width (checked by layer_norm(), as for softmax). PROGRAMS > 0 (ONE_TILE only):
    # min(row blocks, PROGRAMS) programs each walk row blocks program, program + PROGRAMS, ..., the loop pipelined
    # (num_stages >= 2: the next block's rows are loaded while this block is normalised and stored), the weight
    # and bias loaded once per program
    if PROGRAMS:
        if not ONE_TILE:
            raise LaunchError(f"layer_norm_kernel: PROGRAMS={PROGRAMS} needs ONE_TILE=True (a row in one tile); got "
                              "ONE_TILE=False")
        w = ts.RegVec[ts.f32, BN]()
        b = ts.RegVec[ts.f32, BN]()
        ts.load(w, W, at=(0,))
        ts.load(b, B, at=(0,))
        for i in ts.range(ts.block_id(0), ts.cdiv(X.shape[0], BM), ts.num_blocks(0), stages=2):
            _one_tile_rows(i, X, Y, Mean, Rstd, eps, BM, BN, w=w, b=b)
        return
    if ONE_TILE:                                 # the whole row in registers: one read of x, one write of y
        _one_tile_rows(ts.block_id(0), X, Y, Mean, Rstd, eps, BM, BN, W=W, B=B)
        return
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    var = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    w = ts.RegVec[ts.f32, BN]()
    b = ts.RegVec[ts.f32, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    corr = ts.RegVec[ts.f32, BM]()
    c = ts.RegVec[ts.f32, BM]()
    inv = ts.RegVec[ts.f32, BM]()
    scratch = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(mean)
    ts.zero(var)
    ts.zero(corr)
    ts.zero(c)
    for j in ts.range(ts.cdiv(N, BN)):          # pass 0: the rows' largest |x|, for their scale (row_scale)
        ts.load(x, X, at=(i, j))                 # (BM, BN)
        row_abs_max(c, x, scratch, c)
    row_scale(c, inv, c, BM)
    for j in ts.range(ts.cdiv(N, BN)):          # pass 1: mean of x / c (edges load as zero)
        ts.load(x, X, at=(i, j))
        ts.mul_row(x, x, inv)
        ts.row_sum(mean, x, mean)
    ts.div(mean, mean, N * 1.0)
    for j in ts.range(ts.cdiv(N, BN)):          # pass 2: variance about the mean (two-pass: no cancellation)
        ts.load(x, X, at=(i, j))
        ts.mul_row(x, x, inv)
        ts.sub_row(x, x, mean)
        ts.right_fill(x, x, N - j * BN, 0.0)
        ts.row_sum(corr, x, corr)                # sum(x - mean): the mean's rounding (see recenter)
        ts.mul(x, x, x)
        ts.row_sum(var, x, var)
    ts.div(corr, corr, N * 1.0)
    ts.div(var, var, N * 1.0)                    # var about the corrected mean: E[d^2] - E[d]^2, at least 0
    ts.add(mean, mean, corr)
    ts.mul(corr, corr, corr)
    ts.sub(var, var, corr)
    ts.max(var, var, 0.0)
    scaled_rstd(rstd, var, inv, eps, BM)
    ts.mul(mean, mean, c)                        # the mean of x itself
    for j in ts.range(ts.cdiv(N, BN)):          # pass 3: y = (x - mean) * rstd * w + b
        ts.load(x, X, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.load(b, B, at=(j,))
        ts.sub_row(x, x, mean)
        ts.mul_row(x, x, rstd)
        ts.mul_col(x, x, w)
        ts.add_col(x, x, b)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, j))
    ts.store(Mean, mean, at=(i,))
    ts.store(Rstd, rstd, at=(i,))


def _one_tile_rows(i, X, Y, Mean, Rstd, eps, BM: int, BN: int, *, w=None, b=None, W=None, B=None) -> None:
    """Rows [i*BM, (i+1)*BM), each whole in one tile: one read of x, one write of y. The weight and bias are
    ``w``, ``b`` where the program loaded them already (persistent), else loaded from ``W``, ``B`` once the
    statistics are done (fewer registers live during the reductions)."""
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    var = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    c = ts.RegVec[ts.f32, BM]()
    inv = ts.RegVec[ts.f32, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(i, 0))                     # (BM, BN); past N reads zero
    row_abs_max(c, x, sq)
    row_scale(c, inv, c, BM)
    ts.mul_row(x, x, inv)                        # the statistics of x / c (row_scale)
    ts.row_sum(mean, x)
    ts.div(mean, mean, N * 1.0)
    ts.sub_row(x, x, mean)
    ts.right_fill(x, x, N, 0.0)                  # the padding must not count in the variance
    recenter(x, mean, N, N, BM)
    ts.mul(sq, x, x)
    ts.row_sum(var, sq)
    ts.div(var, var, N * 1.0)
    scaled_rstd(rstd, var, inv, eps, BM)
    ts.mul_row(x, x, c)                          # x - mean and the mean, of x itself
    ts.mul(mean, mean, c)
    if w is None:
        w, b = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
        ts.load(w, W, at=(0,))
        ts.load(b, B, at=(0,))
    ts.mul_row(x, x, rstd)
    ts.mul_col(x, x, w)
    ts.add_col(x, x, b)
    ts.copy(y, x)
    ts.store(Y, y, at=(i, 0))
    ts.store(Mean, mean, at=(i,))
    ts.store(Rstd, rstd, at=(i,))


def reference(x, weight, bias, eps: float = 1e-5):
    import torch

    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


@planned
@forward_only("layer_norm")     # no backward here (layer_norm_backward): a backward through it raises
def layer_norm(x, weight, bias, eps: float = 1e-5, *, backend: str | None = None, **config):
    """(y, mean, rstd) of layer norm over the last dim of a 2-D tensor; weight and bias of shape (N,).

    Empty tensors launch nothing (rows of width 0 give mean 0 and rstd NaN, as torch.native_layer_norm); meta
    tensors give meta results of the right shapes. Planned once per launch signature (``kernels._plan``)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor("layer_norm", "x", x, rank=2, dtypes=floats)
    check_tensor("layer_norm", "weight", weight, rank=1, dtypes=floats)
    check_tensor("layer_norm", "bias", bias, rank=1, dtypes=floats)
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape[0] != x.shape[1]:
            raise LaunchError(f"layer_norm: {name} has {t.shape[0]} elements; expected x.shape[1] = {x.shape[1]}")
    check_same_device("layer_norm", x=x, weight=weight, bias=bias)
    # eps = inf taken, as the other norms (check_norm_args) and torch take it (y = bias): 1e39, f32's inf in the
    # kernel, was taken where inf was refused, and add_layer_norm(eps=inf) ran where layer_norm refused it
    eps = math.inf if isinstance(eps, float) and eps == math.inf else check_real("layer_norm", "eps", eps, minimum=0.0)

    def outputs(x):
        mean = x.new_empty(x.shape[0], dtype=torch.float32)   # (new_empty: half torch.empty's host cost)
        return torch.empty_like(x), mean, torch.empty_like(mean)

    cfg = resolve_row_config("layer_norm", x.shape[1], x.device.type, config, x=x)
    if nothing_to_launch(x):
        def empty(x, *_, **__):
            y, mean, rstd = outputs(x)
            if x.device.type != "meta":          # width 0: the mean of nothing is 0, its 1/std undefined
                mean.zero_()
                rstd.fill_(math.nan)
            return y, mean, rstd
        return empty
    launch = layer_norm_kernel.launcher_for((x, weight, bias, *outputs(x), eps), backend, **cfg)

    def run(x, weight, bias, *_, stats=None, **__):
        """``stats``: an (M,) f32 tensor the caller will not read, written with the mean and then 1/std in
        place of two new ones (returned as both; the eager no-grad path's per-plan sink)."""
        if stats is None:
            y, mean, rstd = outputs(x)
        else:
            y, mean, rstd = torch.empty_like(x), stats, stats
        launch((x, weight, bias, y, mean, rstd, eps))
        return y, mean, rstd
    return run
