"""Where the planner's compute time goes missing: per-layer timing in one process against a real step.

    PYTHONPATH=src python3 scripts/parallel/plan_compute_gap.py --model 4x64 --batch 8 --nproc 2

For one small GPT it prints, in milliseconds:
- ``layers``: the sum of MeasuredCompute's per-layer forward + backward times for the local batch (what the planner
  counts as a rank's compute, in context: MeasuredCompute.context), and AdamW's fitted step (in context too);
- ``alone``: a plain (undistributed) training step of the whole model on one thread, timed in this process
  (least and median over the steps);
- ``side by side``: the same plain step run by ``--nproc`` processes at once, each on one thread, meeting at a
  barrier between steps but never communicating inside the step (what a data-parallel rank computes, without its
  all-reduce);
- ``dp``: the real data-parallel step (tilestack's Trainer, DDP) on ``--nproc`` gloo ranks.
The differences locate the gap: ``alone - layers`` is composition (the whole model's step against its layers
timed alone, caches and allocator included); ``side by side - alone`` is the cost of sharing the machine;
``dp - side by side`` is the gradient reduction and DDP.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _plain_step_times(cfg_kwargs: dict, batch: int, seq: int, steps: int, barrier: bool) -> list[float]:
    import torch

    from tilestack.parallel import GPT, ModelConfig, make_batch
    from tilestack.parallel.engine import adamw_foreach
    from tilestack.parallel.model import lm_loss
    torch.set_num_threads(1)
    cfg = ModelConfig(**cfg_kwargs)
    model = GPT(cfg, seed=0)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=adamw_foreach(params))
    out = []
    for step in range(steps):
        idx, targets = make_batch(cfg, batch, seq, seed=step)
        if barrier:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        lm_loss(model(idx), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def _side_by_side_rank(rank: int, world: int, cfg_kwargs: dict, batch: int, seq: int, steps: int) -> list[float]:
    return _plain_step_times(cfg_kwargs, batch, seq, steps, barrier=True)


def _dp_rank(rank: int, world: int, cfg_kwargs: dict, batch: int, seq: int, steps: int) -> list[float]:
    import torch

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    cfg = ModelConfig(**cfg_kwargs)
    pc = ParallelConfig(dp=world)
    trainer = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"))
    out = []
    for step in range(steps):
        idx, targets = make_batch(cfg, batch * world, seq, seed=step)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.step(idx, targets)
        out.append(time.perf_counter() - t0)
    return out


def _summary(name: str, per_step: list[float], warmup: int) -> str:
    t = per_step[warmup:]
    return f"{name:14s} least {min(t) * 1e3:8.2f}  median {statistics.median(t) * 1e3:8.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="4x64", help="LAYERSxWIDTH (4 heads, vocab 256)")
    ap.add_argument("--batch", type=int, default=4, help="samples per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    from tilestack.parallel.launch import run_local
    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import MeasuredCompute, describe_gpt
    L, D = (int(x) for x in args.model.split("x"))
    cfg_kwargs = dict(n_layer=L, d=D, n_head=4, vocab=256, max_seq=args.seq)
    desc = describe_gpt(ModelConfig(**cfg_kwargs), args.seq, name=f"gpt-{args.model}")
    compute = MeasuredCompute.for_gpt(desc, overheads=False)
    fwd = bwd = 0.0
    for i, _ in enumerate(desc.layers):
        f, b = compute.layer_times(i, args.batch, 1)
        fwd, bwd = fwd + f, bwd + b
    opt = compute.optimizer_s(desc.params, sum(la.tensors for la in desc.layers))
    print(f"{'layers':14s} fwd {fwd * 1e3:8.2f}  bwd {bwd * 1e3:8.2f}  adamw {opt * 1e3:6.2f}  "
          f"sum {(fwd + bwd + opt) * 1e3:8.2f}  (in context: layers x {compute.context(args.batch):.3f}, "
          f"adamw x {compute.optimizer_context():.3f})", flush=True)
    print(_summary("alone", _plain_step_times(cfg_kwargs, args.batch, args.seq, args.steps, False), args.warmup),
          flush=True)
    res = run_local(_side_by_side_rank, args.nproc, (cfg_kwargs, args.batch, args.seq, args.steps))
    print(_summary("side by side", [max(r[i] for r in res) for i in range(args.steps)], args.warmup), flush=True)
    res = run_local(_dp_rank, args.nproc, (cfg_kwargs, args.batch, args.seq, args.steps))
    print(_summary("dp", [max(r[i] for r in res) for i in range(args.steps)], args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
