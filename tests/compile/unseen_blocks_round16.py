"""Model blocks written by hand for the compile backend's unseen-models round 16, as their authors write them (no
transformers, timm or diffusers package): DiT's adaLN-Zero block (a parameter-free LayerNorm modulated by shift and
scale from a conditioning vector, gated residuals), a DeepNet post-LN block (``LayerNorm(x * alpha + f(x))``) with an
old-BERT additive padding mask of -10000, a CNN of conv + BatchNorm + ReLU with adaptive pooling and a Linear head, a
pre-norm Llama-like block (``nn.RMSNorm``) whose residuals are scaled by a constant, grouped-query attention by
``repeat_interleave`` and a SwiGLU MLP, attention under masks of rank 2 and 3 (shared over the batch, or over the
batch and heads), a decoder whose causal mask is built in forward (called at two lengths), and wav2vec 2.0's feature
projection (a Conv1d, then a LayerNorm of the transposed, non-contiguous features), a cross-attention
under a key padding mask whose memory may be empty. Models for ``tilestack.quantize``:
a time-embedding MLP whose first Linear has one input feature, a Linear with pruned (all-zero) output channels, and
layers it leaves in float (a LoRA subclass of nn.Linear, nn.Bilinear, an uninitialized nn.LazyLinear)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from unseen_blocks_round12 import HD, KV_HEADS, D, H, _heads, _merge  # (same widths; shared helpers)
from unseen_blocks_round12 import seeded as seeded  # (re-exported: the round 16 tests take it from here)

DEEPNORM_ALPHA = 1.6        # DeepNet's residual scale for a small encoder, (2 N) ** 0.25 at N = 3
OLD_BERT_MASK = -10000.0    # older BERT code's padding bias, added to the scores
RES_SCALE = 0.5             # the pre-norm block's constant residual scale
CLASSES = 10
CONV_CHANNELS = (3, 8, 16)
TIME_DIM = 16               # the time embedding's width


def modulate(x, shift, scale):
    """DiT's ``x * (1 + scale) + shift`` of (b, n, D) rows by one (b, D) shift and scale per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """DiT's adaLN-Zero block: ``c`` (b, D) -> SiLU -> Linear(D, 6 D) -> shift, scale and gate for the attention and
    the MLP; each sublayer reads a parameter-free LayerNorm (eps 1e-6) of x, modulated; its output gated into the
    residual. Attention through SDPA, a tanh-GELU MLP."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.act = nn.GELU(approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def attn(self, h):
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)     # (b, H, n, HD) each
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.fc2(self.act(self.fc1(h)))


