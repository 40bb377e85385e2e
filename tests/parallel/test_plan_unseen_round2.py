"""The planner on models it was not built around, round 2, and the invariants any plan must keep.

Unseen models: a decoder whose feed-forward is a top-k mixture of experts (8 experts, top-1 and top-2, one
expert never routed to), a T5-like encoder-decoder (pre-norm RMSNorm, a relative position bias computed once and
passed to every encoder block, cross-attention, the embedding tied to the head), a ViT (a patch convolution, a
class token and position table of the root's own), a MobileNet-like conv net (depthwise and pointwise
convolutions, BatchNorm), an ALBERT-like model (one block applied four times), a tied GPT-like model, a very
wide MLP, 200 layers, a model with bf16 and f32 parameters. GPT shapes by formula: heads that a tensor-parallel
degree does not divide, sequences that a sequence-parallel degree does not divide, batch 1, 1 to 64 GPUs
(6, 12, 24 among them). Checked against torch on this CPU: parameter, gradient, AdamW and buffer bytes after a
real step, saved activations. Invariants: memory grows with the batch, recompute trades time for memory, more
data parallelism never adds activations per GPU, nothing over the limit is chosen, the choice is the best
enumerated plan, the search is deterministic. Alpa's DP: 100-200 layers plan in seconds (it took 36 s for
100). Bad inputs: a PlanError naming the argument.

Found and fixed (each test below failed first):
- a weight used by two layers (tied embedding and head, a block applied twice) was counted on the first layer's
  pipeline stage only: a later stage that runs it held no copy (LayerDesc.shared, predict), nor all-reduced its
  gradients with the owner's stage; a window of layers (Alpa's stage cost) counts the copies its layers use;
- sequence parallelism was planned on sequences its degree does not divide (Plan.check, enumerate_plans);
- a module whose parameters are of several dtypes had all its bytes counted at the first parameter's size
  (LayerDesc.param_bytes);
- Alpa's DP re-predicted every layer range and ran a DP per candidate stage time (plan_stage_cost keys ranges by
  their runs of equal layers; alpa_stages bisects the candidates and runs each DP over arrays);
- plan_stage_cost dropped the samples of a batch that its micro-batch count does not divide, and took a negative
  memory limit (every stage then "did not fit");
- alpa_stages took a stage cost's NaN time as "does not fit" and a bare number as a TypeError; both now name the
  stage_cost call and what it gave.
Added: search's memory_limit may be one limit per GPU (GPUs of different memories), checked against brute force
over every placement of the pipeline ranks.
"""

import math

import pytest
import torch
from plan_models_round2 import BF16, FIT, FP32, FREE, MODELS, Flops, Unit, _args
from torch import nn

from tilestack.parallel.plan import (
    Plan,
    PlanError,
    alpa_stages,
    choose,
    describe_module,
    describe_transformer,
    enumerate_plans,
    predict,
    search,
)
from tilestack.parallel.plan.search import plan_stage_cost


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


# ---- descriptions against torch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_describe_counts_every_parameter_once_and_leaves_the_module_as_it_was(name, described):
    module, x = MODELS[name]
    desc = described[name]
    assert desc.params == sum(p.numel() for p in module.parameters())
    assert sum(layer.tensors for layer in desc.layers) == len(list(module.parameters()))
    for layer in desc.layers:
        values = [layer.flops_fwd, layer.matmul_flops, layer.out_bytes, layer.buffer_bytes, *layer.act_bytes.values()]
        assert all(math.isfinite(v) and v >= 0 for v in values), layer
    state = {k: v.clone() for k, v in module.state_dict().items()}
    describe_module(module, x)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _real_step(module, x):
    """Parameter, gradient, AdamW moment and buffer bytes after one real AdamW step on this CPU (each tensor
    once), and the bytes autograd saved for the step's backward."""
    import copy

    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan.describe import _loss_of
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # buffers are not activations (BatchNorm's backward takes its running statistics, which autograd then saves)
    saved = saved_activation_bytes(lambda: _loss_of(model(*_args(x))), [*model.parameters(), *model.buffers()])
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)     # noqa: E731
    moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return dict(parameters=nbytes(model.parameters()), gradients=nbytes(p.grad for p in model.parameters()
                                                                         if p.grad is not None),
                optimizer=nbytes(moments), buffers=nbytes(model.buffers()), saved=saved)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "moe top-1"])
