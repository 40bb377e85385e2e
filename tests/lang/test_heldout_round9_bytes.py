"""Round 9 of held-out kernels, continued (see test_heldout_round9.py's docstring): torch.uint8 tensors as kernel
arguments and u8 tiles. Image normalization (uint8 NHWC pixels to normalized NCHW floats through a permuted view),
its inverse back to uint8 (rounded half to even, saturated, NaN as 0), NF4 codes packed two to a uint8 byte as
bitsandbytes stores them, and u8 tile arithmetic (modulo 256, compares against negatives, shifts, xor).

Bugs (gaps) these found, fixed in the compiler, each kept here as its regression test:
- launch: a torch.uint8 tensor was refused ("which tiles cannot hold"); the u8 dtype is the language's now
  (ir.types.u8, ts.u8): a byte read zero-extended, integer work on it in i32 wrapped modulo 256 when written back
  to a u8 tile, floats converted into it truncated and saturated to 0 .. 255 with NaN 0 (ir.types.to_int and
  int_range, the backends' saturating conversions: their upper bound was -lo, 2**(bits-1), for every integer), its
  fill / where constants checked against 0 .. 255 (lang.ops._element_value).
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, close, launch, meta
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round9 import NF4

import tilestack.lang as ts
from tilestack.errors import TileDTypeError

U8 = torch.uint8
FLOAT_DTYPES = [torch.float32, F16, BF]


# ---- 1. image normalization: uint8 NHWC pixels -> (x / 255 - mean) / std, NCHW -------------------------------------
@ts.kernel(grid=lambda IMG, BP: (ts.cdiv(IMG.shape[2], BP), IMG.shape[0]))
def normalize_images(IMG, MEAN, STD, OUT, *, BP: int = 64, C: int = 4):
    """OUT[n, c, p] = (IMG[n, c, p] / 255 - MEAN[c]) / STD[c] for IMG (N, C, H W) a permuted view of uint8 (N, H, W,
    C) pixels (strides (H W C, 1, C)); MEAN, STD (C,) f32 (C <= the tile's C); OUT (N, C, H W)."""
    j, n = ts.block_id(0), ts.block_id(1)
    px = ts.RegTile[ts.u8, C, BP]()
    x = ts.RegTile[ts.f32, C, BP]()
    mu = ts.RegVec[ts.f32, C]()
    sd = ts.RegVec[ts.f32, C]()
    out = ts.RegTile[OUT.dtype, C, BP]()
    ts.load(px, IMG, at=(n, 0, j))
    ts.load(mu, MEAN, at=(0,))
    ts.load(sd, STD, at=(0,))
    ts.copy(x, px)
    ts.div(x, x, 255.0)
    ts.sub(x, x, ts.per_row(mu))
    ts.div(x, x, ts.per_row(sd))
    ts.copy(out, x)
    ts.store(OUT, out, at=(n, 0, j))


@ts.kernel(grid=lambda X, BP: (ts.cdiv(X.shape[2], BP), X.shape[0]))
def to_uint8_images(X, MEAN, STD, IMG, *, BP: int = 64, C: int = 4):
    """The inverse: IMG = round-half-even((X STD + MEAN) 255), saturated to 0 .. 255, NaN 0, written through the
    permuted NHWC view. Rounding by adding and subtracting 1.5 2^23 (f32's half-to-even at integers)."""
    j, n = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, C, BP]()
    mu = ts.RegVec[ts.f32, C]()
    sd = ts.RegVec[ts.f32, C]()
    px = ts.RegTile[ts.u8, C, BP]()
    ts.load(x, X, at=(n, 0, j))
    ts.load(mu, MEAN, at=(0,))
    ts.load(sd, STD, at=(0,))
    ts.mul(x, x, ts.per_row(sd))
    ts.add(x, x, ts.per_row(mu))
    ts.mul(x, x, 255.0)
    ts.min(x, x, 1e6)
    ts.max(x, x, -1e6)                               # (NaN passes both: the conversion makes it 0)
    ts.add(x, x, 12582912.0)
    ts.sub(x, x, 12582912.0)
    ts.copy(px, x)
    ts.store(IMG, px, at=(n, 0, j))


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "H", "W"), [(2, 7, 19), (1, 8, 8), (1, 1, 1), (0, 4, 4)])
def test_normalize_uint8_images(backend, dtype, N, H, W, rng):
    """Every byte value appears in the first image (0 and 255 among them); the round trip gives the pixels back."""
    img = torch.from_numpy(rng.integers(0, 256, (N, H, W, 3))).to(U8)
    if N and H * W * 3 >= 256:
        img[0].view(-1)[:256] = torch.arange(256, dtype=U8)
    view = img.permute(0, 3, 1, 2).reshape(N, 3, H * W) if N else img.permute(0, 3, 1, 2).reshape(0, 3, H * W)
    assert N == 0 or view.data_ptr() == img.data_ptr()           # a view (no copy) of the NHWC bytes
    out = torch.full((N, 3, H * W), math.nan, dtype=dtype)
    launch(normalize_images, backend, view, MEAN, STD, out)
    pix = img.permute(0, 3, 1, 2).reshape(N, 3, H * W).double()
    want = (pix / 255 - MEAN.double()[:, None]) / STD.double()[:, None]
    close(out, want.to(dtype), scale=2)
    back = torch.full((N, H, W, 3), 7, dtype=U8)
    launch(to_uint8_images, backend, out.float(), MEAN, STD, back.permute(0, 3, 1, 2).reshape(N, 3, H * W)
           if N else back.permute(0, 3, 1, 2).reshape(0, 3, H * W))
    if dtype == torch.float32:
        assert torch.equal(back, img)
    else:                                            # (16-bit rounding of the normalized values: off by one at most)
        assert (back.int() - img.int()).abs().max() <= (1 if dtype == F16 else 2) if N else True


