"""The tile ops: fills, element-wise work (float and integer), broadcasts, casts, transposes, reductions, masks,
matrix products, comparisons, selects and aranges."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tilestack.errors import TraceError
from tilestack.ir.ops.registry import (
    BroadcastAttrs,
    BroadcastingAttrs,
    FillAttrs,
    FnAttrs,
    MaskAttrs,
    MmaAttrs,
    NoAttrs,
    Op,
    OpDef,
    ReduceAttrs,
    define,
)
from tilestack.ir.ops.rules import (
    check_arity,
    check_axis,
    check_fn,
    check_index,
    check_same_shape,
    check_tile,
    cost_per_result_element,
    fail,
    free_cost,
    ir_types,
)

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr


# ---- tiles and vectors ----------------------------------------------------------------------------------------------
def tile_result(ins: Instr) -> None:
    if len(ins.results) != 1 or not isinstance(ins.result.type, ir_types().TileType):
        raise TraceError(f"{ins.op.value} must produce one tile", ins.where)


def _fill_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 0)


define(OpDef(
    Op.FILL, "() -> tile", "tile", FillAttrs, _fill_rule,
    lambda ins, s, m: np.full(ins.result.type.shape, ins.attrs.value), free_cost,
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
    its result's integer dtype, or in f64 if its result or a tile operand is f64, else in f32. A comparison of integer
    tiles with a float scalar runs in f32 (the tiles converted, as Triton promotes them)."""
    t = ir_types()
    dts = [s.type.dtype for s in ins.srcs if isinstance(s.type, t.TileType)]
    r = ins.result.type.dtype
    if ins.op is Op.SELECT:   # chooses into its result: an integer result's own dtype, a float one in f32 or f64
        return r if not r.is_float else t.f64 if t.f64 in (r, *dts) else t.f32
    if ins.op is Op.COMPARE and any(s.type == t.FLOAT for s in ins.srcs):
        dts.append(t.f32)     # integer tiles against a float scalar: in f32, as Triton's promotion and the GPU compare
    if not r.is_float and r is not t.bool_:
        dts.append(r)
    return t.compute_dtype(*dts)


def _int_operand(x, wd):
    """An operand of integer work: a tile as is (int64), a scalar converted to the work dtype ``wd`` (wrapping, as
    a C cast: the backends convert an index scalar to the work dtype before they use it)."""
    if isinstance(x, np.ndarray):
        return x
    return np.int64(ir_types().to_int(np.int64((int(x) + 2**63) % 2**64 - 2**63), wd))


def _in_work_dtype(ins: Instr, x):
    """A result computed in int64 (or float64), wrapped to the op's integer work dtype, or rounded to its float work
    dtype (an f32 result then converted to an f16 or integer dst rounds twice, as on the GPU: f32 work, then the
    conversion)."""
    wd = work_dtype(ins)
    return ir_types().round_to(x, wd) if wd.is_float else ir_types().to_int(x, wd)


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
    return [ir_types().round_to(x, wd) if is_int(x) else x for x in s]


UNARY_FNS: dict[str, Callable] = {
    "exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "abs": np.abs, "neg": np.negative,
    "relu": lambda x: np.maximum(x, 0), "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "sin": np.sin, "cos": np.cos,
}
INT_UNARY = ("abs", "neg", "relu")      # the unary functions of integer tiles (the others are float math)


def _unary_rule(ins: Instr) -> None:
    tile_result(ins)
    check_fn(ins)
    check_arity(ins, 1)
    check_same_shape(ins, ins.srcs[0], "x")
    dt = ins.srcs[0].type.dtype
    if dt.name == "bool" or (not dt.is_float and ins.attrs.fn not in INT_UNARY):
        fail(ins, f"x is {dt}; expected a float dtype" + ("" if dt.name == "bool" else f" ({ins.attrs.fn} of "
              f"integers is not defined; {', '.join(INT_UNARY)} are)"))


