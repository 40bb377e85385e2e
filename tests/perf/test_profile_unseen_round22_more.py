"""Twenty-second held-out profiler round, continued: the round's fixes op by op (a training BatchNorm's running
statistics, its backward's reads, a fused observer's state, crops, distances of other orders, torch.sparse.mm's
scratch, compute_metrics' dtype), and rarely used functional ops counted by hand: cosine similarity, the triplet
margin loss, KL divergence, Huber and Gaussian NLL losses, pixel_unshuffle and channel_shuffle, a sparse COO
matmul forward and trained, an FFT convolution, einsum's outer products, traces and chained contractions, and a
learnable fake quantizer's backward.

What this round found (each pinned by the test whose docstring says so):
- native_batch_norm in training updates its running mean and variance in place, arguments its schema does not mark
  written: only its returned tensors were charged (output, batch mean, inverse deviation); any op's argument
  updated in place but not returned is now charged its write (a fused observer's running min, max, scale and zero
  point too) (counting_bytes._updated_besides);
- native_batch_norm_backward in training was charged reading the running statistics, which only eval uses
  (counting_bytes.STATISTICS_READ_BY_MODE);
- F.rrelu's noise buffer (random slopes, marked written) was charged a read though it is only drawn into, and
  F.rrelu_ in place was taken for a random draw that overwrites its input: charged reading nothing
  (counting_bytes.RANDOM_SLOPES);
- constant_pad_nd with negative pads (a crop: every pad's backward) was charged reading all of its input, not the
  elements it keeps (counting_bytes._kept_bytes);
- torch.cdist and F.pdist of an order other than 0, 1, 2 or inf were counted as p=2, without the power per term
  that torch.norm of the same differences is charged (counting_linalg._distance_flops_per_term);
- torch.sparse.mm (aten._sparse_addmm with beta=0) was charged reading the zeros it writes into
  (counting_bytes.IGNORE_SELF_WHERE_BETA_0);
- compute_metrics(dtype="fp99") (a dtype no roof is kept for) was stored as given, its row then placed under no
  roof and matched with no other run's; now refused naming ``dtype``, a torch name (``"float32"``) stored by its
  short name (metrics._short_dtype).
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tilestack import perf
from tilestack.perf import formulas
from tilestack.perf.counting import count_ops

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, one_row  # noqa: E402
from profile_support import by_op  # noqa: E402

pytestmark = FILTERS
F32, I64, I32, BOOL = 4, 8, 4, 1


def _flops(counts) -> float:
    return math.fsum(c.flops for c in counts.values())


def _nothing_uncounted(counts) -> None:
    assert not [op for (op, _), c in counts.items() if c.unsupported]


# --- BatchNorm's running statistics --------------------------------------------------------------------------------
BN_N, BN_C, BN_T = 2, 3, 10
BN_E = BN_N * BN_C * BN_T


def _batch_norm(training: bool, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return F.batch_norm(x, torch.zeros(BN_C), torch.ones(BN_C), weight, None, training=training)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_training_writes_its_running_statistics(training):
    """F.batch_norm reads x, the running mean and variance (and a weight where given); in training it writes its
    output, the batch's mean and inverse deviation and the running mean and variance it moves by the momentum
    (before round 22: those two charged no write); in eval its output alone. The running statistics are updated
    exactly where charged."""
    x = torch.randn(BN_N, BN_C, BN_T)
    mean, var = torch.zeros(BN_C), torch.ones(BN_C)
    counts = count_ops(lambda: F.batch_norm(x, mean, var, None, None, training=training))
    row = one_row(counts, "aten::native_batch_norm")
    assert row.bytes_read == (BN_E + 2 * BN_C) * F32
    assert row.bytes_written == (BN_E + 4 * BN_C if training else BN_E) * F32
    assert (not torch.equal(mean, torch.zeros(BN_C))) == training  # updated by the counted step itself
    per_element = formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT if training else formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT
    per_element -= 2 * formulas.NORM_AFFINE_FLOPS_PER_ELEMENT  # no weight to multiply, no bias to add (round 24)
    assert row.flops == per_element * BN_E


def test_batch_norm_module_in_training_counts_num_batches_tracked_and_the_updates():
    """nn.BatchNorm1d in training: num_batches_tracked += 1 (one int64 add, read and written), and the norm's row
    with its weight and bias read and the running statistics written."""
    bn = torch.nn.BatchNorm1d(BN_C)
    x = torch.randn(BN_N, BN_C, BN_T)
    counts = count_ops(lambda: bn(x))
    row = one_row(counts, "aten::native_batch_norm")
    assert (row.bytes_read, row.bytes_written) == ((BN_E + 4 * BN_C) * F32, (BN_E + 4 * BN_C) * F32)
    tracked = one_row(counts, "aten::add_")
    assert tracked.flops == 1 and (tracked.bytes_read, tracked.bytes_written) == (I64, I64)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_reads_the_statistics_of_its_mode(training):
    """The backward reads dy, x, the weight and the statistics it normalised by: the batch's saved mean and inverse
    deviation in training, the running mean and variance in eval (its saved ones are empty), never both (before
    round 22 training was charged the running statistics too: 540 bytes); it writes dx, dw."""
    x = torch.randn(BN_N, BN_C, BN_T, requires_grad=True)
    w = torch.ones(BN_C, requires_grad=True)
    dy = torch.randn(BN_N, BN_C, BN_T)
    counts = count_ops(lambda: _batch_norm(training, x, w).backward(dy))
    bwd = one_row(counts, "aten::native_batch_norm_backward")
    assert bwd.bytes_read == (2 * BN_E + 3 * BN_C) * F32 == 516
    assert bwd.bytes_written == (BN_E + BN_C) * F32
    dx = formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT if training else formulas.NORM_BWD_FROZEN_INPUT_FLOPS_PER_ELEMENT
    per = formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + dx
    assert bwd.flops == per * BN_E


def test_fused_observer_writes_its_running_state():
    """QAT's FusedMovingAvgObsFakeQuantize (aten::_fused_moving_avg_obs_fq_helper) returns the fake-quantized output
    and its bool mask, and updates its running min and max, scale and zero point in place: those four charged their
    writes too (before round 22: 500 bytes written). It reads x, the two int64 switches and the four."""
    fq = torch.ao.quantization.FusedMovingAvgObsFakeQuantize()
    x = torch.randn(4, 25)
    fq(x)  # the observer's min and max exist
    row = one_row(count_ops(lambda: fq(x)), "aten::_fused_moving_avg_obs_fq_helper")
    state = 3 * F32 + I32  # running min, max, scale (fp32), zero point (int32)
    assert row.bytes_read == 100 * F32 + 2 * I64 + state
    assert row.bytes_written == 100 * (F32 + BOOL) + state == 516
    assert row.flops == (formulas.OBSERVER_FLOPS_PER_ELEMENT + formulas.FAKE_QUANT_FLOPS_PER_ELEMENT) * 100


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
def test_rrelu_writes_its_random_slopes_in_training_only(training, in_place):
    """F.rrelu draws each element's slope into its noise buffer in training (written, never read) and uses the mean
    slope in eval (the buffer untouched): it reads x, writes its result and, in training, the slopes. In place
    (F.rrelu_) x is read too, not taken for a random draw that overwrites it (before round 22: read 0 bytes)."""
    x = torch.randn(3, 8)
    fn = (lambda: F.rrelu_(x.clone(), training=training)) if in_place else (lambda: F.rrelu(x, training=training))
    op = "aten::rrelu_with_noise_" if in_place else "aten::rrelu_with_noise"
    row = one_row(count_ops(fn), op)
    assert row.flops == 24
    assert (row.bytes_read, row.bytes_written) == (24 * F32, (48 if training else 24) * F32)


# --- pads and crops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad,kept,out", [
    ((2, 1), 2 * 3 * 10, 2 * 3 * 13),  # a padding: every input element read
    ((-2, -1), 2 * 3 * 7, 2 * 3 * 7),  # a crop: the 7 kept columns of 10
    ((2, -3, -1, 0), 2 * 2 * 7, 2 * 2 * 9),  # padded and cropped at once: 2 of 3 rows, 7 of 10 columns
    ((-5, -5), 0, 0),  # everything cropped
])
def test_constant_pad_reads_the_elements_it_keeps(pad, kept, out):
    """constant_pad_nd reads the input elements that land in its output and writes its output; no FLOPs (before
    round 22 a crop was charged reading all 60 elements)."""
    x = torch.randn(2, 3, 10)
    row = one_row(count_ops(lambda: F.pad(x, pad)), "aten::constant_pad_nd")
    assert row.flops == 0 and not row.unsupported
    assert (row.bytes_read, row.bytes_written) == (kept * F32, out * F32)


def test_pad_backward_is_a_crop_of_the_gradient():
    """A causal pad's backward crops dy (2, 3, 12) back to (2, 3, 10): it reads the 60 elements it keeps."""
    x = torch.randn(2, 3, 10, requires_grad=True)
    dy = torch.randn(2, 3, 12)
    counts = count_ops(lambda: F.pad(x, (2, 0)).backward(dy))
    crop = one_row(counts, "aten::constant_pad_nd", ((2, 3, 12),))
    assert (crop.bytes_read, crop.bytes_written) == (60 * F32, 60 * F32)


