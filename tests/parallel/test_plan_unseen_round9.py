"""The planner on models and clusters it was not built around, round 9: layer counts that a pipeline does not
divide, tied against untied embeddings, layers of very unequal cost (Alpa's DP against a partition found by hand),
memory limits at the smallest plan's peak, a device that is not here (the roofline by hand), odd GPU counts and a
cluster of 3 nodes x 2 GPUs, batches that do not split into whole micro-batches.

Everything here is checked against a hand computation or an independent enumeration written in this file, with
unit times (``Unit``: 1 s forward, 2 s backward per layer), times by FLOPs, or explicit per-layer weights.
"""

import itertools
import math

import pytest
import torch
from plan_models_round2 import FIT, FREE, Flops, Unit
from torch import nn

from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import (
    ClusterComm,
    CommModel,
    Plan,
    PlanError,
    RooflineCompute,
    alpa_stages,
    brute_force_stages,
    describe_gpt,
    describe_module,
    describe_transformer,
    enumerate_plans,
    predict,
    search,
)
from tilestack.parallel.plan.compute import (
    ATTENTION_EFFICIENCY,
    BACKWARD_PER_FORWARD,
    COPY_EFFICIENCY,
    MATMUL_EFFICIENCY,
    ComputeModel,
)
from tilestack.parallel.plan.predict import even_bounds
from tilestack.parallel.plan.search import plan_stage_cost

FP32 = 4


# ---- a model of 7 layers: pipelines of 2 to 7 stages ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp7():
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(8, 8) for _ in range(7)])       # 72 elements a layer
    return describe_module(module, torch.randn(4, 8), name="mlp7")


# every stage holds floor(7 / n) or ceil(7 / n) layers, in order, all 7 once
SPLITS = {2: (0, 4, 7), 3: (0, 2, 5, 7), 4: (0, 2, 4, 5, 7), 5: (0, 1, 3, 4, 6, 7), 6: (0, 1, 2, 4, 5, 6, 7),
          7: (0, 1, 2, 3, 4, 5, 6, 7)}


@pytest.mark.parametrize("stages", sorted(SPLITS))
def test_seven_layers_split_into_stages_of_floor_or_ceil_layers(stages, mlp7):
    bounds = even_bounds(mlp7, stages)
    assert bounds == SPLITS[stages]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert set(sizes) <= {7 // stages, -(-7 // stages)} and sum(sizes) == 7


@pytest.mark.parametrize("pp", [2, 3, 4, 5])
def test_seven_layers_every_pipeline_rank_holds_its_own_layers_bytes(pp, mlp7):
    """Parameters per pipeline rank by hand: 72 f32 elements per layer it holds; together, the whole model."""
    pred = predict(Plan(batch=pp, pp=pp, schedule="gpipe", microbatches=pp), mlp7, Unit(mlp7), FREE)
    sizes = [b - a for a, b in itertools.pairwise(SPLITS[pp])]
    assert [m["parameters"] for m in pred.memory] == [n * 72 * FP32 for n in sizes]
    assert [m["gradients"] for m in pred.memory] == [n * 72 * FP32 for n in sizes]
    assert sum(m["parameters"] for m in pred.memory) == mlp7.params * FP32


def test_more_stages_than_seven_layers_are_refused_by_name(mlp7):
    with pytest.raises(PlanError, match="8 pipeline stages for 7 layers"):
        predict(Plan(batch=8, pp=8, schedule="gpipe", microbatches=8), mlp7, Unit(mlp7), FREE)
    with pytest.raises(PlanError, match="8 pipeline stages for 7 layers"):
        predict(Plan(batch=8, pp=4, schedule="interleaved-1f1b", stages_per_rank=2, microbatches=4), mlp7, Unit(mlp7),
                FREE)


def test_a_gpt_of_five_blocks_has_no_even_pipeline_of_two_or_four():
    gpt5 = describe_gpt(ModelConfig(n_layer=5, d=32, n_head=4, vocab=64, max_seq=16), seq=16)
    for world in (2, 4):
        assert not any(p.pp > 1 for p in enumerate_plans(gpt5, world, 8))
    with pytest.raises(PlanError, match="do not divide the model's 5 blocks"):
        Plan(batch=4, pp=2, microbatches=2).check(gpt5)
    # a prime world equal to the blocks: one block a stage
    assert {p.pp for p in enumerate_plans(gpt5, 5, 5)} == {1, 5}
    assert even_bounds(gpt5, 5) == (0, 2, 3, 4, 5, 7)
    # an uneven split given by hand is predicted (blocks 2 and 3 on the two stages), not runnable by tilestack train
    pred = predict(Plan(batch=4, pp=2, microbatches=2, schedule="gpipe", bounds=(0, 3, 7)), gpt5, Unit(gpt5), FREE)
    assert not pred.runnable
    # gpipe, 2 micro-batches of unit layers: stage 0 (embed + 2 blocks) 3 s / 6 s, stage 1 (3 blocks + head) 4 / 8:
    # forwards end at 3, 6 (stage 0) and 7, 11 (stage 1); backwards of stage 1 at 19, 27; stage 0's at 25, 33
    assert pred.sim.makespan == pytest.approx(33.0)


# ---- tied against untied embeddings ---------------------------------------------------------------------------------

V, D = 50, 6


class TinyLM(nn.Module):
    """Embedding (V, D), two Linear + Tanh blocks, a head (D -> V, no bias), the head's weight the embedding's when
    ``tied``."""

    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):                                              # (B, S) -> (B, S, V)
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture(scope="module")
def lms():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 5))
    return {tied: describe_module(TinyLM(tied), ids, name=f"lm-tied={tied}") for tied in (False, True)}


