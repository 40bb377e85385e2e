"""``tilestack.attention``: the tile-language attention as a PyTorch op with autograd.

    o = tilestack.attention(q, k, v, causal=False, scale=None)
    # q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H a multiple of Hkv; bf16 or fp16; D in 16..256

Registered as ``tilestack::attention_fwd`` and ``tilestack::attention_bwd`` custom ops, each with a fake
(meta) implementation, and tied together with ``register_autograd``, so ``torch.compile`` traces through
without a graph break and ``loss.backward()`` gives dq, dk, dv.
"""

from __future__ import annotations

import torch

from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, check_attention_args


@torch.library.custom_op("tilestack::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, scale)


@attention_fwd_op.register_fake
def _(q, k, v, causal, scale):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("tilestack::attention_bwd", mutates_args=())
def attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(q, k, v, o, lse, do, causal, scale)


@attention_bwd_op.register_fake
def _(q, k, v, o, lse, do, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(q, k, v, o, lse, do, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, D) tensors, as ``F.scaled_dot_product_attention(q, k, v,
    is_causal=causal, scale=scale)`` with GQA (fewer K/V heads) allowed; differentiable."""
    check_attention_args("attention", q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fwd_op(q, k, v, bool(causal), scale)[0]
