"""Twenty-first held-out profiler round, continued: the round's fixes op by op (NLL's ignored targets, scatter
reductions, masked_scatter's source), interpolation, fold / unfold / pixel_shuffle, sorts, torch.where with
broadcasting, fake quantization, cumsum-based ragged offsets, a training step with gradient clipping and an LR
scheduler, a custom op with no formula, and bad arguments to the public API.

What this round found (each pinned by the test whose docstring says so):
- NLL (cross_entropy, nll_loss, their 2-D forms) charged every target a FLOP and a log-probability read, the
  targets at ``ignore_index`` too, though the kernels skip those (a padded batch's pad tokens add nothing to the loss
  nor get a gradient); forward and backward (counting_rules.nll_targets, counting_bytes._gathered_bytes);
- scatter_add / scatter_reduce were charged one add per element of ``src``, though they take only the elements under
  ``index`` (whose shape may be smaller); reduce="mean" (scatter_reduce, index_reduce) was counted as a sum, without
  the divide of each result element by its count (counting_rules._reduce_into_flops);
- masked_scatter was charged reading all of ``source``, though it takes mask.sum() elements of it; in place it was
  charged reading and writing all of ``self``, though it writes the masked elements alone
  (counting_bytes._masked_scatter_bytes);
- torch.unique (a sort of its elements and a neighbour compare) and unique_consecutive were counted 0 FLOPs as data
  movement (counting_rules._unique_flops; counting.NO_ARITHMETIC);
- torch.round(x, decimals=d) (a scale, the round, the unscale) was counted as a plain round, 1 per element
  (counting_rules._round_flops, formulas.ROUND_DECIMALS_FLOPS_PER_ELEMENT);
- compute_metrics(device_kind="tpu") (or "CPU") was accepted and stored; every later placement of the Measurement
  (its to_row(), the reports) then failed in roofline.place; now refused naming ``device_kind`` (metrics.py).
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack import perf
from tilestack.errors import LaunchError
from tilestack.perf import formulas, profile, roofline
from tilestack.perf.counting import count_ops

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, one_row, profile_cpu  # noqa: E402
from profile_support import CEIL, assert_rows_add_up, assert_rows_finite, rendered  # noqa: E402

pytestmark = FILTERS
F32, I64, BOOL = 4, 8, 1
IGNORE = -100


# --- NLL with ignore_index -----------------------------------------------------------------------------------------
N_ROWS, N_CLASSES = 6, 5
TARGETS = [0, IGNORE, 2, IGNORE, IGNORE, 4]
REAL = 3  # targets that are not IGNORE


@pytest.fixture
def logp():
    torch.manual_seed(0)
    return torch.randn(N_ROWS, N_CLASSES).log_softmax(-1)


def test_nll_skips_ignored_targets(logp):
    """nll_loss adds one log-probability per target that is not ignore_index: 3 FLOPs of 6 targets; it reads the
    int64 targets and the 3 picked log-probabilities (before round 21: 6 FLOPs, 6 reads)."""
    row = one_row(count_ops(lambda: F.nll_loss(logp, torch.tensor(TARGETS), ignore_index=IGNORE)),
                  "aten::nll_loss_forward")
    assert row.flops == REAL * formulas.NLL_FLOPS_PER_TARGET
    assert row.bytes_read == N_ROWS * I64 + REAL * F32


def test_nll_with_a_custom_ignore_index_and_class_weights(logp):
    """A non-default ignore_index (class 2 here) is skipped the same way; the class weights are read whole."""
    t = torch.tensor([0, 2, 2, 1, 4, 2])
    w = torch.rand(N_CLASSES)
    row = one_row(count_ops(lambda: F.nll_loss(logp, t, weight=w, ignore_index=2)), "aten::nll_loss_forward")
    assert row.flops == 3
    assert row.bytes_read == N_ROWS * I64 + 3 * F32 + N_CLASSES * F32


def test_nll_every_target_ignored_costs_no_flops(logp):
    """A batch of padding only: no log-probability added or read; the targets are still read."""
    row = one_row(count_ops(lambda: F.nll_loss(logp, torch.full((N_ROWS,), IGNORE))), "aten::nll_loss_forward")
    assert row.flops == 0 and row.bytes_read == N_ROWS * I64


def test_nll_2d_skips_ignored_pixels():
    """A segmentation loss (nll_loss2d): the ignored pixels (3 of 8, 'void' labels) add nothing and read no
    log-probability."""
    torch.manual_seed(0)
    lp = torch.randn(2, 3, 2, 2).log_softmax(1)
    t = torch.tensor([[[0, IGNORE], [1, 2]], [[IGNORE, IGNORE], [0, 1]]])
    row = one_row(count_ops(lambda: F.nll_loss(lp, t)), "aten::nll_loss2d_forward")
    assert row.flops == 5 and row.bytes_read == 8 * I64 + 5 * F32


def test_nll_backward_skips_ignored_targets():
    """cross_entropy trained: NLL's backward writes -dy at the real targets only, one FLOP each, into a zeroed
    (rows, C) gradient."""
    torch.manual_seed(0)
    x = torch.randn(N_ROWS, N_CLASSES, requires_grad=True)
    counts = count_ops(lambda: F.cross_entropy(x, torch.tensor(TARGETS)).backward())
    bwd = one_row(counts, "aten::nll_loss_backward")
    assert bwd.flops == REAL and bwd.bytes_written == N_ROWS * N_CLASSES * F32


def test_nll_on_meta_counts_every_target():
    """On the meta device the targets have no values: every target is counted (an upper bound), not a failure."""
    lp = torch.empty(N_ROWS, N_CLASSES, device="meta")
    t = torch.empty(N_ROWS, dtype=torch.long, device="meta")
    row = one_row(count_ops(lambda: F.nll_loss(lp, t)), "aten::nll_loss_forward")
    assert row.flops == N_ROWS


# --- scatter reductions --------------------------------------------------------------------------------------------
V, E, W = 3, 4, 2
DST = [0, 1, 1, 2]


def test_scatter_add_takes_only_the_elements_under_its_index():
    """scatter_add(0, index (E, 1), src (E, W)) adds the E elements of src's first column alone (index's shape,
    not src's, sets what is taken): E adds, not E*W (before round 21: 8)."""
    index = torch.tensor(DST)[:, None]  # (E, 1)
    src = torch.ones(E, W)
    out = torch.zeros(V, W).scatter_add(0, index, src)
    assert out[:, 1].abs().sum() == 0  # the second column untouched: only index's elements were taken
    row = one_row(count_ops(lambda: torch.zeros(V, W).scatter_add(0, index, src)), "aten::scatter_add")
    assert row.flops == E


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_mean_divides_each_result_element(include_self):
    """scatter_reduce(reduce='mean') adds each message into its destination (E*W) and then divides every element of
    the (V, W) result by its count (V*W): 14 (before round 21: 8, counted as a sum)."""
    index = torch.tensor(DST)[:, None].expand(E, W)
    src = torch.randn(E, W)
    row = one_row(count_ops(lambda: torch.zeros(V, W).scatter_reduce(0, index, src, "mean",
                                                                       include_self=include_self)),
                  "aten::scatter_reduce")
    assert row.flops == E * W + V * W == 14
    # its (V, W) start, the expanded index as held (E int64), all of src; the (V, W) result written
    assert (row.bytes_read, row.bytes_written) == (V * W * F32 + E * I64 + E * W * F32, V * W * F32)


