"""Compute time of each layer, forward and backward, at a micro-batch size and tensor-parallel degree.

    cm = MeasuredCompute.for_gpt(desc)                 # times the GPT's own modules on this machine's CPU
    cm = MeasuredCompute.for_module(desc, model, x)    # times a torch module's layers
    cm = RooflineCompute(desc, "h200", dtype="bf16")   # a device that is not here: the device table's peaks
    fwd_s, bwd_s = cm.layer_times(i, micro_batch=2, tp=1)
    cm.optimizer_s(params=1_000_000, tensors=40)       # one AdamW step over that many elements and tensors

Measured times come from ``tilestack.perf.timing.time_fn`` (medians, repeated until known to +-5% or a budget)
on the modules a rank really runs: a tensor-parallel rank's block is a block with n_head / tp heads and 4 d / tp
hidden units, which is the computation it does (the collectives are the communication model's). On a CPU the
timing runs with one thread, as every rank of ``tilestack.parallel.launch.run_local`` does; when more ranks than
cores share the machine, each rank's compute slows by ranks / cores (``contention``).

The roofline model adds, per layer, matrix FLOPs over the dense peak times the efficiency measured for cuBLAS on
the H200 (ANCHORS.md: 720 of 989 TFLOP/s), attention FLOPs over the peak times the efficiency of cuDNN's
attention there (about 450 of 989), and the bytes an elementwise op moves (twice the activations saved: each
written once, read once) over the copy bandwidth measured there (4.27 of 4.8 TB/s); a layer costs at least its
host launches (``HOST_S_PER_OP`` per ATen call). Backward is twice the forward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterator
from typing import Any

from tilestack.parallel.plan.describe import FP32_BYTES, LayerDesc, ModelDesc, PlanError
from tilestack.parallel.plan.layer_timing import (
    context_ratio,
    least_s,
    single_thread,
    time_adamw,
    time_extra,
    time_forward_backward,
    time_step_after_backward,
)

# Efficiencies measured on the project's H200 (ANCHORS.md), used for devices that are not present
MATMUL_EFFICIENCY = 720 / 989.4          # cuBLAS bf16 GEMM 4096^3 over the dense peak
ATTENTION_EFFICIENCY = 450 / 989.4       # cuDNN attention forward, long sequences, over the dense peak
COPY_EFFICIENCY = 4.27e12 / 4.8e12       # device-to-device copy over the data-sheet bandwidth
HOST_S_PER_OP = 10e-6                    # torch's host cost per op call (ANCHORS.md: about 10-20 us)
OPS_PER_BLOCK_FWD = 25                   # ATen calls of one GPT block's forward (linears, norms, attention, adds)
SELECTIVE_OPS = 4                       # ATen calls selective recompute replays: q k^T, mask, softmax, p v
BACKWARD_PER_FORWARD = 2.0               # backward: input and weight gradients, two products per forward one
ADAM_BYTES_PER_ELEMENT = 7 * FP32_BYTES  # AdamW reads param, grad, m, v and writes param, m, v
ADAM_OPS_PER_TENSOR = 12                 # foreach=False AdamW: about a dozen ATen calls per tensor
ADAM_FIT_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 20}   # optimizer_s's large step: memory-bound on each device
CONTEXT_MAX_KINDS = 12                   # ... past this many kinds of layer, their cached times alone, once
OPTIMIZER_CONTEXT_BATCH = 2              # micro-batch of the forward and backward before optimizer_context's step


class ComputeModel:
    """Per-layer compute times; subclasses measure or estimate ``_times``. ``cores``: CPU cores the ranks share
    (None on a GPU: one device per rank)."""

    desc: ModelDesc
    source: str
    cores: int | None = None
    background: float = 0.0         # cores kept busy by other work on a shared CPU machine (busy_cores())
    collective_s: float = 0.0       # seconds a scalar all-reduce over all ranks takes there, under load (LockstepProbe)
    p2p_delay: float = 0.0          # ... and to each point-to-point message (a pipeline stage's send)

    def overhead(self, name: str) -> float:
        """The host cost of a parallel wrapper (tilestack.parallel.plan.overhead): 0 unless measured."""
        return 0.0

    def _times(self, layer: LayerDesc, index: int, micro_batch: int, tp: int) -> tuple[float, float]:
        raise NotImplementedError

    def layer_times(self, index: int, micro_batch: int, tp: int = 1) -> tuple[float, float]:
        """(forward s, backward s) of layer ``index`` on one rank for a micro-batch of ``micro_batch`` samples."""
        return self._times(self.desc.layers[index], index, micro_batch, tp)

    def recompute_s(self, index: int, micro_batch: int, tp: int, policy: str) -> float:
        """Extra backward time of a recompute policy: the whole forward again (full), or the share of the forward
        FLOPs in attention's scores (selective)."""
        layer = self.desc.layers[index]
        if policy == "none" or layer.kind != "block":
            return 0.0
        fwd, _ = self.layer_times(index, micro_batch, tp)
        if policy == "full":
            return fwd
        return fwd * layer.selective_flops / layer.flops_fwd

    def optimizer_s(self, params: float, tensors: int) -> float:
        raise NotImplementedError

    def set_load(self, slowdown: float, collective_s: float, p2p_delay: float, world_size: int) -> None:
        """Predict at the load that ``world_size`` ranks in lockstep read (lockstep_load, or a measured plan's
        probes through sync_delays): the background cores that give ``slowdown``, a collective's latency
        (``collective_s``; predict charges a collective over n ranks what it takes beyond the fit's scalar
        all-reduce at n), the delay per pipeline send."""
        self.background = background_of(slowdown, world_size, self.cores)
        self.collective_s, self.p2p_delay = collective_s, p2p_delay

    def contention(self, ranks: int) -> float:
        """How much slower each rank computes when ``ranks`` processes, and other work keeping ``background``
        cores busy, share this machine's cores (each runnable process gets an equal share of a core)."""
        return max(1.0, (ranks + self.background) / self.cores) if self.cores else 1.0


