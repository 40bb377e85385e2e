"""Models for the profiler's twenty-fourth held-out round (tests/perf/test_profile_unseen_round24*.py), each written
for this round and small enough to profile on a CPU in well under a second.

    import perf_models_round24 as pm
    model, inputs = pm.MODELS["swin"][0]()       # (model, inputs); MODELS[name][1]: whether it trains

The models: a shifted-window attention block (cyclic shift by torch.roll, window partition by view/permute, a
relative-position bias gathered from a learned table, the shift mask added to the scores, the inverse shift); a
ConvNeXt-V2 block (depthwise 7x7 convolution, LayerNorm over channels-last, the global response norm: an L2 norm
over the spatial dims, its mean over channels, gamma * x * n + beta + x); a top-2 mixture of experts that gathers
each expert's tokens by index_select and adds its weighted output back by index_add_; a graph layer whose messages
are gathered by index_select and reduced into nodes by scatter_reduce (mean and amax); a DLRM interaction (embedding
bags, a bottom MLP, the pairwise dots by bmm, the strict upper triangle by triu_indices, a top MLP);
nn.MultiheadAttention with a key padding mask and the averaged attention weights; a (2+1)D video block (a 1x3x3
spatial and a 3x1x1 temporal Conv3d with BatchNorm3d). Sizes are module constants
so the tests write every count from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# --- shifted-window attention: batch, side, channels, window, heads, shift --------------------------------------
SW_B, SW_S, SW_C, SW_W, SW_H, SW_SHIFT = 2, 8, 16, 4, 2, 2
SW_NW = (SW_S // SW_W) ** 2  # windows per image
SW_T = SW_W * SW_W  # tokens per window
SW_D = SW_C // SW_H  # head dim
MASKED = -100.0  # the score added where two tokens of a shifted window come from different regions


def _shift_mask() -> torch.Tensor:
    """(windows, T, T): 0 between tokens of one region of the shifted image, MASKED between regions."""
    region = torch.zeros(SW_S, SW_S)
    cuts = (slice(0, -SW_W), slice(-SW_W, -SW_SHIFT), slice(-SW_SHIFT, None))
    label = 0
    for h in cuts:
        for w in cuts:
            region[h, w] = label
            label += 1
    win = region.view(SW_S // SW_W, SW_W, SW_S // SW_W, SW_W).permute(0, 2, 1, 3).reshape(SW_NW, SW_T)
    return (win[:, None, :] != win[:, :, None]).float() * MASKED


def _relative_index() -> torch.Tensor:
    """(T, T) index into the (2W-1)^2 table of relative offsets."""
    coords = torch.stack(torch.meshgrid(torch.arange(SW_W), torch.arange(SW_W), indexing="ij")).flatten(1)  # (2, T)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (SW_W - 1)  # (T, T, 2)
    return rel[..., 0] * (2 * SW_W - 1) + rel[..., 1]


class SwinBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(SW_C, 3 * SW_C)
        self.proj = nn.Linear(SW_C, SW_C)
        self.table = nn.Parameter(torch.randn((2 * SW_W - 1) ** 2, SW_H) * 0.02)
        self.register_buffer("index", _relative_index())
        self.register_buffer("mask", _shift_mask())

    def forward(self, x):  # (B, S, S, C)
        s = torch.roll(x, (-SW_SHIFT, -SW_SHIFT), dims=(1, 2))
        g = SW_S // SW_W
        win = s.view(SW_B, g, SW_W, g, SW_W, SW_C).permute(0, 1, 3, 2, 4, 5).reshape(-1, SW_T, SW_C)  # (B*NW, T, C)
        q, k, v = self.qkv(win).view(-1, SW_T, 3, SW_H, SW_D).permute(2, 0, 3, 1, 4)  # each (B*NW, H, T, D)
        bias = self.table[self.index.view(-1)].view(SW_T, SW_T, SW_H).permute(2, 0, 1)  # (H, T, T)
        mask = (bias[None, None] + self.mask[None, :, None]).expand(SW_B, -1, -1, -1, -1)  # (B, NW, H, T, T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(-1, SW_H, SW_T, SW_T))
        o = self.proj(o.transpose(1, 2).reshape(-1, SW_T, SW_C))  # (B*NW, T, C)
        o = o.view(SW_B, g, g, SW_W, SW_W, SW_C).permute(0, 1, 3, 2, 4, 5).reshape(SW_B, SW_S, SW_S, SW_C)
        return x + torch.roll(o, (SW_SHIFT, SW_SHIFT), dims=(1, 2))


@seeded
def swin():
    return SwinBlock(), (torch.randn(SW_B, SW_S, SW_S, SW_C),)


# --- ConvNeXt-V2 block: batch, channels, side, kernel, expansion -------------------------------------------------
CN_B, CN_C, CN_S, CN_K, CN_E = 2, 8, 6, 7, 4
GRN_EPS = 1e-6


class Grn(nn.Module):
    """Global response norm over channels-last (B, H, W, C)."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)
        self.beta = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)  # (B, 1, 1, C)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(CN_C, CN_C, CN_K, padding=CN_K // 2, groups=CN_C)
        self.norm = nn.LayerNorm(CN_C, eps=1e-6)
        self.up = nn.Linear(CN_C, CN_E * CN_C)
        self.grn = Grn(CN_E * CN_C)
        self.down = nn.Linear(CN_E * CN_C, CN_C)

    def forward(self, x):  # (B, C, S, S)
        h = self.dw(x).permute(0, 2, 3, 1)  # (B, S, S, C)
        h = self.down(self.grn(F.gelu(self.up(self.norm(h)))))
        return x + h.permute(0, 3, 1, 2)


@seeded
def convnext():
    return ConvNeXtV2(), (torch.randn(CN_B, CN_C, CN_S, CN_S),)


