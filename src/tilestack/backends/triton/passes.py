"""The Triton backend's passes, after the neutral ones (``ir.passes``): what Triton can lower, how each tile
moves, and what the kernel function takes.

    erase_async    staged async loads become the loads their waits wait for, async mmas plain ones, roles go;
                   a loop's staged buffers become its pipelining depth (``tl.range(num_stages=...)``)
    dce.erased     what erasure left unread (the staged buffers)
    legalize       power-of-two tiles of at most 2**20 elements, an emitter for every op (else the op and the
                   user's line)
    choose_access  each load/store through the copy engine (TMA descriptors) or through pointers (a masked store
                   through pointers)
    prune_params   the parameters the device code reads (``KernelIR.reads``), from the IR

``pipeline(tma)`` is the whole list for one launch mode; ``codegen.generate`` emits its result.
"""

from __future__ import annotations

import dataclasses
import math

from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import AccessAttrs, Op, check_lowerable, mask_of
from tilestack.ir.passes import DCE, SPLIT_HOST, Pass, Pipeline, clone, dead_code
from tilestack.ir.types import Space, StagesType, TileType, bool_

TMA_MAX_BOX = 256   # elements per dimension of one copy-engine transfer (a wider tile goes through pointers)
MAX_NUMEL = 2**20   # elements of one Triton tensor (triton.language's TRITON_MAX_TENSOR_NUMEL)
DOT_MIN_DIM = 16    # tl.dot's smallest tile dimension (a product with a smaller one is a broadcast sum: codegen)
TMA_MAX_RANK = 5    # dimensions a copy-engine descriptor addresses (a global of more goes through pointers)
TMA_MIN_ROW_BYTES = 16   # bytes the innermost box dimension moves at least (a narrower tile goes through pointers)


# no emitter: erased (turns order warp roles, which Triton has none of)
ERASED = frozenset({Op.STAGES, Op.ASYNC_LOAD, Op.WAIT_LOAD, Op.MMA_ASYNC, Op.MMA_WAIT, Op.TURN_WAIT, Op.TURN_PASS})


def erase_async(ir: KernelIR) -> KernelIR:
    """The explicit-hardware ops as Triton sees them. A ``wait_load`` of the stage an ``async_load`` has just
    written (the same buffer version and stage value) becomes a plain load of that tile, where the wait is; an
    ``mma_async`` becomes an ``mma`` and its ``mma_wait`` goes (its uses read the mma); warp roles and their turns
    are dropped.
    A loop that async-loads into a buffer of S > 1 stages and asks no depth itself gets ``stages=S`` (Triton's
    pipeliner then keeps S loads in flight). A wait whose load is elsewhere (another iteration) has no plain
    equivalent here: BackendError naming its line. The stage values may be two computations of one index
    (``j % STAGES`` written at the load and again at the wait)."""
    out = clone(ir, roles={})
    writer: dict[Value, Instr] = {ins.result: ins for ins in out.walk() if ins.op is Op.ASYNC_LOAD}
    alias: dict[Value, Value] = {}
    _erase(out.body, writer, alias, None, {r: ins for ins in out.walk() for r in ins.results})
    if alias:
        _rename(out.body, alias)
    return out


def _same_index(a: Value, b: Value, made: dict[Value, Instr]) -> bool:
    """Whether index values ``a`` and ``b`` are one value or computed alike: equal constants, or one size, or one
    scalar function of operands computed alike."""
    if a is b:
        return True
    x, y = made.get(a), made.get(b)
    if x is None or y is None or x.op is not y.op or x.op not in (Op.CONST, Op.DIM, Op.SCALAR) or \
            a.type != b.type or x.attrs != y.attrs or len(x.srcs) != len(y.srcs):
        return False
    return all(_same_index(s, t, made) for s, t in zip(x.srcs, y.srcs, strict=True))


