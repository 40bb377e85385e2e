"""The planner on models and clusters it was not built around, round 6: the search, Alpa's DP, goodput, bad input.

- Alpa's stage DP on a GPT whose embedding and LM head (a 65536-token vocabulary) dwarf its tiny blocks, against
  every cut and device split enumerated here (not brute_force_stages), and on a hand-made table of one huge first
  and last layer whose optimum is found by hand;
- prime world sizes (5, 7, 11) and 1: exactly the plans listed here by hand, and GPUs of five different memories
  against every placement of a five-stage pipeline;
- clusters where nothing fits: a clear PlanError naming the limit (search, Alpa), never a crash;
- goodput: the noise scale's estimators and Pollux's E(M) against hand computations for new gradient statistics,
  with zero variance, single-sample micro-batches, a negative |G|^2 estimate and the moving average;
- the command line on 5 ranks and 1, and under a limit nothing fits;
- bad input (a negative batch, a NaN bandwidth, world size 0, an unknown schedule, a plan file with a field of the
  wrong type) refused by a PlanError naming the argument, before any layer is timed.
"""

import itertools
import json
import math

import pytest
import torch
from plan_models_round2 import FIT, FREE, Unit
from test_plan_unseen_round6 import Sparse

from tilestack.parallel.plan import (
    AdaptiveBatch,
    ClusterComm,
    CommModel,
    GradientNoiseScale,
    Plan,
    PlanError,
    RooflineCompute,
    alpa_stages,
    describe_module,
    describe_transformer,
    efficiency,
    enumerate_plans,
    h200_nccl,
    predict,
    read_plan,
    search,
    simulate,
    write_plan,
)
from tilestack.parallel.plan.search import pipeline_latency, plan_stage_cost


@pytest.fixture(scope="module")
def sparse():
    torch.manual_seed(0)
    module, x = Sparse(), torch.randn(3, 3, 4, 4)
    return describe_module(module, x)


# ---- Alpa's DP where the ends dwarf the middle -----------------------------------------------------------------------

def _every_split(n_layers, n_devices, sizes, cost, microbatches):
    """The least latency over every cut of the layers into stages and every assignment of sub-mesh sizes summing
    to the devices (written out here: cuts as subsets of the n - 1 gaps)."""
    best = math.inf
    for n_cuts in range(n_devices):
        for cuts in itertools.combinations(range(1, n_layers), n_cuts):
            bounds = (0, *cuts, n_layers)
            S = len(bounds) - 1
            for devs in itertools.product(sizes, repeat=S):
                if sum(devs) != n_devices:
                    continue
                cs = [cost(bounds[j], bounds[j + 1], devs[j], S - 1 - j) for j in range(S)]
                if any(c is None for c in cs):
                    continue
                best = min(best, pipeline_latency([c[0] for c in cs], microbatches))
    return best


@pytest.mark.parametrize("n_devices, sizes, m", [(2, (1, 2), 4), (3, (1, 2, 3), 2), (4, (1, 2, 4), 8)])
def test_alpa_on_a_gpt_of_huge_ends_equals_every_split(n_devices, sizes, m):
    """4 blocks of width 64 between an embedding and an LM head of 65536 rows (each over 80x a block's parameters),
    on H200s: the DP's latency is the least over every split enumerated here, its stages cover the layers in order
    and use exactly the devices, and its latency is what its own stage costs give."""
    desc = describe_transformer(n_layer=4, d=64, n_head=4, vocab=65536, seq=32, dtype_bytes=2)
    assert desc.layers[0].params > 80 * desc.layers[1].params
    cost = plan_stage_cost(desc, RooflineCompute(desc, "h200"), h200_nccl(), batch=16, microbatches=m,
                           memory_limit=None)
    split = alpa_stages(len(desc.layers), n_devices=n_devices, submeshes=sizes, microbatches=m, stage_cost=cost)
    want = _every_split(len(desc.layers), n_devices, sizes, cost, m)
    assert split.latency == pytest.approx(want, rel=1e-12)
    assert [s[0] for s in split.stages] == [0, *[s[1] for s in split.stages[:-1]]]
    assert split.stages[-1][1] == len(desc.layers) and sum(s[2] for s in split.stages) == n_devices
    S = len(split.stages)
    again = [cost(k, i, d, S - 1 - j)[0] for j, (k, i, d, _) in enumerate(split.stages)]
    assert split.latency == pytest.approx(pipeline_latency(again, m), rel=1e-12)


