"""The tilestack torch.compile backend on models it has never seen, round 3: Falcon, BLOOM, Gemma, DistilBERT, CLIP's
text encoder, Swin's window attention, an MLP-Mixer block and a Perceiver-style latent cross-attention, in f32,
bf16 and f16, and decoders that mutate buffers (unseen_blocks_round3.py). For each: the outputs (in training the
gradients) are eager's within the dtype's tolerance, one graph (no graph break), every swap made passed its check,
and what is left has a reason in the report (round 1's ``_run`` and ``_consistent``). On the CPU: the kernels
through the reference executor at tiny sizes (the size policy off), the rest through aot_eager."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run, _swapped  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from torch import nn
from unseen_blocks_round3 import (
    BloomBlock,
    CachedDecoder,
    CLIPTextLayer,
    DistilBertLayer,
    FalconBlock,
    GemmaModel,
    LatentCrossAttention,
    MemoryAttention,
    MixerBlock,
    SwinWindowAttention,
    seeded,
)

import tilestack
import tilestack.compile as tc

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}


@pytest.fixture(autouse=True)
def _f16_tolerance(monkeypatch):
    """Round 1's tolerances, and f16's (10 mantissa bits: between f32's and bf16's)."""
    import test_unseen_models_round1 as round1
    monkeypatch.setattr(round1, "TOL", TOL)


def _padding(b: int = 2, n: int = 10, left: int = 3):
    """attention_mask (b, n): the last sequence left-padded by ``left`` (its first query rows see no token)."""
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, :left] = 0
    return mask


def _inputs(dtype, b: int = 2, n: int = 10, d: int = 32, requires_grad: bool = False):
    torch.manual_seed(1)
    return torch.randn(b, n, d, dtype=dtype, requires_grad=requires_grad)


# ---- Falcon: scores /= sqrt(hd) in place, softmax(dtype=x.dtype), multi-query by expand ---------------------------
@DTYPES
def test_falcon_block(dtype):
    """The scores divided in place (``operator.itruediv``, which rebinds them) and softmax(dtype=) of the scores'
    own dtype: one attention (it was left to torch: neither form was read as attention), with the left-padded
    rows' finfo.min bias absorbed as eager's."""
    model = seeded(FalconBlock, dtype=dtype)
    x, mask = _inputs(dtype), _padding()
    _one_graph(model, x, mask)
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 1, swaps


def test_falcon_block_training_gradients():
    model = seeded(FalconBlock, train=True)
    x = _inputs(torch.float32, requires_grad=True)
    _, swaps = _run(model, x, _padding(), grad_of=[x, *model.parameters()])
    assert swaps.get("explicit_attention") == 1, swaps


def test_in_place_scale_read_elsewhere_is_not_taken():
    """``s /= c`` where the unscaled scores are also returned: the return sees the division (FX's node of s is
    the one written), so the scale cannot be folded into a rewrite that leaves s unwritten."""
    def f(q, k, v):
        s = q @ k.transpose(-1, -2)
        raw = s
        s /= 4.0
        return torch.softmax(s, -1) @ v, raw

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    _, swaps = _run(f, q, k, v)
    assert "explicit_attention" not in swaps, swaps


# ---- BLOOM: baddbmm with ALiBi, softmax(dtype=f32) ----------------------------------------------------------------
@DTYPES
def test_bloom_block(dtype):
    """The (B * H, N, N) baddbmm scores are not the kernel's 4-D attention; the softmax(dtype=f32) is taken alone in
    f32 (a no-op dtype) and declined in 16 bits (its f32 result), with the reason."""
    model = seeded(BloomBlock, dtype=dtype)
    x, mask = _inputs(dtype), _padding()
    _one_graph(model, x, mask)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("add_norm") == 1 and swaps.get("norm") == 1 and "explicit_attention" not in swaps, swaps
    if dtype == torch.float32:
        assert swaps.get("softmax") == 1, swaps
    else:
        assert "softmax" not in swaps and any("dtype=torch.float32" in why for why in _declined("softmax", since))


# ---- Gemma: 0-d normalizer, RMSNorm with (1 + w) in f32, GQA by repeat_interleave, GeGLU -----------------------------
@DTYPES
def test_gemma_model(dtype):
    model = seeded(GemmaModel, dtype=dtype)
    ids, mask = torch.randint(0, 64, (2, 10)), _padding()
    _one_graph(model, ids, mask)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, ids, mask, dtype=dtype)
    # the RMSNorms: (1 + w) the weight, the product in f32 cast back once (as the kernel rounds); in 16 bits they
    # were left ("a result of f32 from x of bf16": the cast back was not seen)
    assert swaps.get("explicit_attention") == 2 and swaps.get("norm") == 5, swaps
    assert not _declined("norm", since), _declined("norm", since)


def test_gemma_model_training_gradients():
    model = seeded(GemmaModel, train=True)
    ids, mask = torch.randint(0, 64, (2, 10)), _padding()
    _, swaps = _run(model, ids, mask, grad_of=list(model.parameters()))
    assert swaps.get("explicit_attention") == 2 and swaps.get("norm") == 5, swaps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_gemma_rms_norm_16_bit_training_gradients(dtype):
    from unseen_blocks_round3 import GemmaRMSNorm

    norm = seeded(GemmaRMSNorm, 32, dtype=dtype, train=True)
    x = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    _, swaps = _run(norm, x, dtype=dtype, grad_of=[x, norm.weight])
    assert swaps == {"norm": 1}, swaps


# ---- DistilBERT: masked_fill(mask, torch.tensor(finfo.min)) ----------------------------------------------------------
@DTYPES
def test_distilbert_layer(dtype):
    """The fill a 0-d tensor the graph makes (``torch.tensor(finfo.min)``): one attention (it was left to torch), a
    padded batch's keys masked."""
    model = seeded(DistilBertLayer, dtype=dtype)
    x = _inputs(dtype)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    _one_graph(model, x, mask)
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("add_norm") == 2, swaps


