"""Sixteenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round16.py): the
round's fixes op by op (SDDMM, hspmm and smm; allclose over broadcast operands), the namedtuple record given bare
and a namedtuple whose fields are forward's arguments, the ExportedProgram refused by name, the nested dict the
quantile network returns, and inputs that do not fit: a non-module, inputs of the wrong type or shape, each refused
naming the argument (or, where only the model can tell, the model, the phase and the inputs). The counts of the
round's models, and what the round found, are in tests/perf/test_profile_unseen_round16.py.
"""

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tilestack.perf import formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round16 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import by_op  # noqa: E402

pytestmark = FILTERS
F32 = 4


# --- the round's counting fixes, op by op -----------------------------------------------------------------------
def test_sampled_addmm_is_a_dot_product_per_stored_element():
    """SDDMM of a (5, 5) CSR mask with 7 stored elements and (5, 3) x (3, 5) dense operands: 2 * 7 * 3 FLOPs, not
    the dense product's 2 * 5 * 5 * 3, and not uncounted; a batch of 2 such masks twice that."""
    idx = torch.tensor([[0, 0, 1, 2, 3, 4, 4], [0, 3, 1, 2, 0, 1, 4]])
    mask = torch.sparse_coo_tensor(idx, torch.ones(7), (5, 5)).to_sparse_csr()
    a, b = torch.randn(5, 3), torch.randn(3, 5)
    row = one_row(profile.count_ops(lambda: torch.sparse.sampled_addmm(mask, a, b)), "aten::sparse_sampled_addmm")
    assert (row.flops, row.unsupported) == (2 * 7 * 3, False)
    batched = torch.stack([mask.to_dense()] * 2).to_sparse_csr()
    counts = profile.count_ops(lambda: torch.sparse.sampled_addmm(batched, a.expand(2, 5, 3), b.expand(2, 3, 5)))
    assert one_row(counts, "aten::sparse_sampled_addmm").flops == 2 * 2 * 7 * 3


@pytest.mark.parametrize("fn,op", [(torch.hspmm, "aten::hspmm"), (torch.smm, "aten::sspaddmm")],
                         ids=["hspmm", "smm"])
def test_hspmm_and_smm_count_as_sparse_mm(fn, op):
    """torch.hspmm and torch.smm of a COO (4, 4) with 5 stored elements and a dense (4, 6): 2 * 5 * 6 FLOPs each, as
    torch.sparse.mm of the same operands counts."""
    idx = torch.tensor([[0, 1, 1, 2, 3], [0, 0, 2, 3, 1]])
    sp, dense = torch.sparse_coo_tensor(idx, torch.randn(5), (4, 4)).coalesce(), torch.randn(4, 6)
    row = one_row(profile.count_ops(lambda: fn(sp, dense)), op)
    assert (row.flops, row.unsupported) == (2 * 5 * 6, False)
    assert by_op(profile.count_ops(lambda: torch.sparse.mm(sp, dense)))["aten::_sparse_addmm"] == 2 * 5 * 6


def test_allclose_counts_the_broadcast_elements():
    """allclose of a (3, 4) and a (4,) tensor compares 12 pairs: 7 FLOPs each; it reads both operands as held and
    writes nothing (a Python bool)."""
    a, b = torch.randn(3, 4), torch.randn(4)
    row = one_row(profile.count_ops(lambda: torch.allclose(a, b)), "aten::allclose")
    assert row.flops == formulas.ALLCLOSE_FLOPS_PER_ELEMENT * 12 == 84 and not row.unsupported
    assert (row.bytes_read, row.bytes_written) == ((12 + 4) * F32, 0)


# --- namedtuple inputs and exported programs ----------------------------------------------------------------------
Pair = collections.namedtuple("Pair", ["x", "mask"])


