"""The tilestack torch.compile backend on unseen models, round 5: attention-shaped forms. Forms whose "mask" or "v"
is the scores themselves (``softmax(s + s)``, ``softmax(s) @ s``: the rewrite read a node it erased, a KeyError
inside the backend), scores divided by a 0-d tensor the graph computes from constants (``sqrt(torch.tensor(hd))``:
folded into the kernel's scale), q and k cast up to f32 before their product (Phi-2, GPT-J), and forms that are
not softmax attention (logit soft-capping, sinks, linear and sigmoid attention, retention) left alone with eager's
outputs. Helpers and the reference-backend fixture from test_unseen_models_round1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: the autouse fixture

import tilestack.compile as tc

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def _qkv(dtype=torch.float32, requires_grad=False, n: int = 9):
    torch.manual_seed(0)
    return [torch.randn(2, 3, n, 16, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _declined(pattern: str) -> list[str]:
    return [why for p, _, why in tc.last_report().declined if p == pattern]


# ---- an input of the rewrite that is one of its own nodes ---------------------------------------------------------
def _scores_as_values(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    return torch.softmax(s, -1) @ s                         # (B, H, N, N) "values": the scores themselves


def _scores_as_mask(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    return torch.softmax(s + s, -1) @ v                      # 2 s, not s plus a mask


def _scores_added_to_themselves_in_place(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    s += s
    return torch.softmax(s, -1) @ v


def _probabilities_as_values(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    return p @ p


OWN_NODES = {"scores_as_values": _scores_as_values, "scores_as_mask": _scores_as_mask,
             "scores_added_in_place": _scores_added_to_themselves_in_place,
             "probabilities_as_values": _probabilities_as_values}


@pytest.mark.parametrize("form", OWN_NODES)
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_a_mask_or_values_computed_by_the_pattern_itself_is_declined(form, check):
    """softmax(s + s) @ v looks like scores plus a mask, softmax(s) @ s like attention with v = s; the rewrite would
    read the mask or v from the nodes it erases (KeyError: s inside the backend, in every inner compiler). Declined
    with the reason, the outputs eager's, forward and backward."""
    q, k, v = _qkv(requires_grad=True)
    _, swaps = _run(OWN_NODES[form], q, k, v, check=check, grad_of=[q, k, v] if "values" not in form else [q, k])
    assert "explicit_attention" not in swaps, swaps
    assert any("one of the nodes it replaces" in why for why in _declined("explicit_attention")) or \
        any("needs a gradient" in why for why in _declined("explicit_attention")), str(tc.last_report())


@pytest.mark.parametrize("form", OWN_NODES)
def test_a_mask_or_values_computed_by_the_pattern_itself_in_inference(form):
    q, k, v = _qkv()
    with torch.no_grad():
        _, swaps = _run(OWN_NODES[form], q, k, v, check=False)
    assert "explicit_attention" not in swaps, swaps
    assert any("is both an input of the rewrite and one of the nodes it replaces" in why
               for why in _declined("explicit_attention")), str(tc.last_report())


# ---- scales computed from constants -------------------------------------------------------------------------------
def _div_sqrt_tensor(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) / torch.sqrt(torch.tensor(q.shape[-1], dtype=q.dtype))
    return torch.softmax(s.float(), -1).type_as(q) @ v


def _mul_rsqrt_method(q, k, v):
    s = q @ k.transpose(-1, -2) * torch.tensor(float(q.shape[-1])).rsqrt()
    return torch.softmax(s, -1) @ v


def _div_tensor_cast(q, k, v):
    scale = torch.tensor(q.shape[-1] ** 0.5, dtype=torch.float32).to(q.dtype)
    return torch.softmax(q @ k.transpose(-1, -2) / scale, -1) @ v


@DTYPES
@pytest.mark.parametrize("fn", [_div_sqrt_tensor, _mul_rsqrt_method, _div_tensor_cast],
                         ids=["div_sqrt_tensor", "mul_rsqrt_method", "div_tensor_cast"])
