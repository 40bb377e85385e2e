"""A seventh round of models the profiler was not written against (tests/perf/test_profile_unseen_round7.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round7.py:rwkv --device cpu --train

Each builder returns ``(model, inputs)``. The families are those rounds 1-6 leave out: RWKV's time mixing (the WKV
recurrence stepped token by token in Python, max-stabilised exponentials), a Switch Transformer MoE with a capacity
(tokens past it dropped: one_hot, cumsum, bincount, index_add_), local attention with a sliding-window band and ALiBi
biases (by hand and through SDPA), a DiT block (adaLN-Zero modulation, patchify convolution), a complex-valued net
(complex parameters, modReLU), a binarized net on uint8 images (int8 _int_mm, XNOR and popcount by bitwise ops on
bools and uint8), a MoCo momentum encoder (its key encoder's parameters and a queue buffer updated in forward), a
Perceiver whose latent blocks run under torch.utils.checkpoint, a 500-layer tiny MLP, a model returning a dict
holding a dataclass, strings and None, a neural ODE by RK4 in a Python loop, log-domain Sinkhorn, a
Kolmogorov-Arnold layer (B-spline bases), a PixelCNN on channels_last images (masked convolutions), a VQ-VAE
quantizer, a router that drops every token (zero-size intermediates) and a net whose BatchNorm and Dropout make
train and eval mode different work. Sizes are tiny: what is checked is the counting, not the speed.
"""

from __future__ import annotations

import dataclasses

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

BATCH = 2
RW_LEN, RW_DIM = 6, 8  # RWKV: tokens, width
SW_TOKENS, SW_DIM, SW_EXPERTS, SW_HIDDEN, SW_CAPACITY = 12, 8, 3, 16, 3  # Switch MoE
LA_LEN, LA_HEADS, LA_HEAD_DIM, LA_WINDOW = 10, 2, 4, 3  # local attention: tokens, heads, head width, window
DIT_SIDE, DIT_CH, DIT_PATCH, DIT_DIM, DIT_HEADS, DIT_MLP = 8, 3, 4, 16, 2, 32  # DiT
CX_IN, CX_HIDDEN, CX_OUT = 6, 8, 3  # complex net widths
BN_SIDE, BN_IN, BN_HIDDEN, BN_OUT = 4, 3 * 4 * 4, 32, 8  # binarized net: image side, features, hidden, out
MO_DIM, MO_OUT, MO_QUEUE, MO_MOMENTUM = 8, 6, 8, 0.9  # MoCo: width, key width, queue length, momentum
PV_INPUTS, PV_LATENTS, PV_DIM, PV_BLOCKS = 10, 4, 8, 2  # Perceiver
DEEP_LAYERS, DEEP_DIM = 500, 4
ODE_DIM, ODE_HIDDEN, ODE_STEPS = 4, 8, 3
SK_N, SK_M, SK_DIM, SK_ITERS, SK_EPS = 5, 6, 3, 4, 0.1  # Sinkhorn
KAN_IN, KAN_OUT, KAN_GRID, KAN_ORDER = 3, 4, 5, 3  # KAN: grid intervals, spline order
PX_SIDE, PX_CH = 6, 8  # PixelCNN
VQ_TOKENS, VQ_DIM, VQ_CODES = 10, 4, 7


