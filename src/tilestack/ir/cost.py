"""What a kernel costs for given sizes, exactly, from its IR: FLOPs, global bytes, on-chip footprints.

    cost = traced.cost(a, b, c)      # tensors, or shapes like (4096, 4096)
    cost.flops, cost.bytes_read, cost.bytes_written, cost.shared_bytes, cost.intensity

Index arithmetic is evaluated for every program of the grid and every loop iteration at once (NumPy
arrays over the instances), so trip counts that depend on the block id (causal attention) and tiles that
hang over the edge of a ragged tensor are counted as they run:
- FLOPs are the work the tile ops do, masked edges included: 2*M*N*K per mma, one per element for
  element-wise, broadcast and reduction ops, one per element an atomic add adds (casts, copies, fills and
  masking are free: masks, comparisons, logic on masks, where and arange).
- bytes are the global elements a load or store really touches (masked-off elements move nothing): the
  traffic the program asks of the memory system, much of which L2 serves when tiles are re-read. An atomic
  add reads and writes each element it touches.
- dram bytes are the compulsory part: each global counted at most once (its accessed bytes, capped at its
  size), what a perfect cache would still fetch from DRAM. Rooflines place kernels by this.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import Op
from tilestack.ir.scalars import apply_scalar, valid_extent
from tilestack.ir.types import GlobalType, Space, TileType

_FREE = {Op.FILL, Op.CAST, Op.MASK, Op.COMPARE, Op.LOGIC, Op.SELECT, Op.ARANGE}


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: int             # all tile arithmetic
    mma_flops: int         # the part done by matrix units
    bytes_read: int        # global memory, every access
    bytes_written: int
    dram_bytes_read: int   # compulsory: each global at most once
    dram_bytes_written: int
    shared_bytes: int      # shared tiles declared by one program (before any pipelining copies)
    register_bytes: int    # register tiles declared by one program (spread over its threads)
    programs: int          # grid size

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def dram_bytes(self) -> int:
        return self.dram_bytes_read + self.dram_bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per compulsory (DRAM) byte: the roofline's arithmetic intensity."""
        return self.flops / self.dram_bytes if self.dram_bytes else float("inf")


def grid_plan(kernel: KernelIR) -> list:
    """The entry instructions the grid depends on (its backward slice), to evaluate with plain ints."""
    need = set(kernel.grid)
    plan = []
    for ins in reversed(kernel.body.instrs):
        if ins.results and ins.results[0] in need:
            plan.append(ins)
            need.update(ins.srcs)
    return plan[::-1]


def grid_of(kernel: KernelIR, dims: dict[int, tuple[int, ...]], scalars: dict[int, float],
            plan: list | None = None) -> tuple[int, ...]:
    """The launch grid for argument sizes ``dims`` (param index -> shape)."""
    values: dict[Value, object] = {}
    args: dict[Value, int] = {}
    for ins in plan if plan is not None else grid_plan(kernel):
        if ins.op is Op.ARG:
            args[ins.result] = ins.attrs["index"]
            values[ins.result] = scalars.get(ins.attrs["index"])
        elif ins.op is Op.CONST:
            values[ins.result] = ins.attrs["value"]
        elif ins.op is Op.DIM:
            values[ins.result] = dims[args[ins.srcs[0]]][ins.attrs["axis"]]
        elif ins.op is Op.SCALAR:
            values[ins.result] = apply_scalar(ins.attrs["fn"], values[ins.srcs[0]], values[ins.srcs[1]])
        else:
            raise ValueError(f"grid depends on {ins.op.value} ({ins.where}); it may use only argument sizes, "
                             "scalars and constants")
    return tuple(int(values[g]) for g in kernel.grid)


def kernel_cost(kernel: KernelIR, dims: dict[int, tuple[int, ...]], scalars: dict[int, float]) -> Cost:
    grid = grid_of(kernel, dims, scalars)
    n = int(np.prod(grid))
    env = _Env(dims, scalars)
    env.block_ids = [np.asarray(a).reshape(-1) for a in np.unravel_index(np.arange(n), grid, order="F")]
    env.n = n
    env.grid = grid
    counts = {"flops": 0, "mma": 0, "read": 0, "written": 0, "per_global": {}}
    _eval_block(kernel.body, env, counts)
    shared, regs = _footprints(kernel)
    dram = {"read": 0, "written": 0}
    for (idx, key), b in counts["per_global"].items():
        size = int(np.prod(dims[idx])) * kernel.params[idx].type.dtype.itemsize
        dram[key] += min(b, size)
    return Cost(flops=int(counts["flops"]), mma_flops=int(counts["mma"]), bytes_read=int(counts["read"]),
                bytes_written=int(counts["written"]), dram_bytes_read=dram["read"],
                dram_bytes_written=dram["written"], shared_bytes=shared, register_bytes=regs, programs=n)


