"""A third round of models the profiler was not written against (tests/perf/test_perf_heldout_round3.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round3.py:unet --device cpu --train

Each builder returns ``(model, inputs)``. The op kinds are those rounds 1 and 2 leave out: an LSTM with a projection
and a loss in forward, recurrent cells stepped in Python, a ConvTranspose1d/GLU/weight-norm audio net,
GroupNorm/SiLU/Hardswish/squeeze-excite, nearest and bilinear upsampling with skip concatenations, scatter-based
expert routing (also noisy: shapes that change every step), an EmbeddingBag recommender with per-sample weights, a
ViT (patch convolution, a class token, nn.MultiheadAttention returning its weights), nn.Bilinear and a three-operand
einsum, 2-d FFT mixing, in-place updates through views, bf16 / float64 models, a spatial transformer (affine_grid,
grid_sample), unbatched vector algebra (mv, dot, addr, trace), a Gaussian process (cholesky, cholesky_solve,
slogdet), a dynamically quantized MLP and a torch.library custom op. Sizes are tiny: what is
checked is the counting, not the speed.
"""

from __future__ import annotations

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH = 2
VOCAB, EMB, HIDDEN, PROJ, SEQ = 40, 12, 16, 8, 6  # LSTM language model
CELL_IN, CELL_HIDDEN, CELL_STEPS = 6, 10, 3  # recurrent cells stepped in Python
AUDIO_CH, AUDIO_LEN = 4, 32  # audio net: channels and samples in
IMG_CH, IMG = 8, 8  # mobile CNN and U-Net: channels and pixels per side
GROUPS = 4  # GroupNorm groups and grouped-convolution groups
EXPERTS, TOP_K, TOKENS, DIM = 4, 2, 10, 16  # mixture of experts
TABLES, ROWS, BAG_DIM, BAG_LEN, DENSE = 3, 50, 8, 4, 5  # recommender
PATCH, CLASSES, HEADS = 4, 10, 2  # vision transformer: 16x16 image -> 16 patches of 4x4
VIT_IMAGE = 16
FNET_TOKENS = 8
GP_POINTS, GP_FEATURES, GP_NOISE = 6, 3, 0.1  # Gaussian process: points per batch entry, features, jitter


