"""The counting pass of ``tilestack.perf.profile``: one step of a model under a ``TorchDispatchMode`` that sees
every ATen op, its FLOPs and bytes by op name and input shapes.

    counts = counting.count_ops(step)        # {(profiler name, input shapes): calls, FLOPs, bytes, dtype, ...}

FLOPs come from the formulas of ``torch.utils.flop_counter`` (matmuls, attention; causal attention halved as
tilestack counts it) or tilestack's own (convolutions forward and backward with their groups:
``formulas.convolution``; the CPU LSTM kernel, norms, softmax, reductions, scatters and accumulating index puts,
scans, selections and sorts (as compares), interpolation, losses, nn.Bilinear, weight norm, and 1 FLOP per element
of a pointwise op, tagged or not: hardswish, GLU, activations' backwards); bytes are the sizes of an op's distinct
input and output tensors (views move none, an expanded input is read as held, a lookup reads only its rows). A
composite op that reaches the mode whole (under ``inference_mode``) is counted as the ops it runs, as
``FlopCounterMode`` does; an op that computes but has no formula is marked ``unsupported`` (its FLOPs unknown, not
0), in any namespace (a ``torch.library`` custom op is counted whole). torch.compile'd code is counted eagerly
(``force_eager``). The profile joins these counts with the timed pass (``profile.profile_model``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tilestack.errors import TilestackError
from tilestack.perf import formulas

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
ALLOCATING_PREFIXES = ("empty", "new_empty", "zeros_like", "ones_like", "full_like", "resize_")


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


def _tensors(obj: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # a model's output record
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))
    return out


def _dense(t: Any) -> bool:
    """A plain strided tensor (not sparse, not nested): its shape and strides say what it holds."""
    import torch

    return t.layout == torch.strided and not t.is_nested


def _distinct_numel(t: Any) -> int:
    """Elements ``t`` holds in memory: an expanded (stride-0) dimension holds one, however long it looks."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride != 0 or size == 0 else 1
    return n


def _held_bytes(t: Any) -> int:
    """Bytes ``t`` holds: a dense tensor's distinct elements; a sparse one's indices and values; a nested one's
    buffer; 0 for a tensor whose memory cannot be read (a subclass without storage)."""
    if _dense(t):
        return _distinct_numel(t) * t.element_size()
    if t.is_sparse:  # COO
        return _held_bytes(t._indices()) + _held_bytes(t._values())
    parts = [getattr(t, name, None) for name in ("crow_indices", "ccol_indices", "row_indices", "col_indices")]
    parts = [p() for p in parts if p is not None and not t.is_nested]
    try:
        if parts:  # compressed sparse (CSR, CSC, BSR, BSC)
            return sum(_held_bytes(p) for p in parts) + _held_bytes(t.values())
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return 0


def _numel(t: Any) -> int:
    """Elements of ``t`` as its ops compute over them (a nested or sparse tensor's stored values)."""
    if _dense(t):
        return t.numel()
    try:
        return t.values().numel() if not t.is_sparse else t._values().numel()
    except (RuntimeError, NotImplementedError):
        return 0


