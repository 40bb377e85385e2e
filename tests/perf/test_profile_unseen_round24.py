"""Twenty-fourth held-out round for the model profiler: seven models written for this round
(``perf_models_round24``), profiled forward and trained, every row checked, and each model's FLOPs and the bytes of
its telling rows written out by hand from the layer shapes.

The models: a shifted-window attention block (torch.roll, window partition, a relative-position bias gathered from a
table, the shift mask added to it, SDPA with that float mask); a ConvNeXt-V2 block (depthwise 7x7, LayerNorm over
channels-last, the global response norm); a top-2 mixture of experts dispatched by index_select and combined by
index_add_; a graph layer reducing messages by scatter_reduce (mean and amax); a DLRM interaction (embedding bags,
bmm of the features, the strict upper triangle by triu_indices); nn.MultiheadAttention with a key padding mask and
averaged weights; a (2+1)D Conv3d video block with BatchNorm3d. The public API's refusals and this round's fixes are
in test_profile_unseen_round24_more.py.

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; element-wise ops one per output element; a reduction one per
element folded in; softmax, LayerNorm and batch norm by their ``formulas`` constants; attention 4 B H Nq Nkv D; a
top-k a compare per element; a vector norm 2 per element. Bytes are the distinct tensors an op reads and writes
(fp32: 4 bytes, int64: 8); a lookup reads the rows it returns (at most what the table holds) and its indices.
"""

import sys
from pathlib import Path

import pytest

from tilestack.perf import formulas

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round24 as pm  # noqa: E402
from _profile_helpers import FILTERS, check_every_row, one_row, setup_round  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
SOFTMAX = formulas.SOFTMAX_FLOPS_PER_ELEMENT
SOFTMAX_BWD = formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT
LAYERNORM = formulas.LAYERNORM_FLOPS_PER_ELEMENT
BATCHNORM = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT
NORM = formulas.NORM_FLOPS_PER_ELEMENT

CASES, IDS, profiled = setup_round(pm.MODELS)
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::roll", "aten::index", "aten::index_select",
    "aten::nonzero", "aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::masked_fill_", "aten::arange",
    "aten::triu_indices", "aten::gather", "aten::scatter", "aten::select_backward", "aten::slice_backward",
    "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::lift_fresh", "aten::empty_like", "aten::expand",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- shifted-window attention --------------------------------------------------------------------------------------
SW_ROWS = pm.SW_B * pm.SW_NW * pm.SW_T  # tokens over all windows
SW_X = pm.SW_B * pm.SW_S * pm.SW_S * pm.SW_C  # elements of x
SW_SCORES = pm.SW_B * pm.SW_NW * pm.SW_H * pm.SW_T * pm.SW_T
SW_QKV = 2 * SW_ROWS * pm.SW_C * 3 * pm.SW_C
SW_PROJ = 2 * SW_ROWS * pm.SW_C * pm.SW_C
SW_ATTN = 4 * SW_SCORES * pm.SW_D  # Q K^T and P V
SW_BIAS_MASK = pm.SW_NW * pm.SW_H * pm.SW_T * pm.SW_T  # the bias (H, T, T) + the shift mask (NW, T, T)


def test_swin_block_by_hand():
    """qkv and the projection; the bias plus the shift mask per window and head; SDPA 4 B*NW H T T D; the residual:
    397312. The rolls move x both ways (read and write it each); the bias lookup reads its T*T int64 indices and at
    most the table (49 x 2: fewer than the 256 rows it returns); SDPA reads q, k, v and the (B*NW, H, T, T) mask."""
    p, counts, _ = profiled("swin", False)
    assert by_op(counts)["aten::addmm"] == SW_QKV + SW_PROJ
    assert by_op(counts)["aten::_scaled_dot_product_flash_attention_for_cpu"] == SW_ATTN == 131072
    assert p.flops == SW_QKV + SW_PROJ + SW_BIAS_MASK + SW_ATTN + SW_X == 397312
    roll = one_row(counts, "aten::roll")
    assert (roll.calls, roll.flops, roll.bytes_read, roll.bytes_written) == (2, 0, 2 * SW_X * F32, 2 * SW_X * F32)
    table = (2 * pm.SW_W - 1) ** 2 * pm.SW_H
    lookup = one_row(counts, "aten::index")
    assert lookup.bytes_read == pm.SW_T * pm.SW_T * I64 + min(table, pm.SW_T * pm.SW_T * pm.SW_H) * F32
    assert lookup.bytes_written == pm.SW_T * pm.SW_T * pm.SW_H * F32
    attn = one_row(counts, "aten::_scaled_dot_product_flash_attention_for_cpu")
    qkv_bytes = 3 * SW_ROWS * pm.SW_C * F32
    assert attn.bytes_read == qkv_bytes + SW_SCORES * F32


