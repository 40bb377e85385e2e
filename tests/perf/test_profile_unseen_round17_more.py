"""Seventeenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round17.py): the
round's fixes op by op (torch.gather and torch.take charged one source element per index element; an iterator or
generator inside the inputs refused naming where it is), selective checkpointing under another policy, a
torch.compile'd model trained, a forward that returns None, meta tensors nested in the inputs, and a step of
thousands of small ops whose rows keep their calls. The counts of the round's models, and what the round found, are
in tests/perf/test_profile_unseen_round17.py.
"""

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round17 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import by_op, rendered  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8


# --- the round's fixes, op by op --------------------------------------------------------------------------------
def test_gather_reads_one_source_element_per_index_element():
    """torch.gather of 3 of 8 rows (an expanded (2, 3, 1) index over 4 features) reads the 24 gathered elements and
    the 6 held index elements, not the whole (2, 8, 4) source (it read 304 bytes for 144); from an expanded source it
    reads at most the elements the source holds; with more index elements than the source holds, the source once."""
    x = torch.randn(2, 8, 4)
    idx = torch.tensor([[0, 3, 5], [1, 2, 7]]).unsqueeze(-1).expand(-1, -1, 4)
    row = one_row(profile.count_ops(lambda: torch.gather(x, 1, idx)), "aten::gather")
    assert (row.flops, row.unsupported) == (0, False)
    assert (row.bytes_read, row.bytes_written) == (24 * F32 + 6 * I64, 24 * F32)
    source = x[:, :1].expand(-1, 8, -1)  # holds 2 * 4 elements
    row = one_row(profile.count_ops(lambda: torch.gather(source, 1, idx)), "aten::gather")
    assert row.bytes_read == 8 * F32 + 6 * I64
    many = torch.zeros(2, 20, 4, dtype=torch.long)
    row = one_row(profile.count_ops(lambda: torch.gather(x, 1, many)), "aten::gather")
    assert row.bytes_read == 64 * F32 + 160 * I64 and row.bytes_written == 160 * F32


def test_take_reads_the_elements_it_takes():
    """torch.take of 3 elements of a (2, 8, 4) tensor reads those 3 and the index: 3 * 4 + 3 * 8 bytes."""
    x, idx = torch.randn(2, 8, 4), torch.tensor([0, 5, 9])
    row = one_row(profile.count_ops(lambda: torch.take(x, idx)), "aten::take")
    assert (row.flops, row.bytes_read, row.bytes_written) == (0, 3 * F32 + 3 * I64, 3 * F32)


class ExtraTerms(nn.Module):
    """forward(x, extras): a linear plus every tensor of ``extras`` (any iterable)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, extras):
        out = self.lin(x)
        for t in extras:
            out = out + t
        return out


X = torch.randn(2, 4)


@pytest.mark.parametrize("inputs,where", [
    ((X, (t for t in (X, X))), r"inputs\[1\]=<generator object .*> \(generator\)"),
    ({"x": X, "extras": iter([X, X])}, r"inputs\['extras'\]=.* \(list_iterator\)"),
    ((X, [map(torch.neg, (X,))]), r"inputs\[1\]\[0\]=.* \(map\)"),
], ids=["generator-positional", "iterator-keyword", "map-nested"])
def test_an_iterator_inside_the_inputs_is_refused_naming_where(inputs, where):
    """A generator (or iterator) given as one argument passed the checks: the warm-up used it up and every counted
    and timed step added no extra terms (the profile reported a linear and nothing more, no word said). Refused
    before any work, by profile_model and make_step, naming where it is; a list in its place is profiled, each of
    its terms an add of 8 elements."""
    model = ExtraTerms()
    for call in (lambda: profile_cpu(model, inputs), lambda: profile.make_step(model, inputs)):
        with pytest.raises(profile.ProfileError, match=where + r"; expected a tuple or list .*used up by the first"):
            call()
    p = profile_cpu(model, (X, [X, X]))
    assert sum(o.m.flops * o.calls for o in p.ops if o.op == "aten::add") == 2 * 8


# --- selective checkpointing, compiled models -----------------------------------------------------------------
def _recompute_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


class RecomputeAll(pm.SelectiveCheckpoint):
    """The round's block under a selective policy that saves nothing: the backward recomputes the linears too."""

    def forward(self, x):
        context = functools.partial(create_selective_checkpoint_contexts, _recompute_everything)
        return x + checkpoint(self.block, x, use_reentrant=False, context_fn=context)


