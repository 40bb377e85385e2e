"""Quantized GEMMs on a CUDA GPU (skipped without one): the compiled Triton kernels against float64 and the
reference semantics, the fp8 x fp8 mma (sm_89+) included."""

from __future__ import annotations

import pytest
import torch

from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.gemm import quantize_fp8_kernel, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _fp8_capable() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("mode,x_scale", [("int8", None), ("fp8", None), ("fp8", "calibrated")])
@pytest.mark.parametrize("M,K,N", [(8192, 768, 2304), (77, 300, 129), (1, 64, 64)])
def test_quantized_linear_cuda(mode, x_scale, M, K, N):
    if mode == "fp8" and not _fp8_capable():
        pytest.skip("fp8 needs compute capability 8.9+")
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * K**-0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_weight(w, mode)
    xs = float(x.abs().max()) / 448 if x_scale else None
    y = quantized_linear(x, q, s, b, x_scale=xs)
    want = reference(x, q, s, b, xs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_quantize_fp8_kernel_cuda_matches_torch_cast():
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability 8.9+")
    x = torch.randn(300, 500, device="cuda") * 100
    x[7, 11] = float("nan")
    q = torch.empty(x.shape, device="cuda", dtype=torch.float8_e4m3fn)
    quantize_fp8_kernel(x, q, 0.5)
    want = (x * 0.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    torch.testing.assert_close(q.float(), want.float(), rtol=0, atol=0, equal_nan=True)
    assert q[7, 11].float().isnan()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_gemm_quantizes_as_torch_casts_cuda(dtype):
    """qgemm_act_kernel's in-register quantizer on the GPU (cvt.rn.satfinite) against torch's cast of
    x * f32(1 / x_scale): through an identity W the GEMM returns the E4M3 values times x_scale; +-1e4 saturate."""
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability 8.9+")
    from tilestack.quant.gemm import inverse_scale, qgemm_act_kernel, quantize_activation

    torch.manual_seed(1)
    K, x_scale = 128, 0.037
    x = torch.cat([torch.randn(300, K) * 5, torch.full((1, K), 1e4), torch.full((1, K), -1e4)]).to(dtype).cuda()
    eye = torch.eye(K, device="cuda").to(torch.float8_e4m3fn)
    ones = torch.ones(K, device="cuda")
    y = torch.empty(x.shape[0], K, device="cuda")
    qgemm_act_kernel(x, eye, ones, ones, ones, y, x_scale, inverse_scale(x_scale))
    want = quantize_activation(x, x_scale).float() * x_scale
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("M,K,N", [(8192, 768, 2304), (77, 300, 129)])
def test_fp8_chain_layers_cuda(M, K, N):
    """The fp8 producers on the GPU: a norm writing fp8 (quant.producers.norm_fp8), the fp8 x fp8 GEMM at its
    tuned config reading it, and the GEMM writing the next layer's fp8 (out_scale), each against the reference
    executor on the same inputs."""
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability 8.9+")
    from tilestack.quant.producers import norm_fp8

    torch.manual_seed(2)
    x, r = (torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(K, device="cuda", dtype=torch.bfloat16), torch.randn(K, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_weight(torch.randn(N, K, device="cuda") * K**-0.5, "fp8")
    xs, ys = 4.0 / 448, 2.0 / 448
    y8, h = norm_fp8(x, w, b, 1e-5, xs, residual=r)
    y8_ref, h_ref = norm_fp8(x.cpu(), w.cpu(), b.cpu(), 1e-5, xs, residual=r.cpu(), backend="reference")
    assert y8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(h.cpu(), h_ref)
    # the same fp8 value, or one step apart where f32 rounding differs at a boundary
    assert float((y8.cpu().float() != y8_ref.float()).float().mean()) < 1e-3
    out = quantized_linear(y8, q, s, b[:0].new_zeros(N), x_scale=xs)
    want = reference(y8.float() * xs, q, s, None, None).float()     # (y8 x_scale) @ (q s)^T: exact fp8 products
    torch.testing.assert_close(out.float(), want.to(out.device), rtol=2e-2, atol=2e-2)
    z8 = quantized_linear(y8, q, s, x_scale=xs, activation="gelu_tanh", out_scale=ys)
    z = quantized_linear(y8, q, s, x_scale=xs, activation="gelu_tanh", out_dtype=torch.float32)
    want8 = (z / ys).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert z8.dtype == torch.float8_e4m3fn
    assert float((z8.float() != want8.float()).float().mean()) < 1e-2