@pytest.mark.parametrize("reduce", ["sum", "prod", "amax", "amin"])
def test_scatter_reduce_other_reductions_one_per_element(reduce):
    """sum, prod, amax, amin: one add, multiply or compare per element taken, no divide."""
    index = torch.tensor(DST)[:, None].expand(E, W)
    counts = count_ops(lambda: torch.ones(V, W).scatter_reduce_(0, index, torch.randn(E, W), reduce))
    assert one_row(counts, "aten::scatter_reduce_").flops == E * W


def test_index_reduce_mean_divides_each_result_element():
    """index_reduce_(reduce='mean') over whole rows: E*W adds, then the (V, W) result divided by its counts."""
    counts = count_ops(lambda: torch.ones(V, W).index_reduce_(0, torch.tensor(DST), torch.randn(E, W), "mean"))
    assert one_row(counts, "aten::index_reduce_").flops == E * W + V * W


def test_index_add_counts_the_source():
    """index_add_ (the GNN sum aggregation): one add per element of source, in place over the touched rows."""
    counts = count_ops(lambda: torch.zeros(V, W).index_add_(0, torch.tensor(DST), torch.randn(E, W)))
    row = one_row(counts, "aten::index_add_")
    assert row.flops == E * W
    assert (row.bytes_read, row.bytes_written) == (E * I64 + 2 * E * W * F32, E * W * F32)


