"""More of round 24's held-out kernels (test_heldout_round24.py has the first), on the reference executor and Triton's
interpreter against exact Python integers or float64 torch, outputs poisoned first: the GCD and LCM of integer pairs
by Euclid's algorithm in a runtime loop of masked steps (i8, u8, i32, i64; signs, zeros, Fibonacci pairs that need
every trip, values past 2**62); SDDMM over a COO list (one program per edge, the row and column read by load_scalar
and used as the coordinates of one-row tiles, index tensors of i32 and i64, padding edges of index -1 reading zeros,
a scale, operands of two dtypes); and Morton (Z-order) codes, 2-D in i32 (codes past 2**31 wrap to negatives and
decode back by arithmetic shifts masked) and 3-D in i64 from i32 coordinates. Then misuse refused with the argument
named (the coordinates shown by their names, a float coordinate by the argument it came from: both fixed this round),
a softmax under per-row temperatures and a boolean mask read from memory (the Gluon backend computed every pointer
offset of it in 64 bits and spilled: now 32 bits where the launch's tensors allow, fixed this round),
and this round's kernels compiled for sm_90a through the Triton and Gluon backends.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, launch, meta, randn, wrap

import tilestack.lang as ts

F32 = torch.float32
U8 = torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262402)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def sentinel(dtype):
    return -7 if dtype is not U8 else 201


# ---- 1. GCD and LCM by Euclid's algorithm in a runtime loop ----------------------------------------------------------
@ts.kernel(grid=lambda A, BN: (ts.cdiv(A.shape[0], BN),))
def gcd_lcm(A, B, G, L, steps: int, *, BN: int = 64):
    """G = gcd(|A|, |B|) and L = |A| / G * |B| (0 where G is 0) elementwise, by ``steps`` trips of
    (a, b) <- (b, a % b) where b != 0 (elements already done keep a, b = 0; a zero divisor is replaced by 1 and its
    result dropped)."""
    i = ts.block_id(0)
    T = A.dtype
    a, b = ts.RegVec[T, BN](), ts.RegVec[T, BN]()
    ts.load(a, A, at=(i,))
    ts.load(b, B, at=(i,))
    ts.abs(a, a)
    ts.abs(b, b)
    a0, b0 = ts.RegVec[T, BN](), ts.RegVec[T, BN]()
    ts.copy(a0, a)
    ts.copy(b0, b)
    going = ts.RegVec[ts.bool_, BN]()
    safe, r = ts.RegVec[T, BN](), ts.RegVec[T, BN]()
    for _ in ts.range(steps):
        ts.ne(going, b, 0)
        ts.where(safe, going, b, 1)
        ts.rem(r, a, safe)
        ts.where(a, going, b, a)
        ts.where(b, going, r, 0)
    ts.store(G, a, at=(i,))
    ts.ne(going, a, 0)
    ts.where(safe, going, a, 1)
    ts.div(r, a0, safe)
    ts.mul(r, r, b0)
    ts.where(r, going, r, 0)
    ts.store(L, r, at=(i,))


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def gcd_case(rng, dtype, n=150):
    info = torch.iinfo(dtype)
    lo, hi = (0, 256) if dtype is U8 else (-info.max, info.max + 1)
    small = 1 << min(8 * info.bits // 2, 20)
    a = rng.integers(lo, hi, n, dtype=np.int64)
    b = rng.integers(lo, hi, n, dtype=np.int64)
    g = rng.integers(1, 8, n, dtype=np.int64)   # shared factors: gcds above 1
    if dtype is not U8 and dtype is not I8:
        a[: n // 3] = rng.integers(-small, small, n // 3) * g[: n // 3]
        b[: n // 3] = rng.integers(-small, small, n // 3) * g[: n // 3]
    k = {I8: 11, U8: 13, I32: 46, I64: 92}[dtype]      # the largest Fibonacci pair of the dtype: k - 1 steps
    extra = [(0, 0), (0, 5), (-5, 0), (fib(k), fib(k - 1)), (fib(k - 1), fib(k)), (1, 1), (-12, 18), (info.max, 1)]
    if dtype is not U8:
        extra += [(-info.max, info.max), (-1, -1)]
    a = np.concatenate([a, [x for x, _ in extra]])
    b = np.concatenate([b, [y for _, y in extra]])
    return torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype), k


def gcd_want(a, b, bits, unsigned=False):
    g, lcm = [], []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        gg = math.gcd(x, y)
        g.append(gg)
        v = abs(x) // gg * abs(y) if gg else 0
        lcm.append(v % (1 << bits) if unsigned else wrap(v, bits))
    return g, lcm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [I32, I64, I8, U8])
def test_gcd_and_lcm_by_euclid(backend, dtype, rng):
    """Exact against math.gcd (and the LCM wrapped to the dtype as the GPU's product wraps: i8 and u8 tiles work in
    i32 and are stored modulo 2**8); Fibonacci pairs need every trip of the loop: one fewer leaves them unfinished."""
    a, b, k = gcd_case(rng, dtype)
    n = a.shape[0]
    g, lcm = torch.full((n,), sentinel(dtype), dtype=dtype), torch.full((n,), sentinel(dtype), dtype=dtype)
    launch(gcd_lcm, backend, a, b, g, lcm, k)
    bits = 8 * a.element_size()
    want_g, want_l = gcd_want(a, b, bits, dtype is U8)
    assert g.tolist() == [w if dtype is U8 else wrap(w, bits) for w in want_g]
    assert lcm.tolist() == want_l
    # (F(k), F(k - 1)) reaches (F(3), F(2)) = (2, 1) after k - 3 trips: not done, a is still 2
    j = int(np.flatnonzero((a.numpy().astype(np.int64) == fib(k)) & (b.numpy().astype(np.int64) == fib(k - 1)))[0])
    g2 = torch.full((n,), sentinel(dtype), dtype=dtype)
    launch(gcd_lcm, backend, a, b, g2, torch.empty_like(lcm), k - 3)
    assert g[j].item() == 1 and g2[j].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gcd_of_empty_and_with_no_trips(backend):
    """No elements: nothing written; 0 trips: G = |A| and L = |B| (|A| / |A| * |B|, or 0 where A is 0)."""
    launch(gcd_lcm, backend, torch.empty(0, dtype=I32), torch.empty(0, dtype=I32), torch.empty(0, dtype=I32),
           torch.empty(0, dtype=I32), 5)
    a, b = torch.tensor([-6, 0, 9], dtype=I64), torch.tensor([4, 7, -3], dtype=I64)
    g, lcm = torch.full((3,), -7, dtype=I64), torch.full((3,), -7, dtype=I64)
    launch(gcd_lcm, backend, a, b, g, lcm, 0)
    assert g.tolist() == [6, 0, 9] and lcm.tolist() == [4, 0, 3]


# ---- 2. SDDMM over a COO list: OUT[e] = scale * A[ROWS[e]] . B[COLS[e]] ----------------------------------------------
@ts.kernel(grid=lambda ROWS: (ROWS.shape[0],))
def sddmm_coo(A, B, ROWS, COLS, OUT, scale: float, *, BK: int = 32):
    """One program per edge e: the row r = ROWS[e] of A (M, K) and c = COLS[e] of B (N, K) as one-row tiles whose
    tile coordinate is the row itself, K walked in BK columns (a ragged last one reads zeros), summed in f32. An
    index of -1 (padding) reads a row of zeros: OUT[e] = 0."""
    e = ts.block_id(0)
    r, c = ts.load_scalar(ROWS, e), ts.load_scalar(COLS, e)
    x, y = ts.RegTile[A.dtype, 1, BK](), ts.RegTile[B.dtype, 1, BK]()
    xf, yf = ts.RegTile[ts.f32, 1, BK](), ts.RegTile[ts.f32, 1, BK]()
    acc = ts.RegVec[ts.f32, 1]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(x, A, at=(r, k))
        ts.load(y, B, at=(c, k))
        ts.copy(xf, x)
        ts.copy(yf, y)
        ts.mul(xf, xf, yf)
        ts.row_sum(acc, xf, acc)
    ts.mul(acc, acc, scale)
    out = ts.RegVec[OUT.dtype, 1]()
    ts.copy(out, acc)
    ts.store(OUT, out, at=(e,))


def coo_case(rng, M, N, E, idtype, pad=3):
    rows = rng.integers(0, M, E)
    cols = rng.integers(0, N, E)
    rows[:2], cols[:2] = M - 1, N - 1            # the last row and column
    if E > pad:
        rows[-pad:], cols[-pad:] = -1, -1        # padding edges
    return torch.from_numpy(rows).to(idtype), torch.from_numpy(cols).to(idtype)


def sddmm_ref(a, b, rows, cols, scale):
    ad, bd = a.double(), b.double()
    r, c = rows.long(), cols.long()
    out = (ad[r.clamp_min(0)] * bd[c.clamp_min(0)]).sum(1) * scale
    return torch.where((r < 0) | (c < 0), 0.0, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("adtype", "bdtype", "odtype"), [(F32, F32, F32), (BF, F16, F32), (F16, F16, BF),
                                                          (F64, F32, F64)])
@pytest.mark.parametrize("idtype", [I32, I64])
@pytest.mark.parametrize(("M", "N", "K", "E"), [(37, 23, 70, 40), (5, 1, 3, 6), (1, 9, 32, 1)])
def test_sddmm_coo(backend, adtype, bdtype, odtype, idtype, M, N, K, E, rng):
    """Ragged K (70 in 32s, 3), repeated and last-row edges, padding edges of -1 at the end; operands of two dtypes
    (bf16 with f16, f64 with f32: each converted to f32 in the kernel), outputs of f32, bf16 and f64."""
    a, b = randn(rng, M, K, dtype=adtype), randn(rng, N, K, dtype=bdtype)
    rows, cols = coo_case(rng, M, N, E, idtype)
    out = poisoned(E, dtype=odtype)
    launch(sddmm_coo, backend, a, b, rows, cols, out, 0.125)
    want = sddmm_ref(a.float(), b.float(), rows, cols, 0.125)
    close(out, want, dtype=odtype if odtype is not F64 else F32, scale=4)
    if E > 3:
        assert (out[-3:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idtype", [I32, I64])
def test_sddmm_coo_indices_past_either_end_read_zeros(backend, idtype):
    """Indices past M or N, far past (2**40, 2**33: past 32 bits, as a stale id from memory), and far before 0 read
    rows of zeros: OUT is 0 there, and the edges in range are right."""
    g = torch.Generator().manual_seed(2403)
    a, b = torch.randn(5, 40, generator=g), torch.randn(6, 40, generator=g)
    far = [2**40, -2**40, 2**33] if idtype is I64 else [2**31 - 1, -2**31, 2**30]
    rows = torch.tensor([0, 5, *far, -1, 4, 4], dtype=idtype)
    cols = torch.tensor([0, 0, 1, 2, 1, 3, 5, 6], dtype=idtype)
    out = poisoned(8)
    launch(sddmm_coo, backend, a, b, rows, cols, out, 1.0)
    want = torch.zeros(8, dtype=F64)
    want[0], want[6] = a[0].double() @ b[0].double(), a[4].double() @ b[5].double()
    close(out, want, scale=2)
    assert (out[1:6] == 0).all() and out[7] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sddmm_coo_extremes_and_no_edges(backend):
    """Products past f16's range summed in f32 (f16 operands of 6e4: 3.6e9 each); an inf operand gives inf, inf times
    0 NaN, as torch's; no edges: no programs."""
    a = torch.tensor([[6e4, 6e4, 0.0], [math.inf, 1.0, 0.0]], dtype=F16)
    b = torch.tensor([[6e4, -6e4, 6e4], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F16)
    rows, cols = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 2, 1, 2, 0])
    out = poisoned(5)
    launch(sddmm_coo, backend, a, b, rows, cols, out, 1.0)
    want = sddmm_ref(a.float(), b.float(), rows, cols, 1.0)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out[~torch.isnan(want)].double(), want[~torch.isnan(want)])
    launch(sddmm_coo, backend, a, b, torch.empty(0, dtype=I64), torch.empty(0, dtype=I64), torch.empty(0), 1.0)


