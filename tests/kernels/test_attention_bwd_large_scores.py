"""The attention backward at huge scores (q, k of magnitude 1e3 to 3e4, so q k^T ~ 1e6 to 1e9): the backward's
product rounds apart from the forward's, and without P <= 1 in the recompute dV passed its bound (0.5 off at 1e3)
and the gradients went to inf / NaN at 3e4 (torch's own f32 math path is inf there). Against float64 torch."""
import pytest
import torch
import torch.nn.functional as F

import tilestack


@pytest.mark.parametrize("causal", [False, True])
def test_backward_at_huge_scores_stays_bounded(causal):
    torch.manual_seed(0)
    for mag in (1e3, 3e4):
        q = (torch.randn(1, 2, 37, 32) * mag).requires_grad_()      # ragged: 37 is no multiple of the tile
        k = (torch.randn(1, 2, 37, 32) * mag).requires_grad_()
        v = torch.randn(1, 2, 37, 32).requires_grad_()
        o = tilestack.attention(q, k, v, causal=causal)
        g = torch.randn_like(o)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o64 = F.scaled_dot_product_attention(*ref, is_causal=causal)
        o64.backward(g.double())
        for grad in (dq, dk, dv):
            assert torch.isfinite(grad).all(), (mag, causal)
        assert torch.allclose(o.double(), o64, atol=1e-4)
        # dV = P^T dO with every P in [0, 1]: whatever the rounding, |dV| is bounded by the column sums of |dO|
        assert (dv.abs() <= g.abs().sum(dim=-2, keepdim=True) * 1.001 + 1e-6).all()
