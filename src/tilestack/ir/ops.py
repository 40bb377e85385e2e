"""The IR's operations: one enum, and one definition per op holding everything about it.

    from tilestack.ir.ops import Op, opdef
    d = opdef("unary")                  # or opdef(Op.UNARY): the OpDef
    d.attrs                             # its typed attributes (UnaryAttrs(fn=...))
    d.rule(ins)                         # its shape and dtype rule (the verifier calls it; raises TraceError)
    d.reference(ins, srcs, machine)     # its meaning on float64 NumPy arrays (the reference executor runs it)
    d.cost(ins, counter)                # what it costs (FLOPs, global bytes)
    d.fns                               # the functions it takes (exp, exp2, ...), each with its reference

Adding an op touches one place here (its attrs, rule, reference and cost, in one block), the public function in
``tilestack.lang`` that records it, and one emitter per backend (``register_emitter`` in the backend's folder).
``tests/ir/test_registry.py`` fails if any op lacks one of them.

Each instruction is ``results = op(srcs..., attrs)``; the shape of ``srcs`` and ``results`` per op is in ``sig``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from tilestack.errors import BackendError, TraceError

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr


class Op(enum.Enum):
    # --- scalars (index arithmetic on sizes, block ids and loop counters; runtime floats) -----------------
    CONST = "const"
    ARG = "arg"
    DIM = "dim"
    BLOCK_ID = "block_id"
    NUM_BLOCKS = "num_blocks"
    SCALAR = "scalar"
    # --- tiles and vectors -------------------------------------------------------------------------------
    FILL = "fill"
    UNARY = "unary"
    BINARY = "binary"
    BROADCAST = "broadcast"
    CAST = "cast"
    TRANSPOSE = "transpose"
    REDUCE = "reduce"
    MASK = "mask"
    MMA = "mma"
    COMPARE = "compare"
    LOGIC = "logic"
    SELECT = "select"
    ARANGE = "arange"
    RAND = "rand"
    # --- memory and control ------------------------------------------------------------------------------
    LOAD = "load"
    STORE = "store"
    ATOMIC_ADD = "atomic_add"
    RANGE = "range"
    # --- explicit hardware (opt-in; the reference runs them synchronously, Triton's passes erase them) ------
    STAGES = "stages"
    ASYNC_LOAD = "async_load"
    WAIT_LOAD = "wait_load"
    MMA_ASYNC = "mma_async"
    MMA_WAIT = "mma_wait"


# ---- typed attributes ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NoAttrs:
    pass


@dataclasses.dataclass(frozen=True)
class ConstAttrs:
    value: int | float


@dataclasses.dataclass(frozen=True)
class ArgAttrs:
    index: int          # the kernel parameter's position
    name: str


@dataclasses.dataclass(frozen=True)
class AxisAttrs:
    axis: int           # a global's axis (dim) or a grid axis (block_id, num_blocks)


@dataclasses.dataclass(frozen=True)
class FnAttrs:
    fn: str             # one of the op's ``fns``


@dataclasses.dataclass(frozen=True)
class FillAttrs:
    value: int | float   # an int for integer and bool_ tiles (literal in generated source), else a float


@dataclasses.dataclass(frozen=True)
class BroadcastAttrs:
    fn: str             # add | sub | mul | div
    axis: str           # "row": v[r] applies to row r; "col": v[c] to column c


@dataclasses.dataclass(frozen=True)
class ReduceAttrs:
    fn: str             # max | min | sum
    axis: str           # "row" reduces each row (to one value per row), "col" each column


@dataclasses.dataclass(frozen=True)
class MaskAttrs:
    kind: str           # one of MASK_KINDS
    value: int | float  # what masked-off elements become (an int for integer tiles)


@dataclasses.dataclass(frozen=True)
class MmaAttrs:
    trans_a: bool
    trans_b: bool
    input_precision: str | None = None   # None: exact products ("ieee"); "tf32": operands rounded to tf32 first


@dataclasses.dataclass(frozen=True)
class RandAttrs:
    per_counter: int = 1   # uniforms per Philox counter: 1 (tl.rand), 4 (tl.rand4x), 8 (its words' 16-bit halves)


@dataclasses.dataclass(frozen=True)
class BroadcastingAttrs:
    """Element-wise ops with broadcasting: one axis per src, None for a tile of the result's shape (or a scalar),
    "row" for a vector v applied as v[r] to element (r, c), "col" for v[c]."""
    axes: tuple[str | None, ...]
    fn: str = ""        # compare and logic: one of the op's fns; select: none


@dataclasses.dataclass(frozen=True)
class AccessAttrs:
    via: str | None = None   # how a backend moves the tile, decided by its passes: "pointer" | "tma" (None: open)


@dataclasses.dataclass(frozen=True)
class RangeAttrs:
    stages: int | None = None    # pipelining stages asked of backends that pipeline loads
    flatten: bool = False        # a loop over tiles whose body loops: pipeline across both (Triton's flatten)


# ---- the definition of an op ---------------------------------------------------------------------------------------
KINDS = ("scalar", "arg", "tile", "effect", "loop")


@dataclasses.dataclass
class OpDef:
    """Everything about one op. ``kind`` says what it makes: ``scalar`` one index or float, ``arg`` a kernel
    argument, ``tile`` one tile or vector, ``effect`` nothing (a write to global memory), ``loop`` its carried
    values."""
    op: Op
    sig: str                                   # "(x) -> tile": operands and results, for readers
    kind: str
    attrs: type
    rule: Callable[[Instr], None]              # shape/dtype rule: raises TraceError naming what is wrong
    reference: Callable[[Instr, list, Any], Any]   # (ins, src values, machine) -> result (float64 for tiles)
    cost: Callable[[Instr, Any], None]         # (ins, counter): adds FLOPs and bytes to the counter
    fns: dict[str, Any] = dataclasses.field(default_factory=dict)   # fn name -> its reference (fn-taking ops)
    doc: str = ""

    @property
    def name(self) -> str:
        return self.op.value


OPS: dict[Op, OpDef] = {}
_BY_NAME: dict[str, OpDef] = {}


def define(d: OpDef) -> OpDef:
    if d.op in OPS:
        raise ValueError(f"op {d.name} is defined twice")
    if d.kind not in KINDS:
        raise ValueError(f"op {d.name}: kind {d.kind!r} is not one of {KINDS}")
    OPS[d.op] = _BY_NAME[d.name] = d
    return d


def opdef(op: Op | str) -> OpDef:
    """The definition of ``op`` (an Op or its name)."""
    d = OPS.get(op) if isinstance(op, Op) else _BY_NAME.get(op)
    if d is None:
        raise KeyError(f"no op named {op!r}; the ops are {sorted(_BY_NAME)}")
    return d


def make_attrs(op: Op, attrs) -> Any:
    """``attrs`` (a dict of field values or the typed object) as ``op``'s typed attributes."""
    cls = OPS[op].attrs
    if isinstance(attrs, cls):
        return attrs
    if not isinstance(attrs, dict):
        raise TypeError(f"{op.value}: attrs must be a {cls.__name__} or a dict, got {type(attrs).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(attrs) - names
    if unknown:
        raise TypeError(f"{op.value}: unknown attribute(s) {sorted(unknown)}; {cls.__name__} has {sorted(names)}")
    return cls(**attrs)


# ---- emitters: each backend registers, in its own folder, how it lowers each op ---------------------------------
@dataclasses.dataclass(frozen=True)
class Emitter:
    fn: Callable
    fns: frozenset[str] | None    # the op's functions it lowers (None: all of them, or the op takes none)


EMITTERS: dict[str, dict[Op, Emitter]] = {}


def register_emitter(backend: str, op: Op, fns: Iterable[str] | None = None) -> Callable:
    """Decorator: ``fn`` lowers ``op`` for ``backend`` (only the functions ``fns`` of it, if given)."""
    def deco(fn: Callable) -> Callable:
        table = EMITTERS.setdefault(backend, {})
        if op in table:
            raise ValueError(f"backend {backend}: op {op.value} has two emitters")
        table[op] = Emitter(fn, frozenset(fns) if fns is not None else None)
        return fn
    return deco


def lowerable(backend: str, ins: Instr) -> bool:
    e = EMITTERS.get(backend, {}).get(ins.op)
    if e is None:
        return False
    fn = getattr(ins.attrs, "fn", None)
    return e.fns is None or fn is None or fn in e.fns


def check_lowerable(backend: str, body) -> None:
    """TraceError at the first instruction of ``body`` (a Block) that ``backend`` has no emitter for."""
    for ins in body.walk():
        if not lowerable(backend, ins):
            fn = getattr(ins.attrs, "fn", None)
            what = f"{ins.op.value} (fn={fn})" if fn else ins.op.value
            raise TraceError(f"the {backend} backend cannot lower op {what}: it registers no emitter for it",
                             ins.where)


# ---- helpers of the rules ---------------------------------------------------------------------------------------
def _fail(ins: Instr, msg: str) -> None:
    raise TraceError(f"{ins.op.value}: {msg}", ins.where)


def _types():
    from tilestack.ir import types
    return types


def _tile(ins: Instr, v, what: str):
    t = _types()
    if not isinstance(v.type, t.TileType):
        _fail(ins, f"{what} must be a tile or vector, got {v.type}")
    return v.type


def _index(ins: Instr, v, what: str) -> None:
    if v.type != _types().INDEX:
        _fail(ins, f"{what} must be an index, got {v.type}")


def _fn(ins: Instr) -> None:
    fns = OPS[ins.op].fns
    if ins.attrs.fn not in fns:
        _fail(ins, f"unknown fn {ins.attrs.fn!r}; expected one of {tuple(fns)}")


def _arity(ins: Instr, *counts: int) -> None:
    if len(ins.srcs) not in counts:
        _fail(ins, f"takes {' or '.join(map(str, counts))} operands, got {len(ins.srcs)}")


def _same_shape(ins: Instr, v, what: str) -> None:
    if _tile(ins, v, what).shape != ins.result.type.shape:
        _fail(ins, f"{what} is a {v.type} but the result is a {ins.result.type}")


def _axis_of(ins: Instr, axis: str) -> None:
    if axis not in ("row", "col"):
        _fail(ins, f"axis must be 'row' or 'col', got {axis!r}")


def _no_rule(ins: Instr) -> None:
    return None


def access_of(ins: Instr) -> tuple:
    """(global value, tile shape, coordinate values) of a load, store, atomic add or async load."""
    if ins.op is Op.LOAD:
        return ins.srcs[0], ins.result.type.shape, ins.srcs[1:]
    if ins.op is Op.ASYNC_LOAD:
        return ins.srcs[2], ins.result.type.shape, ins.srcs[3:]
    return ins.srcs[0], ins.srcs[1].type.shape, ins.srcs[2:]


# ---- the counter protocol of cost rules (ir.cost implements it) ----------------------------------------------
# counter.flops(per_instance, mma=False)   FLOPs one instance does (counted once per program and loop trip)
# counter.memory(ins, key)                 global bytes a load / store / atomic add touches, as "read"/"written"
# counter.loop(ins)                        evaluate a loop body for every trip
def _free(ins: Instr, counter) -> None:
    return None


def _per_result_element(ins: Instr, counter) -> None:
    counter.flops(ins.result.type.numel)


# ---- scalars --------------------------------------------------------------------------------------------------------
def _fdiv(a, b):
    """True division, IEEE as on the GPU: x / 0 is inf or nan, not an exception."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.true_divide(a, b)
        return float(np.true_divide(float(a), float(b)))


def _fpow(a, b):
    """a ** b as the backends compute it: exp2(b log2(a)) (so a negative base gives NaN, a zero one 0 or inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp2(b * np.log2(a))


def _smin(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def _smax(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


# Scalar functions on ints (or int arrays: the cost analysis evaluates every program at once); f* on floats.
SCALAR_FNS: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "floordiv": lambda a, b: a // b, "cdiv": lambda a, b: -(-a // b), "mod": lambda a, b: a % b,
    "min": _smin, "max": _smax,
    "fadd": lambda a, b: a + b, "fmul": lambda a, b: a * b, "fdiv": _fdiv, "fpow": _fpow,
}


def _scalar_result(ins: Instr) -> None:
    if len(ins.results) != 1 or not isinstance(ins.result.type, _types().ScalarType):
        raise TraceError(f"{ins.op.value} must produce a scalar", ins.where)


define(OpDef(
    Op.CONST, "() -> scalar", "scalar", ConstAttrs, _scalar_result,
    lambda ins, s, m: ins.attrs.value, _free, doc="A compile-time number."))
define(OpDef(
    Op.ARG, "() -> global | scalar", "arg", ArgAttrs, _no_rule,
    lambda ins, s, m: m.arg(ins), _free, doc="Kernel argument ``index``."))


def _dim_rule(ins: Instr) -> None:
    _scalar_result(ins)
    _arity(ins, 1)
    g = ins.srcs[0].type
    if not isinstance(g, _types().GlobalType) or not 0 <= ins.attrs.axis < g.rank:
        _fail(ins, f"reads axis {ins.attrs.axis} of a {g}")


define(OpDef(
    Op.DIM, "(global) -> index", "scalar", AxisAttrs, _dim_rule,
    lambda ins, s, m: m.dim(ins), _free, doc="A global's size on ``axis``."))


def _grid_axis_rule(ins: Instr) -> None:
    _scalar_result(ins)
    if ins.attrs.axis not in (0, 1, 2):
        _fail(ins, f"grid axis must be 0, 1 or 2, got {ins.attrs.axis!r}")


define(OpDef(
    Op.BLOCK_ID, "() -> index", "scalar", AxisAttrs, _grid_axis_rule,
    lambda ins, s, m: m.block_id(ins.attrs.axis), _free, doc="This program's index on grid axis ``axis``."))
define(OpDef(
    Op.NUM_BLOCKS, "() -> index", "scalar", AxisAttrs, _grid_axis_rule,
    lambda ins, s, m: m.num_blocks(ins.attrs.axis), _free, doc="The grid's size on ``axis``."))


def _scalar_rule(ins: Instr) -> None:
    _scalar_result(ins)
    _fn(ins)
    _arity(ins, 2)


def _scalar_ref(ins: Instr, s: list, m):
    """Index arithmetic exactly; float arithmetic in f32, each operand converted to f32 first, as the backends
    compute it: a runtime float is an f32 argument, an index meeting a float is converted to f32, and Triton's (and
    Gluon's) scalar float math runs in f32, so ``(a + 3.0) + 3.0`` at a = 1e8 is 1e8, and ``N * 3.0`` at
    N = 2**24 + 1 is 50331648 (float64 would give 100000006 and 50331651, each rounding to another f32).
    An index past 64 bits (``a * b`` of two int arguments near 2**40) wraps to i64 as the backends' 64-bit index
    arithmetic does, rather than growing into a Python int no tile or NumPy array can take."""
    if ins.result.type != _types().FLOAT:
        r = SCALAR_FNS[ins.attrs.fn](s[0], s[1])
        if isinstance(r, int) and not -2**63 <= r < 2**63:
            r = (r + 2**63) % 2**64 - 2**63
        return r
    with np.errstate(all="ignore"):   # (the cost analysis passes arrays: every program's value at once)
        a, b = (np.asarray(x, dtype=np.float32) for x in s)
        r = np.asarray(SCALAR_FNS[ins.attrs.fn](a, b), dtype=np.float32).astype(np.float64)
    return float(r) if r.ndim == 0 else r


define(OpDef(
    Op.SCALAR, "(a, b) -> scalar", "scalar", FnAttrs, _scalar_rule, _scalar_ref, _free, fns=SCALAR_FNS,
    doc="Index arithmetic (floor division and remainder as Python's); float arithmetic (f*, and sub with a float) "
        "in f32."))


# ---- tiles and vectors ----------------------------------------------------------------------------------------------
def _tile_result(ins: Instr) -> None:
    if len(ins.results) != 1 or not isinstance(ins.result.type, _types().TileType):
        raise TraceError(f"{ins.op.value} must produce one tile", ins.where)


def _fill_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 0)


define(OpDef(
    Op.FILL, "() -> tile", "tile", FillAttrs, _fill_rule,
    lambda ins, s, m: np.full(ins.result.type.shape, ins.attrs.value), _free,
    doc="Every element = ``value``."))

# ---- integer work ---------------------------------------------------------------------------------------------------
# Integer tiles hold their dtype's values exactly (the reference keeps them in int64). Element-wise integer work and
# integer reductions run in ``work_dtype``: i64 if an operand or an integer result is i64, else i32; add, sub, mul,
# neg, abs, sums and shifts left wrap at that width (two's complement), as C's and Triton's do. A scalar operand
# (a constant or an index) is first converted to the work dtype. div and rem truncate toward zero (C's / and %,
# Triton's // and % on integers: -7 div 2 is -3, -7 rem 2 is -1); a division by zero is undefined (the GPU's and
# C's are). shr shifts signed values arithmetically (the sign fills in, as Python's >>); a shift by a count outside
# [0, bits of the work dtype) is undefined.
def work_dtype(ins: Instr):
    """The dtype element-wise op or reduction ``ins`` computes in: ``compute_dtype`` of its tile operands' dtypes
    and, when it is an integer, its result's (an i32 sum into an i64 vector adds in i64). A select (where) chooses in
    its result's integer dtype, or in f64 if its result or a tile operand is f64, else in f32."""
    t = _types()
    dts = [s.type.dtype for s in ins.srcs if isinstance(s.type, t.TileType)]
    r = ins.result.type.dtype
    if ins.op is Op.SELECT:   # chooses into its result: an integer result's own dtype, a float one in f32 or f64
        return r if not r.is_float else t.f64 if t.f64 in (r, *dts) else t.f32
    if not r.is_float and r is not t.bool_:
        dts.append(r)
    return t.compute_dtype(*dts)


def _int_operand(x, wd):
    """An operand of integer work: a tile as is (int64), a scalar converted to the work dtype ``wd`` (wrapping, as
    a C cast: the backends convert an index scalar to the work dtype before they use it)."""
    if isinstance(x, np.ndarray):
        return x
    return np.int64(_types().to_int(np.int64((int(x) + 2**63) % 2**64 - 2**63), wd))


def _in_work_dtype(ins: Instr, x):
    """A result computed in int64 (or float64), wrapped to the op's integer work dtype, or rounded to its float work
    dtype (an f32 result then converted to an f16 or integer dst rounds twice, as on the GPU: f32 work, then the
    conversion)."""
    wd = work_dtype(ins)
    return _types().round_to(x, wd) if wd.is_float else _types().to_int(x, wd)


def _int_args(ins: Instr, s: list) -> list:
    """Operands as the op's work dtype takes them: integer work converts scalars to it (wrapping); float work rounds
    integer operands (an i32 vector added to an f32 tile, an index scalar) to it, as the backends convert them."""
    wd = work_dtype(ins)
    return _float_args(s, wd) if wd.is_float else [_int_operand(x, wd) for x in s]


def _float_args(s: list, wd) -> list:
    """Integer operands (tiles, index scalars) of float work rounded to its dtype ``wd``; the rest as they are."""
    def is_int(x) -> bool:
        return (x.dtype.kind in "iu") if isinstance(x, np.ndarray) else \
            isinstance(x, int | np.integer) and not isinstance(x, bool)
    return [_types().round_to(x, wd) if is_int(x) else x for x in s]


UNARY_FNS: dict[str, Callable] = {
    "exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "abs": np.abs, "neg": np.negative,
    "relu": lambda x: np.maximum(x, 0), "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "sin": np.sin, "cos": np.cos,
}
INT_UNARY = ("abs", "neg", "relu")      # the unary functions of integer tiles (the others are float math)


def _unary_rule(ins: Instr) -> None:
    _tile_result(ins)
    _fn(ins)
    _arity(ins, 1)
    _same_shape(ins, ins.srcs[0], "x")
    dt = ins.srcs[0].type.dtype
    if dt.name == "bool" or (not dt.is_float and ins.attrs.fn not in INT_UNARY):
        _fail(ins, f"x is {dt}; expected a float dtype" + ("" if dt.name == "bool" else f" ({ins.attrs.fn} of "
              f"integers is not defined; {', '.join(INT_UNARY)} are)"))


define(OpDef(
    Op.UNARY, "(x) -> tile", "tile", FnAttrs, _unary_rule,
    lambda ins, s, m: _in_work_dtype(ins, UNARY_FNS[ins.attrs.fn](*_int_args(ins, s))), _per_result_element,
    fns=UNARY_FNS,
    doc="Element-wise ``fn(x)``, computed in float and rounded to the result's dtype (abs, neg and relu of an "
        "integer tile in its integer work dtype, wrapping)."))


def _is_int(a, b) -> bool:
    return np.result_type(a, b).kind in "iu"


def _div(a, b):
    """True division of floats; of integers, the quotient truncated toward zero (exact in int64: a - rem(a, b)
    is a multiple of b)."""
    if _is_int(a, b):
        return (a - np.fmod(a, b)) // np.where(b == 0, 1, b) * (b != 0)
    return np.divide(a, b)


def _int_only(fn: Callable) -> Callable:
    def ref(a, b):
        if not _is_int(a, b):
            raise TypeError(f"{fn.__name__} takes integers")
        return fn(a, b)
    return ref


BINARY_FNS: dict[str, Callable] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _div, "max": np.maximum, "min": np.minimum,
    "rem": np.fmod,          # the remainder of div: the sign of a (C's %, fmod, Triton's %)
    "bit_and": _int_only(np.bitwise_and), "bit_or": _int_only(np.bitwise_or), "bit_xor": _int_only(np.bitwise_xor),
    "shl": _int_only(np.left_shift), "shr": _int_only(np.right_shift),
}
INT_ONLY_FNS = ("bit_and", "bit_or", "bit_xor", "shl", "shr")    # binary functions of integer tiles only


def _binary_rule(ins: Instr) -> None:
    _tile_result(ins)
    _fn(ins)
    _arity(ins, 2)
    _same_shape(ins, ins.srcs[0], "a")
    b = ins.srcs[1].type
    if isinstance(b, _types().TileType):
        _same_shape(ins, ins.srcs[1], "b")
    elif not isinstance(b, _types().ScalarType):
        _fail(ins, f"b must be a tile or a scalar, got {b}")
    a = ins.srcs[0].type.dtype
    if a.name == "bool":
        _fail(ins, "a is a bool mask; expected numbers")
    if ins.attrs.fn in INT_ONLY_FNS and a.is_float:
        _fail(ins, f"{ins.attrs.fn} takes integer tiles; a is {a}")
    if not a.is_float and (b == _types().FLOAT or (isinstance(b, _types().TileType) and b.dtype.is_float)):
        _fail(ins, f"a is {a} but b is {getattr(b, 'dtype', b)}: integer work takes integer operands")


define(OpDef(
    Op.BINARY, "(a, b) -> tile  (b a tile, or a scalar broadcast)", "tile", FnAttrs, _binary_rule,
    lambda ins, s, m: _in_work_dtype(ins, BINARY_FNS[ins.attrs.fn](*_int_args(ins, s))), _per_result_element,
    fns=BINARY_FNS,
    doc="Element-wise ``fn(a, b)``: floats in float, integers in their work dtype (wrapping; div and rem "
        "truncate toward zero)."))

BROADCAST_FNS = {k: BINARY_FNS[k] for k in ("add", "sub", "mul", "div", "max", "min")}


def _broadcast_rule(ins: Instr) -> None:
    _tile_result(ins)
    _fn(ins)
    _arity(ins, 2)
    _axis_of(ins, ins.attrs.axis)
    _same_shape(ins, ins.srcs[0], "x")
    x, v = ins.srcs[0].type, _tile(ins, ins.srcs[1], "v")
    want = (x.shape[0] if ins.attrs.axis == "row" else x.shape[1],) if not x.is_vec else None
    if v.shape != want:
        _fail(ins, f"v is a {v} and does not broadcast along the {ins.attrs.axis}s of a {x}")


def _broadcast_ref(ins: Instr, s: list, m) -> np.ndarray:
    s = _int_args(ins, s)
    vec = s[1][:, None] if ins.attrs.axis == "row" else s[1][None, :]
    return _in_work_dtype(ins, BROADCAST_FNS[ins.attrs.fn](s[0], vec))


define(OpDef(
    Op.BROADCAST, "(x, v) -> tile", "tile", BroadcastAttrs, _broadcast_rule, _broadcast_ref,
    _per_result_element, fns=BROADCAST_FNS, doc="``fn(x, v)`` with v[r] along row r (or v[c] along column c)."))


def _cast_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 1)
    _same_shape(ins, ins.srcs[0], "x")