# ---- 3. Morton (Z-order) codes --------------------------------------------------------------------------------------
SPREAD2 = ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555))
SPREAD3 = ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F), (4, 0x10C30C30C30C30C3),
           (2, 0x1249249249249249))


def _spread(x, t, table) -> None:
    """Put a zero bit (2-D) or two (3-D) between the bits of x, in place: x = (x | x << s) & mask for each step."""
    for s, mask in table:
        ts.shl(t, x, s)
        ts.bit_or(x, x, t)
        ts.bit_and(x, x, mask)


def _compact(x, t, table) -> None:
    """_spread's inverse: x = (x | x >> s) & mask, the table walked backwards with each step's mask the one before it
    (the last the coordinate's own bits). x holds only the spread bits, so an arithmetic shift brings in no sign bit
    past the masks."""
    masks = [m for _, m in table][:-1][::-1] + [LOW[len(table)]]
    for (s, _), mask in zip(reversed(table), masks, strict=True):
        ts.shr(t, x, s)
        ts.bit_or(x, x, t)
        ts.bit_and(x, x, mask)


LOW = {4: 0xFFFF, 5: 0x1FFFFF}


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def morton2d(X, Y, Z, XO, YO, *, BN: int = 64):
    """Z = the 2-D Morton code of 16-bit coordinates (X, Y) in i32 (x's bits at even positions, y's at odd: a code of
    y >= 2**15 has bit 31 set, a negative i32); XO, YO = the coordinates decoded back from Z."""
    i = ts.block_id(0)
    x, y, t = ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN](), ts.RegVec[ts.i32, BN]()
    ts.load(x, X, at=(i,))
    ts.load(y, Y, at=(i,))
    ts.bit_and(x, x, 0xFFFF)
    ts.bit_and(y, y, 0xFFFF)
    _spread(x, t, SPREAD2)
    _spread(y, t, SPREAD2)
    z = ts.RegVec[ts.i32, BN]()
    ts.shl(y, y, 1)
    ts.bit_or(z, x, y)
    ts.store(Z, z, at=(i,))
    ts.bit_and(x, z, 0x55555555)
    ts.shr(y, z, 1)                               # arithmetic: bit 31 fills in, the mask clears it
    ts.bit_and(y, y, 0x55555555)
    _compact(x, t, SPREAD2)
    _compact(y, t, SPREAD2)
    ts.store(XO, x, at=(i,))
    ts.store(YO, y, at=(i,))


