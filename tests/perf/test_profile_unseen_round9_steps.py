"""Ninth held-out round, part two (tests/perf/perf_models_round9.py): training steps written as modules (forward,
backward and the optimizer inside the model's call), fused optimizers, what a profile of them leaves behind, and
EmbeddingBag padding. The counts of the round's other models are in tests/perf/test_profile_unseen_round9.py.

What the round found (each pinned by the test whose docstring says so):
- a training step written as a module or function (zero_grad, loss, backward, optimizer.step inside its call) could
  not be profiled: the forward-only step ran it under torch.no_grad, so its backward failed ("element 0 of tensors
  does not require grad"); a model that needs gradients to run is now run as it is written (profile.make_step), and
  the profile says it is the model's own step (ModelProfile.own_backward, the rows' step "own step");
- fused optimizers (``torch.optim.AdamW(fused=True)``, SGD, Adam, Adagrad: aten._fused_adamw_ and the others) had no
  FLOP formula: their rows read "uncounted"; now the FLOPs per element of the same optimizer's foreach path, with
  its options (weight decay, amsgrad, maximize, momentum, nesterov), so a fused and an unfused step count alike;
- profiling such a step left the optimizer it holds changed: Adam's moments and step count, SGD's momentum buffers,
  a scheduler's epoch and learning rate, a GradScaler's scale and growth tracker (``profile_state.preserved`` put
  back parameters, buffers and attributes but not what an optimizer, scheduler or scaler keeps); now put back, and
  so are the modules and optimizers a plain training-step function refers to (before, its profile trained them);
- a GradScaler's ops (aten._amp_foreach_non_finite_check_and_unscale_, _amp_update_scale_) had no FLOP formula;
- a sparse gradient added into a dense parameter (``param.add_(grad)`` of SGD and SparseAdam on an embedding with
  sparse=True) was counted over the whole table, FLOPs and bytes, for the few rows it touches; sparse_mask and
  is_coalesced read as uncounted work, _coalesce uncounted;
- an EmbeddingBag's padding entries (padding_idx) were counted as looked up (FLOPs, forward and backward, and the
  rows' bytes) as if every entry were real, and an nn.Embedding's pad tokens in its backward: the kernels skip
  them.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tilestack.perf import counting, formulas, profile
from tilestack.perf.counting import ProfileError

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round9 as pm  # noqa: E402
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402
from profile_support import by_op, rendered, rows_of  # noqa: E402

pytestmark = FILTERS
LINEARS = [(pm.TS_IN, pm.TS_HIDDEN), (pm.TS_HIDDEN, pm.TS_OUT)]
PARAMS = sum(i * o + o for i, o in LINEARS)  # elements the optimizers update


def profiled_step(build):
    model, inputs = build()
    return model, inputs, profile_cpu(model, inputs)


def test_a_training_step_module_is_profiled_with_its_backward_and_fused_adamw():
    """A module whose forward zeroes the gradients, runs backward and a fused AdamW step is profiled forward-only
    (train=False) as it is written: before, its backward failed under the profile's no_grad. Rows: the two
    linears' forward 2*R*in*out, their backward (the first layer's input needs no gradient), and _fused_adamw_
    8 FLOPs per parameter element (AdamW with weight decay), as the foreach path would count."""
    _, _, p = profiled_step(pm.train_step_adamw)
    assert not p.unsupported
    flops = {o.op: 0.0 for o in p.ops}
    for o in p.ops:
        flops[o.op] += o.m.flops * o.calls
    r = pm.TS_ROWS
    forward = sum(2 * r * i * o for i, o in LINEARS)
    assert flops["aten::addmm"] == forward
    assert flops["aten::mm"] == 2 * forward - 2 * r * pm.TS_IN * pm.TS_HIDDEN
    assert flops["aten::_fused_adamw_"] == (formulas.ADAM_FLOPS_PER_ELEMENT + 1) * PARAMS
    (row,) = [o for o in p.ops if o.op == "aten::_fused_adamw_"]
    assert row.bound == "memory" and row.m.bytes_read >= 4 * 4 * PARAMS  # params, grads, two moments
    # it is said to be the model's own step, not a forward: in the heading and in each stored row's config
    assert p.own_backward and not p.train and {o.m.config["step"] for o in p.ops} == {"own step"}
    assert "its own step (it runs its backward)" in rendered(p)
    forward = profile_cpu(nn.Linear(4, 4), (torch.randn(2, 4),))
    assert not forward.own_backward and {o.m.config["step"] for o in forward.ops} == {"forward"}


def test_a_training_step_function_is_profiled_too():
    """A plain function that calls a training step is run the same way; a forward-only model still runs under
    no_grad (its forward sees gradients disabled)."""
    model, inputs = pm.train_step_sgd()
    p = profile_cpu(lambda x, y: model(x, y), inputs)
    assert "aten::_fused_sgd_" in {o.op for o in p.ops} and not p.unsupported
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return super().forward(x)

    profile_cpu(Probe(4, 4), (torch.randn(2, 4),))
    assert seen and not any(seen)


def test_a_training_step_function_leaves_the_model_and_optimizer_it_refers_to_as_they_were():
    """A plain function closing over a model and its optimizer (and one calling such a function): the profile's
    steps trained the model (its parameters moved, the optimizer's momentum buffers and Adam's step count with
    them), since only modules passed in (or bound by a partial) were put back; now the modules and optimizers a
    function refers to, by its closure or globals, through the functions it calls, are put back too."""
    torch.manual_seed(0)
    net = pm._mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(pm.TS_ROWS, pm.TS_IN), torch.randn(pm.TS_ROWS, pm.TS_OUT)

    def step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    step(x, y)  # momentum buffers exist
    for fn in (step, lambda x, y: step(x, y)):
        params = [t.clone() for t in net.state_dict().values()]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
        p = profile_cpu(fn, (x, y), steps=2)
        assert p.own_backward and "aten::add_" in {o.op for o in p.ops}
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), params, strict=True))
        assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(net.parameters(), buffers,
                                                                                    strict=True))


def test_a_model_failing_otherwise_keeps_its_error_and_runs_once():
    """Only autograd's refusal of a backward under no_grad makes the step run with gradients: any other error is
    refused at once, naming the model and the phase, the model called once; a step whose backward fails with
    gradients on too (it differentiates a detached loss) keeps that error."""
    calls = []

    class Wrong(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    with pytest.raises(ProfileError, match=r"model 'Wrong' raised RuntimeError during the warm-up: mat1 and mat2"):
        profile_cpu(Wrong(4, 4), (torch.randn(2, 5),))
    assert len(calls) == 1
    net = nn.Linear(4, 1)
    with pytest.raises(ProfileError, match=r"during the warm-up: element 0 of tensors does not require grad"):
        profile_cpu(lambda x: net(x).detach().sum().backward(), (torch.randn(2, 4),))


def test_train_true_on_a_training_step_says_to_profile_it_with_train_false():
    """A training step module returns a detached loss: train=True has no backward of its own to add, and the
    refusal says so and names train=False as the way to profile a step that runs its own backward."""
    model, inputs = pm.train_step_adamw()
    with pytest.raises(ProfileError, match=r"train=True but no output of the model requires grad.*its own backward "
                                           r"and optimizer is profiled with train=False"):
        profile_cpu(model, inputs, train=True)


ADAM_OPTIONS = [{}, {"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True}]
SGD_OPTIONS = [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, {"maximize": True}]


def _update(cls, fused, options):
    """FLOPs of an optimizer's second step (the first makes its state) over two parameters of 12 and 5 elements,
    by op, fused or foreach."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, lr=0.1, **options, **({"fused": True} if fused else {"foreach": True}))
    opt.step()
    return by_op(counting.count_ops(opt.step))


