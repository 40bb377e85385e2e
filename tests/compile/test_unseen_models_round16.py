"""The tilestack torch.compile backend on models it has never seen, round 16 (unseen_blocks_round16.py): DiT's
adaLN-Zero block, a DeepNet post-LN block with an old-BERT -10000 padding bias, a conv + BatchNorm + ReLU classifier
with adaptive pooling (also channels-last), a pre-norm ``nn.RMSNorm`` block with constant-scaled residuals, GQA by
``repeat_interleave`` and a SwiGLU MLP, attention under float masks of rank 2 and 3 (SDPA and written out), a decoder
whose causal mask is made in forward, called at three lengths, wav2vec 2.0's LayerNorm of transposed conv features,
and a cross-attention under a key padding mask over a memory that may be empty. Each inference test: one graph and no
break, one compile and none on a second call, eager's outputs within the dtype's tolerance and f32 within 1e-4
relative of float64, the report's swaps checked by name and text (``test_unseen_round9._compiled``), and every swap the
report claims found as a tilestack op in the rewritten graph (``_graph_ops``). Five models trained two SGD steps
through the backend. Kernels on the reference executor at tiny sizes (the size policy off), the rest through
aot_eager.

What this round found and fixed (src/tilestack/compile/ops.py):
- attention over no key at all (Nk = 0: a cross-attention to an empty memory, a self-attention over an empty
  sequence) under a float mask, through SDPA's ``attn_mask`` or added to the scores, failed in the compiled model with
  "IndexError: amax(): Expected reduction dim -1 to have non-zero size" (``ops._absorbed_rows`` took the mask's
  largest value over no key); eager gives the empty softmax and an output of 0. Under a ``masked_fill(~keep,
  finfo.min)`` the rows seeing no key were set to the mean of no value (NaN; the check then kept the original, and the
  softmax pass's check crashed the compile, below). ``ops.ts_attention`` now leaves a keyless attention to the
  kernel's 0. That 0 is contiguous zeros (attention_forward launches nothing), where ``tilestack::attention_fwd``'s
  fake gave q's layout (a transposed view's): a later ``reshape`` traced as a view on the fake's strides failed on the
  real tensor, "view size is not compatible with input tensor's size and stride", through the passes and for
  ``tilestack.scaled_dot_product_attention`` compiled in user code alike; the fake now says contiguous there
  (src/tilestack/torch/attention.py ``_fwd_fake``).
- a bf16 Linear of no input feature (in_features 0) with a GELU and a residual: the GEMM epilogue op's
  ``reshape(-1, 0)`` raised inside the check (BackendCompilerFailed); ``ops.linear_epilogue_op`` now takes its rows
  by their count.
- the softmax pass's op on an empty last dim (those scores) raised "cannot reshape tensor of 0 elements into shape
  [-1, 0]" (``ops.softmax_op``), inside check mode's run of the rewrite: BackendCompilerFailed, the whole compile
  lost."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round12 import _trained
from test_unseen_models_round13 import _against_f64
from test_unseen_round9 import _close, _compiled, _left_why, _whats
from unseen_blocks_round16 import (
    CLASSES,
    ConvBNClassifier,
    D,
    DeepNormBlock,
    DiTBlock,
    InlineCausalDecoder,
    PaddedCrossAttention,
    RankedMaskAttention,
    ScaledResidualGQABlock,
    Wav2VecFeatureProjection,
    seeded,
)

import tilestack
import tilestack.compile as tc

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
EPILOGUE = "-> tilestack::linear_epilogue"
# the functions of tilestack.compile.ops each pass puts in the rewritten graph (both attention passes: ts_attention)
OP_OF_PASS = {"attention": ("ts_attention",), "add_norm": ("ts_add_layer_norm", "ts_add_rms_norm"),
              "norm": ("ts_layer_norm", "ts_rms_norm"), "softmax": ("ts_softmax",),
              "linear_epilogue": ("ts_linear_epilogue", "ts_quant_linear_epilogue", "ts_quant_linear_epilogue_of_rows")}


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _cond(b: int = 2, dtype=F32, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, D, dtype=dtype)


def _keep(b: int = 2, n: int = 7, dtype=F32) -> torch.Tensor:
    """(b, n) 1 / 0: the last sequence padded from 4 on."""
    keep = torch.ones(b, n, dtype=dtype)
    keep[-1, 4:] = 0
    return keep


def _graph_ops(model, *args) -> tuple[Counter, Counter]:
    """(swaps by pass, ops.ts_* calls by pass; the two attention passes as "attention") of the graph Dynamo
    captures from model(*args), rewritten by ``tc.run_passes`` (check=True): what the report claims against what the
    graph holds."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*args)
    assert len(graphs) == 1
    report = tc.run_passes(graphs[0], check=True, inner="aot_eager")
    calls = Counter(getattr(n.target, "__name__", "") for n in graphs[0].graph.nodes if n.op == "call_function")
    held = Counter({p: sum(calls[f] for f in fns) for p, fns in OP_OF_PASS.items()})
    swapped = Counter({"attention" if p in ("sdpa", "explicit_attention") else p: c for p, c in report.swapped.items()})
    return swapped, +held


