"""Round ten, part two: inputs that require grad beside ones that do not, inference tensors, meta and float64 inputs
under ``tilestack.optimize``, ``tilestack.quantize`` on a model with a layer it must refuse, and the planner's
``describe_module`` in the grad modes a caller may be in.

What it found (each test marked so failed before its fix):
- ``tilestack.quantize`` on a model whose later Linear it refuses (an f64 layer, or NaN / inf weights) raised only
  after replacing the layers before it in the caller's model, which then ran half quantized after the error. Every
  QuantLinear is now made before any is set, and the refusal names the layer (``quant/linear.py``);
- ``tilestack.parallel.plan.describe_module`` under ``torch.no_grad()`` or ``torch.inference_mode()`` described every
  layer as keeping no activations for the backward (nothing is saved without grad mode), without a word: the planner
  then under-predicted every plan's memory. It now measures with grad on whatever the caller's mode; an example input
  (or keyword tensor) made under inference_mode failed inside torch ("Inference tensors cannot be saved for
  backward"): copied now; a module whose parameters are inference tensors is refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
from tilestack import config
from tilestack import kernels as K
from tilestack.errors import LaunchError
from tilestack.parallel.plan import describe_module
from tilestack.parallel.plan.describe import PlanError
from tilestack.quant import QuantLinear
from tilestack.torch import ops


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def d(t):
    return t.double()


def rope(x, cos, sin):
    x1, x2 = d(x).chunk(2, -1)
    c, s = d(cos)[None, :, None], d(sin)[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


COS, SIN = K.rotary_tables(5, 16)
W8, B8 = randn(8, seed=1), randn(8, seed=2)


# ---- some inputs require grad, others do not ----------------------------------------------------------------------
def _mixed_cases():
    x, q, k = randn(4, 8), randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=1)
    qa, ka, va = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    h, lm, lab = randn(6, 8), randn(10, 8, seed=1), torch.tensor([1, 0, 9, -100, 2, 5])
    return {
        # name: (every input, which require grad, our op, torch's op)
        "layer_norm bias only": ((x, W8, B8), (2,), ops.layer_norm,
                                 lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5)),
        "layer_norm weight only": ((x, W8, B8), (1,), ops.layer_norm,
                                   lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5)),
        "add_rms_norm r only": ((x, x + 1, W8), (1,), lambda x, r, w: ops.add_rms_norm(x, r, w)[0],
                                lambda x, r, w: F.rms_norm(x + r, (8,), w, 1e-6)),
        "rotary q only": ((q, k, COS, SIN), (0,), lambda *a: ops.rotary(*a)[0], lambda q, k, c, s: rope(q, c, s)),
        "rotary k only, q's output used": ((q, k, COS, SIN), (1,), lambda *a: sum(t.sum() for t in ops.rotary(*a)),
                                           lambda q, k, c, s: rope(q, c, s).sum() + rope(k, c, s).sum()),
        "attention v only": ((qa, ka, va), (2,), lambda q, k, v: tilestack.attention(q, k, v, True),
                             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "attention q and k, not v": ((qa, ka, va), (0, 1), tilestack.attention, F.scaled_dot_product_attention),
        "cross-entropy weight only": ((h, lm), (1,), lambda x, w: ops.fused_linear_cross_entropy(x, w, lab),
                                      lambda x, w: F.cross_entropy(x @ w.T, lab)),
    }


MIXED = _mixed_cases()


@pytest.mark.parametrize("case", list(MIXED))
def test_inputs_that_require_grad_beside_ones_that_do_not(case):
    """The gradients of those that require grad as torch's in float64; the others get none."""
    inputs, wanted, ours, theirs = MIXED[case]
    mine = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    refs = [d(t).requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    y, want = ours(*mine), theirs(*refs)
    torch.testing.assert_close(d(y.detach()), want.detach(), rtol=1e-5, atol=1e-5)
    g = randn(*want.shape, seed=9)
    y.backward(g)
    want.backward(d(g))
    for i, (a, r) in enumerate(zip(mine, refs, strict=True)):
        if i in wanted:
            torch.testing.assert_close(d(a.grad), r.grad, rtol=1e-5, atol=1e-5)
        else:
            assert a.grad is None


# ---- inference tensors ---------------------------------------------------------------------------------------------
def test_attention_with_an_inference_query_and_keys_that_require_grad_fails_as_torch():
    """torch's SDPA cannot save an inference q for the backward: its own RuntimeError, raised by the op too (the
    same words), before any kernel runs."""
    with torch.inference_mode():
        q = randn(1, 2, 5, 16)
    k = randn(1, 2, 7, 16, seed=1).requires_grad_()
    v = randn(1, 2, 7, 16, seed=2)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward") as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward") as ours:
        tilestack.attention(q, k, v)
    assert str(ours.value) == str(theirs.value)


