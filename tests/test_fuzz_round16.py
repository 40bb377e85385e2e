"""Fuzz round sixteen, part one: ``tilestack.quant.quantized_linear`` over seeded random cases against float64, the
ops under ``torch.compile(fullgraph=True)`` with dynamic sizes (``mark_dynamic``) and gradients, and dtypes no op
takes (tests/_fuzz_round16.py has the draws).

Rounds 8, 12, 13, 14 and 15 fuzzed the norms, softmax, SwiGLU, rotary, the fused cross-entropy, gemm and attention
(views of every kind, edge values, poisoned outputs, bad calls), and checked tilestack's own layouts, broadcast
leaves, all-masked attention rows and compiled attention; this round probed those again (stride-0 and transposed
inputs with gradients, channels-last, Nq or Nk of 0 and 1, head dims 1-100, NaN and inf rows, f16 at 1e4) and found
them right, so it draws where no round went:
- ``quantized_linear``, weight-only (int8, fp8) and fp8 x fp8 (the quantizing in the GEMM's loop or a pass of its
  own, or an fp8 x given), x in f32/bf16/f16, sizes from 0, 1, 2, 3, 5, 17, 33, every input (x, q, scale, bias,
  residual) laid out contiguous, transposed, at an offset, stepped or expanded (stride 0), bias and residual of
  any float dtype, an activation now and then, NaN and inf in x (weight-only: float64 has them where we must);
  each against float64 of the dequantized weight (and, for fp8 x fp8, the activations quantized as the kernels
  quantize them), within bounds per output dtype;
- rms_norm -> swiglu -> fused cross-entropy and attention under ``torch.compile(backend="aot_eager",
  fullgraph=True)`` with their row, width and sequence dims marked dynamic: one graph for every size, values and
  gradients against float64;
- dtypes none of the ops take (uint8, float8_e4m3fn, float8_e5m2, complex128): refused by name before any work.

What this round found (the test below failed before its fix):
- ``quantized_linear(x, q, scale)`` with a ``scale`` that requires grad (a learned per-channel scale) returned a y
  outside the autograd graph: a loss with other terms trained those and left ``scale.grad`` None without a word,
  where x, bias or residual requiring grad got a y whose backward refuses by name. The scale is now one of them.
(Its command-line findings are in part two, test_fuzz_round16_more.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack
from _fuzz_round16 import LAYOUTS, SIZES, Replay, layout, pick, qlinear_reference, rng_for
from tilestack.errors import LaunchError
from tilestack.kernels.gemm import ACTIVATIONS
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.torch import ops

QLINEAR_CASES = 60
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# relative rounding of one value stored in each dtype (half an ulp at 1)
ROUND = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
U32 = 2.0 ** -24


def _draw_qlinear(rng, rep: Replay):
    mode = str(pick(rng, ("int8", "fp8", "fp8-act", "fp8-act", "fp8-x")))
    m, k, n = (int(pick(rng, SIZES)) for _ in range(3))
    x_dtype = torch.float8_e4m3fn if mode == "fp8-x" else pick(rng, FLOATS)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    w = torch.randn(n, k, generator=g, dtype=torch.float64).float()
    q, scale = quantize_weight(w, "int8" if mode == "int8" else "fp8")
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * float(pick(rng, (1.0, 1.0, 8.0)))
    specials = mode in ("int8", "fp8") and m * k > 0 and rng.random() < 0.3
    if specials:     # NaN / inf in x: float64 has them in the same outputs (the weight-only kernels multiply x as is)
        x.view(-1)[int(rng.integers(m * k))] = float(pick(rng, (math.nan, math.inf, -math.inf)))
    if mode == "fp8-x":
        x = x.clamp(-400, 400).to(torch.float8_e4m3fn)
    else:
        x = x.to(x_dtype)
    bias = residual = None
    if rng.random() < 0.6:
        bias = (torch.randn(n, generator=g, dtype=torch.float64)).to(pick(rng, FLOATS))
        bias = layout(bias, str(pick(rng, ("contiguous", "offset", "stepped"))))
    if rng.random() < 0.5:
        residual = torch.randn(m, n, generator=g, dtype=torch.float64).to(pick(rng, FLOATS))
        residual = layout(residual, str(pick(rng, LAYOUTS)))
    activation = pick(rng, (None, None, *ACTIVATIONS))
    x_scale = None if mode in ("int8", "fp8") else float(pick(rng, (0.02, 0.1, 1.0)))
    views = {name: str(pick(rng, LAYOUTS)) for name in ("x", "q")}
    views["scale"] = str(pick(rng, ("contiguous", "offset", "stepped", "expanded")))
    x = layout(x, views["x"])
    q = layout(q, views["q"])
    scale = layout(scale, views["scale"])
    act_quant = str(pick(rng, ("gemm", "pass"))) if mode == "fp8-act" else None
    rep.fields.update(mode=mode, M=m, K=k, N=n, x=x.dtype, bias=None if bias is None else bias.dtype,
                      residual=None if residual is None else residual.dtype, activation=activation, x_scale=x_scale,
                      act_quant=act_quant, specials=specials, views=views)
    return x, q, scale, bias, residual, activation, x_scale, act_quant


@pytest.mark.parametrize("case", range(QLINEAR_CASES))
def test_quantized_linear_fuzz(case, request):
    """Weight-only and fp8 x fp8 over ragged sizes, layouts and epilogues against float64; NaN exactly where
    float64 has NaN, the same infinities."""
    rep = Replay("qlinear", case, request)
    rng = rng_for("qlinear", case)
    x, q, scale, bias, residual, activation, x_scale, act_quant = _draw_qlinear(rng, rep)
    with torch.no_grad(), rep.backend():
        y = quantized_linear(x, q, scale, bias, x_scale=x_scale, activation=activation, residual=residual,
                             act_quant=act_quant)
    out_dtype = torch.bfloat16 if x.dtype == torch.float8_e4m3fn else x.dtype
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == out_dtype, (rep, y.shape, y.dtype)
    want = qlinear_reference(x, q, scale, bias, residual, activation, x_scale)
    # the size of the terms summed: |x| |W|^T (+ |bias|), slope <= 1.2 through the activations, + |residual|
    x_abs = x.float().double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs()
    if x.dtype == torch.float8_e4m3fn:
        x_abs = x_abs * x_scale
    terms = x_abs @ (q.float().double() * scale.double()[:, None]).abs().t()
    if bias is not None:
        terms = terms + bias.double().abs()
    terms = 1.2 * terms + (0 if residual is None else residual.double().abs())
    k = x.shape[1]
    # x in bf16/f16 is exact in f32; the f32 sum of k products, the scale, bias, activation and residual in f32,
    # then one rounding to the output dtype; fp8 x fp8: the kernels' and the reference's fp8 casts of one value
    # may differ at a rounding tie (one fp8 step, 1/8 of it): slack of 2^-3 of the terms
    slack = 2.0 ** -3 if x_scale is not None and x.dtype != torch.float8_e4m3fn else 0.0
    bound = ROUND[out_dtype] * want.abs().nan_to_num(posinf=0.0) + ((k + 8) * U32 + slack) * terms + 1e-30
    got = y.double()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), (str(rep), got, want)
    inf = want.isinf()
    assert torch.equal(got.isinf() & ~nan, inf), (str(rep), got, want)
    assert torch.equal(got[inf], want[inf]), (str(rep), got[inf], want[inf])
    fin = ~(nan | inf)
    err = (got - want).abs()[fin]
    assert bool((err <= bound[fin]).all()), (f"{rep}: max error {err.max().item():.3g}, bound there "
                                             f"{bound[fin][err.argmax()].item():.3g}")


def test_a_scale_that_requires_grad_is_in_the_graph_and_its_backward_refuses_by_name():
    """A learned scale: y requires grad and a backward through it is refused naming the scale, as for x, bias and
    residual; before, y was outside the graph and scale.grad stayed None without a word."""
    q, s = quantize_weight(torch.randn(6, 5, dtype=torch.float64).float(), "int8")
    x = torch.randn(4, 5)
    scale = s.clone().requires_grad_()
    other = torch.ones((), requires_grad=True)
    y = quantized_linear(x, q, scale)
    assert y.requires_grad
    with pytest.raises(LaunchError, match=r"quantized_linear: a backward through a quantized linear layer.*the scale"):
        (y.sum() + other).backward()
    assert scale.grad is None
    with torch.no_grad():                          # inference: no graph, the same values
        y0 = quantized_linear(x, q, scale)
    assert not y0.requires_grad
    torch.testing.assert_close(y.detach(), y0, rtol=0, atol=0)
    want = x.double() @ (q.double() * s.double()[:, None]).t()
    torch.testing.assert_close(y0.double(), want, rtol=1e-5, atol=1e-5)


# ---- the ops compiled with dynamic sizes ----------------------------------------------------------------------------
def _chain(x, w, proj, labels):
    h = ops.rms_norm(x, w)                       # (T, 2F)
    return ops.fused_linear_cross_entropy(ops.swiglu(h), proj, labels)


def _chain64(x, w, proj, labels):
    h = F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    f = h.shape[-1] // 2
    return F.cross_entropy((F.silu(h[:, :f]) * h[:, f:]) @ proj.t(), labels)


SIZES_DYN = [(3, 8, 5), (5, 6, 7), (17, 10, 3), (2, 4, 9)]     # (T, 2F, V)


def test_norm_swiglu_and_cross_entropy_compiled_once_for_every_size():
    """rms_norm -> swiglu -> fused cross-entropy under fullgraph with T, the width and V marked dynamic: one graph
    serves all four sizes, and loss and gradients (x, weight, projection) match float64 autograd."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(_chain, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(1600)
    for t, width, v in SIZES_DYN:
        x = torch.randn(t, width, generator=g, dtype=torch.float64)
        w = 1 + 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
        proj = torch.randn(v, width // 2, generator=g, dtype=torch.float64)
        labels = torch.randint(0, v, (t,), generator=g)
        ours = [a.float().requires_grad_() for a in (x, w, proj)]
        theirs = [a.clone().requires_grad_() for a in (x, w, proj)]
        for a, dims in zip(ours, ((0, 1), (0,), (0, 1)), strict=True):
            for d in dims:
                torch._dynamo.mark_dynamic(a, d)
        torch._dynamo.mark_dynamic(labels, 0)
        loss = fn(*ours, labels)
        loss.backward()
        want = _chain64(*theirs, labels)
        want.backward()
        assert abs(loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item())), (t, width, v, loss, want)
        for name, a, b in zip(("x", "weight", "proj"), ours, theirs, strict=True):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5, msg=f"{name} {(t, width, v)}")
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(SIZES_DYN)} sizes"


