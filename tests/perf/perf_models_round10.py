"""Tenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round10*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

A Mamba selective scan stepped in a Python loop and one solved in parallel in log space (Heinsen: cumsum and
logcumsumexp); a ViT whose learned position grid is resized by bicubic interpolation, its attention an
nn.MultiheadAttention that returns per-head weights; a sequence-first nn.MultiheadAttention whose keys and values
have their own widths (kdim, vdim: separate projections) under a key padding mask; a graph layer aggregating edge
messages by torch.segment_reduce (mean, edges sorted by destination) and by scatter_reduce (amax, not including the
destination's own value); features made sparse in forward (Tensor.to_sparse) before a sparse matmul; stop words
dropped by torch.isin; a Hamiltonian net whose forces are -vmap(grad(energy)) (torch.func); LSQ learnable fake
quantization; a two-layer bidirectional GRU over a packed batch not sorted by length, returning a namedtuple; a long
convolution by rfft/irfft (Hyena-like); buffers updated in forward (an EMA by lerp_ and a step count); a
channels-last convnet under bf16 autocast with non-reentrant checkpointing; the ViT on a batch of 0 images; a chunked
prefill whose causal masks are torch.nn.attention.bias objects built in forward (lower right over the context and the
chunk, upper left over the chunk).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
import torch.nn.attention.bias
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

BATCH = 2
# Selective scan (both forms): tokens, model width, inner width, state size
SCAN_LEN, SCAN_DIM, SCAN_INNER, SCAN_STATE = 6, 8, 12, 4
# ViT with interpolated positions: image, patch, width, heads, the learned position grid's side, classes
VIT_IMG, VIT_PATCH, VIT_DIM, VIT_HEADS, VIT_GRID, VIT_CH, VIT_CLASSES = 20, 4, 16, 4, 3, 3, 5
# Sequence-first MHA with kdim / vdim: query length, key length, widths
XA_LQ, XA_LK, XA_DIM, XA_KDIM, XA_VDIM, XA_HEADS = 5, 7, 16, 6, 10, 2
# Graph: nodes, features, out features
GRAPH_NODES, GRAPH_FEAT, GRAPH_OUT = 7, 6, 5
# Sparse features: rows, features, out
SPARSE_ROWS, SPARSE_IN, SPARSE_OUT = 6, 10, 4
# Stop-word filter: vocabulary, width, tokens, stop words, classes
SW_VOCAB, SW_DIM, SW_LEN, SW_CLASSES = 30, 8, 9, 3
SW_STOP = (0, 1, 2, 7)
# Hamiltonian net: particles' coordinate width, hidden
HAM_DIM, HAM_HIDDEN, HAM_POINTS = 4, 16, 5
# LSQ: widths
LSQ_IN, LSQ_HIDDEN, LSQ_OUT, LSQ_ROWS = 8, 12, 3, 4
# Packed GRU: input, hidden, lengths
GRU_IN, GRU_HIDDEN = 5, 6
GRU_LENGTHS = (3, 6, 2)
# FFT long convolution: channels, length
FFTC_CH, FFTC_LEN = 4, 16
# EMA buffers
EMA_DIM = 6
# Channels-last bf16 convnet: channels, image
CL_CH, CL_IMG = 8, 8
# Chunked prefill: context length, chunk length, width, heads
CP_CONTEXT, CP_CHUNK, CP_DIM, CP_HEADS = 5, 3, 16, 2


class LoopScan(nn.Module):
    """Mamba's selective scan stepped token by token: x and a gate by one in-projection, delta = softplus of a
    projection, B and C per token; per step h = exp(delta A) * h + delta B x (state (B, inner, N)) and y = h C
    (einsum 'bdn,bn->bd'); y gated by SiLU(z), an out-projection."""

    def __init__(self) -> None:
        super().__init__()
        d, e, n = SCAN_DIM, SCAN_INNER, SCAN_STATE
        self.inp = nn.Linear(d, 2 * e, bias=False)
        self.dt = nn.Linear(e, e)
        self.bc = nn.Linear(e, 2 * n, bias=False)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))  # (e, n)
        self.out = nn.Linear(e, d, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u (B, T, D)
        x, z = self.inp(u).chunk(2, dim=-1)
        delta = F.softplus(self.dt(x))  # (B, T, e)
        b, c = self.bc(x).chunk(2, dim=-1)  # (B, T, n) each
        a = -torch.exp(self.a_log)
        h = x.new_zeros(x.shape[0], SCAN_INNER, SCAN_STATE)
        ys = []
        for t in range(x.shape[1]):
            da = torch.exp(delta[:, t, :, None] * a)  # (B, e, n)
            h = da * h + (delta[:, t] * x[:, t])[:, :, None] * b[:, t, None, :]
            ys.append(torch.einsum("bdn,bn->bd", h, c[:, t]))
        y = torch.stack(ys, dim=1)
        return self.out(y * F.silu(z))


class LogSpaceScan(nn.Module):
    """A gated linear recurrence h_t = a_t h_{t-1} + b_t (a_t in (0, 1) by a sigmoid, b_t > 0 by softplus) solved in
    parallel in log space: log h_t = a*_t + logcumsumexp(log b - a*)_t with a*_t = cumsum(log a)_t; then an
    out-projection. Inputs (B, T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(SCAN_DIM, SCAN_INNER)
        self.value = nn.Linear(SCAN_DIM, SCAN_INNER)
        self.out = nn.Linear(SCAN_INNER, SCAN_DIM)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        log_a = F.logsigmoid(self.gate(u))  # (B, T, e)
        log_b = torch.log(F.softplus(self.value(u)) + 1e-6)
        a_star = torch.cumsum(log_a, dim=1)
        log_h = a_star + torch.logcumsumexp(log_b - a_star, dim=1)
        return self.out(torch.exp(log_h))


class InterpolatedViT(nn.Module):
    """Patches by a stride-P convolution; the learned positions, trained on a VIT_GRID x VIT_GRID grid, resized by
    bicubic interpolation to this image's grid; a class token prepended (with its own position); a pre-norm block
    whose attention is nn.MultiheadAttention (batch first) asked for each head's weights (need_weights,
    average_attn_weights=False: the math path, no fused kernel), returned beside the logits."""

    def __init__(self) -> None:
        super().__init__()
        d = VIT_DIM
        self.patch = nn.Conv2d(VIT_CH, d, VIT_PATCH, stride=VIT_PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, VIT_GRID * VIT_GRID, d) * 0.02)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, VIT_HEADS, batch_first=True)
        self.head = nn.Linear(d, VIT_CLASSES)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch(img)  # (B, D, g, g)
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        grid = self.pos.reshape(1, VIT_GRID, VIT_GRID, VIT_DIM).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        x = x + pos.flatten(2).transpose(1, 2)
        x = torch.cat([(self.cls + self.cls_pos).expand(x.shape[0], -1, -1), x], dim=1)
        h = self.norm(x)
        a, weights = self.attn(h, h, h, need_weights=True, average_attn_weights=False)
        x = x + a
        return self.head(x[:, 0]), weights


