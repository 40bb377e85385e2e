"""The models of the planner's unseen-models round 5 (tests/parallel/test_plan_unseen_round5*.py).

A Mixtral-like decoder (top-2 routing over SwiGLU experts beside an always-on shared expert), a Mamba-like
selective scan (the recurrence over time a Python loop of small ops), a diffusion U-Net (a timestep embedding
handed to every block, skip tensors handed from the down path to the up path across the depth), a
vision-language model (a vision tower and a text tower, each of its own input, meeting in a fusion block: a
branch, not a chain), and an MLP with one layer 500 times the others' FLOPs."""

import torch
import torch.nn.functional as F
from torch import nn

FP32 = 4


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral's routing: softmax over the top-2 router logits per token, each token to those 2 experts; plus a
    shared expert every token goes through (DeepSeek-MoE's)."""

    def __init__(self, d, hidden, experts, k=2):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, hidden) for _ in range(experts))
        self.shared = SwiGLU(d, hidden)
        self.k = k

    def forward(self, x):                                            # (B, S, d)
        flat = x.reshape(-1, x.shape[-1])                            # (T, d)
        logits, idx = self.router(flat).topk(self.k, -1)             # (T, k)
        w = logits.softmax(-1)
        out = self.shared(flat)
        for j, expert in enumerate(self.experts):
            rows, slot = (idx == j).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return out.reshape(x.shape)


class MixtralBlock(nn.Module):
    def __init__(self, d, heads, hidden, experts):
        super().__init__()
        self.h = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.moe = SparseMoE(d, hidden, experts)

    def forward(self, x):                                            # (B, S, d)
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, d / H)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.moe(self.n2(x))


class Mixtral(nn.Module):
    def __init__(self, vocab=40, d=16, heads=2, hidden=24, experts=4, n=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MixtralBlock(d, heads, hidden, experts) for _ in range(n))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):                                          # (B, S) int64 -> (B, S, vocab)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class SelectiveScan(nn.Module):
    """Mamba-like: x -> (u, z) by in_proj, per-token step sizes and B, C from u, then the recurrence
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t, written as a Python loop over time (no fused
    scan kernel), gated by silu(z), out_proj."""

    def __init__(self, d, inner, state):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.x_proj = nn.Linear(inner, 1 + 2 * state, bias=False)    # dt, B, C
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.state = state

    def forward(self, x):                                            # (B, T, d)
        u, z = self.in_proj(x).chunk(2, -1)                          # (B, T, inner) each
        dt, Bm, Cm = self.x_proj(u).split([1, self.state, self.state], -1)
        dt = F.softplus(dt)                                          # (B, T, 1)
        A = -torch.exp(self.A_log)                                   # (inner, state)
        h = u.new_zeros(u.shape[0], u.shape[2], self.state)          # (B, inner, state)
        ys = []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t, :, None] * Bm[:, t, None, :]) * u[:, t, :, None]
            ys.append((h * Cm[:, t, None, :]).sum(-1) + self.D * u[:, t])
        y = torch.stack(ys, 1)                                       # (B, T, inner)
        return x + self.out_proj(y * F.silu(z))


