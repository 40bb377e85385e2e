"""Triton functions the generated module of an interpreted kernel (Triton's interpreter on the CPU) defines where
the interpreter's own arithmetic differs from the GPU's (backends.triton.codegen adds each one a kernel needs)."""

from tilestack.ir.types import F8E4M3_MAX

# Triton's interpreter ignores tl.dot's input_precision (it multiplies in f32): an interpreted tf32 product
# rounds its operands here, as the reference executor does (ir.ops.round_tf32), so the CPU backends agree.
TF32_HELPER = '''

@triton.jit
def _round_tf32(x):
    """f32 values rounded to tf32 (10 mantissa bits), to nearest even; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
'''
# Triton 3.6's interpreter converts f32 to bf16 by truncating the low 16 bits (the GPU rounds to nearest even, as
# torch and the reference executor do), and converts subnormal bf16 values (below 2**-126) wrongly both ways (1e-39 ->
# 4.4e-39): an interpreted conversion to or from bf16 goes through the bits here, so the CPU backends agree.
BF16_HELPER = '''

@triton.jit
def _to_bf16(x):
    """f32 values as bf16, rounded to nearest even (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _f64_to_f32_odd(x):
    """f64 values as f32 rounded to odd (toward zero, the last bit set where inexact): rounded from there to bf16 (16
    bits fewer), the f64 value is rounded once."""
    r = x.to(tl.float32)
    bits = r.to(tl.uint32, bitcast=True)
    back = r.to(tl.float64)
    bits = tl.where(tl.abs(back) > tl.abs(x), bits - 1, bits)   # rounded away from zero (to inf too): one step back
    bits = tl.where(back != x, bits | 1, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _from_bf16(x):
    """bf16 values as f32, exactly (subnormals too)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
'''
# The interpreter's f32 -> fp8 (e4m3) conversion drops the carry of a mantissa that rounds up (1.96 -> 1.0), does
# not saturate (700 -> 352) and makes NaN 384.0; the GPU converts with cvt.rn.satfinite, as torch and the reference
# do. An interpreted conversion to f8e4m3 rounds here first (to nearest even, 3 mantissa bits, subnormals below 2**-6 in
# steps of 2**-9, +-448 at most), so the interpreter's own conversion only meets values it can hold exactly.
F8E4M3_HELPER = f'''

@triton.jit
def _to_f8e4m3(x):
    """f32 values as f8e4m3, rounded to nearest even and saturated to +-448 (NaN stays NaN)."""
    a = tl.abs(x)
    bits = a.to(tl.uint32, bitcast=True)
    normal = (((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    tiny = (a + 16384.0) - 16384.0      # below 2**-6: f32's own rounding to a multiple of 2**-9
    r = tl.minimum(tl.where(a < 0.015625, tiny, normal), {F8E4M3_MAX!r})
    # x's sign bit onto r: -0.0 (and a negative that rounds to 0) stays -0.0; `x < 0` is false for -0.0, and Triton's
    # -r is 0 - r, +0.0 for r = 0
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    r = (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    # NaN as E4M3's NaN, 0x7F (the GPU's): the interpreter's own conversion makes NaN 0x7C, 384.0
    q = tl.where(x != x, 0x7F, r.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32))
    return q.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _from_f8e4m3(x):
    """f8e4m3 values as f32, exactly; E4M3's NaN (0x7F, 0xFF) as NaN: the interpreter's own conversion reads it as
    the IEEE-style +-480, a finite number (the GPU's and torch's make NaN)."""
    nan = (x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
    return tl.where(nan, float("nan"), x.to(tl.float32))
'''
# The interpreter converts floats to integers with NumPy's cast, which wraps past the integer's range (1e10 -> INT_MIN
# in i32) and makes NaN the minimum; the GPU's cvt.rzi.s32/s64 saturates and makes NaN 0, as the reference does
# (ir.types.to_int), but converts to i8 through s16 (300.0 -> 44). An interpreted float -> integer conversion, and any
# into i8, saturates here first. LO_F and HI_F are -2**(bits-1) and 2**(bits-1) as
# floats (the integer's maximum is not one: 2**63 - 1 rounds to 2**63).
INT_SAT_HELPER = '''

@triton.jit
def _to_int_sat(x, LO_F: tl.constexpr, HI_F: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DT: tl.constexpr):
    """Floats as integers of DT: truncated toward zero, saturated to [LO, HI], NaN as 0."""
    over = x >= HI_F
    under = x < LO_F
    inside = tl.where((x != x) | over | under, 0.0, x).to(DT)
    return tl.where(over, HI, tl.where(under, LO, inside)).to(DT)
'''
