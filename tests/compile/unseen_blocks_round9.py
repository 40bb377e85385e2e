"""Model blocks written by hand for the compile backend's unseen-models round 9, as their authors write them (no
transformers or timm package): Hugging Face's decoding attention with ``past_key_values`` concatenated onto the new
keys and a 4-D additive mask made from the padding mask with the causal part offset by the past length (explicit or
SDPA with that float mask); BLOOM's ALiBi built from the padding mask's cumsum for a head count that is not a power of
two (6), folded with the causal and padding fills into one bias (4-D) or added by ``baddbmm`` then filled (BLOOM's own
3-D form); multi-query attention (one key/value head) by broadcasting in the products, ``repeat_interleave`` or
``expand``; DeepSeek-style attention whose keys are wider than its values (a no-rope and a rope part concatenated,
Dk = 12, Dv = 8); a learned temperature (a 0-d parameter) and Swin-v2's per-head logit scale on cosine scores; a scale
held in a 0-d buffer and a scale made in the forward as ``1 / torch.sqrt(torch.tensor(hd))`` through ``baddbmm``;
Hugging Face's ``head_mask`` multiplying the probabilities; scores taken as ``k @ q^T`` with the softmax over dim -2;
the old BERT's multiplicative-then-subtracted mask; a Linear + tanh GELU + dropout + Linear + dropout + residual MLP;
a pre-norm SwiGLU written out (LayerNorm with no affine parameters, ``nn.SiLU()`` module, bias-free Linears); a hand
RMSNorm and four look-alikes that are not RMSNorm (eps outside the square root, the statistic over another dim, the
mean |x|, the sum over d + 1); a loss head (``nll_loss(log_softmax)`` with ``ignore_index=0``, ``cross_entropy`` with
label smoothing and ignore_index, a per-token loss masked by hand); a tiny decoder for dynamic shapes and training;
a static cache written by ``index_copy_`` under Hugging Face's ``cache_position`` mask (``*=`` of a boolean, a clone,
a slice assignment).
Quantization: a conv + linear classifier (Conv2d, BatchNorm2d, pooling, two Linears) and a tiny transformer built on
``nn.MultiheadAttention`` (its ``out_proj`` a Linear subclass that the attention reads by weight) and an Embedding."""

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


def _merge(t):
    """(b, h, n, hd) -> (b, n, h * hd)."""
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


# ---- past_key_values ------------------------------------------------------------------------------------------------
def decoder_mask(attention_mask, n: int, dtype):
    """Hugging Face's ``_prepare_4d_causal_attention_mask`` for n new tokens after ``past = nk - n`` cached ones:
    (b, 1, n, nk), 0 where query i (at position past + i) may attend key j (j <= past + i, and j not padding),
    finfo.min elsewhere. The padding part by ``_expand_mask`` (``1 - mask`` filled with min where nonzero), the causal
    part by ``triu`` offset by the past length, combined by ``masked_fill`` (finfo.min, never -inf)."""
    b, nk = attention_mask.shape
    past, low = nk - n, torch.finfo(dtype).min
    causal = torch.full((n, nk), low, dtype=dtype).triu(past + 1)[None, None]              # (1, 1, n, nk)
    inverted = 1.0 - attention_mask[:, None, None, :].to(dtype).expand(b, 1, n, nk)          # (b, 1, n, nk)
    padding = inverted.masked_fill(inverted.to(torch.bool), low)
    return causal.masked_fill(padding.bool(), low)


class PastKVAttention(nn.Module):
    """A decoder attention step: q, k, v of the n new tokens; ``past_key_values`` (pk, pv) of (b, H, past, hd)
    concatenated in front of k and v (``torch.cat(dim=-2)``); the 4-D mask of ``decoder_mask``; written out (the
    softmax in f32 cast back, Hugging Face's) or SDPA with the float mask. Returns (output, (k, v)) as the cache."""

    def __init__(self, form: str = "explicit"):
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, attention_mask, past_key_values=None):
        b, n, _ = x.shape
        q, k, v = _heads(self.q(x), b, n), _heads(self.k(x), b, n), _heads(self.v(x), b, n)
        if past_key_values is not None:
            pk, pv = past_key_values
            k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)                     # (b, H, nk, hd)
        mask = decoder_mask(attention_mask, n, x.dtype)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HD) + mask
            a = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o(_merge(a)), (k, v)


