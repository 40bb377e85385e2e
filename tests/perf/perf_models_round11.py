"""Eleventh round of models the profiler has not seen (tests/perf/test_profile_unseen_round11*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round11.py:ssd_chunked --device cpu --train

The families rounds 1-10 leave out: Mamba-2's chunked state-space duality (SSD) written in two-operand einsums
(the intra-chunk quadratic form, chunk states, the inter-chunk recurrence over a segment-sum decay, the state-to-output
term); a Universal Transformer with adaptive computation time (one block, its weights shared by every ponder step,
applied until each token's halting probability sums to 1 - eps: a loop count read off the data with .item()); a
temporal convolution net of dilated, grouped causal Conv1d under weight_norm parametrizations, one with circular
padding; a complex64 MLP (complex weights, modReLU); an fp16 convnet on the CPU; a pooled classifier taking int32 token
ids and a bool padding mask; an LSTM tagger over a batch of 0 sequences; a batch of 1 through nn.TransformerEncoder
with a key padding mask; a PointNet++ set abstraction (farthest point sampling stepped in a Python loop, a ball query by
cdist and topk, neighbours gathered, a shared 1x1 Conv2d MLP, a max over neighbours); an eager net holding a
TorchScript'ed block; gated linear attention whose recurrent state is updated in place by baddbmm_ (decay as beta);
and a net whose branch depends on its input's values. Sizes are tiny: what is checked is the counting.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

BATCH = 2
# SSD: chunks, chunk length, heads, head width (P), state size (N), model width
SSD_CHUNKS, SSD_CHUNK, SSD_HEADS, SSD_P, SSD_N, SSD_DIM = 3, 4, 2, 3, 5, 8
SSD_LEN = SSD_CHUNKS * SSD_CHUNK
# ACT Universal Transformer: tokens, width, feed-forward width, most ponder steps, halting threshold
ACT_LEN, ACT_DIM, ACT_FF, ACT_MAX_STEPS, ACT_EPS = 5, 8, 16, 6, 0.01
# TCN: channels, groups, kernel, dilations, length
TCN_CH, TCN_GROUPS, TCN_K, TCN_DILATIONS, TCN_LEN = 8, 4, 3, (1, 2, 4), 20
# complex MLP: widths
CX_IN, CX_HIDDEN, CX_OUT = 6, 10, 4
# fp16 convnet: channels, image side, classes
H_CH, H_SIDE, H_CLASSES = 4, 8, 3
# token pooling: vocabulary, width, tokens, classes
TP_VOCAB, TP_DIM, TP_LEN, TP_CLASSES = 20, 8, 7, 3
TP_LENGTHS = (7, 4)  # tokens kept per sample (the rest padded)
# LSTM tagger: vocabulary, width, hidden, tags, tokens
LT_VOCAB, LT_DIM, LT_HIDDEN, LT_TAGS, LT_LEN = 15, 6, 8, 4, 5
# encoder at batch 1: tokens (the last LEN - KEEP padded), width, heads, feed-forward width
E1_LEN, E1_KEEP, E1_DIM, E1_HEADS, E1_FF = 6, 4, 8, 2, 16
# PointNet++ set abstraction: points, centroids, neighbours, radius, MLP widths
PN_POINTS, PN_CENTROIDS, PN_NEIGHBOURS, PN_RADIUS, PN_WIDTHS = 24, 6, 4, 0.8, (3, 8, 16)
# scripted block: widths
SC_IN, SC_HIDDEN, SC_OUT = 6, 12, 4
# gated linear attention: tokens, key width, value width
GLA_LEN, GLA_DK, GLA_DV, GLA_DIM = 5, 4, 3, 8
# branching net: width, hidden of the heavy branch
BR_DIM, BR_HIDDEN = 8, 32


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[..., i, j] = sum of x[..., j+1 .. i] for j <= i, -inf above the diagonal (Mamba-2's
    stable segment sum: a masked cumulative sum of the repeated input)."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)  # (..., T, T), x[..., i, j] = x_i
    below = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


class ChunkedSSD(nn.Module):
    """Mamba-2's SSD, chunked (``ssd_minimal_discrete``), every contraction a two-operand einsum: per chunk the
    quadratic form Y_diag = (C B^T * L) X, the chunk's final states from B and X under their decay, the states passed
    between chunks by a segment-sum decay, and Y_off = C states under each token's decay. Projections in and out."""

    def __init__(self) -> None:
        super().__init__()
        h, p, n = SSD_HEADS, SSD_P, SSD_N
        self.x_proj = nn.Linear(SSD_DIM, h * p)
        self.bc_proj = nn.Linear(SSD_DIM, 2 * h * n, bias=False)
        self.dt_proj = nn.Linear(SSD_DIM, h)
        self.a_log = nn.Parameter(torch.linspace(0.0, 1.0, h))
        self.out = nn.Linear(h * p, SSD_DIM, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u (B, T, D)
        b, c, l, h, p, n = u.shape[0], SSD_CHUNKS, SSD_CHUNK, SSD_HEADS, SSD_P, SSD_N
        x = self.x_proj(u).reshape(b, c, l, h, p)
        bm, cm = self.bc_proj(u).reshape(b, c, l, 2, h, n).unbind(3)  # (b, c, l, h, n) each
        dt = F.softplus(self.dt_proj(u))  # (b, T, h)
        a = (-torch.exp(self.a_log) * dt).reshape(b, c, l, h).permute(0, 3, 1, 2)  # (b, h, c, l)
        x = x * dt.reshape(b, c, l, h, 1)
        a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, l)
        decay = torch.exp(segsum(a))  # (b, h, c, l, l)
        scores = torch.einsum("bclhn,bcshn->bhcls", cm, bm)  # (b, h, c, l, l)
        y_diag = torch.einsum("bhcls,bcshp->bclhp", scores * decay, x)
        decay_states = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
        weighted = bm * decay_states.permute(0, 2, 3, 1)[..., None]  # (b, c, l, h, n)
        states = torch.einsum("bclhn,bclhp->bchpn", weighted, x)  # (b, c, h, p, n)
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, h, p, n)
        chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
        states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # states entering each chunk
        y_off = torch.einsum("bclhn,bchpn->bclhp", cm, states) * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]
        y = (y_diag + y_off).reshape(b, c * l, h * p)
        return self.out(y)


