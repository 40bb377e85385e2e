"""The tilestack torch.compile backend on models it has never seen, round 11 (unseen_blocks_round11.py), in inference:
an ALBERT encoder whose one layer runs three times in a Python loop and which returns a dict of every layer's hidden
states; attention with the scale folded in elsewhere (on k^T inside the product, split over q and k in an einsum, after
an ALiBi bias, after a causal fill), masked otherwise (``masked_fill_`` in place, seven forms, ``torch.where(mask, -inf,
s)``, a ``logsumexp`` softmax, ``softmax(dim=3)``), a talking-heads softmax over the heads; RMSNorm over 2-D rows,
channels-first and with ``keepdim=False``, a hand LayerNorm; a tanh-GELU MLP with its residual on the left, through
``torch.add``, with ``alpha``, scaled, and as Hugging Face GPT-2's ``Conv1D`` (``torch.addmm``); rotary written into q
and k in place through slices; an attention inside ``torch.autocast``. For each: ``torch._dynamo.explain`` finds one
graph and no break, the tilestack backend compiles one graph and nothing on a second call, the outputs are eager's
within the dtype's tolerance and (f32) a float64 run's, the report names what was swapped and why the rest was left,
and a form that differs from what a kernel computes is left and shown to matter. The kernels run on the reference
executor at tiny sizes (the size policy off), the rest through aot_eager (helpers from test_unseen_round9).

What this round found and fixed (src/tilestack/compile/patterns): scores filled in place (``s.masked_fill_(cond,
-inf)`` then ``softmax(s)``) were declined as "a write between the pattern's nodes"; they are the masked attention
now, in each form where nothing else reads the scores (attention.py, ``_filled_in_place``). Hugging Face GPT-2's
``Conv1D`` (``torch.addmm(bias, x2d, w).view(...)``) was not seen as a GEMM (only aten's addmm was), so its GELU and
residual were left as "no tilestack kernel for it"; they are its epilogue now (match.py), and a lone one is left
with a Linear's reason (patterns/__init__.py, LEFT_REASONS). Left, correct, with the
reason: a scale after an additive bias or a fill, ``torch.where`` with the fill first, a logsumexp softmax, a softmax
over the heads, RMSNorm over a dim other than the last or without keepdim, a hand LayerNorm, a residual with alpha or
scaled."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_round9 import _compiled, _f64, _gap, _left_why, _whats
from unseen_blocks_round11 import (
    HD,
    AutocastAttention,
    D,
    HandNorm,
    InPlaceBiasAttention,
    InPlaceFillAttention,
    InPlaceRotary,
    ResidualMLP,
    ScaleFoldAttention,
    SharedLoopEncoder,
    TalkingHeads,
    alibi,
    seeded,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
GENERIC = "s is not a 4-D q @ k^T times constants"


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _against_f64(model, got, *args):
    torch.testing.assert_close(got.double(), _f64(model, *args), **F64_TOL)


def _attention_what(scale: float, how: str) -> list[str]:
    return [f"softmax(q @ k^T * {scale:.4g}){how} @ v -> tilestack::attention_fwd"]


def _causal_holds(model, x):
    """Changing the later tokens leaves the first token's output as it was, and changes the last token's."""
    y = x.clone()
    y[:, 1:] += 1.0
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, 0], b[:, 0], **F64_TOL)
    assert _gap(a[:, -1], b[:, -1]) > 1e-2


# ---- ALBERT: one layer in a loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_albert_layer_run_three_times_in_a_loop(dtype):
    """The shared layer's attention swapped at each of its three calls (q scaled before the product, the padding bias
    added) and its two post-LN residual + LayerNorms fused each time; the dict and its tuple of hidden states are
    eager's. Against float64 (f32); and the padding holds: the padded tokens of the second sequence changed, every
    unpadded token's output stays as it was."""
    model = seeded(SharedLoopEncoder, dtype=dtype)
    x = _x(dtype=dtype)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    got, swaps, since = _compiled(model, x, mask, dtype=dtype)
    # 16 bits: fc1 + tanh GELU as a GEMM epilogue too, at each of the three calls (tilestack's GEMM takes 16 bits)
    assert swaps == {"explicit_attention": 3, "add_norm": 6} | ({"linear_epilogue": 3} if dtype != F32 else {}), \
        swaps
    assert _whats(since, "explicit_attention") == 3 * _attention_what(HD ** -0.5, " with an additive mask")
    assert set(got) == {"last_hidden_state", "hidden_states"} and len(got["hidden_states"]) == 4
    if dtype == F32:
        want = _f64(model, x, mask)
        for g, w in zip(got["hidden_states"], want["hidden_states"], strict=True):
            torch.testing.assert_close(g.double(), w, **F64_TOL)
        y = x.clone()
        y[1, 5:] = 10.0
        with torch.no_grad():
            other = model(y, mask)["last_hidden_state"]
        torch.testing.assert_close(other[1, :5], got["last_hidden_state"][1, :5], **F64_TOL)


