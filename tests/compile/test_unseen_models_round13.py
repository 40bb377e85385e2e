"""The tilestack torch.compile backend on models it has never seen, round 13 (unseen_blocks_round13.py): GPT-NeoX's
parallel-residual layer (fused QKV in NeoX's layout, partial rotary, ``torch.where`` causal fill or SDPA's
``is_causal``, Linears called by keyword), Falcon-RW's multi-query attention with ALiBi (as SDPA's float mask, and
written out as two masks), an encoder-decoder layer's cross-attention under a key padding mask (one sequence with no
valid key at all), Swin's shifted-window attention (relative-position bias plus the shift mask folded into one bias),
attention forms whose meaning differs from the kernel's (scale 1 / hd, a query-side mask, a learned temperature, the
softmax over the queries, dropout in training), a teacher under ``torch.no_grad()`` inside forward, outputs that alias
the inputs, in-place ops on activations, a ``torch.autocast("cpu", bfloat16)`` region, ``mark_dynamic`` over batch and
length and the recompile a switch of grad mode makes. Each inference test: one graph and no break in
``torch._dynamo.explain``, one compile and none on a second call, eager's outputs within the dtype's tolerance and f32
within 1e-4 relative of float64, the report's swaps checked by name and text (``test_unseen_round9._compiled``).
Training: first-step gradients within twice eager's own error against float64, then SGD steps. Kernels on the
reference executor at tiny sizes (the size policy off), the rest through aot_eager.

Every model here compiled correctly as it was: no src change came from this file (this round's bugs are in
``tilestack.quantize``, test_unseen_models_round13_quant.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_models_round12 import _trained
from test_unseen_round9 import _compiled, _f64, _gap, _whats
from torch.utils._pytree import tree_leaves
from unseen_blocks_round13 import (
    HD,
    AliasingOutputs,
    AutocastBlock,
    CrossAttentionDecoderLayer,
    D,
    DistillBlock,
    FalconAlibiMQA,
    InplaceActivations,
    NeoXLayer,
    ScoresAttention,
    SwinShiftedBlock,
    seeded,
)

import tilestack
import tilestack.compile as tc

F32, BF16 = torch.float32, torch.bfloat16
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
NOT_CONSTANT = "s is not a 4-D q @ k^T times constants"


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _against_f64(model, got, *args):
    for g, w in zip(tree_leaves(got), tree_leaves(_f64(model, *args)), strict=True):
        torch.testing.assert_close(g.double(), w, **F64_TOL)


def _memory(b: int = 2, m: int = 5, seed: int = 3, empty: bool = False):
    """Encoder states (b, m, D) and their key padding mask (True: a real token): the last sequence's keys from 2 on
    padding, or (``empty``) none of them real."""
    torch.manual_seed(seed)
    keep = torch.ones(b, m, dtype=torch.bool)
    keep[-1, 0 if empty else 2:] = False
    return torch.randn(b, m, D), keep


# ---- inference -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,dtype", [("explicit", F32), ("sdpa", F32), ("explicit", BF16)],
                         ids=["explicit-f32", "sdpa-f32", "explicit-bf16"])
def test_neox_parallel_residual(form, dtype):
    """The causal attention (a ``torch.where`` with a 0-d finfo.min fill over a sliced ``tril`` buffer, or SDPA's
    is_causal) and both branch LayerNorms swapped; in bf16 the MLP's up projection + GELU and ``mlp + attn`` as the
    down projection's residual epilogue (``+ x`` after it stays). Causal: a change to the last token leaves every
    other output as it was."""
    model = seeded(NeoXLayer, form, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert swaps == {attention: 1, "norm": 2} | ({"linear_epilogue": 2} if dtype != F32 else {}), swaps
    if form == "explicit":
        assert _whats(since, attention) == [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with a boolean mask @ v -> "
                                            "tilestack::attention_fwd"]
    if dtype != F32:
        assert sorted(_whats(since, "linear_epilogue")) == [
            "linear + bias + gelu -> tilestack::linear_epilogue",
            "linear + bias + residual add -> tilestack::linear_epilogue"]
        return
    _against_f64(model, got, x)
    y = x.clone()
    y[:, -1] += 5.0
    with torch.no_grad():
        moved = model(y)
    torch.testing.assert_close(moved[:, :-1], got[:, :-1], **F64_TOL)
    assert _gap(moved[:, -1], got[:, -1]) > 1e-2


@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_falcon_alibi_multi_query(form):
    """SDPA over k and v expanded from one head with ALiBi and the causal fill folded into one (1, H, n, n) float mask:
    taken. Written out, ALiBi added to the scores then a causal ``masked_fill``: two masks, left with the reason (the
    softmax alone swapped). ALiBi matters: the slopes zeroed change the output."""
    model = seeded(FalconAlibiMQA, form)
    x = _x(n=9)
    got, swaps, since = _compiled(model, x)
    if form == "sdpa":
        assert swaps == {"sdpa": 1}, swaps
    else:
        assert swaps == {"softmax": 1}, swaps
        assert any(NOT_CONSTANT in why and "two" in why for why in _declined("explicit_attention", since))
    _against_f64(model, got, x)
    flat = copy.deepcopy(model)
    flat.slopes.zero_()
    with torch.no_grad():
        assert _gap(flat(x), got) > 1e-3


@pytest.mark.parametrize("empty", [False, True], ids=["padded", "no-valid-key"])
@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_cross_attention_with_key_padding(form, empty):
    """Causal self-attention and cross-attention of 7 decoder tokens over 5 encoder states (the (b, 1, 1, m) key
    padding mask: boolean for SDPA, a finfo.min ``masked_fill`` written out) both swapped, with the three post-LN
    residual + LayerNorms. The padding holds: the padded encoder states changed, the output stays. With no valid key
    (``no-valid-key``), the written-out layer's last sequence averages every value uniformly, as eager does."""
    model = seeded(CrossAttentionDecoderLayer, form)
    y = _x()
    memory, keep = _memory(empty=empty)
    got, swaps, since = _compiled(model, y, memory, keep)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert swaps == {attention: 2, "add_norm": 3}, swaps
    if form == "explicit":
        assert _whats(since, attention) == 2 * [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with masked_fill(cond, -inf) @ "
                                                "v -> tilestack::attention_fwd"]
    _against_f64(model, got, y, memory, keep)
    if not empty:
        noisy = memory.clone()
        noisy[-1, 2:] = 100.0
        with torch.no_grad():
            torch.testing.assert_close(model(y, noisy, keep), got, **F64_TOL)
            assert _gap(model(y, noisy, torch.ones_like(keep)), got) > 1e-2


