"""Model blocks written by hand for the compile backend's unseen-models round 7, as their authors write them (no
transformers or timm package): a Gemma-style block (embedding times a 0-d normalizer, ``F.rms_norm`` without a weight
then ``* (1 + w)`` in f32, one key/value head through SDPA's ``enable_gqa``, GeGLU from one Linear by ``chunk``); a
parallel attention + MLP block sharing one LayerNorm (Phi / GPT-J) with Falcon's multi-query fused QKV, partial
rotary and GELU written out with tanh; Qwen-style biased QKV with rotary in the half-split or the interleaved layout,
GQA by ``repeat_interleave`` and one folded causal + padding bias; a BERT encoder (token types, padding, post-LN,
pooler); a T5 stack whose layers share one relative-position bias with the padding folded in; a ViT with a strided
conv patch embed, a class token, an attention pooling softmax over the tokens (dim=1) and a class softmax (dim=1 of
2-D logits); a ConvNeXt stage (depthwise conv, LayerNorm over channels-last, GELU MLP, layer scale, a hand-written
channels-first LayerNorm before a strided conv); an MLP of in-place ops (``relu_``, ``F.relu(inplace=True)``,
``+=``, ``add_``); SwiGLU by ``F.silu(a) * b`` of a chunked bias-free Linear; a head whose loss is
``F.nll_loss(F.log_softmax(...))``; a bf16 block whose norms keep f32 parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


def rotate_half(x):
    """The half-split layout (GPT-NeoX, Llama, Qwen): (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """The interleaved layout (GPT-J, RoFormer): pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary(n: int, dim: int, dtype, layout: str = "half", base: float = 10000.0):
    """(cos, sin) of (n, dim) for ``layout``: "half" repeats the frequencies as two halves, "interleaved" repeats
    each one twice in a row."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)          # (dim / 2,)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)                     # (n, dim / 2)
    emb = torch.cat((freqs, freqs), -1) if layout == "half" else freqs.repeat_interleave(2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(t, cos, sin, layout: str):
    return t * cos + (rotate_half(t) if layout == "half" else rotate_every_two(t)) * sin


# ---- Gemma-style block --------------------------------------------------------------------------------------------
class GemmaRMSNorm(nn.Module):
    """Gemma's (1 + w) RMSNorm through F.rms_norm without a weight, in f32, the scale applied after, cast back."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.1 * torch.randn(d))        # Gemma initialises zeros: (1 + w) starts at 1

    def forward(self, x):
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class GemmaBlock(nn.Module):
    """Embedding times sqrt(d) as a 0-d tensor of the activations' dtype, a pre-norm block: multi-query attention
    (one key/value head) through SDPA with enable_gqa=True and an explicit scale, GeGLU (tanh GELU) from one
    bias-free Linear split by chunk(2), the final norm, a tied head."""

    def __init__(self, vocab: int = 40, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.ln1, self.ln2, self.ln_f = GemmaRMSNorm(d), GemmaRMSNorm(d), GemmaRMSNorm(d)
        self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, ids):
        b, n = ids.shape
        x = self.embed(ids)
        x = x * torch.tensor(x.shape[-1] ** 0.5, dtype=x.dtype)
        h = self.ln1(x)
        q = self.q(h).view(b, n, self.h, self.hd).transpose(1, 2)                        # (B, H, N, hd)
        k, v = self.kv(h).view(b, n, 1, 2 * self.hd).transpose(1, 2).chunk(2, dim=-1)    # (B, 1, N, hd) each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.hd ** -0.5, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        gate, up = self.gate_up(self.ln2(x)).chunk(2, dim=-1)
        x = x + self.down(F.gelu(gate, approximate="tanh") * up)
        return F.linear(self.ln_f(x), self.embed.weight)


# ---- parallel attention + MLP sharing one LayerNorm, Falcon's multi-query ----------------------------------------
def gelu_new(x):
    """GPT-2 / Phi's tanh GELU written out."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ParallelMQABlock(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)), one LayerNorm (Phi-1.5, GPT-J, Falcon-7B). The fused QKV gives H query heads and
    one key and one value head (Falcon-7B's multi-query), expanded to H heads; rotary on the first half of each head
    (Phi's partial rotary); scores in f32, a causal finfo.min fill, softmax, cast back; the MLP's GELU written out."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, d + 2 * self.hd)
        self.dense = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln(x)
        fused = self.qkv(h).view(b, n, self.h + 2, self.hd)
        q = fused[:, :, :-2].transpose(1, 2)                                               # (B, H, N, hd)
        k = fused[:, :, [-2]].transpose(1, 2).expand(b, self.h, n, self.hd)                # (B, H, N, hd)
        v = fused[:, :, [-1]].transpose(1, 2).expand(b, self.h, n, self.hd)
        r = self.hd // 2
        cos, sin = rotary(n, r, x.dtype)
        q = torch.cat((apply_rotary(q[..., :r], cos, sin, "half"), q[..., r:]), dim=-1)
        k = torch.cat((apply_rotary(k[..., :r], cos, sin, "half"), k[..., r:]), dim=-1)
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.hd)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        s = s.masked_fill(causal, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        attn = self.dense((p @ v).transpose(1, 2).reshape(b, n, d))
        return attn + self.fc2(gelu_new(self.fc1(h))) + x


# ---- Qwen-style attention with biased QKV, rotary in two layouts ---------------------------------------------------
class QwenAttention(nn.Module):
    """nn.RMSNorm, q/k/v Linears with biases (Qwen's), rotary in ``layout`` ("half" or "interleaved"), 4 query heads
    on 2 key/value heads (GQA by repeat_interleave), one additive bias folding the causal mask and the padding
    (finfo.min), softmax in f32 cast back, a bias-free o_proj and the residual."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, layout: str = "half"):
        super().__init__()
        self.h, self.kvh, self.hd, self.layout = heads, kv_heads, d // heads, layout
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv_heads * self.hd), nn.Linear(d, kv_heads * self.hd)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(b, n, self.kvh, self.hd).transpose(1, 2)
        v = self.v(h).view(b, n, self.kvh, self.hd).transpose(1, 2)
        cos, sin = rotary(n, self.hd, x.dtype, self.layout)
        q, k = apply_rotary(q, cos, sin, self.layout), apply_rotary(k, cos, sin, self.layout)
        k, v = (t.repeat_interleave(self.h // self.kvh, dim=1) for t in (k, v))
        low = torch.finfo(x.dtype).min
        causal = torch.full((n, n), low, dtype=x.dtype, device=x.device).triu(1)
        padding = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * low
        bias = (causal[None, None] + padding).clamp(min=low)                                # (B, 1, N, N)
        s = q @ k.transpose(2, 3) / math.sqrt(self.hd) + bias
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return x + self.o((p @ v).transpose(1, 2).reshape(b, n, d))


# ---- BERT encoder ----------------------------------------------------------------------------------------------
class BertEncoder(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (eval), ``layers`` post-LN layers (additive padding
    bias (1 - mask) * finfo.min, exact GELU), the pooler's tanh over the [CLS] row. Returns (sequence, pooled)."""

    def __init__(self, vocab: int = 40, d: int = 32, heads: int = 4, layers: int = 2, max_len: int = 16):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.word, self.pos, self.token_type = nn.Embedding(vocab, d), nn.Embedding(max_len, d), nn.Embedding(2, d)
        self.emb_ln, self.drop = nn.LayerNorm(d, eps=1e-12), nn.Dropout(0.1)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(d, 3 * d), "o": nn.Linear(d, d), "ln1": nn.LayerNorm(d, eps=1e-12),
            "up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d), "ln2": nn.LayerNorm(d, eps=1e-12)})
            for _ in range(layers))
        self.pooler = nn.Linear(d, d)

    def forward(self, ids, token_type_ids, attention_mask):
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device)[None]
        x = self.drop(self.emb_ln(self.word(ids) + self.pos(pos) + self.token_type(token_type_ids)))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min   # (B, 1, 1, N)
        for layer in self.layers:
            q, k, v = layer["qkv"](x).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + bias
            a = self.drop(s.softmax(-1)) @ v
            x = layer["ln1"](x + self.drop(layer["o"](a.transpose(1, 2).reshape(b, n, -1))))
            x = layer["ln2"](x + self.drop(layer["down"](F.gelu(layer["up"](x)))))
        return x, torch.tanh(self.pooler(x[:, 0]))


# ---- T5 stack sharing one relative-position bias -----------------------------------------------------------------
def relative_buckets(n: int, buckets: int = 8, max_distance: int = 16):
    """T5's bidirectional buckets of key - query (half the buckets for each sign, log-spaced past buckets / 4)."""
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]                              # (N, N)
    half = buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """T5's RMSNorm: no mean subtracted, no bias, the variance in f32, the weight applied in its own dtype."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1.0 + 0.1 * torch.randn(d)), eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Stack(nn.Module):
    """Two T5 encoder layers (unscaled scores, bias-free projections, gated-GELU feed-forward): the first makes the
    relative-position bias, folds the padding into it, and both layers add that one (B, H, N, N) bias in place
    (``scores += position_bias``); the final norm."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, buckets: int = 8):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.rel = nn.Embedding(buckets, heads)
        self.norms = nn.ModuleList(T5LayerNorm(d) for _ in range(2 * layers))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d, bias=False) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.wi0 = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(layers))
        self.wi1 = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(layers))
        self.wo = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(layers))
        self.final = T5LayerNorm(d)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        bias = self.rel(relative_buckets(n).to(x.device)).permute(2, 0, 1)[None].to(x.dtype)        # (1, H, N, N)
        bias = bias + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for i in range(len(self.qkv)):
            h = self.norms[2 * i](x)
            q, k, v = self.qkv[i](h).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
            scores = torch.matmul(q, k.transpose(3, 2))
            scores += bias
            p = F.softmax(scores.float(), dim=-1).type_as(scores)
            x = x + self.o[i]((p @ v).transpose(1, 2).reshape(b, n, d))
            h = self.norms[2 * i + 1](x)
            x = x + self.wo[i](gelu_new(self.wi0[i](h)) * self.wi1[i](h))
        return self.final(x)


