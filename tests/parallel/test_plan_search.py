"""The planner's search: Alpa's stage DP against brute-force enumeration, the plan enumeration against the
parallel config's own rules, and bad inputs refused with errors that name the argument."""

import dataclasses
import itertools

import numpy as np
import pytest

from tilestack.parallel import ModelConfig, ParallelConfig
from tilestack.parallel.plan import (
    CommModel,
    PlanError,
    RooflineCompute,
    alpa_stages,
    brute_force_stages,
    describe_gpt,
    enumerate_plans,
    search,
)
from tilestack.parallel.plan.compute import ComputeModel
from tilestack.parallel.plan.predict import runnable
from tilestack.parallel.plan.search import choose, factorizations, family, plan_stage_cost, to_measure

FREE = CommModel(fits={"all_reduce": {2: (1e-4, 1e-9), 4: (2e-4, 2e-9)}}, source="test")


class FakeCompute(ComputeModel):
    """Deterministic times: forward proportional to FLOPs / tp, backward twice that, AdamW by elements."""

    def __init__(self, desc):
        self.desc, self.source = desc, "fake"

    def _times(self, layer, index, micro_batch, tp):
        f = layer.flops_fwd * micro_batch / (tp if layer.tp_able else 1) * 1e-9 + 1e-5
        return f, 2 * f

    def optimizer_s(self, params, tensors):
        return params * 1e-9 + tensors * 1e-6


def _table_cost(rng, n_layers, sizes, none_rate):
    """A random stage cost table: (t, choice) or None (does not fit), depending on layers, devices, stages after."""
    table = {}
    for k in range(n_layers):
        for i in range(k + 1, n_layers + 1):
            for d in sizes:
                for after in range(n_layers):
                    if rng.random() < none_rate:
                        table[k, i, d, after] = None
                    else:
                        # more layers cost more, more devices less, with noise; memory: later stages fit more often
                        t = (i - k) * (0.5 + rng.random()) / d ** rng.uniform(0.5, 1.0)
                        table[k, i, d, after] = (float(t), f"c{k}{i}{d}{after}")
    return lambda k, i, d, after: table[k, i, d, after]


@pytest.mark.parametrize("n_layers, n_devices, sizes, microbatches, none_rate", [
    (4, 4, (1, 2, 4), 1, 0.0), (5, 4, (1, 2, 4), 4, 0.0), (6, 4, (1, 2), 8, 0.2), (5, 8, (1, 2, 4, 8), 3, 0.3),
    (6, 6, (1, 2, 3), 2, 0.1),
])
def test_alpa_dp_equals_brute_force(rng, n_layers, n_devices, sizes, microbatches, none_rate):
    for _ in range(5):
        cost = _table_cost(rng, n_layers, sizes, none_rate)
        kw = dict(n_devices=n_devices, submeshes=sizes, microbatches=microbatches, stage_cost=cost)
        try:
            brute = brute_force_stages(n_layers, **kw)
        except PlanError:
            with pytest.raises(PlanError, match="no split"):
                alpa_stages(n_layers, **kw)
            continue
        dp = alpa_stages(n_layers, **kw)
        assert dp.latency == pytest.approx(brute.latency, rel=1e-12)
        # the DP's split really has that latency under the cost
        times = [cost(k, i, d, len(dp.stages) - 1 - j)[0] for j, (k, i, d, _) in enumerate(dp.stages)]
        assert sum(times) + (microbatches - 1) * max(times) == pytest.approx(dp.latency, rel=1e-12)
        assert sum(d for _, _, d, _ in dp.stages) == n_devices


def test_alpa_dp_on_the_planners_own_cost_equals_brute_force():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    cost = plan_stage_cost(desc, FakeCompute(desc), FREE, batch=8, microbatches=4, memory_limit=None)
    kw = dict(n_devices=4, submeshes=(1, 2, 4), microbatches=4, stage_cost=cost)
    dp, brute = alpa_stages(len(desc.layers), **kw), brute_force_stages(len(desc.layers), **kw)
    assert dp.latency == pytest.approx(brute.latency, rel=1e-12)
    # a tight memory limit prunes layouts: the DP still agrees, and is no faster than without the limit
    mem = plan_stage_cost(desc, FakeCompute(desc), FREE, batch=8, microbatches=4, memory_limit=3e5)
    kw["stage_cost"] = mem
    tight = alpa_stages(len(desc.layers), **kw)
    assert tight.latency == pytest.approx(brute_force_stages(len(desc.layers), **kw).latency, rel=1e-12)
    assert tight.latency >= dp.latency


