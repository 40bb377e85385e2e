"""Profiler round 25, the rest: what this round found and fixed, the backwards of the round's view and index ops
checked by hand, and the public API's refusals of bad arguments.

What this round found:
- zeros_like / ones_like / full_like were counted as allocations (``counting.ALLOCATING_PREFIXES``): 0 bytes written,
  though each fills its whole output as new_zeros, zeros and full do (round 19's strict xfail, now passing). Every
  training step's backward is seeded by a ones_like of the loss; a cellular automaton's or a mixture of experts'
  zeros_like canvas moved nothing. Now each writes its output and reads nothing of its template (``counting``,
  ``counting_bytes.LIKE_OPS``);
- ``Ceilings.peak`` took a torch dtype or a torch name (``peak(torch.float64)``, ``peak("float64")``) and said None, no
  roof, though an fp64 one was measured; a name it does not know (``"fp13"``) read None likewise. Now a torch or numpy
  dtype is read by its short name and an unknown name is refused, naming dtype (``device``);
- ``formulas.sdpa`` given a shape tuple or a list for q, k or v said "q of shape ()", naming a shape it was never
  given; now it names what it was given and its type (``formulas``);
- a convolution whose input has 0 channels (x (N, 0, *S), w (C_out, 0, *K): torch runs it, giving 0 output channels)
  failed the profile in its counting pass: the formula's shape check refused the output's channels. Now a
  convolution or its backward with an empty operand counts no products (``counting_rules.conv_rnn``).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.errors import DeviceError, LaunchError
from tilestack.perf import counting, device, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402

pytestmark = FILTERS
F32, F64, BF16, I64, BOOL = 4, 8, 2, 8, 1


# --- fills write their bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,fill", [
    ("aten::zeros_like", lambda z, **kw: torch.zeros_like(z, **kw)),
    ("aten::ones_like", lambda z, **kw: torch.ones_like(z, **kw)),
    ("aten::full_like", lambda z, **kw: torch.full_like(z, 2.5, **kw)),
], ids=["zeros_like", "ones_like", "full_like"])
@pytest.mark.parametrize("dtype,width", [(None, F32), (torch.float64, F64), (torch.bfloat16, BF16),
                                         (torch.bool, BOOL)], ids=["as-template", "fp64", "bf16", "bool"])
def test_a_fill_like_another_writes_its_output_and_reads_nothing(op, fill, dtype, width):
    """A (4, 6) fp32 template: the fill writes its 24 elements at the width of the dtype it makes, reads none of the
    template's (its shape and dtype alone), and does no arithmetic; not reported uncounted."""
    z = torch.randn(4, 6).fill_(float("nan"))  # the template's values: never read
    kwargs = {} if dtype is None else {"dtype": dtype}
    row = one_row(counting.count_ops(lambda: fill(z, **kwargs)), op)
    assert (row.calls, row.flops, row.bytes_read, row.bytes_written) == (1, 0, 0, 24 * width)
    assert not row.unsupported


def test_a_fill_writes_a_channels_last_output_and_under_inference_mode_alike():
    """Its output's layout does not change what it writes; under inference_mode (ops reach the mode whole) the same."""
    z = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert one_row(counting.count_ops(lambda: torch.ones_like(z)), "aten::ones_like").bytes_written == z.numel() * F32
    with torch.inference_mode():
        counts = counting.count_ops(lambda: torch.zeros_like(z))
    assert one_row(counts, "aten::zeros_like").bytes_written == z.numel() * F32


def test_a_fill_and_new_zeros_write_alike():
    z = torch.randn(4, 6)
    counts = counting.count_ops(lambda: (torch.zeros_like(z), z.new_zeros(4, 6), torch.zeros(4, 6)))
    written = {op: one_row(counts, op).bytes_written for op in ("aten::zeros_like", "aten::new_zeros", "aten::zeros")}
    assert set(written.values()) == {24 * F32}