def test_distilbert_layer_training_gradients():
    model = seeded(DistilBertLayer, train=True)
    model.dropout.p = 0.0                                  # train mode, deterministic
    x = _inputs(torch.float32, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    _, swaps = _run(model, x, mask, grad_of=[x, *model.parameters()])
    assert swaps.get("explicit_attention") == 1 and swaps.get("add_norm") == 2, swaps


def test_hf_gpt2_where_with_a_0d_mask_value_forward_and_backward():
    """Hugging Face's GPT-2 of 2023: ``mask_value = torch.full([], finfo.min, dtype=...)``, ``torch.where(causal, w,
    mask_value)``, the scores divided by a 0-d ``torch.full`` too."""
    def f(q, k, v):
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        n = q.size(-2)
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype)
        w = torch.softmax(torch.where(causal, w.to(w.dtype), mask_value), dim=-1)
        return torch.matmul(w.type(v.dtype), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
    _, swaps = _run(f, q, k, v, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps


# ---- CLIP text encoder, Swin: attention the passes do not take; the softmax alone ------------------------------------
@DTYPES
def test_clip_text_layer(dtype):
    """(B * H, N, hd) bmm products and two masks added in turn: not the kernel's attention; the softmax is taken."""
    model = seeded(CLIPTextLayer, dtype=dtype)
    x = _inputs(dtype)
    low = torch.finfo(dtype).min
    causal = torch.zeros(10, 10, dtype=dtype).masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), low)
    causal = causal[None, None].expand(2, 1, 10, 10)
    padding = torch.zeros(2, 1, 10, 10, dtype=dtype)
    padding[1, ..., 7:] = low
    _one_graph(model, x, causal, padding)
    with torch.no_grad():
        _, swaps = _run(model, x, causal, padding, dtype=dtype)
    assert swaps.get("softmax") == 1 and swaps.get("add_norm") == 1 and swaps.get("norm") == 1, swaps
    assert "explicit_attention" not in swaps, swaps


@DTYPES
def test_swin_window_attention(dtype):
    model = seeded(SwinWindowAttention, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(8, 9, 32, dtype=dtype)                       # 2 images x 4 windows of 3 x 3
    mask = torch.zeros(4, 9, 9, dtype=dtype)
    mask[1:, :, 4:] = -100.0                                     # the shifted windows' mask
    _one_graph(model, x, mask)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps == {"softmax": 1}, swaps
    assert any("one mask at most" in why for why in _declined("explicit_attention", since))


def test_swin_window_attention_training_gradients():
    model = seeded(SwinWindowAttention, train=True)
    x = torch.randn(8, 9, 32, requires_grad=True)
    mask = torch.zeros(4, 9, 9)
    mask[1:, :, 4:] = -100.0
    _, swaps = _run(model, x, mask, grad_of=[x, *model.parameters()])
    assert swaps == {"softmax": 1}, swaps


# ---- MLP-Mixer ----------------------------------------------------------------------------------------------------
@DTYPES
def test_mixer_block(dtype):
    """The token MLP's Linear reads a transposed (B, C, N) input; in 16 bits its GELU, the channel MLP's GELU and
    its residual are fused into the GEMMs."""
    model = seeded(MixerBlock, dtype=dtype)
    x = _inputs(dtype, n=12)
    _one_graph(model, x)
    with torch.no_grad():
        _, swaps = _run(model, x, dtype=dtype)
    assert swaps.get("add_norm") == 1 and swaps.get("norm") == 1, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 3), swaps


