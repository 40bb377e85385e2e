"""``tilestack.quantize(model, ...)``: post-training quantization of a model's ``nn.Linear`` layers onto the
quantized GEMMs of ``tilestack.quant.gemm``.

    qmodel = tilestack.quantize(model, "int8")                          # weight-only int8, per-channel scales
    qmodel = tilestack.quantize(model, "fp8")                           # weight-only fp8 E4M3
    qmodel = tilestack.quantize(model, "fp8-act", calibration=batches)  # fp8 weights and activations
    qmodel = tilestack.quantize(model, "int8", skip=("lm_head",))       # leave layers by name

"fp8-act" runs ``model(*batch)`` (or ``model(batch)`` for a tensor) on each calibration batch with the float
weights and records, for every linear layer, the largest |input| and the mean of each input feature. The largest
fixes the layer's activation scale: the smallest power of two that maps it within +-448 (static per-tensor
scales, as TensorRT's int8 calibration fixes its ranges before deployment; ``gemm.activation_scale`` says why a
power of two). The mean corrects the bias for the weights' rounding (bias correction, Nagel et al. 2019): the
quantized weight Wq misses (W - Wq) E[x] of the output's mean, so that is added to the bias (a layer without a
bias gets one).

The model is changed in place (its linear layers become ``QuantLinear``) and returned (a bare ``nn.Linear``
model: its ``QuantLinear``). ``QuantLinear`` runs inference only (a backward through it is refused); under
``torch.compile`` it is the ``tilestack::quant_linear`` custom op.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from tilestack.errors import LaunchError, LaunchTypeError
from tilestack.kernels._checks import finite_real
from tilestack.quant.gemm import MAX_SCALE, MIN_SCALE, activation_scale, quantize_weight, quantized_linear

MODES = {"int8": "int8", "fp8": "fp8", "fp8-act": "fp8"}     # mode -> the weights' format


@torch.library.custom_op("tilestack::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    x_scale: float) -> torch.Tensor:
    """x (M, K) @ dequantized q^T + bias; x_scale 0 means weight-only."""
    return quantized_linear(x, q, scale, bias, x_scale=x_scale or None)


@quant_linear_op.register_fake
def _(x, q, scale, bias, x_scale):
    return x.new_empty((x.shape[0], q.shape[0]))


@torch.library.custom_op("tilestack::quant_linear_no_backward", mutates_args=())
def quant_linear_no_backward_op(dy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient of ``tilestack::quant_linear``'s input t (x or the bias) in a compiled graph: refused when it
    runs, as in eager mode (its fake lets AOT autograd trace a graph whose input requires grad, so the forward
    still answers)."""
    raise LaunchError("quantized_linear: a backward through a quantized linear layer; it runs inference only (no "
                      "gradient for x, the bias or the residual): keep it out of training, or call it under "
                      "torch.no_grad() / torch.inference_mode()")


@quant_linear_no_backward_op.register_fake
def _(dy, t):
    return torch.empty_like(t)


def _quant_linear_setup(ctx, inputs, output):
    x, _, _, bias, _ = inputs
    ctx.save_for_backward(x, bias)


def _quant_linear_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (quant_linear_no_backward_op(dy, x) if need[0] else None, None, None,
            quant_linear_no_backward_op(dy, bias) if need[3] else None, None)


quant_linear_op.register_autograd(_quant_linear_backward, setup_context=_quant_linear_setup)


_transforms_active = torch._C._are_functorch_transforms_active
_is_grad_tracking = torch._C._functorch.is_gradtrackingtensor
_AUTOCAST_DEVICES = ("cuda", "cpu")     # the device types whose autocast QuantLinear follows, as nn.Linear does
_AUTOCAST_CAST = (torch.float32, torch.bfloat16, torch.float16)   # what autocast casts (not float64, nor fp8)


