"""ts.store(..., mask=m) and ts.atomic_add(..., mask=m): a program that owns an unaligned slice of a tensor writes its
own elements and leaves its neighbours' exactly as they were. Each kernel runs on the reference executor and under
Triton's interpreter against float64 torch, its output poisoned (NaN) or filled with a sentinel before the launch:
the slices' elements must be right and every element outside all slices must keep the sentinel bit for bit. The
cost analysis counts what a masked store may write; the generated Triton and Gluon store through pointers with the
mask (never the copy engine); the kernels compile for sm_90a; a mask of the wrong shape, dtype or kind is refused
by name at the user's line."""

import math
import pathlib
import re

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, launch, meta

import tilestack.lang as ts
from tilestack.errors import MemorySpaceError, TileDTypeError, TileShapeError, TraceError

HERE = pathlib.Path(__file__).name
SENTINEL = -777.25      # exactly representable in every float dtype used here


def _rows_mask(mask, keep, rows, inside, j, BM, start, end):
    """``mask`` (BM, W) = rows j*BM .. j*BM+BM-1 that lie in [start, end), each row all true or all false."""
    ts.arange(rows, j * BM)
    ts.ge(keep, rows, start)
    ts.lt(inside, rows, end)
    ts.logical_and(keep, keep, inside)
    ts.fill(mask, 1)
    ts.logical_and(mask, mask, ts.per_row(keep))


