"""Backward of layer norm and RMS norm over the last dim of a 2-D tensor, one kernel for both.

    dx, dw, db = tilestack.kernels.layer_norm_backward(dy, x, weight, mean, rstd)   # mean, rstd from the forward
    dx, dw = tilestack.kernels.rms_norm_backward(dy, x, weight, rstd)              # (tilestack.kernels.rmsnorm)

With xhat = (x - mean) * rstd (RMS norm: mean = 0) and g = dy * w, per row of width N:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  [+ dh]  (RMS norm: no mean(g) term)
    dw = sum over rows of dy * xhat,   db = sum over rows of dy
dh, given for a fused residual add (``add_layer_norm``/``add_rms_norm``), is the gradient reaching x by the
residual path.

Two launches, nothing else on the device. The grid is persistent: P programs, as many as are resident on the
GPU at once (``programs``: a register budget per thread; one wave, no stragglers), each walk the row blocks
pid, pid + P, ... and keep their share of dw and db in the program's row of the partial buffers ``DWp``/``DBp``
(P x N floats, small next to x); a second small kernel (``partial_sum_kernel``) adds the P rows up and writes dw
and db in the weight's dtype. A row that fits one tile (``ONE_TILE``) is read once: the next round's x, dy and
dh are loaded before this round's arithmetic (their latency hides behind it), dw and db gather element-wise in
registers and are summed over the tile's rows once per program. A wider row takes two passes over its column
tiles (the row's two means, then dx), adding into the program's row of the partial buffers in memory.
Host side, ``norm_backward`` plans once per launch signature (config, programs, both launchers); a call
allocates dx and the buffers and launches.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_same_device, check_tensor, next_pow2, refuse_derived
from tilestack.kernels._plan import no_backward, planned
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
    if ONE_TILE:
        # The row in one tile: x, dy (and dh) read once. The next round's tiles are loaded, in their own dtype,
        # before this round's arithmetic, so their memory latency hides behind it (the backward is a stream:
        # nothing else keeps loads in flight). dw and db gather element-wise over the rounds and are summed over
        # the tile's rows once, at the end: no cross-warp reduction per round for them.
        x_next = ts.RegTile[X.dtype, BM, BN]()
        dy_next = ts.RegTile[DY.dtype, BM, BN]()
        dh_next = ts.RegTile[DH.dtype, BM, BN]()
        dh = ts.RegTile[DH.dtype, BM, BN]()      # this round's dh, held in its dtype until dx is written
        mean_next = ts.RegVec[ts.f32, BM]()
        rstd_next = ts.RegVec[ts.f32, BM]()
        dw_rows = ts.RegTile[ts.f32, BM, BN]()   # dy * xhat summed over this program's rounds
        db_rows = ts.RegTile[ts.f32, BM, BN]()   # dy summed over this program's rounds (layer norm)
        ts.zero(dw_rows)
        ts.zero(db_rows)
        ts.load(w, W, at=(0,))                   # (BN,); past N reads zero, so g is zero there
        _load_round(x_next, dy_next, dh_next, mean_next, rstd_next, X, DY, DH, Mean, Rstd, pid,
                    centered=CENTERED, add_dh=ADD_DH)
        for r in ts.range(rounds):
            i = pid + r * P
            ts.copy(x, x_next)                   # (BM, BN); rows past M read zero (and rstd = 0 there)
            ts.copy(g, dy_next)                  # dy for now
            ts.copy(rstd, rstd_next)
            if CENTERED:
                ts.copy(mean, mean_next)
            if ADD_DH:
                ts.copy(dh, dh_next)
            _load_round(x_next, dy_next, dh_next, mean_next, rstd_next, X, DY, DH, Mean, Rstd, i + P,
                        centered=CENTERED, add_dh=ADD_DH)   # past the last round: rows past M, nothing read
            if CENTERED:
                ts.sub_row(x, x, mean)
                ts.right_fill(x, x, N, 0.0)      # padding columns are 0 - mean: out of every sum
                ts.add(db_rows, db_rows, g)
            ts.mul_row(x, x, rstd)               # xhat
            ts.mul(t, g, x)
            ts.add(dw_rows, dw_rows, t)
            ts.mul_col(g, g, w)                  # g = dy * w
            ts.mul(t, g, x)
            ts.row_sum(c_gx, t)
            ts.div(c_gx, c_gx, N * 1.0)
            if CENTERED:                         # mean(g), independent of c_gx: the two row sums overlap
                ts.row_sum(c_g, g)
                ts.div(c_g, c_g, N * 1.0)
                ts.sub_row(g, g, c_g)
            ts.mul_row(t, x, c_gx)
            ts.sub(g, g, t)
            ts.mul_row(g, g, rstd)
            if ADD_DH:
                ts.copy(t, dh)
                ts.add(g, g, t)
            ts.copy(dx, g)
            ts.store(DX, dx, at=(i, 0))
        ts.col_sum(dw, dw_rows)
        ts.store(DWp, dw, at=(pid, 0))
        if CENTERED:
            ts.col_sum(db, db_rows)
            ts.store(DBp, db, at=(pid, 0))
        return
    # wide rows: per row block, pass 1 gathers the row's means over its column tiles, pass 2 writes dx and adds
    # this block's dw/db into the program's row of DWp/DBp (zeroed here first; no other program writes it)
    cols = ts.cdiv(N, BN)
    ts.zero(dw)
    for j in ts.range(cols):
        ts.store(DWp, dw, at=(pid, j))
        if CENTERED:
            ts.store(DBp, dw, at=(pid, j))
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
            if ADD_DH:
                ts.load(dx, DH, at=(i, j))       # issued with x and dy, added at the end (kept in its dtype)
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
                ts.copy(t, dx)
                ts.add(g, g, t)
            ts.copy(dx, g)
            ts.store(DX, dx, at=(i, j))


def _load_round(x, dy, dh, mean, rstd, X, DY, DH, Mean, Rstd, i, *, centered: bool, add_dh: bool) -> None:
    """Row block ``i`` of x, dy (and dh) and its statistics into the given tiles (rows past M read zero)."""
    ts.load(x, X, at=(i, 0))
    ts.load(dy, DY, at=(i, 0))
    if add_dh:
        ts.load(dh, DH, at=(i, 0))
    ts.load(rstd, Rstd, at=(i,))
    if centered:
        ts.load(mean, Mean, at=(i,))


@ts.kernel(grid=lambda Parts, BN: (ts.cdiv(Parts.shape[2], BN), Parts.shape[0]), options=dict(num_warps=4))
def partial_sum_kernel(Parts, Out, *,
                       BP: int = ts.tunable(32, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
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


MAX_ONE_TILE = 8192        # widest row the backward keeps whole in registers (16384 spills at 16 warps on sm_90)
ELEMENTS_PER_THREAD = 8    # of a round's tile, per thread: one 16-byte load of bf16 per tensor
MAX_WARPS = 16
# Programs per SM are sized for a register budget per thread: the default configs compile to at most this many
# registers on sm_90 (tests/kernels/test_layernorm_bwd.py compiles them), so every program of the persistent
# grid is resident at once: one wave, no second wave of stragglers (at 4 programs an SM of a kernel that fits 3,
# a third of the work ran alone after the rest).
REGISTER_BUDGET = 128
WARP = 32
REGISTERS_PER_SM = 65536   # where torch does not say: every CUDA GPU from Kepler to Hopper has 64K an SM
CPU_PROGRAMS = 4           # off a GPU (the interpreter, the reference executor): a few, so rounds are exercised


@functools.cache
def _sm_resources(index: int) -> tuple[int, int]:
    """(SMs, 32-bit registers per SM) of CUDA device ``index``."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "regs_per_multiprocessor", REGISTERS_PER_SM)


