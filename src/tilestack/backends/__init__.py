"""Backends, one folder each, all reading the same IR.

    get_backend("reference").run(traced, args)    # NumPy, exact semantics, runs anywhere
    get_backend("triton").source(traced)          # the generated @triton.jit source
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from tilestack.config import knobs
from tilestack.errors import BackendError

BACKENDS = ("reference", "triton")


def get_backend(name: str):
    if name not in BACKENDS:
        raise BackendError(f"backend={name!r}; expected one of {BACKENDS}")
    return importlib.import_module(f"tilestack.backends.{name}")


def pick_backend(args: Sequence) -> str:
    """The backend a launch uses when none is named: the knob, else Triton for CUDA tensors, else reference."""
    if knobs.backend != "auto":
        return knobs.backend
    on_cuda = any(getattr(getattr(a, "device", None), "type", None) == "cuda" for a in args)
    return "triton" if on_cuda else "reference"
