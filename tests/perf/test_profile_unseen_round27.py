"""Twenty-seventh held-out round for the model profiler: seven models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: a bag-of-words tagger (an EmbeddingBag(scale_grad_by_freq=True) into a sigmoid head trained by a
class-weighted BCELoss); a metric-learning head trained by embedding losses no round had used
(CosineEmbeddingLoss, HingeEmbeddingLoss over pairwise distances, MultiLabelSoftMarginLoss, BCEWithLogitsLoss with
a per-class ``pos_weight``, TripletMarginWithDistanceLoss under a cosine distance); an MLP under shrinkage and clipping
activations (SELU, Softshrink, Hardshrink, Tanhshrink, LogSigmoid, Threshold, Hardtanh) into a Softmin; a polar
encoder (torch.hypot, torch.atan2, an erfinv Gaussian copula, torch.logaddexp, stacked into a head); a rigid-body
torque head (torch.linalg.cross of positions with learned forces, a Kronecker-factored weight by torch.kron); a
ragged-sequence model (nn.utils.rnn.pad_sequence, torch.bucketize of a numeric feature, an
Embedding(scale_grad_by_freq=True) with a padding index); a padded volume (ReplicationPad3d, Conv3d, AvgPool3d with
ceil_mode and count_include_pad=False, adaptive average pooling, CircularPad1d into LPPool1d). Bad inputs close
the round (a pos_weight of the wrong width, float ids, arguments of the wrong kind), each refused naming what was
wrong.

What this round found:
- ``binary_cross_entropy_with_logits`` was counted by its plain formula whatever its arguments: a ``pos_weight``
  (each element's log-sigmoid scaled by 1 + (p - 1) y: three more FLOPs an element, and p - 1 once per class) and
  a ``weight`` (a multiply an element) were left out, a weighted multi-label loss counted as an unweighted one
  (``counting_rules.losses._bce_logits_flops``, ``formulas.BCE_LOGITS_POS_WEIGHT_FLOPS_PER_ELEMENT``); likewise
  binary_cross_entropy on probabilities and its backward left out their ``weight``'s multiply an element
  (``counting_rules.losses._weighted_bce_flops``);
- an Embedding(scale_grad_by_freq=True)'s backward was counted as the plain one (an add per element of each looked-up
  row): the kernel first counts each id's occurrences (an add per token), then scales each row it adds by one over
  its id's count (a divide per row, a multiply-add per element) (``counting_rules.embedding
  ._embedding_backward_flops``); an EmbeddingBag's alike (``_embedding_bag_backward_flops``: mode sum added each
  row unscaled, and neither mode counted the ids).

Left as it is, a convention every round keeps: a pool's window is charged all its taps at every output, also where
it overhangs the input (padding, ceil_mode's last partial window), though the kernels visit only the taps inside
(the padded volume's 5 -> 3 average pool: 216 taps charged a plane, 125 visited). Rounds 4, 13, 18 and 25 pin it.

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts its product alone, its bias
add not); a convolution by ``profile_support.conv``; element-wise ops, activations and the transcendental ops one
per output element; a cross product ``formulas.CROSS_FLOPS_PER_ELEMENT`` per element of an operand; a binary search
ceil(log2(n + 1)) compares a value; softmax by its ``formulas`` constant. Bytes are the distinct tensors an op reads
and writes (fp32: 4 bytes, int64: 8).
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, check_every_row, one_row, profile_cpu, setup_round, step_counts  # noqa: E402
from profile_support import conv, flops_of, rows_of, seeded  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
SOFTMAX = formulas.SOFTMAX_FLOPS_PER_ELEMENT
# Ops whose count of 0 FLOPs is right: copies, layout, padding, lookups, allocation and fills.
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::fill_", "aten::scalar_tensor", "aten::masked_fill_", "aten::masked_fill",
    "aten::stack",
    "aten::embedding", "aten::full", "aten::replication_pad3d", "aten::cat", "aten::zeros", "aten::new_zeros",
    "aten::embedding_dense_backward", "aten::_to_copy", "aten::index_put_", "aten::zero_",
    "aten::replication_pad3d_backward", "aten::slice_backward", "aten::select_backward",
}


# --- metric-learning head: pairs, features, embedding width, triplet margin, positive weight --------------------
ML_N, ML_F, ML_E, ML_MARGIN, ML_POS = 5, 6, 4, 0.3, 2.0


class MetricHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(ML_F, ML_E)
        self.cosine = nn.CosineEmbeddingLoss(margin=0.2)
        self.hinge = nn.HingeEmbeddingLoss(margin=1.0)
        self.multilabel = nn.MultiLabelSoftMarginLoss()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=torch.full((ML_E,), ML_POS))
        self.triplet = nn.TripletMarginWithDistanceLoss(
            distance_function=lambda u, v: 1 - F.cosine_similarity(u, v), margin=ML_MARGIN)

    def forward(self, a, b, c, y, labels):  # a, b, c (N, F); y (N,) +-1; labels (N, E) multi-hot
        ea, eb, ec = self.embed(a), self.embed(b), self.embed(c)  # (N, E) each
        apart = F.pairwise_distance(ea, eb)  # (N,)
        return (self.cosine(ea, eb, y) + self.hinge(apart, y) + self.multilabel(ea, labels) + self.bce(eb, labels)
                + self.triplet(ea, eb, ec))


@seeded
def metric_head():
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    labels = (torch.rand(ML_N, ML_E) > 0.5).float()
    return MetricHead(), (torch.randn(ML_N, ML_F), torch.randn(ML_N, ML_F), torch.randn(ML_N, ML_F), y, labels)


# --- shrinkage MLP: batch, width ------------------------------------------------------------------------------------
SH_B, SH_D = 4, 8


class ShrinkMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(SH_D, SH_D), nn.Linear(SH_D, SH_D)
        self.acts = nn.Sequential(nn.SELU(), nn.Softshrink(0.3), nn.Hardshrink(0.2), nn.Tanhshrink(),
                                  nn.LogSigmoid(), nn.Threshold(-0.5, 0.0), nn.Hardtanh(-0.5, 0.5))
        self.softmin = nn.Softmin(-1)

    def forward(self, x):  # (B, D)
        return self.softmin(self.fc2(self.acts(self.fc1(x))))  # (B, D), a distribution favouring small scores


@seeded
def shrink_mlp():
    return ShrinkMLP(), (torch.randn(SH_B, SH_D),)


# --- polar encoder: points, features in, outputs ---------------------------------------------------------------------
PO_N, PO_F, PO_OUT, PO_CLAMP = 5, 3, 3, 0.9


class PolarEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_xy, self.to_u = nn.Linear(PO_F, 2), nn.Linear(PO_F, 1)
        self.head = nn.Linear(4, PO_OUT)

    def forward(self, x):  # (N, F)
        xy = self.to_xy(x)  # (N, 2)
        r, theta = torch.hypot(xy[:, 0], xy[:, 1]), torch.atan2(xy[:, 1], xy[:, 0])  # (N,) each
        z = torch.erfinv(torch.tanh(self.to_u(x)[:, 0]) * PO_CLAMP)  # a uniform in (-1, 1) to a Gaussian score
        soft = torch.logaddexp(r, z)  # a smooth max
        return self.head(torch.stack([r, theta, z, soft], -1))  # (N, OUT)


@seeded
def polar():
    return PolarEncoder(), (torch.randn(PO_N, PO_F),)


# --- rigid-body torque with a Kronecker-factored mix: bodies, features, factor shapes --------------------------------
RB_N, RB_F = 6, 4
RB_A, RB_B = (3, 2), (4, 5)  # kron: (12, 10)
RB_OUT, RB_IN = RB_A[0] * RB_B[0], RB_A[1] * RB_B[1]


class RigidBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.force = nn.Linear(RB_F, 3)
        self.A, self.B = nn.Parameter(torch.randn(*RB_A)), nn.Parameter(torch.randn(*RB_B))

    def forward(self, r, x, h):  # r (N, 3) positions, x (N, F) features, h (N, IN)
        torque = torch.linalg.cross(r, self.force(x))  # (N, 3)
        mixed = F.linear(h, torch.kron(self.A, self.B))  # (N, OUT) by a (OUT, IN) weight of 12 + 20 numbers
        return torque.sum() + mixed.sum()


@seeded
def rigid_body():
    return RigidBody(), (torch.randn(RB_N, 3), torch.randn(RB_N, RB_F), torch.randn(RB_N, RB_IN))


# --- ragged ids, bucketized feature, frequency-scaled embedding: table rows, width, boundaries -----------------------
RG_ROWS, RG_D, RG_PAD = 10, 4, 0
RG_EDGES = (-1.0, 0.0, 1.0)
RG_SEQS = ((1, 2, 3), (4, 4))  # two sequences; id 4 twice: its gradient scaled by 1/2
RG_VALUES = 6


class RaggedBuckets(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(RG_ROWS, RG_D, padding_idx=RG_PAD, scale_grad_by_freq=True)
        self.register_buffer("edges", torch.tensor(RG_EDGES))

    def forward(self, first, second, values):  # two int64 sequences of their own lengths; values (V,)
        ids = nn.utils.rnn.pad_sequence([first, second], batch_first=True, padding_value=RG_PAD)  # (2, L max)
        bins = torch.bucketize(values, self.edges) + 1  # (V,) in 1..len(edges)+1, clear of the padding id
        return self.table(ids).sum() + self.table(bins).pow(2).sum()


@seeded
def ragged():
    first, second = (torch.tensor(s) for s in RG_SEQS)
    return RaggedBuckets(), (first, second, torch.randn(RG_VALUES))


# --- padded volume and signal: batch, channels in and out, side, signal channels and length -------------------------
PV_B, PV_CI, PV_CO, PV_S, PV_SC, PV_L = 2, 2, 3, 5, 3, 7
PV_POOLED = math.ceil(PV_S / 2)  # ceil_mode keeps the last, partial window: 5 -> 3


class PaddedVolume(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad, self.conv = nn.ReplicationPad3d(1), nn.Conv3d(PV_CI, PV_CO, 3)
        self.pool = nn.AvgPool3d(2, ceil_mode=True, count_include_pad=False)
        self.circular, self.lp = nn.CircularPad1d(1), nn.LPPool1d(2, 2)

    def forward(self, v, s):  # v (B, CI, S, S, S); s (B, SC, L)
        pooled = self.pool(self.conv(self.pad(v)))  # (B, CO, 3, 3, 3)
        return F.adaptive_avg_pool3d(pooled, 1).sum() + self.lp(self.circular(s)).sum()  # lp: (B, SC, (L+2)//2)


@seeded
def padded_volume():
    return PaddedVolume(), (torch.randn(PV_B, PV_CI, PV_S, PV_S, PV_S), torch.randn(PV_B, PV_SC, PV_L))


# --- bag-of-words tagger: vocabulary, width, classes, ids, bag starts ----------------------------------------------
TG_VOCAB, TG_D, TG_C = 12, 4, 3
TG_IDS, TG_OFFSETS = (3, 5, 5, 7, 1, 3, 3, 3), (0, 3, 5)  # three bags of 3, 2 and 3 ids; ids 3 and 5 repeat
TG_CLASS_WEIGHT = (1.0, 2.0, 0.5)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(TG_VOCAB, TG_D, mode="sum", scale_grad_by_freq=True)
        self.head = nn.Linear(TG_D, TG_C)
        self.loss = nn.BCELoss(weight=torch.tensor(TG_CLASS_WEIGHT))  # (C,), expanded over the bags

    def forward(self, ids, offsets, tags):  # ids (E,) int64; offsets (BAGS,); tags (BAGS, C) multi-hot
        return self.loss(torch.sigmoid(self.head(self.bag(ids, offsets))), tags)


@seeded
def tagger():
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    return Tagger(), (torch.tensor(TG_IDS), torch.tensor(TG_OFFSETS), tags)


MODELS = {
    "metric_head": (metric_head, True), "shrink_mlp": (shrink_mlp, True), "polar": (polar, True),
    "rigid_body": (rigid_body, True), "ragged": (ragged, True), "padded_volume": (padded_volume, True),
    "tagger": (tagger, True),
}
CASES, IDS, profiled = setup_round(MODELS)


@pytest.mark.parametrize(("name", "train"), CASES, ids=IDS)
def test_every_row_of_every_model(name, train):
    """Rows add up to the counted step, nothing computing is counted free or uncounted, torch's formulas agree,
    every number finite, every counted row's bound its side of the ridge, the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert name in text
    assert all(o.m.dtype for o in p.ops if o.counted), [o.label for o in p.ops if o.counted and not o.m.dtype]


