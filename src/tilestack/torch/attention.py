"""``tilestack.attention``: the tile-language attention as a PyTorch op with autograd.

    o = tilestack.attention(q, k, v, causal=False, scale=None)
    # q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H a multiple of Hkv; bf16 or fp16; D in 16..256

Two paths to the same kernels:
- under ``torch.compile`` (and for ``torch.library.opcheck``): the ``tilestack::attention_fwd`` and
  ``tilestack::attention_bwd`` custom ops, each with a fake (meta) implementation, tied together with
  ``register_autograd``, so Dynamo keeps them in the graph without a graph break;
- in eager mode: a ``torch.autograd.Function`` calling the same kernels directly, because a custom op's
  dispatch costs tens of microseconds of Python per call, which a training step at small sizes feels.
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


class _Attention(torch.autograd.Function):
    """The eager path: the kernels without the custom-op dispatcher (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


_is_compiling = torch.compiler.is_compiling


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, D) tensors, as ``F.scaled_dot_product_attention(q, k, v,
    is_causal=causal, scale=scale)`` with GQA (fewer K/V heads) allowed; differentiable. Arguments are
    checked before any work (by the kernels' own checks, once per launch signature)."""
    if _is_compiling() or type(q) is not torch.Tensor or q.is_meta:   # graphs, fake and meta tensors, subclasses
        check_attention_args("attention", q, k, v, scale)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return attention_fwd_op(q, k, v, bool(causal), scale)[0]
    if scale is not None and not isinstance(scale, float):
        check_attention_args("attention", q, k, v, scale)   # an int, a bool, a tensor: refused or made a float
        scale = float(scale)
    causal = bool(causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, causal, scale)
    return attention_forward(q, k, v, causal, scale)[0]
