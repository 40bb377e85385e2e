"""Thirteenth held-out round, part two (tests/perf/perf_models_round13.py): what a profile leaves behind, the round's
fixes, and arguments refused by name. The counts of the round's models are in tests/perf/test_profile_unseen_round13.py.

What the round found (each pinned by the test whose docstring says so):
- ``profile_state.preserved`` put back the registered modules, a function's modules and optimizers, and the input
  tensors, but not what they reach through plain Python objects:
  - a functional model on its own weight tensors (``x @ W1 + b1``, W1 a global leaf that requires grad) profiled with
    train=True was left with the profile's gradients, summed over its steps, in W1.grad;
  - a net held in a plain list (``self._teacher = [copy.deepcopy(self.net)]``: an EMA teacher kept out of
    ``parameters()`` on purpose) had its EMA weights and BatchNorm statistics moved by every profiled step;
  - a cache object on the module (``self.cache.keys.append(k)``) or passed among the inputs (a decoder's past key
    values) grew by one entry per step: each timed step attended over a longer cache than the counted one, and the
    caller's cache was left holding the profile's entries;
  - a training step written as a callable object (not a module, not a function) holding its net and optimizer was
    left trained.
  Now ``profile_state._reachable`` finds the modules and plain objects these hold, and ``_referenced`` a function's
  tensors; ``same_state`` starts every step from the warm-up's state of those objects too.
- ``make_step(None, x)`` and ``make_step(net, None)`` returned a step that failed only when run, with a bare
  TypeError; ``print_profile(p, con="stdout")`` failed in rich with an AttributeError; ``ModelProfile.hot_spots(-1)``
  dropped the last row silently and ``hot_spots("3")`` failed inside a slice. Each is refused by name now.
"""

import copy
import functools
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import counting, profile
from tilestack.perf.profile_render import print_profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round13 as pm  # noqa: E402
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402
from profile_support import by_op, cases  # noqa: E402

pytestmark = FILTERS
CASES, IDS = cases(pm.MODELS)


run = functools.partial(profile_cpu, steps=2)  # two profiled steps unless told otherwise


def snapshot(model, inputs):
    """Everything a profile must put back, by value: parameters, buffers, gradients, requires_grad, modes, inputs, the
    torch, Python and NumPy random states."""
    tensors = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    ins = [t.clone() for t in counting._tensors(inputs)]
    return tensors, grads, flags, modes, ins, torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def assert_same(before, after):
    tensors, grads, flags, modes, ins, rng, py, npy = before
    tensors2, grads2, flags2, modes2, ins2, rng2, py2, npy2 = after
    assert tensors.keys() == tensors2.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors), [k for k in tensors
                                                                        if not torch.equal(tensors[k], tensors2[k])]
    assert all((grads[k] is None) == (grads2[k] is None) for k in grads)
    assert flags == flags2 and modes == modes2
    assert all(torch.equal(a, b) for a, b in zip(ins, ins2, strict=True))
    assert torch.equal(rng, rng2) and py == py2 and np.array_equal(npy, npy2)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_model_is_left_as_it_was(name, train):
    """Each of the round's models, forward and training profiles: parameters, buffers (BatchNorm statistics of the
    Barlow Twins and ShuffleNet units), gradients (None before, None after), requires_grad, training modes, the inputs
    and every random state (the Gumbel noise, the WGAN-GP interpolation weights, SDPA's dropout) are as before."""
    model, inputs = pm.MODELS[name][0]()
    torch.manual_seed(1234)
    before = snapshot(model, inputs)
    p = run(model, inputs, train=train, steps=1)
    assert p.flops > 0
    assert_same(before, snapshot(model, inputs))


def test_the_profile_draws_what_an_unprofiled_call_draws():
    """After profiling, the global generator is where it was: the Gumbel codebook's next pick (and the WGAN-GP
    critic's next interpolation) is the one it would have made unprofiled."""
    for name in ("gumbel", "wgan_gp"):
        model, inputs = pm.MODELS[name][0]()
        torch.manual_seed(7)
        expected = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        torch.manual_seed(7)
        run(model, inputs, steps=1)
        got = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        assert torch.equal(got, expected), name


# --- state reached through plain Python objects (the round's fix) -----------------------------------------------
W1 = torch.randn(4, 8, requires_grad=True)
B1 = torch.zeros(8, requires_grad=True)
PARAMS = {"w2": torch.randn(8, 1, requires_grad=True)}


def functional_mlp(x):
    """A model on global weight tensors, no nn.Module."""
    return torch.tanh(x @ W1 + B1) @ PARAMS["w2"]


