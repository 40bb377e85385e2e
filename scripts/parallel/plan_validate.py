"""The planner on the GPUs of this machine: predicted against measured step time and peak memory.

    PYTHONPATH=src python3 scripts/parallel/plan_validate.py --out plan_h200.json --time-limit 480
    PYTHONPATH=src python3 scripts/parallel/plan_validate.py --nproc 4 --model 350m --batch 16 --seq 1024

For each model (--models: tilestack.parallel GPTs by name) and each global batch (--batch, a comma-separated
list: on one GPU the batch and the recompute policy are the choices there are), the per-layer times are measured
on this GPU (tilestack.parallel.plan.MeasuredCompute on cuda, bf16), the collectives come from ANCHORS.md's
H200 NCCL figures, every plan of --nproc ranks is predicted and ranked, and up to --plans of them (the planner's
choice first, then one of each layout family, then by rank) are trained for real with the Trainer that
``tilestack train`` uses (tilestack.parallel.engine.run_training, NCCL, one GPU per rank): step time is the
median over the steps after warm-up, memory torch.cuda.max_memory_allocated of the largest rank. Stops starting
new runs after --time-limit seconds. Prints a row per plan as it goes, then the table, and writes --out JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

MODELS = {
    "125m": dict(n_layer=12, d=768, n_head=12, vocab=50304, max_seq=2048, attention="sdpa"),
    "350m": dict(n_layer=24, d=1024, n_head=16, vocab=50304, max_seq=2048, attention="sdpa"),
    "760m": dict(n_layer=24, d=1536, n_head=16, vocab=50304, max_seq=2048, attention="sdpa"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="125m,350m")
    ap.add_argument("--nproc", type=int, default=0, help="ranks (default: every GPU here)")
    ap.add_argument("--batch", default="8,16", help="global batches (sequences), comma-separated")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--plans", type=int, default=6, help="plans measured per model and batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-limit", type=float, default=0.0, help="bytes per rank (default: the GPU's memory)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="stop starting runs after this many seconds")
    ap.add_argument("--out", default="plan_validate.json")
    args = ap.parse_args()
    t_start = time.monotonic()

    import torch

    from tilestack.parallel import ModelConfig, run_local
    from tilestack.parallel.engine import run_training
    from tilestack.parallel.plan import MeasuredCompute, choose, describe_gpt, h200_nccl, search
    from tilestack.parallel.plan.search import to_measure
    from tilestack.perf.device import detect
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this script measures plans on GPUs (see plan_cpu_validate.py for the CPU)")
        return 2
    n = args.nproc or torch.cuda.device_count()
    dev = detect(0)
    peak = dev.spec.peak("bf16") if dev.spec else None
    limit = args.memory_limit or torch.cuda.get_device_properties(0).total_memory
    comm = h200_nccl()
    rows = []
    for name in args.models.split(","):
        cfg = ModelConfig(**MODELS[name])
        desc = describe_gpt(cfg, args.seq, dtype_bytes=2, name=name)
        compute = MeasuredCompute.for_gpt(desc, device="cuda", overheads=False)
        for batch in (int(b) for b in args.batch.split(",")):
            if time.monotonic() - t_start > args.time_limit:
                break
            ranked = search(desc, compute, comm, world_size=n, batch=batch, memory_limit=limit)
            chosen = choose(ranked)
            for r in to_measure(ranked, args.plans):
                if time.monotonic() - t_start > args.time_limit:
                    print(f"time limit {args.time_limit:.0f} s: stopping", flush=True)
                    break
                p = r.prediction
                spec = dict(parallel=p.plan.parallel_kwargs(), model=desc.config, batch=batch, seq=args.seq,
                            steps=args.steps, warmup=args.warmup, dtype="bfloat16", device="cuda")
                row = dict(model=name, nproc=n, batch=batch, plan=p.plan.label(), predicted_step_s=p.step_s,
                           predicted_peak_bytes=p.memory_bytes, bound=p.bound, terms=p.terms,
                           predicted_mfu=p.mfu(peak), chosen=r is chosen)
                try:
                    res = run_local(run_training, n, (spec,), device="cuda", timeout_s=300)
                    secs = [max(rr["seconds"][i] for rr in res) for i in range(args.steps)][args.warmup:]
                    row.update(measured_step_s=statistics.median(secs),
                               measured_peak_bytes=max(rr["peak_bytes"] for rr in res))
                    row["time_err"] = row["measured_step_s"] / p.step_s - 1
                    row["mem_err"] = row["measured_peak_bytes"] / p.memory_bytes - 1
                    row["measured_mfu"] = (p.flops_per_step / row["measured_step_s"] / (n * peak)) if peak else None
                except Exception as e:  # noqa: BLE001 - an out-of-memory plan is a result, not the end of the run
                    row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "terms"}), flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(device=dev.name, nproc=n, seq=args.seq, rows=rows), f, indent=1)
    print(f"\n{dev.name}, {n} rank(s), seq {args.seq}, bf16 (predicted from per-layer times measured here, "
          "NCCL from ANCHORS.md)")
    print(f"{'model':6s} {'batch':>5s} {'plan':28s} {'pred ms':>9s} {'meas ms':>9s} {'err':>7s} {'pred GiB':>9s} "
          f"{'meas GiB':>9s} {'err':>7s}  bound")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6s} {r['batch']:5d} {r['plan']:28s} {r['predicted_step_s'] * 1e3:9.2f} "
                  f"{'failed':>9s}  {r['error'][:60]}")
            continue
        print(f"{r['model']:6s} {r['batch']:5d} {r['plan'] + (' *' if r['chosen'] else ''):28s} "
              f"{r['predicted_step_s'] * 1e3:9.2f} {r['measured_step_s'] * 1e3:9.2f} {r['time_err']:+7.1%} "
              f"{r['predicted_peak_bytes'] / 2**30:9.2f} {r['measured_peak_bytes'] / 2**30:9.2f} "
              f"{r['mem_err']:+7.1%}  {r['bound']}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(f"\n{len(ok)} plans: step time within 15% for {sum(abs(r['time_err']) <= 0.15 for r in ok)}, "
              f"peak memory within 10% for {sum(abs(r['mem_err']) <= 0.10 for r in ok)}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
