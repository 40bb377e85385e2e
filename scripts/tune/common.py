"""What the autotuning scripts share: the (kernel, shape) problems they study, small inputs for the interpreter.

    from common import study_problems, small_workload, config_key
    problems = study_problems()            # one bf16 problem per kernel and constants, GPU sizes
    work = small_workload(problem)         # the same kernel and constants on tiny inputs (Triton's interpreter)
"""

from __future__ import annotations

import inspect
import json

from tilestack.tune.library import library_problems

# sizes that make a problem small enough for Triton's interpreter, by the name of its maker's keyword;
# ragged on purpose (edges masked). GEMM and attention shrink with the problem (n / 16, N / 32) so that the
# interpreter's problems keep the GPU problems' order of sizes.
SMALL = {"rows": 3, "B": 1, "N": 80}
SMALL_GEMM_DIV, SMALL_GEMM_MIN = 16, 64
SMALL_SEQ_DIV, SMALL_SEQ_MIN = 32, 48
SMALL_ATTENTION_HEADS = 2
RAGGED = 8


def config_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def study_problems(kernels=None, dtypes=("bfloat16",), *, per_group: int = 1) -> list:
    """Library problems, ``per_group`` of each (kernel, signature, constants) group, most valuable first."""
    out, seen = [], {}
    for p in library_problems(kernels, dtypes):
        g = (p.kernel, p.signature, repr(sorted(p.fixed.items())))
        if seen.get(g, 0) < per_group:
            seen[g] = seen.get(g, 0) + 1
            out.append(p)
    return out


def small_workload(p):
    """``p``'s kernel and constants on tiny inputs of the same dtype (its maker's size keywords overridden)."""
    from tilestack.tune import library

    if p.kernel.startswith("attention_bwd"):
        part = p.kernel.removeprefix("attention_bwd_")
        D, causal = p.fixed["D"], p.fixed.get("causal", False)
        dtype = p.signature.split("-")[0]
        N = max(SMALL_SEQ_MIN, p.n // SMALL_SEQ_DIV) + RAGGED
        return library._bwd_maker(part, dtype, 1, SMALL_ATTENTION_HEADS, N, D, causal, True)("cpu")
    params = inspect.signature(p.make).parameters
    kw = {k: v for k, v in SMALL.items() if k in params and k != "N" or (k == "N" and "D" in params)}
    if p.kernel == "rotary":
        kw = {"B": 1, "N": 5}
    if p.kernel.startswith("attention"):
        kw["H"] = SMALL_ATTENTION_HEADS
        kw["N"] = max(SMALL_SEQ_MIN, p.n // SMALL_SEQ_DIV) + RAGGED
    if p.kernel == "gemm":
        kw["n"] = max(SMALL_GEMM_MIN, p.n // SMALL_GEMM_DIV) + RAGGED
    return p.make("cpu", **kw)
