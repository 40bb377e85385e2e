"""An eighth round of models the profiler was not written against (tests/perf/test_profile_unseen_round8*.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round8.py:glow_step --device cpu --train

Each builder returns ``(model, inputs)``. The families are those rounds 1-7 leave out: a top-2 MoE dispatching
tokens sorted by expert (argsort, split by counts, index_add_ of the gate-weighted outputs), a stateful LSTM language
model carrying its hidden state across calls in a plain attribute (truncated BPTT) with a head tied to its embedding,
a Glow step (ActNorm initialised from its first batch behind a Python flag, an invertible 1x1 convolution with its
log-determinant, an affine coupling), attention whose queries and keys differ in length under is_causal (top-left
aligned), nn.MultiheadAttention sequence-first with add_bias_kv, add_zero_attn and per-head weights, a GAN
discriminator under spectral_norm (power iteration updating its u and v in training) with a minibatch-stddev
feature, a global filter network (rfft2, a complex filter, irfft2), a StyleGAN2 modulated convolution (per-sample
weights as one grouped convolution, a grouped transposed convolution to upsample, noise from the model's own
torch.Generator), causal linear attention by cumulative sums of outer products, neighbourhood attention over unfold
windows folded back (col2im), a Conformer convolution module (GLU, depthwise Conv1d, BatchNorm) between macaron
half-step FFNs, and a float64 tied-weight autoencoder on as_strided windows with in-place activations. Sizes are
tiny: what is checked is the counting, not the speed.
"""

from __future__ import annotations

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

BATCH = 2
MOE_TOKENS, MOE_DIM, MOE_HIDDEN, MOE_EXPERTS = 10, 6, 12, 4  # top-2 MoE
LM_VOCAB, LM_DIM, LM_LAYERS, LM_LEN = 11, 8, 2, 5  # stateful LSTM LM (hidden = embedding width: tied head)
GLOW_CH, GLOW_SIDE, GLOW_HIDDEN = 4, 4, 8  # Glow step: channels, image side, coupling net width
CA_HEADS, CA_DIM, CA_SHORT, CA_LONG = 2, 4, 3, 7  # causal attention of unequal lengths: head width, lengths
MB_DIM, MB_HEADS, MB_LEN, MB_SRC = 8, 2, 5, 6  # nn.MultiheadAttention: width, heads, target and source length
SN_CH, SN_SIDE, SN_HIDDEN = 3, 8, 6  # spectral-norm discriminator
GF_SIDE, GF_DIM = 6, 4  # global filter network: token grid side, width
MC_STYLE, MC_IN, MC_OUT, MC_SIDE, MC_K = 5, 3, 4, 4, 3  # modulated convolution
LIN_LEN, LIN_DIM = 6, 4  # causal linear attention: tokens, head width (keys and values alike)
NA_CH, NA_SIDE, NA_K = 4, 5, 3  # neighbourhood attention: channels, image side, window
CF_LEN, CF_DIM, CF_K = 7, 8, 5  # Conformer: frames, width, depthwise kernel
AE_LEN, AE_WINDOW, AE_STRIDE, AE_HIDDEN = 20, 6, 2, 4  # tied autoencoder on overlapping windows


