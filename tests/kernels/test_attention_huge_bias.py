"""An additive attention mask with finite values past f32's range divided by log2(e) (about 2.36e38, where the
kernels' log2-domain scores overflowed to inf and a row's exponentials became inf - inf = NaN): the kernels now
give torch's answer, forward and backward, where one key of a row carries it (kernels.attention_fwd.add_bias)."""

import math

import pytest
import torch
from test_attention import BACKENDS, TOL, inputs, rel
from test_attention_sdpa import torch_math

from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import MAX_BIAS, attention_forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("huge", [3.0e38, 2.5e38, -3.0e38, float(torch.finfo(torch.float32).max)])
def test_a_huge_finite_bias_on_one_key_a_row_is_torchs_answer(backend, huge, rng):
    B, H, Nq, Nk = 1, 2, 11, 13
    q, k, v, do, scale = inputs(rng, (B, H, H, Nq, Nk, 16, None), torch.float32)
    bias = torch.randn(B, H, Nq, Nk, generator=torch.Generator().manual_seed(1))
    bias[..., torch.arange(Nq), torch.arange(Nq) % Nk] = huge        # one key a row
    o, lse = attention_forward(q, k, v, backend=backend, attn_mask=bias)
    grads = attention_backward(q, k, v, o, lse, do, backend=backend, attn_mask=bias)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = torch_math(*leaves, False, scale, attn_mask=bias)
    o64.backward(do.double())
    assert not o.isnan().any() and not any(g.isnan().any() for g in grads)
    assert rel(o, o64) <= TOL[torch.float32]
    assert rel(grads[2], leaves[2].grad) <= TOL[torch.float32]                 # dV: do routed to the huge keys
    # dQ and dK are 0 where a row's softmax is one-hot (a positive huge key): what f32 leaves of dP - delta there
    # (o is v's key to f32 rounding) is the error, so they are held to an absolute bound
    for g, t in zip(grads[:2], leaves[:2], strict=True):
        assert float((g.double() - t.grad).abs().max()) <= 1e-4 * max(1.0, float(t.grad.abs().max()))


def test_max_bias_in_the_log2_domain_leaves_room_for_the_scores():
    assert math.isfinite(MAX_BIAS * math.log2(math.e) * 2) and MAX_BIAS > 1e38
