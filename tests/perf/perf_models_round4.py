"""A fourth round of models the profiler was not written against (tests/perf/test_profile_unseen_round4.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round4.py:mamba --device cpu --train

Each builder returns ``(model, inputs)``. The families are those rounds 1-3 leave out: a Mamba-style selective scan
written in torch ops (softplus, a depthwise causal Conv1d, a Python-stepped recurrence), Swin window attention
(roll, window partition, a relative-position bias table, a shift mask), a Conv3d video net (BatchNorm3d, 3-d
pools, trilinear upsampling, ConvTranspose3d), ESPCN super-resolution (InstanceNorm, circular and reflection
padding, pixel (un)shuffle, bicubic upsampling), a graph attention network (segment softmax by scatter_reduce
amax and index_add_), a zoo of losses (KL, cosine, triplet, margin, Poisson, CTC, ...), CLIP's contrastive head,
pooling variants (lp, fractional, unpool, indices, ceil mode), a grouped-query decoder with rotary embeddings,
RMSNorm, SwiGLU and a KV cache at batch size 1, a matmul zoo (addbmm, multi_dot, tensordot, kron, matrix_power,
einsum diagonals), fp16 and int8/fp16 dynamically quantized recurrent nets, a Glow-like flow, a capsule layer
with dynamic routing and spectral norm, per-sample dynamic convolution, empty batches, a diffusion U-Net block
(timestep embedding, GroupNorm, pixel self-attention) and NeRF's sampling and rendering (searchsorted, sort,
cumprod). Sizes are tiny: what is checked is the counting, not the speed.
"""

from __future__ import annotations

import math

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH = 2
# Mamba: model width, inner width, state size, sequence length, causal conv width, rank of the step projection
M_DIM, M_INNER, M_STATE, M_SEQ, M_CONV, M_RANK = 8, 16, 4, 6, 4, 2
# Swin: image side in patches, window side, channels, heads, shift
SW_SIDE, SW_WIN, SW_DIM, SW_HEADS, SW_SHIFT = 8, 4, 16, 2, 2
# Video: channels, frames, pixels per side
V_CH, V_T, V_HW = 4, 4, 8
# Super-resolution: channels, low-resolution side, upscale factor
SR_CH, SR_HW, SR_SCALE = 8, 6, 2
# Graph attention: nodes, edges, features, heads
G_NODES, G_EDGES, G_FEAT, G_HEADS = 7, 20, 8, 2
# Losses: rows, classes; CTC: time steps, target length
L_ROWS, L_CLASSES, CTC_T, CTC_S = 6, 5, 12, 4
# CLIP: pairs, image and text features, embedding width
C_PAIRS, C_IMG, C_TXT, C_EMB = 4, 12, 10, 8
# Decoder: width, query heads, kv heads, prompt length, new tokens, cache length, vocabulary
D_DIM, D_HEADS, D_KV_HEADS, D_PROMPT, D_NEW, D_CACHE, D_VOCAB = 16, 4, 2, 5, 3, 8, 32
# Capsules: input capsules, their width, output capsules, their width, routing iterations
CAP_IN, CAP_IN_DIM, CAP_OUT, CAP_OUT_DIM, CAP_ITERS = 6, 4, 3, 8, 3
POOL_CH, POOL_HW = 3, 8
FLOW_CH, FLOW_HW = 4, 4
DYN_CH, DYN_HW, DYN_K = 4, 6, 3
DIFF_CH, DIFF_HW, DIFF_T = 8, 8, 16  # diffusion block: channels, pixels per side, timestep embedding width
NERF_RAYS, NERF_COARSE, NERF_FINE, NERF_FREQS, NERF_WIDTH = 3, 6, 8, 4, 16


