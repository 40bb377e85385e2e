"""When a swap pays: the rule the backend applies, by the static shapes in the FX graph, to every rewrite a pass
finds before making it.

    from tilestack.compile import policy
    policy.unpaid(match)                                  # None, or why the swap would not pay at these shapes
    with policy.override(min_rows=0, min_query_rows=0):   # every size swapped (tests of the passes on tiny shapes)
        ...
    tilestack.optimize(model, min_rows=256)               # per compile (also options={"min_rows": 256})

Every swap makes an op an opaque custom-op call: a launch with its host cost (the op's dispatch and tilestack's
launcher, microseconds), and a wall Inductor cannot fuse across, where it would otherwise fold the norms, the
bias, the activation and the residual add into the kernels around them. With many rows the kernel's work hides
both (prefill: 8 x 1024 rows); with few (a decode step of batch 32: 32 rows) the call costs more than the work,
and Inductor's few fused kernels win (issue 14's first H200 run: GPT-2 decode 5.98 ms swapped against Inductor's
4.02). The rule:

- a row-wise op (``norm``, ``add_norm``, ``softmax``, ``linear_epilogue``) is swapped only with at least
  ``MIN_ROWS`` rows (the product of its input's leading dims);
- an attention (``sdpa``, ``explicit_attention``) only with at least ``MIN_QUERY_ROWS`` query rows per head
  (the tilestack kernel's smallest query tile: with one query row per head, decode, it would compute one row of
  a 64-row tile);
- ``linear_cross_entropy`` at any size (it saves memory: the logits are never whole);
- in an inference graph on a GPU, an attention, a norm (with its add) or a softmax only where it was measured
  faster per call, host time included, than the ops it replaces run as they are (``tilestack.compile.measure``:
  on the H200 the GPT-2 small prefill's swaps gained nothing on the GPU against cuDNN and Inductor's fused norms,
  and their custom-op calls, 70-100 us of host each, left the compiled forward host-bound: 4.6-8.0 ms between
  processes against Inductor's steady 4.5-4.6);
- a bf16/f16 ``linear_epilogue`` on a GPU, past the row rule, only where its fused GEMM was measured faster than
  cuBLAS's GEMM and one elementwise pass at the graph's shapes (``tilestack.compile.measure``: on the H200 it
  lost at GPT-2 small's prefill shapes). ``measure=False`` skips the measurement (the row rule alone); the
  quantized GEMMs are swapped unmeasured (their point is their precision).

A size the graph keeps symbolic (``dynamic=True``) is not judged: one compiled graph serves every size, and the
swap is made. Declined swaps are in the report with the reason, as the passes' own refusals are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers

import torch

from tilestack.errors import LaunchError

MIN_ROWS = 1024          # rows below which a row-wise swap costs more (a custom-op call) than its kernel saves
MIN_QUERY_ROWS = 64      # query rows per head below which an attention swap does not pay (one query tile)
ROW_WISE = ("norm", "add_norm", "softmax", "linear_epilogue")
ATTENTION = ("sdpa", "explicit_attention")
MEASURED = ("sdpa", "explicit_attention", "norm", "add_norm", "softmax")   # timed against the ops they replace


@dataclasses.dataclass(frozen=True)
class Policy:
    min_rows: int = MIN_ROWS
    min_query_rows: int = MIN_QUERY_ROWS
    measure: bool = True     # time a GPU's fused GEMM against cuBLAS before swapping it (compile.measure)

    def __post_init__(self):
        for name in ("min_rows", "min_query_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise LaunchError(f"tilestack backend: {name}={v!r}; expected an int >= 0")
            object.__setattr__(self, name, int(v))     # a NumPy int (a threshold read off an array) as the int it is
        if not isinstance(self.measure, bool):
            raise LaunchError(f"tilestack backend: measure={self.measure!r}; expected True or False")


_current = Policy()


def current() -> Policy:
    """The policy a compile uses unless its options name thresholds."""
    return _current


@contextlib.contextmanager
def override(**thresholds):
    """Within the block, compiles use these thresholds (``min_rows``, ``min_query_rows``) by default."""
    global _current
    before = _current
    _current = dataclasses.replace(before, **thresholds)
    try:
        yield _current
    finally:
        _current = before


def _static(n) -> int | None:
    return n if type(n) is int else None


def rows(t) -> int | None:
    """The rows of a row-wise op's input (the product of its leading dims), None if any is symbolic."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    dims = [_static(d) for d in t.shape[:-1]]
    return None if any(d is None for d in dims) else math.prod(dims)


