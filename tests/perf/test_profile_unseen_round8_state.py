"""Eighth held-out round, part two (tests/perf/perf_models_round8.py): what a profile leaves behind, the bytes of
overlapping windows, and arguments refused by name. The counts of the round's models are in
tests/perf/test_profile_unseen_round8.py.

What the round found (each pinned by the test whose docstring says so):
- profiling changed state a module keeps in plain attributes, which ``profile_state.preserved`` did not put back
  (it restored parameters, buffers, gradients, modes and the global RNG): a stateful LSTM's (h, c) carried from
  call to call moved on by every profiled step; ActNorm's Python "initialised" flag stayed set while its
  parameters were put back to their uninitialised values (the next output neither the profiled nor the unprofiled
  one); a model's own torch.Generator advanced; counters, lists a hook appends to, and attributes a forward adds
  were left changed. All are put back now (rebound, refilled, their generator states and tensor values restored);
- overlapping windows (as_strided, Tensor.unfold with a step below the window) were counted as read once per window
  element: a signal of 40 doubles cut into 8 windows of 6 read as 96, where the copy reads the 40 it spans;
- a functools.partial of a model (or of its forward) was profiled with nothing put back: BatchNorm statistics
  moved and gradients were left in .grad; the partial is unwrapped to its module, and nets and tensors it binds
  are kept;
- a float64 model profiled with the cached ceilings (ceilings=None) had no fp64 roof on a CPU: every row read
  "bound unknown"; the profile now measures the roofs its step's dtypes lack (profile._with_roofs_for);
- a numpy array inside the inputs (a tuple's element, a dict's value) failed in the first step with "linear():
  argument 'input' must be Tensor, not numpy.ndarray", naming no argument and nothing expected;
- formulas.causal_fraction (new) refuses lengths that are not positive whole numbers and a non-bool alignment;
  fft_flops, factorization_flops, householder_apply_flops, elementwise, transformer_train_flops_per_token,
  layernorm and matmul returned numbers (negative, fractional, or a flag's truthiness taken) for arguments that
  mean nothing: each is refused by name.
"""

import collections
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tilestack.perf import counting, device, formulas, profile
from tilestack.perf.formulas import LaunchError

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round8 as pm  # noqa: E402
import perf_models_round8b as pmb  # noqa: E402
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402
from profile_support import CEIL, rows_of  # noqa: E402

pytestmark = FILTERS


def snapshot(model, inputs):
    """Everything a profile could change that a state dict shows: parameters and buffers by name, their gradients,
    each module's mode, the input tensors, and the RNG states of torch and Python."""
    args, kwargs = profile.as_call(inputs)
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [t.clone() for t in counting._tensors((args, kwargs))],
        torch.get_rng_state(),
        random.getstate(),
    )


def assert_same(a, b):
    state_a, grads_a, modes_a, inputs_a, rng_a, py_a = a
    state_b, grads_b, modes_b, inputs_b, rng_b, py_b = b
    assert state_a.keys() == state_b.keys()
    changed = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not changed, changed
    moved = [k for k in grads_a if (grads_a[k] is None) != (grads_b[k] is None)
             or grads_a[k] is not None and not torch.equal(grads_a[k], grads_b[k])]
    assert not moved, moved
    assert modes_a == modes_b
    assert all(torch.equal(x, y) for x, y in zip(inputs_a, inputs_b, strict=True))
    assert torch.equal(rng_a, rng_b) and py_a == py_b


def outputs_of(build, calls):
    """The outputs of ``calls`` calls of a freshly built model: what an unprofiled caller sees."""
    model, inputs = build()
    args, kwargs = profile.as_call(inputs)
    torch.manual_seed(1)
    return [counting._tensors(model(*args, **kwargs)) for _ in range(calls)]


@pytest.mark.parametrize("name,train", [
    ("stateful_lm", False), ("stateful_lm", True), ("glow_step", False), ("glow_step", True),
    ("modulated_conv", False), ("modulated_conv", True), ("sn_discriminator", True), ("conformer_conv", True),
])
def test_profiling_leaves_the_model_as_it_found_it(name, train):
    """The stateful LM's (h, c) in a plain attribute moved on with every profiled step, Glow's ActNorm was left
    "initialised" with its parameters put back to zeros, the modulated convolution's own torch.Generator advanced:
    after a profile the model's next two outputs were not what an unprofiled model gives. Now they are, and the
    parameters, buffers (spectral norm's u and v, BatchNorm's statistics), gradients and RNG are as they were."""
    build = pm.MODELS[name][0]
    expected = outputs_of(build, 2)
    model, inputs = build()
    before = snapshot(model, inputs)
    profile_cpu(model, inputs, steps=2, train=train)
    assert_same(before, snapshot(model, inputs))
    args, kwargs = profile.as_call(inputs)
    torch.manual_seed(1)
    got = [counting._tensors(model(*args, **kwargs)) for _ in range(2)]
    for want, have in zip(expected, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(want, have, strict=True))


