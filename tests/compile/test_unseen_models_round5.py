"""The tilestack torch.compile backend on models it has never seen, round 5 (unseen_blocks_round5.py): Phi (parallel
attention and MLP, partial rotary, q and k cast up), OLMo / StableLM (LayerNorm without parameters, qkv clamped in
place), a Mixtral-style sparse MoE (dense and looped dispatch), RetNet's retention (no softmax), Gemma-2 (soft-capped
logits, a sliding window), attention sinks, cross-attention with a bool key padding mask, a perceiver resampler, a
Conformer block (GLU, BatchNorm), MaskFormer's masked attention, a ViT with registers, F.multi_head_attention_forward
called directly, and a BERT-style layer in older code's forms. For each: one graph (no graph break), the outputs
(in training the gradients) eager's within the dtype's tolerance, every swap made passed its check, and what is left
has a reason (round 1's ``_run``). On the CPU: the kernels through the reference executor at tiny sizes (the size
policy off), the rest through aot_eager; Inductor (with its modes) where a test says so."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run, _swapped  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from unseen_blocks_round5 import (
    ConformerBlock,
    FunctionalMHAEncoder,
    Gemma2Attention,
    MaskedAttentionDecoderLayer,
    MoEBlock,
    OldStyleSelfAttention,
    OLMoBlock,
    PaddedCrossAttention,
    PerceiverResampler,
    PhiBlock,
    RegisterViT,
    RetNetBlock,
    SinkAttention,
    seeded,
)

import tilestack
import tilestack.compile as tc

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
BF16 = torch.bfloat16


def _x(dtype=torch.float32, b: int = 2, n: int = 10, d: int = 32, requires_grad: bool = False):
    torch.manual_seed(1)
    return torch.randn(b, n, d, dtype=dtype, requires_grad=requires_grad)


def _padding(b: int = 2, n: int = 10):
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, 7:] = 0
    return mask


def _key_padding(b: int = 2, n: int = 7):
    """(B, Nk) bool, True = a padded key: the last sequence's last two."""
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[-1, -2:] = True
    return pad


def _eval(model, *args, dtype):
    _one_graph(model, *args)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, *args, dtype=dtype)
    return swaps, since


def _train(cls, *args, **kwargs):
    model = seeded(cls, train=True, **kwargs)
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    _, swaps = _run(model, *args, grad_of=[*floats, *(p for p in model.parameters() if p.requires_grad)])
    return swaps


