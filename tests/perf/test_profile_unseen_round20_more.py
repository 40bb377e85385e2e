"""Twentieth held-out profiler round, continued: the round's fixes op by op, models run under no_grad,
inference_mode and bf16 autocast, a training step written as a function (its own backward and AdamW step), integer
and complex models, an op with no formula, the result store, and bad arguments to the public API.

What this round found (each pinned by the test whose docstring says so):
- reductions and accumulations over complex tensors (sum, mean, prod, cumsum, cumprod, index_add, an accumulating
  index_put_, trace, var, std) were counted one
  FLOP per complex element, though a complex add is two real adds (as ``x + y`` of complex tensors was already
  counted) and a complex product six; complex mv / dot / vdot / addr were counted as real ones (a complex mm 4x);
  a complex vector norm as a real one (counting.py, counting_rules._accumulate_flops / _vector_norm_flops,
  counting_linalg._matrix_vector_flops);
- nn.LSTM(bias=False) on the CPU was charged reading its weights twice: the kernel's bias slots hold placeholders
  of the weights' shapes that it never reads (counting_bytes.BIAS_SLOTS_UNREAD_WITHOUT_BIAS);
- grid_sample(mode="nearest")'s backward was counted 0 FLOPs, though it adds each element of dy into the input's
  gradient, as nearest upsampling's backward is counted (counting_rules._grid_sample_flops);
- grid_sample read its whole input at every call, though it reads the taps of the points it samples (a few points
  of a large feature map: a fraction of it) (counting_bytes.SAMPLERS);
- addmm / baddbmm / addbmm / addmv / addr with beta=0 were charged reading ``self``, which their kernels ignore:
  attention written as torch.baddbmm(torch.empty(B*H, L, L), q, k^T, beta=0, alpha=scale) was charged reading its
  (B*H, L, L) scratch (counting_bytes.IGNORE_SELF_WHERE_BETA_0);
- formulas.sdpa took q, k of different head dims (or k, v of different heads, keys or batch) and counted them as if
  k were q's width; now refused naming the shapes;
- roofline.place(kind="tpu") (or "CPU", "cuda:0") placed a kernel with a GPU's tips without a word; now refused
  naming ``kind`` ('' stays: a stored row's unknown kind);
- torch.logspace (a power per element) was reported uncounted;
- profile_model(device=torch.device("cpu", 0)) (or "cpu:0") was refused as no device (device.detect);
- profile_model(name="") was taken as no name (the class's), pairing its rows in the store with every other unnamed
  run of that class; now refused naming ``name``.
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
from _profile_helpers import FILTERS, RIDGE, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import CEIL, assert_rows_add_up, assert_rows_finite, by_op, flops_of, rendered  # noqa: E402

pytestmark = FILTERS
F32, BF16, I64, C64 = 4, 2, 8, 8


def counted(fn) -> dict:
    return count_ops(fn)


def only(counts, op):
    (c,) = [c for (name, _), c in counts.items() if name == op]
    return c


# --- complex reductions and products -------------------------------------------------------------------------------
Z_ROWS, Z_COLS = 4, 6


@pytest.fixture
def z():
    torch.manual_seed(0)
    return torch.randn(Z_ROWS, Z_COLS, dtype=torch.cfloat)


@pytest.mark.parametrize("op,fn", [
    ("aten::sum", lambda t: t.sum(0)), ("aten::mean", lambda t: t.mean(0)), ("aten::cumsum", lambda t: t.cumsum(0)),
    ("aten::index_add", lambda t: t.index_add(0, torch.tensor([0, 1]), t[:2])),
    ("aten::index_put_", lambda t: t.clone().index_put_((torch.tensor([0, 0, 1]),), t[:3], accumulate=True)),
    ("aten::trace", lambda t: torch.trace(t[:, :Z_ROWS])),
    ("aten::var", lambda t: t.var(0)), ("aten::std", lambda t: t.std(1)),
])
def test_a_complex_sum_counts_both_parts(z, op, fn):
    """A complex reduction or accumulation adds real and imaginary parts: twice the adds of a real one of as many
    elements, as many as summing the two parts apart, and as the element-wise complex add is counted (it was
    counted one FLOP a complex element)."""
    ours = only(counted(lambda: fn(z)), op).flops
    real = only(counted(lambda: fn(z.real.contiguous())), op).flops
    assert ours == formulas.COMPLEX_ELEMENT_OVER_REAL * real
    assert only(counted(lambda: z + z), "aten::add").flops == formulas.COMPLEX_ELEMENT_OVER_REAL * z.numel()


@pytest.mark.parametrize("op,fn", [("aten::prod", lambda t: t.prod(0)), ("aten::cumprod", lambda t: t.cumprod(0))])
def test_a_complex_product_reduction_counts_complex_multiplies(z, op, fn):
    """prod / cumprod of complex elements: a complex multiply (6 real operations) per element folded in."""
    assert only(counted(lambda: fn(z)), op).flops == formulas.COMPLEX_MUL_FLOPS * Z_ROWS * Z_COLS


def test_complex_matrix_vector_products_count_as_a_complex_mm(z):
    """mv, vdot and addr of complex operands: 4x the real multiply-adds (8 FLOPs a complex MAC), as a complex mm is
    counted; the real ones unchanged."""
    v = torch.randn(Z_COLS, dtype=torch.cfloat)
    mac = formulas.FLOPS_PER_MAC * formulas.COMPLEX_MAC_OVER_REAL
    assert only(counted(lambda: z @ v), "aten::mv").flops == mac * Z_ROWS * Z_COLS
    assert only(counted(lambda: torch.vdot(z[0], z[1])), "aten::vdot").flops == mac * Z_COLS
    assert only(counted(lambda: torch.outer(z[:, 0], v) + torch.addr(torch.zeros(Z_ROWS, Z_COLS, dtype=torch.cfloat),
                                                                     z[:, 0], v)), "aten::addr").flops == (
        mac * Z_ROWS * Z_COLS)
    mm = only(counted(lambda: z @ v[:, None]), "aten::mm").flops
    assert mm == mac * Z_ROWS * Z_COLS
    assert only(counted(lambda: z.real @ v.real), "aten::mv").flops == formulas.FLOPS_PER_MAC * Z_ROWS * Z_COLS


def test_a_complex_vector_norm_squares_both_parts(z):
    """||z||_2 over complex elements: re^2 + im^2 and the accumulate, twice a real norm's 2 an element."""
    ours = only(counted(lambda: torch.linalg.vector_norm(z, dim=0)), "aten::linalg_vector_norm").flops
    assert ours == formulas.COMPLEX_ELEMENT_OVER_REAL * formulas.NORM_FLOPS_PER_ELEMENT * Z_ROWS * Z_COLS


class ComplexLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.cfloat))

    def forward(self, z):  # (2, 4) complex -> (2, 3) real
        return torch.tanh((z @ self.w + self.b).abs())


def test_complex_linear_trained_by_hand():
    """z (2, 4) @ w (4, 3) complex: 8 a MAC (192); + b (2 an element: 12); |.| (4 an element: 24); tanh (6).
    Trained: w's gradient z^H g another complex mm (192); b's gradient sums g over the batch, 2 adds a complex element
    folded in (12: it was counted 6)."""
    torch.manual_seed(0)
    model, z = ComplexLinear(), torch.randn(2, 4, dtype=torch.cfloat)
    fwd = step_counts(model, (z,))
    mac = formulas.FLOPS_PER_MAC * formulas.COMPLEX_MAC_OVER_REAL
    assert by_op(fwd)["aten::mm"] == mac * 2 * 4 * 3 == 192
    assert math.fsum(c.flops for c in fwd.values()) == 192 + 12 + formulas.COMPLEX_ABS_FLOPS * 6 + 6
    trained = step_counts(model, (z,), train=True, warm=True)
    assert by_op(trained)["aten::mm"] == 2 * 192
    bias_grad = one_row(trained, "aten::sum", ((2, 3),))  # the loss's sum of (2, 3) reals and b's gradient sum
    assert bias_grad.flops == 6 + formulas.COMPLEX_ELEMENT_OVER_REAL * 6
    p = profile_cpu(model, (z,), train=True)
    assert not p.unsupported and p.flops == math.fsum(c.flops for c in trained.values())