def test_alpa_isolates_the_huge_ends_by_hand():
    """Layer times 100, 1, 1, 1, 1, 100 (a stage's time the sum of its layers', over its devices), three devices of
    one each, 8 micro-batches: the split {embed} {blocks} {head} has latency 204 + 7 x 100 = 904; any other has a
    stage of at least 101 (>= 911). With a memory limit that no stage holding the last layer passes, no split."""
    costs = [100.0, 1.0, 1.0, 1.0, 1.0, 100.0]

    def cost(k, i, d, after):
        return sum(costs[k:i]) / d, None

    split = alpa_stages(6, n_devices=3, submeshes=[1], microbatches=8, stage_cost=cost)
    assert [(k, i) for k, i, _, _ in split.stages] == [(0, 1), (1, 5), (5, 6)]
    assert split.latency == 904.0 and split.t_max == 100.0
    assert _every_split(6, 3, (1,), cost, 8) == 904.0

    def too_big(k, i, d, after):
        return None if i == 6 else cost(k, i, d, after)

    with pytest.raises(PlanError, match="no split of 6 layers over 3 devices fits"):
        alpa_stages(6, n_devices=3, submeshes=[1], microbatches=8, stage_cost=too_big)


def test_alpa_under_a_limit_no_stage_meets_says_so():
    """The planner's own stage cost under a limit of one byte per device: every stage cost is None, and
    alpa_stages says no split fits (memory), not an IndexError or an empty split."""
    desc = describe_transformer(n_layer=2, d=32, n_head=2, vocab=1000, seq=16)
    cost = plan_stage_cost(desc, RooflineCompute(desc, "h200"), h200_nccl(), batch=4, microbatches=2,
                           memory_limit=1)
    with pytest.raises(PlanError, match="no split .* fits .*memory"):
        alpa_stages(len(desc.layers), n_devices=2, submeshes=(1, 2), microbatches=2, stage_cost=cost)


# ---- prime world sizes, and 1 ----------------------------------------------------------------------------------------

def _by_hand(world, batch, n_layers=7):
    """The plans of a 7-layer module with no blocks (no tensor parallelism, no recompute): one rank's single plan;
    else dp = world (ZeRO 0, 1, 2) or FSDP over world when it divides the batch, and a pipeline of world stages
    when there are enough layers: GPipe with every micro-batch count dividing the batch (up to 16), 1F1B with at
    least world of them; interleaving needs 2 x world layers."""
    out = set()
    if world == 1:
        return {(1, 1, 1, "1f1b", 1, 0)}
    if batch % world == 0:
        out |= {(1, world, 1, "1f1b", 1, z) for z in (0, 1, 2)} | {(1, 1, world, "1f1b", 1, 0)}
    if world <= n_layers:
        ms = [m for m in range(1, min(batch, 16) + 1) if batch % m == 0]
        out |= {(world, 1, 1, "gpipe", m, 0) for m in ms} | {(world, 1, 1, "1f1b", m, 0) for m in ms if m >= world}
        if 2 * world <= n_layers:
            out |= {(world, 1, 1, "interleaved-1f1b", m, 0) for m in ms if m >= world and m % world == 0}
    return out


@pytest.mark.parametrize("world, batch", [(1, 3), (5, 35), (7, 35), (11, 22), (5, 7), (7, 7)])
def test_prime_world_sizes_enumerate_exactly_the_plans_by_hand(world, batch, sparse):
    """World sizes 1, 5, 7, 11 with batches they do and do not divide: exactly the plans listed by hand, each one
    predicted, its ranks' memory finite (11 ranks: only data parallelism, more ranks than layers)."""
    plans = enumerate_plans(sparse, world, batch)
    got = {(p.pp, p.dp, p.dp_shard, p.schedule, p.microbatches, p.zero) for p in plans}
    assert got == _by_hand(world, batch)
    assert len(got) == len(plans)
    for p in plans:
        pred = predict(p, sparse, Unit(sparse), FIT)
        assert pred.plan.world_size == world and all(map(math.isfinite, pred.peaks))


