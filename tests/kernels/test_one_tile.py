"""The one-tile paths of softmax and layer norm (the whole row in registers) against float64 and the reference,
on both backends, ragged widths, every accepted dtype; NaN-poisoned outputs."""

import pytest
import torch

from tilestack.kernels import layer_norm_kernel, softmax_kernel
from tilestack.kernels.softmax import row_config

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(a, b):
    assert bool(a.isfinite().all()), "NaN or inf in the output"
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [33, 128, 300])
def test_softmax_one_tile(backend, dtype, n):
    x = (torch.randn(21, n) * 4).to(dtype)
    y = torch.full_like(x, float("nan"))
    softmax_kernel(x, y, BM=2, BN=512, ONE_TILE=True, num_warps=4, backend=backend)
    assert _rel(y, torch.softmax(x.double(), -1)) < TOL[dtype]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [33, 300])
def test_layer_norm_one_tile(backend, dtype, n):
    x = (torch.randn(21, n) + 3).to(dtype)
    w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    y = torch.full_like(x, float("nan"))
    mean, rstd = torch.full((21,), float("nan")), torch.full((21,), float("nan"))
    layer_norm_kernel(x, w, b, y, mean, rstd, 1e-5, BM=2, BN=512, ONE_TILE=True, num_warps=4, backend=backend)
    ref = torch.nn.functional.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)
    assert _rel(y, ref) < TOL[dtype]
    x64 = x.double()
    assert torch.allclose(mean.double(), x64.mean(1), atol=1e-5)
    assert torch.allclose(rstd.double(), (x64.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4)


def test_row_config_keeps_rows_whole_on_a_gpu_only():
    assert row_config(300, "cpu") == {}
    assert row_config(300, "cuda") == dict(BM=1, BN=512, ONE_TILE=True, num_warps=4)
    assert row_config(8192, "cuda")["ONE_TILE"] and row_config(8192, "cuda")["BN"] == 8192
    assert "ONE_TILE" not in row_config(100_000, "cuda")


def test_one_tile_follows_the_final_block_width():
    from tilestack.kernels.softmax import resolve_row_config

    # an explicit narrow BN on a GPU turns the automatic one-tile path off (the row no longer fits)
    assert resolve_row_config("softmax", 300, "cuda", dict(BM=4, BN=128))["ONE_TILE"] is False
    assert resolve_row_config("softmax", 300, "cuda", {})["ONE_TILE"] is True
    assert resolve_row_config("softmax", 300, "cpu", {})["ONE_TILE"] is False


def test_one_tile_with_a_narrow_tile_is_refused():
    from tilestack.errors import LaunchError
    from tilestack.kernels import layer_norm, softmax

    x = torch.randn(4, 300)
    with pytest.raises(LaunchError, match="ONE_TILE=True needs BN >= the row width 300; got BN=128"):
        softmax(x, ONE_TILE=True, BN=128)
    with pytest.raises(LaunchError, match="ONE_TILE=True needs BN"):
        layer_norm(x, torch.ones(300), torch.zeros(300), ONE_TILE=True, BN=256)
