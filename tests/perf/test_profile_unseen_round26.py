"""Twenty-sixth held-out round for the model profiler: seven models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: a SegNet-like encoder-decoder (max pooling that returns its indices, MaxUnpool2d putting the decoder's
values back where the maxima were, an adaptive max pool head, the two outputs returned as a tuple); a patch
denoiser cutting overlapping patches by nn.Unfold, mixing each by a Linear and summing them back by nn.Fold; a
grouped, dilated Conv2d under activations no round had used (Mish, CELU, Softmax2d) and torch.nan_to_num after a
log; a siamese scorer trained by ranking losses (MarginRankingLoss, SoftMarginLoss, MultiMarginLoss); a head that
edits its activations in place through views (``y[:, 1:] *= 2``, ``y[:, 1:] += b``, ``y[:, 0] = 0``); an LSTM with a
projection (``proj_size``: a recurrent state narrower than the cell); a hashed embedding (bitwise ops on int64 ids,
a remainder, an int8 table dequantized by a per-row scale); an Embedding(sparse=True) trained. The SegNet also runs
under bf16 autocast; bad inputs (a target the loss refuses, features of the wrong width, a batch of 0) close it.

What this round found:
- ``y[:, 1:] *= 2`` multiplies the slice in place, then Python assigns it back: ``copy_`` of the slice onto itself,
  which torch returns from at once (the same elements of one storage, alike in dtype and strides); it was charged
  reading and writing the slice again (``counting._same_view``, ``counting._moves_no_data``);
- an Embedding(sparse=True)'s backward wraps the rows' gradients and their ids in a sparse COO tensor, which aliases
  them; it was charged reading and writing them, as a sparse tensor has no storage of its own to find the alias by
  (``counting._storages``: a sparse tensor's indices' and values' storages);
- one op at one shape in several dtypes gets a row per dtype (since session 30), but the table and the hot spots
  showed those rows alike, the same op at the same shapes twice or more, nothing telling which dtype each was; such
  rows now show it (``aten::addmm [bf16]``; ``profile_render._shown_ops``).

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; element-wise ops and activations one per output element; a
max pool one compare per window element; a fold one add per column element; softmax by its ``formulas`` constant;
the margin losses by theirs. Bytes are the distinct tensors an op reads and writes (fp32: 4 bytes, int64: 8,
int8: 1); a lookup reads the rows it returns and its indices.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import device, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, check_every_row, one_row, profile_cpu, setup_round, step_counts  # noqa: E402
from profile_support import conv, flops_of, rows_of, seeded  # noqa: E402

pytestmark = FILTERS
F32, I64, I8 = 4, 8, 1
SOFTMAX = formulas.SOFTMAX_FLOPS_PER_ELEMENT
# Ops whose count of 0 FLOPs is right: copies, layout, gathers and scatters of values, allocation, random draws.
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::max_unpool2d", "aten::gather", "aten::im2col", "aten::embedding",
    "aten::_to_copy", "aten::zeros", "aten::fill_", "aten::masked_fill_", "aten::masked_fill", "aten::ones",
    "aten::select_backward", "aten::slice_backward", "aten::scalar_tensor", "aten::stack", "aten::cat",
    "aten::new_zeros", "aten::embedding_dense_backward", "aten::index_put_", "aten::zero_",
    "aten::_sparse_coo_tensor_with_dims_and_tensors",
}


# --- SegNet-like: batch, channels in, side, hidden channels, classes, head side -----------------------------------
SG_B, SG_C, SG_S, SG_H, SG_K, SG_HEAD = 2, 3, 8, 4, 2, 2
SG_P = SG_S // 2  # side after the 2x2 pool


class SegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(SG_C, SG_H, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.mid = nn.Conv2d(SG_H, SG_H, 3, padding=1, bias=False)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec = nn.Conv2d(SG_H, SG_K, 1)
        self.head = nn.AdaptiveMaxPool2d(SG_HEAD)

    def forward(self, x):  # (B, C, S, S)
        e = F.relu(self.enc(x))  # (B, H, S, S)
        p, where = self.pool(e)  # (B, H, S/2, S/2) and its int64 indices
        u = self.unpool(F.relu(self.mid(p)), where)  # (B, H, S, S), zeros but at the maxima
        return self.dec(u), self.head(u)  # (B, K, S, S), (B, H, 2, 2)


@seeded
def segnet():
    return SegNet(), (torch.randn(SG_B, SG_C, SG_S, SG_S),)


# --- patch denoiser by Unfold / Linear / Fold: batch, channels, side, patch, stride, padding -----------------------
FD_B, FD_C, FD_S, FD_K, FD_STRIDE, FD_PAD = 2, 2, 6, 3, 2, 1
FD_L = ((FD_S + 2 * FD_PAD - FD_K) // FD_STRIDE + 1) ** 2  # patches per image (9)
FD_P = FD_C * FD_K * FD_K  # values per patch (18)


class FoldDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.cut = nn.Unfold(FD_K, padding=FD_PAD, stride=FD_STRIDE)
        self.mix = nn.Linear(FD_P, FD_P)
        self.paste = nn.Fold((FD_S, FD_S), FD_K, padding=FD_PAD, stride=FD_STRIDE)

    def forward(self, x):  # (B, C, S, S)
        cols = self.cut(x).transpose(1, 2)  # (B, L, P), a view
        return self.paste(self.mix(cols).transpose(1, 2))  # (B, C, S, S): overlapping patches summed


@seeded
def fold():
    return FoldDenoiser(), (torch.randn(FD_B, FD_C, FD_S, FD_S),)


# --- grouped dilated conv under Mish / CELU / Softmax2d: batch, channels in and out, side, groups, dilation -------
AC_B, AC_CI, AC_CO, AC_S, AC_G, AC_D = 2, 4, 6, 6, 2, 2
AC_FLOOR = -10.0  # what nan_to_num puts for log(0-) = -inf


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(AC_CI, AC_CO, 3, padding=AC_D, dilation=AC_D, groups=AC_G)
        self.mish, self.celu, self.soft = nn.Mish(), nn.CELU(0.5), nn.Softmax2d()

    def forward(self, x):  # (B, CI, S, S)
        p = self.soft(self.celu(self.mish(self.conv(x))))  # (B, CO, S, S), a distribution over channels
        return torch.nan_to_num(torch.log(p - 0.1), nan=0.0, neginf=AC_FLOOR).sum()


@seeded
def activations():
    return Activations(), (torch.randn(AC_B, AC_CI, AC_S, AC_S),)


# --- siamese ranking: pairs, features, scores, margin ---------------------------------------------------------------
RK_N, RK_F, RK_C, RK_MARGIN = 5, 6, 3, 0.5


class Ranker(nn.Module):
    def __init__(self):
        super().__init__()
        self.score = nn.Linear(RK_F, RK_C)
        self.rank = nn.MarginRankingLoss(RK_MARGIN)
        self.soft, self.multi = nn.SoftMarginLoss(), nn.MultiMarginLoss()

    def forward(self, a, b, y, t):  # a, b (N, F); y (N,) +-1; t (N,) classes
        sa, sb = self.score(a), self.score(b)  # (N, C) each
        return self.rank(sa[:, 0], sb[:, 0], y) + self.soft(sa[:, 1] - sb[:, 1], y) + self.multi(sa, t)


@seeded
def ranker():
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    return Ranker(), (torch.randn(RK_N, RK_F), torch.randn(RK_N, RK_F), y, torch.tensor([0, 1, 2, 1, 0]))


# --- a head editing its activations through views: batch, width -----------------------------------------------------
IV_B, IV_D = 4, 8


class InPlaceViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IV_D, IV_D)
        self.shift = nn.Parameter(torch.randn(IV_D - 1))

    def forward(self, x):  # (B, D)
        y = self.lin(x)
        y[:, 1:] *= 2  # mul_ on the slice, then copy_ of the slice onto itself
        y[:, 1:] += self.shift  # (D-1,) broadcast over the batch: add_, then copy_ onto itself again
        y[:, 0] = 0.0  # fill_ of one column
        return y.sum()


@seeded
def inplace_views():
    return InPlaceViews(), (torch.randn(IV_B, IV_D),)


# --- LSTM with a projection: batch, steps, input, cell, projected state --------------------------------------------
LP_B, LP_T, LP_I, LP_H, LP_P = 2, 5, 4, 8, 3


class ProjectedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(LP_I, LP_H, proj_size=LP_P, batch_first=True)

    def forward(self, x):  # (B, T, I)
        out, (h, c) = self.lstm(x)  # (B, T, P), (1, B, P), (1, B, H)
        return out.sum() + c.sum()


@seeded
def lstm_proj():
    return ProjectedLSTM(), (torch.randn(LP_B, LP_T, LP_I),)


# --- hashed int8 embedding: batch, ids a row, table rows, width, hash multiplier and mask, classes ------------------
HE_B, HE_L, HE_ROWS, HE_D, HE_MULT, HE_MASK, HE_CLS = 3, 5, 17, 4, 2654435761, 0xFFFF, 2


class HashedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randint(-100, 100, (HE_ROWS, HE_D), dtype=torch.int8))
        self.scale = nn.Parameter(torch.rand(HE_ROWS, 1) / 100)
        self.head = nn.Linear(HE_D, HE_CLS)

    def forward(self, ids):  # (B, L) int64, any size
        h = ((ids * HE_MULT) ^ (ids >> 3)) & HE_MASK  # (B, L) int64
        rows = torch.remainder(h, HE_ROWS)
        v = F.embedding(rows, self.table).float() * F.embedding(rows, self.scale)  # (B, L, D)
        return self.head(v.mean(1))  # (B, CLS)


@seeded
def hashed():
    return HashedEmbedding(), (torch.randint(0, 10**6, (HE_B, HE_L)),)


# --- a sparse-gradient embedding: batch, ids a row, table rows, width -------------------------------------------------
SE_B, SE_L, SE_ROWS, SE_D = 3, 5, 20, 4


class SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(SE_ROWS, SE_D, sparse=True)  # its gradient: the looked-up rows and their ids
        self.head = nn.Linear(SE_D, 1)

    def forward(self, ids):  # (B, L) int64
        return self.head(self.table(ids)).sum()


@seeded
def sparse_embedding():
    return SparseBag(), (torch.randint(0, SE_ROWS, (SE_B, SE_L)),)


MODELS = {
    "segnet": (segnet, True), "fold": (fold, True), "activations": (activations, True), "ranker": (ranker, True),
    "inplace_views": (inplace_views, True), "lstm_proj": (lstm_proj, True), "hashed": (hashed, True),
    "sparse_embedding": (sparse_embedding, True),
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


def test_segnet_by_hand():
    """Convolutions by the formula; a 2x2 max pool and the adaptive head a compare per window element; the
    unpool a scatter (0 FLOPs) reading the values and their int64 indices and writing its whole, mostly zero,
    output."""
    p, counts, _ = profiled("segnet", False)
    convs = (conv(SG_B, SG_C, SG_H, SG_S ** 2, 9) + conv(SG_B, SG_H, SG_H, SG_P ** 2, 9, bias=False)
             + conv(SG_B, SG_H, SG_K, SG_S ** 2, 1))
    assert flops_of(counts, "aten::convolution") == convs
    pool = one_row(counts, "aten::max_pool2d_with_indices")
    assert pool.flops == SG_B * SG_H * SG_P ** 2 * 4
    assert pool.bytes_written == SG_B * SG_H * SG_P ** 2 * (F32 + I64)  # values and indices
    head = one_row(counts, "aten::adaptive_max_pool2d")
    assert head.flops == SG_B * SG_H * SG_HEAD ** 2 * (SG_S // SG_HEAD) ** 2
    unpool = one_row(counts, "aten::max_unpool2d")
    assert unpool.flops == 0
    assert unpool.bytes_read == SG_B * SG_H * SG_P ** 2 * (F32 + I64)
    assert unpool.bytes_written == SG_B * SG_H * SG_S ** 2 * F32
    relus = SG_B * SG_H * (SG_S ** 2 + SG_P ** 2)
    assert p.flops == convs + pool.flops + head.flops + relus


def test_segnet_trained_scatters_its_gradient_back_through_the_indices():
    """Trained, the unpool's backward gathers the output's gradient at the indices (data movement) and the pool's
    backward scatters it back: neither is left uncounted; the convolutions' backward is counted."""
    p, counts, _ = profiled("segnet", True)
    assert not p.unsupported
    assert one_row(counts, "aten::max_pool2d_with_indices_backward").flops > 0
    assert flops_of(counts, "aten::convolution_backward") > flops_of(counts, "aten::convolution")


