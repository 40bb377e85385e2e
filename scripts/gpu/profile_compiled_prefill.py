"""Where a compiled GPT-2 small prefill step (B=8, N=1024, bf16) spends its time under the tilestack backend and
under Inductor, in one process: wall time per step, then torch.profiler's kernels by GPU time and the ops by host
time. For the gap between ``tilestack`` and ``inductor`` rows of ``bench_inference.py --cases gpt2-prefill``.

    PYTHONPATH=src python3 scripts/gpu/profile_compiled_prefill.py [--quick]   # --quick: GPT-2 tiny on the CPU
"""

from __future__ import annotations

import argparse
import time

import torch


def wall_ms(f, idx, sync, steps: int = 10) -> float:
    """Wall milliseconds per step of ``f(idx)`` under no_grad, after 3 warm-up steps (the first compiles)."""
    with torch.no_grad():
        for _ in range(3):
            f(idx)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            f(idx)
        sync()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="tilestack,inductor")
    ap.add_argument("--bisect", default="sdpa;add_norm,norm;linear_epilogue",
                    help="after the profiles: the tilestack backend with only these passes (';' between runs), "
                         "wall time per step each ('' to skip)")
    a = ap.parse_args()
    import tilestack
    from tilestack.bench.models import GPT, GPT2_SMALL, GPT2_TINY, make_batch

    dev = "cpu" if a.quick or not torch.cuda.is_available() else "cuda"
    cfg, (B, N) = (GPT2_TINY, (2, 16)) if dev == "cpu" else (GPT2_SMALL, (8, 1024))
    torch.manual_seed(0)
    model = GPT(cfg).to(device=dev, dtype=torch.bfloat16).eval()
    idx = make_batch(cfg, B, N, seed=0)[0].to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for name in a.backends.split(","):
        torch._dynamo.reset()
        f = tilestack.optimize(model) if name == "tilestack" else torch.compile(model)
        print(f"\n#### {name}: {wall_ms(f, idx, sync):.2f} ms per step (wall, 10 steps)")
        with torch.no_grad():
            if name == "tilestack":
                print(tilestack.compile.last_report())
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                           if dev == "cuda" else [])
            with torch.profiler.profile(activities=acts) as p:
                for _ in range(3):
                    f(idx)
                sync()
        key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    # which swaps cost the time: each group of passes alone, against the same model and batch
    for group in filter(None, a.bisect.split(";")):
        passes = group.split(",")
        torch._dynamo.reset()
        f = tilestack.optimize(model, passes=passes)
        ms = wall_ms(f, idx, sync)
        print(f"#### tilestack, passes={passes}: {ms:.2f} ms per step; {dict(tilestack.compile.last_report().swapped)}")


if __name__ == "__main__":
    main()
