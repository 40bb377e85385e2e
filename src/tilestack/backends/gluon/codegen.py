"""IR -> Gluon source for sm_90a (Hopper). One emitter per op, registered with
``ir.ops.register_emitter("gluon", op)``; the lowering is a walk in program order, once per generated function.

What the source does with the hardware:
- Shared tiles come through the copy engine: a TMA descriptor per (global, box) made on the host, an
  ``mbarrier`` per shared buffer (``expect`` the bytes, ``wait`` on its phase).
- A loop the ``schedule`` pass pipelined keeps ``stages - 1`` loads in flight: a ring of shared buffers, one
  barrier per stage, a prologue that fills the ring and a refill after each trip's matrix work; a trip's barrier
  phase is ``(trip // stages) & 1``.
- Matrix products are ``warpgroup_mma`` (wgmma, ``HGMMA`` in SASS) on an ``NVMMADistributedLayout``
  accumulator; an accumulation chain in a pipelined loop keeps one wgmma in flight (``warpgroup_mma_wait(1)``).
- Explicit-hardware ops map one to one: ``stages`` a ring with ready (and, with warp roles, empty) barriers,
  ``async_load`` an expect + TMA copy, ``wait_load`` a phase wait (phases tracked per stage as a bitmask),
  ``mma_async``/``mma_wait`` an async wgmma and its wait.
- Warp roles become ``gl.warp_specialize`` partitions: one function per role (the role's instructions, and the
  role-less scalar work they need, recomputed), the role with the largest register budget as the default
  partition, the others as workers with their warps and register budgets (``setmaxnreg``). A consumer role
  releases the stages it waited on at the end of each trip (``mbarrier.arrive`` on the empty barrier); the
  producer waits for that release before it refills a stage.
- Element-wise work and reductions run on the distributed layouts ``layouts.plan_layouts`` chose, with
  ``gl.convert_layout`` where an op needs another.

Register loads and the stores the copy engine cannot make go through masked pointers, as the Triton backend's.
"""

from __future__ import annotations

import dataclasses

from tilestack.backends.gluon.layouts import blocked_key, materialize, plan_layouts
from tilestack.backends.gluon.passes import deferrable, pipeline, pipelined_loads, scalar_slice
from tilestack.backends.python_dsl import (
    FLOOR_SCALAR,
    floor_helpers,
    literal,
    register_scalar_emitters,
    scalar_templates,
    wide_index_op,
)
from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import EMITTERS, Op, register_emitter, work_dtype
from tilestack.ir.scalars import f64_float_args, nonnegative, wide_index
from tilestack.ir.types import (
    FLOAT,
    INDEX,
    GlobalType,
    ScalarType,
    Space,
    StagesType,
    TileType,
    bool_,
    f32,
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
_NAN = "propagate_nan=tl.PropagateNan.ALL"
_UNARY = {"exp": "gl.exp({})", "exp2": "gl.exp2({})", "log": "gl.log({})", "log2": "gl.log2({})",
          "abs": "gl.abs({})", "neg": "({} * -1.0)", "relu": f"gl.maximum({{}}, 0.0, {_NAN})", "sqrt": "gl.sqrt({})",
          "rsqrt": "gl.rsqrt({})", "sigmoid": "(1.0 / (1.0 + gl.exp(-{})))", "sin": "gl.sin({})",
          "cos": "gl.cos({})"}
_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} / {})",
           "max": f"gl.maximum({{}}, {{}}, {_NAN})", "min": f"gl.minimum({{}}, {{}}, {_NAN})", "rem": "({} % {})"}
# integer work (ir.ops.work_dtype): // and % on signed integers truncate toward zero, >> is arithmetic
_INT_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} // {})", "rem": "({} % {})",
               "max": "gl.maximum({}, {})", "min": "gl.minimum({}, {})", "bit_and": "({} & {})",
               "bit_or": "({} | {})", "bit_xor": "({} ^ {})", "shl": "({} << {})", "shr": "({} >> {})"}
_INT_UNARY = {"abs": "gl.abs({})", "neg": "(-{})", "relu": "gl.maximum({}, 0)"}
_SCALAR = scalar_templates("gl")
# Python's floor division and remainder for operands that may be negative (backends/python_dsl.py)
_FLOOR_HELPERS = floor_helpers("gluon.jit", "gl", "Gluon")
# row/column max and min reduce with NaN-propagating combines
_NAN_REDUCE_HELPERS = f'''

@gluon.jit
def _max_nan(a, b):
    return gl.maximum(a, b, {_NAN})


@gluon.jit
def _min_nan(a, b):
    return gl.minimum(a, b, {_NAN})
'''
_REDUCE = {"max": "gl.reduce({}, {}, _max_nan)", "min": "gl.reduce({}, {}, _min_nan)", "sum": "gl.sum({}, axis={})"}
_COMBINE = {"max": _BINARY["max"], "min": _BINARY["min"], "sum": "({} + {})"}
_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_LOGIC = {"and": "({} & {})", "or": "({} | {})", "not": "(~{})"}
_SHARED_LAYOUT = "gl.NVMMASharedLayout.get_default_for({}, {})"



