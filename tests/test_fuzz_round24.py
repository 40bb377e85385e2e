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
- attention of a query row whose scores are all -inf because q and k hold infinities (q's -inf against a key
  column of positive values; no mask, top-left causal or none) was NaN, where torch's SDPA gives o = 0 (and finite
  dv, dq of that row 0, dk NaN in the column the infinity multiplies): only rows that a mask or bottom-right
  alignment could empty had the running max start at the lowest finite f32 and the guarded division, so
  exp2(-inf + inf) made the row NaN, and the backward's P NaN. Every forward (the split kernel and the ping-pong
  schedule) now starts every row there and guards every division, and every backward (the split kernels and the
  warp-specialized schedule) raises every row's lse to the lowest f32; a one-max-per-row cost.
- in the same backwards a row made NaN by a +inf score (its lse NaN) gave NaN to dv of keys it never sees under a
  causal mask, where torch's is_causal leaves them finite: the masks filled -inf before lse was subtracted, and
  exp2(-inf - NaN) is NaN. The backwards now subtract lse first and mask after, so a masked entry's P is 0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward
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


# ---- attention rows whose scores are all -inf from the data ---------------------------------------------------------
def _infinite_rows(dtype=torch.float32, nq: int = 5, nk: int = 7, heads=(2, 1)):
    """q, k, v (1, H, Nq, 16) / (1, Hkv, Nk, 16) where row 1 of q holds -inf against k's positive column 0 (every
    score of that row -inf), row 3 holds +inf there (every score +inf: NaN, as torch's), the rest finite."""
    g = torch.Generator().manual_seed(2401)
    q = torch.randn(1, heads[0], nq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, heads[1], nk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, heads[1], nk, 16, generator=g, dtype=torch.float64)
    k[..., 0] = k[..., 0].abs() + 0.5
    q[:, :, 1, 0] = -math.inf
    q[:, 0, 3, 0] = math.inf
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa64(q, k, v, causal: bool, align: str):
    """torch's SDPA (GQA); bottom-right alignment (Nq <= Nk) as is_causal over Nk - Nq finite query rows put before
    q and dropped after (they get no gradient, so add nothing to dk, dv): a causal mask that leaves a row's unseen
    keys out, as is_causal does, not a boolean mask, whose -inf added to a NaN score stays NaN."""
    pad = k.shape[2] - q.shape[2] if causal and align == "bottom_right" else 0
    q = torch.cat((torch.zeros(*q.shape[:2], pad, q.shape[3], dtype=q.dtype), q), 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)[:, :, pad:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")],
                         ids=["full", "causal", "bottom_right"])
def test_attention_row_of_minus_inf_scores_from_the_data(causal, align, backend):
    """Forward and backward of tilestack.attention (GQA) against float64 torch: the -inf row's o is 0 and its
    gradients as torch's (dq 0, dv untouched by it, dk NaN only in the column its -inf multiplies)."""
    q, k, v = _infinite_rows()
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    want = [t.double().requires_grad_() for t in (q, k, v)]
    g = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(2402))
    with config.override(backend=backend), poisoned_allocations():
        o = tilestack.attention(*got, causal, causal_align=align)
        o.backward(g)
    o64 = _sdpa64(*want, causal, align)
    o64.backward(g.double())
    assert bool((o64[0, :, 1] == 0).all()), "the case is what it claims: torch's o is 0 on the -inf row"
    close(o, o64, 2e-6, f"attention o ({backend}, {align if causal else 'full'})")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a.grad, b.grad, 2e-5, f"attention d{name} ({backend}, {align if causal else 'full'})")


@pytest.mark.parametrize("schedule", ["pingpong", "ws"])
def test_attention_row_of_minus_inf_scores_on_the_scheduled_kernels(schedule):
    """The ping-pong forward and the warp-specialized backward (bf16, the reference executor) on the same rows:
    o = 0 on the -inf row, gradients as float64 torch's."""
    q, k, v = _infinite_rows(torch.bfloat16, nq=37, nk=23)
    g = torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(2403)).bfloat16()
    want = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = _sdpa64(*want, True, "top_left")
    o64.backward(g.double())
    with poisoned_allocations():
        fwd = dict(schedule="pingpong", BM=32, BN=16) if schedule == "pingpong" else {}
        o, lse = attention_forward(q, k, v, True, backend="reference", **fwd)
        close(o, o64, 2e-2, f"attention o ({schedule})")
        if schedule == "ws":
            cfg = {"dkdv": {"schedule": "ws", "BM": 16, "BN": 32}, "dq": {"schedule": "ws", "BM": 32, "BN": 16}}
            grads = attention_backward(q, k, v, o, lse, g, True, backend="reference", config=cfg)
            for name, a, b in zip("qkv", grads, want, strict=True):
                close(a, b.grad, 5e-2, f"attention d{name} ({schedule})")
