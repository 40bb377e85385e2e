"""Fifteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round15*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round15.py:mlstm --device cpu --train

The families rounds 1-14 leave out: xLSTM's mLSTM in its parallel form (log-sigmoid forget gates summed by cumsum
into a causal decay matrix, max-stabilised exponentials, a normaliser max(|sum|, exp(-m))); TabNet's attentive
transformer (sparsemax by sort / cumsum / gather, ghost batch norm over chunks of the batch, GLU blocks shared
across decision steps, a prior updated each step); gMLP's spatial gating unit (tokens mixed by F.conv1d with a
causal (tril) weight made in forward, a depthwise causal F.conv1d token shift); a deep equilibrium layer (a
fixed-point iteration under torch.no_grad inside forward, its count read off the data, then one step with
gradients); Transformer-XL relative attention (memory concatenated, sinusoidal relative positions, the AC and BD
einsums with the pad-and-view relative shift); a product-key memory (sub-key scores, two top-k's and a cartesian
top-k, an EmbeddingBag weighted by the softmax of the scores); ToMe token merging after an SDPA block (bipartite
soft matching under no_grad: cosine scores, argsort, gathers, scatter_reduce mean); a ConvLSTM stepped over frames
in Python; Performer's FAVOR+ positive random features (linear attention); a SIREN with Fourier features called
with keyword-only arguments, returning a dict; an EfficientNet MBConv block in channels_last with squeeze-excite
and stochastic depth (a per-sample Bernoulli draw in training, none in eval).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# mLSTM: batch, tokens, width, heads
ML_BATCH, ML_T, ML_DIM, ML_HEADS = 2, 6, 8, 2
# TabNet: rows, features, decision width, classes, decision steps, ghost batch, relaxation
TN_ROWS, TN_FEAT, TN_ND, TN_CLASSES, TN_STEPS, TN_VBS, TN_GAMMA = 8, 7, 4, 3, 2, 4, 1.3
# gMLP: batch, tokens, width, feed-forward width (split in two), token-shift taps
GM_BATCH, GM_T, GM_DIM, GM_FF, GM_TAPS = 2, 5, 6, 8, 3
# deep equilibrium: rows, input, hidden, classes, iteration cap, tolerance
DQ_ROWS, DQ_IN, DQ_HIDDEN, DQ_CLASSES, DQ_MAX_ITERS, DQ_TOL = 3, 5, 6, 2, 40, 1e-4
DQ_CONTRACTION = 0.5  # the hidden weight's spectral norm: the iteration contracts
# Transformer-XL: tokens, memory, batch, width, heads
XL_T, XL_MEM, XL_BATCH, XL_DIM, XL_HEADS = 4, 3, 2, 8, 2
# product-key memory: rows, input, key width, sub-keys per half, top-k, value width
PK_ROWS, PK_IN, PK_KEY, PK_SUBKEYS, PK_TOPK, PK_VDIM = 5, 6, 8, 6, 3, 4
# ToMe: batch, tokens, width, heads, tokens merged
TM_BATCH, TM_TOKENS, TM_DIM, TM_HEADS, TM_MERGE = 2, 8, 8, 2, 2
# ConvLSTM: batch, frames, input channels, hidden channels, side
CL_BATCH, CL_T, CL_IN, CL_HIDDEN, CL_SIDE = 2, 3, 2, 3, 4
# Performer: batch, tokens, width, heads, random features
PF_BATCH, PF_T, PF_DIM, PF_HEADS, PF_FEATURES = 2, 5, 8, 2, 6
# SIREN: points, Fourier features, width, hidden layers
SI_POINTS, SI_FOURIER, SI_WIDTH, SI_LAYERS = 7, 4, 8, 2
# MBConv: batch, channels, expanded, squeeze, side, drop-path rate
MB_BATCH, MB_C, MB_EXPAND, MB_SQUEEZE, MB_SIDE, MB_DROP = 4, 4, 8, 2, 5, 0.5


class MLstm(nn.Module):
    """xLSTM's mLSTM, parallel form: per head the decay D[t, s] = exp(sum_{s<r<=t} log sigmoid(f_r) + i_s - m_t)
    below the diagonal, the scores q k^T / sqrt(d) weighted by it, normalised by max(|row sum|, exp(-m))."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(ML_DIM, 3 * ML_DIM)
        self.gates = nn.Linear(ML_DIM, 2 * ML_HEADS)  # input and forget gate pre-activations per head
        self.out = nn.Linear(ML_DIM, ML_DIM)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // ML_HEADS
        q, k, v = self.qkv(x).view(b, t, 3, ML_HEADS, hd).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        i_pre, f_pre = self.gates(x).view(b, t, 2, ML_HEADS).permute(2, 0, 3, 1)  # each (B, H, T)
        cum = F.logsigmoid(f_pre).cumsum(-1)  # (B, H, T)
        log_d = cum[..., :, None] - cum[..., None, :] + i_pre[..., None, :]  # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        log_d = log_d.masked_fill(~causal, float("-inf"))
        m = log_d.amax(-1, keepdim=True)  # (B, H, T, 1)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(hd) * torch.exp(log_d - m)
        n = torch.maximum(s.sum(-1, keepdim=True).abs(), torch.exp(-m))
        h = (s / n) @ v  # (B, H, T, hd)
        return self.out(h.transpose(1, 2).reshape(b, t, d))


