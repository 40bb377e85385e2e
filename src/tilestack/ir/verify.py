"""IR verification: the rules every pass and backend may rely on.

    verify(kernel)    # raises TraceError naming the instruction's source line

- every operand is defined before it is used, in the same block or an enclosing one;
- every instruction keeps its op's shape and dtype rule (``ir.ops``: one rule per op, beside its semantics):
  tile ops make one tile, scalar ops one scalar, stores and atomic adds nothing; element-wise ops broadcast
  their operands by their axes; a loop's body arguments are (index, *carried) and its yields and results match;
- the grid is made of index values defined at entry.
"""

from __future__ import annotations

from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import OPS
from tilestack.ir.types import INDEX


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
        OPS[ins.op].rule(ins)
        if ins.body is not None:
            body = ins.body
            _block(body, defined)
            inner = {r for b in body.walk() for r in b.results} | set(body.args) | defined
            for y in body.yields:
                if y not in inner:
                    raise TraceError(f"{ins.op.value}: yields {y!r}, which is not defined", ins.where)
        defined.update(ins.results)