# ---- Phi -----------------------------------------------------------------------------------------------------------
@DTYPES
def test_phi_block(dtype):
    """The shared LayerNorm swapped; in f32 the attention too. In bf16 q and k are read uncast, but the causal bias
    is f32 (added to the f32 scores), which the kernels take in the inputs' dtype only: left with that reason."""
    swaps, since = _eval(seeded(PhiBlock, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("norm") == 1, swaps
    if dtype == torch.float32:
        assert swaps.get("explicit_attention") == 1, swaps
    else:
        assert "explicit_attention" not in swaps and swaps.get("linear_epilogue") == 2, swaps
        assert any("attn_mask of dtype torch.float32 with torch.bfloat16" in w
                   for w in _declined("explicit_attention", since))


def test_phi_block_training_gradients():
    swaps = _train(PhiBlock, _x(requires_grad=True))
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 1, swaps


# ---- OLMo / StableLM -----------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("affine", [False, True], ids=["olmo_no_params", "stablelm_weight_only"])
def test_olmo_block(dtype, affine):
    """LayerNorm(elementwise_affine=False or weight only, bias=False): the residual's add + norm and the first norm
    swapped (the kernels given ones and zeros); qkv.clamp_ in place before the split; SDPA causal."""
    swaps, _ = _eval(seeded(OLMoBlock, affine=affine, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 1 and swaps.get("norm") == 1, swaps


def test_olmo_block_training_gradients():
    swaps = _train(OLMoBlock, _x(requires_grad=True), affine=True)
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 1, swaps


# ---- Mixtral-style sparse MoE -----------------------------------------------------------------------------------
@DTYPES
def test_moe_block_dense_dispatch(dtype):
    """Attention (softmax(dtype=f32) cast back), two RMSNorms written out, the router's softmax over dim=1 of
    (T, E) (f32: swapped as a row softmax; bf16 with dtype=float: left, the reason given), top-2, router logits
    returned too."""
    swaps, since = _eval(seeded(MoEBlock, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 2, swaps
    if dtype == torch.float32:
        assert swaps.get("softmax") == 1, swaps
    else:
        assert "softmax" not in swaps and any("dtype=torch.float32" in w for w in _declined("softmax", since))


def test_moe_block_looped_dispatch_breaks_only_where_dynamo_does():
    """Hugging Face's loop: torch.where(expert_mask[i]) has a data-dependent size, so Dynamo splits the graph there
    (its own breaks, no backend involved); the compiled model still gives eager's outputs."""
    model = seeded(MoEBlock, dispatch="loop")
    explained = torch._dynamo.explain(model)(_x())
    assert explained.graph_break_count > 0
    assert not any("tilestack" in str(r.reason) for r in explained.break_reasons)
    torch._dynamo.reset()
    with torch.no_grad():
        _, swaps = _run(model, _x())
    assert swaps.get("explicit_attention") == 1, swaps


def test_moe_block_training_gradients():
    swaps = _train(MoEBlock, _x(requires_grad=True))
    assert swaps.get("explicit_attention") == 1 and swaps.get("softmax") == 1, swaps


# ---- RetNet ----------------------------------------------------------------------------------------------------
@DTYPES
def test_retnet_block_has_no_attention_to_swap(dtype):
    """(q k^T * decay) v: no softmax, so no attention swap (a wrong one would be a silent wrong answer)."""
    swaps, _ = _eval(seeded(RetNetBlock, dtype=dtype), _x(dtype), dtype=dtype)
    assert "explicit_attention" not in swaps and "softmax" not in swaps and swaps.get("norm") == 1, swaps


def test_retnet_block_training_gradients():
    swaps = _train(RetNetBlock, _x(requires_grad=True))
    assert "explicit_attention" not in swaps, swaps


# ---- Gemma-2 ---------------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("window", [None, 4], ids=["global", "sliding"])
def test_gemma2_soft_capped_attention_is_left(dtype, window):
    """tanh(s / c) * c between the scores and the mask: not q @ k^T times constants, so the attention is left with
    the reason; the final logit cap is left to the inner compiler too."""
    swaps, since = _eval(seeded(Gemma2Attention, window=window, dtype=dtype), _x(dtype), dtype=dtype)
    assert "explicit_attention" not in swaps and swaps.get("norm") == 1, swaps
    assert any("not a 4-D q @ k^T times constants" in w for w in _declined("explicit_attention", since))


def test_gemma2_training_gradients():
    swaps = _train(Gemma2Attention, _x(requires_grad=True), window=4)
    assert "explicit_attention" not in swaps, swaps


# ---- attention sinks ---------------------------------------------------------------------------------------------
@DTYPES
def test_sink_attention(dtype):
    """The sink logit joins the row, the max is subtracted, its column dropped after the softmax: no attention swap
    (the kernel's softmax would leave out the sink's share); the row softmax over N + 1 may be swapped alone."""
    swaps, _ = _eval(seeded(SinkAttention, dtype=dtype), _x(dtype), dtype=dtype)
    assert "explicit_attention" not in swaps and swaps.get("softmax") == 1, swaps


def test_sink_attention_training_gradients_reach_the_sinks():
    model = seeded(SinkAttention, train=True)
    x = _x(requires_grad=True)
    _, swaps = _run(model, x, grad_of=[x, model.sinks, *model.qkv.parameters()])
    assert swaps == {"softmax": 1}, swaps


# ---- cross-attention with a bool key padding mask ------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("fill", ["-inf", "min", "sdpa"])
def test_cross_attention_with_a_bool_key_padding_mask(dtype, fill):
    """masked_fill(pad[:, None, None, :], -inf or finfo.min) or SDPA's attn_mask=~pad: one attention, 10 queries
    over 7 keys."""
    model = seeded(PaddedCrossAttention, fill=fill, dtype=dtype)
    swaps, _ = _eval(model, _x(dtype), _x(dtype, n=7, d=24), _key_padding(), dtype=dtype)
    assert swaps.get("sdpa" if fill == "sdpa" else "explicit_attention") == 1 and swaps.get("norm") == 1, swaps


@pytest.mark.parametrize("fill", ["-inf", "min", "sdpa"])
def test_cross_attention_with_a_bool_key_padding_mask_training(fill):
    swaps = _train(PaddedCrossAttention, _x(requires_grad=True), _x(n=7, d=24, requires_grad=True), _key_padding(),
                   fill=fill)
    assert swaps.get("sdpa" if fill == "sdpa" else "explicit_attention") == 1, swaps


def test_cross_attention_dynamic_lengths():
    """dynamic=True over batch, query and key lengths (the padding where it falls): eager's outputs each time."""
    model = seeded(PaddedCrossAttention)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    with torch.no_grad():
        for b, n, m in ((2, 10, 7), (3, 5, 9), (4, 12, 6)):
            args = (torch.randn(b, n, 32), torch.randn(b, m, 24), _key_padding(b, m))
            _close(compiled(*args), model(*args), torch.float32, f"batch {b}, queries {n}, keys {m}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


# ---- perceiver resampler ------------------------------------------------------------------------------------------
@DTYPES
def test_perceiver_resampler(dtype):
    """sim - sim.amax(-1).detach() before the softmax is not q @ k^T times constants: the attention is left (its
    softmax swapped alone); the latents' and media's LayerNorms and the residual adds + norms swapped."""
    swaps, _ = _eval(seeded(PerceiverResampler, dtype=dtype), _x(dtype, n=12), dtype=dtype)
    assert "explicit_attention" not in swaps and swaps.get("softmax") == 2, swaps
    assert swaps.get("add_norm") == 4 and swaps.get("norm") == 3, swaps


def test_perceiver_resampler_training_gradients():
    swaps = _train(PerceiverResampler, _x(n=12, requires_grad=True))
    assert swaps.get("softmax") == 2, swaps


# ---- Conformer ---------------------------------------------------------------------------------------------------
@DTYPES
def test_conformer_block(dtype):
    """GLU over channels, a depthwise conv and BatchNorm (eval: running statistics) left to the inner compiler."""
    swaps, _ = _eval(seeded(ConformerBlock, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 4 and swaps.get("norm") == 1, swaps


def test_conformer_block_training_updates_batch_norm_as_eager():
    """In training BatchNorm uses the batch's statistics and updates its running ones in the graph: the gradients
    and the running mean after the call are eager's."""
    eager, model = seeded(ConformerBlock, train=True), seeded(ConformerBlock, train=True)
    x = _x(requires_grad=True)
    want = eager(x)
    got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
    _close(got, want, torch.float32, "output")
    gw = torch.autograd.grad(want.sum(), [x, *eager.parameters()])
    gg = torch.autograd.grad(got.sum(), [x, *model.parameters()])
    for i, (g, w) in enumerate(zip(gg, gw, strict=True)):
        _close(g, w, torch.float32, f"grad {i}")
    _close(model.batch_norm.running_mean, eager.batch_norm.running_mean, torch.float32, "running mean")
    assert tc.last_report().swapped.get("sdpa") == 1, str(tc.last_report())


# ---- MaskFormer masked attention ---------------------------------------------------------------------------------
@DTYPES
def test_masked_attention_decoder_layer(dtype):
    """The predicted masks' -inf fill on the cross-attention's scores, every row left at least one pixel: the
    cross-attention swapped (no NaN row anywhere), the self-attention through SDPA, the mask logits returned."""
    model = seeded(MaskedAttentionDecoderLayer, dtype=dtype)
    swaps, _ = _eval(model, _x(dtype, n=6), _x(dtype, n=20), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("sdpa") == 1 and swaps.get("add_norm") == 3, swaps


def test_masked_attention_decoder_layer_training_gradients():
    swaps = _train(MaskedAttentionDecoderLayer, _x(n=6, requires_grad=True), _x(n=20, requires_grad=True))
    assert swaps.get("explicit_attention") == 1, swaps


# ---- ViT with registers ----------------------------------------------------------------------------------------
@DTYPES
def test_vit_with_registers(dtype):
    """nn.MultiheadAttention (need_weights=False) is kept whole by Dynamo: left with the reason; the norms swapped;
    the class token and the patches returned without the registers."""
    swaps, _ = _eval(seeded(RegisterViT, dtype=dtype), torch.randn(2, 3, 16, 16, dtype=dtype), dtype=dtype)
    assert swaps.get("add_norm") == 4 and swaps.get("norm") == 1, swaps
    assert "multi_head_attention_forward" in tc.last_report().left_why, str(tc.last_report())


def test_vit_with_registers_training_gradients():
    swaps = _train(RegisterViT, torch.randn(2, 3, 16, 16, requires_grad=True))
    assert swaps.get("add_norm") == 4, swaps


# ---- F.multi_head_attention_forward called directly -------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_functional_multi_head_attention_encoder(dtype, need_weights):
    model = seeded(FunctionalMHAEncoder, need_weights=need_weights, dtype=dtype)
    swaps, _ = _eval(model, _x(dtype), _padding() == 0, dtype=dtype)
    assert swaps.get("add_norm") == 2, swaps
    assert "multi_head_attention_forward" in tc.last_report().left_why, str(tc.last_report())


def test_functional_multi_head_attention_encoder_training_gradients():
    swaps = _train(FunctionalMHAEncoder, _x(requires_grad=True), _padding() == 0)
    assert swaps.get("add_norm") == 2, swaps


# ---- BERT-style layer in older code's forms ------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("form", ["div_tensor", "einsum", "baddbmm"])
def test_old_style_self_attention(dtype, form):
    """Scores divided by sqrt(torch.tensor(hd)) (folded into the kernel's scale) or by einsum: one attention; by
    torch.baddbmm: left (its softmax swapped alone). A mask made under torch.no_grad(), .float().softmax().type_as,
    in-place residual adds (h += x; out.add_(h)) read as written."""
    swaps, _ = _eval(seeded(OldStyleSelfAttention, form=form, dtype=dtype), _x(dtype), _padding(), dtype=dtype)
    assert swaps.get("norm") == 2, swaps
    if form == "baddbmm":
        assert "explicit_attention" not in swaps and swaps.get("softmax") == 1, swaps
    else:
        assert swaps.get("explicit_attention") == 1, swaps


@DTYPES
def test_old_style_self_attention_returning_the_probabilities(dtype):
    """output_attentions: the probabilities are read outside the attention, which is left with the reason."""
    model = seeded(OldStyleSelfAttention, output_attentions=True, dtype=dtype)
    swaps, since = _eval(model, _x(dtype), _padding(), dtype=dtype)
    assert "explicit_attention" not in swaps, swaps
    assert any("compute the attention twice" in w for w in _declined("explicit_attention", since))


@pytest.mark.parametrize("form", ["div_tensor", "einsum"])
def test_old_style_self_attention_training_without_dropout(form):
    swaps = _train(OldStyleSelfAttention, _x(requires_grad=True), _padding(), form=form, p=0.0)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 2, swaps


def test_old_style_self_attention_training_with_dropout_on_the_probabilities():
    """p = 0.1 in training: the attention is left (the kernels fuse no dropout), the reason given; the backward runs
    and is finite. Eager's dropout mask is another draw, so the values are not compared."""
    model = seeded(OldStyleSelfAttention, form="einsum", train=True)
    x = _x(requires_grad=True)
    since = len(tc.reports())
    out = tilestack.optimize(model, check=True, inner="aot_eager")(x, _padding())
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert "explicit_attention" not in _swapped(since)
    assert any("dropout on the probabilities" in w for w in _declined("explicit_attention", since))
