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

# A norm's per-element count includes its affine: a multiply by ``weight`` and an add of ``bias``
# (formulas.NORM_AFFINE_FLOPS_PER_ELEMENT each). One given None (nn.LayerNorm(elementwise_affine=False), F.layer_norm(x,
# shape), BatchNorm(affine=False), F.instance_norm's default, a bias-free LayerNorm) does not apply it (profiler
# round 24: such a norm was counted its affine's 2 FLOPs an element, a quarter more than it does; its backward already
# left the weight and bias gradients out).
NORM_AFFINE_ARGS: dict[str, tuple[str, ...]] = {
    **{f"aten.{op}": ("weight", "bias") for op in (
        "native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm")},
    "aten._fused_rms_norm": ("weight",),
}


def affine_left_out(func: Any, args: tuple, kwargs: dict) -> float:
    """The FLOPs per element of the affine parts a norm call does not apply (its weight or bias is None)."""
    names = NORM_AFFINE_ARGS.get(str(func._overloadpacket), ())
    return float(sum(_argument(func, args, kwargs, name) is None for name in names)
                 * formulas.NORM_AFFINE_FLOPS_PER_ELEMENT)


def _batch_norm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.native_batch_norm / aten._native_batch_norm_legit: with ``training`` the batch statistics too; the affine
    only where it has a weight and bias."""
    training = bool(_argument(func, args, kwargs, "training"))
    per_element = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT if training else formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT
    return float((per_element - affine_left_out(func, args, kwargs)) * _argument(func, args, kwargs, "input").numel())


def _gpu_batch_norm_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """cudnn_batch_norm_backward / miopen_batch_norm_backward (a GPU batch norm trained: autograd calls them only for
    batch statistics): the input, weight and bias gradients, which they always form, per element of dy as
    native_batch_norm_backward's with all three asked for (profiler round 24: both were reported uncounted, as were
    their forwards, so a GPU profile of any BatchNorm net had those rows without FLOPs)."""
    per_element = (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT
                   + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT)
    return float(per_element * _numel(_argument(func, args, kwargs, "grad_output")))


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
    "aten.cudnn_batch_norm": _batch_norm_flops,  # what batch norm runs on an NVIDIA GPU (AMD: miopen)
    "aten.miopen_batch_norm": _batch_norm_flops,
    "aten.cudnn_batch_norm_backward": _gpu_batch_norm_backward_flops,
    "aten.miopen_batch_norm_backward": _gpu_batch_norm_backward_flops,
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
