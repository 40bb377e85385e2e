"""On a GPU: a tile-language RMSNorm of a (262400, 8192) bf16 tensor (2,149,580,800 elements, past 2**31),
which died with an illegal memory access while codegen computed offsets in 32 bits (issue 9, item 2).

    PYTHONPATH=src python3 scripts/gpu/check_index64.py

Checks the first and last rows against torch in float32 (both live past 2**31 only at the end), prints the
largest error and the generated source's 64-bit casts, and exits non-zero on a mismatch. Needs about 9 GB.
"""

from __future__ import annotations

import re
import sys

import torch

import tilestack.lang as ts
from tilestack.backends.triton.codegen import needs_int64

ROWS, COLS = 262400, 8192
EPS = 1e-6


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def rms_norm(X, Y, eps: float, *, BM: int = 4, BN: int = 8192, num_warps: int = 8):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    ms = ts.RegVec[ts.f32, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(i, 0))             # a register tile: the pointer path
    ts.mul(sq, x, x)
    ts.row_sum(ms, sq)
    ts.div(ms, ms, X.shape[1] * 1.0)
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    ts.mul_row(x, x, ms)
    ts.copy(y, x)
    ts.store(Y, y, at=(i, 0))


def main() -> int:
    x = torch.randn(ROWS, COLS, dtype=torch.bfloat16, device="cuda")
    y = torch.full_like(x, float("nan"))
    print("needs_int64:", needs_int64(x.shape, x.stride()))
    traced = rms_norm.trace(x, y, EPS)
    rms_norm(x, y, EPS, backend="triton")
    torch.cuda.synchronize()
    src = traced.source(backend="triton")
    print("64-bit casts in the displayed source:", len(re.findall(r"tl\.int64", src)))
    worst = 0.0
    for rows in (slice(0, 64), slice(ROWS - 64, ROWS)):
        xf = x[rows].float()
        want = xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + EPS)
        err = (y[rows].float() - want).abs().max().item()
        worst = max(worst, err if err == err else float("inf"))
    print(f"max abs error (first and last 64 rows): {worst:.3g}")
    ok = worst < 5e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
