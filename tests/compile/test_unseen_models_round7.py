"""The tilestack torch.compile backend on models it has never seen, round 7 (unseen_blocks_round7.py), in inference:
a Gemma-style block (F.rms_norm without a weight then (1 + w), one key/value head through SDPA's enable_gqa, GeGLU by
chunk), a parallel attention + MLP block on one LayerNorm with Falcon's multi-query QKV and partial rotary, Qwen's
biased QKV with rotary in the half-split and the interleaved layouts, a BERT encoder with token types and padding, a
T5 stack sharing one position bias, a ViT with a class token and softmaxes over dim=1 of 2-D and of 3-D tensors, a
ConvNeXt stage, in-place MLPs (relu_, +=, add_), SwiGLU by F.silu(a) * b of a chunk, and a bf16 block whose norms
keep f32 parameters; in f32, bf16 and float64. For each: one graph, the outputs eager's within the dtype's tolerance
(round 1's ``_run``: every swap made passed its check, every op left has a reason, a second call compiles nothing),
the swaps named, and where it is independent of eager a float64 reference. On the CPU: the kernels through the
reference executor at tiny sizes (the size policy off), the rest through aot_eager."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from unseen_blocks_round7 import (
    BertEncoder,
    ConvNeXtStage,
    GemmaBlock,
    InPlaceMLP,
    MixedNormBlock,
    ParallelMQABlock,
    QwenAttention,
    SwiGLUChunk,
    T5Stack,
    TinyViT,
    seeded,
)

import tilestack
import tilestack.compile as tc

BF16, F64 = torch.bfloat16, torch.float64
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["f32", "bf16"])
F32_ONLY = "tilestack's GEMM multiplies bf16 or f16"


def _x(dtype=torch.float32, b: int = 2, n: int = 10, d: int = 32):
    torch.manual_seed(1)
    return torch.randn(b, n, d, dtype=dtype)


def _mask(b: int = 2, n: int = 10, pad: int = 3):
    """An attention mask whose last sequence ends in ``pad`` pad tokens."""
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, n - pad:] = 0
    return mask


def _ids(b: int = 2, n: int = 10, vocab: int = 40):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (b, n))


def _eval(model, *args, dtype):
    """One graph, then the compiled model against eager under torch.no_grad(); returns (output, swaps, since)."""
    _one_graph(model, *args)
    since = len(tc.reports())
    with torch.no_grad():
        got, swaps = _run(model, *args, dtype=dtype)
    return got, swaps, since


def _whats(since: int, pattern: str) -> list[str]:
    return sorted(s.what for r in tc.reports()[since:] for s in r.swaps if s.pattern == pattern and s.made)


def _f64_reference(model, *args):
    """The model run in float64 (its parameters and float inputs): an answer independent of eager's f32 rounding and
    of the kernels."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        return ref(*(a.double() if a.is_floating_point() else a for a in args))


def _f32_gemms_declined(since: int, count: int) -> None:
    declined = [w for w in _declined("linear_epilogue", since) if F32_ONLY in w]
    assert len(declined) == count, _declined("linear_epilogue", since)


# ---- Gemma-style block ------------------------------------------------------------------------------------------
@DTYPES
def test_gemma_block(dtype):
    """F.rms_norm(x.float()) without a weight (the kernel given ones) then * (1 + w): three norms swapped; SDPA with
    one key/value head and enable_gqa=True taken with its explicit scale; GeGLU's Linear read by chunk has nothing to
    fuse, the bias-free o and down projections fuse their residual adds in bf16 (in f32: declined, said why)."""
    model = seeded(GemmaBlock, dtype=dtype)
    _, swaps, since = _eval(model, _ids(), dtype=dtype)
    assert swaps.get("sdpa") == 1 and swaps.get("norm") == 3, swaps
    if dtype == torch.float32:
        assert "linear_epilogue" not in swaps, swaps
        _f32_gemms_declined(since, 2)
    else:
        assert _whats(since, "linear_epilogue") == ["linear + residual add -> tilestack::linear_epilogue"] * 2


def test_gemma_block_against_float64():
    """The compiled f32 logits against the model in float64 (its norms then in f32 as written: x.float())."""
    model = seeded(GemmaBlock)
    ids = _ids()
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(ids)
    assert tc.last_report().swapped.get("sdpa") == 1
    torch.testing.assert_close(got.double(), _f64_reference(model, ids), rtol=1e-4, atol=1e-4)