# ---- ALiBi (BLOOM) --------------------------------------------------------------------------------------------------
def alibi_slopes(heads: int) -> torch.Tensor:
    """BLOOM's slopes: 2^(-8 i / p) for the closest power of two p <= heads, then every other slope of 2p for the
    heads beyond p (heads = 6: p = 4 and two of the eight)."""
    p = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(p) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + p, dtype=torch.int32))
    if p != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * p) - 3))), dtype=torch.float32)
        rest = min(p, heads - p)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    return slopes


class BloomAlibiAttention(nn.Module):
    """BLOOM with 6 heads of 8 (d = 48): the ALiBi bias slope_h * position_j, positions counted over the real tokens
    of a left-padded sequence (``(mask.cumsum(-1) - 1) * mask``). ``form="folded"``: (b, H, 1, n) ALiBi with the
    causal and padding fills (finfo.min) folded into one (b, H, n, n) bias added to the 4-D scores; ``form="bloom"``:
    BLOOM's own, ``baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(hd))`` over (b * H, n, hd), then ``masked_fill``."""

    heads, d = 6, 48

    def __init__(self, form: str = "folded"):
        super().__init__()
        self.form = form
        self.qkv, self.dense = nn.Linear(self.d, 3 * self.d), nn.Linear(self.d, self.d)
        self.register_buffer("slopes", alibi_slopes(self.heads), persistent=False)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        hd = self.d // self.heads
        q, k, v = self.qkv(x).view(b, n, self.heads, 3, hd).permute(3, 0, 2, 1, 4)          # (b, H, n, hd) each
        positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, None, :]  # (b, 1, 1, n)
        alibi = (self.slopes[None, :, None, None] * positions).to(x.dtype)                  # (b, H, 1, n)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        blocked = (j > i)[None, None] | (attention_mask[:, None, None, :] == 0)            # (b, 1, n, n)
        low = torch.finfo(x.dtype).min
        if self.form == "folded":
            s = q @ k.transpose(-1, -2) * hd ** -0.5 + alibi.masked_fill(blocked, low)
            p = torch.softmax(s, dim=-1)
            out = p @ v
        else:
            s = torch.baddbmm(alibi.expand(b, self.heads, 1, n).reshape(b * self.heads, 1, n),
                              q.reshape(b * self.heads, n, hd), k.reshape(b * self.heads, n, hd).transpose(1, 2),
                              beta=1.0, alpha=hd ** -0.5)
            s = s.view(b, self.heads, n, n).masked_fill(blocked, low)
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(x.dtype)
            out = torch.bmm(p.view(b * self.heads, n, n), v.reshape(b * self.heads, n, hd)).view(b, self.heads, n, hd)
        return self.dense(_merge(out))


# ---- multi-query, keys wider than values ----------------------------------------------------------------------------
class MultiQueryAttention(nn.Module):
    """One key/value head for H query heads: k, v (b, 1, n, hd) broadcast by the products themselves
    (``"broadcast"``), or repeated by ``repeat_interleave(H, dim=1)`` / ``expand(b, H, n, hd)``; causal by
    ``masked_fill(triu, -inf)``."""

    def __init__(self, form: str = "broadcast"):
        super().__init__()
        self.form = form
        self.q, self.kv, self.o = nn.Linear(D, D, bias=False), nn.Linear(D, 2 * HD, bias=False), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q = _heads(self.q(x), b, n)                                                          # (b, H, n, hd)
        k, v = self.kv(x).view(b, n, 1, 2 * HD).transpose(1, 2).split(HD, dim=-1)            # (b, 1, n, hd)
        if self.form == "repeat_interleave":
            k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
        elif self.form == "expand":
            k, v = k.expand(b, H, n, HD), v.expand(b, H, n, HD)
        s = torch.matmul(q, k.transpose(-1, -2)) * HD ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.o(_merge(torch.matmul(s.softmax(-1), v)))