def test_swin_block_trained_runs_attention_unfused_and_scatters_into_the_table():
    """Trained (a float mask and gradients: SDPA's math path): the two score matmuls forward and four backward, six
    products of B*NW*H T x T x D; softmax and its backward over the scores; the table's gradient an accumulating
    index_put, an add per looked-up element (T*T*H), not per element of the table."""
    _, counts, _ = profiled("swin", True)
    assert by_op(counts)["aten::bmm"] == 3 * SW_ATTN
    assert by_op(counts)["aten::_safe_softmax"] == SOFTMAX * SW_SCORES
    assert by_op(counts)["aten::_softmax_backward_data"] == SOFTMAX_BWD * SW_SCORES
    scatter = one_row(counts, "aten::index_put")
    assert scatter.flops == pm.SW_T * pm.SW_T * pm.SW_H
    assert by_op(counts)["aten::roll"] == 0 and one_row(counts, "aten::roll").calls == 3  # the backward's inverse roll


# --- ConvNeXt-V2 ---------------------------------------------------------------------------------------------------
CN_PIX = pm.CN_S * pm.CN_S
CN_X = pm.CN_B * pm.CN_C * CN_PIX
CN_H = CN_X * pm.CN_E  # elements of the expanded activations
CN_DW = conv(pm.CN_B, pm.CN_C, pm.CN_C, CN_PIX, pm.CN_K * pm.CN_K, groups=pm.CN_C)
CN_LINEAR = 2 * pm.CN_B * CN_PIX * pm.CN_C * pm.CN_E * pm.CN_C  # each of up and down
CN_WIDE = pm.CN_B * pm.CN_E * pm.CN_C  # elements of the GRN's (B, 1, 1, 4C) statistics


def test_convnext_v2_by_hand():
    """Depthwise 7x7 with its bias (C times less than a dense one); LayerNorm 8 an element; up and down; GELU; the GRN:
    its L2 norm over the spatial dims (2 an element), the channel mean, +eps, the divide, x * n, gamma *, + beta,
    + x; the block's residual: 152194."""
    p, counts, _ = profiled("convnext", False)
    assert one_row(counts, "aten::convolution").flops == CN_DW == 57024
    assert by_op(counts)["aten::linalg_vector_norm"] == NORM * CN_H
    grn = NORM * CN_H + CN_WIDE + pm.CN_B + CN_WIDE + 4 * CN_H
    assert p.flops == CN_DW + LAYERNORM * CN_X + 2 * CN_LINEAR + CN_H + grn + CN_X == 152194
    dw = one_row(counts, "aten::convolution")
    assert dw.bytes_read == (CN_X + pm.CN_C * pm.CN_K * pm.CN_K + pm.CN_C) * F32 and dw.bytes_written == CN_X * F32


def test_convnext_v2_trained_depthwise_weight_gradient_only():
    """Trained: the image needs no gradient, so the depthwise convolution's backward forms the weight gradient (its
    groups kept) and the bias's, not the input's; each linear its input and weight gradients."""
    _, counts, _ = profiled("convnext", True)
    back = one_row(counts, "aten::convolution_backward")
    assert back.flops == CN_DW  # 2 N numel(w) positions for dw, one add per dy element for db
    assert back.bytes_written == (pm.CN_C * pm.CN_K * pm.CN_K + pm.CN_C) * F32
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 2 * CN_LINEAR + 2 * 2 * CN_LINEAR


