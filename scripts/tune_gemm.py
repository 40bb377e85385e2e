"""Tune the tile-language GEMM on this GPU beside cuBLAS, and write the winners as a tilestack.tune table.

    PYTHONPATH=src python3 scripts/tune_gemm.py --sizes 4096 8192 --out results/

Each candidate (from gemm_kernel's declared tunables, minus what overflows shared memory) is checked against
cuBLAS on the same inputs before it is timed; TFLOP/s are 2*M*N*K over the median time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tilestack.kernels import gemm_kernel
from tilestack.perf import time_fn
from tilestack.tune import ConfigCache, SearchSpace, size_bucket, tune
from tilestack.tune.cache import key as cache_key

RESTRICT = dict(BM=(128,), BN=(128, 256), BK=(64,), GROUP_M=(8,), num_warps=(4, 8), num_stages=(3, 4, 5))


def tune_size(n: int, dev: str) -> tuple[float, float, dict, dict]:
    """(tilestack TFLOP/s, cuBLAS TFLOP/s, best config, table entry) for an n x n x n product."""
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ref = (x @ y).float()

    def run(cfg):
        gemm_kernel(x, y, c, **cfg)
        return c

    result = tune("gemm", SearchSpace(gemm_kernel, restrict=RESTRICT).configs((x, y, c)),
                  check=lambda cfg: float((run(cfg).float() - ref).norm() / ref.norm()),
                  time=lambda cfg: time_fn(lambda: run(cfg), device="cuda", repeats=30).median_s,
                  log=lambda s: print(s, file=sys.stderr))
    cublas = time_fn(lambda: x @ y, device="cuda", repeats=30).median_s
    ConfigCache().put("gemm", "bfloat16", dev, size_bucket(n), result.best, seconds=result.seconds)
    flops = 2 * n ** 3
    return flops / result.seconds / 1e12, flops / cublas / 1e12, result.best, {"config": result.best,
                                                                               "seconds": result.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192])
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    dev = torch.cuda.get_device_name()
    table = {}
    print(f"GEMM bf16 on {dev}: TFLOP/s (2MNK)")
    for n in a.sizes:
        ours, theirs, cfg, entry = tune_size(n, dev)
        table[cache_key("gemm", "bfloat16", dev, size_bucket(n))] = entry
        print(f"{n}^3: tilestack {ours:.0f}  cuBLAS {theirs:.0f}  ratio {ours / theirs:.2f}  {cfg}", flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        slug = dev.lower().replace(" ", "-")
        (a.out / f"gemm_{slug}.json").write_text(json.dumps(table, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