class WideKeyAttention(nn.Module):
    """DeepSeek-V2's layout in small: each head's query and key a no-rope part (8) and a rope part (4) concatenated
    (Dk = 12), its value 8 wide (Dv = 8); the rope key shared by the heads (expanded); scaled by 1/sqrt(Dk); causal by
    an additive finfo.min bias."""

    nope, rope = 8, 4

    def __init__(self):
        super().__init__()
        dk = self.nope + self.rope
        self.q = nn.Linear(D, H * dk, bias=False)
        self.kv = nn.Linear(D, H * (self.nope + HD), bias=False)
        self.k_rope = nn.Linear(D, self.rope, bias=False)
        self.o = nn.Linear(H * HD, D, bias=False)
        self.scale = dk ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        q = _heads(self.q(x), b, n)                                                          # (b, H, n, 12)
        k_nope, v = _heads(self.kv(x), b, n).split([self.nope, HD], dim=-1)                  # (b, H, n, 8) each
        k_pe = self.k_rope(x)[:, None].expand(b, H, n, self.rope)                            # (b, H, n, 4)
        k = torch.cat([k_nope, k_pe], dim=-1)                                                # (b, H, n, 12)
        bias = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scale + bias
        return self.o(_merge(torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(x.dtype), v)))


# ---- scales that are not constants, or constants held in tensors ----------------------------------------------------
class LearnedScaleAttention(nn.Module):
    """``form="temperature"``: scores divided by a learned 0-d temperature (a parameter); ``form="per_head"``:
    Swin-v2's cosine attention, ``normalize(q) @ normalize(k)^T * exp(clamp(logit_scale, max=log 100))`` with one
    logit scale per head (H, 1, 1). Neither is one constant scale: the kernel's scale is a number."""

    def __init__(self, form: str = "temperature"):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.temperature = nn.Parameter(torch.tensor(2.5))
        self.logit_scale = nn.Parameter(torch.log(torch.tensor([10.0, 3.0, 1.0, 0.5])).view(H, 1, 1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        if self.form == "temperature":
            s = q @ k.transpose(-2, -1) / self.temperature
        else:
            s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            s = s * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return self.o(_merge(s.softmax(dim=-1) @ v))


class TensorScaleAttention(nn.Module):
    """The 1/sqrt(hd) scale as a tensor: ``form="buffer"``, a 0-d buffer (``register_buffer``) the scores are
    multiplied by; ``form="made"``, ``1 / torch.sqrt(torch.tensor(hd, dtype=x.dtype))`` made in the forward,
    multiplying ``torch.baddbmm(zeros, q, k^T)`` over 3-D (b * H, n, hd), then ``bmm`` with v; ``form="matmul_made"``,
    the same made scale on 4-D ``matmul`` scores."""

    def __init__(self, form: str = "buffer"):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("inv_sqrt_d", torch.tensor(1.0 / math.sqrt(HD)))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)                   # (b, H, n, hd)
        if self.form == "buffer":
            out = (torch.matmul(q, k.transpose(-1, -2)) * self.inv_sqrt_d).softmax(-1) @ v
        elif self.form == "made":
            scale = 1.0 / torch.sqrt(torch.tensor(HD, dtype=x.dtype))
            q3, k3, v3 = (t.reshape(b * H, n, HD) for t in (q, k, v))
            s = torch.baddbmm(torch.zeros(b * H, n, n, dtype=x.dtype), q3, k3.transpose(1, 2)) * scale
            out = torch.bmm(torch.softmax(s, dim=-1), v3).view(b, H, n, HD)
        else:
            scale = 1.0 / torch.sqrt(torch.tensor(HD, dtype=x.dtype))
            out = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v
        return self.o(_merge(out))


# ---- attention that is not the kernel's ----------------------------------------------------------------------------
class HeadMaskAttention(nn.Module):
    """Hugging Face's ``head_mask``: the probabilities of each head multiplied by head_mask[h] before ``@ v`` (a
    pruned head gives 0, not softmax @ v)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, head_mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        p = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), dim=-1)
        p = p * head_mask[None, :, None, None]
        return self.o(_merge(p @ v))


class KeyMajorAttention(nn.Module):
    """The scores laid out (keys, queries): ``k @ q^T``, the softmax over dim -2 (the keys), then ``p^T @ v``: the
    same attention written the other way round."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        s = torch.matmul(k, q.transpose(-1, -2)) / math.sqrt(HD)                            # (b, H, nk, nq)
        return self.o(_merge(torch.matmul(s.softmax(dim=-2).transpose(-1, -2), v)))


class MultiplicativeMaskAttention(nn.Module):
    """The original BERT's ``scores * mask - 10000 * (1 - mask)`` written as a multiply then a subtraction (the mask
    (b, 1, 1, n) of 0/1 floats): a masked key's score is replaced, not shifted; a kept key's is the score itself."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        m = keep[:, None, None, :].to(x.dtype)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD)
        s = s * m - 10000.0 * (1.0 - m)
        return self.o(_merge(torch.matmul(s.softmax(-1), v)))


# ---- MLPs and norms -------------------------------------------------------------------------------------------------
class GeluTanhMLP(nn.Module):
    """x + drop(fc2(drop(gelu_tanh(fc1(x))))) with ``nn.GELU(approximate="tanh")`` and ``nn.Dropout(0.1)`` modules
    (GPT-2 / timm's Mlp), then a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.act, self.drop = nn.GELU(approximate="tanh"), nn.Dropout(0.1)
        self.ln = nn.LayerNorm(D)

    def forward(self, x):
        return self.ln(x + self.drop(self.fc2(self.drop(self.act(self.fc1(x))))))


class SwiGLUBlock(nn.Module):
    """Pre-norm with ``nn.LayerNorm(elementwise_affine=False)``, then Llama's MLP written out with bias-free Linears
    and an ``nn.SiLU()`` module: x + w2(silu(w1(h)) * w3(h))."""

    def __init__(self, hidden: int = 48):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.w1, self.w3 = nn.Linear(D, hidden, bias=False), nn.Linear(D, hidden, bias=False)
        self.w2 = nn.Linear(hidden, D, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        h = self.norm(x)
        return x + self.w2(self.act(self.w1(h)) * self.w3(h))


RMS_FORMS = ("rms", "eps_outside", "other_dim", "mean_abs", "sum_d1")


class HandNorm(nn.Module):
    """A residual step x + fc(norm(x)) whose norm is written out as ``form``: "rms" is RMSNorm
    (``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w``); the rest look like it and are not:
    "eps_outside" ``x / (sqrt(mean(x^2)) + eps) * w``, "other_dim" the statistic over the tokens (dim -2),
    "mean_abs" ``x * rsqrt(mean(|x|) + eps)``, "sum_d1" ``x * rsqrt(sum(x^2) / (d + 1) + eps)``. eps = 0.5, large
    enough that where it sits shows in the outputs."""

    def __init__(self, form: str = "rms", eps: float = 0.5):
        super().__init__()
        self.form, self.eps = form, eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(D))
        self.fc = nn.Linear(D, D)

    def norm(self, x):
        eps, w = self.eps, self.weight
        if self.form == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        if self.form == "eps_outside":
            return x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + eps) * w
        if self.form == "other_dim":
            return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + eps) * w
        if self.form == "mean_abs":
            return x * torch.rsqrt(x.abs().mean(-1, keepdim=True) + eps) * w
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / (x.shape[-1] + 1) + eps) * w

    def forward(self, x):
        return x + self.fc(self.norm(x))


