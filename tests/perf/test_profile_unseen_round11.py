"""Eleventh held-out round for the model profiler (tests/perf/perf_models_round11.py): Mamba-2's chunked SSD in
two-operand einsums, a Universal Transformer with adaptive computation time (one block's weights shared by a
data-dependent number of steps), a TCN of dilated grouped causal convolutions under weight_norm (one circular), a
complex64 MLP, an fp16 convnet on the CPU, int32 ids with a bool mask, an LSTM over a batch of 0, a batch of 1 through
nn.TransformerEncoder with a padding mask, a PointNet++ set abstraction (farthest point sampling, cdist, topk), a
TorchScript'ed block inside an eager net, gated linear attention with its state updated by baddbmm_ in place, and a
branch chosen by the data. Usage patterns (errors raised by models, default names, hooks, threads, mixed dtypes) are in
tests/perf/test_profile_unseen_round11_more.py.

Every matmul, convolution and attention is checked against its count written out here from the layer shapes (a
multiply-add is 2 FLOPs, a complex one 8; attention 4*B*H*Nq*Nk*D; a convolution by ``profile_support.conv``), never
against the profiler's own numbers; every row's bound against its intensity and the ridge.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import counting, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round11 as pm  # noqa: E402
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
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, index bookkeeping, allocation.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::zeros", "aten::zeros_like",
    "aten::ones", "aten::tril", "aten::masked_fill", "aten::masked_fill_", "aten::constant_pad_nd", "aten::index",
    "aten::embedding", "aten::arange", "aten::full", "aten::scalar_tensor", "aten::new_zeros", "aten::flip",
    "aten::_local_scalar_dense", "aten::select_backward", "aten::slice_backward", "aten::fill_", "aten::index_put_",
}
# torch counts a complex multiply-add as a real one (tilestack: 4 real ones, 8 FLOPs)
DEVIATIONS = {"complex_mlp": NOT_AS_TORCH | {"aten::addmm", "aten::mm"}}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"
B = pm.BATCH
EMPTY = {"lstm_empty"}  # a batch of 0: the forward computes nothing
UNUSED = {"branching_heavy": "light", "branching_light": "heavy"}  # the branch the data does not take


def over_nothing(counts) -> set[str]:
    """Ops counted 0 FLOPs only where an input of theirs has no element (a batch of 0): a true 0, whatever they read."""
    zero = {op for (op, shapes), c in counts.items() if c.flops == 0 and any(0 in s for s in shapes)}
    return zero - {op for (op, shapes), c in counts.items() if c.flops == 0 and not any(0 in s for s in shapes)}


def model_bytes(name):
    """Bytes the model cannot avoid: its tensor inputs and parameters read once, its outputs written once (a batch of
    0's embedding reads no row, a branch not taken reads nothing: left out)."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    skipped = set(getattr(model, UNUSED[name]).modules()) if name in UNUSED else set()
    skipped |= {m for m in model.modules() if name in EMPTY and isinstance(m, torch.nn.Embedding)}
    params = [p for m in model.modules() if m not in skipped for p in m.parameters(recurse=False)]
    return counting._nbytes([*counting._tensors((args, kwargs)), *params, *counting._tensors(out)])


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no op that computes is counted free or left uncounted, torch's formulas agreed
    with, every number finite and >= 0, the step moves at least its inputs, parameters and outputs, and each row with
    a roof for its dtype is placed by its intensity against the ridge; the shares add up to 1; the table renders."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and (p.flops > 0 or (name in EMPTY and not train))
    assert not p.unsupported, p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    free = DATA_MOVEMENT | over_nothing(counts)
    assert not silent_zeros(counts, free), silent_zeros(counts, free)
    assert_as_torch_counts(counts, theirs, DEVIATIONS.get(name, NOT_AS_TORCH))
    assert_rows_finite(p)
    assert p.bytes >= model_bytes(name)
    for o in p.ops:
        if o.counted and o.m.dtype in ("fp32", "bf16", "fp16") and o.m.flops > 0:
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert p.step_s == pytest.approx(math.fsum(o.total_s for o in p.ops), rel=1e-9)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)


