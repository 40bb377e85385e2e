"""Backward of layer norm and RMS norm over the last dim of a 2-D tensor, one kernel for both.

    dx, dw, db = tilestack.kernels.layer_norm_backward(dy, x, weight, mean, rstd)   # mean, rstd from the forward
    dx, dw = tilestack.kernels.rms_norm_backward(dy, x, weight, rstd)              # (tilestack.kernels.rmsnorm)

With xhat = (x - mean) * rstd (RMS norm: mean = 0) and g = dy * w, per row of width N:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  [+ dh]  (RMS norm: no mean(g) term)
    dw = sum over rows of dy * xhat,   db = sum over rows of dy
dh, given for a fused residual add (``add_layer_norm``/``add_rms_norm``), is the gradient reaching x by the
residual path. The grid is persistent: P programs (P = the rows of the partial buffers ``DWp``/``DBp``, chosen
by the host to fill the GPU) each walk the row blocks pid, pid + P, ... and keep their share of dw and db, which
the host adds up over P afterwards (P x N floats, tiny next to x). A row that fits one tile (``ONE_TILE``) is
read once and its partial sums stay in registers; a wider row takes two passes over its column tiles (the row's
two means, then dx), adding into the program's own row of the partial buffers in memory. A second small kernel
(``partial_sum_kernel``) adds the partials up and writes dw and db in the weight's dtype.
"""

from __future__ import annotations

import functools

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_same_device, check_tensor, next_pow2
from tilestack.tune.lookup import launch_config

FLOATS = ("float32", "bfloat16", "float16")


