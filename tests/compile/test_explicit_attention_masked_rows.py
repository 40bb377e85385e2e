"""The compile backend's explicit-attention rewrite on rows whose every key is masked. With a finite fill
(``masked_fill(~keep, finfo.min)``, ``where(keep, s, finfo.min)``: Hugging Face's eager attention) softmax of
equal values is uniform, so the eager graph gives the mean of v there, with no gradient to q or k; the rewrite
gives the same, forward and backward (it gave 0 before). A -inf fill gives NaN in the eager graph and 0 after
the rewrite, as torch's SDPA does: that difference is kept and asserted here so it cannot change unnoticed."""

from __future__ import annotations

import pytest
import torch

import tilestack
import tilestack.compile as tc
from tilestack import config


def _explicit(form):
    def f(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)) * 0.25
        if form == "masked_fill":
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        elif form == "where":
            s = torch.where(keep, s, torch.finfo(s.dtype).min)
        else:
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v
    return f


def _inputs(requires_grad=False):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16, requires_grad=requires_grad) for _ in range(3))
    keep = torch.ones(1, 1, 24, 24, dtype=torch.bool).tril()
    keep[..., 5, :] = False                    # row 5 sees no key
    keep[..., 17, :] = False
    return q, k, v, keep


def _compiled(f, *args):
    torch._dynamo.reset()
    with config.override(backend="reference"), tc.policy.override(min_rows=0, min_query_rows=0):
        out = tilestack.optimize(f, inner="aot_eager")(*args)
    torch._dynamo.reset()
    assert tc.last_report().swapped == {"explicit_attention": 1}, str(tc.last_report())
    return out


@pytest.mark.parametrize("form", ("masked_fill", "where"))
def test_a_finite_fill_gives_the_graphs_rows_forward_and_backward(form):
    f = _explicit(form)
    q, k, v, keep = _inputs(requires_grad=True)
    want = f(q, k, v, keep)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    assert torch.allclose(want[:, :, 5], v.mean(-2))  # the eager graph's answer for a fully masked row
    got = _compiled(f, q, k, v, keep)
    got_grads = torch.autograd.grad(got, (q, k, v), torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_minus_inf_fill_gives_zero_where_the_graph_gives_nan():
    f = _explicit("-inf")
    q, k, v, keep = _inputs()
    want = f(q, k, v, keep)
    with torch.no_grad():
        got = _compiled(f, q, k, v, keep)
    assert torch.isnan(want[:, :, 5]).all() and (got[:, :, 5] == 0).all()
    rows = [r for r in range(24) if r not in (5, 17)]
    torch.testing.assert_close(got[:, :, rows], want[:, :, rows], rtol=1e-4, atol=1e-4)
