"""Model blocks written by hand for the compile backend's unseen-models round 3, as their authors write them (no
transformers or timm package): Falcon (parallel attention and MLP off one LayerNorm, multi-query attention, the
scores divided in place, softmax(dtype=)), BLOOM (ALiBi through baddbmm, the softmax in f32, dropout_add), Gemma
(the embeddings scaled by a 0-d tensor, RMSNorm with (1 + w), GQA by repeat_interleave, GeGLU), DistilBERT (q
divided before the product, masked_fill with a 0-d tensor), CLIP's text encoder (3-D bmm attention, a causal and a
padding mask added one after the other, quick_gelu), Swin's window attention (a relative-position bias gathered
from a table, the shifted windows' mask added through a 5-D view), an MLP-Mixer block (a Linear over the tokens of
a transposed input), a Perceiver-style cross-attention (latent queries against inputs of another length, GQA,
an additive key-padding mask of finfo.min), and decoders that mutate buffers (a static KV cache written by slices,
a position counter, a memory written between the scores and the values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


def causal_padding_bias(attention_mask, dtype):
    """(B, 1, N, N): 0 where a query attends, finfo.min at future and padded keys (attention_mask (B, N), 1 = token)."""
    n = attention_mask.shape[1]
    low = torch.finfo(dtype).min
    future = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).triu(1)
    hidden = future[None, None] | (attention_mask[:, None, None, :] == 0)
    return torch.zeros(hidden.shape, dtype=dtype, device=attention_mask.device).masked_fill(hidden, low)


# ---- Falcon ----------------------------------------------------------------------------------------------------
class FalconBlock(nn.Module):
    """Falcon-7B's decoder layer: one LayerNorm feeds attention and MLP side by side (x + attn + mlp), multi-query
    attention (one key/value head, expanded), ``scores /= sqrt(hd)`` in place, softmax(scores + mask, dtype=x's)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.input_layernorm = nn.LayerNorm(d)
        self.query_key_value = nn.Linear(d, d + 2 * self.hd, bias=False)       # H query heads, one k, one v
        self.dense = nn.Linear(d, d, bias=False)
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        h = self.input_layernorm(x)
        qkv = self.query_key_value(h).view(b, n, self.h + 2, self.hd)
        q = qkv[:, :, :-2].transpose(1, 2)                                      # (B, H, N, hd)
        k = qkv[:, :, -2:-1].transpose(1, 2).expand(b, self.h, n, self.hd)     # (B, 1, N, hd) -> (B, H, N, hd)
        v = qkv[:, :, -1:].transpose(1, 2).expand(b, self.h, n, self.hd)
        scores = q @ k.transpose(-1, -2)
        scores /= math.sqrt(self.hd)
        probs = F.softmax(scores + causal_padding_bias(attention_mask, x.dtype), dim=-1, dtype=x.dtype)
        attn = self.dense((probs @ v).transpose(1, 2).reshape(b, n, d))
        mlp = self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(h)))
        return x + attn + mlp


# ---- BLOOM -----------------------------------------------------------------------------------------------------
def bloom_gelu(x):
    """BLOOM's tanh GELU, written out."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomBlock(nn.Module):
    """BLOOM's decoder layer: scores = baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(hd)) on (B * H, N, hd), viewed
    4-D, masked_fill(finfo.min), softmax(dtype=f32).to(dtype), dropout, viewed 3-D, bmm; residual by dropout_add."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.query_key_value, self.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.attention_dropout = nn.Dropout(0.1)
        self.register_buffer("slopes", torch.pow(2.0, -8.0 * torch.arange(1, heads + 1) / heads), persistent=False)

    @staticmethod
    def dropout_add(x, residual, p: float, training: bool):
        return residual + F.dropout(x, p=p, training=training)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = self.query_key_value(h).view(b, n, self.h, 3, self.hd).unbind(3)          # (B, N, H, hd) each
        q = q.transpose(1, 2).reshape(b * self.h, n, self.hd)
        k = k.permute(0, 2, 3, 1).reshape(b * self.h, self.hd, n)                          # k^T already
        v = v.transpose(1, 2).reshape(b * self.h, n, self.hd)
        positions = (attention_mask.cumsum(-1) - 1) * attention_mask                          # (B, N)
        alibi = (self.slopes[None, :, None] * positions[:, None, :].to(x.dtype)).reshape(b * self.h, 1, n)
        scores = torch.baddbmm(alibi, q, k, beta=1.0, alpha=1.0 / math.sqrt(self.hd)).view(b, self.h, n, n)
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)[None, None] | (attention_mask[:, None, None, :] == 0)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        probs = self.attention_dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype))
        ctx = torch.bmm(probs.view(b * self.h, n, n), v).view(b, self.h, n, self.hd).transpose(1, 2)
        x = self.dropout_add(self.dense(ctx.reshape(b, n, d)), x, 0.1, self.training)
        return x + self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(self.post_attention_layernorm(x))))


