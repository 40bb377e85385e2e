"""Sixteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round16*.py): each builder
returns (model, inputs), seeded, CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round16.py:slots --device cpu --train

The families rounds 1-15 leave out: graph attention by SDDMM (scores only at the edges by
torch.sparse.sampled_addmm on a CSR adjacency, a sparse softmax, an SpMM); a fixed-point solver that stops on
torch.allclose; Instant-NGP's multiresolution hash encoding (int64 corner coordinates hashed by multiplies, xor and
remainder, per-level embedding tables, bilinear corner weights); a modulated deformable convolution (DCNv2) written
with grid_sample over offset taps; slot attention (softmax over the slots, renormalised over the inputs, a GRUCell,
iterated); an implicit quantile network (cosine embeddings of fixed quantile fractions, a quantile and a median of
the return distribution, a nested dict out); per-tensor-scaled float8 (e4m3) fake quantization of a linear's
weight and activation; a torch.export'ed MLP (its ``.module()``); an image stem resizing by antialiased bilinear and
bicubic interpolation; and a model taking one record (a namedtuple of int64 tokens and a bool mask) as its input.
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# SDDMM graph attention: nodes, input width, head width, edge probability
GA_NODES, GA_IN, GA_HEAD, GA_P = 7, 5, 4, 0.35
# allclose solver: rows, width, iteration cap, tolerance, contraction of the hidden weight
AC_ROWS, AC_DIM, AC_MAX_ITERS, AC_TOL, AC_CONTRACTION = 3, 4, 60, 1e-5, 0.5
# hash grid: points, levels, table size, features per entry, coarsest resolution, growth, hidden, out
HG_POINTS, HG_LEVELS, HG_TABLE, HG_FEAT, HG_RES0, HG_GROWTH, HG_HIDDEN, HG_OUT = 6, 2, 16, 2, 4, 2, 8, 3
HG_PRIMES = (1, 2654435761)
HG_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))
# deformable convolution: batch, channels in, out, side, taps (3x3)
DC_BATCH, DC_IN, DC_OUT, DC_SIDE, DC_TAPS = 2, 2, 3, 5, 9
# slot attention: batch, inputs, width, slots, iterations, MLP width
SA_BATCH, SA_INPUTS, SA_DIM, SA_SLOTS, SA_ITERS, SA_MLP = 2, 6, 4, 3, 2, 8
SA_EPS = 1e-8
# implicit quantile network: batch, observation, hidden, cosine features, quantile fractions, actions
IQ_BATCH, IQ_OBS, IQ_HIDDEN, IQ_COS, IQ_TAUS, IQ_ACTIONS, IQ_RISK = 3, 5, 6, 4, 8, 2, 0.1
# float8 linear: rows, in, out; e4m3's largest finite value
F8_ROWS, F8_IN, F8_OUT, F8_MAX = 4, 6, 5, 448.0
# exported MLP: rows, in, hidden, out
EX_ROWS, EX_IN, EX_HIDDEN, EX_OUT = 4, 6, 8, 3
# antialiased stem: batch, channels, side, stem channels, classes
AA_BATCH, AA_C, AA_SIDE, AA_STEM, AA_CLASSES = 2, 3, 16, 4, 3
# record input: batch, tokens, vocabulary, width, classes
RB_BATCH, RB_T, RB_VOCAB, RB_DIM, RB_CLASSES = 3, 5, 11, 4, 2


class SddmmAttention(nn.Module):
    """One graph attention head on a CSR adjacency: q and k projected, their dot products formed only at the edges
    (SDDMM: the mask's value plus q_i . k_j), a row softmax over each node's edges, the values gathered (SpMM)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(GA_IN, GA_HEAD)
        self.k = nn.Linear(GA_IN, GA_HEAD)
        self.v = nn.Linear(GA_IN, GA_HEAD)

    def forward(self, adj, x):  # adj (N, N) sparse CSR, x (N, IN)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (N, HEAD) each
        scores = torch.sparse.sampled_addmm(adj, q, k.T, alpha=1 / math.sqrt(GA_HEAD))  # (N, N) CSR, nnz(adj)
        attn = torch.sparse.softmax(scores.to_sparse_coo(), 1)
        return torch.sparse.mm(attn, v)  # (N, HEAD)


def ga_adjacency() -> torch.Tensor:
    """A random directed graph with self-loops (every row has an edge), as CSR; the same on every call."""
    g = torch.Generator().manual_seed(1)
    dense = (torch.rand(GA_NODES, GA_NODES, generator=g) < GA_P).float()
    return (dense + torch.eye(GA_NODES)).clamp(max=1).to_sparse_csr()


@seeded
def sddmm_gat():
    return SddmmAttention(), (ga_adjacency(), torch.randn(GA_NODES, GA_IN))


class AllcloseSolver(nn.Module):
    """z = tanh(W z + x) iterated from 0 until torch.allclose(z_next, z) (no gradients through the loop), then one
    step with gradients and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(AC_DIM, AC_DIM, bias=False)
        with torch.no_grad():
            self.w.weight.copy_(torch.linalg.qr(torch.randn(AC_DIM, AC_DIM))[0] * AC_CONTRACTION)
        self.head = nn.Linear(AC_DIM, 1)

    def forward(self, x):
        z = torch.zeros_like(x)
        with torch.no_grad():
            for _ in range(AC_MAX_ITERS):
                z_next = torch.tanh(self.w(z) + x)
                if torch.allclose(z_next, z, rtol=0.0, atol=AC_TOL):
                    break
                z = z_next
        return self.head(torch.tanh(self.w(z) + x))


def allclose_iterations(model: AllcloseSolver, x: torch.Tensor) -> int:
    """Calls of the loop's body (and of allclose) the data takes, by the same loop in plain torch."""
    z = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(1, AC_MAX_ITERS + 1):
            z_next = torch.tanh(model.w(z) + x)
            if torch.allclose(z_next, z, rtol=0.0, atol=AC_TOL):
                return i
            z = z_next
    return AC_MAX_ITERS


@seeded
def allclose_solver():
    return AllcloseSolver(), (torch.randn(AC_ROWS, AC_DIM),)


class HashGrid(nn.Module):
    """Instant-NGP's encoding of 2-d points: per level the point scaled to the level's resolution, its four corner
    cells hashed (x * P0 xor y * P1, mod the table size) into that level's table, the corners' features weighted
    bilinearly; the levels concatenated into a small MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(HG_TABLE, HG_FEAT) for _ in range(HG_LEVELS))
        self.register_buffer("corners", torch.tensor(HG_CORNERS))  # (4, 2) int64
        self.mlp = nn.Sequential(nn.Linear(HG_LEVELS * HG_FEAT, HG_HIDDEN), nn.ReLU(), nn.Linear(HG_HIDDEN, HG_OUT))

    def forward(self, x):  # (N, 2) in [0, 1)
        feats = []
        for level, table in enumerate(self.tables):
            scaled = x * (HG_RES0 * HG_GROWTH**level)  # (N, 2)
            cell = scaled.floor()
            frac = scaled - cell  # (N, 2)
            c = cell.long()[:, None, :] + self.corners  # (N, 4, 2) int64
            h = (c[..., 0] * HG_PRIMES[0]) ^ (c[..., 1] * HG_PRIMES[1])  # (N, 4)
            w = torch.where(self.corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # (N, 4)
            feats.append((table(h % HG_TABLE) * w[..., None]).sum(1))  # (N, F)
        return self.mlp(torch.cat(feats, -1))


@seeded
def hash_grid():
    return HashGrid(), (torch.rand(HG_POINTS, 2),)


class DeformableConv(nn.Module):
    """A modulated deformable 3x3 convolution (DCNv2): a 3x3 convolution predicts each tap's offset (2 per tap) and
    modulation (a sigmoid), the input is sampled bilinearly at the shifted taps by grid_sample, the samples are
    modulated and mixed by a 1x1 convolution over (channel, tap)."""

    def __init__(self) -> None:
        super().__init__()
        self.offsets = nn.Conv2d(DC_IN, 3 * DC_TAPS, 3, padding=1)
        self.mix = nn.Conv2d(DC_IN * DC_TAPS, DC_OUT, 1)
        ky, kx = torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="ij")
        yy, xx = torch.meshgrid(torch.arange(float(DC_SIDE)), torch.arange(float(DC_SIDE)), indexing="ij")
        # (S, S, K, 2) as (x, y): each output pixel's taps before the offsets
        base = torch.stack([xx[..., None] + kx.reshape(-1), yy[..., None] + ky.reshape(-1)], -1)
        self.register_buffer("base", base)

    def forward(self, x):  # (B, C, S, S)
        b = x.shape[0]
        o = self.offsets(x)  # (B, 3K, S, S)
        delta = o[:, : 2 * DC_TAPS].reshape(b, DC_TAPS, 2, DC_SIDE, DC_SIDE).permute(0, 3, 4, 1, 2)  # (B, S, S, K, 2)
        mask = torch.sigmoid(o[:, 2 * DC_TAPS :])  # (B, K, S, S)
        grid = (self.base + delta) * (2 / (DC_SIDE - 1)) - 1  # normalised to [-1, 1], align_corners=True
        taps = F.grid_sample(x, grid.reshape(b, DC_SIDE, DC_SIDE * DC_TAPS, 2), align_corners=True)  # (B,C,S,S*K)
        taps = taps.reshape(b, DC_IN, DC_SIDE, DC_SIDE, DC_TAPS).permute(0, 1, 4, 2, 3)  # (B, C, K, S, S)
        taps = taps * mask[:, None]
        return self.mix(taps.reshape(b, DC_IN * DC_TAPS, DC_SIDE, DC_SIDE))


@seeded
def deformable_conv():
    return DeformableConv(), (torch.randn(DC_BATCH, DC_IN, DC_SIDE, DC_SIDE),)


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al.): the inputs normed and projected to keys and values once; each iteration
    the slots normed and projected to queries, the logits' softmax taken over the slots, renormalised over the
    inputs, the weighted mean of the values fed with the previous slots through a GRUCell, a residual MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in, self.norm_slots, self.norm_mlp = (nn.LayerNorm(SA_DIM) for _ in range(3))
        self.k, self.v, self.q = (nn.Linear(SA_DIM, SA_DIM, bias=False) for _ in range(3))
        self.gru = nn.GRUCell(SA_DIM, SA_DIM)
        self.mlp = nn.Sequential(nn.Linear(SA_DIM, SA_MLP), nn.ReLU(), nn.Linear(SA_MLP, SA_DIM))
        self.slots0 = nn.Parameter(torch.randn(1, SA_SLOTS, SA_DIM))

    def forward(self, inputs):  # (B, N, D)
        b = inputs.shape[0]
        x = self.norm_in(inputs)
        k, v = self.k(x), self.v(x)  # (B, N, D)
        slots = self.slots0.expand(b, -1, -1)
        for _ in range(SA_ITERS):
            q = self.q(self.norm_slots(slots))  # (B, S, D)
            attn = torch.softmax(k @ q.transpose(1, 2) / math.sqrt(SA_DIM), dim=-1) + SA_EPS  # (B, N, S)
            attn = attn / attn.sum(1, keepdim=True)  # over the inputs
            updates = attn.transpose(1, 2) @ v  # (B, S, D)
            slots = self.gru(updates.reshape(-1, SA_DIM), slots.reshape(-1, SA_DIM)).view(b, SA_SLOTS, SA_DIM)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


@seeded
def slots():
    return SlotAttention(), (torch.randn(SA_BATCH, SA_INPUTS, SA_DIM),)


class ImplicitQuantile(nn.Module):
    """IQN: state features times a cosine embedding of each quantile fraction (cos(pi i tau), i = 1..E, through a
    linear and ReLU), a head per action; returns the quantiles, and per action the return distribution's lower
    quantile (torch.quantile) and median, in a nested dict."""

    def __init__(self) -> None:
        super().__init__()
        self.state = nn.Linear(IQ_OBS, IQ_HIDDEN)
        self.embed = nn.Linear(IQ_COS, IQ_HIDDEN)
        self.head = nn.Linear(IQ_HIDDEN, IQ_ACTIONS)
        self.register_buffer("taus", (torch.arange(IQ_TAUS) + 0.5) / IQ_TAUS)  # (Q,) fixed fractions
        self.register_buffer("freqs", torch.arange(1, IQ_COS + 1) * math.pi)  # (E,)

    def forward(self, obs):  # (B, OBS)
        phi = F.relu(self.state(obs))  # (B, H)
        psi = F.relu(self.embed(torch.cos(self.taus[:, None] * self.freqs)))  # (Q, H)
        z = self.head(phi[:, None, :] * psi)  # (B, Q, A)
        risk = {"lower": torch.quantile(z, IQ_RISK, dim=1), "median": z.median(dim=1).values}  # (B, A) each
        return {"quantiles": z, "risk": risk}


@seeded
def iqn():
    return ImplicitQuantile(), (torch.randn(IQ_BATCH, IQ_OBS),)


def fake_fp8(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor-scaled e4m3 fake quantization: scale by FP8_MAX / amax, cast to float8 and back, unscale."""
    scale = F8_MAX / t.detach().abs().amax().clamp(min=1e-12)
    return (t * scale).to(torch.float8_e4m3fn).to(t.dtype) / scale


class Fp8Linear(nn.Module):
    """A linear whose activation and weight are fake-quantized to float8 (e4m3) before the product, an fp32 bias."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(F8_IN, F8_OUT)

    def forward(self, x):
        return F.linear(fake_fp8(x), fake_fp8(self.lin.weight), self.lin.bias)


@seeded
def fp8_linear():
    return Fp8Linear(), (torch.randn(F8_ROWS, F8_IN),)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(EX_IN, EX_HIDDEN), nn.LayerNorm(EX_HIDDEN), nn.GELU(), nn.Linear(EX_HIDDEN, EX_OUT))


def exported_program() -> torch.export.ExportedProgram:
    """The MLP exported by torch.export (an ExportedProgram, not itself callable: ``.module()`` runs it)."""
    x = torch.randn(EX_ROWS, EX_IN)
    return torch.export.export(mlp(), (x,))


@seeded
def exported():
    return exported_program().module(), (torch.randn(EX_ROWS, EX_IN),)


class AntialiasStem(nn.Module):
    """An image stem: the image resized to half by antialiased bilinear interpolation, normalised per channel by
    buffers, a 3x3 convolution and ReLU, resized to half again by antialiased bicubic, pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, AA_C, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, AA_C, 1, 1))
        self.stem = nn.Conv2d(AA_C, AA_STEM, 3, padding=1)
        self.head = nn.Linear(AA_STEM, AA_CLASSES)

    def forward(self, img):  # (B, C, S, S)
        x = F.interpolate(img, scale_factor=0.5, mode="bilinear", antialias=True)  # (B, C, S/2, S/2)
        x = F.relu(self.stem((x - self.mean) / self.std))
        x = F.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True)  # (B, STEM, S/4, S/4)
        return self.head(x.mean((2, 3)))


