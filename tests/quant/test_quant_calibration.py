"""What fp8-act calibration fixes (tilestack.quant.linear, gemm.activation_scale), on the CPU: power-of-two
activation scales (values on the E4M3 grid stay exact, the kernels' f32 inverse is exact), the statistics
calibration records, and the bias correction for the weights' rounding (the quantized layer's mean output over
the calibration data is the float layer's)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tilestack
from tilestack.errors import LaunchError
from tilestack.ir.types import F8E4M3_MAX
from tilestack.quant import InputStats, QuantLinear, calibrate
from tilestack.quant.accuracy import DIGITS_PIXEL_MAX
from tilestack.quant.gemm import MIN_SCALE, activation_scale, inverse_scale, quantize_activation

AMAXES = [448.0, 449.0, 224.0, 224.0001, 1.0, 1 / 3, 3e-3, 1e5, 3.0e38]


@pytest.mark.parametrize("amax", AMAXES)
def test_activation_scale_is_the_smallest_power_of_two_that_fits(amax):
    s = activation_scale(amax)
    assert math.frexp(s)[0] == 0.5                          # a power of two
    assert F8E4M3_MAX / 2 < amax / s <= F8E4M3_MAX          # no calibrated value saturates; half a binade never
    assert inverse_scale(s) * s == 1.0                      # the kernels' f32 inverse is exact


def test_activation_scale_edges():
    assert activation_scale(0.0) == 1.0 and activation_scale(float("nan")) == 1.0
    assert activation_scale(1e-44) == MIN_SCALE             # subnormal amax: the smallest scale the kernels take


def test_values_on_the_e4m3_grid_stay_exact():
    """The digits' pixels k / 16 with amax 1: exact under 2^-8 (x / scale = 16 k); amax / 448 would give 28 k,
    which rounds from k = 3 on (84 -> 80)."""
    x = torch.arange(17, dtype=torch.float32) / DIGITS_PIXEL_MAX                  # (17,) 0, 1/16, ..., 1
    s = activation_scale(float(x.max()))
    assert s == 2.0**-8
    torch.testing.assert_close(quantize_activation(x, s).double() * s, x.double(), rtol=0, atol=0)
    off = float(x.max()) / F8E4M3_MAX                                             # the former rule
    assert not torch.equal(quantize_activation(x, off).double() * off, x.double())


def test_calibrate_records_the_largest_and_the_mean_input():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(2, 4, 6), torch.randn(0, 4, 6), torch.randn(3, 6) * 4]   # (B, T, K) rows, one empty
    stats = calibrate(model, ["0", "2"], batches)
    rows = torch.cat([batches[0].reshape(-1, 6), batches[2]])                        # (11, 6)
    assert isinstance(stats["0"], InputStats) and stats["0"].amax == float(rows.abs().max())
    torch.testing.assert_close(stats["0"].mean, rows.double().mean(0))
    with torch.no_grad():
        hidden = model[1](model[0](rows))
    torch.testing.assert_close(stats["2"].mean, hidden.double().mean(0))
    assert calibrate(model, ["0"], [batches[1]])["0"] == InputStats(0.0, None)      # nothing seen: no mean


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_keeps_the_mean_output(bias):
    """fp8-act's layer on the calibration data: the weights' rounding moves the mean output by (W - Wq) E[x]
    (here, inputs of mean 2, by ~1e-1); the corrected bias takes it back (to f32 rounding). A layer without a
    bias gets one."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 32, bias=bias)
    x = torch.randn(512, 64) + 2.0                                    # (512, 64) inputs of mean 2
    q = tilestack.quantize(copy.deepcopy(lin), "fp8-act", calibration=[x[:256], x[256:]])
    assert isinstance(q, QuantLinear) and q.bias is not None
    w_deq = q.qweight.double() * q.scale.double()[:, None]          # (32, 64)
    b = lin.bias.detach().double() if bias else torch.zeros(32, dtype=torch.float64)
    want = x.double().mean(0) @ lin.weight.detach().double().T + b  # (32,) the float layer's mean output
    uncorrected = x.double().mean(0) @ w_deq.T + b
    assert float((uncorrected - want).abs().max()) > 1e-2
    torch.testing.assert_close(x.double().mean(0) @ w_deq.T + q.bias.double(), want, rtol=0, atol=1e-5)


def test_weight_only_modes_keep_the_bias():
    lin = nn.Linear(8, 4)
    for mode in ("int8", "fp8"):
        q = tilestack.quantize(copy.deepcopy(lin), mode)
        assert torch.equal(q.bias, lin.bias.detach())
    assert tilestack.quantize(nn.Linear(8, 4, bias=False), "fp8").bias is None


def test_input_mean_of_the_wrong_width_is_refused():
    with pytest.raises(LaunchError, match=r"input_mean is \(7,\); expected a tensor \(in_features=8,\)"):
        QuantLinear(nn.Linear(8, 4), "fp8", 0.5, torch.zeros(7))
