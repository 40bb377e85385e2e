"""The FLOP rules of the counting pass (``tilestack.perf.counting``) for neural-network layers: one module per op
family, each with its table of the ATen ops it counts, joined here into ``LAYER_FLOPS``.

    rule = LAYER_FLOPS["aten.convolution"]
    rule(func, args, kwargs, out)          # FLOPs of one call, from its arguments and result

Families: ``conv_rnn`` (convolutions with their groups, forward and backward, the CPU LSTM kernel), ``norms_statistics``
(batch norm; layer, batch, group and RMS norms' backwards; weight norm, vector norms, variance, log-sum-exp, sparse
softmax), ``pooling_resampling`` (pools: windowed, adaptive with their overlapping windows, fractional;
interpolation and grid sampling, fold), ``embedding`` (embeddings and bags), ``indexing_scatter`` (scatters and
accumulating index puts), ``sort_search_scan`` (selections and sorts as compares, uniques, searches, histograms,
scans), ``losses`` (regression, cross-entropy, margin, CTC), ``quantization`` (statically quantized convolutions, fake
quantization: quantization-aware training's observers and quantizers) and ``elementwise`` (the element-wise ops torch
leaves untagged, foreach ops: ``foreach_flops``, matched by prefix); ``common`` holds what they share. Matmul-like and
linear-algebra ops are ``counting_linalg``'s. Conventions are ``formulas``': a multiply-add is 2 FLOPs, a
transcendental 1.
"""

from __future__ import annotations

from tilestack.perf.counting_rules.common import (
    Rule,
    _accumulate_flops,
    _argument,
    _dense,
    _elementwise_flops,
    _numel,
    _per_element,
    _sorted_compares,
    _tags,
    _tensors,
)
from tilestack.perf.counting_rules.conv_rnn import CONV_RNN_FLOPS
from tilestack.perf.counting_rules.elementwise import (
    ELEMENTWISE_FLOPS,
    FOREACH_NO_ARITHMETIC,
    FOREACH_PREFIX,
    foreach_flops,
)
from tilestack.perf.counting_rules.embedding import (
    EMBEDDING_BAG_MAX,
    EMBEDDING_BAG_MEAN,
    EMBEDDING_FLOPS,
    bag_entries,
    distinct_rows,
)
from tilestack.perf.counting_rules.indexing_scatter import INDEXING_SCATTER_FLOPS
from tilestack.perf.counting_rules.losses import LOSS_FLOPS, nll_targets
from tilestack.perf.counting_rules.norms_statistics import NORM_STATISTICS_FLOPS
from tilestack.perf.counting_rules.pooling_resampling import POOLING_RESAMPLING_FLOPS
from tilestack.perf.counting_rules.quantization import QUANTIZATION_FLOPS
from tilestack.perf.counting_rules.sort_search_scan import SORT_SEARCH_SCAN_FLOPS

FAMILY_TABLES: tuple[dict[str, Rule], ...] = (
    CONV_RNN_FLOPS,
    NORM_STATISTICS_FLOPS,
    EMBEDDING_FLOPS,
    INDEXING_SCATTER_FLOPS,
    SORT_SEARCH_SCAN_FLOPS,
    POOLING_RESAMPLING_FLOPS,
    LOSS_FLOPS,
    QUANTIZATION_FLOPS,
    ELEMENTWISE_FLOPS,
)


def _join(tables: tuple[dict[str, Rule], ...]) -> dict[str, Rule]:
    """The families' tables as one; an op is declared in one family only (a second rule would silently win)."""
    joined: dict[str, Rule] = {}
    for table in tables:
        twice = joined.keys() & table.keys()
        if twice:
            raise AssertionError(f"counting_rules: ops declared in two families: {sorted(twice)}")
        joined.update(table)
    return joined


# Ops counted here, ahead of torch's registry (whose convolution backward ignores groups) or where torch counts
# nothing.
LAYER_FLOPS: dict[str, Rule] = _join(FAMILY_TABLES)

__all__ = [
    "EMBEDDING_BAG_MAX",
    "EMBEDDING_BAG_MEAN",
    "FAMILY_TABLES",
    "FOREACH_NO_ARITHMETIC",
    "FOREACH_PREFIX",
    "LAYER_FLOPS",
    "Rule",
    "_accumulate_flops",
    "_argument",
    "_dense",
    "_elementwise_flops",
    "_numel",
    "_per_element",
    "_sorted_compares",
    "_tags",
    "_tensors",
    "bag_entries",
    "distinct_rows",
    "foreach_flops",
    "nll_targets",
]
