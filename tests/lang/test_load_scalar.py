"""ts.load_scalar: one element of a global read into a Scalar, what loop bounds and tile coordinates read from
memory are made of (cu_seqlens of a varlen batch, a paged KV cache's block table, a per-row scale, a flag). Each
kernel runs on the reference executor and under Triton's interpreter against float64 torch with its outputs
poisoned first; the cost analysis reads the same values; the kernels compile for sm_90a with Triton and Gluon;
misuse is refused at trace time by name."""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, launch, meta

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError


# ---- 1. a varlen batch: each program's rows come from cu_seqlens ------------------------------------------------
@ts.kernel(grid=lambda X, CU: (CU.shape[0] - 1,))
def varlen_mean(X, CU, OUT, *, BM: int = 16, D: int = 32):
    """OUT[b] = mean of X[CU[b]:CU[b+1]] (0 for an empty segment). X (T, D) packed tokens, CU (B+1,) int."""
    b = ts.block_id(0)
    start, end = ts.load_scalar(CU, b), ts.load_scalar(CU, b + 1)
    acc = ts.RegTile[ts.f32, BM, D]()
    ts.zero(acc)
    x = ts.RegTile[ts.f32, BM, D]()
    rows = ts.RegVec[ts.i64, BM]()
    keep = ts.RegVec[ts.bool_, BM]()
    for j in ts.range(start // BM, ts.cdiv(end, BM)):       # only the row tiles the segment touches
        ts.load(x, X, at=(j, 0))
        ts.arange(rows, j * BM)
        ts.ge(keep, rows, start)
        inside = ts.RegVec[ts.bool_, BM]()
        ts.lt(inside, rows, end)
        ts.logical_and(keep, keep, inside)
        ts.where(x, ts.per_row(keep), x, 0.0)
        ts.add(acc, acc, x)
    total = ts.RegVec[ts.f32, D]()
    ts.col_sum(total, acc)
    n = ts.smax(end - start, 1)
    ts.div(total, total, n * 1.0)
    ts.store(OUT, total, at=(b, 0))


def _varlen_case(lengths, dtype, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=dtype)
    x = torch.randn(int(cu[-1]), D, generator=g)
    want = torch.stack([x[int(a):int(b)].double().mean(0) if b > a else torch.zeros(D, dtype=torch.float64)
                        for a, b in zip(cu[:-1], cu[1:], strict=True)])
    return x, cu, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_varlen_mean_reads_its_bounds_from_memory(backend, cu_dtype):
    """Ragged segments (not multiples of the tile), an empty one, one of a single row, one spanning many tiles."""
    x, cu, want = _varlen_case([5, 0, 1, 40, 16, 3], cu_dtype)
    out = torch.full((6, 32), math.nan)
    launch(varlen_mean, backend, x, cu, out)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_the_cost_analysis_reads_the_same_bounds():
    """Bytes: each program reads the row tiles its segment touches (masked to X's rows) and two i32 bounds; the
    same kernel given shapes is refused by name (its loop bounds depend on CU's values)."""
    x, cu, _ = _varlen_case([5, 0, 1, 40, 16, 3], torch.int32)
    out = torch.empty(6, 32)
    t = varlen_mean.trace(x, cu, out)
    cost = t.cost(x, cu, out)
    tiles = sum(max(0, -(-int(e) // 16) - int(s) // 16) for s, e in zip(cu[:-1], cu[1:], strict=True))
    rows = sum(min(16, x.shape[0] - 16 * j) for s, e in zip(cu[:-1], cu[1:], strict=True)
               for j in range(int(s) // 16, -(-int(e) // 16)))
    assert tiles == 10      # cu = 0 5 5 6 46 62 65: 1 + 1 (the empty segment's tile) + 1 + 3 + 2 + 2
    assert cost.bytes_read == rows * 32 * 4 + 6 * 2 * 4
    assert cost.bytes_written == 6 * 32 * 4
    with pytest.raises(LaunchError, match=r"CU is read by ts.load_scalar.*pass its tensor, not the shape \(7,\)"):
        t.cost(x, (7,), out)


# ---- 2. a paged KV cache: a block table says where each page lives -------------------------------------------------
@ts.kernel(grid=lambda TABLE: (TABLE.shape[0], TABLE.shape[1]))
def gather_pages(CACHE, TABLE, OUT, *, P: int = 8, D: int = 16):
    """OUT[b, j*P:(j+1)*P] = CACHE[TABLE[b, j]]: CACHE (pages, P, D), TABLE (B, pages per sequence) int32,
    OUT (B, pages per sequence * P, D); a table entry of -1 (no page) reads zeros."""
    b, j = ts.block_id(0), ts.block_id(1)
    page = ts.load_scalar(TABLE, b, j)
    k = ts.RegTile[CACHE.dtype, P, D]()
    ts.load(k, CACHE, at=(page, 0, 0))
    ts.store(OUT, k, at=(b, j, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_pages_follows_the_block_table(backend, dtype):
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(11, 8, 16, generator=g).to(dtype)
    table = torch.tensor([[3, 0, 10, 7], [1, -1, 5, 5]], dtype=torch.int32)
    out = torch.full((2, 32, 16), math.nan).to(dtype)
    launch(gather_pages, backend, cache, table, out)
    want = torch.stack([torch.cat([cache[p] if p >= 0 else torch.zeros(8, 16, dtype=dtype) for p in row])
                        for row in table.tolist()])
    assert torch.equal(out, want)


# ---- 3. a float read from memory: a per-row scale, in f32 ---------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def scale_rows(X, SCALE, OUT, *, BM: int = 4, D: int = 16):
    """OUT[r] = X[r] * SCALE[r, 0] * 2, SCALE (R, 1) of any float dtype read one element at a time."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, D]()
    ts.load(x, X, at=(i, 0))
    for r in range(BM):               # unrolled: one scalar a row
        s = ts.load_scalar(SCALE, i * BM + r, 0)
        row = ts.RegTile[ts.f32, 1, D]()
        ts.load(row, X, at=(i * BM + r, 0))
        ts.mul(row, row, s * 2.0)
        ts.store(OUT, row, at=(i * BM + r, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_float_read_from_memory_is_its_f32_value(backend, dtype):
    """Rows past the tensor (9 rows, tiles of 4) read scale 0 and store nothing; 1e30 and -inf scales pass."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 16, generator=g)
    scale = torch.tensor([[1.5], [-2.0], [1e30], [0.1], [-math.inf], [3.0], [0.0], [7.0], [1e-3]]).to(dtype)
    out = torch.full((9, 16), math.nan)
    launch(scale_rows, backend, x, scale, out)
    s32 = scale.float().double()     # the element as an f32, then the f32 product
    want = (x.double() * (s32 * 2.0)).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0, equal_nan=True)


# ---- 4. a bool flag and a read past the end: 0 ---------------------------------------------------------------------
@ts.kernel(grid=lambda X: (X.shape[0] + 2,))
def copy_flagged(X, FLAGS, OUT, *, D: int = 16):
    """OUT[r] = X[r] where FLAGS[r], else left as it was; programs past FLAGS' end read a flag of 0 (no copy)."""
    r = ts.block_id(0)
    flag = ts.load_scalar(FLAGS, r)
    x = ts.RegTile[ts.f32, 1, D]()
    for _ in ts.range(0, flag):        # 0 or 1 trips
        ts.load(x, X, at=(r, 0))
        ts.store(OUT, x, at=(r, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8])
def test_a_flag_read_from_memory_and_reads_past_the_end(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=g)
    flags = torch.tensor([1, 0, 1, 1, 0]).to(dtype)
    out = torch.full((5, 16), -7.0)
    launch(copy_flagged, backend, x, flags, out)
    want = torch.where(flags.bool()[:, None], x, torch.full_like(x, -7.0))
    assert torch.equal(out, want)


# ---- 5. misuse, refused by name at trace time ---------------------------------------------------------------------
def test_misuse_is_refused_by_name():
    x = torch.empty(8, 16)

    @ts.kernel(grid=(1,))
    def from_a_tile(X):
        t = ts.RegTile[ts.f32, 8, 16]()
        ts.load_scalar(t, 0, 0)

    with pytest.raises(TraceError, match=r"load_scalar: src must be a global tensor argument, got the tile `t` "
                                         r"\(RegTile\[f32, 8, 16\]\)"):
        from_a_tile.trace(x)

    @ts.kernel(grid=(1,))
    def too_few(X):
        ts.load_scalar(X, 0)

    with pytest.raises(TraceError, match=r"load_scalar: 1 indices for `X` of rank 2; give one element index per axis"):
        too_few.trace(x)

    @ts.kernel(grid=(1,))
    def float_index(X, s: float):
        ts.load_scalar(X, s, 0)

    with pytest.raises(TraceError, match=r"load_scalar: index 0 into `X` must be an index, got a float scalar"):
        float_index.trace(x, 0.5)

    @ts.kernel(grid=lambda X: (ts.load_scalar(X, 0, 0),))
    def grid_from_memory(X):
        pass

    with pytest.raises(LaunchError, match=r"grid depends on load_scalar \(test_load_scalar.py:\d+\); it may use "
                                          r"only argument sizes, scalars and constants"):
        grid_from_memory(torch.zeros(2, 2, dtype=torch.int32), backend="reference")


# ---- 6. compiled for sm_90a on this CPU ----------------------------------------------------------------------------
def test_the_kernels_compile_for_sm90a_with_triton_and_gluon():
    from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
    cases = [(varlen_mean, (meta(1 << 20, 128), meta(4097, dtype=torch.int32), meta(4096, 128)),
              dict(BM=64, D=128)),
             (gather_pages, (meta(1 << 16, 16, 128, dtype=torch.bfloat16), meta(64, 512, dtype=torch.int32),
                             meta(64, 8192, 128, dtype=torch.bfloat16)), dict(P=16, D=128))]
    for kernel, args, consts in cases:
        check_triton_sm90a(kernel, args, consts)
        compile_gluon_sm90a(kernel, args, consts)