def test_rotary_with_an_inference_q_trains_k_as_torch():
    """rotary saves only its tables: an inference q beside a k that requires grad takes k's gradient as torch's
    rotate-half does."""
    with torch.inference_mode():
        q = randn(2, 5, 3, 16)
    k = randn(2, 5, 1, 16, seed=1).requires_grad_()
    kr = d(k.detach()).requires_grad_()
    qo, ko = ops.rotary(q, k, COS, SIN)
    assert ko.requires_grad
    g = randn(2, 5, 1, 16, seed=3)
    ko.backward(g)
    rope(kr, COS, SIN).backward(d(g))
    torch.testing.assert_close(d(k.grad), kr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d(qo), rope(q, COS, SIN), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["attention", "layer_norm", "swiglu", "cross-entropy"])
def test_ops_inside_inference_mode_on_leaves_that_require_grad(op):
    """Inside torch.inference_mode grad is off: the result of torch's value, an inference tensor with no grad_fn
    (torch's ops give the same), whatever the leaves require."""
    q, x = randn(1, 2, 5, 16).requires_grad_(), randn(4, 8).requires_grad_()
    lab = torch.tensor([1, 0, 9, 3])
    ours, theirs = {
        "attention": (lambda: tilestack.attention(q, q, q, True),
                      lambda: F.scaled_dot_product_attention(d(q), d(q), d(q), is_causal=True)),
        "layer_norm": (lambda: ops.layer_norm(x, W8, B8), lambda: F.layer_norm(d(x), (8,), d(W8), d(B8), 1e-5)),
        "swiglu": (lambda: ops.swiglu(x), lambda: F.silu(d(x)[:, :4]) * d(x)[:, 4:]),
        "cross-entropy": (lambda: ops.fused_linear_cross_entropy(x, randn(10, 8), lab),
                          lambda: F.cross_entropy(d(x) @ d(randn(10, 8)).T, lab)),
    }[op]
    with torch.inference_mode():
        y = ours()
        want = theirs()
    assert y.is_inference() and y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(d(y), want, rtol=1e-5, atol=1e-5)


# ---- tilestack.optimize on meta and float64 inputs ----------------------------------------------------------------
def _norm_model(x):
    return F.rms_norm(x, (8,), None, 1e-6)


@pytest.fixture
def fresh_graphs():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_optimize_leaves_a_float64_norm_to_inductor_with_torchs_answer(fresh_graphs):
    """The kernels take f32/bf16/f16: an f64 norm is left (the report says why) and Inductor answers, as torch."""
    x = randn(4, 8, dtype=torch.float64)
    got = tilestack.optimize(_norm_model, min_rows=1)(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.rms_norm(x, (8,), None, 1e-6), rtol=1e-12, atol=1e-12)
    report = str(tilestack.compile.last_report())
    assert "rms_norm: x has dtype float64; expected one of float32, bfloat16, float16" in report


def test_optimize_on_meta_inputs_gives_torchs_meta_result(fresh_graphs):
    got = tilestack.optimize(_norm_model, min_rows=1)(torch.empty(4, 8, device="meta"))
    assert got.is_meta and got.shape == (4, 8) and got.dtype == torch.float32


