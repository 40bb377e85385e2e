"""The predicted step time and memory per rank of one plan.

    plan = Plan(pp=2, dp=2, microbatches=4, batch=16)
    pred = predict(plan, desc, compute, comm)
    pred.step_s, pred.terms, pred.bound, pred.memory_bytes, pred.memory[rank]["activations"], pred.mfu(peak)

A step is: the pipeline (every stage's forwards and backwards per micro-batch, run through the schedule's
simulator, so its bubble is in it), then the data-parallel gradient reduction, then the optimizer step.

Per stage and micro-batch of b samples: forward = the layers' measured (or roofline) forward at (b, tp), times
the contention of ranks sharing CPU cores; plus Megatron's tensor-parallel all-reduces (2 forward, 2 backward
per block, of b s d elements; a full recompute replays the forward's 2) and, with FSDP, an all-gather of each
layer's parameters before its forward and again before its backward, and a reduce-scatter of its gradients
after. Backward = backward + recompute (the whole forward again, or attention's share of it for selective).
Stages pass b s d elements to their neighbours (point to point). After the pipeline: an all-reduce of the
gradients over dp (DDP, or the Trainer's flat one), or for ZeRO-1 an all-reduce and ZeRO-2 a reduce-scatter,
then an all-gather of the parameters (and, for a weight two pipeline ranks hold, a tied head or a block called
on two stages, an all-reduce of its gradients between them); the optimizer runs on the rank's own elements. On
a shared CPU every collective also costs what the probe's scalar all-reduce (``compute.collective_s``) takes beyond the
idle one of its group size, and every pipeline send ``compute.p2p_delay`` (the ranks that
meet there wait for one that lost its core, or for a core to come back to; the lockstep probe measures both), so
a plan pays them as often as its ranks meet: per block and micro-batch under tp, per micro-batch and stage edge
under a pipeline (where the simulator puts the send on the critical path), per step for the data-parallel
reduction and the loss.

Memory per rank (bytes; the largest rank is the plan's), by component: parameters, gradients and AdamW's two
moments of the rank's layers, divided by tp for the tensor-parallel ones and by dp_shard (FSDP); ZeRO as
ZeroOptimizer keeps it (f32 master copy and moments of 1/dp, a gradient slice, the flattened copies of a bucket
while it reduces it); activations: Korthikanti et al.'s bytes per layer and sample under the recompute policy
(divided by tp where tensor parallelism splits them; all of them with sequence parallelism but the all-gathered
inputs torch saves whole), with a pipeline also each stage's output (torch's PipelineStage keeps it to the
micro-batch's backward: the last stage's logits), times the micro-batch, times the micro-batches the schedule
keeps in flight on that rank (the simulator's count); transient buffers: one block rebuilt under full
recompute, FSDP2's gathered units and gradient copies, a pipeline stage's receive buffers (one per micro-batch in
torch's PipelineStage). The Trainer runs the schedule with return_outputs=False, so no logits are kept past a
micro-batch's backward. The peak (``peak_parts``) is parameters + optimizer + the largest of three moments: the first
backward begins (activations in flight and cross-entropy's gradients, no parameter gradient yet), a forward
after a backward (1F1B's steady state, beside the gradients), after backward.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from tilestack.parallel.config import RECOMPUTE, ZERO_STAGES
from tilestack.parallel.parallelize import trainer_reduces_gradients, uses_ddp
from tilestack.parallel.plan.comm import CommModel
from tilestack.parallel.plan.compute import ComputeModel
from tilestack.parallel.plan.describe import (
    FP32_BYTES,
    INT64_MAX,
    TP_ALLREDUCES_BWD,
    TP_ALLREDUCES_FWD,
    ModelDesc,
    PlanError,
)
from tilestack.parallel.plan.schedule import SCHEDULES, Simulation, simulate

ADAM_MOMENTS = 2
LOSS_BYTES = FP32_BYTES          # the step's loss, all-reduced over pp and the data-parallel groups
LOSS_GRAD_COPIES = 2             # (b, s, vocab) f32 gradients alive in log-softmax's backward (see _memory)
ZERO_BUCKET_NUMEL = 1 << 22      # the Trainer's ZeroOptimizer bucket (elements)
ZERO_FLAT_COPIES = {1: 2, 2: 1}  # copies of a bucket's gradients while ZeroOptimizer reduces it (see _memory)
GLOO_REDUCE_SCATTER_COPIES = 1   # gloo's reduce-scatter clones its flat input (c10d::_reduce_scatter_base_); NCCL not
FSDP_UNIT_COPIES = 4             # gathered block + prefetched neighbour + unsharded grads + reduce-scatter input
FSDP_ROOT_COPIES = 3             # gathered root + its unsharded grads + reduce-scatter input
FSDP_ROOT_START_COPIES = 2       # when backward begins: the gathered root + the head's gradients being made
MEMORY_COMPONENTS = ("parameters", "buffers", "gradients", "optimizer", "activations", "transient", "after backward")
TERMS = ("compute", "bubble", "tp comm", "fsdp comm", "p2p", "dp comm", "optimizer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """One way to run a training step of ``batch`` samples (sequences) on pp * dp * dp_shard * tp ranks.

    ``bounds``: the layers of each of the pp * stages_per_rank stages, as indices into the model's layers
    (stage k has layers [bounds[k], bounds[k + 1])); None is the even split of
    ``tilestack.parallel.parallelize.split_stages`` (blocks evenly, embeddings on the first stage, the head on
    the last). Other fields are those of :class:`tilestack.parallel.ParallelConfig`."""

    batch: int
    pp: int = 1
    dp: int = 1
    dp_shard: int = 1
    tp: int = 1
    sp: bool = False
    schedule: str = "1f1b"
    stages_per_rank: int = 1
    microbatches: int = 1
    recompute: str = "none"
    zero: int = 0
    bounds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # numpy's ints are ints (Plan(batch=np.int64(8)) from a batch array was refused by check as "expected a
        # positive int", where search takes the same batch); kept as Python ints, so that the ParallelConfig and the
        # plan file it makes hold ints too. Anything else is left for check to refuse by name.
        for name in ("batch", "pp", "dp", "dp_shard", "tp", "stages_per_rank", "microbatches", "zero"):
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) and not isinstance(v, int):
                object.__setattr__(self, name, int(v))
        if isinstance(self.bounds, tuple | list) and all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool | np.bool_) for b in self.bounds):
            object.__setattr__(self, "bounds", tuple(int(b) for b in self.bounds))

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.dp_shard * self.tp

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def micro_batch(self) -> int:
        return self.batch // (self.dp * self.dp_shard * self.microbatches)

    def label(self) -> str:
        parts = [f"{k}{v}" for k, v in (("pp", self.pp), ("dp", self.dp), ("fsdp", self.dp_shard), ("tp", self.tp))
                 if v > 1]
        if self.sp:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.pp > 1:
            parts.append({"gpipe": "gpipe", "1f1b": "1f1b", "interleaved-1f1b": f"int{self.stages_per_rank}"}
                         [self.schedule])
            parts.append(f"m{self.microbatches}")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return "-".join(parts) or "single"

    def parallel_kwargs(self) -> dict[str, Any]:
        """The keywords of the ParallelConfig that runs this plan."""
        return dict(dp=self.dp, dp_shard=self.dp_shard, tp=self.tp, sp=self.tp if self.sp else 1, pp=self.pp,
                    pp_schedule=self.schedule, stages_per_rank=self.stages_per_rank, microbatches=self.microbatches,
                    recompute=self.recompute, zero=self.zero)

    def check(self, desc: ModelDesc) -> None:
        """PlanError naming the field that does not fit the model or the batch."""
        for name in ("batch", "pp", "dp", "dp_shard", "tp", "stages_per_rank", "microbatches"):
            v = getattr(self, name)
            # (a batch of 1 << 70, past any size torch holds, was predicted as given)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= INT64_MAX:
                raise PlanError(f"Plan: {name}={v!r}; expected a positive int")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"Plan: schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"Plan: recompute={self.recompute!r}; expected one of {RECOMPUTE}")
        if not isinstance(self.sp, bool):
            raise PlanError(f"Plan: sp={self.sp!r}; expected True or False")
        if not isinstance(self.zero, int) or isinstance(self.zero, bool) or self.zero not in ZERO_STAGES:
            raise PlanError(f"Plan: zero={self.zero!r}; expected one of {ZERO_STAGES} (ZeRO-3 is dp_shard > 1)")
        if self.zero and (self.dp == 1 or self.dp_shard > 1):
            raise PlanError(f"Plan: zero={self.zero} with dp={self.dp}, dp_shard={self.dp_shard}; expected dp > 1 "
                            "and dp_shard=1 (ZeRO shards over the replicated data-parallel group)")
        interleaved = self.schedule == "interleaved-1f1b"
        if self.stages_per_rank > 1 and not (self.pp > 1 and interleaved):
            raise PlanError(f"Plan: stages_per_rank={self.stages_per_rank} with pp={self.pp}, schedule="
                            f"{self.schedule!r}; expected pp > 1 and schedule='interleaved-1f1b' for virtual stages")
        if self.pp > 1 and interleaved and self.stages_per_rank < 2:
            raise PlanError(f"Plan: schedule='interleaved-1f1b' with stages_per_rank={self.stages_per_rank}; "
                            "expected stages_per_rank >= 2")
        if self.pp == 1 and self.microbatches > 1:
            raise PlanError(f"Plan: microbatches={self.microbatches} without a pipeline (pp=1); expected "
                            "microbatches=1")
        if self.batch % (self.dp * self.dp_shard * self.microbatches):
            raise PlanError(f"Plan: batch={self.batch} is not divisible by dp*dp_shard*microbatches="
                            f"{self.dp * self.dp_shard * self.microbatches}; expected whole micro-batches")
        if self.sp and self.tp > 1 and desc.seq % self.tp:
            raise PlanError(f"Plan: sp=True with tp={self.tp}: seq={desc.seq} is not divisible by it; expected a "
                            "sequence that the sequence-parallel degree splits into whole tokens (or sp=False)")
        if not desc.tp_divides(self.tp):
            why = (f"n_head={desc.n_head}, d={desc.d}, vocab={desc.vocab}" if desc.tp_able else
                   "its layers have no tensor-parallel layout (expected tp=1)")
            raise PlanError(f"Plan: tp={self.tp} does not split model {desc.name!r} ({why}); expected a tp that "
                            "divides the heads, the width and the vocabulary")
        if not desc.layers:
            raise PlanError(f"Plan: model {desc.name!r} has no layers; expected a description with at least one")
        if self.bounds is not None and (not isinstance(self.bounds, tuple | list) or any(
                not isinstance(b, int) or isinstance(b, bool) for b in self.bounds)):
            raise PlanError(f"Plan: bounds={self.bounds!r}; expected a tuple of int layer indices")
        bounds = self.stage_bounds(desc)
        if len(bounds) != self.n_stages + 1 or bounds[0] != 0 or bounds[-1] != len(desc.layers) or any(
                b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise PlanError(f"Plan: bounds={bounds}; expected {self.n_stages + 1} increasing layer indices from 0 "
                            f"to {len(desc.layers)}")

    def stage_bounds(self, desc: ModelDesc) -> tuple[int, ...]:
        if self.bounds is not None:
            return self.bounds
        return even_bounds(desc, self.n_stages)


def even_bounds(desc: ModelDesc, n_stages: int) -> tuple[int, ...]:
    """split_stages' layout: with embed/head layers, blocks split evenly (the embeddings join the first stage,
    the head the last); otherwise the layers split as evenly as they go."""
    L = len(desc.layers)
    kinds = [layer.kind for layer in desc.layers]
    if kinds and kinds[0] == "embed" and kinds[-1] == "head":
        blocks = L - 2
        if blocks % n_stages:
            raise PlanError(f"Plan: {n_stages} pipeline stages do not divide the model's {blocks} blocks; expected "
                            f"n_layer % (pp * stages_per_rank) == 0")
        per = blocks // n_stages
        return (0, *(1 + per * k for k in range(1, n_stages)), L)
    if n_stages > L:
        raise PlanError(f"Plan: {n_stages} pipeline stages for {L} layers; expected at most one stage per layer")
    return tuple(round(k * L / n_stages) for k in range(n_stages + 1))


def runnable(plan: Plan, desc: ModelDesc) -> bool:
    """Whether ``tilestack train`` can run the plan: tilestack's GPT, its even stage split, its config rules."""
    if not desc.config:
        return False
    from tilestack.parallel.config import ParallelConfig, ParallelConfigError
    from tilestack.parallel.model import ModelConfig
    try:
        if plan.bounds is not None and plan.bounds != even_bounds(desc, plan.n_stages):
            return False
        ParallelConfig(**plan.parallel_kwargs()).validate(plan.world_size, model=ModelConfig(**desc.config),
                                                           batch=plan.batch, seq=desc.seq)
    except (ParallelConfigError, PlanError):
        return False
    return True


