"""``tilestack.attention``: the tile-language attention as a PyTorch op with autograd.

    o = tilestack.attention(q, k, v, causal=False, scale=None, attn_mask=None, causal_align="top_left",
                            dropout_p=0.0)
    # q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), H a multiple of Hkv; bf16, fp16 or fp32;
    # D, Dv up to 256; attn_mask: bool (True = attend) or additive, broadcastable to (B, H, Nq, Nk)

Dropout (``dropout_p > 0``, in any mode, as torch's SDPA: a model passes 0 in eval) is fused in the kernels: each
call draws a random stream from torch's CPU generator (``torch.manual_seed`` repeats a run), the forward drops
P's entries with it and the backward regenerates the same mask (``kernels.attention_fwd.dropout_mask`` gives it).
A CUDA graph captures the stream drawn at capture, so its replays repeat one mask
(``tilestack.scaled_dot_product_attention`` hands dropout under capture to torch, whose stream is graph-safe).

fp32 inputs: the products go through the tf32 matrix units exactly when torch's own fp32 matmuls do
(``torch.backends.cuda.matmul.allow_tf32``, i.e. ``torch.set_float32_matmul_precision("high")`` or
``torch.backends.cuda.matmul.fp32_precision = "tf32"``; torch's default, "highest", keeps IEEE f32 products).
With tf32 each operand keeps 10 mantissa bits, so o and the gradients are off by about 1e-3 relative (norm)
from float64 (measured on an H200: up to 1.9e-3; the CPU backends, which round to nearest, 3e-4 to 6e-4),
against about 5e-7 in IEEE f32; the softmax, its sums and the lse stay f32.

Causal alignment: "top_left" (query r sees keys c <= r, as torch SDPA's is_causal) or "bottom_right" (query r
sees keys c <= r + Nk - Nq, as FlashAttention-2 >= 2.1 and decoding against a KV cache). The mask gets no
gradient (``tilestack.scaled_dot_product_attention`` hands a mask that needs one to torch).

Two paths to the same kernels:
- under ``torch.compile`` (and for ``torch.library.opcheck``, tensor subclasses, torch.func's transforms): the
  ``tilestack::attention_fwd`` and ``tilestack::attention_bwd`` ops, each with a fake (meta) implementation, the
  first's backward calling the second (``_library.autograd_op``: registered through ``torch.library.Library``,
  which costs less per call than ``custom_op``), so Dynamo keeps them in the graph without a graph break;
- in eager mode: a ``torch.autograd.Function`` calling the same kernels directly, because the op's
  dispatch (the dispatcher and its Python kernels) costs microseconds of Python per call, which a training step at
  small sizes feels.
"""

from __future__ import annotations

import torch

from tilestack.kernels._plan import planned
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, check_attention_args, dropout_rng
from tilestack.lang.kernel import remember
from tilestack.torch._autograd import (
    autocast_unify,
    batched,
    direct_apply,
    forward_ad_active,
    once_differentiable,
    untraced,
)
from tilestack.torch._library import autograd_op


def _fwd_fake(q, k, v, attn_mask, causal, scale, causal_align, dropout_p=0.0, rng=None, precision="ieee"):
    B, H, Nq, D = q.shape   # o as attention_forward makes it: q's layout when Dv == D and it launches, else
    # contiguous (its zeros where no row sees a key: a transposed q's layout here failed a view traced on it)
    launches = 0 not in (B, H, Nq, k.shape[2])
    o = torch.empty_like(q) if v.shape[3] == D and launches else q.new_empty((B, H, Nq, v.shape[3]))
    stats = (2, B, H, Nq) if attn_mask is not None and 0 not in (B, H, Nq, k.shape[2]) else (0,)
    return o, q.new_empty((B, H, Nq), dtype=torch.float32), q.new_empty(stats, dtype=torch.float32)


def _bwd_fake(q, k, v, o, lse, do, attn_mask, causal, scale, causal_align, dropout_p=0.0, rng=None, precision="ieee",
              stats=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@autograd_op("attention_bwd", fake=_bwd_fake, refuse_double="attention")
def attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool, scale: float | None,
                     causal_align: str, dropout_p: float = 0.0, rng: torch.Tensor | None = None,
                     precision: str = "ieee", stats: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(q, k, v, o, lse, do, causal, scale, attn_mask=attn_mask, causal_align=causal_align,
                              dropout_p=dropout_p, rng=rng, precision=precision, stats=stats)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision = inputs
    o, lse, stats = output
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, rng, stats)
    scale = q.shape[-1] ** -0.5 if scale is None else scale     # None: the head dim's default (a traced call)
    ctx.causal, ctx.scale, ctx.causal_align, ctx.dropout_p, ctx.precision = (causal, scale, causal_align,
                                                                             dropout_p, precision)
    ctx.mark_non_differentiable(lse, stats)


