"""Runs a kernel's IR program by program with NumPy.

Each op's meaning is its reference semantics in ``tilestack.ir.ops``; this module is the machine they run on
(arguments, block ids, global memory, loops). Semantics, which every backend must match:
- A tile holds values its dtype can represent: every float op computes in float64, rounds the result to its work
  dtype (f32, or f64: ``ir.ops.work_dtype``) as the GPU computes it, then to the destination's dtype (so a bf16
  tile rounds like bf16, an f32 accumulator like f32). Integer tiles and globals are held exactly (int64 arrays),
  and integer work wraps at its work dtype's width, as on the GPU (``ir.ops.work_dtype``: C-style wrapping,
  truncating division and remainder).
- Loads read zeros where the tile hangs past the edge of the global; stores drop what hangs past it, and a masked
  store (or atomic add) what its mask is false at.
- mma accumulates in f32: dst = round_f32(acc + a @ b) with the product in float64 (a and b rounded to tf32
  first, to nearest even, when the mma asks for tf32 input precision).
- A loop's carried tiles take the body's yields from one iteration to the next.
- A float scalar (an argument, a constant, scalar arithmetic) taken by tile work that is not f64 is rounded to f32
  first, as Triton converts it to the tensor's f32: ``x * 0.1`` multiplies by the f32 nearest 0.1, and ``x > 0.1`` is
  false at x = f32(0.1). f64 work takes it as it is. Integer operands of float work (an i32 vector added to an f32
  tile, an index scalar) are converted to the work dtype first too (``ir.ops``).
- Arithmetic on float scalars (``a + 3.0``, ``X.shape[0] * 0.5``) runs in f32, as Triton's and Gluon's does
  (``ir.ops``' SCALAR); index arithmetic is exact.
"""

from __future__ import annotations

import numpy as np

from tilestack.errors import BackendError
from tilestack.ir.nodes import Block, Instr, Value
from tilestack.ir.ops import OPS, Op, mask_of, work_dtype
from tilestack.ir.scalars import f64_floats
from tilestack.ir.types import FLOAT, GlobalType, f64, round_to
from tilestack.lang.layout import overlap_reason


def source(traced) -> str:
    return str(traced.ir)


def run(traced, args):
    import torch

    ir = traced.ir
    arrays: dict[int, np.ndarray] = {}
    scalars: dict[int, float] = {}
    written = ir.written_params()
    aliased: dict[int, tuple] = {}   # outputs whose elements share memory: index -> (flat copy, offsets)
    for i, (p, a) in enumerate(zip(ir.params, args, strict=True)):
        if isinstance(p.type, GlobalType):
            if i in written and a.numel() > 1 and not a.is_contiguous() \
                    and overlap_reason(tuple(a.shape), tuple(a.stride())) is not None:
                arrays[i], aliased[i] = _aliased(a)
            else:
                arrays[i] = _numpy(a)
        else:
            scalars[i] = a
    _share_outputs(ir, args, arrays, written, aliased)
    grid = traced.grid(*args)
    constants = {ins.result for ins in ir.walk() if ins.op is Op.CONST}
    wide = f64_floats(ir)
    with np.errstate(all="ignore"):  # -inf - -inf, exp overflow etc. behave as on the GPU
        for pid in np.ndindex(*grid[::-1]):
            prog = _Program(arrays, scalars, pid[::-1], grid, constants, wide)
            prog.aliased = aliased
            prog.block(ir.body, {})
    for i in written:
        if i in aliased:
            flat, offsets = aliased[i]
            span = args[i].as_strided((flat.size,), (1,), args[i].storage_offset())
            index = torch.from_numpy(offsets)
            span.index_copy_(0, index, torch.from_numpy(flat[offsets]).to(span.dtype))
        elif isinstance(arrays[i], _Reinterpreted):
            args[i].copy_(arrays[i].tensor())
        else:
            args[i].copy_(torch.from_numpy(arrays[i]).to(args[i].dtype))
    return None


