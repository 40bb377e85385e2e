"""Model blocks written by hand for the compile backend's unseen-models round 6, as their authors write them (no
transformers package): attention as torch.baddbmm + softmax + bmm over (B * H, N, hd); ALiBi biases with a sliding
window built on the fly with torch.triu / torch.tril (folded into one bias, or added after the scores' causal fill);
RMSNorm in the orderings people write (rsqrt first, eps first, a method chain, the f32 statistic then the weight);
LayerNorm through F.layer_norm without parameters or without a bias; MLPs with exact and tanh GELU, SiLU written as
``x * torch.sigmoid(x)`` and bias-free Linears before a residual add; a causal LM with a tied head whose loss
flattens (B, N, V) logits (``logits.view(-1, V)``, label smoothing, ignore_index); a pre-norm block with dropout and
stochastic depth (train mode); a frozen teacher run under torch.no_grad() inside a training forward; a block that
returns its intermediates (the residual sum a fused add + norm makes, the normalized rows, the scores)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def seeded(cls, *args, dtype=torch.float32, train: bool = False, **kwargs):
    """cls(*args, **kwargs) with its parameters drawn from seed 0, in dtype, in train or eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(dtype).train(train)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes 2^(-8 i / H) (Press et al.; heads a power of two)."""
    return torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])


class RMSNorm(nn.Module):
    """RMSNorm written out in one of the orderings people write:
    "rsqrt_first": torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * x * w;
    "eps_first":   w * (x * torch.rsqrt(eps + x.pow(2).mean(dim=-1, keepdim=True)));
    "method":      x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt() * w;
    "f32_then_w":  (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w, h = x.float();
    "normalize":   F.normalize(x, dim=-1) * sqrt(d) * w (lucidrains' SimpleRMSNorm: not eps inside the root)."""

    def __init__(self, d: int, form: str = "rsqrt_first"):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        eps, w = 1e-6, self.weight
        if self.form == "rsqrt_first":
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * x * w
        if self.form == "eps_first":
            return w * (x * torch.rsqrt(eps + x.pow(2).mean(dim=-1, keepdim=True)))
        if self.form == "method":
            return x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt() * w
        if self.form == "f32_then_w":
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
        return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1]) * w