def _block(g: Value, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The copy-engine box of a tile of ``shape`` in global ``g``: leading axes of one element."""
    return (1,) * (g.type.rank - len(shape)) + tuple(shape)


def _ring_view(expr: str, block: tuple[int, ...], shape: tuple[int, ...]) -> str:
    return expr if len(block) == len(shape) else f"{expr}.reshape({list(shape)})"


@dataclasses.dataclass
class _Ring:
    """A staged buffer (all versions of one ``stages`` value): its shared ring and barriers."""
    name: str
    type: StagesType
    block: tuple[int, ...]
    consumers: int        # roles that wait on it (arrivals that free a stage); 0 without warp roles


class _Emitter:
    """Emits one Gluon function: the kernel, or one warp role's partition (``keep``: the instructions it runs)."""

    def __init__(self, kernel: KernelIR, warps: int, rings: dict[int, _Ring], keep: set | None = None,
                 live: set | None = None, partition: bool = False):
        self.kernel = kernel
        self.warps = warps
        self.rings = rings
        self.keep, self.live, self.partition = keep, live, partition
        self.descriptors = {(how[1], how[2]): f"{kernel.params[how[1]].name}_desc{k}"
                            for k, how in enumerate(r for r in kernel.reads if r[0] == "desc")}
        self.lines: list[str] = []
        self.names: dict[Value, str] = {}
        self.globals: dict[Value, str] = {}
        self.global_index: dict[Value, int] = {}
        self.consts: set[Value] = set()
        self.nonneg = nonnegative(kernel.body)
        self.wide_index = wide_index(kernel.body)   # index values computed in 64 bits (data past 2**31)
        # float arguments f64 work takes as they are: f64 parameters (value -> parameter name), f32 everywhere else
        self.f64_floats: dict[Value, str] = dict.fromkeys(f64_float_args(kernel), "")
        self.floor_helpers = False
        self.nan_helpers = False                     # whether the source needs _max_nan / _min_nan
        self.indent = 1
        self.plan = plan_layouts(kernel)
        self.hints = buffer_hints(kernel)             # a tile's name, from whichever version the user named
        self.lay: dict[Value, tuple] = {}            # the layout each emitted register value has
        self.layout_names: dict[tuple, str] = {}
        self.layout_decls: list[str] = []
        self.fresh_count = 0
        self.ring_tiles: dict[Instr, str] = {}       # a pipelined load -> its stage's shared buffer expression
        self.deferred: list[Value] = []              # mma results kept in flight in a pipelined loop
        # freeing stages (warp roles): which stage each waited tile is; per open block, the stages waited on
        # and not read by a wgmma in flight; the stages wgmmas in flight read, with the flag that says whether
        # the entry is live (a name holding 0/1, or None: always), carried around loops in variables
        self.stage_of: dict[Value, tuple[_Ring, str]] = {}
        self.held: list[list[tuple[_Ring, str]]] = [[]]
        self.inflight: list[tuple[_Ring, str, str | None]] = []
        self.blocks: list[Block] = []                # the blocks being emitted, innermost last
        self.pipelining: Instr | None = None        # the pipelined loop whose body is being emitted

    # ---- names and layouts ------------------------------------------------------------------------------------
    def name(self, v: Value) -> str:
        if v not in self.names:
            n = len(self.names)
            hint = v.hint or self.hints.get(v.buffer, "")
            self.names[v] = f"{hint}_{n}" if hint else f"v{n}"
        return self.names[v]

    def fresh(self, stem: str) -> str:
        self.fresh_count += 1
        return f"{stem}_{self.fresh_count}"

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
            expr = f"gl.minimum(gl.maximum({expr}, {float(lo)!r}, {_NAN}), {float(hi)!r}, {_NAN})"
        elif src_dtype.is_float and dst_dtype.name == "i64":
            # the H200's cvt.rzi.s64 makes NaN -2**63 (s32's makes 0, as the reference does): NaN as 0 first, and
            # the saturation spelled out (2**63 is the first float past the range)
            lo, hi = int_range(dst_dtype)
            return (f"gl.where({expr} >= {float(-lo)!r}, {hi}, gl.where({expr} < {float(lo)!r}, {lo}, "
                    f"gl.where({expr} != {expr}, 0.0, {expr}).to(gl.int64)))")
        return f"{expr}.to({GL_DTYPES[dst_dtype.name]})"

    def set_lay(self, v: Value, key: tuple) -> None:
        self.lay[v] = key

    def ring(self, v: Value) -> _Ring:
        return self.rings[v.buffer]

    def ring_desc(self, ring: _Ring) -> str:
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
        for ring, stage in self.held.pop():
            self.emit(f"mbarrier.arrive({ring.name}_empty.index({stage}))")

    def free_inflight(self) -> None:
        """Every wgmma issued before has retired: free the stages they read."""
        for ring, stage, live in self.inflight:
            pred = f", pred={live} == 1" if live else ""
            self.emit(f"mbarrier.arrive({ring.name}_empty.index({stage}){pred})   # its wgmma has retired")
        self.inflight = []

    def read_by_wgmma(self, ins: Instr) -> list[tuple[_Ring, str]]:
        """The waited stages an mma's operands are (taken out of the blocks' held lists)."""
        out = []
        for v in ins.srcs[1:]:
            if v in self.stage_of:
                entry = self.stage_of[v]
                for held in self.held:
                    if entry in held:
                        held.remove(entry)
                        out.append(entry)
        return out

    def predict_inflight(self, block: Block) -> list[_Ring]:
        """The rings whose stages wgmmas issued in ``block`` still read at its end (what the emitter will track),
        found before emitting it: a loop carries one (stage, live) slot per entry around its back edge."""
        ring_of, inflight = {}, []
        for ins in block.instrs:
            if not self.emitting(ins):
                continue
            if ins.op is Op.WAIT_LOAD and self.ring(ins.srcs[0]).consumers:
                ring_of[ins.result] = self.ring(ins.srcs[0])
            elif ins.op is Op.MMA_ASYNC:
                rings = [ring_of[v] for v in ins.srcs[1:] if v in ring_of]
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
        body()
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
    def descriptor(self, g: Value, shape: tuple[int, ...]) -> str:
        return self.descriptors[(self.global_index[g], _block(g, shape))]

    def tma_coords(self, coords, shape: tuple[int, ...], expr=None) -> str:
        expr = expr or self.name
        lead = len(coords) - len(shape)
        offs = [expr(c) for c in coords[:lead]]
        offs += [f"{expr(c)} * {n}" for c, n in zip(coords[lead:], shape, strict=True)]
        return "[" + ", ".join(offs) + "]"

    def address(self, g: Value, coords, shape: tuple[int, ...], key: tuple) -> tuple[str, str]:
        """(pointer, mask) of a tile at tile coordinates ``coords`` of ``g``, in layout ``key``; offsets in 64
        bits (any tensor size), masked against the global's sizes so tiles may hang past a ragged edge."""
        gname = self.globals[g]
        lead = g.type.rank - len(shape)
        lname = self.layout(key)
        terms = [f"{self.wide(c)} * {gname}_s{a}" for a, c in enumerate(coords[:lead])]   # 64-bit, as below
        offs, masks = [], []
        for k, n in enumerate(shape):
            axis = lead + k
            var = self.fresh("o")
            sl = f"gl.SliceLayout({1 - k}, {lname})" if len(shape) == 2 else lname
            self.emit(f"{var} = ({self.name(coords[axis])} * {n} + gl.arange(0, {n}, layout={sl})).to(gl.int64)")
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
        return _SCALAR[fn].format(a, b)


# ---- scalars -------------------------------------------------------------------------------------------------------
@register_emitter("gluon", Op.ARG)
def _e_arg(e: _Emitter, ins: Instr) -> None:
    if isinstance(ins.result.type, GlobalType):
        e.globals[ins.result] = ins.attrs.name
        e.global_index[ins.result] = ins.attrs.index
    e.names[ins.result] = ins.attrs.name
    if ins.result in e.f64_floats:     # passed as f64 (see _Emitter.f64_floats): an f32 wherever else it is used
        e.f64_floats[ins.result] = ins.attrs.name
        e.names[ins.result] = f"gl.cast({ins.attrs.name}, gl.float32)"


register_scalar_emitters("gluon", "gl", _SCALAR)


# ---- element-wise work on distributed layouts ---------------------------------------------------------------------
@register_emitter("gluon", Op.FILL)
def _e_fill(e: _Emitter, ins: Instr) -> None:
    t, key = ins.result.type, e.plan[ins.result]
    # an f8e4m3 fill in f32, then converted: a constant past +-448 (or infinite) has no f8 value; the conversion
    # saturates it, as the reference does
    dt = "f32" if t.dtype.name == "f8e4m3" else t.dtype.name
    expr = f"gl.full({list(t.shape)}, {literal(ins.attrs.value, 'gl')}, {GL_DTYPES[dt]}, layout={e.layout(key)})"
    e.assign(ins.result, e.cast(expr, f32, t.dtype) if dt != t.dtype.name else expr)
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.UNARY, fns=_UNARY)
def _e_unary(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    wd = work_dtype(ins)
    if not wd.is_float:
        expr = _INT_UNARY[ins.attrs.fn].format(e.cast(e.name(x), x.type.dtype, wd))
        e.assign(ins.result, e.cast(expr, wd, ins.result.type.dtype))
    else:
        expr = _UNARY[ins.attrs.fn].format(e.f32(e.name(x), x))
        e.assign(ins.result, e.cast(expr, x.type.dtype if x.type.dtype.name == "f64" else f32,
                                    ins.result.type.dtype))
    e.set_lay(ins.result, e.lay[x])


@register_emitter("gluon", Op.BINARY, fns=_BINARY.keys() | _INT_BINARY.keys())
def _e_binary(e: _Emitter, ins: Instr) -> None:
    a, b = ins.srcs
    key = e.lay[a]
    wd = work_dtype(ins)
    if not wd.is_float:    # integer work: operands in the work dtype (a literal fits it: the language checked)
        if isinstance(b.type, TileType):
            bx = e.cast(e.as_layout(b, key), b.type.dtype, wd)
        else:
            bx = e.name(b) if b in e.consts else f"gl.cast({e.name(b)}, {GL_DTYPES[wd.name]})"
        expr = _INT_BINARY[ins.attrs.fn].format(e.cast(e.name(a), a.type.dtype, wd), bx)
        e.assign(ins.result, e.cast(expr, wd, ins.result.type.dtype))
        e.set_lay(ins.result, key)
        return
    bx = e.f32(e.as_layout(b, key), b) if isinstance(b.type, TileType) else e.float_scalar(b, wd, a.type.shape, key)
    expr = _BINARY[ins.attrs.fn].format(e.f32(e.name(a), a), bx)
    e.assign(ins.result, e.cast(expr, f32, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.BROADCAST, fns=_BINARY)
def _e_broadcast(e: _Emitter, ins: Instr) -> None:
    x, v = ins.srcs
    key = e.lay[x]
    dim = 1 if ins.attrs.axis == "row" else 0
    dt = work_dtype(ins)
    vec = e.cast(e.as_layout(v, ("slice", dim, key)), v.type.dtype, dt) + ("[:, None]" if dim == 1 else "[None, :]")
    expr = (_BINARY if dt.is_float else _INT_BINARY)[ins.attrs.fn].format(e.cast(e.name(x), x.type.dtype, dt), vec)
    e.assign(ins.result, e.cast(expr, dt, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.CAST)
def _e_cast(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    src, dst = x.type, ins.result.type
    if src.space is Space.REG and dst.space is Space.REG:
        e.assign(ins.result, e.cast(e.name(x), src.dtype, dst.dtype))
        e.set_lay(ins.result, e.lay[x])
    elif src.space is Space.REG:      # registers -> a shared tile (an mma operand): store, then fence for wgmma
        dt = GL_DTYPES[dst.dtype.name]
        layout = _SHARED_LAYOUT.format(list(dst.shape), dt)
        e.assign(ins.result, f"gl.allocate_shared_memory({dt}, {list(dst.shape)}, {layout}, "
                             f"{e.cast(e.name(x), src.dtype, dst.dtype)})")
        e.emit("hopper.fence_async_shared()")
    elif dst.space is Space.REG:      # a shared tile -> registers
        key = e.plan[ins.result]
        e.assign(ins.result, e.cast(f"{e.name(x)}.load({e.layout(key)})", src.dtype, dst.dtype))
        e.set_lay(ins.result, key)
    else:
        raise BackendError(f"{ins.where}: the gluon backend copies shared tiles through registers; cast a "
                           f"{src} to a RegTile first")


@register_emitter("gluon", Op.TRANSPOSE)
def _e_transpose(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    key = e.plan[ins.result]
    if x.type.space is Space.REG:      # permuted registers, then moved into the result's planned layout
        expr = f"gl.convert_layout(gl.permute({e.name(x)}, [1, 0]), {e.layout(key)})"
    else:                               # a shared tile read through a transposed view
        expr = f"{e.name(x)}.permute([1, 0]).load({e.layout(key)})"
    e.assign(ins.result, e.cast(expr, x.type.dtype, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.REDUCE, fns=_REDUCE)
def _e_reduce(e: _Emitter, ins: Instr) -> None:
    fn, x = ins.attrs.fn, ins.srcs[0]
    dim = 1 if ins.attrs.axis == "row" else 0
    key = ("slice", dim, e.lay[x])
    dt = work_dtype(ins)
    expr = _REDUCE[fn].format(e.cast(e.name(x), x.type.dtype, dt), dim)
    e.nan_helpers |= fn != "sum"
    if len(ins.srcs) > 1:
        acc = ins.srcs[1]
        expr = _COMBINE[fn].format(e.cast(e.as_layout(acc, key), acc.type.dtype, dt), expr)
    e.assign(ins.result, e.cast(expr, dt, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.MASK)
def _e_mask(e: _Emitter, ins: Instr) -> None:
    x, k = ins.srcs
    r, c = ins.result.type.shape
    lname = e.layout(e.lay[x])
    rows = f"gl.arange(0, {r}, layout=gl.SliceLayout(1, {lname}))[:, None]"
    cols = f"gl.arange(0, {c}, layout=gl.SliceLayout(0, {lname}))[None, :]"
    kn = e.name(k)
    if k in e.wide_index:   # a 64-bit bound, clamped past the tile's edges into 32 bits: the compares stay 32-bit
        edge = max(r, c)
        kn = f"gl.minimum(gl.maximum({kn}, {-edge}), {edge}).to(gl.int32)"
    cond = {"tril": f"({cols} - {rows}) <= {kn}", "triu": f"({cols} - {rows}) >= {kn}",
            "right_fill": f"{cols} < {kn}", "lower_fill": f"{rows} < {kn}"}[ins.attrs.kind]
    # a bool_ mask's fill is a Python bool (an int 0 would promote the mask to i32, which ~ does not negate)
    fill = repr(bool(ins.attrs.value)) if x.type.dtype is bool_ else literal(ins.attrs.value)
    if x.type.dtype.name == "f8e4m3":   # in f32 (see _e_fill)
        expr = f"gl.where({cond}, {e.cast(e.name(x), x.type.dtype, f32)}, {fill})"
        e.assign(ins.result, e.cast(expr, f32, ins.result.type.dtype))
    else:
        expr = f"gl.where({cond}, {e.name(x)}, {fill})"
        e.assign(ins.result, e.cast(expr, x.type.dtype, ins.result.type.dtype))
    e.set_lay(ins.result, e.lay[x])


def _broadcasting(e: _Emitter, ins: Instr, as_float: bool, to=None) -> tuple[list[str], tuple]:
    """The operands of a compare, logic or select in the result's layout, vectors expanded along their axes; with
    ``to`` (a select's work dtype), number tiles of another dtype, index scalars and (into an integer) float scalars
    converted to ``to`` (gl.where of an i32 and an f32 would compute in f32, and its result must be the select's
    dtype)."""
    key = next((e.lay[s] for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True)
                if ax is None and isinstance(s.type, TileType)), e.plan[ins.result])
    out = []
    work = work_dtype(ins)
    for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True):
        if not isinstance(s.type, TileType):
            x = e.float_scalar(s, work, ins.result.type.shape, key) if s.type == FLOAT else e.name(s)
            if to is not None and s.type == FLOAT and not to.is_float:   # truncated and saturated as a tile would be
                x = e.cast(x, f32, to)
            elif to is not None and s.type == INDEX and (to.is_float or s not in e.consts):
                # an index (an int argument, a size) wrapped into an integer result, as the reference does; into a
                # float one, the float work's (gl.where of two indices would be an int)
                x = f"gl.cast({x}, {GL_DTYPES[to.name]})"
            out.append(x)
            continue
        if ax is None:
            x = e.as_layout(s, key)
        else:
            dim = 1 if ax == "row" else 0
            x = e.as_layout(s, ("slice", dim, key)) + ("[:, None]" if dim == 1 else "[None, :]")
        if to is not None and s.type.dtype is not to and s.type.dtype.name != "bool":
            x = e.cast(x, s.type.dtype, to)
        out.append(e.f32(x, s) if as_float and s.type.dtype.is_float else x)
    return out, key


def _to_result_shape(e: _Emitter, ins: Instr, expr: str, key: tuple) -> str:
    """``expr`` broadcast to the result's shape where no operand has it (one vector axis and scalars: a (1, C) or
    (R, 1) value, or a vector result from scalars), against a tile of that shape in layout ``key``."""
    if any(isinstance(s.type, TileType) and ax is None for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True)) or \
            len({ax for ax in ins.attrs.axes if ax is not None}) == 2:
        return expr
    shape = list(ins.result.type.shape)
    return f"gl.broadcast({expr}, gl.full({shape}, 0, gl.int1, layout={e.layout(key)}))[0]"


@register_emitter("gluon", Op.COMPARE, fns=_COMPARE)
def _e_compare(e: _Emitter, ins: Instr) -> None:
    (a, b), key = _broadcasting(e, ins, True)
    e.assign(ins.result, _to_result_shape(e, ins, f"({a} {_COMPARE[ins.attrs.fn]} {b})", key))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.LOGIC, fns=_LOGIC)
def _e_logic(e: _Emitter, ins: Instr) -> None:
    xs, key = _broadcasting(e, ins, False)
    e.assign(ins.result, _to_result_shape(e, ins, _LOGIC[ins.attrs.fn].format(*xs), key))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.SELECT)
def _e_select(e: _Emitter, ins: Instr) -> None:
    t = ins.result.type
    work = work_dtype(ins)       # dst's integer dtype, or f32 / f64 (f64 when dst or an operand is)
    (m, a, b), key = _broadcasting(e, ins, False, work)
    expr = _to_result_shape(e, ins, f"gl.where({m}, {a}, {b})", key)
    e.assign(ins.result, e.cast(expr, work, t.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.ARANGE)
def _e_arange(e: _Emitter, ins: Instr) -> None:
    t, key = ins.result.type, e.plan[ins.result]
    expr = f"({e.name(ins.srcs[0])} + gl.arange(0, {t.shape[0]}, layout={e.layout(key)}))"
    if t.dtype.name == "f8e4m3":
        expr = f"{expr}.to(gl.float32)"                   # Triton converts ints to fp8 only through a float
    e.assign(ins.result, f"{expr}.to({GL_DTYPES[t.dtype.name]})")
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.RAND)
def _e_rand(e: _Emitter, ins: Instr) -> None:
    """Philox uniforms as the Triton backend's (tl.rand of the same 64-bit counters, in the tile's layout: Philox
    is element-wise, so Triton's own function runs on Gluon tensors). One number per counter only."""
    t, key = ins.result.type, e.plan[ins.result]
    n = ins.attrs.per_counter
    seed = e.name(ins.srcs[0])
    offset, row, col, stride = (f"gl.to_tensor({e.name(s)}).to(gl.int64)" for s in ins.srcs[1:])
    lname = e.layout(key)
    width = t.shape[-1] // n                      # counters per row: each gives n numbers
    first = col if n == 1 else f"({col} // {n})"
    if len(t.shape) == 2:
        rows = f"gl.arange(0, {t.shape[0]}, layout=gl.SliceLayout(1, {lname}))[:, None].to(gl.int64)"
        cols = f"gl.arange(0, {width}, layout=gl.SliceLayout(0, {lname}))[None, :].to(gl.int64)"
        counters = f"{offset} + ({row} + {rows}) * {stride} + {first} + {cols}"
    else:
        cols = f"gl.arange(0, {width}, layout={lname}).to(gl.int64)"
        counters = f"{offset} + {row} * {stride} + {first} + {cols}"
    if n == 1:
        e.assign(ins.result, f"tl.rand({seed}, {counters})")
        e.set_lay(ins.result, key)
        return
    base = e.name(ins.result)
    words = [f"{base}_w{w}" for w in range(4)]
    if n == 4:
        e.emit(f"{', '.join(words)} = tl.rand4x({seed}, {counters})")
        u = words
    else:   # the four low 16-bit halves, then the four high ones, each over 65536 (as the Triton backend's)
        e.emit(f"{', '.join(words)} = tl.randint4x({seed}, {counters})")
        u = [f"{base}_h{k}" for k in range(8)]
        for k in range(8):
            half = f"({words[k % 4]} & 0xFFFF)" if k < 4 else f"({words[k % 4]} >> 16)"
            e.emit(f"{u[k]} = {half}.to(gl.float32) * {float(2.0**-16)!r}")
    e.assign(ins.result, f"gl.convert_layout({_interleaved(u, t.shape[:-1], width)}, {lname})")
    e.set_lay(ins.result, key)


def _interleaved(tiles: list[str], lead: tuple[int, ...], width: int) -> str:
    """Tiles t_0..t_{n-1} of shape lead + (width,) interleaved along the last axis, as tl.interleave does it (join,
    then reshape): column n*k + m is t_m's column k (n a power of two)."""
    if len(tiles) == 1:
        return tiles[0]
    a = _interleaved(tiles[0::2], lead, width)
    b = _interleaved(tiles[1::2], lead, width)
    return f"gl.reshape(gl.join({a}, {b}), {[*lead, width * len(tiles)]})"


# ---- matrix products ----------------------------------------------------------------------------------------------
def _mma_operands(e: _Emitter, ins: Instr) -> tuple[str, str, str, tuple]:
    acc, a, b = ins.srcs
    key = e.plan[ins.result]
    if a.type.space is Space.SHARED:
        an = f"{e.name(a)}.permute((1, 0))" if ins.attrs.trans_a else e.name(a)
    elif ins.attrs.trans_a:   # a register tile used transposed: permuted, then in wgmma's operand layout
        operand = e.layout(("dot_a", key, 4 // a.type.dtype.itemsize))
        an = f"gl.convert_layout(gl.permute({e.name(a)}, (1, 0)), {operand})"
    else:   # wgmma's a from registers: the dot-operand layout of the accumulator's
        an = e.as_layout(a, ("dot_a", key, 4 // a.type.dtype.itemsize))
    bn = f"{e.name(b)}.permute((1, 0))" if ins.attrs.trans_b else e.name(b)
    return an, bn, e.as_layout(acc, key), key


def _deferrable(e: _Emitter, ins: Instr) -> bool:
    """An accumulation chain in a pipelined loop keeps one wgmma in flight: waited with
    ``warpgroup_mma_wait(1)`` in the loop, ``(0)`` after it (``passes.deferrable``)."""
    return e.pipelining is not None and deferrable(e.pipelining, ins)


@register_emitter("gluon", Op.MMA)
def _e_mma(e: _Emitter, ins: Instr) -> None:
    an, bn, acc, key = _mma_operands(e, ins)
    if _deferrable(e, ins):
        e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc}, is_async=True)")
        e.assign(ins.result, f"hopper.warpgroup_mma_wait(1, deps=[{e.name(ins.result)}])")
        e.deferred.append(ins.result)
    else:
        e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc})")
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.MMA_ASYNC)
def _e_mma_async(e: _Emitter, ins: Instr) -> None:
    """An async wgmma. Waited in the same block: the wait is its ``mma_wait``. Carried on (waited after the
    loop, or the acc of the next one): at most one kept in flight, ``warpgroup_mma_wait(1)`` right after it."""
    an, bn, acc, key = _mma_operands(e, ins)
    stages = [(ring, stage, None) for ring, stage in e.read_by_wgmma(ins)]
    e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc}, is_async=True)")
    if not any(i.op is Op.MMA_WAIT and i.srcs[0] is ins.result for i in e.blocks[-1].instrs):
        e.emit(f"{e.name(ins.result)} = hopper.warpgroup_mma_wait(1, deps=[{e.name(ins.result)}])")
        e.free_inflight()          # all but this one have retired
    e.inflight += stages
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.MMA_WAIT)
def _e_mma_wait(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    e.assign(ins.result, f"hopper.warpgroup_mma_wait(0, deps=[{e.name(x)}])")
    e.set_lay(ins.result, e.lay[x])
    e.free_inflight()              # wait(0): every wgmma issued before has retired


# ---- global memory --------------------------------------------------------------------------------------------------
def _tma_copy(e: _Emitter, desc: str, coords: str, barrier: str, dst: str, pred: str = "") -> str:
    p = f", pred={pred}" if pred else ""
    return f"tma.async_copy_global_to_shared({desc}, {coords}, {barrier}, {dst}{p})"


@register_emitter("gluon", Op.LOAD)
def _e_load(e: _Emitter, ins: Instr) -> None:
    g, *coords = ins.srcs
    t = ins.result.type
    if ins in e.ring_tiles:                    # a pipelined load: its stage has landed (the loop waited)
        e.assign(ins.result, e.ring_tiles[ins])
        return
    if ins.attrs.via == "tma":                 # one copy into a fresh buffer, waited on its own barrier
        desc, block = e.descriptor(g, t.shape), _block(g, t.shape)
        buf, bar = e.fresh(f"{ins.result.hint or 'tile'}_smem"), e.fresh("bar")
        e.emit(f"{buf} = gl.allocate_shared_memory({GL_DTYPES[t.dtype.name]}, {list(block)}, {desc}.layout)")
        e.emit(f"{bar} = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())")
        e.emit(f"mbarrier.init({bar}, count=1)")
        e.emit("hopper.fence_async_shared()")
        e.emit(f"mbarrier.expect({bar}, {desc}.block_type.nbytes)")
        e.emit(_tma_copy(e, desc, e.tma_coords(coords, t.shape), bar, buf))
        e.emit(f"mbarrier.wait({bar}, 0)")
        e.emit(f"mbarrier.invalidate({bar})")
        e.assign(ins.result, _ring_view(buf, block, t.shape))
        return
    coalesced = blocked_key(t)
    ptr, mask = e.address(g, coords, t.shape, coalesced)
    x = e.cast(f"gl.load({ptr}, mask={mask}, other=0.0)", g.type.dtype, t.dtype)
    if t.space is Space.SHARED:      # no copy engine for these tensors: through registers into a shared tile
        dt = GL_DTYPES[t.dtype.name]
        e.assign(ins.result, f"gl.allocate_shared_memory({dt}, {list(t.shape)}, "
                             f"{_SHARED_LAYOUT.format(list(t.shape), dt)}, {x})")
        e.emit("hopper.fence_async_shared()")
        return
    key = e.plan.get(ins.result) or coalesced
    e.assign(ins.result, x if key == coalesced else f"gl.convert_layout({x}, {e.layout(key)})")
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.STORE)
def _e_store(e: _Emitter, ins: Instr) -> None:
    g, x, *coords = ins.srcs
    t = x.type
    key = blocked_key(t)
    # a shared tile is read into registers first (in the layout its pointer store uses)
    reg = f"{e.name(x)}.load({e.layout(key)})" if t.space is Space.SHARED else None
    val = e.cast(reg or e.name(x), t.dtype, g.type.dtype)
    if ins.attrs.via == "tma":                 # registers -> shared -> the copy engine; waited before reuse
        desc, block = e.descriptor(g, t.shape), _block(g, t.shape)
        buf = e.fresh(f"{x.hint or 'tile'}_smem")
        e.emit(f"{buf} = gl.allocate_shared_memory({GL_DTYPES[g.type.dtype.name]}, {list(block)}, {desc}.layout)")
        e.emit(f"{_ring_view(buf, block, t.shape)}.store({val})")
        e.emit("hopper.fence_async_shared()")
        e.emit(f"tma.async_copy_shared_to_global({desc}, {e.tma_coords(coords, t.shape)}, {buf})")
        e.emit("tma.store_wait(0)")
        return
    ptr, mask = e.address(g, coords, t.shape, key)
    e.emit(f"gl.store({ptr}, {e.cast(reg or e.as_layout(x, key), t.dtype, g.type.dtype)}, mask={mask})")


