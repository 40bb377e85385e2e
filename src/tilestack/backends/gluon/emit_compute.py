"""Gluon emitters of element-wise work, reductions, masks, random bits and matrix products (wgmma), one per op,
registered with ``ir.ops.register_emitter("gluon", op)`` (module docstring of ``codegen``)."""

from __future__ import annotations

from tilestack.backends.gluon.emitter import (
    GL_DTYPES,
    NAN_FLAG,
    SCALAR_TEMPLATES,
    SHARED_LAYOUT,
    Emitter,
)
from tilestack.backends.gluon.passes import deferrable
from tilestack.backends.python_dsl import literal, register_scalar_emitters
from tilestack.ir.nodes import Instr
from tilestack.ir.ops import Op, register_emitter, work_dtype
from tilestack.ir.types import (
    FLOAT,
    INDEX,
    GlobalType,
    Space,
    TileType,
    bool_,
    f32,
)

_UNARY = {"exp": "gl.exp({})", "exp2": "gl.exp2({})", "log": "gl.log({})", "log2": "gl.log2({})",
          "abs": "gl.abs({})", "neg": "({} * -1.0)", "relu": f"gl.maximum({{}}, 0.0, {NAN_FLAG})",
          "sqrt": "gl.sqrt({})", "rsqrt": "gl.rsqrt({})", "sigmoid": None, "sin": "gl.sin({})",
          "cos": "gl.cos({})"}
_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} / {})",
           "max": f"gl.maximum({{}}, {{}}, {NAN_FLAG})", "min": f"gl.minimum({{}}, {{}}, {NAN_FLAG})",
           "rem": "({} % {})"}
# integer work (ir.ops.work_dtype): // and % on signed integers truncate toward zero, >> is arithmetic
_INT_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} // {})", "rem": "({} % {})",
               "max": "gl.maximum({}, {})", "min": "gl.minimum({}, {})", "bit_and": "({} & {})",
               "bit_or": "({} | {})", "bit_xor": "({} ^ {})", "shl": "({} << {})", "shr": "({} >> {})"}
_INT_UNARY = {"abs": "gl.abs({})", "neg": "(-{})", "relu": "gl.maximum({}, 0)"}
_REDUCE = {"max": "gl.reduce({}, {}, _max_nan)", "min": "gl.reduce({}, {}, _min_nan)", "sum": "gl.sum({}, axis={})"}
_COMBINE = {"max": _BINARY["max"], "min": _BINARY["min"], "sum": "({} + {})"}
_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_LOGIC = {"and": "({} & {})", "or": "({} | {})", "not": "(~{})"}

# ---- scalars -------------------------------------------------------------------------------------------------------
@register_emitter("gluon", Op.ARG)
def e_arg(e: Emitter, ins: Instr) -> None:
    name = e.pnames[ins.attrs.index]
    if isinstance(ins.result.type, GlobalType):
        e.globals[ins.result] = name
        e.global_index[ins.result] = ins.attrs.index
    e.names[ins.result] = name
    if ins.result in e.f64_floats:     # passed as f64 (see Emitter.f64_floats): an f32 wherever else it is used
        e.f64_floats[ins.result] = name
        e.names[ins.result] = f"gl.cast({name}, gl.float32)"


register_scalar_emitters("gluon", "gl", SCALAR_TEMPLATES)


