"""The reference backend: NumPy, exact semantics, runs anywhere; the oracle every other backend is tested
against.

    traced.run(*tensors, backend="reference")
"""

import functools

from tilestack.backends.reference.executor import run, source


def prepare(traced, args):
    """The launcher for ``traced``: the executor reads sizes from the arguments on every run."""
    return functools.partial(run, traced)


__all__ = ["prepare", "run", "source"]