define(OpDef(
    Op.UNARY, "(x) -> tile", "tile", FnAttrs, _unary_rule,
    lambda ins, s, m: _in_work_dtype(ins, UNARY_FNS[ins.attrs.fn](*_int_args(ins, s))), cost_per_result_element,
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
    tile_result(ins)
    check_fn(ins)
    check_arity(ins, 2)
    check_same_shape(ins, ins.srcs[0], "a")
    b = ins.srcs[1].type
    if isinstance(b, ir_types().TileType):
        check_same_shape(ins, ins.srcs[1], "b")
    elif not isinstance(b, ir_types().ScalarType):
        fail(ins, f"b must be a tile or a scalar, got {b}")
    a = ins.srcs[0].type.dtype
    if a.name == "bool":
        fail(ins, "a is a bool mask; expected numbers")
    if ins.attrs.fn in INT_ONLY_FNS and a.is_float:
        fail(ins, f"{ins.attrs.fn} takes integer tiles; a is {a}")
    if not a.is_float and (b == ir_types().FLOAT or (isinstance(b, ir_types().TileType) and b.dtype.is_float)):
        fail(ins, f"a is {a} but b is {getattr(b, 'dtype', b)}: integer work takes integer operands")


define(OpDef(
    Op.BINARY, "(a, b) -> tile  (b a tile, or a scalar broadcast)", "tile", FnAttrs, _binary_rule,
    lambda ins, s, m: _in_work_dtype(ins, BINARY_FNS[ins.attrs.fn](*_int_args(ins, s))), cost_per_result_element,
    fns=BINARY_FNS,
    doc="Element-wise ``fn(a, b)``: floats in float, integers in their work dtype (wrapping; div and rem "
        "truncate toward zero)."))

BROADCAST_FNS = {k: BINARY_FNS[k] for k in ("add", "sub", "mul", "div", "max", "min")}


def _broadcast_rule(ins: Instr) -> None:
    tile_result(ins)
    check_fn(ins)
    check_arity(ins, 2)
    check_axis(ins, ins.attrs.axis)
    check_same_shape(ins, ins.srcs[0], "x")
    x, v = ins.srcs[0].type, check_tile(ins, ins.srcs[1], "v")
    want = (x.shape[0] if ins.attrs.axis == "row" else x.shape[1],) if not x.is_vec else None
    if v.shape != want:
        fail(ins, f"v is a {v} and does not broadcast along the {ins.attrs.axis}s of a {x}")


def _broadcast_ref(ins: Instr, s: list, m) -> np.ndarray:
    s = _int_args(ins, s)
    vec = s[1][:, None] if ins.attrs.axis == "row" else s[1][None, :]
    return _in_work_dtype(ins, BROADCAST_FNS[ins.attrs.fn](s[0], vec))


define(OpDef(
    Op.BROADCAST, "(x, v) -> tile", "tile", BroadcastAttrs, _broadcast_rule, _broadcast_ref,
    cost_per_result_element, fns=BROADCAST_FNS, doc="``fn(x, v)`` with v[r] along row r (or v[c] along column c)."))


def _cast_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 1)
    check_same_shape(ins, ins.srcs[0], "x")


define(OpDef(
    Op.CAST, "(x) -> tile", "tile", NoAttrs, _cast_rule, lambda ins, s, m: s[0], free_cost,
    doc="``x`` in the result's dtype and memory space (also register <-> shared copies)."))

def _transpose_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 1)
    x = check_tile(ins, ins.srcs[0], "x")
    if x.is_vec or ins.result.type.shape != x.shape[::-1]:
        fail(ins, f"the transpose of a {x} is not a {ins.result.type}")


define(OpDef(
    Op.TRANSPOSE, "(x) -> tile", "tile", NoAttrs, _transpose_rule, lambda ins, s, m: s[0].T, free_cost,
    doc="The 2-D tile ``x`` transposed (rows become columns), in the result's dtype and memory space."))

