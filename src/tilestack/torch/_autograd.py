"""Double backward, refused by name: the kernels' backward passes are not themselves differentiable.

    class _Norm(torch.autograd.Function):
        @staticmethod
        @once_differentiable("rms_norm")
        def backward(ctx, dy): ...

    @autograd_op("rms_norm_bwd", fake=..., refuse_double="rms_norm")   # the op path (torch.compile, subclasses):
    def rms_norm_bwd_op(...): ...                                        # tilestack.torch._library

A gradient taken with ``create_graph=True`` (a gradient penalty, a Hessian-vector product) and then
differentiated again would otherwise miss the kernels' second-order terms without a word: their backward writes
its results outside autograd, so a penalty on them read as a constant. Here the first gradient is made as usual
and carries a node that raises a LaunchError naming the op if anything differentiates it again (torch's own
``once_differentiable`` does the same with an anonymous message, and only when an incoming gradient requires grad,
which a linear loss's does not).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd import forward_ad

_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_set_tracing_state = torch._C._set_tracing_state


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``, which torch.func.jvp,
    jacfwd and hessian open too): the one case where an input may carry a tangent. A module global's read."""
    return forward_ad._current_level >= 0


def refuse_tangents(op: str, **tensors) -> None:
    """A LaunchError naming ``op`` and the first argument that carries a forward-mode tangent: the kernels have no
    forward-mode derivative, and the result would carry none (torch.func.jvp read it as a tangent of zeros). Call
    only where ``forward_ad_active()``."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            from tilestack.errors import LaunchError
            raise LaunchError(f"{op}: {name} carries a forward-mode tangent (torch.func.jvp, jacfwd, hessian or "
                              f"torch.autograd.forward_ad), and tilestack's {op} has no forward-mode derivative; "
                              "use reverse mode (torch.func.grad, vjp, jacrev) or "
                              "torch's own op")


def batched(t) -> bool:
    """Whether an incoming gradient is batched: an eager call's node (its forward ran outside torch.func) whose
    backward runs under vmap, as ``torch.autograd.grad(..., is_grads_batched=True)`` runs it (its legacy vmap:
    torch.autograd.functional.jacobian and hessian with vectorize=True, gradcheck's check_batched_grad), or inside a
    torch.func transform. Such gradients are wrappers without storage, which the planned kernels cannot read
    ("Cannot access data pointer of Tensor that doesn't have storage"); each eager backward then calls its
    tilestack:: backward op, which vmap takes. Two C calls."""
    return torch._C._are_functorch_transforms_active() or (t is not None and _is_legacy_batched(t))


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def untraced(check, *args, **kwargs):
    """``check(*args, **kwargs)`` (an argument check: reads shapes and dtypes, records nothing) with
    ``torch.jit.trace``'s tracer suspended, which hands sizes over as tensors: the checks' int arithmetic failed deep
    inside on them ("'Tensor' object has no attribute 'bit_length'"), or their messages named shapes as
    (tensor(1), tensor(8)); the decision is the trace's either way (a Python branch, recorded as taken)."""
    if _is_compiling():          # (Dynamo: no tracer, and no call into torch._C's tracing state in its graph)
        return check(*args, **kwargs)
    state = _tracing_state()
    if state is None:
        return check(*args, **kwargs)
    _set_tracing_state(None)
    try:
        return check(*args, **kwargs)
    finally:
        _set_tracing_state(state)


def double_backward_message(op: str) -> str:
    return (f"{op}: double backward is not supported (a gradient made with create_graph=True was differentiated "
            f"again); tilestack's {op} backward is not itself differentiable: compute this part with torch's op")


def once_differentiable(op: str | Callable):
    """Decorator for an ``autograd.Function.backward``: run it without recording, and under ``create_graph``
    (grad mode on in the backward) give its gradients a node that raises, naming ``op`` (a name, or a function
    of ctx giving it), when differentiated."""
    def wrap(backward):
        @functools.wraps(backward)
        def call(ctx, *grads):
            if not torch.is_grad_enabled():       # the usual backward (no create_graph): autograd runs it so
                return backward(ctx, *grads)
            with torch.no_grad():
                outs = backward(ctx, *grads)
            # the gradients depend on the forward's inputs (the op is not linear in them) and on the incoming ones
            if not (any(ctx.needs_input_grad) or any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads)):
                return outs
            single = not isinstance(outs, tuple)
            outs = (outs,) if single else outs
            # the node also takes the saved tensors that require grad (the forward's inputs, or its outputs, which
            # lead to them): a gradient taken of the first gradient with respect to them (torch.autograd.grad(g, x),
            # torch.autograd.functional.hessian and hvp) must reach the node; detached leaves alone left x out of
            # that graph, so hessian and hvp answered zeros and grad(..., allow_unused=True) None without a word
            inputs = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            err = torch._C._functions.DelayedError(double_backward_message(op(ctx) if callable(op) else op),
                                                   len(outs) + len(inputs))
            marked = err(*[None if o is None else o.detach().requires_grad_() for o in outs], *inputs)
            marked = (marked if isinstance(marked, tuple) else (marked,))[:len(outs)]
            return marked[0] if single else marked
        return call
    return wrap


def direct_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` for the eager hot path: straight to autograd's C entry where no functorch transform
    (vmap, grad, ...) is active, else through torch's Python ``apply``, which handles them. What the C entry
    skips is the Python wrapper's per-call bookkeeping (a setup_context check, a pass over the arguments for
    functorch wrappers that outlived their transform), about a dozen Python calls per op call. For Functions
    whose ``forward`` takes ``ctx`` (no ``setup_context``), as all of tilestack's do."""
    if getattr(function, "setup_context", None) is not torch.autograd.Function.setup_context:
        raise TypeError(f"direct_apply: {function.__name__} defines setup_context; use its apply")
    c_apply = super(torch.autograd.Function, function).apply
    python_apply = function.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        return python_apply(*args) if transforms_active() else c_apply(*args)

    return apply


_AUTOCAST_DEVICES = ("cuda", "cpu")     # the device types whose autocast the ops follow


def autocast_unify(*tensors):
    """The tensors as torch's autocast hands them to a lower-precision op (``F.linear``, SDPA) when their floating
    dtypes differ: inside ``torch.autocast`` of the first one's device type, each floating tensor cast to the
    autocast dtype (a bf16 activation from an autocast Linear beside an f32 parameter, which torch's linear +
    cross_entropy takes and the kernels, of one dtype, refused). Tensors of one floating dtype are returned as they
    are (the ops answer in their inputs' dtype there), and so are any beside a float64 one (autocast leaves float64
    alone: the ops refuse it by name). The casts are differentiable: each gradient comes back in its input's dtype."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in _AUTOCAST_DEVICES or \
            not torch.is_autocast_enabled(first.device.type):
        return tensors
    floats = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(floats) < 2 or torch.float64 in floats:
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
