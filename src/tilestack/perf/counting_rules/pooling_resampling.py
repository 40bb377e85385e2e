"""FLOP rules of pools (windowed, adaptive with their overlapping windows, fractional) and their backwards,
interpolation (plain and antialiased), grid sampling and affine grids, fold and unfold's backward, padding's
backward.
"""

from __future__ import annotations

import math
from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import Rule, _accumulate_flops, _argument, _numel, _tensors


def _window_flops(dims: int) -> Rule:
    """A ``dims``-d max or average pool: one compare or add per tap of its window at each output element."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims  # an int given for every dim
        return float(taps * _numel(_tensors(out)[0]))

    return count


def _avg_pool_backward_flops(dims: int) -> Rule:
    """avg_poolNd_backward: each element of dy spread over its window's taps (one multiply-add per tap)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        kernel = [int(k) for k in _argument(func, args, kwargs, "kernel_size")]
        taps = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims
        return float(taps * _numel(_argument(func, args, kwargs, "grad_output")))

    return count


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


def _cudnn_grid_sample_flops(*, backward: bool) -> Rule:
    """cudnn_grid_sampler (F.grid_sample on a GPU where cuDNN takes it: 4-D, bilinear, zeros padding, align_corners)
    as grid_sampler_2d's bilinear, a multiply-add per tap at each output element; its backward always forms both the
    input's and the grid's gradients (profiler round 24: both were reported uncounted)."""
    taps = formulas.GRID_SAMPLE_TAPS[(2, BILINEAR)]

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        if not backward:
            return float(formulas.FLOPS_PER_MAC * taps * _numel(_tensors(out)[0]))
        return float(2 * formulas.FLOPS_PER_MAC * taps * _numel(_argument(func, args, kwargs, "grad_output")))

    return count


BILINEAR = 0  # grid_sampler's interpolation_mode for bilinear (1 nearest, 2 bicubic)


def _affine_grid_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """affine_grid_generator: each output point (N, *S, d) is theta (d, d + 1) times its homogeneous base point."""
    grid = _tensors(out)[0]
    return float(formulas.FLOPS_PER_MAC * _numel(grid) * (grid.shape[-1] + 1))


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


POOLING_RESAMPLING_FLOPS: dict[str, Rule] = {
    "aten.col2im": _accumulate_flops("self"),  # F.fold: every column element added into its pixel
    "aten.unfold_backward": _accumulate_flops("grad_in"),  # overlapping windows' gradients added
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
    "aten.cudnn_grid_sampler": _cudnn_grid_sample_flops(backward=False),
    "aten.cudnn_grid_sampler_backward": _cudnn_grid_sample_flops(backward=True),
    "aten.affine_grid_generator": _affine_grid_flops,
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
    **{f"aten._upsample_{mode}2d_aa{tail}": _antialiased_flops(taps, backward=bool(tail))
       for mode, taps in (("bilinear", 2), ("bicubic", 4)) for tail in ("", "_backward")},
}
