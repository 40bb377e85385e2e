"""The four tile types, global tensors and scalars, as the kernel author holds them.

    acc = RegTile[f32, BM, BN]()     # a register tile, not yet written
    k_s = SharedTile[bf16, BN, D]()  # a shared tile (operand of the matrix unit)
    m   = RegVec[f32, BM]()          # a register vector: one value per row of a (BM, *) tile
    A.shape[0]                       # a global's size on an axis, an index Scalar

Tiles are mutable handles, as in ThunderKittens: ``exp(s, s)`` writes ``s``. Each write makes a new SSA
value in the IR, so a traced loop knows which tiles it carries. Operator sugar (``a + b``, ``a * 0.5``,
``a @ b``, ``a @ b.T``) makes a new register tile; an augmented assignment (``acc += x``, ``m |= n``) writes its
tile in place, as NumPy's and torch's do, so a loop carries it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tilestack.errors import LaunchError, TileDTypeError, TileShapeError, TraceError
from tilestack.ir.nodes import Value
from tilestack.ir.ops import Op
from tilestack.ir.types import FLOAT, INDEX, DType, GlobalType, ScalarType, Space, TileType, bool_
from tilestack.lang.trace import current, current_or_none, user_line, user_name, user_source


class TileSpec:
    """A tile type such as ``RegTile[f32, 64, 64]``; calling it declares a tile of that type."""

    def __init__(self, type_: TileType):
        self.type = type_

    def __call__(self) -> Tile:
        return Tile(self.type)

    def __repr__(self) -> str:
        return str(self.type)


def _from_constant(size) -> str:
    """Which of the traced kernel's constants a bad tile size is (" from the constant BM=-3"), if one is."""
    from tilestack.lang.trace import current_or_none
    tr = current_or_none()
    consts = getattr(tr, "consts", None) or {}
    names = [k for k, v in consts.items() if type(v) is type(size) and v == size]
    return f" (the constant {', '.join(f'{k}={size!r}' for k in names)} of this launch)" if names else ""


def _runtime_size(size) -> str:
    """Which of the user's names a run-time tile size (a Scalar: an int argument, a shape, a load_scalar) is bound
    to, and what to write instead."""
    if not isinstance(size, Scalar):
        return ""
    name = user_name(size)
    return (f" (`{name}`, " if name else " (") + ("a value known only when the kernel runs: size the tile by a "
                                                  "constant bound and mask the elements past the run-time size)")


class _TileFamily:
    def __init__(self, name: str, space: Space, rank: int):
        self.name, self.space, self.rank = name, space, rank

    def __getitem__(self, key) -> TileSpec:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != 1 + self.rank or not isinstance(key[0], DType):
            dims = ", ".join("N" * (i + 1) for i in range(self.rank))
            hint = ""
            if len(key) == 1 + self.rank and str(key[0]).startswith("torch."):   # torch.float32 for ts.f32
                from tilestack.ir.types import dtype_of_torch
                dt = dtype_of_torch(key[0])
                hint = f" (a tile's dtype is the language's: ts.{dt.name}, not {key[0]})" if dt else \
                    f" (tiles cannot hold {key[0]})"
            raise TraceError(f"{self.name}[...] takes a dtype and {self.rank} size(s), like "
                             f"{self.name}[f32, {dims}]; got {key!r}{hint}", user_line())
        dtype, *shape = key
        # a NumPy integer (a size computed with NumPy) is a compile-time int too
        shape = [int(s) if isinstance(s, np.integer) else s for s in shape]
        for s in shape:
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise TileShapeError(f"{self.name} sizes are positive compile-time ints (use a tunable or "
                                     f"constant); got {s!r}{_from_constant(s)}{_runtime_size(s)}", user_line())
        return TileSpec(TileType(self.space, dtype, tuple(shape)))

    def __repr__(self) -> str:
        return self.name


RegTile = _TileFamily("RegTile", Space.REG, 2)
RegVec = _TileFamily("RegVec", Space.REG, 1)
SharedTile = _TileFamily("SharedTile", Space.SHARED, 2)
SharedVec = _TileFamily("SharedVec", Space.SHARED, 1)

_handle_ids = iter(range(1, 1 << 62))


_SUGAR = {"add": "`+`", "sub": "`-`", "mul": "`*`", "div": "`/`", "bit_and": "`&`", "bit_or": "`|`",
          "bit_xor": "`^`", "shl": "`<<`", "shr": "`>>`"}


