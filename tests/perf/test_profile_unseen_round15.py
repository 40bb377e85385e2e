"""Fifteenth held-out round for the model profiler (tests/perf/perf_models_round15.py): xLSTM's parallel mLSTM,
TabNet's sparsemax attentive transformer with ghost batch norm, gMLP's spatial gating by functional (grouped and
tril-weighted) conv1d, a deep equilibrium layer iterating under torch.no_grad inside forward, Transformer-XL relative
attention with its relative shift, a product-key memory, ToMe token merging after SDPA, a ConvLSTM stepped over
frames, Performer's FAVOR+ features, a keyword-only SIREN returning a dict, and a channels-last MBConv with stochastic
depth, trained and in eval. Half precision, ambient no_grad / inference_mode, the round's fixes (a PackedSequence as
the inputs, modules without a forward, inputs made by an autograd graph, nonzero_static) and bad inputs are in
tests/perf/test_profile_unseen_round15_more.py.

Every count is written out here from the layer shapes (a multiply-add is 2 FLOPs; a convolution by
``profile_support.conv``; attention 4*B*H*Nq*Nk*D; a sort n*ceil(log2 n) compares per row; a norm's statistics
``formulas``' per-element constants), never read off the profiler; bytes as the distinct tensors an op reads and
writes; every row's intensity its FLOPs over its bytes and its bound its side of the ridge; torch.utils.flop_counter
agreed with where it has a formula.
"""

import math
import sys
from pathlib import Path

import pytest
from torch.utils.flop_counter import sdpa_backward_flop_count

from tilestack.perf import formulas

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round15 as pm  # noqa: E402
from _profile_helpers import FILTERS, check_every_row, one_row, profile_cpu, setup_round, step_counts  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of  # noqa: E402

pytestmark = FILTERS
CASES, IDS, profiled = setup_round(pm.MODELS)
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, allocation, random draws, reading a scalar out.
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::masked_fill", "aten::masked_fill_",
    "aten::ones", "aten::tril", "aten::triu", "aten::flip", "aten::arange", "aten::gather", "aten::scatter",
    "aten::new_zeros", "aten::scalar_tensor", "aten::constant_pad_nd", "aten::_local_scalar_dense",
    "aten::slice_backward", "aten::select_backward", "aten::bernoulli_",
}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
F32 = 4
LN, BN_TRAIN, BN_EVAL = (formulas.LAYERNORM_FLOPS_PER_ELEMENT, formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT,
                         formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT)
# a norm's backward per element: the recompute, the input's, the weight's and the bias's gradients
NORM_BWD_ALL = (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT
                + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT)
