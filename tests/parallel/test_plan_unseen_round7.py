"""The planner on models and clusters it was not built around, round 7: memory by hand and against torch.

Models (tests/parallel/plan_models_round7.py): a weight tied across two layers with a parameter-free layer between
them, an MLP with BatchNorm's running statistics, a bf16 model whose first layer is frozen, a model whose layers sit
in a ModuleDict of nested Sequentials (registered out of call order, one weight shared across its entries, a head
tied to the embedding, a frozen BatchNorm), a model of a single layer, pipelines of more stages than layers, and a
GPT of more than one ZeRO bucket per pipeline rank. Parameters, gradients, AdamW's moments, ZeRO's f32 master and
buffers are counted by hand (and against a real AdamW step and a real ZeroOptimizer on a fake process group).

Found and fixed (each test below failed first):
- ZeRO-2 under a pipeline was predicted to keep one bucket (4M elements) of full gradients, as it does without a
  pipeline, where the Trainer reduce-scatters each bucket from gradient hooks as backward makes it; with pp > 1 it
  reduces after the last micro-batch's backward (engine.py: ``overlap=pc.pp == 1``), so every full gradient of the
  rank is alive then: a 2-block GPT of width 640 on pp2-dp2-zero2 held 20.0 MB of gradients on rank 0 where 16.8 MB
  were predicted (predict._memory).

Left as it is (xfail strict): FSDP2 pads each parameter to ceil(dim 0 / dp_shard) rows on every rank, while the
prediction divides the parameters by dp_shard (a fraction of an element where dp_shard does not divide them): the
description keeps no shape per tensor, so the padding (at most a row per tensor and rank) is not known there.
"""

import copy
import math

import pytest
import torch
from plan_models_round2 import FIT, FREE, Unit
from plan_models_round7 import Nested, TiedAcross, batchnorm_mlp, frozen_bf16
from torch import nn

from tilestack.parallel.plan import Plan, PlanError, describe_module, describe_transformer, enumerate_plans, predict
from tilestack.parallel.plan.describe import _loss_of

FP32, BF16 = 4, 2


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _adamw_step(module, x):
    """One real AdamW step on a copy: (parameter bytes, gradient bytes, state bytes without 'step')."""
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    _loss_of(model(x)).backward()
    opt.step()
    grads = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
    state = _nbytes(v for st in opt.state.values() for k, v in st.items() if k != "step")
    return _nbytes(model.parameters()), grads, state


def _mem(plan, desc, comm=FREE):
    return predict(plan, desc, Unit(desc), comm).memory


# ---- a weight tied across layers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(0)
    module, x = TiedAcross(), torch.randn(4, 6)
    return module, x, describe_module(module, x)


def test_a_weight_tied_across_layers_is_counted_once_with_its_gradient(tied):
    """48 parameters (the shared 36 once): 192 bytes of parameters, 192 of gradients and 384 of moments on one rank,
    what a real AdamW step leaves to the byte; the second user names the weight as shared with its owner."""
    module, x, desc = tied
    assert [(layer.name, layer.params) for layer in desc.layers] == [("a", 42), ("act", 0), ("b", 6)]
    assert [(p.owner, p.numel) for p in desc.layers[2].shared] == [(0, 36)]
    mem = _mem(Plan(batch=4), desc)[0]
    params, grads, state = _adamw_step(module, x)
    assert mem["parameters"] == params == 48 * FP32
    assert mem["gradients"] == grads == 48 * FP32
    assert mem["optimizer"] == state == 2 * 48 * FP32


@pytest.mark.parametrize("bounds, held", [((0, 1, 3), (42, 42)), ((0, 2, 3), (42, 42))])
def test_a_tied_weight_split_by_a_pipeline_is_held_by_both_ranks(bounds, held, tied):
    """Cut between the two users: rank 0 holds a (42), rank 1 b's bias and a copy of the weight (6 + 36), each with
    its gradients and moments; the copies' gradients are all-reduced once a step between the two ranks: the data-
    parallel term is that all-reduce of 144 bytes plus the loss's (4 bytes) over pp = 2 (FIT: 2e-5 s + 1e-10 s/B)."""
    _, _, desc = tied
    pred = predict(Plan(batch=4, pp=2, microbatches=2, bounds=bounds), desc, Unit(desc), FIT)
    for r, n in enumerate(held):
        assert pred.memory[r]["parameters"] == pred.memory[r]["gradients"] == n * FP32, r
        assert pred.memory[r]["optimizer"] == 2 * n * FP32, r
    assert pred.terms["dp comm"] == pytest.approx(2e-5 + 1e-10 * 36 * FP32 + 2e-5 + 1e-10 * FP32, rel=1e-12)


