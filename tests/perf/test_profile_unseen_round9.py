"""Ninth held-out round for the model profiler (tests/perf/perf_models_round9.py): grouped-query attention in a ViT,
multi-head latent attention (Dqk != Dv), a document block mask, a U-Net with a grouped transposed convolution, a Soft
MoE in einsums, nn.TransformerDecoder with memory, EmbeddingBags with padding, int8 weights, a complex128 circuit, a
keyword-only masked LM returning a dataclass, an fp16 autocast MLP, RetNet retention, mixture-of-depths, top-2 experts
by torch.index_add and a bidirectional LSTM; the training steps written as modules are in
tests/perf/test_profile_unseen_round9_steps.py, with the round's fixes.

Every matmul, convolution and attention is checked against its count written from the layer shapes here (the docs'
convention: a multiply-add is 2 FLOPs, a complex one 8; attention 4*B*H*Nq*Nkv*D, or 2*B*H*Nq*Nkv*(Dqk + Dv), times
the share a causal mask keeps where the kernel skips the rest; a convolution by ``profile_support.conv``), never
against the profiler's own numbers; every row's bound against its intensity and the ridge.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import counting, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round9 as pm  # noqa: E402
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
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, index bookkeeping, allocation.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::zeros", "aten::zeros_like",
    "aten::index", "aten::gather", "aten::embedding", "aten::flip", "aten::reflection_pad2d", "aten::ones",
    "aten::tril", "aten::nonzero", "aten::fill_", "aten::zero_", "aten::select_backward", "aten::slice_backward",
    "aten::_local_scalar_dense", "aten::new_zeros", "aten::masked_fill_", "aten::arange",
    "aten::scatter", "aten::index_select", "aten::sparse_mask", "aten::_sparse_coo_tensor_with_dims_and_tensors",
    "aten::scalar_tensor", "aten::full",
}
DEVIATIONS = {"state_vector": NOT_AS_TORCH | {"aten::bmm"}}  # torch counts a complex multiply-add as a real one
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
B = pm.BATCH


def model_bytes(name):
    """Bytes the model cannot avoid: its tensor inputs and parameters read once, its outputs written once (a
    training step's with gradients recorded: it runs its own backward)."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    with torch.set_grad_enabled(not pm.MODELS[name][1]):
        out = model(*args, **kwargs)
    held = [*counting._tensors((args, kwargs)), *model.parameters(), *counting._tensors(out)]
    return counting._nbytes(held)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no work counted as free, torch's formulas agreed with, every number finite
    and >= 0, the step moves at least its inputs, parameters and outputs, and each row with a roof for its dtype
    is placed by its intensity against that roof's ridge; the table renders."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0 and not p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    assert not silent_zeros(counts, DATA_MOVEMENT), silent_zeros(counts, DATA_MOVEMENT)
    assert_as_torch_counts(counts, theirs, DEVIATIONS.get(name, NOT_AS_TORCH))
    assert_rows_finite(p)
    assert p.bytes >= model_bytes(name)
    for o in p.ops:
        if o.counted and o.m.dtype in ("fp32", "bf16", "fp16") and o.m.flops > 0:
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)