def test_fold_by_hand():
    """im2col copies (0 FLOPs, reads the image, writes the columns); the Linear's product 2 (B L) P P plus its bias;
    col2im adds every column element into its pixel (B P L adds), writing the image."""
    p, counts, _ = profiled("fold", False)
    cut = one_row(counts, "aten::im2col")
    assert (cut.flops, cut.bytes_read, cut.bytes_written) == (0, FD_B * FD_C * FD_S ** 2 * F32,
                                                              FD_B * FD_P * FD_L * F32)
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 2 * FD_B * FD_L * FD_P * FD_P
    paste = one_row(counts, "aten::col2im")
    assert paste.flops == FD_B * FD_P * FD_L
    assert (paste.bytes_read, paste.bytes_written) == (FD_B * FD_P * FD_L * F32, FD_B * FD_C * FD_S ** 2 * F32)
    assert p.flops == 2 * FD_B * FD_L * FD_P * FD_P + FD_B * FD_L * FD_P + FD_B * FD_P * FD_L


def test_activations_by_hand():
    """The grouped dilated convolution by the formula (its output as wide as its input: padding = dilation);
    Mish, CELU, the log, its shift and nan_to_num one FLOP an element; Softmax2d a softmax over channels; the
    sum one add an element."""
    p, counts, _ = profiled("activations", False)
    n = AC_B * AC_CO * AC_S ** 2
    conv_flops = conv(AC_B, AC_CI, AC_CO, AC_S ** 2, 9, groups=AC_G)
    assert one_row(counts, "aten::convolution").flops == conv_flops
    for op in ("aten::mish", "aten::celu", "aten::log", "aten::nan_to_num", "aten::sub"):
        assert one_row(counts, op).flops == n, op
    assert one_row(counts, "aten::_softmax").flops == SOFTMAX * n
    assert p.flops == conv_flops + 5 * n + SOFTMAX * n + n


