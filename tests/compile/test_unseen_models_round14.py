"""The tilestack torch.compile backend on models it has never seen, round 14 (unseen_blocks_round14.py): an encoder
layer on ``nn.MultiheadAttention`` (key padding mask, ``need_weights=False``) with a bias-free tanh-GELU FFN;
grouped-query attention through SDPA's ``enable_gqa=True`` under one boolean causal + padding mask (and the same
expanded by ``repeat_kv``), and causal GQA cross-lengths (fewer queries than keys: torch's top-left causal mask);
RMSNorm by hand in three forms and two look-alikes; activations after a bias-free Linear (tanh GELU, SiLU, Mish,
Hardswish, the residual added before the activation); a segmentation head's softmax over dim 1 of (b, classes, h, w);
cross-entropy against soft targets written out; torch's own ``nn.TransformerDecoderLayer`` over a memory of another
length. Each inference test: one graph and no break in
``torch._dynamo.explain``, one compile and none on a second call, eager's outputs within the dtype's tolerance and f32
within 1e-4 relative of float64, the report's swaps checked by name and text (``test_unseen_round9._compiled``).
Training: first-step gradients within twice eager's own error against float64, then SGD steps
(``test_unseen_models_round12._trained``). Batches of three sizes: automatic dynamic compiles at most two graphs,
``mark_dynamic`` one. Kernels on the reference executor at tiny sizes (the size policy off), the rest through
aot_eager.

Every model here compiled correctly as it was. The report's reason for an activation or a log_softmax no pass
matched was "no tilestack kernel for it", as if no kernel took such an op; it says now whether the GEMM epilogue has
that activation and why this one was not fused, or that the log_softmax is not the fused cross-entropy's form
(``patterns.LEFT_UNMATCHED``, ``backend.run_passes``). The quantize fixes are in test_unseen_models_round14_quant.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_models_round12 import _trained
from test_unseen_models_round13 import _against_f64, _x
from test_unseen_round9 import _compiled, _gap, _left_why, _whats
from unseen_blocks_round14 import (
    ACTIVATIONS,
    CLASSES,
    EPS,
    HD,
    KV_HEADS,
    RMS_FORMS,
    ActivationMLP,
    D,
    GQABoolMaskAttention,
    H,
    MHAEncoderLayer,
    RMSNormForms,
    SegmentationHead,
    SoftTargetClassifier,
    TorchDecoderLayer,
    seeded,
)

import tilestack
import tilestack.compile as tc

F32, BF16 = torch.float32, torch.bfloat16
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
F32_GEMM = "tilestack's GEMM multiplies bf16 or f16"


def _padded(b: int = 2, n: int = 7, dtype=F32, seed: int = 1):
    """(x (b, n, D), padding (b, n)): True on the last sequence's last 3 positions (torch's key_padding_mask)."""
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[-1, n - 3:] = True
    return _x(b, n, dtype=dtype, seed=seed), padding


# ---- nn.MultiheadAttention -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_multihead_attention_encoder(dtype):
    """``nn.MultiheadAttention(batch_first=True)`` with a key padding mask and ``need_weights=False``: Dynamo keeps
    its forward whole (left, said so); both post-LN residual + LayerNorms swapped; in bf16 the bias-free up projection
    + tanh GELU as a GEMM epilogue (f32: declined, the GEMM multiplies 16 bits). The padding holds: the padded
    positions changed, every real position's output stays."""
    model = seeded(MHAEncoderLayer, dtype=dtype)
    x, padding = _padded(dtype=dtype)
    got, swaps, since = _compiled(model, x, padding, dtype=dtype)
    assert swaps == {"add_norm": 2} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert "not traced into" in _left_why(since)["multi_head_attention_forward"]
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == ["linear + gelu_tanh -> tilestack::linear_epilogue"]
        return
    assert any(F32_GEMM in why for why in _declined("linear_epilogue", since))
    _against_f64(model, got, x, padding)
    noisy = x.clone()
    noisy[-1, -3:] = 50.0
    with torch.no_grad():
        moved = model(noisy, padding)
    torch.testing.assert_close(moved[:, :-3], got[:, :-3], **F64_TOL)
    torch.testing.assert_close(moved[0], got[0], **F64_TOL)


