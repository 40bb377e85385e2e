"""Round 15's explicit-hardware kernels (test_heldout_round15.py, test_heldout_round15_more.py) on the Gluon backend,
on this machine (no GPU): the synchronization of the generated source, checked structurally (gluon_sync_check: each
stage freed once, in the block that waited on it, after the last wgmma that reads it has retired; the producer's
expect and copy after the stage is free; a phase flip per wait), and the sm_90a compile (HGMMA, setmaxnreg for the
roles, no serialized wgmma, the spills reported). Two lowerings this round found wrong are pinned here: a stage waited
in an outer loop and read by the wgmmas of an inner loop was freed inside the inner loop, once per inner trip; a
second wait on a stage already waited in the trip hung; a stage computed from an int64 index read from memory
(load_scalar) failed in Gluon's compiler ("expected 'index' to be int32")."""

import re

import pytest
from gluon_sync_check import check_sync, partitions
from test_heldout_round15 import (
    gemm_heads,
    gemm_outer_stage,
    gemm_persistent,
    gemm_split_m,
    gemm_split_n,
    gemm_splitk,
    gemm_splitk_table,
    gemm_three_loops,
)
from test_heldout_round15_more import (
    ffn_b2b,
    gemm_three_turns,
    scale_shift_colsum,
    swa_sink,
    sync_and_async,
    three_readers,
)

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.errors import BackendError

BF2, BF3, BF4 = (ts.ArgSpec(ts.bf16, r) for r in (2, 3, 4))
F2 = ts.ArgSpec(ts.f32, 2)
ROLES2 = ("consumer0", "consumer1", "producer")
ROLES1 = ("consumer", "producer")

CASES = {   # name -> (kernel, trace args, constants, roles)
    "split_n": (gemm_split_n, (BF2, BF2, BF2), {}, ROLES2),
    "split_m": (gemm_split_m, (BF2, BF2, BF2), {}, ROLES2),
    "splitk": (gemm_splitk, (BF2, BF2, F2), {}, ROLES1),
    "splitk_table_i32": (gemm_splitk_table, (BF2, BF2, ts.ArgSpec(ts.i32, 1), F2), {}, ROLES1),
    "splitk_table_i64": (gemm_splitk_table, (BF2, BF2, ts.ArgSpec(ts.i64, 1), F2), {}, ROLES1),
    "persistent": (gemm_persistent, (BF2, BF2, BF2), {}, ROLES1),
    "three_loops": (gemm_three_loops, (BF2, BF2, BF2), {}, ROLES1),
    "heads": (gemm_heads, (BF3, BF3, BF3), {}, ROLES1),
    "outer_stage": (gemm_outer_stage, (BF3, BF3, BF3), {}, ROLES1),
    "three_readers": (three_readers, (BF2,) * 5, {}, ROLES1),
    "sync_and_async": (sync_and_async, (BF2,) * 5, {}, ROLES1),
    "three_turns": (gemm_three_turns, (BF2, BF2, BF2), {}, ("consumer0", "consumer1", "consumer2", "producer")),
    "element_wise": (scale_shift_colsum, (BF2, BF2, BF2, BF2, F2), {}, ROLES2),
    "ffn_b2b": (ffn_b2b, (BF2, BF2, BF2, BF2), {}, ROLES1),
    "swa_sink": (swa_sink, (BF4, BF4, BF4, BF4, 0.125), dict(WINDOW=256), ROLES2),
}


def traced(name):
    kernel, args, consts, _ = CASES[name]
    return kernel.trace(*args, **consts)


def source(name) -> str:
    return get_backend("gluon").source(traced(name))


@pytest.mark.parametrize("name", list(CASES))
def test_every_stage_is_freed_once_after_its_last_reader(name):
    kernel, _, _, roles = CASES[name]
    src = source(name)
    compile(src, f"<gluon {name}>", "exec")
    check_sync(src, kernel.name, roles)


def test_a_stage_waited_per_head_is_freed_after_the_inner_loop_not_in_it():
    # gemm_outer_stage: X's stage is waited once per head and read by the wgmma of every trip over W's blocks. It was
    # freed inside the inner loop, after the first trip's wgmma wait: an arrival per inner trip on a barrier that
    # counts one, so the producer refilled the stage while later trips still read it
    part = partitions(source("outer_stage"), "gemm_outer_stage", ROLES1)["consumer"]
    frees = [x for x in part if "mbarrier.arrive(x_ring_empty" in x]
    assert len(frees) == 1
    head_loop = next(n for n, x in enumerate(part) if x.strip().startswith("for h_"))
    inner = next(n for n, x in enumerate(part) if x.strip().startswith("for j_"))
    depth = len(part[inner]) - len(part[inner].lstrip())
    assert head_loop < inner < part.index(frees[0]) and len(frees[0]) - len(frees[0].lstrip()) == depth


def test_three_roles_take_turns_round_and_round():
    parts = partitions(source("three_turns"), "gemm_three_turns", CASES["three_turns"][3])
    bars = {r: re.findall(r"bar\.(sync|arrive) (\d+), (\d+);", "\n".join(parts[r])) for r in parts}
    # consumer k syncs on its own barrier, the one before it arrives there (consumer2 -> consumer0 round the end);
    # consumer2 hands consumer0 its first turn, consumer0 takes consumer2's last pass at its end; 2 x 4 warps each
    assert bars["consumer0"] == [("sync", "15", "256"), ("arrive", "14", "256"), ("sync", "15", "256")]
    assert bars["consumer1"] == [("sync", "14", "256"), ("arrive", "13", "256")]
    assert bars["consumer2"] == [("arrive", "15", "256"), ("sync", "13", "256"), ("arrive", "15", "256")]
    assert bars["producer"] == []


