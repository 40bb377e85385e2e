"""tilestack.kernels.layer_norm on both backends against float64 PyTorch and against the reference executor:
y, and the saved mean and 1/std. layer_norm allocates its outputs itself, so they are poisoned through
``torch.empty`` (the ``poison_empty`` fixture)."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import layer_norm

ln_module = importlib.import_module("tilestack.kernels.layernorm")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
STATS_TOL = 1e-5            # mean and rstd are f32 whatever x's dtype


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def randn(rng, shape, dtype, loc: float = 0.0) -> torch.Tensor:
    return torch.from_numpy(rng.normal(loc, 1.0, shape)).to(dtype)


def f64_layer_norm(x, w, b, eps):
    x64 = x.double()
    mean = x64.mean(-1)
    var = x64.var(-1, unbiased=False)
    rstd = (var + eps).rsqrt()
    y = torch.nn.functional.layer_norm(x64, x.shape[-1:], w.double(), b.double(), eps)
    return y, mean, rstd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,BM,BN", [((13, 300), 4, 128), ((5, 7), 2, 128), ((3, 257), 1, 256),
                                        ((8, 128), 8, 128)], ids=str)
def test_layer_norm_matches_float64_and_reference(backend, dtype, shape, BM, BN, rng, poison_empty):
    x = randn(rng, shape, dtype)
    w, b = randn(rng, shape[1:], dtype), randn(rng, shape[1:], dtype)
    eps = 1e-5
    y64, mean64, rstd64 = f64_layer_norm(x, w, b, eps)
    cfg = dict(BM=BM, BN=BN, num_warps=4, num_stages=1)

    y, mean, rstd = layer_norm(x, w, b, eps, backend=backend, **cfg)
    ry, rmean, rrstd = layer_norm(x, w, b, eps, backend="reference", **cfg)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == rstd.shape == shape[:1] and mean.dtype == rstd.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(y, y64) <= tol and rel(y, ry) <= tol and rel(ry, y64) <= tol
    assert bool(mean.isfinite().all()) and float((mean.double() - mean64).abs().max()) <= STATS_TOL
    assert rel(rstd, rstd64) <= STATS_TOL and rel(rstd, rrstd) <= STATS_TOL
    assert float((mean - rmean).abs().max()) <= STATS_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,BM,programs", [((37, 100), 1, 3), ((13, 128), 2, 64), ((64, 7), 4, 5)], ids=str)
def test_persistent_layer_norm(backend, shape, BM, programs, rng, poison_empty):
    """PROGRAMS > 0: fewer programs than row blocks (each walks several, the next one's rows prefetched) and
    more (the grid is clipped to the row blocks); the same results as float64."""
    x = randn(rng, shape, torch.float32, loc=3.0)
    w, b = randn(rng, shape[1:], torch.float32), randn(rng, shape[1:], torch.float32)
    y64, mean64, rstd64 = f64_layer_norm(x, w, b, 1e-5)
    y, mean, rstd = layer_norm(x, w, b, backend=backend, BM=BM, BN=128, ONE_TILE=True, PROGRAMS=programs,
                               num_warps=4, num_stages=2)
    assert rel(y, y64) <= 1e-5 and rel(rstd, rstd64) <= STATS_TOL
    assert float((mean.double() - mean64).abs().max()) <= STATS_TOL


def test_persistent_layer_norm_needs_one_tile():
    x = torch.randn(4, 300)
    with pytest.raises(LaunchError, match="PROGRAMS=8 needs ONE_TILE=True"):
        layer_norm(x, torch.ones(300), torch.zeros(300), backend="reference", BM=1, BN=128, ONE_TILE=False,
                   PROGRAMS=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_far_from_zero(backend, rng, poison_empty):
    """Rows centred at 1000 with unit spread: a one-pass E[x^2] - E[x]^2 variance would lose every digit in f32."""
    x = randn(rng, (6, 200), torch.float32, loc=1000.0)
    w, b = torch.ones(200), torch.zeros(200)
    y64, mean64, rstd64 = f64_layer_norm(x, w, b, 1e-5)
    y, mean, rstd = layer_norm(x, w, b, backend=backend, BM=2, BN=128, num_warps=4, num_stages=1)
    assert rel(rstd, rstd64) <= 1e-4
    assert rel(y, y64) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", (1e-5, 0.5))
def test_layer_norm_mixed_parameter_dtype_and_eps(backend, eps, rng, poison_empty):
    """bf16 activations with f32 weight and bias (mixed precision); a large eps must be honoured."""
    x = randn(rng, (7, 70), torch.bfloat16)
    w, b = randn(rng, (70,), torch.float32), randn(rng, (70,), torch.float32)
    y64, _, rstd64 = f64_layer_norm(x, w, b, eps)
    y, _, rstd = layer_norm(x, w, b, eps, backend=backend, BM=4, BN=128, num_warps=4, num_stages=1)
    assert y.dtype == torch.bfloat16
    assert rel(y, y64) <= TOL[torch.bfloat16]
    assert rel(rstd, rstd64) <= STATS_TOL


# ---- argument errors, before any work ------------------------------------------------------------------------
def _bad_cases():
    x, w, b = torch.zeros(4, 8), torch.ones(8), torch.zeros(8)
    return {
        "x rank 1": (dict(x=torch.zeros(8), weight=w, bias=b), r"x must have rank 2"),
        "x rank 3": (dict(x=torch.zeros(2, 4, 8), weight=w, bias=b), r"x must have rank 2"),
        "x float64": (dict(x=x.double(), weight=w, bias=b), r"x has dtype float64"),
        "x int64": (dict(x=x.long(), weight=w, bias=b), r"x has dtype int64"),
        "weight rank 2": (dict(x=x, weight=w[None], bias=b), r"weight must have rank 1"),
        "bias rank 0": (dict(x=x, weight=w, bias=torch.tensor(0.0)), r"bias must have rank 1"),
        "weight int": (dict(x=x, weight=w.int(), bias=b), r"weight has dtype int32"),
        "bias float64": (dict(x=x, weight=w, bias=b.double()), r"bias has dtype float64"),
        "weight length": (dict(x=x, weight=torch.ones(7), bias=b), r"weight has 7 elements; expected x.shape\[1\] = 8"),
        "bias length": (dict(x=x, weight=w, bias=torch.zeros(9)), r"bias has 9 elements; expected x.shape\[1\] = 8"),
        "weight on meta": (dict(x=x, weight=w.to("meta"), bias=b), r"weight on meta"),
        "bias on meta": (dict(x=x, weight=w, bias=b.to("meta")), r"bias on meta"),
        "x on meta": (dict(x=x.to("meta"), weight=w, bias=b), r"x on meta"),
        # before: eps=None raised a bare TypeError from float(); the others were accepted
        "eps None": (dict(x=x, weight=w, bias=b, eps=None), r"eps must be a finite number >= 0.0, got None"),
        "eps negative": (dict(x=x, weight=w, bias=b, eps=-1e-5), r"eps must be a finite number >= 0.0, got -1e-05"),
        "eps nan": (dict(x=x, weight=w, bias=b, eps=math.nan), r"eps must be a finite number >= 0.0, got nan"),
        "eps bool": (dict(x=x, weight=w, bias=b, eps=True), r"eps must be a finite number >= 0.0, got True"),
        "eps string": (dict(x=x, weight=w, bias=b, eps="1e-5"), r"eps must be a finite number >= 0.0, got '1e-5'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_layer_norm_bad_arguments(case, no_launch):
    kwargs, message = _bad_cases()[case]
    no_launch(ln_module, "layer_norm_kernel")
    with pytest.raises(LaunchError, match=message) as e:
        ln_module.layer_norm(**kwargs, backend="reference", BM=4, BN=128)
    assert str(e.value).startswith("layer_norm: ")


def test_poison_empty_fixture_poisons(poison_empty):
    assert bool(torch.empty(3).isnan().all()) and bool(torch.empty_like(torch.zeros(2, 2)).isnan().all())
    assert bool(torch.empty(2, dtype=torch.bfloat16).isnan().all())


@pytest.mark.parametrize("backend", (None, *BACKENDS))
def test_layer_norm_on_meta_gives_meta_results(backend, no_launch):
    """Before: NotImplementedError from the reference executor."""
    x = torch.empty(5, 300, dtype=torch.bfloat16, device="meta")
    w, b = torch.empty(300, device="meta"), torch.empty(300, device="meta")
    no_launch(ln_module, "layer_norm_kernel")
    y, mean, rstd = ln_module.layer_norm(x, w, b, backend=backend)
    assert {t.device.type for t in (y, mean, rstd)} == {"meta"}
    assert y.shape == (5, 300) and y.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (5,) and mean.dtype == rstd.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (5, 0), (0, 0)], ids=str)
def test_layer_norm_empty_launches_nothing(backend, shape, no_launch, poison_empty):
    """As torch.native_layer_norm: y empty; a row of width 0 has mean 0 and an undefined (NaN) 1/std."""
    x, w, b = torch.zeros(shape), torch.ones(shape[1]), torch.zeros(shape[1])
    no_launch(ln_module, "layer_norm_kernel")
    y, mean, rstd = ln_module.layer_norm(x, w, b, backend=backend)
    ty, tmean, trstd = torch.native_layer_norm(x, shape[1:], w, b, 1e-5)
    assert y.shape == ty.shape and mean.shape == rstd.shape == shape[:1]
    assert torch.equal(mean, tmean.reshape(-1)) and torch.equal(rstd.isnan(), trstd.reshape(-1).isnan())
