"""Constrained spaces: each rule drops what it should, keeps what it should, and the library's defaults survive."""

import math

import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import TunableError
from tilestack.kernels.gemm import gemm_kernel
from tilestack.kernels.softmax import softmax_kernel
from tilestack.tune.constraints import ConstrainedSpace, arch_limits, estimate, problem_args, register_limit
from tilestack.tune.devices import DeviceKey
from tilestack.tune.library import library_problems

H100 = DeviceKey.parse("sm90-132sm-227kb")


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


GEMM = (_meta(1024, 1024), _meta(1024, 1024), _meta(1024, 1024))


def _gemm(**cfg):
    return estimate(gemm_kernel, GEMM, {}, {"GROUP_M": 8, **cfg}, H100)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def copy_kernel(X, Y, *, BM: int = ts.tunable(16, (16, 32, 512)), BN: int = ts.tunable(8, (4, 8, 16))):
    """Y[i-th row block, first BN columns] = X[...]: through a shared tile, so loads may use the copy engine."""
    i = ts.block_id(0)
    s = ts.SharedTile[X.dtype, BM, BN]()
    r = ts.RegTile[X.dtype, BM, BN]()
    ts.load(s, X, at=(i, 0))
    ts.load(r, s)
    ts.store(Y, r, at=(i, 0))


def test_shared_memory_counts_one_copy_per_stage_of_looped_tiles():
    # (BM, BK) and (BK, BN) bf16 operand tiles, one copy per pipelining stage (what sm_90a compiles: 98,328 B
    # for this config, the rest its barriers)
    e = _gemm(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    assert e.shared_bytes == 3 * (128 * 64 + 64 * 128) * 2
    assert e.kept and e.loop_loads


def test_shared_memory_over_the_device_is_a_hard_drop():
    cfg = dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=4)     # 4 x 48 KiB = 192 KiB
    assert _gemm(**cfg).valid
    small = DeviceKey.parse("sm90-132sm-100kb")
    e = estimate(gemm_kernel, GEMM, {}, {"GROUP_M": 8, **cfg}, small)
    assert not e.valid and e.hard[0].startswith("shared memory") and "102400" in e.hard[0]


def test_register_estimate_follows_the_accumulator_and_the_warps():
    four = _gemm(BM=128, BN=128, BK=64, num_warps=4, num_stages=3)
    eight = _gemm(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    # the (128, 128) f32 accumulator alone is 128 registers per thread at 4 warps, 64 at 8
    assert four.registers >= 128 > eight.registers >= 64
    assert four.kept and eight.kept
    huge = _gemm(BM=256, BN=256, BK=64, num_warps=4, num_stages=2)      # 512 accumulator registers per thread
    assert huge.valid and not huge.kept and huge.soft[0].startswith("registers")


def test_register_limit_is_the_register_file_over_the_block():
    hopper = arch_limits((9, 0))
    assert register_limit(128, hopper) == 255            # capped per thread
    assert register_limit(512, hopper) == 128            # 65536 / 512
    assert register_limit(1024, hopper) == 64
    assert arch_limits((9, 9)) == hopper                 # a newer minor reads the nearest older entry
    with pytest.raises(TunableError, match="compute capability"):
        arch_limits((7, 0))


def test_tma_inner_box_bytes():
    x, y = _meta(64, 4), _meta(64, 4)
    # 4 bf16 = 8 bytes, under the copy engine's 16: such a tile goes through pointers (backends.triton.passes.
    # uses_tma; Triton refuses its descriptor), so the config is valid and moves no TMA box
    thin = estimate(copy_kernel, (x, y), {}, dict(BM=16, BN=4), H100)
    assert thin.valid and not thin.tma_boxes and thin.pointer_accesses >= 2, (thin.hard, thin.tma_boxes)
    x, y = _meta(64, 8), _meta(64, 8)
    good = estimate(copy_kernel, (x, y), {}, dict(BM=16, BN=8), H100)
    assert good.valid, good.hard
    assert ("X", (16, 8)) in good.tma_boxes


def test_a_box_over_256_goes_through_pointers_not_tma():
    x, y = _meta(1024, 8), _meta(1024, 8)
    e = estimate(copy_kernel, (x, y), {}, dict(BM=512, BN=8), H100)
    assert e.valid, e.hard
    assert not e.tma_boxes and e.pointer_accesses == 2


def test_coverage_drops_tiles_that_leave_part_of_the_input_unread():
    x, y = _meta(64, 16), _meta(64, 16)
    e = estimate(copy_kernel, (x, y), {}, dict(BM=16, BN=8), H100)    # reads 8 of 16 columns
    assert not e.valid and any(r.startswith("coverage") for r in e.hard)


def test_backend_rules():
    e = _gemm(BM=64, BN=64, BK=32, num_warps=3, num_stages=2)
    assert not e.valid and e.hard[0].startswith("backend: num_warps=3")
    e = _gemm(BM=64, BN=64, BK=32, num_warps=64, num_stages=2)           # 2048 threads > 1024 per block
    assert not e.valid


def test_idle_warps_and_tiles_wider_than_the_tensor():
    x = _meta(64, 128)
    e = estimate(softmax_kernel, (x, _meta(64, 128)), dict(ONE_TILE=True), dict(BM=1, BN=128, num_warps=8), H100)
    assert e.valid and any(r.startswith("idle warps") for r in e.soft)          # 128 elements, 256 threads
    e = estimate(softmax_kernel, (x, _meta(64, 128)), dict(ONE_TILE=True), dict(BM=1, BN=512, num_warps=4), H100)
    assert any(r.startswith("tile wider") for r in e.soft)


def test_space_counts_and_duplicate_stages():
    x = _meta(64, 1024)
    space = ConstrainedSpace(softmax_kernel, (x, _meta(64, 1024)), dict(ONE_TILE=True),
                             dict(BM=(1, 2, 4), BN=(512, 1024), num_warps=(4, 8), num_stages=(1, 2)), H100)
    s = space.summary()
    assert s["raw"] == 3 * 2 * 2 * 2 == len(space.raw())
    # BN=512 reads half of each 1024-wide row; num_stages=2 compiles the same loop-free code as 1
    assert s["dropped_by"]["coverage"] == 12 and s["dropped_by"]["duplicate"] == 6
    assert s["kept"] == 6 and all(c["BN"] == 1024 and c["num_stages"] == 1 for c in space.kept())
    assert {tuple(sorted(c.items())) for c in space.kept()} <= {tuple(sorted(c.items())) for c in space.valid()}


def test_space_checks_its_domains():
    x = _meta(64, 1024)
    with pytest.raises(TunableError, match="BQ"):
        ConstrainedSpace(softmax_kernel, (x, x), {}, dict(BQ=(1,)), H100)
    with pytest.raises(TunableError, match="outside"):
        ConstrainedSpace(softmax_kernel, (x, x), {}, dict(BM=(3,)), H100)


@pytest.mark.parametrize("kernel", ["gemm", "softmax", "attention_fwd", "attention_bwd", "cross_entropy"])
def test_library_defaults_are_kept(kernel):
    from tilestack.tune.space import SearchSpace

    p = library_problems([kernel], ("bfloat16",))[0]
    args = problem_args(p)
    cfg = {**SearchSpace(p.tile, fixed=p.fixed).defaults(), **p.default}
    e = estimate(p.tile, args, p.fixed, cfg, H100)
    assert e.kept, (p.name, cfg, e.hard, e.soft)
    assert e.flops and e.programs and math.isfinite(e.flops)
