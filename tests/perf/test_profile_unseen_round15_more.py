"""Fifteenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round15.py): the round's
fixes (a PackedSequence given as the inputs was spread into its four fields; a ModuleList, ModuleDict or bare Module
passed the signature check and failed in the warm-up; an input made by an autograd graph sent every training step's
backward into the caller's graph, failing the second; nonzero_static was reported as having no formula), bf16 and
fp16 versions of the round's models, forward profiles under an ambient no_grad / inference_mode, a custom op with
an autograd formula trained (its forward unknown, its backward counted), and inputs that do not fit.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round15 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import by_op, flops_of, rendered  # noqa: E402

pytestmark = FILTERS
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
F32, HALF = 4, 2


# --- the round's fixes ------------------------------------------------------------------------------------------
def _packed_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, batch_first=True)
    lengths = (6, 4, 2)
    x = torch.randn(len(lengths), max(lengths), 4)
    return lstm, pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False), lengths


@pytest.mark.parametrize("train", [False, True])
def test_a_packed_sequence_given_as_the_inputs_is_one_argument(train):
    """nn.LSTM takes one PackedSequence; given bare as the inputs (as one tensor may be) it was spread into its four
    fields and refused as 'too many positional arguments'. Now it is profiled as (packed,) is: per token an input
    product (I, 4H) and, step by step over the batch sizes, a hidden product (H, 4H), 2 * tokens * 4H * (I + H)."""
    lstm, packed, lengths = _packed_lstm()
    bare = profile_cpu(lstm, packed, train=train)
    wrapped = profile_cpu(lstm, (packed,), train=train)
    assert bare.flops == wrapped.flops and bare.bytes == wrapped.bytes and not bare.unsupported
    tokens, h = sum(lengths), 5
    counts = step_counts(lstm, packed)
    assert flops_of(counts, MATMULS) == 2 * tokens * 4 * h * (4 + h) == 4320
    assert lstm.weight_ih_l0.grad is None  # put back as it was


@pytest.mark.parametrize("holder", [nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleDict({"fc": nn.Linear(2, 2)}),
                                    nn.Module()], ids=["ModuleList", "ModuleDict", "Module"])
def test_a_module_without_a_forward_is_refused_before_any_work(holder):
    """nn.Module's placeholder forward takes *args, so the inputs 'fit' and the first warm-up step raised
    NotImplementedError. Now profile_model and make_step refuse it up front, naming the class."""
    x = torch.randn(3, 2)
    with pytest.raises(profile.ProfileError, match=rf"model={type(holder).__name__} defines no forward"):
        profile_cpu(holder, (x,))
    with pytest.raises(profile.ProfileError, match="defines no forward"):
        profile.make_step(holder, (x,))


def test_a_forward_set_on_the_instance_or_inherited_is_accepted():
    """Not refused: a module whose forward is assigned on the instance, and a subclass inheriting a real forward."""
    holder = nn.ModuleList([nn.Linear(2, 3)])
    holder.forward = lambda x: holder[0](x)
    p = profile_cpu(holder, (torch.randn(4, 2),))
    assert p.flops == 2 * 4 * 2 * 3

    class Wider(nn.Linear):
        pass

    assert profile_cpu(Wider(2, 3), (torch.randn(4, 2),)).flops == 2 * 4 * 2 * 3


@pytest.mark.parametrize("made", ["exp", "scaled", "view"])
def test_an_input_made_by_an_autograd_graph_is_refused_with_train(made):
    """An input with a grad_fn (leaf.exp(), leaf * 2, a slice of a leaf): each step's backward ran back into the
    caller's graph, changing the caller's leaf's .grad (outside what a profile puts back), and the second step failed
    with autograd's 'backward through the graph a second time' deep in the counting pass. Now refused before any
    work, naming where it is and its grad_fn; the caller's leaf is untouched; train=False and a detached leaf are
    profiled."""
    torch.manual_seed(0)
    leaf = torch.randn(4, 6, requires_grad=True)
    x = {"exp": lambda: leaf.exp(), "scaled": lambda: leaf * 2, "view": lambda: leaf[:, :6]}[made]()
    model = nn.Linear(6, 3)
    with pytest.raises(profile.ProfileError, match=r"inputs\[0\]=tensor 4x6 float32 is the output of an autograd "
                                                   r"graph \(grad_fn=\w+Backward0\)"):
        profile_cpu(model, (x,), train=True)
    with pytest.raises(profile.ProfileError, match=r"inputs\['x'\]=.*x.detach\(\)"):
        profile.make_step(lambda x: model(x), {"x": x}, train=True)
    assert leaf.grad is None and model.weight.grad is None
    assert profile_cpu(model, (x,)).flops == 2 * 4 * 6 * 3
    own = x.detach().requires_grad_()
    p = profile_cpu(model, (own,), train=True)
    # forward, dx and dW; the bias's gradient and the loss (sums over the (4, 3) output, the loss's add of 0); the
    # counted step after the warm-up adds into the gradients it left: W's, b's and the input's
    assert p.flops == 3 * (2 * 4 * 6 * 3) + 4 * 3 + 4 * 3 + 1 + (6 * 3 + 3 + 4 * 6)
    assert own.grad is None and leaf.grad is None


def test_nonzero_static_is_data_movement_as_nonzero():
    """torch.nonzero_static (nonzero padded to a fixed size, what compiled MoE routers use) finds and copies out
    indices as nonzero does: 0 FLOPs, its bytes counted, not reported as an op with no formula."""
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    mask = x != 0
    counts = profile.count_ops(lambda: torch.nonzero_static(mask, size=5))
    row = one_row(counts, "aten::nonzero_static")
    assert (row.flops, row.unsupported) == (0, False)
    assert (row.bytes_read, row.bytes_written) == (6, 5 * 2 * 8)  # the bool mask; (size, dims) int64
    nonzero = one_row(profile.count_ops(lambda: torch.nonzero(mask)), "aten::nonzero")
    assert (nonzero.flops, nonzero.unsupported) == (0, False)


# --- half precision ---------------------------------------------------------------------------------------------
def _cast(build, dtype):
    model, inputs = build()
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    inputs = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(cast(v) for v in inputs)
    return model.to(dtype), inputs


@pytest.mark.parametrize("name,op", [("mlstm", "aten::bmm"), ("convlstm", "aten::convolution"),
                                     ("performer", "aten::bmm"), ("siren", "aten::addmm"), ("pkm", "aten::mm")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_counts_as_fp32_at_two_bytes_an_element(name, op, dtype):
    """Cast to bf16 or fp16: every op's FLOPs are the fp32 model's (trained), the products' rows are of that dtype
    and move half the fp32 model's bytes; only the loss (summed in fp32) and its casts are fp32 rows."""
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    model, inputs = pm.MODELS[name][0]()
    ref = step_counts(model, inputs, train=True)
    model, inputs = _cast(pm.MODELS[name][0], dtype)
    ours = step_counts(model, inputs, train=True)
    assert by_op(ours) == {**by_op(ref), "aten::_to_copy": 0.0}  # and the loss's cast to fp32
    for key, c in ours.items():
        if key[0] == op:
            assert c.dtype == half, key
            assert c.bytes_read * 2 == ref[key].bytes_read and c.bytes_written * 2 == ref[key].bytes_written, key
    p = profile_cpu(model, inputs, train=True)
    loss = {"aten::sum", "aten::_to_copy", "aten::add", "aten::ones_like"}  # ones_like: its seed, written (round 25)
    assert {o.op for o in p.ops if o.counted and o.m.dtype == "fp32"} <= loss
    assert not p.unsupported