ALL_MODELS = {**pm.MODELS, **pmb.MODELS}


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_model_of_the_round_is_left_as_it_was(name):
    """Every model of the round, profiled with its backward where it has one: its state (snapshot) and its next
    output are those of the model unprofiled."""
    build, trainable = ALL_MODELS[name]
    expected = outputs_of(build, 1)
    model, inputs = build()
    before = snapshot(model, inputs)
    profile_cpu(model, inputs, train=trainable)
    assert_same(before, snapshot(model, inputs))
    args, kwargs = profile.as_call(inputs)
    torch.manual_seed(1)
    got = counting._tensors(model(*args, **kwargs))
    assert all(torch.equal(x, y) for x, y in zip(expected[0], got, strict=True))


def test_plain_attributes_are_rebound_refilled_and_removed():
    """A counter, a list a forward hook appends to, a dict, a set and a deque (a frame stack) filled in forward, a
    tensor attribute written in place, one rebound, an attribute the forward adds, and a generator: each as it was
    after the profile."""

    class Keeper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.calls, self.seen, self.shapes = 0, {}, set()
            self.features: list = []
            self.frames = collections.deque([torch.zeros(3)], maxlen=2)  # the last inputs, a frame stack
            self.total = torch.zeros(3)  # written in place
            self.last = torch.zeros(3)  # rebound
            self.gen = torch.Generator().manual_seed(5)
            self.lin.register_forward_hook(lambda m, i, o: self.features.append(o.detach()))

        def forward(self, x):
            self.calls += 1
            self.seen[self.calls] = x.shape[0]
            self.shapes.add(tuple(x.shape))
            self.frames.append(x[0])
            self.total.add_(x.sum(0))
            self.last = x.mean(0)
            self.cache = x * 2  # added by the forward
            return self.lin(x) + torch.rand(3, generator=self.gen)

    model, x = Keeper(), torch.randn(4, 3)
    last, gen_state = model.last, model.gen.get_state()
    profile_cpu(model, (x,), steps=2, train=True)
    assert model.calls == 0 and model.seen == {} and model.shapes == set() and model.features == []
    assert len(model.frames) == 1 and model.frames.maxlen == 2 and torch.equal(model.frames[0], torch.zeros(3))
    assert torch.equal(model.total, torch.zeros(3)) and model.last is last and not hasattr(model, "cache")
    assert torch.equal(model.gen.get_state(), gen_state)
    assert len(model.lin._forward_hooks) == 1  # the hook (an nn.Module internal) is untouched


def test_state_attributes_are_put_back_when_the_model_raises():
    """A model failing on its third call leaves its counter and carried state as they were before the profile."""

    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls, self.state = nn.Linear(2, 2), 0, None

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("third call")
            self.state = self.lin(x).detach()
            return self.state

    model = Flaky()
    with pytest.raises(profile.ProfileError, match="raised ValueError"):
        profile.profile_model(model, (torch.randn(3, 2),), steps=1, warmup=2, ceilings=CEIL, device="cpu")
    assert model.calls == 0 and model.state is None


def test_a_float64_model_profiled_with_the_cached_ceilings_gets_an_fp64_roof():
    """With ceilings=None a CPU's cached ceilings hold fp32 and bf16 roofs only: every row of the float64
    autoencoder read "bound unknown", its tip pointing to a remeasure that measures fp32 and bf16 again. The
    profile now measures the roof of the dtype its step computes in (and caches it); given ceilings stay as given."""
    cpu = device.detect("cpu")
    assert device.ceilings(cpu).peak("fp64") is None  # the cache as a first profile or `tilestack device` leaves it
    model, inputs = pm.tied_autoencoder()
    p = profile.profile_model(model, inputs, steps=1, warmup=1, device="cpu")
    assert p.ceilings.peak("fp64") > 0
    rows = [o for o in p.ops if o.counted and o.m.flops > 0]
    assert rows and all(o.m.dtype == "fp64" and o.bound in ("memory", "compute") for o in rows)
    assert device.ceilings(cpu).peak("fp64") == p.ceilings.peak("fp64")  # cached for the next profile
    given = profile.profile_model(model, inputs, steps=1, warmup=1, device="cpu", ceilings=CEIL)
    assert given.ceilings is CEIL and all(o.bound == "unknown" for o in given.ops if o.counted and o.m.flops > 0)