def test_a_training_step_seeds_its_backward_by_writing_the_loss_gradient():
    """The backward of a scalar loss starts from ones_like(loss): one element written (4 bytes), no FLOPs."""
    torch.manual_seed(0)
    net, x = nn.Linear(3, 2), torch.randn(5, 3)
    counts = step_counts(net, (x,), train=True, warm=True)
    seed = one_row(counts, "aten::ones_like")
    assert (seed.flops, seed.bytes_read, seed.bytes_written) == (0, 0, F32)


class Canvas(nn.Module):
    """Scatters a linear's outputs into a zeros_like canvas of its input: the canvas is written once, whole."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # (N, 8)
        out = torch.zeros_like(x)
        return out.index_add_(0, torch.tensor([0, 2, 2]), self.proj(x[:3]))


def test_a_zeros_like_canvas_in_a_profile_is_memory_bound_data_movement():
    """In a profile the canvas's row carries its bytes (N*8 fp32 elements written), 0 FLOPs, counted, and the step's
    bytes are the rows' bytes."""
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    p = profile_cpu(Canvas(), (x,))
    row = next(o for o in p.ops if o.op == "aten::zeros_like")
    assert (row.m.flops, row.m.bytes_read, row.m.bytes_written) == (0, 0, x.numel() * F32)
    assert row.counted and row.bound == "memory"
    assert not p.unsupported
    assert p.bytes == pytest.approx(sum(o.m.bytes * o.calls for o in p.ops) + sum(u.bytes for u in p.untimed))


# --- the backwards of view and index ops the round's models run ----------------------------------------------------
def _backward(fn, *shapes):
    def step():
        xs = [torch.randn(*s, requires_grad=True) for s in shapes]
        fn(*xs).sum().backward()
    return counting.count_ops(step)


@pytest.mark.parametrize("size,step,windows", [(3, 1, 4), (3, 3, 2), (2, 2, 3)],
                         ids=["overlapping", "tiling", "tiling-2"])
def test_unfold_backward_adds_each_window_element_back(size, step, windows):
    """Tensor.unfold(1, size, step) of a (4, 6) tensor: a view forward (no bytes); backward, each window element's
    gradient added back into its source position: 4*windows*size adds; it writes the (4, 6) gradient."""
    counts = _backward(lambda x: x.unfold(1, size, step), (4, 6))
    row = one_row(counts, "aten::unfold_backward")
    assert row.flops == 4 * windows * size
    assert row.bytes_written == 4 * 6 * F32
    assert one_row(counts, "aten::unfold").bytes_read == 0


def test_take_backward_accumulates_by_put():
    """torch.take of 6 elements: its backward puts the 6 gradients into a zeros_like of the source with
    accumulate=True, 6 adds; the zeros_like writes the whole (4, 6) source's gradient."""
    idx = torch.tensor([[0, 3, 5], [1, 1, 2]])
    counts = _backward(lambda x: torch.take(x, idx), (4, 6))
    assert one_row(counts, "aten::put").flops == idx.numel()
    assert one_row(counts, "aten::zeros_like").bytes_written == 4 * 6 * F32


def test_cummax_and_cummin_backward_scatter_add_one_per_element():
    for scan in (torch.cummax, torch.cummin):
        counts = _backward(lambda x, scan=scan: scan(x, 1).values, (4, 6))
        assert one_row(counts, "aten::scatter_add").flops == 4 * 6, scan.__name__
        assert one_row(counts, f"aten::{scan.__name__}").bytes_written == 4 * 6 * (F32 + I64)


