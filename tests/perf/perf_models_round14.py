"""Fourteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round14*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round14.py:bags --device cpu --train

The families rounds 1-13 leave out, or leave out together: a depthwise-separable dilated Conv1d with a transposed
Conv1d, a grouped strided Conv3d and a grouped dilated ConvTranspose2d with output padding; batch, group, instance
(affine, tracking running statistics) and layer norms in one net, trained and in eval; a two-layer bidirectional GRU
(batch_first) feeding a bidirectional LSTM with a projection; nn.MultiheadAttention with kdim/vdim, a key-padding
mask, a boolean attention mask and per-head weights into a pre-norm causal TransformerDecoderLayer, returning a
dict; three EmbeddingBags (mean with a padding index, max with include_last_offset, sum with per-sample weights);
pixel shuffle and unshuffle, nearest, nearest-exact, bilinear (align_corners) and linear upsampling, a max pool
with indices undone by max_unpool2d and an adaptive average pool of overlapping windows; einsum bilinear and
attention with addbmm, baddbmm (beta 0) and addr; rfft / irfft / fft2 / hfft; a top-2 mixture of experts routing
tokens by the data (index_add back); views and in-place ops that share memory with what they are added to; a
channels-last bf16 convnet and an fp16 MLP; a torch.compile'd block inside an eager model; a torch.library custom
op with no FLOP formula.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# separable convolutions: batch, channels, length (1-d); batch, channels, depth, height, width (3-d); (2-d)
SC_BATCH, SC_C, SC_LEN, SC_PW = 3, 4, 11, 8
SC3_SHAPE = (2, 3, 2, 6, 5)
SC2_SHAPE = (2, 4, 5, 5)
# norms: batch, channels, side
NM_BATCH, NM_C, NM_SIDE = 2, 4, 5
# recurrent: batch, steps, input, GRU hidden, LSTM hidden, LSTM projection
RN_BATCH, RN_STEPS, RN_IN, RN_GRU, RN_LSTM, RN_PROJ = 2, 5, 6, 5, 3, 2
# attention: batch, queries, keys, width, heads, key width, value width, feed-forward width
AT_BATCH, AT_LQ, AT_LK, AT_DIM, AT_HEADS, AT_KDIM, AT_VDIM, AT_FF = 2, 5, 7, 8, 2, 6, 4, 16
# bags: rows of the tables, width
BG_ROWS, BG_DIM = 20, 4
BG_INDICES = (0, 3, 4, 0, 5, 6, 7, 0, 9)  # 0 is the mean bag's padding index
BG_OFFSETS = (0, 2, 2, 5)  # an empty bag at 2
BG_SUM_SHAPE = (3, 4)
# resampling: batch, channels, height, width
RS_BATCH, RS_C, RS_H, RS_W = 2, 2, 3, 4
# einsum products
EP_BATCH, EP_OUT, EP_I = 2, 5, 3  # bilinear: i == j, so either contraction order costs the same
EP_BMM = (2, 4, 6, 3)  # batches, rows, inner, columns
EP_ATT = (1, 2, 3, 5)  # batch, heads, tokens, head width
# spectral: rows, samples
SP_ROWS, SP_LEN, SP_IRFFT_N, SP_HFFT_N = 3, 16, 8, 6
SP_FFT2 = (4, 16)
# mixture of experts: tokens, width, hidden, experts, experts per token
MO_TOKENS, MO_DIM, MO_HIDDEN, MO_EXPERTS, MO_TOP = 10, 6, 8, 4, 2
# half precision: batch, channels, side, conv channels, classes; MLP rows, in, hidden, out
HP_BATCH, HP_C, HP_SIDE, HP_CONV, HP_CLASSES = 2, 3, 6, 8, 5
HM_ROWS, HM_IN, HM_HIDDEN, HM_OUT = 3, 8, 16, 4
# compiled block: rows, in, hidden
CB_ROWS, CB_IN, CB_HIDDEN = 4, 8, 16


class Separable(nn.Module):
    """A dilated depthwise + pointwise Conv1d into a strided ConvTranspose1d; a grouped, strided Conv3d without bias;
    a grouped, dilated ConvTranspose2d with output padding."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(SC_C, SC_C, 5, groups=SC_C, dilation=2, padding=4)
        self.pointwise = nn.Conv1d(SC_C, SC_PW, 1)
        self.up1 = nn.ConvTranspose1d(SC_PW, 2, 4, stride=3)
        self.conv3 = nn.Conv3d(3, 6, (1, 3, 3), groups=3, padding=(0, 1, 1), stride=(1, 2, 1), bias=False)
        self.up2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)

    def forward(self, x1, x3, x2):
        return self.up1(self.pointwise(self.depthwise(x1))), self.conv3(x3), self.up2(x2)


