"""tilestack.kernels.rms_norm and rms_norm_backward on both backends against float64 PyTorch autograd and the
reference executor: one-tile and multi-pass rows, ragged widths, every float dtype, extreme magnitudes,
empty inputs, and the argument checks (refused before any launch)."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import add_layer_norm, add_rms_norm, layer_norm_backward, rms_norm, rms_norm_backward

rms_module = importlib.import_module("tilestack.kernels.rmsnorm")
bwd_module = importlib.import_module("tilestack.kernels.layernorm_bwd")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (shape, config): one tile holding the row, several rows per program, and the multi-pass path
CASES = [((13, 300), dict(BM=2, BN=512, ONE_TILE=True)), ((5, 7), dict(BM=4, BN=128, ONE_TILE=True)),
         ((9, 300), dict(BM=2, BN=128)), ((3, 257), dict(BM=1, BN=128))]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def f64(x, w, dy, eps):
    """(y, rstd, dx, dw) in float64 autograd."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rstd = torch.rsqrt(xd.pow(2).mean(-1) + eps)
    y = xd * rstd[:, None] * wd
    dx, dw = torch.autograd.grad(y, (xd, wd), dy.double())
    return y.detach(), rstd.detach(), dx, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cfg", CASES, ids=str)
def test_rms_norm_forward_backward_match_float64_and_reference(backend, dtype, shape, cfg, rng, poison_empty):
    x = torch.from_numpy(rng.normal(0.5, 2.0, shape)).to(dtype)
    w = torch.from_numpy(rng.normal(1.0, 0.5, shape[1:])).to(dtype)
    dy = torch.from_numpy(rng.normal(0.0, 1.0, shape)).to(dtype)
    eps = 1e-6
    y64, rstd64, dx64, dw64 = f64(x, w, dy, eps)

    y, rstd = rms_norm(x, w, eps, backend=backend, **cfg)
    ry, rrstd = rms_norm(x, w, eps, backend="reference", **cfg)
    assert y.shape == shape and y.dtype == dtype and rstd.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(y, y64) <= tol and rel(y, ry) <= tol
    assert rel(rstd, rstd64) <= 1e-5 and rel(rstd, rrstd) <= 1e-6

    dx, dw = rms_norm_backward(dy, x, w, rstd, backend=backend, **cfg)
    rdx, rdw = rms_norm_backward(dy, x, w, rstd, backend="reference", **cfg)
    assert dx.dtype == dtype and dw.dtype == dtype and dw.shape == shape[1:]
    assert rel(dx, dx64) <= tol and rel(dx, rdx) <= tol
    assert rel(dw, dw64) <= tol and rel(dw, rdw) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-20, 1e15])
def test_rms_norm_extreme_magnitudes(backend, scale, rng):
    """Rows of tiny and huge values normalise to the same y (the f32 sum of squares stays finite at 1e15)."""
    x = torch.from_numpy(rng.normal(0.0, 1.0, (4, 100))).float()
    w = torch.ones(100)
    y, rstd = rms_norm(x * scale, w, 0.0, backend=backend, BM=1, BN=128, ONE_TILE=True)
    want = x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt()
    assert rel(y, want) <= 1e-5
    dy = torch.from_numpy(rng.normal(0.0, 1.0, (4, 100))).float()
    dx, dw = rms_norm_backward(dy, x * scale, w, rstd, backend=backend, BM=1, BN=128, ONE_TILE=True)
    _, _, dx64, dw64 = f64(x * scale, w, dy, 0.0)
    assert rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5


def test_rms_norm_mixed_dtypes_and_strided_rows(rng):
    """An f32 weight with bf16 x, and x a strided view (every other row), give the float64 answer."""
    base = torch.from_numpy(rng.normal(0.0, 1.0, (10, 64))).to(torch.bfloat16)
    x = base[::2]
    w = torch.from_numpy(rng.normal(1.0, 0.1, 64)).float()
    dy = torch.from_numpy(rng.normal(0.0, 1.0, (5, 64))).to(torch.bfloat16)
    y, rstd = rms_norm(x, w, 1e-6, backend="triton", BM=2, BN=64, ONE_TILE=True)
    dx, dw = rms_norm_backward(dy, x, w, rstd, backend="triton", BM=2, BN=64, ONE_TILE=True)
    y64, _, dx64, dw64 = f64(x, w, dy, 1e-6)
    assert dw.dtype == torch.float32
    assert rel(y, y64) <= 1e-2 and rel(dx, dx64) <= 1e-2 and rel(dw, dw64) <= 1e-2


