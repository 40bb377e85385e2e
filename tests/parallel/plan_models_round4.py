"""The models of the planner's unseen-models round 4 (tests/parallel/test_plan_unseen_round4*.py).

ALBERT-like sharing across non-adjacent places (one block called between two others, three times), one position
table registered as a buffer in every block (the same tensor), a KV cache buffer larger than the parameters, a
frozen backbone in a ModuleDict with bottleneck adapters, ModuleDict / ModuleList nesting with a functional call
of the root's own weight, a forward whose path depends on the input's shape, and 200 tiny layers."""

import torch
import torch.nn.functional as F
from torch import nn

FP32, BF16 = 4, 2


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(x)))


class SharedBetween(nn.Module):
    """emb, shared, mix.0, shared, mix.1, shared, head: the shared block is called at places 1, 3 and 5, with other
    blocks between its calls (ALBERT shares every block; this shares one across the others)."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.shared = Mlp(d, 2 * d)
        self.mix = nn.ModuleList(Mlp(d, 3 * d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):                                     # (B, S) int64 -> (B, S, vocab)
        x = self.shared(self.emb(ids))
        x = self.shared(self.mix[0](x))
        x = self.shared(self.mix[1](x))
        return self.head(x)


class TableBlock(nn.Module):
    """A block that adds a position table it registers as a (non-persistent) buffer: the model hands the same
    tensor to every block, as rotary cos/sin tables often are."""

    def __init__(self, d, table):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x):                                       # (B, S, d)
        return torch.tanh(self.lin(x + self.table[: x.shape[1]]))


class SharedTable(nn.Module):
    def __init__(self, d=8, max_seq=32, n=4):
        super().__init__()
        table = torch.randn(max_seq, d)                         # one (32, 8) f32 tensor, 1024 bytes
        self.blocks = nn.ModuleList(TableBlock(d, table) for _ in range(n))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class CachedAttention(nn.Module):
    """Single-head attention over its input, with a KV cache buffer (max_batch, max_seq, 2 d) that training never
    reads (an inference engine's, kept on the module): 64 x 128 x 16 f32 = 512 KiB against 4 d^2 + 4 d weights."""

    def __init__(self, d=8, max_batch=64, max_seq=128):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d, bias=False)
        self.register_buffer("kv_cache", torch.zeros(max_batch, max_seq, 2 * d))

    def forward(self, x):                                       # (B, S, d)
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class KVCacheModel(nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.layers = nn.ModuleList(CachedAttention(d) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Adapter(nn.Module):
    """Houlsby's bottleneck: down to r, up to d, added to the frozen block's output."""

    def __init__(self, d, r):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class FrozenBackbone(nn.Module):
    """A frozen backbone (embedding and three MLP blocks) in a ModuleDict, an adapter after each block and a
    trainable head: only the adapters (2 x (d r + r) + ... each) and the head get gradients and AdamW."""

    def __init__(self, vocab=30, d=16, r=2):
        super().__init__()
        self.backbone = nn.ModuleDict({"emb": nn.Embedding(vocab, d),
                                       "blocks": nn.ModuleList(Mlp(d, 2 * d) for _ in range(3))})
        self.backbone.requires_grad_(False)
        self.adapters = nn.ModuleList(Adapter(d, r) for _ in range(3))
        self.head = nn.Linear(d, 4)

    def forward(self, ids):
        x = self.backbone["emb"](ids)
        for block, adapter in zip(self.backbone["blocks"], self.adapters, strict=True):
            x = adapter(block(x))
        return self.head(x)


class Nested(nn.Module):
    """ModuleDict of ModuleList and ModuleDict, registered in another order than they run, and the root's own
    weight applied by a functional call at the end (F.linear): it belongs to no layer, so the first one holds it."""

    def __init__(self, d=8):
        super().__init__()
        self.stages = nn.ModuleDict({
            "dec": nn.ModuleDict({"b": nn.ModuleList([nn.Linear(d, 4)]), "a": nn.Linear(d, d)}),
            "enc": nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d, bias=False)]),
        })
        self.w = nn.Parameter(torch.randn(3, 4) * 0.1)

    def forward(self, x):                                       # (B, d) -> (B, 3)
        for lin in self.stages["enc"]:
            x = F.relu(lin(x))
        x = self.stages["dec"]["b"][0](self.stages["dec"]["a"](x))
        return F.linear(x, self.w)


class ShapeBranch(nn.Module):
    """The path depends on the input's shape: sequences longer than 4 go through ``long`` (a wider MLP), shorter
    ones through ``short``; a batch over ``huge_above`` samples asks for a petabyte (an allocation no machine
    makes), so the model can be described at the example's batch but not timed at larger micro-batches."""

    def __init__(self, d=8, huge_above=None):
        super().__init__()
        self.short = Mlp(d, d)
        self.long = Mlp(d, 4 * d)
        self.out = nn.Linear(d, 2)
        self.huge_above = huge_above

    def forward(self, x):                                       # (B, S, d)
        if self.huge_above is not None and x.shape[0] > self.huge_above:
            x = x + torch.empty(1 << 48, dtype=torch.float32).sum()
        x = self.long(x) if x.shape[1] > 4 else self.short(x)
        return self.out(x)


def deep(n=200, d=4):
    return nn.Sequential(*(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n // 2)),
                         *(nn.Linear(d, d) for _ in range(n - n // 2)))


def _build():
    torch.manual_seed(0)
    return {
        "shared between": (SharedBetween(), torch.randint(0, 20, (2, 5))),
        "shared table": (SharedTable(), torch.randn(2, 6, 8)),
        "kv cache": (KVCacheModel(), torch.randn(2, 6, 8)),
        "frozen backbone": (FrozenBackbone(), torch.randint(0, 30, (2, 7))),
        "nested": (Nested(), torch.randn(3, 8)),
        "short branch": (ShapeBranch(), torch.randn(2, 3, 8)),
        "long branch": (ShapeBranch(), torch.randn(2, 6, 8)),
    }


MODELS = _build()


def mlp_params(d, hidden):
    return d * hidden + hidden + hidden * d + d


# parameter elements, of them frozen, and buffer bytes, counted by hand from the constructors
BY_HAND = {
    "shared between": (20 * 8 + mlp_params(8, 16) + 2 * mlp_params(8, 24) + 8 * 20 + 20, 0, 0),
    "shared table": (4 * (8 * 8 + 8) + 8 * 3 + 3, 0, 32 * 8 * FP32),
    "kv cache": (2 * (8 * 24 + 24 + 8 * 8) + 8 * 5 + 5, 0, 2 * 64 * 128 * 16 * FP32),
    "frozen backbone": (30 * 16 + 3 * mlp_params(16, 32) + 3 * (16 * 2 + 2 + 2 * 16 + 16) + 16 * 4 + 4,
                        30 * 16 + 3 * mlp_params(16, 32), 0),
    "nested": ((8 * 8 + 8) + 8 * 8 + (8 * 8 + 8) + (8 * 4 + 4) + 3 * 4, 0, 0),
    "short branch": (mlp_params(8, 8) + mlp_params(8, 32) + 8 * 2 + 2, 0, 0),
    "long branch": (mlp_params(8, 8) + mlp_params(8, 32) + 8 * 2 + 2, 0, 0),
}


def args_of(x):
    return x if isinstance(x, tuple) else (x,)