# ---- Gemma -----------------------------------------------------------------------------------------------------
class GemmaRMSNorm(nn.Module):
    """Gemma's: in f32, the weight stored as an offset from 1, the result cast back."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class GemmaModel(nn.Module):
    """Embeddings times sqrt(d) as a 0-d tensor of the embeddings' dtype, two layers of GQA attention (k and v
    repeated per group by repeat_interleave, softmax in f32) and a GeGLU MLP (gelu tanh of the gate times up)."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "input_layernorm": GemmaRMSNorm(d), "post_attention_layernorm": GemmaRMSNorm(d),
            "q_proj": nn.Linear(d, d, bias=False), "k_proj": nn.Linear(d, kv_heads * self.hd, bias=False),
            "v_proj": nn.Linear(d, kv_heads * self.hd, bias=False), "o_proj": nn.Linear(d, d, bias=False),
            "gate_proj": nn.Linear(d, 2 * d, bias=False), "up_proj": nn.Linear(d, 2 * d, bias=False),
            "down_proj": nn.Linear(2 * d, d, bias=False)}) for _ in range(layers))
        self.norm = GemmaRMSNorm(d)

    def _attention(self, layer, x, bias):
        b, n, _ = x.shape
        q = layer["q_proj"](x).view(b, n, self.h, self.hd).transpose(1, 2)                  # (B, H, N, hd)
        k = layer["k_proj"](x).view(b, n, self.kv, self.hd).transpose(1, 2)                 # (B, Hkv, N, hd)
        v = layer["v_proj"](x).view(b, n, self.kv, self.hd).transpose(1, 2)
        k, v = (t.repeat_interleave(self.h // self.kv, dim=1) for t in (k, v))              # (B, H, N, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5 + bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return layer["o_proj"](torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1))

    def forward(self, ids, attention_mask):
        h = self.embed_tokens(ids)
        h = h * torch.tensor(h.shape[-1] ** 0.5, dtype=h.dtype)
        bias = causal_padding_bias(attention_mask, h.dtype)
        for layer in self.layers:
            h = h + self._attention(layer, layer["input_layernorm"](h), bias)
            m = layer["post_attention_layernorm"](h)
            h = h + layer["down_proj"](F.gelu(layer["gate_proj"](m), approximate="tanh") * layer["up_proj"](m))
        return self.norm(h)


# ---- DistilBERT ------------------------------------------------------------------------------------------------
class DistilBertLayer(nn.Module):
    """q / sqrt(hd) before the product, scores.masked_fill(mask, torch.tensor(finfo.min)), post-LN."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(d, d) for _ in range(4))
        self.sa_layer_norm, self.output_layer_norm = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.lin1, self.lin2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, n, d = x.shape

        def shape(t):
            return t.view(b, -1, self.h, self.hd).transpose(1, 2)

        q, k, v = shape(self.q_lin(x)), shape(self.k_lin(x)), shape(self.v_lin(x))
        q = q / math.sqrt(self.hd)
        scores = torch.matmul(q, k.transpose(2, 3))                                          # (B, H, N, N)
        hidden = (mask == 0).view(b, 1, 1, n).expand_as(scores)
        scores = scores.masked_fill(hidden, torch.tensor(torch.finfo(scores.dtype).min))
        weights = self.dropout(F.softmax(scores, dim=-1))
        ctx = torch.matmul(weights, v).transpose(1, 2).contiguous().view(b, -1, d)
        sa = self.sa_layer_norm(self.out_lin(ctx) + x)
        return self.output_layer_norm(self.dropout(self.lin2(F.gelu(self.lin1(sa)))) + sa)


# ---- CLIP text encoder -----------------------------------------------------------------------------------------
def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPTextLayer(nn.Module):
    """CLIP's: q_proj(x) * scale, (B * H, N, hd) bmm, a causal mask and a padding mask added in turn, quick_gelu."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.scale = self.hd ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def _shape(self, t, b, n):
        return t.view(b, n, self.h, self.hd).transpose(1, 2).reshape(b * self.h, n, self.hd)

    def forward(self, x, causal_mask, padding_mask):
        """causal_mask, padding_mask: (B, 1, N, N) additive."""
        b, n, d = x.shape
        h = self.layer_norm1(x)
        q = self._shape(self.q_proj(h) * self.scale, b, n)
        k, v = self._shape(self.k_proj(h), b, n), self._shape(self.v_proj(h), b, n)
        w = torch.bmm(q, k.transpose(1, 2)).view(b, self.h, n, n) + causal_mask
        w = (w + padding_mask).view(b * self.h, n, n)
        o = torch.bmm(F.softmax(w, dim=-1), v).view(b, self.h, n, self.hd).transpose(1, 2).reshape(b, n, d)
        x = x + self.out_proj(o)
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


# ---- Swin window attention -------------------------------------------------------------------------------------
class SwinWindowAttention(nn.Module):
    """Windows of w x w tokens: q scaled, a relative-position bias gathered from a learned table by an index buffer,
    the shifted windows' mask added through a (B / nW, nW, H, N, N) view, nn.Softmax(dim=-1)."""

    def __init__(self, d: int = 32, heads: int = 4, window: int = 3):
        super().__init__()
        self.h, self.hd, self.n = heads, d // heads, window * window
        self.scale = self.hd ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)      # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask):
        """x (B * nW, N, d) windows; mask (nW, N, N) additive (0 or -100)."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)                                       # (B * nW, H, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, self.h, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = self.softmax(attn.view(-1, self.h, n, n))
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


# ---- MLP-Mixer -------------------------------------------------------------------------------------------------
class MixerBlock(nn.Module):
    """Token mixing (a GELU MLP over the tokens: Linear on the transposed (B, C, N) input), then channel mixing."""

    def __init__(self, tokens: int = 12, d: int = 32):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.token_fc1, self.token_fc2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.channel_fc1, self.channel_fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        t = self.norm1(x).transpose(1, 2)                                                   # (B, C, N)
        x = x + self.token_fc2(F.gelu(self.token_fc1(t))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


# ---- Perceiver-style cross-attention ---------------------------------------------------------------------------
class LatentCrossAttention(nn.Module):
    """Learned latent queries (L of them) attend to the inputs (N of them, some padded) with GQA (k, v repeated by
    repeat_interleave), an additive key-padding mask of (1 - mask) * finfo.min, then the latents attend to each
    other through SDPA; LayerNorm without elementwise affine on the inputs, with bias=False on the latents."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, latents: int = 6):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.latents = nn.Parameter(torch.randn(latents, d))
        self.norm_x, self.norm_l = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, bias=False)
        self.q, self.kv_proj = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * kv_heads * self.hd, bias=False)
        self.o, self.self_qkv, self.self_o = nn.Linear(d, d), nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask):
        """x (B, N, d), mask (B, N) 1 = token, 0 = pad."""
        b, n, d = x.shape
        lat = self.latents.expand(b, -1, -1)                                                 # (B, L, d)
        q = self.q(self.norm_l(lat)).view(b, -1, self.h, self.hd).transpose(1, 2)           # (B, H, L, hd)
        k, v = self.kv_proj(self.norm_x(x)).view(b, n, 2 * self.kv, self.hd).transpose(1, 2).chunk(2, dim=1)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min      # (B, 1, 1, N)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd) + bias
        lat = lat + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d))
        q, k, v = (t.view(b, -1, self.h, self.hd).transpose(1, 2) for t in self.self_qkv(lat).chunk(3, -1))
        return lat + self.self_o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d))


