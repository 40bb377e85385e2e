"""kernels._plan: a library function checks and chooses once per launch signature, then only runs."""

import pytest
import torch

from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import _plan, gemm, softmax


def test_a_repeated_call_skips_the_plan_and_a_new_signature_plans_again():
    planned_calls = []

    @_plan.planned
    def double(x, *, scale=2.0):
        planned_calls.append(tuple(x.shape))        # stands for every check and choice
        return lambda x, *, scale=2.0: x * scale

    a = torch.ones(3, 4)
    for _ in range(3):
        assert torch.equal(double(a), a * 2)
    assert planned_calls == [(3, 4)]
    double(torch.ones(5, 4))                        # another shape: another plan
    double(a, scale=3.0)                            # another option value: another plan
    double(a.t())                                   # another layout: another plan
    assert len(planned_calls) == 4
    with config.override(backend="reference"):      # the backend knob is part of the key
        double(a)
    assert len(planned_calls) == 5


def test_unhashable_arguments_plan_every_call():
    seen = []

    @_plan.planned
    def f(x, opts):
        seen.append(1)
        return lambda x, opts: x + len(opts)

    x = torch.zeros(2)
    f(x, [1, 2])
    f(x, [1, 2])
    assert len(seen) == 2


def test_library_functions_plan_once_and_still_check_per_call_what_depends_on_data():
    a = torch.randn(40, 24, dtype=torch.bfloat16)
    b = torch.randn(24, 8, dtype=torch.bfloat16)
    with config.override(backend="reference"):
        gemm.plans.clear()
        c1, c2 = gemm(a, b), gemm(a, b)
        assert len(gemm.plans) == 1 and c1.data_ptr() != c2.data_ptr()     # fresh output per call
        out = torch.empty(40, 8, dtype=torch.bfloat16)
        gemm(a, b, out=out)
        n_plans = len(gemm.plans)
        # the same signature (shapes, strides, alignment) but out overlaps a's memory: refused on this call
        buf = torch.empty(40 * 24 + 400, dtype=torch.bfloat16)
        a2, out2 = buf[:960].view(40, 24).copy_(a), buf[96:96 + 320].view(40, 8)
        with pytest.raises(LaunchError, match="out"):
            gemm(a2, b, out=out2)
        assert len(gemm.plans) == n_plans
        x = torch.randn(6, 10)
        softmax.plans.clear()
        for _ in range(3):
            torch.testing.assert_close(softmax(x), torch.softmax(x, -1))
        assert len(softmax.plans) == 1
