"""The counting pass of ``tilestack.perf.profile``: one step of a model under a ``TorchDispatchMode`` that sees
every ATen op, its FLOPs and bytes by op name and input shapes.

    counts = counting.count_ops(step)        # {(profiler name, input shapes): calls, FLOPs, bytes, dtype, ...}

FLOPs come from the formulas of ``torch.utils.flop_counter`` (matmuls, attention; causal attention by the share of
scores its mask keeps, ``counting_linalg.causal_fraction``: half when square) or tilestack's own rules:
``counting_rules`` for layers (convolutions forward and backward with their groups, the CPU LSTM kernel, norms,
pools, interpolation, scatters and accumulating index puts, scans, selections and sorts (as compares), statistics,
losses, weight norm, element-wise ops torch leaves untagged) and ``counting_linalg`` for products and linear algebra
(in-place and summed batch matmuls, matrix-vector products, quantized linears and recurrent layers, nn.Bilinear,
factorisations), ``counting_optim`` for fused optimizers and grad scalers; 1 FLOP per element of a pointwise op (a
complex product 6; a sparse operand's stored values where it adds into a dense one); a matmul with a sparse
compressed operand by its stored elements. Bytes (``counting_bytes``) are the sizes of an op's distinct input and
output tensors (views move none, an expanded input is read as held, a lookup reads only its rows, an in-place
scatter only the elements it touches, an overwrite does not read its destination). A composite op that reaches the
mode whole (under ``inference_mode``) is counted as the ops it runs, as ``FlopCounterMode`` does; an op that
computes but has no formula is marked ``unsupported`` (its FLOPs unknown, not 0), in any namespace (a
``torch.library`` custom op is counted whole).
torch.compile'd code is counted eagerly (``force_eager``). The profile joins these counts with the timed pass
(``profile.profile_model``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any

from tilestack.errors import TilestackError
from tilestack.perf import call_tree, counting_bytes, counting_compat, counting_linalg, counting_optim, formulas
from tilestack.perf.counting_bytes import COMPRESSED_INDICES, _nbytes  # noqa: F401 - _nbytes: used here and by tests
from tilestack.perf.counting_linalg import LINALG_FLOPS, UNDECOMPOSED_FLOPS, VALUES_ONLY_CALLERS, vectors_for_the_mode
from tilestack.perf.counting_rules import (  # noqa: F401 - _tensors, _numel, _argument: used here and by profile
    FOREACH_NO_ARITHMETIC,
    FOREACH_PREFIX,
    LAYER_FLOPS,
    Rule,
    _argument,
    _dense,
    _numel,
    _tags,
    _tensors,
    foreach_flops,
)
from tilestack.perf.counting_rules.norms_statistics import affine_left_out

ROW_OP_FLOPS_PER_ELEMENT = {
    "aten.native_layer_norm": formulas.LAYERNORM_FLOPS_PER_ELEMENT,
    "aten._fused_rms_norm": formulas.RMSNORM_FLOPS_PER_ELEMENT,
    "aten._softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
    "aten._safe_softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
    "aten._log_softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
    "aten._softmax_backward_data": formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT,
    "aten._log_softmax_backward_data": formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT,
    "aten._native_batch_norm_legit_no_training": formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT,
    "aten.native_group_norm": formulas.LAYERNORM_FLOPS_PER_ELEMENT,  # statistics per group, normalise, affine
}
# allocations: their elements are not written (a tensor like another that is filled, zeros_like / ones_like /
# full_like, writes its bytes as new_zeros and full do: profiler round 25, round 19's strict xfail)
ALLOCATING_PREFIXES = ("empty", "new_empty", "resize_")


class ProfileError(TilestackError, RuntimeError):
    """A model that cannot be loaded or raises while profiled; the message names the target and the phase."""


Shapes = tuple[tuple[int, ...], ...]  # shapes of an op's tensor arguments, in schema order
OpKey = tuple[str, Shapes]  # one row: the profiler's op name and its input shapes


@dataclasses.dataclass
class _Count:
    calls: int = 0
    flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    dtype: str = ""
    unsupported: bool = False  # no FLOP formula for an op that computes: its FLOPs are unknown, not 0
    parents: tuple[OpKey, ...] = ()  # the ATen ops it ran inside, nearest first (composites above the mode)
    # per call of an eigen- or singular-value routine: FLOPs of vectors it formed only because the mode was on
    # (see VALUES_ONLY_CALLERS), taken off where the call came from a values-only function
    mode_vector_flops: list[float] = dataclasses.field(default_factory=list)
    # where the op ran at these shapes in several dtypes (a bf16 and an fp32 Linear of one width): each dtype's own
    # calls, FLOPs and bytes (its inputs' dtype, ``_dtype``), in the order first seen; the profiler splits the row
    by_dtype: dict[str, _Count] = dataclasses.field(default_factory=dict)


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs of one ATen call: torch's registered formula, or tilestack's for the ops torch leaves out."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    own = OWN_FLOPS.get(str(packet))
    if own is not None:
        return own(func, args, kwargs, out)
    if str(packet).startswith(FOREACH_PREFIX):
        return foreach_flops(func, args, kwargs, out)
    undecomposed = UNDECOMPOSED_FLOPS.get(str(packet))
    if undecomposed is not None:
        return undecomposed(func, args, kwargs, out)
    if str(packet) in MATMUL_NAMES and any(t.is_sparse or str(t.layout).removeprefix("torch.") in COMPRESSED_INDICES
                                            for t in _tensors(args)):
        return _sparse_product_flops(func, args, kwargs)
    if packet in flop_registry:
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        if any(t.is_complex() for t in _tensors(args)):  # torch counts a complex multiply-add as a real one
            flops *= formulas.COMPLEX_MAC_OVER_REAL
        return flops * counting_linalg.causal_fraction(func, args, kwargs)
    if str(packet) == "aten._scaled_dot_product_flash_attention_for_cpu":
        q, k, v = args[:3]
        return float(formulas.sdpa(q, k, v, causal=bool(_argument(func, args, kwargs, "is_causal"))).flops)
    if str(packet) == "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        # torch's own count for its GPU flash backward (four matmuls), so a profile reads alike on both devices
        from torch.utils.flop_counter import sdpa_backward_flop_count

        d_out, q, k, v = args[:4]
        flops = float(sdpa_backward_flop_count(d_out.shape, q.shape, k.shape, v.shape))
        return flops * counting_linalg.causal_fraction(func, args, kwargs)
    per_element = ROW_OP_FLOPS_PER_ELEMENT.get(str(packet))
    if per_element is not None and args and isinstance(args[0], torch.Tensor):
        return float((per_element - affine_left_out(func, args, kwargs)) * _numel(args[0]))
    tags = _tags(func)
    if str(packet).removeprefix("aten.").rstrip("_") in NO_ARITHMETIC:
        return 0.0  # a copy or a select, though torch tags some pointwise (clone, masked_fill)
    sparse = counting_optim.sparse_into_dense(func, args, kwargs) if torch.Tag.pointwise in tags else None
    if sparse is not None:
        return sparse[0]
    if torch.Tag.pointwise in tags:
        # 1 FLOP per output element, as torch's profiler; per real part of a complex one, and a complex product or
        # quotient of two complex operands as the real operations it takes (a Python complex scalar is one: profiler
        # round 23, z * 1j or z / (1 + 2j) was counted as a product by a real number).
        per_complex = formulas.COMPLEX_ELEMENT_OVER_REAL
        complex_operands = sum(t.is_complex() for t in _tensors(args)) + sum(isinstance(a, complex) for a in args)
        if str(packet).rstrip("_") in COMPLEX_PRODUCTS and complex_operands >= 2:
            per_complex = COMPLEX_PRODUCTS[str(packet).rstrip("_")]
        if str(packet) == "aten.abs" and any(t.is_complex() for t in _tensors(args)):  # a real modulus per element
            return float(formulas.COMPLEX_ABS_FLOPS * sum(_numel(t) for t in _tensors(out)))
        return float(sum(_numel(t) * (per_complex if t.is_complex() else 1) for t in _tensors(out)))
    if torch.Tag.reduction in tags and args and isinstance(args[0], torch.Tensor):
        # one add (or compare) per element folded in; per real part of a complex one, and a complex product for
        # prod (profiler round 20: a complex sum was counted half the adds of the complex add it is made of)
        per_complex = formulas.COMPLEX_MUL_FLOPS if str(packet) == "aten.prod" else formulas.COMPLEX_ELEMENT_OVER_REAL
        return float(_numel(args[0]) * (per_complex if args[0].is_complex() else 1))
    return 0.0


MATMUL_NAMES = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
MATMUL_OPERANDS = (("mat1", "mat2"), ("self", "mat2"), ("batch1", "batch2"))


def _sparse_product_flops(func: Any, args: tuple, kwargs: dict) -> float:
    """A matmul with a sparse operand (COO, or compressed: CSR, CSC, BSR, BSC): a multiply-add per stored element of
    the sparse one and column (row) of the dense one, 2 * nnz * numel(dense) / K, not the dense product's count
    (torch's FlopCounterMode counts a COO operand of aten.mm as dense; torch.sparse.mm's aten._sparse_addmm, which
    it does not count, is counted here too, so a sparse product's forward and backward read alike)."""
    for left, right in MATMUL_OPERANDS:
        a, b = _argument(func, args, kwargs, left), _argument(func, args, kwargs, right)
        if a is not None and b is not None and a is not b:
            break
    k = a.shape[-1]
    sparse, other = (a, b) if not _dense(a) else (b, a)
    dense_lines = _numel(other) // max(k, 1) if _dense(other) else _numel(other)
    return float(formulas.FLOPS_PER_MAC * _numel(sparse) * dense_lines)


def _sampled_product_flops(func: Any, args: tuple, kwargs: dict) -> float:
    """sparse_sampled_addmm(mask, mat1 (..., M, K), mat2 (..., K, N)): mat1 @ mat2 formed only where the sparse
    ``mask`` stores an element, 2 * nnz * K (the product, as torch counts addmm's; the scaling by alpha and the
    mask's values added by beta left out, as there)."""
    mask, a = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "mat1")
    return float(formulas.FLOPS_PER_MAC * _numel(mask) * a.shape[-1])


