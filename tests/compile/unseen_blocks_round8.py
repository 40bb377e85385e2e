"""Model blocks written by hand for the compile backend's unseen-models round 8, as their authors write them (no
transformers or timm package): a T5 block (bucketed relative position bias from an Embedding, ``scores += bias``
unscaled, the padding and causal masks folded into the bias, T5's mean-free RMSNorm in f32, gated-GELU FFN with tanh);
a timm ViT block with a class token, LayerNorm eps=1e-6, the fused qkv unbound, per-head q/k LayerNorm (qk_norm) and
layer scale, by ``q * scale @ k^T`` or SDPA; a BERT layer whose additive padding bias is made from a boolean mask by
``masked_fill(~keep, finfo.min)``, attention dropout (a no-op in eval); a GPT-NeoX block (parallel residual, rotary on
half of each head's dims, ``torch.where(causal, s, min)`` then the padding bias added: two masks) and the same with the
two folded into one bias first; a Mistral-style sliding window (SDPA's boolean mask, ``masked_fill(-inf)``,
``torch.where(finfo.min)``, an additive bias); cross-attention with Nq != Nk; GQA by Hugging Face's ``repeat_kv``
(``[:, :, None].expand(...).reshape(...)``), the softmax in f32 cast back and dropout, or SDPA with ``scale=`` and
``enable_gqa=``; the Annotated Transformer's ``masked_fill(mask == 0, -1e9)``; a small causal LM (its loss in the
forward) for training and shape tests; a block whose forward breaks the graph (``print``, ``.item()``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, H = 32, 4
HD = D // H


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


def _heads(t, b: int, n: int, h: int = H):
    """(b, n, h * hd) -> (b, h, n, hd)."""
    return t.view(b, n, h, -1).transpose(1, 2)


# ---- T5 -------------------------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """T5's RMSNorm: no mean subtracted, no bias, the variance in f32, cast back to the weight's 16-bit dtype."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 8, max_distance: int = 20):
    """T5's buckets: exact for small distances, logarithmic up to max_distance."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class T5Block(nn.Module):
    """Self-attention with a learned bucketed bias (1, H, n, n) plus the padding (and causal) masks of finfo.min,
    ``scores += position_bias`` without a 1/sqrt(d) scale, the softmax in f32 ``type_as`` back; a gated-GELU FFN."""

    def __init__(self, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.ln1, self.ln2 = T5LayerNorm(D), T5LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(8, H)
        self.wi_0, self.wi_1 = nn.Linear(D, 64, bias=False), nn.Linear(D, 64, bias=False)
        self.wo = nn.Linear(64, D, bias=False)
        self.dropout = nn.Dropout(0.1)

    def position_bias(self, n: int, mask, dtype):
        context, memory = torch.arange(n)[:, None], torch.arange(n)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional=not self.causal)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)          # (1, H, n, n)
        extended = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min          # (b, 1, 1, n)
        if self.causal:
            extended = extended + torch.triu(torch.full((n, n), torch.finfo(dtype).min, dtype=dtype), 1)
        return bias + extended

    def forward(self, x, mask):
        b, n, _ = x.shape
        h = self.ln1(x)
        q, k, v = _heads(self.q(h), b, n), _heads(self.k(h), b, n), _heads(self.v(h), b, n)
        scores = torch.matmul(q, k.transpose(3, 2))                                           # (b, H, n, n)
        scores += self.position_bias(n, mask, x.dtype)
        weights = self.dropout(F.softmax(scores.float(), dim=-1).type_as(scores))
        attn = torch.matmul(weights, v).transpose(1, 2).contiguous().view(b, n, D)
        x = x + self.dropout(self.o(attn))
        h = self.ln2(x)
        h = F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h)
        return x + self.dropout(self.wo(self.dropout(h)))


# ---- ViT (timm) -----------------------------------------------------------------------------------------------------
class ViTBlock(nn.Module):
    """timm's layout: a class token and position embedding, LayerNorm(eps=1e-6), one qkv Linear unbound, per-head
    LayerNorms of q and k (qk_norm), layer scale, the class token's features through a final norm into a head."""

    def __init__(self, fused: bool = False, n: int = 10, classes: int = 5):
        super().__init__()
        self.fused = fused
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, D))
        self.norm1, self.norm2, self.norm = (nn.LayerNorm(D, eps=1e-6) for _ in range(3))
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.q_norm, self.k_norm = nn.LayerNorm(HD, eps=1e-6), nn.LayerNorm(HD, eps=1e-6)
        self.gamma1 = nn.Parameter(torch.full((D,), 0.5))
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.head = nn.Linear(D, classes)
        self.scale = HD ** -0.5

    def forward(self, x):
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        n = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            a = attn @ v
        x = x + self.gamma1 * self.proj(a.transpose(1, 2).reshape(b, n, D))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


