"""Eighth held-out round for the model profiler (tests/perf/perf_models_round8.py): a top-2 MoE dispatching sorted
tokens, a stateful LSTM language model with a tied head, a Glow step, SDPA is_causal on queries and keys of different
lengths, nn.MultiheadAttention with add_bias_kv and add_zero_attn, a spectral-norm GAN discriminator, a global filter
network (rfft2/irfft2), a StyleGAN2 modulated convolution, causal linear attention by cumsum, neighbourhood attention
by unfold/fold, a Conformer convolution module, and a float64 tied-weight autoencoder on as_strided windows.

Every matmul, convolution and attention is checked against its count written from the layer shapes here (2*M*N*K;
a convolution by ``profile_support.conv``; attention 4*B*H*Nq*Nkv*D times the share of scores its causal mask
keeps), never against the profiler's own numbers; every row's bound against its intensity and the ridge.
tests/perf/test_profile_unseen_round8_state.py holds the round's tests of state, bytes and arguments.

What the round found (each pinned by the test whose docstring says so):
- attention with is_causal counted half of its Nq x Nkv scores whatever their shape: the first 3 queries of a
  sequence against its 7 keys (3/14 of the scores kept) were counted 2.3x too high, 7 queries against a 3-key
  prefix (11/14 kept) 0.64x too low; a decode step (1 query, 1024 keys) 512x. Now the share its mask keeps
  (``formulas.causal_fraction``: top-left as torch's is_causal, lower-right as flash attention's kernels and
  efficient attention's custom_mask_type 2, which was not reduced at all).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import counting, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round8 as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, profile_cpu, setup_round  # noqa: E402
from profile_support import (  # noqa: E402
    NOT_AS_TORCH,
    assert_as_torch_counts,
    assert_rows_add_up,
    assert_rows_finite,
    by_op,
    conv,
    flops_of,
    rendered,
    rows_of,
    silent_zeros,
)

pytestmark = FILTERS
CASES, IDS, profiled = setup_round(pm.MODELS)
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, index bookkeeping, allocation, random draws.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::zeros", "aten::zeros_like",
    "aten::new_zeros", "aten::index", "aten::index_select", "aten::select_backward", "aten::slice_backward",
    "aten::embedding", "aten::constant_pad_nd", "aten::masked_fill_", "aten::fill_", "aten::scatter",
    "aten::repeat", "aten::flip", "aten::im2col", "aten::randn", "aten::diag_embed", "aten::_local_scalar_dense",
}
DEVIATIONS = {"global_filter": NOT_AS_TORCH | {"aten::mul"}}  # torch counts a complex product as one real one
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::vdot"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


def model_bytes(name):
    """Bytes the model cannot avoid: its tensor inputs and parameters read once, its outputs written once."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    held = [*counting._tensors((args, kwargs)), *model.parameters(), *counting._tensors(out)]
    return counting._nbytes(held)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no work counted as free, torch's formulas agreed with, every number finite
    and >= 0, the step moves at least its inputs, parameters and outputs, and each row with a roof for its dtype
    is placed by its intensity against that roof's ridge."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0 and not p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    assert not silent_zeros(counts, DATA_MOVEMENT), silent_zeros(counts, DATA_MOVEMENT)
    assert_as_torch_counts(counts, theirs, DEVIATIONS.get(name, NOT_AS_TORCH))
    assert_rows_finite(p)
    assert p.bytes >= model_bytes(name)
    for o in p.ops:
        if o.counted and o.m.dtype in ("fp32", "bf16") and o.m.flops > 0:
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)


