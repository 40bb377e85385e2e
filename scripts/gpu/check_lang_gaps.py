"""On a GPU: the new tile-language ops compiled by Triton (not interpreted) against the reference executor.

    PYTHONPATH=src python3 scripts/gpu/check_lang_gaps.py

Runs the kernels of tests/backends/test_masks_and_atomics.py (comparisons with per_row/per_col, logic and
where, arange, stepped and grid-stride loops, atomic_add, a document-masked sliding-window attention) and the
index-division kernel of tests/lang/test_errors.py with CUDA tensors on the Triton backend, and the same
inputs on the CPU with the reference backend; prints the largest difference per case and exits non-zero on
a mismatch or a NaN.
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "backends"), str(ROOT / "tests" / "lang")]

import test_errors as te  # noqa: E402
import test_masks_and_atomics as tm  # noqa: E402


def run_both(kernel, args, **consts) -> list[tuple[np.ndarray, np.ndarray]]:
    """(GPU Triton, CPU reference) of every tensor argument after the launch."""
    cpu = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    kernel(*cpu, backend="reference", **consts)
    kernel(*gpu, backend="triton", **consts)
    torch.cuda.synchronize()
    return [(g.cpu().to(torch.float64).numpy(), c.to(torch.float64).numpy())
            for g, c in zip(gpu, cpu, strict=True) if isinstance(c, torch.Tensor)]


def main() -> int:
    rng = np.random.default_rng(0)
    R, C = tm.R, tm.C
    cases = []
    for fn in tm.COMPARE:
        for form in ("tiles", "scalar", "outer"):
            a, b = (torch.from_numpy(rng.integers(-2, 3, (R, C)).astype(np.float32)) for _ in range(2))
            u, v = torch.from_numpy(rng.integers(-2, 3, R).astype(np.float32)), torch.arange(-16.0, 16.0)
            cases.append((f"compare {fn} {form}", tm.compare_k,
                          (a, b, u, v, torch.full((R, C), math.nan), 1.0), {"FN": fn, "FORM": form}, 0.0))
    for fn in ("and", "or", "not"):
        a, b = (torch.from_numpy(rng.uniform(-2, 2, (R, C))).to(torch.bfloat16) for _ in range(2))
        cases.append((f"logic {fn}", tm.logic_k, (a, b, torch.zeros(R, C, dtype=torch.bfloat16)), {"FN": fn}, 0.0))
    cases.append(("arange", tm.arange_k, (torch.zeros(8, 40), torch.zeros(40, dtype=torch.int32)), {}, 0.0))
    for how in ("grid-stride", "by-3", "down"):
        x = torch.from_numpy(rng.uniform(-1, 1, (1, 117)).astype(np.float32))
        cases.append((f"range {how}", tm.strided_sum, (x, torch.zeros(3, 16), 3), {"HOW": how}, 1e-6))
    x = torch.from_numpy(rng.uniform(-1, 1, (700, 370)).astype(np.float32))
    cases.append(("atomic column sum", tm.column_sum, (x, torch.zeros(370)), {}, 1e-4))
    for n, window, dtype, tol in ((450, 70, torch.float32, 1e-3), (370, 20, torch.bfloat16, 3e-2),
                                  (160, 1, torch.float16, 3e-3)):
        q, k, v = (torch.from_numpy(rng.normal(0, 1, (n, 16))).to(dtype) for _ in range(3))
        doc = torch.from_numpy(np.sort(rng.integers(0, 5, n)).astype(np.int32))
        cases.append((f"window attention n={n} w={window} {dtype}", tm.window_attention,
                      (q, k, v, doc, torch.zeros(n, 16, dtype=dtype), 0.25, window), {}, tol))
    for how in ("N/4", "1.0/N", "n/N", "-N//n", "7%N", "-N%n", "cdiv(-N,n)"):
        cases.append((f"index scalars {how}", te.scalar_division, (torch.zeros(3, 10), torch.zeros(16), 3),
                      {"HOW": how}, 1e-6))
    failed = 0
    for name, kernel, args, consts, tol in cases:
        try:
            pairs = run_both(kernel, args, **consts)
            worst = max(float(np.max(np.abs(g - c), initial=0.0)) for g, c in pairs)
            nan = any(np.isnan(g).any() for g, _ in pairs)
            ok = not nan and worst <= tol
        except Exception as e:  # report every case, then fail
            ok, worst, nan = False, float("nan"), f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:48s} max diff {worst:.3g}{'  NaN/error: ' + str(nan) if nan else ''}")
    print(f"{len(cases) - failed}/{len(cases)} cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