def test_one_rank_bytes_equal_a_real_adamw_step(name, described):
    """Parameters, gradients, AdamW's two moments and buffers of a one-rank plan, to the byte, against the tensors
    a real step leaves (every expert is routed some tokens here, so every parameter has a gradient); the
    activations against what autograd saved."""
    module, x = MODELS[name]
    desc = described[name]
    real = _real_step(module, x)
    batch = _args(x)[0].shape[0]
    mem = predict(Plan(batch=batch), desc, Unit(desc), FREE).memory[0]
    for part in ("parameters", "gradients", "optimizer", "buffers"):
        assert mem[part] == real[part], part
    assert mem["activations"] == pytest.approx(real["saved"], rel=1e-9)


def test_an_expert_never_routed_to_is_still_held(described):
    """Top-1 over 8 experts and 12 tokens leaves some experts without tokens: their weights are held (and counted)
    on the rank all the same; FLOPs follow the routing, so top-2 does more expert work than top-1."""
    module, x = MODELS["moe top-1"]
    flat = module.embed(x).reshape(-1, 16)
    routed = set(module.blocks[0].moe.router(module.blocks[0].n2(flat)).argmax(-1).tolist())
    assert len(routed) < 8
    one, two = described["moe top-1"], described["moe top-2"]
    assert one.params == two.params == sum(p.numel() for p in module.parameters())
    blocks = lambda d: sum(layer.flops_fwd for layer in d.layers if layer.name.startswith("blocks"))   # noqa: E731
    assert blocks(two) > blocks(one)


def test_layer_order_and_shared_calls(described):
    t5 = described["t5"]
    assert [layer.name for layer in t5.layers] == ["shared", "rel", "encoder.0", "encoder.1", "shared#2", "rel#2",
                                                   "decoder.0", "decoder.1", "lm_head"]
    assert [layer.params for layer in t5.layers if "#" in layer.name or layer.name == "lm_head"] == [0, 0, 0]
    albert = described["albert"]
    assert [layer.name for layer in albert.layers] == ["embed", "block", "block#2", "block#3", "block#4", "head"]
    assert [layer.params for layer in albert.layers][1:5] == [16 * 32 + 32 + 32 * 16 + 16, 0, 0, 0]
    assert len({layer.flops_fwd for layer in albert.layers[1:5]}) == 1 and albert.layers[4].flops_fwd > 0
    vit = described["vit"]
    assert vit.layers[0].name == "patch" and vit.layers[0].params == 16 * 3 * 16 + 16 + 16 + 5 * 16  # + cls, pos
    assert described["mobilenet"].layers[1].buffer_bytes > 0


@pytest.mark.parametrize("name, pp", [("albert", 2), ("albert", 3), ("tied", 2), ("tied", 3), ("t5", 2)])
def test_a_weight_used_on_two_stages_is_held_by_both(name, described, pp):
    """Every pipeline stage that runs a layer holds its weights, even when an earlier layer on another stage owns
    them (the tied head, the second call of a shared block): the stage's parameters, gradients and moments are
    those of the distinct tensors its layers use."""
    module, x = MODELS[name]
    desc = described[name]
    pred = predict(Plan(batch=2, pp=pp, microbatches=2), desc, Unit(desc), FREE)
    bounds = Plan(batch=2, pp=pp, microbatches=2).stage_bounds(desc)
    names = [layer.name.split("#")[0] for layer in desc.layers]
    # the tensors each stage's layers use: the layers by name (a second call, name#2, is the same module)
    by_name = dict(module.named_modules())
    for s in range(pp):
        used = {id(p): p for i in range(bounds[s], bounds[s + 1]) for p in by_name[names[i]].parameters()}
        if s == 0:                                    # the root's own parameters (none here but ViT's) go first
            used |= {id(p): p for p in module.parameters(recurse=False)}
        nbytes = sum(p.numel() * p.element_size() for p in used.values())
        assert pred.memory[s]["parameters"] == nbytes, s
        assert pred.memory[s]["gradients"] == nbytes and pred.memory[s]["optimizer"] == 2 * nbytes