def test_ranker_losses_by_hand():
    """Two Linears 2 N F C each (addmm counts its product); SoftMarginLoss its constant an element, MultiMarginLoss
    its constant a term of the (N, C) scores; the fused losses' bytes their inputs and a scalar out."""
    p, counts, _ = profiled("ranker", False)
    assert flops_of(counts, "aten::addmm") == 2 * (2 * RK_N * RK_F * RK_C)
    soft = one_row(counts, "aten::soft_margin_loss")
    assert soft.flops == formulas.SOFT_MARGIN_FLOPS_PER_ELEMENT * RK_N
    assert (soft.bytes_read, soft.bytes_written) == (2 * RK_N * F32, F32)
    multi = one_row(counts, "aten::multi_margin_loss")
    assert multi.flops == formulas.MARGIN_FLOPS_PER_TERM * RK_N * RK_C
    assert (multi.bytes_read, multi.bytes_written) == (RK_N * RK_C * F32 + RK_N * I64, F32)


def test_inplace_views_copy_a_slice_onto_itself_for_nothing():
    """``y[:, 1:] *= 2`` then ``y[:, 1:] += shift``: each in-place op reads and writes the (B, D-1) slice, and the
    copy_ Python makes of the slice onto itself moves nothing, as torch's copy_ returns at once (round 26's fix:
    it was charged the slice twice more); the column's fill_ writes the column alone."""
    p, counts, _ = profiled("inplace_views", False)
    slice_bytes = IV_B * (IV_D - 1) * F32
    mul = one_row(counts, "aten::mul_")
    assert (mul.flops, mul.bytes_read, mul.bytes_written) == (IV_B * (IV_D - 1), slice_bytes, slice_bytes)
    add = one_row(counts, "aten::add_")
    assert (add.flops, add.bytes_read, add.bytes_written) == (IV_B * (IV_D - 1), slice_bytes + (IV_D - 1) * F32,
                                                              slice_bytes)
    copy = one_row(counts, "aten::copy_")
    assert copy.calls == 2 and copy.bytes_read == copy.bytes_written == 0
    assert one_row(counts, "aten::fill_").bytes_written == IV_B * F32
    assert p.flops == 2 * IV_B * IV_D * IV_D + 2 * IV_B * (IV_D - 1) + IV_B * IV_D


