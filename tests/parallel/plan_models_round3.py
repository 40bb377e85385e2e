"""The models of the planner's unseen-models round 3 (tests/parallel/test_plan_unseen_round3*.py): recurrent
language models (a stacked LSTM, a GRU, an LSTMCell unrolled over time), LoRA adapters on frozen linears, a frozen
convolutional encoder with a trainable head, blocks of different widths alternating attention and MLP-only, an
embedding of a million rows, a whole-bf16 model, blocks called with keyword arguments and a root returning a
dict, weight-normed dilated 1-D convolutions, integer buffers and parameters."""

import torch
import torch.nn.functional as F
from torch import nn

FP32, BF16, INT64 = 4, 2, 8


class LSTMLM(nn.Module):
    """Embedding, a 2-layer LSTM (its (h, c) state dropped), a head. nn.LSTM returns (out, (h, c))."""

    def __init__(self, vocab=40, d=8, hidden=12, layers=2, cell=nn.LSTM):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = cell(d, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):                                                 # (B, S) int64
        out, _ = self.rnn(self.embed(ids))                                  # (B, S, hidden)
        return self.head(out)


def lstm_params(d, h, layers, gates):
    """nn.LSTM (gates=4) / nn.GRU (gates=3) parameter elements: per layer W_ih (g h, in), W_hh (g h, h), 2 biases."""
    return sum(gates * h * (d if k == 0 else h) + gates * h * h + 2 * gates * h for k in range(layers))


class Unrolled(nn.Module):
    """One LSTMCell stepped over the sequence by the root: the cell is called S times (a layer per step, its
    weights shared by all)."""

    def __init__(self, d=6, hidden=10, classes=3):
        super().__init__()
        self.cell = nn.LSTMCell(d, hidden)
        self.out = nn.Linear(hidden, classes)
        self.hidden = hidden

    def forward(self, x):                                                   # (B, S, d)
        h = c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h)


class LoRALinear(nn.Module):
    """A frozen (out, in) linear plus a trainable rank-r update B A (A: (r, in), B: (out, r))."""

    def __init__(self, d_in, d_out, r, base_dtype=torch.float32):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False).to(base_dtype)
        self.A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.B = nn.Parameter(torch.randn(d_out, r) * 0.1)

    def forward(self, x):
        return self.base(x.to(self.base.weight.dtype)).to(x.dtype) + x @ self.A.t() @ self.B.t()


class LoRANet(nn.Module):
    """A frozen embedding, three LoRA blocks, a trainable head (QLoRA-like with ``base_dtype`` bf16: the frozen
    linears in bf16, the adapters and head in f32)."""

    def __init__(self, vocab=30, d=16, r=2, n=3, base_dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d).requires_grad_(False)
        self.blocks = nn.ModuleList(LoRALinear(d, d, r, base_dtype) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + F.gelu(b(x))
        return self.head(x)


class FrozenEncoder(nn.Module):
    """A frozen conv encoder (conv, BatchNorm in eval mode, conv) and a trainable two-layer head."""

    def __init__(self, c=6, classes=4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                     nn.Conv2d(c, c, 3, stride=2, padding=1)).requires_grad_(False).eval()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c, 8), nn.ReLU(), nn.Linear(8, classes))

    def forward(self, img):
        return self.head(self.pool(self.encoder(img)))


class Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


class Funnel(nn.Module):
    """Heterogeneous blocks: attention at width 32, an MLP-only block narrowing to 16, attention at 16, an MLP-only
    block narrowing to 8, a head."""

    def __init__(self, classes=5):
        super().__init__()
        self.blocks = nn.ModuleList([Attn(32, 4), nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)),
                                     Attn(16, 2), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))])
        self.head = nn.Linear(8, classes)

    def forward(self, x):                                                   # (B, S, 32)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


class BigVocab(nn.Module):
    """A million-row embedding of width 4 (4M parameters) and a small classifier: the embedding is the memory."""

    def __init__(self, vocab=1_000_000, d=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids))).mean(1))


