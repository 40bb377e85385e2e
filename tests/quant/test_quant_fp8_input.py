"""quantized_linear's fp8 weights-and-activations paths: activations already in fp8 (quantized by their producer),
a quantizing pass then the fp8 x fp8 GEMM (``act_quant="pass"``, the GPU default), in the GEMM's loop
(``act_quant="gemm"``); all three give the same products, against float64 torch on the same fp8 values. The plan
is made once per signature; bad arguments are refused before any work."""

from __future__ import annotations

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.quant import gemm as qg
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.gemm import quantize_activation

SMALL = dict(BM=16, BN=16, BK=16)


def _problem(M, K, N, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g).to(dtype)
    q, s = quantize_weight(w, "fp8")
    xs = qg.activation_scale(float(x.float().abs().max()) * 0.5)     # half the range: some values saturate
    return x, q, s, b, xs


def _on(backend, *tensors):
    """The tensors where ``backend`` runs them: the Triton backend takes CUDA tensors where a GPU is present (CPU
    tensors only under its interpreter, on a machine without one); the reference executor takes CPU tensors."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return tuple(t.to(dev) for t in tensors)


def _want(xq, q, s, b, xs, residual=None, activation=None):
    """float64 torch on the same fp8 values: (xq x_scale) @ (q s)^T + b, then the activation and residual."""
    y = (xq.double() * xs) @ (q.double() * s.double()[:, None]).T + b.double()
    y = qg.torch_activation(y, activation)
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (16, 32, 16), (5, 1, 9)])
def test_fp8_input_matches_float64(backend, M, K, N):
    x, q, s, b, xs = _problem(M, K, N)
    xq = quantize_activation(x, xs)
    r = torch.randn(M, N).to(torch.bfloat16)
    y = quantized_linear(*_on(backend, xq, q, s, b), x_scale=xs, activation="gelu", residual=_on(backend, r)[0],
                         backend=backend, **SMALL).cpu()
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    want = _want(xq, q, s, b, xs, r, "gelu")
    torch.testing.assert_close(y.double(), want, rtol=1.6e-2, atol=1.6e-2)   # bf16 output


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp8_input_out_dtype(out_dtype):
    x, q, s, b, xs = _problem(20, 48, 33, seed=1)
    xq = quantize_activation(x, xs)
    y = quantized_linear(xq, q, s, b, x_scale=xs, out_dtype=out_dtype, backend="reference", **SMALL)
    assert y.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.double(), _want(xq, q, s, b, xs), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("act_quant", ["pass", "gemm"])
def test_act_quant_modes_agree_with_the_fp8_input_path(backend, act_quant):
    """A float x quantized by either mode is the same GEMM as x quantized beforehand (torch's cast), and extreme
    values saturate to +-448 x_scale instead of overflowing."""
    x, q, s, b, xs = _problem(37, 70, 45, seed=2, dtype=torch.float32)
    x[3] = 1e6
    x[4] = -1e6
    y = quantized_linear(*_on(backend, x, q, s, b), x_scale=xs, act_quant=act_quant, backend=backend, **SMALL).cpu()
    want = _want(quantize_activation(x, xs), q, s, b, xs)
    assert bool(y.isfinite().all())
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_act_quant_pass_runs_the_quantizer_then_the_fp8_gemm(monkeypatch):
    calls = []
    for name in ("quantize_fp8_kernel", "qgemm_kernel", "qgemm_act_kernel"):
        kernel = getattr(qg, name)
        orig = kernel.launcher_for

        def spy(*args, _orig=orig, _name=name, **kwargs):
            calls.append(_name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(kernel, "launcher_for", spy)
    x, q, s, b, xs = _problem(9, 24, 10, seed=3)
    quantized_linear(x, q, s, b, x_scale=xs, act_quant="pass", backend="reference")
    assert sorted(calls) == ["qgemm_kernel", "quantize_fp8_kernel"]
    calls.clear()
    quantized_linear(x, q, s, b, x_scale=xs, act_quant="gemm", backend="reference")
    assert calls == ["qgemm_act_kernel"]


def test_planned_once_per_signature(monkeypatch):
    checks = []
    orig = qg._check_linear
    monkeypatch.setattr(qg, "_check_linear", lambda *a: (checks.append(1), orig(*a))[1])
    qg._planned_linear.plans.clear()
    x, q, s, b, xs = _problem(9, 24, 10, seed=4)
    xq = quantize_activation(x, xs)
    first = quantized_linear(xq, q, s, b, x_scale=xs, backend="reference")
    again = quantized_linear(xq, q, s, b, x_scale=xs, backend="reference")
    other = quantize_activation(x * 0.5, xs)          # new values, same signature: the same plan, a new answer
    third = quantized_linear(other, q, s, b, x_scale=xs, backend="reference")
    assert len(checks) == 1
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(third.double(), _want(other, q, s, b, xs), rtol=1.6e-2, atol=1.6e-2)


def test_k_zero_and_empty():
    q0, s0 = quantize_weight(torch.zeros(5, 0), "fp8")
    b = torch.randn(5)
    for act_quant in ("pass", "gemm"):
        y = quantized_linear(torch.randn(3, 0), q0, s0, b, x_scale=0.1, act_quant=act_quant, backend="reference")
        torch.testing.assert_close(y, b.expand(3, 5))
    q, s = quantize_weight(torch.randn(5, 8), "fp8")
    assert quantized_linear(torch.zeros(0, 8, dtype=torch.float8_e4m3fn), q, s, x_scale=0.1).shape == (0, 5)


def test_bad_arguments_are_refused_by_name():
    x, q, s, b, xs = _problem(4, 8, 6)
    xq = quantize_activation(x, xs)
    with pytest.raises(LaunchError, match="x_scale"):
        quantized_linear(xq, q, s)                                   # fp8 x without its scale
    with pytest.raises(LaunchError, match="out_dtype"):
        quantized_linear(x, q, s, x_scale=xs, out_dtype=torch.float32)   # a float x keeps its dtype
    with pytest.raises(LaunchError, match="out_dtype"):
        quantized_linear(xq, q, s, x_scale=xs, out_dtype=torch.int8)
    with pytest.raises(LaunchError, match="act_quant"):
        quantized_linear(x, q, s, x_scale=xs, act_quant="fused")
    with pytest.raises(LaunchError, match="act_quant"):
        quantized_linear(x, q, s, act_quant="pass")                  # weight-only: nothing to quantize
    q8, s8 = quantize_weight(torch.randn(6, 8), "int8")
    with pytest.raises(LaunchError, match="x_scale"):
        quantized_linear(xq, q8, s8, x_scale=xs)                     # fp8 activations need fp8 weights
    with pytest.raises(LaunchError, match="x has dtype"):
        quantized_linear(x.to(torch.int8), q, s, x_scale=xs)
