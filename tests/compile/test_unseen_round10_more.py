"""The tilestack torch.compile backend and ``tilestack.quantize`` on unseen models, round 10 (unseen_blocks_round10.py):
training, dynamic shapes and quantization. Gradients of einsum multi-query attention, ALiBi with a sliding window,
written-out qk-norm, soft-capped scores and Gemma's RMSNorm through the compiled model against a float64 reference
(as near as eager's own), then two AdamW steps with weight decay (eager's losses); the same blocks under
``torch._dynamo.mark_dynamic`` on batch and sequence at three shapes (the mask and the window rebuilt at each length);
a tiny LM whose head is tied to its embedding, with one Linear used twice and a one-output Linear skipped, quantized
int8 and fp8 (the head's error bounded by the quantization step computed here from the weights, the embedding left
float and named, the compiled model its eager self); bad input: a model with no Linear (norms alone), a float64
model, integer activations. Helpers, the reference-backend fixture: test_unseen_models_round1, test_unseen_round9.

What this round found: ``tilestack.quantize`` of a model with no ``nn.Linear`` and no other layer with weights (norms
and activations alone) returned it unchanged, in float, without a word, for every mode, and ran fp8-act's
calibration for nothing; it is refused now before any work, naming the model and what is expected
(``quant.linear.quantize``). One with an embedding or a convolution was and is told so by the left-in-float
warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_round9 import _swaps
from unseen_blocks_round10 import (
    AlibiWindowAttention,
    D,
    EinsumMQA,
    NormsOnly,
    QKNormAttention,
    RMSVariant,
    SoftcapAttention,
    TiedLM,
    seeded,
)

import tilestack
import tilestack.compile as tc
from tilestack.errors import LaunchError

TRAINED = pytest.mark.parametrize("cls,args,swapped", [
    (EinsumMQA, (), {"explicit_attention": 1}),
    (AlibiWindowAttention, ("bias",), {"explicit_attention": 1}),
    (QKNormAttention, ("hand",), {"explicit_attention": 1, "norm": 2}),
    (SoftcapAttention, (), {"softmax": 1}),
    (RMSVariant, ("gemma",), {"norm": 1}),
], ids=["einsum_mqa", "alibi_window", "qk_norm", "softcap", "gemma_rms"])


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@TRAINED
def test_training_gradients_and_adamw_steps(cls, args, swapped):
    """One graph (forward and backward); the first step's gradients within twice eager's own error against float64
    (plus f32's rounding); two AdamW steps (weight decay 0.1): the compiled model's losses eager's and float64's, its
    parameters after them within twice eager's own distance from float64's (Adam divides by the root of the squared
    gradient: a gradient near zero moves its parameter by up to lr, in the direction rounding gives it)."""
    model = seeded(cls, *args, train=True)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, eager, ref)]
    torch.manual_seed(2)
    for step in range(2):
        x = torch.randn(2, 7, D)
        losses = []
        for fn, opt, xx in ((compiled, opts[0], x), (eager, opts[1], x), (ref, opts[2], x.double())):
            opt.zero_grad()
            loss = fn(xx).pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
        if step == 0:
            for i, (g, e, r) in enumerate(zip(_grads(model), _grads(eager), _grads(ref), strict=True)):
                own = float((e.double() - r).abs().max())
                assert float((g.double() - r).abs().max()) <= 2 * own + 1e-6, f"gradient {i}"
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(losses[0].double(), losses[2], rtol=1e-4, atol=1e-6)
        for opt in opts:
            opt.step()
    for i, (p, e, r) in enumerate(zip(model.parameters(), eager.parameters(), ref.parameters(), strict=True)):
        own = float((e.double() - r).abs().max())        # Adam moves a parameter whose gradient is ~0 by up to lr,
        assert float((p.double() - r).abs().max()) <= 2 * own + 1e-5, f"parameter {i}"   # its sign set by rounding
    assert len(tc.reports()) == since + 1
    assert _swaps(since) == swapped


@pytest.mark.parametrize("cls,args", [(EinsumMQA, ()), (AlibiWindowAttention, ("bias",)),
                                      (AlibiWindowAttention, ("where",)), (QKNormAttention, ("module",))],
                         ids=["einsum_mqa", "alibi_window", "window_where", "qk_norm"])
def test_mark_dynamic_batch_and_sequence(cls, args):
    """Batch and sequence marked dynamic, three shapes (2 x 7, 3 x 5, 4 x 11): at most two graphs (Dynamo may
    specialize once more), the attention swapped in each; every output float64's (the causal mask, ALiBi and the
    window built at each length)."""
    model = seeded(cls, *args)
    ref = copy.deepcopy(model).double()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    for b, n in ((2, 7), (3, 5), (4, 11)):
        torch.manual_seed(b * n)
        x = torch.randn(b, n, D)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        with torch.no_grad():
            got, want = compiled(x), ref(x.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=f"{b} x {n}")
    reports = tc.reports()[since:]
    assert 1 <= len(reports) <= 2
    for r in reports:
        assert r.swapped.get("sdpa", 0) + r.swapped.get("explicit_attention", 0) == 1, str(r)


# ---- quantization ---------------------------------------------------------------------------------------------------
def _step_bound(h: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    """The most a per-channel quantized weight can move ``h @ w^T``: each weight within half a step of its grid (int8:
    step = max|row| / 127; fp8 E4M3: 2^-4 of itself above the subnormals, half their spacing 2^-9 times the row's
    scale max|row| / 448 below), times |h|; float64."""
    w, h = w.double(), h.double()
    amax = w.abs().amax(1, keepdim=True)
    per_weight = (amax / 127 / 2).expand_as(w) if mode == "int8" else w.abs() * 2 ** -4 + amax / 448 * 2 ** -10
    return h.abs() @ per_weight.T


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_tied_lm(mode):
    """The head tied to the embedding is quantized (a QuantLinear of its own), the embedding stays float, unchanged,
    and is named in the one warning; ``up``, used twice per forward, is one QuantLinear; ``score`` (one output)
    skipped stays an nn.Linear. The head's logits, given the quantized model's hidden states, are within the
    quantization step's bound of those hidden states times the float embedding (and do differ: it was quantized);
    the compiled quantized model gives its eager outputs at two batch sizes."""
    model = seeded(TiedLM)
    float_emb = model.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"left in float .*emb \(Embedding\)"):
        q = tilestack.quantize(model, mode, skip=("score",))
    assert type(q.head).__name__ == type(q.up).__name__ == type(q.down).__name__ == "QuantLinear"
    assert type(q.score) is torch.nn.Linear and torch.equal(q.emb.weight, float_emb)
    torch.manual_seed(3)
    ids = torch.randint(0, 48, (2, 6))
    with torch.no_grad():
        h = q.hidden(ids)
        logits, score = q(ids)
        exact = h.double() @ float_emb.double().T
        err = (logits.double() - exact).abs()
        bound = _step_bound(h, float_emb, mode)
        assert bool((err <= bound + 1e-5).all()), float((err - bound).max())
        assert float(err.max()) > 1e-5
        torch.testing.assert_close(score, torch.nn.functional.linear(h, q.score.weight, q.score.bias).squeeze(-1))
        compiled = tilestack.optimize(q, check=True, inner="aot_eager")
        for b in (2, 3):
            ids = torch.randint(0, 48, (b, 6))
            for g, e in zip(compiled(ids), q(ids), strict=True):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "fp8", "fp8-act"])
def test_quantize_a_model_without_linear_layers_is_refused(mode):
    """Norms and an activation alone: nothing quantize replaces and nothing it could name. The model came back
    unchanged, in float, without a word (fp8-act ran its calibration batches first); refused now, naming the model
    and what is expected, before any calibration batch runs. With an embedding (a weight matrix left in float) the
    warning names it, as round 9's bare Conv2d (nothing quantized, the model named): that is said already."""
    ran = []

    def batches():
        ran.append(True)
        yield torch.zeros(2, D)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LaunchError, match=r"model \(NormsOnly\) has no nn.Linear layer to quantize and no other "
                                              r"layer with weights .*; expected a model with nn.Linear layers"):
            tilestack.quantize(seeded(NormsOnly), mode, calibration=batches() if mode == "fp8-act" else None)
        with pytest.raises(LaunchError, match=r"model \(LayerNorm\) has no nn.Linear layer to quantize"):
            tilestack.quantize(torch.nn.LayerNorm(D), mode, calibration=batches() if mode == "fp8-act" else None)
    assert not ran
    model = seeded(NormsOnly, embed=True)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) with weights left in float .*: emb \(Embedding\)"):
        assert tilestack.quantize(model, "int8") is model


def test_quantize_bad_dtypes_are_named():
    """A float64 model: refused naming the layer and its dtype, the model left unchanged (still nn.Linear); integer
    activations into a quantized layer: refused naming x's dtype and the dtypes expected."""
    model = seeded(TiedLM).double()
    with pytest.raises(LaunchError, match=r"layer 'up' cannot be quantized .*float64; expected one of float32"):
        tilestack.quantize(model, "int8")
    assert type(model.up) is torch.nn.Linear and type(model.head) is torch.nn.Linear
    layer = tilestack.quantize(torch.nn.Linear(D, 4), "int8")
    with pytest.raises(LaunchError, match=r"x has dtype int64; expected one of float32, bfloat16, float16"):
        layer(torch.ones(2, D, dtype=torch.long))
