"""The Gluon backend's kernels compiled ahead of time for sm_90a on this machine (no GPU): no spills in ptxas's
report, wgmma (HGMMA) in the SASS, and for warp roles the warp-specialized partitions with their register
budgets (setmaxnreg in the PTX, USETMAXREG in the SASS). Skips only where Triton's ptxas is missing."""

import re

import pytest
from test_gluon_source import (  # pytest puts this folder on sys.path
    attention_fa3,
    explicit_attention,
    gemm_ws,
    scaled_gemm,
)

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.backends.gluon import aot
from tilestack.kernels.gemm import gemm_kernel

BF16_2, F16_2, BF16_4 = ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.f16, 2), ts.ArgSpec(ts.bf16, 4)


@pytest.fixture(scope="module", autouse=True)
def _ptxas():
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))


def compiled(traced, **options):
    be = get_backend("gluon")
    k = be.aot(traced, be.Options(**options))
    return k, aot.resources(k), aot.sass(k)


def no_spills(res: dict) -> None:
    assert res["spill_stores"] == res["spill_loads"] == res["stack"] == 0, res["report"]
    assert "bytes spill stores" in res["report"]          # the report was read, not missing
    assert not res["wgmma_serialized"], res["report"]      # ptxas's C7512: every wgmma waited for the one before


@pytest.mark.parametrize("spec", [BF16_2, F16_2], ids=["bf16", "f16"])
def test_gemm_compiles_to_hgmma_without_spills(spec):
    k, res, sass = compiled(gemm_kernel.trace(spec, spec, spec))
    no_spills(res)
    dt = r"\.BF16" if spec is BF16_2 else r" "                  # SASS names bf16 operands; f16 is its default
    assert re.search(rf"HGMMA\.64x128x16\.F32{dt}", sass)      # wgmma: each warpgroup 64 rows x 128 cols
    assert "LDL" not in sass and "STL" not in sass              # no local-memory traffic
    assert "UTMALDG" in sass and "UTMASTG" in sass              # the copy engine loads and stores the tiles
    assert "SYNCS" in sass                                       # mbarrier waits
    assert "wgmma.wait_group.sync.aligned 1;" in k.asm["ptx"]    # one wgmma kept in flight in the loop
    assert res["num_warps"] == 8 and res["shared_bytes"] >= 4 * (128 * 64 + 64 * 128) * 2   # a 4-stage ring


@pytest.mark.parametrize(("activation", "trans_b"), [("gelu", False), ("silu", True)])
def test_gemm_with_a_fused_epilogue_compiles(activation, trans_b):
    # bias (a vector through pointers, broadcast on wgmma's accumulator layout), the activation, a residual tile;
    # B^T read from its (N, K) rows straight into wgmma (a transposed shared operand)
    from tilestack.kernels.gemm import gemm_epilogue_kernel
    traced = gemm_epilogue_kernel.trace(BF16_2, BF16_2, ts.ArgSpec(ts.bf16, 1), BF16_2, BF16_2,
                                        activation=activation, HAS_BIAS=True, HAS_RESIDUAL=True, TRANS_B=trans_b)
    k, res, sass = compiled(traced)
    no_spills(res)
    assert "HGMMA.64x128x16.F32.BF16" in sass and "UTMASTG" in sass


@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
def test_fp8_gemm_compiles_to_qgmma(ws):
    # tilestack.quant's GEMM with e4m3 operands: wgmma's fp8 form (k = 32), W's (N, K) rows as the K-major b
    from tilestack.quant.gemm import qgemm_kernel
    f8, f1 = ts.ArgSpec(ts.f8e4m3, 2), ts.ArgSpec(ts.f32, 1)
    traced = qgemm_kernel.trace(f8, f8, f1, f1, BF16_2, BF16_2, 1.0, BK=128)
    k, res, sass = compiled(traced, warp_specialize=ws)
    no_spills(res)
    assert "QGMMA.64x128x32.F32.E4M3.E4M3" in sass


def test_without_the_copy_engine_tiles_go_through_pointers_into_shared_memory():
    # tensors whose rows are not 16-byte aligned (e.g. 13 bf16 columns) cannot be TMA'd: the launcher compiles
    # this mode instead, loads through pointers into NVMMA-swizzled shared tiles that wgmma reads
    be = get_backend("gluon")
    traced = gemm_kernel.trace(BF16_2, BF16_2, BF16_2)
    src = be.generate(traced, be.Options(), tma=False).source
    assert "tma." not in src and "for p in gl.static_range(" not in src and "gl.load(" in src
    k = be.aot(traced, be.Options(), tma=False)
    res, sass = aot.resources(k), aot.sass(k)
    no_spills(res)
    assert "HGMMA.64x128x16.F32.BF16" in sass and "UTMALDG" not in sass


