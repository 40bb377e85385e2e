"""Third held-out round for the model profiler (tests/perf/perf_models_round3.py): an LSTM language model with a
projection and its loss, recurrent cells in a Python loop, a ConvTranspose1d/GLU/weight-norm audio net, a
GroupNorm/SiLU/Hardswish mobile block, a U-Net with nearest and bilinear upsampling, scatter-based expert routing,
an EmbeddingBag recommender, a ViT (also under inference_mode), bilinear attention (three-operand einsum,
nn.Bilinear), FNet's FFT mixing, in-place updates through views, bf16 and float64 models.

Every matmul and convolution is checked against its analytic count written from the layer shapes (2*M*N*K; a
convolution 2 * output positions * C_out * C_in/groups * kernel taps, plus one add per output for a bias), never
against the profiler's own numbers. An op that does arithmetic is either counted or reported unsupported: a
zero count is allowed only for the data-movement ops named here. Timings are only checked to be finite.
"""

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tilestack.errors import LaunchError
from tilestack.perf import formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round3 as pm  # noqa: E402
from profile_support import CEIL, NOT_AS_TORCH, REL, TORCH_COUNTED, Profiles, by_op, cases, conv, flops_of  # noqa: E402

# Ops whose count of 0 FLOPs is right: copies, layout, gathers, index bookkeeping, sorting, allocation.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::embedding", "aten::zeros",
    "aten::new_zeros", "aten::select_backward", "aten::reflection_pad1d", "aten::upsample_nearest2d",
    "aten::gather", "aten::index",
    "aten::index_select", "aten::scatter", "aten::tril_indices", "aten::im2col",
    "aten::repeat", "aten::masked_fill", "aten::masked_fill_", "aten::scalar_tensor",
    "aten::linspace", "aten::fill_", "aten::unsqueeze_",  # affine_grid's base grid, where autograd decomposes it
    "aten::arange", "aten::index_fill",  # trace's backward writes dy onto the diagonal
    "aten::randn_like",  # noisy gating's draw
    "aten::zeros_like", "aten::ones_like", "aten::full_like",  # fills: their bytes written (round 25)
    "aten::eye", "aten::tril", "aten::_linalg_check_errors",  # the Gaussian process's jitter, factor, info check
    "aten::diag_embed",  # slogdet's backward
}
FFT = {"aten::_fft_c2c", "aten::_fft_r2c", "aten::_fft_c2r"}  # torch has no formula; tilestack's since round 5
SOFT_CLIP = f"{pm.CUSTOM_NAMESPACE}::soft_clip"
UNSUPPORTED = {"custom_op": {SOFT_CLIP}}  # what each model runs that has no FLOP formula
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CASES, IDS = cases(pm.MODELS)
profiled = Profiles(pm.MODELS)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_profile_adds_up_counts_every_op_and_renders(name, train):
    p, counts, theirs = profiled(name, train)
    counted_flops = math.fsum(c.flops for c in counts.values())
    counted_bytes = math.fsum(c.bytes_read + c.bytes_written for c in counts.values())
    rows_flops = math.fsum(o.m.flops * o.calls for o in p.ops)
    assert rows_flops == pytest.approx(counted_flops, rel=REL), p.untimed  # every counted FLOP has a timed row
    assert math.fsum(u.flops for u in p.untimed) == 0
    assert p.flops == pytest.approx(counted_flops, rel=REL) and p.bytes == pytest.approx(counted_bytes, rel=REL)
    assert p.flops > 0 and p.ops
    assert math.fsum(o.share for o in p.ops) == pytest.approx(1.0)
    # An (other) row is time no op accounts for, not the float rounding of summing the rows (1e-18 s rows).
    assert all(o.total_s > 1e-9 * p.step_s for o in p.ops if o.op == profile.OTHER)
    # An op that computes is counted or named unsupported, never a silent 0.
    ours = by_op(counts)
    silent = {op for (op, _), c in counts.items() if c.flops == 0 and not c.unsupported
              and c.bytes_read + c.bytes_written > 0} - DATA_MOVEMENT
    assert not silent, silent
    assert set(p.unsupported) == UNSUPPORTED.get(name, set()), p.unsupported
    # Where torch has a formula, the same number (convolutions are checked by hand below).
    for op, n in theirs.items():
        if op not in NOT_AS_TORCH:
            assert ours.get(op, 0.0) == n, (op, ours.get(op), n)
    for op in (set(ours) & TORCH_COUNTED) - NOT_AS_TORCH:
        assert ours[op] == theirs.get(op, 0), op
    for o in p.ops:
        m = o.m
        for v in (m.flops, m.bytes_read, m.bytes_written, m.intensity, m.flops_per_s, m.bytes_per_s, m.latency_s):
            assert math.isfinite(v) and v >= 0, (o.label, v)
        if o.counted and o.flops_known and o.m.flops > 0:
            # Placed only under a compute peak for its dtype (CEIL has none for float64): else its bound is unknown.
            placed = CEIL.peak(o.m.dtype) is not None
            assert o.bound in (("memory", "compute") if placed else ("unknown",)) and o.tip, (o.label, o.m.dtype)
            assert (o.roof_fraction is not None) == placed, o.label
    out = io.StringIO()
    profile.print_profile(p, con=Console(file=out, width=1000))
    text = out.getvalue()
    assert name in text and "hot spots" in text
    assert ("no FLOP formula for" in text) == bool(p.unsupported)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_matmuls_and_convolutions_move_at_least_their_operands(name, train):
    """A matmul reads its operands (and a bias) and writes its product; a convolution reads input and weight.

    An operand is read as held: the loss's gradient expanded from one element, a weight expanded over a batch
    (linear on a 3-d input under inference_mode), one tensor on both sides (x @ x^T) read once. So the least a
    matmul reads is its smaller operand; the exact bytes of chosen ops are checked in the tests per model."""
    _, counts, _ = profiled(name, train)
    for (op, shapes), c in counts.items():
        e = formulas.dtype_bytes(c.dtype or "fp32")
        per_call_read, per_call_written = c.bytes_read / c.calls, c.bytes_written / c.calls
        if op in MATMULS:
            m, n = shapes[-2][-2], shapes[-1][-1]
            batch = math.prod(shapes[-1][:-2])
            operands = [math.prod(s) for s in shapes[-2:]]
            assert per_call_read >= e * min(operands), (op, shapes, per_call_read)
            assert per_call_written >= e * batch * m * n, (op, shapes)
        elif op == "aten::convolution":
            assert per_call_read >= e * sum(math.prod(s) for s in shapes[:2]) and per_call_written > 0, (op, shapes)


