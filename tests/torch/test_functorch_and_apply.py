"""The eager ops under torch.func's vmap (their batched tensors have no storage: the custom ops take them, through
torch's batching fallback), and the direct autograd entry (``_autograd.direct_apply``) giving the same gradients
as torch's Python ``Function.apply``."""

import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack.torch import _autograd, ops


def _close(a, b, tol=1e-5):
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_vmap_of_a_norm_is_the_norm_of_each_slice(op):
    x = torch.randn(3, 5, 40, dtype=torch.float64).float()
    w, b = torch.randn(40), torch.randn(40)
    if op == "layer_norm":
        ours = torch.vmap(lambda t: ops.layer_norm(t, w, b))(x)
        ref = F.layer_norm(x.double(), (40,), w.double(), b.double())
    else:
        ours = torch.vmap(lambda t: ops.rms_norm(t, w))(x)
        ref = F.rms_norm(x.double(), (40,), w.double(), eps=1e-6)
    _close(ours.double(), ref, 1e-4)


def test_vmap_of_attention_over_a_batch_of_heads():
    q, k, v = (torch.randn(4, 1, 2, 24, 16) for _ in range(3))     # vmapped over dim 0: (B, H, N, D) slices
    ours = torch.vmap(lambda a, b, c: tilestack.attention(a, b, c, causal=True))(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    _close(ours.double(), ref, 2e-3)


def test_direct_apply_gives_what_function_apply_gives():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale):
            ctx.save_for_backward(x)
            ctx.scale = scale
            return x * x * scale

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g * ctx.scale, None

    apply = _autograd.direct_apply(Square)
    x = torch.randn(7, requires_grad=True)
    y = apply(x, 3.0)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "SquareBackward"
    (gx,) = torch.autograd.grad(y.sum(), x)
    (ref,) = torch.autograd.grad(Square.apply(x, 3.0).sum(), x)
    _close(gx, ref)
    _close(gx, 6 * x.detach())


def test_direct_apply_refuses_a_function_with_setup_context():
    class WithSetup(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    with pytest.raises(TypeError, match="WithSetup defines setup_context"):
        _autograd.direct_apply(WithSetup)


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm", "swiglu"])
def test_the_eager_ops_gradients_through_the_direct_entry(op):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, dtype=torch.float32, requires_grad=True)
    r = torch.randn(2, 3, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    if op == "layer_norm":
        ours, ref = ops.layer_norm(x, w, b), F.layer_norm(x, (32,), w, b)
        leaves = (x, w, b)
    elif op == "add_rms_norm":
        ours, ref = ops.add_rms_norm(x, r, w)[0], F.rms_norm(x + r, (32,), w, eps=1e-6)
        leaves = (x, r, w)
    else:
        ours, ref = ops.swiglu(x), F.silu(x[..., :16]) * x[..., 16:]
        leaves = (x,)
    assert ours.grad_fn is not None
    g = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True):
        _close(a, b_, 1e-4)
