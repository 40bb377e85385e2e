"""Round 19 of held-out kernels, continued (see test_heldout_round19.py's docstring): the Thomas algorithm for batched
tridiagonal systems (LAPACK gtsv's job: a program per block of systems, (BM, 1) column tiles, a forward sweep over a
runtime n storing the modified super-diagonal and right-hand side, then a loop counting down reading back what the same
program stored; f32 and f64, n = 1, 2, 4, none; the diagonals as column slices of one (S, n, 3) tensor), with a GEMM
and an element-wise kernel of tiles narrower than 16 bytes a row for the same fix; escape-time
fractals (Mandelbrot and Julia sets: the plane's points made in the kernel from runtime float origins and steps, the
orbit frozen by where once |z| passes 2 and the iteration counted, in f32 and f64 where a float argument stays f64,
compared point for point with the same recurrence in NumPy of that dtype); a one-level 2-D Haar wavelet transform and
its inverse (the four polyphase planes as stride-2 views of the image, read and written; the orthonormal float
transform, and the integer lifting "S-transform" on u8, i8, i32 and i64 images with arithmetic shifts of negative
differences, reconstructing the image bit for bit); and launches that must be refused before any work, naming the
argument (a complex tensor where its planes belong, a NumPy array, a list, a tensor for a runtime float, a float for a
runtime int, tensors on two devices, a missing argument).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, launch

import tilestack.lang as ts
from tilestack.errors import LaunchError

U8 = torch.uint8
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261902)


# ---- 1. Thomas algorithm: batched tridiagonal solves -------------------------------------------------------------
@ts.kernel(grid=lambda B, BM: (ts.cdiv(B.shape[0], BM),))
def thomas(A, B, C, D, X, CP, *, BM: int = 8):
    """Solves a_k x_{k-1} + b_k x_k + c_k x_{k+1} = d_k for each of S systems (rows): A, B, C (S, n) the sub-, main
    and super-diagonals (A[:, 0] and C[:, n - 1] unread), D (S, n) the right-hand sides; X (S, n) the solutions, CP
    (S, n) scratch for the modified super-diagonal. No pivoting (diagonally dominant systems). Grid: (system
    blocks,)."""
    i = ts.block_id(0)
    dt = X.dtype
    a, b, c, d = (ts.RegTile[dt, BM, 1]() for _ in range(4))
    cp, dp, den, x = (ts.RegTile[dt, BM, 1]() for _ in range(4))
    ts.zero(cp)
    ts.zero(dp)
    n = B.shape[1]
    for k in ts.range(n):                                 # forward: c'_k = c_k / den, d'_k = (d_k - a_k d'_{k-1}) / den
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(i, k))
        ts.load(c, C, at=(i, k))
        ts.load(d, D, at=(i, k))
        ts.copy(den, b - a * cp)                          # den = b_k - a_k c'_{k-1}
        ts.copy(dp, (d - a * dp) / den)
        ts.copy(cp, c / den)
        ts.store(CP, cp, at=(i, k))
        ts.store(X, dp, at=(i, k))
    ts.zero(x)
    for k in ts.range(n - 1, -1, -1):                     # back substitution: x_k = d'_k - c'_k x_{k+1}
        ts.load(cp, CP, at=(i, k))
        ts.load(dp, X, at=(i, k))
        ts.copy(x, dp - cp * x)
        ts.store(X, x, at=(i, k))


def _tridiagonal(rng, S, n, dtype):
    """(S, n, 3) diagonals (sub, main, super) of diagonally dominant systems, and (S, n) right-hand sides."""
    diags = rng.standard_normal((S, n, 3))
    diags[..., 1] = rng.uniform(2.5, 4.0, (S, n)) * rng.choice([-1.0, 1.0], (S, n))
    return torch.from_numpy(diags).to(dtype), torch.from_numpy(rng.standard_normal((S, n))).to(dtype)


def _solve(diags, d):
    a, b, c = (diags[..., k].double() for k in range(3))
    m = torch.diag_embed(b) + torch.diag_embed(a[:, 1:], -1) + torch.diag_embed(c[:, :-1], 1)
    return torch.linalg.solve(m, d.double().unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("S", "n"), [(11, 13), (5, 2), (9, 4), (3, 1), (0, 4), (4, 0)])
def test_thomas_tridiagonal_solve(backend, dtype, S, n, rng):
    """Against torch.linalg.solve of the dense matrices in float64. The outputs are contiguous, so at n = 2 (f64) and
    n = 4 (f32) their rows are 16-byte aligned and Triton could address them with the copy engine: the (BM, 1) column
    tiles, 8 and 4 bytes wide, must go through pointers (they failed in Triton's compile: "Descriptor block shape
    must have at least 16 bytes in the last dimension"); there the diagonals are contiguous copies too (Triton uses
    the copy engine only when every tiled global allows it), elsewhere the strided slices diags[..., k]."""
    diags, d = _tridiagonal(rng, S, n, dtype)
    x = torch.full((S, n), math.nan, dtype=dtype)
    cp = torch.full((S, n), math.nan, dtype=dtype)
    a, b, c = (diags[..., k].contiguous() if n in (2, 4) else diags[..., k] for k in range(3))
    launch(thomas, backend, a, b, c, d, x, cp)
    if S and n:
        close(x, _solve(diags, d), scale=10)
        a, b, c = (diags[..., k].double() for k in range(3))
        want_cp = torch.zeros(S, n, dtype=F64)
        for k in range(n):                                # c'_k = c_k / (b_k - a_k c'_{k-1}), c'_{-1} = 0
            want_cp[:, k] = c[:, k] / (b[:, k] - a[:, k] * (want_cp[:, k - 1] if k else 0.0))
        close(cp, want_cp, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thomas_solves_in_place_of_its_right_hand_side(backend, rng):
    """X given as D itself (the solution overwrites the right-hand sides, as gtsv does): each program reads d_k
    before it writes x_k at the same place, so the result is the same."""
    diags, d = _tridiagonal(rng, 10, 9, F64)
    want = _solve(diags, d)
    cp = torch.full((10, 9), math.nan, dtype=F64)
    launch(thomas, backend, diags[..., 0], diags[..., 1], diags[..., 2], d, d, cp)
    close(d, want)


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def add_one(X, Y, *, BM: int = 4, BN: int = 8):
    """Y = X + 1 in Y's dtype (stored modulo 256 for u8 / i8). Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.i32, BM, BN]()
    ts.load(x, X, at=(i, j))
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(y, x + 1)
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [U8, I8, I32])
@pytest.mark.parametrize("BN", [1, 8, 16])
def test_narrow_integer_tiles_store_into_aligned_outputs(backend, dtype, BN):
    """(4, BN) tiles of 1-byte integers are BN bytes a row: under 16 for BN = 1 and 8, which Triton refused as a copy
    engine box when the output's rows were 16-byte aligned (a (H, 32) u8 image): they go through pointers now. 255 + 1
    wraps to 0 in u8, 127 + 1 to -128 in i8."""
    x = torch.arange(128, dtype=torch.int64).reshape(4, 32).to(U8 if dtype is U8 else I32) * 2 + 1
    x[0, 0] = 255 if dtype is U8 else 127
    y = torch.full((4, 32), 99, dtype=dtype)
    launch(add_one, backend, x, y, BN=BN)
    want = (x.long() + 1).to(dtype) if dtype is not I8 else torch.from_numpy(((x.numpy() + 1) % 256).astype(np.uint8)
                                                                               .view(np.int8).copy())
    assert torch.equal(y, want)
    assert y[0, 0].item() == (0 if dtype is U8 else -128 if dtype is I8 else 128)


