"""IR -> Gluon source for sm_90a (Hopper). One emitter per op, registered with
``ir.ops.register_emitter("gluon", op)``; the lowering is a walk in program order, once per generated function.

What the source does with the hardware:
- Shared tiles come through the copy engine: a TMA descriptor per (global, box) made on the host, an
  ``mbarrier`` per shared buffer (``expect`` the bytes, ``wait`` on its phase).
- A loop the ``schedule`` pass pipelined keeps ``stages - 1`` loads in flight: a ring of shared buffers, one
  barrier per stage, a prologue that fills the ring and a refill after each trip's matrix work; a trip's barrier
  phase is ``(trip // stages) & 1``.
- Matrix products are ``warpgroup_mma`` (wgmma, ``HGMMA`` in SASS) on an ``NVMMADistributedLayout``
  accumulator; an accumulation chain in a pipelined loop keeps one wgmma in flight (``warpgroup_mma_wait(1)``).
- Explicit-hardware ops map one to one: ``stages`` a ring with ready (and, with warp roles, empty) barriers,
  ``async_load`` an expect + TMA copy, ``wait_load`` a phase wait (phases tracked per stage as a bitmask),
  ``mma_async``/``mma_wait`` an async wgmma and its wait.
- Warp roles become ``gl.warp_specialize`` partitions: one function per role (the role's instructions, and the
  role-less scalar work they need, recomputed), the role with the largest register budget as the default
  partition, the others as workers with their warps and register budgets (``setmaxnreg``). A consumer role
  releases the stages it waited on at the end of each trip (``mbarrier.arrive`` on the empty barrier); the
  producer waits for that release before it refills a stage.
- Element-wise work and reductions run on the distributed layouts ``layouts.plan_layouts`` chose, with
  ``gl.convert_layout`` where an op needs another.

Register loads and the stores the copy engine cannot make go through masked pointers, as the Triton backend's.
"""

from __future__ import annotations

import dataclasses

# the two emit modules register their emitters (one per op) when imported
from tilestack.backends.gluon.emit_compute import e_arg
from tilestack.backends.gluon.emit_memory import allocate_ring, first_turns, last_turns, phase_bits
from tilestack.backends.gluon.emitter import (
    GL_DTYPES,
    NAN_FLAG,
    SIG_DTYPES,
    Emitter,
    Ring,
    buffer_hints,
    source_param_names,
)
from tilestack.backends.gluon.passes import pipeline
from tilestack.backends.python_dsl import floor_helpers
from tilestack.errors import BackendError
from tilestack.ir.nodes import Instr, KernelIR, Value
from tilestack.ir.ops import Op
from tilestack.ir.scalars import f64_float_args
from tilestack.ir.types import ScalarType, StagesType

# Python's floor division and remainder for operands that may be negative (backends/python_dsl.py)
_FLOOR_HELPERS = floor_helpers("gluon.jit", "gl", "Gluon")
# row/column max and min reduce with NaN-propagating combines
_NAN_REDUCE_HELPERS = f'''

@gluon.jit
def _max_nan(a, b):
    return gl.maximum(a, b, {NAN_FLAG})


@gluon.jit
def _min_nan(a, b):
    return gl.minimum(a, b, {NAN_FLAG})
'''

# ---- functions and the module ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lowered:
    source: str
    fn_name: str
    num_warps: int                     # the kernel's warps (with roles: the default partition's)
    # what to pass, in order: ("ptr", i), ("dim", i, axis), ("stride", i, axis), ("scalar", i), ("desc", i, box)
    binding: tuple[tuple, ...]
    signature: dict[str, str]          # parameter -> Triton signature type, for AOT compiles
    roles: tuple[tuple[str, int, int], ...] = ()   # (role, warps, registers) in partition order (default first)
    persistent: bool = False           # programs loop over tiles: launch min(grid, SMs) programs


def _rings(kernel: KernelIR) -> dict[int, Ring]:
    rings: dict[int, Ring] = {}
    hints = buffer_hints(kernel)
    taken: set[str] = set()
    waiters: dict[int, set[str]] = {}
    ranks: dict[int, int] = {}
    for ins in kernel.walk():
        if ins.op is Op.WAIT_LOAD:
            waiters.setdefault(ins.srcs[0].buffer, set()).add(ins.role)
        elif ins.op is Op.ASYNC_LOAD:
            ranks[ins.result.buffer] = ins.srcs[2].type.rank
    for ins in kernel.walk():
        if ins.op is Op.STAGES:
            t = ins.result.type
            uid = ins.result.buffer
            block = (1,) * (ranks.get(uid, len(t.shape)) - len(t.shape)) + tuple(t.shape)
            consumers = len(waiters.get(uid, ())) if kernel.roles else 0
            name = hints.get(uid, "ring")
            name = name if name not in taken else f"{name}{len(rings)}"
            taken.add(name)
            rings[uid] = Ring(name, t, block, consumers)
    return rings


