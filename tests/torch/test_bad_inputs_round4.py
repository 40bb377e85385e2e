"""Round four of the bad-input sweep of the PyTorch-facing API (``tilestack.attention``, the SDPA drop-in, the ops
of ``tilestack.torch.ops``, the kernels they call, ``tilestack.quantize`` and ``tilestack.optimize``), as an outside
user calls it, on the reference backend, each behaviour against torch's own answer (in float64 where it computes).

What rounds 1-3 did not reach, and what it found (each test below failed before its fix, except the sweeps and
guards that pin answers already right):
- double backward: a gradient made with ``create_graph=True`` and differentiated again (a gradient penalty) read
  the kernels' gradients as constants, so the second-order terms were silently missing; now a LaunchError names
  the op when that gradient is differentiated (rotary, linear in q and k, gets an exact double backward);
- the plan caches keyed scalars by value alone (True == 1 == 1.0): ``eps=True``, ``causal=1``, ``scale=True`` or
  ``ignore_index=-100.0`` were refused on a first call and answered once an equal value of another type had
  passed;
- NumPy numbers (``np.float32`` eps or x_scale) refused as not numbers; subnormal weight rows quantized with scale
  0 (fp8: NaN weights); the SDPA drop-in refused head dims of 0 and failed to compile under fullgraph=True when it
  handed a call to torch; a norm planned under inference_mode crashed the next no_grad call; a compiled quantized
  model with an input requiring grad failed to compile; attention refused a mask requiring grad under no_grad and,
  compiled, gave it no gradient without a word;
- what must give torch's answer (it did, and now a test says so): non-contiguous, transposed, expanded (stride 0),
  offset and channels-last inputs, requires_grad in every combination of the inputs, bf16/fp16 with f32 weights or
  masks, all-masked and -inf rows, broadcast masks, gradients scaled by the loss's incoming gradient, and
  torch.compile(fullgraph=True) over every op.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import attention_forward, rotary_tables
from tilestack.kernels import layer_norm as kernel_layer_norm
from tilestack.kernels.rotary import reference as rotary_reference
from tilestack.torch import ops


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rn(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _ln(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _swiglu(x):
    f = x.shape[-1] // 2
    return F.silu(x[..., :f]) * x[..., f:]


def _sdpa64(q, k, v, **kw):
    kw = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def _ce64(x, w, labels, ignore_index=-100):
    return F.cross_entropy(x.double() @ w.double().T, labels, ignore_index=ignore_index)


def _outputs_and_grads(fn, tensors, which, seed=9):
    """fn's outputs (as a tuple) and the float64 gradients of a random weighting of them with respect to the
    tensors at positions ``which`` (the others do not require grad)."""
    leaves = [t.detach().clone().requires_grad_(i in which) for i, t in enumerate(tensors)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [leaves[i] for i in which])
    return [o.detach().double() for o in outs], [g.double() for g in grads]


def _assert_as_torch(ours, theirs, tensors, which, tol):
    (o1, g1), (o2, g2) = _outputs_and_grads(ours, tensors, which), _outputs_and_grads(theirs, tensors, which)
    for a, b in zip([*o1, *g1], [*o2, *g2], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True)


# ---- double backward ---------------------------------------------------------------------------------------------
def _double_backward_cases():
    x, r, w, b = randn(3, 4, 8), randn(3, 4, 8, seed=1), randn(8, seed=2), randn(8, seed=3)
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    h, lm, labels = randn(6, 8), randn(10, 8, seed=1), torch.tensor([0, 1, 2, 3, 9, -100])
    return {
        "rms_norm": (lambda x, w: ops.rms_norm(x, w), (x, w)),
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b), (x, w, b)),
        "add_rms_norm": (lambda x, r, w: ops.add_rms_norm(x, r, w)[0], (x, r, w)),
        "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)[0], (x, r, w, b)),
        "swiglu": (ops.swiglu, (x,)),
        "attention": (tilestack.attention, (q, k, v)),
        "fused_linear_cross_entropy": (lambda h, lm: ops.fused_linear_cross_entropy(h, lm, labels), (h, lm)),
    }


DOUBLE = _double_backward_cases()


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("op", list(DOUBLE))
def test_double_backward_is_refused_by_name(op, path):
    """A gradient penalty through a kernel's backward: its gradient was a constant to autograd (no grad_fn, or one
    through the incoming gradient alone), so the penalty's second-order terms were dropped without a word. Now
    that gradient carries a node that raises, naming the op; the first gradient is still the usual one. The
    custom-op path (tensor subclasses such as nn.Parameter, and torch.compile) raises the same way."""
    fn, tensors = DOUBLE[op]
    leaves = [torch.nn.Parameter(t.clone()) if path == "custom_op" else t.clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    first = torch.autograd.grad((y * randn(*y.shape, seed=7)).sum(), leaves[0], create_graph=True)[0]
    assert first.requires_grad, "the first gradient must carry the node that refuses a second backward"
    penalty = (first ** 2).sum() + y.sum()
    name = op.removeprefix("add_")            # the custom-op path's backward op is the plain norm's
    with pytest.raises((LaunchError, RuntimeError), match=f"{name}: double backward is not supported"):
        penalty.backward()


def test_double_backward_leaves_the_first_gradient_as_before():
    """create_graph=True alone (no second backward) gives the same gradient as without it."""
    x, w = randn(3, 8), randn(8, seed=1)
    grads = []
    for create_graph in (False, True):
        xs = x.clone().requires_grad_()
        y = ops.rms_norm(xs, w)
        grads.append(torch.autograd.grad((y * randn(3, 8, seed=2)).sum(), xs, create_graph=create_graph)[0])
    torch.testing.assert_close(grads[0], grads[1].detach(), atol=0, rtol=0)


def test_rotary_double_backward_is_exact():
    """Rotary is linear in q and k, so its backward (the opposite rotation) is recorded under create_graph: a
    gradient penalty's second derivative matches the plain-torch rotation's."""
    cos, sin = rotary_tables(5, 16)
    got = []
    for rotate in (lambda q, k: ops.rotary(q, k, cos, sin),
                   lambda q, k: (rotary_reference(q, cos, sin), rotary_reference(k, cos, sin))):
        q, k = randn(2, 5, 3, 16).requires_grad_(), randn(2, 5, 1, 16, seed=1).requires_grad_()
        qr, kr = rotate(q, k)
        gq, gk = torch.autograd.grad((qr ** 3).sum() + (kr ** 3).sum(), (q, k), create_graph=True)
        ((gq ** 2).sum() + (gk ** 2).sum()).backward()
        got.append((q.grad, k.grad))
    for a, b in zip(got[0], got[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ---- plan caches keyed by type as well as value --------------------------------------------------------------------
def _equal_values_of_another_type():
    """(good call, bad call, fragment): the bad call's argument equals the good one's (True == 1, -100.0 == -100)
    but is refused when called first."""
    x, w, b = randn(4, 8), randn(8, seed=1), randn(8, seed=2)
    q, k, v = randn(1, 1, 4, 16), randn(1, 1, 4, 16, seed=1), randn(1, 1, 4, 16, seed=2)
    h, lm, labels = randn(6, 8), randn(10, 8, seed=1), torch.tensor([0, 1, 2, 3, 9, -100])
    ce = ops.fused_linear_cross_entropy
    return {
        "rms_norm eps": (lambda: ops.rms_norm(x, w, 1), lambda: ops.rms_norm(x, w, True), "eps must be a number"),
        "layer_norm eps": (lambda: ops.layer_norm(x, w, b, 1), lambda: ops.layer_norm(x, w, b, True), "eps must be"),
        "kernels.layer_norm eps": (lambda: kernel_layer_norm(x, w, b, 1), lambda: kernel_layer_norm(x, w, b, True),
                                   "eps must be a finite number"),
        "attention_forward causal": (lambda: attention_forward(q, k, v, True), lambda: attention_forward(q, k, v, 1),
                                     "causal must be a bool, got 1"),
        "attention_forward scale": (lambda: attention_forward(q, k, v, scale=1),
                                    lambda: attention_forward(q, k, v, scale=True), "scale must be a positive number"),
        "fused_linear_cross_entropy ignore_index": (lambda: ce(h, lm, labels, -100), lambda: ce(h, lm, labels, -100.0),
                                                    "ignore_index must be an int"),
    }


EQUAL_VALUES = _equal_values_of_another_type()


@pytest.mark.parametrize("case", list(EQUAL_VALUES))
def test_a_refused_value_stays_refused_after_an_equal_one_passed(case):
    good, bad, fragment = EQUAL_VALUES[case]
    with pytest.raises(LaunchError, match=fragment):
        bad()
    good()
    with pytest.raises(LaunchError, match=fragment):
        bad()


# ---- NumPy numbers, subnormal weights, head dim 0 in the drop-in ---------------------------------------------------
def test_numpy_scalars_are_numbers():
    """eps and x_scale as NumPy numbers (np.float32(1e-5) from a config array) were refused as "must be a number
    >= 0, got np.float32(1e-05)" by the norms and the quantized GEMM (np.float64, a float subclass, passed); they
    give what the Python float gives."""
    from tilestack.quant import quantize_weight, quantized_linear
    from tilestack.quant.producers import norm_fp8

    x, w, b = randn(4, 8), randn(8, seed=1), randn(8, seed=2)
    for eps in (np.float32(1e-5), np.int64(0)):
        torch.testing.assert_close(ops.rms_norm(x, w, eps), ops.rms_norm(x, w, float(eps)), atol=0, rtol=0)
        torch.testing.assert_close(ops.layer_norm(x, w, b, eps), _ln(x, w, b, float(eps)), atol=1e-5, rtol=1e-5)
    q, s = quantize_weight(randn(6, 8, seed=3), "fp8")
    got = quantized_linear(x, q, s, x_scale=np.float32(0.01))
    torch.testing.assert_close(got, quantized_linear(x, q, s, x_scale=float(np.float32(0.01))), atol=0, rtol=0)
    y8, _ = norm_fp8(x, w, b, np.float32(1e-5), np.float32(0.01))
    torch.testing.assert_close(y8.float(), norm_fp8(x, w, b, 1e-5, float(np.float32(0.01)))[0].float(), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_weight_of_subnormal_rows(mode):
    """A row whose largest |w| is below 448 (or 127) times f32's smallest normal had scale amax / top = 0: fp8
    quantized 0 / 0 to NaN and every output of the channel was NaN. The scale is now at least f32's smallest
    normal: such rows quantize to (near) zero, as their products are."""
    from tilestack.quant import quantize_weight, quantized_linear

    w = randn(6, 8, seed=4) * 1e-44
    w[0, 1] = 0.0
    q, s = quantize_weight(w, mode)
    assert bool((s > 0).all()) and not q.float().isnan().any()
    x = randn(5, 8)
    y = quantized_linear(x, q, s)
    assert y.isfinite().all()
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=1e-40, rtol=0)


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")
@pytest.mark.parametrize("dims", [(0, 8), (16, 0), (0, 0)], ids=["D0", "Dv0", "both0"])
def test_sdpa_drop_in_head_dim_zero_as_torch(dims):
    """Head dims of 0, which torch answers (zeros, or the mean of v), went to the kernels, which refuse them; the
    drop-in hands them to torch."""
    d, dv = dims
    q, k, v = randn(1, 2, 5, d), randn(1, 2, 7, d, seed=1), randn(1, 2, 7, dv, seed=2)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(tilestack.scaled_dot_product_attention(q, k, v), want)


# ---- torch.compile(fullgraph=True) over the ops ----------------------------------------------------------------------
def _compiled_cases():
    x, w, b = randn(4, 8), randn(8, seed=1), randn(8, seed=2)
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    h, lm, labels = randn(6, 8), randn(10, 8, seed=1), torch.tensor([0, 1, 2, 3, 9, -100])
    mask = torch.ones(5, 7, dtype=torch.bool).tril()
    return {
        "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda x, w: _rn(x, w), (x, w)),
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b), _ln, (x, w, b)),
        "add_rms_norm": (lambda x, w: ops.add_rms_norm(x, 2 * x, w), lambda x, w: (_rn(3 * x, w), 3 * x), (x, w)),
        "swiglu": (ops.swiglu, _swiglu, (x,)),
        "attention masked": (lambda q, k, v: tilestack.attention(q, k, v, attn_mask=mask),
                             lambda q, k, v: _sdpa64(q, k, v, attn_mask=mask), (q, k, v)),
        "attention causal": (lambda q, k, v: tilestack.attention(q, k, v, True),
                             lambda q, k, v: _sdpa64(q, k, v, is_causal=True), (q, k, v)),
        "fused_linear_cross_entropy": (lambda h, lm: ops.fused_linear_cross_entropy(h, lm, labels),
                                       lambda h, lm: _ce64(h, lm, labels), (h, lm)),
    }


COMPILED = _compiled_cases()


@pytest.mark.parametrize("op", list(COMPILED))
def test_compiled_fullgraph_as_torch(op):
    """torch.compile(fullgraph=True) keeps each op in one graph, forward and backward, with torch's answer."""
    ours, theirs, tensors = COMPILED[op]
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _assert_as_torch(compiled, theirs, tensors, list(range(len(tensors))), 1e-4)


