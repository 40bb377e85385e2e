"""Model blocks written by hand for the compile backend's unseen-models round 2, as their authors write them (no
transformers or timm package): a Hugging Face-style Llama / Mistral decoder layer (rotary through rotate_half with
position ids, GQA through repeat_kv, RMSNorm in f32 then cast, SwiGLU, an additive 4-D finfo.min mask from a
padding mask, causal or sliding-window), an MPT-style block with ALiBi biases, a T5 encoder layer with its
relative-position buckets, a ViT / DeiT encoder (patches by a conv, class and distillation tokens, pre-norm, fused
qkv, q scaled before the product, GELU (erf) MLP), BERT's embeddings (three embeddings summed, then LayerNorm) and
a Whisper-style decoder layer (cross-attention to an encoder of another length, with a key padding mask)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hand_written_blocks import LlamaRMSNorm, _rotate_half
from torch import nn


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


# ---- Llama / Mistral -------------------------------------------------------------------------------------------
def padding_causal_mask(attention_mask, n: int, dtype, window: int | None = None):
    """Hugging Face's eager 4-D mask (B, 1, N, N): 0 where a query attends, finfo.min elsewhere (future keys, keys
    at or past ``window`` behind (Mistral's sliding window), padded keys). attention_mask (B, N): 1 = token, 0 = pad.
    With left padding a padded query row masks every key: eager's softmax over equal scores averages v there."""
    low = torch.finfo(dtype).min
    i = torch.arange(n)
    hidden = i[None, :] > i[:, None]                                  # (N, N) future keys
    if window is not None:
        hidden = hidden | (i[:, None] - i[None, :] >= window)
    mask = torch.zeros(n, n, dtype=dtype).masked_fill(hidden, low)
    mask = mask[None, None].expand(attention_mask.shape[0], 1, n, n).clone()      # (B, 1, N, N)
    padded = attention_mask[:, None, None, :] == 0
    return mask.masked_fill(padded, low)


class LlamaRotary(nn.Module):
    """cos and sin (B, N, hd) for position ids (B, N), computed in f32 and cast to x's dtype."""

    def __init__(self, hd: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float()                                  # (1, hd/2, 1), f32 in any model
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)          # (B, N, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def repeat_kv(h, n_rep: int):
    """(B, Hkv, N, hd) -> (B, Hkv * n_rep, N, hd), each key/value head repeated for its group of query heads."""
    b, hkv, n, hd = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None, :, :].expand(b, hkv, n_rep, n, hd).reshape(b, hkv * n_rep, n, hd)


class HFLlamaAttention(nn.Module):
    """``impl="eager"``: scores + mask sliced to the keys, softmax in f32, dropout (a no-op in eval), then v;
    ``impl="sdpa"``: F.scaled_dot_product_attention with the mask, or is_causal without one."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, impl: str = "eager", dropout: float = 0.0):
        super().__init__()
        self.h, self.kvh, self.hd, self.impl, self.dropout = heads, kv_heads, d // heads, impl, dropout
        self.scaling = self.hd ** -0.5
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin, mask=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.hd).transpose(1, 2)           # (B, H, N, hd)
        k = self.k_proj(x).view(b, n, -1, self.hd).transpose(1, 2)           # (B, Hkv, N, hd)
        v = self.v_proj(x).view(b, n, -1, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                         # (B, 1, N, hd)
        q, k = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
        k, v = repeat_kv(k, self.h // self.kvh), repeat_kv(v, self.h // self.kvh)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training
                                               else 0.0, is_causal=mask is None and n > 1, scale=self.scaling)
        else:
            w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            if mask is not None:
                w = w + mask[:, :, :, : k.shape[-2]]
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=self.dropout, training=self.training)
            o = torch.matmul(w, v)
        o = o.transpose(1, 2).contiguous().reshape(b, n, -1)
        return self.o_proj(o)


class SwiGLU(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HFLlamaModel(nn.Module):
    """Embedding, two decoder layers, the final norm: Hugging Face's LlamaModel in small (Mistral's with
    ``window``). forward(ids, attention_mask=None): the mask built once and shared by the layers; without one,
    causal (eager: the mask of all ones; sdpa: is_causal)."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, impl: str = "eager",
                 window: int | None = None):
        super().__init__()
        self.embed_tokens, self.impl, self.window = nn.Embedding(vocab, d), impl, window
        self.rotary = LlamaRotary(d // 4)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "input_layernorm": LlamaRMSNorm(d), "self_attn": HFLlamaAttention(d, impl=impl),
            "post_attention_layernorm": LlamaRMSNorm(d), "mlp": SwiGLU(d)}) for _ in range(layers))
        self.norm = LlamaRMSNorm(d)

    def forward(self, ids, attention_mask=None):
        b, n = ids.shape
        h = self.embed_tokens(ids)
        if attention_mask is None and (self.impl == "eager" or self.window is not None):
            attention_mask = torch.ones(b, n, dtype=torch.long, device=ids.device)
        mask = None if attention_mask is None else padding_causal_mask(attention_mask, n, h.dtype, self.window)
        position_ids = torch.arange(n, device=ids.device)[None].expand(b, n)
        cos, sin = self.rotary(h, position_ids)
        for layer in self.layers:
            h = h + layer["self_attn"](layer["input_layernorm"](h), cos, sin, mask)
            h = h + layer["mlp"](layer["post_attention_layernorm"](h))
        return self.norm(h)


