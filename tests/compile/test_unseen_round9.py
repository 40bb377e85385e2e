"""The tilestack torch.compile backend on models it has never seen, round 9 (unseen_blocks_round9.py), in inference:
Hugging Face's decoding attention with ``past_key_values`` concatenated and a 4-D mask from the padding mask (the causal
part offset by the past length), a static cache under Hugging Face's cache_position mask, BLOOM's ALiBi for 6 heads
folded with the masks into one bias or added by ``baddbmm``, multi-query attention by broadcasting,
``repeat_interleave`` and ``expand``, keys wider than values, a learned temperature and per-head logit scales (left: not
constants), a scale in a 0-d buffer (left) or made from ``torch.tensor`` (taken), ``head_mask``, key-major scores, a
multiplicative mask, a tanh-GELU MLP with dropout, a SwiGLU written out after a LayerNorm without affine parameters, a
hand RMSNorm and four look-alikes; f32, bf16, f16, batch 1 and odd lengths. For each: ``torch._dynamo.explain`` finds
one graph and no break, the tilestack backend compiles exactly one graph (it breaks nothing) and nothing on a second
call, the outputs are eager's within the dtype's tolerance and (f32) a float64 run's, the report names what was swapped
and why the rest was left, and where the form differs from what a kernel computes (a scale that is not a constant, a
mask that is not additive, a statistic that is not RMS) it is not swapped and the outputs show that the difference
matters. On the CPU: the kernels through the reference executor at tiny sizes (the size policy off), the rest through
aot_eager."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _consistent, _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from torch.utils._pytree import tree_leaves, tree_map
from unseen_blocks_round9 import (
    HD,
    RMS_FORMS,
    BloomAlibiAttention,
    D,
    GeluTanhMLP,
    H,
    HandNorm,
    HeadMaskAttention,
    KeyMajorAttention,
    LearnedScaleAttention,
    MultiplicativeMaskAttention,
    MultiQueryAttention,
    PastKVAttention,
    StaticCacheAttention,
    SwiGLUBlock,
    TensorScaleAttention,
    WideKeyAttention,
    alibi_slopes,
    seeded,
)

import tilestack
import tilestack.compile as tc

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: (1e-4, 1e-5), BF16: (5e-2, 5e-2), F16: (1e-2, 1e-2)}
ALL_DTYPES = pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
F32_ONLY = "tilestack's GEMM multiplies bf16 or f16"
NOT_CONSTANT = "s is not a 4-D q @ k^T times constants"


def _swaps(since: int) -> dict:
    total: dict = {}
    for r in tc.reports()[since:]:
        _consistent(r)
        for k, v in r.swapped.items():
            total[k] = total.get(k, 0) + v
    return total


def _whats(since: int, pattern: str) -> list[str]:
    return sorted(s.what for r in tc.reports()[since:] for s in r.swaps if s.pattern == pattern and s.made)


def _left_why(since: int) -> dict:
    return {op: why for r in tc.reports()[since:] for op, why in r.left_why.items()}


def _close(got, want, dtype, what: str = "output"):
    for i, (g, w) in enumerate(zip(tree_leaves(got), tree_leaves(want), strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]"
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol, msg=f"{what}[{i}]")


def _compiled(model, *args, dtype=F32):
    """Dynamo's explain: one graph, no break. Then model(*args) compiled (check=True, aot_eager) under no_grad: the
    tilestack backend compiles exactly one graph (nothing of its own breaks it), the outputs are eager's, a second call
    compiles nothing. Returns (compiled output, swaps by pass, report index of this compile)."""
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    since = len(tc.reports())
    with torch.no_grad():
        want = model(*args)
        compiled = tilestack.optimize(model, check=True, inner="aot_eager")
        got = compiled(*args)
        assert len(tc.reports()) == since + 1, "the tilestack backend compiled more than one graph"
        _close(got, want, dtype)
        _close(compiled(*args), want, dtype, "second call")
    assert len(tc.reports()) == since + 1, "a second call with the same shapes compiled again"
    return got, _swaps(since), since


def _f64(model, *args):
    """The model run in float64 (its parameters and float inputs, nested ones too)."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        return ref(*tree_map(lambda a: a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a,
                             args))