@seeded
def mlstm():
    return MLstm(), (torch.randn(ML_BATCH, ML_T, ML_DIM),)


def sparsemax(z):
    """Sparsemax over the last dim (Martins & Astudillo): the Euclidean projection onto the simplex."""
    zs, _ = z.sort(-1, descending=True)
    rng = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    support = (1 + rng * zs) > cs
    k = support.sum(-1, keepdim=True)
    tau = (cs.gather(-1, k - 1) - 1) / k
    return torch.clamp(z - tau, min=0)


class GhostBatchNorm(nn.Module):
    """Batch norm over virtual batches of ``TN_VBS`` rows (chunks of the batch), one module for all chunks."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features, momentum=0.02)

    def forward(self, x):
        return torch.cat([self.bn(c) for c in x.chunk(math.ceil(x.shape[0] / TN_VBS), 0)], 0)


class TabNet(nn.Module):
    """An input batch norm, a shared GLU feature transformer, and ``TN_STEPS`` decision steps each with an attentive
    transformer (linear, ghost batch norm, times the prior, sparsemax) masking the features."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(TN_FEAT)
        self.shared = nn.Linear(TN_FEAT, 2 * TN_ND)
        self.gbn = GhostBatchNorm(2 * TN_ND)
        self.att = nn.Linear(TN_ND, TN_FEAT)
        self.att_bn = GhostBatchNorm(TN_FEAT)
        self.head = nn.Linear(TN_ND, TN_CLASSES)

    def forward(self, x):
        x = self.bn_in(x)
        prior = torch.ones_like(x)
        h = F.glu(self.gbn(self.shared(x)))  # (N, ND)
        out = torch.zeros_like(h)
        mask = prior
        for _ in range(TN_STEPS):
            mask = sparsemax(self.att_bn(self.att(h)) * prior)
            prior = prior * (TN_GAMMA - mask)
            h = F.glu(self.gbn(self.shared(mask * x)))
            out = out + F.relu(h)
        return self.head(out), mask


@seeded
def tabnet():
    return TabNet(), (torch.randn(TN_ROWS, TN_FEAT),)


