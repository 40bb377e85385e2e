"""Twenty-first held-out round for the model profiler: six models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: a Swin-style shifted-window attention (torch.roll, a window partition by view / permute / reshape, a
learned relative position bias, the reverse partition and the roll back); a Perceiver-style cross-attention of learned
latent queries over the inputs (SDPA with fewer queries than keys, the latents expanded over the batch); a
GraphSAGE-like layer over an edge list (index_select of the source nodes, scatter_reduce mean into the destinations,
a degree by index_add_); a MobileNetV3-like block (1x1 expand, BatchNorm, hardswish, depthwise 3x3, squeeze-excite
with hardsigmoid, 1x1 project, residual); a diffusion ResBlock (a sinusoidal time embedding, its SiLU MLP, GroupNorm,
a 3x3 conv); a language model's cross-entropy over a padded batch whose padding targets are ``ignore_index``.
Op-level checks of this round's fixes, interpolation, fold / unfold, sorts, fake quantization, a training step with
gradient clipping and an LR scheduler, an op with no formula and the bad arguments are in
test_profile_unseen_round21_more.py.

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; attention 4*B*H*Nq*Nkv*D; element-wise ops one per output
element; a reduction one per element folded in; norms, softmax by their ``formulas`` constants. Bytes are the
distinct tensors an op reads and writes (fp32: 4 bytes, int64: 8).
"""