# ---- DiT ------------------------------------------------------------------------------------------------------------
@DTYPES
def test_dit_adaln_zero_block(dtype):
    """The parameter-free LayerNorm (eps 1e-6) swapped, the gated residual + second LayerNorm as one add + norm, the
    attention through SDPA; in bf16 the MLP's up projection with its tanh GELU. f32 within float64's tolerance; with
    the modulation's Linear zeroed (adaLN-Zero's initialisation) the block is the identity, compiled too."""
    model = seeded(DiTBlock, dtype=dtype)
    x, c = _x(dtype=dtype), _cond(dtype=dtype)
    got, swaps, since = _compiled(model, x, c, dtype=dtype)
    assert swaps == {"sdpa": 1, "add_norm": 1, "norm": 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert _whats(since, "norm") == ["layer_norm -> tilestack::layer_norm_fwd"]
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == [f"linear + bias + gelu_tanh {EPILOGUE}"]
        return
    _against_f64(model, got, x, c)
    with torch.no_grad():
        model.adaLN_modulation[-1].weight.zero_()
        model.adaLN_modulation[-1].bias.zero_()
        torch._dynamo.reset()
        torch.testing.assert_close(tilestack.optimize(model, check=True, inner="aot_eager")(x, c), x, rtol=0, atol=0)


# ---- DeepNet's post-LN -----------------------------------------------------------------------------------------------
@DTYPES
def test_deepnorm_post_ln_with_old_bert_mask(dtype):
    """``ln(x * alpha + f(x))`` twice: both residual sums fused into add + LayerNorm; the scores with the -10000
    padding bias taken as an additive mask; in bf16 the MLP's ReLU GEMM. The padded positions' inputs do not move the
    real positions' outputs; alpha matters."""
    model = seeded(DeepNormBlock, dtype=dtype)
    x, keep = _x(dtype=dtype), _keep(dtype=dtype)
    got, swaps, since = _compiled(model, x, keep, dtype=dtype)
    assert swaps == {"explicit_attention": 1, "add_norm": 2} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert _whats(since, "explicit_attention") == [
        "softmax(q @ k^T * 0.3536) with an additive mask @ v -> tilestack::attention_fwd"]
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == [f"linear + bias + relu {EPILOGUE}"]
        return
    _against_f64(model, got, x, keep)
    noisy = x.clone()
    noisy[-1, 4:] = 50.0
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(noisy, keep)[-1, :4], got[-1, :4], **F64_TOL)
        assert (compiled(x, torch.ones_like(keep))[-1, :4] - got[-1, :4]).abs().max() > 1e-3   # the mask matters


# ---- a CNN -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,layout", [(F32, "contiguous"), (BF16, "contiguous"), (BF16, "channels_last")])
def test_conv_bn_relu_classifier(dtype, layout):
    """Conv + BatchNorm + ReLU twice (eval), ``AdaptiveAvgPool2d(1)``, a Linear + ReLU, dropout, the class Linear, the
    probabilities by softmax: the softmax swapped; in bf16 the hidden Linear with its ReLU (through the eval dropout).
    The convolutions left naming a convolution; the probabilities sum to 1."""
    model = seeded(ConvBNClassifier, dtype=dtype)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 9, 9, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"softmax": 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert "a convolution" in _left_why(since)["conv2d"]
    assert got.shape == (3, CLASSES)
    torch.testing.assert_close(got.float().sum(-1), torch.ones(3), rtol=0, atol=2e-2 if dtype == BF16 else 1e-6)
    if dtype == F32:
        _against_f64(model, got, x)