class KdimAttention(nn.Module):
    """nn.MultiheadAttention sequence first (L, B, E) over keys and values of their own widths (kdim, vdim: three
    projection weights, no packed in-projection), a key padding mask hiding each sample's last keys, no weights
    returned (need_weights=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(XA_DIM, XA_HEADS, kdim=XA_KDIM, vdim=XA_VDIM)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v, key_padding_mask=pad, need_weights=False)[0]


def graph_edges() -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) sorted by dst, every node a destination at least once (segment lengths >= 1)."""
    src, dst = [], []
    for node in range(GRAPH_NODES):
        for j in range(1 + node % 3):
            src.append((node + 2 * j + 1) % GRAPH_NODES)
            dst.append(node)
    return torch.tensor(src), torch.tensor(dst)


class SegmentGraph(nn.Module):
    """Messages W x_src (index_select, a linear), reduced at each destination twice: the mean by
    torch.segment_reduce over the edges (sorted by destination, lengths = in-degrees) and the max by
    scatter_reduce('amax', include_self=False) into zeros; the two concatenated with x, a linear out."""

    def __init__(self) -> None:
        super().__init__()
        self.msg = nn.Linear(GRAPH_FEAT, GRAPH_FEAT)
        self.out = nn.Linear(3 * GRAPH_FEAT, GRAPH_OUT)

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        m = self.msg(x.index_select(0, src))  # (E, F)
        lengths = torch.bincount(dst, minlength=x.shape[0])
        mean = torch.segment_reduce(m, "mean", lengths=lengths)  # (N, F)
        index = dst[:, None].expand_as(m)
        mx = x.new_zeros(x.shape).scatter_reduce(0, index, m, "amax", include_self=False)
        return self.out(torch.cat([x, mean, mx], dim=-1))


class SparseFeatures(nn.Module):
    """Features made sparse in forward (ReLU, then Tensor.to_sparse: the zeros dropped), multiplied by a dense
    weight with torch.sparse.mm, a bias added."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(SPARSE_IN, SPARSE_OUT) * 0.3)
        self.bias = nn.Parameter(torch.zeros(SPARSE_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(torch.relu(x).to_sparse(), self.weight) + self.bias


class StopwordClassifier(nn.Module):
    """Token ids (int64, (B, T)); stop words found by torch.isin and masked out of a mean of the embeddings; a
    linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(SW_VOCAB, SW_DIM)
        self.head = nn.Linear(SW_DIM, SW_CLASSES)
        self.register_buffer("stop", torch.tensor(SW_STOP))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isin(ids, self.stop)  # (B, T) bool
        e = self.emb(ids) * keep[..., None]
        pooled = e.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


