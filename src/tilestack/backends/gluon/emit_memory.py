"""Gluon emitters of memory and control: TMA and pointer loads and stores, atomics, the explicit-hardware staged
rings with their async loads and waits, and loops (pipelined by the ``schedule`` pass, module docstring of
``codegen``)."""

from __future__ import annotations

from tilestack.backends.gluon.emitter import (
    GL_DTYPES,
    SHARED_LAYOUT,
    Emitter,
    Ring,
    box_of,
    named_barrier,
    ring_view,
)
from tilestack.backends.gluon.layouts import blocked_key
from tilestack.backends.gluon.passes import pipelined_loads, scalar_slice
from tilestack.backends.python_dsl import FLOOR_SCALAR
from tilestack.ir.nodes import Instr
from tilestack.ir.ops import Op, access_of, mask_of, register_emitter
from tilestack.ir.types import FLOAT, Space, TileType


# ---- global memory --------------------------------------------------------------------------------------------------
def _tma_copy(e: Emitter, desc: str, coords: str, barrier: str, dst: str, pred: str = "") -> str:
    p = f", pred={pred}" if pred else ""
    return f"tma.async_copy_global_to_shared({desc}, {coords}, {barrier}, {dst}{p})"


@register_emitter("gluon", Op.LOAD_SCALAR)
def _e_load_scalar(e: Emitter, ins: Instr) -> None:
    """One element through its pointer (offsets in 64 bits, as the tile accesses'), masked to the global's sizes
    (0 outside); an index as a 32- or 64-bit int (narrower ints and bools widen to 32), a float as an f32 (an f64
    element that f64 work takes as an f64 too)."""
    g, *index = ins.srcs
    gname, dtype = e.globals[g], g.type.dtype
    offset = " + ".join(f"{e.wide(c)} * {gname}_s{a}" for a, c in enumerate(index))
    mask = " & ".join(f"({e.name(c)} >= 0) & ({e.name(c)} < {gname}_d{a})" for a, c in enumerate(index))
    x = f"gl.load({gname} + {offset}, mask={mask}, other=0)" if index else f"gl.load({gname})"
    if ins.result in e.f64_floats:     # an f64 element f64 work takes (ir.scalars.f64_floats): an f32 elsewhere
        name = e.name(ins.result)
        e.emit(f"{name} = {x}")
        e.f64_floats[ins.result] = name
        e.names[ins.result] = f"gl.cast({name}, gl.float32)"
        return
    if ins.result.type == FLOAT:
        x = x if dtype.name == "f32" else f"{x}.to(gl.float32)"
    elif dtype.itemsize < 4 or not dtype.name.startswith("i"):     # bool, u8, i8, i16: as an i32 index
        x = f"{x}.to(gl.int32)"
    e.assign(ins.result, x)


@register_emitter("gluon", Op.LOAD)
def _e_load(e: Emitter, ins: Instr) -> None:
    g, *coords = ins.srcs
    t = ins.result.type
    if ins in e.ring_tiles:                    # a pipelined load: its stage has landed (the loop waited)
        e.assign(ins.result, e.ring_tiles[ins])
        return
    if ins.attrs.via == "tma":                 # one copy into a fresh buffer, waited on its own barrier
        desc, block = e.descriptor(g, t.shape), box_of(g, t.shape)
        buf, bar = e.fresh(f"{ins.result.hint or 'tile'}_smem"), e.fresh("bar")
        e.emit(f"{buf} = gl.allocate_shared_memory({GL_DTYPES[t.dtype.name]}, {list(block)}, {desc}.layout)")
        e.emit(f"{bar} = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())")
        e.emit(f"mbarrier.init({bar}, count=1)")
        e.emit("hopper.fence_async_shared()")
        e.emit(f"mbarrier.expect({bar}, {desc}.block_type.nbytes)")
        e.emit(_tma_copy(e, desc, e.tma_coords(coords, t.shape), bar, buf))
        e.emit(f"mbarrier.wait({bar}, 0)")
        e.emit(f"mbarrier.invalidate({bar})")
        e.assign(ins.result, ring_view(buf, block, t.shape))
        return
    coalesced = blocked_key(t)
    ptr, mask = e.address(g, coords, t.shape, coalesced)
    x = e.cast(f"gl.load({ptr}, mask={mask}, other=0.0)", g.type.dtype, t.dtype)
    if t.space is Space.SHARED:      # no copy engine for these tensors: through registers into a shared tile
        dt = GL_DTYPES[t.dtype.name]
        e.assign(ins.result, f"gl.allocate_shared_memory({dt}, {list(t.shape)}, "
                             f"{SHARED_LAYOUT.format(list(t.shape), dt)}, {x})")
        e.emit("hopper.fence_async_shared()")
        return
    key = e.plan.get(ins.result) or coalesced
    e.assign(ins.result, x if key == coalesced else f"gl.convert_layout({x}, {e.layout(key)})")
    e.set_lay(ins.result, key)


