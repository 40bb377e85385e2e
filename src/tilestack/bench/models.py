"""Two benchmark language models, each buildable on torch's kernels or on tilestack's, with the same
parameters (one state_dict loads into both), for timing a whole training step.

    model = GPT(GPT2_SMALL, impl="tilestack").cuda().bfloat16()
    opt = make_optimizer(model)
    batch = make_batch(model.cfg, B=4, N=2048, device="cuda")
    loss = train_step(model, batch, opt)            # forward, backward, optimizer step; the loss (0-d)

- ``GPT``: GPT-2 shaped (learned positions, LayerNorm, GELU MLP, causal multi-head attention, the LM head
  tied to the token embedding). ``GPT2_SMALL``: 12 layers, d=768, 12 heads of 64, vocabulary 50257.
- ``Llama``: Llama shaped (RMSNorm, rotary embedding, grouped-query attention, SwiGLU MLP, untied LM head).
  ``LLAMA_1B``: 16 layers, d=2048, 16 query heads and 4 key/value heads of 128, MLP hidden 5632, vocab 32000.
- ``*_TINY``: the same architectures small enough for a CPU test.

``impl="torch"``: torch's own ops: F.scaled_dot_product_attention (whatever backend it picks), the residual
add then F.layer_norm / F.rms_norm, rotary and SwiGLU as tensor expressions, and the LM head's logits in full
followed by F.cross_entropy on them in f32 (as Hugging Face models do). ``impl="tilestack"``:
``tilestack.attention`` and the tile kernels of ``tilestack.torch.ops`` (norms with the residual add before them
fused in, rotary, SwiGLU, and the fused linear + cross-entropy that never makes the logits whole). GEMMs
(nn.Linear), embeddings and GELU are torch's in both. The blocks pass (residual stream, block output) pairs so
that the add can be fused into the next norm; the arithmetic is the same in both.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("torch", "tilestack")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    d: int = 768
    n_head: int = 12
    vocab: int = 50257
    max_seq: int = 8192
    eps: float = 1e-5

    def flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token (``perf.formulas.transformer_train_flops_per_token``): blocks of 12 d^2
        matmul parameters, the LM head."""
        from tilestack.perf.formulas import transformer_train_flops_per_token

        return transformer_train_flops_per_token(matmul_params=self.n_layer * 12 * self.d ** 2 + self.vocab * self.d,
                                                 n_layer=self.n_layer, seq=seq, attention_width=self.d)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    n_layer: int = 16
    d: int = 2048
    n_head: int = 16
    n_kv_head: int = 4
    head_dim: int = 128
    hidden: int = 5632
    vocab: int = 32000
    max_seq: int = 8192
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def flops_per_token(self, seq: int) -> float:
        """As GPTConfig.flops_per_token: q/o projections d x (H * Dh), k/v d x (Hkv * Dh), SwiGLU 3 * d * hidden,
        the LM head."""
        from tilestack.perf.formulas import transformer_train_flops_per_token

        hd = self.n_head * self.head_dim
        per_layer = 2 * self.d * hd + 2 * self.d * self.n_kv_head * self.head_dim + 3 * self.d * self.hidden
        return transformer_train_flops_per_token(matmul_params=self.n_layer * per_layer + self.vocab * self.d,
                                                 n_layer=self.n_layer, seq=seq, attention_width=hd)


GPT2_SMALL = GPTConfig()
GPT_1P3B = GPTConfig(n_layer=24, d=2048, n_head=16, vocab=50304, max_seq=2048)   # issue 12's MFU model
GPT2_TINY = GPTConfig(n_layer=2, d=32, n_head=2, vocab=97, max_seq=64)
LLAMA_1B = LlamaConfig()
LLAMA_TINY = LlamaConfig(n_layer=2, d=64, n_head=4, n_kv_head=2, head_dim=16, hidden=96, vocab=101, max_seq=64)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    return impl


# ---- the ops that differ between the two implementations ----------------------------------------------------------
def _add_norm(impl: str, h, delta, norm: nn.Module):
    """(y, h + delta) with y = norm(h + delta): the pre-norm block's residual add and the norm after it (one pass
    of the fused kernel with tilestack; an add and the norm with torch). ``delta`` None: no add."""
    ln = isinstance(norm, nn.LayerNorm)
    if impl == "tilestack":
        from tilestack.torch import ops
        if delta is None:
            return (ops.layer_norm(h, norm.weight, norm.bias, norm.eps) if ln
                    else ops.rms_norm(h, norm.weight, norm.eps)), h
        if ln:
            return ops.add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps)
        return ops.add_rms_norm(h, delta, norm.weight, norm.eps)
    if delta is not None:
        h = h + delta
    if ln:
        return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps), h
    return F.rms_norm(h, norm.weight.shape, norm.weight, norm.eps), h


