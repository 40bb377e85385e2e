"""The tilestack torch.compile backend on models it has never seen, round 4: GPT-NeoX (partial rotary, two masks),
a Qwen2 / Mistral layer through SDPA (is_causal, a sliding-window bool mask), OpenAI Whisper's encoder (a conv
front end, q and k each scaled, k permuted straight to k^T), a decoder whose KV cache is written by index_copy_,
a ViT with qk-norm and LayerScale, slot attention (softmax over dim=-2), BERT through SDPA with dropout, and norm
spellings (unseen_blocks_round4.py). For each: the outputs (in training the gradients) are eager's within the
dtype's tolerance, one graph (no graph break), every swap made passed its check, and what is left has a reason in
the report (round 1's ``_run`` and ``_consistent``). On the CPU: the kernels through the reference executor at tiny
sizes (the size policy off), the rest through aot_eager; Inductor where a test says so."""

from __future__ import annotations

import math

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run, _swapped  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from unseen_blocks_round4 import (
    BertSdpaLayer,
    GPTNeoXLayer,
    IndexCopyCachedDecoder,
    NormSpellings,
    QKNormViT,
    Qwen2Layer,
    SlotAttentionStep,
    WhisperEncoder,
    seeded,
)

import tilestack
import tilestack.compile as tc

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def _padding(b: int = 2, n: int = 10):
    """attention_mask (b, n): the last sequence right-padded from position 7."""
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, 7:] = 0
    return mask


def _inputs(dtype, b: int = 2, n: int = 10, d: int = 32, requires_grad: bool = False):
    torch.manual_seed(1)
    return torch.randn(b, n, d, dtype=dtype, requires_grad=requires_grad)


# ---- GPT-NeoX: partial rotary, where(causal buffer) then an additive padding mask -----------------------------------
@DTYPES
def test_gpt_neox_layer(dtype):
    """Two masks on the scores (the causal where, then the (B, 1, 1, N) bias): the attention is left, with the
    reason; its softmax alone, the LayerNorms and (in bf16) the GEMMs' epilogues are swapped."""
    model = seeded(GPTNeoXLayer, dtype=dtype)
    x, mask = _inputs(dtype), _padding()
    _one_graph(model, x, mask)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("norm") == 2 and swaps.get("softmax") == 1 and "explicit_attention" not in swaps, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 3), swaps
    assert any("one mask at most" in why for why in _declined("explicit_attention", since))


def test_gpt_neox_layer_training_gradients():
    model = seeded(GPTNeoXLayer, train=True)
    x = _inputs(torch.float32, requires_grad=True)
    _, swaps = _run(model, x, _padding(), grad_of=[x, *model.parameters()])
    assert swaps.get("norm") == 2 and swaps.get("softmax") == 1, swaps


# ---- Qwen2 / Mistral through SDPA ------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("window", [None, 4], ids=["is_causal", "sliding_window"])
def test_qwen2_layer(dtype, window):
    """is_causal=True, or a (N, N) bool mask of the last 4 keys; GQA by repeat_kv; RMSNorm by rsqrt in the model's
    dtype; SwiGLU: in bf16 the gate's SiLU fused into its GEMM and the down projection's residual into its own."""
    model = seeded(Qwen2Layer, window=window, dtype=dtype)
    x = _inputs(dtype)
    _one_graph(model, x)
    with torch.no_grad():
        _, swaps = _run(model, x, dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("norm") == 2, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 3), swaps


def test_qwen2_sliding_window_training_gradients():
    model = seeded(Qwen2Layer, window=4, train=True)
    x = _inputs(torch.float32, requires_grad=True)
    _, swaps = _run(model, x, grad_of=[x, *model.parameters()])
    assert swaps.get("sdpa") == 1 and swaps.get("norm") == 2, swaps