def _masked(e: Emitter, ins: Instr, edge: str, key: tuple) -> str:
    """The mask of a store's or atomic add's pointers in layout ``key``: the global's edges, and the op's own mask
    if it has one."""
    m = mask_of(ins)
    return edge if m is None else f"{edge} & {e.as_layout(m, key)}"


@register_emitter("gluon", Op.STORE)
def _e_store(e: Emitter, ins: Instr) -> None:
    g, x, coords = ins.srcs[0], ins.srcs[1], access_of(ins)[2]
    t = x.type
    key = blocked_key(t)
    # a shared tile is read into registers first (in the layout its pointer store uses)
    reg = f"{e.name(x)}.load({e.layout(key)})" if t.space is Space.SHARED else None
    val = e.cast(reg or e.name(x), t.dtype, g.type.dtype)
    if ins.attrs.via == "tma":     # registers -> shared -> the copy engine; waited before reuse (never masked)
        desc, block = e.descriptor(g, t.shape), box_of(g, t.shape)
        buf = e.fresh(f"{x.hint or 'tile'}_smem")
        e.emit(f"{buf} = gl.allocate_shared_memory({GL_DTYPES[g.type.dtype.name]}, {list(block)}, {desc}.layout)")
        e.emit(f"{ring_view(buf, block, t.shape)}.store({val})")
        e.emit("hopper.fence_async_shared()")
        e.emit(f"tma.async_copy_shared_to_global({desc}, {e.tma_coords(coords, t.shape)}, {buf})")
        e.emit("tma.store_wait(0)")
        return
    ptr, mask = e.address(g, coords, t.shape, key)
    e.emit(f"gl.store({ptr}, {e.cast(reg or e.as_layout(x, key), t.dtype, g.type.dtype)}, "
           f"mask={_masked(e, ins, mask, key)})")


@register_emitter("gluon", Op.ATOMIC_ADD)
def _e_atomic_add(e: Emitter, ins: Instr) -> None:
    g, x, coords = ins.srcs[0], ins.srcs[1], access_of(ins)[2]
    t = x.type
    key = blocked_key(t)
    ptr, mask = e.address(g, coords, t.shape, key)
    e.emit(f'gl.atomic_add({ptr}, {e.cast(e.as_layout(x, key), t.dtype, g.type.dtype)}, '
           f'mask={_masked(e, ins, mask, key)}, sem="relaxed")')


# ---- explicit hardware: staged buffers, async loads and their waits -------------------------------------------------
def allocate_ring(e: Emitter, ring: Ring, desc: str) -> None:
    """A ring of shared buffers with a ready barrier per stage (and an empty one per stage where consumer roles
    free them), initialized and fenced for the copy engine."""
    s, dt = ring.type.stages, GL_DTYPES[ring.type.dtype.name]
    e.emit(f"{ring.name} = gl.allocate_shared_memory({dt}, {[s, *ring.block]}, {desc}.layout)"
           f"   # {s} stages of {list(ring.type.shape)}")
    e.emit(f"{ring.name}_ready = gl.allocate_shared_memory(gl.int64, [{s}, 1], mbarrier.MBarrierLayout())")
    if ring.consumers:
        e.emit(f"{ring.name}_empty = gl.allocate_shared_memory(gl.int64, [{s}, 1], mbarrier.MBarrierLayout())")
    e.emit(f"for st in gl.static_range({s}):")
    e.emit(f"    mbarrier.init({ring.name}_ready.index(st), count=1)")
    if ring.consumers:
        e.emit(f"    mbarrier.init({ring.name}_empty.index(st), count={ring.consumers})   # one arrival per role")
    e.emit("hopper.fence_async_shared()")


def phase_bits(e: Emitter, ring: Ring) -> None:
    """The phase of each stage's barriers, one bit per stage (flipped at each completed wait)."""
    e.emit(f"{ring.name}_rph = 0   # ready phases, bit s for stage s")
    if ring.consumers:
        e.emit(f"{ring.name}_eph = 0   # empty phases")


@register_emitter("gluon", Op.STAGES)
def _e_stages(e: Emitter, ins: Instr) -> None:
    ring = e.ring(ins.result)
    e.names[ins.result] = ring.name
    if not e.partition:     # with warp roles the kernel allocates rings before forking, partitions get them
        allocate_ring(e, ring, e.ring_desc(ring))
        phase_bits(e, ring)


