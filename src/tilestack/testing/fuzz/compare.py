"""Comparing a kernel's outputs with float64: the error bounds of the arithmetic each kernel does, and
``check``, which raises ``Mismatch`` past them."""

from __future__ import annotations

import math

U32 = 2.0 ** -24          # f32 unit roundoff
TINY32 = 2.0 ** -126      # smallest normal f32: GPUs flush f32 subnormals to zero
EXP2_APPROX = 2.0 ** -21  # relative error of the GPU's exp2 (ex2.approx) and of the f32 rounding around it


class Mismatch(Exception):
    """An output outside its bound: ``status`` is "nan" or "mismatch"."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


def check(name: str, got, want, tol=None) -> None:
    """``got`` against the float64 ``want`` elementwise: finite where want is finite and within ``tol``; the same
    infinity where want is infinite; NaN where want is NaN. Raises Mismatch naming the worst element."""
    import torch

    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch("mismatch", f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.numel() == 0:
        return
    g = got.detach().double()
    w = want.double().to(g.device)
    # a finite float64 result beyond the output dtype's range is an infinity in that dtype: either the infinity
    # or a finite value within the bound passes (the f32 result may round either way at the edge)
    in_dtype = w.to(got.dtype).double()
    g = torch.where(w.isfinite() & ~in_dtype.isfinite() & (g == in_dtype), w, g)
    fin = w.isfinite()
    bad_nan = fin & ~g.isfinite()
    if bool(bad_nan.any()):
        idx = tuple(int(i) for i in bad_nan.nonzero()[0])
        raise Mismatch("nan", f"{name}{list(idx)} = {float(g[idx])}, expected {float(w[idx])} "
                              f"({int(bad_nan.sum())} of {g.numel()} elements not finite)")
    special = ~fin & ~(g.isnan() & w.isnan()) & (g != w)
    if bool(special.any()):
        idx = tuple(int(i) for i in special.nonzero()[0])
        raise Mismatch("mismatch", f"{name}{list(idx)} = {float(g[idx])}, expected {float(w[idx])}")
    if tol is None:
        return
    err = torch.where(fin, (g - w).abs(), torch.zeros_like(g))
    ratio = err / tol.double().expand_as(err)
    worst = float(ratio.max())
    if worst > 1.0:
        idx = tuple(int(i) for i in (ratio == ratio.max()).nonzero()[0])
        raise Mismatch("mismatch", f"{name}{list(idx)} = {float(g[idx]):.6g}, expected {float(w[idx]):.6g} "
                                   f"(error {float(err[idx]):.3g}, bound {float(tol.expand_as(err)[idx]):.3g}, "
                                   f"{int((ratio > 1).sum())} of {g.numel()} elements over)")


def _eps(dtype) -> float:
    """The spacing of the dtype's numbers at 1: twice its unit roundoff, one truncation step."""
    import torch

    return torch.finfo(dtype).eps


def _atol(dtype) -> float:
    """Absolute slack near zero: f32 subnormals flushed (GPUs), and two steps of the dtype's own subnormals."""
    import torch

    return TINY32 + 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps


TENSOR_CORE_K = 16   # products a tensor-core step (mma/wgmma, 16-bit inputs) sums before adding to the f32 accumulator


def accumulation_error(D: int, smax: float) -> float:
    """Bound on what a tensor-core dot of depth ``D`` adds to a score's error: one f32 rounding per k-step into an
    accumulator that reaches ``smax`` (max over visible scores of scale * sum_d |q_d k_d|, plus the bias).

    It grows with the head dim, not its square root: the accumulator's roundings need not cancel. On the H200,
    D = 256 fp16 scores of magnitude ~3,500 (all products of one sign) came out about 15 units of f32 roundoff
    times smax off (fuzz problems 1446, 2263, 7671 and 9475 of seed 0), past a bound without this term."""
    return math.ceil(D / TENSOR_CORE_K) * U32 * smax