def test_compiled_fullgraph_bad_input_names_the_argument():
    """A bad argument inside a fullgraph compile: Dynamo cannot put a raise in a graph, so it reports an
    Unsupported error, whose text carries tilestack's message (the argument, what was given and expected)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: ops.rms_norm(x, w), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=re.escape("rms_norm: weight has 7 elements; expected x.shape[1] = 8")):
        compiled(randn(4, 8), randn(7))


# ---- inference mode --------------------------------------------------------------------------------------------------
def _inference_then_no_grad_cases():
    w, b = randn(8, seed=1), randn(8, seed=2)
    return {
        "rms_norm": (lambda x: ops.rms_norm(x, w), lambda x: _rn(x, w)),
        "layer_norm": (lambda x: ops.layer_norm(x, w, b), lambda x: _ln(x, w, b)),
        "add_rms_norm": (lambda x: ops.add_rms_norm(x, 2 * x, w), lambda x: (_rn(3 * x, w), 3 * x)),
        "add_layer_norm": (lambda x: ops.add_layer_norm(x, 2 * x, w, b), lambda x: (_ln(3 * x, w, b), 3 * x)),
    }


INFERENCE = _inference_then_no_grad_cases()


@pytest.mark.parametrize("op", list(INFERENCE))
def test_a_norm_first_called_in_inference_mode_then_under_no_grad(op):
    """A model run under torch.inference_mode, then under torch.no_grad (same shapes: the same plan): the plan's
    statistics sink was made an inference tensor on the first call, and the second call's kernel wrote it:
    "Inplace update to inference tensor outside InferenceMode is not allowed". Both give torch's answer now."""
    ours, theirs = INFERENCE[op]
    x = randn(5, 3, 8, seed=11)            # a shape no other test uses: this test makes the plan
    want = theirs(x)
    want = want if isinstance(want, tuple) else (want,)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            got = ours(x.clone())
        got = got if isinstance(got, tuple) else (got,)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- edges that give torch's answer: layouts, requires_grad mixes, extreme values ----------------------------------
