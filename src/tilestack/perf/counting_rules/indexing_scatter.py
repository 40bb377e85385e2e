"""FLOP rules of ops that add (or reduce) values into indexed places: index_add, scatter_add / scatter_reduce /
index_reduce, accumulating index puts and scatters, segment reductions, bincount, sparse coalescing.
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import Rule, _accumulate_flops, _argument, _numel


def _index_put_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """index_put / index_put_: with ``accumulate`` one add per value put (an index backward, a histogram), per real
    part of a complex one; without, a copy."""
    accumulate = bool(_argument(func, args, kwargs, "accumulate"))
    values = _argument(func, args, kwargs, "values")
    if values is None:  # put / put_: the values are ``source``
        values = _argument(func, args, kwargs, "source")
    if not accumulate:
        return 0.0
    return float(_numel(values) * (formulas.COMPLEX_ELEMENT_OVER_REAL if values.is_complex() else 1))


def _scatter_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """scatter / scatter_: with ``reduce`` ("add", "multiply") one operation per index; without, a copy."""
    if _argument(func, args, kwargs, "reduce") is None:
        return 0.0
    return float(_numel(_argument(func, args, kwargs, "index")))


def _reduce_into_flops(source: str, counted_by: str) -> Rule:
    """scatter_add / scatter_reduce / index_reduce: one add (or multiply, compare) per element ``counted_by`` takes
    from ``source`` (a scatter's index: only the elements of ``src`` under it are used, its shape may be smaller;
    index_reduce's source: one slice per index), per real part of a complex one; reduce="mean" then divides every
    element of the result by its count (profiler round 21: a GNN's scatter over an index narrower than its messages
    was charged all of ``src``, and a mean aggregation was counted as a sum)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t, taken = _argument(func, args, kwargs, source), _argument(func, args, kwargs, counted_by)
        adds = _numel(taken) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1)
        mean = _argument(func, args, kwargs, "reduce") == "mean"
        return float(adds + (_numel(_argument(func, args, kwargs, "self")) if mean else 0))

    return count


def _segment_reduce_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_segment_reduce_backward: each element of ``data`` gets its segment's gradient, copied (sum: 0), divided by the
    segment's length (mean), kept where it equals the segment's extreme (max, min: a compare) or times the
    segment's product over the element (prod): ``formulas.SEGMENT_BWD_FLOPS_PER_ELEMENT``."""
    data, reduce = _argument(func, args, kwargs, "data"), str(_argument(func, args, kwargs, "reduce"))
    return float(formulas.SEGMENT_BWD_FLOPS_PER_ELEMENT.get(reduce, 1) * _numel(data))


INDEXING_SCATTER_FLOPS: dict[str, Rule] = {
    "aten.index_add": _accumulate_flops("source"),
    "aten.index_add_": _accumulate_flops("source"),
    "aten.scatter_add": _reduce_into_flops("src", "index"),
    "aten.scatter_add_": _reduce_into_flops("src", "index"),
    "aten.scatter_reduce": _reduce_into_flops("src", "index"),
    "aten.scatter_reduce_": _reduce_into_flops("src", "index"),
    "aten.index_reduce": _reduce_into_flops("source", "source"),
    "aten.index_reduce_": _reduce_into_flops("source", "source"),
    "aten.segment_reduce": _accumulate_flops("data"),
    "aten._segment_reduce_backward": _segment_reduce_backward_flops,
    "aten.put": _index_put_flops,
    "aten.put_": _index_put_flops,
    "aten.index_put": _index_put_flops,
    "aten.index_put_": _index_put_flops,
    "aten._index_put_impl": _index_put_flops,
    "aten._index_put_impl_": _index_put_flops,
    "aten.scatter": _scatter_flops,
    "aten.scatter_": _scatter_flops,
    "aten.bincount": _accumulate_flops("self"),
    "aten._coalesce": _accumulate_flops("self"),  # a sparse COO tensor's duplicate entries summed: an add per value
}
