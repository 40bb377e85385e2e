"""Model blocks written by hand for the compile backend's unseen-models round 5, as their authors write them (no
transformers package): Phi (one LayerNorm feeding attention and MLP in parallel, partial rotary, q and k upcast to
f32 before their product), OLMo / StableLM (LayerNorm without parameters, q/k/v clamped in place), a Mixtral-style
sparse MoE after attention (top-2 of an f32 router softmax, dense or looped dispatch), RetNet's parallel retention
(no softmax: a decay-masked linear attention), Gemma-2 attention (logit soft-capping, a sliding window, a final
logit cap), attention with learned sinks (one extra logit per head, dropped after the softmax), cross-attention
with a bool key padding mask, Flamingo's perceiver resampler (latents over cat(media, latents), the max subtracted
from the scores), a Conformer convolution module (GLU, depthwise conv, BatchNorm), MaskFormer's masked attention
(rows whose every key is masked let through whole), a ViT with registers, an encoder calling
F.multi_head_attention_forward itself, and a BERT-style layer in the forms of older code (torch.baddbmm scores, a
division by a tensor, dropout on the probabilities, probabilities returned, in-place residual adds, a mask made
under torch.no_grad())."""

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
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary(n: int, dim: int, dtype, base: float = 10000.0):
    """cos, sin (N, dim), built in f32 and cast."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    emb = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def causal_bias(n: int, dtype):
    """(1, 1, N, N): 0 on and below the diagonal, finfo.min above (Hugging Face's 4-D causal mask)."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


# ---- Phi ----------------------------------------------------------------------------------------------------------
class PhiBlock(nn.Module):
    """Phi-2: h = ln(x); x + attn(h) + mlp(h) (parallel); rotary over the first ``partial`` of each head; q and k
    cast to f32 before q @ k^T / sqrt(hd), the causal bias added, softmax(dtype=f32) cast to v's dtype; gelu_new."""

    def __init__(self, d: int = 32, heads: int = 4, partial: float = 0.5):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.rot = int(self.hd * partial)
        self.input_layernorm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.dense = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def _rope(self, t, cos, sin):
        r, rest = t[..., : self.rot], t[..., self.rot:]
        return torch.cat((r * cos + rotate_half(r) * sin, rest), dim=-1)

    def forward(self, x):
        b, n, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, n, self.h, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rotary(n, self.rot, x.dtype)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        w = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(2, 3)) / math.sqrt(self.hd)
        w = w + causal_bias(n, torch.float32)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(v.dtype)
        attn = self.dense(torch.matmul(w, v).transpose(1, 2).reshape(b, n, d))
        mlp = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        return attn + mlp + x


