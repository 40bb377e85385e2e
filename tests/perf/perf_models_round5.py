"""A fifth round of models the profiler was not written against (tests/perf/test_profile_unseen_round5.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round5.py:fno --device cpu --train

Each builder returns ``(model, inputs)``. The families are those rounds 1-4 leave out: a Fourier neural operator
layer (rfft2, a complex einsum on the kept modes, irfft2), an S4D long convolution (complex exponentials, an FFT
convolution), a spectrogram front end (stft, mel matmul), nn.MultiheadAttention with padding and causal masks and
cross-attention of other widths, expert-choice mixture of experts (top-k over tokens, batched experts, index_add_),
a channels-last ConvNeXt block, a channels-last U-Net with transposed convolutions and GroupNorm, a diffusion
denoiser (sinusoidal timestep, FiLM, self- and masked cross-attention by SDPA), GraphSAGE/EdgeConv message passing
(scatter_reduce mean and amax), projected bidirectional LSTMs with GRU and ReLU RNNs, an einsum of many layouts, a
statically int8-quantized convnet, a physics-informed net (autograd.grad with create_graph inside forward), a
MAML inner step (foreach updates under record_function, functional_call), a vmapped ensemble (torch.func), a bf16
autocast model, a VAE with torch.distributions, a linear-algebra head (eig, pinv, lstsq, QR, LU, Householder),
self-attention over a jagged nested tensor, a graph convolution on a sparse COO adjacency, FlexAttention, and a
Jacobian-vector product by forward-mode AD.
Sizes are tiny: what is checked is the counting, not the speed.
"""

from __future__ import annotations

import math

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH = 2
# FNO: channels in, width, grid side, kept modes per dim
FNO_IN, FNO_WIDTH, FNO_SIDE, FNO_MODES = 3, 8, 16, 4
# S4D: model width (independent channels), state size (complex modes), sequence length
S4_H, S4_N, S4_L = 4, 6, 32
# Spectrogram: samples, FFT size, hop, mel bins, conv channels
SPEC_SAMPLES, SPEC_FFT, SPEC_HOP, SPEC_MELS, SPEC_CH = 128, 32, 8, 10, 6
# Multi-head attention: width, heads, query length, memory length, memory key/value widths
MHA_DIM, MHA_HEADS, MHA_Q, MHA_KV, MHA_KDIM, MHA_VDIM = 16, 4, 6, 5, 12, 10
# Expert choice: tokens, width, hidden, experts, tokens each expert takes
EC_TOKENS, EC_DIM, EC_HIDDEN, EC_EXPERTS, EC_CAPACITY = 12, 8, 16, 4, 3
# ConvNeXt: channels, image side (stem halves it), depthwise kernel
CN_CH, CN_SIDE, CN_KERNEL = 8, 16, 7
# U-Net: channels, image side, GroupNorm groups
UN_CH, UN_SIDE, UN_GROUPS = 8, 8, 4
# Denoiser: tokens, width, heads, context tokens, context width, timestep embedding width
DN_TOKENS, DN_DIM, DN_HEADS, DN_CTX, DN_CTX_DIM, DN_T = 6, 16, 2, 5, 12, 8
# Graph: nodes, edges, features
GS_NODES, GS_EDGES, GS_FEAT = 9, 24, 6
# Recurrent: sequence, input width, hidden, projection
R_SEQ, R_IN, R_HIDDEN, R_PROJ = 5, 6, 8, 4
# Quantized convnet: channels, image side
Q_CH, Q_SIDE = 8, 8
# PINN: collocation points, width
PINN_POINTS, PINN_WIDTH = 10, 16
# MAML: support examples, query examples, width, hidden, inner learning rate
MAML_SUPPORT, MAML_QUERY, MAML_IN, MAML_HIDDEN, MAML_LR = 5, 7, 4, 8, 0.1
# Ensemble: members, batch, width, hidden
ENS_MEMBERS, ENS_BATCH, ENS_IN, ENS_HIDDEN = 3, 4, 6, 10
# Autocast: rows, width; image channels and side
AC_ROWS, AC_DIM, AC_CH, AC_SIDE = 4, 16, 3, 8
# VAE: batch, data width, latent width, categories
VAE_IN, VAE_LATENT, VAE_CATS = 12, 4, 5
# Linear algebra: matrix side, tall rows, right-hand sides
LA_N, LA_M, LA_K = 6, 9, 2
# Jagged attention: sequence lengths, width, heads
J_LENGTHS, J_DIM, J_HEADS = (3, 5, 2), 16, 2
# Sparse GCN: nodes, edges (stored elements of the adjacency), features in and out
SG_NODES, SG_EDGES, SG_IN, SG_OUT = 8, 20, 6, 4
# FlexAttention: tokens, width, heads
FX_TOKENS, FX_DIM, FX_HEADS = 8, 16, 2
# Forward-mode AD: rows, width in, hidden, out
JVP_ROWS, JVP_IN, JVP_HIDDEN, JVP_OUT = 3, 4, 8, 2