# --- CPU LSTM without biases ---------------------------------------------------------------------------------------
LS_T, LS_B, LS_I, LS_H = 3, 2, 4, 6


def _lstm_layer_rows(bias: bool) -> tuple:
    torch.manual_seed(0)
    lstm, x = nn.LSTM(LS_I, LS_H, bias=bias), torch.randn(LS_T, LS_B, LS_I)
    counts = counted(lambda: lstm(x)[0].sum().backward())
    return only(counts, "aten::mkldnn_rnn_layer"), only(counts, "aten::mkldnn_rnn_layer_backward")


def test_a_bias_free_lstm_reads_its_weights_once():
    """nn.LSTM(bias=False): the CPU kernel's bias slots hold placeholders shaped as the weights, never read. The
    forward reads x, W_ih (4H, I), W_hh (4H, H), h0 and c0: no more (it was charged W_ih and W_hh twice); the
    biased layer reads its two (4H,) biases besides, forward and backward alike. FLOPs unchanged."""
    fwd, bwd = _lstm_layer_rows(bias=False)
    biased_fwd, biased_bwd = _lstm_layer_rows(bias=True)
    gates = 4 * LS_H
    assert fwd.bytes_read == (LS_T * LS_B * LS_I + gates * (LS_I + LS_H) + 2 * LS_B * LS_H) * F32
    assert biased_fwd.bytes_read - fwd.bytes_read == 2 * gates * F32
    assert biased_bwd.bytes_read - bwd.bytes_read == 2 * gates * F32
    assert fwd.flops == biased_fwd.flops == 2 * LS_T * LS_B * gates * (LS_I + LS_H)
    assert bwd.flops == formulas.MATMUL_BWD_OVER_FWD * fwd.flops


# --- grid_sample ---------------------------------------------------------------------------------------------------
GS_IN, GS_GRID = (2, 3, 6, 6), (2, 3, 3, 2)


@pytest.mark.parametrize("mode,taps", [("nearest", 0), ("bilinear", 4), ("bicubic", 16)])
def test_grid_sample_backward_by_mode(mode, taps):
    """grid_sample's backward: bilinear / bicubic a multiply-add per tap of each dy element for the input's gradient
    and again for the grid's; nearest adds each dy element into the input's gradient (one add each, as nearest
    upsampling's backward; its grid's gradient is zeros): it was counted 0."""
    torch.manual_seed(0)
    x, g = torch.randn(*GS_IN, requires_grad=True), torch.rand(*GS_GRID, requires_grad=True)
    counts = counted(lambda: F.grid_sample(x, g * 2 - 1, mode=mode, align_corners=False).sum().backward())
    dy = GS_IN[0] * GS_IN[1] * GS_GRID[1] * GS_GRID[2]
    backward = only(counts, "aten::grid_sampler_2d_backward")
    assert backward.flops == (dy if taps == 0 else 2 * formulas.FLOPS_PER_MAC * taps * dy)
    assert only(counts, "aten::grid_sampler_2d").flops == formulas.FLOPS_PER_MAC * taps * dy


@pytest.mark.parametrize("mode,taps", [("nearest", 1), ("bilinear", 4), ("bicubic", 16)])
def test_grid_sample_reads_the_points_it_samples(mode, taps):
    """Sampling 2 x 3 points of a (1, 4, 32, 32) map (deformable attention's few points of a large feature map)
    reads taps elements per output element (1 for nearest) and the grid, not the 16 KiB map; sampling more points
    than the map holds reads the map once."""
    torch.manual_seed(0)
    x, g = torch.randn(1, 4, 32, 32), torch.rand(1, 2, 3, 2) * 2 - 1
    row = only(counted(lambda: F.grid_sample(x, g, mode=mode, align_corners=False)), "aten::grid_sampler_2d")
    out = 1 * 4 * 2 * 3
    assert (row.bytes_read, row.bytes_written) == ((taps * out + g.numel()) * F32, out * F32)
    small, dense = torch.randn(1, 2, 3, 3), torch.rand(1, 8, 8, 2) * 2 - 1
    row = only(counted(lambda: F.grid_sample(small, dense, mode=mode, align_corners=False)), "aten::grid_sampler_2d")
    assert row.bytes_read == (small.numel() + dense.numel()) * F32


