"""Thirteenth held-out round for the model profiler (tests/perf/perf_models_round13.py): a Barlow Twins loss, a
Gaussian-process likelihood by Cholesky, a closed-form ridge head by linalg.solve, a ShuffleNetV2 unit with
nn.ChannelShuffle, a hard Gumbel-softmax codebook, gradient reversal, im2col / col2im convolutions, an istft
vocoder, a WGAN-GP double backward, grouped-query SDPA (bool mask, enable_gqa, scale; fused in eval, math with
dropout), recurrent cells in a Python loop, ZCA whitening by eigh with QR and SVD, index_reduce_ / scatter_reduce
aggregation, dilated / reflect / transposed / channels-last convolutions with dilated and adaptive max pools, a
complex rotary embedding, a three-operand einsum and a spatial transformer. What a profile leaves behind, the round's
fixes and bad arguments are in tests/perf/test_profile_unseen_round13_more.py.

Every matmul, convolution, attention, factorisation, transform and resampling is checked against its count written out
here from the layer shapes (a multiply-add is 2 FLOPs, a complex product 6; attention 4*B*H*Nq*Nk*D; a convolution by
``profile_support.conv``, a transposed one 2*N*numel(w)*input positions plus a bias add per output; LAPACK's leading
terms as docs/perf.md quotes them; an FFT 5 N log2 N per complex transform, half for a real one, plus a multiply per
real output normalised), never against the profiler's own numbers; every row's bound against its intensity and the
ridge; torch.utils.flop_counter agreed with where it has a formula.
"""

import math
import sys
from pathlib import Path

import pytest

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round13 as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, setup_round  # noqa: E402
from profile_support import (  # noqa: E402
    NOT_AS_TORCH,
    assert_as_torch_counts,
    assert_rows_add_up,
    assert_rows_finite,
    by_op,
    conv,
    flops_of,
    rendered,
    rows_of,
    silent_zeros,
)

pytestmark = FILTERS
CASES, IDS, profiled = setup_round(pm.MODELS)
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, random draws, allocation, index bookkeeping.
DATA_MOVEMENT = {
    "aten::cat", "aten::clone", "aten::copy_", "aten::zeros", "aten::ones", "aten::eye", "aten::arange",
    "aten::repeat", "aten::channel_shuffle", "aten::im2col", "aten::new_zeros", "aten::zeros_like",
    "aten::ones_like", "aten::empty_like", "aten::fill_", "aten::exponential_", "aten::scatter_", "aten::scatter",
    "aten::gather", "aten::index_select", "aten::index_fill", "aten::masked_fill", "aten::masked_fill_",
    "aten::reflection_pad1d", "aten::_to_copy", "aten::bernoulli_", "aten::select_backward",
    "aten::slice_backward", "aten::diagonal_backward", "aten::constant_pad_nd", "aten::_local_scalar_dense",
    "aten::unfold", "aten::max_unpool2d", "aten::col2im_backward", "aten::new_ones", "aten::detach",
    "aten::diag_embed", "aten::tril", "aten::triu", "aten::lift_fresh", "aten::where", "aten::logical_not",
    "aten::zero_", "aten::new_empty_strided", "aten::_unsafe_view", "aten::embedding", "aten::full",
    "aten::scalar_tensor", "aten::_linalg_check_errors", "aten::equal", "aten::rand", "aten::diagonal_scatter",
    "aten::linspace",
}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
F32 = 4  # bytes per float32


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no op that computes is counted free or left uncounted, torch's formulas agreed
    with, every number finite and >= 0, each counted row placed by its intensity against the ridge under the fp32
    roof (a complex64 transform's parts are fp32); the shares add up to 1; the table renders; a model that takes
    autograd.grad itself (the WGAN-GP critic) is profiled as its own step."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0
    assert not p.unsupported, p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    assert not silent_zeros(counts, DATA_MOVEMENT), silent_zeros(counts, DATA_MOVEMENT)
    assert_as_torch_counts(counts, theirs, NOT_AS_TORCH)
    assert_rows_finite(p)
    for o in p.ops:
        if o.counted and o.m.flops > 0:
            assert o.m.dtype == "fp32", (o.label, o.m.dtype)
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert p.step_s == pytest.approx(math.fsum(o.total_s for o in p.ops), rel=1e-9)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)
    assert p.own_backward == (name == "wgan_gp" and not train)
    step = "forward+backward" if train else "own step" if p.own_backward else "forward"
    assert {o.m.config["step"] for o in p.ops} == {step}


