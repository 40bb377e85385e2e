"""What every rule family of ``counting_rules`` shares: the rule signature, reading an op's arguments by schema name,
its tensors and element counts, and the generic rules (per element of an argument, one add per element, one FLOP per
output element).

    t = _argument(func, args, kwargs, "input")   # an argument by its schema name, or its default
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from tilestack.perf import formulas

Rule = Callable[[Any, tuple, dict, Any], float]  # (func, args, kwargs, out) -> FLOPs of one call


def _tensors(obj: Any) -> list[Any]:
    """The tensors in ``obj`` (nested lists, tuples, dicts, dataclasses), in order: an op's outputs as it returns
    them (``max_pool2d_with_indices``' values before its indices)."""
    import torch

    out: list[Any] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(reversed(x))
        elif isinstance(x, Mapping):
            stack.extend(reversed(list(x.values())))
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # a model's output record
            stack.extend(reversed([getattr(x, f.name) for f in dataclasses.fields(x)]))
    return out


def _dense(t: Any) -> bool:
    """A plain strided tensor (not sparse, not nested): its shape and strides say what it holds."""
    import torch

    return t.layout == torch.strided and not t.is_nested


def _numel(t: Any) -> int:
    """Elements of ``t`` as its ops compute over them (a nested or sparse tensor's stored values)."""
    if _dense(t):
        return t.numel()
    try:
        return t.values().numel() if not t.is_sparse else t._values().numel()
    except (RuntimeError, NotImplementedError):
        return 0


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else a.default_value)
    return None


def _tags(func: Any) -> tuple:
    """An op's tags; a prim's (``prims.add``, which forward-mode AD and decompositions run) those of its ATen twin
    (``aten.add``: pointwise), prims being untagged."""
    import torch

    tags = tuple(getattr(func, "tags", ()))
    ns, _, name = str(func._overloadpacket).partition(".")
    if ns == "prims":
        twin = getattr(torch.ops.aten, name, None)
        for overload in twin.overloads() if twin is not None else ():  # aten.add has no default: Tensor, Scalar
            tags += tuple(getattr(getattr(twin, overload), "tags", ()))
    return tags


def _accumulate_flops(source: str) -> Rule:
    """index_add / scatter_add / embedding's weight gradient / the scans: one add per element of ``source``; per real
    part of a complex one (a complex product for cumprod), as a complex add or multiply is counted element-wise
    (profiler round 20: a complex cumsum or index_add was counted half that)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t = _argument(func, args, kwargs, source)
        if t is None:
            return 0.0
        per_complex = (formulas.COMPLEX_MUL_FLOPS if str(func._overloadpacket).startswith("aten.cumprod")
                       else formulas.COMPLEX_ELEMENT_OVER_REAL)
        return float(_numel(t) * (per_complex if t.is_complex() else 1))

    return count


def _per_element(name: str, flops_per_element: float) -> Rule:
    """``flops_per_element`` for each element of argument ``name`` (a loss's input, whatever its reduction), each part
    of a complex one (profiler round 20: a complex variance was counted as a real one of as many elements)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t = _argument(func, args, kwargs, name)
        if t is None:
            return 0.0
        return float(flops_per_element * _numel(t) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1))

    return count


def _elementwise_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """An element-wise op torch does not tag pointwise (hardswish, an activation's backward, GLU, PReLU):
    1 FLOP per element of its first output, as a tagged one is counted. Not of every output: a second output
    (log_sigmoid's buffer) holds intermediate values, not more results."""
    outs = _tensors(out)
    return float(_numel(outs[0])) if outs else 0.0


def _sorted_compares(n: int) -> int:
    """Compares of a comparison sort of ``n`` elements, n * ceil(log2 n), as ``_sort_flops`` counts a row."""
    return n * math.ceil(math.log2(n)) if n > 1 else 0
