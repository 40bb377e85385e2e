"""Model blocks written by hand for the compile backend's unseen-models round 12, as their authors write them (no
transformers, timm or whisper package): a T5 encoder block (a relative-position bias from log-spaced buckets through an
embedding, returned for the next layer to reuse; T5's RMSNorm without bias, its variance in f32; unscaled scores; the
softmax in f32 cast back; a gated-GELU FFN ``gelu_tanh(wi_0(x)) * wi_1(x)``); a BERT layer with its embeddings (word,
position and token-type tables summed, then LayerNorm) and an extended padding mask ``(1 - mask) * finfo.min``,
returning a dict with a tanh pooler; a Mistral-style block with grouped-query attention by ``repeat_kv``, rotary in the
half-split layout and a sliding-window causal mask built from ``triu`` / ``tril`` as a boolean for SDPA; a Whisper-like
audio encoder (two ``conv1d`` + GELU, the second strided, a sinusoidal position buffer, pre-LN blocks with a
bias-free key projection); a ViT block with tanh GELU and layer scale; a tied autoencoder whose decoder is
``F.linear(h, w.t())`` of the encoder's weight (and the same written ``h @ w``); a conv + BatchNorm + Linear
classifier trained with its running statistics moving; and a block that breaks the graph (``.item()`` deciding a
branch). Models for ``tilestack.quantize``: Linears of odd sizes with and without bias, a head tied to another Linear's
weight, a layer used twice."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, H = 32, 4
HD = D // H
KV_HEADS = 2
VOCAB, TYPES, MAX_POS = 50, 2, 32
MELS = 6


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


def _heads(t, b, n, heads: int = H):
    """(b, n, heads * HD) -> (b, heads, n, HD)."""
    return t.view(b, n, heads, HD).transpose(1, 2)


def _merge(t):
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


# ---- T5 --------------------------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """T5's norm: no mean, no bias; the variance in f32, the weight applied in its own dtype (T5's cast for half)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def t5_bucket(relative_position, num_buckets: int = 8, max_distance: int = 16):
    """T5's bidirectional bucket of each relative position: half the buckets for each sign, the nearer half of those
    exact, the rest log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    relative_position = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class T5Block(nn.Module):
    """One T5 encoder layer: pre-norm self-attention with unscaled scores plus the position bias (and the padding
    bias folded into it), the softmax in f32 cast back, then the gated-GELU FFN. ``has_bias``: this layer makes the
    bias (the first of a stack); the others take it. Returns (hidden, position_bias)."""

    def __init__(self, has_bias: bool = True, buckets: int = 8):
        super().__init__()
        self.ln1, self.ln2 = T5LayerNorm(D), T5LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.wi_0, self.wi_1 = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.wo = nn.Linear(2 * D, D, bias=False)
        self.drop = nn.Dropout(0.1)
        self.buckets = buckets
        self.relative_attention_bias = nn.Embedding(buckets, H) if has_bias else None

    def compute_bias(self, n: int, device):
        context = torch.arange(n, dtype=torch.long, device=device)[:, None]
        memory = torch.arange(n, dtype=torch.long, device=device)[None, :]
        bucket = t5_bucket(memory - context, self.buckets)                           # (n, n)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)   # (1, H, n, n)

    def forward(self, x, mask, position_bias=None):
        b, n, _ = x.shape
        h = self.ln1(x)
        q, k, v = _heads(self.q(h), b, n), _heads(self.k(h), b, n), _heads(self.v(h), b, n)
        scores = torch.matmul(q, k.transpose(3, 2))                                  # (b, H, n, n), unscaled
        if position_bias is None:
            position_bias = self.compute_bias(n, x.device)
            extended = (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
            position_bias = position_bias + extended                                 # (b, H, n, n)
        scores += position_bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        attn = self.drop(attn)
        x = x + self.drop(self.o(_merge(torch.matmul(attn, v))))
        h = self.ln2(x)
        gelu = F.gelu(self.wi_0(h), approximate="tanh")
        x = x + self.drop(self.wo(self.drop(gelu * self.wi_1(h))))
        return x, position_bias


class T5Stack(nn.Module):
    """Two T5 blocks sharing the first one's position bias, then the final norm."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([T5Block(True), T5Block(False)])
        self.final = T5LayerNorm(D)

    def forward(self, x, mask):
        bias = None
        for block in self.blocks:
            x, bias = block(x, mask, bias)
        return self.final(x)