def has_flop_formula(func: Any) -> bool:
    """Whether :func:`_flops` counts ``func`` by a formula (a count of 0 from one is a true 0, e.g. batch 0)."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    name = str(packet)
    tags = _tags(func)
    return (
        name in OWN_FLOPS
        or (name.startswith(FOREACH_PREFIX) and _foreach_base(name) not in FOREACH_NO_ARITHMETIC)
        or packet in flop_registry
        or name in ROW_OP_FLOPS_PER_ELEMENT
        or name.startswith("aten._scaled_dot_product_flash_attention_for_cpu")
        or torch.Tag.pointwise in tags
        or torch.Tag.reduction in tags
    )


def _foreach_base(name: str) -> str:
    """``aten._foreach_add_`` -> ``add``: the single-tensor op a foreach op applies to each tensor of its list."""
    return name.removeprefix(FOREACH_PREFIX).rstrip("_")


def does_no_arithmetic(func: Any) -> bool:
    """Views, allocations, copies, gathers, random draws, the profiler's own ranges (``record_function``): ops whose
    0 FLOPs is the count, not a gap in it."""
    import torch

    packet = str(func._overloadpacket)
    name = packet.removeprefix("aten.")
    return (
        packet.startswith(PROFILER_PREFIX)
        or (packet.startswith(FOREACH_PREFIX) and _foreach_base(packet) in FOREACH_NO_ARITHMETIC)
        or getattr(func, "is_view", False)
        or name.startswith(ALLOCATING_PREFIXES)
        or name.rstrip("_") in NO_ARITHMETIC
        or torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        or torch.Tag.view_copy in getattr(func, "tags", ())
        or torch.Tag.inplace_view in getattr(func, "tags", ())
    )


# A nested tensor's bookkeeping: its sizes, strides and offsets (metadata, no element read), size checks.
METADATA_OPS = frozenset({
    "aten::_nested_tensor_size", "aten::_nested_tensor_strides", "aten::_nested_tensor_storage_offsets",
    "aten::is_same_size", "aten::_nested_get_offsets", "aten::_nested_get_lengths", "aten::_has_same_storage_numel",
    "aten::is_coalesced",  # a sparse tensor's flag
})
PROFILER_PREFIX = "profiler."  # record_function's enter and exit: bookkeeping of the profiler's ranges
# Ops tilestack counts itself, ahead of torch's registry (whose convolution backward ignores groups) or where
# torch counts nothing: neural-network layers (``counting_rules``), products and linear algebra (``counting_linalg``).
OWN_FLOPS: dict[str, Rule] = {
    **LAYER_FLOPS,
    **LINALG_FLOPS,
    **counting_optim.OPTIMIZER_FLOPS,  # fused optimizers, grad scalers
    # torch.sparse.mm / addmm of a sparse COO operand: by its stored elements, as a compressed one's matmul
    "aten._sparse_addmm": lambda func, args, kwargs, out: _sparse_product_flops(func, args, kwargs),
    # the other products of a sparse operand (profiler round 16: each was reported uncounted): torch.hspmm and
    # torch.smm (aten.sspaddmm) by the sparse left operand's stored elements, as torch.sparse.mm; SDDMM
    # (torch.sparse.sampled_addmm) a dot product of K at each stored element of its sparse mask
    "aten.hspmm": lambda func, args, kwargs, out: _sparse_product_flops(func, args, kwargs),
    "aten.sspaddmm": lambda func, args, kwargs, out: _sparse_product_flops(func, args, kwargs),
    "aten.sparse_sampled_addmm": lambda func, args, kwargs, out: _sampled_product_flops(func, args, kwargs),
}
# Ops whose 0 FLOPs is the count (data movement, bookkeeping); any other op with no formula is reported as
# uncounted (``ModelProfile.unsupported``), not shown as free. Names without ``aten.`` and a trailing ``_``.
NO_ARITHMETIC = frozenset(
    {
        "copy", "clone", "_to_copy", "contiguous", "cat", "stack", "index", "_unsafe_index", "index_select",
        "gather", "embedding", "masked_scatter", "masked_select",
        "nonzero", "nonzero_static", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad2d",
        "repeat",
        "repeat_interleave", "flip", "roll", "tril", "triu", "slice_scatter", "select_scatter", "as_strided_scatter",
        "diagonal_scatter", "fill", "zero", "lift_fresh", "lift_fresh_copy", "detach", "_local_scalar_dense",
        "item", "is_nonzero", "equal", "arange", "full",
        "scalar_tensor", "zeros", "ones", "eye", "_pack_padded_sequence", "_pad_packed_sequence", "set",
        "_unsafe_view", "split_with_sizes_copy", "unbind_copy", "resize", "new_zeros", "new_ones", "new_full",
        "_assert_async", "_assert_tensor_metadata", "sym_constrain_range_for_size", "_efficientzerotensor",
        "_to_dense", "record_stream", "alias", "unfold", "im2col",
        "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
        "_reshape_alias", "expand_copy", "permute_copy", "split", "unsafe_split", "chunk", "narrow_copy",
        "_pin_memory", "masked_fill", "transpose", "select_backward",
        "slice_backward", "index_backward", "expand_backward", "_linalg_check_errors",
        "zeros_like", "ones_like", "full_like",  # fills: written, no arithmetic
        "index_fill", "index_copy", "take", "rot90", "diag_embed",
        "one_hot", "tril_indices", "triu_indices", "linspace", "masked_scatter_backward",
        "max_unpool2d", "max_unpool3d", "complex", "diagonal_backward", "_sparse_coo_tensor_with_dims_and_tensors",
        "replication_pad1d", "replication_pad3d", "reflection_pad3d", "block_diag",
        "lu_unpack", "_nested_tensor_from_tensor_list",
        "_nested_tensor_size", "_nested_tensor_strides", "_nested_tensor_storage_offsets", "is_same_size",
        "_sparse_sum_backward", "_has_same_storage_numel", "is_coalesced", "sparse_mask",
        # a GPU recurrent layer's weights copied into one buffer, and the check whether to (round 24: uncounted)
        "_cudnn_rnn_flatten_weight", "_use_cudnn_rnn_flatten_weight",
        # a dense tensor made sparse (Tensor.to_sparse*): its nonzeros found and copied out, as nonzero's
        "_to_sparse", "_to_sparse_csr", "_to_sparse_csc", "_to_sparse_bsr", "_to_sparse_bsc",
    }
)


def _dtype(ts: Sequence[Any]) -> str:
    """The first floating-point dtype among ``ts``, by tilestack's name; a complex one's parts' (complex64: fp32).
    An op on integers and bools only (an int8 _int_mm, a bitwise or logical op) has the first of theirs that has a
    name (int8, uint8 as int8, int32, int64, bool): not the step's float dtype, whose roof is not its roof."""
    whole = ""
    for t in ts:
        dtype = t.dtype.to_real() if t.is_complex() else t.dtype
        try:
            name = formulas.dtype_name(dtype)
        except Exception:  # a dtype tilestack has no roof for (int16, float8 variants it does not name)
            continue
        if dtype.is_floating_point:
            return name
        whole = whole or name
    return whole