class LstmLM(nn.Module):
    """Embedding, a 2-layer LSTM with a projection (proj_size: no fused CPU kernel), a vocabulary head and the
    cross-entropy loss computed in forward, as language-model training code returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = nn.LSTM(EMB, HIDDEN, num_layers=2, proj_size=PROJ, batch_first=True)
        self.head = nn.Linear(PROJ, VOCAB)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (B, T) int64 each
        h, _ = self.rnn(self.emb(tokens))  # (B, T, PROJ)
        logits = self.head(h)  # (B, T, VOCAB)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


class Cells(nn.Module):
    """An LSTMCell and a GRUCell stepped in a Python loop (a decoder's inner loop), an RNN(tanh) beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(CELL_IN, CELL_HIDDEN)
        self.gru = nn.GRUCell(CELL_IN, CELL_HIDDEN)
        self.rnn = nn.RNN(CELL_IN, CELL_HIDDEN, nonlinearity="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B, I)
        h = c = g = x.new_zeros(x.shape[1], CELL_HIDDEN)  # (B, H)
        for t in range(x.shape[0]):
            h, c = self.lstm(x[t], (h, c))
            g = self.gru(x[t], g)
        return h + g + self.rnn(x)[0][-1]


class AudioNet(nn.Module):
    """Reflection-padded dilated grouped Conv1d, a weight-normed Conv1d feeding a GLU, a strided ConvTranspose1d
    upsampler and a PReLU: a WaveNet/HiFi-GAN-like stack."""

    def __init__(self) -> None:
        super().__init__()
        self.dilated = nn.Conv1d(AUDIO_CH, 2 * AUDIO_CH, 3, dilation=2, groups=2)
        self.gated = nn.utils.parametrizations.weight_norm(nn.Conv1d(2 * AUDIO_CH, 2 * AUDIO_CH, 1))
        self.up = nn.ConvTranspose1d(AUDIO_CH, AUDIO_CH, 4, stride=2, padding=1)
        self.act = nn.PReLU(AUDIO_CH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, L)
        y = self.dilated(F.pad(x, (2, 2), mode="reflect"))  # (B, 2C, L)
        y = F.glu(self.gated(y), dim=1)  # (B, C, L)
        return self.act(self.up(y))  # (B, C, 2L)


class MobileBlock(nn.Module):
    """Depthwise-separable block: depthwise 3x3, GroupNorm, SiLU, squeeze-excite, pointwise 1x1, Hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, IMG_CH, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(IMG_CH, IMG_CH, 3, padding=1, groups=IMG_CH, bias=False)
        self.norm = nn.GroupNorm(GROUPS, IMG_CH)
        self.se_down, self.se_up = nn.Conv2d(IMG_CH, 2, 1), nn.Conv2d(2, IMG_CH, 1)
        self.pw = nn.Conv2d(IMG_CH, 2 * IMG_CH, 1, bias=False)
        self.head = nn.Linear(2 * IMG_CH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 2*IMG, 2*IMG)
        x = F.relu6(self.stem(x))  # (B, C, IMG, IMG)
        y = F.silu(self.norm(self.dw(x)))
        y = y * torch.sigmoid(self.se_up(F.relu(self.se_down(F.adaptive_avg_pool2d(y, 1)))))  # squeeze-excite
        y = F.hardswish(self.pw(y + x))  # (B, 2C, IMG, IMG)
        return self.head(y.mean((2, 3)))


class UNet(nn.Module):
    """Two levels: down by max-pool, up by nearest interpolation and by bilinear interpolation, skips joined
    with torch.cat, a ConvTranspose2d bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        c = IMG_CH
        self.enc1, self.enc2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bottleneck = nn.ConvTranspose2d(2 * c, 2 * c, 3, padding=1)
        self.dec2, self.dec1 = nn.Conv2d(4 * c, c, 3, padding=1), nn.Conv2d(2 * c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        e1 = F.relu(self.enc1(x))  # (B, C, H, W)
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))  # (B, 2C, H/2, W/2)
        b = self.bottleneck(F.max_pool2d(e2, 2))  # (B, 2C, H/4, W/4)
        d2 = F.relu(self.dec2(torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), e2], 1)))  # (B, C, ..)
        up = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)  # (B, C, H, W)
        return self.dec1(torch.cat([up, e1], 1))  # (B, 1, H, W)


class ScatterMoE(nn.Module):
    """Top-k routing by sort: tokens grouped by expert (argsort, bincount), gathered with index_select, each
    expert's rows run, results weighted and scattered back with scatter_add; a load-balancing count kept by an
    accumulating index_put_."""

    def __init__(self, noisy: bool = False) -> None:
        super().__init__()
        self.noisy = noisy  # noisy top-k gating: routing, and so each expert's row count, changes every step
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(EXPERTS, DIM, 2 * DIM) / DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, 2 * DIM, DIM) / DIM**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, D)
        logits = self.router(x)  # (T, E)
        if self.noisy:
            logits = logits + torch.randn_like(logits)
        probs = logits.softmax(-1)
        weight, expert = probs.topk(TOP_K, dim=-1)  # (T, K) each
        flat = expert.reshape(-1)  # (T*K,)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=EXPERTS).tolist()
        token = order // TOP_K  # which token each sorted slot came from
        rows = x.index_select(0, token)  # (T*K, D)
        outs = [
            F.gelu(chunk @ self.w1[e]) @ self.w2[e]
            for e, chunk in enumerate(rows.split(counts))
        ]  # each (n_e, D)
        y = torch.cat(outs) * weight.reshape(-1).gather(0, order)[:, None]  # (T*K, D)
        out = x.new_zeros(x.shape).scatter_add(0, token[:, None].expand(-1, DIM), y)  # (T, D)
        load = x.new_zeros(EXPERTS).index_put_((flat,), probs.gather(1, expert).reshape(-1), accumulate=True)
        return out + load.sum()


