"""Plans: a library function's checks and choices made once per launch signature, not once per call.

    @planned
    def softmax(x, *, out=None, backend=None):
        check_tensor("softmax", "x", x, ...)                 # every check, the config, the launcher: once
        launch = softmax_kernel.launcher_for((x, y), backend, **cfg)
        def run(x, *, out=None, backend=None):               # every call: allocate and launch
            y = torch.empty_like(x) if out is None else out
            launch((x, y))
            return y
        return run

The plan is keyed by ``plan_key``: per tensor its dtype, shape, strides, device, address alignment (what a
kernel launch is specialized for), whether it requires grad (what an ``out=`` check depends on) and its negative
bit (a lazily negated view, which the checks refuse: the kernels read memory as stored), per other
argument its type and value (True == 1 == 1.0 in Python, but a check that refuses ``causal=1`` or ``eps=True``
must refuse it whichever call came first); and torch's grad and deterministic modes (a plan may choose by them).
A repeated call costs the key, one dictionary lookup and what ``run`` does. Arguments the key cannot hold
(unhashable ones) take the planned way every time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from tilestack.config import knobs
from tilestack.lang.kernel import remember


def plan_key(args: tuple, kwargs: dict) -> tuple:
    """What a plan depends on (module docstring); a TypeError for an argument that cannot be a key. Written for
    the hot path (every planned call computes it): list comprehensions over the arguments (no generator frames),
    no pass over kwargs when there are none."""
    tensor = torch.Tensor
    return (tuple([(a.dtype, a.shape, a.stride(), a.device, a.data_ptr() % 16 == 0, a.requires_grad, a.is_neg())
                   if isinstance(a, tensor) else (type(a), a) for a in args]),
            tuple([(k, (v.dtype, v.shape, v.stride(), v.device, v.data_ptr() % 16 == 0, v.requires_grad, v.is_neg())
                    if isinstance(v, tensor) else (type(v), v)) for k, v in kwargs.items()]) if kwargs else (),
            knobs.backend, knobs.triton_interpret, _grad_enabled(), _deterministic())


_grad_enabled, _deterministic = torch.is_grad_enabled, torch._C._get_deterministic_algorithms   # C, no wrapper
# what plan_key raises for an argument no key holds: unhashable (TypeError), or a tensor without strides or
# storage, sparse or mkldnn (RuntimeError, NotImplementedError); such calls are planned every time, so the plan's
# checks refuse them by name
_NO_KEY = (TypeError, RuntimeError, NotImplementedError)


_is_transformed = torch._C._functorch.is_functorch_wrapped_tensor
_is_compiling = torch.compiler.is_dynamo_compiling     # Dynamo tracing (not its backends, nor AOT tracing)


def _arguments(plan: Callable, args: tuple, kwargs: dict):
    """(name, value) of each argument of a call to ``plan`` (positional ones named by its signature)."""
    import inspect

    try:
        return inspect.signature(plan).bind_partial(*args, **kwargs).arguments.items()
    except TypeError:
        return [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]


def refuse_transformed(fn: str, plan: Callable, args: tuple, kwargs: dict) -> None:
    """A LaunchError naming the function ``fn`` and the first argument that is a tensor of a torch.func transform (vmap,
    grad, jvp: a wrapper without storage, which a kernel cannot read) or carries a forward-mode tangent (which the
    result would not carry: torch.func.jvp read it as zero). The differentiable ops of ``tilestack.torch.ops`` and
    ``tilestack.attention`` take torch.func's transforms; a kernel function runs on plain tensors."""
    from torch.autograd import forward_ad

    for name, value in _arguments(plan, args, kwargs):
        if not isinstance(value, torch.Tensor):
            continue
        if _is_transformed(value):
            why = "is a tensor of a torch.func transform (vmap, grad, jvp, ...)"
        elif forward_ad._current_level >= 0 and forward_ad.unpack_dual(value).tangent is not None:
            why = "carries a forward-mode tangent (torch.func.jvp, jacfwd or torch.autograd.forward_ad)"
        else:
            continue
        from tilestack.errors import LaunchError
        raise LaunchError(f"{fn}: {name} {why}; the kernel function runs on plain tensors and has no rule for "
                          "it: call it outside the transform, or use tilestack's differentiable ops (tilestack.torch."
                          "ops, tilestack.attention), which take torch.func's reverse-mode transforms and vmap")


def _outside_graph(call: Callable, fn: str) -> Callable:
    """``call`` for Dynamo to call without tracing it: under ``torch.compile`` a graph break (an error under
    fullgraph=True) whose reason names ``fn``; the eager call is unchanged."""
    return torch.compiler.disable(call, reason=(
        f"tilestack's kernel function {fn} runs eagerly on plain tensors, outside a compiled graph; "
        "inside one use tilestack's differentiable ops (tilestack.torch.ops, tilestack.attention, "
        "tilestack.scaled_dot_product_attention), which are torch custom ops"))


