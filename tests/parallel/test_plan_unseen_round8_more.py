"""The planner on models and clusters it was not built around, round 8: deep models, primes, Megatron's table,
devices given by figures.

- a 200-block GPT (202 layers): Alpa's stage DP over 7 single devices (the unit-cost optimum 26 + 6 x 29 layers,
  latency by hand) and over sub-meshes of 1, 2, 4, 8 (one stage of all 8 devices beats every cut, by hand); the even
  split of 200 blocks into 5 and 8 stages; a search of 8 ranks over it completes, each pipeline's stages of equal
  blocks;
- prime world sizes (3, 5, 7) on a measured 10-layer MLP that no prime divides: the even split of its layers by hand
  (banker's rounding of k x 10 / pp), exactly the degrees a model with no tensor-parallel layout allows, and
  batches that dp x micro-batches do not divide refused by name (never rounded);
- Narayanan et al.'s Table 1 rows 1.7B, 3.6B and 7.5B: parameters by Megatron's formula (plus the untied head
  and its LayerNorm), and predictions repeatable to the bit (the same plan twice, before and after others, on a
  fresh description: no state carried between calls);
- devices: a device-table key and the same figures given as a dict give the same layer times; the figures as numpy
  numbers too; a ClusterComm of numpy counts and rates.

Found and fixed (each test below failed first):
- ``RooflineCompute(desc, {"flops": {"bf16": np.float32(9.894e14)}, "bandwidth": np.float32(3.35e12)})`` was refused
  as "expected a positive finite FLOP/s", and so were np.int64 figures (compute.RooflineCompute._spec_given: any
  real number, kept as a float);
- ``ClusterComm(nodes=np.int64(2))``, ``gpus_per_node=np.int64(8)`` and np.float32 ``inter_alpha`` /
  ``inter_bytes_per_s`` were refused as "expected a positive int" / "a finite number" where ``search`` takes numpy
  world sizes and limits (comm.ClusterComm.__post_init__: any integral / real number, kept as int / float).
"""

import dataclasses

import numpy as np
import pytest
import torch
from plan_models_round2 import FREE, Unit
from torch import nn

from tilestack.parallel.plan import (
    ClusterComm,
    Plan,
    PlanError,
    RooflineCompute,
    alpa_stages,
    brute_force_stages,
    describe_module,
    describe_transformer,
    enumerate_plans,
    h200_nccl,
    predict,
    search,
)
from tilestack.parallel.plan.predict import even_bounds

# ---- a very deep model ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep():
    return describe_transformer(n_layer=200, d=8, n_head=2, vocab=8, seq=4)


def _unit_cost(k, i, d, after):
    """Layers [k, i) on d devices: (i - k) / d seconds (perfectly divisible work)."""
    return (i - k) / d, None


def test_alpa_on_200_layers_over_7_devices_balances_by_hand():
    """Unit layers, 8 micro-batches: latency = 200 + 7 x max stage; the least max over 7 stages is ceil(200 / 7) =
    29; the DP's stages (any with that max) sum to 200, none above 29: latency 403."""
    split = alpa_stages(200, n_devices=7, submeshes=[1], microbatches=8, stage_cost=_unit_cost)
    sizes = [i - k for k, i, _, _ in split.stages]
    assert sum(sizes) == 200 and len(sizes) == 7 and max(sizes) == 29
    assert split.stages[0][0] == 0 and split.stages[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(split.stages, split.stages[1:], strict=False))
    assert (split.latency, split.t_max) == (403.0, 29.0)


def test_alpa_on_200_layers_prefers_one_stage_of_all_devices_by_hand():
    """Work divides perfectly over a sub-mesh, so one stage on 8 devices (25 s, latency 16 x 25 = 400) beats every
    cut, whose stage times sum to at least 25 with a largest of at least 25: 2 stages of 4 devices give
    50 + 15 x 25 = 425, 8 of 1 give 200 + 15 x 25 = 575."""
    split = alpa_stages(200, n_devices=8, submeshes=[1, 2, 4, 8], microbatches=16, stage_cost=_unit_cost)
    assert [(k, i, d) for k, i, d, _ in split.stages] == [(0, 200, 8)]
    assert split.latency == 400.0