def test_metric_head_by_hand():
    """Three Linears through one weight, 2 N F E each (one addmm row, three calls); the BCE with logits its formula
    per element plus its pos_weight's three and p - 1 once per class (round 27's fix), reading the logits, the labels
    and pos_weight, writing a scalar; the multi-label loss two log-sigmoids of the (N, E) scores, each writing its
    output and its buffer; the pairwise distance's norm a square and an add per element."""
    p, counts, _ = profiled("metric_head", False)
    embed = one_row(counts, "aten::addmm")
    assert (embed.calls, embed.flops) == (3, 3 * 2 * ML_N * ML_F * ML_E)
    n = ML_N * ML_E
    bce = one_row(counts, "aten::binary_cross_entropy_with_logits")
    per_element = formulas.BCE_LOGITS_FLOPS_PER_ELEMENT + formulas.BCE_LOGITS_POS_WEIGHT_FLOPS_PER_ELEMENT
    assert bce.flops == per_element * n + ML_E
    assert (bce.bytes_read, bce.bytes_written) == ((2 * n + ML_E) * F32, F32)
    log_sigmoid = one_row(counts, "aten::log_sigmoid_forward")
    assert (log_sigmoid.calls, log_sigmoid.flops, log_sigmoid.bytes_written) == (2, 2 * n, 2 * 2 * n * F32)
    norm = one_row(counts, "aten::norm")
    assert norm.flops == formulas.NORM_FLOPS_PER_ELEMENT * n and norm.bytes_written == ML_N * F32
    assert p.flops > embed.flops + bce.flops


