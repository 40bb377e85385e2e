"""Constrained search spaces: every config of a kernel's domains, judged from its IR before anything compiles.

    space = ConstrainedSpace(gemm_kernel, args, fixed={}, domains=dict(BM=(64, 128, 256), ..., num_warps=(4, 8)),
                             device=DeviceKey.parse("sm90-132sm-227kb"))
    space.kept()                      # the configs worth compiling and timing
    space.summary()                   # {"raw": 216, "valid": 180, "kept": 131, "dropped_by": {...}}
    e = space.estimate(cfg)           # shared bytes, registers per thread, blocks per SM, TMA boxes, reasons

A config is a flat dict of the kernel's tunables and the backend's launch options (``num_warps``,
``num_stages``): the tuner searches both. Each config is traced (``Kernel.trace`` keeps one trace per kernel
constants, so launch options cost nothing more) and lowered through the Triton backend's passes as on a Hopper
GPU, and then judged by two kinds of rule:

hard (the config cannot work: it does not compile, does not launch, or the copy engine rejects it)
  - the backend's own rules: ``num_warps`` a power of two up to the block's thread limit; the legalizer's (tile
    sizes powers of two), reported with its message
  - shared memory: the shared tiles one program declares, with ``num_stages`` copies of those a loop loads
    (Triton's pipeliner keeps that many in flight), over the device's shared memory per block
  - TMA boxes: a tile the copy engine moves has each box dimension <= 256 elements and an inner dimension whose
    bytes are a multiple of 16
  - occupancy: not even one block fits an SM (threads, registers or shared memory)
  - coverage (sizes known): the grid's tiles do not read every element of the tensors the kernel loads (the IR's
    compulsory bytes fall short of their sizes: a row wider than the one tile a program reads, a wrong result)

soft (it works, but a config that differs only there is certain to be at least as fast)
  - registers: the tiles held live at the program's peak (accumulators, operands in registers, scores) spread
    over the threads exceed what ptxas may give a thread at that block size by ``SPILL_SLACK``: it spills
  - idle warps: the largest tile has fewer elements than the block has threads
  - a tile wider than the tensor it moves (past the next power of two of its size): all extra work is masked
  - duplicates: ``num_stages`` other than the domain's first where no loop loads anything (Triton compiles the
    same code)

``valid()`` applies the hard rules, ``kept()`` both; the precision of each is measured by ``tune.aot`` (compiles
for sm_90a on this CPU) and the interpreter (``scripts/tune/constraint_report.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tilestack.errors import TunableError
from tilestack.ir.ops import Op, access_of
from tilestack.ir.types import Space, StagesType, TileType

THREADS_PER_WARP = 32
WARPGROUP_WARPS = 4           # a Hopper warpgroup: the unit of wgmma
WGMMA_MIN_M = 64              # wgmma's M per warpgroup
TMA_INNER_BYTES = 16          # the copy engine moves an inner box dimension in multiples of 16 bytes
BASE_REGISTERS = 24           # per thread beyond the tiles: indices, pointers, loop counters, descriptors
REGISTER_BYTES = 4
PTXAS_REGISTER_GRANULE = 8    # ptxas hands out registers per thread in steps of 8
# The register estimate counts live tiles, not the compiler's exact layouts; a config is dropped as spilling only
# past this factor of the per-thread limit (calibrated against sm_90a compiles: docs/autotuning.md).
SPILL_SLACK = 1.25


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """What one SM of a compute capability allows (CUDA's table of per-capability limits)."""
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    max_threads_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024


ARCH_LIMITS = {
    (9, 0): ArchLimits(),                                                       # Hopper: H100, H200
    (8, 0): ArchLimits(shared_per_sm=164 * 1024),                               # A100
    (8, 6): ArchLimits(max_threads_per_sm=1536, max_blocks_per_sm=16, shared_per_sm=100 * 1024),
    (8, 9): ArchLimits(max_threads_per_sm=1536, max_blocks_per_sm=24, shared_per_sm=100 * 1024),   # L4, L40S
}


def arch_limits(arch: tuple[int, int]) -> ArchLimits:
    """The limits of compute capability ``arch`` (the nearest older one listed, for a newer minor)."""
    known = sorted(a for a in ARCH_LIMITS if a <= tuple(arch))
    if not known:
        raise TunableError(f"constraints: no SM limits for compute capability {arch}; known: {sorted(ARCH_LIMITS)}")
    return ARCH_LIMITS[known[-1]]


def register_limit(threads: int, arch: ArchLimits) -> int:
    """Registers ptxas may give each thread of a block of ``threads`` (Triton asks for one block per SM at
    least: the block's registers must fit the SM's file)."""
    per = arch.registers_per_sm // max(threads, 1)
    return min(arch.max_registers_per_thread, per - per % PTXAS_REGISTER_GRANULE)


@dataclasses.dataclass
class Estimate:
    """What the IR says about one config (see the module docstring)."""
    config: dict[str, Any]
    shared_bytes: int = 0                 # per block, with the pipelining copies
    registers: int = 0                    # estimated per thread
    register_limit: int = 0               # what ptxas may give a thread at this block size
    threads: int = 0
    blocks_per_sm: int = 0                # occupancy
    warps_per_sm: int = 0
    occupancy: float = 0.0                # resident threads / the SM's maximum
    programs: int | None = None           # the grid's size, where sizes are known
    flops: float | None = None            # of one call, from the IR (sizes known)
    bytes: float | None = None            # global bytes touched
    dram_bytes: float | None = None       # compulsory global bytes
    tile_elements: int = 0                # the largest register tile
    loop_loads: bool = False              # some loop loads tiles (what pipelining stages work on)
    tma_boxes: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    pointer_accesses: int = 0             # loads/stores through pointers
    mma_tiles: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)   # (M, N, K) per mma
    hard: list[str] = dataclasses.field(default_factory=list)
    soft: list[str] = dataclasses.field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.hard

    @property
    def kept(self) -> bool:
        return not self.hard and not self.soft


