"""Cost analysis, exact for given sizes: FLOPs, global bytes (only what is in bounds), on-chip bytes."""

import pytest
import torch

import tilestack.lang as ts


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm(A, B, C, *, BM: int, BN: int, BK: int):
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.store(C, acc, at=(i, j))


def gemm_traced(BM=32, BN=64, BK=16):
    return gemm.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.f32, 2), BM=BM, BN=BN, BK=BK)


@pytest.mark.parametrize(("m", "n", "k"), [(128, 64, 96), (64, 128, 16), (4096, 4096, 4096)])
def test_gemm_divisible(m, n, k):
    c = gemm_traced().cost((m, k), (k, n), (m, n))
    assert c.flops == c.mma_flops == 2 * m * n * k
    # every program reads its row band of A and column band of B, once
    assert c.bytes_read == 2 * (m * k * (n // 64) + k * n * (m // 32))
    assert c.bytes_written == 4 * m * n
    assert c.bytes == c.bytes_read + c.bytes_written
    # compulsory DRAM traffic: A and B read once, C written once; the roofline's intensity is against it
    assert c.dram_bytes_read == 2 * (m * k + k * n)
    assert c.dram_bytes_written == 4 * m * n
    assert c.intensity == c.flops / c.dram_bytes
    assert c.shared_bytes == 2 * (32 * 16 + 16 * 64)
    assert c.register_bytes == 4 * 32 * 64
    assert c.programs == (m // 32) * (n // 64)


@pytest.mark.parametrize(("m", "n", "k"), [(40, 50, 37), (1, 1, 1), (33, 65, 17)])
def test_gemm_ragged_counts_only_bytes_in_bounds(m, n, k):
    c = gemm_traced().cost((m, k), (k, n), (m, n))
    programs = cdiv(m, 32) * cdiv(n, 64)
    assert c.programs == programs
    assert c.flops == 2 * 32 * 64 * 16 * programs * cdiv(k, 16)   # masked edges still run on the tile
    assert c.bytes_read == 2 * (m * k * cdiv(n, 64) + k * n * cdiv(m, 32))
    assert c.bytes_written == 4 * m * n


def test_cost_takes_tensors_or_shapes():
    traced = gemm_traced()
    a, b, c = torch.empty(40, 24, dtype=torch.bfloat16), torch.empty(24, 72, dtype=torch.bfloat16), torch.empty(40, 72)
    assert traced.cost(a, b, c) == traced.cost((40, 24), (24, 72), (40, 72))
    assert traced.grid(a, b, c) == (2, 2)


@ts.kernel(grid=lambda Q, B: (ts.cdiv(Q.shape[0], B),))
def causal(Q, K, O, *, B: int, D: int):
    """Block i visits key blocks 0..i: the trip count depends on the block id."""
    i = ts.block_id(0)
    q = ts.SharedTile[Q.dtype, B, D]()
    k = ts.SharedTile[K.dtype, B, D]()
    s = ts.RegTile[ts.f32, B, B]()
    total = ts.RegVec[ts.f32, B]()
    ts.load(q, Q, at=(i, 0))
    ts.zero(total)
    for j in ts.range(i + 1):
        ts.load(k, K, at=(j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.make_causal(s, s, i * B - j * B)
        ts.exp(s, s)
        ts.row_sum(total, s, total)
    ts.store(O, total, at=(i,))


@pytest.mark.parametrize("n", [64, 40, 16, 1])
def test_causal_loop_trip_count_depends_on_block_id(n):
    b, d = 16, 32
    traced = causal.trace(ts.ArgSpec(ts.f16, 2), ts.ArgSpec(ts.f16, 2), ts.ArgSpec(ts.f32, 1), B=b, D=d)
    c = traced.cost((n, d), (n, d), (n,))
    blocks = cdiv(n, b)
    trips = sum(i + 1 for i in range(blocks))
    assert c.programs == blocks
    assert c.mma_flops == trips * 2 * b * b * d
    assert c.flops == c.mma_flops + trips * (b * b + b * b)            # exp, row_sum; fills and masks are free
    key_rows = sum(min(b, n - j * b) for i in range(blocks) for j in range(i + 1))
    assert c.bytes_read == 2 * (n * d + key_rows * d)
    assert c.bytes_written == 4 * n
    assert c.shared_bytes == 2 * (b * d + b * d)
    assert c.register_bytes == 4 * (b * b + b)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def elementwise(X, Y, n: int, *, BM: int, BN: int):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[ts.bf16, BM, BN]()
    v = ts.RegVec[ts.f32, BM]()
    ts.load(x, X, at=(i, 0))
    ts.exp(x, x)                 # BM*BN
    ts.add(x, x, 2.0)            # BM*BN
    ts.row_sum(v, x)             # BM*BN
    ts.mul_row(x, x, v)          # BM*BN
    ts.tril(x, x, 0)             # free
    for _ in ts.range(n):
        ts.sub(x, x, x)          # BM*BN per trip
    ts.copy(y, x)                # free
    ts.store(Y, y, at=(i, 0))


@pytest.mark.parametrize("trips", [0, 3])
def test_elementwise_counts(trips):
    traced = elementwise.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.bf16, 2), 0, BM=16, BN=32)
    c = traced.cost((40, 32), (40, 32), trips)
    assert c.programs == 3
    assert c.flops == 3 * 16 * 32 * (4 + trips)
    assert c.mma_flops == 0
    assert c.bytes_read == 4 * 40 * 32
    assert c.bytes_written == 2 * 40 * 32
    assert c.shared_bytes == 0
    assert c.register_bytes == 16 * 32 * 4 + 16 * 32 * 2 + 16 * 4


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[2], BN), X.shape[0] * X.shape[1]))
def heads(X, Y, *, BN: int, D: int):
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // X.shape[1], bh % X.shape[1]
    t = ts.RegTile[X.dtype, BN, D]()
    ts.load(t, X, at=(b, h, i, 0))
    ts.store(Y, t, at=(b, h, i, 0))
    ts.store(Y, t, at=(b + X.shape[0], h, i, 0))   # past the leading axis: moves nothing


