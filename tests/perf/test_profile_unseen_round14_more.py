"""Fourteenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round14.py): operands
that share memory (the round's fix: a row expanded over the matrix it came from was taken for the matrix, a row and
a column of one square matrix for one tensor), channels-last bf16 and fp16 rows, a torch.compile'd block inside an
eager model, a custom op with no FLOP formula, the roofline placement of each row, and what a profile leaves behind
(outputs, gradients, training modes, running statistics, every random generator).
"""

import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round14 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import CEIL, by_op, conv, rendered, rows_of  # noqa: E402

pytestmark = FILTERS
F32, BF16 = 4, 2


def _counts(build, *, train=False):
    return step_counts(*build(), train=train)


def test_an_expanded_row_added_to_its_matrix_reads_both():
    """x[:1].expand_as(x) has x's data pointer and x's element count: the bytes were keyed by (pointer, numel,
    dtype), so x + it read 24 bytes (the held row) and never x's 192. Now the row as held and x: 216."""
    counts = _counts(pm.shared_memory)
    rows, cols = 8, 6
    add = one_row(counts, "aten::add")
    assert add.bytes_read == cols * F32 + rows * cols * F32 == 216
    assert add.bytes_written == rows * cols * F32
    assert add.flops == rows * cols


def test_a_row_times_a_column_of_one_matrix_reads_both():
    """sq[:, 0] and sq[0, :] start at one pointer with as many elements, but cover different memory."""
    counts = _counts(pm.shared_memory)
    mul = one_row(counts, "aten::mul")
    assert mul.bytes_read == 2 * 6 * F32 and mul.bytes_written == 6 * F32 and mul.flops == 6


@pytest.mark.parametrize("view", ["t", "view", "unsqueeze", "permute"], ids=str)
def test_one_tensor_seen_through_a_view_is_still_read_once(view):
    """The same memory through a transpose, a flat view, an added size-1 dim or a permutation is one tensor:
    x.add(x.t()) reads x once (what the key by memory covered keeps from the key by element count)."""
    x = torch.randn(5, 5)
    other = {"t": lambda: x.t(), "view": lambda: x.view(25).view(5, 5), "unsqueeze": lambda: x.unsqueeze(0)[0],
             "permute": lambda: x.permute(1, 0)}[view]
    counts = profile.count_ops(lambda: torch.add(x, other()))
    add = one_row(counts, "aten::add")
    assert add.bytes_read == 25 * F32 and add.bytes_written == 25 * F32


def test_a_diagonal_and_a_row_of_one_matrix_are_two_reads():
    """A diagonal (stride n + 1) and the first row (stride 1) share pointer and length; a strided slice of a flat
    vector (stride 2) and its first half too."""
    x = torch.randn(4, 4)
    counts = profile.count_ops(lambda: x.diagonal() * x[0])
    assert one_row(counts, "aten::mul").bytes_read == 2 * 4 * F32
    v = torch.randn(8)
    counts = profile.count_ops(lambda: v[::2] + v[:4])
    assert one_row(counts, "aten::add").bytes_read == 2 * 4 * F32


def test_in_place_views_windows_where_and_masked_fill_by_hand():
    """An in-place multiply of a (8, 2) column slice moves those 16 elements each way; overlapping as_strided windows
    (5, 4) by (2, 1) read the 12 elements they span and write 20; where reads its mask, x and the broadcast row;
    masked_fill is a copy (0 FLOPs, not uncounted) reading x and its mask."""
    counts = _counts(pm.shared_memory)
    mul_ = one_row(counts, "aten::mul_")
    assert (mul_.bytes_read, mul_.bytes_written, mul_.flops) == (16 * F32, 16 * F32, 16)
    exp = one_row(counts, "aten::exp")
    assert (exp.bytes_read, exp.bytes_written, exp.flops) == (12 * F32, 20 * F32, 20)
    where = one_row(counts, "aten::where")
    assert (where.bytes_read, where.bytes_written, where.flops) == (48 + 48 * F32 + 6 * F32, 48 * F32, 48)
    fill = one_row(counts, "aten::masked_fill")
    assert (fill.bytes_read, fill.bytes_written, fill.flops, fill.unsupported) == (48 * F32 + 48, 48 * F32, 0, False)
    assert not any(op in ("aten::t_", "aten::as_strided", "aten::expand") and (c.bytes_read or c.bytes_written)
                   for (op, _), c in counts.items())  # views move nothing