@dataclasses.dataclass
class Prediction:
    plan: Plan
    step_s: float
    terms: dict[str, float]                     # seconds, summing to step_s (see TERMS)
    memory: list[dict[str, float]]              # per pipeline rank: bytes by MEMORY_COMPONENTS
    sim: Simulation
    stage_fwd: list[float]
    stage_bwd: list[float]
    flops_per_step: float
    runnable: bool = False
    peaks: list[float] = dataclasses.field(default_factory=list)   # per pipeline rank, bytes (_peak)

    @property
    def bound(self) -> str:
        """The largest term of the step."""
        return max(self.terms, key=lambda k: self.terms[k])

    def at_peak(self, rank: int | None = None) -> tuple[str, dict[str, float]]:
        """The moment of pipeline rank ``rank``'s peak (default: the largest rank's) and the bytes alive then by
        component, which add up to its peak."""
        if rank is None:
            rank = max(range(len(self.peaks)), key=lambda r: self.peaks[r])
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < len(self.memory):
            raise PlanError(f"Prediction.at_peak: rank={rank!r}; expected a pipeline rank in [0, {len(self.memory)})")
        return peak_parts(self.memory[rank])

    @property
    def memory_bytes(self) -> float:
        """The largest rank's peak."""
        return max(self.peaks)

    def samples_per_s(self) -> float:
        return self.plan.batch / self.step_s

    def mfu(self, peak_flops: float | None) -> float | None:
        """Model FLOPs per second over world_size x the device's peak (None without a peak)."""
        if not peak_flops:
            return None
        return self.flops_per_step / self.step_s / (self.plan.world_size * peak_flops)