def _erase(block: Block, writer: dict, alias: dict, loop: Instr | None, made: dict) -> None:
    kept = []
    for ins in block.instrs:
        ins.role = ""
        if ins.op is Op.WAIT_LOAD:
            buf, stage = ins.srcs
            load = writer.get(buf)
            if load is None or not _same_index(load.srcs[1], stage, made):
                raise BackendError(f"{ins.where}: the Triton backend erases staged loads only where a wait_load "
                                   "reads the stage its async_load has just written (in the same iteration); "
                                   "this wait's load is elsewhere")
            ins = Instr(Op.LOAD, ins.results, load.srcs[2:], AccessAttrs(), None, ins.where)
        elif ins.op is Op.MMA_ASYNC:
            ins = dataclasses.replace(ins, op=Op.MMA)
        elif ins.op is Op.MMA_WAIT:
            alias[ins.result] = ins.srcs[0]
            continue
        elif ins.op in (Op.TURN_WAIT, Op.TURN_PASS):
            continue
        elif ins.op is Op.ASYNC_LOAD and loop is not None and loop.attrs.stages is None:
            n = ins.result.type.stages
            if n > 1:
                loop.attrs = dataclasses.replace(loop.attrs, stages=n)
        if ins.body is not None:
            _erase(ins.body, writer, alias, ins if ins.op is Op.RANGE else loop, made)
        kept.append(ins)
    block.instrs = kept


def _rename(block: Block, alias: dict) -> None:
    def r(v):
        while v in alias:
            v = alias[v]
        return v
    for ins in block.walk():
        ins.srcs = tuple(r(s) for s in ins.srcs)
        if ins.body is not None:
            ins.body.yields = [r(y) for y in ins.body.yields]


def legalize(ir: KernelIR) -> KernelIR:
    check_lowerable("triton", ir.body)
    for ins in ir.walk():
        for v in ins.results + ins.srcs:
            if isinstance(v.type, TileType | StagesType):
                for n in v.type.shape:
                    if n & (n - 1):
                        raise BackendError(f"{ins.where}: the Triton backend needs power-of-two tile sizes; "
                                           f"{ins.op.value} uses a {v.type} (pad the tile and mask the edge)"
                                           f"{ir.constant_source(n)}")
            if isinstance(v.type, TileType) and math.prod(v.type.shape) > MAX_NUMEL:
                raise BackendError(f"{ins.where}: {ins.op.value} uses a {v.type}, {math.prod(v.type.shape)} "
                                   f"elements; a Triton tensor holds at most {MAX_NUMEL} (2**20): use smaller tiles "
                                   "and loop over them")
        if ins.op is Op.MMA:
            _check_small_product(ins)
    return ir


def _check_small_product(ins: Instr) -> None:
    """A product with a dimension under DOT_MIN_DIM is summed from its (M, K, N) f32 products (codegen._e_mma):
    that tensor too must fit MAX_NUMEL (Triton's interpreter failed on it: "numel ... exceeds triton maximum")."""
    _, a, b = ins.srcs
    m, n = ins.result.type.shape
    k = a.type.shape[0] if ins.attrs.trans_a else a.type.shape[1]
    if min(m, n, k) < DOT_MIN_DIM and m * k * n > MAX_NUMEL:
        raise BackendError(f"{ins.where}: a ({m}, {k}) x ({k}, {n}) product has a dimension under {DOT_MIN_DIM}, "
                           f"which the Triton backend sums from its {m} x {k} x {n} = {m * k * n} products at once; "
                           f"a Triton tensor holds at most {MAX_NUMEL} (2**20): split K into a loop of smaller "
                           "products")


def uses_tma(rank: int, shape: tuple[int, ...], space: Space | None, itemsize: int) -> bool:
    """Loads into shared tiles and stores of 2-D tiles go through the copy engine when the layout allows it
    (checked at launch): TMA fetches whole tiles, zero-fills past the edges and clips stores. A global of more than
    TMA_MAX_RANK dimensions (e.g. a convolution's window view) goes through pointers: Triton's pipeliner fails on a
    descriptor of more ("TMA copies must have between 1 and 5 coordinates"). So does a tile whose rows are narrower
    than TMA_MIN_ROW_BYTES (a (BM, 1) column of f64): Triton refuses its descriptor when the kernel is compiled
    ("Descriptor block shape must have at least 16 bytes in the last dimension")."""
    return (len(shape) == 2 and 2 <= rank <= TMA_MAX_RANK and space is not Space.REG
            and max(shape) <= TMA_MAX_BOX and shape[-1] * itemsize >= TMA_MIN_ROW_BYTES)


