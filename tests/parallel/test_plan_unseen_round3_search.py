"""Round 3 of unseen models, the search: every plan it returns can run, limits are kept, bad arguments are named.

On the models of plan_models_round3 (recurrent, LoRA, frozen encoder, heterogeneous blocks, a million-row
embedding, bf16, keyword-argument blocks, weight norm) and GPT shapes no round used: every ranked plan's ranks
multiply to the world size, its stages are non-empty and cover the layers, its micro-batches divide the batch,
its tensor-parallel degree divides heads, width and vocabulary (1 for modules), its memory fits the limit; a plan
that does not fit is never chosen; a plan chosen for tilestack's GPT trains on 2 gloo ranks to the losses of one
process.

Found and fixed (each test below failed first):
- search took a misspelt or unknown keyword (``kinds=["ep"]``) to enumerate_plans, which raised a TypeError, and
  enumerate_plans took ``zero="yes"`` as true: both are now PlanErrors naming the argument and what is expected;
- a module on the meta device failed with torch's RuntimeError (and would have counted no activations), and an
  embedding with sparse=True was planned with dense gradients and AdamW: both refused by name (_check_module);
- a pipeline stage's boundary was the previous layer's output only: a decoder block after the cut also receives
  the encoder's output, which its send and both stages' receive buffers left out (LayerDesc.in_bytes,
  predict._sent_bytes).
"""

import math

import pytest
import torch
from plan_models_round2 import FIT, FREE, Flops, Unit
from plan_models_round3 import FP32, MODELS, _args

from tilestack.parallel.plan import (
    Plan,
    PlanError,
    choose,
    describe_gpt,
    describe_module,
    describe_transformer,
    enumerate_plans,
    predict,
    search,
)
from tilestack.parallel.plan.search import ENUMERATE_KW


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


def _valid(r, desc, world, limit=None):
    plan, pred = r.plan, r.prediction
    assert plan.pp * plan.dp * plan.dp_shard * plan.tp == world == plan.world_size
    assert plan.batch % (plan.dp * plan.dp_shard * plan.microbatches) == 0 and plan.micro_batch >= 1
    bounds = plan.stage_bounds(desc)
    assert bounds[0] == 0 and bounds[-1] == len(desc.layers) and len(bounds) == plan.n_stages + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))              # no empty stage
    assert desc.tp_divides(plan.tp)
    if desc.n_head:
        assert desc.n_head % plan.tp == 0 and desc.d % plan.tp == 0 and desc.vocab % plan.tp == 0
    else:
        assert plan.tp == 1
    if plan.sp:
        assert desc.seq % plan.tp == 0
    assert math.isfinite(pred.step_s) and pred.step_s > 0
    assert sum(pred.terms.values()) == pytest.approx(pred.step_s)
    assert len(pred.memory) == plan.pp and all(math.isfinite(p) and p > 0 for p in pred.peaks)
    if limit is not None:
        assert pred.memory_bytes <= limit


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_ranked_plan_of_an_unseen_module_can_run(name, world, described):
    desc = described[name]
    batch = 12
    ranked = search(desc, Flops(desc), FIT, world_size=world, batch=batch)
    assert ranked
    for r in ranked:
        _valid(r, desc, world)
        assert not r.prediction.runnable                         # tilestack train runs its GPT only
    assert [r.step_s for r in ranked] == sorted(r.step_s for r in ranked)
    # pipelines over these layers: their stages are non-empty (3 ranks over a 3-layer model: one layer each)
    pipes = [r for r in ranked if r.plan.pp > 1]
    assert all(r.plan.pp <= len(desc.layers) for r in pipes)
    if len(desc.layers) >= world:
        assert any(r.plan.pp == world for r in pipes)


def test_a_million_row_embedding_is_sharded_under_a_limit(described):
    """4M f32 parameters: 16 MB of weights, 16 MB of gradients, 32 MB of AdamW moments on one rank. Under a limit
    below that only plans that shard them fit. With no transformer block to wrap, FSDP's one unit is the whole
    model, gathered whole (with its unsharded gradients and their reduce-scatter copy) from forward to backward,
    so FSDP over 4 ranks alone (64 MB) does not fit 56 MB; FSDP over the two ranks of a pipeline stage does."""
    desc = described["big vocab"]
    params = desc.params
    whole = predict(Plan(batch=8), desc, Unit(desc), FREE).memory_bytes
    assert whole >= 4 * params * FP32
    limit = 0.7 * whole
    ranked = search(desc, Flops(desc), FIT, world_size=4, batch=8, memory_limit=limit)
    for r in ranked:
        _valid(r, desc, 4, limit)
        assert r.plan.dp_shard > 1 or r.plan.zero, r.plan.label()
    assert {r.plan.label().split("-")[0] for r in ranked} == {"pp2"}
    sharded = predict(Plan(batch=8, dp_shard=4), desc, Unit(desc), FREE).memory[0]
    assert sharded["parameters"] == pytest.approx(params * FP32 / 4)
    assert sharded["optimizer"] == pytest.approx(2 * params * FP32 / 4)
    assert choose(ranked).prediction.memory_bytes <= limit
    with pytest.raises(PlanError, match="memory_limit=.* no plan of .* fits"):
        search(desc, Flops(desc), FIT, world_size=4, batch=8, memory_limit=params * FP32 / 8)