def test_bf16_channels_last_rows_move_two_bytes_an_element():
    """A channels-last bf16 convnet: the convolution's row is bf16 and reads its input, weight and bias and writes
    its output at 2 bytes an element (the layout changes no count); the linear's addmm alike; the batch norm
    trains its statistics. Its backward's rows are bf16 too (the loss's fp32 sum aside)."""
    n, c, s, k, classes = pm.HP_BATCH, pm.HP_C, pm.HP_SIDE, pm.HP_CONV, pm.HP_CLASSES
    p = profile_cpu(*pm.bf16_convnet(), train=True)
    (conv_row,) = [o for o in p.ops if o.op == "aten::convolution"]
    assert conv_row.m.dtype == "bf16"
    assert conv_row.m.flops == conv(n, c, k, s * s, 9)
    assert conv_row.m.bytes_read == (n * c * s * s + k * c * 9 + k) * BF16
    assert conv_row.m.bytes_written == n * k * s * s * BF16
    (addmm,) = [o for o in p.ops if o.op == "aten::addmm"]
    assert addmm.m.dtype == "bf16" and addmm.m.flops == 2 * n * k * s * s * classes
    assert addmm.m.bytes_read == (classes + n * k * s * s + k * s * s * classes) * BF16
    (bn,) = [o for o in p.ops if o.op == "aten::native_batch_norm"]
    assert bn.m.flops == formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT * n * k * s * s
    (bwd,) = [o for o in p.ops if o.op == "aten::convolution_backward"]
    assert bwd.m.dtype == "bf16" and bwd.m.flops == conv(n, c, k, s * s, 9)  # weight and bias: x needs none
    # the fp32 loss (a sum of the bf16 output cast to fp32), its gradient's seed (round 25: written), and the backward
    # of that cast, which reads the fp32 gradient: since session 30 a row per input dtype, where it had been merged
    # into the forward cast's bf16 row
    fp32 = sorted(o.op for o in p.ops if o.counted and o.m.dtype == "fp32")
    assert fp32 == ["aten::_to_copy", "aten::add", "aten::ones_like", "aten::sum"]
    (cast_back,) = [o for o in p.ops if o.op == "aten::_to_copy" and o.m.dtype == "fp32"]
    assert cast_back.m.bytes_written == n * classes * BF16      # the loss's gradient, back in the output's bf16
    assert {o.m.dtype for o in p.ops if o.counted and o.m.dtype != "fp32"} == {"bf16"}


def test_fp16_mlp_rows_are_fp16_by_hand():
    """An fp16 MLP: both linears' addmm, the GELU and the layer norm are fp16 rows at 2 bytes an element."""
    rows, i, h, o = pm.HM_ROWS, pm.HM_IN, pm.HM_HIDDEN, pm.HM_OUT
    p = profile_cpu(*pm.fp16_mlp())
    flops = {}
    for o_ in p.ops:
        flops[o_.op] = flops.get(o_.op, 0) + o_.m.flops * o_.calls
    assert {o_.m.dtype for o_ in p.ops if o_.counted} == {"fp16"}
    assert flops["aten::addmm"] == 2 * rows * i * h + 2 * rows * h * o
    assert flops["aten::native_layer_norm"] == formulas.LAYERNORM_FLOPS_PER_ELEMENT * rows * h
    (gelu,) = [o_ for o_ in p.ops if o_.op == "aten::gelu"]
    assert gelu.m.bytes_read == gelu.m.bytes_written == rows * h * 2


@pytest.mark.parametrize("train", [False, True])
def test_a_compiled_block_is_counted_as_its_eager_twin(train):
    """torch.compile'd code is counted eagerly: the compiled block's model has the eager twin's FLOPs and bytes, op
    by op; its output after profiling is the one before, and it still compiles (a new shape reaches the backend:
    the counting pass's force_eager stance is not left on)."""
    compiled, inputs = pm.compiled_block()
    eager, _ = pm.eager_block()
    pc = profile_cpu(compiled, inputs, train=train)
    pe = profile_cpu(eager, inputs, train=train)
    assert pc.flops == pe.flops and pc.bytes == pe.bytes and not pc.unsupported
    hidden, rows = pm.CB_HIDDEN, pm.CB_ROWS
    forward = 2 * rows * (pm.CB_IN * hidden + hidden * hidden + hidden * pm.CB_IN)
    inputs_grad = 2 * rows * (hidden * hidden + hidden * pm.CB_IN)  # x needs none: the first linear's dx is skipped
    products = sum(o.m.flops * o.calls for o in pc.ops if o.op in ("aten::mm", "aten::addmm"))
    assert products == (forward + forward + inputs_grad if train else forward)
    with torch.no_grad():
        assert torch.equal(compiled(*inputs), eager(*inputs))
    seen = []

    def backend(gm, example_inputs):
        seen.append(len(example_inputs))
        return gm.forward

    class Probe(nn.Module):  # a forward of its own: a code object no other test has compiled
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x).tanh()

    fn = torch.compile(Probe(), backend=backend)
    profile_cpu(fn, (torch.randn(2, 3),), train=train)
    compiled_before = len(seen)
    fn(torch.randn(5, 7, 3))  # a new rank: compiled again, unless the stance stayed force_eager
    assert len(seen) > compiled_before


