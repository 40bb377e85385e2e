"""Runs a kernel's IR program by program with NumPy.

Semantics, which every backend must match:
- A tile holds values its dtype can represent: every op computes in float64 and rounds the result to the
  destination's dtype (so a bf16 tile rounds like bf16, an f32 accumulator like f32).
- Loads read zeros where the tile hangs past the edge of the global; stores drop what hangs past it.
- mma accumulates in f32: dst = round_f32(acc + a @ b) with the product in float64.
- A loop's carried tiles take the body's yields from one iteration to the next.
"""

from __future__ import annotations

import numpy as np

from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, Value
from tilestack.ir.ops import Op
from tilestack.ir.scalars import apply_scalar
from tilestack.ir.types import GlobalType, TileType, round_to

_UNARY = {
    "exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "abs": np.abs, "neg": np.negative,
    "relu": lambda x: np.maximum(x, 0.0), "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "sin": np.sin, "cos": np.cos, "copy": lambda x: x,
}
_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
           "max": np.maximum, "min": np.minimum}
_REDUCE = {"max": np.max, "min": np.min, "sum": np.sum}
_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
            "ne": np.not_equal}
_LOGIC = {"and": np.logical_and, "or": np.logical_or, "not": np.logical_not}
_COMBINE = {"max": np.maximum, "min": np.minimum, "sum": np.add}


def source(traced) -> str:
    return str(traced.ir)


def run(traced, args):
    import torch

    ir = traced.ir
    arrays: dict[int, np.ndarray] = {}
    scalars: dict[int, float] = {}
    for i, (p, a) in enumerate(zip(ir.params, args, strict=True)):
        if isinstance(p.type, GlobalType):
            arrays[i] = _float64(a)
        else:
            scalars[i] = a
    grid = traced.grid(*args)
    constants = {ins.result for ins in ir.walk() if ins.op is Op.CONST}
    with np.errstate(all="ignore"):  # -inf - -inf, exp overflow etc. behave as on the GPU
        for pid in np.ndindex(*grid[::-1]):
            _Program(arrays, scalars, pid[::-1], grid, constants).block(ir.body, {})
    for i in ir.written_params():
        args[i].copy_(torch.from_numpy(arrays[i]).to(args[i].dtype))
    return None


def _float64(a) -> np.ndarray:
    """A tensor's values as a float64 array. An expanded axis (stride 0) is converted once and broadcast back
    (read-only: an output never has one), so a huge expanded input costs no more than its storage."""
    import torch

    a = a.detach()
    if not any(s == 0 and d > 1 for d, s in zip(a.shape, a.stride(), strict=True)):
        return a.to("cpu", torch.float64).numpy().copy()
    base = a[tuple(slice(0, 1) if s == 0 else slice(None) for s in a.stride())]
    return np.broadcast_to(base.to("cpu", torch.float64).numpy(), tuple(a.shape))


