"""Types of IR values: tiles and vectors in a memory space, global tensors, and scalars.

    TileType(Space.REG, f32, (64, 64))      # a register tile
    TileType(Space.SHARED, bf16, (64,))     # a shared vector
    GlobalType(bf16, rank=4)                # a global tensor argument, addressed in whole tiles
    INDEX, FLOAT                            # scalars: integer index arithmetic, runtime floats
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


@dataclasses.dataclass(frozen=True)
class DType:
    """A dtype of tiles. ``name`` is the IR's ("f32"), ``spec`` the name device tables and cost formulas use
    ("fp32", as spec sheets write it): one vocabulary, two spellings, both found by ``dtype_named``."""
    name: str        # "bf16"
    itemsize: int    # bytes per element
    is_float: bool
    spec: str = ""   # the spec-sheet name: "fp32", "bf16", "fp8", "int8"

    def __repr__(self) -> str:
        return self.name


f64 = DType("f64", 8, True, "fp64")
f32 = DType("f32", 4, True, "fp32")
f16 = DType("f16", 2, True, "fp16")
bf16 = DType("bf16", 2, True, "bf16")
i32 = DType("i32", 4, False, "int32")
i64 = DType("i64", 8, False, "int64")
bool_ = DType("bool", 1, False, "bool")   # masks: what comparisons make and where() selects by (register tiles,
#                                           and torch.bool globals: loaded as masks or as 0 / 1, stored as x != 0)
i8 = DType("i8", 1, False, "int8")        # quantized weights (tilestack.quant), widened to a float tile before an mma
f8e4m3 = DType("f8e4m3", 1, True, "fp8")   # OCP fp8 E4M3 "fn" (torch.float8_e4m3fn): no infinities, max 448
# bytes (image pixels, packed 4-bit codes): unsigned, 0 .. 255, work in i32; int8's spec (its cost and device rates)
u8 = DType("u8", 1, False, "int8")
DTYPES = {d.name: d for d in (f64, f32, f16, bf16, i32, i64, bool_, i8, f8e4m3, u8)}
F8E4M3_MAX = 448.0


def dtype_named(name: str) -> DType:
    """The dtype called ``name`` in either spelling: ``dtype_named("f32") is dtype_named("fp32") is f32``."""
    d = DTYPES.get(name) or next((d for d in DTYPES.values() if d.spec == name), None)
    if d is None:
        raise KeyError(f"no dtype named {name!r}; expected one of {sorted(DTYPES)} or "
                       f"{sorted(d.spec for d in DTYPES.values())}")
    return d

# The torch dtype each tile dtype corresponds to, by name (torch is imported only where tensors are).
TORCH_NAMES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
               "i32": "int32", "i64": "int64", "i8": "int8", "f8e4m3": "float8_e4m3fn", "bool": "bool", "u8": "uint8"}


def dtype_of_torch(torch_dtype) -> DType | None:
    """The tile dtype of a torch dtype, or None where tiles have no such dtype."""
    name = str(torch_dtype).removeprefix("torch.")
    for k, v in TORCH_NAMES.items():
        if v == name:
            return DTYPES[k]
    return None


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Values as ``dtype`` holds them, in the reference's storage: float64 for float dtypes, int64 for integer
    ones (exact to 64 bits), bool for masks.

    bf16 keeps float32's exponent and 8 bits of mantissa: round-to-nearest-even on the low 16 bits of the
    float32 pattern (NaN stays NaN, infinities stay infinite). Integers into an integer dtype wrap (two's
    complement, as a C cast); floats into one are truncated toward zero and saturated, NaN becoming 0 (as the
    GPU's ``cvt.rzi.sat``).
    """
    if dtype is f64:
        return np.asarray(x, dtype=np.float64)
    if dtype is f32:
        return np.asarray(x, dtype=np.float32).astype(np.float64)
    if dtype is f16:
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float16).astype(np.float64)
    if dtype is bf16:
        return _round_bf16(np.asarray(x, dtype=np.float64))
    if dtype is f8e4m3:
        return _round_f8e4m3(np.asarray(x, dtype=np.float64))
    if dtype is bool_:
        return np.asarray(x) != 0
    if not dtype.is_float:
        return to_int(x, dtype)
    raise TypeError(f"round_to: no rounding rule for {dtype}")


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded once to bf16: 8 significant bits, to nearest even, quanta of 2**-133 below 2**-126, inf from half
    an ulp past the largest bf16 on, NaN and infinities kept. Rounded from the float64 value itself, not through
    float32: through float32 a value just above a bf16 tie (1 + 2**-8 + 2**-40, an f64 or an integer past 2**24) first
    lands on the tie and then goes to even (1.0), where the GPU's cvt.rn.bf16.f64 / .s32 rounds it once (1 + 2**-7)."""
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = np.frexp(x)                                   # 2**(e - 1) <= |x| < 2**e
        q = np.maximum(e - 8, -133)                          # the quantum of x's binade in bf16
        r = np.ldexp(np.rint(np.ldexp(x, -q)), q)            # rint: to nearest even (-0.0 and small negatives keep -)
        r = np.where(np.abs(r) >= 2.0**128, np.copysign(np.inf, x), r)
    return np.where(np.isfinite(x), r, x)