define(OpDef(
    Op.CAST, "(x) -> tile", "tile", NoAttrs, _cast_rule, lambda ins, s, m: s[0], _free,
    doc="``x`` in the result's dtype and memory space (also register <-> shared copies)."))

def _transpose_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 1)
    x = _tile(ins, ins.srcs[0], "x")
    if x.is_vec or ins.result.type.shape != x.shape[::-1]:
        _fail(ins, f"the transpose of a {x} is not a {ins.result.type}")


define(OpDef(
    Op.TRANSPOSE, "(x) -> tile", "tile", NoAttrs, _transpose_rule, lambda ins, s, m: s[0].T, _free,
    doc="The 2-D tile ``x`` transposed (rows become columns), in the result's dtype and memory space."))

REDUCE_FNS: dict[str, tuple[Callable, Callable]] = {   # fn -> (reduction, combination with acc)
    "max": (np.max, np.maximum), "min": (np.min, np.minimum), "sum": (np.sum, np.add)}


def _reduce_rule(ins: Instr) -> None:
    _tile_result(ins)
    _fn(ins)
    _arity(ins, 1, 2)
    _axis_of(ins, ins.attrs.axis)
    x = _tile(ins, ins.srcs[0], "x")
    if x.is_vec:
        _fail(ins, f"x must be a 2-D tile, got {x}")
    want = (x.shape[0],) if ins.attrs.axis == "row" else (x.shape[1],)
    if ins.result.type.shape != want:
        _fail(ins, f"a {ins.attrs.axis} reduction of a {x} makes {want}, not {ins.result.type}")
    if len(ins.srcs) == 2:
        _same_shape(ins, ins.srcs[1], "acc")