# ---- losses ---------------------------------------------------------------------------------------------------------
LOSS_FORMS = ("nll_ignore0", "ce_smooth_ignore", "per_token_masked")


class LossHead(nn.Module):
    """LayerNorm, a bias-free head over V = 24 classes, and the loss of (T, V) rows as ``form``:
    ``F.nll_loss(F.log_softmax(logits, -1), labels, ignore_index=0)`` (class 0 a pad token), ``F.cross_entropy(...,
    label_smoothing=0.1, ignore_index=-1)``, or ``F.cross_entropy(..., reduction="none")`` times a float mask, summed
    and divided by the mask's sum (a per-token loss masked by hand)."""

    vocab = 24

    def __init__(self, form: str = "nll_ignore0"):
        super().__init__()
        self.form = form
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, self.vocab, bias=False)

    def forward(self, x, labels, weights=None):
        logits = self.head(self.ln(x)).view(-1, self.vocab)                                 # (T, V)
        labels = labels.view(-1)
        if self.form == "nll_ignore0":
            return F.nll_loss(F.log_softmax(logits, dim=-1), labels, ignore_index=0)
        if self.form == "ce_smooth_ignore":
            return F.cross_entropy(logits, labels, label_smoothing=0.1, ignore_index=-1)
        per_token = F.cross_entropy(logits, labels, reduction="none")
        w = weights.view(-1)
        return (per_token * w).sum() / w.sum()


