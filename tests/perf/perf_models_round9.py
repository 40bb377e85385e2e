"""A ninth round of models the profiler was not written against (tests/perf/test_profile_unseen_round9*.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round9.py:train_step_adamw --device cpu

Each builder returns ``(model, inputs)``. The families are those rounds 1-8 leave out: a ViT whose attention is
grouped-query through SDPA's enable_gqa (patch convolution, class token, nn.RMSNorm), DeepSeek-style multi-head
latent attention (a low-rank KV, query/key heads wider than the value heads, a shared rotary key), document masking
as a block mask (a bool attn_mask from segment ids, Flex-style), a U-Net with a grouped ConvTranspose2d
(output_padding), a dilated 'same' convolution with reflect padding and a skip concatenation, a Soft MoE written in
einsums, nn.TransformerDecoder sequence-first with memory, a causal self-attention flag and a memory padding mask
(called with keyword arguments), EmbeddingBags with padding_idx and include_last_offset, int8 weights dequantized in
forward, a complex128 state-vector circuit with float64 angles, a keyword-only masked LM returning a dataclass with
its loss, an fp16 autocast MLP, training steps written as modules (forward, backward, fused AdamW or SGD with
nesterov momentum, gradient clipping, an LR scheduler; bf16 autocast with a GradScaler; a sparse embedding under
SparseAdam), RetNet's parallel retention (a decay mask, GroupNorm, a swish gate), mixture-of-depths (top-k tokens
gathered and scatter_add-ed back), top-2 experts merged by out-of-place torch.index_add, and a bidirectional
two-layer sequence-first LSTM given its initial state. Sizes are tiny: what is checked is the counting, not the
speed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH = 2
VIT_IMG, VIT_CH, VIT_PATCH, VIT_DIM, VIT_HEADS, VIT_KV, VIT_CLASSES = 8, 3, 4, 16, 4, 2, 5  # ViT with GQA
VIT_TOKENS = (VIT_IMG // VIT_PATCH) ** 2 + 1  # patches and the class token
MLA_LEN, MLA_DIM, MLA_HEADS, MLA_NOPE, MLA_ROPE, MLA_V, MLA_RANK = 5, 16, 2, 4, 2, 3, 6  # latent attention
DOC_LEN, DOC_DIM, DOC_HEADS = 8, 8, 2  # document-masked attention
UN_CH, UN_SIDE, UN_WIDTH = 2, 8, 4  # U-Net: image channels, side, first width
SM_TOKENS, SM_DIM, SM_EXPERTS, SM_SLOTS, SM_HIDDEN = 6, 8, 2, 2, 12  # Soft MoE
TD_TGT, TD_SRC, TD_DIM, TD_HEADS, TD_FF, TD_LAYERS = 5, 6, 8, 2, 16, 2  # nn.TransformerDecoder
EB_VOCAB, EB_DIM, EB_BAG, EB_OUT = 12, 4, 4, 3  # EmbeddingBags
Q8_IN, Q8_HIDDEN, Q8_OUT = 8, 6, 4  # int8 weight-only linears
SV_QUBITS, SV_LAYERS = 4, 2  # state-vector circuit
LM_VOCAB, LM_DIM, LM_LEN = 10, 8, 6  # keyword-only masked LM
AC_IN, AC_HIDDEN, AC_OUT = 8, 16, 4  # fp16 autocast MLP
TS_IN, TS_HIDDEN, TS_OUT, TS_ROWS = 8, 16, 4, 4  # training steps
SE_ROWS, SE_DIM = 50, 4  # sparse embedding step
SE_IDS = torch.tensor([[3, 7, 3], [11, 7, 42]])  # 6 lookups of 4 distinct rows
RT_LEN, RT_DIM, RT_HEADS = 6, 8, 2  # retention
MD_TOKENS, MD_CAPACITY, MD_DIM, MD_HIDDEN = 8, 4, 8, 16  # mixture-of-depths
IA_TOKENS, IA_DIM, IA_HIDDEN, IA_EXPERTS = 10, 6, 8, 3  # top-2 experts by index_add
LS_LEN, LS_IN, LS_HIDDEN, LS_LAYERS = 5, 4, 6, 2  # bidirectional LSTM


class GQAViT(nn.Module):
    """Patchify by a stride-P convolution, a learned class token and positions, RMSNorm, grouped-query attention
    (VIT_HEADS query heads over VIT_KV key/value heads, SDPA's enable_gqa), a linear head on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = VIT_DIM // VIT_HEADS
        self.patch = nn.Conv2d(VIT_CH, VIT_DIM, VIT_PATCH, stride=VIT_PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, VIT_DIM))
        self.pos = nn.Parameter(torch.randn(1, VIT_TOKENS, VIT_DIM))
        self.norm = nn.RMSNorm(VIT_DIM, eps=1e-6)
        self.q = nn.Linear(VIT_DIM, VIT_DIM, bias=False)
        self.kv = nn.Linear(VIT_DIM, 2 * VIT_KV * self.head_dim, bias=False)
        self.o = nn.Linear(VIT_DIM, VIT_DIM, bias=False)
        self.head = nn.Linear(VIT_DIM, VIT_CLASSES)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, classes)
        x = self.patch(img).flatten(2).transpose(1, 2)  # (B, patches, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, N, D)
        b, n, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, VIT_HEADS, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, VIT_KV, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hkv, N, hd) each
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (B, H, N, hd)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, VIT_DIM))
        return self.head(x[:, 0])