def _reduce_ref(ins: Instr, s: list, m) -> np.ndarray:
    red, comb = REDUCE_FNS[ins.attrs.fn]
    wd = work_dtype(ins)
    if wd.is_float:   # integer operands of float work (an i64 tile summed with an f32 acc) in its dtype first
        s = _float_args(s, wd)
    x = s[0] if wd.is_float else np.asarray(s[0], dtype=np.int64)   # (an integer sum wraps, a float's stays exact)
    r = red(x, axis=1 if ins.attrs.axis == "row" else 0)
    return _in_work_dtype(ins, comb(r, s[1]) if len(s) > 1 else r)


define(OpDef(
    Op.REDUCE, "(x[, acc]) -> vec", "tile", ReduceAttrs, _reduce_rule, _reduce_ref,
    lambda ins, c: c.flops(ins.srcs[0].type.numel), fns=REDUCE_FNS,
    doc="``fn`` over each row (or column) of x, combined with acc if given."))

# Masks keep x where a condition on the element's (row, col) inside the tile holds, else write ``value``:
#   tril: col - row <= k     triu: col - row >= k     right_fill: col < k (keeps the left k columns)
#   lower_fill: row < k (keeps the upper k rows)
MASK_KINDS: dict[str, Callable] = {
    "tril": lambda rows, cols, k: cols - rows <= k, "triu": lambda rows, cols, k: cols - rows >= k,
    "right_fill": lambda rows, cols, k: cols + 0 * rows < k, "lower_fill": lambda rows, cols, k: rows + 0 * cols < k,
}