def _profiler_name(func: Any) -> str:
    ns, _, name = str(func._overloadpacket).partition(".")
    return f"{ns}::{name}"


def _storage(t: Any) -> int:
    """Which storage ``t`` is a view of: its data pointer, or on meta (every pointer 0) the storage itself."""
    try:
        storage = t.untyped_storage()
        return storage._cdata if t.device.type == "meta" else storage.data_ptr()
    except Exception:  # tensors without storage (sparse, some subclasses)
        return id(t)


SPARSE_PARTS = {  # a sparse layout's tensors holding its elements, by accessor
    "sparse_coo": ("_indices", "_values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"), "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"), "sparse_bsc": ("ccol_indices", "row_indices", "values"),
}


def _storages(t: Any) -> set[int]:
    """The storages ``t`` holds its elements in: its own, or a sparse tensor's indices' and values' (a sparse tensor
    wrapped around its indices and values, as a sparse embedding's gradient is, aliases them: it copies nothing)."""
    parts = SPARSE_PARTS.get(str(t.layout).removeprefix("torch."))
    if parts is None:
        return {_storage(t)}
    try:
        return {_storage(getattr(t, part)()) for part in parts}
    except (RuntimeError, NotImplementedError):  # a subclass without its parts: the tensor itself, as before
        return {_storage(t)}


