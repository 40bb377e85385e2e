"""Memory and control ops (loads, stores, atomic adds, loops) and the explicit-hardware ones (staged buffers,
async loads and their waits, async matrix products, turns among warp roles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tilestack.errors import TraceError
from tilestack.ir.ops.registry import (
    AccessAttrs,
    MmaAttrs,
    NoAttrs,
    Op,
    OpDef,
    RangeAttrs,
    TurnAttrs,
    define,
)
from tilestack.ir.ops.rules import (
    check_arity,
    check_index,
    check_same_shape,
    check_tile,
    fail,
    free_cost,
    ir_types,
    mask_of,
)
from tilestack.ir.ops.tile_ops import (
    mma_cost,
    mma_ref,
    mma_rule,
    tile_result,
)

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr


# ---- memory and control -----------------------------------------------------------------------------------------
def _access_rule(ins: Instr, g, tile, coords) -> None:
    t = ir_types()
    if not isinstance(g.type, t.GlobalType):
        fail(ins, f"the first operand must be a global, got {g.type}")
    tt = check_tile(ins, tile, "the tile")
    if len(coords) != g.type.rank or g.type.rank < len(tt.shape):
        fail(ins, f"{len(coords)} coordinates for a {tt} in a {g.type}")
    for k, c in enumerate(coords):
        check_index(ins, c, f"coordinate {k}")


def _load_rule(ins: Instr) -> None:
    tile_result(ins)
    _access_rule(ins, ins.srcs[0], ins.result, ins.srcs[1:])


def _effect_rule(ins: Instr) -> None:
    """A store or atomic add: (global, tile, one coordinate per axis of the global[, mask]); the mask, if any, a
    bool_ register tile (or vector) of the tile's shape."""
    if ins.results:
        raise TraceError(f"{ins.op.value} produces no value", ins.where)
    t = ir_types()
    if len(ins.srcs) < 2 or not isinstance(ins.srcs[0].type, t.GlobalType):
        fail(ins, f"takes (global, tile, *coords[, mask]), got {[str(s.type) for s in ins.srcs]}")
    g, tile = ins.srcs[:2]
    rank = g.type.rank
    _access_rule(ins, g, tile, ins.srcs[2:2 + rank])
    if len(ins.srcs) > 3 + rank:
        fail(ins, f"takes (global, tile, {rank} coordinates[, mask]), got {len(ins.srcs)} operands")
    mask = mask_of(ins)
    if mask is not None:
        mt = check_tile(ins, mask, "the mask")
        if mt.dtype is not t.bool_ or mt.space is not t.Space.REG or mt.shape != tile.type.shape:
            fail(ins, f"the mask is a {mt}; expected a bool_ register mask of the stored tile's shape "
                      f"({tile.type.shape})")


def _atomic_cost(ins: Instr, c) -> None:
    c.flops(c.memory(ins, "read"), per_instance=False)   # a read-modify-write of each element, and one add
    c.memory(ins, "written")


define(OpDef(
    Op.LOAD, "(global, *coords) -> tile", "tile", AccessAttrs, _load_rule, lambda ins, s, m: m.load(ins, s),
    lambda ins, c: c.memory(ins, "read"),
    doc="A tile of a global at tile coordinates (trailing coords count whole tiles); zeros past the edges."))
def _load_scalar_rule(ins: Instr) -> None:
    t = ir_types()
    if len(ins.results) != 1 or not isinstance(ins.result.type, t.ScalarType):
        raise TraceError("load_scalar must produce a scalar", ins.where)
    g, *index = ins.srcs
    if not isinstance(g.type, t.GlobalType):
        fail(ins, f"the first operand must be a global, got {g.type}")
    if len(index) != g.type.rank:
        fail(ins, f"{len(index)} element indices for a {g.type}")
    for k, c in enumerate(index):
        check_index(ins, c, f"index {k}")
    want = t.FLOAT if g.type.dtype.is_float else t.INDEX
    if ins.result.type != want:
        fail(ins, f"reads a {g.type.dtype} element into a {ins.result.type} scalar; expected {want}")


