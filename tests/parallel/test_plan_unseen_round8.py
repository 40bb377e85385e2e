"""The planner on models and clusters it was not built around, round 8: memory per rank by hand and against torch.

Models (defined here): a layer of bf16 weights and an f32 LayerNorm whose forward takes a keyword and returns a
tuple (a tensor and an int), under a head whose weight is frozen; an MLP whose first layer is frozen; a model of
buffers only (no parameter at all); a model whose parameters sit in an ``nn.ParameterList`` (no layer of their own);
a GPT of 4 blocks counted by formula; a frozen embedding tied to the head across a pipeline cut. Parameters,
gradients, AdamW's moments and ZeRO's f32 master are counted by hand for one rank and under dp (ZeRO-1 / -2 over 2,
3, 4 and 5 ranks), FSDP, tp and pp, against ``predict``'s breakdown, and against a real AdamW step where one rank
holds it all; a memory limit exactly at a plan's predicted peak fits, one byte less does not.

Found and fixed (each test below failed first):
- a layer of parameters of several dtypes (70 bf16 and 20 f32 elements, 220 bytes) was predicted to hold
  220.00000000000003 bytes of parameters and 232.00000000000003 of gradients (n x (param_bytes / params), the
  quotient rounded), where a real AdamW step holds 220 and 232: over a memory limit of exactly the bytes a real step
  holds, which is inclusive (predict._held: the layer's own byte count times the rank's share).
"""

import copy

import pytest
import torch
from plan_models_round2 import FREE, Unit
from torch import nn

from tilestack.parallel.plan import Plan, PlanError, describe_module, describe_transformer, predict, search
from tilestack.parallel.plan.describe import _loss_of

FP32, BF16 = 4, 2
KEYS = ("parameters", "gradients", "optimizer")


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _adamw_step(module, x, **kwargs):
    """One real AdamW step on a copy: (parameter bytes, gradient bytes, state bytes without 'step')."""
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    _loss_of(model(x, **kwargs)).backward()
    opt.step()
    grads = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
    state = _nbytes(v for st in opt.state.values() for k, v in st.items() if k != "step")
    return _nbytes(model.parameters()), grads, state


def _mem(plan, desc):
    return [{k: m[k] for k in KEYS} for m in predict(plan, desc, Unit(desc), FREE).memory]


# ---- bf16 weights, an f32 norm, a keyword argument, a tuple output, a frozen head weight --------------------------

