"""Model blocks written by hand for the compile backend's unseen-models round 4, as their authors write them (no
transformers, timm or whisper package): GPT-NeoX (partial rotary over the first quarter of each head, a fused qkv
viewed per head, torch.where with a causal buffer, parallel residual), a Qwen2 / Mistral layer (q/k/v with bias,
GQA through repeat_kv, SDPA with is_causal or a sliding-window bool mask), OpenAI Whisper's encoder (a conv front
end, q and k each scaled by hd ** -0.25, k transposed by its permute, softmax of the scores in f32), a decoder with
a KV cache written by index_copy_ and cross-attention, a ViT with LayerNorm'd q and k per head (qk-norm) and
LayerScale, a slot-attention step (softmax over the slots, dim=-2), BERT through SDPA with a (B, 1, 1, N) finfo.min
mask, and an MLP of norm and activation spellings (RMSNorm written three ways, F.normalize, ReLU squared)."""

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
    """(..., hd) -> (..., hd): the halves swapped, the second negated (the GPT-NeoX / Llama spelling)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(n: int, dim: int, dtype, offset: int = 0, base: float = 10000.0):
    """cos, sin (N, dim) for positions offset .. offset + N - 1, built in f32 and cast."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    t = torch.arange(offset, offset + n, dtype=torch.float32)
    emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)                  # (N, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- GPT-NeoX ----------------------------------------------------------------------------------------------------
class GPTNeoXLayer(nn.Module):
    """GPT-NeoX / Pythia: qkv (B, N, H, 3 hd) split on the last dim, rotary over the first ``rotary_pct`` of each
    head (the rest passed through, concatenated back), scores times 1/sqrt(hd), torch.where(causal buffer, scores,
    finfo.min), an additive (B, 1, 1, N) padding mask, parallel residual x + attn(ln1(x)) + mlp(ln2(x))."""

    def __init__(self, d: int = 32, heads: int = 4, rotary_pct: float = 0.25, max_len: int = 32):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.rot = int(self.hd * rotary_pct)
        self.norm_factor = 1.0 / math.sqrt(self.hd)
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.query_key_value, self.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)).view(1, 1, max_len, max_len)
        self.register_buffer("bias", causal, persistent=False)

    def _rotary(self, t, cos, sin):
        rot, rest = t[..., : self.rot], t[..., self.rot:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        qkv = self.query_key_value(self.input_layernorm(x)).view(b, n, self.h, 3 * self.hd).permute(0, 2, 1, 3)
        q, k, v = qkv[..., : self.hd], qkv[..., self.hd: 2 * self.hd], qkv[..., 2 * self.hd:]   # (B, H, N, hd)
        cos, sin = rotary_cos_sin(n, self.rot, x.dtype)
        q, k = self._rotary(q, cos, sin), self._rotary(k, cos, sin)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.norm_factor
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = torch.where(self.bias[:, :, :n, :n], scores, mask_value)
        extended = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min     # (B,1,1,N)
        probs = F.softmax(scores + extended, dim=-1).to(v.dtype)
        attn = self.dense(torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, n, d))
        mlp = self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x))))
        return x + attn + mlp


# ---- Qwen2 / Mistral -----------------------------------------------------------------------------------------------
class RMSNormRsqrt(nn.Module):
    """w * (x * rsqrt(mean(x^2) + eps)), in the input's dtype (no f32 upcast)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def repeat_kv(h, n_rep: int):
    """(B, Hkv, N, hd) -> (B, Hkv * n_rep, N, hd) by expand and reshape."""
    b, hkv, n, hd = h.shape
    return h[:, :, None].expand(b, hkv, n_rep, n, hd).reshape(b, hkv * n_rep, n, hd)


class Qwen2Layer(nn.Module):
    """q/k/v with bias, o without; rotary by rotate_half; GQA by repeat_kv; SDPA with is_causal=True when no window,
    else a (N, N) bool mask (True = attend) of the last ``window`` keys; SwiGLU without bias."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, window: int | None = None):
        super().__init__()
        self.h, self.kv, self.hd, self.window = heads, kv_heads, d // heads, window
        self.q_proj = nn.Linear(d, d)
        self.k_proj, self.v_proj = nn.Linear(d, kv_heads * self.hd), nn.Linear(d, kv_heads * self.hd)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm, self.post_attention_layernorm = RMSNormRsqrt(d), RMSNormRsqrt(d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, n, self.h, self.hd).transpose(1, 2)                 # (B, H, N, hd)
        k = self.k_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2)                # (B, Hkv, N, hd)
        v = self.v_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2)
        cos, sin = rotary_cos_sin(n, self.hd, x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            i = torch.arange(n, device=x.device)
            keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)      # (N, N)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, n, d))
        m = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


