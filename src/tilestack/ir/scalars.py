"""Facts about the scalar (index) values of a kernel, shared by every consumer of the IR.

The scalar ops' meaning lives with their definitions (``ir.ops.SCALAR_FNS``), on Python numbers and NumPy arrays
alike (the cost analysis evaluates index arithmetic for every program at once).
"""

from __future__ import annotations

import numpy as np

from tilestack.ir.ops import OPS, SCALAR_FNS, Op, work_dtype
from tilestack.ir.types import FLOAT, INDEX, f64


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
            lo = np.asarray(c) * t          # the tile's elements [lo, lo + t) inside [0, d): none of a tile
            count = count * np.clip(np.minimum(lo + t, d) - np.maximum(lo, 0), 0, t)   # before 0 (a -1 from memory)
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


def from_memory(block) -> set:
    """The index values of ``block`` (and its loops) read from memory (``load_scalar``) or computed from one, and the
    counters of loops bounded by one. Their size is not bounded by the tensors' sizes (an int64 element, a stale page
    id of 2**30): a backend scales them into element offsets in 64 bits, not in 32 where the product can wrap back
    inside a tensor, and saturates them into the copy engine's 32-bit coordinates (Triton and Gluon refuse 64-bit
    ones: "Block pointers only support 32 bit `offsets/block_shape`")."""
    out: set = set()
    for ins in block.walk():
        if ins.op is Op.LOAD_SCALAR and ins.result.type == INDEX:
            out.add(ins.result)
        elif ins.op is Op.SCALAR and ins.result.type == INDEX and any(s in out for s in ins.srcs):
            out.add(ins.result)
        elif ins.op is Op.RANGE and any(s in out for s in ins.srcs[:3]):
            out.add(ins.body.args[0])
    return out


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _bounds_of(fn: str, a: tuple, b: tuple) -> tuple:
    """Bounds of the index function ``fn`` of operands within bounds ``a`` and ``b`` (inclusive (lo, hi) pairs)."""
    if fn in ("add", "sub", "mul"):
        op = SCALAR_FNS[fn]
        corners = [op(x, y) for x in a for y in b]
        return min(corners), max(corners)
    if fn in ("min", "max"):
        op = min if fn == "min" else max
        return op(a[0], b[0]), op(a[1], b[1])
    big = max(abs(a[0]), abs(a[1]))
    if fn == "mod":                                 # |a % b| < |b| and (truncating or flooring) <= |a| for b != 0
        big = min(big, max(abs(b[0]), abs(b[1])) - 1) if 0 not in range(b[0], b[1] + 1) else big
        return -big, big
    if fn in ("floordiv", "cdiv") and b[0] > 0:     # a positive divisor: monotonic in a, at most a's size
        op = SCALAR_FNS[fn]
        corners = [op(x, y) for x in a for y in b]
        return min(corners), max(corners)
    return -big - 1, big + 1                        # (a divisor that may be negative: |a // b| <= |a| + 1)


