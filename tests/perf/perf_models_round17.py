"""Seventeenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round17*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round17.py:retnet_chunk --device cpu --train

The families rounds 1-16 leave out (or take another way): mixture-of-depths routed by torch.topk, its tokens taken by
torch.gather and put back by an out-of-place Tensor.scatter (round 9 took them by index and scatter_add); RetNet's
chunkwise recurrent retention (decays from a torch.cumsum of log-decays, a state carried chunk to chunk; round 9 had
the parallel form); a neural ODE by 500 explicit Euler steps (about 3500 small ATen ops a step: the call tree's
many-ops path); PointNet with an input T-Net (a learned 3x3 transform applied by bmm), a feature T-Net with its
orthogonality penalty and torch.max over points returning values and indices; a two-stage residual vector quantizer
(torch.cdist by its direct and its matmul path, argmin, F.embedding, straight-through, commitment losses); SigLIP's
pairwise sigmoid loss with a learned temperature and bias; a GShard-style top-1 mixture of experts dispatching and
combining by dense one-hot einsums under a capacity; a Hyena operator (an implicit filter by an MLP with sin over
positions, an exponential window, a short depthwise convolution, an FFT long convolution by rfft / irfft of 2L
points, gates); ResMLP (Affine layers by torch.addcmul, cross-patch linears on transposed patches, layer scales);
a learned complex rotation (torch.polar of a learned angle, view_as_complex, backward through both); a block under
*selective* activation checkpointing (create_selective_checkpoint_contexts: matmuls saved, the rest recomputed); and
a sequence-first nn.MultiheadAttention without biases returning head-averaged weights under a float key padding
mask and a per-head boolean attention mask.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# mixture-of-depths: batch, tokens, width, tokens routed through the block, MLP width
MD_BATCH, MD_T, MD_DIM, MD_K, MD_HIDDEN = 2, 8, 4, 3, 8
# chunkwise retention: batch, tokens, width, chunk, decay
RC_BATCH, RC_T, RC_DIM, RC_CHUNK, RC_GAMMA = 2, 8, 4, 4, 0.9
# Euler ODE: batch, width, steps, step size, decay
EU_BATCH, EU_DIM, EU_STEPS, EU_DT, EU_DECAY = 2, 3, 500, 0.01, 0.1
# PointNet: batch, points, features, global width, classes
PN_BATCH, PN_POINTS, PN_FEAT, PN_GLOBAL, PN_CLASSES = 2, 16, 4, 8, 3
# residual VQ: batch, tokens, input width, code width, codes per stage
RQ_BATCH, RQ_T, RQ_IN, RQ_DIM, RQ_CODES, RQ_BETA = 2, 5, 6, 4, 6, 0.25
# SigLIP: pairs, image width, text width, embedding
SL_PAIRS, SL_IMG, SL_TXT, SL_EMB = 5, 6, 7, 4
# GShard MoE: tokens, width, experts, capacity, expert hidden
GS_TOKENS, GS_DIM, GS_EXPERTS, GS_CAP, GS_HIDDEN = 8, 4, 2, 5, 6
# Hyena: batch, length, width, filter MLP width, short filter taps, window decay
HY_BATCH, HY_LEN, HY_DIM, HY_FILTER, HY_SHORT = 2, 8, 4, 6, 3
# ResMLP: batch, patches, width, MLP width
RM_BATCH, RM_PATCHES, RM_DIM, RM_HIDDEN = 2, 4, 6, 12
# learned complex rotation: rows, width (even), out
CR_ROWS, CR_DIM, CR_OUT = 3, 8, 2
# selective checkpoint: rows, width, hidden
SC_ROWS, SC_DIM, SC_HIDDEN = 4, 6, 12
# MHA: sequence, batch, width, heads
MA_L, MA_BATCH, MA_DIM, MA_HEADS = 5, 2, 8, 2


class MixtureOfDepths(nn.Module):
    """A router scores each token; the top K per sequence (torch.topk) are taken by torch.gather, run through an MLP
    weighted by the sigmoid of their scores, and put back by an out-of-place scatter; the others skip the block."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(MD_DIM, 1)
        self.mlp = nn.Sequential(nn.Linear(MD_DIM, MD_HIDDEN), nn.ReLU(), nn.Linear(MD_HIDDEN, MD_DIM))

    def forward(self, x):  # (B, T, D)
        scores = self.router(x).squeeze(-1)  # (B, T)
        w, idx = torch.topk(scores, MD_K, dim=1)  # (B, K)
        gidx = idx.unsqueeze(-1).expand(-1, -1, MD_DIM)  # (B, K, D)
        sel = torch.gather(x, 1, gidx)  # (B, K, D)
        upd = self.mlp(sel) * torch.sigmoid(w).unsqueeze(-1)
        return x.scatter(1, gidx, sel + upd)


