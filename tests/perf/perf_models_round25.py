"""Models for the profiler's twenty-fifth held-out round (tests/perf/test_profile_unseen_round25*.py), each written
for this round and small enough to profile on a CPU in well under a second.

    import perf_models_round25 as pm
    model, inputs = pm.MODELS["nca"][0]()        # (model, inputs); MODELS[name][1]: whether it trains

The models: a neural cellular automaton (perception by a fixed identity/Sobel depthwise convolution, a 1x1
convolution MLP, a stochastic update mask drawn by torch.rand, an alive mask by a 3x3 max pool, stepped twice in
Python); a ViT whose patches are cut by Tensor.unfold (two unfold views, a permute, a reshape that copies) before a
linear embedding, a class token, one pre-norm block through SDPA; a batched Kalman filter in float64 (a shared
transition matrix broadcast against the batch of covariances, the gain by torch.linalg.solve, the innovation
log-likelihood by torch.logdet); a mixture density network of Student-t components in float64 (lgamma, log1p,
log_softmax, logsumexp); an MLP-Mixer held in bfloat16 (token mixing on transposed tokens, channel mixing); a gated
scan (a running max by torch.cummax, a survival product by torch.cumprod, torch.logcumsumexp, a torch.diff
penalty); an RBF head whose distances are L1 (torch.cdist p=1) scaled by their per-row median (torch.quantile).
Sizes are module constants so the tests write every count from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# --- neural cellular automaton: batch, channels, side, hidden, steps ------------------------------------------------
NC_B, NC_C, NC_S, NC_HID, NC_STEPS = 2, 4, 6, 16, 2
NC_FIRE = 0.5  # the share of cells updated a step
NC_ALIVE = 0.1  # a cell lives while a neighbour's alpha exceeds this
NC_ALPHA = 3  # the channel read as alpha


def _perception_filters() -> torch.Tensor:
    """(3 C, 1, 3, 3): identity, Sobel x and Sobel y for each channel, a depthwise convolution's weight."""
    ident = torch.zeros(3, 3)
    ident[1, 1] = 1.0
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    return torch.stack([ident, sobel_x, sobel_x.T]).repeat(NC_C, 1, 1)[:, None]


