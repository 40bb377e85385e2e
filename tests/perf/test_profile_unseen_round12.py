"""Twelfth held-out round for the model profiler (tests/perf/perf_models_round12.py): nn.MultiheadAttention with
per-head weights (its explicit baddbmm / softmax / bmm path) and through SDPA, a packed 2-layer LSTM with dropout and
an initial state, a packed bidirectional ReLU RNN, a volumetric net (Conv3d, trilinear, a grouped ConvTranspose2d,
GroupNorm, InstanceNorm and cumulative BatchNorm, pixel (un)shuffle, LRN, nearest-exact and bicubic), nn.Bilinear with
training-mode random layers, weighted and max EmbeddingBags, an embedding with max_norm, a traced block, a Jacobian
penalty by vmap(jacrev(functional_call)), checkpointing with dropout, in-place ops on views and a dirty autograd
Function, a cached parametrization, and models with no parameters, a lazily built head, self-freezing, integer and
bool inputs only, and nested outputs. State, the round's fixes and refusals are in
tests/perf/test_profile_unseen_round12_more.py.

Every matmul, convolution, interpolation and attention is checked against its count written out here from the layer
shapes (a multiply-add is 2 FLOPs; attention 4*B*H*Nq*Nk*D; a convolution by ``profile_support.conv``; a recurrent
layer 2 * tokens * gates*H * (I + H) per layer and direction, over the packed tokens only), never against the
profiler's own numbers; every row's bound against its intensity and the ridge; torch.utils.flop_counter agreed with
where it has a formula.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round12 as pm  # noqa: E402
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
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, packing bookkeeping, random draws, allocation.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::zeros", "aten::arange", "aten::scalar_tensor",
    "aten::new_zeros", "aten::flip", "aten::fill_", "aten::_local_scalar_dense", "aten::select_backward",
    "aten::slice_backward", "aten::masked_fill_", "aten::constant_pad_nd", "aten::index_select", "aten::embedding",
    "aten::repeat", "aten::triu", "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::_upsample_nearest_exact2d",
    "aten::bernoulli_", "aten::_pack_padded_sequence", "aten::scatter_",
}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
B = pm.BATCH
WHOLE = {"int_hash", "bool_logic"}  # integer / bool data only: placed under the step's default float roof


def tokens(lengths):
    return sum(lengths)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no op that computes is counted free or left uncounted, torch's formulas agreed
    with, every number finite and >= 0, each row with a roof for its dtype placed by its intensity against the ridge
    (integer and bool rows under the fp32 roof the docs promise where the device has no integer roof); the shares add
    up to 1; the table renders."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0
    assert not p.unsupported, p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    assert not silent_zeros(counts, DATA_MOVEMENT), silent_zeros(counts, DATA_MOVEMENT)
    assert_as_torch_counts(counts, theirs, NOT_AS_TORCH)
    assert_rows_finite(p)
    for o in p.ops:
        if o.counted and o.m.flops > 0:
            assert o.m.dtype == "fp32", (o.label, o.m.dtype)  # fp32 models; int / bool rows read as the step's
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert p.step_s == pytest.approx(math.fsum(o.total_s for o in p.ops), rel=1e-9)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- attention: the weights path and SDPA count the same products ---------------------------------------------
def attention_projections(b, n, e):
    return 2 * b * n * e * 3 * e + 2 * b * n * e * e  # packed in-projection (q, k, v), out-projection


@pytest.mark.parametrize("name", ["mha_weights", "mha_sdpa"])
def test_attention_forward_by_hand(name):
    """Both paths project 2*B*N*E*3E and 2*B*N*E*E; the scores and the weighted values are 4*B*H*N*N*D, as one
    fused SDPA op or as an explicit baddbmm (the padding mask added to Q K^T) and a bmm of 2*B*H*N*N*D each. The
    padding mask does not shorten the products (masked scores are computed, then filled)."""
    _, counts, _ = profiled(name, False)
    n, e, h = pm.MHA_LEN, pm.MHA_DIM, pm.MHA_HEADS
    d = e // h
    attention = 4 * B * h * n * n * d
    if name == "mha_weights":
        assert by_op(counts)["aten::baddbmm"] == by_op(counts)["aten::bmm"] == attention / 2
        assert SDPA not in by_op(counts)
        assert by_op(counts)["aten::_softmax"] > 0
        assert flops_of(counts, MATMULS) == attention_projections(B, n, e) + attention
    else:
        assert by_op(counts)[SDPA] == attention
        assert flops_of(counts, MATMULS) == attention_projections(B, n, e)


def test_attention_backward_by_hand():
    """Training, the input needs no gradient: the in-projection's weight gradient (2*B*N*E*3E), the out-projection's
    input and weight gradients (2 x 2*B*N*E*E); the weights path's two batched products each get both operands'
    gradients (4 x 2*B*H*N*N*D), SDPA's backward counts 2.5x its forward (torch's formula)."""
    n, e, h = pm.MHA_LEN, pm.MHA_DIM, pm.MHA_HEADS
    d = e // h
    half = 2 * B * h * n * n * d
    projections_bwd = 2 * B * n * e * 3 * e + 2 * (2 * B * n * e * e)
    _, weights, _ = profiled("mha_weights", True)
    assert flops_of(weights, MATMULS) == attention_projections(B, n, e) + 2 * half + projections_bwd + 4 * half
    _, fused, _ = profiled("mha_sdpa", True)
    assert flops_of(fused, MATMULS) == attention_projections(B, n, e) + projections_bwd
    assert by_op(fused)[SDPA + "_backward"] == 2.5 * 2 * half


def test_attention_weights_are_per_head_and_padding_gets_none():
    """The model's own output as the user checks it: (B, H, N, N) weights, rows summing to 1, 0 on padded keys; the
    profile leaves the layer in eval mode with the fast path setting as it was."""
    model, inputs = pm.mha_weights()
    before = torch.backends.mha.get_fastpath_enabled()
    profiled("mha_weights", False)
    assert torch.backends.mha.get_fastpath_enabled() == before
    with torch.no_grad():
        _, w = model(*inputs)
    assert w.shape == (B, pm.MHA_HEADS, pm.MHA_LEN, pm.MHA_LEN)
    assert torch.allclose(w.sum(-1), torch.ones(()))
    assert torch.all(w[1, :, :, pm.MHA_KEEP[1]:] == 0)


# --- recurrent layers over packed sequences ---------------------------------------------------------------------
def packed_batch_sizes(lengths):
    return [sum(1 for n in lengths if n > t) for t in range(max(lengths))]


def test_packed_lstm_counts_only_the_packed_tokens():
    """A packed batch of lengths (3, 5, 2) is 10 tokens, not 3 x 5: each layer's input projection runs once over them
    (2*T*4H*I, 2*T*4H*H for the second layer) and its recurrence step by step over the batch sizes (3, 3, 2, 1, 1),
    2*T*4H*H in all; dropout between the layers draws one mask over the first layer's packed output."""
    _, counts, _ = profiled("packed_lstm", False)
    t, i, hid = tokens(pm.PL_LENGTHS), pm.PL_IN, pm.PL_HIDDEN
    gates = 4 * hid
    assert packed_batch_sizes(pm.PL_LENGTHS) == [3, 3, 2, 1, 1]
    expected = 2 * t * gates * (i + hid) + 2 * t * gates * (hid + hid)
    assert flops_of(counts, MATMULS) == expected
    recurrent = sorted(s[1][0] for (op, s), c in counts.items() if op == "aten::addmm" and s[2] == (hid, gates))
    # one row per batch size of the recurrence, and the second layer's projection over all T tokens (H = its I)
    assert recurrent == [1, 2, 3, t]
    (mask,) = rows_of(counts, "aten::bernoulli_")
    assert mask.bytes_written == t * hid * 4


