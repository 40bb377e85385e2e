"""What a kernel costs for given sizes, exactly, from its IR: FLOPs, global bytes, on-chip footprints.

    cost = traced.cost(a, b, c)      # tensors, or shapes like (4096, 4096)
    cost.flops, cost.bytes_read, cost.bytes_written, cost.shared_bytes, cost.intensity

Index arithmetic is evaluated for every program of the grid and every loop iteration at once (NumPy
arrays over the instances), so trip counts that depend on the block id (causal attention) and tiles that
hang over the edge of a ragged tensor are counted as they run:
Each op's cost rule lives with its definition (``ir.ops``); index arithmetic is evaluated by the ops' own
reference semantics (the interpreter the reference executor runs), here on arrays of instances.
- FLOPs are the work the tile ops do, masked edges included: 2*M*N*K per mma, one per element for
  element-wise, broadcast and reduction ops, one per element an atomic add adds (casts, copies, fills and
  masking are free: masks, comparisons, logic on masks, where and arange).
- bytes are the global elements a load or store really touches (masked-off elements move nothing): the
  traffic the program asks of the memory system, much of which L2 serves when tiles are re-read. An atomic
  add reads and writes each element it touches. A store or atomic add with a mask (``ts.store(..., mask=m)``)
  counts every element of its tile inside the global, as an unmasked one: the mask is data, so this is the most
  it writes (exact for a mask of all true).
- dram bytes are the compulsory part: each global counted at most once (its accessed bytes, capped at its
  size), what a perfect cache would still fetch from DRAM. Rooflines place kernels by this.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tilestack.errors import LaunchError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import OPS, access_of
from tilestack.ir.scalars import valid_extent
from tilestack.ir.types import GlobalType, Space, StagesType, TileType


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and global-memory bytes of one call: the one cost record of tilestack. A kernel's comes from its IR
    (``traced.cost(...)``, every field); a baseline's from a formula (``tilestack.perf.formulas``: flops and
    bytes, which are then the compulsory traffic already, so the dram fields stay None and read as the bytes)."""
    flops: float                     # all arithmetic (a multiply-add is 2)
    bytes_read: float                # global memory: an IR cost counts every access, a formula the minimum
    bytes_written: float
    mma_flops: float = 0             # the part done by matrix units (IR costs)
    dram_bytes_read: float | None = None      # compulsory: each global at most once (None: = bytes_read)
    dram_bytes_written: float | None = None
    shared_bytes: int = 0            # shared tiles declared by one program (before any pipelining copies)
    register_bytes: int = 0          # register tiles declared by one program (spread over its threads)
    programs: int = 1                # grid size

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def dram_bytes(self) -> float:
        read = self.bytes_read if self.dram_bytes_read is None else self.dram_bytes_read
        written = self.bytes_written if self.dram_bytes_written is None else self.dram_bytes_written
        return read + written

    @property
    def intensity(self) -> float:
        """FLOPs per compulsory (DRAM) byte: the roofline's arithmetic intensity (inf for zero bytes)."""
        return self.flops / self.dram_bytes if self.dram_bytes else float("inf")

    def __add__(self, other: Cost) -> Cost:
        """Two calls in sequence: counts add (footprints are the larger one's)."""
        def dram(a, b, fa, fb):
            return None if a is None and b is None else (fa if a is None else a) + (fb if b is None else b)
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written, self.mma_flops + other.mma_flops,
                    dram(self.dram_bytes_read, other.dram_bytes_read, self.bytes_read, other.bytes_read),
                    dram(self.dram_bytes_written, other.dram_bytes_written, self.bytes_written, other.bytes_written),
                    max(self.shared_bytes, other.shared_bytes), max(self.register_bytes, other.register_bytes),
                    self.programs + other.programs)

    def scaled(self, factor: float) -> Cost:
        """``factor`` calls' counts (footprints unchanged)."""
        def f(x):
            return None if x is None else x * factor
        return dataclasses.replace(self, flops=self.flops * factor, bytes_read=self.bytes_read * factor,
                                   bytes_written=self.bytes_written * factor, mma_flops=self.mma_flops * factor,
                                   dram_bytes_read=f(self.dram_bytes_read),
                                   dram_bytes_written=f(self.dram_bytes_written))


def grid_plan(kernel: KernelIR) -> list:
    """The entry instructions the grid depends on (its backward slice), to evaluate with plain ints."""
    need = set(kernel.grid)
    plan = []
    for ins in reversed(kernel.body.instrs):
        if ins.results and ins.results[0] in need:
            plan.append(ins)
            need.update(ins.srcs)
    return plan[::-1]