def _params(low: KernelIR, e: Emitter) -> list[str]:
    out = []
    for how in low.reads:
        name = e.pnames[how[1]]
        out.append({"ptr": name, "scalar": name, "dim": f"{name}_d{how[-1]}", "stride": f"{name}_s{how[-1]}",
                    "desc": e.descriptors.get((how[1], how[-1]))}[how[0]])
    return out


def signature(low: KernelIR, names: list[str]) -> dict[str, str]:
    """Triton signature types of the kernel's parameters (descriptors with the NVMMA shared layout the device
    code allocates their buffers in, as Gluon's host TensorDescriptor gives them)."""
    from triton.experimental.gluon import language as gl

    sig = {}
    for name, how in zip(names, low.reads, strict=True):
        p = low.params[how[1]]
        if how[0] == "ptr":
            sig[name] = "*" + SIG_DTYPES[p.type.dtype.name]
        elif how[0] in ("dim", "stride"):
            sig[name] = "i32"
        elif how[0] == "scalar":
            sig[name] = ("fp64" if name in _f64_params(low) else "fp32") if p.type == ScalarType("float") else "i32"
        else:
            dt = getattr(gl, GL_DTYPES[p.type.dtype.name].removeprefix("gl."))
            layout = gl.NVMMASharedLayout.get_default_for(list(how[2]), dt)
            sig[name] = f"tensordesc<{SIG_DTYPES[p.type.dtype.name]}{list(how[2])},{layout!r}>"
    return sig


def role_slice(kernel: KernelIR, role: str) -> tuple[set[Instr], set[Value]]:
    """(instructions, values) a role's partition runs and needs: its own instructions, the role-less ones they
    read (recomputed in the partition), and the loops around them with the carried values it uses. Staged
    buffers are not values here: every partition gets the rings."""
    keep: set[Instr] = set()
    live: set[Value] = set()
    changed = True
    while changed:
        changed = False
        for ins in kernel.walk():
            if ins in keep or ins.op is Op.STAGES:
                continue
            if ins.role == role or any(r in live for r in ins.results) or (
                    ins.op is Op.RANGE and (any(a in live for a in ins.body.args[1:])
                                            or any(i in keep for i in ins.body.walk()))):
                if ins.role in ("", role):
                    keep.add(ins)
                    changed = True
        for ins in keep:
            if ins.op is Op.RANGE:
                need = set(ins.srcs[:3])
                for k, (a, r) in enumerate(zip(ins.body.args[1:], ins.results, strict=True)):
                    if a in live or r in live:
                        need.update((ins.srcs[3 + k], ins.body.yields[k]))
            else:
                need = set(ins.srcs)
            need = {v for v in need if not isinstance(v.type, StagesType)}
            if not need <= live:
                live |= need
                changed = True
    return keep, live


def _f64_params(low: KernelIR) -> set[str]:
    """The names of the float parameters passed as f64 (``Emitter.f64_floats``; Gluon passes a float as an f32)."""
    wide, names = f64_float_args(low), source_param_names(low)
    return {names[ins.attrs.index] for ins in low.body.instrs if ins.op is Op.ARG and ins.result in wide}


def _function(name: str, params: list[str], e: Emitter, extra: list[str] = ()) -> list[str]:
    f64 = _f64_params(e.kernel)
    typed = [f"{p}: gl.float64" if p in f64 else p for p in params]
    head = ["@gluon.jit", f"def {name}({', '.join(typed + list(extra))}):"]
    decls = ["    " + d for d in e.layout_decls]
    return head + decls + (e.lines or ["    pass"])   # a kernel with no effect is an empty function


def _stage_key(v: Value, made: dict[Value, Instr]):
    """``v`` up to how it is computed: the same scalar expression of the same values (``k % STAGES`` written twice)
    gives the same key."""
    ins = made.get(v)
    if ins is not None and ins.op is Op.CONST:
        return ("const", ins.attrs.value)
    if ins is not None and ins.op is Op.SCALAR:
        return (ins.attrs.fn, *(_stage_key(s, made) for s in ins.srcs))
    return v.id


