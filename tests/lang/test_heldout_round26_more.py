"""Round 26 of held-out kernels, continued (test_heldout_round26.py has the first): 8-bit image compositing (RGBA u8
pixels channels-last, the alpha channel also read through a stride-4 view as a per-pixel vector broadcast along the
channels; the "over" blend rounded in i32 work, a saturating add, a wrapping subtract and an absolute difference on
u8 tiles), every float -> integer and integer -> integer conversion a copy makes (truncated toward zero, saturated
to the range, NaN as 0; integers wrapped) and the integer ops' wrapping, index-scalar arithmetic on negative values
and on int arguments past 2**31 (floored // and %, as Python's), one kernel launched in turn with dtypes, strides,
storage offsets and stride-0 (expanded) operands that its launch cache must tell apart; misuse a user makes, refused
with the argument named; and this round's kernels compiled for sm_90a through the Triton and Gluon backends. On the
reference executor and Triton's interpreter, outputs poisoned first.
"""

import math
import re

import numpy as np
import pytest
import torch
from heldout_support import (
    BACKENDS,
    BF,
    F16,
    F64,
    I8,
    I32,
    I64,
    close,
    gluon_resources_one_warpgroup,
    launch,
    meta,
    randn,
)
from sm90a_compile import check_triton_sm90a
from test_heldout_round26 import (
    csr_of,
    csr_spmm,
    distance_correlation,
    distance_row_means,
    int_over_tile,
    kahan_row_sum,
    number_over_tile,
    sinkhorn_log,
    spmm_ref,
)

import tilestack.lang as ts

F32, U8 = torch.float32, torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262602)


# ---- 4. RGBA u8 compositing ------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda SRC, BP: (ts.cdiv(SRC.shape[0], BP),))
def composite_u8(SRC, SA, DST, OVER, SAT, DIFF, WRAP, *, BP: int = 16):
    """Per pixel p (rows of the (P, 4) views) and channel c: OVER = (s a + d (255 - a) + 127) / 255 for c < 3 and
    a + (d_a (255 - a) + 127) / 255 for c = 3 (a = SA[p], the source's alpha through a stride-4 view); SAT = min(s + d,
    255); DIFF = |s - d|; WRAP = s - d modulo 256. All u8."""
    i = ts.block_id(0)
    s, d = ts.RegTile[ts.u8, BP, 4](), ts.RegTile[ts.u8, BP, 4]()
    a = ts.RegVec[ts.u8, BP]()
    ts.load(s, SRC, at=(i, 0))
    ts.load(d, DST, at=(i, 0))
    ts.load(a, SA, at=(i,))
    s32, d32, t = ts.RegTile[ts.i32, BP, 4](), ts.RegTile[ts.i32, BP, 4](), ts.RegTile[ts.i32, BP, 4]()
    a32 = ts.RegVec[ts.i32, BP]()
    ts.copy(s32, s)
    ts.copy(d32, d)
    ts.copy(a32, a)
    inv = 255 - a32                                   # (BP,) i32
    ts.mul(t, s32, ts.per_row(a32))
    rgb = ts.RegTile[ts.i32, BP, 4]()
    ts.mul(rgb, d32, ts.per_row(inv))
    ts.add(rgb, rgb, t)
    ts.add(rgb, rgb, 127)
    ts.div(rgb, rgb, 255)
    alpha = ts.RegTile[ts.i32, BP, 4]()
    ts.mul(alpha, d32, ts.per_row(inv))
    ts.add(alpha, alpha, 127)
    ts.div(alpha, alpha, 255)
    ts.add(alpha, alpha, ts.per_row(a32))
    ch = ts.RegVec[ts.i32, 4]()
    ts.arange(ch)
    is_alpha = ts.RegTile[ts.bool_, BP, 4]()
    ts.fill(is_alpha, False)
    ts.logical_or(is_alpha, is_alpha, ts.per_col(_eq3(ch)))
    ts.where(rgb, is_alpha, alpha, rgb)
    out = ts.RegTile[ts.u8, BP, 4]()
    ts.copy(out, rgb)
    ts.store(OVER, out, at=(i, 0))
    ts.add(t, s32, d32)
    ts.min(t, t, 255)
    ts.copy(out, t)
    ts.store(SAT, out, at=(i, 0))
    ts.sub(t, s32, d32)
    ts.abs(t, t)
    ts.copy(out, t)
    ts.store(DIFF, out, at=(i, 0))
    ts.sub(out, s, d)                                 # u8 - u8: wraps modulo 256
    ts.store(WRAP, out, at=(i, 0))


