"""Pipeline schedules, simulated: the order each rank runs its forwards and backwards, the time each starts and
ends, hence the bubble, and how many micro-batches' activations each rank holds at once.

    sim = simulate("1f1b", pp=4, stages_per_rank=1, microbatches=8, fwd=[1.0] * 4, bwd=[2.0] * 4)
    sim.makespan        # (m + p - 1) (f + b) = 33 for equal stages and free communication
    sim.bubble          # makespan - m (f + b) of the busiest rank, as a fraction of the makespan: (p-1)/(m+p-1)
    sim.peak_inflight   # per rank, the most forwards whose backward has not run (1F1B: p - rank; GPipe: m)
    sim.steady_inflight # per rank, the most of them held after its first backward (1F1B with m > p - rank:
                        # p - rank again, now beside the gradients; GPipe: 0, nothing is held once backward began)
    sim.events          # (rank, "F" or "B", micro-batch, stage, start, end): the timeline drawn by plan.pictures

Stage s of S = pp * v runs on rank s % pp (the looped placement of tilestack.parallel.parallelize.split_stages).
Orders (those of torch.distributed.pipelining, after Megatron-LM):
- gpipe: every forward, then every backward;
- 1f1b: pp - rank - 1 warm-up forwards, then one forward and one backward in turn, then the remaining backwards;
- interleaved-1f1b: (v - 1) r + 2 (pp - rank - 1) warm-up forwards over the rank's v stages, taken in rounds
  of r micro-batches per stage (r = pp, or m when m < pp, as torch's ScheduleInterleaved1F1B), then one forward
  and one backward in turn (Narayanan et al. 2021).
A forward waits for the previous stage's forward of its micro-batch plus ``p2p[s]`` seconds; a backward for the
next stage's backward plus ``p2p[s]`` and for its own forward. Communication occupies no rank (it is
asynchronous in torch's schedules).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

from tilestack.parallel.config import PP_SCHEDULES as SCHEDULES
from tilestack.parallel.plan.describe import PlanError


@dataclasses.dataclass(frozen=True)
class Event:
    rank: int
    kind: str        # "F" or "B"
    micro: int
    stage: int
    start: float
    end: float


@dataclasses.dataclass
class Simulation:
    events: list[Event]
    makespan: float
    busy: list[float]                 # per rank, seconds of forward and backward work
    peak_inflight: list[float]        # per rank, the peak of (activation weight of the stages) x micro-batches held
    steady_inflight: list[float]      # per rank, that peak after the rank's first backward (0 if no forward follows)

    @property
    def bubble(self) -> float:
        """The idle fraction of the busiest rank: 1 - its work / the makespan."""
        return 1.0 - max(self.busy) / self.makespan if self.makespan > 0 else 0.0

    def concurrency(self) -> float:
        """How many ranks work at once, as the work sees it: the mean, over every second of forward and backward
        work, of the ranks busy in that second (sum of n^2 dt over sum of n dt, n the ranks busy in a stretch dt).
        Not the time average (sum of n dt over the makespan): where ranks overlap in half the step and idle in the
        other half, all the work is done at the overlap's n. 0 without work."""
        # a sweep over the events' starts (+1) and ends (-1): n is constant between two marks
        marks = sorted([(e.start, 1) for e in self.events] + [(e.end, -1) for e in self.events])
        work = squared = 0.0
        n, before = 0, 0.0
        for t, step in marks:
            work += n * (t - before)
            squared += n * n * (t - before)
            n, before = n + step, t
        return squared / work if work > 0 else 0.0