def _load_scalar_cost(ins: Instr, c) -> None:
    c.scalar_read(ins)


define(OpDef(
    Op.LOAD_SCALAR, "(global, *indices) -> scalar", "scalar", NoAttrs, _load_scalar_rule,
    lambda ins, s, m: m.load_scalar(ins, s), _load_scalar_cost,
    doc="One element of a global at element indices (one per axis), as an index (integer and bool globals) or a "
        "float (float globals, as an f32); 0 where an index falls outside the global. What a loop bound or a "
        "tile coordinate read from memory is made of (cu_seqlens, block tables, expert offsets)."))
# A masked store or atomic add writes only where its mask is true. Its cost counts every element inside the global
# (the mask is data: an upper bound, exact when the mask is all true).
define(OpDef(
    Op.STORE, "(global, tile, *coords[, mask]) -> ()", "effect", AccessAttrs, _effect_rule,
    lambda ins, s, m: m.store(ins, s, add=False), lambda ins, c: c.memory(ins, "written"),
    doc="Write a tile into a global; what hangs past the edges is dropped, and with a mask (a bool_ tile of the "
        "tile's shape, after the coordinates) what it masks off."))
define(OpDef(
    Op.ATOMIC_ADD, "(global, tile, *coords[, mask]) -> ()", "effect", AccessAttrs, _effect_rule,
    lambda ins, s, m: m.store(ins, s, add=True), _atomic_cost,
    doc="global += tile, atomically per element (only where the mask, if given, is true)."))


def _range_rule(ins: Instr) -> None:
    body = ins.body
    if body is None or not body.args:
        fail(ins, "a loop needs a body whose first argument is its index")
    carried, inits = body.args[1:], ins.srcs[3:]
    if any(s.type != ir_types().INDEX for s in ins.srcs[:3]):
        raise TraceError("range: start, stop and step must be indices", ins.where)
    if body.args[0].type != ir_types().INDEX or len(carried) != len(inits) != len(body.yields):
        raise TraceError("range: malformed loop (args, inits and yields disagree)", ins.where)
    for a, i, y, r in zip(carried, inits, body.yields, ins.results, strict=True):
        if not (a.type == i.type == y.type == r.type):
            raise TraceError(f"range: loop-carried value changes type: {i.type} -> {y.type}", ins.where)


define(OpDef(
    Op.RANGE, "(lo, hi, step, *inits) -> carried; body: (i, *carried) -> yields", "loop", RangeAttrs,
    _range_rule, lambda ins, s, m: m.loop(ins, s), lambda ins, c: c.loop(ins),
    doc="i = lo, lo + step, ... while before hi, as Python's range (step != 0); carried values flow through."))


# ---- explicit hardware ------------------------------------------------------------------------------------------
# Opt-in ops for hand-scheduled kernels (ThunderKittens style) and for backends that schedule explicitly (TMA,
# mbarriers, wgmma, warp specialization). Their reference semantics are synchronous: an async load has landed by
# the time the next op runs, an async mma is done when issued. Warp roles are not ops but a mark on each
# instruction (``Instr.role``, declared in ``KernelIR.roles``): the reference runs instructions in program order,
# whichever role they belong to, which is one valid interleaving of the roles.
def _stages_result(ins: Instr):
    t = ir_types()
    if len(ins.results) != 1 or not isinstance(ins.result.type, t.StagesType):
        raise TraceError(f"{ins.op.value} must produce one staged buffer", ins.where)
    return ins.result.type


def _stages_rule(ins: Instr) -> None:
    st = _stages_result(ins)
    check_arity(ins, 0)
    if st.stages < 1 or len(st.shape) not in (1, 2):
        fail(ins, f"a staged buffer has >= 1 stages of a 1-D or 2-D tile, got {st}")


define(OpDef(
    Op.STAGES, "() -> stages", "tile", NoAttrs, _stages_rule,
    lambda ins, s, m: np.full((ins.result.type.stages, *ins.result.type.shape),
                              np.nan if ins.result.type.dtype.is_float else 0), free_cost,
    doc="A multi-stage shared buffer, its stages unwritten (NaN in the reference: a read before a load shows)."))


