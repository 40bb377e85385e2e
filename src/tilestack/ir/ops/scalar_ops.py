"""The scalar ops: constants, kernel arguments, sizes, block ids, and index and float arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tilestack.errors import TraceError
from tilestack.ir.ops.registry import (
    ArgAttrs,
    AxisAttrs,
    ConstAttrs,
    FnAttrs,
    Op,
    OpDef,
    define,
)
from tilestack.ir.ops.rules import (
    check_arity,
    check_fn,
    fail,
    free_cost,
    ir_types,
    no_rule,
)

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr


# ---- scalars --------------------------------------------------------------------------------------------------------
def _fdiv(a, b):
    """True division, IEEE as on the GPU: x / 0 is inf or nan, not an exception."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.true_divide(a, b)
        return float(np.true_divide(float(a), float(b)))


def _fpow(a, b):
    """a ** b as the backends compute it: exp2(b log2(a)) (so a negative base gives NaN, a zero one 0 or inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp2(b * np.log2(a))


def _smin(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def _smax(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


# Scalar functions on ints (or int arrays: the cost analysis evaluates every program at once); f* on floats.
SCALAR_FNS: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "floordiv": lambda a, b: a // b, "cdiv": lambda a, b: -(-a // b), "mod": lambda a, b: a % b,
    "min": _smin, "max": _smax,
    "fadd": lambda a, b: a + b, "fmul": lambda a, b: a * b, "fdiv": _fdiv, "fpow": _fpow,
}


def _scalar_result(ins: Instr) -> None:
    if len(ins.results) != 1 or not isinstance(ins.result.type, ir_types().ScalarType):
        raise TraceError(f"{ins.op.value} must produce a scalar", ins.where)


define(OpDef(
    Op.CONST, "() -> scalar", "scalar", ConstAttrs, _scalar_result,
    lambda ins, s, m: ins.attrs.value, free_cost, doc="A compile-time number."))
define(OpDef(
    Op.ARG, "() -> global | scalar", "arg", ArgAttrs, no_rule,
    lambda ins, s, m: m.arg(ins), free_cost, doc="Kernel argument ``index``."))


def _dim_rule(ins: Instr) -> None:
    _scalar_result(ins)
    check_arity(ins, 1)
    g = ins.srcs[0].type
    if not isinstance(g, ir_types().GlobalType) or not 0 <= ins.attrs.axis < g.rank:
        fail(ins, f"reads axis {ins.attrs.axis} of a {g}")


define(OpDef(
    Op.DIM, "(global) -> index", "scalar", AxisAttrs, _dim_rule,
    lambda ins, s, m: m.dim(ins), free_cost, doc="A global's size on ``axis``."))


def _grid_axis_rule(ins: Instr) -> None:
    _scalar_result(ins)
    if ins.attrs.axis not in (0, 1, 2):
        fail(ins, f"grid axis must be 0, 1 or 2, got {ins.attrs.axis!r}")


define(OpDef(
    Op.BLOCK_ID, "() -> index", "scalar", AxisAttrs, _grid_axis_rule,
    lambda ins, s, m: m.block_id(ins.attrs.axis), free_cost, doc="This program's index on grid axis ``axis``."))
define(OpDef(
    Op.NUM_BLOCKS, "() -> index", "scalar", AxisAttrs, _grid_axis_rule,
    lambda ins, s, m: m.num_blocks(ins.attrs.axis), free_cost, doc="The grid's size on ``axis``."))


def _scalar_rule(ins: Instr) -> None:
    _scalar_result(ins)
    check_fn(ins)
    check_arity(ins, 2)


def _scalar_ref(ins: Instr, s: list, m):
    """Index arithmetic exactly; float arithmetic in f32, each operand converted to f32 first, as the backends
    compute it: a runtime float is an f32 argument, an index meeting a float is converted to f32, and Triton's (and
    Gluon's) scalar float math runs in f32, so ``(a + 3.0) + 3.0`` at a = 1e8 is 1e8, and ``N * 3.0`` at
    N = 2**24 + 1 is 50331648 (float64 would give 100000006 and 50331651, each rounding to another f32). Float
    arithmetic that f64 work takes (``m.f64_floats``, ``ir.scalars.f64_floats``) runs in f64 instead.
    An index past 64 bits (``a * b`` of two int arguments near 2**40) wraps to i64 as the backends' 64-bit index
    arithmetic does, rather than growing into a Python int no tile or NumPy array can take."""
    if ins.result.type != ir_types().FLOAT:
        r = SCALAR_FNS[ins.attrs.fn](s[0], s[1])
        if isinstance(r, int) and not -2**63 <= r < 2**63:
            r = (r + 2**63) % 2**64 - 2**63
        return r
    work = np.float64 if ins.result in getattr(m, "f64_floats", ()) else np.float32
    with np.errstate(all="ignore"):   # (the cost analysis passes arrays: every program's value at once)
        a, b = (np.asarray(x, dtype=work) for x in s)
        r = np.asarray(SCALAR_FNS[ins.attrs.fn](a, b), dtype=work).astype(np.float64)
    return float(r) if r.ndim == 0 else r


define(OpDef(
    Op.SCALAR, "(a, b) -> scalar", "scalar", FnAttrs, _scalar_rule, _scalar_ref, free_cost, fns=SCALAR_FNS,
    doc="Index arithmetic (floor division and remainder as Python's); float arithmetic (f*, and sub with a float) "
        "in f32."))
