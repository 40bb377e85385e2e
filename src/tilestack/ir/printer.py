"""Readable text for a kernel's IR: one instruction a line, loop bodies indented, the user's line at right.

    print(kernel.ir)
"""

from __future__ import annotations

from tilestack.ir.nodes import Block, Instr, KernelIR
from tilestack.ir.ops import Op


def _attrs(ins: Instr) -> str:
    # "dst" is the tracer's tile-handle id (footprints count tiles by it): internal, not shown
    keep = {k: v for k, v in ins.attrs.items() if k not in ("name", "index", "dst") and v is not None}
    return " " + " ".join(f"{k}={v}" for k, v in keep.items()) if keep else ""


def _line(ins: Instr) -> str:
    lhs = ", ".join(repr(r) for r in ins.results)
    rhs = f"{ins.op.value}{_attrs(ins)}"
    if ins.op is Op.ARG:
        rhs = f"arg {ins.attrs['name']}"
    srcs = ", ".join(repr(s) for s in ins.srcs)
    types = ", ".join(str(r.type) for r in ins.results)
    text = f"{lhs} = {rhs}({srcs})" if lhs else f"{rhs}({srcs})"
    return f"{text} : {types}" if types else text


def _block(block: Block, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for ins in block.instrs:
        text = pad + _line(ins)
        out.append(f"{text:<90} # {ins.where}" if ins.where else text)
        if ins.body is not None:
            args = ", ".join(repr(a) for a in ins.body.args)
            out.append(f"{pad}  ^body({args}):")
            _block(ins.body, indent + 2, out)
            out.append(f"{pad}    yield({', '.join(repr(v) for v in ins.body.yields)})")


def format_kernel(kernel: KernelIR) -> str:
    params = ", ".join(f"{p.name}: {p.type}" for p in kernel.params)
    consts = ", ".join(f"{k}={v}" for k, v in kernel.constants.items())
    out = [f"kernel {kernel.name}({params}) [{consts}]",
           f"  grid = ({', '.join(repr(g) for g in kernel.grid)})"]
    _block(kernel.body, 1, out)
    return "\n".join(out)
