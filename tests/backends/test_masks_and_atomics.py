"""Comparisons, masks from index vectors, where, arange, stepped loops and atomic adds, on both backends.

Each op against NumPy in float64; then two kernels written the way a new user would: a document-masked
sliding-window attention forward (online softmax that guards fully masked rows with where) and a column sum
split over row blocks with atomic_add, both against float64 torch.
"""

import math

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.errors import TraceError

BACKENDS = ("reference", "triton")
COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
           "ne": np.not_equal}
R, C = 16, 32


def launch(kernel, backend, *args, **consts) -> None:
    with config.override(triton_interpret=True):
        kernel(*args, backend=backend, **consts)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# ---- comparisons -----------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda: (1,))
def compare_k(A, B, U, V, Out, s: float, *, FN: str, FORM: str):
    a = ts.RegTile[ts.f32, R, C]()
    b = ts.RegTile[ts.f32, R, C]()
    u = ts.RegVec[ts.f32, R]()
    v = ts.RegVec[ts.f32, C]()
    m = ts.RegTile[ts.bool_, R, C]()
    out = ts.RegTile[ts.f32, R, C]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.load(u, U, at=(0,))
    ts.load(v, V, at=(0,))
    fn = getattr(ts, FN)
    if FORM == "tiles":
        fn(m, a, b)
    elif FORM == "scalar":
        fn(m, a, s)
    else:                                  # a row vector against a column vector: an (R, C) mask
        fn(m, ts.per_row(u), ts.per_col(v))
    ts.where(out, m, 1.0, 0.0)
    ts.store(Out, out, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["tiles", "scalar", "outer"])
@pytest.mark.parametrize("fn", COMPARE)
def test_compare(backend, fn, form, rng):
    # small integers, so that equal values occur and eq/ne/le/ge are tested at equality
    a, b = (torch.from_numpy(rng.integers(-2, 3, (R, C)).astype(np.float32)) for _ in range(2))
    u, v = torch.from_numpy(rng.integers(-2, 3, R).astype(np.float32)), torch.arange(-16.0, 16.0)
    out = torch.full((R, C), math.nan)
    launch(compare_k, backend, a, b, u, v, out, 1.0, FN=fn, FORM=form)
    op = COMPARE[fn]
    want = {"tiles": op(f64(a), f64(b)), "scalar": op(f64(a), 1.0),
            "outer": op(f64(u)[:, None], f64(v)[None, :])}[form]
    np.testing.assert_array_equal(f64(out), want.astype(np.float64))


@ts.kernel(grid=lambda: (1,))
def logic_k(A, B, Out, *, FN: str):
    a = ts.RegTile[ts.f32, R, C]()
    b = ts.RegTile[ts.f32, R, C]()
    ma = ts.RegTile[ts.bool_, R, C]()
    mb = ts.RegTile[ts.bool_, R, C]()
    out = ts.RegTile[ts.bf16, R, C]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.gt(ma, a, 0.0)
    ts.gt(mb, b, 0.0)
    if FN == "not":
        ts.logical_not(ma, ma)
    else:
        getattr(ts, f"logical_{FN}")(ma, ma, mb)
    ts.where(out, ma, a, b)                # values, not just 0/1: where keeps a's and b's own numbers
    ts.store(Out, out, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["and", "or", "not"])
def test_logic_and_where(backend, fn, rng):
    a, b = (torch.from_numpy(rng.uniform(-2, 2, (R, C))).to(torch.bfloat16) for _ in range(2))
    out = torch.full((R, C), math.nan, dtype=torch.bfloat16)
    launch(logic_k, backend, a, b, out, FN=fn)
    pa, pb = f64(a) > 0, f64(b) > 0
    keep = {"and": pa & pb, "or": pa | pb, "not": ~pa}[fn]
    np.testing.assert_array_equal(f64(out), np.where(keep, f64(a), f64(b)))