def test_swin_shifted_window_attention():
    """The windows' attention with the relative-position bias and the shift mask summed into one (b * windows, H, N, N)
    additive bias (q scaled before the product) swapped, the first LayerNorm, and the residual + second LayerNorm as
    one add + norm. The shift mask matters: zeroed, the output changes."""
    model = seeded(SwinShiftedBlock)
    x = torch.randn(2, 36, D)
    got, swaps, since = _compiled(model, x)
    assert swaps == {"explicit_attention": 1, "add_norm": 1, "norm": 1}, swaps
    assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with an additive mask @ v "
                                                   "-> tilestack::attention_fwd"]
    _against_f64(model, got, x)
    unmasked = copy.deepcopy(model)
    unmasked.attn_mask.zero_()
    with torch.no_grad():
        assert _gap(unmasked(x), got) > 1e-3


@pytest.mark.parametrize("form", ["mup", "query-mask", "temperature", "softmax-queries", "dropout-eval"])
def test_attention_forms_that_differ(form):
    """Taken with their own meaning: muP's scale 1 / hd (the report says 0.125, not hd^-0.5), a (b, 1, n, 1) query-side
    mask (a constant per row: the output is the unmasked one), nn.Dropout in eval. Left with the reason: a learned
    temperature (a parameter, not a constant), the softmax over dim -2."""
    model = seeded(ScoresAttention, form.removesuffix("-eval"))
    x = _x()
    row_bias = torch.randn(2, 1, 7, 1)
    got, swaps, since = _compiled(model, x, row_bias)
    _against_f64(model, got, x, row_bias)
    if form in ("mup", "query-mask", "dropout-eval"):
        assert swaps == {"explicit_attention": 1}, swaps
        scale = 1 / HD if form == "mup" else HD ** -0.5
        mask = " with an additive mask" if form == "query-mask" else ""
        assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {scale:.4g}){mask} @ v -> "
                                                       "tilestack::attention_fwd"]
        if form == "query-mask":
            with torch.no_grad():
                torch.testing.assert_close(model(x, torch.zeros_like(row_bias)), got, **F64_TOL)
    elif form == "temperature":
        assert swaps == {"softmax": 1}, swaps
        assert any(NOT_CONSTANT in why for why in _declined("explicit_attention", since))
    else:
        assert swaps == {}, swaps
        assert any("dim -2" in why for why in _declined("softmax", since))