def test_metric_head_trained_counts_the_embedding_s_backward():
    """Trained, the shared Linear's weight gradient is one product over all three uses' rows (2 N E F each) and the
    inputs need none: the backward's products are 3 x 2 N E F, the losses' backward counted by their ops."""
    p, counts, _ = profiled("metric_head", True)
    assert flops_of(counts, "aten::mm") == 3 * 2 * ML_N * ML_E * ML_F
    assert not p.unsupported


def test_shrink_mlp_by_hand():
    """Two Linears 2 B D D each; SELU (an elu), Softshrink, Hardshrink, Tanhshrink (a tanh and a subtract),
    LogSigmoid, Threshold, Hardtanh one FLOP an element; Softmin a negation and a softmax: 1472."""
    p, counts, _ = profiled("shrink_mlp", False)
    n = SH_B * SH_D
    for op in ("aten::elu", "aten::softshrink", "aten::hardshrink", "aten::tanh", "aten::sub",
               "aten::log_sigmoid_forward", "aten::threshold", "aten::hardtanh", "aten::neg"):
        row = one_row(counts, op)
        assert (row.flops, row.bytes_read) == (n, (2 * n if op == "aten::sub" else n) * F32), op
    assert one_row(counts, "aten::_softmax").flops == SOFTMAX * n
    assert flops_of(counts, "aten::addmm") == 2 * 2 * SH_B * SH_D * SH_D
    assert p.flops == 2 * 2 * SH_B * SH_D * SH_D + 9 * n + SOFTMAX * n == 1472