class PonderBlock(nn.Module):
    """A post-norm transformer block without attention heads' split (one head, its width the model's)."""

    def __init__(self) -> None:
        super().__init__()
        d = ACT_DIM
        self.qkv = nn.Linear(d, 3 * d)
        self.ff1, self.ff2 = nn.Linear(d, ACT_FF), nn.Linear(ACT_FF, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.n1(x + F.scaled_dot_product_attention(q, k, v))
        return self.n2(x + self.ff2(F.gelu(self.ff1(x))))


class AdaptiveUniversal(nn.Module):
    """A Universal Transformer with ACT (Graves; Dehghani et al.): one PonderBlock shared by every step (its weights
    read again each time), a position-and-step signal added, a halting unit per token; steps run while any token's
    cumulative halting probability is below 1 - eps (a count read off the data by .item()), at most ACT_MAX_STEPS.
    The output is each step's state weighted by the token's halting share."""

    def __init__(self) -> None:
        super().__init__()
        self.block = PonderBlock()
        self.halt = nn.Linear(ACT_DIM, 1)
        self.step_signal = nn.Parameter(torch.randn(ACT_MAX_STEPS, ACT_DIM) * 0.1)

    def ponder_steps(self, x: torch.Tensor) -> int:
        """How many steps forward takes on ``x`` (the same loop, without the block's output kept)."""
        with torch.no_grad():
            return self._run(x)[1]

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        halted = torch.zeros(x.shape[:2], device=x.device)
        out = torch.zeros_like(x)
        steps = 0
        while steps < ACT_MAX_STEPS and bool((halted < 1 - ACT_EPS).any().item()):
            x = self.block(x + self.step_signal[steps])
            p = torch.sigmoid(self.halt(x)).squeeze(-1)  # (B, T)
            running = (halted < 1 - ACT_EPS).float()
            share = torch.minimum(p, 1 - halted) * running
            halted = halted + share
            out = out + share[..., None] * x
            steps += 1
        return out, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]