def test_ssd_counts_each_einsum_as_its_contraction():
    """Projections 2*B*T*D*(H*P + 2*H*N + H) and 2*B*T*H*P*D; the five einsums are batched matmuls of exactly their
    contractions: C B^T 2*b*c*h*l*l*n, (C B^T * L) X 2*b*c*h*l*l*p, chunk states 2*b*c*h*l*p*n, the inter-chunk
    recurrence 2*b*h*(c+1)^2*p*n, C states 2*b*c*l*h*n*p; segsum's masked cumsum one add per element of (.., l, l)."""
    _, counts, _ = profiled("ssd_chunked", False)
    b, c, l, h, p, n, d = B, pm.SSD_CHUNKS, pm.SSD_CHUNK, pm.SSD_HEADS, pm.SSD_P, pm.SSD_N, pm.SSD_DIM
    t = c * l
    projections = 2 * b * t * d * (h * p + 2 * h * n + h) + 2 * b * t * h * p * d
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == projections
    bmms = sorted(c_.flops for c_ in rows_of(counts, "aten::bmm"))
    expected = sorted([2 * b * c * h * l * l * n, 2 * b * c * h * l * l * p, 2 * b * c * h * l * p * n,
                       2 * b * h * (c + 1) ** 2 * p * n, 2 * b * c * l * h * n * p])
    assert bmms == expected
    # cumsum of a (b, h, c, l), of segsum's (b, h, c, l, l) and of the chunk ends' (b, h, c+1, c+1)
    assert by_op(counts)["aten::cumsum"] == b * h * c * l + b * h * c * l * l + b * h * (c + 1) ** 2
    _, train_counts, _ = profiled("ssd_chunked", True)
    # each bmm's backward: its two operands' gradients, a product of the same size each
    assert by_op(train_counts)["aten::bmm"] == 3 * sum(expected)


def test_act_shares_one_blocks_weights_over_a_data_dependent_number_of_steps():
    """The block runs as many times as the halting loop says (read off the model itself, not the profiler): each step
    four linears (qkv 2*B*T*D*3D, ff 2*B*T*D*F twice, halting 2*B*T*D), attention 4*B*T*T*D, two LayerNorms; the
    shared weights are read again in every step (each addmm call reads its weight)."""
    model, (x,) = pm.act_universal()
    steps = model.ponder_steps(x)
    assert 1 < steps <= pm.ACT_MAX_STEPS
    p, counts, _ = profiled("act_universal", False)
    tokens, d, f = B * pm.ACT_LEN, pm.ACT_DIM, pm.ACT_FF
    per_step = 2 * tokens * d * 3 * d + 2 * (2 * tokens * d * f) + 2 * tokens * d
    assert by_op(counts)["aten::addmm"] == steps * per_step
    assert sum(c.calls for c in rows_of(counts, "aten::addmm")) == 4 * steps
    (qkv,) = [c for (op, shapes), c in counts.items() if op == "aten::addmm" and shapes[-1] == (d, 3 * d)]
    assert qkv.bytes_read == steps * 4 * (3 * d + tokens * d + d * 3 * d)  # bias, input, the shared weight each step
    attention = flops_of(counts, {"aten::bmm", SDPA})
    assert attention == steps * 4 * B * pm.ACT_LEN * pm.ACT_LEN * d
    assert sum(c.calls for c in rows_of(counts, "aten::native_layer_norm")) == 2 * steps
    assert sum(c.calls for c in rows_of(counts, "aten::_local_scalar_dense")) == steps + (steps < pm.ACT_MAX_STEPS)
    (row,) = [o for o in p.ops if o.op == "aten::addmm" and o.shapes[-1] == (d, 3 * d)]
    assert row.calls == steps