def test_attention_compiled_once_for_every_sequence_length():
    """Causal GQA attention under fullgraph with B (2, 3) and N (3, 5, 17, 2) marked dynamic: one graph, o and
    the gradients of q, k, v against float64 SDPA."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, k, v: tilestack.attention(q, k, v, causal=True), backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(1601)
    for b, n in ((2, 3), (3, 5), (2, 17), (3, 2)):     # (a dim of size 1 is specialized by Dynamo: from 2)
        q64 = torch.randn(b, 4, n, 8, generator=g, dtype=torch.float64)
        k64, v64 = (torch.randn(b, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ours = [a.float().requires_grad_() for a in (q64, k64, v64)]
        for a in ours:
            torch._dynamo.mark_dynamic(a, 0)
            torch._dynamo.mark_dynamic(a, 2)
        o = fn(*ours)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64)
        o.backward(do.float())
        theirs = [a.clone().requires_grad_() for a in (q64, k64, v64)]
        want = F.scaled_dot_product_attention(theirs[0], theirs[1], theirs[2], is_causal=True, enable_gqa=True)
        want.backward(do)
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5, msg=f"o {(b, n)}")
        for name, a, t in zip("qkv", ours, theirs, strict=True):
            torch.testing.assert_close(a.grad.double(), t.grad, rtol=1e-4, atol=1e-5, msg=f"d{name} {(b, n)}")
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 4 sizes"


# ---- dtypes no op takes ----------------------------------------------------------------------------------------
ODD_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex128)


def _odd(shape, dtype):
    return torch.zeros(shape, dtype=torch.float32).to(dtype) if dtype.is_complex else torch.zeros(shape).to(dtype)


OP_CALLS = {
    "rms_norm": lambda t: ops.rms_norm(t((4, 16)), torch.ones(16)),
    "layer_norm": lambda t: ops.layer_norm(t((4, 16)), torch.ones(16), torch.zeros(16)),
    "add_rms_norm": lambda t: ops.add_rms_norm(t((4, 16)), t((4, 16)), torch.ones(16)),
    "swiglu": lambda t: ops.swiglu(t((4, 16))),
    "rotary": lambda t: ops.rotary(t((1, 3, 2, 16)), t((1, 3, 2, 16)), torch.ones(3, 8), torch.zeros(3, 8)),
    "fused_linear_cross_entropy": lambda t: ops.fused_linear_cross_entropy(t((4, 16)), torch.ones(5, 16),
                                                                           torch.zeros(4, dtype=torch.long)),
    "attention": lambda t: tilestack.attention(t((1, 2, 3, 8)), t((1, 2, 3, 8)), t((1, 2, 3, 8))),
    "softmax": lambda t: tilestack.kernels.softmax(t((4, 16))),
    "gemm": lambda t: tilestack.kernels.gemm(t((4, 16)), t((16, 3))),
}


@pytest.mark.parametrize("dtype", ODD_DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(OP_CALLS))
def test_a_dtype_no_op_takes_is_refused_by_name(op, dtype):
    """An input of uint8, an fp8 or complex128 (none of which any op here multiplies): a tilestack error naming the
    op, the argument and the dtype given, never a wrong answer or an error from inside a backend."""
    with pytest.raises(LaunchError) as e:
        OP_CALLS[op](lambda shape: _odd(shape, dtype))
    msg = str(e.value)
    assert msg.split(":")[0] in (op, "attention_forward", "check_rotary_args"), msg
    assert str(dtype).removeprefix("torch.") in msg, msg
    assert any(f"{name} has dtype" in msg for name in ("x", "q", "a")), msg