def _gap(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ---- past_key_values ------------------------------------------------------------------------------------------------
def _cached_step(model, b: int, past: int, n: int, pad: int, dtype, seed: int = 1):
    """(prefix, new tokens, mask (b, past + n), past_key_values): the prefix's keys and values made by the model
    itself (its own prefill, eager), the first ``pad`` positions of the last sequence padding."""
    torch.manual_seed(seed)
    tokens = torch.randn(b, past + n, D, dtype=dtype)
    mask = torch.ones(b, past + n, dtype=torch.long)
    mask[-1, :pad] = 0
    if not past:
        return tokens, mask, None
    with torch.no_grad():
        _, cache = model(tokens[:, :past], mask[:, :past])
    return tokens, mask, cache


@ALL_DTYPES
@pytest.mark.parametrize("form", ["explicit", "sdpa"])
@pytest.mark.parametrize("b,past,n", [(2, 6, 3), (1, 8, 1), (1, 4, 5)], ids=["b2_past6_n3", "b1_decode", "b1_n5"])
def test_past_key_values_step_is_the_full_sequence(b, past, n, form, dtype):
    """A cached step: the new tokens' k, v concatenated after the cache, the causal part of the 4-D mask offset by
    the past length (query i sees keys up to past + i). One attention; the cache it returns is eager's bit for bit.
    Independent check (f32): the step's outputs are the last n rows of the whole sequence's prefill run in float64;
    and the offset matters: a top-left causal mask (no offset) answers otherwise."""
    model = seeded(PastKVAttention, form, dtype=dtype)
    tokens, mask, cache = _cached_step(model, b, past, n, pad=2, dtype=dtype)
    args = (tokens[:, past:], mask, cache)
    got, swaps, since = _compiled(model, *args, dtype=dtype)
    assert swaps == {"sdpa" if form == "sdpa" else "explicit_attention": 1}, swaps
    what = _whats(since, "sdpa") + _whats(since, "explicit_attention")
    assert what == (["scaled_dot_product_attention masked -> tilestack::attention_fwd"] if form == "sdpa" else
                    [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with an additive mask @ v -> tilestack::attention_fwd"])
    with torch.no_grad():
        want_k, want_v = model(*args)[1]
    assert torch.equal(got[1][0], want_k) and torch.equal(got[1][1], want_v)
    assert got[0].shape == (b, n, D)
    if dtype == F32:
        full, _ = _f64(model, tokens, mask)
        torch.testing.assert_close(got[0].double(), full[:, past:], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            q = model.q(tokens[:, past:]).view(b, n, H, HD).transpose(1, 2)
            k, v = got[1]
            top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert _gap(model.o(top_left.transpose(1, 2).reshape(b, n, D)), got[0]) > 1e-2


@pytest.mark.parametrize("form", ["explicit", "sdpa"])
def test_past_key_values_prefill_with_left_padding(form):
    """The prefill itself (no cache, 7 tokens, the second sequence's first 2 padding): one attention; the real
    queries' rows against float64; the padding applied (the first real token of the padded sequence attends itself
    alone, so its output is o(v) of that token)."""
    model = seeded(PastKVAttention, form)
    tokens, mask, _ = _cached_step(model, 2, 0, 7, pad=2, dtype=F32)
    got, swaps, _ = _compiled(model, tokens, mask)
    assert sum(swaps.values()) == 1 and ("sdpa" in swaps or "explicit_attention" in swaps), swaps
    want, _ = _f64(model, tokens, mask)
    torch.testing.assert_close(got[0][0].double(), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0][1, 2:].double(), want[1, 2:], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        alone = model.o(model.v(tokens[1, 2]))
    torch.testing.assert_close(got[0][1, 2], alone, rtol=1e-4, atol=1e-5)


@ALL_DTYPES
@pytest.mark.parametrize("form", ["explicit", "sdpa"])
def test_static_cache_with_cache_position_mask(form, dtype):
    """A static cache of 16 slots written by index_copy_ at cache_position, Hugging Face's cache_position mask (built
    with ``*=`` of a boolean, a clone and a slice assignment): a 5-token prefill, two 1-token steps, a 3-token chunk.
    The unused slots hold large random values from the start, so a step that ignored the mask of the slots after its
    position would be far off. Each step: one attention, the outputs eager's (the padded sequence's fully masked
    prefill rows apart) and (f32) float64's; the caches eager's bit for bit."""
    model = seeded(StaticCacheAttention, form, dtype=dtype)
    torch.manual_seed(3)
    model.key_cache.copy_(5 * torch.randn_like(model.key_cache))
    model.value_cache.copy_(5 * torch.randn_like(model.value_cache))
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :2] = 0
    for start, n in ((0, 5), (5, 1), (6, 1), (7, 3)):
        x, position = torch.randn(2, n, D, dtype=dtype), torch.arange(start, start + n)
        since = len(tc.reports())
        with torch.no_grad():
            got, want, exact = compiled(x, mask, position), eager(x, mask, position), ref(x.double(), mask, position)
        rows = 2 if start == 0 else 0                   # the padded sequence's first queries see no key
        _close(got[1, rows:], want[1, rows:], dtype, f"step at {start}")
        _close(got[0], want[0], dtype, f"step at {start}")
        if dtype == F32:
            torch.testing.assert_close(got[1, rows:].double(), exact[1, rows:], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[0].double(), exact[0], rtol=1e-4, atol=1e-5)
        if len(tc.reports()) > since:
            assert _swaps(since) == {"sdpa" if form == "sdpa" else "explicit_attention": 1}, _swaps(since)
        assert torch.equal(model.key_cache, eager.key_cache) and torch.equal(model.value_cache, eager.value_cache)


# ---- ALiBi ----------------------------------------------------------------------------------------------------------
def test_alibi_slopes_for_six_heads():
    """BLOOM's slopes for 6 heads: the four of a power of two 4 (2^-2 .. 2^-8), then the odd ones of 8 (2^-1, 2^-3)."""
    want = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    torch.testing.assert_close(alibi_slopes(6), want, rtol=0, atol=0)


def _alibi_inputs(dtype, b: int = 2, n: int = 9, pad: int = 3):
    torch.manual_seed(1)
    x = torch.randn(b, n, BloomAlibiAttention.d, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, :pad] = 0
    return x, mask


@ALL_DTYPES
def test_alibi_folded_into_one_bias(dtype):
    """slope * position (positions counted over the real tokens), the causal and padding fills folded in by
    masked_fill: one additive bias, one attention. f32 against float64 (rows of real queries); the ALiBi bias matters
    (zero slopes answer otherwise)."""
    model = seeded(BloomAlibiAttention, "folded", dtype=dtype)
    x, mask = _alibi_inputs(dtype)
    got, swaps, since = _compiled(model, x, mask, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with an additive mask @ v "
                                                   "-> tilestack::attention_fwd"]
    if dtype == F32:
        want = _f64(model, x, mask)
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1, 3:].double(), want[1, 3:], rtol=1e-4, atol=1e-5)
        flat = copy.deepcopy(model)
        flat.slopes.zero_()
        assert _gap(_f64(flat, x, mask)[0], want[0]) > 1e-2


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_alibi_through_baddbmm_is_left_with_its_reason(dtype):
    """BLOOM's own form: ALiBi as baddbmm's input over (b * H, n, hd), then a masked_fill: 3-D (the kernel is 4-D),
    left to the inner compiler with that reason; in f32 the softmax is swapped alone, in bf16 its f32 ``dtype=`` keeps
    it (said). The outputs are eager's, and (f32) float64's on the real queries."""
    model = seeded(BloomAlibiAttention, "bloom", dtype=dtype)
    x, mask = _alibi_inputs(dtype)
    got, swaps, since = _compiled(model, x, mask, dtype=dtype)
    assert "explicit_attention" not in swaps, swaps
    assert "3-D" in _left_why(since)["baddbmm"] and "3-D" in _left_why(since)["bmm"]
    if dtype == F32:
        assert swaps == {"softmax": 1}, swaps
        want = _f64(model, x, mask)
        torch.testing.assert_close(got[1, 3:].double(), want[1, 3:], rtol=1e-4, atol=1e-5)
    else:
        assert swaps == {}, swaps
        assert any("dtype=torch.float32" in w for w in _declined("softmax", since)), _declined("softmax", since)


# ---- multi-query, wide keys -----------------------------------------------------------------------------------------
@ALL_DTYPES
@pytest.mark.parametrize("form", ["broadcast", "repeat_interleave", "expand"])
def test_multi_query_attention(form, dtype):
    """One key/value head for four query heads, batch 1, 11 tokens: broadcast by the products, repeated, or expanded:
    one attention each with the -inf causal fill; f32 against float64."""
    model = seeded(MultiQueryAttention, form, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(1, 11, D, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    assert "with masked_fill(cond, -inf)" in _whats(since, "explicit_attention")[0]
    if dtype == F32:
        torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)


@ALL_DTYPES
def test_keys_wider_than_values(dtype):
    """Dk = 12 (8 no-rope + 4 shared rope dims concatenated), Dv = 8, scale 1/sqrt(12): one attention at that scale,
    the output (b, n, D); f32 against float64; the shared rope key matters."""
    model = seeded(WideKeyAttention, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(1, 13, D, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {12 ** -0.5:.4g}) with an additive mask @ v "
                                                   "-> tilestack::attention_fwd"]
    if dtype == F32:
        want = _f64(model, x)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        no_rope = copy.deepcopy(model)
        no_rope.k_rope.weight.data.zero_()
        assert _gap(_f64(no_rope, x), want) > 1e-3


# ---- scales ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["temperature", "per_head"])
def test_learned_scales_are_not_folded(form):
    """A learned 0-d temperature and per-head logit scales are graph inputs, not constants: the attention is left
    (said: not constants), the softmax swapped alone; after the parameters change in place the compiled model follows
    them (nothing folded at compile time), against float64."""
    model = seeded(LearnedScaleAttention, form)
    torch.manual_seed(2)
    x = torch.randn(2, 9, D)
    got, swaps, since = _compiled(model, x)
    assert swaps == {"softmax": 1}, swaps
    assert any(NOT_CONSTANT in w for w in _declined("explicit_attention", since))
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        compiled(x)
        model.temperature.fill_(0.7)
        model.logit_scale.mul_(0.3)
        after = compiled(x)
    want = _f64(model, x)
    torch.testing.assert_close(after.double(), want, rtol=1e-4, atol=1e-5)
    assert _gap(want, got) > 1e-2                            # the change matters


@pytest.mark.parametrize("form", ["buffer", "made", "matmul_made"])
def test_scales_held_in_tensors(form):
    """1/sqrt(hd) in a 0-d buffer: not a constant (a buffer can be written), left, and a write to the buffer after the
    compile is followed; made in the forward from ``torch.tensor`` (a constant): on 4-D matmul scores taken at 0.3536,
    on 3-D baddbmm scores left with the 3-D reason. Every form against float64."""
    model = seeded(TensorScaleAttention, form)
    torch.manual_seed(2)
    x = torch.randn(2, 9, D)
    got, swaps, since = _compiled(model, x)
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)
    if form == "matmul_made":
        assert swaps == {"explicit_attention": 1}, swaps
        assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {HD ** -0.5:.4g}) @ v -> "
                                                       "tilestack::attention_fwd"]
        return
    assert swaps == {"softmax": 1}, swaps
    if form == "made":
        assert "3-D" in _left_why(since)["baddbmm"]
        return
    assert any(NOT_CONSTANT in w for w in _declined("explicit_attention", since))
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        compiled(x)
        model.inv_sqrt_d.fill_(1.3)
        after = compiled(x)
    torch.testing.assert_close(after.double(), _f64(model, x), rtol=1e-4, atol=1e-5)
    assert _gap(after, got) > 1e-2


