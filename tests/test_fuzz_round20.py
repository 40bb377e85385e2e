"""Fuzz round twenty, part one: ``tilestack.scaled_dot_product_attention`` as a drop-in for torch's across its
argument combinations, ``tilestack.patch`` on real ``torch.nn`` modules, and the ops of ``tilestack.torch.ops`` on
views with storage offsets and on tensors made under ``torch.no_grad`` / ``torch.inference_mode``, all on the CPU
backends (the NumPy reference executor; the Triton interpreter for a few) against float64 torch.

Every result starts as NaN (``poisoned_allocations``), so an element no program writes cannot pass; NaN must sit
exactly where float64 torch has it. The drop-in's combinations: a boolean or additive ``attn_mask`` of every rank
2-4 broadcast over batch and heads, ``is_causal`` with Nq < Nk and Nq > Nk (torch's top-left), ``scale`` (given as
a float or an int), ``enable_gqa`` (H a multiple of Hkv; not a multiple: torch's RuntimeError), Dv != D, head dims
80/96/112/256, fp32 and bf16 inputs, non-contiguous (B, N, H, D)-transposed inputs and offset views.

This part found no bug (the drop-in, the patch and the ops answered as float64 torch throughout).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
from tilestack import config
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops
from tilestack.torch import sdpa as sdpa_module

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2000 + seed)


def randn(seed: int, *shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 torch has none, or the reverse"
    fin = ~want.isnan()
    if fin.any():
        scale = want[fin].abs().max().clamp_min(1.0)
        err = ((got[fin] - want[fin]).abs().max() / scale).item()
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many drop-in calls reached tilestack's kernels (not torch's function)."""
    calls = []
    real = sdpa_module.attention
    monkeypatch.setattr(sdpa_module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


# (name, (B, H, Hkv, Nq, Nk, D, Dv), mask shape or None, mask kind, kwargs)
CASES = [
    ("causal Nq<Nk", (1, 2, 2, 3, 7, 8, 8), None, None, dict(is_causal=True)),
    ("causal Nq>Nk", (2, 2, 2, 7, 3, 8, 8), None, None, dict(is_causal=True)),
    ("causal Nq=1", (1, 1, 1, 1, 6, 8, 8), None, None, dict(is_causal=True)),
    ("gqa 6/2", (1, 6, 2, 5, 5, 8, 8), None, None, dict(enable_gqa=True)),
    ("gqa 4/1 Dv", (2, 4, 1, 3, 6, 8, 12), None, None, dict(enable_gqa=True, scale=0.2)),
    ("Dv > D", (2, 2, 2, 5, 6, 8, 24), None, None, {}),
    ("Dv < D", (1, 2, 2, 5, 6, 16, 4), None, None, dict(is_causal=True)),
    ("scale small", (1, 2, 2, 4, 5, 8, 8), None, None, dict(scale=1e-3)),
    ("scale int", (1, 2, 2, 4, 5, 8, 8), None, None, dict(scale=2)),
    ("hd80", (1, 1, 1, 4, 5, 80, 80), None, None, {}),
    ("hd96", (1, 2, 1, 3, 4, 96, 96), None, None, dict(enable_gqa=True)),
    ("hd112", (1, 1, 1, 4, 3, 112, 112), None, None, dict(is_causal=True)),
    ("hd256", (1, 1, 1, 3, 5, 256, 256), None, None, {}),
    ("hd256 Dv96", (1, 1, 1, 3, 5, 256, 96), None, None, {}),
]
for rank_shape in [(4, 5), (1, 5), (4, 1), (2, 1, 5), (2, 4, 5), (1, 2, 4, 5), (2, 1, 4, 5), (2, 1, 1, 5),
                   (1, 1, 1, 1)]:
    for kind in ("bool", "float"):
        CASES.append((f"{kind} mask {rank_shape}", (2, 2, 2, 4, 5, 8, 8), rank_shape, kind, {}))
CASES += [
    ("gqa + bool mask", (2, 4, 2, 4, 5, 8, 8), (2, 1, 4, 5), "bool", dict(enable_gqa=True)),
    ("gqa + float mask + scale", (2, 4, 2, 4, 5, 8, 8), (4, 5), "float", dict(enable_gqa=True, scale=0.7)),
    ("-inf mask", (1, 2, 2, 4, 5, 8, 8), (4, 5), "-inf", {}),
    ("all-false bool mask", (1, 2, 2, 4, 5, 8, 8), (4, 5), "false", {}),
    ("Dv != D + mask", (1, 2, 2, 4, 5, 8, 12), (1, 4, 5), "float", {}),
]


def make_mask(seed: int, shape, kind: str):
    if shape is None:
        return None
    u = torch.rand(shape, generator=gen(seed), dtype=torch.float64)
    if kind == "bool":
        return u > 0.3
    if kind == "false":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "-inf":
        return torch.where(u > 0.5, 0.0, float("-inf")).double()
    return (u - 0.5) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_drop_in_answers_as_float64_torch(case, dtype, kernel_calls):
    name, (B, H, Hkv, Nq, Nk, D, Dv), mshape, kind, kw = case
    seed = len(name) * 7 + Nq
    q, k, v = randn(seed, B, H, Nq, D), randn(seed + 1, B, Hkv, Nk, D), randn(seed + 2, B, Hkv, Nk, Dv)
    mask = make_mask(seed + 3, mshape, kind)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    lo = None if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    lo = mask if mask is not None and mask.dtype == torch.bool else lo
    with config.override(backend="reference"), poisoned_allocations():
        got = tilestack.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=lo, **kw)
    assert got.dtype == dtype and len(kernel_calls) == 1, "the kernels did not take the call"
    close(got, want, TOL[dtype], name)


