"""Compile the generated source with Triton and launch it: on a CUDA GPU, or on the CPU under Triton's
interpreter (no GPU, or ``TRITON_INTERPRET=1``).

    launcher = prepare(traced, args)    # once per launch signature: compile, grid, constant arguments
    launcher(args)                      # every call: fill in pointers (and TMA descriptors), launch

A launcher is built for one launch signature (see ``tilestack.lang.kernel.launch_key``: dtypes, shapes,
strides, device, pointer alignment), so everything derived from those (the grid, the sizes and strides the
kernel reads, whether TMA applies, which offsets need 64 bits, Triton's specialization) is computed once. After
the first GPU launch, which goes through Triton's JIT to compile, a call goes straight to the compiled kernel's C
launcher (``_DirectLaunch``): a list copy, one pointer per tensor, TMA descriptors encoded once per address,
and one C call.

The source is written to ``<cache_dir>/triton/<name>_<hash>.py`` and imported from there, so Triton can read
it like any other kernel and a person can open it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from tilestack.backends.triton.codegen import wide_globals
from tilestack.config import knobs
from tilestack.errors import BackendError, LaunchError


def _triton(interpret: bool):
    if interpret:
        from tilestack.config import use_triton_interpreter
        use_triton_interpreter()
        _import_gluon_first()
    try:
        import triton
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        raise BackendError("the Triton backend needs the `triton` package (pip install triton)") from e
    return triton


def _import_gluon_first() -> None:
    """Import Gluon's language before Triton's interpreter first runs a kernel. While an interpreted kernel runs,
    Triton 3.6 replaces ``tl``'s builtins with its interpreter's, and its argument mangling (``jit.mangle_type``)
    imports ``triton.experimental.gluon`` lazily, inside that window: Gluon's builtins (``gl.exp =
    builtin(tl.math.exp)``, ...) would wrap the interpreter's stand-ins for good, and every Gluon kernel compiled
    later in the process that calls one would fail ("Did you forget to add @triton.gluon.jit ?")."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:   # a Triton without Gluon: nothing to protect
        pass


def _interpret(args) -> bool:
    import torch

    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    if devices == {"cuda"} and not knobs.triton_interpret:
        return False
    if knobs.triton_interpret:
        if devices - {"cpu"}:
            raise LaunchError(f"triton backend: TRITON_INTERPRET=1 runs on CPU tensors; got tensors on {devices}")
        return True
    if devices == {"cuda"}:
        return False
    if devices <= {"cpu"} and not torch.cuda.is_available():
        return True   # no GPU here: Triton's interpreter
    raise LaunchError(f"triton backend: tensors are on {sorted(devices)}; with a CUDA GPU present they must be "
                      "on cuda (or set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)")


def compile_source(src: str, fn_name: str, interpret: bool):
    """Import ``src`` as a module and return its @triton.jit function (interpreted if asked)."""
    triton = _triton(interpret)
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    path = _source_file(src, f"{fn_name}_{digest}.py")
    old = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    try:
        spec = importlib.util.spec_from_file_location(f"tilestack_gen_{fn_name}_{digest}_{int(interpret)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = old
    return getattr(module, fn_name)


def _source_file(src: str, name: str) -> Path:
    """``<cache_dir>/triton/<name>`` holding exactly ``src``. A file there that differs (cut short by a crash
    outside this writer, damaged, edited) is written again; a cache folder that cannot be written (read-only)
    falls back, with one warning, to a private temporary folder of this process."""
    path = knobs.cache_dir / "triton" / name
    if _holds(path, src):
        return path
    try:
        _write_whole(path, src)
        return path
    except OSError as e:
        fallback = _private_dir(f"{path.parent} cannot be written ({e})") / name
        if not _holds(fallback, src):
            _write_whole(fallback, src)
        return fallback


def _holds(path: Path, src: str) -> bool:
    try:
        return path.read_text() == src
    except (OSError, ValueError):      # absent, unreadable, not UTF-8
        return False


KERNEL_TMP_PREFIX = ".tilestack-kernel."


def _write_whole(path: Path, src: str) -> None:
    """Written whole, then renamed: an interrupted run never leaves half a file."""
    from tilestack.files import write_atomic
    # one temporary prefix for every kernel of the folder: each kernel's file has a name of its own (its source's
    # hash) and is written once, so with the default ".<name>." a writer killed mid-write left its temporary for
    # good (no later write has that name); now any kernel's write sweeps the temporaries of writers that are gone
    write_atomic(path, src, tmp_prefix=KERNEL_TMP_PREFIX)


_private: Path | None = None      # this process's folder for generated kernels where the cache is read-only


def _private_dir(why: str) -> Path:
    global _private
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="tilestack-triton-"))
        warnings.warn(f"triton backend: {why}; generated kernels go to {_private} for this process (set "
                      "TILESTACK_CACHE_DIR to a writable folder)", stacklevel=4)
    return _private