def test_a_partial_of_a_model_is_left_as_it_was():
    """functools.partial(net, mask=...) or of net.forward: nothing was put back (the partial is neither a module
    nor a bound method), so the Conformer's BatchNorm statistics moved with every profiled step and the training
    profile left its gradients in .grad. The partial is unwrapped to its module; a net or a tensor it binds as an
    argument is kept too."""
    import functools

    for wrap in (lambda m: m, lambda m: m.forward):
        model, (x,) = pm.conformer_conv()
        before = snapshot(model, (x,))
        scale = torch.ones(1)

        def scaled(x, *, net, scale):
            scale.mul_(2)  # a bound tensor written in place
            return net(x) * scale

        call = functools.partial(functools.partial(scaled, net=wrap(model)), scale=scale)
        profile_cpu(functools.partial(wrap(model)), (x,), train=True)
        assert_same(before, snapshot(model, (x,)))
        profile_cpu(call, (x,), train=True)
        assert torch.equal(scale, torch.ones(1))
        assert_same(before, snapshot(model, (x,)))  # the net the partial binds: kept too


def test_a_lazy_module_still_keeps_what_its_first_forward_made():
    """A lazy module's first forward sets its attributes (in_features) and class: those stay, as its parameters."""
    model, x = nn.Sequential(nn.LazyLinear(5), nn.ReLU()), torch.randn(4, 3)
    profile_cpu(model, (x,))
    assert type(model[0]) is nn.Linear and model[0].in_features == 3 and model(x).shape == (4, 5)


def test_overlapping_windows_are_read_as_the_memory_they_span():
    """The autoencoder's as_strided windows (8 windows of 6 doubles, stride 2, over 20 per row) were read as
    8 * 6 doubles per row; the copy reads the 20 they span. Tensor.unfold with step 1 the same; an expanded tensor
    is still read as held, and a strided slice (every other element) as its own elements, not the span."""
    _, counts, _ = profile_counts(pm.tied_autoencoder)
    (copy,) = [c for (op, shapes), c in counts.items() if op == "aten::clone"]
    assert copy.bytes_read == 8 * pm.BATCH * pm.AE_LEN
    assert copy.bytes_written == 8 * pm.BATCH * pm.windows_count() * pm.AE_WINDOW
    signal = torch.randn(3, 50)
    unfold = counting.count_ops(lambda: signal.unfold(1, 5, 1).contiguous())
    (row,) = rows_of(unfold, "aten::clone")
    assert row.bytes_read == 4 * 3 * 50 and row.bytes_written == 4 * 3 * 46 * 5
    column = torch.randn(6, 1)
    expanded = counting.count_ops(lambda: column.expand(6, 40).contiguous())
    assert rows_of(expanded, "aten::clone")[0].bytes_read == 4 * 6
    every_other = counting.count_ops(lambda: signal[:, ::2].contiguous())
    assert rows_of(every_other, "aten::clone")[0].bytes_read == 4 * 3 * 25


def profile_counts(build):
    model, inputs = build()
    step = profile.make_step(model, inputs)
    return model, counting.count_ops(step), inputs


@pytest.mark.parametrize("inputs,where", [
    ((np.ones((2, 4), dtype=np.float32),), r"inputs\[0\]=a numpy array of shape \(2, 4\) \(float32\); expected a "
                                           r"torch tensor \(torch.from_numpy"),
    ({"input": np.ones((2, 4))}, r"inputs\['input'\]=a numpy array of shape \(2, 4\) \(float64\); expected a torch"),
    (([torch.ones(2, 4), {"mask": np.ones(3)}],), r"inputs\[0\]\[1\]\['mask'\]=a numpy array of shape \(3,\)"),
])
def test_a_numpy_array_inside_the_inputs_is_refused_by_position(inputs, where):
    """An array inside the inputs failed in the model's first step ("linear(): argument 'input' must be Tensor,
    not numpy.ndarray"); refused before any work, naming where it is and how to make it a tensor."""
    model = nn.Linear(4, 3)
    with pytest.raises(profile.ProfileError, match=where):
        profile.profile_model(model, inputs, steps=1, warmup=0, ceilings=CEIL, device="cpu")


