"""Fourteenth held-out round for the model profiler (tests/perf/perf_models_round14.py): depthwise-separable, grouped
strided 3-d and grouped dilated transposed convolutions; batch, group, instance and layer norms trained and in eval;
a bidirectional two-layer GRU into a projected bidirectional LSTM; masked nn.MultiheadAttention with kdim/vdim into a
causal pre-norm decoder layer returning a dict; EmbeddingBags (mean with padding, max with include_last_offset, sum
with per-sample weights); pixel shuffle, nearest / bilinear / linear upsampling, max pool with indices and unpool,
adaptive pooling; einsum bilinear and attention with addbmm / baddbmm / addr; rfft / irfft / fft2 / hfft; a top-2
mixture of experts routed by the data. Views sharing memory, half precision, a compiled block, a custom op with no
formula and what a profile leaves behind are in tests/perf/test_profile_unseen_round14_more.py.

Every count is written out here from the layer shapes (a multiply-add is 2 FLOPs; a convolution by
``profile_support.conv``, a transposed one 2*N*numel(w)*input positions plus a bias add per output; attention
4*B*H*Nq*Nk*D, half of it under a square causal mask; an FFT 5 N log2 N per complex transform, half for a real one,
plus a multiply per real output normalised), never read off the profiler; every row's intensity is its FLOPs over
its bytes and its bound its side of the ridge; torch.utils.flop_counter agreed with where it has a formula.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import sdpa_backward_flop_count

from tilestack.perf import formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round14 as pm  # noqa: E402
from _profile_helpers import FILTERS, check_every_row, profile_cpu, setup_round  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of  # noqa: E402

pytestmark = FILTERS
# torch's FlopCounterMode around compiled code makes dynamo skip that code for the rest of the process: the
# compiled block is checked against its eager twin instead (test_profile_unseen_round14_more.py)
CASES, IDS, profiled = setup_round(pm.MODELS, without_torch={"compiled_block"})
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, allocation, resampling by picking elements.
DATA_MOVEMENT = {
    "aten::copy_", "aten::repeat", "aten::clone", "aten::cat", "aten::stack", "aten::zeros", "aten::full",
    "aten::masked_fill_", "aten::masked_fill", "aten::triu", "aten::select_backward", "aten::arange",
    "aten::_upsample_nearest_exact2d", "aten::upsample_nearest2d", "aten::max_unpool2d", "aten::pixel_shuffle",
    "aten::pixel_unshuffle", "aten::gather", "aten::ones", "aten::index", "aten::nonzero", "aten::index_select",
    "aten::new_zeros", "aten::scatter", "aten::_to_copy",
}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
F32 = 4


def transposed(batch, w_numel, in_positions, c_out, out_positions, *, bias=True):
    """A transposed convolution: every input element times every weight of its group, plus the bias's adds."""
    return 2 * batch * w_numel * in_positions + (batch * c_out * out_positions if bias else 0)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows (and untimed ops) add up to the counted step; nothing that computes is counted free, and only the custom
    op is left uncounted; torch's formulas agreed with; each counted row's intensity is its FLOPs over its bytes and
    its bound the side of the ridge (10 FLOP/B for every dtype of these ceilings) that intensity is on; the shares of
    the step add up to 1 and the table renders."""
    p, counts, theirs = profiled(name, train)
    check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT, step_time_adds_up=False,
                    unsupported=("tilestack_r14::soft_threshold",) if name == "custom_head" else ())


def test_separable_convolutions_by_hand():
    """Depthwise (groups = channels, dilation 2) and pointwise Conv1d, a stride-3 ConvTranspose1d, a grouped Conv3d
    of stride (1, 2, 1) without bias and a grouped, dilated ConvTranspose2d with output padding; their backward takes
    no input gradient of the first layer of each chain (the inputs need none)."""
    n, c, length = pm.SC_BATCH, pm.SC_C, pm.SC_LEN
    depthwise = conv(n, c, c, length, 5, groups=c)
    pointwise = conv(n, c, pm.SC_PW, length, 1)
    up1_len = (length - 1) * 3 + 4
    up1 = transposed(n, pm.SC_PW * 2 * 4, length, 2, up1_len)
    b3, _, d3, h3, w3 = pm.SC3_SHAPE
    out3 = d3 * ((h3 + 2 - 3) // 2 + 1) * w3  # depth kept, height strided by 2 (padded), width padded
    conv3 = conv(b3, 3, 6, out3, 9, groups=3, bias=False)
    b2, c2, s2, _ = pm.SC2_SHAPE
    side = (s2 - 1) * 2 - 2 * 1 + 2 * (3 - 1) + 1 + 1  # stride, padding, dilation, output padding
    up2 = transposed(b2, 4 * 3 * 9, s2 * s2, 6, side * side)
    _, counts, _ = profiled("separable", False)
    assert sorted(c.flops for c in rows_of(counts, "aten::convolution")) == sorted(
        [depthwise, pointwise, up1, conv3, up2])
    _, counts, _ = profiled("separable", True)
    bias = lambda batch, ch, pos: batch * ch * pos  # noqa: E731
    backward = (
        2 * (up1 - bias(n, 2, up1_len)) + bias(n, 2, up1_len)  # input, weight and bias gradients
        + 2 * (pointwise - bias(n, pm.SC_PW, length)) + bias(n, pm.SC_PW, length)
        + depthwise  # weight (as large as the forward's products) and bias: no input gradient
        + conv3  # weight only
        + up2  # weight and bias
    )
    assert by_op(counts)["aten::convolution_backward"] == backward == 33600


@pytest.mark.parametrize("train", [False, True])
def test_norms_trained_and_in_eval_by_hand(train):
    """In training every norm computes its statistics (8 FLOPs an element, 6 for the layer norm without an affine;
    instance norm as a batch norm over (1, N*C, H, W) with the running statistics repeated in and averaged out); in
    eval batch norm and the tracking
    instance norm use their running statistics (4 an element), group and layer norms still their own. The
    backward (inputs need no gradient) takes the weight and bias gradients of the three affine norms: a recompute,
    dw and db, 5 an element; the layer norm has none. The running statistics are put back after both profiles."""
    elements = pm.NM_BATCH * pm.NM_C * pm.NM_SIDE ** 2
    norm_ops = {"aten::native_batch_norm", "aten::native_group_norm", "aten::native_layer_norm"}
    model, inputs = pm.norms()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        p = profile_cpu(model, inputs, train=train)
        with profile.preserved(model, inputs):
            counts = profile.count_ops(profile.make_step(model, inputs, train=train))
        per_element = (formulas.LAYERNORM_FLOPS_PER_ELEMENT if mode == "train" else
                       formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT)
        # bn, instance; group; layer, whose norm has no affine to apply (round 24: it was counted the affine's 2)
        no_affine = formulas.LAYERNORM_FLOPS_PER_ELEMENT - 2 * formulas.NORM_AFFINE_FLOPS_PER_ELEMENT
        statistics = 2 * per_element + formulas.LAYERNORM_FLOPS_PER_ELEMENT + no_affine
        assert flops_of(counts, norm_ops) == statistics * elements == (6000 if mode == "train" else 4400)
        backward = flops_of(counts, "aten::native_batch_norm_backward") + flops_of(
            counts, "aten::native_group_norm_backward")
        assert backward == (3 * 5 * elements if train else 0)
        assert not p.unsupported
        assert model.training == (mode == "train")
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_bidirectional_rnns_by_hand():
    """A two-layer bidirectional GRU: per direction an input product (T*B, I) x (I, 3H) and a hidden product
    (B, H) x (H, 3H) per step, the second layer's input 2H wide; a bidirectional LSTM with a projection: input
    (T*B, 2H_gru) x (., 4H), hidden (B, P) x (P, 4H) and the projection (B, H) x (H, P) per step."""
    t, b, i, h = pm.RN_STEPS, pm.RN_BATCH, pm.RN_IN, pm.RN_GRU
    gru = 2 * sum(2 * t * b * width * 3 * h + t * 2 * b * h * 3 * h for width in (i, 2 * h))
    hl, proj = pm.RN_LSTM, pm.RN_PROJ
    lstm = 2 * (2 * t * b * 2 * h * 4 * hl + t * 2 * b * proj * 4 * hl + t * 2 * b * hl * proj)
    _, counts, _ = profiled("birnn", False)
    assert flops_of(counts, MATMULS) == gru + lstm
    hidden = {((3 * h,), (b, h), (h, 3 * h)), ((4 * hl,), (b, proj), (proj, 4 * hl))}
    assert sorted(c.calls for (op, sh), c in counts.items() if op == "aten::addmm" and sh in hidden) == [
        2 * t, 2 * 2 * t]  # a hidden product per step, direction and layer
    _, counts, _ = profiled("birnn", True)
    # The backward: an input and a weight gradient per product, less the input gradients nobody needs: the first
    # GRU layer's input, and the zero initial state's at each layer's and direction's first step.
    unneeded = 2 * (2 * t * b * i * 3 * h) + 2 * 2 * (2 * b * h * 3 * h) + 2 * (2 * b * proj * 4 * hl)
    assert flops_of(counts, MATMULS) == 3 * (gru + lstm) - unneeded


def test_masked_attention_by_hand():
    """nn.MultiheadAttention with kdim/vdim: projections of their own widths, scores and weighted values by
    baddbmm / bmm over B*H, the masks merged into one additive bias, the per-head softmax; the decoder layer's packed
    self-attention projection, causal SDPA (half the scores), cross-attention with packed K/V, the feed-forward
    pair and three layer norms. The dict's tensors both train."""
    b, lq, lk, d, heads = pm.AT_BATCH, pm.AT_LQ, pm.AT_LK, pm.AT_DIM, pm.AT_HEADS
    hd = d // heads
    mha = (2 * b * lq * d * d + 2 * b * lk * pm.AT_KDIM * d + 2 * b * lk * pm.AT_VDIM * d
           + 2 * 2 * b * heads * lq * lk * hd + 2 * b * lq * d * d)
    decoder = (2 * b * lq * d * 3 * d + 2 * b * lq * d * d  # self: packed in-projection, out
               + 2 * b * lq * d * d + 2 * b * lq * d * 2 * d + 2 * b * lq * d * d  # cross: q, packed kv, out
               + 2 * 2 * b * lq * d * pm.AT_FF)  # feed-forward
    causal = 4 * b * heads * lq * lq * hd * formulas.CAUSAL_FRACTION
    cross = 4 * b * heads * lq * lq * hd
    p, counts, _ = profiled("masked_attention", False)
    assert flops_of(counts, MATMULS) == mha + decoder == 22400
    assert by_op(counts)[SDPA] == causal + cross
    assert by_op(counts)["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * b * heads * lq * lk
    assert by_op(counts)["aten::native_layer_norm"] == 3 * formulas.LAYERNORM_FLOPS_PER_ELEMENT * b * lq * d
    _, counts, _ = profiled("masked_attention", True)
    sdpa_bwd = sdpa_backward_flop_count(*[(b, heads, lq, hd)] * 4)
    assert by_op(counts)[SDPA + "_backward"] == sdpa_bwd * formulas.CAUSAL_FRACTION + sdpa_bwd


def test_bags_by_hand():
    """Mean bags skip the padding index (6 of 9 entries looked up), max bags read every entry, sum bags multiply
    each entry by its weight first; the backward adds each bag's gradient row into each entry's row (doubled by the
    mean's 1/size and the per-sample weight), and in max mode only into the one row per non-empty bag and column
    that held the maximum. The mean bag reads its 6 rows, its indices and offsets, not the table."""
    dim = pm.BG_DIM
    real = sum(i != 0 for i in pm.BG_INDICES)
    entries = len(pm.BG_INDICES)
    weighted = math.prod(pm.BG_SUM_SHAPE)
    _, counts, _ = profiled("bags", False)
    rows = {sh: c for (op, sh), c in counts.items() if op == "aten::_embedding_bag"}
    # the mean bag's 3 non-empty bags (of 4) each divided by its size: 3 * dim more (round 18)
    assert sorted(c.flops for c in rows.values()) == sorted([real * dim + 3 * dim, entries * dim, 2 * weighted * dim])
    mean = rows[(pm.BG_ROWS, dim), (entries,), (len(pm.BG_OFFSETS),)]
    assert mean.bytes_read == real * dim * F32 + entries * 8 + len(pm.BG_OFFSETS) * 8 == 200
    _, counts, _ = profiled("bags", True)
    bounds = (*pm.BG_OFFSETS, entries)  # include_last_offset: the last offset closes the last bag
    non_empty = sum(hi > lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))
    assert non_empty == 3
    assert sorted(c.flops for c in rows_of(counts, "aten::_embedding_bag_backward")) == sorted(
        [2 * real * dim, non_empty * dim, 2 * weighted * dim])