def unpaid(match, policy: Policy | None = None, gm=None) -> str | None:
    """Why ``match`` (a ``patterns.Match``) would cost more than it saves at its static shapes, or None. ``gm``:
    the graph it was found in, for the measured decisions of an inference graph on a GPU (``MEASURED``)."""
    from tilestack.compile.patterns import value

    policy = policy or _current
    x = value(match.inputs[0]) if match.inputs else None
    if match.pattern in ATTENTION and isinstance(x, torch.Tensor) and x.dim() >= 2:
        n = _static(x.shape[-2])                          # q (B, H, N, D): query rows per head
        if n is not None and n < policy.min_query_rows:
            return (f"{n} query row(s) per head < min_query_rows={policy.min_query_rows} (a decode step: the kernel "
                    "would fill one query tile with it; Inductor's attention takes it without a custom-op call)")
    elif match.pattern in ROW_WISE:
        r = rows(x)
        if r is not None and r < policy.min_rows:
            return (f"{r} rows < min_rows={policy.min_rows} (a custom-op call costs more than the kernel saves at "
                    "this size, and Inductor fuses the op with its neighbours)")
        if match.pattern == "linear_epilogue" and policy.measure:
            return _measured_loss(match)
    if policy.measure and gm is not None and match.pattern in MEASURED:
        return _measured_swap(gm, match)
    return None


def _measured_swap(gm, match) -> str | None:
    """Why a swap in an inference graph on a GPU was measured slower than the ops it replaces, or None (faster,
    not measured: a training graph, a CPU, symbolic sizes)."""
    from tilestack.compile import measure
    from tilestack.compile.patterns import value

    out = value(match.outputs[-1]) if match.outputs else None
    if not isinstance(out, torch.Tensor) or out.device.type != "cuda" or out.requires_grad:
        return None
    try:
        decision = measure.swap(gm, match)
    except Exception as e:  # noqa: BLE001 - a measurement that fails leaves the size rule's answer, said once
        _unmeasured(match, e)
        return None
    return None if decision is None or decision.pays else decision.reason()


def _measured_loss(match) -> str | None:
    """Why a bf16/f16 fused GEMM on a GPU is slower than cuBLAS and Inductor's pass at these shapes, or None."""
    from tilestack.compile import measure, ops
    from tilestack.compile.patterns import value

    if match.fn is not ops.ts_linear_epilogue:
        return None                                       # quantized: swapped for the precision
    x, w, bias, residual = [None if n is None else value(n) for n in match.inputs]
    if not all(isinstance(t, torch.Tensor) for t in (x, w)) or x.device.type != "cuda":
        return None
    if any(_static(d) is None for t in (x, w) for d in t.shape):
        return None                                       # symbolic sizes: one graph for all, not measured
    activation, w_is_kn = match.consts[0], match.consts[1]
    try:
        decision = measure.linear_epilogue(x, w, bias, residual, activation, w_is_kn)
    except Exception as e:  # noqa: BLE001 - as in _measured_swap
        _unmeasured(match, e)
        return None
    return None if decision.pays else decision.reason()


def _unmeasured(match, e: Exception) -> None:
    import warnings
    warnings.warn(f"tilestack backend: could not time the {match.pattern} swap ({match.what}) against the ops it "
                  f"replaces ({type(e).__name__}: {str(e)[:200]}); swapped by the size rule alone", stacklevel=3)
