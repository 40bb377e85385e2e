"""The rand op: Philox 4x32-10 counter-based uniforms, the same bits on the reference executor (NumPy, uint32
arithmetic written here) and in Triton (``tl.rand``, run by its interpreter), so a dropout mask drawn in a
forward kernel can be regenerated in the backward and in a test.
"""

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import BackendError, TileDTypeError, TileShapeError, TraceError
from tilestack.ir.ops import philox_uniform, philox_word, philox_words, rand_counters

# Triton's own random functions on int64 counters loaded from a tensor (no tilestack code in between)
_TRITON_RAND = '''
import triton
import triton.language as tl


@triton.jit
def triton_rand(Ctr, Word, Uniform, seed, N: tl.constexpr):
    k = tl.arange(0, N)
    ctr = tl.load(Ctr + k)
    tl.store(Word + k, tl.randint(seed, ctr))
    tl.store(Uniform + k, tl.rand(seed, ctr))
'''


def _triton_rand(seed: int, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tl.randint, tl.rand) of int64 ``counters`` under key ``seed``, by Triton's interpreter."""
    from tilestack.backends.triton.launch import compile_source

    fn = compile_source(_TRITON_RAND, "triton_rand", True)
    n = len(counters)
    word, uniform = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.float32)
    fn[(1,)](torch.from_numpy(counters.astype(np.int64)), word, uniform, seed, N=n)
    return word.numpy().view(np.uint32), uniform.numpy()


def test_known_answer_of_philox_4x32_10():
    """Random123's known-answer vector for Philox 4x32-10: counter 0, key 0 -> first word 0x6627e8d5."""
    assert int(philox_word(0, np.zeros(1, np.int64))[0]) == 0x6627E8D5


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**62 + 12345, -7], ids=str)
def test_the_reference_philox_gives_tritons_bits(seed, rng):
    """Counters below and above 2**32 (the high word is Philox's second counter word), near 2**63, and seeds
    of 32 and 64 bits (the high word is the second key word; a negative one as two's complement)."""
    counters = np.concatenate([np.arange(16), rng.integers(0, 2**32, 16), rng.integers(2**32, 2**63, 16, np.int64),
                               2**63 - 1 - np.arange(16)]).astype(np.int64)
    word, uniform = _triton_rand(seed, counters)
    assert np.array_equal(philox_word(seed, counters), word)
    got = philox_uniform(seed, counters)
    assert got.dtype == np.float32 and np.array_equal(got, uniform)


def test_uniforms_are_in_zero_one_and_look_uniform():
    u = philox_uniform(2024, np.arange(200_000))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 5e-3
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts / len(u) - 0.1) < 5e-3)
    assert not np.array_equal(u[:1000], philox_uniform(2025, np.arange(1000)))   # another key, other numbers


def test_the_largest_word_stays_below_one():
    """The conversion's scale keeps (2**31 - 1) * scale < 1 in f32 (folded negatives map to the same range)."""
    from tilestack.ir.ops import UINT32_TO_UNIFORM

    assert np.float32(2**31 - 1) * UINT32_TO_UNIFORM < 1.0


def test_counters_are_row_major_with_a_row_stride_in_64_bits():
    c = rand_counters((2, 3), offset=2**40, row=5, col=7, stride=100)
    assert c.tolist() == [[2**40 + 507, 2**40 + 508, 2**40 + 509], [2**40 + 607, 2**40 + 608, 2**40 + 609]]
    assert rand_counters((4,), offset=1, row=2, col=3, stride=10).tolist() == [24, 25, 26, 27]
    big = rand_counters((1, 1), offset=0, row=2**31, col=0, stride=2**31)   # past int32, exact in 64 bits
    assert int(big[0, 0]) == 2**62


@ts.kernel(grid=lambda Out, BM, BN: (ts.cdiv(Out.shape[0], BM), ts.cdiv(Out.shape[1], BN)))
def rand_kernel(Out, seed: int, offset: int, *, BM: int, BN: int):
    """Out[r, c] = uniform at counter offset + r * cols + c: one (BM, BN) tile per program."""
    i, j = ts.block_id(0), ts.block_id(1)
    u = ts.RegTile[ts.f32, BM, BN]()
    ts.rand(u, seed, offset, row=i * BM, col=j * BN, stride=Out.shape[1])
    ts.store(Out, u, at=(i, j))


@ts.kernel(grid=lambda Out, BM, BN: (ts.cdiv(Out.shape[0], BM), ts.cdiv(Out.shape[1], BN)))
def rand_n_kernel(Out, seed: int, offset: int, *, BM: int, BN: int, N: int):
    """Out[r, c] = number c % N of Philox at counter offset + r * cdiv(cols, N) + c // N."""
    i, j = ts.block_id(0), ts.block_id(1)
    u = ts.RegTile[ts.f32, BM, BN]()
    ts.rand(u, seed, offset, row=i * BM, col=j * BN, stride=ts.cdiv(Out.shape[1], N), per_counter=N)
    ts.store(Out, u, at=(i, j))


