"""The tracer: while a kernel function runs with symbolic tiles, every op appends to the open IR block.

Errors name the user's own line: ``user_line()`` walks out of tilestack's language and IR modules to the
first frame that is the kernel author's.
"""

from __future__ import annotations

import contextlib
import contextvars
import linecache
import os
import sys
from typing import Any

from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, Instr, Value
from tilestack.ir.ops import Op
from tilestack.ir.types import Type

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the language's own frames, and contextlib's (ts.partition and ts.turn are context managers: their ops are
# recorded from contextlib's __enter__ and __exit__, the author's line is the `with`)
_INTERNAL = (os.path.join(_PKG, "lang") + os.sep, os.path.join(_PKG, "ir") + os.sep, contextlib.__file__)


def _user_frame():
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_INTERNAL):
        f = f.f_back
    return f


def user_line() -> str:
    """``file.py:12`` of the kernel author's line that is running now."""
    f = _user_frame()
    if f is None:
        return "<unknown>"
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


def user_source() -> str:
    """The text of the kernel author's line that is running now (stripped), or ''."""
    f = _user_frame()
    return "" if f is None else linecache.getline(f.f_code.co_filename, f.f_lineno).strip()


def user_frame():
    """The kernel author's frame that is running now (None if there is none)."""
    return _user_frame()


def user_locals() -> dict[str, Any]:
    """The kernel author's local variables right now (name -> object), or {}."""
    f = _user_frame()
    return {} if f is None else dict(f.f_locals)


def user_name(obj: Any) -> str:
    """The user's local variable name bound to ``obj`` right now, or ''."""
    f = _user_frame()
    if f is None:
        return ""
    for k, v in f.f_locals.items():
        if v is obj and not k.startswith("_"):
            return k
    return ""


class _Loop:
    def __init__(self, instr: Instr, where: str):
        self.instr = instr
        self.where = where
        self.entry: dict[int, Value] = {}   # tile handle id -> value before the loop
        self.args: dict[int, Value] = {}    # tile handle id -> provisional loop-carried arg


class Tracer:
    """State of one trace. Tiles register here so loops can find which of them they carry."""

    def __init__(self):
        self.blocks: list[Block] = [Block()]
        self.handles: list[Any] = []        # every Tile handle made in this trace, in order
        self.loops: list[_Loop] = []
        self.closed: set[int] = set()       # ids of values defined in loop bodies that have ended
        self.defined_in: dict[int, str] = {}
        self.role = ""                      # the warp role ``ts.partition`` has opened, if any
        self.roles: dict[str, Any] = {}     # role name -> ir.nodes.Role, as declared

    @property
    def block(self) -> Block:
        return self.blocks[-1]

    def emit(self, op: Op, srcs: tuple[Value, ...], result_types: tuple[Type, ...], where: str,
             **attrs) -> Instr:
        for s in srcs:
            if s.id in self.closed:
                h = next((h for h in self.handles if h._value is s), None)
                name = f"`{user_name(h)}`" if h is not None and user_name(h) else repr(s)
                raise TraceError(
                    f"{op.value}: {name} was made inside the loop at {self.defined_in[s.id]} and is used "
                    "after the loop ended, but the loop does not carry it: a tile carried out of a loop needs a "
                    "value before the loop too (declare it before the loop and write it there, e.g. zero(acc) or "
                    "a load, then write into it in the loop, e.g. mma_AB(acc, a, b, acc))", where)
        results = tuple(Value(t, attrs.pop("hint", "") if i == 0 else "") for i, t in enumerate(result_types))
        ins = Instr(op, results, tuple(srcs), attrs, None, where, self.role)
        self.block.instrs.append(ins)
        return ins

    # ---- loops -------------------------------------------------------------------------------------------
    def begin_loop(self, ins: Instr, induction: Value) -> _Loop:
        """Open a loop body. Every live tile gets a provisional carried argument; ``end_loop`` keeps those
        the body wrote and folds the rest back to their value before the loop."""
        loop = _Loop(ins, ins.where)
        body = Block(args=[induction])
        ins.body = body
        for h in self.handles:
            v = h._value
            if v is None or v.id in self.closed:
                continue
            arg = Value(v.type, v.hint, buffer=v.buffer)
            loop.entry[id(h)] = v
            loop.args[id(h)] = arg
            h._value = arg
        self.loops.append(loop)
        self.blocks.append(body)
        return loop

    def end_loop(self, loop: _Loop) -> None:
        if not self.loops or self.loops[-1] is not loop:
            raise TraceError("tile loops must close in order (is there a `break` in a ts.range loop?)",
                             loop.where)
        self.loops.pop()
        body = self.blocks.pop()
        ins = loop.instr
        fold: dict[Value, Value] = {}
        carried_inits, carried_args, yields, handles = [], [], [], []
        by_id = {id(h): h for h in self.handles}
        for hid, arg in loop.args.items():
            h = by_id[hid]
            out = h._value
            if out is arg:
                fold[arg] = loop.entry[hid]
                h._value = loop.entry[hid]
                continue
            carried_inits.append(loop.entry[hid])
            carried_args.append(arg)
            yields.append(out)
            handles.append(h)
        _substitute(body, fold)
        body.args.extend(carried_args)
        body.yields = yields
        ins.srcs = ins.srcs + tuple(carried_inits)
        ins.results = tuple(Value(a.type, a.hint, buffer=a.buffer) for a in carried_args)
        for h, r in zip(handles, ins.results, strict=True):
            h._value = r
        for inner in body.walk():
            for r in inner.results:
                self.closed.add(r.id)
                self.defined_in[r.id] = inner.where
        for a in body.args:
            self.closed.add(a.id)
            self.defined_in[a.id] = loop.where


def _substitute(block: Block, mapping: dict[Value, Value]) -> None:
    if not mapping:
        return
    for ins in block.walk():
        ins.srcs = tuple(mapping.get(s, s) for s in ins.srcs)
        if ins.body is not None:
            ins.body.yields = [mapping.get(s, s) for s in ins.body.yields]
    block.yields = [mapping.get(s, s) for s in block.yields]


# The trace being recorded, per thread and per asyncio task (two threads may trace at once).
_current: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("tilestack_tracer", default=None)


def current(opname: str) -> Tracer:
    tr = _current.get()
    if tr is None:
        raise TraceError(f"{opname}() is a tile op: call it inside a @ts.kernel function while it is traced",
                         user_line())
    return tr


def current_or_none() -> Tracer | None:
    """The trace in progress, or None outside one."""
    return _current.get()


def set_current(t: Tracer | None) -> Tracer | None:
    old = _current.get()
    _current.set(t)
    return old