# ---- ALiBi (MPT-style: a (1, H, 1, N) bias by key position, plus the causal mask) ------------------------------
def alibi_slopes(heads: int) -> torch.Tensor:
    """The geometric slopes 2^(-8 i / H), i = 1..H."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1) / heads)


class AlibiBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.norm_1, self.norm_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.Wqkv, self.out_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.Wqkv(self.norm_1(x)).chunk(3, dim=2)
        q, k, v = (t.view(b, n, self.h, self.hd).transpose(1, 2) for t in (q, k, v))     # (B, H, N, hd)
        keys = torch.arange(1 - n, 1, dtype=torch.int32, device=x.device).view(1, 1, 1, n)
        bias = (keys * self.slopes.view(1, self.h, 1, 1)).to(x.dtype)                      # (1, H, 1, N)
        s = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(self.hd)) + bias
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        s = s.masked_fill(future.view(1, 1, n, n), torch.finfo(s.dtype).min)
        o = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(b, n, d)
        x = x + self.out_proj(o)
        return x + self.down(F.gelu(self.up(self.norm_2(x)), approximate="none"))


# ---- T5 encoder layer with relative-position buckets -----------------------------------------------------------
def relative_buckets(q_len: int, k_len: int, buckets: int = 8, max_distance: int = 16):
    """T5's bidirectional buckets (Nq, Nk): half by sign, exact for small distances, logarithmic beyond."""
    rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
    half = buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return out + torch.where(rel < exact, rel, large)


class T5EncoderLayer(nn.Module):
    """Self-attention with no 1/sqrt(d) scale and a learned relative-position bias (an Embedding of buckets:
    a bias that needs a gradient in training), T5's RMS norm, a ReLU MLP."""

    def __init__(self, d: int = 32, heads: int = 4, buckets: int = 8):
        super().__init__()
        from hand_written_blocks import T5LayerNorm

        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(buckets, heads)
        self.ln_attn, self.ln_ff = T5LayerNorm(d), T5LayerNorm(d)
        self.wi, self.wo = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        pos = self.relative_attention_bias(relative_buckets(n, n)).permute(2, 0, 1).unsqueeze(0)   # (1, H, N, N)
        h = self.ln_attn(x)
        q, k, v = (lin(h).view(b, -1, self.h, self.hd).transpose(1, 2) for lin in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += pos.to(scores.dtype)
        w = F.softmax(scores.float(), dim=-1).type_as(scores)
        o = torch.matmul(w, v).transpose(1, 2).contiguous().view(b, -1, self.h * self.hd)
        x = x + self.o(o)
        return x + self.wo(F.relu(self.wi(self.ln_ff(x))))


# ---- ViT / DeiT ------------------------------------------------------------------------------------------------
class ViTAttention(nn.Module):
    """timm's: one qkv Linear reshaped to (3, B, H, N, hd) and unbound, q scaled before the product."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.scale = self.hd ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attn_drop, self.proj_drop = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = ViTAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiT(nn.Module):
    """Patches by a strided conv, a class and a distillation token, learned positions, two pre-norm blocks, the
    two heads averaged (DeiT's eval output)."""

    def __init__(self, d: int = 32, heads: int = 4, image: int = 16, patch: int = 4, classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token, self.dist_token = nn.Parameter(torch.randn(1, 1, d)), nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 2, d))
        self.blocks = nn.Sequential(ViTBlock(d, heads), ViTBlock(d, heads))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head, self.head_dist = nn.Linear(d, classes), nn.Linear(d, classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                  # (B, P, d)
        b = x.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x), dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


# ---- BERT embeddings -------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + token type + position embeddings, LayerNorm (the last add fused with it), dropout."""

    def __init__(self, vocab: int = 64, d: int = 32, max_pos: int = 32):
        super().__init__()
        self.word, self.pos, self.token_type = nn.Embedding(vocab, d), nn.Embedding(max_pos, d), nn.Embedding(2, d)
        self.LayerNorm, self.dropout = nn.LayerNorm(d, eps=1e-12), nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_pos).expand(1, -1), persistent=False)

    def forward(self, ids, token_type_ids):
        n = ids.shape[1]
        emb = self.word(ids) + self.token_type(token_type_ids)
        emb = emb + self.pos(self.position_ids[:, :n].expand(ids.shape[0], n))
        return self.dropout(self.LayerNorm(emb))


# ---- Whisper-style decoder layer: causal self-attention, cross-attention to an encoder of another length --------
class CrossDecoderLayer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.self_ln, self.cross_ln, self.ff_ln = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_qkv, self.self_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def _heads(self, t):                                       # (B, N, d) -> (B, H, N, hd)
        return t.view(t.shape[0], t.shape[1], self.h, self.hd).transpose(1, 2)

    def _merge(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    def forward(self, x, enc, enc_padding):
        """x (B, Nq, d), enc (B, Nk, d), enc_padding (B, Nk) bool, True = a padded encoder position."""
        q, k, v = (self._heads(t) for t in self.self_qkv(self.self_ln(x)).chunk(3, -1))
        x = x + self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        q = self._heads(self.cross_q(self.cross_ln(x)))
        k, v = (self._heads(t) for t in self.cross_kv(enc).chunk(2, -1))
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.hd)
        s = s.masked_fill(enc_padding[:, None, None, :], float("-inf"))
        x = x + self.cross_out(self._merge(torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)))
        return x + self.fc2(F.gelu(self.fc1(self.ff_ln(x))))