# ---- attention through baddbmm / bmm ----------------------------------------------------------------------------
class BaddbmmAttention(nn.Module):
    """Megatron / older GPT-NeoX style: q, k, v as (B * H, N, hd); the scores by torch.baddbmm(empty, q, k^T,
    beta=0, alpha=1/sqrt(hd)), a causal fill, softmax in f32 cast back, torch.bmm with v."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.norm = nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(b * self.h, n, self.hd) for t in (q, k, v))
        empty = torch.empty(b * self.h, n, n, dtype=x.dtype, device=x.device)
        s = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(self.hd))
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        p = F.softmax(s.masked_fill(causal, float("-inf")).float(), dim=-1).type_as(x)
        a = torch.bmm(p, v).view(b, self.h, n, self.hd).transpose(1, 2).reshape(b, n, d)
        return x + self.o(a)


# ---- ALiBi with a sliding window ------------------------------------------------------------------------------
class AlibiWindowAttention(nn.Module):
    """Pre-norm (RMSNorm written out, ``norm_form``) attention with ALiBi and a sliding window of ``window`` keys
    built on the fly: band = tril(ones) & triu(ones, -window). ``mask``:
    "folded": the band filled with -inf into the ALiBi bias, one additive mask, cast to x's dtype (taken);
    "bool":   the scores plus the ALiBi bias, then masked_fill(~band, -inf) (two masks: left, with the reason);
    "additive_band": triu(full(-inf), 1) + tril(full(-inf), -window - 1) as the only mask (no ALiBi; taken).
    The softmax in f32 cast back (F.softmax(s.float(), -1).type_as(x)); bias-free projections; a residual add."""

    def __init__(self, d: int = 32, heads: int = 4, window: int = 3, mask: str = "folded",
                 norm_form: str = "rsqrt_first"):
        super().__init__()
        self.h, self.hd, self.window, self.mask = heads, d // heads, window, mask
        self.norm = RMSNorm(d, norm_form)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        ones = torch.ones(n, n, dtype=torch.bool, device=x.device)
        band = torch.tril(ones) & torch.triu(ones, diagonal=-self.window)
        pos = torch.arange(n, device=x.device)
        alibi = (pos[None, :] - pos[:, None]).to(torch.float32)[None] * self.slopes[:, None, None]   # (H, N, N)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        if self.mask == "folded":
            s = s + alibi.masked_fill(~band, float("-inf")).to(x.dtype)
        elif self.mask == "bool":
            s = (s + alibi.to(x.dtype)).masked_fill(~band, float("-inf"))
        else:
            full = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device)
            s = s + (torch.triu(full, 1) + torch.tril(full, -self.window - 1))
        p = F.softmax(s.float(), dim=-1).type_as(x)
        return x + self.o((p @ v).transpose(1, 2).reshape(b, n, d))


# ---- norms through F.layer_norm, MLP forms ----------------------------------------------------------------------
class FunctionalNormMLP(nn.Module):
    """x + mlp(F.layer_norm(x, ...)): the norm without parameters (``norm="none"``) or with a weight and no bias
    (``norm="weight"``); the MLP ``act``: "gelu" (exact), "gelu_tanh", "silu_sigmoid" (u * torch.sigmoid(u)),
    "swiglu_sigmoid" (g * torch.sigmoid(g) * up(x)); the down projection without a bias, then the residual add."""

    def __init__(self, d: int = 32, norm: str = "none", act: str = "gelu"):
        super().__init__()
        self.norm, self.act = norm, act
        self.ln_weight = nn.Parameter(1.0 + 0.1 * torch.randn(d)) if norm == "weight" else None
        self.up, self.gate = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:], self.ln_weight, None, eps=1e-5)
        if self.act == "gelu":
            u = F.gelu(self.up(h))
        elif self.act == "gelu_tanh":
            u = F.gelu(self.up(h), approximate="tanh")
        elif self.act == "silu_sigmoid":
            u = self.up(h)
            u = u * torch.sigmoid(u)
        else:
            g = self.gate(h)
            u = g * torch.sigmoid(g) * self.up(h)
        return x + self.down(u)


# ---- a causal LM with a tied head and its loss --------------------------------------------------------------------
class TiedCausalLM(nn.Module):
    """Embedding, one pre-norm block (SDPA causal, bias-free projections, SwiGLU), a final RMSNorm written out, the
    head tied to the embedding (F.linear(h, wte.weight)); the loss as Hugging Face's: (B, N, V) logits flattened
    in the loss, ``logits.view(-1, V)`` (``float_first``: ``logits.float().view(-1, V)``), ``labels.view(-1)``,
    with ``loss`` kwargs (ignore_index, label_smoothing). ``return_logits``: (loss, logits) as HF returns."""

    def __init__(self, vocab: int = 48, d: int = 32, heads: int = 4, return_logits: bool = False,
                 float_first: bool = False, **loss):
        super().__init__()
        self.h, self.hd, self.loss, self.return_logits, self.float_first = heads, d // heads, loss, return_logits, \
            float_first
        self.wte = nn.Embedding(vocab, d)
        self.ln1, self.ln2, self.ln_f = RMSNorm(d), RMSNorm(d, "eps_first"), RMSNorm(d, "method")
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = (nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False),
                                         nn.Linear(2 * d, d, bias=False))

    def forward(self, ids, labels):
        b, n = ids.shape
        x = self.wte(ids)
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, -1))
        h = self.ln2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        flat = logits.float().view(-1, logits.shape[-1]) if self.float_first else \
            logits.view(-1, logits.shape[-1]).float()
        loss = F.cross_entropy(flat, labels.view(-1), **self.loss)
        return (loss, logits) if self.return_logits else loss


# ---- train mode: dropout and stochastic depth -------------------------------------------------------------------
def drop_path(x, p: float, training: bool):
    """timm's stochastic depth: each sample's branch kept with probability 1 - p and scaled by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class DropoutBlock(nn.Module):
    """A pre-norm ViT-style block in train mode: dropout on the attention probabilities (``attn="explicit"``) or
    SDPA's dropout_p (``attn="sdpa"``), dropout after each projection, stochastic depth on both branches, GELU
    (tanh) MLP. Every random draw is the model's: a rewrite must keep them, in order, or be declined."""

    def __init__(self, d: int = 32, heads: int = 4, p: float = 0.2, path: float = 0.25, attn: str = "explicit"):
        super().__init__()
        self.h, self.hd, self.p, self.path, self.attn = heads, d // heads, p, path, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.attn_drop, self.drop = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        if self.attn == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        else:
            a = self.attn_drop((q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(dim=-1)) @ v
        x = x + drop_path(self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d))), self.path, self.training)
        return x + drop_path(self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))), self.path,
                             self.training)


# ---- a frozen teacher under torch.no_grad() inside a training forward ----------------------------------------------
class DistilledStudent(nn.Module):
    """The teacher (frozen parameters: attention, a GELU MLP with residual, LayerNorm) run under torch.no_grad()
    inside forward; the student (RMSNorm written out, a Linear) trained on the MSE to the teacher's features.
    Returns (loss, student features, teacher features)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.t_ln, self.t_qkv = nn.LayerNorm(d), nn.Linear(d, 3 * d)
        self.t_fc, self.t_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        for p in (*self.t_ln.parameters(), *self.t_qkv.parameters(), *self.t_fc.parameters(),
                  *self.t_out.parameters()):
            p.requires_grad_(False)
        self.s_norm, self.s_fc = RMSNorm(d, "eps_first"), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        with torch.no_grad():
            q, k, v = self.t_qkv(self.t_ln(x)).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5, dim=-1) @ v
            t = a.transpose(1, 2).reshape(b, n, d)
            t = t + self.t_out(F.gelu(self.t_fc(t), approximate="tanh"))
        y = self.s_fc(self.s_norm(x))
        return F.mse_loss(y.float(), t.float()), y, t


# ---- a block that returns its intermediates ----------------------------------------------------------------------
class IntermediatesBlock(nn.Module):
    """A post-attention residual h = x + attn(x) normalized by LayerNorm (a fused add + norm makes h too), the
    MLP's RMSNorm written out whose normalized rows (before the weight) are returned, and optionally the raw
    scores (``scores=True``: read outside the attention, which must then be left). Returns a dict."""

    def __init__(self, d: int = 32, heads: int = 4, scores: bool = False):
        super().__init__()
        self.h, self.hd, self.scores = heads, d // heads, scores
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.rms_weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        a = torch.softmax(s, dim=-1) @ v
        h = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        y = self.ln(h)
        unit = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        out = {"out": self.fc(unit * self.rms_weight), "residual": h, "unit": unit}
        if self.scores:
            out["scores"] = s
        return out