def test_a_copy_between_different_elements_still_moves_them():
    """The fix keeps every real copy: a slice assigned from a neighbouring slice (``y[1:] = y[:-1]``: one storage,
    other elements), from a transposed view of itself (same elements, other strides) and from another dtype moves
    its bytes."""
    def step(y):
        y[1:] = y[:-1].clone()  # (3, 4), other offset
        y.copy_(y.T.contiguous().T)  # same shape, but a new tensor's elements
        z = torch.zeros(4, 4, dtype=torch.float64)
        z[:, :2] = y[:, :2]  # another dtype and storage
        return z
    y = torch.randn(4, 4)
    counts = profile.count_ops(lambda: step(y.clone()))
    copies = rows_of(counts, "aten::copy_")
    assert sum(c.calls for c in copies) == 3
    assert sum(c.bytes_read for c in copies) == (3 * 4 + 16 + 4 * 2) * F32


def test_a_tensor_copied_onto_itself_moves_nothing():
    """``x.copy_(x)`` and a view copied onto an alike view of the same elements: 0 bytes each; a conjugate view
    onto its base is a real copy (the imaginary parts change)."""
    x = torch.randn(3, 4)
    c = torch.randn(3, dtype=torch.complex64)
    counts = profile.count_ops(lambda: (x.copy_(x), x[:, 1:].copy_(x[:, 1:]), c.copy_(c.conj())))
    copies = {sh: r for (op, sh), r in counts.items() if op == "aten::copy_"}
    assert copies[((3, 4), (3, 4))].bytes_read == 0 and copies[((3, 3), (3, 3))].bytes_written == 0
    assert copies[((3,), (3,))].bytes_read == 3 * 8 and copies[((3,), (3,))].bytes_written == 3 * 8