def test_rms_norm_no_rows(poison_empty):
    x, w = torch.empty(0, 32), torch.ones(32)
    y, rstd = rms_norm(x, w, backend="triton")
    dx, dw = rms_norm_backward(torch.empty(0, 32), x, w, rstd, backend="triton")
    assert y.shape == (0, 32) and dx.shape == (0, 32)
    assert torch.equal(dw, torch.zeros(32))


@pytest.mark.parametrize("call,match", [
    (lambda: rms_norm(torch.ones(2, 3, 4), torch.ones(4)), "x must have rank 2"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(5)), "weight has 5 elements; expected x.shape"),
    (lambda: rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), "x has dtype int32"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), eps=-1.0), "eps must be a number >= 0"),
    (lambda: rms_norm(torch.ones(2, 400), torch.ones(400), BN=128, ONE_TILE=True), "ONE_TILE=True needs BN"),
    (lambda: rms_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.ones(3)),
     "rstd has 3 elements"),
    (lambda: rms_norm_backward(torch.ones(3, 4), torch.ones(2, 4), torch.ones(4), torch.ones(2)),
     "dy is \\(3, 4\\); expected x's shape"),
    (lambda: rms_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.ones(2).double()),
     "rstd has dtype float64"),
    (lambda: rms_norm_backward(torch.ones(2, 400), torch.ones(2, 400), torch.ones(400), torch.ones(2), BN=128,
                               ONE_TILE=True), "ONE_TILE=True needs BN"),
], ids=["rank", "weight-size", "dtype", "eps", "one-tile", "rstd-size", "dy-shape", "rstd-dtype",
        "bwd-one-tile"])
def test_rms_norm_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(rms_module, "rms_norm_kernel", "norm_fwd_kernel")
    no_launch(bwd_module, "norm_bwd_kernel", "partial_sum_kernel")
    with pytest.raises(LaunchError, match=match):
        call()


def test_rms_norm_gpu_config_holds_the_row_in_one_tile():
    cfg = bwd_module.bwd_config(2048, "cuda", {})
    assert cfg["ONE_TILE"] and cfg["BN"] == 2048 and cfg["BM"] == 1
    assert not bwd_module.bwd_config(40000, "cuda", {})["ONE_TILE"]
    assert bwd_module.bwd_config(768, "cpu", {}) == {"ONE_TILE": False}


