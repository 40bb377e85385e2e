"""Eighth held-out round, second set of models (tests/perf/perf_models_round8b.py): LoRA on a frozen MLP, reentrant
activation checkpointing, hooks, a detection loss that consumes its target dicts, a float16/float32 net, a
hypernetwork through torch.func.functional_call, and nn.TransformerDecoderLayer with a causal target. Every count is
written from the layer shapes here (2*M*N*K; attention 4*B*H*Nq*Nkv*D, half of it when causal).

What the set found (pinned by the test whose docstring says so):
- a forward that consumes its inputs (pops a key off each target dict and rebinds its boxes, as detection losses
  do) failed under profile_model with "raised KeyError during the counting pass: 'ignore'": every step was called
  with the same containers, which the first step had emptied; and the caller's targets were left changed (keys
  gone, boxes scaled by each step). Each step now gets containers of its own (``profile._fresh``);
- the random state moved on from step to step: a sampler drawing tokens until an end token did different work in
  the counted step and in each timed one (6 draws joined with steps of 1 to 30); every step now draws the same
  numbers (``profile_state.same_draws``); likewise a decoder's KV cache grew with every step (the counted step
  attended over 2 cached tokens, the timed ones over 3, 4, ...): every step now starts from the Python-side
  state the warm-up left (``profile_state.same_state``);
- the training step's loss took .float() of each output: a complex output lost its imaginary part, with torch's
  "Casting complex values to real discards the imaginary part" warning on every step.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from tilestack.perf import counting, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round8b as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, profile_cpu, setup_round  # noqa: E402
from profile_support import (  # noqa: E402
    NOT_AS_TORCH,
    assert_as_torch_counts,
    assert_rows_add_up,
    assert_rows_finite,
    by_op,
    flops_of,
    rendered,
    silent_zeros,
)

pytestmark = FILTERS
CASES, IDS, profiled = setup_round(pm.MODELS)
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::_to_copy", "aten::new_zeros", "aten::full", "aten::triu", "aten::cat",
    "aten::masked_fill_", "aten::select_backward", "aten::slice_backward", "aten::embedding",
    "aten::multinomial", "aten::_local_scalar_dense",  # a random draw; the end test's bool read to the host
}
MATMULS = {"aten::mm", "aten::addmm"}
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step, no work counted as free, torch's formulas agreed with, every number finite
    and >= 0, and each row placed by its intensity against its dtype's ridge."""
    p, counts, theirs = profiled(name, train)
    assert_rows_add_up(p, counts)
    assert p.ops and p.flops > 0 and not p.unsupported
    assert not silent_zeros(counts, DATA_MOVEMENT), silent_zeros(counts, DATA_MOVEMENT)
    assert_as_torch_counts(counts, theirs, NOT_AS_TORCH)
    assert_rows_finite(p)
    for o in p.ops:
        if o.counted and o.m.flops > 0:
            assert o.bound == ("compute" if o.m.intensity >= RIDGE else "memory"), (o.label, o.m.intensity)
    assert math.isfinite(p.step_s) and p.step_s > 0
    rendered(p)


def test_lora_trains_only_its_low_rank_factors():
    """Forward: each layer's frozen base 2*B*I*O and its adapter 2*B*I*r + 2*B*r*O. Backward: each adapter's two
    weight gradients and the gradient through it; the second layer's base passes the gradient on to the first
    (2*B*O*I), the first layer's base computes nothing (its weight is frozen, its input needs no gradient)."""
    _, counts, _ = profiled("lora_mlp", False)
    b, r = pm.BATCH, pm.LORA_RANK
    layers = [(pm.LORA_IN, pm.LORA_HIDDEN), (pm.LORA_HIDDEN, pm.LORA_OUT)]
    adapters = sum(2 * b * i * r + 2 * b * r * o for i, o in layers)
    assert flops_of(counts, MATMULS) == sum(2 * b * i * o for i, o in layers) + adapters
    _, train_counts, _ = profiled("lora_mlp", True)
    (i1, _), (i2, o2) = layers
    backward = adapters + (adapters - 2 * b * i1 * r) + 2 * b * o2 * i2  # weights; inputs (not x's); l2's base
    assert flops_of(train_counts, MATMULS) == flops_of(counts, MATMULS) + backward


def test_reentrant_checkpoint_runs_each_block_twice_in_training():
    """use_reentrant=True: the forward under no_grad, then each block again inside the backward: 2x the forward's
    addmm and tanh, and the backward's two matmuls per block."""
    _, counts, _ = profiled("reentrant_checkpoint", False)
    b, d, n = pm.BATCH, pm.CK_DIM, pm.CK_BLOCKS
    assert by_op(counts)["aten::addmm"] == n * 2 * b * d * d
    _, train_counts, _ = profiled("reentrant_checkpoint", True)
    assert by_op(train_counts)["aten::addmm"] == 2 * n * 2 * b * d * d
    assert by_op(train_counts)["aten::tanh"] == 2 * n * b * d
    assert by_op(train_counts)["aten::mm"] == n * 2 * (2 * b * d * d)