def _check_waits(kernel: KernelIR) -> None:
    """Refuse a wait_load on a stage its role already waited on in the same trip (no async load of that ring in
    between, in a kernel without roles). Each wait takes the stage's next phase (the bitmask flips), and with warp
    roles the stage is freed once per wait: a second wait on one fill hangs on a phase that never completes while
    the producer waits for the stage to be freed (the reference reads the same tile twice)."""
    made = {r: i for i in kernel.walk() for r in i.results}
    hints = buffer_hints(kernel)
    blocks = [kernel.body] + [i.body for i in kernel.walk() if i.body is not None]
    for block in blocks:
        waited: dict[tuple, Instr] = {}
        for ins in block.instrs:
            if ins.op is Op.ASYNC_LOAD and not kernel.roles:
                waited = {k: w for k, w in waited.items() if k[1] != ins.srcs[0].buffer}
            if ins.op is not Op.WAIT_LOAD:
                continue
            key = (ins.role, ins.srcs[0].buffer, _stage_key(ins.srcs[1], made))
            first = waited.setdefault(key, ins)
            if first is not ins:
                raise BackendError(
                    f"{ins.where}: the gluon backend waits on each loaded stage once; this wait_load waits again on "
                    f"the stage of `{hints.get(ins.srcs[0].buffer, 'ring')}` that the wait_load at {first.where} "
                    "took in the same trip, and would hang on a phase no load completes (read the tile that wait "
                    "gave again)")


def emit(low: KernelIR, warps: int, index64: bool | frozenset[int] = True) -> Lowered:
    """Gluon source for IR the Gluon pipeline has lowered (``lower``): one function, or with warp roles one per
    role and a kernel that forks them. ``index64``: the param indices of the globals whose element offsets need 64
    bits (``backends.triton.codegen.wide_globals`` of a launch's tensors), or True for every global."""
    _check_waits(low)
    rings = _rings(low)
    fn = f"{low.name}_kernel"
    consts = ", ".join(f"{k}={v!r}" for k, v in low.constants.items())
    funcs: list[list[str]] = []
    floor = nan = False
    roles: tuple = ()
    if not low.roles:
        e = Emitter(low, warps, rings, index64=index64)
        e.block(low.body)
        params = _params(low, e)
        funcs.append(_function(fn, params, e))
        floor, nan = e.floor_helpers, e.nan_helpers
        num_warps = warps
    else:
        order = sorted(low.roles.items(), key=lambda kv: -kv[1].registers)   # stable: the first largest leads
        probe = Emitter(low, warps, rings, index64=index64)
        params = _params(low, probe)
        ring_args = []
        for ring in rings.values():
            ring_args += [ring.name, f"{ring.name}_ready"] + ([f"{ring.name}_empty"] if ring.consumers else [])
        for role, decl in order:
            keep, live = role_slice(low, role)
            e = Emitter(low, decl.warps, rings, keep, live, partition=True, index64=index64)
            for ring in rings.values():
                phase_bits(e, ring)
            first_turns(e, role)
            e.block(low.body)
            e.close_block()
            e.free_inflight()
            last_turns(e, role)
            funcs.append(_function(f"{low.name}_{role}", params, e, ring_args))
            floor, nan = floor or e.floor_helpers, nan or e.nan_helpers
        k = Emitter(low, order[0][1].warps, rings, index64=index64)
        for ins in low.body.instrs:        # what the kernel itself runs: arguments (names) and the rings
            if ins.op is Op.ARG:
                e_arg(k, ins)
        for ring in rings.values():
            allocate_ring(k, ring, k.ring_desc(ring))
        args = ", ".join(params + ring_args)
        parts = ", ".join(f"({low.name}_{role}, ({args},))" for role, _ in order)
        k.emit(f"gl.warp_specialize([{parts}],")
        k.emit(f"                   {[d.warps for _, d in order[1:]]}, {[d.registers for _, d in order[1:]]})")
        funcs.append(_function(fn, params, k))
        num_warps = order[0][1].warps
        roles = tuple((r, d.warps, d.registers) for r, d in order)
    head = [
        f'"""Generated by tilestack from kernel `{low.name}` ({low.where}) for sm_90a; constants: {consts}."""',
        "from triton.experimental import gluon",
        "from triton.experimental.gluon import language as gl",
        "from triton.experimental.gluon.language.nvidia import hopper",
        "from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma",
        "import triton.language as tl",
        *([_FLOOR_HELPERS] if floor else []),
        *([_NAN_REDUCE_HELPERS] if nan else []),
    ]
    text = "\n".join(head)
    for f in funcs:
        text += "\n\n\n" + "\n".join(f)
    return Lowered(text + "\n", fn, num_warps, low.reads, signature(low, params), roles)


def lower(kernel: KernelIR, warps: int, stages: int, specialize: bool = False, persist: bool = False,
          tma: bool = True, print_after=()) -> tuple[KernelIR, list]:
    """The Gluon pipeline's result for ``kernel`` and every stage [(pass name, IR), ...]."""
    return pipeline(warps, stages, specialize, persist, tma).run(kernel, print_after=print_after)


def generate(kernel: KernelIR, warps: int, stages: int, specialize: bool = False, persist: bool = False,
             tma: bool = True, index64: bool | frozenset[int] = True) -> Lowered:
    low, stages_ = lower(kernel, warps, stages, specialize, persist, tma)
    applied = persist and dict(stages_)["persistent"] is not kernel
    return dataclasses.replace(emit(low, warps, index64), persistent=applied)

