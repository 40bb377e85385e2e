"""Facts about the scalar (index) values of a kernel, shared by every consumer of the IR.

The scalar ops' meaning lives with their definitions (``ir.ops.SCALAR_FNS``), on Python numbers and NumPy arrays
alike (the cost analysis evaluates index arithmetic for every program at once).
"""

from __future__ import annotations

import numpy as np

from tilestack.ir.ops import Op


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
    out: set = set()
    for ins in block.walk():
        op = ins.op
        if op in (Op.DIM, Op.BLOCK_ID, Op.NUM_BLOCKS):
            out.add(ins.result)
        elif op is Op.CONST and isinstance(ins.attrs.value, int) and ins.attrs.value >= 0:
            out.add(ins.result)
        elif op is Op.SCALAR:
            a, b = (s in out for s in ins.srcs)
            fn = ins.attrs.fn
            if (a and b and fn in ("add", "mul", "floordiv", "cdiv", "mod", "min", "max")) or \
                    (fn == "max" and (a or b)):
                out.add(ins.result)
        elif op is Op.RANGE:
            lo, _, step = ins.srcs[:3]
            if lo in out and step in out:
                out.add(ins.body.args[0])
    return out


def addressing(block) -> set:
    """The index values of ``block`` (and its loops) that reach a loop's bounds or a tile coordinate of a load, store
    or atomic add, through scalar arithmetic: the address math, which backends keep in 32 bits where the tensors allow
    it (their copy engines take only 32-bit coordinates). Index values that are data (an arange's start, a scalar
    operand of tile work) are not among them."""
    from tilestack.ir.ops import access_of
    made = {ins.result: ins for ins in block.walk() if ins.op is Op.SCALAR}
    todo = []
    for ins in block.walk():
        if ins.op is Op.RANGE:
            todo += ins.srcs[:3]
        elif ins.op in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD, Op.ASYNC_LOAD):
            todo += access_of(ins)[2]
    out: set = set()
    while todo:
        v = todo.pop()
        if v not in out:
            out.add(v)
            if v in made:
                todo += made[v].srcs
    return out
