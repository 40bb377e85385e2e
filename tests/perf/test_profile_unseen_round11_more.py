"""Eleventh held-out round, part two: how models are used rather than what they compute. The round's model counts are
in tests/perf/test_profile_unseen_round11.py.

What the round found (each pinned by the test whose docstring says so):
- a profile given no ``name`` named the model by its type's name: every plain function was ``function``, every
  partial ``partial``, every bound method ``method`` and every TorchScript module ``RecursiveScriptModule``, in the
  heading, in errors ("model 'function' raised ...") and in each row's config, so the store paired rows of two
  different scripted models (or two training-step functions) as the same model's. Now: the function's qualified
  name, the partial's function's, ``Class.method``, the scripted class's original name (``profile_args.model_name``);
- a model's exception whose own ``__str__`` raises (a custom exception formatting an attribute it lacks) was
  formatted by the profiler inside its except clause: the caller got that second error (an AttributeError of the
  profiler's), not a ProfileError naming the model; now the class and arguments stand in for the text
  (``profile_render.error_text``), in the profile and in a target's builder;
- (fixed in session 30, was a strict xfail) two calls of one op at the same shapes but different dtypes (a bf16 and
  an fp32 Linear of one width) were one row: its dtype the first call's, so the bf16 product was placed under the
  fp32 roof and the row's bytes per call were the two calls' average. count_ops keeps its (op, shapes) rows with a
  per-dtype breakdown (``_Count.by_dtype``); the profile splits them (``counting.split_by_dtype``) and finds each
  event's row by its input dtypes (``counting.event_key``). (The test's model named its bf16 Linear ``half``, which
  nn.Module.half, the method, shadowed: it raised before the rows were looked at.);
- (open, strict xfail) ops a model runs on other threads (a ThreadPoolExecutor running two branches) are neither
  counted nor timed: a dispatch mode and torch.profiler's CPU events are per thread, so the profile shows only the
  calling thread's work, silently.

The rest passes as it is and is kept: errors raised in a model's forward or backward, at each phase, surface as a
ProfileError naming the model, the phase and the inputs, with the model's error chained and nothing left switched on;
inputs that require grad get their gradient set back; an optimizer stepped by post-accumulate-grad hooks, a pruned
linear's mask, activations packed to fp16 by saved_tensors_hooks and a mixture density head of torch.distributions
are counted by hand and the model put back.
"""

import concurrent.futures
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.distributions as D
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import _get_current_dispatch_mode

from tilestack.perf import counting, device, profile
from tilestack.perf.profile_args import model_name

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round11 as pm  # noqa: E402
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402
from profile_support import assert_rows_add_up, by_op, rows_of  # noqa: E402

pytestmark = FILTERS


def profiled_flops(p, op):
    """FLOPs per step of ``op`` in a profile: its rows' and its untimed counts'."""
    return sum(o.m.flops * o.calls for o in p.ops if o.op == op) + sum(u.flops for u in p.untimed if u.op == op)


def warmed_counts(model, inputs):
    """Counts of a training step of ``model`` as a profile runs it (forward, the outputs summed, backward), run once
    before (gradients allocated): as a profile counts its step after its warm-up."""
    step = profile.make_step(model, inputs, train=True)
    step()
    return counting.count_ops(step)


# --- default names -------------------------------------------------------------------------------------------
def train_step(x):
    """A plain function around a module (a training step, a pipeline)."""
    return NET(x).relu()


torch.manual_seed(0)
NET = nn.Linear(4, 3)