def _adaptive_windows(size_in, size_out):
    return sum(math.ceil((o + 1) * size_in / size_out) - math.floor(o * size_in / size_out) for o in range(size_out))


def test_resampler_by_hand():
    """A 1x1 convolution; bilinear (4 taps) and linear (2 taps) upsampling a multiply-add per tap per output;
    nearest, nearest-exact, pixel (un)shuffle and unpooling pick elements (0 FLOPs, their bytes counted, not
    reported uncounted); a 2x2 max pool a compare per tap; the adaptive pool (6, 8) -> (4, 5) one add per element of
    its overlapping windows. The backward mirrors each on dy."""
    n, c, h, w = pm.RS_BATCH, pm.RS_C, pm.RS_H, pm.RS_W
    planes, oh, ow = n * c, 2 * h, 2 * w
    adaptive = planes * _adaptive_windows(oh, 4) * _adaptive_windows(ow, 5)
    assert adaptive == planes * 8 * 12
    expected = {
        "aten::convolution": conv(n, c, 4 * c, h * w, 1),
        "aten::upsample_bilinear2d": 2 * 4 * planes * 5 * 7,
        "aten::upsample_linear1d": 2 * 2 * planes * 3 * h * w,
        "aten::max_pool2d_with_indices": 4 * planes * (oh // 2) * (ow // 2),
        "aten::_adaptive_avg_pool2d": adaptive,
    }
    _, counts, _ = profiled("resampler", False)
    ours = by_op(counts)
    assert {op: ours[op] for op in expected} == expected
    for op in ("aten::upsample_nearest2d", "aten::_upsample_nearest_exact2d", "aten::pixel_shuffle",
               "aten::pixel_unshuffle", "aten::max_unpool2d"):
        (row,) = rows_of(counts, op)
        assert row.flops == 0 and not row.unsupported and row.bytes_read > 0 and row.bytes_written > 0, op
    _, counts, _ = profiled("resampler", True)
    ours = by_op(counts)
    backward = {
        "aten::_adaptive_avg_pool2d_backward": adaptive,
        "aten::max_pool2d_with_indices_backward": planes * (oh // 2) * (ow // 2),
        "aten::upsample_bilinear2d_backward": 2 * 4 * planes * 5 * 7,
        "aten::_upsample_nearest_exact2d_backward": planes * 2 * oh * 2 * ow,
        "aten::upsample_nearest2d_backward": planes * (3 * oh // 2) * (3 * ow // 2),
        "aten::convolution_backward": conv(n, c, 4 * c, h * w, 1),  # weight and bias: the input needs none
    }
    assert {op: ours[op] for op in backward} == backward


def test_einsum_products_by_hand():
    """The bilinear einsum as two contractions (either order costs 2*B*O*I*J + 2*B*O*I here, I == J), the einsum
    scores as a batched matmul and their softmax, addbmm summing its batch's products into one matrix, baddbmm with
    beta 0, addr an outer product (a multiply-add per element)."""
    b, o, i = pm.EP_BATCH, pm.EP_OUT, pm.EP_I
    nb, n, k, m = pm.EP_BMM
    bz, heads, t, d = pm.EP_ATT
    _, counts, _ = profiled("einsum_products", False)
    ours = by_op(counts)
    assert ours["aten::bmm"] == 2 * b * o * i * i + 2 * b * o * i + 2 * bz * heads * t * t * d
    assert ours["aten::addbmm"] == ours["aten::baddbmm"] == 2 * nb * n * k * m
    assert ours["aten::addr"] == 2 * 4 * 3
    assert ours["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * bz * heads * t * t


def test_spectral_by_hand():
    """rfft (ortho: each of the 9 complex outputs' 2 parts scaled), irfft to 8 points (its 5 bins used; normalised
    by 1/n), fft2 of a (4, 16) complex signal (unnormalised forward), hfft to 6 points (unnormalised: it runs the
    forward direction); the power spectrum a complex product (6 FLOPs) per bin."""
    rows, n = pm.SP_ROWS, pm.SP_LEN
    bins = n // 2 + 1
    rfft = rows * 5 * n * math.log2(n) / 2 + 2 * rows * bins
    irfft = rows * 5 * pm.SP_IRFFT_N * math.log2(pm.SP_IRFFT_N) / 2 + rows * pm.SP_IRFFT_N
    fft2 = 5 * math.prod(pm.SP_FFT2) * math.log2(math.prod(pm.SP_FFT2))
    hfft = rows * 5 * pm.SP_HFFT_N * math.log2(pm.SP_HFFT_N) / 2
    _, counts, _ = profiled("spectral", False)
    ours = by_op(counts)
    assert ours["aten::_fft_r2c"] == pytest.approx(rfft, rel=1e-12)
    assert ours["aten::_fft_c2c"] == pytest.approx(fft2, rel=1e-12)
    assert sorted(c.flops for c in rows_of(counts, "aten::_fft_c2r")) == pytest.approx(sorted([irfft, hfft]), rel=1e-12)
    assert ours["aten::mul"] == formulas.COMPLEX_MUL_FLOPS * rows * bins


def test_moe_routes_by_the_data_by_hand():
    """Each expert's two linears run on the tokens routed to it (counted independently from the gate here), so its
    rows carry those shapes; whatever the routing, every token goes through two experts, so the experts' products
    total 2*T*k*(D*H + H*D). index_add one add per routed element; topk a compare per gate probability. Trained, the
    backward adds the second layers' input and weight gradients and the first layers' weight gradients (the routed
    tokens need none), and the gate's weight gradient."""
    model, (x,) = pm.moe()
    with torch.no_grad():
        _, chosen = model.routes(x)
    routed = [int((chosen == e).sum()) for e in range(pm.MO_EXPERTS)]
    assert sum(routed) == pm.MO_TOKENS * pm.MO_TOP and len(set(routed)) > 1  # uneven: the shapes differ
    d, h = pm.MO_DIM, pm.MO_HIDDEN
    _, counts, _ = profiled("moe", False)
    addmm = {sh: c.flops for (op, sh), c in counts.items() if op == "aten::addmm"}
    expected = {}
    for r in routed:
        expected[(h,), (r, d), (d, h)] = expected.get(((h,), (r, d), (d, h)), 0) + 2 * r * d * h
        expected[(d,), (r, h), (h, d)] = expected.get(((d,), (r, h), (h, d)), 0) + 2 * r * h * d
    assert addmm == expected
    assert sum(addmm.values()) == 2 * pm.MO_TOKENS * pm.MO_TOP * 2 * d * h
    assert by_op(counts)["aten::mm"] == 2 * pm.MO_TOKENS * d * pm.MO_EXPERTS
    assert by_op(counts)["aten::topk"] == pm.MO_TOKENS * pm.MO_EXPERTS
    assert by_op(counts)["aten::index_add"] == pm.MO_TOKENS * pm.MO_TOP * d
    _, counts, _ = profiled("moe", True)
    gate = 2 * pm.MO_TOKENS * d * pm.MO_EXPERTS
    assert by_op(counts)["aten::mm"] == gate + 3 * 2 * pm.MO_TOKENS * pm.MO_TOP * d * h + gate