@seeded
def antialias_stem():
    return AntialiasStem(), (torch.rand(AA_BATCH, AA_C, AA_SIDE, AA_SIDE),)


Batch = collections.namedtuple("Batch", ["tokens", "mask"])


class RecordClassifier(nn.Module):
    """Takes one record (a Batch of int64 tokens and a bool mask): embeds the tokens, averages the unmasked ones,
    classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(RB_VOCAB, RB_DIM)
        self.head = nn.Linear(RB_DIM, RB_CLASSES)

    def forward(self, batch):
        e = self.embed(batch.tokens) * batch.mask[..., None]  # (B, T, D)
        return self.head(e.sum(1) / batch.mask.sum(1, keepdim=True))


def record_batch() -> Batch:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, RB_VOCAB, (RB_BATCH, RB_T), generator=g)
    mask = torch.arange(RB_T)[None] < torch.tensor([[5], [3], [1]])  # (B, T): 5, 3 and 1 tokens kept
    return Batch(tokens, mask)


@seeded
def record():
    """The record given bare as the inputs (not wrapped in a tuple): one argument, as a PackedSequence is."""
    return RecordClassifier(), record_batch()


MODELS = {
    "sddmm_gat": (sddmm_gat, True),
    "allclose_solver": (allclose_solver, True),
    "hash_grid": (hash_grid, True),
    "deformable_conv": (deformable_conv, True),
    "slots": (slots, True),
    "iqn": (iqn, True),
    "fp8_linear": (fp8_linear, True),
    "exported": (exported, True),
    "antialias_stem": (antialias_stem, True),
    "record": (record, True),
}
