"""Round 15's held-out kernels, written with the explicit-hardware ops (SharedStages rings, async_load / wait_load,
async mmas and their waits, warp roles): GEMMs a user schedules by hand. Each is checked here against float64 torch
on the reference executor and under Triton's interpreter (which drops the roles), on ragged sizes with poisoned
outputs; test_heldout_round15_gluon.py checks the synchronization of their Gluon source and compiles them for sm_90a.

- gemm_split_n: a producer and two consumer warpgroups owning half the output columns each (A's stage read by both)
- gemm_split_m: the same with the rows split (B's stage read by both, an A ring per consumer)
- gemm_splitk: split-K, each program's partial product added into C with atomics
- gemm_splitk_table: split-K by a table of K-tile bounds read with load_scalar (int32 or int64)
- gemm_persistent: programs loop over output tiles (ts.range(block_id, tiles, num_blocks)); the ring's stage
  counts the program's trips over every tile it takes
- gemm_three_loops: K in three consecutive loops, one ring of 4 stages threaded through, the product in flight
- gemm_heads: an outer loop over heads around the K loop, stage = (head * k_tiles + k) % STAGES
- gemm_outer_stage: a stage waited once per head (outer loop) and read by every trip of the inner loop
"""

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, launch, randn

import tilestack.lang as ts

PRODUCER = dict(warps=4, registers=40)
CONSUMER = dict(warps=8, registers=232)      # one consumer of two warpgroups
HALF = dict(warps=4, registers=232)          # each of two consumers
ROLES = ("consumer0", "consumer1")


def _tiles_2d(A, B, BM, BN):
    return (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], BN))


@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], 2 * BN)))
def gemm_split_n(A, B, C, *, BM: int = 128, BN: int = 64, BK: int = 64, STAGES: int = 3):
    """C = A @ B; a program owns BM x 2BN of C, consumer g its columns [g BN, (g + 1) BN): both read A's stage."""
    i, j = ts.block_id(0), ts.block_id(1)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = [ts.SharedStages[B.dtype, STAGES, BK, BN]() for _ in ROLES]
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = [ts.SharedTile[B.dtype, BK, BN]() for _ in ROLES]
    acc = []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            acc.append(ts.RegTile[ts.f32, BM, BN]())
            ts.zero(acc[g])
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(a_ring, s, A, at=(i, k))
            for g in range(2):
                ts.async_load(b_ring[g], s, B, at=(k, 2 * j + g))
        for g, role in enumerate(ROLES):
            with ts.partition(role, **HALF):
                ts.wait_load(a, a_ring, s)
                ts.wait_load(b[g], b_ring[g], s)
                ts.mma_AB_async(acc[g], a, b[g], acc[g])
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            ts.mma_wait(acc[g])
            c = ts.RegTile[C.dtype, BM, BN]()
            ts.copy(c, acc[g])
            ts.store(C, c, at=(i, 2 * j + g))


@ts.kernel(grid=_tiles_2d)
def gemm_split_m(A, B, C, *, BM: int = 256, BN: int = 128, BK: int = 64, STAGES: int = 2):
    """C = A @ B; consumer g owns rows [g BM/2, (g + 1) BM/2) of the program's BM x BN tile: both read B's stage,
    each waits on its own A ring; every product waited within the trip."""
    HM = BM // 2
    i, j = ts.block_id(0), ts.block_id(1)
    a_ring = [ts.SharedStages[A.dtype, STAGES, HM, BK]() for _ in ROLES]
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = [ts.SharedTile[A.dtype, HM, BK]() for _ in ROLES]
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            acc.append(ts.RegTile[ts.f32, HM, BN]())
            ts.zero(acc[g])
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(b_ring, s, B, at=(k, j))
            for g in range(2):
                ts.async_load(a_ring[g], s, A, at=(2 * i + g, k))
        for g, role in enumerate(ROLES):
            with ts.partition(role, **HALF):
                ts.wait_load(b, b_ring, s)
                ts.wait_load(a[g], a_ring[g], s)
                ts.mma_AB_async(acc[g], a[g], b, acc[g])
                ts.mma_wait(acc[g])
    for g, role in enumerate(ROLES):
        with ts.partition(role, **HALF):
            c = ts.RegTile[C.dtype, HM, BN]()
            ts.copy(c, acc[g])
            ts.store(C, c, at=(2 * i + g, j))


