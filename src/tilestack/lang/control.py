"""Loops over tiles, block ids and index arithmetic.

    for j in ts.range(0, ts.cdiv(N, BN)):    # j: an index Scalar; tiles written in the body are carried
        ...
    i = ts.block_id(0)
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Iterator

from tilestack.errors import TraceError
from tilestack.ir.nodes import Value
from tilestack.ir.ops import Op
from tilestack.ir.types import INDEX
from tilestack.lang.tiles import Scalar, Tile, _from_constant, as_index, as_scalar, plain
from tilestack.lang.trace import current, user_frame, user_line, user_locals, user_name


def block_id(axis: int = 0) -> Scalar:
    """This program's index on grid axis ``axis`` (0, 1 or 2)."""
    _axis("block_id", axis)
    return Scalar(current("block_id").emit(Op.BLOCK_ID, (), (INDEX,), user_line(), axis=axis).result)


def num_blocks(axis: int = 0) -> Scalar:
    """The grid's size on ``axis``."""
    _axis("num_blocks", axis)
    return Scalar(current("num_blocks").emit(Op.NUM_BLOCKS, (), (INDEX,), user_line(), axis=axis).result)


def _axis(name: str, axis) -> None:
    axis = plain(axis)
    if isinstance(axis, Scalar | Tile):   # (`in` would compare a Scalar, refused as Python's `==` on it)
        shown = f"`{user_name(axis)}`" if user_name(axis) else "a value"
        kind = "runtime Scalar" if isinstance(axis, Scalar) else "tile"
        raise TraceError(f"{name}: axis must be 0, 1 or 2, got the {kind} {shown}, known only when the kernel runs; "
                         "the grid axis is a compile-time int (a constant of the kernel)", user_line())
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise TraceError(f"{name}: axis must be 0, 1 or 2, got {axis!r}", user_line())


def _index(name: str, x) -> Scalar | int:
    x = plain(x)
    if isinstance(x, Tile):   # a count loaded from memory: say what a data-dependent trip count is written as
        raise TraceError(f"{name}: an operand is a tile, `{user_name(x) or 'a tile'}` ({x.type}); loop bounds and "
                         "index arithmetic take index Scalars known before the loop runs (sizes, block ids, int "
                         "arguments and arithmetic on them): a tile's values are not read back into a Scalar. For a "
                         "trip count held in a tensor, bound the loop by an upper bound (an int argument such as the "
                         "largest count, or a size) and mask the trips past each count (ts.where on a comparison "
                         "with the loop counter)", user_line())
    return x if isinstance(x, int) and not isinstance(x, bool) else as_index(x, f"{name}: an operand")


def cdiv(a, b):
    """ceil(a / b) for indices."""
    a, b = _index("cdiv", a), _index("cdiv", b)
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:   # (Python's bare ZeroDivisionError named neither the call nor the constant)
            raise TraceError(f"cdiv({a}, 0): the divisor is the constant 0{_from_constant(b)} (a constant divisor "
                             "must not be 0: check the kernel's constants)", user_line())
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
    _refuse_python_counters(where)
    tr = current("range")
    ins = tr.emit(Op.RANGE, (lo_s.v, hi_s.v, step_s.v), (), where, stages=stages, flatten=flatten)
    induction = Value(INDEX, "it")
    loop = tr.begin_loop(ins, induction)
    index = Scalar(induction)
    bound = _bound_handles()
    yield index
    induction.hint = user_name(index) or induction.hint   # the user's loop variable, now bound: `for k in ...`
    _refuse_rebinding(loop, bound)
    tr.end_loop(loop)


def _refuse_python_counters(where: str) -> None:
    """A Python number the loop's body updates from itself (``off += 1``, ``n = n + 1``; Triton's pointer
    increments): the body is traced once, so it would change once, not once per trip. Refused, naming it."""
    f = user_frame()
    if f is None:
        return
    for name in sorted(_self_updates(f.f_code, f.f_lineno)):
        v = f.f_locals.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise TraceError(f"`{name}` is a Python number ({v!r}) that this loop's body updates from itself "
                             f"(`{name} += ...`): the body is traced once, so {name} would change once, not once "
                             f"per trip; compute it from the loop counter instead (`{name}0 + j * step`)", where)


@functools.cache
def _self_updates(code, line: int) -> frozenset[str]:
    """The names the body of the ``for`` statement at ``line`` of ``code``'s function updates from themselves
    (``n += 1``, ``n = n + 1``), less those a plain assignment or a nested Python loop in the body binds afresh
    (a counter reset at the top of each trip). Empty where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    loop = next((n for n in ast.walk(tree) if isinstance(n, ast.For) and n.lineno + code.co_firstlineno - 1 == line),
                None)
    if loop is None:
        return frozenset()
    updated, fresh = set(), set()
    for node in (n for stmt in loop.body for n in ast.walk(stmt)):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            updated.add(node.target.id)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            read = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        (updated if n.id in read else fresh).add(n.id)
        elif isinstance(node, ast.For | ast.comprehension):
            fresh.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    return frozenset(updated - fresh)


def _bound_handles() -> dict[str, Tile | Scalar]:
    """The kernel author's local names bound to tiles and scalars right now."""
    return {k: v for k, v in user_locals().items() if isinstance(v, Tile | Scalar)}


def _refuse_rebinding(loop, before: dict[str, Tile | Scalar]) -> None:
    """A name bound before the loop to a tile or scalar, bound in the body to a new one made from it (``acc = acc +
    x``, ``off = off + j``): in Python the next iteration would see the new one, but the body is traced once and a
    loop carries only what is written into tiles. Refused, naming it (``acc += x`` writes acc, and is carried)."""
    after = _bound_handles()
    made = {r: ins for ins in loop.instr.body.walk() for r in ins.results}
    for name, old in before.items():
        new = after.get(name)
        if new is None or new is old:
            continue
        old_v = loop.args.get(id(old)) if isinstance(old, Tile) else old.v
        new_v = new._value if isinstance(new, Tile) else new.v
        if old_v is None or new_v is None or not _made_from(new_v, old_v, made):
            continue
        if isinstance(old, Tile):
            hint = (f"write into the tile instead, so the loop carries it: `{name} += ...` or an op with {name} as "
                    f"its destination (ts.add({name}, {name}, x))")
        else:
            hint = "compute it from the loop counter instead (`off = off0 + j * step`)"
        raise TraceError(f"`{name}` is bound in this loop's body to a new value made from its value before: the "
                         "body is traced once, so the next iteration would not see the new value (a loop carries "
                         f"what is written into tiles, not Python names); {hint}", loop.where)


def _made_from(v: Value, src: Value, made: dict) -> bool:
    """Whether ``v`` is ``src`` or computed from it by the instructions in ``made`` (a nested loop's results from
    its operands and its body's yields)."""
    todo, seen = [v], set()
    while todo:
        x = todo.pop()
        if x is src:
            return True
        ins = made.get(x)
        if ins is None or x in seen:
            continue
        seen.add(x)
        todo += ins.srcs
        if ins.body is not None:
            todo += ins.body.yields
    return False