def test_mixer_block_dynamic_batch_and_tokens_in_one_graph():
    """dynamic=True over several batch sizes; the token count is the token MLP's Linear's in-features, so it
    stays 12. The first call compiles two graphs, as it does with aot_eager alone (Dynamo's first trace reads the
    LayerNorms' eps as a graph input, then specializes it); no later batch size compiles another."""
    model = seeded(MixerBlock, dtype=torch.bfloat16)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    since = len(tc.reports())
    graphs = []
    with torch.no_grad():
        for b in (2, 5, 3):
            x = torch.randn(b, 12, 32, dtype=torch.bfloat16)
            _close(compiled(x), model(x), torch.bfloat16, f"batch {b}")
            graphs.append(len(tc.reports()) - since)
    assert graphs == [graphs[0]] * 3 and graphs[0] <= 2, graphs
    last = tc.last_report()
    assert last.swapped == {"linear_epilogue": 3, "add_norm": 1, "norm": 1}, str(last)


# ---- a diffusion transformer block ------------------------------------------------------------------------------
@DTYPES
def test_dit_block(dtype):
    """Modulated LayerNorms without affine parameters (the kernel's ones and zeros), the first fused with the
    gated residual add before it."""
    from unseen_blocks_round3 import DiTBlock

    model = seeded(DiTBlock, dtype=dtype)
    x, c = _inputs(dtype, n=16), torch.randn(2, 32, dtype=dtype)
    _one_graph(model, x, c)
    with torch.no_grad():
        _, swaps = _run(model, x, c, dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 1 and swaps.get("norm") == 1, swaps


def test_dit_block_training_gradients():
    from unseen_blocks_round3 import DiTBlock

    model = seeded(DiTBlock, train=True)
    x, c = _inputs(torch.float32, n=16, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    _, swaps = _run(model, x, c, grad_of=[x, c, *model.parameters()])
    assert swaps.get("sdpa") == 1 and swaps.get("add_norm") == 1, swaps


# ---- Perceiver-style latent cross-attention -------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("all_padding", [False, True], ids=["padded", "one_input_all_padding"])
def test_latent_cross_attention(dtype, all_padding):
    """6 latent queries against 13 inputs (GQA by repeat_interleave, a key-padding bias (1 - mask) * finfo.min).
    With an input all padding every latent's row is masked whole: eager's scores + bias, added in the model's
    dtype, round to the bias and its softmax is uniform. In f16 (finfo.min = -65504) the rewrite gave those rows
    softmax(s) (the kernel adds in f32, where -65504 swallows nothing): 0.98 off."""
    model = seeded(LatentCrossAttention, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 13, 32, dtype=dtype)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, 9:] = 0
    if all_padding:
        mask[1] = 0
    _one_graph(model, x, mask)
    with torch.no_grad():
        _, swaps = _run(model, x, mask, dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("sdpa") == 1 and swaps.get("norm") == 2, swaps


def test_latent_cross_attention_training_gradients_with_an_input_all_padding():
    """The latents' rows masked whole by finfo.min: eager's uniform softmax, whose gradients reach q and k too."""
    model = seeded(LatentCrossAttention, train=True)
    x = torch.randn(2, 13, 32, requires_grad=True)
    mask = torch.ones(2, 13)
    mask[0, 9:] = 0
    mask[1] = 0
    _, swaps = _run(model, x, mask, grad_of=[x, *model.parameters()])
    assert swaps.get("explicit_attention") == 1 and swaps.get("sdpa") == 1, swaps


@pytest.mark.parametrize("dtype,low", [(torch.float16, -65504.0), (torch.float16, -40000.0),
                                       (torch.bfloat16, -1e4), (torch.bfloat16, -3.3e38)],
                         ids=["f16_min", "f16_-4e4", "bf16_-1e4", "bf16_min"])
def test_rows_masked_whole_by_a_16_bit_bias_forward_and_backward(dtype, low):
    """(1 - mask) * low added to 16-bit scores, one sequence's keys all masked: eager's add rounds every score to
    the bias (half its ulp is 16 or more), so its softmax is uniform. BERT-style -1e4 in bf16 and f16's finfo.min
    were not taken for such a bias (the bound was -1e9, an f32 one) and the rows came out as softmax(s)."""
    def f(q, k, v, mask):
        bias = (1.0 - mask[:, None, None, :].to(q.dtype)) * low
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 4.0 + bias, dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9)
    mask[1] = 0
    _, swaps = _run(f, q, k, v, mask, dtype=dtype, grad_of=[q, k, v])
    assert swaps == {"explicit_attention": 1}, swaps


def test_a_16_bit_bias_added_in_f32_is_not_absorbing():
    """The same f16 bias added to scores cast to f32 first: f32 keeps the scores under -65504, eager's softmax is
    softmax(s) there, and so is the rewrite's."""
    def f(q, k, v, mask):
        bias = (1.0 - mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        s = torch.matmul(q, k.transpose(-1, -2)).float() / 4.0 + bias
        return torch.softmax(s, dim=-1).to(v.dtype) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.float16) for _ in range(3))
    mask = torch.ones(2, 9)
    mask[1] = 0
    want = f(q, k, v, mask)
    assert not torch.allclose(want[1], v[1].float().mean(-2, keepdim=True).half().expand_as(want[1]), atol=1e-2)
    _, swaps = _run(f, q, k, v, mask, dtype=torch.float16)
    assert swaps == {"explicit_attention": 1}, swaps


