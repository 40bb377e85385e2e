"""Twelfth held-out round, part two (tests/perf/perf_models_round12.py): what a profile leaves behind, the round's
counting fix op by op, and models that cannot be profiled. The counts of the round's models are in
tests/perf/test_profile_unseen_round12.py.

What the round found (each pinned by the test whose docstring says so):
- a forward that sets ``requires_grad`` (progressive freezing: ``self.encoder.requires_grad_(False)`` from its second
  call on) left the caller's parameters frozen after profiling: ``profile_state.preserved`` put back their values,
  gradients and the modules' training modes, not whether they require grad, so the caller's next training step
  silently skipped the encoder's gradients;
- a forward that builds a submodule on its first call (``if self.head is None: self.head = nn.Linear(...)``) or swaps
  one (``self.act = nn.Tanh()``) left the caller's model inconsistent: the plain attribute ``head`` was put back to
  None, but ``_modules`` (which preserved did not put back) still held the head, so ``parameters()`` and
  ``state_dict()`` held weights the model's forward would throw away and rebuild, and the swapped activation stayed;
  likewise the hook tables: a forward registering a hook at every call left one per profiled step on the caller's
  layer, and each timed step ran one more hook than the counted step; and a table the forward reordered (a buffer
  re-registered, a hook moved last) was put back out of order (state_dict's keys, the order hooks run in);
- nn.Embedding(max_norm=...) renorms its looked-up rows in place (``aten::embedding_renorm_``): it was counted as
  reading and writing the whole table and renorming one row per token; its kernel visits each distinct row once. A
  50k-row table looked up for a few tokens read as moving the table twice per call;
- an EmbeddingBag(mode='max')'s backward was counted as a sum bag's, an add per entry and column; its kernel adds
  each non-empty bag's gradient row into the entries that held the maxima, one per bag and column.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tilestack.perf import counting, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round12 as pm  # noqa: E402
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402

pytestmark = FILTERS
RENORM_FLOPS_PER_ELEMENT = 3  # a row's norm (square and accumulate: 2 per element) and its rescale (1)
F32 = 4  # bytes


def snapshot(model):
    """Everything a caller could see of a module: its state dict's values, which parameters require grad, the
    submodule of each name, the training flag of each, and plain attributes."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        {k: type(m) for k, m in model.named_modules()},
        {k: m.training for k, m in model.named_modules()},
        {k: v for k, v in vars(model).items() if not k.startswith("_") and k != "training"},
    )


def assert_same(before, after):
    values, flags, kinds, modes, attributes = before
    values2, flags2, kinds2, modes2, attributes2 = after
    assert values.keys() == values2.keys()
    assert all(torch.equal(values[k], values2[k]) for k in values)
    assert (flags, kinds, modes, attributes) == (flags2, kinds2, modes2, attributes2)


# --- state put back -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_self_freezing_encoder_requires_grad_again_after_profiling(train):
    """Found by the round: a forward freezing its encoder from its second call on left the caller's encoder frozen
    (requires_grad False). Now every parameter requires grad as before, the call counter is back at 0, and the
    caller's own first training step still trains the encoder (its gradient is set)."""
    model, inputs = pm.self_freezing()
    before = snapshot(model)
    profile_cpu(model, inputs, train=train)
    assert_same(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters()) and model.calls == 0
    model(*inputs).sum().backward()  # the caller's first call: the encoder not yet frozen
    assert model.encoder.weight.grad is not None and model.encoder.weight.grad.abs().sum() > 0


def test_self_freezing_counts_the_frozen_step():
    """Every profiled step starts from the state the warm-up left (its second call on): the encoder frozen, so the
    backward is the head's weight gradient only, 2*B*H*C, with no gradient flowing into the encoder."""
    model, inputs = pm.self_freezing()
    p = profile_cpu(model, inputs, train=True)
    forward = 2 * pm.BATCH * (pm.FZ_IN * pm.FZ_HIDDEN + pm.FZ_HIDDEN * pm.FZ_OUT)
    head_weight_grad = 2 * pm.BATCH * pm.FZ_HIDDEN * pm.FZ_OUT
    matmuls = math.fsum(o.m.flops * o.calls for o in p.ops if o.op in ("aten::addmm", "aten::mm"))
    assert matmuls == forward + head_weight_grad