# --- self-supervised and probabilistic heads -------------------------------------------------------------------
def test_barlow_twins_by_hand():
    """Forward: the projector on both views (2 x 2*N*I*D) and the cross-correlation z1^T z2 (2*D*N*D). Training (the
    inputs need no gradient): the projector's weight gradient per view (2 x 2*N*I*D) and both operands' gradients of
    the cross-correlation (2 x 2*N*D*D)."""
    n, i, d = pm.BT_ROWS, pm.BT_IN, pm.BT_DIM
    _, fwd, _ = profiled("barlow", False)
    assert by_op(fwd)["aten::addmm"] == 2 * (2 * n * i * d)
    assert by_op(fwd)["aten::mm"] == 2 * d * n * d
    _, train, _ = profiled("barlow", True)
    assert flops_of(train, MATMULS) == 2 * (2 * n * i * d) + 2 * d * n * d + 2 * (2 * n * i * d) + 2 * (2 * n * d * d)


def test_gaussian_process_factor_and_solve_by_hand():
    """A P x P kernel: Cholesky P^3/3, cholesky_solve against one right-hand side 2 P^2; the features' linear
    2*P*I*F; the kernel itself from squared differences, no product. Training differentiates the solve again (a
    second cholesky_solve) and leaves the factorisation counted once."""
    pts, i, f = pm.GP_POINTS, pm.GP_IN, pm.GP_FEAT
    _, fwd, _ = profiled("gp", False)
    ops = by_op(fwd)
    assert ops["aten::linalg_cholesky_ex"] == pytest.approx(pts**3 / 3)
    assert ops["aten::cholesky_solve"] == 2 * pts**2 * 1
    assert flops_of(fwd, MATMULS) == 2 * pts * i * f
    assert ops["aten::sub"] == pts * pts * f  # the pairwise differences (P, P, F)
    _, train, _ = profiled("gp", True)
    assert by_op(train)["aten::linalg_cholesky_ex"] == pytest.approx(pts**3 / 3)
    assert by_op(train)["aten::cholesky_solve"] == 2 * (2 * pts**2 * 1)


def test_ridge_head_solve_and_its_backward_by_hand():
    """W = solve(G, B), G (F x F), B = Zs^T Y (F x C): LU and both triangles, 2F^3/3 + 2F^2 C. Products: Zs^T Zs
    2*F*S*F, Zs^T Y 2*F*S*C, Zq W 2*Q*F*C. Backward: dW and dZq (2 x 2*Q*C*F), the adjoint solve on G's factors
    (lu_solve 2F^2 C) and dG = -dB W^T (2*F*C*F), dZs through B (2*S*C*F) and through G (2 x 2*F*F*S), the
    features' weight gradient for both sets (2*(S + Q)*I*F)."""
    s, q, i, f, c = pm.RG_SUPPORT, pm.RG_QUERY, pm.RG_IN, pm.RG_FEAT, pm.RG_CLASSES
    forward_mm = 2 * f * s * f + 2 * f * s * c + 2 * q * f * c
    _, fwd, _ = profiled("ridge", False)
    assert by_op(fwd)["aten::_linalg_solve_ex"] == pytest.approx(2 * f**3 / 3 + 2 * f**2 * c)
    assert by_op(fwd)["aten::mm"] == forward_mm
    assert by_op(fwd)["aten::addmm"] == 2 * (s + q) * i * f
    _, train, _ = profiled("ridge", True)
    assert by_op(train)["aten::linalg_lu_solve"] == 2 * f**2 * c
    backward_mm = 2 * (2 * q * c * f) + 2 * f * c * f + 2 * s * c * f + 2 * (2 * f * f * s) + 2 * (s + q) * i * f
    assert by_op(train)["aten::mm"] == forward_mm + backward_mm
    assert by_op(train)["aten::_linalg_solve_ex"] == pytest.approx(2 * f**3 / 3 + 2 * f**2 * c)  # factored once


