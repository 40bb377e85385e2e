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


# Ops other tile languages and torch have that this one composes from its own: how to write each.
_COMPOSED = {
    "tanh": "2 sigmoid(2x) - 1: ts.mul(t, x, 2.0); ts.sigmoid(t, t); ts.mul(t, t, 2.0); ts.sub(t, t, 1.0)",
    "trunc": "ts.copy into an integer tile (floats convert truncating toward zero)",
    "floor": "the truncation (ts.copy into an integer tile and back), minus 1 where it is above x (ts.gt, ts.where)",
    "ceil": "the truncation (ts.copy into an integer tile and back), plus 1 where it is below x (ts.lt, ts.where)",
    "clamp": "ts.max(t, x, lo); ts.min(t, t, hi)",
    "argmax": "ts.row_max(m, x); ts.eq(hit, x, ts.per_row(m)); ts.where(idx, hit, ts.per_col(cols), big) with cols "
              "from ts.arange; ts.row_min(first, idx) (the first index attaining it)",
    "argmin": "ts.row_min(m, x); ts.eq(hit, x, ts.per_row(m)); ts.where(idx, hit, ts.per_col(cols), big) with cols "
              "from ts.arange; ts.row_min(first, idx) (the first index attaining it)",
    "cumsum": "a product with a 0/1 triangle, ts.mma_AB(acc, x, U, acc) with U = ts.triu of a ts.one tile, each "
              "tile's total carried to the next (ts.row_sum into a vector the loop carries)",
    "softmax": "ts.row_max(m, s); ts.sub(s, s, ts.per_row(m)); ts.exp(s, s); ts.row_sum(l, s); "
               "ts.div(s, s, ts.per_row(l))",
    "pow": "t ** e for a constant e, else ts.log2(t, x); ts.mul(t, t, e); ts.exp2(t, t)",
    "fma": "ts.mul then ts.add (or ts.mma_AB for products summed over an axis)",
    "isnan": "ts.ne(mask, x, x) (NaN is the one value not equal to itself)",
    "log1p": "ts.add(t, x, 1.0); ts.log(t, t)", "expm1": "ts.exp(t, x); ts.sub(t, t, 1.0)",
    "atomic_max": "only ts.atomic_add reaches global memory atomically: reduce inside the program (ts.row_max, "
                  "ts.col_max) and store, or write per-program partials and reduce them in a second launch",
    "reshape": "a tile keeps its shape: pass a reshaped view of the tensor as the argument",
    "broadcast_to": "a vector broadcasts as ts.per_row(v) / ts.per_col(v) where an op takes a tile; to materialize "
                    "it, ts.zero(t); ts.add(t, t, ts.per_row(v))",
    "zeros_like": "t = ts.RegTile[x.dtype, *x.shape](); ts.zero(t)",
    "int16": "tiles hold f64, f32, f16, bf16, f8e4m3, i64, i32, i8, u8 and bool_ (ts.i32, ...)",
}


def __getattr__(name: str):
    hint = _TRITON_NAMES.get(name)
    if hint is not None:
        raise AttributeError(f"tilestack.lang has no {name!r} (Triton's spelling); here it is {hint}")
    recipe = _COMPOSED.get(name)
    if recipe is not None:
        raise AttributeError(f"tilestack.lang has no {name!r} op; write it with the ops it has: {recipe}")
    raise AttributeError(f"module 'tilestack.lang' has no attribute {name!r}")
