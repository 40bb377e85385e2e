"""The persistent quantized GEMM (``quant.gemm.qgemm_persistent_kernel``: min(tiles, PROGRAMS) programs walking
the output tiles in grouped order) against float64 torch on the reference executor and Triton's interpreter:
ragged shapes, fewer programs than tiles and more, the fused epilogue, fp8 and weight-only int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilestack.quant import quantize_weight
from tilestack.quant.gemm import activation_scale, qgemm_persistent_kernel, quantize_activation

SMALL = dict(BM=16, BN=32, BK=16, GROUP_M=4, num_warps=4, num_stages=1)


def _want(x, q, s, x_scale, bias=None, residual=None, activation=None):
    y = x.double() @ q.double().T * (x_scale * s.double())[None, :]
    if bias is not None:
        y = y + bias.double()
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("M,K,N,programs", [(37, 50, 70, 3), (64, 64, 64, 1), (5, 130, 33, 64), (100, 16, 96, 7)])
def test_fp8_persistent_matches_float64(backend, M, K, N, programs):
    torch.manual_seed(M + K + N)
    x, w = torch.randn(M, K), torch.randn(N, K) * K**-0.5
    q, s = quantize_weight(w, "fp8")
    xs = activation_scale(float(x.abs().max()))
    xq = quantize_activation(x, xs)
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    qgemm_persistent_kernel(xq, q, s, s, s, y, xs, PROGRAMS=programs, backend=backend, **SMALL)
    assert not y.isnan().any()
    torch.testing.assert_close(y.double(), _want(xq.float(), q.float(), s, xs).to(torch.bfloat16).double(),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_persistent_epilogue_and_weight_only(backend):
    """int8 weights widened to bf16 x in the loop, bias, gelu and the residual in the epilogue; 3 programs for
    12 tiles (each walks 4)."""
    torch.manual_seed(1)
    M, K, N = 45, 40, 70
    x = torch.randn(M, K).to(torch.bfloat16)
    q, s = quantize_weight(torch.randn(N, K) * 0.2, "int8")
    b, r = torch.randn(N), torch.randn(M, N).to(torch.bfloat16)
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    qgemm_persistent_kernel(x, q, s, b, r, y, 1.0, PROGRAMS=3, HAS_BIAS=True, HAS_RESIDUAL=True, activation="gelu",
                            backend=backend, **SMALL)
    want = _want(x.float(), q.float(), s, 1.0, b, r.float(), "gelu")
    torch.testing.assert_close(y.double(), want.to(torch.bfloat16).double(), rtol=1e-2, atol=2e-2)
