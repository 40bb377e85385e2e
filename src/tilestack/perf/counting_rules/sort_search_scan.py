"""FLOP rules of selections and sorts (as compares), uniques and set membership, binary searches, histograms and scans.
"""

from __future__ import annotations

import math
from typing import Any

from tilestack.perf.counting_rules.common import (
    Rule,
    _accumulate_flops,
    _argument,
    _numel,
    _sorted_compares,
)


def _sort_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """sort (argsort and msort run it): a comparison sort of n elements along ``dim`` makes n * ceil(log2 n)
    compares, as a max reduction's compares are counted."""
    x = _argument(func, args, kwargs, "self")
    if x.dim() == 0:
        return 0.0
    n = x.shape[int(_argument(func, args, kwargs, "dim")) % x.dim()]
    return float(_numel(x) * math.ceil(math.log2(n))) if n > 1 else 0.0


def _search_flops(sequence: str, values: str) -> Rule:
    """searchsorted / bucketize: a binary search of each value in its sorted sequence of n boundaries, ceil(log2(n +
    1)) compares, as a sort's compares are counted."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        boundaries, x = _argument(func, args, kwargs, sequence), _argument(func, args, kwargs, values)
        n = boundaries.shape[-1] if boundaries.dim() else 1
        return float((_numel(x) if hasattr(x, "dim") else 1) * math.ceil(math.log2(n + 1)))

    return count


def _unique_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """torch.unique: sorted (its default; a GPU always sorts) a comparison sort of the n elements, as sort is
    counted, and a compare of each with its neighbour to drop repeats; unsorted on the CPU (a hash set) one probe per
    element; unique_consecutive the neighbour compares alone; with ``dim``, as many compares of whole slices along
    it (profiler round 21: each was counted 0 FLOPs as a copy, though a unique of a million ids sorts a million)."""
    x, name = _argument(func, args, kwargs, "self"), str(func._overloadpacket)
    if name.startswith("aten.unique_dim"):  # slices along dim, each compare over a slice's elements
        dim = int(_argument(func, args, kwargs, "dim")) % max(x.dim(), 1)
        n, width = (x.shape[dim], _numel(x) // max(x.shape[dim], 1)) if x.dim() else (1, 1)
        compares = n if name == "aten.unique_dim_consecutive" else _sorted_compares(n) + n
        return float(compares * width)
    n = _numel(x)
    if name == "aten.unique_consecutive":
        return float(n)
    hashed = _argument(func, args, kwargs, "sorted") is False and _argument(func, args, kwargs, "self").is_cpu
    return float(n if hashed else _sorted_compares(n) + n)


def _isin_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """isin (each element's membership in test_elements; a scalar side counts as one element): torch picks by numpy's
    rule. Fewer than 10 * E^0.145 test elements: each of the E elements compared with each of the T (E * T). Else by
    sorting: both sides made unique (sorted) unless ``assume_unique``, the E + T concatenated and sorted, each
    neighbouring pair compared (n compares)."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    sides = (arg("elements") if arg("elements") is not None else arg("element"),
             arg("test_elements") if arg("test_elements") is not None else arg("test_element"))
    e, t = (_numel(v) if hasattr(v, "dim") else 1 for v in sides)
    if e == 0 or t < int(10.0 * e**0.145):
        return float(e * t)
    unique = 0 if arg("assume_unique") else _sorted_compares(e) + _sorted_compares(t)
    return float(unique + _sorted_compares(e + t) + e + t)


def _histogramdd_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """torch.histogramdd's steps over points (N, D): the bin edges (a min-max pass, one compare per element, as
    aminmax; none where ``range`` is given), each coordinate binned into counted bins (one per element, as histc)
    or searched for in its edge tensor (ceil(log2(edges + 1)) compares, as searchsorted)."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, name = arg("self"), str(func._overloadpacket)
    if name == "aten._histogramdd_bin_edges":
        return float(_numel(x)) if arg("range") is None else 0.0
    if name == "aten._histogramdd_from_bin_tensors":
        points = _numel(x) // max(x.shape[-1], 1) if x.dim() else 0
        return float(sum(points * math.ceil(math.log2(_numel(edges) + 1)) for edges in arg("bins")))
    return float(_numel(x))


SORT_SEARCH_SCAN_FLOPS: dict[str, Rule] = {
    "aten.histc": _accumulate_flops("self"),  # each element binned: a count added
    "aten.isin": _isin_flops,
    **{f"aten.{op}": _unique_flops for op in ("_unique", "_unique2", "unique_consecutive", "unique_dim",
                                              "unique_dim_consecutive")},
    # Selections: one compare per element (as a max reduction's); a sort n log2 n per row.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("topk", "kthvalue", "median", "nanmedian", "mode")},
    "aten.sort": _sort_flops,
    # Scans: one combine (add, multiply, compare, log-add-exp) per element.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    "aten.histogram": _accumulate_flops("self"),  # each element binned, as histc
    **{f"aten._histogramdd_{step}": _histogramdd_flops for step in ("bin_edges", "from_bin_cts", "from_bin_tensors")},
    "aten.searchsorted": _search_flops("sorted_sequence", "self"),
    "aten.bucketize": _search_flops("boundaries", "self"),
}
