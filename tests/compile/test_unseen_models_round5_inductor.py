"""Round 5's unseen models (unseen_blocks_round5.py) through Inductor, run with CI=1 as the project's CI runs it
(Inductor refuses an implicit fallback for an op with a decomposition there): ``torch.compile(model,
backend="tilestack", mode=...)`` with Inductor's modes on the CPU, dynamic=True, training; and a bf16 training graph
with a torch.no_grad() region inside forward (an EMA teacher) through aot_eager. The kernels through the reference
executor at tiny sizes (round 1's fixture)."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: autouse
from torch import nn
from unseen_blocks_round5 import OldStyleSelfAttention, PaddedCrossAttention, seeded

import tilestack.compile as tc

BF16 = torch.bfloat16


@pytest.fixture
def ci(monkeypatch):
    monkeypatch.setenv("CI", "1")


def _cross_args(dtype, b: int = 2, n: int = 10, m: int = 7):
    torch.manual_seed(1)
    pad = torch.zeros(b, m, dtype=torch.bool)
    pad[-1, -2:] = True
    return torch.randn(b, n, 32, dtype=dtype), torch.randn(b, m, 24, dtype=dtype), pad


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_torch_compile_with_inductors_modes(ci, mode):
    """torch.compile(backend="tilestack", mode=...) itself (not tilestack.optimize): the bool key padding mask's
    attention and the norm swapped, the bf16 GEMM epilogue fused, the outputs eager's."""
    model = seeded(PaddedCrossAttention, dtype=BF16)
    args = _cross_args(BF16)
    with torch.no_grad():
        got = torch.compile(model, backend="tilestack", mode=mode)(*args)
        _close(got, model(*args), BF16, mode)
    report = tc.last_report()
    _consistent(report)
    assert report.swapped.get("explicit_attention") == 1 and report.swapped.get("norm") == 1, str(report)


def test_dynamic_shapes_through_inductor(ci):
    model = seeded(OldStyleSelfAttention, form="div_tensor")
    compiled = torch.compile(model, backend="tilestack", dynamic=True)
    with torch.no_grad():
        for b, n in ((2, 10), (3, 7)):
            mask = torch.ones(b, n, dtype=torch.long)
            mask[-1, n - 2:] = 0
            x = torch.randn(b, n, 32)
            _close(compiled(x, mask), model(x, mask), torch.float32, f"batch {b}, sequence {n}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


def test_training_through_inductor(ci):
    eager, model = seeded(PaddedCrossAttention, train=True), seeded(PaddedCrossAttention, train=True)
    x, mem, pad = _cross_args(torch.float32)
    x.requires_grad_()
    want = eager(x, mem, pad)
    got = torch.compile(model, backend="tilestack")(x, mem, pad)
    _close(got, want, torch.float32, "output")
    gw = torch.autograd.grad(want.sum(), [x, *eager.parameters()])
    gg = torch.autograd.grad(got.sum(), [x, *model.parameters()])
    for i, (g, w) in enumerate(zip(gg, gw, strict=True)):
        _close(g, w, torch.float32, f"grad {i}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


class EMATeacher(nn.Module):
    """A student MLP trained against a teacher of the same shape run under torch.no_grad() inside forward."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.student = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.teacher = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x) + x
        return (self.student(x) - target).pow(2).mean(), target


def test_a_no_grad_region_inside_a_training_forward():
    """In bf16 the teacher's Linear + GELU and its residual add are fused GEMMs (no gradient needed there), the
    student's are not (they need one); the norms swapped in both; the loss and the student's gradients eager's."""
    model = seeded(EMATeacher, dtype=BF16, train=True)
    x = torch.randn(2, 10, 32, dtype=BF16, requires_grad=True)
    _, swaps = _run(model, x, dtype=BF16, grad_of=[x, *model.student.parameters()])
    assert swaps.get("norm") == 2 and swaps.get("linear_epilogue") == 2, swaps
    declined = [why for p, _, why in tc.last_report().declined if p == "linear_epilogue"]
    assert any("needs gradients" in why for why in declined), declined
