"""The tile-op vocabulary's memory ops: tiles in and out of global tensors (``load``, ``store``, ``atomic_add``) and one
element as a runtime scalar (``load_scalar``). As the rest of the vocabulary (``lang.ops``, which re-exports these),
each checks its operands when traced and records one IR instruction.

    load(q, Q, at=(b, h, i, 0)); store(O, o, at=(b, h, i, 0), mask=keep); atomic_add(DQ, dq, at=(b, h, i, 0))
"""

from __future__ import annotations

from tilestack.errors import MemorySpaceError, TileDTypeError, TileShapeError, TraceError
from tilestack.ir.ops import Op
from tilestack.ir.types import FLOAT, INDEX, Space, bool_, f16, f32, f64, i32, i64
from tilestack.lang.ops import _hint, _name, _need_reg, _need_tile, _PerAxis, _write, copy
from tilestack.lang.tiles import GlobalTensor, Scalar, Tile, as_index
from tilestack.lang.trace import current, user_line, user_name


def _shown(at) -> str:
    """``at`` as the user wrote it: a Scalar by the local name it is bound to (``(n, i, j)``, not
    ``(Scalar(%v15), ...)``), or as an index known when the kernel runs."""
    parts = [(user_name(c) or "<index>") if isinstance(c, Scalar) else repr(c) for c in at]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def _coords(opname: str, g: GlobalTensor, tile: Tile, at) -> tuple:
    at = at if isinstance(at, tuple | list) else (at,)
    if len(at) != g.rank:
        raise TraceError(f"{opname}: at={_shown(at)} has {len(at)} coordinates but `{g.name}` has rank "
                         f"{g.rank}; give one per axis (the last {len(tile.shape)} count whole tiles)",
                         user_line())
    if g.rank < len(tile.shape):
        raise TileShapeError(f"{opname}: a {tile.type} does not fit rank-{g.rank} `{g.name}`", user_line())
    return tuple(as_index(c, f"{opname}: at[{k}]").v for k, c in enumerate(at))


def load(dst: Tile, src, at=None) -> None:
    """Load ``dst`` from a global at tile coordinates ``at`` (edges past the tensor read as zero), or from a
    shared tile. A load into a shared tile is asynchronous: it overlaps with the work before its first use."""
    _need_tile("load", "dst", dst)
    if isinstance(src, Tile):
        if at is not None:
            raise TraceError("load: `at` is for global sources; a tile-to-tile load copies whole tiles",
                             user_line())
        if src.space is not Space.SHARED or dst.space is not Space.REG:
            raise MemorySpaceError(f"load: tile-to-tile loads go shared -> register; got {src.type} -> "
                                   f"{dst.type}", user_line())
        copy(dst, src)
        return
    if not isinstance(src, GlobalTensor):
        raise TraceError(f"load: src must be a global tensor argument or a shared tile, got {src!r}",
                         user_line())
    if at is None:
        raise TraceError(f"load: give the tile coordinates in `{src.name}` with at=(...)", user_line())
    coords = _coords("load", src, dst, at)
    _write(dst, Op.LOAD, (src.v,) + coords, dst.shape, "load")


def load_scalar(src, *index) -> Scalar:
    """One element of global ``src`` at element indices ``index`` (one per axis, ints or index Scalars), as a
    Scalar: an index for an integer or bool tensor, a float (its f32 value) for a float one, kept f64 where an
    f64 tensor's element is taken by f64 work; 0 where an index falls outside ``src``. What a loop bound or a tile coordinate read from memory is made of::

        start, end = ts.load_scalar(CU_SEQLENS, b), ts.load_scalar(CU_SEQLENS, b + 1)   # a varlen batch
        for j in ts.range(start // BN, ts.cdiv(end, BN)): ...
        page = ts.load_scalar(BLOCK_TABLE, b, j)                                       # a paged KV cache
        ts.load(k, K_CACHE, at=(page, h, 0, 0))
    """
    if not isinstance(src, GlobalTensor):
        what = f"the tile `{_name(src)}` ({src.type})" if isinstance(src, Tile) else f"{type(src).__name__} {src!r}"
        raise TraceError(f"load_scalar: src must be a global tensor argument, got {what} (a register or shared "
                         "tile's elements are read by tile ops)", user_line())
    if len(index) != src.rank:
        raise TraceError(f"load_scalar: {len(index)} indices for `{src.name}` of rank {src.rank}; give one element "
                         "index per axis", user_line())
    idx = tuple(as_index(c, f"load_scalar: index {k} into `{src.name}`").v for k, c in enumerate(index))
    kind = FLOAT if src.dtype.is_float else INDEX
    return Scalar(current("load_scalar").emit(Op.LOAD_SCALAR, (src.v, *idx), (kind,), user_line()).result)