class Mixed(nn.Module):
    """A bf16 Linear(6, 10) (70 elements, 140 bytes) then an f32 LayerNorm(10) (20 elements, 80 bytes)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 10).to(torch.bfloat16)
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        return self.norm(self.fc(x.to(torch.bfloat16)).float())


class MixedNet(nn.Module):
    """Mixed, then an f32 Linear(10, 3) whose weight (30) is frozen and bias (3) trained; forward takes ``temp`` by
    keyword and returns (logits, an int)."""

    def __init__(self):
        super().__init__()
        self.b1 = Mixed()
        self.out = nn.Linear(10, 3)
        self.out.weight.requires_grad_(False)

    def forward(self, x, *, temp=1.0):
        return self.out(self.b1(x)) / temp, 7


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    module, x = MixedNet(), torch.randn(4, 6)
    return module, x, describe_module(module, x, example_kwargs={"temp": 2.0})


def test_mixed_dtype_layers_are_described_by_their_own_bytes(mixed):
    _, _, desc = mixed
    assert [(layer.name, layer.params, layer.param_bytes, layer.frozen, layer.frozen_bytes)
            for layer in desc.layers] == [("b1", 90, 70 * BF16 + 20 * FP32, 0, 0.0), ("out", 33, 132.0, 30, 120.0)]


def test_mixed_dtype_memory_on_one_rank_is_a_real_adamw_step_to_the_byte(mixed):
    """Parameters 140 + 80 + 132 = 352 bytes; gradients and moments of the trained ones in their own dtype:
    220 + 12 = 232 and twice that. Exactly equal (this failed at 232.00000000000003: bug in module docstring)."""
    module, x, desc = mixed
    params, grads, state = _adamw_step(module, x, temp=2.0)
    assert (params, grads, state) == (352, 232, 464)
    assert _mem(Plan(batch=4), desc) == [{"parameters": 352, "gradients": 232, "optimizer": 464}]


def test_mixed_dtype_under_a_pipeline_fsdp_and_zero1(mixed):
    """pp2: rank 0 holds b1 (220 bytes, all trained), rank 1 the head (132 bytes, 12 trained). FSDP over 2 halves
    every figure. ZeRO-1 over 2: 93 trained elements, ceil(93 / 2) = 47 per rank of f32 master + 2 moments."""
    _, _, desc = mixed
    assert _mem(Plan(batch=4, pp=2, microbatches=2), desc) == [
        {"parameters": 220, "gradients": 220, "optimizer": 440}, {"parameters": 132, "gradients": 12, "optimizer": 24}]
    assert _mem(Plan(batch=4, dp_shard=2), desc) == [{"parameters": 176, "gradients": 116, "optimizer": 232}]
    assert _mem(Plan(batch=4, dp=2, zero=1), desc) == [{"parameters": 352, "gradients": 232, "optimizer": 47 * 12}]


def test_a_limit_exactly_at_the_predicted_peak_fits_and_one_byte_less_does_not(mixed):
    _, _, desc = mixed
    peak = predict(Plan(batch=4), desc, Unit(desc), FREE).memory_bytes
    assert peak == int(peak)                               # whole bytes: no rounding residue left in the sum
    ranked = search(desc, Unit(desc), FREE, world_size=1, batch=4, memory_limit=peak)
    assert [r.plan.label() for r in ranked] == ["single"]
    with pytest.raises(PlanError, match="memory_limit"):
        search(desc, Unit(desc), FREE, world_size=1, batch=4, memory_limit=peak - 1)


# ---- an MLP whose first layer is frozen ------------------------------------------------------------------------------

class FrozenFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)               # 56, frozen
        self.b = nn.Linear(8, 3)               # 27, trained
        self.a.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(1)
    module, x = FrozenFirst(), torch.randn(6, 6)
    return module, x, describe_module(module, x)


def test_frozen_parameters_have_no_gradient_and_no_optimizer_state(frozen):
    module, x, desc = frozen
    assert [(layer.params, layer.frozen) for layer in desc.layers] == [(56, 56), (27, 0)]
    assert _adamw_step(module, x) == (83 * FP32, 27 * FP32, 2 * 27 * FP32)
    assert _mem(Plan(batch=6), desc) == [{"parameters": 332, "gradients": 108, "optimizer": 216}]


@pytest.mark.parametrize("plan, expected", [
    # ZeRO-1 over 3: full gradients, f32 master + moments of ceil(27 / 3) = 9 elements (the frozen 56 not counted)
    (Plan(batch=6, dp=3, zero=1), [{"parameters": 332, "gradients": 108, "optimizer": 9 * 12}]),
    # ZeRO-2 over 2: one bucket (27 < 4M) of full gradients alive, ceil(27 / 2) = 14 elements owned
    (Plan(batch=6, dp=2, zero=2), [{"parameters": 332, "gradients": 108, "optimizer": 14 * 12}]),
    # FSDP over 2: everything halved, frozen included in the parameters only
    (Plan(batch=6, dp_shard=2), [{"parameters": 166, "gradients": 54, "optimizer": 108}]),
    # pp2: the frozen stage has no gradient and no state at all
    (Plan(batch=6, pp=2, microbatches=2), [{"parameters": 224, "gradients": 0, "optimizer": 0},
                                           {"parameters": 108, "gradients": 108, "optimizer": 216}]),
    # pp2 x ZeRO-1 over 3: the frozen stage owns no master; the other ceil(27 / 3) = 9
    (Plan(batch=6, pp=2, dp=3, zero=1, microbatches=2), [{"parameters": 224, "gradients": 0, "optimizer": 0},
                                                         {"parameters": 108, "gradients": 108, "optimizer": 108}]),
], ids=lambda v: v.label() if isinstance(v, Plan) else "")
def test_frozen_layer_by_hand_under_zero_fsdp_and_pp(plan, expected, frozen):
    _, _, desc = frozen
    assert _mem(plan, desc) == expected


def test_tensor_parallelism_of_a_measured_mlp_is_refused_by_name(frozen):
    _, _, desc = frozen
    with pytest.raises(PlanError, match=r"tp=2 .*expected tp=1"):
        predict(Plan(batch=6, tp=2), desc, Unit(desc), FREE)


# ---- buffers only, a ParameterList -----------------------------------------------------------------------------------

class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.full((6,), 2.0))

    def forward(self, x):
        return x * self.s


def test_a_model_of_buffers_only_holds_its_buffers_and_nothing_else():
    """Two layers of a 6-float buffer each (24 bytes): one rank holds 48, each of a pipeline's two 24; no parameter,
    gradient or optimizer state under any plan (ZeRO owns ceil(0 / dp) = 0 elements)."""
    desc = describe_module(nn.Sequential(Scale(), Scale()), torch.randn(4, 6))
    assert [(layer.params, layer.buffer_bytes) for layer in desc.layers] == [(0, 24.0), (0, 24.0)]
    for plan, buffers in ((Plan(batch=4), [48]), (Plan(batch=4, dp=2, zero=1), [48]),
                          (Plan(batch=4, dp=2, zero=2), [48]), (Plan(batch=4, dp_shard=2), [48]),
                          (Plan(batch=4, pp=2, microbatches=2), [24, 24])):
        mem = predict(plan, desc, Unit(desc), FREE).memory
        assert [m["buffers"] for m in mem] == buffers, plan.label()
        assert all(m[k] == 0 for m in mem for k in KEYS), plan.label()


class Gains(nn.Module):
    """Three (6,) gains in a ParameterList (never called as a module), then Linear(6, 2)."""

    def __init__(self):
        super().__init__()
        self.gains = nn.ParameterList(nn.Parameter(torch.randn(6)) for _ in range(3))
        self.lin = nn.Linear(6, 2)

    def forward(self, x):
        for g in self.gains:
            x = x * g
        return self.lin(x)


def test_a_parameter_list_goes_to_the_first_layer_and_counts_once():
    """The ParameterList is no layer that runs: its 18 elements (3 tensors) go to the first layer, lin (14, 2):
    32 elements in 5 tensors, what a real AdamW step holds; a pipeline of 2 stages for 1 layer is refused."""
    torch.manual_seed(2)
    module, x = Gains(), torch.randn(4, 6)
    desc = describe_module(module, x)
    assert [(layer.name, layer.params, layer.tensors) for layer in desc.layers] == [("lin", 32, 5)]
    params, grads, state = _adamw_step(module, x)
    assert _mem(Plan(batch=4), desc) == [{"parameters": params, "gradients": grads, "optimizer": state}]
    assert params == 32 * FP32
    with pytest.raises(PlanError, match="2 pipeline stages for 1 layers"):
        predict(Plan(batch=4, pp=2, microbatches=2), desc, Unit(desc), FREE)


# ---- a GPT by formula under tp, pp, fsdp and ZeRO -----------------------------------------------------------------

# 4 blocks, d=64, 4 heads, vocabulary 128, 32 tokens (f32). Elements (hand): embed (128 + 32) x 64 = 10240 (all
# split by tp); a block 12 d^2 + 13 d = 49984 (12 d^2 + 9 d = 49728 split, 4 d = 256 replicated: the LayerNorms and
# the projections' row-parallel biases); head 2 d + 128 d = 8320 (8192 split). Total 218496.
EMBED, BLOCK, HEAD = 10240, 49984, 8320
TOTAL = EMBED + 4 * BLOCK + HEAD


@pytest.fixture(scope="module")
def gpt():
    return describe_transformer(n_layer=4, d=64, n_head=4, vocab=128, seq=32)


def test_gpt_elements_by_hand(gpt):
    assert [layer.params for layer in gpt.layers] == [EMBED, *[BLOCK] * 4, HEAD]
    assert gpt.params == TOTAL == 218496


@pytest.mark.parametrize("plan, per_rank", [
    # tp2: split parts halved, replicated parts whole: 5120 + 4 x (24864 + 256) + (4096 + 128) = 109824
    (Plan(batch=8, tp=2), [(109824, 109824, 2 * 109824)]),
    # pp2: embed + 2 blocks | 2 blocks + head
    (Plan(batch=8, pp=2, microbatches=2), [(EMBED + 2 * BLOCK,) * 2 + (2 * (EMBED + 2 * BLOCK),),
                                           (2 * BLOCK + HEAD,) * 2 + (2 * (2 * BLOCK + HEAD),)]),
    # tp2 x pp2: rank 0 5120 + 2 x 25120 = 55360
    (Plan(batch=8, tp=2, pp=2, microbatches=2), [(55360, 55360, 110720), (2 * 25120 + 4224,) * 2 + (
        2 * (2 * 25120 + 4224),)]),
    # FSDP over 4: a quarter of everything (4 divides 218496)
    (Plan(batch=8, dp_shard=4), [(TOTAL / 4, TOTAL / 4, TOTAL / 2)]),
])
def test_gpt_parameters_gradients_moments_per_rank_by_hand(plan, per_rank, gpt):
    """(parameters, gradients, AdamW moments) per pipeline rank in f32 elements; predict gives bytes."""
    assert _mem(plan, gpt) == [{"parameters": p * FP32, "gradients": g * FP32, "optimizer": o * FP32}
                               for p, g, o in per_rank]


@pytest.mark.parametrize("zero, dp, pp, grads, owned", [
    (1, 4, 1, [TOTAL], [TOTAL // 4]),                                     # 218496 / 4 = 54624 exactly
    (2, 4, 1, [TOTAL], [TOTAL // 4]),                                     # one bucket (< 4M): all its gradients
    (1, 3, 1, [TOTAL], [-(-TOTAL // 3)]),                                 # 72832 exactly
    (2, 2, 2, [EMBED + 2 * BLOCK, 2 * BLOCK + HEAD], [55104, 54144]),     # per pipeline rank, ceil(n / 2)
    (1, 5, 2, [EMBED + 2 * BLOCK, 2 * BLOCK + HEAD], [-(-110208 // 5), -(-108288 // 5)]),
])
def test_gpt_zero_master_and_moments_per_rank_by_hand(zero, dp, pp, grads, owned, gpt):
    """ZeRO: full f32 gradients of the rank's layers (ZeRO-2 of one bucket, or under a pipeline), and an f32 master
    copy + 2 moments of ceil(trained / dp) elements."""
    plan = Plan(batch=dp * 2 * pp, dp=dp, pp=pp, zero=zero, microbatches=2 * pp if pp > 1 else 1)
    mem = _mem(plan, gpt)
    assert [m["gradients"] for m in mem] == [g * FP32 for g in grads]
    assert [m["optimizer"] for m in mem] == [n * 3 * FP32 for n in owned]


# ---- a frozen weight tied across a pipeline ------------------------------------------------------------------------

class FrozenTiedLM(nn.Module):
    """Embedding(10, 4) whose weight (40, frozen) is the head's too, and a trained Linear(4, 4) (20) between."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.emb.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(self.mid(self.emb(x)))