class MambaLike(nn.Module):
    def __init__(self, d=8, inner=12, state=4, n=2, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(SelectiveScan(d, inner, state) for _ in range(n))
        self.head = nn.Linear(d, classes)

    def forward(self, x):                                            # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ResBlock(nn.Module):
    """A U-Net level: conv, the timestep embedding added per channel, conv; ``skip_ch`` channels of a skip tensor
    concatenated to its input first (the up path)."""

    def __init__(self, cin, cout, temb, skip_ch=0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin + skip_ch, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x, temb, skip=None):                           # (B, C, H, W), (B, temb)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        h = F.silu(self.conv1(x)) + self.t(temb)[:, :, None, None]
        return F.silu(self.conv2(h))


class TimeEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.register_buffer("freqs", torch.exp(-torch.arange(dim // 2) / (dim // 2)), persistent=False)

    def forward(self, t):                                            # (B,) float
        a = t[:, None] * self.freqs                                  # (B, dim / 2)
        return F.silu(self.lin(torch.cat([a.sin(), a.cos()], -1)))


class UNet(nn.Module):
    """down1 (8 channels, 8 x 8), down2 (16, 4 x 4 after pooling), mid, up2 (takes down2's output as its skip),
    up1 (down1's output, after upsampling), out. The skips are arguments of the up blocks, as diffusers passes
    ``res_hidden_states_tuple``: a pipeline cut after down2 must carry down1's output to the stage of up1."""

    def __init__(self, ch=3, temb=8):
        super().__init__()
        self.time = TimeEmbed(temb)
        self.down1 = ResBlock(ch, 8, temb)
        self.down2 = ResBlock(8, 16, temb)
        self.mid = ResBlock(16, 16, temb)
        self.up2 = ResBlock(16, 8, temb, skip_ch=16)
        self.up1 = ResBlock(8, 8, temb, skip_ch=8)
        self.out = nn.Conv2d(8, ch, 1)

    def forward(self, x, t):                                         # (B, 3, 8, 8), (B,)
        e = self.time(t)
        h1 = self.down1(x, e)                                        # (B, 8, 8, 8)
        h2 = self.down2(F.avg_pool2d(h1, 2), e)                      # (B, 16, 4, 4)
        m = self.mid(h2, e)                                          # (B, 16, 4, 4)
        u2 = self.up2(m, e, h2)                                      # (B, 8, 4, 4)
        u1 = self.up1(F.interpolate(u2, scale_factor=2.0), e, h1)    # (B, 8, 8, 8)
        return self.out(u1)


class TowerBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Fusion(nn.Module):
    """The text tokens attend to the image patches (cross-attention), then a linear head."""

    def __init__(self, d, vocab):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, text, image):                                  # (B, T, d), (B, P, d)
        return self.head(text + self.attn(text, image, image, need_weights=False)[0])


class VisionLanguage(nn.Module):
    """Two towers, each over its own input: patches (B, 6, 12) through a patch projection and 2 blocks, token ids
    (B, 5) through an embedding and 2 blocks; they meet in the fusion block. Run in that order, a cut inside the
    text tower leaves the image tower's output to be carried past it to the fusion."""

    def __init__(self, patch=12, d=8, vocab=30):
        super().__init__()
        self.patch = nn.Linear(patch, d)
        self.vision = nn.ModuleList(TowerBlock(d) for _ in range(2))
        self.embed = nn.Embedding(vocab, d)
        self.text = nn.ModuleList(TowerBlock(d) for _ in range(2))
        self.fusion = Fusion(d, vocab)

    def forward(self, patches, ids):                                 # (B, 6, 12) float, (B, 5) int64
        v = self.patch(patches)
        for block in self.vision:
            v = block(v)
        t = self.embed(ids)
        for block in self.text:
            t = block(t)
        return self.fusion(t, v)


class Wide(nn.Module):
    """One layer: a (d -> wide -> d) MLP."""

    def __init__(self, d, wide):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, wide), nn.Linear(wide, d)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)))


def uneven(d=8, wide=512):
    """Six layers whose third is a (d -> wide -> d) MLP: 2 x 2 x 8 x 512 FLOPs per token against 2 x 8 x 8."""
    return nn.Sequential(nn.Linear(d, d), nn.Linear(d, d), Wide(d, wide), nn.Linear(d, d), nn.Linear(d, d),
                         nn.Linear(d, 2))


def _build():
    torch.manual_seed(0)
    return {
        "mixtral": (Mixtral(), torch.randint(0, 40, (2, 6))),
        "mamba": (MambaLike(), torch.randn(2, 5, 8)),
        "unet": (UNet(), (torch.randn(2, 3, 8, 8), torch.rand(2) * 1000)),
        "vlm": (VisionLanguage(), (torch.randn(2, 6, 12), torch.randint(0, 30, (2, 5)))),
        "uneven": (uneven(), torch.randn(2, 4, 8)),
    }


MODELS = _build()


def args_of(x):
    return x if isinstance(x, tuple) else (x,)


def swiglu(d, hidden):
    return 3 * d * hidden


def res(cin, cout, temb, skip=0):
    return (cin + skip) * cout * 9 + cout + temb * cout + cout + cout * cout * 9 + cout


def tower(d):
    return 2 * d + d * 2 * d + 2 * d + 2 * d * d + d


# parameter elements and buffer bytes counted by hand from the constructors
BY_HAND = {
    "mixtral": (40 * 16 + 2 * (2 * 16 + 16 * 48 + 16 * 16 + 16 * 4 + 5 * swiglu(16, 24)) + 16 + 16 * 40, 0),
    "mamba": (2 * (8 * 24 + 12 * 9 + 12 * 4 + 12 + 12 * 8) + 8 * 3 + 3, 0),
    "unet": (8 * 8 + 8 + res(3, 8, 8) + res(8, 16, 8) + res(16, 16, 8) + res(16, 8, 8, 16) + res(8, 8, 8, 8)
             + 8 * 3 + 3, 4 * FP32),
    "vlm": (12 * 8 + 8 + 2 * tower(8) + 30 * 8 + 2 * tower(8) + (3 * 8 * 8 + 3 * 8 + 8 * 8 + 8) + 8 * 30 + 30, 0),
    "uneven": (4 * (8 * 8 + 8) + (8 * 512 + 512 + 512 * 8 + 8) + 8 * 2 + 2, 0),
}