# ---- OLMo / StableLM ---------------------------------------------------------------------------------------------
class OLMoBlock(nn.Module):
    """OLMo-1: LayerNorm with no weight and no bias (elementwise_affine=False; StableLM-2's bias=False spelling with
    ``affine``), a fused qkv clamped in place to +-clip, rotary, SDPA causal, SwiGLU from one fused projection."""

    def __init__(self, d: int = 32, heads: int = 4, clip: float = 2.0, affine: bool = False):
        super().__init__()
        self.h, self.hd, self.clip = heads, d // heads, clip
        norm = {"elementwise_affine": affine, "bias": False}
        self.attn_norm, self.ff_norm = nn.LayerNorm(d, **norm), nn.LayerNorm(d, **norm)
        self.att_proj, self.attn_out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.ff_proj, self.ff_out = nn.Linear(d, 4 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.att_proj(self.attn_norm(x))
        qkv.clamp_(min=-self.clip, max=self.clip)
        q, k, v = (t.view(b, n, self.h, self.hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
        cos, sin = rotary(n, self.hd, x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(o.transpose(1, 2).reshape(b, n, d))
        up, gate = self.ff_proj(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


# ---- Mixtral-style sparse MoE ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MoEBlock(nn.Module):
    """Mixtral: RMSNorm, causal attention written out (softmax in f32), RMSNorm, a sparse MoE: router logits (T, E),
    softmax(dim=1, dtype=float), top-2, renormalised in place, cast to the input's dtype; each expert a SwiGLU.
    ``dispatch``: "dense" (every expert on every token, weighted by a scatter of the top-2: one graph) or "loop"
    (Hugging Face's: the tokens of each expert gathered by torch.where and index_add_'ed back)."""

    def __init__(self, d: int = 32, heads: int = 4, experts: int = 4, top_k: int = 2, dispatch: str = "dense"):
        super().__init__()
        self.h, self.hd, self.e, self.top_k, self.dispatch = heads, d // heads, experts, top_k, dispatch
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, experts, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(experts))
        self.w3 = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(experts))
        self.w2 = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(experts))

    def _attention(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.h, self.hd).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        s = q @ k.transpose(2, 3) / math.sqrt(self.hd) + causal_bias(n, x.dtype)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, d))

    def _expert(self, i, t):
        return self.w2[i](F.silu(self.w1[i](t)) * self.w3[i](t))

    def forward(self, x):
        x = x + self._attention(self.norm1(x))
        b, n, d = x.shape
        t = self.norm2(x).view(-1, d)                                           # (T, d)
        router_logits = self.gate(t)                                             # (T, E)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)              # (T, 2)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(t.dtype)
        if self.dispatch == "dense":
            gates = torch.zeros(t.shape[0], self.e, dtype=t.dtype).scatter(1, selected, weights)    # (T, E)
            out = sum(gates[:, i, None] * self._expert(i, t) for i in range(self.e))
        else:
            out = torch.zeros_like(t)
            expert_mask = F.one_hot(selected, num_classes=self.e).permute(2, 1, 0)                # (E, 2, T)
            for i in range(self.e):
                idx, rows = torch.where(expert_mask[i])
                y = self._expert(i, t[rows]) * weights[rows, idx, None]
                out.index_add_(0, rows, y.to(t.dtype))
        return x + out.view(b, n, d), router_logits


# ---- RetNet --------------------------------------------------------------------------------------------------------
class RetNetBlock(nn.Module):
    """Parallel retention: (q k^T * D) v per head, D[n, m] = gamma_h^(n - m) for m <= n else 0 (no softmax: a
    linear attention), rotary (xpos-free), GroupNorm per head, a swish gate; a pre-LN FFN."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.g, self.out = (nn.Linear(d, d, bias=False) for _ in range(5))
        self.group_norm = nn.GroupNorm(heads, d, affine=False)
        self.ffn1, self.ffn2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        gammas = 1.0 - torch.exp2(-5.0 - torch.arange(heads, dtype=torch.float32))
        self.register_buffer("log_gamma", gammas.log(), persistent=False)

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.h, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        cos, sin = rotary(n, self.hd, x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        i = torch.arange(n)
        dist = (i[:, None] - i[None, :]).to(torch.float32)                                   # (N, N)
        decay = torch.exp(self.log_gamma[:, None, None] * dist).masked_fill(dist < 0, 0.0)   # (H, N, N)
        decay = decay / decay.sum(-1, keepdim=True).sqrt()
        r = (q @ k.transpose(-1, -2)) * self.hd ** -0.5 * decay.to(x.dtype)
        o = (r @ v).transpose(1, 2).reshape(b * n, d)
        o = self.group_norm(o).view(b, n, d)
        x = x + self.out(F.silu(self.g(h)) * o)
        return x + self.ffn2(F.gelu(self.ffn1(self.ln2(x))))


# ---- Gemma-2 -------------------------------------------------------------------------------------------------------
class Gemma2Attention(nn.Module):
    """Gemma-2's eager attention: q scaled by query_pre_attn_scalar ** -0.5, scores soft-capped (tanh(s / c) * c),
    then the causal (or sliding-window) additive mask, softmax in f32; a final logit soft-cap on an LM head."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, softcap: float = 5.0, window: int | None = None,
                 final_softcap: float = 3.0, vocab: int = 48):
        super().__init__()
        self.h, self.kv, self.hd, self.softcap, self.window = heads, kv_heads, d // heads, softcap, window
        self.final_softcap = final_softcap
        self.scaling = 16.0 ** -0.5                                # query_pre_attn_scalar = 16, not hd
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False), nn.Linear(d, kv_heads * self.hd,
                                                                                           bias=False)
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm(x)
        q = self.q_proj(h).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        v = self.v_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        s = s / self.softcap
        s = torch.tanh(s)
        s = s * self.softcap
        mask = causal_bias(n, x.dtype)
        if self.window is not None:
            i = torch.arange(n)
            mask = mask.masked_fill((i[:, None] - i[None, :] >= self.window), torch.finfo(x.dtype).min)
        p = F.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        x = x + self.o_proj(torch.matmul(p, v).transpose(1, 2).reshape(b, n, d))
        logits = self.lm_head(x)
        return torch.tanh(logits / self.final_softcap) * self.final_softcap


