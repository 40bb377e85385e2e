"""Fuzz round twenty-four, part one: the sigmoid inside swiglu (forward and backward) and the GEMM epilogue's silu
and gelu_tanh on the far negative band where 1 / (1 + exp(-x)) loses its value, on both CPU backends (the NumPy
reference executor and Triton's interpreter), against float64 torch; -inf, +inf and NaN gates; swiglu's gradient
with only some inputs needing one. Every result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- the Triton backend lowered ``ts.sigmoid`` to ``tl.sigmoid`` (1 / (1 + exp(-x))): past x = -88.7 exp(-x) overflows
  f32, so sigmoid was 0 where its value (e^x, down to f32's subnormals at x = -103) still counts; silu(-90) =
  -7.4e-38 (a normal f32) came out -0.0, and so did swiglu's da and the GEMM epilogue's silu (x < -88.7) and
  gelu_tanh (x < -9.9), where the reference executor and float64 torch give the value. Both GPU backends (Triton,
  Gluon) now emit where(x >= 0, 1, t) / (1 + t) with t = exp(-|x|) <= 1, which overflows nowhere (NaN stays NaN,
  sigmoid(-inf) = 0, sigmoid(inf) = 1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack.kernels as K
from tilestack import config
from tilestack.kernels.gemm import gemm
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

BACKENDS = ("reference", "triton")
SMALL = dict(BM=32, BN=32, BK=16, GROUP_M=4, num_warps=4, num_stages=1)
TINY = 2.0 ** -149          # f32's smallest subnormal: the absolute grain of a result in the subnormal range


def f32_close(got: torch.Tensor, want: torch.Tensor, rtol: float, grains: float, what: str) -> None:
    """got (f32) within rtol of float64's ``want`` relatively, or ``grains`` subnormal steps (times the largest |x|
    that multiplies a subnormal in the computation) absolutely; NaN and infinities exactly where want has them."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().flatten().tolist()}, " \
        f"float64 torch at {want.isnan().nonzero().flatten().tolist()}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]) and not got[~inf].isinf().any(), f"{what}: infinities differ"
    ok = want.isfinite()
    err = (got[ok] - want[ok]).abs()
    bound = rtol * want[ok].abs() + grains * TINY
    bad = err > bound
    assert not bad.any(), f"{what}: got {got[ok][bad][:4].tolist()}, float64 torch {want[ok][bad][:4].tolist()}"


def _band(lo: float, hi: float, n: int = 64) -> torch.Tensor:
    """n f32 values from lo to hi with the special values after them."""
    return torch.cat((torch.linspace(lo, hi, n), torch.tensor([-math.inf, math.inf, math.nan, 0.0, -0.0, 1.0, -1.0])))


# ---- swiglu on the far negative band -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_forward_keeps_silu_of_far_negative_gates(backend):
    """silu(a) * b for gates a in [-104, -80]: e^a a is a normal f32 down to a = -87.3 and a subnormal down to
    -103.9; the Triton backend gave -0.0 past -88.7."""
    a = _band(-104.0, -80.0).view(1, -1)
    b = torch.full_like(a, 1.0)
    with config.override(backend=backend), poisoned_allocations():
        y = K.swiglu(a, b)
    want = F.silu(a.double()) * b.double()
    f32_close(y, want, 1e-5, 4 * 104, f"swiglu forward on {backend}")
    band = (a > -95.0) & (a < -88.8)
    assert (y[band] != 0).all(), f"swiglu on {backend}: silu of a gate in (-95, -88.8) flushed to zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_backward_keeps_the_slope_of_far_negative_gates(backend):
    """da = dy b s (1 + a (1 - s)) and db = dy silu(a) for gates in [-104, -80] (and -inf, inf, NaN), as float64
    torch's silu backward: NaN at a = +-inf (0 * inf, as torch's own formula), the tiny slope kept."""
    a = _band(-104.0, -80.0).view(1, -1)
    b = torch.full_like(a, -2.0)
    dy = torch.full_like(a, 1.5)
    with config.override(backend=backend), poisoned_allocations():
        da, db = K.swiglu_backward(dy, a, b)
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    (F.silu(ad) * bd).backward(dy.double())
    f32_close(da, ad.grad, 1e-5, 16 * 104, f"swiglu da on {backend}")
    f32_close(db, bd.grad, 1e-5, 4 * 104, f"swiglu db on {backend}")
    band = (a > -95.0) & (a < -88.8)
    assert (da[band] != 0).all() and (db[band] != 0).all(), f"swiglu backward on {backend}: flushed to zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_op_gradient_on_far_negative_gates_with_one_input_needing_it(backend):
    """The autograd op (x = [a | b]) on gates in the band: forward and dx as float64 torch's."""
    a = _band(-100.0, -86.0, 16).view(1, -1)
    x = torch.cat((a, torch.linspace(-3.0, 3.0, a.shape[1]).view(1, -1)), -1)
    xl, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    g = torch.linspace(-1.0, 1.0, a.shape[1]).view(1, -1)
    with config.override(backend=backend), poisoned_allocations():
        y = ops.swiglu(xl)
        y.backward(g)
    f = a.shape[1]
    yd = F.silu(xd[:, :f]) * xd[:, f:]
    yd.backward(g.double())
    f32_close(y, yd, 1e-5, 4 * 100, f"swiglu op forward on {backend}")
    f32_close(xl.grad, xd.grad, 1e-5, 16 * 100, f"swiglu op dx on {backend}")


# ---- the GEMM epilogue's sigmoid-based activations -----------------------------------------------------------------
def _gelu_tanh64(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh u) written as x sigmoid(2u) = x / (1 + e^-2u) in float64: torch's own float64 gelu_tanh
    rounds 1 + tanh(u) to 0 once u < -19 and loses the tail this test reads."""
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    return x / (1 + torch.exp(-2 * u))


ACT64 = {"silu": F.silu, "gelu_tanh": _gelu_tanh64}
BANDS = {"silu": (-104.0, -80.0), "gelu_tanh": (-10.6, -9.6)}     # gelu_tanh: sigmoid(2u) with 2u ~ -1.6 (x + .045 x^3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACT64))
def test_gemm_epilogue_activation_on_its_far_negative_band(activation, backend):
    """K = 0 makes the accumulator zeros and the f32 output activation(bias): the band where the activation's
    sigmoid is below f32's normals (or e^x overflows in 1 / (1 + e^x)), against float64 torch."""
    x = _band(*BANDS[activation])
    a, b = torch.zeros(1, 0, dtype=torch.bfloat16), torch.zeros(0, x.numel(), dtype=torch.bfloat16)
    with poisoned_allocations():
        y = gemm(a, b, bias=x, activation=activation, out_dtype=torch.float32, backend=backend, **SMALL)[0]
    want = ACT64[activation](x.double())
    # gelu_tanh: the f32 rounding of u = sqrt(2/pi) (x + 0.044715 x^3) ~ -46 moves e^2u by ~1e-5 relatively
    f32_close(y, want, 1e-5 if activation == "silu" else 2e-4, 8 * 104, f"{activation} on {backend}")
    lo, hi = BANDS[activation]
    inner = (x > lo + 0.25 * (hi - lo)) & (x < hi)
    assert (y[inner] != 0).all(), f"{activation} on {backend}: a value inside its band flushed to zero"
