"""The tilestack torch.compile backend on unseen models, round 1 (continued): patterns that an in-place write
changes (declined: FX keeps the written tensor's node as what later nodes read, so the graph looks like the
pattern but does not run it), and fp8-act layers after the norms taken without affine parameters. Helpers and
the reference-backend fixture from test_unseen_models_round1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _consistent, _fresh, _run  # noqa: F401 - _fresh: the autouse fixture
from torch import nn

import tilestack
import tilestack.compile as tc


def _written_masked_fill_(q, k, v, future):
    s = (q @ k.transpose(-2, -1)) * 0.25
    s.masked_fill_(future, float("-inf"))              # in place, its result unused: softmax reads s
    return torch.softmax(s, -1) @ v


def _written_add_(q, k, v, future):
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
    s.add_(torch.zeros(future.shape, dtype=s.dtype).masked_fill(future, float("-inf")))
    return torch.softmax(s, -1) @ v


def _written_setitem(q, k, v, future):
    s = (q @ k.transpose(-2, -1)) * 0.25
    s[..., 0] = -1e4                                   # the first key hidden from every query
    return torch.softmax(s, -1) @ v


def _written_view(q, k, v, future):
    s = (q @ k.transpose(-2, -1)) * 0.25
    s.view(-1)[::3] = 0.0                              # through a view
    return torch.softmax(s, -1) @ v


def _written_dunder(q, k, v, future):
    s = (q @ k.transpose(-2, -1)) * 0.25
    s.__iadd__(torch.zeros(future.shape, dtype=s.dtype).masked_fill(future, float("-inf")))
    return torch.softmax(s, -1) @ v


def _written_inplace_kwarg(q, k, v, future):
    s = (q @ k.transpose(-2, -1)) * 0.25
    F.relu(s, inplace=True)                            # the scores clamped at 0 in place
    return torch.softmax(s, -1) @ v


def _written_norm_input(x, r, w, b):
    h = x + r
    h.clamp_(min=0.0)                                  # the residual sum written in place before the norm
    return F.layer_norm(h, (x.shape[-1],), w, b), h


@pytest.mark.parametrize("fn", [_written_add_, _written_setitem, _written_view, _written_dunder,
                                _written_inplace_kwarg], ids=lambda f: f.__name__[len("_written_"):])
def test_scores_written_in_place_are_not_taken_for_plain_attention(fn):
    """An in-place write to the scores between the product and the softmax: FX keeps the scores' node as what the
    softmax reads, so softmax(q @ k^T) @ v is what the graph looks like, not what runs. The rewrite is declined
    (it was made, and gave the unmasked attention)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    _, swaps = _run(fn, q, k, v, future)
    assert "explicit_attention" not in swaps, swaps
    declined = [why for p, _, why in tc.last_report().declined if p == "explicit_attention"]
    assert declined and "in place" in declined[0], str(tc.last_report())


def test_scores_filled_in_place_are_the_masked_attention():
    """``s.masked_fill_(future, -inf)`` then softmax(s): since round 11 the write is read as the attention's mask
    (it was declined as a write between the pattern's nodes); eager's outputs, which the unmasked attention is not."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    got, swaps = _run(_written_masked_fill_, q, k, v, future)
    assert swaps == {"explicit_attention": 1}, swaps
    assert float((got - torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v).abs().max()) > 1e-2


def test_scores_added_in_place_while_a_view_of_them_is_read():
    """scores += bias where a view of the scores, taken before, is returned too: the view sees the add, so the
    iadd is left as it is (the rewrite would replace it) and the view is eager's."""
    def f(q, k, v, bias):
        scores = q @ k.transpose(-1, -2)
        first_row = scores[..., 0, :]
        scores += bias
        return torch.softmax(scores, -1) @ v, first_row

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    _, swaps = _run(f, q, k, v, torch.randn(9, 9))
    assert "explicit_attention" not in swaps, swaps


def test_norm_input_written_in_place_is_not_fused_with_the_add():
    torch.manual_seed(0)
    x, r, w, b = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(16)
    _, swaps = _run(_written_norm_input, x, r, w, b)
    assert "add_norm" not in swaps, swaps


@pytest.mark.parametrize("norm", ["layer_no_affine", "layer_no_bias", "rms_written_out"])
def test_fp8_act_layers_after_norms_without_affine_parameters(norm):
    """tilestack.quantize(..., "fp8-act") layers after a norm the norm pass now takes without a weight or a bias:
    the fp8 chain is not fused with that norm (its producer takes a weight, and a bias for a layer norm: a layer
    norm without one would have run as an RMS norm), and the output is the quantized model's."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = {"layer_no_affine": nn.LayerNorm(32, elementwise_affine=False),
                       "layer_no_bias": nn.LayerNorm(32, bias=False)}.get(norm)
            self.fc, self.proj = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            h = self.ln(x) if self.ln is not None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x + self.proj(F.gelu(self.fc(h)))

    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    qmodel = tilestack.quantize(model, "fp8-act", calibration=[x])
    with torch.no_grad():
        want = qmodel(x)
        got = tilestack.optimize(qmodel, check=True, inner="aot_eager")(x)
    report = tc.last_report()
    _consistent(report)
    assert report.swapped.get("norm") == 1, str(report)
    assert not any(s.pattern == "fp8_chain" and s.what.startswith(("layer_norm", "rms_norm", "add + "))
                   for s in report.swaps), str(report)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 2e-2, err