def test_gpu_default_configs_trace_and_run(rng):
    """The configs a GPU launch gets (one tile of 1024 for a 768-wide row, two rows a round, the partial sums'
    strips) are valid and exact, run here through Triton's interpreter."""
    n = 768
    x = torch.from_numpy(rng.normal(0.0, 1.0, (5, n))).float()
    w = torch.from_numpy(rng.normal(1.0, 0.1, n)).float()
    dy = torch.from_numpy(rng.normal(0.0, 1.0, (5, n))).float()
    fwd = rms_module.resolve_row_config("rms_norm", n, "cuda", {})
    y, rstd = rms_norm(x, w, 1e-6, backend="triton", **fwd)
    cfg = bwd_module.bwd_config(n, "cuda", {})
    parts = torch.from_numpy(rng.normal(0.0, 1.0, (2, 70, n))).float()
    sums = torch.empty(2, n)
    bwd_module.partial_sum_kernel(parts, sums, backend="triton", **bwd_module.sum_config(n, 70, "cuda"))
    dx, dw = rms_norm_backward(dy, x, w, rstd, backend="triton", **cfg)
    y64, _, dx64, dw64 = f64(x, w, dy, 1e-6)
    assert cfg == dict(BM=2, BN=1024, ONE_TILE=True, num_warps=8)
    assert rel(y, y64) <= 1e-5 and rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5
    assert rel(sums, parts.double().sum(1)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("centered", [False, True], ids=["rms", "layer"])
@pytest.mark.parametrize("shape,cfg", [((7, 300), dict(BM=2, BN=512, ONE_TILE=True)),
                                       ((5, 300), dict(BM=2, BN=128))], ids=str)
def test_add_norm_and_its_backward_with_dh(backend, dtype, centered, shape, cfg, rng, poison_empty):
    """h = x + r rounded to x's dtype, y = norm(h); the backward adds dh (the residual stream's gradient)."""
    def t(loc=0.0, std=1.0, s=shape):
        return torch.from_numpy(rng.normal(loc, std, s)).to(dtype)

    x, r, dy, dh = t(1.0, 2.0), t(), t(), t()
    w, b = t(1.0, 0.5, shape[1:]), t(0.0, 0.5, shape[1:])
    if centered:
        y, h, mean, rstd = add_layer_norm(x, r, w, b, 1e-5, backend=backend, **cfg)
        dx, dw, db = layer_norm_backward(dy, h, w, mean, rstd, dh=dh, backend=backend, **cfg)
    else:
        y, h, rstd = add_rms_norm(x, r, w, 1e-5, backend=backend, **cfg)
        dx, dw = rms_norm_backward(dy, h, w, rstd, dh=dh, backend=backend, **cfg)
    h_want = x + r                                                 # rounded to dtype, as torch's residual add
    hd, wd, bd = (v.double().requires_grad_() for v in (h_want, w, b))
    y64 = (torch.nn.functional.layer_norm(hd, shape[1:], wd, bd, 1e-5) if centered
           else hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd)
    grads = torch.autograd.grad(y64, (hd, wd, bd) if centered else (hd, wd), dy.double())
    tol = TOL[dtype]
    # exact where bf16 rounds to nearest (the reference, a GPU); Triton's interpreter truncates (one ulp)
    assert (torch.equal(h, h_want) if backend == "reference" or dtype == torch.float32 else rel(h, h_want) <= tol)
    assert rel(y, y64) <= tol
    assert rel(dx, grads[0] + dh.double()) <= tol and rel(dw, grads[1]) <= tol
    if centered:
        assert rel(db, grads[2]) <= tol


@pytest.mark.parametrize("shape", [(0, 48), (5, 0)], ids=("no-rows", "width-0"))
def test_empty_inputs_launch_nothing_and_match_torch(shape):
    """Empty problems answer without a launch (a launch of an empty tensor crashed): y empty, rstd NaN for
    width-0 rows, zero weight gradients."""
    from tilestack.kernels.layernorm_bwd import norm_backward
    from tilestack.kernels.rmsnorm import add_rms_norm, rms_norm

    x = torch.randn(shape, dtype=torch.bfloat16)
    w = torch.ones(shape[1], dtype=torch.bfloat16)
    y, rstd = rms_norm(x, w)
    assert y.shape == x.shape and rstd.shape == (shape[0],) and bool(rstd.isnan().all())
    assert y.shape == torch.nn.functional.rms_norm(x, (shape[1],), w).shape
    y2, h, _ = add_rms_norm(x, x, w)
    assert y2.shape == h.shape == x.shape
    dx, sums = norm_backward(x, x, w, None, rstd, centered=False, backend=None, config={})
    assert dx.shape == x.shape and sums.shape == (1, shape[1]) and not bool(sums.any())


@pytest.mark.parametrize("centered", [False, True], ids=["rms", "layer"])
@pytest.mark.parametrize("used", ["y", "h", "both"])
def test_add_norm_op_gradients_when_an_output_is_unused(centered, used, rng):
    """The eager op (``tilestack.torch.ops``) leaves an unused output's gradient None (no zeros made and read,
    as for the last norm's h): the gradients agree with torch's x + r then F.layer_norm / F.rms_norm."""
    from tilestack.torch import ops

    n = 48

    def t(*s, loc=0.0):
        return torch.from_numpy(rng.normal(loc, 1.0, s)).float().requires_grad_()

    x, r, w, b = t(2, 5, n, loc=1.0), t(2, 5, n), t(n, loc=1.0), t(n)
    dy, dh = torch.from_numpy(rng.normal(0.0, 1.0, (2, 2, 5, n))).float()

    def loss(y, h):
        return ((y * dy).sum() if used != "h" else 0) + ((h * dh).sum() if used != "y" else 0)

    y, h = ops.add_layer_norm(x, r, w, b) if centered else ops.add_rms_norm(x, r, w)
    ours = torch.autograd.grad(loss(y, h), (x, r, w, b) if centered else (x, r, w), allow_unused=True)
    h2 = x + r
    y2 = (torch.nn.functional.layer_norm(h2, (n,), w, b) if centered
          else torch.nn.functional.rms_norm(h2, (n,), w, 1e-6))
    want = torch.autograd.grad(loss(y2, h2), (x, r, w, b) if centered else (x, r, w), allow_unused=True)
    for got, ref in zip(ours, want, strict=True):
        if ref is None:                    # h alone: no gradient reaches the weights through y
            assert got is None or not bool(got.any())
        else:
            assert rel(got, ref) <= 1e-5