# ---- the scale and the mask elsewhere -------------------------------------------------------------------------------
@pytest.mark.parametrize("form,scale,how", [
    ("k_scaled", HD ** -0.5, " with masked_fill(cond, -inf)"),
    ("split_einsum", 1.0, " with an additive mask"),
    ("fill_inplace", HD ** -0.5, " with masked_fill(cond, -inf)"),
    ("dim3", HD ** -0.5, " with masked_fill(cond, -inf)"),
])
def test_scale_folded_elsewhere_taken(form, scale, how):
    """The scale on k^T inside the product, split as hd ** -0.25 over q and k in an einsum (q and k scaled by the
    graph, the kernel's scale 1), a ``masked_fill_`` in place, ``softmax(dim=3)``: one attention each, float64's
    outputs, and the causal mask holds."""
    model = seeded(ScaleFoldAttention, form)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"explicit_attention": 1}, swaps
    assert _whats(since, "explicit_attention") == _attention_what(scale, how)
    _against_f64(model, got, x)
    _causal_holds(model, x)


@pytest.mark.parametrize("form", ["after_bias", "after_fill", "where_fill_first", "logsumexp"])
def test_scale_or_mask_in_other_forms_left(form):
    """Left to Inductor, the outputs float64's: the scale after an ALiBi bias (the bias scaled too: not q k^T * c +
    bias, and the difference is shown), the scale after the causal fill, ``torch.where(causal, -inf, s)`` (the fill
    first) and a softmax written as exp(s - logsumexp(s)) (no softmax node)."""
    model = seeded(ScaleFoldAttention, form)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert "explicit_attention" not in swaps, swaps
    assert swaps == ({} if form == "logsumexp" else {"softmax": 1}), swaps
    if form != "logsumexp":
        assert any(GENERIC in why for why in _declined("explicit_attention", since))
    _against_f64(model, got, x)
    if form == "after_bias":             # the kernel's form, q k^T * c + bias, answers otherwise
        with torch.no_grad():
            b, n, _ = x.shape
            q, k, v = model.qkv(x).view(b, n, 3, 4, HD).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-2, -1) * HD ** -0.5 + alibi(n, x.dtype)
            unscaled_bias = model.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D))
        assert _gap(unscaled_bias, got) > 1e-3
    else:
        _causal_holds(model, x)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("form", ["unused", "assigned", "late_mask", "padding", "f32_softmax"])
def test_scores_filled_in_place_taken(form, dtype):
    """``s.masked_fill_(mask, -inf)`` (its result unused, or assigned back, filled with -finfo.max, the mask built
    after the scores, a key padding mask, the softmax in f32 then cast back): one attention with the write as its
    mask (declined before as a write between the pattern's nodes). Float64's outputs (f32), the causal mask holds,
    and the padded keys of the second sequence changed leave its outputs as they were."""
    model = seeded(InPlaceFillAttention, form, dtype=dtype)
    x = _x(dtype=dtype)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    got, swaps, since = _compiled(model, x, keep, dtype=dtype)
    assert swaps == {"explicit_attention": 1}, swaps
    assert _whats(since, "explicit_attention") == _attention_what(HD ** -0.5, " with masked_fill(cond, -inf)")
    if dtype != F32:
        return
    _against_f64(model, got, x, keep)
    if form == "padding":
        y = x.clone()
        y[1, 4:] = 5.0
        with torch.no_grad():
            torch.testing.assert_close(model(y, keep)[1, :4], got[1, :4], **F64_TOL)
    else:
        _causal_holds(lambda t: model(t, keep), x)


