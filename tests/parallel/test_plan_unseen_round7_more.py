"""The planner on models and clusters it was not built around, round 7: limits, world sizes, clusters, the search.

- memory limits of 0, negative, NaN, inf, a string, a bool (one for every GPU and per GPU), refused by name before
  any prediction; numpy numbers accepted, ranked as the same Python numbers are; numpy ints as world size and batch;
- prime world sizes (3, 5, 7) and non-powers of two for tp: a tp that does not divide the heads is never
  enumerated and is refused by name; batches that dp x micro-batches do not divide are refused by name;
- a cluster of nodes (NVLink within, InfiniBand between, ``ClusterComm``): a group inside a node priced at the
  node's links, one across nodes at the ring over InfiniBand, by hand; ``nodes`` x ``gpus_per_node`` that is not
  the world size refused by name;
- Narayanan et al.'s Table 1 (docs/planner.md) with a slower InfiniBand: no plan is predicted faster and the best
  throughput never rises (monotonicity);
- the search's ranking against its own predictions: sorted by step time, every plan ranked fits, and the first is
  the fastest of all enumerated plans that fit (brute force), on a cluster of prime size.

Found and fixed (each test below failed first):
- ``search(memory_limit=math.inf)`` was taken (as no limit) where ``tilestack plan --memory-limit 1e400`` is
  refused; numpy numbers (``np.int64(80 * 2**30)``, ``np.float32``) were refused as "expected a positive number",
  and so were numpy ints as world size or batch (search.gpu_limits, check_world, _positive_int);
- ``ClusterComm`` took no number of nodes, so a world size past the cluster's GPUs was priced as if the nodes went
  on; it now takes ``nodes`` (search plans for nodes x gpus_per_node ranks exactly, predict refuses more), and its
  ``fits`` / ``source`` need not be given (``ClusterComm(intra=...)`` was a TypeError of the dataclass).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from plan_models_round2 import FIT, FREE, Flops, Unit

from tilestack.parallel.plan import (
    ClusterComm,
    CommModel,
    Plan,
    PlanError,
    RooflineCompute,
    describe_transformer,
    enumerate_plans,
    h200_nccl,
    predict,
    search,
)
from tilestack.parallel.plan.search import plan_stage_cost


@pytest.fixture(scope="module")
def gpt():
    """6 heads of 16, vocabulary 90, sequence 8, 3 blocks: tp may be 1, 2, 3 or 6, never 4, 5 or 7."""
    return describe_transformer(n_layer=3, d=96, n_head=6, vocab=90, seq=8)


# ---- memory limits ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit, shown", [(0, "0"), (-1, "-1"), (math.nan, "nan"), (math.inf, "inf"),
                                          ("1GB", "'1GB'"), (True, "True"), ([1e9, math.inf], "inf"),
                                          ([1e9, 0], "0"), (["1e9", 1e9], "'1e9'")])
def test_bad_memory_limits_are_refused_by_name_before_predicting(limit, shown, gpt):
    """Nothing is predicted (the compute model would raise), and the message names memory_limit and the value."""
    class Boom(Unit):
        def _times(self, *a):
            raise AssertionError("a layer was timed")

    with pytest.raises(PlanError, match=rf"search: memory_limit=.*{shown}.*finite"):
        search(gpt, Boom(gpt), FREE, world_size=2, batch=4, memory_limit=limit)
    if not isinstance(limit, list):
        with pytest.raises(PlanError, match=rf"plan_stage_cost: memory_limit={shown}"):
            plan_stage_cost(gpt, Unit(gpt), FREE, batch=4, microbatches=2, memory_limit=limit)


@pytest.mark.parametrize("limit", [np.int64(4_800_000), np.float32(4_800_000.0), np.float64(4_800_000.0), 4_800_000,
                                   [np.int64(4_800_000), 4_800_000.0]])
def test_numpy_limits_world_sizes_and_batches_are_numbers(limit, gpt):
    """A limit of np.int64 / np.float32 ranks exactly the plans the same Python number ranks; np.int64 world size
    and batch plan as 2 and 4."""
    want = [r.plan for r in search(gpt, Flops(gpt), FIT, world_size=2, batch=4, memory_limit=4_800_000.0)]
    got = [r.plan for r in search(gpt, Flops(gpt), FIT, world_size=np.int64(2), batch=np.int64(4),
                                  memory_limit=limit)]
    assert got == want and 0 < len(want) < len(enumerate_plans(gpt, 2, 4))
    assert enumerate_plans(gpt, np.int64(2), np.int64(4)) == enumerate_plans(gpt, 2, 4)


# ---- primes and tp that does not divide the heads ---------------------------------------------------------------

@pytest.mark.parametrize("world", [3, 5, 6, 7])
def test_tp_degrees_are_exactly_those_dividing_heads_width_and_vocab(world, gpt):
    """On 3, 5, 6 and 7 ranks the enumerated tp degrees are the divisors of the world that divide 6 heads, width 96
    and vocabulary 90 (by hand: 3 -> {1, 3}, 5 -> {1}, 6 -> {1, 2, 3, 6}, 7 -> {1}); a tp that does not is refused
    by predict, naming tp and the heads."""
    by_hand = {3: {1, 3}, 5: {1}, 6: {1, 2, 3, 6}, 7: {1}}[world]
    assert {p.tp for p in enumerate_plans(gpt, world, world * 2)} == by_hand
    for tp in (4, 5, 7):
        with pytest.raises(PlanError, match=rf"tp={tp} does not split model .*n_head=6"):
            predict(Plan(batch=4, tp=tp), gpt, Unit(gpt), FREE)


@pytest.mark.parametrize("plan, shown", [
    (Plan(batch=10, dp=3), "batch=10 is not divisible by dp\\*dp_shard\\*microbatches=3"),
    (Plan(batch=12, pp=3, dp=2, microbatches=4), "batch=12 is not divisible by dp\\*dp_shard\\*microbatches=8"),
    (Plan(batch=7, dp_shard=7, pp=3, microbatches=2), "batch=7 is not divisible .*=14"),
])
def test_batches_that_do_not_split_into_micro_batches_are_refused(plan, shown, gpt):
    with pytest.raises(PlanError, match=shown):
        predict(plan, gpt, Unit(gpt), FREE)


def test_a_batch_no_degree_of_a_prime_world_divides_is_refused_with_the_degrees(gpt):
    """Batch 4 on 7 ranks: no data parallelism of 7, 3 blocks make no 7 stages, tp 7 does not divide 6 heads."""
    with pytest.raises(PlanError, match=r"world_size=7 fits batch=4 .*data parallelism of \[1\].*tensor parallelism "
                                        r"of \[1\]"):
        search(gpt, Unit(gpt), FREE, world_size=7, batch=4)


# ---- a cluster of nodes ---------------------------------------------------------------------------------------------

NV = CommModel(fits={k: {2: (1e-6, 1e-12), 4: (2e-6, 2e-12)} for k in ("all_reduce", "all_gather",
                                                                       "reduce_scatter", "p2p")}, source="nvlink")


def test_a_cluster_prices_groups_inside_a_node_at_nvlink_and_across_at_the_ib_ring(gpt):
    """2 nodes of 4 GPUs, InfiniBand 10 us and 20 GB/s a GPU between. tp=2 lies inside a node: its 4 all-
    reduces per block and micro-batch at NVLink's line (1e-6 + 1e-12 S, S = s d 4 bytes); dp=4 over strides of 2
    spans the nodes: the gradients' all-reduce is the ring's 2 (n - 1) alpha + 2 (n - 1) / n S / B, by hand."""
    cl = ClusterComm(intra=NV, gpus_per_node=4, inter_alpha=1e-5, inter_bytes_per_s=2e10, nodes=2)
    assert cl.fits == {} and cl.source == "cluster"
    S = 8 * 96 * 4
    assert cl.time("all_reduce", S, 2) == pytest.approx(1e-6 + 1e-12 * S, rel=1e-12)
    assert cl.time("all_reduce", S, 4, stride=2) == pytest.approx(6 * 1e-5 + 1.5 * S / 2e10, rel=1e-12)
    assert cl.time("p2p", S, 2, stride=4) == pytest.approx(1e-5 + S / 2e10, rel=1e-12)
    pred = predict(Plan(batch=8, dp=4, tp=2), gpt, Unit(gpt), cl)
    assert pred.terms["tp comm"] == pytest.approx(3 * 4 * (1e-6 + 1e-12 * 2 * S), rel=1e-12)
    grads = sum(layer.tp_params / 2 + layer.params - layer.tp_params for layer in gpt.layers) * 4
    loss = 6 * 1e-5 + 1.5 * 4 / 2e10
    assert pred.terms["dp comm"] == pytest.approx(6 * 1e-5 + 1.5 * grads / 2e10 + loss, rel=1e-9)


@pytest.mark.parametrize("world", [4, 6, 12])
def test_a_world_size_other_than_the_clusters_gpus_is_refused_by_name(world, gpt):
    cl = ClusterComm(intra=NV, gpus_per_node=4, nodes=2)
    with pytest.raises(PlanError, match=rf"search: world_size={world} on ClusterComm .*nodes=2 x gpus_per_node=4 = "
                                        r"8 GPUs; expected world_size=8"):
        search(gpt, Unit(gpt), cl, world_size=world, batch=12)
    if world > 8:
        with pytest.raises(PlanError, match=rf"predict: world_size={world} .*expected at most 8 ranks"):
            predict(Plan(batch=12, dp=world), gpt, Unit(gpt), cl)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(PlanError, match=rf"ClusterComm: nodes={bad!r}; expected a positive int"):
            ClusterComm(intra=NV, nodes=bad)


# ---- Narayanan et al.'s Table 1 on a slower network ------------------------------------------------------------------

@pytest.mark.parametrize("row", [1, 4])
def test_a_slower_infiniband_never_predicts_more_throughput(row):
    """Rows 3.6B (64 GPUs) and 39.1B (512 GPUs) of the published table, the script's own candidates and cluster:
    halving the InfiniBand bandwidth (and doubling its latency) never makes a plan faster, makes the plans whose
    groups cross nodes slower, and the best plan under 80 GB is no faster; NVLink-only plans do not move."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "parallel"))
    from plan_narayanan import MEMORY, NVLINK_RATIO, SEQ, TABLE1, VOCAB, candidates
    params, heads, hidden, layers, tp, pp, n, batch, _ = TABLE1[row]
    desc = describe_transformer(n_layer=layers, d=hidden, n_head=heads, vocab=VOCAB, seq=SEQ, dtype_bytes=2,
                                name=f"{params}B")
    nv = h200_nccl()
    nvlink = CommModel(fits={k: {m: (a, b / NVLINK_RATIO) for m, (a, b) in f.items()} for k, f in nv.fits.items()},
                       source="NVLink 3")
    compute = RooflineCompute(desc, "a100-sxm-80gb", dtype="bf16")
    plans = list(candidates(desc, n, batch, layers, heads, hidden, (tp, pp)))
    steps = {}
    for bw, alpha in ((25e9, 10e-6), (12.5e9, 20e-6)):
        cl = ClusterComm(intra=nvlink, gpus_per_node=8, inter_bytes_per_s=bw, inter_alpha=alpha, nodes=n // 8)
        steps[bw] = {p: predict(p, desc, compute, cl, recv_buffers=False) for p in plans}
    slower = 0
    for p in plans:
        fast, slow = steps[25e9][p].step_s, steps[12.5e9][p].step_s
        assert slow >= fast * (1 - 1e-12), p.label()
        slower += slow > fast
    assert slower > 0
    best = {bw: min(q.step_s for q in preds.values() if q.memory_bytes <= MEMORY) for bw, preds in steps.items()}
    assert best[12.5e9] >= best[25e9]


# ---- the ranking against its own predictions -------------------------------------------------------------------------

@pytest.mark.parametrize("world, limit", [(3, None), (6, 1_800_000), (7, 5_000_000)])
def test_the_ranking_is_sorted_fits_and_starts_at_the_fastest_plan_that_fits(world, limit, gpt):
    """On a cluster of nodes of 2 (world 3, 6, 7: partial and prime): every enumerated plan predicted here, those
    under the limit sorted by step time; the search's list is exactly them in that order of times (ties aside),
    and its first is the least step time among them."""
    cl = ClusterComm(intra=NV, gpus_per_node=2, inter_alpha=1e-5, inter_bytes_per_s=1e9)
    compute = Flops(gpt)
    preds = [predict(p, gpt, compute, cl) for p in enumerate_plans(gpt, world, world * 4)]
    fits = [p for p in preds if limit is None or p.memory_bytes <= limit]
    assert 0 < len(fits) and (limit is None or len(fits) < len(preds))
    ranked = search(gpt, compute, cl, world_size=world, batch=world * 4, memory_limit=limit)
    assert {r.plan for r in ranked} == {p.plan for p in fits}
    times = [r.step_s for r in ranked]
    assert times == sorted(times)
    assert ranked[0].step_s == min(p.step_s for p in fits)
    assert all(limit is None or r.prediction.memory_bytes <= limit for r in ranked)