def test_gqa_heads_not_a_multiple_raise_torchs_runtime_error():
    q, k = randn(0, 1, 5, 4, 8).float(), randn(1, 1, 2, 4, 8).float()
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="heads"):
            tilestack.scaled_dot_product_attention(q, k, k, enable_gqa=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_drop_in_on_strided_and_offset_views(backend, kernel_calls):
    """q as the (B, N, H, D) -> (B, H, N, D) transpose a model makes, k and v views at storage offsets, a mask
    that is an expanded view: the kernels read them by their strides."""
    B, H, N, D = 1, 2, 5, 16
    q = randn(10, B, N, H, D).float().transpose(1, 2)
    kv = randn(11, 2 * B * H * N * D + 3).float()
    k = kv[3:3 + B * H * N * D].view(B, H, N, D)
    v = kv[3 + B * H * N * D:].view(B, H, N, D)
    mask = (torch.rand(1, 1, N, N, generator=gen(12)) > 0.2).expand(B, H, N, N)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    with config.override(backend=backend), poisoned_allocations():
        got = tilestack.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(kernel_calls) == 1
    close(got, want, TOL[torch.float32], f"strided views on {backend}")


@pytest.mark.parametrize("case", ["causal Nq>Nk", "gqa 4/1 Dv", "float mask (2, 1, 5)"])
def test_drop_in_gradients_match_float64_torch(case, kernel_calls):
    name, (B, H, Hkv, Nq, Nk, D, Dv), mshape, kind, kw = next(c for c in CASES if c[0] == case)
    q, k, v = randn(20, B, H, Nq, D), randn(21, B, Hkv, Nk, D), randn(22, B, Hkv, Nk, Dv)
    mask = make_mask(23, mshape, kind)
    do = randn(24, B, H, Nq, Dv)
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*want, attn_mask=mask, **kw).backward(do)
    got = [t.float().requires_grad_() for t in (q, k, v)]
    with config.override(backend="reference"), poisoned_allocations():
        tilestack.scaled_dot_product_attention(*got, attn_mask=None if mask is None else mask.float(),
                                               **kw).backward(do.float())
    for g, w, n in zip(got, want, "qkv", strict=True):
        close(g.grad, w.grad, 1e-4, f"{case}: d{n}")


