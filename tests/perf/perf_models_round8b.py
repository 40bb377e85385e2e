"""The eighth round's second set of models the profiler was not written against
(tests/perf/test_profile_unseen_round8b.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round8b.py:lora_mlp --device cpu --train

Each builder returns ``(model, inputs)``: LoRA adapters on a frozen MLP (only the low-rank factors train), blocks
under reentrant activation checkpointing, a net changed by hooks (a forward pre-hook, a forward hook, a full
backward hook), a detection-style loss whose forward consumes its target dicts (pops a key, rebinds the boxes), a
net with a float16 half and a float32 half, a hypernetwork generating a target MLP's weights per task
(torch.func.functional_call), an nn.TransformerDecoderLayer with a causal target (tgt_is_causal) and a padded
memory, a sampler drawing tokens until an end token (work that depends on its random draws), and a decoding step
with KV caches (work that grows with the model's state).
"""

from __future__ import annotations

import torch
from profile_support import seeded
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

BATCH = 3
LORA_IN, LORA_HIDDEN, LORA_OUT, LORA_RANK = 8, 16, 4, 2
CK_DIM, CK_BLOCKS = 6, 3
HK_IN, HK_HIDDEN, HK_OUT = 4, 6, 2
DET_FEAT, DET_BOXES = 5, (3, 2)  # detection: feature width, boxes per image
MIX_IN, MIX_HIDDEN, MIX_OUT = 8, 12, 4
HN_TASK, HN_IN, HN_HIDDEN, HN_OUT = 3, 4, 5, 2  # hypernetwork: task embedding, target MLP widths
DEC_DIM, DEC_HEADS, DEC_FF, DEC_TGT, DEC_MEM = 8, 2, 16, 5, 6  # decoder layer
SAMPLE_VOCAB, SAMPLE_DIM, SAMPLE_MAX = 5, 8, 30  # sampler: vocabulary, width, most steps
KV_DIM, KV_MAX = 4, 64  # cached decoder: width, the static cache's length


class LoraLinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)): the base Linear frozen, A (r, in) and B (out, r) trained."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(LORA_RANK, d_in) / d_in**0.5)
        self.b = nn.Parameter(torch.randn(d_out, LORA_RANK) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 2.0 * F.linear(F.linear(x, self.a), self.b)


class LoraMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = LoraLinear(LORA_IN, LORA_HIDDEN), LoraLinear(LORA_HIDDEN, LORA_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, IN)
        return self.l2(torch.relu(self.l1(x)))


class ReentrantCheckpoint(nn.Module):
    """Linear + tanh blocks each under checkpoint(use_reentrant=True): the forward runs under no_grad, then
    again, with gradients, inside the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(CK_DIM, CK_DIM), nn.Tanh()) for _ in range(CK_BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D), requires grad (reentrant needs an input that does)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return x


class Hooked(nn.Module):
    """Linear, ReLU, Linear; the first Linear's input doubled by a forward pre-hook, the second's output shifted
    by a forward hook, and the first's input gradient halved by a full backward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(HK_IN, HK_HIDDEN), nn.Linear(HK_HIDDEN, HK_OUT)
        self.l1.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        self.l2.register_forward_hook(lambda m, args, out: out + 1)
        self.l1.register_full_backward_hook(lambda m, gin, gout: (gin[0] * 0.5,) if gin[0] is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


class DetectionLoss(nn.Module):
    """Per image: a box regression head on its features against its targets; the forward pops each target's
    "ignore" entry and rebinds its boxes (scaled): it consumes the target dicts it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(DET_FEAT, 4)

    def forward(self, features: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
        loss = features[0].new_zeros(())
        for f, t in zip(features, targets, strict=True):
            t.pop("ignore")
            t["boxes"] = t["boxes"] * 0.5
            loss = loss + F.smooth_l1_loss(self.head(f), t["boxes"])
        return loss


class MixedHalf(nn.Module):
    """A float16 first layer, a float32 second one: the activations cast between them."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(MIX_IN, MIX_HIDDEN).half()
        self.l2 = nn.Linear(MIX_HIDDEN, MIX_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, IN) float16
        return self.l2(torch.relu(self.l1(x)).float())


class HyperNetwork(nn.Module):
    """A linear hypernetwork maps a task embedding to every parameter of a target MLP (flattened), which runs
    with them by torch.func.functional_call; the target's own parameters are never used."""

    def __init__(self) -> None:
        super().__init__()
        self.target = nn.Sequential(nn.Linear(HN_IN, HN_HIDDEN), nn.Tanh(), nn.Linear(HN_HIDDEN, HN_OUT))
        self.shapes = {k: p.shape for k, p in self.target.named_parameters()}
        self.hyper = nn.Linear(HN_TASK, sum(s.numel() for s in self.shapes.values()))

    def forward(self, task: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (TASK,), (B, IN)
        flat, params, at = self.hyper(task), {}, 0
        for k, shape in self.shapes.items():
            params[k] = flat[at : at + shape.numel()].view(shape)
            at += shape.numel()
        return functional_call(self.target, params, (x,))


class CausalDecoder(nn.Module):
    """nn.TransformerDecoderLayer (batch first, norm first): causal self-attention over the target
    (tgt_is_causal with its mask), cross-attention to a memory with padded positions, a ReLU FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(DEC_DIM, DEC_HEADS, DEC_FF, dropout=0.0, batch_first=True,
                                                norm_first=True)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=memory_padding)


class Sampler(nn.Module):
    """Autoregressive sampling: each step embeds the last tokens, projects to logits, draws the next tokens by
    torch.multinomial, and stops when every sequence drew the end token (0) or after SAMPLE_MAX steps: how much
    work a call does depends on its random draws."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(SAMPLE_VOCAB, SAMPLE_DIM)
        self.out = nn.Linear(SAMPLE_DIM, SAMPLE_VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) int64
        for _ in range(SAMPLE_MAX):
            logits = self.out(self.embed(tokens))
            tokens = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            if bool((tokens == 0).all()):
                break
        return logits


class CachedDecoder(nn.Module):
    """One decoding step with a KV cache: the new token's key and value concatenated onto the cache (plain
    attributes, rebound), attention of its query over the whole cache; and a second, static cache (a buffer
    written in place at a position counter, a plain int) read up to that position."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(KV_DIM, 3 * KV_DIM)
        self.k_cache = torch.zeros(1, 0, KV_DIM)
        self.v_cache = torch.zeros(1, 0, KV_DIM)
        self.register_buffer("static", torch.zeros(1, KV_MAX, KV_DIM))
        self.pos = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (1, 1, D): one new token
        q, k, v = self.qkv(x).chunk(3, -1)
        self.k_cache = torch.cat([self.k_cache, k], 1)  # (1, T, D)
        self.v_cache = torch.cat([self.v_cache, v], 1)
        attn = torch.softmax(q @ self.k_cache.transpose(1, 2) / KV_DIM**0.5, -1)  # (1, 1, T)
        with torch.no_grad():
            self.static[:, self.pos] = v[:, 0]
        self.pos += 1
        return attn @ self.v_cache + self.static[:, : self.pos].mean(1, keepdim=True)


@seeded
def lora_mlp():
    return LoraMlp(), (torch.randn(BATCH, LORA_IN),)


@seeded
def reentrant_checkpoint():
    return ReentrantCheckpoint(), (torch.randn(BATCH, CK_DIM, requires_grad=True),)


@seeded
def hooked():
    return Hooked(), (torch.randn(BATCH, HK_IN, requires_grad=True),)


@seeded
def detection_loss():
    features = [torch.randn(n, DET_FEAT) for n in DET_BOXES]
    targets = [{"boxes": torch.randn(n, 4), "ignore": torch.zeros(n, dtype=torch.bool)} for n in DET_BOXES]
    return DetectionLoss(), (features, targets)


@seeded
def mixed_half():
    return MixedHalf(), (torch.randn(BATCH, MIX_IN).half(),)


@seeded
def hypernetwork():
    return HyperNetwork(), (torch.randn(HN_TASK), torch.randn(BATCH, HN_IN))


@seeded
def causal_decoder():
    padding = torch.zeros(BATCH, DEC_MEM, dtype=torch.bool)
    padding[0, -1] = True
    return CausalDecoder(), (torch.randn(BATCH, DEC_TGT, DEC_DIM), torch.randn(BATCH, DEC_MEM, DEC_DIM), padding)


@seeded
def sampler():
    return Sampler(), (torch.tensor([1]),)


@seeded
def cached_decoder():
    return CachedDecoder(), (torch.randn(1, 1, KV_DIM),)


MODELS = {
    # sampled tokens: nothing to differentiate through; a decoding step with a cache: inference only
    f.__name__: (f, f not in (sampler, cached_decoder))
    for f in (lora_mlp, reentrant_checkpoint, hooked, detection_loss, mixed_half, hypernetwork, causal_decoder,
              sampler, cached_decoder)
}
build = lora_mlp
