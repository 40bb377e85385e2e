"""How MeasuredCompute (compute.py) times things on this machine: a module's forward and backward, the extra of a
variant (a recompute policy), an AdamW step alone or right after a backward, and a whole model against its parts.

Every timing runs on one CPU thread, as every gloo rank of ``tilestack.parallel.launch.run_local`` does, and takes
the least of repeated calls (``tilestack.perf.timing.time_fn``): on a shared machine, the least disturbed one.
Differences of two timings are medians over rounds that time both sides back to back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

TIMING_BUDGET_S = 0.5
TIMING_REL_CI = 0.05
PAIRED_ROUNDS = 3                        # time_extra, time_step_after_backward: rounds of the two sides back to back
CONTEXT_ROUNDS = 3                       # context_ratio: rounds of the whole against its parts
CONTEXT_BUDGET_S = 0.1                   # ... seconds of timing for each side in a round


def least_s(fn: Callable[[], Any], device: str = "cpu", budget_s: float = TIMING_BUDGET_S) -> float:
    """The least time of repeated calls (tilestack.perf.timing): on a shared machine the least disturbed one."""
    from tilestack.perf.timing import time_fn
    return time_fn(fn, args_sets=[()], device="cuda" if device.startswith("cuda") else "cpu",
                   budget_s=budget_s, target_rel_ci=TIMING_REL_CI, warmup_s=0.05).min_s


def single_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        import torch
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)
    return inner


@single_thread
def context_ratio(whole: tuple[Any, Callable, Callable | None], parts: list[tuple[int, tuple[Any, Callable,
                  Callable | None]]], device: str = "cpu", rounds: int = CONTEXT_ROUNDS) -> float:
    """The whole model's forward and backward over the sum of its parts' (count x a part built as the builders
    build it), each timed alone: the median over ``rounds`` of the ratio within a round, so other work on the
    machine that slows one round slows both sides of its ratio (one thread)."""
    import statistics

    def fwd_bwd(built):
        module, make_input, loss = built
        x = make_input()
        reduce = loss or (lambda y: y.float().sum())
        return module, lambda: reduce(module(x)).backward()
    w_module, w_fn = fwd_bwd(whole)
    fns = [(count, *fwd_bwd(built)) for count, built in parts]
    ratios = []
    for _ in range(rounds):
        w = least_s(w_fn, device, CONTEXT_BUDGET_S)
        alone = sum(count * least_s(fn, device, CONTEXT_BUDGET_S) for count, _, fn in fns)
        ratios.append(w / alone if alone > 0 else math.nan)
    for module in [w_module, *(m for _, m, _ in fns)]:
        module.zero_grad(set_to_none=True)
    return statistics.median(ratios)


@single_thread
def time_forward_backward(module: Any, make_input: Callable[[], Any], loss: Callable[[Any], Any] | None = None,
                          device: str = "cpu") -> tuple[float, float]:
    """(forward s, backward s) of ``module`` on ``make_input()`` (one CPU thread): forward timed alone, backward
    as forward-and-backward minus forward. ``loss`` turns the output into a scalar (default: its sum). The forward
    is timed as a training step runs it, recording the autograd graph (its output then dropped): that is also
    what full recompute runs again in the backward; under no_grad it missed the recording (on this CPU, a
    gpt 4x64 / 4x128 block at 4 samples: 1.13 / 2.23 ms against 1.02 / 1.99 ms under no_grad)."""
    x = make_input()
    reduce = loss or (lambda y: y.float().sum())

    def fwd():
        module(x)

    def fwd_bwd():
        reduce(module(x)).backward()

    t_f = least_s(fwd, device)
    t_fb = least_s(fwd_bwd, device)
    module.zero_grad(set_to_none=True)
    return t_f, max(t_fb - t_f, 0.0)


@single_thread
def time_extra(plain: Any, other: Any, make_input: Callable[[], Any], loss: Callable[[Any], Any] | None = None,
               device: str = "cpu", rounds: int = PAIRED_ROUNDS) -> float:
    """Seconds ``other``'s forward and backward take beyond ``plain``'s on the same input (one CPU thread): the
    median over ``rounds`` of the two timed back to back, so a burst of other work on the machine slows both
    sides of a round, not one; at least 0."""
    import statistics

    x = make_input()
    reduce = loss or (lambda y: y.float().sum())

    def fwd_bwd(module):
        def run():
            reduce(module(x)).backward()
        return run
    a, b = fwd_bwd(plain), fwd_bwd(other)
    diffs = [least_s(b, device) - least_s(a, device) for _ in range(rounds)]
    plain.zero_grad(set_to_none=True)
    other.zero_grad(set_to_none=True)
    return max(statistics.median(diffs), 0.0)


@single_thread
def time_step_after_backward(module: Any, make_input: Callable[[], Any], loss: Callable[[Any], Any] | None = None,
                             device: str = "cpu", rounds: int = PAIRED_ROUNDS) -> float:
    """Seconds of an AdamW step (the Trainer's kind) right after ``module``'s forward and backward: the step
    (forward, backward, AdamW, zero_grad) minus the forward and backward, median over ``rounds`` (one thread)."""
    import statistics

    import torch

    from tilestack.parallel.engine import adamw_foreach
    x = make_input()
    reduce = loss or (lambda y: y.float().sum())
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=adamw_foreach(params))

    def fwd_bwd():
        reduce(module(x)).backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()                                      # AdamW's state exists from here on, as after a training step's first
    diffs = [least_s(step, device) - least_s(fwd_bwd, device) for _ in range(rounds)]
    module.zero_grad(set_to_none=True)
    return max(statistics.median(diffs), 0.0)


@single_thread
def time_adamw(params: int, tensors: int, device: str = "cpu", dtype: Any = None) -> float:
    """One AdamW step over ``tensors`` tensors of ``params`` elements in all, with the Trainer's choice of
    ``foreach`` for plain tensors (``engine.adamw_foreach``: torch's, the multi-tensor kernels on a GPU)."""
    import torch

    from tilestack.parallel.engine import adamw_foreach
    each = max(params // max(tensors, 1), 1)
    ps = [torch.nn.Parameter(torch.zeros(each, device=device, dtype=dtype)) for _ in range(tensors)]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(ps, lr=1e-3, foreach=adamw_foreach(ps))
    return least_s(opt.step, device)
