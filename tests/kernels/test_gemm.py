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


# ---- outputs a kernel cannot write safely, autograd through out=, meta and empty problems ---------------------
def _sharing_cases():
    bf = torch.bfloat16
    big = torch.zeros(16, 32, dtype=bf)
    a, b = big[:, :16], torch.zeros(16, 16, dtype=bf)
    return {
        "out is a": (a, b, a, "out shares memory with a"),
        "out is b": (a, b, b, "out shares memory with b"),
        "out overlaps a": (a, b, big[:, 8:24], "out shares memory with a"),
        "out strides (1, 1)": (a, b, torch.zeros(64, dtype=bf).as_strided((16, 16), (1, 1)),
                               r"out has shape \(16, 16\) and strides \(1, 1\)"),
        "out expanded": (a, b, torch.zeros(16, 1, dtype=bf).expand(16, 16), r"stride 0 on axis 1"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_sharing_cases()))
def test_gemm_refuses_an_out_that_overlaps(backend, case, no_launch):
    """Before: out=a gave an error of ~1e2 on Triton (tiles of a read after other programs overwrote them)."""
    a, b, out, message = _sharing_cases()[case]
    no_launch(gemm_module, "gemm_kernel")
    with pytest.raises(LaunchError, match=message):
        gemm_module.gemm(a, b, out=out, backend=backend, BK=16, **SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_accepts_a_strided_out_that_does_not_overlap(backend, rng):
    """A transposed, column-sliced out is a legal layout and is written exactly where it points."""
    a, b = randn(rng, (20, 12), torch.float16), randn(rng, (12, 9), torch.float16)
    parent = torch.full((14, 25), math.nan, dtype=torch.float16)
    out = parent[2:11, 3:23].t()                 # (20, 9), strides (1, 25)
    gemm(a, b, out=out, backend=backend, BK=16, **SMALL)
    assert rel(out, a.double() @ b.double()) <= TOL[torch.float16]
    assert bool(parent[:2].isnan().all()) and bool(parent[:, :3].isnan().all())   # nothing written outside


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs_grad", ("out", "a"))
def test_gemm_out_refuses_autograd(backend, needs_grad, no_launch):
    """As torch's out=: before, the reference backend raised torch's in-place error and Triton wrote silently."""
    bf = torch.bfloat16
    t = {"a": torch.zeros(8, 4, dtype=bf), "b": torch.zeros(4, 6, dtype=bf), "out": torch.zeros(8, 6, dtype=bf)}
    t[needs_grad].requires_grad_(True)
    no_launch(gemm_module, "gemm_kernel")
    with pytest.raises(LaunchError, match=rf"out= does not support autograd, but {needs_grad} requires grad"):
        gemm_module.gemm(t["a"], t["b"], out=t["out"], backend=backend, BK=16, **SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_out_requiring_grad_is_written_under_no_grad(backend, rng):
    a, b = randn(rng, (8, 4), torch.bfloat16), randn(rng, (4, 6), torch.bfloat16)
    out = torch.zeros(8, 6, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        gemm(a, b, out=out, backend=backend, BK=16, **SMALL)
    assert rel(out.detach(), a.double() @ b.double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", (None, *BACKENDS))
@pytest.mark.parametrize("with_out", (False, True))
def test_gemm_on_meta_gives_a_meta_result(backend, with_out, no_launch):
    """Before: NotImplementedError from the reference executor (the default backend for non-CUDA tensors)."""
    a = torch.empty(37, 20, dtype=torch.float16, device="meta")
    b = torch.empty(20, 11, dtype=torch.float16, device="meta")
    out = torch.empty(37, 11, dtype=torch.float16, device="meta") if with_out else None
    no_launch(gemm_module, "gemm_kernel")
    c = gemm_module.gemm(a, b, out=out, backend=backend)
    assert c.device.type == "meta" and c.shape == (37, 11) and c.dtype == torch.float16
    assert out is None or c is out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mnk", [(5, 7, 0), (0, 7, 5), (5, 0, 5), (0, 0, 0)], ids=str)
def test_gemm_empty_problems_launch_nothing(backend, mnk, no_launch, poison_empty):
    """K = 0 is a sum of nothing: zeros, as torch; an empty output has nothing to write."""
    m, n, k = mnk
    a, b = torch.ones(m, k, dtype=torch.bfloat16), torch.ones(k, n, dtype=torch.bfloat16)
    no_launch(gemm_module, "gemm_kernel")
    c = gemm_module.gemm(a, b, backend=backend, BK=16, **SMALL)
    assert c.shape == (m, n) and c.dtype == torch.bfloat16
    assert torch.equal(c, a @ b)



@pytest.mark.parametrize("m,n,k,first", [
    (8192, 3072, 768, "bfloat16-shortk"),      # GPT-2's c_fc at 8 x 1024 tokens: K at most half the larger side
    (8192, 768, 3072, "bfloat16-shortk"),      # its c_proj
    (4096, 4096, 4096, "bfloat16"),            # square: the plain signature only
    (1024, 512, 768, "bfloat16"),              # K past half the larger side
])
def test_gemm_config_asks_the_short_k_signature_first(monkeypatch, m, n, k, first):
    gm = importlib.import_module("tilestack.kernels.gemm")
    asked = []

    def lookup(kernel, signature, device, size, default, backend):
        asked.append((signature, size))
        return {}                               # nothing tuned: the next signature is asked
    monkeypatch.setattr(gm, "launch_config", lookup)
    assert gm.gemm_config(m, n, k, torch.bfloat16, "cuda") == {}
    assert asked[0] == (first, max(m, n, k))
    assert asked[-1] == ("bfloat16", max(m, n, k))