# --- distances -----------------------------------------------------------------------------------------------------
P_ROWS, R_ROWS, FEAT = 3, 5, 8


@pytest.mark.parametrize("p,per_term", [(1.0, 3), (2.0, 3), (math.inf, 3), (3.0, 4), (0.5, 4)])
def test_cdist_and_pdist_charge_the_power_of_other_orders(p, per_term):
    """Per feature of each pair: subtract, |d| or d^2, accumulate (3); an order other than 0, 1, 2, inf raises
    |d| to the p-th power too (4), as torch.norm of the same differences is counted (before round 22: 3 for every
    order). cdist over P x R pairs, pdist over the P (P - 1) / 2 pairs of its rows."""
    x, y = torch.randn(P_ROWS, FEAT), torch.randn(R_ROWS, FEAT)
    cd = one_row(count_ops(lambda: torch.cdist(x, y, p=p)), "aten::_cdist_forward")
    assert cd.flops == per_term * P_ROWS * R_ROWS * FEAT
    assert (cd.bytes_read, cd.bytes_written) == ((P_ROWS + R_ROWS) * FEAT * F32, P_ROWS * R_ROWS * F32)
    pd = one_row(count_ops(lambda: F.pdist(x, p=p)), "aten::_pdist_forward")
    assert pd.flops == per_term * P_ROWS * (P_ROWS - 1) // 2 * FEAT
    norm = by_op(count_ops(lambda: torch.norm(x[:, None] - y[None], p=p, dim=-1)))
    assert norm["aten::linalg_vector_norm"] + norm["aten::sub"] == cd.flops  # the same differences, by hand