@ts.kernel(grid=lambda DWp: (DWp.shape[0],), options=dict(num_warps=4, num_stages=1))
def norm_bwd_kernel(X, W, DY, DH, Mean, Rstd, DX, DWp, DBp, *,
                    CENTERED: bool, ADD_DH: bool = False,
                    BM: int = ts.tunable(1, (1, 2, 4, 8, 16)),
                    BN: int = ts.tunable(1024, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)),
                    ONE_TILE: bool = False):
    # X, DY, DX: (M, N); W: (N,); Mean, Rstd: (M,) f32; DWp, DBp: (P, N) f32 partial sums, one row per program.
    # CENTERED: layer norm (Mean and DBp are read/written); else RMS norm (Mean and DBp are never touched).
    # ADD_DH: DH (M, N), the gradient reaching x by another path (the residual stream), is added into dx.
    pid = ts.block_id(0)
    P = ts.num_blocks(0)
    M, N = X.shape
    rounds = ts.cdiv(ts.cdiv(M, BM) - pid, P)     # row blocks pid, pid + P, ... below cdiv(M, BM)
    x = ts.RegTile[ts.f32, BM, BN]()
    g = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    dx = ts.RegTile[DX.dtype, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    c_gx = ts.RegVec[ts.f32, BM]()               # mean(g * xhat) per row
    c_g = ts.RegVec[ts.f32, BM]()                # mean(g) per row (layer norm)
    dw = ts.RegVec[ts.f32, BN]()
    db = ts.RegVec[ts.f32, BN]()
    if ONE_TILE:                                 # the row in one tile: x and dy read once, partials in registers
        ts.zero(dw)
        ts.zero(db)
        ts.load(w, W, at=(0,))                   # (BN,); past N reads zero, so g is zero there
        for r in ts.range(rounds):
            i = pid + r * P
            ts.load(x, X, at=(i, 0))             # (BM, BN); rows past M read zero (and rstd = 0 there)
            ts.load(g, DY, at=(i, 0))            # dy for now
            ts.load(rstd, Rstd, at=(i,))
            if CENTERED:
                ts.load(mean, Mean, at=(i,))
                ts.sub_row(x, x, mean)
                ts.right_fill(x, x, N, 0.0)      # padding columns are 0 - mean: out of every sum
                ts.col_sum(db, g, db)
            ts.mul_row(x, x, rstd)               # xhat
            ts.mul(t, g, x)
            ts.col_sum(dw, t, dw)                # dy * xhat summed over this program's rows
            ts.mul_col(g, g, w)                  # g = dy * w
            ts.mul(t, g, x)
            ts.row_sum(c_gx, t)
            ts.div(c_gx, c_gx, N * 1.0)
            ts.mul_row(t, x, c_gx)
            ts.sub(g, g, t)
            if CENTERED:
                ts.row_sum(c_g, g)               # mean(g) - mean(xhat) * mean(g xhat) = mean(g): sum(xhat) = 0
                ts.div(c_g, c_g, N * 1.0)
                ts.sub_row(g, g, c_g)
            ts.mul_row(g, g, rstd)
            if ADD_DH:
                ts.load(t, DH, at=(i, 0))
                ts.add(g, g, t)
            ts.copy(dx, g)
            ts.store(DX, dx, at=(i, 0))
        ts.store(DWp, dw, at=(pid, 0))
        if CENTERED:
            ts.store(DBp, db, at=(pid, 0))
        return
    # wide rows: per row block, pass 1 gathers the row's means over its column tiles, pass 2 writes dx and adds
    # this block's dw/db into the program's row of DWp/DBp (zero-filled by the host; no other program writes it)
    cols = ts.cdiv(N, BN)
    for r in ts.range(rounds):
        i = pid + r * P
        ts.load(rstd, Rstd, at=(i,))
        ts.zero(mean)
        if CENTERED:
            ts.load(mean, Mean, at=(i,))
        ts.zero(c_gx)
        ts.zero(c_g)
        for j in ts.range(cols):
            ts.load(x, X, at=(i, j))
            ts.load(g, DY, at=(i, j))
            ts.load(w, W, at=(j,))
            ts.sub_row(x, x, mean)
            ts.mul_row(x, x, rstd)
            ts.mul_col(g, g, w)
            ts.row_sum(c_g, g, c_g)
            ts.mul(t, g, x)                      # padding columns: g = 0 there
            ts.row_sum(c_gx, t, c_gx)
        ts.div(c_gx, c_gx, N * 1.0)
        ts.div(c_g, c_g, N * 1.0)
        for j in ts.range(cols):
            ts.load(x, X, at=(i, j))
            ts.load(g, DY, at=(i, j))
            ts.load(w, W, at=(j,))
            ts.load(dw, DWp, at=(pid, j))
            ts.sub_row(x, x, mean)
            ts.right_fill(x, x, N - j * BN, 0.0)
            ts.mul_row(x, x, rstd)
            ts.mul(t, g, x)
            ts.col_sum(dw, t, dw)
            ts.store(DWp, dw, at=(pid, j))
            if CENTERED:
                ts.load(db, DBp, at=(pid, j))
                ts.col_sum(db, g, db)
                ts.store(DBp, db, at=(pid, j))
            ts.mul_col(g, g, w)
            ts.mul_row(t, x, c_gx)
            ts.sub(g, g, t)
            if CENTERED:
                ts.sub_row(g, g, c_g)
            ts.mul_row(g, g, rstd)
            if ADD_DH:
                ts.load(t, DH, at=(i, j))
                ts.add(g, g, t)
            ts.copy(dx, g)
            ts.store(DX, dx, at=(i, j))


@ts.kernel(grid=lambda Parts, BN: (ts.cdiv(Parts.shape[2], BN), Parts.shape[0]), options=dict(num_warps=4))
def partial_sum_kernel(Parts, Out, *,
                       BP: int = ts.tunable(32, (1, 2, 4, 8, 16, 32, 64, 128)),
                       BN: int = ts.tunable(64, (16, 32, 64, 128, 256, 512))):
    # Parts: (K, P, N) f32 partial sums; Out: (K, N) = Parts summed over P, in Out's dtype (the weights')
    j, k = ts.block_id(0), ts.block_id(1)
    part = ts.RegTile[ts.f32, BP, BN]()
    acc = ts.RegVec[ts.f32, BN]()
    out = ts.RegVec[Out.dtype, BN]()
    ts.zero(acc)
    for r in ts.range(ts.cdiv(Parts.shape[1], BP)):
        ts.load(part, Parts, at=(k, r, j))       # (BP, BN); rows past P read zero
        ts.col_sum(acc, part, acc)
    ts.copy(out, acc)
    ts.store(Out, out, at=(k, j))


def reference(dy, x, weight, bias, eps: float = 1e-5):
    """(dx, dw, db) of torch's layer norm in f32 autograd, returned in the inputs' dtypes."""
    import torch

    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    y = torch.nn.functional.layer_norm(xf, x.shape[-1:], wf, bf, eps)
    dx, dw, db = torch.autograd.grad(y, (xf, wf, bf), dy.float())
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype)