def test_whitening_factorisations_by_hand():
    """eigh of the F x F covariance with vectors 9F^3; QR of the N x F features with Q 2(2NF^2 - 2F^3/3); the thin SVD
    with U and V 14NF^2 + 8F^3. Products: the covariance 2*F*N*F, Q diag Q^T (2 x 2F^3), h ZCA and U V^T (2 x
    2*N*F*F)."""
    n, f = pm.WH_ROWS, pm.WH_DIM
    _, counts, _ = profiled("whitening", False)
    ops = by_op(counts)
    assert ops["aten::_linalg_eigh"] == 9 * f**3
    assert ops["aten::linalg_qr"] == pytest.approx(2 * (2 * n * f**2 - 2 * f**3 / 3))
    assert ops["aten::_linalg_svd"] == 14 * n * f**2 + 8 * f**3
    assert ops["aten::mm"] == 2 * f * n * f + 2 * (2 * f**3) + 2 * (2 * n * f * f)
    _, train, _ = profiled("whitening", True)  # the backward solves and multiplies; the factorisations run once
    for op in ("aten::_linalg_eigh", "aten::linalg_qr", "aten::_linalg_svd"):
        assert by_op(train)[op] == ops[op], op


# --- convolutions and their rewrites -------------------------------------------------------------------------
def test_shufflenet_unit_by_hand():
    """Depthwise 3x3 stride 2 (groups = C, no bias) and pointwise 1x1 over (S/2)^2 positions; the average pool 9 adds
    per output of half the channels; nn.ChannelShuffle moves its tensor (read once, written once), no FLOPs."""
    b, c, s = pm.SH_BATCH, pm.SH_C, pm.SH_SIDE
    out = (s // 2) ** 2
    _, counts, _ = profiled("shufflenet", False)
    ops = by_op(counts)
    assert ops["aten::convolution"] == conv(b, c, c, out, 9, groups=c, bias=False) + conv(b, c, c, out, 1)
    assert ops["aten::avg_pool2d"] == 9 * b * (c // 2) * out
    (shuffle,) = rows_of(counts, "aten::channel_shuffle")
    size = b * 2 * c * out * F32
    assert shuffle.flops == 0 and shuffle.bytes_read == size and shuffle.bytes_written == size
    _, train, _ = profiled("shufflenet", True)
    # the input needs no gradient: the depthwise layer's weight gradient alone, the pointwise one's input, weight
    # and bias gradients
    dw = conv(b, c, c, out, 9, groups=c, bias=False)
    pw = conv(b, c, c, out, 1, bias=False)
    assert by_op(train)["aten::convolution_backward"] == dw + 2 * pw + b * c * out


def test_odd_convolutions_by_hand():
    """Conv1d 'same' (kernel 4, dilation 3, reflect-padded: L positions); ConvTranspose1d (groups 2, stride 3,
    dilation 2, output_padding 1) 2*N*numel(w)*input positions plus a bias add per output; a channels-last grouped
    dilated 3x3 Conv2d; max_pool1d of 3 taps (dilation 2, ceil mode: ceil((L_up - 5) / 2) + 1 windows) and an adaptive
    max pool whose windows overlap (33 rows into 3: 11 each; 5 columns into 2: 3 each)."""
    b, c, n = pm.CV_BATCH, pm.CV_C, pm.CV_LEN
    up = pm.CV_UP_LEN
    assert up == 33
    same = conv(b, c, 6, n, 4)
    transposed = 2 * b * (6 * (c // 2) * 3) * n + b * c * up
    wide = conv(b, c, 8, up * 5, 9, groups=c)
    _, counts, _ = profiled("convolutions", False)
    assert by_op(counts)["aten::convolution"] == same + transposed + wide
    windows = math.ceil((up - 2 * (3 - 1) - 1) / 2) + 1
    assert by_op(counts)["aten::max_pool2d_with_indices"] == 3 * b * c * windows
    assert by_op(counts)["aten::adaptive_max_pool2d"] == b * 8 * 3 * 2 * (11 * 3)
    _, train, _ = profiled("convolutions", True)
    # the data needs no gradient: the first layer's weight and bias gradients (as many FLOPs as its forward); the
    # others' input gradients too (their products twice, the bias adds once)
    expected = same + 2 * (2 * b * (6 * (c // 2) * 3) * n) + b * c * up + 2 * conv(b, c, 8, up * 5, 9, groups=c,
                                                                                  bias=False) + b * 8 * up * 5
    assert by_op(train)["aten::convolution_backward"] == expected


def test_im2col_and_col2im_by_hand():
    """unfold (im2col) copies, the matmul 2*B*OUT*(C k^2)*L, the second 2*B*(FOLD k^2)*OUT*L, fold (col2im) one add
    per column element. Bytes: im2col reads the image and writes the columns; col2im reads the columns and writes the
    image. Training: both weights' gradients and the first product's output gradient."""
    b, c, s, o, k, fo = pm.IC_BATCH, pm.IC_C, pm.IC_SIDE, pm.IC_OUT, pm.IC_K, pm.IC_FOLD
    positions = s * s
    first, second = 2 * b * o * (c * k * k) * positions, 2 * b * (fo * k * k) * o * positions
    _, counts, _ = profiled("im2col", False)
    assert by_op(counts)["aten::mm"] == first + second
    (col2im,) = rows_of(counts, "aten::col2im")
    assert col2im.flops == b * fo * k * k * positions
    assert col2im.bytes_read == b * fo * k * k * positions * F32 and col2im.bytes_written == b * fo * positions * F32
    (im2col,) = rows_of(counts, "aten::im2col")
    assert im2col.flops == 0
    assert im2col.bytes_read == b * c * positions * F32 and im2col.bytes_written == b * c * k * k * positions * F32
    _, train, _ = profiled("im2col", True)
    assert by_op(train)["aten::mm"] == 2 * (first + second) + second


# --- attention --------------------------------------------------------------------------------------------------
def test_grouped_query_sdpa_fused_and_math_by_hand():
    """Eval: one fused CPU kernel, 4*B*H*N*N*D over the query heads (the KV heads shared by enable_gqa; the boolean
    mask does not shorten the products), its backward 2.5x. Dropout in training takes the math path: two batched
    products of 2*B*H*N*N*D each, and in the backward both operands' gradients of each (4 x 2*B*H*N*N*D). Pinned to
    the math backend in eval: the same two products. The projections 2*B*N*E*E (queries) and 2*B*N*E*(2*Hkv*D)."""
    b, n, e, h, hkv, d = pm.GQ_BATCH, pm.GQ_LEN, pm.GQ_DIM, pm.GQ_HEADS, pm.GQ_KV_HEADS, pm.GQ_HEAD_DIM
    attention = 4 * b * h * n * n * d
    projections = 2 * b * n * e * e + 2 * b * n * e * (2 * hkv * d)
    _, fused, _ = profiled("gqa_eval", False)
    assert by_op(fused)[SDPA] == attention and by_op(fused)["aten::addmm"] == projections
    _, fused_train, _ = profiled("gqa_eval", True)
    assert by_op(fused_train)[SDPA + "_backward"] == 2.5 * attention
    for name in ("gqa_dropout", "gqa_math"):
        _, counts, _ = profiled(name, False)
        assert SDPA not in by_op(counts), name
        assert by_op(counts)["aten::bmm"] == attention, name
    _, dropout_train, _ = profiled("gqa_dropout", True)
    assert by_op(dropout_train)["aten::bmm"] == attention + 2 * attention


# --- custom gradients, sampling, double backward -------------------------------------------------------------------
def test_gradient_reversal_by_hand():
    """Forward: three linears 2*N*(I*H + H*C + H*Dom). Backward: the weight gradients (the same again), the hidden
    layer's input gradients from both heads (2*N*(C + Dom)*H), and the reversal's one multiply per hidden element."""
    n, i, h, c, dom = pm.GR_ROWS, pm.GR_IN, pm.GR_HIDDEN, pm.GR_CLASSES, pm.GR_DOMAINS
    forward = 2 * n * (i * h + h * c + h * dom)
    _, fwd, _ = profiled("dann", False)
    assert by_op(fwd)["aten::addmm"] == forward
    _, train, _ = profiled("dann", True)
    assert by_op(train)["aten::mm"] == forward + 2 * n * (c + dom) * h
    assert by_op(train)["aten::mul"] == n * h


def test_gumbel_codebook_by_hand():
    """The logits' linear 2*N*I*K, the one-hot pick times the codebook 2*N*K*D (a dense product: the one-hot is a
    tensor of zeros and ones), the softmax per element; the Gumbel noise is a draw (exponential_), no FLOPs."""
    n, i, k, d = pm.GB_ROWS, pm.GB_IN, pm.GB_CODES, pm.GB_DIM
    _, counts, _ = profiled("gumbel", False)
    assert by_op(counts)["aten::addmm"] == 2 * n * i * k
    assert by_op(counts)["aten::mm"] == 2 * n * k * d
    (noise,) = rows_of(counts, "aten::exponential_")
    assert noise.flops == 0 and noise.bytes_written == n * k * F32 and noise.bytes_read == 0


def test_wgan_gradient_penalty_double_backward_by_hand():
    """The critic's convolution (bias) and, for the penalty, its input gradient (a convolution_backward of 2*N*numel(w)
    *positions). Its own step (train=False) stops there. Training differentiates that gradient again: the double
    backward's two convolutions of the forward's size without bias (d/d weight and d/d dy of the input gradient), and
    the forward convolution's backward for its input (the interpolates require grad), weight and bias."""
    b, c, s, o = pm.WG_BATCH, pm.WG_C, pm.WG_SIDE, pm.WG_CONV
    fwd = conv(b, c, o, s * s, 9)
    nobias = conv(b, c, o, s * s, 9, bias=False)
    _, own, _ = profiled("wgan_gp", False)
    assert by_op(own)["aten::convolution"] == fwd
    assert by_op(own)["aten::convolution_backward"] == nobias
    _, train, _ = profiled("wgan_gp", True)
    assert by_op(train)["aten::convolution"] == fwd + 2 * nobias
    assert by_op(train)["aten::convolution_backward"] == nobias + 2 * nobias + b * o * s * s


# --- recurrences, graphs, transforms --------------------------------------------------------------------------------
def test_recurrent_cells_by_hand():
    """Each step: the LSTM cell's two linears 2*B*(I + H1)*4H1, the GRU cell's 2*B*(H1 + H2)*3H2 and the RNN cell's
    2*B*(H2 + H3)*H3 (its first hidden state None: zeros, multiplied all the same)."""
    t, b, i, h1, h2, h3 = pm.RC_STEPS, pm.RC_BATCH, pm.RC_IN, pm.RC_LSTM, pm.RC_GRU, pm.RC_RNN
    per_step = 2 * b * (i + h1) * 4 * h1 + 2 * b * (h1 + h2) * 3 * h2 + 2 * b * (h2 + h3) * h3
    _, counts, _ = profiled("cells", False)
    assert by_op(counts)["aten::addmm"] == t * per_step
    assert flops_of(counts, MATMULS) == t * per_step


def test_graph_reduce_by_hand():
    """Each reduction folds every message element in once (E*F): index_reduce_ (amax, in place), index_reduce (mean)
    and scatter_reduce (prod). The in-place one moves only what it touches: per index a row of F elements read and
    written, the index and the source read."""
    e, f, nodes = len(pm.GA_DST), pm.GA_DIM, pm.GA_NODES
    _, counts, _ = profiled("graph_reduce", False)
    for op in ("aten::index_reduce_", "aten::index_reduce", "aten::scatter_reduce"):
        # the mean then divides each (nodes, F) result element by its count (profiler round 21: not counted before)
        assert by_op(counts)[op] == e * f + (nodes * f if op == "aten::index_reduce" else 0), op
    (inplace,) = rows_of(counts, "aten::index_reduce_")
    assert inplace.bytes_written == e * f * F32
    assert inplace.bytes_read == e * 8 + e * f * F32 + e * f * F32  # int64 index, source, touched rows
    assert by_op(counts)["aten::addmm"] == 2 * e * f * f
    assert nodes < e  # several messages per node: the touched rows are counted per index, as the rule says


def test_vocoder_transforms_by_hand():
    """Centred STFT of T samples: T/hop + 1 frames of n_fft points; each frame's real transform 5/2 n log2 n; the
    inverse (c2r) as much plus a multiply per real output (1/n); the magnitudes' linear 2*B*frames*bins^2; polar 4
    per complex element; the overlap-add (unfold_backward) adds each frame's samples and, for the window envelope
    torch's istft builds from one batch row, the squared window's per frame."""
    b, n, frames, bins = pm.VC_BATCH, pm.VC_FFT, pm.VC_FRAMES, pm.VC_BINS
    real_fft = 5 * n * math.log2(n) / 2
    _, counts, _ = profiled("vocoder", False)
    ops = by_op(counts)
    assert ops["aten::_fft_r2c"] == b * frames * real_fft
    assert ops["aten::_fft_c2r"] == b * frames * (real_fft + n)
    assert ops["aten::addmm"] == 2 * b * frames * bins * bins
    assert ops["aten::polar"] == 4 * b * bins * frames
    assert ops["aten::unfold_backward"] == b * frames * n + frames * n


def test_rotary_complex_product_by_hand():
    """The projection 2*B*N*D*D; the rotation a complex product per pair, 6 real FLOPs; its backward multiplies the
    gradient by the conjugate factor (6 per pair again); view_as_complex / view_as_real are views."""
    b, n, d = pm.RP_BATCH, pm.RP_LEN, pm.RP_DIM
    _, counts, _ = profiled("rotary", False)
    assert by_op(counts)["aten::addmm"] == 2 * b * n * d * d
    assert by_op(counts)["aten::mul"] == 6 * b * n * (d // 2)
    assert all(c.bytes_read + c.bytes_written == 0 for c in rows_of(counts, "aten::view_as_complex"))
    _, train, _ = profiled("rotary", True)
    assert by_op(train)["aten::mul"] == 2 * 6 * b * n * (d // 2)


def test_einsum_chain_by_hand():
    """(A B) C left to right: 2*B*a*b*c + 2*B*a*c*d; x x^T 2*B*R*R*W; the row-wise dot as a batched product
    2*B*R*W; trace and diagonal are views and a sum, the outer product a multiply per element. Training: each
    product's operands' gradients (x needs none)."""
    bt, a, b, c, d, r, w = pm.EC_BATCH, pm.EC_A, pm.EC_B, pm.EC_C, pm.EC_D, pm.EC_ROWS, pm.EC_WIDTH
    assert a * b * c + a * c * d < b * c * d + a * b * d  # left to right is the cheaper order here
    chain = 2 * bt * a * b * c + 2 * bt * a * c * d
    _, counts, _ = profiled("einsum_chain", False)
    assert by_op(counts)["aten::bmm"] == chain + 2 * bt * r * r * w + 2 * bt * r * w
    assert by_op(counts)["aten::mul"] == bt * bt
    _, train, _ = profiled("einsum_chain", True)
    # (AB)C: d(AB) and dC; AB: dA and dB
    assert by_op(train)["aten::bmm"] == by_op(counts)["aten::bmm"] + 2 * bt * a * c * d * 2 + 2 * bt * a * b * c * 2


def test_spatial_transformer_by_hand():
    """affine_grid: a (2 x 3) map times each homogeneous output point, 2*N*H*W*2*3; grid_sample bicubic 16 taps (a
    multiply-add each) per output element, nearest none (a gather). Training: the grid's gradient only (the image
    needs none) for each sampler, and affine_grid's backward a batched product of the same size."""
    b, h, w = pm.ST_BATCH, pm.ST_OUT_H, pm.ST_OUT_W
    _, counts, _ = profiled("spatial_transformer", False)
    assert by_op(counts)["aten::affine_grid_generator"] == 2 * b * h * w * 2 * 3
    assert by_op(counts)["aten::grid_sampler_2d"] == 2 * 16 * b * h * w
    _, train, _ = profiled("spatial_transformer", True)
    assert by_op(train)["aten::grid_sampler_2d_backward"] == 2 * 16 * b * h * w
    assert by_op(train)["aten::bmm"] == 2 * b * h * w * 2 * 3