class Tile:
    """A tile or vector handle inside a trace."""

    def __init__(self, type_: TileType):
        self.type = type_
        self._value: Value | None = None
        self.uid = next(_handle_ids)
        current(str(type_)).handles.append(self)

    shape = property(lambda self: self.type.shape)
    dtype = property(lambda self: self.type.dtype)
    space = property(lambda self: self.type.space)

    def value(self, opname: str) -> Value:
        if self._value is None:
            name = user_name(self) or "a tile"
            raise TraceError(f"{opname}: {name} ({self.type}) is read before anything wrote it; "
                             "fill it (zero, neg_infty, ...) or load it first", user_line())
        return self._value

    def __repr__(self) -> str:
        return f"{self.type}({self._value!r})"

    # ---- operator sugar: each makes a new register tile ------------------------------------------------
    def _binary(self, other, fn: str, swap: bool = False) -> Tile:
        from tilestack.lang import ops
        if self.dtype is bool_:   # (the result would be a mask too: name the operand, not that unnamed result)
            raise TileDTypeError(f"{_SUGAR[fn]} on `{user_name(self) or self.type}`, a bool_ mask: masks combine with "
                                 "& | ~; for arithmetic, copy the mask into a tile of numbers first (0 and 1)",
                                 user_line())
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        a, b = (other, self) if swap else (self, other)
        if swap and not isinstance(other, Tile):   # scalar on the left: 2 - t == (-t) + 2 etc.
            if fn == "sub":
                ops.neg(out, self)
                ops.add(out, out, other)
                return out
            if fn == "div":   # other / t: other broadcast into a tile (a number, or a Scalar known at run time)
                # of the work dtype (f32 for a 16-bit float t, i32 for i8 / u8), so that the number is not rounded
                # (0.1 to bf16) or wrapped (300 to u8) before the division: one rounding, as t * c and c - t have
                from tilestack.ir.types import compute_dtype
                work = compute_dtype(self.dtype)
                num, den = (Tile(TileType(Space.REG, work, self.shape)) for _ in range(2))
                ops.fill(num, -0.0 if work.is_float else 0)   # -0.0 + c is c, a -0.0 and a per_row(v) too
                ops.add(num, num, other)
                ops.copy(den, self)
                ops.div(num, num, den)
                ops.copy(out, num)
                return out
            a, b = self, other
        getattr(ops, fn)(out, a, b)
        return out

    def __add__(self, o): return self._binary(o, "add")
    def __radd__(self, o): return self._binary(o, "add", swap=True)
    def __sub__(self, o): return self._binary(o, "sub")
    def __rsub__(self, o): return self._binary(o, "sub", swap=True)
    def __mul__(self, o): return self._binary(o, "mul")
    def __rmul__(self, o): return self._binary(o, "mul", swap=True)
    def __truediv__(self, o): return self._binary(o, "div")
    def __rtruediv__(self, o): return self._binary(o, "div", swap=True)

    def __and__(self, o): return self._and_or(o, "and")
    def __rand__(self, o): return self._and_or(o, "and", swap=True)
    def __or__(self, o): return self._and_or(o, "or")
    def __ror__(self, o): return self._and_or(o, "or", swap=True)
    def __xor__(self, o): return self._binary(o, "bit_xor")
    def __rxor__(self, o): return self._binary(o, "bit_xor", swap=True)
    def __lshift__(self, o): return self._binary(o, "shl")
    def __rshift__(self, o): return self._binary(o, "shr")

    # ``acc += x`` writes acc (the same handle, so a ts.range loop carries it), where ``acc = acc + x`` would bind
    # the name to a new tile that the loop's next iteration does not see (lang.control.range refuses that).
    def _inplace(self, other, fn: str) -> Tile:
        from tilestack.lang import ops
        if fn in ("and", "or"):
            if self.dtype is bool_:
                (ops.logical_and if fn == "and" else ops.logical_or)(self, self, other)
                return self
            fn = f"bit_{fn}"
        getattr(ops, fn)(self, self, other)
        return self

    def __iadd__(self, o): return self._inplace(o, "add")
    def __isub__(self, o): return self._inplace(o, "sub")
    def __imul__(self, o): return self._inplace(o, "mul")
    def __itruediv__(self, o): return self._inplace(o, "div")
    def __iand__(self, o): return self._inplace(o, "and")
    def __ior__(self, o): return self._inplace(o, "or")
    def __ixor__(self, o): return self._inplace(o, "bit_xor")
    def __ilshift__(self, o): return self._inplace(o, "shl")
    def __irshift__(self, o): return self._inplace(o, "shr")

    def _and_or(self, other, fn: str, swap: bool = False) -> Tile:
        """``m & n`` / ``m | n``: logical_and / logical_or of bool_ masks into a new mask; of integer tiles, the
        bitwise ops."""
        from tilestack.lang import ops
        if self.dtype is not bool_:
            return self._binary(other, f"bit_{fn}", swap)
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        (ops.logical_and if fn == "and" else ops.logical_or)(out, self, other)
        return out

    def __invert__(self) -> Tile:
        """``~m``: logical_not of a bool_ mask; ``~x``: the bitwise not of an integer tile (x ^ -1)."""
        from tilestack.lang import ops
        if self.dtype.is_float:
            self._no_sugar("~", f"`{user_name(self) or self.type}` is {self.dtype}; ~ is the logical not of a bool_ "
                                "mask or the bitwise not of an integer tile")
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        if self.dtype is bool_:
            ops.logical_not(out, self)
        else:
            ops.bit_xor(out, self, -1)
        return out

    # Python's comparisons and truth value cannot record a mask: each would be a bool the trace never sees
    # (`if x:` is always taken, `x > 0` raises a bare TypeError). Masks are made with ts.lt/ts.gt/... into a bool_ tile.
    def _compare(self, sym: str, fn: str):
        self._no_sugar(sym, f"compare tiles into a bool_ mask with ts.{fn}(mask, a, b) (mask = "
                            f"RegTile[ts.bool_, ...]() or RegVec[ts.bool_, n]()), then select with ts.where")

    def __lt__(self, o): self._compare("<", "lt")
    def __le__(self, o): self._compare("<=", "le")
    def __gt__(self, o): self._compare(">", "gt")
    def __ge__(self, o): self._compare(">=", "ge")

    def __bool__(self):
        self._no_sugar("bool()", "a tile's values are known only when the kernel runs, so Python `if`/`while`/"
                                 "`and`/`or` cannot branch on it; select with masks (ts.where) instead")

    def __eq__(self, o):   # (Python would compare the handles: `x == 0.0` would be False, silently)
        self._compare("==", "eq")

    def __ne__(self, o):
        self._compare("!=", "ne")

    __hash__ = object.__hash__   # handles stay hashable, by identity

    def _no_sugar(self, sym: str, hint: str):
        raise TraceError(f"`{sym}` on a tile: {hint}", user_line())

    def __floordiv__(self, o):
        self._no_sugar("//", "Python's // floors; tiles divide with ts.div(dst, a, b) (integers truncate toward "
                             "zero, as C and Triton)")

    def __mod__(self, o):
        self._no_sugar("%", "Python's % takes the sign of the divisor; tiles take remainders with ts.rem(dst, a, b) "
                            "(the sign of a, as C's % and Triton's)")

    __rfloordiv__, __rmod__ = __floordiv__, __mod__

    def __rlshift__(self, o):
        self._no_sugar("<<", "a number shifted by a tile: fill a tile with the number, then ts.shl(dst, t, counts)")

    def __rrshift__(self, o):
        self._no_sugar(">>", "a number shifted by a tile: fill a tile with the number, then ts.shr(dst, t, counts)")

    def __neg__(self) -> Tile:
        from tilestack.lang import ops
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        ops.neg(out, self)
        return out

    def __abs__(self) -> Tile:
        """``abs(t)``: ts.abs into a new register tile."""
        from tilestack.lang import ops
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        ops.abs(out, self)
        return out

    def __pow__(self, e) -> Tile:
        """``t ** e`` for a constant exponent, into a new register tile of t's dtype, worked in f32 (f64 for f64, the
        integer work dtype for integers) and rounded once: a whole e by repeated squaring (x ** 0 is 1, NaN too, as
        torch; a negative e divides 1 by the product; integer tiles take e >= 0, wrapping as their products do),
        0.5 and -0.5 by sqrt and rsqrt (as torch.pow takes them), any other e as exp2(e log2 x) (NaN for x < 0, as
        torch for a fractional e; zeros and infinities of either sign give 0 or inf, as C's pow)."""
        from tilestack.ir.types import f32, f64
        from tilestack.lang import ops
        e = plain(e)
        if isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e):
            what = "a tile" if isinstance(e, Tile) else f"{type(e).__name__} {e!r}"
            self._no_sugar("**", f"the exponent must be a constant, finite Python int or float, got {what} (a power "
                                 "known at run time: ts.exp2 of the exponent times ts.log2 of the base)")
        if self.dtype is bool_:
            self._no_sugar("**", f"`{user_name(self) or self.type}` is a bool_ mask; copy it into a tile of numbers "
                                 "first")
        whole = e == int(e)
        if not self.dtype.is_float and (not whole or e < 0):
            self._no_sugar("**", f"`{user_name(self) or self.type}` is {self.dtype}; an integer tile takes a whole "
                                 f"exponent >= 0, got {e!r} (copy it into a float tile for float powers)")
        work = self.dtype if not self.dtype.is_float else (f64 if self.dtype is f64 else f32)
        x = Tile(TileType(Space.REG, work, self.shape))
        ops.copy(x, self)
        r = Tile(TileType(Space.REG, work, self.shape))
        if whole:
            n = abs(int(e))
            ops.fill(r, 1)
            while n:                                  # r = x ** n, squaring x per bit of n
                if n & 1:
                    ops.mul(r, r, x)
                n >>= 1
                if n:
                    ops.mul(x, x, x)
            if e < 0:
                ops.fill(x, 1.0)
                ops.div(r, x, r)
        elif e in (0.5, -0.5):                       # (as torch.pow: sqrt(-0.0) is -0.0, rsqrt(-0.0) -inf)
            (ops.sqrt if e > 0 else ops.rsqrt)(r, x)
        else:
            ops.log2(r, x)
            ops.mul(r, r, float(e))
            ops.exp2(r, r)
            ninf = Tile(TileType(Space.REG, bool_, self.shape))
            ops.eq(ninf, x, -math.inf)               # log2(-inf) is NaN; pow(-inf, e) is inf (e > 0) or 0
            ops.where(r, ninf, math.inf if e > 0 else 0.0, r)
        out = Tile(dataclasses.replace(self.type, space=Space.REG))
        ops.copy(out, r)
        return out

    def __ipow__(self, e) -> Tile:
        """``t **= e`` writes t (so a ts.range loop carries it, as the other augmented assignments)."""
        from tilestack.lang import ops
        ops.copy(self, self ** e)
        return self

    def __rpow__(self, base):
        self._no_sugar("**", f"`{base!r} ** <tile>`: a number raised to a tile is written ts.exp2(dst, t * "
                             "log2(base)) (base > 0)")

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def __getitem__(self, index):
        """``t[0]`` / ``t[:, k]``: refused, saying how one element or a column of a tile is reached."""
        self._no_sugar("[...]", "a tile's elements are not indexed one by one (its values exist only when the kernel "
                                "runs, spread over threads): pick elements by a mask, ts.eq of a ts.arange vector "
                                "with the index, then ts.where and a row or column reduction (row_max, col_sum) to "
                                "take them out")

    def __setitem__(self, index, value):
        self._no_sugar("[...] =", "a tile's elements are not assigned one by one: write them where a mask holds, "
                                  "ts.where(t, mask, value, t), the mask from ts.eq of a ts.arange vector")

    def __iter__(self):
        """``for v in t``: refused (Python would index t[0], t[1], ... and fail on the first), saying how."""
        self._no_sugar("for ... in", "a tile's elements are not visited one by one in Python (its values exist only "
                                     "when the kernel runs): work on the whole tile with tile ops, and loop over tiles "
                                     "of a tensor with ts.range")

    def __len__(self):
        self._no_sugar("len()", f"its shape is `{user_name(self) or 't'}`.shape, a tuple of compile-time ints "
                                f"({', '.join(map(str, self.shape))})")

    def __matmul__(self, other) -> Tile:
        return _matmul(self, False, other)

    # torch's / Triton's tensor methods a user reaches for on a tile, and this language's word for each
    _TENSOR_METHODS = {
        "sum": "ts.row_sum(v, t) (along each row) or ts.col_sum(v, t) (down each column), into a vector v",
        "max": "ts.row_max(v, t) or ts.col_max(v, t), into a vector v", "min": "ts.row_min(v, t) or ts.col_min(v, t)",
        "mean": "ts.row_sum(v, t) then ts.div(v, v, n)",
        "to": "ts.copy(u, t) into a tile u of the dtype", "astype": "ts.copy(u, t) into a tile u of the dtype",
        "float": "ts.copy(u, t) into an f32 tile u", "half": "ts.copy(u, t) into an f16 tile u",
        "exp": "ts.exp(u, t)", "sqrt": "ts.sqrt(u, t)", "abs": "abs(t) or ts.abs(u, t)",
        "reshape": "a tile keeps its shape: load it with the shape wanted (pass a reshaped view as the argument)",
        "view": "a tile keeps its shape: load it with the shape wanted (pass a reshaped view as the argument)",
        "t": "ts.transpose(u, t), or t.T where `@` and copy read it", "trans": "ts.transpose(u, t)",
        "size": "its shape is t.shape (compile-time ints)", "numel": "its shape is t.shape (compile-time ints)",
    }

    def __getattr__(self, name: str):
        hint = Tile._TENSOR_METHODS.get(name)
        if hint is None:
            raise AttributeError(f"'Tile' object has no attribute {name!r}")
        shown = user_name(self) or "t"
        raise AttributeError(f"{user_line()}: `{shown}.{name}`: a tile is not a torch tensor and has no methods; "
                             f"write {hint.replace('(v, t)', f'(v, {shown})').replace('(u, t)', f'(u, {shown})')}")


