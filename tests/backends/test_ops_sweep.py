"""Every op of the tile language, on both backends, against NumPy in float64.

Each test runs a small kernel with the reference executor and with Triton (under its interpreter on a CPU),
writes into outputs poisoned with NaN, and compares with the same computation written here in NumPy on the
inputs as their dtype holds them. Tiles are powers of two, 16 or 32, as the Triton backend needs.
"""

import math

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.lang import ops as ts_ops

BACKENDS = ("reference", "triton")
TORCH = {ts.f64: torch.float64, ts.f32: torch.float32, ts.f16: torch.float16, ts.bf16: torch.bfloat16}
NUMPY = {ts.f64: np.float64, ts.f32: np.float32, ts.f16: np.float16}
FLOATS = (ts.f32, ts.bf16, ts.f16)
RTOL = {ts.f64: 1e-12, ts.f32: 1e-5, ts.bf16: 1e-2, ts.f16: 1e-3}
# Casts are exact (round to nearest even) but for bf16 under Triton's interpreter, which truncates: one ulp.
CAST_RTOL = {ts.f64: 0.0, ts.f32: 0.0, ts.f16: 0.0, ts.bf16: 2.0**-7}

UNARY = {
    "exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "abs": np.abs, "neg": np.negative,
    "relu": lambda x: np.maximum(x, 0.0), "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "sin": np.sin, "cos": np.cos,
}
POSITIVE_ONLY = {"log", "log2", "sqrt", "rsqrt"}
BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
          "max": np.maximum, "min": np.minimum}
REDUCE = {"max": np.max, "min": np.min, "sum": np.sum}
COMBINE = {"max": np.maximum, "min": np.minimum, "sum": np.add}
FILLS = {"zero": 0.0, "one": 1.0, "neg_infty": -math.inf, "pos_infty": math.inf}
MASKS = ("tril", "triu", "make_causal", "right_fill", "lower_fill")
MMAS = {"mma_AB": (False, False), "mma_ABt": (False, True), "mma_AtB": (True, False), "mma_AtBt": (True, True)}
MEMORY = ("copy", "load", "store")
SPACES = {"reg": (ts.RegTile, ts.RegVec), "shared": (ts.SharedTile, ts.SharedVec)}


# ---- helpers -----------------------------------------------------------------------------------------------
def rand(rng, shape, dtype, lo=-2.0, hi=2.0) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(lo, hi, shape)).to(TORCH[dtype])


def away_from_zero(rng, shape, dtype) -> torch.Tensor:
    """Values with |x| in [0.5, 2]: safe divisors."""
    mag = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return torch.from_numpy(mag).to(TORCH[dtype])