# ---- attention sinks ------------------------------------------------------------------------------------------------
class SinkAttention(nn.Module):
    """gpt-oss: one learned logit per head joins every query row's scores (cat on the key axis), the row's max
    subtracted, softmax, the sink's column dropped before the product with v."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.h, self.hd).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        s = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5 + causal_bias(n, x.dtype)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)
        combined = torch.cat([s, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        p = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        return x + self.o(torch.matmul(p, v).transpose(1, 2).reshape(b, n, d))


# ---- cross-attention with a bool key padding mask ------------------------------------------------------------------
class PaddedCrossAttention(nn.Module):
    """Queries (B, Nq, d) over memory (B, Nk, dm) with key_padding_mask (B, Nk) bool, True = padding: filled with
    ``fill`` ("-inf" or "min") on the scores, or passed to SDPA as ~mask ("sdpa")."""

    def __init__(self, d: int = 32, dm: int = 24, heads: int = 4, fill: str = "-inf"):
        super().__init__()
        self.h, self.hd, self.fill = heads, d // heads, fill
        self.ln = nn.LayerNorm(d)
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.kv = nn.Linear(dm, 2 * d)

    def forward(self, x, memory, key_padding_mask):
        b, n, d = x.shape
        q = self.q(self.ln(x)).view(b, n, self.h, self.hd).transpose(1, 2)
        k, v = (t.view(b, -1, self.h, self.hd).transpose(1, 2) for t in self.kv(memory).chunk(2, dim=-1))
        pad = key_padding_mask[:, None, None, :]                                        # (B, 1, 1, Nk)
        if self.fill == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad)
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
            s = s.masked_fill(pad, float("-inf") if self.fill == "-inf" else torch.finfo(s.dtype).min)
            o = s.softmax(dim=-1) @ v
        return x + self.o(o.transpose(1, 2).reshape(b, n, d))


# ---- perceiver resampler ------------------------------------------------------------------------------------------
class PerceiverResampler(nn.Module):
    """Flamingo: learned latents (L, d); per layer the latents attend to cat(media, latents) (both LayerNorm'd), q
    scaled first, sim minus its row max (detached) before the softmax; a GELU FFN; a final LayerNorm."""

    def __init__(self, d: int = 32, heads: int = 4, latents: int = 6, layers: int = 2):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.latents = nn.Parameter(torch.randn(latents, d))
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm_media": nn.LayerNorm(d), "norm_latents": nn.LayerNorm(d), "to_q": nn.Linear(d, d, bias=False),
            "to_kv": nn.Linear(d, 2 * d, bias=False), "to_out": nn.Linear(d, d, bias=False),
            "ff_norm": nn.LayerNorm(d), "ff1": nn.Linear(d, 4 * d, bias=False), "ff2": nn.Linear(4 * d, d, bias=False),
        }) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, media):
        b = media.shape[0]
        lat = self.latents[None].expand(b, -1, -1)
        for blk in self.layers:
            x, l_ = blk["norm_media"](media), blk["norm_latents"](lat)
            q = blk["to_q"](l_).view(b, -1, self.h, self.hd).transpose(1, 2) * self.hd ** -0.5
            kv_in = torch.cat((x, l_), dim=-2)
            k, v = (t.view(b, -1, self.h, self.hd).transpose(1, 2) for t in blk["to_kv"](kv_in).chunk(2, dim=-1))
            sim = torch.einsum("b h i d, b h j d -> b h i j", q, k)
            sim = sim - sim.amax(dim=-1, keepdim=True).detach()
            out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)
            lat = blk["to_out"](out.transpose(1, 2).reshape(b, -1, self.h * self.hd)) + lat
            lat = blk["ff2"](F.gelu(blk["ff1"](blk["ff_norm"](lat)))) + lat
        return self.norm(lat)


# ---- Conformer -------------------------------------------------------------------------------------------------------
class ConformerBlock(nn.Module):
    """Macaron FFN (x + 0.5 * ffn), MHSA through SDPA, the convolution module (LayerNorm, pointwise conv to 2C,
    GLU over channels, depthwise conv, BatchNorm1d, SiLU, pointwise conv, dropout), a second half FFN, LayerNorm."""

    def __init__(self, d: int = 32, heads: int = 4, kernel: int = 5, p: float = 0.0):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ffn1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.ffn2 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.attn_norm, self.qkv, self.attn_out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.batch_norm = nn.BatchNorm1d(d)
        self.pointwise2 = nn.Conv1d(d, d, 1)
        self.dropout = nn.Dropout(p)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, x):
        b, n, d = x.shape
        x = x + 0.5 * self.ffn1(x)
        q, k, v = (t.view(b, n, self.h, self.hd).transpose(1, 2) for t in self.qkv(self.attn_norm(x)).chunk(3, -1))
        x = x + self.attn_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        c = self.conv_norm(x).transpose(1, 2)                                   # (B, C, N)
        c = F.glu(self.pointwise1(c), dim=1)
        c = F.silu(self.batch_norm(self.depthwise(c)))
        x = x + self.dropout(self.pointwise2(c)).transpose(1, 2)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


# ---- MaskFormer masked attention ------------------------------------------------------------------------------------
class MaskedAttentionDecoderLayer(nn.Module):
    """Mask2Former: queries (B, Q, d) cross-attend to pixel features (B, P, d) only where their predicted mask
    (sigmoid(q_emb @ pixels^T) >= 0.5) is on; a query whose mask is empty everywhere attends to all pixels (its
    row unmasked whole: no -inf row). Then self-attention among the queries and an FFN, post-LN."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.mask_embed = nn.Linear(d, d)
        self.cq, self.ck, self.cv, self.co = (nn.Linear(d, d) for _ in range(4))
        self.sq, self.sk, self.sv, self.so = (nn.Linear(d, d) for _ in range(4))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def _heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.h, self.hd).transpose(1, 2)

    def forward(self, queries, pixels):
        b, nq, d = queries.shape
        mask_logits = self.mask_embed(queries) @ pixels.transpose(1, 2)                       # (B, Q, P)
        blocked = mask_logits.sigmoid() < 0.5
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)                                # no row blocked whole
        s = self._heads(self.cq(queries)) @ self._heads(self.ck(pixels)).transpose(-1, -2) * self.hd ** -0.5
        s = s.masked_fill(blocked[:, None], float("-inf"))
        o = (s.softmax(-1) @ self._heads(self.cv(pixels))).transpose(1, 2).reshape(b, nq, d)
        x = self.n1(queries + self.co(o))
        q, k, v = self._heads(self.sq(x)), self._heads(self.sk(x)), self._heads(self.sv(x))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, nq, d)
        x = self.n2(x + self.so(o))
        return self.n3(x + self.ff2(F.relu(self.ff1(x)))), mask_logits


