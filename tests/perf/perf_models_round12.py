"""Twelfth round of models the profiler has not seen (tests/perf/test_profile_unseen_round12*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round12.py:mha_weights --device cpu --train

The families rounds 1-11 leave out: nn.MultiheadAttention returning per-head attention weights (need_weights=True,
average_attn_weights=False: its explicit baddbmm / softmax / bmm path) beside the same layer through SDPA
(need_weights=False), both with a key padding mask; a 2-layer LSTM with dropout between its layers over a packed,
unsorted batch with an initial state; a bidirectional ReLU Elman RNN (nn.RNN) over packed sequences; a volumetric
net (strided Conv3d, trilinear upsampling, a grouped ConvTranspose2d with output_padding, GroupNorm, InstanceNorm with
running statistics, BatchNorm with a cumulative average (momentum=None), PixelShuffle / PixelUnshuffle,
LocalResponseNorm, nearest-exact and align_corners bicubic interpolation); nn.Bilinear, cosine similarity, pairwise
distance and the random layers of training mode (RReLU, AlphaDropout, FeatureAlphaDropout); EmbeddingBags with
per-sample weights, include_last_offset and an empty bag, and a max bag; an embedding with max_norm (renormed in
place in forward); a torch.jit.trace'd block inside an eager net; a Jacobian penalty (vmap of jacrev of
functional_call); non-reentrant checkpointing with dropout inside (preserve_rng_state); in-place ops on views and a
custom autograd.Function that marks its input dirty; a custom parametrization used twice under parametrize.cached();
a model with no parameters; a head built on the first call; an encoder frozen by its own forward; int64-only and
bool-only models; and outputs nested in dicts, namedtuples and lists holding None, strings and ints.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

BATCH = 2
# multi-head attention: tokens, width, heads; tokens kept per sample (the rest masked as padding)
MHA_LEN, MHA_DIM, MHA_HEADS, MHA_KEEP = 6, 8, 2, (6, 4)
# packed LSTM: input width, hidden, layers, lengths (unsorted), dropout between layers
PL_IN, PL_HIDDEN, PL_LAYERS, PL_LENGTHS, PL_DROPOUT = 4, 6, 2, (3, 5, 2), 0.25
# Elman RNN: input width, hidden, lengths
ER_IN, ER_HIDDEN, ER_LENGTHS = 3, 5, (4, 2)
# volumetric net: input channels, depth, side; Conv3d out channels; transposed conv out channels and groups
VOL_C, VOL_D, VOL_SIDE, VOL_C3, VOL_CT, VOL_GROUPS = 2, 3, 6, 4, 8, 2
# pairs: rows, widths of the two Bilinear inputs, its output
PR_ROWS, PR_A, PR_B, PR_OUT = 6, 4, 5, 3
# bags: table rows, width, ids, offsets (include_last_offset: 4 bags, the second empty)
BAG_ROWS, BAG_DIM = 20, 4
BAG_IDS = (3, 7, 7, 1, 19, 0, 2, 5, 5, 11)
BAG_OFFSETS = (0, 3, 3, 7, 10)
# embedding with max_norm: rows, width, ids (repeats: each distinct row is renormed once)
MN_ROWS, MN_DIM, MN_NORM = 50, 6, 1.0
MN_IDS = ((4, 4, 9, 4), (9, 17, 4, 30))
# traced block / Jacobian penalty / checkpointed / views / cached parametrization widths
TR_IN, TR_HIDDEN, TR_OUT = 4, 8, 2
JP_IN, JP_HIDDEN, JP_OUT, JP_ROWS = 3, 5, 2, 4
CK_IN, CK_HIDDEN, CK_ROWS = 4, 8, 3
VW_ROWS, VW_DIM = 5, 6
CP_DIM, CP_ROWS = 4, 3
# no parameters: tokens, width; lazy head / frozen encoder: widths
NP_LEN, NP_DIM = 5, 4
LH_IN, LH_HIDDEN, LH_OUT = 4, 6, 2
FZ_IN, FZ_HIDDEN, FZ_OUT = 4, 8, 3
# integer and bool models: ids, hash multiplier / offset / buckets; bits
HS_IDS, HS_MUL, HS_ADD, HS_BUCKETS = 64, 31, 7, 97
BL_BITS = 50
Out = collections.namedtuple("Out", "logits aux note")


class AttentionWeights(nn.Module):
    """nn.MultiheadAttention (batch first, key padding mask) returning its output and per-head weights, or (with
    ``need_weights`` False) its output through SDPA and None."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(MHA_DIM, MHA_HEADS, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, padding):
        # x (B, N, E); padding (B, N) True where a token is padding
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=self.need_weights,
                         average_attn_weights=False)


def _attention_inputs():
    x = torch.randn(BATCH, MHA_LEN, MHA_DIM)
    padding = torch.arange(MHA_LEN)[None, :] >= torch.tensor(MHA_KEEP)[:, None]  # (B, N)
    return x, padding


@seeded
def mha_weights():
    return AttentionWeights(True).eval(), _attention_inputs()


@seeded
def mha_sdpa():
    return AttentionWeights(False).eval(), _attention_inputs()