def busy_cores(window_s: float = 1.0) -> float:
    """Cores kept busy by whatever runs on this machine now: (1 - idle fraction) x cores over ``window_s`` seconds
    of /proc/stat (0 where there is no /proc). Call it while none of the planner's own processes run."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
        return idle, sum(fields)

    try:
        i0, t0 = sample()
        time.sleep(window_s)
        i1, t1 = sample()
    except OSError:
        return 0.0
    if t1 <= t0:
        return 0.0
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


PROBE_CHUNK_S = 0.02        # idle seconds of one probe rank's compute between two all-reduces
PROBE_SYNCS = 10            # the fine probes: the same work cut into this many chunks, each ended by a synchronisation
PROBE_MESSAGE_BYTES = 1 << 16   # the point-to-point probe's message: a pipeline boundary of these small GPTs
PROBE_ITERS = 12


@dataclasses.dataclass(frozen=True)
class LockstepProbe:
    """Fixed single-thread work (``matmuls`` 128 x 128 products, ``idle_s`` seconds on an idle core) ended by an
    all-reduce of a scalar: run by every rank of a group at once (``work_s``), it shows how much this machine's
    other work slows ranks that meet at collectives (``slowdown``). That is more than their fair share of the
    cores (ComputeModel.contention with busy_cores()): a rank that loses its core holds the others up at the next
    collective, and a rank that blocks in a collective waits for a core to come back to. How much more depends on
    how often ranks meet, and how: ``reading`` also runs the same work cut into ``syncs`` chunks, each ended by an
    all-reduce of a scalar, then each ended by a point-to-point exchange of ``message_bytes`` (every rank sends to
    the next and receives from the previous, as pipeline stages do). With ``W`` the work's seconds at the slowed
    rate and ``c`` the seconds one synchronisation takes, one chunk takes ``W + c`` and ``syncs`` chunks
    ``W + syncs c``, which gives W and c for each kind (``sync_delays``: ComputeModel.collective_s as read, and
    ComputeModel.p2p_delay, what the load adds to an idle send)."""

    matmuls: int
    idle_s: float
    syncs: int = PROBE_SYNCS
    message_bytes: int = PROBE_MESSAGE_BYTES

    @classmethod
    def calibrated(cls, chunk_s: float = PROBE_CHUNK_S, syncs: int = PROBE_SYNCS) -> LockstepProbe:
        """About ``chunk_s`` idle seconds of work (a multiple of ``syncs`` products), timed here (the least of
        repeated calls)."""
        import torch
        a = torch.randn(128, 128)
        one = single_thread(least_s)(lambda: torch.mm(a, a))
        matmuls = syncs * max(1, round(chunk_s / one / syncs))
        return cls(matmuls=matmuls, idle_s=matmuls * one, syncs=syncs)

    def work_s(self) -> float:
        """Seconds of the work and its all-reduce, less the all-reduce alone (each after a barrier)."""
        import time

        import torch
        import torch.distributed as dist
        a = torch.randn(128, 128)
        flag = torch.zeros(1)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(self.matmuls):
            torch.mm(a, a)
        dist.all_reduce(flag)
        chunk = time.perf_counter() - t0
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flag)
        return chunk - (time.perf_counter() - t0)

    def reading(self) -> tuple[float, float, float]:
        """(work s, collective s, p2p s): the work ended by one all-reduce, and the seconds of one synchronisation
        by an all-reduce and by a point-to-point exchange when the work is cut into ``syncs`` chunks (class
        docstring; each timing after a barrier; the exchange's chunks end with the exchange alone, so
        ``syncs`` exchanges take W + syncs x, and one chunk W + c)."""
        import time

        import torch
        import torch.distributed as dist
        a = torch.randn(128, 128)
        flag = torch.zeros(1)
        message = torch.zeros(self.message_bytes // 4)
        inbox = torch.zeros_like(message)
        rank, world = dist.get_rank(), dist.get_world_size()

        def all_reduce():
            dist.all_reduce(flag)

        def exchange():
            if world == 1:
                return
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, message, (rank + 1) % world),
                                                dist.P2POp(dist.irecv, inbox, (rank - 1) % world)]):
                work.wait()

        def timed(sync, pieces: int) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(pieces):
                for _ in range(self.matmuls // pieces):
                    torch.mm(a, a)
                sync()
            return time.perf_counter() - t0

        # the single chunk before and after the chunked runs: a load that drifts over the reading cancels
        first, collectives, exchanges = timed(all_reduce, 1), timed(all_reduce, self.syncs), timed(exchange, self.syncs)
        once = (first + timed(all_reduce, 1)) / 2
        collective = (collectives - once) / (self.syncs - 1)
        p2p = (exchanges - once + collective) / self.syncs
        return once, max(collective, 0.0), max(p2p, 0.0)

    def slowdown(self, work_s: float, sync_s: float = 0.0) -> float:
        """``work_s`` (a rank's, or the slowest rank's), less the synchronisation that ended it (``sync_s``), over
        the idle time: at least 1."""
        return max((work_s - sync_s) / self.idle_s, 1.0)


def sync_delays(collective_s: float, p2p_s: float, comm: Any, world_size: int,
                message_bytes: int = PROBE_MESSAGE_BYTES) -> tuple[float, float]:
    """(collective s, p2p delay s): the probe's seconds per scalar all-reduce over ``world_size`` ranks as read
    (predict subtracts the idle fit of the group size each collective has: a 2-rank group among 4 processes on 2
    cores waits as the 4-rank probe does, where the 2-process fit does not), and what the load adds to an
    exchange of ``message_bytes`` beyond its idle transfer in ``comm`` (ComputeModel.set_load)."""
    return max(collective_s, 0.0), max(p2p_s - comm.time("p2p", message_bytes, 2), 0.0)


def _probe_rank(rank: int, world_size: int, probe: LockstepProbe, iters: int) -> list[tuple[float, float, float]]:
    return [probe.reading() for _ in range(iters)]


def lockstep_load(world_size: int, comm: Any, *, iters: int = PROBE_ITERS) -> tuple[float, float, float]:
    """(slowdown, collective s, p2p delay s) of ``world_size`` spawned gloo ranks in lockstep now: how much
    slower they compute than one rank on an idle core, and what synchronising costs (LockstepProbe.reading,
    sync_delays; per run the slowest rank's, then the median over ``iters`` runs)."""
    import statistics

    from tilestack.parallel.launch import run_local
    probe = LockstepProbe.calibrated()
    ranks = run_local(_probe_rank, world_size, (probe, iters), retries=1)
    work, collective, p2p = (statistics.median(max(r[i][k] for r in ranks) for i in range(iters)) for k in range(3))
    return (probe.slowdown(work, collective),
            *sync_delays(collective, p2p, comm, world_size, probe.message_bytes))


def background_of(slowdown: float, world_size: int, cores: int | None = None) -> float:
    """The cores other work keeps busy, as ``world_size`` ranks in lockstep feel it (a lockstep_slowdown or
    LockstepProbe.slowdown): the background that ComputeModel.contention turns back into that slowdown."""
    cores = cores or os.cpu_count() or 1
    return max(slowdown * cores - world_size, 0.0)


# ---- measured (the timing itself: layer_timing.py) ------------------------------------------------------------------
class MeasuredCompute(ComputeModel):
    """Times measured on this machine's CPU (one thread per rank). Build with :meth:`for_gpt` or
    :meth:`for_module`.

    In context. A layer timed alone, called again and again on the same input, keeps its weights, activations and
    the interpreter's paths warm; in a step the rest of the model evicts them in between. So with ``whole`` (a
    builder of the whole model, as the layers' builders are) the layer times at a micro-batch are scaled by
    ``context(micro_batch)``: the whole model's forward and backward, timed the same way, over the sum of its
    layers' times at tp 1. The optimizer's fit is scaled the same way by ``optimizer_context()``: AdamW's step
    after a forward and backward (a step minus its forward and backward) over the fit at the model's parameters.
    On this CPU (2026-12-04, gpt 4x64 at 4 samples, one thread): the layers sum to 8.2 ms and the whole model
    takes 8.7; AdamW's fit gives 1.7 ms, the same step alone 1.8 and after the backward 2.45; a dp2 step
    predicted 15.2 ms was measured 20.3 (scripts/parallel/plan_compute_gap.py shows the parts)."""

    def __init__(self, desc: ModelDesc, builders: dict[str, Callable[..., tuple[Any, Callable, Callable | None]]],
                 *, cores: int | None = None, overheads: bool | dict[str, float] = False, device: str = "cpu",
                 recompute_builders: frozenset[str] = frozenset(),
                 whole: Callable[[int], tuple[Any, Callable, Callable | None]] | None = None):
        self.desc = desc
        self.builders = builders
        self.whole = whole
        self._context: dict[int, float] = {}
        self._optimizer_context: float | None = None
        # the layer kinds whose builder takes ``recompute=`` (a policy): their recompute cost is measured
        self.recompute_builders = frozenset(recompute_builders)
        self._recompute: dict[tuple[str, int, int, str], float] = {}
        self.device = device
        gpu = device.startswith("cuda")
        self.source = f"measured on {device}" if gpu else "measured on this CPU (one thread per rank)"
        self.cores = None if gpu else (cores or os.cpu_count() or 1)
        self._cache: dict[tuple[str, int, int], tuple[float, float]] = {}
        self._adam: tuple[float, float, float] | None = None
        self._overheads: dict[str, float] | None = overheads if isinstance(overheads, dict) else None
        self._measure_overheads = overheads is True

    def overhead(self, name: str) -> float:
        """The wrappers' host costs (tilestack.parallel.plan.overhead), measured once when asked for
        (``overheads=True``)."""
        if self._overheads is None:
            if not self._measure_overheads:
                return 0.0
            from tilestack.parallel.plan.overhead import measure_overheads
            self._overheads = measure_overheads(self.desc, self)
        return self._overheads.get(name, 0.0)

    def _key(self, layer: LayerDesc) -> str:
        return layer.kind if layer.kind in ("embed", "block", "head") else layer.name

    def _alone(self, layer: LayerDesc, micro_batch: int, tp: int) -> tuple[float, float]:
        """(forward s, backward s) of the layer timed alone (cached per layer kind, micro-batch and tp)."""
        key = (self._key(layer), micro_batch, tp)
        if key not in self._cache:
            module, make_input, loss = self.builders[key[0]](micro_batch, tp)
            self._cache[key] = time_forward_backward(module, make_input, loss, self.device)
        return self._cache[key]

    def _times(self, layer: LayerDesc, index: int, micro_batch: int, tp: int) -> tuple[float, float]:
        with self._measuring(layer, micro_batch, tp):
            f, b = self._alone(layer, micro_batch, tp)
            k = self.context(micro_batch)
        return f * k, b * k

    @contextlib.contextmanager
    def _measuring(self, layer: LayerDesc, micro_batch: int, tp: int) -> Iterator[None]:
        """A layer (or the whole model, for its context) that does not fit this machine's memory at the micro-batch
        timed is a PlanError naming the layer, the micro-batch and what to do instead, not torch's allocator error
        (a GPT of 60000 tokens a sequence asked its scores of 460 GB of this CPU)."""
        import torch
        try:
            yield
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError | torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            raise PlanError(f"MeasuredCompute: layer {layer.name!r} of {self.desc.name!r} (seq={self.desc.seq}) at "
                            f"micro_batch={micro_batch}, tp={tp} does not fit this machine's memory to be timed on "
                            f"{self.device} ({type(e).__name__}: {str(e).strip()[:160]}); expected a model whose "
                            "layers fit here at that micro-batch (a shorter sequence, a smaller model), or a "
                            "roofline of a device not here (RooflineCompute; tilestack plan --device h200)") from None

    def context(self, micro_batch: int) -> float:
        """The whole model's forward and backward at ``micro_batch`` over the sum of its layers' timed alone (1
        without a ``whole`` builder); class docstring."""
        if self.whole is None:
            return 1.0
        if micro_batch not in self._context:
            counts: dict[str, int] = {}
            for layer in self.desc.layers:
                counts[self._key(layer)] = counts.get(self._key(layer), 0) + 1
            if len(counts) <= CONTEXT_MAX_KINDS:
                # the whole and its parts timed in alternating rounds (context_ratio)
                parts = [(n, self.builders[key](micro_batch, 1)) for key, n in counts.items()]
                k = context_ratio(self.whole(micro_batch), parts, self.device)
            else:
                # many kinds of layer (a module's every layer its own): their times alone, once, as cached
                alone = sum(sum(self._alone(layer, micro_batch, 1)) for layer in self.desc.layers)
                module, make_input, loss = self.whole(micro_batch)
                k = sum(time_forward_backward(module, make_input, loss, self.device)) / alone if alone > 0 else math.nan
            if not (math.isfinite(k) and k > 0):
                raise PlanError(f"MeasuredCompute.context: model {self.desc.name!r} at micro_batch={micro_batch} "
                                f"timed {k} times its layers' time whole; expected a positive ratio")
            self._context[micro_batch] = k
        return self._context[micro_batch]

    def optimizer_context(self) -> float:
        """AdamW's step after the whole model's forward and backward over the fit's time for the model's
        parameters (1 without a ``whole`` builder); class docstring."""
        if self.whole is None:
            return 1.0
        if self._optimizer_context is None:
            layers = self.desc.layers
            # AdamW steps the trained parameters only (the timed step's, time_step_after_backward); a model with
            # none (everything frozen) has no step to time
            trained = sum(la.params - la.frozen for la in layers)
            fit = self._adam_fit(trained, sum(la.tensors - la.frozen_tensors for la in layers)) if trained else 0.0
            if fit > 0:
                module, make_input, loss = self.whole(OPTIMIZER_CONTEXT_BATCH)
                self._optimizer_context = time_step_after_backward(module, make_input, loss, self.device) / fit
            else:
                self._optimizer_context = 1.0
        return self._optimizer_context

    def recompute_s(self, index: int, micro_batch: int, tp: int, policy: str) -> float:
        """Selective recompute measured where the layer's builder can apply it: the block's forward and backward
        under the policy minus without it (``time_extra``). Its region (scores, softmax, the product with v) costs
        more of the time than of the FLOPs, and checkpoint's own work adds to it: on this CPU, gpt 8x64 at 4
        samples a rank, 2.0 ms a block against the FLOP share's 0.2, and a dp2 step predicted -10% against dp2's own
        -10% where the FLOP share gave -28%. Full recompute is measured the same way: runs 1-5 took the forward
        time for it, and the steps of the 6 full-recompute plans came out 18-54% over their predictions (run 6,
        2026-12-04), the most of any plans; the replay runs checkpoint's hooks as well as the forward.

        On a GPU full recompute is measured too: there the replay is bound by the host, not by the forward's
        kernels. torch's non-reentrant checkpoint runs a Python hook per saved tensor, so on the H200 (2026-12-03,
        scripts/gpu/probe_block_timing.py) a GPT-2-small block at batch 8 took 1.68 ms forward and backward, and
        3.13 ms with full recompute: 1.44 ms more, where its forward's kernels are 0.33 ms; the 12-block step
        measured 15.6 ms over the plain one, 4.5 ms predicted from the forward time (+39%)."""
        layer = self.desc.layers[index]
        key = self._key(layer)
        if policy not in ("selective", "full") or layer.kind != "block" or key not in self.recompute_builders:
            return super().recompute_s(index, micro_batch, tp, policy)
        ckey = (key, micro_batch, tp, policy)
        with self._measuring(layer, micro_batch, tp):
            if ckey not in self._recompute:
                plain, make_input, loss = self.builders[key](micro_batch, tp)
                module = self.builders[key](micro_batch, tp, recompute=policy)[0]
                self._recompute[ckey] = time_extra(plain, module, make_input, loss, self.device)
            return self._recompute[ckey] * self.context(micro_batch)

    def optimizer_s(self, params: float, tensors: int) -> float:
        """AdamW's step over ``params`` elements in ``tensors`` tensors: the fit (``_adam_fit``) in context
        (``optimizer_context``); nothing to step (every parameter frozen) costs nothing."""
        if not params and not tensors:
            return 0.0
        return self._adam_fit(params, tensors) * self.optimizer_context()

    def _adam_fit(self, params: float, tensors: int) -> float:
        """A fixed cost, one per tensor and one per element, fitted to three measured AdamW steps (the Trainer's
        kind): one tiny tensor, 64 tiny tensors, 64 tensors of ``ADAM_FIT_ELEMENTS``. On a GPU the multi-tensor
        step is a few launches whatever the count, so the fixed term carries them, and the per-element slope is
        taken where the step is bound by memory, not by its launches (a one-tensor step of 1M elements on the
        H200 is launches: fitting on it made a 124M-parameter GPT's step 27 ms, measured about 2 ms)."""
        if self._adam is None:
            import torch
            dtype = getattr(torch, {2: "bfloat16", 4: "float32"}[self.desc.dtype_bytes])
            many, small = 64, 16
            big = ADAM_FIT_ELEMENTS.get(torch.device(self.device).type, ADAM_FIT_ELEMENTS["cpu"])
            t_one = time_adamw(small, 1, self.device, dtype)
            t_many = time_adamw(many * small, many, self.device, dtype)
            t_big = time_adamw(big, many, self.device, dtype)
            per_tensor = max((t_many - t_one) / (many - 1), 0.0)
            per_elem = max((t_big - t_many) / (big - many * small), 0.0)
            self._adam = (max(t_one - per_tensor, 0.0), per_tensor, per_elem)
        fixed, per_tensor, per_elem = self._adam
        return fixed + tensors * per_tensor + params * per_elem

    @classmethod
    def for_gpt(cls, desc: ModelDesc, *, cores: int | None = None, overheads: bool | dict[str, float] = True,
                device: str = "cpu") -> MeasuredCompute:
        """The parallel GPT's own embedding, block and head (tilestack.parallel.model), in its dtype; with
        ``overheads`` the host costs of the parallel wrappers too (measured when first needed, or given)."""
        if not desc.config:
            raise PlanError(f"MeasuredCompute.for_gpt: model {desc.name!r} has no ModelConfig; expected a "
                            "description from describe_gpt (use for_module for other models)")
        import torch

        from tilestack.parallel.model import GPT, Block, ModelConfig, lm_loss
        if desc.dtype_bytes not in (2, 4):
            raise PlanError(f"MeasuredCompute.for_gpt: dtype_bytes={desc.dtype_bytes}; expected 2 (bfloat16) or 4 "
                            "(float32), the dtypes the GPT trains in")
        cfg = ModelConfig(**desc.config)
        dtype = {2: torch.bfloat16, 4: torch.float32}[desc.dtype_bytes]
        s, h, V = desc.seq, cfg.d, cfg.vocab

        def block(b: int, tp: int, recompute: str = "none"):
            # a tensor-parallel rank's block: n_head / tp heads, 4 d / tp hidden units (its local shards), with
            # the recompute policy as parallelize.apply_recompute sets it
            blk = Block(cfg)
            blk.recompute, blk.attn.recompute_scores = recompute == "full", recompute == "selective"
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(blk.attn, name, torch.nn.Linear(h, h // tp))
            blk.attn.o_proj = torch.nn.Linear(h // tp, h)
            blk.mlp.fc = torch.nn.Linear(h, 4 * h // tp)
            blk.mlp.proj = torch.nn.Linear(4 * h // tp, h)
            blk = blk.to(device=device, dtype=dtype)
            return blk, lambda: torch.randn(b, s, h, dtype=dtype, device=device, requires_grad=True), None

        def embed(b: int, tp: int):
            part = GPT(dataclasses.replace(cfg, n_layer=0), seed=0).to(device=device, dtype=dtype)
            part.ln_f = part.lm_head = None
            return part, lambda: torch.randint(0, V, (b, s), device=device), None

        def head(b: int, tp: int):
            part = GPT(dataclasses.replace(cfg, n_layer=0, vocab=V // tp), seed=0).to(device=device, dtype=dtype)
            part.wte = part.wpe = None
            targets = torch.randint(0, V // tp, (b, s), device=device)
            return part, lambda: torch.randn(b, s, h, dtype=dtype, device=device, requires_grad=True), \
                lambda y: lm_loss(y, targets)

        def whole(b: int):
            model = GPT(cfg, seed=0).to(device=device, dtype=dtype)
            targets = torch.randint(0, V, (b, s), device=device)
            return model, lambda: torch.randint(0, V, (b, s), device=device), lambda y: lm_loss(y, targets)

        return cls(desc, {"embed": embed, "block": block, "head": head}, cores=cores, overheads=overheads,
                   device=device, recompute_builders=frozenset({"block"}), whole=whole)

    @classmethod
    def for_module(cls, desc: ModelDesc, module: Any, example_input: Any, *, cores: int | None = None,
                   example_kwargs: dict[str, Any] | None = None) -> MeasuredCompute:
        """The layers of a torch module described by ``describe_module(module, example_input)``: each is timed
        on the arguments it received in the example's forward, its first sample repeated to the micro-batch size
        (tensors whose first dim is the example's batch; others, a mask or a rotary table, as they were); tp must
        be 1. ``example_kwargs``: the forward's keyword arguments, as given to describe_module."""
        from torch import nn

        from tilestack.parallel.plan.describe import (
            _check_module,
            _children_in_order,
            _example_args,
            _example_kwargs,
            _leaves,
            _loss_of,
            _map_tensors,
            _trace,
        )
        where = "MeasuredCompute.for_module"
        _check_module(module, None, where)
        args = _example_args(example_input, where)
        batch = args[0].shape[0]
        kwargs = _example_kwargs(example_kwargs, batch, where)
        chain = _children_in_order(module) or [(type(module).__name__, module)]
        calls: dict[str, Any] = {}
        for call in _trace(module, args, chain, kwargs):
            k = sum(1 for n in calls if n == call.name or n.startswith(f"{call.name}#"))
            calls[call.name if k == 0 else f"{call.name}#{k + 1}"] = call
        missing = [layer.name for layer in desc.layers if layer.name not in calls]
        if missing:
            raise PlanError(f"{where}: layers {missing} of {desc.name!r} are not layers of module "
                            f"{type(module).__name__}; expected the module that was described")

        class Bound(nn.Module):
            """A layer with its call's arguments, called on them as one input (time_forward_backward's x)."""

            def __init__(self, layer: Any):
                super().__init__()
                self.layer = layer

            def forward(self, packed: tuple[tuple, dict]) -> Any:
                a, kw = packed
                return self.layer(*_map_tensors(a, _nonleaf), **_map_tensors(kw, _nonleaf))

        def builder(name: str):
            call = calls[name]

            def build(b: int, tp: int):
                if tp != 1:
                    raise PlanError(f"layer {name!r} has no tensor-parallel layout; expected tp=1, got tp={tp}")

                def resize(t):
                    if t.dim() >= 1 and t.shape[0] == batch:          # (batch, ...): one sample, b times
                        return t[:1].repeat(b, *(1,) * (t.dim() - 1))
                    return t

                def make():
                    return _leaves((_map_tensors(call.args, resize), _map_tensors(call.kwargs, resize)))
                # a copy: timing runs it many times in training mode, which moves BatchNorm's statistics
                return Bound(copy.deepcopy(call.module)), make, _loss_of
            return build

        def whole(b: int):
            def resize(t):                       # per-sample tensors (batch first): one sample, b times
                return t[:1].repeat(b, *(1,) * (t.dim() - 1)) if t.dim() >= 1 and t.shape[0] == batch else t

            return Bound(copy.deepcopy(module)), lambda: _leaves((_map_tensors(args, resize),
                                                                  _map_tensors(kwargs, resize))), _loss_of

        return cls(desc, {layer.name: builder(layer.name) for layer in desc.layers}, cores=cores, whole=whole)


def _nonleaf(t: Any) -> Any:
    """A copy a layer may change in place (ReLU(inplace=True)) where the timed input is a leaf needing grad."""
    return t.clone() if t.requires_grad else t


# ---- roofline -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RooflineCompute(ComputeModel):
    """Times from the device table's peaks (a device that is not here): see the module docstring."""

    desc: ModelDesc
    device: str
    dtype: str = "bf16"
    matmul_efficiency: float = MATMUL_EFFICIENCY
    attention_efficiency: float = ATTENTION_EFFICIENCY
    copy_efficiency: float = COPY_EFFICIENCY
    host_s_per_op: float = HOST_S_PER_OP

    def __post_init__(self) -> None:
        from tilestack.errors import DeviceError
        from tilestack.perf.device import PeakSpec, lookup_peaks
        if not isinstance(self.desc, ModelDesc) or not self.desc.layers:
            raise PlanError(f"RooflineCompute: desc={type(self.desc).__name__}; expected a ModelDesc with layers")
        # (numpy's numbers are numbers: an np.float32 efficiency was refused; each is kept as a float)
        for arg in ("matmul_efficiency", "attention_efficiency", "copy_efficiency"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
                raise PlanError(f"RooflineCompute: {arg}={v!r}; expected a fraction of the peak in (0, 1]")
            setattr(self, arg, float(v))
        if isinstance(self.host_s_per_op, bool) or not isinstance(self.host_s_per_op, numbers.Real) or not (
                0 <= self.host_s_per_op < float("inf")):
            raise PlanError(f"RooflineCompute: host_s_per_op={self.host_s_per_op!r}; expected finite seconds >= 0")
        self.host_s_per_op = float(self.host_s_per_op)
        if isinstance(self.device, dict | PeakSpec):
            self._spec_given()
            return
        if not isinstance(self.device, str) or not self.device.strip():
            raise PlanError(f"RooflineCompute: device={self.device!r}; expected a device-table key or name such as "
                            "'h200', 'h100-sxm', 'a100-sxm-80gb', or a spec {'flops': {dtype: FLOP/s}, "
                            "'bandwidth': bytes/s}")
        try:
            self.spec = lookup_peaks(self.device)
        except DeviceError as e:
            raise PlanError(f"RooflineCompute: device={self.device!r} is not in tilestack.perf.device's table; "
                            "expected a key or name such as 'h200', 'h100-sxm', 'a100-sxm-80gb', or the device's "
                            f"figures as device={{'flops': {{dtype: FLOP/s}}, 'bandwidth': bytes/s}} ({e})") from None
        try:
            self.peak = self.spec.peak(self.dtype)
        except Exception as e:          # the table's own error for a dtype it does not know
            raise PlanError(f"RooflineCompute: dtype={self.dtype!r} for {self.spec.label} ({e}); expected one the "
                            "device table lists, such as 'bf16', 'tf32', 'fp32'") from None
        if not self.peak and self.dtype not in self.spec.flops:     # (the message named neither dtype= nor choices)
            raise PlanError(f"RooflineCompute: dtype={self.dtype!r} for {self.spec.label}: no published {self.dtype} "
                            f"peak; expected one its table row gives: {sorted(self.spec.flops)}")
        if not self.peak or not self.spec.bandwidth:
            raise PlanError(f"RooflineCompute: device={self.device!r} has no published {self.dtype} peak or "
                            "bandwidth; expected a GPU of the device table")
        self.source = f"roofline of {self.spec.label} ({self.dtype}, device table)"
        self.cores = None

    def _spec_given(self) -> None:
        """A device that is not in the table, given by its figures: a PeakSpec, or a dict with ``flops`` (FLOP/s by
        dtype, dense), ``bandwidth`` (bytes/s) and optionally ``label``; each checked and refused by name."""
        from tilestack.perf.device import PeakSpec
        spec = self.device
        if isinstance(spec, dict):
            unknown = sorted(str(k) for k in set(spec) - {"flops", "bandwidth", "label"})
            if unknown or "flops" not in spec or "bandwidth" not in spec:
                raise PlanError(f"RooflineCompute: device={spec!r:.200}; expected a dict of 'flops' ({{dtype: "
                                f"FLOP/s}}), 'bandwidth' (bytes/s) and optionally 'label'"
                                f"{f' (unknown keys: {unknown})' if unknown else ''}")
            label = spec.get("label", "a given device")
            if not isinstance(label, str) or not label:
                raise PlanError(f"RooflineCompute: device['label']={label!r}; expected a non-empty str")
            flops = spec["flops"]
            if not isinstance(flops, dict) or not flops:
                raise PlanError(f"RooflineCompute: device['flops']={flops!r:.120}; expected a non-empty dict of "
                                "FLOP/s by dtype, such as {'bf16': 9.9e14}")
            spec = PeakSpec(key=label.lower(), label=label, patterns=(), flops=dict(flops),
                            bandwidth=spec["bandwidth"], source="given")
        # numpy's numbers are numbers (figures computed with numpy, np.float32(9.9e14) or np.int64, were refused as
        # "expected a positive finite FLOP/s", as search's memory limits once were); each is kept as a Python float
        # (np.bool_ is no numbers.Real; a bool is refused by name)
        def real(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        for dt, v in spec.flops.items():
            if not real(v):
                raise PlanError(f"RooflineCompute: device's flops[{dt!r}]={v!r} ({spec.label}); expected a positive "
                                "finite FLOP/s")
        bw = spec.bandwidth
        if not real(bw):
            raise PlanError(f"RooflineCompute: device's bandwidth={bw!r} ({spec.label}); expected positive finite "
                            "bytes/s")
        spec = dataclasses.replace(spec, flops={dt: float(v) for dt, v in spec.flops.items()}, bandwidth=float(bw))
        if self.dtype not in spec.flops:
            raise PlanError(f"RooflineCompute: dtype={self.dtype!r} for {spec.label}; expected one its flops give: "
                            f"{sorted(spec.flops)}")
        self.spec, self.peak = spec, float(spec.flops[self.dtype])
        self.source = f"roofline of {spec.label} ({self.dtype}, given figures)"
        self.cores = None

    def _times(self, layer: LayerDesc, index: int, micro_batch: int, tp: int) -> tuple[float, float]:
        b = micro_batch
        split = tp if layer.tp_able else 1
        other = layer.flops_fwd - layer.matmul_flops
        flop_s = (layer.matmul_flops * b / split / (self.peak * self.matmul_efficiency)
                  + other * b / split / (self.peak * self.attention_efficiency))
        moved = 2 * b * (layer.act_bytes["none"] - layer.act_tp_bytes.get("none", 0.0) * (1 - 1 / split))
        mem_s = moved / (self.spec.bandwidth * self.copy_efficiency)
        host = self.host_s_per_op * (OPS_PER_BLOCK_FWD if layer.kind == "block" else 4)
        fwd = max(flop_s + mem_s, host)
        return fwd, max(BACKWARD_PER_FORWARD * (flop_s + mem_s), BACKWARD_PER_FORWARD * host)

    def recompute_s(self, index: int, micro_batch: int, tp: int, policy: str) -> float:
        """Full recompute: the forward again. Selective: the attention scores' own work, their FLOPs at
        attention's efficiency and the scores' bytes written and read at the copy bandwidth, at least the host
        launches of the ops it replays (``SELECTIVE_OPS``), at most the forward. It was the forward times the
        scores' share of the FLOPs; where the forward is its host launches' floor that share falls as the width
        grows, so a wider model (more FLOPs, same plan) was predicted faster (round 10)."""
        layer = self.desc.layers[index]
        if policy != "selective" or layer.kind != "block":
            return super().recompute_s(index, micro_batch, tp, policy)
        b = micro_batch
        split = tp if layer.tp_able else 1
        flop_s = layer.selective_flops * b / split / (self.peak * self.attention_efficiency)
        scores = max(layer.act_bytes["none"] - layer.act_bytes["selective"], 0.0)
        mem_s = 2 * b * scores / split / (self.spec.bandwidth * self.copy_efficiency)
        fwd, _ = self.layer_times(index, micro_batch, tp)
        return min(max(flop_s + mem_s, self.host_s_per_op * SELECTIVE_OPS), fwd)

    def optimizer_s(self, params: float, tensors: int) -> float:
        mem = params * ADAM_BYTES_PER_ELEMENT / (self.spec.bandwidth * self.copy_efficiency)
        return max(mem, tensors * ADAM_OPS_PER_TENSOR * self.host_s_per_op)