# ---- BERT with its embeddings ----------------------------------------------------------------------------------------
class BertWithEmbeddings(nn.Module):
    """Word + position + token-type embeddings summed, LayerNorm; one post-LN layer with an extended padding mask
    ``(1 - mask) * finfo.min`` added to the scaled scores; a tanh pooler over the first token. Returns a dict."""

    def __init__(self):
        super().__init__()
        self.word, self.pos, self.types = nn.Embedding(VOCAB, D), nn.Embedding(MAX_POS, D), nn.Embedding(TYPES, D)
        self.register_buffer("position_ids", torch.arange(MAX_POS).expand(1, -1), persistent=False)
        self.emb_ln = nn.LayerNorm(D, eps=1e-12)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-12), nn.LayerNorm(D, eps=1e-12)
        self.inter, self.out = nn.Linear(D, 3 * D), nn.Linear(3 * D, D)
        self.pool = nn.Linear(D, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, input_ids, token_type_ids, attention_mask):
        b, n = input_ids.shape
        pos = self.position_ids[:, :n]
        e = self.word(input_ids) + self.types(token_type_ids)
        e = e + self.pos(pos)
        x = self.drop(self.emb_ln(e))
        dtype = x.dtype
        extended = attention_mask[:, None, None, :].to(dtype)
        extended = (1.0 - extended) * torch.finfo(dtype).min                         # (b, 1, 1, n)
        q, k, v = _heads(self.q(x), b, n), _heads(self.k(x), b, n), _heads(self.v(x), b, n)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD) + extended
        p = self.drop(nn.functional.softmax(s, dim=-1))
        x = self.ln1(self.drop(self.o(_merge(torch.matmul(p, v)))) + x)
        x = self.ln2(self.drop(self.out(F.gelu(self.inter(x)))) + x)
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pool(x[:, 0]))}


# ---- Mistral: GQA, rotary, a sliding window --------------------------------------------------------------------------
def rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def repeat_kv(t, n_rep: int):
    b, kv, n, hd = t.shape
    if n_rep == 1:
        return t
    return t[:, :, None, :, :].expand(b, kv, n_rep, n, hd).reshape(b, kv * n_rep, n, hd)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SlidingWindowBlock(nn.Module):
    """Mistral's layer at toy size: RMSNorms, GQA (4 query heads over 2 key/value heads by ``repeat_kv``), rotary in
    the half-split layout, a causal sliding window of ``window`` keys as a boolean mask for SDPA (``form="sdpa"``) or
    written out with ``masked_fill(~allowed, finfo.min)`` and the softmax in f32 (``form="explicit"``); SwiGLU MLP."""

    def __init__(self, form: str = "sdpa", window: int = 3):
        super().__init__()
        self.form, self.window = form, window
        self.ln1, self.ln2 = RMSNorm(D), RMSNorm(D)
        self.q = nn.Linear(D, D, bias=False)
        self.k, self.v = nn.Linear(D, KV_HEADS * HD, bias=False), nn.Linear(D, KV_HEADS * HD, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.ln1(x)
        q, k, v = _heads(self.q(h), b, n), _heads(self.k(h), b, n, KV_HEADS), _heads(self.v(h), b, n, KV_HEADS)
        t = torch.arange(n, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)                        # (n, HD)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().triu(-(self.window - 1))   # (n, n)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HD)
            s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
            a = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        x = x + self.o(_merge(a))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


# ---- Whisper-like audio encoder --------------------------------------------------------------------------------------
def sinusoids(length: int, channels: int, max_timescale: float = 10000.0):
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)                            # (length, channels)


class WhisperBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_ln, self.mlp_ln = nn.LayerNorm(D), nn.LayerNorm(D)
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D)
        self.out = nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.attn_ln(x)
        q, k, v = _heads(self.query(h), b, n), _heads(self.key(h), b, n), _heads(self.value(h), b, n)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(_merge(a))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    """(b, MELS, frames) -> (b, frames / 2, D): conv1d + GELU twice (the second stride 2), channels to the last dim,
    plus the first n rows of a sinusoidal buffer; two pre-LN blocks; ln_post."""

    def __init__(self, frames: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(MELS, D, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(D, D, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(frames // 2, D))
        self.blocks = nn.ModuleList([WhisperBlock(), WhisperBlock()])
        self.ln_post = nn.LayerNorm(D)

    def forward(self, mel):
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)                                                       # (b, n, D)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


# ---- ViT with tanh GELU and layer scale ------------------------------------------------------------------------------
class ViTLayerScale(nn.Module):
    """A class token, a learned position table, pre-LN at eps 1e-6, SDPA, a tanh-GELU MLP, layer scale ``gamma *``
    on both branches; the class token's LayerNorm'd row through a head."""

    def __init__(self, patches: int = 6, classes: int = 5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, patches + 1, D) * 0.02)
        self.patch = nn.Linear(12, D)
        self.norm1, self.norm2, self.norm = (nn.LayerNorm(D, eps=1e-6) for _ in range(3))
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.gamma_1, self.gamma_2 = nn.Parameter(0.1 * torch.ones(D)), nn.Parameter(0.1 * torch.ones(D))
        self.head = nn.Linear(D, classes)

    def forward(self, patches):
        b = patches.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], dim=1) + self.pos
        n = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.gamma_1 * self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        x = x + self.gamma_2 * self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return self.head(self.norm(x)[:, 0])