def programs_per_sm(num_warps: int, registers_per_sm: int) -> int:
    """Programs of ``num_warps`` warps resident on one SM when each thread holds ``REGISTER_BUDGET`` registers."""
    return max(1, registers_per_sm // (REGISTER_BUDGET * WARP * num_warps))


def programs(m: int, device, cfg: dict) -> int:
    """How many persistent programs: as many as are resident on the GPU at once, never more than row blocks."""
    blocks = max(1, -(-m // cfg.get("BM", 1)))
    if device.type != "cuda":
        return min(blocks, CPU_PROGRAMS)
    import torch

    sms, registers = _sm_resources(device.index if device.index is not None else torch.cuda.current_device())
    warps = cfg.get("num_warps", norm_bwd_kernel.options["num_warps"])
    return min(blocks, sms * programs_per_sm(warps, registers))


def bwd_config(n: int, device_type: str, config: dict) -> dict:
    """Launch config for rows of width ``n`` with the caller's choices on top: on a GPU the whole row in one
    tile where it fits, rounds of ``ELEMENTS_PER_THREAD`` x 32 x warps elements (several short rows a round);
    wider rows in 2 x 2048 tiles. ``ONE_TILE`` follows the final BN."""
    cfg = {}
    if device_type == "cuda":
        width = max(128, next_pow2(n))
        if width <= MAX_ONE_TILE:
            bm = max(1, min(16, 2048 // width))          # >= 2048 elements a round: enough loads in flight
            warps = min(MAX_WARPS, max(4, bm * width // (ELEMENTS_PER_THREAD * WARP)))
            cfg = dict(BM=bm, BN=width, ONE_TILE=True, num_warps=warps)
        else:   # two rows a block: the partial sums' read-modify-write per column tile serves both
            cfg = dict(BM=2, BN=2048, num_warps=8)
    cfg |= config
    bn = cfg.get("BN", 1024)
    if config.get("ONE_TILE") and bn < n:
        raise LaunchError(f"norm backward: ONE_TILE=True needs BN >= the row width {n}; got BN={bn}")
    cfg["ONE_TILE"] = bool(cfg.get("ONE_TILE", False)) and bn >= n
    return cfg


SUM_TILE_ELEMENTS = 8192   # of a partial-sum program's tile: 32 f32 registers a thread at 8 warps


def sum_config(n: int, p: int, device_type: str) -> dict:
    """Column strips narrow enough that the sum over the ``p`` partial rows runs on ~100 programs at once, each
    taking its strip's rows in one round where they fit (the sum's time is then one load's latency)."""
    if device_type != "cuda":
        return {}
    bn = 16 if n <= 4096 else 64
    bp = min(next_pow2(p), SUM_TILE_ELEMENTS // bn)
    return dict(BP=bp, BN=bn, num_warps=8 if bp * bn > 2048 else 4)


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
    (2, N) = [dw, db] for layer norm, (1, N) = [dw] for RMS norm, in weight's dtype. Two launches, nothing else
    on the device; the config and both launchers are planned once per launch signature."""
    return _planned_backward(dy, x, weight, mean, rstd, dh, centered, backend, tuple(config.items()))


@planned(name="norm_backward")
def _planned_backward(dy, x, weight, mean, rstd, dh, centered: bool, backend: str | None, config: tuple):
    """The plan of ``norm_backward``: the config, the programs, the launchers; ``run`` allocates and launches."""
    import torch

    fn = "layer_norm_backward" if centered else "rms_norm_backward"
    refuse_derived(fn, dict(config), {"CENTERED": "whether it is a layer norm's backward", "ADD_DH": "its dh argument"})
    # the types first: BM divides the rows into programs and BN is compared with the row width here, before the
    # kernel checks them (BM=None, '4' or 4.0 failed with a bare TypeError in programs() or torch.empty), and
    # ONE_TILE='yes' was taken as True
    for key, value in config:
        if key in ("BM", "BN") and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise LaunchError(f"{fn}: {key}={value!r} ({type(value).__name__}); expected an int, a power of two")
        if key == "ONE_TILE" and not isinstance(value, bool | np.bool_):
            raise LaunchError(f"{fn}: ONE_TILE={value!r} ({type(value).__name__}); expected a bool")
    m, n = x.shape
    sums_rows = 2 if centered else 1                   # dw [, db]
    if x.numel() == 0:   # nothing to launch: no rows give zero weight gradients; rows of width 0 give empty ones
        def empty(dy, x, weight, *_):
            return torch.empty_like(x), torch.zeros(sums_rows, n, dtype=weight.dtype, device=x.device)
        return empty
    tuned = launch_config("layer_norm_bwd" if centered else "rms_norm_bwd", str(x.dtype).removeprefix("torch."),
                          x.device, n, {})
    cfg = bwd_config(n, x.device.type, tuned | dict(config))
    p = programs(m, x.device, cfg)

    def outputs(x, weight):
        parts = torch.empty(sums_rows, p, n, dtype=torch.float32, device=x.device)   # (K, P, N): dw [, db]
        sums = torch.empty(sums_rows, n, dtype=weight.dtype, device=x.device)         # (K, N)
        return torch.empty_like(x), parts, sums

    def kernel_args(dy, x, weight, mean, rstd, dh, dx, parts):
        return (x, weight, dy, dy if dh is None else dh, rstd if mean is None else mean, rstd, dx, parts[0],
                parts[-1])

    dx, parts, sums = outputs(x, weight)
    launch = norm_bwd_kernel.launcher_for(kernel_args(dy, x, weight, mean, rstd, dh, dx, parts), backend,
                                          CENTERED=centered, ADD_DH=dh is not None, **cfg)
    launch_sum = partial_sum_kernel.launcher_for((parts, sums), backend, **sum_config(n, p, x.device.type))

    def run(dy, x, weight, mean, rstd, dh, *_):
        dx, parts, sums = outputs(x, weight)
        launch(kernel_args(dy, x, weight, mean, rstd, dh, dx, parts))
        launch_sum((parts, sums))
        return dx, sums
    return run


@no_backward("layer_norm_backward")
def layer_norm_backward(dy, x, weight, mean, rstd, *, dh=None, backend: str | None = None, **config):
    """(dx, dw, db) of layer norm over the last dim of 2-D ``x``; ``mean`` and ``rstd`` as the forward
    (``tilestack.kernels.layer_norm`` or ``add_layer_norm``) saved them. dx in x's dtype, dw and db in weight's.
    ``dh``: a gradient that reaches x (the residual stream h) by another path, added into dx."""
    check_norm_bwd_args("layer_norm_backward", dy, x, weight, {"mean": mean, "rstd": rstd}, dh=dh)
    dx, sums = norm_backward(dy, x, weight, mean, rstd, dh=dh, centered=True, backend=backend, config=config)
    return dx, sums[0], sums[1]