def split_config(kernel, config: dict[str, Any]) -> tuple[dict, dict]:
    """(the kernel's constants, the backend's launch options) of a flat config."""
    from tilestack.backends.triton import LAUNCH_OPTIONS

    consts = {k: v for k, v in config.items() if k in kernel.constants or k not in LAUNCH_OPTIONS}
    return consts, {k: v for k, v in config.items() if k not in consts}


def estimate(kernel, args: Sequence, fixed: dict[str, Any], config: dict[str, Any], device) -> Estimate:
    """Judge one config (see the module docstring). ``args``: tensors (meta or fake ones will do) or ArgSpecs
    (then rules that need sizes are skipped); ``device``: a ``tune.devices.DeviceKey``."""
    from tilestack.backends.triton import BACKEND
    from tilestack.backends.triton.launch import compile_mode
    from tilestack.errors import TilestackError

    arch = arch_limits(device.arch)
    e = Estimate(dict(config))
    consts, options = split_config(kernel, config)
    launch = {**BACKEND.option_defaults(), **kernel.options, **consts, **options}   # what the launch would use
    warps, stages = launch["num_warps"], launch["num_stages"] or 1
    e.threads = warps * THREADS_PER_WARP
    if warps < 1 or warps & (warps - 1) or e.threads > arch.max_threads_per_block:
        e.hard.append(f"backend: num_warps={warps}: Triton needs a power of two up to "
                      f"{arch.max_threads_per_block // THREADS_PER_WARP}")
        return e
    try:
        traced = kernel.trace(*args, **fixed, **consts)
        tma, _ = compile_mode(traced, args, True)       # the copy engine only where a launch on these would use it
        low, _ = BACKEND.lower(traced.ir, tma=tma)
    except TilestackError as err:
        e.hard.append(f"backend: {type(err).__name__}: {' '.join(str(err).split())[:160]}")
        return e
    sized = all(not _is_global(p) or hasattr(a, "shape") for p, a in zip(traced.ir.params, args, strict=True))
    _memory(e, low, stages, warps)
    _tma(e, low)
    e.registers = BASE_REGISTERS + _peak_register_bytes(low, e.threads, warps) // REGISTER_BYTES
    e.register_limit = register_limit(e.threads, arch)
    _occupancy(e, arch, device.shared_bytes)
    if sized:
        _sizes(e, traced, low, args)
    # soft rules
    if e.registers > SPILL_SLACK * e.register_limit:
        e.soft.append(f"registers: ~{e.registers} per thread > {SPILL_SLACK} x the {e.register_limit} ptxas may "
                      f"give at {e.threads} threads: spills")
    if e.tile_elements and e.tile_elements < e.threads:
        e.soft.append(f"idle warps: the largest tile has {e.tile_elements} elements for {e.threads} threads")
    return e


def _is_global(p) -> bool:
    return p.is_global


def warpgroup_mma(m: int, warps: int) -> bool:
    """Whether Triton lowers an mma with ``m`` output rows to Hopper's warpgroup mma (wgmma: operands read from
    shared memory, loads pipelined ``num_stages`` deep) rather than the older mma (operands in registers, loads
    ``num_stages - 1`` deep). Measured on sm_90a compiles: docs/autotuning.md."""
    return warps >= WARPGROUP_WARPS and m >= WGMMA_MIN_M