@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def skinny_gemm(A, B, C, *, BM: int = 16, BN: int = 4, BK: int = 4):
    """C = A B with tiles thinner than a matrix unit's (products summed from their (M, K, N) products by the Triton
    backend), the operands staged in shared tiles. Grid: (M blocks, N blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16])
@pytest.mark.parametrize(("BM", "BN", "BK"), [(16, 4, 4), (16, 1, 8), (4, 8, 2)])
def test_skinny_tiles_load_into_shared_from_aligned_operands(backend, dtype, BM, BN, BK, rng):
    """Loads into shared tiles of 4, 8 or 16 bytes a row (an f16 (16, 4) A tile, a (8, 1) B column) from contiguous,
    16-byte aligned operands: through pointers, as the narrow stores (a copy-engine box of them failed to compile)."""
    a = torch.from_numpy(rng.standard_normal((32, 24))).to(dtype)
    b = torch.from_numpy(rng.standard_normal((24, 16))).to(dtype)
    c = torch.full((32, 16), math.nan, dtype=dtype)
    launch(skinny_gemm, backend, a, b, c, BM=BM, BN=BN, BK=BK)
    close(c, a.double() @ b.double(), scale=8)


# ---- 2. escape-time fractals -----------------------------------------------------------------------------------
@ts.kernel(grid=lambda N, BM, BN: (ts.cdiv(N.shape[0], BM), ts.cdiv(N.shape[1], BN)))
def escape_time(N, x0: float, y0: float, dx: float, dy: float, jr: float, ji: float, iters: int, *,
                DT: str = "f64", JULIA: bool = False, BM: int = 8, BN: int = 16):
    """N[r, c] = how many of the first ``iters`` iterates z_k (z_0 = 0 and c = p for Mandelbrot; z_0 = p and
    c = jr + i ji for Julia) have |z_k|^2 <= 4, p = (x0 + c dx) + i (y0 + r dy); the orbit stops once it escapes.
    Computed in DT. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    dt = ts.f64 if DT == "f64" else ts.f32
    r, c = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BN]()
    ts.arange(r, i * BM)
    ts.arange(c, j * BN)
    py, px = ts.RegVec[dt, BM](), ts.RegVec[dt, BN]()
    ts.copy(py, r)
    ts.copy(px, c)
    ts.mul(py, py, dy)
    ts.add(py, py, y0)
    ts.mul(px, px, dx)
    ts.add(px, px, x0)
    T = ts.RegTile[dt, BM, BN]
    pre, pim, zr, zi, cre, cim, nzr = T(), T(), T(), T(), T(), T(), T()
    ts.zero(pre)
    ts.add(pre, pre, ts.per_col(px))
    ts.zero(pim)
    ts.add(pim, pim, ts.per_row(py))
    if JULIA:
        ts.copy(zr, pre)
        ts.copy(zi, pim)
        ts.zero(cre)                                      # (fill takes constants: a runtime value is added)
        ts.add(cre, cre, jr)
        ts.zero(cim)
        ts.add(cim, cim, ji)
    else:
        ts.zero(zr)
        ts.zero(zi)
        ts.copy(cre, pre)
        ts.copy(cim, pim)
    count = ts.RegTile[ts.i32, BM, BN]()
    ts.zero(count)
    alive = ts.RegTile[ts.bool_, BM, BN]()
    for _ in ts.range(iters):
        ts.le(alive, zr * zr + zi * zi, 4.0)
        ts.where(count, alive, count + 1, count)
        ts.copy(nzr, zr * zr - zi * zi + cre)
        ts.where(zi, alive, zr * zi * 2.0 + cim, zi)
        ts.where(zr, alive, nzr, zr)
    ts.store(N, count, at=(i, j))


