"""What the parallel wrappers cost on the host, beyond the arithmetic and the bytes the planner counts.

    oh = measure_overheads(desc, compute)           # seconds: {"tp": per block, "sp": per block, "fsdp": per block,
                                                    #           "ddp": per step, "pipeline": per stage and micro-batch,
                                                    #           "zero": per step, "reduce": per step,
                                                    #           "tp optimizer": per tensor,
                                                    #           "fsdp optimizer": per tensor}

On a GPU these are hidden behind kernels; on a CPU they are not: a DTensor op dispatches through sharding
propagation in Python, FSDP2 and DDP run hooks and copy into flat buffers, a pipeline schedule splits the batch
and runs its actions, ZeRO flattens gradients and slices. Each is timed on the real wrapper
(tilestack.parallel.parallelize's apply_tp / apply_fsdp / apply_ddp, torch's pipelining, ZeroOptimizer).
Times are the median over rounds that alternate between the variants, each divided by the slowdown that a
lockstep probe right after it shows (compute.LockstepProbe: this machine is shared with other work).

- pipeline, zero, reduce: in one process whose group has one rank (their collectives move nothing), against the
  same model unwrapped; the difference is the wrapper's own cost. ZeRO's against AdamW over one flat tensor of all
  the parameters, which is what its own optimizer steps (runs 1-6 compared it with AdamW over every tensor and
  then charged AdamW per tensor as well); reduce is the Trainer's flat-buffer gradient reduction (pipelines, tp
  with dp), against setting the gradients alone. predict scales both by the share of the parameters a rank holds.
- ddp: on a group of ``degree`` ranks (2), whole training steps against the bare model's and one plain all-reduce of
  all the gradients (what the planner counts): DDP's bucketed all-reduces run on gloo's threads while the backward
  computes, on the same cores, and its last bucket waits for the slower rank. A one-rank group (runs 1-5) saw only
  its hooks and copies: on this CPU (2026-12-04, gpt 4x64, 4 samples a rank) 1.1 ms, where a dp2 step took 4.0 ms
  more than two bare ranks side by side and the all-reduce alone 1.6 ms (gpt 4x128: 8.5 and 2.8 ms). Timed in
  blocks of steps in a row, as training runs them (``_median_of_blocks``): DDP's steps are bimodal on gloo, and
  interleaved with other calls they took the fast mode more often.
- tp, sp, fsdp: on a group of ``degree`` ranks (2), because there the wrapper's cost is mostly in its
  collectives and a one-rank group skips them: DTensor issues more collectives than Megatron's 2 + 2 per block
  (each column-parallel input's gradient, the embeddings, the head), each through the functional collectives'
  asynchronous path, which on gloo costs a few times a plain ``dist.all_reduce`` of the same bytes. The
  wrapper's step is timed against what the planner counts for it, measured in the same rounds: the layers'
  compute at that degree (``compute.layer_times``) and the collectives of the communication model (tp, sp: 2 + 2
  all-reduces of a block's output per block; fsdp: two all-gathers and a reduce-scatter of each unit's
  parameters) run as plain collectives on the same group. The rest, per block, is the overhead.
- tp optimizer, fsdp optimizer: on the same group, AdamW's step (foreach=False, as the Trainer's) over the
  wrapper's DTensor parameters against AdamW over plain tensors of their local shapes, per tensor: each of its
  dozen ops per tensor dispatches through DTensor (gpt-4x64 on 2 ranks: 62-64 ms a step against 8 for plain
  tensors).
"""

from __future__ import annotations

import time
from typing import Any

from tilestack.parallel.plan.compute import ComputeModel, LockstepProbe
from tilestack.parallel.plan.describe import TP_ALLREDUCES_BWD, TP_ALLREDUCES_FWD, ModelDesc, PlanError

