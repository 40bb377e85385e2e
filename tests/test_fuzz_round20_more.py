"""Fuzz round twenty, part two: ``tilestack.kernels.gemm``'s fused epilogue (bias, every activation it accepts,
residual) against float64 torch, its refusals of bad epilogue arguments, and the public ops under
``torch.compile(fullgraph=True)`` and torch.func (vmap, grad, jacrev): correct, or refused with a clear error naming
the function. CPU backends (the NumPy reference executor; the Triton interpreter every other GEMM case); every
result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- the kernel functions (``tilestack.kernels.gemm``, ``softmax``, ``rms_norm``, ... every ``@planned`` or
  ``@no_backward`` one) under ``torch.compile(fullgraph=True)`` failed inside Dynamo's trace of their plan with
  "Dynamo does not know how to trace the builtin ...is_functorch_wrapped_tensor", naming no tilestack function; and
  without fullgraph Dynamo traced on into the reference executor, recompiling its lambdas past its limit. They are
  opaque to Dynamo now (``kernels._plan``: a ``torch.compiler.disable`` whose reason names the function and points
  to tilestack's custom ops): a graph break that runs them eagerly, or under fullgraph an error naming them.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

ACTS = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
        "silu": F.silu}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2050 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)).to(dtype)


def close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 torch has none, or the reverse"
    ok = ~want.isnan()
    if ok.any():
        err = ((got[ok] - want[ok]).abs().max() / want[ok].abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


GEMM_CASES = [(act, bias, res, dt, out_dt, layout)
              for act in ACTS for bias, res in [(True, True), (True, False), (False, True)]
              for dt, out_dt in [(torch.bfloat16, torch.float32), (torch.float16, None)]
              for layout in ["contiguous", "views"]]


@pytest.mark.parametrize("case", range(len(GEMM_CASES)))
def test_gemm_epilogue_matches_float64(case):
    act, has_bias, has_res, dt, out_dt, layout = GEMM_CASES[case]
    M, K_, N = 5, 7, 6
    a, b = randn(case, M, K_, dtype=dt), randn(case + 100, K_, N, dtype=dt)
    bias = randn(case + 200, N, dtype=torch.float32) if has_bias else None
    res = randn(case + 300, M, N, dtype=dt) if has_res else None
    if layout == "views":     # a at a storage offset, b a Linear's weight.t(), bias strided, residual transposed
        a = randn(case, M * K_ + 3, dtype=dt)[3:].view(M, K_)
        b = randn(case + 100, N, K_, dtype=dt).t()
        bias = randn(case + 200, 2 * N, dtype=torch.float32)[::2] if has_bias else None
        res = randn(case + 300, N, M, dtype=dt).t() if has_res else None
    want = a.double() @ b.double()
    if bias is not None:
        want = want + bias.double()
    want = ACTS[act](want)
    if res is not None:
        want = want + res.double()
    backend = "triton" if case % 2 else "reference"
    with config.override(backend=backend), poisoned_allocations():
        got = K.gemm(a, b, bias=bias, activation=act, residual=res, out_dtype=out_dt)
    assert got.dtype == (out_dt or dt)
    close(got, want, TOL[got.dtype] + 4e-3 * (got.dtype != torch.float32), f"case {GEMM_CASES[case]} {backend}")


def test_gemm_nan_in_the_bias_is_nan_in_its_column_only():
    a, b = randn(1, 4, 5, dtype=torch.bfloat16), randn(2, 5, 3, dtype=torch.bfloat16)
    bias = torch.tensor([0.0, float("nan"), 1.0])
    with config.override(backend="reference"), poisoned_allocations():
        got = K.gemm(a, b, bias=bias, activation="relu", out_dtype=torch.float32)
    assert got[:, 1].isnan().all() and not got[:, [0, 2]].isnan().any()


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(activation="GELU"), "activation='GELU'"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(activation=F.relu), "activation="),
    (dict(activation=["relu"]), "activation="),
    (dict(bias=torch.ones(5)), "bias has 5 elements"),
    (dict(bias=torch.ones(1, 6)), "bias must have rank 1"),
    (dict(bias=torch.ones(6, dtype=torch.int32)), "bias has dtype"),
    (dict(bias=torch.ones(6, dtype=torch.float64)), "bias has dtype"),
    (dict(residual=torch.ones(1, 6)), "residual is (1, 6)"),
    (dict(residual=torch.ones(6)), "residual must have rank 2"),
    (dict(residual=torch.ones(5, 6, dtype=torch.float64)), "residual has dtype"),
    (dict(out_dtype=torch.float64), "out_dtype"),
    (dict(out=torch.empty(5, 6, dtype=torch.float32)), "out has dtype"),
    (dict(HAS_BIAS=True), "HAS_BIAS"),
])
def test_gemm_bad_epilogue_arguments_refused_by_name(kwargs, fragment, monkeypatch):
    """Refused by name before any work: no kernel launched (the launcher is never built)."""
    a, b = randn(3, 5, 7, dtype=torch.bfloat16), randn(4, 7, 6, dtype=torch.bfloat16)
    gemm_module = sys.modules["tilestack.kernels.gemm"]       # (the package's name gemm is the function)
    monkeypatch.setattr(gemm_module, "tuned_launcher", lambda *a, **k: pytest.fail("launched"))
    with config.override(backend="reference"), pytest.raises(LaunchError) as info:
        K.gemm(a, b, **kwargs)
    assert fragment in str(info.value)


# ---- torch.compile(fullgraph=True) ------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", ["gemm", "softmax", "rms_norm"])
def test_kernel_functions_under_fullgraph_compile_are_refused_naming_them(kernel, fresh_dynamo):
    """A kernel function inside torch.compile(fullgraph=True): an error naming it (was Dynamo's failure on a
    functorch builtin deep in the plan); without fullgraph: a graph break, and the eager answer."""
    a = randn(5, 5, 7, dtype=torch.bfloat16)
    b = randn(6, 7, 6, dtype=torch.bfloat16)
    calls = {"gemm": lambda a, b: K.gemm(a, b, bias=torch.ones(6), activation="silu") * 2,
             "softmax": lambda a, b: K.softmax(a) * 2,
             "rms_norm": lambda a, b: K.rms_norm(a, torch.ones(7, dtype=a.dtype))[0] * 2}
    fn = calls[kernel]
    with config.override(backend="reference"):
        want = fn(a, b)
        with pytest.raises(Exception, match=f"tilestack's kernel function {kernel} runs eagerly"):
            torch.compile(fn, backend="aot_eager", fullgraph=True)(a, b)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = torch.compile(fn, backend="aot_eager")(a, b)
    assert torch.equal(got, want)


def test_ops_chain_under_fullgraph_compile_forward_and_backward(fresh_dynamo):
    x, w, r = randn(10, 3, 4, 16), randn(11, 16), randn(12, 3, 4, 16)
    cos, sin = K.rotary_tables(4, 16)

    def f(x, w, r):
        y, h = ops.add_rms_norm(x, r, w)
        q, k = ops.rotary(y.view(3, 4, 1, 16), h.view(3, 4, 1, 16), cos, sin)
        return ops.swiglu(q.flatten(2)) + k.flatten(2)[..., :8], ops.layer_norm(h, w, w)

    def f64(x, w, r):
        h = x + r
        y = F.rms_norm(h, (16,), w, 1e-6)

        def rot(t):
            t1, t2 = t[..., :8], t[..., 8:]
            c, s = cos.double(), sin.double()
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)
        q, k = rot(y), rot(h)
        return F.silu(q[..., :8]) * q[..., 8:] + k[..., :8], F.layer_norm(h, (16,), w, w, 1e-5)

    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    with config.override(backend="reference"), poisoned_allocations():
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
        (got[0].sum() + got[1].pow(2).sum()).backward()
    ref = [t.double().requires_grad_() for t in (x, w, r)]
    want = f64(*ref)
    (want[0].sum() + want[1].pow(2).sum()).backward()
    for g, wnt in zip(got, want, strict=True):
        close(g, wnt.detach(), 2e-5, "forward")
    for g, wnt, n in zip(leaves, ref, "xwr", strict=True):
        close(g.grad, wnt.grad, 1e-4, f"d{n}")


@pytest.mark.parametrize("dynamic", [False, True])
def test_drop_in_sdpa_fullgraph_with_every_argument(dynamic, fresh_dynamo):
    q, k, v = randn(20, 1, 4, 5, 16), randn(21, 1, 2, 7, 16), randn(22, 1, 2, 7, 24)
    mask = torch.rand(1, 5, 7, generator=gen(23)) > 0.3

    def f(q, k, v, m):
        return tilestack.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True, scale=0.3)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True,
                                          scale=0.3)
    with config.override(backend="reference"), poisoned_allocations():
        got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)(q, k, v, mask)
    close(got, want, 2e-5, "compiled drop-in")


def test_fused_linear_cross_entropy_fullgraph(fresh_dynamo):
    x, w = randn(30, 5, 8), randn(31, 11, 8)
    labels = torch.tensor([1, -100, 10, 0, 4])
    with config.override(backend="reference"), poisoned_allocations():
        got = torch.compile(ops.fused_linear_cross_entropy, backend="aot_eager", fullgraph=True)(x, w, labels)
    close(got, F.cross_entropy(x.double() @ w.double().T, labels), 2e-5, "loss")


# ---- torch.func --------------------------------------------------------------------------------------------------
def test_vmap_over_the_weight_and_over_a_middle_dim():
    x, W = randn(40, 4, 16), randn(41, 3, 16)
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(lambda w: ops.rms_norm(x, w))(W)
        t = randn(42, 3, 16, 5)
        sw = torch.func.vmap(ops.swiglu, in_dims=2)(t)
    close(got, torch.stack([F.rms_norm(x.double(), (16,), w.double(), 1e-6) for w in W]), 2e-5, "vmap weight")
    want = torch.stack([F.silu(t[..., i].double()[..., :8]) * t[..., i].double()[..., 8:] for i in range(5)])
    close(sw, want, 2e-5, "vmap in_dims=2")


def test_grad_jacrev_and_vmap_of_grad_match_float64():
    x, w = randn(43, 3, 8), randn(44, 8)
    xx, ww, labels = randn(45, 5, 8), randn(46, 11, 8), torch.tensor([0, 3, 10, -100, 2])
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g_ln = torch.func.grad(lambda w_: ops.layer_norm(x, w_, w).pow(2).sum())(w)
        j = torch.func.jacrev(lambda t: ops.rms_norm(t, w))(x[0])
        vg = torch.func.vmap(torch.func.grad(lambda t: ops.swiglu(t).pow(2).sum()))(x)
        g_ce = torch.func.grad(lambda w_: ops.fused_linear_cross_entropy(xx, w_, labels))(ww)
    X, W = x.double(), w.double()
    close(g_ln, torch.func.grad(lambda w_: F.layer_norm(X, (8,), w_, W, 1e-5).pow(2).sum())(W), 1e-4, "grad ln")
    close(j, torch.func.jacrev(lambda t: F.rms_norm(t, (8,), W, 1e-6))(X[0]), 1e-4, "jacrev rms")
    close(vg, torch.func.vmap(torch.func.grad(lambda t: (F.silu(t[:4]) * t[4:]).pow(2).sum()))(X), 1e-4,
          "vmap(grad(swiglu))")
    close(g_ce, torch.func.grad(lambda w_: F.cross_entropy(xx.double() @ w_.T, labels))(ww.double()), 1e-4,
          "grad ce")


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_kernel_functions_under_torch_func_refused_by_name(transform):
    a, b = randn(47, 2, 5, 7, dtype=torch.bfloat16), randn(48, 7, 6, dtype=torch.bfloat16)
    with config.override(backend="reference"), pytest.raises(LaunchError, match="gemm: a is a tensor of a torch.func"):
        if transform == "vmap":
            torch.func.vmap(lambda t: K.gemm(t, b))(a)
        else:
            torch.func.grad(lambda t: K.gemm(t.bfloat16(), b).float().sum())(a[0].float())


# ---- int8 / fp8 quantized GEMMs: the same epilogue ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_linear_epilogue_on_views_matches_float64(mode, act, backend):
    """x at a storage offset, q a transposed copy's transpose (its own strides), scale and bias strided, residual
    transposed: y = act(x @ (q * scale)^T + bias) + residual against float64 of the dequantized weight."""
    from tilestack.quant.gemm import quantize_weight, quantized_linear

    q, s = quantize_weight(randn(60, 6, 7), mode)
    q = q.t().contiguous().t()
    s = torch.stack([s, s], 1).flatten()[::2]
    x = randn(61, 40)[3:38].view(5, 7)
    bias = randn(62, 12)[::2]
    res = randn(63, 6, 5).t()
    want = ACTS[act](x.double() @ (q.double() * s.double()[:, None]).T + bias.double()) + res.double()
    with config.override(backend=backend), poisoned_allocations():
        got = quantized_linear(x, q, s, bias, activation=act, residual=res)
    close(got, want, 1e-5, f"{mode} {act} {backend}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_stride_expanded_inputs_match_float64_and_an_expanded_out_is_refused(backend):
    """Inputs that are expand()ed views (stride 0: every row the same memory): read as torch reads them; an
    expanded ``out`` (its stores would race) refused by name before any work."""
    a1, b = randn(70, 1, 7, dtype=torch.bfloat16), randn(71, 7, 6, dtype=torch.bfloat16)
    a, res, bias = a1.expand(5, 7), randn(72, 1, 6).expand(5, 6), randn(73, 1).expand(6)
    x1, w = randn(74, 1, 16), randn(75, 16)
    with config.override(backend=backend), poisoned_allocations():
        got = K.gemm(a, b, bias=bias, activation="gelu", residual=res, out_dtype=torch.float32)
        y, h = ops.add_rms_norm(randn(76, 4, 16), x1.expand(4, 16), w)
        leaf = x1.clone().requires_grad_()
        z = ops.layer_norm(leaf.expand(4, 16), w, w)
        z.pow(2).sum().backward()
        with pytest.raises(LaunchError, match="out has shape"):
            K.gemm(a, b, out=torch.empty(1, 6, dtype=torch.bfloat16).expand(5, 6))
    close(got, F.gelu(a.double() @ b.double() + bias.double()) + res.double(), 1e-5, "gemm")
    hh = randn(76, 4, 16).double() + x1.double()
    close(y, F.rms_norm(hh, (16,), w.double(), 1e-6), 2e-5, "add_rms_norm y")
    close(h, hh, 1e-6, "add_rms_norm h")
    ref = x1.double().requires_grad_()
    zw = F.layer_norm(ref.expand(4, 16), (16,), w.double(), w.double(), 1e-5)
    zw.pow(2).sum().backward()
    close(z, zw.detach(), 2e-5, "layer_norm")
    close(leaf.grad, ref.grad, 1e-4, "layer_norm grad through expand")