@ts.kernel(grid=lambda P, BN: (ts.cdiv(P.shape[0], BN),))
def morton3d(P, Z, PO, *, BN: int = 32):
    """Z = the 3-D Morton code (i64, 63 bits) of the 21-bit coordinates P (n, 3) of any integer dtype; PO (n, 3) the
    coordinates decoded back. The coordinates come in as a (BN, 4) tile (the 4th column past the edge reads 0), each
    column picked out by a mask and a row sum in i64."""
    i = ts.block_id(0)
    p = ts.RegTile[ts.i64, BN, 4]()
    ts.load(p, P, at=(i, 0))
    cols = ts.RegVec[ts.i32, 4]()
    ts.arange(cols)
    pick = ts.RegTile[ts.bool_, BN, 4]()
    sel = ts.RegTile[ts.i64, BN, 4]()
    z, c, t = ts.RegVec[ts.i64, BN](), ts.RegVec[ts.i64, BN](), ts.RegVec[ts.i64, BN]()
    ts.zero(z)
    for d in range(3):
        ts.eq(pick, ts.per_col(cols), d)
        ts.where(sel, pick, p, 0)
        ts.row_sum(c, sel)
        ts.bit_and(c, c, 0x1FFFFF)
        _spread(c, t, SPREAD3)
        ts.shl(c, c, d)
        ts.bit_or(z, z, c)
    ts.store(Z, z, at=(i,))
    out = ts.RegTile[PO.dtype, BN, 4]()
    back = ts.RegTile[ts.i64, BN, 4]()
    ts.zero(back)
    for d in range(3):
        ts.shr(c, z, d)
        ts.bit_and(c, c, 0x1249249249249249)
        _compact(c, t, SPREAD3)
        ts.eq(pick, ts.per_col(cols), d)
        ts.where(back, pick, ts.per_row(c), back)
    ts.copy(out, back)
    ts.store(PO, out, at=(i, 0))


