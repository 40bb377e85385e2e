"""tilestack.kernels.gemm's fused epilogue compiled by Triton on a CUDA GPU (skipped without one): GPT-2-small
MLP shapes, the Linear's weight read transposed (TMA) or a (K, N) operand, against float64 torch; NaN through
relu (a GPU's max(NaN, 0) is 0: the epilogue must not use it)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tilestack.kernels.gemm import ACTIVATIONS, gemm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ACT64 = {None: lambda x: x, "relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "silu": F.silu}
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", (None, *ACTIVATIONS))
@pytest.mark.parametrize("weight_t", [True, False], ids=["w.t()", "(K, N)"])
def test_mlp_shapes_match_float64(dtype, activation, weight_t):
    torch.manual_seed(0)
    M, K, N = 1000, 768, 3072                              # ragged M; GPT-2 small's c_fc
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    b = w.t() if weight_t else w.t().contiguous()          # (K, N)
    bias = 0.1 * torch.randn(N, device="cuda")
    r = torch.randn(M, N, device="cuda", dtype=dtype)
    for out_dtype in (None, torch.float32):
        y = gemm(x, b, bias=bias, activation=activation, residual=r, out_dtype=out_dtype)
        want = ACT64[activation]((x.double() @ b.double()) + bias.double()) + r.double()
        od = out_dtype or dtype
        assert y.dtype == od
        torch.testing.assert_close(y.double(), want.to(od).double(), rtol=TOL[od], atol=TOL[od] * 4)


def test_nan_row_stays_nan_through_relu():
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    x[5, 7] = math.nan
    w = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)
    y = gemm(x, w.t(), activation="relu")
    assert bool(y[5].isnan().all()) and not bool(y[torch.arange(64, device="cuda") != 5].isnan().any())
