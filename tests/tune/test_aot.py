"""AOT compiles for sm_90a on this CPU: registers, spills and shared memory of a config, cached on disk."""

import pytest
import torch

from tilestack import config
from tilestack.kernels.gemm import gemm_kernel
from tilestack.kernels.softmax import softmax_kernel
from tilestack.tune import aot

pytestmark = pytest.mark.skipif(aot.missing_tools() is not None, reason=f"AOT compiles: {aot.missing_tools()}")


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


GEMM_ARGS = (_meta(512, 512), _meta(512, 512), _meta(512, 512))
SMALL_GEMM = dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=2)


@pytest.fixture
def cache_dir(tmp_path):
    with config.override(cache_dir=tmp_path):
        yield tmp_path / "aot"


def test_gemm_report_and_cache(cache_dir):
    r = aot.resources(gemm_kernel, GEMM_ARGS, {}, SMALL_GEMM)
    assert r.ok and r.error is None and not r.cached
    # two stages of the (64, 32) and (32, 64) bf16 operand tiles: 16 KiB, plus Triton's barriers
    assert 2 * 2 * (64 * 32 * 2) <= r.shared_bytes < 2 * 2 * (64 * 32 * 2) + 1024
    assert r.num_warps == 4 and r.num_stages == 2
    if r.registers is not None:          # cuobjdump present
        # a (64, 64) f32 accumulator over 128 threads is 32 registers each; a thread has at most 255
        assert 32 <= r.registers <= 255 and r.spills == 0
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1
    again = aot.resources(gemm_kernel, GEMM_ARGS, {}, SMALL_GEMM)
    assert again.cached and again.to_json() | {"compile_s": 0} == r.to_json() | {"compile_s": 0}
    assert not list(cache_dir.glob("*.tmp"))


def test_more_stages_more_shared(cache_dir):
    two = aot.resources(gemm_kernel, GEMM_ARGS, {}, SMALL_GEMM)
    three = aot.resources(gemm_kernel, GEMM_ARGS, {}, {**SMALL_GEMM, "num_stages": 3})
    stage = 2 * 64 * 32 * 2                     # one more copy of both bf16 operand tiles, plus its barrier
    assert stage <= three.shared_bytes - two.shared_bytes < stage + 64


def test_over_the_device_shared_memory_is_not_ok(cache_dir):
    r = aot.resources(gemm_kernel, GEMM_ARGS, {}, SMALL_GEMM, shared_limit=8 * 1024)
    assert not r.ok and "shared memory" in r.error and r.shared_bytes > 8 * 1024


def test_a_config_the_tracer_rejects(cache_dir):
    r = aot.resources(gemm_kernel, GEMM_ARGS, {}, {**SMALL_GEMM, "BM": 48})     # outside BM's domain
    assert not r.ok and r.error.startswith("trace:")


def test_row_kernel_without_tiles_in_shared(cache_dir):
    x = _meta(64, 1024)
    r = aot.resources(softmax_kernel, (x, _meta(64, 1024)), dict(ONE_TILE=True),
                      dict(BM=2, BN=1024, num_warps=4, num_stages=1))
    assert r.ok, r.error
    assert r.shared_bytes < 4096          # reductions' scratch only


def test_a_compile_past_its_timeout_is_killed_and_reported(cache_dir, tmp_path, monkeypatch):
    # a cold compile: Triton's own on-disk cache (shared with every other test and run on this machine) would
    # answer within the timeout, so the compile gets an empty one (read when the forked child compiles)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    cfg = {**SMALL_GEMM, "BM": 128}                                     # not in tilestack's cache yet
    r = aot.resources(gemm_kernel, GEMM_ARGS, {}, cfg, timeout_s=0.01)
    assert not r.ok and "no result within" in r.error
    ok = aot.resources(gemm_kernel, GEMM_ARGS, {}, cfg, timeout_s=120)    # tried again with more time: in time
    assert ok.ok and ok.shared_bytes > 0


def test_unit_strides_compile_as_constants_as_the_jit_makes_them(cache_dir):
    """Triton's JIT turns an int argument equal to 1 into the constant 1; the AOT report must describe that
    kernel, not one that multiplies by a unit stride held in a register. The layer-norm backward at 768 columns
    needs 117 registers so (203 with the strides as arguments)."""
    from tilestack.kernels import layernorm_bwd

    x, w = _meta(8192, 768), _meta(768)
    stat, parts = _meta(8192, dtype=torch.float32), _meta(264, 768, dtype=torch.float32)
    args = (x, w, x, x, stat, stat, x, parts, parts)
    cfg = layernorm_bwd.bwd_config(768, "cuda", {})
    fixed = dict(CENTERED=True, ADD_DH=True)
    unit = aot.resources(layernorm_bwd.norm_bwd_kernel, args, fixed, cfg, tma=False)
    # the same kernel on column-strided views (stride 2 along the rows): nothing to specialize
    xs, ws = _meta(8192, 1536)[:, ::2], _meta(1536)[::2]
    strided = aot.resources(layernorm_bwd.norm_bwd_kernel, (xs, ws, xs, xs, stat, stat, xs, parts, parts), fixed,
                            cfg, tma=False)
    assert unit.ok and strided.ok
    if unit.registers is not None:
        assert unit.registers < strided.registers


def test_the_variant_compiled_is_the_one_these_arguments_launch(cache_dir):
    """A row stride of 1000 bytes cannot take a TMA descriptor (16-byte strides), so a launch goes through pointers:
    the report for those arguments is the pointer variant's (the same cache entry as tma=False), where it used to
    be the TMA variant's whatever the arguments."""
    ragged = (_meta(512, 500), _meta(500, 512), _meta(512, 512))
    with_tma = aot.resources(gemm_kernel, ragged, {}, SMALL_GEMM)
    assert with_tma.ok and not with_tma.cached
    without = aot.resources(gemm_kernel, ragged, {}, SMALL_GEMM, tma=False)
    assert without.cached and without.to_json() | {"compile_s": 0} == with_tma.to_json() | {"compile_s": 0}
    aot.resources(gemm_kernel, GEMM_ARGS, {}, SMALL_GEMM)            # aligned: the TMA variant, another entry
    assert len(list(cache_dir.glob("*.json"))) == 2


def test_compile_mode_follows_the_arguments():
    from tilestack.backends.triton.launch import compile_mode
    traced = gemm_kernel.trace(*GEMM_ARGS, BM=64, BN=64, BK=32, GROUP_M=8)
    assert compile_mode(traced, GEMM_ARGS, True) == (True, frozenset())
    assert compile_mode(traced, GEMM_ARGS, False) == (False, frozenset())
    huge = (_meta(1 << 17, 1 << 15), _meta(1 << 15, 512), _meta(1 << 17, 512))   # A: 2^32 elements
    traced = gemm_kernel.trace(*huge, BM=64, BN=64, BK=32, GROUP_M=8)
    tma, wide = compile_mode(traced, huge, True)
    assert tma and wide == frozenset({0})