class Recommender(nn.Module):
    """DLRM-like: a bottom MLP for dense features, EmbeddingBags (sum, per-sample weights) for sparse ones,
    pairwise dot-product interaction by bmm, its lower triangle taken with tril_indices, a top MLP, and a
    binary cross-entropy loss in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(DENSE, BAG_DIM), nn.ReLU())
        self.bags = nn.ModuleList(nn.EmbeddingBag(ROWS, BAG_DIM, mode="sum") for _ in range(TABLES))
        pairs = (TABLES + 1) * TABLES // 2
        self.top = nn.Linear(pairs + BAG_DIM, 1)

    def forward(self, dense, idx, offsets, weights, label):  # (B, DENSE), (T, n), (T, B), (T, n), (B,)
        d = self.bottom(dense)  # (B, F)
        feats = torch.stack([d] + [bag(i, o, per_sample_weights=w) for bag, i, o, w in zip(
            self.bags, idx, offsets, weights, strict=True)], 1)  # (B, T+1, F)
        inter = torch.bmm(feats, feats.transpose(1, 2))  # (B, T+1, T+1)
        r, c = torch.tril_indices(TABLES + 1, TABLES + 1, -1)
        z = torch.cat([d, inter[:, r, c]], 1)  # (B, F + pairs)
        return F.binary_cross_entropy_with_logits(self.top(z).squeeze(1), label)


class ViT(nn.Module):
    """Patch embedding by a strided Conv2d, a class token prepended, learned positions, one pre-norm block with
    nn.MultiheadAttention returning its (head-averaged) weights, a tanh-GELU MLP, a class-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        n = (VIT_IMAGE // PATCH) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, n + 1, DIM) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # img: (B, 3, H, W)
        x = self.patch(img).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos  # (B, N+1, D)
        h = self.norm1(x)
        a, weights = self.attn(h, h, h)  # (B, N+1, D), (B, N+1, N+1)
        x = x + a
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return self.head(x[:, 0]), weights


class BilinearAttention(nn.Module):
    """Bilinear scores by a three-operand einsum (q W k^T), a softmax, and an nn.Bilinear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, DIM) / DIM)
        self.readout = nn.Bilinear(DIM, DIM, CLASSES)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # q: (B, N, D), k: (B, M, D)
        scores = torch.einsum("bnd,de,bme->bnm", q, self.w, k)  # (B, N, M)
        ctx = torch.einsum("bnm,bmd->bnd", scores.softmax(-1), k)  # (B, N, D)
        return self.readout(q.mean(1), ctx.mean(1))  # (B, CLASSES)


class FNet(nn.Module):
    """FNet mixing: the real part of a 2-d FFT over (tokens, features), then a spectral filter by rfft/irfft
    along the tokens, each followed by LayerNorm; an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.filter = nn.Parameter(torch.randn(FNET_TOKENS // 2 + 1, DIM))
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        x = self.norm1(x + torch.fft.fft2(x).real)
        spectrum = torch.fft.rfft(x, dim=1) * self.filter  # (B, N/2+1, D) complex
        x = self.norm2(x + torch.fft.irfft(spectrum, n=x.shape[1], dim=1))
        return x + self.mlp(x)


class ViewsInPlace(nn.Module):
    """In-place updates through views: narrow().add_(), mul_ on a slice, clamp_, addcmul_, masked_fill_,
    sliding windows by Tensor.unfold (a view) and by F.unfold (im2col) feeding a matmul, F.fold back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.w = nn.Parameter(torch.randn(IMG_CH, IMG_CH * 9) / 9)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:  # x: (B, N, D), img: (B, C, H, W)
        y = self.lin(x) * 1.0  # (B, N, D), a fresh tensor to update in place
        y.narrow(2, 0, DIM // 2).add_(1.0)
        y[:, 1:].mul_(0.5)
        y.clamp_(-3.0, 3.0).addcmul_(x, x, value=0.1)
        y.masked_fill_(x > 2.0, 0.0)
        windows = y.unfold(1, 3, 1)  # (B, N-2, D, 3): a view
        cols = F.unfold(img, 3, padding=1)  # (B, C*9, H*W)
        conv = self.w @ cols  # (B, C, H*W): a convolution as a matmul
        back = F.fold(conv.repeat(1, 9, 1), img.shape[-2:], 3, padding=1)  # (B, C, H, W)
        return windows.sum() + back.sum()


class DtypeMLP(nn.Module):
    """A conv and an MLP in the given dtype (bf16, float64): layer norm, GELU, matmuls, a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, IMG_CH, 3, padding=1)
        self.norm = nn.LayerNorm(IMG_CH)
        self.fc1, self.fc2 = nn.Linear(IMG_CH, DIM), nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        y = self.conv(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))  # (B, H*W, CLASSES)
        return y.softmax(-1)


class InferenceModeViT(ViT):
    """The ViT with its forward under torch.inference_mode: composites (linear, layer_norm, attention) reach
    the dispatch mode whole and are counted as the ops they run."""

    @torch.inference_mode()
    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(img)


class SpatialTransformer(nn.Module):
    """A spatial transformer: a localisation net predicts an affine map per image, affine_grid turns it into a
    sampling grid, grid_sample resamples the image bilinearly, a classifier follows."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Sequential(nn.Conv2d(3, IMG_CH, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.theta = nn.Linear(IMG_CH, 6)
        self.conv = nn.Conv2d(3, IMG_CH, 3, padding=1)
        self.head = nn.Linear(IMG_CH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        theta = self.theta(self.loc(x)).view(-1, 2, 3)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
        warped = F.grid_sample(x, grid, mode="bilinear", align_corners=False)  # (B, 3, H, W)
        return self.head(F.relu(self.conv(warped)).mean((2, 3)))


class VectorOps(nn.Module):
    """Unbatched vector algebra, as a single-sample scorer or a Hebbian update writes it: a matrix-vector product
    (mv), a dot product, a rank-1 update (addr), a trace, an RReLU with random slopes and a histogram."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, DIM) / DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (D,)
        y = F.rrelu(torch.mv(self.w, x), training=True)  # (D,)
        updated = torch.addr(self.w, y, x, alpha=0.1)  # (D, D): w + 0.1 y x^T
        counts = torch.histc(y.detach(), bins=4)  # (4,)
        return torch.dot(y, x) + torch.trace(updated) + counts.sum()


class GaussianProcess(nn.Module):
    """A Gaussian-process marginal likelihood: an RBF kernel from pairwise distances (cdist), a Cholesky
    factorisation, a solve with the factor (cholesky_solve) and the log-determinant (slogdet)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x: (B, N, F), y: (B, N, 1)
        d = torch.cdist(x, x) / self.log_scale.exp()  # (B, N, N)
        k = torch.exp(-0.5 * d * d) + GP_NOISE * torch.eye(x.shape[1])
        alpha = torch.cholesky_solve(y, torch.linalg.cholesky(k))  # (B, N, 1)
        return 0.5 * (y * alpha).sum() + 0.5 * torch.linalg.slogdet(k)[1].sum()


CUSTOM_NAMESPACE = "perf_round3"
if not hasattr(getattr(torch.ops, CUSTOM_NAMESPACE), "soft_clip"):  # once, however often this file is loaded

    @torch.library.custom_op(f"{CUSTOM_NAMESPACE}::soft_clip", mutates_args=())
    def soft_clip(x: torch.Tensor) -> torch.Tensor:
        """A custom op outside ATen (as a fused kernel would be registered): 3 tanh(x / 3)."""
        return torch.tanh(x / 3.0) * 3.0


class CustomOp(nn.Module):
    """Two linears around a ``torch.library`` custom op: an op of another namespace than aten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, D)
        return self.b(getattr(torch.ops, CUSTOM_NAMESPACE).soft_clip(self.a(x)))