@pytest.mark.parametrize("form,why", [
    ("returned", "s read elsewhere too"),
    ("fill_1e9", "a masked_fill_ of the scores with -1e+09, not their dtype's lowest value"),
])
def test_scores_filled_in_place_declined(form, why):
    """The filled scores returned too (the rewrite would compute the attention twice), and a -1e9 fill (not the
    dtype's lowest: masked keys can get weight): declined with that reason; eager's outputs (the returned scores
    are the filled ones) and float64's."""
    model = seeded(InPlaceFillAttention, form)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"softmax": 1}, swaps
    assert any(why in w for w in _declined("explicit_attention", since)), _declined("explicit_attention", since)
    if form == "returned":
        assert torch.isinf(got[1]).sum() == 2 * 4 * 21            # the 21 masked (i, j) of 7 causal rows per head
        torch.testing.assert_close(got[0].double(), _f64(model, x)[0], **F64_TOL)
    else:
        _against_f64(model, got, x)


@pytest.mark.parametrize("form", ["sdpa", "late_bias"])
def test_padding_bias_built_in_place(form):
    """A padding bias made by ``zeros`` then ``masked_fill_``: before SDPA, its attn_mask, taken; made after the
    scores and added to them, declined naming the write between the pattern's nodes (the replacement would read the
    bias before it). Float64's outputs either way, and the padded tokens changed leave the others' outputs."""
    model = seeded(InPlaceBiasAttention, form)
    x = _x()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    got, swaps, since = _compiled(model, x, keep)
    if form == "sdpa":
        assert swaps == {"sdpa": 1}, swaps
    else:
        assert swaps == {"softmax": 1}, swaps
        assert any("masked_fill_ (masked_fill_) writes m in place between the pattern's nodes" in w
                   for w in _declined("explicit_attention", since)), _declined("explicit_attention", since)
    _against_f64(model, got, x, keep)
    y = x.clone()
    y[1, 4:] = 5.0
    with torch.no_grad():
        torch.testing.assert_close(model(y, keep)[1, :, :4], got[1, :, :4], **F64_TOL)     # (H, 4 queries, HD)


def test_talking_heads_softmax_over_the_heads_left():
    """A softmax over dim 1 of (b, H, n, n) (over the heads): declined naming the dim; the attention after the head
    mix is not q @ k^T times constants (left); the last softmax swapped; float64's outputs."""
    model = seeded(TalkingHeads)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"softmax": 1}, swaps
    assert "softmax over dim 1, not the last" in _left_why(since).get("softmax", "")
    _against_f64(model, got, x)


# ---- norms ----------------------------------------------------------------------------------------------------------
def test_rms_norm_over_2d_rows_taken():
    """``mean(1, keepdim=True)`` of (b * n, D) rows is the last dim: the written-out RMSNorm swapped; float64's."""
    model = seeded(HandNorm, "rows_2d")
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"norm": 1}, swaps
    assert _whats(since, "norm") == ["x * rsqrt(mean(x^2) + eps) * w (written out) -> tilestack::rms_norm_fwd"]
    _against_f64(model, got, x)


@pytest.mark.parametrize("form", ["channels_first", "no_keepdim", "hand_layernorm"])
def test_norms_not_over_rows_left(form):
    """RMSNorm over dim 1 of (b, D, n) (channels-first: not the rows the kernel normalizes), with ``keepdim=False``
    then ``unsqueeze``, and a LayerNorm written by hand: nothing swapped, float64's outputs. The channels-first norm
    differs from one over the last dim of the same tensor."""
    model = seeded(HandNorm, form)
    x = _x()
    got, swaps, _ = _compiled(model, x)
    assert swaps == {}, swaps
    _against_f64(model, got, x)
    if form == "channels_first":       # the same weights normalizing the transposed tensor's last dim (n = 7)
        with torch.no_grad():
            c = x.transpose(1, 2)
            wrong = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)
            assert _gap(model.fc((wrong * model.w[:, None]).transpose(1, 2)), got) > 1e-2