def rank_order(schedule: str, pp: int, v: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """The (kind, micro-batch, stage) ops of ``rank`` in the order it runs them."""
    if schedule == "gpipe" or pp == 1:
        stages = [rank + k * pp for k in range(v)]
        return ([("F", i, s) for s in stages for i in range(m)]
                + [("B", i, s) for s in reversed(stages) for i in range(m)])
    if schedule == "1f1b":
        warm = min(pp - rank - 1, m)
        fwd = [("F", i, rank) for i in range(m)]
        bwd = [("B", i, rank) for i in range(m)]
        order = fwd[:warm]
        for i in range(m - warm):
            order += [fwd[warm + i], bwd[i]]
        return order + bwd[m - warm:]
    # interleaved: the rank's forwards take its v stages in turn, ``per_round`` micro-batches at a time (pp, or
    # all m when m < pp: torch's rounds of max(1, m // pp)); backwards descend the stages the same way; each
    # stage runs its micro-batches in order
    per_round = m // max(1, m // pp)
    total = m * v
    warm = min((v - 1) * per_round + 2 * (pp - rank - 1), total)
    issued = {"F": [0] * v, "B": [0] * v}

    def op(kind: str, k: int) -> tuple[str, int, int]:
        chunk = (k // per_round) % v if kind == "F" else v - 1 - (k // per_round) % v
        micro = issued[kind][chunk]
        issued[kind][chunk] += 1
        return kind, micro, rank + chunk * pp

    order = [op("F", k) for k in range(warm)]
    for i in range(total - warm):
        order += [op("F", warm + i), op("B", i)]
    return order + [op("B", k) for k in range(total - warm, total)]


def simulate(schedule: str, *, pp: int, stages_per_rank: int, microbatches: int, fwd: Sequence[float],
             bwd: Sequence[float], p2p: Sequence[float] | None = None,
             act_weight: Sequence[float] | None = None) -> Simulation:
    """Run the schedule: ``fwd[s]``, ``bwd[s]`` seconds of stage s per micro-batch, ``p2p[s]`` seconds to send
    over the edge between stages s and s + 1 (stage s's output forward, its gradient backward; the last stage's
    is not used), ``act_weight[s]`` what one micro-batch's activations of stage s weigh (bytes; default 1, so
    peak_inflight counts micro-batches)."""
    if schedule not in SCHEDULES:
        raise PlanError(f"simulate: schedule={schedule!r}; expected one of {SCHEDULES}")
    # numpy's numbers are numbers (np.int64 degrees from a mesh's shape, np.float32 times were refused as "expected a
    # positive int" / "finite numbers"); each is kept as a Python int / float. A bool is neither.
    for arg, v in (("pp", pp), ("stages_per_rank", stages_per_rank), ("microbatches", microbatches)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise PlanError(f"simulate: {arg}={v!r}; expected a positive int")
    pp, stages_per_rank, microbatches = int(pp), int(stages_per_rank), int(microbatches)
    S = pp * stages_per_rank
    if len(fwd) != S or len(bwd) != S:
        raise PlanError(f"simulate: {len(fwd)} forward and {len(bwd)} backward times; expected pp * "
                        f"stages_per_rank = {S} of each")
    p2p = list(p2p) if p2p is not None else [0.0] * S
    weight = list(act_weight) if act_weight is not None else [1.0] * S
    for arg, vals in (("fwd", fwd), ("bwd", bwd), ("p2p", p2p), ("act_weight", weight)):
        if len(vals) != S or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                                     and v >= 0 for v in vals):
            raise PlanError(f"simulate: {arg}={list(vals)}; expected {S} finite numbers >= 0 (one per stage)")
    fwd, bwd, p2p, weight = ([float(v) for v in vals] for vals in (fwd, bwd, p2p, weight))
    orders = [rank_order(schedule, pp, stages_per_rank, microbatches, r) for r in range(pp)]
    pos = [0] * pp
    free = [0.0] * pp
    done: dict[tuple[str, int, int], float] = {}
    events: list[Event] = []
    held = [0.0] * pp
    peak = [0.0] * pp
    steady = [0.0] * pp
    backward_began = [False] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, i, s = orders[r][pos[r]]
                if kind == "F":
                    deps = [(("F", i, s - 1), p2p[s - 1])] if s > 0 else []
                else:
                    # the gradient of stage s's output comes back over the same edge as the output went,
                    # p2p[s] (p2p[s + 1], stage s + 1's own output's send, priced a GPT's last edge as the
                    # logits' size)
                    deps = [(("F", i, s), 0.0)] + ([(("B", i, s + 1), p2p[s])] if s < S - 1 else [])
                if any(d not in done for d, _ in deps):
                    break
                start = max([free[r]] + [done[d] + c for d, c in deps])
                end = start + (fwd[s] if kind == "F" else bwd[s])
                done[(kind, i, s)] = end
                free[r] = end
                events.append(Event(r, kind, i, s, start, end))
                held[r] += weight[s] if kind == "F" else -weight[s]
                peak[r] = max(peak[r], held[r])
                backward_began[r] |= kind == "B"
                if backward_began[r] and kind == "F":
                    steady[r] = max(steady[r], held[r])
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise PlanError(f"simulate: schedule {schedule!r} deadlocks at pp={pp}, stages_per_rank="
                            f"{stages_per_rank}, microbatches={microbatches}; expected a valid configuration")
    busy = [sum(e.end - e.start for e in events if e.rank == r) for r in range(pp)]
    return Simulation(events=events, makespan=max(free), busy=busy, peak_inflight=peak, steady_inflight=steady)