def _stage_layers(plan: Plan, desc: ModelDesc) -> list[range]:
    b = plan.stage_bounds(desc)
    return [range(b[k], b[k + 1]) for k in range(plan.n_stages)]


def predict(plan: Plan, desc: ModelDesc, compute: ComputeModel, comm: CommModel, *,
            overlap_dp: float = 0.0, recv_buffers: bool = True) -> Prediction:
    """The step time and memory per rank of ``plan`` (see the module docstring). ``overlap_dp``: the fraction
    of the data-parallel gradient reduction hidden behind backward (0: none; DDP on a GPU hides most of it).
    ``recv_buffers``: a pipeline stage keeps a receive buffer per micro-batch (torch's PipelineStage, which
    tilestack.parallel uses; Megatron-LM's schedules do not)."""
    if not isinstance(recv_buffers, bool):   # (recv_buffers="no" was taken by its truth: kept the buffers)
        raise PlanError(f"predict: recv_buffers={recv_buffers!r:.60} ({type(recv_buffers).__name__}); expected "
                        "True or False")
    _check_inputs(plan, desc, compute, comm, overlap_dp)
    overlap_dp = float(overlap_dp)     # (an np.float32 made every time an np.float32, which JSON does not write)
    plan.check(desc)
    if hasattr(comm, "check_world"):           # a cluster of a given number of nodes: no more ranks than its GPUs
        comm.check_world("predict", plan.world_size, exact=False)
    b = plan.micro_batch
    tp, m = plan.tp, plan.microbatches
    shard = plan.dp_shard
    stages = _stage_layers(plan, desc)
    tp_fwd_share = TP_ALLREDUCES_FWD / (TP_ALLREDUCES_FWD + TP_ALLREDUCES_BWD)

    synced: dict[tuple, float] = {}              # sync's answers: equal blocks ask the same question

    def sync(kind: str, nbytes: float, n: int, stride: int = 1) -> float:
        """One collective (or a pipeline stage's send) over ``n`` ranks: its transfer, and on a shared CPU what the
        load adds to it (compute.collective_s beyond the idle scalar all-reduce of n ranks, compute.p2p_delay: a
        rank may have lost its core, or waits for one to come back to)."""
        if n <= 1:
            return 0.0
        key = (kind, nbytes, n, stride)
        if key not in synced:
            synced[key] = transfer(kind, nbytes, n, stride)
        return synced[key]

    def transfer(kind: str, nbytes: float, n: int, stride: int) -> float:
        if kind == "p2p":
            delay = compute.p2p_delay
        else:
            # the probe's scalar all-reduce over every rank, beyond the idle one of a group of n
            delay = max(compute.collective_s - comm.time("all_reduce", FP32_BYTES, n), 0.0) if compute.collective_s \
                else 0.0
        return comm.time(kind, nbytes, n, stride=stride) + delay

    def pipeline(slow: float):
        """Per-stage forward / backward / send times at compute slowdown ``slow``, and the simulated schedule."""
        fwd, bwd, p2p, act_w, comp, tp_c, fsdp_c = [], [], [], [], [], [], []
        for k, layers in enumerate(stages):
            f = g = c_tp = c_fsdp = act = 0.0
            for i in layers:
                layer = desc.layers[i]
                lf, lb = compute.layer_times(i, b, tp)
                if not (math.isfinite(lf) and math.isfinite(lb) and lf >= 0 and lb >= 0):
                    raise PlanError(f"predict: the compute model ({compute.source}) gave layer {layer.name!r} "
                                    f"forward {lf!r} s, backward {lb!r} s at micro-batch {b}, tp={tp}; expected "
                                    "finite, non-negative seconds")
                f += lf * slow
                g += (lb + compute.recompute_s(i, b, tp, plan.recompute)) * slow
                if tp > 1 and layer.kind == "block":
                    replays = TP_ALLREDUCES_FWD if plan.recompute == "full" else 0
                    c_tp += sync("all_reduce", layer.tp_comm_bytes * b, tp) * (
                        TP_ALLREDUCES_FWD + TP_ALLREDUCES_BWD + replays)
                if shard > 1:
                    # FSDP2: gathered before forward (and again before backward without a pipeline, which keeps
                    # them gathered), gradients reduce-scattered after backward
                    nbytes = _local_params(layer, tp) * _param_size(layer, desc)
                    gathers = 2 if plan.pp == 1 else 1
                    c_fsdp += gathers * sync("all_gather", nbytes, shard, tp) + \
                        sync("reduce_scatter", nbytes, shard, tp)
                if layer.kind == "block":
                    # the wrappers' host costs per block and micro-batch: a third with the forward
                    wrap = (compute.overhead("sp" if plan.sp else "tp") if tp > 1 else 0.0) + \
                        (compute.overhead("fsdp") if shard > 1 else 0.0)
                    f += wrap * slow / 3
                    g += wrap * slow * 2 / 3
                act += _act_bytes(layer, plan) * b + (layer.act_fixed_bytes if plan.recompute != "full" or
                                                      layer.kind != "block" else 0.0)
            last = desc.layers[layers[-1]]
            boundary = _sent_bytes(desc, layers[-1]) * b / (tp if plan.sp else 1)
            if plan.pp > 1:
                # the schedule's and the stage's host cost comes with each stage's forward and backward call (a
                # rank with v stages pays it v times per micro-batch)
                f += compute.overhead("pipeline") * slow
                # torch's PipelineStage keeps each micro-batch's output (the last stage's: its logits, replicated
                # under tp) until that micro-batch's backward (fwd_cache): in flight with its activations
                act += last.out_bytes * b if last.kind == "head" else boundary
            comp.append(f + g)
            tp_c.append(c_tp)
            fsdp_c.append(c_fsdp)
            fwd.append(f + c_tp * tp_fwd_share + c_fsdp / 2)
            bwd.append(g + c_tp * (1 - tp_fwd_share) + c_fsdp / 2)
            hop = plan.world_size // plan.pp                  # neighbouring stages: one pp index apart
            # the edge to the next stage (its output forward, that output's gradient backward); the last stage
            # sends nothing on (its "boundary" is the model's output)
            p2p.append(sync("p2p", boundary, 2, hop) if plan.pp > 1 and k < len(stages) - 1 else 0.0)
            act_w.append(act)
        sim = simulate(plan.schedule, pp=plan.pp, stages_per_rank=plan.stages_per_rank, microbatches=m,
                       fwd=fwd, bwd=bwd, p2p=p2p, act_weight=act_w)
        return fwd, bwd, p2p, comp, tp_c, fsdp_c, sim

    slow = compute.contention(plan.world_size)
    fwd, bwd, p2p, comp, tp_c, fsdp_c, sim = pipeline(slow)
    if plan.pp > 1 and slow > 1:
        # ranks that wait in the pipeline's bubble leave their core to the others: a rank's work shares the cores
        # with the ranks busy while it works (Simulation.concurrency, each pipeline rank standing for its world / pp
        # processes), so simulate again at that contention, twice (the timeline moves with it). Runs 1-7 took the
        # ranks busy on average (world x the utilisation): 1F1B with 2 micro-batches on 4 processes and 2 cores
        # overlaps its stages' work in stretches and idles in others, and its schedule took 20% longer than
        # simulated (gpt 8x64, 2026-12-04: 35 ms against 29.4; scripts/parallel/plan_step_parts.py pipeline)
        for _ in range(2):
            slow = compute.contention(plan.world_size / plan.pp * sim.concurrency())
            fwd, bwd, p2p, comp, tp_c, fsdp_c, sim = pipeline(slow)
    # per pipeline rank: its stages' parameters, tensors
    ranks = range(plan.pp)
    rank_stages = [[s for s in range(plan.n_stages) if s % plan.pp == r] for r in ranks]
    # LayerDesc.shared names owners by their index in the whole model: a window of it (a stage of Alpa's DP)
    # starts at its compute model's offset
    base = getattr(compute, "offset", 0)
    held = [_held(desc, [i for s in rs for i in stages[s]], tp, base) for rs in rank_stages]
    # data-parallel gradient reduction (slowest rank), then ZeRO's all-gather of the parameters
    # a weight held on two ranks (a tied head, a block called again on another stage): its gradients are
    # all-reduced between the copy's rank and the owner's once a step (Megatron's embedding group)
    # (an owner outside the window is on another stage, outside this prediction)
    rank_of = {base + i: r for r, rs in enumerate(rank_stages) for s in rs for i in stages[s]}
    tied_s = [0.0] * plan.pp
    hop = plan.world_size // plan.pp                       # ranks between neighbouring pipeline ranks
    for r in ranks:
        for p in held[r].copies:
            if p.trained:
                # the pair is as far apart as the two pipeline ranks (stages 0 and 2 of 4 on 2 nodes of 8 GPUs:
                # ranks 0 and 8, across the network, where neighbours would share a node)
                t = sync("all_reduce", p.nbytes / shard, 2, hop * abs(r - rank_of.get(p.owner, r - 1)))
                tied_s[r] += t
                if p.owner in rank_of:
                    tied_s[rank_of[p.owner]] += t
    dp_s = []
    for r in ranks:
        grad_bytes = held[r].trained_bytes / shard
        t = tied_s[r]
        if plan.dp > 1:
            if plan.zero == 2:
                t += sync("reduce_scatter", grad_bytes, plan.dp, tp * shard)
            else:
                t += sync("all_reduce", grad_bytes, plan.dp, tp * shard)
            if plan.zero:
                t += sync("all_gather", held[r].trained_bytes, plan.dp, tp * shard)
        dp_s.append(t)
    dp_exposed = max(dp_s) * (1 - overlap_dp)
    owner = plan.dp if plan.zero else 1
    every = compute.contention(plan.world_size)          # every rank steps its optimizer at once
    # DTensor parameters (tp, FSDP2) cost their AdamW ops' dispatch on top, per tensor (overhead.py)
    dtensor = compute.overhead("fsdp optimizer") if shard > 1 else compute.overhead("tp optimizer") if tp > 1 else 0.0
    # ZeRO's AdamW steps one flat f32 tensor, this rank's slice of all its parameters (zero.py)
    # (over the trained tensors only: AdamW is given no frozen parameter)
    opt_s = max(compute.optimizer_s(held[r].trained / shard / owner,
                                    min(held[r].trained_tensors, 1) if plan.zero else held[r].trained_tensors)
                + held[r].trained_tensors * dtensor for r in ranks) * every
    # ZeRO's and the Trainer's flat-buffer copies (overhead.py: measured for the whole model) scale with the
    # gradients a rank holds
    total = sum(layer.params - layer.frozen for layer in desc.layers)
    share = max(held[r].trained for r in ranks) / total if total > 0 else 0.0     # nothing trained: no copies
    if plan.zero:
        opt_s += compute.overhead("zero") * share * every
    elif uses_ddp(plan):
        dp_exposed += compute.overhead("ddp") * every
    elif trainer_reduces_gradients(plan):
        dp_exposed += compute.overhead("reduce") * share * every
    # the loss over each group, its ranks as far apart as the mesh ("pp", "dp", "dp_shard", "tp") puts them
    losses = sum(sync("all_reduce", LOSS_BYTES, n, stride) for n, stride in (
        (plan.pp, hop), (plan.dp, plan.dp_shard * tp), (plan.dp_shard, tp)))
    busiest = max(range(plan.pp), key=lambda r: sim.busy[r])
    mine = rank_stages[busiest]
    work = sim.busy[busiest]
    terms = {
        "compute": sum(comp[s] for s in mine) * m,
        "bubble": sim.makespan - work,
        "tp comm": sum(tp_c[s] for s in mine) * m,
        "fsdp comm": sum(fsdp_c[s] for s in mine) * m,
        "p2p": 0.0,
        "dp comm": dp_exposed + losses,
        "optimizer": opt_s,
    }
    step = sim.makespan + dp_exposed + losses + opt_s
    if plan.pp > 1:
        # the sends' latency shows in the simulation as waiting: count the part they account for as p2p
        # each stage's edge to the next, crossed both ways (the last stage's: the edge before it, as it sends
        # nothing on)
        sends = 2 * sum(p2p[s] if s < plan.n_stages - 1 else p2p[s - 1] for s in mine) * m
        terms["p2p"] = min(sends, terms["bubble"])
        terms["bubble"] -= terms["p2p"]
    # torch's AdamW takes its multi-tensor path on a GPU (engine.adamw_foreach), except on lists that mix DTensors
    # and plain tensors (tensor parallelism without sequence parallelism); on a CPU it loops
    multi_tensor = compute.cores is None and not (tp > 1 and not plan.sp)
    # the CPU's collectives are gloo's (MeasuredCompute / RooflineCompute on a CPU have cores; a GPU's none)
    gloo = compute.cores is not None
    memory = [_memory(plan, desc, stages, rank_stages[r], held[r], sim.peak_inflight[r],
                      sim.steady_inflight[r], recv_buffers, multi_tensor, gloo) for r in ranks]
    peaks = [_peak(mem) for mem in memory]
    flops = desc.flops_per_sample * plan.batch
    bad = {k: v for k, v in (("step_s", step), *terms.items(), *(
        (f"memory[{r}][{c!r}]", v) for r, mem in enumerate(memory) for c, v in mem.items())) if not math.isfinite(v)
        or v < 0}
    if bad or not step > 0:
        raise PlanError(f"predict: plan {plan.label()} of {desc.name!r} came out as {bad or {'step_s': step}}; "
                        f"expected finite, non-negative seconds and bytes (a positive step): check the compute "
                        f"model ({compute.source}) and the communication model ({comm.source})")
    return Prediction(plan=plan, step_s=step, terms=terms, memory=memory, sim=sim, stage_fwd=fwd, stage_bwd=bwd,
                      flops_per_step=flops, runnable=runnable(plan, desc), peaks=peaks)


