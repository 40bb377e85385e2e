"""The measurements behind session 14's planner fixes (docs/planner.md, "Session 14"), on this machine's CPUs.

    PYTHONPATH=src python3 scripts/parallel/plan_step_parts.py probe        # a step right after the lockstep probe
    PYTHONPATH=src python3 scripts/parallel/plan_step_parts.py ddp          # DDP steps in a row against bare ones
    PYTHONPATH=src python3 scripts/parallel/plan_step_parts.py pipeline [LxD]   # a pipeline step's parts, per rank

- probe: a dp2 step of gpt 4x64 (4 samples a rank) timed right after a LockstepProbe reading, and timed after
  another step; medians over the steps, in ms.
- ddp: on 2 ranks, blocks of 8 training steps in a row (AdamW, zero_grad) of the bare GPT and of DDP, and the
  all-reduce of all gradients alone; the block medians, in ms (gpt 4x64, 4x128 and 8x64).
- pipeline: pp2 x dp2 on 4 ranks (gpt LxD, default 8x64, batch 8): per rank the schedule's step, the loss
  all-reduces, the gradient reduction and AdamW, medians in ms, for 1F1B with 2 micro-batches and GPipe with 1 and 2.
"""

from __future__ import annotations

import statistics
import sys
import time


def _probe_rank(rank: int, world: int, probe) -> dict[str, float]:
    import torch.distributed as dist

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    cfg = ModelConfig(n_layer=4, d=64, n_head=4, vocab=256, max_seq=64)
    pc = ParallelConfig(dp=world)
    tr = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"))
    out: dict[str, list[float]] = {"after the probe": [], "after a step": []}
    for step in range(12):
        idx, t = make_batch(cfg, 8, 64, seed=step)
        key = "after the probe" if step % 2 else "after a step"
        if key == "after the probe":
            probe.reading()
        dist.barrier()
        t0 = time.perf_counter()
        tr.step(idx, t)
        if step >= 2:
            out[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def _ddp_rank(rank: int, world: int, layers: int, d: int) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist

    from tilestack.parallel import GPT, ModelConfig, make_batch
    from tilestack.parallel.model import lm_loss
    from tilestack.parallel.parallelize import apply_ddp
    cfg = ModelConfig(n_layer=layers, d=d, n_head=4, vocab=256, max_seq=64)
    idx, t = make_batch(cfg, 4, 64, seed=0)
    torch.set_num_threads(1)
    models = {"bare": GPT(cfg, seed=0), "ddp": apply_ddp(GPT(cfg, seed=0), dist.group.WORLD)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False) for k, m in models.items()}
    grads = torch.zeros(sum(p.numel() for p in models["bare"].parameters()))

    def step(k):
        lm_loss(models[k](idx), t).backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
    calls = {"bare": lambda: step("bare"), "ddp": lambda: step("ddp"), "all-reduce": lambda: dist.all_reduce(grads)}
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(3):
        for k, fn in calls.items():
            ts = []
            for _ in range(8):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[k].append(round(statistics.median(ts[2:]) * 1e3, 2))
    return out


def _pipeline_rank(rank: int, world: int, kw: dict, layers: int = 8, d: int = 64) -> list[float]:
    import torch
    import torch.distributed as dist

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    cfg = ModelConfig(n_layer=layers, d=d, n_head=4, vocab=256, max_seq=64)
    pc = ParallelConfig(**kw)
    tr = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"))
    first, last = 0 in tr.stage_ids, tr.pc.n_stages - 1 in tr.stage_ids
    rows = []
    for s in range(12):
        idx, t = tr.local_batch(*make_batch(cfg, 8, 64, seed=s))
        dist.barrier()
        marks = [time.perf_counter()]
        losses: list[torch.Tensor] = []
        tr.schedule.step(*((idx,) if first else ()), target=t if last else None, losses=losses if last else None,
                         return_outputs=False)
        marks.append(time.perf_counter())
        loss = torch.stack(losses).mean().detach() if last else torch.zeros(())
        dist.all_reduce(loss, group=tr.mesh["pp"].get_group())
        marks.append(time.perf_counter())
        tr._reduce_gradients()
        marks.append(time.perf_counter())
        dist.all_reduce(loss, group=tr.mesh["dp"].get_group())
        marks.append(time.perf_counter())
        tr.optimizer_step()
        marks.append(time.perf_counter())
        rows.append([b - a for a, b in zip(marks, marks[1:], strict=False)] + [marks[-1] - marks[0]])
    return [statistics.median(r[k] for r in rows[3:]) * 1e3 for k in range(6)]


def main() -> int:
    from tilestack.parallel.launch import run_local
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "probe":
        from tilestack.parallel.plan.compute import PROBE_CHUNK_S, LockstepProbe
        for rank, res in enumerate(run_local(_probe_rank, 2, (LockstepProbe.calibrated(PROBE_CHUNK_S),))):
            print(f"rank {rank}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()))
    elif what == "ddp":
        for layers, d in ((4, 64), (4, 128), (8, 64)):
            print(f"gpt {layers}x{d} (rank 0, block medians, ms):", run_local(_ddp_rank, 2, (layers, d))[0])
    elif what == "pipeline":
        layers, d = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "8x64").split("x"))
        for kw in (dict(pp=2, dp=2, microbatches=2, pp_schedule="1f1b"),
                   dict(pp=2, dp=2, microbatches=1, pp_schedule="gpipe"),
                   dict(pp=2, dp=2, microbatches=2, pp_schedule="gpipe")):
            for rank, m in enumerate(run_local(_pipeline_rank, 4, (kw, layers, d))):
                print(f"{kw['pp_schedule']}-m{kw['microbatches']} rank {rank}: schedule {m[0]:.2f}, loss all-reduce "
                      f"pp {m[1]:.2f}, gradient reduction {m[2]:.2f}, loss all-reduce dp {m[3]:.2f}, AdamW "
                      f"{m[4]:.2f}, step {m[5]:.2f} ms")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
