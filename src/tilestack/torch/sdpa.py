"""A drop-in for ``torch.nn.functional.scaled_dot_product_attention``, and a one-liner that swaps it into a model.

    from tilestack import scaled_dot_product_attention as sdpa
    o = sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)

    handle = tilestack.patch(model)        # F.scaled_dot_product_attention calls now run tilestack's kernels
    handle.undo()                          # or: with tilestack.patch(model): ...

Same arguments, same meaning as torch's. What the kernels do (``tilestack.attention``): (B, H, N, D) inputs in
bf16, fp16 or fp32, head dims up to 256 and Dv != D, GQA (``enable_gqa=True``), a boolean or additive
``attn_mask`` broadcastable to (B, H, Nq, Nk), top-left causal (torch's), and ``dropout_p`` fused in the kernels,
applied whenever it is > 0 as torch's (a model passes 0 in eval), from torch's CPU generator, so
``torch.manual_seed`` repeats a run (not torch's own mask: the random bits differ, the distribution is the same).
On a GPU the drop-in hands dropout to torch by default, because the fused dropout kernels were measured slower
than torch's on the H200 (``config.knobs.sdpa_dropout``, ``TILESTACK_SDPA_DROPOUT=fused`` to use them anyway).
fp32 inputs go through the tf32 matrix units exactly when torch's fp32 matmuls do
(``torch.backends.cuda.matmul.allow_tf32``; torch's default "highest" precision keeps IEEE f32): about 1e-3
relative error against float64 with tf32 (up to 1.9e-3 measured on an H200), about 5e-7 without. Anything else (a
mask that needs a gradient or has a rank outside 2 to 4, other ranks, nested tensors, batch broadcasting, mixed
dtypes, tensors on different devices, head dims of 0 or past 256, inputs carrying forward-mode tangents or a
torch.func forward-mode transform (jvp, jacfwd, hessian), a dropout_p outside [0, 1], a scale <= 0 or past f32, an
is_causal or enable_gqa that is not a bool, dropout while a CUDA graph is captured, CPU tensors unless a tilestack
backend is forced) is handed to torch's own function, with a one-time notice saying why (in eager mode; none inside
a compiled graph); torch then answers or raises exactly as it would, except for key and value of different
sequence lengths, refused with a RuntimeError before torch's CPU kernel reads past the shorter one. The signature
is torch's: ``scale`` and ``enable_gqa`` are keyword-only. Inside ``torch.autocast`` the arguments are cast as
torch's autocast casts them for its SDPA (``autocast_args``), so the result has torch's dtype.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from tilestack.config import knobs
from tilestack.kernels._checks import finite_real
from tilestack.kernels.attention_fwd import MAX_SCALE
from tilestack.torch._autograd import forward_ad_active, untraced
from tilestack.torch.attention import attention

torch_sdpa = F.scaled_dot_product_attention   # torch's own, kept before any patch
MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_noticed: set[str] = set()
_AUTOCAST_DEVICES = ("cuda", "cpu")     # the device types whose autocast the drop-in follows
_transforms_active = torch._C._are_functorch_transforms_active


def _jvp_transform_active() -> bool:
    """Whether a torch.func forward-mode transform (jvp; jacfwd and hessian run one) is on the interpreter stack."""
    return any(i.key() == torch._C._functorch.TransformType.Jvp
               for i in torch._C._functorch.get_interpreter_stack() or ())


def unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, scale=None) -> str | None:
    """Why the kernels cannot take this call (None when they can)."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "query, key and value are not all tensors"
    if scale is not None and not ((type(scale) is float or finite_real(scale)) and 0 < scale <= MAX_SCALE):
        return f"scale={scale!r} (the kernels take a number in (0, {MAX_SCALE:.4g}])"
    if forward_ad_active() and any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
                                   for t in (query, key, value, attn_mask)):
        return "inputs carrying forward-mode tangents (torch.func.jvp, jacfwd; the kernels have no forward-mode rule)"
    if not torch.compiler.is_compiling() and _transforms_active() and _jvp_transform_active():
        # torch.func.hessian (jacfwd over jacrev) and jvp over vmap or grad: the tangent sits below the inner
        # transforms' wrappers, where unpack_dual does not see it, and the kernels' op refused it with a LaunchError
        # (a ValueError) where torch raises its NotImplementedError, or answers (its math backend)
        return "a torch.func.jvp transform (jacfwd, hessian; the kernels have no forward-mode rule)"
    if is_causal is not False and is_causal is not True:        # torch decides what 1 or "yes" means
        return f"is_causal={is_causal!r} (not a bool)"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, int | float) or not 0.0 <= dropout_p <= 1.0:
        return f"dropout_p={dropout_p!r} (a probability is a number in [0, 1])"
    if dropout_p and query.is_cuda and torch.cuda.is_current_stream_capturing():
        return "dropout while a CUDA graph is captured (a replay would repeat one mask; torch's is graph-safe)"
    if dropout_p and (knobs.sdpa_dropout == "torch" or (knobs.sdpa_dropout == "auto" and query.is_cuda)):
        return ("dropout_p > 0 (the fused dropout kernels are not yet faster than torch's on a GPU: H200, "
                "docs/performance.md; config.knobs.sdpa_dropout='fused' or TILESTACK_SDPA_DROPOUT=fused uses them)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"inputs of rank {query.dim()}, {key.dim()}, {value.dim()} (the kernels take (B, H, N, D))"
    device = query.device
    if key.device != device or value.device != device or (isinstance(attn_mask, torch.Tensor) and
                                                           attn_mask.device != device):
        # torch decides (it raises a RuntimeError, or ignores a meta mask beside CPU inputs): the kernels' own check
        # raised a LaunchError, a ValueError, which an `except RuntimeError` written for torch's misses
        return "tensors on different devices"
    if device.type != "cuda" and knobs.backend == "auto":
        return f"tensors on {query.device.type} (tilestack's kernels run on CUDA GPUs)"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _DTYPES:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (the kernels take one of bf16, fp16, fp32)"
    if query.is_nested or key.is_nested or value.is_nested:
        return "nested tensors (the kernels take dense (B, H, N, D) tensors)"
    if not torch.compiler.is_compiling() and (query.is_neg() or key.is_neg() or value.is_neg() or (
            isinstance(attn_mask, torch.Tensor) and attn_mask.is_neg())):      # (a graph's tensors carry no bit)
        return ("a lazily negated view (torch's negative bit, e.g. the .imag of a .conj() view; the kernels read "
                "memory as stored)")
    if not (query.shape[0] == key.shape[0] == value.shape[0]) or key.shape[:3] != value.shape[:3]:
        return f"batch or key/value shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
    if enable_gqa is not False and enable_gqa is not True:      # torch takes a bool only: "no" is not True
        return f"enable_gqa={enable_gqa!r} (not a bool)"
    if query.shape[1] != key.shape[1] and not (enable_gqa and key.shape[1] and query.shape[1] % key.shape[1] == 0):
        return f"{query.shape[1]} query heads and {key.shape[1]} key/value heads without enable_gqa"
    if query.shape[3] != key.shape[3] or not all(1 <= d <= MAX_HEAD_DIM for d in (query.shape[3], value.shape[3])):
        return f"head dims {query.shape[3]} and {value.shape[3]} (the kernels take 1 to {MAX_HEAD_DIM})"
    if attn_mask is not None:
        if is_causal:
            return "both attn_mask and is_causal (torch decides what that means)"
        if not isinstance(attn_mask, torch.Tensor):
            return f"an attn_mask of type {type(attn_mask).__name__} (not a tensor)"
        if attn_mask.requires_grad:
            return "an attn_mask that needs a gradient (the kernels give the mask none)"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return f"an attn_mask of dtype {attn_mask.dtype} with {query.dtype} inputs"
        if not 2 <= attn_mask.dim() <= 4:    # a rank-5 mask of ones broadcasts, but torch refuses it: so must we
            return f"an attn_mask of rank {attn_mask.dim()} (torch's takes rank 2 to 4)"
        try:
            torch.broadcast_shapes(attn_mask.shape, (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
        except RuntimeError:
            return f"an attn_mask of shape {tuple(attn_mask.shape)} that does not broadcast"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """``F.scaled_dot_product_attention`` through tilestack's kernels where they apply (module docstring). Its
    signature is torch's: ``scale`` and ``enable_gqa`` are keyword-only there (a seventh positional argument is a
    TypeError), so they are here."""
    q, k, v, mask = autocast_args(query, key, value, attn_mask)
    # (checks only: under torch.jit.trace, with the tracer's sizes-as-tensors out of the way; the branch is the trace's)
    why = untraced(unsupported, q, k, v, mask, dropout_p, is_causal, enable_gqa, scale)
    if why is not None:
        untraced(_refuse_key_value_lengths, key, value)
        # the notice in eager mode only: Dynamo cannot trace warnings.warn, so under torch.compile(fullgraph=True)
        # a call handed to torch failed to compile where torch's own function compiles
        if why not in _noticed and not torch.compiler.is_compiling():
            _noticed.add(why)
            warnings.warn(f"tilestack.scaled_dot_product_attention: handing {why} to torch's own function "
                          "(said once per reason)", stacklevel=2)
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return attention(q, k, v, causal=is_causal, scale=scale, attn_mask=mask, dropout_p=dropout_p)


def _refuse_key_value_lengths(key, value) -> None:
    """key and value with different sequence lengths (dim -2) are refused before torch sees them: torch's math
    backend raises a RuntimeError, but its CPU flash kernel, the one a CPU call takes, answers from memory past the
    shorter one and its backward corrupts the heap (a crash: "double free or corruption", torch 2.13). (Only on the
    way to torch: the kernels' own checks refuse them on theirs.)"""
    if isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor) and not (key.is_nested or value.is_nested) \
            and key.dim() >= 2 and value.dim() >= 2 and key.shape[-2] != value.shape[-2]:   # (nested: no sizes)
        from tilestack.errors import TorchArgumentError
        raise TorchArgumentError(f"scaled_dot_product_attention: key has {key.shape[-2]} keys and value "
                                 f"{value.shape[-2]} (dim -2: key {tuple(key.shape)}, value {tuple(value.shape)}); "
                                 "expected one sequence length S for both")


def autocast_args(query, key, value, attn_mask):
    """The arguments as torch's autocast gives them to its SDPA, one of its lower-precision ops: inside
    ``torch.autocast`` (the inputs' device type), every floating tensor but a float64 one cast to the autocast
    dtype (a float mask too), so the drop-in answers in that dtype as torch's does (it answered in f32: the dtype,
    the memory and the speed of f32 attention where torch's ran in bf16); else the arguments themselves."""
    if not isinstance(query, torch.Tensor) or query.device.type not in _AUTOCAST_DEVICES or \
            not torch.is_autocast_enabled(query.device.type):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(query.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
            else t
    return cast(query), cast(key), cast(value), cast(attn_mask)


class Patch:
    """What ``patch`` replaced, to put back with ``undo()`` (or at the end of a ``with`` block)."""

    def __init__(self, replaced: list[tuple[object, str, object]]):
        self.replaced = replaced

    def undo(self) -> None:
        """Put torch's function back where tilestack's still stands. A name that was bound to something else since
        (another library's patch made after this one) is left as it is, with a warning: putting torch's back there
        would silently undo that library's patch."""
        for owner, name, old in reversed(self.replaced):
            now = getattr(owner, name, None)
            if now is scaled_dot_product_attention:
                setattr(owner, name, old)
            else:
                warnings.warn(f"tilestack.patch: undo left {getattr(owner, '__name__', owner)}.{name} as it is: it "
                              f"was replaced since the patch (now {getattr(now, '__qualname__', type(now).__name__)}"
                              "), and putting torch's scaled_dot_product_attention back would undo that replacement",
                              RuntimeWarning, stacklevel=2)
        self.replaced = []

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch(model: torch.nn.Module | None = None) -> Patch:
    """Route ``F.scaled_dot_product_attention`` to tilestack without editing the model: the attribute of
    ``torch.nn.functional`` (which Hugging Face's "sdpa" attention and most models call through) and any name
    bound to torch's function in the modules that define ``model``'s classes (``from torch.nn.functional import
    scaled_dot_product_attention``). Returns a ``Patch``; ``undo()`` restores torch's."""
    replaced: list[tuple[object, str, object]] = []
    owners: list[object] = [F]
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            from tilestack.errors import LaunchError
            raise LaunchError(f"patch: model must be a torch.nn.Module or None, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):    # compiled code calls torch's op itself: no name to rebind
            from tilestack.errors import LaunchError
            raise LaunchError(f"patch: model is a TorchScript module ({type(model).__name__}: scripted or traced), "
                              "whose compiled code calls torch's scaled_dot_product_attention directly; expected "
                              "the torch.nn.Module itself, run eagerly or under torch.compile")
        seen = set()
        for m in model.modules():
            name = type(m).__module__
            if name not in seen and name in sys.modules:
                seen.add(name)
                owners.append(sys.modules[name])
    for owner in owners:
        for name, value in list(vars(owner).items()):
            if value is torch_sdpa:
                setattr(owner, name, scaled_dot_product_attention)
                replaced.append((owner, name, value))
    return Patch(replaced)