def test_heterogeneous_stages_hold_their_own_widths(described):
    """The funnel's attention block at width 32 holds 4288 parameters, the one at 16 holds 1120: a pipeline
    rank holds the parameters of the blocks it runs, not an average."""
    desc = described["funnel"]
    n = len(desc.layers)
    pred = predict(Plan(batch=2, pp=2, microbatches=2, bounds=(0, 1, n)), desc, Unit(desc), FREE)
    assert pred.memory[0]["parameters"] == (2 * 32 + 4 * 32 * 32 + 4 * 32) * FP32
    assert pred.memory[0]["parameters"] + pred.memory[1]["parameters"] == desc.params * FP32


@pytest.mark.parametrize("heads, d, vocab, n_layer, world", [(3, 24, 50, 3, 6), (5, 40, 64, 5, 10),
                                                               (1, 16, 30, 2, 4), (6, 48, 66, 6, 12)])
def test_gpt_shapes_no_round_used_give_only_dividing_plans(heads, d, vocab, n_layer, world):
    """Heads 3, 5, 1, 6; odd vocabularies; block counts 3 and 5 that few stage counts divide; 4 to 12 ranks."""
    desc = describe_transformer(n_layer=n_layer, d=d, n_head=heads, vocab=vocab, seq=12)
    ranked = search(desc, Flops(desc), FIT, world_size=world, batch=world * 2, max_microbatches=4)
    assert ranked
    for r in ranked:
        _valid(r, desc, world)
        assert n_layer % r.plan.n_stages == 0
    tps = {r.plan.tp for r in ranked}
    assert tps <= {t for t in range(1, world + 1) if heads % t == 0 and d % t == 0 and vocab % t == 0}


def test_search_refuses_bad_arguments_before_any_prediction(described):
    desc = described["lora"]
    calls = []

    class Counting(Unit):
        def _times(self, layer, index, micro_batch, tp):
            calls.append(index)
            return 1.0, 2.0

    unit = Counting(desc)
    for call, match in [
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, kinds=["ep"]),
         "search: kinds=\\['ep'\\]; expected keywords of enumerate_plans"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, max_micro_batches=4), "max_micro_batches=4"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, zero="yes"), "zero='yes'; expected True"),
        (lambda: enumerate_plans(desc, 2, 4, zero=1), "zero=1"),
        (lambda: search(desc, unit, FREE, world_size=0, batch=4), "world_size=0; expected a positive int"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, memory_limit=-1), "memory_limit=-1"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, memory_limit=[1e9, -1e9]), "memory_limit="),
        (lambda: search(desc, unit, FREE, world_size=2, batch=0), "batch=0"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, schedules=["zb-v"]), "schedules=\\['zb-v'\\]"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, recompute="partial"), "recompute=\\['partial'\\]"),
        (lambda: search(desc, unit, FREE, world_size=2, batch=4, rank_by="mfu"), "rank_by='mfu'"),
        (lambda: predict(Plan(batch=6, dp=4), desc, unit, FREE), "batch=6 is not divisible by dp\\*dp_shard"),
        (lambda: predict(Plan(batch=4, pp=2, microbatches=2, bounds=(0, 5, 5)), desc, unit, FREE), "bounds="),
        (lambda: predict(Plan(batch=4, pp=6, microbatches=2), desc, unit, FREE), "6 pipeline stages for 5 layers"),
        (lambda: predict(Plan(batch=4, tp=2), desc, unit, FREE), "tp=2 does not split"),
    ]:
        with pytest.raises(PlanError, match=match):
            call()
    assert calls == []                                               # refused before any layer was timed


def test_keyword_only_and_unrunnable_modules_are_refused_by_name():
    from plan_models_round3 import KeywordOnly
    with pytest.raises(PlanError, match="KeywordOnly\\(example_input\\) failed \\(TypeError: .*attention_mask"):
        describe_module(KeywordOnly(), torch.randn(2, 4))
    module, x = MODELS["lstm"]
    with pytest.raises(PlanError, match="example_input holds NaN"):
        describe_module(MODELS["wavenet"][0], torch.full((2, 1, 16), math.nan))
    with pytest.raises(PlanError, match="example_input=float"):
        describe_module(module, 3.0)


