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
    if fn == "fdiv":     # true division, IEEE as on the GPU: x / 0 is inf or nan, not an exception
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.true_divide(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) \
                else float(np.true_divide(float(a), float(b)))
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


def nonnegative(block) -> set:
    """The index values of ``block`` (and its loops) provably >= 0 however the kernel is launched: sizes, block
    ids, non-negative constants, and sums, products, quotients, remainders, min and max of such (a max of one);
    a loop counter counting up from one. Backends whose integer division truncates (Triton, C) divide these
    with the plain operator and the others with an exact floor."""
    from tilestack.ir.ops import Op

    out: set = set()
    for ins in block.walk():
        op = ins.op
        if op in (Op.DIM, Op.BLOCK_ID, Op.NUM_BLOCKS):
            out.add(ins.result)
        elif op is Op.CONST and isinstance(ins.attrs["value"], int) and ins.attrs["value"] >= 0:
            out.add(ins.result)
        elif op is Op.SCALAR:
            a, b = (s in out for s in ins.srcs)
            fn = ins.attrs["fn"]
            if (a and b and fn in ("add", "mul", "floordiv", "cdiv", "mod", "min", "max")) or \
                    (fn == "max" and (a or b)):
                out.add(ins.result)
        elif op is Op.RANGE:
            lo, _, step = ins.srcs[:3]
            if lo in out and step in out:
                out.add(ins.body.args[0])
    return out