# --- mixture of experts --------------------------------------------------------------------------------------------
MO_ROUTED = pm.MO_N * pm.MO_K  # token-expert pairs, whatever the router picks
MO_EXPERT = 2 * 2 * MO_ROUTED * pm.MO_C * pm.MO_F  # both expert matmuls over every routed token


def _expert_loads() -> list[int]:
    model, (x,) = pm.moe()
    expert = model.router(x).softmax(-1).topk(pm.MO_K, dim=-1).indices
    return [int((expert == e).sum()) for e in range(pm.MO_E)]


def test_moe_by_hand():
    """Router 2 N C E; softmax; top-k a compare per gate; the renormalising sum and divide; a compare per choice per
    expert; the experts' matmuls over the N*K routed tokens (however they fall); ReLU; the weighting and index_add_
    one each per routed element: 14256. index_add_ touches only the rows it adds into: each expert's index, its
    source and those destination rows read, those rows written."""
    p, counts, _ = profiled("moe", False)
    loads = _expert_loads()
    assert sum(loads) == MO_ROUTED and len(set(loads)) > 1  # uneven experts: the per-expert rows differ in shape
    router = 2 * pm.MO_N * pm.MO_C * pm.MO_E + SOFTMAX * pm.MO_N * pm.MO_E + pm.MO_N * pm.MO_E
    dispatch = 2 * MO_ROUTED + pm.MO_E * MO_ROUTED
    experts = MO_EXPERT + MO_ROUTED * pm.MO_F + 2 * MO_ROUTED * pm.MO_C
    assert p.flops == router + dispatch + experts == 14256
    adds = rows_of(counts, "aten::index_add_")
    assert sum(c.calls for c in adds) == pm.MO_E
    assert sum(c.flops for c in adds) == MO_ROUTED * pm.MO_C
    assert sum(c.bytes_read for c in adds) == MO_ROUTED * I64 + 2 * MO_ROUTED * pm.MO_C * F32
    assert sum(c.bytes_written for c in adds) == MO_ROUTED * pm.MO_C * F32
    assert by_op(counts)["aten::index_select"] == 0 and by_op(counts)["aten::nonzero"] == 0


def test_moe_trained_expert_gradients_by_hand():
    """Trained: the tokens need no gradient, so each expert's first matmul forms its weight gradient alone and the
    second both; the router its weight gradient; the gate weights' gradient, picked by [token, slot], an
    accumulating index_put of one add per routed token."""
    _, counts, _ = profiled("moe", True)
    forward = MO_EXPERT + 2 * pm.MO_N * pm.MO_C * pm.MO_E
    w1_grad, w2_both = MO_EXPERT // 2, 2 * (MO_EXPERT // 2)
    router_weight_grad = 2 * pm.MO_N * pm.MO_C * pm.MO_E
    assert by_op(counts)["aten::mm"] == forward + w1_grad + w2_both + router_weight_grad
    assert sum(c.flops for c in rows_of(counts, "aten::index_put")) == MO_ROUTED


# --- graph layer ---------------------------------------------------------------------------------------------------
GR_MSG = pm.GR_E * pm.GR_C  # message elements
GR_NODE = pm.GR_N * pm.GR_C


def test_graph_scatter_reduce_by_hand():
    """Messages 2 E 2C C; SiLU; scatter_reduce mean an add per message element and a divide per node element, amax a
    compare per message element; the update 2 N 3C C; the residual: 4836. The gathers are lookups (0 FLOPs) reading
    at most the node table and their indices."""
    p, counts, _ = profiled("graph", False)
    scatter = one_row(counts, "aten::scatter_reduce")
    assert (scatter.calls, scatter.flops) == (2, (GR_MSG + GR_NODE) + GR_MSG)
    msg, upd = 2 * pm.GR_E * 2 * pm.GR_C * pm.GR_C, 2 * pm.GR_N * 3 * pm.GR_C * pm.GR_C
    assert p.flops == msg + GR_MSG + 2 * GR_MSG + GR_NODE + upd + GR_NODE == 4836
    gather = one_row(counts, "aten::index_select")
    assert gather.flops == 0 and gather.bytes_read == 2 * (GR_NODE * F32 + pm.GR_E * I64)
    assert gather.bytes_written == 2 * GR_MSG * F32
    # each scatter reads the zeros it starts from, the expanded index as held (E int64) and the messages
    assert scatter.bytes_read == 2 * (GR_NODE * F32 + pm.GR_E * I64 + GR_MSG * F32)


