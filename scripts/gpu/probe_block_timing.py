"""How a GPT block's time splits into host and device work on a GPU, with and without recompute: the data to
choose the planner's GPU recompute model (docs/planner.md, "On the H200": selective was predicted +10.6 ms over
no recompute and measured +0.2; full predicted +3.8 and measured +12.3, on the 125M GPT at batch 8).

    PYTHONPATH=src python3 scripts/gpu/probe_block_timing.py [--models 125m,350m] [--batch 8] [--json out.json]

Per model and micro-batch, the block the planner times (MeasuredCompute.for_gpt's builder, bf16), for its
forward (the graph recorded), its forward + backward, and forward + backward under full and selective recompute:
- ``events``: CUDA events around back-to-back calls (what the planner's per-layer times use now): the GPU's time
  per call, gaps where it waited for the host included;
- ``device``: the same calls captured in a CUDA graph and replayed (no host work: the kernels alone), or the
  capture's error;
- ``host``: the wall time of one call's Python and launches, the GPU idle before it (the queue empty), no sync
  after: what the host spends to enqueue it.
A phase is host-bound where host > device; the step hides a block's host work wherever the GPU queue is ahead.
Prints a table, writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MODELS = {"125m": dict(n_layer=12, d=768, n_head=12), "350m": dict(n_layer=24, d=1024, n_head=16)}


def host_s(fn, n: int = 20) -> float:
    """Median wall time of one call with the GPU idle before it and no sync after it."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="125m,350m")
    ap.add_argument("--batch", default="8")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from tilestack.parallel import ModelConfig
    from tilestack.parallel.plan import MeasuredCompute, describe_gpt
    from tilestack.perf.timing import time_fn

    rows = []
    for name in a.models.split(","):
        cfg = ModelConfig(**MODELS[name], vocab=50304, max_seq=2048, attention="sdpa")
        desc = describe_gpt(cfg, a.seq, dtype_bytes=2, name=name)
        compute = MeasuredCompute.for_gpt(desc, device="cuda", overheads=False)
        for b in (int(x) for x in a.batch.split(",")):
            for policy in ("none", "full", "selective"):
                module, make_input, _ = compute.builders["block"](b, 1, recompute=policy)
                x = make_input()
                cases = {"fwd+bwd": lambda m=module, x=x: m(x).float().sum().backward()}
                if policy == "none":
                    cases = {"fwd": lambda m=module, x=x: m(x), **cases}
                for phase, fn in cases.items():
                    row = dict(model=name, batch=b, recompute=policy, phase=phase)
                    row["events_s"] = time_fn(fn, args_sets=[()], device="cuda", budget_s=2.0).median_s
                    try:
                        row["device_s"] = time_fn(fn, args_sets=[()], device="cuda", graph=True,
                                                  budget_s=2.0).median_s
                    except Exception as e:  # noqa: BLE001 - a capture that fails is a result
                        row["device_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    row["host_s"] = host_s(fn)
                    module.zero_grad(set_to_none=True)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'model':6s} {'b':>3s} {'recompute':10s} {'phase':8s} {'events ms':>10s} {'device ms':>10s} "
          f"{'host ms':>8s}  bound")
    for r in rows:
        dev = r.get("device_s")
        bound = "" if dev is None else ("host" if r["host_s"] > dev else "device")
        print(f"{r['model']:6s} {r['batch']:3d} {r['recompute']:10s} {r['phase']:8s} {r['events_s'] * 1e3:10.3f} "
              f"{(dev or float('nan')) * 1e3:10.3f} {r['host_s'] * 1e3:8.3f}  {bound}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
