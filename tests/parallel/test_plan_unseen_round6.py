"""The planner on models and clusters it was not built around, round 6: memory by hand and against torch.

Models: an MLP whose parameters sit in some layers only (ReLU, Tanh, a pooling and a flatten between them, layers
with no parameter at all), a GPT of a shape no round used (3 heads of 16, a 37-token vocabulary, a sequence
shorter than its position table) under the three recompute policies, ZeRO-1 / -2 over odd data-parallel degrees
(3, 5, 7: the flat buffer padded to a multiple of dp), pipelines of unequal stages simulated by hand (GPipe and
1F1B), and a memory limit exactly at a plan's predicted peak (inclusive: a plan whose peak equals the limit fits).

Found and fixed (each test below failed first):
- ZeRO's per-rank optimizer state was trained / dp elements, a fraction when dp does not divide the parameters:
  198 elements over 5 ranks predicted 475.2 bytes of f32 master + moments where ZeroOptimizer pads its bucket to a
  multiple of dp and each rank holds ceil(198 / 5) = 40 elements, 480 bytes (predict._memory: owned =
  ceil(trained / dp), the flattened copies padded too);
- a pipeline stage beginning at nn.Flatten received its input and its output, a view of the same elements, as two
  tensors (keyed by shape): 16 floats per sample crossed the edge where 8 do, doubling that stage's receive buffers
  and the send (describe._received: keyed by address and bytes).
"""

import copy

import pytest
import torch
from plan_models_round2 import FREE, Unit
from torch import nn

from tilestack.parallel.plan import Plan, PlanError, describe_module, predict, search, simulate
from tilestack.parallel.plan.describe import _loss_of

FP32 = 4


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


class Sparse(nn.Module):
    """Conv, ReLU, pool, flatten, Linear, Tanh, Linear: parameters in three of seven layers (2 x 3 x 3 x 3 + 2,
    2 x 2 x 2 x 7 + 7, 7 x 5 + 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 7)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(7, 5)

    def forward(self, x):
        return self.out(self.tanh(self.fc(self.flat(self.pool(self.act(self.conv(x)))))))


SPARSE_PARAMS = [2 * 27 + 2, 0, 0, 0, 8 * 7 + 7, 0, 7 * 5 + 5]


@pytest.fixture(scope="module")
def sparse():
    torch.manual_seed(0)
    module, x = Sparse(), torch.randn(3, 3, 4, 4)
    return module, x, describe_module(module, x)


def test_parameter_free_layers_hold_nothing_but_activations(sparse):
    """Each layer's parameters by hand (none in ReLU, pool, flatten, Tanh); a one-rank plan's parameter, gradient
    and AdamW bytes equal a real AdamW step's on this CPU to the byte."""
    module, x, desc = sparse
    assert [layer.name for layer in desc.layers] == ["conv", "act", "pool", "flat", "fc", "tanh", "out"]
    assert [layer.params for layer in desc.layers] == SPARSE_PARAMS
    assert [layer.tensors for layer in desc.layers] == [2, 0, 0, 0, 2, 0, 2]
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW(model.parameters())
    _loss_of(model(x)).backward()
    opt.step()
    mem = predict(Plan(batch=3), desc, Unit(desc), FREE).memory[0]
    assert mem["parameters"] == _nbytes(model.parameters()) == sum(SPARSE_PARAMS) * FP32
    assert mem["gradients"] == _nbytes(p.grad for p in model.parameters())
    assert mem["optimizer"] == _nbytes(v for st in opt.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("k", [1, 2, 5])
def test_parameter_free_layers_activations_equal_what_autograd_saves(k, sparse):
    """At k times the example's batch, the one-rank plan's activations equal the bytes autograd saves in one
    training forward (each storage once, parameters not): a flatten saves nothing, a pool and a ReLU their own."""
    from tilestack.parallel.memory import saved_activation_bytes
    module, x, desc = sparse
    xs = torch.cat([x] * k)
    real = saved_activation_bytes(lambda: _loss_of(module(xs)), list(module.parameters()))
    got = predict(Plan(batch=3 * k), desc, Unit(desc), FREE).memory[0]["activations"]
    assert got == pytest.approx(real, rel=1e-9)


@pytest.mark.parametrize("bounds", [(0, 1, 7), (0, 4, 7), (0, 2, 4, 7), (0, 1, 2, 3, 4, 5, 6, 7)])
def test_a_stage_of_parameter_free_layers_holds_no_weights(bounds, sparse):
    """Cut so that stages hold only ReLU / pool / flatten / Tanh: those ranks have no parameters, gradients or
    optimizer state; the others hold exactly their layers' (sums by hand); a stage's receive buffers are what
    crosses its edges (the previous layer's output per sample, f32)."""
    _, _, desc = sparse
    pp, m, b = len(bounds) - 1, 2, 1
    pred = predict(Plan(batch=m * b, pp=pp, microbatches=m, bounds=bounds), desc, Unit(desc), FREE)
    outs = [2 * 4 * 4, 2 * 4 * 4, 2 * 2 * 2, 8, 7, 7, 5]          # elements per sample of each layer's output
    for r in range(pp):
        params = sum(SPARSE_PARAMS[bounds[r]:bounds[r + 1]]) * FP32
        assert pred.memory[r]["parameters"] == params, r
        assert pred.memory[r]["gradients"] == params and pred.memory[r]["optimizer"] == 2 * params, r
        edges = (outs[bounds[r] - 1] if r else 0) + (outs[bounds[r + 1] - 1] if r < pp - 1 else 0)
        assert pred.memory[r]["transient"] == m * b * edges * FP32, r


# ---- a GPT shape no round used, the three recompute policies against autograd ----------------------------------------

@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_recompute_policies_save_what_autograd_saves(policy, attention):
    """3 heads of 16, a vocabulary of 37, 2 blocks, a sequence of 20 under a table of 24 positions, batch 3: the
    one-rank plan's activations within 2% of the bytes autograd saves with tilestack's own checkpointing applied
    (selective: the scores recomputed; full: each block's input only), and none > selective >= full."""
    from tilestack.parallel import GPT, ModelConfig, apply_recompute, lm_loss, make_batch
    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan import describe_gpt
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d=48, n_head=3, vocab=37, max_seq=24, attention=attention)
    desc = describe_gpt(cfg, 20)
    got = {}
    for rc in ("none", "selective", "full"):
        got[rc] = predict(Plan(batch=3, recompute=rc), desc, Unit(desc), FREE).memory[0]["activations"]
    model = GPT(cfg)
    apply_recompute(model, policy)
    idx, targets = make_batch(cfg, 3, 20)
    real = saved_activation_bytes(lambda: lm_loss(model(idx), targets), list(model.parameters()))
    assert got[policy] == pytest.approx(real, rel=0.02)
    assert got["none"] > got["selective"] >= got["full"]


