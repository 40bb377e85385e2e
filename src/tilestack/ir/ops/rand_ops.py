"""Counter-based random numbers (Philox 4x32-10, bit for bit Triton's ``tl.rand``) and the op that makes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tilestack.errors import BackendError
from tilestack.ir.ops.registry import (
    Op,
    OpDef,
    RandAttrs,
    define,
)
from tilestack.ir.ops.rules import (
    check_arity,
    check_index,
    cost_per_result_element,
    fail,
)
from tilestack.ir.ops.tile_ops import (
    tile_result,
)

if TYPE_CHECKING:
    from tilestack.ir.nodes import Instr

# Counter-based random numbers: Philox 4x32-10 as Triton's ``tl.rand`` computes it, bit for bit, so a kernel's
# random tile is the same on every backend. The key is the 64-bit seed (low word k0, high word k1); the counter of
# an element is a 64-bit int (low word c0, high word c1, c2 = c3 = 0); the first output word, as a signed int32
# folded to >= 0 (x < 0 -> -x - 1), times 4.6566127342e-10 in f32 is the uniform float in [0, 1).
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)       # added to (k0, k1) after each round
PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)     # the multipliers of c0 and c2
PHILOX_ROUNDS = 10
UINT32_TO_UNIFORM = np.float32(4.6566127342e-10)   # the largest f32 with (2**31 - 1) * it < 1 after rounding
_U32 = np.uint64(0xFFFFFFFF)


HALF_TO_UNIFORM = np.float32(2.0**-16)   # a 16-bit half h as the uniform h / 65536 (exact in f32)


def philox_uniform(seed: int, counters, per_counter: int = 1) -> np.ndarray:
    """Uniform f32 in [0, 1) for each 64-bit counter (an int array, wrapped to 64 bits) under key ``seed``:
    the bits of Triton's ``tl.rand(seed, counters)`` with int64 counters. ``per_counter=4``: ``tl.rand4x``'s
    four, stacked on a new first axis; ``per_counter=8``: the 16-bit halves of ``tl.randint4x``'s words over
    65536 (multiples of 2**-16: the four low halves, then the four high ones), stacked on a new first axis."""
    words = philox_words(seed, counters)
    if per_counter == 8:
        return np.concatenate([words & 0xFFFF, words >> 16]).astype(np.float32) * HALF_TO_UNIFORM
    x = words[:per_counter].view(np.int32)
    x = np.where(x < 0, np.invert(x), x)     # -x - 1 without the overflow at -2**31
    u = x.astype(np.float32) * UINT32_TO_UNIFORM
    return u[0] if per_counter == 1 else u


def philox_word(seed: int, counters) -> np.ndarray:
    """Philox 4x32-10's first output word (uint32) for counters (c0, c1) = the 64-bit counter's (low, high)
    words, c2 = c3 = 0, and key (k0, k1) = the seed's (low, high) words: Triton's ``tl.randint``."""
    return philox_words(seed, counters)[0]


def philox_words(seed: int, counters) -> np.ndarray:
    """All four output words (uint32, stacked on a new first axis) of ``philox_word``: ``tl.randint4x``."""
    ctr = np.asarray(counters).astype(np.uint64)
    c0, c1 = ctr & _U32, ctr >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    seed = int(seed) % 2**64
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    ra, rb = (np.uint64(x) for x in PHILOX_ROUND)
    for _ in range(PHILOX_ROUNDS):   # products of two 32-bit words fit in uint64: hi = p >> 32, lo = p & mask
        pa, pb = ra * c0, rb * c2
        c0, c2, c1, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0, (pa >> np.uint64(32)) ^ c3 ^ k1, pb & _U32, pa & _U32)
        k0 = np.uint64((int(k0) + PHILOX_KEY[0]) & 0xFFFFFFFF)
        k1 = np.uint64((int(k1) + PHILOX_KEY[1]) & 0xFFFFFFFF)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def rand_counters(shape: tuple[int, ...], offset: int, row: int, col: int, stride: int) -> np.ndarray:
    """The rand op's counters: ``offset + (row + r) * stride + col + c`` for element (r, c) of a tile (a vector
    is one row: ``offset + row * stride + col + k``), wrapped to 64 bits as int64 arithmetic on the GPU. (With
    n uniforms per counter, the op asks for the counters of a tile 1/n as wide, from col // n.)"""
    wrap = [np.uint64(int(x) % 2**64) for x in (offset, row, col, stride)]
    offset, row, col, stride = wrap
    cols = np.arange(shape[-1], dtype=np.uint64)
    rows = np.arange(shape[0], dtype=np.uint64)[:, None] if len(shape) == 2 else np.uint64(0)
    with np.errstate(over="ignore"):
        return offset + (row + rows) * stride + col + cols


RAND_PER_COUNTER = (1, 4, 8)


def _rand_rule(ins: Instr) -> None:
    tile_result(ins)
    check_arity(ins, 5)
    if ins.result.type.dtype.name != "f32":
        fail(ins, f"makes f32 uniforms (as Triton's tl.rand), not a {ins.result.type}")
    for v, what in zip(ins.srcs, ("seed", "offset", "row", "col", "stride"), strict=True):
        check_index(ins, v, what)
    n = ins.attrs.per_counter
    if n not in RAND_PER_COUNTER or ins.result.type.shape[-1] % n:
        fail(ins, f"per_counter={n} for a {ins.result.type}; expected one of {RAND_PER_COUNTER}, dividing its width")


def _rand_ref(ins: Instr, s: list, m) -> np.ndarray:
    seed, offset, row, col, stride = s
    shape, n = ins.result.type.shape, ins.attrs.per_counter
    if n == 1:
        return philox_uniform(seed, rand_counters(shape, offset, row, col, stride)).astype(np.float64)
    if int(col) % n:
        raise BackendError(f"{ins.where}: rand with per_counter={n} at col={int(col)}; a tile's first column must "
                           f"be a multiple of {n}")
    narrow = (*shape[:-1], shape[-1] // n)
    u = philox_uniform(seed, rand_counters(narrow, offset, row, int(col) // n, stride), n)   # (n, ..., C/n)
    return np.moveaxis(u, 0, -1).reshape(shape).astype(np.float64)      # column n*k + w: uniform w of counter k


define(OpDef(
    Op.RAND, "(seed, offset, row, col, stride) -> f32 tile", "tile", RandAttrs, _rand_rule, _rand_ref,
    cost_per_result_element,
    doc="Uniform floats in [0, 1): Philox 4x32-10 (Triton's tl.rand) under key ``seed`` at counter "
        "``offset + (row + r) * stride + col + c`` for element (r, c), in 64-bit arithmetic. With per_counter "
        "n = 4 (tl.rand4x) or 8 (tl.randint4x's 16-bit halves / 65536), a 1/n of the work, element (r, c) is "
        "uniform (col + c) % n of counter ``offset + (row + r) * stride + (col + c) // n``; col must be a "
        "multiple of n."))
