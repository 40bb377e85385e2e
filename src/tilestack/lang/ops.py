"""The tile-op vocabulary. Each op checks its operands' shapes, dtypes and memory spaces here, when traced,
and records one IR instruction; backends lower the instruction (one place per backend, by op name).

Destination first, as in ThunderKittens: ``mul(c, a, b)`` writes ``c = a * b``.

    zero(acc); load(q, Q, at=(b, h, i, 0)); mma_ABt(s, q, k, s); row_max(m, s, m); exp2(s, s)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

from tilestack.errors import MemorySpaceError, TileDTypeError, TileShapeError, TraceError
from tilestack.ir.ops import INT_ONLY_FNS, INT_UNARY, MMA_INPUTS, Op
from tilestack.ir.types import (
    DTYPES,
    FLOAT,
    Space,
    TileType,
    bool_,
    compute_dtype,
    f32,
    int_range,
)
from tilestack.lang.tiles import Scalar, Tile, TileSpec, _Transposed, as_index, as_scalar, plain
from tilestack.lang.trace import current, user_line, user_name

_MMA_INPUTS = tuple(DTYPES[n] for n in MMA_INPUTS)   # the mma op's rule (ir.ops), as tile dtypes


def _name(t) -> str:
    return user_name(t) or str(getattr(t, "type", t))


def _hint(t) -> str:
    """What a kernel author who passed ``t`` where a tile belongs most likely meant."""
    if isinstance(t, TileSpec):
        return f" (a tile type: declare the tile by calling it, {t!r}())"
    if t is None:   # `y = ts.exp(y, x)`: the op wrote y and returned None
        return (" (ts ops write their first argument, dst, and return None: after `ts.exp(y, x)` read y, not what "
                "the call returned)")
    if isinstance(t, _Transposed):
        return " (t.T is read by `@` and copy: transpose into a register tile of the swapped shape first, copy(u, t.T))"
    if isinstance(t, Scalar):   # copy(t, k): one run-time value where a tile belongs
        name = user_name(t) or "s"
        return f" (`{name}` is a Scalar, one value: ts.fill(t, {name}) writes it into every element of a tile t)"
    return ""


def _need_tile(opname: str, arg: str, t) -> Tile:
    if not isinstance(t, Tile):
        raise TraceError(f"{opname}: {arg} must be a tile or vector, got {type(t).__name__} {t!r}{_hint(t)}",
                         user_line())
    return t


def _need_operand(opname: str, arg: str, x) -> None:
    """A scalar operand: a Python number or a Scalar (tiles and marked vectors are taken before this)."""
    if isinstance(x, bool) or not isinstance(x, int | float | Scalar):
        raise TraceError(f"{opname}: {arg} must be a tile, a number or a Scalar, got {type(x).__name__} {x!r}"
                         f"{_hint(x)}", user_line())


def _need_reg(opname: str, arg: str, t: Tile) -> None:
    if t.space is not Space.REG:
        raise MemorySpaceError(
            f"{opname}: {arg} `{_name(t)}` is a {t.type}; {opname} works on register tiles and vectors: "
            f"copy or load it into a Reg{'Vec' if t.type.is_vec else 'Tile'} first", user_line())


def _need_float(opname: str, arg: str, t: Tile) -> None:
    if not t.dtype.is_float:
        raise TileDTypeError(f"{opname}: {arg} `{_name(t)}` is {t.dtype}; expected a float dtype", user_line())


def _write(dst: Tile, op: Op, srcs: tuple, result_shape: tuple[int, ...], opname: str, **attrs) -> None:
    """Record ``dst = op(srcs)``, after checking the result fits ``dst``."""
    where = user_line()
    if result_shape != dst.shape:
        tr = current(opname)
        carried = tr.loops and dst._value is not None and dst._value in tr.loops[-1].args.values()
        if carried:
            raise TileShapeError(
                f"{opname}: loop-carried tile `{_name(dst)}` is {dst.shape} when the loop at "
                f"{tr.loops[-1].where} starts, but this writes a {result_shape} result into it; "
                "a tile carried by a loop keeps its shape", where)
        raise TileShapeError(f"{opname}: the result is {result_shape} but dst `{_name(dst)}` is {dst.shape}",
                             where)
    ins = current(opname).emit(op, srcs, (dst.type,), where, hint=user_name(dst), **attrs)
    ins.result.buffer = dst.uid
    dst._value = ins.result


# ---- fills ------------------------------------------------------------------------------------------------
def fill(dst: Tile, value: float | Scalar) -> None:
    """Every element of ``dst`` = ``value`` (a whole number for an integer tile, False / True (or 0 / 1) for a bool_
    mask), or a Scalar known only at run time (a kernel argument, a loaded scalar) into a float or integer tile:
    the tile's additive identity plus the value (-0.0 for a float tile, so that a value of -0.0 keeps its sign),
    the value converted as ``add`` converts it."""
    _need_tile("fill", "dst", dst)
    value = plain(value)
    if isinstance(value, Scalar) and dst.dtype is not bool_:
        if value.type == FLOAT and not dst.dtype.is_float:
            raise TileDTypeError(f"fill: `{_name(dst)}` is {dst.dtype} and value is a float Scalar; an integer tile "
                                 "takes an integer value (fill a float tile, or pass an int)", user_line())
        fill(dst, -0.0 if dst.dtype.is_float else 0)
        add(dst, dst, value)
        return
    _write(dst, Op.FILL, (), dst.shape, "fill", value=_element_value("fill", dst, value))


def _element_value(opname: str, t: Tile, value) -> int | float:
    """``value`` as an element of tile ``t``: a float for a float tile, an int for an integer tile (which has no
    infinities or fractions) or a bool_ mask (0 or 1, or False or True)."""
    value = plain(value)
    if isinstance(value, bool) and t.dtype is bool_:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        hint = ("; a run-time Scalar fills a float or integer tile, not a bool_ mask (compare into it instead)"
                if opname == "fill" and isinstance(value, Scalar) else "")
        raise TraceError(f"{opname}: value must be a Python number (a compile-time constant), got "
                         f"{type(value).__name__} {value!r}{hint}", user_line())
    if t.dtype.is_float:
        return float(value)
    want = (0, 1) if t.dtype is bool_ else None
    lo, hi = int_range(t.dtype)
    if not math.isfinite(value) or value != int(value) or (want is not None and value not in want) or \
            not lo <= value <= hi:
        expected = "0 or 1" if want else f"a whole number in [{lo}, {hi}]"
        raise TileDTypeError(f"{opname}: `{_name(t)}` is {t.dtype}; value {value!r} does not fit, expected "
                             f"{expected}", user_line())
    return int(value)


def zero(dst: Tile) -> None:
    fill(dst, 0.0)


def one(dst: Tile) -> None:
    fill(dst, 1.0)


def neg_infty(dst: Tile) -> None:
    fill(dst, -math.inf)


def pos_infty(dst: Tile) -> None:
    fill(dst, math.inf)


# ---- element-wise unary ops and copies ---------------------------------------------------------------------
def _unary(fn: str, dst: Tile, src: Tile) -> None:
    _need_tile(fn, "dst", dst)
    _need_tile(fn, "src", src)
    _need_reg(fn, "src", src)
    _need_reg(fn, "dst", dst)
    if fn not in INT_UNARY or src.dtype is bool_:
        _need_float(fn, "src", src)
    if src.shape != dst.shape:
        raise TileShapeError(f"{fn}: src `{_name(src)}` is {src.shape} but dst `{_name(dst)}` is {dst.shape}",
                             user_line())
    _write(dst, Op.UNARY, (src.value(fn),), src.shape, fn, fn=fn)


def exp(dst, src): _unary("exp", dst, src)
def exp2(dst, src): _unary("exp2", dst, src)
def log(dst, src): _unary("log", dst, src)
def log2(dst, src): _unary("log2", dst, src)
def abs(dst, src): _unary("abs", dst, src)  # noqa: A001 - the ThunderKittens name
def neg(dst, src): _unary("neg", dst, src)
def relu(dst, src): _unary("relu", dst, src)
def sqrt(dst, src): _unary("sqrt", dst, src)
def rsqrt(dst, src): _unary("rsqrt", dst, src)
def sigmoid(dst, src): _unary("sigmoid", dst, src)
def sin(dst, src): _unary("sin", dst, src)
def cos(dst, src): _unary("cos", dst, src)


def copy(dst: Tile, src) -> None:
    """``dst = src`` converted to dst's dtype and memory space (register <-> shared, f32 -> bf16, ...).
    ``copy(dst, src.T)`` transposes a 2-D register or shared tile into the register tile ``dst`` (ThunderKittens'
    ``transpose_sep``): a (R, C) src into a (C, R) dst."""
    _need_tile("copy", "dst", dst)
    if isinstance(src, _Transposed):
        _transpose(dst, src.tile)
        return
    _need_tile("copy", "src", src)
    if src.shape != dst.shape:
        raise TileShapeError(f"copy: src `{_name(src)}` is {src.shape} but dst `{_name(dst)}` is {dst.shape}",
                             user_line())
    _write(dst, Op.CAST, (src.value("copy"),), src.shape, "copy")


def transpose(dst: Tile, src: Tile) -> None:
    """``dst = src^T``: a (R, C) register or shared tile into the (C, R) register tile ``dst`` (ThunderKittens'
    ``transpose_sep``); the same op as ``copy(dst, src.T)``."""
    _need_tile("transpose", "src", src)
    _transpose(dst, src)


def _transpose(dst: Tile, src) -> None:
    _need_tile("copy", "src of src.T", src)
    _need_reg("copy", "dst (of a transpose)", dst)
    for arg, t in (("dst", dst), ("src", src)):
        if t.type.is_vec:
            raise TileShapeError(f"copy: transposes 2-D tiles; {arg} `{_name(t)}` is a {t.type}", user_line())
    if dst.shape != src.shape[::-1]:
        raise TileShapeError(f"copy: src `{_name(src)}` is {src.shape}, so dst of its .T must be {src.shape[::-1]}; "
                             f"dst `{_name(dst)}` is {dst.shape}", user_line())
    _write(dst, Op.TRANSPOSE, (src.value("copy"),), dst.shape, "copy")


# ---- element-wise binary ops ------------------------------------------------------------------------------
# On float tiles the math runs in f32 (f64 for f64 tiles). On integer tiles it runs in integers (``ir.ops``'s
# integer work: i64 if a, b or dst is i64, else i32), wrapping as C's and the GPU's do; div and rem truncate toward
# zero (C's / and %); bit_and, bit_or, bit_xor, shl and shr (arithmetic) take integer tiles only. A number with
# an integer tile must be a whole number that fits the work dtype, signed or unsigned (0x9E3779B9 with an i32 tile
# is the i32 of the same bits, -1640531527); a shift count a constant in [0, bits).
_COMMUTING = ("add", "mul", "max", "min", "bit_and", "bit_or", "bit_xor")
_SUGAR_SYMBOLS = {"sub": "-", "div": "/"}   # a number on the left of a tile: 7.0 - k, 1.0 / k (Tile.__rsub__ ...)


def _scratch_name(*taken: str) -> str:
    """A name for the scratch tile of an error's recipe that is none of the user's tiles it names (`t` unless one
    of them is called `t`: "div(dst, t, t)" read as the user's own tile twice)."""
    return next(n for n in ("t", "tmp", "scratch", "tmp2") if n not in taken)


def _binary(fn: str, dst: Tile, a: Tile, b) -> None:
    """``dst = fn(a, b)`` with b a tile of a's shape, a number or Scalar, or (a 2-D a) a vector marked
    per_row(v) / per_col(v), which is the same op as ``{fn}_row`` / ``{fn}_col``. A marked vector, a number or a
    Scalar as ``a`` is taken with a tile ``b`` where the op commutes (add, mul, max, min, and the bitwise ones);
    elsewhere it is refused, saying how to write it."""
    a, b = plain(a), plain(b)
    if isinstance(a, _PerAxis):
        if fn in _COMMUTING and isinstance(b, Tile):
            a, b = b, a
        else:
            v = f"per_{a.axis}({_name(a.vec)})"
            bn = _name(b) if isinstance(b, Tile) else "b"
            t = _scratch_name(bn, _name(a.vec))
            raise TraceError(f"{fn}: a is {v}; a marked vector broadcasts as b (or as a with a tile b, for an op "
                             f"that commutes). Broadcast it into a tile first: zero({t}); add({t}, {t}, {v}); "
                             f"{fn}(dst, {t}, {bn})", user_line())
    if isinstance(b, Tile) and isinstance(a, int | float | Scalar) and not isinstance(a, bool):
        # A number or Scalar first, as one writes 7 - k (`sub(dst, 7.0, k)`): "a must be a tile" left the reader to
        # find the form. Ops that commute take it as b (as they take a marked vector); the others say how to write it.
        if fn in _COMMUTING:
            a, b = b, a
        else:
            shown, val = (f"the number {a!r}", repr(a)) if not isinstance(a, Scalar) else ("a Scalar", "a")
            t = _scratch_name(_name(b))
            recipe = f"zero({t}); add({t}, {t}, {val}); {fn}(dst, {t}, {_name(b)})"
            how = "broadcast it into a tile first: "
            if fn in _SUGAR_SYMBOLS and not isinstance(a, Scalar):
                how = f"write `{val} {_SUGAR_SYMBOLS[fn]} {_name(b)}` (operator sugar), or {how}"
            raise TraceError(f"{fn}: a is {shown} and b the tile `{_name(b)}`; {fn} takes a tile as a (a number or "
                             f"Scalar goes in b): {how}{recipe}", user_line())
    if isinstance(b, _PerAxis):
        if fn in INT_ONLY_FNS or fn == "rem":
            raise TraceError(f"{fn}: b is per_{b.axis}(...); {fn} takes a tile of a's shape or a scalar "
                             "(broadcast the vector into a tile first, e.g. with where or add_row on a zero tile)",
                             user_line())
        _broadcast(fn, b.axis, dst, a, b.vec)
        return
    for arg, t in (("dst", dst), ("a", a)):
        _need_tile(fn, arg, t)
        _need_reg(fn, arg, t)
    if dst.dtype is bool_:
        raise TileDTypeError(f"{fn}: dst `{_name(dst)}` is a bool_ mask; expected a tile of numbers", user_line())
    if a.dtype is bool_ or (fn in INT_ONLY_FNS and a.dtype.is_float):
        want = "an integer dtype" if fn in INT_ONLY_FNS else "numbers (copy a mask into a number tile first)"
        raise TileDTypeError(f"{fn}: a `{_name(a)}` is {a.dtype}; expected {want}", user_line())
    if not a.dtype.is_float and not isinstance(b, Tile):
        b = _int_scalar(fn, dst, a, b)
    if isinstance(b, Tile):
        _need_reg(fn, "b", b)
        if a.shape != b.shape:
            hint = ("; mark a vector per_row(v) or per_col(v) to broadcast it"
                    if b.type.is_vec and not a.type.is_vec else "")
            raise TileShapeError(f"{fn}: a `{_name(a)}` is {a.shape} but b `{_name(b)}` is {b.shape}{hint}",
                                 user_line())
        if a.dtype != b.dtype:
            raise TileDTypeError(f"{fn}: a `{_name(a)}` is {a.dtype} but b `{_name(b)}` is {b.dtype}; "
                                 "copy one into a tile of the other's dtype first", user_line())
        bv = b.value(fn)
    else:
        _need_operand(fn, "b", b)
        s = as_scalar(float(b) if isinstance(b, int | float) and a.dtype.is_float else b)
        bv = s.v
    _write(dst, Op.BINARY, (a.value(fn), bv), a.shape, fn, fn=fn)


def _int_scalar(fn: str, dst: Tile, a: Tile, b):
    """Scalar ``b`` of integer work on tile ``a``: an index Scalar, or a whole number that fits the work dtype
    (signed or unsigned; returned as the signed value of the same bits). A float is refused."""
    work = compute_dtype(a.dtype, *(() if dst.dtype.is_float else (dst.dtype,)))
    if isinstance(b, Scalar):
        if b.type == FLOAT:
            raise TileDTypeError(f"{fn}: a `{_name(a)}` is {a.dtype} and b is a float Scalar; integer tiles take "
                                 "integer operands (copy a into a float tile for float math)", user_line())
        return b
    if isinstance(b, bool) or not isinstance(b, int | float):
        raise TraceError(f"{fn}: b must be a tile, a number or a Scalar, got {type(b).__name__} {b!r}", user_line())
    lo, hi = int_range(work)
    bits = 8 * work.itemsize
    if isinstance(b, float) and not (math.isfinite(b) and b == int(b)):
        raise TileDTypeError(f"{fn}: a `{_name(a)}` is {a.dtype}; b = {b!r} is not a whole number (integer tiles "
                             "take integer operands; copy a into a float tile for float math)", user_line())
    b = int(b)
    if fn in ("shl", "shr") and not 0 <= b < bits:
        raise TraceError(f"{fn}: shift count {b} for {work} work; expected 0 <= count < {bits}", user_line())
    if fn in ("div", "rem") and b == 0:   # (undefined: the reference made 0, a GPU's quotient is not)
        raise TraceError(f"{fn}: b is the constant 0: an integer {fn} of `{_name(a)}` ({a.dtype}) by zero is "
                         "undefined; expected a nonzero divisor", user_line())
    if not lo <= b <= 2 * hi + 1:
        raise TileDTypeError(f"{fn}: b = {b} does not fit {work} (the work dtype of `{_name(a)}` {a.dtype}); "
                             f"expected a whole number in [{lo}, {2 * hi + 1}]", user_line())
    return b - 2 ** bits if b > hi else b


def add(dst, a, b): _binary("add", dst, a, b)
def sub(dst, a, b): _binary("sub", dst, a, b)
def mul(dst, a, b): _binary("mul", dst, a, b)


def div(dst, a, b):
    """``dst = a / b``: true division of floats; of integers, the quotient truncated toward zero (C's /)."""
    _binary("div", dst, a, b)


def max(dst, a, b): _binary("max", dst, a, b)  # noqa: A001
def min(dst, a, b): _binary("min", dst, a, b)  # noqa: A001


def rem(dst, a, b):
    """``dst = a - b * trunc(a / b)``: the remainder of ``div``, with the sign of a (C's % and fmod, Triton's %;
    not Python's %, which takes the sign of b): rem(-7, 2) is -1."""
    _binary("rem", dst, a, b)


def bit_and(dst, a, b): _binary("bit_and", dst, a, b)
def bit_or(dst, a, b): _binary("bit_or", dst, a, b)
def bit_xor(dst, a, b): _binary("bit_xor", dst, a, b)


def shl(dst, a, b):
    """``dst = a << b`` on integer tiles, wrapping at the work dtype's width (bits shifted out are lost)."""
    _binary("shl", dst, a, b)


def shr(dst, a, b):
    """``dst = a >> b`` on integer tiles, arithmetic: the sign bit fills in (as Python's >> and Triton's on signed
    integers). A logical shift of an i32 by s: ``shr(d, a, s); bit_and(d, d, (1 << (32 - s)) - 1)``."""
    _binary("shr", dst, a, b)


# ---- row / column broadcasts --------------------------------------------------------------------------------
def _broadcast(fn: str, axis: str, dst: Tile, src: Tile, vec: Tile) -> None:
    opname = f"{fn}_{axis}"
    for arg, t in (("dst", dst), ("src", src), ("vec", vec)):
        _need_tile(opname, arg, t)
        _need_reg(opname, arg, t)
    if src.type.is_vec or not vec.type.is_vec:
        raise TileShapeError(f"{opname}: takes a tile and a vector; got src {src.type}, vec {vec.type}",
                             user_line())
    want = src.shape[0] if axis == "row" else src.shape[1]
    if vec.shape[0] != want:
        what = "rows" if axis == "row" else "columns"
        raise TileShapeError(f"{opname}: src `{_name(src)}` {src.shape} has {want} {what} but vec "
                             f"`{_name(vec)}` has {vec.shape[0]} elements", user_line())
    _write(dst, Op.BROADCAST, (src.value(opname), vec.value(opname)), src.shape, opname, fn=fn, axis=axis)


def add_row(dst, src, vec): _broadcast("add", "row", dst, src, vec)
def sub_row(dst, src, vec): _broadcast("sub", "row", dst, src, vec)
def mul_row(dst, src, vec): _broadcast("mul", "row", dst, src, vec)
def div_row(dst, src, vec): _broadcast("div", "row", dst, src, vec)
def add_col(dst, src, vec): _broadcast("add", "col", dst, src, vec)
def sub_col(dst, src, vec): _broadcast("sub", "col", dst, src, vec)
def mul_col(dst, src, vec): _broadcast("mul", "col", dst, src, vec)
def div_col(dst, src, vec): _broadcast("div", "col", dst, src, vec)
def max_row(dst, src, vec): _broadcast("max", "row", dst, src, vec)
def min_row(dst, src, vec): _broadcast("min", "row", dst, src, vec)
def max_col(dst, src, vec): _broadcast("max", "col", dst, src, vec)
def min_col(dst, src, vec): _broadcast("min", "col", dst, src, vec)


# ---- reductions ------------------------------------------------------------------------------------------------
def _reduce(fn: str, axis: str, dst: Tile, src: Tile, acc: Tile | None) -> None:
    opname = f"{axis}_{fn}"
    for arg, t in (("dst", dst), ("src", src)) + ((("acc", acc),) if acc is not None else ()):
        _need_tile(opname, arg, t)
        _need_reg(opname, arg, t)
    if src.type.is_vec:   # (the whole vector's sum or max is a common want: say how to write it)
        n = src.shape[0]
        raise TileShapeError(f"{opname}: src `{_name(src)}` is a vector, {src.type}; reductions take a 2-D tile. To "
                             f"reduce a vector, make it the one row of a (1, {n}) tile, t = RegTile[{src.dtype}, 1, "
                             f"{n}](); zero(t); add(t, t, per_col({_name(src)})), then row_{fn}(dst, t) into a "
                             f"RegVec[..., 1]", user_line())
    out = (src.shape[0],) if axis == "row" else (src.shape[1],)
    if acc is not None and acc.shape != out:
        raise TileShapeError(f"{opname}: acc `{_name(acc)}` is {acc.shape}; expected {out}", user_line())
    srcs = (src.value(opname),) + ((acc.value(opname),) if acc is not None else ())
    _write(dst, Op.REDUCE, srcs, out, opname, fn=fn, axis=axis)


def row_max(dst, src, acc=None): _reduce("max", "row", dst, src, acc)
def row_min(dst, src, acc=None): _reduce("min", "row", dst, src, acc)
def row_sum(dst, src, acc=None): _reduce("sum", "row", dst, src, acc)
def col_max(dst, src, acc=None): _reduce("max", "col", dst, src, acc)
def col_min(dst, src, acc=None): _reduce("min", "col", dst, src, acc)
def col_sum(dst, src, acc=None): _reduce("sum", "col", dst, src, acc)


# ---- masks -------------------------------------------------------------------------------------------------------
def _mask(kind: str, dst: Tile, src: Tile, k, value: float) -> None:
    for arg, t in (("dst", dst), ("src", src)):
        _need_tile(kind, arg, t)
        _need_reg(kind, arg, t)
    if src.type.is_vec:
        raise TileShapeError(f"{kind}: src must be a tile, got {src.type}", user_line())
    _write(dst, Op.MASK, (src.value(kind), as_scalar(k).v), src.shape, kind, kind=kind,
           value=_element_value(kind, src, value))


def tril(dst, src, diagonal=0, value=0.0):
    """Keep elements with col - row <= diagonal, else ``value``."""
    _mask("tril", dst, src, diagonal, value)


def triu(dst, src, diagonal=0, value=0.0):
    """Keep elements with col - row >= diagonal, else ``value``."""
    _mask("triu", dst, src, diagonal, value)


def make_causal(dst, src, diagonal=0, value=-math.inf):
    """Causal attention mask: keep keys at or before the query, i.e. ``tril`` filled with -inf.

    For a score tile of query block i (BM rows) and key block j (BN columns), ``diagonal = i*BM - j*BN``.
    """
    _mask("tril", dst, src, diagonal, value)


def right_fill(dst, src, col, value):
    """Columns ``>= col`` get ``value`` (e.g. keys past the end of a ragged sequence)."""
    _mask("right_fill", dst, src, col, value)


def lower_fill(dst, src, row, value):
    """Rows ``>= row`` get ``value``."""
    _mask("lower_fill", dst, src, row, value)


# ---- comparisons, masks by index and selection --------------------------------------------------------------------
# Operands broadcast to dst's shape: a tile or vector of dst's shape, a number or Scalar, or (into a 2-D dst) a
# vector marked per_row(v) (v[r] at element (r, c)) or per_col(v) (v[c]). Masks are tiles of dtype bool_.
#
#     q = RegVec[i32, BM](); arange(q, i * BM)             # query positions of this block's rows
#     k = RegVec[i32, BN](); arange(k, j * BN)             # key positions of this tile's columns
#     causal = RegTile[bool_, BM, BN](); ge(causal, per_row(q), per_col(k))
#     where(s, causal, s, -math.inf)


@dataclasses.dataclass(frozen=True)
class _PerAxis:
    vec: Tile
    axis: str      # "row" | "col"


def per_row(v: Tile) -> _PerAxis:
    """Vector ``v`` broadcast along the rows of a 2-D result: element (r, c) sees ``v[r]``."""
    _need_tile("per_row", "v", v)
    if not v.type.is_vec:
        raise TileShapeError(f"per_row: takes a vector, got {v.type}", user_line())
    return _PerAxis(v, "row")


def per_col(v: Tile) -> _PerAxis:
    """Vector ``v`` broadcast along the columns of a 2-D result: element (r, c) sees ``v[c]``."""
    _need_tile("per_col", "v", v)
    if not v.type.is_vec:
        raise TileShapeError(f"per_col: takes a vector, got {v.type}", user_line())
    return _PerAxis(v, "col")


def _operand(opname: str, arg: str, x, dst: Tile, kind: str):
    """(Value, axis) of operand ``x`` broadcast to ``dst``; kind "mask" wants bool, "value" a number or
    non-bool tile (scalars allowed)."""
    x = plain(x)
    axis = None
    if isinstance(x, _PerAxis):
        if dst.type.is_vec:
            raise TileShapeError(f"{opname}: {arg} is per_{x.axis}(...), which broadcasts into a 2-D tile; dst "
                                 f"`{_name(dst)}` is a {dst.type}", user_line())
        axis, x = x.axis, x.vec
        want = dst.shape[0] if axis == "row" else dst.shape[1]
        if x.shape[0] != want:
            what = "rows" if axis == "row" else "columns"
            raise TileShapeError(f"{opname}: {arg} per_{axis}(`{_name(x)}`) has {x.shape[0]} elements but dst "
                                 f"`{_name(dst)}` {dst.shape} has {want} {what}", user_line())
    elif isinstance(x, Tile):
        if x.shape != dst.shape:
            hint = "; mark a vector per_row(v) or per_col(v) to broadcast it" if x.type.is_vec else ""
            raise TileShapeError(f"{opname}: {arg} `{_name(x)}` is {x.shape} but dst `{_name(dst)}` is "
                                 f"{dst.shape}{hint}", user_line())
    if isinstance(x, Tile):
        _need_reg(opname, arg, x)
        if (x.dtype is bool_) != (kind == "mask"):
            want = "a bool_ mask" if kind == "mask" else "numbers (not a bool_ mask)"
            raise TileDTypeError(f"{opname}: {arg} `{_name(x)}` is {x.dtype}; expected {want}", user_line())
        return x.value(opname), axis
    if kind == "mask":
        hint = ("; Python's == and != on tiles compare the handles, not their values: make the mask with ts.eq or "
                "ts.ne" if isinstance(x, bool) else "")
        raise TraceError(f"{opname}: {arg} must be a bool_ mask tile, got {type(x).__name__} {x!r}{hint}",
                         user_line())
    _need_operand(opname, arg, x)
    return as_scalar(x).v, None


def _need_dst(opname: str, dst: Tile, dtype=None) -> None:
    _need_tile(opname, "dst", dst)
    _need_reg(opname, "dst", dst)
    if dtype is not None and dst.dtype is not dtype:
        raise TileDTypeError(f"{opname}: dst `{_name(dst)}` is {dst.dtype}; expected a bool_ mask tile",
                             user_line())
    if dtype is None and dst.dtype is bool_:
        raise TileDTypeError(f"{opname}: dst `{_name(dst)}` is a bool_ mask; expected a tile of numbers",
                             user_line())


def _compare(fn: str, dst: Tile, a, b) -> None:
    _need_dst(fn, dst, bool_)
    (av, ax), (bv, bx) = _operand(fn, "a", a, dst, "value"), _operand(fn, "b", b, dst, "value")
    if not any(isinstance(v.type, TileType) for v in (av, bv)):
        raise TraceError(f"{fn}: compares tiles or vectors; a and b are both scalars", user_line())
    _write(dst, Op.COMPARE, (av, bv), dst.shape, fn, fn=fn, axes=(ax, bx))


def lt(dst, a, b): _compare("lt", dst, a, b)
def le(dst, a, b): _compare("le", dst, a, b)
def gt(dst, a, b): _compare("gt", dst, a, b)
def ge(dst, a, b): _compare("ge", dst, a, b)
def eq(dst, a, b): _compare("eq", dst, a, b)
def ne(dst, a, b): _compare("ne", dst, a, b)


def _logic(fn: str, dst: Tile, *srcs) -> None:
    opname = f"logical_{fn}"
    _need_dst(opname, dst, bool_)
    ops = [_operand(opname, arg, x, dst, "mask") for arg, x in zip(("a", "b")[:len(srcs)], srcs, strict=True)]
    _write(dst, Op.LOGIC, tuple(v for v, _ in ops), dst.shape, opname, fn=fn, axes=tuple(a for _, a in ops))


def logical_and(dst, a, b): _logic("and", dst, a, b)
def logical_or(dst, a, b): _logic("or", dst, a, b)
def logical_not(dst, a): _logic("not", dst, a)


def where(dst: Tile, mask, a, b) -> None:
    """``dst = a`` where ``mask`` holds, else ``b`` (each a tile of dst's shape, per_row/per_col of a vector,
    or, for a and b, a number or Scalar)."""
    _need_dst("where", dst)
    # a number chosen into an integer or bool_ dst must be one of its values (2.5 into i32 is refused, not cut to 2)
    a, b = plain(a), plain(b)
    a, b = (_element_value("where", dst, v) if isinstance(v, int | float) and not isinstance(v, bool)
            and not dst.dtype.is_float else v for v in (a, b))
    ops = [_operand("where", "mask", mask, dst, "mask"), _operand("where", "a", a, dst, "value"),
           _operand("where", "b", b, dst, "value")]
    _write(dst, Op.SELECT, tuple(v for v, _ in ops), dst.shape, "where", axes=tuple(a for _, a in ops))


def arange(dst: Tile, start=0) -> None:
    """``dst[k] = start + k`` for a register vector ``dst`` (i32, i64 or float): row or column indices, e.g.
    ``arange(q, i * BM)`` for the positions of a block's BM rows."""
    if isinstance(dst, int | Scalar) and not isinstance(dst, bool):   # Triton's tl.arange(0, BN), which returns one
        shown = repr(dst) if isinstance(dst, int) else "an index Scalar"
        raise TraceError(f"arange: dst is {shown}; ts.arange(dst, start) fills a register vector and returns None: "
                         "`r = ts.RegVec[ts.i32, BN](); ts.arange(r, start)` (r[k] = start + k)", user_line())
    _need_dst("arange", dst)
    if not dst.type.is_vec:
        raise TileShapeError(f"arange: dst must be a vector, got {dst.type}", user_line())
    _write(dst, Op.ARANGE, (as_index(start, "arange: start").v,), dst.shape, "arange")


def rand(dst: Tile, seed, offset=0, *, row=0, col=0, stride=None, per_counter: int = 1) -> None:
    """Uniform random floats in [0, 1) into the f32 register tile (or vector) ``dst``: counter-based, Philox
    4x32-10 exactly as Triton's ``tl.rand``. Element (r, c) is drawn with key ``seed`` at counter
    ``offset + (row + r) * stride + col + c`` (a vector is one row: ``offset + row * stride + col + k``), in
    64-bit arithmetic; ``stride`` defaults to dst's width (the tile alone, row-major). The same seed and counter
    give the same number anywhere, so a backward pass regenerates the forward's dropout mask:

        ts.rand(u, seed, offset, row=bh * Nq + i * BM, col=j * BN, stride=Nk)   # block (i, j) of a (Nq, Nk) grid

    ``per_counter=n`` draws n numbers per counter, 1/n of the work: 4 (``tl.rand4x``: all four of Philox's output
    words) or 8 (the 16-bit halves of ``tl.randint4x``'s words over 65536: multiples of 2**-16, the four low
    halves, then the four high ones). Element (r, c) is number (col + c) % n of counter
    ``offset + (row + r) * stride + (col + c) // n`` (stride then counts counters per row, e.g. cdiv(Nk, n); col
    must be a multiple of n and dst's width too).
    """
    _need_dst("rand", dst)
    if dst.dtype is not f32:
        raise TileDTypeError(f"rand: dst `{_name(dst)}` is {dst.dtype}; rand makes f32 uniforms (as tl.rand)",
                             user_line())
    if per_counter not in (1, 4, 8) or dst.shape[-1] % per_counter:
        raise TileShapeError(f"rand: per_counter={per_counter!r} for dst `{_name(dst)}` {dst.shape}; expected 1, 4 "
                             "or 8, dividing dst's width", user_line())
    stride = dst.shape[-1] // per_counter if stride is None else stride
    srcs = tuple(as_index(x, f"rand: {what}").v for x, what in
                 ((seed, "seed"), (offset, "offset"), (row, "row"), (col, "col"), (stride, "stride")))
    _write(dst, Op.RAND, srcs, dst.shape, "rand", per_counter=per_counter)


# ---- matrix products ----------------------------------------------------------------------------------------------
MMA_INPUT_PRECISIONS = ("ieee", "tf32")   # the language's names; "ieee" is the IR's default (None)


def _mma(dst: Tile, a: Tile, b: Tile, acc: Tile, trans_a: bool, trans_b: bool, opname: str,
         op: Op = Op.MMA, input_precision: str = "ieee") -> None:
    if input_precision not in MMA_INPUT_PRECISIONS:
        raise TraceError(f"{opname}: input_precision is {input_precision!r}; expected one of "
                         f"{MMA_INPUT_PRECISIONS}", user_line())
    for arg, t in (("dst", dst), ("a", a), ("b", b), ("acc", acc)):
        _need_tile(opname, arg, t)
        if t.type.is_vec:
            raise TileShapeError(f"{opname}: {arg} must be a tile, got {t.type}", user_line())
    for arg, t in (("dst", dst), ("acc", acc)):
        if t.space is not Space.REG:
            raise MemorySpaceError(f"{opname}: {arg} `{_name(t)}` is a {t.type}; the accumulator lives in "
                                   "registers (a RegTile)", user_line())
    if a.dtype != b.dtype or a.dtype not in _MMA_INPUTS:
        raise TileDTypeError(f"{opname}: a `{_name(a)}` is {a.dtype} and b `{_name(b)}` is {b.dtype}; "
                             "expected both bf16, both f16 or both f32 (or both f8e4m3)", user_line())
    if dst.dtype is not f32 or acc.dtype is not f32:
        raise TileDTypeError(f"{opname}: accumulates in f32; dst is {dst.dtype} and acc is {acc.dtype}",
                             user_line())
    m, ka = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if ka != kb:
        ta = "a.T" if trans_a else "a"
        tb = "b.T" if trans_b else "b"
        raise TileShapeError(f"{opname}: inner dimensions differ: {ta} is ({m}, {ka}) and {tb} is ({kb}, {n}) "
                             f"(a `{_name(a)}` {a.shape}, b `{_name(b)}` {b.shape})", user_line())
    if acc.shape != (m, n):
        raise TileShapeError(f"{opname}: acc `{_name(acc)}` is {acc.shape}; expected ({m}, {n})", user_line())
    precision = {} if input_precision == "ieee" else {"input_precision": input_precision}
    _write(dst, op, (acc.value(opname), a.value(opname), b.value(opname)), (m, n), opname,
           trans_a=trans_a, trans_b=trans_b, **precision)


# ``input_precision``: how f32 operands enter the matrix units: "ieee" (exact f32 products, the CUDA cores) or
# "tf32" (rounded to a 10-bit mantissa first: the tensor cores, several times faster, ~1e-3 relative error).
# bf16, f16 and f8 operands are exact either way.
def mma_AB(dst, a, b, acc, *, input_precision="ieee"):
    """dst = a @ b + acc  (a: (M, K), b: (K, N), acc and dst: f32 (M, N))."""
    _mma(dst, a, b, acc, False, False, "mma_AB", input_precision=input_precision)


def mma_ABt(dst, a, b, acc, *, input_precision="ieee"):
    """dst = a @ b.T + acc  (a: (M, K), b: (N, K))."""
    _mma(dst, a, b, acc, False, True, "mma_ABt", input_precision=input_precision)


def mma_AtB(dst, a, b, acc, *, input_precision="ieee"):
    """dst = a.T @ b + acc  (a: (K, M), b: (K, N))."""
    _mma(dst, a, b, acc, True, False, "mma_AtB", input_precision=input_precision)


def mma_AtBt(dst, a, b, acc, *, input_precision="ieee"):
    """dst = a.T @ b.T + acc  (a: (K, M), b: (N, K))."""
    _mma(dst, a, b, acc, True, True, "mma_AtBt", input_precision=input_precision)


# ---- memory: load, load_scalar, store, atomic_add (lang/memory.py), part of this vocabulary ---------------------
from tilestack.lang.memory import ATOMIC_DTYPES, _coords, atomic_add, load, load_scalar, store  # noqa: E402, F401

__all__ = [
    "fill", "zero", "one", "neg_infty", "pos_infty",
    "exp", "exp2", "log", "log2", "abs", "neg", "relu", "sqrt", "rsqrt", "sigmoid", "sin", "cos", "copy", "transpose",
    "add", "sub", "mul", "div", "max", "min", "rem", "bit_and", "bit_or", "bit_xor", "shl", "shr",
    "add_row", "sub_row", "mul_row", "div_row", "add_col", "sub_col", "mul_col", "div_col",
    "max_row", "min_row", "max_col", "min_col",
    "row_max", "row_min", "row_sum", "col_max", "col_min", "col_sum",
    "tril", "triu", "make_causal", "right_fill", "lower_fill",
    "per_row", "per_col", "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not",
    "where", "arange", "rand",
    "mma_AB", "mma_ABt", "mma_AtB", "mma_AtBt", "load", "load_scalar", "store", "atomic_add",
]


# ---- calls that do not fit an op's signature ----------------------------------------------------------------------
class OpCallError(TraceError, TypeError):
    """An op called with arguments its signature does not take, most often Triton's value-returning form
    (``y = ts.exp(x)``, ``ts.where(m, a, b)``, ``ts.max(x, axis=1)``): refused at the author's line with the op's
    signature and the language's way; a TypeError too, as Python's own refusal was."""


_RETURNING = ("ts ops write their first argument (dst) and return None: declare the destination and pass it first, "
              "e.g. `y = ts.RegTile[x.dtype, BM, BN](); ts.{name}(y, ...)` (or x itself, in place)")


def _call_hint(name: str, sig: inspect.Signature, args: tuple, kwargs: dict, error: TypeError) -> str:
    """What ts.<name>(*args, **kwargs) should have been: its signature, and the way for the usual mistakes."""
    shown = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                        return_annotation=sig.empty)
    head = f"ts.{name}{shown}: {error}"
    if name.startswith("mma_") and len(args) == 3 and not kwargs:
        return (f"{head}; ts.{name}(dst, a, b, acc) writes dst = a @ b + acc: pass the accumulator as acc (dst "
                "itself to accumulate across a loop, ts.mma_AB(acc, a, b, acc), or a zeroed tile)")
    if "axis" in kwargs or "dim" in kwargs:
        return (f"{head}; a reduction along an axis is ts.row_sum / row_max / row_min (along each row) or ts.col_sum "
                "/ col_max / col_min (down each column), dst first: ts.row_max(v, t)")
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]
    required = [p for p in params if p.default is p.empty]
    if params and params[0].name == "dst" and len(args) + len(kwargs) < len(required):
        return f"{head}; {_RETURNING.format(name=name)}"
    return head


def _checked_call(fn):
    """``fn`` refusing, as an OpCallError naming the op and its signature, a call its signature cannot bind."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise OpCallError(_call_hint(fn.__name__, sig, args, kwargs, e), user_line()) from None
        return fn(*args, **kwargs)
    return call


for _name_ in __all__:
    if _name_ not in ("per_row", "per_col"):   # (markers, not ops that write a dst)
        globals()[_name_] = _checked_call(globals()[_name_])
del _name_