# ---- 1. softmax over ragged segments: one program per segment, bounds read from memory -----------------------------
@ts.kernel(grid=lambda X, SEG: (SEG.shape[0],))
def segment_softmax(X, SEG, OUT, *, BM: int = 16, H: int = 8):
    """OUT[s:e, h] = softmax(X[s:e, h]) over the rows of segment b = (SEG[b, 0], SEG[b, 1]) for each of H heads
    (a graph attention's softmax over each node's incoming edges). Segments start anywhere, may be empty, may leave
    gaps: rows outside every segment are not this kernel's to write."""
    b = ts.block_id(0)
    start, end = ts.load_scalar(SEG, b, 0), ts.load_scalar(SEG, b, 1)
    x = ts.RegTile[ts.f32, BM, H]()
    rows = ts.RegVec[ts.i32, BM]()
    keep = ts.RegVec[ts.bool_, BM]()
    inside = ts.RegVec[ts.bool_, BM]()
    mask = ts.RegTile[ts.bool_, BM, H]()
    m = ts.RegVec[ts.f32, H]()
    s = ts.RegVec[ts.f32, H]()
    ts.neg_infty(m)
    ts.zero(s)
    for j in ts.range(start // BM, ts.cdiv(end, BM)):          # the max of each head over the segment's rows
        ts.load(x, X, at=(j, 0))
        _rows_mask(mask, keep, rows, inside, j, BM, start, end)
        ts.where(x, mask, x, -math.inf)
        ts.col_max(m, x, m)
    for j in ts.range(start // BM, ts.cdiv(end, BM)):          # the sum of exp(x - max)
        ts.load(x, X, at=(j, 0))
        _rows_mask(mask, keep, rows, inside, j, BM, start, end)
        ts.sub_col(x, x, m)
        ts.exp(x, x)
        ts.where(x, mask, x, 0.0)
        ts.col_sum(s, x, s)
    for j in ts.range(start // BM, ts.cdiv(end, BM)):          # each row tile written where the segment is
        ts.load(x, X, at=(j, 0))
        _rows_mask(mask, keep, rows, inside, j, BM, start, end)
        ts.sub_col(x, x, m)
        ts.exp(x, x)
        ts.div_col(x, x, s)
        ts.store(OUT, x, at=(j, 0), mask=mask)


# segments (start, end): unaligned to the 16-row tiles, adjacent ones (5..21 | 21..22), gaps (0..5, 22..30, 75..77,
# 90..), an empty one at 40 (inside a tile: its loop makes one trip with no row of its own), one of a single row, one
# spanning four tiles, listed out of order (programs and rows are not in step)
SEGMENTS = [(21, 22), (5, 21), (30, 40), (40, 40), (41, 75), (77, 90)]
T, H = 96, 8


def _segment_case(seg_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * 3
    seg = torch.tensor(SEGMENTS, dtype=seg_dtype)
    owned = torch.zeros(T, dtype=torch.bool)
    want = torch.full((T, H), math.nan, dtype=torch.float64)
    for s, e in SEGMENTS:
        owned[s:e] = True
        if e > s:
            want[s:e] = torch.softmax(x[s:e].double(), dim=0)
    return x, seg, owned, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seg_dtype", [torch.int32, torch.int64])
def test_segment_softmax_writes_its_segments_and_nothing_else(backend, seg_dtype):
    x, seg, owned, want = _segment_case(seg_dtype)
    assert owned.sum() == 74 and not owned[:5].any() and not owned[90:].any()
    # poisoned with NaN: every owned element is written (no NaN left), every other one is still NaN
    out = torch.full((T, H), math.nan)
    launch(segment_softmax, backend, x, seg, out)
    torch.testing.assert_close(out[owned].double(), want[owned], rtol=1e-5, atol=1e-7)
    assert torch.isnan(out[~owned]).all()
    # a finite sentinel: the neighbours' elements keep it exactly
    out = torch.full((T, H), SENTINEL)
    launch(segment_softmax, backend, x, seg, out)
    torch.testing.assert_close(out[owned].double(), want[owned], rtol=1e-5, atol=1e-7)
    assert torch.equal(out[~owned], torch.full_like(out[~owned], SENTINEL))
    # each head's column of each segment sums to 1
    for s, e in SEGMENTS:
        if e > s:
            torch.testing.assert_close(out[s:e].double().sum(0), torch.ones(H, dtype=torch.float64), rtol=1e-5,
                                       atol=0)


def test_segment_softmax_backends_agree_bit_for_bit_outside_and_closely_inside():
    """The reference is the oracle: Triton's interpreter writes the same set of elements."""
    x, seg, owned, _ = _segment_case(torch.int32, seed=1)
    ref, tri = torch.full((T, H), SENTINEL), torch.full((T, H), SENTINEL)
    launch(segment_softmax, "reference", x, seg, ref)
    launch(segment_softmax, "triton", x, seg, tri)
    assert torch.equal(ref == SENTINEL, tri == SENTINEL)
    assert torch.equal((ref == SENTINEL), ~owned[:, None].expand(T, H))
    torch.testing.assert_close(tri, ref, rtol=2e-6, atol=1e-7)


# ---- 2. varlen rows: each sequence of a packed batch centred and gated, rows [start, end) only ---------------------
@ts.kernel(grid=lambda CU: (CU.shape[0] - 1,))
def varlen_center(X, CU, W, OUT, *, BM: int = 16, D: int = 32):
    """OUT[r] = (X[r] - mean(X[CU[b]:CU[b+1]])) * W[b] for the rows r of sequence b; X (T, D) packed, W (B, D)."""
    b = ts.block_id(0)
    start, end = ts.load_scalar(CU, b), ts.load_scalar(CU, b + 1)
    x = ts.RegTile[ts.f32, BM, D]()
    acc = ts.RegTile[ts.f32, BM, D]()
    rows = ts.RegVec[ts.i64, BM]()
    keep = ts.RegVec[ts.bool_, BM]()
    inside = ts.RegVec[ts.bool_, BM]()
    mask = ts.RegTile[ts.bool_, BM, D]()
    ts.zero(acc)
    for j in ts.range(start // BM, ts.cdiv(end, BM)):
        ts.load(x, X, at=(j, 0))
        _rows_mask(mask, keep, rows, inside, j, BM, start, end)
        ts.where(x, mask, x, 0.0)
        ts.add(acc, acc, x)
    mean = ts.RegVec[ts.f32, D]()
    ts.col_sum(mean, acc)
    ts.div(mean, mean, ts.smax(end - start, 1) * 1.0)
    w = ts.RegTile[ts.f32, 1, D]()
    ts.load(w, W, at=(b, 0))
    wv = ts.RegVec[ts.f32, D]()
    ts.col_sum(wv, w)
    y = ts.RegTile[OUT.dtype, BM, D]()
    for j in ts.range(start // BM, ts.cdiv(end, BM)):
        ts.load(x, X, at=(j, 0))
        _rows_mask(mask, keep, rows, inside, j, BM, start, end)
        ts.sub_col(x, x, mean)
        ts.mul_col(x, x, wv)
        ts.copy(y, x)
        ts.store(OUT, y, at=(j, 0), mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_varlen_rows_write_only_their_sequence(backend, out_dtype):
    """cu_seqlens 3, 20, 20, 21, 57, 60 of 64 packed rows (rows 0..2 and 60..63 are padding no sequence owns)."""
    rng = np.random.default_rng(2)
    cu = torch.tensor([3, 20, 20, 21, 57, 60], dtype=torch.int32)
    x = torch.from_numpy(rng.standard_normal((64, 32))).float()
    w = torch.from_numpy(rng.uniform(0.5, 2.0, (5, 32))).float()
    out = torch.full((64, 32), SENTINEL, dtype=out_dtype)
    launch(varlen_center, backend, x, cu, w, out)
    want = torch.full((64, 32), SENTINEL, dtype=torch.float64)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if e > s:
            xs = x[s:e].double()
            want[s:e] = (xs - xs.mean(0)) * w[b].double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[out_dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert torch.equal(out[:3], torch.full((3, 32), SENTINEL, dtype=out_dtype))
    assert torch.equal(out[60:], torch.full((4, 32), SENTINEL, dtype=out_dtype))


# ---- 3. a mask of all false writes nothing; a masked atomic add adds only where the mask holds ----------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM), 2))
def masked_writes(X, OUT, ACC, *, BM: int = 16, BN: int = 32, NONE: bool = False):
    """Program (i, p): OUT tile i = X tile i where X > 0 (nowhere if NONE); ACC tile i += (p + 1) * X where
    (1 - 2p) * X > 0 (p = 0 adds the positives once, p = 1 the negatives twice; nothing if NONE)."""
    i, p = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(x, X, at=(i, 0))
    if NONE:
        ts.fill(m, 0)
    else:
        ts.gt(m, x, 0.0)
    ts.store(OUT, x, at=(i, 0), mask=m)
    ts.mul(y, x, (1 - 2 * p) * 1.0)
    if not NONE:
        ts.gt(m, y, 0.0)
    ts.mul(y, x, (p + 1) * 1.0)
    ts.atomic_add(ACC, y, at=(i, 0), mask=m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("none", [False, True], ids=["by_sign", "all_false"])
def test_a_mask_selects_what_is_written_and_all_false_writes_nothing(backend, none):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=g)          # 40 rows: the last tile hangs 8 rows past the edge
    x[0, :4] = 0.0                                # zeros: not > 0 either way, never written
    out, acc = torch.full((40, 32), math.nan), torch.full((40, 32), SENTINEL)
    launch(masked_writes, backend, x, out, acc, NONE=none)
    if none:
        assert torch.isnan(out).all()
        assert torch.equal(acc, torch.full((40, 32), SENTINEL))
        return
    pos, neg = x > 0, x < 0
    assert torch.equal(out[pos], x[pos]) and torch.isnan(out[~pos]).all()
    want = torch.full((40, 32), SENTINEL, dtype=torch.float64)
    want[pos] += x[pos].double()
    want[neg] += 2 * x[neg].double()
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=1e-4)     # one f32 add per element
    assert torch.equal(acc[~(pos | neg)], torch.full_like(acc[~(pos | neg)], SENTINEL))


# ---- 4. a 1-D vector store with a mask (and the edge) --------------------------------------------------------------
@ts.kernel(grid=lambda X, B: (ts.cdiv(X.shape[0], B),))
def relu_where_flagged(X, FLAGS, OUT, *, B: int = 32):
    """OUT[k] = relu(X[k]) where FLAGS[k] != 0 (an i8 flag vector); other elements untouched."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, B]()
    f = ts.RegVec[ts.i32, B]()
    m = ts.RegVec[ts.bool_, B]()
    ts.load(x, X, at=(i,))
    ts.load(f, FLAGS, at=(i,))
    ts.ne(m, f, 0)
    ts.relu(x, x)
    ts.store(OUT, x, at=(i,), mask=m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_a_vector_store_writes_the_flagged_elements(backend, out_dtype):
    rng = np.random.default_rng(4)
    n = 77                                          # 3 vectors of 32, the last hanging 19 past the edge
    x = torch.from_numpy(rng.standard_normal(n)).float()
    flags = torch.from_numpy(rng.integers(0, 3, n)).to(torch.int8)
    out = torch.full((n,), SENTINEL, dtype=out_dtype)
    launch(relu_where_flagged, backend, x, flags, out)
    want = torch.where(flags != 0, torch.relu(x).double(), torch.full((n,), SENTINEL, dtype=torch.float64))
    assert torch.equal(out.double(), want)


# ---- 5. what the cost analysis counts --------------------------------------------------------------------------------
def test_a_masked_store_counts_the_elements_inside_the_global_an_upper_bound():
    """The mask is data the analysis does not evaluate: a masked store counts what an unmasked one would (every
    element of its tiles inside the global), the most it may write; exact for a mask of all true."""
    x, seg, _, _ = _segment_case(torch.int32)
    out = torch.empty(T, H)
    cost = segment_softmax.trace(x, seg, out).cost(x, seg, out)
    tiles = sum(-(-e // 16) - s // 16 for s, e in SEGMENTS)
    assert tiles == 1 + 2 + 2 + 1 + 3 + 2        # the empty segment at 40 makes one trip over tile 2
    assert cost.bytes_written == tiles * 16 * H * 4
    assert cost.bytes_read == 3 * tiles * 16 * H * 4 + len(SEGMENTS) * 2 * 4
    xv, flags = torch.empty(77), torch.empty(77, dtype=torch.int8)
    cv = relu_where_flagged.trace(xv, flags, xv).cost(xv, flags, xv)
    assert cv.bytes_written == 77 * 4                # the edge still masks: 3 vectors, 77 elements inside
    xm = torch.empty(40, 32)
    cm = masked_writes.trace(xm, xm, xm, NONE=True).cost(xm, xm, xm)
    assert cm.bytes_written == 2 * (40 * 32 * 4) + 2 * (40 * 32 * 4)    # the store (two programs a tile) + the adds
    assert cm.bytes_read == 2 * 40 * 32 * 4 + 2 * 40 * 32 * 4           # X, and the adds' reads of ACC


# ---- 6. the generated source -----------------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def store_both(X, OUT, OUT2):
    """A 2-D tile stored twice: masked into OUT (pointers), unmasked into OUT2 (the copy engine when allowed)."""
    x = ts.RegTile[ts.f32, 64, 64]()
    m = ts.RegTile[ts.bool_, 64, 64]()
    ts.load(x, X, at=(0, 0))
    ts.gt(m, x, 0.0)
    ts.store(OUT, x, at=(0, 0), mask=m)
    ts.store(OUT2, x, at=(0, 0))


def test_the_ir_and_source_show_the_mask_and_a_masked_store_skips_the_copy_engine():
    x = torch.empty(64, 64)
    t = store_both.trace(x, x, x)
    ir = str(t.ir)
    assert "store(%OUT" in ir and ", mask=%m" in ir
    tri = t.source(backend="triton")
    stores = [ln.strip() for ln in tri.splitlines() if ".store(" in ln]
    assert len(stores) == 2, stores
    assert stores[0].startswith("tl.store(OUT + "), stores
    assert re.search(r", mask=\(.*< OUT_d1\) & m_\d+\)$", stores[0]), stores[0]   # the edge mask AND the user's
    assert stores[1].startswith("OUT2_desc")                                    # the unmasked one: TMA
    glu = t.source(backend="gluon")
    gstores = [ln.strip() for ln in glu.splitlines() if "gl.store(" in ln or "async_copy_shared_to_global" in ln]
    assert len(gstores) == 2, gstores
    assert gstores[0].startswith("gl.store(OUT + ") and "OUT_d1) & " in gstores[0]
    assert "async_copy_shared_to_global(OUT2_desc" in gstores[1]
    assert "OUT_desc" not in glu and "OUT_desc" not in tri                     # no descriptor for the masked one


def test_the_reference_run_of_store_both_matches_its_source():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 64, generator=g)
    for backend in BACKENDS:
        out, out2 = torch.full((64, 64), SENTINEL), torch.full((64, 64), SENTINEL)
        launch(store_both, backend, x, out, out2)
        assert torch.equal(out, torch.where(x > 0, x, torch.full_like(x, SENTINEL)))
        assert torch.equal(out2, x)


# ---- 7. misuse, refused by name at the user's line -------------------------------------------------------------------
def _kernel_with_mask(make_mask, op="store"):
    @ts.kernel(grid=(1,))
    def k(X, OUT):
        x = ts.RegTile[ts.f32, 16, 32]()
        ts.load(x, X, at=(0, 0))
        mask = make_mask(x)
        (ts.store if op == "store" else ts.atomic_add)(OUT, x, at=(0, 0), mask=mask)
    return k


def _bool(shape):
    def make(x):
        m = ts.RegTile[ts.bool_, shape[0], shape[1]]() if len(shape) == 2 else ts.RegVec[ts.bool_, shape[0]]()
        ts.fill(m, 1)
        return m
    return make


def _f32_mask(x):
    m = ts.RegTile[ts.f32, 16, 32]()
    ts.zero(m)
    return m


def _shared_mask(x):
    return ts.SharedTile[ts.bool_, 16, 32]()


def _row_vector_mask(x):
    v = ts.RegVec[ts.bool_, 16]()
    ts.fill(v, 1)
    return ts.per_row(v)


@pytest.mark.parametrize(("make", "error", "message"), [
    (_bool((16, 16)), TileShapeError, r"store: mask `mask` is \(16, 16\) but src `x` is \(16, 32\); expected a mask of "
                                      r"src's shape"),
    (_bool((32,)), TileShapeError, r"store: mask `mask` is \(32,\) but src `x` is \(16, 32\)"),
    (_f32_mask, TileDTypeError, r"store: mask `mask` is f32; expected a bool_ mask"),
    (lambda x: True, TraceError, r"store: mask must be a bool_ register tile of src `x`'s shape \(16, 32\) .*got "
                                 r"bool True"),
    (lambda x: ts.RegTile[ts.bool_, 16, 32], TraceError, r"store: mask must be a bool_ register tile .*got TileSpec "
                                                         r".*\(a tile type: declare the tile by calling it"),
    (_row_vector_mask, TileShapeError, r"store: mask is per_row\(`.*`\); expected a mask of src `x`'s shape "
                                       r"\(16, 32\): broadcast it first"),
], ids=["shape", "vector_for_tile", "f32", "python_bool", "tile_type", "per_row"])
def test_a_bad_mask_is_refused_by_name_at_the_users_line(make, error, message):
    x = torch.empty(16, 32)
    with pytest.raises(error, match=message) as info:
        _kernel_with_mask(make).trace(x, x)
    assert info.value.where is not None and info.value.where.startswith(f"{HERE}:"), info.value.where


def test_a_shared_mask_and_a_bad_atomic_add_mask_are_refused():
    x = torch.empty(16, 32)
    with pytest.raises(MemorySpaceError, match=r"store: mask `.*` is a SharedTile\[bool, 16, 32\]; store works on "
                                               r"register tiles"):
        _kernel_with_mask(_shared_mask).trace(x, x)
    with pytest.raises(TileDTypeError, match=r"atomic_add: mask `mask` is f32; expected a bool_ mask") as info:
        _kernel_with_mask(_f32_mask, op="atomic_add").trace(x, x)
    assert info.value.where.startswith(f"{HERE}:")


def test_the_verifier_refuses_a_store_whose_mask_is_no_bool_tile_of_its_shape():
    """The IR rule (what passes may rely on), for IR not made by the tracer."""
    from tilestack.ir.ops import Op, mask_of
    from tilestack.ir.passes import clone
    from tilestack.ir.verify import verify
    x = torch.empty(64, 64)
    # a copy to break: store_both's trace is cached (per dtypes and ranks: the sm_90a compile below, of meta
    # tensors, gets the same object) and shared by every later test in the process. Editing it in place here is
    # what made that compile see the masked store as (OUT, x, i, j, x, x) in CI (2026-12-06, under xdist, when
    # both tests ran in one worker)
    shared = store_both.trace(x, x, x).ir
    ir = clone(shared)
    store = next(i for i in ir.walk() if i.op is Op.STORE and mask_of(i) is not None)
    kept = next(i for i in shared.walk() if i.op is Op.STORE and mask_of(i) is not None).srcs
    tile = store.srcs[1]
    store.srcs = (*store.srcs[:-1], tile)                # the f32 tile where the mask belongs
    with pytest.raises(TraceError, match=r"store: the mask is a RegTile\[f32, 64, 64\]; expected a bool_ register "
                                         r"mask of the stored tile's shape \(\(64, 64\)\)") as info:
        verify(ir)
    assert info.value.where.startswith(f"{HERE}:")
    store.srcs = (*store.srcs, tile)                     # one operand too many
    with pytest.raises(TraceError, match=r"store: takes \(global, tile, 2 coordinates\[, mask\]\), got 6 operands"):
        verify(ir)
    assert next(i for i in shared.walk() if i.op is Op.STORE and mask_of(i) is not None).srcs is kept   # untouched


# ---- 7b. a masked epilogue after the matrix units: the lower triangle of a GEMM --------------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_lower(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64):
    """C[r, c] = (A @ B)[r, c] for c <= r (a SYRK-style triangle); C's strict upper triangle is not written."""
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    lower = ts.RegTile[ts.bool_, BM, BN]()
    ts.fill(lower, 1)
    ts.tril(lower, lower, i * BM - j * BN, 0)    # global column <= global row
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j), mask=lower)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gemm_writes_only_its_lower_triangle(backend):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(100, 64, generator=g), torch.randn(64, 100, generator=g)
    c = torch.full((100, 100), SENTINEL)
    launch(gemm_lower, backend, a, b, c, BM=32, BN=32, BK=32)
    low = torch.ones(100, 100, dtype=torch.bool).tril()
    torch.testing.assert_close(c[low].double(), (a.double() @ b.double())[low], rtol=1e-4, atol=1e-4)
    assert torch.equal(c[~low], torch.full_like(c[~low], SENTINEL))


@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
def test_the_masked_gemm_epilogue_compiles_for_sm90a_through_pointers(ws):
    """Gluon: TMA loads into the ring, wgmma, and the masked (128, 128) bf16 store through predicated pointer
    stores where an unmasked one takes the copy engine (cp.async.bulk.tensor ... global.shared)."""
    from sm90a_compile import compile_gluon_sm90a

    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    bf = (meta(4096, 4096, dtype=torch.bfloat16),) * 3
    be = get_backend("gluon")
    ptx = be.aot(gemm_lower.trace(*bf), be.Options(warp_specialize=ws)).asm["ptx"]
    assert "cp.async.bulk.tensor.2d.shared" in ptx and "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor.2d.global.shared" not in ptx and re.search(r"@%p\d+ st\.global", ptx)
    assert ("setmaxnreg" in ptx) is ws
    compile_gluon_sm90a(gemm_lower, bf, {})                     # and spills nothing (default options)


# ---- 8. compiled for sm_90a on this CPU ------------------------------------------------------------------------------
def test_the_kernels_compile_for_sm90a_with_triton_and_gluon():
    from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
    cases = [(segment_softmax, (meta(1 << 20, 64), meta(4096, 2, dtype=torch.int32), meta(1 << 20, 64)),
              dict(BM=64, H=64)),
             (varlen_center, (meta(1 << 16, 128), meta(65, dtype=torch.int64), meta(64, 128),
                              meta(1 << 16, 128, dtype=torch.bfloat16)), dict(BM=64, D=128)),
             (relu_where_flagged, (meta(1 << 20), meta(1 << 20, dtype=torch.int8), meta(1 << 20)), dict(B=1024)),
             (masked_writes, (meta(4096, 128), meta(4096, 128), meta(4096, 128)), dict(BM=64, BN=128))]
    predicated = re.compile(r"@%p\d+ (st|red|atom)\.global")
    for kernel, args, consts in cases:
        check_triton_sm90a(kernel, args, consts)
        ptx = compile_gluon_sm90a(kernel, args, consts).asm["ptx"]
        # every store is masked: predicated pointer stores, no copy-engine store (segment_softmax's (64, 64) f32
        # tile and masked_writes' (64, 128) one would go through it unmasked)
        assert predicated.search(ptx) and "cp.async.bulk.tensor" not in ptx, kernel.name
    # store_both's cached trace, shared with the earlier tests of this file (the verifier test above breaks a copy
    # of it: it broke the trace itself once, and this compile saw (OUT, x, i, j, x, x) in CI)
    ptx = compile_gluon_sm90a(store_both, (meta(64, 64), meta(64, 64), meta(64, 64)), {}).asm["ptx"]
    assert ptx.count("cp.async.bulk.tensor") == 1 and predicated.search(ptx)     # the unmasked store, the masked one