def _escape_ref(H, W, x0, y0, dx, dy, jr, ji, iters, dt, julia):
    """The same recurrence in NumPy of dtype ``dt``, operation for operation."""
    t = np.dtype(dt).type
    px = (np.arange(W).astype(dt) * t(dx) + t(x0))[None, :] + np.zeros((H, 1), dt)    # (H, W)
    py = (np.arange(H).astype(dt) * t(dy) + t(y0))[:, None] + np.zeros((1, W), dt)
    if julia:
        zr, zi, cre, cim = px, py, np.full((H, W), jr, dt), np.full((H, W), ji, dt)
    else:
        zr, zi, cre, cim = np.zeros((H, W), dt), np.zeros((H, W), dt), px, py
    count = np.zeros((H, W), np.int32)
    for _ in range(iters):
        alive = zr * zr + zi * zi <= t(4.0)
        count += alive
        nzr = zr * zr - zi * zi + cre
        zi = np.where(alive, zr * zi * t(2.0) + cim, zi)
        zr = np.where(alive, nzr, zr)
    return count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("DT", ["f64", "f32"])
@pytest.mark.parametrize("julia", [False, True])
def test_escape_time_fractals(backend, DT, julia):
    """Iteration counts equal point for point to NumPy's in the kernel's dtype: in f64 the float arguments
    (-2.1, 0.0801, ...: not f32 numbers) must reach the arithmetic as f64, or points near the set's edge would escape
    at another step; in f32 they are rounded to f32 once, as NumPy's float32 scalars. 23 x 37 points over 3 x 3
    programs, 60 iterations; the orbits that escape overflow nothing (frozen), the others stay bounded."""
    H, W, iters = 23, 37, 60
    args = (-2.1, -1.2, 0.0801, 0.1037, -0.8, 0.156) if not julia else (-1.6, -0.9, 0.0871, 0.0803, -0.8, 0.156)
    n = torch.full((H, W), -1, dtype=I32)
    launch(escape_time, backend, n, *args, iters, DT=DT, JULIA=julia)
    want = _escape_ref(H, W, *args, iters, np.float64 if DT == "f64" else np.float32, julia)
    assert np.array_equal(n.numpy(), want)
    assert 0 < (want == iters).sum() < want.size and (want < 5).sum() > 0     # inside, outside and the edge