TMA_ALIGN = 16   # bytes: the copy engine needs 16-byte aligned base addresses and leading strides


TMA_MAX_COORD = 2**31 - 1   # the copy engine's coordinates are signed 32-bit


def tma_ok(t) -> bool:
    """Whether the copy engine can address tensor ``t`` in whole tiles: its coordinates are 32-bit, so an axis longer
    than 2**31 (an expanded one) goes through pointers (a tile past row 2**31 read zeros, saturated)."""
    item = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGN == 0 and t.numel() > 0
            and all((s * item) % TMA_ALIGN == 0 for s in t.stride()[:-1])
            and all(d <= TMA_MAX_COORD for d in t.shape))


def compile_mode(traced, args: Sequence, tma: bool) -> tuple[bool, frozenset[int]]:
    """(TMA, the globals of 64-bit offsets) of the variant a launch on ``args`` compiles, given whether the device
    can use the copy engine (``tma``): descriptors only where every tile global's tensor can take one, 64-bit
    offsets for the tensors whose offsets pass 2^31. A launch, tune.aot's compile report and tune.constraints'
    estimate all judge this one variant. An argument that is no tensor (an ArgSpec: sizes unknown) stays as
    asked: ``tma``, 32-bit. (A meta tensor's address reads 0: aligned, as an allocation would be.)"""
    import torch

    tensor = [isinstance(a, torch.Tensor) for a in args]
    tma = tma and all(not tensor[i] or tma_ok(args[i]) for i in traced.tile_globals)
    return tma, wide_globals(traced.ir, args)


def jit_function(traced, interpret: bool, tma: bool, index64: frozenset[int] = frozenset()):
    """(jitted function, lowered kernel) for this mode, compiled once per traced kernel (the backend's artifact
    cache): with TMA or not, and 64-bit offsets for the globals in ``index64`` (those whose offsets can pass 2^31;
    32-bit elsewhere)."""
    from tilestack.backends.triton import BACKEND

    art = BACKEND.compile(traced, interpret=interpret, tma=tma, index64=index64)
    return art.fn, art.lowered


