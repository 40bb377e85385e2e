"""Seventh held-out round for the model profiler (tests/perf/perf_models_round7.py): RWKV, a Switch MoE dropping
tokens past its capacity, sliding-window attention with ALiBi, a DiT block, a complex-valued net, a binarized net
on uint8 images (int8 _int_mm, bool XNOR-popcount), a MoCo momentum encoder, a Perceiver under activation
checkpointing, a 500-layer MLP, dict/dataclass outputs, a neural ODE (RK4), Sinkhorn, a KAN layer, a PixelCNN on
channels_last images, a VQ-VAE quantizer, a router that drops every token, a net that differs in train and eval.

Every matmul, convolution and attention is checked against its count written from the layer shapes here
(2*M*N*K, a complex product 4x that; a convolution by ``profile_support.conv``; attention 4*B*H*Nq*Nkv*D), never
against the profiler's own numbers; every row's bound against its intensity and the ridge of the ceilings.

What the round found (each pinned by the test whose docstring says so):
- profiling changed the model it profiled: BatchNorm's running statistics and a MoCo queue moved once per step,
  a momentum encoder's parameters drifted, a training profile left gradients summed over its steps in every
  parameter's .grad (and added into gradients the caller already had), and the global RNG advanced; all are put
  back now (perf.profile_state), also when the model raises, when a bound forward is profiled, inside
  inference_mode, and for observers resized in forward; a lazy module keeps the parameters its first forward made;
- an op on integers only (an int8 torch._int_mm, bitwise and logical ops) was labelled fp32 and placed under the
  fp32 roof (on an H100 an int8 product was compute-bound by the fp32 ridge where the int8 one makes it
  memory-bound): it is counted as its own dtype, and placed under that dtype's roof where the device has one;
- count_ops on meta tensors counted every op as a view (all meta storages share the data pointer 0): 0 bytes;
- profile_model given a model on the meta device failed with "device='meta'; expected 'cpu', ...", naming an
  argument the caller had not passed; ceilings of another device (an H100's for a CPU profile) were taken.
"""