@register_emitter("gluon", Op.ATOMIC_ADD)
def _e_atomic_add(e: _Emitter, ins: Instr) -> None:
    g, x, *coords = ins.srcs
    t = x.type
    key = blocked_key(t)
    ptr, mask = e.address(g, coords, t.shape, key)
    e.emit(f'gl.atomic_add({ptr}, {e.cast(e.as_layout(x, key), t.dtype, g.type.dtype)}, mask={mask}, '
           'sem="relaxed")')


# ---- explicit hardware: staged buffers, async loads and their waits -------------------------------------------------
def allocate_ring(e: _Emitter, ring: _Ring, desc: str) -> None:
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


def phase_bits(e: _Emitter, ring: _Ring) -> None:
    """The phase of each stage's barriers, one bit per stage (flipped at each completed wait)."""
    e.emit(f"{ring.name}_rph = 0   # ready phases, bit s for stage s")
    if ring.consumers:
        e.emit(f"{ring.name}_eph = 0   # empty phases")


@register_emitter("gluon", Op.STAGES)
def _e_stages(e: _Emitter, ins: Instr) -> None:
    ring = e.ring(ins.result)
    e.names[ins.result] = ring.name
    if not e.partition:     # with warp roles the kernel allocates rings before forking, partitions get them
        allocate_ring(e, ring, e.ring_desc(ring))
        phase_bits(e, ring)


