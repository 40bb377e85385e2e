"""tilestack.kernels.gemm on both backends against float64 PyTorch and against the reference executor.

Sizes are ragged (no multiple of any tile), outputs start as NaN, and argument errors must come before any
kernel runs. Triton runs under its interpreter on a CPU: tiles and sizes stay small.
"""

import importlib
import math

import numpy as np
import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import gemm

# the package exports the function gemm under the module's name: take the module itself
gemm_module = importlib.import_module("tilestack.kernels.gemm")

BACKENDS = ("reference", "triton")
DTYPES = (torch.bfloat16, torch.float16)
# the product is exact in f64 from the rounded inputs; what is left is f32 accumulation and the output rounding
# (bf16 under Triton's interpreter truncates rather than rounds: up to one ulp, 2^-8)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
SMALL = dict(BM=32, BN=32, GROUP_M=4, num_warps=4, num_stages=1)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest element error, relative to the largest element: catches one bad tile that a norm hides."""
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def randn(rng, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def test_rel_rejects_nan():
    assert rel(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 1.0])) == math.inf
    assert worst(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 1.0])) == math.inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("BK", (16, 32))
@pytest.mark.parametrize("mnk", [(45, 50, 37), (70, 33, 70), (1, 17, 5), (64, 64, 64)], ids=str)
def test_gemm_matches_float64_and_reference(backend, dtype, BK, mnk, rng):
    m, n, k = mnk
    a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
    want = a.double() @ b.double()

    def run(be):
        out = torch.full((m, n), math.nan, dtype=dtype)
        c = gemm(a, b, out=out, backend=be, BK=BK, **SMALL)
        assert c is out and c.dtype == dtype and c.shape == (m, n)
        return c

    ours, ref = run(backend), run("reference")
    tol = TOL[dtype]
    assert rel(ours, want) <= tol
    assert worst(ours, want) <= 2 * tol
    assert rel(ours, ref) <= tol
    assert rel(ref, want) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_m", (1, 4, 8))
def test_gemm_program_order_covers_every_tile(backend, group_m, rng, poison_empty):
    """Grouped program order with more row blocks than a group and a last, partial group; out= left out."""
    m, n, k = 7 * 16 + 3, 3 * 16 + 5, 20
    a, b = randn(rng, (m, k), torch.bfloat16), randn(rng, (k, n), torch.bfloat16)
    c = gemm(a, b, backend=backend, BM=16, BN=16, BK=16, GROUP_M=group_m, num_warps=4, num_stages=1)
    assert c.shape == (m, n) and c.dtype == torch.bfloat16
    assert rel(c, a.double() @ b.double()) <= TOL[torch.bfloat16]


def test_gemm_default_config_runs(rng):
    a, b = randn(rng, (9, 11), torch.float16), randn(rng, (11, 13), torch.float16)
    c = gemm(a, b, backend="reference")
    assert rel(c, a.double() @ b.double()) <= TOL[torch.float16]


# ---- argument errors, before any work ------------------------------------------------------------------------
def _bad_cases():
    bf = torch.bfloat16
    a, b = torch.zeros(8, 4, dtype=bf), torch.zeros(4, 6, dtype=bf)
    return {
        "a rank 3": (dict(a=torch.zeros(2, 8, 4, dtype=bf), b=b), r"a must have rank 2"),
        "b rank 1": (dict(a=a, b=torch.zeros(4, dtype=bf)), r"b must have rank 2"),
        "a float32": (dict(a=a.float(), b=b.float()), r"\ba has dtype float32"),
        "a float64": (dict(a=a.double(), b=b), r"\ba has dtype float64"),
        "b dtype differs": (dict(a=a, b=b.half()), r"\bb has dtype float16; expected one of bfloat16"),
        "inner dims": (dict(a=a, b=torch.zeros(5, 6, dtype=bf)), r"a is \(8, 4\) and b is \(5, 6\)"),
        "a not a tensor": (dict(a=np.zeros((8, 4)), b=b), r"a must be a torch.Tensor"),
        "b on meta": (dict(a=a, b=b.to("meta")), r"b on meta"),
        "a on meta": (dict(a=a.to("meta"), b=b), r"a on meta"),
        "out on meta": (dict(a=a, b=b, out=torch.empty(8, 6, dtype=bf, device="meta")), r"out on meta"),
        "out shape": (dict(a=a, b=b, out=torch.empty(6, 8, dtype=bf)), r"out is \(6, 8\)"),
        "out dtype": (dict(a=a, b=b, out=torch.empty(8, 6, dtype=torch.float16)), r"out has dtype float16"),
        "out rank": (dict(a=a, b=b, out=torch.empty(8, 6, 1, dtype=bf)), r"out must have rank 2"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_gemm_bad_arguments(case, no_launch):
    kwargs, message = _bad_cases()[case]
    no_launch(gemm_module, "gemm_kernel")
    with pytest.raises(LaunchError, match=message) as e:
        gemm_module.gemm(**kwargs, backend="reference", BK=16, **SMALL)
    assert str(e.value).startswith("gemm: ")


def test_gemm_tile_outside_domain_is_refused():
    from tilestack.errors import TunableError

    a, b = torch.zeros(8, 4, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16)
    with pytest.raises(TunableError, match="GROUP_M=2 is outside its domain"):
        gemm(a, b, backend="reference", BM=32, BN=32, BK=16, GROUP_M=2)