def test_top2_moe_counts_each_experts_share_of_the_sorted_pairs():
    """Each expert's two matmuls are 2*n_e*D*H, n_e its (token, expert) pairs (2T in all); the router 2*T*D*E;
    index_add_ one add per element of each expert's output; the sort of 2T expert ids 2T*ceil(log2 2T) compares.
    Backward: w1 its weight gradient only (the tokens need none), w2 both, the router its weight's."""
    model, (x,) = pm.top2_moe()
    with torch.no_grad():
        _, experts = model.route(x)
    loads = torch.bincount(experts.flatten(), minlength=pm.MOE_EXPERTS).tolist()
    t, d, h, e = pm.MOE_TOKENS, pm.MOE_DIM, pm.MOE_HIDDEN, pm.MOE_EXPERTS
    assert sum(loads) == 2 * t and max(loads) < 2 * t  # more than one expert is used
    _, counts, _ = profiled("top2_moe", False)
    experts_fwd = sum(2 * 2 * n * d * h for n in loads)
    assert flops_of(counts, MATMULS) == experts_fwd + 2 * t * d * e
    for n in loads:
        (row,) = [c for (op, shapes), c in counts.items() if op == "aten::mm" and shapes == ((n, d), (d, h))]
        assert row.flops == 2 * n * d * h * loads.count(n)  # experts of equal load share a row
    assert by_op(counts)["aten::index_add_"] == 2 * t * d
    assert by_op(counts)["aten::sort"] == 2 * t * math.ceil(math.log2(2 * t))
    _, train_counts, _ = profiled("top2_moe", True)
    backward = experts_fwd // 2 + experts_fwd + 2 * t * d * e  # w1: one of its half's two; w2: both of its half
    assert flops_of(train_counts, MATMULS) == experts_fwd + 2 * t * d * e + backward


def test_stateful_lm_counts_its_lstm_layers_and_tied_head():
    """Two LSTM layers (the CPU kernel: 2*B*T*(4H*I + 4H*H) each), the tied head 2*B*T*D*V; backward twice the
    recurrent layers, the head's two gradients, the embedding's rows added, the two uses of the tied weight summed."""
    _, counts, _ = profiled("stateful_lm", False)
    b, t, d, v = pm.BATCH, pm.LM_LEN, pm.LM_DIM, pm.LM_VOCAB
    lstm = pm.LM_LAYERS * 2 * b * t * (4 * d * d + 4 * d * d)
    assert by_op(counts)["aten::mkldnn_rnn_layer"] == lstm
    assert flops_of(counts, MATMULS) == 2 * b * t * d * v
    _, train_counts, _ = profiled("stateful_lm", True)
    assert by_op(train_counts)["aten::mkldnn_rnn_layer_backward"] == 2 * lstm
    assert flops_of(train_counts, MATMULS) == 3 * 2 * b * t * d * v
    assert by_op(train_counts)["aten::embedding_dense_backward"] == b * t * d
    (tied,) = [c for (op, shapes), c in train_counts.items() if op == "aten::add" and shapes == ((v, d), (v, d))]
    assert tied.flops == v * d