class BaddbmmAttention(nn.Module):
    """Scores as some language models write them: torch.baddbmm into an uninitialised scratch with beta=0 and the
    1/sqrt(d) scale as alpha; softmax; bmm with v."""

    def forward(self, q, k, v):  # (B*H, L, D) each
        scratch = torch.empty(q.shape[0], q.shape[1], k.shape[1])  # (B*H, L, L), never read: beta=0
        scores = torch.baddbmm(scratch, q, k.transpose(1, 2), beta=0.0, alpha=q.shape[-1] ** -0.5)
        return torch.bmm(scores.softmax(-1), v)


def test_baddbmm_with_beta_zero_does_not_read_its_scratch():
    """beta=0: baddbmm ignores its input (NaN in it does not propagate), so it reads q and k alone and writes the
    (B*H, L, L) scores: it was charged reading the scratch too. With beta=1 it reads it. FLOPs 2*BH*L*L*D either
    way; addmm alike."""
    bh, n, d = 4, 6, 8
    torch.manual_seed(0)
    q, k, v = (torch.randn(bh, n, d) for _ in range(3))
    counts = step_counts(BaddbmmAttention(), (q, k, v))
    scores = only(counts, "aten::baddbmm")
    assert scores.flops == 2 * bh * n * n * d
    assert (scores.bytes_read, scores.bytes_written) == (2 * bh * n * d * F32, bh * n * n * F32)
    read = only(counted(lambda: torch.baddbmm(torch.zeros(bh, n, n), q, k.transpose(1, 2))), "aten::baddbmm")
    assert read.bytes_read == (2 * bh * n * d + bh * n * n) * F32
    mm = only(counted(lambda: torch.addmm(torch.empty(n, n), q[0], k[0].T, beta=0)), "aten::addmm")
    assert mm.bytes_read == 2 * n * d * F32


# --- formulas.sdpa, roofline.place ---------------------------------------------------------------------------------
@pytest.mark.parametrize("q,k,v", [
    ((1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 5)),  # q and k of different head dims
    ((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 5, 4)),  # k and v of different key counts
    ((1, 2, 3, 4), (1, 2, 3, 4), (1, 1, 3, 4)),  # k and v of different heads
    ((2, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)),  # q and k of different batches
])
def test_sdpa_formula_refuses_shapes_that_do_not_attend(q, k, v):
    with pytest.raises(LaunchError, match=r"q of shape .*k of shape .*v of shape"):
        formulas.sdpa(torch.empty(q), torch.empty(k), torch.empty(v))


def test_sdpa_formula_takes_grouped_heads_and_a_wider_value():
    """GQA (8 query heads over 2 key heads) and Dv != D: 2*B*H*Nq*Nkv*(D + Dv)."""
    cost = formulas.sdpa(torch.empty(1, 8, 3, 4), torch.empty(1, 2, 5, 4), torch.empty(1, 2, 5, 6))
    assert cost.flops == 2 * 8 * 3 * 5 * (4 + 6)


@pytest.mark.parametrize("kind", ["tpu", "CPU", "cuda:0", "gpu"])
def test_place_refuses_a_kind_it_has_no_words_for(kind):
    with pytest.raises(roofline.RooflineError, match=r"kind=.*expected the device kind, 'cuda' or 'cpu'"):
        perf.place(flops=1e9, bytes_moved=1e8, seconds=1e-3, roof=perf.Roof(1e12, 1e11), kind=kind)


def test_place_takes_an_unknown_kind_as_a_stored_row_has_it():
    p = perf.place(flops=1e9, bytes_moved=1e8, seconds=1e-3, roof=perf.Roof(1e12, 1e11), kind="")
    assert p.bound == "compute" and p.fraction == pytest.approx(1.0) and p.tip