def _eq3(ch):
    m = ts.RegVec[ts.bool_, 4]()
    ts.eq(m, ch, 3)
    return m


def composite_ref(src: torch.Tensor, dst: torch.Tensor) -> tuple:
    s, d = src.long(), dst.long()
    a = s[:, 3:4]
    over = (s * a + d * (255 - a) + 127) // 255
    over[:, 3] = a[:, 0] + (d[:, 3] * (255 - a[:, 0]) + 127) // 255
    return over, (s + d).clamp(max=255), (s - d).abs(), (s - d) % 256


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("H", "W"), [(5, 7), (1, 1), (4, 4), (3, 11)])
def test_rgba_u8_compositing(backend, H, W, rng):
    src = torch.from_numpy(rng.integers(0, 256, (H, W, 4))).to(U8)
    dst = torch.from_numpy(rng.integers(0, 256, (H, W, 4))).to(U8)
    src.view(-1, 4)[0, 3] = 255                       # opaque: the source exactly
    if H * W > 1:
        src.view(-1, 4)[1, 3] = 0                     # transparent: the destination exactly
        src.view(-1, 4)[1, :3] = 255
    sv, dv = src.view(-1, 4), dst.view(-1, 4)
    outs = [torch.full((H * W, 4), 77, dtype=U8) for _ in range(4)]
    launch(composite_u8, backend, sv, sv[:, 3], dv, *outs)
    for got, want in zip(outs, composite_ref(sv, dv), strict=True):
        assert torch.equal(got.long(), want), (got.long() - want).abs().max()
    assert torch.equal(outs[0][0, :3], sv[0, :3]) and outs[0][0, 3] == 255
    if H * W > 1:
        assert torch.equal(outs[0][1, :3], dv[1, :3])


# ---- 5. conversions a copy makes -------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def convert(X, Y, *, BM: int = 8, BN: int = 16):
    """Y = X in Y's dtype (a tile of X's dtype copied into a tile of Y's)."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    ts.load(x, X, at=(i, j))
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(y, x)
    ts.store(Y, y, at=(i, j))


FLOAT_EDGES = [0.0, -0.0, 0.5, -0.5, 1.9, -1.9, 127.0, 127.9, 128.0, -128.0, -128.9, -129.0, 255.0, 255.9, 256.0,
               300.0, -1.0, -300.0, math.nan, math.inf, -math.inf, 2.0**31, -2.0**31, 2.0**31 - 128, 3e9, -3e9,
               2.0**63, -2.0**63, 1e19, -1e19, 1e38, 65504.0, 70000.0, 2.0**24 + 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src", [F32, F64, F16, BF])
@pytest.mark.parametrize("dst", [I8, U8, I32, I64])
def test_float_to_int_truncates_saturates_and_zeroes_nan(backend, src, dst):
    x = torch.tensor(FLOAT_EDGES, dtype=F64).to(src).view(2, -1)
    info = torch.iinfo(dst)
    want = x.double().nan_to_num(0.0, posinf=math.inf, neginf=-math.inf).trunc().clamp(info.min, info.max)
    y = torch.full(x.shape, 77, dtype=dst)
    launch(convert, backend, x, y)
    pairs = zip(x.flatten().tolist(), y.flatten().tolist(), want.flatten().tolist(), strict=True)
    assert torch.equal(y.double(), want), [(a, b, c) for a, b, c in pairs if b != c]


INT_EDGES = [0, 1, -1, 127, 128, 255, 256, -128, -129, 300, -300, 2**31 - 1, -2**31, 2**40 + 5, -2**40 - 3,
             2**63 - 1, -2**63]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src", [I64, I32, I8, U8])
@pytest.mark.parametrize("dst", [I8, U8, I32, I64, F32, F16, torch.bool])
def test_int_conversions_wrap_as_torch(backend, src, dst):
    x = torch.tensor(INT_EDGES, dtype=I64).to(src).view(1, -1)
    y = torch.zeros(x.shape, dtype=dst) if not dst.is_floating_point else torch.full(x.shape, math.nan, dtype=dst)
    launch(convert, backend, x, y)
    assert torch.equal(y, x.to(dst)), (y, x.to(dst))


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def int_table(X, Y, OUT, *, BN: int = 64):
    """OUT[k] = fn_k(X, Y) for add, sub, mul, div, max, min, rem, in X's dtype."""
    i = ts.block_id(0)
    x, y = ts.RegVec[X.dtype, BN](), ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.load(y, Y, at=(i,))
    r = ts.RegVec[X.dtype, BN]()
    for k, fn in enumerate((ts.add, ts.sub, ts.mul, ts.div, ts.max, ts.min, ts.rem)):
        fn(r, x, y)
        ts.store(OUT, r, at=(k, i))