REDUCE_FNS: dict[str, tuple[Callable, Callable]] = {   # fn -> (reduction, combination with acc)
    "max": (np.max, np.maximum), "min": (np.min, np.minimum), "sum": (np.sum, np.add)}


def _reduce_rule(ins: Instr) -> None:
    tile_result(ins)
    check_fn(ins)
    check_arity(ins, 1, 2)
    check_axis(ins, ins.attrs.axis)
    x = check_tile(ins, ins.srcs[0], "x")
    if x.is_vec:
        fail(ins, f"x must be a 2-D tile, got {x}")
    want = (x.shape[0],) if ins.attrs.axis == "row" else (x.shape[1],)
    if ins.result.type.shape != want:
        fail(ins, f"a {ins.attrs.axis} reduction of a {x} makes {want}, not {ins.result.type}")
    if len(ins.srcs) == 2:
        check_same_shape(ins, ins.srcs[1], "acc")


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
    tile_result(ins)
    check_arity(ins, 2)
    if ins.attrs.kind not in MASK_KINDS:
        fail(ins, f"unknown kind {ins.attrs.kind!r}; expected one of {tuple(MASK_KINDS)}")
    check_same_shape(ins, ins.srcs[0], "x")
    if ins.result.type.is_vec:
        fail(ins, f"masks a 2-D tile, got {ins.result.type}")
    check_index(ins, ins.srcs[1], "k")


def _mask_ref(ins: Instr, s: list, m) -> np.ndarray:
    r, c = ins.result.type.shape
    keep = MASK_KINDS[ins.attrs.kind](np.arange(r)[:, None], np.arange(c)[None, :], s[1])
    return np.where(keep, s[0], ins.attrs.value)


define(OpDef(
    Op.MASK, "(x, k) -> tile", "tile", MaskAttrs, _mask_rule, _mask_ref, free_cost,
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


def mma_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 3)
    acc, a, b = (check_tile(ins, v, w) for v, w in zip(ins.srcs, ("acc", "a", "b"), strict=True))
    if any(t.is_vec for t in (acc, a, b, ins.result.type)):
        fail(ins, "multiplies 2-D tiles")
    if a.dtype != b.dtype or a.dtype.name not in MMA_INPUTS:
        fail(ins, f"a is {a.dtype} and b is {b.dtype}; expected both of one of {MMA_INPUTS}")
    if acc.dtype.name != "f32" or ins.result.type.dtype.name != "f32":
        fail(ins, f"accumulates in f32; acc is {acc.dtype} and the result {ins.result.type.dtype}")
    m, ka, kb, n = _mma_dims(ins)
    if ka != kb or acc.shape != (m, n) or ins.result.type.shape != (m, n):
        fail(ins, f"op(a) is ({m}, {ka}), op(b) is ({kb}, {n}), acc {acc.shape}, result {ins.result.type.shape}")
    if ins.attrs.input_precision not in MMA_PRECISIONS:
        fail(ins, f"input_precision is {ins.attrs.input_precision!r}; expected one of {MMA_PRECISIONS}")


def mma_ref(ins: Instr, s: list, m) -> np.ndarray:
    acc, x, y = s
    if ins.attrs.input_precision == "tf32":
        x, y = round_tf32(x), round_tf32(y)
    x = x.T if ins.attrs.trans_a else x
    y = y.T if ins.attrs.trans_b else y
    return acc + x @ y


def mma_cost(ins: Instr, c) -> None:
    m, k, _, n = _mma_dims(ins)
    c.flops(2 * m * n * k, mma=True)


define(OpDef(
    Op.MMA, "(acc, a, b) -> acc + op(a) @ op(b)", "tile", MmaAttrs, mma_rule, mma_ref, mma_cost,
    doc="Matrix product on the matrix units, accumulated in f32 (the product exact, in float64, then rounded; "
        "with input_precision tf32 the operands are rounded to tf32 first)."))

COMPARE_FNS: dict[str, Callable] = {"lt": np.less, "le": np.less_equal, "gt": np.greater,
                                    "ge": np.greater_equal, "eq": np.equal, "ne": np.not_equal}
LOGIC_FNS: dict[str, Callable] = {"and": np.logical_and, "or": np.logical_or, "not": np.logical_not}


def _broadcasting_rule(ins: Instr) -> None:
    """Operands broadcast to the result by their axes; masks are bool."""
    tile_result(ins)
    t = ir_types()
    out, axes = ins.result.type, ins.attrs.axes
    if ins.op is not Op.SELECT:
        check_fn(ins)
    arity = {Op.COMPARE: 2, Op.LOGIC: 1 if ins.attrs.fn == "not" else 2, Op.SELECT: 3}[ins.op]
    if len(ins.srcs) != arity or len(axes) != len(ins.srcs):
        fail(ins, f"{len(ins.srcs)} operands and axes {axes!r}")
    if (out.dtype is t.bool_) != (ins.op is not Op.SELECT):
        fail(ins, f"makes a {out}; compare and logic make bool masks, select numbers")
    for k, (s, ax) in enumerate(zip(ins.srcs, axes, strict=True)):
        is_mask = ins.op is Op.LOGIC or (ins.op is Op.SELECT and k == 0)
        if isinstance(s.type, t.ScalarType):
            if ax is not None or is_mask:
                fail(ins, f"operand {k} is a scalar where a tile is needed")
            continue
        want = out.shape if ax is None else (out.shape[0] if ax == "row" else out.shape[1],)
        if ax not in (None, "row", "col") or (ax is not None and out.is_vec) or s.type.shape != want:
            fail(ins, f"operand {k} is a {s.type} on axis {ax}; it does not broadcast to {out}")
        if (s.type.dtype is t.bool_) != is_mask:
            fail(ins, f"operand {k} is {s.type.dtype}; "
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
    free_cost, fns=COMPARE_FNS, doc="A mask: ``a fn b`` element-wise, operands broadcast by their axes, compared in "
                                "their work dtype (an i32 tile against an f32 one in f32, as the GPU compares)."))