def poisoned(shape, dtype=ts.f32) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=TORCH[dtype])


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def as_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` rounded to what ``dtype`` holds, back in float64. NumPy rounds to f16 directly (torch goes
    through f32 and can round twice); bf16 has no NumPy dtype, so torch rounds to it, through f32."""
    x = np.asarray(x, dtype=np.float64)
    if dtype is ts.bf16:
        return f64(torch.from_numpy(x).to(torch.float32).to(torch.bfloat16))
    return x.astype(NUMPY[dtype]).astype(np.float64)


def check(out: torch.Tensor, want: np.ndarray, rtol: float, atol: float | None = None) -> None:
    got = f64(out)
    assert got.shape == want.shape
    stray = np.isnan(got) & ~np.isnan(want)
    assert not stray.any(), f"NaN where none is expected at {np.argwhere(stray)[:5].tolist()}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol if atol is None else atol)


def launch(kernel, backend, *args, **consts) -> None:
    """Trace and run on these CPU tensors: Triton under its interpreter, also where a GPU is present."""
    with config.override(triton_interpret=True):
        kernel.trace(*args, **consts).run(*args, backend=backend)


def test_the_sweep_covers_every_op():
    swept = (set(UNARY) | {"copy"} | set(BINARY) | {"fill", *FILLS}
             | {f"{fn}_{axis}" for fn in BROADCAST_FNS for axis in ("row", "col")}
             | {f"{axis}_{fn}" for fn in REDUCE for axis in ("row", "col")}
             | set(MASKS) | set(MMAS) | set(MEMORY))
    # comparisons, logic, where, arange, per_row/per_col and atomic_add: swept in test_masks_and_atomics.py
    swept |= {"lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "where", "arange",
              "per_row", "per_col", "atomic_add"}
    swept |= {"rand"}     # swept in tests/ir/test_rand.py (bit-exact against Triton's tl.rand)
    swept |= {"transpose"}     # swept in tests/lang/test_heldout_kernels.py (with copy(dst, src.T))
    swept |= {"rem", "bit_and", "bit_or", "bit_xor", "shl", "shr"}   # swept in tests/lang/test_heldout_round2.py
    swept |= {"load_scalar"}   # swept in tests/lang/test_load_scalar.py (every dtype kind, past the end, sm_90a)
    assert set(ts_ops.__all__) == swept


# ---- fills -------------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda Y, BN: (ts.cdiv(Y.shape[1], BN),))
def fill_k(Y, V, *, FN: str, VALUE: float, DT, BM: int, BN: int):
    j = ts.block_id(0)
    y = ts.RegTile[DT, BM, BN]()
    v = ts.RegVec[DT, BN]()
    if FN == "fill":
        ts.fill(y, VALUE)
        ts.fill(v, VALUE)
    else:
        getattr(ts, FN)(y)
        getattr(ts, FN)(v)
    ts.store(Y, y, at=(0, j))
    ts.store(V, v, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("fn", ["fill", *FILLS])
def test_fill(backend, dtype, fn):
    value = -3.25 if fn == "fill" else FILLS[fn]
    y, v = poisoned((16, 40), dtype), poisoned((40,), dtype)
    launch(fill_k, backend, y, v, FN=fn, VALUE=-3.25, DT=dtype, BM=16, BN=16)
    check(y, np.full((16, 40), value), 0.0)
    check(v, np.full((40,), value), 0.0)


# ---- element-wise unary ------------------------------------------------------------------------------------
def _grid2(X, BM, BN):
    return ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)


@ts.kernel(grid=_grid2)
def unary_k(X, Y, *, FN: str, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(i, j))
    getattr(ts, FN)(y, x)
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("fn", sorted(UNARY))
def test_unary(backend, dtype, fn, rng):
    lo, hi = (0.25, 4.0) if fn in POSITIVE_ONLY else (-3.0, 3.0)
    x = rand(rng, (40, 24), dtype, lo, hi)
    y = poisoned((40, 24), dtype)
    launch(unary_k, backend, x, y, FN=fn, BM=32, BN=16)
    check(y, UNARY[fn](f64(x)), RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("src", "dst"), [(ts.f32, ts.bf16), (ts.bf16, ts.f32), (ts.f16, ts.f32)], ids=str)
def test_unary_into_another_dtype(backend, src, dst, rng):
    x = rand(rng, (16, 32), src, -3.0, 3.0)
    y = poisoned((16, 32), dst)
    launch(unary_k, backend, x, y, FN="exp", BM=16, BN=32)
    check(y, np.exp(f64(x)), max(RTOL[src], RTOL[dst]))


# ---- element-wise binary -----------------------------------------------------------------------------------
SCALAR_B = 1.75


@ts.kernel(grid=_grid2)
def binary_k(X, Y, Z, s: float, *, FN: str, B: str, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    z = ts.RegTile[Z.dtype, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(y, Y, at=(i, j))
    b = {"tile": y, "constant": SCALAR_B, "runtime": s}[B]
    getattr(ts, FN)(z, x, b)
    ts.store(Z, z, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("b", ["tile", "constant", "runtime"])
@pytest.mark.parametrize("fn", sorted(BINARY))
def test_binary(backend, dtype, b, fn, rng):
    x = rand(rng, (24, 40), dtype)
    y = away_from_zero(rng, (24, 40), dtype)
    z = poisoned((24, 40), dtype)
    s = -0.625
    launch(binary_k, backend, x, y, z, s, FN=fn, B=b, BM=16, BN=32)
    operand = {"tile": f64(y), "constant": SCALAR_B, "runtime": s}[b]
    check(z, BINARY[fn](f64(x), operand), RTOL[dtype])


@ts.kernel(grid=lambda X: (1,))
def sugar_k(X, Y, W, OUT, MM, *, N: int):
    x = ts.RegTile[X.dtype, N, N]()
    y = ts.RegTile[X.dtype, N, N]()
    w = ts.SharedTile[W.dtype, N, N]()
    ts.load(x, X, at=(0, 0))
    ts.load(y, Y, at=(0, 0))
    ts.load(w, W, at=(0, 0))
    t = (x + y) * 0.5 - y / 3.0
    u = 2.0 - t
    v = 1.0 / y + (-x) + (1.0 + x) * (3.0 * y)
    ts.store(OUT, u + v, at=(0, 0))
    ts.store(MM, w @ w.T + w @ w, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_sugar(backend, rng):
    x, y = rand(rng, (16, 16), ts.f32), away_from_zero(rng, (16, 16), ts.f32)
    w = rand(rng, (16, 16), ts.bf16)
    out, mm = poisoned((16, 16)), poisoned((16, 16))
    launch(sugar_k, backend, x, y, w, out, mm, N=16)
    x, y, w = f64(x), f64(y), f64(w)
    t = (x + y) * 0.5 - y / 3.0
    check(out, (2.0 - t) + (1.0 / y - x + (1.0 + x) * (3.0 * y)), RTOL[ts.f32])
    check(mm, w @ w.T + w @ w, RTOL[ts.f32])


# ---- copies and casts (dtype and memory space) -------------------------------------------------------------
@ts.kernel(grid=_grid2)
def copy_k(X, Y, *, SRC: str, DST: str, SRC_DT, DST_DT, VIA_LOAD: bool, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    src = SPACES[SRC][0][SRC_DT, BM, BN]()
    dst = SPACES[DST][0][DST_DT, BM, BN]()
    ts.load(src, X, at=(i, j))
    if VIA_LOAD:
        ts.load(dst, src)
    else:
        ts.copy(dst, src)
    ts.store(Y, dst, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("src_space", "dst_space"), [("reg", "reg"), ("reg", "shared"), ("shared", "reg"),
                                                      ("shared", "shared")])
@pytest.mark.parametrize("src_dt", [ts.f32, ts.bf16, ts.f16, ts.f64], ids=str)
@pytest.mark.parametrize("dst_dt", [ts.f32, ts.bf16, ts.f16, ts.f64], ids=str)
def test_copy_between_dtypes_and_spaces(backend, src_space, dst_space, src_dt, dst_dt, rng):
    x = rand(rng, (40, 24), ts.f64, -300.0, 300.0)
    y = poisoned((40, 24), ts.f64)
    launch(copy_k, backend, x, y, SRC=src_space, DST=dst_space, SRC_DT=src_dt, DST_DT=dst_dt,
           VIA_LOAD=False, BM=16, BN=16)
    check(y, as_dtype(as_dtype(f64(x), src_dt), dst_dt), max(CAST_RTOL[src_dt], CAST_RTOL[dst_dt]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [ts.f32, ts.bf16], ids=str)
def test_load_shared_into_registers(backend, dtype, rng):
    x = rand(rng, (40, 24), dtype)
    y = poisoned((40, 24), ts.f32)
    launch(copy_k, backend, x, y, SRC="shared", DST="reg", SRC_DT=dtype, DST_DT=ts.f32, VIA_LOAD=True,
           BM=32, BN=16)
    check(y, f64(x), 0.0)


# ---- row / column broadcasts -------------------------------------------------------------------------------
BROADCAST_FNS = ("add", "sub", "mul", "div", "max", "min")


@ts.kernel(grid=_grid2)
def broadcast_k(X, V, Y, *, FN: str, AXIS: str, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    v = ts.RegVec[V.dtype, BM if AXIS == "row" else BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(v, V, at=(i,) if AXIS == "row" else (j,))
    getattr(ts, f"{FN}_{AXIS}")(y, x, v)
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("fn", BROADCAST_FNS)
def test_broadcast(backend, dtype, axis, fn, rng):
    x = rand(rng, (40, 24), dtype)
    v = away_from_zero(rng, (40 if axis == "row" else 24,), dtype)
    y = poisoned((40, 24), dtype)
    launch(broadcast_k, backend, x, v, y, FN=fn, AXIS=axis, BM=16, BN=16)
    vec = f64(v)[:, None] if axis == "row" else f64(v)[None, :]
    check(y, BINARY[fn](f64(x), vec), RTOL[dtype])


# ---- reductions --------------------------------------------------------------------------------------------
def _reduce_grid(X, AXIS, BM, BN):
    return (ts.cdiv(X.shape[0], BM),) if AXIS == "row" else (ts.cdiv(X.shape[1], BN),)


@ts.kernel(grid=_reduce_grid)
def reduce_k(X, A, Y, *, FN: str, AXIS: str, ACC: bool, BM: int, BN: int):
    b = ts.block_id(0)
    at = (b, 0) if AXIS == "row" else (0, b)
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegVec[Y.dtype, BM if AXIS == "row" else BN]()
    ts.load(x, X, at=at)
    reduce = getattr(ts, f"{AXIS}_{FN}")
    if ACC:
        acc = ts.RegVec[A.dtype, BM if AXIS == "row" else BN]()
        ts.load(acc, A, at=(b,))
        reduce(y, x, acc)
    else:
        reduce(y, x)
    ts.store(Y, y, at=(b,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [ts.f32, ts.bf16], ids=str)
@pytest.mark.parametrize("acc", [False, True], ids=["no_acc", "acc"])
@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("fn", sorted(REDUCE))
def test_reduce(backend, dtype, acc, axis, fn, rng):
    shape = (40, 32) if axis == "row" else (16, 40)   # ragged along the kept axis, one tile along the other
    n = shape[0] if axis == "row" else shape[1]
    x = rand(rng, shape, dtype)
    a = rand(rng, (n,), ts.f32)
    y = poisoned((n,), ts.f32)
    launch(reduce_k, backend, x, a, y, FN=fn, AXIS=axis, ACC=acc, BM=16, BN=32)
    want = REDUCE[fn](f64(x), axis=1 if axis == "row" else 0)
    if acc:
        want = COMBINE[fn](want, f64(a))
    check(y, want, RTOL[ts.f32], atol=1e-5 * np.abs(f64(x)).sum())


# ---- masks -------------------------------------------------------------------------------------------------
MASK_VALUE = -5.5


@ts.kernel(grid=lambda X: (1,))
def mask_k(X, Y, k: int, *, KIND: str, K: int | None, DEFAULT: bool, BM: int, BN: int):
    x = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(0, 0))
    diag = k if K is None else K
    if DEFAULT:
        getattr(ts, KIND)(y, x, diag)
    else:
        getattr(ts, KIND)(y, x, diag, MASK_VALUE)
    ts.store(Y, y, at=(0, 0))


def _mask_numpy(kind, x, k, value):
    rows, cols = np.indices(x.shape)
    keep = {"tril": cols - rows <= k, "triu": cols - rows >= k, "make_causal": cols - rows <= k,
            "right_fill": cols < k, "lower_fill": rows < k}[kind]
    return np.where(keep, x, value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [-40, -17, -1, 0, 1, 7, 15, 16, 31, 40])
@pytest.mark.parametrize("kind", MASKS)
def test_mask(backend, k, kind, rng):
    x = rand(rng, (16, 32), ts.f32)
    y = poisoned((16, 32))
    launch(mask_k, backend, x, y, 0, KIND=kind, K=k, DEFAULT=False, BM=16, BN=32)
    check(y, _mask_numpy(kind, f64(x), k, MASK_VALUE), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [-3, 0, 9])
@pytest.mark.parametrize(("kind", "default"), [("tril", 0.0), ("triu", 0.0), ("make_causal", -math.inf)])
def test_mask_default_value_and_runtime_k(backend, k, kind, default, rng):
    x = rand(rng, (32, 16), ts.bf16)
    y = poisoned((32, 16), ts.bf16)
    launch(mask_k, backend, x, y, k, KIND=kind, K=None, DEFAULT=True, BM=32, BN=16)
    check(y, _mask_numpy(kind, f64(x), k, default), 0.0)


# ---- matrix products ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda A: (1,))
def mma_k(A, B, C, D, *, FN: str, SPACE: str, M: int, N: int, K: int):
    trans_a, trans_b = MMAS[FN]
    tile = SPACES[SPACE][0]
    a = tile[A.dtype, *((K, M) if trans_a else (M, K))]()
    b = tile[B.dtype, *((N, K) if trans_b else (K, N))]()
    acc = ts.RegTile[ts.f32, M, N]()
    d = ts.RegTile[ts.f32, M, N]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.load(acc, C, at=(0, 0))
    getattr(ts, FN)(d, a, b, acc)
    ts.store(D, d, at=(0, 0))


def check_product(out, want, scale, rtol=RTOL[ts.f32]):
    """|out - want| <= rtol * scale elementwise, ``scale`` the sum of the magnitudes of the terms."""
    got = f64(out)
    assert not np.isnan(got).any()
    err = np.abs(got - want)
    assert (err <= rtol * scale + 1e-30).all(), f"max error {err.max()} (scale {scale.max()})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("fn", sorted(MMAS))
@pytest.mark.parametrize(("m", "n", "k"), [(16, 32, 16), (32, 16, 32)])
def test_mma(backend, space, dtype, fn, m, n, k, rng):
    trans_a, trans_b = MMAS[fn]
    a = rand(rng, (k, m) if trans_a else (m, k), dtype)
    b = rand(rng, (n, k) if trans_b else (k, n), dtype)
    c = rand(rng, (m, n), ts.f32)
    d = poisoned((m, n))
    launch(mma_k, backend, a, b, c, d, FN=fn, SPACE=space, M=m, N=n, K=k)
    a64 = f64(a).T if trans_a else f64(a)
    b64 = f64(b).T if trans_b else f64(b)
    check_product(d, f64(c) + a64 @ b64, np.abs(f64(c)) + np.abs(a64) @ np.abs(b64))


@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_k(A, B, C, *, BT: bool, STAGES: int | None, BM: int, BN: int, BK: int):
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, *((BN, BK) if BT else (BK, BN))]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK), stages=STAGES):
        ts.load(a, A, at=(i, k))
        if BT:
            ts.load(b, B, at=(j, k))
            ts.mma_ABt(acc, a, b, acc)
        else:
            ts.load(b, B, at=(k, j))
            ts.mma_AB(acc, a, b, acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("m", "n", "k", "bt", "stages"), [(40, 24, 50, False, None), (16, 48, 33, True, 2),
                                                           (64, 32, 64, False, 3)])
def test_gemm_ragged(backend, dtype, m, n, k, bt, stages, rng):
    a = rand(rng, (m, k), dtype)
    b = rand(rng, (n, k) if bt else (k, n), dtype)
    c = poisoned((m, n), dtype)
    launch(gemm_k, backend, a, b, c, BT=bt, STAGES=stages, BM=32, BN=16, BK=16)
    b64 = f64(b).T if bt else f64(b)
    want, scale = f64(a) @ b64, np.abs(f64(a)) @ np.abs(b64)
    check_product(c, as_dtype(want, dtype), scale + np.abs(want), RTOL[dtype])


# ---- loads and stores --------------------------------------------------------------------------------------
@ts.kernel(grid=_grid2)
def move_k(X, Y, *, SPACE: str, DT, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    t = SPACES[SPACE][0][DT, BM, BN]()
    ts.load(t, X, at=(i, j))
    ts.store(Y, t, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize(("x_dt", "tile_dt", "y_dt"), [(ts.f32, ts.f32, ts.f32), (ts.bf16, ts.f32, ts.f16),
                                                       (ts.f32, ts.bf16, ts.f32), (ts.f16, ts.f16, ts.bf16)], ids=str)
@pytest.mark.parametrize("shape", [(40, 24), (17, 33), (1, 5), (64, 16)])
def test_load_store_ragged_2d(backend, space, x_dt, tile_dt, y_dt, shape, rng):
    x = rand(rng, shape, x_dt)
    y = poisoned(shape, y_dt)
    launch(move_k, backend, x, y, SPACE=space, DT=tile_dt, BM=16, BN=32)
    check(y, as_dtype(as_dtype(f64(x), tile_dt), y_dt), max(CAST_RTOL[tile_dt], CAST_RTOL[y_dt]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_edges_past_the_tensor(backend, rng):
    """A transposed input, and an output that is a window of a bigger buffer: the store writes only the
    window, and tiles hanging past it are dropped; a padded output shows that loads past the edge read 0."""
    base = rand(rng, (24, 40), ts.f32)
    x = base.t()                                  # (40, 24), strides (1, 40)
    big = poisoned((48, 64))
    y = big[4:44, 8:32]                           # (40, 24), strides (64, 1), inside a NaN sea
    launch(move_k, backend, x, y, SPACE="reg", DT=ts.f32, BM=32, BN=16)
    check(y, f64(x), 0.0)
    outside = f64(big).copy()
    outside[4:44, 8:32] = 0.0
    assert np.isnan(outside).sum() == 48 * 64 - 40 * 24

    padded = poisoned((64, 32))                   # whole tiles of (32, 16): the load reads zeros past x
    launch(move_k, backend, x, padded, SPACE="shared", DT=ts.f32, BM=32, BN=16)
    want = np.zeros((64, 32))
    want[:40, :24] = f64(x)
    check(padded, want, 0.0)


@ts.kernel(grid=_grid2)
def shifted_k(X, Y, *, BM: int, BN: int):
    i, j = ts.block_id(0), ts.block_id(1)
    t = ts.RegTile[X.dtype, BM, BN]()
    ts.load(t, X, at=(i - 1, j - 1))
    ts.store(Y, t, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_before_the_start_read_zero(backend, rng):
    x = rand(rng, (32, 48), ts.f32)
    y = poisoned((32, 48))
    launch(shifted_k, backend, x, y, BM=16, BN=16)
    want = np.zeros((32, 48))
    want[16:, 16:] = f64(x)[:16, :32]
    check(y, want, 0.0)


def _grid4(X, BN, BD):
    return ts.cdiv(X.shape[2], BN), ts.cdiv(X.shape[3], BD), X.shape[0] * X.shape[1]


@ts.kernel(grid=_grid4)
def move4_k(X, Y, *, BN: int, BD: int):
    i, j, bh = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    b, h = bh // X.shape[1], bh % X.shape[1]
    t = ts.RegTile[X.dtype, BN, BD]()
    ts.load(t, X, at=(b, h, i, j))
    ts.store(Y, t, at=(b, h, i, j))
    junk = ts.RegTile[Y.dtype, BN, BD]()
    ts.fill(junk, 7.0)
    ts.store(Y, junk, at=(b + X.shape[0], h, i, j))   # past the leading axis: dropped
    ts.store(Y, junk, at=(b, h - X.shape[1], i, j))   # before it: dropped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 40, 24), (1, 2, 16, 17), (3, 1, 5, 32)])
def test_load_store_4d_with_leading_coordinates(backend, shape, rng):
    x = rand(rng, shape, ts.bf16)
    y = poisoned(shape, ts.bf16)
    launch(move4_k, backend, x, y, BN=16, BD=16)
    check(y, f64(x), 0.0)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[2], BN), X.shape[0], X.shape[1]))
def vec3_k(X, Y, *, SPACE: str, BN: int):
    i, b, h = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    v = SPACES[SPACE][1][X.dtype, BN]()
    w = ts.RegVec[ts.f32, BN]()
    ts.load(v, X, at=(b, h, i))
    ts.copy(w, v)
    ts.store(Y, w, at=(b, h, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("shape", [(2, 3, 40), (1, 1, 7), (2, 1, 32)])
def test_vectors_load_and_store(backend, space, shape, rng):
    x = rand(rng, shape, ts.f16)
    y = poisoned(shape)
    launch(vec3_k, backend, x, y, SPACE=space, BN=16)
    check(y, f64(x), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_input_layout_is_readable(backend, rng):
    """A stride-0 (expanded) input overlaps only in what it reads, which is fine."""
    row = rand(rng, (1, 24), ts.f32)
    x = row.expand(40, 24)
    y = poisoned((40, 24))
    launch(move_k, backend, x, y, SPACE="reg", DT=ts.f32, BM=16, BN=16)
    check(y, np.broadcast_to(f64(row), (40, 24)), 0.0)


# ---- loops -------------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_blocks_sum_k(X, Y, M, lo: int, hi: int, *, BM: int, BN: int):
    """Y[i-block] = sum over column blocks lo..hi-1 of X; M = running row max over those blocks."""
    i = ts.block_id(0)
    acc = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    x = ts.RegTile[X.dtype, BM, BN]()
    ts.zero(acc)
    ts.neg_infty(m)
    for k in ts.range(lo, hi):
        ts.load(x, X, at=(i, k))
        ts.add(acc, acc, x)
        ts.row_max(m, x, m)
    ts.store(Y, acc, at=(i, 0))
    ts.store(M, m, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("lo", "hi"), [(0, 3), (1, 2), (0, 0), (2, 1)])
def test_loop_carries_tiles(backend, lo, hi, rng):
    x = rand(rng, (40, 48), ts.f32)
    y, m = poisoned((40, 16)), poisoned((40,))
    launch(row_blocks_sum_k, backend, x, y, m, lo, hi, BM=32, BN=16)
    blocks = [f64(x)[:, 16 * k:16 * k + 16] for k in range(lo, hi)]
    check(y, sum(blocks, np.zeros((40, 16))), RTOL[ts.f32])
    want_m = np.max(np.stack(blocks), axis=(0, 2)) if blocks else np.full(40, -math.inf)
    check(m, want_m, 0.0)


@ts.kernel(grid=lambda X: (1,))
def nested_k(X, Y, C, n_outer: int, n_inner: int, *, BM: int, BN: int):
    acc = ts.RegTile[ts.f32, BM, BN]()
    count = ts.RegTile[ts.f32, BM, BN]()
    scale = ts.RegTile[ts.f32, BM, BN]()
    x = ts.RegTile[X.dtype, BM, BN]()
    ts.zero(acc)
    ts.zero(count)
    ts.fill(scale, 0.5)
    for a in ts.range(n_outer):
        ts.add(count, count, 1.0)
        for b in ts.range(n_inner):
            ts.load(x, X, at=(a, b))
            ts.mul(x, x, scale)
            ts.add(acc, acc, x)
    ts.store(Y, acc, at=(0, 0))
    ts.store(C, count, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n_outer", "n_inner"), [(2, 3), (3, 1), (0, 2), (2, 0)])
def test_nested_loops(backend, n_outer, n_inner, rng):
    x = rand(rng, (48, 48), ts.f32)
    y, c = poisoned((16, 16)), poisoned((16, 16))
    launch(nested_k, backend, x, y, c, n_outer, n_inner, BM=16, BN=16)
    want = np.zeros((16, 16))
    for a in range(n_outer):
        for b in range(n_inner):
            want += 0.5 * f64(x)[16 * a:16 * a + 16, 16 * b:16 * b + 16]
    check(y, want, RTOL[ts.f32])
    check(c, np.full((16, 16), float(n_outer)), 0.0)


@ts.kernel(grid=lambda X, B: (ts.cdiv(X.shape[0], B),))
def causal_row_sum_k(X, Y, *, B: int):
    """Y[r] = sum of X[r, c] for c <= r: the loop's trip count depends on the block id."""
    i = ts.block_id(0)
    s = ts.RegTile[ts.f32, B, B]()
    total = ts.RegVec[ts.f32, B]()
    ts.zero(total)
    for j in ts.range(i + 1):
        ts.load(s, X, at=(i, j))
        ts.make_causal(s, s, i * B - j * B, 0.0)
        ts.right_fill(s, s, X.shape[1] - j * B, 0.0)
        ts.row_sum(total, s, total)
    ts.store(Y, total, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [48, 37])
def test_causal_loop_depends_on_block_id(backend, n, rng):
    x = rand(rng, (n, n), ts.f32)
    y = poisoned((n,))
    launch(causal_row_sum_k, backend, x, y, B=16)
    check(y, np.tril(f64(x)).sum(axis=1), RTOL[ts.f32])


# ---- block ids, grid sizes and index arithmetic ------------------------------------------------------------
@ts.kernel(grid=lambda AXES, G: G[:AXES])
def ids_k(Y, *, AXES: int, G: tuple, B: int):
    ids = [ts.block_id(a) if a < AXES else 0 for a in range(3)]
    nbs = [ts.num_blocks(a) if a < AXES else 1 for a in range(3)]
    t = ts.RegTile[ts.f32, B, B]()
    ts.zero(t)
    code = ids[0] + 10 * ids[1] + 100 * ids[2] + 1000 * (nbs[0] + 10 * nbs[1] + 100 * nbs[2])
    ts.add(t, t, code)
    ts.store(Y, t, at=(ids[2], ids[1], ids[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("axes", "grid"), [(1, (3, 1, 1)), (2, (2, 3, 1)), (3, (2, 1, 3))])
def test_block_id_and_num_blocks(backend, axes, grid):
    g0, g1, g2 = grid
    y = poisoned((g2, g1 * 16, g0 * 16))
    launch(ids_k, backend, y, AXES=axes, G=grid, B=16)
    want = np.empty((g2, g1 * 16, g0 * 16))
    for i, j, k in np.ndindex(g0, g1, g2):
        want[k, 16 * j:16 * j + 16, 16 * i:16 * i + 16] = i + 10 * j + 100 * k + 1000 * (g0 + 10 * g1 + 100 * g2)
    check(y, want, 0.0)


SCALAR_FNS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
              "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b, "cdiv": lambda a, b: -(-a // b),
              "smin": min, "smax": max}


@ts.kernel(grid=lambda Y, B: (ts.cdiv(Y.shape[0], B),))
def index_math_k(Y, n: int, s: float, *, FN: str, B: int):
    i = ts.block_id(0)
    lhs, rhs = i * 7 + n, 3
    value = {"add": lambda: lhs + rhs, "sub": lambda: lhs - rhs, "mul": lambda: lhs * rhs,
             "floordiv": lambda: lhs // rhs, "mod": lambda: lhs % rhs, "cdiv": lambda: ts.cdiv(lhs, rhs),
             "smin": lambda: ts.smin(lhs, 9), "smax": lambda: ts.smax(lhs, 9)}[FN]()
    t = ts.RegVec[ts.f32, B]()
    ts.zero(t)
    ts.add(t, t, value)
    ts.add(t, t, s * 2.0 + s / 4.0)
    ts.store(Y, t, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", sorted(SCALAR_FNS))
def test_index_arithmetic(backend, fn):
    n, s = 2, 0.5
    y = poisoned((64,))
    launch(index_math_k, backend, y, n, s, FN=fn, B=16)
    rhs = 9 if fn in ("smin", "smax") else 3
    want = np.repeat([SCALAR_FNS[fn](7 * i + n, rhs) + s * 2.0 + s / 4.0 for i in range(4)], 16)
    check(y, want, 0.0)