import math
import random
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tilestack.perf import counting, device, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round7 as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, profile_cpu, setup_round  # noqa: E402
from profile_support import (  # noqa: E402
    CEIL,
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
CASES, IDS, profiled = setup_round(pm.MODELS, without_torch={"perceiver"})  # torch's module tracker fails on it
# Ops whose count of 0 FLOPs is right: copies, layout, gathers, index bookkeeping, allocation, random draws.
DATA_MOVEMENT = {
    "aten::cat", "aten::stack", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::zeros", "aten::zeros_like",
    "aten::full", "aten::full_like", "aten::index", "aten::index_select", "aten::nonzero", "aten::select_backward",
    "aten::slice_backward", "aten::embedding", "aten::embedding_dense_backward", "aten::constant_pad_nd",
    "aten::masked_fill", "aten::masked_fill_", "aten::fill_", "aten::_local_scalar_dense", "aten::scalar_tensor",
    "aten::normal_", "aten::randn_like", "aten::bernoulli_", "aten::one_hot", "aten::masked_select",
    "aten::index_put_", "aten::_index_put_impl_", "aten::new_zeros", "aten::lift_fresh", "aten::detach",
    "aten::masked_select_backward", "aten::index_add", "aten::index_add_", "aten::scatter", "aten::scatter_",
}
# over zero rows: no work, though a 0-d result is written and a linear's weight is read (round 10: an empty output
# aliases nothing, so an addmm of 0 rows moves its weight)
EMPTY = {"drop_everything": {"aten::sum", "aten::mm", "aten::addmm"}}
DEVIATIONS = {"complex_net": NOT_AS_TORCH | {"aten::mm"}}  # torch counts a complex multiply-add as one real one
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


def model_bytes(name):
    """Bytes the model cannot avoid: its tensor inputs and parameters read once, its outputs written once."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    held = [*counting._tensors((args, kwargs)), *model.parameters(), *counting._tensors(out)]
    return counting._nbytes(held)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no work counted as free, torch's formulas agreed with, every number finite
    and >= 0, the step moves at least its inputs, parameters and outputs, and each row's bound is its intensity
    against the ridge (an integer op, with no roof of its own here, under the fp32 one)."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0 and not p.unsupported
    assert all(o.calls > 0 for o in p.ops if o.op != profile.OTHER)
    free = DATA_MOVEMENT | EMPTY.get(name, set())
    assert not silent_zeros(counts, free), silent_zeros(counts, free)
    assert_as_torch_counts(counts, theirs, DEVIATIONS.get(name, NOT_AS_TORCH))
    assert_rows_finite(p)
    assert p.bytes >= model_bytes(name)
    for o in p.ops:  # every row here is fp32 or bf16 (the same roofs): CEIL has no integer roof, so the integer
        if o.counted:  # ops are placed under the step's fp32 one
            assert o.m.dtype in ("fp32", "bf16"), o.label
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0 and math.isfinite(p.wall_s)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    rendered(p)


def snapshot(model, inputs):
    """Everything a profile could change: parameters and buffers by name, their gradients, each module's mode,
    the input tensors, and the RNG states of torch and Python."""
    args, kwargs = profile.as_call(inputs)
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [t.clone() for t in counting._tensors((args, kwargs))],
        torch.get_rng_state(),
        random.getstate(),
    )


def assert_same(a, b):
    state_a, grads_a, modes_a, inputs_a, rng_a, py_a = a
    state_b, grads_b, modes_b, inputs_b, rng_b, py_b = b
    assert state_a.keys() == state_b.keys()
    changed = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not changed, changed
    moved = [k for k in grads_a if (grads_a[k] is None) != (grads_b[k] is None)
             or grads_a[k] is not None and not torch.equal(grads_a[k], grads_b[k])]
    assert not moved, moved
    assert modes_a == modes_b
    assert all(torch.equal(x, y) for x, y in zip(inputs_a, inputs_b, strict=True))
    assert torch.equal(rng_a, rng_b) and py_a == py_b


@pytest.mark.parametrize("name,train", [
    ("momentum_encoder", False), ("momentum_encoder", True), ("train_eval", False), ("train_eval", True),
    ("train_eval_in_eval", True), ("switch_moe", True), ("dict_outputs", True),
])
def test_profiling_leaves_the_model_as_it_found_it(name, train):
    """profile_model changed what it profiled: BatchNorm's running statistics and num_batches_tracked, a MoCo
    queue and its pointer moved with every step, the key encoder's parameters drifted by their moving average,
    train=True left gradients summed over all the profile's steps in .grad, and torch's RNG advanced. All are as
    they were after profiling, so the model's next output is what it would have been."""
    model, inputs = pm.MODELS[name][0]()
    args, kwargs = profile.as_call(inputs)
    before = snapshot(model, inputs)
    torch.manual_seed(1)
    expected = counting._tensors(model(*args, **kwargs))
    model.load_state_dict(before[0])
    torch.set_rng_state(before[4])
    profile_cpu(model, inputs, steps=2, train=train)
    assert_same(before, snapshot(model, inputs))
    torch.manual_seed(1)
    got = counting._tensors(model(*args, **kwargs))
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))


