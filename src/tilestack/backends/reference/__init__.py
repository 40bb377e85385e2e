"""The reference backend: NumPy, exact semantics, runs anywhere; the oracle every other backend is tested
against.

    traced.run(*tensors, backend="reference")
"""

from __future__ import annotations

import dataclasses
import functools

from tilestack.backends.base import Backend
from tilestack.backends.reference.executor import run as _run
from tilestack.backends.reference.executor import source as _source
from tilestack.errors import LaunchError
from tilestack.ir.passes import DCE, Pipeline


@dataclasses.dataclass(frozen=True)
class ReferenceOptions:
    """The reference executor has no options: it runs the IR as it means."""


@dataclasses.dataclass(frozen=True)
class ReferenceArtifact:
    traced: object

    def launch(self, args) -> None:
        _run(self.traced, args)


class ReferenceBackend(Backend):
    name = "reference"
    Options = ReferenceOptions
    PIPELINE = Pipeline([DCE])

    def lower(self, ir, print_after=()):
        """(lowered IR, stages): the reference runs the traced IR; dead code is all a pass could take from it."""
        return self.PIPELINE.run(ir, print_after=print_after)

    def compile(self, traced, options=None) -> ReferenceArtifact:
        return ReferenceArtifact(traced)

    def prepare(self, traced, args, options=None):
        """The launcher for ``traced``: the executor reads sizes from the arguments on every run. It reads values
        from any device, but a meta tensor holds none: refused, naming the argument."""
        for p, a in zip(traced.ir.params, args, strict=True):
            if getattr(a, "is_meta", False):
                raise LaunchError(f"reference backend: {traced.name}'s argument {p.name} is a meta tensor, which "
                                  "holds no values to run on (meta tensors are for tracing and compiling: "
                                  "kernel.trace(...), tune.aot)")
        return functools.partial(_run, traced)

    def source(self, traced) -> str:
        return _source(traced)

    def run(self, traced, args) -> None:
        _run(traced, args)


BACKEND = ReferenceBackend()
lower, prepare, run, source = BACKEND.lower, BACKEND.prepare, BACKEND.run, BACKEND.source

__all__ = ["BACKEND", "ReferenceBackend", "lower", "prepare", "run", "source"]