def test_eleven_ranks_and_a_batch_they_do_not_divide_is_refused_with_the_reason(sparse):
    """11 ranks, 7 layers, a batch of 12: no data-parallel degree of 11 divides it and 11 stages exceed the
    layers, so there is no plan; the PlanError says which degrees each allowed."""
    with pytest.raises(PlanError, match=r"world_size=11 fits batch=12 .* data parallelism of \[1\].* pipelines of "
                                        r"\[1\] stages"):
        search(sparse, Unit(sparse), FIT, world_size=11, batch=12)


def _placeable_by_brute_force(pred, limits):
    g = len(limits) // pred.plan.pp
    for order in itertools.permutations(limits):
        if all(pred.peaks[r] <= min(order[r * g:(r + 1) * g]) for r in range(pred.plan.pp)):
            return True
    return False


def test_five_gpus_of_five_memories_against_every_placement(sparse):
    """5 GPUs, each of another memory, chosen between the smallest and largest peaks of the five-stage pipelines
    (whose ranks peak differently): a plan is ranked exactly when some placement of its ranks on the GPUs fits
    (every one of the 120 orders tried here), and a pipeline is among them and among those left out."""
    everything = [predict(p, sparse, Unit(sparse), FIT) for p in enumerate_plans(sparse, 5, 35)]
    pipes = [p for p in everything if p.plan.pp == 5]
    rank_peaks = sorted({pk for p in pipes for pk in p.peaks})
    assert len(rank_peaks) >= 5
    pick = [rank_peaks[int(q * (len(rank_peaks) - 1))] for q in (0.0, 0.3, 0.5, 0.8, 1.0)]
    limits = [pick[3], pick[0], pick[4], pick[1], pick[2]]
    want = {p.plan for p in everything if _placeable_by_brute_force(p, limits)}
    got = {r.plan for r in search(sparse, Unit(sparse), FIT, world_size=5, batch=35, memory_limit=limits)}
    assert got == want
    assert any(p.plan in got for p in pipes) and any(p.plan not in got for p in pipes)


def test_a_cluster_nothing_fits_names_the_limits_per_gpu(sparse):
    """Five GPUs of different memories all smaller than any plan needs: PlanError naming the limits per GPU and the
    smallest plan's need."""
    least = min(predict(p, sparse, Unit(sparse), FIT).memory_bytes for p in enumerate_plans(sparse, 5, 35))
    with pytest.raises(PlanError, match=r"memory_limit=\[.*\] bytes per GPU; no plan of \d+ fits \(the smallest, "
                                        r".*, needs"):
        search(sparse, Unit(sparse), FIT, world_size=5, batch=35,
               memory_limit=[least - 1, least / 2, least / 3, 100, 1])


# ---- goodput against hand computations ------------------------------------------------------------------------------

def test_the_noise_scale_of_two_single_sample_gradients_by_hand():
    """Micro-batches of one sample, g1 = (1, 2), g2 = (3, 0): |g_b|^2 = (5 + 9) / 2 = 7, |g_B|^2 = |(2, 1)|^2 = 5;
    |G|^2 = (2 x 5 - 7) / (2 - 1) = 3, tr(Sigma) = (7 - 5) / (1 - 1/2) = 4, phi = 4/3; E(8) over M0 = 2 is
    (4/3 + 2) / (4/3 + 8) = 10/28. A second observation g = (0, 1), (2, 1): |g_b|^2 = 3, |g_B|^2 = 2, |G|^2 = 1,
    tr = 2; smoothed at 0.9: |G|^2 = 0.9 x 3 + 0.1 x 1 = 2.8, tr = 0.9 x 4 + 0.1 x 2 = 3.8, phi = 3.8 / 2.8."""
    gns = GradientNoiseScale()
    phi = gns.observe([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], micro_batch=1)
    assert phi == pytest.approx(4 / 3, rel=1e-12)
    assert gns.grad_sq == pytest.approx(3.0) and gns.trace == pytest.approx(4.0)
    assert efficiency(8, phi, 2) == pytest.approx(10 / 28, rel=1e-12)
    phi = gns.observe([torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])], micro_batch=1)
    assert gns.grad_sq == pytest.approx(2.8) and gns.trace == pytest.approx(3.8)
    assert phi == pytest.approx(3.8 / 2.8, rel=1e-12)
    assert gns.samples == 4 and [s for s, _ in gns.history] == [2, 4]


