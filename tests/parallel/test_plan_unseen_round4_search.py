"""Round 4 of unseen models, the search: devices and clusters not here, Narayanan's configurations, prime world
sizes, batches no degree divides, limits nothing fits, and the CLI's bad flags.

Checked by hand: Narayanan et al.'s (2021) FLOPs per sample, 72 s l h^2 (1 + s / 6h + V / 12lh) without
recompute, and GPT parameters; the bubble of interleaved 1F1B, (p - 1) / (v m + p - 1). Invariants: a plan that
does not fit is never ranked, more memory never makes the choice slower, tensor parallelism stays inside a node
of NVLink when the nodes talk over InfiniBand.

Found and fixed (each test below failed first):
- RooflineCompute took only a device-table name: a device that is not in the table could not be given by its
  figures (a dict of 'flops' by dtype and 'bandwidth', or a PeakSpec); each figure is now checked by name;
- "no plan of world_size=7 fits batch=12" said nothing of why: it now lists the degrees dividing the world size
  that the batch (data parallelism), the layers (pipeline stages) and the widths (tensor parallelism) allow;
- ``tilestack plan --memory-limit 1e400`` (inf) was taken as no limit, and ``--noise-scale -3`` or ``nan`` was
  taken silently when ranking by time: both refused by name;
- a weight shared by pipeline ranks two or more apart (an ALBERT-like block on stages 0, 2 and 3) had its
  gradients' all-reduce priced as between neighbouring ranks, and the loss's all-reduce over the pipeline (and
  data-parallel) ranks as between adjacent GPUs: on nodes (ClusterComm) both stayed inside a node that they
  leave (predict: the pair's and the groups' strides);
- enumerate_plans took ``schedules="gpipe"`` letter by letter (refused as ['g', 'p', 'i', 'p', 'e']), and search
  ranked every plan twice for a batch listed twice.
"""

import json
import math
import re

import pytest
from plan_models_round2 import FIT, FREE, Flops, Unit
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.parallel.plan import (
    ClusterComm,
    LayerDesc,
    ModelDesc,
    Plan,
    PlanError,
    RooflineCompute,
    choose,
    describe_transformer,
    enumerate_plans,
    h200_nccl,
    predict,
    search,
)
from tilestack.parallel.plan.comm import comm_path
from tilestack.perf.device import PeakSpec, lookup_peaks

_register()
# Narayanan et al. 2021, Table 1's smaller rows: (width, heads, blocks); seq 2048, vocabulary 51200
NARAYANAN = [(2304, 24, 24), (3072, 32, 30), (4096, 32, 36)]


def _narayanan(h, a, layers, dtype_bytes=2):
    return describe_transformer(n_layer=layers, d=h, n_head=a, vocab=51200, seq=2048, dtype_bytes=dtype_bytes)


@pytest.mark.parametrize("h, a, layers", NARAYANAN)
def test_narayanans_flops_and_parameters_by_hand(h, a, layers):
    """Training FLOPs per sample are 72 s l h^2 (1 + s / 6h + V / 12lh) (their eq. 3 without the recompute's
    extra forward), plus the embedding's s h additions the paper leaves out; parameters 12 l h^2 + 13 l h for the
    blocks, the token and position tables, the final norm and the untied head."""
    s, V = 2048, 51200
    desc = _narayanan(h, a, layers)
    assert desc.flops_per_sample == pytest.approx(72 * s * layers * h * h * (1 + s / (6 * h) + V / (12 * layers * h))
                                                  + 3 * s * h, rel=1e-12)
    assert desc.params == 12 * layers * h * h + 13 * layers * h + (V + s) * h + 2 * h + V * h


