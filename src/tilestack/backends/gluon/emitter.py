"""The Gluon emitter's state for one generated function (``Emitter``): names, layouts, blocks and the
staged rings (``Ring``), with the dtype and template tables every emitter module shares. The emitters
themselves, one per op, are in ``emit_compute`` and ``emit_memory``; ``codegen`` walks the IR with them."""

from __future__ import annotations

import dataclasses
import re

from tilestack.backends.gluon.layouts import materialize, plan_layouts
from tilestack.backends.python_dsl import (
    FLOOR_SCALAR,
    engine_coord,
    literal,
    param_names,
    saturated_literal,
    scalar_templates,
    wide_index_op,
)
from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import EMITTERS, Op
from tilestack.ir.scalars import (
    arg_bounds,
    f64_floats,
    fits_int32,
    from_memory,
    nonnegative,
    past_int32,
    wide_index,
)
from tilestack.ir.types import (
    StagesType,
    f64,
    int_range,
    narrow_int,
)

GL_DTYPES = {"f64": "gl.float64", "f32": "gl.float32", "f16": "gl.float16", "bf16": "gl.bfloat16",
             "i32": "gl.int32", "i64": "gl.int64", "bool": "gl.int1", "i8": "gl.int8", "f8e4m3": "gl.float8e4nv",
             "u8": "gl.uint8"}
SIG_DTYPES = {"f64": "fp64", "f32": "fp32", "f16": "fp16", "bf16": "bf16", "i32": "i32", "i64": "i64",
              "bool": "i1", "i8": "i8", "f8e4m3": "fp8e4nv", "u8": "u8"}
# max, min and relu propagate NaN, as NumPy's (the reference), torch's, the Triton backend's and CUDA's max.NaN do
# (gl.maximum's default, and gl.max's, ignore it); the generated module imports triton.language as tl for the flag
NAN_FLAG = "propagate_nan=tl.PropagateNan.ALL"
SCALAR_TEMPLATES = scalar_templates("gl")
SHARED_LAYOUT = "gl.NVMMASharedLayout.get_default_for({}, {})"




def buffer_hints(kernel: KernelIR) -> dict[int, str]:
    out: dict[int, str] = {}
    for ins in kernel.walk():
        for r in ins.results:
            if r.buffer is not None and r.hint:
                out.setdefault(r.buffer, r.hint)
    return out


# What the generated source names itself beside the names every Python source writer reserves (python_dsl): the
# modules it imports, the static loops' variables (`for p in gl.static_range(...)`: a parameter `p` would be read
# as the loop's last index after it), rings' barriers and phases, layouts
SOURCE_NAMES = frozenset({"gl", "gluon", "hopper", "mbarrier", "tma", "p", "st", "ring"})
SOURCE_NAME_FORMS = re.compile(r"^L\d+$|_(ready|empty|rph|eph)$")


def source_param_names(kernel: KernelIR) -> list[str]:
    """Each kernel parameter's name in the generated source (python_dsl.param_names with this source's names)."""
    return param_names([p.name for p in kernel.params], SOURCE_NAMES, SOURCE_NAME_FORMS)


# Named barriers for turns among warp roles (ts.turn): the top 8 of the SM's 16 ids. Triton takes the low ones (0
# for the CTA, 1 for warp_specialize's start and end, one per partition for its own bar.syncs).
TURN_BARRIERS = range(15, 7, -1)


def turn_barriers(kernel: KernelIR) -> dict[tuple[tuple[str, ...], str], tuple[int, int]]:
    """(order, role) -> (named barrier id, threads) of the barrier ``role`` waits on for its turn in ``order``:
    ``role``'s threads sync there and the previous role's arrive (its pass), so it counts both."""
    out: dict[tuple[tuple[str, ...], str], tuple[int, int]] = {}
    ids = iter(TURN_BARRIERS)
    for ins in kernel.walk():
        if ins.op is Op.TURN_WAIT and (ins.attrs.order, ins.attrs.order[0]) not in out:
            order = ins.attrs.order
            for k, role in enumerate(order):
                bar = next(ids, None)
                if bar is None:
                    raise BackendError(f"{ins.where}: turns among roles need {len(TURN_BARRIERS) + 1} or more named "
                                       f"barriers; the gluon backend has {len(TURN_BARRIERS)} for them")
                threads = (kernel.roles[role].warps + kernel.roles[order[k - 1]].warps) * 32
                out[(order, role)] = (bar, threads)
    return out