def test_alpa_matches_brute_force_on_a_deep_uneven_table():
    """Uneven per-layer costs (a large first and last layer, the rest small) over 14 layers and 5 devices: the DP's
    latency equals brute force's (every cut and device split)."""
    rng = np.random.default_rng(8)
    w = np.concatenate([[9.0], rng.uniform(0.5, 1.5, 12), [7.0]])
    prefix = np.concatenate([[0.0], np.cumsum(w)])

    def cost(k, i, d, after):
        return float(prefix[i] - prefix[k]) / d ** 0.9, None

    dp = alpa_stages(14, n_devices=5, submeshes=[1, 2, 4], microbatches=6, stage_cost=cost)
    brute = brute_force_stages(14, n_devices=5, submeshes=[1, 2, 4], microbatches=6, stage_cost=cost)
    assert dp.latency == pytest.approx(brute.latency, rel=1e-12)


@pytest.mark.parametrize("stages, expected", [
    (5, (0, 41, 81, 121, 161, 202)),                         # 40 blocks each; embed on the first, head on the last
    (8, tuple([0] + [1 + 25 * k for k in range(1, 8)] + [202])),
])
def test_even_split_of_200_blocks_by_hand(stages, expected, deep):
    assert even_bounds(deep, stages) == expected


def test_even_split_of_200_blocks_refuses_a_count_that_does_not_divide(deep):
    with pytest.raises(PlanError, match="7 pipeline stages do not divide the model's 200 blocks"):
        even_bounds(deep, 7)


def test_a_search_of_8_ranks_over_200_blocks_completes_with_balanced_stages(deep):
    ranked = search(deep, Unit(deep), FREE, world_size=8, batch=16, schedules="1f1b", recompute="none",
                    zero=False, max_microbatches=8)
    assert ranked
    pipelines = [r.plan for r in ranked if r.plan.pp > 1]
    assert {p.pp for p in pipelines} == {2, 4, 8}
    for p in pipelines:
        b = p.stage_bounds(deep)
        blocks = [c - a for a, c in zip(b, b[1:], strict=False)]
        blocks[0] -= 1                     # the embedding
        blocks[-1] -= 1                    # the head
        assert blocks == [200 // p.pp] * p.pp, p.label()


# ---- prime world sizes on a measured MLP of 10 layers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp10():
    torch.manual_seed(3)
    return describe_module(nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)]), torch.randn(6, 4))


@pytest.mark.parametrize("pp, sizes", [(3, [3, 4, 3]), (5, [2] * 5), (7, [1, 2, 1, 2, 1, 2, 1])])
def test_a_prime_pipeline_splits_10_layers_by_hand(pp, sizes, mlp10):
    """round(k x 10 / pp) (Python's round: half to even): 3 -> 0, 3, 7, 10; 7 -> 0, 1, 3, 4, 6, 7, 9, 10."""
    b = even_bounds(mlp10, pp)
    assert [c - a for a, c in zip(b, b[1:], strict=False)] == sizes
    # per rank, the parameters of its layers (20 elements each, f32)
    mem = predict(Plan(batch=pp * 2, pp=pp, microbatches=pp), mlp10, Unit(mlp10), FREE).memory
    assert [m["parameters"] for m in mem] == [20 * 4 * n for n in sizes]


@pytest.mark.parametrize("world", [3, 5, 7])
def test_a_prime_world_of_a_model_without_tp_has_three_layouts(world, mlp10):
    plans = enumerate_plans(mlp10, world, world * 2)
    assert {(p.pp, p.dp, p.dp_shard, p.tp) for p in plans} == {(world, 1, 1, 1), (1, world, 1, 1), (1, 1, world, 1)}
    assert all(p.batch % (p.dp * p.dp_shard * p.microbatches) == 0 for p in plans)