@pytest.mark.parametrize("train", [False, True])
def test_lazy_head_built_in_forward_is_not_left_behind(train):
    """Found by the round: a head built by the first call, and an activation swapped by it, stayed in the caller's
    ``_modules`` after profiling while the attribute read None: ``parameters()`` held 4 tensors, ``state_dict()`` the
    head's weights, the activation was the swapped Tanh. Now the model is as built: no head, ReLU, 2 parameters;
    its first call builds the head as it would have unprofiled."""
    model, inputs = pm.lazy_head()
    before = snapshot(model)
    p = profile_cpu(model, inputs, train=train)
    assert_same(before, snapshot(model))
    assert model.head is None and isinstance(model.act, nn.ReLU) and "head" not in model._modules
    assert len(list(model.parameters())) == 2
    # the profiled steps ran the built head and the swapped activation: body, head, one tanh
    assert p.flops >= 2 * 3 * (pm.LH_IN * pm.LH_HIDDEN + pm.LH_HIDDEN * pm.LH_OUT) + 3 * pm.LH_HIDDEN
    assert "aten::tanh" in {o.op for o in p.ops} and "aten::relu" not in {o.op for o in p.ops}
    model(*inputs)
    assert isinstance(model.head, nn.Linear) and isinstance(model.act, nn.Tanh)


@pytest.mark.parametrize("name", ["max_norm_lookup", "volumetric", "pairs_random", "checkpointed_dropout",
                                  "cached_symmetric", "packed_lstm", "weighted_bags"])
