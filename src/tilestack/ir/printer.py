"""Readable text for a kernel's IR: one instruction a line, loop bodies indented, the user's line at right.

    print(kernel.ir)

A tile value prints with the buffer it is a version of: ``%acc12 = mma ... : RegTile[f32, 64, 64] #acc`` says
the value is a new version of the tile the author called ``acc`` (buffers are numbered where names repeat).
"""

from __future__ import annotations

import dataclasses

from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import Op, mask_of


def _attrs(ins: Instr) -> str:
    keep = [(f.name, getattr(ins.attrs, f.name), f.default) for f in dataclasses.fields(ins.attrs)]
    # unset attributes are not printed: None, "", and a flag left at its default False (range's flatten)
    keep = [(k, v) for k, v, d in keep if v is not None and v != "" and not (v is False and d is False)]
    return " " + " ".join(f"{k}={v}" for k, v in keep) if keep else ""


class _Buffers:
    """Names of tile buffers: the first hint one of its values has (``acc``), numbered when two buffers share one."""

    def __init__(self, kernel: KernelIR):
        self.names: dict[int, str] = {}
        self.taken: dict[str, int] = {}
        self.hints: dict[int, str] = {}
        for ins in kernel.walk():
            for r in ins.results:
                if r.buffer is not None and r.hint:
                    self.hints.setdefault(r.buffer, r.hint)

    def __call__(self, v: Value) -> str:
        if v.buffer is None:
            return ""
        if v.buffer not in self.names:
            base = self.hints.get(v.buffer, "t")
            n = self.taken.get(base, 0)
            self.taken[base] = n + 1
            self.names[v.buffer] = f"#{base}" if n == 0 else f"#{base}.{n}"
        return self.names[v.buffer]


def _line(ins: Instr, buffers: _Buffers) -> str:
    lhs = ", ".join(repr(r) for r in ins.results)
    rhs = f"{ins.op.value}{_attrs(ins)}"
    if ins.op is Op.ARG:
        rhs = f"arg {ins.attrs.name}"
    srcs = ", ".join(repr(s) for s in ins.srcs)
    if mask_of(ins) is not None:      # a masked store's last operand: named, not read as a coordinate
        srcs = ", ".join([*(repr(s) for s in ins.srcs[:-1]), f"mask={ins.srcs[-1]!r}"])
    types = ", ".join(f"{r.type} {buffers(r)}".rstrip() for r in ins.results)
    text = f"{lhs} = {rhs}({srcs})" if lhs else f"{rhs}({srcs})"
    text = f"[{ins.role}] {text}" if ins.role else text
    return f"{text} : {types}" if types else text


def _block(block: Block, indent: int, out: list[str], buffers: _Buffers) -> None:
    pad = "  " * indent
    for ins in block.instrs:
        text = pad + _line(ins, buffers)
        out.append(f"{text:<90} # {ins.where}" if ins.where else text)
        if ins.body is not None:
            args = ", ".join(repr(a) for a in ins.body.args)
            out.append(f"{pad}  ^body({args}):")
            _block(ins.body, indent + 2, out, buffers)
            out.append(f"{pad}    yield({', '.join(repr(v) for v in ins.body.yields)})")


def _read(kernel: KernelIR, how: tuple) -> str:
    name, kind = kernel.params[how[1]].name, how[0]
    if kind in ("ptr", "scalar"):
        return name
    if kind == "desc":
        return f"{name}.desc{list(how[2])}"
    return f"{name}.{'shape' if kind == 'dim' else 'stride'}[{how[2]}]"


def format_kernel(kernel: KernelIR) -> str:
    params = ", ".join(f"{p.name}: {p.type}" for p in kernel.params)
    consts = ", ".join(f"{k}={v}" for k, v in kernel.constants.items())
    out = [f"kernel {kernel.name}({params}) [{consts}]",
           f"  grid = ({', '.join(repr(g) for g in kernel.grid)})"]
    for name, r in kernel.roles.items():
        out.append(f"  role {name}: warps={r.warps} registers={r.registers} groups={r.groups}")
    if kernel.reads is not None:
        out.append(f"  reads = ({', '.join(_read(kernel, r) for r in kernel.reads)})")
    _block(kernel.body, 1, out, _Buffers(kernel))
    return "\n".join(out)