@register_emitter("gluon", Op.ASYNC_LOAD)
def _e_async_load(e: Emitter, ins: Instr) -> None:
    buf, stage, g, *coords = ins.srcs
    ring = e.ring(buf)
    e.names[ins.result] = ring.name
    s = e.stage(stage)
    desc = e.descriptor(g, ring.type.shape)
    if ring.consumers:      # wait until every consumer role has freed the stage (passes at once the first time)
        e.emit(f"mbarrier.wait({ring.name}_empty.index({s}), (({ring.name}_eph >> {s}) & 1) ^ 1)")
        e.emit(f"{ring.name}_eph = {ring.name}_eph ^ (1 << {s})")
    e.emit(f"mbarrier.expect({ring.name}_ready.index({s}), {desc}.block_type.nbytes)")
    e.emit(_tma_copy(e, desc, e.tma_coords(coords, ring.type.shape), f"{ring.name}_ready.index({s})",
                     f"{ring.name}.index({s})"))


@register_emitter("gluon", Op.WAIT_LOAD)
def _e_wait_load(e: Emitter, ins: Instr) -> None:
    buf, stage = ins.srcs
    ring = e.ring(buf)
    s = e.stage(stage)
    e.emit(f"mbarrier.wait({ring.name}_ready.index({s}), ({ring.name}_rph >> {s}) & 1)")
    e.emit(f"{ring.name}_rph = {ring.name}_rph ^ (1 << {s})")
    e.assign(ins.result, ring_view(f"{ring.name}.index({s})", ring.block, ring.type.shape))
    if ring.consumers:
        e.stage_of[ins.result] = (ring, s)
        e.held[-1].append((ring, s))


# ---- loops -----------------------------------------------------------------------------------------------------------
@register_emitter("gluon", Op.RANGE)
def _e_range(e: Emitter, ins: Instr) -> None:
    lo, hi, step, *inits = ins.srcs
    body = ins.body
    slots = e.carried(ins)
    for k in slots:
        arg, init = body.args[1 + k], inits[k]
        if isinstance(arg.type, TileType):
            e.assign(arg, e.as_layout(init, e.plan[arg]))
            e.set_lay(arg, e.plan[arg])
        else:
            e.assign(arg, e.name(init))
    loads = [x for x in pipelined_loads(ins) if e.emitting(x)] if ins.attrs.stages else []
    outer = e.pipelining
    if loads and ins.attrs.stages >= 2 and e.name(step).isdigit() and int(e.name(step)) > 0:
        _pipelined_loop(e, ins, loads)
    else:
        bounds = [e.name(lo), e.name(hi)] + ([] if e.name(step) == "1" else [e.name(step)])
        head = len(e.lines)
        e.emit(f"for {e.name(body.args[0])} in range({', '.join(bounds)}):")
        e.indent += 1
        e.pipelining = None
        _loop_body(e, ins, slots, head)
        e.indent -= 1
    e.pipelining = outer
    for k in slots:
        arg, r = body.args[1 + k], ins.results[k]
        e.names[r] = e.name(arg)
        if isinstance(arg.type, TileType):
            e.set_lay(r, e.plan[arg])
    for r in list(e.deferred):     # the accumulation chains kept in flight: done after the loop
        res = next((ins.results[k] for k in slots if body.yields[k] is r), None)
        if res is not None:
            e.emit(f"{e.name(res)} = hopper.warpgroup_mma_wait(0, deps=[{e.name(res)}])")
            e.deferred.remove(r)


def _loop_body(e: Emitter, ins: Instr, slots: list[int], head: int) -> None:
    body = ins.body

    def trip():
        e.open_block()
        e.block(body)
        e.close_block()

    e.carry_inflight(head, body, trip)
    for k in slots:
        arg, y = body.args[1 + k], body.yields[k]
        if y is not arg:
            e.assign(arg, e.as_layout(y, e.plan[arg]) if isinstance(arg.type, TileType) else e.name(y))
    if not any(e.emitting(i) for i in body.instrs) and not slots:
        e.emit("pass")