# ---- ViT with registers ----------------------------------------------------------------------------------------------
class RegisterViT(nn.Module):
    """Patch embedding by a strided conv, a class token and 4 register tokens before the patches, position
    embeddings on the class token and the patches only, pre-LN blocks (nn.MultiheadAttention, need_weights=False),
    the registers dropped at the end."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, registers: int = 4, image: int = 16,
                 patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.reg = nn.Parameter(torch.randn(1, registers, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, d) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "attn": nn.MultiheadAttention(d, heads, batch_first=True), "ln2": nn.LayerNorm(d),
            "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)}) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.registers = registers

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)                      # (B, P, d)
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        x = torch.cat([x[:, :1], self.reg.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            h = blk["ln1"](x)
            x = x + blk["attn"](h, h, h, need_weights=False)[0]
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](x))))
        x = self.norm(x)
        return x[:, 0], x[:, 1 + self.registers:]


# ---- F.multi_head_attention_forward called by the model -------------------------------------------------------------
class FunctionalMHAEncoder(nn.Module):
    """An encoder layer that keeps its own in_proj weight and calls F.multi_head_attention_forward with (N, B, d)
    inputs and a bool key padding mask, then a post-LN FFN. ``need_weights``: the averaged probabilities returned
    (torch's bmm path) or None (its SDPA path)."""

    def __init__(self, d: int = 32, heads: int = 4, need_weights: bool = True):
        super().__init__()
        self.h, self.d, self.need_weights = heads, d, need_weights
        self.in_proj_weight, self.in_proj_bias = nn.Parameter(torch.randn(3 * d, d) * d ** -0.5), \
            nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, key_padding_mask):
        t = x.transpose(0, 1)                                                   # (N, B, d)
        a, w = F.multi_head_attention_forward(
            t, t, t, self.d, self.h, self.in_proj_weight, self.in_proj_bias, None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=self.need_weights, average_attn_weights=True)
        x = self.n1(x + a.transpose(0, 1))
        return self.n2(x + self.fc2(F.gelu(self.fc1(x)))), w