def _memory(e: Estimate, low, stages: int, warps: int) -> None:
    """Shared bytes with pipelining copies; the largest register tile; whether a loop loads.

    A loop that loads shared tiles keeps ``num_stages`` copies of each when its mmas are warpgroup mmas, one
    fewer otherwise (Triton's pipeliner; at least the one copy the kernel declares)."""
    shared: dict[int, int] = {}
    looped: dict[int, int] = {}
    for ins in low.walk():
        for r in ins.results:
            t = r.type
            if isinstance(t, TileType | StagesType) and r.buffer is not None:
                if t.space is Space.SHARED:
                    shared[r.buffer] = t.nbytes
                elif isinstance(t, TileType):
                    e.tile_elements = max(e.tile_elements, t.numel)
        if ins.op is Op.MMA:
            (m, n), k = ins.result.type.shape, ins.srcs[1].type.shape[1]
            e.mma_tiles.append((m, n, k))
    for loop in low.walk():
        if loop.body is None:
            continue
        depth = loop.attrs.stages or stages
        mmas = [ins for ins in loop.body.walk() if ins.op is Op.MMA]
        if not mmas or not all(warpgroup_mma(ins.result.type.shape[0], warps) for ins in mmas):
            depth = max(1, depth - 1)
        for ins in loop.body.walk():
            if ins.op is Op.LOAD:
                e.loop_loads = True
                t = ins.result.type
                if t.space is Space.SHARED and ins.result.buffer is not None:
                    looped[ins.result.buffer] = max(looped.get(ins.result.buffer, 0), (depth - 1) * t.nbytes)
    e.shared_bytes = sum(shared.values()) + sum(looped.values())


def _tma(e: Estimate, low) -> None:
    for ins in low.walk():
        if ins.op not in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD):
            continue
        if getattr(ins.attrs, "via", "") != "tma":
            e.pointer_accesses += 1
            continue
        g, shape, _ = access_of(ins)
        name = g.hint or "global"
        e.tma_boxes.append((name, tuple(shape)))
        from tilestack.backends.triton.passes import TMA_MAX_BOX
        if max(shape) > TMA_MAX_BOX:
            e.hard.append(f"TMA: {name}'s box {tuple(shape)} has a dimension over {TMA_MAX_BOX}")
        inner = shape[-1] * g.type.dtype.itemsize
        if inner % TMA_INNER_BYTES:
            e.hard.append(f"TMA: {name}'s box {tuple(shape)} has an inner dimension of {inner} bytes, not a "
                          f"multiple of {TMA_INNER_BYTES}")