@pytest.mark.parametrize("name", ["tied", "albert", "t5"])
def test_a_window_of_layers_holds_the_weights_its_layers_use(name, described):
    """Alpa's stage cost predicts a window [k, i) of the model's layers (its compute model offset by k): a window
    holds the weights its layers use, whether their owner is inside it or not."""
    from tilestack.parallel.plan.search import _Offset
    module, _ = MODELS[name]
    desc = described[name]
    by_name = dict(module.named_modules())
    for k in range(len(desc.layers)):
        for i in range(k + 1, len(desc.layers) + 1):
            sub = type(desc)(**{**desc.__dict__, "layers": desc.layers[k:i]})
            mem = predict(Plan(batch=2), sub, _Offset(Unit(desc), k), FREE).memory[0]
            used = {id(p): p for layer in sub.layers for p in by_name[layer.name.split("#")[0]].parameters()}
            if k == 0:
                used |= {id(p): p for p in module.parameters(recurse=False)}
            assert mem["parameters"] == sum(p.numel() * p.element_size() for p in used.values()), (k, i)


def test_a_tied_weight_on_two_stages_has_its_gradients_all_reduced_between_them(described):
    """Megatron's embedding group: the stage that holds the tied copy and the owner's stage all-reduce its
    gradients once a step (one all-reduce over 2 ranks of the weight's bytes); without a pipeline there is no
    copy and nothing to reduce."""
    import dataclasses
    desc = described["tied"]
    untied = dataclasses.replace(desc, layers=tuple(dataclasses.replace(layer, shared=()) for layer in desc.layers))
    weight = 64 * 16 * FP32
    for kw, extra in ((dict(pp=2, microbatches=2), FIT.time("all_reduce", weight, 2, stride=1)), (dict(), 0.0)):
        tied = predict(Plan(batch=4, **kw), desc, Unit(desc), FIT).terms["dp comm"]
        plain = predict(Plan(batch=4, **kw), untied, Unit(untied), FIT).terms["dp comm"]
        assert tied - plain == pytest.approx(extra, rel=1e-9, abs=1e-15), kw
    wide = Plan(batch=4, pp=2, dp=2, microbatches=2)           # the copy's gradients also go round dp
    assert predict(wide, desc, Unit(desc), FIT).terms["dp comm"] > \
        predict(wide, untied, Unit(untied), FIT).terms["dp comm"] + FIT.time("all_reduce", weight, 2, stride=2)


def test_mixed_dtype_parameters_are_counted_at_their_own_size(described):
    desc = described["mixed dtypes"]
    mem = predict(Plan(batch=2), desc, Unit(desc), FREE).memory[0]
    assert mem["parameters"] == (8 * 32 + 32 + 32 * 4 + 4) * FP32 + (32 * 32 + 32) * BF16


# ---- GPT shapes by formula: heads, sequences, GPU counts, batch 1 ---------------------------------------------------
@pytest.mark.parametrize("heads, d, tp, ok", [(6, 48, 4, False), (6, 48, 2, True), (6, 48, 3, True), (5, 40, 2, False),
                                              (7, 56, 7, True), (12, 96, 8, False), (3, 48, 3, True)])