# --- modes: no_grad, inference_mode, autocast ----------------------------------------------------------------------
class InferenceInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 3), nn.LayerNorm(3)

    def forward(self, x):
        with torch.inference_mode():  # composite ops reach the counting mode whole here: counted as what they run
            return self.norm(F.gelu(self.lin(x)))


def test_a_forward_in_inference_mode_counts_its_layers():
    """Linear (2*2*4*3 = 48), GELU (6), LayerNorm (8 an element: 48): the same as outside inference_mode."""
    torch.manual_seed(0)
    model, x = InferenceInside(), torch.randn(2, 4)
    p = profile_cpu(model, x)
    assert p.flops == 48 + 6 + formulas.LAYERNORM_FLOPS_PER_ELEMENT * 6 == 102 and not p.unsupported
    assert_rows_finite(p)


def test_profiling_inside_no_grad_and_inference_mode_leaves_batch_norm_statistics():
    """Called inside no_grad, and inside inference_mode with inference tensors: the BatchNorm's running statistics
    and step count are back where they were; the counts are those of a plain forward (addmm 48, batch norm 8 an
    element in train mode, the step count's add 1)."""
    torch.manual_seed(0)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            model, x = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.randn(2, 4)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            p = profile_cpu(model, x)
            after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), context
        assert p.flops == 48 + formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT * 6 + 1


class AutocastBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.conv = nn.Linear(8, 4), nn.Conv1d(2, 2, 3)

    def forward(self, x):  # (4, 8) fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.lin(x)  # (4, 4) bf16
            return self.conv(y.view(2, 2, 4)).float().softmax(-1)  # (2, 2, 2)


def test_autocast_bf16_rows_carry_bf16_bytes_and_dtype():
    """Under bf16 autocast the addmm and the convolution run in bf16: their rows are bf16 and their bytes 2 an
    element (the addmm reads x, W, b cast: (32 + 32 + 4) * 2); the casts are data movement rows (fp32 read, bf16
    written); the softmax of the float() result fp32. FLOPs as in fp32."""
    torch.manual_seed(0)
    model, x = AutocastBlock(), torch.randn(4, 8)
    p = profile_cpu(model, x)
    counts = step_counts(model, (x,))
    addmm = only(counts, "aten::addmm")
    assert addmm.dtype == "bf16" and addmm.flops == 2 * 4 * 8 * 4
    assert (addmm.bytes_read, addmm.bytes_written) == ((4 * 8 + 8 * 4 + 4) * BF16, 4 * 4 * BF16)
    conv = only(counts, "aten::convolution")
    assert conv.dtype == "bf16" and conv.flops == 2 * 2 * 2 * 2 * 3 * 2 + 2 * 2 * 2
    assert only(counts, "aten::_softmax").dtype == "fp32"
    cast = one_row(counts, "aten::_to_copy", ((4, 8),))  # x and W, each (4, 8) fp32 -> bf16
    assert cast.flops == 0 and (cast.bytes_read, cast.bytes_written) == (2 * 32 * F32, 2 * 32 * BF16)
    assert {o.m.dtype for o in p.ops if o.op == "aten::addmm"} == {"bf16"}
    trained = profile_cpu(model, x, train=True)
    assert not trained.unsupported and trained.flops > p.flops
    assert_rows_finite(trained)


# --- a training step written as a function -------------------------------------------------------------------------
def _train_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)

    def train_step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return net, opt, train_step, (torch.randn(3, 4), torch.tensor([0, 1, 1]))


