"""The Triton backend: emits a readable ``@triton.jit`` function from the IR and launches it, on a GPU, or on
the CPU under Triton's interpreter.

    print(traced.source())                       # the generated Triton source
    traced.run(*tensors, backend="triton")
"""

from tilestack.backends.triton.codegen import source
from tilestack.backends.triton.launch import prepare, run

__all__ = ["prepare", "run", "source"]