class SelectiveScan(nn.Module):
    """Mamba block in plain torch ops: in-projection into x and a gate, a depthwise causal Conv1d (padded by K-1,
    trimmed), SiLU, an input-dependent step (softplus of a rank-R projection) and B, C, the discretised state
    update h = exp(dt A) h + dt B x stepped over the sequence in Python, y = C h + D x, gated, out-projected."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(M_DIM, 2 * M_INNER, bias=False)
        self.conv = nn.Conv1d(M_INNER, M_INNER, M_CONV, groups=M_INNER, padding=M_CONV - 1)
        self.x_proj = nn.Linear(M_INNER, M_RANK + 2 * M_STATE, bias=False)
        self.dt_proj = nn.Linear(M_RANK, M_INNER)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, M_STATE + 1, dtype=torch.float32)).repeat(M_INNER, 1))
        self.d = nn.Parameter(torch.ones(M_INNER))
        self.out_proj = nn.Linear(M_INNER, M_DIM, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, L, D)
        length = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        x = F.silu(self.conv(x.transpose(1, 2))[..., :length]).transpose(1, 2)  # (B, L, E)
        dt, b, c = self.x_proj(x).split([M_RANK, M_STATE, M_STATE], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, E)
        a = -torch.exp(self.a_log)  # (E, N)
        decay = torch.exp(torch.einsum("ble,en->blen", dt, a))  # (B, L, E, N)
        drive = torch.einsum("ble,bln,ble->blen", dt, b, x)  # (B, L, E, N)
        h = u.new_zeros(u.shape[0], M_INNER, M_STATE)  # (B, E, N)
        ys = []
        for t in range(length):
            h = decay[:, t] * h + drive[:, t]
            ys.append(torch.einsum("ben,bn->be", h, c[:, t]))  # (B, E)
        y = torch.stack(ys, dim=1) + x * self.d  # (B, L, E)
        return self.out_proj(y * F.silu(z))  # (B, L, D)


def _windows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, win*win, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // SW_WIN, SW_WIN, w // SW_WIN, SW_WIN, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, SW_WIN * SW_WIN, c)


class SwinBlock(nn.Module):
    """A shifted-window attention block: LayerNorm, torch.roll by the shift, window partition, qkv, scores plus a
    relative-position bias gathered from a learned table and the shift mask, softmax, window reverse, roll back,
    an MLP; then patch merging (strided slices, cat, LayerNorm, a linear reduction)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(SW_DIM), nn.LayerNorm(SW_DIM)
        self.qkv, self.proj = nn.Linear(SW_DIM, 3 * SW_DIM), nn.Linear(SW_DIM, SW_DIM)
        self.table = nn.Parameter(torch.randn((2 * SW_WIN - 1) ** 2, SW_HEADS) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(SW_WIN), torch.arange(SW_WIN), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + SW_WIN - 1  # (n, n, 2)
        self.register_buffer("rel_index", rel[..., 0] * (2 * SW_WIN - 1) + rel[..., 1])  # (n, n)
        region = torch.zeros(1, SW_SIDE, SW_SIDE, 1)
        for i, (hs, ws) in enumerate((h, w) for h in (slice(0, -SW_WIN), slice(-SW_WIN, -SW_SHIFT),
                                                      slice(-SW_SHIFT, None))
                                     for w in (slice(0, -SW_WIN), slice(-SW_WIN, -SW_SHIFT), slice(-SW_SHIFT, None))):
            region[:, hs, ws, :] = i
        ids = _windows(region).squeeze(-1)  # (nW, n)
        mask = (ids[:, None, :] - ids[:, :, None]).ne(0).float() * -100.0
        self.register_buffer("shift_mask", mask)  # (nW, n, n)
        self.fc1, self.fc2 = nn.Linear(SW_DIM, 2 * SW_DIM), nn.Linear(2 * SW_DIM, SW_DIM)
        self.merge_norm = nn.LayerNorm(4 * SW_DIM)
        self.reduce = nn.Linear(4 * SW_DIM, 2 * SW_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        b, h, w, c = x.shape
        n, heads, n_win = SW_WIN * SW_WIN, SW_HEADS, (h // SW_WIN) * (w // SW_WIN)
        shifted = torch.roll(self.norm1(x), shifts=(-SW_SHIFT, -SW_SHIFT), dims=(1, 2))
        win = _windows(shifted)  # (B*nW, n, C)
        q, k, v = self.qkv(win).view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (B*nW, heads, n, d)
        scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)  # (B*nW, heads, n, n)
        bias = self.table[self.rel_index.reshape(-1)].view(n, n, heads).permute(2, 0, 1)  # (heads, n, n)
        scores = (scores + bias).view(b, n_win, heads, n, n) + self.shift_mask[None, :, None]
        attn = scores.view(-1, heads, n, n).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))  # (B*nW, n, C)
        out = out.view(b, h // SW_WIN, w // SW_WIN, SW_WIN, SW_WIN, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(out, shifts=(SW_SHIFT, SW_SHIFT), dims=(1, 2))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduce(self.merge_norm(merged))  # (B, H/2, W/2, 2C)


class VideoNet(nn.Module):
    """Conv3d with BatchNorm3d and ReLU, a 3-d max pool with its indices, a 3-d average pool, ConvTranspose3d,
    trilinear upsampling, and an adaptive 3-d average pool into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, V_CH, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(V_CH)
        self.conv2 = nn.Conv3d(V_CH, V_CH, (1, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose3d(V_CH, V_CH, 2, stride=2)
        self.head = nn.Linear(V_CH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, T, H, W)
        y = F.relu(self.bn(self.conv(x)))  # (B, C, T, H, W)
        p, _ = F.max_pool3d(y, 2, return_indices=True)  # (B, C, T/2, H/2, W/2)
        q = F.avg_pool3d(self.conv2(p), (1, 2, 2))  # (B, C, T/2, H/4, W/4)
        u = self.up(q) + F.interpolate(q, scale_factor=2, mode="trilinear", align_corners=False)  # (B, C, T, H/2, ..)
        return self.head(F.adaptive_avg_pool3d(u, 1).flatten(1))


class SuperResolution(nn.Module):
    """ESPCN-like: a circular-padded Conv2d, InstanceNorm2d (affine), LeakyReLU, a reflection-padded Conv2d to
    C*r^2 channels, PixelShuffle, a bicubic skip of the input, and a PixelUnshuffle back down for a consistency
    term."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, SR_CH, 3, padding=1, padding_mode="circular")
        self.norm = nn.InstanceNorm2d(SR_CH, affine=True)
        self.body = nn.Conv2d(SR_CH, 3 * SR_SCALE**2, 3)
        self.shuffle, self.unshuffle = nn.PixelShuffle(SR_SCALE), nn.PixelUnshuffle(SR_SCALE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: (B, 3, H, W)
        y = F.leaky_relu(self.norm(self.head(x)), 0.1)
        hi = self.shuffle(self.body(F.pad(y, (1, 1, 1, 1), mode="reflect")))  # (B, 3, rH, rW)
        hi = hi + F.interpolate(x, scale_factor=SR_SCALE, mode="bicubic", align_corners=False)
        return hi, self.unshuffle(hi).mean()  # (B, 3, rH, rW), ()


class GraphAttention(nn.Module):
    """A GAT layer over an edge list: per-edge scores from gathered source and target features (index_select),
    LeakyReLU, a segment softmax per target node (scatter_reduce amax, exp, index_add_ of the sums), messages
    weighted and summed into their targets (index_add_), ELU, and a mean readout."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(G_FEAT, G_HEADS * G_FEAT, bias=False)
        self.att_src = nn.Parameter(torch.randn(G_HEADS, G_FEAT) * 0.1)
        self.att_dst = nn.Parameter(torch.randn(G_HEADS, G_FEAT) * 0.1)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:  # x: (V, F), edges: (2, E) int64
        src, dst = edges
        h = self.lin(x).view(-1, G_HEADS, G_FEAT)  # (V, heads, F)
        a_src, a_dst = (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)  # (V, heads)
        e = F.leaky_relu(a_src.index_select(0, src) + a_dst.index_select(0, dst), 0.2)  # (E, heads)
        top = e.new_full((x.shape[0], G_HEADS), float("-inf"))
        top = top.scatter_reduce(0, dst[:, None].expand(-1, G_HEADS), e, reduce="amax", include_self=True)
        w = (e - top.index_select(0, dst)).exp()  # (E, heads)
        denom = torch.zeros_like(top).index_add_(0, dst, w)  # (V, heads)
        alpha = w / denom.index_select(0, dst)  # (E, heads)
        msg = h.index_select(0, src) * alpha[..., None]  # (E, heads, F)
        out = torch.zeros_like(h).index_add_(0, dst, msg)  # (V, heads, F)
        return F.elu(out.mean(1)).mean(0)  # (F,)


class Losses(nn.Module):
    """Losses rounds 1-3 left out, on one linear's outputs: KL divergence (log-target), cosine embedding,
    triplet margin, margin ranking, Poisson NLL, Gaussian NLL, soft margin, multi-class and multi-label margin,
    L1, label-smoothed cross-entropy with probability targets, and CTC."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(L_CLASSES, L_CLASSES)

    def forward(self, x, y, labels, multi, ctc_x, ctc_targets):
        z = self.lin(x)  # (N, C)
        logp = F.log_softmax(z, -1)
        total = F.kl_div(logp, F.log_softmax(y, -1), reduction="batchmean", log_target=True)
        total = total + F.cosine_embedding_loss(z, y, torch.ones(z.shape[0]))
        total = total + F.triplet_margin_loss(z, y, y.flip(0))
        total = total + F.margin_ranking_loss(z[:, 0], z[:, 1], torch.ones(z.shape[0]))
        total = total + F.poisson_nll_loss(z, y.abs()) + F.gaussian_nll_loss(z, y, torch.ones_like(z))
        total = total + F.soft_margin_loss(z, y.sign()) + F.l1_loss(z, y)
        total = total + F.multi_margin_loss(z, labels) + F.multilabel_margin_loss(z, multi)
        total = total + F.cross_entropy(z, y.softmax(-1), label_smoothing=0.1)
        lengths = torch.full((ctc_x.shape[1],), ctc_x.shape[0], dtype=torch.long)
        targets = torch.full((ctc_x.shape[1],), ctc_targets.shape[1], dtype=torch.long)
        return total + F.ctc_loss(self.lin(ctc_x).log_softmax(-1), ctc_targets, lengths, targets)


class ContrastiveHead(nn.Module):
    """CLIP's head: two projections, F.normalize, a learned temperature, the (N, N) logits and the symmetric
    cross-entropy; plus the cosine similarity of the matched pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = nn.Linear(C_IMG, C_EMB, bias=False), nn.Linear(C_TXT, C_EMB, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # (N, I), (N, T)
        a, b = F.normalize(self.img(image), dim=-1), F.normalize(self.txt(text), dim=-1)  # (N, E) each
        logits = self.log_scale.exp() * a @ b.t()  # (N, N)
        labels = torch.arange(a.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return loss - F.cosine_similarity(self.img(image), self.txt(text)).mean()


class PoolZoo(nn.Module):
    """LP pooling, fractional max pooling, a max pool with indices undone by max_unpool2d, an adaptive max pool
    with indices, average pooling with ceil_mode and count_include_pad=False, a dilated 1-d max pool, local
    response normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        lp = F.lp_pool2d(x, 2, 2)  # (B, C, H/2, W/2)
        frac = F.fractional_max_pool2d(x, 2, output_size=(5, 5), _random_samples=torch.full((x.shape[0], x.shape[1], 2),
                                                                                            0.5))
        pooled, idx = F.max_pool2d(x, 2, return_indices=True)
        unpooled = F.max_unpool2d(pooled, idx, 2)  # (B, C, H, W)
        amax, _ = F.adaptive_max_pool2d(x, 3, return_indices=True)  # (B, C, 3, 3)
        avg = F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        dil = F.max_pool1d(x.flatten(2), 3, stride=2, dilation=2)
        lrn = F.local_response_norm(x, 3)
        return lp.sum() + frac.sum() + unpooled.sum() + amax.sum() + avg.sum() + dil.sum() + lrn.sum()


def _rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding by complex multiplication: x (B, H, T, d) viewed as d/2 complex pairs, times e^{i pos w}."""
    d = x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
    rot = torch.polar(torch.ones(pos.shape[0], d // 2), torch.outer(pos.float(), freqs))  # (T, d/2) complex
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class GQADecoder(nn.Module):
    """A Llama-like decoder layer at batch size 1: an embedding, RMSNorm, grouped-query attention (fewer key/value
    heads, SDPA with enable_gqa) with rotary embeddings, a KV cache written by index_copy_, SwiGLU, a tied
    vocabulary head; greedy decoding of a few tokens after the prompt."""

    def __init__(self) -> None:
        super().__init__()
        d, hd = D_DIM, D_DIM // D_HEADS
        self.emb = nn.Embedding(D_VOCAB, d)
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * D_KV_HEADS * hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(
            2 * d, d, bias=False)

    def layer(self, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:  # x: (1, T, D)
        hd, t = D_DIM // D_HEADS, x.shape[1]
        h = self.norm1(x)
        q = self.q(h).view(1, t, D_HEADS, hd).transpose(1, 2)  # (1, H, T, d)
        k, v = self.kv(h).view(1, t, 2, D_KV_HEADS, hd).permute(2, 0, 3, 1, 4)  # (1, Hkv, T, d) each
        q, k = _rotary(q, pos), _rotary(k, pos)
        cache.index_copy_(3, pos, torch.stack([k, v]))  # cache: (2, 1, Hkv, CACHE, d)
        end = int(pos[-1]) + 1
        keys, values = cache[0, :, :, :end], cache[1, :, :, :end]
        att = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=True)  # (1, H, T, d)
        x = x + self.o(att.transpose(1, 2).reshape(1, t, D_DIM))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:  # prompt: (1, P) int64
        hd = D_DIM // D_HEADS
        cache = torch.zeros(2, 1, D_KV_HEADS, D_CACHE, hd)
        x = self.layer(self.emb(prompt), torch.arange(prompt.shape[1]), cache)
        tokens = [(x[:, -1] @ self.emb.weight.t()).argmax(-1)]  # (1,)
        for i in range(D_NEW - 1):
            pos = torch.tensor([prompt.shape[1] + i])
            x = self.layer(self.emb(tokens[-1])[:, None], pos, cache)
            tokens.append((x[:, -1] @ self.emb.weight.t()).argmax(-1))
        return x.sum() + torch.stack(tokens).sum()


class MatmulZoo(nn.Module):
    """Products rounds 1-3 left out: addbmm, an in-place addmm_, baddbmm with beta 0, linalg.multi_dot of
    three matrices, tensordot over two dims, kron, outer, matrix_power, einsum with a batch diagonal and a
    trace, chain of @ on 1-d and 3-d operands (matmul's broadcasting cases)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x: (B, 6, 6), y: (6, 4, 5)
        a = torch.addbmm(self.w, x, x, beta=0.5)  # (6, 6): sum over the batch of x_b @ x_b
        acc = self.w.clone().addmm_(x[0], x[1])  # (6, 6)
        c = torch.baddbmm(x, x, x.transpose(1, 2), beta=0.0)  # (B, 6, 6)
        d = torch.linalg.multi_dot([self.w, x[0], y.flatten(1)])  # (6, 20)
        e = torch.tensordot(x, y, dims=([1], [0]))  # (B, 6, 4, 5)
        f = torch.kron(self.w[:2, :2], x[0, :3, :3])  # (6, 6)
        g = torch.outer(self.w[0], self.w[1])  # (6, 6)
        p = torch.linalg.matrix_power(self.w, 3)  # (6, 6)
        diag = torch.einsum("bii->bi", x)  # (B, 6)
        tr = torch.einsum("ii", self.w)  # ()
        vec = self.w[0] @ x  # (B, 6): a vector times a batch of matrices
        mat_vec = x @ self.w[1]  # (B, 6)
        return a.sum() + acc.sum() + c.sum() + d.sum() + e.sum() + f.sum() + g.sum() + p.sum() + diag.sum() + tr + \
            vec.sum() + mat_vec.sum()


class HalfConvNet(nn.Module):
    """A small fp16 net: Conv2d, BatchNorm2d (eval), GELU, adaptive average pool, a linear head, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, POOL_CH * 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(POOL_CH * 2)
        self.head = nn.Linear(POOL_CH * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        y = F.gelu(self.bn(self.conv(x)))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1)).softmax(-1)


class Recurrents(nn.Module):
    """An nn.LSTM and an nn.GRU (2 layers each, the GRU bidirectional) and a linear head: quantized dynamically
    (int8 or fp16 weights) by the builders."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(M_DIM, M_INNER, num_layers=2, batch_first=True)
        self.gru = nn.GRU(M_DIM, M_INNER, bidirectional=True, batch_first=True)
        self.head = nn.Linear(M_INNER, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D)
        a, _ = self.lstm(x)  # (B, L, E)
        g, _ = self.gru(x)  # (B, L, 2E)
        return self.head(a + g[..., :M_INNER] + g[..., M_INNER:])


class Flow(nn.Module):
    """A Glow step: ActNorm, an invertible 1x1 convolution whose weight is built from an LU parametrisation
    (tril, triu, diag, exp) and whose log-determinant is the sum of its log-diagonal, an affine coupling
    (chunk, a small conv net, tanh scales) and the log-likelihood of a standard normal."""

    def __init__(self) -> None:
        super().__init__()
        c = FLOW_CH
        self.loc, self.log_s = nn.Parameter(torch.zeros(1, c, 1, 1)), nn.Parameter(torch.zeros(1, c, 1, 1))
        self.lower, self.upper = nn.Parameter(torch.randn(c, c) * 0.1), nn.Parameter(torch.randn(c, c) * 0.1)
        self.log_diag = nn.Parameter(torch.zeros(c))
        self.net = nn.Sequential(nn.Conv2d(c // 2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        c, pixels = FLOW_CH, x.shape[2] * x.shape[3]
        y = (x + self.loc) * self.log_s.exp()
        eye = torch.eye(c)
        w = (self.lower.tril(-1) + eye) @ (self.upper.triu(1) + torch.diag(self.log_diag.exp()))  # (C, C)
        y = F.conv2d(y, w[:, :, None, None])
        a, b = y.chunk(2, 1)
        shift, raw = self.net(a).chunk(2, 1)
        scale = torch.tanh(raw)
        b = (b + shift) * scale.exp()
        z = torch.cat([a, b], 1)
        logdet = pixels * (self.log_s.sum() + self.log_diag.sum()) + scale.flatten(1).sum(1)  # (B,)
        return (-0.5 * z.pow(2).flatten(1).sum(1) + logdet).mean()


class Capsules(nn.Module):
    """A capsule layer: predictions u_hat = W u by einsum, three iterations of routing by agreement (softmax
    over the output capsules, weighted sum, squash with a norm, agreement by einsum), and a spectrally
    normalised linear (power iteration) reading out the capsule lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(CAP_IN, CAP_OUT, CAP_OUT_DIM, CAP_IN_DIM) * 0.1)
        self.out = nn.utils.parametrizations.spectral_norm(nn.Linear(CAP_OUT, 2))

    @staticmethod
    def squash(s: torch.Tensor) -> torch.Tensor:
        n2 = (s * s).sum(-1, keepdim=True)
        return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, I, Din)
        u_hat = torch.einsum("iodk,bik->biod", self.w, u)  # (B, I, O, Dout)
        logits = u.new_zeros(u.shape[0], CAP_IN, CAP_OUT)
        for _ in range(CAP_ITERS):
            c = logits.softmax(-1)  # (B, I, O)
            v = self.squash(torch.einsum("bio,biod->bod", c, u_hat))  # (B, O, Dout)
            logits = logits + torch.einsum("biod,bod->bio", u_hat, v)
        return self.out(torch.linalg.vector_norm(v, dim=-1))  # (B, 2)


class DynamicConv(nn.Module):
    """Per-sample convolution kernels from a hypernetwork, applied in one grouped convolution (the batch folded
    into the channels, groups = batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.hyper = nn.Linear(DYN_CH, DYN_CH * DYN_CH * DYN_K * DYN_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        b, c, h, w = x.shape
        kernels = self.hyper(x.mean((2, 3))).view(b * c, c, DYN_K, DYN_K)  # (B*C, C, K, K)
        y = F.conv2d(x.reshape(1, b * c, h, w), kernels, padding=DYN_K // 2, groups=b)  # (1, B*C, H, W)
        return y.view(b, c, h, w)


class DiffusionBlock(nn.Module):
    """A diffusion U-Net block: a sinusoidal timestep embedding (exp, sin, cos) through a SiLU MLP added to the
    feature map, GroupNorm-SiLU-Conv twice with a residual, self-attention over the pixels by SDPA (1x1 conv qkv), a
    strided conv down and nearest upsampling back."""

    def __init__(self) -> None:
        super().__init__()
        c = DIFF_CH
        self.t_mlp = nn.Sequential(nn.Linear(DIFF_T, c), nn.SiLU())
        self.n1, self.n2 = nn.GroupNorm(2, c), nn.GroupNorm(2, c)
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W), t: (B,)
        half = DIFF_T // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)  # (T/2,)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], -1)  # (B, T)
        h = self.c1(F.silu(self.n1(x))) + self.t_mlp(emb)[:, :, None, None]
        h = x + self.c2(F.silu(self.n2(h)))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(h).flatten(2).transpose(1, 2).chunk(3, -1)  # (B, HW, C) each
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head
        h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
        return F.interpolate(self.down(h), scale_factor=2, mode="nearest")  # (B, C, H, W)


class NeRF(nn.Module):
    """NeRF's hierarchical sampling and volume rendering: a CDF of the coarse weights (cumsum), inverse-transform
    sampling by searchsorted, the samples merged by sort, a sin/cos positional encoding into an MLP, densities and
    colours composited by a cumulative product of transmittances."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * NERF_FREQS, NERF_WIDTH), nn.ReLU(), nn.Linear(NERF_WIDTH, 4))

    def forward(self, origins, dirs, t_coarse, weights):  # (R, 3), (R, 3), (R, S) sorted, (R, S) positive
        pdf = weights / weights.sum(-1, keepdim=True)
        cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(-1)], -1)  # (R, S+1)
        u = torch.linspace(0, 1, NERF_FINE).expand(*cdf.shape[:-1], NERF_FINE).contiguous()
        idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)  # (R, F)
        t = torch.sort(torch.cat([t_coarse, torch.gather(t_coarse, -1, idx - 1)], -1), -1)[0]  # (R, S+F)
        pts = origins[:, None] + dirs[:, None] * t[..., None]  # (R, S+F, 3)
        freq = 2.0 ** torch.arange(NERF_FREQS)
        angles = pts[..., None] * freq  # (R, S+F, 3, L)
        enc = torch.cat([pts, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], -1)  # (R, S+F, 3+6L)
        out = self.mlp(enc)  # (R, S+F, 4)
        sigma, rgb = F.relu(out[..., 0]), torch.sigmoid(out[..., 1:])
        delta = torch.diff(t, dim=-1, append=t[..., -1:] + 1e10)
        alpha = 1 - torch.exp(-sigma * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], -1), -1)[..., :-1]
        return ((alpha * trans)[..., None] * rgb).sum(-2)  # (R, 3)




@seeded
def mamba():
    return SelectiveScan(), (torch.randn(BATCH, M_SEQ, M_DIM),)


@seeded
def swin():
    return SwinBlock(), (torch.randn(BATCH, SW_SIDE, SW_SIDE, SW_DIM),)


@seeded
def video():
    return VideoNet(), (torch.randn(BATCH, 3, V_T, V_HW, V_HW),)


@seeded
def super_resolution():
    return SuperResolution(), (torch.randn(BATCH, 3, SR_HW, SR_HW),)


def _graph():
    edges = torch.randint(0, G_NODES, (2, G_EDGES))
    return torch.cat([edges, torch.arange(G_NODES).repeat(2, 1)], 1)  # with self loops: every node has an edge in


@seeded
def graph_attention():
    return GraphAttention(), (torch.randn(G_NODES, G_FEAT), _graph())


@seeded
def losses():
    multi = torch.full((L_ROWS, L_CLASSES), -1, dtype=torch.long)
    multi[:, 0], multi[:, 1] = 1, 3  # two target classes per row, then -1 ends the list
    return Losses(), (
        torch.randn(L_ROWS, L_CLASSES), torch.randn(L_ROWS, L_CLASSES), torch.randint(0, L_CLASSES, (L_ROWS,)),
        multi, torch.randn(CTC_T, BATCH, L_CLASSES), torch.randint(1, L_CLASSES, (BATCH, CTC_S)),
    )


@seeded
def contrastive():
    return ContrastiveHead(), (torch.randn(C_PAIRS, C_IMG), torch.randn(C_PAIRS, C_TXT))


@seeded
def pools():
    return PoolZoo(), (torch.randn(BATCH, POOL_CH, POOL_HW, POOL_HW, requires_grad=True),)


@seeded
def gqa_decoder():
    return GQADecoder(), (torch.randint(0, D_VOCAB, (1, D_PROMPT)),)


@seeded
def matmul_zoo():
    return MatmulZoo(), (torch.randn(BATCH, 6, 6, requires_grad=True), torch.randn(6, 4, 5))


@seeded
def half_convnet():
    return HalfConvNet().half().eval(), (torch.randn(BATCH, 3, POOL_HW, POOL_HW, dtype=torch.float16),)


@seeded
def recurrents():
    return Recurrents(), (torch.randn(BATCH, M_SEQ, M_DIM),)


@seeded
def quantized_recurrents():
    """The recurrent net with int8 weights (dynamic quantization): quantized LSTM and GRU kernels, an int8 linear."""
    model = torch.ao.quantization.quantize_dynamic(Recurrents(), {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)
    return model, (torch.randn(BATCH, M_SEQ, M_DIM),)


@seeded
def fp16_quantized_recurrents():
    """The recurrent net with fp16 weights (dynamic quantization, dtype=torch.float16)."""
    model = torch.ao.quantization.quantize_dynamic(Recurrents(), {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.float16)
    return model, (torch.randn(BATCH, M_SEQ, M_DIM),)


@seeded
def flow():
    return Flow(), (torch.randn(BATCH, FLOW_CH, FLOW_HW, FLOW_HW),)


@seeded
def capsules():
    return Capsules(), (torch.randn(BATCH, CAP_IN, CAP_IN_DIM),)


@seeded
def dynamic_conv():
    return DynamicConv(), (torch.randn(BATCH, DYN_CH, DYN_HW, DYN_HW),)


@seeded
def empty_video():
    """The video net on a batch of 0 clips (eval: batch norm's running statistics need no batch)."""
    return VideoNet().eval(), (torch.randn(0, 3, V_T, V_HW, V_HW),)


@seeded
def empty_graph():
    """The graph attention layer on a graph with nodes but no edges (besides none): every segment empty."""
    return GraphAttention(), (torch.randn(G_NODES, G_FEAT), torch.zeros(2, 0, dtype=torch.long))


@seeded
def diffusion():
    return DiffusionBlock(), (torch.randn(BATCH, DIFF_CH, DIFF_HW, DIFF_HW), torch.tensor([3.0, 50.0]))


@seeded
def nerf():
    t_coarse = torch.sort(torch.rand(NERF_RAYS, NERF_COARSE), -1)[0]
    return NeRF(), (torch.randn(NERF_RAYS, 3), torch.randn(NERF_RAYS, 3), t_coarse,
                    torch.rand(NERF_RAYS, NERF_COARSE) + 0.1)


# name -> (builder, whether a backward step makes sense)
MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (mamba, True),
        (swin, True),
        (video, True),
        (super_resolution, True),
        (graph_attention, True),
        (losses, True),
        (contrastive, True),
        (pools, True),
        (gqa_decoder, False),  # greedy decoding: argmax ends the graph
        (matmul_zoo, True),
        (half_convnet, False),
        (recurrents, True),
        (quantized_recurrents, False),
        (fp16_quantized_recurrents, False),
        (flow, True),
        (capsules, True),
        (dynamic_conv, True),
        (empty_video, False),
        (empty_graph, True),
        (diffusion, True),
        (nerf, True),
    )
}
build = mamba