# --- top-2 mixture of experts: tokens, width, hidden, experts ------------------------------------------------------
MO_N, MO_C, MO_F, MO_E, MO_K = 12, 8, 16, 4, 2


class IndexAddExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(MO_C, MO_E, bias=False)
        self.w1 = nn.Parameter(torch.randn(MO_E, MO_C, MO_F) * 0.2)
        self.w2 = nn.Parameter(torch.randn(MO_E, MO_F, MO_C) * 0.2)

    def forward(self, x):  # (N, C)
        gates = self.router(x).softmax(-1)  # (N, E)
        weight, expert = gates.topk(MO_K, dim=-1)  # (N, K) each
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(MO_E):
            token, slot = (expert == e).nonzero(as_tuple=True)
            h = F.relu(x.index_select(0, token) @ self.w1[e]) @ self.w2[e]  # (n_e, C)
            out.index_add_(0, token, h * weight[token, slot, None])
        return out


def moe_inputs() -> torch.Tensor:
    """Tokens whose router choices are fixed by the seed (the per-expert counts are read back in the test)."""
    return torch.randn(MO_N, MO_C)


@seeded
def moe():
    return IndexAddExperts(), (moe_inputs(),)


# --- graph layer: nodes, edges, width ------------------------------------------------------------------------------
GR_N, GR_E, GR_C = 7, 20, 6


def graph_edges() -> torch.Tensor:
    """(2, E) source and target nodes; every node is a target at least once."""
    g = torch.Generator().manual_seed(5)
    src = torch.randint(0, GR_N, (GR_E,), generator=g)
    dst = torch.cat([torch.arange(GR_N), torch.randint(0, GR_N, (GR_E - GR_N,), generator=g)])
    return torch.stack([src, dst])


class ScatterGraph(nn.Module):
    def __init__(self):
        super().__init__()
        self.msg = nn.Linear(2 * GR_C, GR_C)
        self.upd = nn.Linear(3 * GR_C, GR_C)

    def forward(self, x, edges):  # x (N, C), edges (2, E)
        src, dst = edges
        m = F.silu(self.msg(torch.cat([x.index_select(0, src), x.index_select(0, dst)], -1)))  # (E, C)
        index = dst[:, None].expand(-1, GR_C)
        mean = torch.zeros_like(x).scatter_reduce(0, index, m, "mean", include_self=False)  # (N, C)
        peak = torch.zeros_like(x).scatter_reduce(0, index, m, "amax", include_self=False)  # (N, C)
        return x + self.upd(torch.cat([x, mean, peak], -1))


@seeded
def graph():
    return ScatterGraph(), (torch.randn(GR_N, GR_C), graph_edges())


# --- DLRM interaction: batch, dense features, width, tables, rows, bag size ---------------------------------------
DL_B, DL_DENSE, DL_D, DL_T, DL_ROWS, DL_BAG = 4, 5, 8, 3, 20, 2
DL_F = DL_T + 1  # features interacting: the bottom MLP's output and one bag per table
DL_PAIRS = DL_F * (DL_F - 1) // 2


class DlrmInteraction(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = nn.Linear(DL_DENSE, DL_D)
        self.tables = nn.ModuleList(nn.EmbeddingBag(DL_ROWS, DL_D, mode="sum") for _ in range(DL_T))
        self.top = nn.Linear(DL_D + DL_PAIRS, 1)

    def forward(self, dense, sparse):  # dense (B, DENSE), sparse (T, B, BAG)
        z = [F.relu(self.bottom(dense))] + [t(sparse[i]) for i, t in enumerate(self.tables)]
        f = torch.stack(z, 1)  # (B, F, D)
        dots = torch.bmm(f, f.transpose(1, 2))  # (B, F, F)
        i, j = torch.triu_indices(DL_F, DL_F, offset=1)
        return self.top(torch.cat([z[0], dots[:, i, j]], 1))  # (B, 1)


@seeded
def dlrm():
    return DlrmInteraction(), (torch.randn(DL_B, DL_DENSE), torch.randint(0, DL_ROWS, (DL_T, DL_B, DL_BAG)))


# --- nn.MultiheadAttention with a key padding mask and averaged weights --------------------------------------------
MH_B, MH_N, MH_E, MH_H = 2, 5, 8, 2
MH_LENGTHS = (5, 3)  # unpadded keys of each sequence


class PaddedMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(MH_E, MH_H, batch_first=True)

    def forward(self, x, pad):  # x (B, N, E), pad (B, N) True where padded
        out, weights = self.attn(x, x, x, key_padding_mask=pad, need_weights=True)
        return out.sum() + weights.sum()


def padding_mask() -> torch.Tensor:
    return torch.arange(MH_N)[None, :] >= torch.tensor(MH_LENGTHS)[:, None]


@seeded
def mha():
    return PaddedMha(), (torch.randn(MH_B, MH_N, MH_E), padding_mask())


# --- (2+1)D video block: batch, channels in, out, frames, side ----------------------------------------------------
VD_B, VD_CI, VD_CO, VD_T, VD_S = 1, 3, 4, 4, 6


class VideoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv3d(VD_CI, VD_CO, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn = nn.BatchNorm3d(VD_CO)
        self.temporal = nn.Conv3d(VD_CO, VD_CO, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):  # (B, C, T, S, S)
        return self.temporal(F.relu(self.bn(self.spatial(x))))


@seeded
def video():
    return VideoBlock(), (torch.randn(VD_B, VD_CI, VD_T, VD_S, VD_S),)


MODELS = {
    "swin": (swin, True), "convnext": (convnext, True), "moe": (moe, True), "graph": (graph, True),
    "dlrm": (dlrm, True), "mha": (mha, True), "video": (video, True),
}
