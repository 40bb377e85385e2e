"""Model blocks written by hand for the compile backend's unseen-models round 10, as their authors write them (no
transformers or timm package): multi-query attention in ``torch.einsum`` with a causal mask made by ``torch.triu`` (the
one key/value head expanded to every query head, or left 3-D and broadcast by the equation); Gemma 2's soft-capped
scores (``tanh(s / cap) * cap``); ALiBi plus a sliding window folded into one additive bias, and a sliding window as a
boolean ``torch.where``; qk-norm (an ``nn.RMSNorm`` on q and on k per head before SDPA, and the same written out);
``masked_fill`` (True: masked) and ``torch.where`` (True: kept) of one boolean tensor, which mean opposite things;
three look-alikes of masked attention that are not one (the probabilities scaled, the mask subtracted, the mask added
with ``alpha``); RMSNorm with Gemma's ``(1 + w)`` in f32, with the variance instead of the mean square, and with a (1,
d) weight; LayerNorm without a bias and without affine parameters on a residual;
a residual whose sum is read twice (by the norm and by the next residual); GeGLU / ReGLU MLPs (one Linear chunked in
two); a Linear + GELU in its tanh and exact forms; a pre-norm transformer block and its ``torch.autocast`` form.
Quantization: a tiny LM whose head is tied to its embedding, one Linear used twice, a one-output Linear kept in float
by ``skip``, bias-free layers."""

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


def _qkv(linear: nn.Linear, x):
    """q, k, v of (b, H, n, HD) from a fused (D -> 3D) projection."""
    b, n, _ = x.shape
    return linear(x).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)


def _merge(t):
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


# ---- attention ------------------------------------------------------------------------------------------------------
class EinsumMQA(nn.Module):
    """Multi-query attention by einsum: H query heads, one key/value head. ``expand=True``: k and v (b, 1, n, hd)
    expanded to H heads, ``bhid,bhjd->bhij`` (the kernel's 4-D form); False: k, v left (b, n, hd) and the equation
    ``bihd,bjd->bhij`` broadcasts them (3-D operands: no 4-D attention). Causal mask: ``torch.triu`` of -inf above
    the diagonal, added (expand) or a boolean triu filled with finfo.min (3-D form)."""

    def __init__(self, expand: bool = True):
        super().__init__()
        self.expand = expand
        self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * HD), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        if not self.expand:
            q = self.q(x).view(b, n, H, HD)
            k, v = self.kv(x).chunk(2, -1)                                        # (b, n, hd)
            s = torch.einsum("bihd,bjd->bhij", q, k) * HD ** -0.5
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1),
                              torch.finfo(s.dtype).min)
            return self.o(torch.einsum("bhij,bjd->bihd", s.softmax(-1), v).reshape(b, n, D))
        q = self.q(x).view(b, n, H, HD).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 1, 2 * HD).transpose(1, 2).chunk(2, -1)     # (b, 1, n, hd)
        k, v = k.expand(b, H, n, HD), v.expand(b, H, n, HD)
        s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(HD)
        causal = torch.triu(torch.full((n, n), float("-inf"), dtype=s.dtype, device=x.device), diagonal=1)
        p = torch.softmax(s + causal, dim=-1)
        return self.o(_merge(torch.einsum("bhij,bhjd->bhid", p, v)))


class SoftcapAttention(nn.Module):
    """Gemma 2's attention logit soft-capping: ``s = tanh(s / cap) * cap`` between the scaled scores and the causal
    fill. Not q @ k^T times constants: the kernels have no cap (the explicit attention is left, its softmax taken)."""

    def __init__(self, cap: float = 1.0):
        super().__init__()
        self.cap = cap
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = _qkv(self.qkv, x)
        n = x.shape[1]
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        if self.cap:
            s = torch.tanh(s / self.cap) * self.cap
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1), float("-inf"))
        return self.o(_merge(s.softmax(-1) @ v))


def alibi_slopes(h: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])