def test_4d_leading_coordinates_count_in_bounds_only():
    shape = (2, 3, 40, 16)
    traced = heads.trace(ts.ArgSpec(ts.bf16, 4), ts.ArgSpec(ts.bf16, 4), BN=32, D=16)
    c = traced.cost(shape, shape)
    assert c.programs == 2 * 2 * 3
    assert c.bytes_read == c.bytes_written == 2 * 2 * 3 * 40 * 16


# ---- loops with a step, and what is provably non-negative ----------------------------------------------------------
@pytest.mark.parametrize(("start", "stop", "step", "trips"), [(0, 10, 3, 4), (9, -1, -2, 5), (5, 5, 1, 0),
                                                               (1, 10, 20, 1), (3, 0, 1, 0)])
def test_range_step_trip_counts(start, stop, step, trips):
    @ts.kernel(grid=lambda: (1,))
    def k(X):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(t)
        for _ in ts.range(start, stop, step):
            ts.add(t, t, 1.0)
        ts.store(X, t, at=(0, 0))

    assert k.trace(ts.ArgSpec(ts.f32, 2)).cost((16, 16)).flops == trips * 256


def test_nonnegative_indices():
    from tilestack.ir.ops import Op
    from tilestack.ir.scalars import nonnegative

    @ts.kernel(grid=lambda X: (1,))
    def k(X, n: int):
        i = ts.block_id(0)
        t = ts.RegVec[ts.f32, 16]()
        ts.zero(t)
        ts.store(X, t, at=(i * 16 + X.shape[0] // 2,))    # sizes, block ids, + * //: provably >= 0
        ts.store(X, t, at=((i - 1) // 2,))                 # a difference: not
        ts.store(X, t, at=(ts.smax(n, 0) % 4,))            # max with 0: >= 0 whatever n is
        ts.store(X, t, at=(n // 4,))                       # a runtime int: not

    ir = k.trace(ts.ArgSpec(ts.f32, 1), 3).ir
    stores = [ins for ins in ir.walk() if ins.op is Op.STORE]
    facts = nonnegative(ir.body)
    assert [ins.srcs[2] in facts for ins in stores] == [True, False, True, False]


def test_one_cost_record_for_kernels_and_formulas():
    from tilestack.ir.cost import Cost
    from tilestack.perf import formulas

    assert formulas.Cost is Cost
    f = formulas.matmul(64, 32, 16, "bf16")
    assert (f.flops, f.bytes_read, f.bytes_written) == (2 * 64 * 32 * 16, 2 * (64 * 16 + 16 * 32), 2 * 64 * 32)
    assert f.dram_bytes == f.bytes and f.intensity == f.flops / f.bytes   # a formula counts compulsory bytes
    k = gemm_traced().cost((64, 16), (16, 32), (64, 32))
    both = k + f
    assert both.flops == k.flops + f.flops and both.dram_bytes == k.dram_bytes + f.bytes
    assert k.scaled(2).dram_bytes == 2 * k.dram_bytes and k.scaled(2).shared_bytes == k.shared_bytes


def test_one_dtype_vocabulary_with_its_spec_sheet_spelling():
    from tilestack.ir.types import DTYPES, bf16, dtype_named, f8e4m3, f32
    from tilestack.perf import formulas

    assert dtype_named("f32") is dtype_named("fp32") is f32 and dtype_named("fp8") is f8e4m3
    for d in DTYPES.values():
        assert formulas.dtype_name(d) == d.spec and formulas.dtype_bytes(d) == d.itemsize, d
    assert formulas.matmul(8, 8, 8, bf16) == formulas.matmul(8, 8, 8, "bf16")
    with pytest.raises(KeyError, match="no dtype named 'f33'"):
        dtype_named("f33")
