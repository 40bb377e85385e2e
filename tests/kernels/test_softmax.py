"""tilestack.kernels.softmax on both backends against float64 PyTorch and against the reference executor.

Widths are ragged (several column tiles and a partial one, or less than one tile), rows are not a multiple
of BM, outputs start as NaN, and argument errors come before any kernel runs.
"""

import importlib
import math

import numpy as np
import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import softmax

softmax_module = importlib.import_module("tilestack.kernels.softmax")   # the package exports the function

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# f32 arithmetic throughout; what is left is the output rounding (bf16 under the interpreter: truncation)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest element error relative to the element (softmax outputs are positive): one bad row shows."""
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())


def rows(rng, shape, dtype, spread: float) -> torch.Tensor:
    return torch.from_numpy(spread * rng.standard_normal(shape)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,BM,BN", [((13, 300), 4, 128), ((5, 7), 2, 128), ((9, 1), 4, 128),
                                        ((3, 513), 1, 256)], ids=str)
@pytest.mark.parametrize("spread", (1.0, 60.0), ids=("unit", "wide"))
def test_softmax_matches_float64_and_reference(backend, dtype, shape, BM, BN, spread, rng):
    """``wide`` inputs reach |x| ~ 200: exp overflows f32 unless the running max is subtracted."""
    x = rows(rng, shape, dtype, spread)
    want = torch.softmax(x.double(), dim=-1)

    def run(be):
        out = torch.full(shape, math.nan, dtype=dtype)
        y = softmax(x, out=out, backend=be, BM=BM, BN=BN, num_warps=4, num_stages=1)
        assert y is out and y.dtype == dtype
        return y

    ours, ref = run(backend), run("reference")
    tol = TOL[dtype]
    assert rel(ours, want) <= tol
    assert rel(ours, ref) <= tol
    assert rel(ref, want) <= tol
    if spread == 1.0:       # wide rows have outputs that underflow to zero: no element-wise relative error
        assert worst(ours, want) <= 2 * tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_allocates_its_output(backend, dtype, rng, poison_empty):
    x = rows(rng, (6, 130), dtype, 2.0)
    y = softmax(x, backend=backend, BM=4, BN=128, num_warps=4, num_stages=1)
    assert y.shape == x.shape and y.dtype == dtype and y.data_ptr() != x.data_ptr()
    assert rel(y, torch.softmax(x.double(), -1)) <= TOL[dtype]


# ---- argument errors, before any work ------------------------------------------------------------------------
def _bad_cases():
    x = torch.zeros(4, 8)
    return {
        "rank 1": (dict(x=torch.zeros(8)), r"x must have rank 2, got shape \(8,\)"),
        "rank 3": (dict(x=torch.zeros(2, 4, 8)), r"x must have rank 2"),
        "float64": (dict(x=x.double()), r"x has dtype float64; expected one of float32, bfloat16, float16"),
        "int32": (dict(x=x.int()), r"x has dtype int32"),
        "not a tensor": (dict(x=np.zeros((4, 8), np.float32)), r"x must be a torch.Tensor"),
        "x on meta, out on cpu": (dict(x=x.to("meta"), out=torch.empty(4, 8)), r"x on meta"),
        "out on meta": (dict(x=x, out=torch.empty(4, 8, device="meta")), r"out on meta"),
        "out shape": (dict(x=x, out=torch.empty(2, 8)), r"out is \(2, 8\); expected x's shape \(4, 8\)"),
        "out dtype": (dict(x=x, out=torch.empty(4, 8, dtype=torch.float16)), r"out has dtype float16"),
        "out rank": (dict(x=x, out=torch.empty(32)), r"out must have rank 2"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_softmax_bad_arguments(case, no_launch):
    kwargs, message = _bad_cases()[case]
    no_launch(softmax_module, "softmax_kernel")
    with pytest.raises(LaunchError, match=message) as e:
        softmax_module.softmax(**kwargs, backend="reference", BM=4, BN=128)
    assert str(e.value).startswith("softmax: ")