def _backward(ctx, do, _dlse, _dstats):
    q, k, v, o, lse, attn_mask, rng, stats = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(q, k, v, o, lse, do.resolve_neg(), attn_mask, ctx.causal, ctx.scale, ctx.causal_align,
                                  ctx.dropout_p, rng, ctx.precision, stats if stats.numel() else None)
    return dq, dk, dv, None, None, None, None, None, None, None


@autograd_op("attention_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_backward)
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                     causal: bool, scale: float | None, causal_align: str, dropout_p: float = 0.0,
                     rng: torch.Tensor | None = None, precision: str = "ieee"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, stats): stats the masked kernels' row max and log2 sum for the backward
    (``attention_forward(..., with_stats=True)``), an empty tensor without a mask (an op returns tensors)."""
    o, lse, stats = attention_forward(q, k, v, causal, scale, attn_mask=attn_mask, causal_align=causal_align,
                                      dropout_p=dropout_p, rng=rng, precision=precision, with_stats=True)
    return o, lse, (lse.new_empty(0) if stats is None else stats)


class _AttentionPlan:
    """One forward signature's eager path: the forward's run, and the backward's runs found by the layout of the
    output's gradient alone (q, k, v, o, lse and the mask are the forward's, so their layouts follow from its
    signature): a backward computes a three-field key, not the six-tensor one of ``attention_backward``."""

    def __init__(self, q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision):
        # no tensor is kept here (a mask's memory would outlive its step): the mask and rng come with each call
        self.options = dict(causal_align=causal_align, dropout_p=dropout_p, precision=precision)
        with torch.no_grad():     # run in _Attention.forward, grad mode off: the plain run (kernels._plan)
            self.forward_run = attention_forward.plan_for(q, k, v, causal, scale, attn_mask=attn_mask, rng=rng,
                                                          with_stats=True, **self.options)
        self.backwards: dict = {}

    def forward(self, q, k, v, causal, scale, attn_mask, rng):
        """(o, lse, stats): stats None without a mask (``attention_forward``'s ``with_stats``)."""
        return self.forward_run(q, k, v, causal, scale, attn_mask=attn_mask, rng=rng, with_stats=True,
                                **self.options)

    def backward(self, q, k, v, o, lse, do, causal, scale, attn_mask, rng, stats):
        key = (do.dtype, do.stride(), do.data_ptr() % 16)
        kwargs = self.options | dict(attn_mask=attn_mask, rng=rng, stats=stats)
        run = self.backwards.get(key)
        if run is None:
            run = remember(self.backwards, key, attention_backward.plan_for(q, k, v, o, lse, do, causal, scale,
                                                                            **kwargs))
        return run(q, k, v, o, lse, do, causal, scale, **kwargs)


@planned
def _attention_plans(q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision):
    return _AttentionPlan(q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision)


class _Attention(torch.autograd.Function):
    """The eager path: the kernels without the custom-op dispatcher (see the module docstring), through one
    ``_AttentionPlan`` per forward signature."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision):
        try:
            plan = _attention_plans.plan_for(q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng,
                                             precision)
        except TypeError:      # an argument no key holds (a list for v, ...): the kernels' own checks refuse it
            check_attention_args("attention", q, k, v, scale, causal=causal, attn_mask=attn_mask,
                                 causal_align=causal_align, dropout_p=dropout_p, rng=rng, precision=precision)
            raise
        o, lse, stats = plan.forward(q, k, v, causal, scale, attn_mask, rng)
        ctx.save_for_backward(q, k, v, o, lse, attn_mask, stats)
        ctx.plan, ctx.causal, ctx.scale, ctx.rng = plan, causal, scale, rng   # rng: a CPU tensor, not saved state
        return o

    @staticmethod
    @once_differentiable("attention")
    def backward(ctx, do):
        q, k, v, o, lse, attn_mask, stats = ctx.saved_tensors
        if batched(do):      # vmap's wrappers (_autograd.batched), which the kernels cannot read: the op takes them
            opts = ctx.plan.options
            dq, dk, dv = attention_bwd_op(q, k, v, o, lse, do.resolve_neg(), attn_mask, ctx.causal, ctx.scale,
                                          opts["causal_align"], opts["dropout_p"], ctx.rng, opts["precision"], stats)
            return dq, dk, dv, None, None, None, None, None, None, None
        dq, dk, dv = ctx.plan.backward(q, k, v, o, lse, do.resolve_neg(), ctx.causal, ctx.scale, attn_mask, ctx.rng,
                                       stats)
        return dq, dk, dv, None, None, None, None, None, None, None


_apply_attention = direct_apply(_Attention)   # .apply minus its Python wrapper


_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_transforms_active = torch._C._are_functorch_transforms_active


def fp32_precision(q: torch.Tensor) -> str:
    """The kernels' input precision for q's products, decided as torch decides for its own fp32 matmuls: "tf32"
    for fp32 inputs when ``torch.backends.cuda.matmul.allow_tf32`` (what cuBLAS reads; set by
    ``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``),
    else "ieee" (torch's default, and bf16/fp16 inputs, whose products are exact either way)."""
    return "tf32" if getattr(q, "dtype", None) is torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _refuse_mask_grad():
    from tilestack.errors import LaunchError
    raise LaunchError("attention: attn_mask requires grad, and the kernels give the mask no gradient; detach it "
                      "(or call under torch.no_grad()), or call tilestack.scaled_dot_product_attention, which hands "
                      "such calls to torch")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, *, attn_mask: torch.Tensor | None = None,
              causal_align: str = "top_left", dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, D) tensors, as ``F.scaled_dot_product_attention(q, k, v,
    attn_mask, dropout_p, is_causal=causal, scale=scale, enable_gqa=True)``; differentiable in q, k and v.
    Dropout applies whenever ``dropout_p > 0`` (module docstring). Arguments are checked before any work (by the
    kernels' own checks, once per launch signature). Inside ``torch.autocast`` q, k and v of different dtypes are
    all cast to the autocast dtype, as torch's SDPA there casts them (``autocast_unify``)."""
    q, k, v = autocast_unify(q, k, v)
    rng = dropout_rng() if dropout_p else None   # checked with the rest: a bad dropout_p is refused below
    precision = fp32_precision(q)
    if _is_compiling() or type(q) is not torch.Tensor or q.is_meta or _transforms_active() or forward_ad_active() \
            or _is_tracing():
        # graphs (torch.jit.trace too: the op recorded as one call, not the kernels' output as a constant), fake and
        # meta tensors, subclasses, torch.func's transforms (vmap: tensors without storage), an open forward-mode AD
        # level (the op refuses a tangent by name)
        untraced(check_attention_args, "attention", q, k, v, scale, causal=causal, attn_mask=attn_mask,
                 causal_align=causal_align, dropout_p=dropout_p, rng=rng)
        if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            _refuse_mask_grad()           # the op's backward gives the mask None: no gradient, no word
        if scale is not None:
            scale = float(scale)
        elif _is_compiling() or not _is_tracing():     # (Dynamo cannot call _is_tracing: asked only outside)
            scale = q.shape[-1] ** -0.5
        # (a trace keeps None: the op takes the head dim's default at each call; a float made here from the traced
        # head dim was recorded as a constant, the wrong scale for a traced module called with another head dim)
        return attention_fwd_op(q, k, v, attn_mask, bool(causal), scale, causal_align, float(dropout_p), rng,
                                precision)[0]
    if scale is not None and not isinstance(scale, float):
        check_attention_args("attention", q, k, v, scale)   # an int, a bool, a tensor: refused or made a float
        scale = float(scale)
    if causal is not True and causal is not False:           # a truthy string or a tensor is a mistake, not True
        check_attention_args("attention", q, k, v, scale, causal=causal)
        causal = bool(causal)                                # numpy's bool_
    try:
        grad_mode = torch.is_grad_enabled()    # a mask that requires grad is harmless under no_grad
        mask_grad = grad_mode and attn_mask is not None and attn_mask.requires_grad
        needs_grad = grad_mode and (q.requires_grad or k.requires_grad or v.requires_grad)
    except AttributeError:   # k, v or the mask not a tensor (free on the way that does not raise)
        check_attention_args("attention", q, k, v, scale, causal=causal, attn_mask=attn_mask)
        raise
    if mask_grad:
        _refuse_mask_grad()
    if needs_grad:
        return _apply_attention(q, k, v, attn_mask, causal, scale, causal_align, dropout_p, rng, precision)
    return attention_forward(q, k, v, causal, scale, attn_mask=attn_mask, causal_align=causal_align,
                             dropout_p=dropout_p, rng=rng, precision=precision)[0]