def test_packed_lstm_backward_skips_what_needs_no_gradient():
    """Backward: every weight gradient (the forward's matmuls again); input gradients of the second layer's
    projection and of each recurrent step but the first of each layer (the given initial state needs none), and
    none into the data (2*(T - 3)*4H*H per layer for the recurrence)."""
    _, counts, _ = profiled("packed_lstm", True)
    t, i, hid = tokens(pm.PL_LENGTHS), pm.PL_IN, pm.PL_HIDDEN
    gates, first = 4 * hid, packed_batch_sizes(pm.PL_LENGTHS)[0]
    forward = 2 * t * gates * (i + hid) + 2 * t * gates * (2 * hid)
    weight_grads = forward
    input_grads = 2 * t * gates * hid + 2 * (2 * (t - first) * gates * hid)
    assert flops_of(counts, MATMULS) == forward + weight_grads + input_grads


def test_elman_rnn_bidirectional_packed():
    """A bidirectional ReLU RNN over lengths (4, 2): 6 tokens each way, 2*T*H*(I + H) per direction; its relu one
    per hidden element per token and direction."""
    _, counts, _ = profiled("elman_packed", False)
    t, i, hid = tokens(pm.ER_LENGTHS), pm.ER_IN, pm.ER_HIDDEN
    assert flops_of(counts, MATMULS) == 2 * (2 * t * hid * (i + hid))
    assert by_op(counts)["aten::relu"] == 2 * t * hid


