"""The set-up every held-out profiler round shares, once: the cases of a round's ``MODELS``, their profiles computed
once, the check every round makes of every row, the counts of one step of a model, one row of those counts, and a
profile on the CPU under the synthetic ceilings. Rounds 4-15 import it (rounds 4-13 keep their own every-row checks,
which differ round by round; round 14 uses check_every_row as it was, without the step-time check).

    import perf_models_round15 as pm
    from _profile_helpers import setup_round, check_every_row, step_counts
    CASES, IDS, profiled = setup_round(pm.MODELS)
    p, counts, theirs = profiled("mlstm", True)
    check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import pytest
from profile_support import (
    CEIL,
    NOT_AS_TORCH,
    Profiles,
    assert_as_torch_counts,
    assert_rows_add_up,
    assert_rows_finite,
    cases,
    rendered,
    silent_zeros,
)

from tilestack.perf import profile

RIDGE = CEIL.matmul["fp32"] / CEIL.copy_bytes_per_s  # 10 FLOP/B under the synthetic ceilings, every dtype alike
FILTERS = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def setup_round(models: Mapping[str, tuple[Callable[[], Any], bool]], *, without_torch: Collection[str] = ()
                ) -> tuple[list[tuple[str, bool]], list[str], Profiles]:
    """(cases, their ids, ``profiled``) for a round's ``MODELS``: ``profiled(name, train)`` gives (profile, our counts
    of one more step, torch's counts of it), each computed once."""
    found, ids = cases(models)
    return found, ids, Profiles(models, without_torch=without_torch)


def check_every_row(p: Any, counts: Any, theirs: Any, *, data_movement: Collection[str],
                    unsupported: tuple[str, ...] = (), step_time_adds_up: bool = True) -> str:
    """What every round checks of every profile: rows (and untimed ops) add up to the counted step; only the ops in
    ``unsupported`` are uncounted, and no other op that moved bytes is counted free unless it is named data
    movement; torch's formulas agreed with (but NOT_AS_TORCH); every number finite; each counted row's intensity its
    FLOPs over its bytes and its bound the side of the ridge it is on; the shares add up to 1; with
    ``step_time_adds_up`` (round 14 did not check it: False keeps that round as it was) the step's time is its rows'
    times; the table renders (its text returned)."""
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0 and p.bytes > 0
    assert p.unsupported == unsupported, p.unsupported
    assert not silent_zeros(counts, data_movement), silent_zeros(counts, data_movement)
    assert_as_torch_counts(counts, theirs, NOT_AS_TORCH)
    assert_rows_finite(p)
    for o in p.ops:
        m = o.m
        if m.bytes > 0:
            assert m.intensity == pytest.approx(m.flops / m.bytes, rel=1e-12), o.label
        if o.counted and o.flops_known and m.flops > 0:
            assert o.bound == ("memory" if m.flops / m.bytes < RIDGE else "compute"), (o.label, m.intensity)
    assert math.fsum(o.share for o in p.ops) == pytest.approx(1.0, abs=1e-9)
    if step_time_adds_up:
        assert p.step_s == pytest.approx(math.fsum(o.total_s for o in p.ops), rel=1e-9)
    return rendered(p)


def step_counts(model: Any, inputs: Any, *, train: bool = False, warm: bool = False) -> dict:
    """The counting pass's counts of one step of ``model`` (after one uncounted step with ``warm``: gradients then
    exist and are added into, as in a profile's counted step); the model left as it was."""
    with profile.preserved(model, inputs):
        step = profile.make_step(model, inputs, train=train)
        if warm:
            step()
        return profile.count_ops(step)


def one_row(counts: Any, op: str, shapes: Any = None) -> Any:
    """The one count of ``op`` (at ``shapes`` where given); fails naming what was found where there is not one."""
    found = [c for (name, sh), c in counts.items() if name == op and (shapes is None or sh == shapes)]
    assert len(found) == 1, (op, shapes, found)
    return found[0]


def profile_cpu(model: Any, inputs: Any, **kwargs: Any) -> Any:
    """``profile.profile_model`` on the CPU under the synthetic ceilings, one warm-up and one profiled step."""
    return profile.profile_model(model, inputs, **{"steps": 1, "warmup": 1, "ceilings": CEIL, "device": "cpu",
                                                   **kwargs})