def test_four_micro_batches_of_three_by_hand():
    """k = 4 micro-batches of b = 3 samples (B = 12), gradients (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1):
    |g_b|^2 = (1 + 1 + 1 + 3) / 4 = 1.5; the mean is (0.5, 0.5, 0.5), |g_B|^2 = 0.75; |G|^2 = (12 x 0.75 - 3 x 1.5)
    / 9 = 0.5; tr(Sigma) = (1.5 - 0.75) / (1/3 - 1/12) = 3; phi = 6."""
    gns = GradientNoiseScale(ema=0.0)
    eye = torch.eye(3)
    phi = gns.observe([eye[0], eye[1], eye[2], torch.ones(3)], micro_batch=3)
    assert gns.grad_sq == pytest.approx(0.5) and gns.trace == pytest.approx(3.0)
    assert phi == pytest.approx(6.0)
    # E(M) over M0 = 3: 1 at 3, (6 + 3) / (6 + 12) = 0.5 at 12, AdaScale's gain 4 x 0.5 = 2
    assert efficiency(3, phi, 3) == 1.0 and efficiency(12, phi, 3) == pytest.approx(0.5)


def test_zero_variance_reads_zero_noise_and_the_smallest_batch_wins():
    """Every micro-batch's gradient the same (2, -1, 0.5): tr(Sigma) = 0, |G|^2 = 5.25, phi = 0. Then E(M) = M0 /
    M, so goodput is throughput x M0 / M: with samples/s that grow less than linearly the base batch wins."""
    g = torch.tensor([2.0, -1.0, 0.5])
    gns = GradientNoiseScale()
    phi = gns.observe([g.clone() for _ in range(5)], micro_batch=4)
    assert gns.trace == pytest.approx(0.0, abs=1e-12) and gns.grad_sq == pytest.approx(5.25)
    assert phi == pytest.approx(0.0, abs=1e-12)
    assert efficiency(32, 0.0, 8) == 0.25
    chooser = AdaptiveBatch([8, 16, 32], lambda m: 100.0 * m ** 0.5, base_batch=8)
    assert chooser.choose(phi) == 8


def test_a_negative_gradient_estimate_reads_all_noise():
    """g1 = (1, 0), g2 = (-1, 0), one sample each: |G|^2 = (2 x 0 - 1) / 1 = -1 (the unbiased estimate can be
    negative), tr(Sigma) = 2: phi is inf (all noise), E(M) = 1 at every batch, and the largest candidate wins."""
    gns = GradientNoiseScale()
    phi = gns.observe([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], micro_batch=1)
    assert gns.grad_sq == pytest.approx(-1.0) and gns.trace == pytest.approx(2.0)
    assert phi == math.inf and efficiency(1024, phi, 1) == 1.0
    assert AdaptiveBatch([4, 64, 16], lambda m: 1.0 + m, base_batch=4).choose(phi) == 64