@pytest.fixture
def triple():
    torch.manual_seed(0)
    return torch.randn(P_ROWS, FEAT), torch.randn(P_ROWS, FEAT), torch.randn(P_ROWS, FEAT)


def test_cosine_similarity_by_hand(triple):
    """F.cosine_similarity(a, b) over rows of 8: both rows' 2-norms (2 an element), their clamps (one per row),
    each side divided by its norm, the product and its row sum: 198, every op counted."""
    a, b, _ = triple
    counts = count_ops(lambda: F.cosine_similarity(a, b))
    _nothing_uncounted(counts)
    e = P_ROWS * FEAT
    assert by_op(counts)["aten::linalg_vector_norm"] == 2 * 2 * e
    assert _flops(counts) == 2 * 2 * e + 2 * P_ROWS + 2 * e + e + e == 198


def test_triplet_margin_loss_by_hand(triple):
    """F.triplet_margin_loss: each of the two pairwise distances subtracts, adds eps and takes a 2-norm (4 an
    element); the margin added, the difference, the hinge and the mean one per anchor: 204."""
    counts = count_ops(lambda: F.triplet_margin_loss(*triple))
    _nothing_uncounted(counts)
    e = P_ROWS * FEAT
    assert by_op(counts)["aten::norm"] == 2 * 2 * e
    assert _flops(counts) == 2 * (e + e + 2 * e) + 4 * P_ROWS == 204


def test_kl_div_by_hand(triple):
    """F.kl_div(log q, p, 'batchmean'): p log p (xlogy), p log q, their difference, the sum, the divide by the
    batch: 4 an element and 1: 97."""
    logq, p = triple[0].log_softmax(-1), triple[1].softmax(-1)
    counts = count_ops(lambda: F.kl_div(logq, p, reduction="batchmean"))
    _nothing_uncounted(counts)
    assert _flops(counts) == 4 * P_ROWS * FEAT + 1 == 97
    assert one_row(counts, "aten::xlogy").flops == P_ROWS * FEAT


