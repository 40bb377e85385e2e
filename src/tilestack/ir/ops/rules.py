"""What the ops' shape and dtype rules and cost rules share: failing with a TraceError naming the op, operand
checks, and the counter protocol of the cost rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tilestack.errors import TraceError
from tilestack.ir.ops.registry import (
    OPS,
    Op,
)

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr


# ---- helpers of the rules ---------------------------------------------------------------------------------------
def fail(ins: Instr, msg: str) -> None:
    raise TraceError(f"{ins.op.value}: {msg}", ins.where)


def ir_types():
    from tilestack.ir import types
    return types


def check_tile(ins: Instr, v, what: str):
    t = ir_types()
    if not isinstance(v.type, t.TileType):
        fail(ins, f"{what} must be a tile or vector, got {v.type}")
    return v.type


def check_index(ins: Instr, v, what: str) -> None:
    if v.type != ir_types().INDEX:
        fail(ins, f"{what} must be an index, got {v.type}")


def check_fn(ins: Instr) -> None:
    fns = OPS[ins.op].fns
    if ins.attrs.fn not in fns:
        fail(ins, f"unknown fn {ins.attrs.fn!r}; expected one of {tuple(fns)}")


def check_arity(ins: Instr, *counts: int) -> None:
    if len(ins.srcs) not in counts:
        fail(ins, f"takes {' or '.join(map(str, counts))} operands, got {len(ins.srcs)}")


def check_same_shape(ins: Instr, v, what: str) -> None:
    if check_tile(ins, v, what).shape != ins.result.type.shape:
        fail(ins, f"{what} is a {v.type} but the result is a {ins.result.type}")


def check_axis(ins: Instr, axis: str) -> None:
    if axis not in ("row", "col"):
        fail(ins, f"axis must be 'row' or 'col', got {axis!r}")


def no_rule(ins: Instr) -> None:
    return None


def access_of(ins: Instr) -> tuple:
    """(global value, tile shape, coordinate values) of a load, store, atomic add or async load."""
    if ins.op is Op.LOAD:
        return ins.srcs[0], ins.result.type.shape, ins.srcs[1:]
    if ins.op is Op.ASYNC_LOAD:
        return ins.srcs[2], ins.result.type.shape, ins.srcs[3:]
    g = ins.srcs[0]
    return g, ins.srcs[1].type.shape, ins.srcs[2:2 + g.type.rank]   # (a masked store's mask follows the coords)


def mask_of(ins: Instr):
    """The bool_ mask of a masked store or atomic add (its operand after the coordinates, one per axis of the
    global), or None: only the elements where it is true are written."""
    if ins.op not in (Op.STORE, Op.ATOMIC_ADD):
        return None
    extra = ins.srcs[2 + ins.srcs[0].type.rank:]
    return extra[0] if extra else None


# ---- the counter protocol of cost rules (ir.cost implements it) ----------------------------------------------
# counter.flops(per_instance, mma=False)   FLOPs one instance does (counted once per program and loop trip)
# counter.memory(ins, key)                 global bytes a load / store / atomic add touches, as "read"/"written"
# counter.loop(ins)                        evaluate a loop body for every trip
def free_cost(ins: Instr, counter) -> None:
    return None


def cost_per_result_element(ins: Instr, counter) -> None:
    counter.flops(ins.result.type.numel)