def arg_bounds(block) -> dict:
    """Bounds (inclusive (lo, hi)) of the index values of ``block`` (and its loops) computed from an int argument,
    and the counters of loops bounded by one. Triton and Gluon take an int argument that fits int32 as an i32 and add,
    subtract and multiply it in 32 bits, so such a value can wrap (``ts.range(n0, n0 + 3)`` at n0 = 2**31 - 2 ran no
    trips; a tile row ``r`` of 2**28 times a 16-row tile read row 0): a backend computes a value whose bounds pass
    int32 in 64 bits (``past_int32``), and scales a coordinate whose product with the tile size may pass int32 in 64
    bits (``fits_int32``). The argument is taken anywhere in int32 (a larger one is passed as an i64, whose arithmetic
    is 64-bit already); sizes and block ids in [0, 2**31), constants as they are. Values made from sizes, block ids,
    loop counters and constants alone are not here: their address math stays 32-bit (offsets past int32 get 64 bits
    per tensor). Values read from memory are ``from_memory``'s."""
    tame = {Op.DIM: (0, INT32_MAX), Op.BLOCK_ID: (0, INT32_MAX), Op.NUM_BLOCKS: (1, INT32_MAX)}
    known: dict = {}                                 # every index value's bounds, tame ones included
    out: dict = {}
    for ins in block.walk():
        op = ins.op
        if op in tame:
            known[ins.result] = tame[op]
        elif op is Op.CONST and isinstance(ins.attrs.value, int) and ins.result.type == INDEX:
            known[ins.result] = (ins.attrs.value, ins.attrs.value)
        elif op is Op.ARG and ins.result.type == INDEX:
            known[ins.result] = out[ins.result] = (INT32_MIN, INT32_MAX)
        elif op is Op.SCALAR and ins.result.type == INDEX and all(s in known for s in ins.srcs):
            known[ins.result] = _bounds_of(ins.attrs.fn, *(known[s] for s in ins.srcs))
            if any(s in out for s in ins.srcs):
                out[ins.result] = known[ins.result]
        elif op is Op.RANGE:
            lo, hi, step = ins.srcs[:3]
            if all(s in known for s in (lo, hi, step)):
                if known[step][0] > 0:           # lo <= i < hi
                    counter = (known[lo][0], max(known[lo][0], known[hi][1] - 1))
                elif known[step][1] < 0:         # hi < i <= lo
                    counter = (min(known[lo][1], known[hi][0] + 1), known[lo][1])
                else:
                    counter = (min(known[lo][0], known[hi][0]), max(known[lo][1], known[hi][1]))
                known[ins.body.args[0]] = counter
                if any(s in out for s in (lo, hi, step)):
                    out[ins.body.args[0]] = counter
    return out


def fits_int32(bounds: dict, v, scale: int = 1) -> bool:
    """Whether ``v`` times ``scale`` stays within int32 (``bounds``: ``arg_bounds``; values not there are taken to
    fit, as the address math of sizes and block ids is)."""
    if v not in bounds:
        return True
    lo, hi = bounds[v]
    return INT32_MIN <= lo * scale <= INT32_MAX and INT32_MIN <= hi * scale <= INT32_MAX


def past_int32(block) -> set:
    """The index values of ``block`` (and its loops) that Triton and Gluon compute in 64 bits although no operand was
    read from memory: each add, sub or mul of address math (``addressing``) made from an int argument whose bounds
    pass int32 (``arg_bounds``: ``n0 + 3``, ``r * 3``), the index values computed from one, and the counters of loops
    bounded by one (a 64-bit bound makes a 64-bit counter). Backends treat them as values read from memory: scaled
    into element offsets in 64 bits, saturated into the copy engine's 32-bit coordinates. A loop bounded by values
    that fit (``ts.cdiv(n, BN)``, ``n - 1`` of a size) keeps its 32-bit counter."""
    bounds = arg_bounds(block)
    address = addressing(block)
    out: set = set()
    for ins in block.walk():
        if ins.op is Op.SCALAR and ins.result.type == INDEX:
            if any(s in out for s in ins.srcs) or (
                    ins.attrs.fn in WIDE_FNS and ins.result in address and not fits_int32(bounds, ins.result)):
                out.add(ins.result)
        elif ins.op is Op.RANGE and any(s in out for s in ins.srcs[:3]):
            out.add(ins.body.args[0])
    return out


def addressing(block) -> set:
    """The index values of ``block`` (and its loops) that reach a loop's bounds, a tile coordinate of a load, store
    or atomic add, or the stage of a staged buffer, through scalar arithmetic: the address math, which backends keep
    in 32 bits where the tensors allow it (their copy engines take only 32-bit coordinates; Gluon indexes a buffer's
    stages with an i32). Index values that are data (an arange's start, a scalar operand of tile work) are not among
    them."""
    from tilestack.ir.ops import access_of
    made = {ins.result: ins for ins in block.walk() if ins.op is Op.SCALAR}
    todo = []
    for ins in block.walk():
        if ins.op is Op.RANGE:
            todo += ins.srcs[:3]
        elif ins.op in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD, Op.ASYNC_LOAD):
            todo += access_of(ins)[2]
        if ins.op in (Op.ASYNC_LOAD, Op.WAIT_LOAD):
            todo.append(ins.srcs[1])              # the stage (`(n + j) % STAGES` is in [0, STAGES))
    out: set = set()
    while todo:
        v = todo.pop()
        if v not in out:
            out.add(v)
            if v in made:
                todo += made[v].srcs
    return out