def _layouts(shape, seed=0):
    """x of ``shape`` (..., N) in layouts torch takes: contiguous, transposed leading dims, expanded (stride 0),
    an offset view into a larger storage, channels-last (4-D), and a strided last dim."""
    n = shape[-1]
    lead = shape[:-1]
    out = {
        "contiguous": randn(*shape, seed=seed),
        "transposed": randn(*reversed(lead), n, seed=seed).transpose(0, len(lead) - 1) if len(lead) > 1 else None,
        "expanded": randn(1, *lead[1:], n, seed=seed).expand(*shape),
        "offset": randn(math.prod(shape) + 7, seed=seed)[5:5 + math.prod(shape)].view(shape),
        "last dim strided": randn(*lead, 2 * n, seed=seed)[..., ::2],
    }
    if len(shape) == 4:
        out["channels_last"] = randn(*shape, seed=seed).to(memory_format=torch.channels_last)
    return {k: v for k, v in out.items() if v is not None}


def _sweep():
    w, b = randn(8, seed=1), randn(8, seed=2)
    cases = {}
    for layout, x in _layouts((2, 3, 4, 8)).items():
        r = randn(2, 3, 4, 8, seed=3)
        cases[f"rms_norm {layout}"] = (lambda x, w: ops.rms_norm(x, w), _rn, (x, w))
        cases[f"layer_norm {layout}"] = (lambda x, w, b: ops.layer_norm(x, w, b), _ln, (x, w, b))
        cases[f"add_layer_norm {layout}"] = (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                                             lambda x, r, w, b: (_ln(x + r, w, b), x + r), (x, r, w, b))
        cases[f"swiglu {layout}"] = (ops.swiglu, _swiglu, (x,))
    for layout, q in _layouts((2, 2, 5, 16)).items():
        k, v = randn(2, 1, 7, 16, seed=4), randn(2, 1, 7, 16, seed=5)
        cases[f"attention {layout} gqa"] = (tilestack.attention, lambda q, k, v: _sdpa64(q, k, v, enable_gqa=True),
                                            (q, k, v))
    labels = torch.tensor([0, 3, -100, 9, 2, 5])
    for layout, h in _layouts((6, 8)).items():
        lm = randn(8, 10, seed=6).T                                     # an LM head seen through a transpose
        cases[f"fused_linear_cross_entropy {layout}"] = (
            lambda h, lm: ops.fused_linear_cross_entropy(h, lm, labels), lambda h, lm: _ce64(h, lm, labels), (h, lm))
    return cases