def test_a_numpy_scalar_argument_is_still_taken():
    """A numpy scalar (a float the model multiplies by) is no array: taken as the model takes it."""

    class Scaled(nn.Module):
        def forward(self, x, scale):
            return x * scale

    p = profile.profile_model(Scaled(), (torch.randn(3), np.float32(2.0)), steps=1, warmup=0, ceilings=CEIL,
                              device="cpu")
    assert p.flops == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"n_q": 3.5, "n_kv": 8}, r"n_q=3.5 \(float\); expected a positive whole size"),
    ({"n_q": 4, "n_kv": 0}, r"n_kv=0 \(int\); expected a positive whole size"),
    ({"n_q": True, "n_kv": 8}, r"n_q=True \(bool\); expected a positive whole size"),
    ({"n_q": 4, "n_kv": 8, "lower_right": "yes"}, r"lower_right='yes' \(str\); expected True or False"),
])
def test_causal_fraction_refuses_bad_arguments_by_name(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        formulas.causal_fraction(**kwargs)


@pytest.mark.parametrize("call,message", [
    (lambda: formulas.fft_flops(-3), r"points=-3 \(int\); expected a whole count >= 0"),
    (lambda: formulas.fft_flops(2.5), r"points=2.5 \(float\); expected a whole count >= 0"),
    (lambda: formulas.fft_flops(8, real="yes"), r"real='yes' \(str\); expected True or False"),
    (lambda: formulas.factorization_flops("lu", -3, 3), r"m=-3 \(int\); expected a whole count >= 0"),
    (lambda: formulas.factorization_flops("qr", 4, 3, vectors="no"), r"vectors='no' \(str\); expected True"),
    (lambda: formulas.householder_apply_flops(-1, 2, 3), r"rows=-1 \(int\); expected a whole count >= 0"),
    (lambda: formulas.elementwise(10, flops_per_element=-1), r"flops_per_element=-1 \(int\); expected a finite"),
    (lambda: formulas.elementwise(10, inputs=1.5), r"inputs=1.5 \(float\); expected a whole count >= 0"),
    (lambda: formulas.transformer_train_flops_per_token(matmul_params=-1, n_layer=2, seq=4, attention_width=8),
     r"matmul_params=-1 \(int\); expected a whole count >= 0"),
    (lambda: formulas.layernorm(2, 3, affine="no"), r"affine='no' \(str\); expected True or False"),
    (lambda: formulas.matmul(2, 3, 4, bias="no"), r"bias='no' \(str\); expected True or False"),
])
def test_cost_formulas_refuse_bad_arguments_by_name(call, message):
    """These returned numbers for arguments that mean nothing: fft_flops(-3) 0 and fft_flops(2.5) 16.5 FLOPs,
    real="yes" halved the count (truthy), factorization_flops("lu", -3, 3) -18 FLOPs, householder_apply_flops
    and the per-token training FLOPs negative counts, elementwise(flops_per_element=-1) negative FLOPs,
    layernorm(affine="no") and matmul(bias="no") the affine's and the bias's bytes. Each is refused by name."""
    with pytest.raises(LaunchError, match=message):
        call()


def test_cost_formulas_still_take_empty_sizes():
    """0 points, an empty matrix and no right-hand sides are counts, not errors: 0 FLOPs (the counting pass meets
    them in empty batches)."""
    assert formulas.fft_flops(0) == formulas.fft_flops(1) == 0
    assert formulas.factorization_flops("solve", 0, 0, 0) == 0
    assert formulas.householder_apply_flops(5, 0, 2) == 0


def test_an_empty_causal_attention_counts_nothing():
    """Zero queries under is_causal (the GPU kernels take them): the share of no scores is not an error, and the
    count is 0 (torch's own SDPA sums an empty query on the CPU instead: no attention op at all)."""
    q, k = torch.empty(1, 0, 2, 4, device="meta"), torch.empty(1, 5, 2, 4, device="meta")
    counts = counting.count_ops(lambda: torch.ops.aten._efficient_attention_forward(
        q, k, k, None, None, None, None, None, 0.0, 1))
    assert [c.flops for c in rows_of(counts, "aten::_efficient_attention_forward")] == [0]