class GMlp(nn.Module):
    """A gMLP block: a depthwise causal token shift (functional grouped conv1d), channel projection with GELU, the
    spatial gating unit (its half v normed and mixed over tokens by F.conv1d with a tril weight made in forward),
    the gate times u, the projection back, a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(GM_DIM)
        self.shift = nn.Parameter(torch.randn(GM_DIM, 1, GM_TAPS) * 0.3)  # depthwise, no bias
        self.proj_in = nn.Linear(GM_DIM, 2 * GM_FF)
        self.sgu_norm = nn.LayerNorm(GM_FF)
        self.spatial_w = nn.Parameter(torch.randn(GM_T, GM_T) * 0.1)
        self.spatial_b = nn.Parameter(torch.ones(GM_T))
        self.proj_out = nn.Linear(GM_FF, GM_DIM)

    def forward(self, x):  # (B, T, D)
        xn = self.norm(x).transpose(1, 2)  # (B, D, T)
        xn = F.conv1d(F.pad(xn, (GM_TAPS - 1, 0)), self.shift, groups=GM_DIM).transpose(1, 2)  # causal, per channel
        u, v = F.gelu(self.proj_in(xn)).chunk(2, -1)  # (B, T, FF) each
        v = F.conv1d(self.sgu_norm(v), self.spatial_w.tril()[..., None], self.spatial_b)  # tokens as channels
        return x + self.proj_out(u * v)


@seeded
def gmlp():
    return GMlp(), (torch.randn(GM_BATCH, GM_T, GM_DIM),)


class DeepEquilibrium(nn.Module):
    """z* = tanh(W z* + U x) found by fixed-point iteration under torch.no_grad (until the update's norm falls below
    ``DQ_TOL``), then one more step with gradients (the one-step "phantom" gradient), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.inj = nn.Linear(DQ_IN, DQ_HIDDEN)
        self.w = nn.Linear(DQ_HIDDEN, DQ_HIDDEN, bias=False)
        with torch.no_grad():
            self.w.weight.copy_(torch.linalg.qr(torch.randn(DQ_HIDDEN, DQ_HIDDEN))[0] * DQ_CONTRACTION)
        self.head = nn.Linear(DQ_HIDDEN, DQ_CLASSES)

    def f(self, z, u):
        return torch.tanh(self.w(z) + u)

    def forward(self, x):
        u = self.inj(x)
        z = torch.zeros_like(u)
        with torch.no_grad():
            for _ in range(DQ_MAX_ITERS):
                z_next = self.f(z, u)
                done = bool((z_next - z).norm() < DQ_TOL)
                z = z_next
                if done:
                    break
        return self.head(self.f(z, u))


def deq_iterations(model: DeepEquilibrium, x: torch.Tensor) -> int:
    """Calls of f in the no-grad loop, found by running that loop again (plain torch, outside any profiler)."""
    with torch.no_grad():
        u = x @ model.inj.weight.t() + model.inj.bias
        z = torch.zeros_like(u)
        for calls in range(1, DQ_MAX_ITERS + 1):
            z_next = torch.tanh(z @ model.w.weight.t() + u)
            if float((z_next - z).norm()) < DQ_TOL:
                return calls
            z = z_next
    return DQ_MAX_ITERS


@seeded
def deq():
    return DeepEquilibrium(), (torch.randn(DQ_ROWS, DQ_IN),)


def rel_shift(x):
    """Transformer-XL's relative shift of (T, K, B, H) scores: pad a zero column, view as (K + 1, T), drop a row."""
    zero_pad = x.new_zeros((x.size(0), 1, *x.size()[2:]))
    padded = torch.cat([zero_pad, x], 1).view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return padded[1:].view_as(x)


class RelAttention(nn.Module):
    """A Transformer-XL layer's relative multi-head attention over [memory; tokens], sequence first, post-norm."""

    def __init__(self) -> None:
        super().__init__()
        hd = XL_DIM // XL_HEADS
        self.qkv = nn.Linear(XL_DIM, 3 * XL_DIM, bias=False)
        self.r_net = nn.Linear(XL_DIM, XL_DIM, bias=False)
        self.r_w_bias = nn.Parameter(torch.randn(XL_HEADS, hd) * 0.1)
        self.r_r_bias = nn.Parameter(torch.randn(XL_HEADS, hd) * 0.1)
        self.o = nn.Linear(XL_DIM, XL_DIM, bias=False)
        self.ln = nn.LayerNorm(XL_DIM)

    def forward(self, x, mems):  # x (T, B, D), mems (M, B, D)
        t, b, d = x.shape
        m = mems.shape[0]
        klen, hd = m + t, d // XL_HEADS
        cat = torch.cat([mems, x], 0)  # (K, B, D)
        pos_seq = torch.arange(klen - 1, -1, -1.0)
        inv_freq = 1 / (10000 ** (torch.arange(0.0, d, 2.0) / d))
        sinusoid = pos_seq[:, None] * inv_freq[None, :]  # (K, D/2)
        pos_emb = torch.cat([sinusoid.sin(), sinusoid.cos()], -1)  # (K, D)
        q, k, v = self.qkv(cat).chunk(3, -1)
        q = q[-t:].reshape(t, b, XL_HEADS, hd)
        k, v = k.reshape(klen, b, XL_HEADS, hd), v.reshape(klen, b, XL_HEADS, hd)
        r = self.r_net(pos_emb).view(klen, XL_HEADS, hd)
        ac = torch.einsum("ibnd,jbnd->ijbn", q + self.r_w_bias, k)  # (T, K, B, H)
        bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + self.r_r_bias, r))
        score = (ac + bd) * (1 / math.sqrt(hd))
        future = torch.ones(t, klen, dtype=torch.bool).triu(1 + m)[:, :, None, None]
        prob = score.masked_fill(future, float("-inf")).softmax(1)
        vec = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(t, b, d)
        return self.ln(x + self.o(vec)), cat[-m:].detach()