class FNOLayer(nn.Module):
    """One Fourier layer of an FNO on a (B, S, S, C) grid: lift to the width, rfft2, multiply the lowest modes of
    both signs of the first frequency by complex weights (einsum over channels), irfft2, plus a 1x1 convolution,
    GELU, project to one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Linear(FNO_IN, FNO_WIDTH)
        scale = 1 / FNO_WIDTH**2
        shape = (FNO_WIDTH, FNO_WIDTH, FNO_MODES, FNO_MODES)
        self.w_low = nn.Parameter(scale * torch.randn(*shape, dtype=torch.cfloat))
        self.w_high = nn.Parameter(scale * torch.randn(*shape, dtype=torch.cfloat))
        self.pointwise = nn.Conv2d(FNO_WIDTH, FNO_WIDTH, 1)
        self.project = nn.Linear(FNO_WIDTH, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # (B, S, S, C_in)
        x = self.lift(grid).permute(0, 3, 1, 2)  # (B, W, S, S)
        x_ft = torch.fft.rfft2(x)  # (B, W, S, S // 2 + 1) complex
        m = FNO_MODES
        out_ft = torch.zeros_like(x_ft)
        out_ft[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m, :m], self.w_low)
        out_ft[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m:, :m], self.w_high)
        spectral = torch.fft.irfft2(out_ft, s=x.shape[-2:])  # (B, W, S, S)
        x = F.gelu(spectral + self.pointwise(x))
        return self.project(x.permute(0, 2, 3, 1))  # (B, S, S, 1)


class S4DConv(nn.Module):
    """S4D: per channel h, a diagonal state space of N complex modes A_n = -exp(a_n) + i b_n gives the kernel
    K_h[l] = 2 Re(sum_n C_n B_n (exp(dt A_n l))), applied as a causal convolution by FFT of length 2L."""

    def __init__(self) -> None:
        super().__init__()
        self.log_re = nn.Parameter(torch.log(0.5 * torch.ones(S4_H, S4_N)))
        self.im = nn.Parameter(math.pi * torch.arange(S4_N, dtype=torch.float32).repeat(S4_H, 1))
        self.c = nn.Parameter(torch.randn(S4_H, S4_N, dtype=torch.cfloat))
        self.log_dt = nn.Parameter(torch.full((S4_H,), math.log(0.05)))
        self.d = nn.Parameter(torch.ones(S4_H))
        self.out = nn.Linear(S4_H, S4_H)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, H, L)
        length = u.shape[-1]
        a = torch.complex(-torch.exp(self.log_re), self.im)  # (H, N)
        dt_a = a * torch.exp(self.log_dt)[:, None]  # (H, N)
        powers = torch.exp(dt_a[:, :, None] * torch.arange(length, device=u.device))  # (H, N, L)
        kernel = 2 * torch.einsum("hn,hnl->hl", self.c, powers).real  # (H, L)
        k_f = torch.fft.rfft(kernel, n=2 * length)  # (H, L + 1)
        u_f = torch.fft.rfft(u, n=2 * length)  # (B, H, L + 1)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]  # (B, H, L)
        y = y + self.d[:, None] * u
        return self.out(F.gelu(y).transpose(1, 2))  # (B, L, H)


class Spectrogram(nn.Module):
    """An audio front end: a centred stft (Hann window, reflect padding), power, a mel filter bank by matmul,
    log, a Conv1d over time, mean pooled, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        bins = SPEC_FFT // 2 + 1
        self.register_buffer("window", torch.hann_window(SPEC_FFT))
        self.register_buffer("mel", torch.rand(bins, SPEC_MELS))
        self.conv = nn.Conv1d(SPEC_MELS, SPEC_CH, 3, padding=1)
        self.head = nn.Linear(SPEC_CH, 3)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # (B, T)
        spec = torch.stft(audio, SPEC_FFT, hop_length=SPEC_HOP, window=self.window, return_complex=True)
        power = spec.abs().pow(2)  # (B, F, frames)
        mel = torch.log(power.transpose(1, 2) @ self.mel + 1e-6)  # (B, frames, M)
        return self.head(F.relu(self.conv(mel.transpose(1, 2))).mean(-1))