@pytest.mark.parametrize("call, match", [
    (lambda: GradientNoiseScale().observe([torch.ones(3)], micro_batch=1), "1 micro-batch gradients"),
    (lambda: GradientNoiseScale().observe([torch.ones(3), torch.ones(3)], micro_batch=0), "micro_batch=0"),
    (lambda: GradientNoiseScale().update(1.0, 1.0, 1, 1), "small=1, big=1"),
    (lambda: GradientNoiseScale().update(float("nan"), 1.0, 1, 2), "small_sq=nan"),
    (lambda: efficiency(0, 1.0, 1), "batch=0"),
    (lambda: efficiency(4, float("nan"), 1), "phi=nan"),
    (lambda: efficiency(4, 1.0, -2), "base_batch=-2"),
    (lambda: GradientNoiseScale(ema=1.0), "ema=1.0"),
])
def test_goodput_edge_inputs_are_refused_by_name(call, match):
    with pytest.raises(PlanError, match=match):
        call()


# ---- bad input, refused by name before any work ----------------------------------------------------------------------

class Untouchable(Unit):
    """A compute model that fails the test if any layer is timed."""

    def _times(self, layer, index, micro_batch, tp):
        raise AssertionError("a layer was timed before the bad argument was refused")


@pytest.mark.parametrize("kw, match", [
    (dict(batch=-8), r"batch=-8; expected a positive int"),
    (dict(batch=[8, 0]), r"batch=0; expected a positive int"),
    (dict(world_size=0), r"world_size=0; expected a positive int"),
    (dict(world_size=2.0), r"world_size=2.0; expected a positive int"),
    (dict(memory_limit=float("nan")), r"memory_limit=nan; expected a positive number"),
    (dict(memory_limit=[1e9, float("nan")]), r"memory_limit=\[1000000000.0, nan\]; expected 2 positive"),
    (dict(memory_limit=[1e9]), r"expected 2 positive numbers of bytes, one per GPU"),
    (dict(schedules=["zero-bubble"]), r"schedules=\['zero-bubble'\]; expected a non-empty selection"),
    (dict(recompute="offload"), r"recompute=\['offload'\]; expected a non-empty selection"),
    (dict(max_microbatches=0), r"max_microbatches=0; expected a positive int"),
    (dict(rank_by="speed"), r"rank_by='speed'"),
    (dict(pipeline=2), r"pipeline=2; expected keywords of enumerate_plans"),
])
def test_search_refuses_bad_arguments_before_timing_a_layer(kw, match, sparse):
    args = dict(world_size=2, batch=8) | kw
    with pytest.raises(PlanError, match=match):
        search(sparse, Untouchable(sparse), FIT, **args)


@pytest.mark.parametrize("plan, match", [
    (Plan(batch=-4), r"batch=-4; expected a positive int"),
    (Plan(batch=4, pp=0), r"pp=0; expected a positive int"),
    (Plan(batch=4, pp=2, microbatches=2, schedule="zb-v"), r"schedule='zb-v'; expected one of"),
    (Plan(batch=4, pp=2, microbatches=2, schedule="GPipe"), r"schedule='GPipe'; expected one of"),
    (Plan(batch=5, pp=2, microbatches=2), r"batch=5 is not divisible by dp\*dp_shard\*microbatches=2"),
    (Plan(batch=4, dp=2, zero=3), r"zero=3; expected one of"),
])
def test_predict_refuses_bad_plans_before_timing_a_layer(plan, match, sparse):
    with pytest.raises(PlanError, match=match):
        predict(plan, sparse, Untouchable(sparse), FIT)


