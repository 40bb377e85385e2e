"""The tilestack torch.compile backend on models it has never seen, round 15 (unseen_blocks_round15.py): a GPT-NeoX
parallel block on two LayerNorms ``x + attn(ln1(x)) + mlp(ln2(x))`` (causal SDPA or a ``masked_fill(-inf)`` written
out), a cross-attention under an additive float mask and a boolean key padding mask (folded for SDPA; two masks
written out: left), ALiBi plus the causal -inf as one bias with the softmax in f32 cast back, BLOOM's ``baddbmm`` with
a ``masked_fill(-inf)`` and ``softmax(dtype=float32)`` cast back, a bias-free Linear + SiLU + residual before a
``LayerNorm(elementwise_affine=False)`` and a tanh GELU, RMSNorm by hand in bf16, ``dynamic=True`` under
``torch.no_grad()`` over two batch sizes, a ``.item()`` graph break, bad options. Each inference test: one graph and no
break in ``torch._dynamo.explain``, one compile and none on a second call, eager's outputs within the dtype's
tolerance and f32 within 1e-4 relative of float64, the report's swaps checked by name and text
(``test_unseen_round9._compiled``). Three of the models trained two SGD steps through the backend. Kernels on the reference executor at tiny sizes (the size policy off), the rest
through aot_eager.

Every model here compiled correctly as it was; the quantize fixes of this round are in
test_unseen_models_round15_quant.py."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_models_round12 import _trained
from test_unseen_models_round13 import _against_f64
from test_unseen_round9 import _close, _compiled, _f64, _left_why, _whats
from unseen_blocks_round15 import (
    ITEM_THRESHOLD,
    AlibiAttention,
    BaddbmmAttention,
    CrossAttention,
    D,
    ItemBreak,
    NeoXParallelBlock,
    RMSBlock,
    SiluResidual,
    seeded,
)

import tilestack
import tilestack.compile as tc
from tilestack.errors import LaunchError

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
TWO_MASKS = "with one mask at most"
EPILOGUE = "-> tilestack::linear_epilogue"


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _cross_args(b: int = 2, n: int = 5, m: int = 6, seed: int = 3):
    """(y (b, n, D), memory (b, m, D), an additive float mask (b, 1, n, m), key padding (b, m): the last sequence's
    memory from 3 on padding, True)."""
    torch.manual_seed(seed)
    padding = torch.zeros(b, m, dtype=torch.bool)
    padding[-1, 3:] = True
    return torch.randn(b, n, D), torch.randn(b, m, D), torch.randn(b, 1, n, m), padding


# ---- GPT-NeoX's parallel block ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sdpa", "explicit"])
@DTYPES
def test_neox_parallel_block(form, dtype):
    """``x + attn(ln1(x)) + mlp(ln2(x))``: both LayerNorms and the attention swapped; in bf16 the output projection
    and the MLP's down projection each take their residual add (x first, then x + attn) and the up projection its tanh
    GELU. Causal: a change to the last token leaves the others' outputs."""
    model = seeded(NeoXParallelBlock, form, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert swaps == {attention: 1, "norm": 2} | ({"linear_epilogue": 3} if dtype == BF16 else {}), swaps
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == [f"linear + bias + gelu_tanh {EPILOGUE}"] + 2 * [
            f"linear + bias + residual add {EPILOGUE}"]
        return
    _against_f64(model, got, x)
    moved = x.clone()
    moved[:, -1] += 3.0
    with torch.no_grad():
        torch.testing.assert_close(model(moved)[:, :-1], got[:, :-1], **F64_TOL)


# ---- cross-attention under two masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_cross_attention_float_mask_and_key_padding(form):
    """The float mask and the key padding folded into one SDPA mask: taken. Written out (the float mask added, then
    the padding filled with -inf): two masks, left with that reason, the softmax alone swapped. Both float64's; the
    padded memory states do not matter, and the float mask does."""
    model = seeded(CrossAttention, form)
    args = _cross_args()
    got, swaps, since = _compiled(model, *args)
    if form == "sdpa":
        assert swaps == {"sdpa": 1, "norm": 1}, swaps
    else:
        assert swaps == {"norm": 1, "softmax": 1}, swaps
        assert any(TWO_MASKS in why for why in _declined("explicit_attention", since))
    _against_f64(model, got, *args)
    y, memory, float_mask, padding = args
    noisy = memory.clone()
    noisy[-1, 3:] = 40.0
    with torch.no_grad():
        torch.testing.assert_close(model(y, noisy, float_mask, padding), got, **F64_TOL)
        assert (model(y, memory, torch.zeros_like(float_mask), padding) - got).abs().max() > 1e-2


# ---- ALiBi and BLOOM's baddbmm ---------------------------------------------------------------------------------------
@DTYPES
def test_alibi_bias_on_the_scores(dtype):
    """ALiBi's slopes times the key distance plus the causal -inf, one float bias sliced from a buffer, the softmax in
    f32 cast back: the attention taken with its additive mask (in bf16 the output projection with its residual too).
    The bias matters: without it the output moves."""
    model = seeded(AlibiAttention, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"explicit_attention": 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert _whats(since, "explicit_attention")[0].startswith("softmax(q @ k^T * 0.3536) with an additive mask")
    if dtype == F32:
        _against_f64(model, got, x)
        causal_only = seeded(AlibiAttention)
        causal_only.bias.clamp_(min=0.0)            # ALiBi's negative distances gone, the -inf kept
        with torch.no_grad():
            assert (causal_only(x) - got).abs().max() > 1e-2


@DTYPES
def test_baddbmm_masked_fill_softmax_in_float32(dtype):
    """``baddbmm(alibi, q, k^T, alpha=1/sqrt(hd))`` over (b * H, n, hd), a causal ``masked_fill(-inf)``,
    ``softmax(dtype=float32)`` cast back, ``bmm``: 3-D, left with that reason; in f32 the softmax alone swapped, in bf16
    declined naming the widening dtype. float64's in f32; the -inf fill holds (causal)."""
    model = seeded(BaddbmmAttention, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    left = _left_why(since)
    assert "3-D" in left["baddbmm"] and "3-D" in left["bmm"]
    if dtype == BF16:
        assert swaps == {}, swaps
        assert any("dtype=torch.float32" in why for why in _declined("softmax", since))
        return
    assert swaps == {"softmax": 1}, swaps
    _against_f64(model, got, x)
    moved = x.clone()
    moved[:, -1] -= 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(moved)[:, :-1], got[:, :-1], **F64_TOL)


# ---- activations and norms -------------------------------------------------------------------------------------------
@DTYPES
def test_bias_free_silu_residual_and_affine_free_layernorm(dtype):
    """``h = x + silu(fc(x))`` (bias-free), ``h + gelu_tanh(up(LayerNorm(h, elementwise_affine=False)))``: the add +
    parameter-free LayerNorm swapped; in bf16 the bias-free SiLU GEMM and the tanh-GELU GEMM with its residual as
    epilogues (f32: declined, the GEMM multiplies 16 bits)."""
    model = seeded(SiluResidual, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"add_norm": 1} | ({"linear_epilogue": 2} if dtype == BF16 else {}), swaps
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == [f"linear + bias + gelu_tanh + residual add {EPILOGUE}",
                                                    f"linear + silu {EPILOGUE}"]
    else:
        _against_f64(model, got, x)


@DTYPES
def test_hand_rms_norm(dtype):
    """``x * rsqrt(mean(x^2) + eps) * w`` in the model's dtype (bf16 without an f32 upcast: the kernel computes in f32
    and rounds once, within bf16's tolerance of eager's and nearer float64), then a bias-free SiLU MLP with its
    residual."""
    model = seeded(RMSBlock, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"norm": 1} | ({"linear_epilogue": 2} if dtype == BF16 else {}), swaps
    assert _whats(since, "norm") == ["x * rsqrt(mean(x^2) + eps) * w (written out) -> tilestack::rms_norm_fwd"]
    if dtype == F32:
        _against_f64(model, got, x)
        return
    want64 = _f64(model, x)
    with torch.no_grad():
        eager_gap = float((model(x).double() - want64).abs().max())
    assert float((got.double() - want64).abs().max()) <= 1.5 * eager_gap + 1e-2


# ---- dynamic shapes, graph breaks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neox", "cross"])
def test_dynamic_true_two_batch_sizes_under_no_grad(name):
    """``dynamic=True`` under ``torch.no_grad()``: batch 2 compiles, batch 5 runs the same graph (no new report), each
    within tolerance of float64; the attention is swapped in the graph kept."""
    model = seeded(NeoXParallelBlock, "explicit") if name == "neox" else seeded(CrossAttention, "sdpa")
    make = (lambda b: (_x(b=b, seed=b),)) if name == "neox" else (lambda b: _cross_args(b=b, seed=b))
    since = len(tc.reports())
    with torch.no_grad():
        compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
        got = compiled(*make(2))
        compiled_once = len(tc.reports())
        assert compiled_once > since
        _against_f64(model, got, *make(2))
        _against_f64(model, compiled(*make(5)), *make(5))
    assert len(tc.reports()) == compiled_once, "a second batch size compiled again under dynamic=True"
    kept = tc.reports()[compiled_once - 1]
    assert kept.swapped.get("explicit_attention" if name == "neox" else "sdpa") == 1, kept.swapped


def test_item_graph_break():
    """``.item()`` picks a scale in Python: Dynamo breaks the graph there; both pieces compiled (the first LayerNorm,
    then the residual + LayerNorm), the outputs eager's on either side of the branch."""
    model = seeded(ItemBreak)
    explained = torch._dynamo.explain(model)(_x())
    assert explained.graph_break_count == 1, explained.break_reasons
    torch._dynamo.reset()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        for scale in (1.0, 0.05):                     # mean |x| ~0.8, then ~0.04: the two branches
            x = _x() * scale
            assert (float(x.abs().mean()) > ITEM_THRESHOLD) == (scale == 1.0)
            _close(compiled(x), model(x), F32)
            _against_f64(model, compiled(x), x)
    swaps = [dict(r.swapped) for r in tc.reports()[since:]]
    # the first piece once; the second for each branch's scale (a constant of its graph, then Dynamo's own choice of
    # recompiles), its residual + LayerNorm swapped in every one
    assert swaps[0] == {"norm": 1} and len(swaps) >= 3 and all(s == {"add_norm": 1} for s in swaps[1:]), swaps


# ---- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neox", "cross", "rms"])
def test_training_through_the_backend(name):
    """Two SGD steps through the backend (``test_unseen_models_round12._trained``): the losses eager's and float64's,
    the first step's gradients within twice eager's own error against float64; the attention and norms swapped in the
    training graph (the GEMM epilogues are for inference graphs)."""
    if name == "neox":
        model, batches = seeded(NeoXParallelBlock, "explicit", train=True), [(_x(seed=s),) for s in (1, 2)]
        want = {"explicit_attention": 1, "norm": 2}
    elif name == "cross":
        model, batches = seeded(CrossAttention, "sdpa", train=True), [_cross_args(seed=s) for s in (1, 2)]
        want = {"sdpa": 1, "norm": 1}
    else:
        model, batches = seeded(RMSBlock, train=True), [(_x(n=9, seed=s),) for s in (1, 2)]
        want = {"norm": 1}
    since, _ = _trained(model, batches, lambda y: y.square().mean())
    assert dict(tc.reports()[since].swapped) == want, tc.reports()[since].swapped


# ---- bad options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,fragment", [
    ({"mode": "fast"}, "mode='fast'; expected None or one of Inductor's modes"),
    ({"inner": "inductr"}, "inner='inductr'; expected one of"),
    ({"passes": ["attention"]}, "passes ['attention'] unknown"),
    ({"numerics": "fp8"}, "numerics='fp8'; expected one of"),
    ({"dynamic": "yes"}, "dynamic='yes'; expected a bool or None"),
], ids=["mode", "inner", "passes", "numerics", "dynamic"])
def test_bad_options_refused_by_name(kwargs, fragment):
    with pytest.raises(LaunchError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        tilestack.optimize(seeded(SiluResidual), **kwargs)


def test_unknown_mode_through_torch_compile():
    """``torch.compile(model, backend="tilestack", mode=...)`` of an unknown mode: refused naming it, before any
    graph is rewritten (Dynamo wraps the error)."""
    since = len(tc.reports())
    with pytest.raises(Exception, match="mode='bogus'; expected None or one of Inductor's modes"):
        torch.compile(seeded(SiluResidual), backend="tilestack", mode="bogus")(_x())
    assert len(tc.reports()) == since