def test_head_counts_a_tp_degree_does_not_divide_are_refused_by_name(heads, d, tp, ok):
    desc = describe_transformer(n_layer=2, d=d, n_head=heads, vocab=d * 7 * 8, seq=8)
    plan = Plan(batch=4, tp=tp)
    if ok:
        assert predict(plan, desc, Flops(desc), FIT).step_s > 0
    else:
        with pytest.raises(PlanError, match=f"tp={tp} does not split .*n_head={heads}"):
            predict(plan, desc, Flops(desc), FIT)
    tps = {p.tp for p in enumerate_plans(desc, tp, 4 * tp)}
    assert (tp in tps) == ok and 1 in tps


@pytest.mark.parametrize("seq, tp, ok", [(30, 4, False), (30, 2, True), (30, 3, True), (17, 2, False),
                                         (32, 4, True)])
def test_sequence_parallel_needs_a_sequence_its_degree_divides(seq, tp, ok):
    desc = describe_transformer(n_layer=2, d=48, n_head=12, vocab=96, seq=seq)
    plan = Plan(batch=4, tp=tp, sp=True)
    if ok:
        assert predict(plan, desc, Flops(desc), FIT).step_s > 0
    else:
        with pytest.raises(PlanError, match=f"sp=True with tp={tp}: seq={seq}"):
            predict(plan, desc, Flops(desc), FIT)
        assert predict(Plan(batch=4, tp=tp), desc, Flops(desc), FIT).step_s > 0      # tp alone is fine
    sp = [p for p in enumerate_plans(desc, tp, 4) if p.sp and p.tp == tp]
    assert bool(sp) == ok


