"""Argument checks shared by the library's public functions: each names the argument, what was given and
what was expected, and runs before any work starts."""

from __future__ import annotations

from collections.abc import Iterable

from tilestack.errors import LaunchError
from tilestack.lang.kernel import remember


def check_tensor(fn: str, name: str, x, *, rank: int | None = None, dtypes: Iterable | None = None) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        raise LaunchError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        kind = f"a nested tensor (layout {x.layout})" if x.is_nested else f"layout {x.layout}"
        raise LaunchError(f"{fn}: {name} is {kind}; expected a dense tensor (torch.strided: call .to_dense() or "
                          f".to_padded_tensor() first)")
    if not torch.compiler.is_compiling() and x.is_neg():    # (traced: a graph's tensors carry no such bit)
        raise LaunchError(f"{fn}: {name} is a lazily negated view (torch's negative bit, e.g. the .imag of a .conj() "
                          f"view); a kernel reads its memory as stored, without the sign: pass {name}.resolve_neg()")
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
    from tilestack.lang.layout import check_not_aliased, check_writable

    check_out_not_inference(fn, out=out)
    check_out_autograd(fn, {"out": out}, inputs)
    check_writable(fn, "out", out)
    check_not_aliased(fn, "out", out, **inputs)


def check_out_not_inference(fn: str, **outputs) -> None:
    """Outputs the caller gives (None ones absent) that are inference tensors (made under torch.inference_mode) may
    be written only inside it, as torch's out= refuses: the reference backend failed in its copy back, after the
    kernel ran, and Triton's wrote them. Per call (inference-ness is in no plan's key); one C call per output."""
    for name, t in outputs.items():
        if t is not None and t.is_inference():
            import torch

            if not torch.is_inference_mode_enabled():
                raise LaunchError(f"{fn}: {name} is an inference tensor (made under torch.inference_mode), which may "
                                  "not be written outside it; make it outside inference mode, or call this under "
                                  "torch.inference_mode()")


def check_out_autograd(fn: str, outputs: dict, inputs: dict) -> None:
    """Outputs the caller gives (``out=``, rotary's ``q_out=``, swiglu_backward's ``da=``; None ones absent) take
    no autograd, as torch's ``out=``: the kernel writes them outside autograd, so an output that requires grad, or
    one made from an input that does, would carry no gradient (or fail inside the backend's in-place copy). Run
    where grad mode and requires_grad are fixed (a plan's body: both are in its key)."""
    import torch

    given = [name for name, t in outputs.items() if t is not None]
    if not given or not torch.is_grad_enabled():
        return
    needs_grad = [name for name, t in (*outputs.items(), *inputs.items()) if t is not None and t.requires_grad]
    if needs_grad:
        raise LaunchError(f"{fn}: {'/'.join(n + '=' for n in given)} does not support autograd, but "
                          f"{', '.join(needs_grad)} requires grad; pass tensors that do not require grad, or call it "
                          "under torch.no_grad()")


