"""Nineteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round19*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round19.py:conformer --device cpu --train

The kinds: a whole Conformer block (two macaron half-step feed-forwards, nn.MultiheadAttention, the convolution
module with GLU, a depthwise Conv1d and BatchNorm1d in eval, a final LayerNorm); a Perceiver whose learned latents
(one parameter expanded over the batch) cross-attend to the inputs by F.scaled_dot_product_attention (4 queries over
12 keys), then one latent self-attention block applied twice (its weights shared) and a head tied to the query
projection; a VAE with an explicit reparameterisation (randn_like) returning its ELBO loss (BCE with logits summed,
the KL written out); a Tucker-style trilinear form by a four-operand torch.einsum; a segmentation head (PReLU,
Dropout2d, LPPool2d, a bilinear upsample, cross-entropy over (N, C, H, W) logits with class weights and an ignored
label); an energy model whose forward takes the Hessian's trace by torch.func.hessian (forward-over-reverse);
robust set pooling by torch.median and torch.kthvalue along a dim; and an in-place gated residual stack written
with addcmul_, mul_ and clamp_ on activations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# Conformer: batch, frames, width, heads, feed-forward, depthwise kernel
CF_BATCH, CF_T, CF_DIM, CF_HEADS, CF_FF, CF_K = 2, 6, 8, 2, 16, 3
# Perceiver: batch, inputs, input features, latents, width, heads, latent MLP width
PC_BATCH, PC_N, PC_IN, PC_LATENTS, PC_DIM, PC_HEADS, PC_MLP = 2, 12, 6, 4, 8, 2, 16
# VAE: batch, features, hidden, latent
VA_BATCH, VA_IN, VA_HIDDEN, VA_Z = 4, 12, 8, 3
# Tucker form: batch, the three factor widths
TK_BATCH, TK_I, TK_J, TK_K = 3, 4, 5, 6
# segmentation head: batch, channels in, side, hidden channels, classes, the ignored label
SG_BATCH, SG_IN, SG_HW, SG_HIDDEN, SG_CLASSES, SG_IGNORE = 2, 3, 8, 4, 3, 255
# energy model: batch, coordinates, hidden
EN_BATCH, EN_X, EN_HIDDEN = 2, 3, 5
# robust set pooling: batch, set size, features, the k of kthvalue
RB_BATCH, RB_SET, RB_FEAT, RB_K = 3, 7, 4, 2
# in-place gated stack: batch, width, blocks
IP_BATCH, IP_DIM, IP_BLOCKS = 4, 6, 3


class FeedForward(nn.Module):
    """LayerNorm, Linear D -> FF, SiLU, Linear FF -> D (the Conformer's macaron halves)."""

    def __init__(self, d, ff) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        return self.down(F.silu(self.up(self.norm(x))))


class ConformerBlock(nn.Module):
    """x + FF/2, + MHSA, + conv module, + FF/2, LayerNorm (Gulati et al. 2020)."""

    def __init__(self, d=CF_DIM, h=CF_HEADS, ff=CF_FF, k=CF_K) -> None:
        super().__init__()
        self.ff1, self.ff2 = FeedForward(d, ff), FeedForward(d, ff)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pointwise2 = nn.Conv1d(d, d, 1)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x):  # (B, T, D)
        x = x + 0.5 * self.ff1(x)
        a = self.attn_norm(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        c = self.conv_norm(x).transpose(1, 2)  # (B, D, T)
        c = F.glu(self.pointwise1(c), dim=1)
        c = self.pointwise2(F.silu(self.bn(self.depthwise(c))))
        x = x + c.transpose(1, 2)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)


@seeded
def conformer():
    model = ConformerBlock().eval()  # BatchNorm by its running statistics, as at inference and fine-tuning
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(CF_BATCH, CF_T, CF_DIM),)


class LatentBlock(nn.Module):
    """Pre-norm self-attention over the latents by SDPA (packed qkv) and a GELU MLP."""

    def __init__(self, d=PC_DIM, h=PC_HEADS, mlp=PC_MLP) -> None:
        super().__init__()
        self.h = h
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, z):  # (B, L, D)
        b, n, d = z.shape
        q, k, v = self.qkv(self.norm1(z)).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        z = z + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return z + self.fc2(F.gelu(self.fc1(self.norm2(z))))


class Perceiver(nn.Module):
    """Learned latents (L, D) expanded over the batch cross-attend to the inputs (keys and values from one packed
    projection of the C-wide inputs), then one latent block applied twice (shared weights), a mean over latents and a
    head tied to the query projection's weight (D x D)."""

    def __init__(self) -> None:
        super().__init__()
        d = PC_DIM
        self.latents = nn.Parameter(torch.randn(PC_LATENTS, d))
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(PC_IN, 2 * d)
        self.block = LatentBlock()

    def forward(self, x):  # (B, N, C)
        b, h, d = x.shape[0], PC_HEADS, PC_DIM
        z = self.latents.expand(b, -1, -1)  # (B, L, D), a stride-0 view of one (L, D) parameter
        q = self.q(z).view(b, PC_LATENTS, h, d // h).transpose(1, 2)  # (B, H, L, hd)
        k, v = self.kv(x).view(b, PC_N, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, H, N, hd) each
        z = z + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, PC_LATENTS, d)
        z = self.block(self.block(z))  # the same weights twice
        return F.linear(z.mean(1), self.q.weight)  # (B, D), tied to the query projection