def _pipelined_loop(e: Emitter, ins: Instr, loads: list[Instr]) -> None:
    """A ring of ``stages`` buffers per load and one barrier per stage; ``stages - 1`` trips' loads in flight
    (a prologue fills the ring, each trip refills the stage the previous trip's matrix work has released)."""
    lo, hi, step = (e.name(s) for s in ins.srcs[:3])
    body, stages = ins.body, ins.attrs.stages
    idx = body.args[0]
    trips = e.fresh("trips")
    count = hi if (lo, step) == ("0", "1") else f"{hi} - {lo}" if step == "1" else f"gl.cdiv({hi} - {lo}, {step})"
    if any(v in e.from_memory for v in ins.srcs[:3]):   # bounds read from an int64 tensor make an i64 count: the
        count = f"gl.cast({count}, gl.int32)"            # stages are indexed by an i32 (a count is far below 2**31)
    e.emit(f"{trips} = {count}")
    ready = e.fresh("ready")
    rings = []
    for x in loads:
        g, t = x.srcs[0], x.result.type
        desc, block = e.descriptor(g, t.shape), box_of(g, t.shape)
        name = e.fresh(f"{x.result.hint or 'tile'}_ring")
        e.emit(f"{name} = gl.allocate_shared_memory({GL_DTYPES[t.dtype.name]}, {[stages, *block]}, {desc}.layout)"
               f"   # {stages} stages of {list(t.shape)}")
        rings.append((x, name, desc, block))
    e.emit(f"{ready} = gl.allocate_shared_memory(gl.int64, [{stages}, 1], mbarrier.MBarrierLayout())")
    e.emit(f"for st in gl.static_range({stages}):")
    e.emit(f"    mbarrier.init({ready}.index(st), count=1)")
    e.emit("hopper.fence_async_shared()")
    nbytes = " + ".join(f"{desc}.block_type.nbytes" for _, _, desc, _ in rings)
    made = {r: i for i in body.instrs for r in i.results}
    for x, *_ in rings:
        for i in scalar_slice(body, x.srcs[1:], idx):   # their scalar work is recomputed per trip (pure)
            if i.op is Op.SCALAR and i.attrs.fn in FLOOR_SCALAR:
                e.floor_helpers = True

    def issue(trip: str, stage: str, pred: str) -> None:
        k = trip if (lo, step) == ("0", "1") else f"({lo} + {trip} * {step})"
        e.emit(f"mbarrier.expect({ready}.index({stage}), {nbytes}, pred={pred})")
        for x, name, desc, _ in rings:
            coords = e.tma_coords(x.srcs[1:], x.result.type.shape, lambda v: e.scalar_expr(v, {idx: k}, made))
            e.emit(_tma_copy(e, desc, coords, f"{ready}.index({stage})", f"{name}.index({stage})", pred))

    e.emit(f"for p in gl.static_range({stages - 1}):   # prologue: the first trips' loads")
    e.indent += 1
    issue("p", "p", f"p < {trips}")
    e.indent -= 1
    trip = e.name(idx) if (lo, step) == ("0", "1") else e.fresh("trip")
    e.emit(f"for {trip} in range(0, {trips}):")
    e.indent += 1
    if trip != e.name(idx):
        e.emit(f"{e.name(idx)} = {lo} + {trip} * {step}")
    s = e.fresh("s")
    e.emit(f"{s} = {trip} % {stages}")
    e.emit(f"mbarrier.wait({ready}.index({s}), ({trip} // {stages}) & 1)")
    for x, name, _, block in rings:
        e.ring_tiles[x] = ring_view(f"{name}.index({s})", block, x.result.type.shape)
    e.pipelining = ins
    e.open_block()
    e.block(body)
    e.close_block()
    nxt = e.fresh("nxt")
    e.emit(f"{nxt} = {trip} + {stages - 1}   # refill the stage the previous trip used")
    issue(nxt, f"{nxt} % {stages}", f"{nxt} < {trips}")
    slots = e.carried(ins)
    for k in slots:
        arg, y = body.args[1 + k], body.yields[k]
        if y is not arg:
            e.assign(arg, e.as_layout(y, e.plan[arg]) if isinstance(arg.type, TileType) else e.name(y))
    e.indent -= 1
    # every load issued was waited on (the refills past the last trip are predicated off): the barriers can go,
    # and must before their memory is initialized again (the loop inside another, e.g. a persistent one)
    e.emit(f"for st in gl.static_range({stages}):")
    e.emit(f"    mbarrier.invalidate({ready}.index(st))")



# ---- turns among warp roles: named barriers ----------------------------------------------------------------------
@register_emitter("gluon", Op.TURN_WAIT)
def _e_turn_wait(e: Emitter, ins: Instr) -> None:
    e.emit(named_barrier("sync", *e.turns[(ins.attrs.order, ins.role)]))


@register_emitter("gluon", Op.TURN_PASS)
def _e_turn_pass(e: Emitter, ins: Instr) -> None:
    order = ins.attrs.order
    e.emit(named_barrier("arrive", *e.turns[(order, order[(order.index(ins.role) + 1) % len(order)])]))


def first_turns(e: Emitter, role: str) -> None:
    """At a partition's start: the last role of each order hands the first role its first turn."""
    for order, r in e.turns:
        if r == order[0] and order[-1] == role:
            e.emit(named_barrier("arrive", *e.turns[(order, r)]))


def last_turns(e: Emitter, role: str) -> None:
    """At a partition's end: the first role of each order takes the turn the last role passed on last (every
    arrival on a named barrier met by a sync before the CTA ends)."""
    for order, r in e.turns:
        if r == order[0] == role:
            e.emit(named_barrier("sync", *e.turns[(order, r)]))