@register_emitter("gluon", Op.ASYNC_LOAD)
def _e_async_load(e: _Emitter, ins: Instr) -> None:
    buf, stage, g, *coords = ins.srcs
    ring = e.ring(buf)
    e.names[ins.result] = ring.name
    s = e.name(stage)
    desc = e.descriptor(g, ring.type.shape)
    if ring.consumers:      # wait until every consumer role has freed the stage (passes at once the first time)
        e.emit(f"mbarrier.wait({ring.name}_empty.index({s}), (({ring.name}_eph >> {s}) & 1) ^ 1)")
        e.emit(f"{ring.name}_eph = {ring.name}_eph ^ (1 << {s})")
    e.emit(f"mbarrier.expect({ring.name}_ready.index({s}), {desc}.block_type.nbytes)")
    e.emit(_tma_copy(e, desc, e.tma_coords(coords, ring.type.shape), f"{ring.name}_ready.index({s})",
                     f"{ring.name}.index({s})"))


@register_emitter("gluon", Op.WAIT_LOAD)
def _e_wait_load(e: _Emitter, ins: Instr) -> None:
    buf, stage = ins.srcs
    ring = e.ring(buf)
    s = e.name(stage)
    e.emit(f"mbarrier.wait({ring.name}_ready.index({s}), ({ring.name}_rph >> {s}) & 1)")
    e.emit(f"{ring.name}_rph = {ring.name}_rph ^ (1 << {s})")
    e.assign(ins.result, _ring_view(f"{ring.name}.index({s})", ring.block, ring.type.shape))
    if ring.consumers:
        e.stage_of[ins.result] = (ring, s)
        e.held[-1].append((ring, s))


