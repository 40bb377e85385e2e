"""The Gluon backend: explicit Hopper (sm_90a) kernels through Triton's Gluon dialect: TMA descriptors into
multi-stage shared rings with mbarriers, wgmma with asynchronous waits, warp roles as ``gl.warp_specialize``
partitions with register budgets (setmaxnreg).

    print(traced.source(backend="gluon"))        # the generated Gluon source
    gemm_kernel(a, b, c, backend="gluon")        # on an H100/H200 (CUDA tensors)
    BACKEND.aot(traced)                          # compile for sm_90a here, no GPU needed (tests, SASS checks)
    BACKEND.options(traced.constants)            # GluonOptions(num_warps=..., num_stages=...)
    BACKEND.resources(traced)                    # registers, spills, shared memory of the last GPU launch

Gluon kernels do not run under Triton's CPU interpreter; their correctness is checked on the GPU
(``scripts/gpu/check_gluon.py``), and on a CPU the generated source and its compile for sm_90a are tested.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar

from tilestack.backends.base import MAX_WARPS, Backend
from tilestack.backends.gluon import codegen
from tilestack.errors import BackendError


@dataclasses.dataclass(frozen=True)
class GluonOptions:
    """``num_warps``: warps of a kernel without warp roles (a multiple of 4: whole warpgroups for wgmma);
    ``num_stages``: the depth of the shared rings of loops the ``schedule`` pass pipelines (1: none);
    ``warp_specialize``: split a plain kernel's pipelined loop into a producer warpgroup (TMA) and a consumer role
    of ``num_warps`` warps (wgmma), with register budgets (the ``warp_specialize`` pass); ``persistent``: a 1-D
    grid's programs loop over its tiles and the host launches one per SM (the ``persistent`` pass). Kernels with
    warp roles take their warps and budgets from their ``ts.partition`` declarations. ``num_warps`` and
    ``num_stages`` are Triton's names, so a kernel's defaults (``@ts.kernel(options=...)``) apply to both."""
    num_warps: int | None = None
    num_stages: int | None = None
    warp_specialize: bool | None = None
    persistent: bool | None = None

    DEFAULTS: ClassVar[dict[str, Any]] = {"num_warps": 8, "num_stages": 4, "warp_specialize": False,
                                          "persistent": False}
    SEARCH: ClassVar[dict[str, tuple]] = {"num_warps": (4, 8), "num_stages": (2, 3, 4, 5),
                                          "warp_specialize": (False, True), "persistent": (False, True)}

    def __post_init__(self):
        for name in ("warp_specialize", "persistent"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise BackendError(f"gluon: {name}={v!r}; expected True or False")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BackendError(f"gluon: {name}={v!r}; expected a positive int")
        if self.num_warps is not None and self.num_warps % 4:
            raise BackendError(f"gluon: num_warps={self.num_warps}; expected a multiple of 4 (whole warpgroups)")
        if self.num_warps is not None and self.num_warps > MAX_WARPS:   # (2**40 ran on the CPU, failed on the GPU)
            raise BackendError(f"gluon: num_warps={self.num_warps}; expected at most {MAX_WARPS} (a block holds at "
                               "most 1024 threads, 32 warps of 32)")

    @property
    def warps(self) -> int:
        return self.num_warps or self.DEFAULTS["num_warps"]

    @property
    def stages(self) -> int:
        return self.num_stages or self.DEFAULTS["num_stages"]

    @property
    def specialize(self) -> bool:
        return bool(self.warp_specialize)

    @property
    def persist(self) -> bool:
        return bool(self.persistent)


LAUNCH_OPTIONS = tuple(f.name for f in dataclasses.fields(GluonOptions))


@dataclasses.dataclass(frozen=True)
class GluonArtifact:
    traced: Any                 # a weak reference (the cache holding this artifact is keyed weakly by the trace)
    fn: Any                     # the @gluon.jit kernel
    lowered: codegen.Lowered
    options: GluonOptions

    def launch(self, args) -> None:
        BACKEND.prepare(self.traced(), args, dataclasses.asdict(self.options))(args)


class GluonBackend(Backend):
    name = "gluon"
    Options = GluonOptions

    def options(self, constants: dict[str, Any], given: dict[str, Any] | None = None) -> GluonOptions:
        """Those a kernel still declares among its constants, else those ``given`` (at launch, or the kernel's
        defaults), else ``GluonOptions.DEFAULTS``."""
        merged = {**(given or {}), **constants}
        return GluonOptions(**{k: merged[k] for k in LAUNCH_OPTIONS if k in merged})

    def default_options(self, traced) -> GluonOptions:
        """What a launch with no options given uses: the kernel's default options over the backend's."""
        return self.options(traced.constants, getattr(traced.kernel, "options", None))

    def lower(self, ir, print_after=(), **options):
        """(lowered IR, stages) of the Gluon pipeline (``backends/gluon/passes.py``) for these options."""
        o = GluonOptions(**options)
        return codegen.lower(ir, o.warps, o.stages, o.specialize, o.persist, print_after=print_after)

    def generate(self, traced, options: GluonOptions | None = None, tma: bool = True,
                 index64: bool | frozenset[int] = True) -> codegen.Lowered:
        """The lowered kernel for these options; ``tma``: whether the launch's tensors go through the copy
        engine (a launcher decides from their strides; source and AOT compiles assume they do); ``index64``: the
        param indices of the globals whose element offsets need 64 bits (a launcher's ``wide_globals`` of its
        tensors), True for every one (a source or AOT compile without tensors)."""
        o = options or self.default_options(traced)
        key = ("lowered", o, tma, index64)
        cache = self.cache(traced)
        if key not in cache:
            cache[key] = codegen.generate(traced.ir, o.warps, o.stages, o.specialize, o.persist, tma, index64)
        return cache[key]

    def compile(self, traced, options: GluonOptions | None = None, tma: bool = True,
                index64: bool | frozenset[int] = True) -> GluonArtifact:
        """The jitted kernel for these options, cached per trace (Triton compiles it on the first launch)."""
        from tilestack.backends.gluon import launch

        o = options or self.default_options(traced)
        cache = self.cache(traced)
        art = cache.get(("jit", o, tma, index64))
        if art is None:
            low = self.generate(traced, o, tma, index64)
            art = cache[("jit", o, tma, index64)] = GluonArtifact(weakref.ref(traced), launch.compile_source(low),
                                                                  low, o)
        return art

    def prepare(self, traced, args, options: dict[str, Any] | None = None):
        """``options``: given at launch over the kernel's defaults (the front end merged them)."""
        from tilestack.backends.gluon import launch
        return launch.Launcher(traced, args, self.options(traced.constants, options))

    def source(self, traced, options: GluonOptions | None = None) -> str:
        return self.generate(traced, options).source

    def binary(self, traced):
        """The kernel Triton compiled for the last GPU launch of ``traced`` (None before one)."""
        return self.cache(traced).get("binary")

    def resources(self, traced) -> dict:
        """What ptxas gave the last GPU launch of ``traced``: registers, spills, shared memory, warps (as the
        Triton backend's ``resources``); ``aot.resources`` gives the same without a GPU."""
        from tilestack.backends.gluon.launch import kernel_report

        k = self.binary(traced)
        if k is None:
            raise BackendError(f"{traced.name}: no compiled gluon kernel yet; launch it on a Hopper GPU first "
                               "(or compile ahead of time: BACKEND.aot(traced), aot.resources)")
        return kernel_report(k)

    def aot(self, traced, options: GluonOptions | None = None, arch: int = 90, tma: bool = True, args=None):
        """Compile for sm_``arch``a on this machine (no GPU needed): a ``triton.compiler.CompiledKernel`` whose
        ``asm`` holds the PTX and the cubin (``aot.resources`` reads registers, spills and SASS from it). ``args``
        (tensors or meta tensors of the launch): element offsets in 32 bits where their sizes allow, as a launch
        computes them; without them, in 64 bits."""
        from tilestack.backends.gluon import aot
        from tilestack.backends.triton.codegen import wide_globals
        index64 = True if args is None else wide_globals(traced.ir, args)
        return aot.compile_for(self.compile(traced, options, tma, index64), arch)


BACKEND = GluonBackend()
lower, prepare, source = BACKEND.lower, BACKEND.prepare, BACKEND.source

__all__ = ["BACKEND", "GluonArtifact", "GluonBackend", "GluonOptions", "LAUNCH_OPTIONS", "lower", "prepare",
           "source"]