ROUNDS = 7
OVERHEADS = ("tp", "sp", "fsdp", "ddp", "pipeline", "zero", "reduce", "tp optimizer", "fsdp optimizer")
DDP_BLOCKS, DDP_BLOCK_STEPS = 3, 6    # DDP's overhead: blocks of training steps in a row (_median_of_blocks)
GROUP_DEGREE = 2          # the group the collective-bound wrappers (tp, sp, fsdp) are timed on


def _overhead_rank(rank: int, world_size: int, cfg_kw: dict, batch: int, seq: int, microbatches: int,
                   rounds: int, probe: LockstepProbe) -> dict[str, float]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch
    from tilestack.parallel.parallelize import all_reduce_gradients
    from tilestack.parallel.zero import ZeroOptimizer
    cfg = ModelConfig(**cfg_kw)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    idx, targets = make_batch(cfg, batch, seq)
    models: dict[str, Any] = {"plain": GPT(cfg, seed=0)}
    steps = {name: (lambda m=m: lm_loss(m(idx), targets).backward()) for name, m in models.items()}
    # pipeline: one stage running ``microbatches`` micro-batches, against the plain model on one micro-batch each
    stage = PipelineStage(GPT(cfg, seed=0), 0, 1, torch.device("cpu"), group=mesh.get_group())
    sched = ScheduleGPipe(stage, microbatches, loss_fn=lm_loss)
    steps["pipeline"] = lambda: sched.step(idx, target=targets, losses=[], return_outputs=False)   # as the Trainer
    mb = batch // microbatches
    plain_mb = models["plain"]
    steps["plain_mb"] = lambda: [lm_loss(plain_mb(idx[:mb]), targets[:mb]).backward() for _ in range(microbatches)]
    # ZeRO on a one-rank group against AdamW over one flat tensor, both foreach=False as the Trainer's
    params = [torch.nn.Parameter(p.detach().clone()) for p in GPT(cfg, seed=0).parameters()]
    zparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
    zero = ZeroOptimizer(zparams, mesh.get_group(), stage=1,
                         make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))

    # ZeRO's own AdamW steps one flat tensor (its master slice): the overhead is what it does beyond that step
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]).float())
    flat.grad = torch.ones_like(flat)
    adam_flat = torch.optim.AdamW([flat], lr=1e-3, foreach=False)

    def zero_step():
        for p in zparams:
            p.grad = torch.ones_like(p)
        zero.reduce_gradients()
        zero.step()

    def adam_step():
        for p in params:
            p.grad = torch.ones_like(p)
        adam_flat.step()

    # the Trainer's own gradient reduction (pipelines, tp + dp): a flat buffer, the all-reduce (nothing to move
    # on one rank), the division and the copies back
    rparams = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def reduce_step():
        for p in rparams:
            p.grad = torch.ones_like(p)
        all_reduce_gradients(rparams, mesh.get_group())

    def grads_only():
        for p in rparams:
            p.grad = torch.ones_like(p)

    steps["zero"], steps["adam"], steps["reduce"], steps["grads"] = zero_step, adam_step, reduce_step, grads_only
    typical = _median_of_rounds(steps, rounds, probe)
    for m in models.values():
        m.zero_grad(set_to_none=True)
    return {
        "pipeline": max(typical["pipeline"] - typical["plain_mb"], 0.0) / microbatches,
        "zero": max(typical["zero"] - typical["adam"], 0.0),
        "reduce": max(typical["reduce"] - typical["grads"], 0.0),
    }