def test_lstm_projection_by_hand():
    """An LSTM with proj_size on the CPU runs as its cell's ops: the input's product for every step at once
    (2 T B I 4H, its bias then added), the recurrent product from the projected state (2 B P 4H a step, addmm's
    product alone) and the projection of each step's output (2 B H P)."""
    p, counts, _ = profiled("lstm_proj", False)
    gates = 4 * LP_H
    assert flops_of(counts, "aten::mm") == 2 * LP_T * LP_B * LP_I * gates + LP_T * 2 * LP_B * LP_H * LP_P
    assert flops_of(counts, "aten::addmm") == LP_T * 2 * LP_B * LP_P * gates
    hidden = one_row(counts, "aten::addmm")
    assert hidden.calls == LP_T
    assert hidden.bytes_read == LP_T * (gates + LP_B * LP_P + LP_P * gates) * F32


def test_lstm_projection_trained_counts_its_backward():
    """Trained, each product's backward is a product of its size for its weight's gradient and one for its
    input's, but where that input needs none: the sequence (the input's product, 2 T B I 4H) and the zero initial
    state (the first step's recurrent product, 2 B P 4H)."""
    _, fwd, _ = profiled("lstm_proj", False)
    _, counts, _ = profiled("lstm_proj", True)
    products = {"aten::mm", "aten::addmm"}
    forward = flops_of(fwd, products)
    no_input_grad = 2 * LP_T * LP_B * LP_I * 4 * LP_H + 2 * LP_B * LP_P * 4 * LP_H
    assert flops_of(counts, products) == forward + 2 * forward - no_input_grad