def _store_mask(opname: str, src: Tile, mask) -> tuple:
    """The operands a store's or atomic add's ``mask`` adds: none for None, else its value, after checking it is a
    bool_ register tile (or vector) of ``src``'s shape."""
    if mask is None:
        return ()
    if isinstance(mask, _PerAxis):
        raise TileShapeError(f"{opname}: mask is per_{mask.axis}(`{_name(mask.vec)}`); expected a mask of src "
                             f"`{_name(src)}`'s shape {src.shape}: broadcast it first (fill(m, 1); "
                             f"logical_and(m, m, per_{mask.axis}(v)))", user_line())
    if not isinstance(mask, Tile):
        raise TraceError(f"{opname}: mask must be a bool_ register tile of src `{_name(src)}`'s shape {src.shape} "
                         f"(made by lt, ge, logical_and, ...), got {type(mask).__name__} {mask!r}{_hint(mask)}",
                         user_line())
    if mask.dtype is not bool_:
        raise TileDTypeError(f"{opname}: mask `{_name(mask)}` is {mask.dtype}; expected a bool_ mask (make it with "
                             "lt, ge, eq, ... or logical_and)", user_line())
    if mask.shape != src.shape:
        raise TileShapeError(f"{opname}: mask `{_name(mask)}` is {mask.shape} but src `{_name(src)}` is "
                             f"{src.shape}; expected a mask of src's shape", user_line())
    _need_reg(opname, "mask", mask)
    return (mask.value(opname),)


def store(dst, src: Tile, at=None, mask=None) -> None:
    """Store tile ``src`` into global ``dst`` at tile coordinates ``at`` (edges past the tensor are dropped).

    ``mask``: a bool_ register tile (or vector) of src's shape; only the elements where it is true are written, the
    others keep what ``dst`` held (as ``tl.store(..., mask=...)``): how a program that owns an unaligned slice of a
    tensor (rows [start, end) of a packed varlen batch) stores its own elements and not its neighbours'::

        ts.arange(rows, j * BM)                                 # (BM,) the tile's row indices
        ts.ge(keep, rows, start); ts.lt(inside, rows, end); ts.logical_and(keep, keep, inside)
        ts.fill(m, 1); ts.logical_and(m, m, ts.per_row(keep))   # (BM, D): this program's rows
        ts.store(OUT, y, at=(j, 0), mask=m)
    """
    _need_tile("store", "src", src)
    if not isinstance(dst, GlobalTensor):
        raise TraceError(f"store: dst must be a global tensor argument, got {dst!r}", user_line())
    if at is None:
        raise TraceError(f"store: give the tile coordinates in `{dst.name}` with at=(...)", user_line())
    coords = _coords("store", dst, src, at)
    masked = _store_mask("store", src, mask)
    current("store").emit(Op.STORE, (dst.v, src.value("store")) + coords + masked, (), user_line())


ATOMIC_DTYPES = (f64, f32, f16, i32, i64)   # what atomic adds into global memory exist for (not bf16)


def atomic_add(dst, src: Tile, at=None, mask=None) -> None:
    """``dst[tile at ``at``] += src``, each element atomically (edges past the tensor are dropped): sums over
    programs, e.g. a column sum split over row blocks. The order of the additions is not fixed, so a float
    sum may differ in its last bits from run to run. ``mask`` (a bool_ register tile of src's shape, as
    ``store``'s): only the elements where it is true are added."""
    _need_tile("atomic_add", "src", src)
    if not isinstance(dst, GlobalTensor):
        raise TraceError(f"atomic_add: dst must be a global tensor argument, got {dst!r}", user_line())
    if at is None:
        raise TraceError(f"atomic_add: give the tile coordinates in `{dst.name}` with at=(...)", user_line())
    _need_reg("atomic_add", "src", src)
    if dst.dtype not in ATOMIC_DTYPES:
        raise TileDTypeError(f"atomic_add: `{dst.name}` is {dst.dtype}; atomic adds go into "
                             f"{', '.join(map(str, ATOMIC_DTYPES))} tensors", user_line())
    if src.dtype is bool_:
        raise TileDTypeError(f"atomic_add: src `{_name(src)}` is a bool_ mask; expected numbers", user_line())
    coords = _coords("atomic_add", dst, src, at)
    masked = _store_mask("atomic_add", src, mask)
    current("atomic_add").emit(Op.ATOMIC_ADD, (dst.v, src.value("atomic_add")) + coords + masked, (), user_line())