def interleave(coords, bits) -> int:
    """The Morton code of ``coords`` by hand: bit b of coordinate d goes to bit b * len(coords) + d."""
    code = 0
    for b in range(bits):
        for d, v in enumerate(coords):
            code |= ((v >> b) & 1) << (b * len(coords) + d)
    return code


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [200, 1, 64])
def test_morton2d_round_trip(backend, n, rng):
    """Exact codes against a bit-by-bit interleave (as signed i32: y >= 2**15 makes a negative code), and the
    decoded coordinates equal to the inputs; corners 0 and 0xFFFF (code -1)."""
    x = rng.integers(0, 1 << 16, n)
    y = rng.integers(0, 1 << 16, n)
    x[:1], y[:1] = 0xFFFF, 0xFFFF
    if n > 2:
        x[1], y[1] = 0, 0xFFFF
        x[2], y[2] = 0xFFFF, 0
    X, Y = torch.from_numpy(x).to(I32), torch.from_numpy(y).to(I32)
    z, xo, yo = (torch.full((n,), -7, dtype=I32) for _ in range(3))
    launch(morton2d, backend, X, Y, z, xo, yo)
    assert z.tolist() == [wrap(interleave((a, b), 16), 32) for a, b in zip(x.tolist(), y.tolist(), strict=True)]
    assert torch.equal(xo, X) and torch.equal(yo, Y)
    assert z[0].item() == -1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [I32, I64])