# --- masked_scatter / masked_select --------------------------------------------------------------------------------
MASK = [[True, False, False, True, False]]  # broadcast over 4 rows: 8 elements taken


def test_masked_scatter_reads_the_source_elements_it_takes():
    """masked_scatter over a (4, 5) destination with a (1, 5) mask broadcast to 8 true elements reads self, the
    mask (bool) and 8 of the 20 source elements (before round 21: all 20); writes its (4, 5) result; no FLOPs. In
    place (masked_scatter_) it reads the mask and those 8 source elements and writes the 8 it takes, as an index_put_
    (before round 21: self read and written whole)."""
    mask, src = torch.tensor(MASK), torch.randn(4, 5)
    row = one_row(count_ops(lambda: torch.zeros(4, 5).masked_scatter(mask, src)), "aten::masked_scatter")
    assert row.flops == 0 and not row.unsupported
    assert (row.bytes_read, row.bytes_written) == (20 * F32 + 5 * BOOL + 8 * F32, 20 * F32)
    dest = torch.zeros(4, 5)
    row = one_row(count_ops(lambda: dest.masked_scatter_(mask, src)), "aten::masked_scatter_")
    assert row.flops == 0 and not row.unsupported
    assert (row.bytes_read, row.bytes_written) == (5 * BOOL + 8 * F32, 8 * F32)
    assert torch.equal(dest[mask.expand(4, 5)], src.flatten()[:8])  # the first 8 source elements, in order


def test_masked_select_reads_what_it_returns():
    """masked_select returns the 8 selected elements: it reads those and the mask."""
    mask = torch.tensor(MASK).expand(4, 5)
    row = one_row(count_ops(lambda: torch.randn(4, 5).masked_select(mask)), "aten::masked_select")
    assert (row.bytes_read, row.bytes_written) == (8 * F32 + 5 * BOOL, 8 * F32)


def test_where_with_broadcasting_counts_the_output_and_reads_held_inputs():
    """torch.where(cond (4, 1), a (1, 5), b (4, 5)): one select per output element (20); each input read as held."""
    c, a, b = torch.randn(4, 1) > 0, torch.randn(1, 5), torch.randn(4, 5)
    row = one_row(count_ops(lambda: torch.where(c, a, b)), "aten::where")
    assert row.flops == 20
    assert (row.bytes_read, row.bytes_written) == (4 * BOOL + 5 * F32 + 20 * F32, 20 * F32)


# --- interpolation, fold / unfold, pixel shuffle -------------------------------------------------------------------
@pytest.mark.parametrize("mode,key,taps_out", [
    ("bilinear", "aten::upsample_bilinear2d", "bilinear2d"), ("bicubic", "aten::upsample_bicubic2d", "bicubic2d"),
])
def test_interpolate_is_a_multiply_add_per_tap(mode, key, taps_out):
    """F.interpolate 4x4 -> 8x8 on 2 channels: 2 FLOPs (a multiply-add) per tap (4 bilinear, 16 bicubic) at each of
    the 128 output elements; the input read once, the output written."""
    x = torch.randn(1, 2, 4, 4)
    row = one_row(count_ops(lambda: F.interpolate(x, scale_factor=2, mode=mode)), key)
    assert row.flops == 2 * formulas.INTERPOLATION_TAPS[taps_out] * 128
    assert (row.bytes_read, row.bytes_written) == (32 * F32, 128 * F32)


def test_interpolate_backward_spreads_dy_over_the_same_taps():
    """Bilinear's backward spreads each dy element over its 4 taps: 8 per dy element, as the forward."""
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    counts = count_ops(lambda: F.interpolate(x, scale_factor=2, mode="bilinear").sum().backward())
    assert one_row(counts, "aten::upsample_bilinear2d_backward").flops == 2 * 4 * 128


def test_unfold_moves_fold_adds_pixel_shuffle_moves():
    """F.unfold (im2col) copies each 2x2 patch out: no FLOPs, the (1, 8, 9) columns written; F.fold (col2im) adds
    every column element into its pixel: 72 adds; pixel_shuffle a permutation: no FLOPs, its elements moved."""
    x = torch.randn(1, 2, 4, 4)
    unfold = one_row(count_ops(lambda: F.unfold(x, 2)), "aten::im2col")
    assert unfold.flops == 0 and (unfold.bytes_read, unfold.bytes_written) == (32 * F32, 72 * F32)
    cols = torch.randn(1, 8, 9)
    fold = one_row(count_ops(lambda: F.fold(cols, (4, 4), 2)), "aten::col2im")
    assert fold.flops == 72 and (fold.bytes_read, fold.bytes_written) == (72 * F32, 32 * F32)
    y = torch.randn(1, 8, 3, 3)
    ps = one_row(count_ops(lambda: F.pixel_shuffle(y, 2)), "aten::pixel_shuffle")
    assert ps.flops == 0 and not ps.unsupported and ps.bytes_read == ps.bytes_written == 72 * F32