@pytest.mark.parametrize("backend", BACKENDS)
def test_escape_time_edges(backend):
    """iters = 0 counts nothing; a negative count is an empty loop, as range(-3); a NaN origin counts the first
    iterate only (z_0 = 0 is inside, z_1 = NaN compares false); one point; no points (an empty grid)."""
    for iters, x0, shape, want in ((0, -0.5, (3, 5), 0), (-3, -0.5, (2, 2), 0), (9, math.nan, (4, 4), 1),
                                   (7, 0.0, (1, 1), 7), (5, 0.0, (0, 3), None)):
        n = torch.full(shape, -1, dtype=I32)
        launch(escape_time, backend, n, x0, 0.0, 0.01, 0.01, 0.0, 0.0, iters)
        assert want is None and n.numel() == 0 or n.eq(want).all(), (iters, x0, n)


# ---- 3. 2-D Haar wavelets: float and integer lifting -----------------------------------------------------------
def _planes(t):
    """The four polyphase planes of ``t`` (H, W): even and odd rows by even and odd columns, stride-2 views."""
    return t[0::2, 0::2], t[0::2, 1::2], t[1::2, 0::2], t[1::2, 1::2]


@ts.kernel(grid=lambda P, BM, BN: (ts.cdiv(P.shape[0], BM), ts.cdiv(P.shape[1], BN)))
def haar(P, Q, R, S, O0, O1, O2, O3, *, BM: int = 8, BN: int = 8):
    """The orthonormal 2-D Haar step, its own inverse: O0 = (p + q + r + s) / 2, O1 = (p - q + r - s) / 2,
    O2 = (p + q - r - s) / 2, O3 = (p - q - r + s) / 2. Forward: P..S the image's polyphase planes, O* the LL, LH,
    HL, HH bands; inverse: the bands in, the planes out. Grid: (row blocks, column blocks) of a plane."""
    i, j = ts.block_id(0), ts.block_id(1)
    p, q, r, s = (ts.RegTile[ts.f32, BM, BN]() for _ in range(4))
    for t, src in ((p, P), (q, Q), (r, R), (s, S)):
        ts.load(t, src, at=(i, j))
    o = ts.RegTile[O0.dtype, BM, BN]()
    for dst, sq, sr, ss in ((O0, 1, 1, 1), (O1, -1, 1, -1), (O2, 1, -1, -1), (O3, -1, -1, 1)):
        ts.copy(o, (p + q * sq + r * sr + s * ss) * 0.5)
        ts.store(dst, o, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF, F64])