@pytest.mark.parametrize("n", [77, 1])
def test_morton3d_round_trip(backend, dtype, n, rng):
    """63-bit codes (past 2**53: exact integer work, not floats) from i32 or i64 coordinates; a (n, 3) output of the
    coordinates' dtype, its 4th tile column past the edge never written."""
    p = rng.integers(0, 1 << 21, (n, 3))
    p[0] = (1 << 21) - 1
    P = torch.from_numpy(p).to(dtype)
    z = torch.full((n,), -7, dtype=I64)
    po = torch.full((n, 3), -7, dtype=dtype)
    launch(morton3d, backend, P, z, po)
    assert z.tolist() == [interleave(tuple(r), 21) for r in p.tolist()]
    assert z[0].item() == (1 << 63) - 1
    assert torch.equal(po, P)


# ---- 4. misuse: refused with the argument named, before anything is written -----------------------------------------
from test_heldout_round24 import mgs_qr, power_iteration, qr_lstsq, suffix_tile_sums, summed_area  # noqa: E402

from tilestack.errors import BackendError, LaunchError, TileShapeError, TraceError  # noqa: E402


def _refused(exc, pattern, kernel, backend, *args, **consts):
    with pytest.raises(exc, match=pattern):
        launch(kernel, backend, *args, **consts)
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() and a.device.type == "cpu":
            assert torch.isnan(a).all() or not torch.isnan(a).any(), "an output was partly written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_misuse_is_refused_naming_the_argument(backend):
    img, out = poisoned(1, 5, 5), poisoned(1, 5, 5)
    _refused(LaunchError, r"X\.shape\[2\]: argument X has rank 2 \(axes 0 to 1\), so it has no axis 2", summed_area,
             backend, poisoned(5, 5), poisoned(5, 5))
    _refused(TraceError, r"store: at=\(n, i, j\) has 3 coordinates but `S` has rank 2", summed_area, backend, img,
             poisoned(5, 5))
    _refused(LaunchError, r"summed_area: argument X has dtype torch\.int16, which tiles cannot hold", summed_area,
             backend, torch.zeros(1, 5, 5, dtype=torch.int16), out)
    _refused(TileShapeError, r"RegTile sizes are positive compile-time ints .*got 0", summed_area, backend, img, out,
             BM=0)
    _refused(LaunchError, r"summed_area: constant BM is declared int; got str '16'", summed_area, backend, img, out,
             BM="16")
    a, v, lam = poisoned(1, 5, 5), poisoned(1, 5), poisoned(1, 1)
    _refused(LaunchError, r"power_iteration: argument iters is a runtime int; got float 2\.5", power_iteration,
             backend, a, v, lam, 2.5)
    _refused(LaunchError, r"power_iteration takes 4 arguments \(A, V, LAM, iters\); got 3, missing \['iters'\]",
             power_iteration, backend, a, v, lam)
    _refused(LaunchError, r"mgs_qr: all tensors must be on one device; got A on meta, Q on cpu, R on cpu", mgs_qr,
             backend, meta(1, 5, 5), poisoned(1, 5, 5), poisoned(1, 5, 5))
    i32 = torch.zeros(4, dtype=I32)
    _refused(LaunchError, r"gcd_lcm: argument steps is a runtime int; got bool True", gcd_lcm, backend, i32, i32,
             i32.clone(), i32.clone(), True)
    x, y, o = poisoned(4, 4), poisoned(4, 4), poisoned(3)
    idx = torch.zeros(3, dtype=I64)
    _refused(TraceError, r"load: at\[0\] must be an index, got a float scalar \(ts\.load_scalar of `ROWS`, a float "
             r"tensor\)", sddmm_coo, backend, x, y, torch.zeros(3), idx, o, 1.0)
    _refused(TraceError, r"load_scalar: 1 indices for `COLS` of rank 2", sddmm_coo, backend, x, y, idx,
             idx[:, None], o, 1.0)
    _refused(TraceError, r"load: at=\(r, k\) has 2 coordinates but `A` has rank 3", sddmm_coo, backend,
             poisoned(1, 4, 4), y, idx, idx, o, 1.0)
    _refused(LaunchError, r"sddmm_coo: argument scale is a runtime float; got str '1\.0'", sddmm_coo, backend, x, y,
             idx, idx, o, "1.0")
    assert torch.isnan(o).all() and torch.isnan(out).all() and torch.isnan(v).all()


