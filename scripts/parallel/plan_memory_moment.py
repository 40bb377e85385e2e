"""Where a plan's measured peak memory falls in its step, per rank (docs/planner.md, "Session 32"): one profiled
step as ``plan.measure`` profiles it, the op running at the peak of the allocator's running sum, and the blocks
alive then by the op (outermost, and innermost) that made them, largest first. Byte counts: the load does not
matter.

    PYTHONPATH=src python3 scripts/parallel/plan_memory_moment.py --model 4x64 --plan dp=4,zero=2,recompute=full
"""

from __future__ import annotations

import argparse
from collections import defaultdict


def _rank(rank: int, world: int, model: tuple[int, int], kw: dict, batch: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    from tilestack.parallel.plan.measure import _allocator_records
    cfg = ModelConfig(n_layer=model[0], d=model[1], n_head=4, vocab=256, max_seq=64)
    pc = ParallelConfig(**kw)
    tr = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"))
    for s in range(2):
        tr.step(*make_batch(cfg, batch, 64, seed=s))
    idx, t = make_batch(cfg, batch, 64, seed=9)
    torch.distributed.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tr.forward_backward(idx, t)
        tr.optimizer_step()
    records = _allocator_records(prof)
    run = peak = 0
    t_peak = 0
    for tt, nb in records:
        run += nb
        if run > peak:
            peak, t_peak = run, tt
    # the blocks alive at t_peak, by who made them; the ops open at t_peak
    alive: dict[int, tuple[int, str]] = {}
    open_ops: list[str] = []

    def visit(node, outer: str, path: list[str]) -> None:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            if node.start_time_ns <= t_peak:
                if fields.alloc_size > 0:
                    alive[fields.ptr] = (fields.alloc_size, f"{outer} / {path[-1] if path else '-'}")
                else:
                    alive.pop(fields.ptr, None)
            return
        if node.start_time_ns <= t_peak <= node.end_time_ns:
            open_ops.append("  " * len(path) + node.name)
        for child in node.children:
            visit(child, outer or node.name, path + [node.name])

    events = sorted(prof.profiler.kineto_results.experimental_event_tree(), key=lambda n: n.start_time_ns)
    for root in events:
        visit(root, "", [])
    by_op: dict[str, int] = defaultdict(int)
    for nb, who in alive.values():
        by_op[who] += nb
    return dict(peak=peak, open_ops=open_ops[:12], by_op=sorted(by_op.items(), key=lambda kv: -kv[1])[:14])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="4x64")
    ap.add_argument("--plan", default="dp=4,zero=2,recompute=full", help="ParallelConfig fields, k=v,...")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from tilestack.parallel.launch import run_local
    kw = {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in (f.split("=") for f in a.plan.split(","))}
    world = kw.get("dp", 1) * kw.get("pp", 1) * kw.get("tp", 1) * kw.get("dp_shard", 1)
    model = tuple(int(x) for x in a.model.split("x"))
    for rank, r in enumerate(run_local(_rank, world, (model, kw, a.batch))):
        print(f"rank {rank}: peak of the step's allocations {r['peak'] / 2**20:.3f} MiB (the parameters and optimizer "
              "state from before the step not included); ops open at the peak:")
        print("\n".join("   " + o for o in r["open_ops"]))
        print("  alive at the peak, by the op that made them (outermost / innermost):")
        for who, nb in r["by_op"]:
            print(f"   {nb / 2**20:8.3f} MiB  {who}")
        if rank == 0 and world > 1:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
