"""IR verification: the rules every pass and backend may rely on.

    verify(kernel)    # raises TraceError naming the instruction's source line

- every operand is defined before it is used, in the same block or an enclosing one;
- a loop body's arguments are (index, *carried), its yields match the carried types, and its results too;
- tile ops produce tiles, scalar ops scalars; stores and atomic adds produce nothing;
- element-wise ops with broadcasting (compare, logic, select) have one axis per operand, each operand fits
  the result's shape along its axis, masks are bool and only masks are; arange makes a vector from an index.
"""

from __future__ import annotations

from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import COMPARE_FNS, LOGIC_FNS, Op
from tilestack.ir.types import INDEX, ScalarType, TileType, bool_

_TILE_OPS = {Op.FILL, Op.UNARY, Op.BINARY, Op.BROADCAST, Op.CAST, Op.REDUCE, Op.MASK, Op.MMA, Op.LOAD,
             Op.COMPARE, Op.LOGIC, Op.SELECT, Op.ARANGE}
_SCALAR_OPS = {Op.CONST, Op.DIM, Op.BLOCK_ID, Op.NUM_BLOCKS, Op.SCALAR}


def verify(kernel: KernelIR) -> None:
    _block(kernel.body, set())
    defined = {r for ins in kernel.body.instrs for r in ins.results}
    for g in kernel.grid:
        if g not in defined or g.type != INDEX:
            raise TraceError(f"kernel {kernel.name}: grid value {g!r} is not an index defined at entry",
                             kernel.where)


def _block(block: Block, outer: set[Value]) -> None:
    defined = set(outer) | set(block.args)
    for ins in block.instrs:
        for s in ins.srcs:
            if s not in defined:
                raise TraceError(f"{ins.op.value}: operand {s!r} is used before it is defined", ins.where)
        if ins.op in _TILE_OPS and not (len(ins.results) == 1 and isinstance(ins.result.type, TileType)):
            raise TraceError(f"{ins.op.value} must produce one tile", ins.where)
        if ins.op in _SCALAR_OPS and not isinstance(ins.result.type, ScalarType):
            raise TraceError(f"{ins.op.value} must produce a scalar", ins.where)
        if ins.op in (Op.STORE, Op.ATOMIC_ADD) and ins.results:
            raise TraceError(f"{ins.op.value} produces no value", ins.where)
        if ins.op in (Op.COMPARE, Op.LOGIC, Op.SELECT):
            _broadcasting(ins)
        if ins.op is Op.ARANGE and (not ins.result.type.is_vec or ins.srcs[0].type != INDEX):
            raise TraceError("arange makes a vector from an index start", ins.where)
        if ins.op is Op.RANGE:
            body = ins.body
            carried = body.args[1:]
            inits = ins.srcs[3:]
            if any(s.type != INDEX for s in ins.srcs[:3]):
                raise TraceError("range: start, stop and step must be indices", ins.where)
            if body.args[0].type != INDEX or len(carried) != len(inits) != len(body.yields):
                raise TraceError("range: malformed loop (args, inits and yields disagree)", ins.where)
            for a, i, y, r in zip(carried, inits, body.yields, ins.results, strict=True):
                if not (a.type == i.type == y.type == r.type):
                    raise TraceError(f"range: loop-carried value changes type: {i.type} -> {y.type}", ins.where)
            _block(body, defined)
            for y in body.yields:
                if y not in defined and y not in {r for b in body.walk() for r in b.results} | set(body.args):
                    raise TraceError(f"range: yields {y!r}, which is not defined", ins.where)
        defined.update(ins.results)


def _broadcasting(ins) -> None:
    """The rules of compare, logic and select: operands broadcast to the result by their axes; masks are bool."""
    out = ins.result.type
    axes = ins.attrs.get("axes", ())
    fns = {Op.COMPARE: COMPARE_FNS, Op.LOGIC: LOGIC_FNS}.get(ins.op)
    if fns is not None and ins.attrs.get("fn") not in fns:
        raise TraceError(f"{ins.op.value}: unknown fn {ins.attrs.get('fn')!r}; expected one of {fns}", ins.where)
    arity = {Op.COMPARE: (2,), Op.LOGIC: (1,) if ins.attrs.get("fn") == "not" else (2,), Op.SELECT: (3,)}[ins.op]
    if len(ins.srcs) not in arity or len(axes) != len(ins.srcs):
        raise TraceError(f"{ins.op.value}: {len(ins.srcs)} operands and axes {axes!r}", ins.where)
    if (out.dtype is bool_) != (ins.op is not Op.SELECT):
        raise TraceError(f"{ins.op.value}: makes a {out}; compare and logic make bool masks, select numbers",
                         ins.where)
    for k, (s, ax) in enumerate(zip(ins.srcs, axes, strict=True)):
        is_mask = ins.op is Op.LOGIC or (ins.op is Op.SELECT and k == 0)
        if isinstance(s.type, ScalarType):
            if ax is not None or is_mask:
                raise TraceError(f"{ins.op.value}: operand {k} is a scalar where a tile is needed", ins.where)
            continue
        want = out.shape if ax is None else (out.shape[0] if ax == "row" else out.shape[1],)
        if ax not in (None, "row", "col") or (ax is not None and out.is_vec) or s.type.shape != want:
            raise TraceError(f"{ins.op.value}: operand {k} is a {s.type} on axis {ax}; it does not broadcast to "
                             f"{out}", ins.where)
        if (s.type.dtype is bool_) != is_mask:
            raise TraceError(f"{ins.op.value}: operand {k} is {s.type.dtype}; "
                             f"{'a mask must be bool' if is_mask else 'values must not be bool'}", ins.where)