@ts.kernel(grid=(1,))
def row_at(X, Y, r: float, *, BN: int = 16):
    """Y = row r of X, with r (wrongly) a float argument: refused, naming it."""
    t = ts.RegTile[X.dtype, 1, BN]()
    ts.load(t, X, at=(r, 0))
    ts.store(Y, t, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_argument_as_a_coordinate_is_refused_naming_it(backend):
    y = poisoned(1, 16)
    _refused(TraceError, r"load: at\[0\] must be an index, got a float scalar \(the float argument `r`\)", row_at,
             backend, poisoned(4, 16), y, 2.0)
    assert torch.isnan(y).all()


def test_a_trace_refuses_arguments_of_another_dtype_or_rank():
    a, v, lam = torch.eye(4).reshape(1, 4, 4), poisoned(1, 4), poisoned(1, 1)
    tr = power_iteration.trace(a, v, lam, 3, BN=16)
    with pytest.raises(LaunchError, match=r"argument A is torch\.float16; this trace of power_iteration is for f32"):
        tr.run(a.half(), v, lam, 3, backend="reference")
    with pytest.raises(LaunchError, match=r"argument V has rank 1 \(shape \(4,\)\); this trace is for rank 2"):
        tr.run(a, v[0], lam, 3, backend="reference")
    assert torch.isnan(v).all()


def test_the_triton_backend_refuses_a_tile_of_three_columns_naming_it():
    """The reference executor runs any tile size; Triton's needs powers of two, and says which tile."""
    p = torch.zeros(4, 3, dtype=I32)
    z, po = torch.full((4,), -7, dtype=I64), torch.full((4, 3), -7, dtype=I32)
    with pytest.raises(BackendError, match=r"test_heldout_round24_more\.py:\d+: the Triton backend needs power-of-two "
                                           r"tile sizes; load uses a RegTile\[i64, 3, 4\]"):
        launch(morton3d, "triton", p, z, po, BN=3)
    assert (z == -7).all()
    launch(morton3d, "reference", p, z, po, BN=3)
    assert (z == 0).all() and (po == 0).all()


# ---- 5. this round's kernels compiled for Hopper (sm_90a) on this CPU -----------------------------------------------
def _aot_cases():
    from heldout_support import F64 as D
    return {   # name -> (kernel, meta args, constants): serving-sized problems
        "summed_area_u8": (summed_area, (meta(16, 1080, 1920, dtype=U8), meta(16, 1080, 1920)), dict(BM=32, BN=64)),
        "power_iteration": (power_iteration, (meta(4096, 64, 64), meta(4096, 64), meta(4096, 1), 50), dict(BN=64)),
        "power_iteration_f64": (power_iteration, (meta(4096, 32, 32, dtype=D), meta(4096, 32, dtype=D),
                                                  meta(4096, 1, dtype=D), 50), dict(BN=32)),
        "mgs_qr_bf16": (mgs_qr, (meta(4096, 64, 32, dtype=BF), meta(4096, 64, 32), meta(4096, 32, 32)),
                        dict(BM=64, BN=32)),
        "qr_lstsq_f64": (qr_lstsq, (meta(4096, 32, 16, dtype=D), meta(4096, 32, dtype=D), meta(4096, 16, dtype=D)),
                         dict(BM=32, BN=16)),
        "gcd_lcm_i64": (gcd_lcm, (*(meta(1 << 24, dtype=I64) for _ in range(4)), 92), dict(BN=512)),
        "gcd_lcm_u8": (gcd_lcm, (*(meta(1 << 24, dtype=U8) for _ in range(4)), 13), dict(BN=1024)),
        "sddmm_coo": (sddmm_coo, (meta(65536, 4096, dtype=BF), meta(65536, 4096, dtype=F16), meta(1 << 20, dtype=I64),
                                  meta(1 << 20, dtype=I64), meta(1 << 20, dtype=BF), 0.125), dict(BK=256)),
        "morton2d": (morton2d, tuple(meta(1 << 24, dtype=I32) for _ in range(5)), dict(BN=1024)),
        "morton3d": (morton3d, (meta(1 << 24, 3, dtype=I32), meta(1 << 24, dtype=I64), meta(1 << 24, 3, dtype=I32)),
                     dict(BN=256)),
        "suffix_tile_sums": (suffix_tile_sums, (meta(8192, 8192, dtype=BF), meta(128, 8192)),
                             dict(BM=64, BN=64, STEP=2)),
    }


AOT_NAMES = ["summed_area_u8", "power_iteration", "power_iteration_f64", "mgs_qr_bf16", "qr_lstsq_f64", "gcd_lcm_i64",
             "gcd_lcm_u8", "sddmm_coo", "morton2d", "morton3d", "suffix_tile_sums"]


@pytest.mark.parametrize("name", AOT_NAMES)
def test_round24_compiles_for_sm90a_with_triton(name):
    from sm90a_compile import check_triton_sm90a
    check_triton_sm90a(*_aot_cases()[name])


@pytest.mark.parametrize("name", [n for n in AOT_NAMES if n != "summed_area_u8"])
def test_round24_compiles_for_sm90a_with_gluon(name):
    """One warpgroup; no spills, no serialized wgmma (none of these multiplies on wgmma)."""
    from heldout_support import gluon_resources_one_warpgroup
    res = gluon_resources_one_warpgroup(*_aot_cases()[name])
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]


