"""Tenth held-out round for the model profiler (tests/perf/perf_models_round10.py): selective scans (a Python loop, and
log space by logcumsumexp), a ViT with bicubic-interpolated positions and per-head attention weights, a
sequence-first nn.MultiheadAttention with kdim/vdim, a graph layer by segment_reduce and scatter_reduce, features made
sparse in forward, stop words by torch.isin, forces by torch.func (vmap of grad), LSQ fake quantization, a packed
unsorted bidirectional GRU returning a namedtuple, an FFT long convolution, buffers updated in forward, a
channels-last bf16-autocast convnet with non-reentrant checkpointing, and a batch of 0 images. The round's fixes
(isin, segment_reduce's backward, dense-to-sparse conversions) are tested op by op in
tests/perf/test_profile_unseen_round10_ops.py.

Every matmul, convolution, attention and interpolation is checked against its count written from the layer shapes
here (a multiply-add is 2 FLOPs, a complex product 6; attention 4*B*H*Nq*Nk*D; a convolution by
``profile_support.conv``), never against the profiler's own numbers; every row's bound against its intensity.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import counting, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round10 as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, profile_cpu, setup_round  # noqa: E402
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
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, packing, allocation, conversions.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::zeros", "aten::new_zeros",
    "aten::index", "aten::gather", "aten::embedding", "aten::index_select", "aten::scatter", "aten::scatter_",
    "aten::select_backward", "aten::slice_backward", "aten::_local_scalar_dense", "aten::masked_fill_",
    "aten::arange", "aten::full", "aten::flip", "aten::scalar_tensor", "aten::constant_pad_nd",
    "aten::_pack_padded_sequence", "aten::_to_sparse", "aten::ones", "aten::tril",
}
# torch counts a sparse operand's matmul as dense; tilestack by its stored elements (checked by hand below)
DEVIATIONS = {"sparse_features": NOT_AS_TORCH | {"aten::mm"}}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
B = pm.BATCH


def over_nothing(counts) -> set[str]:
    """Ops counted 0 FLOPs only where an input of theirs has no element (a batch of 0): a true 0, whatever they read."""
    zero = {op for (op, shapes), c in counts.items() if c.flops == 0 and any(0 in s for s in shapes)}
    return zero - {op for (op, shapes), c in counts.items() if c.flops == 0 and not any(0 in s for s in shapes)}


def model_bytes(name):
    """Bytes the model cannot avoid: its tensor inputs and parameters read once, its outputs written once."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    out = model(*args, **kwargs)
    held = [*counting._tensors((args, kwargs)), *model.parameters(), *counting._tensors(out)]
    return counting._nbytes(held)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no op that computes is counted free or left uncounted, torch's formulas agreed
    with, every number finite and >= 0, the step moves at least its inputs, parameters and outputs, and each row with
    a roof for its dtype is placed by its intensity against the ridge; the table renders."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0
    assert not p.unsupported, p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    free = DATA_MOVEMENT | over_nothing(counts)
    assert not silent_zeros(counts, free), silent_zeros(counts, free)
    assert_as_torch_counts(counts, theirs, DEVIATIONS.get(name, NOT_AS_TORCH))
    assert_rows_finite(p)
    assert p.bytes >= model_bytes(name)  # a batch of 0 too: its layers read their weights (empty outputs alias nothing)
    for o in p.ops:
        if o.counted and o.m.dtype in ("fp32", "bf16") and o.m.flops > 0:
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert all(math.isfinite(t) and t >= 0 for t in p.step_times_s)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)