# --- a convolution over no input channels -------------------------------------------------------------------------
class NoChannels(nn.Module):
    """A convolution whose input has 0 channels (a fuzzed shape): torch runs it, giving an output of 0 channels."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 0, 3, 3))
        self.b = nn.Parameter(torch.randn(4)) if bias else None

    def forward(self, x):  # (N, 0, S, S)
        return F.conv2d(x, self.w, self.b)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "train"])
def test_a_convolution_over_zero_input_channels_is_profiled_as_no_work(bias, train):
    """x (2, 0, 5, 5) by w (4, 0, 3, 3): the formula's shape check refused torch's (2, 0, 3, 3) output and the
    profile failed in its counting pass; now no products and no bias adds (no output element), the rows finite."""
    x = torch.randn(2, 0, 5, 5)
    p = profile_cpu(NoChannels(bias), (x,), train=train)
    assert not p.unsupported and (train or p.flops == 0)  # trained: the loss's scalar add alone besides
    conv = [o for o in p.ops if o.op in ("aten::convolution", "aten::convolution_backward")]
    assert conv and all(o.m.flops == 0 for o in conv)
    assert one_row(counting.count_ops(lambda: F.conv2d(x, torch.randn(4, 0, 3, 3))), "aten::convolution").flops == 0


def test_a_convolution_of_a_batch_of_zero_still_counts_as_before():
    """A batch of 0 (consistent shapes, which passed before): 0 FLOPs; 2 images: the formula's count."""
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    for n in (0, 2):
        row = one_row(counting.count_ops(lambda n=n: F.conv2d(torch.randn(n, 3, 5, 5), w, b)), "aten::convolution")
        assert row.flops == n * (2 * 4 * 3 * 9 * 9 + 4 * 9)


def _random_convolution(rng):
    """One random convolution (1-3 spatial dims, maybe transposed, grouped, strided, dilated, padded, 'same', a
    batch of 0 to 2, with or without a bias) that torch accepts, or None."""
    dim, transposed = rng.choice([1, 2, 3]), rng.random() < 0.4
    g = rng.choice([1, 1, 2, 3])
    cin, cout = g * rng.randint(1, 3), g * rng.randint(1, 3)
    k, s, d = ([rng.randint(1, hi) for _ in range(dim)] for hi in (3, 3, 2))
    pad, size = [rng.randint(0, 2) for _ in range(dim)], [rng.randint(4, 7) for _ in range(dim)]
    x = torch.randn(rng.randint(0, 2), cin, *size, requires_grad=True)
    b = torch.randn(cout, requires_grad=True) if rng.random() < 0.5 else None
    if transposed:
        w = torch.randn(cin, cout // g, *k, requires_grad=True)
        out_pad = [rng.randint(0, max(si, di) - 1) for si, di in zip(s, d, strict=True)]
        op = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][dim - 1]
        kw = {"stride": s, "padding": pad, "output_padding": out_pad, "groups": g, "dilation": d}
    else:
        w = torch.randn(cout, cin // g, *k, requires_grad=True)
        op = [F.conv1d, F.conv2d, F.conv3d][dim - 1]
        same = all(si == 1 for si in s) and rng.random() < 0.3
        kw = {"stride": s, "padding": "same" if same else pad, "groups": g, "dilation": d}
    try:
        y = op(x, w, b, **kw)
    except RuntimeError:  # a size torch refuses (an output of negative size, output_padding past the stride)
        return None
    return (lambda: op(x, w, b, **kw)), y.numel(), b is not None, g


def test_fuzzed_convolutions_count_as_torch_does_with_the_bias_adds():
    """Forty random convolutions that torch runs, trained: the forward as torch's counter plus one add per output
    element for a bias; the backward as torch's (ungrouped: torch counts a grouped weight gradient as if ungrouped)
    plus the bias gradient's adds. None fails the counting pass."""
    import random

    from profile_support import torch_by_op

    rng, checked = random.Random(25), 0
    while checked < 40:
        made = _random_convolution(rng)
        if made is None:
            continue
        forward, out_elements, bias, groups = made
        step = lambda forward=forward: forward().sum().backward()  # noqa: E731
        ours, theirs = counting.count_ops(step), torch_by_op(step)
        adds = out_elements if bias else 0
        fwd = sum(c.flops for (op, _), c in ours.items() if op == "aten::convolution")
        bwd = sum(c.flops for (op, _), c in ours.items() if op == "aten::convolution_backward")
        assert fwd == theirs.get("aten::convolution", 0) + adds, (checked, fwd, theirs)
        if groups == 1:
            assert bwd == theirs.get("aten::convolution_backward", 0) + adds, (checked, bwd, theirs)
        checked += 1


# --- bad arguments -------------------------------------------------------------------------------------------------
CEIL = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "fp64": 1e11}, "now")