def test_gluon_refuses_the_summed_area_tables_f32_products_by_name():
    """The table's in-tile prefix multiplies f32 tiles (exact f32 products: the ieee default); wgmma takes 16- and
    8-bit operands, so the Gluon backend refuses it at the user's line, saying how to go on."""
    from tilestack.backends import get_backend
    kernel, args, consts = _aot_cases()["summed_area_u8"]
    with pytest.raises(BackendError, match=r"test_heldout_round24\.py:\d+: the gluon backend multiplies "
                                           r"bf16/f16/f8e4m3 tiles on wgmma; mma has f32 operands"):
        get_backend("gluon").source(kernel.trace(*args, **consts))


# ---- 6. softmax under a per-row temperature and a boolean mask read from memory; Gluon's 32-bit offsets -------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def masked_temp_softmax(X, MASK, TEMP, Y, *, BM: int = 16, BN: int = 32):
    """Y = softmax(X / TEMP[:, None] where MASK else -inf) along rows wider than a tile: an online max and sum over
    the column tiles, then a second pass that writes; the temperatures staged once in a shared vector; rows with
    nothing kept (and columns past N) give 0, not NaN."""
    i = ts.block_id(0)
    tv = ts.SharedVec[TEMP.dtype, BM]()
    ts.load(tv, TEMP, at=(i,))
    t = ts.RegVec[ts.f32, BM]()
    x = ts.RegTile[ts.f32, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    m, s, mt, alpha = (ts.RegVec[ts.f32, BM]() for _ in range(4))
    fin = ts.RegVec[ts.bool_, BM]()
    ts.neg_infty(m)
    ts.zero(s)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(t, tv)
        ts.load(x, X, at=(i, j))
        ts.load(keep, MASK, at=(i, j))
        ts.div(x, x, ts.per_row(t))
        ts.where(x, keep, x, -math.inf)
        ts.row_max(mt, x, m)
        ts.gt(fin, mt, -math.inf)                     # a row with something kept so far
        ts.sub(alpha, m, mt)
        ts.where(alpha, fin, alpha, 0.0)              # (-inf - -inf: no rescale)
        ts.exp(alpha, alpha)
        ts.mul(s, s, alpha)
        ts.where(mt, fin, mt, 0.0)
        ts.sub(x, x, ts.per_row(mt))
        ts.exp(x, x)
        ts.row_sum(s, x, s)
        ts.where(m, fin, mt, m)
    out = ts.RegTile[Y.dtype, BM, BN]()
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(t, tv)
        ts.load(x, X, at=(i, j))
        ts.load(keep, MASK, at=(i, j))
        ts.div(x, x, ts.per_row(t))
        ts.sub(x, x, ts.per_row(m))
        ts.exp(x, x)
        ts.div(x, x, ts.per_row(s))
        ts.where(x, keep, x, 0.0)
        ts.copy(out, x)
        ts.store(Y, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("xdtype", "ydtype"), [(F32, F32), (BF, BF), (F16, F32)])
@pytest.mark.parametrize(("M", "N"), [(37, 100), (5, 1)])
def test_masked_softmax_with_row_temperatures(backend, xdtype, ydtype, M, N, rng):
    """Against float64 torch: ragged rows and columns, temperatures from 0.05 to 2 (logits up to 200), a row with
    nothing kept (zeros), a row keeping only its last column (1 there), logits of +-3e4 kept and masked."""
    x = randn(rng, M, N, dtype=F64) * 5
    mask = torch.from_numpy(rng.random((M, N)) > 0.3)
    if M > 5:
        mask[3] = False
        mask[5] = False
        mask[5, N - 1] = True
        x[4, 0], x[4, -1] = 3e4, -3e4
    x = x.to(xdtype)
    temp = torch.from_numpy(rng.uniform(0.05, 2.0, M)).float()
    y = poisoned(M, N, dtype=ydtype)
    launch(masked_temp_softmax, backend, x, mask, temp, y)
    z = (x.double() / temp.double()[:, None]).masked_fill(~mask, -math.inf)
    want = torch.softmax(z, 1).nan_to_num(0.0)
    close(y, want)
    if M > 5:
        assert (y[3] == 0).all() and y[5, N - 1] == 1 and (y[5, :N - 1] == 0).all()


def test_gluon_offsets_are_32_bit_where_the_launchs_tensors_allow():
    """The Gluon backend computed every pointer offset in 64 bits: a (64, 128) tile's offsets took two registers an
    element, and this softmax spilled 928 bytes a thread at one warpgroup where the Triton backend (32-bit offsets for
    tensors under 2**31 elements) spilled none. A launch (and an AOT compile given the launch's tensors) now computes
    them in 32 bits for the tensors whose sizes allow it, per tensor; without tensors, in 64 as before."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    be = get_backend("gluon")
    args = (meta(8192, 32000, dtype=BF), meta(8192, 32000, dtype=torch.bool), meta(8192), meta(8192, 32000, dtype=BF))
    tr = masked_temp_softmax.trace(*args, BM=64, BN=128)
    o = be.Options(num_warps=4)
    narrow = be.generate(tr, o, True, frozenset()).source
    assert "gl.arange(0, 128, layout=gl.SliceLayout(0, L0)))\n" in narrow and ".to(gl.int64)" not in narrow
    big = (meta(70000, 32000, dtype=BF), *args[1:])          # X past 2**31 elements: its offsets alone in 64 bits
    from tilestack.backends.triton.codegen import wide_globals
    assert wide_globals(tr.ir, big) == {0} and wide_globals(tr.ir, args) == frozenset()
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    before, after = (gaot.resources(be.aot(tr, o, args=a)) for a in (None, args))
    assert before["spill_stores"] > 500 and after["spill_stores"] <= before["spill_stores"] // 10, (before, after)
