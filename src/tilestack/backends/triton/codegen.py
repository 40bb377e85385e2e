"""IR -> Triton source. One emitter per op, registered with ``ir.ops.register_emitter("triton", op)``; the lowering
is a single walk in program order.

The generated function takes, for each global, its pointer, sizes and strides (``A, A_d0, A_d1, A_s0,
A_s1``), then the runtime scalars; constants are literals (a trace is per set of constants). A value is a
Python variable named after the user's tile where one was known (``acc_23``). Loads and stores are masked
against the global's sizes, so tiles may hang past the edge of a ragged tensor.

Element offsets of pointer-path accesses are 32-bit (Triton's default, the fastest) for the globals whose
every offset fits in int32, and 64-bit for the others (``index64``: chosen per launch from the tensors'
shapes and strides with ``needs_int64``); copy-engine (TMA) accesses take per-axis coordinates and need neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from tilestack.backends.python_dsl import (
    engine_coord,
    floor_helpers,
    literal,
    param_names,
    register_scalar_emitters,
    saturated_literal,
    scalar_templates,
)
from tilestack.backends.triton.interp_helpers import BF16_HELPER, F8E4M3_HELPER, INT_SAT_HELPER, TF32_HELPER
from tilestack.backends.triton.passes import DOT_MIN_DIM, TMA_MAX_BOX, pipeline  # noqa: F401  (TMA_MAX_BOX: re-exported)
from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import EMITTERS, Op, access_of, mask_of, register_emitter, work_dtype
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
    FLOAT,
    INDEX,
    GlobalType,
    TileType,
    bf16,
    bool_,
    f8e4m3,
    f16,
    f32,
    f64,
    i64,
    int_range,
    narrow_int,
)

INT32_MAX = 2**31 - 1
TL_DTYPES = {"f64": "tl.float64", "f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16",
             "i32": "tl.int32", "i64": "tl.int64", "bool": "tl.int1", "i8": "tl.int8", "f8e4m3": "tl.float8e4nv",
             "u8": "tl.uint8"}
# neg multiplies by -1 (exact, and the sign of a zero flips, as NumPy's and torch's negative): Triton's unary minus is
# 0 - x, which makes -(+0.0) +0.0 (so 1 / neg(0.0) would be +inf). sigmoid: _sigmoid, not tl.sigmoid
_UNARY = {"exp": "tl.exp({})", "exp2": "tl.math.exp2({})", "log": "tl.log({})", "log2": "tl.log2({})",
          "abs": "tl.abs({})", "neg": "({} * -1.0)", "relu": "tl.maximum({}, 0.0, propagate_nan=tl.PropagateNan.ALL)",
          "sqrt": "tl.sqrt({})", "rsqrt": "tl.rsqrt({})", "sigmoid": None, "sin": "tl.sin({})",
          "cos": "tl.cos({})"}
# max and min propagate NaN, as NumPy's (the reference), torch's and CUDA's max.NaN do (Triton's default ignores it)
_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} / {})",
           "max": "tl.maximum({}, {}, propagate_nan=tl.PropagateNan.ALL)",
           "min": "tl.minimum({}, {}, propagate_nan=tl.PropagateNan.ALL)", "rem": "({} % {})"}
# integer work (ir.ops.work_dtype): Triton's // and % on signed integers truncate toward zero, >> is arithmetic
_INT_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} // {})", "rem": "({} % {})",
               "max": "tl.maximum({}, {})", "min": "tl.minimum({}, {})", "bit_and": "({} & {})",
               "bit_or": "({} | {})", "bit_xor": "({} ^ {})", "shl": "({} << {})", "shr": "({} >> {})"}
_INT_UNARY = {"abs": "tl.abs({})", "neg": "(-{})", "relu": "tl.maximum({}, 0)"}
_SCALAR = scalar_templates("tl")
# Python's floor division and remainder for operands that may be negative (backends/python_dsl.py)
_FLOOR_HELPERS = floor_helpers("triton.jit", "tl", "Triton")
# row/column max and min reduce with NaN-propagating combines (tl.max and tl.min ignore NaN)
_NAN_REDUCE_HELPERS = '''

@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
'''
_REDUCE = {"max": "tl.reduce({}, {}, _max_nan)", "min": "tl.reduce({}, {}, _min_nan)", "sum": "tl.sum({}, axis={})"}
_COMBINE = {"max": _BINARY["max"], "min": _BINARY["min"], "sum": "({} + {})"}
_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_LOGIC = {"and": "({} & {})", "or": "({} | {})", "not": "(~{})"}



def needs_int64(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether an element offset into a tensor of this shape and these strides (in elements) can pass int32:
    its largest one, ``sum((size - 1) * |stride|)``, or a coordinate on its own (``size - 1``: an expanded
    axis of stride 0 has offsets that stay small and coordinates that need not).

    Offsets of elements outside the tensor (a tile hanging past its edge) may wrap in 32 bits: they are
    masked off and never dereferenced. An empty tensor is never addressed.
    """
    if 0 in shape:
        return False
    top = sum((d - 1) * abs(s) for d, s in zip(shape, stride, strict=True))
    return top > INT32_MAX or any(d - 1 > INT32_MAX for d in shape)


def wide_globals(kernel: KernelIR, args: Sequence) -> frozenset[int]:
    """The param indices of ``kernel``'s globals whose offsets need 64 bits for these tensors: ``index64`` for
    ``generate``, and part of a launch's specialization key (two launches with the same set share code)."""
    return frozenset(i for i, p in enumerate(kernel.params)   # (an ArgSpec, sizes unknown, has no stride(): 32-bit)
                     if p.is_global and callable(getattr(args[i], "stride", None))
                     and needs_int64(args[i].shape, args[i].stride()))