def test_dropout_on_probabilities_in_training():
    """nn.Dropout(0.25) on the probabilities in train mode: the attention declined naming the dropout (the softmax
    alone swapped); at one seed the compiled output and gradients are eager's (no random draw moved)."""
    model = seeded(ScoresAttention, "dropout", train=True)
    eager = copy.deepcopy(model)
    x = _x()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    torch.manual_seed(7)
    got = compiled(x)
    torch.manual_seed(7)
    want = eager(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for g, w in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-6)
    assert [r.swapped for r in tc.reports()[since:]] == [{"softmax": 1}]
    assert any("dropout on the probabilities" in why for why in _declined("explicit_attention", since))


def test_no_grad_teacher_inside_forward():
    """The teacher's Linear + parameter-free LayerNorm under ``torch.no_grad()`` inside forward and the student's
    LayerNorm: both norms swapped; outputs eager's and float64's."""
    model = seeded(DistillBlock)
    x = _x()
    got, swaps, _ = _compiled(model, x)
    assert swaps == {"norm": 2}, swaps
    _against_f64(model, got, x)


def test_no_grad_teacher_in_a_training_forward():
    """The student trained against the teacher run under ``torch.no_grad()`` inside forward: both norms swapped in the
    training graph; the loss eager's, the teacher gets no gradient, the student's gradients within twice eager's own
    error against float64."""
    model = seeded(DistillBlock, train=True)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x = _x()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    losses = []
    for fn, a in ((compiled, x), (eager, x), (ref, x.double())):
        y, dist = fn(a)
        loss = y.pow(2).mean() + dist
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert tc.reports()[since].swapped == {"norm": 2}, tc.reports()[since].swapped
    assert model.teacher.weight.grad is None and eager.teacher.weight.grad is None
    student = [n for n, _ in model.named_parameters() if not n.startswith("teacher")]
    for name in student:
        g, e, r = (m.get_parameter(name).grad.double() for m in (model, eager, ref))
        assert float((g - r).abs().max()) <= 2 * float((e - r).abs().max()) + 1e-6, name


