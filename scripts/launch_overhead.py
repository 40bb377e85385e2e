"""Python time of one tilestack launch, with the compiled Triton call stubbed out (runs on any machine).

    .venv/bin/python scripts/launch_overhead.py            # microseconds per attention_forward launch

Everything a real launch does in Python runs: argument checks, config lookup, trace lookup, grid, the
binding of the kernel's parameters and its TMA descriptors. Only the final ``fn[grid](...)`` is a no-op.
"""

from __future__ import annotations

import time

import torch

import tilestack.backends.triton.launch as launch
from tilestack.kernels import attention_fwd


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(n: int = 3000) -> None:
    launch.compile_source = lambda src, name, interpret: _NoLaunch()
    q = torch.randn(32, 16, 512, 128, dtype=torch.bfloat16)
    attention_fwd.attention_forward(q, q, q, backend="triton")     # trace and "compile" once
    t0 = time.perf_counter()
    for _ in range(n):
        attention_fwd.attention_forward(q, q, q, backend="triton")
    print(f"{(time.perf_counter() - t0) / n * 1e6:.0f} us of Python per attention_forward launch")


if __name__ == "__main__":
    main()