@pytest.mark.parametrize("n, parts", [(1, 4), (8, 3), (12, 4), (7, 2)])
def test_factorizations_are_all_ordered_factorings(n, parts):
    got = sorted(factorizations(n, parts))
    brute = sorted(t for t in itertools.product(range(1, n + 1), repeat=parts) if np.prod(t) == n)
    assert got == brute


def test_enumerated_plans_fit_and_runnable_ones_pass_parallel_config():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    plans = enumerate_plans(desc, 4, 8)
    assert len(set(plans)) == len(plans)
    labels = {p.label() for p in plans}
    for want in ("dp4", "fsdp4", "tp4", "tp4-sp", "pp4-1f1b-m4", "pp2-tp2-int2-m2", "pp2-dp2-1f1b-m2", "dp4-zero2"):
        assert want in labels, want
    for p in plans:
        p.check(desc)
        assert p.world_size == 4
        if runnable(p, desc):
            ParallelConfig(**p.parallel_kwargs()).validate(4, model=ModelConfig(**desc.config), batch=8, seq=16)
    assert sum(runnable(p, desc) for p in plans) == len(plans)      # even splits only: every plan here runs


def test_search_ranks_by_time_and_respects_the_memory_limit():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    ranked = search(desc, FakeCompute(desc), FREE, world_size=2, batch=8)
    steps = [r.step_s for r in ranked]
    assert steps == sorted(steps)
    limit = sorted(r.prediction.memory_bytes for r in ranked)[len(ranked) // 2]
    capped = search(desc, FakeCompute(desc), FREE, world_size=2, batch=8, memory_limit=limit)
    assert 0 < len(capped) < len(ranked) and all(r.prediction.memory_bytes <= limit for r in capped)


def test_plans_to_measure_start_with_the_choice_and_spread_over_families():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    ranked = search(desc, FakeCompute(desc), FREE, world_size=4, batch=8)
    picked = to_measure(ranked, 6)
    assert len(picked) == 6 and len(set(map(id, picked))) == 6 and picked[0] is choose(ranked)
    families = [family(r.plan.label()) for r in picked]
    kinds = {family(r.plan.label()) for r in ranked if r.prediction.runnable}
    assert len(set(families)) == min(6, len(kinds))        # one of each family before any second of one
    assert family("pp2-dp2-1f1b-m2-rc-selective") == "rc-selective" and family("x") == "single"


def test_bad_inputs_name_the_argument():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    with pytest.raises(PlanError, match="world_size=0"):
        enumerate_plans(desc, 0, 8)
    with pytest.raises(PlanError, match="world_size='4'"):
        search(desc, FakeCompute(desc), FREE, world_size="4", batch=8)
    # 3 ranks: 3 divides neither the 4 blocks, the heads, nor the batch of 8
    with pytest.raises(PlanError, match="no plan of world_size=3"):
        enumerate_plans(desc, 3, 8)
    with pytest.raises(PlanError, match="memory_limit=1000 bytes per rank; no plan"):
        search(desc, FakeCompute(desc), FREE, world_size=2, batch=8, memory_limit=1000)
    with pytest.raises(PlanError, match="device='tpu-v9'"):
        RooflineCompute(desc, "tpu-v9")
    with pytest.raises(PlanError, match="rank_by='speed'"):
        search(desc, FakeCompute(desc), FREE, world_size=2, batch=8, rank_by="speed")
    with pytest.raises(PlanError, match="batch=0"):
        enumerate_plans(desc, 2, 0)


def test_uneven_bounds_are_predicted_but_not_runnable():
    desc = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), 16)
    even = enumerate_plans(desc, 2, 8, schedules=("1f1b",), recompute=("none",))
    plan = next(p for p in even if p.pp == 2 and p.microbatches == 2)
    uneven = dataclasses.replace(plan, bounds=(0, 2, 6))
    assert runnable(plan, desc) and not runnable(uneven, desc)
    from tilestack.parallel.plan import predict
    p_even, p_uneven = predict(plan, desc, FakeCompute(desc), FREE), predict(uneven, desc, FakeCompute(desc), FREE)
    assert p_uneven.step_s != p_even.step_s
    with pytest.raises(PlanError, match="bounds="):
        predict(dataclasses.replace(plan, bounds=(0, 6, 6)), desc, FakeCompute(desc), FREE)