def f64_floats(kernel) -> frozenset:
    """The float scalars a kernel computes in f64: those f64 tile work takes (``ir.ops.work_dtype``: an f64 tile
    plus a float, a float chosen into an f64 tile), and, back through float scalar arithmetic, the operands of each
    such value made by a SCALAR op (``a - 1.0``, ``-a``, ``a * N`` feeding f64 work: computed in f32 they rounded a
    = 1 + 2**-40 to 1 and -1e300 to -inf). Arguments among them are passed as f64 (``f64_float_args``), the
    arithmetic among them runs in f64 on every backend, and each is an f32 of that f64 value wherever f32 work takes
    it. An element of an f64 tensor read by ``load_scalar`` that f64 work takes is one too (as an f32 it rounded
    A[i, j] = 1 + 2**-40 in kron's A[i, j] * B to 1). Other float scalars (an element of a narrower float tensor,
    exact in f32; arithmetic only f32 work takes) stay f32."""
    floats_made = {ins.result: ins for ins in kernel.walk()
                   if (ins.op in (Op.ARG, Op.SCALAR, Op.CONST)
                       or (ins.op is Op.LOAD_SCALAR and ins.srcs[0].type.dtype is f64)) and ins.result.type == FLOAT}
    out: set = set()
    for ins in kernel.walk():
        if OPS[ins.op].kind == "tile" and work_dtype(ins) is f64:
            out |= {s for s in ins.srcs if s in floats_made}
    todo = list(out)
    while todo:                      # back through the scalar ops that made them
        made = floats_made[todo.pop()]
        if made.op is Op.SCALAR:
            for s in made.srcs:
                if s in floats_made and s not in out:
                    out.add(s)
                    todo.append(s)
    return frozenset(out)


def f64_float_args(kernel) -> frozenset:
    """The runtime float arguments among ``f64_floats``. The reference takes a float argument as it is (a float64)
    there and as the f32 nearest it everywhere else (f32 work, f32 scalar arithmetic). Triton and Gluon pass a
    Python float as an f32, which would round it for f64 work too: backends pass these as f64 and convert them to
    f32 for their other uses."""
    wide = f64_floats(kernel)
    return frozenset(ins.result for ins in kernel.walk() if ins.op is Op.ARG and ins.result in wide)


WIDE_FNS = ("add", "sub", "mul")   # the index functions that can pass 2**31 from operands inside it


def wide_index(block) -> set:
    """The results of ``block``'s index arithmetic (and its loops') that backends computing indices in 32 bits must
    compute in 64: the reference's index arithmetic is exact, and Triton and Gluon take sizes and int arguments as
    i32 (where they fit), so a sum, difference or product of them can wrap past 2**31 (``off + X.shape[0]``,
    ``X.shape[0] * X.shape[1]``, ``n * 3``). Those are the add, sub and mul results that are data (not address math,
    ``addressing``: kept 32-bit, offsets get 64 bits per tensor) and that take a size, an int argument or a value
    made from them, or multiply two runtime values. Block ids, loop counters and constants alone stay 32-bit (a
    tile's first row ``i * BM``, a causal diagonal ``i * BM - j * BN``). Address math made from an int argument that
    may pass int32 (``past_int32``: a loop bound ``n0 + 3``) is among them too."""
    address = addressing(block)
    consts = {ins.result for ins in block.walk() if ins.op is Op.CONST}
    big: set = set()      # sizes, int arguments and the index values made from them
    out: set = set()
    for ins in block.walk():
        if ins.op in (Op.DIM, Op.LOAD_SCALAR) or (ins.op is Op.ARG and ins.result.type == INDEX):
            big.add(ins.result)       # (an index read from memory is as big as an int argument)
        elif ins.op is Op.SCALAR and ins.result.type == INDEX:
            if any(s in big for s in ins.srcs):
                big.add(ins.result)
            runtime = not any(s in consts for s in ins.srcs)
            if ins.attrs.fn in WIDE_FNS and ins.result not in address and (
                    ins.result in big or (ins.attrs.fn == "mul" and runtime)):
                out.add(ins.result)
    return out | {v for v in past_int32(block) if v in made_by_wide_fn(block)}


def made_by_wide_fn(block) -> set:
    """The results of ``block``'s add, sub and mul index ops (and its loops')."""
    return {ins.result for ins in block.walk()
            if ins.op is Op.SCALAR and ins.result.type == INDEX and ins.attrs.fn in WIDE_FNS}