# ---- decoders that mutate buffers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cached_decoder_prefill_then_decode(dtype):
    """A prefill of 6 tokens, then one-token steps and a 3-token chunk through the static KV cache: each output and
    every buffer (the caches, the step count, the EMA) as the eager twin's after every call."""
    eager, model = seeded(CachedDecoder, dtype=dtype), seeded(CachedDecoder, dtype=dtype)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    since = len(tc.reports())
    torch.manual_seed(1)
    with torch.no_grad():
        for start, n in ((0, 6), (6, 1), (7, 1), (8, 3)):
            x = torch.randn(2, n, 32, dtype=dtype)
            _close(compiled(x, start), eager(x, start), dtype, f"step at {start}")
            for name, buf in eager.named_buffers():
                _close(dict(model.named_buffers())[name], buf, dtype, f"{name} after the step at {start}")
    _swapped(since)                  # every report consistent
    graphs = tc.reports()[since:]    # the start, then the lengths, made symbolic by automatic dynamic shapes
    assert all(r.swapped.get("explicit_attention") == 1 for r in graphs), [str(r) for r in graphs]


def test_cached_decoder_through_inductor():
    """The same prefill and decode steps with Inductor as the inner compiler (the custom ops as its fallbacks, the
    buffers written by its functionalized graph)."""
    eager, model = seeded(CachedDecoder, dtype=torch.bfloat16), seeded(CachedDecoder, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="tilestack", options={"check": True})
    torch.manual_seed(1)
    with torch.no_grad():
        for start, n in ((0, 6), (6, 1)):
            x = torch.randn(2, n, 32, dtype=torch.bfloat16)
            _close(compiled(x, start), eager(x, start), torch.bfloat16, f"step at {start}")
            for name, buf in eager.named_buffers():
                _close(dict(model.named_buffers())[name], buf, torch.bfloat16, f"{name} after the step at {start}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


def test_memory_written_between_the_scores_and_the_values():
    """The memory buffer is written in place (lerp_) after the scores read its keys (a view, memory[0]) and before
    the probabilities read its values (memory[1]). The rewrite computes the attention at the product with the
    values, where the keys are the written ones: 0.77 off. A write to the tensor a view was taken from (or to a
    sibling view) now counts as a write to the view."""
    eager, model = seeded(MemoryAttention), seeded(MemoryAttention)
    x = torch.randn(2, 5, 16)
    since = len(tc.reports())
    with torch.no_grad():
        _close(tilestack.optimize(model, check=True, inner="aot_eager")(x), eager(x), torch.float32, "output")
    _close(model.memory, eager.memory, torch.float32, "memory")
    assert "explicit_attention" not in _swapped(since), _swapped(since)
    assert any("in place" in why for why in _declined("explicit_attention", since)), str(tc.last_report())


def test_memory_written_before_the_scores_is_read_as_written():
    """The same model with the write before the scores: nothing written inside the pattern, so the attention is
    taken and reads the written memory, as eager."""
    class Before(MemoryAttention):
        def forward(self, x):
            b, n, d = x.shape
            new = self.kv(x).view(b, n, 2, self.h, self.hd).permute(2, 0, 3, 1, 4).mean(3, keepdim=True)
            self.memory.lerp_(new.expand_as(self.memory), 0.5)
            q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)
            s = q @ self.memory[0].transpose(-1, -2) / self.hd ** 0.5
            return torch.softmax(s, dim=-1) @ self.memory[1]

    eager, model = seeded(Before), seeded(Before)
    x = torch.randn(2, 5, 16)
    since = len(tc.reports())
    with torch.no_grad():
        _close(tilestack.optimize(model, check=True, inner="aot_eager")(x), eager(x), torch.float32, "output")
    _close(model.memory, eager.memory, torch.float32, "memory")
    assert _swapped(since) == {"explicit_attention": 1}, _swapped(since)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_complex_rotary_decoder_prefill_then_decode(dtype):
    """Complex rotary phases, caches reassigned with .to(q) and written by slices, an hstack-ed -inf mask for a
    chunk and none for one token: outputs and caches as eager's, one attention and three RMSNorms each call."""
    from unseen_blocks_round3 import ComplexRotaryDecoder

    eager, model = seeded(ComplexRotaryDecoder, dtype=dtype), seeded(ComplexRotaryDecoder, dtype=dtype)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    since = len(tc.reports())
    torch.manual_seed(1)
    with torch.no_grad():
        for start, n in ((0, 6), (6, 1), (7, 3)):
            ids = torch.randint(0, 64, (2, n))
            _close(compiled(ids, start), eager(ids, start), dtype, f"step at {start}")
            _close(model.cache_k, eager.cache_k, dtype, f"cache_k after the step at {start}")
    _swapped(since)
    assert all(r.swapped.get("explicit_attention") == 1 and r.swapped.get("norm") == 3
               for r in tc.reports()[since:]), [str(r) for r in tc.reports()[since:]]