# ---- GEMM epilogues -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,head", [("residual_left", "linear"), ("torch_add", "linear"), ("conv1d", "addmm")])
def test_mlp_residual_forms_fused(form, head):
    """bf16: ``x + fc2(gelu_tanh(fc1(x)))``, ``torch.add(x, ...)`` and GPT-2's Conv1D (``torch.addmm`` then a view,
    not seen as a GEMM before): two GEMM epilogues, the first with the bias and tanh GELU, the second with the bias and
    the residual add (the residual on the left); eager's outputs within bf16's tolerance, and near float64."""
    model = seeded(ResidualMLP, form, dtype=BF16)
    x = _x(dtype=BF16)
    got, swaps, since = _compiled(model, x, dtype=BF16)
    assert swaps == {"linear_epilogue": 2}, swaps
    want = [f"{head} + bias + gelu_tanh -> tilestack::linear_epilogue",
            f"{head} + bias + residual add -> tilestack::linear_epilogue"]
    assert _whats(since, "linear_epilogue") == want
    torch.testing.assert_close(got.double(), _f64(model, x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("form", ["alpha", "scaled"])
def test_mlp_residual_look_alikes_left(form):
    """``torch.add(x, y, alpha=0.5)`` and ``x + 0.5 * y``: no residual epilogue (only fc1 + GELU fused); eager's
    outputs, and they differ from x + y."""
    model = seeded(ResidualMLP, form, dtype=BF16)
    x = _x(dtype=BF16)
    got, swaps, since = _compiled(model, x, dtype=BF16)
    assert swaps == {"linear_epilogue": 1}, swaps
    assert _whats(since, "linear_epilogue") == ["linear + bias + gelu_tanh -> tilestack::linear_epilogue"]
    plain = copy.deepcopy(model)
    plain.form = "residual_left"
    with torch.no_grad():
        assert _gap(plain(x), got) > 1e-2


def test_conv1d_with_a_row_bias_declined():
    """``torch.addmm`` with a (m, n) bias (one per element, not per column): the epilogue declines it naming the
    bias; eager's outputs."""
    model = seeded(ResidualMLP, "conv1d", dtype=BF16)
    x = _x(dtype=BF16)
    with torch.no_grad():
        model.fc2.bias = torch.nn.Parameter(torch.randn(14, D, dtype=BF16) * 0.1)
    got, swaps, since = _compiled(model, x, dtype=BF16)
    assert swaps == {"linear_epilogue": 1}, swaps
    assert any("a bias that is not one float per output column" in w for w in _declined("linear_epilogue", since))
    assert "a Linear written out: GPT-2's Conv1D" in _left_why(since)["addmm"]


# ---- in-place rotary, autocast --------------------------------------------------------------------------------------
def test_rotary_written_in_place_through_slices():
    """q[..., :R] = rotated and a class token bumped in place: the SDPA after the writes swapped (it reads the
    written tensors); float64's outputs; and the rotation matters (zero frequencies, i.e. no rotary, answer
    otherwise)."""
    model = seeded(InPlaceRotary)
    x = _x()
    got, swaps, since = _compiled(model, x)
    assert swaps == {"sdpa": 1}, swaps
    _against_f64(model, got, x)
    _causal_holds(model, x)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_attention_inside_autocast(dtype):
    """An f32 attention inside ``torch.autocast("cpu", dtype)``: swapped (its products in 16 bits, as autocast runs
    them), the output in that dtype as eager's, and within bf16's rounding of the float64 model without autocast."""
    model = _autocast_model(dtype)
    x = _x()
    got, swaps, since = _compiled(model, x, dtype=dtype)
    assert got.dtype == dtype
    assert swaps == {"explicit_attention": 1}, swaps
    with torch.autocast("cpu", enabled=False):
        ref = copy.deepcopy(model).double()
        ref.forward = lambda t: ref.o(_plain(ref, t))
        torch.testing.assert_close(got.double(), ref(x.double()), rtol=5e-2, atol=5e-2)


def _autocast_model(dtype):
    torch.manual_seed(0)
    return AutocastAttention(dtype).eval()


def _plain(m, x):
    b, n, _ = x.shape
    q, k, v = m.qkv(x).view(b, n, 3, 4, HD).permute(2, 0, 3, 1, 4)
    y = (q @ k.transpose(-1, -2) * HD ** -0.5).softmax(-1) @ v
    return y.transpose(1, 2).reshape(b, n, D)