@ts.kernel(grid=lambda Y, BN: (ts.cdiv(Y.shape[1], BN),))
def arange_k(Y, Yi, *, BN: int = 16):
    """Y[r, c] = r for columns c < 20, else -c: a where by per_row and per_col of arange vectors."""
    j = ts.block_id(0)
    rows = ts.RegVec[ts.f32, 8]()
    cols = ts.RegVec[ts.i32, BN]()
    neg = ts.RegVec[ts.f32, BN]()
    left = ts.RegVec[ts.bool_, BN]()
    y = ts.RegTile[ts.f32, 8, BN]()
    ts.arange(rows)
    ts.arange(cols, j * BN)                # this block's column indices
    ts.arange(neg, -(j * BN))
    ts.lt(left, cols, 20)
    ts.where(y, ts.per_col(left), ts.per_row(rows), ts.per_col(neg))
    ts.store(Y, y, at=(0, j))
    ts.store(Yi, cols, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_arange_and_broadcast_where(backend):
    n = 40                                          # ragged: the last block hangs past the edge
    y, yi = torch.full((8, n), math.nan), torch.full((n,), -7, dtype=torch.int32)
    launch(arange_k, backend, y, yi)
    r, c = np.arange(8)[:, None], np.arange(n)[None, :]
    col0 = (c // 16) * 16                           # arange(neg, -(j * BN)) counts up from -j*BN
    np.testing.assert_array_equal(f64(y), np.where(c < 20, r, -col0 + (c - col0)).astype(np.float64))
    np.testing.assert_array_equal(yi.numpy(), np.arange(n))


# ---- loops with a step ------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, P: (P,))
def strided_sum(X, Out, P: int, *, HOW: str, B: int = 16):
    """Program p sums the column tiles of X that ``HOW`` visits, into row p of Out (as one vector)."""
    p = ts.block_id(0)
    x = ts.RegTile[ts.f32, 1, B]()
    acc = ts.RegTile[ts.f32, 1, B]()
    ts.zero(acc)
    n = ts.cdiv(X.shape[1], B)
    it = {"grid-stride": lambda: ts.range(p, n, ts.num_blocks(0)),    # a runtime step
          "by-3": lambda: ts.range(p, n, 3),
          "down": lambda: ts.range(n - 1 - p, -1, -2)}[HOW]()         # a negative step counts down
    for j in it:
        ts.load(x, X, at=(0, j))
        ts.add(acc, acc, x)
    ts.store(Out, acc, at=(p, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["grid-stride", "by-3", "down"])
def test_range_with_a_step(backend, how, rng):
    x = torch.from_numpy(rng.uniform(-1, 1, (1, 16 * 7 + 5)).astype(np.float32))   # 8 tiles, the last ragged
    programs = 3
    out = torch.full((programs, 16), math.nan)
    launch(strided_sum, backend, x, out, programs, HOW=how)
    tiles = np.zeros((8, 16))
    tiles.reshape(-1)[: x.shape[1]] = f64(x)[0]
    n = 8
    visits = {"grid-stride": lambda p: range(p, n, programs), "by-3": lambda p: range(p, n, 3),
              "down": lambda p: range(n - 1 - p, -1, -2)}[how]
    want = np.stack([tiles[list(visits(p))].sum(axis=0) for p in range(programs)])
    np.testing.assert_allclose(f64(out), want, rtol=1e-6, atol=1e-6)


def test_a_zero_step_is_refused():
    @ts.kernel(grid=lambda: (1,))
    def k(X):
        for _ in ts.range(0, 4, 0):
            pass

    with pytest.raises(TraceError, match="range: step must not be zero"):
        k.trace(ts.ArgSpec(ts.f32, 1))


# ---- atomic adds: a column sum over row blocks -------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def column_sum(X, S, *, BM: int = 16, BN: int = 16):
    """S += the column sums of X; each program adds its (BM, BN) block's share."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(i, j))
    ts.col_sum(s, x)
    ts.atomic_add(S, s, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "out_dtype"), [((70, 37), torch.float32), ((16, 16), torch.float32),
                                                  ((33, 50), torch.float64)])
def test_column_sum_by_atomic_add(backend, shape, out_dtype, rng):
    x = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
    start = torch.from_numpy(rng.uniform(-1, 1, shape[1])).to(out_dtype)
    s = start.clone()
    launch(column_sum, backend, x, s)
    want = f64(start) + f64(x).sum(axis=0)
    np.testing.assert_allclose(f64(s), want, rtol=1e-5, atol=1e-5)


def test_atomic_add_cost_reads_and_writes_each_element():
    traced = column_sum.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 1))
    cost = traced.cost((70, 37), (37,))
    programs = 5 * 3
    assert cost.programs == programs
    # loads touch X once; each of the 5 row blocks adds into all 37 columns: read and written
    assert cost.bytes_read == 4 * (70 * 37 + 5 * 37)
    assert cost.bytes_written == 4 * 5 * 37
    assert cost.dram_bytes_written == 4 * 37
    # col_sum: one per element of each (16, 16) tile; atomic adds: one per element added
    assert cost.flops == programs * 16 * 16 + 5 * 37


# ---- held out: document-masked sliding-window attention forward --------------------------------------------------
LOG2E = math.log2(math.e)


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[0], BM),))
def window_attention(Q, K, V, Doc, O, scale: float, window: int, *, BM: int = 16, BN: int = 16, D: int = 16):
    """O = softmax(scale * Q K^T) V over keys k with doc[k] == doc[q] and q - window < k <= q; a row with no
    such key (it cannot happen for q < N, but padded rows have none) is 0."""
    i = ts.block_id(0)
    n = K.shape[0]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.RegTile[K.dtype, BN, D]()
    v = ts.RegTile[V.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[V.dtype, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    m_safe = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()  # noqa: E741 - the softmax denominator's usual name
    qpos = ts.RegVec[ts.i32, BM]()
    lo = ts.RegVec[ts.i32, BM]()
    kpos = ts.RegVec[ts.i32, BN]()
    qdoc = ts.RegVec[ts.i32, BM]()
    kdoc = ts.RegVec[ts.i32, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    cond = ts.RegTile[ts.bool_, BM, BN]()
    empty = ts.RegVec[ts.bool_, BM]()
    ts.load(q, Q, at=(i, 0))
    ts.load(qdoc, Doc, at=(i,))
    ts.arange(qpos, i * BM)
    ts.arange(lo, i * BM - window + 1)        # the first key each query row may see
    ts.neg_infty(m)
    ts.zero(l)
    ts.zero(acc)
    first = ts.smax(i * BM - window + 1, 0) // BN
    for j in ts.range(first, ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(n, BN))):
        ts.load(k, K, at=(j, 0))
        ts.load(v, V, at=(j, 0))
        ts.load(kdoc, Doc, at=(j,))
        ts.arange(kpos, j * BN)
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale * LOG2E)
        ts.le(keep, ts.per_col(kpos), ts.per_row(qpos))          # causal
        ts.ge(cond, ts.per_col(kpos), ts.per_row(lo))            # inside the window
        ts.logical_and(keep, keep, cond)
        ts.eq(cond, ts.per_row(qdoc), ts.per_col(kdoc))          # same document
        ts.logical_and(keep, keep, cond)
        ts.lt(cond, ts.per_col(kpos), n)                         # a real key, not padding
        ts.logical_and(keep, keep, cond)
        ts.where(s, keep, s, -math.inf)
        ts.row_max(m_new, s, m)
        # a row with every key masked so far has m_new = -inf: subtract 0 instead (no -inf - -inf = NaN)
        ts.eq(empty, m_new, -math.inf)
        ts.where(m_safe, empty, 0.0, m_new)
        ts.sub(alpha, m, m_safe)
        ts.exp2(alpha, alpha)
        ts.sub_row(s, s, m_safe)
        ts.exp2(s, s)
        ts.mul(l, l, alpha)
        ts.row_sum(l, s, l)
        ts.mul_row(acc, acc, alpha)
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, m_new)
    ts.gt(empty, l, 0.0)
    ts.where(l, empty, l, 1.0)                # rows that saw no key: 0 / 1, not 0 / 0
    ts.div_row(acc, acc, l)
    o = ts.RegTile[O.dtype, BM, D]()
    ts.copy(o, acc)
    ts.store(O, o, at=(i, 0))


def window_reference(q, k, v, doc, scale, window):
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    n = q.shape[0]
    pos = torch.arange(n)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window) & (doc[:, None] == doc[None, :])
    s = (q @ k.T * scale).masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "window", "dtype"), [(45, 7, torch.float32), (37, 20, torch.bfloat16),
                                                    (16, 1, torch.float16)])
def test_document_masked_sliding_window_attention(backend, n, window, dtype, rng):
    q, k, v = (torch.from_numpy(rng.normal(0, 1, (n, 16))).to(dtype) for _ in range(3))
    q[0] = -40.0                                  # strongly negative scores: nothing may overflow or NaN
    doc = torch.from_numpy(np.sort(rng.integers(0, 3, n)).astype(np.int32))
    o = torch.full((n, 16), math.nan, dtype=dtype)
    scale = 1 / math.sqrt(16)
    launch(window_attention, backend, q, k, v, doc, o, scale, window)
    want = window_reference(q, k, v, doc, scale, window).numpy()
    got = f64(o)
    assert not np.isnan(got).any()
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
