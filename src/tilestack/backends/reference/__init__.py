"""The reference backend: NumPy, exact semantics, runs anywhere; the oracle every other backend is tested
against.

    traced.run(*tensors, backend="reference")
"""

import functools

from tilestack.backends.reference.executor import run, source
from tilestack.ir.passes import DCE, Pipeline

PIPELINE = Pipeline([DCE])


def lower(ir, print_after=()):
    """(lowered IR, stages): the reference runs the traced IR; dead code is all a pass could take from it."""
    return PIPELINE.run(ir, print_after=print_after)


def prepare(traced, args):
    """The launcher for ``traced``: the executor reads sizes from the arguments on every run."""
    return functools.partial(run, traced)


__all__ = ["lower", "prepare", "run", "source"]