def test_scores_scaled_by_a_tensor_computed_from_constants(fn, dtype):
    """1/sqrt(hd) as torch.sqrt(torch.tensor(hd)), torch.tensor(hd).rsqrt() or a cast 0-d tensor: folded into the
    kernel's scale (it was declined as 'not q @ k^T times constants'); the constant's nodes go with the rewrite."""
    q, k, v = _qkv(dtype, requires_grad=True)
    _, swaps = _run(fn, q, k, v, dtype=dtype, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps
    report = tc.last_report()
    assert "k^T * 0.25)" in report.swaps[0].what, str(report)
    assert not {"tensor", "sqrt", "Tensor.rsqrt", "Tensor.to"} & set(report.left), str(report)


def _constant_written_after(q, k, v):
    c = torch.tensor(16.0).sqrt()
    c.mul_(0.5)                                              # the divisor is 2, not 4
    return torch.softmax(q @ k.transpose(-1, -2) / c, -1) @ v


def _constant_from_an_input(q, k, v, t):
    return torch.softmax(q @ k.transpose(-1, -2) / torch.sqrt(t), -1) @ v


def test_a_computed_constant_written_in_place_or_read_from_an_input_is_not_folded():
    q, k, v = _qkv()
    _, swaps = _run(_constant_written_after, q, k, v)
    assert "explicit_attention" not in swaps, swaps
    _, swaps = _run(_constant_from_an_input, q, k, v, torch.tensor(16.0))
    assert "explicit_attention" not in swaps, swaps


# ---- q and k cast up before their product ---------------------------------------------------------------------------
def _upcast_where_causal(q, k, v):
    """GPT-J's / Phi's spelling with a bool causal fill: the scores in f32 from q, k cast up, cast back for v."""
    n = q.shape[-2]
    w = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
    return F.softmax(w, dim=-1, dtype=torch.float32).to(v.dtype) @ v


def _upcast_no_mask(q, k, v):
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * 0.25, -1).to(v.dtype) @ v


@DTYPES
@pytest.mark.parametrize("fn", [_upcast_where_causal, _upcast_no_mask], ids=["where_causal", "no_mask"])
def test_q_and_k_cast_up_before_their_product(fn, dtype):
    """In bf16 the kernel takes q, k, v in bf16 (it was declined: 'dtypes f32, f32, bf16'), forward and backward."""
    q, k, v = _qkv(dtype, requires_grad=True)
    _, swaps = _run(fn, q, k, v, dtype=dtype, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps


def test_values_cast_up_too_keep_the_f32_attention():
    """q, k and v all cast to f32 (the output f32): the f32 attention of the casts, as before."""
    def f(q, k, v):
        return torch.softmax(q.float() @ k.float().transpose(-1, -2) * 0.25, -1) @ v.float()

    q, k, v = _qkv(torch.bfloat16)
    with torch.no_grad():
        _, swaps = _run(f, q, k, v)
    assert swaps == {"explicit_attention": 1}, swaps


# ---- forms that are not softmax attention ----------------------------------------------------------------------------
def _softcap(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    s = torch.tanh(s / 5.0) * 5.0
    return torch.softmax(s, -1) @ v


def _softcap_f32_causal(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s / 2.0
    s = torch.tanh(s)
    s = s * 2.0
    causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")).float(), -1).type_as(q) @ v


def _sinks(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    sink = torch.full((*s.shape[:-1], 1), 0.5, dtype=s.dtype)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return p @ v


def _max_subtracted(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q * 0.25, k)
    s = s - s.amax(dim=-1, keepdim=True).detach()
    return torch.einsum("bhij,bhjd->bhid", s.softmax(dim=-1), v)


def _linear_attention(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    z = 1 / (q @ k.sum(-2, keepdim=True).transpose(-1, -2) + 1e-6)
    return (q @ (k.transpose(-1, -2) @ v)) * z


def _sigmoid_attention(q, k, v):
    return torch.sigmoid(q @ k.transpose(-1, -2) * 0.25 - math.log(k.shape[-2])) @ v


def _relu_squared_attention(q, k, v):
    return F.relu(q @ k.transpose(-1, -2) * 0.25).square() / k.shape[-2] @ v


def _negated_scores(q, k, v):
    return torch.softmax(-(q @ k.transpose(-1, -2)) * 0.25, -1) @ v


def _probabilities_renormalised(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    p = p * torch.ones(p.shape[-2], p.shape[-1], dtype=p.dtype).tril()          # causal after the softmax
    return p / (p.sum(-1, keepdim=True) + 1e-9) @ v


NOT_ATTENTION = {"softcap": _softcap, "softcap_f32_causal": _softcap_f32_causal, "sinks": _sinks,
                 "max_subtracted": _max_subtracted, "linear": _linear_attention, "sigmoid": _sigmoid_attention,
                 "relu_squared": _relu_squared_attention, "negated_scores": _negated_scores,
                 "renormalised": _probabilities_renormalised}


@pytest.mark.parametrize("form", NOT_ATTENTION)
@DTYPES
def test_forms_that_are_not_softmax_attention_are_left(form, dtype):
    """Soft-capped logits (Gemma-2), a sink logit per row (gpt-oss), the row max subtracted (Flamingo), linear,
    sigmoid and ReLU-squared attention, negated scores, renormalised probabilities: no attention swap, eager's
    outputs and gradients (the softmax alone may be swapped)."""
    q, k, v = _qkv(dtype, requires_grad=True)
    _, swaps = _run(NOT_ATTENTION[form], q, k, v, dtype=dtype, grad_of=[q, k, v])
    assert "explicit_attention" not in swaps and "sdpa" not in swaps, swaps
    assert set(swaps) <= {"softmax"}, swaps