def test_shrink_mlp_trained_has_a_backward_for_every_activation():
    """Each activation's backward one FLOP an element, reading dy and what it saved, writing dx."""
    _, counts, _ = profiled("shrink_mlp", True)
    n = SH_B * SH_D
    for op in ("elu", "softshrink", "hardshrink", "tanh", "threshold", "hardtanh"):
        row = one_row(counts, f"aten::{op}_backward")
        assert (row.flops, row.bytes_read, row.bytes_written) == (n, 2 * n * F32, n * F32), op
    assert one_row(counts, "aten::log_sigmoid_backward").flops == n


def test_polar_by_hand():
    """hypot, atan2, tanh, erfinv, logaddexp one FLOP an output element, each binary one reading its two (N,)
    operands; the stack copies; three Linears their products: 2 N F 2 + 2 N F + 2 N 4 OUT, plus the u scale."""
    p, counts, _ = profiled("polar", False)
    for op in ("aten::hypot", "aten::atan2", "aten::logaddexp"):
        row = one_row(counts, op)
        assert (row.flops, row.bytes_read, row.bytes_written) == (PO_N, 2 * PO_N * F32, PO_N * F32), op
    for op in ("aten::erfinv", "aten::tanh"):
        assert one_row(counts, op).flops == PO_N, op
    stack = one_row(counts, "aten::stack")
    assert (stack.flops, stack.bytes_read, stack.bytes_written) == (0, 4 * PO_N * F32, 4 * PO_N * F32)
    products = 2 * PO_N * PO_F * 2 + 2 * PO_N * PO_F + 2 * PO_N * 4 * PO_OUT
    assert flops_of(counts, "aten::addmm") == products
    assert p.flops == products + 6 * PO_N  # five element-wise ops and the scale by PO_CLAMP