def test_glow_step_counts_its_steady_state_not_its_first_batch():
    """The counted step comes after warm-up: ActNorm is initialised by then (no statistics of the batch: no std,
    no mean); the 1x1 convolution 2*B*HW*C*C, slogdet LU's 2n^3/3, the coupling's two convolutions with bias."""
    _, counts, _ = profiled("glow_step", False)
    b, c, hw, hid = pm.BATCH, pm.GLOW_CH, pm.GLOW_SIDE**2, pm.GLOW_HIDDEN
    assert "aten::std" not in by_op(counts) and "aten::mean" not in by_op(counts)
    expected = conv(b, c, c, hw, 1, bias=False) + conv(b, c // 2, hid, hw, 9) + conv(b, hid, c, hw, 1)
    assert flops_of(counts, "aten::convolution") == expected
    assert by_op(counts)["aten::_linalg_slogdet"] == pytest.approx(2 * c**3 / 3)
    _, train_counts, _ = profiled("glow_step", True)
    # backward: the 1x1 weight's gradient (its input's too: ActNorm's parameters need it), the coupling's second
    # convolution both gradients, the first only its weight's and bias's (xa's gradient comes through cat)
    bwd = flops_of(train_counts, "aten::convolution_backward")
    assert bwd == 2 * conv(b, c, c, hw, 1, bias=False) + 2 * conv(b, c // 2, hid, hw, 9, bias=False) + b * hid * hw \
        + 2 * conv(b, hid, c, hw, 1, bias=False) + b * c * hw


def test_causal_attention_of_unequal_lengths_counts_the_scores_its_mask_keeps():
    """is_causal on 3 queries against 7 keys (top-left: query i sees keys 0..i) keeps 3/14 of the scores; on 7
    queries against 3 keys 11/14. Both were counted as half (672 FLOPs each): now 4*B*H*Nq*Nkv*D times the kept
    share, the backward 2.5x that."""
    _, counts, _ = profiled("unequal_causal", False)
    b, h, d, short, long = pm.BATCH, pm.CA_HEADS, pm.CA_DIM, pm.CA_SHORT, pm.CA_LONG
    full = 4 * b * h * short * long * d
    head, tail = (c.flops for c in rows_of(counts, SDPA))
    assert head == pytest.approx(full * short / (2 * long))  # 288
    assert tail == pytest.approx(full * (1 - short / (2 * long)))  # 1056
    assert by_op(counts)["aten::addmm"] == 2 * b * long * h * d * 3 * h * d
    _, train_counts, _ = profiled("unequal_causal", True)
    assert by_op(train_counts)[SDPA + "_backward"] == pytest.approx(formulas.ATTENTION_BWD_OVER_FWD * (head + tail))


def test_square_causal_attention_is_still_half():
    """The square case is unchanged: is_causal on N x N counts half of 4*B*H*N*N*D, forward and backward."""
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    counts = counting.count_ops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                                .sum().backward())
    assert by_op(counts)[SDPA] == 4 * 2 * 5 * 5 * 4 / 2
    assert by_op(counts)[SDPA + "_backward"] == 2.5 * 4 * 2 * 5 * 5 * 4 / 2


def test_causal_fraction_by_alignment():
    """The kept share of the Nq x Nkv scores as the area under the mask's diagonal: top-left (torch's is_causal)
    and lower-right (flash attention's kernels, causal_lower_right), a half when square; a decode step (1 query,
    lower-right) keeps nearly all of its keys, the first query of a top-left mask nearly none."""
    assert formulas.causal_fraction(8, 8) == formulas.causal_fraction(8, 8, lower_right=True) == 0.5
    assert formulas.causal_fraction(3, 7) == pytest.approx(3 / 14)
    assert formulas.causal_fraction(7, 3) == pytest.approx(11 / 14)
    assert formulas.causal_fraction(3, 7, lower_right=True) == pytest.approx(11 / 14)
    assert formulas.causal_fraction(7, 3, lower_right=True) == pytest.approx(3 / 14)
    assert formulas.causal_fraction(1, 1024, lower_right=True) == pytest.approx(1 - 1 / 2048)
    decode = formulas.attention(1, 8, 1, 1024, 64, causal=True)  # top-left, as torch's is_causal
    assert decode.flops == pytest.approx(4 * 8 * 1024 * 64 / 2048)


def test_gpu_attention_kernels_are_counted_on_their_layout_and_alignment():
    """The GPU kernels' counts on meta tensors (shapes only, no device needed). _efficient_attention_forward and
    _flash_attention_* take (B, N, H, D) inputs, which torch's formula read as (B, H, N, D): 3 queries and 7 keys
    over 2 heads failed ("query heads (3) must be a multiple of key/value heads (7)"), and equal lengths were
    counted with the heads and lengths swapped. custom_mask_type 1 (top-left) and 2 (lower-right) were not reduced
    at all; a raw flash kernel's is_causal is lower-right."""
    b, h, nq, nkv, d = 1, 2, 3, 7, 8
    q = torch.empty(b, nq, h, d, device="meta")
    k = torch.empty(b, nkv, h, d, device="meta")
    full = 4 * b * h * nq * nkv * d
    for mask_type, share in ((0, 1.0), (1, 3 / 14), (2, 11 / 14)):
        counts = counting.count_ops(lambda mask_type=mask_type: torch.ops.aten._efficient_attention_forward(
            q, k, k, None, None, None, None, None, 0.0, mask_type))
        assert by_op(counts)["aten::_efficient_attention_forward"] == pytest.approx(full * share), mask_type
    rules = counting.counting_linalg.LINALG_FLOPS
    q5 = torch.empty(b, 5, 3, d, device="meta")  # 5 positions, 3 heads: torch's count took 5 heads of 3 positions
    flash = torch.ops.aten._flash_attention_forward.default
    assert rules["aten._flash_attention_forward"](flash, (q5, q5, q5, None, None, 5, 5, 0.0, False, False), {},
                                                  None) == 4 * b * 3 * 5 * 5 * d
    assert rules["aten._flash_attention_forward"](flash, (q, k, k, None, None, nq, nkv, 0.0, True, False), {},
                                                  None) == pytest.approx(full * 11 / 14)
    backward = torch.ops.aten._efficient_attention_backward.default
    bwd_args = (q, q, k, k, None, q, None, None, nq, nkv, torch.empty(0), 0.0, None, None, 1, False)
    assert rules["aten._efficient_attention_backward"](backward, bwd_args, {}, None) == pytest.approx(
        formulas.ATTENTION_BWD_OVER_FWD * full * 3 / 14)
    flash_bwd = torch.ops.aten._flash_attention_backward.default
    none = torch.empty(0)
    flash_bwd_args = (q, q, k, k, q, none, none, none, nq, nkv, 0.0, True, none, none)  # dy, q, k, v, out, lse, ...
    assert rules["aten._flash_attention_backward"](flash_bwd, flash_bwd_args, {}, None) == pytest.approx(
        formulas.ATTENTION_BWD_OVER_FWD * full * 11 / 14)
    rule = counting.counting_linalg.causal_fraction
    sdpa_flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    assert rule(sdpa_flash, (q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)), {"is_causal": True}) \
        == pytest.approx(11 / 14)
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention.default
    assert rule(efficient, (q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), None, False, 0.0, True), {}) \
        == pytest.approx(3 / 14)


