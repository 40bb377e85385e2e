"""The Triton backend's passes, after the neutral ones (``ir.passes``): what Triton can lower, how each tile
moves, and what the kernel function takes.

    legalize       power-of-two tiles, mma tiles >= 16, an emitter for every op (else the op and the user's line)
    choose_access  each load/store through the copy engine (TMA descriptors) or through pointers
    prune_params   the parameters the device code reads (``KernelIR.reads``), from the IR

``pipeline(tma)`` is the whole list for one launch mode; ``codegen.generate`` emits its result.
"""

from __future__ import annotations

from tilestack.errors import BackendError
from tilestack.ir.nodes import KernelIR
from tilestack.ir.ops import Op, check_lowerable
from tilestack.ir.passes import DCE, SPLIT_HOST, Pass, Pipeline, clone
from tilestack.ir.types import Space, TileType

TMA_MAX_BOX = 256   # elements per dimension of one copy-engine transfer (a wider tile goes through pointers)
MMA_MIN_DIM = 16    # tl.dot's smallest tile dimension


def legalize(ir: KernelIR) -> KernelIR:
    check_lowerable("triton", ir.body)
    for ins in ir.walk():
        for v in ins.results + ins.srcs:
            if isinstance(v.type, TileType):
                for n in v.type.shape:
                    if n & (n - 1):
                        raise BackendError(f"{ins.where}: the Triton backend needs power-of-two tile sizes; "
                                           f"{ins.op.value} uses a {v.type} (pad the tile and mask the edge)")
        if ins.op is Op.MMA:
            for v in (ins.result, ins.srcs[1], ins.srcs[2]):
                if min(v.type.shape) < MMA_MIN_DIM:
                    raise BackendError(f"{ins.where}: the Triton backend's mma needs every tile dimension "
                                       f">= {MMA_MIN_DIM}; got {v.type}")
    return ir


def uses_tma(rank: int, shape: tuple[int, ...], space: Space | None) -> bool:
    """Loads into shared tiles and stores of 2-D tiles go through the copy engine when the layout allows it
    (checked at launch): TMA fetches whole tiles, zero-fills past the edges and clips stores."""
    return len(shape) == 2 and rank >= 2 and space is not Space.REG and max(shape) <= TMA_MAX_BOX


def choose_access(tma: bool):
    def run(ir: KernelIR) -> KernelIR:
        out = clone(ir)
        for ins in out.walk():
            if ins.op is Op.LOAD:
                t = ins.result.type
                via = "tma" if tma and uses_tma(ins.srcs[0].type.rank, t.shape, t.space) else "pointer"
            elif ins.op is Op.STORE:
                via = "tma" if tma and uses_tma(ins.srcs[0].type.rank, ins.srcs[1].type.shape, None) else "pointer"
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
        Pass("legalize", legalize, "what Triton can lower"),
        Pass("choose_access", choose_access(tma), "copy engine or pointers, per load and store"),
        Pass("prune_params", prune_params, "the parameters the device code reads"),
    ])