def _mask_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 2)
    if ins.attrs.kind not in MASK_KINDS:
        _fail(ins, f"unknown kind {ins.attrs.kind!r}; expected one of {tuple(MASK_KINDS)}")
    _same_shape(ins, ins.srcs[0], "x")
    if ins.result.type.is_vec:
        _fail(ins, f"masks a 2-D tile, got {ins.result.type}")
    _index(ins, ins.srcs[1], "k")


def _mask_ref(ins: Instr, s: list, m) -> np.ndarray:
    r, c = ins.result.type.shape
    keep = MASK_KINDS[ins.attrs.kind](np.arange(r)[:, None], np.arange(c)[None, :], s[1])
    return np.where(keep, s[0], ins.attrs.value)


define(OpDef(
    Op.MASK, "(x, k) -> tile", "tile", MaskAttrs, _mask_rule, _mask_ref, _free,
    doc="x where the kind's condition on (row, col) and k holds, else ``value``."))
MMA_INPUTS = ("bf16", "f16", "f32", "f8e4m3")   # f8e4m3: the fp8 tensor cores (tilestack.quant)
# How the matrix units read f32 operands: exactly (None, Triton's "ieee": the CUDA cores) or rounded to tf32 (the
# tensor cores: 8-bit exponent, 10-bit mantissa). bf16, f16 and f8 operands fit tf32 already: the same either way.
MMA_PRECISIONS = (None, "tf32")
TF32_DROPPED_BITS = 13                          # f32 keeps 23 mantissa bits, tf32 10