def test_hooks_work_is_counted():
    """The pre-hook's doubling, the forward hook's shift and the backward hook's halving are counted with the
    layers they wrap."""
    _, counts, _ = profiled("hooked", False)
    b, i, h, o = pm.BATCH, pm.HK_IN, pm.HK_HIDDEN, pm.HK_OUT
    assert by_op(counts)["aten::mul"] == b * i and by_op(counts)["aten::add"] == b * o
    _, train_counts, _ = profiled("hooked", True)
    assert by_op(train_counts)["aten::mul"] == 3 * b * i  # doubling, its gradient, the backward hook's halving
    assert flops_of(train_counts, MATMULS) == 3 * (2 * b * i * h + 2 * b * h * o)  # x requires grad: all three


def test_a_forward_that_consumes_its_target_dicts_is_profiled_and_the_targets_kept():
    """The detection loss pops "ignore" off each target and rebinds its boxes. Every step was called with the same
    dicts: the second call failed ("raised KeyError during the counting pass: 'ignore'") and the caller's targets
    were left without their keys and with boxes scaled. Each step now gets its own containers."""
    model, (features, targets) = pm.detection_loss()
    boxes = [t["boxes"] for t in targets]
    p = profile_cpu(model, (features, targets), steps=2, train=True)
    assert all(set(t) == {"boxes", "ignore"} for t in targets)
    assert all(t["boxes"] is b for t, b in zip(targets, boxes, strict=True))
    step = profile.make_step(model, (features, targets), train=True)
    step()  # as the profile's warm-up: the gradients exist, so the counted step adds into them
    counts = counting.count_ops(step)
    assert flops_of(counts, "aten::addmm") == sum(2 * n * pm.DET_FEAT * 4 for n in pm.DET_BOXES)
    assert p.flops == pytest.approx(sum(c.flops for c in counts.values()))


def test_fresh_containers_keep_their_types():
    """A namedtuple, an OrderedDict and a defaultdict (with its factory) stay what they were, around the same
    tensors."""
    import collections

    point = collections.namedtuple("Point", "x y")
    x = torch.randn(2)
    inputs = (point(x, [x]), collections.OrderedDict(a=x), collections.defaultdict(list, b=[x]))
    fresh = profile._fresh(inputs)
    assert type(fresh[0]) is point and fresh[0].x is x and fresh[0].y is not inputs[0].y and fresh[0].y[0] is x
    assert type(fresh[1]) is collections.OrderedDict and fresh[1]["a"] is x and fresh[1] is not inputs[1]
    assert fresh[2].default_factory is list and fresh[2]["b"][0] is x and fresh[2]["b"] is not inputs[2]["b"]


def test_float16_and_float32_layers_are_rows_of_their_own_dtype():
    """The float16 layer's addmm is an fp16 row (2-byte operands), the float32 one fp32; each placed under its
    own roof; the cast between them moves 2 bytes in and 4 out per element."""
    p, counts, _ = profiled("mixed_half", False)
    b, i, h, o = pm.BATCH, pm.MIX_IN, pm.MIX_HIDDEN, pm.MIX_OUT
    (half,) = [c for (op, shapes), c in counts.items() if op == "aten::addmm" and shapes[1] == (b, i)]
    assert half.dtype == "fp16" and half.flops == 2 * b * i * h
    assert half.bytes_read == 2 * (h + b * i + i * h) and half.bytes_written == 2 * b * h
    (single,) = [c for (op, shapes), c in counts.items() if op == "aten::addmm" and shapes[1] == (b, h)]
    assert single.dtype == "fp32" and single.flops == 2 * b * h * o
    (cast,) = [c for (op, _), c in counts.items() if op == "aten::_to_copy"]
    assert cast.bytes_read == 2 * b * h and cast.bytes_written == 4 * b * h
    assert {o.m.dtype for o in p.ops if o.op == "aten::addmm"} == {"fp16", "fp32"}


def test_hypernetwork_generates_and_uses_the_target_weights():
    """The hypernetwork's linear makes all P target parameters (2*TASK*P); the target runs on them (2*B*I*H +
    2*B*H*O); its own parameters get no gradient, the hypernetwork's does (2*P*TASK)."""
    _, counts, _ = profiled("hypernetwork", False)
    b, t, i, h, o = pm.BATCH, pm.HN_TASK, pm.HN_IN, pm.HN_HIDDEN, pm.HN_OUT
    params = i * h + h + h * o + o
    assert flops_of(counts, MATMULS) == 2 * t * params + 2 * b * i * h + 2 * b * h * o
    model, inputs = pm.hypernetwork()
    profile_cpu(model, inputs, train=True)
    assert all(q.grad is None for q in model.parameters())  # the profile's gradients are not left behind
    _, train_counts, _ = profiled("hypernetwork", True)
    # backward: the second target layer's input and weight gradients, the first's weight gradient, the hyper's
    backward = 2 * (2 * b * h * o) + 2 * b * i * h + 2 * params * t
    assert flops_of(train_counts, MATMULS) == flops_of(counts, MATMULS) + backward