def _translate_reaches(delta: int, dims: list[tuple[int, int]]) -> bool:
    """Whether ``delta`` (elements) = sum of k_i * stride_i with |k_i| < size_i over ``dims`` ((stride, size),
    strides descending, all > 0): whether a tensor and its copy shifted by delta share an element. Few candidates
    per dim when each stride spans the dims below it (any slice of a dense tensor); past a handful, True."""
    if not dims:
        return delta == 0
    (stride, size), rest = dims[0], dims[1:]
    below = sum((n - 1) * s for s, n in rest)      # the farthest the dims below reach
    lo, hi = -(-(delta - below) // stride), (delta + below) // stride
    if hi - lo > 8:
        return True                                 # not a nested layout: assume the worst
    return any(abs(k) < size and _translate_reaches(delta - k * stride, rest) for k in range(lo, hi + 1))


def overlap(a, b) -> bool:
    """Whether tensors ``a`` and ``b`` may share an element: their byte ranges intersect and, for two views of one
    shape, dtype and strides (the halves of one gradient, interleaved row by row), one shifted onto the other hits
    an element of it. Otherwise intersecting ranges count as sharing (conservative)."""
    from tilestack.lang.layout import shares_memory

    if not shares_memory(a, b):
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return True
    delta, size = a.data_ptr() - b.data_ptr(), a.element_size()
    if delta % size:
        return True
    dims = sorted(((st, n) for st, n in zip(a.stride(), a.shape, strict=True) if n > 1), reverse=True)
    if any(st <= 0 for st, _ in dims):
        return True
    return _translate_reaches(abs(delta // size), dims)


def outputs_apart_check(fn: str, first: str, second: str, *, second_is_input: bool = False,
                        allow_same: bool = False):
    """For a plan whose two outputs' shapes, strides and dtypes its key fixes: ``check(t, u)``, a LaunchError when
    the outputs ``t`` (named ``first``) and ``u`` (``second``) share an element (each store would overwrite the
    other's, and which one lands is a race), or with ``second_is_input`` the output ``t`` and an input ``u`` of
    another role (read after the write); None ones are skipped. ``allow_same``: the output may be that input
    itself, the same elements (an element-wise kernel reads each before its own store), only not a shifted
    view of it. Per call, since addresses are not in a plan's
    key; with the layouts fixed, only the offset between two views of one storage decides, so an offset found
    apart is remembered: a backward writing the halves of one gradient pays a subtraction and a lookup."""
    apart: dict = {}
    why = (f"{first} shares memory with {second}; the kernel would read {second} after writing {first} over it: "
           f"pass a separate {first} tensor" if second_is_input else
           f"{first} and {second} share memory; each would overwrite the other's results: pass separate {first} "
           f"and {second} tensors")

    def check(t, u) -> None:
        if t is None or u is None or t.untyped_storage().data_ptr() != u.untyped_storage().data_ptr():
            return
        offset = t.data_ptr() - u.data_ptr()
        if offset in apart:
            return
        if allow_same and offset == 0 and t.shape == u.shape and t.stride() == u.stride():
            remember(apart, offset, True)
            return
        if overlap(t, u):
            raise LaunchError(f"{fn}: {why}")
        remember(apart, offset, True)
    return check


def nothing_to_launch(*tensors) -> bool:
    """True when a kernel has no work: a tensor on the meta device (shapes only, no data) or one with no
    elements. The caller returns its allocated outputs (on meta, or empty) as they are."""
    return any(t.device.type == "meta" or t.numel() == 0 for t in tensors)


def finite_real(value) -> bool:
    """A real number (not a bool) that is finite as a float: an int past float's range is not (float() raises
    OverflowError for it). By a comparison, not math.isfinite: under torch.compile with dynamic shapes a float
    argument is a SymFloat, and Dynamo cannot trace math.isfinite of one (a graph break, an error under
    fullgraph=True: tilestack.attention(..., scale=0.3) failed so), where it guards on a comparison."""
    import math
    import numbers

    try:
        return not isinstance(value, bool) and isinstance(value, numbers.Real) and abs(float(value)) < math.inf
    except OverflowError:
        return False


def check_real(fn: str, name: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (not a bool), at least ``minimum`` if given; returned as a float."""
    if not finite_real(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise LaunchError(f"{fn}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)


def refuse_derived(fn: str, config: dict, derived: dict[str, str], where: str = "config") -> None:
    """A LaunchError where ``config`` (a library function's ``**config`` of block shapes and launch options, or a
    part of it: ``where`` names it) sets a kernel constant the function derives itself (``derived``: its name ->
    what the function makes it from). Such a key clashed with the function's own value (a bare TypeError, "got
    multiple values for keyword argument") or replaced it without a word: attention_forward(q, k, v, DV=8) on
    a head dim of 16 read half of v and answered wrong. Run in the plan, before any work."""
    clash = [name for name in derived if name in config]
    if clash:
        name = clash[0]
        raise LaunchError(f"{fn}: {where} sets {name}={config[name]!r}, which {fn} derives from "
                          f"{derived[name]}; expected only block shapes and launch options there (leave "
                          f"{', '.join(sorted(derived))} out)")
