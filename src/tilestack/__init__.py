"""tilestack: a tile language, a kernel library, and the tools to make AI workloads fast.

    import tilestack as ts
    ts.kernels.gemm(a, b)                 # a library kernel, on the best backend here
    print(ts.kernels.gemm.kernel.ir())    # what it became
"""

from tilestack import errors
from tilestack.config import knobs

__all__ = ["errors", "knobs"]
__version__ = "0.1.0"