class _Emitter:
    def __init__(self, kernel: KernelIR, interpret: bool, index64: bool | Collection[int]):
        self.kernel = kernel
        self.interpret = interpret
        self.pnames = param_names([p.name for p in kernel.params])   # each parameter's name in the source
        # the param indices of the globals whose element offsets are computed in 64 bits
        self.index64 = frozenset(i for i, p in enumerate(kernel.params) if p.is_global and (
            index64 is True or (index64 is not False and i in index64)))
        # (global param index, block shape) -> descriptor param name, as the passes decided (KernelIR.reads)
        self.descriptors = {(how[1], how[2]): f"{self.pnames[how[1]]}_desc{k}"
                            for k, how in enumerate(r for r in kernel.reads if r[0] == "desc")}
        self.lines: list[str] = []
        self.names: dict[Value, str] = {}
        self.globals: dict[Value, str] = {}   # global value -> its parameter name
        self.global_index: dict[Value, int] = {}   # global value -> its param index
        self.consts: set[Value] = set()       # values that are Python literals in the source
        self.addresses = 0
        self.nonneg = nonnegative(kernel.body)  # index values >= 0: plain // and % floor them
        self.wide_index = wide_index(kernel.body)   # index values computed in 64 bits (data past 2**31)
        # index values of any size: read from memory, or made from an int argument past int32 (ir.scalars.past_int32)
        self.from_memory = from_memory(kernel.body) | past_int32(kernel.body)
        self.arg_bounds = arg_bounds(kernel.body)    # bounds of the index values made from int arguments
        # floats f64 work takes (ir.scalars.f64_floats): value -> its f64 name (an argument's: an f64 parameter),
        # an f32 of it everywhere else
        self.f64_floats: dict[Value, str] = dict.fromkeys(f64_floats(kernel), "")
        self.floor_helpers = False              # whether the source needs _floordiv / _floormod
        self.tf32_helper = False                # whether it needs _round_tf32 (interpreted tf32 products)
        self.bf16_helper = False                # whether it needs _to_bf16 (interpreted conversions to bf16)
        self.f8_helper = False                  # whether it needs _to_f8e4m3 / _from_f8e4m3 (interpreted f8)
        self.int_sat_helper = False             # whether it needs _to_int_sat (interpreted float -> int conversions)
        self.nan_helpers = False                # whether it needs _max_nan / _min_nan (max and min reductions)
        self.indent = 1
        self.shielded = _thread_locality_hazards(kernel)   # REDUCE instrs whose loaded operand gets `+ 0.0`

    # ---- names ---------------------------------------------------------------------------------------------
    def name(self, v: Value) -> str:
        # numbered per kernel, in emission order: the same kernel gives the same source whatever was traced before
        if v not in self.names:
            n = len(self.names)
            self.names[v] = f"{v.hint}_{n}" if v.hint else f"v{n}"
        return self.names[v]

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def assign(self, v: Value, expr: str) -> None:
        self.emit(f"{self.name(v)} = {expr}")

    # ---- the walk ------------------------------------------------------------------------------------------
    def block(self, block: Block) -> None:
        table = EMITTERS["triton"]
        for ins in block.instrs:
            table[ins.op].fn(self, ins)

    def f32(self, v: Value) -> str:
        """The value as f32 (or f64) for arithmetic: Triton's math functions take 32- or 64-bit floats."""
        n = self.name(v)
        return n if v.type.dtype in (f32, f64) else self.up(n, v.type.dtype)

    def float_scalar(self, v: Value, work) -> str:
        """Float scalar ``v`` as ``work`` (a float work dtype) takes it: in f64 work an f64 of its value (an f64
        argument as it is, a constant exactly: Triton makes a Python float an f32 first, and the interpreter a
        weakly typed scalar that tl.maximum takes as an f32), else its name (an f32 there, as the reference takes
        it)."""
        if work is not f64:
            return self.name(v)
        return f"tl.full((), {self.f64_floats.get(v) or self.name(v)}, tl.float64)"

    def up(self, expr: str, dtype) -> str:
        """``expr`` of ``dtype`` (a 16- or 8-bit float) as f32: through its bits under the interpreter if bf16 or
        f8e4m3 (see interp_helpers)."""
        if self.interpret and dtype is bf16:
            self.bf16_helper = True
            return f"_from_bf16({expr})"
        if self.interpret and dtype is f8e4m3:
            self.f8_helper = True
            return f"_from_f8e4m3({expr})"
        return f"{expr}.to(tl.float32)"

    def as_dtype(self, v: Value, dtype) -> str:
        """Tile ``v`` converted to ``dtype`` (a ``compute_dtype``, or an op's ``work_dtype``) for arithmetic."""
        return self.cast_to(self.name(v), v.type.dtype, TileType(v.type.space, dtype, v.type.shape))

    def cast_to(self, expr: str, v_from_dtype, dst: TileType | GlobalType) -> str:
        if v_from_dtype is dst.dtype:
            return expr
        if self.interpret and v_from_dtype in (bf16, f8e4m3):
            expr, v_from_dtype = self.up(expr, v_from_dtype), f32
            if dst.dtype is f32:
                return expr
        if self.interpret and dst.dtype is bf16 and v_from_dtype is not f32:
            # the interpreter casts bf16 only from and to f32 right (f64, int8); f64 and integers of 32 bits or more
            # go to f32 rounded to odd, so the value is rounded once, as the GPU's cvt.rn.bf16.f64 / .s32 (a plain f32
            # first rounded 1 + 2**-8 + 2**-40 onto the bf16 tie 1 + 2**-8, then to even, 1.0, not 1 + 2**-7)
            wide = v_from_dtype is f64 or (not v_from_dtype.is_float and v_from_dtype.itemsize >= 4)
            expr = f"_f64_to_f32_odd({expr}.to(tl.float64))" if wide else f"{expr}.to(tl.float32)"
        elif f8e4m3 in (v_from_dtype, dst.dtype) and not {v_from_dtype, dst.dtype} <= {f8e4m3, f32, f16, bf16}:
            expr = f"{expr}.to(tl.float32)"   # Triton converts fp8 only from and to 16- and 32-bit floats
            v_from_dtype = f32
        if self.interpret and dst.dtype is bf16:
            self.bf16_helper = True
            return f"_to_bf16({expr})"
        if self.interpret and dst.dtype is f8e4m3:
            self.f8_helper = True
            return f"_to_f8e4m3({expr if v_from_dtype is f32 else f'{expr}.to(tl.float32)'})"
        # on the GPU too into i8, which it converts to through cvt.rzi.s16 (300.0 -> 300 -> its low byte, 44), and into
        # i64, whose conversion makes NaN -2**63 (the H200's cvt.rzi.s64; s32's makes 0)
        if v_from_dtype.is_float and (narrow_int(dst.dtype) or dst.dtype is i64 or self.interpret and
                                      not dst.dtype.is_float and dst.dtype is not bool_):
            self.int_sat_helper = True
            lo, hi = int_range(dst.dtype)
            x = expr if v_from_dtype in (f32, f64) else self.up(expr, v_from_dtype)
            return f"_to_int_sat({x}, {float(lo)!r}, {float(hi + 1)!r}, {lo}, {hi}, {TL_DTYPES[dst.dtype.name]})"
        return f"{expr}.to({TL_DTYPES[dst.dtype.name]})"

    # ---- memory --------------------------------------------------------------------------------------------
    def address(self, ins: Instr, g: Value, coords: tuple[Value, ...], shape: tuple[int, ...]):
        """(pointer expression, mask expression) for a tile at tile coordinates ``coords`` of global ``g``."""
        gname = self.globals[g]
        rank = g.type.rank
        lead = rank - len(shape)
        self.addresses += 1
        key = f"t{self.addresses}"
        # a global whose offsets can pass int32 computes them in 64 bits from its coordinates on (tl.cast, not
        # .to: under the interpreter a loop counter is a Python int)
        # (an index read from memory too: its product with the tile size must not wrap back inside the tensor)
        wide = self.global_index[g] in self.index64

        def coord(c: Value, n: int = 1) -> str:
            # (an int argument's coordinate whose product with the tile size may pass int32, too: r = 2**28 rows of
            # 16 wrapped to row 0)
            return f"tl.cast({self.name(c)}, tl.int64)" if wide or c in self.from_memory or big_literal(c) \
                or not fits_int32(self.arg_bounds, c, n) else self.name(c)

        def big_literal(c: Value) -> bool:
            # a constant tile coordinate (at=(R, 0) with R a kernel constant) whose product with the tile size passes
            # int32: Triton's interpreter multiplied the two literals as int32 and failed deep inside Triton ("Scalar
            # 2147483648 is out of range for type int32"); in 64 bits the row is past the tensor and masked, as on
            # the reference executor
            text = self.name(c)
            return c in self.consts and text.lstrip("-").isdigit() and abs(int(text)) * max(shape) > INT32_MAX

        terms = [f"{coord(c)} * {gname}_s{a}" for a, c in enumerate(coords[:lead])]
        offs, masks = [], []
        for k, n in enumerate(shape):
            axis = lead + k
            var = f"{key}_o{k}"
            self.emit(f"{var} = {coord(coords[axis], n)} * {n} + tl.arange(0, {n})")
            if len(shape) == 2:
                bcast = "[:, None]" if k == 0 else "[None, :]"
            else:
                bcast = ""
            offs.append(f"{var}{bcast} * {gname}_s{axis}")
            masks.append(f"({var}{bcast} >= 0) & ({var}{bcast} < {gname}_d{axis})")
        for a, c in enumerate(coords[:lead]):
            if not (c in self.consts and self.name(c).isdigit()):
                masks.append(f"({self.name(c)} >= 0)")
            masks.append(f"({self.name(c)} < {gname}_d{a})")
        base = f"{gname} + " + " + ".join(f"({t})" for t in terms) if terms else gname
        ptr = f"{base} + " + " + ".join(offs)
        return ptr, " & ".join(masks)

    def descriptor(self, g: Value, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """The TMA descriptor parameter for whole-tile accesses of ``shape`` into ``g`` (made on the host)."""
        block = (1,) * (g.type.rank - len(shape)) + tuple(shape)
        return self.descriptors[(self.global_index[g], block)], block

    def tma_offsets(self, coords: tuple[Value, ...], shape: tuple[int, ...]) -> str:
        lead = len(coords) - len(shape)
        scale = (1,) * lead + tuple(shape)
        offs = [engine_coord(self.name(c), n, "tl") if c in self.from_memory or not fits_int32(self.arg_bounds, c, n)
                else (c in self.consts and saturated_literal(self.name(c), n))   # (a constant far past int32)
                or (self.name(c) if a < lead else f"{self.name(c)} * {n}")
                for a, (c, n) in enumerate(zip(coords, scale, strict=True))]
        return "[" + ", ".join(offs) + "]"


@register_emitter("triton", Op.ARG)
def _e_arg(e: _Emitter, ins: Instr) -> None:
    name = e.pnames[ins.attrs.index]
    if isinstance(ins.result.type, GlobalType):
        e.globals[ins.result] = name
        e.global_index[ins.result] = ins.attrs.index
    e.names[ins.result] = name
    if ins.result in e.f64_floats:     # passed as f64 (see _Emitter.f64_floats): an f32 wherever else it is used
        e.f64_floats[ins.result] = name
        e.names[ins.result] = f"tl.cast({name}, tl.float32)"
        if e.interpret:   # the interpreter's Python float as an f64 tensor: a -0.0 as a constant is +0.0 (see below)
            signed = f"{name}_{len(e.names)}"        # and a conditional takes a float in f32's range as an f32
            e.names[(Op.ARG, ins.result)] = signed   # (its number taken, as a value's would be)
            e.f64_floats[ins.result] = signed
            e.emit(f'{signed} = tl.full((), -1.0, tl.float64) * 0.0 if {name} == 0 and str({name}).startswith("-") '
                   f'else tl.full((), {name}, tl.float64)')
    elif e.interpret and ins.result.type == FLOAT:
        # the interpreter passes a float argument as the Python float, which meets tensors as a constant: -0.0 would
        # become +0.0 (Triton makes every constant equal to 0 its null value), so a -0.0 becomes a tensor first. A
        # float outside f32's normal range (a subnormal such as an attention scale of 1e-40, or a finite value past
        # f32's largest) reaches the kernel as an fp64 scalar, which made the kernel's f32 work f64 (tl.dot then
        # failed on "Both operands must be same dtype"): cast to f32, as the compiled kernel's fp32 parameter is (a
        # value past f32's largest is its infinity there).
        e.emit(f'{name} = tl.full((), -1.0, tl.float32) * 0.0 if {name} == 0 and str({name}).startswith("-") '
               f'else {name}')
        e.emit(f'{name} = {name}.to(tl.float32) if getattr({name}, "dtype", None) == tl.float64 else {name}')


register_scalar_emitters("triton", "tl", _SCALAR)


@register_emitter("triton", Op.FILL)
def _e_fill(e: _Emitter, ins: Instr) -> None:
    t = ins.result.type
    # f8e4m3 through f32 too: its constants past +-448 (or infinite) have no f8 value (the conversion saturates them,
    # as the reference does), and Triton's interpreter has no f8 constants at all
    if e.interpret and t.dtype is bf16 or t.dtype is f8e4m3:
        e.assign(ins.result, e.cast_to(f"tl.full({t.shape}, {literal(ins.attrs.value, 'tl')}, tl.float32)", f32, t))
        return
    e.assign(ins.result, f"tl.full({t.shape}, {literal(ins.attrs.value, 'tl')}, {TL_DTYPES[t.dtype.name]})")


@register_emitter("triton", Op.UNARY, fns=_UNARY)
def _e_unary(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    wd = work_dtype(ins)
    if not wd.is_float:
        e.assign(ins.result, e.cast_to(_INT_UNARY[ins.attrs.fn].format(e.as_dtype(x, wd)), wd, ins.result.type))
        return
    if ins.attrs.fn == "sigmoid":
        expr = _sigmoid(e, ins, e.f32(x))
    else:
        expr = _UNARY[ins.attrs.fn].format(e.f32(x))
    e.assign(ins.result, e.cast_to(expr, f32 if x.type.dtype is not f64 else f64, ins.result.type))


def _sigmoid(e: _Emitter, ins: Instr, x: str) -> str:
    """sigmoid(x) as where(x >= 0, 1, t) / (1 + t), t = exp(-|x|) in (0, 1]: nothing overflows, so a far negative x
    keeps its tiny (down to subnormal) value and its digits; tl.sigmoid's 1 / (1 + exp(-x)) is 0 once exp(-x)
    overflows f32 (x < -88.7), where silu(x) = x sigmoid(x) is still a normal f32 (-7e-38 at x = -90). NaN stays
    NaN, sigmoid(-inf) = 0 and sigmoid(inf) = 1."""
    t = f"{e.name(ins.result)}_t"           # names end in a digit: no value is called this
    e.emit(f"{t} = tl.exp(-tl.abs({x}))")
    return f"(tl.where({x} >= 0, 1.0, {t}) / (1.0 + {t}))"


def _operand(e: _Emitter, v: Value, work) -> str:
    return e.f32(v) if isinstance(v.type, TileType) else e.float_scalar(v, work)


def _int_operand(e: _Emitter, v: Value, wd) -> str:
    """An operand of integer work in the work dtype: a tile converted, an index converted (a literal stays one: it
    fits the work dtype, the language checked)."""
    if isinstance(v.type, TileType):
        return e.as_dtype(v, wd)
    return e.name(v) if v in e.consts else f"tl.cast({e.name(v)}, {TL_DTYPES[wd.name]})"


@register_emitter("triton", Op.BINARY, fns=_BINARY.keys() | _INT_BINARY.keys())
def _e_binary(e: _Emitter, ins: Instr) -> None:
    a, b = ins.srcs
    wd = work_dtype(ins)
    if not wd.is_float:
        expr = _INT_BINARY[ins.attrs.fn].format(_int_operand(e, a, wd), _int_operand(e, b, wd))
        e.assign(ins.result, e.cast_to(expr, wd, ins.result.type))
        return
    expr = _BINARY[ins.attrs.fn].format(_operand(e, a, wd), _operand(e, b, wd))
    e.assign(ins.result, e.cast_to(expr, f32 if a.type.dtype is not f64 else f64, ins.result.type))


@register_emitter("triton", Op.BROADCAST, fns=_BINARY)
def _e_broadcast(e: _Emitter, ins: Instr) -> None:
    x, v = ins.srcs
    dt = work_dtype(ins)
    vec = f"{e.as_dtype(v, dt)}[:, None]" if ins.attrs.axis == "row" else f"{e.as_dtype(v, dt)}[None, :]"
    expr = (_BINARY if dt.is_float else _INT_BINARY)[ins.attrs.fn].format(e.as_dtype(x, dt), vec)
    e.assign(ins.result, e.cast_to(expr, dt, ins.result.type))


@register_emitter("triton", Op.CAST)
def _e_cast(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    e.assign(ins.result, e.cast_to(e.name(x), x.type.dtype, ins.result.type))


@register_emitter("triton", Op.TRANSPOSE)
def _e_transpose(e: _Emitter, ins: Instr) -> None:
    (x,) = ins.srcs
    e.assign(ins.result, e.cast_to(f"tl.trans({e.name(x)})", x.type.dtype, ins.result.type))


def _thread_locality_hazards(kernel: KernelIR) -> frozenset[Instr]:
    """Row reductions that Triton 3.6's ``OptimizeThreadLocality`` pass would rewrite and then abort on.

    The pass takes a reduction along the last axis of a tile straight from ``tl.load`` whose result, combined
    with a loop-carried accumulator, is what the loop carries on (``s = s + tl.sum(x, 1)``), and asserts that the
    loop's result for that accumulator has exactly one use after the loop: a sum used twice after the loop, or
    only inside it (a running offset), kills the compiling process (``Assertion `loopResult.hasOneUse()'``).
    For those, the emitter reduces ``x + 0.0`` instead (not a load, so the pass leaves the loop alone; the sum
    is the same, a max or min can differ only in the sign of a zero result)."""
    uses: dict[Value, int] = {}

    def count(block: Block) -> None:
        for v in block.yields:
            uses[v] = uses.get(v, 0) + 1
        for ins in block.instrs:
            for v in ins.srcs:
                uses[v] = uses.get(v, 0) + 1
            if ins.body is not None:
                count(ins.body)

    count(kernel.body)
    loaded = {ins.result for ins in kernel.walk() if ins.op is Op.LOAD
              and ins.result.type.dtype is ins.srcs[0].type.dtype and ins.result.type.dtype in (f32, f64)}
    hazards = set()
    for loop in kernel.walk():
        if loop.op is not Op.RANGE:
            continue
        body = loop.body
        for arg, y, r in zip(body.args[1:], body.yields, loop.results, strict=True):
            red = next((ins for ins in body.instrs if ins.op is Op.REDUCE and y in ins.results), None)
            if red is not None and len(red.srcs) == 2 and red.srcs[1] is arg and red.attrs.axis == "row" \
                    and red.srcs[0] in loaded and uses.get(r, 0) != 1:
                hazards.add(red)
    return frozenset(hazards)


@register_emitter("triton", Op.REDUCE, fns=_REDUCE)
def _e_reduce(e: _Emitter, ins: Instr) -> None:
    fn, axis = ins.attrs.fn, 1 if ins.attrs.axis == "row" else 0
    x = ins.srcs[0]
    dt = work_dtype(ins)
    xs = e.as_dtype(x, dt)
    if ins in e.shielded and not e.interpret:
        xs = f"({xs} + 0.0)"
    expr = _REDUCE[fn].format(xs, axis)
    e.nan_helpers |= fn != "sum"
    if len(ins.srcs) > 1:
        expr = _COMBINE[fn].format(e.as_dtype(ins.srcs[1], dt), expr)
    e.assign(ins.result, e.cast_to(expr, dt, ins.result.type))


@register_emitter("triton", Op.MASK)
def _e_mask(e: _Emitter, ins: Instr) -> None:
    x, k = ins.srcs
    r, c = ins.result.type.shape
    rows, cols = f"tl.arange(0, {r})[:, None]", f"tl.arange(0, {c})[None, :]"
    kn = e.name(k)
    if k in e.wide_index:   # a 64-bit bound, clamped past the tile's edges into 32 bits: the compares stay 32-bit
        edge = max(r, c)
        kn = f"tl.minimum(tl.maximum({kn}, {-edge}), {edge}).to(tl.int32)"
    cond = {"tril": f"({cols} - {rows}) <= {kn}", "triu": f"({cols} - {rows}) >= {kn}",
            "right_fill": f"{cols} < {kn}", "lower_fill": f"{rows} < {kn}"}[ins.attrs.kind]
    # a bool_ mask's fill is a Python bool: tl.where(cond, int1, 0) would promote to i32, and ~ of that i32 (a later
    # logical_not) is -1 or -2, both true
    fill = repr(bool(ins.attrs.value)) if x.type.dtype is bool_ else literal(ins.attrs.value)
    if e.interpret and x.type.dtype is bf16 or x.type.dtype is f8e4m3:   # (in f32: see _e_fill)
        expr = e.cast_to(f"tl.where({cond}, {e.up(e.name(x), x.type.dtype)}, {fill})", f32, x.type)
    else:
        expr = f"tl.where({cond}, {e.name(x)}, {fill})"
    e.assign(ins.result, e.cast_to(expr, x.type.dtype, ins.result.type))


@register_emitter("triton", Op.MMA)
def _e_mma(e: _Emitter, ins: Instr) -> None:
    acc, a, b = ins.srcs
    an = f"tl.trans({e.name(a)})" if ins.attrs.trans_a else e.name(a)
    bn = f"tl.trans({e.name(b)})" if ins.attrs.trans_b else e.name(b)
    precision = ""
    if a.type.dtype is f32:
        precision = f', input_precision="{ins.attrs.input_precision or "ieee"}"'
        if e.interpret and ins.attrs.input_precision == "tf32":
            e.tf32_helper = True
            an, bn, precision = f"_round_tf32({an})", f"_round_tf32({bn})", ', input_precision="ieee"'
    small = min(ins.result.type.shape + a.type.shape + b.type.shape) < DOT_MIN_DIM
    if small or e.interpret and a.type.dtype.name in ("bf16", "f8e4m3"):
        # Triton 3.6's interpreter multiplies bf16 dot operands wrongly (NumPy has no bf16); upcasting is
        # exact (a bf16 product fits in f32), so the interpreted kernel computes what the GPU does.
        if a.type.dtype is not f32:
            an, bn, precision = e.up(an, a.type.dtype), e.up(bn, b.type.dtype), ', input_precision="ieee"'
    if small:
        # tl.dot takes no dimension below 16: a smaller product (an 8-wide head, a (D/2, D) widening matrix) is
        # summed from its f32 products, a (M, K, N) broadcast: exact products, as the f32 dot's, of any operands.
        # It holds M K N values at once (an (8, 64) @ (64, 64) spills on sm_90a): meant for small products
        if a.type.dtype is f32 and ins.attrs.input_precision == "tf32" and not e.interpret:   # (else rounded above)
            e.tf32_helper = True
            an, bn = f"_round_tf32({an})", f"_round_tf32({bn})"
        # reduced over the LAST axis, B transposed: Triton 3.6 compiles a sum over the middle axis of the
        # (M, K, N) product wrong on sm_90 for K <= 4 (f16 operands; K = 8 from u8 tiles): off by 10^3 on an H100,
        # right under the interpreter (scripts/gpu/probe_small_dot_forms.py; held-out round 21's W8A16 GEMM)
        e.assign(ins.result, f"({e.name(acc)} + tl.sum({an}[:, None, :] * tl.trans({bn})[None, :, :], axis=2))")
        return
    e.assign(ins.result, f"tl.dot({an}, {bn}, {e.name(acc)}{precision})")


@register_emitter("triton", Op.LOAD)
def _e_load(e: _Emitter, ins: Instr) -> None:
    g, *coords = ins.srcs
    t = ins.result.type
    if ins.attrs.via == "tma":
        desc, _ = e.descriptor(g, t.shape)
        expr = f"{desc}.load({e.tma_offsets(tuple(coords), t.shape)}).reshape({t.shape})"
        e.assign(ins.result, e.cast_to(expr, g.type.dtype, t))
        return
    ptr, mask = e.address(ins, g, tuple(coords), t.shape)
    e.assign(ins.result, e.cast_to(f"tl.load({ptr}, mask={mask}, other=0.0)", g.type.dtype, t))


@register_emitter("triton", Op.LOAD_SCALAR)
def _e_load_scalar(e: _Emitter, ins: Instr) -> None:
    """One element through its pointer, masked to the global's sizes (0 outside); an index as a 32- or 64-bit
    int (the tensor's width: narrower ints and bools widen to 32), a float as an f32 (an f64 element that f64 work
    takes as an f64 too)."""
    g, *index = ins.srcs
    gname, dtype = e.globals[g], g.type.dtype
    wide = e.global_index[g] in e.index64

    def coord(c: Value) -> str:
        # in 64 bits for a wide global, or for an index constant outside int32 (ts.load_scalar(X, 2**31) into a
        # small X: the interpreter refused its product with the i32 stride, 'Scalar ... out of range for int32',
        # where the reference reads the 0 outside X)
        literal_past_i32 = c in e.consts and e.name(c).lstrip("-").isdigit() and \
            not -INT32_MAX - 1 <= int(e.name(c)) <= INT32_MAX
        return f"tl.cast({e.name(c)}, tl.int64)" if wide or literal_past_i32 else e.name(c)

    offset = " + ".join(f"{coord(c)} * {gname}_s{a}" for a, c in enumerate(index))
    mask = " & ".join(f"({e.name(c)} >= 0) & ({e.name(c)} < {gname}_d{a})" for a, c in enumerate(index))
    # other=0.0 for a float global: the interpreter cannot cast the int 0 to f8e4m3 ('cannot cast [0] to fp8e4nv')
    other = "0.0" if dtype.is_float else "0"
    x = f"tl.load({gname} + {offset}, mask={mask}, other={other})" if index else f"tl.load({gname})"
    if ins.result in e.f64_floats:     # an f64 element f64 work takes (ir.scalars.f64_floats): an f32 elsewhere
        name = e.name(ins.result)
        e.emit(f"{name} = {x}")
        e.f64_floats[ins.result] = name
        e.names[ins.result] = f"tl.cast({name}, tl.float32)"
        return
    if ins.result.type == FLOAT:
        x = x if dtype is f32 else f"{x}.to(tl.float32)" if dtype is f64 else e.up(x, dtype)
    elif dtype.itemsize < 4 or not dtype.name.startswith("i"):     # bool, u8, i8, i16: as an i32 index
        x = f"{x}.to(tl.int32)"
    e.assign(ins.result, x)


def _masked(e: _Emitter, ins: Instr, edge: str) -> str:
    """The mask of a store's or atomic add's pointers: the global's edges, and the op's own mask if it has one."""
    m = mask_of(ins)
    return edge if m is None else f"{edge} & {e.name(m)}"


@register_emitter("triton", Op.STORE)
def _e_store(e: _Emitter, ins: Instr) -> None:
    g, x, coords = ins.srcs[0], ins.srcs[1], tuple(access_of(ins)[2])
    val = e.cast_to(e.name(x), x.type.dtype, g.type)
    if ins.attrs.via == "tma":      # (never masked: choose_access sends a masked store through pointers)
        desc, block = e.descriptor(g, x.type.shape)
        e.emit(f"{desc}.store({e.tma_offsets(coords, x.type.shape)}, {val}.reshape({block}))")
        return
    ptr, mask = e.address(ins, g, coords, x.type.shape)
    e.emit(f"tl.store({ptr}, {val}, mask={_masked(e, ins, mask)})")


@register_emitter("triton", Op.RANGE)
def _e_range(e: _Emitter, ins: Instr) -> None:
    lo, hi, step, *inits = ins.srcs
    body = ins.body
    for arg, init in zip(body.args[1:], inits, strict=True):
        e.assign(arg, e.name(init))
    stages, flatten = ins.attrs.stages, ins.attrs.flatten
    bounds = [e.name(lo), e.name(hi)] + ([] if e.name(step) == "1" else [e.name(step)])
    hints = ([f"num_stages={stages}"] if stages else []) + (["flatten=True"] if flatten else [])
    rng = f"tl.range({', '.join(bounds + hints)})" if hints else f"range({', '.join(bounds)})"
    e.emit(f"for {e.name(body.args[0])} in {rng}:")
    e.indent += 1
    e.block(body)
    for arg, y in zip(body.args[1:], body.yields, strict=True):
        if y is not arg:
            e.assign(arg, e.name(y))
    if not body.instrs and not body.args[1:]:
        e.emit("pass")
    e.indent -= 1
    for r, arg in zip(ins.results, body.args[1:], strict=True):
        e.names[r] = e.name(arg)


def _along(e: _Emitter, v: Value, axis: str | None, as_float: bool, work=None) -> str:
    """Operand ``v`` of a broadcasting op: float tiles in f32 (or f64) if ``as_float``, vectors along an axis, a
    float scalar as ``work`` takes it."""
    is_float_tile = isinstance(v.type, TileType) and v.type.dtype.is_float
    x = e.f32(v) if as_float and is_float_tile else e.float_scalar(v, work) if v.type == FLOAT else e.name(v)
    return x if axis is None else (f"{x}[:, None]" if axis == "row" else f"{x}[None, :]")


def _to_result_shape(ins: Instr, expr: str) -> str:
    """``expr`` broadcast to the result's shape where no operand has it (vectors and scalars only)."""
    if any(isinstance(s.type, TileType) and ax is None for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True)):
        return expr
    return f"tl.broadcast_to({expr}, {ins.result.type.shape})"


@register_emitter("triton", Op.COMPARE, fns=_COMPARE)
def _e_compare(e: _Emitter, ins: Instr) -> None:
    wd = work_dtype(ins)
    a, b = (_along(e, s, ax, True, wd) for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True))
    e.assign(ins.result, _to_result_shape(ins, f"({a} {_COMPARE[ins.attrs.fn]} {b})"))


@register_emitter("triton", Op.LOGIC, fns=_LOGIC)
def _e_logic(e: _Emitter, ins: Instr) -> None:
    xs = [_along(e, s, ax, False) for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True)]
    e.assign(ins.result, _to_result_shape(ins, _LOGIC[ins.attrs.fn].format(*xs)))


