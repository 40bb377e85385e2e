"""Launch-time argument checks, all done before any work starts.

Checks, in order: the number of arguments; each is a tensor where a global is expected and a number where
a scalar is; the dtype and rank the kernel was traced for; every tensor on one device; and a layout every
written tensor can be addressed with (no overlapping elements: a zero stride on an axis of size > 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from tilestack.errors import LaunchError
from tilestack.ir.types import dtype_of_torch


def check_args(traced, args: Sequence) -> None:
    name = traced.name
    params = traced.ir.params
    if len(args) != len(params):
        names = ", ".join(p.name for p in params)
        raise LaunchError(f"{name} takes {len(params)} arguments ({names}); got {len(args)}")
    written = traced.written
    devices = {}
    for i, (p, s, a) in enumerate(zip(params, traced.signature, args, strict=True)):
        if not isinstance(s, tuple):
            if isinstance(a, bool) or not isinstance(a, int | float):
                raise LaunchError(f"{name}: argument {p.name} is a runtime {s}; got {type(a).__name__} {a!r}")
            continue
        if not (hasattr(a, "dtype") and hasattr(a, "stride") and hasattr(a, "device")):
            raise LaunchError(f"{name}: argument {p.name} must be a torch.Tensor, got {type(a).__name__}")
        dt, rank = s
        if dtype_of_torch(a.dtype) != dt:
            raise LaunchError(f"{name}: argument {p.name} is {a.dtype}; this trace of {name} is for {dt} "
                              f"(trace it again for the new dtype: kernel.trace(...))")
        if a.dim() != rank:
            raise LaunchError(f"{name}: argument {p.name} has rank {a.dim()} (shape {tuple(a.shape)}); "
                              f"this trace is for rank {rank}")
        devices[p.name] = a.device
        if i in written:
            for axis, (size, stride) in enumerate(zip(a.shape, a.stride(), strict=True)):
                if size > 1 and stride == 0:
                    raise LaunchError(f"{name}: output {p.name} has stride 0 on axis {axis} (size {size}), so "
                                      "its elements overlap and a store cannot address them; pass a tensor "
                                      "with its own storage (e.g. .contiguous())")
    if len(set(map(str, devices.values()))) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise LaunchError(f"{name}: all tensors must be on one device; got {listing}")
