"""Round 28 of held-out kernels, continued (test_heldout_round28.py has the first four): on the reference executor and
Triton's interpreter against float64 torch or exact integers, outputs poisoned first, ragged sizes, seeds fixed.

- Radix select (torch.kthvalue of int32 rows wider than a tile): the k-th smallest built bit by bit from the top in
  i64 work (keys lifted by 2^31 so that signed order is unsigned order), each of 32 bits a pass over the row's
  column tiles counting the elements that share the prefix chosen so far and have a 0 at that bit; a per-row k read
  as a vector, rows given as a transposed (non-contiguous) view, INT32_MIN / INT32_MAX and all-equal rows.
- A GEMM fused with a row-wise log-softmax (16-bit operands, f32 accumulation): an online log-sum-exp over N's tiles
  in a first pass, the product recomputed and written as s - lse in a second; the log-sum-exp as a second output of
  shape (M,); logits 1e4 apart, padded columns -inf.
- Gauss-Jordan inversion of a batch of small matrices with partial pivoting (the pivot the first row of largest
  magnitude at or below the diagonal, rows swapped by masks and one-hot reductions, the loop over a runtime n):
  permutation matrices and a zero leading entry that need the swap, against torch.linalg.inv in float64.
- Misuse: wrong uses of this round's ops refused when traced, each naming the argument.

What this round found: no kernel gave a wrong answer on either executor. Fixed, each kept as its test here:
- launch (lang.layout.elements_overlap): the overlap search's byte window was the wrong way round for arguments of
  different element sizes (an f32 view inside an f64 element's upper half; u8 bytes inside an f32 element past its
  first byte): such overlaps ran. test_overlap_of_views_of_two_element_sizes_is_refused, and a byte-by-byte check;
- launch (lang.layout.aligned): arguments at one address with one element size and strides were taken as one tensor
  passed twice even where the larger shape reaches an element twice ((4, 8) windows of stride (4, 1) read beside the
  (4, 4) rows written): the executors disagreed. test_overlapping_windows_at_the_outputs_address_are_refused;
- launch (lang.layout.shares_memory): two storages over one memory (torch.from_numpy of overlapping NumPy views) were
  taken as apart. test_overlap_through_two_storages_of_one_memory_is_refused;
- launch: an inference tensor written outside inference mode failed with torch's RuntimeError after the reference
  ran (Triton wrote it); a nested tensor failed inside torch; both refused naming the argument now;
- launch: Triton's writes bumped no autograd version, so a backward through an overwritten saved tensor gave silently
  wrong gradients (the reference refused it): every launch bumps its written tensors' versions;
- reference executor: one tensor passed as two outputs kept only the last one's stores (a copy per argument);
- language: block_id(n) of a runtime n, a runtime tile size, a Scalar copied as a tile and `a @ v` of a vector
  now name the value and say what to write.
Fixed in session 30 (was a strict xfail): a loop bound past int32 computed from an int argument that fits it wrapped
under the Triton backend (test_loop_bound_past_int32_from_an_int_argument_that_fits_it; ir.scalars.past_int32).
"""

