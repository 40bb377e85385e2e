"""The Triton backend: emits a readable ``@triton.jit`` function from the IR and launches it, on a GPU, or on
the CPU under Triton's interpreter.

    print(traced.source())                       # the generated Triton source
    traced.run(*tensors, backend="triton")
    BACKEND.options(traced.constants)            # TritonOptions(num_warps=..., num_stages=...)
    BACKEND.resources(traced)                    # registers, spills, shared memory of the last GPU compile
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar

from tilestack.backends.base import MAX_WARPS, Backend
from tilestack.backends.triton import codegen, launch
from tilestack.errors import BackendError


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """Triton's launch options. None leaves Triton's default (``DEFAULTS``: 4 warps, 3 stages)."""
    num_warps: int | None = None
    num_stages: int | None = None

    DEFAULTS: ClassVar[dict[str, int]] = {"num_warps": 4, "num_stages": 3}        # Triton's, on NVIDIA GPUs
    SEARCH: ClassVar[dict[str, tuple[int, ...]]] = {"num_warps": (4, 8), "num_stages": (1, 2, 3, 4)}

    def __post_init__(self):
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BackendError(f"triton: {name}={v!r}; expected a positive int")
        if self.num_warps is not None and self.num_warps & (self.num_warps - 1):
            raise BackendError(f"triton: num_warps={self.num_warps}; expected a power of two")
        if self.num_warps is not None and self.num_warps > MAX_WARPS:   # (2**40 ran on the CPU, failed on the GPU)
            raise BackendError(f"triton: num_warps={self.num_warps}; expected at most {MAX_WARPS} (a block holds at "
                               "most 1024 threads, 32 warps of 32)")

    def launch_kwargs(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


LAUNCH_OPTIONS = tuple(f.name for f in dataclasses.fields(TritonOptions))


@dataclasses.dataclass(frozen=True)
class TritonArtifact:
    """One compiled mode of a trace: the jitted function and the lowered kernel it came from."""
    traced: Any                  # a weak reference: the cache holding this artifact is keyed weakly by the trace
    fn: Any                      # the @triton.jit function (interpreted or compiled by Triton on first launch)
    lowered: codegen.Lowered

    def launch(self, args) -> None:
        BACKEND.prepare(self.traced(), args)(args)


class TritonBackend(Backend):
    name = "triton"
    Options = TritonOptions

    def options(self, constants: dict[str, Any], given: dict[str, Any] | None = None) -> TritonOptions:
        """Launch options: those a kernel still declares among its constants (num_warps, num_stages), else those
        ``given`` at launch."""
        merged = {**(given or {}), **constants}
        return TritonOptions(**{k: merged[k] for k in LAUNCH_OPTIONS if k in merged})

    def lower(self, ir, print_after=(), tma: bool = True):
        """(lowered IR, stages) of the Triton pipeline (``backends/triton/passes.py``), TMA as on a Hopper GPU."""
        return codegen.lower(ir, tma=tma, print_after=print_after)

    def compile(self, traced, options: TritonOptions | None = None, *, interpret: bool = False, tma: bool = False,
                index64: frozenset[int] = frozenset()) -> TritonArtifact:
        """The artifact for one mode (interpreted or not, TMA or not, which globals use 64-bit offsets), cached
        per trace. Launch options do not change the source: Triton specializes on them when it compiles."""
        cache = self.cache(traced)
        key = ("jit", interpret, tma, index64)
        art = cache.get(key)
        if art is None:
            low = codegen.generate(traced.ir, interpret=interpret, tma=tma, index64=index64)
            fn = launch.compile_source(low.source, low.fn_name, interpret)
            art = cache[key] = TritonArtifact(weakref.ref(traced), fn, low)
        return art

    def prepare(self, traced, args, options: dict[str, Any] | None = None) -> launch.Launcher:
        return launch.Launcher(traced, args, options)

    def source(self, traced) -> str:
        return codegen.source(traced)

    def binary(self, traced):
        """The kernel Triton compiled for the last GPU launch of ``traced`` (None before one)."""
        return self.cache(traced).get("binary")

    def resources(self, traced) -> dict:
        return launch.resource_report(traced)


BACKEND = TritonBackend()
lower, prepare, run, source = BACKEND.lower, BACKEND.prepare, BACKEND.run, BACKEND.source

__all__ = ["BACKEND", "LAUNCH_OPTIONS", "TritonArtifact", "TritonBackend", "TritonOptions", "lower", "prepare",
           "run", "source"]