def planned(plan: Callable | None = None, *, name: str | None = None) -> Callable:
    """Decorator: ``plan(*args, **kwargs)`` checks everything and returns ``run(*args, **kwargs)``; the
    decorated function plans once per ``plan_key`` and runs every time. Tensors of torch.func's transforms and
    inputs carrying a forward-mode tangent are refused by name (``refuse_transformed``), the function named as
    ``name`` says (``@planned(name="quantized_linear")`` for a private plan of a public function), else by its own
    name."""
    if plan is None:
        return functools.partial(planned, name=name)
    fn = name or plan.__name__
    cache: dict = {}
    from torch.autograd import forward_ad

    @functools.wraps(plan)
    def call(*args, **kwargs):
        if _is_compiling():    # traced by Dynamo: a graph break into the eager call (the reason names the function)
            return outside_graph(*args, **kwargs)
        try:
            key = plan_key(args, kwargs)
            run = cache.get(key)
        except _NO_KEY:     # an unhashable argument, a tensor without strides or storage: the plan's checks say
            refuse_transformed(fn, plan, args, kwargs)
            return plan(*args, **kwargs)(*args, **kwargs)
        if forward_ad._current_level >= 0:    # a dual level open: a tangent would be dropped without a word
            refuse_transformed(fn, plan, args, kwargs)
        if run is None:
            run = remember(cache, key, plan(*args, **kwargs))
        return run(*args, **kwargs)

    def plan_for(*args, **kwargs):
        """The ``run`` of these arguments' signature, planned if new, without running it (a TypeError for an
        argument the key cannot hold). For a caller that keeps a run and calls it again itself."""
        try:
            key = plan_key(args, kwargs)
        except _NO_KEY as e:
            raise TypeError(f"no plan key: {e}") from e
        run = cache.get(key)
        if run is None:
            run = remember(cache, key, plan(*args, **kwargs))
        return run

    # Dynamo traced into the plan (the key, the checks, the reference executor) and failed on a functorch builtin,
    # which broke torch.compile(fullgraph=True) of any caller with a message naming no tilestack function, and
    # without fullgraph recompiled the executor's lambdas past Dynamo's limit: the call is opaque to Dynamo instead
    outside_graph = _outside_graph(call, fn)
    call.plans = cache
    call.plan_for = plan_for
    return call


def checked_once(check: Callable) -> Callable:
    """Decorator: ``check(*args, **kwargs)`` (raising on bad input, returning nothing) runs once per
    ``plan_key``; a signature that passed once passes again without running it. For the argument checks of a
    public function whose launch is planned elsewhere (a wrapper of several planned kernels)."""
    passed: dict = {}

    @functools.wraps(check)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():   # traced into a graph: the check is traced with it, once
            return check(*args, **kwargs)
        try:
            key = plan_key(args, kwargs)
            if key in passed:
                return
        except _NO_KEY:   # unhashable; a tensor without storage: every time
            key = None
        check(*args, **kwargs)
        if key is not None:
            remember(passed, key, True)

    call.passed = passed
    return call


class _ForwardOnly(torch.autograd.Function):
    """``run(*args, **kwargs)`` recorded against the tensors of the call; its backward raises, naming the op."""

    @staticmethod
    def forward(ctx, fn, run, args, kwargs, *tensors):
        ctx.fn = fn
        return run(*args, **kwargs)

    @staticmethod
    def backward(ctx, *_):
        from tilestack.errors import LaunchError
        raise LaunchError(f"{ctx.fn}: a backward through tilestack.kernels.{ctx.fn}, which has no backward (no "
                          f"gradient for its inputs); call it under torch.no_grad() or on detached inputs, or use "
                          "torch's own op where a gradient is needed")


def _requires_grad(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))


def _recorded(fn: str, run: Callable) -> Callable:
    """``run`` whose results join autograd through a ``_ForwardOnly`` node (its backward raises, naming ``fn``)."""
    def run_recorded(*args, **kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        return _ForwardOnly.apply(fn, run, args, kwargs, *tensors)
    return run_recorded


def forward_only(fn: str, outputs: tuple[str, ...] = ("out",)) -> Callable:
    """Decorator for the plan of a kernel function without a backward (under ``@planned``): where grad mode is on
    and an input requires grad (both in the plan's key), the result joins autograd through a node whose backward
    raises, naming ``fn``, so a loss through it cannot lose that input's gradient without a word (the result had
    no grad_fn). The forward answers as ever. A call given any of its ``outputs`` (``out=``, rotary's ``q_out=``)
    is left alone: the plan refuses autograd there itself (``_checks.check_out_autograd``).

    The differentiable ops (``tilestack.torch``) run these functions inside their autograd Functions, with grad
    mode off, and make the plans they keep under ``torch.no_grad()``: they get the plain run."""
    def wrap(plan: Callable) -> Callable:
        @functools.wraps(plan)
        def plan_recorded(*args, **kwargs):
            run = plan(*args, **kwargs)
            if any(kwargs.get(name) is not None for name in outputs) or not torch.is_grad_enabled() or \
                    not _requires_grad(args, kwargs):
                return run
            return _recorded(fn, run)
        return plan_recorded
    return wrap


def no_backward(fn: str) -> Callable:
    """``forward_only`` for a kernel function that is not planned itself (a thin wrapper checking and calling a
    private plan, as ``kernels.rms_norm``): decided per call, by grad mode and its tensors' requires_grad."""
    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def call(*args, **kwargs):
            if _is_compiling():     # traced by Dynamo: opaque to it, named by the public function (``planned``)
                return outside_graph(*args, **kwargs)
            if torch.is_grad_enabled() and _requires_grad(args, kwargs):
                return _recorded(fn, function)(*args, **kwargs)
            return function(*args, **kwargs)
        outside_graph = _outside_graph(call, fn)
        return call
    return wrap