def test_a_functional_models_weights_keep_their_gradients():
    """Round 13: profiling ``functional_mlp`` with train=True left the summed gradients of its steps in W1.grad, B1.grad
    and PARAMS['w2'].grad (None before): the caller's next optimizer step would have applied them. The tensors a
    function refers to (globals, closure cells, lists and dicts of them) are put back now. The counts are the
    function's own: forward 2*N*4*8 + 2*N*8*1, backward the weight gradients and the hidden input gradient."""
    W1.grad = None
    B1.grad = None
    PARAMS["w2"].grad = None
    values = [W1.detach().clone(), PARAMS["w2"].detach().clone()]
    n = 3
    p = run(functional_mlp, (torch.randn(n, 4),), train=True)
    assert W1.grad is None and B1.grad is None and PARAMS["w2"].grad is None
    assert torch.equal(W1, values[0]) and torch.equal(PARAMS["w2"], values[1])
    matmuls = sum(o.m.flops * o.calls for o in p.ops if o.op == "aten::mm")
    assert matmuls == (2 * n * 4 * 8 + 2 * n * 8) + (2 * n * 4 * 8 + 2 * n * 8 + 2 * n * 1 * 8)


def test_a_closure_held_weight_keeps_its_gradient():
    """The same through a closure: a factory returning ``lambda x: x @ w`` over a leaf w."""
    w = torch.randn(4, 2, requires_grad=True)

    def make():
        return lambda x: (x @ w).relu()

    run(make(), (torch.randn(3, 4),), train=True)
    assert w.grad is None


class Distiller(nn.Module):
    """A student and an EMA teacher held in a plain list (out of parameters(), state_dict() and the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self._teacher = [copy.deepcopy(self.net)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher[0]
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), self.net.parameters(), strict=True):
                t.mul_(0.9).add_(0.1 * s)
            target = teacher(x)
        return F.mse_loss(self.net(x), target)


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "train"])
def test_an_unregistered_teacher_is_left_as_it_was(train):
    """Round 13: the teacher in a plain list moved by every profiled step (its EMA weights towards the student, its
    BatchNorm statistics and batch count): after profiling, the caller's teacher was several EMA steps on and its
    training mode untouched only by luck. Its parameters, buffers and mode are put back now."""
    torch.manual_seed(0)
    model = Distiller()
    with torch.no_grad():
        model.net[0].weight.add_(1.0)  # student and teacher apart: each EMA step moves the teacher
    teacher = model._teacher[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    run(model, (torch.randn(5, 4),), train=train)
    after = teacher.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(p.grad is None for p in teacher.parameters())


class KeyCache:
    """A decoder's past keys, a plain object (not a module, not a tensor)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []


class CachedDecoder(nn.Module):
    def __init__(self, own_cache: bool) -> None:
        super().__init__()
        self.k = nn.Linear(4, 4)
        self.cache = KeyCache() if own_cache else None

    def forward(self, x: torch.Tensor, cache: KeyCache | None = None) -> torch.Tensor:
        cache = cache if cache is not None else self.cache
        cache.keys.append(self.k(x))
        keys = torch.cat(cache.keys, 0)  # (T, 4): one more row per call
        return (x @ keys.T).softmax(-1) @ keys


@pytest.mark.parametrize("where", ["module", "inputs"])
def test_a_cache_object_starts_every_step_where_the_warm_up_left_it(where):
    """Round 13: a cache object on the module, or passed among the inputs, grew by one key per step (warm-up, counted
    step, profiler warm-up, timed steps): the counted step attended over 2 keys, the timed ones over 4, 5, ..., so one
    op was two rows of different shapes, and the caller's cache held 6 keys after the call. Now every step starts
    from the warm-up's cache (1 key, the step adds the second): one row per op at T = 2, and the caller's cache is
    empty again."""
    torch.manual_seed(0)
    model = CachedDecoder(own_cache=where == "module")
    cache = model.cache if where == "module" else KeyCache()
    inputs = (torch.randn(1, 4),) if where == "module" else (torch.randn(1, 4), cache)
    p = run(model, inputs, steps=3)
    assert cache.keys == []
    products = {o.shapes: o.calls for o in p.ops if o.op == "aten::mm"}
    assert products == {((1, 4), (4, 2)): 1, ((1, 2), (2, 4)): 1}  # scores over 2 keys, then the weighted keys
    assert by_op(counting.count_ops(lambda: model(*inputs)))["aten::mm"] == 2 * 1 * 4 * 1 + 2 * 1 * 1 * 4
    assert cache.keys and len(cache.keys) == 1  # count_ops is not a profile: it ran the model as asked
    cache.keys.clear()