# ---- decoders that mutate buffers ------------------------------------------------------------------------------
class CachedDecoder(nn.Module):
    """A decoder layer with a static KV cache (buffers written by slices at ``start``), a step counter buffer
    (``steps += 1``), and a running mean of its output's scale (an EMA buffer written in place)."""

    def __init__(self, d: int = 32, heads: int = 4, batch: int = 2, max_len: int = 16):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, self.hd))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, self.hd))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale_ema", torch.ones(()))

    def forward(self, x, start: int):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)   # (B, H, n, hd)
        self.k_cache[:, :, start:start + n] = k
        self.v_cache[:, :, start:start + n] = v
        keys, values = self.k_cache[:, :, :start + n], self.v_cache[:, :, :start + n]          # (B, H, T, hd)
        future = torch.arange(start + n)[None, :] > torch.arange(start, start + n)[:, None]      # (n, T)
        s = (q @ keys.transpose(-1, -2)) * self.hd ** -0.5
        o = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1) @ values
        x = x + self.o(o.transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        self.steps += 1
        self.scale_ema.mul_(0.9).add_(0.1 * x.detach().abs().mean())
        return x


class MemoryAttention(nn.Module):
    """Attention of the inputs over a memory buffer (keys memory[0], values memory[1]), the memory updated in place
    (an EMA towards this call's keys and values) after the scores and before the values are read: the values
    read are the updated ones, the keys were read before the update."""

    def __init__(self, d: int = 16, heads: int = 2, slots: int = 8, batch: int = 2):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.register_buffer("memory", torch.randn(2, batch, heads, slots, self.hd))

    def forward(self, x):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)                           # (B, H, n, hd)
        keys, values = self.memory[0], self.memory[1]                                       # views of the buffer
        s = q @ keys.transpose(-1, -2) / math.sqrt(self.hd)
        new = self.kv(x).view(b, n, 2, self.h, self.hd).permute(2, 0, 3, 1, 4).mean(3, keepdim=True)
        self.memory.lerp_(new.expand_as(self.memory), 0.5)
        return torch.softmax(s, dim=-1) @ values