class Top2MoE(nn.Module):
    """Top-2 routing: softmax over the router logits, the best two experts per token with their renormalised
    probabilities; the (token, expert) pairs are sorted by expert (argsort), split by bincount counts, each expert's
    two-layer MLP runs on its rows, and the gate-weighted outputs are index_add_-ed back to their tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(MOE_DIM, MOE_EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(MOE_EXPERTS, MOE_DIM, MOE_HIDDEN) / MOE_DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(MOE_EXPERTS, MOE_HIDDEN, MOE_DIM) / MOE_HIDDEN**0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (T, D) -> (T, 2) gates, experts
        probs = self.router(x).softmax(-1)
        gates, experts = probs.topk(2, dim=-1)
        return gates / gates.sum(-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D)
        gates, experts = self.route(x)
        flat = experts.flatten()  # (2T,): pair p is token p // 2
        order = flat.argsort(stable=True)
        tokens, weights = order // 2, gates.flatten()[order]
        counts = torch.bincount(flat, minlength=MOE_EXPERTS).tolist()
        out = torch.zeros_like(x)
        for e, (rows, w) in enumerate(zip(tokens.split(counts), weights.split(counts), strict=True)):
            h = F.gelu(x[rows] @ self.w1[e]) @ self.w2[e]  # (n_e, D)
            out.index_add_(0, rows, h * w[:, None])
        return out


class StatefulLM(nn.Module):
    """Truncated BPTT: the LSTM's (h, c) from the previous call, detached, in a plain attribute (not a buffer)
    start the next one; the output head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(LM_VOCAB, LM_DIM)
        self.lstm = nn.LSTM(LM_DIM, LM_DIM, LM_LAYERS, batch_first=True)
        self.head = nn.Linear(LM_DIM, LM_VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h, state = self.lstm(self.embed(tokens), self.state)
        self.state = tuple(s.detach() for s in state)
        return self.head(h)


class ActNorm(nn.Module):
    """Per-channel affine whose scale and shift are set from the first batch it sees (zero mean, unit variance),
    behind a Python flag; its log-determinant is H*W*sum(log|scale|)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.initialized = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
            self.initialized = True
        return (x + self.loc) * self.log_scale.exp(), x.shape[2] * x.shape[3] * self.log_scale.sum()


class GlowStep(nn.Module):
    """ActNorm, an invertible 1x1 convolution (its log|det| by slogdet, times H*W), an affine coupling: half the
    channels through a small conv net give a sigmoid scale and a shift for the other half."""

    def __init__(self) -> None:
        super().__init__()
        self.actnorm = ActNorm(GLOW_CH)
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(GLOW_CH, GLOW_CH))[0])
        half = GLOW_CH // 2
        self.net = nn.Sequential(
            nn.Conv2d(half, GLOW_HIDDEN, 3, padding=1), nn.ReLU(), nn.Conv2d(GLOW_HIDDEN, GLOW_CH, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, S, S)
        x, logdet = self.actnorm(x)
        x = F.conv2d(x, self.weight[:, :, None, None])
        logdet = logdet + x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1]
        xa, xb = x.chunk(2, 1)
        log_s, t = self.net(xa).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        yb = (xb + t) * s
        return torch.cat([xa, yb], 1), logdet + torch.log(s).flatten(1).sum(1)


class UnequalCausal(nn.Module):
    """SDPA with is_causal where queries and keys differ in length (top-left aligned: query i sees keys 0..i):
    the first CA_SHORT positions against all CA_LONG keys, and all CA_LONG positions against a CA_SHORT-key prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(CA_HEADS * CA_DIM, 3 * CA_HEADS * CA_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, LONG, H*D)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, CA_HEADS, CA_DIM).permute(2, 0, 3, 1, 4)  # each (B, H, LONG, D)
        head = F.scaled_dot_product_attention(q[:, :, :CA_SHORT], k, v, is_causal=True)  # (B, H, SHORT, D)
        tail = F.scaled_dot_product_attention(q, k[:, :, :CA_SHORT], v[:, :, :CA_SHORT], is_causal=True)
        return head.sum((1, 2)) + tail.mean((1, 2))  # (B, D)