def _share_outputs(ir, args, arrays: dict, written, aliased: dict) -> None:
    """Outputs that are one tensor passed twice (or views of one tensor at one address, with one element size and
    strides: ``Y[:8]`` and ``Y``, or ``Y`` and ``Y.view(torch.int32)``) are held as views of one copy, so that what a
    program stores through one is in the tensor written back through the other, in program order, as on the GPU.
    (Separate copies, each written back whole, kept only the last one's stores.) Views of one dtype share a copy of
    the values; views of several dtypes share a copy of the bits (``_Reinterpreted``)."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for i in sorted(written):
        a = args[i]
        if isinstance(ir.params[i].type, GlobalType) and i not in aliased and a.numel():
            groups.setdefault((a.data_ptr(), a.element_size(), a.stride(), a.device), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        a = args[members[0]].detach()
        span = max(1 + sum((n - 1) * st for n, st in zip(args[i].shape, args[i].stride(), strict=True))
                   for i in members)
        if len({args[i].dtype for i in members}) > 1:
            flat = a.as_strided((span,), (1,), a.storage_offset()).view(_bits_dtypes()[a.element_size()])
            bits = flat.cpu().numpy().copy()
            for i in members:
                view = np.lib.stride_tricks.as_strided(bits, tuple(args[i].shape),
                                                       tuple(st * bits.itemsize for st in args[i].stride()))
                arrays[i] = _Reinterpreted(view, args[i].dtype)
            continue
        held = torch.float64 if a.dtype.is_floating_point else torch.int64
        flat = a.as_strided((span,), (1,), a.storage_offset()).to("cpu", held).numpy().copy()
        for i in members:
            arrays[i] = np.lib.stride_tricks.as_strided(flat, tuple(args[i].shape),
                                                        tuple(st * flat.itemsize for st in args[i].stride()))


class _Reinterpreted:
    """An output that shares its elements with an output of another dtype of its size (``Y`` and
    ``Y.view(torch.int32)``): a view of the bits both hold, read and written as the reference's values of this
    output's dtype (float64 or int64), so a store through one view is seen through the other as those bits. Offers
    what the executor uses of a global's array: shape, ndim, dtype and indexing."""

    def __init__(self, bits: np.ndarray, dtype):
        import torch

        self.bits, self.torch_dtype = bits, dtype
        self.shape, self.ndim = bits.shape, bits.ndim
        self.held = torch.float64 if dtype.is_floating_point else torch.int64
        self.dtype = np.float64 if dtype.is_floating_point else np.int64

    def __getitem__(self, index):
        import torch

        b = np.array(self.bits[index], copy=True)
        return torch.from_numpy(b).view(self.torch_dtype).to(self.held).numpy()

    def __setitem__(self, index, values) -> None:
        import torch

        v = torch.from_numpy(np.array(values, dtype=self.dtype)).to(self.torch_dtype)   # (rounded to it already)
        self.bits[index] = v.view(_bits_dtypes()[v.element_size()]).numpy()

    def tensor(self):
        """The values as a tensor of the output's dtype (for the write-back)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.bits)).view(self.torch_dtype)


def _bits_dtypes() -> dict:
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _aliased(a) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """An output whose indices reach one element twice (only atomic adds may write one: lang.launch), held as the
    GPU holds it: a NumPy view with ``a``'s strides over a copy of the storage span it covers, so an add through one
    index is seen through every other reaching the same element (a dense copy written back element by element kept
    one of the adds). Returns (the view, (the flat copy, the offsets in it the view reaches))."""
    import torch

    a = a.detach()
    held = torch.float64 if a.dtype.is_floating_point else torch.int64
    span = 1 + sum((n - 1) * st for n, st in zip(a.shape, a.stride(), strict=True))
    flat = a.as_strided((span,), (1,), a.storage_offset()).to("cpu", held).numpy().copy()
    view = np.lib.stride_tricks.as_strided(flat, tuple(a.shape), tuple(st * flat.itemsize for st in a.stride()))
    offsets = np.unique(np.lib.stride_tricks.as_strided(np.arange(span, dtype=np.int64), tuple(a.shape),
                                                        tuple(st * 8 for st in a.stride())))
    return view, (flat, offsets)


def _f32(x) -> float:
    """A float scalar as the f32 nearest it."""
    return float(np.float32(x))


def _f32_scalars(ins: Instr, kind: str) -> bool:
    """Whether ``ins`` is tile work that is not f64 with a float scalar operand (which it takes as an f32). The work
    dtype decides, not the result's: an f32 tile plus a float into an f64 tile adds in f32 (``ir.ops.work_dtype``),
    as Triton does, so the float is an f32 there too."""
    if kind != "tile" or not any(s.type == FLOAT for s in ins.srcs):
        return False
    return work_dtype(ins) is not f64


def _numpy(a) -> np.ndarray:
    """A tensor's values as a float64 array (int64 for an integer tensor: exact to 64 bits). An expanded axis
    (stride 0) is converted once and broadcast back (read-only: an output never has one), so a huge expanded
    input costs no more than its storage. An empty tensor is copied whatever its strides (torch.from_numpy of an
    empty array has strides of 0, and an empty output is written back: a read-only view made torch warn)."""
    import torch

    a = a.detach()
    held = torch.float64 if a.dtype.is_floating_point else torch.int64
    if a.numel() == 0 or not any(s == 0 and d > 1 for d, s in zip(a.shape, a.stride(), strict=True)):
        return a.to("cpu", held).numpy().copy()
    base = a[tuple(slice(0, 1) if s == 0 else slice(None) for s in a.stride())]
    return np.broadcast_to(base.to("cpu", held).numpy(), tuple(a.shape))


class _Program:
    def __init__(self, arrays, scalars, pid, grid, constants=frozenset(), f64_floats=frozenset()):
        self.arrays, self.scalars, self.pid, self.grid = arrays, scalars, pid, grid
        self.constants = constants   # values that are compile-time constants (a negative loop step must be)
        self.f64_floats = f64_floats  # float scalars computed in f64 (ir.scalars.f64_floats; _scalar_ref reads it)
        self.arg_index: dict[Value, int] = {}
        self.aliased: dict = {}      # outputs whose indices share memory (run's _aliased)

    def block(self, block: Block, env: dict) -> None:
        for ins in block.instrs:
            self.step(ins, env)

    def step(self, ins: Instr, env: dict) -> None:
        d = OPS[ins.op]
        self.env = env      # the environment the op runs in (loops read it)
        srcs = [env.get(s) for s in ins.srcs]
        if _f32_scalars(ins, d.kind):
            srcs = [_f32(v) if s.type == FLOAT else v for s, v in zip(ins.srcs, srcs, strict=True)]
        value = d.reference(ins, srcs, self)
        if d.kind == "tile":     # rounded to (or, integers, wrapped into) the result's dtype
            env[ins.result] = round_to(value, ins.result.type.dtype)
        elif d.kind in ("scalar", "arg"):
            env[ins.result] = value

    # ---- the machine the ops' reference semantics run on (``ir.ops``: m.arg, m.load, m.loop, ...) ---------
    def arg(self, ins: Instr):
        self.arg_index[ins.result] = ins.attrs.index
        return None if isinstance(ins.result.type, GlobalType) else self.scalars[ins.attrs.index]

    def dim(self, ins: Instr) -> int:
        return self.arrays[self.arg_index[ins.srcs[0]]].shape[ins.attrs.axis]

    # An axis the grid does not have (ts.block_id(1) in a 1-D grid) is CUDA's: blockIdx.y 0 of gridDim.y 1, as the
    # Triton backend's tl.program_id(1) gives; indexing the grid tuple with it failed with a bare IndexError.
    def block_id(self, axis: int) -> int:
        return int(self.pid[axis]) if axis < len(self.pid) else 0

    def num_blocks(self, axis: int) -> int:
        return int(self.grid[axis]) if axis < len(self.grid) else 1

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

    def load(self, ins: Instr, srcs: list) -> np.ndarray:
        return self.read(ins.srcs[0], srcs[1:], ins.result.type.shape)

    def read(self, gv: Value, coords: list, shape: tuple[int, ...]) -> np.ndarray:
        """The tile of ``shape`` of global ``gv`` at tile coordinates ``coords``; zeros past the edges."""
        g = self.arrays[self.arg_index[gv]]
        out = np.zeros(shape, dtype=g.dtype)
        region = self._region(g, coords, shape)
        if region is not None:
            out[region[1]] = g[region[0]]
        return out

    def load_scalar(self, ins: Instr, srcs: list):
        """One element of a global (0 outside it): an int for an index result, the f32 value of a float one (an f64
        element that f64 work takes as it is: ``ir.scalars.f64_floats``; f32 work rounds it where it takes it)."""
        g = self.arrays[self.arg_index[ins.srcs[0]]]
        index = tuple(int(c) for c in srcs[1:])
        inside = all(0 <= c < n for c, n in zip(index, g.shape, strict=True))
        x = g[index] if inside else 0
        if ins.result.type != FLOAT:
            return int(x)
        return float(x) if ins.result in self.f64_floats else float(np.float32(x))

    def stage_index(self, ins: Instr, stage) -> int:
        n = ins.srcs[0].type.stages
        if not 0 <= int(stage) < n:
            raise BackendError(f"{ins.where}: {ins.op.value} of stage {int(stage)} in a buffer of {n} stages")
        return int(stage)

    def store(self, ins: Instr, srcs: list, add: bool = False) -> None:
        """A store, or with ``add`` an atomic add: programs run one at a time, so each add is atomic. The tile is
        converted to the global's dtype first (an f32 tile added into an i32 global adds its truncated values).
        A masked one writes only the elements (inside the global) where its mask is true; the rest keep what the
        global held."""
        gv, tv = ins.srcs[:2]
        g = self.arrays[self.arg_index[gv]]
        rank = gv.type.rank
        region = self._region(g, srcs[2:2 + rank], tv.type.shape)
        if region is None:
            return
        x = round_to(srcs[1][region[1]], gv.type.dtype)
        if add and self.arg_index[gv] in self.aliased:
            # an output sharing memory between its indices (lang.launch lets only atomic adds write one): one
            # element at a time, so two indices of the tile reaching one element add both (g[...] = old + x
            # would keep one)
            sub = g[region[0]]
            keep = None if mask_of(ins) is None else np.asarray(srcs[2 + rank])[region[1]] != 0
            for k in np.ndindex(*sub.shape):
                if keep is None or keep[k]:
                    sub[k] = round_to(sub[k] + x[k], gv.type.dtype)
            return
        old = g[region[0]]
        new = round_to(old + x, gv.type.dtype) if add else x
        if mask_of(ins) is not None:
            new = np.where(np.asarray(srcs[2 + rank])[region[1]] != 0, new, old)
        g[region[0]] = new

    def loop(self, ins: Instr, srcs: list) -> None:
        env = self.env
        lo, hi, step = (int(x) for x in srcs[:3])
        if step == 0 or (step < 0 and ins.srcs[2] not in self.constants):
            raise BackendError(f"{ins.where}: range step is {step} when the kernel runs; a runtime step must be "
                               "positive (a negative step must be a compile-time int)")
        body = ins.body
        carried = srcs[3:]
        for i in range(lo, hi, step):
            inner = dict(env)
            inner[body.args[0]] = i
            for arg, v in zip(body.args[1:], carried, strict=True):
                inner[arg] = v
            self.block(body, inner)
            carried = [inner[y] for y in body.yields]
        for r, v in zip(ins.results, carried, strict=True):
            env[r] = v