def _matmul(a, ta: bool, other) -> Tile:
    """``a @ other`` (``a.T @ other`` if ``ta``; ``other`` a tile or ``b.T``) into a new f32 register tile."""
    from tilestack.ir.types import f32
    from tilestack.lang import ops
    b, tb = (other.tile, True) if isinstance(other, _Transposed) else (other, False)
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, Tile) or t.type.is_vec:
            shown = f"`{user_name(t)}` " if isinstance(t, Tile) and user_name(t) else ""
            got = f"the vector {shown}({t.type})" if isinstance(t, Tile) else f"{type(t).__name__} {t!r}"
            hint = ("; a matrix-vector product is a broadcast and a reduction: ts.mul(t, a, ts.per_col(v)); "
                    "ts.row_sum(y, t) (y = a v), or ts.mul(t, a, ts.per_row(v)); ts.col_sum(y, t) (y = v a)"
                    if isinstance(t, Tile) else "; a tile times a number is `*` (t * 2.0, or ts.mul)"
                    if isinstance(t, int | float | Scalar) and not isinstance(t, bool) else "")
            raise TraceError(f"@: {arg} must be a 2-D tile (or its .T), got {got}{hint}", user_line())
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[-1]
    out = Tile(TileType(Space.REG, f32, (m, n)))
    ops.zero(out)
    ops._mma(out, a, b, out, ta, tb, "@")
    return out