def _causal_attention(impl: str, q, k, v):
    """(B, H, N, D) queries, (B, Hkv, N, D) keys and values -> (B, H, N, D)."""
    if impl == "tilestack":
        from tilestack.torch.attention import attention
        return attention(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _loss(impl: str, x, weight, targets):
    """Mean cross-entropy of the LM head ``x @ weight.T`` against ``targets``; x: (B, N, d), weight: (V, d)."""
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if impl == "tilestack":
        from tilestack.torch.ops import fused_linear_cross_entropy
        return fused_linear_cross_entropy(x, weight, targets)
    logits = F.linear(x, weight)                          # (B*N, V), the whole of it
    return F.cross_entropy(logits.float(), targets)


class _Model(nn.Module):
    """What both models share: the implementation switch and the initialisation."""

    impl: str
    BLOCKS: str          # the attribute holding the repeated layers (an nn.ModuleList)

    def repeated_blocks(self) -> nn.ModuleList:
        """The layers that repeat: what a per-block ``torch.compile`` (torchtitan's way) compiles once for all."""
        return getattr(self, self.BLOCKS)

    def set_impl(self, impl: str) -> _Model:
        """Switch every layer to ``impl`` ("torch" or "tilestack"); the parameters stay as they are."""
        impl = _check_impl(impl)
        for m in self.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        return self

    def init_weights(self, seed: int = 0, n_layer: int = 1) -> None:
        """GPT-2's initialisation, reproducible from ``seed``: normal(0, 0.02) for matrices and embeddings
        (output projections scaled by 1/sqrt(2 * layers)), zeros for biases, ones for norm weights."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "o_proj.weight",
                                                                         "down_proj.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


# ---- GPT-2 ---------------------------------------------------------------------------------------------------------
class GPTAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, impl: str):
        super().__init__()
        self.impl, self.n_head = impl, cfg.n_head
        self.c_attn = nn.Linear(cfg.d, 3 * cfg.d)
        self.c_proj = nn.Linear(cfg.d, cfg.d)

    def forward(self, x):
        B, N, d = x.shape
        hd = d // self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)            # (B, N, d) each
        q, k, v = (t.view(B, N, self.n_head, hd).transpose(1, 2) for t in (q, k, v))   # (B, H, N, hd)
        y = _causal_attention(self.impl, q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, N, d))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, impl: str):
        super().__init__()
        self.impl = impl
        self.ln_1 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.attn = GPTAttention(cfg, impl)
        self.ln_2 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(cfg.d, 4 * cfg.d), c_proj=nn.Linear(4 * cfg.d, cfg.d)))

    def forward(self, h, delta):
        """The residual stream h and the previous block's output delta, not yet added (the add is fused into this
        block's first norm) -> this block's (h, delta)."""
        y, h = _add_norm(self.impl, h, delta, self.ln_1)
        y, h = _add_norm(self.impl, h, self.attn(y), self.ln_2)
        return h, self.mlp.c_proj(F.gelu(self.mlp.c_fc(y), approximate="tanh"))


class GPT(_Model):
    BLOCKS = "h"

    def __init__(self, cfg: GPTConfig = GPT2_SMALL, impl: str = "torch", seed: int = 0):
        super().__init__()
        self.cfg, self.impl = cfg, _check_impl(impl)
        self.wte = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe = nn.Embedding(cfg.max_seq, cfg.d)
        self.h = nn.ModuleList(GPTBlock(cfg, impl) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.init_weights(seed, cfg.n_layer)

    def forward(self, idx, targets=None):
        """idx: (B, N) token ids -> the mean loss against ``targets`` (B, N), or the logits (B, N, V) if none."""
        N = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(N, device=idx.device))   # (B, N, d)
        delta = None
        for block in self.h:
            h, delta = block(h, delta)
        x, _ = _add_norm(self.impl, h, delta, self.ln_f)
        if targets is None:
            return F.linear(x, self.wte.weight)
        return _loss(self.impl, x, self.wte.weight, targets)     # the LM head is the token embedding


# ---- Llama ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, impl: str):
        super().__init__()
        self.impl, self.eps = impl, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return _add_norm(self.impl, x, None, self)[0]


def _rotate_half_torch(x, cos, sin):
    """x: (B, N, H, D); cos, sin: (N, D/2) -> the rotate-half rotation, in x's dtype (as Hugging Face)."""
    c = cos.to(x.dtype)[None, :, None, :]
    s = sin.to(x.dtype)[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, impl: str):
        super().__init__()
        self.impl = impl
        self.h, self.hkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d, bias=False)

    def forward(self, x, cos, sin):
        B, N, _ = x.shape
        q, k, v = self.qkv_proj(x).split((self.h * self.hd, self.hkv * self.hd, self.hkv * self.hd), dim=2)
        q = q.view(B, N, self.h, self.hd)                  # (B, N, H, D)
        k = k.view(B, N, self.hkv, self.hd)                # (B, N, Hkv, D)
        v = v.view(B, N, self.hkv, self.hd).transpose(1, 2)   # (B, Hkv, N, D)
        if self.impl == "tilestack":
            from tilestack.torch.ops import rotary
            q, k = rotary(q, k, cos, sin)                  # contiguous (B, N, H, D), as torch's rotation gives
        else:
            q, k = _rotate_half_torch(q, cos, sin), _rotate_half_torch(k, cos, sin)
        y = _causal_attention(self.impl, q.transpose(1, 2), k.transpose(1, 2), v)   # (B, H, N, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, self.h * self.hd))   # a view where y is laid out like q


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, impl: str):
        super().__init__()
        self.impl = impl
        self.gate_up_proj = nn.Linear(cfg.d, 2 * cfg.hidden, bias=False)   # [gate | up]
        self.down_proj = nn.Linear(cfg.hidden, cfg.d, bias=False)

    def forward(self, x):
        gu = self.gate_up_proj(x)                          # (B, N, 2F)
        if self.impl == "tilestack":
            from tilestack.torch.ops import swiglu
            h = swiglu(gu)
        else:
            gate, up = gu.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, impl: str):
        super().__init__()
        self.impl = impl
        self.input_layernorm = RMSNorm(cfg.d, cfg.eps, impl)
        self.self_attn = LlamaAttention(cfg, impl)
        self.post_attention_layernorm = RMSNorm(cfg.d, cfg.eps, impl)
        self.mlp = LlamaMLP(cfg, impl)

    def forward(self, h, delta, cos, sin):
        """As GPTBlock.forward: (h, delta) in, the add fused into the first norm, (h, delta) out."""
        y, h = _add_norm(self.impl, h, delta, self.input_layernorm)
        y, h = _add_norm(self.impl, h, self.self_attn(y, cos, sin), self.post_attention_layernorm)
        return h, self.mlp(y)


