"""The quantized GEMMs' fused epilogue (tilestack.kernels.gemm's: bias, activation, residual on the f32
accumulator after the scales) against float64 torch, on the reference executor and Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tilestack.errors import LaunchError
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.gemm import reference

SMALL = dict(BM=16, BN=16, BK=16)
ACT64 = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def want64(x, q, s, bias, activation, residual, x_scale=None):
    """Plain float64 torch, written out here (not the module's reference): dequantized weights, the fp8 rounding
    of x by torch's cast when x_scale is given."""
    xf = x.double()
    if x_scale is not None:
        xf = (x.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * x_scale
    y = ACT64[activation](xf @ (q.double() * s.double()[:, None]).T + bias.double())
    return y + residual.double()


@pytest.mark.parametrize("backend,mode,x_scale", [("reference", "int8", None), ("reference", "fp8", 0.05),
                                                  ("triton", "int8", None), ("triton", "fp8", None)])
@pytest.mark.parametrize("activation", sorted(ACT64))
def test_quantized_linear_epilogue(backend, mode, x_scale, activation):
    """(Triton's interpreter rounds f32 -> fp8 wrongly, so fp8 activations run on the reference only.)"""
    torch.manual_seed(3)
    x = torch.randn(37, 40).to(torch.bfloat16)               # ragged against 16-wide tiles
    w, b = torch.randn(29, 40) * 0.2, torch.randn(29)
    residual = torch.randn(37, 29).to(torch.bfloat16)
    q, s = quantize_weight(w, mode)
    y = quantized_linear(x, q, s, b, x_scale=x_scale, activation=activation, residual=residual, backend=backend,
                         **SMALL)
    assert y.dtype == torch.bfloat16 and y.shape == (37, 29)
    want = want64(x, q, s, b, activation, residual, x_scale)
    torch.testing.assert_close(y.double(), want.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)
    # the module's reference says the same
    torch.testing.assert_close(reference(x, q, s, b, x_scale, activation=activation, residual=residual).double(),
                               want.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_k_is_the_epilogue_of_zeros(backend):
    """K = 0: gelu(bias) + residual (before the epilogue, K = 0 gave the bias alone on the host)."""
    q, s = quantize_weight(torch.randn(5, 0), "int8")
    b = torch.linspace(-2, 2, 5)
    r = torch.arange(15.0).reshape(3, 5)
    y = quantized_linear(torch.randn(3, 0), q, s, b, activation="gelu", residual=r, backend=backend)
    torch.testing.assert_close(y, F.gelu(b).expand(3, 5) + r)


def test_bad_epilogue_arguments():
    q, s = quantize_weight(torch.randn(5, 8), "int8")
    x = torch.randn(3, 8)
    with pytest.raises(LaunchError, match=r"activation='tanh'; expected None or one of"):
        quantized_linear(x, q, s, activation="tanh")
    with pytest.raises(LaunchError, match=r"residual is \(5, 3\); expected the output's shape"):
        quantized_linear(x, q, s, residual=torch.zeros(5, 3))
    with pytest.raises(LaunchError, match=r"residual has dtype int64"):
        quantized_linear(x, q, s, residual=torch.zeros(3, 5, dtype=torch.int64))


def test_nan_in_x_stays_nan():
    """A NaN in a row of x is NaN in that output row through relu (a GPU's max(NaN, 0) would give 0)."""
    q, s = quantize_weight(torch.randn(6, 16), "int8")
    x = torch.randn(4, 16)
    x[2, 3] = math.nan
    y = quantized_linear(x, q, s, activation="relu", backend="reference")
    assert bool(y[2].isnan().all()) and not bool(y[[0, 1, 3]].isnan().any())