# --- volumetric net ---------------------------------------------------------------------------------------------
def test_volumetric_convolutions_and_interpolations_by_hand():
    """Conv3d (pad 1, stride (1, 2, 2)) on 3x6x6: 3x3x3 outputs, 27 taps; the grouped ConvTranspose2d scatters each
    of its 6x6 inputs through 9 taps into C_out/groups channels (output 12x12 with output_padding), plus its bias per
    output; trilinear 8 taps per upsampled element (2*8 FLOPs), bicubic 16 (2*16), nearest-exact none."""
    _, counts, _ = profiled("volumetric", False)
    s = pm.VOL_SIDE
    out3 = pm.VOL_D * (s // 2) ** 2
    conv3d = conv(B, pm.VOL_C, pm.VOL_C3, out3, 27)
    convt = conv(B, pm.VOL_CT, pm.VOL_C3, s * s, 9, groups=pm.VOL_GROUPS, bias=False) + B * pm.VOL_CT * (2 * s) ** 2
    assert sorted(c.flops for c in rows_of(counts, "aten::convolution")) == sorted([conv3d, convt])
    up3 = B * pm.VOL_C3 * (2 * pm.VOL_D) * (s // 2 * 2) ** 2
    assert by_op(counts)["aten::upsample_trilinear3d"] == 2 * 8 * up3
    assert by_op(counts)["aten::upsample_bicubic2d"] == 2 * 16 * B * pm.VOL_CT * (3 * s) ** 2
    assert by_op(counts)["aten::_upsample_nearest_exact2d"] == 0
    (near,) = rows_of(counts, "aten::_upsample_nearest_exact2d")
    assert near.bytes_written == B * pm.VOL_CT * (3 * s) ** 2 * 4


def test_volumetric_backward_convolutions():
    """The convolutions' backward: Conv3d's weight and bias gradients only (its input is the data); the transposed
    convolution's input, weight and bias gradients; the interpolations' backward at their forward counts."""
    _, counts, _ = profiled("volumetric", True)
    s = pm.VOL_SIDE
    out3 = pm.VOL_D * (s // 2) ** 2
    conv3d_w = conv(B, pm.VOL_C, pm.VOL_C3, out3, 27, bias=False) + B * pm.VOL_C3 * out3
    convt_xw = 2 * conv(B, pm.VOL_CT, pm.VOL_C3, s * s, 9, groups=pm.VOL_GROUPS, bias=False)
    convt_b = B * pm.VOL_CT * (2 * s) ** 2
    assert by_op(counts)["aten::convolution_backward"] == conv3d_w + convt_xw + convt_b
    for op in ("upsample_trilinear3d", "upsample_bicubic2d"):
        assert by_op(counts)[f"aten::{op}_backward"] == by_op(counts)[f"aten::{op}"]


# --- pairs, bags, traced, Jacobian, checkpoint, views, parametrization -------------------------------------------
def test_bilinear_and_random_layers():
    """nn.Bilinear: 2*R*O*A*B; its backward two more such products (the weight's and the first input's gradients:
    torch's _trilinear). RReLU one FLOP per element."""
    _, counts, _ = profiled("pairs_random", False)
    bilinear = 2 * pm.PR_ROWS * pm.PR_OUT * pm.PR_A * pm.PR_B
    assert by_op(counts)["aten::_trilinear"] == bilinear
    assert by_op(counts)["aten::rrelu_with_noise"] == pm.PR_ROWS * pm.PR_OUT
    _, train, _ = profiled("pairs_random", True)
    assert by_op(train)["aten::_trilinear"] == 2 * bilinear


def test_weighted_and_max_bags_forward():
    """The sum bag multiplies each of its 10 entries by its weight and adds it (2 FLOPs per element); the max bag
    compares each entry (1); the empty bag reads no row."""
    _, counts, _ = profiled("weighted_bags", False)
    n, d = len(pm.BAG_IDS), pm.BAG_DIM
    assert sorted(c.flops for c in rows_of(counts, "aten::_embedding_bag")) == [n * d, 2 * n * d]


def test_max_norm_lookup_by_hand():
    """The renorm of the 4 distinct ids' rows (3 FLOPs per element), the head 2*8*D; the lookup gathers 8 rows."""
    _, counts, _ = profiled("max_norm_lookup", False)
    assert by_op(counts)["aten::embedding_renorm_"] == 3 * 4 * pm.MN_DIM
    assert flops_of(counts, MATMULS) == 2 * 8 * pm.MN_DIM
    (lookup,) = rows_of(counts, "aten::embedding")
    assert lookup.bytes_read == 8 * 8 + 8 * pm.MN_DIM * 4


def test_traced_block_counted_and_named():
    """A torch.jit.trace'd block runs its ATen ops under the mode like eager code: 2*R*(I*H + H*I) for the block,
    2*R*I*O for the head; a traced module profiled alone is named by its original class."""
    _, counts, _ = profiled("with_traced", False)
    r = 3
    assert flops_of(counts, MATMULS) == 2 * r * (2 * pm.TR_IN * pm.TR_HIDDEN) + 2 * r * pm.TR_IN * pm.TR_OUT
    model, (x,) = pm.with_traced()
    p = profile_cpu(model.block, (x,))
    assert p.name == "Sequential" and all(o.m.config["model"] == "Sequential" for o in p.ops)


def test_jacobian_penalty_by_hand():
    """f(x) once (2*R*(I*H + H*O)); jacrev's forward again per sample (vmapped: the same); its backward for each of
    the O basis vectors: through the second layer 2*R*O*O*H, through the first 2*R*O*H*I."""
    _, counts, _ = profiled("jacobian_penalty", False)
    r, i, h, o = pm.JP_ROWS, pm.JP_IN, pm.JP_HIDDEN, pm.JP_OUT
    forward = 2 * r * (i * h + h * o)
    vjps = 2 * r * o * (o * h + h * i)
    assert flops_of(counts, MATMULS) == 2 * forward + vjps


def test_checkpoint_recomputes_up_to_what_backward_needs():
    """Non-reentrant checkpointing recomputes the block in backward only until the tensors backward needs are back
    (it stops before the last linear, whose output nobody saved): forward 2 linears, recompute the first and its
    dropout (the same mask: preserve_rng_state), backward the second's input and weight gradients and the first's
    weight gradient (the data needs none)."""
    _, counts, _ = profiled("checkpointed_dropout", True)
    one = 2 * pm.CK_ROWS * pm.CK_IN * pm.CK_HIDDEN
    assert flops_of(counts, MATMULS) == 2 * one + one + 3 * one
    assert sum(c.calls for c in rows_of(counts, "aten::bernoulli_")) == 2


def test_inplace_views_move_only_the_view():
    """mul_ on a row of each sample (5 x 3 of the 5 x 2 x 3), add_ on each diagonal (5 x 2): FLOPs and bytes of the
    view's elements, not of the tensor under it; the dirty Function's clamp_ one per element."""
    _, counts, _ = profiled("inplace_views", False)
    r, half = pm.VW_ROWS, pm.VW_DIM // 2
    (mul,) = rows_of(counts, "aten::mul_")
    assert (mul.flops, mul.bytes_read, mul.bytes_written) == (r * half, r * half * 4, r * half * 4)
    (add,) = rows_of(counts, "aten::add_")
    assert (add.flops, add.bytes_read, add.bytes_written) == (r * 2, r * 2 * 4, r * 2 * 4)
    assert by_op(counts)["aten::clamp_"] == r * pm.VW_DIM
    assert flops_of(counts, MATMULS) == 2 * r * pm.VW_DIM * pm.VW_DIM


def test_cached_parametrization_runs_once_per_forward():
    """Under parametrize.cached() the symmetric weight is built once (two triu, one add of D x D) though the linear
    runs twice (2 x 2*R*D*D)."""
    _, counts, _ = profiled("cached_symmetric", False)
    d, r = pm.CP_DIM, pm.CP_ROWS
    assert sum(c.calls for c in rows_of(counts, "aten::triu")) == 2
    assert rows_of(counts, "aten::add")[0].calls == 1 and by_op(counts)["aten::add"] == d * d
    assert flops_of(counts, MATMULS) == 2 * (2 * r * d * d)


def test_no_parameters_and_int_and_bool_models():
    """No weights: two batched products 2*B*N*N*D each and a softmax; the hash net one FLOP per id for each of mul,
    add, remainder and bincount; the bool net one per bit for each of its four ops. Their rows read fp32 (the
    default the docs give a step with no float data) and sit on the memory side."""
    _, counts, _ = profiled("no_parameters", False)
    assert by_op(counts)["aten::bmm"] == 2 * (2 * B * pm.NP_LEN * pm.NP_LEN * pm.NP_DIM)
    _, hashed, _ = profiled("int_hash", False)
    assert {op: by_op(hashed)[op] for op in ("aten::mul", "aten::add", "aten::remainder", "aten::bincount")} == {
        op: pm.HS_IDS for op in ("aten::mul", "aten::add", "aten::remainder", "aten::bincount")}
    p, bits, _ = profiled("bool_logic", False)
    assert p.flops == 4 * pm.BL_BITS
    assert {c.dtype for c in bits.values() if c.flops} == {"bool"}
    assert all(o.m.dtype == "fp32" and o.bound == "memory" for o in p.ops if o.counted)


def test_nested_outputs_train_on_every_tensor_that_needs_grad():
    """Outputs nested in a dict, a tuple with None, a list and a namedtuple with a string and None: the training step
    backpropagates their sum (y, y.sum(), 2y): one weight gradient 2*B*I*O; the strings, ints and Nones are skipped."""
    _, counts, _ = profiled("nested_outputs", True)
    assert flops_of(counts, MATMULS) == 2 * (2 * B * 4 * 3)


def test_lazy_head_counts_the_built_head():
    """The profiled steps are the model after its first call: body, the built head, the swapped Tanh."""
    _, counts, _ = profiled("lazy_head", False)
    assert flops_of(counts, MATMULS) == 2 * 3 * (pm.LH_IN * pm.LH_HIDDEN + pm.LH_HIDDEN * pm.LH_OUT)
    assert by_op(counts)["aten::tanh"] == 3 * pm.LH_HIDDEN and "aten::relu" not in by_op(counts)

