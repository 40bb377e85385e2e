"""Bytes of one ATen call for the counting pass (``counting.count_ops``): what it reads and writes of global memory.

    read, written = counting_bytes.op_bytes(func, args, kwargs, out, ins, outs)

A tensor counts the bytes it holds: its distinct elements (an expanded dimension holds one; overlapping windows the
span of memory they cover), a sparse one its indices and values, and two views of one memory count once. An op reads
its distinct inputs and writes its outputs, except where it moves less:
- an overwrite (``fill_``, ``copy_``, a random draw in place) and a new tensor like another (``new_zeros``,
  ``randn_like``) do not read their destination or model;
- a backward handed the forward's input for its shape alone (``SHAPE_ONLY_SELF``) does not read it;
- a lookup (``GATHERS``: embedding, index_select, gather, NLL's pick) reads its index and the rows it takes;
- an advanced index (``INDEXING``) and a view's copy read the elements they return, a grid sampler (``SAMPLERS``)
  its taps' elements;
- an in-place scatter (``SCATTERS_IN_PLACE``) writes, and where it accumulates reads, the elements it touches;
- packed weights inside script objects (quantized linears, LSTMs) are read;
- an argument updated in place but not returned (a training BatchNorm's running statistics, a fused observer's
  state) is written; a BatchNorm's backward reads only the statistics its mode normalised by; a crop
  (constant_pad_nd with negative pads) reads only the elements it keeps.
Views, aliases and allocations move no bytes; ``counting`` decides that before it asks here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tilestack.perf import counting_optim, counting_rules, formulas
from tilestack.perf.counting_rules import _argument, _dense, _numel, _tensors


def _distinct_numel(t: Any) -> int:
    """Elements ``t`` holds in memory: an expanded (stride-0) dimension holds one, however long it looks, and
    overlapping windows (``as_strided``, ``Tensor.unfold`` with a step below the window) no more than the span of
    memory they cover (a signal's length, not windows x window)."""
    n, span = 1, 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride != 0 or size == 0 else 1
        span += (size - 1) * stride
    return min(n, span) if n else 0


COMPRESSED_INDICES = {
    "sparse_csr": ("crow_indices", "col_indices"), "sparse_bsr": ("crow_indices", "col_indices"),
    "sparse_csc": ("ccol_indices", "row_indices"), "sparse_bsc": ("ccol_indices", "row_indices"),
}


def _held_bytes(t: Any) -> int:
    """Bytes ``t`` holds: a dense tensor's distinct elements; a sparse one's indices and values; a nested one's
    buffer; 0 for a tensor whose memory cannot be read (a subclass without storage) and for an efficient zero
    tensor (forward-mode AD's zero tangents: no memory behind them)."""
    if getattr(t, "_is_zerotensor", lambda: False)():
        return 0
    if _dense(t):
        return _distinct_numel(t) * t.element_size()
    if t.is_sparse:  # COO
        return _held_bytes(t._indices()) + _held_bytes(t._values())
    try:
        indices = COMPRESSED_INDICES.get(str(t.layout).removeprefix("torch."))
        if indices is not None:  # compressed sparse: its two index arrays (which, by layout) and its values
            return sum(_held_bytes(getattr(t, name)()) for name in indices) + _held_bytes(t.values())
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return 0


def _memory_layout(t: Any) -> tuple[tuple[int, int], ...]:
    """The elements a dense tensor covers from its data pointer, whatever its shape: its (stride, size) dims, size-1
    dims dropped, largest stride first, a dim merged into the one above where they tile (x, x.t() and x.view(-1)
    alike). Two tensors at one pointer with as many elements need not be one tensor (profiler round 14): a row
    expanded to the matrix it came from (``x[:1].expand_as(x) + x``) or a row and a column of one square matrix."""
    merged: list[tuple[int, int]] = []
    for stride, size in sorted(((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1),
                               reverse=True):
        if merged and merged[-1][0] == stride * size:
            merged[-1] = (stride, merged[-1][1] * size)
        else:
            merged.append((stride, size))
    return tuple(merged)


def _nbytes(ts: Sequence[Any]) -> float:
    seen, total = set(), 0
    for t in ts:
        try:
            # by pointer and the memory covered, not pointer and numel: x[:1].expand_as(x) shares x's pointer and
            # numel, and was taken for x (x + it read 1 row, not x and the row)
            key = ((t.data_ptr(), t.dtype, _memory_layout(t)) if _dense(t) and t.device.type != "meta"
                   else id(t))
        except RuntimeError:  # no data pointer (a storage-less subclass)
            key = id(t)
        if key not in seen:
            seen.add(key)
            total += _held_bytes(t)
    return float(total)


OVERWRITING_OPS = ("aten.fill_", "aten.zero_", "aten.copy_", "aten._foreach_zero_", "aten._foreach_copy_")
# a new tensor like ``self``: none of its elements read (profiler round 19: randn_like(std), a VAE's reparameterisation
# draw, was charged reading std besides writing the draw)
LIKE_OPS = ("aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.rand_like", "aten.randn_like",
            "aten.randint_like", "aten.zeros_like", "aten.ones_like", "aten.full_like")
# Backward ops handed the forward's input for its shape alone: their kernels read dy (and the max indices) and write
# the input gradient, never the input's values (profiler round 18: a ResNet stem's max pool backward was charged its
# (N, C, H, W) input too, more than doubling what it reads; an average pool's backward read 1 + H*W/taps times its dy).
SHAPE_ONLY_SELF = frozenset(
    [f"aten.{kind}_pool{d}d_backward" for kind in ("avg", "_adaptive_avg", "adaptive_max", "fractional_max")
     for d in (2, 3)]
    + [f"aten.max_pool{d}d_with_indices_backward" for d in (2, 3)]
    + [f"aten.{kind}_pad{d}d_backward" for kind in ("reflection", "replication") for d in (1, 2, 3)]
    # NLL's backward writes -w[t] * dy at each target of a zeroed gradient: the log-probabilities are its shape alone
    # (profiler round 19: a (N, C, H, W) segmentation loss's backward was charged reading them all)
    + ["aten.nll_loss_backward", "aten.nll_loss2d_backward"])


def _overwrites(func: Any) -> bool:
    """An in-place op that replaces its destination's values without reading them."""
    import torch

    name = str(func._overloadpacket)
    return name in OVERWRITING_OPS or (  # a random draw in place; but F.rrelu_ computes from what it holds
        name.endswith("_") and torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        and name not in RANDOM_SLOPES
    )


def _written_arguments(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The tensors an op's schema marks as written (``Tensor(a!)``): what an in-place op that returns nothing
    (``_foreach_add_``, whose result is ``()``) writes."""
    return _tensors([_argument(func, args, kwargs, a.name) for a in func._schema.arguments
                     if a.alias_info is not None and a.alias_info.is_write])


def _out_arguments(func: Any, kwargs: dict) -> list[Any]:
    """The tensors an ``out=`` variant writes its result into (keyword-only, written)."""
    return _tensors(
        [kwargs.get(a.name) for a in func._schema.arguments if a.kwarg_only and a.alias_info and a.alias_info.is_write]
    )


# Lookups that read only the rows they gather: (table argument, index argument, rows' leading dims).
# A huge embedding table read for a few tokens moves those tokens' rows, not the table.
GATHERS: dict[str, tuple[str, str]] = {
    "aten.embedding": ("weight", "indices"),
    "aten._embedding_bag": ("weight", "indices"),
    "aten._embedding_bag_forward_only": ("weight", "indices"),
    "aten.index_select": ("self", "index"),
    # torch.gather / torch.take read one element of ``self`` per index element (profiler round 17: a mixture-of-depths
    # router gathering K of T tokens was charged the whole (B, T, D) activation; index_select was not)
    "aten.gather": ("self", "index"),
    "aten.take": ("self", "index"),
    # NLL picks the log-probability of each target (profiler round 19: cross-entropy over a (N, C, H, W) map, or a
    # language model's vocabulary, was charged reading all C log-probabilities of each target)
    "aten.nll_loss_forward": ("self", "target"),
    "aten.nll_loss2d_forward": ("self", "target"),
}
# of GATHERS: one element per index element, not a slice
ELEMENT_GATHERS = ("aten.gather", "aten.take", "aten.nll_loss_forward", "aten.nll_loss2d_forward")
# Advanced indexing (x[idx], x[mask], x[:, idx]; masked_select, x[mask] by another name) reads one element of ``self``
# per element it returns (at most what self holds) and its index tensors (profiler round 19: x[idx] taking 5 rows of
# a (1000, 8) table was charged all 32000 bytes of it, though torch.gather and index_select were charged only what
# they take)
INDEXING = ("aten.index", "aten._unsafe_index", "aten.masked_select")


def _indexed_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """Bytes an advanced index (``INDEXING``) or a view's copy reads: the elements it returns, at most all ``self``
    holds, and its index tensors (a boolean mask whole)."""
    source = _argument(func, args, kwargs, "self")
    indices = [t for t in _tensors((args, kwargs)) if t is not source]
    taken = sum(_numel(t) for t in _tensors(out)) * source.element_size()
    return min(taken, _held_bytes(source)) + _nbytes(indices)


def _gathered_bytes(func: Any, args: tuple, kwargs: dict, table_arg: str, index_arg: str) -> float:
    """Bytes a lookup reads: its index, and one row of the table per index (at most the whole table), plus
    every other tensor argument (offsets, per-sample weights)."""
    table, index = _argument(func, args, kwargs, table_arg), _argument(func, args, kwargs, index_arg)
    others = [t for t in _tensors((args, kwargs)) if t is not table and t is not index]
    if str(func._overloadpacket) in ELEMENT_GATHERS:
        row = 1
    elif table_arg == "self":  # index_select: whole slices along dim
        dim = int(_argument(func, args, kwargs, "dim")) % max(table.dim(), 1)
        row = table.numel() // max(table.shape[dim], 1) if table.dim() else 1
    else:
        row = table.shape[-1] if table.dim() else 1
    name = str(func._overloadpacket)
    if "embedding_bag" in name:  # an EmbeddingBag's padding entries read no row
        looked_up = counting_rules.bag_entries(func, args, kwargs)
    elif name.startswith("aten.nll_loss"):  # nor do NLL's ignored targets (ignore_index)
        looked_up = counting_rules.nll_targets(func, args, kwargs)
    else:
        looked_up = index.numel()
    rows = min(looked_up * row, table.numel())
    # at most what the table holds: a gather from an expanded view reads its held elements, not the view's
    return min(rows * table.element_size(), _held_bytes(table)) + _nbytes([index]) + _nbytes(others)


# In-place scatters into part of a tensor (a KV cache written one token at a time, a histogram): they write, and
# where they accumulate read, only the elements they touch, not the whole destination. By how the touched
# elements are found: "slices" along ``dim`` (one per index), "index" (one per index element), "indices" (an
# advanced index's positions, index_put_), "rows" (a table's distinct rows, embedding_renorm_).
SCATTERS_IN_PLACE: dict[str, str] = {
    **{f"aten.{op}": "slices" for op in ("index_copy_", "index_add_", "index_fill_", "index_reduce_")},
    **{f"aten.{op}": "index" for op in ("scatter_", "scatter_add_", "scatter_reduce_", "put_")},
    **{f"aten.{op}": "indices" for op in ("index_put_", "_index_put_impl_")},
    # nn.Embedding(max_norm=...) renorms the rows it looks up, in place: each distinct row read for its norm and
    # rescaled, not the whole table (profiler round 12: a 50k-row table was read and written in full every call)
    "aten.embedding_renorm_": "rows",
}
# in-place scatters that read the elements they write (an add into them, a row's norm before its rescale)
ACCUMULATING_SCATTERS = (
    "aten.index_add_", "aten.index_reduce_", "aten.scatter_add_", "aten.scatter_reduce_", "aten.embedding_renorm_",
)


def _touched(func: Any, args: tuple, kwargs: dict, how: str) -> int:
    """Elements of ``self`` an in-place scatter writes (``SCATTERS_IN_PLACE``)."""
    import torch

    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    dest = arg("self")
    if how == "slices":
        dim = int(arg("dim")) % max(dest.dim(), 1)
        return dest.numel() // max(dest.shape[dim], 1) * _numel(arg("index")) if dest.dim() else 1
    if how == "index":
        return _numel(arg("index"))
    if how == "rows":  # embedding_renorm_: whole rows of the table, each distinct index once
        return counting_rules.distinct_rows(arg("indices")) * (dest.shape[-1] if dest.dim() else 1)
    # index_put_: the broadcast positions of the tensor indices (a boolean mask stands for its true elements, over
    # as many dims as it has) times the dims left unindexed.
    count, dims, positions = 1, 0, []
    for index in arg("indices"):
        if index is None:  # a full slice of that dim
            count *= dest.shape[dims]
            dims += 1
        elif index.dtype in (torch.bool, torch.uint8):
            positions.append((int(index.sum()),))
            dims += index.dim()
        else:
            positions.append(tuple(index.shape))
            dims += 1
    broadcast = torch.broadcast_shapes(*positions) if positions else ()
    return count * math.prod(broadcast) * math.prod(dest.shape[dims:])


def _scattered_bytes(func: Any, args: tuple, kwargs: dict, how: str) -> tuple[float, float]:
    """(read, written) of an in-place scatter: its indices, its source up to the touched elements (a larger src
    is read only that far), the touched elements written, and read too where they accumulate."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    dest = arg("self")
    touched = _touched(func, args, kwargs, how) * dest.element_size()
    source = next((s for s in (arg("source"), arg("src"), arg("values")) if s is not None and hasattr(s, "dim")),
                  None)
    name = str(func._overloadpacket)
    accumulate = name in ACCUMULATING_SCATTERS or bool(arg("accumulate")) or (
        name == "aten.scatter_" and arg("reduce") is not None
    )
    indices = [t for t in _tensors((args, kwargs)) if t is not dest and t is not source]
    read = _nbytes(indices) + (min(_nbytes([source]), touched) if source is not None else 0)
    return read + (touched if accumulate else 0), touched


def _packed_bytes(obj: Any) -> float:
    """Bytes of the packed weights among an op's arguments: script objects, no tensors, whose weights are read all
    the same (quantized::linear's LinearPackedParamsBase, unpacked; a quantized LSTM's CellParamsBase, whose state
    holds each gate matrix's packed parameters)."""
    import torch

    held: list[Any] = []
    half_bytes = 0.0  # fp16-packed weights, which unpack as float32
    stack: list[tuple[Any, bool]] = [(obj, False)]  # (value, inside a script object)
    while stack:
        x, packed = stack.pop()
        if isinstance(x, list | tuple):
            stack.extend((v, packed) for v in x)
        elif isinstance(x, Mapping):
            stack.extend((v, packed) for v in x.values())
        elif isinstance(x, torch.Tensor):
            if packed and x.layout == torch.strided:  # tensors outside script objects are counted as inputs
                held.append(x)
        elif isinstance(x, torch.ScriptObject):
            try:
                state = x.unpack() if hasattr(x, "unpack") else x.__getstate__()
            except (RuntimeError, AttributeError):  # a packing this torch cannot open: its bytes are unknown
                continue
            if _fp16_packed_linear(x, state):
                weight, *state = state
                half_bytes += _numel(weight) * formulas.dtype_bytes("fp16")
            stack.append((state, True))
    return _nbytes(held) + half_bytes


def _fp16_packed_linear(obj: Any, state: Any) -> bool:
    """A linear packed for fp16 (``quantize_dynamic(..., dtype=torch.float16)``: ``linear_prepack_fp16``, the
    weights of ``quantized::linear_dynamic_fp16`` and of a dynamic fp16 LSTM's gates), which holds its weight as fp16
    but unpacks it as a float32 tensor: every other packing unpacks a quantized weight (profiler round 24: such a
    weight was charged 4 bytes an element, twice what the kernel reads)."""
    import torch

    name = obj._type().qualified_name() if hasattr(obj, "_type") else ""
    return (name.endswith("LinearPackedParamsBase") and isinstance(state, tuple | list) and len(state) > 0
            and isinstance(state[0], torch.Tensor) and state[0].dtype == torch.float32)


# beta * self + alpha * (product): with beta 0 the kernels ignore ``self`` (NaN and inf in it do not propagate), so it
# is not read: attention written as torch.baddbmm(torch.empty(B*H, L, L), q, k^T, beta=0, alpha=scale) was charged
# reading its (B*H, L, L) scratch besides writing the scores (profiler round 20)
IGNORE_SELF_WHERE_BETA_0 = frozenset(
    f"aten.{op}{tail}" for op in ("addmm", "baddbmm", "addbmm", "addmv", "addr") for tail in ("", "_")
) | {"aten._sparse_addmm"}  # torch.sparse.mm: a sparse product into zeros it never reads (profiler round 22)


# grid_sample reads the input elements its taps touch at each output point (one for nearest), at most the input it
# holds, and its grid: a deformable attention sampling a few points of a large feature map was charged the whole map
# at every call (profiler round 20), as advanced indexing was before round 19
SAMPLERS = {"aten.grid_sampler_2d": 2, "aten.grid_sampler_3d": 3, "aten.cudnn_grid_sampler": 2}  # cuDNN's: bilinear


def _sampled_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """Bytes a grid sampler reads: ``taps`` input elements per output element (1 where nearest), at most all the
    input holds, and the grid whole."""
    source, grid = _argument(func, args, kwargs, "input"), _argument(func, args, kwargs, "grid")
    source = _argument(func, args, kwargs, "self") if source is None else source  # cudnn_grid_sampler's name
    dims = SAMPLERS[str(func._overloadpacket)]
    mode = _argument(func, args, kwargs, "interpolation_mode")
    taps = formulas.GRID_SAMPLE_TAPS.get((dims, 0 if mode is None else int(mode)), 0) or 1  # (None: cuDNN's bilinear)
    taken = taps * sum(_numel(t) for t in _tensors(out)) * source.element_size()
    return min(taken, _held_bytes(source)) + _nbytes([grid])


# A BatchNorm's backward reads the statistics its mode normalised by: the batch's saved mean and inverse deviation in
# training, the running mean and variance in eval (profiler round 22: a training BatchNorm's backward was charged
# reading its running statistics too). (the flag, the slots it reads when set, the slots it reads when not)
STATISTICS_READ_BY_MODE: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "aten.native_batch_norm_backward": ("train", ("save_mean", "save_invstd"), ("running_mean", "running_var")),
}


def _kept_bytes(func: Any, args: tuple, kwargs: dict) -> float:
    """Bytes constant_pad_nd reads: the input elements that land in its output, all of them for a padding, fewer for
    a negative pad, a crop (a pad's backward, F.pad(x, (-1, 0))) (profiler round 22: a pad's backward was charged
    reading the whole padded gradient). ``pad`` holds (before, after) pairs from the last dim backwards."""
    x, pad = _argument(func, args, kwargs, "self"), [int(p) for p in _argument(func, args, kwargs, "pad")]
    kept = list(x.shape)
    for i in range(min(len(pad) // 2, x.dim())):
        d = x.dim() - 1 - i
        kept[d] = max(kept[d] + min(pad[2 * i], 0) + min(pad[2 * i + 1], 0), 0)
    return min(math.prod(kept) * x.element_size(), _held_bytes(x))


# The CPU LSTM kernel's bias slots, filled with placeholders the kernel never reads where the layer has no bias
# (nn.LSTM(bias=False)): its weights' shapes again, so a bias-free LSTM was charged reading its weights twice
# (profiler round 20)
BIAS_SLOTS_UNREAD_WITHOUT_BIAS: dict[str, tuple[str, ...]] = {
    "aten.mkldnn_rnn_layer": ("weight2", "weight3"),
    "aten.mkldnn_rnn_layer_backward": ("weight3", "weight4"),
}


# masked_scatter takes the first mask.sum() elements of ``source`` in order, however large source is (profiler round
# 21: a source the size of the destination, the usual way it is built, was charged whole for a sparse mask); in place
# it neither reads the destination nor writes where the mask is false, as index_put_ (round 21: charged both whole)
MASKED_SCATTERS = ("aten.masked_scatter", "aten.masked_scatter_")


def _masked_elements(func: Any, args: tuple, kwargs: dict) -> int | None:
    """True elements of a masked_scatter's mask broadcast over ``self``; None on meta (the mask has no values)."""
    import torch

    dest, mask = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "mask")
    if mask.device.type == "meta":
        return None
    return int(torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, dest.shape)).sum())


def _masked_scatter_bytes(func: Any, args: tuple, kwargs: dict, ins: list, outs: list) -> tuple[float, float]:
    """(read, written) of a masked_scatter: its mask, one ``source`` element per true mask element (all of source
    on meta), and out of place its ``self`` read and its result written whole; in place the taken elements alone
    written (all of ``self`` on meta)."""
    dest, source = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "source")
    taken = _masked_elements(func, args, kwargs)
    read_source = _held_bytes(source) if taken is None else min(taken * source.element_size(), _held_bytes(source))
    if not str(func._overloadpacket).endswith("_"):
        return _nbytes([t for t in ins if t is not source]) + read_source, _nbytes(outs)
    rest = [t for t in ins if t is not source and t is not dest]  # the mask
    return _nbytes(rest) + read_source, _nbytes([dest]) if taken is None else taken * dest.element_size()


