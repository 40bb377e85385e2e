"""The tile language. Import it as ``import tilestack.lang as ts`` (also re-exported from ``tilestack``).

    @ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
    def gemm(A, B, C, *, BM: int = ts.tunable(64, (32, 64, 128)), BN: int = ts.tunable(64, (32, 64, 128)),
             BK: int = ts.tunable(32, (16, 32, 64))):
        i, j = ts.block_id(0), ts.block_id(1)
        acc = ts.RegTile[ts.f32, BM, BN]()
        a = ts.SharedTile[A.dtype, BM, BK]()
        b = ts.SharedTile[B.dtype, BK, BN]()
        ts.zero(acc)
        for k in ts.range(ts.cdiv(A.shape[1], BK)):
            ts.load(a, A, at=(i, k))
            ts.load(b, B, at=(k, j))
            ts.mma_AB(acc, a, b, acc)
        ts.store(C, acc, at=(i, j))
"""

from tilestack.ir.types import bf16, bool_, f8e4m3, f16, f32, f64, i8, i32, i64, u8
from tilestack.lang.control import block_id, cdiv, num_blocks, range, smax, smin
from tilestack.lang.explicit import (
                                     SharedStages,
                                     Stages,
                                     async_load,
                                     mma_AB_async,
                                     mma_ABt_async,
                                     mma_wait,
                                     partition,
                                     wait_load,
)
from tilestack.lang.kernel import ArgSpec, Global, Kernel, TracedKernel, Tunable, kernel, tunable
from tilestack.lang.ops import *  # noqa: F403 - the op vocabulary, listed in ops.__all__
from tilestack.lang.ops import __all__ as _ops_all
from tilestack.lang.tiles import GlobalTensor, RegTile, RegVec, Scalar, SharedTile, SharedVec, Tile

__all__ = [
    "bf16", "bool_", "f8e4m3", "f16", "f32", "f64", "i8", "i32", "i64", "u8",
    "block_id", "cdiv", "num_blocks", "range", "smax", "smin",
    "ArgSpec", "Global", "Kernel", "TracedKernel", "Tunable", "kernel", "tunable",
    "SharedStages", "Stages", "async_load", "wait_load", "mma_AB_async", "mma_ABt_async", "mma_wait", "partition",
    "GlobalTensor", "RegTile", "RegVec", "Scalar", "SharedTile", "SharedVec", "Tile",
    *_ops_all,
]