def _descriptor_factory():
    """A maker of TMA descriptors that skips TensorDescriptor's argument validation (done once, at prepare).

    A descriptor is made per launch: it holds its tensor, so a cache of them would keep every output ever
    launched alive."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    new = object.__new__

    def make(t, shape, strides, block):
        d = new(TensorDescriptor)
        d.base, d.shape, d.strides, d.block_shape, d.padding = t, shape, strides, block, "zero"
        return d

    return make


class Launcher:
    """Launches one traced kernel for one launch signature (see the module docstring)."""

    def __init__(self, traced, args, options: dict | None = None):
        import torch

        self.traced = traced
        self.interpret = _interpret(args)
        self.tma, index64 = compile_mode(traced, args, self.interpret or _tma_capable())
        self.fn, low = jit_function(traced, self.interpret, self.tma, index64)
        from tilestack.backends.triton import BACKEND
        self.options = BACKEND.options(traced.constants, options).launch_kwargs()
        # the grid, unless it reads a runtime scalar (then it is evaluated per call)
        self.grid = None if traced._grid_scalars else self._grid(args)
        # the flat argument list: sizes and strides are fixed by the signature, pointers and descriptors are not
        self.template: list = []
        self.pointers: list[tuple[int, int]] = []          # (position in template, argument index)
        self.tensor_slots: set[int] = set()                 # positions among them that take a tensor's address
        self.descriptors: list[tuple[int, int, list, list, list]] = []   # (+ shape, strides, block)
        for how in low.binding:
            kind, i = how[0], how[1]
            pos = len(self.template)
            if kind in ("ptr", "scalar"):
                self.pointers.append((pos, i))
                if kind == "ptr":
                    self.tensor_slots.add(pos)
                self.template.append(None)
            elif kind == "dim":
                self.template.append(int(args[i].shape[how[2]]))
            elif kind == "stride":
                self.template.append(int(args[i].stride(how[2])))
            else:
                t = args[i]
                self.descriptors.append((pos, i, list(t.shape), list(t.stride()), list(how[2])))
                self.template.append(None)
        self.compiled = None
        self.fast = None   # a _DirectLaunch once the kernel is compiled (see _first_launch)
        self.device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if self.descriptors:
            self.make_descriptor = _descriptor_factory()
            from triton.tools.tensor_descriptor import TensorDescriptor
            for _, i, shape, strides, block in self.descriptors:   # validate once, with Triton's own checks
                TensorDescriptor(args[i], shape, strides, block)
        self.label = None

    def _grid(self, args) -> tuple[int, int, int]:
        return _grid3(self.traced.grid(*args))        # (TracedKernel.grid refuses what CUDA cannot launch)

    def flat(self, args) -> list:
        out = self.template.copy()
        for pos, i in self.pointers:
            out[pos] = args[i]
        for pos, i, shape, strides, block in self.descriptors:
            out[pos] = self.make_descriptor(args[i], shape, strides, block)
        return out

    def __call__(self, args) -> None:
        grid = self.grid or self._grid(args)
        if 0 in grid:
            return
        fast = self.fast
        if fast is not None and not _hooks():
            fast(grid, args)
            return
        flat = self.flat(args)
        if self.interpret:
            self.fn[grid](*flat, **self.options)
        elif self.compiled is None:
            self._first_launch(grid, flat)
        else:   # a profiler's launch hooks are set (or the direct path does not apply): Triton's own way
            self.fn[grid](*flat, **self.options)

    def _first_launch(self, grid, flat) -> None:
        """Through Triton's JIT (which compiles and specializes), keeping the compiled kernel for later calls."""
        import torch

        from tilestack.backends.labels import PREFIX, range_name

        # the range names the whole config: the kernel's constants and its launch options (num_warps, ...)
        self.label = PREFIX + range_name(self.traced.name, {**self.traced.constants, **self.options})
        device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.nvtx.range_push(self.label)
        try:
            with torch.cuda.device(device_index):
                compiled = self._compile_fitting(grid, flat)
        finally:
            torch.cuda.nvtx.range_pop()
        from tilestack.backends.triton import BACKEND
        BACKEND.cache(self.traced)["binary"] = compiled
        self.compiled = compiled
        # the direct path needs the kernel loaded on the device the tensors live on
        if device_index == torch.cuda.current_device():
            self.fast = _DirectLaunch(self, compiled, device_index)


    def _compile_fitting(self, grid, flat):
        """The first launch, with fewer pipeline stages when the tiles do not fit the device's shared memory.

        A tuned config fits the kernel it was tuned on; a variant of it (an attention with a mask tile, a wider
        head padded to the next power of two) can need more. Each stage less drops one copy of the loop's tiles,
        so the kernel still runs, a little slower, with a one-time warning; a kernel too big even with one stage
        is refused with the numbers, not Triton's traceback."""
        from triton.runtime.errors import OutOfResources

        while True:
            try:
                return self.fn[grid](*flat, **self.options)
            except OutOfResources as e:
                stages = self.options.get("num_stages", 1)
                if e.name != "shared memory" or stages <= 1:
                    raise LaunchError(
                        f"{self.traced.name}: its tiles need more {e.name} than the device has with "
                        f"{ {**self.traced.constants, **self.options} }: required {e.required}, limit {e.limit}; "
                        "choose smaller tiles (the kernel's tunables)") from None
                warnings.warn(f"{self.traced.name}: config {self.traced.constants} with num_stages={stages} needs "
                              f"{e.required} bytes of shared memory (limit {e.limit}); launching with "
                              f"num_stages={stages - 1}", RuntimeWarning, stacklevel=2)
                self.options = {**self.options, "num_stages": stages - 1}