# ---- BERT -----------------------------------------------------------------------------------------------------------
class BertLayer(nn.Module):
    """Embeddings + LayerNorm(eps=1e-12), one post-LN layer; the padding bias (b, 1, 1, n) made from a boolean keep
    mask by ``torch.zeros(...).masked_fill(~keep, finfo.min)``, attention dropout (eval: a no-op)."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, D), nn.Embedding(64, D)
        self.ln_emb, self.ln1, self.ln2 = (nn.LayerNorm(D, eps=1e-12) for _ in range(3))
        self.query, self.key, self.value, self.dense = (nn.Linear(D, D) for _ in range(4))
        self.intermediate, self.output = nn.Linear(D, 64), nn.Linear(64, D)
        self.dropout = nn.Dropout(0.1)

    def forward(self, ids, keep):
        b, n = ids.shape
        x = self.dropout(self.ln_emb(self.word(ids) + self.position(torch.arange(n))))
        bias = torch.zeros(b, 1, 1, n, dtype=x.dtype).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)

        def heads(t):
            return t.view(b, n, H, HD).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD) + bias
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(b, n, D)
        x = self.ln1(self.dropout(self.dense(ctx)) + x)
        return self.ln2(self.dropout(self.output(F.gelu(self.intermediate(x)))) + x)


# ---- GPT-NeoX -------------------------------------------------------------------------------------------------------
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class NeoXBlock(nn.Module):
    """GPT-NeoX: one fused qkv laid out per head, rotary on the first ``rotary_pct`` of each head's dims, parallel
    residual (x + attn(ln1(x)) + mlp(ln2(x))). ``folded=False``: Hugging Face's older eager form,
    ``torch.where(causal, s, min)`` and then the padding bias added (two masks); ``folded=True``: the two folded
    into one additive bias before the scores."""

    def __init__(self, rotary_pct: float = 0.5, folded: bool = False):
        super().__init__()
        self.folded = folded
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.dense = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.rotary_ndims = int(HD * rotary_pct)
        inv = 1.0 / 10000 ** (torch.arange(0, self.rotary_ndims, 2).float() / self.rotary_ndims)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.norm_factor = math.sqrt(HD)

    def rotary(self, t, cos, sin):
        r, rest = t[..., :self.rotary_ndims], t[..., self.rotary_ndims:]
        return torch.cat((r * cos + rotate_half(r) * sin, rest), dim=-1)

    def forward(self, x, padding_bias):
        b, n, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, n, H, 3 * HD)
        q, k, v = (qkv[..., i * HD:(i + 1) * HD].permute(0, 2, 1, 3) for i in range(3))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None].to(x.dtype), emb.sin()[None, None].to(x.dtype)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.norm_factor
        if self.folded:
            low = torch.finfo(x.dtype).min
            scores = scores + torch.zeros(1, 1, n, n, dtype=x.dtype).masked_fill(~causal, low).add(padding_bias)
        else:
            scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
            scores = scores + padding_bias
        probs = nn.functional.softmax(scores, dim=-1).to(v.dtype)
        attn = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, n, D)
        return self.down(F.gelu(self.up(self.ln2(x)))) + self.dense(attn) + x


# ---- sliding window, cross-attention, GQA ---------------------------------------------------------------------------
SLIDING_FORMS = ("sdpa", "masked_fill", "where", "additive")


class SlidingWindowAttention(nn.Module):
    """Mistral's sliding window: query i sees keys i - window < j <= i, as ``form``: SDPA's boolean mask,
    ``masked_fill(~allowed, -inf)``, ``torch.where(allowed, s, finfo.min)``, or an additive bias of finfo.min."""

    def __init__(self, form: str, window: int = 3):
        super().__init__()
        self.form, self.window = form, window
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & (i - j < self.window)                                          # (n, n)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(HD)
            if self.form == "masked_fill":
                s = s.masked_fill(~allowed, float("-inf"))
            elif self.form == "where":
                s = torch.where(allowed, s, torch.finfo(s.dtype).min)
            else:
                s = s + torch.zeros(n, n, dtype=s.dtype).masked_fill(~allowed, torch.finfo(s.dtype).min)
            out = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, D))


class CrossAttention(nn.Module):
    """Decoder queries (b, nq, D) over encoder memory (b, nk, D) with a boolean key-padding mask: written out with
    an additive finfo.min bias, by SDPA's boolean mask, or SDPA's is_causal (top-left aligned when nq != nk)."""

    def __init__(self, form: str = "explicit"):
        super().__init__()
        self.form = form
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * D)

    def forward(self, x, memory, memory_keep):
        b, nq, _ = x.shape
        nk = memory.shape[1]
        q = _heads(self.q(x), b, nq)                                                         # (b, H, nq, hd)
        k, v = self.kv(memory).view(b, nk, 2, H, HD).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)                                          # (b, H, nk, hd)
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=memory_keep[:, None, None, :])
        if self.form == "sdpa_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        bias = torch.zeros(b, 1, 1, nk, dtype=x.dtype).masked_fill(~memory_keep[:, None, None, :],
                                                                  torch.finfo(x.dtype).min)
        s = torch.matmul(q, k.transpose(2, 3)) * HD ** -0.5 + bias
        return torch.matmul(s.softmax(-1), v)


class GQAttention(nn.Module):
    """Llama / Mistral GQA with ``kv_heads`` key/value heads: Hugging Face's ``repeat_kv`` (expand over a new dim,
    reshape), a causal bias of finfo.min by ``torch.triu``, the softmax in f32 cast back to q's dtype, attention
    dropout; or (``form="sdpa"``) SDPA with is_causal, an explicit ``scale=`` and ``enable_gqa=True``."""

    def __init__(self, form: str = "repeat_kv", kv_heads: int = 2, scale: float = 0.3):
        super().__init__()
        self.form, self.kv_heads, self.scale = form, kv_heads, scale
        self.q = nn.Linear(D, D, bias=False)
        self.k, self.v = nn.Linear(D, kv_heads * HD, bias=False), nn.Linear(D, kv_heads * HD, bias=False)

    @staticmethod
    def repeat_kv(t, n_rep: int):
        b, kv, n, hd = t.shape
        return t[:, :, None, :, :].expand(b, kv, n_rep, n, hd).reshape(b, kv * n_rep, n, hd)

    def forward(self, x):
        b, n, _ = x.shape
        q = _heads(self.q(x), b, n)
        k, v = _heads(self.k(x), b, n, self.kv_heads), _heads(self.v(x), b, n, self.kv_heads)
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        k, v = self.repeat_kv(k, H // self.kv_heads), self.repeat_kv(v, H // self.kv_heads)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scale
        s = s + torch.triu(torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype), diagonal=1)[None, None]
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        p = F.dropout(p, p=0.1, training=self.training)
        return torch.matmul(p, v)


class AnnotatedAttention(nn.Module):
    """The Annotated Transformer's ``attention``: ``scores.masked_fill(mask == 0, fill)`` with a large finite fill."""

    def __init__(self, fill: float = -1e9):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(mask[:, None, None, :] == 0, self.fill)
        return torch.matmul(F.softmax(scores, dim=-1), v)


