"""SDPA parity, round one, part three: ``tilestack.patch(model)`` on models that call torch's SDPA, on the CPU
backends. The patched model's outputs and the gradients of its parameters and inputs equal the unpatched model's
(float32, to f32 rounding) while tilestack's kernels actually run (counted); patching twice is patching once;
``undo()`` (and leaving a ``with`` block) puts torch's function back.

Models: a module calling ``F.scaled_dot_product_attention`` and one calling a name bound at import,
``nn.MultiheadAttention`` (batch_first both ways, need_weights True (torch's own softmax path, which calls no SDPA)
and False, key padding with a causal mask, kdim/vdim), ``nn.TransformerEncoderLayer`` (train and eval, norm first)
and ``nn.TransformerDecoderLayer``, a minimal Hugging Face-style attention (GQA through enable_gqa, an additive
padding mask in q's dtype, scaling), and Hugging Face's Llama with ``attn_implementation="sdpa"`` where transformers
is importable (skipped otherwise).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_at_import

import tilestack
from tilestack import config
from tilestack.torch import sdpa as sdpa_module

E = 32


def seeded(seed: int):
    return torch.Generator().manual_seed(seed)


def randn(seed, *shape):
    return torch.randn(shape, generator=seeded(seed))


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many calls reached tilestack's kernels (not torch's function)."""
    calls = []
    real = sdpa_module.attention
    monkeypatch.setattr(sdpa_module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def step(model, inputs, train: bool):
    """(output, [grads of the parameters and of the float inputs]) of a loss on the model's output."""
    model.train(train)
    model.zero_grad()
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(0)
    out = model(*leaves)
    o = out[0] if isinstance(out, tuple) else out
    # a fixed random weighting (sum(o ** 2) of a post-norm layer is a constant: its gradients are rounding noise)
    (o.float() * torch.randn(o.shape, generator=seeded(5))).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    grads += [x.grad for x in leaves if x.grad is not None]
    return out, grads


def rel(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def check_patched_matches(model, inputs, train=False, kernel_calls=None, want_calls=1, math_truth=False):
    """``math_truth``: torch's answer from its math backend (a row whose keys all carry finfo.min: the CPU flash
    kernel's lse absorbs log l, so its backward takes each key's P as 1; the math backend and tilestack 1 / l)."""
    if math_truth:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            want, want_grads = step(model, inputs, train)
    else:
        want, want_grads = step(model, inputs, train)
    if kernel_calls is not None:
        kernel_calls.clear()
    with config.override(backend="reference"), tilestack.patch(model):
        assert F.scaled_dot_product_attention is tilestack.scaled_dot_product_attention
        got, got_grads = step(model, inputs, train)
    assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa          # undone at the end of the block
    if kernel_calls is not None:
        assert len(kernel_calls) == want_calls
    outs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
    for a, b in outs:
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and rel(a, b) <= 2e-5
    assert len(got_grads) == len(want_grads) and len(want_grads) > 0
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel(a, b) <= 1e-4


class Attend(nn.Module):
    """Projections, then torch's SDPA through F and through a name bound at import."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)

    def forward(self, x):                                            # (B, N, E)
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, E // 4)).permute(2, 0, 3, 1, 4)   # each (B, 4, N, E/4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = sdpa_bound_at_import(q, k, v, attn_mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril())
        return (a + b).transpose(1, 2).flatten(2)


def test_a_module_calling_sdpa_is_patched(kernel_calls):
    torch.manual_seed(0)
    check_patched_matches(Attend(), [randn(1, 2, 9, E)], kernel_calls=kernel_calls, want_calls=2)
    assert globals()["sdpa_bound_at_import"] is sdpa_module.torch_sdpa


class Wrap(nn.Module):
    def __init__(self, inner, call):
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, *xs):
        return self.call(self.inner, *xs)


@pytest.mark.parametrize("need_weights", (True, False))
@pytest.mark.parametrize("batch_first", (True, False))
def test_multihead_attention_is_patched(batch_first, need_weights, kernel_calls):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 4, batch_first=batch_first)
    x = randn(2, 2, 7, E) if batch_first else randn(2, 7, 2, E)
    model = Wrap(mha, lambda m, x: m(x, x, x, need_weights=need_weights))
    # need_weights=True is torch's own softmax(QK^T)V, which calls no SDPA: the same model, untouched
    check_patched_matches(model, [x], kernel_calls=kernel_calls, want_calls=0 if need_weights else 1)


@pytest.mark.parametrize("batch_first", (True, False))
def test_multihead_attention_with_key_padding_and_a_causal_mask_is_patched(batch_first, kernel_calls):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 4, batch_first=batch_first)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True                                                 # the last keys of batch 1 are padding
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    model = Wrap(mha, lambda m, x: m(x, x, x, key_padding_mask=pad, attn_mask=causal, is_causal=True,
                                     need_weights=False))
    x = randn(3, 2, 7, E) if batch_first else randn(3, 7, 2, E)
    check_patched_matches(model, [x], kernel_calls=kernel_calls)


def test_multihead_attention_with_kdim_and_vdim_is_patched(kernel_calls):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 4, batch_first=True, kdim=16, vdim=24)
    model = Wrap(mha, lambda m, q, k, v: m(q, k, v, need_weights=False))
    check_patched_matches(model, [randn(4, 2, 5, E), randn(5, 2, 9, 16), randn(6, 2, 9, 24)],
                          kernel_calls=kernel_calls)


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("norm_first", (False, True))
def test_transformer_encoder_layer_is_patched(norm_first, train, kernel_calls):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    check_patched_matches(layer, [randn(7, 2, 6, E)], train=train, kernel_calls=kernel_calls)


def test_transformer_decoder_layer_is_patched(kernel_calls):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, 4, 64, dropout=0.0, batch_first=True)
    check_patched_matches(layer, [randn(8, 2, 6, E), randn(9, 2, 9, E)], kernel_calls=kernel_calls, want_calls=2)


class HFStyleAttention(nn.Module):
    """A minimal Hugging Face-style attention ("sdpa" implementation): q/k/v/o projections, GQA passed to SDPA as
    enable_gqa, an additive (B, 1, Nq, Nk) mask in q's dtype built from a padding mask with finfo.min, is_causal
    only without a mask, scaling = head_dim ** -0.5, called as torch.nn.functional.scaled_dot_product_attention."""

    def __init__(self, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, E // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(E, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(E, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(E, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, E, bias=False)

    def forward(self, hidden, padding=None):                          # (B, N, E); padding (B, N) 1 = token
        b, n, _ = hidden.shape
        q = self.q_proj(hidden).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = None
        if padding is not None:     # causal and padded keys: finfo.min where not attended (the old HF way)
            keep = torch.ones(n, n, dtype=torch.bool).tril() & padding[:, None, None, :].bool()
            mask = torch.zeros(b, 1, n, n, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                                             scale=self.scaling, is_causal=mask is None,
                                                             enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("padded", (False, True), ids=("causal", "left-padded"))
def test_hugging_face_style_attention_is_patched(padded, kernel_calls):
    torch.manual_seed(0)
    model = HFStyleAttention()
    x = randn(10, 2, 7, E)
    if not padded:
        check_patched_matches(model, [x], kernel_calls=kernel_calls)
        return
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :3] = 0           # left padding: query rows 0-2 of batch 1 see no key but finfo.min ones
    check_patched_matches(Wrap(model, lambda m, x: m(x, padding)), [x], kernel_calls=kernel_calls, math_truth=True)


def test_hugging_face_llama_is_patched(kernel_calls):
    transformers = pytest.importorskip("transformers")
    config_ = transformers.LlamaConfig(vocab_size=50, hidden_size=E, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       attn_implementation="sdpa")
    torch.manual_seed(0)
    llama = transformers.LlamaModel(config_)
    ids = torch.randint(0, 50, (2, 7), generator=seeded(11))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :2] = 0
    model = Wrap(llama, lambda m, x: m(input_ids=ids, attention_mask=padding).last_hidden_state + 0 * x.sum())
    check_patched_matches(model, [torch.zeros(1)], kernel_calls=kernel_calls, want_calls=2)


# ---- idempotence and undo --------------------------------------------------------------------------------------------
def test_patching_twice_is_patching_once_and_undo_restores_in_either_order():
    model = Attend()
    x = randn(12, 2, 5, E)
    want = model(x)
    for order in ((0, 1), (1, 0)):
        handles = [tilestack.patch(model), tilestack.patch(model)]
        assert F.scaled_dot_product_attention is tilestack.scaled_dot_product_attention
        assert handles[1].replaced == []                          # nothing left to replace
        with config.override(backend="reference"):
            got = model(x)
        assert rel(got, want) <= 2e-5
        with warnings.catch_warnings():
            warnings.simplefilter("error")                        # no "replaced since" warning either way
            for i in order:
                handles[i].undo()
        assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa
        assert globals()["sdpa_bound_at_import"] is sdpa_module.torch_sdpa
    assert torch.equal(model(x), want)                            # torch's function again, bit for bit


def test_undo_twice_is_undo_once():
    handle = tilestack.patch(Attend())
    handle.undo()
    handle.undo()
    assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa


def test_a_patched_model_compiles_fullgraph(kernel_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HFStyleAttention()
    x = randn(13, 2, 7, E)
    want = model(x)
    try:
        with config.override(backend="reference"), tilestack.patch(model):
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()
    assert rel(got, want) <= 2e-5
