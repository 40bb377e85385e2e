"""The eager norms of tilestack.torch.ops take autograd exactly when a gradient is asked for: under no_grad a
bias or residual that requires grad takes the plain path (no autograd.Function), with grad enabled any
differentiable input takes autograd and gets its gradient; both paths give the same values, for contiguous and
strided inputs of any rank, on the reference backend."""

import pytest
import torch

from tilestack import config
from tilestack.torch import ops

NORMS = {
    "layer_norm": lambda x, r, w, b: ops.layer_norm(x, w, b),
    "add_layer_norm": lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
    "rms_norm": lambda x, r, w, b: ops.rms_norm(x, w),
    "add_rms_norm": lambda x, r, w, b: ops.add_rms_norm(x, r, w),
}


def _inputs(shape, strided: bool, grad: str):
    """x, r, w, b with only the one named by ``grad`` requiring grad; strided: x and r are transposed views."""
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    if strided:
        x = torch.randn(*shape[:-2], n, shape[-2], generator=g).transpose(-1, -2)
        r = torch.randn(*shape[:-2], n, shape[-2], generator=g).transpose(-1, -2)
    else:
        x, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    named = dict(x=x, r=r, w=w, b=b)
    named[grad].requires_grad_()
    return named


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("grad", ["x", "r", "w", "b"])
@pytest.mark.parametrize("shape,strided", [((2, 3, 16), False), ((3, 16), True), ((2, 5, 8), True)])
def test_autograd_only_when_asked(name, grad, shape, strided, monkeypatch):
    uses_r, uses_b = name.startswith("add_"), "layer" in name
    if (grad == "r" and not uses_r) or (grad == "b" and not uses_b):
        pytest.skip("the op does not take this input")
    t = _inputs(shape, strided, grad)
    op = NORMS[name]
    with config.override(backend="reference"):
        with torch.enable_grad():
            outs = _outputs(op(t["x"], t["r"], t["w"], t["b"]))
        assert outs[0].grad_fn is not None       # the input that requires grad gets a graph
        sum(o.float().sum() for o in outs).backward()
        assert t[grad].grad is not None and bool(t[grad].grad.isfinite().all())

        def refuse(*args, **kwargs):
            raise AssertionError("autograd.Function.apply under no_grad")

        monkeypatch.setattr(ops._Norm, "apply", refuse)
        with torch.no_grad():
            plain = _outputs(op(t["x"], t["r"], t["w"], t["b"]))
    assert len(plain) == len(outs)
    for p, o in zip(plain, outs, strict=True):
        assert not p.requires_grad and p.shape == o.shape == t["x"].shape
        torch.testing.assert_close(p, o.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(NORMS))
def test_no_grad_statistics_go_to_the_plans_sink(name, backend):
    """Under no_grad a norm allocates only its outputs: the mean and 1/std go to one (M,) f32 tensor per plan that
    no output shares; two calls give two fresh outputs, each what the autograd path gives."""
    t = _inputs((2, 3, 16), False, "w")
    op = NORMS[name]
    with config.override(backend=backend):
        with torch.enable_grad():
            want = [o.detach() for o in _outputs(op(t["x"], t["r"], t["w"], t["b"]))]
        with torch.no_grad():     # the plan of this signature (grad mode is part of its key), its sink poisoned
            plan = ops._norm_plan(name, t["x"], t["r"] if name.startswith("add_") else None, t["w"],
                                  t["b"] if "layer" in name else None, 1e-5 if "layer" in name else 1e-6)
            sink = plan._sink.fill_(float("nan"))
            first = _outputs(op(t["x"], t["r"], t["w"], t["b"]))
            second = _outputs(op(t["x"], t["r"], t["w"], t["b"]))
    assert sink.shape == (6,) and sink.dtype == torch.float32
    outs = [*first, *second]
    assert len({o.data_ptr() for o in outs} | {sink.data_ptr()}) == len(outs) + 1
    for a, b, w in zip(first, second, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
        torch.testing.assert_close(b, w, rtol=0, atol=0)
    assert bool(sink.isfinite().all())           # the calls wrote their statistics there (1/std last)


def test_plan_keeps_eps():
    """The plan holds eps (the key includes it): two eps on one signature give two plans and two results."""
    x, w, b = torch.randn(4, 8) * 1e-3, torch.ones(8), torch.zeros(8)
    with config.override(backend="reference"), torch.no_grad():
        small, large = ops.layer_norm(x, w, b, eps=1e-12), ops.layer_norm(x, w, b, eps=1.0)
    torch.testing.assert_close(small, torch.nn.functional.layer_norm(x, (8,), w, b, eps=1e-12), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(large, torch.nn.functional.layer_norm(x, (8,), w, b, eps=1.0), rtol=1e-4, atol=1e-4)


def _swiglu64(x):
    a, b = x.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(a) * b


@pytest.mark.parametrize("shape", [(2, 3, 16), (5, 8), (8,)])
def test_swiglu_plan_gradient_layouts(shape):
    """One SwiGLU signature, backward with a contiguous and then a strided upstream gradient (two backward plans
    of one forward plan): both gradients match float64 torch; no_grad gives the forward's values."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).requires_grad_()
    want = _swiglu64(x.detach())
    with config.override(backend="reference"):
        for strided in (False, True, False):
            dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
            if strided and dy.dim() >= 2:
                dy = torch.randn(*dy.shape[:-2], dy.shape[-1], dy.shape[-2], generator=g).transpose(-1, -2)
            x.grad = None
            y = ops.swiglu(x)
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
            y.backward(dy)
            x64 = x.detach().double().requires_grad_()
            _swiglu64(x64).backward(dy.double())
            assert x.grad.shape == x.shape and x.grad.is_contiguous()
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            plain = ops.swiglu(x)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, y.detach(), rtol=0, atol=0)