def test_huber_and_gaussian_nll_by_hand(triple):
    """Huber: formulas.SMOOTH_L1_FLOPS_PER_ELEMENT an element, reading both inputs, writing the scalar; its backward
    SMOOTH_L1_BWD. Gaussian NLL (var given per element): the negative-variance check (a compare and an any), the
    clamp, log, subtract, square, divide, add, the half and the mean: 10 an element."""
    a, b, var = triple[0], triple[1], triple[2].abs()
    e = P_ROWS * FEAT
    row = one_row(count_ops(lambda: F.huber_loss(a, b, delta=0.5)), "aten::huber_loss")
    assert row.flops == formulas.SMOOTH_L1_FLOPS_PER_ELEMENT * e
    assert (row.bytes_read, row.bytes_written) == (2 * e * F32, F32)
    x = a.clone().requires_grad_()
    bwd = one_row(count_ops(lambda: F.huber_loss(x, b).backward()), "aten::huber_loss_backward")
    assert bwd.flops == formulas.SMOOTH_L1_BWD_FLOPS_PER_ELEMENT * e
    counts = count_ops(lambda: F.gaussian_nll_loss(a, b, var))
    _nothing_uncounted(counts)
    assert _flops(counts) == 10 * e


# --- shuffles ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,op", [
    (lambda x: F.pixel_unshuffle(x, 2), "aten::pixel_unshuffle"),
    (lambda x: F.channel_shuffle(x, 2), "aten::channel_shuffle"),
    (lambda x: torch.nn.ChannelShuffle(2)(x), "aten::channel_shuffle"),
])
def test_shuffles_move_their_elements_forward_and_back(fn, op):
    """pixel_unshuffle and channel_shuffle permute elements: no FLOPs, not uncounted, every element read and
    written once; their backward the inverse permutation of dy, as much again."""
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    dy = torch.randn(fn(x).shape)
    counts = count_ops(lambda: fn(x).backward(dy))
    _nothing_uncounted(counts)
    assert _flops(counts) == 0
    moved = [c for (name, _), c in counts.items() if name in ("aten::pixel_shuffle", "aten::pixel_unshuffle",
                                                                "aten::channel_shuffle")]
    assert sum(c.calls for c in moved) == 2
    assert sum(c.bytes_read for c in moved) == sum(c.bytes_written for c in moved) == 2 * 64 * F32
    assert one_row(counts, op).bytes_written >= 64 * F32


# --- a sparse COO product ------------------------------------------------------------------------------------------
DENSE = [[1.0, 0, 2, 0, 0], [0, 0, 0, 3, 0], [4, 0, 0, 0, 5], [0, 6, 0, 0, 0]]  # (4, 5), 6 stored
NNZ, COLS = 6, 3


def test_sparse_mm_forward_and_trained_by_stored_elements():
    """torch.sparse.mm(S (4, 5) with 6 stored, D (5, 3)): a multiply-add per stored element and column of D,
    2 * 6 * 3 = 36, reading S's int64 indices and values and D, not the zeros it writes into (before round 22: 48
    bytes more); trained, D's gradient S^T @ dy by the same stored elements (36)."""
    s = torch.tensor(DENSE).to_sparse()
    d = torch.randn(5, COLS, requires_grad=True)
    fwd = one_row(count_ops(lambda: torch.sparse.mm(s, d.detach())), "aten::_sparse_addmm")
    assert fwd.flops == 2 * NNZ * COLS == 36
    assert (fwd.bytes_read, fwd.bytes_written) == (NNZ * (2 * I64 + F32) + 5 * COLS * F32, 4 * COLS * F32)
    dy = torch.randn(4, COLS)
    counts = count_ops(lambda: torch.sparse.mm(s, d).backward(dy))
    assert by_op(counts)["aten::mm"] == 2 * NNZ * COLS
    assert torch.allclose(d.grad, torch.tensor(DENSE).T @ dy)


# --- FFT convolution -----------------------------------------------------------------------------------------------
FFT_ROWS, FFT_N = 2, 16
FFT_HALF = FFT_N // 2 + 1  # one-sided spectrum


def test_fft_convolution_by_hand():
    """A circular convolution by FFT: two real-input FFTs (5 N log2 N / 2 each per row), the complex product of the
    one-sided spectra (6 an element), the inverse real FFT (5 N log2 N / 2 per row) with its 1/N scaling (one per
    output value): 1100. Its result matches the direct circular convolution."""
    torch.manual_seed(0)
    x, k = torch.randn(FFT_ROWS, FFT_N), torch.randn(FFT_ROWS, FFT_N)
    conv = lambda: torch.fft.irfft(torch.fft.rfft(x) * torch.fft.rfft(k), n=FFT_N)  # noqa: E731
    counts = count_ops(conv)
    real_fft = FFT_ROWS * formulas.fft_flops(FFT_N, real=True)
    assert by_op(counts)["aten::_fft_r2c"] == 2 * real_fft
    assert by_op(counts)["aten::mul"] == formulas.COMPLEX_MUL_FLOPS * FFT_ROWS * FFT_HALF
    assert by_op(counts)["aten::_fft_c2r"] == real_fft + FFT_ROWS * FFT_N
    assert _flops(counts) == 3 * real_fft + 6 * FFT_ROWS * FFT_HALF + FFT_ROWS * FFT_N == 1100
    mul = one_row(counts, "aten::mul")
    assert (mul.bytes_read, mul.bytes_written) == (2 * FFT_ROWS * FFT_HALF * 2 * F32, FFT_ROWS * FFT_HALF * 2 * F32)
    direct = torch.stack([sum(x[:, j] * k[:, (i - j) % FFT_N] for j in range(FFT_N)) for i in range(FFT_N)], -1)
    assert torch.allclose(conv(), direct, atol=1e-4)