# ---- BatchNorm's buffers: memory, no optimizer state -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bn():
    torch.manual_seed(0)
    module, x = batchnorm_mlp(), torch.randn(6, 5)
    return module, x, describe_module(module, x)


def test_batchnorm_buffers_are_memory_but_no_optimizer_state(bn):
    """47 parameters, 40 bytes of buffers (2 x 4 f32 + one int64) on the BatchNorm's layer; a one-rank plan holds
    188 + 40 bytes of weights and statistics, AdamW's state of the 47 parameters only (a real step: 376 bytes), and
    describing did not move the running statistics."""
    module, x, desc = bn
    assert [layer.buffer_bytes for layer in desc.layers] == [0.0, 40.0, 0.0, 0.0]
    assert torch.equal(module[1].running_mean, torch.zeros(4)) and int(module[1].num_batches_tracked) == 0
    mem = _mem(Plan(batch=6), desc)[0]
    params, grads, state = _adamw_step(module, x)
    assert (mem["parameters"], mem["buffers"], mem["gradients"], mem["optimizer"]) == (params, 40, grads, state)
    assert state == 2 * 47 * FP32


@pytest.mark.parametrize("dp", [3, 5, 7])
def test_batchnorm_buffers_are_whole_on_every_rank_under_zero_and_fsdp(dp, bn):
    """ZeRO shards the optimizer state of the 47 parameters (ceil(47 / dp) elements of f32 master and two moments
    a rank), FSDP the parameters (188 / dp bytes), neither the buffers: 40 bytes on every rank; in a pipeline only
    the rank that runs the BatchNorm holds them."""
    _, _, desc = bn
    zero = _mem(Plan(batch=dp, dp=dp, zero=1), desc)[0]
    assert zero["optimizer"] == 12 * math.ceil(47 / dp) and zero["buffers"] == 40
    fsdp = _mem(Plan(batch=dp, dp_shard=dp), desc)[0]
    assert fsdp["parameters"] == pytest.approx(188 / dp) and fsdp["buffers"] == 40
    pipe = _mem(Plan(batch=4, pp=2, microbatches=2, bounds=(0, 2, 4)), desc)
    assert [m["buffers"] for m in pipe] == [40, 0]
    assert [m["parameters"] for m in pipe] == [32 * FP32, 15 * FP32]


# ---- frozen bf16 parameters -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    module, x = frozen_bf16(), torch.randn(6, 5, dtype=torch.bfloat16)
    return module, x, describe_module(module, x)


def test_frozen_bf16_parameters_have_no_gradient_or_moments(frozen):
    """78 bytes of bf16 parameters (48 frozen); gradients and AdamW's bf16 moments of the trained 15 only: 30 and
    60 bytes, what a real AdamW step on this CPU leaves; a pipeline rank of the frozen layer alone holds no gradient
    and no state."""
    module, x, desc = frozen
    assert [(layer.params, layer.frozen, layer.frozen_bytes) for layer in desc.layers] == \
        [(24, 24, 48.0), (0, 0, 0.0), (15, 0, 0.0)]
    mem = _mem(Plan(batch=6), desc)[0]
    params, grads, state = _adamw_step(module, x)
    assert (mem["parameters"], mem["gradients"], mem["optimizer"]) == (params, grads, state) == (78, 30, 60)
    pipe = _mem(Plan(batch=6, pp=2, microbatches=2, bounds=(0, 1, 3)), desc)
    assert [(m["parameters"], m["gradients"], m["optimizer"]) for m in pipe] == [(48, 0, 0), (30, 30, 60)]