# ---- tilestack.patch on torch.nn modules ----------------------------------------------------------------------
E = 16


def run_model(model, x, **kw):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = model(x, **kw)
    o = out[0] if isinstance(out, tuple) else out
    (o * torch.randn(o.shape, generator=gen(99))).sum().backward()
    return out, [p.grad.clone() for p in model.parameters() if p.grad is not None] + [x.grad]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def patched_matches(model, x, calls, want_calls, **kw):
    want, want_grads = run_model(model, x, **kw)
    calls.clear()
    with config.override(backend="reference"), tilestack.patch(model), poisoned_allocations():
        got, got_grads = run_model(model, x, **kw)
    assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa
    assert len(calls) == want_calls, f"{len(calls)} kernel calls, expected {want_calls}"
    pairs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
    for a, b in pairs:
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and not a.isnan().any() and rel(a, b) <= 2e-5
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel(a, b) <= 1e-4


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["float3d", "bool2d", "padding"])
def test_multihead_attention_masks_patched(batch_first, mask, kernel_calls):
    """MHA's own mask shapes: a float (B*H, L, S) mask, a bool (L, S) one, a key padding mask; need_weights=False
    reaches the kernels, need_weights=True with average_attn_weights=False is torch's own path (weights per head)."""
    torch.manual_seed(1)
    B, L, H = 2, 5, 4
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn((B, L, E) if batch_first else (L, B, E), generator=gen(30))
    kw = dict(need_weights=False)
    if mask == "float3d":
        kw["attn_mask"] = torch.randn(B * H, L, L, generator=gen(31))
    elif mask == "bool2d":
        kw["attn_mask"] = torch.rand(L, L, generator=gen(32)) > 0.7      # True: not allowed
        kw["attn_mask"].fill_diagonal_(False)
    else:
        kw["key_padding_mask"] = torch.tensor([[False] * L, [False] * 3 + [True] * 2])

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, **kw):
            return self.mha(x, x, x, **kw)
    patched_matches(M(), x, kernel_calls, 1, **kw)
    kw.update(need_weights=True, average_attn_weights=False)
    patched_matches(M(), x, kernel_calls, 0, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_transformer_encoder_layer_patched(batch_first, causal, kernel_calls):
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    B, L = 2, 6
    x = torch.randn((B, L, E) if batch_first else (L, B, E), generator=gen(40))
    kw = dict(src_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True) if causal else \
        dict(src_key_padding_mask=torch.tensor([[False] * L, [False] * 4 + [True] * 2]))
    patched_matches(layer, x, kernel_calls, 1, **kw)


def test_transformer_encoder_eval_no_grad_matches_unpatched():
    """In eval under no_grad torch may take its fused fast path (no SDPA call): the answer is the same."""
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, E, generator=gen(41))
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        with config.override(backend="reference"), tilestack.patch(enc):
            got = enc(x, src_key_padding_mask=pad)
    assert rel(got, want) <= 2e-5


# ---- ops on offset views and on no_grad / inference_mode tensors ----------------------------------------------
def ref_norm(name, x, r, w, b, eps):
    h = x if r is None else x + r
    if "layer" in name:
        y = F.layer_norm(h, (h.shape[-1],), w, b, eps)
    else:
        y = F.rms_norm(h, (h.shape[-1],), w, eps)
    return (y,) if r is None else (y, h)


