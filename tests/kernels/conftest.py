"""Fixtures for the kernel-library tests.

``poison_empty``: every float tensor ``torch.empty``/``torch.empty_like`` returns starts as NaN, so an
output element a kernel forgets to write (a ragged edge, a causal block) shows up as NaN, never as stale
memory that happens to look right.
"""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture
def poison_empty(monkeypatch):
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def no_launch(monkeypatch):
    """``no_launch(module, "kernel_name", ...)``: replace kernels with one that fails the test if launched, so
    an argument error is known to come before any work."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched before the argument check")

    def patch(module, *names: str) -> None:
        for name in names:
            monkeypatch.setattr(module, name, boom)

    return patch