# ---- a tiny decoder (dynamic shapes, training) ----------------------------------------------------------------------
class TinyDecoder(nn.Module):
    """Embedding, one pre-norm block (hand RMSNorm, attention with a causal ``torch.where(keep, s, finfo.min)``, a
    tanh-GELU MLP), a final LayerNorm and a bias-free head; with labels, the loss of the shifted tokens
    (``logits[:, :-1]`` against ``labels[:, 1:]``)."""

    def __init__(self, vocab: int = 30):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, D)
        self.w_norm = nn.Parameter(torch.ones(D))
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln2, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, ids, labels=None):
        b, n = ids.shape
        x = self.embed(ids)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w_norm
        q, k, v = self.qkv(h).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        keep = torch.tril(torch.ones(n, n, dtype=torch.bool))
        s = torch.where(keep, q @ k.transpose(-1, -2) / math.sqrt(HD), torch.finfo(x.dtype).min)
        x = x + self.o(_merge(s.softmax(-1) @ v))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))
        logits = self.head(self.ln_f(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1))


# ---- quantization ---------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """A small image classifier: Conv2d(3, 8, 3) + BatchNorm2d + ReLU, a strided Conv2d, global average pooling,
    Linear(16, 32) + ReLU, Linear(32, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))                                          # (b, 16)
        return self.fc2(F.relu(self.fc1(x)))


class MHATransformer(nn.Module):
    """Embedding, one post-LN encoder layer on ``nn.MultiheadAttention(batch_first=True)`` (its out_proj a
    ``NonDynamicallyQuantizableLinear``, read by weight inside ``F.multi_head_attention_forward``), a GELU MLP, a
    Linear head."""

    def __init__(self, vocab: int = 40, classes: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 64), nn.Linear(64, D)
        self.head = nn.Linear(D, classes)

    def forward(self, ids):
        x = self.embed(ids)
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.ln1(x + a)
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        return self.head(x.mean(dim=1))


# ---- a static cache with Hugging Face's cache_position mask ----------------------------------------------------------
def cache_position_mask(attention_mask, cache_position, target: int, dtype):
    """Hugging Face's ``_prepare_4d_causal_attention_mask_with_cache_position`` (2024-25): (b, 1, n, target) of
    finfo.min made by ``torch.full``, ``triu(diagonal=1)``, multiplied in place by ``arange(target) >
    cache_position`` (keys after each query's position), then the padding of ``attention_mask`` (b, target) merged
    into a clone by slice assignment: ``masked_fill`` where the causal part is 0 and the padding mask is 0."""
    low = torch.finfo(dtype).min
    n = cache_position.shape[0]
    causal = torch.full((n, target), fill_value=low, dtype=dtype)
    causal = torch.triu(causal, diagonal=1)
    causal *= torch.arange(target) > cache_position.reshape(-1, 1)
    causal = causal[None, None, :, :].expand(attention_mask.shape[0], 1, -1, -1)
    causal = causal.clone()
    length = attention_mask.shape[-1]
    padding = causal[:, :, :, :length] + attention_mask[:, None, None, :].to(dtype)
    padding = padding == 0
    causal[:, :, :, :length] = causal[:, :, :, :length].masked_fill(padding, low)
    return causal


class StaticCacheAttention(nn.Module):
    """A decoder step over a static cache of ``target`` slots (b, H, target, hd), written at ``cache_position`` by
    ``index_copy_`` on buffers; the mask of ``cache_position_mask`` (slots after the current position masked); the
    scores written out with the softmax in f32 cast back (``"explicit"``) or SDPA with the float mask (``"sdpa"``)."""

    def __init__(self, form: str = "explicit", target: int = 16, batch: int = 2):
        super().__init__()
        self.form, self.target = form, target
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.register_buffer("key_cache", torch.zeros(batch, H, target, HD))
        self.register_buffer("value_cache", torch.zeros(batch, H, target, HD))

    def forward(self, x, attention_mask, cache_position):
        b, n, _ = x.shape
        q, k, v = _heads(self.q(x), b, n), _heads(self.k(x), b, n), _heads(self.v(x), b, n)
        self.key_cache.index_copy_(2, cache_position, k)
        self.value_cache.index_copy_(2, cache_position, v)
        k, v = self.key_cache, self.value_cache
        mask = cache_position_mask(attention_mask, cache_position, self.target, x.dtype)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            s = torch.matmul(q, k.transpose(2, 3)) * HD ** -0.5 + mask
            a = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o(_merge(a))