def test_rigid_body_by_hand():
    """The force Linear 2 N F 3; the cross product CROSS_FLOPS_PER_ELEMENT per element of (N, 3), reading both
    operands and writing (N, 3); kron one multiply per element of the (12, 10) weight, from the two factors alone;
    the mixing product 2 N IN OUT; the sums an add per element: 1849."""
    p, counts, _ = profiled("rigid_body", False)
    cross = one_row(counts, "aten::linalg_cross")
    assert cross.flops == formulas.CROSS_FLOPS_PER_ELEMENT * RB_N * 3
    assert (cross.bytes_read, cross.bytes_written) == (2 * RB_N * 3 * F32, RB_N * 3 * F32)
    kron = one_row(counts, "aten::mul")
    assert kron.flops == RB_OUT * RB_IN
    assert (kron.bytes_read, kron.bytes_written) == ((math.prod(RB_A) + math.prod(RB_B)) * F32, RB_OUT * RB_IN * F32)
    mix = one_row(counts, "aten::mm")
    assert (mix.flops, mix.bytes_read) == (2 * RB_N * RB_IN * RB_OUT, (RB_N * RB_IN + RB_OUT * RB_IN) * F32)
    total = 2 * RB_N * RB_F * 3 + cross.flops + kron.flops + mix.flops + RB_N * 3 + RB_N * RB_OUT + 1
    assert p.flops == total == 1849


def test_rigid_body_trained_differentiates_the_cross_product_and_the_factors():
    """Trained, the cross product's backward is a cross product of the gradient with the positions (the force's
    gradient; the positions need none); the kron weight's gradient flows back to each factor through a multiply
    by the other and a sum over its broadcast dims."""
    _, counts, _ = profiled("rigid_body", True)
    crosses = one_row(counts, "aten::linalg_cross")
    assert crosses.calls == 2 and crosses.flops == 2 * formulas.CROSS_FLOPS_PER_ELEMENT * RB_N * 3
    back = [c for (op, sh), c in counts.items() if op == "aten::mul" and sh[0] == (RB_A[0], RB_B[0], RB_A[1], RB_B[1])]
    assert sum(c.flops for c in back) == 2 * RB_OUT * RB_IN


def test_ragged_buckets_by_hand():
    """pad_sequence fills a (2, L) int64 batch with the padding id and copies each sequence in (no arithmetic);
    bucketize ceil(log2(3 + 1)) = 2 compares a value, reading the values and the boundaries and writing int64 ids;
    each lookup reads its ids and one row an id; the sums, the square and the shift one FLOP an element: 91."""
    p, counts, _ = profiled("ragged", False)
    length = max(len(s) for s in RG_SEQS)
    fill = one_row(counts, "aten::full")
    assert (fill.flops, fill.bytes_written) == (0, len(RG_SEQS) * length * I64)
    assert sum(c.bytes_written for c in rows_of(counts, "aten::copy_")) == sum(map(len, RG_SEQS)) * I64
    search = one_row(counts, "aten::bucketize")
    assert search.flops == RG_VALUES * math.ceil(math.log2(len(RG_EDGES) + 1))
    assert (search.bytes_read, search.bytes_written) == ((RG_VALUES + len(RG_EDGES)) * F32, RG_VALUES * I64)
    padded = one_row(counts, "aten::embedding", ((RG_ROWS, RG_D), (len(RG_SEQS), length)))
    tokens = len(RG_SEQS) * length
    assert (padded.bytes_read, padded.bytes_written) == (tokens * (I64 + RG_D * F32), tokens * RG_D * F32)
    # the shift, the padded lookups' sum, the buckets' square and its sum, the final add
    assert p.flops == search.flops + RG_VALUES + tokens * RG_D + 2 * RG_VALUES * RG_D + 1 == 91