class LatentAttention(nn.Module):
    """Multi-head latent attention: the keys and values come up from a rank-MLA_RANK latent; each head's query and
    key are MLA_NOPE + MLA_ROPE wide (a rotary part shared by the heads' keys), its value MLA_V wide, so SDPA gets
    Dqk != Dv and runs its math path (two batched matmuls); causal."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(MLA_DIM, MLA_HEADS * (MLA_NOPE + MLA_ROPE), bias=False)
        self.down = nn.Linear(MLA_DIM, MLA_RANK + MLA_ROPE, bias=False)
        self.up = nn.Linear(MLA_RANK, MLA_HEADS * (MLA_NOPE + MLA_V), bias=False)
        self.o = nn.Linear(MLA_HEADS * MLA_V, MLA_DIM, bias=False)
        angle = torch.arange(MLA_LEN)[:, None] * torch.tensor([1.0, 0.5])[None]  # (N, MLA_ROPE)
        self.register_buffer("cos", angle.cos())
        self.register_buffer("sin", angle.sin())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, 2): a 2-d rotation per position
        return x * self.cos + x.flip(-1) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, MLA_HEADS, MLA_NOPE + MLA_ROPE).transpose(1, 2)
        q = torch.cat([q[..., :MLA_NOPE], self.rotate(q[..., MLA_NOPE:])], dim=-1)
        latent, k_rope = self.down(x).split([MLA_RANK, MLA_ROPE], dim=-1)
        k_nope, v = self.up(latent).view(b, n, MLA_HEADS, MLA_NOPE + MLA_V).transpose(1, 2).split(
            [MLA_NOPE, MLA_V], dim=-1)
        k_rope = self.rotate(k_rope)[:, None].expand(b, MLA_HEADS, n, MLA_ROPE)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, H, N, NOPE + ROPE)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, V)
        return self.o(a.transpose(1, 2).reshape(b, n, MLA_HEADS * MLA_V))


class DocumentMasked(nn.Module):
    """Packed documents: a token attends to earlier tokens of its own document only, the block mask built as a
    bool tensor from segment ids (FlexAttention's document mask, given to SDPA as attn_mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DOC_DIM, 3 * DOC_DIM)
        self.o = nn.Linear(DOC_DIM, DOC_DIM)

    def forward(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, N) ints
        b, n, d = x.shape
        same = segments[:, :, None] == segments[:, None, :]  # (B, N, N)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = (same & causal)[:, None]  # (B, 1, N, N)
        q, k, v = self.qkv(x).view(b, n, 3, DOC_HEADS, d // DOC_HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


class TransposedUNet(nn.Module):
    """A dilated 'same' convolution with reflect padding, a stride-2 convolution down, a grouped ConvTranspose2d
    (stride 2, output_padding 1) back up, the skip concatenated, a 1x1 convolution out."""

    def __init__(self) -> None:
        super().__init__()
        w = UN_WIDTH
        self.enc = nn.Conv2d(UN_CH, w, 3, padding="same", dilation=2, padding_mode="reflect")
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.out = nn.Conv2d(2 * w, UN_CH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S)
        e = F.silu(self.enc(x))
        u = self.up(F.silu(self.down(e)))  # (B, w, S, S)
        return self.out(torch.cat([u, e], dim=1))


class SoftMoE(nn.Module):
    """Soft MoE: every slot a softmax-over-tokens mix of the tokens, each expert's MLP on its slots, every token a
    softmax-over-slots mix of the slots' outputs; all in einsums."""

    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.randn(SM_DIM, SM_EXPERTS, SM_SLOTS) / SM_DIM**0.5)
        self.w1 = nn.Parameter(torch.randn(SM_EXPERTS, SM_DIM, SM_HIDDEN) / SM_DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(SM_EXPERTS, SM_HIDDEN, SM_DIM) / SM_HIDDEN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        logits = torch.einsum("bnd,des->bnes", x, self.phi)
        dispatch = logits.softmax(dim=1)  # over tokens
        combine = logits.flatten(2).softmax(-1).view_as(logits)  # over every expert's slots
        slots = torch.einsum("bnes,bnd->besd", dispatch, x)
        h = F.gelu(torch.einsum("besd,edh->besh", slots, self.w1))
        y = torch.einsum("besh,ehd->besd", h, self.w2)
        return torch.einsum("bnes,besd->bnd", combine, y)


class HashedBags(nn.Module):
    """A mean EmbeddingBag over fixed-length rows padded with index 0 (padding_idx: those entries are skipped), a
    sum bag with per-sample weights over offsets with include_last_offset, both concatenated into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mean_bag = nn.EmbeddingBag(EB_VOCAB, EB_DIM, mode="mean", padding_idx=0)
        self.sum_bag = nn.EmbeddingBag(EB_VOCAB, EB_DIM, mode="sum", include_last_offset=True)
        self.head = nn.Linear(2 * EB_DIM, EB_OUT)

    def forward(self, rows, flat, offsets, weights):  # (B, L) padded, (M,), (B + 1,), (M,)
        a = self.mean_bag(rows)
        s = self.sum_bag(flat, offsets, per_sample_weights=weights)
        return self.head(torch.cat([a, s], dim=-1))


class Int8Linear(nn.Module):
    """A weight-only int8 linear: int8 weights and a per-output-channel scale, dequantized in every forward."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        w = torch.randn(n_out, n_in)
        scale = w.abs().amax(1) / 127
        self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.scale[:, None], self.bias)


class StateVector(nn.Module):
    """A variational circuit on SV_QUBITS qubits: per layer an RY rotation on each qubit (a 2x2 complex128 matrix
    from a float64 angle, applied to the state by einsum over that qubit's axis) and a diagonal entangling phase;
    the output is each basis state's probability and <Z> of qubit 0."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.rand(SV_LAYERS, SV_QUBITS, dtype=torch.float64))
        dim = 2**SV_QUBITS
        phase = torch.tensor([math.pi / 4 * bin(i).count("1") for i in range(dim)], dtype=torch.float64)
        self.register_buffer("phase", torch.polar(torch.ones(dim, dtype=torch.float64), phase))
        self.register_buffer("z0", torch.tensor([1.0 if i < dim // 2 else -1.0 for i in range(dim)],
                                                dtype=torch.float64))

    def forward(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 2**n) complex128
        b = psi.shape[0]
        for layer in range(SV_LAYERS):
            for q in range(SV_QUBITS):
                c, s = (self.theta[layer, q] / 2).cos(), (self.theta[layer, q] / 2).sin()
                gate = torch.stack([torch.stack([c, -s]), torch.stack([s, c])]).to(torch.complex128)  # (2, 2)
                psi = psi.view(b, 2**q, 2, 2 ** (SV_QUBITS - q - 1))
                psi = torch.einsum("ij,bajc->baic", gate, psi).reshape(b, -1)
            psi = psi * self.phase
        probs = psi.abs() ** 2  # (B, 2**n) float64
        return probs, probs @ self.z0


@dataclasses.dataclass
class MaskedLMOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class KeywordMaskedLM(nn.Module):
    """A masked LM called with keyword arguments only (input_ids, attention_mask, labels; -100 ignored) returning
    a dataclass with its loss; the head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(LM_VOCAB, LM_DIM)
        self.mix = nn.Linear(LM_DIM, LM_DIM)
        self.norm = nn.LayerNorm(LM_DIM)
        self.head = nn.Linear(LM_DIM, LM_VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, *, input_ids, attention_mask, labels) -> MaskedLMOutput:
        h = self.embed(input_ids) * attention_mask[..., None]
        h = self.norm(F.gelu(self.mix(h)))
        logits = self.head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss, logits)