def call_norm(name, x, r, w, b, eps):
    fn = getattr(ops, name)
    args = {"rms_norm": (x, w), "layer_norm": (x, w, b), "add_rms_norm": (x, r, w),
            "add_layer_norm": (x, r, w, b)}[name]
    out = fn(*args, eps=eps)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_norms_on_offset_and_strided_views(name, backend):
    base = randn(50, 400).float()      # x at offset 5 (not 16-byte aligned), r and bias every other element
    # the views themselves, requiring grad through views of one leaf
    lv = [t.clone().requires_grad_() for t in (base,)][0]
    xv, rv, wv, bv = lv[5:5 + 48].view(3, 16), lv[100:196:2].view(3, 16), lv[300:316], lv[331:363:2]
    with config.override(backend=backend), poisoned_allocations():
        got = call_norm(name, xv, rv if "add" in name else None, wv, bv, 1e-5)
    want_leaf = base.double().requires_grad_()
    xw, rw, ww, bw = want_leaf[5:53].view(3, 16), want_leaf[100:196:2].view(3, 16), want_leaf[300:316], \
        want_leaf[331:363:2]
    want = ref_norm(name, xw, rw if "add" in name else None, ww, bw, 1e-5)
    for g, wnt in zip(got, want, strict=True):
        close(g, wnt.detach(), 2e-5, f"{name} forward")
    dys = [randn(51 + i, *g.shape) for i, g in enumerate(got)]
    torch.autograd.backward(got, [d.float() for d in dys])
    torch.autograd.backward(want, dys)
    close(lv.grad, want_leaf.grad, 1e-4, f"{name} grad of the base")


@pytest.mark.parametrize("maker", ["no_grad", "inference_mode"])
def test_ops_on_tensors_made_without_grad_then_used_in_autograd(maker):
    """x made under no_grad / inference_mode (an inference tensor cloned first, as torch asks), weight a leaf
    requiring grad: the results and the weight's gradient are float64 torch's."""
    ctx = torch.no_grad if maker == "no_grad" else torch.inference_mode
    with ctx():
        x = randn(60, 4, 16).float()
        h = randn(61, 4, 16).float()
    w = randn(62, 16).float().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        y = ops.rms_norm(x, w) if maker == "no_grad" else ops.rms_norm(x.clone(), w)
        s = ops.swiglu(h.clone() if maker == "inference_mode" else h)
    W = w.detach().double().requires_grad_()
    want = F.rms_norm(x.clone().double(), (16,), W, 1e-6)
    close(y, want.detach(), 2e-5, "rms_norm")
    close(s, F.silu(h.double()[:, :8]) * h.double()[:, 8:], 2e-5, "swiglu")
    dy = randn(63, 4, 16)
    y.backward(dy.float())
    want.backward(dy)
    close(w.grad, W.grad, 1e-4, "rms_norm dweight")


def test_inference_mode_weight_with_a_grad_input_raises_as_torch():
    """An inference-mode weight that must be saved for a backward: torch's RuntimeError, as F.rms_norm's."""
    with torch.inference_mode():
        w = torch.ones(16)
    x = randn(64, 3, 16).float().requires_grad_()
    with pytest.raises(RuntimeError, match="Inference tensors"):
        F.rms_norm(x, (16,), w)
    with config.override(backend="reference"), pytest.raises(RuntimeError, match="Inference tensors"):
        ops.rms_norm(x, w).sum().backward()


def test_cross_entropy_on_offset_views_and_int32_labels():
    base = randn(70, 200).float()
    x = base[1:41].view(5, 8)
    w = base[50:50 + 88].view(11, 8)
    labels = torch.tensor([3, 0, 10, -100, 7, 1, 2, 9, 4, 5], dtype=torch.int32)[::2]   # a strided int32 view
    X, W = x.double().requires_grad_(), w.double().requires_grad_()
    want = F.cross_entropy(X @ W.T, labels.long(), ignore_index=-100)
    want.backward()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        got = ops.fused_linear_cross_entropy(xg, wg, labels)
    close(got, want.detach(), 2e-5, "loss")
    got.backward()
    close(xg.grad, X.grad, 1e-4, "dx")
    close(wg.grad, W.grad, 1e-4, "dweight")