def round_tf32(x) -> np.ndarray:
    """Values rounded to tf32 (f32's exponent, 10 mantissa bits), round-to-nearest-even on the f32 bit pattern,
    as float64. NaN stays NaN; a value past tf32's largest rounds to infinity."""
    x32 = np.asarray(x, dtype=np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)
    half = np.uint64((1 << (TF32_DROPPED_BITS - 1)) - 1)
    low = np.uint64(TF32_DROPPED_BITS)
    rounded = ((bits + half + ((bits >> low) & np.uint64(1))) >> low) << low
    out = (rounded & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
    return np.where(np.isnan(x32), np.nan, out)


def _mma_dims(ins: Instr) -> tuple[int, int, int, int]:
    """(m, k of a, k of b, n) of an mma."""
    a, b = ins.srcs[1].type.shape, ins.srcs[2].type.shape
    m, ka = (a[1], a[0]) if ins.attrs.trans_a else a
    kb, n = (b[1], b[0]) if ins.attrs.trans_b else b
    return m, ka, kb, n


def _mma_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 3)
    acc, a, b = (_tile(ins, v, w) for v, w in zip(ins.srcs, ("acc", "a", "b"), strict=True))
    if any(t.is_vec for t in (acc, a, b, ins.result.type)):
        _fail(ins, "multiplies 2-D tiles")
    if a.dtype != b.dtype or a.dtype.name not in MMA_INPUTS:
        _fail(ins, f"a is {a.dtype} and b is {b.dtype}; expected both of one of {MMA_INPUTS}")
    if acc.dtype.name != "f32" or ins.result.type.dtype.name != "f32":
        _fail(ins, f"accumulates in f32; acc is {acc.dtype} and the result {ins.result.type.dtype}")
    m, ka, kb, n = _mma_dims(ins)
    if ka != kb or acc.shape != (m, n) or ins.result.type.shape != (m, n):
        _fail(ins, f"op(a) is ({m}, {ka}), op(b) is ({kb}, {n}), acc {acc.shape}, result {ins.result.type.shape}")
    if ins.attrs.input_precision not in MMA_PRECISIONS:
        _fail(ins, f"input_precision is {ins.attrs.input_precision!r}; expected one of {MMA_PRECISIONS}")


