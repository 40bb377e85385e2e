"""The norm, rotary, SwiGLU and fused linear + cross-entropy kernels as differentiable PyTorch ops.

    y = tilestack.torch.ops.rms_norm(x, weight, eps=1e-6)           # over the last dim, any leading dims
    y = tilestack.torch.ops.layer_norm(x, weight, bias, eps=1e-5)
    y, h = tilestack.torch.ops.add_rms_norm(x, r, weight)           # h = x + r, y = rms_norm(h): one pass
    y, h = tilestack.torch.ops.add_layer_norm(x, r, weight, bias)
    qr, kr = tilestack.torch.ops.rotary(q, k, cos, sin)             # (B, N, H, D), contiguous
    y = tilestack.torch.ops.swiglu(x)                               # silu(x[..., :F]) * x[..., F:]
    loss = tilestack.torch.ops.fused_linear_cross_entropy(x, weight, labels, ignore_index=-100)

Two paths to the same kernels, as for ``tilestack.attention``:
- under ``torch.compile`` (and for ``torch.library.opcheck``, tensor subclasses, torch.func's transforms):
  ``tilestack::*`` ops, each with a fake implementation and autograd (``_library.autograd_op``: registered through
  ``torch.library.Library``, which costs less per call than ``custom_op``), so Dynamo keeps them in the graph;
- in eager mode: a ``torch.autograd.Function`` per op calling the kernels directly, without the custom-op
  dispatcher's per-call Python.
Both paths call the same kernel-level functions (``tilestack.kernels``), so an op's arithmetic lives once.

torch.func: grad, vjp, jacrev and vmap (per-sample gradients as vmap(grad(f))) go through the ops. What the kernels
cannot give is refused by name: a second derivative (grad(grad(f)), create_graph then backward: the backward
kernels are not differentiable; rotary's is) and forward mode (jvp, jacfwd, hessian, ``torch.autograd.forward_ad``:
no forward-mode derivative), each of which gave zeros without a word before.
"""

from __future__ import annotations

import math

import torch

from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_tensor
from tilestack.kernels._plan import planned
from tilestack.kernels.cross_entropy import IGNORE_INDEX, check_ce_args
from tilestack.kernels.cross_entropy import fused_linear_cross_entropy as _flce
from tilestack.kernels.layernorm import layer_norm as _layer_norm
from tilestack.kernels.layernorm_bwd import _planned_backward, norm_backward
from tilestack.kernels.rmsnorm import _planned_forward, check_norm_args, norm_forward
from tilestack.kernels.rotary import check_rotary_args
from tilestack.kernels.rotary import rotary as _rotary
from tilestack.kernels.swiglu import swiglu as _swiglu
from tilestack.kernels.swiglu import swiglu_backward as _swiglu_backward
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

_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing


_transforms_active = torch._C._are_functorch_transforms_active


def _eager(x: torch.Tensor) -> bool:
    """Whether the thin eager path applies: a plain tensor outside a graph being traced and outside torch.func's
    transforms (grad, vmap, jacrev: their wrapped tensors have no storage for a plan key; the tilestack:: ops take
    them), with no forward-mode AD level open (the ops refuse an input carrying a tangent, by name), and not under
    ``torch.jit.trace``: the tracer records the tilestack:: op as one call, where the kernels' work (NumPy, a Triton
    launch) is out of its sight and their output was recorded as a constant (or a size read as a traced tensor made
    a kernel constant refuse it)."""
    return (not _is_compiling() and type(x) is torch.Tensor and not x.is_meta and not _transforms_active()
            and not forward_ad_active() and not _is_tracing())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim): a view where the layout allows it (rows counted, not -1: a width of 0 leaves -1
    undetermined)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ---- norms: RMS norm and layer norm, each also with the residual add before it ------------------------------------
# One forward op per kind; one backward op per kind, taking the residual stream's gradient dh (None without the
# add). The forward saves the normalised input (h for the fused add) and its statistics. Each op's fake (meta)
# implementation comes first: ``autograd_op`` takes it, with the autograd functions, when it registers the op.
def _rows_or_none(t):
    return None if t is None else _rows(t)


