"""What the parallel wrappers cost on the host, beyond the arithmetic and the bytes: measured on a one-rank group.

    oh = measure_overheads(desc, micro_batch=2)     # seconds: {"tp": per block, "sp": per block, "fsdp": per block,
                                                    #           "ddp": per step, "pipeline": per micro-batch,
                                                    #           "zero": per step}

On a GPU these are hidden behind kernels; on a CPU they are not: a DTensor op dispatches through sharding
propagation in Python, FSDP2 and DDP run hooks and copy into flat buffers, a pipeline schedule splits the batch
and runs its actions, ZeRO flattens gradients and slices. Each is timed on the real wrapper
(tilestack.parallel.parallelize's apply_tp / apply_fsdp / apply_ddp, torch's pipelining, ZeroOptimizer) in one
spawned process whose process group has one rank, so its collectives move nothing, against the same model
unwrapped: the difference is the wrapper's own cost. Times are the minimum of rounds that alternate between
the variants, so that a busy machine disturbs each alike.
"""

from __future__ import annotations

import time
from typing import Any

from tilestack.parallel.plan.describe import ModelDesc, PlanError

ROUNDS = 7
OVERHEADS = ("tp", "sp", "fsdp", "ddp", "pipeline", "zero")


def _overhead_rank(rank: int, world_size: int, cfg_kw: dict, batch: int, seq: int, microbatches: int,
                   rounds: int) -> dict[str, float]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch
    from tilestack.parallel.parallelize import apply_ddp, apply_fsdp, apply_tp
    from tilestack.parallel.zero import ZeroOptimizer
    cfg = ModelConfig(**cfg_kw)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    idx, targets = make_batch(cfg, batch, seq)
    models: dict[str, Any] = {}
    for name in ("plain", "tp", "sp", "fsdp", "ddp"):
        m = GPT(cfg, seed=0)
        if name in ("tp", "sp"):
            apply_tp(m, mesh, sp=name == "sp")
        elif name == "fsdp":
            apply_fsdp(m, mesh)
        elif name == "ddp":
            m = apply_ddp(m, mesh.get_group())
        models[name] = m
    steps = {name: (lambda m=m: lm_loss(m(idx), targets).backward()) for name, m in models.items()}
    # pipeline: one stage running ``microbatches`` micro-batches, against the plain model on one micro-batch each
    stage = PipelineStage(GPT(cfg, seed=0), 0, 1, torch.device("cpu"), group=mesh.get_group())
    sched = ScheduleGPipe(stage, microbatches, loss_fn=lm_loss)
    steps["pipeline"] = lambda: sched.step(idx, target=targets, losses=[])
    mb = batch // microbatches
    plain_mb = models["plain"]
    steps["plain_mb"] = lambda: [lm_loss(plain_mb(idx[:mb]), targets[:mb]).backward() for _ in range(microbatches)]
    # ZeRO on a one-rank group against AdamW, both foreach=False as the Trainer's
    params = [torch.nn.Parameter(p.detach().clone()) for p in GPT(cfg, seed=0).parameters()]
    for p in params:
        p.grad = torch.ones_like(p)
    adam = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    zparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
    zero = ZeroOptimizer(zparams, mesh.get_group(), stage=1,
                         make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))

    def zero_step():
        for p in zparams:
            p.grad = torch.ones_like(p)
        zero.reduce_gradients()
        zero.step()

    def adam_step():
        for p in params:
            p.grad = torch.ones_like(p)
        adam.step()

    steps["zero"], steps["adam"] = zero_step, adam_step
    best = {k: float("inf") for k in steps}
    for r in range(rounds + 1):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:                          # round 0 warms up
                best[k] = min(best[k], dt)
    for m in models.values():
        m.zero_grad(set_to_none=True)
    n_blocks = cfg.n_layer
    return {
        "tp": max(best["tp"] - best["plain"], 0.0) / n_blocks,
        "sp": max(best["sp"] - best["plain"], 0.0) / n_blocks,
        "fsdp": max(best["fsdp"] - best["plain"], 0.0) / n_blocks,
        "ddp": max(best["ddp"] - best["plain"], 0.0),
        "pipeline": max(best["pipeline"] - best["plain_mb"], 0.0) / microbatches,
        "zero": max(best["zero"] - best["adam"], 0.0),
    }


def measure_overheads(desc: ModelDesc, *, micro_batch: int = 2, microbatches: int = 2,
                      rounds: int = ROUNDS) -> dict[str, float]:
    """The wrappers' host costs for tilestack's GPT ``desc`` (module docstring), in seconds."""
    if not desc.config:
        raise PlanError(f"measure_overheads: model {desc.name!r} is not tilestack's GPT; expected a description from "
                        "describe_gpt (the wrappers are those of tilestack.parallel)")
    from tilestack.parallel.launch import run_local
    batch = micro_batch * microbatches
    return run_local(_overhead_rank, 1, (desc.config, batch, desc.seq, microbatches, rounds))[0]