def test_hashed_embedding_by_hand():
    """The hash's multiply, xor, shift, and, and the remainder one integer op an id; the int8 lookup reads the ids
    (8 bytes each) and one int8 row of the table an id, and its row is tagged int8; the scale lookup reads fp32
    rows of one."""
    p, counts, _ = profiled("hashed", False)
    ids = HE_B * HE_L
    for op in ("aten::mul", "aten::bitwise_xor", "aten::__rshift__", "aten::bitwise_and", "aten::remainder"):
        rows = [c for (name, sh), c in counts.items() if name == op and c.dtype == "int64"]
        assert rows and sum(c.flops for c in rows) == ids, op
    table = one_row(counts, "aten::embedding", ((HE_ROWS, HE_D), (HE_B, HE_L)))
    assert table.dtype == "int8"
    assert (table.flops, table.bytes_read, table.bytes_written) == (0, ids * I64 + ids * HE_D * I8, ids * HE_D * I8)
    scale = one_row(counts, "aten::embedding", ((HE_ROWS, 1), (HE_B, HE_L)))
    assert (scale.bytes_read, scale.bytes_written) == (ids * I64 + ids * F32, ids * F32)
    # no int8 roof in the synthetic ceilings: the row reads as the step's float dtype, placed under its roof
    assert {o.m.dtype for o in p.ops if o.op == "aten::embedding"} == {"fp32"}


def test_an_int8_lookup_is_placed_under_an_int8_roof_where_there_is_one():
    """Under ceilings with an int8 roof the int8 table's row reads int8; the int64 hash ops (no int64 roof) read as
    the step's fp32, every counted row placed on a side of the ridge."""
    model, inputs = hashed()
    ceil = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "int8": 4e11}, "now")
    p = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=ceil, device="cpu", name="hashed")
    lookups = {o.label: o.m.dtype for o in p.ops if o.op == "aten::embedding"}
    assert sorted(lookups.values()) == ["fp32", "int8"], lookups
    assert all(o.bound in ("memory", "compute") for o in p.ops if o.counted), [(o.label, o.bound) for o in p.ops]
    assert {o.m.dtype for o in p.ops if o.op in ("aten::bitwise_xor", "aten::remainder")} == {"fp32"}


def test_a_model_raising_on_a_bad_target_names_the_model_and_phase():
    """MultiMarginLoss given a class beyond the scores raises inside the model: the profile says which model,
    which phase, and what the inputs were, with the model's error chained."""
    model, (a, b, y, _) = ranker()
    with pytest.raises(profile.ProfileError, match="ranker") as e:
        profile_cpu(model, (a, b, y, torch.tensor([0, 1, 2, 1, RK_C + 4])), name="ranker")
    assert "inputs=" in str(e.value) and e.value.__cause__ is not None


def test_inputs_of_the_wrong_shape_name_the_inputs():
    """An LSTM given features of the wrong width: the error names the model and the inputs' shapes."""
    model, _ = lstm_proj()
    with pytest.raises(profile.ProfileError, match=r"inputs=.*2x5x7"):
        profile_cpu(model, (torch.randn(LP_B, LP_T, LP_I + 3),), name="lstm_proj")


def test_an_empty_batch_is_profiled_as_nothing_computed():
    """A batch of 0 pairs through the hashed embedding: no arithmetic on the ids, no row looked up, the head's
    weight still read; the profile completes with finite rows."""
    model, _ = hashed()
    counts = step_counts(model, (torch.zeros(0, HE_L, dtype=torch.int64),))
    table = one_row(counts, "aten::embedding", ((HE_ROWS, HE_D), (0, HE_L)))
    assert table.bytes_read == table.bytes_written == 0
    assert one_row(counts, "aten::addmm").bytes_read >= HE_D * HE_CLS * F32
    p = profile_cpu(model, (torch.zeros(0, HE_L, dtype=torch.int64),), name="hashed")
    assert p.flops == 0 and all(o.m.flops == 0 for o in p.ops)


