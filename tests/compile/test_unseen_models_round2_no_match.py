"""The tilestack torch.compile backend on unseen models, round 2 (continued): forms that look like a pattern and
are not one (softmax over another dim, a mask after the softmax, the scale after the mask, a boolean tensor added
to the scores, norms over other dims, a learned temperature), which must be left as they are with the outputs
eager's; and models that mix f32 and bf16 under autocast, where the replaced ops run in autocast's dtypes and
tilestack's kernels in their inputs'. Helpers and the reference-backend fixture from test_unseen_models_round1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: the autouse fixture
from torch import nn
from unseen_blocks_round2 import HFLlamaModel, seeded

import tilestack
import tilestack.compile as tc


def _scores(q, k):
    return (q @ k.transpose(-2, -1)) * 0.25


def _softmax_over_queries(q, k, v):
    return torch.softmax(_scores(q, k), dim=-2) @ v                     # over the queries: not attention


def _mask_after_softmax(q, k, v, keep):
    p = torch.softmax(_scores(q, k), dim=-1)
    return (p * keep) @ v, p.masked_fill(~keep.bool(), 0.0) @ v       # renormalised nowhere: not attention


def _scale_after_mask(q, k, v, bias):
    return torch.softmax((q @ k.transpose(-2, -1) + bias) * 0.25, dim=-1) @ v     # the bias scaled too


def _bool_added(q, k, v, keep):
    """A boolean added to the scores adds 1 where True: the rewrite took it for a mask of the keys to attend
    (silently wrong by 2.0)."""
    return torch.softmax(_scores(q, k) + keep, dim=-1) @ v


def _where_the_other_way(q, k, v, keep):
    return torch.softmax(torch.where(~keep, float("-inf"), _scores(q, k)), dim=-1) @ v    # -inf first


def _fill_that_is_not_the_lowest(q, k, v, keep):
    return torch.softmax(_scores(q, k).masked_fill(~keep, -1e4), dim=-1) @ v


def _value_then_probabilities(q, k, v):
    return v.transpose(-2, -1) @ torch.softmax(_scores(q, k), dim=-1)        # (D, N) @ (N, N): p on the right


NOT_ATTENTION = {
    "softmax_over_queries": (_softmax_over_queries, ()),
    "mask_after_softmax": (_mask_after_softmax, ("keep_float",)),
    "scale_after_mask": (_scale_after_mask, ("bias",)),
    "bool_added": (_bool_added, ("keep",)),
    "where_the_other_way": (_where_the_other_way, ("keep",)),
    "fill_that_is_not_the_lowest": (_fill_that_is_not_the_lowest, ("keep",)),
    "value_then_probabilities": (_value_then_probabilities, ()),
}


@pytest.mark.parametrize("form", NOT_ATTENTION)
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_forms_that_are_not_attention_are_not_swapped_as_attention(form, check):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    keep = torch.rand(9, 9) > 0.4
    keep[:, 0] = True
    extra = {"keep": keep, "keep_float": keep.float(), "bias": torch.randn(9, 9)}
    fn, names = NOT_ATTENTION[form]
    _, swaps = _run(fn, q, k, v, *(extra[n] for n in names), check=check)
    assert "explicit_attention" not in swaps and "sdpa" not in swaps, swaps
    if form == "bool_added":
        declined = [why for p, _, why in tc.last_report().declined if p == "explicit_attention"]
        assert declined and "boolean tensor added" in declined[0], str(tc.last_report())


class LearnedTemperature(nn.Module):
    """CLIP-style: the scores times exp(a learned logit scale), a tensor the graph computes, not a constant."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(2.0)))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.logit_scale.exp(), dim=-1) @ v


def test_a_learned_temperature_is_not_a_constant_scale():
    model = seeded(LearnedTemperature, train=True)
    q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
    _, swaps = _run(model, q, k, v, grad_of=[q, k, v, model.logit_scale])
    assert "explicit_attention" not in swaps, swaps


def _norms_over_other_dims(x, w):
    a = F.layer_norm(x, x.shape[-2:])                                                  # the last two dims
    b = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)                          # RMS over dim 1
    c = F.group_norm(x, 2)
    d = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w[:, None]           # weight along dim 1
    e = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)     # LayerNorm by hand
    return a, b, c, d, e


def test_norms_over_other_dims_are_left():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8), torch.randn(4)
    _, swaps = _run(_norms_over_other_dims, x, w)
    # d's RMSNorm is over the last dim: taken without the weight, which multiplies along dim 1 after it
    assert swaps == {"norm": 1}, swaps
    assert [s.what.split(" ->")[0] for s in tc.last_report().swaps] == ["x * rsqrt(mean(x^2) + eps) (written out)"], \
        str(tc.last_report())


