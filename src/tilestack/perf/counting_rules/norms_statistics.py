"""FLOP rules of norms (batch norm forward; layer, batch, group and RMS norms' backwards; weight norm, renorm), vector
norms and statistics (variance, log-sum-exp; sparse COO softmax and sum).
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import (
    Rule,
    _accumulate_flops,
    _argument,
    _numel,
    _per_element,
    _tensors,
)


def _batch_norm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.native_batch_norm / aten._native_batch_norm_legit: with ``training`` the batch statistics too."""
    training = bool(_argument(func, args, kwargs, "training"))
    per_element = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT if training else formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT
    return float(per_element * _argument(func, args, kwargs, "input").numel())


def _norm_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """The backward of a layer, batch, group or RMS norm: per element of dy, the FLOPs of each gradient asked
    for in ``output_mask`` (input, weight, bias), as ``formulas.NORM_BWD_*`` break them down."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    mask = list(arg("output_mask")) + [False] * 3
    input_grad, weight_grad, bias_grad = (bool(m) for m in mask[:3])
    frozen = arg("train") is False  # an eval-mode batch norm: its statistics are constants
    per_element = (
        (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT if input_grad or weight_grad else 0)
        + (
            (formulas.NORM_BWD_FROZEN_INPUT_FLOPS_PER_ELEMENT if frozen else formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT)
            if input_grad
            else 0
        )
        + (formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT if weight_grad else 0)
        + (formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT if bias_grad else 0)
    )
    return float(per_element * _numel(arg("grad_out")))


def _vector_norm_flops(order: str, *, subtract: bool = False) -> Rule:
    """linalg_vector_norm, norm, dist: per element, a square or abs and an accumulate (and a power for an order
    other than 0, 1, 2 or inf); dist subtracts its two inputs first."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        p = _argument(func, args, kwargs, order)
        p = 2 if p is None else float(p)
        per_element = (formulas.NORM_FLOPS_PER_ELEMENT if p in formulas.NORM_CHEAP_ORDERS
                       else formulas.NORM_POWER_FLOPS_PER_ELEMENT) + subtract
        x = max(_tensors(args), key=_numel)
        # a complex element's square or modulus takes both parts (profiler round 20: counted as one real element)
        return float(per_element * _numel(x) * (formulas.COMPLEX_ELEMENT_OVER_REAL if x.is_complex() else 1))

    return count


NORM_STATISTICS_FLOPS: dict[str, Rule] = {
    "aten.native_batch_norm": _batch_norm_flops,
    "aten._native_batch_norm_legit": _batch_norm_flops,
    "aten.native_layer_norm_backward": _norm_backward_flops,
    "aten.native_batch_norm_backward": _norm_backward_flops,
    "aten.native_group_norm_backward": _norm_backward_flops,
    "aten._fused_rms_norm_backward": _norm_backward_flops,
    "aten.renorm": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten.renorm_": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten._weight_norm_interface": _per_element("v", formulas.WEIGHT_NORM_FLOPS_PER_ELEMENT),
    "aten._weight_norm_interface_backward": _per_element("saved_v", formulas.WEIGHT_NORM_BWD_FLOPS_PER_ELEMENT),
    # Statistics: per element folded in (formulas.VARIANCE_FLOPS_PER_ELEMENT and kin), not one add apiece.
    **{f"aten.{op}": _per_element("self", formulas.VARIANCE_FLOPS_PER_ELEMENT)
       for op in ("var", "std", "var_mean", "std_mean")},
    "aten.logsumexp": _per_element("self", formulas.LOGSUMEXP_FLOPS_PER_ELEMENT),
    "aten.linalg_vector_norm": _vector_norm_flops("ord"),
    "aten.norm": _vector_norm_flops("p"),
    "aten.dist": _vector_norm_flops("p", subtract=True),
    # Sparse COO softmax and sum: per stored element, as their dense twins per element.
    **{f"aten.{op}": _per_element("self", formulas.SOFTMAX_FLOPS_PER_ELEMENT)
       for op in ("_sparse_softmax", "_sparse_log_softmax")},
    **{f"aten.{op}": _per_element("output", formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT)
       for op in ("_sparse_softmax_backward_data", "_sparse_log_softmax_backward_data")},
    "aten._sparse_sum": _accumulate_flops("self"),
}