@pytest.mark.parametrize("scale", [0.0, -0.25, math.nan])
def test_optimize_leaves_explicit_attention_with_a_scale_the_kernels_refuse(scale, fresh_graphs):
    """softmax(q k^T * scale) @ v with a scale of 0, below 0 or NaN: not swapped for the attention kernels (which
    refuse it, named in the report); the answer is torch's, NaN where torch's is."""
    def explicit(q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, -1) @ v

    q = randn(1, 2, 8, 16)
    got = tilestack.optimize(explicit, min_rows=1, min_query_rows=1)(q, q, q)
    want = explicit(d(q), d(q), d(q))
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(d(got).nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)
    assert f"scale must be a positive number or None, got {scale!r}" in str(tilestack.compile.last_report())


# ---- tilestack.quantize on a model with a layer it refuses --------------------------------------------------------
def _model(bad: str):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if bad == "f64":
        m[2] = m[2].double()
    else:
        with torch.no_grad():
            m[2].weight[3, 1] = {"nan": math.nan, "inf": math.inf}[bad]
    return m


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("bad", ["f64", "nan", "inf"])
def test_quantize_refusing_a_layer_leaves_the_model_unchanged(bad, mode):
    """Before: layer 0 was already a QuantLinear in the caller's model when layer 2 was refused, so the model ran
    half quantized after the error. Now the refusal names layer '2' and every layer is still the float one."""
    model = _model(bad)
    layers = list(model)
    with pytest.raises(LaunchError, match=r"quantize: layer '2' cannot be quantized \(the model is left "
                                          r"unchanged\): quantize_weight: w"):
        tilestack.quantize(model, mode)
    assert list(model) == layers and not any(isinstance(m, QuantLinear) for m in model)


def test_quantize_skipping_the_layer_it_would_refuse_quantizes_the_rest():
    model = _model("f64")
    q = tilestack.quantize(model, "int8", skip=("2",))
    assert [type(m).__name__ for m in q] == ["QuantLinear", "ReLU", "Linear", "ReLU", "QuantLinear"]


# ---- describe_module in every grad mode ---------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def _summary(desc):
    return [(layer.name, layer.params, layer.flops_fwd, dict(layer.act_bytes), layer.out_bytes)
            for layer in desc.layers]


@pytest.fixture(scope="module")
def described():
    """The description made in plain grad mode: what the GELU and the Linears keep for the backward, by hand below."""
    return _summary(describe_module(_net(), randn(4, 16)))


def test_the_description_counts_what_the_backward_keeps(described):
    """The independent count: layer 0 keeps its input (16 f32 per sample), the GELU its input (32), the last Linear
    its input (32) unless recomputed ("full": the input of every layer is kept)."""
    acts = [layer[3] for layer in described]
    assert acts[0]["none"] == 16 * 4 and acts[1]["none"] == 32 * 4 and acts[2]["none"] == 32 * 4


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_describe_module_measures_training_whatever_the_callers_grad_mode(mode, described):
    """Before: under no_grad / inference_mode nothing was saved, and every layer was described as keeping nothing
    for the backward (the planner's memory predictions fell short without a word)."""
    net, x = _net(), randn(4, 16)
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        got = _summary(describe_module(net, x))
    assert got == described


def test_describe_module_takes_an_example_made_under_inference_mode(described):
    """An example input (and a keyword tensor) made under inference_mode: before, torch's "Inference tensors cannot
    be saved for backward" from inside the measurement."""
    with torch.inference_mode():
        x = randn(4, 16)
    assert _summary(describe_module(_net(), x)) == described

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x, *, scale):
            return self.lin(x) * scale

    with torch.inference_mode():
        scale = torch.full((4, 16), 2.0)
    plain = _summary(describe_module(Scaled(), randn(4, 16), example_kwargs={"scale": torch.full((4, 16), 2.0)}))
    assert _summary(describe_module(Scaled(), randn(4, 16), example_kwargs={"scale": scale})) == plain


def test_describe_module_refuses_a_module_of_inference_tensors_by_name():
    with torch.inference_mode():
        net = _net()
    with pytest.raises(PlanError, match=r"describe_module: module Sequential has 4 inference tensors \('0.weight', "
                                        r"...: made under torch.inference_mode\); expected a module built outside"):
        describe_module(net, randn(4, 16))