def op_bytes(func: Any, args: tuple, kwargs: dict, out: Any, ins: list, outs: list) -> tuple[float, float]:
    """(bytes read, bytes written) of one call that moves data: ``ins`` its tensor arguments, ``outs`` what it
    wrote (its outputs, or the arguments an in-place op that returns nothing writes)."""
    import torch

    name = str(func._overloadpacket)
    ins = [t for t in ins if not any(t is o for o in _out_arguments(func, kwargs))]  # written, not read
    if _overwrites(func) or name in LIKE_OPS:
        # fill_, copy_, a random draw in place: the destination is written, not read; new_zeros reads its
        # argument's dtype and device, not its elements
        dest = _tensors(_argument(func, args, kwargs, "self"))  # a list for a foreach op
        ins = [t for t in ins if not any(t is d for d in dest)]
    if name in SHAPE_ONLY_SELF or (name in IGNORE_SELF_WHERE_BETA_0 and _argument(func, args, kwargs, "beta") == 0):
        shape_only = _argument(func, args, kwargs, "self")
        ins = [t for t in ins if t is not shape_only]
    if name in STATISTICS_READ_BY_MODE:
        flag, when_set, when_unset = STATISTICS_READ_BY_MODE[name]
        unread = [_argument(func, args, kwargs, slot) for slot in (when_unset if _argument(func, args, kwargs, flag)
                                                                   else when_set)]
        ins = [t for t in ins if not any(t is u for u in unread)]
    if name in RANDOM_SLOPES:  # drawn over, never read
        noise = _argument(func, args, kwargs, "noise")
        ins = [t for t in ins if t is not noise]
    if name in BIAS_SLOTS_UNREAD_WITHOUT_BIAS and not _argument(func, args, kwargs, "has_biases"):
        unread = [_argument(func, args, kwargs, slot) for slot in BIAS_SLOTS_UNREAD_WITHOUT_BIAS[name]]
        ins = [t for t in ins if not any(t is u for u in unread)]
    gathered, scattered = GATHERS.get(name), SCATTERS_IN_PLACE.get(name)
    sparse = counting_optim.sparse_into_dense(func, args, kwargs)  # dense.add_(sparse): the rows it touches
    if scattered is not None or (sparse is not None and sparse[1] is not None):
        read, written = _scattered_bytes(func, args, kwargs, scattered) if sparse is None else sparse[1:]
    elif name in MASKED_SCATTERS:
        read, written = _masked_scatter_bytes(func, args, kwargs, ins, outs)
    elif name == "aten.constant_pad_nd":
        read, written = _kept_bytes(func, args, kwargs), _nbytes(outs)
    elif name in SAMPLERS:
        read, written = _sampled_bytes(func, args, kwargs, out), _nbytes(outs)
    elif name in INDEXING or torch.Tag.view_copy in getattr(func, "tags", ()):
        # a view's copy (narrow_copy, select_copy: functionalized graphs) reads the view's elements alone
        read, written = _indexed_bytes(func, args, kwargs, out), _nbytes(outs)
    else:
        read = _nbytes(ins) if gathered is None else _gathered_bytes(func, args, kwargs, *gathered)
        written = _nbytes(outs)
    return read + _packed_bytes((args, kwargs)), written + _nbytes(_updated_besides(func, args, kwargs, outs))