def test_graph_trained_counts_the_scatter_backwards():
    """Trained: the mean's backward gathers the node gradient back to the messages and divides by the counts it
    scatter_adds; amax's backward finds the winners by compares and splits ties by a scatter_add of their counts;
    no backward op is left uncounted and the messages' weight gradient is 2 E 2C C."""
    p, counts, _ = profiled("graph", True)
    assert p.unsupported == ()
    assert flops_of(counts, "aten::scatter_add") > 0 and by_op(counts)["aten::gather"] == 0
    weight_grads = [c for (op, sh), c in counts.items() if op == "aten::mm" and sh == ((pm.GR_C, pm.GR_E),
                                                                                       (pm.GR_E, 2 * pm.GR_C))]
    assert len(weight_grads) == 1 and weight_grads[0].flops == 2 * pm.GR_E * 2 * pm.GR_C * pm.GR_C


# --- DLRM interaction ----------------------------------------------------------------------------------------------
def test_dlrm_interaction_by_hand():
    """Bottom MLP 2 B DENSE D and its ReLU; each bag sums BAG rows of D (an add per looked-up element); the pairwise
    dots 2 B F F D by bmm; the top MLP over D + F(F-1)/2 features: 1680. The triangle's advanced index reads the
    B*P dots it returns and its two int64 index vectors."""
    p, counts, _ = profiled("dlrm", False)
    bags = pm.DL_T * pm.DL_B * pm.DL_BAG * pm.DL_D
    bmm = 2 * pm.DL_B * pm.DL_F * pm.DL_F * pm.DL_D
    top = 2 * pm.DL_B * (pm.DL_D + pm.DL_PAIRS)
    assert one_row(counts, "aten::_embedding_bag").flops == bags
    assert one_row(counts, "aten::bmm").flops == bmm
    assert p.flops == 2 * pm.DL_B * pm.DL_DENSE * pm.DL_D + pm.DL_B * pm.DL_D + bags + bmm + top == 1680
    tri = one_row(counts, "aten::index")
    assert tri.bytes_read == pm.DL_B * pm.DL_PAIRS * F32 + 2 * pm.DL_PAIRS * I64
    assert tri.bytes_written == pm.DL_B * pm.DL_PAIRS * F32
    assert one_row(counts, "aten::triu_indices").flops == 0


def test_dlrm_trained_interaction_backward():
    """Trained: the triangle's gradient an accumulating index_put (an add per pair and sample); bmm's backward two
    products of the forward's size (f feeds both operands); each bag's backward an add per looked-up element."""
    _, counts, _ = profiled("dlrm", True)
    bmm = 2 * pm.DL_B * pm.DL_F * pm.DL_F * pm.DL_D
    assert by_op(counts)["aten::bmm"] == 3 * bmm
    assert one_row(counts, "aten::index_put").flops == pm.DL_B * pm.DL_PAIRS
    assert by_op(counts)["aten::_embedding_bag_backward"] == pm.DL_T * pm.DL_B * pm.DL_BAG * pm.DL_D


# --- nn.MultiheadAttention with a key padding mask -----------------------------------------------------------------
MH_ROWS = pm.MH_B * pm.MH_N
MH_SCORES = pm.MH_B * pm.MH_H * pm.MH_N * pm.MH_N
MH_D = pm.MH_E // pm.MH_H