def _tdiv(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [I32, I64, I8, U8])
def test_integer_ops_wrap_and_truncate_toward_zero(backend, dtype):
    """Every pair of edge values (INT_MIN / -1 wraps to INT_MIN, as the GPU's); the work in i32 (i64 for i64) and the
    result wrapped into the tile's dtype."""
    bits = torch.iinfo(dtype).bits
    vals = [0, 1, -1, 7, -7, 2, -3, 127, -128, 2**31 - 1, -2**31, 255, 100, -100, 2**62 + 3]

    def into(v: int, b: int = bits) -> int:
        return v % 256 if dtype is U8 and b == 8 else (v + 2 ** (b - 1)) % 2**b - 2 ** (b - 1)

    vals = sorted({into(v) for v in vals})
    pairs = [(a, b) for a in vals for b in vals if b != 0]
    x = torch.tensor([p[0] for p in pairs], dtype=dtype)
    y = torch.tensor([p[1] for p in pairs], dtype=dtype)
    work = 64 if dtype is I64 else 32
    fns = (lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, _tdiv, max, min,
           lambda a, b: a - _tdiv(a, b) * b)
    want = torch.tensor([[into(into(f(a, b), work)) for a, b in pairs] for f in fns], dtype=dtype)
    out = torch.full((7, len(pairs)), 3, dtype=dtype)
    launch(int_table, backend, x, y, out)
    assert torch.equal(out, want), (out != want).nonzero()[:5]