@seeded
def lstm_lm():
    return LstmLM(), (torch.randint(0, VOCAB, (BATCH, SEQ)), torch.randint(0, VOCAB, (BATCH, SEQ)))


@seeded
def cells():
    return Cells(), (torch.randn(CELL_STEPS, BATCH, CELL_IN),)


@seeded
def audio():
    return AudioNet(), (torch.randn(BATCH, AUDIO_CH, AUDIO_LEN),)


@seeded
def mobile():
    return MobileBlock(), (torch.randn(BATCH, 3, 2 * IMG, 2 * IMG),)


@seeded
def unet():
    return UNet(), (torch.randn(BATCH, 3, IMG, IMG),)


@seeded
def scatter_moe():
    return ScatterMoE(), (torch.randn(TOKENS, DIM),)


@seeded
def noisy_moe():
    return ScatterMoE(noisy=True), (torch.randn(TOKENS, DIM),)


@seeded
def recommender():
    idx = torch.randint(0, ROWS, (TABLES, BATCH * BAG_LEN))
    offsets = torch.arange(0, BATCH * BAG_LEN, BAG_LEN).repeat(TABLES, 1)  # (T, B): BAG_LEN ids per bag
    weights = torch.rand(TABLES, BATCH * BAG_LEN)
    return Recommender(), (torch.randn(BATCH, DENSE), idx, offsets, weights, torch.rand(BATCH))