def test_explicit_gemm_is_warp_specialized_with_register_budgets():
    k, res, sass = compiled(gemm_ws.trace(BF16_2, BF16_2, BF16_2))
    no_spills(res)
    ptx = k.asm["ptx"]
    budgets = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32 \t(\d+);", ptx)}
    assert 40 in budgets                                        # the producer's budget, set in its partition
    assert max(budgets) >= 232                                  # the consumer (default partition) gets the rest
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert "HGMMA.64x128x16.F32.BF16" in sass
    assert res["num_warps"] == 12                               # 8 consumer warps + 4 producer warps


def test_warp_specialized_plain_gemm_compiles_with_register_budgets():
    k, res, sass = compiled(gemm_kernel.trace(BF16_2, BF16_2, BF16_2), warp_specialize=True)
    no_spills(res)
    budgets = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32 \t(\d+);", k.asm["ptx"])}
    assert 40 in budgets and max(budgets) >= 232
    assert "HGMMA.64x128x16.F32.BF16" in sass and res["num_warps"] == 12


def test_persistent_warp_specialized_gemm_compiles():
    k, res, sass = compiled(gemm_kernel.trace(BF16_2, BF16_2, BF16_2), warp_specialize=True, persistent=True)
    no_spills(res)
    assert "HGMMA.64x128x16.F32.BF16" in sass and "USETMAXREG" in sass and res["num_warps"] == 12


def test_explicit_attention_compiles_with_ping_pong_partitions():
    traced = explicit_attention().trace(BF16_4, BF16_4, BF16_4, BF16_4, 1.0, BM=128, BN=64, D=64, STAGES=2)
    k, res, sass = compiled(traced)
    no_spills(res)
    ptx = k.asm["ptx"]
    budgets = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32 \t(\d+);", ptx)}
    assert {24, 240} <= budgets                                 # the producer and the second consumer (a worker)
    assert sass.count("HGMMA.64x64x16.F32.BF16") >= 8           # QK^T and PV, 4 k-steps each, per consumer
    assert res["num_warps"] == 12


@pytest.mark.parametrize(("d", "bn", "causal"), [(64, 128, False), (128, 128, False), (128, 64, True)])
def test_fa3_scheduled_attention_compiles_without_spills(d, bn, causal):
    # the next block's scores in flight beside this block's softmax, PV and O: the consumers' budget holds it,
    # and ptxas keeps the wgmma asynchronous (no_spills: its C7512 serialization notice is absent)
    traced = attention_fa3.trace(BF16_4, BF16_4, BF16_4, BF16_4, 1.0, BN=bn, D=d, CAUSAL=causal)
    k, res, sass = compiled(traced)
    no_spills(res)
    budgets = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32 \t(\d+);", k.asm["ptx"])}
    assert {32, 240} <= budgets and res["num_warps"] == 12         # the producer's 32: its scalar work fits
    assert sass.count(f"HGMMA.64x{bn}x16.F32.BF16") >= 2 * d // 16     # QK^T: k-steps over the head dim


def library_kernel(name: str):
    import importlib
    mod = importlib.import_module(f"tilestack.kernels.{name}")
    v1 = ts.ArgSpec(ts.bf16, 1)
    f1 = ts.ArgSpec(ts.f32, 1)
    return {
        "softmax": lambda: mod.softmax_kernel.trace(BF16_2, BF16_2),
        "rmsnorm": lambda: mod.rms_norm_kernel.trace(BF16_2, v1, BF16_2, f1, 1e-6),
        "layernorm": lambda: mod.layer_norm_kernel.trace(BF16_2, v1, v1, BF16_2, f1, f1, 1e-5),
        "swiglu": lambda: mod.swiglu_fwd_kernel.trace(BF16_2, BF16_2, BF16_2),
        "attention_fwd": lambda: mod.attention_fwd_kernel.trace(BF16_4, BF16_4, BF16_4, BF16_4,
                                                                ts.ArgSpec(ts.f32, 3), 0.1, D=64, DV=64),
    }[name]()


@pytest.mark.parametrize("name", ["softmax", "rmsnorm", "layernorm", "swiglu"])
def test_library_row_kernels_compile(name):
    # element-wise work, reductions, pointer loads and stores on blocked layouts, with the kernel's own options
    k, res, sass = compiled(library_kernel(name))
    assert res["registers"] > 0 and "Function : " in sass
    if name != "softmax":   # softmax's default row tile at 4 warps spills a little (24 bytes): a tuning matter
        no_spills(res)


def test_library_attention_forward_warp_specialized_compiles():
    k, res, sass = compiled(library_kernel("attention_fwd"), warp_specialize=True, num_stages=3)
    no_spills(res)
    assert res["num_warps"] == 12 and "USETMAXREG" in sass and sass.count("HGMMA") >= 8


