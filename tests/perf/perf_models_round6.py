"""A sixth round of models the profiler was not written against (tests/perf/test_profile_unseen_round6.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round6.py:grouped_moe --device cpu --train

Each builder returns ``(model, inputs)``. The families are those rounds 1-5 leave out: a dropless top-k mixture of
experts on torch's grouped GEMM (tokens sorted by expert, bincount offsets, F.grouped_mm in bf16), a
quantization-aware-trained convnet (fused moving-average observers and fake quantization), T5 attention with
bucketed relative position biases in float64, nn.Transformer as an encoder-decoder with padding and causal masks,
WaveNet (dilated causal Conv1d, gated tanh-sigmoid units, residual and skip 1x1 convolutions), DLRM (EmbeddingBag
sum and max over offsets, a sparse-gradient embedding, the pairwise dot interaction), a GIN graph net (scatter_add_,
an accumulating index_put_ for the degrees, BatchNorm1d, a graph readout by index_add_), Mamba-2's SSD in its
quadratic form (cumsum segment sums, a masked exp decay, einsums), a linear-chain CRF's log-likelihood (the forward
algorithm by logsumexp, the gold path by gather), nn.AdaptiveLogSoftmaxWithLoss, orthogonally parametrized linears
(matrix_exp, Cayley, Householder maps), custom autograd Functions (a hand-written backward, an in-place forward
marked dirty), a torch.compile'd submodule, a nucleus sampling head and per-sample gradients (vmap of grad).
Sizes are tiny: what is checked is the counting, not the speed.
"""

from __future__ import annotations

import math
import warnings

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH = 2
# Grouped MoE: tokens, width, expert hidden width, experts, experts per token (widths: 16-byte bf16 rows)
GM_TOKENS, GM_DIM, GM_HIDDEN, GM_EXPERTS, GM_TOP_K = 8, 16, 24, 4, 2
# QAT convnet: channels, image side, classes
QAT_CH, QAT_SIDE, QAT_CLASSES = 4, 8, 3
# T5: tokens, width, heads, FF width, relative buckets, max distance
T5_TOKENS, T5_DIM, T5_HEADS, T5_FF, T5_BUCKETS, T5_MAX_DISTANCE = 6, 16, 2, 24, 8, 16
# Seq2seq transformer: source and target tokens, width, heads, FF width
S2S_SRC, S2S_TGT, S2S_DIM, S2S_HEADS, S2S_FF = 5, 4, 16, 2, 32
# WaveNet: samples, residual channels, dilations, kernel, output classes
WN_SAMPLES, WN_CH, WN_DILATIONS, WN_KERNEL, WN_CLASSES = 16, 8, (1, 2, 4), 2, 6
# DLRM: dense features, embedding width, rows per table, bag offsets (lookups per sample: 2 and 3)
DL_DENSE, DL_DIM, DL_ROWS, DL_BAG_LENGTHS = 4, 8, 20, (2, 3)
DL_FEATURES = 4  # the dense vector and three embeddings interact pairwise
# GIN: nodes, edges, features, graphs
GIN_NODES, GIN_EDGES, GIN_FEAT, GIN_GRAPHS = 7, 12, 8, 2
# SSD: tokens, width, heads, head width, state size
SSD_LEN, SSD_DIM, SSD_HEADS, SSD_HEAD_DIM, SSD_STATE = 8, 16, 2, 8, 4
# CRF: tokens, features, tags
CRF_LEN, CRF_FEAT, CRF_TAGS = 5, 6, 4
# Adaptive softmax: rows, width, classes, cutoffs, the projection's divisor, the targets (two per cluster)
AS_ROWS, AS_DIM, AS_CLASSES, AS_CUTOFFS, AS_DIV = 6, 8, 20, (6, 12), 2.0
AS_TARGETS = (0, 3, 7, 11, 13, 19)
# Orthogonal: width
OR_DIM = 6
# Custom Function: rows, width in, width out
CF_ROWS, CF_IN, CF_OUT = 4, 8, 5
# Compiled block: rows, width, hidden
CB_ROWS, CB_DIM, CB_HIDDEN = 4, 8, 16
# Sampler: rows, width, vocabulary, temperature, nucleus mass
NS_ROWS, NS_DIM, NS_VOCAB, NS_TEMPERATURE, NS_TOP_P = 3, 8, 32, 0.7, 0.9
# Per-sample gradients: samples, width, classes
PS_SAMPLES, PS_IN, PS_CLASSES = 5, 4, 3