@pytest.mark.parametrize("backend", BACKENDS)
def test_floats_into_uint8_saturate_round_and_make_nan_0(backend):
    """Values past 255 and below 0, infinities, NaN and halves (round half to even: 0.5 -> 0, 1.5 -> 2, 254.5 ->
    254) into uint8 pixels."""
    vals = torch.tensor([-300.0, -0.6, 0.5, 1.5, 2.5, 254.5, 255.4, 255.6, 1e9, math.inf, -math.inf, math.nan])
    x = torch.zeros(1, 3, 12)
    x[0, 0] = (vals / 255 - MEAN[0]) / STD[0]
    x[0, 0, -1] = math.nan
    x[0, 0, 9], x[0, 0, 10] = math.inf, -math.inf
    img = torch.full((1, 3, 12), 7, dtype=U8)
    launch(to_uint8_images, backend, x, MEAN, STD, img)
    got = img[0, 0].tolist()
    assert got[:2] == [0, 0] and got[6:] == [255, 255, 255, 255, 0, 0]
    assert got[2:6] == [0, 2, 2, 254] or got[2:6] == [0, 2, 2, 255]   # (254.5 through f32 math: 254.49.. or .50..)


# ---- 2. NF4 codes packed two to a uint8 byte (bitsandbytes' storage), dequantized -----------------------------------
@ts.kernel(grid=lambda P, BN: (ts.cdiv(P.shape[0], BN), ts.cdiv(P.shape[1], 32)))
def nf4_dequant(P, ABSMAX, W, *, BN: int = 16):
    """W[n, 2i] = NF4[P[n, i] >> 4] absmax, W[n, 2i + 1] = NF4[P[n, i] & 15] absmax, for P (N, K/2) uint8 and
    ABSMAX (K/64, N) (a transposed view: one per 64 elements along K); W written through its even / odd columns as
    a (2, N, K/2) strided view."""
    j, kb = ts.block_id(0), ts.block_id(1)
    p = ts.RegTile[ts.u8, BN, 32]()
    code = ts.RegTile[ts.u8, BN, 32]()
    hit = ts.RegTile[ts.bool_, BN, 32]()
    w = ts.RegTile[ts.f32, BN, 32]()
    am = ts.RegVec[ts.f32, BN]()
    out = ts.RegTile[W.dtype, BN, 32]()
    ts.load(p, P, at=(j, kb))
    ts.load(am, ABSMAX, at=(kb, j))
    for half in range(2):
        if half == 0:
            ts.shr(code, p, 4)                       # no sign to extend: 0 .. 15
        else:
            ts.bit_and(code, p, 15)
        ts.zero(w)
        for c, val in enumerate(NF4):
            ts.eq(hit, code, c)
            ts.where(w, hit, val, w)
        ts.mul(w, w, ts.per_row(am))
        ts.copy(out, w)
        ts.store(W, out, at=(half, j, kb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "K"), [(37, 192), (16, 64), (1, 64), (0, 64)])