# ---- ViT with a class token, attention pooling and class probabilities --------------------------------------------
class TinyViT(nn.Module):
    """Patches by a conv of stride = patch, a class token, learned positions, one pre-norm block (SDPA), then two
    heads: the class token's logits as probabilities (F.softmax(dim=1) of (B, classes): the last dim) and an
    attention pooling over the tokens (torch.softmax(dim=1) of (B, N, 1): not the last dim)."""

    def __init__(self, d: int = 32, heads: int = 4, image: int = 16, patch: int = 4, classes: int = 10):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, d))
        self.ln1, self.ln2, self.norm = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * d, d))
        self.head, self.pool = nn.Linear(d, classes), nn.Linear(d, 1)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)                                   # (B, P, d)
        b, p, d = x.shape
        x = torch.cat((self.cls.expand(b, -1, -1), x), dim=1) + self.pos                     # (B, N, d)
        n = p + 1
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = self.norm(x + self.mlp(self.ln2(x)))
        probs = F.softmax(self.head(x[:, 0]), dim=1)                                         # (B, classes)
        weights = torch.softmax(self.pool(x), dim=1)                                         # (B, N, 1)
        return probs, (weights * x).sum(1)


# ---- ConvNeXt ----------------------------------------------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channels of (B, C, H, W), written out (mean subtracted, biased variance)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, permute to channels-last, LayerNorm over the channels, Linear + GELU + Linear, layer scale
    gamma, permute back, the residual (stochastic depth an identity in eval)."""

    def __init__(self, c: int = 32, scale: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(scale * torch.ones(c))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)                                               # (B, H, W, C)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """A block at 16 channels, the downsampling layer (channels-first LayerNorm, a 2x2 conv of stride 2), a block at
    32 channels, global average pooling, LayerNorm, a head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.block1, self.block2 = ConvNeXtBlock(16), ConvNeXtBlock(32)
        self.down_norm, self.down = ChannelsFirstLayerNorm(16), nn.Conv2d(16, 32, 2, stride=2)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, classes)

    def forward(self, images):
        x = self.block1(self.stem(images))
        x = self.block2(self.down(self.down_norm(x)))
        return self.head(self.norm(x.mean((-2, -1))))