class GroupedMoE(nn.Module):
    """Dropless top-k routing on grouped GEMMs: each token's K experts; the (token, expert) pairs sorted by expert
    (a stable argsort), the per-expert counts (bincount) cumulated into int32 group offsets, two F.grouped_mm with
    SiLU between, the rows weighted by their gates and added back to their tokens (index_add_). bf16 throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(GM_DIM, GM_EXPERTS, bias=False)
        self.w_in = nn.Parameter(torch.randn(GM_EXPERTS, GM_DIM, GM_HIDDEN) / GM_DIM**0.5)
        self.w_out = nn.Parameter(torch.randn(GM_EXPERTS, GM_HIDDEN, GM_DIM) / GM_HIDDEN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D)
        gate, expert = self.router(x).float().softmax(-1).topk(GM_TOP_K, -1)  # (T, K) each
        order = expert.flatten().argsort(stable=True)  # (T K,): pairs grouped by expert
        token = order // GM_TOP_K
        offsets = torch.bincount(expert.flatten(), minlength=GM_EXPERTS).cumsum(0).to(torch.int32)  # (E,)
        h = F.silu(F.grouped_mm(x[token], self.w_in, offs=offsets))  # (T K, H)
        y = F.grouped_mm(h, self.w_out, offs=offsets) * gate.flatten()[order, None].to(x.dtype)  # (T K, D)
        return torch.zeros_like(x).index_add_(0, token, y)


class QatConvNet(nn.Module):
    """A convnet prepared for quantization-aware training (x86 default QAT config): every activation and weight
    passes a fused moving-average min-max observer and fake quantizer (per tensor for activations, per channel
    for weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, QAT_CH, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(QAT_CH * (QAT_SIDE - 2) ** 2, QAT_CLASSES)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S)
        return self.dequant(self.fc(self.relu(self.conv(self.quant(x))).flatten(1)))


def t5_buckets(n: int, buckets: int, max_distance: int) -> torch.Tensor:
    """(n, n) bucket of each (query, key) offset, bidirectional: half the buckets per sign, exact for small
    offsets, logarithmic up to ``max_distance``."""
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, large)


class T5Block(nn.Module):
    """A T5 encoder block in float64: RMS layer norm (no mean, no bias), unscaled attention with a learned bias per
    relative-position bucket and head, a gated-GELU feed-forward."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(T5_DIM, T5_DIM, bias=False) for _ in range(4))
        self.rel_bias = nn.Embedding(T5_BUCKETS, T5_HEADS)
        self.norm1, self.norm2 = nn.Parameter(torch.ones(T5_DIM)), nn.Parameter(torch.ones(T5_DIM))
        self.wi_0, self.wi_1 = nn.Linear(T5_DIM, T5_FF, bias=False), nn.Linear(T5_DIM, T5_FF, bias=False)
        self.wo = nn.Linear(T5_FF, T5_DIM, bias=False)
        self.register_buffer("buckets", t5_buckets(T5_TOKENS, T5_BUCKETS, T5_MAX_DISTANCE))

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
        return x.unflatten(-1, (T5_HEADS, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        h = self._rms(x, self.norm1)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        bias = self.rel_bias(self.buckets).permute(2, 0, 1)  # (heads, N, N)
        attn = (q @ k.transpose(-1, -2) + bias).softmax(-1)  # (B, heads, N, N)
        x = x + self.o((attn @ v).transpose(1, 2).flatten(2))
        h = self._rms(x, self.norm2)
        return x + self.wo(F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h))


class Seq2Seq(nn.Module):
    """nn.Transformer, one encoder and one decoder layer: padded source tokens masked out of both attentions that
    read them, the target causally masked."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(S2S_DIM, S2S_HEADS, 1, 1, S2S_FF, dropout=0.0, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_padding: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        return self.t(src, tgt, tgt_mask=causal, src_key_padding_mask=src_padding,
                      memory_key_padding_mask=src_padding)


