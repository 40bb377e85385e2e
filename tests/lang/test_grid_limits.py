"""A grid a CUDA launch cannot take (more than 65535 programs on axis 1 or 2, more than 2**31 - 1 on axis 0) is
refused on every backend, before any program runs: on the CPU too, where the reference executor and Triton's
interpreter would otherwise run it (2**31 programs for hours). A grid at the limits is taken."""

from __future__ import annotations

import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import LaunchError


@ts.kernel(grid=lambda X, ROWS: (1, X.shape[0] // ROWS))
def one_per_row(X, Y, *, ROWS: int = 1):
    """Y[r] = X[r] + 1, a program per ROWS rows on grid axis 1."""
    r = ts.block_id(1)
    x = ts.RegVec[ts.f32, ROWS]()
    ts.load(x, X, at=(r,))
    ts.add(x, x, 1.0)
    ts.store(Y, x, at=(r,))


@ts.kernel(grid=lambda X: (X.shape[0] * (2**31 // 4),))
def too_many(X):
    """2**31 programs on axis 0 for a 4-element X: past CUDA's 2**31 - 1."""
    ts.block_id(0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_grid_past_cudas_limits_is_refused_on_every_backend_before_any_work(backend):
    x, y = torch.zeros(65536), torch.full((65536,), 7.0)
    with pytest.raises(LaunchError, match=r"one_per_row: grid axis 1 has 65536 programs; .* at most 65535"):
        one_per_row(x, y, backend=backend)
    assert bool((y == 7).all())                                   # nothing ran
    with pytest.raises(LaunchError, match=r"too_many: grid axis 0 has 2147483648 programs"):
        too_many(torch.zeros(4), backend=backend)


def test_a_grid_at_the_limit_is_taken():
    """65535 programs on axis 1 pass the check (the trace's grid; running them all here would take minutes)."""
    x = torch.zeros(65535)
    assert one_per_row.trace(x, torch.zeros_like(x)).grid(x, x) == (1, 65535)
