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