def _select_value(e: _Emitter, v: Value, axis: str | None, dst: TileType, work) -> str:
    """A value operand of a select, in the select's ``work`` dtype (``ir.ops.work_dtype``): dst's integer dtype, or
    f32 or f64 for a float dst. tl.where of an i32 and an f32 would compute in f32, rounding integers past 2**24 and
    leaving the f32 result to a conversion that does not saturate; of two indices, in an integer; of an f16 tile and a
    float, in f32 even into an f64 dst."""
    x = e.name(v)
    if isinstance(v.type, TileType):
        x = e.cast_to(x, v.type.dtype, TileType(v.type.space, work, v.type.shape))
        return x if axis is None else (f"{x}[:, None]" if axis == "row" else f"{x}[None, :]")
    if not work.is_float:
        if v.type == FLOAT:                          # a float scalar: truncated and saturated as a tile would be
            return e.cast_to(f"tl.cast({x}, tl.float32)", f32, dst)
        # an index (an int argument, a size) wrapped to dst's dtype, as the reference converts it: tl.where of an i32
        # index and an i8 tile is an i32 tile, which the ops after it would take unwrapped (300 >> 1 is 150, not 22)
        return x if v in e.consts else f"tl.cast({x}, {TL_DTYPES[work.name]})"
    if v.type == INDEX:                              # an int constant, a size: the float work's
        return f"tl.cast({x}, {TL_DTYPES[work.name]})"
    # a float scalar: as it is in f64 work (a Python float would otherwise be an f32 constant), else weakly typed
    return e.float_scalar(v, work)


