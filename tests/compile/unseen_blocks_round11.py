"""Model blocks written by hand for the compile backend's unseen-models round 11, as their authors write them (no
transformers or timm package): an ALBERT-style encoder whose one layer (post-LN, q scaled before the product, a
padding bias of ``(1 - mask) * finfo.min``, attention dropout, a tanh-GELU MLP) runs in a Python loop and which returns
a dict with every layer's hidden states; attention with the scale folded in other places (on k^T inside the product,
on q and k each by einsum, after an additive ALiBi bias, after a causal fill) and masked in other ways
(``masked_fill_`` in place in seven forms, ``torch.where(mask, -inf, s)`` with the fill first, a ``logsumexp``
softmax, softmax over ``dim=3``); a talking-heads softmax over the heads (``dim=1`` of a 4-D tensor); RMSNorm written
by hand over rows of 2-D input (``mean(1)``), channels-first (``mean(1)`` of (B, D, N): not the last dim), with
``keepdim=False`` then ``unsqueeze``, and a hand LayerNorm; Linear + GELU(tanh) with the residual on the left,
``torch.add(x, y)``, ``alpha``, a scaled residual, Hugging Face GPT-2's ``Conv1D`` (``torch.addmm(bias, x2d, w)``
then a view); language-model losses with ``ignore_index=0`` (pad id 0), label smoothing and ``log_softmax`` +
``nll_loss``; rotary written into q and k in place through slices before SDPA; and an autocast(bf16) attention."""

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


def _heads(t, b, n):
    """(b, n, D) -> (b, H, n, HD)."""
    return t.view(b, n, H, HD).transpose(1, 2)


def _merge(t):
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


# ---- ALBERT: one layer run in a loop --------------------------------------------------------------------------------
class AlbertLayer(nn.Module):
    """Post-LN: LayerNorm(x + attention(x)), LayerNorm(h + MLP(h)); q scaled by hd ** -0.5 before ``torch.matmul``
    (ALBERT's and timm's form), an additive padding bias, dropout on the probabilities (a no-op in eval)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-12), nn.LayerNorm(D, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.drop = nn.Dropout(0.1)
        self.scale = HD ** -0.5

    def forward(self, x, bias):
        b, n, _ = x.shape
        q = _heads(self.q(x), b, n) * self.scale
        k, v = _heads(self.k(x), b, n), _heads(self.v(x), b, n)
        s = torch.matmul(q, k.transpose(-1, -2)) + bias                          # (b, H, n, n)
        p = self.drop(F.softmax(s, dim=-1))
        h = self.ln1(x + self.o(_merge(torch.matmul(p, v))))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h), approximate="tanh")))


class SharedLoopEncoder(nn.Module):
    """ALBERT: one AlbertLayer applied ``depth`` times (its weights shared), the padding mask (b, n) of 1 / 0 made a
    bias ``(1 - mask) * finfo.min`` once; returns a dict: the last hidden state and the tuple of all of them."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.layer = AlbertLayer()

    def forward(self, x, mask):
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min    # (b, 1, 1, n)
        states = [x]
        for _ in range(self.depth):
            x = self.layer(x, bias)
            states.append(x)
        return {"last_hidden_state": x, "hidden_states": tuple(states)}