@pytest.mark.parametrize(
    "model,width,expected",
    [
        (train_step, 4, "train_step"),
        (functools.partial(NET), 4, "Linear"),
        (functools.partial(train_step), 4, "train_step"),
        (NET.forward, 4, "Linear.forward"),
        (torch.jit.script(pm.ScriptedMLP()), pm.SC_IN, "ScriptedMLP"),
        (torch.jit.trace(pm.ScriptedMLP(), torch.randn(2, pm.SC_IN)), pm.SC_IN, "ScriptedMLP"),
        (pm.Branching(), pm.BR_DIM, "Branching"),
    ],
    ids=["function", "partial-of-module", "partial-of-function", "bound-method", "script", "trace", "module"],
)
def test_a_model_without_a_name_is_named_by_what_it_is_not_its_type(model, width, expected):
    """Was: 'function', 'partial', 'method', 'RecursiveScriptModule' (TopLevelTracedModule for a trace): every such
    model named alike in the heading and in each row's config["model"], by which the store pairs rows of one model.
    The function's qualified name, Class.method, the scripted class's original name."""
    x = torch.randn(2, width)
    assert model_name(model) == expected
    p = profile_cpu(model, (x,), warmup=0)
    assert p.name == expected
    assert {o.m.config["model"] for o in p.ops} == {expected}


def test_two_scripted_models_profile_under_their_own_names():
    """Two different TorchScript'ed nets no longer share the name RecursiveScriptModule (their rows would pair in
    ``tilestack compare`` as one model's); a lambda keeps its own qualified name."""
    a = profile_cpu(torch.jit.script(pm.ScriptedMLP()), (torch.randn(2, pm.SC_IN),), warmup=0)
    b = profile_cpu(torch.jit.script(pm.PonderBlock()), (torch.randn(2, pm.ACT_LEN, pm.ACT_DIM),), warmup=0)
    assert (a.name, b.name) == ("ScriptedMLP", "PonderBlock")
    lam = profile_cpu(lambda x: NET(x), (torch.randn(2, 4),), warmup=0)  # noqa: PLW0108 - a lambda is what is tested
    assert lam.name.endswith("<lambda>")


def test_an_error_names_the_function_that_raised():
    def decode(x):
        raise ValueError("no end token")

    with pytest.raises(profile.ProfileError, match=r"model 'test_an_error_names_the_function_that_raised.<locals>"
                                                   r".decode' raised ValueError during the warm-up: no end token"):
        profile_cpu(decode, (torch.randn(2, 4),))


# --- models that raise ---------------------------------------------------------------------------------------
class NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("no gradient through this op")


class RaisesInBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return NoGradient.apply(self.fc(x))