def test_selective_checkpoint_saving_nothing_recounts_what_the_recompute_runs():
    """With nothing saved the recompute runs the block again up to the last tensor the backward needs (torch stops
    the recompute early there): the layer norm, the first linear and the GELU, not the second linear (its output is
    saved for no gradient). So the first linear's forward FLOPs count twice, the second's once (the saving policy
    counts both once); the gradients' products are the same; the layer norm and GELU twice under either policy."""
    r, d, h = pm.SC_ROWS, pm.SC_DIM, pm.SC_HIDDEN
    linears = 2 * r * d * h * 2
    torch.manual_seed(0)
    model, x = RecomputeAll(), torch.randn(r, d)
    ours = by_op(step_counts(model, (x,), train=True, warm=True))
    assert ours["aten::addmm"] == linears + 2 * r * d * h == 1728 and ours["aten::mm"] == 2 * linears
    assert ours["aten::gelu"] == 2 * r * h
    saving, (x2,) = pm.selective_checkpoint()
    saved = by_op(step_counts(saving, (x2,), train=True, warm=True))
    assert saved["aten::addmm"] == linears and saved["aten::mm"] == ours["aten::mm"]


def test_a_compiled_model_trained_counts_as_its_eager_self():
    """torch.compile (aot_eager) of the mixture-of-depths router, trained: op by op the eager model's forward and
    backward FLOPs (the counting pass runs it eagerly), and the model is still compiled afterwards."""
    model, (x,) = pm.mod_router()
    compiled = torch.compile(model, backend="aot_eager")
    p = profile_cpu(compiled, (x,), train=True)
    eager = by_op(step_counts(pm.mod_router()[0], (x,), train=True, warm=True))
    assert p.flops == pytest.approx(sum(eager.values())) and eager["aten::mm"] == 1280
    with torch.profiler.profile() as prof, torch.no_grad():
        compiled(x)
    assert any(e.name.startswith("Torch-Compiled Region") for e in prof.events())


# --- a forward that returns None; meta tensors nested in the inputs ---------------------------------------------
class Recorder(nn.Module):
    """Runs a linear and its sum, keeps the sum in a list it owns and returns None."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: list[float] = []

    def forward(self, x):
        self.seen.append(float(self.lin(x).sum()))


def test_a_forward_returning_none_is_profiled_and_refused_for_training():
    """A forward that returns None still does its work: profiled forward, the linear (2*2*4*4) and the sum (8)
    counted, the table rendered, the model's own list put back; with train=True there is no output to differentiate:
    a ProfileError saying so, and the list put back too."""
    model = Recorder()
    p = profile_cpu(model, (X,))
    assert p.flops == 2 * 2 * 4 * 4 + 8
    assert "Recorder" in rendered(p) and model.seen == []
    with pytest.raises(profile.ProfileError, match="train=True but no output of the model requires grad"):
        profile_cpu(model, (X,), train=True)
    assert model.seen == []


@pytest.mark.parametrize("device", [None, "cpu"])
def test_meta_tensors_nested_in_keyword_inputs_are_refused(device):
    """A meta tensor inside a list of keyword inputs is refused before any work (nothing to time), with or without
    device= given; the real model is not run."""
    model = ExtraTerms()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(profile.ProfileError, match=r"inputs on meta.*meta tensors hold no data"):
        profile.profile_model(model, {"x": X, "extras": [X.to("meta")]}, steps=1, warmup=1, device=device,
                              ceilings=False)
    assert calls == []


# --- thousands of small ops ---------------------------------------------------------------------------------------
def test_a_step_of_thousands_of_small_ops_keeps_every_call():
    """The Euler ODE's 500 steps: the profile's addmm, tanh and add rows hold 500 calls each (one per step, joined
    by shapes through the call tree), their FLOPs per call those of one step's op."""
    b, d, n = pm.EU_BATCH, pm.EU_DIM, pm.EU_STEPS
    model, inputs = pm.euler_ode()
    p = profile_cpu(model, inputs)
    rows = {o.op: o for o in p.ops if o.op in ("aten::addmm", "aten::tanh", "aten::add")}
    assert {op: o.calls for op, o in rows.items()} == {"aten::addmm": n, "aten::tanh": n, "aten::add": n}
    assert rows["aten::addmm"].m.flops == 2 * b * d * d and rows["aten::tanh"].m.flops == b * d