class Rwkv(nn.Module):
    """RWKV time mixing: token shift (the previous token, ZeroPad2d), k/v/r projections, then per token
    wkv_t = (a + e^(u+k_t) v_t) / (b + e^(u+k_t)) with a, b decayed by e^-w each step (in max-stabilised form)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.ZeroPad2d((0, 0, 1, -1))  # (B, T, D): row t gets row t-1
        self.mix = nn.Parameter(torch.rand(3, RW_DIM))
        self.key, self.value, self.receptance = (nn.Linear(RW_DIM, RW_DIM, bias=False) for _ in range(3))
        self.output = nn.Linear(RW_DIM, RW_DIM, bias=False)
        self.decay = nn.Parameter(torch.rand(RW_DIM))
        self.first = nn.Parameter(torch.rand(RW_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        xx = self.shift(x)
        k = self.key(x * self.mix[0] + xx * (1 - self.mix[0]))
        v = self.value(x * self.mix[1] + xx * (1 - self.mix[1]))
        r = torch.sigmoid(self.receptance(x * self.mix[2] + xx * (1 - self.mix[2])))
        w = -torch.exp(self.decay)
        a = torch.zeros_like(x[:, 0])
        b = torch.zeros_like(x[:, 0])
        p = torch.full_like(x[:, 0], -1e38)
        out = []
        for t in range(x.shape[1]):
            kt, vt = k[:, t], v[:, t]
            q = torch.maximum(p, self.first + kt)
            e1, e2 = torch.exp(p - q), torch.exp(self.first + kt - q)
            out.append((e1 * a + e2 * vt) / (e1 * b + e2))
            q = torch.maximum(p + w, kt)
            e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
            a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
        return self.output(r * torch.stack(out, 1))


class SwitchMoE(nn.Module):
    """Top-1 routing with a capacity per expert: a token's place in its expert's queue is a cumsum of the one-hot
    choices; tokens past the capacity are dropped (they pass through as zeros). Kept tokens run their expert's MLP
    and are added back by index_add_ scaled by their gate; bincount gives the load for the balancing loss."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(SW_DIM, SW_EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(SW_EXPERTS, SW_DIM, SW_HIDDEN) / SW_DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(SW_EXPERTS, SW_HIDDEN, SW_DIM) / SW_HIDDEN**0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.router(x).softmax(-1)  # (T, E)
        gate, expert = probs.max(-1)  # (T,)
        onehot = F.one_hot(expert, SW_EXPERTS)  # (T, E) int64
        place = (onehot.cumsum(0) * onehot).sum(-1) - 1  # the token's place in its expert's queue
        return gate, expert, place < SW_CAPACITY

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (T, D)
        gate, expert, keep = self.route(x)
        out = torch.zeros_like(x)
        for e in range(SW_EXPERTS):
            idx = torch.nonzero(keep & (expert == e)).squeeze(1)
            h = F.gelu(x[idx] @ self.w1[e]) @ self.w2[e]
            out.index_add_(0, idx, h * gate[idx, None])
        load = torch.bincount(expert, minlength=SW_EXPERTS).float() / x.shape[0]
        return out, (load * self.router(x).softmax(-1).mean(0)).sum() * SW_EXPERTS


class LocalAttention(nn.Module):
    """Causal sliding-window attention with ALiBi slopes: the band mask (|i-j| < window, j <= i) and the linear
    distance biases, applied by hand (scores, masked_fill, softmax, matmul) and through SDPA with a float mask."""

    def __init__(self) -> None:
        super().__init__()
        d = LA_HEADS * LA_HEAD_DIM
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        i = torch.arange(LA_LEN)
        dist = i[:, None] - i[None, :]  # (T, T): how far back
        self.register_buffer("band", (dist >= 0) & (dist < LA_WINDOW), persistent=False)
        slopes = 2.0 ** -torch.arange(1, LA_HEADS + 1, dtype=torch.float32)
        self.register_buffer("alibi", -slopes[:, None, None] * dist.clamp(min=0), persistent=False)  # (H, T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H Dh)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, LA_HEADS, LA_HEAD_DIM).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh) each
        scores = (q @ k.transpose(-1, -2)) * LA_HEAD_DIM**-0.5 + self.alibi
        by_hand = scores.masked_fill(~self.band, float("-inf")).softmax(-1) @ v
        mask = self.alibi.masked_fill(~self.band, float("-inf"))
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out((by_hand + fused).transpose(1, 2).reshape(b, t, -1))


class DiTBlock(nn.Module):
    """A diffusion transformer block: patchify (a stride-P convolution), adaLN-Zero (SiLU + Linear of the
    conditioning to six (B, D) shifts, scales and gates), LayerNorm without affine, SDPA, a tanh-GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(DIT_CH, DIT_DIM, DIT_PATCH, stride=DIT_PATCH)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(DIT_DIM, 6 * DIT_DIM))
        self.norm1 = nn.LayerNorm(DIT_DIM, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(DIT_DIM, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(DIT_DIM, 3 * DIT_DIM)
        self.proj = nn.Linear(DIT_DIM, DIT_DIM)
        self.mlp = nn.Sequential(nn.Linear(DIT_DIM, DIT_MLP), nn.GELU("tanh"), nn.Linear(DIT_MLP, DIT_DIM))

    def forward(self, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # (B, C, S, S), (B, D)
        x = self.patch(img).flatten(2).transpose(1, 2)  # (B, N, D)
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, DIT_HEADS, d // DIT_HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(a)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ComplexNet(nn.Module):
    """Complex-valued layers: complex weights (cfloat parameters), a complex matmul, modReLU
    (relu(|z| + b) * z / |z|), and the magnitude of the output as a real result."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(CX_IN, CX_HIDDEN, dtype=torch.cfloat) / CX_IN**0.5)
        self.w2 = nn.Parameter(torch.randn(CX_HIDDEN, CX_OUT, dtype=torch.cfloat) / CX_HIDDEN**0.5)
        self.bias = nn.Parameter(torch.zeros(CX_HIDDEN))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, IN) complex
        h = z @ self.w1
        mag = h.abs()
        h = F.relu(mag + self.bias) * (h / (mag + 1e-6))
        return (h @ self.w2).abs()