def test_a_custom_op_without_a_formula_is_unknown_not_free():
    """A torch.library custom op runs whole (its inner sign / clamp / multiply are not seen) and has no formula: its
    row says FLOPs unknown (bound 'unknown', no roof fraction, the no-formula tip) with its bytes counted, it is
    listed in ``unsupported`` and the step's FLOPs are the linear's alone, not a silent 0 added."""
    p = profile_cpu(*pm.custom_head())
    assert p.unsupported == ("tilestack_r14::soft_threshold",)
    (row,) = [o for o in p.ops if o.op == "tilestack_r14::soft_threshold"]
    assert not row.flops_known and row.bound == "unknown" and row.roof_fraction is None
    assert row.tip == profile.NO_FORMULA_TIP
    assert row.m.bytes_read == row.m.bytes_written == 4 * 5 * F32
    assert p.flops == 2 * 4 * 6 * 5
    assert not any(o.op in ("aten::sign", "aten::clamp", "aten::abs") for o in p.ops)
    text = rendered(p)
    assert "tilestack_r14::soft_threshold" in text


@pytest.mark.parametrize("name", ["separable", "masked_attention", "bf16_convnet", "moe"])
def test_each_rows_roof_fraction_is_its_rate_over_its_roof(name):
    """Under the synthetic ceilings (2e11 FLOP/s for every dtype, 2e10 B/s: the ridge at 10 FLOP/B) a memory-bound
    row's fraction is its bytes per second over the bandwidth, a compute-bound one's its FLOPs per second over the
    peak; the per-call latency is the row's time over its calls."""
    model, inputs = pm.MODELS[name][0]()
    p = profile_cpu(model, inputs, steps=2, train=True)
    checked = 0
    for o in p.ops:
        if not (o.counted and o.flops_known and o.m.flops > 0 and o.total_s > 0):
            continue
        latency = o.total_s / o.calls
        assert o.m.latency_s == pytest.approx(latency, rel=1e-9), o.label
        if o.bound == "memory":
            assert o.roof_fraction == pytest.approx(o.m.bytes / latency / CEIL.copy_bytes_per_s, rel=1e-9), o.label
        else:
            assert o.roof_fraction == pytest.approx(o.m.flops / latency / CEIL.matmul[o.m.dtype], rel=1e-9), o.label
        checked += 1
    assert checked >= 3