class AlibiWindowAttention(nn.Module):
    """ALiBi (a per-head linear penalty of the distance) and a causal sliding window of ``window`` keys folded into
    one additive (1, H, n, n) bias (form "bias"), or the window alone as a boolean ``torch.where(allowed, s, -inf)``
    (form "where", no ALiBi)."""

    def __init__(self, form: str = "bias", window: int = 3):
        super().__init__()
        self.form, self.window = form, window
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("slopes", alibi_slopes(H), persistent=False)

    def forward(self, x):
        q, k, v = _qkv(self.qkv, x)
        n = x.shape[1]
        i = torch.arange(n, device=x.device)
        distance = i[:, None] - i[None, :]                                        # query minus key
        allowed = (distance >= 0) & (distance < self.window)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(HD)
        if self.form == "where":
            s = torch.where(allowed, s, float("-inf"))
        else:
            bias = -self.slopes.to(s.dtype)[:, None, None] * distance.to(s.dtype)
            s = s + bias.masked_fill(~allowed, float("-inf"))[None]
        return self.o(_merge(F.softmax(s, dim=-1) @ v))


class QKNormAttention(nn.Module):
    """qk-norm (OLMo 2, Qwen 3): an RMSNorm over each head's dims on q and on k before the product; ``form`` "module"
    (``nn.RMSNorm(HD, eps=1e-6)``, then SDPA causal) or "hand" (written out, the weight times the norm, then the
    product written out with a causal -inf fill)."""

    def __init__(self, form: str = "module"):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(HD, eps=1e-6), nn.RMSNorm(HD, eps=1e-6)
        with torch.no_grad():
            self.q_norm.weight.uniform_(0.5, 1.5)
            self.k_norm.weight.uniform_(0.5, 1.5)

    @staticmethod
    def _hand(t, w):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, HD).unbind(2)                       # (b, n, H, hd)
        if self.form == "module":
            q, k = self.q_norm(q), self.k_norm(k)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        else:
            q, k = self._hand(q, self.q_norm.weight), self._hand(k, self.k_norm.weight)
            s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * HD ** -0.5
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1), float("-inf"))
            o = s.softmax(-1) @ v.transpose(1, 2)
        return self.o(_merge(o))


class BoolMaskAttention(nn.Module):
    """One boolean (b, 1, n, n) tensor ``m`` used as ``masked_fill(m, -inf)`` (form "fill": True means masked) or as
    ``torch.where(m, s, -inf)`` (form "where": True means kept): the same tensor, opposite keys attended."""

    def __init__(self, form: str = "fill"):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, m):
        q, k, v = _qkv(self.qkv, x)
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        s = s.masked_fill(m, float("-inf")) if self.form == "fill" else torch.where(m, s, float("-inf"))
        return self.o(_merge(s.softmax(-1) @ v))