class ScalarMachine:
    """What scalar ops read when evaluated host-side: argument sizes and values, block ids and the grid.

    ``block_ids`` may be arrays (one entry per program), so one evaluation covers every program at once.
    ``data``: the values of the globals the kernel reads scalars from (``load_scalar``), as NumPy arrays; a
    read of a global not among them is a ValueError (shapes alone do not say what a loop bound read from
    memory is)."""

    def __init__(self, dims: dict[int, tuple[int, ...]], scalars: dict[int, float], default_scalar=None,
                 data: dict[int, np.ndarray] | None = None):
        self.dims, self.scalars, self.default_scalar = dims, scalars, default_scalar
        self.data = data or {}
        self.values: dict[Value, object] = {}
        self.arg_index: dict[Value, int] = {}
        self.block_ids: list = []
        self.grid: tuple = ()

    def arg(self, ins):
        self.arg_index[ins.result] = ins.attrs.index
        if isinstance(ins.result.type, GlobalType):
            return None
        return self.scalars.get(ins.attrs.index, self.default_scalar)

    def dim(self, ins):
        return self.dims[self.arg_index[ins.srcs[0]]][ins.attrs.axis]

    def block_id(self, axis: int):
        if not self.block_ids:
            raise ValueError("block_id: no program is running (the grid may use only argument sizes, scalars "
                             "and constants)")
        # (an axis the grid lacks is CUDA's blockIdx.y of a 1-D grid: 0, as the backends run it; was an IndexError)
        return self.block_ids[axis] if axis < len(self.block_ids) else 0

    def load_scalar(self, ins, srcs):
        """The element at ``srcs[1:]`` (ints, or arrays of them: one per instance), 0 outside the global."""
        idx = self.arg_index[ins.srcs[0]]
        g = self.data.get(idx)
        if g is None:
            raise ValueError(f"load_scalar ({ins.where}) reads an element of argument {idx}: pass its tensor, not "
                             "its shape (a loop bound or coordinate read from memory depends on its values)")
        index = [np.asarray(c, dtype=np.int64) for c in srcs[1:]]
        inside = np.ones(np.broadcast_shapes(*(i.shape for i in index)) if index else (), dtype=bool)
        for c, n in zip(index, g.shape, strict=True):
            inside = inside & (c >= 0) & (c < n)
        clipped = tuple(np.clip(c, 0, max(n - 1, 0)) for c, n in zip(index, g.shape, strict=True))
        x = np.where(inside, g[clipped] if g.size else 0, 0)
        from tilestack.ir.types import FLOAT
        if ins.result.type == FLOAT:
            x = x.astype(np.float32).astype(np.float64)
            return float(x) if x.ndim == 0 else x
        x = x.astype(np.int64)
        return int(x) if x.ndim == 0 else x

    def num_blocks(self, axis: int):
        if not self.grid:
            raise ValueError("num_blocks: the grid may use only argument sizes, scalars and constants")
        return self.grid[axis] if axis < len(self.grid) else 1     # (an axis the grid lacks: 1, as CUDA's gridDim)

    def eval(self, ins) -> None:
        """Evaluate one scalar or argument instruction into ``values``."""
        d = OPS[ins.op]
        if d.kind not in ("scalar", "arg"):
            raise ValueError(f"{ins.op.value} ({ins.where}) is not index arithmetic")
        self.values[ins.result] = d.reference(ins, [self.values.get(s) for s in ins.srcs], self)


def grid_of(kernel: KernelIR, dims: dict[int, tuple[int, ...]], scalars: dict[int, float],
            plan: list | None = None) -> tuple[int, ...]:
    """The launch grid for argument sizes ``dims`` (param index -> shape)."""
    m = ScalarMachine(dims, scalars)
    for ins in plan if plan is not None else grid_plan(kernel):
        try:
            m.eval(ins)
        except ValueError:
            raise LaunchError(f"grid depends on {ins.op.value} ({ins.where}); it may use only argument sizes, "
                              "scalars and constants") from None
    return tuple(int(m.values[g]) for g in kernel.grid)


def kernel_cost(kernel: KernelIR, dims: dict[int, tuple[int, ...]], scalars: dict[int, float],
                data: dict[int, np.ndarray] | None = None) -> Cost:
    """``data``: the values of the globals the kernel reads scalars from (``ScalarMachine``)."""
    grid = grid_of(kernel, dims, scalars)
    n = int(np.prod(grid))
    m = ScalarMachine(dims, scalars, default_scalar=0.0, data=data)
    m.block_ids = [np.asarray(a).reshape(-1) for a in np.unravel_index(np.arange(n), grid, order="F")]
    m.grid = grid
    counter = _Counter(m, n)
    counter.block(kernel.body)
    shared, regs = footprints(kernel)
    dram = {"read": 0, "written": 0}
    for (idx, key), b in counter.per_global.items():
        size = int(np.prod(dims[idx])) * kernel.params[idx].type.dtype.itemsize
        dram[key] += min(b, size)
    return Cost(flops=int(counter.total_flops), mma_flops=int(counter.mma), bytes_read=int(counter.bytes["read"]),
                bytes_written=int(counter.bytes["written"]), dram_bytes_read=dram["read"],
                dram_bytes_written=dram["written"], shared_bytes=shared, register_bytes=regs, programs=n)


