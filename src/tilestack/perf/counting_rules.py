"""The FLOP rules of the counting pass (``tilestack.perf.counting``) for neural-network layers: one function per
op family, and the table ``LAYER_FLOPS`` naming the ATen ops each counts.

    rule = LAYER_FLOPS["aten.convolution"]
    rule(func, args, kwargs, out)          # FLOPs of one call, from its arguments and result

Families: convolutions (with their groups, forward and backward), the CPU LSTM kernel, batch, layer, group and RMS
norms' backwards, pools (windowed, adaptive with their overlapping windows, fractional), interpolation and grid
sampling, embeddings and bags, scatters and accumulating index puts, selections and sorts (as compares), scans,
statistics (variance, log-sum-exp, vector norms), losses (regression, cross-entropy, margin, CTC), statically
quantized convolutions, fake quantization (quantization-aware training's observers and quantizers), foreach ops
(``foreach_flops``, matched by prefix) and the element-wise ops torch leaves untagged. Matmul-like and linear-algebra
ops are ``counting_linalg``'s. Conventions are ``formulas``': a multiply-add is 2 FLOPs, a transcendental 1.
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


def _window_flops(dims: int) -> Rule:
    """A ``dims``-d max or average pool: one compare or add per tap of its window at each output element."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims  # an int given for every dim
        return float(taps * _numel(_tensors(out)[0]))

    return count


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


def bag_entries(func: Any, args: tuple, kwargs: dict) -> int:
    """Indices an EmbeddingBag op (or an embedding's backward) looks up: those that are not its ``padding_idx`` (the
    kernels skip those entries: a row padded to a fixed length with the padding index adds nothing for them)."""
    indices, padding = _argument(func, args, kwargs, "indices"), _argument(func, args, kwargs, "padding_idx")
    if padding is None or padding < 0 or indices.device.type == "meta":  # -1: none; meta: no values to compare
        return indices.numel()
    return int((indices != padding).sum())


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


def _embedding_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """embedding_dense_backward: each looked-up token's gradient row added into its row of the table, but for the
    tokens at ``padding_idx`` (nn.Embedding(padding_idx=...): a padded batch's pad tokens add nothing)."""
    return float(bag_entries(func, args, kwargs) * _argument(func, args, kwargs, "grad_output").shape[-1])


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
    a multiply by the per-sample weight or by 1/bag size (mode mean). The per-sample weights' own gradient is a dot
    product of the bag's gradient row with each looked-up row: a multiply-add per element."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    grad = arg("grad")
    if arg("mode") == EMBEDDING_BAG_MAX and "weights_backward" not in str(func._overloadpacket):
        # Mode max: each bag's gradient goes to the one entry that held its maximum, per column (an index_add of
        # max_indices), so a non-empty bag adds one row, however many entries it has (round 12: bags of 50 entries
        # were counted 50 adds per column).
        bag_size = arg("bag_size")
        bags = grad.shape[0] if bag_size is None or bag_size.device.type == "meta" else int((bag_size != 0).sum())
        return float(bags * grad.shape[-1])
    scaled = "weights_backward" in str(func._overloadpacket) or arg("per_sample_weights") is not None or (
        arg("mode") == EMBEDDING_BAG_MEAN
    )
    return float((1 + scaled) * bag_entries(func, args, kwargs) * grad.shape[-1])


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