def test_nf4_dequantize_from_uint8(backend, dtype, N, K, rng):
    codes = torch.from_numpy(rng.integers(0, 16, (N, K)))
    if N:
        codes[0, :32] = torch.arange(16).repeat(2)   # every code, bytes 0x01 .. 0xEF .. 0xFE among them
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(U8)
    absmax = torch.from_numpy(10.0 ** rng.uniform(-3, 3, (N, K // 64))).float()
    w = torch.full((N, K), math.nan, dtype=dtype)
    wv = w.as_strided((2, N, K // 2), (1, K, 2))
    launch(nf4_dequant, backend, packed, absmax.T, wv)
    want = torch.tensor(NF4, dtype=torch.float64)[codes] * absmax.double().repeat_interleave(64, 1)
    close(w, want.to(dtype))


# ---- 3. u8 tile arithmetic, and the constants a u8 tile takes -----------------------------------------------------
@ts.kernel(grid=lambda X: (1,))
def byte_math(X, Y, *, BN: int = 16):
    """Y = ((((2 x) mod 256 - 3) mod 256) >> 1) ^ 0xFF, then 0 where x < -1 (never: bytes are not negative) and 255
    where x == 255."""
    x = ts.RegVec[ts.u8, BN]()
    a = ts.RegVec[ts.u8, BN]()
    m = ts.RegVec[ts.bool_, BN]()
    ts.load(x, X, at=(0,))
    a = x + x
    ts.sub(a, a, 3)
    a >>= 1
    ts.bit_xor(a, a, 0xFF)
    ts.lt(m, x, -1)
    ts.where(a, m, 0, a)
    ts.eq(m, x, 255)
    ts.where(a, m, 255, a)
    ts.store(Y, a, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_tile_arithmetic_wraps_modulo_256(backend):
    x = torch.tensor([0, 1, 2, 127, 128, 129, 200, 254, 255, 3, 4, 5, 64, 65, 191, 192], dtype=U8)
    y = torch.full((16,), 7, dtype=U8)
    launch(byte_math, backend, x, y)
    xi = x.long()
    want = (((((2 * xi) % 256 - 3) % 256) >> 1) ^ 0xFF).masked_fill(xi == 255, 255)
    assert y.tolist() == want.tolist()


def test_a_u8_fill_takes_0_to_255():
    @ts.kernel(grid=lambda Y: (1,))
    def fill_u8(Y, *, V: int = 255):
        a = ts.RegVec[ts.u8, 16]()
        ts.fill(a, V)
        ts.store(Y, a, at=(0,))

    y = torch.zeros(16, dtype=U8)
    launch(fill_u8, "reference", y)
    assert (y == 255).all()
    for bad in (256, -1):
        with pytest.raises(TileDTypeError, match=rf"fill: `a` is u8; value {bad} does not fit, expected a whole "
                                                 r"number in \[0, 255\]"):
            launch(fill_u8, "reference", y, V=bad)


@ts.kernel(grid=lambda X: (1,))
def byte_op(X, Y, Z, R, *, FN: str = "add", CONST: int = -1, R_DTYPE: str = "u8"):
    """Z = FN(X, Y) (or FN(X, CONST) when CONST >= 0) on (4, 16) u8 tiles; R = the row sums, maxima and minima of X
    as vectors of R_DTYPE ("u8" wraps the sum, "i32" does not), three rows of R."""
    x = ts.RegTile[ts.u8, 4, 16]()
    y = ts.RegTile[ts.u8, 4, 16]()
    z = ts.RegTile[ts.u8, 4, 16]()
    rdt = ts.u8 if R_DTYPE == "u8" else ts.i32
    r = ts.RegVec[rdt, 4]()
    ts.load(x, X, at=(0, 0))
    ts.load(y, Y, at=(0, 0))
    getattr(ts, FN)(z, x, y if CONST < 0 else CONST)
    ts.store(Z, z, at=(0, 0))
    for k, red in enumerate((ts.row_sum, ts.row_max, ts.row_min)):
        red(r, x)
        ts.store(R, r, at=(k, 0))


BYTE_FNS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
            "div": lambda a, b: int(a / b), "rem": lambda a, b: a - b * int(a / b), "max": max, "min": min,
            "bit_and": lambda a, b: a & b, "bit_or": lambda a, b: a | b, "bit_xor": lambda a, b: a ^ b,
            "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", BYTE_FNS)
@pytest.mark.parametrize("const", [-1, 7])
@pytest.mark.parametrize("rdt", ["u8", "i32"])
def test_byte_ops_swept(backend, fn, const, rdt, rng):
    """Each op on bytes as i32 work wrapped modulo 256 (division of non-negative values; divisors and shift
    counts drawn in range); reductions of bytes into u8 (wrapping) and i32 vectors."""
    x = torch.from_numpy(rng.integers(0, 256, (4, 16))).to(U8)
    x[0, :4] = torch.tensor([0, 255, 128, 127], dtype=U8)
    lo, hi = (1, 256) if fn in ("div", "rem") else (0, 8) if fn in ("shl", "shr") else (0, 256)
    y = torch.from_numpy(rng.integers(lo, hi, (4, 16))).to(U8)
    z, r = torch.full((4, 16), 9, dtype=U8), torch.full((3, 4), 9, dtype=U8 if rdt == "u8" else torch.int32)
    launch(byte_op, backend, x, y, z, r, FN=fn, CONST=const, R_DTYPE=rdt)
    f = BYTE_FNS[fn]
    want = [[f(int(a), const if const >= 0 else int(b)) % 256 for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(x.tolist(), y.tolist(), strict=True)]
    assert z.tolist() == want
    xs = x.long()
    sums = xs.sum(1) % 256 if rdt == "u8" else xs.sum(1)
    assert r.tolist() == [sums.tolist(), xs.amax(1).tolist(), xs.amin(1).tolist()]


# ---- 4. compiled for sm_90a ------------------------------------------------------------------------------------------
AOT_CASES = {
    "normalize_images": (normalize_images, (meta(64, 4, 224 * 224, dtype=U8), meta(4), meta(4),
                                            meta(64, 4, 224 * 224, dtype=BF)), dict(BP=256, C=4)),
    "to_uint8_images": (to_uint8_images, (meta(64, 4, 224 * 224), meta(4), meta(4), meta(64, 4, 224 * 224, dtype=U8)),
                        dict(BP=256, C=4)),
    "nf4_dequant": (nf4_dequant, (meta(8192, 2048, dtype=U8), meta(64, 8192), meta(2, 8192, 2048, dtype=BF)),
                    dict(BN=64)),
    "byte_math": (byte_math, (meta(16, dtype=U8), meta(16, dtype=U8)), {}),
}


@pytest.mark.parametrize("name", AOT_CASES)
def test_uint8_kernels_compile_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_uint8_kernels_compile_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