# ---- weights used transposed and tied --------------------------------------------------------------------------------
class TiedAutoencoder(nn.Module):
    """encode: relu(F.linear(x, w, b1)); decode with the same weight transposed: F.linear(h, w.t(), b2) (``form=
    "linear_t"``) or ``h @ w + b2`` (``form="matmul"``), plus the input (a residual). w is (hidden, D)."""

    def __init__(self, form: str = "linear_t", hidden: int = 48):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(hidden, D) / math.sqrt(D))
        self.b1, self.b2 = nn.Parameter(0.1 * torch.randn(hidden)), nn.Parameter(0.1 * torch.randn(D))

    def forward(self, x):
        h = F.relu(F.linear(x, self.w, self.b1))                                     # (.., hidden)
        if self.form == "linear_t":
            y = F.linear(h, self.w.t(), self.b2)                                     # (.., D)
        else:
            y = h @ self.w + self.b2
        return y + x


class TiedLM(nn.Module):
    """Embedding, a Linear + GELU, LayerNorm, and a head whose weight is the embedding table (tied)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.norm(h + F.gelu(self.fc(h))))


# ---- BatchNorm in train mode -----------------------------------------------------------------------------------------
class ConvBNClassifier(nn.Module):
    """Conv2d, BatchNorm2d (running statistics updated in train mode, momentum 0.3), ReLU, global average pool, a
    Linear; also a BatchNorm1d over the features before the head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=0.3)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h.mean(dim=(2, 3))                                                       # (b, 8)
        return self.fc(self.bn1d(h))


# ---- a graph break ---------------------------------------------------------------------------------------------------
class BranchOnItem(nn.Module):
    """LayerNorm, attention through SDPA; then ``.item()`` of the mean |x| decides whether a second LayerNorm'd MLP
    runs (a data-dependent branch: a graph break), and the output is returned with the value read."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x, threshold: float = 0.0):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        x = x + self.o(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        level = x.abs().mean().item()
        if level > threshold:
            x = x + self.fc2(F.relu(self.fc1(self.ln2(x))))
        return x, level


# ---- quantize --------------------------------------------------------------------------------------------------------
class OddLinears(nn.Module):
    """Linears of odd sizes: 37 -> 13 with bias, 13 -> 29 without, 29 -> 1 (one output) with bias; ``shared`` run
    twice (its input and output both 13); a LayerNorm between."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(37, 13)
        self.shared = nn.Linear(13, 13, bias=False)
        self.norm = nn.LayerNorm(13)
        self.b = nn.Linear(13, 29, bias=False)
        self.c = nn.Linear(29, 1)

    def forward(self, x):
        h = F.gelu(self.a(x))
        h = self.shared(F.relu(self.shared(h)))
        return self.c(F.silu(self.b(self.norm(h))))


class TiedPair(nn.Module):
    """Two Linear modules sharing one weight Parameter (``dec.weight = enc.weight``, both 24 x 24), each with its own
    bias; and the same Linear module registered under a second name (``self.again = self.enc``)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(24, 24)
        self.dec = nn.Linear(24, 24)
        self.dec.weight = self.enc.weight
        self.again = self.enc

    def forward(self, x):
        return self.dec(torch.tanh(self.again(x)))


# ---- training forms: gradient checkpointing, a frozen backbone -------------------------------------------------------
class CheckpointedBlocks(nn.Module):
    """Two sliding-window blocks, each run under ``torch.utils.checkpoint`` (non-reentrant), as Hugging Face's
    ``gradient_checkpointing`` runs its layers."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SlidingWindowBlock("explicit"), SlidingWindowBlock("sdpa")])

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


class FrozenBackboneProbe(nn.Module):
    """A frozen (requires_grad False) pre-LN tanh-GELU MLP block under a trainable linear probe: a training graph whose
    backbone needs no gradient."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        for p in self.parameters():
            p.requires_grad_(False)
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh")) + x
        return self.head(h.mean(1))