class MaskedMHA(nn.Module):
    """nn.MultiheadAttention twice: causal self-attention with a key padding mask (one packed in-projection, the
    weights averaged over heads), then cross-attention to a memory whose keys and values have their own widths
    (three in-projections), without weights."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(MHA_DIM, MHA_HEADS, batch_first=True)
        self.cross = nn.MultiheadAttention(MHA_DIM, MHA_HEADS, kdim=MHA_KDIM, vdim=MHA_VDIM, batch_first=True)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor
                ) -> torch.Tensor:
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        h, _ = self.self_attn(x, x, x, key_padding_mask=padding, attn_mask=causal)
        out, _ = self.cross(h, keys, values, need_weights=False)
        return out


class ExpertChoice(nn.Module):
    """Expert-choice routing: each of E experts takes its C best tokens (top-k over tokens of the softmax router
    scores), runs them through its own MLP as one batched matmul over experts, and adds them back weighted by
    their scores (index_add_)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(EC_DIM, EC_EXPERTS, bias=False)
        self.w_in = nn.Parameter(torch.randn(EC_EXPERTS, EC_DIM, EC_HIDDEN) / EC_DIM**0.5)
        self.w_out = nn.Parameter(torch.randn(EC_EXPERTS, EC_HIDDEN, EC_DIM) / EC_HIDDEN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D)
        scores = self.router(x).softmax(-1)  # (T, E)
        gate, token = scores.t().topk(EC_CAPACITY, dim=-1)  # (E, C) each
        picked = x[token]  # (E, C, D)
        y = torch.bmm(F.gelu(torch.bmm(picked, self.w_in)), self.w_out) * gate[..., None]  # (E, C, D)
        return torch.zeros_like(x).index_add_(0, token.reshape(-1), y.reshape(-1, EC_DIM))