# ---- element-wise work on distributed layouts ---------------------------------------------------------------------
@register_emitter("gluon", Op.FILL)
def _e_fill(e: Emitter, ins: Instr) -> None:
    t, key = ins.result.type, e.plan[ins.result]
    # an f8e4m3 fill in f32, then converted: a constant past +-448 (or infinite) has no f8 value; the conversion
    # saturates it, as the reference does
    dt = "f32" if t.dtype.name == "f8e4m3" else t.dtype.name
    expr = f"gl.full({list(t.shape)}, {literal(ins.attrs.value, 'gl')}, {GL_DTYPES[dt]}, layout={e.layout(key)})"
    e.assign(ins.result, e.cast(expr, f32, t.dtype) if dt != t.dtype.name else expr)
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.UNARY, fns=_UNARY)
def _e_unary(e: Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    wd = work_dtype(ins)
    if not wd.is_float:
        expr = _INT_UNARY[ins.attrs.fn].format(e.cast(e.name(x), x.type.dtype, wd))
        e.assign(ins.result, e.cast(expr, wd, ins.result.type.dtype))
    else:
        x32 = e.f32(e.name(x), x)
        expr = _sigmoid(e, ins, x32) if ins.attrs.fn == "sigmoid" else _UNARY[ins.attrs.fn].format(x32)
        e.assign(ins.result, e.cast(expr, x.type.dtype if x.type.dtype.name == "f64" else f32,
                                    ins.result.type.dtype))
    e.set_lay(ins.result, e.lay[x])


def _sigmoid(e: Emitter, ins: Instr, x: str) -> str:
    """sigmoid(x) as where(x >= 0, 1, t) / (1 + t), t = exp(-|x|) in (0, 1]: nothing overflows (1 / (1 + exp(-x)) is 0
    once exp(-x) overflows f32, x < -88.7, where silu(x) is still a normal f32). As the Triton backend's."""
    t = f"{e.name(ins.result)}_t"           # names end in a digit: no value is called this
    e.emit(f"{t} = gl.exp(-gl.abs({x}))")
    return f"(gl.where({x} >= 0, 1.0, {t}) / (1.0 + {t}))"


@register_emitter("gluon", Op.BINARY, fns=_BINARY.keys() | _INT_BINARY.keys())
def _e_binary(e: Emitter, ins: Instr) -> None:
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
def _e_broadcast(e: Emitter, ins: Instr) -> None:
    x, v = ins.srcs
    key = e.lay[x]
    dim = 1 if ins.attrs.axis == "row" else 0
    dt = work_dtype(ins)
    vec = e.cast(e.as_layout(v, ("slice", dim, key)), v.type.dtype, dt) + ("[:, None]" if dim == 1 else "[None, :]")
    expr = (_BINARY if dt.is_float else _INT_BINARY)[ins.attrs.fn].format(e.cast(e.name(x), x.type.dtype, dt), vec)
    e.assign(ins.result, e.cast(expr, dt, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.CAST)
def _e_cast(e: Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    src, dst = x.type, ins.result.type
    if src.space is Space.REG and dst.space is Space.REG:
        e.assign(ins.result, e.cast(e.name(x), src.dtype, dst.dtype))
        e.set_lay(ins.result, e.lay[x])
    elif src.space is Space.REG:      # registers -> a shared tile (an mma operand): store, then fence for wgmma
        dt = GL_DTYPES[dst.dtype.name]
        layout = SHARED_LAYOUT.format(list(dst.shape), dt)
        e.assign(ins.result, f"gl.allocate_shared_memory({dt}, {list(dst.shape)}, {layout}, "
                             f"{e.cast(e.name(x), src.dtype, dst.dtype)})")
        e.emit("hopper.fence_async_shared()")
    elif dst.space is Space.REG:      # a shared tile -> registers
        key = e.plan[ins.result]
        e.assign(ins.result, e.cast(f"{e.name(x)}.load({e.layout(key)})", src.dtype, dst.dtype))
        e.set_lay(ins.result, key)
    else:                             # shared -> shared (a dtype cast, or a copy to write apart): through registers
        key = ("blocked", *src.shape) if len(src.shape) == 2 else ("blocked1", *src.shape)
        dt = GL_DTYPES[dst.dtype.name]
        layout = SHARED_LAYOUT.format(list(dst.shape), dt)
        regs = f"{e.name(x)}.load({e.layout(key)})"
        e.assign(ins.result, f"gl.allocate_shared_memory({dt}, {list(dst.shape)}, {layout}, "
                             f"{e.cast(regs, src.dtype, dst.dtype)})")
        e.emit("hopper.fence_async_shared()")


@register_emitter("gluon", Op.TRANSPOSE)
def _e_transpose(e: Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    key = e.plan[ins.result]
    if x.type.space is Space.REG:      # permuted registers, then moved into the result's planned layout
        expr = f"gl.convert_layout(gl.permute({e.name(x)}, [1, 0]), {e.layout(key)})"
    else:                               # a shared tile read through a transposed view
        expr = f"{e.name(x)}.permute([1, 0]).load({e.layout(key)})"
    e.assign(ins.result, e.cast(expr, x.type.dtype, ins.result.type.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.REDUCE, fns=_REDUCE)
def _e_reduce(e: Emitter, ins: Instr) -> None:
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
def _e_mask(e: Emitter, ins: Instr) -> None:
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


def _broadcasting(e: Emitter, ins: Instr, as_float: bool, to=None) -> tuple[list[str], tuple]:
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


def _to_result_shape(e: Emitter, ins: Instr, expr: str, key: tuple) -> str:
    """``expr`` broadcast to the result's shape where no operand has it (one vector axis and scalars: a (1, C) or
    (R, 1) value, or a vector result from scalars), against a tile of that shape in layout ``key``."""
    if any(isinstance(s.type, TileType) and ax is None for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True)) or \
            len({ax for ax in ins.attrs.axes if ax is not None}) == 2:
        return expr
    shape = list(ins.result.type.shape)
    return f"gl.broadcast({expr}, gl.full({shape}, 0, gl.int1, layout={e.layout(key)}))[0]"


@register_emitter("gluon", Op.COMPARE, fns=_COMPARE)
def _e_compare(e: Emitter, ins: Instr) -> None:
    (a, b), key = _broadcasting(e, ins, True)
    e.assign(ins.result, _to_result_shape(e, ins, f"({a} {_COMPARE[ins.attrs.fn]} {b})", key))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.LOGIC, fns=_LOGIC)
def _e_logic(e: Emitter, ins: Instr) -> None:
    xs, key = _broadcasting(e, ins, False)
    e.assign(ins.result, _to_result_shape(e, ins, _LOGIC[ins.attrs.fn].format(*xs), key))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.SELECT)
def _e_select(e: Emitter, ins: Instr) -> None:
    t = ins.result.type
    work = work_dtype(ins)       # dst's integer dtype, or f32 / f64 (f64 when dst or an operand is)
    (m, a, b), key = _broadcasting(e, ins, False, work)
    expr = _to_result_shape(e, ins, f"gl.where({m}, {a}, {b})", key)
    if not work.is_float and t.dtype is not bool_ and not any(isinstance(s.type, TileType) for s in ins.srcs[1:]):
        # two int constants (where(u8, m, 1, 0)) make an i32 tensor: a shared tile's store takes only dst's dtype
        expr = f"{expr}.to({GL_DTYPES[t.dtype.name]})"
    e.assign(ins.result, e.cast(expr, work, t.dtype))
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.ARANGE)
def _e_arange(e: Emitter, ins: Instr) -> None:
    t, key = ins.result.type, e.plan[ins.result]
    expr = f"({e.name(ins.srcs[0])} + gl.arange(0, {t.shape[0]}, layout={e.layout(key)}))"
    if t.dtype.name == "f8e4m3":
        expr = f"{expr}.to(gl.float32)"                   # Triton converts ints to fp8 only through a float
    e.assign(ins.result, f"{expr}.to({GL_DTYPES[t.dtype.name]})")
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.RAND)
def _e_rand(e: Emitter, ins: Instr) -> None:
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
def _mma_operands(e: Emitter, ins: Instr) -> tuple[str, str, str, tuple]:
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