class QuantLinear(nn.Module):
    """An ``nn.Linear`` with its weight in int8 or fp8 E4M3 and one f32 scale per output channel (buffers
    ``qweight`` (out, in) and ``scale`` (out,)); ``x_scale`` > 0: the input is quantized to fp8 too.
    ``input_mean`` (in,): the mean of the layer's input over calibration data; the bias then absorbs the mean
    output the weights' rounding misses, (W - qweight * scale) @ input_mean (a layer without a bias gets one)."""

    def __init__(self, linear: nn.Linear, mode: str, x_scale: float = 0.0, input_mean: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise LaunchError(f"QuantLinear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if not isinstance(mode, str) or mode not in MODES:
            raise LaunchError(f"QuantLinear: mode={mode!r}; expected one of {tuple(MODES)}")
        _check_x_scale(mode, x_scale)
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        w = linear.weight.detach()
        q, s = quantize_weight(w, MODES[mode])
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if input_mean is not None:
            if not isinstance(input_mean, torch.Tensor) or tuple(input_mean.shape) != (self.in_features,):
                got = tuple(input_mean.shape) if isinstance(input_mean, torch.Tensor) else type(input_mean).__name__
                raise LaunchError(f"QuantLinear: input_mean is {got}; expected a tensor (in_features="
                                  f"{self.in_features},)")
            if not input_mean.is_floating_point():
                raise LaunchError(f"QuantLinear: input_mean has dtype {str(input_mean.dtype).removeprefix('torch.')}"
                                  "; expected a float tensor (the mean of each input feature)")
            if input_mean.is_meta and not w.is_meta:
                raise LaunchError("QuantLinear: input_mean is a meta tensor, which holds no values to correct the "
                                  "bias with; expected it on the weight's device")
            if not input_mean.is_meta and not bool(torch.isfinite(input_mean).all()):
                raise LaunchError(f"QuantLinear: input_mean {tuple(input_mean.shape)} holds NaN or infinite values; "
                                  "expected finite means (the corrected bias would poison every output)")
            missed = w.double() - q.double() * s.double()[:, None]                  # (out, in)
            shift = missed @ input_mean.to(device=w.device, dtype=torch.float64)   # (out,)
            dtype = w.dtype if bias is None else bias.dtype
            bias = (shift if bias is None else bias.double() + shift).to(dtype)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.register_buffer("bias", bias)
        self.x_scale = float(x_scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:   # nn.Linear's name: models call ``fc(input=h)``
        x, k = input, self.in_features
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != k:   # before a reshape hides it
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise LaunchError(f"QuantLinear: x is {got}; expected a tensor (..., in_features={k})")
        rows = x.reshape(-1, k) if k else x.reshape(math.prod(x.shape[:-1]), 0)   # (M, K)
        device = x.device.type
        if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device) and x.dtype in _AUTOCAST_CAST:
            # as autocast runs the nn.Linear it replaces: x cast to the autocast dtype, y in it (was x's dtype)
            rows = rows.to(torch.get_autocast_dtype(device))
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # torch.jit.trace records the op as one call; the kernel function's work (NumPy on the reference
            # executor, a Triton launch) is out of its sight: its output was traced as a constant, the first batch's
            y = quant_linear_op(rows, self.qweight, self.scale, self.bias, self.x_scale)
        elif _transforms_active():
            # under torch.func's transforms the op too (vmap: the op per slice, through torch's batching fallback;
            # the kernel function refuses a transform's tensors, which have no storage)
            if _is_grad_tracking(x):
                raise LaunchError("QuantLinear: x is a tensor of torch.func.grad (or vjp, jacrev, jacfwd, jvp): a "
                                  "gradient through a quantized linear layer, which runs inference only; keep it out "
                                  "of the differentiated function (torch.func.vmap takes it)")
            y = quant_linear_op(rows, self.qweight, self.scale, self.bias, self.x_scale)
        else:
            y = quantized_linear(rows, self.qweight, self.scale, self.bias, x_scale=self.x_scale or None)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = f", x_scale={self.x_scale:.4g}" if self.x_scale else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{act}"

    def __getattr__(self, name: str):
        if name == "weight":     # a model reading its Linear's weight itself (a tied decoder's F.linear(h, fc.weight
            # .t())) met nn.Module's bare "'QuantLinear' object has no attribute 'weight'" on its first call
            raise AttributeError(f"QuantLinear has no float weight: it holds qweight ({self.mode}, (out_features="
                                 f"{self.out_features}, in_features={self.in_features})) and per-channel scale; a "
                                 "model that reads this layer's .weight itself (weight tying, F.linear(h, "
                                 "layer.weight.t())) needs the layer named in quantize(..., skip=) to keep it float")
        return super().__getattr__(name)

    # the buffers whose dtype is the quantization itself: a module-wide cast leaves them as they are
    _QUANTIZED = ("qweight", "scale")

    def _apply(self, fn, recurse=True):
        """Module casts (``qmodel.half()``, ``.to(torch.bfloat16)``) are for the float layers around this one and
        for its bias: the 8-bit weight and its f32 scales keep their dtypes, and follow device moves. (Cast, the
        fp8 weight became float16 and the scales lost digits: every later call failed in the GEMM's checks.)"""
        kept = {name: self._buffers[name] for name in self._QUANTIZED}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != t.dtype:
                self._buffers[name] = t.to(device=moved.device)
        return self

    def get_extra_state(self) -> dict:
        """What the buffers do not hold: the mode and fp8-act's calibrated activation scale (a state dict without
        them loaded into a layer calibrated otherwise kept that layer's scale without a word)."""
        return {"mode": self.mode, "x_scale": self.x_scale}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or set(state) != {"mode", "x_scale"}:
            raise LaunchError(f"QuantLinear: the state dict's _extra_state is {state!r:.80}; expected a dict of "
                              "'mode' and 'x_scale' (from QuantLinear.state_dict())")
        _check_x_scale(self.mode, state["x_scale"])
        self.x_scale = float(state["x_scale"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # before any buffer is copied: a state dict of another mode (int8 into fp8 or back) was copied in by value,
        # converting the 8-bit codes without a word (0.6 off on a 37 -> 13 layer)
        extra = state_dict.get(prefix + "_extra_state")
        mode = extra.get("mode") if isinstance(extra, dict) else None
        given = state_dict.get(prefix + "qweight")
        if given is None and isinstance(state_dict.get(prefix + "weight"), torch.Tensor):
            # a float model's state (a checkpoint fine-tuned after quantize, the float model's own): strict=False
            # loaded its bias and left the 8-bit weight as it was, a layer of two models, without a word
            raise LaunchError(f"QuantLinear: the state dict at {prefix or 'the model'!r} is a float nn.Linear's "
                              f"(weight {tuple(state_dict[prefix + 'weight'].shape)}, no qweight); expected a "
                              "quantized layer's (qweight, scale): load it into the float model, then quantize that")
        if (mode is not None and mode != self.mode) or (
                isinstance(given, torch.Tensor) and given.dtype != self.qweight.dtype):
            got = mode if mode is not None else str(given.dtype).removeprefix("torch.")
            raise LaunchError(f"QuantLinear: the state dict at {prefix or 'the model'!r} is of mode {got!r} (qweight "
                              f"{str(given.dtype).removeprefix('torch.') if isinstance(given, torch.Tensor) else '?'})"
                              f"; expected mode={self.mode!r} (qweight {str(self.qweight.dtype).removeprefix('torch.')}"
                              "): quantize the float model in that mode before loading it")
        if self.mode == "fp8-act" and isinstance(given, torch.Tensor):
            # fp8-act's bias is calibration's, as x_scale is: a bias-free Linear gets one (the rounding's mean
            # correction) only where a calibration batch reached it, so the state of a layer calibrated otherwise
            # may hold a bias this layer lacks, or lack one it holds ("Unexpected key(s) ... bias"; with strict=False
            # the saved correction dropped, or this layer's kept against the loaded weights, without a word)
            saved = state_dict.get(prefix + "bias")
            if isinstance(saved, torch.Tensor) and self.bias is None:
                self.bias = torch.empty(self.out_features, dtype=saved.dtype, device=self.scale.device)
            elif saved is None and self.bias is not None:
                self.bias = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _check_x_scale(mode: str, x_scale) -> None:
    """``x_scale``: 0 (weights only) or the activations' fp8 scale, a finite number in quantized_linear's range;
    int8 weights take no activation scale, and "fp8-act" needs one (0 would leave it weight-only under its name)."""
    zero = isinstance(x_scale, numbers.Real) and not isinstance(x_scale, bool) and x_scale == 0
    if zero and mode != "fp8-act":
        return
    if mode == "int8":
        raise LaunchError(f"QuantLinear: x_scale={x_scale!r} with mode='int8'; an activation scale is for fp8 "
                          "weights (expected 0: weights only)")
    if not finite_real(x_scale) or not MIN_SCALE <= x_scale <= MAX_SCALE:
        raise LaunchError(f"QuantLinear: x_scale={x_scale!r} with mode={mode!r}; expected "
                          f"{'' if mode == 'fp8-act' else '0 (weights only) or '}a finite number in "
                          f"[{MIN_SCALE:.4g}, {MAX_SCALE:.4g}] (the activations' fp8 scale, e.g. "
                          "gemm.activation_scale(amax))")


@contextlib.contextmanager
def evaluating(*models: nn.Module):
    """Every module of ``models`` in eval mode within the block, each module's own mode restored after (a model
    left in training mode would run dropout and move its BatchNorm statistics)."""
    training = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in training.items():
            m.training = mode


def _batch_problem(batch) -> str | None:
    """Why ``batch`` is not one calibration batch (a tensor, a dict of keyword arguments, or an iterable of positional
    arguments), or None. (None or a number failed inside the call, "<the model's whole repr> argument after * must be
    an iterable, not NoneType"; a str was spread into its characters as arguments.)"""
    if isinstance(batch, torch.Tensor):
        return None
    if isinstance(batch, dict):
        keys = [k for k in batch if not isinstance(k, str)]
        return f"a dict with keys {keys[:4]} that are not str (argument names)" if keys else None
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Iterable):
        return f"{type(batch).__name__} {batch!r:.40}"
    return None


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, dict):
        model(**batch)
    else:
        model(*batch)


@dataclass(frozen=True)
class InputStats:
    """What calibration saw at one linear layer's input: ``amax`` the largest |x| (0 when no batch reached
    it), ``mean`` the mean of each input feature over all rows, (in_features,) float64 (None when no row did)."""
    amax: float
    mean: torch.Tensor | None

    def __post_init__(self):
        if not finite_real(self.amax) or self.amax < 0:
            raise LaunchError(f"InputStats: amax={self.amax!r}; expected a finite number >= 0 (the largest |x|)")
        if self.mean is not None and not (isinstance(self.mean, torch.Tensor) and self.mean.dim() == 1
                                          and self.mean.is_floating_point()):
            got = (f"{tuple(self.mean.shape)} {str(self.mean.dtype).removeprefix('torch.')}"
                   if isinstance(self.mean, torch.Tensor) else type(self.mean).__name__)
            raise LaunchError(f"InputStats: mean is {got}; expected None or a float tensor (in_features,)")


def calibrate(model: nn.Module, names: list[str], batches) -> dict[str, InputStats]:
    """The ``InputStats`` of each named linear layer's input over ``batches`` (float weights, no gradients, every
    module in eval mode)."""
    # a tensor, a str or a dict iterates too, but as rows, characters or keys: one batch given for a list of them
    if isinstance(batches, (torch.Tensor, str, bytes, dict)) or not isinstance(batches, Iterable):
        raise LaunchError(f"quantize: calibration must be an iterable of sample batches (e.g. [x1, x2], each a "
                          f"tensor, a tuple of arguments or a dict of keyword arguments), got "
                          f"{type(batches).__name__}")
    if not isinstance(model, nn.Module):
        raise LaunchError(f"calibrate: model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    # a tensor or a 0-d NumPy array failed inside torch or numpy ("iteration over a 0-d tensor"), as quantize's skip
    listed = None
    if not isinstance(names, str | torch.Tensor) and isinstance(names, Iterable):
        with contextlib.suppress(TypeError):
            listed = list(names)
    if listed is None:
        raise LaunchTypeError(f"calibrate: names must be a list of the model's module names, got {names!r:.80} "
                              f"({type(names).__name__})")
    names = listed
    missing = [n for n in names if not isinstance(n, str) or n not in modules]
    if missing:
        raise LaunchError(f"calibrate: names {missing} are not modules of the model; expected names of "
                          f"model.named_modules(), e.g. {[n for n in modules if n][:8]}")
    amax = dict.fromkeys(names, 0.0)
    sums: dict[str, torch.Tensor] = {}           # name -> (in_features,) f64 sum over the rows seen
    rows = dict.fromkeys(names, 0)
    hooks = []
    for name in names:
        def record(_mod, args, kwargs, name=name):
            # nn.Linear's input by position or by its name (``fc(input=x)``: args empty, an IndexError in the model)
            x = (args[0] if args else kwargs["input"]).detach()
            k = modules[name].in_features
            if x.dim() == 0 or x.shape[-1] != k:
                # before the statistics: a batch of another width failed here on its own sum ("The size of tensor a
                # (19) must match the size of tensor b (3)") or, 0-d, on x.shape[-1] ("tuple index out of range")
                raise LaunchError(f"layer {name!r} got an input {tuple(x.shape)}; expected (..., in_features={k}) "
                                  "(the calibration batch does not fit the model)")
            if x.numel():                # an empty input has no largest value
                top = float(x.abs().max())
                # NaN kept (max(a, nan) would keep a, and the check below would pass it by)
                amax[name] = top if math.isnan(top) else max(amax[name], top)
                total = x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)
                sums[name] = total if name not in sums else sums[name] + total
                rows[name] += x.numel() // x.shape[-1]
        hooks.append(modules[name].register_forward_pre_hook(record, with_kwargs=True))
    seen = 0
    # as inference sees it: a model left in training mode had its dropout scale the recorded inputs and its
    # BatchNorm statistics moved by the calibration batches; each module's mode is restored after
    try:
        with evaluating(model), torch.no_grad():
            for batch in batches:
                problem = _batch_problem(batch)
                if problem is not None:
                    raise LaunchError(f"quantize: calibration batch {seen} is {problem}; expected a tensor (model(x)), "
                                      "a tuple or list of the model's positional arguments (model(*batch)) or a dict "
                                      "of its keyword arguments (model(**batch))")
                try:
                    _run(model, batch)
                except Exception as e:   # the model's own error, said as which batch and how it was called
                    how = "model(batch)" if isinstance(batch, torch.Tensor) else "model(**batch)" if isinstance(
                        batch, dict) else "model(*batch)"
                    got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                    raise LaunchError(f"quantize: calibration batch {seen} ({got}) failed in {how}: "
                                      f"{type(e).__name__}: {e}") from e
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    bad = [n for n, a in amax.items() if not math.isfinite(a)]
    if bad:
        raise LaunchError(f"quantize: calibration inputs of {bad} hold NaN or infinite values; expected finite "
                          "activations to fix the fp8 scales from")
    if seen == 0:
        raise LaunchError("quantize: calibration gave no batches; fp8-act needs sample inputs to fix its "
                          "activation scales")
    return {n: InputStats(a, sums[n] / rows[n] if n in sums else None) for n, a in amax.items()}


def quantize(model: nn.Module, mode: str = "int8", *, calibration=None, skip=()) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers (except those whose qualified name is in ``skip`` or ends with
    ``.<name in skip>``) by ``QuantLinear`` in ``mode`` ("int8", "fp8" or "fp8-act"); returns the model. The layers
    with weights it leaves in float (convolutions, embeddings, nn.MultiheadAttention's projections, subclasses of
    nn.Linear, the Linears nn.TransformerEncoderLayer reads by weight, a module's own 2-D parameters) are named in one
    UserWarning, unless ``skip`` names them."""
    if not isinstance(model, nn.Module):
        raise LaunchError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):   # its submodules are compiled: none is an nn.Linear to replace,
        # so the float model came back without a word
        raise LaunchError(f"quantize: model is a TorchScript module ({type(model).__name__}: scripted or traced), "
                          "whose layers cannot be replaced; expected the torch.nn.Module itself (quantize it, then "
                          "trace the result, or compile it with torch.compile)")
    if not isinstance(mode, str) or mode not in MODES:
        raise LaunchError(f"quantize: mode={mode!r}; expected one of {tuple(MODES)}")
    if mode == "fp8-act" and calibration is None:
        raise LaunchError("quantize: mode='fp8-act' needs calibration=<an iterable of sample batches>")
    if mode != "fp8-act" and calibration is not None:
        raise LaunchError(f"quantize: calibration is for mode='fp8-act'; mode={mode!r} quantizes weights only")
    skip = _skip_names(skip)
    # every name of every Linear: one registered under two names (``self.b = self.a``) is one layer, and
    # named_modules() gives only its first name, so the second kept the float layer without a word
    aliases: dict[int, list[str]] = {}              # id(layer) -> its names, first as named_modules() gives them
    read = _read_by_owner(model)
    for n, m in model.named_modules(remove_duplicate=False):
        if _plain_linear(m) and id(m) not in read:
            aliases.setdefault(id(m), []).append(n)
    linears = [n for names in aliases.values() for n in names]
    floats = _left_in_float(model, aliases)
    quantized = [n or "the model" for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not linears and not floats and quantized:    # (said "norms and activations alone" of a model quantized twice)
        raise LaunchError(f"quantize: model ({type(model).__name__}) is already quantized: its layers "
                          f"{quantized[:8]}{' ...' if len(quantized) > 8 else ''} are QuantLinear and no nn.Linear is "
                          "left; expected a float model (quantize a copy of the float model for another mode)")
    if not linears and not floats:    # norms and activations alone: nothing to quantize, and the model came back
        # unchanged, in float, without a word (one with convolutions or embeddings is told so by the warning below)
        raise LaunchError(f"quantize: model ({type(model).__name__}) has no nn.Linear layer to quantize and no other "
                          "layer with weights (norms and activations alone); expected a model with nn.Linear layers "
                          "(tilestack.quantize replaces those only)")
    # a skip name may also acknowledge a layer quantize cannot take (a Conv2d), which silences its report below
    unmatched = [s for s in skip if not any(_named(n, s) for n in linears + [n for n, _ in floats])]
    if unmatched:     # a typo would quantize the layer meant to stay in float without a word; a generic name
        # (skip=("lm_head",) where the head is a tied embedding, not a Linear) is common, so a warning, not an error
        warnings.warn(f"quantize: skip names {unmatched} match no nn.Linear of the model (its Linear layers: "
                      f"{linears[:20]}{' ...' if len(linears) > 20 else ''})", UserWarning, stacklevel=2)
    # a layer is skipped under any of its names (it is one module: float everywhere, or quantized everywhere)
    kept = [names for names in aliases.values() if not any(_named(n, s) for n in names for s in skip)]
    names = [group[0] for group in kept]
    stats = calibrate(model, names, calibration) if mode == "fp8-act" else {}
    if stats and all(st.mean is None for st in stats.values()):   # only empty batches: no scale to fix
        raise LaunchError(f"quantize: calibration batches brought no row to any linear layer ({names[:8]}); "
                          "expected sample inputs with rows to fix the fp8 activation scales from")
    unseen = [n for n, st in stats.items() if st.mean is None]
    if unseen:    # a branch or an expert no batch reached got the scale of amax 0 (1.0) without a word: its inputs
        # then saturate at 448 or fall into E4M3's subnormals, whatever their range
        warnings.warn(f"quantize: calibration reached no row of layers {unseen[:8]}{' ...' if len(unseen) > 8 else ''}"
                      f"; their fp8 activation scale is {activation_scale(0.0)} (a guess, not calibrated): calibrate "
                      "with batches that reach them, or name them in skip= to keep them in float", UserWarning,
                      stacklevel=2)

    def replaced(name: str, linear: nn.Linear) -> QuantLinear:
        if name not in stats:
            return _with_forward_hooks(QuantLinear(linear, mode), linear)
        return _with_forward_hooks(QuantLinear(linear, mode, activation_scale(stats[name].amax), stats[name].mean),
                                   linear)

    if "" in names:      # the model is itself a Linear: no parent to change in place, its replacement is returned
        try:             # (refused, it said "quantize_weight: w ...", not which call or argument: a model's layers do)
            return replaced("", model)
        except LaunchError as e:
            raise LaunchError(f"quantize: model (an nn.Linear itself) cannot be quantized: {e}") from e
    # every replacement made before any is set: a layer refused (an f64 or NaN weight) left the layers before it
    # quantized in the caller's model, which then ran half quantized after the error
    made = []
    for group in kept:   # one QuantLinear per layer, set under each of its names
        try:
            made.append((group, replaced(group[0], model.get_submodule(group[0]))))
        except LaunchError as e:
            raise LaunchError(f"quantize: layer {group[0]!r} cannot be quantized (the model is left unchanged): "
                              f"{e}") from e
    for group, new in made:
        for name in group:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    # after the replacements (a refused layer raises, the model unchanged): the layers with weights that stay in
    # float were left without a word (a conv + linear net's convolutions, nn.MultiheadAttention's projections,
    # embeddings), outside the accuracy and memory the caller expects of a quantized model: named, once, unless
    # skip= names them
    floats = [f"{n or 'the model'} ({why})" for n, why in floats if not any(_named(n, s) for s in skip)]
    if floats:
        warnings.warn(f"quantize: {len(floats)} layer(s) with weights left in float (tilestack.quantize replaces "
                      f"nn.Linear layers only): {', '.join(floats)}; name them in skip= to keep them in float without "
                      "this warning", UserWarning, stacklevel=2)
    return model


# a module's forward hooks and pre-hooks, with the dicts that mark which take kwargs or always run
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _with_forward_hooks(new: QuantLinear, linear: nn.Linear) -> QuantLinear:
    """``new`` given ``linear``'s forward hooks and pre-hooks (the same dicts, so that the handles
    ``register_forward_hook`` returned still remove them). A hook on a layer (feature extraction, activation logging)
    stopped firing without a word once quantize replaced the layer."""
    for name in _FORWARD_HOOK_DICTS:
        setattr(new, name, getattr(linear, name))
    return new


def _skip_names(skip) -> tuple[str, ...]:
    """``quantize``'s ``skip`` as a tuple of names: one str, None (no name) or an iterable of str. A tensor is refused
    whatever it holds (a 0-d one failed inside torch, "iteration over a 0-d tensor", an empty one was taken as no
    name), and so is a 0-d NumPy array (numpy's "iteration over a 0-d array"); NumPy strings become plain str."""
    if isinstance(skip, str):
        return (skip,)
    if skip is None:
        return ()
    names = None
    if isinstance(skip, Iterable) and not isinstance(skip, torch.Tensor):
        try:
            names = tuple(skip)
        except TypeError:           # an iterable type that refuses to iterate (a 0-d NumPy array)
            names = None
    if names is None or not all(isinstance(s, str) for s in names):
        raise LaunchTypeError(f"quantize: skip must be layer names (a str or an iterable of str), got {skip!r:.80} "
                              f"({type(skip).__name__})")
    return tuple(str(s) for s in names)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear itself, or one whose weight is parametrized (``torch.nn.utils.parametrize``: weight_norm,
    spectral_norm, orthogonal make a class of their own over nn.Linear), quantized by its weight as computed now. (A
    parametrized one was left in float, reported by its ``parametrizations.weight`` list, a name its model never
    wrote.)"""
    return type(m) is nn.Linear or (parametrize.is_parametrized(m, "weight") and type(m).__bases__ == (nn.Linear,))


# torch modules whose forward reads these child Linears' weights itself (nn.TransformerEncoderLayer's fast-path
# check, and nn.TransformerEncoder's of its first layer, read linear1.weight and linear2.weight on every call)
_OWNERS_READING_WEIGHTS = {nn.TransformerEncoderLayer: ("linear1", "linear2")}


def _read_by_owner(model: nn.Module) -> dict[int, str]:
    """id -> owner's type name of each nn.Linear that its owning module reads by weight (``_OWNERS_READING_WEIGHTS``):
    a QuantLinear in its place broke the owner on its first call (no ``.weight``), so they stay float and are named."""
    read = {}
    for m in model.modules():
        for owner, children in _OWNERS_READING_WEIGHTS.items():
            if isinstance(m, owner):
                for child in children:
                    layer = getattr(m, child, None)
                    if isinstance(layer, nn.Linear):
                        read[id(layer)] = type(m).__name__
    return read


def _left_in_float(model: nn.Module, linears: dict[int, list[str]]) -> list[tuple[str, str]]:
    """(name, what it is) of each module other than the nn.Linear layers ``linears`` (by id) holding a parameter of
    its own with two or more dims (a weight matrix, a convolution's kernel, an embedding table): what quantize leaves
    in float. A module of the model's own code is named with those parameters (``pos_embed``); a subclass of
    nn.Linear is one: its owner may read its weight directly (nn.MultiheadAttention's out_proj, read inside
    F.multi_head_attention_forward), so a QuantLinear in its place would break the owner."""
    left = []
    inside = tuple(f"{n}." for names in linears.values() for n in names if n)   # a quantized layer's own submodules
    for name, m in model.named_modules():
        if name.startswith(inside):      # (a parametrized Linear's parametrizations: replaced with it)
            continue
        params = list(m.named_parameters(recurse=False))
        # a lazy module's parameters before its first batch have no shape to ask for (.dim() raises)
        lazy = any(isinstance(t, nn.parameter.UninitializedParameter) for _, t in params)
        own = [p for p, t in params if not isinstance(t, nn.parameter.UninitializedParameter) and t.dim() >= 2]
        if id(m) in linears or not (own or lazy):
            continue
        what = type(m).__name__
        if _plain_linear(m) and not lazy:             # (not in linears: read by its owner, _read_by_owner)
            what += ": its owner reads its weight in forward (nn.TransformerEncoderLayer's fast-path check)"
        elif lazy:
            what += ": not initialized (run a batch through the model before quantizing it)"
        elif isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
            # a LoRA or scaled layer: it was named as one its owner may read by weight, which says nothing of why
            what += (": a subclass of nn.Linear with a forward of its own (a LoRA or adapter layer), whose output "
                     "is more than x @ weight^T + bias: a QuantLinear in its place would drop the rest")
        elif isinstance(m, nn.Linear):
            what += ": a subclass of nn.Linear, which its owner may read by weight (nn.MultiheadAttention's out_proj)"
        elif not type(m).__module__.startswith("torch.nn"):
            what += f": {', '.join(own)}"
        left.append((name, what))
    return left


def _named(name: str, skip: str) -> bool:
    """Whether the module ``name`` is the one ``skip`` names: the whole name, or its last parts."""
    return name == skip or name.endswith("." + skip)