def test_causal_decoder_self_attention_is_halved_and_cross_attention_is_not():
    """tgt_is_causal with its mask: self-attention through SDPA's is_causal (half of 4*B*H*T*T*Dh), cross-attention
    over the padded memory with a mask (all of 4*B*H*T*M*Dh); the projections and FFN by hand."""
    _, counts, _ = profiled("causal_decoder", False)
    b, d, h, f, t, m = pm.BATCH, pm.DEC_DIM, pm.DEC_HEADS, pm.DEC_FF, pm.DEC_TGT, pm.DEC_MEM
    self_attn, cross = (c.flops for (op, _), c in counts.items() if op == SDPA)
    assert self_attn == 4 * b * h * t * t * (d // h) / 2
    assert cross == 4 * b * h * t * m * (d // h)
    # self-attention's packed q, k, v and its output; cross-attention's q, its packed k, v and its output
    projections = 2 * b * t * d * 3 * d + 2 * b * t * d * d + 2 * b * t * d * d + 2 * b * m * d * 2 * d \
        + 2 * b * t * d * d
    assert flops_of(counts, MATMULS) == projections + 2 * (2 * b * t * d * f)


def test_a_complex_output_is_differentiated_in_both_parts_without_a_warning():
    """The training step summed each output's .float(): for a complex output that dropped the imaginary part, with
    torch's "Casting complex values to real discards the imaginary part" warning on every step. Both parts are
    summed now (view_as_real): 2 adds per complex element, and no warning."""
    import warnings

    class ComplexOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))

        def forward(self, z):
            return z @ self.w  # (2, 3) complex

    model, z = ComplexOut(), torch.randn(2, 4, dtype=torch.cfloat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile_cpu(model, (z,), train=True)
        counts = counting.count_ops(profile.make_step(model, (z,), train=True))
    (loss_sum,) = [c for (op, shapes), c in counts.items() if op == "aten::sum"]
    assert loss_sum.flops == 2 * 2 * 3
    assert flops_of(counts, "aten::mm") == 2 * 4 * (2 * 2 * 4 * 3)  # forward, and the weight's gradient: complex


def test_a_sampler_does_the_same_work_in_every_step():
    """Tokens are drawn until the end token: the number of steps depends on the draws. The RNG moved on from step to
    step, so the counted step (6 draws, say) was joined with timed steps of 1 to 30: each row's time per call was a
    median over different work. Every step now starts from the same random state: the same draws, the same work,
    counted and timed; and the profile leaves the RNG where it was."""
    model, (tokens,) = pm.sampler()
    draws: list[int] = []  # output projections per call, recorded outside the model
    model.out.register_forward_hook(lambda m, args, out: draws.append(1))
    state = torch.get_rng_state()
    p = profile_cpu(model, (tokens,), steps=4)
    assert torch.equal(torch.get_rng_state(), state)
    (row,) = [o for o in p.ops if o.op == "aten::addmm"]
    calls = int(row.calls)
    # warm-up, counting pass, the profiler's discarded step, 4 timed steps: each the counted step's calls
    assert calls > 1 and draws == [1] * (calls * (1 + 1 + 1 + 4))
    assert row.m.flops == 2 * pm.SAMPLE_DIM * pm.SAMPLE_VOCAB


def test_a_cached_decoder_does_the_same_work_in_every_step():
    """Each call appends to the KV cache (and writes the static cache at a position counter): the counted step
    attended over 2 cached tokens, the timed steps over 3, 4, ... (and past the static cache's end, had the profile
    run 64 steps). Every step now starts from the state the warm-up left: the same cache length in the counted
    step and every timed one; after the profile the caches and counter are as they were."""
    model, (x,) = pm.cached_decoder()
    lengths: list[int] = []  # the cache length each call attends over, recorded outside the model
    model.register_forward_hook(lambda m, args, out: lengths.append(m.k_cache.shape[1]))
    p = profile_cpu(model, (x,), steps=4)
    # warm-up, counting pass, the profiler's discarded step, 4 timed steps
    assert lengths == [1] + [2] * (1 + 1 + 4)
    assert model.k_cache.shape == (1, 0, pm.KV_DIM) and model.pos == 0 and not model.static.any()
    scores = [o for o in p.ops if o.op == "aten::bmm" and o.shapes[1][-1] == 2]  # q (1, 1, D) @ k^T (1, D, 2)
    assert scores and scores[0].m.flops == 2 * 1 * pm.KV_DIM * 2
    with torch.no_grad():
        first = model(x)
    fresh, (x2,) = pm.cached_decoder()
    with torch.no_grad():
        assert torch.equal(first, fresh(x2))  # the next call is the unprofiled model's first
