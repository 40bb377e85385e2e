"""Simulation.concurrency: how many pipeline ranks work at once, as the work sees it (predict's contention on a
shared CPU)."""

import pytest

from tilestack.parallel.plan.schedule import Event, Simulation, simulate


def test_no_overlap_is_one_rank_at_a_time():
    # GPipe with one micro-batch: each stage works while the other waits
    sim = simulate("gpipe", pp=2, stages_per_rank=1, microbatches=1, fwd=[1.0, 1.0], bwd=[2.0, 2.0], p2p=[0.0, 0.0])
    assert sim.concurrency() == pytest.approx(1.0)


def test_the_work_weighted_mean_not_the_time_average():
    # two ranks both busy for 1 s, then idle for 9 s: the time average is 0.2 ranks, the work sees 2
    sim = Simulation(events=[Event(0, "F", 0, 0, 0.0, 1.0), Event(1, "F", 0, 1, 0.0, 1.0)], makespan=10.0,
                     busy=[1.0, 1.0], peak_inflight=[0.0, 0.0], steady_inflight=[0.0, 0.0])
    assert sim.concurrency() == pytest.approx(2.0)
    # one rank alone for 1 s, then both for 1 s: 3 s of work, 1 s of it at 1 and 2 s at 2
    sim = Simulation(events=[Event(0, "F", 0, 0, 0.0, 2.0), Event(1, "F", 0, 1, 1.0, 2.0)], makespan=2.0,
                     busy=[2.0, 1.0], peak_inflight=[0.0, 0.0], steady_inflight=[0.0, 0.0])
    assert sim.concurrency() == pytest.approx((1 * 1 + 2 * 2) / 3)


def test_a_long_1f1b_pipeline_keeps_its_ranks_busy_together():
    sim = simulate("1f1b", pp=4, stages_per_rank=1, microbatches=64, fwd=[1.0] * 4, bwd=[2.0] * 4, p2p=[0.0] * 4)
    assert 3.5 < sim.concurrency() <= 4.0


def test_no_work_is_zero():
    sim = Simulation(events=[], makespan=0.0, busy=[0.0], peak_inflight=[0.0], steady_inflight=[0.0])
    assert sim.concurrency() == 0.0