# ---- attention forms that are not the kernel's ----------------------------------------------------------------------
def test_head_mask_multiplies_the_probabilities():
    """probs * head_mask[h] before @ v (head 1 pruned, head 3 halved): not softmax @ v, so not the attention kernel;
    the softmax alone swapped; against float64, and the mask matters (all-ones answers otherwise)."""
    model = seeded(HeadMaskAttention)
    torch.manual_seed(2)
    x, head_mask = torch.randn(2, 9, D), torch.tensor([1.0, 0.0, 1.0, 0.5])
    got, swaps, _ = _compiled(model, x, head_mask)
    assert swaps == {"softmax": 1}, swaps
    want = _f64(model, x, head_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert _gap(_f64(model, x, torch.ones(H)), want) > 1e-2


def test_key_major_scores_left():
    """k @ q^T with the softmax over dim -2: nothing swapped, the softmax declined naming its dim; float64's."""
    model = seeded(KeyMajorAttention)
    torch.manual_seed(2)
    x = torch.randn(2, 9, D)
    got, swaps, since = _compiled(model, x)
    assert swaps == {}, swaps
    assert _declined("softmax", since) == ["softmax over dim -2, not the last (the kernel takes rows)"]
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)


def test_multiplicative_mask_is_not_an_additive_one():
    """s * m - 10000 * (1 - m): the mask multiplies the scores, which no kernel's mask does: the attention is left
    (said), the softmax swapped alone. Against float64; the padding applied (all keys kept answers otherwise on the
    padded sequence, the same on the other)."""
    model = seeded(MultiplicativeMaskAttention)
    torch.manual_seed(2)
    x = torch.randn(2, 9, D)
    keep = torch.ones(2, 9)
    keep[1, 6:] = 0
    got, swaps, since = _compiled(model, x, keep)
    assert swaps == {"softmax": 1}, swaps
    assert any(NOT_CONSTANT in w for w in _declined("explicit_attention", since))
    want = _f64(model, x, keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    unpadded = _f64(model, x, torch.ones(2, 9))
    assert _gap(unpadded[1], want[1]) > 1e-2 and _gap(unpadded[0], want[0]) < 1e-12


# ---- MLPs and norms -------------------------------------------------------------------------------------------------
@ALL_DTYPES
def test_gelu_tanh_mlp_with_dropout(dtype):
    """fc1 + GELU(tanh) fused in 16 bits (the dropout between, eval, skipped), the residual add before the LayerNorm
    fused with it; fc2 has nothing of its own to fuse (its add is the norm's). In f32 fc1 declined, said why. Batch 1,
    7 tokens; f32 against float64."""
    model = seeded(GeluTanhMLP, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(1, 7, D, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps.get("add_norm") == 1, swaps
    if dtype == F32:
        assert "linear_epilogue" not in swaps and any(F32_ONLY in w for w in _declined("linear_epilogue", since))
        torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)
    else:
        assert _whats(since, "linear_epilogue") == ["linear + bias + gelu_tanh -> tilestack::linear_epilogue"]


@ALL_DTYPES
def test_swiglu_after_a_layernorm_without_parameters(dtype):
    """LayerNorm(elementwise_affine=False) swapped; in 16 bits w1 + SiLU (an nn.SiLU module) and w2 + the residual
    fused (the product with w3 between them stays); f32 against float64."""
    model = seeded(SwiGLUBlock, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(1, 9, D, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps.get("norm") == 1 and _whats(since, "norm") == ["layer_norm -> tilestack::layer_norm_fwd"], swaps
    if dtype == F32:
        torch.testing.assert_close(got.double(), _f64(model, x), rtol=1e-4, atol=1e-5)
    else:
        assert _whats(since, "linear_epilogue") == ["linear + residual add -> tilestack::linear_epilogue",
                                                    "linear + silu -> tilestack::linear_epilogue"]


@pytest.mark.parametrize("form", RMS_FORMS)
def test_hand_rms_norm_and_its_look_alikes(form):
    """eps = 0.5. The RMSNorm is swapped (written out); the look-alikes (eps outside the root, the statistic over the
    tokens, the mean |x|, the sum over d + 1) are not RMSNorm and are not swapped. Each against float64; and each
    look-alike differs from the RMSNorm by more than the tolerance, so a wrong swap would show."""
    model = seeded(HandNorm, form)
    torch.manual_seed(2)
    x = torch.randn(1, 9, D)
    got, swaps, since = _compiled(model, x)
    want = _f64(model, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    if form == "rms":
        assert swaps == {"norm": 1}, swaps
        assert _whats(since, "norm") == ["x * rsqrt(mean(x^2) + eps) * w (written out) -> tilestack::rms_norm_fwd"]
    else:
        assert "norm" not in swaps, swaps
        rms = copy.deepcopy(model)
        rms.form = "rms"
        assert _gap(_f64(rms, x), want) > 1e-2