class BinarizedNet(nn.Module):
    """Integer work: a uint8 image normalised to float; an int8 layer by torch._int_mm (int32 accumulation) on
    activations quantised to int8; a binary layer by XNOR-popcount: signs as bools, XNOR by logical ops, the
    matches summed, and a uint8 bit-plane by shifts and masks."""

    def __init__(self) -> None:
        super().__init__()
        self.w_int8 = nn.Parameter(torch.randint(-127, 128, (BN_IN, BN_HIDDEN), dtype=torch.int8), requires_grad=False)
        self.register_buffer("w_bits", torch.randn(BN_OUT, BN_HIDDEN) > 0)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, S, S) uint8
        x = (img.float() / 255 - 0.5).flatten(1)  # (B, IN)
        xq = (x * 127).round().clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(F.pad(xq, (0, 0, 0, 17 - xq.shape[0])), self.w_int8)[: xq.shape[0]]  # (17, H) int32
        bits = acc > 0  # (B, H) bool
        matches = torch.logical_not(torch.logical_xor(bits[:, None, :], self.w_bits[None]))  # (B, OUT, H)
        popcount = matches.sum(-1)  # (B, OUT) int64
        plane = (img >> 4) & 0x0F  # (B, C, S, S) uint8: the high nibble
        return 2 * popcount - BN_HIDDEN, plane