@pytest.mark.parametrize("dp", [2, 3, 5])
def test_zero_keeps_f32_master_and_moments_of_bf16_trained_parameters(dp, frozen):
    """ZeroOptimizer over the 15 trained bf16 elements: each rank an f32 master slice and two f32 moments of
    ceil(15 / dp) elements (12 bytes each), the frozen layer in no bucket; against a real ZeroOptimizer built on
    torch's fake process group (its master and AdamW state, step excluded)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tilestack.parallel.zero import ZeroOptimizer
    module, x, desc = frozen
    model = copy.deepcopy(module)
    dist.init_process_group("fake", store=FakeStore(), rank=dp - 1, world_size=dp)
    try:
        opt = ZeroOptimizer(model.parameters(), dist.group.WORLD, stage=1,
                            make_optimizer=lambda ps: torch.optim.AdamW(ps))
        _loss_of(model(x)).backward()
        opt.reduce_gradients()
        opt.step()
        real = _nbytes([opt.master]) + _nbytes(v for st in opt.optimizer.state.values() for k, v in st.items()
                                              if k != "step")
    finally:
        dist.destroy_process_group()
    assert opt.master.dtype == torch.float32
    assert _mem(Plan(batch=dp * 2, dp=dp, zero=1), desc)[0]["optimizer"] == real == 12 * math.ceil(15 / dp)


# ---- a ModuleDict of nested Sequentials ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nested():
    torch.manual_seed(0)
    module, x = Nested(), torch.randint(0, 11, (4, 5))
    return module, x, describe_module(module, x)


def test_a_moduledict_of_nested_sequentials_is_described_in_call_order(nested):
    """The ModuleDict's entries by their elements, recursively, in the order they ran (early before late, whatever
    their registration): parameters 88, 72, 10 (frozen), 0, 8 (+ the shared 64), 10, 0, 0 (+ the tied 88), adding
    up to sum(p.numel()) = 188; buffers 48 bytes per BatchNorm (2 x 5 f32 + an int64)."""
    module, x, desc = nested
    assert [layer.name for layer in desc.layers] == [
        "emb", "body.early.0", "body.early.1.0", "body.early.1.1", "body.late.0", "body.late.1.0", "body.late.1.1",
        "head"]
    assert [layer.params for layer in desc.layers] == [88, 72, 10, 0, 8, 10, 0, 0]
    assert desc.params == sum(p.numel() for p in module.parameters()) == 188
    assert [layer.frozen for layer in desc.layers] == [0, 0, 10, 0, 0, 0, 0, 0]
    assert [layer.buffer_bytes for layer in desc.layers] == [0, 0, 48, 0, 0, 48, 0, 0]
    assert [[(p.owner, p.numel) for p in layer.shared] for layer in desc.layers][4:] == [[(1, 64)], [], [], [(0, 88)]]
    mem = _mem(Plan(batch=4), desc)[0]
    params, grads, state = _adamw_step(module, x)
    assert (mem["parameters"], mem["gradients"], mem["optimizer"], mem["buffers"]) == (params, grads, state, 96)
    assert grads == 178 * FP32


@pytest.mark.parametrize("bounds, by_hand", [
    ((0, 4, 8), [(88 + 72 + 10, 160, 48), (8 + 64 + 10 + 88, 170, 48)]),
    ((0, 1, 5, 8), [(88, 88, 0), (72 + 10 + 8, 80, 48), (10 + 88, 98, 48)]),
    ((0, 2, 7, 8), [(160, 160, 0), (10 + 8 + 64 + 10, 82, 96), (88, 88, 0)]),
])
def test_nested_model_pipeline_ranks_by_hand(bounds, by_hand, nested):
    """Per pipeline rank, by hand: (parameter elements held, trained elements, buffer bytes); a rank running the
    late Linear without the early one holds a copy of the shared weight, the head's rank without the embedding a
    copy of the table (88), and only the BatchNorms' ranks their buffers."""
    _, _, desc = nested
    mem = _mem(Plan(batch=4, pp=len(bounds) - 1, microbatches=4, bounds=bounds), desc)
    for r, (held, trained, buffers) in enumerate(by_hand):
        got = (mem[r]["parameters"], mem[r]["gradients"], mem[r]["optimizer"], mem[r]["buffers"])
        assert got == (held * FP32, trained * FP32, 2 * trained * FP32, buffers), r


# ---- one layer; more stages than layers ------------------------------------------------------------------------------

def test_a_single_layer_model_refuses_a_pipeline_by_name():
    """One Linear is one layer: a plan of pp=2 is refused naming the stages and the layers; on two ranks the only
    plans are data-parallel (DDP, ZeRO-1/2) and FSDP; with batch 1 there is none, and the refusal says why."""
    desc = describe_module(nn.Linear(4, 4), torch.randn(3, 4))
    assert len(desc.layers) == 1
    with pytest.raises(PlanError, match="2 pipeline stages for 1 layers"):
        predict(Plan(batch=4, pp=2, microbatches=2), desc, Unit(desc), FREE)
    with pytest.raises(PlanError, match=r"bounds=\(0, 1, 1\); expected 3 increasing"):
        predict(Plan(batch=4, pp=2, microbatches=2, bounds=(0, 1, 1)), desc, Unit(desc), FREE)
    assert {p.label() for p in enumerate_plans(desc, 2, 4)} == {"dp2", "dp2-zero1", "dp2-zero2", "fsdp2"}
    with pytest.raises(PlanError, match=r"batch=1 allows data parallelism of \[1\].* pipelines of \[1\] stages"):
        enumerate_plans(desc, 2, 1)