def test_loop_scan_counts_one_state_contraction_per_token():
    """Projections: in 2*B*T*D*2E, dt 2*B*T*E*E, B and C 2*B*T*E*2N, out 2*B*T*E*D (the chunked x is not contiguous:
    matmuls without bias, the bias added apart). The scan's y = h C per token: one bmm of 2*B*E*N per token, T calls;
    exp(delta A) per token over (B, E, N)."""
    _, counts, _ = profiled("loop_scan", False)
    t, d, e, n = pm.SCAN_LEN, pm.SCAN_DIM, pm.SCAN_INNER, pm.SCAN_STATE
    tokens = B * t
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 2 * tokens * (d * 2 * e + e * e + e * 2 * n + e * d)
    (bmm,) = rows_of(counts, "aten::bmm")
    assert bmm.calls == t and bmm.flops == t * 2 * B * e * n
    assert sum(c.calls for c in rows_of(counts, "aten::exp")) == t + 1  # each token's decay, and A itself
    assert flops_of(counts, "aten::exp") == t * B * e * n + e * n
    _, train_counts, _ = profiled("loop_scan", True)
    # backward: each token's bmm twice more (dh and dC), each projection's matmul twice more
    assert by_op(train_counts)["aten::bmm"] == 3 * bmm.flops


def test_log_scan_counts_the_two_scans_once_per_element():
    """Three linears 2*B*T*D*E each; cumsum and logcumsumexp one combine per element of (B, T, E); their backwards
    (a reversed cumsum; logcumsumexp's by exponentials and a cumsum) are counted, none left out."""
    _, counts, _ = profiled("log_scan", False)
    elements = B * pm.SCAN_LEN * pm.SCAN_INNER
    assert by_op(counts)["aten::addmm"] == 3 * 2 * B * pm.SCAN_LEN * pm.SCAN_DIM * pm.SCAN_INNER
    assert by_op(counts)["aten::cumsum"] == elements
    assert by_op(counts)["aten::logcumsumexp"] == elements
    _, train_counts, _ = profiled("log_scan", True)
    assert by_op(train_counts)["aten::cumsum"] > elements  # the backwards' reversed scans