class MomentumEncoder(nn.Module):
    """MoCo: the query encoder learns; the key encoder's parameters follow it by an exponential moving average
    updated in forward (in place, under no_grad), and each batch's keys are written into a queue buffer at a
    pointer buffer that advances; the logits are against the positive key and the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.q_enc, self.k_enc = (
            nn.Sequential(nn.Linear(MO_DIM, MO_DIM), nn.BatchNorm1d(MO_DIM), nn.ReLU(), nn.Linear(MO_DIM, MO_OUT))
            for _ in range(2)
        )
        for p in self.k_enc.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(MO_QUEUE, MO_OUT), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D)
        q = F.normalize(self.q_enc(x + 0.1 * torch.randn_like(x)), dim=1)
        with torch.no_grad():
            for pk, pq in zip(self.k_enc.parameters(), self.q_enc.parameters(), strict=True):
                pk.mul_(MO_MOMENTUM).add_(pq.detach(), alpha=1 - MO_MOMENTUM)
            k = F.normalize(self.k_enc(x + 0.1 * torch.randn_like(x)), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().T], 1) / 0.07
        with torch.no_grad():
            i = int(self.ptr)
            self.queue[i : i + x.shape[0]] = k
            self.ptr.fill_((i + x.shape[0]) % MO_QUEUE)
        return F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long))


class Perceiver(nn.Module):
    """Latents cross-attend to the inputs, then latent self-attention blocks, each under activation
    checkpointing (torch.utils.checkpoint, non-reentrant): in training their forward runs again in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(PV_LATENTS, PV_DIM))
        self.cross = nn.MultiheadAttention(PV_DIM, 1, batch_first=True)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(PV_DIM, PV_DIM), nn.GELU()) for _ in range(PV_BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        lat = self.latents.expand(x.shape[0], -1, -1)
        lat = lat + self.cross(lat, x, x, need_weights=False)[0]
        for block in self.blocks:
            lat = lat + checkpoint(block, lat, use_reentrant=False)
        return lat.mean(1)


class Deep(nn.Module):
    """500 tiny Linear + ReLU layers: thousands of small ops, where the profiler's own overhead shows."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(DEEP_DIM, DEEP_DIM) for _ in range(DEEP_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    label: str
    extras: list


class DictOutputs(nn.Module):
    """Returns {"pred": a dataclass (a tensor, a str, a list holding a tensor and None), "aux": {"h": tensor,
    "n": int}, "none": None}: the training step differentiates every tensor that requires grad, wherever it is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> dict:
        h = torch.tanh(self.a(x)) * scale
        return {"pred": Prediction(self.b(h), "ok", [h.sum(1), None]), "aux": {"h": h, "n": 3}, "none": None}


class NeuralOde(nn.Module):
    """dy/dt = f(y) by a two-layer MLP, integrated by classic RK4 with a fixed step in a Python loop: four
    evaluations of f per step."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(ODE_DIM, ODE_HIDDEN), nn.Tanh(), nn.Linear(ODE_HIDDEN, ODE_DIM))

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (B, D)
        h = 1.0 / ODE_STEPS
        for _ in range(ODE_STEPS):
            k1 = self.f(y)
            k2 = self.f(y + h / 2 * k1)
            k3 = self.f(y + h / 2 * k2)
            k4 = self.f(y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y


class Sinkhorn(nn.Module):
    """Entropic optimal transport in the log domain: a squared-Euclidean cost (torch.cdist), then alternating
    logsumexp updates of the two potentials, the plan and its cost."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(SK_DIM, SK_DIM)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (N, D), (M, D)
        cost = torch.cdist(self.embed(x), self.embed(y)) ** 2  # (N, M)
        log_a = torch.full((x.shape[0],), -torch.log(torch.tensor(float(x.shape[0]))))
        log_b = torch.full((y.shape[0],), -torch.log(torch.tensor(float(y.shape[0]))))
        f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
        for _ in range(SK_ITERS):
            f = -SK_EPS * torch.logsumexp((g[None] - cost) / SK_EPS + log_b[None], 1)
            g = -SK_EPS * torch.logsumexp((f[:, None] - cost) / SK_EPS + log_a[:, None], 0)
        plan = torch.exp((f[:, None] + g[None] - cost) / SK_EPS + log_a[:, None] + log_b[None])
        return (plan * cost).sum()


class Kan(nn.Module):
    """A Kolmogorov-Arnold layer: per input, B-spline bases of order 3 on a uniform grid (Cox-de Boor recursion by
    comparisons and divisions), contracted with per-(input, output) coefficients by einsum, plus a SiLU base path."""

    def __init__(self) -> None:
        super().__init__()
        h = 2 / KAN_GRID
        grid = torch.arange(-KAN_ORDER, KAN_GRID + KAN_ORDER + 1) * h - 1  # (G + 2k + 1,)
        self.register_buffer("grid", grid.expand(KAN_IN, -1).contiguous())
        self.coef = nn.Parameter(torch.randn(KAN_IN, KAN_OUT, KAN_GRID + KAN_ORDER) * 0.1)
        self.base = nn.Linear(KAN_IN, KAN_OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, IN)
        g, xe = self.grid, x[..., None]
        bases = ((xe >= g[:, :-1]) & (xe < g[:, 1:])).to(x.dtype)  # (B, IN, G + 2k)
        for k in range(1, KAN_ORDER + 1):
            left = (xe - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * bases[..., :-1]
            right = (g[:, k + 1 :] - xe) / (g[:, k + 1 :] - g[:, 1:-k]) * bases[..., 1:]
            bases = left + right
        return torch.einsum("bik,iok->bo", bases, self.coef) + self.base(F.silu(x))


class MaskedConv2d(nn.Conv2d):
    """PixelCNN's masked convolution: the weight times a causal mask (type A excludes the centre) each forward."""

    def __init__(self, mask_type: str, c_in: int, c_out: int, k: int) -> None:
        super().__init__(c_in, c_out, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2 + (mask_type == "B") :] = 0
        mask[:, :, k // 2 + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCnn(nn.Module):
    """A type-A 7x7 masked convolution, two type-B 3x3 ones with ReLU, a 1x1 head; channels_last images."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            MaskedConv2d("A", 1, PX_CH, 7), nn.ReLU(), MaskedConv2d("B", PX_CH, PX_CH, 3), nn.ReLU(),
            MaskedConv2d("B", PX_CH, PX_CH, 3), nn.ReLU(), nn.Conv2d(PX_CH, 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VectorQuantizer(nn.Module):
    """VQ-VAE's bottleneck: distances to the codebook as |x|^2 - 2 x.e + |e|^2 (one matmul), argmin, the codes
    looked up (embedding), the codebook and commitment losses, and the straight-through estimator."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(VQ_DIM, VQ_DIM)
        self.codebook = nn.Embedding(VQ_CODES, VQ_DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, D)
        z = self.enc(x)
        e = self.codebook.weight
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)  # (N, K)
        zq = self.codebook(d.argmin(1))
        loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), loss


class DropEverything(nn.Module):
    """A router whose threshold no token passes: every intermediate after it has zero rows (masked_select,
    nonzero, an empty matmul, index_add_ of nothing); the output is the residual alone."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(4, 1)
        self.expert = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, 4)
        keep = torch.sigmoid(self.score(x)).squeeze(1) > 2.0  # never: a sigmoid is below 1
        idx = keep.nonzero().squeeze(1)  # (0,)
        h = self.expert(x[idx])  # (0, 4)
        picked = torch.masked_select(x, keep[:, None])  # (0,)
        return x.index_add(0, idx, h) + picked.sum()


class TrainEval(nn.Module):
    """BatchNorm (batch statistics in training, running ones in eval), Dropout (a mask in training only) and a
    branch on self.training (a noise injection): train and eval mode are different work."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S)
        h = F.relu(self.bn(self.conv(x)))
        if self.training:
            h = h + 0.01 * torch.randn_like(h)
        return self.head(self.drop(h.mean((2, 3))))


@seeded
def rwkv():
    return Rwkv(), (torch.randn(BATCH, RW_LEN, RW_DIM),)


@seeded
def switch_moe():
    return SwitchMoE(), (torch.randn(SW_TOKENS, SW_DIM),)


@seeded
def local_attention():
    return LocalAttention(), (torch.randn(BATCH, LA_LEN, LA_HEADS * LA_HEAD_DIM),)


@seeded
def dit_block():
    return DiTBlock(), (torch.randn(BATCH, DIT_CH, DIT_SIDE, DIT_SIDE), torch.randn(BATCH, DIT_DIM))


@seeded
def complex_net():
    return ComplexNet(), (torch.randn(BATCH, CX_IN, dtype=torch.cfloat),)


@seeded
def binarized_net():
    return BinarizedNet(), (torch.randint(0, 256, (BATCH, 3, BN_SIDE, BN_SIDE), dtype=torch.uint8),)


@seeded
def momentum_encoder():
    return MomentumEncoder(), (torch.randn(4, MO_DIM),)


@seeded
def perceiver():
    return Perceiver(), (torch.randn(BATCH, PV_INPUTS, PV_DIM),)


@seeded
def deep():
    return Deep(), (torch.randn(BATCH, DEEP_DIM),)


@seeded
def dict_outputs():
    return DictOutputs(), {"x": torch.randn(BATCH, 6), "scale": 0.5}


@seeded
def neural_ode():
    return NeuralOde(), (torch.randn(BATCH, ODE_DIM),)


@seeded
def sinkhorn():
    return Sinkhorn(), (torch.randn(SK_N, SK_DIM), torch.randn(SK_M, SK_DIM))


@seeded
def kan():
    return Kan(), (torch.rand(BATCH, KAN_IN) * 1.8 - 0.9,)


@seeded
def pixel_cnn():
    model = PixelCnn().to(memory_format=torch.channels_last)
    return model, (torch.rand(BATCH, 1, PX_SIDE, PX_SIDE).to(memory_format=torch.channels_last),)


@seeded
def vector_quantizer():
    return VectorQuantizer(), (torch.randn(VQ_TOKENS, VQ_DIM),)


@seeded
def drop_everything():
    return DropEverything(), (torch.randn(5, 4),)


@seeded
def train_eval():
    return TrainEval(), (torch.randn(BATCH, 3, 5, 5),)


@seeded
def train_eval_in_eval():
    model, inputs = train_eval()
    return model.eval(), inputs


MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (rwkv, True),
        (switch_moe, True),
        (local_attention, True),
        (dit_block, True),
        (complex_net, True),
        (binarized_net, False),  # integer work: nothing to differentiate
        (momentum_encoder, True),
        (perceiver, True),
        (deep, True),
        (dict_outputs, True),
        (neural_ode, True),
        (sinkhorn, True),
        (kan, True),
        (pixel_cnn, True),
        (vector_quantizer, True),
        (drop_everything, True),
        (train_eval, True),
        (train_eval_in_eval, True),
    )
}
build = rwkv