@ts.kernel(grid=lambda A, B, BM, BN, SPLITS: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], BN), SPLITS))
def gemm_splitk(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 3, SPLITS: int = 3):
    """C += A @ B (C f32, zeroed by the caller); program (i, j, z) takes K tiles [z * per, (z + 1) * per) and adds
    its partial product atomically."""
    i, j, z = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    nk = ts.cdiv(A.shape[1], BK)
    per = ts.cdiv(nk, SPLITS)
    k0, k1 = z * per, ts.smin((z + 1) * per, nk)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    with ts.partition("consumer", **CONSUMER):
        acc = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(acc)
    for k in ts.range(k0, k1):
        s = (k - k0) % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(a_ring, s, A, at=(i, k))
            ts.async_load(b_ring, s, B, at=(k, j))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.mma_AB_async(acc, a, b, acc)
    with ts.partition("consumer", **CONSUMER):
        ts.mma_wait(acc)
        ts.atomic_add(C, acc, at=(i, j))


@ts.kernel(grid=lambda A, B, BOUNDS, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], BN),
                                              BOUNDS.shape[0] - 1))
def gemm_splitk_table(A, B, BOUNDS, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 3):
    """C += A @ B (C f32, zeroed by the caller), split K by a table: program z takes the K tiles [BOUNDS[z],
    BOUNDS[z + 1]) read with load_scalar (an int32 or int64 tensor), its ring's stage (k - k0) % STAGES."""
    i, j, z = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    k0, k1 = ts.load_scalar(BOUNDS, z), ts.load_scalar(BOUNDS, z + 1)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    with ts.partition("consumer", **CONSUMER):
        acc = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(acc)
    for k in ts.range(k0, k1):
        s = (k - k0) % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(a_ring, s, A, at=(i, k))
            ts.async_load(b_ring, s, B, at=(k, j))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.mma_AB_async(acc, a, b, acc)
    with ts.partition("consumer", **CONSUMER):
        ts.mma_wait(acc)
        ts.atomic_add(C, acc, at=(i, j))


def _programs(A, B, BM, BN, PROGRAMS):
    return (ts.smin(ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN), PROGRAMS),)


@ts.kernel(grid=_programs)
def gemm_persistent(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 4, PROGRAMS: int = 132):
    """C = A @ B; programs loop over the output tiles (row-major order); the ring's stage is the program's trip
    count over all its tiles, (local tile * k_tiles + k) % STAGES."""
    M, K = A.shape
    cols = ts.cdiv(B.shape[1], BN)
    tiles = ts.cdiv(M, BM) * cols
    nk = ts.cdiv(K, BK)
    pid, programs = ts.block_id(0), ts.num_blocks(0)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    for tile in ts.range(pid, tiles, programs):
        i, j = tile // cols, tile % cols
        local = (tile - pid) // programs
        with ts.partition("consumer", **CONSUMER):
            acc = ts.RegTile[ts.f32, BM, BN]()
            ts.zero(acc)
        for k in ts.range(nk):
            s = (local * nk + k) % STAGES
            with ts.partition("producer", **PRODUCER):
                ts.async_load(a_ring, s, A, at=(i, k))
                ts.async_load(b_ring, s, B, at=(k, j))
            with ts.partition("consumer", **CONSUMER):
                ts.wait_load(a, a_ring, s)
                ts.wait_load(b, b_ring, s)
                ts.mma_AB_async(acc, a, b, acc)
        with ts.partition("consumer", **CONSUMER):
            ts.mma_wait(acc)
            c = ts.RegTile[C.dtype, BM, BN]()
            ts.copy(c, acc)
            ts.store(C, c, at=(i, j))