def test_a_sparse_gradient_wraps_its_rows_and_ids_without_copying_them():
    """An Embedding(sparse=True)'s backward makes its gradient by wrapping the rows' gradients (B L, D) and their
    ids (1, B L) in a sparse tensor, which aliases them (round 26's fix: it was charged reading and writing them,
    the output, a sparse tensor, having no storage of its own to compare); the gradient's rows are still written
    once, by the product that makes them."""
    _, counts, _ = profiled("sparse_embedding", True)
    ids = SE_B * SE_L
    wrap = one_row(counts, "aten::_sparse_coo_tensor_with_dims_and_tensors", ((1, ids), (ids, SE_D)))
    assert (wrap.flops, wrap.bytes_read, wrap.bytes_written) == (0, 0, 0)
    rows = one_row(counts, "aten::mm", ((ids, 1), (1, SE_D)))  # the rows' gradient: dy (ids, 1) times the weight
    assert rows.flops == 2 * ids * SE_D and rows.bytes_written == ids * SE_D * F32


def test_a_sparse_tensor_built_from_new_values_still_moves_them():
    """The fix keeps real work: a sparse tensor coalesced (new indices and values, duplicates summed) and one made
    dense move bytes."""
    i = torch.tensor([[0, 2, 0], [1, 0, 1]])
    v = torch.ones(3)
    counts = profile.count_ops(lambda: torch.sparse_coo_tensor(i, v, (3, 3)).coalesce().to_dense())
    assert one_row(counts, "aten::_coalesce").bytes_written > 0
    assert one_row(counts, "aten::_to_dense").bytes_written == 9 * F32


class AutocastSegNet(nn.Module):
    """The SegNet run under bf16 autocast on the CPU: its convolutions in bf16, the pools and unpool on their
    bf16 outputs."""

    def __init__(self):
        super().__init__()
        self.net = SegNet()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seg, head = self.net(x)
        return seg.float().sum() + head.float().sum()


def test_segnet_under_bf16_autocast_by_hand():
    """Under autocast the convolutions' FLOPs are the fp32 net's, their rows bf16 (the weights cast first, each cast
    reading fp32 and writing bf16); the unpool, which autocast runs in fp32, reads its values cast up from bf16 and
    the int64 indices; the profile completes forward and trained with its convolutions' rows bf16."""
    torch.manual_seed(0)
    model, x = AutocastSegNet(), torch.randn(SG_B, SG_C, SG_S, SG_S)
    counts = step_counts(model, (x,))
    convs = (conv(SG_B, SG_C, SG_H, SG_S ** 2, 9) + conv(SG_B, SG_H, SG_H, SG_P ** 2, 9, bias=False)
             + conv(SG_B, SG_H, SG_K, SG_S ** 2, 1))
    assert flops_of(counts, "aten::convolution") == convs
    assert {c.dtype for c in rows_of(counts, "aten::convolution")} == {"bf16"}
    # CPU autocast runs max_unpool2d in fp32 (its fp32 list): the bf16 values are cast up first, a cast of its own
    unpool = one_row(counts, "aten::max_unpool2d")
    assert unpool.dtype == "fp32"
    assert (unpool.bytes_read, unpool.bytes_written) == (SG_B * SG_H * SG_P ** 2 * (F32 + I64),
                                                         SG_B * SG_H * SG_S ** 2 * F32)
    up = one_row(counts, "aten::_to_copy", ((SG_B, SG_H, SG_P, SG_P),))
    assert (up.bytes_read, up.bytes_written) == (SG_B * SG_H * SG_P ** 2 * 2, SG_B * SG_H * SG_P ** 2 * F32)
    weights = SG_H * SG_C * 9 + SG_H + SG_H * SG_H * 9 + SG_K * SG_H + SG_K
    casts = rows_of(counts, "aten::_to_copy")
    assert sum(c.bytes_read for c in casts) >= (weights + SG_B * SG_C * SG_S ** 2) * F32
    for train in (False, True):
        p = profile_cpu(model, (x,), train=train, name="autocast_segnet")
        assert not p.unsupported and p.flops > convs
        assert {o.m.dtype for o in p.ops if o.op == "aten::convolution"} == {"bf16"}


