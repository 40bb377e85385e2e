"""The reference backend: NumPy, exact semantics, runs anywhere; the oracle every other backend is tested
against.

    traced.run(*tensors, backend="reference")
"""

from tilestack.backends.reference.executor import run, source

__all__ = ["run", "source"]