def test_gqa_vit_counts_attention_over_the_query_heads_and_reads_the_shared_keys_once():
    """Patch convolution conv(B, C, D, patches, P*P); q, kv and o projections 2*B*N*D*D each (kv: 2*Hkv*hd = D
    outputs); SDPA with enable_gqa 4*B*Hq*N*N*hd (every query head scores every key), reading K and V at their Hkv
    heads; backward 2.5x. The head's addmm as torch counts it (2*B*D*classes)."""
    _, counts, _ = profiled("vit_gqa", False)
    n, d, hd = pm.VIT_TOKENS, pm.VIT_DIM, pm.VIT_DIM // pm.VIT_HEADS
    patches = (pm.VIT_IMG // pm.VIT_PATCH) ** 2
    assert by_op(counts)["aten::convolution"] == conv(B, pm.VIT_CH, d, patches, pm.VIT_PATCH**2)
    assert by_op(counts)["aten::mm"] == 3 * 2 * B * n * d * d
    assert by_op(counts)["aten::addmm"] == 2 * B * d * pm.VIT_CLASSES
    (attn,) = rows_of(counts, SDPA)
    assert attn.flops == 4 * B * pm.VIT_HEADS * n * n * hd
    q_bytes, kv_bytes = B * pm.VIT_HEADS * n * hd * 4, B * pm.VIT_KV * n * hd * 4
    assert attn.bytes_read == q_bytes + 2 * kv_bytes
    assert attn.bytes_written == q_bytes + B * pm.VIT_HEADS * n * formulas.LSE_BYTES
    _, train_counts, _ = profiled("vit_gqa", True)
    assert by_op(train_counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * attn.flops


def test_latent_attention_counts_query_key_and_value_widths_apart():
    """Dqk = NOPE + ROPE (6) and Dv (3) differ: SDPA runs its math path, two batched matmuls 2*B*H*N*N*Dqk and
    2*B*H*N*N*Dv over every score (the causal mask is applied after computing them all), the softmax over B*H*N*N;
    the projections 2*B*N*(in*out). Backward: the four score matmuls (dV, dP at Dv; dQ, dK at Dqk): twice the
    forward's."""
    _, counts, _ = profiled("latent_attention", False)
    n, h, dqk, dv = pm.MLA_LEN, pm.MLA_HEADS, pm.MLA_NOPE + pm.MLA_ROPE, pm.MLA_V
    scores = 2 * B * h * n * n * (dqk + dv)
    assert by_op(counts)["aten::bmm"] == scores
    assert by_op(counts)["aten::_safe_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * B * h * n * n
    projections = [(pm.MLA_DIM, h * dqk), (pm.MLA_DIM, pm.MLA_RANK + pm.MLA_ROPE),
                   (pm.MLA_RANK, h * (pm.MLA_NOPE + dv)), (h * dv, pm.MLA_DIM)]
    assert by_op(counts)["aten::mm"] == sum(2 * B * n * i * o for i, o in projections)
    _, train_counts, _ = profiled("latent_attention", True)
    assert by_op(train_counts)["aten::bmm"] == 3 * scores


def test_document_mask_counts_every_score_the_dense_kernel_computes():
    """A bool attn_mask (same document and causal) does not shrink a dense kernel's work: 4*B*H*N*N*hd, the mask
    (B, 1, N, N, as float) read by the attention row; the mask's comparisons one per element."""
    _, counts, _ = profiled("document_mask", False)
    n, d, h = pm.DOC_LEN, pm.DOC_DIM, pm.DOC_HEADS
    (attn,) = rows_of(counts, SDPA)
    assert attn.flops == 4 * B * h * n * n * (d // h)
    assert attn.bytes_read == 3 * B * n * d * 4 + B * n * n * 4
    assert by_op(counts)["aten::eq"] == B * n * n and by_op(counts)["aten::bitwise_and"] == B * n * n
    assert by_op(counts)["aten::addmm"] == 2 * B * n * d * 3 * d + 2 * B * n * d * d
    _, train_counts, _ = profiled("document_mask", True)
    assert by_op(train_counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * attn.flops


def test_transposed_unet_counts_dilation_groups_and_input_positions():
    """'same' dilated 3x3 on the reflect-padded input, stride-2 3x3 down, the grouped ConvTranspose2d counted on
    its input positions (2*B*numel(w)*H_in*W_in, + a bias add per output element), the 1x1 out on the skip
    concatenation. Backward: the first convolution its weight and bias gradients only (the image needs none)."""
    _, counts, _ = profiled("transposed_unet", False)
    c, s, w = pm.UN_CH, pm.UN_SIDE, pm.UN_WIDTH
    enc = conv(B, c, w, s * s, 9)
    down = conv(B, w, 2 * w, (s // 2) ** 2, 9)
    up = 2 * B * (2 * w) * (w // 2) * 9 * (s // 2) ** 2 + B * w * s * s  # weight (2w, w/2, 3, 3) on 4x4 inputs
    out = conv(B, 2 * w, c, s * s, 1)
    assert flops_of(counts, "aten::convolution") == enc + down + up + out
    _, train_counts, _ = profiled("transposed_unet", True)
    no_bias = lambda f, cout, positions: f - B * cout * positions  # noqa: E731
    bwd = (no_bias(enc, w, s * s) + B * w * s * s
           + 2 * no_bias(down, 2 * w, (s // 2) ** 2) + B * 2 * w * (s // 2) ** 2
           + 2 * no_bias(up, w, s * s) + B * w * s * s
           + 2 * no_bias(out, c, s * s) + B * c * s * s)
    assert flops_of(train_counts, "aten::convolution_backward") == bwd


def test_soft_moe_counts_each_einsum_as_its_contraction():
    """logits 2*B*N*D*E*S, slots 2*B*E*S*N*D, the experts' two layers 2*B*E*S*D*H each, the combine 2*B*N*E*S*D;
    two softmaxes over B*N*E*S scores."""
    _, counts, _ = profiled("soft_moe", False)
    n, d, e, s, h = pm.SM_TOKENS, pm.SM_DIM, pm.SM_EXPERTS, pm.SM_SLOTS, pm.SM_HIDDEN
    assert by_op(counts)["aten::bmm"] == 3 * 2 * B * n * d * e * s + 2 * 2 * B * e * s * d * h
    assert by_op(counts)["aten::_softmax"] == 2 * formulas.SOFTMAX_FLOPS_PER_ELEMENT * B * n * e * s


def test_transformer_decoder_counts_causal_self_attention_as_half_and_cross_attention_whole():
    """Per layer (norm_first): self-attention's packed in-projection 2*T*B*D*3D, its scores under tgt_is_causal
    half of 4*B*H*T*T*hd (the CPU kernel skips the masked blocks), out-projection 2*T*B*D*D; cross-attention's
    query and out projections, keys and values 2*S*B*D*2D from memory, 4*B*H*T*S*hd over every memory position
    (the padding mask is added, not skipped); the feed-forward 2*T*B*D*F twice; three layer norms."""
    _, counts, _ = profiled("transformer_decoder", False)
    t, s, d, h, f, layers = pm.TD_TGT, pm.TD_SRC, pm.TD_DIM, pm.TD_HEADS, pm.TD_FF, pm.TD_LAYERS
    hd = d // h
    self_attn, cross_attn = (c.flops for c in rows_of(counts, SDPA))
    assert self_attn == layers * 4 * B * h * t * t * hd * formulas.causal_fraction(t, t)
    assert cross_attn == layers * 4 * B * h * t * s * hd
    per_layer = 2 * t * B * d * 3 * d + 3 * 2 * t * B * d * d + 2 * s * B * d * 2 * d + 2 * 2 * t * B * d * f
    assert by_op(counts)["aten::addmm"] == layers * per_layer
    assert by_op(counts)["aten::native_layer_norm"] == layers * 3 * formulas.LAYERNORM_FLOPS_PER_ELEMENT * t * B * d
    _, train_counts, _ = profiled("transformer_decoder", True)
    assert by_op(train_counts)[SDPA + "_backward"] == formulas.ATTENTION_BWD_OVER_FWD * (self_attn + cross_attn)


def test_int8_weights_count_the_dequantize_and_read_one_byte_per_weight():
    """Each layer's dequantize: the int8 -> float copy (reads out*in bytes, writes 4x) and one multiply per weight
    by its channel's scale; the linear 2*B*in*out as torch counts addmm."""
    _, counts, _ = profiled("int8_weights", False)
    layers = [(pm.Q8_IN, pm.Q8_HIDDEN), (pm.Q8_HIDDEN, pm.Q8_OUT)]
    casts = [c for (op, shapes), c in counts.items() if op == "aten::_to_copy"]
    assert sorted(c.bytes_read for c in casts) == sorted(i * o for i, o in layers)
    assert sorted(c.bytes_written for c in casts) == sorted(4 * i * o for i, o in layers)
    assert flops_of(counts, "aten::mul") == sum(i * o for i, o in layers)
    assert by_op(counts)["aten::addmm"] == sum(2 * B * i * o for i, o in layers)


def test_state_vector_counts_complex_products_as_real_flops():
    """Each RY gate on a (B, 2**n) complex128 state: B * 2**n outputs of a 2-term sum, 8 FLOPs per complex
    multiply-add; the entangling phase a complex product (6) per amplitude; |psi|^2 a modulus (4) and a square;
    <Z> a real float64 mv 2*B*2**n. Every row in float64."""
    _, counts, _ = profiled("state_vector", False)
    dim, gates = 2**pm.SV_QUBITS, pm.SV_LAYERS * pm.SV_QUBITS
    assert by_op(counts)["aten::bmm"] == gates * formulas.COMPLEX_MAC_OVER_REAL * 2 * B * dim * 2
    (phase,) = [c for (op, shapes), c in counts.items() if op == "aten::mul" and shapes == ((B, dim), (dim,))]
    assert phase.flops == pm.SV_LAYERS * formulas.COMPLEX_MUL_FLOPS * B * dim
    assert by_op(counts)["aten::abs"] == formulas.COMPLEX_ABS_FLOPS * B * dim
    assert by_op(counts)["aten::mv"] == 2 * B * dim
    assert {c.dtype for c in counts.values() if c.flops} == {"fp64"}


def test_keyword_lm_called_by_keywords_returns_its_dataclass_and_counts_the_tied_head():
    """forward(*, input_ids, attention_mask, labels) profiled from a dict; the mixer 2*B*T*D*D, the tied head
    2*B*T*D*V; backward the head's two gradients, the tied weight's two uses summed (an add over V x D)."""
    p, counts, _ = profiled("keyword_lm", False)
    t, d, v = pm.LM_LEN, pm.LM_DIM, pm.LM_VOCAB
    assert by_op(counts)["aten::addmm"] == 2 * B * t * d * d
    assert by_op(counts)["aten::mm"] == 2 * B * t * d * v
    assert by_op(counts)["aten::_log_softmax"] == formulas.SOFTMAX_FLOPS_PER_ELEMENT * B * t * v
    _, train_counts, _ = profiled("keyword_lm", True)
    assert by_op(train_counts)["aten::mm"] == 3 * 2 * B * t * d * v + 2 * 2 * B * t * d * d
    (tied,) = [c for (op, shapes), c in train_counts.items() if op == "aten::add" and shapes == ((v, d), (v, d))]
    assert tied.flops == v * d
    model, inputs = pm.keyword_lm()
    with pytest.raises(TypeError):
        model(*inputs.values())  # keyword-only: the profile passed them by name


def test_autocast_fp16_rows_are_half_precision_under_the_fp16_roof():
    """Under torch.autocast(cpu, float16) the linears run in fp16: 2*B*in*out each, operands read at 2 bytes per
    element (the weight's fp16 copy made each step), placed under the fp16 roof; the backward's matmuls in fp16
    too, the gradients accumulated into the fp32 parameters."""
    p, counts, _ = profiled("autocast_fp16", False)
    i, h, o = pm.AC_IN, pm.AC_HIDDEN, pm.AC_OUT
    addmm = rows_of(counts, "aten::addmm")
    assert {c.dtype for c in addmm} == {"fp16"}
    assert sum(c.flops for c in addmm) == 2 * B * i * h + 2 * B * h * o
    assert sorted(c.bytes_read for c in addmm) == sorted([2 * (B * i + i * h + h), 2 * (B * h + h * o + o)])
    assert [o_.m.dtype for o_ in p.ops if o_.op == "aten::addmm"] == ["fp16"] * 2
    _, train_counts, _ = profiled("autocast_fp16", True)
    assert {c.dtype for c in rows_of(train_counts, "aten::mm")} == {"fp16"}
    assert by_op(train_counts)["aten::mm"] == 2 * B * h * o * 2 + 2 * B * i * h  # fc1's input needs no gradient


def test_retention_counts_its_two_score_matmuls_and_the_decay_mask():
    """(Q K^T) 2*B*H*N*N*hd, times the decay mask one multiply per score, @ V 2*B*H*N*N*hd; GroupNorm 8 per element;
    the qkv, gate and out projections 2*B*N*D*(3D + D + D)."""
    _, counts, _ = profiled("retention", False)
    n, d, h = pm.RT_LEN, pm.RT_DIM, pm.RT_HEADS
    assert by_op(counts)["aten::bmm"] == 2 * 2 * B * h * n * n * (d // h)
    (decay,) = [c for (op, shapes), c in counts.items() if op == "aten::mul" and shapes == ((B, h, n, n), (h, n, n))]
    assert decay.flops == B * h * n * n
    assert by_op(counts)["aten::native_group_norm"] == formulas.LAYERNORM_FLOPS_PER_ELEMENT * B * n * d
    assert by_op(counts)["aten::mm"] == 2 * B * n * d * 5 * d


def test_mixture_of_depths_counts_the_mlp_on_its_capacity_only():
    """The router 2*B*N*D on every token; the MLP 2*B*K*D*H twice on the K picked tokens per sequence only; the
    scatter_add one add per returned element (B*K*D), reading the whole residual stream it copies."""
    _, counts, _ = profiled("mixture_of_depths", False)
    n, k, d, h = pm.MD_TOKENS, pm.MD_CAPACITY, pm.MD_DIM, pm.MD_HIDDEN
    assert by_op(counts)["aten::addmm"] == 2 * B * n * d + 2 * 2 * B * k * d * h
    (scatter,) = rows_of(counts, "aten::scatter_add")
    assert scatter.flops == B * k * d
    assert scatter.bytes_read == (B * n * d + B * k * d) * 4 + B * k * 8  # the index is an expanded (B, K) one
    assert scatter.bytes_written == B * n * d * 4


def test_index_add_moe_counts_each_experts_load():
    """Each expert's two linears on the n_e tokens that picked it (2T pairs in all): 2*n_e*D*H twice; out-of-place
    torch.index_add one add per element of its source (n_e*D), reading and writing the whole (T, D) output."""
    model, (x,) = pm.index_add_moe()
    with torch.no_grad():
        _, picked = model.route(x)
    loads = torch.bincount(picked.flatten(), minlength=pm.IA_EXPERTS).tolist()
    t, d, h = pm.IA_TOKENS, pm.IA_DIM, pm.IA_HIDDEN
    assert sum(loads) == 2 * t and min(loads) > 0
    _, counts, _ = profiled("index_add_moe", False)
    assert by_op(counts)["aten::addmm"] == sum(2 * 2 * n * d * h for n in loads)
    assert by_op(counts)["aten::mm"] == 2 * t * d * pm.IA_EXPERTS
    adds = rows_of(counts, "aten::index_add")
    assert sorted(c.flops for c in adds) == sorted(n * d for n in loads)
    assert all(c.bytes_written == t * d * 4 for c in adds)


def test_bidirectional_lstm_counts_each_direction_of_each_layer():
    """Layer l, each direction: 2*B*T*(4H*I_l + 4H*H) with I_1 = input width, I_2 = 2H (both directions'
    outputs); backward twice the forward."""
    _, counts, _ = profiled("bilstm", False)
    t, i, hid = pm.LS_LEN, pm.LS_IN, pm.LS_HIDDEN
    per_direction = [2 * B * t * (4 * hid * width + 4 * hid * hid) for width in (i, 2 * hid)]
    assert by_op(counts)["aten::mkldnn_rnn_layer"] == 2 * sum(per_direction)
    _, train_counts, _ = profiled("bilstm", True)
    assert by_op(train_counts)["aten::mkldnn_rnn_layer_backward"] == 2 * 2 * sum(per_direction)