# ---- parallel attention + MLP on one LayerNorm, multi-query ---------------------------------------------------------
@DTYPES
def test_parallel_mqa_block(dtype):
    """One LayerNorm read by both branches (swapped once); the multi-query keys and values expanded to every head,
    partial rotary, f32 scores with a finfo.min causal fill: one attention (q and k read before their casts in bf16).
    In bf16 the dense projection fuses the MLP's output as its residual; the fc2 GEMM, which would take the same
    add, is declined for sharing it (GELU written out with tanh is not the GEMM's epilogue)."""
    model = seeded(ParallelMQABlock, dtype=dtype)
    _, swaps, since = _eval(model, _x(dtype), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 1, swaps
    assert "with masked_fill(cond, -inf)" in _whats(since, "explicit_attention")[0]
    if dtype == torch.float32:
        assert "linear_epilogue" not in swaps, swaps
    else:
        assert _whats(since, "linear_epilogue") == ["linear + bias + residual add -> tilestack::linear_epilogue"]
        assert any(w.startswith("shares ") for w in _declined("linear_epilogue", since))


def test_parallel_mqa_block_against_float64():
    model = seeded(ParallelMQABlock)
    x = _x()
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
    torch.testing.assert_close(got.double(), _f64_reference(model, x), rtol=1e-4, atol=1e-5)


# ---- Qwen's biased QKV, rotary in two layouts -----------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_qwen_attention_rotary_layouts(dtype, layout):
    """Biased q/k/v, rotary in the half-split or the interleaved layout, GQA by repeat_interleave, one folded causal +
    padding bias (clamped at finfo.min), softmax(dtype=f32) cast back: the attention (with an additive mask) and
    nn.RMSNorm swapped; in bf16 the bias-free o_proj + residual fused too."""
    model = seeded(QwenAttention, layout=layout, dtype=dtype)
    _, swaps, since = _eval(model, _x(dtype), _mask(), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 1, swaps
    assert "with an additive mask" in _whats(since, "explicit_attention")[0]
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 1), swaps


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_qwen_attention_against_float64(layout):
    """The two layouts against the model in float64: each rotates its own pairs (the kernel sees only q and k)."""
    model = seeded(QwenAttention, layout=layout)
    x, mask = _x(), _mask()
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x, mask)
        other = seeded(QwenAttention, layout="interleaved" if layout == "half" else "half")(x, mask)
    torch.testing.assert_close(got.double(), _f64_reference(model, x, mask), rtol=1e-4, atol=1e-5)
    assert (got - other).abs().max() > 1e-3            # the layouts differ: the test can tell them apart


# ---- BERT encoder ----------------------------------------------------------------------------------------------
@DTYPES
def test_bert_encoder_with_token_types_and_padding(dtype):
    """The embeddings' sum + LayerNorm and each layer's post-LN residual adds fused (5 add + norms), both attentions
    taken with the (B, 1, 1, N) padding bias through the eval-mode dropouts; in bf16 the GELU GEMMs fused. The pooled
    [CLS] row's tanh(Linear) left alone."""
    model = seeded(BertEncoder, dtype=dtype)
    ids, types = _ids(), (torch.arange(10) >= 5).long().expand(2, 10)
    (seq, pooled), swaps, since = _eval(model, ids, types, _mask(), dtype=dtype)
    assert seq.shape == (2, 10, 32) and pooled.shape == (2, 32)
    assert swaps.get("explicit_attention") == 2 and swaps.get("add_norm") == 5, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 2), swaps


def test_bert_encoder_against_float64():
    model = seeded(BertEncoder)
    args = (_ids(), (torch.arange(10) >= 5).long().expand(2, 10), _mask())
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(*args)
    for g, w in zip(got, _f64_reference(model, *args), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


# ---- T5 stack sharing one relative-position bias ---------------------------------------------------------------
@DTYPES
def test_t5_stack_sharing_one_position_bias(dtype):
    """Both layers add the same (B, H, N, N) bias (relative positions + padding) in place to unscaled scores: two
    attentions with scale 1 and an additive mask; T5's RMSNorm (variance in f32, no mean) swapped five times; in
    bf16 the four bias-free projections before a residual add fused."""
    model = seeded(T5Stack, dtype=dtype)
    _, swaps, since = _eval(model, _x(dtype), _mask(), dtype=dtype)
    assert swaps.get("explicit_attention") == 2 and swaps.get("norm") == 5, swaps
    assert all("q @ k^T * 1)" in w for w in _whats(since, "explicit_attention"))
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 4), swaps