define(OpDef(
    Op.LOGIC, "(a[, b]) -> bool tile", "tile", BroadcastingAttrs, _broadcasting_rule,
    lambda ins, s, m: np.broadcast_to(LOGIC_FNS[ins.attrs.fn](*(np.asarray(x) != 0 for x in _along(ins, s))),
                                      ins.result.type.shape),
    free_cost, fns=LOGIC_FNS, doc="Masks combined: and, or, not."))


def _select_ref(ins: Instr, s: list, m) -> np.ndarray:
    dt = ins.result.type.dtype
    if not dt.is_float:   # into an integer result, each value is converted to it first (no float detour past 2**53)
        s = [s[0]] + [ir_types().to_int(x, dt) for x in s[1:]]
    else:                 # an integer tile chosen into a float one: rounded once to the work dtype, as the backends
        s = [s[0]] + _float_args(s[1:], work_dtype(ins))   # convert it (np.where would make float64 of it first)
    mask, a, b = _along(ins, s)
    return np.broadcast_to(np.where(np.asarray(mask) != 0, a, b), ins.result.type.shape)


define(OpDef(
    Op.SELECT, "(mask, a, b) -> tile", "tile", BroadcastingAttrs, _broadcasting_rule, _select_ref, free_cost,
    doc="a where mask else b, operands broadcast by their axes; into an integer result, a and b are each "
        "converted to its dtype first (floats truncated and saturated), so integers past 2**24 stay exact."))


def _arange_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 1)
    if not ins.result.type.is_vec or ins.srcs[0].type != ir_types().INDEX:
        fail(ins, "arange makes a vector from an index start")


define(OpDef(
    Op.ARANGE, "(start) -> vec", "tile", NoAttrs, _arange_rule,
    lambda ins, s, m: s[0] + np.arange(ins.result.type.shape[0]), free_cost, doc="start + k at element k."))
