"""The models and compute models of the planner's unseen-models round 2 (tests/parallel/test_plan_unseen_round2*.py):
a top-k mixture-of-experts decoder, a T5-like encoder-decoder, a ViT, a MobileNet-like conv net, an ALBERT-like
model, a tied LM, a wide MLP, a model of bf16 and f32 parameters; unit and FLOP-proportional compute models, and
communication fits."""

import torch
import torch.nn.functional as F
from torch import nn

from tilestack.parallel.plan import CommModel
from tilestack.parallel.plan.compute import ComputeModel

FREE = CommModel(fits={"all_reduce": {2: (0.0, 0.0)}}, source="free")
FIT = CommModel(fits={k: {2: (2e-5, 1e-10), 8: (4e-5, 2e-10)} for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                         "p2p")}, source="test fit")
FP32, BF16 = 4, 2


class Unit(ComputeModel):
    """Every layer 1 s forward, 2 s backward, AdamW free."""

    def __init__(self, desc):
        self.desc, self.source = desc, "unit"

    def _times(self, layer, index, micro_batch, tp):
        return 1.0, 2.0

    def optimizer_s(self, params, tensors):
        return 0.0


class Flops(ComputeModel):
    """Times proportional to FLOPs per rank, with a floor per layer; AdamW by elements and tensors."""

    def __init__(self, desc):
        self.desc, self.source = desc, "flops"

    def _times(self, layer, index, micro_batch, tp):
        f = layer.flops_fwd * micro_batch / (tp if layer.tp_able else 1) * 1e-12 + 2e-6
        return f, 2 * f

    def optimizer_s(self, params, tensors):
        return params * 1e-11 + tensors * 1e-6


# ---- the models ------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TopK(nn.Module):
    """A mixture of ``experts`` feed-forwards, each token to its ``k`` best (softmax router, weights renormed)."""

    def __init__(self, d, experts, k):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(experts))
        self.k = k

    def forward(self, x):                                                   # (B, S, D)
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat).softmax(-1).topk(self.k, -1)              # (T, k)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            rows, slot = (idx == j).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, d, heads, experts, k):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.moe = TopK(d, experts, k)

    def forward(self, x):
        y = self.n1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.moe(self.n2(x))


class MoEDecoder(nn.Module):
    def __init__(self, vocab=32, d=16, heads=2, experts=8, k=2, n=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MoEBlock(d, heads, experts, k) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class T5Block(nn.Module):
    """Pre-norm self-attention (with the position bias added to its scores), cross-attention (decoder), MLP."""

    def __init__(self, d, heads, cross):
        super().__init__()
        self.h = heads
        self.n1, self.n3 = RMSNorm(d), RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.cross = nn.MultiheadAttention(d, heads, bias=False, batch_first=True) if cross else None
        self.n2 = RMSNorm(d) if cross else None
        self.ff = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.ReLU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x, bias, memory=None):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)            # bias: (H, S, S)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        if self.cross is not None:
            y = self.n2(x)
            x = x + self.cross(y, memory, memory, need_weights=False)[0]
        return x + self.ff(self.n3(x))


class T5(nn.Module):
    def __init__(self, vocab=40, d=16, heads=2, n_enc=2, n_dec=2, buckets=8):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.rel = nn.Embedding(buckets, heads)                              # the relative position bias
        self.encoder = nn.ModuleList(T5Block(d, heads, False) for _ in range(n_enc))
        self.decoder = nn.ModuleList(T5Block(d, heads, True) for _ in range(n_dec))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.shared.weight
        self.buckets = buckets

    def bias(self, s):
        pos = torch.arange(s)
        return self.rel((pos[None] - pos[:, None]).clamp(0, self.buckets - 1)).permute(2, 0, 1)

    def forward(self, src, tgt):
        x = self.shared(src)
        bias = self.bias(src.shape[1])
        for blk in self.encoder:
            x = blk(x, bias)
        y = self.shared(tgt)
        causal = self.bias(tgt.shape[1]) + torch.full((tgt.shape[1],) * 2, -1e9).triu(1)
        for blk in self.decoder:
            y = blk(y, causal, x)
        return self.lm_head(y)


class ViT(nn.Module):
    def __init__(self, d=16, heads=2, patch=4, image=8, n=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, img):                                                 # (B, 3, H, W)
        x = self.patch(img).flatten(2).transpose(1, 2)                      # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def _separable(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                         nn.ReLU6(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())


class MobileNet(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.body = nn.Sequential(_separable(8, 16, 1), _separable(16, 16, 2), nn.Dropout(0.2))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


class FeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Albert(nn.Module):
    """One block's weights applied ``repeat`` times (ALBERT shares them across depth)."""

    def __init__(self, vocab=30, d=16, repeat=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = FeedForward(d)
        self.head = nn.Linear(d, vocab)
        self.repeat = repeat

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.repeat):
            x = x + self.block(x)
        return self.head(x)


class TiedLM(nn.Module):
    """Embedding, four blocks, head tied to the embedding: a pipeline puts the head far from the embedding."""

    def __init__(self, vocab=64, d=16, n=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(n))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Mixed(nn.Module):
    """A bf16 projection between f32 layers (the parameters are of two dtypes)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32).to(torch.bfloat16)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.mid(self.inp(x).bfloat16()).float())


def _models():
    torch.manual_seed(0)
    return {
        "moe top-2": (MoEDecoder(k=2), torch.randint(0, 32, (2, 6))),
        "moe top-1": (MoEDecoder(k=1), torch.randint(0, 32, (2, 6))),
        "t5": (T5(), (torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5)))),
        "vit": (ViT(), torch.randn(2, 3, 8, 8)),
        "mobilenet": (MobileNet(), torch.randn(2, 3, 12, 12)),
        "albert": (Albert(), torch.randint(0, 30, (2, 5))),
        "tied": (TiedLM(), torch.randint(0, 64, (2, 5))),
        "wide": (nn.Sequential(nn.Linear(4, 4096), nn.GELU(), nn.Linear(4096, 4)), torch.randn(3, 4)),
        "mixed dtypes": (Mixed(), torch.randn(2, 8)),
        "batch 1": (nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()), torch.randn(1, 6)),
    }


MODELS = _models()


def _args(x):
    return x if isinstance(x, tuple) else (x,)