def test_complex_fft_with_orthonormal_scaling():
    """torch.fft.fft(norm='ortho') of complex rows of 8: 5 N log2 N per row and a multiply per real output value
    (the 1/sqrt(N) scaling), the inverse the same: 2 * (2 * 120 + 32) = 544."""
    xc = torch.randn(2, 8, dtype=torch.complex64)
    counts = count_ops(lambda: torch.fft.ifft(torch.fft.fft(xc, norm="ortho"), norm="ortho"))
    assert by_op(counts)["aten::_fft_c2c"] == 2 * (2 * formulas.fft_flops(8) + 2 * 2 * 8) == 544


# --- einsum --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("equation,shapes,op,flops", [
    ("i,j->ij", [(3,), (4,)], "aten::mul", 12),  # an outer product: one multiply per output element
    ("ii", [(3, 3)], "aten::sum", 3),  # a trace: the diagonal (a view) summed
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], "aten::bmm", 2 * 2 * 3 * 4 * 5),
    ("bi,ij,bj->b", [(2, 3), (3, 4), (2, 4)], "aten::bmm", 2 * 2 * 3 * 4 + 2 * 2 * 4),  # x^T W y per row
])
def test_einsum_is_counted_as_the_ops_it_lowers_to(equation, shapes, op, flops):
    """einsum runs views, permutes and products: the products counted (a bilinear form as two: x W, then the row
    dot products), nothing else computing, nothing uncounted."""
    torch.manual_seed(0)
    args = [torch.randn(s) for s in shapes]
    counts = count_ops(lambda: torch.einsum(equation, *args))
    _nothing_uncounted(counts)
    assert by_op(counts)[op] == _flops(counts) == flops


# --- fake quantization ---------------------------------------------------------------------------------------------
def test_learnable_fake_quantize_backward():
    """_fake_quantize_learnable_per_tensor_affine: 2 an element forward; its backward the input's, the scale's and
    the zero point's gradients, formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT an element, reading dy, x and
    the two qparams, writing dx and the two one-element gradients."""
    x = torch.randn(4, 6, requires_grad=True)
    scale, zp = torch.tensor([0.1], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    dy = torch.randn(4, 6)
    counts = count_ops(lambda: torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -128, 127).backward(dy))
    fwd = one_row(counts, "aten::_fake_quantize_learnable_per_tensor_affine")
    assert fwd.flops == formulas.FAKE_QUANT_FLOPS_PER_ELEMENT * 24
    bwd = one_row(counts, "aten::_fake_quantize_learnable_per_tensor_affine_backward")
    assert bwd.flops == formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT * 24
    assert (bwd.bytes_read, bwd.bytes_written) == ((2 * 24 + 2) * F32, (24 + 2) * F32)


# --- bad arguments -------------------------------------------------------------------------------------------------
def _metrics(**kw):
    return perf.compute_metrics(name="k", latency_s=1e-3, flops=1.0, bytes_read=1.0, bytes_written=1.0, **kw)


@pytest.mark.parametrize("dtype", ["fp99", "int4", "FP32", "half precision"])
def test_compute_metrics_refuses_a_dtype_of_no_name(dtype):
    """compute_metrics(dtype=...) takes a dtype's short name: another was stored as given and its row then found no
    roof and no match among other runs' rows (round 22)."""
    with pytest.raises(perf.MetricsError, match=r"dtype=.*expected a dtype's short name"):
        _metrics(dtype=dtype)


@pytest.mark.parametrize("dtype,stored", [("fp32", "fp32"), ("bf16", "bf16"), ("float32", "fp32"),
                                          ("bfloat16", "bf16"), ("", ""), (None, "")])
def test_compute_metrics_stores_a_dtype_by_its_short_name(dtype, stored):
    m = _metrics(dtype=dtype)
    assert m.dtype == stored
    m.to_row()