# ---- a BERT-style layer in older code's forms ------------------------------------------------------------------------
class OldStyleSelfAttention(nn.Module):
    """Scores by ``torch.baddbmm`` (form "baddbmm"), by q @ k^T divided by a 0-d tensor ("div_tensor": sqrt of a
    torch.tensor of the head dim) or by torch.einsum ("einsum"); an additive padding mask made under torch.no_grad();
    softmax of the f32 scores cast back (.float().softmax().type_as); dropout on the probabilities; the
    probabilities returned too when ``output_attentions``; residual adds written in place."""

    def __init__(self, d: int = 32, heads: int = 4, form: str = "div_tensor", p: float = 0.1,
                 output_attentions: bool = False):
        super().__init__()
        self.h, self.hd, self.form, self.output_attentions = heads, d // heads, form, output_attentions
        self.query, self.key, self.value, self.dense = (nn.Linear(d, d) for _ in range(4))
        self.dropout = nn.Dropout(p)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def _scores(self, q, k):
        b, h, n, hd = q.shape
        if self.form == "baddbmm":
            q3, k3 = q.reshape(b * h, n, hd), k.reshape(b * h, -1, hd)
            out = torch.empty(b * h, n, k3.shape[1], dtype=q.dtype, device=q.device)
            return torch.baddbmm(out, q3, k3.transpose(1, 2), beta=0.0, alpha=hd ** -0.5).view(b, h, n, -1)
        if self.form == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)
        return torch.matmul(q, k.transpose(-1, -2)) / torch.sqrt(torch.tensor(hd, dtype=q.dtype))

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        with torch.no_grad():
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        q, k, v = (p(x).view(b, n, self.h, self.hd).transpose(1, 2) for p in (self.query, self.key, self.value))
        s = self._scores(q, k) + bias
        probs = s.float().softmax(dim=-1).type_as(s)
        o = torch.matmul(self.dropout(probs), v).transpose(1, 2).reshape(b, n, d)
        h = self.dense(o)
        h += x
        h = self.ln1(h)
        out = self.fc2(F.gelu(self.fc1(h)))
        out.add_(h)
        out = self.ln2(out)
        return (out, probs) if self.output_attentions else out