class LookalikeAttention(nn.Module):
    """Masked attention but for one thing: "prob_scale" scales the probabilities (``softmax(s) * 0.5 @ v``: the
    rows sum to 0.5), "sub" subtracts the mask (``s - m``), "alpha" adds it twice over (``torch.add(s, m,
    alpha=2)``). None is softmax(q k^T * c + mask) @ v."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, m):
        q, k, v = _qkv(self.qkv, x)
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        if self.form == "prob_scale":
            return self.o(_merge((s + m).softmax(-1) * 0.5 @ v))
        s = s - m if self.form == "sub" else torch.add(s, m, alpha=2.0)
        return self.o(_merge(s.softmax(-1) @ v))


# ---- norms ----------------------------------------------------------------------------------------------------------
class RMSVariant(nn.Module):
    """An RMSNorm written out over the last dim, then a Linear. "gemma": in f32, times ``(1 + w)``, cast back;
    "variance": ``x * rsqrt(var(x) + eps)`` (centred: not RMSNorm); "weight_2d": the norm times a (1, d) weight
    (the norm without it)."""

    def __init__(self, form: str, eps: float = 1e-6):
        super().__init__()
        self.form, self.eps = form, eps
        shape = (1, D) if form == "weight_2d" else (D,)
        self.weight = nn.Parameter(torch.randn(shape) * 0.2 + (0.0 if form == "gemma" else 1.0))
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        if self.form == "gemma":
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            y = (h * (1.0 + self.weight.float())).type_as(x)
        elif self.form == "variance":
            y = self.weight * (x * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps))
        else:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return self.fc(y)


class NoAffineNorms(nn.Module):
    """LayerNorm without a bias (``bias=False``), then one without affine parameters (eps=1e-3) of the residual sum."""

    def __init__(self):
        super().__init__()
        self.ln, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, elementwise_affine=False, eps=1e-3)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.ln2(self.ln(x) + x)


class ResidualTwice(nn.Module):
    """h = x + fc(x); y = RMSNorm(h); h = h + fc(y); LayerNorm(h) + 0.5 * h: each residual sum read by its norm and
    again (the next residual, the output), so each fused add + norm must give the sum too."""

    def __init__(self):
        super().__init__()
        self.fc, self.n1, self.n2 = nn.Linear(D, D), nn.RMSNorm(D, eps=1e-5), nn.LayerNorm(D)

    def forward(self, x):
        h = x + self.fc(x)
        h = h + self.fc(self.n1(h))
        return self.n2(h) + h * 0.5


# ---- MLPs -----------------------------------------------------------------------------------------------------------
class GLUMLP(nn.Module):
    """GeGLU ("gelu") / ReGLU ("relu"): one Linear (D -> 4D) chunked in two, act(a) * g, a Linear back, the residual."""

    def __init__(self, act: str = "gelu"):
        super().__init__()
        self.act = {"gelu": F.gelu, "relu": F.relu}[act]
        self.wi, self.wo = nn.Linear(D, 4 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        a, g = self.wi(x).chunk(2, dim=-1)
        return x + self.wo(self.act(a) * g)


class GeluMLP(nn.Module):
    """Linear (with bias) + GELU in the ``approximate`` form + Linear + the residual."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.fc, self.proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, fused QKV, causal attention written out with a boolean triu fill,
    the output projection and residual, RMSNorm, a tanh-GELU MLP and residual. ``autocast`` runs it inside
    ``torch.autocast("cpu", bfloat16)``."""

    def __init__(self, autocast: bool = False):
        super().__init__()
        self.autocast = autocast
        self.n1, self.n2 = nn.LayerNorm(D), nn.RMSNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def _block(self, x):
        q, k, v = _qkv(self.qkv, self.n1(x))
        n = x.shape[1]
        s = q @ k.transpose(-2, -1) * HD ** -0.5
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1), float("-inf"))
        h = x + self.o(_merge(s.softmax(-1) @ v))
        return h + self.proj(F.gelu(self.fc(self.n2(h)), approximate="tanh"))

    def forward(self, x):
        if self.autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._block(x)
        return self._block(x)


# ---- quantization ---------------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding, a pre-norm MLP whose layers run twice (one bias-free up projection shared by both passes), a final
    LayerNorm, a bias-free head whose weight IS the embedding's (tied), and a one-output ``score`` Linear. Returns
    (logits, score)."""

    def __init__(self, vocab: int = 48):
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.norm, self.final = nn.LayerNorm(D), nn.LayerNorm(D)
        self.up, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(2 * D, D)
        self.score = nn.Linear(D, 1)
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.emb.weight

    def hidden(self, ids):
        h = self.emb(ids)
        for _ in range(2):
            h = h + self.down(F.relu(self.up(self.norm(h))))
        return self.final(h)

    def forward(self, ids):
        h = self.hidden(ids)
        return self.head(h), self.score(h).squeeze(-1)


class NormsOnly(nn.Module):
    """No Linear at all: a LayerNorm, a GELU, an RMSNorm (``embed``: an Embedding first, reading token ids)."""

    def __init__(self, embed: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, D) if embed else None
        self.norm, self.rms = nn.LayerNorm(D), nn.RMSNorm(D)

    def forward(self, x):
        return self.rms(F.gelu(self.norm(x if self.emb is None else self.emb(x))))