class PackedRecurrent(nn.Module):
    """A recurrent layer over a padded batch packed (unsorted) by its lengths; returns the packed outputs' data and
    the final state."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, state=None):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, last = self.rnn(packed, state)
        return out.data, last


@seeded
def packed_lstm():
    rnn = nn.LSTM(PL_IN, PL_HIDDEN, num_layers=PL_LAYERS, batch_first=True, dropout=PL_DROPOUT)
    b = len(PL_LENGTHS)
    x = torch.randn(b, max(PL_LENGTHS), PL_IN)
    state = (torch.randn(PL_LAYERS, b, PL_HIDDEN), torch.randn(PL_LAYERS, b, PL_HIDDEN))
    return PackedRecurrent(rnn).train(), (x, torch.tensor(PL_LENGTHS), state)


@seeded
def elman_packed():
    rnn = nn.RNN(ER_IN, ER_HIDDEN, nonlinearity="relu", batch_first=True, bidirectional=True)
    x = torch.randn(len(ER_LENGTHS), max(ER_LENGTHS), ER_IN)
    return PackedRecurrent(rnn), (x, torch.tensor(ER_LENGTHS))


class Volumetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv3d(VOL_C, VOL_C3, 3, padding=1, stride=(1, 2, 2))
        self.up3 = nn.Upsample(scale_factor=2, mode="trilinear")
        self.convt = nn.ConvTranspose2d(VOL_C3, VOL_CT, 3, stride=2, padding=1, output_padding=1, groups=VOL_GROUPS)
        self.gn = nn.GroupNorm(2, VOL_CT)
        self.inorm = nn.InstanceNorm2d(VOL_CT, affine=True, track_running_stats=True)
        self.bn = nn.BatchNorm2d(VOL_CT, momentum=None)  # a cumulative average of the batches seen
        self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.lrn = nn.LocalResponseNorm(3)

    def forward(self, v):
        y = self.up3(self.conv3(v))              # (B, C3, 2D, S, S): the strided conv halves the sides
        y = y.mean(2)                            # (B, C3, S, S)
        y = self.convt(y)                        # (B, CT, 2S, 2S)
        y = self.bn(self.inorm(self.gn(y)))
        y = self.lrn(self.unshuffle(self.shuffle(y)))
        near = F.interpolate(y, scale_factor=1.5, mode="nearest-exact")
        cubic = F.interpolate(y, scale_factor=1.5, mode="bicubic", align_corners=True)
        return near + cubic                      # (B, CT, 3S, 3S)


@seeded
def volumetric():
    return Volumetric().train(), (torch.randn(BATCH, VOL_C, VOL_D, VOL_SIDE, VOL_SIDE),)


class Pairs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(PR_A, PR_B, PR_OUT)
        self.cos, self.dist = nn.CosineSimilarity(dim=-1), nn.PairwiseDistance(p=3)
        self.rrelu, self.alpha, self.feature_alpha = nn.RReLU(), nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.2)

    def forward(self, a, b):
        y = self.rrelu(self.bilinear(a, b))                  # (R, OUT)
        return self.alpha(y), self.cos(a, a.flip(0)), self.dist(a, a + 1), self.feature_alpha(y[..., None])


@seeded
def pairs_random():
    return Pairs().train(), (torch.randn(PR_ROWS, PR_A), torch.randn(PR_ROWS, PR_B))


class WeightedBags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sum = nn.EmbeddingBag(BAG_ROWS, BAG_DIM, mode="sum", include_last_offset=True)
        self.max = nn.EmbeddingBag(BAG_ROWS, BAG_DIM, mode="max")

    def forward(self, ids, offsets, weights):
        return self.sum(ids, offsets, per_sample_weights=weights), self.max(ids, offsets[:-1])


@seeded
def weighted_bags():
    return WeightedBags(), (torch.tensor(BAG_IDS), torch.tensor(BAG_OFFSETS), torch.rand(len(BAG_IDS)))


class MaxNormLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(MN_ROWS, MN_DIM, max_norm=MN_NORM)
        with torch.no_grad():
            self.emb.weight.mul_(2.0)  # most rows above max_norm: the renorm rescales them
        self.head = nn.Linear(MN_DIM, 1)

    def forward(self, ids):
        return self.head(self.emb(ids))


@seeded
def max_norm_lookup():
    return MaxNormLookup(), (torch.tensor(MN_IDS),)


class WithTraced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(TR_IN, TR_HIDDEN), nn.GELU(), nn.Linear(TR_HIDDEN, TR_IN))
        self.block = torch.jit.trace(block, torch.randn(BATCH, TR_IN))
        self.head = nn.Linear(TR_IN, TR_OUT)

    def forward(self, x):
        return self.head(self.block(x) + x)


@seeded
def with_traced():
    return WithTraced(), (torch.randn(3, TR_IN),)


class JacobianPenalty(nn.Module):
    """f(x) and the squared Frobenius norm of its input Jacobian per sample (vmap of jacrev of functional_call)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(JP_IN, JP_HIDDEN), nn.Tanh(), nn.Linear(JP_HIDDEN, JP_OUT))

    def forward(self, x):
        params = dict(self.f.named_parameters())
        one = lambda xi: torch.func.functional_call(self.f, params, (xi,))  # noqa: E731
        jac = torch.func.vmap(torch.func.jacrev(one))(x)    # (R, OUT, IN)
        return self.f(x), jac.pow(2).sum()


