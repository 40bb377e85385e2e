"""fp8 weights and activations with the activations quantized inside the GEMM (qgemm_act_kernel), and the
weight-only GEMM computed transposed (qgemm_wonly_kernel), on the CPU: the reference executor on ragged sizes
against float64 with the error bound of E4M3's 3 mantissa bits, Triton's interpreter where its fp8 cast is exact,
and the kernels' default configs compiled for sm_90a (no GPU: Triton's ptxas)."""

from __future__ import annotations

import pytest
import torch

import tilestack.lang as ts
from tilestack.ir.types import F8E4M3_MAX
from tilestack.quant import qgemm_act_kernel, qgemm_kernel, qgemm_wonly_kernel, quantize_weight, quantized_linear
from tilestack.quant.gemm import inverse_scale, quantize_activation, reference

SMALL = dict(BM=16, BN=16, BK=16)
E4M3_REL = 2.0**-4            # half a unit in the last place of 3 mantissa bits, relative
E4M3_SUB = 2.0**-10           # half the spacing of E4M3's subnormals (2^-9), absolute, in units of x_scale
OUT_REL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}   # the output's rounding
SHAPES = [(37, 70, 45), (1, 33, 17), (64, 128, 96)]


def fp8_act_bound(x, w_deq, x_scale, y64, dtype):
    """|y - x @ w_deq^T| allowed elementwise: each x within 2^-4 |x| + 2^-10 x_scale of its E4M3 value (once
    clamped to +-448 x_scale), that times |w|, plus the output's rounding and f32 accumulation."""
    err_x = E4M3_REL * x.abs() + E4M3_SUB * x_scale
    k = x.shape[1]
    return err_x @ w_deq.abs().T + OUT_REL[dtype] * y64.abs() + k * 2.0**-23 * (x.abs() @ w_deq.abs().T) + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_act_gemm_reference_within_e4m3_bound(M, K, N, dtype):
    torch.manual_seed(M + K + N)
    x = (3 * torch.randn(M, K)).to(dtype)
    w, b = torch.randn(N, K) * K**-0.5, torch.randn(N)
    q, s = quantize_weight(w, "fp8")
    x_scale = 0.5 * float(x.abs().max()) / F8E4M3_MAX          # the largest quarter of |x| or so saturates
    y = quantized_linear(x, q, s, b, x_scale=x_scale, backend="reference", **SMALL)
    assert y.dtype == dtype and y.shape == (M, N)
    w_deq = q.double() * s.double()[:, None]                   # (N, K), exact
    xc = x.double().clamp(-F8E4M3_MAX * x_scale, F8E4M3_MAX * x_scale)
    assert bool((xc != x.double()).any())                      # some activations were clamped
    y64 = xc @ w_deq.T + b.double()
    assert bool(((y.double() - y64).abs() <= fp8_act_bound(xc, w_deq, x_scale, y64, dtype)).all())
    # and it is exactly the reference semantics up to the order of the f32 sums and the output's rounding
    torch.testing.assert_close(y.float(), reference(x, q, s, b, x_scale).float(), rtol=OUT_REL[dtype] * 2,
                               atol=1e-4)


def _on_e4m3_grid(M, K, x_scale, dtype):
    """Activations whose x * (1 / x_scale) are E4M3 values (x_scale a power of two), some past +-448 (clamped),
    so that Triton 3.6's interpreter, which rounds f32 -> fp8 wrongly at carries, converts them exactly."""
    g = (torch.randn(M, K) * 60).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn).double()
    g[0, : min(K, 3)] = torch.tensor([1000.0, -2000.0, 600.0])[: min(K, 3)]     # saturate to +-448
    return (g * x_scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (20, 48, 33)])
def test_act_gemm_triton_interpreter(M, K, N, dtype):
    torch.manual_seed(3)
    x_scale = 2.0**-5
    x = _on_e4m3_grid(M, K, x_scale, dtype)
    q, s = quantize_weight(torch.randn(N, K), "fp8")
    b, r = torch.randn(N).to(dtype), torch.randn(M, N).to(dtype)
    y = quantized_linear(x, q, s, b, x_scale=x_scale, activation="gelu_tanh", residual=r, backend="triton",
                         **SMALL)
    want = reference(x, q, s, b, x_scale, activation="gelu_tanh", residual=r)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol)