import math
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
# Swin-style block: batch, side, width, heads, window side, shift
SW_B, SW_S, SW_D, SW_H, SW_W, SW_SHIFT = 2, 4, 8, 2, 2, 1
SW_NW = (SW_S // SW_W) ** 2  # windows per image
SW_T = SW_W * SW_W  # tokens per window


class SwinBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(SW_D, 3 * SW_D)
        self.proj = nn.Linear(SW_D, SW_D)
        self.rel_bias = nn.Parameter(torch.randn(SW_H, SW_T, SW_T))

    def forward(self, x):  # (B, S, S, D)
        x = torch.roll(x, (-SW_SHIFT, -SW_SHIFT), (1, 2))
        # window partition: (B, S/W, W, S/W, W, D) -> (B * NW, T, D)
        w = x.view(SW_B, SW_S // SW_W, SW_W, SW_S // SW_W, SW_W, SW_D).permute(0, 1, 3, 2, 4, 5)
        w = w.reshape(SW_B * SW_NW, SW_T, SW_D)
        q, k, v = self.qkv(w).reshape(SW_B * SW_NW, SW_T, 3, SW_H, SW_D // SW_H).permute(2, 0, 3, 1, 4)
        attn = (q * (SW_D // SW_H) ** -0.5) @ k.transpose(-2, -1) + self.rel_bias  # (B*NW, H, T, T)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(SW_B * SW_NW, SW_T, SW_D)
        y = self.proj(y).view(SW_B, SW_S // SW_W, SW_S // SW_W, SW_W, SW_W, SW_D).permute(0, 1, 3, 2, 4, 5)
        return torch.roll(y.reshape(SW_B, SW_S, SW_S, SW_D), (SW_SHIFT, SW_SHIFT), (1, 2))


@seeded
def swin():
    return SwinBlock(), (torch.randn(SW_B, SW_S, SW_S, SW_D),)


# Perceiver cross-attention: batch, inputs, input width, latents, width, heads
PC_B, PC_M, PC_C, PC_N, PC_D, PC_H = 2, 12, 6, 4, 8, 2


class PerceiverCross(nn.Module):
    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(PC_N, PC_D))
        self.q = nn.Linear(PC_D, PC_D, bias=False)
        self.kv = nn.Linear(PC_C, 2 * PC_D, bias=False)
        self.out = nn.Linear(PC_D, PC_D)

    def forward(self, x):  # (B, M, C)
        lat = self.latents.expand(PC_B, PC_N, PC_D)
        q = self.q(lat).view(PC_B, PC_N, PC_H, -1).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(x).view(PC_B, PC_M, 2, PC_H, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, Dh) each
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(PC_B, PC_N, PC_D)
        return lat + self.out(y)


@seeded
def perceiver():
    return PerceiverCross(), (torch.randn(PC_B, PC_M, PC_C),)


# GNN layer (GraphSAGE-like, mean aggregation): nodes, edges, in width, out width; the edge list
GN_V, GN_E, GN_C, GN_O = 5, 8, 4, 6
GN_SRC = [0, 1, 2, 3, 4, 0, 2, 4]
GN_DST = [1, 2, 3, 4, 0, 2, 0, 2]


class SageLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.msg = nn.Linear(GN_C, GN_O, bias=False)
        self.self_lin = nn.Linear(GN_C, GN_O)

    def forward(self, x, src, dst):  # (V, C), (E,), (E,)
        m = self.msg(x.index_select(0, src))  # (E, O)
        agg = x.new_zeros(GN_V, GN_O).scatter_reduce(0, dst[:, None].expand(GN_E, GN_O), m, "mean",
                                                     include_self=False)  # (V, O)
        deg = x.new_zeros(GN_V).index_add_(0, dst, x.new_ones(GN_E))  # (V,)
        return F.relu(self.self_lin(x) + agg) * (deg[:, None] > 0)


@seeded
def gnn():
    return SageLayer(), (torch.randn(GN_V, GN_C), torch.tensor(GN_SRC), torch.tensor(GN_DST))


# MobileNetV3-like block: batch, in channels, expanded, side, squeeze width
MN_B, MN_C, MN_E, MN_S, MN_Q = 2, 4, 8, 6, 2


class MobileBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(MN_C, MN_E, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(MN_E)
        self.dw = nn.Conv2d(MN_E, MN_E, 3, padding=1, groups=MN_E, bias=False)
        self.bn2 = nn.BatchNorm2d(MN_E)
        self.se_down = nn.Conv2d(MN_E, MN_Q, 1)
        self.se_up = nn.Conv2d(MN_Q, MN_E, 1)
        self.project = nn.Conv2d(MN_E, MN_C, 1, bias=False)

    def forward(self, x):  # (B, C, S, S)
        h = F.hardswish(self.bn1(self.expand(x)))
        h = F.hardswish(self.bn2(self.dw(h)))
        s = F.hardsigmoid(self.se_up(F.relu(self.se_down(F.adaptive_avg_pool2d(h, 1)))))  # (B, E, 1, 1)
        return x + self.project(h * s)


@seeded
def mobile():
    return MobileBlock(), (torch.randn(MN_B, MN_C, MN_S, MN_S),)


# Diffusion ResBlock with a time embedding: batch, channels, side, embedding width, groups
DF_B, DF_C, DF_S, DF_T, DF_G = 2, 4, 4, 8, 2
MAX_PERIOD = 10000.0


class TimeResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1 = nn.Linear(DF_T, 2 * DF_T)
        self.t2 = nn.Linear(2 * DF_T, DF_C)
        self.norm = nn.GroupNorm(DF_G, DF_C)
        self.conv = nn.Conv2d(DF_C, DF_C, 3, padding=1)

    def forward(self, x, t):  # (B, C, S, S), (B,)
        half = DF_T // 2
        freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)  # (T/2,)
        args = t[:, None] * freqs[None]  # (B, T/2)
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, T)
        emb = self.t2(F.silu(self.t1(emb)))  # (B, C)
        h = F.silu(self.norm(x)) + emb[:, :, None, None]
        return x + self.conv(h)


@seeded
def diffusion():
    return TimeResBlock(), (torch.randn(DF_B, DF_C, DF_S, DF_S), torch.tensor([3.0, 250.0]))


# Language-model loss over a padded batch: batch, length, vocabulary, width; the padding's targets ignored
LM_B, LM_L, LM_V, LM_D = 2, 5, 7, 4
IGNORE = -100
LM_TARGETS = [[1, 2, 3, IGNORE, IGNORE], [4, 5, IGNORE, IGNORE, IGNORE]]
LM_REAL = 5  # targets not ignored


class PaddedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(LM_V, LM_D)
        self.head = nn.Linear(LM_D, LM_V)

    def forward(self, tokens, targets):  # (B, L), (B, L)
        logits = self.head(self.emb(tokens))  # (B, L, V)
        return F.cross_entropy(logits.view(-1, LM_V), targets.view(-1), ignore_index=IGNORE)


@seeded
def padded_lm():
    return PaddedLM(), (torch.randint(0, LM_V, (LM_B, LM_L)), torch.tensor(LM_TARGETS))


MODELS = {"swin": (swin, True), "perceiver": (perceiver, True), "gnn": (gnn, True), "mobile": (mobile, True),
          "diffusion": (diffusion, True), "padded_lm": (padded_lm, True)}
# torch's FlopCounterMode cannot follow the latents expanded under no_grad (its module hooks ask for a grad_fn)
CASES, IDS, profiled = setup_round(MODELS, without_torch=("perceiver",))
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::roll", "aten::index_select", "aten::new_zeros",
    "aten::new_ones", "aten::zeros", "aten::scatter", "aten::gather", "aten::masked_fill_", "aten::arange",
    "aten::embedding", "aten::fill_", "aten::zero_",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- Swin ----------------------------------------------------------------------------------------------------------
SW_ROWS = SW_B * SW_S * SW_S  # tokens, all windows together
SW_SCORES = SW_B * SW_NW * SW_H * SW_T * SW_T  # score elements: (B*NW, H, T, T)
SW_QK = 2 * SW_B * SW_NW * SW_H * SW_T * SW_T * (SW_D // SW_H)  # one of the two batched products


def test_swin_by_hand():
    """qkv 2*R*D*3D (addmm: the bias add not counted), the q scale one per q element, q@k^T and attn@v
    2*(B*NW*H)*T*T*Dh each, the relative bias added per score, softmax 5 per score, proj 2*R*D*D: 22272. The two rolls
    move the whole (B, S, S, D) map each (R*D*4 read and written), computing nothing; the bias add reads the (H, T, T)
    bias once, not once per window."""
    p, counts, _ = profiled("swin", False)
    qkv, proj = 2 * SW_ROWS * SW_D * 3 * SW_D, 2 * SW_ROWS * SW_D * SW_D
    q_scale = SW_B * SW_NW * SW_H * SW_T * (SW_D // SW_H)
    assert by_op(counts)["aten::bmm"] == 2 * SW_QK == 4096
    assert by_op(counts)["aten::_softmax"] == SOFTMAX * SW_SCORES
    assert p.flops == qkv + q_scale + 2 * SW_QK + SW_SCORES + SOFTMAX * SW_SCORES + proj == 22272
    (roll,) = rows_of(counts, "aten::roll")  # both rolls: one shape, one row
    assert roll.flops == 0 and (roll.bytes_read, roll.bytes_written) == (2 * SW_ROWS * SW_D * F32,) * 2
    bias_add = one_row(counts, "aten::add")
    assert bias_add.bytes_read == (SW_SCORES + SW_H * SW_T * SW_T) * F32


def test_swin_trained_batched_products_three_times_forward():
    """Trained: each bmm's backward forms both operands' gradients (two bmms of its size): 3x the forward's 4096;
    qkv's and proj's weight gradients one matmul each, their input gradients too (the input needs none, but proj's
    input, the attention output, does; qkv's input is the rolled image: no gradient)."""
    _, counts, _ = profiled("swin", True)
    assert by_op(counts)["aten::bmm"] == 3 * 2 * SW_QK == 12288
    qkv, proj = 2 * SW_ROWS * SW_D * 3 * SW_D, 2 * SW_ROWS * SW_D * SW_D
    assert flops_of(counts, "aten::mm") == qkv + 2 * proj


# --- Perceiver -----------------------------------------------------------------------------------------------------
def test_perceiver_by_hand():
    """q from the latents over every batch row (2*B*N*D*D), k and v together (2*B*M*C*2D), cross-attention
    4*B*H*N*M*Dh with N latent queries over M inputs, out-projection 2*B*N*D*D, the residual add: 9792. The latents
    expanded over the batch are read as held (N*D floats) when the linear copies them out."""
    p, counts, _ = profiled("perceiver", False)
    sdpa = 4 * PC_B * PC_H * PC_N * PC_M * (PC_D // PC_H)
    assert by_op(counts)[SDPA] == sdpa == 3072
    q, kv, out = 2 * PC_B * PC_N * PC_D * PC_D, 2 * PC_B * PC_M * PC_C * 2 * PC_D, 2 * PC_B * PC_N * PC_D * PC_D
    assert p.flops == q + kv + sdpa + out + PC_B * PC_N * PC_D == 9792
    (copy,) = rows_of(counts, "aten::clone")
    assert (copy.bytes_read, copy.bytes_written) == (PC_N * PC_D * F32, PC_B * PC_N * PC_D * F32)


def test_perceiver_trained_attention_backward():
    """Trained: SDPA's backward 2.5x its forward; the k/v projection's weight gradient one matmul (x needs none)."""
    _, counts, _ = profiled("perceiver", True)
    sdpa = 4 * PC_B * PC_H * PC_N * PC_M * (PC_D // PC_H)
    assert by_op(counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * sdpa == 7680


# --- GNN -----------------------------------------------------------------------------------------------------------
def test_gnn_by_hand():
    """The message matmul over the E gathered source rows (2*E*C*O), scatter_reduce mean: an add per message element
    (E*O) and a divide per element of the (V, O) result (V*O); the degree index_add_ an add per edge; the self
    linear 2*V*C*O; add, ReLU, the degree compare and the mask multiply: 805. (Before round 21 the mean's divides
    were not counted: 775.) index_select reads at most the table (V*C floats, fewer than E rows of it) and the
    index; scatter_reduce reads its (V, O) start, the expanded index as held (E int64) and the messages."""
    p, counts, _ = profiled("gnn", False)
    sr = one_row(counts, "aten::scatter_reduce")
    assert sr.flops == GN_E * GN_O + GN_V * GN_O == 78
    assert (sr.bytes_read, sr.bytes_written) == ((GN_V * GN_O + GN_E * GN_O) * F32 + GN_E * I64, GN_V * GN_O * F32)
    deg = one_row(counts, "aten::index_add_")
    # in place: the index, the ones, and the E touched destination elements read (accumulated into) and written
    assert deg.flops == GN_E and (deg.bytes_read, deg.bytes_written) == (GN_E * I64 + 2 * GN_E * F32, GN_E * F32)
    sel = one_row(counts, "aten::index_select")
    assert sel.flops == 0 and sel.bytes_read == min(GN_E, GN_V) * GN_C * F32 + GN_E * I64
    pointwise = 3 * GN_V * GN_O + GN_V  # add, relu, mask multiply; the compare over (V, 1)
    assert p.flops == 2 * GN_E * GN_C * GN_O + 78 + GN_E + 2 * GN_V * GN_C * GN_O + pointwise == 805


def test_gnn_trained_weight_gradients():
    """Trained: the message weight's gradient 2*E*C*O and the self linear's 2*V*C*O (x needs no gradient: no input
    gradient matmuls), besides the forward's two matmuls."""
    _, counts, _ = profiled("gnn", True)
    assert flops_of(counts, MATMULS) == 2 * (2 * GN_E * GN_C * GN_O + 2 * GN_V * GN_C * GN_O) == 1248


# --- MobileNet block -----------------------------------------------------------------------------------------------
MN_P = MN_S * MN_S  # positions


def _mobile_convs() -> dict[str, int]:
    return {
        "expand": conv(MN_B, MN_C, MN_E, MN_P, 1, bias=False),
        "dw": conv(MN_B, MN_E, MN_E, MN_P, 9, groups=MN_E, bias=False),
        "se_down": conv(MN_B, MN_E, MN_Q, 1, 1), "se_up": conv(MN_B, MN_Q, MN_E, 1, 1),
        "project": conv(MN_B, MN_E, MN_C, MN_P, 1, bias=False),
    }


def test_mobile_block_by_hand():
    """Five convolutions (the depthwise one C_in times cheaper than a dense one), two training BatchNorms 8 an
    element (and their num_batches_tracked += 1), two hardswish and the SE's ReLU and hardsigmoid one an element, the
    pool's mean, the excite multiply, the residual add: 31562. The depthwise conv reads its input and a (E, 1, 3, 3)
    weight, and is memory-bound (2*9 FLOPs per 4+4 bytes of its input and output, under the ridge of 10)."""
    p, counts, _ = profiled("mobile", False)
    convs = _mobile_convs()
    assert by_op(counts)["aten::convolution"] == sum(convs.values()) == 19732
    wide = MN_B * MN_E * MN_P
    assert by_op(counts)["aten::native_batch_norm"] == 2 * BN_TRAIN * wide
    assert by_op(counts)["aten::hardswish"] == 2 * wide
    assert p.flops == sum(convs.values()) + 2 * BN_TRAIN * wide + 2 + 2 * wide + wide + MN_B * MN_Q + MN_B * MN_E \
        + wide + MN_B * MN_C * MN_P == 31562
    dw = one_row(counts, "aten::convolution", ((MN_B, MN_E, MN_S, MN_S), (MN_E, 1, 3, 3)))
    assert (dw.bytes_read, dw.bytes_written) == ((wide + MN_E * 9) * F32, wide * F32)
    (row,) = [o for o in p.ops if o.op == "aten::convolution" and "8x1x3x3" in o.label]
    assert row.bound == "memory" and row.m.intensity == pytest.approx(dw.flops / (dw.bytes_read + dw.bytes_written))


def test_mobile_block_trained_convolution_backward():
    """Trained: every conv's backward forms input and weight gradients (2x its bias-free forward), the SE convs a
    bias add per dy element too, but the expand conv, whose input (the image) needs no gradient: its weight
    gradient alone; hardswish's and hardsigmoid's backward one an element."""
    _, counts, _ = profiled("mobile", True)
    convs = _mobile_convs()
    bias = {"se_down": MN_B * MN_Q, "se_up": MN_B * MN_E}
    want = sum((1 if k == "expand" else 2) * (convs[k] - bias.get(k, 0)) + bias.get(k, 0) for k in convs)
    assert by_op(counts)["aten::convolution_backward"] == want == 34836
    assert by_op(counts)["aten::hardswish_backward"] == 2 * MN_B * MN_E * MN_P
    assert by_op(counts)["aten::hardsigmoid_backward"] == MN_B * MN_E


# --- diffusion ResBlock --------------------------------------------------------------------------------------------
DF_P = DF_S * DF_S


def test_diffusion_block_by_hand():
    """The frequencies (multiply, divide, exp over T/2), the outer product t x freqs, sin and cos one an element;
    the MLP 2*B*T*2T and 2*B*2T*C with a SiLU between; GroupNorm 8 an element, SiLU, the embedding broadcast-added,
    the 3x3 conv with its bias, the residual: 11588. The broadcast add reads the (B, C) embedding once."""
    p, counts, _ = profiled("diffusion", False)
    half, feat = DF_T // 2, DF_B * DF_C * DF_P
    emb = 3 * half + DF_B * half + 2 * DF_B * half
    mlp = 2 * DF_B * DF_T * 2 * DF_T + DF_B * 2 * DF_T + 2 * DF_B * 2 * DF_T * DF_C
    conv3 = conv(DF_B, DF_C, DF_C, DF_P, 9)
    assert by_op(counts)["aten::native_group_norm"] == LN * feat
    assert by_op(counts)["aten::convolution"] == conv3 == 9344
    assert p.flops == emb + mlp + LN * feat + feat + feat + conv3 + feat == 11588
    add = one_row(counts, "aten::add", ((DF_B, DF_C, DF_S, DF_S), (DF_B, DF_C, 1, 1)))
    assert (add.bytes_read, add.bytes_written) == ((feat + DF_B * DF_C) * F32, feat * F32)


def test_diffusion_block_trained_group_norm_and_conv_backward():
    """Trained: the conv's backward input and weight gradients (2x its bias-free forward) and its bias gradient (an
    add per dy element); GroupNorm's backward counted (not free); the time MLP's weight gradients."""
    _, counts, _ = profiled("diffusion", True)
    feat = DF_B * DF_C * DF_P
    conv3 = conv(DF_B, DF_C, DF_C, DF_P, 9)
    assert by_op(counts)["aten::convolution_backward"] == 2 * (conv3 - feat) + feat == 18560
    assert by_op(counts)["aten::native_group_norm_backward"] > 0
    assert flops_of(counts, "aten::mm") == 2 * 2 * DF_B * 2 * DF_T * DF_C + 2 * DF_B * DF_T * 2 * DF_T


# --- padded language-model loss ------------------------------------------------------------------------------------
LM_ROWS = LM_B * LM_L


def test_padded_lm_loss_charges_real_targets_only():
    """Cross-entropy as log_softmax (5 per logit) and NLL: NLL adds one log-probability per target that is not
    ``ignore_index`` (5 of 10), and reads those alone besides the int64 targets; the head 2*rows*D*V: 915. Before
    round 21 every padding target was charged a FLOP and a log-probability read (920 FLOPs, 120 bytes)."""
    p, counts, _ = profiled("padded_lm", False)
    nll = one_row(counts, "aten::nll_loss_forward")
    assert nll.flops == LM_REAL
    assert nll.bytes_read == LM_ROWS * I64 + LM_REAL * F32 == 100
    assert p.flops == 2 * LM_ROWS * LM_D * LM_V + SOFTMAX * LM_ROWS * LM_V + LM_REAL == 915


def test_padded_lm_trained_nll_backward_writes_real_targets():
    """Trained: NLL's backward writes -dy at the 5 real targets of a zeroed (rows, V) gradient: 5 FLOPs; it reads the
    targets, dy and the total weight, not the log-probabilities; the embedding's backward adds every token's row."""
    _, counts, _ = profiled("padded_lm", True)
    bwd = one_row(counts, "aten::nll_loss_backward")
    assert bwd.flops == LM_REAL
    assert (bwd.bytes_read, bwd.bytes_written) == (LM_ROWS * I64 + 2 * F32, LM_ROWS * LM_V * F32)
    assert by_op(counts)["aten::embedding_dense_backward"] == LM_ROWS * LM_D
