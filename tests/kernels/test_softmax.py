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


# ---- extreme values (issue 9, item 5) --------------------------------------------------------------------------
def _extreme_rows(dtype) -> torch.Tensor:
    """Rows near the top of the dtype's range: x * log2(e) overflows f32 past 2.4e38 (bf16 and f32 reach it)."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, big, big, big, big, big, big],              # all equal: 1/7 each
                      [-big, big, 0.0, big, -big, 1.0, big],             # the max three times
                      [big, big / 2, big / 4, 0.0, -big, -big, -big],    # one winner
                      [-big, -big, -big, -big, -big, -big, -big]])      # all equal at the bottom
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_tile", (True, False), ids=("one_tile", "online"))
def test_softmax_extreme_values_match_torch(backend, dtype, one_tile):
    """Before: NaN for f32 and bf16 (the running max was taken after scaling by log2(e), which overflowed)."""
    x = _extreme_rows(dtype)
    cfg = dict(BM=2, BN=128, ONE_TILE=True) if one_tile else dict(BM=2, BN=128)
    if not one_tile:                             # several column tiles: the online path rescales across them
        x = x.repeat_interleave(40, dim=1)       # (4, 280)
    y = softmax(x, backend=backend, num_warps=4, num_stages=1, **cfg)
    want = torch.softmax(x.double(), dim=-1)
    assert bool(y.isfinite().all())
    assert float((y.double() - want).abs().max()) <= TOL[dtype]


# ---- outputs a kernel cannot write safely, autograd through out=, meta and empty tensors ----------------------
def _out_cases():
    x, parent = torch.zeros(6, 8), torch.zeros(7, 8)
    return {
        "out is x": (x, x, "out shares memory with x"),
        "out overlaps x": (parent[:6], parent[1:], "out shares memory with x"),   # rows 1..5 shared
        "out strides (1, 1)": (x, torch.zeros(16).as_strided((6, 8), (1, 1)),
                               r"out has shape \(6, 8\) and strides \(1, 1\)"),
        "out expanded": (x, torch.zeros(1, 8).expand(6, 8), r"stride 0 on axis 0"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_out_cases()))
def test_softmax_refuses_an_out_that_overlaps(backend, case, no_launch):
    """Before: every one of these was accepted."""
    x, out, message = _out_cases()[case]
    no_launch(softmax_module, "softmax_kernel")
    with pytest.raises(LaunchError, match=message) as e:
        softmax_module.softmax(x, out=out, backend=backend, BM=4, BN=128)
    assert str(e.value).startswith("softmax: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_out_refuses_autograd(backend, no_launch):
    no_launch(softmax_module, "softmax_kernel")
    with pytest.raises(LaunchError, match="out= does not support autograd, but x requires grad"):
        softmax_module.softmax(torch.zeros(4, 8, requires_grad=True), out=torch.zeros(4, 8), backend=backend)


@pytest.mark.parametrize("backend", (None, *BACKENDS))
def test_softmax_on_meta_gives_a_meta_result(backend, no_launch):
    """Before: NotImplementedError from the reference executor."""
    no_launch(softmax_module, "softmax_kernel")
    y = softmax_module.softmax(torch.empty(5, 300, dtype=torch.bfloat16, device="meta"), backend=backend)
    assert y.device.type == "meta" and y.shape == (5, 300) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (5, 0), (0, 0)], ids=str)
def test_softmax_empty_launches_nothing(backend, shape, no_launch):
    no_launch(softmax_module, "softmax_kernel")
    y = softmax_module.softmax(torch.zeros(shape), backend=backend)
    assert y.shape == shape and y.shape == torch.softmax(torch.zeros(shape), -1).shape