def test_act_gemm_quantizes_as_the_reference_does():
    """The in-kernel quantizer against torch's cast of x * f32(1 / x_scale) (the reference executor), NaN kept:
    with W the identity and unit scales the GEMM returns x's E4M3 values times x_scale."""
    torch.manual_seed(4)
    K, x_scale = 48, 0.037
    x = torch.cat([torch.randn(30, K) * 5, torch.full((1, K), 1e4), torch.full((1, K), -1e4)])
    x[3, 5] = float("nan")
    eye = torch.eye(K).to(torch.float8_e4m3fn)
    y = torch.empty(x.shape[0], K)
    ones = torch.ones(K)
    qgemm_act_kernel(x, eye, ones, ones, ones, y, x_scale, inverse_scale(x_scale), backend="reference", **SMALL)
    want = quantize_activation(x, x_scale).double() * x_scale
    rows = torch.arange(x.shape[0]) != 3                       # NaN * 0 = NaN: row 3 is NaN throughout
    torch.testing.assert_close(y.double()[rows], want[rows], rtol=1e-7, atol=0)
    top = torch.tensor(F8E4M3_MAX * x_scale, dtype=torch.float32)
    assert y[3].isnan().all() and (y[30] == top).all() and (y[31] == -top).all()


def test_fp8_act_has_no_quantize_pass(monkeypatch):
    import tilestack.quant.gemm as qg

    def refuse(*args, **kwargs):
        raise AssertionError("quantized_linear ran the separate activation quantizer")
    monkeypatch.setattr(qg, "quantize_fp8_kernel", refuse)
    q, s = quantize_weight(torch.randn(8, 16), "fp8")
    x = torch.randn(5, 16)
    y = quantized_linear(x, q, s, x_scale=0.01, backend="reference")
    torch.testing.assert_close(y, reference(x, q, s, None, 0.01), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (3, 40, 130)])
def test_weight_only_transposed_against_float64(M, K, N, mode, backend):
    """Y^T = W X^T with the scales per row, the bias per row and the residual read through r.t()."""
    torch.manual_seed(5)
    x, r = torch.randn(M, K).to(torch.bfloat16), torch.randn(M, N).to(torch.bfloat16)
    q, s = quantize_weight(torch.randn(N, K), mode)
    b = torch.randn(N).to(torch.bfloat16)
    y = quantized_linear(x, q, s, b, activation="silu", residual=r, backend=backend, **SMALL)
    want = (torch.nn.functional.silu(x.double() @ (q.double() * s.double()[:, None]).T + b.double())
            + r.double())
    assert y.dtype == torch.bfloat16 and y.is_contiguous()
    torch.testing.assert_close(y.double(), want, rtol=2.0**-7, atol=2.0**-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_only_transposed_matches_the_direct_kernel(dtype):
    torch.manual_seed(6)
    x = torch.randn(29, 64).to(dtype)
    q, s = quantize_weight(torch.randn(40, 64), "int8")
    y_direct = torch.empty(29, 40, dtype=dtype)
    qgemm_kernel(x, q, s, s, s, y_direct, 1.0, backend="reference", **SMALL)
    y_t = torch.empty(29, 40, dtype=dtype)
    qgemm_wonly_kernel(x, q, s, s, s, y_t.t(), backend="reference", **SMALL)
    torch.testing.assert_close(y_t, y_direct, rtol=0, atol=0)


# ---- the default configs as compiled for the H100/H200 (sm_90a), no GPU -----------------------------------------
BF16_2, F8_2, F32_1 = ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.f8e4m3, 2), ts.ArgSpec(ts.f32, 1)


@pytest.mark.parametrize("name", ["act", "wonly", "fp8xfp8"])
def test_default_configs_fit_hopper(name):
    from tilestack.tune import aot
    if aot.missing_tools():
        pytest.skip(aot.missing_tools())
    kernel, args = {
        "act": (qgemm_act_kernel, (BF16_2, F8_2, F32_1, F32_1, BF16_2, BF16_2, 1.0, 1.0)),
        "wonly": (qgemm_wonly_kernel, (BF16_2, ts.ArgSpec(ts.i8, 2), F32_1, F32_1, BF16_2, BF16_2)),
        "fp8xfp8": (qgemm_kernel, (F8_2, F8_2, F32_1, F32_1, BF16_2, BF16_2, 1.0)),
    }[name]
    config = {n: t.default for n, t in kernel.tunables.items()} | kernel.options
    r = aot.resources(kernel, args, {}, config)
    assert r.ok, r.error
    assert r.spills in (0, None) and r.num_warps == 8 and r.num_stages == 4