@seeded
def separable():
    return Separable(), (torch.randn(SC_BATCH, SC_C, SC_LEN), torch.randn(*SC3_SHAPE), torch.randn(*SC2_SHAPE))


class Norms(nn.Module):
    """Batch, group, instance (affine, tracking running statistics) and layer (no affine) norms of one input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(NM_C)
        self.gn = nn.GroupNorm(2, NM_C)
        self.inorm = nn.InstanceNorm2d(NM_C, affine=True, track_running_stats=True)
        self.ln = nn.LayerNorm([NM_SIDE, NM_SIDE], elementwise_affine=False)

    def forward(self, x):
        return self.bn(x) + self.gn(x) + self.inorm(x) + self.ln(x)


@seeded
def norms():
    return Norms(), (torch.randn(NM_BATCH, NM_C, NM_SIDE, NM_SIDE),)


class BiRnn(nn.Module):
    """A two-layer bidirectional GRU (batch first) into a bidirectional LSTM with a projection (time first)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(RN_IN, RN_GRU, num_layers=2, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(2 * RN_GRU, RN_LSTM, proj_size=RN_PROJ, bidirectional=True)

    def forward(self, x):
        a, h = self.gru(x)
        b, (hl, cl) = self.lstm(a.transpose(0, 1))
        return b, h, cl


@seeded
def birnn():
    return BiRnn(), (torch.randn(RN_BATCH, RN_STEPS, RN_IN),)


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention (batch first, kdim/vdim, key-padding and boolean attention masks, per-head weights)
    into a pre-norm TransformerDecoderLayer with a causal mask; returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(AT_DIM, AT_HEADS, batch_first=True, kdim=AT_KDIM, vdim=AT_VDIM)
        self.decoder = nn.TransformerDecoderLayer(AT_DIM, AT_HEADS, AT_FF, dropout=0.0, batch_first=True,
                                                  norm_first=True)

    def forward(self, q, k, v, padding, mask):
        o, w = self.attn(q, k, v, key_padding_mask=padding, attn_mask=mask, average_attn_weights=False)
        causal = nn.Transformer.generate_square_subsequent_mask(AT_LQ)
        return {"y": self.decoder(o, q, tgt_mask=causal, tgt_is_causal=True), "weights": w}


@seeded
def masked_attention():
    padding = torch.zeros(AT_BATCH, AT_LK, dtype=torch.bool)
    padding[1, 5:] = True
    mask = torch.zeros(AT_LQ, AT_LK, dtype=torch.bool)
    mask[0, 3:] = True
    return MaskedAttention(), (torch.randn(AT_BATCH, AT_LQ, AT_DIM), torch.randn(AT_BATCH, AT_LK, AT_KDIM),
                               torch.randn(AT_BATCH, AT_LK, AT_VDIM), padding, mask)


class Bags(nn.Module):
    """EmbeddingBag in mean mode with a padding index, in max mode with include_last_offset, in sum mode with
    per-sample weights over 2-d bags."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(BG_ROWS, BG_DIM, mode="mean", padding_idx=0)
        self.max = nn.EmbeddingBag(BG_ROWS, BG_DIM, mode="max", include_last_offset=True)
        self.sum = nn.EmbeddingBag(BG_ROWS, BG_DIM, mode="sum")

    def forward(self, indices, offsets, last_offsets, bags, weights):
        return self.mean(indices, offsets), self.max(indices, last_offsets), self.sum(bags, per_sample_weights=weights)


@seeded
def bags():
    indices = torch.tensor(BG_INDICES)
    offsets = torch.tensor(BG_OFFSETS)
    last = torch.tensor((*BG_OFFSETS, len(BG_INDICES)))
    return Bags(), (indices, offsets, last, torch.randint(0, BG_ROWS, BG_SUM_SHAPE), torch.rand(*BG_SUM_SHAPE))


class Resampler(nn.Module):
    """A 1x1 convolution, pixel shuffle, nearest (x1.5), bilinear (align_corners, to a size), nearest-exact (x2) and
    linear (x3) upsampling, pixel unshuffle; a max pool with indices undone by max_unpool2d; an adaptive average pool
    of overlapping windows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(RS_C, 4 * RS_C, 1)

    def forward(self, x):
        y = F.pixel_shuffle(self.conv(x), 2)  # (N, C, 2H, 2W)
        a = F.interpolate(y, scale_factor=1.5, mode="nearest")
        b = F.interpolate(y, size=(5, 7), mode="bilinear", align_corners=True)
        c = F.interpolate(y, scale_factor=2, mode="nearest-exact")
        d = F.interpolate(x.flatten(2), scale_factor=3, mode="linear")
        e = F.pixel_unshuffle(y, 2)
        pooled, where = F.max_pool2d(y, 2, return_indices=True)
        f = F.max_unpool2d(pooled, where, 2, output_size=y.shape[-2:])
        g = F.adaptive_avg_pool2d(y, (4, 5))
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum() + g.sum()


@seeded
def resampler():
    return Resampler(), (torch.randn(RS_BATCH, RS_C, RS_H, RS_W),)


class EinsumProducts(nn.Module):
    """A bilinear form by einsum, addbmm (beta, alpha), baddbmm with beta 0, attention scores by einsum, addr."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(EP_OUT, EP_I, EP_I))
        b, n, k, m = EP_BMM
        self.R = nn.Parameter(torch.randn(b, k, m))

    def forward(self, a, c, z, u, v):
        b, n, k, m = EP_BMM
        bil = torch.einsum("bi,oij,bj->bo", a, self.W, a)
        summed = torch.addbmm(torch.ones(n, m), c, self.R, beta=0.5, alpha=2.0)
        batched = torch.baddbmm(torch.zeros(b, n, m), c, self.R, beta=0.0)
        scores = torch.einsum("bhqd,bhkd->bhqk", z, z).softmax(-1)
        outer = torch.addr(torch.zeros(u.shape[0], v.shape[0]), u, v)
        return bil, summed, batched, scores, outer


@seeded
def einsum_products():
    b, n, k, m = EP_BMM
    return EinsumProducts(), (torch.randn(EP_BATCH, EP_I), torch.randn(b, n, k), torch.randn(*EP_ATT),
                              torch.randn(4), torch.randn(3))


class Spectral(nn.Module):
    """rfft (ortho), irfft to n of the power spectrum, fft2 of a complex signal, hfft."""

    def forward(self, x, s):
        a = torch.fft.rfft(x, dim=-1, norm="ortho")
        b = torch.fft.irfft(a * a.conj(), n=SP_IRFFT_N, dim=-1)
        c = torch.fft.fft2(s)
        e = torch.fft.hfft(a, n=SP_HFFT_N)
        return b, torch.view_as_real(c), e


@seeded
def spectral():
    return Spectral(), (torch.randn(SP_ROWS, SP_LEN), torch.randn(*SP_FFT2, dtype=torch.complex64))


class TopTwoMoE(nn.Module):
    """A softmax gate, top-2 experts per token, each expert's MLP on the tokens routed to it (a data-dependent
    count), its output weighted by the gate and added back with index_add."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(MO_DIM, MO_EXPERTS, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(MO_DIM, MO_HIDDEN), nn.ReLU(), nn.Linear(MO_HIDDEN, MO_DIM))
            for _ in range(MO_EXPERTS))

    def routes(self, x):
        probs = self.gate(x).softmax(-1)
        return probs.topk(MO_TOP, dim=-1)

    def forward(self, x):
        weight, chosen = self.routes(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out = out.index_add(0, token, expert(x[token]) * weight[token, slot].unsqueeze(-1))
        return out


@seeded
def moe():
    return TopTwoMoE(), (torch.randn(MO_TOKENS, MO_DIM),)


class SharedMemory(nn.Module):
    """Ops whose operands share memory: a row expanded over the matrix it came from, added to it; a row times a
    column of one square matrix; an in-place multiply of a column slice; an in-place transpose; overlapping
    as_strided windows; where and masked_fill over one input."""

    def forward(self, x, sq):
        spread = x[:1].expand_as(x) + x
        cross = sq[:, 0] * sq[0, :]
        y = x.clone()
        y[:, :2].mul_(2.0)
        y.t_()
        windows = y.as_strided((5, 4), (2, 1)).exp()
        picked = torch.where(x > 0, x, x[:1])
        filled = x.masked_fill(x < 0, 0.0)
        return spread, cross, windows, picked, filled


@seeded
def shared_memory():
    return SharedMemory(), (torch.randn(8, 6), torch.randn(6, 6))


@seeded
def bf16_convnet():
    model = nn.Sequential(nn.Conv2d(HP_C, HP_CONV, 3, padding=1), nn.BatchNorm2d(HP_CONV), nn.ReLU(), nn.Flatten(),
                          nn.Linear(HP_CONV * HP_SIDE * HP_SIDE, HP_CLASSES))
    model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(HP_BATCH, HP_C, HP_SIDE, HP_SIDE, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    return model, (x,)


@seeded
def fp16_mlp():
    model = nn.Sequential(nn.Linear(HM_IN, HM_HIDDEN), nn.GELU(), nn.LayerNorm(HM_HIDDEN), nn.Linear(HM_HIDDEN, HM_OUT))
    return model.half(), (torch.randn(HM_ROWS, HM_IN).half(),)


class MlpBlock(nn.Module):
    """The compiled block: a class of its own, so that the code object dynamo compiles (and may mark to skip, where
    a dispatch mode such as torch's FlopCounterMode meets it) is no other test's nn.Sequential.forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(CB_HIDDEN, CB_HIDDEN), nn.Linear(CB_HIDDEN, CB_IN)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class CompiledBlock(nn.Module):
    """An eager linear, a torch.compile'd MLP (backend eager: dynamo's graph, no code generation), an eager ReLU."""

    def __init__(self, compiled: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(CB_IN, CB_HIDDEN)
        block = MlpBlock()
        self.block = torch.compile(block, backend="eager") if compiled else block

    def forward(self, x):
        return self.block(self.inp(x)).relu()


@seeded
def compiled_block():
    return CompiledBlock(), (torch.randn(CB_ROWS, CB_IN),)


@seeded
def eager_block():
    return CompiledBlock(compiled=False), (torch.randn(CB_ROWS, CB_IN),)


@torch.library.custom_op("tilestack_r14::soft_threshold", mutates_args=())
def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """A custom op tilestack has no FLOP formula for: sign(x) * max(|x| - t, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


@soft_threshold.register_fake
def _(x, t):
    return torch.empty_like(x)


class CustomHead(nn.Module):
    """A linear layer and a custom op with no FLOP formula."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return soft_threshold(self.fc(x), 0.1)


@seeded
def custom_head():
    return CustomHead(), (torch.randn(4, 6),)


MODELS = {
    "separable": (separable, True),
    "norms": (norms, True),
    "birnn": (birnn, True),
    "masked_attention": (masked_attention, True),
    "bags": (bags, True),
    "resampler": (resampler, True),
    "einsum_products": (einsum_products, True),
    "spectral": (spectral, False),
    "moe": (moe, True),
    "shared_memory": (shared_memory, False),
    "bf16_convnet": (bf16_convnet, True),
    "fp16_mlp": (fp16_mlp, True),
    "compiled_block": (compiled_block, True),
    "custom_head": (custom_head, False),
}