def test_tied_embeddings_count_the_shared_weight_once(lms):
    untied, tied = lms[False], lms[True]
    assert untied.params == V * D + 2 * (D * D + D) + V * D
    assert tied.params == untied.params - V * D
    one = Plan(batch=2)
    m_untied = predict(one, untied, Unit(untied), FREE).memory[0]
    m_tied = predict(one, tied, Unit(tied), FREE).memory[0]
    assert m_untied["parameters"] - m_tied["parameters"] == V * D * FP32
    assert m_untied["optimizer"] - m_tied["optimizer"] == 2 * V * D * FP32


def test_a_tied_head_across_a_pipeline_cut_holds_a_copy_and_all_reduces_its_gradient(lms):
    """pp2 cuts between the blocks: rank 1 runs the head; tied, it holds the embedding's weight too and the two
    ranks all-reduce its gradient once a step (FIT's 2-rank line: 2e-5 s + 1e-10 s per byte)."""
    untied, tied = lms[False], lms[True]
    plan = Plan(batch=2, pp=2, schedule="gpipe", microbatches=2)
    bounds = even_bounds(tied, 2)
    assert [layer.name for layer in tied.layers[bounds[1]:]][-1] == "head"
    p_untied, p_tied = (predict(plan, d, Unit(d), FIT) for d in (untied, tied))
    # rank 1 holds the head's weight in both; tied it is the embedding's copy, no extra bytes on rank 1 ...
    assert p_tied.memory[1]["parameters"] == p_untied.memory[1]["parameters"]
    # ... and rank 0 holds the weight only once (untied: also once, its embedding)
    assert p_tied.memory[0]["parameters"] == p_untied.memory[0]["parameters"]
    # the tied weight's gradient is exchanged between the two ranks: the dp comm term grows by one all-reduce
    extra = 2e-5 + 1e-10 * V * D * FP32
    assert p_tied.terms["dp comm"] - p_untied.terms["dp comm"] == pytest.approx(extra, rel=1e-9)


# ---- layers of very unequal cost: Alpa's DP against a partition found by hand ----------------------------------------

WEIGHTS = (1, 1, 8, 1, 1, 1, 6, 1)
SCALE = 1e-3                                         # seconds of forward per weight unit and sample


class Weighted(ComputeModel):
    """Layer i's forward WEIGHTS[i] x SCALE s per sample, backward twice that; AdamW free."""

    def __init__(self, desc):
        self.desc, self.source = desc, "weighted"

    def _times(self, layer, index, micro_batch, tp):
        f = WEIGHTS[index] * SCALE * micro_batch
        return f, 2 * f

    def optimizer_s(self, params, tensors):
        return 0.0