def test_outputs_aliasing_the_inputs():
    """A dict holding the input itself, a transposed view of it, the (float) mask, the normalized rows and a tuple
    (the ReLU MLP + residual, a flattened view of the norm's output, a slice of the input): in bf16 the norm and the
    Linear + ReLU + residual swapped; the returned input is the input, its views are views of it (a write through
    one shows in the input), the view of the norm's output shares its storage."""
    model = seeded(AliasingOutputs, dtype=BF16)
    x, mask = _x(dtype=BF16), torch.ones(2, 7)
    got, swaps, since = _compiled(model, x, mask, dtype=BF16)
    assert swaps == {"norm": 1, "linear_epilogue": 1}, swaps
    assert _whats(since, "linear_epilogue") == ["linear + bias + relu + residual add -> tilestack::linear_epilogue"]
    assert got["x"] is x and got["mask"] is mask
    z, flat, first = got["rest"]
    assert got["xt"].data_ptr() == x.data_ptr() and first.data_ptr() == x.data_ptr()
    assert flat.data_ptr() == got["y"].data_ptr()
    got["xt"][0, 0, 0] = 123.0
    assert float(x[0, 0, 0]) == 123.0


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_inplace_ops_on_activations(dtype):
    """``h.mul_(0.5)`` between the up projection and its GELU and ``u.add_(1.0)`` after the down projection end those
    GEMM chains (no epilogue reaches across a write); the norm swapped; in bf16 the side branch's ``relu_`` then
    ``+=`` (nothing else reads the Linear's output) as the GEMM's relu + residual epilogue."""
    model = seeded(InplaceActivations, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert swaps == {"norm": 1} | ({"linear_epilogue": 1} if dtype != F32 else {}), swaps
    if dtype != F32:
        assert _whats(since, "linear_epilogue") == ["linear + bias + relu + residual add -> "
                                                    "tilestack::linear_epilogue"]
        return
    _against_f64(model, got, x)


def test_cpu_autocast_region():
    """An f32 model whose forward runs under ``torch.autocast("cpu", bfloat16)``: the attention (bf16 q, k, v from the
    autocast Linear) and both LayerNorms (of the f32 stream) swapped; the MLP's Linear + GELU declined naming the
    autocast region; outputs eager's within bf16's tolerance."""
    model = seeded(AutocastBlock)
    x = _x()
    got, swaps, since = _compiled(model, x, dtype=BF16)
    assert got.dtype == F32
    assert swaps == {"explicit_attention": 1, "norm": 2}, swaps
    assert any("inside a torch.autocast(torch.bfloat16) region" in why for why in _declined("linear_epilogue", since))


# ---- dynamic shapes and recompiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["explicit"])
def test_neox_over_batches_and_lengths(form):
    """NeoX's layer over (batch, length) (2, 7), (3, 5), (4, 12), both dims of the first input ``mark_dynamic`` (the
    causal buffer sliced and the rotary tables built at the symbolic length): one graph serving all, its attention and
    two norms swapped; each output eager's."""
    model = seeded(NeoXLayer, form)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    for i, (b, n) in enumerate(((2, 7), (3, 5), (4, 12))):
        x = _x(b, n, seed=b + n)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert [r.swapped for r in tc.reports()[since:]] == [{attention: 1, "norm": 2}]


def test_cross_attention_over_memory_lengths():
    """The cross-attention layer over encoder lengths 5, 8 and 3 (the memory and its mask ``mark_dynamic`` on dim 1):
    one graph, both attentions and the three add + norms swapped, each output eager's."""
    model = seeded(CrossAttentionDecoderLayer, "explicit")
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    y = _x()
    for i, m in enumerate((5, 8, 3)):
        memory, keep = _memory(m=m, seed=m)
        if i == 0:
            torch._dynamo.mark_dynamic(memory, 1)
            torch._dynamo.mark_dynamic(keep, 1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(y, memory, keep), model(y, memory, keep), rtol=1e-4, atol=1e-5)
    assert [r.swapped for r in tc.reports()[since:]] == [{"explicit_attention": 2, "add_norm": 3}]


def test_recompile_when_grad_mode_changes():
    """The bf16 NeoX layer called under no_grad, then with gradients, then under no_grad again: two graphs (the third
    call reuses the first), the GEMM epilogues only in the one without gradients; each output eager's."""
    model = seeded(NeoXLayer, "explicit", dtype=BF16)
    x = _x(dtype=BF16)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        first, want = compiled(x), model(x)
    torch.testing.assert_close(first, want, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(compiled(x).detach(), want, rtol=5e-2, atol=5e-2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), first)
    assert [r.swapped for r in tc.reports()[since:]] == [
        {"explicit_attention": 1, "norm": 2, "linear_epilogue": 2}, {"explicit_attention": 1, "norm": 2}]
    assert any("a graph that needs gradients" in why for why in _declined("linear_epilogue", since))


# ---- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neox-explicit", "cross", "swin"])
def test_training_through_the_backend(name):
    """Two SGD steps through the backend: losses and first-step gradients as eager's against float64. Swin's
    attention is declined in training (its mask is made from the bias table, a parameter: it needs a gradient), its
    softmax swapped."""
    if name.startswith("neox"):
        model = seeded(NeoXLayer, name.split("-")[1], train=True)
        batches = [(_x(seed=s),) for s in (3, 4)]
        swaps = {"sdpa" if name.endswith("sdpa") else "explicit_attention": 1, "norm": 2}
    elif name == "cross":
        model = seeded(CrossAttentionDecoderLayer, "explicit", train=True)
        batches = [(_x(seed=s), *_memory(seed=s)) for s in (3, 4)]
        swaps = {"explicit_attention": 2, "add_norm": 3}
    elif name == "swin":
        model = seeded(SwinShiftedBlock, train=True)
        batches = [(torch.randn(2, 36, D),) for _ in range(2)]
        swaps = {"add_norm": 1, "norm": 1, "softmax": 1}
    since, _ = _trained(model, batches, lambda y: y.pow(2).mean())
    assert tc.reports()[since].swapped == swaps, tc.reports()[since].swapped
    if name == "swin":
        assert any("gradient" in why for why in _declined("explicit_attention", since))


def test_float64_model_is_declined():
    """A float64 NeoX layer: every kernel declined naming float64 (the report), the output eager's."""
    model = seeded(NeoXLayer, "explicit", dtype=torch.float64)
    x = _x(dtype=torch.float64)
    since = len(tc.reports())
    with torch.no_grad():
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
        torch.testing.assert_close(got, model(x))
    assert tc.reports()[since].swapped == {}
    assert any("float64" in why for why in _declined("explicit_attention", since) + _declined("norm", since))