class WaveNet(nn.Module):
    """WaveNet: a 1x1 input convolution, dilated causal convolutions (left-padded) into gated tanh * sigmoid
    units, residual and skip 1x1 convolutions, ReLU and a 1x1 output convolution over the summed skips."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, WN_CH, 1)
        self.dilated = nn.ModuleList(nn.Conv1d(WN_CH, 2 * WN_CH, WN_KERNEL, dilation=d) for d in WN_DILATIONS)
        self.res = nn.ModuleList(nn.Conv1d(WN_CH, WN_CH, 1) for _ in WN_DILATIONS)
        self.skip = nn.ModuleList(nn.Conv1d(WN_CH, WN_CH, 1) for _ in WN_DILATIONS)
        self.out = nn.Conv1d(WN_CH, WN_CLASSES, 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # (B, 1, T)
        x, skips = self.inp(audio), 0
        for conv, res, skip, d in zip(self.dilated, self.res, self.skip, WN_DILATIONS, strict=True):
            filt, gate = conv(F.pad(x, (d * (WN_KERNEL - 1), 0))).chunk(2, 1)  # (B, C, T) each
            g = torch.tanh(filt) * torch.sigmoid(gate)
            x, skips = x + res(g), skips + skip(g)
        return self.out(F.relu(skips))  # (B, classes, T)


class Dlrm(nn.Module):
    """DLRM: a bottom MLP over dense features; an EmbeddingBag summing, one taking the max over bags given by
    offsets, a sparse-gradient embedding of one id; the dot product of every pair of the four vectors (bmm, the
    upper triangle picked) concatenated with the dense vector into the top MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Linear(DL_DENSE, DL_DIM)
        self.bag_sum = nn.EmbeddingBag(DL_ROWS, DL_DIM, mode="sum")
        self.bag_max = nn.EmbeddingBag(DL_ROWS, DL_DIM, mode="max")
        self.single = nn.Embedding(DL_ROWS, DL_DIM, sparse=True)
        pairs = DL_FEATURES * (DL_FEATURES - 1) // 2
        self.top = nn.Linear(DL_DIM + pairs, 1)
        self.register_buffer("pairs", torch.triu_indices(DL_FEATURES, DL_FEATURES, offset=1))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, single: torch.Tensor
                ) -> torch.Tensor:
        d = F.relu(self.bottom(dense))  # (B, E)
        z = torch.stack([d, self.bag_sum(ids, offsets), self.bag_max(ids, offsets), self.single(single)], 1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]  # (B, pairs)
        return self.top(torch.cat([d, dots], 1))  # (B, 1)