def int_range(dtype: DType) -> tuple[int, int]:
    """The smallest and largest value of the integer ``dtype`` (signed, but u8's 0 .. 255)."""
    bits = 8 * dtype.itemsize
    if dtype is u8:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def narrow_int(dtype: DType) -> bool:
    """Whether ``dtype`` is an integer narrower than 32 bits (i8, u8): the GPU has no float conversion that saturates
    to it (it converts through 16 bits), so backends clamp a float converted to one first."""
    return not dtype.is_float and dtype is not bool_ and dtype.itemsize < 4


def to_int(x, dtype: DType) -> np.ndarray:
    """``x`` as values of the integer ``dtype``, held in int64: integers wrapped to its width (two's
    complement; u8 modulo 256), floats truncated toward zero, saturated to its range, NaN as 0."""
    a = np.asarray(x)
    np_dtype = np.dtype(f"{'uint' if dtype is u8 else 'int'}{8 * dtype.itemsize}")
    if a.dtype.kind == "f":
        lo, hi = int_range(dtype)
        with np.errstate(invalid="ignore"):
            t = np.trunc(np.where(np.isnan(a), 0.0, a))
            # compared with hi + 1 (2**(bits - 1), or 256), which a float holds exactly (hi = 2**63 - 1 does not: as
            # a float it is 2**63, so `t > hi` would let 2**63 through to wrap to lo)
            over, under = t >= float(hi + 1), t < lo
            inside = np.where(over | under, 0.0, t).astype(np.int64)
        return np.where(over, hi, np.where(under, lo, inside)).astype(np.int64)
    return a.astype(np.int64).astype(np_dtype).astype(np.int64)


def compute_dtype(*dtypes: DType) -> DType:
    """The dtype element-wise work and reductions over operands of ``dtypes`` run in: f64 if any is f64, else f32
    if any is a float (Triton's math takes 32- or 64-bit floats), else i64 if any is i64, else i32. Integer tiles
    stay integers, so a sum, max or min of indices is exact (f32 holds integers only up to 2**24), and integer
    arithmetic wraps at that width (an integer op passes its integer result dtype too: ``i32 + i32 -> i64``
    computes in i64)."""
    if f64 in dtypes:
        return f64
    if any(d.is_float for d in dtypes):
        return f32
    return i64 if i64 in dtypes else i32


def _round_f8e4m3(x: np.ndarray) -> np.ndarray:
    """x rounded to E4M3 "fn" as torch's cast (and the GPU's satfinite conversion) does: 3 mantissa bits, round
    to nearest even, subnormals below 2**-6 (spacing 2**-9), saturated to +-448 (E4M3 has no infinity;
    infinities saturate too); NaN stays NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.clip(x, -F8E4M3_MAX, F8E4M3_MAX)
        _, e = np.frexp(x)                                  # x = m * 2**e, 0.5 <= |m| < 1
        step = np.exp2(np.maximum(e - 1, -6) - 3)          # the spacing of E4M3 values at x's exponent
        return np.round(x / step) * step                     # numpy rounds halves to even


class Space(enum.Enum):
    REG = "reg"          # registers of the threads of one program
    SHARED = "shared"    # shared memory of one program's block


@dataclasses.dataclass(frozen=True)
class TileType:
    """A tile (rank 2) or vector (rank 1) with static shape and dtype in a memory space."""
    space: Space
    dtype: DType
    shape: tuple[int, ...]

    @property
    def is_vec(self) -> bool:
        return len(self.shape) == 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        kind = ("RegVec" if self.is_vec else "RegTile") if self.space is Space.REG else \
               ("SharedVec" if self.is_vec else "SharedTile")
        return f"{kind}[{self.dtype}, {', '.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class StagesType:
    """A multi-stage shared buffer: ``stages`` shared tiles of one shape, filled by asynchronous loads (a ring
    a producer fills ahead of its consumers)."""
    dtype: DType
    shape: tuple[int, ...]     # one stage's
    stages: int
    space: Space = Space.SHARED

    @property
    def stage(self) -> TileType:
        return TileType(Space.SHARED, self.dtype, self.shape)

    @property
    def nbytes(self) -> int:
        return self.stages * self.stage.nbytes

    def __str__(self) -> str:
        return f"SharedStages[{self.dtype}, {self.stages} x {', '.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class GlobalType:
    """A global tensor argument of the kernel: dtype and rank are static, sizes and strides are not."""
    dtype: DType
    rank: int

    def __str__(self) -> str:
        return f"Global[{self.dtype}, rank {self.rank}]"


@dataclasses.dataclass(frozen=True)
class ScalarType:
    """A scalar: ``index`` for sizes, block ids and tile coordinates; ``float`` for runtime floats."""
    kind: str

    def __str__(self) -> str:
        return self.kind


INDEX = ScalarType("index")
FLOAT = ScalarType("float")

Type = TileType | StagesType | GlobalType | ScalarType