def test_ragged_frequency_scaled_backward_by_hand():
    """Trained, each lookup's backward under scale_grad_by_freq counts its ids (one add a token, the padding's
    too), divides one by the count for each row it adds, and adds that row scaled (a multiply-add an element),
    skipping the padding's: 6 + 5 + 2 * 5 * D for the padded batch, 6 + 6 + 2 * 6 * D for the buckets (round 27's
    fix: both counted as a plain backward's add an element, 5 D and 6 D)."""
    _, counts, _ = profiled("ragged", True)
    length = max(len(s) for s in RG_SEQS)
    tokens, entries = len(RG_SEQS) * length, sum(map(len, RG_SEQS))
    padded = one_row(counts, "aten::embedding_dense_backward", ((len(RG_SEQS), length, RG_D), (len(RG_SEQS), length)))
    assert padded.flops == tokens + entries + 2 * entries * RG_D
    buckets = one_row(counts, "aten::embedding_dense_backward", ((RG_VALUES, RG_D), (RG_VALUES,)))
    assert buckets.flops == 2 * RG_VALUES + 2 * RG_VALUES * RG_D
    assert buckets.bytes_written == RG_ROWS * RG_D * F32  # the whole table's gradient


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_frequency_scaling_is_counted_only_where_asked(padding_idx):
    """The same lookup's backward without scale_grad_by_freq stays an add an element of each non-padding row;
    with it, the count, the divides and multiply-adds of round 27's fix."""
    ids = torch.tensor([[0, 3, 3, 5], [5, 5, 0, 2]])
    kept = int((ids != padding_idx).sum()) if padding_idx is not None else ids.numel()
    width = 3
    def step(table, scale):
        F.embedding(ids, table, padding_idx=padding_idx, scale_grad_by_freq=scale).sum().backward()

    for scale in (False, True):
        table = torch.randn(7, width, requires_grad=True)
        counts = profile.count_ops(lambda t=table, s=scale: step(t, s))
        back = one_row(counts, "aten::embedding_dense_backward")
        assert back.flops == (ids.numel() + kept + 2 * kept * width if scale else kept * width), scale