@pytest.fixture(scope="module")
def uneven():
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(4, 4) for _ in WEIGHTS])
    return describe_module(module, torch.randn(8, 4), name="uneven")


def _by_hand(stages: int, micro: int, microbatches: int):
    """Every cut of the layers into ``stages`` contiguous stages of one device: the least latency
    sum(t) + (B - 1) max(t), t a stage's forward + backward per micro-batch, and its cut."""
    best = None
    for cuts in itertools.combinations(range(1, len(WEIGHTS)), stages - 1):
        bounds = (0, *cuts, len(WEIGHTS))
        t = [3 * sum(WEIGHTS[a:b]) * SCALE * micro for a, b in itertools.pairwise(bounds)]
        lat = sum(t) + (microbatches - 1) * max(t)
        if best is None or lat < best[0] - 1e-12:
            best = (lat, bounds)
    return best


def test_alpa_balances_very_unequal_layers_as_the_hand_partition(uneven):
    """3 devices of one each, 4 micro-batches of 2: the cut (0, 2, 4, 8) (stages of weight 2, 9, 9), not the even
    split by count (0, 3, 5, 8) (10, 2, 8)."""
    cost = plan_stage_cost(uneven, Weighted(uneven), FREE, batch=8, microbatches=4, memory_limit=None)
    split = alpa_stages(len(WEIGHTS), n_devices=3, submeshes=(1,), microbatches=4, stage_cost=cost)
    lat, bounds = _by_hand(3, micro=2, microbatches=4)
    assert bounds == (0, 2, 4, 8)
    assert split.latency == pytest.approx(lat, rel=1e-9)
    assert tuple(s[0] for s in split.stages) + (split.stages[-1][1],) == bounds
    even = even_bounds(uneven, 3)
    t_even = [3 * sum(WEIGHTS[a:b]) * SCALE * 2 for a, b in itertools.pairwise(even)]
    assert split.latency < sum(t_even) + 3 * max(t_even) - 1e-9


@pytest.mark.parametrize("limit", [None, 2600.0])
def test_alpa_on_unequal_layers_matches_brute_force_over_sub_meshes(limit, uneven):
    cost = plan_stage_cost(uneven, Weighted(uneven), FIT, batch=8, microbatches=4, memory_limit=limit)
    kw = dict(n_devices=4, submeshes=(1, 2, 4), microbatches=4, stage_cost=cost)
    dp_split = alpa_stages(len(WEIGHTS), **kw)
    brute = brute_force_stages(len(WEIGHTS), **kw)
    assert dp_split.latency == pytest.approx(brute.latency, rel=1e-12)
    assert sum(s[2] for s in dp_split.stages) == 4


# ---- a memory limit at the smallest plan's peak ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt():
    return describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), seq=16)


@pytest.mark.parametrize("world, batch", [(2, 4), (3, 6), (6, 12)])
def test_a_limit_at_the_least_peak_keeps_exactly_those_plans_and_one_byte_less_says_none_fits(world, batch, gpt):
    preds = [predict(p, gpt, Flops(gpt), FIT) for p in enumerate_plans(gpt, world, batch)]
    least = min(p.memory_bytes for p in preds)
    ranked = search(gpt, Flops(gpt), FIT, world_size=world, batch=batch, memory_limit=least)
    assert ranked and {r.plan for r in ranked} == {p.plan for p in preds if p.memory_bytes <= least}
    with pytest.raises(PlanError, match=r"memory_limit=.*no plan of \d+ fits.*needs") as err:
        search(gpt, Flops(gpt), FIT, world_size=world, batch=batch, memory_limit=least - 1)
    assert f"{least:.4g}" in str(err.value)
    # one limit per GPU: the same, and one GPU a byte short leaves only plans whose other ranks are smaller
    with pytest.raises(PlanError, match="bytes per GPU"):
        search(gpt, Flops(gpt), FIT, world_size=world, batch=batch, memory_limit=[least - 1] * world)