def test_qwen2_batch_and_sequence_marked_dynamic_in_one_graph():
    """torch._dynamo.mark_dynamic on the batch and the sequence: three shapes, one graph, eager's outputs."""
    model = seeded(Qwen2Layer, window=4)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    since = len(tc.reports())
    with torch.no_grad():
        for b, n in ((2, 10), (3, 7), (4, 12)):
            x = torch.randn(b, n, 32)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
            _close(compiled(x), model(x), torch.float32, f"batch {b}, sequence {n}")
    assert len(tc.reports()) - since == 1
    assert _swapped(since) == {"sdpa": 1, "norm": 2}, str(tc.last_report())


# ---- OpenAI Whisper's encoder -------------------------------------------------------------------------------------
@DTYPES
def test_whisper_encoder(dtype):
    """q and k each times hd ** -0.25, k permuted straight to (B, H, hd, N), softmax of the f32 scores: both
    layers' attention is swapped (it was declined as "not a 4-D q @ k^T times constants": the scales sat on the
    product's operands and the key's permute was not a swap of its last two dims)."""
    model = seeded(WhisperEncoder, dtype=dtype)
    mel = torch.randn(2, 8, 24, dtype=dtype)
    _one_graph(model, mel)
    with torch.no_grad():
        _, swaps = _run(model, mel, dtype=dtype)
    assert swaps.get("explicit_attention") == 2 and swaps.get("add_norm") == 4 and swaps.get("norm") == 1, swaps
    assert all("k^T * 0.3536" in s.what for s in tc.last_report().swaps if s.pattern == "explicit_attention")


def test_whisper_encoder_training_gradients():
    model = seeded(WhisperEncoder, train=True)
    mel = torch.randn(2, 8, 24, requires_grad=True)
    _, swaps = _run(model, mel, grad_of=[mel, *model.parameters()])
    assert swaps.get("explicit_attention") == 2, swaps