def test_a_frozen_tied_weight_is_held_by_both_stages_without_gradient_or_state():
    """One rank: 60 elements (240 bytes), 20 trained (80 bytes of gradients, 160 of moments), what a real AdamW step
    holds. Cut before the head: rank 1 holds a copy of the frozen weight (160 bytes) and nothing else; ZeRO-1 over
    2 on that cut: rank 0 (emb, frozen) owns no master, rank 1 ceil(20 / 2) = 10 elements of mid's."""
    torch.manual_seed(4)
    module, x = FrozenTiedLM(), torch.randint(0, 10, (4, 3))
    desc = describe_module(module, x)
    assert [(layer.params, layer.frozen, [(p.owner, p.numel, p.trained) for p in layer.shared])
            for layer in desc.layers] == [(40, 40, []), (20, 0, []), (0, 0, [(0, 40, False)])]
    params, grads, state = _adamw_step(module, x)
    assert _mem(Plan(batch=4), desc) == [{"parameters": params, "gradients": grads, "optimizer": state}]
    assert (params, grads, state) == (240, 80, 160)
    assert _mem(Plan(batch=4, pp=2, microbatches=2, bounds=(0, 2, 3)), desc) == [
        {"parameters": 240, "gradients": 80, "optimizer": 160}, {"parameters": 160, "gradients": 0, "optimizer": 0}]
    assert _mem(Plan(batch=4, pp=2, dp=2, zero=1, microbatches=2, bounds=(0, 1, 3)), desc) == [
        {"parameters": 160, "gradients": 0, "optimizer": 0}, {"parameters": 240, "gradients": 80, "optimizer": 120}]
