"""Model blocks written by hand for the compile backend's unseen-models round 13, as their authors write them (no
transformers or timm package): a GPT-NeoX layer (one LayerNorm per branch, the parallel residual ``x + attn(ln1(x)) +
mlp(ln2(x))``, the fused QKV laid out (b, n, heads, 3 * hd), rotary on a quarter of the head dims, the causal mask as
``torch.where(causal, s, finfo.min)`` or SDPA's ``is_causal``; its projections called by keyword, ``dense(input=h)``);
Falcon-RW's multi-query attention with ALiBi (one key/value head, the slopes' bias plus the causal fill folded into one
(1, H, n, n) float mask given to SDPA, or the same bias added to the scores of a broadcast key); an encoder-decoder
layer (causal self-attention, then cross-attention over the encoder's keys under a key padding mask, boolean for SDPA,
``masked_fill(~keep, finfo.min)`` written out; one sequence may have no valid key at all); Swin's shifted-window
attention (``torch.roll``, window partition, a gathered relative-position bias and the shifted windows' mask, folded
into one bias per window); attention forms whose semantics differ from the kernel's (a query-side mask, a non-default
scale, a learned temperature, the softmax over the queries, dropout in training); a distillation block whose teacher
runs under ``torch.no_grad()`` inside forward; a block returning a dict and a tuple holding its inputs and views of
them; a bf16 MLP written with in-place ops on its activations; a block under ``torch.autocast("cpu", bfloat16)``.
Models for ``tilestack.quantize``: odd-sized Linears called by keyword, one shared by two paths."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from unseen_blocks_round12 import HD, D, H, _heads, _merge  # (same widths; shared helpers)
from unseen_blocks_round12 import seeded as seeded  # (re-exported: the round 13 tests take it from here)

ROTARY = HD // 4                  # GPT-NeoX's rotary_pct = 0.25: rotary on the first quarter of each head's dims
WINDOW, SHIFT = 3, 1              # Swin: 3 x 3 windows shifted by 1 on a 6 x 6 grid


def rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


# ---- GPT-NeoX --------------------------------------------------------------------------------------------------------
class NeoXLayer(nn.Module):
    """GPT-NeoX's layer: the fused QKV viewed (b, n, heads, 3 * hd) and split on the last dim, rotary on the first
    ``ROTARY`` dims of each head (the rest passed through), the causal mask written as ``torch.where(causal, s,
    finfo.min)`` after scaling (``form="explicit"``) or SDPA's ``is_causal`` (``form="sdpa"``), and the parallel
    residual: both branches read x through their own LayerNorm. Its Linears are called by keyword (``input=``)."""

    def __init__(self, form: str = "explicit"):
        super().__init__()
        self.form = form
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(D), nn.LayerNorm(D)
        self.query_key_value = nn.Linear(D, 3 * D)
        self.dense = nn.Linear(D, D)
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        inv = 1.0 / (10000 ** (torch.arange(0, ROTARY, 2).float() / ROTARY))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16),
                             persistent=False)

    def _rotary(self, t, n):
        pos = torch.arange(n, device=t.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                   # (n, ROTARY)
        cos, sin = emb.cos().to(t.dtype), emb.sin().to(t.dtype)
        rot, keep = t[..., :ROTARY], t[..., ROTARY:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)

    def attention(self, h):
        b, n, _ = h.shape
        qkv = self.query_key_value(input=h).view(b, n, H, 3 * HD).permute(0, 2, 1, 3)    # (b, H, n, 3 * HD)
        q, k, v = qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]
        q, k = self._rotary(q, n), self._rotary(k, n)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(HD))
            causal = self.bias[:, :, :n, :n]
            s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device))
            a = torch.matmul(F.softmax(s, dim=-1), v)
        return self.dense(input=_merge(a))

    def forward(self, x):
        attn = self.attention(self.input_layernorm(x))
        mlp = self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(input=self.post_attention_layernorm(x))))
        return mlp + attn + x


# ---- Falcon-RW: multi-query attention with ALiBi ---------------------------------------------------------------------
def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes for a power-of-two number of heads: 2^(-8 i / heads), i = 1..heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


class FalconAlibiMQA(nn.Module):
    """Falcon-RW's attention: one key/value head (the fused projection gives H query heads and one k and one v),
    ALiBi's per-head linear bias on the key distance, causal. ``form="sdpa"``: k and v expanded to H heads, the bias
    and the causal fill folded into one (1, H, n, n) float mask for SDPA; ``form="explicit"``: the key broadcast over
    the heads by the product, the bias added to the scaled scores, the causal part by ``masked_fill``."""

    def __init__(self, form: str = "sdpa"):
        super().__init__()
        self.form = form
        self.query_key_value = nn.Linear(D, D + 2 * HD, bias=False)
        self.dense = nn.Linear(D, D, bias=False)
        self.register_buffer("slopes", alibi_slopes(H), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.query_key_value(x)
        q = _heads(qkv[..., :D], b, n)                                           # (b, H, n, HD)
        k = qkv[..., D:D + HD].view(b, 1, n, HD)                                 # (b, 1, n, HD)
        v = qkv[..., D + HD:].view(b, 1, n, HD)
        pos = torch.arange(n, device=x.device)
        distance = (pos[None, :] - pos[:, None]).to(x.dtype)                      # (n, n): key - query
        alibi = self.slopes.to(x.dtype)[:, None, None] * distance                 # (H, n, n)
        future = pos[None, :] > pos[:, None]                                      # (n, n)
        if self.form == "sdpa":
            mask = alibi.masked_fill(future, torch.finfo(x.dtype).min)[None]     # (1, H, n, n)
            a = F.scaled_dot_product_attention(q, k.expand(b, H, n, HD), v.expand(b, H, n, HD), attn_mask=mask)
        else:
            s = q @ k.transpose(-1, -2) / math.sqrt(HD) + alibi
            s = s.masked_fill(future, float("-inf"))
            a = F.softmax(s, dim=-1) @ v
        return self.dense(_merge(a))


# ---- encoder-decoder cross attention --------------------------------------------------------------------------------
class CrossAttentionDecoderLayer(nn.Module):
    """A decoder layer (post-LN, as the original Transformer and BART): causal self-attention, then cross-attention
    of the n decoder tokens over the m encoder states under the encoder's key padding mask (b, m) (True: a real
    token), then a ReLU FFN. ``form="sdpa"``: the masks boolean for SDPA; ``form="explicit"``: written out, the
    padding as ``masked_fill(~keep[:, None, None, :], finfo.min)`` (a sequence with no real key then averages the
    values uniformly, as eager does)."""

    def __init__(self, form: str = "sdpa"):
        super().__init__()
        self.form = form
        self.q1, self.k1, self.v1, self.o1 = (nn.Linear(D, D) for _ in range(4))
        self.q2, self.k2, self.v2, self.o2 = (nn.Linear(D, D) for _ in range(4))
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def _attend(self, q, k, v, keep):
        """keep: boolean, broadcastable to (b, H, n, m): True where the query may see the key."""
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        s = torch.matmul(q, k.transpose(-1, -2)) * HD ** -0.5
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.matmul(s.softmax(dim=-1), v)

    def forward(self, y, memory, memory_keep):
        b, n, _ = y.shape
        m = memory.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=y.device).tril()                 # (n, n)
        a = self._attend(_heads(self.q1(y), b, n), _heads(self.k1(y), b, n), _heads(self.v1(y), b, n), causal)
        y = self.ln1(y + self.o1(_merge(a)))
        keep = memory_keep[:, None, None, :]                                               # (b, 1, 1, m)
        a = self._attend(_heads(self.q2(y), b, n), _heads(self.k2(memory), b, m), _heads(self.v2(memory), b, m), keep)
        y = self.ln2(y + self.o2(_merge(a)))
        return self.ln3(y + self.fc2(F.relu(self.fc1(y))))


# ---- Swin: shifted-window attention ----------------------------------------------------------------------------------
def window_partition(x, w: int):
    """(b, hh, ww, c) -> (b * windows, w * w, c)."""
    b, hh, ww, c = x.shape
    x = x.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(windows, w: int, hh: int, ww: int):
    b = windows.shape[0] // ((hh // w) * (ww // w))
    x = windows.view(b, hh // w, ww // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh, ww, -1)


class SwinShiftedBlock(nn.Module):
    """Swin's block on a 6 x 6 grid: LayerNorm, a cyclic shift by ``SHIFT`` (``torch.roll``), 3 x 3 windows, attention
    per window with q scaled by hd^-0.5 before the product and the relative-position bias gathered from its table,
    the shifted windows' mask (0 or -100 per window) added to it first (one bias per window, (windows, H, N, N)),
    the attention viewed back, the reverse shift, a residual, then a GELU MLP with its LayerNorm."""

    def __init__(self, grid: int = 6):
        super().__init__()
        self.grid = grid
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * WINDOW - 1) ** 2, H))
        coords = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (WINDOW - 1)     # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * WINDOW - 1) + rel[..., 1], persistent=False)
        self.register_buffer("attn_mask", self._shift_mask(grid), persistent=False)        # (windows, N, N)

    @staticmethod
    def _shift_mask(grid: int) -> torch.Tensor:
        img = torch.zeros(1, grid, grid, 1)
        cnt = 0
        for hs in (slice(0, -WINDOW), slice(-WINDOW, -SHIFT), slice(-SHIFT, None)):
            for ws in (slice(0, -WINDOW), slice(-WINDOW, -SHIFT), slice(-SHIFT, None)):
                img[:, hs, ws, :] = cnt
                cnt += 1
        win = window_partition(img, WINDOW).squeeze(-1)                                     # (windows, N)
        diff = win[:, None, :] - win[:, :, None]
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x):
        b, length, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, self.grid, self.grid, c)
        x = torch.roll(x, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        windows = window_partition(x, WINDOW)                                               # (b * nw, N, c)
        bw, n, _ = windows.shape
        qkv = self.qkv(windows).reshape(bw, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * HD ** -0.5, qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, H)
        bias = bias.permute(2, 0, 1).contiguous()                                           # (H, N, N)
        nw = self.attn_mask.shape[0]
        mask = (bias[None] + self.attn_mask[:, None].to(x.dtype)).repeat(b, 1, 1, 1)     # (b * nw, H, N, N)
        attn = F.softmax(q @ k.transpose(-2, -1) + mask, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        x = window_reverse(self.proj(out), WINDOW, self.grid, self.grid)
        x = torch.roll(x, shifts=(SHIFT, SHIFT), dims=(1, 2)).reshape(b, length, c)
        assert nw * b == bw
        x = shortcut + x
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


# ---- attention forms the kernel must not take as its own -------------------------------------------------------------
class ScoresAttention(nn.Module):
    """q, k, v from one projection, then one of these forms (each with a meaning of its own):
    ``"mup"``: scale 1 / hd (muP), taken with that scale; ``"query-mask"``: an additive (b, 1, n, 1) mask on the
    query rows (broadcast over the keys: a constant per row, which softmax ignores); ``"temperature"``: a learned
    0-d temperature (a parameter, not a constant); ``"softmax-queries"``: the softmax over the queries (dim -2);
    ``"dropout"``: nn.Dropout on the probabilities (in training it draws)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.drop = nn.Dropout(0.25)

    def forward(self, x, row_bias=None):
        b, n, _ = x.shape
        q, k, v = (_heads(t, b, n) for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-2, -1)
        if self.form == "mup":
            p = F.softmax(s / HD, dim=-1)
        elif self.form == "query-mask":
            p = F.softmax(s * HD ** -0.5 + row_bias, dim=-1)
        elif self.form == "temperature":
            p = F.softmax(s / self.temperature, dim=-1)
        elif self.form == "softmax-queries":
            p = F.softmax(s * HD ** -0.5, dim=-2)
        else:
            p = self.drop(F.softmax(s * HD ** -0.5, dim=-1))
        return self.o(_merge(p @ v))