# ---- Whisper encoder (OpenAI's spelling) -----------------------------------------------------------------------------
def sinusoids(length: int, channels: int, max_timescale: float = 10000.0):
    """(length, channels): sin then cos of geometric timescales."""
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class WhisperEncoder(nn.Module):
    """Mel frames (B, n_mels, T) -> conv(k3) GELU -> conv(k3, stride 2) GELU -> (B, T/2, d) + sinusoids; pre-LN
    blocks whose q and k are each scaled by hd ** -0.25, k permuted straight to (B, H, hd, N), softmax of the f32
    scores cast back; ln_post."""

    def __init__(self, n_mels: int = 8, d: int = 32, heads: int = 4, layers: int = 2, frames: int = 64):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(frames // 2, d))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "attn_ln": nn.LayerNorm(d), "query": nn.Linear(d, d), "key": nn.Linear(d, d, bias=False),
            "value": nn.Linear(d, d), "out": nn.Linear(d, d), "mlp_ln": nn.LayerNorm(d),
            "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)}) for _ in range(layers))
        self.ln_post = nn.LayerNorm(d)

    def _attention(self, blk, x):
        b, n, d = x.shape
        scale = self.hd ** -0.25
        q = blk["query"](x).view(b, n, self.h, -1).permute(0, 2, 1, 3) * scale                 # (B, H, N, hd)
        k = blk["key"](x).view(b, n, self.h, -1).permute(0, 2, 3, 1) * scale                   # (B, H, hd, N)
        v = blk["value"](x).view(b, n, self.h, -1).permute(0, 2, 1, 3)
        w = F.softmax((q @ k).float(), dim=-1).to(q.dtype)
        return blk["out"]((w @ v).permute(0, 2, 1, 3).flatten(start_dim=2))

    def forward(self, mel):
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)                                              # (B, T/2, d)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for blk in self.blocks:
            x = x + self._attention(blk, blk["attn_ln"](x))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["mlp_ln"](x))))
        return self.ln_post(x)


# ---- a decoder with a KV cache written by index_copy_, and cross-attention -------------------------------------------
class IndexCopyCachedDecoder(nn.Module):
    """Self-attention over a (B, H, T, hd) cache written at ``positions`` by index_copy_ (the new keys and values
    of a prefill chunk or a decode step), masked where a key's position is past the query's; cross-attention to an
    encoder's states through SDPA; an MLP. Returns the hidden states."""

    def __init__(self, d: int = 32, heads: int = 4, max_len: int = 16, batch: int = 2):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.cq, self.ckv, self.co = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("cache_k", torch.zeros(batch, heads, max_len, self.hd))
        self.register_buffer("cache_v", torch.zeros(batch, heads, max_len, self.hd))

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.h, self.hd).transpose(1, 2)                                    # (B, H, N, hd)

    def forward(self, x, enc, positions):
        b, n, d = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        self.cache_k.index_copy_(2, positions, k.to(self.cache_k.dtype))
        self.cache_v.index_copy_(2, positions, v.to(self.cache_v.dtype))
        t = self.cache_k.shape[2]
        scores = q @ self.cache_k.transpose(-1, -2) / math.sqrt(self.hd)                        # (B, H, N, T)
        future = torch.arange(t, device=x.device)[None, :] > positions[:, None]                 # (N, T)
        scores = scores.masked_fill(future, float("-inf"))
        x = x + self.o((scores.softmax(dim=-1) @ self.cache_v).transpose(1, 2).reshape(b, n, d))
        cq = self._heads(self.cq(self.ln2(x)))
        ck, cv = (self._heads(t) for t in self.ckv(enc).chunk(2, dim=-1))
        x = x + self.co(F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln3(x)), approximate="tanh"))