@seeded
def perceiver():
    return Perceiver(), (torch.randn(PC_BATCH, PC_N, PC_IN),)


class ReparamVAE(nn.Module):
    """Encoder to (mu, logvar), z = mu + eps * exp(logvar / 2) with eps = randn_like, a decoder to logits; forward
    returns the negative ELBO per sample: BCE with logits summed plus KL(q || N(0, I)) written out."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(VA_IN, VA_HIDDEN)
        self.mu, self.logvar = nn.Linear(VA_HIDDEN, VA_Z), nn.Linear(VA_HIDDEN, VA_Z)
        self.dec1, self.dec2 = nn.Linear(VA_Z, VA_HIDDEN), nn.Linear(VA_HIDDEN, VA_IN)

    def forward(self, x):  # (B, IN) in [0, 1]
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn_like(std) * std
        logits = self.dec2(F.relu(self.dec1(z)))
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (recon + kl) / x.shape[0]


@seeded
def vae():
    return ReparamVAE(), (torch.rand(VA_BATCH, VA_IN),)


class TuckerForm(nn.Module):
    """y_b = sum_ijk a_bi b_bj c_bk G_ijk: three factor projections and a four-operand einsum with a core tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.core = nn.Parameter(torch.randn(TK_I, TK_J, TK_K))

    def forward(self, a, b, c):  # (B, I), (B, J), (B, K)
        return torch.einsum("bi,bj,bk,ijk->b", a, b, c, self.core)


@seeded
def tucker():
    return TuckerForm(), (torch.randn(TK_BATCH, TK_I), torch.randn(TK_BATCH, TK_J), torch.randn(TK_BATCH, TK_K))


class SegHead(nn.Module):
    """3x3 convolution, PReLU (a slope per channel), Dropout2d, LPPool2d(p=2, 2x2), a 1x1 classifier, a bilinear x2
    upsample back to the input's size, and cross-entropy over (N, C, H, W) logits with class weights and an ignored
    label; forward returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(SG_IN, SG_HIDDEN, 3, padding=1)
        self.act = nn.PReLU(SG_HIDDEN)
        self.drop = nn.Dropout2d(0.25)
        self.pool = nn.LPPool2d(2, 2)
        self.cls = nn.Conv2d(SG_HIDDEN, SG_CLASSES, 1)
        self.register_buffer("weight", torch.tensor([1.0, 2.0, 0.5]))

    def forward(self, x, target):
        logits = self.cls(self.pool(self.drop(self.act(self.conv(x)))))
        logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=SG_IGNORE)


@seeded
def seg_head():
    target = torch.randint(0, SG_CLASSES, (SG_BATCH, SG_HW, SG_HW))
    target[:, 0, :] = SG_IGNORE  # the first row of every image unlabelled
    return SegHead().train(), (torch.randn(SG_BATCH, SG_IN, SG_HW, SG_HW), target)


class HessianEnergy(nn.Module):
    """E(x) = w . tanh(W x + b) per sample; forward returns E and the Laplacian (the trace of the Hessian in x) by
    torch.func.hessian, vmapped over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(EN_X, EN_HIDDEN)
        self.w = nn.Parameter(torch.randn(EN_HIDDEN))

    def energy(self, x):  # (X,)
        return torch.tanh(self.lin(x)) @ self.w

    def forward(self, x):  # (B, X)
        hess = torch.vmap(torch.func.hessian(self.energy))(x)  # (B, X, X)
        return torch.vmap(self.energy)(x) + hess.diagonal(dim1=1, dim2=2).sum(-1)


@seeded
def hessian_energy():
    return HessianEnergy(), (torch.randn(EN_BATCH, EN_X),)


class RobustPool(nn.Module):
    """Per set: a linear embedding, the median over the set and the k-th smallest value, concatenated and projected."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(RB_FEAT, RB_FEAT)
        self.out = nn.Linear(2 * RB_FEAT, 1)

    def forward(self, x):  # (B, S, F)
        e = self.embed(x)
        med = e.median(dim=1).values
        kth = e.kthvalue(RB_K, dim=1).values
        return self.out(torch.cat([med, kth], dim=-1))


@seeded
def robust_pool():
    return RobustPool(), (torch.randn(RB_BATCH, RB_SET, RB_FEAT),)


class InplaceGated(nn.Module):
    """Blocks of h = x + sigmoid(gate(x)) * tanh(value(x)) written in place (addcmul_ on a clone, mul_, clamp_)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(IP_DIM, IP_DIM) for _ in range(IP_BLOCKS))
        self.values = nn.ModuleList(nn.Linear(IP_DIM, IP_DIM) for _ in range(IP_BLOCKS))

    def forward(self, x):  # (B, D)
        for gate, value in zip(self.gates, self.values, strict=True):
            g = gate(x).sigmoid_()
            v = value(x).tanh_()
            x = x.clone().addcmul_(g, v)
            x.mul_(0.5).clamp_(-3.0, 3.0)
        return x


@seeded
def inplace_gated():
    return InplaceGated(), (torch.randn(IP_BATCH, IP_DIM),)


MODELS = {
    "conformer": (conformer, True),
    "perceiver": (perceiver, True),
    "vae": (vae, True),
    "tucker": (tucker, True),
    "seg_head": (seg_head, True),
    "hessian_energy": (hessian_energy, True),
    "robust_pool": (robust_pool, True),
    "inplace_gated": (inplace_gated, True),
}
