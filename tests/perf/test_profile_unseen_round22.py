"""Twenty-second held-out round for the model profiler: six models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: a RetNet retention block (a decay mask built from arange and exp, (q k^T * D) v, a group norm per head, a
SiLU gate); a Conformer convolution module in training mode (LayerNorm, a pointwise conv into a GLU, a causal
depthwise conv, a training BatchNorm, SiLU, a pointwise conv, the residual); a DETR decoder layer (learned object
queries expanded over the batch, self-attention and cross-attention over the memory through nn.MultiheadAttention,
an FFN, three LayerNorms); an expert-choice mixture of experts (each expert picks its tokens by topk over the
router's probabilities, torch.gather, two batched expert matmuls, index_add back); Transformer-XL attention with
relative positions (a memory concatenated, a sinusoidal position table, the content and position scores by einsum,
the relative shift by pad and view, a causal mask over memory and segment); a WaveNet stack (causal dilated convs by
left padding, tanh * sigmoid gates, residual and skip 1x1 convs, a log-softmax head). Op-level checks of this
round's fixes and of rarely used functional ops are in test_profile_unseen_round22_more.py.

What this round found in these models (each pinned by the test whose docstring says so): a training BatchNorm's
running mean and variance, updated in place, were charged no writes; its backward was charged reading the running
statistics, which it does not use in training; a pad's backward (a crop, constant_pad_nd with negative pads) was
charged reading the whole padded gradient, not the elements it keeps (counting_bytes).

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; attention 4*B*H*Nq*Nkv*D; element-wise ops one per output
element; a reduction one per element folded in; norms, softmax by their ``formulas`` constants. Bytes are the
distinct tensors an op reads and writes (fp32: 4 bytes, int64: 8).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, check_every_row, one_row, setup_round  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of, seeded  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
LN, SOFTMAX = formulas.LAYERNORM_FLOPS_PER_ELEMENT, formulas.SOFTMAX_FLOPS_PER_ELEMENT
BN_TRAIN = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


# --- the models ----------------------------------------------------------------------------------------------------
# RetNet retention: batch, length, width, heads
RT_B, RT_L, RT_D, RT_H = 2, 6, 8, 2
RT_DH = RT_D // RT_H


class Retention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(RT_D, 3 * RT_D, bias=False)
        self.gate = nn.Linear(RT_D, RT_D, bias=False)
        self.out = nn.Linear(RT_D, RT_D, bias=False)
        gamma = 1 - 2.0 ** (-5 - torch.arange(RT_H, dtype=torch.float32))  # a decay per head
        self.register_buffer("log_gamma", gamma.log())

    def forward(self, x):  # (B, L, D)
        q, k, v = self.qkv(x).view(RT_B, RT_L, 3, RT_H, RT_DH).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
        n = torch.arange(RT_L)
        gap = n[:, None] - n[None, :]  # (L, L) int64
        decay = torch.exp(gap * self.log_gamma[:, None, None]).masked_fill(gap < 0, 0.0)  # (H, L, L)
        y = (q @ k.transpose(-1, -2) * decay) @ v  # (B, H, L, Dh)
        y = F.group_norm(y.transpose(1, 2).reshape(RT_B * RT_L, RT_D), RT_H)  # a norm per head
        return self.out(F.silu(self.gate(x)) * y.view(RT_B, RT_L, RT_D))


@seeded
def retnet():
    return Retention(), (torch.randn(RT_B, RT_L, RT_D),)


# Conformer convolution module: batch, frames, channels, depthwise kernel
CV_B, CV_T, CV_C, CV_K = 2, 8, 4, 3


class ConvModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(CV_C)
        self.pw1 = nn.Conv1d(CV_C, 2 * CV_C, 1)
        self.dw = nn.Conv1d(CV_C, CV_C, CV_K, groups=CV_C)
        self.bn = nn.BatchNorm1d(CV_C)
        self.pw2 = nn.Conv1d(CV_C, CV_C, 1)

    def forward(self, x):  # (B, T, C)
        h = self.ln(x).transpose(1, 2)  # (B, C, T)
        h = F.glu(self.pw1(h), dim=1)  # (B, C, T)
        h = F.silu(self.bn(self.dw(F.pad(h, (CV_K - 1, 0)))))  # causal depthwise conv
        return x + self.pw2(h).transpose(1, 2)


@seeded
def conformer_conv():
    return ConvModule(), (torch.randn(CV_B, CV_T, CV_C),)


# DETR decoder layer: batch, queries, memory tokens, width, heads, FFN width
DT_B, DT_Q, DT_S, DT_D, DT_H, DT_F = 2, 3, 5, 8, 2, 16


class DetrDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(DT_Q, DT_D))  # learned object queries
        self.self_attn = nn.MultiheadAttention(DT_D, DT_H, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(DT_D, DT_H, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(DT_D, DT_F), nn.ReLU(), nn.Linear(DT_F, DT_D))
        self.norms = nn.ModuleList(nn.LayerNorm(DT_D) for _ in range(3))

    def forward(self, memory, pos):  # (B, S, D), (B, S, D)
        tgt = torch.zeros(DT_B, DT_Q, DT_D)
        qpos = self.query.expand(DT_B, DT_Q, DT_D)
        q = tgt + qpos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        cross = self.cross_attn(tgt + qpos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norms[1](tgt + cross)
        return self.norms[2](tgt + self.ffn(tgt))


@seeded
def detr():
    return DetrDecoderLayer(), (torch.randn(DT_B, DT_S, DT_D), torch.randn(DT_B, DT_S, DT_D))


# Expert-choice MoE: tokens, width, experts, tokens per expert (capacity), expert hidden width
MO_N, MO_D, MO_E, MO_C, MO_F = 8, 4, 2, 4, 6


class ExpertChoiceMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(MO_D, MO_E, bias=False)
        self.w1 = nn.Parameter(torch.randn(MO_E, MO_D, MO_F) * 0.5)
        self.w2 = nn.Parameter(torch.randn(MO_E, MO_F, MO_D) * 0.5)

    def forward(self, x):  # (N, D)
        probs = self.router(x).softmax(-1)  # (N, E)
        g, idx = probs.t().topk(MO_C, dim=-1)  # (E, C): each expert picks its C tokens
        xe = torch.gather(x, 0, idx.reshape(-1, 1).expand(-1, MO_D)).view(MO_E, MO_C, MO_D)
        ye = torch.bmm(F.gelu(torch.bmm(xe, self.w1)), self.w2) * g[..., None]  # (E, C, D)
        return torch.zeros_like(x).index_add(0, idx.reshape(-1), ye.reshape(-1, MO_D))


@seeded
def moe():
    return ExpertChoiceMoE(), (torch.randn(MO_N, MO_D),)


# Transformer-XL attention with relative positions: batch, segment, memory, width, heads
XL_B, XL_L, XL_M, XL_D, XL_H = 2, 4, 2, 8, 2
XL_K, XL_DH = XL_L + XL_M, XL_D // XL_H


class RelPartialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(XL_D, XL_D, bias=False)
        self.kv = nn.Linear(XL_D, 2 * XL_D, bias=False)
        self.r = nn.Linear(XL_D, XL_D, bias=False)
        self.o = nn.Linear(XL_D, XL_D, bias=False)
        self.r_w_bias = nn.Parameter(torch.randn(XL_H, XL_DH))
        self.r_r_bias = nn.Parameter(torch.randn(XL_H, XL_DH))
        self.register_buffer("inv_freq", 1 / 10000 ** (torch.arange(0, XL_D, 2.0) / XL_D))

    def forward(self, x, mem):  # (B, L, D), (B, M, D)
        cat = torch.cat([mem, x], 1)  # (B, K, D)
        q = self.q(x).view(XL_B, XL_L, XL_H, XL_DH)
        k, v = self.kv(cat).view(XL_B, XL_K, 2, XL_H, XL_DH).unbind(2)
        angles = torch.outer(torch.arange(XL_K - 1, -1, -1.0), self.inv_freq)  # (K, D/2)
        r = self.r(torch.cat([angles.sin(), angles.cos()], -1)).view(XL_K, XL_H, XL_DH)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)  # (B, H, L, K)
        bd = torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r)
        bd = F.pad(bd, (1, 0)).view(XL_B, XL_H, XL_K + 1, XL_L)[:, :, 1:].reshape(XL_B, XL_H, XL_L, XL_K)  # shift
        future = torch.ones(XL_L, XL_K, dtype=torch.bool).triu(1 + XL_M)
        attn = ((ac + bd) * XL_DH ** -0.5).masked_fill(future, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(XL_B, XL_L, XL_D)
        return self.o(y)


@seeded
def transformer_xl():
    return RelPartialAttention(), (torch.randn(XL_B, XL_L, XL_D), torch.randn(XL_B, XL_M, XL_D))


# WaveNet: batch, residual channels, skip channels, classes, samples, dilations
WN_B, WN_C, WN_S, WN_Q, WN_T = 2, 4, 6, 5, 10
WN_DIL = (1, 2, 4)


class WaveNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(1, WN_C, 1)
        self.filters = nn.ModuleList(nn.Conv1d(WN_C, 2 * WN_C, 2, dilation=d) for d in WN_DIL)
        self.res = nn.ModuleList(nn.Conv1d(WN_C, WN_C, 1) for _ in WN_DIL)
        self.skip = nn.ModuleList(nn.Conv1d(WN_C, WN_S, 1) for _ in WN_DIL)
        self.head = nn.Conv1d(WN_S, WN_Q, 1)

    def forward(self, audio):  # (B, 1, T)
        x, skip = self.inp(audio), None
        for d, filt, res, sk in zip(WN_DIL, self.filters, self.res, self.skip, strict=True):
            a, b = filt(F.pad(x, (d, 0))).chunk(2, dim=1)  # causal dilated conv, (B, C, T) each
            h = torch.tanh(a) * torch.sigmoid(b)
            x = x + res(h)
            skip = sk(h) if skip is None else skip + sk(h)
        return self.head(F.relu(skip)).log_softmax(1)  # (B, Q, T)


@seeded
def wavenet():
    return WaveNet(), (torch.randn(WN_B, 1, WN_T),)



MODELS = {"retnet": (retnet, True), "conformer_conv": (conformer_conv, True), "detr": (detr, True),
          "moe": (moe, True), "transformer_xl": (transformer_xl, True), "wavenet": (wavenet, True)}
CASES, IDS, profiled = setup_round(MODELS)
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::gather", "aten::index_select", "aten::scatter",
    "aten::new_zeros", "aten::zeros", "aten::ones", "aten::arange", "aten::masked_fill", "aten::constant_pad_nd",
    "aten::triu", "aten::slice_backward", "aten::fill_", "aten::zero_",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- RetNet retention ----------------------------------------------------------------------------------------------
RT_ROWS = RT_B * RT_L
RT_SCORES = RT_B * RT_H * RT_L * RT_L  # (B, H, L, L)
RT_QK = 2 * RT_B * RT_H * RT_L * RT_L * RT_DH  # one of the two batched products


def test_retnet_by_hand():
    """qkv 2*R*D*3D; the decay mask: the (L, L) gaps (a subtract each), times each head's log-decay (H*L*L), exp,
    the future's compare; q@k^T and its product with v 2*(B*H)*L*L*Dh each, the decay multiply per score; the group
    norm per head 6 an element (it has no affine: round 24); the gate 2*R*D*D, SiLU, the multiply, the output
    projection: 11112. The decay multiply reads the (H, L, L) mask once, not once per batch row; the group norm
    writes its output and the (R, H) means and inverse deviations."""
    p, counts, _ = profiled("retnet", False)
    qkv, square = 2 * RT_ROWS * RT_D * 3 * RT_D, 2 * RT_ROWS * RT_D * RT_D
    mask = RT_L * RT_L + 2 * RT_H * RT_L * RT_L + RT_L * RT_L
    assert by_op(counts)["aten::bmm"] == 2 * RT_QK == 2304
    gn_no_affine = LN - 2 * formulas.NORM_AFFINE_FLOPS_PER_ELEMENT  # F.group_norm(y, H): no weight, no bias
    assert by_op(counts)["aten::native_group_norm"] == gn_no_affine * RT_ROWS * RT_D
    assert p.flops == qkv + mask + 2 * RT_QK + RT_SCORES + gn_no_affine * RT_ROWS * RT_D + 2 * square \
        + 2 * RT_ROWS * RT_D == 11112
    decay = one_row(counts, "aten::mul", ((RT_B, RT_H, RT_L, RT_L), (RT_H, RT_L, RT_L)))
    assert (decay.bytes_read, decay.bytes_written) == ((RT_SCORES + RT_H * RT_L * RT_L) * F32, RT_SCORES * F32)
    gn = one_row(counts, "aten::native_group_norm")
    assert (gn.bytes_read, gn.bytes_written) == (RT_ROWS * RT_D * F32, (RT_ROWS * RT_D + 2 * RT_ROWS * RT_H) * F32)


def test_retnet_trained_products_and_weight_gradients():
    """Trained: each batched product's backward forms both operands' gradients (3x the forward's); qkv's and the
    gate's weight gradients but no input gradient (x needs none), the output projection's both: 16896 of matmuls; the
    group norm's backward counted."""
    _, counts, _ = profiled("retnet", True)
    assert by_op(counts)["aten::bmm"] == 3 * 2 * RT_QK == 6912
    qkv, square = 2 * RT_ROWS * RT_D * 3 * RT_D, 2 * RT_ROWS * RT_D * RT_D
    assert flops_of(counts, "aten::mm") == 2 * qkv + 2 * square + 3 * square == 16896
    assert by_op(counts)["aten::native_group_norm_backward"] > 0


# --- Conformer convolution module ----------------------------------------------------------------------------------
CV_E = CV_B * CV_C * CV_T  # elements of a (B, C, T) map


def _conformer_convs() -> dict[str, int]:
    return {"pw1": conv(CV_B, CV_C, 2 * CV_C, CV_T, 1), "dw": conv(CV_B, CV_C, CV_C, CV_T, CV_K, groups=CV_C),
            "pw2": conv(CV_B, CV_C, CV_C, CV_T, 1)}


def test_conformer_conv_module_by_hand():
    """LayerNorm 8 an element; the pointwise conv into 2C channels, the GLU one per output element, the causal
    depthwise conv (C_in times cheaper than dense), a training BatchNorm 8 an element and its num_batches_tracked
    += 1, SiLU, the second pointwise conv, the residual: 3393. The BatchNorm reads its input, weight, bias and
    running statistics and writes its output, the batch's mean and inverse deviation and the running mean and
    variance it updates in place (before round 22 those updates were charged no bytes: 288 written)."""
    p, counts, _ = profiled("conformer_conv", False)
    convs = _conformer_convs()
    assert by_op(counts)["aten::convolution"] == sum(convs.values()) == 2176
    assert by_op(counts)["aten::glu"] == CV_E and by_op(counts)["aten::native_batch_norm"] == BN_TRAIN * CV_E
    assert p.flops == LN * CV_E + sum(convs.values()) + CV_E + BN_TRAIN * CV_E + 1 + 2 * CV_E == 3393
    bn = one_row(counts, "aten::native_batch_norm")
    assert (bn.bytes_read, bn.bytes_written) == ((CV_E + 4 * CV_C) * F32, (CV_E + 4 * CV_C) * F32)
    dw = one_row(counts, "aten::convolution", ((CV_B, CV_C, CV_T + CV_K - 1), (CV_C, 1, CV_K), (CV_C,)))
    assert (dw.bytes_read, dw.bytes_written) == ((CV_B * CV_C * (CV_T + CV_K - 1) + CV_C * CV_K + CV_C) * F32,
                                                 CV_E * F32)


def test_conformer_conv_module_trained_norm_and_pad_backward():
    """Trained: each conv's backward its input and weight gradients (2x its bias-free forward) and a bias add per dy
    element; BatchNorm's backward 13 an element, reading dy, x, its weight and the batch's saved mean and inverse
    deviation, not the running statistics it does not use in training (before round 22: 592 bytes); the causal pad's
    backward is a crop: it reads the T of T + K - 1 gradient columns it keeps (before round 22: all of them)."""
    _, counts, _ = profiled("conformer_conv", True)
    convs = _conformer_convs()
    bias = {"pw1": CV_B * 2 * CV_C * CV_T, "dw": CV_E, "pw2": CV_E}
    assert by_op(counts)["aten::convolution_backward"] == sum(2 * (convs[k] - bias[k]) + bias[k] for k in convs) \
        == 4096
    bwd = one_row(counts, "aten::native_batch_norm_backward")
    assert bwd.flops == 13 * CV_E and bwd.bytes_read == (2 * CV_E + 3 * CV_C) * F32 == 560
    crop = one_row(counts, "aten::constant_pad_nd", ((CV_B, CV_C, CV_T + CV_K - 1),))
    assert crop.flops == 0 and (crop.bytes_read, crop.bytes_written) == (CV_E * F32, CV_E * F32)


# --- DETR decoder layer --------------------------------------------------------------------------------------------
DT_ROWS, DT_MEM = DT_B * DT_Q, DT_B * DT_S
DT_SELF, DT_CROSS = 4 * DT_B * DT_Q * DT_Q * DT_D, 4 * DT_B * DT_Q * DT_S * DT_D  # 4*B*H*Nq*Nkv*Dh, H*Dh = D


def test_detr_decoder_by_hand():
    """Self-attention's q, k, v projections over the queries (its value differs from its query: three products,
    each with its bias added), cross-attention's q over the queries and k, v over the memory; attention 4*B*H*Nq*Nkv*Dh
    (3 queries over 3, then over 5 memory tokens); two out-projections, the FFN, three LayerNorms, five adds over the
    queries and one over the memory: 13696. Cross-attention reads q, k and v and writes its output and (B, H, Nq)
    log-sum-exps."""
    p, counts, _ = profiled("detr", False)
    square = 2 * DT_ROWS * DT_D * DT_D
    in_proj = 4 * (square + DT_ROWS * DT_D) + 2 * (2 * DT_MEM * DT_D * DT_D + DT_MEM * DT_D)
    ffn = 2 * 2 * DT_ROWS * DT_D * DT_F + DT_ROWS * DT_F
    assert by_op(counts)[SDPA] == DT_SELF + DT_CROSS == 1536
    assert by_op(counts)["aten::native_layer_norm"] == 3 * LN * DT_ROWS * DT_D
    assert p.flops == in_proj + 2 * square + DT_SELF + DT_CROSS + ffn + 3 * LN * DT_ROWS * DT_D \
        + 5 * DT_ROWS * DT_D + DT_MEM * DT_D == 13696
    cross = one_row(counts, SDPA, ((DT_B, DT_H, DT_Q, DT_D // DT_H), (DT_B, DT_H, DT_S, DT_D // DT_H),
                                   (DT_B, DT_H, DT_S, DT_D // DT_H)))
    assert (cross.bytes_read, cross.bytes_written) == ((DT_ROWS + 2 * DT_MEM) * DT_D * F32,
                                                       (DT_ROWS * DT_D + DT_B * DT_H * DT_Q) * F32)


def test_detr_decoder_trained_attention_backward():
    """Trained: each attention's backward 2.5x its forward; the LayerNorms' backward counted."""
    _, counts, _ = profiled("detr", True)
    assert by_op(counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * (DT_SELF + DT_CROSS) == 3840
    assert len(rows_of(counts, "aten::native_layer_norm_backward")) == 1
    assert by_op(counts)["aten::native_layer_norm_backward"] > 0


# --- expert-choice MoE ---------------------------------------------------------------------------------------------
MO_PICKED = MO_E * MO_C  # tokens the experts took, together
MO_EXPERT = 2 * MO_PICKED * MO_D * MO_F  # one of the two batched expert products


def test_expert_choice_moe_by_hand():
    """The router 2*N*D*E, its softmax 5 an element; topk one compare per element of the (E, N) probabilities; the
    gather of the picked tokens moves, computing nothing; two expert products 2*E*C*D*F each, GELU between, the
    gate multiply and the index_add back one per element: 1104. topk writes the C values and int64 indices per
    expert; gather reads one element per index element and the index as held (expanded: one column); index_add reads
    its zeros, the index and the source."""
    p, counts, _ = profiled("moe", False)
    assert by_op(counts)["aten::bmm"] == 2 * MO_EXPERT == 768
    top = one_row(counts, "aten::topk")
    assert top.flops == MO_E * MO_N and (top.bytes_read, top.bytes_written) == (MO_E * MO_N * F32,
                                                                                MO_PICKED * (F32 + I64))
    gather = one_row(counts, "aten::gather")
    assert gather.flops == 0 and gather.bytes_read == MO_PICKED * MO_D * F32 + MO_PICKED * I64
    add = one_row(counts, "aten::index_add")
    assert add.flops == MO_PICKED * MO_D
    assert (add.bytes_read, add.bytes_written) == ((MO_N + MO_PICKED) * MO_D * F32 + MO_PICKED * I64, MO_N * MO_D * F32)
    assert p.flops == 2 * MO_N * MO_D * MO_E + SOFTMAX * MO_N * MO_E + MO_E * MO_N + 2 * MO_EXPERT \
        + MO_PICKED * MO_F + 2 * MO_PICKED * MO_D == 1104


def test_expert_choice_moe_trained_skips_the_tokens_gradient():
    """Trained: the second expert product's two gradients and the first's weight gradient, not its input's (the
    gathered tokens need none): 5 products of 2*E*C*D*F; the router's weight gradient; topk's backward scatters
    the gate's gradient into zeros (data movement)."""
    _, counts, _ = profiled("moe", True)
    assert by_op(counts)["aten::bmm"] == 5 * MO_EXPERT == 1920
    assert flops_of(counts, "aten::mm") == 2 * 2 * MO_N * MO_D * MO_E
    assert by_op(counts)["aten::scatter"] == 0


# --- Transformer-XL relative attention -----------------------------------------------------------------------------
XL_PRODUCT = 2 * XL_B * XL_H * XL_L * XL_K * XL_DH  # each of the three score / value products
XL_SCORES = XL_B * XL_H * XL_L * XL_K


def test_transformer_xl_by_hand():
    """q over the segment 2*B*L*D*D, k and v over memory and segment 2*B*K*D*2D, the position table (the outer
    product, sin, cos over (K, D/2)) and its projection 2*K*D*D; the two biases added to q; the content and position
    scores and the value product 2*B*H*L*K*Dh each (the position one a product over heads, B*L rows against the K
    positions); AC + BD, the scale, softmax 5 a score; the output projection: 9064. The position scores read the
    (K, H, Dh) projections once, not once per batch row; the shift pads a column of zeros: no FLOPs."""
    p, counts, _ = profiled("transformer_xl", False)
    q = o = 2 * XL_B * XL_L * XL_D * XL_D
    kv, r = 2 * XL_B * XL_K * XL_D * 2 * XL_D, 2 * XL_K * XL_D * XL_D
    table = 3 * XL_K * XL_D // 2
    assert by_op(counts)["aten::bmm"] == 3 * XL_PRODUCT == 2304
    assert p.flops == q + kv + table + r + 2 * XL_B * XL_L * XL_D + 3 * XL_PRODUCT + 2 * XL_SCORES \
        + SOFTMAX * XL_SCORES + o == 9064
    bd = one_row(counts, "aten::bmm", ((XL_H, XL_B * XL_L, XL_DH), (XL_H, XL_DH, XL_K)))
    assert bd.bytes_read == (XL_B * XL_L * XL_D + XL_K * XL_D) * F32
    shift = one_row(counts, "aten::constant_pad_nd")
    assert shift.flops == 0 and (shift.bytes_read, shift.bytes_written) == (XL_SCORES * F32,
                                                                            XL_SCORES * (XL_K + 1) // XL_K * F32)


def test_transformer_xl_trained_shift_backward_is_a_crop():
    """Trained: the three products' backwards form both operands' gradients (3x the forward's); the shift's pad's
    backward crops the zero column off, reading the B*H*L*K elements it keeps (before round 22: the padded
    gradient whole, B*H*L*(K+1))."""
    _, counts, _ = profiled("transformer_xl", True)
    assert by_op(counts)["aten::bmm"] == 3 * 3 * XL_PRODUCT == 6912
    crop = one_row(counts, "aten::constant_pad_nd", ((XL_B, XL_H, XL_L, XL_K + 1),))
    assert (crop.bytes_read, crop.bytes_written) == (XL_SCORES * F32, XL_SCORES * F32)


# --- WaveNet -------------------------------------------------------------------------------------------------------
WN_E = WN_B * WN_C * WN_T  # elements of a (B, C, T) map


def _wavenet_convs() -> dict[str, int]:
    return {"inp": conv(WN_B, 1, WN_C, WN_T, 1), "filter": conv(WN_B, WN_C, 2 * WN_C, WN_T, 2),
            "res": conv(WN_B, WN_C, WN_C, WN_T, 1), "skip": conv(WN_B, WN_C, WN_S, WN_T, 1),
            "head": conv(WN_B, WN_S, WN_Q, WN_T, 1)}


def test_wavenet_by_hand():
    """The input 1x1 conv; per layer the dilated filter conv (2 taps into 2C channels, its input padded on the left
    by the dilation), tanh, sigmoid and their product, the residual and skip 1x1 convs, the residual add; the skips
    summed (two adds), ReLU, the head and its log-softmax 5 an element: 16920. Each filter conv reads its padded input
    (T + d columns) and writes T; the gates read their half of the filter output alone."""
    p, counts, _ = profiled("wavenet", False)
    c = _wavenet_convs()
    layers = len(WN_DIL)
    convs = c["inp"] + layers * (c["filter"] + c["res"] + c["skip"]) + c["head"]
    assert by_op(counts)["aten::convolution"] == convs == 15100
    skips = WN_B * WN_S * WN_T
    assert p.flops == convs + layers * 4 * WN_E + (layers - 1) * skips + skips + SOFTMAX * WN_B * WN_Q * WN_T \
        == 16920
    for d in WN_DIL:
        f = one_row(counts, "aten::convolution", ((WN_B, WN_C, WN_T + d), (2 * WN_C, WN_C, 2), (2 * WN_C,)))
        assert (f.bytes_read, f.bytes_written) == ((WN_B * WN_C * (WN_T + d) + 2 * WN_C * WN_C * 2 + 2 * WN_C) * F32,
                                                   2 * WN_E * F32)
    tanh = one_row(counts, "aten::tanh")
    assert (tanh.bytes_read, tanh.bytes_written) == (layers * WN_E * F32, layers * WN_E * F32)


def test_wavenet_trained_convolution_backward():
    """Trained: every conv's backward its input and weight gradients and a bias add per dy element, but the input
    conv's (the audio needs no gradient: weight and bias alone) and the last layer's residual conv, whose output
    nothing after it uses (no backward at all); each causal pad's backward a crop reading the T columns it keeps."""
    _, counts, _ = profiled("wavenet", True)
    c = _wavenet_convs()
    bias = {"inp": WN_E, "filter": 2 * WN_E, "res": WN_E, "skip": WN_B * WN_S * WN_T, "head": WN_B * WN_Q * WN_T}
    both = {k: 2 * (c[k] - bias[k]) + bias[k] for k in c}
    layers = len(WN_DIL)
    want = c["inp"] + layers * (both["filter"] + both["skip"]) + (layers - 1) * both["res"] + both["head"]
    assert by_op(counts)["aten::convolution_backward"] == want == 27420
    for d in WN_DIL:
        crop = one_row(counts, "aten::constant_pad_nd", ((WN_B, WN_C, WN_T + d),))
        assert crop.bytes_read == WN_E * F32