def _k_step(k, i, j, acc, a_ring, b_ring, a, b, A, B, STAGES):
    with ts.partition("producer", **PRODUCER):
        ts.async_load(a_ring, k % STAGES, A, at=(i, k))
        ts.async_load(b_ring, k % STAGES, B, at=(k, j))
    with ts.partition("consumer", **CONSUMER):
        ts.wait_load(a, a_ring, k % STAGES)
        ts.wait_load(b, b_ring, k % STAGES)
        ts.mma_AB_async(acc, a, b, acc)


@ts.kernel(grid=_tiles_2d)
def gemm_three_loops(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 4, FIRST: int = 2,
                     SECOND: int = 3):
    """C = A @ B with the K tiles in three loops ([0, FIRST), [FIRST, FIRST + SECOND), the rest; any may be
    empty), one ring threaded through them (stage k % STAGES), the accumulation in flight across them."""
    i, j = ts.block_id(0), ts.block_id(1)
    nk = ts.cdiv(A.shape[1], BK)
    e1 = ts.smin(nk, FIRST)
    e2 = ts.smin(nk, FIRST + SECOND)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    with ts.partition("consumer", **CONSUMER):
        acc = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(acc)
    for k in ts.range(0, e1):
        _k_step(k, i, j, acc, a_ring, b_ring, a, b, A, B, STAGES)
    for k in ts.range(e1, e2):
        _k_step(k, i, j, acc, a_ring, b_ring, a, b, A, B, STAGES)
    for k in ts.range(e2, nk):
        _k_step(k, i, j, acc, a_ring, b_ring, a, b, A, B, STAGES)
    with ts.partition("consumer", **CONSUMER):
        ts.mma_wait(acc)
        c = ts.RegTile[C.dtype, BM, BN]()
        ts.copy(c, acc)
        ts.store(C, c, at=(i, j))


@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[1], BM), ts.cdiv(B.shape[2], BN)))
def gemm_heads(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 3):
    """C[h] = A[h] @ B[h] for every head h, one program looping over the heads: the ring's stage counts the trips
    across heads, (h * k_tiles + k) % STAGES."""
    i, j = ts.block_id(0), ts.block_id(1)
    nk = ts.cdiv(A.shape[2], BK)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    for h in ts.range(A.shape[0]):
        with ts.partition("consumer", **CONSUMER):
            acc = ts.RegTile[ts.f32, BM, BN]()
            ts.zero(acc)
        for k in ts.range(nk):
            s = (h * nk + k) % STAGES
            with ts.partition("producer", **PRODUCER):
                ts.async_load(a_ring, s, A, at=(h, i, k))
                ts.async_load(b_ring, s, B, at=(h, k, j))
            with ts.partition("consumer", **CONSUMER):
                ts.wait_load(a, a_ring, s)
                ts.wait_load(b, b_ring, s)
                ts.mma_AB_async(acc, a, b, acc)
        with ts.partition("consumer", **CONSUMER):
            ts.mma_wait(acc)
            c = ts.RegTile[C.dtype, BM, BN]()
            ts.copy(c, acc)
            ts.store(C, c, at=(h, i, j))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[1], BM),))
def gemm_outer_stage(X, W, Y, *, BM: int = 128, BN: int = 64, D: int = 64, STAGES: int = 3):
    """Y[h] = X[h] @ W[h] with X (H, M, D), D one tile wide, W (H, D, N): the producer loads X's tile once per head
    into a 2-stage ring and W's tiles once per inner trip (two rings filled at different rates); the consumer waits
    on X's stage in the head loop and reads it in every trip of the loop over W's column blocks."""
    i = ts.block_id(0)
    nb = ts.cdiv(W.shape[2], BN)
    x_ring = ts.SharedStages[X.dtype, 2, BM, D]()
    w_ring = ts.SharedStages[W.dtype, STAGES, D, BN]()
    x = ts.SharedTile[X.dtype, BM, D]()
    w = ts.SharedTile[W.dtype, D, BN]()
    for h in ts.range(X.shape[0]):
        with ts.partition("producer", **PRODUCER):
            ts.async_load(x_ring, h % 2, X, at=(h, i, 0))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(x, x_ring, h % 2)
        for j in ts.range(nb):
            s = (h * nb + j) % STAGES
            with ts.partition("producer", **PRODUCER):
                ts.async_load(w_ring, s, W, at=(h, 0, j))
            with ts.partition("consumer", **CONSUMER):
                ts.wait_load(w, w_ring, s)
                acc = ts.RegTile[ts.f32, BM, BN]()
                ts.zero(acc)
                ts.mma_AB_async(acc, x, w, acc)
                ts.mma_wait(acc)
                y = ts.RegTile[Y.dtype, BM, BN]()
                ts.copy(y, acc)
                ts.store(Y, y, at=(h, i, j))


