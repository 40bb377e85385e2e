"""Plans measured in several rounds (measure_plans(rounds=...), pool_rounds): every run of every plan kept, the
runs pooled per plan, and bad arguments refused by name before any process starts."""

import pytest

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import Plan, PlanError, describe_gpt
from tilestack.parallel.plan.measure import measure_plans, pool_rounds

DESC = describe_gpt(ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16), 16)


def _run(plan, steps, peak, slowdown=None, median=None, loss=1.0):
    row = dict(plan=plan, world_size=2, step_s=min(steps), step_s_median=sorted(steps)[len(steps) // 2],
               step_s_all=list(steps), peak_bytes=peak, peak_bytes_per_rank=[peak, peak - 1],
               components=dict(parameters=peak), loss=loss, rounds=1)
    for key in ("slowdown", "collective_s", "p2p_s"):
        row[key] = slowdown
        row[key + "_median"] = median
    return row


def test_pool_rounds_pools_steps_and_takes_the_least_and_median_probe_readings():
    runs = [_run("dp2", [3.0, 1.0, 2.0], 100, slowdown=1.2, median=1.5, loss=4.0),
            _run("dp2", [5.0, 4.0, 6.0], 104, slowdown=1.1, median=1.9, loss=3.0),
            _run("dp2", [2.5, 2.0, 7.0], 102, slowdown=1.3, median=1.6, loss=2.0)]
    got = pool_rounds(runs)
    assert got["step_s_all"] == [3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 2.5, 2.0, 7.0]
    assert got["step_s"] == 1.0 and got["step_s_median"] == 3.0           # median of all nine, not of medians
    assert got["step_s_medians"] == [2.0, 5.0, 2.5]
    assert got["peak_bytes"] == 104 and got["peak_bytes_per_rank"] == [104, 103]
    assert got["slowdown"] == 1.1 and got["slowdown_median"] == 1.6
    assert got["loss"] == 2.0 and got["rounds"] == 3
    assert runs[0]["step_s_all"] == [3.0, 1.0, 2.0]                        # the runs are not changed


def test_pool_rounds_of_one_run_and_without_a_probe():
    one = _run("tp2", [1.0, 2.0], 10)
    assert pool_rounds([one]) == one
    got = pool_rounds([_run("tp2", [1.0], 10), _run("tp2", [3.0], 12)])
    assert got["slowdown"] is None and got["slowdown_median"] is None and got["step_s_median"] == 2.0


def test_pool_rounds_refuses_no_runs_and_mixed_plans():
    with pytest.raises(PlanError, match="no runs"):
        pool_rounds([])
    with pytest.raises(PlanError, match=r"different plans \['dp2', 'tp2'\]"):
        pool_rounds([_run("dp2", [1.0], 1), _run("tp2", [1.0], 1)])


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True, "2"])
def test_measure_plans_refuses_bad_rounds_by_name(rounds):
    with pytest.raises(PlanError, match=f"rounds={rounds!r}; expected an int >= 1"):
        measure_plans(DESC, [Plan(batch=4, dp=2)], steps=3, warmup=1, rounds=rounds)


def test_two_plans_in_two_rounds_on_real_gloo_ranks():
    plans = [Plan(batch=4, dp=2), Plan(batch=4, tp=2)]
    rows = measure_plans(DESC, plans, steps=3, warmup=1, rounds=2)
    assert [r["plan"] for r in rows] == [p.label() for p in plans]
    for row in rows:
        assert row["rounds"] == 2 and len(row["step_s_all"]) == 4 and len(row["step_s_medians"]) == 2
        assert all(s > 0 for s in row["step_s_all"]) and row["step_s"] == min(row["step_s_all"])
        assert row["peak_bytes"] > 0