@seeded
def mod_router():
    return MixtureOfDepths(), (torch.randn(MD_BATCH, MD_T, MD_DIM),)


class ChunkRetention(nn.Module):
    """RetNet's chunkwise retention, one head: within a chunk the decayed causal scores (decays exp of differences of
    a cumsum of log gamma), across chunks a (D, D) state decayed by gamma^C and grown by K^T (V * zeta)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(RC_DIM, RC_DIM, bias=False)
        self.k = nn.Linear(RC_DIM, RC_DIM, bias=False)
        self.v = nn.Linear(RC_DIM, RC_DIM, bias=False)
        self.out = nn.Linear(RC_DIM, RC_DIM, bias=False)

    def forward(self, x):  # (B, T, D)
        c = RC_CHUNK
        pos = torch.full((c,), math.log(RC_GAMMA)).cumsum(0)  # (C,): (i + 1) log gamma
        mask = torch.exp(pos[:, None] - pos[None, :]).tril()  # (C, C): gamma^(i - j), i >= j
        xi = torch.exp(pos).unsqueeze(-1)  # (C, 1): gamma^(i + 1), the state's decay to position i
        zeta = torch.exp(pos[-1] - pos).unsqueeze(-1)  # (C, 1): gamma^(C - 1 - j), position j's decay to the end
        q, k, v = self.q(x), self.k(x), self.v(x)
        state = x.new_zeros(x.shape[0], RC_DIM, RC_DIM)
        outs = []
        for n in range(RC_T // c):
            qn, kn, vn = q[:, n * c:(n + 1) * c], k[:, n * c:(n + 1) * c], v[:, n * c:(n + 1) * c]
            inner = (qn @ kn.transpose(1, 2)) * mask  # (B, C, C)
            outs.append(inner @ vn + (qn @ state) * xi)  # (B, C, D)
            state = state * RC_GAMMA ** c + kn.transpose(1, 2) @ (vn * zeta)  # (B, D, D)
        return self.out(torch.cat(outs, 1))


@seeded
def retnet_chunk():
    return ChunkRetention(), (torch.randn(RC_BATCH, RC_T, RC_DIM),)


class EulerODE(nn.Module):
    """dy/dt = tanh(W y + b) - decay * y by explicit Euler in a Python loop of EU_STEPS steps: per step the linear's
    transpose (a view) and addmm, tanh, two multiplies, a subtract and an add (7 ATen ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(EU_DIM, EU_DIM)

    def forward(self, y):
        for _ in range(EU_STEPS):
            y = y + EU_DT * (torch.tanh(self.f(y)) - EU_DECAY * y)
        return y


@seeded
def euler_ode():
    return EulerODE(), (torch.randn(EU_BATCH, EU_DIM),)


class PointNet(nn.Module):
    """An input T-Net (a shared 1x1 Conv1d, max over points, a linear to 3x3 plus the identity) applied by bmm; a
    shared Conv1d to the features; a feature T-Net (F x F) applied by bmm with its orthogonality penalty
    ||A A^T - I||; a shared Conv1d to the global width, torch.max over points (values and indices), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.t_conv = nn.Conv1d(3, PN_GLOBAL, 1)
        self.t_fc = nn.Linear(PN_GLOBAL, 9)
        self.conv1 = nn.Conv1d(3, PN_FEAT, 1)
        self.f_conv = nn.Conv1d(PN_FEAT, PN_GLOBAL, 1)
        self.f_fc = nn.Linear(PN_GLOBAL, PN_FEAT * PN_FEAT)
        self.conv2 = nn.Conv1d(PN_FEAT, PN_GLOBAL, 1)
        self.head = nn.Linear(PN_GLOBAL, PN_CLASSES)

    def forward(self, pts):  # (B, 3, P)
        b = pts.shape[0]
        t = torch.relu(self.t_conv(pts)).max(dim=2).values  # (B, G)
        t3 = self.t_fc(t).view(b, 3, 3) + torch.eye(3)
        x = torch.bmm(pts.transpose(1, 2), t3).transpose(1, 2)  # (B, 3, P)
        x = torch.relu(self.conv1(x))  # (B, F, P)
        a = self.f_fc(torch.relu(self.f_conv(x)).max(dim=2).values).view(b, PN_FEAT, PN_FEAT) + torch.eye(PN_FEAT)
        x = torch.bmm(x.transpose(1, 2), a).transpose(1, 2)  # (B, F, P)
        penalty = torch.linalg.matrix_norm(torch.bmm(a, a.transpose(1, 2)) - torch.eye(PN_FEAT)).mean()
        g, where = torch.max(self.conv2(x), dim=2)  # (B, G) values and argmax points
        return self.head(g), penalty, where


@seeded
def pointnet():
    return PointNet(), (torch.randn(PN_BATCH, 3, PN_POINTS),)


class ResidualVQ(nn.Module):
    """An encoder linear; two codebooks in turn, each quantizing what the last left: distances by torch.cdist (the
    first stage the direct kernel, the second forced through the matmul path), argmin, the codes by F.embedding,
    the codebook and commitment losses (mse against detached sides); straight-through to the decoder linear."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(RQ_IN, RQ_DIM)
        self.books = nn.ParameterList(nn.Parameter(torch.randn(RQ_CODES, RQ_DIM)) for _ in range(2))
        self.dec = nn.Linear(RQ_DIM, RQ_IN)

    def forward(self, x):  # (B, T, IN)
        z = self.enc(x).reshape(-1, RQ_DIM)  # (N, D)
        residual, quantized, loss = z, torch.zeros_like(z), z.new_zeros(())
        for stage, book in enumerate(self.books):
            mode = "donot_use_mm_for_euclid_dist" if stage == 0 else "use_mm_for_euclid_dist"
            codes = torch.cdist(residual, book, compute_mode=mode).argmin(-1)  # (N,)
            e = F.embedding(codes, book)  # (N, D)
            loss = loss + F.mse_loss(e, residual.detach()) + RQ_BETA * F.mse_loss(residual, e.detach())
            quantized = quantized + e
            residual = residual - e.detach()
        st = z + (quantized - z).detach()  # straight-through
        return self.dec(st.reshape(x.shape[0], x.shape[1], RQ_DIM)), loss


@seeded
def residual_vq():
    return ResidualVQ(), (torch.randn(RQ_BATCH, RQ_T, RQ_IN),)


class SigLIP(nn.Module):
    """Image and text projections, L2-normalised; logits = img @ txt^T * exp(t) + b; the loss is the mean over the
    images of -logsigmoid(z * logits) with z = +1 on the diagonal (matching pairs) and -1 off it."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(SL_IMG, SL_EMB)
        self.txt = nn.Linear(SL_TXT, SL_EMB)
        self.t = nn.Parameter(torch.tensor(math.log(10.0)))
        self.b = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        zi = F.normalize(self.img(images), dim=-1)
        zt = F.normalize(self.txt(texts), dim=-1)
        logits = zi @ zt.T * self.t.exp() + self.b  # (N, N)
        labels = 2 * torch.eye(logits.shape[0]) - 1
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


@seeded
def siglip():
    return SigLIP(), (torch.randn(SL_PAIRS, SL_IMG), torch.randn(SL_PAIRS, SL_TXT))


class GShardMoE(nn.Module):
    """Top-1 gating with a capacity: the gate's softmax, its max; each token's slot in its expert by a cumsum of the
    one-hot choices; tokens past the capacity dropped; dense (S, E, C) dispatch and combine tensors; experts as
    batched einsums over their (E, C, D) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(GS_DIM, GS_EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(GS_EXPERTS, GS_DIM, GS_HIDDEN) / math.sqrt(GS_DIM))
        self.w2 = nn.Parameter(torch.randn(GS_EXPERTS, GS_HIDDEN, GS_DIM) / math.sqrt(GS_HIDDEN))

    def forward(self, x):  # (S, D)
        probs = self.gate(x).softmax(-1)  # (S, E)
        gate, idx = probs.max(-1)  # (S,)
        choice = F.one_hot(idx, GS_EXPERTS).float()  # (S, E)
        slot = (choice.cumsum(0) - 1) * choice  # (S, E): the token's place in its expert's queue
        keep = choice * (slot < GS_CAP)  # (S, E)
        dispatch = keep.unsqueeze(-1) * F.one_hot(slot.long().clamp(max=GS_CAP - 1), GS_CAP)  # (S, E, C)
        combine = dispatch * gate[:, None, None]
        h = torch.einsum("sec,sd->ecd", dispatch, x)  # (E, C, D)
        h = torch.relu(torch.einsum("ecd,edh->ech", h, self.w1))
        h = torch.einsum("ech,ehd->ecd", h, self.w2)
        return torch.einsum("sec,ecd->sd", combine, h)


def gshard_kept(x: torch.Tensor, model: GShardMoE) -> int:
    """Tokens the capacity keeps (by plain torch)."""
    with torch.no_grad():
        idx = model.gate(x).argmax(-1)
    return int(sum(min(int((idx == e).sum()), GS_CAP) for e in range(GS_EXPERTS)))


@seeded
def gshard_moe():
    return GShardMoE(), (torch.randn(GS_TOKENS, GS_DIM),)


class Hyena(nn.Module):
    """One Hyena operator of order 2: projections to (x1, x2, v), a short causal depthwise Conv1d over the three, an
    implicit long filter h (an MLP with sin over positions, times an exponentially decaying window), the long
    convolution of v * x1 with h by rfft / irfft of 2L points plus a skip term, gated by x2, and an output linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HY_DIM, 3 * HY_DIM)
        self.short = nn.Conv1d(3 * HY_DIM, 3 * HY_DIM, HY_SHORT, groups=3 * HY_DIM, padding=HY_SHORT - 1)
        self.f1 = nn.Linear(1, HY_FILTER)
        self.f2 = nn.Linear(HY_FILTER, HY_DIM)
        self.skip = nn.Parameter(torch.randn(HY_DIM, 1))
        self.out = nn.Linear(HY_DIM, HY_DIM)
        self.register_buffer("t", torch.linspace(0, 1, HY_LEN).unsqueeze(-1))  # (L, 1)
        self.register_buffer("decay", torch.linspace(0.3, 1.5, HY_DIM))  # (D,)

    def forward(self, u):  # (B, L, D)
        n = 2 * HY_LEN
        z = self.short(self.proj(u).transpose(1, 2))[..., :HY_LEN]  # (B, 3D, L) causal
        x1, x2, v = z.split(HY_DIM, dim=1)
        h = self.f2(torch.sin(self.f1(self.t))) * torch.exp(-self.t * self.decay)  # (L, D)
        y = v * x1  # (B, D, L)
        k = torch.fft.rfft(h.T, n=n)  # (D, L + 1)
        yf = torch.fft.irfft(torch.fft.rfft(y, n=n) * k, n=n)[..., :HY_LEN]
        y = (yf + y * self.skip) * x2
        return self.out(y.transpose(1, 2))


@seeded
def hyena():
    return Hyena(), (torch.randn(HY_BATCH, HY_LEN, HY_DIM),)


class Affine(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class ResMLP(nn.Module):
    """One ResMLP block: an Affine (addcmul), a cross-patch linear over the transposed patches, a layer scale; an
    Affine, a GELU MLP over the channels, a layer scale; a mean over patches and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.aff1, self.aff2 = Affine(RM_DIM), Affine(RM_DIM)
        self.cross = nn.Linear(RM_PATCHES, RM_PATCHES)
        self.mlp = nn.Sequential(nn.Linear(RM_DIM, RM_HIDDEN), nn.GELU(), nn.Linear(RM_HIDDEN, RM_DIM))
        self.ls1 = nn.Parameter(0.1 * torch.ones(RM_DIM))
        self.ls2 = nn.Parameter(0.1 * torch.ones(RM_DIM))
        self.head = nn.Linear(RM_DIM, 2)

    def forward(self, x):  # (B, P, D)
        x = x + self.ls1 * self.cross(self.aff1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ls2 * self.mlp(self.aff2(x))
        return self.head(x.mean(1))


@seeded
def resmlp():
    return ResMLP(), (torch.randn(RM_BATCH, RM_PATCHES, RM_DIM),)


class LearnedRotation(nn.Module):
    """Feature pairs as complex numbers rotated by e^(i phi) of a learned angle per pair (torch.polar of ones and the
    angle), back to real by view_as_real, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.randn(CR_DIM // 2))
        self.head = nn.Linear(CR_DIM, CR_OUT)

    def forward(self, x):  # (R, D)
        rot = torch.polar(torch.ones_like(self.phi), self.phi)  # (D/2,) complex
        pairs = torch.view_as_complex(x.reshape(x.shape[0], CR_DIM // 2, 2))
        return self.head(torch.view_as_real(pairs * rot).flatten(1))


@seeded
def complex_rotation():
    return LearnedRotation(), (torch.randn(CR_ROWS, CR_DIM),)


def _save_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: the matmuls' outputs are saved, everything else recomputed."""
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpoint(nn.Module):
    """A pre-norm residual MLP block under torch.utils.checkpoint with a selective policy (matmuls saved): the
    backward recomputes the layer norm and the GELU, not the two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(SC_DIM)
        self.fc1 = nn.Linear(SC_DIM, SC_HIDDEN)
        self.fc2 = nn.Linear(SC_HIDDEN, SC_DIM)

    def block(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))

    def forward(self, x):
        context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        return x + checkpoint(self.block, x, use_reentrant=False, context_fn=context)


@seeded
def selective_checkpoint():
    return SelectiveCheckpoint(), (torch.randn(SC_ROWS, SC_DIM),)


class AveragedWeightsMHA(nn.Module):
    """nn.MultiheadAttention sequence-first and without biases, asked for its head-averaged weights, under a float
    key padding mask (-inf at padded keys) and a per-head boolean attention mask (B*H, L, L); the weights are used
    (their entropy added to the output's sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(MA_DIM, MA_HEADS, bias=False)

    def forward(self, x, pad, mask):  # x (L, B, E), pad (B, L) float, mask (B*H, L, L) bool
        out, w = self.attn(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=True)
        return out, (w * torch.log(w + 1e-9)).sum()


@seeded
def mha_averaged():
    x = torch.randn(MA_L, MA_BATCH, MA_DIM)
    pad = torch.zeros(MA_BATCH, MA_L)
    pad[1, -2:] = float("-inf")  # the second sequence's last two keys are padding
    mask = torch.ones(MA_L, MA_L, dtype=torch.bool).triu(1).repeat(MA_BATCH * MA_HEADS, 1, 1)  # causal, per head
    return AveragedWeightsMHA(), (x, pad, mask)


MODELS = {
    "mod_router": (mod_router, True),
    "retnet_chunk": (retnet_chunk, True),
    "euler_ode": (euler_ode, True),
    "pointnet": (pointnet, True),
    "residual_vq": (residual_vq, True),
    "siglip": (siglip, True),
    "gshard_moe": (gshard_moe, True),
    "hyena": (hyena, True),
    "resmlp": (resmlp, True),
    "complex_rotation": (complex_rotation, True),
    "selective_checkpoint": (selective_checkpoint, True),
    "mha_averaged": (mha_averaged, True),
}
