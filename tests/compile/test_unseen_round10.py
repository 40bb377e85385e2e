"""The tilestack torch.compile backend on models it has never seen, round 10 (unseen_blocks_round10.py), in inference:
multi-query attention in ``torch.einsum`` with a ``torch.triu`` causal mask (the key/value head expanded: taken; left
3-D for the equation to broadcast: left), Gemma 2's soft-capped scores (left: the kernels have no cap), ALiBi and a
sliding window folded into one bias, a sliding window as a boolean ``torch.where``, qk-norm through ``nn.RMSNorm`` and
written out, one boolean tensor as ``masked_fill`` (True: masked) and as ``torch.where`` (True: kept), three
look-alikes of masked attention (the probabilities scaled, the mask subtracted, the mask added with ``alpha``; left),
RMSNorm with Gemma's ``(1 + w)``, a centred look-alike (left) and a (1, d) weight, LayerNorm without a bias and without
affine parameters, a residual sum read twice, GeGLU / ReGLU and GELU MLPs in 16 bits, and a pre-norm block inside
``torch.autocast``. For each: ``torch._dynamo.explain`` finds one graph and no break, the tilestack backend compiles
exactly one graph and nothing on a second call, the outputs are eager's within the dtype's tolerance and (f32)
a float64 run's, the report names what was swapped, and where the form differs from what a kernel computes it is not
swapped and the outputs show that the difference matters. On the CPU: the kernels through the reference executor at
tiny sizes (the size policy off), the rest through aot_eager (helpers from test_unseen_round9).

What this round found: nothing wrong in the passes on these blocks: every look-alike (soft-capping, a subtracted
mask, ``alpha=2``, scaled probabilities, a centred statistic, masks that broadcast the scores up to more heads or a
larger batch) was left with a reason and every swap matched float64. Fixed in ``tilestack.quantize`` (test in
test_unseen_round10_more.py): a model with no ``nn.Linear`` and no other weights (norms and activations alone) came
back unchanged, in float, without a word; it is refused now, naming the model and what is expected."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_round9 import _compiled, _f64, _gap, _whats
from unseen_blocks_round10 import (
    GLUMLP,
    HD,
    AlibiWindowAttention,
    BoolMaskAttention,
    D,
    EinsumMQA,
    GeluMLP,
    LookalikeAttention,
    NoAffineNorms,
    PreNormBlock,
    QKNormAttention,
    ResidualTwice,
    RMSVariant,
    SoftcapAttention,
    seeded,
)

import tilestack.compile as tc

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _against_f64(model, got, *args):
    """f32 outputs against the model run in float64."""
    torch.testing.assert_close(got.double(), _f64(model, *args), **F64_TOL)


def _attention_what(scale: float, how: str) -> list[str]:
    return [f"softmax(q @ k^T * {scale:.4g}){how} @ v -> tilestack::attention_fwd"]


# ---- attention ------------------------------------------------------------------------------------------------------
@ALL_DTYPES
def test_einsum_multi_query_with_triu_causal_mask(dtype):
    """One key/value head expanded to the 4 query heads, both products in einsum, the causal mask a ``triu`` of -inf
    added: one attention. Against float64 (f32); the mask applied: the first token attends itself alone (its output
    is o(v of that token)), and without the mask the output changes."""
    model = seeded(EinsumMQA, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    assert _whats(since, "explicit_attention") == _attention_what(HD ** -0.5, " with an additive mask")
    if dtype == F32:
        _against_f64(model, got, x)
        with torch.no_grad():
            v0 = model.kv(x[:, 0]).chunk(2, -1)[1]                                # (b, hd): the one value head
            torch.testing.assert_close(got[:, 0], model.o(v0.repeat(1, 4)), **F64_TOL)
            q = model.q(x).view(2, 7, 4, HD).transpose(1, 2)
            k, v = model.kv(x).view(2, 7, 1, 2 * HD).transpose(1, 2).chunk(2, -1)
            unmasked = torch.softmax(q @ k.transpose(-2, -1) * HD ** -0.5, -1) @ v
            assert _gap(model.o(unmasked.transpose(1, 2).reshape(2, 7, D)), got) > 1e-2


def test_einsum_multi_query_3d_operands_left():
    """The same attention with k, v left (b, n, hd) and ``bihd,bjd->bhij`` broadcasting them: no 4-D q, k, v, so no
    attention swap (only its softmax); the outputs float64's."""
    model = seeded(EinsumMQA, expand=False)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert "explicit_attention" not in swaps and swaps == {"softmax": 1}, swaps
    _against_f64(model, got, x)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_softcapped_scores_are_left(dtype):
    """Gemma 2's ``tanh(s / cap) * cap`` between the scores and the fill: the explicit attention is declined (the
    kernels apply no cap), its softmax alone is swapped; float64's outputs (f32); and the cap matters: the same
    weights without it answer otherwise."""
    model = seeded(SoftcapAttention, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert "explicit_attention" not in swaps and swaps == {"softmax": 1}, swaps
    assert any("not a 4-D q @ k^T times constants" in why for why in _declined("explicit_attention", since))
    if dtype == F32:
        _against_f64(model, got, x)
        uncapped = copy.deepcopy(model)
        uncapped.cap = 0.0
        with torch.no_grad():
            assert _gap(uncapped(x), got) > 1e-2


@ALL_DTYPES
@pytest.mark.parametrize("form", ["bias", "where"])
def test_alibi_and_sliding_window(form, dtype):
    """ALiBi and a 3-key causal window folded into one additive bias, or the window as a boolean ``torch.where``:
    one attention either way; float64's outputs (f32); the window matters (a window of all n keys answers
    otherwise)."""
    model = seeded(AlibiWindowAttention, form, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    how = " with an additive mask" if form == "bias" else " with a boolean mask"
    assert _whats(since, "explicit_attention") == _attention_what(HD ** -0.5, how)
    if dtype == F32:
        _against_f64(model, got, x)
        wide = copy.deepcopy(model)
        wide.window = 9
        with torch.no_grad():
            assert _gap(wide(x), got) > 1e-2


@pytest.mark.parametrize("form", ["module", "hand"])
def test_qk_norm_before_attention(form):
    """An RMSNorm over each head's dims on q and on k (weights not ones): both norms and the attention swapped (SDPA,
    or written out with the key as ``k.permute(0, 2, 3, 1)``); float64's outputs."""
    model = seeded(QKNormAttention, form)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"norm": 2, "sdpa" if form == "module" else "explicit_attention": 1}, swaps
    _against_f64(model, got, x)
    if form == "hand":
        assert sorted(_whats(since, "norm")) == ["x * rsqrt(mean(x^2) + eps) * w (written out) -> "
                                                 "tilestack::rms_norm_fwd"] * 2


def test_one_boolean_tensor_as_fill_and_as_where_means_opposite_keys():
    """``masked_fill(m, -inf)`` masks where m is True; ``torch.where(m, s, -inf)`` keeps where it is True. With one
    m (every row keeping and masking some key), both are swapped and each matches float64: the kernel was given each
    mask's own meaning (the two outputs differ from each other)."""
    x = _x()
    torch.manual_seed(4)
    m = torch.rand(2, 1, 7, 7) > 0.5
    m[..., 0], m[..., 1] = True, False                     # every row both keeps and masks a key
    outs = []
    for form in ("fill", "where"):
        model = seeded(BoolMaskAttention, form)
        got, swaps, since = _compiled(model, x, m)
        assert swaps == {"explicit_attention": 1}, swaps
        how = " with masked_fill(cond, -inf)" if form == "fill" else " with a boolean mask"
        assert _whats(since, "explicit_attention") == _attention_what(HD ** -0.5, how)
        _against_f64(model, got, x, m)
        outs.append(got)
    assert _gap(*outs) > 1e-2


@pytest.mark.parametrize("form", ["prob_scale", "sub", "alpha"])
def test_masked_attention_lookalikes_are_left(form):
    """The probabilities scaled by 0.5, the mask subtracted, the mask added with alpha=2: none is softmax(q k^T * c
    + mask) @ v, none is swapped as attention; float64's outputs; each differs from that attention (the look-alike
    matters)."""
    model = seeded(LookalikeAttention, form)
    x = _x()
    torch.manual_seed(5)
    m = 3 * torch.randn(2, 1, 7, 7)
    got, swaps, since = _compiled(model, x, m)
    assert "explicit_attention" not in swaps, swaps
    if form != "prob_scale":        # the softmax's reader is the product: the attention-shaped chain is declined
        assert _declined("explicit_attention", since), "the attention-shaped chain was not reported as declined"
    _against_f64(model, got, x, m)
    with torch.no_grad():
        q, k, v = model.qkv(x).view(2, 7, 3, 4, HD).permute(2, 0, 3, 1, 4)
        plain = torch.softmax(q @ k.transpose(-2, -1) * HD ** -0.5 + m, -1) @ v
        assert _gap(model.o(plain.transpose(1, 2).reshape(2, 7, D)), got) > 1e-2


# ---- norms ----------------------------------------------------------------------------------------------------------
@ALL_DTYPES
@pytest.mark.parametrize("form", ["gemma", "variance", "weight_2d"])
def test_rms_norm_variants(form, dtype):
    """Gemma's ``(1 + w)`` in f32 cast back: one RMSNorm with its weight; a (1, d) weight: the RMSNorm without it
    (the weight stays a multiply); the variance (centred) instead of the mean square: not RMSNorm, left. Float64's
    outputs (f32); the centred form differs from RMSNorm on inputs with a mean."""
    model = seeded(RMSVariant, form, dtype=dtype)
    x = _x(dtype=dtype) + 0.5                               # rows with a mean: the centred statistic differs
    got, swaps, since = _compiled(model, x, dtype=dtype)
    if form == "variance":
        assert "norm" not in swaps, swaps
    else:
        assert swaps.get("norm") == 1, swaps
        w = " * w" if form == "gemma" else ""
        assert _whats(since, "norm") == [f"x * rsqrt(mean(x^2) + eps){w} (written out) -> tilestack::rms_norm_fwd"]
    if dtype == F32:
        _against_f64(model, got, x)
        if form == "variance":
            with torch.no_grad():
                rms = model.fc(model.weight * torch.nn.functional.rms_norm(x, (D,), eps=model.eps))
            assert _gap(rms, got) > 1e-2


@ALL_DTYPES
def test_layer_norm_without_bias_and_without_affine(dtype):
    """``LayerNorm(bias=False)`` then ``LayerNorm(elementwise_affine=False, eps=1e-3)`` of the residual sum: one norm
    and one fused add + norm (eps 1e-3 kept: against float64 in f32)."""
    model = seeded(NoAffineNorms, dtype=dtype)
    x = _x(dtype=dtype) * 0.05                              # small rows: eps=1e-3 against 1e-5 shows
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"norm": 1, "add_norm": 1}, swaps
    if dtype == F32:
        _against_f64(model, got, x)