SWEEP = _sweep()


@pytest.mark.parametrize("case", list(SWEEP))
def test_layouts_and_requires_grad_mixes_as_torch(case):
    """Each op over strided, expanded, offset and channels-last inputs, with each input alone requiring grad and
    all of them together: outputs and gradients as torch's (float64 where it computes)."""
    ours, theirs, tensors = SWEEP[case]
    for which in [[i] for i in range(len(tensors))] + [list(range(len(tensors)))]:
        _assert_as_torch(ours, theirs, tensors, which, 1e-4)


def _masked_rows():
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    some = torch.ones(5, 7, dtype=torch.bool)
    some[1] = False                                                     # a query row that sees no key
    neg = torch.zeros(2, 5, 7)
    neg[:, 2] = -math.inf                                               # the same, additively, per head
    neg[1, :, 4] = -math.inf                                            # and a key no query of head 1 sees
    return {
        "bool row all False": dict(attn_mask=some),
        "bool all False": dict(attn_mask=torch.zeros(5, 7, dtype=torch.bool)),
        "-inf rows and a column": dict(attn_mask=neg),
        "-inf broadcast (Nq, 1)": dict(attn_mask=torch.tensor([0.0, -math.inf, 0.0, 0.0, -math.inf])[:, None]),
        "very negative scores": dict(attn_mask=torch.full((5, 7), -1e4) + randn(5, 7, seed=3)),
    }, (q, k, v)