class Gin(nn.Module):
    """A GIN layer on an edge list: neighbours' features summed at each destination (scatter_add_ into zeros), the
    in-degrees by an accumulating index_put_, MLP((1 + eps) x + mean of neighbours) with BatchNorm1d, each graph's
    nodes summed (index_add_) into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.zeros(1))
        self.mlp = nn.Sequential(nn.Linear(GIN_FEAT, GIN_FEAT), nn.BatchNorm1d(GIN_FEAT), nn.ReLU(),
                                 nn.Linear(GIN_FEAT, GIN_FEAT))
        self.head = nn.Linear(GIN_FEAT, 1)

    def forward(self, x: torch.Tensor, edges: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        src, dst = edges  # (E,) each
        summed = torch.zeros_like(x).scatter_add_(0, dst[:, None].expand(-1, GIN_FEAT), x.index_select(0, src))
        degree = torch.zeros(x.shape[0], device=x.device).index_put_((dst,), torch.ones(src.shape[0]),
                                                                     accumulate=True)  # (N,)
        h = self.mlp((1 + self.eps) * x + summed / degree.clamp(min=1)[:, None])  # (N, F)
        pooled = torch.zeros(GIN_GRAPHS, GIN_FEAT, device=x.device).index_add_(0, graph, h)  # (G, F)
        return self.head(pooled)


class Ssd(nn.Module):
    """Mamba-2's state-space duality in its quadratic (attention-like) form, one chunk: dt by softplus, the
    per-head decay a = dt * A cumulated (cumsum) into segment sums exp(cs_i - cs_j) below the diagonal (-inf above,
    masked_fill), C B^T scores times the decay, applied to dt-scaled x (einsums), plus the D skip."""

    def __init__(self) -> None:
        super().__init__()
        inner = SSD_HEADS * SSD_HEAD_DIM
        self.in_proj = nn.Linear(SSD_DIM, inner + 2 * SSD_HEADS * SSD_STATE + SSD_HEADS)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, SSD_HEADS + 1, dtype=torch.float32)))
        self.dt_bias = nn.Parameter(torch.zeros(SSD_HEADS))
        self.d = nn.Parameter(torch.ones(SSD_HEADS))
        self.out_proj = nn.Linear(inner, SSD_DIM)
        self.register_buffer("causal", torch.tril(torch.ones(SSD_LEN, SSD_LEN, dtype=torch.bool)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        inner, state = SSD_HEADS * SSD_HEAD_DIM, SSD_HEADS * SSD_STATE
        x, b, c, dt = self.in_proj(u).split([inner, state, state, SSD_HEADS], -1)
        x = x.unflatten(-1, (SSD_HEADS, SSD_HEAD_DIM))  # (B, L, H, P)
        b, c = b.unflatten(-1, (SSD_HEADS, SSD_STATE)), c.unflatten(-1, (SSD_HEADS, SSD_STATE))  # (B, L, H, N)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        cs = (dt * -torch.exp(self.a_log)).transpose(1, 2).cumsum(-1)  # (B, H, L)
        segments = (cs[..., :, None] - cs[..., None, :]).masked_fill(~self.causal, -math.inf)  # (B, H, L, L)
        scores = torch.einsum("blhn,bshn->bhls", c, b) * torch.exp(segments)  # (B, H, L, L)
        y = torch.einsum("bhls,bshp->blhp", scores, x * dt[..., None])  # (B, L, H, P)
        return self.out_proj((y + x * self.d[:, None]).flatten(2))


class CrfTagger(nn.Module):
    """A linear-chain CRF over per-token emissions (a linear layer): the negative log-likelihood, log Z by the
    forward algorithm (a logsumexp over the previous tag at each step) less the gold path's score (start,
    emissions by gather, transitions by advanced indexing, end)."""

    def __init__(self) -> None:
        super().__init__()
        self.emit = nn.Linear(CRF_FEAT, CRF_TAGS)
        self.start, self.end = nn.Parameter(torch.randn(CRF_TAGS)), nn.Parameter(torch.randn(CRF_TAGS))
        self.trans = nn.Parameter(torch.randn(CRF_TAGS, CRF_TAGS))  # (from, to)

    def forward(self, x: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:  # (B, T, F), (B, T)
        em = self.emit(x)  # (B, T, K)
        alpha = self.start + em[:, 0]  # (B, K)
        for t in range(1, x.shape[1]):
            alpha = torch.logsumexp(alpha[:, :, None] + self.trans, dim=1) + em[:, t]  # (B, K)
        log_z = torch.logsumexp(alpha + self.end, -1)  # (B,)
        gold = (self.start[tags[:, 0]] + em.gather(2, tags[..., None]).squeeze(-1).sum(1)
                + self.trans[tags[:, :-1], tags[:, 1:]].sum(1) + self.end[tags[:, -1]])
        return (log_z - gold).mean()


class AdaptiveSoftmax(nn.Module):
    """nn.AdaptiveLogSoftmaxWithLoss: the head over the frequent classes and one logit per tail cluster; each
    cluster's low-rank projection and classifier run on the rows whose target falls in it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.AdaptiveLogSoftmaxWithLoss(AS_DIM, AS_CLASSES, list(AS_CUTOFFS), div_value=AS_DIV)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.head(x, target).loss