# --- sorts, selections, ragged offsets -----------------------------------------------------------------------------
ROWS, LEN = 4, 16


def test_sort_argsort_topk_by_compares():
    """sort and argsort (its sort) n * ceil(log2 n) compares per row of n (16 * 4 * 4 rows = 256); the sort writes
    values and int64 indices; topk one compare per element read (64), writing k values and indices per row."""
    x = torch.randn(ROWS, LEN)
    per_row = LEN * math.ceil(math.log2(LEN))
    for fn in (lambda: torch.sort(x, -1), lambda: torch.argsort(x, -1)):
        row = one_row(count_ops(fn), "aten::sort")
        assert row.flops == ROWS * per_row == 256
        assert (row.bytes_read, row.bytes_written) == (ROWS * LEN * F32, ROWS * LEN * (F32 + I64))
    top = one_row(count_ops(lambda: torch.topk(x, 3, -1)), "aten::topk")
    assert top.flops == ROWS * LEN and top.bytes_written == ROWS * 3 * (F32 + I64)


UNIQUE_IN = [3, 1, 2, 3, 1, 0, 7, 7]


def test_unique_is_a_sort_not_a_copy():
    """torch.unique (sorted, its default) sorts its n = 8 elements, n * ceil(log2 n) = 24 compares as sort is counted,
    and compares each with its neighbour (8): 32; sorted=False on the CPU probes a hash set once per element (8);
    unique_consecutive compares neighbours alone (8). Before round 21 each was counted 0 FLOPs as data movement."""
    x = torch.tensor(UNIQUE_IN)
    n = len(UNIQUE_IN)
    for fn in (lambda: torch.unique(x), lambda: torch.unique(x, return_inverse=True, return_counts=True)):
        row = one_row(count_ops(fn), "aten::_unique2")
        assert row.flops == n * math.ceil(math.log2(n)) + n == 32 and not row.unsupported
    assert one_row(count_ops(lambda: torch.unique(x, sorted=False)), "aten::_unique2").flops == n
    assert one_row(count_ops(lambda: torch.unique_consecutive(x)), "aten::unique_consecutive").flops == n


def test_unique_along_a_dim_compares_whole_slices():
    """torch.unique(x, dim=0) of 4 rows of 2: the rows sorted (4 * ceil(log2 4) = 8 compares) and each compared with
    its neighbour (4), every compare over a row's 2 elements: 24; along dim=1 (2 columns of 4): (2 + 2) * 4 = 16."""
    x = torch.tensor([[1, 2], [3, 4], [1, 2], [0, 0]])
    assert one_row(count_ops(lambda: torch.unique(x, dim=0)), "aten::unique_dim").flops == (8 + 4) * 2
    assert one_row(count_ops(lambda: torch.unique(x, dim=1)), "aten::unique_dim").flops == (2 + 2) * 4


def test_cumsum_ragged_offsets():
    """Ragged batch offsets: cumsum over the lengths one add each; repeat_interleave (the row id of every element)
    copies, counting nothing but the bytes it writes."""
    lengths = torch.tensor([3, 1, 2])
    counts = count_ops(lambda: (torch.cumsum(lengths, 0), torch.repeat_interleave(lengths)))
    assert one_row(counts, "aten::cumsum").flops == 3
    rep = one_row(counts, "aten::repeat_interleave")
    assert rep.flops == 0 and rep.bytes_written == 6 * I64


# --- quantized-looking ops -----------------------------------------------------------------------------------------
def test_fake_quantize_round_clamp():
    """fake_quantize_per_tensor_affine: scale, round, clamp, rescale counted FAKE_QUANT_FLOPS_PER_ELEMENT (2) per
    element, writing the output and its bool mask; per channel the same, reading its scales and zero points;
    torch.round and torch.clamp one per element."""
    x = torch.randn(4, 25)
    t = one_row(count_ops(lambda: torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)),
                "aten::fake_quantize_per_tensor_affine_cachemask")
    assert t.flops == formulas.FAKE_QUANT_FLOPS_PER_ELEMENT * 100 and t.bytes_written == 100 * (F32 + BOOL)
    scale, zp = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int32)
    c = one_row(count_ops(lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127)),
                "aten::fake_quantize_per_channel_affine_cachemask")
    assert c.flops == formulas.FAKE_QUANT_FLOPS_PER_ELEMENT * 100 and c.bytes_read == 100 * F32 + 4 * F32 + 4 * 4
    assert one_row(count_ops(lambda: torch.round(x)), "aten::round").flops == 100
    assert one_row(count_ops(lambda: torch.clamp(x, -1, 1)), "aten::clamp").flops == 100


