"""The Gluon backend's passes, after the neutral ones (``ir.passes``): what Gluon on sm_90a can lower, how each
tile moves, which loops it pipelines, and what the kernel function takes.

    persistent      (option) a 1-D grid's programs loop over tiles (grid-stride), so the host launches one per SM
    warp_specialize (option) a plain kernel's pipelinable loops split into warp roles, in the IR: their shared-tile
                    loads become async loads into staged rings by a producer warpgroup and waits by a consumer
                    role that runs every other tile op; accumulation chains become async mmas kept in flight,
                    waited after their loop (hand-scheduled kernels write the same ops themselves)
    kmajor_8bit     an 8-bit (f8e4m3) product's shared operand that wgmma would read with K as its outer axis (B of
                    a @ b, A of a.T @ b) is transposed through registers into a K-major shared tile first: wgmma
                    reads 8-bit operands K-major only
    legalize        an emitter for every op; wgmma-shaped matrix products; copy-engine boxes; roles it can split
    choose_access   shared-tile loads, async loads and 2-D stores through the copy engine (TMA descriptors) when
                    the launch's tensors allow it, else through pointers; register loads, 1-D stores, masked
                    stores and atomic adds through pointers
    schedule        a loop whose body loads shared tiles through the copy engine (coordinates computed from the
                    loop index and values from outside the loop) gets ``stages=S``: the emitter keeps S - 1 loads
                    in flight in a ring of S shared buffers with one mbarrier each (a plain kernel's pipelining
                    in one partition)
    prune_params    the parameters the device code reads (``KernelIR.reads``): Triton's rule, plus a descriptor
                    per async load

``pipeline(warps, stages, ...)`` is the whole list, in this order after ``split_host`` and ``dce``
(``persistent`` before them: it reads the grid); ``codegen.emit`` lowers its result.
"""

from __future__ import annotations

import dataclasses

from tilestack.backends.triton.passes import prune_params as _pointer_and_tma_reads
from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, KernelIR, Role, Value
from tilestack.ir.ops import (
    OPS,
    AccessAttrs,
    ConstAttrs,
    FnAttrs,
    NoAttrs,
    Op,
    RangeAttrs,
    check_lowerable,
    mask_of,
)
from tilestack.ir.passes import DCE, SPLIT_HOST, Pass, Pipeline, clone
from tilestack.ir.types import INDEX, GlobalType, Space, StagesType, TileType, bool_

TMA_MAX_BOX = 256          # elements per dimension of one copy-engine transfer
TMA_MIN_ROW_BYTES = 16     # the innermost box dimension moves at least 16 bytes
TMA_MAX_RANK = 5           # dimensions a copy-engine descriptor addresses (a global of more: through pointers)
WGMMA_DTYPES = ("bf16", "f16", "f8e4m3")   # operand dtypes the backend gives wgmma (f32 would be tf32: refused)
WGMMA_K = {"bf16": 16, "f16": 16, "f8e4m3": 32}   # the k of one wgmma instruction, per operand dtype
WARPGROUP_ROWS = 64        # rows of the accumulator one warpgroup (4 warps) covers per wgmma
WARP_ROWS = 16
PRODUCER = Role(warps=4, registers=40)   # a warpgroup that only issues copies: few registers (setmaxnreg)
REGISTER_FILE = 65536


def _fail(ins: Instr, msg: str) -> None:
    raise BackendError(f"{ins.where}: the gluon backend {msg}")


