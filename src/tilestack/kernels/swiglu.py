"""SwiGLU, the gated MLP activation of Llama-style models: y = silu(a) * b, forward and backward.

    y = tilestack.kernels.swiglu(a, b)                     # a, b: (M, F), e.g. the two halves of one projection
    da, db = tilestack.kernels.swiglu_backward(dy, a, b)   # or into given outputs (views of one (M, 2F) grad)

Element-wise over (BM, BN) tiles, f32 arithmetic, inputs and outputs in any layout (strided views are fine,
so ``a`` and ``b`` can be column halves of one tensor and the gradients can land in the halves of another).
With s = sigmoid(a):  da = dy * b * s * (1 + a * (1 - s)),  db = dy * a * s.
"""

from __future__ import annotations

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import (
    check_out_autograd,
    check_out_not_inference,
    check_same_device,
    check_tensor,
    outputs_apart_check,
)
from tilestack.kernels._plan import forward_only, planned
from tilestack.lang.layout import check_writable
from tilestack.tune.lookup import launch_config


def _grid(A, BM, BN):
    return (ts.cdiv(A.shape[0], BM), ts.cdiv(A.shape[1], BN))


_BM = ts.tunable(4, (1, 2, 4, 8, 16, 32))
_BN = ts.tunable(1024, (16, 32, 64, 128, 256, 512, 1024, 2048))
# Triton's launch options by default (not tunables of the kernel: the tuner searches them as the backend's)
_OPTIONS = dict(num_warps=4)


@ts.kernel(grid=_grid, options=_OPTIONS)
def swiglu_fwd_kernel(A, B, Y, *, BM: int = _BM, BN: int = _BN):
    # A, B, Y: (M, F)
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[ts.f32, BM, BN]()
    b = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(a, A, at=(i, j))
    ts.load(b, B, at=(i, j))
    ts.sigmoid(s, a)
    ts.mul(s, s, a)                              # silu(a)
    ts.mul(s, s, b)
    ts.copy(y, s)
    ts.store(Y, y, at=(i, j))


@ts.kernel(grid=_grid, options=_OPTIONS)
def swiglu_bwd_kernel(DY, A, B, DA, DB, *, BM: int = _BM, BN: int = _BN):
    # DY, A, B, DA, DB: (M, F)
    i, j = ts.block_id(0), ts.block_id(1)
    dy = ts.RegTile[ts.f32, BM, BN]()
    a = ts.RegTile[ts.f32, BM, BN]()
    b = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    da = ts.RegTile[DA.dtype, BM, BN]()
    db = ts.RegTile[DB.dtype, BM, BN]()
    ts.load(dy, DY, at=(i, j))
    ts.load(a, A, at=(i, j))
    ts.load(b, B, at=(i, j))
    ts.sigmoid(s, a)
    ts.mul(t, a, s)                              # silu(a)
    ts.mul(t, t, dy)
    ts.copy(db, t)                               # db = dy * silu(a)
    ts.store(DB, db, at=(i, j))
    ts.neg(t, s)
    ts.add(t, t, 1.0)
    ts.mul(t, t, a)
    ts.add(t, t, 1.0)                            # 1 + a (1 - s)
    ts.mul(t, t, s)                              # silu'(a)
    ts.mul(t, t, b)
    ts.mul(t, t, dy)
    ts.copy(da, t)
    ts.store(DA, da, at=(i, j))


def reference(a, b):
    """Plain PyTorch in f32, returned in a's dtype."""
    import torch

    return (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)


def default_config(device_type: str) -> dict:
    """Big tiles on a GPU (4k elements a program, memory-bound); the kernel's small defaults elsewhere."""
    return dict(BM=4, BN=1024, num_warps=4) if device_type == "cuda" else {}


def _check(fn: str, **tensors) -> None:
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        check_tensor(fn, name, t, rank=2, dtypes=floats if t is first else (first.dtype,))
        if tuple(t.shape) != tuple(first.shape):
            raise LaunchError(f"{fn}: {name} is {tuple(t.shape)}; expected {first_name}'s shape "
                              f"{tuple(first.shape)}")
    check_same_device(fn, **tensors)