# ---- a device that is not here: the roofline by hand -----------------------------------------------------------------

NEXT_GEN = {"flops": {"bf16": 3.0e15}, "bandwidth": 1.0e13, "label": "next gen"}


def test_roofline_of_a_given_device_times_a_block_by_hand():
    desc = describe_transformer(n_layer=2, d=4096, n_head=32, vocab=32000, seq=2048, dtype_bytes=2, flash=True)
    rc = RooflineCompute(desc, NEXT_GEN)
    block = desc.layers[1]
    for b, tp in ((1, 1), (4, 2)):
        mm = block.matmul_flops * b / tp / (3.0e15 * MATMUL_EFFICIENCY)
        att = (block.flops_fwd - block.matmul_flops) * b / tp / (3.0e15 * ATTENTION_EFFICIENCY)
        moved = 2 * b * (block.act_bytes["none"] - block.act_tp_bytes["none"] * (1 - 1 / tp))
        fwd = mm + att + moved / (1.0e13 * COPY_EFFICIENCY)
        assert rc.layer_times(1, b, tp) == pytest.approx((fwd, BACKWARD_PER_FORWARD * fwd), rel=1e-12)
    # twice the FLOP/s and bandwidth: every layer above the host floor twice as fast
    fast = RooflineCompute(desc, {"flops": {"bf16": 6.0e15}, "bandwidth": 2.0e13})
    assert fast.layer_times(1, 4, 1)[0] == pytest.approx(rc.layer_times(1, 4, 1)[0] / 2, rel=1e-12)
    assert "next gen" in rc.source


def test_roofline_of_a_device_without_the_dtype_is_refused_by_name():
    desc = describe_transformer(n_layer=2, d=64, n_head=4, vocab=64, seq=16)
    with pytest.raises(PlanError, match=r"dtype='tf32'.*\['bf16'\]"):
        RooflineCompute(desc, NEXT_GEN, dtype="tf32")
    with pytest.raises(PlanError, match="device='tpu-v9'"):
        RooflineCompute(desc, "tpu-v9")


# ---- odd GPU counts and a cluster of 3 nodes x 2 GPUs -------------------------------------------------------------