class TwoArguments(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.lin(x * mask)


@pytest.mark.parametrize("train", [False, True])
def test_a_namedtuple_record_bare_profiles_as_wrapped_and_leaves_the_model(train):
    """The record given bare counts as (record,) does (the FLOPs and bytes of the same step), and the model's
    table is left as it was (no gradient)."""
    model, record = pm.record()
    bare = profile_cpu(model, record, train=train)
    wrapped = profile_cpu(model, (record,), train=train)
    assert bare.flops == wrapped.flops and bare.bytes == wrapped.bytes and not bare.unsupported
    assert model.embed.weight.grad is None


def test_a_namedtuple_whose_fields_are_forwards_arguments_is_still_spread():
    """Pair(x, mask) given to forward(x, mask) is spread into its two fields (they fit): a (3, 4) x (4, 2) linear
    and the masking multiply. Where neither the fields nor the record fit (a forward of three arguments), the
    refusal is the spread's, naming the missing argument."""
    torch.manual_seed(0)
    pair = Pair(torch.randn(3, 4), torch.ones(3, 4))
    counts = step_counts(TwoArguments(), pair)
    assert by_op(counts)["aten::addmm"] == 2 * 3 * 4 * 2 and by_op(counts)["aten::mul"] == 12
    says = (r"inputs=\(tensor 3x4 float32, tensor 3x4 float32\) do not fit .*<lambda>\(x, y, z\): missing a required "
            r"argument: 'z'")
    with pytest.raises(profile.ProfileError, match=says):  # neither fits: the spread's error
        profile_cpu(lambda x, y, z: x @ y + z, pair)


def test_an_exported_program_is_refused_before_any_work_naming_module():
    """An ExportedProgram is callable, but calling it raises 'Unable to call ExportedProgram directly': it passed the
    checks and failed in the warm-up. Now refused up front (make_step too), naming model= and .module()."""
    ep = pm.exported_program()
    x = torch.randn(pm.EX_ROWS, pm.EX_IN)
    says = r"model=.*\(ExportedProgram\); expected a callable model: .*exported.module\(\)"
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(ep, (x,))
    with pytest.raises(profile.ProfileError, match=says):
        profile.make_step(ep, (x,))
    assert profile_cpu(ep.module(), (x,)).flops > 0


# --- outputs ------------------------------------------------------------------------------------------------------
def test_a_nested_dict_output_trains_every_leaf():
    """The quantile network returns {quantiles, risk: {lower, median}}: the training step's loss sums all three, so
    torch.quantile's gathers and the median's pick send gradients back (a scatter_add per picked value; the
    median's index a scatter), and the head's weight gradient is the (B*Q, H) x (H, A) product's."""
    b, q, a, h = pm.IQ_BATCH, pm.IQ_TAUS, pm.IQ_ACTIONS, pm.IQ_HIDDEN
    model, inputs = pm.iqn()
    counts = step_counts(model, inputs, train=True)
    ours = by_op(counts)
    assert ours["aten::scatter_add"] == 2 * b * a  # quantile's two neighbours per (batch, action)
    assert one_row(counts, "aten::mm", ((a, b * q), (b * q, h))).flops == 2 * b * q * h * a
    p = profile_cpu(model, inputs, train=True)
    warm = step_counts(model, inputs, train=True, warm=True)  # as the profile counts: gradients there, added into
    assert not p.unsupported and p.flops == pytest.approx(sum(c.flops for c in warm.values()), rel=1e-12)


# --- inputs that do not fit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,says", [
    ("slots", r"model='slots' \(str\); expected a torch.nn.Module or a callable"),
    (pm.SlotAttention, r"model=.*SlotAttention.*expected a model instance, not its class"),
    (nn.ModuleList([nn.Linear(4, 4)]), r"model=ModuleList defines no forward"),
])
def test_a_model_that_is_not_one_is_refused_naming_model(model, says):
    """A string, the model's class and a ModuleList are refused before any work, naming model=."""
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(model, (torch.randn(2, 6, 4),))


@pytest.mark.parametrize("inputs,says", [
    ("pixels", r"inputs='pixels' \(str\); expected a tensor, a tuple or list"),
    ({1: torch.randn(2, 5, 5)}, r"expected a dict whose keys are the names of forward's keyword arguments"),
    ({"image": torch.randn(2, 2, 5, 5)}, r"do not fit DeformableConv.forward\(x\): missing a required argument: 'x'"),
    ((torch.randn(2, 2, 5, 5), torch.randn(2)), r"do not fit DeformableConv.forward\(x\): too many positional"),
])
def test_inputs_of_the_wrong_type_are_refused_naming_inputs(inputs, says):
    """A string, a dict keyed by ints, a misspelt keyword and one argument too many are refused before any work,
    naming inputs= and forward's signature; the model is left without gradients."""
    model, _ = pm.deformable_conv()
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(model, inputs, train=True)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("build,inputs,says", [
    (pm.deformable_conv, (torch.randn(2, 3, 5, 5),), r"'DeformableConv' raised RuntimeError during the warm-up: "
     r".*expected input\[2, 3, 5, 5\] to have 2 channels.*inputs=\(tensor 2x3x5x5 float32,\)"),
    (pm.slots, (torch.randn(2, 6, 5),), r"'SlotAttention' raised RuntimeError during the warm-up: .*"
     r"inputs=\(tensor 2x6x5 float32,\)"),
    (pm.hash_grid, (torch.rand(6, 3),), r"'HashGrid' raised RuntimeError during the warm-up: .*"
     r"inputs=\(tensor 6x3 float32,\)"),
])
def test_an_input_of_the_wrong_shape_fails_naming_the_model_the_phase_and_the_inputs(build, inputs, says):
    """A tensor of the wrong channels or width binds to forward, so only the model can refuse it: its error is the
    warm-up's, naming the model, torch's message and the inputs; the model's state is as it was."""
    model, _ = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(model, inputs, train=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_dense_adjacency_where_sddmm_needs_a_sparse_one_names_the_phase():
    """SDDMM given a dense adjacency: torch has no dense kernel for it; the warm-up's error names the model, the
    phase, the op and the inputs."""
    model, (adj, x) = pm.sddmm_gat()
    with pytest.raises(profile.ProfileError, match=r"(?s)'SddmmAttention' raised NotImplementedError during the "
                                                   r"warm-up: Could not run 'aten::sparse_sampled_addmm'.*"
                                                   r"inputs=\(tensor 7x7 float32, tensor 7x5 float32\)"):
        profile_cpu(model, (adj.to_dense(), x))