def _footprints(kernel: KernelIR) -> tuple[int, int]:
    """Bytes of the distinct shared and register tiles (by the tracer's tile handle) one program holds."""
    sizes: dict[int, tuple[Space, int]] = {}
    for ins in kernel.walk():
        if "dst" in ins.attrs and ins.results and isinstance(ins.results[0].type, TileType):
            t = ins.results[0].type
            sizes[ins.attrs["dst"]] = (t.space, t.nbytes)
    shared = sum(b for s, b in sizes.values() if s is Space.SHARED)
    regs = sum(b for s, b in sizes.values() if s is Space.REG)
    return shared, regs


class _Env:
    def __init__(self, dims, scalars):
        self.dims = dims
        self.scalars = scalars
        self.values: dict[Value, object] = {}
        self.block_ids: list[np.ndarray] = []
        self.arg_index: dict[Value, int] = {}
        self.grid: tuple = ()
        self.n = 1


def _eval_block(block: Block, env: _Env, counts) -> None:
    for ins in block.instrs:
        op = ins.op
        if op is Op.ARG:
            idx = ins.attrs["index"]
            env.arg_index[ins.result] = idx
            if not isinstance(ins.result.type, GlobalType):
                env.values[ins.result] = env.scalars.get(idx, 0.0)
        elif op is Op.CONST:
            env.values[ins.result] = ins.attrs["value"]
        elif op is Op.DIM:
            env.values[ins.result] = env.dims[env.arg_index[ins.srcs[0]]][ins.attrs["axis"]]
        elif op is Op.SCALAR:
            a, b = (env.values[s] for s in ins.srcs)
            env.values[ins.result] = apply_scalar(ins.attrs["fn"], a, b)
        elif op is Op.BLOCK_ID:
            env.values[ins.result] = env.block_ids[ins.attrs["axis"]]
        elif op is Op.NUM_BLOCKS:
            env.values[ins.result] = env.grid[ins.attrs["axis"]]
        elif op is Op.RANGE:
            _eval_range(ins, env, counts)
        elif op in (Op.LOAD, Op.STORE):
            _count_memory(ins, env, counts)
        elif op is Op.ATOMIC_ADD:   # a read-modify-write of each element, and one add
            counts["flops"] += _count_memory(ins, env, counts, "read")
            _count_memory(ins, env, counts, "written")
        elif op is Op.MMA:
            m, n = ins.result.type.shape
            a = ins.srcs[1].type.shape
            k = a[0] if ins.attrs["trans_a"] else a[1]
            counts["mma"] += 2 * m * n * k * env.n
            counts["flops"] += 2 * m * n * k * env.n
        elif op in _FREE or (op is Op.UNARY and ins.attrs["fn"] == "copy"):
            continue
        elif op is Op.REDUCE:
            counts["flops"] += ins.srcs[0].type.numel * env.n
        else:  # UNARY, BINARY, BROADCAST
            counts["flops"] += ins.result.type.numel * env.n


def _count_memory(ins, env: _Env, counts, key: str | None = None) -> int:
    """Count the global bytes one load, store or atomic add touches over all instances as ``key`` ("read" or
    "written"; by the op if None); returns the number of elements."""
    g = ins.srcs[0]
    tile = ins.result.type if ins.op is Op.LOAD else ins.srcs[1].type
    coords = ins.srcs[1:] if ins.op is Op.LOAD else ins.srcs[2:]
    dims = env.dims[env.arg_index[g]]
    per = valid_extent(dims, [env.values[c] for c in coords], tile.shape)
    total = np.sum(np.broadcast_to(np.asarray(per), (env.n,)), dtype=np.int64)
    key = key or ("read" if ins.op is Op.LOAD else "written")
    counts[key] += int(total) * g.type.dtype.itemsize
    slot = (env.arg_index[g], key)
    counts["per_global"][slot] = counts["per_global"].get(slot, 0) + int(total) * g.type.dtype.itemsize
    return int(total)


def _eval_range(ins, env: _Env, counts) -> None:
    lo, hi, step = (np.broadcast_to(np.asarray(env.values[s], dtype=np.int64), (env.n,)) for s in ins.srcs[:3])
    if (step == 0).any():
        raise ValueError(f"range step is 0 ({ins.where})")
    trips = np.maximum(-((lo - hi) // step), 0)       # ceil((hi - lo) / step), either sign of step
    total = int(trips.sum())
    if total == 0:
        return
    rep = np.repeat(np.arange(env.n), trips)
    starts = np.cumsum(trips) - trips
    k = np.arange(total) - np.repeat(starts, trips)
    inner = _Env(env.dims, env.scalars)
    inner.arg_index = env.arg_index
    inner.grid = env.grid
    inner.n = total
    for v, x in env.values.items():
        if isinstance(x, np.ndarray) and x.shape == (env.n,):
            inner.values[v] = x[rep]
        else:
            inner.values[v] = x
    inner.values[ins.body.args[0]] = lo[rep] + k * step[rep]
    _eval_block(ins.body, inner, counts)