def footprints(kernel: KernelIR) -> tuple[int, int]:
    """Bytes of the distinct shared and register tile buffers one program holds (by ``Value.buffer``)."""
    sizes: dict[int, tuple[Space, int]] = {}
    for ins in kernel.walk():
        for r in ins.results:
            if r.buffer is not None and isinstance(r.type, TileType | StagesType):
                sizes[r.buffer] = (r.type.space, r.type.nbytes)
    shared = sum(b for s, b in sizes.values() if s is Space.SHARED)
    regs = sum(b for s, b in sizes.values() if s is Space.REG)
    return shared, regs


class _Counter:
    """The counter the ops' cost rules add to (see ``ir.ops``), over ``n`` instances (programs x loop trips)."""

    def __init__(self, machine: ScalarMachine, n: int, parent: _Counter | None = None):
        self.m, self.n = machine, n
        self.root = parent.root if parent is not None else self
        if parent is None:
            self.total_flops, self.mma = 0, 0
            self.bytes = {"read": 0, "written": 0}
            self.per_global: dict[tuple[int, str], int] = {}

    def block(self, block: Block) -> None:
        for ins in block.instrs:
            kind = OPS[ins.op].kind
            if kind in ("scalar", "arg"):
                self.m.eval(ins)
            OPS[ins.op].cost(ins, self)     # (index arithmetic is free; a scalar read from memory is not)

    def flops(self, count: int, mma: bool = False, per_instance: bool = True) -> None:
        total = count * self.n if per_instance else count
        self.root.total_flops += total
        if mma:
            self.root.mma += total

    def memory(self, ins, key: str) -> int:
        """Count the global bytes one load, store or atomic add touches over all instances as ``key``; returns
        the number of elements."""
        g, shape, coords = access_of(ins)
        idx = self.m.arg_index[g]
        per = valid_extent(self.m.dims[idx], [self.m.values[c] for c in coords], shape)
        total = int(np.sum(np.broadcast_to(np.asarray(per), (self.n,)), dtype=np.int64))
        nbytes = total * g.type.dtype.itemsize
        self.root.bytes[key] += nbytes
        self.root.per_global[(idx, key)] = self.root.per_global.get((idx, key), 0) + nbytes
        return total

    def scalar_read(self, ins) -> None:
        """Count the bytes of one ``load_scalar`` over all instances (reads outside the global move nothing)."""
        g, *index = ins.srcs
        idx = self.m.arg_index[g]
        inside = np.ones((), dtype=bool)
        for c, n in zip(index, self.m.dims[idx], strict=True):
            v = np.asarray(self.m.values[c])
            inside = inside & (v >= 0) & (v < n)
        nbytes = int(np.sum(np.broadcast_to(inside, (self.n,)), dtype=np.int64)) * g.type.dtype.itemsize
        self.root.bytes["read"] += nbytes
        self.root.per_global[(idx, "read")] = self.root.per_global.get((idx, "read"), 0) + nbytes

    def loop(self, ins) -> None:
        """Evaluate a loop body once for all its trips over all instances."""
        m = self.m
        lo, hi, step = (np.broadcast_to(np.asarray(m.values[s], dtype=np.int64), (self.n,)) for s in ins.srcs[:3])
        if (step == 0).any():
            raise ValueError(f"range step is 0 ({ins.where})")
        trips = np.maximum(-((lo - hi) // step), 0)       # ceil((hi - lo) / step), either sign of step
        total = int(trips.sum())
        if total == 0:
            return
        rep = np.repeat(np.arange(self.n), trips)
        starts = np.cumsum(trips) - trips
        k = np.arange(total) - np.repeat(starts, trips)
        inner = ScalarMachine(m.dims, m.scalars, m.default_scalar, m.data)
        inner.arg_index, inner.grid = m.arg_index, m.grid
        inner.block_ids = [b[rep] if isinstance(b, np.ndarray) and b.shape == (self.n,) else b for b in m.block_ids]
        for v, x in m.values.items():
            inner.values[v] = x[rep] if isinstance(x, np.ndarray) and x.shape == (self.n,) else x
        inner.values[ins.body.args[0]] = lo[rep] + k * step[rep]
        _Counter(inner, total, self).block(ins.body)