class Noisy(nn.Module):
    """Dropout, a training batch norm, a frozen (eval) batch norm inside, a generator of its own, a counter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8, momentum=None)  # a cumulative average: num_batches_tracked matters
        self.frozen = nn.BatchNorm1d(8).eval()
        self.drop = nn.Dropout(0.3)
        self.gen = torch.Generator().manual_seed(7)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        noise = torch.randn(x.shape[0], 8, generator=self.gen)
        h = self.drop(self.bn(self.fc(x))) + 0.1 * noise + random.random() + float(np.random.rand())
        return {"out": self.frozen(h), "aux": (h.sum(-1),)}


@pytest.mark.parametrize("train", [False, True])
def test_profiling_leaves_outputs_gradients_modes_statistics_and_every_generator(train):
    """After a profile the model is as it was: parameters, gradients already there (the input's too), every module's
    training flag (one eval module inside a training model), running statistics and num_batches_tracked, a plain
    counter, and the states of torch's, Python's and NumPy's generators and of the model's own; so its next output,
    and the gradient of it, are those of an unprofiled copy."""
    torch.manual_seed(0)
    model = Noisy()
    x = torch.randn(5, 6, requires_grad=True)
    x.grad = torch.full_like(x, 0.5)
    for prm in model.parameters():
        prm.grad = torch.ones_like(prm)
    twin, twin_x = copy.deepcopy(model), x.detach().clone().requires_grad_()
    twin_x.grad = x.grad.clone()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        b.grad = a.grad.clone()  # deepcopy leaves .grad behind
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), model.gen.get_state())
    modes = [m.training for m in model.modules()]
    p = profile_cpu(model, (x,), steps=2, train=train)
    assert p.flops > 0
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2]) and torch.equal(model.gen.get_state(), states[3])
    assert [m.training for m in model.modules()] == modes and model.calls == 0
    for (k, v), (_, w) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(x.grad, twin_x.grad)
    ours = model(x)
    torch.set_rng_state(states[0])  # the twin draws what the model drew
    random.setstate(states[1])
    np.random.seed(3)
    theirs = twin(twin_x)
    assert torch.equal(ours["out"], theirs["out"]) and torch.equal(ours["aux"][0], theirs["aux"][0])
    ours["out"].sum().backward()
    theirs["out"].sum().backward()
    assert torch.equal(x.grad, twin_x.grad)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_a_paramless_model_trains_through_its_input():
    """A model with no parameters (a soft-argmax over a heat map) trains through the input that requires grad: its
    backward is counted, the input's gradient is put back as it was (None), and the forward's counts are exact:
    a softmax of (N, HW) and two (N, HW) x (HW,) matrix-vector products for the expected coordinates."""
    n, side = 3, 4

    class SoftArgmax(nn.Module):
        def forward(self, heat):
            probs = F.softmax(heat.flatten(1), -1)
            grid = torch.arange(side, dtype=heat.dtype)
            ys, xs = grid.repeat_interleave(side), grid.repeat(side)
            return torch.stack([probs @ xs, probs @ ys], -1)

    heat = torch.randn(n, side, side, requires_grad=True)
    p = profile_cpu(SoftArgmax(), (heat,), train=True)
    assert heat.grad is None
    with profile.preserved(SoftArgmax(), (heat,)):
        step = profile.make_step(SoftArgmax(), (heat,), train=True)
        step()  # the profile counts a step after its warm-up: heat.grad exists and is added into
        counts = profile.count_ops(step)
    assert by_op(counts)["aten::add_"] == n * side * side
    assert by_op(counts)["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * n * side * side
    assert by_op(counts)["aten::mv"] == 2 * (2 * n * side * side)
    assert by_op(counts)["aten::_softmax_backward_data"] == formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT * n * side * side
    assert p.flops == pytest.approx(sum(c.flops for c in counts.values()), rel=1e-12)
    assert heat.grad is None
    assert rows_of(counts, "aten::mv")


class Selections(nn.Module):
    """topk, gather of what it picked, index_add of rows into fewer rows, scatter_add of the picks, cumsum, a
    descending sort: the selections, scans and scatters of a model, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 4))

    def forward(self, x, idx):
        h = x @ self.w.t()  # (6, 10)
        v, i = h.topk(3, dim=1)
        picked = torch.gather(h, 1, i)
        pooled = torch.zeros(4, 10).index_add(0, idx, h)
        spread = torch.zeros(6, 10).scatter_add(1, i, v)
        ordered, _ = h.sort(1, descending=True)
        return picked.sum() + pooled.sum() + spread.sum() + h.cumsum(1).sum() + ordered.sum()


def test_selections_scans_and_scatters_forward_and_backward_by_hand():
    """topk a compare per element, a sort of rows of 10 10 * ceil(log2 10) compares per row, cumsum an add per
    element, index_add / scatter_add an add per source element, gather a copy (0, not uncounted); the backward's
    cumsum (of the flipped gradient), scatter_add (topk's and gather's gradients) and index_select are counted alike."""
    torch.manual_seed(0)
    model, x, idx = Selections(), torch.randn(6, 4), torch.tensor([0, 1, 1, 3, 2, 0])
    rows, width, k = 6, 10, 3
    counts = profile.count_ops(profile.make_step(model, (x, idx)))
    ours = by_op(counts)
    assert ours["aten::topk"] == rows * width
    assert ours["aten::sort"] == rows * width * 4  # ceil(log2 10) = 4
    assert ours["aten::cumsum"] == rows * width
    assert ours["aten::index_add"] == rows * width
    assert ours["aten::scatter_add"] == rows * k
    assert ours["aten::mm"] == 2 * rows * 4 * width
    (gather,) = rows_of(counts, "aten::gather")
    assert gather.flops == 0 and not gather.unsupported and gather.bytes_written == rows * k * F32
    with profile.preserved(model, (x, idx)):
        counts = profile.count_ops(profile.make_step(model, (x, idx), train=True))
    ours = by_op(counts)
    assert ours["aten::cumsum"] == 2 * rows * width  # the backward's reversed cumsum
    assert ours["aten::scatter_add"] == 2 * rows * k  # spread's forward and gather's backward
    assert ours["aten::mm"] == 2 * rows * 4 * width + 2 * rows * 4 * width  # x needs no gradient: dW only
    assert model.w.grad is None