@pytest.mark.parametrize("train", [False, True])
def test_models_are_put_back(name, train):
    """The round's models with state a step changes (an embedding renormed in place, InstanceNorm's and cumulative
    BatchNorm's running statistics and batch counts, random layers in training mode, a parametrization's original)
    are as built after a profile, their RNG state too, and no parameter is left with a gradient."""
    model, inputs = pm.MODELS[name][0]()
    before = snapshot(model)
    rng = torch.get_rng_state()
    profile_cpu(model, inputs, train=train)
    assert_same(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_no_parameter_model_leaves_its_input_gradient_as_found():
    """A model with no parameters trains through its input (requires_grad): the profile's gradients are not left in
    the caller's input, which keeps its own gradient, and the input's values are unchanged."""
    model, (x,) = pm.no_parameters()
    x.grad = torch.full_like(x, 7.0)
    x0 = x.detach().clone()
    p = profile_cpu(model, (x,), train=True)
    assert torch.equal(x.grad, torch.full_like(x, 7.0)) and torch.equal(x.detach(), x0) and x.requires_grad
    assert p.flops > 0 and not any(o.op.endswith("addmm") for o in p.ops)


def test_random_layers_are_measured_deterministically():
    """Dropout-like layers in training mode (RReLU's slopes, AlphaDropout, FeatureAlphaDropout, an LSTM's dropout
    between layers, dropout inside a checkpoint) draw the same numbers in every step: two profiles of one model count
    the same FLOPs and bytes row by row, and the RNG is where it was."""
    for name in ("pairs_random", "packed_lstm", "checkpointed_dropout"):
        model, inputs = pm.MODELS[name][0]()
        rng = torch.get_rng_state()
        a, b = profile_cpu(model, inputs, train=True), profile_cpu(model, inputs, train=True)
        assert torch.equal(rng, torch.get_rng_state())
        rows = lambda p: sorted((o.op, o.shapes, o.calls, o.m.flops, o.m.bytes) for o in p.ops if o.counted)  # noqa: E731
        assert rows(a) == rows(b) and a.flops == b.flops and a.bytes == b.bytes, name


# --- embedding_renorm_: each distinct row once --------------------------------------------------------------
def test_max_norm_renorms_each_distinct_row_once():
    """Found by the round: nn.Embedding(max_norm=...)'s in-place renorm was counted over every token (8 here) and as
    reading and writing the whole table (50 rows). Its kernel sorts the ids and visits each distinct row once (4:
    ids 4, 9, 17, 30): 3 FLOPs per element of those rows (norm and rescale), reading the ids and those rows, writing
    those rows."""
    model, (ids,) = pm.max_norm_lookup()
    counts = counting.count_ops(lambda: model(ids))
    (renorm,) = [c for (op, _), c in counts.items() if op == "aten::embedding_renorm_"]
    distinct = len({i for row in pm.MN_IDS for i in row})
    assert distinct == 4 < ids.numel()
    assert renorm.flops == RENORM_FLOPS_PER_ELEMENT * distinct * pm.MN_DIM
    assert renorm.bytes_read == ids.numel() * ids.element_size() + distinct * pm.MN_DIM * F32
    assert renorm.bytes_written == distinct * pm.MN_DIM * F32


def test_max_norm_on_a_large_table_moves_the_rows_not_the_table():
    """A 50k x 64 table renormed for one repeated token: 64 * 3 FLOPs and one row read and written (256 B each), not
    the table's 12.8 MB; the lookup itself reads one row per token. On meta tensors (no values) every id is taken as
    distinct: an upper bound, never more than the table."""
    emb = nn.Embedding(50_000, 64, max_norm=1.0)
    ids = torch.full((2, 16), 123)
    counts = counting.count_ops(lambda: emb(ids))
    (renorm,) = [c for (op, _), c in counts.items() if op == "aten::embedding_renorm_"]
    (lookup,) = [c for (op, _), c in counts.items() if op == "aten::embedding"]
    assert renorm.flops == RENORM_FLOPS_PER_ELEMENT * 64
    assert (renorm.bytes_read, renorm.bytes_written) == (ids.numel() * 8 + 64 * F32, 64 * F32)
    assert lookup.bytes_read == ids.numel() * 8 + ids.numel() * 64 * F32
    with torch.device("meta"):
        meta_emb = nn.Embedding(50_000, 64, max_norm=1.0)
        meta_ids = torch.zeros(2, 16, dtype=torch.long)
    counts = counting.count_ops(lambda: meta_emb(meta_ids))
    (renorm,) = [c for (op, _), c in counts.items() if op == "aten::embedding_renorm_"]
    assert renorm.flops == RENORM_FLOPS_PER_ELEMENT * 32 * 64 and renorm.bytes_written == 32 * 64 * F32


def test_max_norm_lookup_profile_rows_and_table_put_back():
    """Through profile_model: the renorm row carries the distinct rows' counts, the caller's table is as built (the
    profile's renorms undone), and the model's next output is the one it gives unprofiled."""
    model, (ids,) = pm.max_norm_lookup()
    fresh, _ = pm.max_norm_lookup()
    p = profile_cpu(model, (ids,), train=True)
    (row,) = [o for o in p.ops if o.op == "aten::embedding_renorm_"]
    assert row.calls == 1 and row.m.flops == RENORM_FLOPS_PER_ELEMENT * 4 * pm.MN_DIM
    assert torch.equal(model.emb.weight, fresh.emb.weight)
    assert torch.equal(model(ids), fresh(ids))


# --- EmbeddingBag max: one gradient row per bag ---------------------------------------------------------------
def test_max_bag_backward_adds_one_row_per_non_empty_bag():
    """Found by the round: an EmbeddingBag(mode='max')'s backward was counted as the sum bag's, one add per entry and
    column (10 entries x 4 here); torch's kernel index_adds each non-empty bag's gradient into the one entry that
    held the maximum of each column (3 non-empty bags of 4: 12 adds). As a reference, the table's gradient has
    exactly one contribution per (non-empty bag, column): their count is the gradient's number of nonzeros (the
    bags' maxima here fall on distinct rows per column)."""
    model, (ids, offsets, weights) = pm.weighted_bags()
    bags = offsets[:-1]  # (0, 3, 3, 7): the second bag empty
    bag = model.max

    def step():
        bag(ids, bags).sum().backward()

    counts = counting.count_ops(step)
    (backward,) = [c for (op, _), c in counts.items() if op == "aten::_embedding_bag_backward"]
    sizes = torch.diff(torch.cat([bags, torch.tensor([ids.numel()])]))
    non_empty = int((sizes > 0).sum())
    assert non_empty == 3
    assert backward.flops == non_empty * pm.BAG_DIM
    bag.weight.grad = None
    step()
    assert int((bag.weight.grad != 0).sum()) == non_empty * pm.BAG_DIM


def test_sum_bag_backward_still_adds_each_entry():
    """The sum bag with per-sample weights keeps its count: each entry's row gets the bag's gradient times its weight
    (a multiply and an add per element, 10 entries x 4 columns); the empty bag (include_last_offset) adds nothing."""
    model, (ids, offsets, weights) = pm.weighted_bags()

    def step():
        model.sum(ids, offsets, per_sample_weights=weights).sum().backward()

    counts = counting.count_ops(step)
    (backward,) = [c for (op, _), c in counts.items() if op == "aten::_embedding_bag_backward"]
    assert backward.flops == 2 * len(pm.BAG_IDS) * pm.BAG_DIM


class HookEveryCall(nn.Module):
    """A forward that registers a forward hook on its layer at every call (a leak the user has not noticed): each
    call doubles the layer's output once more."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin.register_forward_hook(lambda module, args, out: out * 2)
        return self.lin(x)


def test_hooks_registered_in_forward_are_not_left_behind():
    """Found by the round: a forward registering a hook at every call left one hook per profiled step (warm-up,
    counting, the profiler's own and the timed steps: 4 here) on the caller's layer, so its next output was 2**5 times
    the layer's instead of 2 times; and every timed step ran one hook more than the counted one. The hook tables are
    put back like the parameter tables: no hook after profiling, each step running the warm-up's hook and its own
    (two doublings: 2 muls of R x 4 counted)."""
    model, fresh = HookEveryCall(), HookEveryCall()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 4)
    p = profile_cpu(model, (x,), steps=2)
    assert len(model.lin._forward_hooks) == 0
    assert torch.equal(model(x), fresh(x))
    (mul,) = [o for o in p.ops if o.op == "aten::mul"]
    assert mul.calls == 2 and mul.m.flops == 3 * 4


def test_lazy_module_keeps_what_its_first_forward_made():
    """A lazy layer's first forward materialises its parameters and removes its initialising hook: those stay (the
    hook tables are not put back for a module that was lazy), and it runs again after the profile."""
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU())
    x = torch.randn(3, 4)
    profile_cpu(model, (x,))
    assert isinstance(model[0], nn.Linear) and model[0].weight.shape == (5, 4)
    assert len(model[0]._forward_pre_hooks) == 0
    assert model(x).shape == (3, 5)


# --- models that cannot be profiled, and inputs that can ------------------------------------------------------
class FailsOnSecondCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise ValueError("refusing call 2")
        return self.lin(x)


def nothing_left_on(fastpath_before):
    assert not torch.autograd.profiler._is_profiler_enabled
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch.is_grad_enabled() and torch.backends.mha.get_fastpath_enabled() == fastpath_before


@pytest.mark.parametrize("warmup,phase", [(1, "counting pass"), (2, "warm-up")])
def test_a_model_raising_on_its_second_call_names_the_phase(warmup, phase):
    """The second call raises: in the counting pass after one warm-up step, in the warm-up after two. A ProfileError
    names the model, the phase and the inputs, chains the model's error, and leaves nothing on (profiler, dispatch
    mode, grad mode, MHA fast path) and the model as it was (its call counter back at 0)."""
    model, x = FailsOnSecondCall(), torch.randn(3, 4)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    expected = rf"model 'FailsOnSecondCall' raised ValueError during the {phase}: refusing call 2 \(inputs=\(tensor 3x4"
    with pytest.raises(profile.ProfileError, match=expected + r" float32,\)\)") as e:
        profile_cpu(model, (x,), warmup=warmup)
    assert isinstance(e.value.__cause__, ValueError)
    assert model.calls == 0
    nothing_left_on(fastpath)


def test_without_warm_up_every_step_is_the_first_call():
    """With warmup=0 every step starts from the state before profiling (``same_state``): each is the model's first
    call, so the one that would raise never runs; the profile counts the linear once per step."""
    model = FailsOnSecondCall()
    p = profile_cpu(model, (torch.randn(3, 4),), warmup=0, steps=3)
    assert model.calls == 0 and p.flops == 2 * 3 * 4 * 4
    nothing_left_on(torch.backends.mha.get_fastpath_enabled())


def test_train_on_integer_and_bool_models_refused_before_running():
    """train=True on a model with no parameter and integer or bool inputs is refused before any call, naming train,
    the model and what to pass instead."""
    for build in (pm.int_hash, pm.bool_logic):
        model, inputs = build()
        calls: list[int] = []
        model.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        with pytest.raises(profile.ProfileError, match=rf"train=True, but model {type(model).__name__} has no "
                                                       r"parameter that requires grad.*expected train=False"):
            profile_cpu(model, inputs, train=True)
        assert calls == []


class ArgmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {"label": self.lin(x).argmax(-1), "note": "no float output"}


def test_train_with_only_integer_outputs_names_what_is_missing():
    """A model whose outputs are all integers (argmax labels) has nothing to backpropagate: train=True fails in the
    warm-up with the ProfileError that says so (no output requires grad; expected train=False), and no gradient is
    left on its parameters."""
    model = ArgmaxHead()
    with pytest.raises(profile.ProfileError, match="no output of the model requires grad.*or train=False"):
        profile_cpu(model, (torch.randn(2, 4),), train=True)
    assert all(p.grad is None for p in model.parameters())


def test_integer_ids_into_a_float_layer_name_model_phase_and_dtype():
    """int64 ids given to a float Linear fail in the first warm-up step: the error names the model, the phase, the
    inputs with their dtype, and torch's reason (the dtypes that do not match)."""
    with pytest.raises(profile.ProfileError, match=r"model 'Linear' raised RuntimeError during the warm-up: .*Long.*"
                                                   r"\(inputs=\(tensor 2x4 int64,\)\)"):
        profile_cpu(nn.Linear(4, 4), (torch.ones(2, 4, dtype=torch.long),))


