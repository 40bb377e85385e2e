"""FLOP rules of element-wise work torch leaves untagged (activations' backwards, GLU, PReLU, window functions,
FFT sample frequencies, logspace, rounding to decimals, cross products), allclose and all / any, and foreach ops
(``foreach_flops``, matched by prefix).
"""

from __future__ import annotations

import math
from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import (
    Rule,
    _accumulate_flops,
    _argument,
    _elementwise_flops,
    _numel,
    _per_element,
    _tensors,
)


def _allclose_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """allclose(a, b): isclose over the broadcast of a and b, and the all() of its answers; a kernel below the
    dispatch mode, so its isclose never reached the counting pass as the ops it runs (profiler round 16: a solver
    stopping on allclose showed the op uncounted)."""
    import torch

    a, b = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "other")
    elements = math.prod(torch.broadcast_shapes(a.shape, b.shape))
    return float(formulas.ALLCLOSE_FLOPS_PER_ELEMENT * elements)


def _round_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """torch.round: one per element; to ``decimals`` places a scale, the round and the unscale (profiler round 21:
    quantization-style rounding to 2 places was counted as a plain round)."""
    decimals = _argument(func, args, kwargs, "decimals")
    per_element = formulas.ROUND_DECIMALS_FLOPS_PER_ELEMENT if decimals else 1
    return float(per_element * _numel(_tensors(out)[0]))


def _fused_dropout_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """native_dropout / _fused_dropout (F.dropout in training on a GPU: the mask drawn and applied in one kernel) and
    _masked_scale: x * mask * 1/(1 - p), ``formulas.DROPOUT_FLOPS_PER_ELEMENT`` an element, as the unfused path's
    bernoulli_, div_ and mul count on a CPU; native_dropout with ``train`` False copies (profiler round 24: the fused
    ops, tagged as random draws, were counted 0 FLOPs with no word said)."""
    if str(func._overloadpacket) == "aten.native_dropout" and _argument(func, args, kwargs, "train") is False:
        return 0.0
    x = _argument(func, args, kwargs, "input" if str(func._overloadpacket) == "aten.native_dropout" else "self")
    return float(formulas.DROPOUT_FLOPS_PER_ELEMENT * _numel(x))


FOREACH_PREFIX = "aten._foreach_"


FOREACH_NO_ARITHMETIC = ("copy", "zero")  # names after the prefix, without a trailing ``_``


def foreach_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """A foreach op (``_foreach_add_``, ``_foreach_norm``: an optimizer's or a meta-learner's update over a list of
    tensors): its single-tensor twin over each tensor of ``self``, 1 FLOP per element (2 per complex one) as a
    pointwise op is counted; a norm a vector norm's FLOPs per element; a copy or zero none."""
    base = str(func._overloadpacket).removeprefix(FOREACH_PREFIX).rstrip("_")
    if base in FOREACH_NO_ARITHMETIC:
        return 0.0
    tensors = _tensors(_argument(func, args, kwargs, "self")) or _tensors(out)  # pow's self may be a scalar
    if base == "norm":
        p = _argument(func, args, kwargs, "ord")
        per_element = (formulas.NORM_FLOPS_PER_ELEMENT if (2 if p is None else float(p)) in formulas.NORM_CHEAP_ORDERS
                       else formulas.NORM_POWER_FLOPS_PER_ELEMENT)
        return float(per_element * sum(_numel(t) for t in tensors))
    return float(sum(_numel(t) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1) for t in tensors))


ELEMENTWISE_FLOPS: dict[str, Rule] = {
    "aten.linalg_cross": _per_element("self", formulas.CROSS_FLOPS_PER_ELEMENT),
    "aten.round": _round_flops,
    "aten.round_": _round_flops,
    # Element-wise ops torch leaves untagged: 1 FLOP per output element, as the tagged ones.
    **{f"aten.{op}": _elementwise_flops for op in (
        "hardswish", "hardswish_", "hardswish_backward", "hardsigmoid_backward", "hardtanh_backward",
        "leaky_relu_backward", "elu_backward", "softplus_backward", "softshrink_backward", "hardshrink_backward",
        "log_sigmoid_forward", "log_sigmoid_backward", "rrelu_with_noise_backward", "_prelu_kernel",
        "_prelu_kernel_backward", "glu", "glu_backward", "floor_divide", "floor_divide_", "rrelu_with_noise",
        "rrelu_with_noise_", "_standard_gamma_grad", "_dirichlet_grad",  # rsample's reparameterised gradients
    )},
    "aten.allclose": _allclose_flops,
    **{f"aten.{op}": _fused_dropout_flops for op in ("native_dropout", "_fused_dropout", "_masked_scale")},
    # All / any of a tensor (torch.distributions' argument checks): one compare per element, as a reduction.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("_is_all_true", "_is_any_true")},
    # Window functions: a cosine (and its scaling) per element, as an element-wise op.
    **{f"aten.{w}_window": _elementwise_flops for w in ("hann", "hamming", "blackman", "bartlett", "kaiser")},
    # base ** (start + i * step): a power per element, as an element-wise op (profiler round 20: uncounted; linspace
    # and arange, which take no power, stay copies)
    "aten.logspace": _elementwise_flops,
    # the sample frequencies of an FFT, i / (n d): a scale per element (profiler round 23: reported uncounted, a
    # spectral model's only uncounted row)
    **{f"aten.fft_{op}": _elementwise_flops for op in ("fftfreq", "rfftfreq")},
}