def test_a_bf16_model_with_an_fp32_buffer_made_in_forward_fails_naming_the_phase_and_dtypes():
    """Transformer-XL cast to bf16 still makes its sinusoid in float32 (torch.arange's default): the model's own
    mismatch is reported as the warm-up's error naming both dtypes and the inputs, and the model is left as given."""
    model, inputs = _cast(pm.transformer_xl, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    says = (r"'RelAttention' raised RuntimeError during the warm-up: .*float.*BFloat16.*"
            r"inputs=\(tensor 4x2x8 bfloat16, tensor 3x2x8 bfloat16\)")
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(model, inputs, train=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(prm.grad is None for prm in model.parameters())


# --- ambient gradient modes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(pm.MODELS))
@pytest.mark.parametrize("ambient", ["no_grad", "inference_mode"])
def test_a_forward_profile_under_an_ambient_gradient_mode_counts_the_same(name, ambient):
    """profile_model(train=False) called inside torch.no_grad or torch.inference_mode counts the same FLOPs as outside
    (under inference_mode composites reach the counting pass whole and are counted as the ops they run: gMLP's
    3-d matmul as bmm, not mm; MBConv's adaptive pool not as mean), the same bytes where the ops are the same,
    and the deep equilibrium layer takes as many iterations; a training profile there is refused."""
    model, inputs = pm.MODELS[name][0]()
    plain = profile_cpu(model, inputs)
    ctx = getattr(torch, ambient)
    with ctx():
        p = profile_cpu(model, inputs)
        with pytest.raises(profile.ProfileError, match="train=True, but gradients are off"):
            profile_cpu(model, inputs, train=True)
    assert p.flops == plain.flops and not p.unsupported
    if ambient == "no_grad":
        assert p.bytes == plain.bytes
        assert sorted((o.op, o.shapes, o.calls) for o in p.ops if o.counted) == sorted(
            (o.op, o.shapes, o.calls) for o in plain.ops if o.counted)


# --- a custom op with an autograd formula -----------------------------------------------------------------------
@torch.library.custom_op("tilestack_r15::swish_gate", mutates_args=())
def swish_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A fused gate tilestack has no FLOP formula for: x * g * sigmoid(g)."""
    return x * g * torch.sigmoid(g)


@swish_gate.register_fake
def _(x, g):
    return torch.empty_like(x)


def _swish_gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swish_gate_backward(ctx, grad):
    x, g = ctx.saved_tensors
    s = torch.sigmoid(g)
    silu = g * s
    return grad * silu, grad * x * (s + silu * (1 - s))


swish_gate.register_autograd(_swish_gate_backward, setup_context=_swish_gate_setup)


class GatedMlp(nn.Module):
    """A linear to 2H, its halves through the custom gate, a linear back."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 2 * 5)
        self.down = nn.Linear(5, 6)

    def forward(self, x):
        a, g = self.up(x).chunk(2, -1)
        return self.down(swish_gate(a, g))


def test_a_custom_op_with_an_autograd_formula_trains_its_forward_unknown_its_backward_counted():
    """Trained, the custom op's forward is one row with FLOPs unknown (bound 'unknown', listed in unsupported, not a
    silent 0 in the total) and its bytes counted (two (4, 5) halves in, one out); its registered backward runs plain
    torch ops, each counted: a sigmoid, and multiplies, an add and a subtract per element of (4, 5)."""
    torch.manual_seed(0)
    rows, h = 4, 5
    x = torch.randn(rows, 6)
    model = GatedMlp()
    p = profile_cpu(model, (x,), train=True)
    assert p.unsupported == ("tilestack_r15::swish_gate",)
    (row,) = [o for o in p.ops if o.op == "tilestack_r15::swish_gate"]
    assert not row.flops_known and row.bound == "unknown" and row.roof_fraction is None
    assert row.tip == profile.NO_FORMULA_TIP
    assert row.m.bytes_read == 2 * rows * h * F32 and row.m.bytes_written == rows * h * F32
    counts = step_counts(model, (x,), train=True, warm=True)  # as the profile counts: gradients there, added into
    ours = by_op(counts)
    assert ours["tilestack_r15::swish_gate"] == 0
    assert ours["aten::sigmoid"] == rows * h  # the backward's; the forward's is inside the custom op
    linears = 2 * rows * 6 * 2 * h + 2 * rows * h * 6
    assert flops_of(counts, {"aten::addmm", "aten::mm"}) == linears + linears + 2 * rows * h * 6  # x needs no dx
    assert p.flops == pytest.approx(sum(c.flops for c in counts.values()), rel=1e-12)
    assert "no FLOP formula for tilestack_r15::swish_gate" in rendered(p)


# --- inputs that do not fit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs,says", [
    ((torch.rand(7, 2),), r"do not fit Siren.forward\(\*, coords, omega=30.0\): too many positional arguments"),
    ({"coord": torch.rand(7, 2)}, r"inputs=\{'coord': tensor 7x2 float32\} do not fit Siren.forward.*missing a "
                                  r"required argument: 'coords'"),
    ({"omega": 2.0}, r"do not fit Siren.forward.*missing a required argument: 'coords'"),
])
def test_a_keyword_only_model_given_other_inputs_is_refused_naming_its_signature(inputs, says):
    """The SIREN takes coords and omega by keyword only: a tuple, a misspelt key or a missing one is refused before
    any work, naming the inputs, forward's signature and what is wrong (a misspelt key is the missing one)."""
    model, _ = pm.siren()
    with pytest.raises(profile.ProfileError, match=says):
        profile_cpu(model, inputs)


def test_inputs_of_the_wrong_width_fail_in_the_warm_up_naming_the_shapes_and_leave_the_model():
    """An mLSTM given 7 features where it takes 8: the warm-up's error names the model, the phase, torch's message
    with both shapes and the inputs; the model's parameters, gradients and mode are as they were."""
    model, _ = pm.mlstm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(profile.ProfileError, match=r"'MLstm' raised RuntimeError during the warm-up: .*12x7 and "
                                                   r"8x24.*inputs=\(tensor 2x6x7 float32,\)"):
        profile_cpu(model, (torch.randn(pm.ML_BATCH, pm.ML_T, 7),), train=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(prm.grad is None for prm in model.parameters()) and model.training


def test_the_deq_under_its_own_no_grad_leaves_grad_mode_and_trains_one_step():
    """The equilibrium loop's torch.no_grad inside forward does not leak: after a training profile gradients are on,
    and the caller's next forward and backward give the gradients of an unprofiled copy."""
    model, (x,) = pm.deq()
    twin, _ = pm.deq()
    profile_cpu(model, (x,), train=True)
    assert torch.is_grad_enabled()
    model(x).sum().backward()
    twin(x).sum().backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert F.mse_loss(model(x), twin(x)).item() == 0.0
