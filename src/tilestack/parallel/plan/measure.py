"""Run plans for real and measure what the planner predicts: step time and peak memory per rank.

    rows = measure_plans(desc, [plan_a, plan_b], steps=6)          # gloo on this machine's CPUs (run_local)
    rows[0]["step_s"], rows[0]["peak_bytes"], rows[0]["components"]

Each plan runs in a fresh process group of ``plan.world_size`` ranks, training tilestack's parallel GPT with the
Trainer that ``tilestack train`` uses, on ``make_batch`` batches. Step time: the least, over the steps after
``warmup``, of the slowest rank's wall time (a step ends when its last rank does; the least is the step other
work on a shared machine disturbed least, as the planner's own timings are; the median is kept too).
With a probe (``probe_s``) its readings come before and after the steps, not between them (a step right after the
probe starts cold). Memory, without CUDA: three more steps run under ``torch.profiler`` with ``profile_memory``;
the peak of the running sum of a step's CPU allocations and frees (the least over the three), plus the bytes alive
when it began (parameters and optimizer state, counted tensor by tensor; gradients were freed by the previous
step), is the rank's peak. The bytes
of parameters, gradients (after the gradient reduction) and optimizer state are also counted tensor by tensor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from tilestack.parallel.plan.describe import ModelDesc, PlanError
from tilestack.parallel.plan.predict import Plan, runnable

PROBE_READINGS = 3          # probe readings before the steps, and as many after
PEAK_STEPS = 3              # steps profiled for the memory peak (the least of their peaks: see measure_rank)


def _tensor_bytes(ts) -> int:
    from torch.distributed.tensor import DTensor
    seen: dict[int, int] = {}
    for t in ts:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        st = local.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _optimizer_bytes(trainer) -> int:
    import torch
    if trainer.zero is not None:
        z = trainer.zero
        return z.state_bytes() + (z.grad_shard.numel() * z.grad_shard.element_size() if z.grad_shard is not None
                                  else 0)
    return _tensor_bytes(v for st in trainer.optimizer.state.values() for v in st.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)


def _allocator_records(prof) -> list[tuple[int, int]]:
    """The CPU allocator's records of the profiled span as (time ns, bytes): an allocation's bytes, a free's
    negative bytes, with the frees the profiler lost put back.

    A free is lost when a thread the profiler does not watch drops a tensor's last reference: gloo's worker
    threads hold each collective's work (and the temporaries made inside it, such as the clone of a
    reduce-scatter's input) until they finish with it, a few microseconds after the caller's wait returns.
    When the caller lets go first, the free happens on the worker and is never recorded, and the running sum
    stays high for the rest of the step: FSDP2's measured peak moved by a whole gathered block (+10% to +17%)
    between runs of one plan. Two rules put such a free back, at a time a watched free would have had:
    - an address allocated again while its block is still open was freed before: the free goes at the end of
      the outermost op that made the block (the time its owner's free is recorded when the race goes the other
      way), or just before the new allocation where that is earlier;
    - a block made inside a collective (a ``c10d::`` op) that is still open when the span ends goes at the end
      of its outermost op too. Blocks made elsewhere that stay open (the step's gradients) stay counted.
    """
    # (time, ptr, bytes, end of its outermost op, made inside a collective) of every CPU allocation and free
    events: list[tuple[int, int, int, int, bool]] = []

    def visit(node, root_end: int, in_collective: bool) -> None:
        in_collective = in_collective or node.name.startswith("c10d::")
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size, root_end, in_collective))
        for child in node.children:
            visit(child, root_end, in_collective)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        visit(root, max(root.end_time_ns, root.start_time_ns), False)
    events.sort(key=lambda e: e[0])
    records: list[tuple[int, int]] = []
    open_blocks: dict[int, tuple[int, int, bool]] = {}       # ptr -> (bytes, end of its outermost op, in c10d)
    for t, ptr, nbytes, root_end, in_collective in events:
        if nbytes > 0:
            if ptr in open_blocks:                     # its free was lost: it came before this allocation
                lost, lost_end, _ = open_blocks.pop(ptr)
                records.append((min(lost_end, t - 1), -lost))
            open_blocks[ptr] = (nbytes, root_end, in_collective)
        else:
            open_blocks.pop(ptr, None)                 # a block from before the span is freed: its bytes count
        records.append((t, nbytes))
    records += [(end, -nbytes) for nbytes, end, in_collective in open_blocks.values() if in_collective]
    records.sort(key=lambda r: r[0])
    return records


def _peak_allocated(prof) -> int:
    """The peak of the running sum of the CPU allocator's own records (an allocation's bytes, a free's negative
    bytes, in the order they happened; lost frees put back, see ``_allocator_records``) over the profiled span:
    the most bytes allocated during it alive at once. Frees of tensors allocated before the span are not recorded
    (their sizes are unknown to the profiler). The records are the allocator's, not the ops': an op's net
    allocation placed at the op's start (its ``self_cpu_memory_usage``) runs ahead of frees inside it and
    overstated 1F1B's peak by up to 50%."""
    run = peak = 0
    for _, nbytes in _allocator_records(prof):
        run += nbytes
        peak = max(peak, run)
    return peak