@pytest.mark.parametrize("fn,op,per_element", [
    (lambda x: torch.round(x), "aten::round", 1),
    (lambda x: torch.round(x, decimals=0), "aten::round", 1),
    (lambda x: torch.round(x, decimals=2), "aten::round", formulas.ROUND_DECIMALS_FLOPS_PER_ELEMENT),
    (lambda x: x.clone().round_(decimals=-1), "aten::round_", formulas.ROUND_DECIMALS_FLOPS_PER_ELEMENT),
])
def test_round_to_decimals_scales_rounds_and_unscales(fn, op, per_element):
    """torch.round(x, decimals=d) is x * 10^d, the round and / 10^d: 3 per element (before round 21: 1, as a plain
    round); a plain round (or decimals=0) 1."""
    x = torch.randn(10)
    row = one_row(count_ops(lambda: fn(x)), op)
    assert row.flops == per_element * 10 and (row.bytes_read, row.bytes_written) == (10 * F32, 10 * F32)


# --- a training step with gradient clipping and an LR scheduler ----------------------------------------------------
IN, HID, OUT, BATCH = 4, 6, 2, 3
PARAMS = IN * HID + HID + HID * OUT + OUT  # 44


def _clipped_training_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train_step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        sched.step()
        return loss

    return train_step, net, opt, sched, (torch.randn(BATCH, IN), torch.randn(BATCH, OUT))


def test_training_step_with_clipping_and_scheduler_by_hand():
    """A training step written as a function (its own backward, clip_grad_norm_, SGD with momentum, StepLR):
    profiled as written, every op counted. The clipping: each gradient's 2-norm (2 per element: _foreach_norm), the
    norm of the 4 norms, the clip coefficient (add, reciprocal, multiply, clamp: 4) and the rescale of every gradient
    element (_foreach_mul_, 1 each). The learning rate and the scheduler's epoch are put back after profiling."""
    step, net, opt, sched, inputs = _clipped_training_step()
    lr, epoch, w = opt.param_groups[0]["lr"], sched.last_epoch, net[0].weight.detach().clone()
    p = profile_cpu(step, inputs)
    assert not p.unsupported
    assert (opt.param_groups[0]["lr"], sched.last_epoch) == (lr, epoch) and torch.equal(net[0].weight, w)
    rows = {o.op: o for o in p.ops}
    assert rows["aten::_foreach_norm"].m.flops * rows["aten::_foreach_norm"].calls == 2 * PARAMS
    assert rows["aten::_foreach_mul_"].m.flops * rows["aten::_foreach_mul_"].calls == PARAMS
    assert rows["aten::linalg_vector_norm"].m.flops == 2 * 4  # the 4 parameter tensors' norms
    assert_rows_finite(p)
    assert "own step" in rendered(p)


def test_training_step_counts_add_up():
    """The counted step of the same function: its rows carry every counted FLOP and byte."""
    step, _, _, _, inputs = _clipped_training_step()
    p = profile_cpu(step, inputs)
    step2, _, _, _, inputs2 = _clipped_training_step()
    step2(*inputs2)  # warm: the momentum buffers exist, as in the profile's counted step
    counts = count_ops(lambda: step2(*inputs2))
    matmuls = 2 * BATCH * (IN * HID + HID * OUT)  # forward
    grads = 2 * BATCH * (IN * HID + 2 * HID * OUT)  # weight gradients of both, input gradient of the second
    assert math.fsum(c.flops for (op, _), c in counts.items() if op in ("aten::addmm", "aten::mm")) == matmuls + grads
    assert p.flops > 0 and p.bytes > 0


# --- an op with no formula -----------------------------------------------------------------------------------------
@torch.library.custom_op("tilestack_r21::softsign_sq", mutates_args=())
def softsign_sq(x: torch.Tensor) -> torch.Tensor:
    return (x / (1 + x.abs())) ** 2