# ---- meaning: float64 torch on the reference executor and under Triton's interpreter -----------------------------
SMALL = dict(BM=16, BN=16, BK=16)


def _ab(seed, m, k, n, heads=None):
    rng = np.random.default_rng(seed)
    lead = () if heads is None else (heads,)
    return randn(rng, *lead, m, k), randn(rng, *lead, k, n)


def _close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k", "n"), [(37, 50, 45), (16, 16, 32), (70, 9, 33)])
def test_gemm_split_n_and_split_m(backend, m, k, n):
    a, b = _ab(m * k + n, m, k, n)
    want = a.double() @ b.double()
    c = torch.full((m, n), float("nan"))
    launch(gemm_split_n, backend, a, b, c, **SMALL)
    _close(c, want)
    c = torch.full((m, n), float("nan"))
    launch(gemm_split_m, backend, a, b, c, BM=32, BN=16, BK=16)
    _close(c, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k", "n", "splits"), [(37, 100, 45, 3), (20, 16, 20, 4), (33, 70, 17, 1)])
def test_gemm_splitk_adds_every_split_once(backend, m, k, n, splits):
    # splits past the K tiles (20 x 16 with 4 splits: three take no tile) add zeros
    a, b = _ab(splits + m, m, k, n)
    c = torch.zeros(m, n)
    launch(gemm_splitk, backend, a, b, c, SPLITS=splits, **SMALL)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_gemm_splitk_by_a_table_read_with_load_scalar(backend, dtype):
    a, b = _ab(5, 37, 100, 45)                      # 7 K tiles of 16
    bounds = torch.tensor([0, 1, 1, 4, 7], dtype=dtype)   # an empty split, and splits of 1 and 3 tiles
    c = torch.zeros(37, 45)
    launch(gemm_splitk_table, backend, a, b, bounds, c, **SMALL)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k", "n", "programs"), [(50, 40, 45, 4), (16, 16, 16, 3), (40, 72, 70, 1)])
def test_gemm_persistent_over_tiles(backend, m, k, n, programs):
    a, b = _ab(programs * 11 + k, m, k, n)
    c = torch.full((m, n), float("nan"))
    launch(gemm_persistent, backend, a, b, c, PROGRAMS=programs, STAGES=3, **SMALL)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("k", "first", "second"), [(100, 2, 3), (20, 2, 3), (40, 0, 1), (90, 7, 1)])
def test_gemm_three_loops_on_one_ring(backend, k, first, second):
    a, b = _ab(k + first, 33, k, 20)
    c = torch.full((33, 20), float("nan"))
    launch(gemm_three_loops, backend, a, b, c, FIRST=first, SECOND=second, **SMALL)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("heads", "m", "k", "n"), [(3, 37, 50, 20), (1, 16, 16, 16), (4, 20, 33, 40)])
def test_gemm_heads_nested_ring(backend, heads, m, k, n):
    a, b = _ab(heads * 7 + m, m, k, n, heads)
    c = torch.full((heads, m, n), float("nan"))
    launch(gemm_heads, backend, a, b, c, **SMALL)
    _close(c, a.double() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("heads", "m", "n"), [(3, 37, 50), (2, 16, 16), (1, 40, 70)])
def test_gemm_outer_stage_read_in_every_inner_trip(backend, heads, m, n):
    x, w = _ab(heads + n, m, 16, n, heads)
    y = torch.full((heads, m, n), float("nan"))
    launch(gemm_outer_stage, backend, x, w, y, BM=16, BN=16, D=16)
    _close(y, x.double() @ w.double())
