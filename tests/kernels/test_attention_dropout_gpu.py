"""On a GPU: the compiled kernels' dropout mask is the NumPy Philox's bit for bit, gradients against float64 with
that mask, and fp32 through the tf32 tensor cores within the documented bound (the CPU tests round operands to
nearest even; the hardware's own rounding is checked here)."""

import pytest
import torch

import tilestack
from tilestack.kernels.attention_fwd import attention_forward, dropout_mask, dropout_rng, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


def test_compiled_mask_is_dropout_mask():
    """v = I: o's zeros are the dropped entries of P, compared with the host's regeneration."""
    B, H, N, D = 2, 3, 160, 128
    q, k = (0.1 * torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.eye(N, D, device="cuda", dtype=torch.bfloat16).expand(B, H, N, D).contiguous()
    rng = dropout_rng()
    o, _ = attention_forward(q, k, v, dropout_p=0.2, rng=rng)
    assert torch.equal((o != 0).cpu(), dropout_mask(rng, 0.2, (B, H, N, N))[..., :D])


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_dropout_gradients_against_float64(causal):
    q, k, v, do = (torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    o = tilestack.attention(*leaves, causal=causal, dropout_p=0.1)
    grads = torch.autograd.grad(o, leaves, do)
    torch.manual_seed(5)
    keep = dropout_mask(dropout_rng(), 0.1, (2, 4, 200, 200))
    l64 = [t.cpu().double().requires_grad_() for t in (q, k, v)]
    o64, _ = reference(*l64, causal, dropout_p=0.1, dropout_keep=keep)
    o64.backward(do.cpu().double())
    assert rel(o, o64) < 1e-2
    for g, t in zip(grads, l64, strict=True):
        assert rel(g, t.grad) < 2.5e-2


def test_fp32_through_tf32_within_the_bound():
    q, k, v = (torch.randn(2, 4, 257, 64, device="cuda") for _ in range(3))
    o64, _ = reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), True)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = rel(tilestack.attention(q, k, v, causal=True), o64)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = rel(tilestack.attention(q, k, v, causal=True), o64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert ieee < 1e-5 and 10 * ieee < tf32 < 4e-3, (ieee, tf32)   # H200: the largest of o and grads 1.9e-3