@pytest.mark.parametrize("dtype,want", [
    ("fp64", 1e11), (torch.float64, 1e11), ("float64", 1e11), (torch.float32, 2e11), ("tf32", 2e11),
    (torch.bfloat16, None), ("bf16", None), ("", None), (None, None),
], ids=["fp64", "torch.float64", "float64", "torch.float32", "tf32-falls-back", "torch.bfloat16-unmeasured",
        "bf16-unmeasured", "empty", "None"])
def test_ceilings_peak_reads_a_torch_dtype_by_its_short_name(dtype, want):
    assert CEIL.peak(dtype) == want


@pytest.mark.parametrize("dtype", ["fp13", "float128", 3, torch.int16])
def test_ceilings_peak_refuses_a_dtype_it_does_not_know_naming_it(dtype):
    with pytest.raises(DeviceError, match=r"Ceilings\.peak: dtype=") as e:
        CEIL.peak(dtype)
    assert "expected a dtype short name" in str(e.value) and repr(dtype) in str(e.value)


def test_a_profiles_rows_place_fp64_under_ceilings_keyed_by_torch_name_alike():
    """A float64 linear placed under CEIL: its rows' roof is the fp64 one (compute or memory, not unknown)."""
    torch.manual_seed(0)
    p = profile_cpu(nn.Linear(4, 3).double(), (torch.randn(5, 4, dtype=torch.float64),), ceilings=CEIL)
    rows = [o for o in p.ops if o.counted and o.m.flops > 0]
    assert rows and all(o.m.dtype == "fp64" and o.bound in ("memory", "compute") for o in rows)


Q = torch.empty(1, 2, 4, 8, device="meta")


@pytest.mark.parametrize("which,value,shown", [
    ("q", (1, 2, 4, 8), "q=(1, 2, 4, 8) (tuple)"),
    ("k", [1, 2, 4, 8], "k=[1, 2, 4, 8] (list)"),
    ("v", None, "v=None (NoneType)"),
], ids=["q-tuple", "k-list", "v-None"])
def test_sdpa_formula_names_a_non_tensor_argument_as_given(which, value, shown):
    args = {"q": Q, "k": Q, "v": Q, which: value}
    with pytest.raises(LaunchError, match="expected a torch tensor of 4 dims") as e:
        formulas.sdpa(args["q"], args["k"], args["v"])
    assert shown in str(e.value) and "of shape ()" not in str(e.value)


def test_sdpa_formula_still_names_a_tensor_of_the_wrong_rank_by_shape():
    with pytest.raises(LaunchError, match=r"q of shape \(2, 4, 8\); expected 4 dims"):
        formulas.sdpa(Q[0], Q, Q)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"steps": 0}, "steps=0"), ({"warmup": -1}, "warmup=-1"), ({"train": "no"}, "train='no'"),
    ({"ceilings": "fast"}, "ceilings='fast'"), ({"budget_s": float("nan")}, "budget_s=nan"),
])
def test_profile_model_refuses_bad_arguments_before_running_the_model(kwargs, fragment):
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return F.relu(x)

    with pytest.raises(profile.ProfileError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        profile.profile_model(Spy(), (torch.randn(2, 2),), device="cpu", **kwargs)
    assert calls == []