def _deferrable(e: Emitter, ins: Instr) -> bool:
    """An accumulation chain in a pipelined loop keeps one wgmma in flight: waited with
    ``warpgroup_mma_wait(1)`` in the loop, ``(0)`` after it (``passes.deferrable``)."""
    return e.pipelining is not None and deferrable(e.pipelining, ins)


@register_emitter("gluon", Op.MMA)
def _e_mma(e: Emitter, ins: Instr) -> None:
    an, bn, acc, key = _mma_operands(e, ins)
    if _deferrable(e, ins):
        e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc}, is_async=True)")
        e.assign(ins.result, f"hopper.warpgroup_mma_wait(1, deps=[{e.name(ins.result)}])")
        e.deferred.append(ins.result)
        e.unretired = True
    else:
        e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc})")
        e.unretired = False        # a synchronous wgmma waits for every one before it
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.MMA_ASYNC)
def _e_mma_async(e: Emitter, ins: Instr) -> None:
    """An async wgmma. Waited in the same block: the wait is its ``mma_wait``. Carried on (waited after the
    loop, or the acc of the next one): at most one kept in flight, ``warpgroup_mma_wait(1)`` right after it."""
    an, bn, acc, key = _mma_operands(e, ins)
    stages = [(ring, stage, None) for ring, stage in e.read_by_wgmma(ins)]
    e.assign(ins.result, f"hopper.warpgroup_mma({an}, {bn}, {acc}, is_async=True)")
    if not any(i.op is Op.MMA_WAIT and i.srcs[0] is ins.result for i in e.blocks[-1].instrs):
        e.emit(f"{e.name(ins.result)} = hopper.warpgroup_mma_wait(1, deps=[{e.name(ins.result)}])")
        e.free_inflight()          # all but this one have retired
    e.inflight += stages
    e.unretired = True
    e.set_lay(ins.result, key)


@register_emitter("gluon", Op.MMA_WAIT)
def _e_mma_wait(e: Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    e.assign(ins.result, f"hopper.warpgroup_mma_wait(0, deps=[{e.name(x)}])")
    e.set_lay(ins.result, e.lay[x])
    e.free_inflight()              # wait(0): every wgmma issued before has retired
    e.unretired = False