@register_emitter("triton", Op.SELECT)
def _e_select(e: _Emitter, ins: Instr) -> None:
    t = ins.result.type
    (ms, a_s, b_s), (max_, ax, bx) = ins.srcs, ins.attrs.axes
    work = work_dtype(ins)
    m = _along(e, ms, max_, False)
    a, b = _select_value(e, a_s, ax, t, work), _select_value(e, b_s, bx, t, work)
    expr = _to_result_shape(ins, f"tl.where({m}, {a}, {b})")
    e.assign(ins.result, e.cast_to(expr, work, t))


@register_emitter("triton", Op.ARANGE)
def _e_arange(e: _Emitter, ins: Instr) -> None:
    t = ins.result.type
    expr = f"({e.name(ins.srcs[0])} + tl.arange(0, {t.shape[0]}))"
    if t.dtype in (bf16, f8e4m3):     # the interpreter converts ints to bf16 through f32; Triton ints to f8 not at all
        e.assign(ins.result, e.cast_to(f"{expr}.to(tl.float32)", f32, t))
        return
    e.assign(ins.result, f"{expr}.to({TL_DTYPES[t.dtype.name]})")


@register_emitter("triton", Op.RAND)
def _e_rand(e: _Emitter, ins: Instr) -> None:
    seed, offset, row, col, stride = (e.name(s) for s in ins.srcs)
    shape, n = ins.result.type.shape, ins.attrs.per_counter
    width = shape[-1] // n                      # counters per row: each gives n numbers
    # 64-bit counters from the first term on (tl.cast, not .to: under the interpreter an index may be a Python int)
    first = f"tl.cast({col}, tl.int64)" if n == 1 else f"(tl.cast({col}, tl.int64) // {n})"
    if len(shape) == 2:
        rows = f"(tl.cast({row}, tl.int64) + tl.arange(0, {shape[0]})[:, None])"
        cols = f"({first} + tl.arange(0, {width})[None, :])"
    else:
        rows, cols = f"tl.cast({row}, tl.int64)", f"({first} + tl.arange(0, {width}))"
    counters = f"tl.cast({offset}, tl.int64) + {rows} * {stride} + {cols}"
    if n == 1:
        e.assign(ins.result, f"tl.rand({seed}, {counters})")
        return
    base = e.name(ins.result)
    words = [f"{base}_w{w}" for w in range(4)]
    if n == 4:
        e.emit(f"{', '.join(words)} = tl.rand4x({seed}, {counters})")
        u = words
    else:   # the four low 16-bit halves, then the four high ones, each over 65536
        e.emit(f"{', '.join(words)} = tl.randint4x({seed}, {counters})")
        u = [f"{base}_h{k}" for k in range(8)]
        for k in range(8):
            half = f"({words[k % 4]} & 0xFFFF)" if k < 4 else f"({words[k % 4]} >> 16)"
            e.emit(f"{u[k]} = {half}.to(tl.float32) * {float(2.0**-16)!r}")
    e.assign(ins.result, _interleaved(u))