# ---- a small causal LM, its loss in the forward ---------------------------------------------------------------------
class TinyLM(nn.Module):
    """Embedding, pre-LN attention (written out with a -inf causal fill and the softmax in f32, or SDPA causal),
    an RMSNorm'd SwiGLU by chunk, a final LayerNorm, a bias-free head; with labels, the loss of
    ``logits.view(-1, V)`` (``float_logits``: of ``logits.float()``, Hugging Face's)."""

    def __init__(self, form: str = "explicit", vocab: int = 40, float_logits: bool = False):
        super().__init__()
        self.form, self.vocab, self.float_logits = form, vocab, float_logits
        self.embed = nn.Embedding(vocab, D)
        self.ln1, self.ln_f = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D)
        self.ln2 = nn.RMSNorm(D, eps=1e-6)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 96, bias=False), nn.Linear(48, D, bias=False)
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, ids, labels=None):
        b, n = ids.shape
        x = self.embed(ids)
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(HD)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            a = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, D))
        gate, up = self.up(self.ln2(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        logits = self.head(self.ln_f(x))
        if labels is None:
            return logits
        if self.float_logits:
            logits = logits.float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))


# ---- graph breaks ---------------------------------------------------------------------------------------------------
class BreakingBlock(nn.Module):
    """A block whose forward breaks Dynamo's graph: ``print`` before the attention (``"print"``), the scale read by
    ``.item()`` from a learned logit (``"item"``: the scale is then a number in the next graph), or a print between
    the scores and their softmax (``"mid"``: the attention split over two graphs)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.ln, self.qkv = nn.LayerNorm(D), nn.Linear(D, 3 * D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(HD ** -0.5)))

    def forward(self, x):
        b, n, _ = x.shape
        h = self.ln(x)
        if self.mode == "print":
            print("block input", tuple(h.shape))
        q, k, v = self.qkv(h).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        scale = min(self.logit_scale.exp().item(), 10.0) if self.mode == "item" else HD ** -0.5
        s = q @ k.transpose(-2, -1) * scale
        if self.mode == "mid":
            print("scores", tuple(s.shape))
        out = s.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, n, D) + x
