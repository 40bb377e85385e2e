"""The backend protocol: what the front end (``tilestack.lang``) asks of every backend.

    be = get_backend("triton")
    low, stages = be.lower(traced.ir)          # its pass pipeline, every stage printable
    art = be.compile(traced, options)          # an Artifact, cached by the backend per (trace, options)
    launch = be.prepare(traced, args, opts)    # the prebuilt launcher of one launch signature: launch(args)
    be.source(traced)                          # what it generates, readable

Each backend owns its typed options (``Options``: Triton's num_warps and num_stages), its cache of artifacts
(keyed weakly by the traced kernel, so a dropped trace frees its code) and its launchers. Options are not a
kernel's tunables: they are given at launch (``kernel(*args, num_warps=8)``), defaulted per kernel
(``@ts.kernel(..., options=...)``), or searched by the tuner over ``search_domains()`` beside the kernel's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from tilestack.errors import LaunchError

MAX_WARPS = 32   # warps a block holds on every CUDA GPU: 1024 threads of 32
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)   # programs a CUDA launch takes on grid axes 0 (x), 1 (y) and 2 (z)


def check_cuda_grid(name: str, grid: Sequence[int]) -> None:
    """LaunchError, naming the axis, for a grid a CUDA launch cannot take (the driver says only "invalid argument"):
    axes 1 and 2 take at most 65535 programs, e.g. a (batch * heads) axis past it. Its work fits on axis 0."""
    for axis, (g, top) in enumerate(zip(grid, CUDA_GRID_LIMITS, strict=False)):
        if g > top:
            raise LaunchError(f"{name}: grid axis {axis} has {g} programs; a CUDA launch takes at most {top} on axis "
                              f"{axis} (grid {tuple(grid)}): put the largest count on axis 0, or loop over it in the "
                              "kernel")


class Artifact(Protocol):
    def launch(self, args: Sequence) -> None:
        """Run the compiled kernel on ``args`` (checked by the front end, once per launch signature)."""


class Backend:
    """Base of every backend: a name, typed options, a cache of artifacts per trace."""
    name: str = ""
    Options: type = type(None)

    def __init__(self):
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def cache(self, traced) -> dict:
        """This backend's artifacts of ``traced`` (key -> artifact), emptied when the trace is dropped."""
        d = self._cache.get(traced)
        if d is None:
            d = self._cache[traced] = {}
        return d

    def options(self, constants: dict[str, Any]) -> Any:
        """The backend's options for a trace with these constants (defaults where the kernel sets none)."""
        return self.Options()

    # what a tuner reads: kernel tunables times these (``tune.space.SearchSpace``)
    def search_domains(self) -> dict[str, tuple]:
        """The values a tuner tries for each option, unless a problem narrows them (``Options.SEARCH``)."""
        return dict(getattr(self.Options, "SEARCH", {}))

    def option_defaults(self) -> dict[str, Any]:
        """What the backend uses for an option left unset (``Options.DEFAULTS``): where a search starts."""
        return dict(getattr(self.Options, "DEFAULTS", {}))

    def check_options(self, values: dict[str, Any]) -> None:
        """Raise the backend's error for option values it cannot take (``Options`` checks its fields)."""
        self.Options(**values)

    # the protocol, each backend's own
    def lower(self, ir, print_after=(), **options):
        raise NotImplementedError

    def compile(self, traced, options) -> Artifact:
        raise NotImplementedError

    def prepare(self, traced, args: Sequence, options: dict[str, Any] | None = None):
        """The launcher of one launch signature; ``options`` are launch options given at launch (the backend
        ignores those of other backends), over those among the kernel's constants."""
        raise NotImplementedError

    def source(self, traced) -> str:
        raise NotImplementedError

    def run(self, traced, args: Sequence) -> None:
        """One launch, preparing it first (prefer ``prepare`` once and the launcher many times)."""
        self.prepare(traced, args)(args)