class OrthogonalMaps(nn.Module):
    """Three linears kept orthogonal by torch.nn.utils.parametrizations.orthogonal, one per map: matrix_exp (its
    cost depends on the weight's norm: reported uncounted), Cayley (a linear solve) and Householder (geqrf-style
    reflectors multiplied out)."""

    def __init__(self) -> None:
        super().__init__()
        orthogonal = nn.utils.parametrizations.orthogonal
        self.exp = orthogonal(nn.Linear(OR_DIM, OR_DIM), orthogonal_map="matrix_exp")
        self.cayley = orthogonal(nn.Linear(OR_DIM, OR_DIM), orthogonal_map="cayley")
        self.householder = orthogonal(nn.Linear(OR_DIM, OR_DIM), orthogonal_map="householder")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D)
        return self.householder(torch.tanh(self.cayley(torch.tanh(self.exp(x)))))


class SquaredReluLinear(torch.autograd.Function):
    """y = relu(x W^T)^2 with a hand-written backward: dh = 2 relu(h) dy, dx = dh W, dW = dh^T x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x @ w.T  # (R, O)
        ctx.save_for_backward(x, w, h)
        return torch.relu(h).square()

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w, h = ctx.saved_tensors
        dh = 2 * torch.relu(h) * dy
        return dh @ w, dh.T @ x


class DoubleInPlace(torch.autograd.Function):
    """x *= 2 in place (marked dirty); the gradient doubled."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        return dy * 2


class CustomFunctions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(CF_OUT, CF_IN) / CF_IN**0.5)
        self.scale = nn.Parameter(torch.ones(CF_IN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, I)
        return SquaredReluLinear.apply(DoubleInPlace.apply(x * self.scale), self.w)


class Block(nn.Module):
    """LayerNorm, then an MLP (Linear, GELU, Linear): the MLP compiled by torch.compile's ``backend``, or eager
    (None)."""

    def __init__(self, backend: str | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(CB_DIM)
        mlp = nn.Sequential(nn.Linear(CB_DIM, CB_HIDDEN), nn.GELU(), nn.Linear(CB_HIDDEN, CB_DIM))
        self.mlp = torch.compile(mlp, backend=backend) if backend else mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class NucleusSampler(nn.Module):
    """A decoding step: logits over the vocabulary, a temperature, softmax, the nucleus (top-p) kept by a
    descending sort and a cumulative sum, probabilities scattered back to their ids, one id drawn per row, and
    its embedding looked up for the next step."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(NS_DIM, NS_VOCAB)
        self.embed = nn.Embedding(NS_VOCAB, NS_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (R, D)
        probs = (self.head(h) / NS_TEMPERATURE).softmax(-1)  # (R, V)
        sorted_p, ids = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > NS_TOP_P  # beyond the nucleus
        kept = torch.zeros_like(probs).scatter(-1, ids, sorted_p.masked_fill(cut, 0.0))
        return self.embed(torch.multinomial(kept, 1).squeeze(-1))  # (R, D)


class PerSampleGrads(nn.Module):
    """Per-sample gradients of a linear classifier's cross-entropy (DP-SGD's first step): torch.func.grad of one
    sample's loss through functional_call, vmapped over the batch; each sample's weight-gradient norm returned."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(PS_IN, PS_CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (S, I), (S,)
        params = {k: v.detach() for k, v in self.linear.named_parameters()}

        def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(self.linear, p, (xi[None],)), yi[None])

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return grads["weight"].flatten(1).norm(dim=1)  # (S,)