class FourPrecisions(nn.Module):
    """One width of Linear held in fp32, bf16, fp16 and fp64: four addmm rows at the same shapes."""

    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(FP_D, FP_D).to(dtype) for dtype in FP_DTYPES.values())

    def forward(self, x):  # (B, D) fp32
        return sum(lin(x.to(dtype)).float().sum() for lin, dtype in zip(self.lins, FP_DTYPES.values(), strict=True))


FP_B, FP_D = 4, 8
FP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def test_rows_of_one_op_at_one_shape_in_four_dtypes_are_told_apart_in_the_table():
    """A row per dtype (each under its own roof, its bytes its dtype's) was shown in the table and the hot spots as
    the same op at the same shapes four times over, nothing telling which was which (round 26's fix: such rows show
    their dtype, ``aten::addmm [bf16]``; a row whose op and shapes no other row shares is shown as before)."""
    torch.manual_seed(0)
    ceil = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "bf16": 4e11, "fp16": 4e11, "fp64": 1e11}, "now")
    p = profile.profile_model(FourPrecisions(), (torch.randn(FP_B, FP_D),), steps=1, warmup=1, ceilings=ceil,
                              device="cpu", name="four_precisions")
    addmms = {o.m.dtype: o for o in p.ops if o.op == "aten::addmm"}
    assert sorted(addmms) == sorted(FP_DTYPES)
    for name, o in addmms.items():
        size = torch.empty(0, dtype=FP_DTYPES[name]).element_size()
        assert o.m.flops == 2 * FP_B * FP_D * FP_D
        assert (o.m.bytes_read, o.m.bytes_written) == ((FP_D + FP_B * FP_D + FP_D * FP_D) * size, FP_B * FP_D * size)
    shown = [r[0] for r in profile.profile_rows(p)]
    assert sorted(c for c in shown if c.startswith("aten::addmm")) == sorted(f"aten::addmm [{d}]" for d in FP_DTYPES)
    assert len(shown) == len({(r[0], r[1]) for r in profile.profile_rows(p)}), shown
    lonely = [o for o in p.ops if sum(x.op == o.op and x.shapes == o.shapes for x in p.ops) == 1]
    assert lonely and all(shown[p.ops.index(o)] == o.op for o in lonely)
    hot = profile.hot_spot_lines(p, n=len(p.ops))
    assert len(set(hot)) == len(hot)
    assert any(line.split(". ", 1)[1].startswith("aten::addmm [bf16] (8, 4x8, 8x8):") for line in hot), hot


@pytest.mark.xfail(strict=True, reason="open (round 26): the counting pass's step clones the sparse gradient "
                   "(aten::clone of the (rows, D) sparse tensor, in AccumulateGrad) where the profiled steps' events "
                   "show no such clone; timed nowhere, it is joined by name to the clone mm runs inside itself and so "
                   "lands in the weight-gradient mm's row (why the two passes differ is not yet known)")
def test_a_sparse_gradient_s_clone_does_not_land_in_an_unrelated_row():
    """The head's weight gradient, dy^T (1, B L) times the rows (B L, D), reads its two operands (dy expanded
    from the loss: 4 bytes held) and writes a (1, D) gradient: nothing of the embedding's sparse gradient."""
    p, _, _ = profiled("sparse_embedding", True)
    ids = SE_B * SE_L
    row = next(o for o in p.ops if o.op == "aten::mm" and o.shapes == ((1, ids), (ids, SE_D)))
    assert (row.m.bytes_read, row.m.bytes_written) == (F32 + ids * SE_D * F32, SE_D * F32)
