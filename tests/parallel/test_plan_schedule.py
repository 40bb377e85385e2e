"""The pipeline simulator against the closed forms: (m + p - 1)(f + b) for GPipe and 1F1B, the bubble
(p - 1) / (m + p - 1), interleaving's (p - 1)(f + b) / v, and the micro-batches each schedule keeps in flight."""

import pytest

from tilestack.parallel.plan import PlanError, simulate
from tilestack.parallel.plan.schedule import rank_order


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 2), (4, 4), (4, 8), (3, 7)])
def test_equal_stages_give_the_closed_form(schedule, p, m):
    f, b = 1.0, 2.0
    sim = simulate(schedule, pp=p, stages_per_rank=1, microbatches=m, fwd=[f] * p, bwd=[b] * p)
    assert sim.makespan == pytest.approx((m + p - 1) * (f + b))
    assert sim.bubble == pytest.approx((p - 1) / (m + p - 1))
    if schedule == "gpipe":
        assert sim.peak_inflight == [m] * p
        assert sim.steady_inflight == [0] * p           # no forward after the first backward
    else:
        assert sim.peak_inflight == [min(p - r, m) for r in range(p)]
        # a forward follows the first backward where m > p - rank, holding p - rank again beside the gradients
        assert sim.steady_inflight == [p - r if m > p - r else 0 for r in range(p)]


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (2, 3, 4), (4, 2, 4)])
def test_interleaving_divides_the_bubble(p, v, m):
    f, b = 1.0, 2.0                                  # per stage of the whole model's 1 / (p v) layers
    sim = simulate("interleaved-1f1b", pp=p, stages_per_rank=v, microbatches=m, fwd=[f] * (p * v),
                   bwd=[b] * (p * v))
    work = m * v * (f + b)
    assert sim.makespan == pytest.approx(work + (p - 1) * (f + b))   # Narayanan et al.: bubble (p - 1)(f + b) / v
    assert max(sim.busy) == pytest.approx(work)


def test_each_op_runs_once_in_dependency_order():
    sim = simulate("interleaved-1f1b", pp=4, stages_per_rank=2, microbatches=8, fwd=[1.0, 1.5] * 4,
                   bwd=[2.0, 2.5] * 4, p2p=[0.1] * 8)
    seen = {(e.kind, e.micro, e.stage): e for e in sim.events}
    assert len(seen) == len(sim.events) == 2 * 8 * 8
    for (kind, i, s), e in seen.items():
        assert e.rank == s % 4
        if kind == "F" and s > 0:
            assert e.start >= seen["F", i, s - 1].end + 0.1 - 1e-12
        if kind == "B":
            assert e.start >= seen["F", i, s].end
            if s < 7:
                assert e.start >= seen["B", i, s + 1].end + 0.1 - 1e-12
    for r in range(4):                              # a rank runs one thing at a time
        mine = sorted((e.start, e.end) for e in sim.events if e.rank == r)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:], strict=False))


def test_communication_shows_as_waiting():
    base = simulate("1f1b", pp=2, stages_per_rank=1, microbatches=4, fwd=[1.0, 1.0], bwd=[2.0, 2.0])
    slow = simulate("1f1b", pp=2, stages_per_rank=1, microbatches=4, fwd=[1.0, 1.0], bwd=[2.0, 2.0], p2p=[0.5, 0.5])
    assert slow.makespan > base.makespan and max(slow.busy) == max(base.busy)


def test_orders_and_errors():
    assert rank_order("1f1b", 4, 1, 4, 0)[:4] == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("F", 3, 0)]
    assert rank_order("1f1b", 4, 1, 4, 3)[:2] == [("F", 0, 3), ("B", 0, 3)]
    with pytest.raises(PlanError, match="schedule='zb'"):
        simulate("zb", pp=2, stages_per_rank=1, microbatches=2, fwd=[1, 1], bwd=[1, 1])
    with pytest.raises(PlanError, match="expected pp \\* stages_per_rank = 4"):
        simulate("1f1b", pp=2, stages_per_rank=2, microbatches=2, fwd=[1, 1], bwd=[1, 1])


@pytest.mark.parametrize("p, v", [(2, 2), (3, 2), (4, 2), (4, 3), (8, 2)])
def test_interleaved_order_is_torchs(p, v):
    """Every rank's order of forwards and backwards is the one torch's ScheduleInterleaved1F1B computes (its
    per-rank action list, without the idle slots), for every micro-batch count it accepts: fewer than pp
    micro-batches run in one round of m (the simulator once took rounds of pp there and scheduled micro-batches
    that do not exist)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType
    for m in range(1, 3 * p + 1):
        rounds = max(1, m // p)
        if m % rounds:
            continue                                        # torch refuses these
        sched = ScheduleInterleaved1F1B.__new__(ScheduleInterleaved1F1B)     # its order, without process groups
        sched.n_local_stages, sched.pp_group_size, sched._n_microbatches = v, p, m
        sched.number_of_rounds, sched.microbatches_per_round = rounds, m // rounds
        for rank in range(p):
            sched.rank = rank
            torch_order = [("F" if a.computation_type == _ComputationType.FORWARD else "B", a.microbatch_index,
                            a.stage_index) for a in sched._calculate_single_rank_operations(rank) if a is not None]
            assert rank_order("interleaved-1f1b", p, v, m, rank) == torch_order, (p, v, m, rank)
