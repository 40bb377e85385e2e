"""IR verification: the rules every pass and backend may rely on.

    verify(kernel)    # raises TraceError naming the instruction's source line

- every operand is defined before it is used, in the same block or an enclosing one;
- a loop body's arguments are (index, *carried), its yields match the carried types, and its results too;
- tile ops produce tiles, scalar ops scalars; stores produce nothing.
"""

from __future__ import annotations

from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import Op
from tilestack.ir.types import INDEX, ScalarType, TileType

_TILE_OPS = {Op.FILL, Op.UNARY, Op.BINARY, Op.BROADCAST, Op.CAST, Op.REDUCE, Op.MASK, Op.MMA, Op.LOAD}
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
        if ins.op is Op.STORE and ins.results:
            raise TraceError("store produces no value", ins.where)
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