@pytest.mark.parametrize("cls,options", [
    *((torch.optim.Adam, o) for o in ADAM_OPTIONS),
    (torch.optim.AdamW, {"amsgrad": True, "maximize": True, "weight_decay": 0.01}),
    *((torch.optim.SGD, o) for o in SGD_OPTIONS), (torch.optim.Adagrad, {"weight_decay": 0.1}),
], ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(v) or "plain")
def test_fused_optimizers_count_as_their_foreach_path(cls, options):
    """A fused step (before: uncounted) counts what the same optimizer's foreach path counts, op by op summed:
    Adam 7 per element (+1 weight decay, amsgrad, maximize each), SGD 1 (+2 momentum, +1 nesterov, weight decay,
    maximize), Adagrad 5 (+1 weight decay); the step counters' increments alike."""
    fused, foreach = _update(cls, True, options), _update(cls, False, options)
    name = f"aten::_fused_{cls.__name__.lower()}_"
    assert fused[name] > 0 and sum(fused.values()) == sum(foreach.values())
    extra = sum(1 for k in ("weight_decay", "amsgrad", "maximize", "nesterov") if options.get(k))
    base = {"Adam": formulas.ADAM_FLOPS_PER_ELEMENT, "AdamW": formulas.ADAM_FLOPS_PER_ELEMENT,
            "Adagrad": formulas.ADAGRAD_FLOPS_PER_ELEMENT}.get(cls.__name__, formulas.SGD_FLOPS_PER_ELEMENT)
    assert fused[name] == (base + extra + 2 * bool(options.get("momentum"))) * 17