def test_t5_stack_against_float64():
    model = seeded(T5Stack)
    x, mask = _x(), _mask()
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x, mask)
    torch.testing.assert_close(got.double(), _f64_reference(model, x, mask), rtol=1e-4, atol=1e-5)


# ---- ViT: class token, softmax over dim=1 of 2-D and of 3-D ----------------------------------------------------
@DTYPES
def test_tiny_vit_softmax_over_dim_1(dtype):
    """F.softmax(logits, dim=1) of (B, classes) is the last dim: swapped; torch.softmax(scores, dim=1) of (B, N, 1)
    runs over the tokens: declined with that reason (the kernel takes rows), its output eager's. The class token's
    concatenation + positions is an add of other shapes (declined, said); the two residual adds + norms fused."""
    model = seeded(TinyViT, dtype=dtype)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16, dtype=dtype)
    (probs, pooled), swaps, since = _eval(model, images, dtype=dtype)
    torch.testing.assert_close(probs.double().sum(1), torch.ones(2, dtype=F64), rtol=1e-2, atol=1e-2)
    assert swaps.get("softmax") == 1 and swaps.get("sdpa") == 1 and swaps.get("add_norm") == 2, swaps
    assert any("softmax over dim 1, not the last" in w for w in _declined("softmax", since))
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 1), swaps


# ---- ConvNeXt ----------------------------------------------------------------------------------------------------
@DTYPES
def test_convnext_stage(dtype):
    """The LayerNorms over the permuted channels-last maps (non-contiguous rows) swapped, the hand-written
    channels-first one (mean over dim 1) not taken for a norm; in bf16 pwconv1 + GELU fused (pwconv2's output is
    scaled by gamma: nothing to fuse)."""
    model = seeded(ConvNeXtStage, dtype=dtype)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16, dtype=dtype)
    _, swaps, since = _eval(model, images, dtype=dtype)
    assert swaps.get("norm") == 3 and "add_norm" not in swaps, swaps
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == ["linear + bias + gelu -> tilestack::linear_epilogue"] * 2


def test_convnext_stage_against_float64():
    model = seeded(ConvNeXtStage)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(images)
    torch.testing.assert_close(got.double(), _f64_reference(model, images), rtol=1e-4, atol=1e-5)


# ---- in-place ops ------------------------------------------------------------------------------------------------
@DTYPES
def test_in_place_mlp(dtype):
    """fc(x).relu_(), y = fc(h); y += x, F.relu(fc(x), inplace=True), fc(h).add_(x): each write is to a Linear's
    output that nothing else reads, so each is the activation or the residual add fused into the GEMM in bf16 (the
    relu_ and the two in-place adds were left, "nothing to fuse"); torch.relu_(u) on a Linear's output read after is
    not (u has two readers); the last Linear + residual fused."""
    model = seeded(InPlaceMLP, dtype=dtype)
    _, swaps, since = _eval(model, _x(dtype), dtype=dtype)
    assert swaps.get("norm") == 1, swaps
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == sorted(
            ["linear + bias + relu -> tilestack::linear_epilogue"] * 2 +
            ["linear + bias + residual add -> tilestack::linear_epilogue"] * 2 +
            ["linear + residual add -> tilestack::linear_epilogue"]), _whats(since, "linear_epilogue")
    else:
        _f32_gemms_declined(since, 5)


def _residual_written(x, w, r):
    """r.add_(linear(x, w)): the residual is the tensor written (returned, and read again as r)."""
    y = torch.nn.functional.linear(x, w)
    r.add_(y)
    return r * 2


def _output_viewed_before_write(x, w, r):
    """A view of the Linear's output taken before the in-place add: the view sees the write."""
    y = torch.nn.functional.linear(x, w)
    v = y.view(-1)
    y.add_(r)
    return v


def _relu_in_place_read_twice(x, w, r):
    u = torch.nn.functional.linear(x, w)
    h = u.relu_()
    return h + u + r


