"""Argument checks shared by the library's public functions: each names the argument, what was given and
what was expected, and runs before any work starts."""

from __future__ import annotations

from collections.abc import Iterable

from tilestack.errors import LaunchError


def check_tensor(fn: str, name: str, x, *, rank: int | None = None, dtypes: Iterable | None = None) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        raise LaunchError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise LaunchError(f"{fn}: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise LaunchError(f"{fn}: {name} has dtype {str(x.dtype).removeprefix('torch.')}; expected one of {names}")


def check_same_device(fn: str, **tensors) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len({str(d) for d in devices.values()}) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise LaunchError(f"{fn}: all tensors must be on one device; got {listing}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