def _one_tile_kernel(body):
    @ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 128),))
    def k(X, W, Y):
        body(X, W, Y)
    return k


def _twice(X, W, Y):
    """A consumer waiting twice on one stage in a trip (`s` written as two expressions)."""
    ring = ts.SharedStages[X.dtype, 2, 128, 64]()
    x1 = ts.SharedTile[X.dtype, 128, 64]()
    x2 = ts.SharedTile[X.dtype, 128, 64]()
    w = ts.SharedTile[W.dtype, 64, 64]()
    i = ts.block_id(0)
    with ts.partition("consumer", warps=8, registers=232):
        ts.load(w, W, at=(0, 0))
    for j in ts.range(ts.cdiv(X.shape[1], 64)):
        with ts.partition("producer", warps=4, registers=40):
            ts.async_load(ring, j % 2, X, at=(i, j))
        with ts.partition("consumer", warps=8, registers=232):
            ts.wait_load(x1, ring, j % 2)
            acc = ts.RegTile[ts.f32, 128, 64]()
            ts.zero(acc)
            ts.mma_AB_async(acc, x1, w, acc)
            ts.mma_wait(acc)
            ts.wait_load(x2, ring, j % 2)
            ts.mma_AB_async(acc, x2, w, acc)
            ts.mma_wait(acc)
            y = ts.RegTile[Y.dtype, 128, 64]()
            ts.copy(y, acc)
            ts.store(Y, y, at=(i, j))


def test_a_second_wait_on_a_stage_in_one_trip_is_refused_by_line():
    # it took the stage's next phase (no load completes it: the producer waits for the stage to be freed first) and
    # freed the stage twice: a hang on the GPU. The reference reads the same tile twice (2 x X W per block)
    k = _one_tile_kernel(_twice)
    with pytest.raises(BackendError, match=r"test_heldout_round15_gluon\.py:\d+: the gluon backend waits on each "
                                           r"loaded stage once.*`ring` that the wait_load at .*round15_gluon\.py"):
        get_backend("gluon").source(k.trace(BF2, BF2, BF2))
    import torch
    x, w = torch.randn(128, 128), torch.randn(64, 64)
    y = torch.full((128, 128), float("nan"))
    k(x, w, y, backend="reference")
    want = 2 * (x.double().view(128, 2, 64) @ w.double()).reshape(128, 128)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def _outer_in_flight(X, W, Y):
    """X's stage waited per head and read by an accumulation left in flight past the head's trip."""
    x_ring = ts.SharedStages[X.dtype, 2, 128, 64]()
    w_ring = ts.SharedStages[W.dtype, 2, 64, 64]()
    x = ts.SharedTile[X.dtype, 128, 64]()
    w = ts.SharedTile[W.dtype, 64, 64]()
    with ts.partition("consumer", warps=8, registers=232):
        acc = ts.RegTile[ts.f32, 128, 64]()
        ts.zero(acc)
    for h in ts.range(2):
        with ts.partition("producer", warps=4, registers=40):
            ts.async_load(x_ring, h % 2, X, at=(ts.block_id(0), h))
        with ts.partition("consumer", warps=8, registers=232):
            ts.wait_load(x, x_ring, h % 2)
        for j in ts.range(2):
            with ts.partition("producer", warps=4, registers=40):
                ts.async_load(w_ring, j % 2, W, at=(h * 2 + j, 0))
            with ts.partition("consumer", warps=8, registers=232):
                ts.wait_load(w, w_ring, j % 2)
                ts.mma_AB_async(acc, x, w, acc)
    with ts.partition("consumer", warps=8, registers=232):
        ts.mma_wait(acc)
        y = ts.RegTile[Y.dtype, 128, 64]()
        ts.copy(y, acc)
        ts.store(Y, y, at=(ts.block_id(0), 0))


def test_an_outer_stage_read_by_a_wgmma_still_in_flight_at_its_release_is_refused():
    # freed when the head's trip ends, the last inner wgmma may still read it: refused at that wgmma's line, not raced
    k = _one_tile_kernel(_outer_in_flight)
    with pytest.raises(BackendError, match=r"round15_gluon\.py:\d+: the gluon backend frees a stage of x_ring when "
                                           r"the block that waited on it ends.*mma_wait its result"):
        get_backend("gluon").source(k.trace(BF2, BF2, BF2))


# ---- sm_90a ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _ptxas():
    from tilestack.backends.gluon import aot
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list(CASES))
def test_it_compiles_for_sm90a_warp_specialized(_ptxas, name):
    from tilestack.backends.gluon import aot
    be = get_backend("gluon")
    k = be.aot(traced(name), be.Options())
    res, sass = aot.resources(k), aot.sass(k)
    assert not res["wgmma_serialized"], res["report"]
    assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]     # none at these tiles
    assert "USETMAXREG" in sass and "setmaxnreg" in k.asm["ptx"]
    t = traced(name)
    assert res["num_warps"] == sum(r.warps for r in t.ir.roles.values())   # every role's warps
    if name != "element_wise":
        assert "HGMMA" in sass
    assert "UTMALDG" in sass and "SYNCS" in sass
