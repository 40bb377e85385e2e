"""Explicit hardware, opt-in: staged shared buffers, asynchronous loads and mmas, warp roles (ThunderKittens style).

    kv = ts.SharedStages[bf16, STAGES, BN, D]()          # a ring of STAGES shared tiles
    k_s = ts.SharedTile[bf16, BN, D]()
    for j in ts.range(n):
        s = j % STAGES
        with ts.partition("producer", warps=4, registers=40):
            ts.async_load(kv, s, K, at=(b, h, j, 0))      # TMA into stage s
        with ts.partition("consumer", warps=8, registers=232):
            ts.wait_load(k_s, kv, s)                      # the stage, once it has landed
            ts.mma_ABt_async(acc, q, k_s, acc)            # wgmma, in flight
            ts.mma_wait(acc)                              # done

Meaning (the reference executor's): synchronous. An async load has landed when the next op runs, an async mma
is done when issued, and the roles' instructions run in program order (one valid interleaving of the warps).
Backends that schedule explicitly (Gluon: TMA, mbarriers, wgmma, warp_specialize) lower them; the Triton
backend's passes erase them (a wait becomes the load it waits for, an async mma a plain one, roles vanish) and
hand the stage count to Triton's pipeliner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tilestack.errors import MemorySpaceError, TileDTypeError, TileShapeError, TraceError
from tilestack.ir.nodes import Role
from tilestack.ir.ops import Op
from tilestack.ir.types import DType, StagesType
from tilestack.lang.ops import _coords, _mma, _name, _need_tile, _write
from tilestack.lang.tiles import GlobalTensor, Tile, as_index
from tilestack.lang.trace import current, user_line, user_name


class Stages(Tile):
    """A multi-stage shared buffer handle: written by ``async_load``, read one stage at a time by ``wait_load``."""

    def __init__(self, type_: StagesType):
        super().__init__(type_)
        ins = current("SharedStages").emit(Op.STAGES, (), (type_,), user_line(), hint=user_name(self))
        ins.result.buffer = self.uid
        self._value = ins.result
        self.loaded = False     # whether an async_load into it has been traced yet (wait_load checks it)


class _StagesFamily:
    def __getitem__(self, key) -> _StagesSpec:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) not in (3, 4) or not isinstance(key[0], DType):
            raise TraceError(f"SharedStages[...] takes a dtype, a stage count and 1 or 2 sizes, like "
                             f"SharedStages[bf16, 3, 64, 128]; got {key!r}", user_line())
        dtype, stages, *shape = key
        for s in (stages, *shape):
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise TileShapeError(f"SharedStages sizes and stage counts are positive compile-time ints; got "
                                     f"{s!r}", user_line())
        return _StagesSpec(StagesType(dtype, tuple(shape), stages))

    def __repr__(self) -> str:
        return "SharedStages"


class _StagesSpec:
    def __init__(self, type_: StagesType):
        self.type = type_

    def __call__(self) -> Stages:
        return Stages(self.type)

    def __repr__(self) -> str:
        return str(self.type)


SharedStages = _StagesFamily()


def _need_stages(opname: str, buf) -> Stages:
    if not isinstance(buf, Stages):
        raise TraceError(f"{opname}: buf must be a SharedStages buffer, got {type(buf).__name__} {buf!r}",
                         user_line())
    return buf


def _stage(opname: str, buf: Stages, stage):
    if isinstance(stage, int) and not isinstance(stage, bool) and not 0 <= stage < buf.type.stages:
        raise TileShapeError(f"{opname}: stage {stage} of `{_name(buf)}`, which has {buf.type.stages} stages",
                             user_line())
    return as_index(stage, f"{opname}: stage")


def async_load(buf: Stages, stage, src: GlobalTensor, at=None) -> None:
    """Start loading a tile of global ``src`` at tile coordinates ``at`` into stage ``stage`` of ``buf`` (edges
    past the tensor read as zero); ``wait_load`` gives it. ``stage`` must be in [0, stages) when the kernel runs."""
    _need_stages("async_load", buf)
    if not isinstance(src, GlobalTensor):
        raise TraceError(f"async_load: src must be a global tensor argument, got {src!r}", user_line())
    if at is None:
        raise TraceError(f"async_load: give the tile coordinates in `{src.name}` with at=(...)", user_line())
    if src.dtype != buf.dtype:
        raise TileDTypeError(f"async_load: `{src.name}` is {src.dtype} but `{_name(buf)}` holds {buf.dtype}; the "
                             "copy engine does not convert", user_line())
    s = _stage("async_load", buf, stage)
    coords = _coords("async_load", src, buf, at)      # buf's shape is one stage's
    _write(buf, Op.ASYNC_LOAD, (buf.value("async_load"), s.v, src.v) + coords, buf.shape, "async_load")
    buf.loaded = True


def wait_load(dst: Tile, buf: Stages, stage) -> None:
    """Wait until stage ``stage`` of ``buf`` has landed; ``dst`` (a SharedTile of one stage's type) is it."""
    _need_tile("wait_load", "dst", dst)
    _need_stages("wait_load", buf)
    if dst.type != buf.type.stage:
        raise MemorySpaceError(f"wait_load: dst `{_name(dst)}` is a {dst.type}; a stage of `{_name(buf)}` is a "
                               f"{buf.type.stage}", user_line())
    if not buf.loaded:
        # (a stage no async_load ever filled: the reference executor read the buffer's initial contents, the Triton
        # backend refused it as "this wait's load is elsewhere", naming neither mistake nor buffer)
        raise TraceError(f"wait_load: `{_name(buf)}` is waited on before any async_load into it; a stage is read "
                         f"once an async_load has filled it: issue ts.async_load({_name(buf)}, stage, X, at=...) "
                         "first (before the loop, for a ring primed ahead of it)", user_line())
    s = _stage("wait_load", buf, stage)
    _write(dst, Op.WAIT_LOAD, (buf.value("wait_load"), s.v), dst.shape, "wait_load")


def _mma_async(dst, a, b, acc, trans_a: bool, trans_b: bool, opname: str) -> None:
    _mma(dst, a, b, acc, trans_a, trans_b, opname, Op.MMA_ASYNC)   # every check of mma

def mma_AB_async(dst, a, b, acc):
    """Issue dst = a @ b + acc on the matrix units; read dst only after ``mma_wait(dst)``."""
    _mma_async(dst, a, b, acc, False, False, "mma_AB_async")


def mma_ABt_async(dst, a, b, acc):
    """Issue dst = a @ b.T + acc; read dst only after ``mma_wait(dst)``."""
    _mma_async(dst, a, b, acc, False, True, "mma_ABt_async")


def mma_wait(dst: Tile) -> None:
    """Wait for the async mmas in flight into ``dst``."""
    _need_tile("mma_wait", "dst", dst)
    _write(dst, Op.MMA_WAIT, (dst.value("mma_wait"),), dst.shape, "mma_wait")


@contextlib.contextmanager
def partition(role: str, *, warps: int, registers: int, groups: int = 1) -> Iterator[None]:
    """Mark the ops traced inside as run by warp role ``role``: ``warps`` warps (in ``groups`` groups that take
    turns, e.g. ping-pong consumers), at most ``registers`` registers per thread. A role is declared by its first
    use and keeps its numbers; roles do not nest."""
    tr = current("partition")
    where = user_line()
    if not isinstance(role, str) or not role.isidentifier():
        raise TraceError(f"partition: role must be a name, got {role!r}", where)
    decl = Role(warps, registers, groups)
    if tr.roles.setdefault(role, decl) != decl:
        raise TraceError(f"partition: role {role} was declared as {tr.roles[role]}; here it is {decl}", where)
    if tr.role:
        raise TraceError(f"partition: role {role} inside role {tr.role}; roles do not nest", where)
    tr.role = role
    try:
        yield
    finally:
        tr.role = ""


def _turn_order(opname: str, roles: tuple) -> tuple[str, ...]:
    tr = current(opname)
    where = user_line()
    order = tuple(roles)
    if len(order) < 2 or len(set(order)) != len(order) or not all(isinstance(r, str) and r.isidentifier()
                                                                    for r in order):
        raise TraceError(f"{opname}: roles={order!r}; expected two or more distinct role names, in turn order", where)
    if tr.role not in order:
        inside = f"inside role {tr.role!r}" if tr.role else "outside any role"
        raise TraceError(f"{opname}: taken {inside}; expected inside one of the roles {order} (ts.partition)", where)
    return order


def wait_turn(*roles: str) -> None:
    """Wait until it is this role's turn among ``roles`` (``turn`` is the usual way; this and ``pass_turn`` are
    for a turn that spans blocks of other roles, e.g. a consumer's whole main loop whose loads a producer
    issues in the same loop)."""
    order = _turn_order("wait_turn", roles)
    current("wait_turn").emit(Op.TURN_WAIT, (), (), user_line(), order=order)


def pass_turn(*roles: str) -> None:
    """Hand the turn this role holds among ``roles`` to the next role (the last role's to the first)."""
    order = _turn_order("pass_turn", roles)
    current("pass_turn").emit(Op.TURN_PASS, (), (), user_line(), order=order)


@contextlib.contextmanager
def turn(*roles: str) -> Iterator[None]:
    """Run the ops traced inside in turn with the other roles of ``roles``: this role waits until it is its turn
    (``wait_turn``), and hands the turn to the next role when the block ends (``pass_turn``); the roles go in the
    order given, round and round, the first first. FlashAttention-3's ping-pong is two consumer roles that issue
    their matrix products in turn, so one's products run while the other does its softmax::

        with ts.partition("consumer0", warps=4, registers=240):
            with ts.turn("consumer0", "consumer1"):
                ts.mma_ABt_async(s, q, k_s, s)
                ts.mma_AB_async(acc, p, v_s, acc)

    Every role of ``roles`` takes as many turns in each loop (ir.verify checks). Timing only: the reference runs
    program order, the Triton backend (no roles) drops the turns, the Gluon backend makes them named barriers
    (``bar.sync`` / ``bar.arrive``)."""
    wait_turn(*roles)
    yield
    pass_turn(*roles)


__all__ = ["SharedStages", "Stages", "async_load", "wait_load", "mma_AB_async", "mma_ABt_async", "mma_wait",
           "partition", "turn", "wait_turn", "pass_turn"]