class AutocastMLP(nn.Module):
    """An MLP whose forward runs under torch.autocast on the CPU in float16, returning float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(AC_IN, AC_HIDDEN), nn.Linear(AC_HIDDEN, AC_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return self.fc2(F.relu(self.fc1(x))).float()


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(TS_IN, TS_HIDDEN), nn.ReLU(), nn.Linear(TS_HIDDEN, TS_OUT))


class AdamWStep(nn.Module):
    """A whole training step as a module: zero the gradients, MSE loss, backward, a fused AdamW step (weight
    decay). Profiled forward-only (train=False): it runs its own backward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.01, fused=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = F.mse_loss(self.net(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()


class SGDStep(nn.Module):
    """A training step with a fused nesterov-momentum SGD (weight decay), gradients clipped by their global norm,
    and a StepLR scheduler stepped every call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                   fused=True)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = F.mse_loss(self.net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return loss.detach()


class AmpStep(nn.Module):
    """A mixed-precision training step: the forward under bf16 autocast, the loss scaled by a GradScaler, its
    fused AdamW given the scale (it unscales the gradients itself), the scale updated."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(self.net(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()


class SparseEmbeddingStep(nn.Module):
    """A recommender's training step: a sparse-gradient embedding (sparse=True) updated by SparseAdam, a linear
    head by SGD; the looked-up ids repeat (the gradient is coalesced before the update)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(SE_ROWS, SE_DIM, sparse=True)
        self.head = nn.Linear(SE_DIM, 1)
        self.opts = [torch.optim.SparseAdam(self.embed.parameters(), lr=1e-2),
                     torch.optim.SGD(self.head.parameters(), lr=1e-2)]

    def forward(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B, L) ids, (B,) targets
        for opt in self.opts:
            opt.zero_grad()
        loss = F.mse_loss(self.head(self.embed(ids).mean(1)).squeeze(-1), y)
        loss.backward()
        for opt in self.opts:
            opt.step()
        return loss.detach()


class Retention(nn.Module):
    """RetNet's parallel retention: (Q K^T * D) V with D[h, n, m] = gamma_h^(n - m) for m <= n (else 0), a
    GroupNorm per head, a swish gate, an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(RT_DIM, 3 * RT_DIM, bias=False)
        self.gate = nn.Linear(RT_DIM, RT_DIM, bias=False)
        self.o = nn.Linear(RT_DIM, RT_DIM, bias=False)
        self.norm = nn.GroupNorm(RT_HEADS, RT_DIM)
        gamma = 1 - 2.0 ** (-5 - torch.arange(RT_HEADS, dtype=torch.float32))  # (H,)
        n = torch.arange(RT_LEN)
        dist = (n[:, None] - n[None]).float()
        self.register_buffer("decay", torch.where(dist >= 0, gamma[:, None, None] ** dist, torch.zeros(())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, RT_HEADS, d // RT_HEADS).permute(2, 0, 3, 1, 4)
        r = ((q @ k.transpose(-1, -2)) * self.decay) @ v  # (B, H, N, hd)
        r = self.norm(r.transpose(1, 2).reshape(b * n, d)).view(b, n, d)
        return self.o(F.silu(self.gate(x)) * r)


class MixtureOfDepths(nn.Module):
    """Mixture-of-depths: a router scores every token, the top MD_CAPACITY of each sequence go through the MLP
    block (gathered), their router-weighted outputs are scatter_add-ed back onto the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(MD_DIM, 1)
        self.fc1, self.fc2 = nn.Linear(MD_DIM, MD_HIDDEN), nn.Linear(MD_HIDDEN, MD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        scores = self.router(x).squeeze(-1)  # (B, N)
        weight, idx = scores.topk(MD_CAPACITY, dim=-1)  # (B, K)
        where = idx[..., None].expand(-1, -1, x.shape[-1])
        picked = x.gather(1, where)  # (B, K, D)
        y = self.fc2(F.gelu(self.fc1(picked))) * torch.sigmoid(weight)[..., None]
        return x.scatter_add(1, where, y)


class IndexAddMoE(nn.Module):
    """Top-2 experts (nn.Linear MLPs), each run on the tokens that picked it (torch.where on the routing), merged
    by out-of-place torch.index_add with the renormalised gates."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(IA_DIM, IA_EXPERTS, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(IA_DIM, IA_HIDDEN), nn.SiLU(), nn.Linear(IA_HIDDEN, IA_DIM))
            for _ in range(IA_EXPERTS))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (T, 2) gates, (T, 2) experts
        gates, picked = self.router(x).softmax(-1).topk(2, dim=-1)
        return gates / gates.sum(-1, keepdim=True), picked

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D)
        gates, picked = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(picked == e)
            out = torch.index_add(out, 0, rows, expert(x[rows]) * gates[rows, slot, None])
        return out


class BiLSTM(nn.Module):
    """A two-layer bidirectional LSTM on (T, B, I) inputs given its (h0, c0), a head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(LS_IN, LS_HIDDEN, num_layers=LS_LAYERS, bidirectional=True)
        self.head = nn.Linear(2 * LS_HIDDEN, 1)

    def forward(self, x, h0, c0):
        out, _ = self.lstm(x, (h0, c0))  # (T, B, 2H)
        return self.head(out[-1])


@seeded
def vit_gqa():
    return GQAViT(), (torch.randn(BATCH, VIT_CH, VIT_IMG, VIT_IMG),)


@seeded
def latent_attention():
    return LatentAttention(), (torch.randn(BATCH, MLA_LEN, MLA_DIM),)


@seeded
def document_mask():
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    return DocumentMasked(), (torch.randn(BATCH, DOC_LEN, DOC_DIM), segments)


@seeded
def transposed_unet():
    return TransposedUNet(), (torch.randn(BATCH, UN_CH, UN_SIDE, UN_SIDE),)


@seeded
def soft_moe():
    return SoftMoE(), (torch.randn(BATCH, SM_TOKENS, SM_DIM),)


@seeded
def transformer_decoder():
    layer = nn.TransformerDecoderLayer(TD_DIM, TD_HEADS, TD_FF, dropout=0.0, activation="gelu", norm_first=True)
    model = nn.TransformerDecoder(layer, TD_LAYERS)
    padding = torch.zeros(BATCH, TD_SRC, dtype=torch.bool)
    padding[1, -2:] = True  # the second sequence's memory is two positions shorter
    return model, {
        "tgt": torch.randn(TD_TGT, BATCH, TD_DIM), "memory": torch.randn(TD_SRC, BATCH, TD_DIM),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(TD_TGT), "tgt_is_causal": True,
        "memory_key_padding_mask": padding,
    }


EB_ROWS = torch.tensor([[3, 5, 0, 0], [7, 0, 0, 0], [1, 2, 4, 6]])  # padded with 0: 7 real entries of 12
EB_FLAT, EB_OFFSETS = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 2, 5])  # bags of 2, 0 and 3


@seeded
def embedding_bags():
    return HashedBags(), (EB_ROWS, EB_FLAT, EB_OFFSETS, torch.rand(len(EB_FLAT)))


@seeded
def int8_weights():
    model = nn.Sequential(Int8Linear(Q8_IN, Q8_HIDDEN), nn.ReLU(), Int8Linear(Q8_HIDDEN, Q8_OUT))
    return model, (torch.randn(BATCH, Q8_IN),)


@seeded
def state_vector():
    psi = torch.randn(BATCH, 2**SV_QUBITS, dtype=torch.complex128)
    return StateVector(), (psi / psi.abs().pow(2).sum(-1, keepdim=True).sqrt(),)


@seeded
def keyword_lm():
    ids = torch.randint(0, LM_VOCAB, (BATCH, LM_LEN))
    labels = torch.full((BATCH, LM_LEN), -100)
    labels[:, ::2] = ids[:, ::2]  # every other token is a target
    mask = torch.ones(BATCH, LM_LEN)
    mask[1, -2:] = 0
    return KeywordMaskedLM(), {"input_ids": ids, "attention_mask": mask, "labels": labels}


@seeded
def autocast_fp16():
    return AutocastMLP(), (torch.randn(BATCH, AC_IN),)


@seeded
def train_step_adamw():
    return AdamWStep(), (torch.randn(TS_ROWS, TS_IN), torch.randn(TS_ROWS, TS_OUT))


@seeded
def train_step_sgd():
    return SGDStep(), (torch.randn(TS_ROWS, TS_IN), torch.randn(TS_ROWS, TS_OUT))


@seeded
def train_step_amp():
    return AmpStep(), (torch.randn(TS_ROWS, TS_IN), torch.randn(TS_ROWS, TS_OUT))


@seeded
def sparse_embedding_step():
    return SparseEmbeddingStep(), (SE_IDS, torch.randn(len(SE_IDS)))


@seeded
def retention():
    return Retention(), (torch.randn(BATCH, RT_LEN, RT_DIM),)


@seeded
def mixture_of_depths():
    return MixtureOfDepths(), (torch.randn(BATCH, MD_TOKENS, MD_DIM),)


@seeded
def index_add_moe():
    return IndexAddMoE(), (torch.randn(IA_TOKENS, IA_DIM),)


@seeded
def bilstm():
    h0 = torch.randn(2 * LS_LAYERS, BATCH, LS_HIDDEN)
    return BiLSTM(), (torch.randn(LS_LEN, BATCH, LS_IN), h0, torch.zeros_like(h0))


MODELS = {
    # a training step runs its own backward and optimizer: it is profiled as it is called
    f.__name__: (f, f not in (train_step_adamw, train_step_sgd, train_step_amp, sparse_embedding_step))
    for f in (
        vit_gqa, latent_attention, document_mask, transposed_unet, soft_moe, transformer_decoder, embedding_bags,
        int8_weights, state_vector, keyword_lm, autocast_fp16, train_step_adamw, train_step_sgd, train_step_amp,
        sparse_embedding_step, retention,
        mixture_of_depths, index_add_moe, bilstm,
    )
}
build = train_step_adamw