# ---- loops -----------------------------------------------------------------------------------------------------------
@register_emitter("gluon", Op.RANGE)
def _e_range(e: _Emitter, ins: Instr) -> None:
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


def _loop_body(e: _Emitter, ins: Instr, slots: list[int], head: int) -> None:
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


def _pipelined_loop(e: _Emitter, ins: Instr, loads: list[Instr]) -> None:
    """A ring of ``stages`` buffers per load and one barrier per stage; ``stages - 1`` trips' loads in flight
    (a prologue fills the ring, each trip refills the stage the previous trip's matrix work has released)."""
    lo, hi, step = (e.name(s) for s in ins.srcs[:3])
    body, stages = ins.body, ins.attrs.stages
    idx = body.args[0]
    trips = e.fresh("trips")
    count = hi if (lo, step) == ("0", "1") else f"{hi} - {lo}" if step == "1" else f"gl.cdiv({hi} - {lo}, {step})"
    e.emit(f"{trips} = {count}")
    ready = e.fresh("ready")
    rings = []
    for x in loads:
        g, t = x.srcs[0], x.result.type
        desc, block = e.descriptor(g, t.shape), _block(g, t.shape)
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
        e.ring_tiles[x] = _ring_view(f"{name}.index({s})", block, x.result.type.shape)
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