def choose_access(tma: bool):
    def run(ir: KernelIR) -> KernelIR:
        out = clone(ir)
        for ins in out.walk():
            # (a bool global through pointers: Triton types it i1, and a copy-engine box of i1 has 0 bytes a row;
            # a masked store too: the copy engine writes whole boxes, clipped only at the global's edges)
            copy_engine = tma and ins.op in (Op.LOAD, Op.STORE) and ins.srcs[0].type.dtype is not bool_ \
                and mask_of(ins) is None
            g = ins.srcs[0].type if ins.op in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD) else None
            if ins.op is Op.LOAD:
                t = ins.result.type
                via = "tma" if copy_engine and uses_tma(g.rank, t.shape, t.space, g.dtype.itemsize) \
                    else "pointer"
            elif ins.op is Op.STORE:
                via = "tma" if copy_engine and uses_tma(g.rank, ins.srcs[1].type.shape, None, g.dtype.itemsize) \
                    else "pointer"
            elif ins.op is Op.ATOMIC_ADD:
                via = "pointer"
            else:
                continue
            ins.attrs = type(ins.attrs)(via=via)
        return out
    return run


def prune_params(ir: KernelIR) -> KernelIR:
    """What the device code reads: a pointer access reads the global's pointer, every size (its masks) and every
    stride; a TMA access one descriptor per (global, box), in order of first use; a size read in the body its
    size; a runtime scalar read in the body itself."""
    index = {}
    used = set()
    pointer, dims, descs = set(), set(), {}
    for ins in ir.walk():
        used.update(ins.srcs)
        if ins.body is not None:
            used.update(ins.body.yields)
        if ins.op is Op.ARG:
            index[ins.result] = ins.attrs.index
    for ins in ir.walk():
        if ins.op is Op.DIM and ins.result in used:
            dims.add((index[ins.srcs[0]], ins.attrs.axis))
        elif ins.op is Op.LOAD_SCALAR:          # a pointer read of one element: pointer, sizes, strides
            pointer.add(index[ins.srcs[0]])
        elif ins.op in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD):
            g = ins.srcs[0]
            if ins.attrs.via == "tma":
                shape = ins.result.type.shape if ins.op is Op.LOAD else ins.srcs[1].type.shape
                block = (1,) * (g.type.rank - len(shape)) + tuple(shape)
                descs.setdefault((index[g], block), None)
            else:
                pointer.add(index[g])
    reads = []
    for i, p in enumerate(ir.params):
        if p.is_global:
            if i in pointer:
                reads.append(("ptr", i))
            reads += [("dim", i, a) for a in range(p.type.rank) if i in pointer or (i, a) in dims]
            reads += [("stride", i, a) for a in range(p.type.rank) if i in pointer]
        elif any(ins.op is Op.ARG and ins.attrs.index == i and ins.result in used for ins in ir.body.instrs):
            reads.append(("scalar", i))
    reads += [("desc", i, block) for i, block in descs]
    return clone(ir, reads=tuple(reads))


def pipeline(tma: bool) -> Pipeline:
    return Pipeline([
        SPLIT_HOST, DCE,
        Pass("erase_async", erase_async, "explicit-hardware ops as Triton's plain ones"),
        Pass("dce.erased", dead_code, "what erasure left unread"),
        Pass("legalize", legalize, "what Triton can lower"),
        Pass("choose_access", choose_access(tma), "copy engine or pointers, per load and store"),
        Pass("prune_params", prune_params, "the parameters the device code reads"),
    ])