class BiasKvAttention(nn.Module):
    """nn.MultiheadAttention sequence-first (L, B, E) with add_bias_kv (a learned key and value appended) and
    add_zero_attn (a zero key and value appended), a key padding mask, per-head attention weights returned."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(MB_DIM, MB_HEADS, add_bias_kv=True, add_zero_attn=True)

    def forward(self, tgt: torch.Tensor, src: torch.Tensor, padding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # (L, B, E), (S, B, E), (B, S) bool
        out, weights = self.attn(tgt, src, src, key_padding_mask=padding, average_attn_weights=False)
        return out, weights  # (L, B, E), (B, H, L, S + 2)


class SnDiscriminator(nn.Module):
    """Two strided convolutions and a linear head, each under spectral_norm (one power iteration per forward in
    training, updating its u and v buffers), LeakyReLU, and a minibatch-stddev channel before the head."""

    def __init__(self) -> None:
        super().__init__()
        sn = parametrizations.spectral_norm
        self.c1 = sn(nn.Conv2d(SN_CH, SN_HIDDEN, 4, 2, 1))
        self.c2 = sn(nn.Conv2d(SN_HIDDEN, SN_HIDDEN, 4, 2, 1))
        self.head = sn(nn.Linear((SN_HIDDEN + 1) * (SN_SIDE // 4) ** 2, 1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, C, S, S)
        h = F.leaky_relu(self.c2(F.leaky_relu(self.c1(img), 0.2)), 0.2)  # (B, HID, S/4, S/4)
        std = h.std(0).mean().expand(h.shape[0], 1, *h.shape[2:])
        return F.relu(1 - self.head(torch.cat([h, std], 1).flatten(1))).mean()  # a hinge loss on "real"


class GlobalFilter(nn.Module):
    """GFNet: tokens on a grid, rfft2 over it (orthonormal), times a learned complex filter, irfft2 back, then a
    LayerNorm'd MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.filter = nn.Parameter(torch.randn(GF_SIDE, GF_SIDE // 2 + 1, GF_DIM, 2) * 0.02)
        self.norm = nn.LayerNorm(GF_DIM)
        self.mlp = nn.Sequential(nn.Linear(GF_DIM, 2 * GF_DIM), nn.GELU(), nn.Linear(2 * GF_DIM, GF_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, S, D)
        f = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")  # (B, S, S/2+1, D) complex
        x = x + torch.fft.irfft2(f * torch.view_as_complex(self.filter), s=x.shape[1:3], dim=(1, 2), norm="ortho")
        return x + self.mlp(self.norm(x))


class ModulatedConv(nn.Module):
    """StyleGAN2: a style per sample scales the weight's input channels (modulation), each output filter is
    renormalised (demodulation), and the batch runs as one convolution with groups=B; then a grouped transposed
    convolution (stride 2) upsamples, and noise from the model's own torch.Generator is added."""

    def __init__(self) -> None:
        super().__init__()
        self.style = nn.Linear(MC_STYLE, MC_IN)
        self.weight = nn.Parameter(torch.randn(MC_OUT, MC_IN, MC_K, MC_K))
        self.up = nn.Parameter(torch.randn(MC_OUT, 1, 4, 4) * 0.1)  # a depthwise transposed filter per channel
        self.noise_strength = nn.Parameter(torch.tensor(0.1))
        self.gen = torch.Generator().manual_seed(7)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (B, IN, S, S), (B, STYLE)
        b = x.shape[0]
        s = self.style(w) + 1  # (B, IN)
        wt = self.weight[None] * s[:, None, :, None, None]  # (B, OUT, IN, K, K)
        wt = wt * torch.rsqrt(wt.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        y = F.conv2d(x.reshape(1, b * MC_IN, MC_SIDE, MC_SIDE), wt.reshape(b * MC_OUT, MC_IN, MC_K, MC_K),
                     padding=MC_K // 2, groups=b)  # (1, B*OUT, S, S)
        # (1, B*OUT, 2S, 2S): each channel upsampled by its own 4x4 filter
        y = F.conv_transpose2d(y, self.up.repeat(b, 1, 1, 1), stride=2, padding=1, groups=b * MC_OUT)
        y = y.reshape(b, MC_OUT, 2 * MC_SIDE, 2 * MC_SIDE)
        noise = torch.randn(b, 1, 2 * MC_SIDE, 2 * MC_SIDE, generator=self.gen)
        return F.leaky_relu(y + self.noise_strength * noise, 0.2)


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos et al.): features elu+1, the running sums of k_t v_t^T (an outer
    product per token, cumsum over time) and of k_t; each output is q_t S_t / (q_t . z_t)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(LIN_DIM, LIN_DIM, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        q, k = F.elu(self.q(x)) + 1, F.elu(self.k(x)) + 1
        v = self.v(x)
        kv = torch.einsum("bnd,bne->bnde", k, v).cumsum(1)  # (B, N, D, D)
        z = k.cumsum(1)  # (B, N, D)
        num = torch.einsum("bnd,bnde->bne", q, kv)
        return num / (torch.einsum("bnd,bnd->bn", q, z)[..., None] + 1e-6)


class NeighbourhoodAttention(nn.Module):
    """Each pixel attends to the K x K window around it: keys and values by F.unfold (im2col, zero-padded),
    scores by einsum, softmax over the window, and the attended values also scattered back over the windows they
    came from by F.fold (col2im, overlap-add) as a second output path."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(NA_CH, 3 * NA_CH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S)
        b, c, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, 1)
        kw = F.unfold(k, NA_K, padding=NA_K // 2).view(b, c, NA_K * NA_K, s * s)  # (B, C, K*K, S*S)
        vw = F.unfold(v, NA_K, padding=NA_K // 2).view(b, c, NA_K * NA_K, s * s)
        attn = torch.einsum("bcp,bckp->bkp", q.flatten(2), kw).div(c**0.5).softmax(1)  # (B, K*K, S*S)
        out = torch.einsum("bkp,bckp->bcp", attn, vw).view(b, c, s, s)
        spread = F.fold((vw * attn[:, None]).reshape(b, c * NA_K * NA_K, s * s), s, NA_K, padding=NA_K // 2)
        return out + spread


class ConformerConv(nn.Module):
    """Macaron FFN (half step), the convolution module (LayerNorm, pointwise Conv1d to 2C, GLU, depthwise Conv1d,
    BatchNorm1d, SiLU, pointwise Conv1d), a second half-step FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.ff1, self.ff2 = (
            nn.Sequential(nn.LayerNorm(CF_DIM), nn.Linear(CF_DIM, 4 * CF_DIM), nn.SiLU(), nn.Linear(4 * CF_DIM, CF_DIM))
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(CF_DIM)
        self.pw1 = nn.Conv1d(CF_DIM, 2 * CF_DIM, 1)
        self.dw = nn.Conv1d(CF_DIM, CF_DIM, CF_K, padding=CF_K // 2, groups=CF_DIM)
        self.bn = nn.BatchNorm1d(CF_DIM)
        self.pw2 = nn.Conv1d(CF_DIM, CF_DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + 0.5 * self.ff1(x)
        h = self.norm(x).transpose(1, 2)  # (B, D, T)
        h = self.pw2(F.silu(self.bn(self.dw(F.glu(self.pw1(h), dim=1)))))
        x = x + h.transpose(1, 2)
        return x + 0.5 * self.ff2(x)


class TiedAutoencoder(nn.Module):
    """float64: overlapping windows of a signal by as_strided (no copy), encoded by W and decoded by W^T (one
    weight), in-place mul_ and relu_, the reconstruction error."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(AE_HIDDEN, AE_WINDOW, dtype=torch.float64) / AE_WINDOW**0.5)
        self.b = nn.Parameter(torch.zeros(AE_HIDDEN, dtype=torch.float64))

    def forward(self, signal: torch.Tensor) -> torch.Tensor:  # (B, LEN) float64
        b, n = signal.shape
        count = (n - AE_WINDOW) // AE_STRIDE + 1
        windows = signal.as_strided((b, count, AE_WINDOW), (n, AE_STRIDE, 1))  # (B, NW, WINDOW)
        h = F.linear(windows, self.w, self.b).mul_(2.0).relu_()  # (B, NW, HIDDEN)
        recon = F.linear(h, self.w.t())  # (B, NW, WINDOW)
        return (recon - windows).pow(2).mean()


def windows_count() -> int:
    return (AE_LEN - AE_WINDOW) // AE_STRIDE + 1


@seeded
def top2_moe():
    return Top2MoE(), (torch.randn(MOE_TOKENS, MOE_DIM),)


@seeded
def stateful_lm():
    return StatefulLM(), (torch.randint(0, LM_VOCAB, (BATCH, LM_LEN)),)


@seeded
def glow_step():
    return GlowStep(), (torch.randn(BATCH, GLOW_CH, GLOW_SIDE, GLOW_SIDE) * 3 + 1,)


@seeded
def unequal_causal():
    return UnequalCausal(), (torch.randn(BATCH, CA_LONG, CA_HEADS * CA_DIM),)


@seeded
def bias_kv_attention():
    padding = torch.zeros(BATCH, MB_SRC, dtype=torch.bool)
    padding[1, -2:] = True  # the second sequence's last two source positions are padding
    return BiasKvAttention(), (torch.randn(MB_LEN, BATCH, MB_DIM), torch.randn(MB_SRC, BATCH, MB_DIM), padding)


@seeded
def sn_discriminator():
    return SnDiscriminator(), (torch.randn(BATCH, SN_CH, SN_SIDE, SN_SIDE),)


@seeded
def global_filter():
    return GlobalFilter(), (torch.randn(BATCH, GF_SIDE, GF_SIDE, GF_DIM),)


@seeded
def modulated_conv():
    return ModulatedConv(), (torch.randn(BATCH, MC_IN, MC_SIDE, MC_SIDE), torch.randn(BATCH, MC_STYLE))


@seeded
def linear_attention():
    return LinearAttention(), (torch.randn(BATCH, LIN_LEN, LIN_DIM),)


@seeded
def neighbourhood_attention():
    return NeighbourhoodAttention(), (torch.randn(BATCH, NA_CH, NA_SIDE, NA_SIDE),)


@seeded
def conformer_conv():
    return ConformerConv(), (torch.randn(BATCH, CF_LEN, CF_DIM),)


@seeded
def tied_autoencoder():
    return TiedAutoencoder(), (torch.randn(BATCH, AE_LEN, dtype=torch.float64),)


MODELS = {
    f.__name__: (f, True)
    for f in (
        top2_moe, stateful_lm, glow_step, unequal_causal, bias_kv_attention, sn_discriminator, global_filter,
        modulated_conv, linear_attention, neighbourhood_attention, conformer_conv, tied_autoencoder,
    )
}
build = glow_step