class RaisesOnFourthCall(nn.Module):
    """Counts its calls in a buffer changed in place (which a step does not put back: only rebindings are undone)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError(f"call {int(self.calls)} is over the limit of 3")
        return self.fc(x)


class RaisesAlways(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is None:
            raise KeyError("mask")
        return self.fc(x)


def nothing_left_on():
    """No dispatch mode, profiler session, compile stance or patched Tensor constructor left behind."""
    assert _get_current_dispatch_mode() is None
    assert not torch._C._autograd._profiler_enabled()
    assert "__new__" not in vars(torch.Tensor)
    good = profile_cpu(nn.Linear(4, 2), (torch.randn(3, 4),))
    assert good.flops == 2 * 3 * 4 * 2  # the addmm, as torch counts it (its bias add inside)


@pytest.mark.parametrize(
    "model,kw,phase,error",
    [
        (RaisesInBackward, {"train": True}, "warm-up", r"ValueError during the warm-up: no gradient through this op"),
        (RaisesInBackward, {"train": True, "warmup": 0}, "counting pass", r"ValueError during the counting pass"),
        (RaisesOnFourthCall, {"steps": 3}, "profiled steps", r"RuntimeError during the profiled steps: call 4 is over"),
        (RaisesAlways, {"warmup": 0}, "counting pass", r"KeyError during the counting pass: 'mask' \(inputs=\(tensor "
                                                        r"2x4 float32,\)\)"),
    ],
    ids=["backward-warmup", "backward-counting", "fourth-call", "forward-counting"],
)
def test_a_model_that_raises_is_named_with_its_phase_and_put_back(model, kw, phase, error):
    """The model's own error, at whichever phase it comes (the warm-up, the counting pass under the dispatch mode, the
    profiled steps under torch.profiler), surfaces as a ProfileError naming the model, the phase, the error and the
    inputs, chained to the model's exception; the model's parameters, buffers (the call counter) and gradients are put
    back, and nothing is left switched on: a healthy model profiles right after."""
    net = model()
    x = torch.randn(2, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(profile.ProfileError, match=f"model '{model.__name__}' raised {error}") as info:
        profile_cpu(net, (x,), **kw)
    assert phase in str(info.value)
    assert isinstance(info.value.__cause__, ValueError | RuntimeError | KeyError)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    nothing_left_on()


def test_a_scripted_model_that_raises_surfaces_its_message():
    """A TorchScript raise comes back as torch.jit.Error (a RuntimeError) whose text carries the model's message."""

    class Guard(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:
                raise ValueError("one sample at a time")
            return x * 2

    with pytest.raises(profile.ProfileError, match=r"(?s)model 'Guard' raised Error during the warm-up: .*"
                                                   r"ValueError: one sample at a time"):
        profile_cpu(torch.jit.script(Guard()), (torch.randn(2, 4),))
    nothing_left_on()


class Unprintable(Exception):
    """A model's own exception whose __str__ fails (it formats an attribute it was never given)."""

    def __str__(self):
        return f"bad layer {self.layer}"


class RaisesUnprintable(nn.Module):
    def forward(self, x):
        raise Unprintable(x.shape[0])


def test_an_exception_that_cannot_print_itself_is_still_reported_as_the_models():
    """Was: the profiler formatted the model's error with str(), which raised AttributeError from inside the except
    clause, so the caller saw an AttributeError of the profiler's instead of a ProfileError naming the model. Now the
    exception's class and arguments stand in for its text, in the profile and in a target's builder."""
    with pytest.raises(profile.ProfileError, match=r"model 'RaisesUnprintable' raised Unprintable during the warm-up: "
                                                   r"<Unprintable whose str\(\) raised AttributeError; args=\(2,\)>"):
        profile_cpu(RaisesUnprintable(), (torch.randn(2, 4),))
    nothing_left_on()


def test_a_builder_that_raises_an_unprintable_exception_names_the_target(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("class Oops(Exception):\n    def __str__(self):\n        return self.missing\n\n"
                      "def build():\n    raise Oops(3)\n")
    with pytest.raises(profile.ProfileError, match=r"build\(\) raised Oops: <Oops whose str\(\) raised "
                                                   r"AttributeError; args=\(3,\)>"):
        profile.load_target(f"{script}:build")


# --- gradients, hooks, packing, distributions ------------------------------------------------------------------
def test_an_input_that_requires_grad_gets_its_gradient_and_its_old_grad_back():
    """A saliency-style input (requires_grad): the training step counts its gradient (2*B*O*I) beside the weight's,
    and the caller's x.grad is the tensor it was, unchanged."""
    torch.manual_seed(0)
    net, x = nn.Linear(5, 3), torch.randn(4, 5, requires_grad=True)
    old = torch.full((4, 5), 7.0)
    x.grad = old
    p = profile_cpu(net, (x,), train=True)
    x2 = x.detach().clone().requires_grad_()
    counts = counting.count_ops(lambda: net(x2).sum().backward())
    assert x.grad is old and torch.equal(old, torch.full((4, 5), 7.0))
    assert by_op(counts)["aten::mm"] == 2 * (2 * 4 * 3 * 5)  # dx = dy W, dW = dy^T x
    assert profiled_flops(p, "aten::mm") == 2 * (2 * 4 * 3 * 5)


class OptimizerInBackward(nn.Module):
    """Each parameter's SGD (momentum 0.9) steps as soon as its gradient is accumulated (a post-accumulate-grad hook),
    then sets it to None: the optimizer-in-backward pattern; the optimizers in a dict attribute."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)
        self.opts = {n: torch.optim.SGD([p], lr=0.1, momentum=0.9) for n, p in self.named_parameters()}
        for n, p in self.named_parameters():
            p.register_post_accumulate_grad_hook(functools.partial(self._step, n))

    def _step(self, name, param):
        self.opts[name].step()
        self.opts[name].zero_grad()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_optimizer_stepped_in_backward_is_counted_and_put_back():
    """After the warm-up each parameter has a momentum buffer: per element buf.mul_(0.9) (1), buf.add_(grad) (1),
    p.add_(buf, alpha=-lr) (1); the parameters and every optimizer's state are as before the profile."""
    torch.manual_seed(0)
    net, x = OptimizerInBackward(), torch.randn(4, 6)
    elements = sum(p.numel() for p in net.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = profile_cpu(net, (x,), train=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not opt.state for opt in net.opts.values())
    assert profiled_flops(p, "aten::mul_") == elements and profiled_flops(p, "aten::add_") == 2 * elements


def test_pruned_linear_multiplies_its_mask_in_every_forward():
    """l1_unstructured pruning recomputes weight = weight_orig * weight_mask in a forward pre-hook: O*I multiplies per
    forward, and again for weight_orig's gradient in training; the linear 2*B*I*O."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    x = torch.randn(4, 10)
    p = profile_cpu(layer, (x,))
    counts = counting.count_ops(lambda: layer(x))
    assert [c.flops for c in rows_of(counts, "aten::mul")] == [60]
    assert by_op(counts)["aten::addmm"] == 2 * 4 * 10 * 6
    assert p.flops == 60 + 2 * 4 * 10 * 6
    t = profile_cpu(layer, (x,), train=True)
    assert profiled_flops(t, "aten::mul") == 2 * 60
    assert "weight_orig" in dict(layer.named_parameters()) and hasattr(layer, "weight_mask")


class Offloaded(nn.Module):
    """Activations saved for the backward packed to float16 and unpacked to float32 (saved_tensors_hooks)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.half(), lambda t: t.float()):
            return self.fc2(torch.relu(self.fc1(x)))


def test_saved_tensor_hooks_pack_and_unpack_each_saved_tensor_once():
    """Saved: fc1's input x (4x8; its weight needs no save, x needs no gradient), relu's output (4x8), fc2's input
    (4x8, the same tensor, saved again) and weight (8x8). Each is packed (4 bytes read, 2 written per element) and
    unpacked (2 read, 4 written): 6 conversions at 4x8, 2 at 8x8, 6 bytes read and 6 written per saved element; a
    forward-only profile saves nothing."""
    torch.manual_seed(0)
    net, x = Offloaded(), torch.randn(4, 8)
    p = profile_cpu(net, (x,), train=True)
    counts = warmed_counts(net, (x,))
    copies = {shapes: c for (op, shapes), c in counts.items() if op == "aten::_to_copy"}
    assert {s: c.calls for s, c in copies.items()} == {((4, 8),): 6, ((8, 8),): 2}
    saved = 3 * 32 + 64
    assert sum(c.bytes_read for c in copies.values()) == 6 * saved
    assert sum(c.bytes_written for c in copies.values()) == 6 * saved
    assert p.bytes == pytest.approx(sum(c.bytes_read + c.bytes_written for c in counts.values()))
    assert not any(o.op == "aten::_to_copy" for o in profile_cpu(net, (x,)).ops)


class MixtureDensity(nn.Module):
    """A mixture density head: K Gaussians' weights, means and scales from an MLP, the negative log-likelihood by
    torch.distributions.MixtureSameFamily."""

    K = 4

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(3, 16), nn.Linear(16, 3 * self.K)

    def forward(self, x, y):
        logits, mu, log_sigma = self.out(torch.tanh(self.hidden(x))).chunk(3, dim=-1)
        mix = D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(mu, log_sigma.exp()))
        return -mix.log_prob(y).mean()


def test_mixture_density_of_torch_distributions_is_counted_whole():
    """Every op torch.distributions runs has a count (none uncounted): the two logsumexps (Categorical normalising its
    logits, the mixture's log-likelihood) 4 FLOPs per element of (N, K) each; the MLP 2*N*(3*16 + 16*3K)."""
    torch.manual_seed(0)
    n, k = 5, MixtureDensity.K
    net, inputs = MixtureDensity(), (torch.randn(n, 3), torch.randn(n))
    p = profile_cpu(net, inputs, train=True)
    counts = warmed_counts(net, inputs)
    assert not p.unsupported and not any(c.unsupported for c in counts.values())
    assert by_op(counts)["aten::logsumexp"] == 2 * 4 * n * k
    fwd = counting.count_ops(lambda: net(*inputs))
    assert by_op(fwd)["aten::addmm"] == 2 * n * (3 * 16 + 16 * 3 * k)
    assert_rows_add_up(p, counts)


class Siamese(nn.Module):
    """One tower registered twice (as left and right): its weights shared by both inputs."""

    def __init__(self):
        super().__init__()
        tower = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.left, self.right = tower, tower

    def forward(self, a, b):
        return (self.left(a) - self.right(b)).pow(2).sum(-1)


def test_a_tower_registered_twice_is_counted_per_use_and_put_back_once():
    """Both inputs through the one tower: one addmm row of 2 calls, 2*B*6*8 each; training adds each use's weight
    gradient (2*B*6*8 each: the inputs need none), summed into the one .grad; the shared parameters put back."""
    torch.manual_seed(0)
    net, a, b = Siamese(), torch.randn(3, 6), torch.randn(3, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = profile_cpu(net, (a, b))
    (row,) = [o for o in p.ops if o.op == "aten::addmm"]
    assert row.calls == 2 and row.m.flops == 2 * 3 * 6 * 8
    assert len(list(net.parameters())) == 2
    t = profile_cpu(net, (a, b), train=True)
    assert profiled_flops(t, "aten::mm") == 2 * (2 * 3 * 6 * 8)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(q.grad is None for q in net.parameters())


# --- rows of two dtypes (fixed), work on other threads (open) ----------------------------------------------------
class TwoPrecisions(nn.Module):
    """One Linear in fp32 and one in bf16, of the same width, on inputs of the same shape."""

    def __init__(self):
        super().__init__()
        # (not `self.half`: nn.Module.half, the method, is found before the submodule)
        self.full, self.low = nn.Linear(64, 64), nn.Linear(64, 64).bfloat16()

    def forward(self, x):
        return self.full(x).sum() + self.low(x.bfloat16()).float().sum()


def test_the_same_op_at_the_same_shapes_in_two_dtypes_is_two_rows():
    torch.manual_seed(0)
    ceilings = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "bf16": 8e11}, "now")
    p = profile.profile_model(TwoPrecisions(), (torch.randn(32, 64),), steps=1, warmup=1, ceilings=ceilings,
                              device="cpu")
    rows = {o.m.dtype: o for o in p.ops if o.op == "aten::addmm"}
    assert set(rows) == {"fp32", "bf16"}
    flops = 2 * 32 * 64 * 64
    assert rows["fp32"].m.bytes == 4 * (64 + 32 * 64 + 64 * 64 + 32 * 64)
    assert rows["bf16"].m.bytes == 2 * (64 + 32 * 64 + 64 * 64 + 32 * 64)
    assert rows["fp32"].m.flops == rows["bf16"].m.flops == flops


class ThreadedBranches(nn.Module):
    """Two Linears run side by side on a thread pool, their outputs added on the calling thread."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.pool = concurrent.futures.ThreadPoolExecutor(2)

    def forward(self, x):
        fa, fb = self.pool.submit(self.a, x), self.pool.submit(self.b, x)
        return fa.result() + fb.result()


@pytest.mark.xfail(strict=True, reason=(
    "a TorchDispatchMode and torch.profiler's CPU op events are per thread: the two Linears run on the pool's threads "
    "are neither counted nor timed, and the profile reports the calling thread's add alone (2*B*32 FLOPs) as the "
    "whole step, silently; counting other threads needs the mode pushed in each worker thread"))
def test_work_on_other_threads_is_counted():
    torch.manual_seed(0)
    net = ThreadedBranches()
    try:
        p = profile_cpu(net, (torch.randn(8, 32),))
    finally:
        net.pool.shutdown()
    assert p.flops == 2 * (2 * 8 * 32 * 32) + 8 * 32