def _interleaved(tiles: list[str]) -> str:
    """Tiles t_0..t_{n-1} of one shape interleaved along the last axis: column n*k + m is t_m's column k (n a power
    of two: the even columns interleave the even tiles, the odd ones the odd tiles)."""
    if len(tiles) == 1:
        return tiles[0]
    return f"tl.interleave({_interleaved(tiles[0::2])}, {_interleaved(tiles[1::2])})"


@register_emitter("triton", Op.ATOMIC_ADD)
def _e_atomic_add(e: _Emitter, ins: Instr) -> None:
    g, x, coords = ins.srcs[0], ins.srcs[1], tuple(access_of(ins)[2])
    ptr, mask = e.address(ins, g, coords, x.type.shape)
    val = e.cast_to(e.name(x), x.type.dtype, g.type)
    e.emit(f'tl.atomic_add({ptr}, {val}, mask={_masked(e, ins, mask)}, sem="relaxed")')


@dataclasses.dataclass(frozen=True)
class Lowered:
    source: str
    fn_name: str
    descriptors: tuple[tuple[str, tuple[int, ...]], ...]   # (global param name, block shape), in param order
    # what to pass, in order: ("ptr", i) the tensor, ("dim", i, axis), ("stride", i, axis), ("scalar", i),
    # ("desc", i, block); only what the body reads (with TMA, most sizes and strides travel in descriptors)
    binding: tuple[tuple, ...]
    f64_scalars: frozenset[int] = frozenset()   # param indices of the float arguments passed as f64 (f64 work's)