def _mma_ref(ins: Instr, s: list, m) -> np.ndarray:
    acc, x, y = s
    if ins.attrs.input_precision == "tf32":
        x, y = round_tf32(x), round_tf32(y)
    x = x.T if ins.attrs.trans_a else x
    y = y.T if ins.attrs.trans_b else y
    return acc + x @ y


def _mma_cost(ins: Instr, c) -> None:
    m, k, _, n = _mma_dims(ins)
    c.flops(2 * m * n * k, mma=True)


define(OpDef(
    Op.MMA, "(acc, a, b) -> acc + op(a) @ op(b)", "tile", MmaAttrs, _mma_rule, _mma_ref, _mma_cost,
    doc="Matrix product on the matrix units, accumulated in f32 (the product exact, in float64, then rounded; "
        "with input_precision tf32 the operands are rounded to tf32 first)."))

COMPARE_FNS: dict[str, Callable] = {"lt": np.less, "le": np.less_equal, "gt": np.greater,
                                    "ge": np.greater_equal, "eq": np.equal, "ne": np.not_equal}
LOGIC_FNS: dict[str, Callable] = {"and": np.logical_and, "or": np.logical_or, "not": np.logical_not}


def _broadcasting_rule(ins: Instr) -> None:
    """Operands broadcast to the result by their axes; masks are bool."""
    _tile_result(ins)
    t = _types()
    out, axes = ins.result.type, ins.attrs.axes
    if ins.op is not Op.SELECT:
        _fn(ins)
    arity = {Op.COMPARE: 2, Op.LOGIC: 1 if ins.attrs.fn == "not" else 2, Op.SELECT: 3}[ins.op]
    if len(ins.srcs) != arity or len(axes) != len(ins.srcs):
        _fail(ins, f"{len(ins.srcs)} operands and axes {axes!r}")
    if (out.dtype is t.bool_) != (ins.op is not Op.SELECT):
        _fail(ins, f"makes a {out}; compare and logic make bool masks, select numbers")
    for k, (s, ax) in enumerate(zip(ins.srcs, axes, strict=True)):
        is_mask = ins.op is Op.LOGIC or (ins.op is Op.SELECT and k == 0)
        if isinstance(s.type, t.ScalarType):
            if ax is not None or is_mask:
                _fail(ins, f"operand {k} is a scalar where a tile is needed")
            continue
        want = out.shape if ax is None else (out.shape[0] if ax == "row" else out.shape[1],)
        if ax not in (None, "row", "col") or (ax is not None and out.is_vec) or s.type.shape != want:
            _fail(ins, f"operand {k} is a {s.type} on axis {ax}; it does not broadcast to {out}")
        if (s.type.dtype is t.bool_) != is_mask:
            _fail(ins, f"operand {k} is {s.type.dtype}; "
                       f"{'a mask must be bool' if is_mask else 'values must not be bool'}")


def _along(ins: Instr, s: list) -> list:
    """Each operand as its axis says: a tile (or scalar) as is, a vector along rows or columns."""
    return [x if ax is None else (x[:, None] if ax == "row" else x[None, :])
            for x, ax in zip(s, ins.attrs.axes, strict=True)]


def _compare_ref(ins: Instr, s: list, m) -> np.ndarray:
    wd = work_dtype(ins)
    if wd.is_float:   # an integer tile compared with a float one is converted to the float work dtype first
        s = _float_args(s, wd)
    return np.broadcast_to(COMPARE_FNS[ins.attrs.fn](*_along(ins, s)), ins.result.type.shape)


define(OpDef(
    Op.COMPARE, "(a, b) -> bool tile", "tile", BroadcastingAttrs, _broadcasting_rule, _compare_ref,
    _free, fns=COMPARE_FNS, doc="A mask: ``a fn b`` element-wise, operands broadcast by their axes, compared in "
                                "their work dtype (an i32 tile against an f32 one in f32, as the GPU compares)."))
define(OpDef(
    Op.LOGIC, "(a[, b]) -> bool tile", "tile", BroadcastingAttrs, _broadcasting_rule,
    lambda ins, s, m: np.broadcast_to(LOGIC_FNS[ins.attrs.fn](*(np.asarray(x) != 0 for x in _along(ins, s))),
                                      ins.result.type.shape),
    _free, fns=LOGIC_FNS, doc="Masks combined: and, or, not."))


def _select_ref(ins: Instr, s: list, m) -> np.ndarray:
    dt = ins.result.type.dtype
    if not dt.is_float:   # into an integer result, each value is converted to it first (no float detour past 2**53)
        s = [s[0]] + [_types().to_int(x, dt) for x in s[1:]]
    mask, a, b = _along(ins, s)
    return np.broadcast_to(np.where(np.asarray(mask) != 0, a, b), ins.result.type.shape)


define(OpDef(
    Op.SELECT, "(mask, a, b) -> tile", "tile", BroadcastingAttrs, _broadcasting_rule, _select_ref, _free,
    doc="a where mask else b, operands broadcast by their axes; into an integer result, a and b are each "
        "converted to its dtype first (floats truncated and saturated), so integers past 2**24 stay exact."))


