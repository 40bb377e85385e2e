"""tilestack.kernels.rotary on both backends against float64 rotate-half RoPE and the reference executor:
q and k with different head counts (GQA, MQA), every float dtype, strided inputs and heads-first outputs,
the inverse rotation (the backward) undoing the forward, and the argument checks."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import rotary, rotary_tables

mod = importlib.import_module("tilestack.kernels.rotary")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def rope64(x, cos, sin, sign: float = 1.0):
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[None, :, None, :], sign * sin.double()[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def test_rotary_tables_are_the_angles():
    cos, sin = rotary_tables(7, 8, theta=100.0)
    p, i = 5, 3
    angle = p * 100.0 ** (-2 * i / 8)
    assert cos.shape == (7, 4) and cos.dtype == torch.float32
    assert abs(float(cos[p, i]) - math.cos(angle)) <= 1e-7 and abs(float(sin[p, i]) - math.sin(angle)) <= 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,H,Hkv,D", [(2, 5, 3, 1, 16), (1, 9, 4, 2, 32), (1, 3, 2, 2, 64)], ids=str)
def test_rotary_matches_float64_and_inverse_undoes_it(backend, dtype, B, N, H, Hkv, D, rng, poison_empty):
    qkv = torch.from_numpy(rng.normal(0.0, 1.0, (B, N, (H + 2 * Hkv) * D))).to(dtype)   # a fused projection
    q = qkv[..., :H * D].view(B, N, H, D)                                               # strided views of it
    k = qkv[..., H * D:(H + Hkv) * D].view(B, N, Hkv, D)
    cos, sin = rotary_tables(N, D)
    q_out = torch.empty(B, H, N, D, dtype=dtype).transpose(1, 2)                       # heads-first storage
    qr, kr = rotary(q, k, cos, sin, q_out=q_out, backend=backend)
    rq, rk = rotary(q, k, cos, sin, backend="reference")
    tol = TOL[dtype]
    assert qr is q_out and kr.shape == k.shape and kr.dtype == dtype
    assert rel(qr, rope64(q, cos, sin)) <= tol and rel(kr, rope64(k, cos, sin)) <= tol
    assert rel(qr, rq) <= tol and rel(kr, rk) <= tol
    qi, ki = rotary(qr, kr, cos, sin, inverse=True, backend=backend)
    assert rel(qi, rope64(qr, cos, sin, -1.0)) <= tol and rel(ki, rope64(kr, cos, sin, -1.0)) <= tol
    assert rel(qi, q) <= 2 * tol and rel(ki, k) <= 2 * tol


def test_rotary_long_positions_keep_f32_angles():
    """Position 8191 at the fastest frequency: the f32 table is the float64 angle to 1e-6 (no bf16 tables)."""
    n, d = 8192, 16
    cos, sin = rotary_tables(n, d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    assert float((cos.double() - angles.cos()).abs().max()) <= 1e-6
    assert float((sin.double() - angles.sin()).abs().max()) <= 1e-6


@pytest.mark.parametrize("call,match", [
    (lambda c, s: rotary(torch.ones(1, 4, 2, 16), torch.ones(1, 5, 2, 16), c, s), "k is \\(1, 5, 2, 16\\)"),
    (lambda c, s: rotary(torch.ones(1, 4, 2, 12), torch.ones(1, 4, 2, 12), c[:, :6], s[:, :6]),
     "head dim D=12"),
    (lambda c, s: rotary(torch.ones(1, 4, 2, 8), torch.ones(1, 4, 2, 8), c[:, :4], s[:, :4]), "head dim D=8"),
    (lambda c, s: rotary(torch.ones(1, 4, 2, 16), torch.ones(1, 4, 2, 16), c[:3], s[:3]), "cos is \\(3, 8\\)"),
    (lambda c, s: rotary(torch.ones(1, 4, 2, 16), torch.ones(1, 4, 2, 16), c.double(), s), "cos has dtype"),
    (lambda c, s: rotary(torch.ones(4, 2, 16), torch.ones(4, 2, 16), c, s), "q must have rank 4"),
    (lambda c, s: rotary(torch.ones(1, 4, 2, 16), torch.ones(1, 4, 2, 16), c, s,
                         q_out=torch.ones(1, 4, 3, 16)), "q_out is \\(1, 4, 3, 16\\)"),
], ids=["k-shape", "head-dim", "head-dim-small", "table-rows", "table-dtype", "rank", "q_out"])
def test_rotary_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(mod, "rotary_kernel")
    cos, sin = rotary_tables(4, 16)
    with pytest.raises(LaunchError, match=match):
        call(cos, sin)