# ---- the scale and the mask in other places --------------------------------------------------------------------------
def alibi(n: int, dtype, device=None):
    """ALiBi's (H, n, n) bias: slope_h * (j - i), slopes 2^-(8 (h + 1) / H)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=dtype, device=device)
    pos = torch.arange(n, device=device)
    return slopes[:, None, None] * (pos[None, :] - pos[:, None]).to(dtype)


SCALE_FORMS = ("k_scaled", "split_einsum", "after_bias", "after_fill", "fill_inplace", "where_fill_first",
               "logsumexp", "dim3")


class ScaleFoldAttention(nn.Module):
    """Causal attention with the scale and the mask where authors put them:

    - ``k_scaled``:        ``q @ (k.transpose(-2, -1) / sqrt(hd))``, then masked_fill(-inf)
    - ``split_einsum``:    ``einsum("bhid,bhjd->bhij", q * hd ** -0.25, k * hd ** -0.25)`` + a -inf triu
    - ``after_bias``:      ``(q @ k^T + alibi) * hd ** -0.5``: the bias scaled too (not q k^T * c + bias)
    - ``after_fill``:      ``(q @ k^T).masked_fill(causal, -inf) / sqrt(hd)``: -inf / c is -inf, so it is attention
    - ``fill_inplace``:    ``s.masked_fill_(causal, -inf)``
    - ``where_fill_first``: ``torch.where(causal, -inf, s)`` (the fill where the condition holds)
    - ``logsumexp``:       ``torch.exp(s - torch.logsumexp(s, -1, keepdim=True))`` for the softmax
    - ``dim3``:            ``F.softmax(s, dim=3)`` of the 4-D scores"""

    def __init__(self, form: str):
        super().__init__()
        assert form in SCALE_FORMS, form
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)         # (b, H, n, HD) each
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)      # True: masked
        f = self.form
        if f == "k_scaled":
            s = (q @ (k.transpose(-2, -1) / math.sqrt(HD))).masked_fill(causal, float("-inf"))
        elif f == "split_einsum":
            c = HD ** -0.25
            s = torch.einsum("bhid,bhjd->bhij", q * c, k * c)
            s = s + torch.triu(torch.full((n, n), float("-inf"), dtype=s.dtype, device=x.device), 1)
        elif f == "after_bias":
            s = (q @ k.transpose(-2, -1) + alibi(n, x.dtype, x.device)) * HD ** -0.5
        elif f == "after_fill":
            s = (q @ k.transpose(-2, -1)).masked_fill(causal, float("-inf")) / math.sqrt(HD)
        elif f == "fill_inplace":
            s = q @ k.transpose(-2, -1) * HD ** -0.5
            s.masked_fill_(causal, float("-inf"))
        elif f == "where_fill_first":
            s = torch.where(causal, float("-inf"), q @ k.transpose(-2, -1) * HD ** -0.5)
        else:
            s = (q @ k.transpose(-2, -1) * HD ** -0.5).masked_fill(causal, float("-inf"))
        if f == "logsumexp":
            p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
        elif f == "dim3":
            p = F.softmax(s, dim=3)
        else:
            p = s.softmax(-1)
        return self.o(_merge(p @ v))


FILL_FORMS = ("unused", "assigned", "late_mask", "returned", "fill_1e9", "padding", "f32_softmax")


class InPlaceFillAttention(nn.Module):
    """Scores filled in place before the softmax, as lucidrains' and OpenNMT's code writes it:

    - ``unused``:    ``s.masked_fill_(causal, -inf)``, its result unused (the softmax reads s)
    - ``assigned``:  ``s = s.masked_fill_(causal, -finfo.max)``
    - ``late_mask``: the causal mask built after the scores, between the product and the write
    - ``returned``:  the scores returned too (read outside the attention: declined)
    - ``fill_1e9``:  ``s.masked_fill_(causal, -1e9)`` (not the dtype's lowest value: declined)
    - ``padding``:   ``s.masked_fill_(~keep[:, None, None, :], -inf)`` of a (b, n) key padding mask
    - ``f32_softmax``: the filled scores' softmax in f32, cast back: ``F.softmax(s.float(), -1).to(v.dtype)``"""

    def __init__(self, form: str):
        super().__init__()
        assert form in FILL_FORMS, form
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, keep=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        f = self.form
        if f != "late_mask":
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        s = torch.einsum("bhid,bhjd->bhij", q, k) * HD ** -0.5
        if f == "late_mask":
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        if f == "assigned":
            s = s.masked_fill_(causal, -torch.finfo(s.dtype).max)
        elif f == "fill_1e9":
            s.masked_fill_(causal, -1e9)
        elif f == "padding":
            s.masked_fill_(~keep[:, None, None, :], float("-inf"))
        else:
            s.masked_fill_(causal, float("-inf"))
        p = F.softmax(s.float(), dim=-1).to(v.dtype) if f == "f32_softmax" else s.softmax(dim=-1)
        y = self.o(_merge(p @ v))
        return (y, s) if f == "returned" else y


class InPlaceBiasAttention(nn.Module):
    """A key padding bias built in place: ``m = torch.zeros(...); m.masked_fill_(~keep[:, None, None, :], -inf)``,
    before SDPA (``sdpa``: its attn_mask), or after the scores and added to them (``late_bias``: the write falls
    between the pattern's nodes)."""

    def __init__(self, form: str):
        super().__init__()
        assert form in ("sdpa", "late_bias"), form
        self.form = form
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            m = torch.zeros_like(keep[:, None, None, :], dtype=q.dtype)
            m.masked_fill_(~keep[:, None, None, :], float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        m = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=x.device)
        m.masked_fill_(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(s + m, -1) @ v


class TalkingHeads(nn.Module):
    """Scores mixed across heads, softmax over the heads (``dim=1`` of (b, H, n, n)), then over the keys after a
    second mix: two softmaxes, one over dim 1 (the kernel's rows are the last dim: left) and one over dim -1."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mix = nn.Parameter(torch.randn(H, H) / H)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        g = torch.softmax(s, dim=1)                                               # over the heads
        s = torch.einsum("bhij,hg->bgij", s * g, self.mix)
        return self.o(_merge(s.softmax(-1) @ v))


# ---- norms ----------------------------------------------------------------------------------------------------------
NORM_FORMS = ("rows_2d", "channels_first", "no_keepdim", "hand_layernorm")


class HandNorm(nn.Module):
    """Norms written by hand:

    - ``rows_2d``:        x (b * n, D): ``x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * w`` (dim 1: the last)
    - ``channels_first``: x (b, D, n): the same over ``mean(1)``, which is not the last dim (ConvNeXt-style layout)
    - ``no_keepdim``:     ``x * torch.rsqrt(x.pow(2).mean(-1) + eps).unsqueeze(-1) * w``
    - ``hand_layernorm``: ``(x - mu) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w + b``"""

    def __init__(self, form: str, eps: float = 1e-5):
        super().__init__()
        assert form in NORM_FORMS, form
        self.form, self.eps = form, eps
        self.w = nn.Parameter(1.0 + 0.1 * torch.randn(D))
        self.b = nn.Parameter(0.1 * torch.randn(D))
        self.fc = nn.Linear(D, D)

    def forward(self, x):                                                         # (b, n, D)
        b, n, _ = x.shape
        f, eps = self.form, self.eps
        if f == "rows_2d":
            r = x.reshape(b * n, D)
            y = (r * torch.rsqrt(r.pow(2).mean(1, keepdim=True) + eps) * self.w).view(b, n, D)
        elif f == "channels_first":
            c = x.transpose(1, 2)                                                 # (b, D, n)
            y = (c * torch.rsqrt(c.pow(2).mean(1, keepdim=True) + eps) * self.w[:, None]).transpose(1, 2)
        elif f == "no_keepdim":
            y = x * torch.rsqrt(x.pow(2).mean(-1) + eps).unsqueeze(-1) * self.w
        else:
            mu = x.mean(-1, keepdim=True)
            y = (x - mu) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * self.w + self.b
        return self.fc(y)


# ---- GEMM epilogues -------------------------------------------------------------------------------------------------
RESIDUAL_FORMS = ("residual_left", "torch_add", "alpha", "scaled", "conv1d")


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a Linear whose weight is (in, out), ``torch.addmm(bias, x2d, w)`` then a view."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02 * math.sqrt(50))
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class ResidualMLP(nn.Module):
    """A tanh-GELU MLP and its residual in five forms:

    - ``residual_left``: ``x + fc2(F.gelu(fc1(x), approximate="tanh"))``
    - ``torch_add``:     ``torch.add(x, fc2(gelu(fc1(x))))``
    - ``alpha``:         ``torch.add(x, fc2(gelu(fc1(x))), alpha=0.5)`` (not x + y)
    - ``scaled``:        ``x + 0.5 * fc2(gelu(fc1(x)))`` (not x + y)
    - ``conv1d``:        GPT-2's MLP: ``x + c_proj(gelu(c_fc(x)))`` through Conv1D's addmm"""

    def __init__(self, form: str):
        super().__init__()
        assert form in RESIDUAL_FORMS, form
        self.form = form
        if form == "conv1d":
            self.fc1, self.fc2 = Conv1D(2 * D, D), Conv1D(D, 2 * D)
        else:
            self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        f = self.form
        if f in ("residual_left", "conv1d"):
            return x + y
        if f == "torch_add":
            return torch.add(x, y)
        if f == "alpha":
            return torch.add(x, y, alpha=0.5)
        return x + 0.5 * y


# ---- losses ---------------------------------------------------------------------------------------------------------
LOSS_FORMS = ("ignore0", "ignore0_nll", "smoothing", "sum")
VOCAB = 40


class TinyLMLoss(nn.Module):
    """Embedding -> LayerNorm -> bias-free head, the loss over (B * N, V) rows:

    - ``ignore0``:     ``F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=0)`` (pad id 0)
    - ``ignore0_nll``: ``F.nll_loss(F.log_softmax(logits, -1), labels, ignore_index=0)``
    - ``smoothing``:   ``label_smoothing=0.1``
    - ``sum``:         ``reduction="sum"``"""

    def __init__(self, form: str):
        super().__init__()
        assert form in LOSS_FORMS, form
        self.form = form
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids, labels):
        logits = self.head(self.norm(self.emb(ids)))                              # (b, n, V)
        rows, targets = logits.view(-1, VOCAB), labels.view(-1)
        f = self.form
        if f == "ignore0":
            return F.cross_entropy(rows, targets, ignore_index=0)
        if f == "ignore0_nll":
            return F.nll_loss(F.log_softmax(rows, -1), targets, ignore_index=0)
        if f == "smoothing":
            return F.cross_entropy(rows, targets, label_smoothing=0.1)
        return F.cross_entropy(rows, targets, reduction="sum")


SHIFT_FORMS = ("contiguous_view", "reshape", "hidden_shift")


class ShiftedLMLoss(nn.Module):
    """A causal LM's loss of the next token: Embedding -> ``F.layer_norm(h, h.shape[-1:])`` -> bias-free head;

    - ``contiguous_view``: Hugging Face's ``logits[..., :-1, :].contiguous()`` and ``labels[..., 1:]``, viewed as rows
    - ``reshape``:         ``logits[:, :-1].reshape(-1, V)``
    - ``hidden_shift``:    the hidden states shifted before the head: ``head(h[:, :-1]).reshape(-1, V)``"""

    def __init__(self, form: str):
        super().__init__()
        assert form in SHIFT_FORMS, form
        self.form = form
        self.emb = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        e = self.emb(ids)
        h = F.layer_norm(e, e.shape[-1:])
        if self.form == "hidden_shift":
            return F.cross_entropy(self.head(h[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        logits = self.head(h)                                                     # (b, n, V)
        if self.form == "reshape":
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        shift_logits, shift_labels = logits[..., :-1, :].contiguous(), ids[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, VOCAB), shift_labels.view(-1))


# ---- in-place writes through views, autocast -------------------------------------------------------------------------
class InPlaceRotary(nn.Module):
    """Partial rotary written into q and k in place through slices (``q[..., :R] = rotated``), a class token
    prepended and its row bumped in place (``x[:, 0] += self.cls``), then SDPA causal."""

    R = HD // 2

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.cls = nn.Parameter(torch.randn(D))

    def _rotate(self, t, cos, sin):
        half = self.R // 2
        a, b_ = t[..., :half], t[..., half:self.R]
        return torch.cat((a * cos - b_ * sin, b_ * cos + a * sin), -1)

    def forward(self, x):
        x = x.clone()
        x[:, 0] += self.cls
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        q, k = q.contiguous(), k.contiguous()
        pos = torch.arange(n, dtype=x.dtype, device=x.device)
        freq = 1.0 / 10000 ** (torch.arange(0, self.R // 2, dtype=x.dtype, device=x.device) / (self.R // 2))
        ang = pos[:, None] * freq[None, :]                                          # (n, R / 2)
        cos, sin = ang.cos(), ang.sin()
        q[..., :self.R] = self._rotate(q, cos, sin)
        k[..., :self.R] = self._rotate(k, cos, sin)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class AutocastAttention(nn.Module):
    """An f32 attention block run inside ``torch.autocast("cpu", dtype)``: the products run in dtype, the softmax
    in f32 (autocast's list), the output projection in dtype."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD)
            y = torch.matmul(F.softmax(s, dim=-1), v)
            return self.o(_merge(y))