class ConvNeXtBlock(nn.Module):
    """A channels-last ConvNeXt: a 2x2 stride-2 stem, a depthwise 7x7 convolution, LayerNorm over channels
    (NHWC), an inverted MLP with GELU, a layer scale and a residual; mean pooled, normalised, classified."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, CN_CH, 2, stride=2)
        self.dw = nn.Conv2d(CN_CH, CN_CH, CN_KERNEL, padding=CN_KERNEL // 2, groups=CN_CH)
        self.norm = nn.LayerNorm(CN_CH)
        self.up = nn.Linear(CN_CH, 4 * CN_CH)
        self.down = nn.Linear(4 * CN_CH, CN_CH)
        self.gamma = nn.Parameter(1e-2 * torch.ones(CN_CH))
        self.head_norm = nn.LayerNorm(CN_CH)
        self.head = nn.Linear(CN_CH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S), channels_last
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)  # (B, S/2, S/2, C)
        y = self.gamma * self.down(F.gelu(self.up(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean((-2, -1))))


class TransposedUNet(nn.Module):
    """A two-level channels-last U-Net: conv, GroupNorm, SiLU, a stride-2 conv down, a transposed stride-2 conv
    up, the skip concatenated, a 1x1 conv out."""

    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Conv2d(3, UN_CH, 3, padding=1)
        self.norm1 = nn.GroupNorm(UN_GROUPS, UN_CH)
        self.down = nn.Conv2d(UN_CH, 2 * UN_CH, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(UN_GROUPS, 2 * UN_CH)
        self.up = nn.ConvTranspose2d(2 * UN_CH, UN_CH, 2, stride=2)
        self.out = nn.Conv2d(2 * UN_CH, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S)
        skip = F.silu(self.norm1(self.inc(x)))  # (B, C, S, S)
        h = F.silu(self.norm2(self.down(skip)))  # (B, 2C, S/2, S/2)
        return self.out(torch.cat([self.up(h), skip], 1))  # (B, 3, S, S)


def timestep_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) -> (B, width): sin and cos of t at width/2 geometric frequencies."""
    freqs = torch.exp(-math.log(10000) * torch.arange(width // 2, device=t.device) / (width // 2))
    angles = t[:, None] * freqs  # (B, width / 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


class Denoiser(nn.Module):
    """A diffusion transformer block: the timestep's sinusoidal embedding through an MLP gives a FiLM scale and
    shift; SDPA self-attention, then SDPA cross-attention to a padded text context (boolean mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.t_mlp = nn.Sequential(nn.Linear(DN_T, DN_DIM), nn.SiLU(), nn.Linear(DN_DIM, 2 * DN_DIM))
        self.norm = nn.LayerNorm(DN_DIM, elementwise_affine=False)
        self.qkv = nn.Linear(DN_DIM, 3 * DN_DIM)
        self.q = nn.Linear(DN_DIM, DN_DIM)
        self.kv = nn.Linear(DN_CTX_DIM, 2 * DN_DIM)
        self.out = nn.Linear(DN_DIM, DN_DIM)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
        return x.unflatten(-1, (DN_HEADS, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        scale, shift = self.t_mlp(timestep_embedding(t, DN_T)).chunk(2, -1)  # (B, D) each
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = (self._heads(z) for z in self.qkv(h).chunk(3, -1))
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        k, v = (self._heads(z) for z in self.kv(ctx).chunk(2, -1))
        mask = ctx_mask[:, None, None, :]  # (B, 1, 1, N_ctx): padded context tokens are not attended to
        cross = F.scaled_dot_product_attention(self._heads(self.q(h)), k, v, attn_mask=mask)
        return self.out(h + cross.transpose(1, 2).flatten(2))


class GraphSage(nn.Module):
    """Message passing on an edge list (src, dst): EdgeConv messages MLP([x_dst, x_src - x_dst]) reduced by
    max at each destination (scatter_reduce amax), neighbours' features averaged (scatter_reduce mean), and the
    update Linear([x, mean, max])."""

    def __init__(self) -> None:
        super().__init__()
        self.message = nn.Linear(2 * GS_FEAT, GS_FEAT)
        self.update = nn.Linear(3 * GS_FEAT, GS_FEAT)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:  # (N, F), (2, E)
        src, dst = edges
        x_src, x_dst = x.index_select(0, src), x.index_select(0, dst)  # (E, F)
        msg = F.relu(self.message(torch.cat([x_dst, x_src - x_dst], -1)))  # (E, F)
        index = dst[:, None].expand(-1, GS_FEAT)
        most = x.new_zeros(x.shape).scatter_reduce(0, index, msg, "amax", include_self=False)
        mean = x.new_zeros(x.shape).scatter_reduce(0, index, x_src, "mean", include_self=False)
        return self.update(torch.cat([x, mean, most], -1))


class ProjectedRecurrents(nn.Module):
    """A bidirectional two-layer LSTM with a projection (proj_size), a bidirectional two-layer GRU and a ReLU
    Elman RNN, stacked."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(R_IN, R_HIDDEN, num_layers=2, proj_size=R_PROJ, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * R_PROJ, R_HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.rnn = nn.RNN(2 * R_HIDDEN, R_HIDDEN, nonlinearity="relu", batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, I)
        return self.rnn(self.gru(self.lstm(x)[0])[0])[0]


class EinsumLayouts(nn.Module):
    """einsum in many operand layouts: attention scores over a transposed key, an ellipsis batch, a batched dot,
    an outer product, a three-operand chain, a bilinear form and a trace of a product."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 5))
        self.u = nn.Parameter(torch.randn(5, 5))
        self.v = nn.Parameter(torch.randn(5, 3))

    def forward(self, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # q (B, H, N, D), k (B, N, H, D) (another layout), x (B, 2, 4, 8)
        scores = torch.einsum("bhnd,bmhd->bhnm", q, k)  # (B, H, N, N)
        y = torch.einsum("...i,ij->...j", x, self.w)  # (B, 2, 4, 5)
        dots = torch.einsum("bcpj,bcpj->bcp", y, y)  # (B, 2, 4)
        outer = torch.einsum("bcp,j->bcpj", dots, self.v[:, 0])  # (B, 2, 4, 5)
        chain = torch.einsum("...i,ij,jk->...k", outer, self.u, self.v)  # (B, 2, 4, 3)
        form = torch.einsum("bcpi,ij,bcpj->bcp", y, self.u, y)  # (B, 2, 4)
        trace = torch.einsum("ij,ji->", self.u, self.u)
        return scores.sum() + chain.sum() + form.sum() + trace


class QuantConvNet(nn.Module):
    """A convnet for static int8 quantization (eager mode): conv + ReLU (fused), a grouped conv, an adaptive
    average pool, a linear, between a quantize and a dequantize stub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, Q_CH, 3)
        self.relu = nn.ReLU()
        self.grouped = nn.Conv2d(Q_CH, Q_CH, 3, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(Q_CH, 4)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.relu(self.conv(self.quant(x))))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


class Pinn(nn.Module):
    """A physics-informed net for Burgers' equation: u(x, t) by a tanh MLP; u_t, u_x and u_xx by autograd.grad
    with create_graph inside forward; the mean squared residual u_t + u u_x - nu u_xx."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, PINN_WIDTH), nn.Tanh(), nn.Linear(PINN_WIDTH, PINN_WIDTH), nn.Tanh(),
                                 nn.Linear(PINN_WIDTH, 1))

    def forward(self, xt: torch.Tensor) -> torch.Tensor:  # (P, 2)
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            u = self.net(xt)  # (P, 1)
            (du,) = torch.autograd.grad(u.sum(), xt, create_graph=True)  # (P, 2)
            (d2u,) = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)
        residual = du[:, 1] + u[:, 0] * du[:, 0] - 0.01 * d2u[:, 0]
        return residual.pow(2).mean()


class Maml(nn.Module):
    """A MAML inner step: the support loss's gradients (create_graph), fast weights by a foreach update under a
    record_function range, the query loss through torch.func.functional_call with the fast weights."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(MAML_IN, MAML_HIDDEN), nn.ReLU(), nn.Linear(MAML_HIDDEN, 1))

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        names, params = zip(*self.net.named_parameters(), strict=True)
        with torch.enable_grad():
            support = F.mse_loss(self.net(xs), ys)
            grads = torch.autograd.grad(support, params, create_graph=True)
        with torch.profiler.record_function("maml_inner_step"):
            fast = torch._foreach_add(list(params), list(grads), alpha=-MAML_LR)
        query = torch.func.functional_call(self.net, dict(zip(names, fast, strict=True)), (xq,))
        return F.mse_loss(query, yq)


class Ensemble(nn.Module):
    """E MLPs run as one by torch.func: their parameters stacked, vmap over functional_call."""

    def __init__(self) -> None:
        super().__init__()
        members = [nn.Sequential(nn.Linear(ENS_IN, ENS_HIDDEN), nn.ReLU(), nn.Linear(ENS_HIDDEN, 1))
                   for _ in range(ENS_MEMBERS)]
        params, _ = torch.func.stack_module_state(members)
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in params.items()})
        self.names = list(params)
        self.base = [members[0]]  # the architecture, kept out of the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, I) -> (E, B, 1)
        stacked = {k: self.params[k.replace(".", "_")] for k in self.names}

        def one(p: dict, inputs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base[0], p, (inputs,))

        return torch.func.vmap(one, in_dims=(0, None))(stacked, x)