@dataclasses.dataclass
class _Transposed:
    """``t.T``: a tile read transposed, by ``@`` (``a @ b.T``, ``a.T @ b``) and ``copy(dst, t.T)``."""
    tile: Tile

    def __matmul__(self, other) -> Tile:
        return _matmul(self.tile, True, other)

    def __rmatmul__(self, a: Tile) -> Tile:
        return _matmul(a, False, self)


class Scalar:
    """An index (or float) known only when the kernel runs: sizes, block ids, loop counters."""

    def __init__(self, value: Value):
        self.v = value

    @property
    def type(self) -> ScalarType:
        return self.v.type

    def _op(self, other, fn: str, swap: bool = False) -> Scalar:
        if isinstance(other, Tile):
            return NotImplemented   # `2 * N * t`: the tile's reflected operator takes the scalar
        other = plain(other)
        if fn in ("floordiv", "cdiv", "mod") and not swap and isinstance(other, int) and other == 0:
            sym = {"floordiv": "//", "cdiv": "cdiv", "mod": "%"}[fn]
            named = _from_constant(other).strip()[1:-1]   # "the constant BN=0 of this launch", or ""
            raise TraceError(f"`{sym}` of an index by the constant 0 (a constant divisor must not be 0: check the "
                             f"kernel's constants{'; here ' + named if named else ''})", user_line())
        o = as_scalar(other)
        a, b = (o, self) if swap else (self, o)
        is_float = FLOAT in (a.type, b.type)
        if is_float and fn in ("floordiv", "cdiv", "mod"):
            sym = {"floordiv": "//", "cdiv": "cdiv", "mod": "%"}[fn]
            # (an offset read by ts.load_scalar from a float tensor: name it, as as_index does for a coordinate)
            origin = _float_origin(a.v) or _float_origin(b.v)
            raise TraceError(f"`{sym}` is for index scalars; got {a.type} {sym} {b.type}{origin} (a float scalar "
                             "divides with `/`; ts.load_scalar of an integer or bool tensor reads an index)",
                             user_line())
        if fn == "div":      # true division, as in Python: `N / 2` and `1.0 / N` are floats (`//` floors)
            fn = "fdiv"
        elif fn == "pow":
            fn = "fpow"
        elif is_float and fn in ("add", "mul"):
            fn = {"add": "fadd", "mul": "fmul"}[fn]
        rtype = FLOAT if is_float or fn in ("fdiv", "fpow") else INDEX
        ins = current("scalar arithmetic").emit(Op.SCALAR, (a.v, b.v), (rtype,), user_line(), fn=fn)
        return Scalar(ins.result)

    def __add__(self, o): return self._op(o, "add")
    def __radd__(self, o): return self._op(o, "add", True)
    def __sub__(self, o): return self._op(o, "sub")
    def __rsub__(self, o): return self._op(o, "sub", True)
    def __mul__(self, o): return self._op(o, "mul")
    def __rmul__(self, o): return self._op(o, "mul", True)
    def __floordiv__(self, o): return self._op(o, "floordiv")
    def __rfloordiv__(self, o): return self._op(o, "floordiv", True)
    def __mod__(self, o): return self._op(o, "mod")
    def __rmod__(self, o): return self._op(o, "mod", True)
    def __truediv__(self, o): return self._op(o, "div")
    def __rtruediv__(self, o): return self._op(o, "div", True)
    def __neg__(self): return self._op(0, "sub", True)

    def __pow__(self, o) -> Scalar:
        """``N ** e`` for a constant exponent: a whole e of at most 8 by products (``N ** 2`` stays an index; a
        negative e divides 1.0 by them), any other e as a float, exp2(e log2 N) in f32 (``D ** -0.5``: a softmax
        scale from a size)."""
        if isinstance(o, bool) or not isinstance(o, int | float) or not math.isfinite(o):
            raise TraceError(f"`**` of a Scalar takes a constant, finite exponent (a Python int or float); got "
                             f"{type(o).__name__} {o!r}", user_line())
        if o == int(o) and abs(o) <= 8:
            n = int(abs(o))
            r = as_scalar(1) if n == 0 else self
            for _ in range(n - 1):
                r = r * self
            if o < 0:
                return 1.0 / r
            return r * 1.0 if isinstance(o, float) else r
        return self._op(float(o), "pow")

    def __rpow__(self, o):
        """``b ** N`` for a constant, positive, finite base: a float, exp2(N log2 b) in f32 as ``N ** e`` computes
        it (``0.5 ** N``, a decay per trip; ``2 ** N`` is a float too: an index power of two is a product loop)."""
        if isinstance(o, bool) or not isinstance(o, int | float) or not (math.isfinite(o) and o > 0):
            raise TraceError(f"`{o!r} ** <Scalar>`: a run-time exponent takes a constant, positive, finite base (it "
                             "is computed as exp2(N log2 b)); for another, raise a tile (ts.exp2 of the exponent "
                             "times log2 of the base) or pass the power as an argument", user_line())
        return as_scalar(float(o))._op(self, "pow")

    def __float__(self):
        code = user_source()
        raise TraceError("a Scalar's value" + (f" (in `{code}`)" if code else "") + " is known only when the kernel "
                         "runs, so Python's float() and math functions cannot take it: use Scalar arithmetic "
                         "(`1.0 / N`, `N ** -0.5`), ts ops on a tile, or pass the value as a float argument",
                         user_line())

    def _compare(self, other, sym: str):
        code = user_source()
        raise TraceError(f"`{sym}` on a Scalar" + (f" in `{code}`" if code else "") + ": its value is known "
                         "only when the kernel runs, so Python cannot "
                         "compare it; compare tiles into a mask (ts.lt, ts.ge, ... with per_row/per_col vectors "
                         "from ts.arange) or bound a loop with ts.smin/ts.smax", user_line())

    def __lt__(self, o): return self._compare(o, "<")
    def __le__(self, o): return self._compare(o, "<=")
    def __gt__(self, o): return self._compare(o, ">")
    def __ge__(self, o): return self._compare(o, ">=")
    # `X.shape[1] == 64` would compare the handles (always False, silently): refused as the orderings are
    def __eq__(self, o): return self._compare(o, "==")
    def __ne__(self, o): return self._compare(o, "!=")
    __hash__ = object.__hash__

    def __bool__(self):
        code = user_source()
        raise TraceError("a Scalar's value" + (f" (in `{code}`)" if code else "") + " is known only when the "
                         "kernel runs: Python `if`/`while` cannot "
                         "branch on it; use masks (tril, right_fill, ...) or loop bounds instead", user_line())

    def __index__(self):
        code = user_source()
        raise TraceError("a Scalar" + (f" (in `{code}`)" if code else "") + " cannot be used as a Python int (tile "
                         "sizes must be compile-time constants); a loop over a count known only at run time is "
                         "written `for j in ts.range(n)`, not Python's range", user_line())

    def __repr__(self) -> str:
        return f"Scalar({self.v!r})"


