"""IR nodes: typed SSA values, instructions, blocks, and the kernel that holds them.

    kernel = KernelIR(name, params, body)     # body: Block
    Block(args, instrs, yields)               # a loop body's args are (i, *carried)
    Instr(op, results, srcs, attrs, body, where)   # attrs: the op's typed attributes (ir.ops), e.g. FnAttrs

A tile's SSA values are versions of one buffer (``Value.buffer``, the tile the kernel author declared): each
write makes a new value of the same buffer, so footprints count buffers, not values.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

from tilestack.ir.ops import Op, make_attrs
from tilestack.ir.types import GlobalType, Type

_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Value:
    """One SSA value. ``hint`` is a readable name taken from the user's variable, where one was found;
    ``buffer`` the id of the tile it is a version of (None for scalars and globals)."""
    type: Type
    hint: str = ""
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    buffer: int | None = None

    def __repr__(self) -> str:
        return f"%{self.hint or 'v'}{self.id}"


@dataclasses.dataclass(eq=False)
class Instr:
    op: Op
    results: tuple[Value, ...]
    srcs: tuple[Value, ...]
    attrs: Any = dataclasses.field(default_factory=dict)   # the op's attrs class (a dict of its fields is converted)
    body: Block | None = None
    where: str = ""          # the user's file:line that made it
    role: str = ""           # the warp role (``KernelIR.roles``) that runs it; "" for every warp

    def __post_init__(self):
        self.attrs = make_attrs(self.op, self.attrs)

    @property
    def result(self) -> Value:
        (r,) = self.results
        return r


@dataclasses.dataclass(eq=False)
class Block:
    args: list[Value] = dataclasses.field(default_factory=list)
    instrs: list[Instr] = dataclasses.field(default_factory=list)
    yields: list[Value] = dataclasses.field(default_factory=list)

    def walk(self) -> Iterator[Instr]:
        """Every instruction, nested loop bodies included, in program order."""
        for ins in self.instrs:
            yield ins
            if ins.body is not None:
                yield from ins.body.walk()


@dataclasses.dataclass(frozen=True)
class Role:
    """A warp-role partition: ``warps`` warps (in ``groups`` groups taking turns, e.g. ping-pong consumers) that
    run the instructions marked with its name, each thread holding at most ``registers`` registers."""
    warps: int
    registers: int
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Param:
    """A kernel parameter: a global tensor, or a runtime scalar."""
    name: str
    type: Type

    @property
    def is_global(self) -> bool:
        return isinstance(self.type, GlobalType)


@dataclasses.dataclass(eq=False)
class KernelIR:
    name: str
    params: list[Param]
    body: Block
    constants: dict[str, Any]           # compile-time constants and tunables, by name
    grid: tuple[Value, ...] = ()         # index values computed from argument sizes and constants
    where: str = ""
    # what the device code reads of each parameter, once a backend's passes have decided it (None before):
    # ("ptr", i), ("dim", i, axis), ("stride", i, axis), ("scalar", i), ("desc", i, block shape), in order
    reads: tuple[tuple, ...] | None = None
    roles: dict[str, Role] = dataclasses.field(default_factory=dict)   # warp roles, by name (opt-in)

    def walk(self) -> Iterator[Instr]:
        return self.body.walk()

    def written_params(self) -> set[int]:
        """Indices of the global params the kernel stores to (or adds into)."""
        args = {ins.result: ins.attrs.index for ins in self.walk() if ins.op is Op.ARG}
        return {args[ins.srcs[0]] for ins in self.walk() if ins.op in (Op.STORE, Op.ATOMIC_ADD)}

    def tile_params(self) -> set[int]:
        """Indices of the global params some load, asynchronous load or store moves whole 2-D tiles of."""
        args = {ins.result: ins.attrs.index for ins in self.walk() if ins.op is Op.ARG}
        out = set()
        for ins in self.walk():
            if ins.op is Op.LOAD and len(ins.result.type.shape) == 2:
                out.add(args[ins.srcs[0]])
            elif ins.op is Op.ASYNC_LOAD and len(ins.result.type.shape) == 2:   # into a stage of a ring
                out.add(args[ins.srcs[2]])
            elif ins.op is Op.STORE and len(ins.srcs[1].type.shape) == 2:
                out.add(args[ins.srcs[0]])
        return out

    def constant_source(self, n: int) -> str:
        """`` (the constant BN=12 of this launch)``: the int constants equal to ``n``, for an error about a size
        that came from one (empty where none is)."""
        named = [k for k, c in self.constants.items() if type(c) is int and c == n]
        return f" (the constant {', '.join(f'{k}={n}' for k in named)} of this launch)" if named else ""

    def __str__(self) -> str:
        from tilestack.ir.printer import format_kernel
        return format_kernel(self)
