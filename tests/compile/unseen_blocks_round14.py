"""Model blocks written by hand for the compile backend's unseen-models round 14, as their authors write them (no
transformers or timm package): an encoder layer on ``nn.MultiheadAttention`` (batch_first, a key padding mask,
``need_weights=False``) with a bias-free ``nn.GELU(approximate="tanh")`` FFN; grouped-query attention through SDPA's
``enable_gqa=True`` under a boolean (b, 1, n, n) mask (causal and padding at once); RMSNorm written by hand in three
ways (``x * rsqrt(mean(x^2) + eps)``, ``x / sqrt(mean(x^2) + eps)``, ``torch.nn.RMSNorm``) and two look-alikes that
are not one (the eps outside the root of ``x.norm``, ``F.normalize`` scaled by sqrt(d)); an MLP whose activation is
one of ``nn.GELU("tanh")``, ``nn.SiLU``, ``nn.Mish``, ``nn.Hardswish`` or the residual added before the activation;
a segmentation head's softmax over the classes, dim 1 of a (b, classes, h, w) map; cross-entropy written with soft
targets ``-(targets * log_softmax(z)).sum(-1).mean()``. Models for ``tilestack.quantize``: an MLP-Mixer (token mixing
over the transposed sequence, 13 tokens and 20 channels: no size a multiple of 16) whose two blocks share one
token-mixing MLP module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from unseen_blocks_round12 import HD, KV_HEADS, D, H, _heads, _merge, repeat_kv  # (same widths; shared helpers)
from unseen_blocks_round12 import seeded as seeded  # (re-exported: the round 14 tests take it from here)

EPS = 1e-6
TOKENS, CHANNELS, CLASSES = 13, 20, 5     # the mixer's sizes: none a multiple of 16


# ---- nn.MultiheadAttention -------------------------------------------------------------------------------------------
class MHAEncoderLayer(nn.Module):
    """A post-LN encoder layer on ``nn.MultiheadAttention(batch_first=True)`` called with a (b, n) boolean key padding
    mask (True: padding, torch's convention) and ``need_weights=False``, then an FFN of bias-free Linears around
    ``nn.GELU(approximate="tanh")``."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.up, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(2 * D, D, bias=False)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x, padding):
        a, weights = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        assert weights is None
        x = self.ln1(x + a)
        return self.ln2(x + self.down(self.act(self.up(x))))


class TorchDecoderLayer(nn.Module):
    """torch's own ``nn.TransformerDecoderLayer`` (batch_first, GELU, pre-LN or post-LN): causal self-attention from
    ``nn.Transformer.generate_square_subsequent_mask`` with ``tgt_is_causal=True``, then cross-attention over a memory
    of another length under ``memory_key_padding_mask``."""

    def __init__(self, norm_first: bool, dropout: float = 0.1):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(D, H, 2 * D, dropout=dropout, batch_first=True, norm_first=norm_first,
                                                activation="gelu")

    def forward(self, y, memory, memory_padding):
        causal = nn.Transformer.generate_square_subsequent_mask(y.shape[1], dtype=y.dtype)     # (n, n): 0 or -inf
        return self.layer(y, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_padding)


# ---- SDPA: enable_gqa under a boolean mask ---------------------------------------------------------------------------
class GQABoolMaskAttention(nn.Module):
    """H query heads over KV_HEADS key/value heads: ``form="gqa"`` passes the unexpanded k, v with
    ``enable_gqa=True``; ``form="repeat"`` expands them by ``repeat_kv`` first. The mask is one boolean (b, 1, n, n)
    (True: attend) of the causal triangle and the key padding (b, n)."""

    def __init__(self, form: str = "gqa"):
        super().__init__()
        self.form = form
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * KV_HEADS * HD, bias=False)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q = _heads(self.q(x), b, n)                                                    # (b, H, n, HD)
        k, v = (_heads(t, b, n, KV_HEADS) for t in self.kv(x).chunk(2, dim=-1))       # (b, KV, n, HD)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & keep[:, None, None, :]                            # (b, 1, n, n)
        if self.form == "gqa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            rep = H // KV_HEADS
            a = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask)
        return self.o(_merge(a))


# ---- RMSNorm by hand, and look-alikes --------------------------------------------------------------------------------
RMS_FORMS = ("rsqrt", "div-sqrt", "nn", "norm-eps-outside", "normalize")