class DeepNormBlock(nn.Module):
    """DeepNet's post-LN encoder layer: ``ln(x * alpha + f(x))`` after the attention and after the ReLU MLP. The
    padding as older BERT code adds it: ``(1 - keep) * -10000`` (keep (b, n) float 1 / 0) added to the scores."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = (_heads(t, b, n) for t in self.qkv(x).chunk(3, dim=-1))                # (b, H, n, HD)
        bias = (1.0 - keep[:, None, None, :]) * OLD_BERT_MASK                             # (b, 1, 1, n)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD) + bias
        o = nn.functional.softmax(s, dim=-1) @ v
        x = self.ln1(x * DEEPNORM_ALPHA + self.out(_merge(o)))
        return self.ln2(x * DEEPNORM_ALPHA + self.fc2(F.relu(self.fc1(x))))


class ConvBNClassifier(nn.Module):
    """Two conv + BatchNorm + ReLU stages (the second strided), ``AdaptiveAvgPool2d(1)``, flatten, a Linear + ReLU,
    dropout, the class Linear, and the class probabilities by softmax."""

    def __init__(self):
        super().__init__()
        c0, c1, c2 = CONV_CHANNELS
        self.features = nn.Sequential(
            nn.Conv2d(c0, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, 32)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):                                  # x (b, 3, h, w)
        h = torch.flatten(self.pool(self.features(x)), 1)  # (b, c2)
        return self.head(self.drop(F.relu(self.fc(h)))).softmax(dim=-1)


class ScaledResidualGQABlock(nn.Module):
    """A pre-norm decoder block on ``nn.RMSNorm``: causal grouped-query attention (KV_HEADS key/value heads repeated
    by ``repeat_interleave`` for SDPA's ``is_causal``), a SwiGLU MLP ``down(silu(gate(h)) * up(h))``, each residual
    scaled by a constant: ``x + RES_SCALE * f(norm(x))``."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(D, eps=1e-6), nn.RMSNorm(D, eps=1e-6)
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * KV_HEADS * HD, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def attn(self, h):
        b, n, _ = h.shape
        q = _heads(self.q(h), b, n)                                                   # (b, H, n, HD)
        k, v = (_heads(t, b, n, KV_HEADS) for t in self.kv(h).chunk(2, dim=-1))      # (b, KV, n, HD)
        k, v = (t.repeat_interleave(H // KV_HEADS, dim=1) for t in (k, v))          # (b, H, n, HD)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))

    def forward(self, x):
        x = x + RES_SCALE * self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + RES_SCALE * self.down(F.silu(self.gate(h)) * self.up(h))


class RankedMaskAttention(nn.Module):
    """Attention under a float bias of rank 2 (n, n), shared by every sequence and head (a T5-like bias with the
    causal -inf), or of rank 3 (H, n, n), shared by the sequences (ALiBi's per-head slopes with it): through SDPA's
    ``attn_mask`` or added to the scores written out."""

    def __init__(self, form: str, rank: int, n_max: int = 16):
        super().__init__()
        self.form, self.rank = form, rank
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        pos = torch.arange(n_max)
        distance = (pos[None, :] - pos[:, None]).float()                                 # (n_max, n_max): j - i
        causal = torch.full((n_max, n_max), float("-inf")).triu(1)
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
        bias = slopes[:, None, None] * distance if rank == 3 else 0.1 * torch.tanh(distance / 3)
        self.register_buffer("bias", bias + causal, persistent=False)          # (H, n_max, n_max) or (n_max, n_max)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (_heads(t, b, n) for t in self.qkv(x).split(D, dim=-1))                 # (b, H, n, HD)
        bias = self.bias[..., :n, :n].to(x.dtype)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            o = torch.softmax(q @ k.transpose(-2, -1) * HD ** -0.5 + bias, dim=-1) @ v
        return x + self.out(_merge(o))


class InlineCausalDecoder(nn.Module):
    """A decoder layer whose causal mask is made in forward at the call's length (``torch.ones(n, n).tril()`` as
    booleans, ``masked_fill(~causal, -inf)``), pre-LN, a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (_heads(t, b, n) for t in self.qkv(self.ln1(x)).split(D, dim=-1))      # (b, H, n, HD)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        s = (q @ k.transpose(-2, -1) / math.sqrt(HD)).masked_fill(~causal, float("-inf"))
        x = x + self.out(_merge(s.softmax(-1) @ v))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Wav2VecFeatureProjection(nn.Module):
    """wav2vec 2.0's front: a strided Conv1d over the waveform (b, 1, t) with GELU, the features transposed to
    (b, frames, C) (a non-contiguous view), a LayerNorm of them, and the projection to the model width."""

    def __init__(self, channels: int = 12):
        super().__init__()
        self.conv = nn.Conv1d(1, channels, kernel_size=5, stride=3, bias=False)
        self.layer_norm = nn.LayerNorm(channels)
        self.projection = nn.Linear(channels, D)

    def forward(self, wave):                                # wave (b, 1, t)
        h = F.gelu(self.conv(wave)).transpose(1, 2)         # (b, frames, channels), strides of (b, channels, frames)
        return self.projection(self.layer_norm(h))


class PaddedCrossAttention(nn.Module):
    """A decoder's cross-attention over encoder states under their key padding mask ``keep`` (b, m; True: a real
    state), applied as Hugging Face applies it: ``masked_fill(~keep, finfo.min)`` on the scores ("fill"), the
    additive ``(1 - keep) * finfo.min`` added to them ("additive"), or that bias as SDPA's float ``attn_mask``
    ("sdpa"). The memory may be empty (m = 0: an encoder given no frames)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q, self.kv, self.out = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)

    def forward(self, y, memory, keep):
        b, n, _ = y.shape
        m = memory.shape[1]
        q = _heads(self.q(y), b, n)                                                      # (b, H, n, HD)
        # (b, H, m, HD); reshape, not view: a split of no state's columns has strides a view cannot follow
        k, v = (t.reshape(b, m, H, HD).transpose(1, 2) for t in self.kv(memory).split(D, dim=-1))
        low = torch.finfo(y.dtype).min
        bias = (1.0 - keep[:, None, None, :].to(y.dtype)) * low                          # (b, 1, 1, m)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            s = q @ k.transpose(-1, -2) / math.sqrt(HD)                                  # (b, H, n, m)
            s = s.masked_fill(~keep[:, None, None, :], low) if self.form == "fill" else s + bias
            o = s.softmax(-1) @ v
        return y + self.out(_merge(o))


# ---- models for tilestack.quantize ----------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """A diffusion model's timestep MLP: t (b, 1) -> Linear(1, TIME_DIM) -> SiLU -> Linear(TIME_DIM, TIME_DIM)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, TIME_DIM)
        self.out = nn.Linear(TIME_DIM, TIME_DIM)

    def forward(self, t):
        return self.out(F.silu(self.inp(t)))


class LoRALinear(nn.Linear):
    """A LoRA layer: the frozen base weight plus ``B @ A`` of rank 2, as an nn.Linear subclass with its own forward."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2):
        super().__init__(d_in, d_out)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(d_out, rank) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


class MixedLayers(nn.Module):
    """One plain Linear, a LoRA subclass of nn.Linear, an nn.Bilinear and (``lazy``) an nn.LazyLinear never run."""

    def __init__(self, lazy: bool = False):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.lora = LoRALinear(D, D)
        self.bilinear = nn.Bilinear(D, D, 4)
        self.lazy = nn.LazyLinear(4) if lazy else None

    def forward(self, x):
        h = F.relu(self.fc(x))
        y = self.bilinear(self.lora(h), h)
        return y if self.lazy is None else y + self.lazy(h)