MASKED, QKV = _masked_rows()


@pytest.mark.parametrize("case", list(MASKED))
def test_attention_masked_rows_as_torch(case):
    """Rows that see no key give 0 (torch's math backend since 2.5), with zero gradients; others torch's values."""
    kw = MASKED[case]
    tol = 2e-3 if case == "very negative scores" else 1e-4     # f32 scores near -1e4: ulp 1e-3
    _assert_as_torch(lambda q, k, v: tilestack.attention(q, k, v, **kw),
                     lambda q, k, v: _sdpa64(q, k, v, **kw), QKV, [0, 1, 2], tol)


def test_cross_entropy_gradients_follow_the_incoming_gradient():
    """The fused op makes its gradients in the forward for d loss = 1 and scales them after: loss * 3, and a loss
    reached through two paths (its gradient summed), give torch's gradients."""
    h, lm, labels = randn(6, 8), randn(10, 8, seed=1), torch.tensor([0, 3, -100, 9, 2, 5])
    got, want = [], []
    for fn, out in ((ops.fused_linear_cross_entropy, got), (_ce64, want)):
        hs, ls = h.clone().requires_grad_(), lm.clone().requires_grad_()
        loss = fn(hs, ls, labels)
        (3 * loss + loss ** 2).backward()
        out += [hs.grad.double(), ls.grad.double()]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _half_cases():
    cases = {}
    mask = randn(5, 7, seed=7)                                           # a float32 bias with half inputs
    labels = torch.tensor([0, 3, -100, 9, 2, 5])
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        x, r = randn(3, 4, 8, dtype=dtype), randn(3, 4, 8, dtype=dtype, seed=3)
        w32, b32 = randn(8, seed=1), randn(8, seed=2)
        cases[f"rms_norm {name} x, f32 weight"] = (lambda x, w: ops.rms_norm(x, w), _rn, (x, w32))
        cases[f"layer_norm {name}"] = (lambda x, w, b: ops.layer_norm(x, w, b), _ln,
                                       (x, w32.to(dtype), b32.to(dtype)))
        cases[f"add_rms_norm {name}"] = (lambda x, r, w: ops.add_rms_norm(x, r, w),
                                         lambda x, r, w: (_rn(x + r, w), x + r), (x, r, w32.to(dtype)))
        cases[f"swiglu {name}"] = (ops.swiglu, _swiglu, (x,))
        q, k, v = (randn(1, 2, n, 16, dtype=dtype, seed=s) for n, s in ((5, 4), (7, 5), (7, 6)))
        cases[f"attention {name}, f32 mask"] = (lambda q, k, v: tilestack.attention(q, k, v, attn_mask=mask),
                                                lambda q, k, v: _sdpa64(q, k, v, attn_mask=mask), (q, k, v))
        h, lm = randn(6, 8, dtype=dtype), randn(10, 8, dtype=dtype, seed=8)
        cases[f"fused_linear_cross_entropy {name}"] = (
            lambda h, lm: ops.fused_linear_cross_entropy(h, lm, labels), lambda h, lm: _ce64(h, lm, labels), (h, lm))
    return cases