def test_a_training_step_function_is_profiled_as_written_and_left_as_found():
    """A function that zeroes, backpropagates and steps AdamW: profiled as its own step (its backward and optimizer
    rows), the closure's net and optimizer left as found (no step taken, no state). Its linears forward (2*3*4*8 +
    2*3*8*2) and backward (the first layer's input needs no gradient: 3 products of 2*3*8*2, 1 of 2*3*4*8); AdamW
    per parameter element: weight decay (1), the moments' lerp and addcmul (2), the bias corrections' divides and the
    square root, the addcdiv (one each)."""
    net, opt, step, inputs = _train_step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = profile_cpu(step, inputs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not opt.state and all(q.grad is None for q in net.parameters())
    assert {o.m.config["step"] for o in p.ops} == {"own step"} and p.name.endswith("train_step")
    net2, _, step2, inputs2 = _train_step()
    counts = step_counts(step2, inputs2, warm=True)  # warm: its first call, under no_grad, fails and is rerun
    l1, l2 = 2 * 3 * 4 * 8, 2 * 3 * 8 * 2
    assert flops_of(counts, {"aten::addmm", "aten::mm"}) == 2 * l1 + 3 * l2
    params = sum(q.numel() for q in net2.parameters())
    for op in ("aten::lerp_", "aten::addcmul_", "aten::addcdiv_", "aten::sqrt"):
        assert by_op(counts)[op] == params, op
    assert not p.unsupported


# --- integers, bools, an op with no formula -------------------------------------------------------------------------
class IntHash(nn.Module):
    def forward(self, ids):  # (4, 8) int64
        h = (ids * 2654435761) % 1000
        h = h ^ (h >> 3)
        return (h & 255).sum(-1), (ids > 5).logical_and(ids < 100).any(-1)


def test_an_integer_and_bool_model_is_counted_in_its_own_dtypes():
    """Every op on int64 or bool: one operation an element (mul, remainder, shift, xor, and, sum, two compares,
    logical_and, any: 10 x 32), counted in int64 / bool (no float op), each placed under the step's float roof as no
    int64 roof is known; nothing uncounted. The int64 ops read and write 8 bytes an element, the bool ones 1."""
    model, ids = IntHash(), torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
    counts = step_counts(model, (ids,))
    assert math.fsum(c.flops for c in counts.values()) == 10 * 32
    assert {c.dtype for c in counts.values() if c.flops} <= {"int64", "bool"}
    xor = only(counts, "aten::bitwise_xor")
    assert (xor.bytes_read, xor.bytes_written) == (2 * 32 * I64, 32 * I64)
    both = only(counts, "aten::logical_and")
    assert (both.bytes_read, both.bytes_written) == (2 * 32, 32)
    p = profile_cpu(model, ids)
    assert not p.unsupported and p.flops == 320
    assert_rows_add_up(p, counts)
    assert_rows_finite(p)
    for o in p.ops:
        if o.counted and o.m.flops:
            assert o.bound == ("memory" if o.m.intensity < RIDGE else "compute"), o.label


class Expm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 3) * 0.1)

    def forward(self, x):
        return x @ torch.linalg.matrix_exp(self.a)


def test_an_op_without_formula_is_shown_uncounted_never_as_zero():
    """matrix_exp has no FLOP formula: its row says uncounted (bound unknown, no roof fraction), the profile lists it
    and the table says so; the counted FLOPs are the product's alone (2*2*3*3), its bytes still counted."""
    torch.manual_seed(0)
    p = profile_cpu(Expm(), torch.randn(2, 3))
    assert p.unsupported == ("aten::linalg_matrix_exp",)
    (row,) = [o for o in p.ops if o.op == "aten::linalg_matrix_exp"]
    assert not row.flops_known and row.bound == "unknown" and row.roof_fraction is None
    assert row.m.bytes == 2 * 9 * F32
    assert p.flops == 2 * 2 * 3 * 3
    assert "no FLOP formula" in rendered(p)


class SinusoidalEmbedding(nn.Module):
    """A diffusion model's timestep embedding with its frequencies made in forward by torch.logspace."""

    def forward(self, t):  # (B,) timesteps
        freqs = torch.logspace(0, -4, 8, base=10.0)  # (8,): base ** (start + i * step)
        angles = t[:, None] * freqs  # (B, 8)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 16)


def test_logspace_in_forward_counts_a_power_per_element():
    """torch.logspace computes a power per element (8) and writes them: it was reported uncounted. With the
    product (B*8), sin and cos (B*8 each): 8 + 3 * B * 8."""
    t = torch.arange(4.0)
    counts = step_counts(SinusoidalEmbedding(), (t,))
    space = only(counts, "aten::logspace")
    assert (space.flops, space.bytes_written, space.unsupported) == (8, 8 * F32, False)
    assert math.fsum(c.flops for c in counts.values()) == 8 + 3 * 4 * 8
    assert not profile_cpu(SinusoidalEmbedding(), t).unsupported