@pytest.mark.parametrize("pp", [5, 8])
def test_more_pipeline_stages_than_layers_are_refused(pp, bn):
    """4 layers cannot make 5 or 8 stages: refused by name, and never enumerated (world 5: dp and FSDP only)."""
    _, _, desc = bn
    with pytest.raises(PlanError, match=f"{pp} pipeline stages for 4 layers; expected at most one stage per layer"):
        predict(Plan(batch=pp, pp=pp, microbatches=pp), desc, Unit(desc), FREE)
    assert all(p.pp == 1 for p in enumerate_plans(desc, 5, 10))


def test_a_gpt_refuses_more_stages_than_blocks():
    """A GPT of 2 blocks: 4 stages (or 2 x 2 interleaved on 2 ranks... which 2 blocks cannot feed) are refused
    naming the blocks; 2 stages of one block each are fine."""
    desc = describe_transformer(n_layer=2, d=32, n_head=2, vocab=64, seq=8)
    with pytest.raises(PlanError, match="4 pipeline stages do not divide the model's 2 blocks"):
        predict(Plan(batch=4, pp=4, microbatches=4), desc, Unit(desc), FREE)
    with pytest.raises(PlanError, match="4 pipeline stages do not divide"):
        predict(Plan(batch=4, pp=2, microbatches=2, schedule="interleaved-1f1b", stages_per_rank=2), desc,
                Unit(desc), FREE)
    assert predict(Plan(batch=4, pp=2, microbatches=2), desc, Unit(desc), FREE).step_s > 0


# ---- ZeRO-2 under a pipeline: every full gradient is alive ----------------------------------------------------------

def test_zero2_in_a_pipeline_keeps_all_full_gradients_until_it_reduces():
    """A GPT of 2 blocks of width 640 (4,923,520 elements each), vocabulary 128, sequence 4, pp2-dp2-zero2: rank 0
    trains the embedding (128 + 4) x 640 and block 0, 5,008,000 elements, more than one 4M-element ZeRO bucket.
    The Trainer reduces them after the last micro-batch's backward (no gradient hooks under a pipeline), so all
    5,008,000 f32 gradients are alive then, as under ZeRO-1: 20,032,000 bytes (16,777,216, one bucket, before).
    Without a pipeline ZeRO-2 frees each bucket's as it reduces it: one bucket's worth."""
    desc = describe_transformer(n_layer=2, d=640, n_head=5, vocab=128, seq=4)
    rank0 = (128 + 4) * 640 + 12 * 640 * 640 + 13 * 640
    assert rank0 == 5_008_000
    for zero in (1, 2):
        mem = _mem(Plan(batch=4, pp=2, dp=2, zero=zero, microbatches=2), desc)
        assert mem[0]["gradients"] == rank0 * FP32, zero
        assert mem[0]["optimizer"] == 12 * math.ceil(rank0 / 2), zero
    flat = _mem(Plan(batch=4, dp=2, zero=2), desc)[0]
    assert flat["gradients"] == (1 << 22) * FP32


# ---- FSDP2's padding per tensor --------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="FSDP2 pads each parameter's dim 0 to a multiple of dp_shard on every rank "
                   "(ceil(rows / dp_shard) rows a rank); the prediction divides the elements by dp_shard, and the "
                   "description keeps no shape per tensor to pad by")
@pytest.mark.parametrize("shard", [3, 5])
def test_fsdp_parameters_per_rank_are_padded_per_tensor(shard, bn):
    """Linear(5, 4) (4 rows of 5, bias 4), BatchNorm1d(4) (weight 4, bias 4), Linear(4, 3) (3 rows of 4, bias 3):
    each rank holds ceil(rows / shard) rows of every tensor, f32."""
    _, _, desc = bn
    rows = [(4, 5), (4, 1), (4, 1), (4, 1), (3, 4), (3, 1)]
    by_hand = sum(math.ceil(r / shard) * c for r, c in rows) * FP32
    assert _mem(Plan(batch=shard, dp_shard=shard), desc)[0]["parameters"] == by_hand