def test_tcn_counts_grouped_dilated_convolutions_and_their_weight_norms():
    """Each causal block: left padding (K-1)*d, so the output keeps T positions: conv(B, C, C, T, K, groups); the
    weight recomputed from g and v (_weight_norm_interface) once per block; the circular convolution (pads by copies)
    conv(B, C, C, T, K); the head conv(B, C, 1, T, 1). Training: each convolution's backward twice its forward's
    product (but the first's: its input, the model's, needs no gradient) plus the bias's one add per output element."""
    p, counts, _ = profiled("dilated_tcn", False)
    ch, t, k, g = pm.TCN_CH, pm.TCN_LEN, pm.TCN_K, pm.TCN_GROUPS
    block = conv(B, ch, ch, t, k, groups=g)
    ring, head = conv(B, ch, ch, t, k), conv(B, ch, 1, t, 1)
    convs = sorted(c.flops for c in rows_of(counts, "aten::convolution"))
    assert convs == sorted([block] * len(pm.TCN_DILATIONS) + [ring, head])
    # three rows of the causal convolution: one per dilation, each at its own padded length
    assert {shapes[0] for (op, shapes) in counts if op == "aten::convolution" and shapes[1] == (ch, ch // g, k)} == {
        (B, ch, t + (k - 1) * d) for d in pm.TCN_DILATIONS}
    assert sum(c.calls for c in rows_of(counts, "aten::_weight_norm_interface")) == len(pm.TCN_DILATIONS)
    assert len([o for o in p.ops if o.op == "aten::convolution"]) == 5
    _, train_counts, _ = profiled("dilated_tcn", True)
    bias_adds = B * t * (len(pm.TCN_DILATIONS) * ch + ch + 1)
    first_input_grad = block - B * ch * t  # the first block's product: no gradient for the model's input
    assert by_op(train_counts)["aten::convolution_backward"] == 2 * (sum(convs) - bias_adds) + bias_adds - (
        first_input_grad)


def test_complex_mlp_counts_complex_products_as_real_operations():
    """Complex weights: each complex multiply-add 8 real FLOPs, so fc1 8*B*I*H and fc2 8*B*H*O; |z| 4 FLOPs per
    element; the rows are placed as fp32 (a complex64's parts); its gradients are complex products too."""
    p, counts, _ = profiled("complex_mlp", False)
    cmac = 2 * formulas.COMPLEX_MAC_OVER_REAL
    assert cmac == 8
    assert by_op(counts)["aten::addmm"] == cmac * B * (pm.CX_IN * pm.CX_HIDDEN + pm.CX_HIDDEN * pm.CX_OUT)
    assert by_op(counts)["aten::abs"] == formulas.COMPLEX_ABS_FLOPS * B * (pm.CX_HIDDEN + pm.CX_OUT)
    (fc1,) = [c for (op, shapes), c in counts.items() if op == "aten::addmm" and shapes[1] == (B, pm.CX_IN)]
    assert fc1.bytes_read == 8 * (pm.CX_HIDDEN + B * pm.CX_IN + pm.CX_IN * pm.CX_HIDDEN)  # complex64: 8 bytes each
    assert {o.m.dtype for o in p.ops if o.counted} == {"fp32"}
    _, train_counts, _ = profiled("complex_mlp", True)
    # fc2's input gradient and both weight gradients (fc1's input needs none): three more complex products
    assert by_op(train_counts)["aten::mm"] == cmac * B * (pm.CX_HIDDEN * pm.CX_OUT * 2 + pm.CX_IN * pm.CX_HIDDEN)


def test_half_convnet_rows_are_fp16_and_move_two_bytes_per_element():
    """A float16 model on the CPU: rows of dtype fp16 under fp16's roof; the convolution conv(B, 3, C, S*S, 9) reads
    its input, weight and bias at 2 bytes per element and writes its output so."""
    p, counts, _ = profiled("half_convnet", False)
    ch, side = pm.H_CH, pm.H_SIDE
    (c,) = rows_of(counts, "aten::convolution")
    assert c.flops == conv(B, 3, ch, side * side, 9) and c.dtype == "fp16"
    assert c.bytes_read == 2 * (B * 3 * side * side + ch * 3 * 9 + ch)
    assert c.bytes_written == 2 * B * ch * side * side
    assert by_op(counts)["aten::addmm"] == 2 * B * ch * pm.H_CLASSES
    assert {o.m.dtype for o in p.ops if o.counted} == {"fp16"}


def test_int32_ids_and_bool_mask_read_only_their_rows():
    """int32 ids: the embedding reads the ids (4 bytes each) and one row per id, not the table; the bool mask's sum is
    one add per element (its row's dtype bool, placed under the float roof); where() one select per output."""
    p, counts, _ = profiled("token_pool", False)
    tokens, d = B * pm.TP_LEN, pm.TP_DIM
    (emb,) = rows_of(counts, "aten::embedding")
    assert emb.bytes_read == tokens * 4 + tokens * d * 4 and emb.bytes_written == tokens * d * 4
    (mask_sum,) = [c for (op, shapes), c in counts.items() if op == "aten::sum" and shapes == ((B, pm.TP_LEN),)]
    assert mask_sum.flops == tokens and mask_sum.dtype == "bool" and mask_sum.bytes_read == tokens
    assert by_op(counts)["aten::where"] == tokens * d
    assert by_op(counts)["aten::addmm"] == 2 * B * d * pm.TP_CLASSES
    (row,) = [o for o in p.ops if o.op == "aten::sum" and o.shapes == ((B, pm.TP_LEN),)]
    assert row.m.dtype == "fp32" and row.bound in ("memory", "compute")  # no bool roof: the step's float one


def test_lstm_over_no_sentences_reads_its_weights_and_computes_nothing():
    """0 sentences: every matmul 0 FLOPs but each step of the LSTM reads its weights (the input projection once, the
    hidden one at each of the T steps, the head once): the bytes are the weights'; training adds only the parameter
    gradients' accumulation (adds of the weights' sizes), no product."""
    p, counts, _ = profiled("lstm_empty", False)
    d, hid, tags, t = pm.LT_DIM, pm.LT_HIDDEN, pm.LT_TAGS, pm.LT_LEN
    assert p.flops == 0
    assert flops_of(counts, MATMULS) == 0
    gates = 4 * hid
    assert math.fsum(c.bytes_read for c in rows_of(counts, "aten::addmm")) == 4 * (
        gates + d * gates + t * (gates + hid * gates) + tags + hid * tags)
    _, train_counts, _ = profiled("lstm_empty", True)
    assert flops_of(train_counts, MATMULS) == 0


def test_batch_of_one_encoder_counts_every_key_under_its_padding_mask():
    """One sequence of T tokens, the last T - KEEP padded: in-projection 2*T*D*3D, the fused attention 4*H*T*T*hd over
    every key (the mask hides keys, the kernel scores them all), out-projection 2*T*D*D, the feed-forward 2*T*D*F
    twice; the mask read as (1, H, 1, T) float (broadcast over queries: read as held)."""
    _, counts, _ = profiled("encoder_batch_one", False)
    t, d, h, f = pm.E1_LEN, pm.E1_DIM, pm.E1_HEADS, pm.E1_FF
    hd = d // h
    assert by_op(counts)["aten::addmm"] == 2 * t * d * 3 * d + 2 * t * d * d + 2 * (2 * t * d * f)
    (attn,) = rows_of(counts, SDPA)
    assert attn.flops == 4 * h * t * t * hd
    assert attn.bytes_read == 4 * (3 * h * t * hd + t)


def test_set_abstraction_counts_sampling_query_and_shared_mlp():
    """Farthest point sampling: S steps, each a distance to every point (sub, square, sum: 3 per coordinate), a
    running minimum and an argmax over P; the ball query cdist 3 per coordinate per centroid-point pair, topk one
    compare per distance; the shared MLP two 1x1 convolutions over S*K positions; a max over K."""
    _, counts, _ = profiled("set_abstraction", False)
    s, k, pts = pm.PN_CENTROIDS, pm.PN_NEIGHBOURS, pm.PN_POINTS
    w = pm.PN_WIDTHS
    assert sum(c.calls for c in rows_of(counts, "aten::argmax")) == s
    assert by_op(counts)["aten::argmax"] == s * B * pts
    assert by_op(counts)["aten::minimum"] == s * B * pts
    assert by_op(counts)["aten::_cdist_forward"] == formulas.CDIST_FLOPS_PER_TERM * B * s * pts * 3
    assert by_op(counts)["aten::topk"] == B * s * pts
    assert by_op(counts)["aten::convolution"] == conv(B, w[0], w[1], s * k, 1) + conv(B, w[1], w[2], s * k, 1)
    assert by_op(counts)["aten::amax"] == B * w[2] * s * k


def test_scripted_block_inside_an_eager_net_is_counted_and_restored():
    """TorchScript runs its ops through the dispatcher: fc1 2*B*I*H and fc2 2*B*H*H are seen, with the eager head
    2*B*H*O; the scripted block's parameters are put back after a training profile."""
    _, counts, _ = profiled("with_scripted", False)
    i, h, o = pm.SC_IN, pm.SC_HIDDEN, pm.SC_OUT
    assert by_op(counts)["aten::addmm"] == 2 * B * (i * h + h * h + h * o)
    model, inputs = pm.with_scripted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_cpu(model, inputs, train=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_gated_linear_attention_counts_the_in_place_state_update():
    """Per token: the decay (one multiply per state element), S.baddbmm_(k^T, v) an outer product 2*B*dk*dv (as torch
    counts baddbmm: the product), and q S 2*B*dk*dv; T of each. Projections 2*B*T*D*(2dk + dv + 1), out 2*B*T*dv*D."""
    p, counts, _ = profiled("gated_linear_attention", False)
    t, dk, dv, d = pm.GLA_LEN, pm.GLA_DK, pm.GLA_DV, pm.GLA_DIM
    (update,) = rows_of(counts, "aten::baddbmm_")
    assert update.calls == t and update.flops == t * 2 * B * dk * dv
    assert update.bytes_written == t * B * dk * dv * 4  # the state, in place
    (read,) = rows_of(counts, "aten::bmm")
    assert read.calls == t and read.flops == t * 2 * B * dk * dv
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 2 * B * t * d * (2 * dk + dv + 1) + 2 * B * t * dv * d
    assert any(o.op == "aten::baddbmm_" and o.counted for o in p.ops) or any(
        u.op == "aten::baddbmm_" for u in p.untimed)


def test_branch_taken_by_the_data_sets_the_work():
    """The heavy MLP (2*B*D*Hd twice) runs for a positive-mean input, the light linear (2*B*D*D) for a negative one:
    the two profiles of one net differ by exactly the branch's products."""
    _, heavy, _ = profiled("branching_heavy", False)
    _, light, _ = profiled("branching_light", False)
    d, hd = pm.BR_DIM, pm.BR_HIDDEN
    assert by_op(heavy)["aten::addmm"] == 2 * B * d * hd * 2
    assert by_op(light)["aten::addmm"] == 2 * B * d * d
    assert "aten::gelu" in by_op(heavy) and "aten::gelu" not in by_op(light)