class Llama(_Model):
    BLOCKS = "layers"

    def __init__(self, cfg: LlamaConfig = LLAMA_1B, impl: str = "torch", seed: int = 0):
        super().__init__()
        self.cfg, self.impl = cfg, _check_impl(impl)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d)
        self.layers = nn.ModuleList(LlamaLayer(cfg, impl) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d, cfg.eps, impl)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)   # not in the state_dict
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._rope_tables()
        self.init_weights(seed, cfg.n_layer)

    def _rope_tables(self) -> None:
        from tilestack.kernels.rotary import rotary_tables
        cos, sin = rotary_tables(self.cfg.max_seq, self.cfg.head_dim, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin            # (max_seq, D/2) f32 each

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the rotary tables too: made again, in f32, wherever the model now lives
        out = super()._apply(fn, recurse)
        self._rope_tables()
        return out

    def forward(self, idx, targets=None):
        N = idx.shape[1]
        h = self.embed_tokens(idx)                         # (B, N, d)
        cos, sin = self.rope_cos[:N], self.rope_sin[:N]   # (N, D/2)
        delta = None
        for layer in self.layers:
            h, delta = layer(h, delta, cos, sin)
        x, _ = _add_norm(self.impl, h, delta, self.norm)
        if targets is None:
            return self.lm_head(x)
        return _loss(self.impl, x, self.lm_head.weight, targets)


# ---- a training step ---------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) on a GPU."""
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=fused)


def make_batch(cfg, B: int, N: int, *, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets), each (B, N) int64: random tokens, targets the next token (the last one's is random)."""
    if N > cfg.max_seq:
        raise ValueError(f"make_batch: N={N} is longer than the model's max_seq={cfg.max_seq}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (B, N + 1), generator=gen)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer):
    """One step: the loss of ``batch``, its gradients, the optimizer's update; returns the loss (detached)."""
    idx, targets = batch
    loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