@pytest.mark.parametrize("plan", [Plan(batch=10, pp=3, microbatches=3), Plan(batch=7, dp=3),
                                  Plan(batch=12, pp=5, microbatches=5),
                                  Plan(batch=20, dp=7, zero=1)], ids=lambda p: p.label())
def test_batches_that_do_not_split_into_whole_micro_batches_are_refused_by_name(plan, mlp10):
    with pytest.raises(PlanError, match=f"batch={plan.batch} is not divisible"):
        predict(plan, mlp10, Unit(mlp10), FREE)


def test_a_search_of_a_batch_no_prime_degree_divides_names_the_batch(mlp10):
    """World 7, batch 3: no dp or FSDP of 7 divides 3, and a pipeline of 7 over 3 samples needs 7 micro-batches of
    whole samples (1F1B) or takes fewer (GPipe: 3 micro-batches of 1); only those GPipe plans exist."""
    plans = enumerate_plans(mlp10, 7, 3)
    assert {(p.pp, p.schedule, p.microbatches) for p in plans} == {(7, "gpipe", 1), (7, "gpipe", 3)}


# ---- Narayanan et al., Table 1 -------------------------------------------------------------------------------------

ROWS = [(24, 2304, 24, 1, 32, 512), (30, 3072, 32, 2, 64, 512), (36, 4096, 32, 4, 128, 512)]   # l, h, a, tp, n, B
SEQ, VOCAB = 2048, 51200


def _megatron_params(l, h):
    """Narayanan et al., eq. of section 5.1: 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h)), tied head."""
    return 12 * l * h * h + 13 * l * h + (VOCAB + SEQ) * h


@pytest.mark.parametrize("row", ROWS, ids=["1.7B", "3.6B", "7.5B"])
def test_megatron_rows_parameters_by_formula(row):
    """The planner's GPT has an untied head (V h) and a final LayerNorm (2 h) beyond Megatron's count."""
    l, h, a, *_ = row
    desc = describe_transformer(n_layer=l, d=h, n_head=a, vocab=VOCAB, seq=SEQ, dtype_bytes=2)
    assert desc.params == _megatron_params(l, h) + VOCAB * h + 2 * h
    assert round(_megatron_params(l, h) / 1e9, 1) == {2304: 1.7, 3072: 3.6, 4096: 7.5}[h]


def _cluster():
    return ClusterComm(intra=h200_nccl(), gpus_per_node=8, inter_bytes_per_s=25e9)


def _as_tuple(pred):
    return (pred.step_s, dict(pred.terms), [dict(m) for m in pred.memory], pred.memory_bytes)