def test_lstm_lm_counts_the_unfused_projection_lstm_and_its_loss():
    _, counts, _ = profiled("lstm_lm", False)
    b, t, e, h, r, v, g = pm.BATCH, pm.SEQ, pm.EMB, pm.HIDDEN, pm.PROJ, pm.VOCAB, 4
    rows = b * t
    # Per layer: the inputs of every step in one matmul, then per step h (B, P) @ W_hh^T and the projection.
    expected = sum(2 * rows * g * h * width + t * (2 * b * g * h * r + 2 * b * h * r) for width in (e, r))
    expected += 2 * rows * r * v  # the vocabulary head
    assert flops_of(counts, MATMULS) == expected
    assert by_op(counts)["aten::_log_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * rows * v
    assert by_op(counts)["aten::nll_loss_forward"] == rows  # one picked log-probability added per target
    _, train_counts, _ = profiled("lstm_lm", True)
    assert by_op(train_counts)["aten::nll_loss_backward"] == rows


def test_recurrent_cells_stepped_in_python():
    _, counts, _ = profiled("cells", False)
    t, b, i, h = pm.CELL_STEPS, pm.BATCH, pm.CELL_IN, pm.CELL_HIDDEN
    lstm_cell = 2 * b * 4 * h * (i + h)  # x @ W_ih^T and h @ W_hh^T, 4 gates
    gru_cell = 2 * b * 3 * h * (i + h)  # 3 gates
    rnn = 2 * t * b * h * i + t * 2 * b * h * h  # inputs of all steps at once, then one h @ W_hh^T per step
    assert flops_of(counts, MATMULS) == t * (lstm_cell + gru_cell) + rnn


def test_audio_net_convolutions_glu_and_weight_norm():
    _, counts, _ = profiled("audio", False)
    b, c, n = pm.BATCH, pm.AUDIO_CH, pm.AUDIO_LEN
    dilated = conv(b, c, 2 * c, n, 3, groups=2)  # reflection-padded by 2: length kept at dilation 2
    gated = conv(b, 2 * c, 2 * c, n, 1)
    up = 2 * b * n * c * c * 4 + b * c * 2 * n  # transposed: each input sample meets every weight; bias on 2L
    assert by_op(counts)["aten::convolution"] == dilated + gated + up
    assert by_op(counts)["aten::glu"] == b * c * n  # 1 FLOP per output element, as a pointwise op
    assert by_op(counts)["aten::_prelu_kernel"] == b * c * 2 * n
    assert by_op(counts)["aten::_weight_norm_interface"] == formulas.WEIGHT_NORM_FLOPS_PER_ELEMENT * 2 * c * 2 * c
    _, train_counts, _ = profiled("audio", True)
    ours = by_op(train_counts)
    # The input needs no gradient: each backward is the weight gradient alone (+ the bias's sum over dy), and
    # the later layers' input gradients.
    assert ours["aten::convolution_backward"] == (
        (2 * b * n * 2 * c * (c // 2) * 3 + b * 2 * c * n)  # dilated: dw, db
        + 2 * (2 * b * n * 2 * c * 2 * c) + b * 2 * c * n  # gated: dx, dw, db
        + 2 * (2 * b * n * c * c * 4) + b * c * 2 * n  # up: dx, dw, db
    )
    assert ours["aten::glu_backward"] == b * 2 * c * n and ours["aten::_weight_norm_interface_backward"] > 0


def test_mobile_block_depthwise_group_norm_and_activations():
    _, counts, _ = profiled("mobile", False)
    b, c, s = pm.BATCH, pm.IMG_CH, pm.IMG * pm.IMG
    expected = (
        conv(b, 3, c, s, 9, bias=False)  # stem, stride 2: 16x16 -> 8x8
        + conv(b, c, c, s, 9, groups=c, bias=False)  # depthwise
        + conv(b, c, 2, 1, 1) + conv(b, 2, c, 1, 1)  # squeeze-excite on the pooled (B, C, 1, 1)
        + conv(b, c, 2 * c, s, 1, bias=False)  # pointwise
    )
    ours = by_op(counts)
    assert ours["aten::convolution"] == expected
    assert ours["aten::native_group_norm"] == formulas.LAYERNORM_FLOPS_PER_ELEMENT * b * c * s
    assert ours["aten::hardswish"] == b * 2 * c * s and ours["aten::hardtanh"] == b * c * s  # relu6 is hardtanh
    _, train_counts, _ = profiled("mobile", True)
    assert by_op(train_counts)["aten::hardswish_backward"] == b * 2 * c * s


def test_unet_upsampling_and_skip_concatenations():
    p, counts, _ = profiled("unet", False)
    b, c, h = pm.BATCH, pm.IMG_CH, pm.IMG
    full, half, quarter = h * h, (h // 2) ** 2, (h // 4) ** 2
    expected = (
        conv(b, 3, c, full, 9) + conv(b, c, 2 * c, half, 9)
        + 2 * b * quarter * 2 * c * 2 * c * 9 + b * 2 * c * quarter  # transposed 3x3, stride 1, padding 1
        + conv(b, 4 * c, c, half, 9) + conv(b, 2 * c, 1, full, 1)
    )
    ours = by_op(counts)
    assert ours["aten::convolution"] == expected
    taps = formulas.INTERPOLATION_TAPS["bilinear2d"]
    assert ours["aten::upsample_bilinear2d"] == formulas.FLOPS_PER_MAC * taps * b * c * full
    # Nearest upsampling is a gather: counted whole (0 FLOPs, its bytes), not as its index arithmetic.
    (nearest,) = [c_ for (op, _), c_ in counts.items() if op == "aten::upsample_nearest2d"]
    assert nearest.flops == 0 and nearest.bytes_written == 4 * b * 2 * c * half
    assert not any(op in ("aten::arange", "aten::_unsafe_index") for op, _ in counts)
    row = next(o for o in p.ops if o.op == "aten::upsample_nearest2d")
    assert row.counted and row.calls == 1
    _, train_counts, _ = profiled("unet", True)
    train = by_op(train_counts)
    assert train["aten::upsample_bilinear2d_backward"] == ours["aten::upsample_bilinear2d"]
    # Gradient scatters add each element of dy into the element it came from: not free copies.
    assert train["aten::upsample_nearest2d_backward"] == b * 2 * c * half  # dy of the upsampled (B, 2C, H/2, W/2)
    assert train["aten::max_pool2d_with_indices_backward"] == b * c * half + b * 2 * c * quarter


def test_spatial_transformer_grid_and_sampling():
    _, counts, _ = profiled("spatial_transformer", False)
    b, h = pm.BATCH, pm.IMG
    ours = by_op(counts)
    assert ours["aten::affine_grid_generator"] == 2 * b * h * h * 2 * 3  # (H*W, 3) base points times theta^T
    taps = formulas.GRID_SAMPLE_TAPS[2, 0]
    assert ours["aten::grid_sampler_2d"] == 2 * taps * b * 3 * h * h
    assert ours["aten::convolution"] == 2 * conv(b, 3, pm.IMG_CH, h * h, 9)
    _, train_counts, _ = profiled("spatial_transformer", True)
    # The input needs no gradient: only the grid's (through theta to the localisation net).
    assert by_op(train_counts)["aten::grid_sampler_2d_backward"] == ours["aten::grid_sampler_2d"]


def test_scatter_routing_counts_each_routed_row():
    _, counts, _ = profiled("scatter_moe", False)
    t, k, d, e = pm.TOKENS, pm.TOP_K, pm.DIM, pm.EXPERTS
    routed = t * k
    assert flops_of(counts, MATMULS) == 2 * t * d * e + routed * (2 * d * 2 * d + 2 * 2 * d * d)  # router, experts
    ours = by_op(counts)
    assert ours["aten::scatter_add"] == routed * d  # one add per routed value
    assert ours["aten::index_put_"] == routed  # accumulate=True: one add per value put
    assert ours["aten::bincount"] == routed
    # Selections count their compares, as a max reduction does: top-k one per routing score, argsort's sort
    # n * ceil(log2 n) over the routed slots.
    assert ours["aten::topk"] == t * e
    assert ours["aten::sort"] == routed * math.ceil(math.log2(routed))


def test_recommender_bags_interaction_and_loss():
    p, counts, _ = profiled("recommender", False)
    b, f, n = pm.BATCH, pm.BAG_DIM, pm.TABLES + 1
    ours = by_op(counts)
    assert ours["aten::bmm"] == 2 * b * n * n * f
    (bmm,) = [c for (op, _), c in counts.items() if op == "aten::bmm"]
    assert bmm.bytes_read == 4 * b * n * f and bmm.bytes_written == 4 * b * n * n  # feats read once for both sides
    # A per-sample weight multiplies each looked-up row before it is added into its bag.
    assert ours["aten::_embedding_bag"] == pm.TABLES * 2 * b * pm.BAG_LEN * f
    assert ours["aten::binary_cross_entropy_with_logits"] == formulas.BCE_LOGITS_FLOPS_PER_ELEMENT * b
    # The lower triangle taken by advanced indexing: its backward accumulates with index_put, which autograd
    # runs as _index_put_impl_; that row carries the count (nothing left untimed).
    p, counts, _ = profiled("recommender", True)
    assert by_op(counts)["aten::index_put"] == b * (n * (n - 1) // 2)
    assert not p.untimed and any(o.op == "aten::index_put" and o.counted and o.m.flops > 0 for o in p.ops)


def _vit_matmul_flops():
    b, d, c, h = pm.BATCH, pm.DIM, pm.CLASSES, pm.HEADS
    n = (pm.VIT_IMAGE // pm.PATCH) ** 2 + 1  # patches and the class token
    return (
        2 * b * n * d * 3 * d  # q, k, v projections
        + 2 * 2 * b * h * n * n * (d // h)  # scores and weighted values
        + 2 * b * n * d * d  # output projection
        + 2 * 2 * b * n * d * 2 * d  # MLP
        + 2 * b * d * c  # the head, on the class token only
    )


def test_vit_patch_embedding_attention_and_inference_mode():
    _, counts, _ = profiled("vit", False)
    b, d, n_patch = pm.BATCH, pm.DIM, (pm.VIT_IMAGE // pm.PATCH) ** 2
    assert by_op(counts)["aten::convolution"] == conv(b, 3, d, n_patch, pm.PATCH**2)
    assert flops_of(counts, MATMULS) == _vit_matmul_flops()
    (head,) = [c for (op, s), c in counts.items() if op == "aten::addmm" and s[-1] == (d, pm.CLASSES)]
    assert head.bytes_read == 4 * (pm.CLASSES + b * d + d * pm.CLASSES) and head.bytes_written == 4 * b * pm.CLASSES
    p_inf, counts_inf, _ = profiled("vit_inference_mode", False)
    # Under inference_mode linear, layer_norm and attention reach the dispatch mode whole: counted as the ops
    # they run, the same FLOPs as the no_grad step.
    assert flops_of(counts_inf, MATMULS) == _vit_matmul_flops()
    assert math.fsum(c.flops for c in counts_inf.values()) == math.fsum(c.flops for c in counts.values())
    assert not any(op == "aten::linear" for op, _ in counts_inf)


def test_bilinear_attention_einsum_and_nn_bilinear():
    _, counts, _ = profiled("bilinear_attention", False)
    b, n, m, d, c = pm.BATCH, 5, 7, pm.DIM, pm.CLASSES
    # "bnd,de,bme->bnm" contracted left to right (the cheaper order here), then "bnm,bmd->bnd".
    assert flops_of(counts, MATMULS) == 2 * b * n * d * d + 2 * b * n * m * d + 2 * b * n * m * d
    assert by_op(counts)["aten::_trilinear"] == 2 * b * c * d * d  # x1 W x2 per output feature
    _, train_counts, _ = profiled("bilinear_attention", True)
    assert by_op(train_counts)["aten::_trilinear"] > by_op(counts)["aten::_trilinear"]  # + the gradients


def test_fnet_counts_its_mlp_and_its_ffts():
    """FFTs had no formula (round 3 pinned them as reported uncounted); since round 5, 5 N log2 N per complex
    transform of N points, half that for a real input or output, a multiply per real output of a normalised one."""
    p, counts, _ = profiled("fnet", False)
    b, n, d = pm.BATCH, pm.FNET_TOKENS, pm.DIM
    assert flops_of(counts, MATMULS) == 2 * 2 * b * n * d * 2 * d
    assert not p.unsupported
    mixing = b * formulas.fft_flops(n * d)  # fft2 over (tokens, features): the real input cast, a complex transform
    spectrum = b * d * formulas.fft_flops(n, real=True)  # rfft along the tokens
    assert flops_of(counts, FFT) == mixing + spectrum + spectrum + b * n * d  # irfft normalises by 1/n
    for o in p.ops:
        if o.op in FFT:
            assert o.flops_known and o.bound in ("memory", "compute") and o.m.bytes > 0
    # The spectral filter multiplies complex by real: both parts of each complex64 element (8 bytes) scaled.
    (mul,) = [c for (op, s), c in counts.items() if op == "aten::mul" and s[0] == (b, n // 2 + 1, d)]
    assert mul.flops == 2 * b * (n // 2 + 1) * d and mul.bytes_written == 8 * b * (n // 2 + 1) * d


def test_complex_matmuls_count_real_operations():
    """A complex multiply-add is 4 real multiplies and 4 adds: 8 M N K for a complex (M, K) @ (K, N)."""
    lin = torch.nn.Linear(4, 3, bias=False, dtype=torch.complex64)
    x = torch.randn(5, 4, dtype=torch.complex64)
    with torch.no_grad():
        counts = profile.count_ops(lambda: lin(x))
    assert flops_of(counts, MATMULS) == 8 * 5 * 3 * 4


def test_in_place_updates_through_views_and_fold():
    _, counts, _ = profiled("views_in_place", False)
    b, n, d, c = pm.BATCH, 6, pm.DIM, pm.IMG_CH
    hw = 16
    assert flops_of(counts, MATMULS) == 2 * b * n * d * d + 2 * b * c * 9 * c * hw  # linear, then w @ im2col
    ours = by_op(counts)
    assert ours["aten::add_"] == b * n * d // 2  # only the narrowed half
    assert ours["aten::clamp_"] == b * n * d and ours["aten::addcmul_"] == b * n * d
    assert ours["aten::col2im"] == b * 9 * c * hw  # F.fold adds each column element into its pixel
    (narrow_add,) = [c_ for (op, _), c_ in counts.items() if op == "aten::add_"]
    assert narrow_add.bytes_written == 4 * b * n * d // 2  # the view's elements, not the whole tensor
    _, train_counts, _ = profiled("views_in_place", True)
    assert by_op(train_counts)["aten::unfold_backward"] == b * (n - 2) * d * 3  # overlapping windows summed


@pytest.mark.parametrize("name,dtype,size", [("mlp_bf16", "bf16", 2), ("mlp_fp64", "fp64", 8)])
def test_bf16_and_float64_models(name, dtype, size):
    p, counts, _ = profiled(name, False)
    b, c, s = pm.BATCH, pm.IMG_CH, pm.IMG * pm.IMG
    assert by_op(counts)["aten::convolution"] == conv(b, 3, c, s, 9)
    assert flops_of(counts, MATMULS) == 2 * b * s * c * pm.DIM + 2 * b * s * pm.DIM * pm.CLASSES
    for o in p.ops:
        if o.counted:
            assert o.m.dtype == dtype, o.label
    (conv_row,) = [c_ for (op, _), c_ in counts.items() if op == "aten::convolution"]
    assert conv_row.bytes_read == size * (b * 3 * s + c * 3 * 9 + c) and conv_row.bytes_written == size * b * c * s
    p16, _, _ = profiled("mlp_bf16", False)
    assert p.flops == p16.flops  # the same work whatever the dtype
    # No float64 peak on this CPU: a row with math is not called memory-bound for want of a compute roof.
    with_math = [o for o in p.ops if o.counted and o.m.flops > 0]
    assert with_math and all((o.bound == "unknown") == (dtype == "fp64") for o in with_math)


def test_profile_html_renders(tmp_path):
    for name, hot_op in (("unet", "aten::convolution"), ("fnet", "aten::addmm")):
        p, _, _ = profiled(name, False)
        path = profile.profile_html(p, tmp_path / f"{name}.html")
        html = path.read_text()
        assert name in html and hot_op in html
        assert ("no FLOP formula for" in html) == bool(p.unsupported)


def test_a_custom_op_of_another_namespace_gets_its_own_time():
    """The counting pass sees the custom op whole (its tanh and mul run inside it); the profiler's row for it
    must carry its time and its bytes, not leave it untimed with its insides as uncounted rows."""
    p, counts, _ = profiled("custom_op", False)
    assert (SOFT_CLIP, ((pm.TOKENS, pm.DIM),)) in counts
    assert not p.untimed
    (row,) = [o for o in p.ops if o.op == SOFT_CLIP]
    assert row.counted and not row.flops_known and row.total_s > 0 and row.calls == 1
    assert row.m.bytes == 2 * 4 * pm.TOKENS * pm.DIM  # reads x, writes the result
    assert not any(o.op in ("aten::tanh", "aten::div", "aten::mul") for o in p.ops)  # inside its row
    assert flops_of(counts, MATMULS) == 2 * 2 * pm.TOKENS * pm.DIM * pm.DIM


def test_unbatched_vector_algebra():
    """mv, dot and addr are matmuls of one vector (torch's flop counter has no formula for them): a multiply-add
    per element of the matrix; trace adds the diagonal; RReLU's random slopes multiply; a histogram adds."""
    p, counts, _ = profiled("vector_ops", False)
    d = pm.DIM
    ours = by_op(counts)
    assert ours["aten::mv"] == 2 * d * d and ours["aten::addr"] == 2 * d * d and ours["aten::dot"] == 2 * d
    assert ours["aten::trace"] == d and ours["aten::rrelu_with_noise"] == d and ours["aten::histc"] == d
    assert not p.unsupported
    _, train_counts, _ = profiled("vector_ops", True)
    train = by_op(train_counts)
    assert train["aten::mv"] > ours["aten::mv"]  # the backward's matrix-vector products too


def test_shapes_that_change_every_step_keep_their_counts_in_the_op_rows():
    """Noisy top-k routing gives each expert another number of tokens every step: the timed steps run matmuls at
    shapes the counting step did not. Their work is still in the rows that carry the matmuls' time (the op's row
    at the unseen shapes), none left untimed, and it adds up to the routed rows' work."""
    model, inputs = pm.noisy_moe()
    p = profile.profile_model(model, inputs, steps=4, warmup=1, ceilings=CEIL, device="cpu")
    assert not p.untimed
    t, k, d, e = pm.TOKENS, pm.TOP_K, pm.DIM, pm.EXPERTS
    mm = math.fsum(o.m.flops * o.calls for o in p.ops if o.op in MATMULS)
    assert mm == 2 * t * d * e + t * k * (2 * d * 2 * d + 2 * 2 * d * d)
    assert all(o.counted for o in p.ops if o.op in MATMULS)


def test_gaussian_process_factorisations_count_as_lapack_does():
    """cholesky n^3/3, a solve with the factor 2 n^2 k, slogdet's LU 2n^3/3 per matrix (LAPACK's leading terms);
    the RBF kernel's distances 3 FLOPs per pair and feature."""
    p, counts, _ = profiled("gaussian_process", False)
    b, n, f = pm.BATCH, pm.GP_POINTS, pm.GP_FEATURES
    ours = by_op(counts)
    assert ours["aten::linalg_cholesky_ex"] == pytest.approx(b * n**3 / 3)
    assert ours["aten::cholesky_solve"] == b * 2 * n**2 * 1
    assert ours["aten::_linalg_slogdet"] == pytest.approx(b * 2 * n**3 / 3)
    assert ours["aten::_cdist_forward"] == formulas.CDIST_FLOPS_PER_TERM * b * n * n * f
    assert not p.unsupported
    assert formulas.factorization_flops("svd", 4, 6, vectors=False) == formulas.factorization_flops("svd", 6, 4,
                                                                                                    vectors=False)
    with pytest.raises(LaunchError, match="kind='lq'; expected one of cholesky"):
        formulas.factorization_flops("lq", 4, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_quantized_linears_and_embedding_max_norm():
    """quantized::linear_dynamic multiplies by a packed int8 weight (no tensor argument to read its shape from):
    counted from the unpacked weight. An embedding with max_norm renormalises each distinct looked-up row in place."""
    p, counts, _ = profiled("quantized_mlp", False)
    t, d = pm.TOKENS, pm.DIM
    assert by_op(counts)["quantized::linear_dynamic"] == 2 * t * d * 2 * d + 2 * t * 2 * d * d
    assert not p.unsupported and not p.untimed
    assert all(o.counted for o in p.ops if o.op == "quantized::linear_dynamic")
    # Each reads its int8 weight (1 byte an element) and f32 bias from the packed parameters, and x.
    (first,) = [c for (op, s), c in counts.items() if op == "quantized::linear_dynamic" and s == ((t, d),)]
    assert first.bytes_read >= 2 * d * d + 4 * 2 * d + 4 * t * d
    emb = torch.nn.Embedding(pm.VOCAB, pm.EMB, max_norm=1.0)
    tokens = torch.randint(0, pm.VOCAB, (pm.BATCH, pm.SEQ))
    with torch.no_grad():
        counts = profile.count_ops(lambda: emb(tokens))
    rows = tokens.unique().numel()  # each distinct row once, as the kernel visits them (profiler round 12)
    assert by_op(counts)["aten::embedding_renorm_"] == formulas.RENORM_FLOPS_PER_ELEMENT * rows * pm.EMB