@planned
@forward_only("swiglu")     # no backward here (swiglu_backward): a backward through it raises
def swiglu(a, b, *, out=None, backend: str | None = None, **config):
    """silu(a) * b for 2-D f32/bf16/f16 tensors of one shape and dtype (any strides). Checked and configured once
    per launch signature."""
    import torch

    _check("swiglu", a=a, b=b, **({} if out is None else {"out": out}))
    check_out_autograd("swiglu", {"out": out}, {"a": a, "b": b})
    if out is not None:         # named here as the caller knows it (the kernel's check named its Y)
        check_writable("swiglu", "out", out)
    cfg = launch_config("swiglu", str(a.dtype).removeprefix("torch."), a.device, a.shape[1],
                        default_config(a.device.type)) | config
    # out may be a or b itself (element-wise: each element is read before its own store), not a shifted view
    out_apart_from_a = outputs_apart_check("swiglu", "out", "a", second_is_input=True, allow_same=True)
    out_apart_from_b = outputs_apart_check("swiglu", "out", "b", second_is_input=True, allow_same=True)

    def output(a, b, out):
        if out is None:
            return torch.empty(a.shape, dtype=a.dtype, device=a.device)
        check_out_not_inference("swiglu", out=out)
        out_apart_from_a(out, a)
        out_apart_from_b(out, b)
        return out

    y = output(a, b, out)
    launch = swiglu_fwd_kernel.launcher_for((a, b, y), backend, **cfg)

    def run(a, b, *, out=None, **_):
        out = output(a, b, out)
        launch((a, b, out))
        return out
    return run


@planned
@forward_only("swiglu_backward", outputs=("da", "db"))
def swiglu_backward(dy, a, b, *, da=None, db=None, backend: str | None = None, **config):
    """(da, db) of y = silu(a) * b; into ``da``/``db`` if given (e.g. the two halves of one gradient). Checked
    and configured once per launch signature."""
    import torch

    outs = {k: v for k, v in (("da", da), ("db", db)) if v is not None}
    # a first: the forward's input fixes the dtype and shape, so a dy of another dtype is the one named
    _check("swiglu_backward", a=a, b=b, dy=dy, **outs)
    check_out_autograd("swiglu_backward", {"da": da, "db": db}, {"dy": dy, "a": a, "b": b})
    for name, out in outs.items():      # (the kernel's check named its DA / DB)
        check_writable("swiglu_backward", name, out)
    cfg = launch_config("swiglu_bwd", str(a.dtype).removeprefix("torch."), a.device, a.shape[1],
                        default_config(a.device.type)) | config

    apart = outputs_apart_check("swiglu_backward", "da", "db")
    # da and db may be dy, a or b themselves (element-wise: each element is read before its own store), not a
    # shifted view of one: a program stores over rows another program reads (the Triton backend's da one row past
    # a gave wrong gradients without a word)
    over_inputs = [(outputs_apart_check("swiglu_backward", o, i, second_is_input=True, allow_same=True), o, i)
                   for o in ("da", "db") for i in ("dy", "a", "b")]

    def outputs(dy, a, b, da, db):
        check_out_not_inference("swiglu_backward", da=da, db=db)
        apart(da, db)
        given = {"dy": dy, "a": a, "b": b, "da": da, "db": db}
        for check, o, i in over_inputs:
            check(given[o], given[i])
        return (torch.empty(a.shape, dtype=a.dtype, device=a.device) if da is None else da,
                torch.empty(a.shape, dtype=a.dtype, device=a.device) if db is None else db)

    launch = swiglu_bwd_kernel.launcher_for((dy, a, b, *outputs(dy, a, b, da, db)), backend, **cfg)

    def run(dy, a, b, *, da=None, db=None, **_):
        da, db = outputs(dy, a, b, da, db)
        launch((dy, a, b, da, db))
        return da, db
    return run