@pytest.mark.parametrize("make, match", [
    (lambda: CommModel(fits={"all_reduce": {2: (1e-5, float("nan"))}}, source="x"), r"fits\['all_reduce'\]\[2\]"),
    (lambda: CommModel(fits={"all_reduce": {0: (1e-5, 1e-9)}}, source="x"), r"fits\['all_reduce'\]\[0\]"),
    (lambda: ClusterComm(fits={}, source="x", intra=h200_nccl(), inter_bytes_per_s=float("nan")),
     "inter_bytes_per_s=nan"),
    (lambda: ClusterComm(fits={}, source="x", intra=h200_nccl(), gpus_per_node=0), "gpus_per_node=0"),
    (lambda: RooflineCompute(describe_transformer(n_layer=1, d=16, n_head=2, vocab=32, seq=8),
                             {"flops": {"bf16": 1e15}, "bandwidth": float("nan")}), "bandwidth=nan"),
    (lambda: RooflineCompute(describe_transformer(n_layer=1, d=16, n_head=2, vocab=32, seq=8), "h200",
                             matmul_efficiency=float("nan")), "matmul_efficiency=nan"),
    (lambda: simulate("interleaved", pp=2, stages_per_rank=1, microbatches=2, fwd=[1, 1], bwd=[1, 1]),
     "schedule='interleaved'"),
    (lambda: simulate("gpipe", pp=2, stages_per_rank=1, microbatches=2, fwd=[1, float("nan")], bwd=[1, 1]),
     "fwd=\\[1, nan\\]"),
    (lambda: h200_nccl().time("all_reduce", float("nan"), 2), "nbytes=nan"),
    (lambda: h200_nccl().time("all_reduce", 1024, 0), "n=0"),
])
def test_bad_cluster_descriptions_are_refused_by_name(make, match):
    with pytest.raises(PlanError, match=match):
        make()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import describe_gpt
    desc = describe_gpt(ModelConfig(n_layer=2, d=32, n_head=2, vocab=64, max_seq=16), seq=16)
    pred = predict(Plan(batch=4, pp=2, microbatches=2), desc, Unit(desc), FREE)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    write_plan(pred, desc, path)
    return path


@pytest.mark.parametrize("section, field, value, match", [
    (None, "batch", "4", r"batch='4'; expected a positive int"),
    (None, "nproc", 2.0, r"nproc=2.0; expected a positive int"),
    (None, "dtype", 32, r"dtype=32; expected one of"),
    ("parallel", "pp", "2", r"pp='2'; expected a positive int"),
    ("parallel", "microbatches", 2.5, r"microbatches=2.5; expected a positive int"),
    ("parallel", "pp_schedule", "zero-bubble", r"pp_schedule='zero-bubble'; expected one of"),
    ("parallel", "zero", "1", r"zero='1'; expected one of"),
    ("model", "d", "32", r"model.d='32'; expected a positive int"),
    ("model", "n_layer", True, r"model.n_layer=True; expected a positive int"),
])
def test_a_plan_file_with_a_field_of_the_wrong_type_is_refused_by_name(plan_file, tmp_path, section, field, value,
                                                                          match):
    spec = json.loads(plan_file.read_text())
    assert read_plan(plan_file)["nproc"] == 2            # the file as written is read back
    (spec if section is None else spec[section])[field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(PlanError, match=match):
        read_plan(bad)


# ---- the command line on a prime world and a cluster nothing fits ---------------------------------------------------

_CLI_GPT = ["--layers", "2", "--d", "32", "--heads", "2", "--vocab", "64", "--seq", "16", "--device", "h200"]


@pytest.mark.parametrize("nproc, batch", [(5, 10), (1, 1)])
def test_cli_plans_a_prime_world_and_one_rank_without_measuring(tmp_path, nproc, batch):
    """`tilestack plan --nproc 5` (and 1) for H200s: a plan file of that world that read_plan accepts, its plan's
    degrees multiplying to it, and no gloo fit measured or stored."""
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app
    from tilestack.parallel.plan.comm import comm_path
    _register()
    out = tmp_path / "plan.json"
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", str(nproc), *_CLI_GPT, "--batch", str(batch),
                                       "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert not comm_path("gloo-cpu").exists()
    spec = read_plan(out)
    par = spec["parallel"]
    assert spec["nproc"] == nproc == par["pp"] * par["dp"] * par["dp_shard"] * par["tp"]


def test_cli_says_what_the_smallest_plan_needs_when_nothing_fits(tmp_path):
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app
    _register()
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *_CLI_GPT, "--batch", "8", "--memory-limit", "1KB"])
    flat = " ".join("".join(ch for ch in res.output if ch not in "│╭╮╰╯─").split())
    assert res.exit_code == 2 and "--memory-limit 1000 bytes per rank: no plan fits" in flat
    assert "needs" in flat and "Traceback" not in res.output