class _Program:
    def __init__(self, arrays, scalars, pid, grid, constants=frozenset()):
        self.arrays, self.scalars, self.pid, self.grid = arrays, scalars, pid, grid
        self.constants = constants   # values that are compile-time constants (a negative loop step must be)
        self.arg_index: dict[Value, int] = {}

    def block(self, block: Block, env: dict) -> None:
        for ins in block.instrs:
            self.step(ins, env)

    def step(self, ins: Instr, env: dict) -> None:
        op, a = ins.op, ins.attrs
        src = [env[s] if s in env else None for s in ins.srcs]
        if op is Op.ARG:
            self.arg_index[ins.result] = a["index"]
            env[ins.result] = None if isinstance(ins.result.type, GlobalType) else self.scalars[a["index"]]
        elif op is Op.CONST:
            env[ins.result] = a["value"]
        elif op is Op.DIM:
            env[ins.result] = self.arrays[self.arg_index[ins.srcs[0]]].shape[a["axis"]]
        elif op is Op.BLOCK_ID:
            env[ins.result] = int(self.pid[a["axis"]])
        elif op is Op.NUM_BLOCKS:
            env[ins.result] = int(self.grid[a["axis"]])
        elif op is Op.SCALAR:
            env[ins.result] = apply_scalar(a["fn"], src[0], src[1])
        elif op is Op.RANGE:
            self.loop(ins, env)
        elif op is Op.STORE:
            self.store(ins, env)
        elif op is Op.ATOMIC_ADD:
            self.store(ins, env, add=True)
        else:
            t: TileType = ins.result.type
            env[ins.result] = round_to(self.tile_op(ins, src, env), t.dtype)

    def tile_op(self, ins: Instr, src: list, env: dict) -> np.ndarray:
        op, a, t = ins.op, ins.attrs, ins.result.type
        if op is Op.FILL:
            return np.full(t.shape, a["value"])
        if op is Op.UNARY:
            return _UNARY[a["fn"]](src[0])
        if op is Op.BINARY:
            return _BINARY[a["fn"]](src[0], src[1])
        if op is Op.BROADCAST:
            vec = src[1][:, None] if a["axis"] == "row" else src[1][None, :]
            return _BINARY[a["fn"]](src[0], vec)
        if op is Op.CAST:
            return src[0]
        if op is Op.REDUCE:
            r = _REDUCE[a["fn"]](src[0], axis=1 if a["axis"] == "row" else 0)
            return _COMBINE[a["fn"]](r, src[1]) if len(src) > 1 else r
        if op is Op.MASK:
            rows = np.arange(t.shape[0])[:, None]
            cols = np.arange(t.shape[1])[None, :]
            k = src[1]
            keep = {"tril": cols - rows <= k, "triu": cols - rows >= k,
                    "right_fill": np.broadcast_to(cols < k, t.shape),
                    "lower_fill": np.broadcast_to(rows < k, t.shape)}[a["kind"]]
            return np.where(keep, src[0], a["value"])
        if op in (Op.COMPARE, Op.LOGIC, Op.SELECT):
            # each operand as its axis says: a tile (or scalar) as is, a vector along rows or columns
            xs = [x if ax is None else (x[:, None] if ax == "row" else x[None, :])
                  for x, ax in zip(src, a["axes"], strict=True)]
            if op is Op.COMPARE:
                out = _COMPARE[a["fn"]](*xs)
            elif op is Op.LOGIC:
                out = _LOGIC[a["fn"]](*(np.asarray(x) != 0 for x in xs))
            else:
                out = np.where(np.asarray(xs[0]) != 0, xs[1], xs[2])
            return np.broadcast_to(out, t.shape)
        if op is Op.ARANGE:
            return src[0] + np.arange(t.shape[0])
        if op is Op.MMA:
            acc, x, y = src
            x = x.T if a["trans_a"] else x
            y = y.T if a["trans_b"] else y
            return acc + x @ y
        if op is Op.LOAD:
            return self.load(ins, env)
        raise BackendError(f"reference: no rule for op {op.value}")

    def _region(self, g: np.ndarray, coords: list, tile_shape: tuple[int, ...]):
        """(index into g, index into the tile) for the part of the tile inside g, or None if none is."""
        lead = g.ndim - len(tile_shape)
        g_idx, t_idx = [], []
        for axis, c in enumerate(coords):
            c = int(c)
            if axis < lead:
                if not 0 <= c < g.shape[axis]:
                    return None
                g_idx.append(c)
            else:
                n = tile_shape[axis - lead]
                lo, hi = c * n, min(c * n + n, g.shape[axis])
                if lo < 0 or hi <= lo:
                    return None
                g_idx.append(slice(lo, hi))
                t_idx.append(slice(0, hi - lo))
        return tuple(g_idx), tuple(t_idx)

    def load(self, ins: Instr, env: dict) -> np.ndarray:
        t = ins.result.type
        g = self.arrays[self.arg_index[ins.srcs[0]]]
        out = np.zeros(t.shape)
        region = self._region(g, [env[c] for c in ins.srcs[1:]], t.shape)
        if region is not None:
            out[region[1]] = g[region[0]]
        return out

    def store(self, ins: Instr, env: dict, add: bool = False) -> None:
        """A store, or with ``add`` an atomic add: programs run one at a time, so each add is atomic."""
        gv, tv, *coords = ins.srcs
        g = self.arrays[self.arg_index[gv]]
        region = self._region(g, [env[c] for c in coords], tv.type.shape)
        if region is not None:
            x = env[tv][region[1]]
            g[region[0]] = round_to(g[region[0]] + x if add else x, gv.type.dtype)

    def loop(self, ins: Instr, env: dict) -> None:
        lo, hi, step = (int(env[s]) for s in ins.srcs[:3])
        if step == 0 or (step < 0 and ins.srcs[2] not in self.constants):
            raise BackendError(f"{ins.where}: range step is {step} when the kernel runs; a runtime step must be "
                               "positive (a negative step must be a compile-time int)")
        body = ins.body
        carried = [env[s] for s in ins.srcs[3:]]
        for i in range(lo, hi, step):
            inner = dict(env)
            inner[body.args[0]] = i
            for arg, v in zip(body.args[1:], carried, strict=True):
                inner[arg] = v
            self.block(body, inner)
            carried = [inner[y] for y in body.yields]
        for r, v in zip(ins.results, carried, strict=True):
            env[r] = v
