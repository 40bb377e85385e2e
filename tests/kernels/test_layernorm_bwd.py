"""tilestack.kernels.layer_norm_backward (the shared norm backward, centred) on both backends against float64
PyTorch autograd and the reference executor, from the forward's saved mean and 1/std: one-tile and multi-pass
rows, every float dtype, rows far from zero mean, and the argument checks."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import layer_norm, layer_norm_backward

bwd_module = importlib.import_module("tilestack.kernels.layernorm_bwd")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
CASES = [((13, 300), dict(BM=2, BN=512, ONE_TILE=True)), ((6, 64), dict(BM=4, BN=64, ONE_TILE=True)),
         ((9, 300), dict(BM=2, BN=128)), ((3, 257), dict(BM=1, BN=64))]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def f64_grads(x, w, b, dy, eps):
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.layer_norm(xd, x.shape[-1:], wd, bd, eps)
    return torch.autograd.grad(y, (xd, wd, bd), dy.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cfg", CASES, ids=str)
def test_layer_norm_backward_matches_float64_and_reference(backend, dtype, shape, cfg, rng, poison_empty):
    x = torch.from_numpy(rng.normal(3.0, 2.0, shape)).to(dtype)     # mean far from 0: the centring matters
    w = torch.from_numpy(rng.normal(1.0, 0.5, shape[1:])).to(dtype)
    b = torch.from_numpy(rng.normal(0.0, 0.5, shape[1:])).to(dtype)
    dy = torch.from_numpy(rng.normal(0.0, 1.0, shape)).to(dtype)
    eps = 1e-5
    _, mean, rstd = layer_norm(x, w, b, eps, backend="reference")
    dx64, dw64, db64 = f64_grads(x, w, b, dy, eps)

    dx, dw, db = layer_norm_backward(dy, x, w, mean, rstd, backend=backend, **cfg)
    rdx, rdw, rdb = layer_norm_backward(dy, x, w, mean, rstd, backend="reference", **cfg)
    assert dx.shape == shape and dx.dtype == dtype and dw.dtype == db.dtype == dtype
    tol = TOL[dtype]
    for got, ref, want in ((dx, rdx, dx64), (dw, rdw, dw64), (db, rdb, db64)):
        assert rel(got, want) <= tol and rel(got, ref) <= tol


def test_layer_norm_backward_of_constant_rows_is_finite():
    """A constant row has variance 0: rstd = 1/sqrt(eps), xhat = 0, and dx = rstd * (g - mean(g)) is finite."""
    x = torch.full((3, 50), 7.0)
    w, b = torch.ones(50), torch.zeros(50)
    dy = torch.linspace(-1, 1, 150).view(3, 50)
    _, mean, rstd = layer_norm(x, w, b, 1e-5, backend="reference")
    dx, dw, db = layer_norm_backward(dy, x, w, mean, rstd, backend="triton", BM=1, BN=64, ONE_TILE=True)
    dx64, dw64, db64 = f64_grads(x, w, b, dy, 1e-5)
    assert rel(dx, dx64) <= 1e-4 and float(dw.abs().max()) <= 1e-6 and rel(db, db64) <= 1e-6


@pytest.mark.parametrize("call,match", [
    (lambda: layer_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.ones(2)[None],
                                 torch.ones(2)), "mean must have rank 1"),
    (lambda: layer_norm_backward(torch.ones(2, 4).half(), torch.ones(2, 4), torch.ones(4), torch.ones(2),
                                 torch.ones(2)), "dy has dtype float16; expected one of float32"),
    (lambda: layer_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(3), torch.ones(2),
                                 torch.ones(2)), "weight has 3 elements"),
], ids=["mean-rank", "dy-dtype", "weight-size"])
def test_layer_norm_backward_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(bwd_module, "norm_bwd_kernel", "partial_sum_kernel")
    with pytest.raises(LaunchError, match=match):
        call()
