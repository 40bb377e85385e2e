"""On a GPU: layer_norm's one-tile kernel at 8192 x 8192 bf16 (``tilestack bench``'s case) over launch configs
beyond the tuner's space (the persistent form, PROGRAMS > 0, included), against this GPU's copy bandwidth measured
in the same process.

    PYTHONPATH=src python3 scripts/gpu/probe_layer_norm.py
"""

from __future__ import annotations

import functools

import torch

from tilestack.kernels.layernorm import layer_norm_kernel
from tilestack.perf.timing import time_fn

ROWS = COLS = 8192
CONFIGS = [dict(BM=bm, BN=COLS, ONE_TILE=True, num_warps=nw, num_stages=1)
           for bm, nw in ((1, 4), (1, 8), (1, 16), (1, 32), (2, 8), (2, 16), (2, 32), (4, 16), (4, 32))]
# persistent: PROGRAMS programs walking the row blocks, the next block's rows loaded (cp.async, num_stages=2)
# while this one is normalised; weight and bias loaded once per program
CONFIGS += [dict(BM=bm, BN=COLS, ONE_TILE=True, PROGRAMS=p * 132, num_warps=nw, num_stages=2)
            for bm, nw, p in ((1, 4, 4), (1, 8, 2), (1, 8, 3), (1, 16, 1), (2, 8, 2), (2, 16, 1))]


def main() -> None:
    x = torch.randn(ROWS, COLS, device="cuda", dtype=torch.bfloat16)
    w, b = (torch.randn(COLS, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    y = torch.empty_like(x)
    mean, rstd = torch.empty(ROWS, device="cuda"), torch.empty(ROWS, device="cuda")
    bytes_moved = 2 * x.numel() * x.element_size()
    copy = time_fn(functools.partial(y.copy_, x), args_sets=[()], device="cuda", budget_s=1.0).median_s
    print(f"copy: {bytes_moved / copy / 1e12:.2f} TB/s")
    want = torch.nn.functional.layer_norm(x.float(), (COLS,), w.float(), b.float(), 1e-5)
    for cfg in CONFIGS:
        try:
            fn = functools.partial(layer_norm_kernel, x, w, b, y, mean, rstd, 1e-5, **cfg)
            y.fill_(float("nan"))
            fn()
            err = float((y.float() - want).abs().max())
            t = time_fn(fn, args_sets=[()], device="cuda", budget_s=1.0).median_s
        except Exception as e:      # a config past the register or shared-memory limit
            print(f"{cfg}: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"{cfg}: {t * 1e6:.1f} us {bytes_moved / t / 1e12:.2f} TB/s = {copy / t:.1%} of copy, max err {err:.1e}")


if __name__ == "__main__":
    main()
