"""Round 19 of held-out kernels (after rounds 2-18): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch / NumPy or a hand computation, outputs poisoned (NaN, or an
impossible integer) first, seeds fixed (the ``rng`` fixture of this file).

A complex GEMM from real and imaginary planes (C = A B or C = A^H B, the planes given as torch.view_as_real's strided
views of complex64 tensors, each plane at an element offset of 0 or 1 with a last stride of 2, the output written
through the same kind of views; four real products or Gauss's three, whose operand sums are made in registers and
staged into shared tiles of the input dtype; f32, f16 and bf16 planes, K = 0, an empty grid); a cumulative product
along rows wider than a tile (torch.cumprod, forward and reversed: column tiles visited by a loop counting down, each
tile's columns by an unrolled scan whose carry is one value a row; zeros, infinities and NaN in f32 / f64, the carry
kept in f32 for f16 / bf16, i32 and i64 products wrapping as the GPU's do); and row quantiles across column tiles
(torch.quantile and torch.nanquantile with linear interpolation: each element's rank counted against every column of
the row by compares in a loop nest, the two order statistics around q (n - 1) picked by their ranks, padding columns
made NaN so that they count nowhere; ties, +-inf, rows with NaN and rows of NaN only). More kernels of this round are in
test_heldout_round19_more.py (a tridiagonal solver, escape-time fractals, Haar wavelets, bad launches).

What this round found, fixed and kept as its test:
- Triton: a store of a register tile whose rows are narrower than 16 bytes (a (BM, 1) column of f64 or f32 in the
  Thomas algorithm, a (BM, 8) tile of u8 / i8 pixels) into a global the copy engine can address (contiguous, rows 16
  bytes aligned) went through a TMA descriptor, which Triton refused deep in its compile: "Descriptor block shape must
  have at least 16 bytes in the last dimension". Such a tile goes through pointers now (backends.triton.passes.
  uses_tma, as Gluon's tma_box_ok already did; loads into shared tiles as thin, an f16 (16, 4) GEMM operand, the
  same): test_heldout_round19_more.py::test_thomas_tridiagonal_solve, test_narrow_integer_tiles_store_into_aligned_
  outputs and test_skinny_tiles_load_into_shared_from_aligned_operands.
No kernel gave a wrong answer on either executor, and every bad launch tried was refused before any work, naming the
argument. fill(t, x) of a run-time float was refused with a recipe (zero, then add x), which the Julia set's constant
follows; fill takes a run-time Scalar into a float or integer tile now (test_heldout_kernels.py::
test_fill_with_a_runtime_scalar). mma refuses f64 operands by name (the complex GEMM keeps f64 planes out).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch

import tilestack.lang as ts

C64, C128 = torch.complex64, torch.complex128
# NaN and inf inputs make NaN in the interpreter's NumPy arithmetic (0 * inf, inf - inf), as they should
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261901)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. complex GEMM from real / imaginary planes --------------------------------------------------------------
@ts.kernel(grid=lambda CR, BM, BN: (ts.cdiv(CR.shape[0], BM), ts.cdiv(CR.shape[1], BN)))
def cgemm(AR, AI, BR, BI, CR, CI, *, OP: str = "N", GAUSS: bool = False, BM: int = 16, BN: int = 16,
          BK: int = 16):
    """C = op(A) B for complex A, B, C given as planes (AR + i AI ...). OP "N": A (M, K); OP "C": A (K, M) and
    op(A) = A^H (the conjugate transpose, read by mma_AtB with the imaginary part's sign flipped). GAUSS: three real
    products, (ar + ai)(br + bi), ar br, ai bi, instead of four. Grid: (M blocks, N blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    conj = OP == "C"
    ashape = (BK, BM) if conj else (BM, BK)
    ar = ts.SharedTile[AR.dtype, *ashape]()
    ai = ts.SharedTile[AI.dtype, *ashape]()
    br = ts.SharedTile[BR.dtype, BK, BN]()
    bi = ts.SharedTile[BI.dtype, BK, BN]()
    mm = ts.mma_AtB if conj else ts.mma_AB
    sgn = -1.0 if conj else 1.0              # op(A)'s imaginary part: -AI^T for the conjugate transpose
    rr, ii, x = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    for acc in (rr, ii, x):
        ts.zero(acc)
    if GAUSS:
        asum = ts.SharedTile[AR.dtype, *ashape]()
        bsum = ts.SharedTile[BR.dtype, BK, BN]()
        ra = ts.RegTile[ts.f32, *ashape]()
        ia = ts.RegTile[ts.f32, *ashape]()
        rb = ts.RegTile[ts.f32, BK, BN]()
        ib = ts.RegTile[ts.f32, BK, BN]()
    else:
        y = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(y)
    K = AR.shape[0] if conj else AR.shape[1]
    for k in ts.range(ts.cdiv(K, BK)):
        at = (k, i) if conj else (i, k)
        ts.load(ar, AR, at=at)
        ts.load(ai, AI, at=at)
        ts.load(br, BR, at=(k, j))
        ts.load(bi, BI, at=(k, j))
        mm(rr, ar, br, rr)                   # re(a) re(b)
        mm(ii, ai, bi, ii)                   # im(a) im(b), before op's sign
        if GAUSS:
            ts.load(ra, ar)
            ts.load(ia, ai)
            ts.load(rb, br)
            ts.load(ib, bi)
            ts.copy(asum, ra + ia * sgn)     # re + im of op(A), rounded to the input dtype as a GPU kernel would
            ts.copy(bsum, rb + ib)
            mm(x, asum, bsum, x)             # (re a + im a)(re b + im b)
        else:
            mm(x, ar, bi, x)                 # re(a) im(b)
            mm(y, ai, br, y)                 # im(a) re(b), before op's sign
    cr = ts.RegTile[CR.dtype, BM, BN]()
    ci = ts.RegTile[CI.dtype, BM, BN]()
    ts.copy(cr, rr - ii * sgn)
    if GAUSS:
        ts.copy(ci, x - rr - ii * sgn)
    else:
        ts.copy(ci, x + y * sgn)
    ts.store(CR, cr, at=(i, j))
    ts.store(CI, ci, at=(i, j))


def _complex(rng, *shape) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["N", "C"])
@pytest.mark.parametrize("gauss", [False, True])
@pytest.mark.parametrize(("M", "K", "N"), [(37, 45, 29), (16, 16, 16), (5, 0, 7), (0, 9, 3)])
def test_complex_gemm_through_view_as_real_planes(backend, op, gauss, M, K, N, rng):
    """complex64 A, B, C passed as torch.view_as_real(t)[..., 0] and [..., 1]: strided views (last stride 2) whose
    imaginary plane starts one element in; the result read back as the complex64 C, against complex128 torch. K = 0
    gives 0 (the poison overwritten), M = 0 launches no program and leaves C empty."""
    a = _complex(rng, *((K, M) if op == "C" else (M, K))).to(C64)
    b = _complex(rng, K, N).to(C64)
    c = torch.full((M, N), complex(math.nan, math.nan), dtype=C64)
    av, bv, cv = torch.view_as_real(a), torch.view_as_real(b), torch.view_as_real(c)
    assert cv[..., 1].stride() == (2 * N, 2) and cv[..., 1].storage_offset() == 1
    launch(cgemm, backend, av[..., 0], av[..., 1], bv[..., 0], bv[..., 1], cv[..., 0], cv[..., 1],
           OP=op, GAUSS=gauss)
    a128 = a.to(C128)
    want = (a128.conj().T if op == "C" else a128) @ b.to(C128)
    assert c.shape == (M, N)
    if K == 0 and M:
        assert torch.equal(c, torch.zeros_like(c))
    err = (c.to(C128) - want).abs()
    assert not err.isnan().any()
    assert (err.max().item() if err.numel() else 0.0) <= 5e-5 * max(1, K) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize("gauss", [False, True])
def test_complex_gemm_16_bit_planes(backend, dtype, gauss, rng):
    """Planes held apart in f16 / bf16 (as a half-precision complex layer keeps them), the products accumulated in
    f32, C stored in the planes' dtype. Against float64 torch of the rounded inputs: four products err by C's rounding,
    Gauss's three also by the rounding of (re + im) to the input dtype and by cancellation in x - rr - ii, so its
    imaginary part gets a looser bound than its real part (which is the same computation as the four products')."""
    M, K, N = 21, 50, 19
    ar, ai = (torch.from_numpy(rng.standard_normal((M, K))).to(dtype) for _ in range(2))
    br, bi = (torch.from_numpy(rng.standard_normal((K, N))).to(dtype) for _ in range(2))
    cr, ci = poisoned(M, N, dtype=dtype), poisoned(M, N, dtype=dtype)
    launch(cgemm, backend, ar, ai, br, bi, cr, ci, GAUSS=gauss)
    want = torch.complex(ar.double(), ai.double()) @ torch.complex(br.double(), bi.double())
    close(cr, want.real, scale=8)
    bound = (6e-2 if dtype is BF else 8e-3) if gauss else (1.6e-2 if dtype is BF else 2e-3) * 8
    assert (ci.double() - want.imag).abs().max().item() < bound * max(1.0, want.imag.abs().max().item())


# ---- 2. cumulative product along rows wider than a tile -----------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def cumprod(X, Y, *, REVERSE: bool = False, BM: int = 4, BN: int = 8):
    """Y[r, c] = prod_{k <= c} X[r, k] (REVERSE: prod_{k >= c}), as torch.cumprod(X, 1) (of X.flip(1), flipped
    back). The carry, one value a row, is f32 for 16-bit floats and Y's dtype otherwise. Grid: (row blocks,)."""
    i = ts.block_id(0)
    n = X.shape[1]
    cdt = ts.f32 if Y.dtype in (ts.f16, ts.bf16) else Y.dtype
    carry = ts.RegVec[cdt, BM]()
    ts.one(carry)
    x = ts.RegTile[cdt, BM, BN]()
    y = ts.RegTile[cdt, BM, BN]()
    tmp = ts.RegTile[cdt, BM, BN]()
    v = ts.RegVec[cdt, BM]()
    col = ts.RegVec[ts.i32, BN]()
    gcol = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    sel = ts.RegTile[ts.bool_, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    ts.arange(col)
    tiles = ts.cdiv(n, BN)
    for t in ts.range(tiles - 1, -1, -1) if REVERSE else ts.range(tiles):
        ts.load(x, X, at=(i, t))
        ts.arange(gcol, t * BN)
        ts.lt(inside, gcol, n)
        ts.where(x, ts.per_col(inside), x, 1)          # columns past the row multiply by one
        ts.zero(y)
        for c in (range(BN - 1, -1, -1) if REVERSE else range(BN)):
            ts.eq(sel, ts.per_col(col), c)
            ts.where(tmp, sel, x, 0)
            ts.row_sum(v, tmp)                          # x[:, c]
            ts.mul(carry, carry, v)
            ts.where(y, sel, ts.per_row(carry), y)
        ts.copy(out, y)
        ts.store(Y, out, at=(i, t))


def _cumprod_ref(x: torch.Tensor, reverse: bool) -> torch.Tensor:
    src = x.flip(1) if reverse else x
    want = torch.cumprod(src.double() if x.is_floating_point() else src.long(), 1)   # ints: wrapping in 64 bits
    return want.flip(1) if reverse else want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64, F16, BF])