def test_whisper_encoder_dynamic_frames():
    """dynamic=True over batch sizes and frame counts (the conv's output length symbolic): eager's outputs."""
    model = seeded(WhisperEncoder, layers=1)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    with torch.no_grad():
        for b, t in ((2, 24), (3, 40)):
            mel = torch.randn(b, 8, t)
            _close(compiled(mel), model(mel), torch.float32, f"batch {b}, frames {t}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


@pytest.mark.parametrize("form", ["operands_scaled", "k_permuted", "both_and_output_scaled"])
def test_scales_on_the_products_operands_and_a_key_given_transposed(form):
    """softmax((q * a) @ (k^T * b) * c) @ v and q @ k.permute(0, 2, 3, 1) of a (B, N, H, D) k: one attention whose
    scale is a * b * c, forward and backward."""
    def f(q, k, v):
        kt = k.permute(0, 2, 3, 1) if form != "operands_scaled" else k.transpose(1, 2).transpose(-1, -2)
        if form == "k_permuted":
            s = q @ kt / math.sqrt(q.shape[-1])
        else:
            s = (q * 0.5) @ (kt * 0.25)
            s = s * 3.0 if form == "both_and_output_scaled" else s
        return torch.softmax(s, dim=-1) @ v

    torch.manual_seed(0)
    q, v = torch.randn(2, 3, 9, 16, requires_grad=True), torch.randn(2, 3, 11, 16, requires_grad=True)
    k = torch.randn(2, 11, 3, 16, requires_grad=True)                     # (B, Nk, H, D)
    _, swaps = _run(f, q, k, v, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps
    want = {"operands_scaled": 0.125, "k_permuted": 0.25, "both_and_output_scaled": 0.375}[form]
    assert f"k^T * {want:.4g})" in tc.last_report().swaps[0].what, str(tc.last_report())


def test_a_scaled_operand_read_elsewhere_is_kept():
    """q * 0.5 returned too: the product reads the scaled q as its q (the scale is not folded, the multiply stays)."""
    def f(q, k, v):
        qs = q * 0.5
        return torch.softmax(qs @ k.transpose(-1, -2), dim=-1) @ v, qs

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    _, swaps = _run(f, q, k, v)
    assert swaps == {"explicit_attention": 1} and "k^T * 1)" in tc.last_report().swaps[0].what, \
        str(tc.last_report())


def test_one_key_value_head_broadcast_by_the_products():
    """Multi-query attention with no expand: k (B, N, 1, D) permuted to (B, 1, D, N) and v (B, 1, N, D), which
    the two products broadcast over the 4 query heads. One attention (GQA of one group), forward and backward (it
    was declined: "4 query heads and 1 key/value heads without enable_gqa")."""
    def f(q, k, v):
        return torch.softmax(q @ k.permute(0, 2, 3, 1) * 0.25, dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(*s, requires_grad=True) for s in ((2, 4, 9, 16), (2, 11, 1, 16), (2, 1, 11, 16)))
    _, swaps = _run(f, q, k, v, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_a_key_scaled_in_place_is_read_as_written(check):
    """kt *= 0.25 on a clone of k^T: the written tensor is the rewrite's key (the scale is not folded into the
    kernel's, which with check=True failed its check: the check's original ran the write on the shared input)."""
    def f(q, k, v):
        kt = k.transpose(-1, -2).clone()
        kt *= 0.25
        return torch.softmax(q @ kt, dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    _, swaps = _run(f, q, k, v, check=check)
    assert swaps == {"explicit_attention": 1}, swaps


# ---- a decoder whose KV cache is written by index_copy_ --------------------------------------------------------------
def test_index_copy_cached_decoder_prefill_then_decode():
    """The cache written at the step's positions by index_copy_, the scores over the whole cache masked past the
    query's position, cross-attention through SDPA: outputs and caches as eager's at every step; the self- and
    cross-attention swapped in every graph (bf16: through Inductor, test_unseen_models_round4_quant_inductor.py)."""
    dtype = torch.float32
    eager, model = seeded(IndexCopyCachedDecoder, dtype=dtype), seeded(IndexCopyCachedDecoder, dtype=dtype)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    torch.manual_seed(1)
    enc = torch.randn(2, 7, 32, dtype=dtype)
    since = len(tc.reports())
    with torch.no_grad():
        for start, n in ((0, 6), (6, 1), (7, 3)):
            x, positions = torch.randn(2, n, 32, dtype=dtype), torch.arange(start, start + n)
            _close(compiled(x, enc, positions), eager(x, enc, positions), dtype, f"step at {start}")
            _close(model.cache_v, eager.cache_v, dtype, f"cache_v after the step at {start}")
    _swapped(since)
    assert all(r.swapped.get("explicit_attention") == 1 and r.swapped.get("sdpa") == 1
               for r in tc.reports()[since:]), [str(r) for r in tc.reports()[since:]]


# ---- ViT with qk-norm and LayerScale ------------------------------------------------------------------------------
@DTYPES
def test_qk_norm_vit(dtype):
    """LayerNorms over each head's 8 features (q_norm, k_norm) swapped as norms; the class token's concatenation
    plus positions is a broadcast add, declined for add_norm with the reason; LayerScale's gamma * x feeds the adds."""
    model = seeded(QKNormViT, dtype=dtype)
    images = torch.randn(2, 3, 16, 16, dtype=dtype)
    _one_graph(model, images)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, images, dtype=dtype)
    assert swaps.get("sdpa") == 2 and swaps.get("add_norm") == 4 and swaps.get("norm") == 5, swaps
    assert any("differing shapes" in why for why in _declined("add_norm", since))


def test_qk_norm_vit_training_gradients():
    model = seeded(QKNormViT, train=True)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    _, swaps = _run(model, images, grad_of=[images, *model.parameters()])
    assert swaps.get("sdpa") == 2 and swaps.get("norm") == 5, swaps


# ---- slot attention ------------------------------------------------------------------------------------------------
@DTYPES
def test_slot_attention_softmax_over_slots(dtype):
    """softmax(dim=-2) is neither attention nor the row-wise softmax kernel's: left, the report says so."""
    model = seeded(SlotAttentionStep, dtype=dtype)
    x = _inputs(dtype, n=12)
    _one_graph(model, x)
    with torch.no_grad():
        _, swaps = _run(model, x, dtype=dtype)
    assert swaps.get("norm") == 2 and "softmax" not in swaps and "explicit_attention" not in swaps, swaps
    assert "dim -2" in tc.last_report().left_why["Tensor.softmax"], str(tc.last_report())


# ---- BERT through SDPA ------------------------------------------------------------------------------------------
@DTYPES
def test_bert_sdpa_layer(dtype):
    model = seeded(BertSdpaLayer, dtype=dtype)
    x, mask = _inputs(dtype), _padding()
    _one_graph(model, x, mask)
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 2, swaps


def test_bert_sdpa_layer_training_with_dropout():
    """dropout_p = 0.1 in training: the SDPA is left to torch (the reason names the dropout), the norms swapped;
    the backward runs. With p = 0 in training mode the gradients are eager's."""
    model = seeded(BertSdpaLayer, train=True)
    x, mask = _inputs(torch.float32, requires_grad=True), _padding()
    since = len(tc.reports())
    tilestack.optimize(model, check=True, inner="aot_eager")(x, mask).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert "sdpa" not in _swapped(since) and any("dropout_p=0.1" in why for why in _declined("sdpa", since))
    torch._dynamo.reset()
    model.p = 0.0
    _, swaps = _run(model, x, mask, grad_of=[x, *model.parameters()])
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 2, swaps


# ---- norm spellings -------------------------------------------------------------------------------------------
@DTYPES
def test_norm_spellings(dtype):
    """Three RMSNorms written out (x / sqrt(mean(x * x) + eps), rsqrt in f32 cast back, x * rsqrt(mean(x ** 2) +
    eps)) swapped; F.normalize(x) * sqrt(d) * w, an L2 norm without eps, is not an RMSNorm and is left."""
    model = seeded(NormSpellings, dtype=dtype)
    x = _inputs(dtype)
    _one_graph(model, x)
    with torch.no_grad():
        _, swaps = _run(model, x, dtype=dtype)
    assert swaps.get("norm") == 3, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 8), swaps
    assert "normalize" in tc.last_report().left, str(tc.last_report())


def test_norm_spellings_training_gradients():
    model = seeded(NormSpellings, train=True)
    x = _inputs(torch.float32, requires_grad=True)
    _, swaps = _run(model, x, grad_of=[x, *model.parameters()])
    assert swaps.get("norm") == 3, swaps


def _rms_power(x, w):
    return x * (x.pow(2).mean(-1, keepdim=True) + 1e-5) ** -0.5 * w


def _rms_weight_first(x, w):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def _rms_weight_first_f32(x, w):
    h = x.float()
    return (w.float() * h * torch.pow(h.square().mean(-1, keepdim=True) + 1e-6, -0.5)).to(x.dtype)


@DTYPES
@pytest.mark.parametrize("fn", [_rms_power, _rms_weight_first, _rms_weight_first_f32],
                         ids=["power_-0.5", "weight_first", "weight_first_f32_power"])
def test_rms_norms_written_with_a_power_or_the_weight_first(fn, dtype):
    """(mean(x^2) + eps) ** -0.5 for the inverse RMS, and w * x * rsqrt(...) ((w * x) multiplied first): RMSNorms,
    forward and backward (they were left to the inner compiler, and the report gave no reason)."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32, dtype=dtype, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(32, dtype=dtype)).requires_grad_()
    _, swaps = _run(fn, x, w, dtype=dtype, grad_of=[x, w])
    assert swaps == {"norm": 1}, swaps


def _rms_weight_cast_last(x, w):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)


@DTYPES
def test_rms_norm_whose_weight_is_cast_to_f32(dtype):
    """(h * rsqrt(...) * w.float()).to(x.dtype): the weight's cast is the rewrite's weight, not one of x's casts
    to erase with the pattern (it was, and the rewrite read an erased node: KeyError inside the backend in f32)."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32, dtype=dtype, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(32, dtype=dtype)).requires_grad_()
    _, swaps = _run(_rms_weight_cast_last, x, w, dtype=dtype, grad_of=[x, w])
    assert swaps == {"norm": 1}, swaps