def _nbytes(ts: Sequence[Any]) -> float:
    seen, total = set(), 0
    for t in ts:
        try:
            key = (t.data_ptr(), t.numel(), t.dtype) if _dense(t) and t.device.type != "meta" else id(t)
        except RuntimeError:  # no data pointer (a storage-less subclass)
            key = id(t)
        if key not in seen:
            seen.add(key)
            total += _held_bytes(t)
    return float(total)


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs of one ATen call: torch's registered formula, or tilestack's for the ops torch leaves out."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    own = OWN_FLOPS.get(str(packet))
    if own is not None:
        return own(func, args, kwargs, out)
    is_causal = _argument(func, args, kwargs, "is_causal")
    if packet in flop_registry:
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        if any(t.is_complex() for t in _tensors(args)):  # torch counts a complex multiply-add as a real one
            flops *= formulas.COMPLEX_MAC_OVER_REAL
        return flops * formulas.CAUSAL_FRACTION if is_causal else flops
    if str(packet) == "aten._scaled_dot_product_flash_attention_for_cpu":
        q, k, v = args[:3]
        return float(formulas.sdpa(q, k, v, causal=bool(is_causal)).flops)
    if str(packet) == "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        # torch's own count for its GPU flash backward (four matmuls), so a profile reads alike on both devices
        from torch.utils.flop_counter import sdpa_backward_flop_count

        d_out, q, k, v = args[:4]
        flops = float(sdpa_backward_flop_count(d_out.shape, q.shape, k.shape, v.shape))
        return flops * formulas.CAUSAL_FRACTION if is_causal else flops
    per_element = ROW_OP_FLOPS_PER_ELEMENT.get(str(packet))
    if per_element is not None and args and isinstance(args[0], torch.Tensor):
        return float(per_element * _numel(args[0]))
    tags = getattr(func, "tags", ())
    if str(packet).removeprefix("aten.").rstrip("_") in NO_ARITHMETIC:
        return 0.0  # a copy or a select, though torch tags some pointwise (clone, masked_fill)
    if torch.Tag.pointwise in tags:
        # 1 FLOP per output element, as torch's profiler; per real part of a complex one.
        return float(sum(_numel(t) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1)
                         for t in _tensors(out)))
    if torch.Tag.reduction in tags and args and isinstance(args[0], torch.Tensor):
        return float(_numel(args[0]))  # one add (or compare) per element folded in
    return 0.0


def has_flop_formula(func: Any) -> bool:
    """Whether :func:`_flops` counts ``func`` by a formula (a count of 0 from one is a true 0, e.g. batch 0)."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    name = str(packet)
    tags = getattr(func, "tags", ())
    return (
        name in OWN_FLOPS
        or packet in flop_registry
        or name in ROW_OP_FLOPS_PER_ELEMENT
        or name.startswith("aten._scaled_dot_product_flash_attention_for_cpu")
        or torch.Tag.pointwise in tags
        or torch.Tag.reduction in tags
    )


def does_no_arithmetic(func: Any) -> bool:
    """Views, allocations, copies, gathers, random draws: ops whose 0 FLOPs is the count, not a gap in it."""
    import torch

    name = str(func._overloadpacket).removeprefix("aten.")
    return (
        getattr(func, "is_view", False)
        or name.startswith(ALLOCATING_PREFIXES)
        or name.rstrip("_") in NO_ARITHMETIC
        or torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        or torch.Tag.view_copy in getattr(func, "tags", ())
        or torch.Tag.inplace_view in getattr(func, "tags", ())
    )


def _conv_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.convolution / aten._convolution: x (N, C_in, *S), w, bias -> y, counted by formulas.convolution."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w, b = arg("input"), arg("weight"), arg("bias")
    groups, transposed = int(arg("groups")), bool(arg("transposed"))
    cost = formulas.convolution(x.shape, w.shape, out.shape, groups=groups, transposed=transposed, bias=b is not None)
    return float(cost.flops)


def _conv_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.convolution_backward: (dy, x, w, ..., output_mask) -> (dx, dw, db), by formulas.convolution_backward.

    torch's own formula counts the weight gradient as if groups were 1 (groups times too many FLOPs).
    """
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    dx, dw, db = arg("output_mask")
    return float(
        formulas.convolution_backward(
            arg("grad_output").shape,
            arg("input").shape,
            arg("weight").shape,
            groups=int(arg("groups")),
            transposed=bool(arg("transposed")),
            input_grad=bool(dx),
            weight_grad=bool(dw),
            bias_grad=bool(db),
        ).flops
    )


def _rnn_layer_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.mkldnn_rnn_layer (CPU LSTM): one direction of one layer over the whole sequence.

    Each step multiplies the input by ``weight0`` (G*H, I) and the hidden state by ``weight1`` (G*H, H), G the
    gates (4 for an LSTM): ``2 * steps * batch * (numel(weight0) + numel(weight1))``, the matmuls that the
    unfused (packed) path runs as ``addmm``/``mm``; the gates' element-wise work is left out, as there.
    """
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w_ih, w_hh = arg("input"), arg("weight0"), arg("weight1")
    rows = x.numel() // x.shape[-1]  # steps x batch
    return float(formulas.FLOPS_PER_MAC * rows * (w_ih.numel() + w_hh.numel()))


def _rnn_layer_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.mkldnn_rnn_layer_backward: the input and the weight gradients, each the forward's matmuls."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w_ih, w_hh = arg("input"), arg("weight1"), arg("weight2")
    rows = x.numel() // x.shape[-1]
    return float(formulas.MATMUL_BWD_OVER_FWD * formulas.FLOPS_PER_MAC * rows * (w_ih.numel() + w_hh.numel()))


def _batch_norm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.native_batch_norm / aten._native_batch_norm_legit: with ``training`` the batch statistics too."""
    training = bool(_argument(func, args, kwargs, "training"))
    per_element = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT if training else formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT
    return float(per_element * _argument(func, args, kwargs, "input").numel())


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