def test_a_channels_last_layer_norm_on_a_permuted_input():
    """ConvNeXt's LayerNorm over channels: permute to channels-last, LayerNorm, permute back; the kernel reads a
    non-contiguous input and the result is viewed again."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.norm, self.pw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.LayerNorm(16), \
                nn.Linear(16, 16)

        def forward(self, x):
            h = self.dw(x).permute(0, 2, 3, 1)                 # (B, H, W, C), not contiguous
            return x + self.pw(self.norm(h)).permute(0, 3, 1, 2)

    model = seeded(Block)
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        _, swaps = _run(model, x)
    assert swaps == {"norm": 1}, swaps


# ---- autocast ----------------------------------------------------------------------------------------------------
def _attention(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v


def _autocast_inside(fn):
    def f(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args)
    return f


AUTOCAST_FORMS = {
    "explicit": _attention,
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "einsum": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.25)
                                           .softmax(-1), v),
}


@pytest.mark.parametrize("form", AUTOCAST_FORMS)
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_attention_of_f32_inputs_inside_autocast(form, check):
    """f32 q, k, v inside torch.autocast(bf16): eager's products run in bf16 and give bf16; the rewrite gave f32
    (and check=True did not see it: the check runs the replaced nodes outside autocast). Left, with the reason."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    got, swaps = _run(_autocast_inside(AUTOCAST_FORMS[form]), q, k, v, dtype=torch.bfloat16, check=check)
    assert got.dtype == torch.bfloat16
    assert "explicit_attention" not in swaps and "sdpa" not in swaps, swaps
    declined = [why for p, _, why in tc.last_report().declined if p in ("explicit_attention", "sdpa")]
    assert declined and "autocast" in declined[0], str(tc.last_report())


def test_attention_of_bf16_inputs_inside_autocast_is_swapped():
    """The same region with bf16 q, k, v: autocast changes nothing there, so the rewrite is eager's and is made."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    _, swaps = _run(_autocast_inside(_attention), q, k, v, dtype=torch.bfloat16)
    assert swaps == {"explicit_attention": 1}, swaps


def test_autocast_around_the_compiled_call():
    """The autocast region outside the compiled function: Dynamo traces under it (the graph has no autocast node)
    and the fake values carry its dtypes, which the rewrite is held to."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _attention(q, k, v)
        got = tilestack.optimize(_attention, inner="aot_eager")(q, k, v)
    assert got.dtype == want.dtype == torch.bfloat16
    _close(got, want, torch.bfloat16)
    assert "explicit_attention" not in tc.last_report().swapped, str(tc.last_report())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_llama_in_f32_run_under_autocast(train):
    """An f32 model called under autocast(bf16), as mixed-precision training does: outputs (and gradients) as
    eager's under the same autocast; the attention, whose products autocast runs in bf16, left to torch."""
    model = seeded(HFLlamaModel, train=train)
    ids = torch.randint(0, 64, (2, 10))

    def f(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(ids)

    with torch.set_grad_enabled(train):
        got, swaps = _run(f, ids, dtype=torch.bfloat16, grad_of=list(model.parameters()) if train else None)
    assert "explicit_attention" not in swaps, swaps


def test_an_autocast_region_in_part_of_the_model():
    """Only the MLP under autocast: the attention before it, all f32, is still swapped; the MLP's GEMMs, run by
    autocast in bf16 from f32 inputs, are not taken."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.qkv = nn.LayerNorm(32), nn.Linear(32, 96)
            self.fc, self.proj = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (t.view(b, n, 4, 8).transpose(1, 2) for t in self.qkv(self.ln(x)).chunk(3, -1))
            x = x + _attention(q, k, v).transpose(1, 2).reshape(b, n, 32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.proj(F.gelu(self.fc(x)))
            return x + h.float()

    model = seeded(Block)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        _, swaps = _run(model, x)
    assert swaps.get("explicit_attention") == 1 and "linear_epilogue" not in swaps, swaps
    _consistent(tc.last_report())


@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "autocast"])
def test_lm_head_loss_under_autocast(autocast):
    """cross_entropy(linear(x, w)) in training: fused in f32; under autocast the Linear's logits are bf16 in eager
    and the fused op would compute them in f32 (the loss 1.8e-2 off), so it is left, with the reason."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.lm_head = nn.LayerNorm(32), nn.Linear(32, 50, bias=False)

        def forward(self, h, labels):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return F.cross_entropy(self.lm_head(self.ln(h).view(-1, 32)), labels)

    model = seeded(Head, train=True)
    h, labels = torch.randn(2, 8, 32, requires_grad=True), torch.randint(0, 50, (16,))
    # under autocast the (swapped) norm's f32 output is rounded to bf16 for the Linear: bf16's tolerance
    _, swaps = _run(model, h, labels, grad_of=[h, *model.parameters()],
                    dtype=torch.bfloat16 if autocast else torch.float32)
    if autocast:
        assert "linear_cross_entropy" not in swaps, swaps
        declined = [why for p, _, why in tc.last_report().declined if p == "linear_cross_entropy"]
        assert declined and "autocast" in declined[0], str(tc.last_report())
    else:
        assert swaps.get("linear_cross_entropy") == 1, swaps


def test_a_scale_the_graph_computes_is_reported():
    """dynamic=True makes a module's float (self.scaling) a graph input: the explicit attention cannot take it as
    its constant scale and is left, and the report says why (it said nothing)."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaling = 0.25

        def forward(self, q, k, v):
            return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, dim=-1) @ v

    model = Attn()
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    since = len(tc.reports())
    for n in (6, 9):
        q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
        _close(compiled(q, k, v), model(q, k, v), torch.float32, f"seq {n}")
    reports = tc.reports()[since:]
    taken = sum(r.swapped.get("explicit_attention", 0) for r in reports)
    left = [why for r in reports for p, _, why in r.declined if p == "explicit_attention"]
    assert taken or any("scale computed in the graph" in why for why in left), [str(r) for r in reports]