def _median_of_rounds(steps: dict[str, Any], rounds: int, probe: LockstepProbe) -> dict[str, float]:
    """The median time of each step over ``rounds`` rounds that alternate between them (round 0 warms up), each
    round's times divided by the slowdown that a LockstepProbe right after the round shows: this machine is shared,
    and what the wrappers cost is wanted on idle cores, as the layers' times are. The median, not the least: on gloo
    a functional collective's wait takes either about 0.4 or about 3 ms, and the least of a few rounds catches the
    fast ones that a step of tens of collectives does not. A barrier lines the ranks up before each call, so a
    step's time is its own, not a wait for another rank."""
    import statistics

    import torch.distributed as dist
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 1):
        raw = {}
        for k, fn in steps.items():
            # each call timed follows an untimed one, as in training a step follows a step (the probe, or another
            # step's different work, leaves caches and the interpreter's paths cold: measure.py)
            dist.barrier()
            fn()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            raw[k] = time.perf_counter() - t0
        # one reading for the whole round: every call of a round divided by the same slowdown, so a difference of
        # two of them is not the difference of two readings' noise
        slow = probe.slowdown(probe.work_s())
        if r:
            for k, dt in raw.items():
                times[k].append(dt / slow)
    return {k: statistics.median(v) for k, v in times.items()}


def _median_of_blocks(steps: dict[str, Any], blocks: int, per_block: int, probe: LockstepProbe,
                      diff: tuple[str, ...]) -> float:
    """The median over ``blocks`` of diff[0] - diff[1] - ... , each the median of ``per_block`` calls in a row
    (the first two not timed), a block's times divided by the slowdown a LockstepProbe right after it shows. In a
    row, as training runs them: DDP's steps on gloo are bimodal (on this CPU, gpt 4x64 at 4 samples a rank, 12-13 ms
    or 16-22 ms against the bare model's 11-12), and interleaved with other calls they took the fast mode more
    often than consecutive steps do (median overhead 0.3-0.5 ms interleaved, 2-4 ms in a row:
    scripts/parallel/plan_step_parts.py ddp)."""
    import statistics

    import torch.distributed as dist
    per: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(blocks):
        for k, fn in steps.items():
            ts = []
            for i in range(per_block + 2):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    ts.append(time.perf_counter() - t0)
            per[k].append(statistics.median(ts) / probe.slowdown(probe.work_s()))
    a, *rest = diff
    return statistics.median(per[a][i] - sum(per[b][i] for b in rest) for i in range(blocks))