# ---- pre-norm, scaled residuals, GQA, SwiGLU -------------------------------------------------------------------------
@DTYPES
def test_scaled_residual_gqa_swiglu_block(dtype):
    """``x + 0.5 * attn(RMSNorm(x))`` then ``+ 0.5 * swiglu(RMSNorm(x))``: the first norm alone, the scaled residual +
    second norm as one add + RMSNorm, the causal GQA (``repeat_interleave``) through SDPA; in bf16 the gate's SiLU as
    its GEMM's epilogue. Causal: a change to the last token leaves the others."""
    model = seeded(ScaledResidualGQABlock, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"sdpa": 1, "add_norm": 1, "norm": 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert _whats(since, "add_norm") == ["add + rms_norm -> tilestack::add_rms_norm_fwd"]
    if dtype == BF16:
        assert _whats(since, "linear_epilogue") == [f"linear + silu {EPILOGUE}"]
        return
    _against_f64(model, got, x)
    moved = x.clone()
    moved[:, -1] += 3.0
    with torch.no_grad():
        torch.testing.assert_close(model(moved)[:, :-1], got[:, :-1], **F64_TOL)


# ---- masks of rank 2 and 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,rank,dtype", [("sdpa", 2, F32), ("sdpa", 3, F32), ("explicit", 2, F32),
                                             ("explicit", 3, F32), ("sdpa", 2, BF16), ("explicit", 3, BF16)])
