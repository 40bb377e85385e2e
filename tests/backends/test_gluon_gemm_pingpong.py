"""A GEMM in CUTLASS's ping-pong schedule, hand-written with the explicit-hardware ops: programs loop over pairs of
output tiles; a producer warpgroup streams each tile's A and B blocks into the ring of the consumer that owns it;
two consumer warpgroups take the tiles of a pair, one each, and run their main loops in turn (ts.wait_turn /
ts.pass_turn around the whole loop), so one consumer's epilogue (convert, store) runs while the other's main loop
has the matrix units. Its meaning is checked on the reference executor; its sm_90a compile here; its speed by
scripts/gpu/check_gluon.py (section bench) on a GPU."""

import pytest
import torch

import tilestack.lang as ts
from tilestack.backends import get_backend

ROLES = ("consumer0", "consumer1")
CONSUMER = dict(warps=4, registers=232)
PRODUCER = dict(warps=4, registers=40)


def _programs(A, B, BM, BN, PROGRAMS):
    pairs = ts.cdiv(ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN), 2)
    return (ts.smin(pairs, PROGRAMS),)


@ts.kernel(grid=_programs)
def gemm_pingpong(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 2, PROGRAMS: int = 132):
    """C = A @ B (A (M, K), B (K, N), C (M, N)). Tile t of the row-major tile order is (t // cols, t % cols); a
    program takes pairs pid, pid + PROGRAMS, ..., consumer g tile 2 * pair + g (past the last tile: loads read
    zeros, the store writes nothing). Each consumer has rings of its own (a ring's phases follow one reader).
    The producer runs the two main loops' loads in order, so a tile's first STAGES loads are issued only as the
    tile before has its last STAGES steps left: at each change of tile that much latency is exposed (CUTLASS's
    producer runs further ahead through one ring shared by both consumers)."""
    M, K = A.shape
    N = B.shape[1]
    cols = ts.cdiv(N, BN)
    pairs = ts.cdiv(ts.cdiv(M, BM) * cols, 2)
    steps = ts.smax(ts.cdiv(K, BK), 1)
    a_ring = [ts.SharedStages[A.dtype, STAGES, BM, BK]() for _ in ROLES]
    b_ring = [ts.SharedStages[B.dtype, STAGES, BK, BN]() for _ in ROLES]
    a = [ts.SharedTile[A.dtype, BM, BK]() for _ in ROLES]
    b = [ts.SharedTile[B.dtype, BK, BN]() for _ in ROLES]
    acc = []
    for role in ROLES:
        with ts.partition(role, **CONSUMER):
            acc.append(ts.RegTile[ts.f32, BM, BN]())
            ts.zero(acc[-1])
    for pair in ts.range(ts.block_id(0), pairs, ts.num_blocks(0)):
        for g, role in enumerate(ROLES):
            t = 2 * pair + g
            i, j = t // cols, t % cols
            with ts.partition(role, **CONSUMER):
                ts.zero(acc[g])
                ts.wait_turn(*ROLES)                      # the main loops take turns on the matrix units
            for k in ts.range(steps):
                s = k % STAGES
                with ts.partition("producer", **PRODUCER):
                    ts.async_load(a_ring[g], s, A, at=(i, k))     # (BM, BK)
                    ts.async_load(b_ring[g], s, B, at=(k, j))     # (BK, BN)
                with ts.partition(role, **CONSUMER):
                    ts.wait_load(a[g], a_ring[g], s)
                    ts.wait_load(b[g], b_ring[g], s)
                    ts.mma_AB_async(acc[g], a[g], b[g], acc[g])
            with ts.partition(role, **CONSUMER):
                ts.pass_turn(*ROLES)                      # the other consumer's main loop, under this epilogue
                ts.mma_wait(acc[g])
                c = ts.RegTile[C.dtype, BM, BN]()
                ts.copy(c, acc[g])
                ts.store(C, c, at=(i, j))


@pytest.mark.parametrize(("m", "n", "k", "programs"), [(130, 300, 72, 2), (64, 64, 64, 5), (257, 129, 33, 1),
                                                       (16, 600, 200, 3)])
def test_it_means_a_product(m, n, k, programs):
    g = torch.Generator().manual_seed(m + n + k)
    a, b = torch.randn(m, k, generator=g).bfloat16(), torch.randn(k, n, generator=g).bfloat16()
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    gemm_pingpong(a, b, c, backend="reference", BM=32, BN=64, BK=16, PROGRAMS=programs)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-2, atol=1e-2)


def test_its_source_hands_the_turn_on_after_the_main_loop_and_before_the_epilogue():
    spec = ts.ArgSpec(ts.bf16, 2)
    src = get_backend("gluon").source(gemm_pingpong.trace(spec, spec, spec))
    compile(src, "<gluon gemm pingpong>", "exec")
    first = src.split("def gemm_pingpong_consumer0(")[1].split("@gluon.jit")[0]
    pair_loop = first.split("for pair_")[1] if "for pair_" in first else first.split("for ")[1]
    assert pair_loop.index("bar.sync 15, 256") < pair_loop.index("is_async=True")
    assert pair_loop.index("bar.arrive 14, 256") < pair_loop.index("tma.async_copy_shared_to_global")


SHARED_PER_BLOCK = 232448     # bytes of shared memory a block may have on Hopper (227 KiB)


# a consumer's accumulator is BM x BN f32 over its 128 threads: 128 x 256 would need 256 registers each
@pytest.mark.parametrize(("bm", "bn", "bk", "stages"), [(128, 128, 64, 2), (64, 256, 64, 2), (128, 128, 32, 4)])
def test_it_compiles_for_sm90a_with_its_wgmma_asynchronous(bm, bn, bk, stages):
    from tilestack.backends.gluon import aot
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    x = torch.empty(8192, 8192, dtype=torch.bfloat16, device="meta")
    k = be.aot(gemm_pingpong.trace(x, x, x, BM=bm, BN=bn, BK=bk, STAGES=stages), be.Options())
    res, sass = aot.resources(k), aot.sass(k)
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
    assert res["num_warps"] == 12 and f"HGMMA.64x{bn}x16.F32.BF16" in sass
    assert res["shared_bytes"] <= SHARED_PER_BLOCK            # two consumers' rings and their epilogues' buffers
    assert "BAR.SYNC.DEFER_BLOCKING 0xf, 0x100" in sass and "BAR.ARV 0xe, 0x100" in sass