def test_profiling_a_training_step_puts_back_its_optimizer_and_scheduler():
    """After a profile the optimizer's per-parameter state (AdamW's moments and step count; SGD's momentum buffers)
    and its learning rate, and the scheduler's epoch, are what they were: the next real step is the one it would
    have been unprofiled. Before, the profile's steps were left in them (the state of an optimizer that had never
    stepped was filled)."""
    for build in (pm.train_step_adamw, pm.train_step_sgd):
        model, inputs = build()
        model(*inputs)  # one real step: the state exists
        state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in model.opt.state.items()}
        lr = model.opt.param_groups[0]["lr"]
        epoch = getattr(getattr(model, "sched", None), "last_epoch", None)
        expected = [t.clone() for t in model.state_dict().values()]
        profile_cpu(model, inputs)
        assert {id(p) for p in model.opt.state} == set(state)
        for p, s in model.opt.state.items():
            for k, v in s.items():
                assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k
        assert model.opt.param_groups[0]["lr"] == lr
        assert getattr(getattr(model, "sched", None), "last_epoch", None) == epoch
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected, strict=True))
    fresh, inputs = pm.train_step_adamw()
    profile_cpu(fresh, inputs)
    assert len(fresh.opt.state) == 0  # never stepped before: no state after either


def test_a_mixed_precision_step_counts_its_grad_scaler_and_puts_its_scale_back():
    """bf16 autocast, a GradScaler and a fused AdamW given the scale: the scaler's inf check over the gradients
    (before: uncounted) 2 per element (a multiply by 1/scale, a finiteness test), its scale update 4, the AdamW step
    one more per element for the unscale it does itself. The scaler's scale and growth tracker are put back (with
    growth_interval 3 the profile's steps doubled the scale), and its per-optimizer stages: the next step runs."""
    model, inputs = pm.train_step_amp()
    model(*inputs)  # one real step: the scale and its tracker exist
    scale, tracker = model.scaler._scale.clone(), model.scaler._growth_tracker.clone()
    p = profile_cpu(model, inputs, steps=3)
    assert not p.unsupported
    flops = {o.op: o.m.flops * o.calls for o in p.ops}
    assert flops["aten::_amp_foreach_non_finite_check_and_unscale_"] == formulas.AMP_UNSCALE_FLOPS_PER_ELEMENT * PARAMS
    assert flops["aten::_amp_update_scale_"] == formulas.AMP_UPDATE_SCALE_FLOPS
    assert flops["aten::_fused_adamw_"] == (formulas.ADAM_FLOPS_PER_ELEMENT + 2) * PARAMS
    assert {o.m.dtype for o in p.ops if o.op == "aten::addmm"} == {"bf16"}
    assert torch.equal(model.scaler._scale, scale) and torch.equal(model.scaler._growth_tracker, tracker)
    model(*inputs)  # the scaler's per-optimizer stages are back too (a shallow restore left "already stepped")


def test_a_sparse_embedding_step_updates_only_the_looked_up_rows():
    """nn.Embedding(sparse=True) under SparseAdam: the gradient's 6 looked-up rows coalesced (an add per value,
    6*D), then its moments and the table updated by dense.add_(sparse) on the 4 distinct rows: 4*D FLOPs each, and
    those rows' bytes read and written. Before, each add_ was counted over the whole table (50*D FLOPs, its bytes
    read and written), however few rows it touched. The optimizers, held in a list, are put back after."""
    model, inputs = pm.sparse_embedding_step()
    model(*inputs)
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in model.opts[0].state.items()}
    p = profile_cpu(model, inputs)
    assert not p.unsupported
    d, rows, lookups = pm.SE_DIM, len(pm.SE_IDS.unique()), pm.SE_IDS.numel()
    table = [o for o in p.ops if o.op == "aten::add_" and o.label.count(f"{pm.SE_ROWS}x{d}") == 2]
    assert sum(o.calls for o in table) == 3  # exp_avg, exp_avg_sq, the weight
    assert sum(o.m.flops * o.calls for o in table) == 3 * rows * d
    assert sum(o.m.bytes_written * o.calls for o in table) == 3 * rows * d * 4
    (coalesce,) = [o for o in p.ops if o.op == "aten::_coalesce"]
    assert coalesce.m.flops == lookups * d
    for param, s in model.opts[0].state.items():
        assert all(torch.equal(v, state[id(param)][k]) if torch.is_tensor(v) else v == state[id(param)][k]
                   for k, v in s.items())