class RMSNormForms(nn.Module):
    """A Linear then an RMSNorm over the last dim with a weight, written as ``form``: ``"rsqrt"`` x * rsqrt(mean(x^2) +
    eps) * w; ``"div-sqrt"`` x / sqrt(mean(x^2) + eps) * w; ``"nn"`` torch.nn.RMSNorm; and two that are not RMSNorm
    exactly: ``"norm-eps-outside"`` x / (||x|| / sqrt(d) + eps) * w (the eps added to the RMS, not to its square) and
    ``"normalize"`` F.normalize(x) * sqrt(d) * w (its eps clamps the norm from below)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(D, D)
        weight = 1 + 0.1 * torch.randn(D)
        if form == "nn":
            self.rms = nn.RMSNorm(D, eps=EPS)
            with torch.no_grad():
                self.rms.weight.copy_(weight)
        else:
            self.weight = nn.Parameter(weight)

    def forward(self, x):
        h = self.fc(x)
        if self.form == "rsqrt":
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.weight
        if self.form == "div-sqrt":
            return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.weight
        if self.form == "nn":
            return self.rms(h)
        if self.form == "norm-eps-outside":
            return h / (h.norm(2, dim=-1, keepdim=True) / math.sqrt(D) + EPS) * self.weight
        return F.normalize(h, dim=-1) * math.sqrt(D) * self.weight


# ---- activations after a Linear --------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu-tanh", "silu", "mish", "hardswish", "residual-first")


class ActivationMLP(nn.Module):
    """A bias-free up projection, the activation ``act`` as its module (``nn.GELU("tanh")``, ``nn.SiLU``, ``nn.Mish``,
    ``nn.Hardswish``) then the down projection with the residual; ``"residual-first"``: a square Linear's output plus
    the input, then the GELU (the residual inside the activation), then the down projection."""

    def __init__(self, act: str):
        super().__init__()
        self.act_name = act
        self.up = nn.Linear(D, D if act == "residual-first" else 2 * D, bias=False)
        self.down = nn.Linear(D if act == "residual-first" else 2 * D, D)
        self.act = {"gelu-tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "mish": nn.Mish(),
                    "hardswish": nn.Hardswish(), "residual-first": nn.GELU()}[act]

    def forward(self, x):
        if self.act_name == "residual-first":
            return self.down(self.act(self.up(x) + x))
        return x + self.down(self.act(self.up(x)))


# ---- softmax over the classes of a map -------------------------------------------------------------------------------
class SegmentationHead(nn.Module):
    """A 1 x 1 convolution to CLASSES logits per pixel, then the softmax over the classes: dim 1 of (b, classes, h, w);
    and the per-pixel mean of the probabilities' entropy."""

    def __init__(self):
        super().__init__()
        self.classify = nn.Conv2d(D, CLASSES, 1)

    def forward(self, feats):
        p = F.softmax(self.classify(feats), dim=1)                                    # (b, CLASSES, h, w)
        return p, -(p * torch.log(p)).sum(1).mean()


# ---- cross-entropy with soft targets ---------------------------------------------------------------------------------
class SoftTargetClassifier(nn.Module):
    """A LayerNorm, a bias-free head to CLASSES and the cross-entropy against soft targets (b, CLASSES), written out as
    ``-(targets * F.log_softmax(logits, -1)).sum(-1).mean()`` (knowledge distillation, mixup)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES, bias=False)

    def forward(self, x, targets):
        logits = self.head(self.norm(x))
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


# ---- models for tilestack.quantize -----------------------------------------------------------------------------------
class TokenMixingMLP(nn.Module):
    def __init__(self, tokens: int = TOKENS, hidden: int = 7):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens)

    def forward(self, x):                                                              # (b, c, tokens)
        return self.fc2(F.gelu(self.fc1(x)))


class MixerBlock(nn.Module):
    """MLP-Mixer's block: LayerNorm, token mixing over the transposed sequence (a Linear over the tokens), residual;
    LayerNorm, channel mixing, residual. ``token_mlp`` given: that module (shared with another block)."""

    def __init__(self, token_mlp: nn.Module | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(CHANNELS), nn.LayerNorm(CHANNELS)
        self.token_mlp = token_mlp if token_mlp is not None else TokenMixingMLP()
        self.channel_fc1, self.channel_fc2 = nn.Linear(CHANNELS, 3 * CHANNELS), nn.Linear(3 * CHANNELS, CHANNELS)

    def forward(self, x):                                                              # (b, TOKENS, CHANNELS)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class SharedMixer(nn.Module):
    """A patch embedding Linear (11 -> CHANNELS), two Mixer blocks sharing one token-mixing MLP (the same module
    under ``blocks.0.token_mlp`` and ``blocks.1.token_mlp``), a final LayerNorm, mean pooling over the tokens and a
    bias-free head to CLASSES."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(11, CHANNELS)
        shared = TokenMixingMLP()
        self.blocks = nn.ModuleList([MixerBlock(shared), MixerBlock(shared)])
        self.norm = nn.LayerNorm(CHANNELS)
        self.head = nn.Linear(CHANNELS, CLASSES, bias=False)

    def forward(self, patches):                                                        # (b, TOKENS, 11)
        x = self.embed(patches)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))
