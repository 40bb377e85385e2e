"""Twentieth held-out round for the model profiler: nine models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: a LLaMA-like block written by hand (RMSNorm by pow, mean and rsqrt; rotary embeddings by rotate_half;
causal SDPA; SwiGLU); a Mamba-like block (in_proj to x and a gate, a causal depthwise Conv1d cut back to the
sequence, SiLU, x_proj to dt / B / C, softplus, a selective scan written with torch ops one position at a time,
gating, out_proj); a mixture of experts routing each token to its top 2 of 3 experts (index_select in, index_add_
out); a small ViT (patch embedding by a strided Conv2d, a class token expanded over the batch and concatenated,
learned positions, one pre-norm nn.TransformerEncoderLayer, a head on the class token); a U-Net-ish net (Conv2d,
GroupNorm, max pool, InstanceNorm2d, ConvTranspose2d beside a nearest upsample, a skip concatenation); a GRUCell
loop feeding an nn.LSTM; nn.MultiheadAttention with a key padding mask; two nn.EmbeddingBag tables (per-sample
weights and a padding index; 2-D bags by mean); a spectral filter (rfft, a learned complex weight by
view_as_complex, irfft).
Op-level checks of this round's fixes, the modes (no_grad, inference_mode, autocast), a training step with its
optimizer, integer and complex models, the store and the bad arguments are in test_profile_unseen_round20_more.py.

Every count is written from the shapes: a multiply-add is 2 FLOPs; a convolution by ``profile_support.conv``
(2 * N * positions * C_out * C_in/groups * taps, + one add per output element for a bias); attention
4*B*H*Nq*Nkv*D; element-wise ops one per output element; a reduction one per element folded in; norms, softmax by
their ``formulas`` constants. Bytes are the distinct tensors an op reads and writes (fp32: 4 bytes, int64: 8).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, check_every_row, one_row, setup_round  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of, seeded  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
LN, SOFTMAX = formulas.LAYERNORM_FLOPS_PER_ELEMENT, formulas.SOFTMAX_FLOPS_PER_ELEMENT
BN_TRAIN = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


# --- the models ----------------------------------------------------------------------------------------------------
# Mamba-like block: batch, length, width, inner width, state size, conv taps, dt rank
MB_B, MB_L, MB_D, MB_E, MB_N, MB_K, MB_R = 2, 5, 6, 8, 3, 4, 2


class MambaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(MB_D, 2 * MB_E, bias=False)
        self.conv = nn.Conv1d(MB_E, MB_E, MB_K, groups=MB_E, padding=MB_K - 1)
        self.x_proj = nn.Linear(MB_E, MB_R + 2 * MB_N, bias=False)
        self.dt_proj = nn.Linear(MB_R, MB_E)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, MB_N + 1, dtype=torch.float32)).repeat(MB_E, 1))
        self.d = nn.Parameter(torch.ones(MB_E))
        self.out_proj = nn.Linear(MB_E, MB_D, bias=False)

    def forward(self, u):  # (B, L, D)
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        x = self.conv(x.transpose(1, 2))[..., :MB_L].transpose(1, 2)  # causal: the first L of L + K - 1 outputs
        x = F.silu(x)
        dt, b, c = self.x_proj(x).split([MB_R, MB_N, MB_N], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, E)
        a = -torch.exp(self.a_log)  # (E, N)
        h = u.new_zeros(MB_B, MB_E, MB_N)
        ys = []
        for t in range(MB_L):
            da = torch.exp(dt[:, t, :, None] * a)  # (B, E, N)
            dbx = dt[:, t, :, None] * b[:, t, None, :] * x[:, t, :, None]  # (B, E, N)
            h = da * h + dbx
            ys.append((h * c[:, t, None, :]).sum(-1))  # (B, E)
        y = torch.stack(ys, dim=1) + x * self.d  # (B, L, E)
        return self.out_proj(y * F.silu(z))


@seeded
def mamba():
    return MambaBlock(), (torch.randn(MB_B, MB_L, MB_D),)


# Mixture of experts: tokens, width, hidden, experts, experts per token
MOE_T, MOE_D, MOE_H, MOE_E, MOE_K = 6, 4, 8, 3, 2


class IndexAddMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(MOE_D, MOE_E, bias=False)
        self.up = nn.ModuleList(nn.Linear(MOE_D, MOE_H) for _ in range(MOE_E))
        self.down = nn.ModuleList(nn.Linear(MOE_H, MOE_D) for _ in range(MOE_E))

    def forward(self, x):  # (T, D)
        probs = self.router(x).softmax(-1)  # (T, E)
        w, idx = probs.topk(MOE_K, dim=-1)  # (T, K)
        out = torch.zeros_like(x)
        for e in range(MOE_E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            h = self.down[e](F.gelu(self.up[e](x.index_select(0, tok))))  # (n_e, D)
            out.index_add_(0, tok, h * w[tok, slot, None])
        return out


@seeded
def moe():
    return IndexAddMoE(), (torch.randn(MOE_T, MOE_D),)


def moe_tokens_per_expert() -> list[int]:
    """How many tokens each expert takes, read off the router (data-dependent, not off the profiler)."""
    model, (x,) = moe()
    with torch.no_grad():
        idx = model.router(x).softmax(-1).topk(MOE_K, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=MOE_E).tolist()


# ViT: batch, channels, image side, patch side, width, heads, feed-forward, classes
VT_B, VT_C, VT_IMG, VT_P, VT_D, VT_H, VT_FF, VT_CLS = 2, 3, 8, 4, 8, 2, 16, 5
VT_N = (VT_IMG // VT_P) ** 2  # patches
VT_S = VT_N + 1  # tokens, the class token first


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(VT_C, VT_D, VT_P, stride=VT_P)
        self.cls = nn.Parameter(torch.randn(1, 1, VT_D))
        self.pos = nn.Parameter(torch.randn(1, VT_S, VT_D))
        self.block = nn.TransformerEncoderLayer(VT_D, VT_H, VT_FF, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(VT_D)
        self.head = nn.Linear(VT_D, VT_CLS)

    def forward(self, img):  # (B, C, H, W)
        x = self.patch(img).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, S, D)
        x = self.block(x)
        return self.head(self.norm(x[:, 0]))  # (B, classes)


@seeded
def vit():
    return TinyViT().eval(), (torch.randn(VT_B, VT_C, VT_IMG, VT_IMG),)


# U-Net: batch, input channels, width, image side
UN_B, UN_C, UN_W, UN_S = 2, 3, 4, 8


class MiniUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(UN_C, UN_W, 3, padding=1)
        self.gn = nn.GroupNorm(2, UN_W)
        self.mid = nn.Conv2d(UN_W, 2 * UN_W, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(2 * UN_W, affine=True)
        self.up = nn.ConvTranspose2d(2 * UN_W, UN_W, 2, stride=2)
        self.dec = nn.Conv2d(2 * UN_W, UN_W, 3, padding=1)
        self.out = nn.Conv2d(UN_W, 1, 1)

    def forward(self, x):
        e = F.relu(self.gn(self.enc(x)))  # (B, W, S, S)
        m = F.relu(self.inorm(self.mid(F.max_pool2d(e, 2))))  # (B, 2W, S/2, S/2)
        u = self.up(m) + F.interpolate(m[:, :UN_W], scale_factor=2, mode="nearest")  # (B, W, S, S)
        d = F.relu(self.dec(torch.cat([u, e], dim=1)))  # skip: (B, 2W, S, S) in
        return self.out(d)  # (B, 1, S, S)


@seeded
def unet():
    return MiniUNet(), (torch.randn(UN_B, UN_C, UN_S, UN_S),)


# Recurrent: batch, steps, input, hidden
RC_B, RC_T, RC_I, RC_H = 2, 4, 3, 5


class CellsThenLstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRUCell(RC_I, RC_H)
        self.lstm = nn.LSTM(RC_H, RC_H, batch_first=True)
        self.head = nn.Linear(RC_H, 1)

    def forward(self, x):  # (B, T, I)
        h = x.new_zeros(RC_B, RC_H)
        hs = []
        for t in range(RC_T):
            h = self.gru(x[:, t], h)
            hs.append(h)
        out, _ = self.lstm(torch.stack(hs, 1))  # (B, T, H)
        return self.head(out[:, -1])


@seeded
def cells():
    return CellsThenLstm(), (torch.randn(RC_B, RC_T, RC_I),)


# nn.MultiheadAttention with a key padding mask: batch, length, width, heads
PM_B, PM_L, PM_E, PM_H = 2, 5, 8, 2


class PaddedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(PM_E, PM_H, batch_first=True)

    def forward(self, x, pad):
        out, _ = self.mha(x, x, x, key_padding_mask=pad, need_weights=False)
        return out


@seeded
def padded_mha():
    pad = torch.zeros(PM_B, PM_L, dtype=torch.bool)
    pad[1, 3:] = True  # the second sequence is 3 long
    return PaddedMHA(), (torch.randn(PM_B, PM_L, PM_E), pad)


# Embedding bags: table rows, width
EB_ROWS, EB_D = 20, 4
EB_IDS = [3, 0, 7, 9, 1, 2, 0]  # two bags (offsets 0 and 3), two padding entries (0)


class BagRecsys(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(EB_ROWS, EB_D, mode="sum", padding_idx=0)
        self.mean_bag = nn.EmbeddingBag(EB_ROWS, EB_D, mode="mean")
        self.head = nn.Linear(2 * EB_D, 1)

    def forward(self, ids, offsets, weights, ids2d):
        a = self.bag(ids, offsets, per_sample_weights=weights)  # (bags, D)
        b = self.mean_bag(ids2d)  # (bags, D)
        return self.head(torch.cat([a, b], dim=-1))


@seeded
def bags():
    return BagRecsys(), (torch.tensor(EB_IDS), torch.tensor([0, 3]), torch.rand(len(EB_IDS)),
                         torch.tensor([[1, 2, 3], [4, 5, 6]]))


# Spectral filter: batch, channels, length
SF_B, SF_C, SF_L = 2, 3, 16
SF_BINS = SF_L // 2 + 1


class SpectralFilter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(SF_C, SF_BINS, 2))

    def forward(self, x):  # (B, C, L)
        f = torch.fft.rfft(x) * torch.view_as_complex(self.w)  # (B, C, L/2 + 1) complex
        return torch.fft.irfft(f, n=SF_L)


@seeded
def spectral():
    return SpectralFilter(), (torch.randn(SF_B, SF_C, SF_L),)


# LLaMA-like block written by hand: batch, length, width, heads, feed-forward
LL_B, LL_L, LL_D, LL_H, LL_F = 2, 4, 8, 2, 12
LL_DH = LL_D // LL_H
RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(LL_D))

    def forward(self, x):  # (B, L, D)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaBlock(nn.Module):
    """RMSNorm written out (pow, mean, add eps, rsqrt, two multiplies), rotary embeddings from cos / sin buffers
    (rotate_half by chunk, neg and cat), causal SDPA, SwiGLU feed-forward; no biases."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(), RMSNorm()
        self.q, self.k, self.v, self.o = (nn.Linear(LL_D, LL_D, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(LL_D, LL_F, bias=False), nn.Linear(LL_D, LL_F, bias=False)
        self.down = nn.Linear(LL_F, LL_D, bias=False)
        inv = 1.0 / 10000 ** (torch.arange(0, LL_DH, 2).float() / LL_DH)  # (Dh/2,)
        angles = torch.outer(torch.arange(LL_L).float(), inv)  # (L, Dh/2)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos())  # (L, Dh)
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

    def forward(self, x):  # (B, L, D)
        h = self.norm1(x)
        q, k, v = (f(h).view(LL_B, LL_L, LL_H, LL_DH).transpose(1, 2) for f in (self.q, self.k, self.v))
        q = q * self.cos + rotate_half(q) * self.sin  # (B, H, L, Dh)
        k = k * self.cos + rotate_half(k) * self.sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, Dh)
        x = x + self.o(a.transpose(1, 2).reshape(LL_B, LL_L, LL_D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


@seeded
def llama():
    return LlamaBlock(), (torch.randn(LL_B, LL_L, LL_D),)


MODELS = {"llama": (llama, True), "mamba": (mamba, True), "moe": (moe, True), "vit": (vit, True), "unet": (unet, True),
          "cells": (cells, True), "padded_mha": (padded_mha, True), "bags": (bags, True),
          "spectral": (spectral, True)}
CASES, IDS, profiled = setup_round(MODELS)
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::select_backward", "aten::slice_backward",
    "aten::new_zeros", "aten::zeros", "aten::index_select", "aten::index", "aten::nonzero", "aten::scatter",
    "aten::repeat", "aten::upsample_nearest2d", "aten::masked_fill_", "aten::arange", "aten::fill_",
    "aten::_local_scalar_dense",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- LLaMA-like block ---------------------------------------------------------------------------------------------
def test_llama_block_by_hand():
    """Two RMSNorms written out, each 4*N*D + 2*N (pow, mean's adds, x * r, * weight per element; + eps and rsqrt
    per row); q/k/v/o projections 4 * 2*N*D*D; rotary on q and k, 3.5*N*D each (the negated half, two multiplies,
    an add); causal SDPA half of 4*B*H*L*L*Dh; SwiGLU's gate, up and down 3 * 2*N*D*F, its SiLU and product N*F
    each; two residual adds: 10528. rotate_half's cat reads its two halves and writes q's size."""
    p, counts, _ = profiled("llama", False)
    n = LL_B * LL_L
    norms = 2 * (4 * n * LL_D + 2 * n)  # pow, mean's adds, x * r, * weight per element; + eps, rsqrt per row
    matmuls = 4 * 2 * n * LL_D * LL_D + 3 * 2 * n * LL_D * LL_F
    rotary = 2 * (n * LL_D // 2 + 3 * n * LL_D)
    sdpa = 4 * LL_B * LL_H * LL_L * LL_L * LL_DH * formulas.CAUSAL_FRACTION
    assert by_op(counts)[SDPA] == sdpa == 512
    assert flops_of(counts, MATMULS) == matmuls
    assert p.flops == norms + matmuls + rotary + sdpa + 2 * n * LL_F + 2 * n * LL_D == 10528
    # rotate_half's cat reads the two halves it joins (the negated one and a strided view of q) and writes q's size
    cat = rows_of(counts, "aten::cat")
    assert all((c.bytes_read, c.bytes_written) == (2 * n * LL_D * F32, 2 * n * LL_D * F32) for c in cat)
    rsqrt = one_row(counts, "aten::rsqrt")
    assert rsqrt.calls == 2 and rsqrt.flops == 2 * n


def test_llama_block_trained_causal_attention_and_norm_backward():
    """Trained: causal SDPA's backward 2.5x its halved forward; every projection's backward twice its forward."""
    _, counts, _ = profiled("llama", True)
    n = LL_B * LL_L
    matmuls = 4 * 2 * n * LL_D * LL_D + 3 * 2 * n * LL_D * LL_F
    assert by_op(counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * 512
    assert flops_of(counts, MATMULS) == 3 * matmuls


# --- Mamba ---------------------------------------------------------------------------------------------------------
MB_ROWS = MB_B * MB_L
MB_MATMULS = 2 * MB_ROWS * (MB_D * 2 * MB_E + MB_E * (MB_R + 2 * MB_N) + MB_R * MB_E + MB_E * MB_D)  # 4 linears
MB_CONV = conv(MB_B, MB_E, MB_E, MB_L + MB_K - 1, MB_K, groups=MB_E)  # depthwise, padded both sides: L + K - 1 out


def test_mamba_forward_by_hand():
    """4 linears as mm (4480); the depthwise conv over L + K - 1 = 8 positions with its bias (1152); per scan step
    eight (B, E, N) element-wise ops or reductions (dt*A, exp, dt*B, *x, dA*h, +dBx, h*C, sum over N: 8 * 48);
    7 element-wise ops over (B, L, E) (two SiLUs, dt's bias, softplus, x*D, + skip, the gate); A = -exp(a_log):
    8160 FLOPs. The depthwise conv reads its (B, E, L) input, (E, 1, K) weight and bias, writes (B, E, L + K - 1)."""
    p, counts, _ = profiled("mamba", False)
    scan = MB_L * 8 * MB_B * MB_E * MB_N
    pointwise = 7 * MB_ROWS * MB_E + 2 * MB_E * MB_N
    assert flops_of(counts, MATMULS) == MB_MATMULS == 4480
    assert by_op(counts)["aten::convolution"] == MB_CONV == 1152
    assert p.flops == MB_MATMULS + MB_CONV + scan + pointwise == 8160
    dw = one_row(counts, "aten::convolution")
    assert (dw.bytes_read, dw.bytes_written) == ((MB_B * MB_E * MB_L + MB_E * MB_K + MB_E) * F32,
                                                 MB_B * MB_E * (MB_L + MB_K - 1) * F32)
    # dt[:, t, :, None] * B[:, t, None, :]: two strided slices of one step read, (B, E, N) written, per step
    outer = one_row(counts, "aten::mul", ((MB_B, MB_E, 1), (MB_B, 1, MB_N)))
    assert outer.calls == MB_L and outer.flops == MB_L * MB_B * MB_E * MB_N
    assert outer.bytes_read == MB_L * MB_B * (MB_E + MB_N) * F32
    assert outer.bytes_written == MB_L * MB_B * MB_E * MB_N * F32


def test_mamba_trained_matmuls_and_grouped_conv_backward():
    """Trained: every linear's backward twice its forward, but in_proj's input gradient (u needs none): 3 * 4480 -
    1920; the depthwise conv's backward by its groups (input and weight gradients, a bias add per dy element: 2176),
    not as a dense conv (torch's own formula: 9216)."""
    _, counts, theirs = profiled("mamba", True)
    in_proj = 2 * MB_ROWS * MB_D * 2 * MB_E
    assert flops_of(counts, MATMULS) == 3 * MB_MATMULS - in_proj == 11520
    no_bias = MB_CONV - MB_B * MB_E * (MB_L + MB_K - 1)
    assert by_op(counts)["aten::convolution_backward"] == 2 * no_bias + MB_B * MB_E * (MB_L + MB_K - 1) == 2176
    assert theirs["aten::convolution_backward"] > 4 * by_op(counts)["aten::convolution_backward"]


# --- MoE -----------------------------------------------------------------------------------------------------------
def test_moe_by_hand_from_the_routing():
    """Router mm, its softmax, top-k's compares, three (T, K) equality tests; each routed token through its expert:
    up (2*D*H), GELU (H), down (2*H*D), the weighting (D) and the index_add_ (D): 144 a token, 12 tokens. Each
    index_add_ reads its index, its source and the rows it adds into, and writes those rows, not the (T, D) output."""
    p, counts, _ = profiled("moe", False)
    per_expert = moe_tokens_per_expert()
    assert sum(per_expert) == MOE_T * MOE_K and len(set(per_expert)) == 3  # three differently loaded experts
    per_token = 2 * MOE_D * MOE_H + MOE_H + 2 * MOE_H * MOE_D + MOE_D + MOE_D
    routing = 2 * MOE_T * MOE_D * MOE_E + SOFTMAX * MOE_T * MOE_E + MOE_T * MOE_E + MOE_E * MOE_T * MOE_K
    assert p.flops == routing + MOE_T * MOE_K * per_token == 2016
    for n in per_expert:
        add = one_row(counts, "aten::index_add_", ((MOE_T, MOE_D), (n,), (n, MOE_D)))
        assert add.flops == n * MOE_D
        assert (add.bytes_read, add.bytes_written) == (n * I64 + 2 * n * MOE_D * F32, n * MOE_D * F32)
        take = one_row(counts, "aten::index_select", ((MOE_T, MOE_D), (n,)))
        assert (take.bytes_read, take.bytes_written) == (n * MOE_D * F32 + n * I64, n * MOE_D * F32)


def test_moe_trained_every_expert_backward():
    """Trained: per routed token 2 matmuls forward (up, down) and 3 backward (down's input and weight gradients, up's
    weight gradient; up's input gradient is not formed: x needs none), 2*D*H each; the router's forward and its
    weight gradient: 4128."""
    _, counts, _ = profiled("moe", True)
    router = 2 * MOE_T * MOE_D * MOE_E
    assert flops_of(counts, MATMULS) == 2 * router + MOE_T * MOE_K * 5 * 2 * MOE_D * MOE_H == 4128


# --- ViT -----------------------------------------------------------------------------------------------------------
VT_ROWS = VT_B * VT_S
VT_PATCH = conv(VT_B, VT_C, VT_D, VT_N, VT_P * VT_P)


def _vit_block() -> tuple[int, int, int]:
    """(matmuls, attention, pointwise and norms) of the pre-norm encoder layer."""
    matmuls = 2 * VT_ROWS * (VT_D * 3 * VT_D + VT_D * VT_D + 2 * VT_D * VT_FF)
    sdpa = 4 * VT_B * VT_H * VT_S * VT_S * (VT_D // VT_H)
    rest = 2 * LN * VT_ROWS * VT_D + VT_ROWS * 3 * VT_D + VT_ROWS * VT_FF + 2 * VT_ROWS * VT_D  # in-proj bias, relu
    return matmuls, sdpa, rest


def test_vit_by_hand():
    """Patch conv (6208 with bias), the position add, the block (packed in-projection as mm plus its bias add, SDPA
    4*B*H*S*S*Dh, out-projection, two LayerNorms, FF with ReLU, two residuals), the final LayerNorm over the class
    tokens alone and the head: 20256. The class token concatenated is read as held (D floats, not B x D)."""
    p, counts, _ = profiled("vit", False)
    matmuls, sdpa, rest = _vit_block()
    head = LN * VT_B * VT_D + 2 * VT_B * VT_D * VT_CLS
    assert by_op(counts)["aten::convolution"] == VT_PATCH == 6208
    assert by_op(counts)[SDPA] == sdpa == 1600
    assert p.flops == VT_PATCH + VT_ROWS * VT_D + matmuls + sdpa + rest + head == 20256
    (cat,) = rows_of(counts, "aten::cat")
    assert (cat.bytes_read, cat.bytes_written) == ((VT_D + VT_B * VT_N * VT_D) * F32, VT_ROWS * VT_D * F32)
    patch = one_row(counts, "aten::convolution")
    assert patch.bytes_read == (VT_B * VT_C * VT_IMG**2 + VT_D * VT_C * VT_P**2 + VT_D) * F32


def test_vit_trained_patch_embedding_computes_no_image_gradient():
    """Trained: the patch conv's backward forms the weight gradient and the bias's, not the image's (it needs none):
    6208, once the forward's; SDPA's backward 2.5x its forward."""
    _, counts, _ = profiled("vit", True)
    assert by_op(counts)["aten::convolution_backward"] == VT_PATCH
    _, sdpa, _ = _vit_block()
    assert by_op(counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * sdpa == 4000


# --- U-Net ---------------------------------------------------------------------------------------------------------
UN_P, UN_Q = UN_S * UN_S, (UN_S // 2) ** 2  # positions at full and half resolution


def _unet_convs() -> dict[str, int]:
    return {
        "enc": conv(UN_B, UN_C, UN_W, UN_P, 9), "mid": conv(UN_B, UN_W, 2 * UN_W, UN_Q, 9),
        # transposed: 2 * N * numel(w) * input positions, + a bias add per output element
        "up": 2 * UN_B * (2 * UN_W * UN_W * 4) * UN_Q + UN_B * UN_W * UN_P,
        "dec": conv(UN_B, 2 * UN_W, UN_W, UN_P, 9), "out": conv(UN_B, UN_W, 1, UN_P, 1),
    }


def test_unet_by_hand():
    """Five convolutions (the transposed one by its input positions), GroupNorm and InstanceNorm (a batch norm over
    (1, B*C, H, W), batch statistics) 8 an element, the max pool's compares (4 per output), three ReLUs, the
    upsample-and-add (the nearest upsample a gather: 0): 139392. The skip concatenation moves both halves."""
    p, counts, _ = profiled("unet", False)
    convs = _unet_convs()
    assert by_op(counts)["aten::convolution"] == sum(convs.values()) == 130944
    full, half = UN_B * UN_W * UN_P, UN_B * 2 * UN_W * UN_Q
    norms = LN * full + BN_TRAIN * half
    assert by_op(counts)["aten::native_group_norm"] == LN * full
    assert by_op(counts)["aten::native_batch_norm"] == BN_TRAIN * half
    assert p.flops == sum(convs.values()) + norms + 4 * (full // 4) + (2 * full + half) + full == 139392
    (cat,) = rows_of(counts, "aten::cat")
    assert (cat.bytes_read, cat.bytes_written) == (2 * full * F32, 2 * full * F32)
    (up,) = rows_of(counts, "aten::upsample_nearest2d")
    assert up.flops == 0 and (up.bytes_read, up.bytes_written) == (UN_B * UN_W * UN_Q * F32, full * F32)


def test_unet_trained_input_conv_skips_the_image_gradient():
    """Trained: every conv's backward forms input and weight gradients (2x its bias-free forward) and a bias add per
    dy element, but the first, whose input (the image) needs no gradient: its weight gradient and bias alone."""
    _, counts, _ = profiled("unet", True)
    convs = _unet_convs()
    positions = {"enc": UN_P, "mid": UN_Q, "up": UN_P, "dec": UN_P, "out": UN_P}
    channels = {"enc": UN_W, "mid": 2 * UN_W, "up": UN_W, "dec": UN_W, "out": 1}
    bias = {k: UN_B * channels[k] * positions[k] for k in convs}
    want = sum((1 if k == "enc" else 2) * (convs[k] - bias[k]) + bias[k] for k in convs)
    assert by_op(counts)["aten::convolution_backward"] == want == 232320


# --- recurrent -----------------------------------------------------------------------------------------------------
def test_gru_cells_then_lstm_by_hand():
    """Per GRUCell step two addmm (input: 2*B*I*3H, hidden: 2*B*H*3H) and ten (B, H) element-wise ops (three gate
    adds, two sigmoids, two multiplies, the candidate's add and tanh, the update's subtract); the LSTM layer
    2*T*B*(4H*H + 4H*H) (one mkldnn_rnn_layer call); the head: 5540."""
    p, counts, _ = profiled("cells", False)
    gru = RC_T * (2 * RC_B * RC_I * 3 * RC_H + 2 * RC_B * RC_H * 3 * RC_H + 10 * RC_B * RC_H)
    lstm = 2 * RC_T * RC_B * (4 * RC_H * RC_H + 4 * RC_H * RC_H)
    assert by_op(counts)["aten::mkldnn_rnn_layer"] == lstm == 3200
    assert p.flops == gru + lstm + 2 * RC_B * RC_H == 5540
    layer = one_row(counts, "aten::mkldnn_rnn_layer")  # x, two weights, two biases, h0, c0; out, hy, cy
    weights = 2 * 4 * RC_H * RC_H + 2 * 4 * RC_H
    assert layer.bytes_read == (RC_B * RC_T * RC_H + weights + 2 * RC_B * RC_H) * F32
    assert layer.bytes_written == (RC_B * RC_T * RC_H + 2 * RC_B * RC_H) * F32


def test_lstm_trained_backward_is_twice_its_matmuls():
    _, counts, _ = profiled("cells", True)
    lstm = 2 * RC_T * RC_B * (4 * RC_H * RC_H + 4 * RC_H * RC_H)
    assert by_op(counts)["aten::mkldnn_rnn_layer_backward"] == formulas.MATMUL_BWD_OVER_FWD * lstm


# --- padded MHA ----------------------------------------------------------------------------------------------------
def test_padded_mha_counts_full_scores_and_reads_the_mask():
    """The key padding mask becomes a (B, 1, 1, L) float mask broadcast over heads: attention still forms every
    score (4*B*H*L*L*Dh), and SDPA reads q, k, v, the mask as held (B*L floats) and writes its output and
    log-sum-exp. In-projection (mm + bias add), out-projection: 6960."""
    p, counts, _ = profiled("padded_mha", False)
    dh = PM_E // PM_H
    sdpa = one_row(counts, SDPA)
    assert sdpa.flops == 4 * PM_B * PM_H * PM_L * PM_L * dh == 1600
    qkv = 3 * PM_B * PM_L * PM_E
    assert sdpa.bytes_read == (qkv + PM_B * PM_H * PM_L) * F32  # the mask expanded over heads: (B, H, 1, L) held
    assert p.flops == 2 * PM_B * PM_L * PM_E * 3 * PM_E + PM_B * PM_L * 3 * PM_E + 1600 + 2 * PM_B * PM_L * PM_E**2


# --- embedding bags ------------------------------------------------------------------------------------------------
def test_bags_skip_padding_entries_and_weigh_the_rest():
    """Sum bag with per-sample weights: each of the 5 non-padding entries a multiply and an add per column (40); it
    reads those 5 rows, the 7 ids, 2 offsets and 7 weights. Mean bag of (2, 3) ids: an add per looked-up element
    and a divide per output (32). The head: 32. 104 in all."""
    p, counts, _ = profiled("bags", False)
    valid = sum(i != 0 for i in EB_IDS)
    weighted = one_row(counts, "aten::_embedding_bag", ((EB_ROWS, EB_D), (len(EB_IDS),), (2,), (len(EB_IDS),)))
    assert weighted.flops == 2 * valid * EB_D == 40
    assert weighted.bytes_read == valid * EB_D * F32 + len(EB_IDS) * I64 + 2 * I64 + len(EB_IDS) * F32
    mean = one_row(counts, "aten::_embedding_bag", ((EB_ROWS, EB_D), (6,), (2,)))
    assert mean.flops == 6 * EB_D + 2 * EB_D
    assert p.flops == 40 + 32 + 2 * 2 * 2 * EB_D == 104


# --- spectral filter -----------------------------------------------------------------------------------------------
def test_spectral_filter_by_hand():
    """rfft of B*C signals of L points (half of 5 L log2 L each: 960), the complex product (6 a bin: 324), irfft
    (960 and its 1/L normalisation, one multiply per real output: 96): 2340. The product reads the complex spectrum
    (8 bytes a bin) and the weight as its parameter holds it (C x bins x 2 floats)."""
    p, counts, _ = profiled("spectral", False)
    signals = SF_B * SF_C
    fft = signals * formulas.fft_flops(SF_L, real=True)
    assert by_op(counts)["aten::_fft_r2c"] == fft == 960
    assert by_op(counts)["aten::_fft_c2r"] == fft + signals * SF_L == 1056
    product = one_row(counts, "aten::mul")
    assert product.flops == formulas.COMPLEX_MUL_FLOPS * signals * SF_BINS == 324
    assert (product.bytes_read, product.bytes_written) == ((signals + SF_C) * SF_BINS * 8, signals * SF_BINS * 8)
    assert p.flops == 2340


def test_spectral_trained_weight_gradient_is_a_complex_product():
    """Trained: irfft's backward is an rfft of dy (960) plus its 1/L scaling of each complex output (real and
    imaginary: 2 per bin); the weight's gradient a complex product with the spectrum's conjugate (6 a bin)."""
    _, counts, _ = profiled("spectral", True)
    signals = SF_B * SF_C
    fft = signals * formulas.fft_flops(SF_L, real=True)
    assert by_op(counts)["aten::_fft_r2c"] == 2 * fft + 2 * signals * SF_BINS
    products = [c for c in rows_of(counts, "aten::mul")]
    assert sum(c.flops for c in products) == 2 * formulas.COMPLEX_MUL_FLOPS * signals * SF_BINS
