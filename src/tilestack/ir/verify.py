"""IR verification: the rules every pass and backend may rely on.

    verify(kernel)    # raises TraceError naming the instruction's source line

- every operand is defined before it is used, in the same block or an enclosing one;
- every instruction keeps its op's shape and dtype rule (``ir.ops``: one rule per op, beside its semantics):
  tile ops make one tile, scalar ops one scalar, stores and atomic adds nothing; element-wise ops broadcast
  their operands by their axes; a loop's body arguments are (index, *carried) and its yields and results match;
- the grid is made of index values defined at entry;
- an async mma's pending result is read only by mma_wait, as the acc of the next async mma, or carried by a loop;
- every instruction's warp role is declared, each role's registers are 24..256 in steps of 8, and the roles
  together fit one SM's register file;
- turns among roles (turn_wait / turn_pass of one ``order``): in each block (a loop body, or the kernel's) that
  takes any, each role of the order alternates wait, pass, wait, pass, and every role takes as many turns there
  (the roles of one block run its trips alike): a role that waited for a turn no other role hands on would hang
  the GPU.
"""

from __future__ import annotations

from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import OPS, Op
from tilestack.ir.types import INDEX

REGISTER_FILE = 65536        # 32-bit registers per SM (every NVIDIA GPU since Kepler)
THREADS_PER_WARP = 32
ROLE_REGISTERS = range(24, 257, 8)   # what setmaxnreg accepts


def verify(kernel: KernelIR) -> None:
    _block(kernel.body, set())
    _pending(kernel)
    _roles(kernel)
    _turns(kernel)
    defined = {r for ins in kernel.body.instrs for r in ins.results}
    for g in kernel.grid:
        if g not in defined or g.type != INDEX:
            raise TraceError(f"kernel {kernel.name}: grid value {g!r} is not an index defined at entry",
                             kernel.where)


def _block(block: Block, outer: set[Value]) -> None:
    defined = set(outer) | set(block.args)
    for ins in block.instrs:
        for s in ins.srcs:
            if s not in defined:
                raise TraceError(f"{ins.op.value}: operand {s!r} is used before it is defined", ins.where)
        OPS[ins.op].rule(ins)
        if ins.body is not None:
            body = ins.body
            _block(body, defined)
            inner = {r for b in body.walk() for r in b.results} | set(body.args) | defined
            for y in body.yields:
                if y not in inner:
                    raise TraceError(f"{ins.op.value}: yields {y!r}, which is not defined", ins.where)
        defined.update(ins.results)


def _pending(kernel: KernelIR) -> None:
    pending = {ins.result for ins in kernel.walk() if ins.op is Op.MMA_ASYNC}
    if not pending:
        return
    for ins in kernel.walk():
        for k, s in enumerate(ins.srcs):
            if s in pending and not (ins.op is Op.MMA_WAIT or (ins.op is Op.MMA_ASYNC and k == 0)
                                     or (ins.op is Op.RANGE and k >= 3)):
                raise TraceError(f"{ins.op.value}: reads {s!r}, an async mma's result, before mma_wait", ins.where)


def _roles(kernel: KernelIR) -> None:
    total = 0
    for name, r in kernel.roles.items():
        if r.registers not in ROLE_REGISTERS or r.warps < 1 or r.groups < 1:
            raise TraceError(f"role {name}: warps={r.warps} groups={r.groups} registers={r.registers}; expected "
                             "warps and groups >= 1 and registers 24..256 in steps of 8", kernel.where)
        total += r.warps * r.groups * THREADS_PER_WARP * r.registers
    if total > REGISTER_FILE:
        raise TraceError(f"roles {dict(kernel.roles)} ask {total} registers; an SM has {REGISTER_FILE}",
                         kernel.where)
    for ins in kernel.walk():
        if ins.role and ins.role not in kernel.roles:
            raise TraceError(f"{ins.op.value}: role {ins.role!r} is not declared", ins.where)


def _turns(kernel: KernelIR) -> None:
    """The turn ops' balance (module docstring): in every block that takes turns of an order, each role of the
    order alternates wait and pass, and every role takes as many (the roles of one block run its loop's trips
    alike, so no role waits for a turn nobody hands on)."""
    found: dict[tuple, dict[int, tuple[Block, list]]] = {}      # order -> id(block) -> (block, its turn ops)
    for block in [kernel.body, *(ins.body for ins in kernel.walk() if ins.body is not None)]:
        for ins in block.instrs:
            if ins.op in (Op.TURN_WAIT, Op.TURN_PASS):
                found.setdefault(ins.attrs.order, {}).setdefault(id(block), (block, []))[1].append(ins)
    for order, blocks in found.items():
        first = next(iter(blocks.values()))[1][0]
        for role in order:
            if role not in kernel.roles:
                raise TraceError(f"{first.op.value}: role {role!r} of the turn order {order} is not declared "
                                 "(ts.partition)", first.where)
        for _, turns in blocks.values():
            counts = {}
            for role in order:
                mine = [ins for ins in turns if ins.role == role]
                for k, ins in enumerate(mine):
                    want = Op.TURN_WAIT if k % 2 == 0 else Op.TURN_PASS
                    if ins.op is not want:
                        held = "already holds" if want is Op.TURN_PASS else "does not hold"
                        raise TraceError(f"{ins.op.value}: role {role!r} {held} its turn among {order} here; each "
                                         "turn is a turn_wait then a turn_pass (ts.turn)", ins.where)
                if len(mine) % 2:
                    raise TraceError(f"turn_wait: role {role!r} waits for a turn among {order} it never passes on",
                                     mine[-1].where)
                counts[role] = len(mine) // 2
            if len(set(counts.values())) != 1:
                raise TraceError(f"{turns[0].op.value}: in this loop the roles of the turn order {order} take {counts} "
                                 "turns; each must take as many in each loop (a role that waits for a turn nobody "
                                 "hands on hangs)", turns[0].where)