def plain(x):
    """A NumPy number (np.float32(0.5), np.int64(3), np.bool_) as the Python number it holds, anything else as it is:
    a constant computed with NumPy is taken wherever a Python number is (as tile sizes and launch arguments are)."""
    return x.item() if isinstance(x, np.number | np.bool_) else x


def as_scalar(x) -> Scalar:
    """A Python number or Scalar as a Scalar (numbers become CONST instructions)."""
    x = plain(x)
    if isinstance(x, Scalar):
        return x
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TraceError(f"expected an index Scalar or a number, got {x!r}", user_line())
    if isinstance(x, int) and not -2**63 <= x < 2**63:   # (no backend's index arithmetic holds it; Triton fails)
        raise TraceError(f"the index constant {x} does not fit 64 bits (expected -2**63 <= value < 2**63); check "
                         "the kernel's constants", user_line())
    t = INDEX if isinstance(x, int) else FLOAT
    return Scalar(current("constant").emit(Op.CONST, (), (t,), user_line(), value=x).result)


def as_index(x, what: str) -> Scalar:
    """``x`` as an index Scalar, for ``what`` (a tile coordinate, a loop bound): a float is refused."""
    x = plain(x)
    if isinstance(x, bool) or not isinstance(x, int | Scalar):
        raise TraceError(f"{what} must be an index (int or index Scalar), got {type(x).__name__} {x!r}",
                         user_line())
    s = as_scalar(x)
    if s.type != INDEX:
        # A float Scalar comes from `/`, a float argument, or ts.load_scalar of a float tensor (a count or offset
        # kept in a float tensor): name all three, not only `/`, so the last is not a puzzle, and the argument it
        # came from where it came straight from one.
        origin = _float_origin(s.v)
        raise TraceError(f"{what} must be an index, got a float scalar{origin}: `/` makes a float (index scalars "
                         "divide with // or ts.cdiv), and so do a float argument and ts.load_scalar of a float "
                         "tensor (read counts, offsets and indices from an integer or bool tensor)", user_line())
    return s