def _cluster():
    intra = CommModel(fits={k: {2: (5e-6, 1e-11)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                      source="nvlink")
    return ClusterComm(intra=intra, gpus_per_node=2, inter_alpha=1e-5, inter_bytes_per_s=2e10, nodes=3)


def test_three_nodes_of_two_gpus_price_data_parallelism_over_six_as_the_ring_by_hand(gpt):
    cl = _cluster()
    rc = RooflineCompute(gpt, "h200")
    pred = predict(Plan(batch=12, dp=6), gpt, rc, cl)
    grad = gpt.params * FP32
    ring = 2 * 5 * 1e-5 + 2 * 5 / 6 * grad / 2e10
    loss = 2 * 5 * 1e-5 + 2 * 5 / 6 * FP32 / 2e10
    assert pred.terms["dp comm"] == pytest.approx(ring + loss, rel=1e-9)
    # dp2 x tp3 is not a plan (tp must divide 4 heads); pp3 x dp2: the dp pairs are inside a node (ranks 2k, 2k+1)
    pred = predict(Plan(batch=12, pp=3, dp=2, schedule="gpipe", microbatches=2), describe_gpt(
        ModelConfig(n_layer=3, d=32, n_head=4, vocab=64, max_seq=16), seq=16), RooflineCompute(describe_gpt(
            ModelConfig(n_layer=3, d=32, n_head=4, vocab=64, max_seq=16), seq=16), "h200"), cl)
    assert pred.terms["dp comm"] > 0


def test_a_search_of_three_nodes_of_two_plans_for_all_six_and_refuses_other_worlds(gpt):
    cl = _cluster()
    ranked = search(gpt, RooflineCompute(gpt, "h200"), cl, world_size=6, batch=12)
    assert ranked and all(r.plan.world_size == 6 for r in ranked)
    assert [r.step_s for r in ranked] == sorted(r.step_s for r in ranked)
    for world in (3, 4, 8):
        with pytest.raises(PlanError, match=f"world_size={world} on ClusterComm"):
            search(gpt, RooflineCompute(gpt, "h200"), cl, world_size=world, batch=12)


@pytest.mark.parametrize("world", [3, 6])
def test_odd_worlds_enumerate_exactly_the_degrees_that_divide(world, gpt):
    """gpt: 4 heads, d 32, vocab 64, 4 blocks, max_seq 16: tp in {1, 2} (and dividing the world), pp in {1, 2, 4}
    dividing the world; dp x dp_shard the rest, dividing the batch of 12."""
    plans = enumerate_plans(gpt, world, 12)
    seen = {(p.pp, p.dp * p.dp_shard, p.tp) for p in plans}
    expected = {(pp, world // (pp * tp), tp) for pp in (1, 2, 4) for tp in (1, 2)
                if world % (pp * tp) == 0 and 12 % (world // (pp * tp)) == 0}
    assert seen == expected


# ---- batches that do not split into whole micro-batches -------------------------------------------------------------

@pytest.mark.parametrize("kw, shown", [
    (dict(batch=6, dp=4), "batch=6 is not divisible by dp*dp_shard*microbatches=4"),
    (dict(batch=6, dp=2, pp=2, microbatches=2, schedule="gpipe"), "dp*dp_shard*microbatches=4"),
    (dict(batch=9, dp_shard=2), "batch=9"),
])
def test_a_batch_that_is_not_whole_micro_batches_is_refused_by_name(kw, shown, gpt):
    with pytest.raises(PlanError, match=shown.replace("*", r"\*")):
        predict(Plan(**kw), gpt, Unit(gpt), FREE)


def test_enumerated_plans_all_split_the_batch_into_whole_micro_batches(gpt):
    for world, batch in ((2, 6), (4, 6), (6, 9), (4, 10)):
        for p in enumerate_plans(gpt, world, batch):
            assert batch % (p.dp * p.dp_shard * p.microbatches) == 0 and p.micro_batch >= 1


def test_a_batch_no_data_degree_divides_and_no_pipeline_can_take_is_refused_with_the_batch():
    torch.manual_seed(0)
    one = describe_module(nn.Linear(4, 4), torch.randn(2, 4), name="one-layer")
    with pytest.raises(PlanError, match=r"batch=7.*data parallelism of \[1\]"):
        search(one, Unit(one), FREE, world_size=2, batch=7)
    assert math.isfinite(search(one, Unit(one), FREE, world_size=2, batch=8)[0].step_s)


def test_two_nodes_of_three_gpus_price_tensor_parallel_pairs_as_crossing_the_network(gpt):
    """tp 2 over 2 nodes of 3 GPUs: the pairs {0, 1}, {2, 3}, {4, 5}; {2, 3} spans the nodes, and the step waits for
    the slowest pair, so every tp all-reduce is the 2-rank ring at the network's rate by hand: 2 alpha + S / B per
    collective, 4 per block; on nodes of 2 GPUs every pair is inside a node (NVLink's line)."""
    intra = CommModel(fits={k: {2: (5e-6, 1e-11)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                      source="nvlink")
    odd = ClusterComm(intra=intra, gpus_per_node=3, inter_alpha=1e-5, inter_bytes_per_s=2e10, nodes=2)
    even = ClusterComm(intra=intra, gpus_per_node=2, inter_alpha=1e-5, inter_bytes_per_s=2e10, nodes=3)
    rc = RooflineCompute(gpt, "h200")
    plan = Plan(batch=12, dp=3, tp=2)
    blocks = [layer for layer in gpt.layers if layer.kind == "block"]
    nbytes = blocks[0].tp_comm_bytes * plan.micro_batch
    assert predict(plan, gpt, rc, odd).terms["tp comm"] == pytest.approx(
        len(blocks) * 4 * (2 * 1e-5 + nbytes / 2e10), rel=1e-9)
    assert predict(plan, gpt, rc, even).terms["tp comm"] == pytest.approx(
        len(blocks) * 4 * (5e-6 + 1e-11 * nbytes), rel=1e-9)


# ---- an encoder-decoder, its embeddings tied (to each other and the head) or not ----------------------------------

EV, ED, ES, ET = 40, 8, 5, 3            # vocabulary, width, source and target tokens


class CrossBlock(nn.Module):
    """y + tanh(W y + U mean(memory)): a decoder block that reads the encoder's output."""

    def __init__(self):
        super().__init__()
        self.w, self.u = nn.Linear(ED, ED), nn.Linear(ED, ED)

    def forward(self, y, memory):                                        # (B, T, D), (B, S, D)
        return y + torch.tanh(self.w(y) + self.u(memory.mean(1, keepdim=True)))


class EncDec(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.emb_src = nn.Embedding(EV, ED)
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(ED, ED), nn.Tanh()) for _ in range(2))
        self.emb_tgt = self.emb_src if tied else nn.Embedding(EV, ED)
        self.dec = nn.ModuleList(CrossBlock() for _ in range(2))
        self.head = nn.Linear(ED, EV, bias=False)
        if tied:
            self.head.weight = self.emb_src.weight

    def forward(self, src, tgt):                                         # (B, S), (B, T) -> (B, T, V)
        memory = self.emb_src(src)
        for layer in self.enc:
            memory = layer(memory)
        y = self.emb_tgt(tgt)
        for block in self.dec:
            y = block(y, memory)
        return self.head(y)


@pytest.fixture(scope="module")
def encdecs():
    torch.manual_seed(0)
    src, tgt = torch.randint(0, EV, (2, ES)), torch.randint(0, EV, (2, ET))
    return {tied: describe_module(EncDec(tied), (src, tgt), name=f"encdec-tied={tied}") for tied in (False, True)}


# layers: emb_src, enc.0.0, enc.0.1, enc.1.0, enc.1.1, emb_tgt, dec.0, dec.1, head
EMB, ENC, DEC = EV * ED, ED * ED + ED, 4 * (ED * ED + ED)       # DEC: two blocks of two Linears
MEMORY, YS, TGT_IDS = ES * ED * FP32, ET * ED * FP32, ET * 8


@pytest.mark.parametrize("cut, sent, untied, tied", [
    # a stage from enc.0.0: the encoder's activations and the target ids (read by emb_tgt later)
    (1, MEMORY + TGT_IDS, (EMB, 2 * ENC + EMB + DEC + EMB), (EMB, 2 * ENC + DEC + EMB)),
    # from emb_tgt: the encoder's output and the target ids
    (5, MEMORY + TGT_IDS, (EMB + 2 * ENC, EMB + DEC + EMB), (EMB + 2 * ENC, DEC + EMB)),
    # from dec.0: the decoder's input and the encoder's output it attends to
    (6, YS + MEMORY, (2 * EMB + 2 * ENC, DEC + EMB), (EMB + 2 * ENC, DEC + EMB)),
    # the head alone: the last block's output
    (8, YS, (2 * EMB + 2 * ENC + DEC, EMB), (EMB + 2 * ENC + DEC, EMB)),
])
def test_encoder_decoder_cuts_by_hand_tied_and_untied(cut, sent, untied, tied, encdecs):
    """Per cut: the bytes per sample that cross it, and each rank's parameters (elements), the tied weight held once
    per rank that uses it; tied, its gradient all-reduced between the ranks once a step where both use it."""
    for is_tied, per_rank in ((False, untied), (True, tied)):
        desc = encdecs[is_tied]
        assert desc.params == (EMB + 2 * ENC + DEC + (0 if is_tied else 2 * EMB))
        plan = Plan(batch=2, pp=2, schedule="gpipe", microbatches=2, bounds=(0, cut, len(desc.layers)))
        pred = predict(plan, desc, Unit(desc), FIT)
        assert [m["parameters"] for m in pred.memory] == [n * FP32 for n in per_rank]
        # a receive buffer per micro-batch of 1 sample on each side of the cut
        assert pred.memory[1]["transient"] == pytest.approx(2 * sent)
        loss = 2e-5 + 1e-10 * FP32
        shared = 2e-5 + 1e-10 * EMB * FP32 if is_tied else 0.0
        assert pred.terms["dp comm"] == pytest.approx(loss + shared, rel=1e-9)


# ---- collectives of a group size between two measured ones -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter"])
def test_a_group_between_two_measured_sizes_costs_between_them(kind):
    """ANCHORS.md's H200 lines are for 2 and 4 GPUs; a group of 3 was the ring scaled from 2 GPUs' line, above the
    measured 4-GPU time at every size (4.8e-5 s against 4.4e-5 at 1 kB), so 3 and 6 GPUs priced as more than 4 and
    8. Between two measured sizes it is now within their times; past the largest, the ring model as before."""
    from tilestack.parallel.plan import h200_nccl
    cm = h200_nccl()
    for nbytes in (1e3, 1e6, 1e8, 1e9):
        t2, t3, t4 = (cm.time(kind, nbytes, n) for n in (2, 3, 4))
        assert t2 <= t3 <= t4
        times = [cm.time(kind, nbytes, n) for n in range(2, 17)]
        assert times == sorted(times)
    # a fit of 2 and 8 ranks: 4 ranks within them, from either side
    fit = CommModel(fits={kind: {2: (2e-5, 1e-10), 8: (4e-5, 2e-10)}}, source="two sizes")
    for nbytes in (8.0, 1e6, 1e9):
        assert 2e-5 + 1e-10 * nbytes <= fit.time(kind, nbytes, 4) <= 4e-5 + 2e-10 * nbytes


# ---- a mixture of experts as one layer ---------------------------------------------------------------------------

class TopOneMoE(nn.Module):
    """A router and 4 expert MLPs (Linear(6, 12), ReLU, Linear(12, 6)); each token goes to its router's argmax.
    The router's bias makes expert 3 never chosen on the example (its weights still train: the Trainer's flat
    gradient buffers and AdamW hold them)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(6, 4)
        with torch.no_grad():
            self.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)) for _ in range(4))

    def forward(self, x):                                                # (B, S, 6)
        choice = self.router(x).argmax(-1)                               # (B, S)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = choice == e
            if mask.any():
                out[mask] = expert(x[mask])
        return x + out


def test_a_mixture_of_experts_inside_one_layer_is_never_cut_and_counts_every_expert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), TopOneMoE(), nn.Linear(6, 6))
    desc = describe_module(model, torch.randn(2, 5, 6), name="moe")
    expert = 6 * 12 + 12 + 12 * 6 + 6
    assert [layer.params for layer in desc.layers] == [42, 4 * 6 + 4 + 4 * expert, 42]
    assert desc.params == sum(p.numel() for p in model.parameters())
    for pp, held in ((2, [42 + 28 + 4 * expert, 42]), (3, [42, 28 + 4 * expert, 42])):
        pred = predict(Plan(batch=pp, pp=pp, schedule="gpipe", microbatches=pp), desc, Unit(desc), FREE)
        assert [m["parameters"] for m in pred.memory] == [n * FP32 for n in held]
        assert [m["gradients"] for m in pred.memory] == [n * FP32 for n in held]
    with pytest.raises(PlanError, match="tp=2"):
        predict(Plan(batch=2, tp=2), desc, Unit(desc), FREE)


def test_alpa_under_a_limit_no_stage_fits_says_so_by_name(uneven):
    least = min(predict(Plan(batch=2), uneven, Weighted(uneven), FREE).peaks)      # one layer-range's whole model
    cost = plan_stage_cost(uneven, Weighted(uneven), FREE, batch=8, microbatches=4, memory_limit=1.0)
    with pytest.raises(PlanError, match="no split of 8 layers over 3 devices fits"):
        alpa_stages(len(WEIGHTS), n_devices=3, submeshes=(1, 2, 3), microbatches=4, stage_cost=cost)
    assert least > 1.0
    with pytest.raises(PlanError, match="memory_limit=-1"):
        plan_stage_cost(uneven, Weighted(uneven), FREE, batch=8, microbatches=4, memory_limit=-1)
