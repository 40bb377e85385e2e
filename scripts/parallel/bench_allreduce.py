"""Ring all-reduce (tilestack.parallel.ring) against the library's dist.all_reduce, and the alpha-beta fit.

    PYTHONPATH=src python3 scripts/parallel/bench_allreduce.py --device cuda --ranks 8     # NCCL, one GPU each
    PYTHONPATH=src python3 scripts/parallel/bench_allreduce.py --device cpu --ranks 4      # gloo

For float32 tensors of 2^k bytes, the median of --reps timed calls per size (after a warm-up; a barrier before
each call, the slowest rank's time counted), then t = 2 (N - 1) alpha + 2 (N - 1) / N * S / B fitted to each
implementation (tilestack.parallel.cost.fit_ring). Bus bandwidth, as nccl-tests reports it: 2 (N - 1) / N * S / t.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from tilestack.parallel import ring_all_reduce, run_local
from tilestack.parallel.cost import fit_ring


def _time(fn, x: torch.Tensor, reps: int) -> float:
    ts = []
    for _ in range(reps + 1):
        dist.barrier()
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=x.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)             # the collective ends when its slowest rank does
        ts.append(t.item())
    return statistics.median(ts[1:])


def worker(rank: int, world_size: int, sizes: list[int], reps: int, device: str, chunks: int) -> dict:
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    out = {"ring": [], "library": []}
    for nbytes in sizes:
        x = torch.randn(nbytes // 4, device=dev)
        out["ring"].append(_time(lambda t: ring_all_reduce(t, chunks=chunks, check_size=False), x, reps))
        out["library"].append(_time(lambda t: dist.all_reduce(t), x, reps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    ap.add_argument("--min-log2", type=int, default=12)
    ap.add_argument("--max-log2", type=int, default=28)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    sizes = [2**k for k in range(a.min_log2, a.max_log2 + 1, 2)]
    res = run_local(worker, a.ranks, (sizes, a.reps, a.device, a.chunks), device=a.device, timeout_s=1800)[0]
    n = a.ranks
    print(f"{n} ranks on {a.device}; median of {a.reps}; bus bandwidth 2 (N-1)/N S / t")
    print(f"{'bytes':>12}{'ring us':>12}{'library us':>12}{'ring GB/s':>11}{'lib GB/s':>10}")
    for i, s in enumerate(sizes):
        tr, tl = res["ring"][i], res["library"][i]
        bus = 2 * (n - 1) / n * s
        print(f"{s:>12,}{tr * 1e6:>12.1f}{tl * 1e6:>12.1f}{bus / tr / 1e9:>11.2f}{bus / tl / 1e9:>10.2f}")
    for name in ("ring", "library"):
        alpha, bw = fit_ring(sizes, res[name], n)
        print(f"{name:>8}: alpha = {alpha * 1e6:.1f} us per step, B = {bw / 1e9:.2f} GB/s per link")


if __name__ == "__main__":
    main()