def test_padded_volume_by_hand():
    """ReplicationPad3d copies its border (0 FLOPs; reads the volume, writes the padded one); the 3x3x3 convolution
    by the formula; the ceil-mode average pool its 8 taps at each of its 3^3 outputs a plane (a window that overhangs
    charged whole: the rounds' convention), the adaptive pool a mean of each plane; CircularPad1d copies; LPPool1d a
    square, a 2-tap average pool and the root by sign, abs, relu, two multiplies and a power: 83485."""
    p, counts, _ = profiled("padded_volume", False)
    padded = PV_S + 2
    pad = one_row(counts, "aten::replication_pad3d")
    assert (pad.flops, pad.bytes_read, pad.bytes_written) == (
        0, PV_B * PV_CI * PV_S ** 3 * F32, PV_B * PV_CI * padded ** 3 * F32)
    conv_flops = conv(PV_B, PV_CI, PV_CO, PV_S ** 3, 27)
    assert one_row(counts, "aten::convolution").flops == conv_flops == 81750
    planes = PV_B * PV_CO
    pool = one_row(counts, "aten::avg_pool3d")
    assert pool.flops == 8 * planes * PV_POOLED ** 3
    assert (pool.bytes_read, pool.bytes_written) == (planes * PV_S ** 3 * F32, planes * PV_POOLED ** 3 * F32)
    signal = PV_B * PV_SC * (PV_L + 2)
    lp_out = PV_B * PV_SC * ((PV_L + 2) // 2)
    assert one_row(counts, "aten::avg_pool2d").flops == 2 * lp_out
    volume = conv_flops + pool.flops + planes * PV_POOLED ** 3 + planes
    lp = signal + 2 * lp_out + 6 * lp_out + lp_out
    assert p.flops == volume + lp + 1 == 83485


def test_padded_volume_trained_spreads_the_pool_s_gradient():
    """Trained, the adaptive pool's gradient is spread by a divide over each plane, the ceil-mode pool's backward
    charged its taps at each element of dy (as its forward), the convolution's backward for its weight and bias only
    (the volume needs no gradient)."""
    _, counts, _ = profiled("padded_volume", True)
    planes = PV_B * PV_CO
    back = one_row(counts, "aten::avg_pool3d_backward")
    assert back.flops == 8 * planes * PV_POOLED ** 3
    weight_grad = 2 * PV_B * PV_S ** 3 * PV_CO * PV_CI * 27 + PV_B * PV_CO * PV_S ** 3
    assert one_row(counts, "aten::convolution_backward").flops == weight_grad


@pytest.mark.parametrize(("weighted", "positive"), [(False, False), (True, False), (False, True), (True, True)])
def test_bce_with_logits_counts_its_weights(weighted, positive):
    """binary_cross_entropy_with_logits over (N, C) logits: its formula an element, a multiply an element for a
    weight, p - 1 once per class and three FLOPs an element for a pos_weight (round 27's fix: both left out); the
    weights read where given."""
    n, c = 3, 4
    x, y = torch.randn(n, c), (torch.rand(n, c) > 0.5).float()
    w, pw = torch.rand(n, c), torch.rand(c) + 1
    with torch.no_grad():
        counts = profile.count_ops(lambda: F.binary_cross_entropy_with_logits(
            x, y, weight=w if weighted else None, pos_weight=pw if positive else None))
    row = one_row(counts, "aten::binary_cross_entropy_with_logits")
    per = formulas.BCE_LOGITS_FLOPS_PER_ELEMENT + weighted + formulas.BCE_LOGITS_POS_WEIGHT_FLOPS_PER_ELEMENT * positive
    assert row.flops == per * n * c + c * positive
    assert row.bytes_read == (2 * n * c + n * c * weighted + c * positive) * F32


def test_a_pos_weight_of_the_wrong_width_names_the_model_and_phase():
    """A BCEWithLogitsLoss whose pos_weight does not broadcast over the labels raises inside the model: the profile
    names the model, the phase and the inputs, with the model's error chained."""
    model, inputs = metric_head()
    model.bce.pos_weight = torch.ones(ML_E + 2)
    with pytest.raises(profile.ProfileError, match=r"metric_head.*warm-up") as e:
        profile_cpu(model, inputs, name="metric_head")
    assert "inputs=" in str(e.value) and e.value.__cause__ is not None


def test_float_ids_name_the_inputs():
    """Float ids where the embedding wants integers: refused naming the model and the inputs' dtypes."""
    model, (first, second, values) = ragged()
    with pytest.raises(profile.ProfileError, match=r"ragged.*inputs=\(tensor 3 float32"):
        profile_cpu(model, (first.float(), second, values), name="ragged")


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"steps": 0}, "steps=0"), ({"warmup": -1}, "warmup=-1"), ({"train": "yes"}, "train='yes'"),
    ({"name": 3}, "name=3"), ({"ceilings": "fast"}, "ceilings='fast'"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, named):
    """Arguments of the wrong kind or out of range: refused before the model runs, naming the argument, its value
    and what was expected."""
    model, inputs = rigid_body()
    with pytest.raises(profile.ProfileError, match=re.escape(named) + ".*expected"):
        profile_cpu(model, inputs, **kwargs)


def test_inputs_that_do_not_fit_forward_name_its_signature():
    """Two of the ragged model's three arguments: refused naming the inputs and forward's signature."""
    model, (first, second, _) = ragged()
    with pytest.raises(profile.ProfileError, match=r"do not fit RaggedBuckets\.forward\(first, second, values\)"):
        profile_cpu(model, (first, second), name="ragged")


