"""Launch-time argument checks, all done before any work starts.

Checks, in order: the number of arguments; each is a tensor where a global is expected (a dense, strided one:
not sparse or MKL-DNN) and a number where a scalar is; the dtype and rank the kernel was traced for; every tensor
on one device; a layout every written tensor can be addressed with (no two indices reaching one element:
lang.layout.check_writable); and, on every launch (cached ones too, as the launch key holds no addresses), no
written tensor sharing elements at other indices with another argument (``overlap_guard``: X = buf[:48] read while
Y = buf[16:] is written) and, in grad mode, none that requires grad (``refuse_grad_output``). The per-parameter
expectations are computed once per traced kernel; the other checks run when a launch signature is first seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tilestack.errors import LaunchError
from tilestack.ir.ops import Op
from tilestack.ir.types import TORCH_NAMES
from tilestack.lang.layout import check_no_partial_overlap, check_writable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _plan(traced) -> list[tuple]:
    """(index, name, torch dtype or None for a scalar, tile dtype, rank, written, stored) per parameter: written
    by a store or an atomic add, stored by a store. An output only added into atomically may have indices sharing
    memory (a max-pool's gradient added through an overlapping as_strided view of its windows): the adds are atomic,
    so they sum whatever the order, as on the GPU; a store to such an output races and is refused."""
    args = {ins.result: ins.attrs.index for ins in traced.ir.walk() if ins.op is Op.ARG}
    stored = {args[ins.srcs[0]] for ins in traced.ir.walk() if ins.op is Op.STORE}
    plan = []
    for i, (p, s) in enumerate(zip(traced.ir.params, traced.signature, strict=True)):
        if isinstance(s, tuple):
            dt, rank = s
            plan.append((i, p.name, getattr(torch, TORCH_NAMES[dt.name]), dt, rank, i in traced.written,
                         i in stored))
        else:
            plan.append((i, p.name, None, s, 0, False, False))
    return plan


def check_args(traced, args: Sequence) -> None:
    name = traced.name
    plan = traced._check_plan
    if plan is None:
        plan = traced._check_plan = _plan(traced)
    if len(args) != len(plan):
        names = ", ".join(p[1] for p in plan)
        raise LaunchError(f"{name} takes {len(plan)} arguments ({names}); got {len(args)}")
    device = None
    for i, pname, tdt, dt, rank, written, stored in plan:
        a = args[i]
        if tdt is None:
            if isinstance(a, bool) or not isinstance(a, int | float) or (dt == "int" and not isinstance(a, int)):
                raise LaunchError(f"{name}: argument {pname} is a runtime {dt}; got {type(a).__name__} {a!r}")
            if dt == "int" and not INT64_MIN <= a <= INT64_MAX:     # (the backends pass it as an i32 or i64)
                raise LaunchError(f"{name}: argument {pname} is a runtime int, at most 64 bits; got {a!r} (expected "
                                  "-2**63 <= value < 2**63)")
            continue
        if not isinstance(a, torch.Tensor):
            raise LaunchError(f"{name}: argument {pname} must be a torch.Tensor, got {type(a).__name__}")
        if a.is_nested:   # (a strided-layout nested tensor has no sizes or strides: torch's internal error)
            raise LaunchError(f"{name}: argument {pname} is a nested tensor (layout {a.layout}, {a.size(0)} "
                              "components); kernels address dense tensors: pass "
                              f"{pname}.to_padded_tensor(0.0), or its components' values as one dense tensor with "
                              "their offsets (a jagged kernel's arguments)")
        if a.layout is not torch.strided:   # (no storage to address: torch failed reading its data pointer)
            raise LaunchError(f"{name}: argument {pname} has layout {a.layout}; kernels address dense tensors "
                              f"(torch.strided): pass {pname}.to_dense()")
        if a.dtype is not tdt:
            raise LaunchError(f"{name}: argument {pname} is {a.dtype}; this trace of {name} is for {dt} "
                              f"(trace it again for the new dtype: kernel.trace(...))")
        if a.dim() != rank:
            raise LaunchError(f"{name}: argument {pname} has rank {a.dim()} (shape {tuple(a.shape)}); "
                              f"this trace is for rank {rank}")
        if a.is_neg():     # the backends read memory as stored: the Triton backend's results lost the sign
            raise LaunchError(f"{name}: argument {pname} is a lazily negated view (torch's negative bit, e.g. the "
                              ".imag of a .conj() view); the kernel reads its memory as stored, without the sign: pass "
                              f"{pname}.resolve_neg()")
        if device is None:
            device = a.device
        elif a.device != device:
            listing = ", ".join(f"{p[1]} on {args[p[0]].device}" for p in plan if p[2] is not None)
            raise LaunchError(f"{name}: all tensors must be on one device; got {listing}")
        if stored:
            check_writable(name, f"output {pname}", a)
        if written:
            if a.requires_grad and torch.is_grad_enabled():
                refuse_grad_output(name, pname, a)


def refuse_grad_output(name: str, pname: str, a: torch.Tensor) -> None:
    """LaunchError for output ``pname`` (a tensor the kernel stores to) that requires grad, launched in grad mode.
    A kernel writes its outputs in place, unseen by autograd: into a leaf that requires grad the reference backend
    failed in its copy back with torch's bare RuntimeError after running the kernel, and Triton wrote it silently;
    into a tracked intermediate autograd's graph knew nothing of the kernel's math (no gradient reached the tensors
    it read from): gradients silently wrong. Under
    torch.no_grad() (an optimizer's update, an initialisation) the write is meant and runs. Called on every launch
    (TracedKernel.launcher's guard: the launch key holds neither requires_grad nor the grad mode)."""
    shape = tuple(a.shape)
    what = (f"is a leaf tensor that requires grad (shape {shape})" if a.grad_fn is None else
            f"is a tensor autograd tracks (shape {shape}, grad_fn {type(a.grad_fn).__name__}), so it requires grad")
    raise LaunchError(f"{name}: output {pname} {what}; a kernel writes its outputs in place, unseen by autograd, so "
                      f"its gradients would be wrong; expected an output that does not require grad (one "
                      "allocated with torch.empty, say), or a launch under torch.no_grad() to write it on purpose (as "
                      "an optimizer's update does)")


def refuse_inference_output(name: str, pname: str, a: torch.Tensor) -> None:
    """LaunchError for output ``pname``, an inference tensor (made under torch.inference_mode()), launched outside
    inference mode: torch refuses an in-place update of one there (it keeps no version counter to tell readers), so
    the reference backend failed with torch's RuntimeError after running the kernel while Triton wrote it. Called on
    every launch (TracedKernel.launcher's guard: the launch key holds neither the tensor's kind nor the mode)."""
    raise LaunchError(f"{name}: output {pname} is an inference tensor (shape {tuple(a.shape)}, made under "
                      "torch.inference_mode()) and this launch is outside inference mode, where torch allows no "
                      f"in-place update of one; launch inside torch.inference_mode(), or pass {pname}.clone() "
                      "(a normal tensor) to write")


def overlap_guard(traced, args: Sequence):
    """A per-launch check (the launch key holds no addresses) that no written tensor argument partially overlaps
    another tensor argument (lang.layout.check_no_partial_overlap), or None where the kernel has fewer than two
    tensors. Each call compares byte ranges (the spans are fixed by the launch key); only tensors whose ranges meet
    are tested element by element."""
    tensors = [i for i, s in enumerate(traced.signature) if isinstance(s, tuple)]
    written = sorted(traced.written)
    if len(tensors) < 2 or not written:
        return None
    names = [p.name if i in tensors else None for i, p in enumerate(traced.ir.params)]
    spans = {i: (sum((n - 1) * st for n, st in zip(args[i].shape, args[i].stride(), strict=True)) + 1)
             * args[i].element_size() if args[i].numel() else 0 for i in tensors}
    used = [i for i in tensors if spans[i]]
    pairs = [(used.index(w), used.index(i), spans[w], spans[i]) for w in written if spans[w] for i in used if i != w]

    def check(args: Sequence) -> None:
        ptrs = [args[i].data_ptr() for i in used]
        for w, i, span_w, span_i in pairs:
            if ptrs[i] < ptrs[w] + span_w and ptrs[w] < ptrs[i] + span_i:
                check_no_partial_overlap(traced.name, names, written, args)
                return
    return check if pairs else None