NORM_BWD_PARAMS = (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT
                   + formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows (and untimed ops) add up to the counted step; nothing that computes is counted free or left uncounted;
    torch's formulas agreed with; each counted row placed by its intensity against the ridge; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


def test_mlstm_by_hand():
    """Projections (qkv, gates, out); per head the scores q k^T and the weighted values (B*H batched products); the
    forget gates' log-sigmoid and cumsum over T; the (T, T) decay: a difference, an add, the stabiliser's max and
    exp; the normaliser max(|row sum|, exp(-m)). Trained: each batched product's two gradients, the linears' weight
    gradients and the output projection's input gradient (x needs none)."""
    b, t, d, h = pm.ML_BATCH, pm.ML_T, pm.ML_DIM, pm.ML_HEADS
    hd, tt, rows = d // h, b * h * t * t, b * t
    linears = 2 * rows * d * 3 * d + 2 * rows * d * 2 * h + 2 * rows * d * d
    products = 2 * (2 * b * h * t * t * hd)
    _, counts, _ = profiled("mlstm", False)
    ours = by_op(counts)
    assert ours["aten::addmm"] == linears == 6912
    assert ours["aten::bmm"] == products
    assert ours["aten::cumsum"] == ours["aten::log_sigmoid_forward"] == b * h * t
    assert ours["aten::exp"] == tt + b * h * t  # the decay, and exp(-m) per row
    assert ours["aten::amax"] == ours["aten::sum"] == tt
    assert ours["aten::maximum"] == ours["aten::abs"] == b * h * t
    cumsum = one_row(counts, "aten::cumsum")
    assert cumsum.bytes_read == cumsum.bytes_written == b * h * t * F32
    amax = one_row(counts, "aten::amax")
    assert (amax.bytes_read, amax.bytes_written) == (tt * F32, b * h * t * F32)
    scores = one_row(counts, "aten::bmm", ((b * h, t, hd), (b * h, hd, t)))
    assert (scores.bytes_read, scores.bytes_written) == (2 * b * h * t * hd * F32, tt * F32)
    _, counts, _ = profiled("mlstm", True)
    assert by_op(counts)["aten::bmm"] == 3 * products
    assert by_op(counts)["aten::mm"] == linears + 2 * rows * d * d
    assert by_op(counts)["aten::cumsum"] == 2 * b * h * t  # the backward's reversed cumsum


def test_tabnet_by_hand():
    """The shared GLU transformer runs 1 + steps times, the attentive linear per step; batch norms train their
    statistics: the input's (N, F), the ghost ones over chunks of TN_VBS rows, together all N rows; sparsemax sorts
    each row (F * ceil(log2 F) compares), cumsums it, and sums its support. Trained: the input norm's weight and
    bias gradients only (x needs none), the ghost norms' all four; every linear both gradients (the normed input
    carries the input norm's); the gather's gradient an add per picked element; the sort's a scatter (a copy)."""
    n, f, nd, c, steps = pm.TN_ROWS, pm.TN_FEAT, pm.TN_ND, pm.TN_CLASSES, pm.TN_STEPS
    linears = (1 + steps) * 2 * n * f * 2 * nd + steps * 2 * n * nd * f + 2 * n * nd * c
    ghost = (1 + steps) * n * 2 * nd + steps * n * f  # elements through the ghost norms
    _, counts, _ = profiled("tabnet", False)
    ours = by_op(counts)
    assert ours["aten::addmm"] == linears == 3776
    assert ours["aten::native_batch_norm"] == BN_TRAIN * (n * f + ghost)
    assert len(rows_of(counts, "aten::native_batch_norm")) == 3  # input (8, 7); ghost chunks (4, 8) and (4, 7)
    assert ours["aten::sort"] == steps * n * f * math.ceil(math.log2(f))
    assert ours["aten::cumsum"] == ours["aten::clamp"] == ours["aten::gt"] == steps * n * f
    assert ours["aten::glu"] == (1 + steps) * n * nd
    assert ours["aten::add_"] == 1 + (1 + steps) * 2 + steps * 2  # num_batches_tracked: one add per norm call
    _, counts, _ = profiled("tabnet", True)
    ours = by_op(counts)
    assert ours["aten::native_batch_norm_backward"] == NORM_BWD_PARAMS * n * f + NORM_BWD_ALL * ghost
    assert ours["aten::scatter_add"] == steps * n  # cs.gather(-1, k - 1): one element per row
    assert ours["aten::glu_backward"] == (1 + steps) * n * 2 * nd
    assert ours["aten::mm"] == 2 * linears  # both gradients of every linear: the normed x carries the norm's
    (sort_grad,) = rows_of(counts, "aten::scatter")
    assert sort_grad.flops == 0 and not sort_grad.unsupported


def test_gmlp_functional_convolutions_by_hand():
    """The token shift is F.conv1d with groups = channels (3 taps, no bias) on the left-padded normed input; the
    spatial gating unit's F.conv1d mixes the T tokens (as channels) by a tril weight made in forward, with a bias;
    the first linear's 3-d non-contiguous input runs as mm plus a bias add. Trained: both convolutions take input
    and weight gradients (the spatial one its bias's too); the layer norms theirs."""
    b, t, d, ff, k = pm.GM_BATCH, pm.GM_T, pm.GM_DIM, pm.GM_FF, pm.GM_TAPS
    shift = conv(b, d, d, t, k, groups=d, bias=False)
    spatial = conv(b, t, t, ff, 1)
    _, counts, _ = profiled("gmlp", False)
    assert sorted(c.flops for c in rows_of(counts, "aten::convolution")) == sorted([shift, spatial])
    shift_row = one_row(counts, "aten::convolution", ((b, d, t + k - 1), (d, 1, k)))
    assert shift_row.bytes_read == (b * d * (t + k - 1) + d * k) * F32  # the padded input, the weight
    assert shift_row.bytes_written == b * d * t * F32
    assert flops_of(counts, MATMULS) == 2 * b * t * d * 2 * ff + 2 * b * t * ff * d
    assert by_op(counts)["aten::native_layer_norm"] == LN * (b * t * d + b * t * ff)
    _, counts, _ = profiled("gmlp", True)
    bias = b * t * ff
    assert by_op(counts)["aten::convolution_backward"] == 2 * shift + 2 * (spatial - bias) + bias == 2400


def test_deep_equilibrium_counts_the_iterations_the_data_takes():
    """The no-grad loop calls f (a (N, H) x (H, H) product, an add, a tanh) until the update's norm is below the
    tolerance: as many times as the same loop run again in plain torch takes, then once more with gradients. Each
    loop call also takes the update's difference, its norm and a compare. Trained: only the last call is
    differentiated (the loop's z is no-grad), so tanh's backward once, and the head's and f's weight gradients."""
    n, i, h, c = pm.DQ_ROWS, pm.DQ_IN, pm.DQ_HIDDEN, pm.DQ_CLASSES
    model, (x,) = pm.deq()
    calls = pm.deq_iterations(model, x)
    assert 3 <= calls < pm.DQ_MAX_ITERS  # it converged, after several steps
    _, counts, _ = profiled("deq", False)
    ours = by_op(counts)
    assert ours["aten::mm"] == (calls + 1) * 2 * n * h * h
    assert ours["aten::addmm"] == 2 * n * i * h + 2 * n * h * c
    assert ours["aten::tanh"] == (calls + 1) * n * h
    assert ours["aten::sub"] == calls * n * h
    assert ours["aten::linalg_vector_norm"] == calls * formulas.NORM_FLOPS_PER_ELEMENT * n * h
    assert ours["aten::lt"] == calls
    _, counts, _ = profiled("deq", True)
    ours = by_op(counts)
    assert ours["aten::tanh_backward"] == n * h
    backward = 2 * (2 * n * h * c) + 2 * n * h * h + 2 * n * i * h  # head dW, dz; f's dW (z detached); inj's dW
    assert ours["aten::mm"] == (calls + 1) * 2 * n * h * h + backward


def test_transformer_xl_relative_attention_by_hand():
    """The packed projection runs over [memory; tokens] (K = M + T rows), r_net over the K relative positions, the
    output projection over the T tokens; the AC, BD and weighted-value einsums are batched products of T x K scores
    by the head width each; the softmax over keys; the relative shift's cat reads the zero column and BD and writes
    the padded (T, K + 1) scores (cat's list argument has no shape: its three calls are one row)."""
    t, m, b, d, h = pm.XL_T, pm.XL_MEM, pm.XL_BATCH, pm.XL_DIM, pm.XL_HEADS
    k, hd = m + t, d // h
    scores = t * k * b * h
    _, counts, _ = profiled("transformer_xl", False)
    ours = by_op(counts)
    assert ours["aten::mm"] == 2 * k * b * d * 3 * d + 2 * k * d * d + 2 * t * b * d * d
    assert ours["aten::bmm"] == 3 * 2 * scores * hd
    assert ours["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * scores
    assert ours["aten::sin"] == ours["aten::cos"] == k * d // 2
    assert ours["aten::native_layer_norm"] == LN * t * b * d
    cat = one_row(counts, "aten::cat")
    memory, positions, shift = k * b * d, k * d, t * (k + 1) * b * h
    assert cat.calls == 3
    assert cat.bytes_read == cat.bytes_written == (memory + positions + shift) * F32
    _, counts, _ = profiled("transformer_xl", True)
    assert by_op(counts)["aten::bmm"] == 3 * 3 * 2 * scores * hd
    assert by_op(counts)["aten::_softmax_backward_data"] == formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT * scores


def test_product_key_memory_by_hand():
    """Two sub-key products (N, K/2) x (K/2, S); top-k over S per half and over the k*k cartesian sums; the bag sums
    k rows each times its weight (2 FLOPs per element) reading only those rows, the indices, the offsets it makes
    and the weights. Trained: the bag's gradient into each picked row (scaled by its weight) and the weights'
    gradient (a dot per pick), the sub-key products' both gradients."""
    n, i, key, s, k, v = pm.PK_ROWS, pm.PK_IN, pm.PK_KEY, pm.PK_SUBKEYS, pm.PK_TOPK, pm.PK_VDIM
    subkeys = 2 * (2 * n * (key // 2) * s)
    _, counts, _ = profiled("pkm", False)
    ours = by_op(counts)
    assert ours["aten::mm"] == subkeys
    assert ours["aten::addmm"] == 2 * n * i * key
    assert ours["aten::topk"] == 2 * n * s + n * k * k
    assert ours["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * n * k
    bag = one_row(counts, "aten::_embedding_bag")
    assert bag.flops == 2 * n * k * v
    assert bag.bytes_read == n * k * v * F32 + n * k * 8 + n * 8 + n * k * F32 == 460
    _, counts, _ = profiled("pkm", True)
    ours = by_op(counts)
    assert ours["aten::_embedding_bag_backward"] == ours["aten::_embedding_bag_per_sample_weights_backward"] == (
        2 * n * k * v)
    assert ours["aten::mm"] == 3 * subkeys + 2 * n * i * key  # the query's weight gradient; x needs none


def test_tome_merges_tokens_by_hand():
    """SDPA over N tokens, the merge's cosine scores (Na x Nb per image), a max per row, an argsort of Na, the
    scatter_reduce mean of r tokens' features; the MLP and second norm then run over N - r tokens. Trained: the
    matching ran under no_grad, so its scores, max and sort are counted once; SDPA's backward is torch's count."""
    b, n, d, h, r = pm.TM_BATCH, pm.TM_TOKENS, pm.TM_DIM, pm.TM_HEADS, pm.TM_MERGE
    hd, na, kept = d // h, n // 2, n - r
    linears = 2 * b * n * d * 3 * d + 2 * b * n * d * d + 2 * (2 * b * kept * d * 4 * d)
    _, counts, _ = profiled("tome", False)
    ours = by_op(counts)
    assert ours["aten::addmm"] == linears
    assert ours[SDPA] == 4 * b * h * n * n * hd
    assert ours["aten::bmm"] == 2 * b * na * na * hd
    assert ours["aten::max"] == b * na * na
    assert ours["aten::sort"] == b * na * math.ceil(math.log2(na))
    # r tokens' features added in, then each (B, N - Na, D) destination element divided by its count (profiler
    # round 21: the mean's divides were not counted)
    assert ours["aten::scatter_reduce"] == b * r * d + b * (n - na) * d
    assert ours["aten::native_layer_norm"] == LN * (b * n * d + b * kept * d)
    _, counts, _ = profiled("tome", True)
    ours = by_op(counts)
    assert ours["aten::bmm"] == 2 * b * na * na * hd and ours["aten::sort"] == b * na * 2
    assert ours[SDPA + "_backward"] == sdpa_backward_flop_count(*[(b, h, n, hd)] * 4)


def test_convlstm_steps_by_hand():
    """One 3x3 convolution of [frame; h] per frame, a 1x1 head. Trained: each step's weight and bias gradients, the
    input gradient at every step but the first (its h is the zero state and the frames need none), and the head's
    three."""
    b, t, c, hid, s = pm.CL_BATCH, pm.CL_T, pm.CL_IN, pm.CL_HIDDEN, pm.CL_SIDE
    cell = conv(b, c + hid, 4 * hid, s * s, 9)
    head = conv(b, hid, 1, s * s, 1)
    _, counts, _ = profiled("convlstm", False)
    (cell_row,) = [x for x in rows_of(counts, "aten::convolution") if x.calls == t]
    assert cell_row.flops == t * cell
    assert by_op(counts)["aten::convolution"] == t * cell + head == 105056
    assert by_op(counts)["aten::sigmoid"] == t * 3 * b * hid * s * s
    assert by_op(counts)["aten::tanh"] == t * 2 * b * hid * s * s
    _, counts, _ = profiled("convlstm", True)
    cell_bias, head_bias = b * 4 * hid * s * s, b * s * s
    products = cell - cell_bias
    expected = t * (products + cell_bias) + (t - 1) * products + 2 * (head - head_bias) + head_bias
    assert by_op(counts)["aten::convolution_backward"] == expected == 174368


def test_performer_random_features_by_hand():
    """The scaled queries' and keys' random features (N, hd) x (hd, m) each, phi(k)^T v, phi(q) . sum phi(k) (a
    multiply-add per feature) and phi(q) (phi(k)^T v); the features' exp and max stabiliser per element of (N, m)."""
    b, n, d, h, m = pm.PF_BATCH, pm.PF_T, pm.PF_DIM, pm.PF_HEADS, pm.PF_FEATURES
    hd, bh = d // h, b * h
    features = 2 * (2 * bh * n * hd * m)
    _, counts, _ = profiled("performer", False)
    ours = by_op(counts)
    assert ours["aten::bmm"] == features + 2 * bh * n * m * hd + 2 * bh * n * m + 2 * bh * n * m * hd
    assert ours["aten::exp"] == ours["aten::amax"] == 2 * bh * n * m
    assert ours["aten::addmm"] == 2 * b * n * d * 3 * d + 2 * b * n * d * d
    assert ours["aten::reciprocal"] == bh * n


def test_siren_keyword_only_dict_by_hand():
    """Fourier features (N, 2) x (2, F), their sine and cosine; each sine layer a linear, a multiply by omega and a
    sine; the heads; both outputs of the dict train (the loss sums rgb and sdf), so both heads take weight and input
    gradients, every layer too, and the features' product its coordinate gradient not at all (a buffer and an
    input that need none)."""
    n, f, w, layers = pm.SI_POINTS, pm.SI_FOURIER, pm.SI_WIDTH, pm.SI_LAYERS
    linears = 2 * n * 2 * f * w + (layers - 1) * 2 * n * w * w + 2 * n * w * 3 + 2 * n * w * 1
    _, counts, _ = profiled("siren", False)
    ours = by_op(counts)
    assert ours["aten::mm"] == 2 * n * 2 * f
    assert ours["aten::addmm"] == linears
    assert ours["aten::sin"] == n * f + layers * n * w
    assert ours["aten::cos"] == n * f
    assert ours["aten::sigmoid"] == n * 3
    _, counts, _ = profiled("siren", True)
    first = 2 * n * 2 * f * w
    assert by_op(counts)["aten::mm"] == 2 * n * 2 * f + 2 * linears - first  # the features need no gradient
    assert by_op(counts)["aten::cos"] == n * f + layers * n * w  # sin's backward: a cosine per element


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mbconv_channels_last_trained_and_in_eval(mode):
    """The five convolutions count as their contiguous twins (the layout changes no count); batch norms train their
    statistics in train mode (8 FLOPs an element) and use the running ones in eval (4); stochastic depth draws a
    Bernoulli per sample and scales it in training only (a draw: 0 FLOPs, not uncounted), so eval has no such row.
    The backward: the expansion's weight gradient only (x needs none), the others' input and weight gradients (and
    the squeeze-excite's biases'); eval's norms' input gradients by frozen statistics."""
    n, c, e, sq, side = pm.MB_BATCH, pm.MB_C, pm.MB_EXPAND, pm.MB_SQUEEZE, pm.MB_SIDE
    pos = side * side
    expand, dw = conv(n, c, e, pos, 1, bias=False), conv(n, e, e, pos, 9, groups=e, bias=False)
    reduce_, excite = conv(n, e, sq, 1, 1), conv(n, sq, e, 1, 1)
    project = conv(n, e, c, pos, 1, bias=False)
    model, inputs = pm.mbconv()
    getattr(model, mode)()
    fwd = step_counts(model, inputs)
    assert by_op(fwd)["aten::convolution"] == expand + dw + reduce_ + excite + project == 27496
    elements = n * e * pos * 2 + n * c * pos
    assert by_op(fwd)["aten::native_batch_norm"] == (BN_TRAIN if mode == "train" else BN_EVAL) * elements
    assert ("aten::bernoulli_" in by_op(fwd)) == (mode == "train")
    if mode == "train":
        draw = one_row(fwd, "aten::bernoulli_")
        assert (draw.flops, draw.unsupported, draw.bytes_read, draw.bytes_written) == (0, False, 0, n * F32)
    depthwise = one_row(fwd, "aten::convolution", ((n, e, side, side), (e, 1, 3, 3)))
    assert depthwise.bytes_read == (n * e * pos + e * 9) * F32 and depthwise.bytes_written == n * e * pos * F32
    p = profile_cpu(model, inputs, train=True)
    assert model.training == (mode == "train")
    bwd = {o.op: 0.0 for o in p.ops}
    for o in p.ops:
        bwd[o.op] += o.m.flops * o.calls
    bias = n * sq + n * e
    assert bwd["aten::convolution_backward"] == expand + 2 * dw + 2 * (reduce_ + excite) - bias + 2 * project
    per = NORM_BWD_ALL if mode == "train" else (
        NORM_BWD_PARAMS + formulas.NORM_BWD_FROZEN_INPUT_FLOPS_PER_ELEMENT)
    assert bwd["aten::native_batch_norm_backward"] == per * elements
    assert not p.unsupported and {o.m.dtype for o in p.ops if o.counted} == {"fp32"}