class CellularAutomaton(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("filters", _perception_filters())
        self.fc1 = nn.Conv2d(3 * NC_C, NC_HID, 1)
        self.fc2 = nn.Conv2d(NC_HID, NC_C, 1, bias=False)

    def forward(self, x):  # (B, C, S, S)
        for _ in range(NC_STEPS):
            seen = F.conv2d(x, self.filters, padding=1, groups=NC_C)  # (B, 3C, S, S)
            dx = self.fc2(F.relu(self.fc1(seen)))  # (B, C, S, S)
            fire = torch.rand(NC_B, 1, NC_S, NC_S) < NC_FIRE  # (B, 1, S, S) bool
            x = x + dx * fire
            alive = F.max_pool2d(x[:, NC_ALPHA:NC_ALPHA + 1], 3, stride=1, padding=1) > NC_ALIVE  # (B, 1, S, S)
            x = x * alive
        return x


@seeded
def nca():
    x = torch.zeros(NC_B, NC_C, NC_S, NC_S)
    x[:, :, NC_S // 2 - 1:NC_S // 2 + 1, NC_S // 2 - 1:NC_S // 2 + 1] = 1.0  # a seed of live cells
    return CellularAutomaton(), (x + 0.01 * torch.randn_like(x),)


# --- ViT cut into patches by Tensor.unfold: batch, channels, side, patch, width, heads, classes --------------------
VT_B, VT_C, VT_S, VT_P, VT_D, VT_H, VT_CLS = 2, 3, 8, 4, 16, 2, 5
VT_N = (VT_S // VT_P) ** 2  # patches per image
VT_T = VT_N + 1  # tokens with the class token
VT_PD = VT_C * VT_P * VT_P  # values per patch
VT_MLP = 2 * VT_D


class UnfoldViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(VT_PD, VT_D)
        self.cls = nn.Parameter(torch.randn(1, 1, VT_D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, VT_T, VT_D) * 0.02)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(VT_D), nn.LayerNorm(VT_D), nn.LayerNorm(VT_D)
        self.qkv = nn.Linear(VT_D, 3 * VT_D)
        self.proj = nn.Linear(VT_D, VT_D)
        self.up, self.down = nn.Linear(VT_D, VT_MLP), nn.Linear(VT_MLP, VT_D)
        self.head = nn.Linear(VT_D, VT_CLS)

    def forward(self, img):  # (B, C, S, S)
        g = VT_S // VT_P
        patches = img.unfold(2, VT_P, VT_P).unfold(3, VT_P, VT_P)  # (B, C, g, g, P, P), a view
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(VT_B, g * g, VT_PD)  # (B, N, C P P), a copy
        x = torch.cat([self.cls.expand(VT_B, -1, -1), self.embed(patches)], dim=1) + self.pos  # (B, T, D)
        q, k, v = self.qkv(self.norm1(x)).view(VT_B, VT_T, 3, VT_H, VT_D // VT_H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        x = x + self.proj(o.transpose(1, 2).reshape(VT_B, VT_T, VT_D))
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return self.head(self.norm(x[:, 0]))  # (B, classes)


@seeded
def vit_unfold():
    return UnfoldViT(), (torch.randn(VT_B, VT_C, VT_S, VT_S),)


# --- Kalman filter in float64: batch, state, observation, steps -----------------------------------------------------
KF_B, KF_N, KF_M, KF_T = 3, 4, 2, 3
LOG_2PI = 1.8378770664093453  # log(2 pi)


class KalmanFilter(nn.Module):
    """The negative log-likelihood of the observations (B, T, M) under a linear-Gaussian state-space model."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.eye(KF_N, dtype=torch.float64) * 0.9
                              + 0.05 * torch.randn(KF_N, KF_N, dtype=torch.float64))
        self.H = nn.Parameter(torch.randn(KF_M, KF_N, dtype=torch.float64) * 0.5)
        self.log_q = nn.Parameter(torch.full((KF_N,), -2.0, dtype=torch.float64))
        self.log_r = nn.Parameter(torch.full((KF_M,), -1.0, dtype=torch.float64))

    def forward(self, y):  # (B, T, M)
        Q, R = torch.diag(self.log_q.exp()), torch.diag(self.log_r.exp())  # (N, N), (M, M)
        x = y.new_zeros(KF_B, KF_N)  # (B, N)
        P = torch.eye(KF_N, dtype=torch.float64).expand(KF_B, KF_N, KF_N)  # (B, N, N)
        nll = y.new_zeros(KF_B)
        for t in range(KF_T):
            x = x @ self.A.T  # predict (B, N)
            P = self.A @ P @ self.A.T + Q  # (B, N, N)
            S = self.H @ P @ self.H.T + R  # (B, M, M)
            r = y[:, t] - x @ self.H.T  # innovation (B, M)
            HP = self.H @ P  # (B, M, N)
            K = torch.linalg.solve(S, HP).transpose(1, 2)  # gain (B, N, M)
            x = x + (K @ r[..., None])[..., 0]
            P = P - K @ HP
            mahalanobis = (r[:, None] @ torch.linalg.solve(S, r[..., None]))[:, 0, 0]  # (B,)
            nll = nll + 0.5 * (torch.logdet(S) + mahalanobis + KF_M * LOG_2PI)
        return nll.mean()


@seeded
def kalman():
    return KalmanFilter(), (torch.randn(KF_B, KF_T, KF_M, dtype=torch.float64),)


# --- Student-t mixture density network in float64: batch, inputs, hidden, components --------------------------------
MD_B, MD_IN, MD_HID, MD_K = 5, 3, 8, 3
MD_NU = 4.0  # degrees of freedom of every component
LOG_PI = 1.1447298858494002  # log(pi)


class StudentMixture(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(MD_IN, MD_HID), nn.Tanh())
        self.head = nn.Linear(MD_HID, 3 * MD_K)  # logits, means, log-scales
        self.double()

    def forward(self, x, y):  # (B, IN), (B, 1)
        logits, mu, log_s = self.head(self.body(x)).chunk(3, dim=-1)  # each (B, K)
        z = (y - mu) / log_s.exp()
        nu = torch.full_like(mu, MD_NU)  # (B, K)
        log_t = (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * (torch.log(nu) + LOG_PI) - log_s
                 - (nu + 1) / 2 * torch.log1p(z * z / nu))  # (B, K)
        return -torch.logsumexp(F.log_softmax(logits, dim=-1) + log_t, dim=-1).mean()


@seeded
def mdn():
    return StudentMixture(), (torch.randn(MD_B, MD_IN, dtype=torch.float64), torch.randn(MD_B, 1, dtype=torch.float64))


# --- MLP-Mixer held in bfloat16: batch, tokens, width, token hidden, channel hidden, classes ------------------------
MX_B, MX_N, MX_D, MX_TH, MX_CH, MX_CLS = 2, 4, 8, 6, 16, 3


class MixerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(MX_D), nn.LayerNorm(MX_D)
        self.token = nn.Sequential(nn.Linear(MX_N, MX_TH), nn.GELU(), nn.Linear(MX_TH, MX_N))
        self.channel = nn.Sequential(nn.Linear(MX_D, MX_CH), nn.GELU(), nn.Linear(MX_CH, MX_D))

    def forward(self, x):  # (B, N, D)
        x = x + self.token(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = MixerBlock()
        self.head = nn.Linear(MX_D, MX_CLS)
        self.to(torch.bfloat16)

    def forward(self, x):  # (B, N, D) bf16
        return self.head(self.block(x).mean(dim=1))


@seeded
def mixer_bf16():
    return Mixer(), (torch.randn(MX_B, MX_N, MX_D, dtype=torch.bfloat16),)


# --- gated scan: batch, steps, width --------------------------------------------------------------------------------
SC_B, SC_T, SC_D = 2, 6, 4


class GatedScan(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(SC_D, 2 * SC_D)
        self.out = nn.Linear(SC_D, SC_D)

    def forward(self, x):  # (B, T, D)
        a, g = self.inp(x).chunk(2, dim=-1)  # each (B, T, D)
        running = torch.cummax(a, dim=1).values  # (B, T, D)
        survival = torch.cumprod(torch.sigmoid(g), dim=1)  # (B, T, D)
        y = running * survival + torch.logcumsumexp(a, dim=1)
        smooth = torch.diff(y, dim=1).square().mean()  # a penalty on changes between steps
        return self.out(y), smooth


@seeded
def scan():
    return GatedScan(), (torch.randn(SC_B, SC_T, SC_D),)


# --- RBF head on L1 distances: batch, inputs, centres, outputs ------------------------------------------------------
RB_B, RB_IN, RB_K, RB_OUT = 6, 4, 5, 3


class MedianRbf(nn.Module):
    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(RB_K, RB_IN))
        self.head = nn.Linear(RB_K, RB_OUT)

    def forward(self, x):  # (B, IN)
        d = torch.cdist(x, self.centres, p=1)  # (B, K)
        scale = torch.quantile(d, 0.5, dim=1, keepdim=True)  # (B, 1), the per-row median distance
        return self.head(torch.exp(-d / scale))


@seeded
def rbf():
    return MedianRbf(), (torch.randn(RB_B, RB_IN),)


MODELS = {
    "nca": (nca, True), "vit_unfold": (vit_unfold, True), "kalman": (kalman, True), "mdn": (mdn, True),
    "mixer_bf16": (mixer_bf16, True), "scan": (scan, True), "rbf": (rbf, True),
}
