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


def test_checked_once_runs_a_check_once_per_signature_and_never_remembers_a_failure():
    runs = []

    @_plan.checked_once
    def check(fn, x, eps):
        runs.append(fn)
        if eps < 0:
            raise LaunchError(f"{fn}: eps must be >= 0, got {eps}")

    x = torch.ones(3, 4)
    for _ in range(3):
        check("f", x, 1e-5)
    assert runs == ["f"]
    for _ in range(2):                              # a failing signature is checked (and refused) every time
        with pytest.raises(LaunchError, match="eps"):
            check("f", x, -1.0)
    assert len(runs) == 3
    check("f", x.t(), 1e-5)                         # another layout: checked again
    x.requires_grad_()
    check("f", x, 1e-5)                             # requires_grad is part of the signature (out= checks read it)
    assert len(runs) == 5


@pytest.mark.parametrize("name", ["norm_forward", "rotary", "swiglu", "swiglu_backward"])
def test_the_norm_rotary_and_swiglu_functions_plan_once_per_signature(name):
    """The functions a training step calls for every layer: their config lookup, checks and launcher are made
    on the first call of a signature only (what the host cost of a step at small sizes depends on)."""
    import importlib

    rmsnorm, rotary, swiglu = (importlib.import_module(f"tilestack.kernels.{m}") for m in ("rmsnorm", "rotary",
                                                                                          "swiglu"))

    with config.override(backend="reference"):
        if name == "norm_forward":
            x, r, w, b = (torch.randn(8, 32), torch.randn(8, 32), torch.ones(32), torch.zeros(32))
            planned, call = rmsnorm._planned_forward, lambda: rmsnorm.add_layer_norm(x, r, w, b)
            want = torch.nn.functional.layer_norm(x + r, (32,), w, b)
        elif name == "rotary":
            q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
            cos, sin = rotary.rotary_tables(8, 16)
            planned, call = rotary.rotary, lambda: rotary.rotary(q, k, cos, sin)
            want = rotary.reference(q, cos, sin)
        else:
            a, b, dy = torch.randn(8, 40), torch.randn(8, 40), torch.randn(8, 40)
            planned = getattr(swiglu, name)
            call = (lambda: swiglu.swiglu(a, b)) if name == "swiglu" else (lambda: swiglu.swiglu_backward(dy, a, b))
            want = swiglu.reference(a, b) if name == "swiglu" else None
        planned.plans.clear()
        outs = [call() for _ in range(3)]
        outs = [o if isinstance(o, tuple) else (o,) for o in outs]
        assert len(planned.plans) == 1
        if want is not None:
            torch.testing.assert_close(outs[-1][0], want, atol=1e-5, rtol=1e-5)
            assert outs[0][0].data_ptr() != outs[1][0].data_ptr()              # fresh outputs per call