def _async_load_rule(ins: Instr) -> None:
    st = _stages_result(ins)
    if len(ins.srcs) < 3 or ins.srcs[0].type != st:
        fail(ins, f"takes (buffer, stage, global, *coords) and makes the buffer's next version ({st})")
    check_index(ins, ins.srcs[1], "the stage")
    t = ir_types()
    g, coords = ins.srcs[2], ins.srcs[3:]
    if not isinstance(g.type, t.GlobalType) or len(coords) != g.type.rank or g.type.rank < len(st.shape):
        fail(ins, f"{len(coords)} coordinates for a {st.stage} in a {g.type}")
    for k, c in enumerate(coords):
        check_index(ins, c, f"coordinate {k}")


def _async_load_ref(ins: Instr, s: list, m) -> np.ndarray:
    stage = m.stage_index(ins, s[1])
    out = np.array(s[0], copy=True)
    out[stage] = m.read(ins.srcs[2], s[3:], ins.result.type.shape)
    return out


define(OpDef(
    Op.ASYNC_LOAD, "(stages, stage, global, *coords) -> stages", "tile", AccessAttrs, _async_load_rule,
    _async_load_ref, lambda ins, c: c.memory(ins, "read"),
    doc="Start loading a tile of a global into one stage (TMA on Hopper); the data is usable after wait_load."))


def _wait_load_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 2)
    st = ins.srcs[0].type
    if not isinstance(st, ir_types().StagesType) or ins.result.type != st.stage:
        fail(ins, f"reads one stage ({getattr(st, 'stage', st)}) of a staged buffer, not {ins.result.type}")
    check_index(ins, ins.srcs[1], "the stage")


define(OpDef(
    Op.WAIT_LOAD, "(stages, stage) -> shared tile", "tile", NoAttrs, _wait_load_rule,
    lambda ins, s, m: s[0][m.stage_index(ins, s[1])], free_cost,
    doc="Wait until the stage's async load has landed (an mbarrier wait on Hopper); the stage as a shared tile."))


def _mma_async_rule(ins: Instr) -> None:
    mma_rule(ins)


define(OpDef(
    Op.MMA_ASYNC, "(acc, a, b) -> pending acc + op(a) @ op(b)", "tile", MmaAttrs, _mma_async_rule, mma_ref,
    mma_cost, doc="Issue an mma (wgmma on Hopper); its result may be read only by mma_wait or as the acc of the "
                   "next async mma."))


def _mma_wait_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 1)
    check_same_shape(ins, ins.srcs[0], "x")


define(OpDef(
    Op.MMA_WAIT, "(pending) -> tile", "tile", NoAttrs, _mma_wait_rule, lambda ins, s, m: s[0], free_cost,
    doc="Wait for the async mmas that made ``x``; the finished tile."))


def _turn_rule(ins: Instr) -> None:
    check_arity(ins, 0)
    if ins.results:
        fail(ins, "makes nothing")
    order = ins.attrs.order
    if len(order) < 2 or len(set(order)) != len(order) or not all(isinstance(r, str) and r for r in order):
        fail(ins, f"the roles that take turns are two or more distinct roles, got {order!r}")
    if ins.role not in order:
        fail(ins, f"a turn among roles {order} is taken inside {('role ' + repr(ins.role)) if ins.role else 'no role'};"
                  " take it inside one of them (ts.partition)")


define(OpDef(
    Op.TURN_WAIT, "() -> ()", "effect", TurnAttrs, _turn_rule, lambda ins, s, m: None, free_cost,
    doc="Wait until it is this role's turn among ``order`` (a named barrier on Hopper): the roles run the code "
        "between turn_wait and turn_pass one after another, in order, round and round (FlashAttention-3's "
        "ping-pong of two consumer warpgroups' matrix products). Timing only: the reference runs program order."))
define(OpDef(
    Op.TURN_PASS, "() -> ()", "effect", TurnAttrs, _turn_rule, lambda ins, s, m: None, free_cost,
    doc="Hand the turn to the next role of ``order`` (the last role's to the first)."))