def _float_origin(v) -> str:
    """Where float scalar ``v`` of the trace in progress came from, when straight from an argument: " (ts.load_scalar
    of `ROWS`, a float tensor)" or " (the float argument `scale`)"; else ''."""
    tr = current_or_none()
    if tr is None:
        return ""
    made = {r: ins for ins in tr.blocks[0].walk() for r in ins.results}
    ins = made.get(v)
    if ins is not None and ins.op is Op.LOAD_SCALAR:
        arg = made.get(ins.srcs[0])
        if arg is not None and arg.op is Op.ARG:
            return f" (ts.load_scalar of `{arg.attrs.name}`, a float tensor)"
    elif ins is not None and ins.op is Op.ARG:
        return f" (the float argument `{ins.attrs.name}`)"
    return ""


class ArgumentRankError(TraceError, LaunchError):
    """A kernel reads an axis past the rank of the tensor it was given (a LaunchError to the caller, at the
    kernel's line)."""


class _Shape(tuple):
    """A global's symbolic sizes; indexing past its rank names the argument, its rank and the axis."""

    def __new__(cls, g: GlobalTensor):
        obj = super().__new__(cls, tuple(g.dim(a) for a in range(g.rank)))
        obj.g = g
        return obj

    def __getitem__(self, key):
        if isinstance(key, int) and not -len(self) <= key < len(self):
            self.g.dim(key)   # raises, naming the argument
        return super().__getitem__(key)