GPT24 = describe_transformer(n_layer=24, d=96, n_head=12, vocab=192, seq=24)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 6, 7, 12, 24, 48, 64])
def test_search_on_one_to_sixty_four_gpus(world):
    """Non-powers of two among them: every plan has that many ranks, splits the blocks and heads it claims to,
    the choice fits, and a world no layout splits (5 or 7 ranks: 24 blocks, 12 heads, batch 48 are not
    divisible by them) plans data parallelism over a batch it divides, or says why not."""
    batch = 48 if world not in (5, 7) else 35 * (world // 5 + world // 7)
    ranked = search(GPT24, Flops(GPT24), FIT, world_size=world, batch=batch, recompute=("none", "full"))
    for r in ranked[:50]:
        assert r.plan.world_size == world and batch % (r.plan.dp * r.plan.dp_shard * r.plan.microbatches) == 0
        assert 24 % r.plan.n_stages == 0 and 12 % r.plan.tp == 0
    assert choose(ranked) is ranked[0]


def test_a_model_too_big_for_a_batch_of_one_is_refused_naming_the_limit():
    desc = describe_transformer(n_layer=4, d=64, n_head=4, vocab=128, seq=16)
    ranked = search(desc, Flops(desc), FIT, world_size=4, batch=1)
    assert {(r.plan.dp, r.plan.dp_shard, r.plan.microbatches) for r in ranked} == {(1, 1, 1)}
    assert {r.plan.label() for r in ranked} >= {"pp4-gpipe-m1", "tp4", "pp2-tp2-gpipe-m1"}
    with pytest.raises(PlanError, match="no plan of world_size=32 fits batch=1"):
        search(desc, Flops(desc), FIT, world_size=32, batch=1)   # at most 4 stages x tp 4, no data to split
    with pytest.raises(PlanError, match="memory_limit=1000 bytes per rank; no plan of"):
        search(desc, Flops(desc), FIT, world_size=4, batch=1, memory_limit=1000)


def test_batch_one_of_a_module(described):
    desc = described["batch 1"]
    assert {r.plan.label() for r in search(desc, Unit(desc), FREE, world_size=2, batch=1)} == {"pp2-gpipe-m1"}
    assert [r.plan.label() for r in search(desc, Unit(desc), FREE, world_size=1, batch=1)] == ["single"]


# ---- invariants ------------------------------------------------------------------------------------------------------
INVARIANT_MODELS = ["moe top-2", "t5", "vit", "mobilenet", "albert"]
GPT8 = describe_transformer(n_layer=8, d=64, n_head=8, vocab=128, seq=32)


@pytest.mark.parametrize("kw", [dict(), dict(dp=2), dict(dp_shard=2), dict(dp=2, zero=2), dict(tp=2, sp=True),
                                dict(pp=2, microbatches=2), dict(pp=2, schedule="gpipe", microbatches=2,
                                                                  recompute="full")])
def test_memory_grows_with_the_batch(kw):
    peaks = [predict(Plan(batch=b, **kw), GPT8, Flops(GPT8), FIT) for b in (4, 8, 16, 32)]
    for a, b in zip(peaks, peaks[1:], strict=False):
        assert b.memory_bytes >= a.memory_bytes
        assert all(y["activations"] >= x["activations"] for x, y in zip(a.memory, b.memory, strict=True))
    assert peaks[-1].memory_bytes > peaks[0].memory_bytes


@pytest.mark.parametrize("name", INVARIANT_MODELS)
def test_memory_of_a_module_grows_with_the_batch(name, described):
    desc = described[name]
    for kw in (dict(), dict(dp=2), dict(pp=2, microbatches=2)):
        preds = [predict(Plan(batch=b, **kw), desc, Unit(desc), FREE) for b in (2, 4, 8)]
        peaks = [p.memory_bytes for p in preds]
        assert peaks == sorted(peaks)                   # (the gradients may be the peak: then it stays)
        acts = [p.memory[0]["activations"] for p in preds]
        assert acts[0] < acts[1] < acts[2]


@pytest.mark.parametrize("kw", [dict(), dict(dp=2), dict(tp=2), dict(tp=2, sp=True), dict(dp_shard=2),
                                dict(pp=2, microbatches=4), dict(pp=2, microbatches=4, schedule="gpipe")])
def test_recompute_lowers_memory_and_raises_time(kw):
    preds = {rc: predict(Plan(batch=8, recompute=rc, **kw), GPT8, Flops(GPT8), FIT)
             for rc in ("none", "selective", "full")}
    assert preds["full"].memory_bytes < preds["selective"].memory_bytes < preds["none"].memory_bytes
    assert preds["full"].step_s > preds["selective"].step_s > preds["none"].step_s


@pytest.mark.parametrize("desc_name", ["gpt", "vit", "moe top-2", "mobilenet"])
def test_more_data_parallelism_never_adds_activations_per_gpu(desc_name, described):
    desc = GPT8 if desc_name == "gpt" else described[desc_name]
    compute = Flops(desc) if desc_name == "gpt" else Unit(desc)
    for kind in ("dp", "dp_shard"):
        last = math.inf
        for n in (1, 2, 4, 8):
            mem = predict(Plan(batch=8, **{kind: n}), desc, compute, FIT).memory[0]["activations"]
            assert mem <= last
            last = mem


@pytest.mark.parametrize("limit_share", [1.0, 0.6, 0.35, 0.2])
def test_nothing_over_the_limit_is_chosen_and_the_choice_is_the_best_enumerated(limit_share):
    """Every plan enumerated, predicted here once more: those over the limit are not ranked, and the first ranked
    is the fastest of those under it; a tighter limit never gives a faster choice."""
    compute = Flops(GPT8)
    preds = [predict(p, GPT8, compute, FIT) for p in enumerate_plans(GPT8, 4, 16)]
    peaks = sorted(p.memory_bytes for p in preds)
    limit = peaks[0] + limit_share * (peaks[-1] - peaks[0])
    ranked = search(GPT8, compute, FIT, world_size=4, batch=16, memory_limit=limit)
    fits = [p for p in preds if p.memory_bytes <= limit]
    assert {r.plan for r in ranked} == {p.plan for p in fits}
    assert all(r.prediction.memory_bytes <= limit for r in ranked)
    assert ranked[0].step_s == min(p.step_s for p in fits)
    assert [r.step_s for r in ranked] == sorted(r.step_s for r in ranked)
    looser = search(GPT8, compute, FIT, world_size=4, batch=16, memory_limit=peaks[-1])
    assert looser[0].step_s <= ranked[0].step_s


def test_search_is_deterministic(described):
    for desc, compute in ((GPT24, Flops(GPT24)), (described["t5"], Unit(described["t5"]))):
        runs = [search(desc, compute, FIT, world_size=6, batch=12) for _ in range(2)]
        assert [(r.plan, r.step_s, r.prediction.memory_bytes) for r in runs[0]] == \
            [(r.plan, r.step_s, r.prediction.memory_bytes) for r in runs[1]]
    again = describe_module(*MODELS["vit"])
    assert again == described["vit"]


# ---- bad inputs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=0, batch=4), "world_size=0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=-4, batch=4), "world_size=-4"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2.0, batch=4), "world_size=2.0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=-8), "batch=-8"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=0), "batch=0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, schedules=["pipedream"]), "schedules=\\['pipe"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, recompute=["offload"]), "recompute=\\['off"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, recompute=[]), "recompute=\\[\\]"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, rank_by="speed"), "rank_by='speed'"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, memory_limit=-1), "memory_limit=-1"),
    (lambda: enumerate_plans(GPT8, 0, 4), "world_size=0"),
    (lambda: enumerate_plans(GPT8, 2, -1), "batch=-1"),
    (lambda: predict(Plan(batch=-2), GPT8, Unit(GPT8), FREE), "batch=-2"),
    (lambda: predict(Plan(batch=4, schedule="zero-bubble", pp=2, microbatches=2), GPT8, Unit(GPT8), FREE),
     "schedule='zero-bubble'"),
    (lambda: predict(Plan(batch=4, tp=-2), GPT8, Unit(GPT8), FREE), "tp=-2"),
    (lambda: alpa_stages(4, n_devices=0, submeshes=(1,), microbatches=2, stage_cost=lambda *a: (1.0, "x")),
     "n_devices=0"),
    (lambda: alpa_stages(-1, n_devices=2, submeshes=(1,), microbatches=2, stage_cost=lambda *a: (1.0, "x")),
     "n_layers=-1"),
    (lambda: alpa_stages(3, n_devices=2, submeshes=(1, 2), microbatches=2, stage_cost=lambda *a: (math.nan, "x")),
     "stage_cost\\(0, 1, 1, 0\\) gave \\(nan, 'x'\\)"),
    (lambda: alpa_stages(3, n_devices=2, submeshes=(1, 2), microbatches=2, stage_cost=lambda *a: 1.0),
     "stage_cost\\(0, 1, 1, 0\\) gave 1.0"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=-4, microbatches=2, memory_limit=None), "batch=-4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=2, microbatches=4, memory_limit=None),
     "batch=2 in microbatches=4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=10, microbatches=4, memory_limit=None),
     "batch=10 in microbatches=4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=8, microbatches=4, memory_limit=-1.0),
     "memory_limit=-1.0"),
    (lambda: describe_transformer(n_layer=2, d=48, n_head=0, vocab=96, seq=8), "n_head=0"),
    (lambda: describe_transformer(n_layer=2, d=50, n_head=6, vocab=96, seq=8), "d=50 is not divisible by n_head=6"),
    (lambda: describe_module(nn.Linear(4, 4), torch.randn(0, 4)), "example_input=Tensor"),
])
def test_bad_inputs_are_refused_by_name(call, match):
    with pytest.raises(PlanError, match=match):
        call()


class FailsLate(nn.Module):
    """BatchNorm runs (moving its statistics), then the forward fails."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.bn(x))


def test_a_failing_forward_leaves_no_hooks_and_the_statistics_as_they_were():
    model = FailsLate()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="FailsLate\\(example_input\\) failed"):
        describe_module(model, torch.randn(5, 4) * 3 + 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
