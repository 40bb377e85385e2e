"""Tune the tile-language GEMM on this GPU (``tilestack tune``'s GEMM problems) and compare it with cuBLAS.

    PYTHONPATH=src python3 scripts/tune_gemm.py --sizes 4096 8192 --budget-s 120 --out results/tables

Each candidate is checked against a float32 product before it is timed; the winners go to the user's table and,
with --out, to a shippable table (``gemm_<device key>_<gpu>.json``). TFLOP/s are 2*M*N*K over the median time,
cuBLAS timed the same way (Triton's do_bench, L2 flushed between calls).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tilestack.tune.devices import device_key
from tilestack.tune.library import DTYPES, library_problems
from tilestack.tune.session import Session, cuda_timer

CUBLAS_REP_MS = 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192])
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--budget-s", type=float, default=120.0)
    p.add_argument("--out", type=Path, help="folder for the shippable table")
    a = p.parse_args()
    key = device_key(torch.cuda.current_device())
    problems = [q for q in library_problems(["gemm"], a.dtypes) if q.n in a.sizes]
    session = Session(key, budget_s=a.budget_s, ship_dir=a.out, log=print)
    print(f"GEMM on {key.name} ({key}): TFLOP/s (2MNK)")
    for o in session.run(problems):
        n, dtype = o.problem.n, getattr(torch, o.problem.signature)
        if o.config is None:
            print(f"{n}^3 {o.problem.signature}: {o.note}")
            continue
        x, y = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        cublas = cuda_timer(lambda x=x, y=y: x @ y, CUBLAS_REP_MS)
        ours, theirs = 2 * n**3 / o.seconds / 1e12, 2 * n**3 / cublas / 1e12
        print(f"{n}^3 {o.problem.signature}: tilestack {ours:.0f}  cuBLAS {theirs:.0f}  ratio {ours / theirs:.2f}  "
              f"{o.config}  [{o.tried} tried]", flush=True)


if __name__ == "__main__":
    main()