@softsign_sq.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return softsign_sq(self.lin(x))


def test_custom_op_is_reported_uncounted_never_a_silent_zero():
    """A user's custom op (torch.library) has no formula: its count is flagged unsupported, its row's bound unknown
    with no roof fraction, the profile lists it and the table says so; the linear before it is counted as usual."""
    row = one_row(count_ops(lambda: softsign_sq(torch.randn(4, 5))), "tilestack_r21::softsign_sq")
    assert row.unsupported and (row.bytes_read, row.bytes_written) == (20 * F32, 20 * F32)
    torch.manual_seed(0)
    p = profile_cpu(CustomOpNet(), (torch.randn(4, 5),))
    assert p.unsupported == ("tilestack_r21::softsign_sq",)
    (custom,) = [o for o in p.ops if o.op == "tilestack_r21::softsign_sq"]
    assert not custom.flops_known and custom.bound == "unknown" and custom.roof_fraction is None
    assert "no FLOP formula for" in rendered(p)
    (lin,) = [o for o in p.ops if o.op == "aten::addmm"]
    assert lin.m.flops == 2 * 4 * 5 * 5


# --- bad arguments -------------------------------------------------------------------------------------------------
def _metrics(**kw):
    return perf.compute_metrics(name="k", latency_s=1e-3, flops=1.0, bytes_read=1.0, bytes_written=1.0, **kw)


@pytest.mark.parametrize("kind", ["tpu", "CPU", "cuda:0", "gpu"])
def test_compute_metrics_refuses_a_device_kind_of_no_device(kind):
    """compute_metrics(device_kind=...) takes 'cuda', 'cpu' or '' (read off the name): another was stored and made
    every later placement of the Measurement (to_row, the reports) fail in roofline.place (round 21)."""
    with pytest.raises(perf.MetricsError, match=r"device_kind=.*expected 'cuda', 'cpu' or ''"):
        _metrics(device_kind=kind)
    for ok in ("cuda", "cpu", ""):
        _metrics(device_kind=ok).to_row()


TINY = nn.Linear(3, 3)


@pytest.mark.parametrize("kwargs,arg", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"warmup": -1}, "warmup"), ({"train": "yes"}, "train"),
    ({"name": ""}, "name"), ({"ceilings": "fast"}, "ceilings"), ({"fastpath": 1}, "fastpath"),
    ({"budget_s": float("nan"), "steps": None}, "budget_s"), ({"device": 2.5}, "device"),
])
def test_profile_model_names_each_bad_argument(kwargs, arg):
    """Each bad argument of profile_model is refused by name, what was given and what was expected, before a step."""
    calls = []
    model = lambda x: calls.append(1) or TINY(x)  # noqa: E731
    with pytest.raises((profile.ProfileError, perf.device.DeviceError), match=rf"\b{arg}="):
        profile_cpu(model, (torch.randn(2, 3),), **kwargs)
    assert not calls


@pytest.mark.parametrize("fn,arg", [
    (lambda: formulas.attention(1, 4, 8, 8, 16, kv_heads=3), "kv_heads"),
    (lambda: formulas.convolution((1, 4, 8, 8), (4, 4, 3, 3), (1, 4, 6, 6), groups=0), "groups"),
    (lambda: formulas.elementwise(8, flops_per_element=float("nan")), "flops_per_element"),
    (lambda: formulas.fft_flops(-4), "points"),
])
def test_formulas_name_each_bad_argument(fn, arg):
    with pytest.raises(LaunchError, match=rf"\b{arg}="):
        fn()


def test_count_ops_and_place_name_their_arguments():
    with pytest.raises(profile.ProfileError, match=r"step=.*expected a callable"):
        count_ops(torch.randn(3))
    with pytest.raises(roofline.RooflineError, match=r"kind="):
        roofline.place(flops=1.0, bytes_moved=1.0, seconds=1.0, roof=roofline.Roof(1.0, 1.0), kind="tpu")


def test_profile_placements_under_the_synthetic_ceilings():
    """A model mixing this round's ops profiles with every row finite and the rows adding up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.Hardswish(), nn.PixelShuffle(2), nn.Upsample(scale_factor=2,
                                                                                              mode="bilinear"))
    x = torch.randn(1, 2, 4, 4)
    p = profile_cpu(model, (x,))
    counts = count_ops(lambda: model(x))
    assert_rows_add_up(p, counts)
    assert_rows_finite(p)
    assert p.ceilings is CEIL and not p.unsupported
