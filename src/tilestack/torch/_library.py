"""tilestack's differentiable ``tilestack::*`` ops, registered through ``torch.library.Library`` rather than
``torch.library.custom_op``: what a compiled graph (and a tensor subclass's eager call) pays per call.

    @autograd_op("rms_norm_fwd", fake=_rms_fake, setup_context=_rms_setup, backward=_rms_backward)
    def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        ...
    # rms_norm_fwd_op is now the OpOverload torch.ops.tilestack.rms_norm_fwd.default

Each op gets the schema ``custom_op`` would infer from the annotations (``torch.library.infer_schema``; the
``pt2_compliant_tag`` too), and three kernels:
- CompositeExplicitAutograd: the function itself (every device);
- the fake (meta) kernel, through ``torch.library.register_fake``;
- Autograd: a Python kernel. Where a gradient is asked for (grad mode on, an input that requires grad) it applies
  a ``torch.autograd.Function`` built here from ``setup_context`` and ``backward`` (custom_op's
  ``register_autograd`` signatures: ``setup_context(ctx, inputs, output)``, inputs with their defaults filled
  in; ``backward(ctx, *grads)``, one gradient per input). Otherwise, as in a compiled graph, where the forward
  graph runs without grad and the backward graph calls the backward ops: for plain CPU or CUDA tensors it calls
  the function directly (no second trip through the dispatcher), and for anything else (fake tensors, meta,
  functionalization, functorch wrappers) it redispatches below autograd, as custom_op always does.

What custom_op's own layers cost per call, and why they are skipped: its Autograd kernel builds a metadata
dataclass and redispatches through ``OpOverload.redispatch``, and its backend kernel wraps the function with an
aliasing check of the outputs. With a function that only clones its input, on this machine's CPU (2 cores,
torch 2.13, under no_grad): the bare function 1.9 us, as a custom_op 9.5 us, as here 5.1 us, as a Library op with
no autograd at all 3.1 us (``_inference_op`` in compile/ops.py).

``refuse_double`` (a backward op's name): the op's gradients are refused by name if differentiated (a gradient
penalty through a kernel's backward; see ``_autograd``), as custom_op's ``register_autograd`` with a raising backward
did before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import _C
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.forward_ad import _set_fwd_grad_enabled as _fwd_grad_enabled

from tilestack.errors import LaunchError
from tilestack.torch._autograd import double_backward_message, forward_ad_active, refuse_tangents

LIB = torch.library.Library("tilestack", "FRAGMENT")     # kept alive here: the ops live as long as it does

_AFTER_AUTOGRAD = _C._after_autograd_keyset
_DIRECT = frozenset((_C.DispatchKey.CPU, _C.DispatchKey.CUDA))     # the keys whose kernel is the function itself
_grad_enabled = _C.is_grad_enabled
_any_requires_grad = _C._any_requires_grad
_below_autograd = _C._AutoDispatchBelowAutograd
_transforms_active = _C._are_functorch_transforms_active


def autograd_op(name: str, *, fake: Callable, setup_context: Callable | None = None,
                backward: Callable | None = None, refuse_double: str | None = None):
    """Decorator: register ``fn`` as ``tilestack::<name>`` (module docstring) and return its OpOverload. Give
    ``backward`` (with ``setup_context`` where it needs saved state) for a differentiable op, or
    ``refuse_double`` for a backward op whose gradients must not be differentiated again."""
    if (backward is None) == (refuse_double is None):
        raise TypeError(f"autograd_op {name!r}: give exactly one of backward and refuse_double")

    def register(fn: Callable) -> torch._ops.OpOverload:
        schema = torch.library.infer_schema(fn, mutates_args=())
        try:
            LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        except RuntimeError as e:          # a second import of the module in one process: registered already
            if "already" not in str(e) and "multiple times" not in str(e):
                raise
            return getattr(torch.ops.tilestack, name).default
        op = getattr(torch.ops.tilestack, name).default
        LIB.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(op, fake, lib=LIB)
        if refuse_double is not None:
            back = _refusing(refuse_double)
        else:
            back = backward
        public = refuse_double or name.removesuffix("_fwd")      # the public op's name, for errors
        LIB.impl(name, _autograd_kernel(op, fn, setup_context, back, public), "Autograd", with_keyset=True)
        return op

    return register


def _own(t):
    return t.detach() if isinstance(t, torch.Tensor) and t._is_view() else t


def _refusing(op_name: str) -> Callable:
    def backward(ctx, *grads):
        raise LaunchError(double_backward_message(op_name))
    return backward


def _autograd_kernel(op: torch._ops.OpOverload, fn: Callable, setup_context: Callable | None,
                     backward: Callable, public: str) -> Callable:
    """The op's Autograd-key kernel (module docstring): ``kernel(keyset, *args)``."""
    arguments = op._schema.arguments
    n_args = len(arguments)
    # the dispatcher drops trailing arguments equal to their defaults; setup_context sees them all
    defaults = tuple(a.default_value if a.has_default_value() else None for a in arguments)
    redispatch = op.redispatch

    def below(keyset, args):
        """The op's result without autograd: the function for plain CPU/CUDA tensors, else the kernel below."""
        keyset = keyset & _AFTER_AUTOGRAD
        if keyset.highestPriorityTypeId() in _DIRECT:
            return fn(*args)
        with _below_autograd():
            return redispatch(keyset, *args)

    def forward(ctx, keyset, *args):
        if _transforms_active():
            # the levels below a torch.func transform's (an outer grad of grad(f), the jvp of jacfwd(jacrev(f)))
            # record their own graphs and tangents: grad and forward grad back on for them, as functorch does for its
            # own Functions (autograd turned both off for forward); else an outer transform read this op as a
            # constant: zeros, without a word
            with torch.enable_grad(), _fwd_grad_enabled(True):
                out = below(keyset, args)
        else:
            out = below(keyset, args)
        # an output that is a view (of the function's own (rows, N) result) as a tensor of its own: a view made inside
        # an autograd Function may not be modified in place, so y.mul_(2) on the op's result failed where torch's
        # ops answer (detach keeps the memory and the version counter)
        out = tuple(_own(o) for o in out) if isinstance(out, tuple) else _own(out)
        if setup_context is not None:
            setup_context(ctx, args if len(args) == n_args else (*args, *defaults[len(args):]), out)
        return out

    def function_backward(ctx, *grads):
        grads_in = backward(ctx, *grads)
        return (None, *grads_in) if isinstance(grads_in, tuple) else (None, grads_in)

    function = type(f"{op._opname}_function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})
    # autograd's C entry, never the Python apply that hands a Function to torch.func's transforms: this kernel runs
    # below a transform's layer (the dispatcher reaches it after torch.func.grad unwrapped its tensors to its level),
    # where the Function records on those tensors as a native op's autograd does, allowed as functorch allows its
    # own single-level Functions; the Python apply re-entered the transforms from here and failed
    # (torch.func.grad, vjp and jacrev of every op)
    c_apply = super(torch.autograd.Function, function).apply

    def apply(*args):
        if not _transforms_active():
            return c_apply(*args)
        with enable_single_level_autograd_function():
            return c_apply(*args)

    names = [a.name for a in arguments]

    def kernel(keyset, *args):
        if forward_ad_active():          # a tangent would be dropped without a word: refused, naming the argument
            refuse_tangents(public, **dict(zip(names, args, strict=False)))
        if _grad_enabled() and _any_requires_grad(*args):
            return apply(keyset, *args)
        keyset = keyset & _AFTER_AUTOGRAD           # below(keyset, args), inlined: the compiled graph's path
        if keyset.highestPriorityTypeId() in _DIRECT:
            return fn(*args)
        with _below_autograd():
            return redispatch(keyset, *args)

    kernel.__name__ = f"{op._opname}_autograd"
    return kernel


def is_custom_op(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` was made by ``torch.library.custom_op`` (its Python wrapper on the call path)."""
    from torch._library.custom_ops import OPDEFS
    return op._schema.name in OPDEFS