def _arange_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 1)
    if not ins.result.type.is_vec or ins.srcs[0].type != _types().INDEX:
        _fail(ins, "arange makes a vector from an index start")


define(OpDef(
    Op.ARANGE, "(start) -> vec", "tile", NoAttrs, _arange_rule,
    lambda ins, s, m: s[0] + np.arange(ins.result.type.shape[0]), _free, doc="start + k at element k."))


# Counter-based random numbers: Philox 4x32-10 as Triton's ``tl.rand`` computes it, bit for bit, so a kernel's
# random tile is the same on every backend. The key is the 64-bit seed (low word k0, high word k1); the counter of
# an element is a 64-bit int (low word c0, high word c1, c2 = c3 = 0); the first output word, as a signed int32
# folded to >= 0 (x < 0 -> -x - 1), times 4.6566127342e-10 in f32 is the uniform float in [0, 1).
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)       # added to (k0, k1) after each round
PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)     # the multipliers of c0 and c2
PHILOX_ROUNDS = 10
UINT32_TO_UNIFORM = np.float32(4.6566127342e-10)   # the largest f32 with (2**31 - 1) * it < 1 after rounding
_U32 = np.uint64(0xFFFFFFFF)


HALF_TO_UNIFORM = np.float32(2.0**-16)   # a 16-bit half h as the uniform h / 65536 (exact in f32)


def philox_uniform(seed: int, counters, per_counter: int = 1) -> np.ndarray:
    """Uniform f32 in [0, 1) for each 64-bit counter (an int array, wrapped to 64 bits) under key ``seed``:
    the bits of Triton's ``tl.rand(seed, counters)`` with int64 counters. ``per_counter=4``: ``tl.rand4x``'s
    four, stacked on a new first axis; ``per_counter=8``: the 16-bit halves of ``tl.randint4x``'s words over
    65536 (multiples of 2**-16: the four low halves, then the four high ones), stacked on a new first axis."""
    words = philox_words(seed, counters)
    if per_counter == 8:
        return np.concatenate([words & 0xFFFF, words >> 16]).astype(np.float32) * HALF_TO_UNIFORM
    x = words[:per_counter].view(np.int32)
    x = np.where(x < 0, np.invert(x), x)     # -x - 1 without the overflow at -2**31
    u = x.astype(np.float32) * UINT32_TO_UNIFORM
    return u[0] if per_counter == 1 else u


def philox_word(seed: int, counters) -> np.ndarray:
    """Philox 4x32-10's first output word (uint32) for counters (c0, c1) = the 64-bit counter's (low, high)
    words, c2 = c3 = 0, and key (k0, k1) = the seed's (low, high) words: Triton's ``tl.randint``."""
    return philox_words(seed, counters)[0]


def philox_words(seed: int, counters) -> np.ndarray:
    """All four output words (uint32, stacked on a new first axis) of ``philox_word``: ``tl.randint4x``."""
    ctr = np.asarray(counters).astype(np.uint64)
    c0, c1 = ctr & _U32, ctr >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    seed = int(seed) % 2**64
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    ra, rb = (np.uint64(x) for x in PHILOX_ROUND)
    for _ in range(PHILOX_ROUNDS):   # products of two 32-bit words fit in uint64: hi = p >> 32, lo = p & mask
        pa, pb = ra * c0, rb * c2
        c0, c2, c1, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0, (pa >> np.uint64(32)) ^ c3 ^ k1, pb & _U32, pa & _U32)
        k0 = np.uint64((int(k0) + PHILOX_KEY[0]) & 0xFFFFFFFF)
        k1 = np.uint64((int(k1) + PHILOX_KEY[1]) & 0xFFFFFFFF)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def rand_counters(shape: tuple[int, ...], offset: int, row: int, col: int, stride: int) -> np.ndarray:
    """The rand op's counters: ``offset + (row + r) * stride + col + c`` for element (r, c) of a tile (a vector
    is one row: ``offset + row * stride + col + k``), wrapped to 64 bits as int64 arithmetic on the GPU. (With
    n uniforms per counter, the op asks for the counters of a tile 1/n as wide, from col // n.)"""
    wrap = [np.uint64(int(x) % 2**64) for x in (offset, row, col, stride)]
    offset, row, col, stride = wrap
    cols = np.arange(shape[-1], dtype=np.uint64)
    rows = np.arange(shape[0], dtype=np.uint64)[:, None] if len(shape) == 2 else np.uint64(0)
    with np.errstate(over="ignore"):
        return offset + (row + rows) * stride + col + cols


RAND_PER_COUNTER = (1, 4, 8)


def _rand_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 5)
    if ins.result.type.dtype.name != "f32":
        _fail(ins, f"makes f32 uniforms (as Triton's tl.rand), not a {ins.result.type}")
    for v, what in zip(ins.srcs, ("seed", "offset", "row", "col", "stride"), strict=True):
        _index(ins, v, what)
    n = ins.attrs.per_counter
    if n not in RAND_PER_COUNTER or ins.result.type.shape[-1] % n:
        _fail(ins, f"per_counter={n} for a {ins.result.type}; expected one of {RAND_PER_COUNTER}, dividing its width")