def _window_flops(dims: int) -> Callable[[Any, tuple, dict, Any], float]:
    """A ``dims``-d max or average pool: one compare or add per tap of its window at each output element."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims  # an int given for every dim
        return float(taps * _numel(_tensors(out)[0]))

    return count


def _accumulate_flops(source: str) -> Callable[[Any, tuple, dict, Any], float]:
    """index_add / scatter_add / embedding's weight gradient: one add per element of ``source``."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t = _argument(func, args, kwargs, source)
        return float(_numel(t)) if t is not None else 0.0

    return count


def _embedding_bag_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._embedding_bag: each looked-up row (indices x dim) is added (or compared, mode max) into its bag,
    after a multiply by its per-sample weight where one is given."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    per_row = 1 + (arg("per_sample_weights") is not None)
    return float(per_row * arg("indices").numel() * arg("weight").shape[-1])


EMBEDDING_BAG_MEAN = 1  # the ``mode`` argument of aten._embedding_bag: 0 sum, 1 mean, 2 max


def _embedding_bag_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """The backward of an EmbeddingBag: each bag's gradient row added into the row of each of its indices, after
    a multiply by the per-sample weight or by 1/bag size (mode mean). The per-sample weights' own gradient is a
    dot product of the bag's gradient row with each looked-up row: a multiply-add per element."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    indices, grad = arg("indices"), arg("grad")
    scaled = "weights_backward" in str(func._overloadpacket) or arg("per_sample_weights") is not None or (
        arg("mode") == EMBEDDING_BAG_MEAN
    )
    return float((1 + scaled) * indices.numel() * grad.shape[-1])


def _per_element(name: str, flops_per_element: float) -> Callable[[Any, tuple, dict, Any], float]:
    """``flops_per_element`` for each element of argument ``name`` (a loss's input, whatever its reduction)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t = _argument(func, args, kwargs, name)
        return float(flops_per_element * _numel(t)) if t is not None else 0.0

    return count


def _elementwise_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """An element-wise op torch does not tag pointwise (hardswish, an activation's backward, GLU, PReLU):
    1 FLOP per element of its first output, as a tagged one is counted. Not of every output: a second output
    (log_sigmoid's buffer) holds intermediate values, not more results."""
    outs = _tensors(out)
    return float(_numel(outs[0])) if outs else 0.0


def _interpolation_flops(taps: int, *, backward: bool) -> Callable[[Any, tuple, dict, Any], float]:
    """Linear, bilinear, bicubic, trilinear upsampling: a multiply-add per tap at each element of the upsampled
    side (the output forward, dy backward)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        side = _argument(func, args, kwargs, "grad_output") if backward else _tensors(out)[0]
        return float(formulas.FLOPS_PER_MAC * taps * _numel(side))

    return count


def _no_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """Nearest-neighbour upsampling: a gather of input elements, no arithmetic (counted whole, not as the index
    computation its decomposition would show)."""
    return 0.0


def _grid_sample_flops(dims: int, *, backward: bool) -> Callable[[Any, tuple, dict, Any], float]:
    """grid_sampler_{2,3}d: a multiply-add per tap (``formulas.GRID_SAMPLE_TAPS``) at each output element; the
    backward does that once for the input's gradient and once for the grid's, each where ``output_mask`` asks."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        taps = formulas.GRID_SAMPLE_TAPS.get((dims, int(arg("interpolation_mode"))), 0)
        if not backward:
            return float(formulas.FLOPS_PER_MAC * taps * _numel(_tensors(out)[0]))
        gradients = sum(bool(m) for m in arg("output_mask"))
        return float(gradients * formulas.FLOPS_PER_MAC * taps * _numel(arg("grad_output")))

    return count


def _sort_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """sort (argsort and msort run it): a comparison sort of n elements along ``dim`` makes n * ceil(log2 n)
    compares, as a max reduction's compares are counted."""
    x = _argument(func, args, kwargs, "self")
    if x.dim() == 0:
        return 0.0
    n = x.shape[int(_argument(func, args, kwargs, "dim")) % x.dim()]
    return float(_numel(x) * math.ceil(math.log2(n))) if n > 1 else 0.0


def _affine_grid_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """affine_grid_generator: each output point (N, *S, d) is theta (d, d + 1) times its homogeneous base point."""
    grid = _tensors(out)[0]
    return float(formulas.FLOPS_PER_MAC * _numel(grid) * (grid.shape[-1] + 1))


def _trilinear_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._trilinear (nn.Bilinear and its backward): sum over ``sumdim`` of i1 * i2 * i3, each input
    unsqueezed at its ``expand`` dims; a multiply-add per element of the full broadcast product."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    full: list[int] = []
    for i in (1, 2, 3):
        shape = list(arg(f"i{i}").shape)
        for d in sorted(int(e) for e in arg(f"expand{i}")):
            shape.insert(d, 1)
        full = [max(a, b) for a, b in zip(full, shape, strict=True)] if full else shape
    return float(formulas.FLOPS_PER_MAC * math.prod(full))


def _matrix_vector_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """mv / addmv (M, N) @ (N,), dot / vdot (N,) . (N,), addr (M,) x (N,): a multiply-add per element of the
    matrix (the outer product's), as torch counts mm and addmm (a bias's add left out)."""
    matrix = max((t for t in _tensors((args, kwargs)) if t.dim() == 2), key=_numel, default=None)
    if matrix is not None:
        return float(formulas.FLOPS_PER_MAC * _numel(matrix))
    if str(func._overloadpacket) == "aten.addr":  # no matrix given? the product is vec1 x vec2
        v1, v2 = _argument(func, args, kwargs, "vec1"), _argument(func, args, kwargs, "vec2")
        return float(formulas.FLOPS_PER_MAC * _numel(v1) * _numel(v2))
    return float(formulas.FLOPS_PER_MAC * _numel(_tensors(args)[0]))  # dot: a multiply-add per element


def _trace_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """trace: the diagonal's elements added."""
    return float(min(_argument(func, args, kwargs, "self").shape, default=0))


def _factorization(kind: str, matrix: str, rhs: str | None = None) -> Callable[[Any, tuple, dict, Any], float]:
    """A dense linear-algebra routine on each matrix of the batch ``matrix`` (..., m, n), with the right-hand sides
    ``rhs`` (..., n, k) or (..., n) where it solves: ``formulas.factorization_flops``."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        a = arg(matrix)
        if a is None or a.dim() < 2:
            return 0.0
        m, n = a.shape[-2:]
        batch = _numel(a) // max(m * n, 1)
        k = 0
        if rhs is not None:
            b = arg(rhs)
            k = _numel(b) // max(batch * n, 1) if b is not None else 0  # columns per system (1 for a vector)
        mode = arg("mode")  # linalg_qr: "r" forms no Q
        vectors = bool(arg("compute_v") if arg("compute_v") is not None else arg("compute_uv")
                       if arg("compute_uv") is not None else mode != "r")
        full = bool(arg("full_matrices")) or mode == "complete"
        return float(batch * formulas.factorization_flops(kind, m, n, k, vectors=vectors, full=full))

    return count


def _packed_linear_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """quantized::linear* (dynamic or static int8, fp16): X (..., K) times the packed weight (N, K), 2*rows*N*K."""
    x, packed = _argument(func, args, kwargs, "X"), _argument(func, args, kwargs, "W_prepack")
    try:
        weight = packed.unpack()[0]
    except (AttributeError, RuntimeError):  # a packing this torch cannot unpack: the FLOPs are unknown
        return 0.0
    rows = _numel(x) // max(x.shape[-1], 1) if x.dim() else 0
    return float(formulas.FLOPS_PER_MAC * rows * weight.numel())


def _embedding_renorm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """embedding_renorm_ (nn.Embedding's max_norm): each looked-up row's norm, and its rescale."""
    table, indices = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "indices")
    return float(formulas.RENORM_FLOPS_PER_ELEMENT * _numel(indices) * (table.shape[-1] if table.dim() else 1))


def _index_put_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """index_put / index_put_: with ``accumulate`` one add per value put (an index backward, a histogram);
    without, a copy."""
    accumulate = bool(_argument(func, args, kwargs, "accumulate"))
    values = _argument(func, args, kwargs, "values")
    if values is None:  # put / put_: the values are ``source``
        values = _argument(func, args, kwargs, "source")
    return float(_numel(values)) if accumulate else 0.0


def _scatter_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """scatter / scatter_: with ``reduce`` ("add", "multiply") one operation per index; without, a copy."""
    if _argument(func, args, kwargs, "reduce") is None:
        return 0.0
    return float(_numel(_argument(func, args, kwargs, "index")))


def _cdist_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_cdist_forward / _cdist_backward: x1 (B, P, M), x2 (B, R, M): each of the B*P*R pairs over M features."""
    x1, x2 = _argument(func, args, kwargs, "x1"), _argument(func, args, kwargs, "x2")
    pairs = _numel(x1) // max(x1.shape[-1], 1) * x2.shape[-2]
    return float(formulas.CDIST_FLOPS_PER_TERM * pairs * x1.shape[-1])


def _avg_pool_backward_flops(dims: int) -> Callable[[Any, tuple, dict, Any], float]:
    """avg_poolNd_backward: each element of dy spread over its window's taps (one multiply-add per tap)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims
        return float(taps * _numel(_argument(func, args, kwargs, "grad_output")))

    return count


# Ops tilestack counts itself, ahead of torch's registry (whose convolution backward ignores groups) or where
# torch counts nothing.
OWN_FLOPS: dict[str, Callable[[Any, tuple, dict, Any], float]] = {
    "aten.convolution": _conv_flops,
    "aten._convolution": _conv_flops,
    "aten.convolution_backward": _conv_backward_flops,
    "aten.native_batch_norm": _batch_norm_flops,
    "aten._native_batch_norm_legit": _batch_norm_flops,
    "aten.native_layer_norm_backward": _norm_backward_flops,
    "aten.native_batch_norm_backward": _norm_backward_flops,
    "aten.native_group_norm_backward": _norm_backward_flops,
    "aten._fused_rms_norm_backward": _norm_backward_flops,
    "aten.mkldnn_rnn_layer": _rnn_layer_flops,
    "aten.mkldnn_rnn_layer_backward": _rnn_layer_backward_flops,
    "aten.index_add": _accumulate_flops("source"),
    "aten.index_add_": _accumulate_flops("source"),
    "aten.scatter_add": _accumulate_flops("src"),
    "aten.scatter_add_": _accumulate_flops("src"),
    "aten.scatter_reduce": _accumulate_flops("src"),
    "aten.scatter_reduce_": _accumulate_flops("src"),
    "aten.index_reduce": _accumulate_flops("source"),
    "aten.index_reduce_": _accumulate_flops("source"),
    "aten.embedding_dense_backward": _accumulate_flops("grad_output"),
    "aten._embedding_bag": _embedding_bag_flops,
    "aten._embedding_bag_forward_only": _embedding_bag_flops,
    "aten._embedding_bag_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_dense_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_per_sample_weights_backward": _embedding_bag_backward_flops,
    **{f"aten.{op}": _matrix_vector_flops for op in ("mv", "addmv", "addmv_", "dot", "vdot", "addr", "addr_")},
    "aten.trace": _trace_flops,
    "aten.embedding_renorm_": _embedding_renorm_flops,
    **{f"quantized.{op}": _packed_linear_flops for op in (
        "linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic", "linear_dynamic_fp16",
    )},
    "aten.linalg_cholesky_ex": _factorization("cholesky", "self"),
    "aten.linalg_lu_factor_ex": _factorization("lu", "A"),
    "aten._linalg_slogdet": _factorization("lu", "A"),
    "aten._linalg_det": _factorization("lu", "A"),
    "aten.linalg_inv_ex": _factorization("inverse", "A"),
    "aten._linalg_solve_ex": _factorization("solve", "A", "B"),
    "aten.linalg_solve_triangular": _factorization("triangular_solve", "self", "B"),
    "aten.cholesky_solve": _factorization("factored_solve", "input2", "self"),
    "aten.linalg_lu_solve": _factorization("factored_solve", "LU", "B"),
    "aten.linalg_qr": _factorization("qr", "A"),
    "aten._linalg_eigh": _factorization("eigh", "A"),
    "aten._linalg_svd": _factorization("svd", "A"),
    "aten.linalg_cross": _per_element("self", formulas.CROSS_FLOPS_PER_ELEMENT),
    "aten.renorm": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten.renorm_": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten.histc": _accumulate_flops("self"),  # each element binned: a count added
    "aten.segment_reduce": _accumulate_flops("data"),
    "aten.put": _index_put_flops,
    "aten.put_": _index_put_flops,
    "aten.index_put": _index_put_flops,
    "aten.index_put_": _index_put_flops,
    "aten._index_put_impl": _index_put_flops,
    "aten._index_put_impl_": _index_put_flops,
    "aten.scatter": _scatter_flops,
    "aten.scatter_": _scatter_flops,
    "aten.col2im": _accumulate_flops("self"),  # F.fold: every column element added into its pixel
    "aten.unfold_backward": _accumulate_flops("grad_in"),  # overlapping windows' gradients added
    "aten.bincount": _accumulate_flops("self"),
    "aten._trilinear": _trilinear_flops,
    "aten._cdist_forward": _cdist_flops,
    "aten._cdist_backward": _cdist_flops,
    "aten._weight_norm_interface": _per_element("v", formulas.WEIGHT_NORM_FLOPS_PER_ELEMENT),
    "aten._weight_norm_interface_backward": _per_element("saved_v", formulas.WEIGHT_NORM_BWD_FLOPS_PER_ELEMENT),
    "aten.mse_loss": _per_element("self", formulas.MSE_FLOPS_PER_ELEMENT),
    "aten.mse_loss_backward": _per_element("self", formulas.MSE_BWD_FLOPS_PER_ELEMENT),
    **{f"aten.{loss}": _per_element("self", formulas.SMOOTH_L1_FLOPS_PER_ELEMENT)
       for loss in ("smooth_l1_loss", "huber_loss")},
    **{f"aten.{loss}_backward": _per_element("self", formulas.SMOOTH_L1_BWD_FLOPS_PER_ELEMENT)
       for loss in ("smooth_l1_loss", "huber_loss")},
    "aten.binary_cross_entropy": _per_element("self", formulas.BCE_FLOPS_PER_ELEMENT),
    "aten.binary_cross_entropy_backward": _per_element("self", formulas.BCE_BWD_FLOPS_PER_ELEMENT),
    "aten.binary_cross_entropy_with_logits": _per_element("self", formulas.BCE_LOGITS_FLOPS_PER_ELEMENT),
    **{f"aten.{nll}": _per_element("target", formulas.NLL_FLOPS_PER_TARGET) for nll in (
        "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward",
    )},
    **{f"aten.upsample_{mode}": _interpolation_flops(taps, backward=False)
       for mode, taps in formulas.INTERPOLATION_TAPS.items()},
    **{f"aten.upsample_{mode}_backward": _interpolation_flops(taps, backward=True)
       for mode, taps in formulas.INTERPOLATION_TAPS.items()},
    **{f"aten.{prefix}upsample_nearest{tail}{d}d": _no_flops for prefix, tail in (("", ""), ("_", "_exact"))
       for d in (1, 2, 3)},
    # Gradient scatters: each element of dy added into the input element it came from (windows and copies
    # overlap, so these are adds, not a copy).
    **{f"aten.{prefix}upsample_nearest{tail}{d}d_backward": _accumulate_flops("grad_output")
       for prefix, tail in (("", ""), ("_", "_exact")) for d in (1, 2, 3)},
    **{f"aten.{op}": _accumulate_flops("grad_output") for op in (
        "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward", "adaptive_max_pool2d_backward",
        "adaptive_max_pool3d_backward",
    )},
    "aten.grid_sampler_2d": _grid_sample_flops(2, backward=False),
    "aten.grid_sampler_3d": _grid_sample_flops(3, backward=False),
    "aten.grid_sampler_2d_backward": _grid_sample_flops(2, backward=True),
    "aten.grid_sampler_3d_backward": _grid_sample_flops(3, backward=True),
    "aten.affine_grid_generator": _affine_grid_flops,
    # Element-wise ops torch leaves untagged: 1 FLOP per output element, as the tagged ones.
    **{f"aten.{op}": _elementwise_flops for op in (
        "hardswish", "hardswish_", "hardswish_backward", "hardsigmoid_backward", "hardtanh_backward",
        "leaky_relu_backward", "elu_backward", "softplus_backward", "softshrink_backward", "hardshrink_backward",
        "log_sigmoid_forward", "log_sigmoid_backward", "rrelu_with_noise_backward", "_prelu_kernel",
        "_prelu_kernel_backward", "glu", "glu_backward", "floor_divide", "floor_divide_", "rrelu_with_noise",
        "rrelu_with_noise_",
    )},
    # Selections: one compare per element (as a max reduction's); a sort n log2 n per row.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("topk", "kthvalue", "median", "nanmedian", "mode")},
    "aten.sort": _sort_flops,
    # Scans: one combine (add, multiply, compare, log-add-exp) per element.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{f"aten.{op}{d}d{tail}": _window_flops(d) for op in ("max_pool", "avg_pool") for d in (1, 2, 3)
       for tail in (("", "_with_indices") if op == "max_pool" else ("",))},
    **{f"aten.avg_pool{d}d_backward": _avg_pool_backward_flops(d) for d in (2, 3)},
    # Adaptive pools fold every input element into one output (compare or add); an average pool's backward
    # spreads each output's gradient back over those elements.
    **{f"aten.{op}": _accumulate_flops("self") for op in (
        "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "adaptive_max_pool3d", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    )},
    # Padding's backward adds the gradients of the copied border back into the elements they came from.
    **{f"aten.{kind}_pad{d}d_backward": _accumulate_flops("grad_output")
       for kind in ("reflection", "replication") for d in (1, 2, 3)},
}
# Ops whose 0 FLOPs is the count (data movement, bookkeeping); any other op with no formula is reported as
# uncounted (``ModelProfile.unsupported``), not shown as free. Names without ``aten.`` and a trailing ``_``.
NO_ARITHMETIC = frozenset(
    {
        "copy", "clone", "_to_copy", "contiguous", "cat", "stack", "index", "_unsafe_index", "index_select",
        "gather", "embedding", "masked_scatter", "masked_select",
        "nonzero", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad2d", "repeat",
        "repeat_interleave", "flip", "roll", "tril", "triu", "slice_scatter", "select_scatter", "as_strided_scatter",
        "diagonal_scatter", "fill", "zero", "lift_fresh", "lift_fresh_copy", "detach", "_local_scalar_dense",
        "item", "is_nonzero", "equal", "unique", "_unique2", "arange", "full",
        "scalar_tensor", "zeros", "ones", "eye", "_pack_padded_sequence", "_pad_packed_sequence", "set",
        "_unsafe_view", "split_with_sizes_copy", "unbind_copy", "resize", "new_zeros", "new_ones", "new_full",
        "_assert_async", "_assert_tensor_metadata", "sym_constrain_range_for_size", "_efficientzerotensor",
        "_to_dense", "record_stream", "alias", "unfold", "im2col",
        "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
        "_reshape_alias", "expand_copy", "permute_copy", "split", "unsafe_split", "chunk", "narrow_copy",
        "_pin_memory", "bucketize", "masked_fill", "transpose", "select_backward",
        "slice_backward", "index_backward", "expand_backward", "_linalg_check_errors", "searchsorted",
        "index_fill", "index_copy", "take", "rot90", "diag_embed",
        "one_hot", "tril_indices", "triu_indices", "linspace", "masked_scatter_backward",
    }
)


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else a.default_value)
    return None


def _dtype(ts: Sequence[Any]) -> str:
    for t in ts:
        if t.is_floating_point():
            try:
                return formulas.dtype_name(t.dtype)
            except Exception:
                continue
    return ""


def _profiler_name(func: Any) -> str:
    ns, _, name = str(func._overloadpacket).partition(".")
    return f"{ns}::{name}"


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (sparse, some subclasses)
        return id(t)


def _moves_no_data(func: Any, name: str, ins: Sequence[Any], outs: Sequence[Any]) -> bool:
    """Views and aliases (their outputs share the inputs' storage) and allocations move no bytes."""
    if getattr(func, "is_view", False) or name.removeprefix("aten::").startswith(ALLOCATING_PREFIXES):
        return True
    # In-place ops and out= variants write into an argument: that argument is their output, and moves.
    writes = name.endswith("_") or any(
        a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments
    )
    return not writes and bool(outs) and {_storage(t) for t in outs} <= {_storage(t) for t in ins}


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
}


def _gathered_bytes(func: Any, args: tuple, kwargs: dict, table_arg: str, index_arg: str) -> float:
    """Bytes a lookup reads: its index, and one row of the table per index (at most the whole table), plus
    every other tensor argument (offsets, per-sample weights)."""
    table, index = _argument(func, args, kwargs, table_arg), _argument(func, args, kwargs, index_arg)
    others = [t for t in _tensors((args, kwargs)) if t is not table and t is not index]
    if table_arg == "self":  # index_select: whole slices along dim
        dim = int(_argument(func, args, kwargs, "dim")) % max(table.dim(), 1)
        row = table.numel() // max(table.shape[dim], 1) if table.dim() else 1
    else:
        row = table.shape[-1] if table.dim() else 1
    rows = min(index.numel() * row, table.numel())
    return rows * table.element_size() + _nbytes([index]) + _nbytes(others)


def _packed_bytes(obj: Any) -> float:
    """Bytes of the packed weights among an op's arguments (quantized::linear's LinearPackedParamsBase: a script
    object, no tensor, whose weight and bias are read all the same)."""
    import torch

    total, stack = 0.0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, torch.ScriptObject) and hasattr(x, "unpack"):
            try:
                total += _nbytes([t for t in _tensors(x.unpack()) if t.layout == torch.strided])
            except (RuntimeError, AttributeError):  # a packing this torch cannot unpack: its bytes are unknown
                continue
    return total


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


def count_ops(step: Callable[[], Any]) -> dict[OpKey, _Count]:
    """Run ``step`` once under a dispatch mode; FLOPs and bytes of every ATen op, by profiler name and shapes."""
    if not callable(step):
        raise ProfileError(f"step={step!r} ({type(step).__name__}); expected a callable taking no arguments")
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[OpKey, _Count] = collections.defaultdict(_Count)

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "_can_decompose", lambda: True)() and not has_flop_formula(func):
                # A composite op reaches the mode whole where autograd is off (inference_mode tensors):
                # count the ops it is made of, as it runs them and as torch's FlopCounterMode counts them.
                with self:
                    decomposed = func.decompose(*args, **kwargs)
                if decomposed is not NotImplemented:
                    return decomposed
            out = func(*args, **kwargs)
            name = _profiler_name(func)
            c = counts[name, _arg_shapes(func, args, kwargs)]
            c.calls += 1
            ins, outs = _tensors((args, kwargs)), _tensors(out)
            if not _moves_no_data(func, name, ins, outs):
                ins = [t for t in ins if not any(t is o for o in _out_arguments(func, kwargs))]  # written, not read
                gathered = GATHERS.get(str(func._overloadpacket))
                c.bytes_read += _nbytes(ins) if gathered is None else _gathered_bytes(func, args, kwargs, *gathered)
                c.bytes_read += _packed_bytes((args, kwargs))
                c.bytes_written += _nbytes(outs)
            c.flops += _flops(func, args, kwargs, out)
            c.unsupported = c.unsupported or not (has_flop_formula(func) or does_no_arithmetic(func))
            c.dtype = c.dtype or _dtype(ins + outs)
            return out

    with _eager(), _call_tree() as tree, Counter():
        step()
    _note_parents(counts, tree)
    return dict(counts)


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
    holder[0] = prof.events()


def _note_parents(counts: dict[OpKey, _Count], tree: Any) -> None:
    """Each counted op's enclosing ATen ops, nearest first, as the counting pass's profiler saw them."""
    if not tree or tree[0] is None:
        return
    for e in tree[0]:
        key = (e.name, _event_shapes(e))
        c = counts.get(key)
        if c is None or c.parents:
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
