"""Helpers the profiler's held-out rounds share (test_perf_heldout_round2/3, test_profile_unseen_round4/5,
test_heldout): synthetic CPU ceilings, the profile of each model case computed once, FLOPs summed by op, torch's
own counts of the same step, a convolution's hand count, and the checks every round makes of every row.

    from profile_support import CEIL, by_op, flops_of, Profiles
    profiled = Profiles(pm.MODELS)            # profiled(name, train) -> (profile, our counts, torch's counts)
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from tilestack.perf import device, profile
from tilestack.perf.profile_state import same_draws, same_state

CEIL = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "bf16": 2e11, "fp16": 2e11}, "now")  # ridge at 10 FLOP/B
REL = 1e-9  # sums of per-call counts: float rounding only
TORCH_COUNTED = {str(k).replace(".", "::", 1) for k in flop_registry}  # "aten::mm", ...
# torch counts a convolution without its bias, and a grouped one's weight gradient as if ungrouped: the rounds
# check these by hand instead.
NOT_AS_TORCH = {"aten::convolution", "aten::convolution_backward"}


def by_op(counts) -> dict[str, float]:
    """FLOPs per op name, summed over its shapes."""
    out: dict[str, float] = {}
    for (op, _), c in counts.items():
        out[op] = out.get(op, 0.0) + c.flops
    return out


def flops_of(counts, ops) -> float:
    """FLOPs of the ops named in ``ops`` (a set of names, or one name)."""
    ops = {ops} if isinstance(ops, str) else ops
    return math.fsum(c.flops for (op, _), c in counts.items() if op in ops)


def rows_of(counts, op) -> list:
    """The counts of ``op`` at each of its shapes."""
    return [c for (name, _), c in counts.items() if name == op]


def conv(batch, c_in, c_out, out_positions, taps, *, groups=1, bias=True) -> int:
    """2 * N * positions * C_out * C_in/groups * taps, + one add per output element for a bias."""
    return 2 * batch * out_positions * c_out * (c_in // groups) * taps + (batch * c_out * out_positions if bias else 0)


def torch_by_op(step) -> dict[str, float]:
    """torch.utils.flop_counter's FLOPs of one run of ``step``, per op name (``aten::mm``)."""
    with FlopCounterMode(display=False) as fc:
        step()
    return {str(k).replace(".", "::", 1): v for k, v in fc.get_flop_counts().get("Global", {}).items()}


def cases(models) -> tuple[list[tuple[str, bool]], list[str]]:
    """(name, train) for each model of a round's ``MODELS`` (train too where it is trainable), and their ids."""
    found = [(name, train) for name, (_, trainable) in models.items() for train in (False, True)[: 1 + trainable]]
    return found, [f"{n}-{'train' if t else 'fwd'}" for n, t in found]


class Profiles:
    """``profiled(name, train)``: (profile, our counts of one more step, torch's counts of that step), computed
    once per case. The counted steps run as the profile runs them: after warm-up (gradients already allocated),
    with the attention fast path off, each drawing the random numbers the profile's steps drew and starting from the
    state the warm-up left."""

    def __init__(self, models, *, without_torch=()) -> None:
        self.models = models
        self.without_torch = set(without_torch)  # models torch's counter breaks (torch's counts: None)
        self._cache: dict[tuple[str, bool], tuple] = {}

    def __call__(self, name: str, train: bool) -> tuple:
        if (name, train) not in self._cache:
            model, inputs = self.models[name][0]()
            p = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu", train=train,
                                      name=name)
            # the random state is back where the profile started: every step draws what the profile's steps drew
            step = same_draws(profile._without_fastpath(profile.make_step(model, inputs, train=train)), model)
            step()  # the profile's warm-up: it puts the model back as it was (no gradients), so warm it again
            step = same_state(step, model, inputs)  # and each step from the state the warm-up left, as the profile's
            try:
                theirs = None if name in self.without_torch else torch_by_op(step)
            except (RuntimeError, TypeError):  # torch's counter cannot follow autograd.grad inside forward (its
                theirs = None  # module hooks) nor a jagged nested tensor (it defers every op to the subclass)
            self._cache[name, train] = (p, profile.count_ops(step), theirs)
        return self._cache[name, train]


