"""NVTX ranges named by kernel and config, so Nsight tools can select one tilestack launch.

    from tilestack.perf import nvtx
    with nvtx.range(nvtx.range_name("attention_fwd", {"BM": 128, "BN": 64})):  # attention_fwd[BM=128,BN=64]
        launch()
    @nvtx.annotate("rmsnorm")
    def f(...): ...

    ncu --nvtx --nvtx-include "tilestack:attention_fwd[BM=128,BN=64]/" python run.py   # select that range

Ranges go through ``torch.cuda.nvtx`` and cost a few hundred nanoseconds of host time; without CUDA (a CPU
build of torch, no GPU) they do nothing. Names hold no ``/`` (NVTX's nesting separator in ``--nvtx-include``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from tilestack.backends.labels import PREFIX, range_name  # noqa: F401  (defined with the launchers that use them)

F = TypeVar("F", bound=Callable[..., Any])

_backend: dict[str, Any] = {}


def _cuda_nvtx() -> Any:
    """``torch.cuda.nvtx`` where CUDA is usable, else None (checked once per process)."""
    if "mod" not in _backend:
        mod = None
        try:
            import torch

            if torch.cuda.is_available():
                mod = torch.cuda.nvtx
        except Exception:  # no torch, or a driver that fails to initialise: ranges become no-ops
            mod = None
        _backend["mod"] = mod
    return _backend["mod"]


def active() -> bool:
    """Whether ranges are emitted here (CUDA present)."""
    return _cuda_nvtx() is not None


@contextlib.contextmanager
def range(name: str, *, enabled: bool = True) -> Iterator[None]:  # noqa: A001 - mirrors nvtx.range
    """Push an NVTX range for the duration of the block (a no-op without CUDA or when not ``enabled``)."""
    mod = _cuda_nvtx() if enabled else None
    if mod is None:
        yield
        return
    mod.range_push(PREFIX + name)
    try:
        yield
    finally:
        mod.range_pop()


def annotate(name: str, config: Mapping[str, Any] | None = None) -> Callable[[F], F]:
    """Decorator form of :func:`range`."""
    label = range_name(name, config)

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with range(label):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def mark(message: str) -> None:
    """An instantaneous NVTX marker (no-op without CUDA)."""
    mod = _cuda_nvtx()
    if mod is not None:
        mod.mark(PREFIX + message)