def _decoder_args(b: int = 2, n: int = 6, m: int = 9, seed: int = 1):
    """(y (b, n, D), memory (b, m, D), its padding (b, m): the last sequence's memory from 5 on)."""
    torch.manual_seed(seed)
    padding = torch.zeros(b, m, dtype=torch.bool)
    padding[-1, 5:] = True
    return torch.randn(b, n, D), torch.randn(b, m, D), padding


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-ln", "post-ln"])
def test_torch_transformer_decoder_layer(norm_first):
    """``nn.TransformerDecoderLayer`` over a memory of 9 states for 6 queries, in eval: its two attentions are
    nn.MultiheadAttention's (left whole); pre-LN: two residual + LayerNorms and the first norm swapped, post-LN: three
    residual + LayerNorms. Outputs float64's; the memory's padded states do not matter. Pre-LN trained (dropout 0):
    losses and gradients as eager's against float64."""
    model = seeded(TorchDecoderLayer, norm_first)
    args = _decoder_args()
    got, swaps, _ = _compiled(model, *args)
    assert swaps == ({"add_norm": 2, "norm": 1} if norm_first else {"add_norm": 3}), swaps
    _against_f64(model, got, *args)
    y, memory, padding = args
    noisy = memory.clone()
    noisy[-1, 5:] = 30.0
    with torch.no_grad():
        torch.testing.assert_close(model(y, noisy, padding), got, **F64_TOL)
    if not norm_first:
        return
    torch._dynamo.reset()
    trained = seeded(TorchDecoderLayer, norm_first, 0.0, train=True)
    _trained(trained, [_decoder_args(seed=s) for s in (3, 4)], lambda out: out.pow(2).mean())


# ---- SDPA: enable_gqa -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", ["gqa", "repeat"])
def test_gqa_under_a_boolean_mask(form, dtype):
    """4 query heads over 2 key/value heads, SDPA under one boolean (b, 1, n, n) mask of the causal triangle and the
    key padding: with ``enable_gqa=True`` (k, v unexpanded) and with ``repeat_kv`` first, both swapped as a masked
    attention. Causal: a change to the last token leaves the others; the padding: padded keys changed, the padded
    sequence's real rows stay."""
    model = seeded(GQABoolMaskAttention, form, dtype=dtype)
    x, padding = _padded(dtype=dtype)
    keep = ~padding
    got, swaps, since = _compiled(model, x, keep, dtype=dtype)
    assert swaps == {"sdpa": 1}, swaps
    assert _whats(since, "sdpa") == ["scaled_dot_product_attention masked -> tilestack::attention_fwd"]
    if dtype == BF16:
        return
    _against_f64(model, got, x, keep)
    y = x.clone()
    y[:, -1] += 5.0
    y[-1, -3:] -= 7.0
    with torch.no_grad():
        moved = model(y, keep)
    torch.testing.assert_close(moved[0, :-1], got[0, :-1], **F64_TOL)
    torch.testing.assert_close(moved[-1, :-3], got[-1, :-3], **F64_TOL)
    assert _gap(moved[0, -1], got[0, -1]) > 1e-2