class KwBlock(nn.Module):
    """A block taking its mask and scale by keyword."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, *, mask, scale=1.0):
        return x + scale * self.proj(x) * mask[..., None]


class KwargsDict(nn.Module):
    """Blocks called with keyword arguments, an int64 position-id buffer (BERT's), a root returning a dict."""

    def __init__(self, vocab=20, d=8, seq=6, n=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.register_buffer("position_ids", torch.arange(seq)[None])
        self.blocks = nn.ModuleList(KwBlock(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        mask = (ids != 0).float()
        x = self.tok(ids) + self.pos(self.position_ids[:, :ids.shape[1]])
        for b in self.blocks:
            x = b(x, mask=mask, scale=0.5)
        return {"logits": self.head(x), "hidden": x}


class KeywordOnly(nn.Module):
    """A root whose forward needs a keyword-only argument that a positional example cannot give."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *, attention_mask):
        return self.lin(x) * attention_mask


class WaveNet(nn.Module):
    """Weight-normed dilated causal 1-D convolutions (torch's parametrizations: each weight is two parameters)."""

    def __init__(self, c=8, layers=3):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.inp = wn(nn.Conv1d(1, c, 1))
        self.convs = nn.ModuleList(wn(nn.Conv1d(c, c, 2, dilation=2 ** k)) for k in range(layers))
        self.out = nn.Conv1d(c, 1, 1)

    def forward(self, x):                                                   # (B, 1, T)
        x = self.inp(x)
        for conv in self.convs:
            x = x + torch.tanh(conv(F.pad(x, (conv.dilation[0], 0))))
        return self.out(x)


class IntParam(nn.Module):
    """A frozen integer parameter (a lookup table kept as nn.Parameter, requires_grad=False) before the floats."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.arange(10, dtype=torch.int64), requires_grad=False)
        self.lin = nn.Linear(10, 4)

    def forward(self, x):                                                   # (B, 10)
        return self.lin(x + self.table.float())


def _models():
    torch.manual_seed(0)
    return {
        "lstm": (LSTMLM(), torch.randint(0, 40, (2, 5))),
        "gru": (LSTMLM(cell=nn.GRU, layers=3), torch.randint(0, 40, (2, 5))),
        "unrolled": (Unrolled(), torch.randn(2, 4, 6)),
        "lora": (LoRANet(), torch.randint(0, 30, (2, 6))),
        "lora bf16 base": (LoRANet(base_dtype=torch.bfloat16), torch.randint(0, 30, (2, 6))),
        "frozen encoder": (FrozenEncoder(), torch.randn(2, 3, 8, 8)),
        "funnel": (Funnel(), torch.randn(2, 6, 32)),
        "big vocab": (BigVocab(), torch.randint(0, 1_000_000, (2, 7))),
        "bf16": (nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).to(torch.bfloat16),
                 torch.randn(2, 3, 8, dtype=torch.bfloat16)),
        "kwargs dict": (KwargsDict(), torch.randint(0, 20, (2, 6))),
        "wavenet": (WaveNet(), torch.randn(2, 1, 16)),
        "int param": (IntParam(), torch.randn(2, 10)),
    }


MODELS = _models()


def _args(x):
    return x if isinstance(x, tuple) else (x,)


class DecBlock(nn.Module):
    """Cross-attention to the encoder's output (by keyword) and an MLP."""

    def __init__(self, d):
        super().__init__()
        self.cross = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Linear(d, d)

    def forward(self, y, *, memory):                                        # (B, T, d), memory (B, S, d)
        y = y + self.cross(y, memory, memory, need_weights=False)[0]
        return y + torch.tanh(self.ff(y))


class EncoderDecoder(nn.Module):
    """Two encoder layers over the source (B, 4, 8), two decoder blocks over the target (B, 5, 8) attending to
    the encoder's output: a pipeline cut between the decoder blocks sends both."""

    def __init__(self, d=8):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.dec = nn.ModuleList(DecBlock(d) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, src, tgt):
        for layer in self.enc:
            src = torch.tanh(layer(src))
        for block in self.dec:
            tgt = block(tgt, memory=src)
        return self.head(tgt)