def _per_element(name: str, flops_per_element: float) -> Rule:
    """``flops_per_element`` for each element of argument ``name`` (a loss's input, whatever its reduction), each part
    of a complex one (profiler round 20: a complex variance was counted as a real one of as many elements)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        t = _argument(func, args, kwargs, name)
        if t is None:
            return 0.0
        return float(flops_per_element * _numel(t) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1))

    return count


def _allclose_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """allclose(a, b): isclose over the broadcast of a and b, and the all() of its answers; a kernel below the
    dispatch mode, so its isclose never reached the counting pass as the ops it runs (profiler round 16: a solver
    stopping on allclose showed the op uncounted)."""
    import torch

    a, b = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "other")
    elements = math.prod(torch.broadcast_shapes(a.shape, b.shape))
    return float(formulas.ALLCLOSE_FLOPS_PER_ELEMENT * elements)


def _elementwise_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """An element-wise op torch does not tag pointwise (hardswish, an activation's backward, GLU, PReLU):
    1 FLOP per element of its first output, as a tagged one is counted. Not of every output: a second output
    (log_sigmoid's buffer) holds intermediate values, not more results."""
    outs = _tensors(out)
    return float(_numel(outs[0])) if outs else 0.0


def _interpolation_flops(taps: int, *, backward: bool) -> Rule:
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


def _grid_sample_flops(dims: int, *, backward: bool) -> Rule:
    """grid_sampler_{2,3}d: a multiply-add per tap (``formulas.GRID_SAMPLE_TAPS``) at each output element; the
    backward does that once for the input's gradient and once for the grid's, each where ``output_mask`` asks.
    Nearest sampling (no taps) gathers: its backward adds each element of dy into the input element it came from
    (one add each, as nearest upsampling's backward), and its grid's gradient is zeros (profiler round 20: the
    input gradient's adds were counted 0)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        taps = formulas.GRID_SAMPLE_TAPS.get((dims, int(arg("interpolation_mode"))), 0)
        if not backward:
            return float(formulas.FLOPS_PER_MAC * taps * _numel(_tensors(out)[0]))
        input_grad, grid_grad = (bool(m) for m in arg("output_mask"))
        if taps == 0:
            return float(_numel(arg("grad_output")) if input_grad else 0)
        return float((input_grad + grid_grad) * formulas.FLOPS_PER_MAC * taps * _numel(arg("grad_output")))

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


def _avg_pool_backward_flops(dims: int) -> Rule:
    """avg_poolNd_backward: each element of dy spread over its window's taps (one multiply-add per tap)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims
        return float(taps * _numel(_argument(func, args, kwargs, "grad_output")))

    return count


# Ops tilestack counts itself, ahead of torch's registry (whose convolution backward ignores groups) or where
# torch counts nothing.


def _adaptive_taps(size_in: int, size_out: int) -> int:
    """Elements in all windows of an adaptive pool along one dim: window o is [floor(o I / O), ceil((o+1) I / O))."""
    return sum(-(-(o + 1) * size_in // size_out) - o * size_in // size_out for o in range(size_out))


def _adaptive_pool_flops(dims: int, *, backward: bool = False) -> Rule:
    """An adaptive ``dims``-d average or max pool: one add or compare per element of each output's window (its
    backward one multiply-add per element of each window, spreading the output's gradient)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        x = _argument(func, args, kwargs, "self")
        y = _argument(func, args, kwargs, "grad_output") if backward else _tensors(out)[0]
        if x.dim() < dims or y.dim() < dims:
            return 0.0
        planes = _numel(x) // max(math.prod(x.shape[-dims:]), 1)
        windows = math.prod(_adaptive_taps(i, o) for i, o in zip(x.shape[-dims:], y.shape[-dims:], strict=True))
        return float(planes * windows)

    return count


def _vector_norm_flops(order: str, *, subtract: bool = False) -> Rule:
    """linalg_vector_norm, norm, dist: per element, a square or abs and an accumulate (and a power for an order
    other than 0, 1, 2 or inf); dist subtracts its two inputs first."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        p = _argument(func, args, kwargs, order)
        p = 2 if p is None else float(p)
        per_element = (formulas.NORM_FLOPS_PER_ELEMENT if p in formulas.NORM_CHEAP_ORDERS
                       else formulas.NORM_POWER_FLOPS_PER_ELEMENT) + subtract
        x = max(_tensors(args), key=_numel)
        # a complex element's square or modulus takes both parts (profiler round 20: counted as one real element)
        return float(per_element * _numel(x) * (formulas.COMPLEX_ELEMENT_OVER_REAL if x.is_complex() else 1))

    return count


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


def _antialiased_flops(taps_per_dim: int, *, backward: bool) -> Rule:
    """_upsample_{bilinear,bicubic}2d_aa: as its plain twin, a multiply-add per tap at each element of the output
    side, but a downsampling filter's support widens by the scale: ``taps_per_dim * max(in / out, 1)`` input
    elements per dim (rounded up), so upsampling costs what the plain mode does."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        if backward:
            side, size_in = arg("grad_output"), list(arg("input_size"))[-2:]
        else:
            side = _tensors(out)[0]
            size_in = list((arg("self") if arg("self") is not None else arg("input")).shape[-2:])
        taps = math.prod(math.ceil(taps_per_dim * max(i / max(o, 1), 1.0))
                         for i, o in zip(size_in, side.shape[-2:], strict=True))
        return float(formulas.FLOPS_PER_MAC * taps * _numel(side))

    return count


def _search_flops(sequence: str, values: str) -> Rule:
    """searchsorted / bucketize: a binary search of each value in its sorted sequence of n boundaries, ceil(log2(n +
    1)) compares, as a sort's compares are counted."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        boundaries, x = _argument(func, args, kwargs, sequence), _argument(func, args, kwargs, values)
        n = boundaries.shape[-1] if boundaries.dim() else 1
        return float((_numel(x) if hasattr(x, "dim") else 1) * math.ceil(math.log2(n + 1)))

    return count


def _sorted_compares(n: int) -> int:
    """Compares of a comparison sort of ``n`` elements, n * ceil(log2 n), as ``_sort_flops`` counts a row."""
    return n * math.ceil(math.log2(n)) if n > 1 else 0


def _round_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """torch.round: one per element; to ``decimals`` places a scale, the round and the unscale (profiler round 21:
    quantization-style rounding to 2 places was counted as a plain round)."""
    decimals = _argument(func, args, kwargs, "decimals")
    per_element = formulas.ROUND_DECIMALS_FLOPS_PER_ELEMENT if decimals else 1
    return float(per_element * _numel(_tensors(out)[0]))


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


def _segment_reduce_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_segment_reduce_backward: each element of ``data`` gets its segment's gradient, copied (sum: 0), divided by the
    segment's length (mean), kept where it equals the segment's extreme (max, min: a compare) or times the
    segment's product over the element (prod): ``formulas.SEGMENT_BWD_FLOPS_PER_ELEMENT``."""
    data, reduce = _argument(func, args, kwargs, "data"), str(_argument(func, args, kwargs, "reduce"))
    return float(formulas.SEGMENT_BWD_FLOPS_PER_ELEMENT.get(reduce, 1) * _numel(data))


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


def _conv_tbc_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """conv_tbc: x (T, B, C_in) * w (K, C_in, C_out) -> y (T', B, C_out): a multiply-add per weight element per
    output position and batch entry, plus the bias's add per output element."""
    w, y = _argument(func, args, kwargs, "weight"), _tensors(out)[0]
    positions = _numel(y) // max(y.shape[-1], 1)  # T' x B
    return float(formulas.FLOPS_PER_MAC * positions * _numel(w) + _numel(y))

def _fused_observer_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_fused_moving_avg_obs_fq_helper (QAT's FusedMovingAvgObsFakeQuantize): where ``observer_on`` holds, a min-max
    pass over the input (per tensor or per channel); where ``fake_quant_on`` holds, its fake quantization. (The
    moving averages and the scale and zero point, a few values per channel, are left out.)"""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    per_element = (formulas.OBSERVER_FLOPS_PER_ELEMENT if bool(arg("observer_on").any()) else 0) + (
        formulas.FAKE_QUANT_FLOPS_PER_ELEMENT if bool(arg("fake_quant_on").any()) else 0)
    return float(per_element * _numel(arg("self")))


def _packed_conv_flops(*, fused_relu: bool) -> Rule:
    """quantized::conv{1,2,3}d(_relu), conv_transpose{1,2,3}d (static int8): the packed weight (a script object)
    unpacked for its shape and bias, groups and transposition read off it, counted by formulas.convolution; a fused
    ReLU adds one FLOP per output element, as a separate one would count. (Requantising the output is left out,
    as a float convolution's dtype is.)"""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        x = _argument(func, args, kwargs, "qx")
        packed = _argument(func, args, kwargs, "weight")
        if packed is None:
            packed = _argument(func, args, kwargs, "packed_weight")
        try:
            weight, bias = packed.unpack()
            groups, transposed = int(packed.groups()), bool(packed.transpose())
        except (AttributeError, RuntimeError):  # a packing this torch cannot open: the FLOPs are unknown
            return 0.0
        y = _tensors(out)[0]
        cost = formulas.convolution(x.shape, weight.shape, y.shape, groups=groups, transposed=transposed,
                                    bias=bias is not None)
        return float(cost.flops + (_numel(y) if fused_relu else 0))

    return count


FOREACH_PREFIX = "aten._foreach_"
FOREACH_NO_ARITHMETIC = ("copy", "zero")  # names after the prefix, without a trailing ``_``


def foreach_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """A foreach op (``_foreach_add_``, ``_foreach_norm``: an optimizer's or a meta-learner's update over a list of
    tensors): its single-tensor twin over each tensor of ``self``, 1 FLOP per element (2 per complex one) as a
    pointwise op is counted; a norm a vector norm's FLOPs per element; a copy or zero none."""
    base = str(func._overloadpacket).removeprefix(FOREACH_PREFIX).rstrip("_")
    if base in FOREACH_NO_ARITHMETIC:
        return 0.0
    tensors = _tensors(_argument(func, args, kwargs, "self")) or _tensors(out)  # pow's self may be a scalar
    if base == "norm":
        p = _argument(func, args, kwargs, "ord")
        per_element = (formulas.NORM_FLOPS_PER_ELEMENT if (2 if p is None else float(p)) in formulas.NORM_CHEAP_ORDERS
                       else formulas.NORM_POWER_FLOPS_PER_ELEMENT)
        return float(per_element * sum(_numel(t) for t in tensors))
    return float(sum(_numel(t) * (formulas.COMPLEX_ELEMENT_OVER_REAL if t.is_complex() else 1) for t in tensors))


# Ops counted here, ahead of torch's registry (whose convolution backward ignores groups) or where torch counts
# nothing.
LAYER_FLOPS: dict[str, Rule] = {
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
    "aten.scatter_add": _reduce_into_flops("src", "index"),
    "aten.scatter_add_": _reduce_into_flops("src", "index"),
    "aten.scatter_reduce": _reduce_into_flops("src", "index"),
    "aten.scatter_reduce_": _reduce_into_flops("src", "index"),
    "aten.index_reduce": _reduce_into_flops("source", "source"),
    "aten.index_reduce_": _reduce_into_flops("source", "source"),
    "aten.embedding_dense_backward": _embedding_backward_flops,
    "aten._embedding_bag": _embedding_bag_flops,
    "aten._embedding_bag_forward_only": _embedding_bag_flops,
    "aten._embedding_bag_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_dense_backward": _embedding_bag_backward_flops,
    "aten._embedding_bag_per_sample_weights_backward": _embedding_bag_backward_flops,
    "aten.embedding_renorm_": _embedding_renorm_flops,
    "aten.linalg_cross": _per_element("self", formulas.CROSS_FLOPS_PER_ELEMENT),
    "aten.renorm": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten.renorm_": _per_element("self", formulas.RENORM_FLOPS_PER_ELEMENT),
    "aten.histc": _accumulate_flops("self"),  # each element binned: a count added
    "aten.segment_reduce": _accumulate_flops("data"),
    "aten._segment_reduce_backward": _segment_reduce_backward_flops,
    "aten.isin": _isin_flops,
    **{f"aten.{op}": _unique_flops for op in ("_unique", "_unique2", "unique_consecutive", "unique_dim",
                                              "unique_dim_consecutive")},
    "aten.round": _round_flops,
    "aten.round_": _round_flops,
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
    "aten._coalesce": _accumulate_flops("self"),  # a sparse COO tensor's duplicate entries summed: an add per value
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
    **{f"aten.{nll}": _nll_flops for nll in (
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
        "adaptive_max_pool3d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
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
        "rrelu_with_noise_", "_standard_gamma_grad", "_dirichlet_grad",  # rsample's reparameterised gradients
    )},
    # Selections: one compare per element (as a max reduction's); a sort n log2 n per row.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("topk", "kthvalue", "median", "nanmedian", "mode")},
    "aten.sort": _sort_flops,
    # Scans: one combine (add, multiply, compare, log-add-exp) per element.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{f"aten.{op}{d}d{tail}": _window_flops(d) for op in ("max_pool", "avg_pool") for d in (1, 2, 3)
       for tail in (("", "_with_indices") if op == "max_pool" else ("",))},
    **{f"aten.avg_pool{d}d_backward": _avg_pool_backward_flops(d) for d in (2, 3)},
    # Adaptive pools fold each window into its output (compare or add); windows overlap where the input's size is
    # no multiple of the output's. An average pool's backward spreads each output's gradient back over its window.
    **{f"aten.{op}{d}d": _adaptive_pool_flops(d) for op in ("adaptive_avg_pool", "_adaptive_avg_pool",
                                                           "adaptive_max_pool") for d in (1, 2, 3)},
    **{f"aten._adaptive_avg_pool{d}d_backward": _adaptive_pool_flops(d, backward=True) for d in (2, 3)},
    **{f"aten.fractional_max_pool{d}d": _window_flops(d) for d in (2, 3)},
    # Padding's backward adds the gradients of the copied border back into the elements they came from.
    **{f"aten.{kind}_pad{d}d_backward": _accumulate_flops("grad_output")
       for kind in ("reflection", "replication") for d in (1, 2, 3)},
    # Statistics: per element folded in (formulas.VARIANCE_FLOPS_PER_ELEMENT and kin), not one add apiece.
    **{f"aten.{op}": _per_element("self", formulas.VARIANCE_FLOPS_PER_ELEMENT)
       for op in ("var", "std", "var_mean", "std_mean")},
    "aten.logsumexp": _per_element("self", formulas.LOGSUMEXP_FLOPS_PER_ELEMENT),
    "aten.linalg_vector_norm": _vector_norm_flops("ord"),
    "aten.norm": _vector_norm_flops("p"),
    "aten.dist": _vector_norm_flops("p", subtract=True),
    # Losses with a formula per element, per margin term or per CTC state.
    "aten.soft_margin_loss": _per_element("self", formulas.SOFT_MARGIN_FLOPS_PER_ELEMENT),
    "aten.soft_margin_loss_backward": _per_element("self", formulas.SOFT_MARGIN_BWD_FLOPS_PER_ELEMENT),
    "aten.multi_margin_loss": _multi_margin_flops(formulas.MARGIN_FLOPS_PER_TERM),
    "aten.multi_margin_loss_backward": _multi_margin_flops(formulas.MARGIN_BWD_FLOPS_PER_TERM),
    "aten.multilabel_margin_loss_forward": _multilabel_margin_flops(formulas.MARGIN_FLOPS_PER_TERM),
    "aten.multilabel_margin_loss_backward": _multilabel_margin_flops(formulas.MARGIN_BWD_FLOPS_PER_TERM),
    "aten._ctc_loss": _ctc_flops(backward=False),
    "aten._ctc_loss_backward": _ctc_flops(backward=True),
    "aten.conv_tbc": _conv_tbc_flops,
    **{f"aten._upsample_{mode}2d_aa{tail}": _antialiased_flops(taps, backward=bool(tail))
       for mode, taps in (("bilinear", 2), ("bicubic", 4)) for tail in ("", "_backward")},
    "aten.histogram": _accumulate_flops("self"),  # each element binned, as histc
    **{f"aten._histogramdd_{step}": _histogramdd_flops for step in ("bin_edges", "from_bin_cts", "from_bin_tensors")},
    "aten.searchsorted": _search_flops("sorted_sequence", "self"),
    "aten.bucketize": _search_flops("boundaries", "self"),
    # Statically quantized convolutions (packed weights), and quantizing / dequantizing: a scale and a round (or
    # a shift and a scale) per element, counted as one element-wise op.
    **{f"quantized.{op}{d}d{tail}": _packed_conv_flops(fused_relu=bool(tail))
       for op in ("conv", "conv_transpose") for d in (1, 2, 3) for tail in ("", "_relu") if op == "conv" or not tail},
    **{f"aten.{op}": _elementwise_flops for op in (
        "quantize_per_tensor", "quantize_per_tensor_dynamic", "quantize_per_channel", "dequantize",
    )},
    # Sparse COO softmax and sum: per stored element, as their dense twins per element.
    **{f"aten.{op}": _per_element("self", formulas.SOFTMAX_FLOPS_PER_ELEMENT)
       for op in ("_sparse_softmax", "_sparse_log_softmax")},
    **{f"aten.{op}": _per_element("output", formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT)
       for op in ("_sparse_softmax_backward_data", "_sparse_log_softmax_backward_data")},
    "aten._sparse_sum": _accumulate_flops("self"),
    "aten.allclose": _allclose_flops,
    # All / any of a tensor (torch.distributions' argument checks): one compare per element, as a reduction.
    **{f"aten.{op}": _accumulate_flops("self") for op in ("_is_all_true", "_is_any_true")},
    # Fake quantization (quantization-aware training): a quantize and a dequantize per element; the fused observer
    # a min-max pass too; a learnable quantizer's backward the gradients of the input, scale and zero point.
    **{f"aten.{op}": _per_element("self", formulas.FAKE_QUANT_FLOPS_PER_ELEMENT) for op in (
        "fake_quantize_per_tensor_affine", "fake_quantize_per_tensor_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", "fake_quantize_per_channel_affine",
        "fake_quantize_per_channel_affine_cachemask", "_fake_quantize_learnable_per_tensor_affine",
        "_fake_quantize_learnable_per_channel_affine",
    )},
    **{f"aten._fake_quantize_learnable_per_{kind}_affine_backward": _per_element(
        "self", formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT) for kind in ("tensor", "channel")},
    "aten._fused_moving_avg_obs_fq_helper": _fused_observer_flops,
    # Window functions: a cosine (and its scaling) per element, as an element-wise op.
    **{f"aten.{w}_window": _elementwise_flops for w in ("hann", "hamming", "blackman", "bartlett", "kaiser")},
    # base ** (start + i * step): a power per element, as an element-wise op (profiler round 20: uncounted; linspace
    # and arange, which take no power, stay copies)
    "aten.logspace": _elementwise_flops,
}