@pytest.mark.parametrize(("R", "n"), [(6, 21), (5, 8), (3, 1), (0, 5), (4, 0)])
def test_cumprod_floats(backend, reverse, dtype, R, n, rng):
    """Factors of magnitude 0.5..1.6 and either sign (products that neither vanish nor overflow over 21 columns);
    when the row is long enough: a zero (every later product 0, an inf after it NaN as 0 * inf), +inf, -inf and NaN
    in separate rows; rows and columns not multiples of the tile, one column, no rows, no columns."""
    x = torch.from_numpy(rng.uniform(0.5, 1.6, (R, n)) * rng.choice([-1.0, 1.0], (R, n))).to(dtype)
    if R >= 5 and n >= 10:
        x[1, 5] = 0.0
        x[1, 8] = math.inf
        x[2, 3] = math.inf
        x[3, 9] = math.nan
        x[4, 0] = -math.inf
    y = poisoned(R, n, dtype=dtype)
    launch(cumprod, backend, x, y, REVERSE=reverse)
    want = _cumprod_ref(x, reverse)
    if R >= 5 and n >= 10 and not reverse:
        assert y[1, 5:8].eq(0).all() and y[1, 8:].isnan().all()          # 0, then 0 * inf
    elif R >= 5 and n >= 10:
        assert y[1, :6].isnan().all() and y[1, 6:9].isinf().all()        # inf, then inf * 0
    close(y, want, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [I32, I64])