def test_padded_mha_by_hand():
    """The packed in-projection 2 R E 3E and its bias add; q scaled; the masked scores by baddbmm 2 B H N N D (the
    padding mask merged into its (B*H, 1, N) input); softmax; P V; the out-projection; the heads' mean of the weights;
    the two sums and their add: 7771. The padding mask's conversion to a float mask computes nothing."""
    p, counts, _ = profiled("mha", False)
    scores = 2 * MH_SCORES * MH_D
    assert one_row(counts, "aten::baddbmm").flops == scores
    assert one_row(counts, "aten::mean").flops == MH_SCORES
    in_proj, out_proj = 2 * MH_ROWS * pm.MH_E * 3 * pm.MH_E, 2 * MH_ROWS * pm.MH_E * pm.MH_E
    total = (in_proj + MH_ROWS * 3 * pm.MH_E + MH_ROWS * pm.MH_E + scores + SOFTMAX * MH_SCORES + scores + out_proj
             + MH_SCORES + MH_ROWS * pm.MH_E + pm.MH_B * pm.MH_N * pm.MH_N + 1)
    assert p.flops == total == 7771
    fill = one_row(counts, "aten::masked_fill_")
    assert fill.flops == 0
    masked = one_row(counts, "aten::baddbmm")
    q = k = pm.MH_B * pm.MH_H * pm.MH_N * MH_D
    assert masked.bytes_read == (pm.MH_B * pm.MH_H * pm.MH_N + q + k) * F32


def test_padded_mha_trained_weights_mean_backward():
    """Trained: the averaged weights' gradient is a divide per score (the mean's backward); softmax's backward over
    the scores; the in-projection's weight gradient 2 E R 3E (the inputs need none)."""
    _, counts, _ = profiled("mha", True)
    assert one_row(counts, "aten::div").flops == MH_SCORES
    assert one_row(counts, "aten::_softmax_backward_data").flops == SOFTMAX_BWD * MH_SCORES
    in_w = [c for (op, sh), c in counts.items() if op == "aten::mm" and sh == ((3 * pm.MH_E, MH_ROWS),
                                                                               (MH_ROWS, pm.MH_E))]
    assert len(in_w) == 1 and in_w[0].flops == 2 * MH_ROWS * pm.MH_E * 3 * pm.MH_E


# --- (2+1)D video block --------------------------------------------------------------------------------------------
VD_POS = pm.VD_T * pm.VD_S * pm.VD_S
VD_SPATIAL = conv(pm.VD_B, pm.VD_CI, pm.VD_CO, VD_POS, 9, bias=False)
VD_TEMPORAL = conv(pm.VD_B, pm.VD_CO, pm.VD_CO, VD_POS, 3)
VD_Y = pm.VD_B * pm.VD_CO * VD_POS


def test_video_block_by_hand():
    """The 1x3x3 convolution (no bias) over every frame; batch norm with batch statistics and the tracked batch
    count's add; ReLU; the 3x1x1 temporal convolution with its bias: 50689."""
    p, counts, _ = profiled("video", False)
    assert by_op(counts)["aten::convolution"] == VD_SPATIAL + VD_TEMPORAL
    assert p.flops == VD_SPATIAL + BATCHNORM * VD_Y + 1 + VD_Y + VD_TEMPORAL == 50689
    spatial = one_row(counts, "aten::convolution", ((pm.VD_B, pm.VD_CI, pm.VD_T, pm.VD_S, pm.VD_S),
                                                    (pm.VD_CO, pm.VD_CI, 1, 3, 3)))
    assert spatial.bytes_read == (pm.VD_B * pm.VD_CI * VD_POS + pm.VD_CO * pm.VD_CI * 9) * F32
    assert spatial.bytes_written == VD_Y * F32


def test_video_block_trained_no_clip_gradient():
    """Trained: the spatial convolution forms its weight gradient only (the clip needs none); the temporal one both
    and its bias's; batch norm's backward its input, weight and bias gradients."""
    _, counts, _ = profiled("video", True)
    backs = {sh[1][1]: c for (op, sh), c in counts.items() if op == "aten::convolution_backward"}
    assert backs[pm.VD_CI].flops == VD_SPATIAL
    assert backs[pm.VD_CO].flops == 2 * (VD_TEMPORAL - VD_Y) + VD_Y
    per_element = (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT
                   + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT)
    assert one_row(counts, "aten::native_batch_norm_backward").flops == per_element * VD_Y