def _counts(build, *, train):
    model, inputs = build()
    step = profile.make_step(model, inputs, train=train)
    step()
    return model, counting.count_ops(step), None


def test_embedding_bag_skips_its_padding_entries():
    """Rows padded with padding_idx (7 real entries of 12): the mean bag adds 7*D, its backward 2*7*D (an add and
    the 1/bag size scale per real entry), and reads 7 rows; the sum bag with per-sample weights 2*5*D. Before,
    all 12 entries were counted and read."""
    _, counts, _ = _counts(pm.embedding_bags, train=True)
    d, real = pm.EB_DIM, int((pm.EB_ROWS != 0).sum())
    assert real == 7
    mean_bag, sum_bag = rows_of(counts, "aten::_embedding_bag")
    # the mean bag's three bags (each holding a real entry) divided by their sizes: 3 * D more (round 18)
    assert mean_bag.flops == real * d + 3 * d and sum_bag.flops == 2 * len(pm.EB_FLAT) * d
    assert mean_bag.bytes_read == real * d * 4 + pm.EB_ROWS.numel() * 8 + pm.EB_ROWS.shape[0] * 8  # rows, ids, offsets
    backward = {c.flops for c in rows_of(counts, "aten::_embedding_bag_backward")}
    assert backward == {2 * real * d, 2 * len(pm.EB_FLAT) * d}
    bag = nn.EmbeddingBag(5, 3, mode="sum", padding_idx=2)
    only_padding = counting.count_ops(lambda: bag(torch.tensor([[2, 2, 2]])))
    assert by_op(only_padding)["aten::_embedding_bag"] == 0


def test_embedding_backward_skips_its_padding_tokens():
    """nn.Embedding(padding_idx=0) on a padded batch (3 real tokens of 8): its backward adds 3*D (the kernel skips
    the pad tokens' gradients; before, 8*D were counted); without padding_idx every token's row is added."""
    ids = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    for padding_idx, tokens in ((0, 3), (None, ids.numel())):
        emb = nn.Embedding(10, 4, padding_idx=padding_idx)
        counts = counting.count_ops(lambda emb=emb: emb(ids).sum().backward())
        assert by_op(counts)["aten::embedding_dense_backward"] == tokens * 4


def test_fused_optimizer_bytes_and_rule_on_meta_parameters():
    """The fused rule reads shapes only: on meta parameters (no values) it counts as on real ones, and a padding
    entry cannot be told apart on the meta device, so every entry counts there."""
    params = [torch.empty(6, 2, device="meta")]
    func = torch.ops.aten._fused_adamw_.default
    rule = counting.OWN_FLOPS["aten._fused_adamw_"]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    assert rule(func, (params, params, params, params, [], []), kwargs, None) == 7 * 12
    weight, idx = torch.empty(5, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    bag = torch.ops.aten._embedding_bag.default
    assert counting.OWN_FLOPS["aten._embedding_bag"](
        bag, (weight, idx, torch.zeros(1, dtype=torch.long, device="meta")), {"padding_idx": 0}, None) == 4 * 3


def test_training_step_mse_and_its_gradient_match_the_formulas():
    """The step's loss rows: mse_loss 3 FLOPs per element forward, 3 backward (formulas.MSE_*)."""
    _, _, p = profiled_step(pm.train_step_adamw)
    mse = {o.op: o.m.flops for o in p.ops if o.op.startswith("aten::mse_loss")}
    n = pm.TS_ROWS * pm.TS_OUT
    assert mse == {"aten::mse_loss": formulas.MSE_FLOPS_PER_ELEMENT * n,
                   "aten::mse_loss_backward": formulas.MSE_BWD_FLOPS_PER_ELEMENT * n}
