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
                                     pass_turn,
                                     turn,
                                     wait_load,
                                     wait_turn,
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
    "turn", "wait_turn", "pass_turn",
    "GlobalTensor", "RegTile", "RegVec", "Scalar", "SharedTile", "SharedVec", "Tile",
    *_ops_all,
]

# What a Triton user reaches for first, and this language's word for it (tilestack.lang has no such attribute).
_TRITON_NAMES = {
    "program_id": "ts.block_id(axis)", "num_programs": "ts.num_blocks(axis)",
    "dot": "ts.mma_AB(acc, a, b, acc) (or a @ b)", "sum": "ts.row_sum / ts.col_sum (dst first)",
    "maximum": "ts.max(dst, a, b)", "minimum": "ts.min(dst, a, b)",
    "zeros": "t = ts.RegTile[dtype, M, N](); ts.zero(t)",
    "full": "ts.fill(t, value)", "constexpr": "a keyword-only constant of the kernel (def k(X, *, BM: int = 64))",
    "static_range": "Python's range (unrolled when traced)", "trans": "ts.transpose(dst, src) (or copy(dst, t.T))",
    "cast": "ts.copy(dst, src) into a tile of the dtype",
    "jit": "@ts.kernel(grid=...)", "float32": "ts.f32", "float16": "ts.f16", "bfloat16": "ts.bf16",
    "int32": "ts.i32", "int64": "ts.i64", "int8": "ts.i8", "uint8": "ts.u8", "float64": "ts.f64",
}


def __getattr__(name: str):
    hint = _TRITON_NAMES.get(name)
    if hint is None:
        raise AttributeError(f"module 'tilestack.lang' has no attribute {name!r}")
    raise AttributeError(f"tilestack.lang has no {name!r} (Triton's spelling); here it is {hint}")
