"""A GPT laid out for sharding: separate q/k/v projections (so a column split keeps whole heads), layers in a
``ModuleDict`` keyed by their global index (so a pipeline stage keeps the names of the full model), and
embeddings / head that a stage may drop.

    model = GPT(TINY, seed=0)
    logits = model(idx)                        # idx (B, N) int64 -> (B, N, vocab)
    loss = lm_loss(logits, targets)            # mean cross-entropy in f32

GPT-2 shaped (learned positions, pre-LayerNorm, tanh-GELU MLP of 4d, causal attention), untied LM head (the
embedding and the head live on different pipeline stages). ``bench.models.GPT`` fuses the residual add into the
next norm for its kernels; this one keeps the plain ``x + f(norm(x))`` that tensor and sequence parallel plans
address module by module.

Attention: ``attention="math"`` materialises the (B, H, N, N) scores (what selective recompute is for: it
recomputes them in backward instead of keeping them), ``"sdpa"`` calls F.scaled_dot_product_attention (flash on
a GPU: the scores are never stored, selective recompute then saves little), ``"tilestack"`` the tile-language
flash attention (tilestack.torch.attention, forward and backward kernels).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tilestack.errors import TilestackError

ATTENTIONS = ("math", "sdpa", "tilestack")


class ModelConfigError(TilestackError, ValueError):
    """A ModelConfig field that no model can be built from (refused when the config is made)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 4
    d: int = 32
    n_head: int = 4
    vocab: int = 64
    max_seq: int = 64
    eps: float = 1e-5
    attention: str = "math"

    def __post_init__(self):
        # each field refused by name here, before a model, a plan or a process group is built from it (eps=nan
        # planned and trained to NaN losses)
        for name in ("n_layer", "d", "n_head", "vocab", "max_seq"):
            v, least = getattr(self, name), 0 if name == "n_layer" else 1   # no blocks: embeddings and head alone
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ModelConfigError(f"ModelConfig.{name}={v!r}; expected "
                                       + ("an int >= 0" if least == 0 else "a positive int"))
        if self.d % self.n_head:
            raise ModelConfigError(f"ModelConfig.d={self.d} with n_head={self.n_head}; expected d a multiple of "
                                   "n_head (whole heads)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not 0 < self.eps < 1:
            raise ModelConfigError(f"ModelConfig.eps={self.eps!r}; expected a float in (0, 1), e.g. 1e-5")
        if self.attention not in ATTENTIONS:
            raise ModelConfigError(f"ModelConfig.attention={self.attention!r}; expected one of {ATTENTIONS}")

    @property
    def head_dim(self) -> int:
        return self.d // self.n_head

    def flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token (``perf.formulas.transformer_train_flops_per_token``): blocks of 12 d^2
        matmul parameters, the LM head."""
        from tilestack.perf.formulas import transformer_train_flops_per_token

        return transformer_train_flops_per_token(matmul_params=self.n_layer * 12 * self.d ** 2 + self.vocab * self.d,
                                                 n_layer=self.n_layer, seq=seq, attention_width=self.d)


TINY = ModelConfig()
GPT_1P3B = ModelConfig(n_layer=24, d=2048, n_head=16, vocab=50304, max_seq=2048, attention="sdpa")


def _causal_scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) each -> (B, H, N, D), softmax(q k^T / sqrt(D) + causal mask) v with the scores materialised."""
    N, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    s = (q @ k.transpose(-2, -1)) * scale                                # (B, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)      # (B, H, N, N)
    return p @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _tilestack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from tilestack.torch.attention import attention
    return attention(q, k, v, causal=True)


_CORES = {"math": _causal_scores_attention, "sdpa": _sdpa, "tilestack": _tilestack}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.core = _CORES[cfg.attention]
        self.q_proj = nn.Linear(cfg.d, cfg.d)
        self.k_proj = nn.Linear(cfg.d, cfg.d)
        self.v_proj = nn.Linear(cfg.d, cfg.d)
        self.o_proj = nn.Linear(cfg.d, cfg.d)
        self.recompute_scores = False          # set by parallelize.apply_recompute("selective")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_head / tp whole heads of the column-split q/k/v
        q, k, v = (p(x).view(B, N, -1, self.head_dim).transpose(1, 2)          # (B, H_local, N, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.recompute_scores:
            y = checkpoint(self.core, q, k, v, use_reentrant=False)           # scores not kept for backward
        else:
            y = self.core(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))               # (B, N, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d, 4 * cfg.d)
        self.proj = nn.Linear(4 * cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.recompute = False                 # set by parallelize.apply_recompute("full")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            return checkpoint(self._forward, x, use_reentrant=False)     # keeps only the block's input
        return self._forward(x)


class GPT(nn.Module):
    """The whole model, or one pipeline stage of it (``wte``/``wpe`` None past the first stage, ``ln_f``/``lm_head``
    None before the last; a stage's forward then takes or returns the (B, N, d) hidden states)."""

    def __init__(self, cfg: ModelConfig = TINY, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.wte: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe: nn.Embedding | None = nn.Embedding(cfg.max_seq, cfg.d)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.d, cfg.vocab, bias=False)
        self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """normal(0, 0.02) for matrices and embeddings (o_proj, proj scaled by 1/sqrt(2 L)), small normal biases
        (so that their gradients are tested), ones for norm weights; the same on every rank from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        out_projs = ("o_proj.weight", "mlp.proj.weight")      # residual-branch outputs: GPT-2's scaled init
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1 and name.endswith("weight"):          # LayerNorm gains
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                elif p.dim() == 1:                                    # biases
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen))
                else:
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(out_projs) else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N) token ids on the first stage, else (B, N, d) hidden states -> logits (B, N, vocab) on the last
        stage, else hidden states."""
        if self.wte is not None:
            N = x.shape[1]
            pos = torch.arange(N, device=x.device)[None]                   # (1, N): the sequence dim is dim 1
            x = self.wte(x) + self.wpe(pos)                                # (B, N, d)
        for block in self.layers.values():
            x = block(x)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))                                 # (B, N, vocab)
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, N, V), targets (B, N). In f32 at least (bf16 and f16 logits are
    widened; f64 ones stay f64: a cast down to f32 put f32 rounding into every gradient of an f64 run)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.flatten(0, 1).to(wide), targets.flatten())


def make_batch(cfg: ModelConfig, batch: int, seq: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets), (batch, seq) int64 each: random tokens and the next one; the same on every rank."""
    # (seq=-1 or 0 made an empty batch without a word; a float or bool failed inside torch.randint)
    for name, v, least in (("batch", batch, 1), ("seq", seq, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ModelConfigError(f"make_batch: {name}={v!r}; expected an int >= {least}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