def test_cumprod_integers_wrap(backend, reverse, dtype, rng):
    """Integer products overflow after a few columns and wrap modulo 2**32 / 2**64 (two's complement, as the GPU's
    integer multiply): exactly the low bits of the exact product (torch's int64 cumprod, which wraps the same way, cut
    to 32 bits for i32). A -1 and a 0 among them."""
    hi = 2**31 if dtype is I64 else 1000
    x = torch.from_numpy(rng.integers(-hi, hi, (7, 19))).to(dtype)
    x[2, 4], x[3, 11] = -1, 0
    y = torch.full((7, 19), -7, dtype=dtype)
    launch(cumprod, backend, x, y, REVERSE=reverse)
    want = _cumprod_ref(x, reverse).to(dtype)
    assert torch.equal(y, want)


# ---- 3. row quantiles across column tiles --------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def quantile(X, Y, q: float, *, NAN: str = "propagate", BM: int = 4, BN: int = 8):
    """Y[r] = torch.quantile(X[r], q) (NAN "propagate": NaN where the row holds one) or torch.nanquantile (NAN
    "omit": over the row's numbers, NaN when it has none), linear interpolation between the order statistics of
    rank floor(q (m - 1)) and the next, m the count of numbers. Ranks: for each element, how many of its row order
    below it and how many equal it, counted against every column. Grid: (row blocks,)."""
    i = ts.block_id(0)
    n = X.shape[1]
    tiles = ts.cdiv(n, BN)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    col = ts.RegVec[ts.i32, BN]()
    gcol = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    sel = ts.RegTile[ts.bool_, BM, BN]()
    one = ts.RegTile[ts.i32, BM, BN]()
    ts.arange(col)

    def load_row_tile(dst, u):
        ts.load(dst, X, at=(i, u))
        ts.arange(gcol, u * BN)
        ts.lt(inside, gcol, n)
        ts.where(dst, ts.per_col(inside), dst, math.nan)   # padding: NaN, below / equal to nothing

    numbers = ts.RegVec[ts.i32, BM]()
    part = ts.RegVec[ts.i32, BM]()
    ts.zero(numbers)
    for u in ts.range(tiles):
        load_row_tile(x, u)
        ts.eq(hit, x, x)                                  # not NaN
        ts.where(one, hit, 1, 0)
        ts.row_sum(part, one)
        ts.add(numbers, numbers, part)
    m = ts.RegVec[ts.i32, BM]()
    if NAN == "omit":
        ts.copy(m, numbers)
    else:
        ts.fill(m, 0)
        ts.add(m, m, n)
    pos = ts.RegVec[ts.f64, BM]()
    ts.copy(pos, m - 1)
    ts.mul(pos, pos, q)                                   # q (m - 1), in f64 as torch
    lo, hi = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BM]()
    ts.copy(lo, pos)                                      # pos >= 0: truncation is the floor
    ts.min(hi, lo + 1, m - 1)
    frac = ts.RegVec[ts.f64, BM]()
    ts.copy(frac, lo)
    ts.sub(frac, pos, frac)
    vlo, vhi = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    ts.neg_infty(vlo)
    ts.neg_infty(vhi)
    less, same = ts.RegTile[ts.i32, BM, BN](), ts.RegTile[ts.i32, BM, BN]()
    tmp = ts.RegTile[ts.f32, BM, BN]()
    v = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.f32, BM]()
    for t in ts.range(tiles):
        load_row_tile(x, t)
        ts.zero(less)
        ts.zero(same)
        for u in ts.range(tiles):
            load_row_tile(y, u)
            for c in range(BN):
                ts.eq(sel, ts.per_col(col), c)
                ts.where(tmp, sel, y, 0.0)
                ts.row_sum(v, tmp)                        # y[:, c] (NaN stays NaN)
                ts.lt(hit, ts.per_row(v), x)
                ts.where(one, hit, 1, 0)
                ts.add(less, less, one)
                ts.eq(hit, ts.per_row(v), x)
                ts.where(one, hit, 1, 0)
                ts.add(same, same, one)
        for k, val in ((lo, vlo), (hi, vhi)):             # the number of rank k: less <= k < less + same
            ts.le(sel, less, ts.per_row(k))
            ts.gt(hit, less + same, ts.per_row(k))
            ts.logical_and(sel, sel, hit)
            ts.where(tmp, sel, x, -math.inf)
            ts.row_max(best, tmp)
            ts.max(val, val, best)
    out = ts.RegVec[ts.f64, BM]()
    d = ts.RegVec[ts.f64, BM]()
    ts.copy(out, vlo)
    ts.copy(d, vhi)
    ts.sub(d, d, out)
    ts.add(out, out, d * frac)
    bad = ts.RegVec[ts.bool_, BM]()
    if NAN == "omit":
        ts.eq(bad, numbers, 0)
    else:
        ts.lt(bad, numbers, n)
    ts.where(out, bad, math.nan, out)
    o = ts.RegVec[Y.dtype, BM]()
    ts.copy(o, out)
    ts.store(Y, o, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nan", ["propagate", "omit"])
@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_row_quantiles(backend, nan, dtype, rng):
    """Against torch.quantile / nanquantile in float64 of the same (rounded) inputs: small integers with some noise
    (many ties), a NaN in row 1, a row of NaN only (2), +inf (3), a row of -inf (4: lerp(-inf, -inf) is NaN in both),
    -inf first (5), NaN after two numbers (6: the omitted quantile of two), 19 columns over three tiles; q of 0, 0.3
    and 1 given as a Python float (one trace), the output f64."""
    R, n = 9, 19
    x = rng.integers(-5, 5, (R, n)) + (rng.uniform(size=(R, n)) < 0.3) * rng.standard_normal((R, n))
    x = torch.from_numpy(x).to(dtype)
    x[1, 3] = math.nan
    x[2, :] = math.nan
    x[3, 4] = math.inf
    x[4, :] = -math.inf
    x[5, 0] = -math.inf
    x[6, 2:] = math.nan
    fn = torch.nanquantile if nan == "omit" else torch.quantile
    for q in (0.0, 0.3, 1.0):
        y = poisoned(R, dtype=F64)
        launch(quantile, backend, x, y, q, NAN=nan)
        want = fn(x.double(), q, dim=1)
        torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9, equal_nan=True)
        assert y[2].isnan() and y[1].isnan() == (nan == "propagate")


@pytest.mark.parametrize("backend", BACKENDS)
def test_median_of_ragged_rows_into_f32(backend, rng):
    """q = 0.5 over even and odd lengths (the mean of the two middle numbers, and the middle one), one column (the
    number itself), rows not a multiple of the block; the output f32, a strided view of a wider buffer."""
    for n in (1, 2, 7, 16, 17):
        x = torch.from_numpy(rng.standard_normal((6, n))).float()
        buf = poisoned(6, 3)
        launch(quantile, backend, x, buf[:, 1], 0.5)
        close(buf[:, 1], torch.quantile(x.double(), 0.5, dim=1))
        assert buf[:, 0].isnan().all() and buf[:, 2].isnan().all()