# ---- ZeRO over odd data-parallel degrees: the flat buffer padded to a multiple of dp ---------------------------------

def _mlp198():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 4))


@pytest.mark.parametrize("dp", [3, 5, 7])
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_optimizer_bytes_by_hand_for_odd_degrees(dp, zero):
    """198 parameters (104 + 70 + 24): each of dp ranks owns ceil(198 / dp) elements of the padded flat buffer (66,
    40, 29), an f32 master copy and AdamW's two f32 moments of them: 12 x that many bytes, a whole number; the
    replicated parameters and (ZeRO-1) gradients stay whole."""
    module = _mlp198()
    desc = describe_module(module, torch.randn(4, 7))
    assert desc.params == 198
    mem = predict(Plan(batch=dp * 2, dp=dp, zero=zero), desc, Unit(desc), FREE).memory[0]
    owned = -(-198 // dp)
    assert mem["optimizer"] == 12 * owned
    assert mem["parameters"] == 198 * FP32
    if zero == 1:
        assert mem["gradients"] == 198 * FP32


@pytest.mark.parametrize("dp", [3, 5, 7])
def test_zero_state_equals_a_real_zero_optimizer_on_a_fake_group(dp):
    """The same against tilestack's ZeroOptimizer itself, built on a fake process group of dp ranks in this
    process (collectives are no-ops; the slice it owns is what it would own): master + moments, step excluded."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tilestack.parallel.zero import ZeroOptimizer
    module = _mlp198()
    desc = describe_module(module, torch.randn(4, 7))
    dist.init_process_group("fake", store=FakeStore(), rank=dp - 1, world_size=dp)
    try:
        opt = ZeroOptimizer(module.parameters(), dist.group.WORLD, stage=1,
                            make_optimizer=lambda ps: torch.optim.AdamW(ps))
        module(torch.randn(4, 7)).sum().backward()
        opt.reduce_gradients()
        opt.step()
        real = _nbytes([opt.master]) + _nbytes(v for st in opt.optimizer.state.values() for k, v in st.items()
                                              if k != "step")
    finally:
        dist.destroy_process_group()
    assert predict(Plan(batch=dp, dp=dp, zero=1), desc, Unit(desc), FREE).memory[0]["optimizer"] == real


# ---- pipelines of unequal stages, simulated by hand ------------------------------------------------------------------

def test_gpipe_and_1f1b_of_unequal_stages_by_hand():
    """2 stages, forward 1 and 2 s, backward 2 and 4 s, a send of 0.5 s, 3 micro-batches. By hand:
    GPipe: rank 1's forwards 1.5-3.5, 3.5-5.5, 5.5-7.5, backwards to 11.5, 15.5, 19.5; rank 0's backwards wait for
    those plus the send: 12-14, 16-18, 20-22. 1F1B: rank 1 runs F0 1.5-3.5, B0 -7.5, F1 -9.5, B1 -13.5, F2 -15.5,
    B2 -19.5; rank 0 F0, F1, B0 8-10, F2 10-11, B1 14-16, B2 20-22. Both take 22 s; rank 1 idles 4 s of them
    (bubble 4 / 22), rank 0 13; GPipe keeps 3 micro-batches in flight on rank 0, 1F1B 2 (rank 1: 3 and 1)."""
    kw = dict(pp=2, stages_per_rank=1, microbatches=3, fwd=[1.0, 2.0], bwd=[2.0, 4.0], p2p=[0.5, 0.0])
    g, f = simulate("gpipe", **kw), simulate("1f1b", **kw)
    ends = {"g": {(e.kind, e.micro, e.rank): e.end for e in g.events},
            "f": {(e.kind, e.micro, e.rank): e.end for e in f.events}}
    assert [ends["g"]["B", i, 0] for i in range(3)] == [14.0, 18.0, 22.0]
    assert [ends["g"]["B", i, 1] for i in range(3)] == [11.5, 15.5, 19.5]
    assert [ends["f"]["B", i, 0] for i in range(3)] == [10.0, 16.0, 22.0]
    assert [ends["f"]["F", i, 1] for i in range(3)] == [3.5, 9.5, 15.5]
    for sim in (g, f):
        assert sim.makespan == 22.0
        assert sim.busy == [9.0, 18.0]
        assert (sim.makespan - sim.busy[1]) / sim.makespan == pytest.approx(4 / 22)
    assert g.peak_inflight == [3.0, 3.0] and f.peak_inflight == [2.0, 1.0]


@pytest.mark.parametrize("p, m", [(3, 1), (3, 2), (5, 7), (7, 3), (2, 11)])
def test_equal_stage_bubbles_at_prime_depths(p, m):
    """Equal stages (f = 1, b = 2, free sends) at prime depths and micro-batch counts smaller, larger and prime
    against the depth: GPipe and 1F1B both take (m + p - 1)(f + b); every rank's bubble is (p - 1) / (m + p - 1)."""
    for sched in ("gpipe", "1f1b"):
        sim = simulate(sched, pp=p, stages_per_rank=1, microbatches=m, fwd=[1.0] * p, bwd=[2.0] * p)
        assert sim.makespan == pytest.approx((m + p - 1) * 3.0), sched
        for r in range(p):
            assert (sim.makespan - sim.busy[r]) / sim.makespan == pytest.approx((p - 1) / (m + p - 1)), (sched, r)


# ---- a memory limit exactly at a plan's peak ----------------------------------------------------------------------

def test_a_limit_equal_to_a_peak_fits_that_plan_and_one_byte_less_does_not(sparse):
    """The boundary is inclusive: with the limit at a plan's exact predicted peak that plan is ranked, one byte
    under it it is not (and every plan ranked has a peak <= the limit). On 5 GPUs of which one is a byte short of
    that peak, a 5-stage pipeline whose every rank peaks there no longer fits."""
    _, _, desc = sparse
    from tilestack.parallel.plan import enumerate_plans
    preds = [predict(p, desc, Unit(desc), FREE) for p in enumerate_plans(desc, 5, 10)]
    for target in sorted({p.memory_bytes for p in preds}):
        ranked = {r.plan for r in search(desc, Unit(desc), FREE, world_size=5, batch=10, memory_limit=target)}
        assert ranked == {p.plan for p in preds if p.memory_bytes <= target}
        assert all(p.plan in ranked for p in preds if p.memory_bytes == target)
        try:
            under = {r.plan for r in search(desc, Unit(desc), FREE, world_size=5, batch=10,
                                            memory_limit=target - 1)}
        except PlanError as e:
            assert "no plan of" in str(e)
            under = set()
        assert not any(p.plan in under for p in preds if p.memory_bytes == target)
    flat = [p for p in preds if p.plan.pp == 1 and p.plan.dp == 5 and p.plan.zero == 0]
    peak = flat[0].memory_bytes
    limits = [peak] * 4 + [peak - 1]
    ranked = {r.plan for r in search(desc, Unit(desc), FREE, world_size=5, batch=10, memory_limit=limits)}
    assert flat[0].plan not in ranked
    assert flat[0].plan in {r.plan for r in search(desc, Unit(desc), FREE, world_size=5, batch=10,
                                                  memory_limit=[peak] * 5)}