def _plain(t):
    """An incoming gradient as the kernels read it: a lazily negated view (torch's negative bit, which
    ``backward(gradient=z.conj().imag)`` hands over) resolved (the kernels read memory as stored and refuse the
    bit); None and plain tensors as they are (``resolve_neg`` returns a plain tensor itself)."""
    return None if t is None else t.resolve_neg()


def _own(t: torch.Tensor) -> torch.Tensor:
    """A result viewed to its caller's shape (the kernels write (rows, N) tensors), as a tensor autograd does not take
    for a view: a view made inside an autograd Function's forward may not be modified in place ("Output 0 of _Norm
    is a view and is being modified inplace"), so ``y = rms_norm(x, w); y.mul_(2)`` failed where torch's answers.
    ``detach`` keeps the memory and the version counter (an in-place change of a saved output is still caught)."""
    return t.detach()


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _like_rows(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor of x's shape laid out as the norm kernels lay out their results (y, h, dx): like x's (rows, N)
    view (``torch.empty_like`` keeps a dense layout, e.g. a transposed x's columns-first one), viewed back. A
    fake of another layout made Inductor's stride check fail on a transposed x ("expected ... stride 1==16")."""
    return torch.empty_like(_rows(x)).view(x.shape)


def _stat(x: torch.Tensor) -> torch.Tensor:
    """An empty (rows,) f32 tensor: one statistic per row of x's last dim."""
    return x.new_empty(x.numel() // max(1, x.shape[-1]), dtype=torch.float32)


@autograd_op("rms_norm_bwd", fake=lambda dy, x, weight, rstd, dh: (_like_rows(x), torch.empty_like(weight)),
             refuse_double="rms_norm")
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                    dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    dx, sums = norm_backward(_rows(dy), _rows(x), weight, None, rstd, dh=_rows_or_none(dh), centered=False,
                             backend=None, config={})
    return dx.view(x.shape), sums[0]


def _savable(x: torch.Tensor) -> torch.Tensor:
    """x as the backward may keep it: a copy of an inference tensor (made under torch.inference_mode, e.g. features
    computed once), which autograd may not save, when only the weight wants a gradient; torch's rms_norm, a
    composite of ops that save the normalised rows, trains such a weight, and refused nothing."""
    return x.clone() if x.is_inference() else x


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(_savable(x), weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd_op(_plain(dy), x, weight, rstd, None)
    return dx, dw, None


@autograd_op("rms_norm_fwd", fake=lambda x, weight, eps: (_like_rows(x), _stat(x)), setup_context=_rms_setup,
             backward=_rms_backward)
def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, _, rstd = norm_forward(_rows(x), weight, None, None, eps, backend=None, config={})
    return y.view(x.shape), rstd


def _op_needs_input_grad(ctx) -> tuple[bool, ...]:
    """ctx.needs_input_grad of a ``tilestack::`` op's inputs (its autograd Function takes the dispatch keyset first)."""
    return ctx.needs_input_grad[1:]


def _add_rms_setup(ctx, inputs, output):
    _, _, weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])      # h, the normalised input
    ctx.mark_non_differentiable(output[2])
    _mark_constant_results(ctx, (output[1],), (any(_op_needs_input_grad(ctx)[:2]),))    # h = x + r
    ctx.set_materialize_grads(False)          # y unused: dy None, the weight's gradient None (as _Norm's)


def _add_rms_backward(ctx, dy, dh, _drstd):
    if dy is None:                            # only h read: x and r get dh, the weight none
        return dh, dh, None, None
    h, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd_op(_plain(dy), h, weight, rstd, _plain(dh))
    return dx, dx, dw, None                                   # h = x + r: x and r get the same gradient


@autograd_op("add_rms_norm_fwd", fake=lambda x, r, weight, eps: (_like_rows(x), _like_rows(x), _stat(x)),
             setup_context=_add_rms_setup, backward=_add_rms_backward)
def add_rms_norm_fwd_op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, _, rstd = norm_forward(_rows(x), weight, None, _rows(r), eps, backend=None, config={})
    return y.view(x.shape), h.view(x.shape), rstd


def _ln_bwd_fake(dy, x, weight, mean, rstd, dh):
    return _like_rows(x), weight.new_empty((2, weight.shape[0]))


@autograd_op("layer_norm_bwd", fake=_ln_bwd_fake, refuse_double="layer_norm")
def layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                      rstd: torch.Tensor, dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, [dw; db]): dw and db as the two rows of one (2, N) tensor (an op's outputs may not alias)."""
    dx, sums = norm_backward(_rows(dy), _rows(x), weight, mean, rstd, dh=_rows_or_none(dh), centered=True,
                             backend=None, config={})
    return dx.view(x.shape), sums


def _ln_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(_savable(x), weight, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, sums = layer_norm_bwd_op(_plain(dy), x, weight, mean, rstd, None)
    return dx, sums[0], sums[1], None


@autograd_op("layer_norm_fwd", fake=lambda x, weight, bias, eps: (_like_rows(x), _stat(x), _stat(x)),
             setup_context=_ln_setup, backward=_ln_backward)
def layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _layer_norm(_rows(x), weight, bias, eps)
    return y.view(x.shape), mean, rstd


def _add_ln_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3])
    ctx.mark_non_differentiable(output[2], output[3])
    _mark_constant_results(ctx, (output[1],), (any(_op_needs_input_grad(ctx)[:2]),))    # h = x + r
    ctx.set_materialize_grads(False)          # y unused: dy None, weight and bias get None (as _Norm's)


def _add_ln_backward(ctx, dy, dh, _dmean, _drstd):
    if dy is None:                            # only h read: x and r get dh, weight and bias none
        return dh, dh, None, None, None
    h, weight, mean, rstd = ctx.saved_tensors
    dx, sums = layer_norm_bwd_op(_plain(dy), h, weight, mean, rstd, _plain(dh))
    return dx, dx, sums[0], sums[1], None


@autograd_op("add_layer_norm_fwd",
             fake=lambda x, r, weight, bias, eps: (_like_rows(x), _like_rows(x), _stat(x), _stat(x)),
             setup_context=_add_ln_setup, backward=_add_ln_backward)
def add_layer_norm_fwd_op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = norm_forward(_rows(x), weight, bias, _rows(r), eps, backend=None, config={})
    return y.view(x.shape), h.view(x.shape), mean, rstd


class _NormPlan:
    """The eager path of one norm signature (x, r, weight, bias, eps; layer norm when a bias is given, the
    residual add when r is): checked once, the forward's launcher planned once, the backward's planned on its
    first use per gradient layout and then found by a key of the gradients' strides, dtype and alignment only
    (the saved tensors' layouts follow from this signature). What an eager call costs on the host is this.

    The signature fixes x's shape, so the (rows, N) view and the view back are taken with plain ints
    (``view(*shape)``: a ``torch.Size`` argument takes torch's slower parse) and eps is kept as a float."""

    def __init__(self, fn: str, x, r, weight, bias, eps):
        _check_norm(fn, x, weight, eps, bias=bias, r=r)
        self.fn = fn
        self.centered, self.residual = bias is not None, r is not None
        self.eps = float(eps)
        rows = _rows(x)
        self.shape, self.rows = tuple(x.shape), tuple(rows.shape)     # (..., N), (M, N)
        # the runs kept are called with grad mode off (in _Norm.forward, or a no-grad call): planned so, or the
        # kernel function's plan for inputs that require grad would record its refusing node (kernels._plan)
        with torch.no_grad():
            if self.centered and not self.residual:     # layer norm alone: its own kernel, (y, mean, rstd)
                self._forward = _layer_norm.plan_for(rows, weight, bias, eps)
            else:
                self._forward = _planned_forward.plan_for(rows, weight, bias, _rows_or_none(r), eps, None, ())
        self._backward: dict = {}
        # where a no-grad call's statistics go (nobody reads them): one (M,) f32 tensor per plan, so that call
        # allocates only its outputs; concurrent calls overwrite it with values no one reads. Made outside inference
        # mode: a plan made under torch.inference_mode serves later no_grad calls, which may not write an inference
        # tensor ("Inplace update to inference tensor outside InferenceMode")
        with torch.inference_mode(False):
            self._sink = x.new_empty(self.rows[0], dtype=torch.float32)

    def infer(self, x, r, weight, bias):
        """y, or (y, h) with r, shaped as x: the forward without its statistics (no gradient will be asked)."""
        rows, shape = self.rows, self.shape
        if self.centered and not self.residual:
            return self._forward(x.reshape(*rows), weight, bias, self.eps, stats=self._sink)[0].view(*shape)
        y, h, _, _ = self._forward(x.reshape(*rows), weight, bias, None if r is None else r.reshape(*rows), self.eps,
                                   stats=self._sink)
        return y.view(*shape) if r is None else (y.view(*shape), h.view(*shape))

    def forward(self, x, r, weight, bias):
        """(y, h or None, mean or None, rstd) over the rows of x; y and h as (M, N)."""
        rows = self.rows
        if self.centered and not self.residual:
            y, mean, rstd = self._forward(x.reshape(*rows), weight, bias, self.eps)
            return y, None, mean, rstd
        return self._forward(x.reshape(*rows), weight, bias, None if r is None else r.reshape(*rows), self.eps)

    def backward(self, dy, dh, h, weight, mean, rstd):
        """(dx rows, sums) for the gradients dy [, dh] of the forward's outputs."""
        rows = self.rows
        dy, h = dy.reshape(*rows), h.reshape(*rows)
        dh = None if dh is None else dh.reshape(*rows)
        key = (dy.dtype, dy.stride(), dy.data_ptr() % 16,
               None if dh is None else (dh.dtype, dh.stride(), dh.data_ptr() % 16))
        run = self._backward.get(key)
        if run is None:
            run = remember(self._backward, key,
                           _planned_backward.plan_for(dy, h, weight, mean, rstd, dh, self.centered, None, ()))
        return run(dy, h, weight, mean, rstd, dh)


@planned
def _norm_plans(fn: str, x, r, weight, bias, eps):
    return _NormPlan(fn, x, r, weight, bias, eps)


def _norm_plan(fn: str, x, r, weight, bias, eps) -> _NormPlan:
    try:
        return _norm_plans.plan_for(fn, x, r, weight, bias, eps)
    except TypeError:        # an argument no key holds (a list for x, ...): checked, so refused, right here
        return _NormPlan(fn, x, r, weight, bias, eps)


class _Norm(torch.autograd.Function):
    """The eager path of all four norms: (y, h) = norm(x [+ r]) by ``plan`` (a ``_NormPlan``, which holds eps)."""

    @staticmethod
    def forward(ctx, x, r, weight, bias, plan):
        y, h, mean, rstd = plan.forward(x, r, weight, bias)
        # the outputs as tensors of their own (``_own``), so that a caller may modify them in place
        h = _savable(x) if h is None else _own(h.view(*plan.shape))
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.plan = plan
        ctx.set_materialize_grads(False)     # an unused h (the last norm's) gives dh None: no zeros made and read
        if r is None:
            return _own(y.view(*plan.shape))
        _mark_constant_results(ctx, (h,), (ctx.needs_input_grad[0] or ctx.needs_input_grad[1],))   # h = x + r
        return _own(y.view(*plan.shape)), h

    @staticmethod
    @once_differentiable(lambda ctx: ctx.plan.fn)
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        plan = ctx.plan
        dy, dh = _plain(dy), _plain(dh)
        if dy is None:
            # y unused, only h = x + r read (the residual stream past a norm whose output is dropped): x and r get
            # h's gradient and weight and bias none, as torch's x + r then norm(h) gives them (zeros were made)
            return dh, dh, None, None, None
        if batched(dy) or batched(dh):       # (see ``batched``): the backward ops take them
            if plan.centered:
                dx, sums = layer_norm_bwd_op(dy, h, weight, mean, rstd, dh)
            else:
                dx, dw = rms_norm_bwd_op(dy, h, weight, rstd, dh)
                sums = (dw,)
        else:
            dx, sums = plan.backward(dy, dh, h, weight, mean, rstd)
            dx = dx.view(*plan.shape)
        return dx, (dx if plan.residual else None), sums[0], (sums[1] if plan.centered else None), None


_apply_norm = direct_apply(_Norm)   # .apply minus its Python wrapper


def _check_norm(fn: str, x, weight, eps, bias=None, r=None) -> None:
    """Every check of a norm's arguments (x of any rank); run once per signature by _NormPlan, and when traced."""
    if fn.startswith("add_") and r is None:
        # the fused add returns (y, h), which its caller unpacks: r=None made it the plain norm's y alone, and
        # `y, h = add_rms_norm(x, None, w)` split y along its first dim into two tensors without a word
        raise LaunchError(f"{fn}: r must be a torch.Tensor of x's shape (the residual added to x), got None; for the "
                          f"norm alone, call {fn.removeprefix('add_')}")
    for name, t in (("x", x), ("r", r)):
        if isinstance(t, torch.Tensor):      # a dense tensor before the (rows, N) view of it
            check_tensor(fn, name, t)
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        raise LaunchError(f"{fn}: x must have at least one dim, got a 0-d tensor")
    rows = _rows(x) if isinstance(x, torch.Tensor) else x
    r_rows = _rows(r) if isinstance(r, torch.Tensor) and r.dim() > 0 else r
    if isinstance(r, torch.Tensor) and isinstance(x, torch.Tensor) and r.shape != x.shape:
        raise LaunchError(f"{fn}: r is {tuple(r.shape)}; expected x's shape {tuple(x.shape)}")
    check_norm_args.__wrapped__(fn, rows, weight, eps, bias=bias, residual=r_rows)


def _norm(fn: str, x, r, weight, bias, eps):
    """y (no r) or (y, h) of the named norm, eager or traced; every public norm below is this."""
    if not _eager(x):
        untraced(_check_norm, fn, x, weight, eps, bias=bias, r=r)
        eps = float(eps)
        if r is None:
            return (layer_norm_fwd_op(x, weight, bias, eps) if bias is not None else
                    rms_norm_fwd_op(x, weight, eps))[0]
        out = add_layer_norm_fwd_op(x, r, weight, bias, eps) if bias is not None else \
            add_rms_norm_fwd_op(x, r, weight, eps)
        return out[0], out[1]
    plan = _norm_plan(fn, x, r, weight, bias, eps)
    # autograd only where a gradient is asked for: under no_grad a bias or r that requires grad takes the plain way
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (r is not None and r.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _apply_norm(x, r, weight, bias, plan)
    return plan.infer(x, r, weight, bias)


_NO_BIAS = ("{fn}: bias must be a torch.Tensor of shape (N,), got None; the kernels take a bias (for a layer norm "
            "without one, pass torch.zeros_like(weight))")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm over the last dim of ``x`` (any leading dims) times ``weight``; differentiable in both."""
    return _norm("rms_norm", x, None, weight, None, eps)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(y, h): h = x + r (the residual stream, in x's dtype) and y = rms_norm(h, weight), in one pass;
    differentiable in x, r and weight."""
    return _norm("add_rms_norm", x, r, weight, None, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dim of ``x`` (any leading dims) with ``weight`` and ``bias``; differentiable.
    weight and bias share a dtype."""
    if bias is None:     # not RMS norm (what a norm without a bias is below): refused, not silently changed
        raise LaunchError(_NO_BIAS.format(fn="layer_norm"))
    return _norm("layer_norm", x, None, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """(y, h): h = x + r (the residual stream, in x's dtype) and y = layer_norm(h, weight, bias), in one pass;
    differentiable in x, r, weight and bias."""
    if bias is None:
        raise LaunchError(_NO_BIAS.format(fn="add_layer_norm"))
    return _norm("add_layer_norm", x, r, weight, bias, eps)


def _mark_constant_results(ctx, results, needed) -> None:
    """Mark each result whose input needs no gradient as not differentiable: the rotation of k alone, or the sum
    h = x + r, then does not require grad where torch's own ops' result does not (it did, with a graph to nothing)."""
    constant = [t for t, need in zip(results, needed, strict=True) if not need]
    if constant:
        ctx.mark_non_differentiable(*constant)


# ---- rotary embedding -----------------------------------------------------------------------------------------
def _rotate(q, k, cos, sin, inverse: bool):
    # contiguous (B, N, H, D) results: attention reads them through a transpose, and its output, laid out like
    # q, is then (B, N, H, D) in memory too, so the model's merge of the heads is a view, not a copy
    return _rotary(q, k, cos, sin, inverse=inverse)


def _rotary_setup(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse
    ctx.set_materialize_grads(False)          # an unused result: its input's gradient None (as _Rotary's)
    _mark_constant_results(ctx, output, _op_needs_input_grad(ctx)[:2])


def _rotary_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    if dq is None and dk is None:
        return None, None, None, None, None
    # an unused result's input gets None; the other is rotated beside zero heads of itself (as in _Rotary)
    q_grad, k_grad = _plain(dk[:, :, :0] if dq is None else dq), _plain(dq[:, :, :0] if dk is None else dk)
    q_grad, k_grad = rotary_op(q_grad, k_grad, cos, sin, not ctx.inverse)    # the rotation by minus the angle
    return (None if dq is None else q_grad), (None if dk is None else k_grad), None, None, None


@autograd_op("rotary", fake=lambda q, k, cos, sin, inverse: (_like(q), _like(k)), setup_context=_rotary_setup,
             backward=_rotary_backward)
def rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, inverse)


class _Rotary(torch.autograd.Function):
    """The rotation (by minus the angle with ``inverse``); its backward is the opposite rotation, itself this
    Function under ``create_graph`` (the op is linear in q and k), so gradients of gradients are exact."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inverse):
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse
        ctx.set_materialize_grads(False)     # an unused result gives None: its input gets no gradient, as torch's
        qr, kr = _rotate(q, k, cos, sin, inverse)
        _mark_constant_results(ctx, (qr, kr), ctx.needs_input_grad[:2])
        return qr, kr

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _plain(dq), _plain(dk)
        # one result unused (only the rotated q read, say): its input's gradient is None, as torch's rotation of q
        # and k, two separate computations, gives; the kernel rotates the other alone, beside zero heads of it
        unused_q, unused_k = dq is None, dk is None
        if unused_q and unused_k:            # (gradcheck hands in undefined gradients for every output)
            return None, None, None, None, None
        dq = dk[:, :, :0] if unused_q else dq
        dk = dq[:, :, :0] if unused_k else dk
        if batched(dq) or batched(dk):       # (see ``batched``): the op takes them
            dq, dk = rotary_op(dq, dk, cos, sin, not ctx.inverse)
        elif torch.is_grad_enabled():        # create_graph: the backward recorded, for a double backward
            dq, dk = _Rotary.apply(dq, dk, cos, sin, not ctx.inverse)
        else:
            dq, dk = _rotate(dq, dk, cos, sin, not ctx.inverse)
        return (None if unused_q else dq), (None if unused_k else dk), None, None, None


_apply_rotary = direct_apply(_Rotary)   # .apply minus its Python wrapper


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k) rotated (rotate-half RoPE); q: (B, N, H, D), k: (B, N, Hkv, D), cos/sin: (N, D/2) f32 (see
    ``tilestack.kernels.rotary_tables``). The results are contiguous tensors of q's and k's shapes (the inputs may
    be strided views, e.g. of a fused qkv projection). Differentiable in q and k."""
    untraced(check_rotary_args, "rotary", q, k, cos, sin, differentiable=True)
    if not _eager(q):
        return rotary_op(q, k, cos, sin, False)
    if _needs_grad(q, k):
        return _apply_rotary(q, k, cos, sin, False)
    return _rotate(q, k, cos, sin, False)


# ---- SwiGLU ---------------------------------------------------------------------------------------------------
def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    f = x.shape[-1] // 2
    return rows[:, :f], rows[:, f:]


def _swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    a, b = _halves(x)
    return _swiglu(a, b).view(*x.shape[:-1], x.shape[-1] // 2)


def _swiglu_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a, b = _halves(x)
    dx = torch.empty(a.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)   # (M, 2F): [da | db]
    f = a.shape[1]
    _swiglu_backward(_rows(dy), a, b, da=dx[:, :f], db=dx[:, f:])
    return dx.view(x.shape)


@autograd_op("swiglu_bwd", fake=lambda dy, x: _like(x), refuse_double="swiglu")
def swiglu_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _swiglu_grad(dy, x)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_bwd(ctx, dy):
    (x,) = ctx.saved_tensors
    return swiglu_bwd_op(_plain(dy), x)


@autograd_op("swiglu_fwd", fake=lambda x: x.new_empty((*x.shape[:-1], x.shape[-1] // 2)),
             setup_context=_swiglu_setup, backward=_swiglu_bwd)
def swiglu_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return _swiglu_forward(x)


class _SwiGLUPlan:
    """The eager path of one SwiGLU signature (x): the forward's run planned once, the backward's planned on its
    first use per gradient layout and found by a key of dy's layout, the grad mode and whether dy or x require
    grad (what the backward's ``da=``/``db=`` check depends on; x's layout follows from this signature). x's
    shapes are kept as plain ints, as ``_NormPlan`` keeps them."""

    def __init__(self, x):
        check_tensor("swiglu", "x", x)       # named as the caller knows it (a lazily negated view: refused)
        rows = _rows(x)
        m, f = rows.shape[0], x.shape[-1] // 2
        self.f, self.shape, self.rows = f, tuple(x.shape), (m, 2 * f)       # (..., 2F), (M, 2F)
        self.out_shape, self.out_rows = (*x.shape[:-1], f), (m, f)         # (..., F), (M, F)
        with torch.no_grad():          # run with grad mode off, as _NormPlan's
            self._forward = _swiglu.plan_for(rows[:, :f], rows[:, f:])
        self._backward: dict = {}

    def halves(self, x):
        rows, f = x.reshape(*self.rows), self.f
        return rows[:, :f], rows[:, f:]

    def forward(self, x):
        return self._forward(*self.halves(x)).view(*self.out_shape)

    def backward(self, dy, x):
        a, b = self.halves(x)
        dy = dy.reshape(*self.out_rows)
        dx = x.new_empty(self.rows)                                        # (M, 2F): [da | db]
        da, db = dx[:, :self.f], dx[:, self.f:]
        key = (dy.dtype, dy.stride(), dy.data_ptr() % 16, dx.data_ptr() % 16, dy.requires_grad, x.requires_grad,
               torch.is_grad_enabled())
        run = self._backward.get(key)
        if run is None:
            run = remember(self._backward, key, _swiglu_backward.plan_for(dy, a, b, da=da, db=db))
        run(dy, a, b, da=da, db=db)
        return dx.view(*self.shape)


@planned
def _swiglu_plans(x):
    return _SwiGLUPlan(x)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.save_for_backward(x)
        ctx.plan = plan
        return _own(plan.forward(x))           # (a view of the kernel's (M, F) result: ``_own``)

    @staticmethod
    @once_differentiable("swiglu")
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if batched(dy):                      # (see ``batched``): the op takes them
            return swiglu_bwd_op(_plain(dy), x), None
        return ctx.plan.backward(_plain(dy), x), None


_apply_swiglu = direct_apply(_SwiGLU)   # .apply minus its Python wrapper


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b with a, b the two halves of x's last dim (a gate and an up projection made by one GEMM):
    (..., 2F) -> (..., F); differentiable, the gradient landing in one (..., 2F) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or untraced(lambda: x.shape[-1] % 2):
        got = untraced(lambda: tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LaunchError(f"swiglu: x must be a tensor whose last dim is even (the two halves a, b); got {got}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LaunchError(f"swiglu: x has dtype {x.dtype}; expected one of float32, bfloat16, float16")
    if not _eager(x):
        untraced(check_tensor, "swiglu", "x", x)       # (a nested tensor is a subclass: here, not on the eager path)
        return swiglu_fwd_op(x)
    try:
        plan = _swiglu_plans.plan_for(x)
    except TypeError:        # no key for x (a sparse tensor): refused by name
        check_tensor("swiglu", "x", x)
        raise
    if _needs_grad(x):
        return _apply_swiglu(x, plan)
    return plan.forward(x)


# ---- fused linear + cross-entropy ------------------------------------------------------------------------------
def _ce_setup(ctx, inputs, output):
    _, dx, dw = output
    # under torch.func's transforms the backward is an op that takes x and weight too (unused: there so that an outer
    # transform sees the gradients depend on them, and refuses their derivative by name: grad(grad(f)) read it as
    # zero otherwise); elsewhere once_differentiable marks the gradients, and x is not kept for it
    ctx.save_for_backward(dx, dw, *(inputs[:2] if _transforms_active() else ()))
    ctx.mark_non_differentiable(dx, dw)
    if not _transforms_active():
        ctx.labelled = inputs[2] != inputs[3]          # (T,): the rows _ce_grads scales


@autograd_op("fused_linear_cross_entropy_bwd",
             fake=lambda dloss, dx, dw, x, weight: (torch.empty_like(dx), torch.empty_like(dw)),
             refuse_double="fused_linear_cross_entropy")
def fused_linear_cross_entropy_bwd_op(dloss: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor, x: torch.Tensor,
                                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's gradients (made for a loss gradient of 1) scaled by the loss's (x and weight: _ce_setup)."""
    return dx * dloss.to(dx.dtype), dw * dloss.to(dw.dtype)


def _ce_grads(dx: torch.Tensor, dw: torch.Tensor, dloss: torch.Tensor, labelled: torch.Tensor):
    """(dx, dw) made for a loss gradient of 1, scaled by the loss's ``dloss``; rows labelled ignore_index
    (``labelled`` (T,) False) keep a zero gradient, and dw too where no row is labelled, whatever dloss is: the loss
    does not depend on them, as torch's cross_entropy answers. A NaN dloss (the NaN loss of a batch with every row
    ignored, squared or scaled on its way to the backward) made them NaN (0 * NaN), where torch's are 0."""
    # the scale per row is made first ((T,), tiny), so dx is still read and written once, as by dx * dloss
    dx = dx * torch.where(labelled, dloss, 0).to(dx.dtype)[:, None]
    return dx, dw * torch.where(labelled.any(), dloss, 0).to(dw.dtype)


@once_differentiable("fused_linear_cross_entropy")     # (its gradients are the forward's, scaled: no graph)
def _ce_scaled(ctx, dloss):
    dx, dw = ctx.saved_tensors          # made by the forward, for a loss gradient of 1
    return (*_ce_grads(dx, dw, dloss, ctx.labelled), None, None)


def _ce_backward(ctx, dloss, _ddx, _ddw):
    if len(ctx.saved_tensors) == 4:     # saved under torch.func's transforms (_ce_setup)
        return (*fused_linear_cross_entropy_bwd_op(dloss, *ctx.saved_tensors), None, None)
    return _ce_scaled(ctx, dloss)


def _ce_fake(x, weight, labels, ignore_index):
    return x.new_empty((), dtype=torch.float32), torch.empty_like(x), torch.empty_like(weight)


@autograd_op("fused_linear_cross_entropy", fake=_ce_fake, setup_context=_ce_setup, backward=_ce_backward)
def fused_linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flce(x, weight, labels, ignore_index=ignore_index)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index):
        loss, dx, dw = _flce(x, weight, labels, ignore_index=ignore_index)
        # x and weight (those requiring grad: an inference tensor x is never kept) only for once_differentiable's
        # refusing node, through which a second derivative reaches them (else hessian read zeros); freed as dx, dw
        ctx.save_for_backward(dx, dw, *(t for t in (x, weight) if t.requires_grad))
        ctx.labelled = labels != ignore_index          # (T,): the rows _ce_grads scales
        return loss

    @staticmethod
    @once_differentiable("fused_linear_cross_entropy")
    def backward(ctx, dloss):
        dx, dw = ctx.saved_tensors[:2]
        return (*_ce_grads(dx, dw, dloss, ctx.labelled), None, None)


_apply_fused_linear_cross_entropy = direct_apply(_FusedLinearCrossEntropy)   # .apply minus its Python wrapper


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` (x: (T, d), weight: (V, d)) against ``labels`` (T,), skipping
    rows labelled ``ignore_index``; the (T, V) logits are never made whole. A 0-d f32 loss, differentiable in
    x and weight (their gradients are made in the forward, for a loss gradient of 1, and scaled after). Inside
    ``torch.autocast`` an x and a weight of different dtypes are both cast to the autocast dtype, as torch's
    ``F.linear`` there casts them (``autocast_unify``)."""
    x, weight = autocast_unify(x, weight)
    untraced(check_ce_args, "fused_linear_cross_entropy", x, weight, labels, ignore_index)
    if not _eager(x):
        return fused_linear_cross_entropy_op(x, weight, labels, int(ignore_index))[0]
    if _needs_grad(x, weight):
        return _apply_fused_linear_cross_entropy(x, weight, labels, int(ignore_index))
    return _flce(x, weight, labels, ignore_index=ignore_index, grad=False)[0]     # no gradient made: 1 GEMM of 3


__all__ = ["add_layer_norm", "add_rms_norm", "fused_linear_cross_entropy", "layer_norm", "rms_norm", "rotary",
           "swiglu"]
