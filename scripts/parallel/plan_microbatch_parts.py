"""Where a pipeline step's time goes as its micro-batch count grows (docs/planner.md, "Session 32"), on this
machine's CPUs: pp2 on 2 gloo ranks, gpt LxD at a fixed batch, GPipe (or 1F1B) with m = 1, 2, 4, 8 micro-batches.

    PYTHONPATH=src python3 scripts/parallel/plan_microbatch_parts.py [--model 4x128] [--batch 8] [--schedule gpipe]
                                                                      [--predict] [--trainer]

Per rank and m, medians over the timed steps, in ms: the schedule's step; inside it the stage's forward and backward
chunks (torch's forward_one_chunk / backward_one_chunk: the layers, the loss on the last stage, the stage's own
bookkeeping), the waits on its sends and receives (_wait_batch_p2p), and the rest (the schedule's Python, the
posting of the sends); and, in the same process between the steps, the stage's layers run bare on one micro-batch
(forward, then backward of a sum of the output) m times: what the planner's layer times stand for.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _rank(rank: int, world: int, layers: int, d: int, batch: int, schedule: str, ms: list[int],
          steps: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import schedules, stage as stage_mod

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    torch.set_num_threads(1)
    cfg = ModelConfig(n_layer=layers, d=d, n_head=4, vocab=256, max_seq=64)
    spent = {"fwd": 0.0, "bwd": 0.0, "wait": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    schedules._wait_batch_p2p = timed("wait", schedules._wait_batch_p2p)
    stage_mod._PipelineStageBase.forward_one_chunk = timed("fwd", stage_mod._PipelineStageBase.forward_one_chunk)
    stage_mod._PipelineStageBase.backward_one_chunk = timed("bwd", stage_mod._PipelineStageBase.backward_one_chunk)
    out = {}
    for m in ms:
        pc = ParallelConfig(pp=2, microbatches=m, pp_schedule=schedule)
        tr = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"))
        part = tr.parts[0]
        first, last = 0 in tr.stage_ids, tr.pc.n_stages - 1 in tr.stage_ids
        rows, bare = [], []
        for s in range(steps):
            idx, t = tr.local_batch(*make_batch(cfg, batch, 64, seed=s))
            for k in spent:
                spent[k] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            losses: list = []
            tr.schedule.step(*((idx,) if first else ()), target=t if last else None,
                             losses=losses if last else None, return_outputs=False)
            step = time.perf_counter() - t0
            rows.append((step, spent["fwd"], spent["bwd"], spent["wait"]))
            # the stage's layers bare, m micro-batches of batch / m rows (the input a first stage gets; a later
            # stage gets the activations: a random (b, 64, d) tensor)
            b = batch // m
            x = idx[:b] if first else torch.randn(b, 64, d, requires_grad=True)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(m):
                y = part(x)
                y.float().sum().backward()
            bare.append(time.perf_counter() - t0)
            part.zero_grad(set_to_none=True)
        keep = rows[2:]
        med = [statistics.median(r[k] for r in keep) * 1e3 for k in range(4)]
        out[m] = dict(step=med[0], fwd=med[1], bwd=med[2], wait=med[3], rest=med[0] - med[1] - med[2] - med[3],
                      bare=statistics.median(bare[2:]) * 1e3)
        del tr
    return out


def _predictions(layers: int, d: int, batch: int, schedule: str, ms: list[int]) -> dict:
    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import MeasuredCompute, describe_gpt, load_comm, measure_gloo, predict
    from tilestack.parallel.plan.compute import lockstep_load
    from tilestack.parallel.plan.predict import Plan
    comm = load_comm("gloo-cpu") or measure_gloo(name="gloo-cpu")
    desc = describe_gpt(ModelConfig(n_layer=layers, d=d, n_head=4, vocab=256, max_seq=64), 64, name=f"gpt-{layers}x{d}")
    compute = MeasuredCompute.for_gpt(desc)
    compute.set_load(*lockstep_load(2, comm), 2)
    out = {}
    for m in ms:
        p = predict(Plan(pp=2, microbatches=m, schedule=schedule, batch=batch), desc, compute, comm)
        out[m] = dict(fwd=[round(x * 1e3, 2) for x in p.stage_fwd], bwd=[round(x * 1e3, 2) for x in p.stage_bwd],
                      p2p=(p.terms["p2p"] / (2 * m)) * 1e3, makespan=p.sim.makespan * 1e3, step=p.step_s * 1e3,
                      terms={k: round(v * 1e3, 1) for k, v in p.terms.items() if v})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="4x128")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--schedule", default="gpipe", choices=("gpipe", "1f1b"))
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--predict", action="store_true", help="also the planner's prediction of each m: per stage and "
                    "micro-batch forward and backward, the sends, the schedule's makespan (measured compute model)")
    ap.add_argument("--trainer", action="store_true", help="also the Trainer's whole steps of each m as the "
                    "validation measures them (plan.measure.measure_plans), every timed step in ms")
    args = ap.parse_args()
    from tilestack.parallel.launch import run_local
    layers, d = (int(x) for x in args.model.split("x"))
    ms = [int(x) for x in args.ms.split(",")]
    preds = _predictions(layers, d, args.batch, args.schedule, ms) if args.predict else {}
    res = run_local(_rank, 2, (layers, d, args.batch, args.schedule, ms, args.steps))
    print(f"gpt {args.model}, batch {args.batch}, pp2 {args.schedule}, medians in ms")
    print(f"{'rank':>4} {'m':>3} {'step':>8} {'fwd':>8} {'bwd':>8} {'wait':>8} {'rest':>8} {'bare m x':>9}"
          f" {'rest/m':>7}")
    for rank, per in enumerate(res):
        for m, r in per.items():
            print(f"{rank:>4} {m:>3} {r['step']:8.2f} {r['fwd']:8.2f} {r['bwd']:8.2f} {r['wait']:8.2f} "
                  f"{r['rest']:8.2f} {r['bare']:9.2f} {r['rest'] / m:7.2f}")
    if args.trainer:
        from tilestack.parallel.model import ModelConfig
        from tilestack.parallel.plan import describe_gpt
        from tilestack.parallel.plan.measure import measure_plans
        from tilestack.parallel.plan.predict import Plan
        desc = describe_gpt(ModelConfig(n_layer=layers, d=d, n_head=4, vocab=256, max_seq=64), 64)
        plans = [Plan(pp=2, microbatches=m, schedule=args.schedule, batch=args.batch) for m in ms]
        print("\nthe Trainer's whole steps (ms):")
        for plan, row in zip(plans, measure_plans(desc, plans, steps=8), strict=True):
            print(f"  {plan.label():16s} {[round(x * 1e3, 1) for x in row['step_s_all']]}")
    if preds:
        print("\npredicted (ms): per micro-batch forward / backward of each stage, a send, the schedule's makespan, the step")
        for m, p in preds.items():
            print(f"  m={m}: fwd {p['fwd']} bwd {p['bwd']} send {p['p2p']:.2f} makespan {p['makespan']:.2f} "
                  f"step {p['step']:.2f}  terms {p['terms']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
