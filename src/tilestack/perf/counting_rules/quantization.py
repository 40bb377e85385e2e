"""FLOP rules of quantization: statically quantized convolutions (packed weights), quantizing and dequantizing, fake
quantization (quantization-aware training's quantizers) and the fused observer.
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import (
    Rule,
    _argument,
    _elementwise_flops,
    _numel,
    _per_element,
    _tensors,
)


def _packed_conv_flops(*, fused_relu: bool) -> Rule:
    """quantized::conv{1,2,3}d(_relu), conv_transpose{1,2,3}d (static int8): the packed weight (a script object)
    unpacked for its shape and bias, groups and transposition read off it, counted by formulas.convolution; a fused
    ReLU adds one FLOP per output element, as a separate one would count. (Requantising the output is left out,
    as a float convolution's dtype is.)"""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        x = _argument(func, args, kwargs, "qx")
        packed = _argument(func, args, kwargs, "weight")
        if packed is None:
            packed = _argument(func, args, kwargs, "packed_weight")
        try:
            weight, bias = packed.unpack()
            groups, transposed = int(packed.groups()), bool(packed.transpose())
        except (AttributeError, RuntimeError):  # a packing this torch cannot open: the FLOPs are unknown
            return 0.0
        y = _tensors(out)[0]
        cost = formulas.convolution(x.shape, weight.shape, y.shape, groups=groups, transposed=transposed,
                                    bias=bias is not None)
        return float(cost.flops + (_numel(y) if fused_relu else 0))

    return count


def _fused_observer_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_fused_moving_avg_obs_fq_helper (QAT's FusedMovingAvgObsFakeQuantize): where ``observer_on`` holds, a min-max
    pass over the input (per tensor or per channel); where ``fake_quant_on`` holds, its fake quantization. (The
    moving averages and the scale and zero point, a few values per channel, are left out.)"""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    per_element = (formulas.OBSERVER_FLOPS_PER_ELEMENT if bool(arg("observer_on").any()) else 0) + (
        formulas.FAKE_QUANT_FLOPS_PER_ELEMENT if bool(arg("fake_quant_on").any()) else 0)
    return float(per_element * _numel(arg("self")))


QUANTIZATION_FLOPS: dict[str, Rule] = {
    # Statically quantized convolutions (packed weights), and quantizing / dequantizing: a scale and a round (or
    # a shift and a scale) per element, counted as one element-wise op.
    **{f"quantized.{op}{d}d{tail}": _packed_conv_flops(fused_relu=bool(tail))
       for op in ("conv", "conv_transpose") for d in (1, 2, 3) for tail in ("", "_relu") if op == "conv" or not tail},
    **{f"aten.{op}": _elementwise_flops for op in (
        "quantize_per_tensor", "quantize_per_tensor_dynamic", "quantize_per_channel", "dequantize",
    )},
    # Fake quantization (quantization-aware training): a quantize and a dequantize per element; the fused observer
    # a min-max pass too; a learnable quantizer's backward the gradients of the input, scale and zero point.
    **{f"aten.{op}": _per_element("self", formulas.FAKE_QUANT_FLOPS_PER_ELEMENT) for op in (
        "fake_quantize_per_tensor_affine", "fake_quantize_per_tensor_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", "fake_quantize_per_channel_affine",
        "fake_quantize_per_channel_affine_cachemask", "_fake_quantize_learnable_per_tensor_affine",
        "_fake_quantize_learnable_per_channel_affine",
    )},
    **{f"aten._fake_quantize_learnable_per_{kind}_affine_backward": _per_element(
        "self", formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT) for kind in ("tensor", "channel")},
    "aten._fused_moving_avg_obs_fq_helper": _fused_observer_flops,
}
