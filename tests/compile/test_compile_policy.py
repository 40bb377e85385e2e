"""The backend's rule of when a swap pays (tilestack.compile.policy), on the CPU: by the static shapes of the FX
graph, row-wise ops with few rows and attention with few query rows per head (a decode step) stay with the
inner compiler, with the reason in the report; enough rows, or symbolic sizes, are swapped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
import tilestack.compile as tc
from tilestack import config
from tilestack.bench.models import GPT, GPT2_TINY
from tilestack.compile import policy
from tilestack.errors import LaunchError


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    with config.override(backend="reference"):
        yield
    torch._dynamo.reset()


def _norm(x, w, b):
    return F.layer_norm(x, (16,), w, b)                 # x (..., 16)


def _declined(report) -> str:
    return "\n".join(why for _, _, why in report.declined)


@pytest.mark.parametrize("rows,swapped", [(policy.MIN_ROWS - 1, False), (policy.MIN_ROWS, True)])
def test_norm_swapped_from_min_rows(rows, swapped):
    x, w, b = torch.randn(rows, 16), torch.randn(16), torch.randn(16)
    got = tilestack.optimize(_norm, inner="aot_eager")(x, w, b)
    report = tc.last_report()
    assert report.swapped == ({"norm": 1} if swapped else {}), str(report)
    if not swapped:
        assert f"{rows} rows < min_rows={policy.MIN_ROWS}" in _declined(report), str(report)
        assert "does not pay" in report.left_why["layer_norm"], str(report)
    torch.testing.assert_close(got, _norm(x, w, b), rtol=1e-4, atol=1e-4)


def test_rows_are_the_leading_dims_product():
    x, w, b = torch.randn(4, 300, 16), torch.randn(16), torch.randn(16)      # 1200 rows, no dim over 1024
    tilestack.optimize(_norm, inner="aot_eager")(x, w, b)
    assert tc.last_report().swapped == {"norm": 1}, str(tc.last_report())


@pytest.mark.parametrize("n_query,swapped", [(1, False), (policy.MIN_QUERY_ROWS, True)])
def test_attention_with_one_query_row_per_head_stays(n_query, swapped):
    """A decode step: q (B, H, 1, D) against a cache of 80 keys; prefill-shaped q is swapped."""
    q = torch.randn(2, 2, n_query, 16)
    k, v = torch.randn(2, 2, 80, 16), torch.randn(2, 2, 80, 16)
    got = tilestack.optimize(F.scaled_dot_product_attention, inner="aot_eager")(q, k, v)
    report = tc.last_report()
    assert report.swapped == ({"sdpa": 1} if swapped else {}), str(report)
    if not swapped:
        assert "1 query row(s) per head < min_query_rows=64" in _declined(report), str(report)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-4)


def test_thresholds_per_compile_and_scoped():
    x, w, b = torch.randn(8, 16), torch.randn(16), torch.randn(16)
    tilestack.optimize(_norm, inner="aot_eager", min_rows=8)(x, w, b)
    assert tc.last_report().swapped == {"norm": 1}
    torch._dynamo.reset()
    tilestack.optimize(_norm, inner="aot_eager", min_rows=9)(x, w, b)
    assert tc.last_report().swapped == {}
    torch._dynamo.reset()
    with policy.override(min_rows=4):
        tilestack.optimize(_norm, inner="aot_eager")(x, w, b)
    assert tc.last_report().swapped == {"norm": 1}
    assert policy.current().min_rows == policy.MIN_ROWS
    with pytest.raises(LaunchError, match="min_rows=-1"):
        tilestack.optimize(_norm, inner="aot_eager", min_rows=-1)


def test_symbolic_rows_are_swapped():
    w, b = torch.randn(16), torch.randn(16)
    f = tilestack.optimize(_norm, inner="aot_eager", dynamic=True)
    f(torch.randn(5, 16), w, b)
    assert tc.last_report().swapped == {"norm": 1}, str(tc.last_report())


class Decoder(nn.Module):
    """A GPT-2-shaped decode step: batch 4, one new token attending to a cache of 80 positions."""

    def __init__(self):
        super().__init__()
        self.gpt = GPT(GPT2_TINY, impl="torch").to(torch.bfloat16).eval()
        cfg = self.gpt.cfg
        self.register_buffer("k", torch.randn(4, cfg.n_head, 80, cfg.d // cfg.n_head, dtype=torch.bfloat16))
        self.register_buffer("v", torch.randn(4, cfg.n_head, 80, cfg.d // cfg.n_head, dtype=torch.bfloat16))

    def forward(self, h):                                               # h (4, 1, d)
        block, d, H = self.gpt.h[0], self.gpt.cfg.d, self.gpt.cfg.n_head
        q = block.attn.c_attn(block.ln_1(h)).split(d, dim=2)[0].view(4, 1, H, d // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, self.k, self.v)           # (4, H, 1, hd)
        h = h + block.attn.c_proj(y.transpose(1, 2).reshape(4, 1, d))
        return h + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(h)), approximate="tanh"))


def test_decode_step_left_to_the_inner_compiler():
    model = Decoder()
    h = torch.randn(4, 1, GPT2_TINY.d, dtype=torch.bfloat16)
    with torch.no_grad():
        got = tilestack.optimize(model, inner="aot_eager", fullgraph=True)(h)
        want = model(h)
    report = tc.last_report()
    assert report.swapped == {}, str(report)
    text = str(report)
    assert "query row(s) per head" in text and "4 rows < min_rows" in text, text
    for pattern in ("sdpa", "add_norm", "norm", "linear_epilogue"):
        assert any(p == pattern and "does not pay" in why for p, _, why in report.declined), (pattern, text)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    torch._dynamo.reset()
    with policy.override(min_rows=0, min_query_rows=0), torch.no_grad():    # the same graph, every swap made
        tilestack.optimize(model, inner="aot_eager", fullgraph=True)(h)
    assert set(tc.last_report().swapped) == {"sdpa", "add_norm", "norm", "linear_epilogue"}, str(tc.last_report())