class DilatedTCN(nn.Module):
    """Residual blocks of causal, grouped, dilated Conv1d (left padding of (K-1)*dilation), each weight under a
    weight_norm parametrization (the weight recomputed from g and v in every forward); one extra non-causal Conv1d
    with circular padding; a pointwise Conv1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            parametrizations.weight_norm(nn.Conv1d(TCN_CH, TCN_CH, TCN_K, dilation=d, groups=TCN_GROUPS))
            for d in TCN_DILATIONS
        )
        self.ring = nn.Conv1d(TCN_CH, TCN_CH, TCN_K, padding=1, padding_mode="circular")
        self.head = nn.Conv1d(TCN_CH, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        for conv, d in zip(self.convs, TCN_DILATIONS, strict=True):
            x = x + torch.relu(conv(F.pad(x, ((TCN_K - 1) * d, 0))))
        return self.head(torch.tanh(self.ring(x)))


class ComplexMLP(nn.Module):
    """Two complex64 linears with a modReLU between (relu(|z| + b) z / |z|), the output's modulus: a complex-valued
    net of complex parameters (their gradients complex too)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(CX_IN, CX_HIDDEN, dtype=torch.complex64)
        self.fc2 = nn.Linear(CX_HIDDEN, CX_OUT, dtype=torch.complex64)
        self.mod_bias = nn.Parameter(torch.full((CX_HIDDEN,), -0.1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc1(z)
        mag = h.abs()
        h = h * (torch.relu(mag + self.mod_bias) / (mag + 1e-6))
        return self.fc2(h).abs()


class HalfConvNet(nn.Module):
    """A convnet whose parameters and inputs are float16, run on the CPU: a 3x3 convolution, GroupNorm, SiLU, a
    global average, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, H_CH, 3, padding=1)
        self.norm = nn.GroupNorm(2, H_CH)
        self.head = nn.Linear(H_CH, H_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.norm(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class TokenPool(nn.Module):
    """int32 token ids and a bool padding mask in: embeddings, padded positions zeroed by torch.where, a mean over the
    kept tokens (lengths from the mask's sum), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(TP_VOCAB, TP_DIM)
        self.head = nn.Linear(TP_DIM, TP_CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)  # (B, T, D)
        e = torch.where(mask[..., None], e, 0.0)
        pooled = e.sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.head(pooled)


class LstmTagger(nn.Module):
    """Embedding, a one-layer batch-first LSTM, a linear tag head per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(LT_VOCAB, LT_DIM)
        self.lstm = nn.LSTM(LT_DIM, LT_HIDDEN, batch_first=True)
        self.head = nn.Linear(LT_HIDDEN, LT_TAGS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.emb(ids))[0])


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder (one layer, batch first, no dropout) under a bool key padding mask."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E1_DIM, E1_HEADS, E1_FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=pad)


def farthest_points(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, 3) -> (B, k) indices: the first point, then each time the point farthest from those chosen (a Python
    loop of k steps: distances to the newest centroid, a running minimum, an argmax)."""
    b, p, _ = xyz.shape
    chosen = torch.zeros(b, k, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, p), float("inf"), device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(k):
        chosen[:, i] = last
        d = ((xyz - xyz[rows, last][:, None]) ** 2).sum(-1)  # (B, P)
        nearest = torch.minimum(nearest, d)
        last = nearest.argmax(-1)
    return chosen


class SetAbstraction(nn.Module):
    """PointNet++'s set abstraction: centroids by farthest point sampling, each centroid's neighbours by a ball query
    (cdist to every point, the nearest PN_NEIGHBOURS by topk, those beyond the radius replaced by the nearest),
    their offsets from the centroid through a shared MLP of 1x1 Conv2d, a max over the neighbours."""

    def __init__(self) -> None:
        super().__init__()
        w = PN_WIDTHS
        self.mlp = nn.Sequential(nn.Conv2d(w[0], w[1], 1), nn.ReLU(), nn.Conv2d(w[1], w[2], 1), nn.ReLU())

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:  # (B, P, 3)
        b = xyz.shape[0]
        rows = torch.arange(b, device=xyz.device)[:, None]
        centres = xyz[rows, farthest_points(xyz, PN_CENTROIDS)]  # (B, S, 3)
        dist = torch.cdist(centres, xyz)  # (B, S, P)
        near, idx = dist.topk(PN_NEIGHBOURS, dim=-1, largest=False)  # (B, S, K)
        idx = torch.where(near > PN_RADIUS, idx[..., :1], idx)
        groups = xyz[rows[..., None], idx] - centres[:, :, None]  # (B, S, K, 3)
        feats = self.mlp(groups.permute(0, 3, 1, 2))  # (B, C, S, K)
        return feats.amax(dim=-1)  # (B, C, S)


class ScriptedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(SC_IN, SC_HIDDEN), nn.Linear(SC_HIDDEN, SC_HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class WithScripted(nn.Module):
    """An eager net holding a TorchScript'ed block (torch.jit.script of an MLP) and an eager head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.jit.script(ScriptedMLP())
        self.head = nn.Linear(SC_HIDDEN, SC_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class GatedLinearAttention(nn.Module):
    """Gated linear attention stepped token by token: a state S (B, dk, dv) decayed and written in place each step,
    S.baddbmm_(k_t^T, v_t, beta=g_t) (S = g_t S + k_t^T v_t, g_t a scalar gate per sample), read by o_t = q_t S."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(GLA_DIM, GLA_DK, bias=False), nn.Linear(GLA_DIM, GLA_DK, bias=False)
        self.v = nn.Linear(GLA_DIM, GLA_DV, bias=False)
        self.gate = nn.Linear(GLA_DIM, 1)
        self.out = nn.Linear(GLA_DV, GLA_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        b = x.shape[0]
        q, k, v = self.q(x), self.k(x), self.v(x)
        g = torch.sigmoid(self.gate(x))  # (B, T, 1)
        state = x.new_zeros(b, GLA_DK, GLA_DV)
        outs = []
        for t in range(x.shape[1]):
            state = state * g[:, t, :, None]  # the decay, one per sample
            state.baddbmm_(k[:, t, :, None], v[:, t, None, :])  # (B, dk, 1) @ (B, 1, dv)
            outs.append(torch.bmm(q[:, t, None, :], state))  # (B, 1, dv)
        return self.out(torch.cat(outs, dim=1))


class Branching(nn.Module):
    """A cheap path for inputs whose mean is at most 0, a heavy MLP for the others: which runs depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.light = nn.Linear(BR_DIM, BR_DIM)
        self.heavy = nn.Sequential(nn.Linear(BR_DIM, BR_HIDDEN), nn.GELU(), nn.Linear(BR_HIDDEN, BR_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heavy(x) if x.mean() > 0 else self.light(x)


@seeded
def ssd_chunked():
    return ChunkedSSD(), (torch.randn(BATCH, SSD_LEN, SSD_DIM),)


@seeded
def act_universal():
    return AdaptiveUniversal(), (torch.randn(BATCH, ACT_LEN, ACT_DIM),)


@seeded
def dilated_tcn():
    return DilatedTCN(), (torch.randn(BATCH, TCN_CH, TCN_LEN),)


@seeded
def complex_mlp():
    return ComplexMLP(), (torch.randn(BATCH, CX_IN, dtype=torch.complex64),)


@seeded
def half_convnet():
    return HalfConvNet().half(), (torch.randn(BATCH, 3, H_SIDE, H_SIDE, dtype=torch.float16),)


@seeded
def token_pool():
    ids = torch.randint(0, TP_VOCAB, (BATCH, TP_LEN), dtype=torch.int32)
    mask = torch.arange(TP_LEN)[None, :] < torch.tensor(TP_LENGTHS)[:, None]  # (B, T) bool
    return TokenPool(), (ids, mask)


@seeded
def lstm_empty():
    """The LSTM tagger on a batch of 0 sentences."""
    return LstmTagger(), (torch.zeros(0, LT_LEN, dtype=torch.long),)


@seeded
def encoder_batch_one():
    pad = torch.arange(E1_LEN)[None, :] >= E1_KEEP  # (1, T): True where padded
    return PaddedEncoder(), (torch.randn(1, E1_LEN, E1_DIM), pad)


@seeded
def set_abstraction():
    return SetAbstraction(), (torch.rand(BATCH, PN_POINTS, 3),)


@seeded
def with_scripted():
    return WithScripted(), (torch.randn(BATCH, SC_IN),)


@seeded
def gated_linear_attention():
    return GatedLinearAttention(), (torch.randn(BATCH, GLA_LEN, GLA_DIM),)


@seeded
def branching_heavy():
    """The branching net on an input of positive mean (the heavy MLP runs)."""
    return Branching(), (torch.randn(BATCH, BR_DIM).abs(),)


@seeded
def branching_light():
    """The same net on an input of negative mean (the light linear runs)."""
    return Branching(), (-torch.randn(BATCH, BR_DIM).abs(),)


MODELS = {
    "ssd_chunked": (ssd_chunked, True),
    "act_universal": (act_universal, True),
    "dilated_tcn": (dilated_tcn, True),
    "complex_mlp": (complex_mlp, True),
    "half_convnet": (half_convnet, True),
    "token_pool": (token_pool, True),
    "lstm_empty": (lstm_empty, True),
    "encoder_batch_one": (encoder_batch_one, True),
    "set_abstraction": (set_abstraction, False),
    "with_scripted": (with_scripted, True),
    "gated_linear_attention": (gated_linear_attention, True),
    "branching_heavy": (branching_heavy, True),
    "branching_light": (branching_light, True),
}