def rand_n_grid(seed: int, offset: int, rows: int, cols: int, n: int) -> np.ndarray:
    """What rand_n_kernel writes, from the definitions: column n*k + m is number m of counter k (tl.rand4x's
    uniforms for 4; for 8 the low 16-bit halves of tl.randint4x's words, then the high ones, over 65536)."""
    per_row = -(-cols // n)
    counters = offset + np.arange(rows)[:, None] * per_row + np.arange(per_row)[None, :]
    if n == 4:
        numbers = philox_uniform(seed, counters, per_counter=4)                  # (4, rows, per_row)
    else:
        w = philox_words(seed, counters)
        numbers = np.concatenate([w & 0xFFFF, w >> 16]).astype(np.float64) / 65536
    return np.moveaxis(numbers, 0, -1).reshape(rows, n * per_row)[:, :cols]


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("n", (4, 8))
@pytest.mark.parametrize("shape,seed,offset", [((37, 21), 5, 0), ((16, 70), 2**62 + 3, 2**61 + 16)], ids=str)
def test_several_numbers_per_counter(backend, n, shape, seed, offset):
    """per_counter=4 and 8: a quarter and an eighth of the Philox calls; ragged rows and columns."""
    out = torch.full(shape, float("nan"))
    rand_n_kernel(out, seed, offset, BM=16, BN=32, N=n, backend=backend)
    assert np.array_equal(out.numpy(), rand_n_grid(seed, offset, *shape, n))
    if n == 8:
        assert np.all(out.numpy() * 65536 == np.round(out.numpy() * 65536)) and out.max() < 1


def test_four_words_are_tritons_rand4x(rng):
    """The reference's four words are tl.rand4x's (the first is tl.rand's)."""
    from tilestack.backends.triton.launch import compile_source

    src = _TRITON_RAND.replace("def triton_rand(", "def triton_rand4x(").replace(
        "tl.store(Uniform + k, tl.rand(seed, ctr))",
        "a, b, c, d = tl.rand4x(seed, ctr)\n    tl.store(Uniform + k, a)\n    tl.store(Uniform + N + k, b)\n"
        "    tl.store(Uniform + 2 * N + k, c)\n    tl.store(Uniform + 3 * N + k, d)")
    fn = compile_source(src, "triton_rand4x", True)
    counters = np.concatenate([np.arange(8), rng.integers(2**32, 2**63, 8, np.int64)]).astype(np.int64)
    uniform = torch.zeros(4 * 16)
    fn[(1,)](torch.from_numpy(counters), torch.zeros(16, dtype=torch.int32), uniform, 99, N=16)
    assert np.array_equal(uniform.numpy().reshape(4, 16), philox_uniform(99, counters, per_counter=4))


def test_several_numbers_per_counter_need_an_aligned_first_column():
    out = torch.zeros(4, 64)
    with pytest.raises(BackendError, match=r"rand with per_counter=4 at col=2; a tile's first column must be a"):
        rand4_at_col2(out, 1, backend="reference")


@ts.kernel(grid=lambda Out: (1,))
def rand4_at_col2(Out, seed: int):
    u = ts.RegTile[ts.f32, 4, 16]()
    ts.rand(u, seed, col=2, per_counter=4)
    ts.store(Out, u, at=(0, 0))


@ts.kernel(grid=lambda Out, N: (ts.cdiv(Out.shape[0], N),))
def rand_vec_kernel(Out, seed: int, *, N: int):
    """Out[k] = uniform at counter k (a vector; the default offset, row and stride)."""
    i = ts.block_id(0)
    u = ts.RegVec[ts.f32, N]()
    ts.rand(u, seed, col=i * N)
    ts.store(Out, u, at=(i,))


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("shape,seed,offset", [((37, 21), 5, 0), ((16, 48), 2**62 + 3, 2**61 + 16),
                                               ((3, 70), 2**31 - 1, 2**32 - 40)], ids=str)
def test_the_op_is_the_same_on_both_backends(backend, shape, seed, offset):
    """A ragged grid of tiles (edges dropped at the store): every element is the uniform at its row-major
    counter, the same bits on each backend."""
    out = torch.full(shape, float("nan"))
    rand_kernel(out, seed, offset, BM=16, BN=32, backend=backend)
    want = philox_uniform(seed, offset + np.arange(shape[0] * shape[1])).reshape(shape)
    assert np.array_equal(out.numpy(), want)


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_a_vector(backend):
    out = torch.full((50,), float("nan"))
    rand_vec_kernel(out, 77, N=16, backend=backend)
    assert np.array_equal(out.numpy(), philox_uniform(77, np.arange(50)))


def test_the_ir_prints_and_costs_the_op():
    traced = rand_kernel.trace(ts.ArgSpec(ts.f32, 2), 1, 2, BM=16, BN=16)
    assert "rand" in str(traced.ir)
    assert "tl.rand(" in traced.source("triton")


def test_bad_uses_are_refused_at_trace_time():
    @ts.kernel(grid=lambda Out: (1,))
    def bf16_dst(Out, seed: int):
        u = ts.RegTile[ts.bf16, 16, 16]()
        ts.rand(u, seed)
        ts.store(Out, u, at=(0, 0))

    @ts.kernel(grid=lambda Out: (1,))
    def float_seed(Out, seed: float):
        u = ts.RegTile[ts.f32, 16, 16]()
        ts.rand(u, seed)
        ts.store(Out, u, at=(0, 0))

    @ts.kernel(grid=lambda Out: (1,))
    def ragged_words(Out, seed: int):
        u = ts.RegTile[ts.f32, 16, 6]()
        ts.rand(u, seed, per_counter=8)
        ts.store(Out, u, at=(0, 0))

    with pytest.raises(TileShapeError, match=r"rand: per_counter=8 for dst `u` \(16, 6\); expected 1, 4 or 8, div"):
        ragged_words.trace(ts.ArgSpec(ts.f32, 2), 1)
    with pytest.raises(TileDTypeError, match=r"rand: dst `u` is bf16; rand makes f32 uniforms"):
        bf16_dst.trace(ts.ArgSpec(ts.f32, 2), 1)
    with pytest.raises(TraceError, match=r"rand: seed must be an index"):
        float_seed.trace(ts.ArgSpec(ts.f32, 2), 1.0)