def measure_rank(rank: int, world_size: int, spec: dict) -> dict:
    """One rank: train ``spec["steps"]`` timed steps, then one profiled for memory. Returns per-step seconds,
    losses, the peak bytes and the counted components."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, make_batch
    pc = ParallelConfig(**spec["parallel"])
    cfg = ModelConfig(**spec["model"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = GPT(cfg, seed=0).to(dtype)
    trainer = Trainer(model, pc, pc.build_mesh("cpu"))
    seconds, losses, probes = [], [], []
    # the probe's readings bracket the steps rather than fall between them: its tens of ms of other work leave
    # caches and the interpreter's paths cold, and a step timed right after it took 4-11% longer (gpt 4x64, dp2;
    # scripts/parallel/plan_step_parts.py probe). In training a step follows a step.
    readings = PROBE_READINGS if spec["probe"] is not None else 0
    probes += [spec["probe"].reading() for _ in range(readings)]
    for step in range(spec["steps"]):
        idx, targets = make_batch(cfg, spec["batch"], spec["seq"], seed=step)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        losses.append(trainer.step(idx, targets))
        seconds.append(time.perf_counter() - t0)
    probes += [spec["probe"].reading() for _ in range(readings)]
    params = _tensor_bytes(trainer.params)
    before = params + _optimizer_bytes(trainer)
    # the peak of PEAK_STEPS profiled steps, the least: a free the profiler lost (see _allocator_records) only
    # ever raises a step's running sum, and the rules that put them back miss a few (a tensor handed to a
    # collective and let go by its caller before gloo's worker: one bucket more, in 1 of ~12 ZeRO-1 runs);
    # the steps are the same program, so the least is the step the profiler lost nothing of
    peaks, grads = [], None
    for k in range(PEAK_STEPS):
        idx, targets = make_batch(cfg, spec["batch"], spec["seq"], seed=spec["steps"] + k)
        torch.distributed.barrier()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.forward_backward(idx, targets)
            if grads is None:
                grads = _tensor_bytes(p.grad for p in trainer.params)
                if trainer.zero is not None and trainer.zero.grad_shard is not None:
                    grads += trainer.zero.grad_shard.numel() * trainer.zero.grad_shard.element_size()
            trainer.optimizer_step()
        peaks.append(_peak_allocated(prof))
    return dict(seconds=seconds, losses=losses, probes=probes, peak_bytes=before + min(peaks),
                components=dict(parameters=params, gradients=grads, optimizer=_optimizer_bytes(trainer)))


def _slowdowns(res: list[dict], probe: Any) -> dict[str, float | None]:
    """The least and the median (``_median``), over the probe's readings before and after the steps, of the
    slowdown and the seconds of one synchronisation (collective, p2p) they show (LockstepProbe.reading; per
    reading the slowest rank's of each); None without a probe."""
    keys = ("slowdown", "collective_s", "p2p_s")
    if probe is None:
        return {k + tail: None for k in keys for tail in ("", "_median")}
    n = len(res[0]["probes"])
    work, collective, p2p = ([max(r["probes"][i][k] for r in res) for i in range(n)] for k in range(3))
    return dict(slowdown=probe.slowdown(min(work), min(collective)), collective_s=min(collective), p2p_s=min(p2p),
                slowdown_median=probe.slowdown(statistics.median(work), statistics.median(collective)),
                collective_s_median=statistics.median(collective), p2p_s_median=statistics.median(p2p),
                probe_message_bytes=probe.message_bytes)


def measure_plans(desc: ModelDesc, plans: Sequence[Plan], *, steps: int = 6, warmup: int = 2,
                  dtype: str = "float32", timeout_s: float = 600.0, probe_s: float = 0.0,
                  rounds: int = 1) -> list[dict[str, Any]]:
    """Each plan trained for ``steps`` steps on ``plan.world_size`` gloo processes; a row per plan (module doc).
    ``probe_s`` > 0: before and after the steps the ranks also run ``PROBE_READINGS`` lockstep probes each, of that
    many idle seconds of fixed work (compute.LockstepProbe.reading); the row's ``slowdown``, ``collective_s`` and
    ``p2p_s`` are the least over the readings of the slowest rank's (``_median``: the medians): how much this
    machine's other work slowed ranks in lockstep while the plan ran, and how long a synchronisation took
    (compute.sync_delays). ``rounds`` > 1: every plan is run that many times, the plans interleaved (round r
    starts at plan r, so no plan is always first after a cold start), and each plan's runs pooled (``pool_rounds``):
    on a shared machine a plan measured once moved by 20% between runs minutes apart (docs/planner.md, run 8),
    more than the model's terms; spread over the run, the drift falls on every plan alike."""
    from tilestack.parallel.plan.compute import LockstepProbe
    probe = LockstepProbe.calibrated(probe_s) if probe_s > 0 else None
    if steps <= warmup:
        raise PlanError(f"measure_plans: steps={steps} with warmup={warmup}; expected steps > warmup")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PlanError(f"measure_plans: rounds={rounds!r}; expected an int >= 1")
    for plan in plans:
        if not runnable(plan, desc):
            raise PlanError(f"measure_plans: plan {plan.label()} cannot run on tilestack's Trainer (model "
                            f"{desc.name!r}, even stages only); expected a runnable plan")
    runs: list[list[dict]] = [[] for _ in plans]
    for r in range(rounds):
        for k in range(len(plans)):
            i = (r + k) % len(plans)
            runs[i].append(_measure_one(plans[i], desc, steps, warmup, dtype, timeout_s, probe))
    return [pool_rounds(rs) for rs in runs]


def _measure_one(plan: Plan, desc: ModelDesc, steps: int, warmup: int, dtype: str, timeout_s: float,
                 probe) -> dict[str, Any]:
    """One run of ``plan`` on fresh gloo processes: a row as ``measure_plans`` returns it (``rounds`` = 1)."""
    from tilestack.parallel.launch import run_local
    spec = dict(parallel=plan.parallel_kwargs(), model=desc.config, batch=plan.batch, seq=desc.seq, steps=steps,
                dtype=dtype, probe=probe)
    res = run_local(measure_rank, plan.world_size, (spec,), timeout_s=timeout_s, retries=1)
    per_step = [max(r["seconds"][i] for r in res) for i in range(steps)][warmup:]
    worst = max(res, key=lambda r: r["peak_bytes"])
    return dict(plan=plan.label(), world_size=plan.world_size, step_s=min(per_step),
                step_s_median=statistics.median(per_step), step_s_all=per_step, peak_bytes=worst["peak_bytes"],
                peak_bytes_per_rank=[r["peak_bytes"] for r in res], components=worst["components"],
                loss=res[0]["losses"][-1], rounds=1,
                **_slowdowns(res, probe))


def pool_rounds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from several runs of one plan (``measure_plans``'s rows): the step times pooled (``step_s``: the least
    of all; ``step_s_median``: the median of all, ``step_s_all`` every one, run after run), the probe's least
    readings the least of the runs' and its medians the median of the runs' medians; memory from the run with the
    highest peak (the peak is a property of the plan: the runs agree to the allocator's rounding); the last run's
    loss. A single run is returned as it is."""
    if not runs:
        raise PlanError("pool_rounds: no runs given; expected at least one row of measure_plans")
    if len({r["plan"] for r in runs}) != 1:
        raise PlanError(f"pool_rounds: runs of different plans {sorted({r['plan'] for r in runs})}; expected one plan")
    if len(runs) == 1:
        return dict(runs[0])
    steps = [s for r in runs for s in r["step_s_all"]]
    worst = max(runs, key=lambda r: r["peak_bytes"])
    out = dict(runs[-1], step_s=min(steps), step_s_median=statistics.median(steps), step_s_all=steps,
               step_s_medians=[r["step_s_median"] for r in runs], peak_bytes=worst["peak_bytes"],
               peak_bytes_per_rank=worst["peak_bytes_per_rank"], components=worst["components"], rounds=len(runs))
    for key in ("slowdown", "collective_s", "p2p_s"):
        if runs[0].get(key) is None:
            continue
        out[key] = min(r[key] for r in runs)
        out[key + "_median"] = statistics.median(r[key + "_median"] for r in runs)
    return out