# ---- graph forms: no_grad inside forward, aliases of inputs, in-place activations, CPU autocast ----------------------
class DistillBlock(nn.Module):
    """A student LayerNorm + MLP trained against a frozen teacher Linear that runs under ``torch.no_grad()`` inside
    forward; returns the student's output and the squared distance to the teacher's."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        with torch.no_grad():
            target = F.layer_norm(self.teacher(x), (D,))
        y = self.fc2(F.gelu(self.fc1(self.norm(x)))) + x
        return y, ((y - target) ** 2).mean()


class AliasingOutputs(nn.Module):
    """Returns a dict holding its input itself, a transposed view of it, its mask (not a float), the normalized rows and
    a tuple of (the MLP's output, a flattened view of the norm's output, a slice of the input)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x, mask):
        y = self.norm(x)
        z = F.relu(self.fc(y)) + x
        return {"x": x, "xt": x.transpose(0, 1), "mask": mask, "y": y, "rest": (z, y.view(-1, D), x[:, 0])}


class InplaceActivations(nn.Module):
    """An MLP that edits its activations in place: the Linear's output halved by ``mul_`` before its GELU, the down
    projection's output shifted by ``add_(1)`` then ``+= x``, the norm's output clamped by ``clamp_``; and a second
    branch ``relu_`` then ``+=`` (fusable: nothing else reads the Linear's output)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.side = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.up(x)
        h.mul_(0.5)
        h = F.gelu(h)
        u = self.down(h)
        u.add_(1.0)
        u += x
        y = self.norm(u)
        y.clamp_(min=-1.0)
        side = self.side(x).relu_()
        side += y
        return side


class AutocastBlock(nn.Module):
    """A pre-LN attention + MLP block whose forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on an
    f32 model: the Linears and products in bf16, the residual stream f32."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
            a = F.softmax(q @ k.transpose(-2, -1) * HD ** -0.5, dim=-1) @ v
            x = x + self.o(_merge(a))
            return x + self.proj(F.gelu(self.fc(self.ln2(x))))


# ---- models for tilestack.quantize -----------------------------------------------------------------------------------
class KeywordOddLinears(nn.Module):
    """Linears of odd sizes called by keyword (``fc(input=h)``): 19 -> 11 with a bias, 11 -> 11 without one used on
    two paths, 11 -> 23 with a bias, 23 -> 3 without; a GELU and a LayerNorm between."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(19, 11)
        self.shared = nn.Linear(11, 11, bias=False)
        self.norm = nn.LayerNorm(11)
        self.wide = nn.Linear(11, 23)
        self.head = nn.Linear(23, 3, bias=False)

    def forward(self, x):
        h = F.gelu(self.inp(input=x))
        h = self.norm(self.shared(input=h) + self.shared(h.flip(-1)))
        return self.head(input=F.silu(self.wide(input=h)))
