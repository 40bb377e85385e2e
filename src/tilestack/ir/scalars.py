"""Scalar semantics shared by every consumer of the IR (reference executor, cost analysis, host-side grid).

Works on Python numbers and on NumPy arrays alike, so the cost analysis can evaluate index arithmetic for
every program and loop iteration at once.
"""

from __future__ import annotations

import numpy as np


def apply_scalar(fn: str, a, b):
    """``fn`` of ``SCALAR_FNS`` on two ints (or int arrays); f* variants on floats."""
    if fn in ("add", "fadd"):
        return a + b
    if fn == "sub":
        return a - b
    if fn in ("mul", "fmul"):
        return a * b
    if fn == "floordiv":
        return a // b
    if fn == "cdiv":
        return -(-a // b)
    if fn == "mod":
        return a % b
    if fn == "min":
        return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)
    if fn == "max":
        return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)
    if fn == "fdiv":
        return a / b
    raise ValueError(f"apply_scalar: unknown fn {fn!r}")


def valid_extent(dims, coords, tile_shape):
    """Elements of a tile at ``coords`` that fall inside a global of size ``dims`` (the masked edges).

    dims: sizes of the global, one per axis; coords: one per axis, the trailing ``len(tile_shape)`` of them
    counting whole tiles, the leading ones plain indices. Works elementwise on arrays of coords.
    """
    lead = len(dims) - len(tile_shape)
    count = 1
    for axis, (d, c) in enumerate(zip(dims, coords, strict=True)):
        if axis < lead:
            inside = (np.asarray(c) >= 0) & (np.asarray(c) < d)
            count = count * inside
        else:
            t = tile_shape[axis - lead]
            count = count * np.clip(d - np.asarray(c) * t, 0, t)
    return count