def test_bias_kv_and_zero_attention_extend_the_keys_by_two():
    """add_bias_kv and add_zero_attn each append a key (and value): the scores are over S + 2 keys, 2*B*H*L*(S+2)*Dh
    for the scores (baddbmm) and again for the weighted values; the key/value projection is one packed addmm
    (key is value); the weights come back per head with the padded keys at 0."""
    p, counts, _ = profiled("bias_kv_attention", False)
    length, b, e, h, s = pm.MB_LEN, pm.BATCH, pm.MB_DIM, pm.MB_HEADS, pm.MB_SRC
    keys, hd = s + 2, e // h
    assert by_op(counts)["aten::baddbmm"] == 2 * b * h * length * keys * hd
    assert by_op(counts)["aten::bmm"] == 2 * b * h * length * keys * hd
    assert by_op(counts)["aten::addmm"] == 2 * length * b * e * e * 2 + 2 * s * b * e * 2 * e
    assert by_op(counts)["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * b * h * length * keys
    model, inputs = pm.bias_kv_attention()
    with torch.no_grad():
        _, weights = model(*inputs)
    assert weights.shape == (b, h, length, keys) and torch.all(weights[1, :, :, s - 2 : s] == 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spectral_norm_power_iteration_only_in_training(mode):
    """Each spectral-normed weight W (out, fan-in) costs 3 products 2*out*fan_in in training (u = Wv, v = W^T u,
    sigma = u.Wv), 1 in eval (sigma from the kept u and v); the convolutions by hand (stride 2, padding 1)."""
    model, inputs = pm.sn_discriminator()
    if mode == "eval":
        model.eval()
    counts = counting.count_ops(profile.make_step(model, inputs))
    b, c, hid, side = pm.BATCH, pm.SN_CH, pm.SN_HIDDEN, pm.SN_SIDE
    shapes = [(hid, c * 16), (hid, hid * 16), (1, (hid + 1) * (side // 4) ** 2)]
    products = 3 if mode == "train" else 1
    assert flops_of(counts, {"aten::mv"}) == products * sum(2 * o * i for o, i in shapes)
    assert flops_of(counts, {"aten::vdot"}) == sum(2 * o for o, _ in shapes)
    expected = conv(b, c, hid, (side // 2) ** 2, 16) + conv(b, hid, hid, (side // 4) ** 2, 16)
    assert flops_of(counts, "aten::convolution") == expected
    assert by_op(counts)["aten::addmm"] == 2 * b * shapes[2][1]


def test_global_filter_counts_real_ffts_and_the_complex_filter():
    """rfft2 over the S x S grid, per batch and channel: 5 N log2 N / 2 (real input), N = S^2, plus the orthonormal
    scaling, one multiply per real value of its output; irfft2 the same with its real output scaled; the filter a
    complex product (6 real operations) per element of the one-sided spectrum."""
    _, counts, _ = profiled("global_filter", False)
    b, s, d = pm.BATCH, pm.GF_SIDE, pm.GF_DIM
    n, half = s * s, s * (s // 2 + 1)
    transform = b * d * 5 * n * math.log2(n) / 2
    assert by_op(counts)["aten::_fft_r2c"] == pytest.approx(transform + 2 * b * half * d)
    assert by_op(counts)["aten::_fft_c2r"] == pytest.approx(transform + b * n * d)
    (filt,) = [c for (op, shapes), c in counts.items() if op == "aten::mul" and len(shapes) == 2]
    assert filt.flops == formulas.COMPLEX_MUL_FLOPS * b * half * d
    assert flops_of(counts, "aten::addmm") == 2 * 2 * b * n * d * 2 * d


def test_modulated_convolution_as_grouped_and_transposed_convolutions():
    """The batch as groups: 2 * HW * OUT*B * IN * K*K (each group its own sample's weights); the depthwise
    transposed upsampling 2 * input positions * channels * taps; its backward (the filters' gradients) the same."""
    _, counts, _ = profiled("modulated_conv", False)
    b, ci, co, hw, k = pm.BATCH, pm.MC_IN, pm.MC_OUT, pm.MC_SIDE**2, pm.MC_K
    grouped = conv(1, b * ci, b * co, hw, k * k, groups=b, bias=False)
    upsample = 2 * hw * b * co * 16
    assert flops_of(counts, "aten::convolution") == grouped + upsample
    assert flops_of(counts, "aten::addmm") == 2 * b * pm.MC_STYLE * ci
    _, train_counts, _ = profiled("modulated_conv", True)
    assert flops_of(train_counts, "aten::convolution_backward") == grouped + 2 * upsample


def test_linear_attention_outer_products_and_running_sums():
    """The outer products k_t v_t^T (B*N*D*D multiplies), their cumsum and k's, the numerator q_t S_t (2*B*N*D*D)
    and the normaliser q_t . z_t (2*B*N*D); three bias-free projections 2*B*N*D*D."""
    _, counts, _ = profiled("linear_attention", False)
    b, n, d = pm.BATCH, pm.LIN_LEN, pm.LIN_DIM
    assert flops_of(counts, "aten::mm") == 3 * 2 * b * n * d * d
    (outer,) = [c for (op, shapes), c in counts.items() if op == "aten::mul" and shapes[0] == (b, n, d, 1)]
    assert outer.flops == b * n * d * d
    assert by_op(counts)["aten::cumsum"] == b * n * d * d + b * n * d
    assert flops_of(counts, "aten::bmm") == 2 * b * n * d * d + 2 * b * n * d


def test_neighbourhood_attention_unfold_and_fold():
    """unfold copies each K x K window (no arithmetic: B*C*K*K*HW values written), the scores and the weighted
    values are 2*B*HW*K*K*C each, fold adds each column element into its pixel (B*C*K*K*HW adds)."""
    _, counts, _ = profiled("neighbourhood_attention", False)
    b, c, hw, kk = pm.BATCH, pm.NA_CH, pm.NA_SIDE**2, pm.NA_K**2
    (im2col,) = rows_of(counts, "aten::im2col")
    assert im2col.flops == 0 and im2col.bytes_written == 2 * 4 * b * c * kk * hw
    assert im2col.bytes_read == 2 * 4 * b * c * hw
    assert flops_of(counts, "aten::bmm") == 2 * (2 * b * hw * kk * c)
    assert by_op(counts)["aten::col2im"] == b * c * kk * hw
    assert flops_of(counts, "aten::convolution") == conv(b, c, 3 * c, hw, 1)


def test_conformer_convolution_module():
    """Pointwise Conv1d to 2C, GLU (one per output), depthwise Conv1d (groups = C), BatchNorm in training (8 per
    element), pointwise Conv1d; two macaron FFNs 2 * 2*B*T*D*4D; three LayerNorms."""
    _, counts, _ = profiled("conformer_conv", False)
    b, t, d, k = pm.BATCH, pm.CF_LEN, pm.CF_DIM, pm.CF_K
    expected = conv(b, d, 2 * d, t, 1) + conv(b, d, d, t, k, groups=d) + conv(b, d, d, t, 1)
    assert flops_of(counts, "aten::convolution") == expected
    assert by_op(counts)["aten::glu"] == b * d * t
    assert by_op(counts)["aten::native_batch_norm"] == formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT * b * d * t
    assert flops_of(counts, "aten::addmm") == 2 * 2 * (2 * b * t * d * 4 * d)
    assert by_op(counts)["aten::native_layer_norm"] == 3 * formulas.LAYERNORM_FLOPS_PER_ELEMENT * b * t * d


def test_tied_autoencoder_in_float64():
    """Encoder and decoder share W: 2 * 2*B*NW*WINDOW*HIDDEN forward; backward the decoder's two gradients and the
    encoder's weight gradient (the signal needs none); every counted row is fp64."""
    p, counts, _ = profiled("tied_autoencoder", False)
    b, nw, w, h = pm.BATCH, pm.windows_count(), pm.AE_WINDOW, pm.AE_HIDDEN
    assert flops_of(counts, "aten::mm") == 2 * 2 * b * nw * w * h
    _, train_counts, _ = profiled("tied_autoencoder", True)
    assert flops_of(train_counts, "aten::mm") == 5 * 2 * b * nw * w * h
    assert {o.m.dtype for o in p.ops if o.counted} == {"fp64"}


def test_conformer_under_bf16_autocast_and_inference_mode():
    """Under a bf16 autocast the convolutions and linears are bf16 rows with the fp32 FLOPs; under inference_mode
    the forward counts what no_grad counts (composite ops reach the mode whole and are counted as their parts)."""
    _, counts, _ = profiled("conformer_conv", True)
    model, inputs = pm.conformer_conv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = profile_cpu(model, inputs, train=True)
    heavy = [o for o in p.ops if o.counted and o.op in ("aten::convolution", "aten::addmm", "aten::mm")]
    assert heavy and {o.m.dtype for o in heavy} == {"bf16"}
    for op in ("aten::convolution", "aten::addmm", "aten::mm", "aten::convolution_backward"):
        assert math.fsum(o.m.flops * o.calls for o in p.ops if o.op == op) + math.fsum(
            u.flops for u in p.untimed if u.op == op) == flops_of(counts, op), op
    plain, _, _ = profiled("conformer_conv", False)
    with torch.inference_mode():
        p = profile_cpu(model, inputs)
    assert p.flops == pytest.approx(plain.flops)


def test_glow_step_counted_on_the_meta_device_as_on_the_cpu():
    """count_ops needs no data: the Glow step moved to the meta device (model and inputs) counts the FLOPs and
    bytes the CPU step does, forward and backward (each a first call: ActNorm's statistics of its first batch
    included)."""
    for train in (False, True):
        model, (x,) = pm.glow_step()
        cpu = counting.count_ops(profile.make_step(model, (x,), train=train))
        model, (x,) = pm.glow_step()
        meta = counting.count_ops(profile.make_step(model.to("meta"), (x.to("meta"),), train=train))
        assert "aten::std" in by_op(meta)
        assert math.fsum(c.flops for c in meta.values()) == pytest.approx(math.fsum(c.flops for c in cpu.values()))
        assert math.fsum(c.bytes_read + c.bytes_written for c in meta.values()) == math.fsum(
            c.bytes_read + c.bytes_written for c in cpu.values())