# ---- functions and the module ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lowered:
    source: str
    fn_name: str
    num_warps: int                     # the kernel's warps (with roles: the default partition's)
    # what to pass, in order: ("ptr", i), ("dim", i, axis), ("stride", i, axis), ("scalar", i), ("desc", i, box)
    binding: tuple[tuple, ...]
    signature: dict[str, str]          # parameter -> Triton signature type, for AOT compiles
    roles: tuple[tuple[str, int, int], ...] = ()   # (role, warps, registers) in partition order (default first)
    persistent: bool = False           # programs loop over tiles: launch min(grid, SMs) programs


def buffer_hints(kernel: KernelIR) -> dict[int, str]:
    out: dict[int, str] = {}
    for ins in kernel.walk():
        for r in ins.results:
            if r.buffer is not None and r.hint:
                out.setdefault(r.buffer, r.hint)
    return out


def _rings(kernel: KernelIR) -> dict[int, _Ring]:
    rings: dict[int, _Ring] = {}
    hints = buffer_hints(kernel)
    taken: set[str] = set()
    waiters: dict[int, set[str]] = {}
    ranks: dict[int, int] = {}
    for ins in kernel.walk():
        if ins.op is Op.WAIT_LOAD:
            waiters.setdefault(ins.srcs[0].buffer, set()).add(ins.role)
        elif ins.op is Op.ASYNC_LOAD:
            ranks[ins.result.buffer] = ins.srcs[2].type.rank
    for ins in kernel.walk():
        if ins.op is Op.STAGES:
            t = ins.result.type
            uid = ins.result.buffer
            block = (1,) * (ranks.get(uid, len(t.shape)) - len(t.shape)) + tuple(t.shape)
            consumers = len(waiters.get(uid, ())) if kernel.roles else 0
            name = hints.get(uid, "ring")
            name = name if name not in taken else f"{name}{len(rings)}"
            taken.add(name)
            rings[uid] = _Ring(name, t, block, consumers)
    return rings