@pytest.mark.parametrize("fn", [_residual_written, _output_viewed_before_write, _relu_in_place_read_twice])
def test_in_place_writes_that_are_not_a_fusable_epilogue(fn):
    """r.add_(linear) writes the residual (the caller's r must change), a view of the output read after the write,
    relu_ on an output read again: no epilogue fused where the write would be lost; eager's outputs and eager's
    write to r."""
    torch.manual_seed(0)
    x, w, r = torch.randn(2, 5, 16, dtype=BF16), torch.randn(16, 16, dtype=BF16), torch.randn(2, 5, 16, dtype=BF16)
    r_eager, r_compiled = r.clone(), r.clone()
    with torch.no_grad():
        want = fn(x, w, r_eager)
        got = tilestack.optimize(fn, check=True, inner="aot_eager")(x, w, r_compiled)
    _close(got, want, BF16, "output")
    torch.testing.assert_close(r_compiled, r_eager, rtol=0, atol=0)
    report = tc.last_report()
    _consistent(report)
    assert [s.what for s in report.swaps if s.pattern == "linear_epilogue"] in (
        [], ["linear + residual add -> tilestack::linear_epilogue"]), str(report)
    if fn is not _relu_in_place_read_twice:
        assert "linear_epilogue" not in report.swapped, str(report)


# ---- SwiGLU by F.silu(a) * b of a chunk, mixed-dtype norms -----------------------------------------------------
@DTYPES
def test_swiglu_by_chunk(dtype):
    """w12's output is read by chunk (nothing to fuse); each residual add is fused with the next nn.RMSNorm (add +
    norm, so w3 keeps no residual to fuse); the final norm swapped."""
    model = seeded(SwiGLUChunk, dtype=dtype)
    _, swaps, _ = _eval(model, _x(dtype), dtype=dtype)
    assert swaps == {"add_norm": 2, "norm": 1}, swaps


def test_swiglu_by_chunk_against_float64():
    model = seeded(SwiGLUChunk)
    x = _x()
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
    torch.testing.assert_close(got.double(), _f64_reference(model, x), rtol=1e-4, atol=1e-5)


def test_bf16_block_with_f32_norm_parameters():
    """bf16 rows through a LayerNorm and an RMSNorm whose parameters stay f32 (torch gives bf16): both swapped (the
    RMSNorm with its residual add), the SDPA, the SiLU GEMM and the last residual GEMM fused; bf16 out, eager's."""
    model = seeded(MixedNormBlock, dtype=BF16).norms_to_f32()
    assert model.ln.weight.dtype == torch.float32 and model.qkv.weight.dtype == BF16
    got, swaps, since = _eval(model, _x(BF16), dtype=BF16)
    assert got.dtype == BF16
    assert swaps.get("norm") == 1 and swaps.get("add_norm") == 1 and swaps.get("sdpa") == 1, swaps
    assert swaps.get("linear_epilogue") == 2, swaps


# ---- float64 models: every kernel declined with the dtype named --------------------------------------------------
@pytest.mark.parametrize("cls", [QwenAttention, BertEncoder, ConvNeXtStage, MixedNormBlock])
def test_float64_models_are_left_with_the_dtype_named(cls):
    """A float64 model: the kernels take f32, bf16 and f16, so nothing is swapped (the models that compute a part in
    f32 themselves aside, none here) and every norm / attention / softmax left names float64; eager's outputs."""
    model = seeded(cls, dtype=F64)
    torch.manual_seed(1)
    args = {QwenAttention: lambda: (_x(F64), _mask()),
            BertEncoder: lambda: (_ids(), torch.zeros(2, 10, dtype=torch.long), _mask()),
            ConvNeXtStage: lambda: (torch.randn(2, 3, 16, 16, dtype=F64),),
            MixedNormBlock: lambda: (_x(F64),)}[cls]()
    since = len(tc.reports())
    with torch.no_grad():
        want = model(*args)
        got = tilestack.optimize(model, check=True, inner="aot_eager")(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    report = tc.reports()[since]
    _consistent(report)
    assert not report.swapped, str(report)
    for op in ("layer_norm", "rms_norm", "scaled_dot_product_attention", "softmax", "Tensor.softmax"):
        if op in report.left_why:
            assert "float64" in report.left_why[op], (op, report.left_why[op])
    assert any(op in report.left_why for op in ("layer_norm", "rms_norm")), str(report)