def test_interpolated_vit_counts_bicubic_positions_and_per_head_weights():
    """Patch convolution conv(B, C, D, g*g, P*P); the position grid (1, D, G, G) resized to (g, g) bicubically: a
    multiply-add per 16 taps per output element, 2*16*D*g*g, reading the G*G grid, writing the g*g one; the packed
    in-projection 2*B*N*D*3D and the out-projection 2*B*N*D*D; with need_weights (per head) the math path: Q K^T and
    A V as bmm of 2*B*H*N*N*hd each, the softmax over B*H*N*N, the weights returned (B, H, N, N)."""
    p, counts, _ = profiled("vit_interp", False)
    g = pm.VIT_IMG // pm.VIT_PATCH
    n, d, h = g * g + 1, pm.VIT_DIM, pm.VIT_HEADS
    hd = d // h
    assert by_op(counts)["aten::convolution"] == conv(B, pm.VIT_CH, d, g * g, pm.VIT_PATCH**2)
    (bicubic,) = rows_of(counts, "aten::upsample_bicubic2d")
    assert bicubic.flops == 2 * 16 * d * g * g
    assert bicubic.bytes_read == d * pm.VIT_GRID**2 * 4 and bicubic.bytes_written == d * g * g * 4
    in_out = 2 * B * n * d * 3 * d + 2 * B * n * d * d
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == in_out + 2 * B * d * pm.VIT_CLASSES
    assert by_op(counts)["aten::bmm"] == 2 * (2 * B * h * n * n * hd)
    assert by_op(counts)["aten::_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * B * h * n * n
    assert SDPA not in by_op(counts)  # the weights asked for: no fused kernel
    model, inputs = pm.vit_interp()
    logits, weights = model(*inputs)
    assert weights.shape == (B, h, n, n) and logits.shape == (B, pm.VIT_CLASSES)
    _, train_counts, _ = profiled("vit_interp", True)
    # the interpolation's backward: each of dy's g*g elements spread over its 16 taps
    assert by_op(train_counts)["aten::upsample_bicubic2d_backward"] == 2 * 16 * d * g * g
    assert any(o.op == "aten::upsample_bicubic2d" and o.counted for o in p.ops)


def test_empty_batch_counts_only_the_work_that_does_not_depend_on_the_batch():
    """0 images: the convolution, projections and attention count 0; the position grid's interpolation (no batch dim)
    and the class token's position add are all the work, forward; training adds their gradients only."""
    p, counts, _ = profiled("vit_empty", False)
    g = pm.VIT_IMG // pm.VIT_PATCH
    assert p.flops == 2 * 16 * pm.VIT_DIM * g * g + pm.VIT_DIM
    for op in ("aten::convolution", "aten::bmm", "aten::_softmax"):
        assert by_op(counts).get(op, 0.0) == 0, op
    pt, train_counts, _ = profiled("vit_empty", True)
    assert by_op(train_counts)["aten::upsample_bicubic2d_backward"] == 2 * 16 * pm.VIT_DIM * g * g
    assert flops_of(train_counts, {"aten::mm", "aten::bmm", "aten::convolution_backward"}) == 0
    assert math.isfinite(pt.step_s) and all(math.isfinite(o.m.intensity) for o in pt.ops)


def test_kdim_attention_counts_three_projections_of_their_own_widths():
    """kdim and vdim differ from the model width: q, k and v have their own weights (E x E, E x kdim, E x vdim), each
    an addmm 2*L*B*E*width; the out-projection 2*Lq*B*E*E; the fused attention 4*B*H*Lq*Lk*hd over every key (the
    padding mask hides keys; the kernel still scores them), reading the mask."""
    _, counts, _ = profiled("kdim_attention", False)
    lq, lk, e, h = pm.XA_LQ, pm.XA_LK, pm.XA_DIM, pm.XA_HEADS
    q_and_out = 2 * (2 * lq * B * e * e)
    kv = 2 * lk * B * e * pm.XA_KDIM + 2 * lk * B * e * pm.XA_VDIM
    assert by_op(counts)["aten::addmm"] == q_and_out + kv
    (attn,) = rows_of(counts, SDPA)
    assert attn.flops == 4 * B * h * lq * lk * (e // h)
    mask_bytes = B * h * lk * 4  # the float mask, made per head by MHA (broadcast over queries: read as held)
    assert attn.bytes_read == 4 * B * h * (lq + 2 * lk) * (e // h) + mask_bytes


def test_segment_graph_counts_both_aggregations_and_their_gradients():
    """E edges of F features: the message linear 2*E*F*F; segment_reduce('mean') one add per message element (E*F);
    scatter_reduce('amax') one compare per message element; the out linear 2*N*3F*O. Training: segment_reduce's
    backward divides each element's gradient by its segment's length (E*F), counted (it was reported uncounted)."""
    src, _ = pm.graph_edges()
    e, f, nodes = len(src), pm.GRAPH_FEAT, pm.GRAPH_NODES
    _, counts, _ = profiled("segment_graph", False)
    assert by_op(counts)["aten::addmm"] == 2 * e * f * f + 2 * nodes * 3 * f * pm.GRAPH_OUT
    assert by_op(counts)["aten::segment_reduce"] == e * f
    assert by_op(counts)["aten::scatter_reduce"] == e * f
    p, train_counts, _ = profiled("segment_graph", True)
    assert by_op(train_counts)["aten::_segment_reduce_backward"] == e * f
    assert not p.unsupported


def test_sparse_features_count_the_product_by_stored_elements():
    """relu(x).to_sparse() keeps nnz of R*I values: the conversion computes nothing (a copy of the nonzeros, as
    nonzero), reads the dense input and writes the indices and values; the sparse product 2*nnz*O forward, and
    again for the weight's gradient (the sparse operand transposed)."""
    model, (x,) = pm.sparse_features()
    nnz = int((x > 0).sum())
    _, counts, _ = profiled("sparse_features", False)
    (conv_row,) = rows_of(counts, "aten::_to_sparse")
    assert conv_row.flops == 0 and not conv_row.unsupported
    assert conv_row.bytes_read == x.numel() * 4
    assert conv_row.bytes_written == nnz * 4 + 2 * nnz * 8  # values, and (2, nnz) int64 indices
    assert by_op(counts)["aten::_sparse_addmm"] == 2 * nnz * pm.SPARSE_OUT
    _, train_counts, _ = profiled("sparse_features", True)
    assert by_op(train_counts)["aten::mm"] == 2 * nnz * pm.SPARSE_OUT


def test_stopwords_count_isin_by_its_pairwise_compares():
    """torch.isin of B*T ids in 4 stop words: few test elements (4 < 10 * (B*T)^0.145), so each id is compared with
    each stop word: 4*B*T compares; the bool mask read back as the mean's weights."""
    _, counts, _ = profiled("stopwords", False)
    ids = B * pm.SW_LEN
    assert len(pm.SW_STOP) < int(10 * ids**0.145)
    (isin,) = rows_of(counts, "aten::isin")
    assert isin.flops == ids * len(pm.SW_STOP) and not isin.unsupported
    assert isin.bytes_read == (ids + len(pm.SW_STOP)) * 8 and isin.bytes_written == ids


def test_hamiltonian_counts_energy_and_its_vmapped_gradient():
    """P points: the energy's two linears 2*P*(D*Hd + Hd) on the batch, and again under vmap(grad) (batched to the same
    matmuls), whose backward adds the two input-gradient matmuls 2*P*(Hd + Hd*D): 3 forward-sized linears in all."""
    _, counts, _ = profiled("hamiltonian", False)
    p, d, hd = pm.HAM_POINTS, pm.HAM_DIM, pm.HAM_HIDDEN
    linears = 2 * p * (d * hd + hd)
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 3 * linears
    model, inputs = pm.hamiltonian()
    energy, forces = model(*inputs)
    assert energy.shape == (p,) and forces.shape == (p, d)


def test_lsq_counts_learnable_fake_quantization_and_its_backward():
    """Per-tensor LSQ on the (R, I) input, per-channel LSQ on each weight: FAKE_QUANT_FLOPS_PER_ELEMENT per element;
    the backward the gradients of the input, scale and zero point: FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT."""
    _, counts, _ = profiled("lsq_mlp", True)
    weights = pm.LSQ_IN * pm.LSQ_HIDDEN + pm.LSQ_HIDDEN * pm.LSQ_OUT
    acts = pm.LSQ_ROWS * pm.LSQ_IN
    fq = "aten::_fake_quantize_learnable_per_"
    assert by_op(counts)[fq + "tensor_affine"] == formulas.FAKE_QUANT_FLOPS_PER_ELEMENT * acts
    assert by_op(counts)[fq + "channel_affine"] == formulas.FAKE_QUANT_FLOPS_PER_ELEMENT * weights
    assert by_op(counts)[fq + "tensor_affine_backward"] == formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT * acts
    assert by_op(counts)[fq + "channel_affine_backward"] == (
        formulas.FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT * weights)


def test_packed_unsorted_gru_counts_only_the_real_tokens_and_returns_its_namedtuple():
    """A packed batch runs each step on the sequences still going: per direction and layer, the input projection
    2*tokens*I*3H at once and the hidden one 2*tokens*H*3H over the steps (tokens = sum of the lengths, not T*B);
    layer 2's input is both directions (2H). The namedtuple comes back whole: padded outputs, final states and the
    lengths in the caller's (unsorted) order."""
    _, counts, _ = profiled("packed_bigru", False)
    tokens, i, h = sum(pm.GRU_LENGTHS), pm.GRU_IN, pm.GRU_HIDDEN
    per_dir = 2 * tokens * 3 * h * (i + h) + 2 * tokens * 3 * h * (2 * h + h)
    assert by_op(counts)["aten::addmm"] == 2 * per_dir
    model, inputs = pm.packed_bigru()
    out = model(*inputs)
    assert isinstance(out, pm.GruOut) and out.lengths.tolist() == list(pm.GRU_LENGTHS)
    assert out.padded.shape == (max(pm.GRU_LENGTHS), len(pm.GRU_LENGTHS), 2 * h)
    p, _, _ = profiled("packed_bigru", True)
    assert p.train and p.flops > 2 * 2 * per_dir  # the backward too


def test_fft_long_conv_counts_transforms_and_the_complex_product():
    """rfft of the (B, C) signals and of the C filters at n = 2L: FFT_FLOPS_PER_POINT_LOG2 * n log2 n / 2 each; their
    complex product 6 FLOPs per (B, C, L + 1) element; irfft as many as the signals' rfft, and its 1/n scaling a
    multiply per real output."""
    _, counts, _ = profiled("fft_long_conv", False)
    n, c = 2 * pm.FFTC_LEN, pm.FFTC_CH
    one = formulas.fft_flops(n, real=True)
    assert by_op(counts)["aten::_fft_r2c"] == (B * c + c) * one
    assert by_op(counts)["aten::_fft_c2r"] == B * c * one + B * c * n
    (product,) = [r for (op, shapes), r in counts.items() if op == "aten::mul" and shapes[0] == (B, c, n // 2 + 1)]
    assert product.flops == formulas.COMPLEX_MUL_FLOPS * B * c * (n // 2 + 1)


def test_ema_buffers_are_put_back_and_their_updates_counted():
    """The running mean (lerp_, one FLOP per element) and the step count (add_) change in every step; the profile
    puts them back as it found them, and counts each update once per step."""
    model, inputs = pm.ema_buffers()
    running, steps = model.running.clone(), model.steps.clone()
    p = profile_cpu(model, inputs, steps=2, train=True)
    assert torch.equal(model.running, running) and torch.equal(model.steps, steps)
    _, counts, _ = profiled("ema_buffers", True)
    (lerp,) = rows_of(counts, "aten::lerp_")
    assert lerp.calls == 1 and lerp.flops == pm.EMA_DIM
    assert any(o.op == "aten::lerp_" for o in p.ops) or any(u.op == "aten::lerp_" for u in p.untimed)


def test_channels_last_autocast_counts_bf16_convolutions_once_and_their_recompute():
    """Under bf16 autocast the convolutions run in bf16 (their rows' dtype), counted conv(...) each; the
    non-reentrant checkpoint recomputes each block in the backward: the forward convolutions twice in a training
    step, and the two GroupNorms twice too."""
    p, counts, _ = profiled("channels_last_autocast", False)
    pixels, ch = pm.CL_IMG**2, pm.CL_CH
    fwd = conv(B, 3, ch, pixels, 9) + conv(B, ch, ch, pixels, 9)
    assert by_op(counts)["aten::convolution"] == fwd
    assert {c.dtype for c in rows_of(counts, "aten::convolution")} == {"bf16"}
    assert all(o.m.dtype == "bf16" for o in p.ops if o.op == "aten::convolution")
    _, train_counts, _ = profiled("channels_last_autocast", True)
    assert by_op(train_counts)["aten::convolution"] == 2 * fwd
    assert sum(c.calls for c in rows_of(train_counts, "aten::native_group_norm")) == 4


def test_chunked_prefill_builds_its_causal_bias_masks_while_counted():
    """The masks are torch.nn.attention.bias objects built in forward (tensor subclasses: building one under the
    counting mode failed, so the model could not be profiled at all). Lower right over Lk = context + chunk keys: the
    CPU kernel takes the materialised mask and scores every key, 4*B*H*Lq*Lk*hd; upper left over the chunk alone runs
    as is_causal, square: half of 4*B*H*Lq*Lq*hd. Projections: q and out 2*B*Lq*D*D each, kv 2*B*Lk*D*2D."""
    p, counts, _ = profiled("chunked_prefill", False)
    lq, lk, d, h = pm.CP_CHUNK, pm.CP_CONTEXT + pm.CP_CHUNK, pm.CP_DIM, pm.CP_HEADS
    hd = d // h
    attn = sorted(rows_of(counts, SDPA), key=lambda c: c.flops)
    assert [c.flops for c in attn] == [formulas.CAUSAL_FRACTION * 4 * B * h * lq * lq * hd, 4 * B * h * lq * lk * hd]
    assert by_op(counts)["aten::addmm"] == 2 * (2 * B * lq * d * d) + 2 * B * lk * d * 2 * d
    assert not p.unsupported and "__new__" not in vars(torch.Tensor)  # the constructor is torch's again
    _, train_counts, _ = profiled("chunked_prefill", True)
    assert by_op(train_counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * sum(c.flops for c in attn)