# ---- 6. index-scalar arithmetic: negative values, int arguments past 2**31 -------------------------------------------
@ts.kernel(grid=lambda V: (V.shape[0],))
def index_math(V, OUT, off: int, *, C: int = 3):
    """Index arithmetic on a = V[p, 0], b = V[p, 1] (read from memory: any sign), the block id and an int argument,
    each result filled into a one-element i64 vector and stored: Python's semantics (// and % floor)."""
    p = ts.block_id(0)
    a = ts.load_scalar(V, p, 0)
    b = ts.load_scalar(V, p, 1)
    res = (a + b, a - b, a * b, a // b, a % b, ts.cdiv(a, b), ts.smin(a, b), ts.smax(a, b), a // C, a % C,
           (p - 2) // C, (p - 2) % C, off + a, off * 2 - a, ts.cdiv(a, C), -a, a ** 2, (a - off) // 7)
    t = ts.RegVec[OUT.dtype, 1]()
    for k, r in enumerate(res):
        ts.fill(t, r)
        ts.store(OUT, t, at=(p, k))


def index_math_ref(pairs, off: int, C: int = 3) -> torch.Tensor:
    rows = [[a + b, a - b, a * b, a // b, a % b, -(-a // b), min(a, b), max(a, b), a // C, a % C, (p - 2) // C,
             (p - 2) % C, off + a, off * 2 - a, -(-a // C), -a, a * a, (a - off) // 7]
            for p, (a, b) in enumerate(pairs)]
    return torch.tensor([[(v + 2**63) % 2**64 - 2**63 for v in r] for r in rows], dtype=I64)


INDEX_PAIRS = [(7, 2), (-7, 2), (7, -2), (-7, -2), (0, 3), (-1, 3), (5, 5), (-9, 1), (1, -9), (2**40 + 3, 7),
               (-2**40 - 3, 5), (3 * 2**31, 2**31 - 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx_dtype", [I32, I64])
@pytest.mark.parametrize("off", [5, 2**33 + 1, -3])
def test_index_scalar_arithmetic_floors(backend, idx_dtype, off):
    pairs = [(a, b) for a, b in INDEX_PAIRS if idx_dtype is I64 or max(abs(a), abs(b)) < 2**31]
    out = torch.full((len(pairs), 18), -999, dtype=I64)
    launch(index_math, backend, torch.tensor(pairs, dtype=idx_dtype), out, off)
    want = index_math_ref(pairs, off)
    assert torch.equal(out, want), [(pairs[r], c, out[r, c].item(), want[r, c].item())
                                    for r, c in (out != want).nonzero().tolist()[:5]]


@ts.kernel(grid=(1,))
def compare_ints_with_floats(X, OUT, s: float, *, BN: int = 16):
    """OUT rows: X lt, le, gt, ge, eq, ne against each constant of COMPARED_WITH and then the float argument s."""
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(0,))
    m = ts.RegVec[ts.bool_, BN]()
    row = 0
    for c in (*COMPARED_WITH, s):
        for fn in (ts.lt, ts.le, ts.gt, ts.ge, ts.eq, ts.ne):
            fn(m, x, c)
            ts.store(OUT, m, at=(row, 0))
            row += 1


COMPARED_WITH = (2.5, -0.5, 2.0, 1e10, -1e10, math.inf, -math.inf, math.nan, 16777216.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [I32, I64, U8, I8])
def test_integer_tiles_compare_with_a_float_in_f32(backend, dtype):
    """An integer tile against a float constant or argument compares in f32, the integers converted (Triton's
    promotion, the GPU's compare): 16777217 is 16777216.0 there, equal to 16777216.5's f32. The reference compared
    the integers exactly with the f32 of the float, so it and Triton's interpreter disagreed past 2**24 (fixed this
    round, ir.ops.work_dtype)."""
    info = torch.iinfo(dtype)
    vals = [0, 1, 2, 3, -1, -3, 2**24, 2**24 + 1, 2**31 - 1, -2**31, 2**40 + 1, 127, 255, -128, 100, 5]
    vals = [min(max(v, info.min), info.max) for v in vals]
    x = torch.tensor(vals, dtype=dtype)
    xs = np.array(vals, dtype=np.float64).astype(np.float32)
    for s in (2.5, 16777216.5):
        out = torch.zeros(6 * (len(COMPARED_WITH) + 1), 16, dtype=torch.bool)
        launch(compare_ints_with_floats, backend, x, out, s)
        want = [getattr(np, fn)(xs, np.float32(c)) for c in (*COMPARED_WITH, s)
                for fn in ("less", "less_equal", "greater", "greater_equal", "equal", "not_equal")]
        assert torch.equal(out, torch.from_numpy(np.stack(want))), (out != torch.from_numpy(np.stack(want))).nonzero()


@ts.kernel(grid=(1,))
def choose_ints_into_floats(X, Y, C, *, BN: int = 8):
    """Y = where(X != 0, X, 0.5) and C = X, both into Y's float dtype from the integer tile X."""
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(0,))
    nz = ts.RegVec[ts.bool_, BN]()
    ts.ne(nz, x, 0)
    y = ts.RegVec[Y.dtype, BN]()
    ts.where(y, nz, x, 0.5)
    ts.store(Y, y, at=(0,))
    ts.copy(y, x)
    ts.store(C, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
def test_an_i64_tile_chosen_into_a_float_tile_rounds_once(backend, dtype):
    """i64 values past 2**53 chosen by where into an f32 tile round once, as copy (and Triton, and torch) convert
    them; the reference went through float64 first (np.where of an int64 array and 0.5), rounding twice: 2**60 +
    2**36 + 1 became 2**60, not 2**60 + 2**37 (fixed this round, the SELECT op's reference)."""
    vals = [2**60 + 2**36 + 1, -(2**60 + 2**36 + 1), 2**53 + 1, 0, 2**62 + 2**38 + 3, 2**54 + 2**30 + 1, 2**63 - 1, 5]
    x = torch.tensor(vals, dtype=I64)
    y, c = torch.full((8,), math.nan, dtype=dtype), torch.full((8,), math.nan, dtype=dtype)
    launch(choose_ints_into_floats, backend, x, y, c)
    via_f32 = x.to(F32).to(dtype)                      # the f32 work, then the dst (as Triton converts)
    assert torch.equal(y, torch.where(x != 0, via_f32, torch.tensor(0.5, dtype=dtype))), y
    assert torch.equal(c, x.to(dtype)), c


# ---- 7. one kernel, many launch signatures ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_kernel_relaunched_with_other_dtypes_strides_offsets_and_stride0(backend, rng):
    """csr_spmm launched in turn with B contiguous, B a transposed view, B bf16, B a row-sliced view at an odd
    storage offset (an address not 16-byte aligned), B an expanded stride-0 row, i64 then i32 indices, and the first
    signature again: each launch's answer is its own (a launcher cached for one signature must not serve another)."""
    M, K, N = 6, 9, 21
    dense = torch.from_numpy(rng.standard_normal((M, K)) * (rng.random((M, K)) < 0.5)).float()
    dense[0, 0] = 1.0
    base = randn(rng, K + 1, N)
    bt = randn(rng, N, K).T                            # (K, N), last stride K
    flat = randn(rng, 1 + K * N)
    operands = [base[:K], bt, base[:K].to(BF), flat[1:].view(K, N), randn(rng, 1, N).expand(K, N), base[1:],
                base[:K]]
    assert operands[3].data_ptr() % 16 != 0 and operands[4].stride() == (0, 1)
    for n, (b, idx) in enumerate(zip(operands, [I64, I64, I32, I32, I64, I32, I64], strict=True)):
        rowptr, col, val = csr_of(dense.to(b.dtype), idx)
        c = torch.full((M, N), math.nan, dtype=b.dtype)
        launch(csr_spmm, backend, rowptr, col, val, b, c)
        want = spmm_ref(rowptr, col, val, b)
        t = dict(rtol=1e-5, atol=1e-5) if b.dtype is F32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(c.double(), want, **t, msg=lambda m, n=n: f"launch {n}: {m}")


# ---- 8. NumPy numbers inside a kernel --------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def numpy_constants(X, Y, *, BN: int = 16):
    """Constants computed with NumPy (np.float32, np.int64, np.bool_) wherever a Python number goes: fill, a binary
    op's operand, a comparison, where's values, operator sugar on either side, a power, a loop bound, an arange
    start, a tile coordinate and a triangle's diagonal. Y (8, n) rows: one per form."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(i * np.int64(1),))
    t = ts.RegVec[ts.f32, BN]()
    ts.fill(t, np.float32(0.5))
    ts.store(Y, t, at=(np.int64(0), i))
    ts.mul(t, x, np.float32(3.0))
    ts.max(t, t, np.float64(-2.0))
    ts.store(Y, t, at=(1, i))
    pos = ts.RegVec[ts.bool_, BN]()
    ts.gt(pos, x, np.float32(0.0))
    ts.where(t, pos, np.float32(1.0), np.int64(-1))
    ts.store(Y, t, at=(2, i))
    ts.store(Y, x * np.float32(2.0) + np.int32(1), at=(3, i))
    ts.store(Y, np.float32(2.0) - x, at=(4, i))
    ts.store(Y, x ** np.int64(2), at=(5, i))
    ts.zero(t)
    for _ in ts.range(np.int64(3)):
        t += x
    ts.store(Y, t, at=(6, i))
    ts.arange(t, i * BN + np.int64(100))
    ts.store(Y, t, at=(7, i))


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_numbers_inside_a_kernel_are_python_numbers(backend):
    """Each was refused ("b must be a tile, a number or a Scalar, got float32 np.float32(3.0)", "range: an operand
    must be an index (int or index Scalar), got int64 np.int64(3)") though tile sizes and launch arguments take NumPy
    numbers; now each is the Python number it holds (fixed this round)."""
    x = torch.arange(21, dtype=F32) - 7
    y = torch.full((8, 21), math.nan)
    launch(numpy_constants, backend, x, y)
    want = torch.stack([torch.full((21,), 0.5), (3 * x).clamp_min(-2), torch.where(x > 0, 1.0, -1.0), 2 * x + 1,
                        2 - x, x * x, 3 * x, torch.arange(21, dtype=F32) + 100])   # (program i's arange: i BN + 100)
    assert torch.equal(y, want), (y != want).nonzero()


# ---- 9. ops the language composes: the hints that name them, and the recipes run ----------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def composed_ops(X, TANH, FLOOR, NAN, ARGMAX, *, BM: int = 8, BN: int = 16):
    """The recipes tilestack.lang's AttributeErrors give for tanh, floor, isnan and argmax, on one (BM, BN) tile of
    rows; NAN is 1.0 where X is NaN; ARGMAX the first column attaining each row's max (N <= BN)."""
    i = ts.block_id(0)
    x, t = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.mul(t, x, 2.0)                                 # tanh = 2 sigmoid(2x) - 1
    ts.sigmoid(t, t)
    ts.mul(t, t, 2.0)
    ts.sub(t, t, 1.0)
    ts.store(TANH, t, at=(i, 0))
    k = ts.RegTile[ts.i32, BM, BN]()
    ts.copy(k, x)                                     # truncated toward zero
    ts.copy(t, k)
    above = ts.RegTile[ts.bool_, BM, BN]()
    ts.gt(above, t, x)
    ts.where(t, above, t - 1.0, t)                    # floor
    ts.store(FLOOR, t, at=(i, 0))
    nan = ts.RegTile[ts.bool_, BM, BN]()
    ts.ne(nan, x, x)
    ts.where(t, nan, 1.0, 0.0)
    ts.store(NAN, t, at=(i, 0))
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(cols)
    inside = ts.RegVec[ts.bool_, BN]()
    ts.lt(inside, cols, X.shape[1])
    ts.where(x, ts.per_col(inside), x, -math.inf)     # padding never wins
    m = ts.RegVec[ts.f32, BM]()
    ts.row_max(m, x)
    hit = ts.RegTile[ts.bool_, BM, BN]()
    ts.eq(hit, x, ts.per_row(m))
    idx = ts.RegTile[ts.i32, BM, BN]()
    ts.where(idx, hit, ts.per_col(cols), BN)
    first = ts.RegVec[ts.i32, BM]()
    ts.row_min(first, idx)
    ts.store(ARGMAX, first, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_composed_op_hints_name_recipes_that_work(backend, rng):
    """ts.tanh, ts.floor, ts.isnan, ts.argmax (and cumsum, softmax, clamp, ...) raised Python's bare "module has no
    attribute"; now each AttributeError says how to write it with the language's ops, and these recipes, run, match
    torch (added this round, lang/__init__.py)."""
    for name, fragment in (("tanh", "sigmoid(2x)"), ("floor", "truncation"), ("isnan", "ts.ne(mask, x, x)"),
                           ("argmax", "ts.row_max(m, x)"), ("cumsum", "0/1 triangle"), ("softmax", "ts.row_max"),
                           ("clamp", "ts.max(t, x, lo)"), ("atomic_max", "ts.atomic_add")):
        hint = rf"no '{name}' op; write it with the ops it has: .*{re.escape(fragment)}"
        with pytest.raises(AttributeError, match=hint):
            getattr(ts, name)
    x = randn(rng, 11, 13) * 3
    x[2, 4] = math.nan
    x[3] = 1.5                                        # ties: the first column
    x[4, 7] = -2.0
    x[5, :3] = torch.tensor([-0.5, 2.0, -3.0])
    outs = [torch.full((11, 13), math.nan) for _ in range(3)] + [torch.full((11,), -7, dtype=I32)]
    launch(composed_ops, backend, x, *outs)
    close(outs[0], torch.tanh(x.double()), dtype=F32, scale=10)
    assert torch.equal(outs[1][~x.isnan()], torch.floor(x)[~x.isnan()])
    assert torch.equal(outs[2], x.isnan().float())
    clean = torch.where(x.isnan(), -math.inf, x)
    rows = [r for r in range(11) if r != 2]            # (row 2's NaN: its max is NaN, no column equals it)
    assert torch.equal(outs[3][rows], clean[rows].argmax(1).to(I32)) and outs[3][3] == 0


# ---- misuse ----------------------------------------------------------------------------------------------------------
def _csr():
    return torch.tensor([0, 1, 2], dtype=I32), torch.tensor([0, 1], dtype=I32), torch.ones(2)


def test_csr_spmm_misuse_is_named():
    rowptr, col, val = _csr()
    b, c = torch.ones(2, 4), torch.ones(2, 4)
    with pytest.raises(Exception, match="indices for `ROWPTR` of rank 2"):     # a rank-2 row pointer
        launch(csr_spmm, "reference", rowptr.view(1, 3), col, val, b, c)
    with pytest.raises(Exception, match="load_scalar of `COL`, a float tensor"):   # column indices of floats
        launch(csr_spmm, "reference", rowptr, col.float(), val, b, c)
    with pytest.raises(Exception, match="argument B has rank 1"):        # B of rank 1
        launch(csr_spmm, "reference", rowptr, col, val, torch.ones(8), c)
    with pytest.raises(Exception, match="constant BN is declared int; got float 2.5"):
        launch(csr_spmm, "reference", rowptr, col, val, b, c, BN=2.5)
    with pytest.raises(Exception, match=r"unknown constant\(s\) \['BM'\]"):
        launch(csr_spmm, "reference", rowptr, col, val, b, c, BM=16)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(1024, BN),))
def fixed_grid_copy(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(ts.block_id(0),))
    ts.store(Y, x, at=(ts.block_id(0),))


def test_a_zero_tile_constant_in_the_grid_names_the_constant():
    """BN=0 reaches the grid's cdiv before any tile is declared: the error names BN=0 (it said only "check the
    kernel's constants"; cdiv of two ints raised Python's bare ZeroDivisionError). Fixed this round."""
    rowptr, col, val = _csr()
    with pytest.raises(Exception, match=r"constant BN=0 of this launch"):
        launch(csr_spmm, "reference", rowptr, col, val, torch.ones(2, 4), torch.ones(2, 4), BN=0)
    with pytest.raises(Exception, match=r"cdiv\(1024, 0\).*constant BN=0 of this launch"):
        launch(fixed_grid_copy, "reference", torch.ones(16), torch.ones(16), BN=0)


def test_tile_size_not_a_power_of_two_is_refused_by_triton_naming_it():
    """The reference executor runs a 12-wide tile; Triton's tiles are powers of two and the refusal says which."""
    rowptr, col, val = _csr()
    b = torch.arange(24, dtype=F32).view(2, 12)
    c = torch.full((2, 12), math.nan)
    launch(csr_spmm, "reference", rowptr, col, val, b, c, BN=12)
    assert torch.equal(c, b)
    with pytest.raises(Exception, match=r"power-of-two tile sizes.*RegVec\[f32, 12\]"):
        launch(csr_spmm, "triton", rowptr, col, val, b, torch.empty(2, 12), BN=12)


@ts.kernel(grid=lambda X: (1,))
def bad_axis(X, Y):
    i = ts.block_id(3)
    x = ts.RegVec[ts.f32, 16]()
    ts.load(x, X, at=(i,))
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=lambda X: (1,))
def bad_reduce_shape(X, Y, *, BM: int = 16, BN: int = 8):
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(0, 0))
    v = ts.RegVec[ts.f32, BM]()
    ts.col_sum(v, x)                                 # a column sum is (BN,), not (BM,)
    ts.store(Y, v, at=(0,))


@ts.kernel(grid=lambda X: (1,))
def mixed_dtypes(X, Y, *, BN: int = 16):
    x = ts.RegVec[X.dtype, BN]()
    y = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    ts.load(y, Y, at=(0,))
    ts.add(y, x, y)                                  # an i32 tile and an f32 tile
    ts.store(Y, y, at=(0,))


def test_kernel_misuse_is_named_with_its_line():
    with pytest.raises(Exception, match=r"axis must be 0, 1 or 2, got 3") as e:
        launch(bad_axis, "reference", torch.ones(16), torch.ones(16))
    assert "test_heldout_round26_more.py" in str(e.value)
    with pytest.raises(Exception, match=r"col_sum.*\(8,\)") as e:
        launch(bad_reduce_shape, "reference", torch.ones(16, 8), torch.ones(16))
    assert "test_heldout_round26_more.py" in str(e.value)
    with pytest.raises(Exception, match=r"add: a `x` is i32 but b `y` is f32"):
        launch(mixed_dtypes, "reference", torch.ones(16, dtype=I32), torch.ones(16))


@ts.kernel(grid=(1,))
def index_a_global(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.fill(x, X[0])                                 # NumPy's / Triton's way: not the language's
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def index_a_tile(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    x[3] = 0.0
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def torch_size_of_a_global(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.fill(x, X.size(0))                            # torch's spelling of X.shape[0]
    ts.store(Y, x, at=(0,))


def test_indexing_a_global_or_a_tile_says_how_to_read_it():
    """X[0] in a kernel raised Python's bare "'GlobalTensor' object is not subscriptable" (and a tile's x[3] = 0
    "'Tile' object does not support item assignment"; X.size(0) "'GlobalTensor' object has no attribute 'size'"),
    naming neither the line nor the way; now an error at the line that names load / load_scalar (where with a mask;
    X.shape[axis]). Fixed this round."""
    with pytest.raises(Exception, match=r"round26_more.py:\d+: `X\[...\]`.*ts.load_scalar\(X, i"):
        launch(index_a_global, "reference", torch.ones(16), torch.ones(16))
    with pytest.raises(Exception, match=r"round26_more.py:\d+: `\[...\] =` on a tile.*ts.where"):
        launch(index_a_tile, "triton", torch.ones(16), torch.ones(16))
    with pytest.raises(AttributeError, match=r"round26_more.py:\d+: `X.size`.*X.shape\[axis\]"):
        launch(torch_size_of_a_global, "reference", torch.ones(16), torch.ones(16))


def test_composite_misuse_is_named():
    img = torch.zeros(4, 4, dtype=U8)
    outs = [torch.zeros(4, 4, dtype=U8) for _ in range(4)]
    with pytest.raises(Exception, match="`SA` has rank 2"):              # alpha of rank 2
        launch(composite_u8, "reference", img, img, img, *outs)
    with pytest.raises(Exception, match="`OVER` has rank 3"):            # an output of rank 3
        launch(composite_u8, "reference", img, img[:, 3], img, torch.zeros(4, 4, 1, dtype=U8), *outs[1:])


# ---- sm_90a compiles -----------------------------------------------------------------------------------------------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "csr_spmm_bf16": (csr_spmm, (meta(4097, dtype=I32), meta(10**6, dtype=I32), meta(10**6, dtype=BF),
                                 meta(8192, 4096, dtype=BF), meta(4096, 4096, dtype=BF)), dict(BN=128)),
    "csr_spmm_i64": (csr_spmm, (meta(4097, dtype=I64), meta(10**6, dtype=I64), meta(10**6),
                                meta(8192, 4096), meta(4096, 4096)), dict(BN=128)),
    "distance_row_means": (distance_row_means, (meta(64, 4096), meta(64, 4096), meta(64, 4096), meta(64, 4096)),
                           dict(BM=64, BN=64)),
    "distance_correlation": (distance_correlation, (meta(64, 4096), meta(64, 4096), meta(64, 4096),
                                                    meta(64, 4096), meta(64, 4)), dict(BM=64, BN=64)),
    "number_over_tile": (number_over_tile, (meta(1 << 20, dtype=BF), meta(4, 1 << 20, dtype=BF), 0.3),
                         dict(BN=1024)),
    "int_over_tile": (int_over_tile, (meta(1 << 20, dtype=U8), meta(3, 1 << 20, dtype=U8), 7), dict(BN=1024)),
    "composite_u8": (composite_u8, (meta(1920 * 1080, 4, dtype=U8), meta(1920 * 1080, 4, dtype=U8)[:, 3],
                                    *[meta(1920 * 1080, 4, dtype=U8)] * 5), dict(BP=256)),
    "convert_f32_u8": (convert, (meta(4096, 4096), meta(4096, 4096, dtype=U8)), dict(BM=64, BN=64)),
    "convert_bf16_i64": (convert, (meta(4096, 4096, dtype=BF), meta(4096, 4096, dtype=I64)), dict(BM=64, BN=64)),
    "convert_i64_i8": (convert, (meta(4096, 4096, dtype=I64), meta(4096, 4096, dtype=I8)), dict(BM=64, BN=64)),
    "int_table_i8": (int_table, (meta(1 << 20, dtype=I8), meta(1 << 20, dtype=I8), meta(7, 1 << 20, dtype=I8)),
                     dict(BN=1024)),
    "index_math": (index_math, (meta(1024, 2, dtype=I64), meta(1024, 18, dtype=I64), 5), {}),
    "sinkhorn_log": (sinkhorn_log, (meta(4096, 64, 64), meta(4096, 64), meta(4096, 64), meta(4096, 64, 64), 100,
                                    0.05), dict(BM=64, BN=64)),
    "compare_ints_with_floats": (compare_ints_with_floats, (meta(16, dtype=I64), meta(60, 16, dtype=torch.bool), 2.5),
                                 {}),
    "numpy_constants": (numpy_constants, (meta(1 << 20), meta(8, 1 << 20)), dict(BN=1024)),
    "kahan_row_sum": (kahan_row_sum, (meta(8192, 65536), meta(8192), meta(8192)), dict(BM=16, BN=128)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round26_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round26_compiles_for_sm90a_with_gluon(name):
    """One warpgroup (num_warps=4); no spills, no serialized wgmma."""
    res = gluon_resources_one_warpgroup(*AOT_CASES[name])
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
