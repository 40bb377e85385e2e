"""Seeded fuzzing of the kernel library against float64 PyTorch.

    from tilestack.testing.fuzz import fuzz
    report = fuzz(budget=200, seed=0, device="cpu")      # both CPU backends, alternating
    print(report.summary())                              # problems tried, mismatches, NaN, crashes

    PYTHONPATH=src python scripts/fuzz.py --budget 2000 --device cpu
    PYTHONPATH=src python scripts/fuzz.py --budget 10000 --device cuda

The public ops (``tilestack.scaled_dot_product_attention``, the norms, rotary, swiglu, the fused cross-entropy,
forward and backward through autograd) are the kinds in ``PUBLIC_KINDS`` (module ``public_ops``), run only when
asked for: ``fuzz(..., kinds=PUBLIC_KINDS)`` or ``kinds=ALL_KINDS``, ``scripts/fuzz.py --kinds public`` or ``all``;
the default kinds, and so every seed's problems, are unchanged by them.

Problem ``i`` of seed ``s`` is drawn from its own generator (``numpy.random.default_rng([s, i])``), so any one
problem is replayed alone with ``--seed s --start i --budget 1``. Each problem picks a kernel (GEMM, softmax,
layer norm, RMS norm, attention forward and backward), ragged or empty shapes, a dtype, a value style
(ordinary, very wide or tiny magnitudes, near the dtype's limits, strongly negative attention scores, masked
entries), non-contiguous operands, and on the CPU alternates the reference executor and Triton's interpreter.
Every output the library allocates starts as NaN (``poisoned_allocations``), as does every ``out=``, so an
element a kernel forgets to write cannot look right.

Outcomes, per problem: ``ok``; ``nan`` (NaN or inf where the float64 result is finite); ``mismatch`` (an error
above the bound below, or a non-finite result that differs from the float64 one); ``crash`` (any exception
from the library on valid input). Bounds are per element and come from the arithmetic each kernel does: the
output's rounding (2 ulp: Triton's interpreter truncates bf16), f32 accumulation over the reduced dimension,
and for attention the rounding of P and dS to the input dtype before the matrix products, all scaled by the
float64 magnitudes that the error can grow from (``|A| @ |B|`` for a GEMM, ``P @ |V|`` for attention, ...).
A real bug (a wrong tile, a missing mask, a stale element) is off by the size of the result, far above them.
Conventions checked: a row that sees no key gives o = 0, lse = -inf and zero gradients (torch's math backend,
FlashAttention); softmax of a row of -inf is NaN (torch).
"""

from __future__ import annotations

import functools
import time
import traceback
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from tilestack.testing.fuzz.attention import attention_capabilities, attention_problem
from tilestack.testing.fuzz.compare import (
    EXP2_APPROX,
    TENSOR_CORE_K,
    TINY32,
    U32,
    Mismatch,
    accumulation_error,
    check,
)
from tilestack.testing.fuzz.draws import PROFILES
from tilestack.testing.fuzz.outcomes import KINDS, STATUSES, Outcome, Report, poisoned_allocations
from tilestack.testing.fuzz.problems import (
    Problem,
    gemm_problem,
    layer_norm_problem,
    norm_backward_problem,
    rms_norm_problem,
    softmax_problem,
)
from tilestack.testing.fuzz.public_ops import PUBLIC_KINDS, public_problem

ALL_KINDS = KINDS + PUBLIC_KINDS   # the kernels' kinds (the default) and the public ops' (asked for by name)

__all__ = ["ALL_KINDS", "EXP2_APPROX", "KINDS", "PROFILES", "PUBLIC_KINDS", "STATUSES", "TENSOR_CORE_K", "TINY32",
           "U32", "Mismatch", "Outcome", "Report", "accumulation_error", "attention_capabilities", "check",
           "default_backends", "draw", "fuzz", "poisoned_allocations"]


def default_backends(device: str) -> tuple[str, ...]:
    """Both CPU backends on a CPU (the reference executor and Triton's interpreter); Triton on a GPU."""
    return ("reference", "triton") if device == "cpu" else ("triton",)


def draw(index: int, seed: int, device: str, backends: Sequence[str], caps: dict,
         kinds: Sequence[str] = KINDS) -> tuple[str, str, Problem]:
    """Problem ``index`` of ``seed``: (kind, backend, problem), the same on every run."""
    rng = np.random.default_rng([seed, index])
    weights = np.array([{"attention": 3.0, "gemm": 2.0, "layer_norm_bwd": 1.0, "rms_norm_bwd": 1.0}.get(k, 1.5)
                        for k in kinds])
    kind = str(rng.choice(list(kinds), p=weights / weights.sum()))
    backend = backends[index % len(backends)]
    prof = PROFILES["cuda" if device == "cuda" else "cpu"]
    if kind == "attention":
        return kind, backend, attention_problem(rng, device, backend, prof, caps)
    if kind in PUBLIC_KINDS:
        return kind, backend, public_problem(kind, rng, device, backend, prof)
    maker = {"gemm": gemm_problem, "softmax": softmax_problem, "layer_norm": layer_norm_problem,
             "rms_norm": rms_norm_problem,
             "layer_norm_bwd": functools.partial(norm_backward_problem, centered=True),
             "rms_norm_bwd": functools.partial(norm_backward_problem, centered=False)}[kind]
    return kind, backend, maker(rng, device, backend, prof)


def fuzz(budget: int, seed: int = 0, device: str = "cpu", backends: Sequence[str] | None = None, *,
         start: int = 0, kinds: Sequence[str] = KINDS, time_limit: float | None = None,
         progress: Callable[[Outcome], None] | None = None, shard: tuple[int, int] = (0, 1)) -> Report:
    """Run problems ``start .. start + budget - 1`` of ``seed``; stop early after ``time_limit`` seconds.
    ``shard=(w, n)`` runs only every n-th of them, from the w-th: n processes share one budget that way."""
    import torch

    backends = tuple(backends or default_backends(device))
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"fuzz: unknown kinds {sorted(unknown)}; expected some of {ALL_KINDS}")
    caps = attention_capabilities() if "attention" in kinds else {}
    report = Report(seed, device, backends, capabilities=caps)
    t0 = time.perf_counter()
    w, n = shard
    if not 0 <= w < n:
        raise ValueError(f"fuzz: shard must be (w, n) with 0 <= w < n; got {shard!r}")
    report.next_index = start + budget
    for index in range(start + w, start + budget, n):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            report.next_index = index
            break
        kind, backend, (desc, run, expect) = draw(index, seed, device, backends, caps, kinds)
        status, detail = "ok", ""
        try:
            # numpy's overflow warnings from the interpreters are expected with extreme values; results are checked
            with poisoned_allocations(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                outs = run()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:   # the library failed on valid input: a crash, whatever the exception
            status = "crash"
            where = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"{type(e).__name__}: {str(e)[:300]} (at {where.filename.split('/')[-1]}:{where.lineno})"
        else:
            try:
                expect(outs)
            except Mismatch as m:
                status, detail = m.status, str(m)
            except Exception as e:    # the fuzzer's own check failed: recorded, so the run (and its worker) goes on
                where = traceback.extract_tb(e.__traceback__)[-1]
                status, detail = "crash", (f"in the check, not the library: {type(e).__name__}: {str(e)[:300]} "
                                           f"(at {where.filename.split('/')[-1]}:{where.lineno})")
        outcome = Outcome(index, kind, backend, status, desc, detail)
        report.outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    report.seconds = time.perf_counter() - t0
    return report