MAX_ONE_TILE = 16384       # widest row the backward keeps whole in registers (x, dy and two temporaries)
PROGRAMS_PER_SM = 4


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def programs(m: int, device, bm: int) -> int:
    """How many persistent programs: enough to fill every SM a few times over, never more than row blocks."""
    blocks = max(1, -(-m // bm))
    if device.type != "cuda":
        return min(blocks, 4)
    index = device.index if device.index is not None else 0
    return min(blocks, PROGRAMS_PER_SM * _sm_count(index))


def bwd_config(n: int, device_type: str, config: dict) -> dict:
    """Launch config for rows of width ``n`` with the caller's choices on top: on a GPU the whole row in one
    tile where it fits, several short rows per program; ``ONE_TILE`` follows the final BN."""
    cfg = {}
    if device_type == "cuda":
        width = max(128, next_pow2(n))
        if width <= MAX_ONE_TILE:
            bm = max(1, min(16, 2048 // width))          # >= 2048 elements a round: enough loads in flight
            cfg = dict(BM=bm, BN=width, ONE_TILE=True, num_warps=8 if bm * width >= 2048 else 4)
        else:
            cfg = dict(BM=1, BN=4096, num_warps=8)
    cfg |= config
    bn = cfg.get("BN", 1024)
    if config.get("ONE_TILE") and bn < n:
        raise LaunchError(f"norm backward: ONE_TILE=True needs BN >= the row width {n}; got BN={bn}")
    cfg["ONE_TILE"] = bool(cfg.get("ONE_TILE", False)) and bn >= n
    return cfg


def sum_config(n: int, device_type: str) -> dict:
    """Column strips narrow enough that the sum over the P partial rows runs on many programs at once."""
    if device_type != "cuda":
        return {}
    return dict(BP=128, BN=16 if n <= 4096 else 64, num_warps=4)     # ~100 programs of a few rounds each


def check_norm_bwd_args(fn: str, dy, x, weight, stats: dict, dh=None) -> None:
    """Every check on a norm backward's inputs, before any work."""
    import torch

    floats = tuple(getattr(torch, d) for d in FLOATS)
    check_tensor(fn, "x", x, rank=2, dtypes=floats)
    check_tensor(fn, "dy", dy, rank=2, dtypes=(x.dtype,))
    check_tensor(fn, "weight", weight, rank=1, dtypes=floats)
    if tuple(dy.shape) != tuple(x.shape):
        raise LaunchError(f"{fn}: dy is {tuple(dy.shape)}; expected x's shape {tuple(x.shape)}")
    if dh is not None:
        check_tensor(fn, "dh", dh, rank=2, dtypes=(x.dtype,))
        if tuple(dh.shape) != tuple(x.shape):
            raise LaunchError(f"{fn}: dh is {tuple(dh.shape)}; expected x's shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise LaunchError(f"{fn}: weight has {weight.shape[0]} elements; expected x.shape[1] = {x.shape[1]}")
    for name, t in stats.items():
        check_tensor(fn, name, t, rank=1, dtypes=(torch.float32,))
        if t.shape[0] != x.shape[0]:
            raise LaunchError(f"{fn}: {name} has {t.shape[0]} elements; expected x.shape[0] = {x.shape[0]}")
    check_same_device(fn, dy=dy, x=x, weight=weight, dh=dh, **stats)


def norm_backward(dy, x, weight, mean, rstd, *, dh=None, centered: bool, backend: str | None, config: dict):
    """(dx, sums) after the checks: the launch and the reduction of the partial sums over programs; sums is
    (2, N) = [dw, db] for layer norm, (1, N) = [dw] for RMS norm, in weight's dtype."""
    import torch

    m, n = x.shape
    if x.numel() == 0:   # nothing to launch: no rows give zero weight gradients; rows of width 0 give empty ones
        dx = torch.empty_like(x)
        return dx, torch.zeros(2 if centered else 1, n, dtype=weight.dtype, device=x.device)
    tuned = launch_config("layer_norm_bwd" if centered else "rms_norm_bwd", str(x.dtype).removeprefix("torch."),
                          x.device, n, {})
    cfg = bwd_config(n, x.device.type, tuned | config)
    p = programs(m, x.device, cfg.get("BM", 1))
    alloc = torch.empty if cfg["ONE_TILE"] else torch.zeros    # the wide path adds into its partials
    parts = alloc(2 if centered else 1, p, n, dtype=torch.float32, device=x.device)   # (K, P, N): dw [, db]
    dx = torch.empty_like(x)
    norm_bwd_kernel(x, weight, dy, dy if dh is None else dh, rstd if mean is None else mean, rstd, dx, parts[0],
                    parts[-1], CENTERED=centered, ADD_DH=dh is not None, backend=backend, **cfg)
    sums = torch.empty(parts.shape[0], n, dtype=weight.dtype, device=x.device)     # (K, N): dw [, db]
    partial_sum_kernel(parts, sums, backend=backend, **sum_config(n, x.device.type))
    return dx, sums


def layer_norm_backward(dy, x, weight, mean, rstd, *, dh=None, backend: str | None = None, **config):
    """(dx, dw, db) of layer norm over the last dim of 2-D ``x``; ``mean`` and ``rstd`` as the forward
    (``tilestack.kernels.layer_norm`` or ``add_layer_norm``) saved them. dx in x's dtype, dw and db in weight's.
    ``dh``: a gradient that reaches x (the residual stream h) by another path, added into dx."""
    check_norm_bwd_args("layer_norm_backward", dy, x, weight, {"mean": mean, "rstd": rstd}, dh=dh)
    dx, sums = norm_backward(dy, x, weight, mean, rstd, dh=dh, centered=True, backend=backend, config=config)
    return dx, sums[0], sums[1]
