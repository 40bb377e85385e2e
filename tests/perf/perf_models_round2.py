"""A second round of models the profiler was not written against (tests/perf/test_perf_heldout_round2.py).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round2.py:lstm --device cpu --train

Each builder returns ``(model, inputs)``: inputs are a tuple of positional arguments or a dict of keyword
arguments. Sizes are tiny so that the whole round profiles in seconds on a 2-core CPU; what is checked is the
counting (against ``torch.utils.flop_counter.FlopCounterMode`` or a hand formula), not the speed.
"""

from __future__ import annotations

import dataclasses

import torch
from profile_support import seeded
from torch import nn
from torch.nn import functional as F

BATCH, SEQ, FEAT, HIDDEN = 2, 5, 8, 16  # recurrent models: (B, T, I) inputs, H hidden units
LSTM_GATES = 4
DIM, HEADS, FF = 16, 2, 32  # transformer layers
EXPERTS, TOP_K, TOKENS = 4, 2, 12  # mixture of experts
VOCAB, BAG_DIM = 100, 16
HUGE_VOCAB = 1 << 20  # a 64 MiB embedding table looked up for a handful of tokens


class Recurrent(nn.Module):
    """A 2-layer bidirectional LSTM or GRU over (B, T, I), optionally on a packed (ragged) batch."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM, packed: bool = False) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = cell(FEAT, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # x: (B, T, I)
        if not self.packed:
            return self.rnn(x)[0]  # (B, T, 2H)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]  # (B, T, 2H)


class Encoder(nn.Module):
    """nn.TransformerEncoder with a causal mask and a key padding mask."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:  # x: (B, N, D), pad: (B, N) bool
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])  # (N, N) float, -inf above
        return self.enc(x, mask=mask, src_key_padding_mask=pad)


class Decoder(nn.Module):
    """nn.TransformerDecoder: causal self-attention, cross-attention to a memory of another length."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True), 1)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, M, D)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


class Convs(nn.Module):
    """Conv1d (dilated), Conv3d (grouped), ConvTranspose2d (strided, dilated, grouped), depthwise Conv2d."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, dilation=2, padding=2, bias=bias)
        self.c3 = nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=bias)
        self.ct = nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=bias)
        self.dw = nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # a: (B, 4, L), b: (B, 4, D, H, W), c: (B, 4, H, W)
        return self.c1(a).sum() + self.c3(b).sum() + self.ct(c).sum() + self.dw(c).sum()


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, BAG_DIM, mode="mean")

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # (n,) int64 each
        return self.bag(idx, offsets)  # (bags, BAG_DIM)