def _params(low: KernelIR, e: _Emitter) -> list[str]:
    out = []
    for how in low.reads:
        name = low.params[how[1]].name
        out.append({"ptr": name, "scalar": name, "dim": f"{name}_d{how[-1]}", "stride": f"{name}_s{how[-1]}",
                    "desc": e.descriptors.get((how[1], how[-1]))}[how[0]])
    return out


def signature(low: KernelIR, names: list[str]) -> dict[str, str]:
    """Triton signature types of the kernel's parameters (descriptors with the NVMMA shared layout the device
    code allocates their buffers in, as Gluon's host TensorDescriptor gives them)."""
    from triton.experimental.gluon import language as gl

    sig = {}
    for name, how in zip(names, low.reads, strict=True):
        p = low.params[how[1]]
        if how[0] == "ptr":
            sig[name] = "*" + SIG_DTYPES[p.type.dtype.name]
        elif how[0] in ("dim", "stride"):
            sig[name] = "i32"
        elif how[0] == "scalar":
            sig[name] = ("fp64" if name in _f64_params(low) else "fp32") if p.type == ScalarType("float") else "i32"
        else:
            dt = getattr(gl, GL_DTYPES[p.type.dtype.name].removeprefix("gl."))
            layout = gl.NVMMASharedLayout.get_default_for(list(how[2]), dt)
            sig[name] = f"tensordesc<{SIG_DTYPES[p.type.dtype.name]}{list(how[2])},{layout!r}>"
    return sig