# Ops that update arguments their schema does not mark written: native_batch_norm in training moves its running mean
# and variance by the momentum (its functional twin, _native_batch_norm_legit, marks them ``Tensor(a!)``).
UPDATED_UNMARKED = {f"aten.{op}": ("running_mean", "running_var")
                    for op in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm")}  # (a GPU's: round 24)


# RReLU's ``noise`` (marked written): in training each element's random slope is drawn into it, never read; in eval
# the mean slope is used and the buffer is neither read nor written
RANDOM_SLOPES = frozenset({"aten.rrelu_with_noise", "aten.rrelu_with_noise_"})


def _updated_besides(func: Any, args: tuple, kwargs: dict, outs: list) -> list[Any]:
    """The arguments an op updates in place without returning them, each written once: a training BatchNorm's
    running mean and variance, QAT's fused observer's running min, max, scale and zero point (profiler round 22:
    only the returned tensors were charged, so a training BatchNorm's statistics updates moved no bytes)."""
    updated = _written_arguments(func, args, kwargs)
    if str(func._overloadpacket) in RANDOM_SLOPES and not _argument(func, args, kwargs, "training"):
        noise = _argument(func, args, kwargs, "noise")
        updated = [t for t in updated if t is not noise]
    unmarked = UPDATED_UNMARKED.get(str(func._overloadpacket), ())
    if unmarked and _argument(func, args, kwargs, "training"):
        updated += _tensors([_argument(func, args, kwargs, name) for name in unmarked])
    return [t for t in updated if not any(t is o or _same_memory(t, o) for o in outs)]


def _same_memory(a: Any, b: Any) -> bool:
    """Whether two dense tensors off the meta device start at one address (an in-place op's result and its
    argument; on meta every address is 0, and identity alone tells)."""
    if not (_dense(a) and _dense(b)) or "meta" in (a.device.type, b.device.type):
        return False
    try:
        return a.data_ptr() == b.data_ptr() and a.data_ptr() != 0
    except RuntimeError:  # a storage-less subclass
        return False