@ALL_DTYPES
def test_residual_sum_read_twice(dtype):
    """Each residual sum feeds its norm and is read again (the next residual, ``0.5 * h``): two fused add + norms
    whose sums replace eager's; float64's outputs (f32)."""
    model = seeded(ResidualTwice, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"add_norm": 2}, swaps
    assert _whats(since, "add_norm") == ["add + layer_norm -> tilestack::add_layer_norm_fwd",
                                         "add + rms_norm -> tilestack::add_rms_norm_fwd"]
    if dtype == F32:
        _against_f64(model, got, x)


# ---- MLPs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_glu_mlps(act, dtype):
    """GeGLU / ReGLU from one chunked Linear: the activation reads a chunk (a view), not the GEMM's output, so the up
    projection is not fused with it; the down projection's residual add is. Eager's outputs, and the model in float64
    within the dtype's rounding."""
    model = seeded(GLUMLP, act, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"linear_epilogue": 1}, swaps
    assert _whats(since, "linear_epilogue") == ["linear + bias + residual add -> tilestack::linear_epilogue"]
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_linear_gelu_forms(approximate, dtype):
    """Linear + GELU: the epilogue named by the form the model wrote (gelu_tanh or gelu, the exact erf), then the
    second Linear with the residual; eager's outputs and float64's within the dtype's rounding."""
    model = seeded(GeluMLP, approximate, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"linear_epilogue": 2}, swaps
    act = "gelu_tanh" if approximate == "tanh" else "gelu"
    assert _whats(since, "linear_epilogue") == [f"linear + bias + {act} -> tilestack::linear_epilogue",
                                                "linear + bias + residual add -> tilestack::linear_epilogue"]
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=3e-2, atol=3e-2)


def test_block_inside_autocast():
    """An f32 block run inside ``torch.autocast("cpu", bfloat16)``: the attention and the two norms swapped; the
    GEMM epilogue (the MLP's up projection + GELU) declined naming the autocast region (autocast casts x and the weight
    inside the Linear, out of the graph's sight); the fused add + norm declined (the residual sum adds f32 to bf16).
    Eager's outputs within bf16's tolerance, and near float64 (the block without autocast) by bf16's rounding."""
    model = seeded(PreNormBlock, autocast=True)
    x = _x()
    got, swaps, since = _compiled(model, x, dtype=BF16)
    assert got.dtype == F32
    assert swaps == {"explicit_attention": 1, "norm": 2}, swaps
    why = _declined("linear_epilogue", since)
    assert why and all("inside a torch.autocast(torch.bfloat16) region" in w for w in why), why
    plain = copy.deepcopy(model)
    plain.autocast = False
    torch.testing.assert_close(got.double(), _f64(plain, x), rtol=5e-2, atol=5e-2)
    assert tc.reports()[since].swaps