# ---- in-place ops ------------------------------------------------------------------------------------------------
class InPlaceMLP(nn.Module):
    """Pre-norm MLPs written with in-place ops: ``h = fc(x).relu_()``, ``F.relu(fc(x), inplace=True)``,
    ``torch.relu_(u)`` on a Linear's output read after, ``y = down(h); y += x``, ``down(h).add_(x)`` (no tensor that
    autograd saved is written: the model trains in eager)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.fc3, self.fc4 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d, bias=False)
        self.fc5, self.fc6 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.fc1(self.ln(x)).relu_()
        y = self.fc2(h)
        y += x
        x = y
        h = F.relu(self.fc3(x), inplace=True)
        x = self.fc4(h).add_(x)
        u = self.fc5(x)
        torch.relu_(u)
        return self.fc6(u) + x


# ---- SwiGLU written as F.silu(a) * b of a chunk -------------------------------------------------------------------
class SwiGLUChunk(nn.Module):
    """x + w3(F.silu(a) * b), (a, b) = w12(rms_norm(x)).chunk(2): one bias-free Linear for both halves (the
    xformers / "fused SwiGLU" form), twice, with a final nn.RMSNorm."""

    def __init__(self, d: int = 32, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=1e-5) for _ in range(layers))
        self.w12 = nn.ModuleList(nn.Linear(d, 2 * hidden, bias=False) for _ in range(layers))
        self.w3 = nn.ModuleList(nn.Linear(hidden, d, bias=False) for _ in range(layers))
        self.final = nn.RMSNorm(d, eps=1e-5)

    def forward(self, x):
        for norm, w12, w3 in zip(self.norms, self.w12, self.w3, strict=True):
            a, b = w12(norm(x)).chunk(2, dim=-1)
            x = x + w3(F.silu(a) * b)
        return self.final(x)


# ---- a classifier whose loss is log_softmax + nll_loss ------------------------------------------------------------
class LogSoftmaxNLL(nn.Module):
    """LayerNorm, a bias-free head, the loss as F.nll_loss(F.log_softmax(logits, dim), labels): over (T, V) rows
    (``dim`` 1 or -1, the same), with ``loss`` kwargs (ignore_index, reduction); ``f32``: the logits cast first."""

    def __init__(self, d: int = 32, vocab: int = 24, dim: int = -1, f32: bool = False, bias: bool = False, **loss):
        super().__init__()
        self.dim, self.f32, self.loss = dim, f32, loss
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=bias)

    def forward(self, x, labels):
        logits = self.head(self.ln(x)).view(-1, self.head.out_features)
        if self.f32:
            logits = logits.float()
        return F.nll_loss(F.log_softmax(logits, dim=self.dim), labels.view(-1), **self.loss)


# ---- mixed precision: bf16 activations, f32 norm parameters -------------------------------------------------------
class MixedNormBlock(nn.Module):
    """A bf16 pre-norm block whose nn.LayerNorm and nn.RMSNorm keep f32 parameters (``.float()`` after the model's
    ``.to(bf16)``, as mixed-precision recipes keep norms): F.layer_norm / F.rms_norm of bf16 rows with f32 weights,
    which give bf16; the residual add before the second norm; SDPA causal."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ln, self.rms = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():
            for p in (*self.ln.parameters(), self.rms.weight):
                p.add_(0.1 * torch.randn_like(p))

    def norms_to_f32(self):
        self.ln.float()
        self.rms.float()
        return self

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        h = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d))
        return h + self.fc2(F.silu(self.fc1(self.rms(h))))
