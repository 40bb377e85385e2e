"""FLOP rules of losses: regression (MSE, smooth L1, Huber), binary and plain cross-entropy (NLL, ignored targets
skipped), margin losses and CTC.
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import Rule, _argument, _numel, _per_element, _tensors


def nll_targets(func: Any, args: tuple, kwargs: dict) -> int:
    """Targets an NLL op (forward or backward) picks a log-probability for: those that are not its ``ignore_index``
    (the kernels skip those: a padded batch's pad tokens add nothing to the loss, nor get a gradient; profiler round
    21: a language model's loss over a batch of mostly padding was charged every pad token)."""
    target, ignore = _argument(func, args, kwargs, "target"), _argument(func, args, kwargs, "ignore_index")
    if ignore is None or target.device.type == "meta":  # meta: no values to compare
        return target.numel()
    return int((target != ignore).sum())


def _nll_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """NLL forward and backward: one per target that is not ignored (``nll_targets``)."""
    return float(formulas.NLL_FLOPS_PER_TARGET * nll_targets(func, args, kwargs))


def _weighted_bce_flops(per_element: int) -> Rule:
    """binary_cross_entropy and its backward: ``per_element`` for each element of the probabilities, and a multiply
    more for a ``weight`` (profiler round 27: a weighted BCE was counted as an unweighted one)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        weighted = _argument(func, args, kwargs, "weight") is not None
        return float((per_element + weighted) * _numel(_argument(func, args, kwargs, "self")))

    return count


def _bce_logits_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """binary_cross_entropy_with_logits: its formula per element of the logits; a ``pos_weight`` (C,) first made
    p - 1 (a subtract per class), then each element's log-sigmoid scaled by 1 + (p - 1) y (a multiply, an add and a
    multiply); a ``weight`` a multiply per element (profiler round 27: both were left out, a multi-label loss with
    positive weights counted as a plain one)."""
    x = _argument(func, args, kwargs, "self")
    pos_weight, weight = _argument(func, args, kwargs, "pos_weight"), _argument(func, args, kwargs, "weight")
    per_element = (formulas.BCE_LOGITS_FLOPS_PER_ELEMENT
                   + (formulas.BCE_LOGITS_POS_WEIGHT_FLOPS_PER_ELEMENT if pos_weight is not None else 0)
                   + (weight is not None))
    return float(per_element * _numel(x) + (_numel(pos_weight) if pos_weight is not None else 0))


def _multi_margin_flops(per_term: int) -> Rule:
    """multi_margin_loss and its backward: a hinge per element of x (N, C); a square per term for p=2, a multiply
    for a class weight."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        extra = (_argument(func, args, kwargs, "p") == 2) + (_argument(func, args, kwargs, "weight") is not None)
        return float((per_term + extra) * _numel(_argument(func, args, kwargs, "self")))

    return count


def _multilabel_margin_flops(per_term: int) -> Rule:
    """multilabel_margin_loss: a hinge for each pair of a target class and a non-target class of each row (the
    row's targets are ``is_target``'s ones: k (C - k) pairs for k targets)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        is_target = _argument(func, args, kwargs, "is_target")
        if is_target is None:  # the forward returns it, after the loss
            is_target = _tensors(out)[1]
        if _numel(is_target) == 0:
            return 0.0
        k = is_target.reshape(-1, is_target.shape[-1]).sum(-1)  # targets per row
        return float(per_term * (k * (is_target.shape[-1] - k)).sum())

    return count


def _ctc_flops(*, backward: bool) -> Rule:
    """_ctc_loss: the alpha recursion over each sample's T_b time steps and 2 S_b + 1 states of its blank-extended
    target; the backward the beta recursion and the gradient of each log-probability (``formulas.CTC_*``)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        steps, lengths = (v.tolist() if hasattr(v, "tolist") else list(v) for v in (arg("input_lengths"),
                                                                                  arg("target_lengths")))
        states = sum(int(t) * (2 * int(s) + 1) for t, s in zip(steps, lengths, strict=True))
        if not backward:
            return float(formulas.CTC_FLOPS_PER_STATE * states)
        return float(formulas.CTC_BWD_FLOPS_PER_STATE * states
                     + formulas.CTC_BWD_FLOPS_PER_LOG_PROB * _numel(arg("log_probs")))

    return count


def _cudnn_ctc_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_cudnn_ctc_loss (F.ctc_loss on a GPU where cuDNN takes it): the loss and its gradient in one call, the alpha and
    beta recursions and each log-probability's gradient, as _ctc_loss and _ctc_loss_backward together (profiler
    round 24: reported uncounted)."""
    return _ctc_flops(backward=False)(func, args, kwargs, out) + _ctc_flops(backward=True)(func, args, kwargs, out)


LOSS_FLOPS: dict[str, Rule] = {
    "aten.mse_loss": _per_element("self", formulas.MSE_FLOPS_PER_ELEMENT),
    "aten.mse_loss_backward": _per_element("self", formulas.MSE_BWD_FLOPS_PER_ELEMENT),
    **{f"aten.{loss}": _per_element("self", formulas.SMOOTH_L1_FLOPS_PER_ELEMENT)
       for loss in ("smooth_l1_loss", "huber_loss")},
    **{f"aten.{loss}_backward": _per_element("self", formulas.SMOOTH_L1_BWD_FLOPS_PER_ELEMENT)
       for loss in ("smooth_l1_loss", "huber_loss")},
    "aten.binary_cross_entropy": _weighted_bce_flops(formulas.BCE_FLOPS_PER_ELEMENT),
    "aten.binary_cross_entropy_backward": _weighted_bce_flops(formulas.BCE_BWD_FLOPS_PER_ELEMENT),
    "aten.binary_cross_entropy_with_logits": _bce_logits_flops,
    **{f"aten.{nll}": _nll_flops for nll in (
        "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward",
    )},
    # Losses with a formula per element, per margin term or per CTC state.
    "aten.soft_margin_loss": _per_element("self", formulas.SOFT_MARGIN_FLOPS_PER_ELEMENT),
    "aten.soft_margin_loss_backward": _per_element("self", formulas.SOFT_MARGIN_BWD_FLOPS_PER_ELEMENT),
    "aten.multi_margin_loss": _multi_margin_flops(formulas.MARGIN_FLOPS_PER_TERM),
    "aten.multi_margin_loss_backward": _multi_margin_flops(formulas.MARGIN_BWD_FLOPS_PER_TERM),
    "aten.multilabel_margin_loss_forward": _multilabel_margin_flops(formulas.MARGIN_FLOPS_PER_TERM),
    "aten.multilabel_margin_loss_backward": _multilabel_margin_flops(formulas.MARGIN_BWD_FLOPS_PER_TERM),
    "aten._ctc_loss": _ctc_flops(backward=False),
    "aten._ctc_loss_backward": _ctc_flops(backward=True),
    "aten._cudnn_ctc_loss": _cudnn_ctc_flops,
}