def role_slice(kernel: KernelIR, role: str) -> tuple[set[Instr], set[Value]]:
    """(instructions, values) a role's partition runs and needs: its own instructions, the role-less ones they
    read (recomputed in the partition), and the loops around them with the carried values it uses. Staged
    buffers are not values here: every partition gets the rings."""
    keep: set[Instr] = set()
    live: set[Value] = set()
    changed = True
    while changed:
        changed = False
        for ins in kernel.walk():
            if ins in keep or ins.op is Op.STAGES:
                continue
            if ins.role == role or any(r in live for r in ins.results) or (
                    ins.op is Op.RANGE and (any(a in live for a in ins.body.args[1:])
                                            or any(i in keep for i in ins.body.walk()))):
                if ins.role in ("", role):
                    keep.add(ins)
                    changed = True
        for ins in keep:
            if ins.op is Op.RANGE:
                need = set(ins.srcs[:3])
                for k, (a, r) in enumerate(zip(ins.body.args[1:], ins.results, strict=True)):
                    if a in live or r in live:
                        need.update((ins.srcs[3 + k], ins.body.yields[k]))
            else:
                need = set(ins.srcs)
            need = {v for v in need if not isinstance(v.type, StagesType)}
            if not need <= live:
                live |= need
                changed = True
    return keep, live


def _f64_params(low: KernelIR) -> set[str]:
    """The names of the float parameters passed as f64 (``_Emitter.f64_floats``; Gluon passes a float as an f32)."""
    wide = f64_float_args(low)
    return {ins.attrs.name for ins in low.body.instrs if ins.op is Op.ARG and ins.result in wide}


def _function(name: str, params: list[str], e: _Emitter, extra: list[str] = ()) -> list[str]:
    f64 = _f64_params(e.kernel)
    typed = [f"{p}: gl.float64" if p in f64 else p for p in params]
    head = ["@gluon.jit", f"def {name}({', '.join(typed + list(extra))}):"]
    decls = ["    " + d for d in e.layout_decls]
    return head + decls + (e.lines or ["    pass"])   # a kernel with no effect is an empty function


def emit(low: KernelIR, warps: int) -> Lowered:
    """Gluon source for IR the Gluon pipeline has lowered (``lower``): one function, or with warp roles one per
    role and a kernel that forks them."""
    rings = _rings(low)
    fn = f"{low.name}_kernel"
    consts = ", ".join(f"{k}={v!r}" for k, v in low.constants.items())
    funcs: list[list[str]] = []
    floor = nan = False
    roles: tuple = ()
    if not low.roles:
        e = _Emitter(low, warps, rings)
        e.block(low.body)
        params = _params(low, e)
        funcs.append(_function(fn, params, e))
        floor, nan = e.floor_helpers, e.nan_helpers
        num_warps = warps
    else:
        order = sorted(low.roles.items(), key=lambda kv: -kv[1].registers)   # stable: the first largest leads
        probe = _Emitter(low, warps, rings)
        params = _params(low, probe)
        ring_args = []
        for ring in rings.values():
            ring_args += [ring.name, f"{ring.name}_ready"] + ([f"{ring.name}_empty"] if ring.consumers else [])
        for role, decl in order:
            keep, live = role_slice(low, role)
            e = _Emitter(low, decl.warps, rings, keep, live, partition=True)
            for ring in rings.values():
                phase_bits(e, ring)
            e.block(low.body)
            e.close_block()
            e.free_inflight()
            funcs.append(_function(f"{low.name}_{role}", params, e, ring_args))
            floor, nan = floor or e.floor_helpers, nan or e.nan_helpers
        k = _Emitter(low, order[0][1].warps, rings)
        for ins in low.body.instrs:        # what the kernel itself runs: arguments (names) and the rings
            if ins.op is Op.ARG:
                _e_arg(k, ins)
        for ring in rings.values():
            allocate_ring(k, ring, k.ring_desc(ring))
        args = ", ".join(params + ring_args)
        parts = ", ".join(f"({low.name}_{role}, ({args},))" for role, _ in order)
        k.emit(f"gl.warp_specialize([{parts}],")
        k.emit(f"                   {[d.warps for _, d in order[1:]]}, {[d.registers for _, d in order[1:]]})")
        funcs.append(_function(fn, params, k))
        num_warps = order[0][1].warps
        roles = tuple((r, d.warps, d.registers) for r, d in order)
    head = [
        f'"""Generated by tilestack from kernel `{low.name}` ({low.where}) for sm_90a; constants: {consts}."""',
        "from triton.experimental import gluon",
        "from triton.experimental.gluon import language as gl",
        "from triton.experimental.gluon.language.nvidia import hopper",
        "from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma",
        "import triton.language as tl",
        *([_FLOOR_HELPERS] if floor else []),
        *([_NAN_REDUCE_HELPERS] if nan else []),
    ]
    text = "\n".join(head)
    for f in funcs:
        text += "\n\n\n" + "\n".join(f)
    return Lowered(text + "\n", fn, num_warps, low.reads, signature(low, params), roles)


def lower(kernel: KernelIR, warps: int, stages: int, specialize: bool = False, persist: bool = False,
          tma: bool = True, print_after=()) -> tuple[KernelIR, list]:
    """The Gluon pipeline's result for ``kernel`` and every stage [(pass name, IR), ...]."""
    return pipeline(warps, stages, specialize, persist, tma).run(kernel, print_after=print_after)


def generate(kernel: KernelIR, warps: int, stages: int, specialize: bool = False, persist: bool = False,
             tma: bool = True) -> Lowered:
    low, stages_ = lower(kernel, warps, stages, specialize, persist, tma)
    applied = persist and dict(stages_)["persistent"] is not kernel
    return dataclasses.replace(emit(low, warps), persistent=applied)