def test_float_masks_of_rank_2_and_3(form, rank, dtype):
    """A (n, n) bias shared by every sequence and head, or an (H, n, n) one (ALiBi) shared by the sequences, with the
    causal -inf, as SDPA's ``attn_mask`` or added to the scores: taken, broadcast as eager broadcasts it; in bf16 the
    output projection with its residual. The bias matters (without it the output moves)."""
    model = seeded(RankedMaskAttention, form, rank, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert swaps == {attention: 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert "masked" in _whats(since, attention)[0] or "additive mask" in _whats(since, attention)[0]
    if dtype == F32:
        _against_f64(model, got, x)
        causal_only = seeded(RankedMaskAttention, form, rank)     # the causal -inf kept, the bias's values gone
        causal_only.bias.copy_(torch.where(model.bias.isinf(), model.bias, torch.zeros_like(model.bias)))
        with torch.no_grad():
            assert (causal_only(x) - got).abs().max() > 1e-3


# ---- a mask made in forward, three lengths ---------------------------------------------------------------------------
def test_causal_mask_made_in_forward_at_three_lengths():
    """``torch.ones(n, n).tril()`` made at the call's length: lengths 7, 11 and 5 (automatic dynamic: a second graph
    with a symbolic length, reused for 5), the attention and both norms swapped in each graph, each output float64's."""
    model = seeded(InlineCausalDecoder)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        for n in (7, 11, 5):
            x = _x(n=n, seed=n)
            _against_f64(model, compiled(x), x)
    reports = tc.reports()[since:]
    assert len(reports) == 2, [dict(r.swapped) for r in reports]
    for r in reports:
        assert dict(r.swapped) == {"explicit_attention": 1, "add_norm": 1, "norm": 1}, r.swapped


# ---- wav2vec 2.0's feature projection --------------------------------------------------------------------------------
@DTYPES
def test_layer_norm_of_transposed_conv_features(dtype):
    """A strided Conv1d, GELU, ``transpose(1, 2)`` (a non-contiguous (b, frames, C) view), LayerNorm, Linear: the
    LayerNorm swapped over the strided rows; the conv left as a convolution."""
    model = seeded(Wav2VecFeatureProjection, dtype=dtype)
    torch.manual_seed(4)
    wave = torch.randn(2, 1, 40, dtype=dtype)
    got, swaps, since = _compiled(model, wave, dtype=dtype)
    assert swaps == {"norm": 1}, swaps
    assert "a convolution" in _left_why(since)["conv1d"]
    if dtype == F32:
        _against_f64(model, got, wave)


# ---- what the report claims is in the graph --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dit", "deepnorm", "cnn", "gqa", "inline"])
def test_every_swap_reported_is_in_the_graph(name):
    """The rewritten graph (bf16: the GEMM epilogues too) holds one tilestack op call for each swap the report counts,
    pass by pass, and none other."""
    dtype = BF16
    x = _x(dtype=dtype)
    model, args = {
        "dit": (lambda: (seeded(DiTBlock, dtype=dtype), (x, _cond(dtype=dtype)))),
        "deepnorm": (lambda: (seeded(DeepNormBlock, dtype=dtype), (x, _keep(dtype=dtype)))),
        "cnn": (lambda: (seeded(ConvBNClassifier, dtype=dtype), (torch.randn(2, 3, 9, 9, dtype=dtype),))),
        "gqa": (lambda: (seeded(ScaledResidualGQABlock, dtype=dtype), (x,))),
        "inline": (lambda: (seeded(InlineCausalDecoder, dtype=dtype), (x,))),
    }[name]()
    swapped, held = _graph_ops(model, *args)
    assert swapped and dict(swapped) == dict(held), (swapped, held)


# ---- dynamic=True ----------------------------------------------------------------------------------------------------
def test_dit_dynamic_batch():
    """``dynamic=True`` over batches 2, 3 and 5 under ``torch.no_grad()``: the graph kept (the last report: Dynamo
    restarts the first trace once it specializes the norms' eps, a graph input at first) has its attention and both
    norms swapped, and no batch compiles again; each output float64's."""
    model = seeded(DiTBlock)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    with torch.no_grad():
        for b in (2, 3, 5):
            x, c = _x(b=b, seed=b), _cond(b=b, seed=b)
            _against_f64(model, compiled(x, c), x, c)
            if b == 2:
                compiled_once = len(tc.reports())
    assert len(tc.reports()) == compiled_once > since
    assert dict(tc.reports()[-1].swapped) == {"sdpa": 1, "add_norm": 1, "norm": 1}, tc.reports()[-1].swapped


# ---- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dit", "deepnorm", "gqa", "ranked", "cnn", "empty_memory"])
def test_training_through_the_backend(name):
    """Two SGD steps through the backend (``test_unseen_models_round12._trained``): the losses eager's and float64's,
    the first step's gradients within twice eager's own error against float64; the attention, norms and softmax
    swapped in the training graph (the GEMM epilogues are for inference graphs). The CNN's BatchNorm trains on its
    batch statistics."""
    if name == "dit":
        model, batches = seeded(DiTBlock, train=True), [(_x(seed=s), _cond(seed=s)) for s in (1, 2)]
        want = {"sdpa": 1, "add_norm": 1, "norm": 1}
    elif name == "deepnorm":
        model, batches = seeded(DeepNormBlock, train=True), [(_x(seed=s), _keep()) for s in (1, 2)]
        want = {"explicit_attention": 1, "add_norm": 2}
    elif name == "gqa":
        model, batches = seeded(ScaledResidualGQABlock, train=True), [(_x(seed=s),) for s in (1, 2)]
        want = {"sdpa": 1, "add_norm": 1, "norm": 1}
    elif name == "ranked":
        model, batches = seeded(RankedMaskAttention, "explicit", 3, train=True), [(_x(seed=s),) for s in (1, 2)]
        want = {"explicit_attention": 1}
    elif name == "empty_memory":      # no key: the attention's gradients those of an output of 0
        model = seeded(PaddedCrossAttention, "additive", train=True)
        batches = [(_x(n=4, seed=s), torch.randn(2, 0, D), torch.ones(2, 0, dtype=torch.bool)) for s in (1, 2)]
        want = {"explicit_attention": 1}
    else:
        model = seeded(ConvBNClassifier, train=True)
        model.drop.p = 0.0
        batches = [(torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
        want = {"softmax": 1}
    loss_of = (lambda y: -y[:, 3].log().mean()) if name == "cnn" else (lambda y: y.square().mean())   # noqa: E731
    since, _ = _trained(model, batches, loss_of)
    assert dict(tc.reports()[since].swapped) == want, tc.reports()[since].swapped


# ---- attention over no key -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["fill", "additive", "sdpa"])
@pytest.mark.parametrize("m", [0, 5])
def test_cross_attention_over_a_memory_that_may_be_empty(form, m):
    """A key padding mask as Hugging Face applies it (a finfo.min fill, the additive bias, SDPA's float mask) over a
    memory of 5 states (the last sequence's from 2 on padding) or none: the attention swapped either way; eager's
    output, float64's. With no memory the attention adds nothing but the output projection's bias (eager's softmax
    over no key is empty, its product with v 0). Before: the compile failed (BackendCompilerFailed from the softmax
    pass's check, "cannot reshape tensor of 0 elements into shape [-1, 0]") or the compiled model raised "amax():
    Expected reduction dim -1 to have non-zero size"."""
    model = seeded(PaddedCrossAttention, form)
    torch.manual_seed(5)
    y, memory = torch.randn(2, 4, D), torch.randn(2, m, D)
    keep = torch.ones(2, m, dtype=torch.bool)
    keep[-1, 2:] = False
    got, swaps, _ = _compiled(model, y, memory, keep)
    assert swaps == {"sdpa" if form == "sdpa" else "explicit_attention": 1}, swaps
    assert not got.isnan().any()
    _against_f64(model, got, y, memory, keep)
    if m == 0:
        with torch.no_grad():
            torch.testing.assert_close(got, y + model.out.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["deepnorm", "ranked_sdpa", "ranked_explicit"])
def test_self_attention_over_an_empty_sequence(name):
    """A batch of sequences of length 0 under a float mask (the -10000 padding bias, a sliced (n, n) or (H, n, n)
    bias): the empty output eager gives (was "amax(): Expected reduction dim -1 to have non-zero size")."""
    if name == "deepnorm":
        model, args = seeded(DeepNormBlock), (_x(n=0), torch.ones(2, 0))
    else:
        model, args = seeded(RankedMaskAttention, name.split("_")[1], 3 if name.endswith("explicit") else 2), (
            _x(n=0),)
    got, _, _ = _compiled(model, *args)
    assert got.shape == (2, 0, D)


def test_softmax_over_an_empty_last_dim():
    """``torch.softmax`` of (3, 0) rows beside a LayerNorm: the softmax swapped, its output eager's empty one (the op's
    ``reshape(-1, 0)`` raised inside the check: the whole compile failed)."""
    norm = seeded(torch.nn.LayerNorm, D)

    def f(x, s):
        return norm(x), F.softmax(s * 2.0, dim=-1)

    x, s = _x(), torch.randn(3, 0)
    got, swaps, _ = _compiled(f, x, s)
    assert swaps == {"norm": 1, "softmax": 1}, swaps
    assert got[1].shape == (3, 0)
    _close(got[0], norm(x).detach(), F32)
    assert math.isfinite(float(got[0].abs().max()))


class _NoFeatureLinear(torch.nn.Module):
    """``r + gelu(fc(x))`` with ``fc = Linear(0, D)``: a feature group that is empty for this batch (x (b, n, 0))."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(0, D)

    def forward(self, x, r):
        return r + F.gelu(self.fc(x))


def test_bf16_linear_of_no_input_feature():
    """A bf16 Linear of in_features 0 with a GELU and a residual: the GEMM epilogue swapped, the output eager's
    ``r + gelu(bias)`` (the op's ``reshape(-1, 0)`` raised inside the check: the whole compile failed)."""
    model = seeded(_NoFeatureLinear, dtype=BF16)
    torch.nn.init.normal_(model.fc.bias)
    x, r = torch.randn(2, 5, 0, dtype=BF16), _x(n=5, dtype=BF16)
    got, swaps, since = _compiled(model, x, r, dtype=BF16)
    assert swaps == {"linear_epilogue": 1}, swaps
    assert _whats(since, "linear_epilogue") == [f"linear + bias + gelu + residual add {EPILOGUE}"]
    want = (r.double() + F.gelu(model.fc.bias.detach().double())).to(BF16)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_tilestack_sdpa_over_no_key_under_torch_compile():
    """``tilestack.scaled_dot_product_attention`` itself in a compiled function, q a transposed view, no key: the
    output eager's 0 through a ``reshape`` after it (the op's fake took q's layout where the kernel's zeros are
    contiguous: the view traced on the fake failed); with keys, eager's too."""
    def f(q, k, v):
        return tilestack.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 4, -1)   # (b, n, H * hd)

    for nk in (0, 5):
        torch.manual_seed(nk)
        q = torch.randn(2, 4, 3, 8).transpose(1, 2)                                               # (b, H, n, hd)
        k, v = torch.randn(2, 3, nk, 8), torch.randn(2, 3, nk, 8)
        torch._dynamo.reset()
        got = torch.compile(f, backend="aot_eager")(q, k, v)
        torch.testing.assert_close(got, f(q, k, v), rtol=1e-5, atol=1e-5)
        if nk == 0:
            assert not got.any()
