"""Loops over tiles, block ids and index arithmetic.

    for j in ts.range(0, ts.cdiv(N, BN)):    # j: an index Scalar; tiles written in the body are carried
        ...
    i = ts.block_id(0)
"""

from __future__ import annotations

from collections.abc import Iterator

from tilestack.errors import TraceError
from tilestack.ir.nodes import Value
from tilestack.ir.ops import Op
from tilestack.ir.types import INDEX
from tilestack.lang.tiles import Scalar, as_index, as_scalar
from tilestack.lang.trace import current, user_line, user_name


def block_id(axis: int = 0) -> Scalar:
    """This program's index on grid axis ``axis`` (0, 1 or 2)."""
    _axis("block_id", axis)
    return Scalar(current("block_id").emit(Op.BLOCK_ID, (), (INDEX,), user_line(), axis=axis).result)


def num_blocks(axis: int = 0) -> Scalar:
    """The grid's size on ``axis``."""
    _axis("num_blocks", axis)
    return Scalar(current("num_blocks").emit(Op.NUM_BLOCKS, (), (INDEX,), user_line(), axis=axis).result)


def _axis(name: str, axis) -> None:
    if axis not in (0, 1, 2):
        raise TraceError(f"{name}: axis must be 0, 1 or 2, got {axis!r}", user_line())


def _index(name: str, x) -> Scalar | int:
    return x if isinstance(x, int) and not isinstance(x, bool) else as_index(x, f"{name}: an operand")


def cdiv(a, b):
    """ceil(a / b) for indices."""
    a, b = _index("cdiv", a), _index("cdiv", b)
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return as_scalar(a)._op(b, "cdiv")


def smin(a, b):
    """min of two indices."""
    a, b = _index("smin", a), _index("smin", b)
    if isinstance(a, int) and isinstance(b, int):
        return a if a < b else b
    return as_scalar(a)._op(b, "min")


def smax(a, b):
    """max of two indices."""
    a, b = _index("smax", a), _index("smax", b)
    if isinstance(a, int) and isinstance(b, int):
        return a if a > b else b
    return as_scalar(a)._op(b, "max")


def range(start, stop=None, step=1, *, stages: int | None = None,  # noqa: A001
          flatten: bool = False) -> Iterator[Scalar]:
    """A loop over tiles, traced once: ``for j in range(start, stop, step)`` (or ``range(stop)``), as Python's.

    ``step`` is a nonzero int (negative counts down), or an index Scalar that must be positive when the
    kernel runs (a grid-stride loop: ``range(block_id(0), n, num_blocks(0))``). Tiles written in the body are
    carried from one iteration to the next; ``stages`` asks backends that pipeline loads (Triton) for that
    many stages in flight. ``flatten`` (a hint; the result is the same): this loop's body holds the loop that
    loads, e.g. a persistent kernel's loop over output tiles around its K loop; backends that can (Triton)
    pipeline the two as one loop, so the next tile's first loads are in flight during this tile's epilogue.
    """
    where = user_line()
    if stop is None:
        start, stop = 0, start
    if isinstance(step, int) and not isinstance(step, bool) and step == 0:
        raise TraceError("range: step must not be zero", where)
    lo_s, hi_s, step_s = (as_scalar(_index("range", x)) for x in (start, stop, step))
    if stages is not None and (not isinstance(stages, int) or stages < 1):
        raise TraceError(f"range: stages must be a positive int, got {stages!r}", where)
    if not isinstance(flatten, bool):
        raise TraceError(f"range: flatten must be a bool, got {flatten!r}", where)
    tr = current("range")
    ins = tr.emit(Op.RANGE, (lo_s.v, hi_s.v, step_s.v), (), where, stages=stages, flatten=flatten)
    induction = Value(INDEX, "it")
    loop = tr.begin_loop(ins, induction)
    index = Scalar(induction)
    yield index
    induction.hint = user_name(index) or induction.hint   # the user's loop variable, now bound: `for k in ...`
    tr.end_loop(loop)