HALF = _half_cases()


@pytest.mark.parametrize("case", list(HALF))
def test_half_dtypes_as_torch(case):
    """bf16 and fp16 inputs (a norm's weight in f32 with half x, as torch's mixed-precision norms take it; a float32
    attention bias with half q, k, v): outputs and gradients as float64 torch's to the dtype's rounding."""
    ours, theirs, tensors = HALF[case]
    _assert_as_torch(ours, theirs, tensors, list(range(len(tensors))), 3e-2)


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")
@pytest.mark.parametrize("case", ["rank 3", "mask requires grad", "head dim 0"])
def test_sdpa_drop_in_hands_to_torch_inside_a_fullgraph_compile(case):
    """A call the drop-in hands to torch, inside torch.compile(fullgraph=True) (a patched model compiled whole):
    its one-time notice was a warnings.warn, which Dynamo cannot trace, so the compile failed where torch's own
    function compiles. Inside a graph the notice is skipped; the answer is torch's."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    kw = {}
    if case == "rank 3":
        q, k, v = q[0], k[0], v[0]
    elif case == "mask requires grad":
        kw = dict(attn_mask=randn(5, 7, seed=3).requires_grad_())
    else:
        q, k = q[..., :0], k[..., :0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: tilestack.scaled_dot_product_attention(q, k, v, **kw), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v, **kw))


@pytest.mark.parametrize("needs_grad", ["x", "bias"])
def test_compiled_quantized_model_answers_and_refuses_its_backward(needs_grad):
    """A quantized model compiled with an input (or a bias) that requires grad: the compile failed with torch's
    "no autograd formula was registered" for tilestack::quant_linear, where eager mode answers and refuses only a
    backward. Compiled, the forward answers as eager mode does and a backward raises the same LaunchError."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    qmodel = tilestack.quantize(model, "int8")
    x = randn(3, 5, 8)
    with torch.no_grad():
        want = qmodel(x)
    if needs_grad == "bias":
        qmodel[0].bias.requires_grad_()
    else:
        x = x.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(qmodel, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y.detach(), want)
    with pytest.raises(LaunchError, match="a backward through a quantized linear layer; it runs inference only"):
        y.sum().backward()


def test_attention_mask_requiring_grad():
    """A mask that requires grad: refused in grad mode, eager and compiled (compiled, the custom op's backward gave
    the mask no gradient without a word: m.grad stayed None after a backward); answered under no_grad and
    inference_mode, where no gradient can be asked (it was refused there too), with torch's answer."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    mask = randn(5, 7, seed=3).requires_grad_()
    want = _sdpa64(q, k, v, attn_mask=mask.detach())
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(tilestack.attention(q, k, v, attn_mask=mask).double(), want, atol=1e-5,
                                       rtol=1e-5)
    fragment = "attn_mask requires grad, and the kernels give the mask no gradient"
    with pytest.raises(LaunchError, match=fragment):
        tilestack.attention(q.clone().requires_grad_(), k, v, attn_mask=mask)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: tilestack.attention(q, k, v, attn_mask=m), backend="aot_eager")
    with pytest.raises(LaunchError, match=fragment):          # (a graph break, then the eager call refuses)
        compiled(q.clone().requires_grad_(), k, v, mask).sum().backward()