def tma_box_ok(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether one copy-engine transfer can move a tile of ``shape`` (each dimension 1..256 elements, a power of
    two, the innermost at least 16 bytes)."""
    return (all(0 < n <= TMA_MAX_BOX and not n & (n - 1) for n in shape)
            and shape[-1] * itemsize >= TMA_MIN_ROW_BYTES)


def kmajor_8bit(ir: KernelIR) -> KernelIR:
    """Hopper's wgmma reads 8-bit operands from shared memory K-major only (A as (M, K), B as (N, K), K contiguous):
    Triton's LLVM lowering aborted on an f8e4m3 ``mma_AB`` whose B tile is (K, N) ("WGMMA type or shape is not
    supported"). Such a B (and the A of ``mma_AtB`` / ``mma_AtBt``, a (K, M) tile) is transposed through registers
    into a K-major tile first: ``b_k = copy(transpose(b))`` into a new (N, K) shared tile read as ``b_k.T``, and A
    into registers (wgmma's A may come from registers)."""
    out = clone(ir)
    for block in _blocks(out.body):
        instrs: list[Instr] = []
        for ins in block.instrs:
            if ins.op is Op.MMA and ins.srcs[1].type.dtype.itemsize == 1:
                acc, a, b = ins.srcs
                trans_a, trans_b = ins.attrs.trans_a, ins.attrs.trans_b
                if a.type.space is Space.SHARED and trans_a:       # (K, M) -> registers (M, K)
                    a = _transposed(instrs, a, Space.REG, ins)
                    trans_a = False
                if b.type.space is Space.SHARED and not trans_b:   # (K, N) -> shared (N, K), read transposed
                    b = _transposed(instrs, b, Space.SHARED, ins)
                    trans_b = True
                if (a, b) != ins.srcs[1:]:
                    ins.srcs = (acc, a, b)
                    ins.attrs = dataclasses.replace(ins.attrs, trans_a=trans_a, trans_b=trans_b)
            instrs.append(ins)
        block.instrs = instrs
    return out


def _transposed(instrs: list[Instr], t: Value, space: Space, mma: Instr) -> Value:
    """Append to ``instrs`` the instructions making ``t``'s transpose in ``space`` (a new tile); return it."""
    reg = Value(TileType(Space.REG, t.type.dtype, t.type.shape[::-1]), hint=f"{t.hint or 't'}_kmajor")
    reg.buffer = reg.id
    instrs.append(Instr(Op.TRANSPOSE, (reg,), (t,), where=mma.where, role=mma.role))
    if space is Space.REG:
        return reg
    shared = Value(TileType(Space.SHARED, t.type.dtype, t.type.shape[::-1]), hint=f"{t.hint or 't'}_kmajor")
    shared.buffer = shared.id
    instrs.append(Instr(Op.CAST, (shared,), (reg,), where=mma.where, role=mma.role))
    return shared


def legalize(warps: int, tma: bool = True):
    """Refuse, naming the op and the user's line, what this backend cannot lower for ``warps`` warps per role."""
    def run(ir: KernelIR) -> KernelIR:
        check_lowerable("gluon", ir.body)
        for ins in ir.walk():
            for v in ins.results + ins.srcs:
                if isinstance(v.type, TileType | StagesType):
                    for n in v.type.shape:
                        if n & (n - 1):
                            _fail(ins, f"needs power-of-two tile sizes; {ins.op.value} uses a {v.type}"
                                       f"{ir.constant_source(n)}")
                    shared = isinstance(v.type, StagesType) or v.type.space is Space.SHARED
                    if shared and v.type.dtype is bool_:   # (its shared layouts take 8- to 64-bit elements)
                        _fail(ins, f"keeps bool_ masks in registers; {ins.op.value} uses a {v.type} (load the mask "
                                   "into a RegTile, or hold it as a u8 or i8 shared tile)")
            if ins.op in (Op.MMA, Op.MMA_ASYNC):
                _check_mma(ins, ir.roles[ins.role].warps if ins.role else warps)
            elif ins.op is Op.ASYNC_LOAD:
                st = ins.result.type
                rank = ins.srcs[2].type.rank                 # (srcs: the stages, the stage, the global, coords)
                if rank > TMA_MAX_RANK:
                    _fail(ins, f"moves async loads with the copy engine, which addresses globals of at most "
                               f"{TMA_MAX_RANK} dimensions; this one reads a rank-{rank} global "
                               "(load it with load() into a SharedTile, or view it with fewer dimensions)")
                if not tma_box_ok(st.shape, st.dtype.itemsize):
                    _fail(ins, f"moves async loads with the copy engine; a stage of {st} is no copy-engine box "
                               f"(sizes 1..{TMA_MAX_BOX}, the last >= {TMA_MIN_ROW_BYTES} bytes)")
            elif ins.op is Op.LOAD and ins.result.type.space is Space.SHARED and tma \
                    and ins.srcs[0].type.rank <= TMA_MAX_RANK and ins.srcs[0].type.dtype is ins.result.type.dtype:
                t = ins.result.type
                if not tma_box_ok(t.shape, t.dtype.itemsize):
                    _fail(ins, f"loads shared tiles with the copy engine; a {t} is no copy-engine box")
        if ir.roles:
            _check_roles(ir)
        return ir
    return run


def _check_mma(ins: Instr, warps: int) -> None:
    acc, a, b = ins.srcs
    if a.type.dtype.name not in WGMMA_DTYPES:
        _fail(ins, f"multiplies {'/'.join(WGMMA_DTYPES)} tiles on wgmma; {ins.op.value} has {a.type.dtype} "
                   "operands (use the triton backend, or cast the operands)")
    if b.type.space is not Space.SHARED:
        _fail(ins, f"needs wgmma's b operand in shared memory; b is a {b.type} (load it as a SharedTile)")
    if ins.op is Op.MMA_ASYNC and a.type.dtype.itemsize == 1 and not ins.attrs.trans_b:
        # (kmajor_8bit transposes a plain mma's operand; an async one reads its stage in flight, until its wait)
        _fail(ins, f"gives wgmma 8-bit operands K-major only; {ins.op.value} reads a {b.type} b as (K, N) (store B "
                   "as (N, K) and use mma_ABt_async, or transpose the stage into a SharedTile first: copy(r, b.T), "
                   "copy(b_t, r))")
    m, n = acc.type.shape
    k = a.type.shape[0] if ins.attrs.trans_a else a.type.shape[1]
    if m % (WARP_ROWS * warps) or m < WARPGROUP_ROWS:
        fewer = f", or num_warps={m // WARP_ROWS}" if m >= WARPGROUP_ROWS and m // WARP_ROWS % 4 == 0 else ""
        _fail(ins, f"gives each of the {warps} warps of a wgmma {WARP_ROWS}-row slices of the accumulator; "
                   f"{ins.op.value} accumulates {m} rows (need a multiple of {WARP_ROWS * warps}, >= "
                   f"{WARPGROUP_ROWS}: a (BM, BN) accumulator with BM a multiple of {WARP_ROWS * warps}{fewer})")
    if n % 8 or n > 256 or k % WGMMA_K[a.type.dtype.name]:
        _fail(ins, f"needs wgmma's n a multiple of 8 up to 256 and k a multiple of {WGMMA_K[a.type.dtype.name]}; "
                   f"{ins.op.value} has n={n}, k={k}")


def _check_roles(ir: KernelIR) -> None:
    """Roles share only staged buffers: a role reading another role's register value, or an effect outside
    every role, has no lowering to separate partitions."""
    owner: dict[Value, str] = {}
    for ins in ir.walk():
        for r in ins.results:
            owner[r] = ins.role
        if ins.body is not None:
            for a in ins.body.args:
                owner[a] = ins.role
    for ins in ir.walk():
        if OPS[ins.op].kind == "effect" and not ins.role:
            _fail(ins, f"splits warp roles into partitions; this {ins.op.value} belongs to no role "
                       "(put it inside a ts.partition)")
        if not ins.role:
            continue
        for s in ins.srcs:
            if isinstance(s.type, TileType) and owner.get(s, "") not in ("", ins.role):
                _fail(ins, f"splits warp roles into partitions that share only staged buffers; role {ins.role}'s "
                           f"{ins.op.value} reads {s!r}, which role {owner[s]} computes")
    for name, r in ir.roles.items():
        if r.groups != 1:
            raise BackendError(f"{ir.where}: the gluon backend makes one partition per role; role {name} has "
                               f"groups={r.groups} (declare each group as a role of its own)")
        if r.warps % 4:
            raise BackendError(f"{ir.where}: the gluon backend gives each role whole warpgroups (setmaxnreg); "
                               f"role {name} has {r.warps} warps")


def choose_access(tma: bool):
    """Shared-tile loads and 2-D stores through the copy engine when the launch's tensors allow it (``tma``:
    decided per launch from their strides and alignment), else through pointers (a shared tile then is stored
    from registers); register loads and atomic adds through pointers; async loads always through the engine."""
    def run(ir: KernelIR) -> KernelIR:
        return _choose_access(ir, tma)
    return run


def _choose_access(ir: KernelIR, tma: bool) -> KernelIR:
    out = clone(ir)
    for ins in out.walk():
        # a bool global (torch.bool, i1 to Triton) through pointers: the copy engine has no 1-bit element; a masked
        # store too: the copy engine writes whole boxes, clipped only at the global's edges
        engine = tma and ins.op in (Op.LOAD, Op.STORE) and ins.srcs[0].type.dtype is not bool_ \
            and mask_of(ins) is None
        if ins.op is Op.LOAD:
            # the copy engine writes the global's bytes into the shared tile unconverted: a tile of another dtype
            # (u8 codes loaded into an f16 shared tile) goes through registers, converted there (the descriptor's u8
            # box into an f16 buffer failed in Triton's LLVM lowering, and f16 into bf16 would be reinterpreted)
            via = "tma" if engine and ins.result.type.space is Space.SHARED \
                and ins.srcs[0].type.rank <= TMA_MAX_RANK and ins.srcs[0].type.dtype is ins.result.type.dtype \
                else "pointer"
        elif ins.op is Op.STORE:
            t = ins.srcs[1].type
            via = "tma" if engine and len(t.shape) == 2 and ins.srcs[0].type.rank <= TMA_MAX_RANK \
                and tma_box_ok(t.shape, ins.srcs[0].type.dtype.itemsize) else "pointer"
        elif ins.op is Op.ATOMIC_ADD:
            via = "pointer"
        elif ins.op is Op.ASYNC_LOAD:   # (of a bool tensor: into bool stages, refused by legalize)
            via = "tma"
        else:
            continue
        ins.attrs = AccessAttrs(via=via)
    return out


# ---- pipelining plain loops -------------------------------------------------------------------------------------
def scalar_slice(body: Block, values, index: Value) -> list[Instr] | None:
    """The body's instructions that compute ``values`` from the loop index and values defined outside the loop,
    in program order, if they are all scalar (so the emitter can recompute them for another trip); else None
    (a value carried by the loop, or made by a tile op or a nested loop, is no function of the trip alone)."""
    made = {r: ins for ins in body.instrs for r in ins.results}
    carried = set(body.args[1:])
    need: set[Instr] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        if v in carried:
            return None
        ins = made.get(v)
        if ins is None or ins in need:          # the index, a value from outside, or already taken
            continue
        if ins.op not in (Op.SCALAR, Op.CONST):
            return None
        need.add(ins)
        stack.extend(ins.srcs)
    return [ins for ins in body.instrs if ins in need]


def pipelined_loads(loop: Instr) -> list[Instr]:
    """The copy-engine loads of shared tiles at the top level of ``loop``'s body that the emitter pipelines: their
    coordinates are scalar functions of the loop index and of values from outside the loop."""
    body = loop.body
    out = []
    for ins in body.instrs:
        if ins.op is Op.LOAD and ins.attrs.via != "pointer" and ins.result.type.space is Space.SHARED \
                and scalar_slice(body, ins.srcs[1:], body.args[0]) is not None:
            out.append(ins)
    return out


def _const(value: int, where: str) -> Instr:
    return Instr(Op.CONST, (Value(INDEX),), (), ConstAttrs(value), where=where)


def _chain(body: Block, ins: Instr) -> bool:
    """Whether ``ins`` (an mma at the top of ``body``) only feeds the next trip's same mma as its acc."""
    r, acc = ins.result, ins.srcs[0]
    if ins not in body.instrs or r not in body.yields or acc not in body.args[1:] \
            or body.args[1 + body.yields.index(r)] is not acc:
        return False
    return not any((r in i.srcs) or (acc in i.srcs and i is not ins) for i in body.walk())


def deferrable(loop: Instr, ins: Instr) -> bool:
    """An mma of ``loop``'s body whose result only feeds the next trip's mma as its acc (an accumulation chain):
    it may stay in flight across trips, waited after the loop. Not where a loop nested in the body has mmas of its
    own: their accumulators are made in the trip (zeroed for each K tile of a gather) while the chain's wgmma is in
    flight, and ptxas then serializes every wgmma of the kernel (C7515: a GPTQ act-order GEMM gathering its scales
    by products in a loop inside its K loop). An mma beside the chain at the top of the body is synchronous and
    waits for it anyway."""
    body = loop.body
    nested = any(i not in body.instrs for i in body.walk() if i.op in (Op.MMA, Op.MMA_ASYNC))
    return not nested and _chain(body, ins) and not _restaged(loop, ins) and not _read_beside(loop, ins)


def _read_beside(loop: Instr, ins: Instr) -> bool:
    """Whether the trip also reads a shared operand of mma ``ins`` into registers (a cosine Gram matrix's row norms
    from the stage its product reads): with the wgmma kept in flight past it, ptxas serialized every wgmma (C7515:
    "non wgmma instructions defining accumulator registers ... between start and end of the pipeline stage"); waited
    in its trip, the kernel compiles unserialized, its loads still pipelined."""
    operands = {v for v in ins.srcs[1:3] if isinstance(v.type, TileType) and v.type.space is Space.SHARED}
    return any(i is not ins and i.op not in (Op.MMA, Op.MMA_ASYNC) and any(s in operands for s in i.srcs)
               and any(isinstance(r.type, TileType) and r.type.space is not Space.SHARED for r in i.results)
               for i in loop.body.walk())


def _restaged(loop: Instr, ins: Instr) -> bool:
    """Whether an operand of mma ``ins`` is a shared tile written in each trip other than through a ring stage (a
    load through pointers, one converting u8 codes to f16, or a copy from registers): the next trip writes its buffer
    while this trip's wgmma, kept in flight, may still read it, and ptxas serializes every wgmma (C7515)."""
    ring = set(pipelined_loads(loop))
    made = {r: i for i in loop.body.walk() for r in i.results}
    return any(isinstance(v.type, TileType) and v.type.space is Space.SHARED and v in made
               and made[v] not in ring and made[v].op is not Op.WAIT_LOAD for v in ins.srcs[1:3])


def warp_specialize(warps: int, stages: int):
    """Split a plain kernel's pipelinable loops (by steps of 1, loading shared tiles; all in one block, e.g. the
    attention's diagonal and full key blocks) into a producer and a consumer role. Loads of one global with one
    box share a ring, threaded through the loops in order. The result means what the input did (the reference
    executor runs both the same); kernels with roles already, or without such loops, pass through unchanged."""
    def run(ir: KernelIR) -> KernelIR:
        if ir.roles or stages < 2 or not any(i.op is Op.RANGE and pipelined_loads(i) for i in ir.walk()):
            return ir
        out = clone(ir)
        found = [(b, i) for b in _blocks(out.body) for i in b.instrs if i.op is Op.RANGE and pipelined_loads(i)]
        parent = found[0][0]
        made = {r: i for i in out.walk() for r in i.results}
        steps = [made.get(loop.srcs[2]) for _, loop in found]
        if any(b is not parent for b, _ in found) or not all(
                st is not None and st.op is Op.CONST and st.attrs.value == 1 for st in steps):
            return ir
        consumer_regs = min(256, (REGISTER_FILE - PRODUCER.warps * 32 * PRODUCER.registers) // (warps * 32) // 8 * 8)
        out.roles = {"consumer": Role(warps=warps, registers=consumer_regs), "producer": PRODUCER}
        for ins in out.walk():      # every tile op and effect is the consumer's; scalar work stays shared
            if OPS[ins.op].kind in ("tile", "effect"):
                ins.role = "consumer"
        rings: dict[tuple, Value] = {}      # (global, box, k-th such load of a trip) -> the ring's current version
        first = parent.instrs.index(found[0][1])
        for _, loop in found:
            _split_loop(parent, loop, rings, stages, first)
            first = parent.instrs.index(found[0][1])
        return out
    return run


def _split_loop(parent: Block, loop: Instr, rings: dict, stages: int, first: int) -> None:
    """One loop's shared-tile loads as async loads (producer) and waits (consumer) on rings carried through it;
    its accumulation chains as async mmas waited after it."""
    body = loop.body
    idx = body.args[0]
    count, stage = _const(stages, loop.where), None
    new_body: list[Instr] = []
    seen: dict[tuple, int] = {}
    for ins in body.instrs:
        if ins not in pipelined_loads(loop):
            new_body.append(ins)
            continue
        if stage is None:   # trips by steps of 1 visit the stages in turn, whatever the first index
            stage = Instr(Op.SCALAR, (Value(INDEX, "stage"),), (idx, count.result), FnAttrs("mod"), where=loop.where)
            new_body += [count, stage]
        t = ins.result.type
        st = StagesType(t.dtype, t.shape, stages)
        key = (ins.srcs[0], t.shape)
        key += (seen.setdefault(key, 0),)
        seen[key[:2]] += 1
        if key not in rings:            # a ring made before the first loop, so later loops can share it
            ring = Value(st, f"{ins.result.hint or 'tile'}_ring")
            ring.buffer = ring.id
            parent.instrs.insert(first, Instr(Op.STAGES, (ring,), (), NoAttrs(), where=ins.where))
            rings[key] = ring
        init = rings[key]
        arg, filled, res = (Value(st, init.hint, buffer=init.buffer) for _ in range(3))
        loop.srcs += (init,)
        loop.results += (res,)
        body.args.append(arg)
        body.yields.append(filled)
        rings[key] = res
        new_body.append(Instr(Op.ASYNC_LOAD, (filled,), (arg, stage.result, *ins.srcs), AccessAttrs("tma"),
                              where=ins.where, role="producer"))
        new_body.append(Instr(Op.WAIT_LOAD, ins.results, (filled, stage.result), NoAttrs(), where=ins.where,
                              role="consumer"))
    body.instrs = new_body
    waits = []
    for ins in body.instrs:     # accumulation chains stay in flight, waited once after the loop
        if ins.op is Op.MMA and deferrable(loop, ins):
            ins.op = Op.MMA_ASYNC
            r = loop.results[body.yields.index(ins.result)]
            done = Value(r.type, r.hint, buffer=r.buffer)
            waits.append(Instr(Op.MMA_WAIT, (done,), (r,), NoAttrs(), where=ins.where, role="consumer"))
    at = parent.instrs.index(loop) + 1
    parent.instrs[at:at] = waits
    rename = {w.srcs[0]: w.result for w in waits}
    for ins in parent.instrs[at + len(waits):]:
        for i in [ins, *(ins.body.walk() if ins.body is not None else ())]:
            i.srcs = tuple(rename.get(v, v) for v in i.srcs)
    parent.yields = [rename.get(v, v) for v in parent.yields]


def _blocks(block: Block):
    """``block`` and every loop body in it."""
    yield block
    for ins in block.instrs:
        if ins.body is not None:
            yield from _blocks(ins.body)


def persistent(ir: KernelIR) -> KernelIR:
    """A 1-D grid's programs as a persistent loop: ``for t in range(block_id, tiles, num_blocks)`` around
    everything that depends on the program id (``tiles``: the traced grid), so the host may launch fewer programs
    (one per SM) and a program's next tile overlaps its last one's epilogue. Launched with the full grid it does
    what the input did, one tile per program. Kernels with other grids or reading the grid size pass through."""
    if len(ir.grid) != 1 or any(i.op is Op.NUM_BLOCKS or (i.op is Op.BLOCK_ID and i.attrs.axis)
                                for i in ir.walk()):
        return ir
    out = clone(ir)
    ids = {r for i in out.walk() if i.op is Op.BLOCK_ID for r in i.results}
    if not ids:
        return ir
    tiles = out.grid[0]
    varying: set[Value] = set(ids)       # what depends on the program id: stays in the loop
    for ins in out.walk():
        if any(v in varying for v in ins.srcs) or OPS[ins.op].kind in ("tile", "effect", "loop") \
                or ins.op is Op.LOAD_SCALAR:     # (memory the tiles may write: read where the program reads it)
            varying.update(ins.results)
    prefix = [i for i in out.body.instrs if i.op is not Op.BLOCK_ID and not (set(i.results) & varying)
              and OPS[i.op].kind in ("scalar", "arg")]
    moved = [i for i in out.body.instrs if i not in prefix and i.op is not Op.BLOCK_ID]
    where = next((i.where for i in out.walk() if i.op is Op.BLOCK_ID), out.where)
    tile = Value(INDEX, "tile")
    first = Instr(Op.BLOCK_ID, (Value(INDEX, "pid"),), (), {"axis": 0}, where=where)
    step = Instr(Op.NUM_BLOCKS, (Value(INDEX, "programs"),), (), {"axis": 0}, where=where)
    loop = Instr(Op.RANGE, (), (first.result, tiles, step.result), RangeAttrs(), Block([tile], moved, []),
                 where=where)
    for i in loop.body.walk():
        i.srcs = tuple(tile if v in ids else v for v in i.srcs)
    out.body.instrs = prefix + [first, step, loop]
    return out


def schedule(stages: int):
    def run(ir: KernelIR) -> KernelIR:
        out = clone(ir)
        for ins in out.walk():
            if stages > 1 and ins.op is Op.RANGE and ins.attrs.stages is None and pipelined_loads(ins):
                ins.attrs = dataclasses.replace(ins.attrs, stages=stages)
        return out
    return run


def prune_params(ir: KernelIR) -> KernelIR:
    """Triton's rule for loads, stores and atomic adds (pointer: pointer, sizes, strides; TMA: one descriptor per
    (global, box)), plus one descriptor per (global, box) of the async loads."""
    out = _pointer_and_tma_reads(ir)
    index = {ins.result: ins.attrs.index for ins in ir.walk() if ins.op is Op.ARG}
    reads = list(out.reads)
    for ins in ir.walk():
        if ins.op is Op.ASYNC_LOAD:
            g: Value = ins.srcs[2]
            shape = ins.result.type.shape
            assert isinstance(g.type, GlobalType)
            read = ("desc", index[g], (1,) * (g.type.rank - len(shape)) + tuple(shape))
            if read not in reads:
                reads.append(read)
    out.reads = tuple(reads)
    return out


def pipeline(warps: int, stages: int, specialize: bool = False, persist: bool = False,
             tma: bool = True) -> Pipeline:
    """The whole list for one set of options; ``tma``: the launch's tensors can go through the copy engine (if
    not, shared tiles are loaded through pointers and nothing is pipelined or warp-specialized)."""
    return Pipeline([
        *([Pass("persistent", persistent, "a loop over tiles; the host launches one program per SM")]
          if persist else []),
        SPLIT_HOST, DCE,
        Pass("kmajor_8bit", kmajor_8bit, "8-bit wgmma operands K-major"),
        *([Pass("warp_specialize", warp_specialize(warps, stages), "a producer and a consumer role")]
          if specialize and tma else []),
        Pass("legalize", legalize(warps, tma), "what Gluon on sm_90a can lower"),
        Pass("choose_access", choose_access(tma), "copy engine or pointers, per load and store"),
        Pass("schedule", schedule(stages), "pipeline plain loops that load shared tiles"),
        Pass("prune_params", prune_params, "the parameters the device code reads"),
    ])