class Hamiltonian(nn.Module):
    """A Hamiltonian net: energy H(q) by a tanh MLP, forces -dH/dq per point by torch.func (vmap of grad over the
    points, the parameters given functionally), returned with the energies."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(HAM_DIM, HAM_HIDDEN)
        self.l2 = nn.Linear(HAM_HIDDEN, 1)

    def energy(self, q: torch.Tensor) -> torch.Tensor:  # q (HAM_DIM,) -> ()
        return self.l2(torch.tanh(self.l1(q))).squeeze(-1)

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # q (P, HAM_DIM)
        forces = -vmap(grad(self.energy))(q)
        return self.energy(q), forces


class LsqMlp(nn.Module):
    """LSQ quantization-aware training: activations fake-quantized per tensor with a learnable scale and zero
    point, each weight per output channel (torch._fake_quantize_learnable_per_*_affine); two linears, a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(LSQ_IN, LSQ_HIDDEN)
        self.l2 = nn.Linear(LSQ_HIDDEN, LSQ_OUT)
        self.act_scale = nn.Parameter(torch.tensor([0.05]))
        self.act_zero = nn.Parameter(torch.tensor([0.0]))
        self.w_scale = nn.ParameterList([nn.Parameter(torch.full((n,), 0.02)) for n in (LSQ_HIDDEN, LSQ_OUT)])
        self.w_zero = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in (LSQ_HIDDEN, LSQ_OUT)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch._fake_quantize_learnable_per_tensor_affine(x, self.act_scale, self.act_zero, -128, 127)
        for i, layer in enumerate((self.l1, self.l2)):
            w = torch._fake_quantize_learnable_per_channel_affine(layer.weight, self.w_scale[i], self.w_zero[i], 0,
                                                                  -128, 127)
            x = F.linear(x, w, layer.bias)
            if i == 0:
                x = torch.relu(x)
        return x


GruOut = collections.namedtuple("GruOut", "padded last lengths")


class PackedBiGru(nn.Module):
    """A two-layer bidirectional GRU over a padded batch (T, B, I) packed with enforce_sorted=False (the batch
    sorted by length inside, unsorted after), unpacked; returns a namedtuple (padded outputs, final states, the
    lengths as pad_packed_sequence gives them)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(GRU_IN, GRU_HIDDEN, num_layers=2, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> GruOut:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h = self.gru(packed)
        padded, lens = nn.utils.rnn.pad_packed_sequence(out)
        return GruOut(padded, h, lens)


class FftLongConv(nn.Module):
    """Hyena-like long convolution: a learned filter per channel as long as the sequence, applied by FFT (both
    zero-padded to 2L: rfft, a complex product, irfft, the first L kept), plus a skip scaled per channel; a
    pointwise linear out. Inputs (B, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.filt = nn.Parameter(torch.randn(FFTC_CH, FFTC_LEN) * 0.1)
        self.skip = nn.Parameter(torch.ones(FFTC_CH, 1))
        self.out = nn.Linear(FFTC_CH, FFTC_CH)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        n = 2 * FFTC_LEN
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.filt, n=n), n=n)[..., :FFTC_LEN]
        return self.out((y + u * self.skip).transpose(1, 2))