def _tile_registers(t: TileType, threads: int) -> int:
    """Bytes per thread of a register tile spread over ``threads`` (each thread holds at least one element;
    16-bit elements pack two to a register)."""
    per_thread = max(1, -(-t.numel // threads))
    return per_thread * max(t.dtype.itemsize, 2)


def _peak_register_bytes(low, threads: int, warps: int) -> int:
    """Bytes per thread of the register tiles live at once at the program's peak.

    Liveness over the program in order, per tile buffer (the versions of one declared tile share its
    registers: a loop-carried accumulator is one tile, not one per SSA value): a buffer lives from its first
    definition to its last use; one defined outside a loop and used inside lives to the loop's end (every trip
    reads it). A pointer access also holds its offsets (one 32-bit word per element), and an mma that is not a
    warpgroup mma (``warpgroup_mma``) copies its operands from shared memory into registers."""
    pos = itertools.count()
    defined: dict[Any, int] = {}
    last: dict[Any, int] = {}
    size: dict[Any, int] = {}
    extra: dict[int, int] = {}          # transient bytes at one position

    def key(v):
        return v.buffer if v.buffer is not None else id(v)

    def note_def(v, p):
        if isinstance(v.type, TileType) and v.type.space is Space.REG:
            k = key(v)
            defined[k] = min(defined.get(k, p), p)
            size[k] = max(size.get(k, 0), _tile_registers(v.type, threads))
            last[k] = max(last.get(k, p), p)

    def use(v, p, loops):
        k = key(v)
        if k in defined:
            last[k] = max(last[k], p)
            for start, members in loops:           # used in a loop it was defined before: lives to its end
                if defined[k] < start:
                    members.add(k)

    def block(b, loops: list[tuple[int, set]]):
        for ins in b.instrs:
            p = next(pos)
            for s in ins.srcs:
                use(s, p, loops)
            if ins.op in (Op.LOAD, Op.STORE) and getattr(ins.attrs, "via", "") != "tma":
                _, shape, _ = access_of(ins)
                extra[p] = extra.get(p, 0) + max(1, -(-math.prod(shape) // threads)) * REGISTER_BYTES
            if ins.op is Op.MMA and not warpgroup_mma(ins.result.type.shape[0], warps):
                extra[p] = extra.get(p, 0) + sum(_tile_registers(s.type, threads) for s in ins.srcs[1:3]
                                                 if s.type.space is Space.SHARED)
            if ins.body is None:
                for r in ins.results:
                    note_def(r, p)
                continue
            start = p
            for a in ins.body.args:
                note_def(a, start)
            members: set = set()
            block(ins.body, [*loops, (start, members)])
            end = next(pos)
            for v in ins.body.yields:
                use(v, end, loops)
            for k in [*members, *(key(a) for a in ins.body.args)]:
                if k in defined:
                    last[k] = max(last[k], end)
            for r in ins.results:
                note_def(r, end)

    block(low.body, [])
    live = [0] * (next(pos) + 1)
    for k, d in defined.items():
        for p in range(d, last[k] + 1):
            live[p] += size[k]
    for p, b in extra.items():
        live[p] += b
    return max(live, default=0)


def _occupancy(e: Estimate, arch: ArchLimits, shared_per_block: int) -> None:
    regs = min(max(e.registers, 1), e.register_limit)          # ptxas caps; past it the rest spills
    regs += -regs % PTXAS_REGISTER_GRANULE
    by_regs = arch.registers_per_sm // (regs * e.threads)
    by_threads = arch.max_threads_per_sm // e.threads
    by_shared = arch.shared_per_sm // e.shared_bytes if e.shared_bytes else arch.max_blocks_per_sm
    e.blocks_per_sm = min(by_regs, by_threads, by_shared, arch.max_blocks_per_sm)
    e.warps_per_sm = e.blocks_per_sm * e.threads // THREADS_PER_WARP
    e.occupancy = e.blocks_per_sm * e.threads / arch.max_threads_per_sm
    if e.shared_bytes > shared_per_block:
        e.hard.append(f"shared memory: ~{e.shared_bytes} B (with pipelining copies) > the device's "
                      f"{shared_per_block} B per block")
    elif e.blocks_per_sm < 1:
        e.hard.append(f"occupancy: not one block of {e.threads} threads fits an SM")


def _sizes(e: Estimate, traced, low, args) -> None:
    """Rules and counts that need the argument sizes: tiles wider than their tensors, FLOPs and bytes."""
    index = {ins.result: ins.attrs.index for ins in low.walk() if ins.op is Op.ARG}
    for ins in low.walk():
        if ins.op not in (Op.LOAD, Op.STORE, Op.ATOMIC_ADD):
            continue
        g, shape, _ = access_of(ins)
        if len(shape) < 2:           # vectors: often per-config helpers (column numbers), sized by the caller
            continue
        dims = tuple(args[index[g]].shape)[-len(shape):]
        for t, d in zip(shape, dims, strict=True):
            if t > 1 and d >= 1 and t > _next_pow2(d):
                e.soft.append(f"tile wider than its tensor: {g.hint or 'global'}'s tile {tuple(shape)} over "
                              f"{tuple(dims)}")
                break
    cost = _cost(traced, args)
    if cost is None:
        return
    e.programs, e.flops, e.bytes, e.dram_bytes = cost.programs, cost.flops, cost.bytes, cost.dram_bytes
    # coverage: the grid's tiles must read every element of the tensors the kernel loads (a row longer than
    # the one tile a program reads of it, a grid too small for the tensor: a wrong result, not a slow one)
    loaded = {index[ins.srcs[0]] for ins in low.walk() if ins.op is Op.LOAD}
    size = sum(math.prod(args[i].shape) * low.params[i].type.dtype.itemsize for i in loaded)
    read = cost.dram_bytes_read if cost.dram_bytes_read is not None else cost.bytes_read
    if read < size:
        e.hard.append(f"coverage: the tiles read {read} of the {size} bytes of the loaded tensors")


_costs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # trace -> {argument sizes: Cost}


def _cost(traced, args):
    """The IR's cost at these sizes, once per trace and sizes (launch options share a trace)."""
    sizes = tuple(tuple(a.shape) if hasattr(a, "shape") else a for a in args)
    memo = _costs.setdefault(traced, {})
    if sizes not in memo:
        try:
            memo[sizes] = traced.cost(*args)
        except (ValueError, TypeError):
            memo[sizes] = None
    return memo[sizes]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass
class ConstrainedSpace:
    """Every combination of ``domains`` (the kernel's tunables and the backend's options), judged against
    ``device`` (a ``DeviceKey``) for these ``args``. Estimates are computed once per config."""
    kernel: Any
    args: Sequence
    fixed: dict[str, Any]
    domains: dict[str, tuple]
    device: Any
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        from tilestack.backends.triton import LAUNCH_OPTIONS

        for name, dom in self.domains.items():
            if name in self.kernel.tunables:
                outside = set(dom) - set(self.kernel.tunables[name].domain)
                if outside:
                    raise TunableError(f"ConstrainedSpace: {name}={sorted(outside)} is outside "
                                       f"{self.kernel.name}'s declared domain {self.kernel.tunables[name].domain}")
            elif name not in LAUNCH_OPTIONS:
                raise TunableError(f"ConstrainedSpace: {name!r} is neither a tunable of {self.kernel.name} "
                                   f"({sorted(self.kernel.tunables)}) nor a launch option ({list(LAUNCH_OPTIONS)})")
            if not dom:
                raise TunableError(f"ConstrainedSpace: the domain of {name} is empty")

    def raw(self) -> list[dict[str, Any]]:
        names = list(self.domains)
        return [dict(zip(names, vals, strict=True)) for vals in itertools.product(*self.domains.values())]

    def estimate(self, config: dict[str, Any]) -> Estimate:
        k = tuple(sorted(config.items()))
        if k not in self._cache:
            e = estimate(self.kernel, self.args, self.fixed, config, self.device)
            first = self.domains.get("num_stages", (None,))[0]
            if e.valid and not e.loop_loads and config.get("num_stages", first) != first:
                e.soft.append(f"duplicate: num_stages={config['num_stages']} with no loop that loads (the same "
                              f"code as num_stages={first})")
            self._cache[k] = e
        return self._cache[k]

    def estimates(self) -> list[Estimate]:
        return [self.estimate(c) for c in self.raw()]

    def valid(self) -> list[dict[str, Any]]:
        return [e.config for e in self.estimates() if e.valid]

    def kept(self) -> list[dict[str, Any]]:
        """The configs no rule drops; if the soft rules would leave none (a tiny problem), the valid ones."""
        kept = [e.config for e in self.estimates() if e.kept]
        return kept or self.valid()

    def summary(self) -> dict[str, Any]:
        """Counts: the raw product, the valid configs, the kept ones, and how many each rule dropped (a config
        dropped by several rules counts once per rule)."""
        est = self.estimates()
        by = Counter(r.split(":")[0] for e in est for r in e.hard + e.soft)
        return {"raw": len(est), "valid": sum(e.valid for e in est), "kept": len(self.kept()),
                "dropped_by": dict(by)}


def problem_domains(problem) -> dict[str, tuple]:
    """A library problem's search domains: its kernel's tunables times the backend's options, as the problem
    restricts them (``tune.space.SearchSpace.domains``)."""
    from tilestack.tune.space import SearchSpace

    return SearchSpace(problem.tile, fixed=problem.fixed, restrict=problem.restrict).domains()


def problem_args(problem) -> tuple:
    """A library problem's kernel arguments with shapes, strides and dtypes but no data (fake tensors), for
    the IR and the AOT compiler: its inputs are never allocated nor its reference computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if problem.kernel.startswith("attention_bwd"):
        return _attention_bwd_args(problem)
    with FakeTensorMode():
        return tuple(problem.make("cpu").args)


def _attention_bwd_args(problem) -> tuple:
    """The backward kernels' arguments (their workload runs the forward first, which fake tensors cannot)."""
    import torch

    from tilestack.tune.library import _attention_shape

    D = problem.fixed["D"]
    B, H, N = _attention_shape(problem.n, D, False)
    dtype = getattr(torch, problem.signature.split("-")[0])

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    q, k, v, do, o = (t(B, H, N, D) for _ in range(5))
    lse, delta = t(B, H, N, dt=torch.float32), t(B, H, N, dt=torch.float32)
    scale = 1.0 / math.sqrt(D)
    if problem.kernel.endswith("delta"):
        return (o, do, delta)
    if problem.kernel.endswith("dkdv"):
        return (q, k, v, do, lse, delta, t(B, H, N, D), t(B, H, N, D), scale)
    return (q, k, v, do, lse, delta, t(B, H, N, D), scale)