class MoE(nn.Module):
    """Top-k routing with torch.topk; each expert's tokens gathered, run and scattered back with index_add_."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS)
        self.experts = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, D)
        weight, expert = torch.topk(self.gate(x).softmax(-1), TOP_K, dim=-1)  # (T, K) each
        out = torch.zeros_like(x)
        for i, ex in enumerate(self.experts):
            tok, slot = torch.where(expert == i)
            out.index_add_(0, tok, ex(x[tok]) * weight[tok, slot, None])
        return out


class InPlace(nn.Module):
    """In-place ops on activations, and an out= op updating a buffer (no gradient goes through out=)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.register_buffer("seen", torch.zeros(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * 1.0
        y.mul_(2.0).add_(1.0)
        with torch.no_grad():
            torch.add(self.seen, x.detach().sum(0), out=self.seen)
        return F.relu(y, inplace=True)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    aux: dict[str, torch.Tensor]


class Outputs(nn.Module):
    """Returns a tuple, a dict or a dataclass (with a dict inside) of tensors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(FEAT, FEAT)

    def forward(self, x: torch.Tensor) -> object:
        y = self.lin(x)
        if self.kind == "tuple":
            return y, (y.sum(), None)
        if self.kind == "dict":
            return {"y": y, "norm": y.norm()}
        return Output(y, {"mean": y.mean()})


class TokensAndMask(nn.Module):
    """int64 tokens and a bool mask in, keyword arguments with defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.lin(self.emb(tokens)) * mask[..., None] * scale  # (B, N, D)


class Attention(nn.Module):
    """F.scaled_dot_product_attention with is_causal, or with an explicit attn_mask (bool or additive float)."""

    def __init__(self, causal: bool = False, mask: str = "") -> None:
        super().__init__()
        self.causal, self.mask = causal, mask
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        mask = None
        if self.mask == "bool":
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        elif self.mask == "float":
            mask = torch.zeros(b, 1, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)


class Products(nn.Module):
    """einsum, bmm, baddbmm, addmm, matmul, @ over (B, N, D) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(FEAT, FEAT))
        self.b = nn.Parameter(torch.randn(FEAT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, FEAT)
        a = torch.einsum("bnd,de->bne", x, self.w)  # (B, N, FEAT)
        s = torch.bmm(a, a.transpose(1, 2))  # (B, N, N)
        s = torch.baddbmm(s, a, x.transpose(1, 2), alpha=0.5, beta=2.0)
        e = torch.addmm(self.b, x[:, 0], self.w)  # (B, FEAT)
        return s.sum() + e.sum() + (x @ self.w).sum() + torch.matmul(x[0], self.w).sum()


class NoGrad(nn.Module):
    """Parts of the forward under torch.no_grad and torch.inference_mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(FEAT, FEAT), nn.Linear(FEAT, FEAT), nn.Linear(FEAT, FEAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.a(x)
        with torch.inference_mode():
            z = self.b(x.detach().view(1, *x.shape))  # linear on a 3-d input: matmul, then the bias
        return self.c(x) + y + z.clone()[0]


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class Unsupported(nn.Module):
    """A matrix exponential (no FLOP formula in torch nor tilestack: its Pade degree and squarings depend on the
    matrix's norm) of each row's outer product, between two linears. (An FFT stood here until round 5 counted it.)"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(FEAT, FEAT), nn.Linear(FEAT, FEAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, F)
        return self.b(torch.linalg.matrix_exp(h[..., :, None] * h[..., None, :] / FEAT).sum(-1))


class HugeButCheap(nn.Module):
    """A 2**20-row embedding looked up for 4 tokens, and an input expanded 2**30 times of which 2 rows are used."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(HUGE_VOCAB, BAG_DIM)

    def forward(self, tokens: torch.Tensor, row: torch.Tensor) -> torch.Tensor:  # (B, N) int64, (1, BAG_DIM)
        wide = row.expand(1 << 30, BAG_DIM)  # a view: 2**30 rows, one in memory
        return self.emb(tokens).sum(1) + wide[: tokens.shape[0]] * 2.0


class Pools(nn.Module):
    """Max and average pools (1-d, 2-d, 3-d) and adaptive ones, as a CNN's stem and head have them."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # a: (B, C, L), b: (B, C, H, W), c: (B, C, D, H, W)
        y = F.max_pool1d(a, 3, stride=2).sum() + F.avg_pool2d(b, 2).sum() + F.max_pool3d(c, (1, 2, 2)).sum()
        return y + F.adaptive_avg_pool2d(F.max_pool2d(b, 3, stride=1, padding=1), 2).sum()


class SparseMatmul(nn.Module):
    """torch.sparse.mm of a sparse COO input by a dense weight (no FLOP formula until round 5: reported)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(FEAT, 4))

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a: (6, FEAT) sparse
        return torch.sparse.mm(a, self.w)  # (6, 4) dense


class LinearAndConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.conv = nn.Linear(FEAT, FEAT), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.conv(image)




LENGTHS = torch.tensor([SEQ, SEQ - 2])  # a ragged packed batch, longest first


@seeded
def lstm():
    return Recurrent(nn.LSTM), (torch.randn(BATCH, SEQ, FEAT),)


@seeded
def lstm_packed():
    return Recurrent(nn.LSTM, packed=True), (torch.randn(BATCH, SEQ, FEAT), LENGTHS)


@seeded
def gru():
    return Recurrent(nn.GRU), (torch.randn(BATCH, SEQ, FEAT),)


@seeded
def gru_packed():
    return Recurrent(nn.GRU, packed=True), (torch.randn(BATCH, SEQ, FEAT), LENGTHS)


@seeded
def encoder():
    pad = torch.zeros(BATCH, 6, dtype=torch.bool)
    pad[0, -2:] = True  # the first sequence is 2 tokens shorter
    return Encoder(), (torch.randn(BATCH, 6, DIM), pad)


@seeded
def decoder():
    return Decoder(), (torch.randn(BATCH, 6, DIM), torch.randn(BATCH, 7, DIM))


@seeded
def convs():
    return Convs(), (torch.randn(BATCH, 4, 20), torch.randn(1, 4, 3, 4, 5), torch.randn(BATCH, 4, 5, 5))


@seeded
def convs_bias():
    return Convs(bias=True), (torch.randn(BATCH, 4, 20), torch.randn(1, 4, 3, 4, 5), torch.randn(BATCH, 4, 5, 5))


@seeded
def bag():
    return Bag(), (torch.randint(0, VOCAB, (10,)), torch.tensor([0, 4, 7]))


@seeded
def moe():
    return MoE(), (torch.randn(TOKENS, DIM),)


@seeded
def in_place():
    return InPlace(), (torch.randn(4, DIM),)


@seeded
def batchnorm_train():
    return ConvBN().train(), (torch.randn(BATCH, 3, 8, 8),)


@seeded
def batchnorm_eval():
    return ConvBN().eval(), (torch.randn(BATCH, 3, 8, 8),)


@seeded
def outputs_tuple():
    return Outputs("tuple"), (torch.randn(3, FEAT),)


@seeded
def outputs_dict():
    return Outputs("dict"), (torch.randn(3, FEAT),)


@seeded
def outputs_dataclass():
    return Outputs("dataclass"), (torch.randn(3, FEAT),)


@seeded
def tokens_and_mask():
    inputs = {"tokens": torch.randint(0, VOCAB, (BATCH, 5)), "mask": torch.rand(BATCH, 5) > 0.5, "scale": 0.5}
    return TokensAndMask(), inputs


@seeded
def sdpa_causal():
    return Attention(causal=True), (torch.randn(BATCH, 6, DIM),)


@seeded
def sdpa_bool_mask():
    return Attention(mask="bool"), (torch.randn(BATCH, 6, DIM),)


@seeded
def sdpa_float_mask():
    return Attention(mask="float"), (torch.randn(BATCH, 6, DIM),)


@seeded
def products():
    return Products(), (torch.randn(3, 4, FEAT),)


@seeded
def no_grad_inside():
    return NoGrad(), (torch.randn(3, FEAT),)


@seeded
def identity():
    return Identity(), (torch.randn(3, FEAT),)


@seeded
def nothing():
    return Nothing(), (torch.randn(3, FEAT),)


@seeded
def unsupported():
    return Unsupported(), (torch.randn(3, FEAT),)


@seeded
def huge_but_cheap():
    return HugeButCheap(), (torch.randint(0, HUGE_VOCAB, (BATCH, 4)), torch.randn(1, BAG_DIM))


@seeded
def batch_zero():
    return LinearAndConv(), (torch.randn(0, FEAT), torch.randn(0, 3, 6, 6))


@seeded
def pools():
    return Pools(), (torch.randn(BATCH, 4, 9), torch.randn(BATCH, 4, 6, 6), torch.randn(1, 2, 3, 4, 4))


@seeded
def sparse_matmul():
    return SparseMatmul(), (torch.randn(6, FEAT).relu().to_sparse(),)


@seeded
def encoder_nested():
    """An eval-mode encoder with a padding mask: on its fast path (fastpath=True) it runs on nested tensors."""
    model, (x, pad) = encoder()
    return model.enc.eval(), {"src": x, "src_key_padding_mask": pad}


# name -> (builder, whether a backward step makes sense)
MODELS = {
    f.__name__: (f, trainable)
    for f, trainable in (
        (lstm, True),
        (lstm_packed, True),
        (gru, True),
        (gru_packed, True),
        (encoder, True),
        (decoder, True),
        (convs, True),
        (convs_bias, True),
        (bag, True),
        (moe, True),
        (in_place, True),
        (batchnorm_train, True),
        (batchnorm_eval, True),
        (outputs_tuple, True),
        (outputs_dict, True),
        (outputs_dataclass, True),
        (tokens_and_mask, True),
        (sdpa_causal, True),
        (sdpa_bool_mask, True),
        (sdpa_float_mask, True),
        (products, True),
        (no_grad_inside, True),
        (identity, False),
        (nothing, False),
        (unsupported, True),
        (huge_but_cheap, True),
        (batch_zero, True),
        (sparse_matmul, True),
        (pools, False),
    )
}
build = lstm
