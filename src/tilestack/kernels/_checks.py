"""Argument checks shared by the library's public functions: each names the argument, what was given and
what was expected, and runs before any work starts."""

from __future__ import annotations

from collections.abc import Iterable

from tilestack.errors import LaunchError


def check_tensor(fn: str, name: str, x, *, rank: int | None = None, dtypes: Iterable | None = None) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        raise LaunchError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        kind = f"a nested tensor (layout {x.layout})" if x.is_nested else f"layout {x.layout}"
        raise LaunchError(f"{fn}: {name} is {kind}; expected a dense tensor (torch.strided: call .to_dense() or "
                          f".to_padded_tensor() first)")
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


def check_out_memory(fn: str, out, **inputs) -> None:
    """An ``out=`` tensor the kernel may write: no autograd through it (as torch's ``out=``), no element reached
    from two indices, no memory shared with an input. Run after the shape, dtype and device checks."""
    import torch

    from tilestack.lang.layout import check_not_aliased, check_writable

    if torch.is_grad_enabled():
        needs_grad = [name for name, t in (("out", out), *inputs.items()) if t is not None and t.requires_grad]
        if needs_grad:
            raise LaunchError(f"{fn}: out= does not support autograd, but {', '.join(needs_grad)} requires grad; "
                              "pass tensors that do not require grad, or call it under torch.no_grad()")
    check_writable(fn, "out", out)
    check_not_aliased(fn, "out", out, **inputs)


def nothing_to_launch(*tensors) -> bool:
    """True when a kernel has no work: a tensor on the meta device (shapes only, no data) or one with no
    elements. The caller returns its allocated outputs (on meta, or empty) as they are."""
    return any(t.device.type == "meta" or t.numel() == 0 for t in tensors)


def finite_real(value) -> bool:
    """A real number (not a bool) that is finite as a float: an int past float's range is not (math.isfinite
    would raise OverflowError for it)."""
    import math
    import numbers

    try:
        return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:
        return False


def check_real(fn: str, name: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (not a bool), at least ``minimum`` if given; returned as a float."""
    if not finite_real(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise LaunchError(f"{fn}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)