import math
import re

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262802)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 5. radix select: the k-th smallest of each int32 row --------------------------------------------------------
LIFT = 2**31      # int32 -> [0, 2^32): unsigned order of the lifted key is the signed order of the value


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def radix_select(X, K, OUT, *, BM: int = 8, BN: int = 16):
    """OUT[r] = the K[r]-th smallest (0-based) of X[r, :] for int32 X (R, N), 0 <= K[r] < N."""
    i = ts.block_id(0)
    n = X.shape[1]
    kk, ans = ts.RegVec[ts.i64, BM](), ts.RegVec[ts.i64, BM]()
    ts.load(kk, K, at=(i,))
    ts.zero(ans)
    x = ts.RegTile[ts.i32, BM, BN]()
    key, t = ts.RegTile[ts.i64, BM, BN](), ts.RegTile[ts.i64, BM, BN]()
    hit, m = ts.RegTile[ts.bool_, BM, BN](), ts.RegTile[ts.bool_, BM, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    cnt, prefix = ts.RegVec[ts.i64, BM](), ts.RegVec[ts.i64, BM]()
    take = ts.RegVec[ts.bool_, BM]()
    for b in ts.range(31, -1, -1):
        ts.zero(cnt)
        ts.shr(prefix, ans, b + 1)
        for j in ts.range(ts.cdiv(n, BN)):
            ts.load(x, X, at=(i, j))
            ts.copy(key, x)
            ts.add(key, key, LIFT)
            ts.shr(t, key, b + 1)
            ts.eq(hit, t, ts.per_row(prefix))          # shares the bits above b chosen so far
            ts.shr(t, key, b)
            ts.bit_and(t, t, 1)
            ts.eq(m, t, 0)
            ts.logical_and(hit, hit, m)
            ts.arange(cols, j * BN)
            ts.lt(inside, cols, n)
            ts.logical_and(hit, hit, ts.per_col(inside))
            ts.where(t, hit, 1, 0)
            ts.row_sum(cnt, t, cnt)
        ts.ge(take, kk, cnt)                           # the k-th lies among the 1s at bit b
        bitv = ts.RegVec[ts.i64, BM]()
        ts.one(bitv)
        ts.shl(bitv, bitv, b)
        ts.bit_or(bitv, ans, bitv)
        ts.where(ans, take, bitv, ans)
        ts.sub(bitv, kk, cnt)
        ts.where(kk, take, bitv, kk)
    ts.sub(ans, ans, LIFT)
    out = ts.RegVec[OUT.dtype, BM]()
    ts.copy(out, ans)
    ts.store(OUT, out, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("R", "N", "BM", "BN"), [(11, 37, 8, 16), (3, 1, 8, 16), (5, 16, 4, 16)])
@pytest.mark.parametrize("kdtype", [I32, I64])
def test_radix_select(backend, R, N, BM, BN, kdtype, rng):
    x = torch.from_numpy(rng.integers(-(2**31), 2**31, (N, R))).to(I32).T    # a transposed view: strides (1, R)
    if N > 4:
        x[0, :3] = torch.tensor([-(2**31), 2**31 - 1, -(2**31)], dtype=I32)
        x[1] = 7                                                               # all equal
        x[2, : N // 2] = -1
    k = torch.from_numpy(rng.integers(0, N, R)).to(kdtype)
    k[0] = 0
    k[R - 1] = N - 1
    out = torch.full((R,), 12345, dtype=I64)
    launch(radix_select, backend, x, k, out, BM=BM, BN=BN)
    want = torch.stack([x[r].sort().values[int(k[r])] for r in range(R)]).to(I64)
    assert torch.equal(out, want), (out, want)


# ---- 6. GEMM + row-wise log-softmax, the log-sum-exp as a second output ------------------------------------------
@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def gemm_log_softmax(A, B, LP, LSE, scale: float, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """LP (M, N) = log_softmax(scale * A @ B^T, dim=1), LSE (M,) = logsumexp(scale * A @ B^T, dim=1) for A (M, K),
    B (N, K); f32 accumulation."""
    i = ts.block_id(0)
    N, K = B.shape[0], A.shape[1]
    a, b = ts.SharedTile[A.dtype, BM, BK](), ts.SharedTile[B.dtype, BN, BK]()
    s = ts.RegTile[ts.f32, BM, BN]()
    m, l, mt, alpha = (ts.RegVec[ts.f32, BM]() for _ in range(4))
    cols = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()

    def logits(j):
        ts.zero(s)
        for k in ts.range(ts.cdiv(K, BK)):
            ts.load(a, A, at=(i, k))
            ts.load(b, B, at=(j, k))
            ts.mma_ABt(s, a, b, s)
        ts.mul(s, s, scale)
        ts.arange(cols, j * BN)
        ts.lt(inside, cols, N)
        ts.where(s, ts.per_col(inside), s, -math.inf)

    ts.neg_infty(m)
    ts.zero(l)
    for j in ts.range(ts.cdiv(N, BN)):
        logits(j)
        ts.row_max(mt, s, m)                           # the running max, never -inf after a column exists
        ts.sub(alpha, m, mt)
        ts.exp(alpha, alpha)
        ts.mul(l, l, alpha)
        ts.sub(s, s, ts.per_row(mt))
        ts.exp(s, s)
        ts.row_sum(l, s, l)
        ts.copy(m, mt)
    lse = ts.RegVec[ts.f32, BM]()
    ts.log(lse, l)
    ts.add(lse, lse, m)
    ts.store(LSE, lse, at=(i,))
    out = ts.RegTile[LP.dtype, BM, BN]()
    for j in ts.range(ts.cdiv(N, BN)):
        logits(j)
        ts.sub(s, s, ts.per_row(lse))
        ts.copy(out, s)
        ts.store(LP, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("M", "N", "K"), [(19, 37, 20), (1, 1, 1), (16, 16, 48)])
def test_gemm_log_softmax(backend, dtype, M, N, K, rng):
    a, b = randn(rng, M, K, dtype=dtype), randn(rng, N, K, dtype=dtype)
    if M > 2 and N > 2:
        a[1] *= 40.0                                   # logits ~1e4 apart: exp overflows without the max
        a[2] = 0                                       # a row of equal logits: -log N everywhere
    scale = 0.7
    lp, lse = poisoned(M, N), poisoned(M)
    launch(gemm_log_softmax, backend, a, b, lp, lse, scale)
    s = scale * a.double() @ b.double().T
    want_lse = torch.logsumexp(s, 1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lp.double(), s - want_lse[:, None], rtol=1e-5, atol=2e-4)
    if M > 2 and N > 2:
        torch.testing.assert_close(lp[2].double(), torch.full((N,), -math.log(N), dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_log_softmax_16bit_output(backend, rng):
    """LP stored as bf16 while LSE stays f32: two outputs of different shapes and dtypes."""
    a, b = randn(rng, 9, 24, dtype=BF), randn(rng, 21, 24, dtype=BF)
    lp, lse = poisoned(9, 21, dtype=BF), poisoned(9)
    launch(gemm_log_softmax, backend, a, b, lp, lse, 1.0)
    want = torch.log_softmax(a.double() @ b.double().T, 1)
    close(lp, want, scale=4.0)
    close(lse, torch.logsumexp(a.double() @ b.double().T, 1), scale=10.0)


# ---- 7. Gauss-Jordan inversion with partial pivoting -------------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def gauss_jordan_inverse(A, INV, *, BN: int = 16):
    """INV[b] = A[b]^-1 for A (B, n, n), n <= BN, f32 work: for each column k, the first row of largest |a[., k]| at
    or below k swapped into row k, row k scaled by its pivot, column k eliminated from every other row."""
    b = ts.block_id(0)
    n = A.shape[1]
    a, inv = ts.RegTile[ts.f32, BN, BN](), ts.RegTile[ts.f32, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    r, c = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN]()
    ts.arange(r, 0)
    ts.arange(c, 0)
    mask = ts.RegTile[ts.bool_, BN, BN]()
    ts.eq(mask, ts.per_row(r), ts.per_col(c))
    ts.where(inv, mask, 1.0, 0.0)
    t = ts.RegTile[ts.f32, BN, BN]()
    colk, mag, best = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    cand, is_k, is_p = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.bool_, BN]()
    ci, idx = ts.RegVec[ts.bool_, BN](), ts.RegVec[ts.i32, BN]()
    p = ts.RegVec[ts.i32, BN]()
    big = ts.RegVec[ts.i32, BN]()
    rk_a, rp_a, rk_i, rp_i = (ts.RegVec[ts.f32, BN]() for _ in range(4))
    piv = ts.RegVec[ts.f32, BN]()
    for k in ts.range(n):
        ts.eq(ci, c, k)
        ts.where(t, ts.per_col(ci), a, 0.0)
        ts.row_sum(colk, t)                            # colk[i] = a[i, k]
        ts.abs(mag, colk)
        ts.ge(cand, r, k)
        ts.lt(is_k, r, n)
        ts.logical_and(cand, cand, is_k)
        ts.where(mag, cand, mag, -1.0)
        ts.zero(t)
        ts.add(t, t, ts.per_row(mag))
        ts.col_max(best, t)                            # every element: the largest candidate magnitude
        ts.eq(is_p, mag, best)
        ts.fill(big, BN)
        ts.where(idx, is_p, r, big)
        ts.zero(p)
        it = ts.RegTile[ts.i32, BN, BN]()
        ts.zero(it)
        ts.add(it, it, ts.per_row(idx))
        ts.col_min(p, it)                              # every element: the first row attaining it
        ts.eq(is_k, r, k)
        ts.eq(is_p, r, p)
        for src, rk, rp in ((a, rk_a, rp_a), (inv, rk_i, rp_i)):   # swap rows k and p of both
            ts.where(t, ts.per_row(is_k), src, 0.0)
            ts.col_sum(rk, t)
            ts.where(t, ts.per_row(is_p), src, 0.0)
            ts.col_sum(rp, t)
            ts.where(src, ts.per_row(is_p), ts.per_col(rk), src)
            ts.where(src, ts.per_row(is_k), ts.per_col(rp), src)
        # rp_a is now row k; its element k is the pivot, broadcast to every row
        ts.where(t, ts.per_col(ci), ts.per_col(rp_a), 0.0)
        ts.row_sum(piv, t)
        ts.div(rp_a, rp_a, piv)
        ts.div(rp_i, rp_i, piv)
        ts.where(t, ts.per_col(ci), a, 0.0)
        ts.row_sum(colk, t)                            # the factors a[i, k] after the swap
        ts.where(colk, is_k, 0.0, colk)
        for src, row in ((a, rp_a), (inv, rp_i)):
            ts.zero(t)
            ts.add(t, t, ts.per_col(row))
            ts.mul(t, t, ts.per_row(colk))
            ts.sub(src, src, t)
            ts.where(src, ts.per_row(is_k), ts.per_col(row), src)
    out = ts.RegTile[INV.dtype, BN, BN]()
    ts.copy(out, inv)
    ts.store(INV, out, at=(b, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "n", "BN"), [(4, 7, 8), (2, 16, 16), (1, 1, 16), (3, 12, 16)])
def test_gauss_jordan_inverse(backend, B, n, BN, rng):
    a = randn(rng, B, n, n) + 2 * torch.eye(n)
    if n > 2:
        a[0, 0, 0] = 0.0                               # a zero leading entry: no inverse without a swap
        a[B - 1] = torch.eye(n)[torch.from_numpy(rng.permutation(n))]  # a permutation: every step swaps
    inv = poisoned(B, n, n)
    launch(gauss_jordan_inverse, backend, a, inv, BN=BN)
    want = torch.linalg.inv(a.double())
    cond = float(torch.linalg.cond(a.double()).amax())
    torch.testing.assert_close(inv.double(), want, rtol=1e-5 * cond, atol=1e-5 * cond)
    if n > 2:
        assert torch.equal(inv[B - 1], a[B - 1].T)     # a permutation's inverse, exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_gauss_jordan_pivot_choice_is_the_first_largest(backend):
    """|a| ties in column 0 (rows 1 and 2 both 4): the first is taken; the result the same either way, but a wrong
    swap of row 0 (|a| 1) into place would divide by a small pivot: the 2x2 [[1e-7, 1], [1, 1]] needs the swap."""
    a = torch.tensor([[[1e-7, 1.0], [1.0, 1.0]]])
    inv = poisoned(1, 2, 2)
    launch(gauss_jordan_inverse, backend, a, inv, BN=8)
    torch.testing.assert_close(inv.double(), torch.linalg.inv(a.double()), rtol=1e-6, atol=1e-6)
    a3 = torch.tensor([[[1.0, 2.0, 0.0], [4.0, 1.0, 1.0], [-4.0, 0.0, 3.0]]])
    inv3 = poisoned(1, 3, 3)
    launch(gauss_jordan_inverse, backend, a3, inv3, BN=8)
    torch.testing.assert_close(inv3.double(), torch.linalg.inv(a3.double()), rtol=1e-6, atol=1e-6)


# ---- misuse and launch checks --------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BS: (ts.cdiv(X.shape[0], BS),))
def widen_copy(X, Y, *, BS: int = 8):
    """Y = X converted to Y's dtype."""
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BS]()
    ts.load(x, X, at=(i,))
    y = ts.RegVec[Y.dtype, BS]()
    ts.copy(y, x)
    ts.store(Y, y, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_of_views_of_two_element_sizes_is_refused(backend):
    """An f32 output inside the upper half of an f64 input's element (the same buffer viewed as both), or a u8 input
    whose bytes lie inside an f32 output's element past its first byte: they share bytes at different indices.
    The overlap search's byte window was the wrong way round for element sizes that differ, so these ran
    (lang.layout.elements_overlap)."""
    buf = torch.zeros(8, dtype=F64)
    x64 = buf[:2]
    y32 = buf.view(F32)[1:3]                           # bytes 4..11: x64[0]'s upper half, x64[1]'s lower
    with pytest.raises(Exception, match=r"X \(read.*Y \(written.*overlap"):
        launch(widen_copy, backend, x64, y32)
    raw = torch.zeros(16, dtype=F32)
    y = raw[:1]                                        # bytes 0..3
    xu8 = raw.view(torch.uint8)[1:4]                   # bytes 1..3
    with pytest.raises(Exception, match=r"X \(read.*Y \(written.*overlap"):
        launch(widen_copy, backend, xu8, y)
    # the same buffer without shared bytes is taken: f32 elements 4.. against f64 elements 0..1 (bytes 0..15)
    ok = buf.view(F32)[4:6]
    launch(widen_copy, backend, x64, ok)
    assert torch.equal(ok, torch.zeros(2))


def test_elements_overlap_matches_a_byte_by_byte_search(rng):
    """lang.layout.elements_overlap against the set of bytes each view covers, for random strided views of one
    buffer in u8 / f16 / f32 / f64 (rank 1 and 2, steps, offsets)."""
    from tilestack.lang.layout import elements_overlap

    def covered(t):
        es, base = t.element_size(), t.data_ptr()
        offs = torch.zeros((), dtype=I64)
        for n, st in zip(t.shape, t.stride(), strict=True):
            offs = offs[..., None] + torch.arange(n) * st * es
        return {int(o) + base + k for o in offs.flatten() for k in range(es)}

    buf = torch.zeros(48, dtype=F64)
    dtypes = [torch.uint8, F16, F32, F64]
    for _ in range(600):
        views = []
        for _ in range(2):
            v = buf.view(dtypes[int(rng.integers(4))])
            if rng.integers(2):
                size, st = int(rng.integers(1, 5)), int(rng.integers(1, 6))
                views.append(v.as_strided((size,), (st,), int(rng.integers(0, v.numel() - (size - 1) * st))))
            else:
                s0, s1, st1 = (int(x) for x in rng.integers(1, 4, 3))
                st0 = st1 * s1 + int(rng.integers(0, 5))
                off = int(rng.integers(0, v.numel() - (s0 - 1) * st0 - (s1 - 1) * st1))
                views.append(v.as_strided((s0, s1), (st0, st1), off))
        a, b = views
        want = bool(covered(a) & covered(b))
        assert elements_overlap(a, b) is want and elements_overlap(b, a) is want, (a.dtype, a.shape, a.stride(),
                                                                                  a.storage_offset(), b.dtype,
                                                                                  b.shape, b.stride(),
                                                                                  b.storage_offset())


def _trace_error(kernel, *args, **consts) -> str:
    """The message of the error tracing ``kernel`` raises (before any program runs)."""
    with pytest.raises(Exception) as e:
        kernel.trace(*args, **consts)
    return str(e.value)


@ts.kernel(grid=lambda X: (1,))
def runtime_axis(X, Y, n: int, *, BS: int = 16):
    i = ts.block_id(n)                                 # the axis from a runtime int
    y = ts.RegVec[ts.f32, BS]()
    ts.zero(y)
    ts.store(Y, y, at=(i,))


@ts.kernel(grid=lambda X: (1,))
def bool_axis(X, Y, *, BS: int = 16):
    i = ts.num_blocks(True)
    y = ts.RegVec[ts.f32, BS]()
    ts.zero(y)
    ts.store(Y, y, at=(i,))


@ts.kernel(grid=lambda X: (1,))
def runtime_sized_tile(X, Y, n: int):
    y = ts.RegVec[ts.f32, n]()                         # a tile as wide as a runtime int
    ts.load(y, X, at=(0,))
    ts.store(Y, y, at=(0,))


@ts.kernel(grid=lambda X: (1,))
def scalar_as_tile(X, Y, *, BS: int = 16):
    k = ts.load_scalar(X, 0)
    y = ts.RegVec[ts.f32, BS]()
    ts.copy(y, k)                                      # a Scalar copied as if it were a tile
    ts.store(Y, y, at=(0,))


def test_misuse_of_runtime_values_names_them():
    """A runtime int as a grid axis was refused as "`==` on a Scalar in `ts.block_id(n)`" (the axis check compared
    it); True was taken as axis 1; a runtime tile size showed only the IR's Scalar(%n..); a Scalar copied into a
    tile said nothing of ts.fill. Each names the value now (lang.control._axis, lang.tiles._runtime_size,
    lang.ops._hint)."""
    x, y = torch.zeros(16), torch.zeros(16)
    msg = _trace_error(runtime_axis, x, y, 1)
    assert "block_id: axis must be 0, 1 or 2" in msg and "`n`" in msg and "compile-time" in msg, msg
    msg = _trace_error(bool_axis, x, y)
    assert "num_blocks: axis must be 0, 1 or 2, got True" in msg, msg
    msg = _trace_error(runtime_sized_tile, x, y, 16)
    assert "sizes are positive compile-time ints" in msg and "`n`" in msg and "mask" in msg, msg
    msg = _trace_error(scalar_as_tile, x, y)
    assert "copy: src must be a tile or vector" in msg and "ts.fill(t, k)" in msg, msg


@ts.kernel(grid=lambda X: (1,))
def misuse_round28(X, Y, *, BS: int = 16, CASE: str = ""):
    """One wrong use of this round's ops per CASE."""
    v = ts.RegVec[ts.i64, BS]()
    ts.zero(v)
    m = ts.RegTile[ts.bool_, BS, BS]()
    if CASE == "int_mma":                              # radix / modpow users multiplying integer tiles
        a, c = ts.RegTile[ts.i64, BS, BS](), ts.RegTile[ts.f32, BS, BS]()
        ts.zero(a)
        ts.zero(c)
        ts.mma_AB(c, a, a, c)
    elif CASE == "shift_64":
        ts.shl(v, v, 64)
    elif CASE == "float_step":
        for _ in ts.range(31, -1, -1.0):
            ts.add(v, v, 1)
    elif CASE == "short_per_col":                      # rank sort with a vector of another width
        w = ts.RegVec[ts.f32, BS // 2]()
        ts.zero(w)
        ts.lt(m, ts.per_col(w), ts.per_row(v))
    elif CASE == "float_mask":
        t = ts.RegTile[ts.f32, BS, BS]()
        ts.zero(t)
        ts.where(t, t, 1.0, 0.0)
    elif CASE == "short_row_sum":
        t = ts.RegTile[ts.i32, BS, BS]()
        ts.zero(t)
        r = ts.RegVec[ts.i32, BS // 2]()
        ts.row_sum(r, t)
    elif CASE == "float_shift":
        ts.shr(v, v, 1.5)
    out = ts.RegVec[ts.f32, BS]()
    ts.copy(out, v)
    ts.store(Y, out, at=(0,))


@pytest.mark.parametrize(("case", "pattern"), [
    ("int_mma", r"mma_AB: a `a` is i64 and b `a` is i64; expected both bf16"),
    ("shift_64", r"shl: shift count 64 for i64 work; expected 0 <= count < 64"),
    ("float_step", r"range: an operand must be an index .* got float -1.0"),
    ("short_per_col", r"lt: a per_col\(`w`\) has 8 elements but dst `m` \(16, 16\) has 16 columns"),
    ("float_mask", r"where: mask `t` is f32; expected a bool_ mask"),
    ("short_row_sum", r"row_sum: the result is \(16,\) but dst `r` is \(8,\)"),
    ("float_shift", r"shr: a `v` is i64; b = 1.5 is not a whole number"),
])
def test_misuse_of_this_rounds_ops_is_named(case, pattern):
    """Each refused when traced (no program runs), naming the argument and what was expected."""
    msg = _trace_error(misuse_round28, torch.zeros(16), torch.zeros(16), CASE=case)
    assert re.search(pattern, msg), msg


@ts.kernel(grid=lambda Y: (Y.shape[0],))
def window_sum_reversed(X, Y, *, BN: int = 8, BO: int = 4):
    """Y[r, :] = sum(X[r, :]) for the rows taken in reverse program order (program 0 does the last row)."""
    r = Y.shape[0] - 1 - ts.block_id(0)
    x = ts.RegTile[ts.f32, 1, BN]()
    ts.load(x, X, at=(r, 0))
    s = ts.RegVec[ts.f32, 1]()
    ts.row_sum(s, x)
    y = ts.RegTile[ts.f32, 1, BO]()
    ts.zero(y)
    ts.add(y, y, ts.per_row(s))
    ts.store(Y, y, at=(r, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_windows_at_the_outputs_address_are_refused(backend):
    """X = (4, 8) windows of stride (4, 1) over a buffer (each window holds two rows), Y = the (4, 4) rows of the same
    buffer, written: both start at one address with one element size and strides, so the overlap guard took them as
    one tensor passed twice, though X's row r holds Y's row r + 1. The reference executor (on copies) gave
    [28, 60, 92, 124] and Triton's interpreter (in place, reversed order) [8638, 2158, 534, 124]; refused now
    (lang.layout.aligned). The same rows passed twice, and a window view as wide as the rows, are still taken."""
    buf = torch.arange(20.0)
    X, Y = buf.as_strided((4, 8), (4, 1)), buf.as_strided((4, 4), (4, 1))
    with pytest.raises(Exception, match=r"X \(read.*Y \(written.*overlap"):
        launch(window_sum_reversed, backend, X, Y)
    assert torch.equal(buf, torch.arange(20.0))        # refused before any work
    rows = torch.arange(16.0).view(4, 4)
    launch(window_sum_reversed, backend, rows, rows, BN=4)   # in place, one tensor twice: each row its own sum
    assert torch.equal(rows[:, 0], torch.tensor([6.0, 22.0, 38.0, 54.0]))
    buf2 = torch.arange(32.0)
    wide, narrow = buf2.as_strided((4, 8), (8, 1)), buf2.as_strided((4, 4), (8, 1))  # disjoint rows: taken
    launch(window_sum_reversed, backend, wide, narrow)
    assert torch.equal(narrow[:, 0], torch.tensor([28.0, 92.0, 156.0, 220.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_through_two_storages_of_one_memory_is_refused(backend):
    """torch.from_numpy of two overlapping NumPy views makes two storages over one memory: the overlap check compared
    the storages first and took them as apart, so X (rows 1-4 of a buffer) read while Y (rows 0-3) is written ran, the
    reference giving [22, 38, 54, 70] and Triton's interpreter [4480, 1120, 280, 70] (lang.layout.shares_memory now
    compares addresses). Disjoint views of one NumPy buffer are still taken."""
    a = np.arange(24, dtype=np.float32)
    X, Y = torch.from_numpy(a[4:20]).view(4, 4), torch.from_numpy(a[:16]).view(4, 4)
    assert X.untyped_storage().data_ptr() != Y.untyped_storage().data_ptr()
    with pytest.raises(Exception, match=r"X \(read.*Y \(written.*overlap"):
        launch(window_sum_reversed, backend, X, Y, BN=4)
    assert np.array_equal(a, np.arange(24, dtype=np.float32))
    lo, hi = torch.from_numpy(a[:8]).view(2, 4), torch.from_numpy(a[8:16]).view(2, 4)
    launch(window_sum_reversed, backend, lo, hi, BN=4)
    assert hi[:, 0].tolist() == [6.0, 22.0]


@ts.kernel(grid=lambda X: (1,))
def matvec_by_at(X, V, Y, *, BS: int = 16, RHS: str = "vector"):
    a = ts.RegTile[ts.f32, BS, BS]()
    ts.load(a, X, at=(0, 0))
    v = ts.RegVec[ts.f32, BS]()
    ts.load(v, V, at=(0,))
    y = a @ v if RHS == "vector" else a @ 2.0          # Python's `@` with a vector, or a number
    ts.store(Y, y, at=(0, 0))


def test_matmul_sugar_with_a_vector_or_number_says_how():
    """`a @ v` (a matrix-vector product, as torch writes it) showed the IR's TileType(space=<Space.REG: 'reg'>, ...);
    it names the vector and gives the broadcast-and-reduce recipe now, and `a @ 2.0` points at `*`
    (lang.tiles._matmul)."""
    args = torch.zeros(16, 16), torch.zeros(16), torch.zeros(16, 16)
    msg = _trace_error(matvec_by_at, *args)
    assert "@: b must be a 2-D tile" in msg and "`v` (RegVec[f32, 16])" in msg and "ts.row_sum" in msg, msg
    msg = _trace_error(matvec_by_at, *args, RHS="number")
    assert "got float 2.0" in msg and "`*`" in msg, msg


@ts.kernel(grid=lambda X: (1,))
def trips_from(X, Y, n0: int, *, BS: int = 8):
    """Y[:] = the trips of ts.range(n0, n0 + 3) (3 for every n0)."""
    acc = ts.RegVec[ts.f32, BS]()
    ts.zero(acc)
    for _ in ts.range(n0, n0 + 3):
        ts.add(acc, acc, 1.0)
    ts.store(Y, acc, at=(0,))


@pytest.mark.parametrize("n0", [5, 2**31 + 5, -(2**31) + 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_bounds_from_an_int_argument(backend, n0):
    y = poisoned(8)
    launch(trips_from, backend, torch.zeros(8), y, n0)
    assert (y == 3).all(), y


def test_loop_bound_past_int32_from_an_int_argument_that_fits_it():
    for backend in BACKENDS:
        y = poisoned(8)
        launch(trips_from, backend, torch.zeros(8), y, 2**31 - 2)
        assert (y == 3).all(), (backend, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensor_output_outside_inference_mode_is_refused(backend):
    """An output made under torch.inference_mode() and launched outside it (torch allows no in-place update of an
    inference tensor there): the reference backend failed with torch's bare RuntimeError after running the kernel,
    Triton's interpreter wrote it; refused now on every launch, naming the output, under no_grad too (lang.kernel's
    launch guard, lang.launch.refuse_inference_output). Inside inference mode it is written; an inference input is
    read anywhere."""
    x = torch.arange(8.0)
    with torch.inference_mode():
        y = torch.zeros(8)
        x_inf = torch.arange(8.0) * 2
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx(), pytest.raises(Exception, match=r"output Y is an inference tensor .*Y.clone\(\)"):
            launch(widen_copy, backend, x, y)
        assert (y == 0).all()
    with torch.inference_mode():
        launch(widen_copy, backend, x, y)
    assert torch.equal(y, x)
    out = poisoned(8)
    launch(widen_copy, backend, x_inf, out)
    assert torch.equal(out, x_inf)


@ts.kernel(grid=lambda X: (1,))
def copy_2d(X, Y, *, BM: int = 2, BN: int = 8):
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(0, 0))
    ts.store(Y, x, at=(0, 0))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_tensor_arguments_are_refused_by_name(backend, layout):
    """A nested tensor of the strided layout (torch.nested.nested_tensor's default) passed the layout check and failed
    inside torch ("NestedTensorImpl doesn't support sizes"); a jagged one was told to call .to_dense(), which nested
    tensors lack. Both are refused naming the argument and to_padded_tensor (lang.launch.check_args)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # (torch's prototype-API warning for the strided layout)
        n = torch.nested.nested_tensor([torch.ones(8), torch.ones(8)], layout=layout)
    y = poisoned(2, 8)
    with pytest.raises(Exception, match=r"argument X is a nested tensor .*X.to_padded_tensor\(0.0\)"):
        launch(copy_2d, backend, n, y)
    with pytest.raises(Exception, match=r"argument Y is a nested tensor .*Y.to_padded_tensor\(0.0\)"):
        launch(copy_2d, backend, torch.ones(2, 8), n)
    assert torch.isnan(y).all()
    launch(copy_2d, backend, n.to_padded_tensor(0.0), y)
    assert (y == 1).all()


@ts.kernel(grid=lambda X: (1,))
def split_halves(X, LO, HI, *, BS: int = 8):
    """LO's first tile = X's first; HI's second tile = 10 X's second: two outputs, often one tensor."""
    x = ts.RegVec[ts.f32, BS]()
    ts.load(x, X, at=(0,))
    ts.store(LO, x, at=(0,))
    ts.load(x, X, at=(1,))
    ts.mul(x, x, 10.0)
    ts.store(HI, x, at=(1,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_tensor_passed_as_two_outputs_keeps_both_stores(backend):
    """The same tensor as LO and HI (taken: one tensor passed twice): the reference executor held a copy per argument
    and wrote each back whole, so HI's copy put LO's half back as it was ([-1] * 8 + [80, ...]); Triton's
    interpreter kept both. Outputs at one address with one dtype and strides are views of one copy now
    (backends.reference.executor._share_outputs), the tensor and a prefix view of it too."""
    x = torch.arange(16.0)
    want = torch.cat([x[:8], 10 * x[8:]])
    y = torch.full((16,), -1.0)
    launch(split_halves, backend, x, y, y)
    assert torch.equal(y, want), y
    y = torch.full((16,), -1.0)
    launch(split_halves, backend, x, y[:8], y)
    assert torch.equal(y, want), y
    lo, hi = torch.full((16,), -1.0), torch.full((16,), -1.0)   # apart: each keeps its own untouched half
    launch(split_halves, backend, x, lo, hi)
    assert torch.equal(lo[:8], x[:8]) and (lo[8:] == -1).all() and (hi[:8] == -1).all()
    assert torch.equal(hi[8:], 10 * x[8:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_write_is_seen_by_autograd_as_an_in_place_update(backend):
    """y = exp(x) is saved for exp's backward; a kernel then overwrites y through y.detach(). The reference backend's
    copy back bumped y's version, so backward refused it as torch refuses any in-place change of a saved tensor;
    Triton's writes bumped nothing and backward ran with the overwritten y: gradients of 0, silently. Every launch
    bumps its written tensors' versions now (lang.kernel's launch guard)."""
    x = torch.randn(8, requires_grad=True)
    y = x.exp()
    launch(widen_copy, backend, torch.zeros(8), y.detach())
    assert y._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    z = torch.zeros(8)                                 # a plain output: written, version bumped, nothing else
    launch(widen_copy, backend, torch.ones(8), z)
    assert (z == 1).all() and z._version > 0