def test_a_device_given_by_its_figures_is_the_table_entry_it_copies():
    """The H200's figures given as a dict or a PeakSpec predict what the table's "h200" predicts; a device the
    table has not (its figures invented here) gets a roofline of its own, with its MFU."""
    desc = _narayanan(2304, 24, 24)
    spec = lookup_peaks("h200")
    plan = Plan(batch=16, pp=2, dp=4, microbatches=4)
    want = predict(plan, desc, RooflineCompute(desc, "h200"), h200_nccl()).step_s
    for device in ({"flops": dict(spec.flops), "bandwidth": spec.bandwidth, "label": "my h200"}, spec):
        cm = RooflineCompute(desc, device)
        assert cm.peak == spec.flops["bf16"]
        assert predict(plan, desc, cm, h200_nccl()).step_s == want
    new = RooflineCompute(desc, {"flops": {"bf16": 2.5e15, "fp8": 5e15}, "bandwidth": 8e12, "label": "next gen"})
    assert "next gen" in new.source and new.peak == 2.5e15
    ranked = search(desc, new, h200_nccl(), world_size=8, batch=16, memory_limit=141e9)
    assert 0 < choose(ranked).prediction.mfu(new.peak) < 1
    assert choose(ranked).step_s < choose(search(desc, RooflineCompute(desc, "h200"), h200_nccl(), world_size=8,
                                                 batch=16, memory_limit=141e9)).step_s


@pytest.mark.parametrize("device, match", [
    ({"flops": {"bf16": 1e15}}, "expected a dict of 'flops'"),
    ({"flops": {"bf16": 1e15}, "bandwidth": 3e12, "tdp": 700}, "unknown keys: \\['tdp'\\]"),
    ({"flops": {"bf16": -1e15}, "bandwidth": 3e12}, "flops\\['bf16'\\]=-1000000000000000.0"),
    ({"flops": {"bf16": 1e15}, "bandwidth": math.nan}, "bandwidth=nan"),
    ({"flops": {"bf16": 1e15}, "bandwidth": "fast"}, "bandwidth='fast'"),
    ({"flops": {"fp32": 1e14}, "bandwidth": 3e12}, "dtype='bf16'.*\\['fp32'\\]"),
    ({"flops": [1e15], "bandwidth": 3e12}, "device\\['flops'\\]=\\[1000000000000000.0\\]"),
    ({"flops": {"bf16": 1e15}, "bandwidth": 3e12, "label": ""}, "device\\['label'\\]=''"),
    (PeakSpec("x", "X", (), {"bf16": 1e15}, None), "bandwidth=None \\(X\\)"),
    ("b200", "device='b200' is not in .*'bandwidth': bytes/s"),
])
def test_bad_device_figures_are_refused_by_name(device, match):
    desc = _narayanan(2304, 24, 24)
    with pytest.raises(PlanError, match=match):
        RooflineCompute(desc, device)


def _cluster(inter_bytes_per_s=25e9):
    return ClusterComm(fits={}, source="2 nodes of 8 H200s, NVLink within, InfiniBand between", intra=h200_nccl(),
                       gpus_per_node=8, inter_bytes_per_s=inter_bytes_per_s)


def test_two_nodes_keep_tensor_parallelism_inside_a_node():
    """16 H200s in 2 nodes: a tensor-parallel group of 16 spans the network, and every plan that uses one is
    slower than the chosen one, which keeps its tp group in a node. Its tp all-reduces cost more across nodes
    than the same plan's over NVLink; nothing over 80 GB is ranked; more memory never makes the choice slower."""
    desc = _narayanan(3072, 32, 30)
    cm, net = RooflineCompute(desc, "h200"), _cluster()
    ranked = search(desc, cm, net, world_size=16, batch=32, memory_limit=80e9)
    best = choose(ranked)
    assert best.plan.tp <= 8
    assert all(r.prediction.memory_bytes <= 80e9 for r in ranked)
    wide = [r for r in ranked if r.plan.tp == 16]
    assert wide and all(r.step_s > best.step_s for r in wide)
    one_node = ClusterComm(fits={}, source="one node of 16", intra=h200_nccl(), gpus_per_node=16)
    for r in wide[:5]:
        assert r.prediction.terms["tp comm"] > predict(r.plan, desc, cm, one_node).terms["tp comm"]
    steps = [choose(search(desc, cm, net, world_size=16, batch=32, memory_limit=lim)).step_s
             for lim in (60e9, 80e9, 141e9, None)]
    assert steps == sorted(steps, reverse=True)
    # a slower network between the nodes never makes the best plan faster
    slow = choose(search(desc, cm, _cluster(2.5e9), world_size=16, batch=32, memory_limit=80e9))
    assert slow.step_s >= best.step_s