@pytest.mark.parametrize("part", ["delta", "dkdv", "dq"])
def test_library_attention_backward_compiles(part):
    # the backward's kernels at the block shapes the H100 tuning picks at head dim 64; dK/dV's P^T dO and
    # dS^T Q take a transposed register operand (permuted into wgmma's operand layout)
    import importlib
    ab = importlib.import_module("tilestack.kernels.attention_bwd")
    f3 = ts.ArgSpec(ts.f32, 3)
    traced, warps = {
        "delta": lambda: (ab.attention_bwd_delta_kernel.trace(BF16_4, BF16_4, f3, D=64), 4),
        "dkdv": lambda: (ab.attention_bwd_dkdv_kernel.trace(BF16_4, BF16_4, BF16_4, BF16_4, f3, f3, BF16_4, BF16_4,
                                                            0.1, D=64, BM=64, BN=64), 4),
        "dq": lambda: (ab.attention_bwd_dq_kernel.trace(BF16_4, BF16_4, BF16_4, BF16_4, f3, f3, BF16_4, 0.1, D=64,
                                                        BM=128, BN=64), 8),
    }[part]()
    k, res, sass = compiled(traced, num_warps=warps, num_stages=3)
    no_spills(res)
    assert part == "delta" or sass.count("HGMMA") >= 8


def test_library_attention_forward_is_pipelined_on_wgmma():
    # the plain kernel (no explicit ops): the schedule pass rings its K/V loads; QK^T and PV on wgmma
    traced = library_kernel("attention_fwd")
    src = get_backend("gluon").source(traced)
    assert src.count("for p in gl.static_range(") == 2             # the diagonal and the full key blocks
    k, res, sass = compiled(traced)
    no_spills(res)
    assert sass.count("HGMMA.64x64x16.F32.BF16") >= 8 and "UTMALDG" in sass


def jit_compile(traced, args, **options):
    """What a launch does short of running: the launcher's flat arguments (real descriptors over these tensors)
    through Gluon's JIT, which specializes on them and compiles for sm_90a."""
    from tilestack.backends.gluon.launch import Binding, tma_ok
    be = get_backend("gluon")
    tma = all(tma_ok(args[i]) for i in traced.tile_globals)        # as the launcher decides
    art = be.compile(traced, be.options(traced.constants, {**traced.kernel.options, **options}), tma)
    flat = Binding(traced, args, art.lowered)(args)
    return art.fn.run(*flat, grid=(1,), warmup=True, num_warps=art.lowered.num_warps)


def _gemm_args():
    import torch
    return torch.randn(300, 72).bfloat16(), torch.randn(72, 136).bfloat16(), torch.empty(300, 136).bfloat16()


def _pingpong():
    from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel
    return attention_fwd_pingpong_kernel


def _attention_lse_args():
    import torch
    q, k, v, o, scale = _attention_args()
    return q, k, v, o, torch.empty(q.shape[:3], dtype=torch.float32), scale


def _attention_args():
    import torch
    q, k, v = (torch.randn(1, 2, n, 64).bfloat16() for n in (200, 77, 77))
    return q, k, v, torch.empty_like(q), 0.125        # pointers (Q), descriptors (K, V, O), a float scalar


def _unaligned_gemm_args():
    import torch
    a = torch.randn(130, 13).bfloat16()               # 26-byte rows: no copy engine for A
    return a, torch.randn(13, 24).bfloat16(), torch.empty(130, 24).bfloat16()


LAUNCHES = {
    "gemm": lambda: (gemm_kernel, {}, _gemm_args(), {}),
    "gemm_pointers": lambda: (gemm_kernel, {}, _unaligned_gemm_args(), {}),
    "gemm_ws_explicit": lambda: (gemm_ws, {}, _gemm_args(), {}),
    "gemm_ws_persistent": lambda: (gemm_kernel, {}, _gemm_args(), {"warp_specialize": True, "persistent": True}),
    "attention_explicit": lambda: (explicit_attention(), dict(BM=128, BN=64, D=64, STAGES=2), _attention_args(), {}),
    "attention_fa3_causal": lambda: (attention_fa3, dict(BN=64, CAUSAL=True), _attention_args(), {}),
    "attention_pingpong": lambda: (_pingpong(), dict(D=64, BN=64), _attention_lse_args(), {}),
    "scaled_gemm_named_p": lambda: (scaled_gemm, {}, (*_gemm_args(), 2.0, 1.0, 0.5, 0.25, 0.125), {}),
}


@pytest.mark.parametrize("case", LAUNCHES)
def test_launch_arguments_bind_to_the_generated_kernels(hopper_jit, case):
    pytest.importorskip("torch")
    kernel, consts, args, options = LAUNCHES[case]()
    k = jit_compile(kernel.trace(*args, **consts), args, **options)
    sass = aot.sass(k)
    assert "HGMMA" in sass and ("UTMALDG" in sass) == (case != "gemm_pointers")
    plain = case.startswith(("gemm_p", "scaled")) or case == "gemm"
    assert k.metadata.num_warps == (8 if plain else 12)