# ---- ViT with qk-norm and LayerScale --------------------------------------------------------------------------------
class QKNormViT(nn.Module):
    """Patches by a strided Conv2d, a class token, learned positions; blocks whose q and k are LayerNorm'd over each
    head's hd features before SDPA (timm's qk_norm), residuals scaled by learned per-channel gammas (LayerScale);
    a final LayerNorm without bias; the class token's logits."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, patch: int = 4, image: int = 16,
                 classes: int = 10):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.patch_embed = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image // patch) ** 2, d))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(d, eps=1e-6), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
            "q_norm": nn.LayerNorm(self.hd, eps=1e-6), "k_norm": nn.LayerNorm(self.hd, eps=1e-6),
            "norm2": nn.LayerNorm(d, eps=1e-6), "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d),
            "ls1": nn.ParameterDict({"gamma": nn.Parameter(0.1 * torch.ones(d))}),
            "ls2": nn.ParameterDict({"gamma": nn.Parameter(0.1 * torch.ones(d))})}) for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-6, bias=False)
        self.head = nn.Linear(d, classes)

    def _attention(self, blk, x):
        b, n, d = x.shape
        qkv = blk["qkv"](x).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)          # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        q, k = blk["q_norm"](q), blk["k_norm"](k)
        return blk["proj"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                                  # (B, P, d)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = x + blk["ls1"]["gamma"] * self._attention(blk, blk["norm1"](x))
            x = x + blk["ls2"]["gamma"] * blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


# ---- slot attention: a softmax over the slots ------------------------------------------------------------------------
class SlotAttentionStep(nn.Module):
    """One iteration of slot attention: logits (B, S, N) of slots against inputs, softmax over the slots (dim=-2:
    the slots compete for each input), renormalized over the inputs, then a weighted mean; LayerNorms without
    affine parameters; an MLP with ReLU squared (Primer's), residual added after."""

    def __init__(self, d: int = 32, slots: int = 5):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(1, slots, d))
        self.norm_in, self.norm_slots = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, bias=False)
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, inputs):
        x = self.norm_in(inputs)                                                              # (B, N, d)
        slots = self.slots.expand(x.shape[0], -1, -1)                                          # (B, S, d)
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bsd,bnd->bsn", q, self.to_k(x)) * q.shape[-1] ** -0.5
        attn = logits.softmax(dim=-2) + 1e-8                                                   # (B, S, N)
        attn = attn / attn.sum(dim=-1, keepdim=True)
        slots = slots + torch.einsum("bsn,bnd->bsd", attn, self.to_v(x))
        return slots + self.fc2(torch.relu(self.fc1(slots)) ** 2)


# ---- BERT through SDPA ---------------------------------------------------------------------------------------------
class BertSdpaLayer(nn.Module):
    """Post-LN BERT whose attention is SDPA with the (B, 1, 1, N) additive extended mask (1 - mask) * finfo.min and
    dropout_p = p in training only; GELU intermediate."""

    def __init__(self, d: int = 32, heads: int = 4, p: float = 0.1):
        super().__init__()
        self.h, self.hd, self.p = heads, d // heads, p
        self.query, self.key, self.value, self.dense = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.intermediate, self.output = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.h, self.hd).permute(0, 2, 1, 3) for f in (self.query, self.key, self.value))
        extended = attention_mask[:, None, None, :].to(x.dtype)
        extended = (1.0 - extended) * torch.finfo(x.dtype).min
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=extended,
                                             dropout_p=self.p if self.training else 0.0)
        x = self.ln1(self.dense(ctx.permute(0, 2, 1, 3).reshape(b, n, d)) + x)
        return self.ln2(self.output(F.gelu(self.intermediate(x))) + x)


# ---- norms and activations in several spellings ----------------------------------------------------------------------
class NormSpellings(nn.Module):
    """Four residual MLP steps, each a norm spelled its own way and a bias-free Linear pair: x / sqrt(mean(x*x) +
    eps) * w with SiLU (residual added after), (x.square().mean() + eps).rsqrt() in f32 cast back with GELU (erf),
    F.normalize(x) * sqrt(d) * w (an L2 norm: not an RMSNorm with eps) with relu(x).square(), and x * rsqrt(
    torch.mean(x ** 2) + eps) with the residual added before the second Linear's output is used."""

    def __init__(self, d: int = 32, eps: float = 1e-5):
        super().__init__()
        self.eps, self.d = eps, d
        self.w = nn.ParameterList(nn.Parameter(1.0 + 0.1 * torch.randn(d)) for _ in range(4))
        self.up = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(4))
        self.down = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(4))

    def forward(self, x):
        h = x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.w[0]
        x = x + self.down[0](F.silu(self.up[0](h)))
        xf = x.float()
        h = (xf * (xf.square().mean(-1, keepdim=True) + self.eps).rsqrt()).to(x.dtype) * self.w[1]
        x = self.down[1](F.gelu(self.up[1](h))) + x
        h = F.normalize(x, dim=-1) * math.sqrt(self.d) * self.w[2]
        x = x + self.down[2](torch.relu(self.up[2](h)).square())
        h = x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + self.eps) * self.w[3]
        r = x + self.down[3](F.relu(self.up[3](h)))
        return r
