"""Small models the perf code was not written against, for the held-out tests and `tilestack profile`.

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/heldout_models.py:convnet --device cpu

Each builder returns ``(model, inputs)``. Sizes are small so a CPU profiles them in a second, yet each op
lands where its kind of work lands on any device: the depthwise convolution low in FLOP/byte (2 FLOPs per
tap, one read and one write per element), the stem and pointwise ones high.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 2
IMAGE = 16  # pixels per side
STEM, WIDE = 64, 128  # channels after the stem, after the pointwise convolution
CLASSES = 10
TOKENS, DIM, HIDDEN = 16, 32, 64  # Mixer and transformer: sequence length, width, MLP width
HEADS, VOCAB = 4, 50


class DepthwiseConvNet(nn.Module):
    """Stem 3x3 convolution, a depthwise-separable block (depthwise 3x3 + pointwise 1x1), pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, STEM, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(STEM, STEM, 3, padding=1, groups=STEM, bias=False)
        self.pointwise = nn.Conv2d(STEM, WIDE, 1, bias=False)
        self.head = nn.Linear(WIDE, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        x = F.relu(self.stem(x))  # (B, STEM, H, W)
        x = F.relu(self.pointwise(self.depthwise(x)))  # (B, WIDE, H, W)
        return self.head(x.mean(dim=(2, 3)))  # (B, CLASSES)


class MixerBlock(nn.Module):
    """MLP-Mixer: an MLP across tokens (on the transposed sequence), then one across channels."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.tokens = nn.Sequential(nn.Linear(TOKENS, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, TOKENS))
        self.channels = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.blocks = nn.Sequential(MixerBlock(), MixerBlock())
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D) patches
        return self.head(self.blocks(self.embed(x)).mean(dim=1))  # (B, CLASSES)


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, D/H)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class TinyTransformer(nn.Module):
    """Token embedding, one pre-norm block (causal attention, GELU MLP), a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(DIM), nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = CausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, N)
        x = self.emb(tokens)  # (B, N, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm3(x))  # (B, N, VOCAB)


def convnet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return DepthwiseConvNet(), (torch.randn(BATCH, 3, IMAGE, IMAGE),)


def mixer() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Mixer(), (torch.randn(BATCH, TOKENS, DIM),)


def transformer() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyTransformer(), (torch.randint(0, VOCAB, (BATCH, TOKENS)),)


build = convnet