class _CausalCross(torch.nn.Module):
    """SDPA of n queries over m > n keys (KV_HEADS heads under enable_gqa, or expanded), ``is_causal=True``."""

    def __init__(self, gqa: bool):
        super().__init__()
        self.gqa = gqa

    def forward(self, q, k, v):
        if not self.gqa:
            k, v = (t.repeat_interleave(H // KV_HEADS, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)


@pytest.mark.parametrize("gqa", [True, False], ids=["enable_gqa", "expanded"])
def test_causal_attention_with_fewer_queries_than_keys(gqa):
    """``is_causal=True`` with 3 queries over 7 keys: torch's mask is the top-left triangle (query i sees keys 0..i),
    not the bottom-right one a decoding step means. Swapped, and checked against that mask computed by hand in
    float64 (head h reads key/value head h // 2)."""
    torch.manual_seed(4)
    q, k, v = torch.randn(2, H, 3, HD), torch.randn(2, KV_HEADS, 7, HD), torch.randn(2, KV_HEADS, 7, HD)
    got, swaps, since = _compiled(_CausalCross(gqa), q, k, v)
    assert swaps == {"sdpa": 1}, swaps
    assert _whats(since, "sdpa") == ["scaled_dot_product_attention causal -> tilestack::attention_fwd"]
    kd, vd = (t.double().repeat_interleave(H // KV_HEADS, dim=1) for t in (k, v))
    s = q.double() @ kd.transpose(-2, -1) / math.sqrt(HD)
    top_left = torch.ones(3, 7, dtype=torch.bool).tril()
    want = s.masked_fill(~top_left, float("-inf")).softmax(-1) @ vd
    torch.testing.assert_close(got.double(), want, **F64_TOL)
    bottom_right = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    assert _gap(got, s.masked_fill(~bottom_right, float("-inf")).softmax(-1) @ vd) > 1e-2


# ---- RMSNorm forms ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", RMS_FORMS)
def test_rms_norm_forms(form, dtype):
    """``x * rsqrt(mean(x^2) + eps) * w``, ``x / sqrt(mean(x^2) + eps) * w`` and ``nn.RMSNorm`` swapped as the RMS
    norm; the eps outside the root (``x / (||x|| / sqrt(d) + eps)``) and ``F.normalize(x) * sqrt(d)`` left: not the
    same function (shown on rows of scale 1e-6, where the eps dominates each differently)."""
    model = seeded(RMSNormForms, form, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    taken = form in ("rsqrt", "div-sqrt", "nn")
    assert swaps == ({"norm": 1} if taken else {}), swaps
    if taken:
        assert len(_whats(since, "norm")) == 1 and "rms_norm" in _whats(since, "norm")[0]
    if dtype == BF16:
        return
    _against_f64(model, got, x)
    # rows of scale ~1e-6 after the Linear: the eps (1e-6) decides the output; each form weighs it otherwise
    tiny = seeded(RMSNormForms, form).double()
    with torch.no_grad():
        tiny.fc.weight.mul_(1e-6)
        tiny.fc.bias.mul_(1e-6)
        h = tiny.fc(x.double())
        weight = tiny.rms.weight if form == "nn" else tiny.weight
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight
        gap = _gap(tiny(x.double()), rms)
    assert (gap < 1e-9) if taken else (gap > 1e-2), (form, gap)


# ---- activations after a Linear --------------------------------------------------------------------------------------
EPILOGUES = {
    "gelu-tanh": ["linear + bias + residual add -> tilestack::linear_epilogue",
                  "linear + gelu_tanh -> tilestack::linear_epilogue"],
    "silu": ["linear + bias + residual add -> tilestack::linear_epilogue",
             "linear + silu -> tilestack::linear_epilogue"],
    "mish": ["linear + bias + residual add -> tilestack::linear_epilogue"],
    "hardswish": ["linear + bias + residual add -> tilestack::linear_epilogue"],
    "residual-first": ["linear + residual add -> tilestack::linear_epilogue"],
}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations_after_a_bias_free_linear(act):
    """bf16: tanh GELU and SiLU (as modules) fused into the bias-free up projection's epilogue, the down projection
    with its bias and residual; Mish and Hardswish are no epilogue of the GEMM (left, the down projection fused); the
    residual added before the activation: the add fused (the GEMM's residual), the GELU after it left. Each activation
    left says why (one the epilogue has, but not here; one it does not have). f32: every epilogue declined (the GEMM
    multiplies 16 bits), outputs float64's."""
    model = seeded(ActivationMLP, act, dtype=BF16)
    x = _x(dtype=BF16)
    _, swaps, since = _compiled(model, x, dtype=BF16)
    assert swaps == {"linear_epilogue": len(EPILOGUES[act])}, swaps
    assert _whats(since, "linear_epilogue") == sorted(EPILOGUES[act])
    left = {"mish": "mish", "hardswish": "hardswish", "residual-first": "gelu"}.get(act)
    if left is not None:     # (was "no tilestack kernel for it", as if no kernel took any activation)
        why = "takes (relu, gelu, gelu_tanh, silu), but here not" if left == "gelu" else "epilogue does not have"
        assert why in _left_why(since)[left], _left_why(since)
    torch._dynamo.reset()
    model32 = seeded(ActivationMLP, act)
    x32 = _x()
    got, swaps, since = _compiled(model32, x32)
    assert swaps == {}, swaps
    assert any(F32_GEMM in why for why in _declined("linear_epilogue", since))
    left32 = act if act in ("mish", "hardswish", "silu") else "gelu"
    assert "GEMM epilogue" in _left_why(since)[left32], _left_why(since)
    _against_f64(model32, got, x32)


# ---- softmax over the classes, soft-target cross-entropy -------------------------------------------------------------
def test_softmax_over_the_classes_of_a_map():
    """The softmax over dim 1 of (b, classes, h, w) logits: declined naming the dim (the kernel takes rows of the last
    dim), the probabilities and their entropy eager's and float64's, summing to 1 over the classes."""
    model = seeded(SegmentationHead)
    torch.manual_seed(2)
    feats = torch.randn(2, D, 3, 4)
    got, swaps, since = _compiled(model, feats)
    assert swaps == {}, swaps
    assert any("softmax over dim 1" in why for why in _declined("softmax", since))
    _against_f64(model, got, feats)
    torch.testing.assert_close(got[0].sum(1), torch.ones(2, 3, 4), **F64_TOL)
    assert got[0].shape == (2, CLASSES, 3, 4)


def test_soft_target_cross_entropy_in_training():
    """``-(targets * log_softmax(logits)).sum(-1).mean()`` against soft targets, trained: the LayerNorm swapped, the
    written-out loss left, the report saying it is not the fused cross-entropy's form; losses eager's and float64's,
    gradients within twice eager's error. At one-hot targets the loss is F.cross_entropy's."""
    model = seeded(SoftTargetClassifier, train=True)
    torch.manual_seed(5)
    targets = torch.softmax(3 * torch.randn(2, 7, CLASSES), -1)
    batches = [(_x(seed=s), targets) for s in (3, 4)]
    since, eager = _trained(model, batches, lambda loss: loss)
    assert tc.reports()[since].swapped == {"norm": 1}, tc.reports()[since].swapped
    assert "not the fused cross-entropy's" in tc.reports()[since].left_why["log_softmax"]
    labels = torch.randint(0, CLASSES, (2, 7))
    x = _x(seed=6)
    with torch.no_grad():
        logits = eager.head(eager.norm(x))
        torch.testing.assert_close(eager(x, F.one_hot(labels, CLASSES).float()),
                                   F.cross_entropy(logits.view(-1, CLASSES), labels.view(-1)), **F64_TOL)


# ---- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mha", "gqa", "rms-div-sqrt", "rms-nn"])
def test_training_through_the_backend(name):
    """Two SGD steps through the backend (requires_grad parameters, the backward through the compiled graph): losses
    and first-step gradients as eager's against float64. The attention and norms swapped in the training graph."""
    padded = [_padded(seed=s) for s in (3, 4)]
    if name == "mha":
        model, batches, swaps = seeded(MHAEncoderLayer, train=True), padded, {"add_norm": 2}
    elif name == "gqa":
        model, batches, swaps = seeded(GQABoolMaskAttention, train=True), [(x, ~p) for x, p in padded], {"sdpa": 1}
    else:
        model, batches, swaps = seeded(RMSNormForms, name[4:], train=True), [(x,) for x, _ in padded], {"norm": 1}
    since, _ = _trained(model, batches, lambda y: y.pow(2).mean())
    assert tc.reports()[since].swapped == swaps, tc.reports()[since].swapped


# ---- batch sizes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["automatic", "mark_dynamic"])
def test_batch_sizes_bounded_recompiles(how):
    """The MHA encoder over batches 2, 3 and 5: automatic dynamic compiles twice (the first batch static, then one
    graph with a symbolic batch), ``mark_dynamic`` on the first call's batch once; each graph with its two add + norms
    swapped, each output eager's."""
    model = seeded(MHAEncoderLayer)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    for i, b in enumerate((2, 3, 5)):
        x, padding = _padded(b=b, seed=b)
        if i == 0 and how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(padding, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, padding), model(x, padding), rtol=1e-4, atol=1e-5)
    graphs = [dict(r.swapped) for r in tc.reports()[since:]]
    assert graphs == [{"add_norm": 2}] * (2 if how == "automatic" else 1), graphs


def test_no_grad_and_grad_calls_of_one_compiled_model():
    """The GQA block compiled once, called under ``torch.no_grad()`` then with gradients: both outputs eager's, and
    the gradient of the input through the compiled attention is float64's."""
    model = seeded(GQABoolMaskAttention)
    x, padding = _padded()
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ~padding), model(x, ~padding), **F64_TOL)
    xg = x.clone().requires_grad_()
    compiled(xg, ~padding).pow(2).sum().backward()
    x64 = x.double().requires_grad_()
    ref = copy.deepcopy(model).double()
    ref(x64, ~padding).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
