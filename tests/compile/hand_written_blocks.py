"""Hugging Face-style transformer blocks written by hand, as the models write them (no transformers package):
GPT-2 (its NewGELU, a scale held in a 0-d tensor), Llama (RMSNorm in float32, rotary, GQA by repeat_interleave,
SwiGLU), BERT (post-LN, a padding mask of finfo.min, optionally returning the probabilities) and a T5 decoder block
(RMS-style norm, position bias, cross-attention). For the compile backend's unseen-models tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NewGELU(nn.Module):
    """GPT-2's gelu, written out (tanh approximation)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    """Hugging Face's eager GPT-2 attention: one c_attn projection split in three, where(causal, s, finfo.min)."""

    def __init__(self, d: int, heads: int, n_pos: int = 64):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos),
                             persistent=False)

    def _split(self, t):                         # (B, N, d) -> (B, H, N, hd)
        b, n, _ = t.size()
        return t.view(b, n, self.heads, self.hd).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        q, k, v = self._split(q), self._split(k), self._split(v)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        n = q.size(-2)
        causal = self.bias[:, :, :n, :n]
        w = torch.where(causal, w.to(w.dtype), torch.finfo(w.dtype).min)
        w = nn.functional.softmax(w, dim=-1)
        w = self.attn_dropout(w.type(v.dtype))
        o = torch.matmul(w, v)
        o = o.permute(0, 2, 1, 3).contiguous()
        o = o.view(*o.shape[:-2], -1)
        return self.resid_dropout(self.c_proj(o))


class GPT2Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.attn = GPT2Attention(d, heads)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d), "act": NewGELU()})

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.mlp["c_proj"](self.mlp["act"](self.mlp["c_fc"](self.ln_2(x))))
        return h + x                                       # the residual add written the other way round


class LlamaRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: the variance in f32, the result cast back, then the weight."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d)), eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


class LlamaAttention(nn.Module):
    """GQA through repeat_interleave, rotary embeddings, an additive causal mask built with triu, the softmax in
    f32 then cast back (Hugging Face's eager Llama)."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kvh, self.hd).transpose(1, 2)
        t = torch.arange(n, device=x.device).float()
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(self.h // self.kvh, dim=1)
        v = v.repeat_interleave(self.h // self.kvh, dim=1)
        mask = torch.triu(torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype), diagonal=1)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
        w = w + mask[None, None]
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(b, n, -1)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 48):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = LlamaRMSNorm(d), LlamaRMSNorm(d)
        self.self_attn, self.mlp = LlamaAttention(d), LlamaMLP(d)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class BertLayer(nn.Module):
    """Post-LN BERT: LayerNorm(x + attention(x)), a padding mask made additive with finfo.min, gelu (erf)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense, self.ln1 = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)
        self.intermediate, self.output = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln2, self.dropout = nn.LayerNorm(d, eps=1e-12), nn.Dropout(0.1)

    def _heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.h, self.hd).permute(0, 2, 1, 3)

    def forward(self, x, attention_mask, output_attentions: bool = True):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd) + ext
        p = self.dropout(nn.functional.softmax(s, dim=-1))
        c = torch.matmul(p, v).permute(0, 2, 1, 3).contiguous()
        c = c.view(*c.shape[:2], -1)
        a = self.ln1(self.dropout(self.dense(c)) + x)
        h = F.gelu(self.intermediate(a))
        out = {"hidden": self.ln2(self.dropout(self.output(h)) + a)}
        return out | {"attn_probs": p} if output_attentions else out


class T5LayerNorm(nn.Module):
    """T5's norm: RMS without the mean, no bias, the variance in f32."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) \
            else self.weight * x


class T5Attention(nn.Module):
    """T5's attention: no 1/sqrt(d) scale, an additive position bias, Linear without bias; kv from another
    sequence (cross-attention) when given."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, kv=None, position_bias=None):
        kv = x if kv is None else kv
        b = x.shape[0]
        q = self.q(x).view(b, -1, self.h, self.hd).transpose(1, 2)
        k = self.k(kv).view(b, -1, self.h, self.hd).transpose(1, 2)
        v = self.v(kv).view(b, -1, self.h, self.hd).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(3, 2))
        if position_bias is not None:
            scores = scores + position_bias
        w = F.softmax(scores.float(), dim=-1).type_as(scores)
        o = torch.matmul(w, v).transpose(1, 2).contiguous().view(b, -1, self.h * self.hd)
        return self.o(o)


class T5DecoderBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_ff = T5LayerNorm(d), T5LayerNorm(d), T5LayerNorm(d)
        self.self_attn, self.cross_attn = T5Attention(d, heads), T5Attention(d, heads)
        self.wi, self.wo = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.rel = nn.Parameter(0.1 * torch.randn(1, heads, 1, 1))

    def forward(self, x, enc):
        n = x.shape[1]
        causal = torch.triu(torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype), 1)
        bias = self.rel.to(x.dtype) + causal
        x = x + self.self_attn(self.ln_self(x), position_bias=bias)
        x = x + self.cross_attn(self.ln_cross(x), kv=enc)
        return x + self.wo(F.relu(self.wi(self.ln_ff(x)))), enc