def named_barrier(kind: str, bar: int, threads: int) -> str:
    """Gluon source of ``bar.sync`` (wait with ``threads`` threads) or ``bar.arrive`` (count in and go on) on
    named barrier ``bar``: inline PTX, not pure (kept in program order with the wgmma it orders)."""
    return (f'gl.inline_asm_elementwise("bar.{kind} {bar}, {threads}; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, '
            'is_pure=False, pack=1)')


def box_of(g: Value, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The copy-engine box of a tile of ``shape`` in global ``g``: leading axes of one element."""
    return (1,) * (g.type.rank - len(shape)) + tuple(shape)


def ring_view(expr: str, block: tuple[int, ...], shape: tuple[int, ...]) -> str:
    return expr if len(block) == len(shape) else f"{expr}.reshape({list(shape)})"


@dataclasses.dataclass
class Ring:
    """A staged buffer (all versions of one ``stages`` value): its shared ring and barriers."""
    name: str
    type: StagesType
    block: tuple[int, ...]
    consumers: int        # roles that wait on it (arrivals that free a stage); 0 without warp roles



def read_later(block: Block, ins: Instr, v: Value) -> bool:
    """Whether an instruction of ``block`` after ``ins`` (nested loop bodies included) reads ``v``."""
    after = False
    for i in block.instrs:
        if i is ins:
            after = True
            continue
        if after and (v in i.srcs or (i.body is not None and any(v in x.srcs for x in i.body.walk()))):
            return True
    return False

class Emitter:
    """Emits one Gluon function: the kernel, or one warp role's partition (``keep``: the instructions it runs)."""

    def __init__(self, kernel: KernelIR, warps: int, rings: dict[int, Ring], keep: set | None = None,
                 live: set | None = None, partition: bool = False, index64: bool | frozenset[int] = True):
        self.kernel = kernel
        # the param indices of the globals whose element offsets are computed in 64 bits (True: every one, where
        # the tensors are not known: a source or ahead-of-time compile without arguments)
        self.index64 = index64
        self.warps = warps
        self.rings = rings
        self.keep, self.live, self.partition = keep, live, partition
        self.pnames = source_param_names(kernel)      # each parameter's name in the source
        self.descriptors = {(how[1], how[2]): f"{self.pnames[how[1]]}_desc{k}"
                            for k, how in enumerate(r for r in kernel.reads if r[0] == "desc")}
        self.lines: list[str] = []
        self.names: dict[Value, str] = {}
        self.globals: dict[Value, str] = {}
        self.global_index: dict[Value, int] = {}
        self.consts: set[Value] = set()
        self.nonneg = nonnegative(kernel.body)
        self.wide_index = wide_index(kernel.body)   # index values computed in 64 bits (data past 2**31)
        # index values of any size: read from memory, or made from an int argument past int32 (ir.scalars.past_int32)
        self.from_memory = from_memory(kernel.body) | past_int32(kernel.body)
        self.arg_bounds = arg_bounds(kernel.body)    # bounds of the index values made from int arguments
        # floats f64 work takes (ir.scalars.f64_floats): value -> its f64 name (an argument's: an f64 parameter),
        # an f32 of it everywhere else
        self.f64_floats: dict[Value, str] = dict.fromkeys(f64_floats(kernel), "")
        self.floor_helpers = False
        self.nan_helpers = False                     # whether the source needs _max_nan / _min_nan
        self.indent = 1
        self.plan = plan_layouts(kernel)
        self.hints = buffer_hints(kernel)             # a tile's name, from whichever version the user named
        self.turns = turn_barriers(kernel)            # (order, role) -> (named barrier, threads)
        self.lay: dict[Value, tuple] = {}            # the layout each emitted register value has
        self.layout_names: dict[tuple, str] = {}
        self.layout_decls: list[str] = []
        self.fresh_count = 0
        self.taken: set[str] = set()                 # every variable name given so far (values' and fresh ones)
        self.ring_tiles: dict[Instr, str] = {}       # a pipelined load -> its stage's shared buffer expression
        self.deferred: list[Value] = []              # mma results kept in flight in a pipelined loop
        # freeing stages (warp roles): which stage each waited tile is; per open block, the stages waited on
        # and not read by a wgmma in flight; the stages wgmmas in flight read, with the flag that says whether
        # the entry is live (a name holding 0/1, or None: always), carried around loops in variables
        self.stage_of: dict[Value, tuple[Ring, str]] = {}
        self.held: list[list[tuple[Ring, str]]] = [[]]
        self.inflight: list[tuple[Ring, str, str | None]] = []
        # stages held by an enclosing block that a wgmma of a nested loop reads (entry -> that wgmma's line), and
        # whether an async wgmma may be in flight here (issued, and no wait(0) or synchronous wgmma since)
        self.nested_reads: dict[tuple[str, str], str] = {}   # (ring, stage) -> line
        self.unretired = False
        self.blocks: list[Block] = []                # the blocks being emitted, innermost last
        self.pipelining: Instr | None = None        # the pipelined loop whose body is being emitted

    # ---- names and layouts ------------------------------------------------------------------------------------
    def name(self, v: Value) -> str:
        if v not in self.names:
            n = len(self.names)
            hint = v.hint or self.hints.get(v.buffer, "")
            name = f"{hint}_{n}" if hint else f"v{n}"
            while name in self.taken:    # a fresh name of the same spelling (a tile `o` and an offset o_1)
                name += "_"
            self.names[v] = name
            self.taken.add(name)
        return self.names[v]

    def fresh(self, stem: str) -> str:
        """A new variable ``{stem}_{k}`` that no value's name is (a user's tile named ``o``, ``s`` or ``bar`` is
        ``o_1``, ``s_5``, ``bar_2``: the same spelling would rebind it)."""
        while True:
            self.fresh_count += 1
            name = f"{stem}_{self.fresh_count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def assign(self, v: Value, expr: str) -> None:
        self.emit(f"{self.name(v)} = {expr}")

    def layout(self, key: tuple) -> str:
        """The name of the constexpr layout ``key`` in this function (declared at its top)."""
        if key not in self.layout_names:
            decl = materialize(key, self.warps, self.layout)    # parents first: declared before their children
            self.layout_names[key] = name = f"L{len(self.layout_decls)}"
            self.layout_decls.append(f"{name}: gl.constexpr = {decl}")
        return self.layout_names[key]

    def as_layout(self, v: Value, key: tuple) -> str:
        """``v`` in layout ``key`` (converted if it has another)."""
        n = self.name(v)
        return n if self.lay.get(v) == key else f"gl.convert_layout({n}, {self.layout(key)})"

    def float_scalar(self, v: Value, work, shape: tuple[int, ...] | None = None, key: tuple | None = None) -> str:
        """Float scalar ``v`` as ``work`` (a float work dtype) takes it: in f64 work an f64 argument as it is and a
        constant as an f64 tile of ``shape`` in layout ``key`` (a Python float is an f32 to Gluon: 0.1 would be
        0.10000000149), else its name (an f32 there, as the reference takes it)."""
        if work is not f64:
            return self.name(v)
        if v in self.consts and shape is not None:
            return f"gl.full({list(shape)}, {self.name(v)}, gl.float64, layout={self.layout(key)})"
        return self.f64_floats.get(v) or self.name(v)

    def f32(self, expr: str, v: Value) -> str:
        return expr if v.type.dtype.name in ("f32", "f64") else f"{expr}.to(gl.float32)"

    def cast(self, expr: str, src_dtype, dst_dtype) -> str:
        if src_dtype is dst_dtype:
            return expr
        if "f8e4m3" in (src_dtype.name, dst_dtype.name) and \
                not {src_dtype.name, dst_dtype.name} <= {"f8e4m3", "f32", "f16", "bf16"}:
            expr = f"{expr}.to(gl.float32)"   # Triton converts fp8 only from and to 16- and 32-bit floats
        if src_dtype.is_float and narrow_int(dst_dtype):
            # the GPU converts a float to i8 through cvt.rzi.s16 (saturating to i16, then keeping the low byte:
            # 300.0 -> 44); clamped first (NaN kept, for the cvt to make 0), it saturates as the reference does
            lo, hi = int_range(dst_dtype)
            expr = f"gl.minimum(gl.maximum({expr}, {float(lo)!r}, {NAN_FLAG}), {float(hi)!r}, {NAN_FLAG})"
        elif src_dtype.is_float and dst_dtype.name == "i64":
            # the H200's cvt.rzi.s64 makes NaN -2**63 (s32's makes 0, as the reference does): NaN as 0 first, and
            # the saturation spelled out (2**63 is the first float past the range)
            lo, hi = int_range(dst_dtype)
            return (f"gl.where({expr} >= {float(-lo)!r}, {hi}, gl.where({expr} < {float(lo)!r}, {lo}, "
                    f"gl.where({expr} != {expr}, 0.0, {expr}).to(gl.int64)))")
        return f"{expr}.to({GL_DTYPES[dst_dtype.name]})"

    def set_lay(self, v: Value, key: tuple) -> None:
        self.lay[v] = key

    def ring(self, v: Value) -> Ring:
        return self.rings[v.buffer]

    def ring_desc(self, ring: Ring) -> str:
        """The descriptor of a ring's async loads (they read one global with one box: the ring's layout)."""
        for ins in self.kernel.walk():
            if ins.op is Op.ASYNC_LOAD and self.rings.get(ins.result.buffer) is ring:
                return self.descriptor(ins.srcs[2], ring.type.shape)
        raise BackendError(f"{self.kernel.where}: the gluon backend fills staged buffers with async loads; "
                           f"{ring.name} has none")

    # ---- the walk ----------------------------------------------------------------------------------------------
    def emitting(self, ins: Instr) -> bool:
        return self.keep is None or ins in self.keep

    def block(self, block: Block) -> None:
        table = EMITTERS["gluon"]
        self.blocks.append(block)
        for ins in block.instrs:
            if self.emitting(ins):
                table[ins.op].fn(self, ins)
        self.blocks.pop()

    def carried(self, ins: Instr) -> list[int]:
        """The carried slots of loop ``ins`` this function keeps: register and scalar values (a staged buffer is
        its ring, not a value), and in a partition only those its role needs."""
        body = ins.body
        out = []
        for k, (arg, r) in enumerate(zip(body.args[1:], ins.results, strict=True)):
            if isinstance(arg.type, StagesType):
                continue
            if self.live is not None and arg not in self.live and r not in self.live:
                continue
            out.append(k)
        return out

    def open_block(self) -> None:
        self.held.append([])

    def close_block(self) -> None:
        """Free the stages waited on in the block just emitted that no wgmma in flight reads."""
        for entry in self.held.pop():
            where = self.nested_reads.pop((entry[0].name, entry[1]), None)
            if where is not None and self.unretired:    # that nested reader may still be reading it
                raise BackendError(f"{where}: the gluon backend frees a stage of {entry[0].name} when the block that "
                                   "waited on it ends; this wgmma of a nested loop reads it and may still be in "
                                   "flight there (mma_wait its result within that block)")
            self.emit(f"mbarrier.arrive({entry[0].name}_empty.index({entry[1]}))")

    def free_inflight(self) -> None:
        """Every wgmma issued before has retired: free the stages they read."""
        for ring, stage, live in self.inflight:
            pred = f", pred={live} == 1" if live else ""
            self.emit(f"mbarrier.arrive({ring.name}_empty.index({stage}){pred})   # its wgmma has retired")
        self.inflight = []

    def read_by_wgmma(self, ins: Instr) -> list[tuple[Ring, str]]:
        """The waited stages an mma's operands are (taken out of the blocks' held lists), where this mma is the
        last reader of the stage in its block: a stage a later op of the trip reads again (dK += dS^T Q after
        S^T = K Q^T read the same Q stage) stays held, else the wait that retires this mma would free it to the
        producer while the later one still reads it. A stage an enclosing block waited on (a tile waited once per
        head, read in every trip of the loop over key blocks inside) stays held there and is freed when that block
        ends: freed at this mma's wait, it was released once per inner trip (an arrival too many on its empty
        barrier each trip after the first) while the later trips still read it."""
        out = []
        block = self.blocks[-1] if self.blocks else None
        for v in ins.srcs[1:]:
            entry = self.stage_of.get(v)
            if entry is None:
                continue
            if entry in self.held[-1]:
                if block is not None and read_later(block, ins, v):
                    continue
                self.held[-1].remove(entry)
                out.append(entry)
            elif any(entry in held for held in self.held[:-1]):
                self.nested_reads.setdefault((entry[0].name, entry[1]), ins.where)
        return out

    def predict_inflight(self, block: Block) -> list[Ring]:
        """The rings whose stages wgmmas issued in ``block`` still read at its end (what the emitter will track),
        found before emitting it: a loop carries one (stage, live) slot per entry around its back edge."""
        ring_of, inflight = {}, []
        for ins in block.instrs:
            if not self.emitting(ins):
                continue
            if ins.op is Op.WAIT_LOAD and self.ring(ins.srcs[0]).consumers:
                ring_of[ins.result] = self.ring(ins.srcs[0])
            elif ins.op is Op.MMA_ASYNC:
                rings = [ring_of[v] for v in ins.srcs[1:] if v in ring_of and not read_later(block, ins, v)]
                if not any(i.op is Op.MMA_WAIT and i.srcs[0] is ins.result for i in block.instrs):
                    inflight = []
                inflight += rings
            elif ins.op is Op.MMA_WAIT:
                inflight = []
        return inflight

    def carry_inflight(self, head: int, block: Block, body) -> None:
        """Emit a loop body with the stages in flight carried around it: one (stage, live) pair of variables per
        entry, set before the loop (``head``: the loop's first line) and at the end of each trip."""
        pad = self.lines[head][: len(self.lines[head]) - len(self.lines[head].lstrip())]
        slots, inits = [], []
        for ring, stage, live in self.inflight:
            var, flag = self.fresh(f"{ring.name}_busy"), self.fresh(f"{ring.name}_live")
            slots.append((ring, var, flag))
            inits += [f"{pad}{var} = {stage}", f"{pad}{flag} = {live or 1}"]
        unmatched = [r for r, *_ in slots]
        for ring in self.predict_inflight(block):   # entries the loop starts: slots dead before the first trip
            if ring in unmatched:
                unmatched.remove(ring)
                continue
            if ring.type.stages < 2:    # the producer would wait for a stage freed only after its next fill
                raise BackendError(f"{self.kernel.where}: the gluon backend frees a stage whose wgmma stays in "
                                   f"flight into the next trip one trip late; {ring.name} needs >= 2 stages")
            var, flag = self.fresh(f"{ring.name}_busy"), self.fresh(f"{ring.name}_live")
            slots.append((ring, var, flag))
            inits += [f"{pad}{var} = 0", f"{pad}{flag} = 0   # no stage in flight before the first trip"]
        self.lines[head:head] = inits
        self.inflight = list(slots)
        before = self.unretired
        body()
        self.unretired |= before       # after no trip, what was in flight before the loop still is
        left = list(self.inflight)
        for ring, var, flag in slots:       # each slot takes the trip's entry of its ring, or goes dead
            entry = next((x for x in left if x[0] is ring), None)
            if entry is None:
                self.emit(f"{flag} = 0")
                continue
            left.remove(entry)
            if entry[1] != var:
                self.emit(f"{var} = {entry[1]}")
                self.emit(f"{flag} = {entry[2] or 1}")
        if left:
            raise BackendError(f"{self.kernel.where}: the gluon backend could not carry the stages read by wgmmas "
                               f"in flight around this loop ({[r.name for r, *_ in left]})")
        self.inflight = list(slots)

    # ---- memory ------------------------------------------------------------------------------------------------
    def stage(self, v: Value) -> str:
        """A ring's stage index as Gluon takes it: an i32. A stage computed from an index read from memory (a loop
        from ``load_scalar`` bounds of an int64 tensor, ``(k - k0) % STAGES``) is an i64, which ``.index()`` refuses
        (Triton's "expected 'index' to be int32") and which would widen the phase bitmasks; it is cast once (a stage
        is below STAGES)."""
        if v not in self.from_memory:
            return self.name(v)
        s = self.fresh(f"{self.name(v)}_i32")
        self.emit(f"{s} = gl.cast({self.name(v)}, gl.int32)")
        return s

    def descriptor(self, g: Value, shape: tuple[int, ...]) -> str:
        return self.descriptors[(self.global_index[g], box_of(g, shape))]

    def tma_coords(self, coords, shape: tuple[int, ...], expr=None) -> str:
        expr = expr or self.name
        lead = len(coords) - len(shape)
        scale = (1,) * lead + tuple(shape)
        offs = [engine_coord(expr(c), n, "gl") if c in self.from_memory or not fits_int32(self.arg_bounds, c, n)
                else (c in self.consts and saturated_literal(expr(c), n))   # (a constant far past int32)
                or (expr(c) if a < lead else f"{expr(c)} * {n}")
                for a, (c, n) in enumerate(zip(coords, scale, strict=True))]
        return "[" + ", ".join(offs) + "]"

    def address(self, g: Value, coords, shape: tuple[int, ...], key: tuple) -> tuple[str, str]:
        """(pointer, mask) of a tile at tile coordinates ``coords`` of ``g``, in layout ``key``, masked against the
        global's sizes so tiles may hang past a ragged edge. Offsets in 64 bits where the global's may pass int32
        (``index64``), else in 32 as the Triton backend's: a (64, 128) tile's 64-bit offsets took two registers an
        element, and a pointer-loaded softmax spilled 928 bytes a thread at one warpgroup (36 in 32 bits)."""
        gname = self.globals[g]
        lead = g.type.rank - len(shape)
        lname = self.layout(key)
        wide = self.index64 is True or self.global_index[g] in self.index64
        terms = [f"{self.wide(c) if wide or c in self.from_memory else self.name(c)} * {gname}_s{a}"
                 for a, c in enumerate(coords[:lead])]
        offs, masks = [], []
        for k, n in enumerate(shape):
            axis = lead + k
            var = self.fresh("o")
            sl = f"gl.SliceLayout({1 - k}, {lname})" if len(shape) == 2 else lname
            c = coords[axis]     # (an index read from memory in 64 bits: its product must not wrap back inside)
            x = self.wide(c) if c in self.from_memory or not fits_int32(self.arg_bounds, c, n) else self.name(c)
            if c in self.consts and saturated_literal(x, n):
                # a constant whose product with the tile size passes int32 (at=(R, 0), R=2**27): multiplied as
                # int32 literals it failed Gluon's compile ("Scalar 2147483648 is out of range for type int32")
                x = f"gl.cast({x}, gl.int64)"
            self.emit(f"{var} = ({x} * {n} + gl.arange(0, {n}, layout={sl}))" + (".to(gl.int64)" if wide else ""))
            bc = ("[:, None]" if k == 0 else "[None, :]") if len(shape) == 2 else ""
            offs.append(f"{var}{bc} * {gname}_s{axis}")
            masks.append(f"({var}{bc} >= 0) & ({var}{bc} < {gname}_d{axis})")
        for a, c in enumerate(coords[:lead]):
            masks.append(f"({self.name(c)} >= 0) & ({self.name(c)} < {gname}_d{a})")
        base = f"{gname} + " + " + ".join(f"({t})" for t in terms) if terms else gname
        return f"{base} + " + " + ".join(offs), " & ".join(masks)

    def wide(self, c: Value) -> str:
        """An index in 64 bits (a literal stays one; gl.cast also takes a size Triton specialized to 1)."""
        return self.name(c) if c in self.consts else f"gl.cast({self.name(c)}, gl.int64)"

    def scalar_expr(self, v: Value, env: dict[Value, str], made: dict[Value, Instr]) -> str:
        """``v`` as one expression, recomputing the loop body's scalar work with ``env``'s values (another trip)."""
        if v in env:
            return env[v]
        ins = made.get(v)
        if ins is None:
            return self.name(v)
        if ins.op is Op.CONST:
            return literal(ins.attrs.value, "gl")
        a, b = (self.scalar_expr(s, env, made) for s in ins.srcs)
        fn = ins.attrs.fn
        wide = wide_index_op(fn, a, b, v in self.wide_index, "gl")
        if wide is not None:
            return wide
        if fn in FLOOR_SCALAR:
            self.floor_helpers = True
            return FLOOR_SCALAR[fn].format(a, b)
        return SCALAR_TEMPLATES[fn].format(a, b)