class Autocast(nn.Module):
    """fp32 parameters run under CPU autocast to bf16: a linear and a convolution in bf16 (their operands cast),
    a layer norm kept in fp32, a matmul of the two results."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(AC_DIM, AC_DIM)
        self.norm = nn.LayerNorm(AC_DIM)
        self.conv = nn.Conv2d(AC_CH, AC_DIM, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.norm(self.lin(x))  # (R, D) fp32: layer_norm autocasts to fp32
            feat = self.conv(img).flatten(2).mean(-1)  # (B, D) bf16
            return h @ feat.t()  # (R, B) bf16


class VAE(nn.Module):
    """A VAE head with torch.distributions: a Normal posterior sampled by rsample, its log-density and KL to a
    standard Normal, a Bernoulli likelihood from logits, a Categorical prior over clusters with its entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(VAE_IN, 2 * VAE_LATENT)
        self.dec = nn.Linear(VAE_LATENT, VAE_IN)
        self.cluster = nn.Linear(VAE_LATENT, VAE_CATS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, I) in [0, 1]
        mu, log_sigma = self.enc(x).chunk(2, -1)
        # validate_args=True: the argument checks (aten::_is_all_true) run whatever the process-wide default is
        # (Distribution.set_default_validate_args: a library imported earlier in a test session may turn it off)
        posterior = torch.distributions.Normal(mu, log_sigma.exp(), validate_args=True)
        z = posterior.rsample()
        prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=True)
        kl = torch.distributions.kl_divergence(posterior, prior).sum(-1)
        likelihood = torch.distributions.Bernoulli(logits=self.dec(z), validate_args=True).log_prob(x).sum(-1)
        clusters = torch.distributions.Categorical(logits=self.cluster(z), validate_args=True)
        return (kl - likelihood + posterior.log_prob(z).sum(-1) - clusters.entropy()).mean()