def _group_rank(rank: int, world_size: int, cfg_kw: dict, batch: int, seq: int, tp_bytes: float,
                unit_bytes: list[float], rounds: int, probe: LockstepProbe) -> dict[str, float]:
    """One rank of a ``world_size`` group: the tp, sp and fsdp wrappers' forward and backward of a ``batch``, and
    the plain collectives the planner counts for each (``tp_bytes``: a block's output, all-reduced 2 + 2 times
    per block; ``unit_bytes``: each FSDP unit's parameters, all-gathered twice and reduce-scattered once)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch
    from tilestack.parallel.parallelize import apply_ddp, apply_fsdp, apply_tp
    cfg = ModelConfig(**cfg_kw)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("x",))
    idx, targets = make_batch(cfg, batch, seq)
    steps: dict[str, Any] = {}
    tensors: dict[str, int] = {}
    # DDP against the bare model on each rank and one all-reduce of all the gradients' bytes (what the planner
    # counts): its buckets' all-reduces run on gloo's threads beside the backward, and wait for the slower rank
    # whole training steps (AdamW, foreach=False as the Trainer's, and zero_grad included): DDP's reducer then
    # meets fresh gradients each step as in training
    plain, ddp = GPT(cfg, seed=0), apply_ddp(GPT(cfg, seed=0), mesh.get_group())

    def train_step(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False)

        def run():
            lm_loss(m(idx), targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    grads = torch.zeros(sum(p.numel() for p in plain.parameters()), dtype=next(plain.parameters()).dtype)
    ddp_steps = {"plain": train_step(plain), "ddp": train_step(ddp), "dp_comm": lambda: dist.all_reduce(grads)}
    ddp_extra = _median_of_blocks(ddp_steps, DDP_BLOCKS, DDP_BLOCK_STEPS, probe, ("ddp", "plain", "dp_comm"))
    for name in ("tp", "sp", "fsdp"):
        m = GPT(cfg, seed=0)
        if name == "fsdp":
            apply_fsdp(m, mesh)
        else:
            apply_tp(m, mesh, sp=name == "sp")
        steps[name] = lambda m=m: lm_loss(m(idx), targets).backward()
        if name != "sp":
            # AdamW (foreach=False, as the Trainer's) over the wrapper's DTensor parameters, against AdamW over
            # plain tensors of their local shapes: every one of its dozen ops per tensor dispatches through DTensor
            params = list(m.parameters())
            local = [torch.nn.Parameter((p.to_local() if isinstance(p, DTensor) else p).detach().clone())
                     for p in params]
            for p in params + local:
                p.grad = torch.ones_like(p)
            steps[f"{name}_adamw"] = torch.optim.AdamW(params, lr=1e-3, foreach=False).step
            steps[f"{name}_adamw_plain"] = torch.optim.AdamW(local, lr=1e-3, foreach=False).step
            tensors[name] = len(params)
    block_out = torch.zeros(int(tp_bytes) // 4)                       # f32 elements
    tp_collectives = cfg.n_layer * (TP_ALLREDUCES_FWD + TP_ALLREDUCES_BWD)
    steps["tp_comm"] = lambda: [dist.all_reduce(block_out) for _ in range(tp_collectives)]
    units = [(torch.zeros(int(b) // 4 // world_size), torch.zeros(int(b) // 4 // world_size * world_size))
             for b in unit_bytes]

    def fsdp_comm():
        for shard, full in units:
            dist.all_gather_into_tensor(full, shard)
            dist.all_gather_into_tensor(full, shard)
            dist.reduce_scatter_tensor(shard, full)

    steps["fsdp_comm"] = fsdp_comm
    typical = _median_of_rounds(steps, rounds, probe)
    typical["ddp extra"] = ddp_extra
    for name, n in tensors.items():
        typical[f"{name} optimizer"] = max(typical[f"{name}_adamw"] - typical[f"{name}_adamw_plain"], 0.0) / n
    return typical


def measure_overheads(desc: ModelDesc, compute: ComputeModel, *, micro_batch: int = 2, microbatches: int = 2,
                      degree: int = GROUP_DEGREE, rounds: int = ROUNDS) -> dict[str, float]:
    """The wrappers' host costs for tilestack's GPT ``desc`` (module docstring), in seconds; ``compute`` gives
    the layers' own times that the wrappers' steps are compared with."""
    if not desc.config:
        raise PlanError(f"measure_overheads: model {desc.name!r} is not tilestack's GPT; expected a description from "
                        "describe_gpt (the wrappers are those of tilestack.parallel)")
    from tilestack.parallel.launch import run_local
    batch = micro_batch * microbatches
    probe = LockstepProbe.calibrated()
    out = run_local(_overhead_rank, 1, (desc.config, batch, desc.seq, microbatches, rounds, probe), retries=1)[0]
    blocks = [layer for layer in desc.layers if layer.kind == "block"]
    roots = [layer for layer in desc.layers if layer.kind != "block"]
    e = desc.dtype_bytes
    unit_bytes = [layer.params * e for layer in blocks] + [sum(layer.params for layer in roots) * e]
    tp_bytes = blocks[0].tp_comm_bytes * batch
    typical = run_local(_group_rank, degree, (desc.config, batch, desc.seq, tp_bytes, unit_bytes, rounds, probe),
                        retries=1)[0]

    def layers_s(tp: int) -> float:
        return sum(sum(compute.layer_times(i, batch, tp)) for i in range(len(desc.layers)))

    for name, tp, comm in (("tp", degree, "tp_comm"), ("sp", degree, "tp_comm"), ("fsdp", 1, "fsdp_comm")):
        out[name] = max(typical[name] - typical[comm] - layers_s(tp), 0.0) / len(blocks)
    for name in ("tp optimizer", "fsdp optimizer"):
        out[name] = typical[name]
    out["ddp"] = max(typical["ddp extra"], 0.0)
    return out