def _check_inputs(plan: Any, desc: Any, compute: Any, comm: Any, overlap_dp: Any) -> None:
    """PlanError naming the argument of ``predict`` that is not what it expects."""
    for arg, v, cls in (("plan", plan, Plan), ("desc", desc, ModelDesc), ("compute", compute, ComputeModel),
                        ("comm", comm, CommModel)):
        if not isinstance(v, cls):
            raise PlanError(f"predict: {arg}={type(v).__name__}; expected a {cls.__name__}")
    if isinstance(overlap_dp, bool | np.bool_) or not isinstance(overlap_dp, numbers.Real) or not 0 <= overlap_dp <= 1:
        raise PlanError(f"predict: overlap_dp={overlap_dp!r}; expected a fraction between 0 and 1")
    # the compute model must be the description's (or, for a stage of Alpa's DP, a window of it)
    offset = getattr(compute, "offset", 0)
    mine = getattr(compute, "desc", None)
    if mine is not desc and (mine is None or tuple(mine.layers[offset:offset + len(desc.layers)]) != desc.layers):
        raise PlanError(f"predict: compute was built for model {getattr(mine, 'name', None)!r}, not "
                        f"{desc.name!r}; expected a compute model of the same description")


def _peak(mem: dict[str, float]) -> float:
    """The rank's peak: the bytes alive at its largest moment (``peak_parts``)."""
    return sum(peak_parts(mem)[1].values())