def test_parameters_written_through_data_are_put_back():
    """EMA updates written through .data (p.data.mul_, p.data = ...) move no version counter: the parameters are
    compared by value, so those are put back too."""

    class Ema(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.shadow = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            self.shadow.weight.data.mul_(0.5)
            self.shadow.bias.data = self.shadow.bias.data + 1
            return self.lin(x) + self.shadow(x)

    model = Ema()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_cpu(model, (torch.randn(4, 3),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gradients_the_caller_had_are_kept_not_added_into():
    """A caller's accumulated gradients (between two optimizer steps) were summed into by every profiled step."""
    model, inputs = pm.dit_block()
    model(*inputs).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    kept = {k: p.grad for k, p in model.named_parameters()}
    profile_cpu(model, inputs, train=True)
    for k, p in model.named_parameters():
        assert p.grad is kept[k] and torch.equal(p.grad, grads[k]), k


def test_a_bound_forward_profiled_leaves_its_module_as_it_found_it():
    """model.forward (a bound method, not the module) profiled: its module's BatchNorm statistics are kept too."""
    model, inputs = pm.train_eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    profile_cpu(model.forward, inputs)
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())


def test_a_lazy_module_keeps_the_parameters_its_first_forward_made():
    """nn.LazyLinear materialises its parameters in its first forward (a one-time change, which the profile's
    warm-up makes): they stay, the module works after the profile, and the counts are its product's."""
    model, x = nn.Sequential(nn.LazyLinear(5), nn.BatchNorm1d(5)), torch.randn(4, 3)
    p = profile_cpu(model, (x,))
    assert flops_of({(o.op, o.shapes): o.m for o in p.ops}, "aten::addmm") == 2 * 4 * 3 * 5
    assert model[0].weight.shape == (5, 3) and model(x).shape == (4, 5)
    assert int(model[1].num_batches_tracked) == 1  # the call just made, not the profile's


def test_state_is_restored_when_the_model_raises_mid_profile():
    """A model that fails on its third call (after two steps had moved its BatchNorm statistics) leaves its
    buffers as they were, and the error names the model and the phase."""

    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.calls = nn.BatchNorm1d(4), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("third call")
            return self.bn(x)

    model, x = Flaky(), torch.randn(5, 4)
    stats = model.bn.running_mean.clone()
    with pytest.raises(profile.ProfileError, match="'Flaky' raised ValueError during the counting pass: third call"):
        profile.profile_model(model, (x,), steps=1, warmup=2, ceilings=CEIL, device="cpu")
    assert torch.equal(model.bn.running_mean, stats) and int(model.bn.num_batches_tracked) == 0


def test_profiling_under_inference_mode_no_grad_and_autocast():
    """Called inside torch.inference_mode (inference tensors carry no version counter), torch.no_grad, or a
    bf16 autocast, the profile runs in that context (autocast: the matmuls are bf16 rows) and restores the state."""
    model, (x,) = pm.train_eval()
    stats = model.bn.running_mean.clone()
    with torch.inference_mode():
        xi = x.clone()
        p = profile_cpu(model, (xi,))
    assert p.flops > 0 and torch.equal(model.bn.running_mean, stats)
    with torch.no_grad():
        p = profile_cpu(model, (x,))
    assert torch.equal(model.bn.running_mean, stats)
    model2, inputs = pm.dit_block()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = profile_cpu(model2, inputs, train=True)
    mms = [o for o in p.ops if o.op in MATMULS and o.counted]
    assert mms and all(o.m.dtype == "bf16" for o in mms)
    assert all(q.grad is None for q in model2.parameters())


def test_rwkv_recurrence_stepped_per_token():
    """Four bias-free projections, 2*B*T*D*D each; four exponentials per token on (B, D) and the decay's own."""
    _, counts, _ = profiled("rwkv", False)
    b, t, d = pm.BATCH, pm.RW_LEN, pm.RW_DIM
    assert flops_of(counts, MATMULS) == 4 * 2 * b * t * d * d
    assert by_op(counts)["aten::exp"] == 4 * t * b * d + d
    assert by_op(counts)["aten::maximum"] == 2 * t * b * d
    assert by_op(counts)["aten::sigmoid"] == b * t * d


def test_switch_moe_counts_only_the_tokens_its_capacity_keeps():
    """Tokens past an expert's capacity are dropped: each expert's two matmuls are 2*n_e*D*H, n_e its kept
    tokens; the router runs twice (routing, balancing loss); index_add_ adds n_e * D; bincount one per token."""
    model, (x,) = pm.switch_moe()
    with torch.no_grad():
        _, expert, keep = model.route(x)
    kept = [int((keep & (expert == e)).sum()) for e in range(pm.SW_EXPERTS)]
    assert sum(kept) < pm.SW_TOKENS  # some tokens were dropped
    t, d, h, e = pm.SW_TOKENS, pm.SW_DIM, pm.SW_HIDDEN, pm.SW_EXPERTS
    _, counts, _ = profiled("switch_moe", False)
    assert flops_of(counts, MATMULS) == sum(2 * 2 * n * d * h for n in kept) + 2 * 2 * t * d * e
    assert by_op(counts)["aten::index_add_"] == sum(kept) * d
    assert by_op(counts)["aten::bincount"] == t
    # backward: w1's gradient (the tokens need none), w2's and its input's; the router's weight gradient per use
    _, train_counts, _ = profiled("switch_moe", True)
    first = sum(2 * n * d * h for n in kept)
    assert flops_of(train_counts, MATMULS) == (1 + 1) * first + (1 + 2) * first + 2 * 2 * 2 * t * d * e


def test_local_attention_band_and_alibi_by_hand_and_by_sdpa():
    """Scores and weighted values by hand (two bmm of 2*B*H*T*T*Dh) and SDPA with a float mask (the math path:
    the same two), the projections 2*B*T*d*3d and 2*B*T*d*d."""
    _, counts, _ = profiled("local_attention", False)
    b, t, h, dh = pm.BATCH, pm.LA_LEN, pm.LA_HEADS, pm.LA_HEAD_DIM
    d = h * dh
    attention = 2 * 2 * b * h * t * t * dh
    assert flops_of(counts, {"aten::bmm", SDPA}) == 2 * attention
    assert flops_of(counts, {"aten::addmm", "aten::mm"}) == 2 * b * t * d * 3 * d + 2 * b * t * d * d
    softmax = flops_of(counts, {"aten::_softmax", "aten::_safe_softmax"})  # by hand, and SDPA's math path
    assert softmax == 2 * formulas.SOFTMAX_FLOPS_PER_ELEMENT * b * h * t * t


def test_dit_block_patchify_modulation_and_attention():
    """The patchify convolution by hand, the adaLN linear 2*B*D*6D, attention 4*B*H*N*N*Dh, qkv, proj, MLP."""
    _, counts, _ = profiled("dit_block", False)
    b, d, m, heads = pm.BATCH, pm.DIT_DIM, pm.DIT_MLP, pm.DIT_HEADS
    n = (pm.DIT_SIDE // pm.DIT_PATCH) ** 2
    assert flops_of(counts, "aten::convolution") == conv(b, pm.DIT_CH, d, n, pm.DIT_PATCH**2)
    linears = 2 * b * d * 6 * d + 2 * b * n * (d * 3 * d + d * d + d * m + m * d)
    assert flops_of(counts, MATMULS) == linears
    assert flops_of(counts, SDPA) == 4 * b * heads * n * n * (d // heads)
    # adaLN's two norms have no affine (elementwise_affine=False): no weight multiply nor bias add (round 24)
    no_affine = formulas.LAYERNORM_FLOPS_PER_ELEMENT - 2 * formulas.NORM_AFFINE_FLOPS_PER_ELEMENT
    assert by_op(counts)["aten::native_layer_norm"] == 2 * no_affine * b * n * d


def test_complex_net_counts_complex_products_as_real_operations():
    """A complex multiply-add is 4 real ones: (B, IN) @ (IN, H) complex is 4 * 2*B*IN*H."""
    _, counts, _ = profiled("complex_net", False)
    b = pm.BATCH
    assert flops_of(counts, MATMULS) == 4 * 2 * b * (pm.CX_IN * pm.CX_HIDDEN + pm.CX_HIDDEN * pm.CX_OUT)
    assert all(c.dtype == "fp32" for (op, _), c in counts.items() if op in MATMULS)  # complex64's parts


def test_integer_ops_are_counted_as_their_own_dtype():
    """torch._int_mm on int8 and bitwise/logical ops on uint8 and bool were labelled fp32 (no floating-point
    operand), and so placed under the fp32 roof even where the device has an int8 one (an H100's int8 peak is 30x
    its fp32 one: an int8 matmul read as far above its roof). Each is now counted as its own dtype; where the device
    has a roof for it, that roof places it; else the step's float roof does, and the row reads as that dtype
    (these CPU ceilings have no int8)."""
    p, counts, _ = profiled("binarized_net", False)
    (int_mm,) = rows_of(counts, "aten::_int_mm")
    assert int_mm.flops == 2 * 17 * pm.BN_IN * pm.BN_HIDDEN and int_mm.dtype == "int8"
    assert int_mm.bytes_read == 17 * pm.BN_IN + pm.BN_IN * pm.BN_HIDDEN  # int8 operands
    assert int_mm.bytes_written == 4 * 17 * pm.BN_HIDDEN  # int32 result
    (xor,) = rows_of(counts, "aten::logical_xor")
    assert xor.dtype == "bool" and xor.flops == pm.BATCH * pm.BN_OUT * pm.BN_HIDDEN
    assert {c.dtype for c in rows_of(counts, "aten::bitwise_and")} == {"int8"}  # uint8: one byte
    row = next(o for o in p.ops if o.op == "aten::_int_mm")
    assert row.m.dtype == "fp32" and row.bound in ("memory", "compute") and row.roof_fraction is not None
    assert next(o for o in p.ops if o.op == "aten::div").m.dtype == "fp32"


def test_momentum_encoder_counts_both_encoders_and_the_queue():
    """Query and key encoders (two linears each), the logits against the queue 2*B*OUT*Q."""
    _, counts, _ = profiled("momentum_encoder", False)
    b, d, o, q = 4, pm.MO_DIM, pm.MO_OUT, pm.MO_QUEUE
    assert flops_of(counts, MATMULS) == 2 * (2 * b * d * d + 2 * b * d * o) + 2 * b * o * q


def test_checkpointed_blocks_are_counted_again_in_backward():
    """torch.utils.checkpoint runs each block's forward again in backward: the training step counts exactly the
    blocks' forward once more than the same model without checkpointing."""
    model, inputs = pm.perceiver()
    step = profile._without_fastpath(profile.make_step(model, inputs, train=True))
    step()  # gradients allocated, as in a profile's counted step
    ours = by_op(counting.count_ops(step))
    plain = by_op(counting.count_ops(_plain(*pm.perceiver())))
    b, lat, d = pm.BATCH, pm.PV_LATENTS, pm.PV_DIM
    more = {op: ours.get(op, 0) - plain.get(op, 0) for op in set(ours) | set(plain) if ours.get(op) != plain.get(op)}
    # the linear and its bias add run again; GELU does not (its backward needs its input, recomputed by then:
    # non-reentrant checkpointing stops recomputing once it has what backward needs)
    assert more.keys() == {"aten::mm", "aten::add"}, more
    assert more["aten::mm"] == pm.PV_BLOCKS * 2 * b * lat * d * d
    assert more["aten::add"] >= pm.PV_BLOCKS * b * lat * d


def _plain(model, inputs):
    """The Perceiver's training step with its blocks called directly (no checkpoint)."""
    (x,) = inputs

    def step():
        lat = model.latents.expand(x.shape[0], -1, -1)
        lat = lat + model.cross(lat, x, x, need_weights=False)[0]
        for block in model.blocks:
            lat = lat + block(lat)
        lat.mean(1).sum().backward()

    step()
    return profile._without_fastpath(step)


def test_a_500_layer_model_counts_every_layer_in_reasonable_time():
    """500 Linear + ReLU layers: 500 addmm calls in one row of 2*B*D*D each, 500 relus; its backward 999 mm
    (no input gradient for the first layer). The profile of one step takes seconds, not minutes."""
    p, counts, _ = profiled("deep", False)
    b, d, n = pm.BATCH, pm.DEEP_DIM, pm.DEEP_LAYERS
    (addmm,) = rows_of(counts, "aten::addmm")
    assert addmm.calls == n and addmm.flops == n * 2 * b * d * d
    assert by_op(counts)["aten::relu"] == n * b * d
    row = next(o for o in p.ops if o.op == "aten::addmm")
    assert row.calls == n and row.m.flops == 2 * b * d * d
    _, train_counts, _ = profiled("deep", True)
    assert flops_of(train_counts, MATMULS) == (n + 2 * n - 1) * 2 * b * d * d
    model, inputs = pm.deep()
    # CPU time: 1.8-3.0 s here, for 12.8-21.4 s of wall time at load 12 (wall time measures the other jobs). 30 s
    # of CPU still fails a profile that grows with the square of the layers; wall time only against a runaway.
    w0, c0 = time.perf_counter(), time.process_time()
    profile.profile_model(model, inputs, steps=1, warmup=0, ceilings=CEIL, device="cpu")
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    assert cpu_s < 30 and wall_s < 600, (cpu_s, wall_s)


def test_dict_of_dataclass_outputs_and_keyword_only_inputs():
    """Inputs as a dict with a keyword-only argument; outputs in a dict, a dataclass and a list next to strings,
    ints and None: the training step differentiates every tensor that requires grad (logits, h, h.sum)."""
    _, counts, _ = profiled("dict_outputs", False)
    b = pm.BATCH
    assert flops_of(counts, MATMULS) == 2 * b * 6 * 5 + 2 * b * 5 * 3
    _, train_counts, _ = profiled("dict_outputs", True)
    # backward: b's input and weight gradients, a's weight gradient (x needs none)
    assert flops_of(train_counts, MATMULS) == 2 * (2 * b * 6 * 5 + 2 * b * 5 * 3) + 2 * b * 5 * 3


def test_neural_ode_rk4_evaluates_its_field_four_times_a_step():
    _, counts, _ = profiled("neural_ode", False)
    b, d, h, s = pm.BATCH, pm.ODE_DIM, pm.ODE_HIDDEN, pm.ODE_STEPS
    assert flops_of(counts, MATMULS) == 4 * s * (2 * b * d * h + 2 * b * h * d)
    assert by_op(counts)["aten::tanh"] == 4 * s * b * h


def test_sinkhorn_cost_matrix_and_logsumexp_iterations():
    """The cost: the embedding 2*(N+M)*D*D, cdist 3 operations per (pair, feature); each iteration two
    logsumexps over the N x M matrix."""
    _, counts, _ = profiled("sinkhorn", False)
    n, m, d = pm.SK_N, pm.SK_M, pm.SK_DIM
    assert flops_of(counts, MATMULS) == 2 * (n + m) * d * d
    assert by_op(counts)["aten::_cdist_forward"] == 3 * n * m * d
    assert by_op(counts)["aten::logsumexp"] == 2 * pm.SK_ITERS * formulas.LOGSUMEXP_FLOPS_PER_ELEMENT * n * m


def test_kan_basis_recursion_and_spline_contraction():
    """The einsum over (input, basis) is one bmm of 2*B*OUT*IN*K, K = grid + order bases; the base path 2*B*IN*OUT."""
    _, counts, _ = profiled("kan", False)
    b, i, o = pm.BATCH, pm.KAN_IN, pm.KAN_OUT
    k = pm.KAN_GRID + pm.KAN_ORDER
    assert flops_of(counts, MATMULS) == 2 * b * o * i * k + 2 * b * i * o


def test_pixel_cnn_masked_convolutions_on_channels_last():
    """Masked convolutions count their full kernels (the zeros are multiplied too), with bias; the mask product
    one FLOP per weight; channels_last changes no count."""
    _, counts, _ = profiled("pixel_cnn", False)
    b, c, pos = pm.BATCH, pm.PX_CH, pm.PX_SIDE**2
    expected = conv(b, 1, c, pos, 49) + 2 * conv(b, c, c, pos, 9) + conv(b, c, 4, pos, 1)
    assert flops_of(counts, "aten::convolution") == expected
    assert by_op(counts)["aten::mul"] == c * 49 + 2 * c * c * 9
    model, (x,) = pm.pixel_cnn()
    contiguous = counting.count_ops(lambda: model.to(memory_format=torch.contiguous_format)(x.contiguous()))
    assert flops_of(contiguous, "aten::convolution") == expected


def test_vector_quantizer_distances_lookup_and_straight_through():
    _, counts, _ = profiled("vector_quantizer", False)
    n, d, k = pm.VQ_TOKENS, pm.VQ_DIM, pm.VQ_CODES
    assert flops_of(counts, MATMULS) == 2 * n * d * d + 2 * n * d * k
    assert by_op(counts)["aten::argmin"] == n * k


def test_a_router_that_drops_every_token_leaves_zero_size_rows_finite():
    """Every intermediate after the router has no rows: the empty matmul counts 0 FLOPs, no row shows NaN
    (0/0 intensity) and the profile renders."""
    p, counts, _ = profiled("drop_everything", False)
    empty = [c for (op, shapes), c in counts.items() if op in MATMULS and shapes and shapes[1][0] == 0]
    assert empty and all(c.flops == 0 for c in empty)
    assert flops_of(counts, MATMULS) == 2 * 5 * 4 * 1
    for o in p.ops:
        assert not math.isnan(o.m.intensity), o.label


def test_train_and_eval_mode_are_different_work_and_the_mode_is_kept():
    """BatchNorm counts its batch statistics only in training (8 FLOPs an element, 4 in eval); Dropout draws
    its mask only in training; the model's mode is what it was after each profile."""
    _, train_mode, _ = profiled("train_eval", False)
    _, eval_mode, _ = profiled("train_eval_in_eval", False)
    elements = pm.BATCH * 4 * 5 * 5
    bn = lambda counts: math.fsum(c.flops for (op, _), c in counts.items() if "batch_norm" in op)  # noqa: E731
    assert bn(train_mode) == formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT * elements
    assert bn(eval_mode) == formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT * elements
    assert "aten::bernoulli_" in {op for op, _ in train_mode} and "aten::bernoulli_" not in {op for op, _ in eval_mode}
    for build, mode in ((pm.train_eval, True), (pm.train_eval_in_eval, False)):
        model, inputs = build()
        for train in (False, True):
            profile_cpu(model, inputs, train=train)
            assert all(m.training == mode for m in model.modules())


def test_meta_models_are_refused_by_name_and_counted_by_count_ops():
    """A model on the meta device failed with "device='meta'; expected 'cpu', ...", an argument the caller had not
    passed; it is refused naming where the meta tensors are, and count_ops (which needs no data) is pointed to.
    count_ops on meta counted every op as a view (meta storages all have the data pointer 0): 0 bytes moved."""
    model = nn.Linear(8, 4, device="meta")
    x = torch.randn(3, 8, device="meta")
    with pytest.raises(profile.ProfileError, match=r"inputs on meta, model parameters on meta.*no data.*count_ops"):
        profile.profile_model(model, (x,), steps=1)
    with pytest.raises(profile.ProfileError, match="model parameters on meta"):
        profile.profile_model(model, (torch.randn(3, 8),), steps=1, device="cpu")
    (row,) = rows_of(counting.count_ops(lambda: model(x)), "aten::addmm")
    assert row.flops == 2 * 3 * 8 * 4
    assert row.bytes_read == 4 * (3 * 8 + 8 * 4 + 4) and row.bytes_written == 4 * 3 * 4
    assert row.dtype == "fp32"


def test_profile_html_renders_round7(tmp_path):
    p, _, _ = profiled("dit_block", True)
    path = profile.profile_html(p, tmp_path / "dit.html")
    text = re.sub(r"data:[^\"']+", "", Path(path).read_text())  # the embedded roofline image's base64 left out
    assert "dit_block" in text and "NaN" not in text and "nan" not in text.split()


def test_ceilings_of_another_device_are_refused_by_name():
    """An H100's ceilings passed to a CPU profile placed every row under the H100's roofs (every op a sliver of
    them); refused, naming both devices. Ceilings named by the device kind ("cpu") or by a name the spec table
    does not know (synthetic ones) are taken as given."""
    model, inputs = pm.vector_quantizer()
    h100 = CEIL.__class__("NVIDIA H100 80GB HBM3", 3e12, {"bf16": 7.5e14}, "now")
    with pytest.raises(profile.ProfileError, match=r"ceilings measured on 'NVIDIA H100 80GB HBM3', but the profile "
                       r"runs on 'cpu.*expected that device's ceilings"):
        profile.profile_model(model, inputs, steps=1, ceilings=h100, device="cpu")
    assert profile.profile_model(model, inputs, steps=1, warmup=0, ceilings=CEIL, device="cpu").flops > 0
    synthetic = CEIL.__class__("a bench rig", 2e10, {"fp32": 2e11}, "now")  # a name the table does not know
    assert profile.profile_model(model, inputs, steps=1, warmup=0, ceilings=synthetic, device="cpu").flops > 0


def test_an_int8_matmul_is_placed_under_the_int8_roof_of_a_gpu():
    """On an H100 (its published roofs) an int8 (256 x 256) product, 85 FLOP/B, sits below the int8 ridge (about
    590 FLOP/B): memory-bound. Labelled fp32 it was placed under the fp32 roof (ridge 20 FLOP/B): compute-bound."""
    a = torch.ones(256, 256, dtype=torch.int8)
    counts = counting.count_ops(lambda: torch._int_mm(a, a))
    key = next(k for k in counts if k[0] == "aten::_int_mm")
    h100 = device.Device("cuda", "NVIDIA H100 80GB HBM3", 0, device.lookup_peaks("NVIDIA H100 80GB HBM3"))
    timed = {key: profile._Timed(1, 1e-6, {0: 1e-6})}
    p = profile._join("int8 product", h100, None, counts, {key}, [(timed, [1e-6], 0.0)], 1e-6, False)
    (row,) = [o for o in p.ops if o.op == "aten::_int_mm"]
    assert row.m.dtype == "int8" and row.m.flops == 2 * 256**3
    assert row.m.intensity == pytest.approx(2 * 256**3 / (3 * 256 * 256 + 2 * 256 * 256))
    assert row.bound == "memory"


def test_inputs_written_in_place_and_input_gradients_are_put_back():
    """A forward that doubles its input in place ran once per step on the caller's tensor (2**steps times its
    value after the profile); a leaf input that requires grad was left with the profile's summed gradient."""

    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.mul_(2) if not x.requires_grad else x * 2)

    x = torch.ones(4, 3)
    profile_cpu(Doubler(), (x,), steps=2)
    assert torch.equal(x, torch.ones(4, 3))
    leaf = torch.ones(4, 3, requires_grad=True)
    profile_cpu(Doubler(), (leaf,), steps=2, train=True)
    assert leaf.grad is None