def test_a_packed_sequence_as_the_input():
    """A PackedSequence (a namedtuple of tensors) passed straight to an LSTM: each step gets it whole, the counted
    matmuls are those of its packed tokens (2*T*4H*(I + H), T = 5 + 3 + 2), and the caller's sequence is unchanged."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    data = packed.data.clone()
    p = profile_cpu(nn.LSTM(4, 6), (packed,))
    assert p.name == "LSTM"
    matmuls = math.fsum(o.m.flops * o.calls for o in p.ops if o.op in ("aten::addmm", "aten::mm"))
    assert matmuls == 2 * 10 * 24 * (4 + 6)
    assert torch.equal(packed.data, data) and packed.batch_sizes.tolist() == [3, 3, 2, 1, 1]


class Reorders(nn.Module):
    """A forward that re-registers a buffer (it moves after ``b``) and rotates its layer's three hooks (the first
    moves last): orders the caller sees in state_dict() and in which the hooks run."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("a", torch.zeros(1))
        self.register_buffer("b", torch.ones(1))
        for hook in (lambda m, i, o: o + 1, lambda m, i, o: o * 3, lambda m, i, o: o - 2):
            self.lin.register_forward_hook(hook)

    def forward(self, x):
        a = self.a
        del self.a
        self.register_buffer("a", a + 1)
        hooks = self.lin._forward_hooks
        first = next(iter(hooks))
        hooks[first] = hooks.pop(first)
        return self.lin(x) + self.a


def test_tables_put_back_in_their_order():
    """Found by the round: a table changed by the forward was put back by deleting and re-adding entries, so a buffer
    the forward re-registered ended after ``b`` in state_dict() (and a parameter in parameters(), the order an
    optimizer pairs its state by); hooks moved by the forward ran in the new order. Tables are rebuilt in their old
    order: state_dict's keys, the hooks' order and the next output are those of an unprofiled copy."""
    model, fresh = Reorders(), Reorders()
    fresh.load_state_dict(model.state_dict())
    fresh.lin._forward_hooks.clear()
    fresh.lin._forward_hooks.update(model.lin._forward_hooks)  # the same hooks, in the same order
    keys, hooks = list(model.state_dict()), list(model.lin._forward_hooks)
    x = torch.randn(2, 4)
    profile_cpu(model, (x,))
    assert list(model.state_dict()) == keys == ["a", "b", "lin.weight", "lin.bias"]
    assert list(model.lin._forward_hooks) == hooks
    assert torch.equal(model(x), fresh(x))