def test_constants_made_before_a_cache_write_do_not_widen_the_pattern():
    """Hugging Face's GPT-2 constants (the 0-d scale and mask value, torch.full) made at the top of forward, before
    the cache is written: the pattern's nodes then spanned the write to the cache its keys are a view of, and the
    attention was declined ("writes ... in place between the pattern's nodes"). A constant the rewrite inlines
    reads nothing; the window starts at the pattern's first node that reads a tensor."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(2, 3, 12, 16))

        def forward(self, q, k, v):
            scale = torch.full([], 4.0, dtype=q.dtype)
            mask_value = torch.full([], torch.finfo(q.dtype).min, dtype=q.dtype)
            n = q.shape[-2]
            self.k_cache[:, :, :n] = k
            w = torch.matmul(q, self.k_cache[:, :, :n].transpose(-1, -2)) / scale
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            return torch.softmax(torch.where(causal, w, mask_value), dim=-1) @ v

    eager, model = seeded(Cached), seeded(Cached)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    since = len(tc.reports())
    with torch.no_grad():
        _close(tilestack.optimize(model, check=True, inner="aot_eager")(q, k, v), eager(q, k, v), torch.float32, "")
    _close(model.k_cache, eager.k_cache, torch.float32, "k_cache")
    assert _swapped(since) == {"explicit_attention": 1}, str(tc.last_report())


@pytest.mark.parametrize("which", ["scale", "fill"])
def test_a_constant_written_in_place_before_the_pattern_is_not_inlined(which):
    """A 0-d scale or mask value filled in place after it was made: the rewrite inlined the value it was made with
    (the scale: 4 where the graph divides by 2, silently without check=True)."""
    def f(q, k, v):
        scale = torch.full([], 4.0, dtype=q.dtype)
        mask_value = torch.full([], torch.finfo(q.dtype).min, dtype=q.dtype)
        (scale if which == "scale" else mask_value).fill_(2.0 if which == "scale" else -1.0)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        fill = mask_value if which == "fill" else float("-inf")
        return torch.softmax(torch.where(causal, (q @ k.transpose(-1, -2)) / scale, fill), dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    _, swaps = _run(f, q, k, v, check=False)
    assert "explicit_attention" not in swaps, swaps