@seeded
def vit():
    return ViT(), (torch.randn(BATCH, 3, VIT_IMAGE, VIT_IMAGE),)


@seeded
def vit_inference_mode():
    return InferenceModeViT(), (torch.randn(BATCH, 3, VIT_IMAGE, VIT_IMAGE),)


@seeded
def bilinear_attention():
    return BilinearAttention(), (torch.randn(BATCH, 5, DIM), torch.randn(BATCH, 7, DIM))


@seeded
def fnet():
    return FNet(), (torch.randn(BATCH, FNET_TOKENS, DIM),)


@seeded
def views_in_place():
    return ViewsInPlace(), (torch.randn(BATCH, 6, DIM), torch.randn(BATCH, IMG_CH, 4, 4))


@seeded
def mlp_bf16():
    return DtypeMLP().to(torch.bfloat16), (torch.randn(BATCH, 3, IMG, IMG, dtype=torch.bfloat16),)


@seeded
def mlp_fp64():
    return DtypeMLP().to(torch.float64), (torch.randn(BATCH, 3, IMG, IMG, dtype=torch.float64),)


@seeded
def spatial_transformer():
    return SpatialTransformer(), (torch.randn(BATCH, 3, IMG, IMG),)


@seeded
def vector_ops():
    return VectorOps(), (torch.randn(DIM),)


@seeded
def gaussian_process():
    return GaussianProcess(), (torch.randn(BATCH, GP_POINTS, GP_FEATURES), torch.randn(BATCH, GP_POINTS, 1))


@seeded
def quantized_mlp():
    """An MLP after dynamic int8 quantization (CPU inference): its linears run as quantized::linear_dynamic."""
    mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM))
    return torch.ao.quantization.quantize_dynamic(mlp, {nn.Linear}, dtype=torch.qint8), (torch.randn(TOKENS, DIM),)


@seeded
def custom_op():
    return CustomOp(), (torch.randn(TOKENS, DIM),)


# name -> (builder, whether a backward step makes sense)
MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (lstm_lm, True),
        (cells, True),
        (audio, True),
        (mobile, True),
        (unet, True),
        (scatter_moe, True),
        (noisy_moe, True),
        (recommender, True),
        (vit, True),
        (vit_inference_mode, False),
        (bilinear_attention, True),
        (fnet, True),
        (views_in_place, True),
        (mlp_bf16, True),
        (mlp_fp64, True),
        (spatial_transformer, True),
        (vector_ops, True),
        (gaussian_process, True),
        (custom_op, False),  # no autograd registered for the custom op
        (quantized_mlp, False),  # int8 weights: inference only
    )
}
build = unet