def lower(kernel: KernelIR, tma: bool = False, print_after=()) -> tuple[KernelIR, list]:
    """The Triton pipeline's result for ``kernel`` and every stage [(pass name, IR), ...]."""
    return pipeline(tma).run(kernel, print_after=print_after)


def generate(kernel: KernelIR, interpret: bool = False, tma: bool = False,
             index64: bool | Collection[int] = True) -> Lowered:
    """The Triton kernel for ``kernel``: for Triton's interpreter if asked; with TMA descriptors for whole-tile
    accesses if ``tma`` (the caller checks at launch that the tensors' layouts allow it).

    ``index64``: which globals' pointer offsets are computed in 64 bits: all (True, the default: right for any
    size), none (False), or the param indices given; a launcher passes those ``needs_int64`` of its tensors.
    """
    return emit(lower(kernel, tma)[0], interpret, index64)


def emit(low: KernelIR, interpret: bool = False, index64: bool | Collection[int] = True) -> Lowered:
    """Triton source for IR the Triton pipeline has lowered (``lower``): one emitter per instruction."""
    e = _Emitter(low, interpret, index64)
    e.block(low.body)
    params = []
    f64_params = set(e.f64_floats.values())
    for how in low.reads:
        name = e.pnames[how[1]]
        scalar = f"{name}: tl.float64" if name in f64_params else name    # (Triton passes a float as an f32)
        params.append({"ptr": name, "scalar": scalar, "dim": f"{name}_d{how[-1]}", "stride": f"{name}_s{how[-1]}",
                       "desc": e.descriptors.get((how[1], how[-1]))}[how[0]])
    fn = f"{low.name}_kernel"
    consts = ", ".join(f"{k}={v!r}" for k, v in low.constants.items())
    head = [
        f'"""Generated by tilestack from kernel `{low.name}` ({low.where}); constants: {consts}."""',
        "import triton",
        "import triton.language as tl",
        *([_FLOOR_HELPERS] if e.floor_helpers else []),
        *([TF32_HELPER] if e.tf32_helper else []),
        *([BF16_HELPER] if e.bf16_helper else []),
        *([F8E4M3_HELPER] if e.f8_helper else []),
        *([INT_SAT_HELPER] if e.int_sat_helper else []),
        *([_NAN_REDUCE_HELPERS] if e.nan_helpers else []),
        "",
        "",
        "@triton.jit",
        f"def {fn}({', '.join(params)}):",
    ]
    descriptors = tuple((low.params[i].name, block) for (i, block) in e.descriptors)
    body = e.lines or ["    pass"]   # a kernel with no effect (every store pruned) is an empty function
    f64_scalars = frozenset(i for i, name in enumerate(e.pnames) if name in f64_params)
    return Lowered("\n".join(head + body) + "\n", fn, descriptors, low.reads, f64_scalars)


def source(traced, tma: bool = True, index64: bool | Collection[int] = False) -> str:
    """The generated source as a GPU launch with TMA-friendly tensors would run it (tensors under 2**31
    elements unless ``index64`` says otherwise)."""
    return generate(traced.ir, tma=tma, index64=index64).source