@seeded
def transformer_xl():
    return RelAttention(), (torch.randn(XL_T, XL_BATCH, XL_DIM), torch.randn(XL_MEM, XL_BATCH, XL_DIM))


class ProductKeyMemory(nn.Module):
    """Lample et al.'s product-key memory: a batch-normed query split in halves, each scored against its sub-keys,
    top-k of each, top-k of their cartesian sums, the chosen slots' values summed by an EmbeddingBag weighted by the
    softmax of their scores."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(PK_IN, PK_KEY)
        self.qbn = nn.BatchNorm1d(PK_KEY)
        self.keys = nn.Parameter(torch.randn(2, PK_SUBKEYS, PK_KEY // 2))
        self.values = nn.EmbeddingBag(PK_SUBKEYS**2, PK_VDIM, mode="sum")

    def forward(self, x):
        n = x.shape[0]
        q1, q2 = self.qbn(self.query(x)).chunk(2, -1)  # (N, K/2) each
        v1, i1 = (q1 @ self.keys[0].t()).topk(PK_TOPK, -1)
        v2, i2 = (q2 @ self.keys[1].t()).topk(PK_TOPK, -1)
        all_s = (v1[:, :, None] + v2[:, None, :]).view(n, PK_TOPK * PK_TOPK)
        all_i = (i1[:, :, None] * PK_SUBKEYS + i2[:, None, :]).view(n, PK_TOPK * PK_TOPK)
        s, best = all_s.topk(PK_TOPK, -1)
        idx = all_i.gather(1, best)  # (N, top-k) slots
        return self.values(idx, per_sample_weights=F.softmax(s, -1))


@seeded
def pkm():
    return ProductKeyMemory(), (torch.randn(PK_ROWS, PK_IN),)


def bipartite_merge(x, metric, r):
    """ToMe's bipartite soft matching: the even tokens' ``r`` most similar (cosine) to an odd token are averaged
    into it (scatter_reduce mean); the matching itself runs under no_grad."""
    d = x.shape[-1]
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
    src, dst = x[:, ::2], x[:, 1::2]
    unm = src.gather(1, unm_idx.expand(-1, -1, d))
    src = src.gather(1, src_idx.expand(-1, -1, d))
    dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce="mean")
    return torch.cat([unm, dst], 1)


class ToMeBlock(nn.Module):
    """A pre-norm ViT block whose attention is SDPA; ``TM_MERGE`` tokens merged by their keys' similarity between the
    attention and the MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(TM_DIM), nn.LayerNorm(TM_DIM)
        self.qkv = nn.Linear(TM_DIM, 3 * TM_DIM)
        self.proj = nn.Linear(TM_DIM, TM_DIM)
        self.mlp = nn.Sequential(nn.Linear(TM_DIM, 4 * TM_DIM), nn.GELU(), nn.Linear(4 * TM_DIM, TM_DIM))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, TM_HEADS, d // TM_HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        x = bipartite_merge(x, k.mean(1), TM_MERGE)  # (B, N - r, D)
        return x + self.mlp(self.ln2(x))


@seeded
def tome():
    return ToMeBlock(), (torch.randn(TM_BATCH, TM_TOKENS, TM_DIM),)


