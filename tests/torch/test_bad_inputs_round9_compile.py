"""Round nine, part two: the norm ops under torch.compile with Inductor, on an input laid out columns first (a
transposed view, as ``F.rms_norm(x.t(), ...)`` or a (d, tokens) activation read token-major).

What it found (the tests failed before their fix): ``tilestack.rms_norm`` / ``layer_norm`` / ``add_rms_norm`` /
``add_layer_norm`` on ``x.t()`` compiled with Inductor (``torch.compile``, and ``tilestack.optimize`` through its
norm pass) failed at run time in Inductor's stride check ("expected size 64==64, stride 1==16 at dim=0"): the
ops' fake implementations said their results (y, h, and the backward's dx) are contiguous, while the kernels lay
them out like x's (rows, N) view (``torch.empty_like``). The fakes now make them as the kernels do
(``tilestack.torch.ops._like_rows``), forward and backward; so does ``tilestack::norm_fp8``'s (the fp8 chain's
norm) for its h. (Inductor's FX graph cache keys a graph without the
fakes, so the tests compile with that cache off: a graph compiled before a fake changed would be taken from it.)
"""

from __future__ import annotations

import pytest
import torch

import tilestack
from tilestack import config

F = torch.nn.functional


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


W, B = randn(16, seed=1), randn(16, seed=2)

# name -> (the op on a (16, 64) leaf read as (64, 16) columns first, torch's in float64)
CASES = {
    "rms_norm": (lambda x: tilestack.rms_norm(x.t(), W),
                 lambda x: F.rms_norm(x.t(), (16,), W.double(), 1e-6)),
    "layer_norm": (lambda x: tilestack.layer_norm(x.t(), W, B),
                   lambda x: F.layer_norm(x.t(), (16,), W.double(), B.double(), 1e-5)),
    "add_rms_norm": (lambda x: torch.cat(tilestack.add_rms_norm(x.t(), 2 * x.t(), W)),
                     lambda x: torch.cat((F.rms_norm(3 * x.t(), (16,), W.double(), 1e-6), 3 * x.t()))),
    "add_layer_norm": (lambda x: torch.cat(tilestack.add_layer_norm(x.t(), 2 * x.t(), W, B)),
                       lambda x: torch.cat((F.layer_norm(3 * x.t(), (16,), W.double(), B.double(), 1e-5),
                                            3 * x.t()))),
}


@pytest.fixture(autouse=True)
def fresh_graphs():
    torch._dynamo.reset()
    with config.override(backend="reference"), torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_norms_on_a_transposed_input_compile_with_inductor(case):
    """Forward and backward of each norm on x.t() under torch.compile (Inductor), against float64 torch."""
    ours, theirs = CASES[case]
    x = randn(16, 64)
    g = randn(*theirs(x.double()).shape, seed=3)
    leaf, ref = x.clone().requires_grad_(), x.double().requires_grad_()
    y = torch.compile(ours)(leaf)
    y.backward(g)
    want = theirs(ref)
    want.backward(g.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_norms_on_a_transposed_input_compile_for_inference(case):
    ours, theirs = CASES[case]
    x = randn(16, 64, seed=4)
    with torch.no_grad():
        y = torch.compile(ours)(x)
    torch.testing.assert_close(y.double(), theirs(x.double()), rtol=1e-5, atol=1e-5)


def test_the_norm_pass_swaps_a_transposed_rms_norm():
    """``tilestack.optimize``: F.rms_norm of a transposed activation, swapped for tilestack's op by the norm pass,
    answers as torch's (it failed in Inductor's stride check)."""
    def model(x):
        return F.rms_norm(x.t(), (16,), W, 1e-6)

    x = randn(16, 64, seed=5)
    got = tilestack.optimize(model, min_rows=1)(x)
    assert any(line.split()[:2] == ["swapped", "norm"] for line in str(tilestack.compile.last_report()).splitlines())
    torch.testing.assert_close(got.double(), F.rms_norm(x.double().t(), (16,), W.double(), 1e-6),
                               rtol=1e-5, atol=1e-5)


def test_the_fp8_norm_op_on_a_transposed_input_compiles():
    """``tilestack::norm_fp8`` (the fp8 chain pass's norm feeding a quantized linear layer): its fake made the
    residual stream h contiguous where the kernel lays it out like x's rows, the same stride failure."""
    import tilestack.compile  # noqa: F401  (registers tilestack::norm_fp8)

    def norm(x, r):
        y8, h = torch.ops.tilestack.norm_fp8(x.t(), r.t(), W, None, 1e-6, 0.5)
        return y8.float(), h

    x, r = randn(16, 64, seed=6), randn(16, 64, seed=7)
    want = norm(x, r)
    got = torch.compile(norm)(x, r)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[1].double(), (x + r).t().double())