class TrainStep:
    """A training step as a callable object: its net and optimizer in plain attributes."""

    def __init__(self) -> None:
        self.net = nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = F.mse_loss(self.net(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()


def test_a_training_step_object_is_left_untrained():
    """Round 13: a callable object (not a module, not a function) that trains its own net was profiled as its own
    step and left trained: its net's weights had taken every profiled step and the optimizer held momentum buffers.
    Now both are put back; the step is counted as written (forward, backward and SGD's momentum update)."""
    torch.manual_seed(0)
    step = TrainStep()
    weight = step.net.weight.detach().clone()
    p = run(step, (torch.randn(6, 4), torch.randn(6, 1)))
    assert p.own_backward
    assert torch.equal(step.net.weight, weight) and step.net.weight.grad is None
    assert step.opt.state == {} or all(not s for s in step.opt.state.values())


# --- bad arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,inputs,arg", [
    (None, (torch.randn(2, 4),), "model="),
    (nn.Linear, (torch.randn(2, 4),), "model="),
    (nn.Linear(4, 2), None, "inputs="),
    (nn.Linear(4, 2), "x", "inputs="),
    (nn.Linear(4, 2), iter([torch.randn(2, 4)]), "inputs="),
    (nn.Linear(4, 2), {0: torch.randn(2, 4)}, "inputs="),
    (nn.Linear(4, 2), (np.zeros((2, 4), dtype=np.float32),), "inputs[0]="),
])
def test_make_step_refuses_what_it_cannot_run_before_running(model, inputs, arg):
    """Round 13: ``make_step`` returned a step for a model that is not callable or inputs that cannot be bound, and
    it failed only when run (TypeError: 'NoneType' object is not callable; linear() argument must be Tensor). It is
    refused at once now, as profile_model refuses it, naming the argument."""
    with pytest.raises(profile.ProfileError, match=arg.replace("[", r"\[").replace("]", r"\]")):
        profile.make_step(model, inputs)
    with pytest.raises(profile.ProfileError, match=arg.replace("[", r"\[").replace("]", r"\]")):
        run(model, inputs)


@pytest.fixture(scope="module")
def small_profile():
    torch.manual_seed(0)
    return run(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))


@pytest.mark.parametrize("con", ["stdout", 3, object()])
def test_print_profile_refuses_a_console_it_cannot_print_to(small_profile, con):
    """Round 13: ``print_profile(p, con="stdout")`` passed the checks and failed inside rich ("'str' object has no
    attribute 'print'"); now refused by name before anything is printed."""
    with pytest.raises(profile.ProfileError, match="print_profile: con="):
        print_profile(small_profile, con=con)


@pytest.mark.parametrize("n", [-1, "3", 2.0, True])
def test_hot_spots_refuses_a_count_that_is_not_a_whole_number(small_profile, n):
    """Round 13: ``p.hot_spots(-1)`` returned all rows but the last (a slice's end), silently; ``hot_spots("3")``
    failed inside the slice with a TypeError. Both refused by name; hot_spots(0) is empty, a large n and None (as
    print_profile's top=None) all rows."""
    with pytest.raises(profile.ProfileError, match="hot_spots: n="):
        small_profile.hot_spots(n)
    assert small_profile.hot_spots(0) == []
    rows = [o for o in small_profile.ops if o.op != profile.OTHER]
    assert small_profile.hot_spots(100) == small_profile.hot_spots(None) == rows


class Exploding(nn.Module):
    """Raises in its forward after a linear: a profile must surface it by name and leave the model as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.bn(self.lin(x))
        if self.calls > 1:
            raise ValueError(f"exploded at call {self.calls}")
        return h


def test_a_model_that_raises_is_named_with_its_phase_and_left_as_it_was():
    """A model that raises on its second call: the ProfileError names the model, the phase (the warm-up's second step)
    and its error, chained; the BatchNorm statistics its first call moved and its call counter are put back. (With
    warmup=0 it never raises: every step starts from the state before the first, its counter at 0.)"""
    torch.manual_seed(0)
    model = Exploding().train()
    x = torch.randn(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(profile.ProfileError, match="model 'Exploding' raised ValueError during the warm-up") as e:
        run(model, x, warmup=2, steps=1)
    assert isinstance(e.value.__cause__, ValueError)
    assert model.calls == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    run(model, x, warmup=0, steps=2)
    assert model.calls == 0


def test_an_empty_batch_counts_weights_but_no_products():
    """An empty batch through the round's ShuffleNet unit (eval): 0 FLOPs in its convolutions, their
    weights still read (docs: a convolution or linear over 0 rows reads its weight and bias)."""
    torch.manual_seed(0)
    unit = pm.ShuffleUnit().eval()
    p = run(unit, torch.randn(0, pm.SH_C, pm.SH_SIDE, pm.SH_SIDE))
    convs = [o for o in p.ops if o.op == "aten::convolution"]
    assert convs and all(o.m.flops == 0 for o in convs)
    pw_weight = pm.SH_C * pm.SH_C * 4 + pm.SH_C * 4  # the pointwise layer's weight and bias, float32
    assert any(o.m.bytes_read >= pw_weight for o in convs)
    assert math.isfinite(p.step_s)
