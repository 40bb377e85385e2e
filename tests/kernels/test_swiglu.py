"""tilestack.kernels.swiglu and swiglu_backward on both backends against float64 PyTorch autograd and the
reference executor: ragged shapes, every float dtype, the halves of one tensor in and out (strided views),
saturated sigmoids, and the argument checks."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import swiglu, swiglu_backward

mod = importlib.import_module("tilestack.kernels.swiglu")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def f64(a, b, dy):
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    y = torch.nn.functional.silu(ad) * bd
    return (y.detach(), *torch.autograd.grad(y, (ad, bd), dy.double()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cfg", [((7, 45), dict(BM=4, BN=16)), ((3, 130), dict(BM=2, BN=64)),
                                       ((16, 32), dict(BM=8, BN=32))], ids=str)
def test_swiglu_matches_float64_and_reference(backend, dtype, shape, cfg, rng, poison_empty):
    m, f = shape
    gu = torch.from_numpy(rng.normal(0.0, 3.0, (m, 2 * f))).to(dtype)   # [gate | up], one tensor
    a, b = gu[:, :f], gu[:, f:]
    dy = torch.from_numpy(rng.normal(0.0, 1.0, shape)).to(dtype)
    y64, da64, db64 = f64(a, b, dy)

    y = swiglu(a, b, backend=backend, **cfg)
    ry = swiglu(a, b, backend="reference", **cfg)
    grad = torch.empty(m, 2 * f, dtype=dtype)                         # both halves of one gradient
    swiglu_backward(dy, a, b, da=grad[:, :f], db=grad[:, f:], backend=backend, **cfg)
    rda, rdb = swiglu_backward(dy, a, b, backend="reference", **cfg)
    tol = TOL[dtype]
    assert y.dtype == dtype and rel(y, y64) <= tol and rel(y, ry) <= tol
    assert rel(grad[:, :f], da64) <= tol and rel(grad[:, :f], rda) <= tol
    assert rel(grad[:, f:], db64) <= tol and rel(grad[:, f:], rdb) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_saturated_gates(backend):
    """Gates of +-80 (sigmoid 1 or 0 in f32) and +-1e4: silu is a or 0, its slope 1 or 0, nothing NaN."""
    a = torch.tensor([[80.0, -80.0, 1e4, -1e4, 0.0, 2.0, -2.0, 0.5]])
    b = torch.full_like(a, 3.0)
    dy = torch.ones_like(a)
    y = swiglu(a, b, backend=backend, BM=1, BN=16)
    da, db = swiglu_backward(dy, a, b, backend=backend, BM=1, BN=16)
    y64, da64, db64 = f64(a, b, dy)
    assert rel(y, y64) <= 1e-6 and rel(da, da64) <= 1e-6 and rel(db, db64) <= 1e-6


@pytest.mark.parametrize("call,match", [
    (lambda: swiglu(torch.ones(2, 3), torch.ones(2, 4)), "b is \\(2, 4\\); expected a's shape"),
    (lambda: swiglu(torch.ones(2, 3), torch.ones(2, 3).half()), "b has dtype float16; expected one of float32"),
    (lambda: swiglu(torch.ones(6), torch.ones(6)), "a must have rank 2"),
    (lambda: swiglu(torch.ones(2, 3), torch.ones(2, 3), out=torch.ones(3, 3)), "out is \\(3, 3\\)"),
    (lambda: swiglu_backward(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), da=torch.ones(2, 2)),
     "da is \\(2, 2\\)"),
], ids=["shape", "dtype", "rank", "out", "da"])
def test_swiglu_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(mod, "swiglu_fwd_kernel", "swiglu_bwd_kernel")
    with pytest.raises(LaunchError, match=match):
        call()


def test_gpu_default_config_trace_and_run(rng):
    cfg = mod.default_config("cuda")
    a = torch.from_numpy(rng.normal(0.0, 2.0, (5, 1100))).float()
    b = torch.from_numpy(rng.normal(0.0, 1.0, (5, 1100))).float()
    y = swiglu(a, b, backend="triton", **cfg)
    da, db = swiglu_backward(torch.ones_like(a), a, b, backend="triton", **cfg)
    y64, da64, db64 = f64(a, b, torch.ones_like(a))
    assert rel(y, y64) <= 1e-6 and rel(da, da64) <= 1e-6 and rel(db, db64) <= 1e-6