class _DirectLaunch:
    """A compiled kernel's C launcher called directly: what Triton's ``CompiledKernel.run`` does, without its
    per-call Python, and with each TMA descriptor encoded once per tensor address (a descriptor is a function of
    the address, the shape, the strides and the box, and the last three are fixed by the launch signature).

    Built only where Triton's launcher has the layout this was written against (Triton 3.6: no scratch memory,
    descriptors expanded by a wrapper around the C launcher); otherwise construction gives None and launches go
    through Triton's JIT as before."""

    MAX_DESCRIPTORS = 256   # encoded descriptors kept per argument (addresses a training loop cycles through)

    def __new__(cls, launcher: Launcher, compiled, device_index: int):
        run = compiled.run
        if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
            return None
        raw = run.launch
        if launcher.descriptors:   # Triton wraps its C launcher to expand descriptors: take the C one
            cells = dict(zip(getattr(raw, "__code__", None) and raw.__code__.co_freevars or (),
                             (c.cell_contents for c in getattr(raw, "__closure__", None) or ()), strict=False))
            raw = cells.get("launcher")
            if raw is None:
                return None
        self = super().__new__(cls)
        import torch
        from triton.backends.nvidia.driver import make_tensordesc_arg

        self.raw, self.function, self.packed = raw, compiled.function, compiled.packed_metadata
        self.coop, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        self.stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # None in a CPU build of torch
        self.device_index = device_index
        self.nvtx = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop, launcher.label)
        meta = list(getattr(compiled.metadata, "tensordesc_meta", None) or [None] * len(launcher.descriptors))
        # the expanded argument list: fixed values, and slots filled per call. A tensor goes in as its address (an
        # int): Triton's C launcher then takes it as is, where for a tensor it calls data_ptr() and asks the driver
        # (cuPointerGetAttribute) whether the address is a device one, about a microsecond per pointer per launch;
        # the signature already fixed every tensor's device, checked when it was planned
        self.template, self.pointers, self.addresses, self.tma = [], [], [], []
        by_pos = {pos: d for d, (pos, *_rest) in enumerate(launcher.descriptors)}
        for pos, value in enumerate(launcher.template):
            if pos in by_pos:
                _, i, shape, strides, block = launcher.descriptors[by_pos[pos]]
                m = meta[by_pos[pos]]
                if m is None:
                    return None   # descriptors lowered to pointers: rare; Triton's own path handles them
                self.tma.append((len(self.template), i, shape, strides, block, m, {}))
                self.template.extend([None, *shape, *strides])
            elif value is None:
                slot = (len(self.template), next(i for p, i in launcher.pointers if p == pos))
                (self.addresses if pos in launcher.tensor_slots else self.pointers).append(slot)
                self.template.append(None)
            else:
                self.template.append(value)
        self.make_descriptor, self.encode = launcher.make_descriptor if launcher.descriptors else None, \
            make_tensordesc_arg
        return self

    def __call__(self, grid, args) -> None:
        out = self.template.copy()
        for pos, i in self.addresses:
            out[pos] = args[i].data_ptr()
        for pos, i in self.pointers:
            out[pos] = args[i]
        for pos, i, shape, strides, block, meta, cache in self.tma:
            t = args[i]
            ptr = t.data_ptr()
            desc = cache.get(ptr)
            if desc is None:
                if len(cache) >= self.MAX_DESCRIPTORS:
                    cache.clear()
                desc = cache[ptr] = self.encode(self.make_descriptor(t, shape, strides, block), meta)[0]
            out[pos] = desc
        push, pop, label = self.nvtx
        push(label)
        try:
            self.raw(grid[0], grid[1], grid[2], self.stream(self.device_index), self.function, self.coop, self.pdl,
                     None, None, self.packed, None, None, None, *out)
        finally:
            pop()


_runtime_knobs = None


def _hooks() -> bool:
    """Whether a profiler listens to Triton's launches (then launches take Triton's path, which calls it)."""
    global _runtime_knobs
    if _runtime_knobs is None:
        import triton
        _runtime_knobs = triton.knobs.runtime
    return bool(_runtime_knobs.launch_enter_hook.calls or _runtime_knobs.launch_exit_hook.calls)


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (*grid, *(1,) * (3 - len(grid)))


def prepare(traced, args, options: dict | None = None) -> Launcher:
    return Launcher(traced, args, options)


def run(traced, args) -> None:
    """One launch, preparing it first (prefer ``prepare`` once and the launcher many times)."""
    prepare(traced, args)(args)


_tma_capability: bool | None = None


def _tma_capable() -> bool:
    """Whether this GPU has the copy engine (Hopper or newer); read once."""
    global _tma_capability
    if _tma_capability is None:
        import torch
        _tma_capability = torch.cuda.get_device_capability()[0] >= 9
    return _tma_capability


def resource_report(traced) -> dict:
    """What the compiler gave the last GPU launch: registers per thread, spills, shared memory, warps."""
    from tilestack.backends.triton import BACKEND

    k = BACKEND.binary(traced)
    if k is None:
        raise BackendError(f"{traced.name}: no compiled GPU kernel yet; launch it on a CUDA device first")
    md = k.metadata
    return {"registers": k.n_regs, "spills": k.n_spills, "shared_bytes": md.shared,
            "num_warps": md.num_warps, "num_stages": md.num_stages}