@pytest.mark.parametrize("row", ROWS, ids=["1.7B", "3.6B", "7.5B"])
def test_megatron_rows_predictions_are_repeatable_to_the_bit(row):
    l, h, a, tp, n, batch = row
    plan = Plan(batch=batch, tp=tp, dp=n // tp)
    other = Plan(batch=batch, tp=tp, dp=n // tp // 2, pp=2, microbatches=8, recompute="full")

    def run():
        desc = describe_transformer(n_layer=l, d=h, n_head=a, vocab=VOCAB, seq=SEQ, dtype_bytes=2)
        compute, comm = RooflineCompute(desc, "a100-sxm-80gb", dtype="bf16"), _cluster()
        first = _as_tuple(predict(plan, desc, compute, comm, recv_buffers=False))
        predict(other, desc, compute, comm, recv_buffers=False)
        again = _as_tuple(predict(plan, desc, compute, comm, recv_buffers=False))
        return first, again

    (a1, a2), (b1, b2) = run(), run()
    assert a1 == a2 == b1 == b2
    # parameters per rank by hand under tp: the split parts / tp, the replicated 4 h per block and 2 h of the head
    blocks = l * ((12 * h * h + 9 * h) / tp + 4 * h)
    assert a1[2][0]["parameters"] == 2 * (blocks + (VOCAB + SEQ) * h / tp + VOCAB * h / tp + 2 * h)


# ---- devices: table keys, figures, numpy numbers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    return describe_transformer(n_layer=2, d=64, n_head=4, vocab=128, seq=32)


def test_table_device_and_the_same_figures_as_a_dict_time_alike(small):
    table = RooflineCompute(small, "h100-sxm")
    given = RooflineCompute(small, {"flops": dict(table.spec.flops), "bandwidth": table.spec.bandwidth})
    for i in range(len(small.layers)):
        assert given.layer_times(i, 4) == table.layer_times(i, 4)
    assert given.optimizer_s(1e6, 10) == table.optimizer_s(1e6, 10)


@pytest.mark.parametrize("conv", [np.float32, np.float64, np.int64], ids=lambda c: c.__name__)
def test_device_figures_as_numpy_numbers_are_accepted_as_floats(conv, small):
    figures = {"flops": {"bf16": 1e15}, "bandwidth": 2e12}
    plain = RooflineCompute(small, figures)
    numpy = RooflineCompute(small, {"flops": {"bf16": conv(1e15)}, "bandwidth": conv(2e12)})
    assert type(numpy.spec.bandwidth) is float and type(numpy.spec.flops["bf16"]) is float
    assert [numpy.layer_times(i, 2) for i in range(4)] == [plain.layer_times(i, 2) for i in range(4)]


@pytest.mark.parametrize("device, match", [
    ({"flops": {"bf16": np.float32("nan")}, "bandwidth": 1e12}, r"flops\['bf16'\]"),
    ({"flops": {"bf16": 1e15}, "bandwidth": np.float64(-1.0)}, "bandwidth="),
    ({"flops": {"bf16": np.True_}, "bandwidth": 1e12}, r"flops\['bf16'\]=np.True_"),
    ({"flops": {"bf16": 1e15}, "bandwidth": True}, "bandwidth=True"),
    ({"flops": {"bf16": 1e15}, "bandwidth": 1e12, "label": 5}, r"device\['label'\]=5"),
    ({"flops": {"bf16": float("inf")}, "bandwidth": 1e12}, r"flops\['bf16'\]=inf"),
])
def test_bad_device_figures_are_refused_by_name(device, match, small):
    with pytest.raises(PlanError, match=match):
        RooflineCompute(small, device)


def test_a_cluster_of_numpy_counts_and_rates_prices_as_python_numbers():
    plain = ClusterComm(intra=h200_nccl(), gpus_per_node=4, nodes=2, inter_alpha=1e-5, inter_bytes_per_s=2.5e10)
    numpy = ClusterComm(intra=h200_nccl(), gpus_per_node=np.int64(4), nodes=np.int64(2),
                        inter_alpha=np.float64(1e-5), inter_bytes_per_s=np.float32(2.5e10))
    assert (type(numpy.nodes), type(numpy.gpus_per_node), type(numpy.inter_bytes_per_s)) == (int, int, float)
    for n, stride in ((2, 1), (4, 1), (8, 1), (2, 4)):
        assert numpy.time("all_reduce", 1 << 20, n, stride=stride) == pytest.approx(
            plain.time("all_reduce", 1 << 20, n, stride=stride), rel=1e-7)
    with pytest.raises(PlanError, match="gpus_per_node=np.True_"):
        ClusterComm(intra=h200_nccl(), gpus_per_node=np.True_)
    with pytest.raises(PlanError, match=r"nodes=np.int64\(0\)"):
        ClusterComm(intra=h200_nccl(), nodes=np.int64(0))
    assert dataclasses.replace(numpy).nodes == 2