def _rand_ref(ins: Instr, s: list, m) -> np.ndarray:
    seed, offset, row, col, stride = s
    shape, n = ins.result.type.shape, ins.attrs.per_counter
    if n == 1:
        return philox_uniform(seed, rand_counters(shape, offset, row, col, stride)).astype(np.float64)
    if int(col) % n:
        raise BackendError(f"{ins.where}: rand with per_counter={n} at col={int(col)}; a tile's first column must "
                           f"be a multiple of {n}")
    narrow = (*shape[:-1], shape[-1] // n)
    u = philox_uniform(seed, rand_counters(narrow, offset, row, int(col) // n, stride), n)   # (n, ..., C/n)
    return np.moveaxis(u, 0, -1).reshape(shape).astype(np.float64)      # column n*k + w: uniform w of counter k


define(OpDef(
    Op.RAND, "(seed, offset, row, col, stride) -> f32 tile", "tile", RandAttrs, _rand_rule, _rand_ref,
    _per_result_element,
    doc="Uniform floats in [0, 1): Philox 4x32-10 (Triton's tl.rand) under key ``seed`` at counter "
        "``offset + (row + r) * stride + col + c`` for element (r, c), in 64-bit arithmetic. With per_counter "
        "n = 4 (tl.rand4x) or 8 (tl.randint4x's 16-bit halves / 65536), a 1/n of the work, element (r, c) is "
        "uniform (col + c) % n of counter ``offset + (row + r) * stride + (col + c) // n``; col must be a "
        "multiple of n."))


# ---- memory and control -----------------------------------------------------------------------------------------
def _access_rule(ins: Instr, g, tile, coords) -> None:
    t = _types()
    if not isinstance(g.type, t.GlobalType):
        _fail(ins, f"the first operand must be a global, got {g.type}")
    tt = _tile(ins, tile, "the tile")
    if len(coords) != g.type.rank or g.type.rank < len(tt.shape):
        _fail(ins, f"{len(coords)} coordinates for a {tt} in a {g.type}")
    for k, c in enumerate(coords):
        _index(ins, c, f"coordinate {k}")


def _load_rule(ins: Instr) -> None:
    _tile_result(ins)
    _access_rule(ins, ins.srcs[0], ins.result, ins.srcs[1:])


def _effect_rule(ins: Instr) -> None:
    if ins.results:
        raise TraceError(f"{ins.op.value} produces no value", ins.where)
    _access_rule(ins, ins.srcs[0], ins.srcs[1], ins.srcs[2:])


def _atomic_cost(ins: Instr, c) -> None:
    c.flops(c.memory(ins, "read"), per_instance=False)   # a read-modify-write of each element, and one add
    c.memory(ins, "written")


define(OpDef(
    Op.LOAD, "(global, *coords) -> tile", "tile", AccessAttrs, _load_rule, lambda ins, s, m: m.load(ins, s),
    lambda ins, c: c.memory(ins, "read"),
    doc="A tile of a global at tile coordinates (trailing coords count whole tiles); zeros past the edges."))
define(OpDef(
    Op.STORE, "(global, tile, *coords) -> ()", "effect", AccessAttrs, _effect_rule,
    lambda ins, s, m: m.store(ins, s, add=False), lambda ins, c: c.memory(ins, "written"),
    doc="Write a tile into a global; what hangs past the edges is dropped."))
define(OpDef(
    Op.ATOMIC_ADD, "(global, tile, *coords) -> ()", "effect", AccessAttrs, _effect_rule,
    lambda ins, s, m: m.store(ins, s, add=True), _atomic_cost,
    doc="global += tile, atomically per element."))


def _range_rule(ins: Instr) -> None:
    body = ins.body
    if body is None or not body.args:
        _fail(ins, "a loop needs a body whose first argument is its index")
    carried, inits = body.args[1:], ins.srcs[3:]
    if any(s.type != _types().INDEX for s in ins.srcs[:3]):
        raise TraceError("range: start, stop and step must be indices", ins.where)
    if body.args[0].type != _types().INDEX or len(carried) != len(inits) != len(body.yields):
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
    t = _types()
    if len(ins.results) != 1 or not isinstance(ins.result.type, t.StagesType):
        raise TraceError(f"{ins.op.value} must produce one staged buffer", ins.where)
    return ins.result.type


def _stages_rule(ins: Instr) -> None:
    st = _stages_result(ins)
    _arity(ins, 0)
    if st.stages < 1 or len(st.shape) not in (1, 2):
        _fail(ins, f"a staged buffer has >= 1 stages of a 1-D or 2-D tile, got {st}")


define(OpDef(
    Op.STAGES, "() -> stages", "tile", NoAttrs, _stages_rule,
    lambda ins, s, m: np.full((ins.result.type.stages, *ins.result.type.shape),
                              np.nan if ins.result.type.dtype.is_float else 0), _free,
    doc="A multi-stage shared buffer, its stages unwritten (NaN in the reference: a read before a load shows)."))


def _async_load_rule(ins: Instr) -> None:
    st = _stages_result(ins)
    if len(ins.srcs) < 3 or ins.srcs[0].type != st:
        _fail(ins, f"takes (buffer, stage, global, *coords) and makes the buffer's next version ({st})")
    _index(ins, ins.srcs[1], "the stage")
    t = _types()
    g, coords = ins.srcs[2], ins.srcs[3:]
    if not isinstance(g.type, t.GlobalType) or len(coords) != g.type.rank or g.type.rank < len(st.shape):
        _fail(ins, f"{len(coords)} coordinates for a {st.stage} in a {g.type}")
    for k, c in enumerate(coords):
        _index(ins, c, f"coordinate {k}")


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
    _tile_result(ins)
    _arity(ins, 2)
    st = ins.srcs[0].type
    if not isinstance(st, _types().StagesType) or ins.result.type != st.stage:
        _fail(ins, f"reads one stage ({getattr(st, 'stage', st)}) of a staged buffer, not {ins.result.type}")
    _index(ins, ins.srcs[1], "the stage")


define(OpDef(
    Op.WAIT_LOAD, "(stages, stage) -> shared tile", "tile", NoAttrs, _wait_load_rule,
    lambda ins, s, m: s[0][m.stage_index(ins, s[1])], _free,
    doc="Wait until the stage's async load has landed (an mbarrier wait on Hopper); the stage as a shared tile."))


def _mma_async_rule(ins: Instr) -> None:
    _mma_rule(ins)


define(OpDef(
    Op.MMA_ASYNC, "(acc, a, b) -> pending acc + op(a) @ op(b)", "tile", MmaAttrs, _mma_async_rule, _mma_ref,
    _mma_cost, doc="Issue an mma (wgmma on Hopper); its result may be read only by mma_wait or as the acc of the "
                   "next async mma."))


def _mma_wait_rule(ins: Instr) -> None:
    _tile_result(ins)
    _arity(ins, 1)
    _same_shape(ins, ins.srcs[0], "x")


define(OpDef(
    Op.MMA_WAIT, "(pending) -> tile", "tile", NoAttrs, _mma_wait_rule, lambda ins, s, m: s[0], _free,
    doc="Wait for the async mmas that made ``x``; the finished tile."))
