"""Passes: named IR -> IR steps between tracing and emission, run as one linear list, verified in between.

    pipe = Pipeline([SPLIT_HOST, DCE, *backend_passes])
    lowered, stages = pipe.run(traced.ir, print_after=("dce",))   # stages: [(pass name, IR after it), ...]
    traced.passes("triton")                                         # the same for a backend, from the front end

A pass returns a new KernelIR (the input is never changed), so every stage stays printable. Backend-neutral
passes live here; a backend adds its own (legality, access choices, parameter pruning) in its folder.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable

from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import OPS, Op
from tilestack.ir.verify import verify


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[KernelIR], KernelIR]
    doc: str = ""


class Pipeline:
    """A linear list of passes; the verifier runs after each one (a pass that breaks the IR is named)."""

    def __init__(self, passes: Iterable[Pass]):
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline: pass names repeat: {names}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, ir: KernelIR, print_after: Iterable[str] = (), file=None) -> tuple[KernelIR, list]:
        """(the IR after the last pass, [(name, IR) for "traced" and every pass]); prints the IR after each
        pass named in ``print_after`` ("all" for every one) to ``file`` (stdout)."""
        wanted = {print_after} if isinstance(print_after, str) else set(print_after)   # "all" or ("dce", ...)
        unknown = wanted - set(self.names) - {"all", "traced"}
        if unknown:
            raise ValueError(f"print_after: no pass named {sorted(unknown)}; the passes are {self.names}")
        stages = [("traced", ir)]
        for p in self.passes:
            ir = p.run(ir)
            try:
                verify(ir)
            except Exception as e:
                raise type(e)(f"after pass {p.name}: {e}") from e
            stages.append((p.name, ir))
            if p.name in wanted or "all" in wanted:
                print(f"// ---- after {p.name} ----\n{ir}", file=file or sys.stdout)
        return ir, stages


# ---- copying ---------------------------------------------------------------------------------------------------------
def clone_block(b: Block) -> Block:
    return Block(list(b.args), [clone_instr(i) for i in b.instrs], list(b.yields))


def clone_instr(i: Instr) -> Instr:
    return dataclasses.replace(i, body=clone_block(i.body) if i.body is not None else None)


def clone(ir: KernelIR, **changes) -> KernelIR:
    return dataclasses.replace(ir, body=clone_block(ir.body), **changes)


# ---- neutral passes ----------------------------------------------------------------------------------------------
def split_host(ir: KernelIR) -> KernelIR:
    """The device's IR: the grid is the host's (``grid_plan`` on the traced IR), so drop it here; what only the
    grid read then goes with dead-code removal."""
    return clone(ir, grid=())


def dead_code(ir: KernelIR) -> KernelIR:
    """Remove what no effect needs: instructions whose results nothing live reads, loop-carried values nothing
    reads after the loop or in it, loops left with nothing to do. Roots: stores, atomic adds, the grid."""
    out = clone(ir)
    live: set[Value] = set(out.grid)
    changed = True
    while changed:          # a fixpoint: loops carry values backwards (a yield feeds the next trip's arg)
        changed = False
        for ins in out.walk():
            if not _is_live(ins, live):
                continue
            need = set(ins.srcs[:3]) if ins.op is Op.RANGE else set(ins.srcs)
            if ins.op is Op.RANGE:
                body = ins.body
                for k, (arg, res) in enumerate(zip(body.args[1:], ins.results, strict=True)):
                    if arg in live or res in live:
                        need.update((ins.srcs[3 + k], body.yields[k]))
            if not need <= live:
                live |= need
                changed = True
    _sweep(out.body, live)
    return out


def _is_live(ins: Instr, live: set[Value]) -> bool:
    if OPS[ins.op].kind == "effect":
        return True
    if ins.op is Op.RANGE:
        return any(r in live for r in ins.results) or any(a in live for a in ins.body.args[1:]) or \
            any(_is_live(i, live) for i in ins.body.instrs)
    return any(r in live for r in ins.results)


def _sweep(block: Block, live: set[Value]) -> None:
    kept = []
    for ins in block.instrs:
        if not _is_live(ins, live):
            continue
        if ins.op is Op.RANGE:
            body = ins.body
            keep = [k for k, (a, r) in enumerate(zip(body.args[1:], ins.results, strict=True))
                    if a in live or r in live]
            ins.srcs = ins.srcs[:3] + tuple(ins.srcs[3 + k] for k in keep)
            ins.results = tuple(ins.results[k] for k in keep)
            body.args = [body.args[0]] + [body.args[1 + k] for k in keep]
            body.yields = [body.yields[k] for k in keep]
            _sweep(body, live)
        kept.append(ins)
    block.instrs = kept


SPLIT_HOST = Pass("split_host", split_host, "drop the grid: the host computes it from the traced IR")
DCE = Pass("dce", dead_code, "remove what no store, atomic add or grid value needs")