def test_meta_tensors_and_sparse_embeddings_are_refused_by_name():
    """A model built on the meta device (weights not materialized) gave a RuntimeError from the NaN check, and
    with a real input would have counted no activations (every meta storage is at address 0); an embedding with
    sparse=True was planned with dense gradients and AdamW, which refuses sparse ones."""
    from torch import nn
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for x in (torch.randn(2, 8, device="meta"), torch.randn(2, 8)):
        with pytest.raises(PlanError, match="2 tensors on the meta device|4 tensors on the meta device"):
            describe_module(meta, x)
    real = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(PlanError, match="example_input is on the meta device"):
        describe_module(real, torch.randn(2, 8, device="meta"))
    sparse = nn.Sequential(nn.Embedding(100, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(PlanError, match="sparse=True \\(\\['0'\\]\\); expected dense gradients"):
        describe_module(sparse, torch.randint(0, 100, (2, 3)))


def test_a_plan_chosen_for_an_unseen_gpt_shape_trains_like_one_process():
    """3 heads, a vocabulary of 50, 3 blocks, sequences of 12 in a table of 16: on 2 ranks tp=2 and pp=2 cannot
    split it, so the search ranks data-parallel plans; the chosen one, run by the real Trainer on 2 gloo ranks,
    gives the single process's losses."""
    from plan_workers_round3 import CFG, SEQ, reference_losses, train_plan

    from tilestack.parallel import ModelConfig, run_local
    desc = describe_gpt(ModelConfig(**CFG), SEQ)
    ranked = search(desc, Flops(desc), FIT, world_size=2, batch=4, recompute=["none"], zero=True)
    labels = {r.plan.label() for r in ranked}
    assert all(r.plan.tp == 1 and r.plan.pp == 1 for r in ranked), labels
    best = next(r for r in ranked if r.prediction.runnable)
    kw = best.plan.parallel_kwargs()
    losses = run_local(train_plan, 2, (kw,), timeout_s=300)
    ref = reference_losses()
    for rank_losses in losses:
        assert rank_losses == pytest.approx(ref, rel=1e-4, abs=1e-5), best.plan.label()


def test_enumerate_keywords_are_what_enumerate_plans_takes():
    import inspect
    params = inspect.signature(enumerate_plans).parameters
    assert set(ENUMERATE_KW) == {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_module_batches_are_per_sample(described):
    """The million-row embedding's ids are 7 tokens: its activations are the int64 ids it keeps, per sample."""
    desc = described["big vocab"]
    assert desc.layers[0].act_bytes["none"] == 7 * 8
    assert _args(MODELS["big vocab"][1])[0].shape == (2, 7)


@pytest.mark.parametrize("name", ["funnel", "unrolled", "wavenet", "frozen encoder"])
def test_alpa_on_unseen_modules_equals_brute_force(name, described):
    """Heterogeneous widths, a cell shared by every step, once-per-micro-batch saved weights, frozen layers: the
    DP over cuts and sub-meshes finds brute force's latency, on 3 and 4 devices, with and without a limit."""
    from tilestack.parallel.plan import alpa_stages, brute_force_stages
    from tilestack.parallel.plan.search import plan_stage_cost
    desc = described[name]
    whole = predict(Plan(batch=8), desc, Flops(desc), FIT).memory_bytes
    for n_devices, sizes in ((3, (1, 2, 3)), (4, (1, 2, 4))):
        for limit in (None, 0.9 * whole):
            cost = plan_stage_cost(desc, Flops(desc), FIT, batch=8, microbatches=4, memory_limit=limit)
            kw = dict(n_devices=n_devices, submeshes=sizes, microbatches=4, stage_cost=cost)
            try:
                brute = brute_force_stages(len(desc.layers), **kw)
            except PlanError:
                with pytest.raises(PlanError):
                    alpa_stages(len(desc.layers), **kw)
                continue
            dp = alpa_stages(len(desc.layers), **kw)
            assert dp.latency == pytest.approx(brute.latency, rel=1e-12)
            assert sum(d for _, _, d, _ in dp.stages) == n_devices


def test_a_pipeline_cut_between_decoder_blocks_sends_the_encoders_output_too():
    """The decoder block after the cut receives its input (5 x 8 f32 per sample) and the encoder's output it
    attends to (4 x 8): the stage boundary, its send and the receive buffers of both stages are both tensors.
    The previous block's output alone was counted, under-predicting them by the encoder's output."""
    from plan_models_round3 import EncoderDecoder
    torch.manual_seed(0)
    src, tgt = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    desc = describe_module(EncoderDecoder(), (src, tgt))
    assert [layer.name for layer in desc.layers] == ["enc.0", "enc.1", "dec.0", "dec.1", "head"]
    assert desc.layers[3].in_bytes == (5 * 8 + 4 * 8) * FP32                  # y and memory
    assert desc.layers[3].in_bytes > desc.layers[2].out_bytes == 5 * 8 * FP32
    m, b = 2, 3
    pred = predict(Plan(batch=m * b, pp=2, microbatches=m, bounds=(0, 3, 5)), desc, Unit(desc), FREE)
    edge = m * b * (5 * 8 + 4 * 8) * FP32
    assert pred.memory[0]["transient"] == edge and pred.memory[1]["transient"] == edge
    # a cut after the encoder: the decoder receives the target and the encoder's output, as its first block does
    enc_cut = predict(Plan(batch=m * b, pp=2, microbatches=m, bounds=(0, 2, 5)), desc, Unit(desc), FREE)
    assert enc_cut.memory[1]["transient"] == m * b * (5 * 8 + 4 * 8) * FP32