def test_an_empty_batch_through_the_metric_head_computes_nothing():
    """A batch of 0 pairs: the Linear reads its weight and computes nothing; the losses' means over nothing are
    NaN, which the model returns; the profile's rows stay finite."""
    model, _ = metric_head()
    empty = torch.zeros(0, ML_F)
    inputs = (empty, empty, empty, torch.zeros(0), torch.zeros(0, ML_E))
    counts = step_counts(model, inputs)
    embed = one_row(counts, "aten::addmm")
    assert embed.flops == 0 and embed.bytes_read >= (ML_F * ML_E + ML_E) * F32
    p = profile_cpu(model, inputs, name="metric_head")
    assert all(math.isfinite(o.m.flops) for o in p.ops)


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_on_probabilities_counts_its_weight(weighted):
    """binary_cross_entropy on probabilities, trained: its formula an element forward and its backward's, each a
    multiply an element more for a weight, which each reads (round 27's fix: the weight's multiplies left out)."""
    n, c = 3, 4
    x = torch.rand(n, c, requires_grad=True)
    y, w = torch.rand(n, c), torch.rand(n, c)
    counts = profile.count_ops(lambda: F.binary_cross_entropy(x, y, weight=w if weighted else None).backward())
    fwd = one_row(counts, "aten::binary_cross_entropy")
    assert fwd.flops == (formulas.BCE_FLOPS_PER_ELEMENT + weighted) * n * c
    assert fwd.bytes_read == (2 + weighted) * n * c * F32
    bwd = one_row(counts, "aten::binary_cross_entropy_backward")
    assert bwd.flops == (formulas.BCE_BWD_FLOPS_PER_ELEMENT + weighted) * n * c
    assert bwd.bytes_read == F32 + (2 + weighted) * n * c * F32  # dy, a scalar expanded; x, y, the weight


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_an_embedding_bag_scaled_by_frequency_counts_its_scaling(mode):
    """An EmbeddingBag(scale_grad_by_freq=True)'s backward, as an Embedding's: each id counted (an add an index),
    each entry's scale divided by its count, its row added scaled (a multiply-add an element); without it, mode sum
    adds each row (an add an element) and mode mean scales it by 1/size (round 27's fix: mode sum's scaling and the
    counting were left out)."""
    ids, offsets, width = torch.tensor([1, 2, 2, 4, 1, 1]), torch.tensor([0, 2, 4]), 3
    entries = ids.numel() * width
    for by_frequency in (False, True):
        torch.manual_seed(0)
        bag = nn.EmbeddingBag(7, width, mode=mode, scale_grad_by_freq=by_frequency)
        counts = profile.count_ops(lambda b=bag: b(ids, offsets).sum().backward())
        back = one_row(counts, "aten::_embedding_bag_backward")
        scaled = by_frequency or mode == "mean"
        assert back.flops == (1 + scaled) * entries + 2 * ids.numel() * by_frequency, by_frequency


def test_tagger_by_hand():
    """The bag sums each looked-up row into its bag (E D adds); the head 2 BAGS D C; the sigmoid one an element; the
    weighted BCE its formula and the weight's multiply an element (round 27's fix), reading the probabilities, the
    tags and the (C,) weight it broadcasts: 194."""
    p, counts, _ = profiled("tagger", False)
    bags, entries = len(TG_OFFSETS), len(TG_IDS)
    assert one_row(counts, "aten::_embedding_bag").flops == entries * TG_D
    assert one_row(counts, "aten::addmm").flops == 2 * bags * TG_D * TG_C
    bce = one_row(counts, "aten::binary_cross_entropy")
    assert bce.flops == (formulas.BCE_FLOPS_PER_ELEMENT + 1) * bags * TG_C
    assert (bce.bytes_read, bce.bytes_written) == ((2 * bags * TG_C + TG_C) * F32, F32)
    assert p.flops == entries * TG_D + 2 * bags * TG_D * TG_C + bags * TG_C + bce.flops == 194


def test_tagger_trained_by_hand():
    """Trained, the weighted BCE's backward its formula and a multiply an element; the bag's backward counts its
    ids, divides each entry's scale by its id's count and adds each row scaled: E + E + 2 E D (round 27's fixes)."""
    _, counts, _ = profiled("tagger", True)
    bags, entries = len(TG_OFFSETS), len(TG_IDS)
    bce = one_row(counts, "aten::binary_cross_entropy_backward")
    assert bce.flops == (formulas.BCE_BWD_FLOPS_PER_ELEMENT + 1) * bags * TG_C
    assert one_row(counts, "aten::_embedding_bag_backward").flops == 2 * entries + 2 * entries * TG_D