class ConvLstm(nn.Module):
    """A ConvLSTM cell (one 3x3 convolution of [frame; h] into four gates) stepped over the frames in Python, and a
    1x1 head on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CL_IN + CL_HIDDEN, 4 * CL_HIDDEN, 3, padding=1)
        self.head = nn.Conv2d(CL_HIDDEN, 1, 1)

    def forward(self, frames):  # (B, T, C, S, S)
        b, t, _, s, _ = frames.shape
        h = frames.new_zeros(b, CL_HIDDEN, s, s)
        c = frames.new_zeros(b, CL_HIDDEN, s, s)
        for step in range(t):
            i, f, o, g = self.conv(torch.cat([frames[:, step], h], 1)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h)


@seeded
def convlstm():
    return ConvLstm(), (torch.randn(CL_BATCH, CL_T, CL_IN, CL_SIDE, CL_SIDE),)


class Performer(nn.Module):
    """Performer attention (FAVOR+, non-causal): positive random features phi(x) = exp(w x - |x|^2 / 2 - max) / sqrt(m)
    of the scaled queries and keys, then phi(q) (phi(k)^T v) normalised by phi(q) sum phi(k)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(PF_DIM, 3 * PF_DIM)
        self.out = nn.Linear(PF_DIM, PF_DIM)
        self.register_buffer("proj", torch.randn(PF_FEATURES, PF_DIM // PF_HEADS))

    def features(self, x):  # (B, H, N, hd) -> (B, H, N, m)
        x = x * x.shape[-1] ** -0.25
        wx = x @ self.proj.t()
        sq = (x * x).sum(-1, keepdim=True) / 2
        return torch.exp(wx - sq - wx.amax(-1, keepdim=True).detach()) / math.sqrt(PF_FEATURES)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, PF_HEADS, d // PF_HEADS).permute(2, 0, 3, 1, 4)
        qp, kp = self.features(q), self.features(k)
        kv = torch.einsum("bhnm,bhnd->bhmd", kp, v)  # (B, H, m, hd)
        z = 1 / (torch.einsum("bhnm,bhm->bhn", qp, kp.sum(2)) + 1e-6)  # (B, H, N)
        out = (qp @ kv) * z[..., None]
        return self.out(out.transpose(1, 2).reshape(b, n, d))


@seeded
def performer():
    return Performer(), (torch.randn(PF_BATCH, PF_T, PF_DIM),)


class Siren(nn.Module):
    """An implicit neural representation: random Fourier features of 2-d coordinates, sine layers at frequency
    ``omega`` (keyword-only), an RGB head (sigmoid) and a signed-distance head, returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fourier", torch.randn(2, SI_FOURIER) * 3)
        self.layers = nn.ModuleList(
            [nn.Linear(2 * SI_FOURIER, SI_WIDTH)] + [nn.Linear(SI_WIDTH, SI_WIDTH) for _ in range(SI_LAYERS - 1)])
        self.rgb = nn.Linear(SI_WIDTH, 3)
        self.sdf = nn.Linear(SI_WIDTH, 1)

    def forward(self, *, coords, omega=30.0):
        proj = (2 * math.pi * coords) @ self.fourier  # (N, F)
        h = torch.cat([proj.sin(), proj.cos()], -1)
        for layer in self.layers:
            h = torch.sin(omega * layer(h))
        return {"rgb": torch.sigmoid(self.rgb(h)), "sdf": self.sdf(h)}


@seeded
def siren():
    return Siren(), {"coords": torch.rand(SI_POINTS, 2) * 2 - 1, "omega": 3.0}


class MBConv(nn.Module):
    """EfficientNet's MBConv: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, each with batch norm (SiLU
    between), a residual through stochastic depth (torchvision's: a per-sample Bernoulli keep, scaled by 1/keep
    probability, in training only)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(MB_C, MB_EXPAND, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(MB_EXPAND)
        self.dw = nn.Conv2d(MB_EXPAND, MB_EXPAND, 3, padding=1, groups=MB_EXPAND, bias=False)
        self.bn2 = nn.BatchNorm2d(MB_EXPAND)
        self.se_reduce = nn.Conv2d(MB_EXPAND, MB_SQUEEZE, 1)
        self.se_expand = nn.Conv2d(MB_SQUEEZE, MB_EXPAND, 1)
        self.project = nn.Conv2d(MB_EXPAND, MB_C, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(MB_C)

    def forward(self, x):
        h = F.silu(self.bn1(self.expand(x)))
        h = F.silu(self.bn2(self.dw(h)))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        h = self.bn3(self.project(h * s))
        if self.training:
            keep = 1 - MB_DROP
            noise = torch.empty(x.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
            h = h * noise
        return x + h


@seeded
def mbconv():
    model = MBConv().to(memory_format=torch.channels_last)
    return model, (torch.randn(MB_BATCH, MB_C, MB_SIDE, MB_SIDE).to(memory_format=torch.channels_last),)


MODELS = {
    "mlstm": (mlstm, True),
    "tabnet": (tabnet, True),
    "gmlp": (gmlp, True),
    "deq": (deq, True),
    "transformer_xl": (transformer_xl, True),
    "pkm": (pkm, True),
    "tome": (tome, True),
    "convlstm": (convlstm, True),
    "performer": (performer, True),
    "siren": (siren, True),
    "mbconv": (mbconv, True),
}
