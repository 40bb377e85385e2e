"""The Triton backend: emits a readable ``@triton.jit`` function from the IR and launches it, on a GPU, or on
the CPU under Triton's interpreter.

    print(traced.source())                       # the generated Triton source
    traced.run(*tensors, backend="triton")
"""

from tilestack.backends.triton.codegen import lower as _lower
from tilestack.backends.triton.codegen import source
from tilestack.backends.triton.launch import prepare, run


def lower(ir, print_after=(), tma: bool = True):
    """(lowered IR, stages) of the Triton pipeline (``backends/triton/passes.py``), with TMA as on a Hopper GPU."""
    return _lower(ir, tma=tma, print_after=print_after)


__all__ = ["lower", "prepare", "run", "source"]
