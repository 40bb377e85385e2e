"""The FLOP rules of the counting pass (``tilestack.perf.counting``) for what a training step does after its backward:
fused optimizer steps (``torch.optim.AdamW(fused=True)``: aten._fused_adamw_ and its kin, counted as their foreach
path), a grad scaler's unscale and scale update, and a sparse gradient added into a dense parameter (an embedding
trained with ``sparse=True``: SGD's and SparseAdam's updates touch only the looked-up rows). The table
``OPTIMIZER_FLOPS`` names the ATen ops counted here; conventions are ``formulas``'.
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules import Rule, _argument, _dense, _numel, _tensors


def _fused_optimizer_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """A fused optimizer step (``torch.optim.AdamW(fused=True)``: aten._fused_adam_, _fused_adamw_, _fused_sgd_,
    _fused_adagrad_) over its list of parameters: the FLOPs per element its foreach path takes
    (``formulas.ADAM_FLOPS_PER_ELEMENT`` and the rest, with its options), plus the gradients' unscale where a grad
    scaler's scale is given."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    kind = str(func._overloadpacket).removeprefix("aten._fused_").rstrip("_")
    decay = 1 if arg("weight_decay") else 0
    maximize = 1 if arg("maximize") else 0
    if kind in ("adam", "adamw"):
        per_element = formulas.ADAM_FLOPS_PER_ELEMENT + decay + (1 if arg("amsgrad") else 0) + maximize
    elif kind == "sgd":
        momentum = 0 if not arg("momentum") or arg("is_first_step") else 2
        per_element = formulas.SGD_FLOPS_PER_ELEMENT + momentum + (1 if arg("nesterov") else 0) + decay + maximize
    else:  # adagrad
        per_element = formulas.ADAGRAD_FLOPS_PER_ELEMENT + decay + maximize
    per_element += 1 if arg("grad_scale") is not None else 0
    return float(per_element * sum(_numel(t) for t in _tensors(arg("self"))))


def _amp_unscale_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """A grad scaler's unscale of a list of gradients: ``formulas.AMP_UNSCALE_FLOPS_PER_ELEMENT`` per element."""
    grads = _tensors(_argument(func, args, kwargs, "self"))
    return float(formulas.AMP_UNSCALE_FLOPS_PER_ELEMENT * sum(_numel(t) for t in grads))


def sparse_into_dense(func: Any, args: tuple, kwargs: dict) -> tuple[float, float | None, float | None] | None:
    """A pointwise op of a dense tensor and a sparse COO one with a dense result (``param.add_(sparse_grad)``, an
    optimizer's update of an embedding by its looked-up rows; ``dense + sparse``): (FLOPs, bytes read, bytes
    written). One FLOP per stored value of the sparse operand, not one per element of the dense result; in place,
    only the elements those values touch are read and written (with the sparse operand's indices and values), else
    (bytes None) the dense result is written whole as usual. None for any other op."""
    import torch

    dense, sparse = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "other")
    if not (isinstance(dense, torch.Tensor) and isinstance(sparse, torch.Tensor) and _dense(dense)
            and sparse.is_sparse and dense.shape == sparse.shape):
        return None
    flops = float(_numel(sparse))
    if not str(func._overloadpacket).endswith("_"):
        return flops, None, None
    touched = flops * dense.element_size()
    held = sum(t.numel() * t.element_size() for t in (sparse._indices(), sparse._values()))
    return flops, held + touched, touched


OPTIMIZER_FLOPS: dict[str, Rule] = {
    **{f"aten._fused_{opt}_": _fused_optimizer_flops for opt in ("adam", "adamw", "sgd", "adagrad")},
    "aten._amp_foreach_non_finite_check_and_unscale_": _amp_unscale_flops,
    "aten._amp_update_scale_": lambda func, args, kwargs, out: float(formulas.AMP_UPDATE_SCALE_FLOPS),
}
