"""FLOP rules of embedding lookups' backward, EmbeddingBag forward and backward (padding entries skipped, by mode) and
``embedding_renorm_`` (nn.Embedding's max_norm).
"""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import Rule, _argument


def bag_entries(func: Any, args: tuple, kwargs: dict) -> int:
    """Indices an EmbeddingBag op (or an embedding's backward) looks up: those that are not its ``padding_idx`` (the
    kernels skip those entries: a row padded to a fixed length with the padding index adds nothing for them)."""
    indices, padding = _argument(func, args, kwargs, "indices"), _argument(func, args, kwargs, "padding_idx")
    if padding is None or padding < 0 or indices.device.type == "meta":  # -1: none; meta: no values to compare
        return indices.numel()
    return int((indices != padding).sum())


def _embedding_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """embedding_dense_backward: each looked-up token's gradient row added into its row of the table, but for the
    tokens at ``padding_idx`` (nn.Embedding(padding_idx=...): a padded batch's pad tokens add nothing). With
    ``scale_grad_by_freq`` each index is first counted (one add per token), each added row scaled by one over its
    id's count (a divide per row, then a multiply-add per element, not an add; profiler round 27: counted as the
    plain backward)."""
    entries = bag_entries(func, args, kwargs)
    width = _argument(func, args, kwargs, "grad_output").shape[-1]
    if not _argument(func, args, kwargs, "scale_grad_by_freq"):
        return float(entries * width)
    tokens = _argument(func, args, kwargs, "indices").numel()
    return float(tokens + entries + formulas.FLOPS_PER_MAC * entries * width)


def _embedding_bag_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._embedding_bag: each looked-up row (entries x dim, padding entries skipped) is added (or compared, mode
    max) into its bag, after a multiply by its per-sample weight where one is given; in mode mean each non-empty
    bag's sum is then divided by its size, a divide per column (profiler round 18: a recommender's
    EmbeddingBag(mode='mean') was counted as mode sum, though its backward counted the 1/size scaling)."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    per_row = 1 + (arg("per_sample_weights") is not None)
    mean = 0
    if arg("mode") == EMBEDDING_BAG_MEAN:
        output, bag_size = out[0], out[2]  # (output, offset2bag, bag_size, max_indices); bag_size of real entries
        bags = output.shape[0] if bag_size.device.type == "meta" else int((bag_size != 0).sum())
        mean = bags * output.shape[-1]
    return float(per_row * bag_entries(func, args, kwargs) * arg("weight").shape[-1] + mean)


EMBEDDING_BAG_MEAN, EMBEDDING_BAG_MAX = 1, 2  # the ``mode`` argument of aten._embedding_bag: 0 sum, 1 mean, 2 max


def _embedding_bag_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """The backward of an EmbeddingBag: each bag's gradient row added into the row of each of its entries (padding
    entries skipped; in mode max only into the entry that held the maximum, one per non-empty bag and column), after
    a multiply by the per-sample weight or by 1/bag size (mode mean). With ``scale_grad_by_freq`` each id is first
    counted (an add per index) and each entry's scale divided by its id's count (a divide per entry), the row then
    added scaled. The per-sample weights' own gradient is a dot product of the bag's gradient row with each looked-up
    row: a multiply-add per element."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    grad = arg("grad")
    if arg("mode") == EMBEDDING_BAG_MAX and "weights_backward" not in str(func._overloadpacket):
        # Mode max: each bag's gradient goes to the one entry that held its maximum, per column (an index_add of
        # max_indices), so a non-empty bag adds one row, however many entries it has (round 12: bags of 50 entries
        # were counted 50 adds per column).
        bag_size = arg("bag_size")
        bags = grad.shape[0] if bag_size is None or bag_size.device.type == "meta" else int((bag_size != 0).sum())
        return float(bags * grad.shape[-1])
    by_frequency = bool(arg("scale_grad_by_freq"))  # each id counted, each entry's scale divided by its count
    scaled = "weights_backward" in str(func._overloadpacket) or arg("per_sample_weights") is not None or (
        arg("mode") == EMBEDDING_BAG_MEAN
    ) or by_frequency
    entries = bag_entries(func, args, kwargs)
    frequencies = arg("indices").numel() + entries if by_frequency else 0  # profiler round 27: left out
    return float((1 + scaled) * entries * grad.shape[-1] + frequencies)


def distinct_rows(indices: Any) -> int:
    """Rows of a table ``embedding_renorm_`` visits: each distinct index once (its kernel sorts the indices and skips
    repeats), not once per token: a batch that looks up one common token 1000 times renorms its row once."""
    if indices.device.type == "meta":  # no values to compare: every index taken as distinct (an upper bound)
        return indices.numel()
    return int(indices.unique().numel())


def _embedding_renorm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """embedding_renorm_ (nn.Embedding's max_norm): each distinct looked-up row's norm, and its rescale (an upper
    bound: only rows whose norm is above max_norm are rescaled)."""
    table, indices = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "indices")
    return float(formulas.RENORM_FLOPS_PER_ELEMENT * distinct_rows(indices) * (table.shape[-1] if table.dim() else 1))


EMBEDDING_FLOPS: dict[str, Rule] = {
    "aten.embedding_dense_backward": _embedding_backward_flops,
    "aten._embedding_bag": _embedding_bag_flops,
    "aten._embedding_bag_forward_only": _embedding_bag_flops,
    "aten._embedding_bag_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_dense_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_per_sample_weights_backward": _embedding_bag_backward_flops,
    "aten.embedding_renorm_": _embedding_renorm_flops,
}