def _same_view(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same elements of one storage, alike in dtype, layout and conjugate/negative
    bits (a copy from one to the other moves nothing)."""
    try:
        return (a.layout == b.layout and a.dtype == b.dtype and a.device == b.device and _storage(a) == _storage(b)
                and _storage(a) != 0 and a.storage_offset() == b.storage_offset() and a.shape == b.shape
                and a.stride() == b.stride() and a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg())
    except (RuntimeError, NotImplementedError):  # sparse, nested: no strides or offset to compare
        return False


def _moves_no_data(func: Any, name: str, ins: Sequence[Any], outs: Sequence[Any]) -> bool:
    """Views and aliases (their outputs share the inputs' storage), in-place views (``transpose_``: new sizes and
    strides, the same elements) and allocations move no bytes."""
    import torch

    if getattr(func, "is_view", False) or name.removeprefix("aten::").startswith(ALLOCATING_PREFIXES):
        return True
    if name in METADATA_OPS:
        return True
    if torch.Tag.inplace_view in getattr(func, "tags", ()):
        return True
    if name == "aten::copy_" and len(ins) >= 2 and _same_view(ins[0], ins[1]):
        # ``x[:, 1:] *= 2`` multiplies the slice in place, then assigns it back to itself: torch's copy_ returns
        # at once when its source is its destination viewed alike (same elements, same dtype), touching nothing
        return True
    # In-place ops and out= variants write into an argument: that argument is their output, and moves.
    writes = name.endswith("_") or any(
        a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments
    )
    # an empty tensor's null data pointer aliases nothing (a batch of 0 through a convolution still reads its weight)
    held = [t for t in outs if _storage(t) != 0]
    return not writes and bool(held) and set().union(*map(_storages, held)) <= set().union(*map(_storages, ins))


COMPLEX_PRODUCTS = {"aten.mul": formulas.COMPLEX_MUL_FLOPS, "aten.div": formulas.COMPLEX_DIV_FLOPS}
def _arg_shapes(func: Any, args: tuple, kwargs: dict) -> Shapes:
    """Shapes of the op's tensor arguments in schema order, as ``torch.profiler``'s ``record_shapes`` gives them.

    Lists of tensors and 0-dim tensors are left out: the profiler records an empty shape for both.
    """
    import torch

    out = []
    for i, a in enumerate(func._schema.arguments):
        v = kwargs[a.name] if a.name in kwargs else args[i] if i < len(args) else None
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            try:
                out.append(tuple(int(d) for d in v.shape))
            except (RuntimeError, TypeError):  # a nested tensor's ragged dims have no single size
                out.append(())
    return tuple(out)


def _event_shapes(e: Any) -> Shapes:
    """The same shapes read off a profiler event recorded with ``record_shapes=True``."""
    return tuple(
        tuple(int(d) for d in s)
        for s in (getattr(e, "input_shapes", None) or ())
        if isinstance(s, list | tuple) and s and all(isinstance(d, int) for d in s)
    )


# The profiler's names of tensor dtypes (``FunctionEvent.input_dtypes``), as torch dtypes' names
_PROFILER_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16",
                    "c10::Float8_e4m3fn": "float8_e4m3fn", "c10::Float8_e5m2": "float8_e5m2", "int": "int32",
                    "long int": "int64", "signed char": "int8", "unsigned char": "uint8", "bool": "bool",
                    "c10::complex<float>": "float32", "c10::complex<double>": "float64"}


def dtype_tagged(name: str, dtype: str) -> str:
    """The row name of op ``name`` at shapes it also ran at in another dtype first (a bf16 and an fp32 Linear of one
    width): ``aten::addmm[bf16]``; ``untagged`` gives the op's name back. Rows are keyed by (op, input shapes), so
    the two would share one row, its dtype the first call's (the bf16 product under the fp32 roof, its bytes averaged
    with the fp32 call's)."""
    return f"{name}[{dtype}]"


def untagged(name: str) -> str:
    """The op's name of a row name (``dtype_tagged``'s inverse; a plain name as it is)."""
    return name.partition("[")[0] if name.endswith("]") else name


def _event_dtype(e: Any) -> str:
    """The dtype counting keys an event's op by (``_dtype`` of its inputs), from ``FunctionEvent.input_dtypes``; ""
    where the profiler gives none (or none tilestack names)."""
    import torch

    whole = ""
    for text in getattr(e, "input_dtypes", None) or ():
        torch_name = _PROFILER_DTYPES.get(text)
        if torch_name is None or not hasattr(torch, torch_name):
            continue
        dtype = getattr(torch, torch_name)
        try:
            name = formulas.dtype_name(dtype)
        except Exception:
            continue
        if dtype.is_floating_point:
            return name
        whole = whole or name
    return whole


def tagged_ops(counted: Collection[OpKey]) -> frozenset[str]:
    """The ops with a dtype-tagged row among ``counted`` (``dtype_tagged``): their events need ``event_key``'s dtype."""
    return frozenset(untagged(name) for name, _ in counted if name.endswith("]"))


def event_key(e: Any, counted: Collection[OpKey], tagged: Collection[str]) -> OpKey:
    """The row key of a profiler event: (name, shapes), or the dtype-tagged row of its dtype where the counting pass
    saw the op at those shapes in several dtypes (``tagged``: ``tagged_ops(counted)``)."""
    key = (e.name, _event_shapes(e))
    if e.name in tagged:
        row = (dtype_tagged(e.name, _event_dtype(e)), key[1])
        if row in counted:
            return row
    return key


def _run_higher_order(mode: Any, func: Any, args: tuple, kwargs: dict, counts: dict[OpKey, _Count]) -> Any:
    """A higher-order op (torch.cond, torch.while_loop, flex_attention) reaches the mode whole, the mode popped: run
    it eagerly as torch does, with the mode on, so that the ATen ops it runs are counted. cond runs the branch its
    predicate picks, while_loop its body while its condition holds, any other its eager kernel (flex_attention's
    math over the full score matrix). One whose eager kernel refuses a mode runs unwatched, as a row of its own
    (``higher_order::<name>``) marked uncounted, its bytes those of its tensor arguments and results."""
    from torch._C import DispatchKey

    name = func.name()
    if name == "cond":
        pred, true_fn, false_fn, operands = args
        with mode:
            return (true_fn if bool(pred) else false_fn)(*operands)
    if name == "while_loop":
        cond_fn, body_fn, carried, additional = args
        with mode:
            while bool(cond_fn(*carried, *additional)):
                carried = tuple(body_fn(*carried, *additional))
        return carried
    kernel = func.py_kernels.get(DispatchKey.CompositeExplicitAutograd)
    if name not in HOPS_RUN_UNWATCHED and kernel is not None:
        with mode:
            return kernel(*args, **kwargs)
    out = func(*args, **kwargs)
    c = counts[f"higher_order::{name}", ()]
    c.calls += 1
    c.unsupported = True
    c.bytes_read += _nbytes(_tensors((args, kwargs)))
    c.bytes_written += _nbytes(_tensors(out))
    return out


# Higher-order ops whose eager kernel asserts that no dispatch mode is on (they run their own subgraphs): counted as
# uncounted rows of their own rather than failing the counting pass.
HOPS_RUN_UNWATCHED = frozenset({"scan", "map_impl", "associative_scan", "invoke_subgraph"})


def _is_python_subclass(cls: Any) -> bool:
    """A tensor type with a ``__torch_dispatch__`` of its own (torch.Tensor's and nn.Parameter's are disabled)."""
    import torch

    return getattr(cls, "__torch_dispatch__", torch._C._disabled_torch_dispatch_impl) is not (
        torch._C._disabled_torch_dispatch_impl
    )


def count_ops(step: Callable[[], Any]) -> dict[OpKey, _Count]:
    """Run ``step`` once under a dispatch mode; FLOPs and bytes of every ATen op, by profiler name and shapes."""
    if not callable(step):
        raise ProfileError(f"step={step!r} ({type(step).__name__}); expected a callable taking no arguments")
    try:  # a module's __call__ takes anything: its forward says what it needs
        inspect.signature(getattr(step, "forward", step)).bind()
    except ValueError:  # a builtin without a signature: called as it is
        pass
    except TypeError as e:
        raise ProfileError(f"step={getattr(step, '__qualname__', step)!r} needs arguments ({e}); expected a callable "
                           "taking no arguments (bind them: lambda: model(x))") from None
    from torch._ops import HigherOrderOperator
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[OpKey, _Count] = collections.defaultdict(_Count)

    class Counter(TorchDispatchMode):
        supports_higher_order_operators = True  # torch.cond, while_loop, flex_attention: _run_higher_order

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            if isinstance(func, HigherOrderOperator):
                return _run_higher_order(self, func, args, kwargs, counts)
            if any(_is_python_subclass(t) for t in types):
                # A tensor subclass with its own dispatch (a jagged nested tensor, a wrapper): let it run the op,
                # and count the ops it runs on its plain tensors (they reach this mode). Handled here, the op would
                # recurse: a composite decomposed for the subclass comes back to the mode whole.
                return NotImplemented
            if getattr(func, "_can_decompose", lambda: True)() and not has_flop_formula(func):
                # A composite op reaches the mode whole where autograd is off (inference_mode tensors):
                # count the ops it is made of, as it runs them and as torch's FlopCounterMode counts them.
                try:
                    with self:
                        decomposed = func.decompose(*args, **kwargs)
                except RuntimeError:
                    # Python decompositions know no ragged dims: a strided nested tensor's matmul (a jagged
                    # tensor's attention falls back to one) runs whole, counted by UNDECOMPOSED_FLOPS.
                    if not any(t.is_nested for t in _tensors((args, kwargs))):
                        raise
                    decomposed = NotImplemented
                if decomposed is not NotImplemented:
                    return decomposed
            out = func(*args, **kwargs)
            name = _profiler_name(func)
            ins = _tensors((args, kwargs))
            whole = counts[name, _arg_shapes(func, args, kwargs)]
            c = _Count()               # this call's counts: into the op's row, and its inputs' dtype's share of it
            c.calls += 1
            # an in-place op returning nothing: the arguments it writes
            outs = _tensors(out) or counting_bytes._written_arguments(func, args, kwargs)
            if not _moves_no_data(func, name, ins, outs):
                read, written = counting_bytes.op_bytes(func, args, kwargs, out, ins, outs)
                c.bytes_read += read
                c.bytes_written += written
            c.flops += _flops(func, args, kwargs, out)
            if str(func._overloadpacket) in VALUES_ONLY_CALLERS:
                c.mode_vector_flops.append(vectors_for_the_mode(func, args, kwargs, out))
            c.unsupported = c.unsupported or not (
                has_flop_formula(func) or str(func._overloadpacket) in UNDECOMPOSED_FLOPS or does_no_arithmetic(func)
            )
            c.dtype = _dtype(ins + outs)
            for into in (whole, whole.by_dtype.setdefault(_dtype(ins), _Count())):
                into.calls += c.calls
                into.flops += c.flops
                into.bytes_read += c.bytes_read
                into.bytes_written += c.bytes_written
                into.mode_vector_flops += c.mode_vector_flops
                into.unsupported = into.unsupported or c.unsupported
                into.dtype = into.dtype or c.dtype
            return out

    with _eager(), _call_tree() as tree, counting_compat.subclasses_built_unwatched(), Counter():
        step()
    _note_parents(counts, tree)
    for c in counts.values():
        if len(c.by_dtype) < 2:
            c.by_dtype = {}
    return dict(counts)


def split_by_dtype(counts: dict[OpKey, _Count]) -> dict[OpKey, _Count]:
    """``counts`` with each row an op ran at in several dtypes split into one row per dtype: the first dtype's under
    the op's key, each other's under its ``dtype_tagged`` name (events find theirs by ``event_key``)."""
    out: dict[OpKey, _Count] = {}
    for (name, shapes), c in counts.items():
        if not c.by_dtype:
            out[name, shapes] = c
            continue
        for k, (tag, part) in enumerate(c.by_dtype.items()):
            part = dataclasses.replace(part, parents=c.parents, mode_vector_flops=list(part.mode_vector_flops))
            out[(name if k == 0 else dtype_tagged(name, tag)), shapes] = part
    return out


@contextlib.contextmanager
def _call_tree() -> Any:
    """The profiler's event tree of the counted step, or None where a profiler is already running: it tells
    which composite op (``max_pool1d``) each counted op ran inside, for ops that plain eager runs differently."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch._C._autograd._profiler_enabled():  # the caller is profiling: a second session would end theirs
        yield None
        return
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    prof.__enter__()
    holder: list[Any] = [None]
    try:
        yield holder
    finally:
        prof.__exit__(None, None, None)
    holder[0] = call_tree.cpu_events(prof)  # prof.events() took 7x the counting pass itself (call_tree)


def _note_parents(counts: dict[OpKey, _Count], tree: Any) -> None:
    """Each counted op's enclosing ATen ops, nearest first, as the counting pass's profiler saw them; a
    VALUES_ONLY_CALLERS routine called from its values-only function loses the vectors eager does not form."""
    if not tree or tree[0] is None:
        return
    calls_seen: dict[OpKey, int] = collections.defaultdict(int)
    for e in sorted(tree[0], key=lambda e: e.time_range.start):
        key = (e.name, _event_shapes(e))
        c = counts.get(key)
        if c is None:
            continue
        parent = e.cpu_parent
        if c.mode_vector_flops and (parent is None or parent.name != e.name):  # the call, not its redispatch
            i = calls_seen[key]
            calls_seen[key] += 1
            caller = VALUES_ONLY_CALLERS["aten." + e.name.removeprefix("aten::")][0]
            if i < len(c.mode_vector_flops) and parent is not None and parent.name == caller:
                c.flops -= c.mode_vector_flops[i]
        if c.parents:
            continue
        parents, x = [], e.cpu_parent
        while x is not None:
            if x.name.startswith("aten::") and x.name != e.name:
                parents.append((x.name, _event_shapes(x)))
            x = x.cpu_parent
        c.parents = tuple(parents)


def _eager() -> Any:
    """Run torch.compile'd code eagerly while counting: compiled graphs hide their ops from a dispatch mode, and
    dynamo, meeting one, would otherwise fall back to eager for good (the timed steps too, and the caller's
    later calls). The timed steps run the compiled code; ops it fuses get no time of their own (``untimed``)."""
    import contextlib

    import torch

    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