@seeded
def grouped_moe():
    return GroupedMoE().to(torch.bfloat16), (torch.randn(GM_TOKENS, GM_DIM, dtype=torch.bfloat16),)


@seeded
def qat_convnet():
    model = QatConvNet()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation; reduce_range's
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare_qat(model.train(), inplace=True)
    return model, (torch.randn(BATCH, 3, QAT_SIDE, QAT_SIDE),)


@seeded
def t5_block():
    return T5Block().double(), (torch.randn(BATCH, T5_TOKENS, T5_DIM, dtype=torch.float64),)


@seeded
def seq2seq():
    padding = torch.zeros(BATCH, S2S_SRC, dtype=torch.bool)
    padding[1, 3:] = True  # the second source is 3 tokens long
    return Seq2Seq(), (torch.randn(BATCH, S2S_SRC, S2S_DIM), torch.randn(BATCH, S2S_TGT, S2S_DIM), padding)


@seeded
def wavenet():
    return WaveNet(), (torch.randn(BATCH, 1, WN_SAMPLES),)


@seeded
def dlrm():
    lookups = sum(DL_BAG_LENGTHS)
    offsets = torch.tensor([0, DL_BAG_LENGTHS[0]])
    return Dlrm(), (torch.randn(BATCH, DL_DENSE), torch.randint(0, DL_ROWS, (lookups,)), offsets,
                    torch.randint(0, DL_ROWS, (BATCH,)))


@seeded
def gin():
    edges = torch.randint(0, GIN_NODES, (2, GIN_EDGES))
    graph = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # the graph of each node
    return Gin(), (torch.randn(GIN_NODES, GIN_FEAT), edges, graph)


@seeded
def ssd():
    return Ssd(), (torch.randn(BATCH, SSD_LEN, SSD_DIM),)


@seeded
def crf():
    return CrfTagger(), (torch.randn(BATCH, CRF_LEN, CRF_FEAT), torch.randint(0, CRF_TAGS, (BATCH, CRF_LEN)))


@seeded
def adaptive_softmax():
    return AdaptiveSoftmax(), (torch.randn(AS_ROWS, AS_DIM), torch.tensor(AS_TARGETS))


@seeded
def orthogonal():
    return OrthogonalMaps(), (torch.randn(BATCH, OR_DIM),)


@seeded
def custom_functions():
    return CustomFunctions(), (torch.randn(CF_ROWS, CF_IN),)


@seeded
def compiled_block():
    return Block("aot_eager"), (torch.randn(CB_ROWS, CB_DIM),)


@seeded
def inductor_block():
    """compiled_block by Inductor: GELU fused into generated code (forward and backward)."""
    return Block("inductor"), (torch.randn(CB_ROWS, CB_DIM),)


@seeded
def eager_block():
    """compiled_block's model uncompiled, with the same weights: its counts are what the compiled one must count."""
    return Block(None), (torch.randn(CB_ROWS, CB_DIM),)


@seeded
def nucleus_sampler():
    return NucleusSampler(), (torch.randn(NS_ROWS, NS_DIM),)


@seeded
def per_sample_grads():
    return PerSampleGrads(), (torch.randn(PS_SAMPLES, PS_IN), torch.randint(0, PS_CLASSES, (PS_SAMPLES,)))


# name -> (builder, whether a backward step makes sense)
MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (grouped_moe, True),
        (qat_convnet, True),
        (t5_block, True),
        (seq2seq, True),
        (wavenet, True),
        (dlrm, True),
        (gin, True),
        (ssd, True),
        (crf, True),
        (adaptive_softmax, True),
        (orthogonal, True),
        (custom_functions, True),
        (compiled_block, True),
        (nucleus_sampler, False),  # sampling ends the graph
        (per_sample_grads, False),  # its gradients are its output: nothing left to differentiate
    )
}
build = grouped_moe