def _equal_layers(n):
    layer = LayerDesc(name="l", params=10, tensors=2, flops_fwd=1.0, act_bytes=dict.fromkeys(
        ("none", "selective", "full"), 4.0), out_bytes=4.0)
    return ModelDesc(name=f"equal{n}", layers=tuple(layer for _ in range(n)), seq=1)


@pytest.mark.parametrize("p, v, m", [(2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (3, 2, 6), (4, 3, 8)])
def test_the_interleaved_bubble_is_the_closed_form(p, v, m):
    """24 equal layers, each 1 s forward and 2 s backward, in p x v stages: the interleaved schedule's bubble is
    (p - 1) / (v m + p - 1) of the step (Narayanan et al. 2021), the step (m + (p - 1) / v) x 3 x 24 / p s."""
    desc = _equal_layers(24)
    pred = predict(Plan(batch=m, pp=p, microbatches=m, schedule="interleaved-1f1b", stages_per_rank=v), desc,
                   Unit(desc), FREE)
    assert pred.sim.bubble == pytest.approx((p - 1) / (v * m + p - 1))
    assert pred.sim.makespan == pytest.approx((m + (p - 1) / v) * 3 * 24 / p)


def test_prime_world_sizes_and_more_ranks_than_layers():
    """7 ranks, a 4-block GPT (4 heads, width 32, vocabulary 64), batch 12: no degree but 1 divides both 7 and
    12, 4 blocks split into no 7 stages, 4 heads into no 7 ranks; the refusal says so. Batch 14: data
    parallelism over 7 is all there is. 5 ranks over a 3-layer model: no pipeline of 5 stages."""
    gpt = describe_transformer(n_layer=4, d=32, n_head=4, vocab=64, seq=16)
    with pytest.raises(PlanError, match=re.escape("no plan of world_size=7 fits batch=12 and model 'gpt-L4-d32': "
                                                  "of the degrees dividing 7 [1, 7], batch=12 allows data "
                                                  "parallelism of [1], its 6 layers (4 blocks) pipelines of [1] "
                                                  "stages, its widths tensor parallelism of [1]")):
        enumerate_plans(gpt, 7, 12)
    ranked = search(gpt, Flops(gpt), FIT, world_size=7, batch=14)
    assert {(r.plan.dp, r.plan.pp, r.plan.tp, r.plan.dp_shard) for r in ranked} == {(7, 1, 1, 1), (1, 1, 1, 7)}
    three = _equal_layers(3)
    ranked = search(three, Flops(three), FIT, world_size=5, batch=10)
    assert ranked and all(r.plan.pp == 1 for r in ranked)
    with pytest.raises(PlanError, match="batch=3 allows data parallelism of \\[1\\], its 3 layers \\(0 blocks\\) "
                                        "pipelines of \\[1\\] stages"):
        enumerate_plans(three, 5, 3)


def test_batches_that_no_degree_divides_are_refused_by_name():
    desc = _equal_layers(4)
    for plan, match in ((Plan(batch=10, dp=4), "batch=10 is not divisible by dp\\*dp_shard\\*microbatches=4"),
                        (Plan(batch=8, pp=2, microbatches=3), "batch=8 is not divisible by .*=3"),
                        (Plan(batch=6, dp=2, dp_shard=2), "batch=6 is not divisible by .*=4")):
        with pytest.raises(PlanError, match=match):
            predict(plan, desc, Unit(desc), FREE)
    # 4 ranks, batch 6: only degrees of 1 and 2 replicas, and micro-batch counts that divide what each holds
    for p in enumerate_plans(desc, 4, 6):
        assert 6 % (p.dp * p.dp_shard * p.microbatches) == 0 and p.dp * p.dp_shard in (1, 2)


def test_a_limit_nothing_fits_names_the_smallest_plan_and_what_it_needs():
    """The refusal's figure is the least memory of every enumerated plan; a limit of exactly that admits the
    plans that need no more, and nothing over it."""
    desc = describe_transformer(n_layer=4, d=64, n_head=4, vocab=128, seq=32)
    preds = [predict(p, desc, Unit(desc), FREE) for p in enumerate_plans(desc, 4, 8)]
    least = min(p.memory_bytes for p in preds)
    with pytest.raises(PlanError, match=re.escape(f"memory_limit={0.99 * least:.4g} bytes per rank; no plan of "
                                                  f"{len(preds)} fits (the smallest, ") + ".*" +
                       re.escape(f", needs {least:.4g})")):
        search(desc, Unit(desc), FREE, world_size=4, batch=8, memory_limit=0.99 * least)
    ranked = search(desc, Unit(desc), FREE, world_size=4, batch=8, memory_limit=least)
    assert {r.plan for r in ranked} == {p.plan for p in preds if p.memory_bytes <= least}


# ---- the CLI ---------------------------------------------------------------------------------------------------------
GPT = ["--layers", "4", "--d", "32", "--heads", "4", "--vocab", "64", "--seq", "16"]


def _said(res, text):
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


@pytest.mark.parametrize("args, match", [
    (["--nproc", "2", *GPT, "--memory-limit", "1e400"], "--memory-limit '1e400'; expected a positive, finite"),
    (["--nproc", "2", *GPT, "--memory-limit", "0.0GB"], "--memory-limit '0.0GB'"),
    (["--nproc", "2", *GPT, "--noise-scale", "-3"], "--noise-scale -3.0; expected a finite gradient noise"),
    (["--nproc", "2", *GPT, "--noise-scale", "nan"], "--noise-scale nan"),
    (["--nproc", "7", *GPT, "--batch", "12"], "batch=12 allows data parallelism of [1]"),
    (["--nproc", "2", *GPT, "--device", "b200"], "device='b200' is not in"),
    (["--nproc", "2", *GPT, "--seq", "0"], "'--seq': 0 is not in the range"),
    (["--nproc", "two", *GPT], "'--nproc': 'two' is not a valid integer"),
    (["--nproc", "2", *GPT, "--batch", "8,-4"], "--batch '8,-4'"),
    (["--nproc", "2", *GPT, "--memory-limit", "4 parsecs"], "--memory-limit '4 parsecs'"),
])
def test_cli_bad_flags_name_the_flag_before_any_measurement(tmp_path, args, match):
    with config.override(cache_dir=tmp_path):              # no stored fit: measuring it would leave a file here
        res = CliRunner().invoke(app, ["plan", *args])
        assert _said(res, match), res.output
        assert not comm_path("gloo-cpu").exists()


def test_cli_plans_for_a_device_not_here_without_measuring(tmp_path):
    """--device h100-sxm on a Narayanan-sized GPT: a roofline and NCCL's figures, no measurement, a plan file
    that fits the limit."""
    out = tmp_path / "plan.json"
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "8", "--layers", "24", "--d", "2304", "--heads", "24",
                                       "--vocab", "51200", "--seq", "2048", "--batch", "16", "--device", "h100-sxm",
                                       "--dtype", "bfloat16", "--memory-limit", "80GB", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert not comm_path("gloo-cpu").exists()
    spec = json.loads(out.read_text())
    assert spec["predicted"]["memory_bytes"] <= 80e9 and spec["nproc"] == 8


def test_a_block_shared_by_stages_on_two_nodes_exchanges_over_the_network():
    """The block called at layers 1, 3 and 5 (plan_models_round4.SharedBetween) on 16 GPUs in 2 nodes of 8, pp=4
    x dp=4: pipeline rank 0 owns it (GPUs 0-3), ranks 2 and 3 hold copies (GPUs 8-15), a node away. The
    all-reduce of each of its 4 tensors' gradients between the owner and each copy crosses the network (NVLink is
    free here, the network is not): it was taken as between neighbouring pipeline ranks (4 GPUs apart, one
    node), so it cost nothing. The loss's all-reduce over the pipeline ranks spans the nodes too."""
    from plan_models_round4 import MODELS, mlp_params

    from tilestack.parallel.plan import describe_module
    module, x = MODELS["shared between"]
    desc = describe_module(module, x)
    net = ClusterComm(fits={}, source="free NVLink, 1 GB/s between", intra=FREE, gpus_per_node=8,
                      inter_alpha=1e-5, inter_bytes_per_s=1e9)
    plan = Plan(batch=16, pp=4, dp=4, microbatches=4, schedule="gpipe", bounds=(0, 2, 3, 4, 7))
    pred = predict(plan, desc, Unit(desc), net)
    tensors = [8 * 16, 16, 16 * 8, 8]                                     # fc and proj, weights and biases
    assert sum(tensors) == mlp_params(8, 16)
    across = sum(net.time("all_reduce", n * 4, 2, stride=8) for n in tensors)
    assert across == sum(net.time("all_reduce", n * 4, 2, stride=12) for n in tensors)
    loss = net.time("all_reduce", 4, 4, stride=4)
    assert across > 0 and loss > 0
    assert pred.terms["dp comm"] == pytest.approx(2 * across + loss)         # the owner meets both copies


def test_a_plan_for_a_prime_world_trains_like_one_process():
    """3 ranks, a batch of 4 and a GPT of 3 heads, a vocabulary of 50 and 3 blocks: 3 divides neither the batch
    nor the vocabulary, so the only plans are pipelines of 3 stages, one block each; the chosen one, run by the
    real Trainer on 3 gloo ranks, gives the single process's losses."""
    from plan_workers_round3 import BATCH, CFG, SEQ, reference_losses, train_plan

    from tilestack.parallel import ModelConfig, run_local
    from tilestack.parallel.plan import describe_gpt
    desc = describe_gpt(ModelConfig(**CFG), SEQ)
    ranked = search(desc, Flops(desc), FIT, world_size=3, batch=BATCH, recompute=["none"])
    assert {r.plan.pp for r in ranked} == {3}
    best = next(r for r in ranked if r.prediction.runnable)
    assert best.plan.stage_bounds(desc) == (0, 2, 3, 5)
    losses = run_local(train_plan, 3, (best.plan.parallel_kwargs(),), timeout_s=300)
    for rank_losses in losses:
        assert rank_losses == pytest.approx(reference_losses(), rel=1e-4, abs=1e-5), best.plan.label()


def test_one_schedule_by_name_and_a_batch_given_twice():
    """schedules="gpipe" is a selection of one, as recompute="full" is: it was taken letter by letter and refused
    as schedules=['g', 'p', 'i', 'p', 'e']. A batch listed twice is ranked once, not every plan twice."""
    desc = _equal_layers(4)
    plans = enumerate_plans(desc, 2, 4, schedules="gpipe")
    assert {p.schedule for p in plans if p.pp > 1} == {"gpipe"}
    assert plans == enumerate_plans(desc, 2, 4, schedules=["gpipe"])
    with pytest.raises(PlanError, match="schedules=\\['zb'\\]"):
        enumerate_plans(desc, 2, 4, schedules="zb")
    twice = search(desc, Unit(desc), FREE, world_size=2, batch=[4, 8, 4])
    assert len(twice) == len({r.plan for r in twice}) == len(search(desc, Unit(desc), FREE, world_size=2,
                                                                     batch=[4, 8]))