@pytest.mark.parametrize(("H", "W"), [(22, 38), (2, 2), (0, 6)])
def test_haar_round_trip(backend, dtype, H, W, rng):
    """The bands against float64 hand sums of the planes, then the inverse written back through the image's stride-2
    views (every pixel written once: none stays NaN) and compared with the image; f64 images go through f32 tiles
    (f32's rounding, asserted as such)."""
    x = torch.from_numpy(rng.standard_normal((H, W))).to(dtype)
    p, q, r, s = (t.double() for t in _planes(x))
    bands = [torch.full((H // 2, W // 2), math.nan, dtype=dtype) for _ in range(4)]
    launch(haar, backend, *_planes(x), *bands)
    wants = ((p + q + r + s) / 2, (p - q + r - s) / 2, (p + q - r - s) / 2, (p - q - r + s) / 2)
    for got, want in zip(bands, wants, strict=True):
        close(got, want, dtype=torch.float32 if dtype is F64 else dtype, scale=2)
    y = torch.full((H, W), math.nan, dtype=dtype)
    launch(haar, backend, *bands, *_planes(y))
    assert not y.isnan().any()
    close(y, x.double(), dtype=torch.float32 if dtype is F64 else dtype, scale=4)


@ts.kernel(grid=lambda P, BM, BN: (ts.cdiv(P.shape[0], BM), ts.cdiv(P.shape[1], BN)))
def s_transform(P, Q, R, S, LL, LH, HL, HH, *, BM: int = 8, BN: int = 8):
    """The integer Haar (S-transform) by lifting, rows then columns: h = a - b, l = b + (h >> 1) (floor of the
    mean, by an arithmetic shift), lossless. P..S the polyphase planes, LL..HH i32 bands. Grid as haar's."""
    i, j = ts.block_id(0), ts.block_id(1)
    a, b, c, d = (ts.RegTile[ts.i32, BM, BN]() for _ in range(4))
    for t, src in ((a, P), (b, Q), (c, R), (d, S)):
        ts.load(t, src, at=(i, j))
    h1 = a - b
    l1 = b + (h1 >> 1)
    h2 = c - d
    l2 = d + (h2 >> 1)
    hl = l1 - l2
    hh = h1 - h2
    o = ts.RegTile[LL.dtype, BM, BN]()
    for dst, v in ((LL, l2 + (hl >> 1)), (LH, h2 + (hh >> 1)), (HL, hl), (HH, hh)):
        ts.copy(o, v)
        ts.store(dst, o, at=(i, j))


@ts.kernel(grid=lambda LL, BM, BN: (ts.cdiv(LL.shape[0], BM), ts.cdiv(LL.shape[1], BN)))
def s_inverse(LL, LH, HL, HH, P, Q, R, S, *, BM: int = 8, BN: int = 8):
    """s_transform's inverse: the lifting steps undone in reverse order, into the image's dtype."""
    i, j = ts.block_id(0), ts.block_id(1)
    ll, lh, hl, hh = (ts.RegTile[ts.i32, BM, BN]() for _ in range(4))
    for t, src in ((ll, LL), (lh, LH), (hl, HL), (hh, HH)):
        ts.load(t, src, at=(i, j))
    l2 = ll - (hl >> 1)
    l1 = hl + l2
    h2 = lh - (hh >> 1)
    h1 = hh + h2
    b = l1 - (h1 >> 1)
    d = l2 - (h2 >> 1)
    o = ts.RegTile[P.dtype, BM, BN]()
    for dst, v in ((P, h1 + b), (Q, b), (R, h2 + d), (S, d)):
        ts.copy(o, v)
        ts.store(dst, o, at=(i, j))


def _s_ref(x: np.ndarray):
    a, b, c, d = (t.astype(np.int64) for t in _planes(x))
    h1, h2 = a - b, c - d
    l1, l2 = b + (h1 >> 1), d + (h2 >> 1)
    hl, hh = l1 - l2, h1 - h2
    return l2 + (hl >> 1), h2 + (hh >> 1), hl, hh


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "lo", "hi"), [(U8, 0, 256), (I8, -128, 128), (I32, -2**20, 2**20),
                                                 (I64, -2**28, 2**28)])
def test_integer_s_transform_is_lossless(backend, dtype, lo, hi, rng):
    """The bands equal NumPy's int64 lifting exactly (negative differences shifted right round toward -inf, as
    NumPy's >>); the inverse rebuilds the image bit for bit through its stride-2 views. u8 pixels are read
    zero-extended (255 stays 255), i8 sign-extended; 26 x 18 images over 2 x 2 programs of 8 x 8."""
    x = torch.from_numpy(rng.integers(lo, hi, (26, 18))).to(dtype)
    x[0, 0], x[0, 1] = hi - 1, lo
    bands = [torch.full((13, 9), -999, dtype=I32) for _ in range(4)]
    launch(s_transform, backend, *_planes(x), *bands)
    for got, want in zip(bands, _s_ref(x.numpy()), strict=True):
        assert np.array_equal(got.numpy(), want)
    y = torch.full((26, 18), 77, dtype=dtype)
    launch(s_inverse, backend, *bands, *_planes(y))
    assert torch.equal(y, x)


# ---- 4. launches refused before any work -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_launches_name_the_argument(backend):
    """Each bad launch raises LaunchError naming the argument and what it expected, and leaves the output as it
    was (no program ran)."""
    from test_heldout_round19 import cgemm

    f = lambda *shape: torch.zeros(*shape)   # noqa: E731
    out = torch.full((8, 8), -5.0)
    planes = (f(8, 8), f(8, 8), f(8, 8), out, f(8, 8))
    cases = [
        ((torch.zeros(8, 8, dtype=torch.complex64), *planes), ["AR", "complex64", "float32"]),
        ((np.zeros((8, 8), np.float32), *planes), ["AR", "torch.Tensor", "ndarray"]),
        (([[0.0] * 8] * 8, *planes), ["AR", "list"]),
        ((f(8, 8), f(8, 8).to("meta"), f(8, 8), f(8, 8), out, f(8, 8)), ["AI on meta", "one device"]),
        ((f(8, 8), f(8, 8), f(8, 8), f(8, 8), out), ["missing", "CI"]),
    ]
    for args, words in cases:
        with pytest.raises(LaunchError) as e:
            launch(cgemm, backend, *args)
        assert all(w in str(e.value) for w in words), (words, str(e.value))
    assert out.eq(-5.0).all()
    n = torch.full((4, 4), -1, dtype=I32)
    for args, words in (((n, torch.tensor(0.5), 0.0, 0.1, 0.1, 0.0, 0.0, 5), ["x0", "runtime float", "Tensor"]),
                        ((n, 0.5, 0.0, 0.1, 0.1, 0.0, 0.0, 5.0), ["iters", "runtime int", "float"]),
                        ((n, 0.5, 0.0, 0.1, 0.1, 0.0, 0.0, True), ["iters", "runtime int", "bool"]),
                        ((n, "0.5", 0.0, 0.1, 0.1, 0.0, 0.0, 5), ["x0", "str"]),
                        ((n, 0.5, 0.0, 0.1, 0.1, 0.0, 0.0, 2**70), ["iters", "64 bits"])):
        with pytest.raises(LaunchError) as e:
            launch(escape_time, backend, *args)
        assert all(w in str(e.value) for w in words), (words, str(e.value))
    assert n.eq(-1).all()