def assert_rows_add_up(p, counts) -> None:
    """The rows (and counted ops timed under no row of their own) carry every counted FLOP and byte."""
    counted_flops = math.fsum(c.flops for c in counts.values())
    counted_bytes = math.fsum(c.bytes_read + c.bytes_written for c in counts.values())
    rows_flops = math.fsum(o.m.flops * o.calls for o in p.ops)
    untimed_flops = math.fsum(u.flops for u in p.untimed)
    assert rows_flops + untimed_flops == pytest.approx(counted_flops, rel=REL, abs=1e-6)
    assert p.flops == pytest.approx(counted_flops, rel=REL, abs=1e-6)
    assert p.bytes == pytest.approx(counted_bytes, rel=REL, abs=1e-6)


def assert_as_torch_counts(counts, theirs, deviations=NOT_AS_TORCH) -> None:
    """Where torch has a formula for an op, the same number (but for the ``deviations``, checked by hand);
    ``theirs`` None where torch's counter could not count the step."""
    if theirs is None:
        return
    ours = by_op(counts)
    for op, n in theirs.items():
        if op not in deviations:
            assert ours.get(op, 0.0) == n, (op, ours.get(op), n)
    for op in (set(ours) & TORCH_COUNTED) - set(deviations):
        assert ours[op] == theirs.get(op, 0), op


def assert_rows_finite(p) -> None:
    """Finite, non-negative numbers in every row; a bound, a tip and a distance from the roof for every counted
    row with a compute peak for its dtype; 'unknown' for an op with no FLOP formula."""
    for o in p.ops:
        m = o.m
        for v in (m.flops, m.bytes_read, m.bytes_written, m.intensity, m.flops_per_s, m.bytes_per_s, m.latency_s):
            assert math.isfinite(v) and v >= 0, (o.label, v)
        assert o.tip, o.label
        if not o.flops_known:  # bytes alone would call it memory-bound: the bound is not claimed
            assert o.bound == "unknown" and o.roof_fraction is None and o.op in p.unsupported, o.label
        elif o.counted and m.flops > 0 and p.ceilings is not None and p.ceilings.peak(m.dtype) is not None:
            assert o.bound in ("memory", "compute"), (o.label, o.bound)
            assert o.roof_fraction is not None and math.isfinite(o.roof_fraction) and o.roof_fraction > 0, o.label


def rendered(p) -> str:
    """The profile as ``tilestack profile`` prints it (notes, hot spots, the table), checked to name the model
    and its uncounted ops, and to show no NaN."""
    out = io.StringIO()
    profile.print_profile(p, con=Console(file=out, width=1000))
    text = out.getvalue()
    assert p.name in text and "nan" not in text.lower().split()
    assert ("no FLOP formula for" in text) == bool(p.unsupported)
    return text


# fills of a tensor like another: they write their bytes (since profiler round 25; before, 0 as allocations), no
# arithmetic, in every round (a training step's backward seeds its gradient by ones_like)
FILLS = frozenset({"aten::zeros_like", "aten::ones_like", "aten::full_like"})


def silent_zeros(counts, data_movement) -> set[str]:
    """Ops that moved bytes, were counted 0 FLOPs without being reported uncounted, and are not named data
    movement (nor FILLS): work counted as free."""
    return {op for (op, _), c in counts.items() if c.flops == 0 and not c.unsupported
            and c.bytes_read + c.bytes_written > 0} - set(data_movement) - FILLS


def seeded(fn):
    """Decorator for a model builder of the perf rounds: the model and inputs it builds are the same on every
    call (torch seeded with 0 first); the builder keeps its name and docstring."""
    def build():
        torch.manual_seed(0)
        return fn()

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build
