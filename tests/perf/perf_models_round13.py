"""Thirteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round13*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round13.py:ridge --device cpu --train

The families rounds 1-12 leave out: a Barlow Twins loss (cross-correlation of two batch-normalised views, its diagonal
and off-diagonal terms); a Gaussian-process marginal likelihood (Cholesky, cholesky_solve, the log-determinant from
the factor's diagonal); a closed-form ridge-regression head (R2D2: torch.linalg.solve of the support's Gram matrix);
a ShuffleNetV2 downsampling unit (depthwise stride-2 convolution, average pool, nn.ChannelShuffle); a straight-through
hard Gumbel-softmax codebook; a gradient-reversal layer (a custom autograd.Function, DANN); a convolution written as
im2col (F.unfold) and a matmul, with a transposed one by F.fold; an STFT mask vocoder through torch.istft; a WGAN-GP
critic whose gradient penalty takes autograd.grad(create_graph=True) of a convolution (double backward); SDPA with a
boolean mask, enable_gqa and scale, in eval (the fused CPU kernel) and with dropout in training (the math path);
LSTMCell, GRUCell and RNNCell stepped by a Python loop; ZCA whitening by eigh with QR and SVD heads; graph
aggregation by index_reduce_ (amax, mean) and scatter_reduce (prod); dilated, reflect-padded, transposed, grouped and
channels-last convolutions with dilated ceil-mode and adaptive max pools; LLaMA's complex rotary embedding
(view_as_complex); a three-operand einsum with trace and diagonal einsums; and a spatial transformer sampling
bicubic and nearest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# Barlow Twins: rows, input width, embedding width, off-diagonal weight
BT_ROWS, BT_IN, BT_DIM, BT_LAMBDA = 6, 5, 4, 5e-3
# Gaussian process: points, input width, feature width
GP_POINTS, GP_IN, GP_FEAT = 7, 3, 4
# ridge head: support rows, query rows, input width, feature width, classes, ridge
RG_SUPPORT, RG_QUERY, RG_IN, RG_FEAT, RG_CLASSES, RG_LAMBDA = 10, 4, 6, 8, 3, 0.5
# ShuffleNet unit: batch, channels (even), side
SH_BATCH, SH_C, SH_SIDE = 2, 8, 8
# Gumbel codebook: rows, input width, codes, code width, temperature
GB_ROWS, GB_IN, GB_CODES, GB_DIM, GB_TAU = 5, 4, 6, 3, 0.5
# gradient reversal: rows, input, hidden, classes, domains, reversal strength
GR_ROWS, GR_IN, GR_HIDDEN, GR_CLASSES, GR_DOMAINS, GR_LAMBDA = 5, 4, 6, 3, 2, 0.3
# im2col convolution: batch, in channels, side, out channels, kernel, channels out of the fold
IC_BATCH, IC_C, IC_SIDE, IC_OUT, IC_K, IC_FOLD = 2, 3, 6, 5, 3, 2
# vocoder: batch, samples, FFT size, hop
VC_BATCH, VC_SAMPLES, VC_FFT, VC_HOP = 2, 64, 16, 4
VC_FRAMES = 1 + VC_SAMPLES // VC_HOP  # centred: n_fft / 2 reflected on each side
VC_BINS = VC_FFT // 2 + 1
# WGAN-GP critic: batch, channels, side, conv channels, penalty weight
WG_BATCH, WG_C, WG_SIDE, WG_CONV, WG_PENALTY = 3, 2, 4, 4, 10.0
# grouped-query SDPA: batch, tokens, width, query heads, key/value heads, scale, dropout
GQ_BATCH, GQ_LEN, GQ_DIM, GQ_HEADS, GQ_KV_HEADS, GQ_SCALE, GQ_DROPOUT = 2, 5, 16, 4, 2, 0.3, 0.2
GQ_HEAD_DIM = GQ_DIM // GQ_HEADS
# recurrent cells: steps, batch, input, LSTM hidden, GRU hidden, RNN hidden
RC_STEPS, RC_BATCH, RC_IN, RC_LSTM, RC_GRU, RC_RNN = 3, 2, 3, 5, 4, 2
# whitening: rows, width
WH_ROWS, WH_DIM = 8, 6
# graph aggregation: nodes, edges' destinations, width
GA_NODES, GA_DST, GA_DIM = 3, (0, 2, 1, 0, 2, 2, 0), 4
# convolutions: batch, channels, length
CV_BATCH, CV_C, CV_LEN = 2, 4, 10
# rotary: batch, tokens, width (even), base
RP_BATCH, RP_LEN, RP_DIM, RP_BASE = 2, 6, 8, 10000.0
# einsum chain: batch, sizes of the chain (2x5)(5x6)(6x4), and the squared operand's rows and width
EC_BATCH, EC_A, EC_B, EC_C, EC_D, EC_ROWS, EC_WIDTH = 3, 2, 5, 6, 4, 4, 7
# spatial transformer: batch, side of the image, output rows and columns
ST_BATCH, ST_SIDE, ST_OUT_H, ST_OUT_W = 2, 4, 3, 5


class BarlowTwins(nn.Module):
    """Projector, batch-normalised (no affine) views, C = z1^T z2 / N (D x D): (1 - C_ii)^2 summed plus lambda times
    the squared off-diagonal (the flattened matrix without its last element, viewed (D-1, D+1), first column
    dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(BT_IN, BT_DIM)
        self.bn = nn.BatchNorm1d(BT_DIM, affine=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.bn(self.proj(x1)), self.bn(self.proj(x2))  # (N, D)
        c = z1.T @ z2 / x1.shape[0]  # (D, D)
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = c.flatten()[:-1].view(BT_DIM - 1, BT_DIM + 1)[:, 1:].pow(2).sum()
        return on + BT_LAMBDA * off


@seeded
def barlow():
    return BarlowTwins().train(), (torch.randn(BT_ROWS, BT_IN), torch.randn(BT_ROWS, BT_IN))


class GaussianProcess(nn.Module):
    """Deep-kernel GP: features, an RBF kernel from explicit squared differences (no matmul), noise on the diagonal;
    NLL = y^T K^-1 y / 2 + log det(K) / 2 by the Cholesky factor L (cholesky_solve, sum of log diag L)."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(GP_IN, GP_FEAT)
        self.log_length = nn.Parameter(torch.tensor(0.3))
        self.log_noise = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.feat(x)  # (P, F)
        sq = (h.unsqueeze(1) - h.unsqueeze(0)).pow(2).sum(-1)  # (P, P)
        k = torch.exp(-0.5 * sq / self.log_length.exp() ** 2) + self.log_noise.exp() * torch.eye(x.shape[0])
        chol = torch.linalg.cholesky(k)
        alpha = torch.cholesky_solve(y, chol)  # (P, 1)
        return 0.5 * (y * alpha).sum() + torch.log(torch.diagonal(chol)).sum()


@seeded
def gp():
    x = torch.randn(GP_POINTS, GP_IN)
    return GaussianProcess(), (x, torch.sin(x[:, :1]))


class RidgeHead(nn.Module):
    """R2D2: features of the support and query rows; W = (Zs^T Zs + lambda I)^-1 Zs^T Y by torch.linalg.solve;
    logits Zq W."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(RG_IN, RG_FEAT)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        zs, zq = self.feat(xs), self.feat(xq)  # (S, F), (Q, F)
        gram = zs.T @ zs + RG_LAMBDA * torch.eye(RG_FEAT)  # (F, F)
        w = torch.linalg.solve(gram, zs.T @ ys)  # (F, C)
        return zq @ w


@seeded
def ridge():
    ys = F.one_hot(torch.arange(RG_SUPPORT) % RG_CLASSES, RG_CLASSES).float()
    return RidgeHead(), (torch.randn(RG_SUPPORT, RG_IN), ys, torch.randn(RG_QUERY, RG_IN))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2-style downsampling: half the channels average-pooled (3x3, stride 2) and repeated, the whole
    input through a depthwise 3x3 stride-2 convolution, BatchNorm and a pointwise convolution; concatenated and
    shuffled in 2 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(SH_C, SH_C, 3, stride=2, padding=1, groups=SH_C, bias=False)
        self.bn = nn.BatchNorm2d(SH_C)
        self.pw = nn.Conv2d(SH_C, SH_C, 1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half, _ = x.chunk(2, dim=1)
        pooled = F.avg_pool2d(half, 3, 2, 1).repeat(1, 2, 1, 1)  # (B, C, S/2, S/2)
        return self.shuffle(torch.cat([pooled, self.pw(self.bn(self.dw(x)))], 1))  # (B, 2C, S/2, S/2)


@seeded
def shufflenet():
    return ShuffleUnit().train(), torch.randn(SH_BATCH, SH_C, SH_SIDE, SH_SIDE)


class GumbelCodebook(nn.Module):
    """Logits over codes, a hard Gumbel-softmax (one-hot forward, soft gradient), the picked code vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Linear(GB_IN, GB_CODES)
        self.codebook = nn.Parameter(torch.randn(GB_CODES, GB_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = F.gumbel_softmax(self.logits(x), tau=GB_TAU, hard=True)  # (N, K), one-hot
        return pick @ self.codebook  # (N, D)


@seeded
def gumbel():
    return GumbelCodebook(), torch.randn(GB_ROWS, GB_IN)


class ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient times -lambda backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


class DomainAdversarial(nn.Module):
    """DANN: shared features, a label head, and a domain head behind the gradient-reversal layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(GR_IN, GR_HIDDEN)
        self.label = nn.Linear(GR_HIDDEN, GR_CLASSES)
        self.domain = nn.Linear(GR_HIDDEN, GR_DOMAINS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.features(x))
        return self.label(h), self.domain(ReverseGrad.apply(h, GR_LAMBDA))


@seeded
def dann():
    return DomainAdversarial(), torch.randn(GR_ROWS, GR_IN)


class Im2colConv(nn.Module):
    """A 3x3 'same' convolution as F.unfold (im2col) and a matmul, then a transposed one as a matmul to columns and
    F.fold (col2im: the overlapping columns added into their pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(IC_OUT, IC_C * IC_K * IC_K) / IC_K)
        self.v = nn.Parameter(torch.randn(IC_FOLD * IC_K * IC_K, IC_OUT) / IC_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, IC_K, padding=IC_K // 2)  # (B, C*k*k, L)
        y = self.w @ cols  # (B, OUT, L)
        return F.fold(self.v @ y, (IC_SIDE, IC_SIDE), IC_K, padding=IC_K // 2)  # (B, FOLD, S, S)


@seeded
def im2col():
    return Im2colConv(), torch.randn(IC_BATCH, IC_C, IC_SIDE, IC_SIDE)


class MaskVocoder(nn.Module):
    """STFT (Hann, centred), a linear map of the magnitudes per frame (ReLU), the phases kept (polar), inverse STFT
    to the input's length."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = nn.Linear(VC_BINS, VC_BINS)
        self.register_buffer("window", torch.hann_window(VC_FFT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, VC_FFT, hop_length=VC_HOP, window=self.window, return_complex=True)  # (B, bins, T)
        mag = F.relu(self.mask(spec.abs().transpose(1, 2))).transpose(1, 2)
        return torch.istft(torch.polar(mag, spec.angle()), VC_FFT, hop_length=VC_HOP, window=self.window,
                           length=x.shape[-1])


@seeded
def vocoder():
    return MaskVocoder(), torch.randn(VC_BATCH, VC_SAMPLES)


class GradientPenaltyCritic(nn.Module):
    """WGAN-GP: the critic's mean score on random interpolates of real and fake images plus the penalty
    (||d critic / d x||_2 - 1)^2, its gradient taken with create_graph=True (a training step differentiates it
    again)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(WG_C, WG_CONV, 3, padding=1)
        self.score = nn.Linear(WG_CONV * WG_SIDE * WG_SIDE, 1)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        eps = torch.rand(real.shape[0], 1, 1, 1)
        x = (eps * real + (1 - eps) * fake).requires_grad_(True)
        out = self.score(F.leaky_relu(self.conv(x), 0.2).flatten(1))  # (B, 1)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out.mean() + WG_PENALTY * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@seeded
def wgan_gp():
    shape = (WG_BATCH, WG_C, WG_SIDE, WG_SIDE)
    return GradientPenaltyCritic(), (torch.randn(shape), torch.randn(shape))


class GroupedQueryAttention(nn.Module):
    """Queries of GQ_HEADS heads, keys and values of GQ_KV_HEADS, through F.scaled_dot_product_attention with a
    boolean mask, enable_gqa and an explicit scale; dropout in training. ``math`` pins the math backend."""

    def __init__(self, math: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(GQ_DIM, GQ_DIM)
        self.kv = nn.Linear(GQ_DIM, 2 * GQ_KV_HEADS * GQ_HEAD_DIM)
        self.math = math

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, GQ_HEADS, GQ_HEAD_DIM).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv(x).view(b, n, GQ_KV_HEADS, 2 * GQ_HEAD_DIM).transpose(1, 2).chunk(2, -1)  # (B, Hkv, N, D)
        drop = GQ_DROPOUT if self.training else 0.0
        if self.math:
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=GQ_SCALE,
                                                   enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=GQ_SCALE,
                                               enable_gqa=True)
        return o.transpose(1, 2).reshape(b, n, GQ_DIM)


def gqa_mask() -> torch.Tensor:
    return torch.ones(GQ_LEN, GQ_LEN, dtype=torch.bool).tril()  # True: attend


@seeded
def gqa_eval():
    return GroupedQueryAttention().eval(), (torch.randn(GQ_BATCH, GQ_LEN, GQ_DIM), gqa_mask())


@seeded
def gqa_dropout():
    return GroupedQueryAttention().train(), (torch.randn(GQ_BATCH, GQ_LEN, GQ_DIM), gqa_mask())


@seeded
def gqa_math():
    return GroupedQueryAttention(math=True).eval(), (torch.randn(GQ_BATCH, GQ_LEN, GQ_DIM), gqa_mask())


class StackedCells(nn.Module):
    """LSTMCell -> GRUCell -> RNNCell (ReLU), stepped over time by a Python loop; the RNN cell starts from None."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(RC_IN, RC_LSTM)
        self.gru = nn.GRUCell(RC_LSTM, RC_GRU)
        self.rnn = nn.RNNCell(RC_GRU, RC_RNN, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, B, I)
        h = c = x.new_zeros(x.shape[1], RC_LSTM)
        g, r = x.new_zeros(x.shape[1], RC_GRU), None
        for t in range(x.shape[0]):
            h, c = self.lstm(x[t], (h, c))
            g = self.gru(h, g)
            r = self.rnn(g, r)
        return r


@seeded
def cells():
    return StackedCells(), torch.randn(RC_STEPS, RC_BATCH, RC_IN)


class Whitening(nn.Module):
    """ZCA whitening by eigh of the covariance (Q diag(L^-1/2) Q^T), a QR head and a thin SVD head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WH_DIM, WH_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # (N, F)
        vals, vecs = torch.linalg.eigh(h.T @ h / x.shape[0] + 0.1 * torch.eye(WH_DIM))
        zca = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
        q, r = torch.linalg.qr(h)
        u, s, vh = torch.linalg.svd(h, full_matrices=False)
        return (h @ zca).sum() + q.sum() + r.sum() + s.sum() + (u @ vh).sum()


@seeded
def whitening():
    return Whitening(), torch.randn(WH_ROWS, WH_DIM)


class GraphReduce(nn.Module):
    """Edge messages aggregated per destination node: max (index_reduce_, in place, the node's own value left out),
    mean (index_reduce, out of place) and product (scatter_reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.msg = nn.Linear(GA_DIM, GA_DIM)

    def forward(self, x: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        m = self.msg(x)  # (E, F)
        top = torch.zeros(GA_NODES, GA_DIM).index_reduce_(0, dst, m, "amax", include_self=False)
        mean = torch.zeros(GA_NODES, GA_DIM).index_reduce(0, dst, m, "mean", include_self=True)
        prod = torch.ones(GA_NODES, GA_DIM).scatter_reduce(0, dst[:, None].expand(-1, GA_DIM), m, "prod",
                                                            include_self=False)
        return top + mean + prod


@seeded
def graph_reduce():
    return GraphReduce(), (torch.randn(len(GA_DST), GA_DIM), torch.tensor(GA_DST))


class OddConvolutions(nn.Module):
    """Conv1d 'same' with an even kernel, dilation 3 and reflect padding; a grouped, dilated, strided ConvTranspose1d
    with output_padding; a grouped dilated channels-last Conv2d; a dilated ceil-mode max pool with indices and an
    adaptive max pool with overlapping windows."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv1d(CV_C, 6, 4, padding="same", dilation=3, padding_mode="reflect")
        self.up = nn.ConvTranspose1d(6, CV_C, 3, stride=3, dilation=2, output_padding=1, groups=2)
        self.wide = nn.Conv2d(CV_C, 8, 3, dilation=2, groups=CV_C, padding=2).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.same(x))  # (B, C, L_up)
        image = y.unsqueeze(-1).expand(-1, -1, -1, 5).contiguous(memory_format=torch.channels_last)
        y2 = self.wide(image)  # (B, 8, L_up, 5)
        pooled, _ = F.max_pool1d(y, 3, 2, dilation=2, ceil_mode=True, return_indices=True)
        return pooled.sum() + F.adaptive_max_pool2d(y2, (3, 2)).sum()


CV_UP_LEN = (CV_LEN - 1) * 3 + 2 * (3 - 1) + 1 + 1  # transposed: (L - 1) stride + dilation (k - 1) + 1 + out pad


@seeded
def convolutions():
    return OddConvolutions(), torch.randn(CV_BATCH, CV_C, CV_LEN)


class ComplexRotary(nn.Module):
    """LLaMA's reference rotary embedding: pairs of features as complex numbers times e^(i t theta_j)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(RP_DIM, RP_DIM)
        theta = 1.0 / RP_BASE ** (torch.arange(0, RP_DIM, 2).float() / RP_DIM)
        angles = torch.outer(torch.arange(RP_LEN).float(), theta)  # (N, D/2)
        self.register_buffer("cis", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (B, N, D)
        pairs = torch.view_as_complex(h.reshape(*h.shape[:-1], RP_DIM // 2, 2))  # (B, N, D/2) complex
        return torch.view_as_real(pairs * self.cis).flatten(2)


@seeded
def rotary():
    return ComplexRotary(), torch.randn(RP_BATCH, RP_LEN, RP_DIM)


class EinsumChain(nn.Module):
    """A three-operand einsum (contracted left to right, the cheaper order at these sizes), x x^T per batch, its
    trace ('bii->b') and diagonal ('bii->bi'), an outer product ('i,j->ij') and a row-wise dot ('bij,bij->b')."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(EC_BATCH, EC_A, EC_B))
        self.b = nn.Parameter(torch.randn(EC_BATCH, EC_B, EC_C))
        self.c = nn.Parameter(torch.randn(EC_BATCH, EC_C, EC_D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = torch.einsum("bij,bjk,bkl->bil", self.a, self.b, self.c)
        gram = torch.einsum("bij,bkj->bik", x, x)  # (B, R, R)
        trace = torch.einsum("bii->b", gram)
        outer = torch.einsum("i,j->ij", trace, trace)
        return (chain.sum() + torch.einsum("bii->bi", gram).sum() + outer.sum()
                + torch.einsum("bij,bij->b", x, x).sum())


@seeded
def einsum_chain():
    return EinsumChain(), torch.randn(EC_BATCH, EC_ROWS, EC_WIDTH)


class SpatialTransformer(nn.Module):
    """A localisation net predicts an affine map; the image resampled on its grid, bicubic with border padding plus
    nearest with reflection."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(ST_SIDE * ST_SIDE, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, (x.shape[0], 1, ST_OUT_H, ST_OUT_W), align_corners=False)
        return (F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
                + F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=True))


@seeded
def spatial_transformer():
    return SpatialTransformer(), torch.randn(ST_BATCH, 1, ST_SIDE, ST_SIDE)


MODELS = {
    "barlow": (barlow, True),
    "gp": (gp, True),
    "ridge": (ridge, True),
    "shufflenet": (shufflenet, True),
    "gumbel": (gumbel, True),
    "dann": (dann, True),
    "im2col": (im2col, True),
    "vocoder": (vocoder, True),
    "wgan_gp": (wgan_gp, True),
    "gqa_eval": (gqa_eval, True),
    "gqa_dropout": (gqa_dropout, True),
    "gqa_math": (gqa_math, False),
    "cells": (cells, True),
    "whitening": (whitening, True),
    "graph_reduce": (graph_reduce, True),
    "convolutions": (convolutions, True),
    "rotary": (rotary, True),
    "einsum_chain": (einsum_chain, True),
    "spatial_transformer": (spatial_transformer, True),
}