class GlobalTensor:
    """A global tensor argument: addressed in whole tiles with ``load(tile, G, at=(...))``."""

    def __init__(self, value: Value, name: str):
        self.v = value
        self.name = name
        self._dims: dict[int, Scalar] = {}

    @property
    def type(self) -> GlobalType:
        return self.v.type

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return self.type.rank

    @property
    def shape(self) -> tuple[Scalar, ...]:
        return _Shape(self)

    def dim(self, axis: int) -> Scalar:
        if not isinstance(axis, int) or isinstance(axis, bool) or not -self.rank <= axis < self.rank:
            raise ArgumentRankError(
                f"{self.name}.shape[{axis!r}]: argument {self.name} has rank {self.rank} (axes 0 to "
                f"{self.rank - 1}), so it has no axis {axis!r}; pass a tensor of the rank the kernel reads",
                user_line())
        axis %= self.rank
        if axis not in self._dims:
            ins = current("shape").emit(Op.DIM, (self.v,), (INDEX,), user_line(), axis=axis)
            self._dims[axis] = Scalar(ins.result)
        return self._dims[axis]

    def __repr__(self) -> str:
        return f"{self.name}: {self.type}"

    # torch's names for what a global's handle has under its own (``X.size(0)`` is ``X.shape[0]``), or does not have
    _TORCH_NAMES = {
        "size": "its size on an axis is X.shape[axis] (an index Scalar)", "ndim": "its rank is X.rank",
        "dim": "its rank is X.rank", "numel": "its element count is the product of its X.shape[axis] sizes",
        "stride": "its strides are the launch's (a view is taken with its own: pass the view)",
        "view": "pass the view as the argument", "reshape": "pass the reshaped view as the argument",
        "T": "pass X.T (a view) as the argument, or transpose a tile (ts.transpose, or copy(dst, t.T))",
        "device": "its device is the launch's", "data_ptr": "it is addressed in whole tiles by ts.load / ts.store"}

    def __getattr__(self, name: str):
        hint = GlobalTensor._TORCH_NAMES.get(name)
        if hint is None:
            raise AttributeError(f"'GlobalTensor' object has no attribute {name!r}")
        raise AttributeError(f"{user_line()}: `{self.name}.{name}`: a global tensor in a kernel is not a torch tensor; "
                             f"{hint.replace('X', self.name)}")

    def __getitem__(self, index):
        """``X[i]`` / ``X[i:j]`` (NumPy's or Triton's pointer way): refused, saying how a global is read."""
        raise TraceError(f"`{self.name}[...]`: a global tensor is not indexed in a kernel; read a tile of it with "
                         f"ts.load(t, {self.name}, at=(...)) (coordinates in whole tiles) or one element with "
                         f"ts.load_scalar({self.name}, i, ...), and write with ts.store", user_line())

    def __setitem__(self, index, value):
        raise TraceError(f"`{self.name}[...] = ...`: a global tensor is written with ts.store({self.name}, t, "
                         "at=(...)) (or ts.atomic_add), a tile at a time", user_line())

    def _not_a_pointer(self, sym: str, *_):
        """``X + off`` (Triton's pointer arithmetic) and the other operators on a global: refused, saying how a
        global is addressed."""
        raise TraceError(f"`{sym}` on the global tensor `{self.name}`: a global is not a pointer and takes no "
                         f"arithmetic; address its tiles by coordinates, ts.load(t, {self.name}, at=(...)) (the last "
                         "axes in whole tiles, the others in elements), or pass a view (a slice, X[off:]) as the "
                         "argument", user_line())

    def __add__(self, o): self._not_a_pointer("+")
    def __radd__(self, o): self._not_a_pointer("+")
    def __sub__(self, o): self._not_a_pointer("-")
    def __rsub__(self, o): self._not_a_pointer("-")
    def __mul__(self, o): self._not_a_pointer("*")
    def __rmul__(self, o): self._not_a_pointer("*")
    def __truediv__(self, o): self._not_a_pointer("/")
    def __floordiv__(self, o): self._not_a_pointer("//")
    def __mod__(self, o): self._not_a_pointer("%")
    def __matmul__(self, o): self._not_a_pointer("@")
    def __rmatmul__(self, o): self._not_a_pointer("@")
    def __neg__(self): self._not_a_pointer("-")