# --- the store -----------------------------------------------------------------------------------------------------
def test_profile_rows_round_trip_through_the_store_and_pair_by_model(tmp_path):
    """A profile's rows stored and read back keep their counts and config; two runs of one model pair row by row;
    a run of another model (same op names) does not pair with them."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    a = profile_cpu(nn.Linear(8, 4), x, name="lin:a")
    b = profile_cpu(nn.Linear(8, 4), x, name="lin:b")
    with perf.Store(tmp_path / "r.sqlite") as st:
        runs = {}
        for label, p in (("one", a), ("two", a), ("other", b)):
            runs[label] = st.start_run(device=p.device, ceilings=CEIL, label=label)
            for o in p.ops:
                st.append(runs[label], o.m)
        back = {(m.name, m.config["shapes"]): m for m in st.measurements("one")}
        for o in a.ops:
            m = back[o.m.name, o.m.config["shapes"]]
            assert (m.flops, m.bytes_read, m.bytes_written, m.config["model"]) == (
                o.m.flops, o.m.bytes_read, o.m.bytes_written, "lin:a")
        same = st.compare("one", "two")
        assert same.comparable and len(same.paired) == len(a.ops)
        assert not st.compare("one", "other").comparable


# --- bad arguments -------------------------------------------------------------------------------------------------
class Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("name", ["", "   "])
def test_profile_refuses_an_empty_name_before_any_work(name):
    """name='' was taken as None: the class's name, pairing the run in the store with every unnamed Calls run."""
    model = Calls()
    with pytest.raises(profile.ProfileError, match=r"name=.*expected a str \(not empty\)"):
        profile.profile_model(model, torch.randn(2, 4), name=name, steps=1, warmup=0, device="cpu", ceilings=CEIL)
    assert model.calls == 0


@pytest.mark.parametrize("device", [torch.device("cpu", 0), "cpu:0"])
def test_profile_takes_the_cpu_by_its_indexed_torch_name(device):
    """torch.device("cpu", 0) (its str is "cpu:0"; torch takes it as the CPU) was refused as no device."""
    torch.manual_seed(0)
    p = profile.profile_model(nn.Linear(4, 4), torch.randn(2, 4), steps=1, warmup=0, ceilings=CEIL, device=device)
    assert p.device.kind == "cpu" and p.flops == 2 * 2 * 4 * 4


def test_time_fn_takes_the_cpu_by_its_indexed_torch_name():
    t = perf.time_fn(lambda: torch.ones(4).sum(), device=torch.device("cpu", 0), repeats=3)
    assert t.median_s > 0


@pytest.mark.parametrize("kwargs,arg", [
    ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"warmup": -1}, "warmup"), ({"train": 1}, "train"),
    ({"fastpath": "no"}, "fastpath"), ({"budget_s": math.nan}, "budget_s"), ({"ceilings": "h100"}, "ceilings"),
    ({"name": 3}, "name"), ({"device": 1.5}, "device"),
])
def test_profile_names_each_bad_argument_before_any_work(kwargs, arg):
    model = Calls()
    with pytest.raises(profile.ProfileError, match=rf"\b{arg}="):
        profile.profile_model(model, torch.randn(2, 4), **kwargs)
    assert model.calls == 0


def test_profile_refuses_inputs_that_do_not_fit_before_any_work():
    model = Calls()
    with pytest.raises(profile.ProfileError, match=r"inputs=.*do not fit"):
        profile.profile_model(model, {"inptu": torch.randn(2, 4)}, steps=1, device="cpu", ceilings=CEIL)
    with pytest.raises(profile.ProfileError, match=r"(?s)step=.*expected a callable taking no arguments"):
        count_ops(model(torch.randn(2, 4)))
    assert model.calls == 1  # the call made to build count_ops' bad argument, none by the profiler