class EmaBuffers(nn.Module):
    """Buffers updated in forward: a running mean of the batch's features (lerp_ towards it, under no_grad) and a
    step count (add_ 1); the features centred by the running mean; returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(EMA_DIM, EMA_DIM)
        self.register_buffer("running", torch.zeros(EMA_DIM))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x)
        with torch.no_grad():
            self.running.lerp_(h.mean(0), 0.1)
            self.steps.add_(1)
        return {"centred": h - self.running, "steps": self.steps.clone()}


class ChannelsLastAutocast(nn.Module):
    """A channels-last convnet under CPU bf16 autocast: two 3x3 convolutions with GroupNorm and SiLU, each under
    torch.utils.checkpoint (use_reentrant=False: the forward recomputed in the backward), a global pool and a
    float32 head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, CL_CH, 3, padding=1)
        self.c2 = nn.Conv2d(CL_CH, CL_CH, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(2, CL_CH), nn.GroupNorm(2, CL_CH)
        self.head = nn.Linear(CL_CH, 2)

    def _block(self, conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.silu(norm(conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = checkpoint(self._block, self.c1, self.n1, x, use_reentrant=False)
            x = checkpoint(self._block, self.c2, self.n2, x, use_reentrant=False)
        return self.head(x.float().mean((2, 3)))


class ChunkedPrefill(nn.Module):
    """Chunked prefill: a chunk of CP_CHUNK new tokens attends to the CP_CONTEXT tokens before it and causally to
    itself (keys and values over context + chunk, the mask torch.nn.attention.bias.causal_lower_right: the chunk's
    last token sees every key), then to itself alone under causal_upper_left (SDPA's is_causal); both masks are tensor
    subclasses built in forward. A q projection of the chunk, a kv projection of both, an out projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(CP_DIM, CP_DIM)
        self.kv = nn.Linear(CP_DIM, 2 * CP_DIM)
        self.out = nn.Linear(CP_DIM, CP_DIM)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, D / H)
        return x.unflatten(-1, (CP_HEADS, CP_DIM // CP_HEADS)).transpose(1, 2)

    def forward(self, context: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        lq, lk = chunk.shape[1], context.shape[1] + chunk.shape[1]
        q = self._heads(self.q(chunk))
        k, v = (self._heads(t) for t in self.kv(torch.cat([context, chunk], dim=1)).chunk(2, dim=-1))
        bias = torch.nn.attention.bias
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.causal_lower_right(lq, lk))
        own = F.scaled_dot_product_attention(q, k[:, :, -lq:], v[:, :, -lq:], attn_mask=bias.causal_upper_left(lq, lq))
        return self.out((a + own).transpose(1, 2).flatten(2))


@seeded
def loop_scan():
    return LoopScan(), (torch.randn(BATCH, SCAN_LEN, SCAN_DIM),)


@seeded
def log_scan():
    return LogSpaceScan(), (torch.randn(BATCH, SCAN_LEN, SCAN_DIM),)


@seeded
def vit_interp():
    return InterpolatedViT(), (torch.randn(BATCH, VIT_CH, VIT_IMG, VIT_IMG),)


@seeded
def vit_empty():
    """The interpolated ViT on a batch of 0 images."""
    return InterpolatedViT(), (torch.randn(0, VIT_CH, VIT_IMG, VIT_IMG),)


@seeded
def kdim_attention():
    pad = torch.zeros(BATCH, XA_LK, dtype=torch.bool)
    pad[0, -2:] = True
    pad[1, -1:] = True
    return KdimAttention(), (torch.randn(XA_LQ, BATCH, XA_DIM), torch.randn(XA_LK, BATCH, XA_KDIM),
                             torch.randn(XA_LK, BATCH, XA_VDIM), pad)


@seeded
def segment_graph():
    src, dst = graph_edges()
    return SegmentGraph(), (torch.randn(GRAPH_NODES, GRAPH_FEAT), src, dst)


@seeded
def sparse_features():
    return SparseFeatures(), (torch.randn(SPARSE_ROWS, SPARSE_IN),)


@seeded
def stopwords():
    ids = torch.randint(0, SW_VOCAB, (BATCH, SW_LEN))
    ids[0, :3] = torch.tensor(SW_STOP[:3])  # some stop words for sure
    return StopwordClassifier(), (ids,)


@seeded
def hamiltonian():
    return Hamiltonian(), (torch.randn(HAM_POINTS, HAM_DIM),)


@seeded
def lsq_mlp():
    return LsqMlp(), (torch.randn(LSQ_ROWS, LSQ_IN),)


@seeded
def packed_bigru():
    return PackedBiGru(), (torch.randn(max(GRU_LENGTHS), len(GRU_LENGTHS), GRU_IN), torch.tensor(GRU_LENGTHS))


@seeded
def fft_long_conv():
    return FftLongConv(), (torch.randn(BATCH, FFTC_CH, FFTC_LEN),)


@seeded
def ema_buffers():
    return EmaBuffers(), (torch.randn(BATCH * 2, EMA_DIM),)


@seeded
def channels_last_autocast():
    model = ChannelsLastAutocast().to(memory_format=torch.channels_last)
    return model, (torch.randn(BATCH, 3, CL_IMG, CL_IMG).contiguous(memory_format=torch.channels_last),)


@seeded
def chunked_prefill():
    return ChunkedPrefill(), (torch.randn(BATCH, CP_CONTEXT, CP_DIM), torch.randn(BATCH, CP_CHUNK, CP_DIM))


MODELS = {
    "loop_scan": (loop_scan, True),
    "log_scan": (log_scan, True),
    "vit_interp": (vit_interp, True),
    "vit_empty": (vit_empty, True),
    "kdim_attention": (kdim_attention, True),
    "segment_graph": (segment_graph, True),
    "sparse_features": (sparse_features, True),
    "stopwords": (stopwords, True),
    "hamiltonian": (hamiltonian, True),
    "lsq_mlp": (lsq_mlp, True),
    "packed_bigru": (packed_bigru, True),
    "fft_long_conv": (fft_long_conv, True),
    "ema_buffers": (ema_buffers, True),
    "channels_last_autocast": (channels_last_autocast, True),
    "chunked_prefill": (chunked_prefill, True),
}