@seeded
def jacobian_penalty():
    return JacobianPenalty(), (torch.randn(JP_ROWS, JP_IN),)


class CheckpointedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(CK_IN, CK_HIDDEN), nn.Dropout(0.3), nn.Linear(CK_HIDDEN, CK_IN))

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False, preserve_rng_state=True)


@seeded
def checkpointed_dropout():
    return CheckpointedDropout().train(), (torch.randn(CK_ROWS, CK_IN),)


class ClampDirty(torch.autograd.Function):
    """relu in place on its input, which it marks dirty."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        ctx.save_for_backward(x > 0)
        return x.clamp_(min=0)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        return grad * kept


class InPlaceViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(VW_DIM, VW_DIM)

    def forward(self, x):
        z = self.lin(x).view(-1, 2, VW_DIM // 2).clone()    # (R, 2, 3)
        z[:, 0].mul_(2)                                      # a row of each sample, in place
        z.diagonal(dim1=-2, dim2=-1).add_(1)                 # the diagonal of each (2, 3), in place
        z = ClampDirty.apply(z * 1)
        return z.transpose(1, 2).contiguous()


@seeded
def inplace_views():
    return InPlaceViews(), (torch.randn(VW_ROWS, VW_DIM),)


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


class CachedSymmetric(nn.Module):
    """One symmetric-parametrized linear applied twice under parametrize.cached(): the parametrization runs once."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(CP_DIM, CP_DIM)
        parametrize.register_parametrization(self.lin, "weight", Symmetric())

    def forward(self, x):
        with parametrize.cached():
            return self.lin(torch.tanh(self.lin(x)))


@seeded
def cached_symmetric():
    return CachedSymmetric(), (torch.randn(CP_ROWS, CP_DIM),)


class NoParameters(nn.Module):
    def forward(self, x):
        # x (B, N, D): attention of the tokens over themselves, no weights
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


@seeded
def no_parameters():
    return NoParameters(), (torch.randn(BATCH, NP_LEN, NP_DIM, requires_grad=True),)


class LazyHead(nn.Module):
    """A head built by the first call, from the width the body gives; its activation swapped after the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(LH_IN, LH_HIDDEN)
        self.act = nn.ReLU()
        self.head = None

    def forward(self, x):
        y = self.act(self.body(x))
        if self.head is None:
            self.head = nn.Linear(y.shape[-1], LH_OUT)
            self.act = nn.Tanh()
        return self.head(y)


@seeded
def lazy_head():
    return LazyHead(), (torch.randn(3, LH_IN),)


class SelfFreezing(nn.Module):
    """Progressive freezing written in the forward: from its second call on the encoder no longer trains."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(FZ_IN, FZ_HIDDEN)
        self.head = nn.Linear(FZ_HIDDEN, FZ_OUT)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            self.encoder.requires_grad_(False)
        return self.head(torch.relu(self.encoder(x)))


@seeded
def self_freezing():
    return SelfFreezing(), (torch.randn(BATCH, FZ_IN),)


class IntHash(nn.Module):
    def forward(self, ids):
        return ((ids * HS_MUL + HS_ADD) % HS_BUCKETS).bincount(minlength=HS_BUCKETS)


@seeded
def int_hash():
    return IntHash(), (torch.randint(0, 1000, (HS_IDS,)),)


class BoolLogic(nn.Module):
    def forward(self, a, b):
        return (a & ~b) | (a ^ b)


@seeded
def bool_logic():
    return BoolLogic(), (torch.rand(BL_BITS) > 0.5, torch.rand(BL_BITS) > 0.5)


class NestedOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return {"out": (y, None, [y.sum(), None]), "named": Out(y * 2, None, "text"), "count": 3, "none": None}


@seeded
def nested_outputs():
    return NestedOutputs(), (torch.randn(BATCH, 4),)


MODELS = {
    "mha_weights": (mha_weights, True),
    "mha_sdpa": (mha_sdpa, True),
    "packed_lstm": (packed_lstm, True),
    "elman_packed": (elman_packed, True),
    "volumetric": (volumetric, True),
    "pairs_random": (pairs_random, True),
    "weighted_bags": (weighted_bags, True),
    "max_norm_lookup": (max_norm_lookup, True),
    "with_traced": (with_traced, True),
    "jacobian_penalty": (jacobian_penalty, True),
    "checkpointed_dropout": (checkpointed_dropout, True),
    "inplace_views": (inplace_views, True),
    "cached_symmetric": (cached_symmetric, True),
    "no_parameters": (no_parameters, True),
    "lazy_head": (lazy_head, True),
    "self_freezing": (self_freezing, True),
    "int_hash": (int_hash, False),
    "bool_logic": (bool_logic, False),
    "nested_outputs": (nested_outputs, True),
}