def peak_parts(mem: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The rank's largest moment and what is alive then, by component (they add up to the peak): parameters,
    buffers and optimizer state always, and the largest of these moments (the previous step's gradients were
    freed, so none are alive before the first backward):
    - "first backward": the activations of every micro-batch in flight, the loss's gradient (the last stage), the
      transient buffers, FSDP's gathered root;
    - "steady forward" (1F1B's steady state): the micro-batches in flight again, now beside the gradients;
    - "after backward": the gradients and what comes after them (ZeRO's gradient slice and f32 master gradient);
    - "replayed block" (full recompute): a block's forward replayed in the backward: the activations in flight
      less one micro-batch's head (its backward ran first), the block's rebuilt activations, and the gradients (an
      upper bound: those of the layers after it)."""
    always = {"parameters": mem["parameters"], "buffers": mem["buffers"], "optimizer": mem["optimizer"]}
    moments = {
        "first backward": {"activations": mem["activations"], "loss gradient": mem["loss gradient"],
                           "transient": mem["transient"] + mem["fsdp at first backward"]},
        "steady forward": {"activations": mem["activations after a backward"], "gradients": mem["gradients"],
                           "transient": mem["transient"] + mem["fsdp buffers"]},
        "after backward": {"gradients": mem["gradients"], "after backward": mem["after backward"]},
    }
    if mem.get("replayed block", 0.0) > 0:
        moments["replayed block"] = {
            "activations": mem["activations"] - mem["head's saved"] + mem["replayed block"],
            "gradients": mem["gradients"], "transient": mem["transient"] + mem["fsdp buffers"]}
    moment = max(moments, key=lambda k: sum(moments[k].values()))
    return moment, always | moments[moment]


def _local_params(layer: Any, tp: int) -> float:
    """Parameter elements of ``layer`` on one tensor-parallel rank."""
    if tp == 1 or not layer.tp_able:
        return float(layer.params)
    return layer.tp_params / tp + (layer.params - layer.tp_params)


def _param_size(layer: Any, desc: ModelDesc) -> float:
    """Bytes per parameter element of ``layer``: its own where describe_module counted them (parameters of
    several dtypes), else the model's dtype_bytes."""
    return layer.param_bytes / layer.params if layer.param_bytes and layer.params else float(desc.dtype_bytes)


@dataclasses.dataclass(frozen=True)
class _Held:
    """The parameters one pipeline rank holds, its tensor-parallel share before FSDP splits them: elements, of
    them trained (requiring grad), the bytes of each, and tensors."""

    elements: float
    trained: float
    nbytes: float
    trained_bytes: float
    tensors: int
    copies: tuple[Any, ...] = ()          # the SharedParams it holds a copy of (their owner runs elsewhere)
    trained_tensors: int = 0              # of tensors, those requiring grad (the ones AdamW steps)
    buffer_copies: float = 0.0            # bytes of the buffers it holds a copy of (LayerDesc.shared_buffers)


def _held(desc: ModelDesc, layer_ids: list[int], tp: int, base: int = 0) -> _Held:
    """What the rank running ``layer_ids`` holds: each layer's own parameters, and once each the shared ones
    (LayerDesc.shared: a tied head, a block called again) whose owning layer runs on another rank. ``base``: the
    index of ``desc``'s first layer in the model that LayerDesc.shared's owners index (a window of it)."""
    elements = trained = nbytes = trained_bytes = 0.0
    tensors = trained_tensors = 0
    for i in layer_ids:
        layer = desc.layers[i]
        n, size = _local_params(layer, tp), _param_size(layer, desc)
        # the rank's share of the layer's frozen parameters (tp splits them as it splits the layer), at their own
        # bytes per element where describe_module counted them (a bf16 frozen base under f32 adapters)
        share = n / layer.params if layer.params else 0.0
        frozen_bytes = (layer.frozen_bytes or layer.frozen * size) * share
        # the layer's own byte count times its share, not n x (param_bytes / params): that quotient rounded, and a
        # layer of bf16 and f32 parameters (90 elements, 220 bytes) was predicted 220.00000000000003 bytes, over a
        # memory limit of exactly the bytes a real step holds (the limit is inclusive)
        mine_bytes = layer.param_bytes * share if layer.param_bytes and layer.params else n * size
        elements += n
        trained += n - layer.frozen * share
        nbytes += mine_bytes
        trained_bytes += mine_bytes - frozen_bytes
        tensors += layer.tensors
        trained_tensors += layer.tensors - layer.frozen_tensors
    mine = {base + i for i in layer_ids}
    elsewhere = {p.ordinal: p for i in layer_ids for p in desc.layers[i].shared if p.owner not in mine}
    for p in elsewhere.values():
        elements += p.numel
        nbytes += p.nbytes
        trained += p.numel if p.trained else 0
        trained_bytes += p.nbytes if p.trained else 0
        tensors += 1
        trained_tensors += 1 if p.trained else 0
    buffers = {p.ordinal: p.nbytes for i in layer_ids for p in desc.layers[i].shared_buffers if p.owner not in mine}
    return _Held(elements, trained, nbytes, trained_bytes, tensors, tuple(elsewhere.values()), trained_tensors,
                 float(sum(buffers.values())))


def _sent_bytes(desc: ModelDesc, i: int) -> float:
    """Bytes per sample a pipeline stage ending with layer ``i`` sends to the next: what the next layer receives
    (LayerDesc.in_bytes: a decoder block's input and the encoder's output it attends to), else layer i's output."""
    nxt = desc.layers[i + 1] if i + 1 < len(desc.layers) else None
    return nxt.in_bytes if nxt is not None and nxt.in_bytes else desc.layers[i].out_bytes


def _act_bytes(layer: Any, plan: Plan) -> float:
    """Bytes one sample leaves saved in ``layer`` under the plan's recompute policy and tensor parallelism."""
    policy = plan.recompute if layer.kind == "block" else "none"
    full = layer.act_bytes[policy]
    if plan.tp == 1 or not layer.tp_able:
        return full
    if plan.sp:
        # torch's sequence parallelism saves the all-gathered (whole-sequence) inputs of the column-parallel
        # q/k/v and mlp.fc for their backward (Megatron gathers them again instead): 2 s d per sample undivided
        kept = 2 * layer.out_bytes * (1 - 1 / plan.tp) if layer.kind == "block" and policy != "full" else 0.0
        return full / plan.tp + kept
    split = layer.act_tp_bytes.get(policy, 0.0)
    return full - split + split / plan.tp


def _memory(plan: Plan, desc: ModelDesc, stages: list[range], my_stages: list[int], held: _Held,
            inflight: float, steady_inflight: float, recv_buffers: bool = True,
            multi_tensor: bool = False, gloo: bool = False) -> dict[str, float]:
    """The rank's bytes by component (``_peak`` adds them up per moment). ``multi_tensor``: AdamW's step takes
    torch's multi-tensor path, which makes sqrt(v) for every parameter at once, a copy of the second moments,
    beside the gradients (the loop makes it and a quotient one tensor at a time: not charged). ``gloo``: the
    collectives are gloo's, whose reduce-scatter copies its input (GLOO_REDUCE_SCATTER_COPIES). Parameters,
    gradients and moments are of the parameters' own bytes per element (``held``); activations of dtype_bytes."""
    params = held.elements
    local = params / plan.dp_shard
    # frozen parameters (requires_grad=False) have no gradient and no optimizer state
    trained = held.trained / plan.dp_shard
    # bytes per element: of the parameters, and of the trained ones (gradients and AdamW's moments are their dtype)
    e = held.nbytes / params if params else float(desc.dtype_bytes)
    e_trained = held.trained_bytes / held.trained if held.trained else e
    grads = held.trained_bytes / plan.dp_shard
    optimizer = ADAM_MOMENTS * grads
    transient = 0.0
    after = grads if multi_tensor else 0.0
    if plan.zero:
        # ZeroOptimizer: an f32 master copy of this rank's 1/dp slice and AdamW's two f32 moments of it; the
        # reduced gradient slice beside the full gradients (ZeRO-1), or in their place once a bucket is reduced
        # (ZeRO-2: at most one bucket of full gradients alive); the master's f32 gradient during the step
        # ZeroOptimizer pads each bucket to a multiple of dp and gives every rank a whole slice, ceil(n / dp)
        # elements (198 over 5 ranks: 40 each, where 39.6 elements' bytes were predicted). Exact for a model of
        # one bucket; with more, under by less than one element per bucket
        owned = math.ceil(trained / plan.dp - 1e-9)
        optimizer = owned * FP32_BYTES * (1 + ADAM_MOMENTS)
        bucket = min(trained, ZERO_BUCKET_NUMEL)
        padded = owned * plan.dp if trained <= ZERO_BUCKET_NUMEL else bucket     # the flattened bucket, padded
        # ZeRO-2 frees a bucket's full gradients during backward only where it reduce-scatters from gradient hooks,
        # which the Trainer does without a pipeline (engine.py: overlap=pc.pp == 1); a pipeline runs a backward per
        # micro-batch and reduces after the last, so every full gradient is alive then, as under ZeRO-1 (a rank of
        # more than one bucket was predicted to hold one bucket of them: 4M elements of a 13M-element stage)
        grads = (trained if plan.zero == 1 or plan.pp > 1 else bucket) * e_trained
        # after backward, the slice (owned * e) beside a bucket being reduced, then beside the step's f32 master
        # gradient; the two moments apart (summed, ZeRO-1's were 14% over the measurement and ZeRO-2's under)
        if plan.zero == 2:
            # the last bucket reduce-scattered from its gradient hook (the full gradients alive): its flat copy and
            # gloo's own copy of it (the peak of dp4-zero2 with recompute, runs 11-12 12-18% above the prediction
            # without it: scripts/parallel/plan_memory_moment.py); the step: the master's f32 gradient, foreach
            # AdamW's sqrt(v)
            copies = ZERO_FLAT_COPIES[2] + (GLOO_REDUCE_SCATTER_COPIES if gloo else 0)
            step = owned * FP32_BYTES + (owned * FP32_BYTES if multi_tensor else 0.0)
            after = owned * e_trained + max(copies * padded * e_trained, step)
        else:
            # ZeRO-1 keeps every full gradient to the end: a bucket flattened and padded (two copies, as it is
            # all-reduced); the step (the master's gradient, a copy only where the parameters are narrower than
            # f32; foreach AdamW's sqrt(v)); the updated slices all-gathered into a padded bucket (and, on gloo, its
            # staging copy: where the measured peak falls, session 28)
            master_grad = owned * FP32_BYTES if e_trained < FP32_BYTES else 0.0
            sqrt_v = owned * FP32_BYTES if multi_tensor else 0.0
            after = owned * e_trained + master_grad + max(ZERO_FLAT_COPIES[1] * padded * e_trained, sqrt_v)
    blocks = [i for s in my_stages for i in stages[s] if desc.layers[i].kind == "block"]
    replayed = head_saved = 0.0
    if plan.recompute == "full" and blocks:
        # a checkpointed block's forward replayed in the backward: its activations rebuilt, one micro-batch's.
        # By then the head's backward has run (its saved tensors and the loss's gradient are freed), and the
        # gradients of the layers after the block exist: that moment is _peak's "replay", not the start of backward
        rebuilt = dataclasses.replace(plan, recompute="none")
        replayed = _act_bytes(desc.layers[blocks[0]], rebuilt) * plan.micro_batch
        head_saved = sum(_act_bytes(desc.layers[i], plan) for s in my_stages for i in stages[s]
                         if desc.layers[i].kind == "head") * plan.micro_batch
    fsdp_start = fsdp_buffers = 0.0
    if plan.dp_shard > 1:
        mine = [desc.layers[i] for s in my_stages for i in stages[s]]
        gathered = [_local_params(layer, plan.tp) for layer in mine]
        if plan.pp > 1:
            transient += (params - local) * e                # the stage stays gathered between micro-batches
        elif mine:
            # FSDP2, per unit: its gathered parameters, its unsharded gradients and the reduce-scatter's copy of
            # them; a block's neighbour prefetched beside it (4 blocks' worth); the root unit (every layer that is
            # not a block) gathered from its forward to its backward, with its gradients and their copy (3 roots).
            # When backward begins only the root is gathered and its (head's) gradients are being made (2 roots).
            root = sum(g for g, layer in zip(gathered, mine, strict=True) if layer.kind != "block")
            unit = max(g for g, layer in zip(gathered, mine, strict=True) if layer.kind == "block") if blocks else 0
            fsdp_start = FSDP_ROOT_START_COPIES * root * e
            fsdp_buffers = (FSDP_ROOT_COPIES * root + FSDP_UNIT_COPIES * unit) * e
    if plan.pp > 1 and recv_buffers:
        # torch's PipelineStage keeps a receive buffer per micro-batch: the stage's input (all but the first
        # stage) and the gradient of its output (all but the last), b samples of the boundary tensor each
        for s in my_stages:
            edges = (_sent_bytes(desc, stages[s][0] - 1) if s > 0 else 0.0) + \
                (_sent_bytes(desc, stages[s][-1]) if s < plan.n_stages - 1 else 0.0)
            transient += plan.microbatches * plan.micro_batch * edges / (plan.tp if plan.sp else 1)
    loss_grad = 0.0
    if any(desc.layers[i].kind == "head" for s in my_stages for i in stages[s]):
        # as the first backward begins, cross-entropy's gradients: with respect to the log-probabilities, then to
        # the f32 logits, (b, s, vocab) each and both alive in log-softmax's backward
        loss_grad = LOSS_GRAD_COPIES * plan.micro_batch * desc.seq * desc.vocab * FP32_BYTES
    # buffers (BatchNorm's statistics, rotary tables): whole on every rank that holds their layer, and a copy of
    # those its layers share with a layer on another rank (one table registered in every block)
    buffers = sum(desc.layers[i].buffer_bytes for s in my_stages for i in stages[s]) + held.buffer_copies
    return {"parameters": held.nbytes / plan.dp_shard, "buffers": buffers, "gradients": grads, "optimizer": optimizer,
            "activations": inflight, "transient": transient, "after backward": after, "loss gradient": loss_grad,
            "activations after a backward": steady_inflight, "fsdp at first backward": fsdp_start,
            "fsdp buffers": fsdp_buffers, "replayed block": replayed, "head's saved": head_saved}
