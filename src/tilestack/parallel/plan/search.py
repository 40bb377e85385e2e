"""Search plans: every intra-operator layout and micro-batch count of a world size (ranked by predicted step
time or goodput, under each rank's memory limit), and Alpa's inter-operator dynamic program over layer
boundaries and sub-mesh sizes.

    ranked = search(desc, compute, comm, world_size=4, batch=16, memory_limit=2**30)
    ranked[0].plan, ranked[0].step_s                  # the fastest plan that fits (runnable ones first)
    best = alpa_stages(n_layers, n_devices=8, submeshes=(1, 2, 4, 8), microbatches=8, stage_cost=cost)

``search`` enumerates pp x dp x dp_shard x tp = world_size (each a factor), sequence parallelism with tp > 1,
the three schedules (interleaved with 2 virtual stages per rank), the micro-batch counts that divide the per-rank
batch, the three recompute policies, ZeRO-1/2 for replicated data parallelism; each plan is predicted with
``predict`` (the pipeline simulated) and kept if its ranks fit ``memory_limit`` (one for every GPU, or one per
GPU).

``alpa_stages`` is the inter-operator pass of Alpa (Zheng et al., OSDI 2022, section 5.2): cut K layers into
stages, give stage j a sub-mesh of d_j devices (sum d_j = n_devices), minimising the pipeline latency
    T = sum_j t_j + (B - 1) max_j t_j
(t_j: stage j's time per micro-batch under its best intra-operator layout, B micro-batches). For a candidate
t_max (a stage time the cost gives) a DP over (first layer, devices left, stages left) finds the least sum of
t_j with every t_j <= t_max; the answer is the best latency of those splits over the candidates, which are
bisected rather than all tried (``alpa_stages``). ``stage_cost(k, i, d, stages_after)`` gives (t, choice) of
layers [k, i) on d devices, ``stages_after`` stages following it (1F1B keeps that many more micro-batches in
flight on it, so memory limits it), or None when nothing fits. ``brute_force_stages`` enumerates every cut and
device split with the same cost: the tests check the DP against it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from tilestack.parallel.config import RECOMPUTE
from tilestack.parallel.plan.comm import CommModel
from tilestack.parallel.plan.compute import ComputeModel
from tilestack.parallel.plan.describe import INT64_MAX, ModelDesc, PlanError
from tilestack.parallel.plan.predict import Plan, Prediction, even_bounds, predict
from tilestack.parallel.plan.schedule import SCHEDULES

INTERLEAVED_CHUNKS = 2
RANK_BY = ("time", "goodput")
ENUMERATE_KW = ("schedules", "recompute", "zero", "max_microbatches")     # what search passes to enumerate_plans


def factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every ordered tuple of ``parts`` positive ints whose product is ``n``."""
    if parts == 1:
        yield (n,)
        return
    for f in _divisors(n):
        for rest in factorizations(n // f, parts - 1):
            yield (f, *rest)


MAX_WORLD = 1 << 40   # _divisors' trial division goes to sqrt(world_size): 2**20 steps at most


@functools.cache
def _divisors(n: int) -> tuple[int, ...]:
    """The divisors of ``n``, ascending (trial division up to sqrt(n): a world of a million ranks is instant)."""
    small = [f for f in range(1, math.isqrt(n) + 1) if n % f == 0]
    return tuple(small + [n // f for f in reversed(small) if f * f != n])


def _integer(v: Any) -> bool:
    """An int, or another integral number (numpy's int64 from np.prod of a mesh's shape): refusing those refused a
    valid world size or batch; a bool is no count."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def check_world(world_size: Any) -> int:
    # (1 << 70 ranks hung in _divisors' trial division up to 2**35)
    if not _integer(world_size) or not 1 <= world_size <= MAX_WORLD:
        raise PlanError(f"world_size={world_size!r}; expected a positive int (ranks) up to {MAX_WORLD}")
    return int(world_size)


def _positive_int(where: str, arg: str, v: Any, what: str) -> int:
    # (a batch of 1 << 70, past any size torch holds, was planned as given)
    if not _integer(v) or not 1 <= v <= INT64_MAX:
        raise PlanError(f"{where}: {arg}={v!r}; expected a positive int ({what})")
    return int(v)


def _check_desc(where: str, desc: Any) -> None:
    if not isinstance(desc, ModelDesc):
        raise PlanError(f"{where}: desc={type(desc).__name__}; expected a ModelDesc (describe_gpt, "
                        "describe_transformer or describe_module)")
    if not desc.layers:
        raise PlanError(f"{where}: model {desc.name!r} has no layers; expected at least one")


def _listlike(v: Any) -> bool:
    """A sequence of values, a 1-D numpy array among them (np.array([8, 16]) of batches or per-GPU limits is no
    collections.abc.Sequence, and was refused as "expected a positive int" / "a positive number of bytes")."""
    return (isinstance(v, Sequence) and not isinstance(v, str | bytes)) or (isinstance(v, np.ndarray) and v.ndim == 1)


def _batches(where: str, batch: Any) -> list[int]:
    """``batch``, a positive int or a non-empty sequence of them, as a list."""
    if _integer(batch):
        batches = [batch]
    elif _listlike(batch) and len(batch):
        batches = list(batch)
    else:
        raise PlanError(f"{where}: batch={batch!r}; expected a positive int (samples per step) or a non-empty "
                        "sequence of them")
    batches = [_positive_int(where, "batch", b, "samples per step") for b in batches]
    return list(dict.fromkeys(batches))          # a batch given twice is one set of plans, ranked once


def enumerate_plans(desc: ModelDesc, world_size: int, batch: int, *, schedules: Sequence[str] | None = None,
                    recompute: Sequence[str] = ("none", "selective", "full"), zero: bool = True,
                    max_microbatches: int = 16) -> list[Plan]:
    """Every plan of ``world_size`` ranks for a global ``batch`` that the model and batch allow (see the module
    docstring); PlanError if there is none (e.g. a batch smaller than any data-parallel degree would need)."""
    where = "enumerate_plans"
    _check_desc(where, desc)
    world_size = check_world(world_size)
    batch = _positive_int(where, "batch", batch, "samples per step")
    _positive_int(where, "max_microbatches", max_microbatches, "the most micro-batches to try")
    if not isinstance(zero, bool):
        raise PlanError(f"{where}: zero={zero!r}; expected True (try ZeRO-1 and -2 with data parallelism) or False")
    # one name is a selection of one, as recompute="full" is (tuple("gpipe") would be its letters)
    schedules = SCHEDULES if schedules is None else (schedules,) if isinstance(schedules, str) else tuple(schedules)
    policies = tuple(recompute) if not isinstance(recompute, str) else (recompute,)
    for arg, given, known in (("schedules", schedules, SCHEDULES), ("recompute", policies, RECOMPUTE)):
        unknown = [x for x in given if x not in known]
        if not given or unknown:
            raise PlanError(f"{where}: {arg}={list(given)}; expected a non-empty selection of {tuple(known)}")
    has_blocks = any(layer.kind == "block" for layer in desc.layers)
    policies = policies if has_blocks else ("none",)
    out: list[Plan] = []
    for pp, dp, shard, tp in factorizations(world_size, 4):
        if not desc.tp_divides(tp) or batch % (dp * shard):
            continue
        local = batch // (dp * shard)
        for sched in (schedules if pp > 1 else ("1f1b",)):
            v = INTERLEAVED_CHUNKS if sched == "interleaved-1f1b" else 1
            try:
                even_bounds(desc, pp * v)
            except PlanError:
                continue
            for m in range(1, min(local, max_microbatches) + 1):
                if local % m or (pp == 1 and m > 1) or (pp > 1 and sched != "gpipe" and m < pp):
                    continue
                if sched == "interleaved-1f1b" and m % pp:
                    continue
                for sp in ((False, True) if tp > 1 and desc.seq % tp == 0 else (False,)):
                    for rc in policies:
                        for z in ((0, 1, 2) if zero and dp > 1 and shard == 1 else (0,)):
                            out.append(Plan(batch=batch, pp=pp, dp=dp, dp_shard=shard, tp=tp, sp=sp, schedule=sched,
                                            stages_per_rank=v, microbatches=m, recompute=rc, zero=z))
    if not out:
        raise PlanError(_no_plan(desc, world_size, batch))
    return out


def _no_plan(desc: ModelDesc, world_size: int, batch: int) -> str:
    """Why no plan of ``world_size`` ranks fits: the degrees dividing it that the batch (data parallelism), the
    layers (pipeline stages) and the model's widths (tensor parallelism) each allow, none multiplying to it."""
    divs = _divisors(world_size)
    data = [k for k in divs if batch % k == 0]
    stages = []
    for k in divs:
        try:
            even_bounds(desc, k)
            stages.append(k)
        except PlanError:
            pass
    tps = [k for k in divs if desc.tp_divides(k)]
    blocks = sum(layer.kind == "block" for layer in desc.layers)
    return (f"no plan of world_size={world_size} fits batch={batch} and model {desc.name!r}: of the degrees "
            f"dividing {world_size} {list(divs)}, batch={batch} allows data parallelism of {data}, its "
            f"{len(desc.layers)} layers ({blocks} blocks) pipelines of {stages} stages, its widths tensor "
            f"parallelism of {tps}, and no pp x dp x tp of them is {world_size} with whole micro-batches; expected "
            "a batch divisible by a data-parallel degree, or a world size that these degrees multiply to")


@dataclasses.dataclass
class Ranked:
    prediction: Prediction
    score: float                    # what the ranking sorts by (seconds per step, or -goodput)
    goodput: float | None = None    # samples per second x statistical efficiency, when ranked by goodput

    @property
    def plan(self) -> Plan:
        return self.prediction.plan

    @property
    def step_s(self) -> float:
        return self.prediction.step_s


def search(desc: ModelDesc, compute: ComputeModel, comm: CommModel, *, world_size: int, batch: int | Sequence[int],
           memory_limit: float | Sequence[float] | None = None, rank_by: str = "time",
           efficiency: Callable[[int], float] | None = None,
           **enumerate_kw: Any) -> list[Ranked]:
    """Predict every enumerated plan (for each batch size given) and rank those that fit ``memory_limit`` bytes
    per rank (one number), or per GPU (a sequence of world_size numbers, GPUs of different memories: a plan fits
    when its pipeline ranks can be placed on GPUs that hold them, ``placeable``): by step time (runnable plans
    first among equals), or by goodput = samples/s x ``efficiency(batch)`` (``rank_by="goodput"``,
    tilestack.parallel.plan.goodput). PlanError naming the limit if none fits."""
    _check_desc("search", desc)
    world_size = check_world(world_size)
    unknown = sorted(set(enumerate_kw) - set(ENUMERATE_KW))
    if unknown:
        raise PlanError(f"search: {', '.join(f'{k}={enumerate_kw[k]!r}' for k in unknown)}; expected keywords of "
                        f"enumerate_plans {ENUMERATE_KW} (the parallel kinds searched are pp, dp, dp_shard, tp, sp "
                        "and ZeRO)")
    if not isinstance(compute, ComputeModel) or not isinstance(comm, CommModel):
        raise PlanError(f"search: compute={type(compute).__name__}, comm={type(comm).__name__}; expected a "
                        "ComputeModel and a CommModel")
    if rank_by not in RANK_BY:
        raise PlanError(f"search: rank_by={rank_by!r}; expected one of {RANK_BY}")
    if rank_by == "goodput" and not callable(efficiency):
        raise PlanError(f"search: rank_by='goodput' with efficiency={efficiency!r}; expected a callable E(batch) "
                        "(e.g. GradientNoiseScale's phi through goodput.efficiency)")
    if hasattr(comm, "check_world"):           # ClusterComm of nodes x gpus_per_node GPUs: plan for all of them
        comm.check_world("search", world_size, exact=True)
    limits = gpu_limits("search", memory_limit, world_size)
    batches = _batches("search", batch)
    effs = {}
    if rank_by == "goodput":
        for b in batches:
            e = efficiency(b)
            # (an np.float32 efficiency, from a numpy E(M), was refused)
            if isinstance(e, bool | np.bool_) or not isinstance(e, numbers.Real) or not math.isfinite(e) or e <= 0:
                raise PlanError(f"search: efficiency({b})={e!r}; expected a positive finite statistical efficiency")
            effs[b] = float(e)
    plans = [p for b in batches for p in enumerate_plans(desc, world_size, b, **enumerate_kw)]
    preds = [predict(p, desc, compute, comm) for p in plans]
    fits = [p for p in preds if limits is None or placeable(p, limits)]
    if not fits:
        least = min(preds, key=lambda p: p.memory_bytes)
        given = f"{limits[0]:.4g} bytes per rank" if not _listlike(memory_limit) else \
            f"{[float(f'{v:.4g}') for v in memory_limit]} bytes per GPU"
        raise PlanError(f"search: memory_limit={given}; no plan of {len(preds)} fits "
                        f"(the smallest, {least.plan.label()}, needs {least.memory_bytes:.4g}); expected a limit of "
                        "at least that, more ranks or a smaller batch")
    out = []
    for p in fits:
        if rank_by == "goodput":
            g = p.samples_per_s() * effs[p.plan.batch]
            out.append(Ranked(p, -g, g))
        else:
            out.append(Ranked(p, p.step_s))
    out.sort(key=lambda r: (r.score, not r.prediction.runnable))
    return out


def _bytes_limit(v: Any) -> bool:
    """A positive, finite number of bytes. numpy's numbers are numbers (a limit of np.int64(80 * 2**30) or
    np.float32 was refused as "expected a positive number"); inf is refused, as ``tilestack plan --memory-limit
    1e400`` is: no limit is None, and an infinite limit is more likely a unit gone wrong (it was taken silently)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and math.isfinite(v) and v > 0


def gpu_limits(where: str, memory_limit: Any, world_size: int) -> tuple[float, ...] | None:
    """``memory_limit`` as bytes per GPU, largest first (None: no limit): one number for every GPU, or one per
    GPU when their memories differ."""
    if memory_limit is None:
        return None
    if _listlike(memory_limit):
        limits = list(memory_limit)
        if len(limits) != world_size or not all(_bytes_limit(v) for v in limits):
            raise PlanError(f"{where}: memory_limit={limits!r:.200}; expected {world_size} positive numbers of bytes, "
                            "one per GPU, finite (or one number for every GPU; None for no limit)")
        return tuple(sorted((float(v) for v in limits), reverse=True))
    if not _bytes_limit(memory_limit):
        raise PlanError(f"{where}: memory_limit={memory_limit!r}; expected a positive number of bytes per rank, "
                        "finite (None for no limit)")
    return (float(memory_limit),) * world_size


def placeable(pred: Prediction, limits: Sequence[float]) -> bool:
    """Whether the plan's pipeline ranks, each a group of world_size / pp GPUs of one peak, can be put on GPUs of
    these ``limits`` (largest first): the largest peak on the largest GPUs, the next on the next, is a placement
    that fits whenever any does (the group with the largest peak gets the largest least limit a group can have,
    and so on down)."""
    group = len(limits) // pred.plan.pp
    return all(peak <= limits[(j + 1) * group - 1] for j, peak in enumerate(sorted(pred.peaks, reverse=True)))


def choose(ranked: Sequence[Ranked]) -> Ranked:
    """The best plan ``tilestack train`` can run (the best of all when none is runnable)."""
    if isinstance(ranked, str | bytes) or not isinstance(ranked, Sequence) or not ranked or not all(
            isinstance(r, Ranked) for r in ranked):
        raise PlanError(f"choose: ranked={ranked!r:.80}; expected the non-empty list of Ranked that search returns")
    for r in ranked:
        if r.prediction.runnable:
            return r
    return ranked[0]


# a plan label's family: what kind of parallelism or saving sets it apart (the last one named wins)
FAMILIES = ("dp", "fsdp", "tp", "sp", "1f1b", "gpipe", "int", "zero", "rc-full", "rc-selective")


def family(label: str) -> str:
    found = [f for f in FAMILIES if f in label]
    return found[-1] if found else "single"


def to_measure(ranked: Sequence[Ranked], n: int) -> list[Ranked]:
    """``n`` plans worth measuring against their predictions: the choice, then the best runnable plan of each
    family, then the rest of the runnable ones by rank."""
    runnable = [r for r in ranked if r.prediction.runnable]
    out = [choose(ranked)]
    seen = {family(out[0].plan.label())}
    for r in runnable:
        if len(out) < n and family(r.plan.label()) not in seen:
            out.append(r)
            seen.add(family(r.plan.label()))
    for r in runnable:
        if len(out) >= n:
            break
        if r not in out:
            out.append(r)
    return out


# ---- Alpa's inter-operator pass --------------------------------------------------------------------------------------
StageCost = Callable[[int, int, int, int], "tuple[float, Any] | None"]


@dataclasses.dataclass(frozen=True)
class StageSplit:
    """Stages as (first layer, end layer, devices, choice), the latency T and its t_max."""

    stages: tuple[tuple[int, int, int, Any], ...]
    latency: float
    t_max: float


def _check_stage_args(where: str, n_layers: Any, n_devices: Any, submeshes: Any, microbatches: Any,
                      stage_cost: Any, max_stages: Any) -> None:
    _positive_int(where, "n_layers", n_layers, "layers to cut into stages")
    _positive_int(where, "n_devices", n_devices, "devices")
    _positive_int(where, "microbatches", microbatches, "micro-batches per step")
    if max_stages is not None:
        _positive_int(where, "max_stages", max_stages, "the most stages")
    if not callable(stage_cost):
        raise PlanError(f"{where}: stage_cost={stage_cost!r}; expected a callable (k, i, d, stages_after) -> "
                        "(seconds, choice) or None")
    try:
        sizes = list(submeshes)
    except TypeError:
        raise PlanError(f"{where}: submeshes={submeshes!r}; expected a sequence of device counts") from None
    if any(not _integer(d) for d in sizes) or not any(1 <= d <= n_devices for d in sizes):
        raise PlanError(f"{where}: submeshes={sizes}; expected int sizes, some between 1 and {n_devices}")


def pipeline_latency(times: Sequence[float], microbatches: int) -> float:
    return sum(times) + (microbatches - 1) * max(times)


def alpa_stages(n_layers: int, *, n_devices: int, submeshes: Sequence[int], microbatches: int,
                stage_cost: StageCost, max_stages: int | None = None) -> StageSplit:
    """Alpa's DP (module docstring). ``submeshes``: the device counts a stage may take (Alpa: 1, 2, 4, ..., a
    node, then whole nodes). PlanError when no split fits.

    The stage costs are asked once each (``_cost_table``), and the DP for one t_max runs over whole arrays
    (``_least_sums``). The DP is not run for every candidate t_max: G_s(t_max), the least sum of s stage times
    each at most t_max, can only fall as t_max grows, so where G is the same at two candidates it is the same at
    every one between them, whose latencies are then no better than the lower one's; and an interval whose
    candidates cannot beat the best latency so far (G at its top + (B - 1) x its least candidate) is dropped. The
    candidates left are bisected: a 200-layer model on 8 devices runs a few dozen DPs, not thousands."""
    _check_stage_args("alpa_stages", n_layers, n_devices, submeshes, microbatches, stage_cost, max_stages)
    n_layers, n_devices, microbatches = int(n_layers), int(n_devices), int(microbatches)
    max_stages = None if max_stages is None else int(max_stages)
    sizes = sorted({int(d) for d in submeshes if 1 <= d <= n_devices})
    if not sizes:
        raise PlanError(f"alpa_stages: submeshes={list(submeshes)}; expected sizes between 1 and {n_devices}")
    max_stages = max_stages or min(n_layers, n_devices)
    times, choice = _cost_table(n_layers, n_devices, sizes, max_stages, stage_cost)
    cands = np.unique(times[np.isfinite(times)])
    none = PlanError(f"alpa_stages: no split of {n_layers} layers over {n_devices} devices fits (every stage cost "
                     "is None: memory); expected a larger memory limit or more devices")
    if not len(cands):
        raise none
    best: list[StageSplit] = []
    sums: dict[int, np.ndarray] = {}

    def evaluate(c: int) -> np.ndarray:
        """G_s at candidate c for every stage count s, keeping the best split its DP gives."""
        if c not in sums:
            least, paths = _least_sums(times, sizes, n_devices, max_stages, float(cands[c]))
            sums[c] = least
            for path in paths:
                stage_times = [float(times[k, i, j, len(path) - 1 - n]) for n, (k, i, j) in enumerate(path)]
                lat = pipeline_latency(stage_times, microbatches)
                if not best or lat < best[0].latency:
                    split = tuple((k, i, sizes[j], choice(k, i, j, len(path) - 1 - n))
                                  for n, (k, i, j) in enumerate(path))
                    best[:] = [StageSplit(split, lat, max(stage_times))]
        return sums[c]

    top = len(cands) - 1
    if not np.isfinite(evaluate(top)).any():
        raise none
    lo, hi = 0, top                                   # the least feasible candidate (feasibility grows with t_max)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if np.isfinite(evaluate(mid)).any() else (mid + 1, hi)
    intervals = [(lo, top)]
    while intervals:
        a, b = intervals.pop()
        if b - a <= 1 or np.array_equal(sums[a], sums[b]):
            continue
        if float(sums[b].min()) + (microbatches - 1) * float(cands[a + 1]) >= best[0].latency:
            continue
        mid = (a + b) // 2
        evaluate(mid)
        intervals += [(a, mid), (mid, b)]
    return best[0]


def _cost_table(n_layers: int, n_devices: int, sizes: list[int], max_stages: int, stage_cost: StageCost
                ) -> tuple[np.ndarray, Callable[[int, int, int, int], Any]]:
    """Every stage cost a split can use: times[k, i, j, after] (inf where the cost is None or the stage cannot
    be in a split: fewer layers or devices left than the ``after`` stages behind it need), and the choice of
    (k, i, j, after). A cost whose ``depends_on_after`` is False (plan_stage_cost without a memory limit) is
    asked once per (k, i, d), not once per stages after it too."""
    times = np.full((n_layers + 1, n_layers + 1, len(sizes), max_stages), np.inf)
    choices: dict[tuple[int, int, int, int], Any] = {}
    once = getattr(stage_cost, "depends_on_after", True) is False
    for after in range(1 if once else max_stages):
        for j, d in enumerate(sizes):
            if d + after * sizes[0] > n_devices:
                continue
            for k in range(n_layers - after):
                for i in range(k + 1, n_layers - after + 1):
                    c = stage_cost(k, i, d, after)
                    if c is None:
                        continue
                    # (numpy's seconds are seconds: an np.float32 time was refused)
                    if not isinstance(c, tuple | list) or len(c) != 2 or isinstance(c[0], bool | np.bool_) or \
                            not isinstance(c[0], numbers.Real) or not 0 <= c[0] < math.inf:
                        raise PlanError(f"alpa_stages: stage_cost({k}, {i}, {d}, {after}) gave {c!r:.80}; expected "
                                        "(seconds, choice) with finite seconds >= 0, or None")
                    times[k, i, j, after] = c[0]
                    choices[k, i, j, after] = c[1]
    if once:
        for after in range(1, max_stages):
            for j, d in enumerate(sizes):
                if d + after * sizes[0] <= n_devices:
                    times[:n_layers - after, :n_layers - after + 1, j, after] = \
                        times[:n_layers - after, :n_layers - after + 1, j, 0]
        return times, lambda k, i, j, after: choices[k, i, j, 0]
    return times, lambda k, i, j, after: choices[k, i, j, after]


def _least_sums(times: np.ndarray, sizes: list[int], n_devices: int, max_stages: int, t_max: float
                ) -> tuple[np.ndarray, list[tuple[tuple[int, int, int], ...]]]:
    """Alpa's DP at one t_max over whole arrays: F_s[k, d], the least sum of s stage times (each <= t_max) for
    layers [k, n) on exactly d devices, from F_{s-1} by the first stage [k, i) on sizes[j] devices. Returns
    G_s = F_s[0, n_devices] for s = 1..max_stages (inf where none) and, for each finite one, its stages
    as (k, i, j)."""
    n = times.shape[0] - 1
    allowed = np.where(times <= t_max, times, np.inf)
    prev = np.full((n + 1, n_devices + 1), np.inf)             # F_0: nothing left, no devices left
    prev[n, 0] = 0.0
    steps = []
    least = np.full(max_stages, np.inf)
    for s in range(1, max_stages + 1):
        cur = np.full_like(prev, np.inf)
        first_end = np.zeros(cur.shape, dtype=np.int64)
        first_size = np.zeros(cur.shape, dtype=np.int64)
        for j, size in enumerate(sizes):
            if size > n_devices:
                break
            # (k, i, d - size): the first stage's time plus the rest's least sum, minimised over i
            total = allowed[:, :, j, s - 1][:, :, None] + prev[None, :, :n_devices + 1 - size]
            ends = total.argmin(axis=1)
            value = np.take_along_axis(total, ends[:, None, :], axis=1)[:, 0, :]
            better = value < cur[:, size:]
            cur[:, size:][better] = value[better]
            first_end[:, size:][better] = ends[better]
            first_size[:, size:][better] = j
        steps.append((first_end, first_size))
        least[s - 1] = cur[0, n_devices]
        prev = cur
    paths = []
    for s in range(1, max_stages + 1):
        if not np.isfinite(least[s - 1]):
            continue
        k, d, path = 0, n_devices, []
        for left in range(s, 0, -1):
            ends, js = steps[left - 1]
            i, j = int(ends[k, d]), int(js[k, d])
            path.append((k, i, j))
            k, d = i, d - sizes[j]
        paths.append(tuple(path))
    return least, paths


def compositions(n: int) -> Iterator[tuple[int, ...]]:
    """Every way to write n as an ordered sum of positive ints."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        parts, run = [], 1
        for c in cuts:
            if c:
                parts.append(run)
                run = 1
            else:
                run += 1
        parts.append(run)
        yield tuple(parts)


def brute_force_stages(n_layers: int, *, n_devices: int, submeshes: Sequence[int], microbatches: int,
                       stage_cost: StageCost, max_stages: int | None = None) -> StageSplit:
    """The same optimum as :func:`alpa_stages`, by enumerating every cut and every device split (small cases)."""
    _check_stage_args("brute_force_stages", n_layers, n_devices, submeshes, microbatches, stage_cost, max_stages)
    n_layers, n_devices, microbatches = int(n_layers), int(n_devices), int(microbatches)
    max_stages = None if max_stages is None else int(max_stages)
    sizes = sorted({int(d) for d in submeshes if 1 <= d <= n_devices})
    max_stages = max_stages or min(n_layers, n_devices)
    best: StageSplit | None = None
    for parts in compositions(n_layers):
        S = len(parts)
        if S > max_stages:
            continue
        starts = list(itertools.accumulate((0, *parts)))
        for devs in itertools.product(sizes, repeat=S):
            if sum(devs) != n_devices:
                continue
            cs = [stage_cost(starts[j], starts[j + 1], devs[j], S - 1 - j) for j in range(S)]
            if any(c is None for c in cs):
                continue
            lat = pipeline_latency([c[0] for c in cs], microbatches)
            if best is None or lat < best.latency - 1e-15:
                best = StageSplit(tuple((starts[j], starts[j + 1], devs[j], cs[j][1]) for j in range(S)), lat,
                                  max(c[0] for c in cs))
    if best is None:
        raise PlanError("brute_force_stages: no split fits")
    return best


def plan_stage_cost(desc: ModelDesc, compute: ComputeModel, comm: CommModel, *, batch: int, microbatches: int,
                    memory_limit: float | None, recompute: Sequence[str] = ("none", "selective", "full")
                    ) -> StageCost:
    """The stage cost of the planner's own models, for :func:`alpa_stages`: layers [k, i) on d devices run as a
    one-stage plan of the best intra-operator layout (dp x dp_shard x tp = d, sp, recompute), per micro-batch of
    batch / microbatches samples (forward + backward + its collectives + its share of the gradient reduction and
    optimizer step), with ``stages_after`` more micro-batches' activations in flight (1F1B), under the limit."""
    _check_desc("plan_stage_cost", desc)
    _positive_int("plan_stage_cost", "batch", batch, "samples per step")
    _positive_int("plan_stage_cost", "microbatches", microbatches, "micro-batches per step")
    micro = batch // microbatches
    if not micro or batch % microbatches:
        raise PlanError(f"plan_stage_cost: batch={batch} in microbatches={microbatches}; expected a batch of whole "
                        "micro-batches of at least one sample (microbatches divides batch)")
    if memory_limit is not None and not _bytes_limit(memory_limit):
        raise PlanError(f"plan_stage_cost: memory_limit={memory_limit!r}; expected a positive number of bytes per "
                        "device, finite (or None)")
    # one name is a selection of one (tuple("full") is its letters); an unknown policy made every layout's
    # predict fail, which the layouts below skip, so every stage cost was None and alpa_stages blamed memory
    recompute = (recompute,) if isinstance(recompute, str) else tuple(recompute)
    unknown = [rc for rc in recompute if rc not in RECOMPUTE]
    if not recompute or unknown:
        raise PlanError(f"plan_stage_cost: recompute={list(recompute)}; expected a non-empty selection of "
                        f"{tuple(RECOMPUTE)}")

    @functools.cache
    def classes(d: int) -> tuple[np.ndarray, np.ndarray]:
        """Per layer a class, equal for layers that no layout of d devices can tell apart (the same description
        but for the name, the same times and recompute times at every micro-batch and tp it would use; a layer
        that shares parameters or buffers, or owns shared ones, is a class of its own). Returns the running count
        of each class, counts[j, c] = layers of class c among the first j, and the index of the first block at or
        after each layer (len(layers) where none)."""
        owners = {p.owner for layer in desc.layers for p in (*layer.shared, *layer.shared_buffers)}
        ids: dict[str, int] = {}
        cls = []
        for j, layer in enumerate(desc.layers):
            alone = dataclasses.replace(desc, layers=(layer,))
            seen = []
            for dp, shard, tp in factorizations(d, 3):
                if micro % (dp * shard) or not alone.tp_divides(tp):
                    continue
                b = micro // (dp * shard)
                seen.append((b, tp, compute.layer_times(j, b, tp),
                             tuple(compute.recompute_s(j, b, tp, rc) for rc in recompute)))
            alone_key = j if layer.shared or layer.shared_buffers or j in owners else None
            cls.append(ids.setdefault(repr((dataclasses.replace(layer, name=""), seen, alone_key)), len(ids)))
        counts = np.zeros((len(cls) + 1, len(ids)), dtype=np.int64)
        counts[np.arange(1, len(cls) + 1), cls] = 1
        first_block = np.full(len(cls) + 1, len(cls))
        for j in range(len(cls) - 1, -1, -1):
            first_block[j] = j if desc.layers[j].kind == "block" else first_block[j + 1]
        return counts.cumsum(axis=0), first_block

    @functools.cache
    def signature(k: int, i: int, d: int) -> tuple:
        """What a one-stage plan of layers [k, i) depends on: how many layers of each class, and the class of its
        first block (full recompute replays it). Ranges of one signature cost the same, in whatever order their
        layers come (a one-stage plan adds its layers' times and bytes), so a deep model of equal blocks, or of
        Linear and ReLU in turn, has a few signatures per length, not one per range."""
        counts, first_block = classes(d)
        held = counts[i] - counts[k]
        present = np.flatnonzero(held)
        block = int(first_block[k])
        first = int(np.argmax(counts[block + 1] - counts[block])) if block < i else -1
        return first, present.tobytes(), held[present].tobytes()

    layouts_of: dict[tuple, tuple[tuple[float, str, float, float], ...]] = {}
    times: dict[tuple, Any] = {}                 # the compute model's answers, by layer (_Offset)

    @functools.cache
    def layouts(k: int, i: int, d: int) -> tuple[tuple[float, str, float, float], ...]:
        """(seconds per micro-batch, label, peak bytes, activation bytes) of every layout of layers [k, i) on d
        devices, fastest first: predicted once per signature, whatever the number of stages after it (that only
        changes the memory test)."""
        key = (signature(k, i, d), d)
        if key in layouts_of:
            return layouts_of[key]
        sub = dataclasses.replace(desc, layers=desc.layers[k:i])
        out = []
        for dp, shard, tp in factorizations(d, 3):
            if micro % (dp * shard) or not sub.tp_divides(tp):
                continue
            for sp in ((False, True) if tp > 1 and desc.seq % tp == 0 else (False,)):
                for rc in recompute:
                    plan = Plan(batch=micro, dp=dp, dp_shard=shard, tp=tp, sp=sp, recompute=rc)
                    try:
                        p = predict(plan, sub, _Offset(compute, k, times), comm)
                    except PlanError:
                        continue
                    # gradient sync and optimizer once per step: a 1/microbatches share per micro-batch
                    t = (p.step_s - p.terms["optimizer"] - p.terms["dp comm"]) + \
                        (p.terms["optimizer"] + p.terms["dp comm"]) / microbatches
                    out.append((t, plan.label(), p.memory_bytes, p.memory[0]["activations"]))
        layouts_of[key] = tuple(sorted(out, key=lambda x: x[0]))
        return layouts_of[key]

    def cost(k: int, i: int, d: int, after: int):
        for t, label, peak, act in layouts(k, i, d):           # the fastest that fits
            if memory_limit is None or peak + act * after <= memory_limit:
                return t, label
        return None

    cost.depends_on_after = memory_limit is not None      # only the memory test looks at the stages after

    return cost


class _Offset(ComputeModel):
    """A compute model seen from layer ``k`` on (a sub-model's layer j is the model's k + j). ``memo``: the
    model's layer times by (layer, micro-batch, tp[, policy]), shared by the windows of one stage cost, which
    ask for each layer once per layer range that holds it."""

    def __init__(self, inner: ComputeModel, k: int, memo: dict | None = None):
        self.inner, self.k, self.offset = inner, k, k
        self.desc, self.source, self.cores = inner.desc, inner.source, inner.cores
        self.background, self.collective_s, self.p2p_delay = inner.background, inner.collective_s, inner.p2p_delay
        self.memo = {} if memo is None else memo

    def overhead(self, name: str) -> float:
        return self.inner.overhead(name)

    def layer_times(self, index: int, micro_batch: int, tp: int = 1) -> tuple[float, float]:
        key = (self.k + index, micro_batch, tp)
        if key not in self.memo:
            self.memo[key] = self.inner.layer_times(*key)
        return self.memo[key]

    def recompute_s(self, index: int, micro_batch: int, tp: int, policy: str) -> float:
        key = (self.k + index, micro_batch, tp, policy)
        if key not in self.memo:
            self.memo[key] = self.inner.recompute_s(*key)
        return self.memo[key]

    def optimizer_s(self, params: float, tensors: int) -> float:
        return self.inner.optimizer_s(params, tensors)
