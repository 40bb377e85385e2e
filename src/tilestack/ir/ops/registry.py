"""The op enum, the typed attributes, the registry of op definitions (``define``, ``opdef``) and of the
backends' emitters (``register_emitter``)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tilestack.errors import TraceError

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
    LOAD_SCALAR = "load_scalar"
    STORE = "store"
    ATOMIC_ADD = "atomic_add"
    RANGE = "range"
    # --- explicit hardware (opt-in; the reference runs them synchronously, Triton's passes erase them) ------
    STAGES = "stages"
    ASYNC_LOAD = "async_load"
    WAIT_LOAD = "wait_load"
    MMA_ASYNC = "mma_async"
    MMA_WAIT = "mma_wait"
    TURN_WAIT = "turn_wait"
    TURN_PASS = "turn_pass"


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
class TurnAttrs:
    order: tuple[str, ...]      # the warp roles that take turns, in turn order (a ring: the last passes to the first)


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
