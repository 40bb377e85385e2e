"""Register layouts for the Gluon backend: which distributed layout each register tile and vector gets.

    plan = plan_layouts(ir)            # value -> layout key, for every register tile and vector
    src = materialize(key, warps)      # the Gluon expression of a key for a partition of ``warps`` warps

Keys are hashable tuples, independent of the warp count (a role's partition materializes them for its own):
    ("mma", n, k)              wgmma's accumulator layout, instruction shape [16, n, k]
    ("blocked", rows, cols)    a coalesced layout: rows over warps, contiguous columns per thread
    ("blocked1", n)            a vector on its own
    ("slice", dim, parent)     the row (dim=1) or column (dim=0) vectors of a parent layout
    ("dot_a", parent, k_width) wgmma's register a operand for an accumulator of layout ``parent``

Tiles that an element-wise op, a loop or an mma's accumulator connects share one layout (union-find), so a
kernel converts layouts only where it changes shape of access (the mma operand, a reduction's partner vector
of another group); the emitter inserts ``gl.convert_layout`` wherever a value's layout differs from the one an
op needs, so a plan is a matter of speed, never of correctness.
"""

from __future__ import annotations

from tilestack.ir.nodes import KernelIR, Value
from tilestack.ir.ops import Op
from tilestack.ir.types import Space, TileType

THREADS_PER_WARP = 32
VECTOR_BYTES = 16        # a coalesced access: 16 bytes per thread


class _Groups:
    def __init__(self):
        self.parent: dict[Value, Value] = {}

    def find(self, v: Value) -> Value:
        p = self.parent.setdefault(v, v)
        while p is not self.parent.setdefault(p, p):
            p = self.parent[p]
        self.parent[v] = p
        return p

    def union(self, a: Value, b: Value) -> None:
        self.parent[self.find(a)] = self.find(b)


def _reg(v: Value) -> bool:
    return isinstance(v.type, TileType) and v.type.space is Space.REG


def mma_key(acc_cols: int, operand_dtype) -> tuple:
    return ("mma", acc_cols, 256 // (8 * operand_dtype.itemsize))


def blocked_key(t: TileType) -> tuple:
    return ("blocked", *t.shape) if len(t.shape) == 2 else ("blocked1", t.shape[0])


def plan_layouts(ir: KernelIR) -> dict[Value, tuple]:
    g = _Groups()
    link = g.union
    for ins in ir.walk():
        srcs = [s for s in ins.srcs if _reg(s)]
        if ins.op in (Op.UNARY, Op.BINARY, Op.MASK, Op.MMA_WAIT) or \
                (ins.op is Op.CAST and _reg(ins.result)):
            for s in srcs:
                if s.type.shape == ins.result.type.shape:
                    link(s, ins.result)
        elif ins.op in (Op.BROADCAST, Op.MMA, Op.MMA_ASYNC):
            link(ins.srcs[0], ins.result)
        elif ins.op is Op.REDUCE and len(ins.srcs) == 2:
            link(ins.srcs[1], ins.result)
        elif ins.op in (Op.COMPARE, Op.LOGIC, Op.SELECT):
            for s, ax in zip(ins.srcs, ins.attrs.axes, strict=True):
                if ax is None and _reg(s):
                    link(s, ins.result)
        elif ins.op is Op.RANGE:
            body = ins.body
            for init, arg, y, r in zip(ins.srcs[3:], body.args[1:], body.yields, ins.results, strict=True):
                if _reg(arg):
                    link(init, arg)
                    link(y, arg)
                    link(r, arg)
    layout: dict[Value, tuple] = {}
    # tile groups: wgmma's layout where an mma accumulates into the group, else a coalesced one
    for ins in ir.walk():
        if ins.op in (Op.MMA, Op.MMA_ASYNC):
            root = g.find(ins.result)
            layout.setdefault(root, mma_key(ins.result.type.shape[1], ins.srcs[1].type.dtype))
    # a register a operand of wgmma whose group has no layout of its own is kept in the operand layout
    for ins in ir.walk():
        if ins.op in (Op.MMA, Op.MMA_ASYNC) and _reg(ins.srcs[1]) and not ins.attrs.trans_a:
            parent = layout[g.find(ins.result)]
            layout.setdefault(g.find(ins.srcs[1]), ("dot_a", parent, 4 // ins.srcs[1].type.dtype.itemsize))
    # vector groups: the slice of the tile group a reduction or a broadcast pairs them with
    for ins in ir.walk():
        if ins.op is Op.REDUCE:
            x = g.find(ins.srcs[0])
            parent = layout.setdefault(x, blocked_key(ins.srcs[0].type))
            layout.setdefault(g.find(ins.result), ("slice", 1 if ins.attrs.axis == "row" else 0, parent))
        elif ins.op is Op.BROADCAST and _reg(ins.srcs[0]) and len(ins.srcs[0].type.shape) == 2:
            x = g.find(ins.srcs[0])
            parent = layout.setdefault(x, blocked_key(ins.srcs[0].type))
            layout.setdefault(g.find(ins.srcs[1]), ("slice", 1 if ins.attrs.axis == "row" else 0, parent))
    out = {}
    for v in list(g.parent):
        if _reg(v):
            out[v] = layout.get(g.find(v)) or blocked_key(v.type)
    for ins in ir.walk():
        for v in ins.results:
            if _reg(v) and v not in out:
                out[v] = blocked_key(v.type)
    return out


def blocked_params(rows: int, cols: int, itemsize: int, warps: int) -> tuple[list, list, list]:
    """(size_per_thread, threads_per_warp, warps_per_cta) of a coalesced 2-D layout: 16-byte vectors along a
    row, a warp's threads across a row first, warps down the rows while there are rows for them, the rest across
    the columns. (All warps down the rows of a thin tile, a (1, 1024) row, made all but one warp hold copies of
    that warp's elements: 8x the registers, and a kernel of a few such tiles spilled.)"""
    vec = max(1, min(cols, VECTOR_BYTES // itemsize))
    tcols = min(THREADS_PER_WARP, max(1, cols // vec))
    trows = THREADS_PER_WARP // tcols
    wrows = 1
    while wrows < warps and wrows * 2 * trows <= rows:
        wrows *= 2
    wcols = 1
    while wrows * wcols < warps and wcols * 2 * tcols * vec <= cols:
        wcols *= 2
    return [1, vec], [trows, tcols], [warps // wcols, wcols]


def materialize(key: tuple, warps: int, parent_name=None) -> str:
    """The Gluon expression of ``key`` for ``warps`` warps; ``parent_name(key)`` names a slice's or an operand
    layout's parent where it is declared already (else the parent is spelled out)."""
    kind = key[0]
    parent = parent_name or (lambda k: materialize(k, warps))
    if kind == "mma":
        _, n, k = key
        return f"gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[{warps}, 1], instr_shape=[16, {n}, {k}])"
    if kind == "blocked":
        spt, tpw, wpc = blocked_params(key[1], key[2], 4, warps)
        return f"gl.BlockedLayout({spt}, {tpw}, {wpc}, [1, 0])"
    if kind == "blocked1":
        return f"gl.BlockedLayout([1], [{THREADS_PER_WARP}], [{warps}], [0])"
    if kind == "slice":
        return f"gl.SliceLayout({key[1]}, {parent(key[2])})"
    if kind == "dot_a":
        return f"gl.DotOperandLayout(0, {parent(key[1])}, {key[2]})"
    raise ValueError(f"no layout kind {kind!r}")