# ---- a decoder with complex rotary embeddings and a KV cache reassigned to the input's dtype ------------------------
def rotary_phases(head_dim: int, positions: int, base: float = 10000.0):
    """(positions, head_dim / 2) unit complex numbers e^(i p f)."""
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(positions).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def rotate_complex(t, phases):
    """t (B, N, H, hd) rotated pairwise: viewed as hd / 2 complex numbers, multiplied by phases (N, hd / 2)."""
    pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * phases[None, :, None, :]).flatten(3).type_as(t)


class ComplexRotaryDecoder(nn.Module):
    """Rotary embeddings through complex numbers (view_as_complex, polar phases), the KV caches (B, T, Hkv, hd)
    reassigned with ``.to(q)`` then written by slices, GQA by expand + reshape on (B, T, Hkv, hd), an additive
    mask of -inf (triu, then zeros for the cached positions by hstack; none for one token), softmax in f32 then
    type_as, an RMSNorm that casts back before its weight."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, kv_heads: int = 2, batch: int = 2,
                 max_len: int = 16):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.wq, self.wo = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.wk, self.wv = nn.Linear(d, kv_heads * self.hd, bias=False), nn.Linear(d, kv_heads * self.hd, bias=False)
        self.w1, self.w3, self.w2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), \
            nn.Linear(2 * d, d, bias=False)
        self.norm_w = nn.ParameterList(nn.Parameter(1 + 0.1 * torch.randn(d)) for _ in range(3))
        self.register_buffer("cache_k", torch.zeros(batch, max_len, kv_heads, self.hd), persistent=False)
        self.register_buffer("cache_v", torch.zeros(batch, max_len, kv_heads, self.hd), persistent=False)
        self.register_buffer("phases", rotary_phases(self.hd, 2 * max_len), persistent=False)

    def _norm(self, x, i: int):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.norm_w[i]

    def _expand(self, t):                                            # (B, T, Hkv, hd) -> (B, T, H, hd)
        b, n, _, _ = t.shape
        return t[:, :, :, None].expand(b, n, self.kv, self.h // self.kv, self.hd).reshape(b, n, self.h, self.hd)

    def forward(self, ids, start: int):
        b, n = ids.shape
        h = self.embed(ids)
        x = self._norm(h, 0)
        phases = self.phases[start:start + n]
        q = rotate_complex(self.wq(x).view(b, n, self.h, self.hd), phases)
        k = rotate_complex(self.wk(x).view(b, n, self.kv, self.hd), phases)
        self.cache_k = self.cache_k.to(q)
        self.cache_v = self.cache_v.to(q)
        self.cache_k[:b, start:start + n] = k
        self.cache_v[:b, start:start + n] = self.wv(x).view(b, n, self.kv, self.hd)
        keys = self._expand(self.cache_k[:b, :start + n]).transpose(1, 2)                   # (B, H, T, hd)
        values = self._expand(self.cache_v[:b, :start + n]).transpose(1, 2)
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) / math.sqrt(self.hd)
        if n > 1:
            future = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
            scores = scores + torch.hstack([torch.zeros(n, start), future]).type_as(h)
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        h = h + self.wo(torch.matmul(probs, values).transpose(1, 2).contiguous().view(b, n, -1))
        x = self._norm(h, 1)
        h = h + self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self._norm(h, 2).float()


# ---- a diffusion transformer block (adaLN-Zero) ----------------------------------------------------------------
class DiTBlock(nn.Module):
    """LayerNorms without affine parameters, modulated by a shift and a scale from the conditioning (x * (1 + scale)
    + shift), SDPA attention, a GELU (tanh) MLP, both branches gated before their residual adds."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        """x (B, N, d) tokens, c (B, d) conditioning."""
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (t.unsqueeze(1) for t in self.ada(c).chunk(6, dim=1))
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