class LinalgHead(nn.Module):
    """Dense linear algebra on a learned square matrix and tall features: eigenvalues of a general matrix (eig),
    a pseudo-inverse, least squares, a QR factor and its Householder product, an LU factorisation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(LA_N, LA_N))

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (M, N), (M, K)
        eigvals, eigvecs = torch.linalg.eig(self.a)
        pinv = torch.linalg.pinv(feats)  # (N, M)
        solution = torch.linalg.lstsq(feats, targets).solution  # (N, K)
        reflectors, tau = torch.geqrf(feats)
        q = torch.linalg.householder_product(reflectors, tau)  # (M, N)
        p, lower, upper = torch.linalg.lu(self.a)
        return (eigvals.real.sum() + eigvecs.abs().sum() + pinv.sum() + solution.sum() + q.sum() + lower.sum()
                + upper.sum() + p.sum())


class JaggedAttention(nn.Module):
    """Self-attention over a ragged batch held as a jagged nested tensor (torch.nested, layout=torch.jagged): q, k,
    v projections of every token, SDPA within each sequence (on a CPU, the math path over a strided nested tensor),
    an out-projection; the tokens returned packed, (total tokens, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(J_DIM, J_DIM) for _ in range(3))
        self.out = nn.Linear(J_DIM, J_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, j, D) jagged
        q, k, v = (proj(x).unflatten(-1, (J_HEADS, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)  # (B, j, D)
        return self.out(attended).values()  # (total tokens, D)


class SparseGCN(nn.Module):
    """A graph convolution on a sparse COO adjacency: degrees by torch.sparse.sum, edge weights normalised by
    torch.sparse.softmax over each row, aggregation by torch.sparse.mm of the projected features."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SG_IN, SG_OUT)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:  # (N, F), (N, N) sparse COO
        degree = torch.sparse.sum(adj, 1).to_dense()  # (N,)
        weights = torch.sparse.softmax(adj, 1)  # (N, N) sparse, the same pattern
        return torch.sparse.mm(weights, self.lin(x)) * degree[:, None]  # (N, F_out)


class FlexAttention(nn.Module):
    """Attention through torch.nn.attention.flex_attention (a higher-order op; eager on a CPU: its math over the
    full score matrix) with an ALiBi-like score_mod, a slope per head times the query-key distance."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(FX_DIM, 3 * FX_DIM)
        self.out = nn.Linear(FX_DIM, FX_DIM)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, FX_HEADS + 1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = (z.unflatten(-1, (FX_HEADS, -1)).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        slopes = self.slopes

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()

        return self.out(flex_attention(q, k, v, score_mod=alibi).transpose(1, 2).flatten(2))


class ForwardModeAD(nn.Module):
    """A Jacobian-vector product of an MLP by forward-mode AD (torch.func.jvp): the output and its directional
    derivative along ``direction``, in one pass of dual tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(JVP_IN, JVP_HIDDEN), nn.Tanh(), nn.Linear(JVP_HIDDEN, JVP_OUT))

    def forward(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        out, tangent = torch.func.jvp(self.net, (x,), (direction,))
        return out + tangent




@seeded
def fno():
    return FNOLayer(), (torch.randn(BATCH, FNO_SIDE, FNO_SIDE, FNO_IN),)


@seeded
def s4d():
    return S4DConv(), (torch.randn(BATCH, S4_H, S4_L),)


@seeded
def spectrogram():
    return Spectrogram(), (torch.randn(BATCH, SPEC_SAMPLES),)


@seeded
def masked_mha():
    padding = torch.zeros(BATCH, MHA_Q, dtype=torch.bool)
    padding[1, -2:] = True  # the second sequence is two tokens shorter
    return MaskedMHA(), (torch.randn(BATCH, MHA_Q, MHA_DIM), torch.randn(BATCH, MHA_KV, MHA_KDIM),
                         torch.randn(BATCH, MHA_KV, MHA_VDIM), padding)


@seeded
def expert_choice():
    return ExpertChoice(), (torch.randn(EC_TOKENS, EC_DIM),)


@seeded
def convnext():
    model = ConvNeXtBlock().to(memory_format=torch.channels_last)
    return model, (torch.randn(BATCH, 3, CN_SIDE, CN_SIDE).to(memory_format=torch.channels_last),)


@seeded
def transposed_unet():
    model = TransposedUNet().to(memory_format=torch.channels_last)
    return model, (torch.randn(BATCH, 3, UN_SIDE, UN_SIDE).to(memory_format=torch.channels_last),)


@seeded
def denoiser():
    ctx_mask = torch.ones(BATCH, DN_CTX, dtype=torch.bool)
    ctx_mask[0, -2:] = False  # the first prompt is two tokens shorter
    return Denoiser(), (torch.randn(BATCH, DN_TOKENS, DN_DIM), torch.tensor([10.0, 500.0]),
                        torch.randn(BATCH, DN_CTX, DN_CTX_DIM), ctx_mask)


def graph_edges() -> torch.Tensor:
    """(2, E) edges with every node a destination at least once (no empty segment)."""
    extra = torch.randint(0, GS_NODES, (2, GS_EDGES - GS_NODES))
    ring = torch.stack([torch.arange(GS_NODES).roll(1), torch.arange(GS_NODES)])
    return torch.cat([ring, extra], 1)


@seeded
def graph_sage():
    return GraphSage(), (torch.randn(GS_NODES, GS_FEAT), graph_edges())


@seeded
def projected_recurrents():
    return ProjectedRecurrents(), (torch.randn(BATCH, R_SEQ, R_IN),)


@seeded
def einsum_layouts():
    return EinsumLayouts(), (torch.randn(BATCH, 2, 4, 3), torch.randn(BATCH, 4, 2, 3), torch.randn(BATCH, 2, 4, 8))


@seeded
def quantized_convnet():
    """QuantConvNet statically quantized to int8 (x86 engine): observed on one batch, converted."""
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    model = QuantConvNet().eval()
    model.qconfig = torch.ao.quantization.get_default_qconfig(torch.backends.quantized.engine)
    model = torch.ao.quantization.fuse_modules(model, [["conv", "relu"]])
    torch.ao.quantization.prepare(model, inplace=True)
    model(torch.randn(4, 3, Q_SIDE, Q_SIDE))
    torch.ao.quantization.convert(model, inplace=True)
    return model, (torch.randn(BATCH, 3, Q_SIDE, Q_SIDE),)


@seeded
def pinn():
    return Pinn(), (torch.rand(PINN_POINTS, 2),)


@seeded
def maml():
    return Maml(), (torch.randn(MAML_SUPPORT, MAML_IN), torch.randn(MAML_SUPPORT, 1), torch.randn(MAML_QUERY, MAML_IN),
                    torch.randn(MAML_QUERY, 1))


@seeded
def ensemble():
    return Ensemble(), (torch.randn(ENS_BATCH, ENS_IN),)


@seeded
def autocast_bf16():
    return Autocast(), (torch.randn(AC_ROWS, AC_DIM), torch.randn(BATCH, AC_CH, AC_SIDE, AC_SIDE))


@seeded
def vae():
    return VAE(), (torch.rand(BATCH, VAE_IN).round(),)


@seeded
def linalg_head():
    return LinalgHead(), (torch.randn(LA_M, LA_N), torch.randn(LA_M, LA_K))


@seeded
def jagged_attention():
    tokens = [torch.randn(n, J_DIM) for n in J_LENGTHS]
    return JaggedAttention(), (torch.nested.nested_tensor(tokens, layout=torch.jagged),)


@seeded
def sparse_gcn():
    cells = torch.randperm(SG_NODES * SG_NODES)[:SG_EDGES]
    indices = torch.stack([cells // SG_NODES, cells % SG_NODES])
    adj = torch.sparse_coo_tensor(indices, torch.rand(SG_EDGES), (SG_NODES, SG_NODES)).coalesce()
    return SparseGCN(), (torch.randn(SG_NODES, SG_IN), adj)


@seeded
def flex():
    return FlexAttention(), (torch.randn(BATCH, FX_TOKENS, FX_DIM),)


@seeded
def forward_mode_ad():
    return ForwardModeAD(), (torch.randn(JVP_ROWS, JVP_IN), torch.randn(JVP_ROWS, JVP_IN))


# name -> (builder, whether a backward step makes sense)
MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (fno, True),
        (s4d, True),
        (spectrogram, True),
        (masked_mha, True),
        (expert_choice, True),
        (convnext, True),
        (transposed_unet, True),
        (denoiser, True),
        (graph_sage, True),
        (projected_recurrents, True),
        (einsum_layouts, True),
        (quantized_convnet, False),
        (pinn, True),
        (maml, True),
        (ensemble, True),
        (autocast_bf16, True),
        (vae, True),
        (linalg_head, False),  # eig's backward is complex-valued; a forward is what is profiled
        (jagged_attention, True),
        (sparse_gcn, True),
        (flex, False),  # FlexAttention has no backward on a CPU
        (forward_mode_ad, True),
    )
}
build = fno
