"""Round 21's held-out kernels (test_heldout_round21.py, test_heldout_round21_more.py) compiled for Hopper (sm_90a) on
this CPU through the Triton backend (triton.compile for GPUTarget("cuda", 90, 32) through tilestack's AOT path: no
spills, at most 255 registers) and the Gluon backend (one warpgroup; no spills, no serialized wgmma), at serving-sized
meta arguments: a packed Qwen3 qkv of 4096 tokens with 32 q and 8 k heads of 128, a GPTQ act-order W8A16 GEMM of 4096
x 11008, a 4x4 stride-2 transposed convolution upsampling 16 images of 64x64x256 to 128x128x128 through its
overlapping 6-D view, the compaction of 2**24 elements, differential attention over 4096 tokens, Chamfer distances
between clouds of 8192 points, a segmented cumsum of 8192 rows of 32000; and the two Gluon fixes of this round with
their tests.

What this round found. No kernel gave a wrong answer on the reference executor or Triton's interpreter, and each
compiled for sm_90a through Triton without spills. Fixed, each kept as its test here:
- Gluon: a load into a shared tile of another dtype than its global (the W8A16 GEMM's u8 zero points loaded into an
  f16 shared tile for the one-hot gather's product) went through the copy engine, which writes the global's bytes
  unconverted: the u8 descriptor's box was copied into an f16 ring and Triton's LLVM lowering failed ("Failed to find
  a valid layout", a crash deep in the backend); an f16 global into a bf16 tile, the same size, would have compiled
  and been reinterpreted bit for bit. Such a load goes through registers and a conversion now
  (backends.gluon.passes._choose_access) (c04d0b4): test_gluon_loads_a_shared_tile_of_another_dtype_through_registers,
  test_gemm_with_b_converted_into_its_shared_tile;
- Gluon: that GEMM's K loop kept its accumulator's wgmma chain in flight across trips while a loop nested in the
  body gathered the scales by wgmmas whose accumulators each trip zeroes; ptxas serialized every wgmma of the kernel
  (C7515). A chain is kept in flight only where no nested loop has mmas now (backends.gluon.passes.deferrable)
  (6ce8223): test_gluon_keeps_no_chain_in_flight_beside_an_mma_a_trip_zeroes;
- Gluon: likewise a chain whose wgmma reads a shared tile written anew in each trip other than through a ring stage
  (a load through pointers, as the first fix makes a converting one, or a copy from registers): kept in flight, the
  next trip's store would overwrite the buffer it reads, and ptxas serialized every wgmma (C7515); such a chain is
  waited in its trip now (backends.gluon.passes._restaged) (b542b32):
  test_gluon_loads_a_shared_tile_of_another_dtype_through_registers.
Met and named, not changed: the first W8A16 version gathered in f32 register products (one-hot times an f32 table),
and ptxas gave Triton's FMA lowering 32 registers and 9 KB of spills; in the table's 16-bit dtype on the matrix units
it takes 225 registers and no spills. Every mistake made while writing the kernels was refused when traced with a
message naming the way to write it (Python's max() of two shapes in a grid: "... bound a loop with ts.smin/ts.smax";
div(dst, 1.0, x): "write `1.0 / x` ... or broadcast it into a tile first"; Gluon's 8 default warps for a 64-row
accumulator: "or num_warps=4"; Gluon's wgmma B operand from registers: "load it as a SharedTile"). One difference
between executors was met and worked around in the compaction kernel, not changed: a sum of -0.0s is +0.0 on the
reference executor and under Triton's interpreter (NumPy's and torch's sums start from +0.0), while the sm_90a code
Triton emits for tl.sum adds the elements themselves (no +0.0 term in its PTX), so on the GPU it can be -0.0; no result
of a kernel here depends on it.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, launch, meta
from sm90a_compile import check_triton_sm90a
from test_heldout_round21 import convt_col2im, convt_finish, qk_norm_rope, w8a16_act_order
from test_heldout_round21_more import (
    block_counts,
    compact_gather,
    diff_attention,
    exclusive_scan,
    nearest,
    segmented_cumsum,
)

import tilestack.lang as ts

F32, U8 = torch.float32, torch.uint8
_T = 4096


def _qkv():
    qkv = meta(_T, 32 + 2 * 8, 128, dtype=BF)
    return (qk_norm_rope, (qkv[:, :32], qkv[:, 32:40], meta(128), meta(128), meta(131072, 64), meta(131072, 64),
                           meta(_T, dtype=I64), 1e-6), dict(D=128, BH=16))


def _convt():
    N, Cin, H, W, Cout, K, s, p = 16, 256, 64, 64, 128, 4, 2, 1
    OH = (H - 1) * s - 2 * p + K                      # 128
    ypad = meta(N, OH + 2 * p, OH + 2 * p, Cout)
    sn, sh, sw, _ = ypad.stride()
    yv = ypad.as_strided((N, K, K, H, W, Cout), (sn, sh, sw, s * sh, s * sw, 1))
    x = meta(N, Cin, H, W, dtype=BF).permute(0, 2, 3, 1)
    w = meta(Cin, Cout, K, K, dtype=BF).permute(2, 3, 0, 1)
    y = meta(N, Cout, OH, OH, dtype=BF).permute(0, 2, 3, 1)
    return ((convt_col2im, (x, w, yv), dict(KH=K, KW=K, BW=64, BN=64, BK=64)),
            (convt_finish, (ypad[:, p:p + OH, p:p + OH], meta(Cout), y), dict(BW=64, BN=64)))


_N = 1 << 24
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "qk_norm_rope": _qkv(),
    "convt_col2im": _convt()[0],
    "convt_finish": _convt()[1],
    "w8a16_act_order": (w8a16_act_order, (meta(16, 4096, dtype=torch.float16), meta(4096, 11008, dtype=torch.uint8),
                                          meta(32, 11008, dtype=torch.float16), meta(32, 11008, dtype=torch.uint8),
                                          meta(4096, dtype=I32), meta(16, 11008, dtype=torch.float16)),
                        dict(BM=64, BN=64, BK=64, BG=32)),
    "block_counts": (block_counts, (meta(1, _N, dtype=torch.bool), meta(_N // 1024, dtype=I32)), dict(BLK=1024)),
    "exclusive_scan": (exclusive_scan, (meta(1, _N // 1024, dtype=I32), meta(1, _N // 1024 + 1, dtype=I64)),
                       dict(BS=128)),
    "compact_gather": (compact_gather, (meta(_N, dtype=BF), meta(_N, dtype=torch.bool), meta(_N // 32 + 1, dtype=I64),
                                        meta(_N // 2, dtype=BF), meta(_N // 2, dtype=I64)), dict(BLK=32, BO=32)),
    "diff_attention": (diff_attention, (meta(32, _T, 128, dtype=BF), meta(32, _T, 128, dtype=BF),
                                        meta(32, _T, 128, dtype=BF), meta(128), meta(32, _T, 128, dtype=BF), 0.8,
                                        0.125, 0.2, 1e-5), dict(D=64, BM=64, BN=32)),
    "segmented_cumsum": (segmented_cumsum, (meta(8192, 32000), meta(8192, 32000, dtype=torch.bool),
                                            meta(8192, 32000)), dict(BN=64)),
    "nearest": (nearest, (meta(64, 8192, 3).transpose(1, 2), meta(64, 8192, 3).transpose(1, 2), meta(64, dtype=I32),
                          meta(64, dtype=I32), meta(64, 8192), meta(64, 8192, dtype=I64)), dict(BN=64, BM=32)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round21_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round21_compiles_for_sm90a_with_gluon(name):
    """One warpgroup (num_warps=4: the 64-row wgmma accumulators of the transposed convolution and the attention
    take it); no spills, no serialized wgmma."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    kernel, args, consts = AOT_CASES[name]
    be = get_backend("gluon")
    res = gaot.resources(be.aot(kernel.trace(*args, **consts), be.Options(num_warps=4)))
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]


# ---- a shared tile of another dtype than its global (the fix this round made) -------------------------------------
@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def gemm_converted_b(A, B, C, *, BM: int = 64, BK: int = 64, BN: int = 64):
    """C (M, BN) = A (M, K) @ B (K, BN), B's tiles loaded into shared tiles of A's dtype (B: u8 codes, f16 or f32,
    converted as they are loaded). Grid: (row blocks,)."""
    i = ts.block_id(0)
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[A.dtype, BK, BN]()
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, 0))
        ts.mma_AB(acc, a, b, acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, 0))


CONVERSIONS = [(F16, U8), (BF, F16), (F16, F32), (BF, BF)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("adtype", "bdtype"), CONVERSIONS)
def test_gemm_with_b_converted_into_its_shared_tile(backend, adtype, bdtype):
    """On both executors, against float64 torch of B rounded to A's dtype: u8 codes 0..255 exact in f16, f16 values
    rounded to bf16, f32 to f16; M = 70 (ragged), K = 100."""
    g = torch.Generator().manual_seed(2110)
    M, K, N = 70, 100, 64
    a = torch.randn(M, K, generator=g).to(adtype)
    b = (torch.randint(0, 256, (K, N), generator=g) if bdtype is U8 else torch.randn(K, N, generator=g)).to(bdtype)
    c = torch.full((M, N), math.nan)
    launch(gemm_converted_b, backend, a, b, c)
    want = a.double() @ b.to(adtype).double()
    torch.testing.assert_close(c.double(), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize(("adtype", "bdtype"), CONVERSIONS)
def test_gluon_loads_a_shared_tile_of_another_dtype_through_registers(adtype, bdtype):
    """Gluon's copy engine writes a global's bytes into a shared tile as they are: a u8 -> f16 load into a shared
    tile failed in Triton's LLVM lowering ("Failed to find a valid layout": the u8 descriptor's box copied into an f16
    ring), and f16 -> bf16, same-sized, would have been reinterpreted bit for bit. Such a load goes through pointers
    and a conversion in registers now (backends.gluon.passes._choose_access), B's descriptor gone from the kernel;
    A's load (no conversion) keeps the copy engine; each compiles for sm_90a without spills. The accumulation chain
    reading such a tile, rewritten each trip, is no longer kept in flight across trips (backends.gluon.passes.
    _restaged): ptxas serialized every wgmma of it (C7515), and the next trip's store would overwrite the buffer an
    in-flight wgmma reads."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    be = get_backend("gluon")
    args = (meta(4096, 4096, dtype=adtype), meta(4096, 64, dtype=bdtype), meta(4096, 64))
    check_triton_sm90a(gemm_converted_b, args, {})      # (Triton converts a descriptor's load in registers)
    traced = gemm_converted_b.trace(*args)
    src = be.source(traced, be.Options(num_warps=4))
    assert "A_desc" in src
    assert ("B_desc" in src) == (adtype is bdtype)
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    res = gaot.resources(be.aot(traced, be.Options(num_warps=4)))
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
    # B's shared tile is written anew each trip (not a ring stage): acc's wgmma is waited in its trip, not left in
    # flight to read the buffer the next trip overwrites (which made ptxas serialize every wgmma, C7515)
    acc_in_flight = any("acc" in line and "warpgroup_mma_wait(1" in line for line in src.splitlines())
    assert acc_in_flight == (adtype is bdtype)


# ---- an accumulation chain beside an mma whose acc a trip makes (the second fix of this round) ---------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def fused_mlp(X, W1, W2, Y, *, BM: int = 64, D: int = 64, BH: int = 64):
    """Y (M, D) = relu(X (M, D) @ W1 (D, H)) @ W2 (H, D), the hidden layer a tile at a time: h zeroed each trip, acc
    accumulated across trips. Grid: (row blocks,)."""
    i = ts.block_id(0)
    x = ts.SharedTile[X.dtype, BM, D]()
    ts.load(x, X, at=(i, 0))
    w1, w2 = ts.SharedTile[W1.dtype, D, BH](), ts.SharedTile[W2.dtype, BH, D]()
    h = ts.RegTile[ts.f32, BM, BH]()
    h16 = ts.RegTile[X.dtype, BM, BH]()
    acc = ts.RegTile[ts.f32, BM, D]()
    ts.zero(acc)
    for j in ts.range(ts.cdiv(W1.shape[1], BH)):
        ts.load(w1, W1, at=(0, j))
        ts.load(w2, W2, at=(j, 0))
        ts.zero(h)
        ts.mma_AB(h, x, w1, h)
        ts.relu(h, h)
        ts.copy(h16, h)
        ts.mma_AB(acc, h16, w2, acc)
    out = ts.RegTile[Y.dtype, BM, D]()
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp(backend):
    """Against float64 torch with h rounded to f16 as the kernel rounds it: H = 200 (four hidden tiles, the last
    ragged), M = 70."""
    g = torch.Generator().manual_seed(2111)
    x, w1, w2 = (torch.randn(*s, generator=g).to(F16) for s in ((70, 64), (64, 200), (200, 64)))
    y = torch.full((70, 64), math.nan)
    launch(fused_mlp, backend, x, w1, w2, y)
    h = (x.double() @ w1.double()).relu().to(F16).double()
    torch.testing.assert_close(y.double(), h @ w2.double(), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("name", ["fused_mlp", "w8a16_act_order"])
def test_gluon_keeps_no_chain_in_flight_beside_an_mma_a_trip_zeroes(name):
    """w8a16_act_order's K loop keeps acc's chain of wgmmas in flight across trips (warpgroup_mma_wait(1)) while a loop
    nested in it gathers the scales by wgmmas whose accumulators each trip zeroes: ptxas serialized every wgmma of the
    kernel ("C7515: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator
    registers"). Such a chain is waited in its trip now (backends.gluon.passes.deferrable). An mma beside the chain
    at the top of the body (fused_mlp's h, zeroed each trip) serialized nothing and keeps the chain in flight, as a
    plain K loop's does."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    if name == "fused_mlp":
        kernel, args, consts = fused_mlp, (meta(8192, 64, dtype=F16), meta(64, 4096, dtype=F16),
                                           meta(4096, 64, dtype=F16), meta(8192, 64, dtype=F16)), {}
    else:
        kernel, args, consts = AOT_CASES[name]
    traced = kernel.trace(*args, **consts)
    res = gaot.resources(be.aot(traced, be.Options(num_warps=4)))
    assert not res["wgmma_serialized"] and res["spill_stores"] == 0, res["report"]
    src = be.source(traced, be.Options(num_warps=4))
    acc_in_flight = any("acc" in line and "warpgroup_mma_wait(1" in line for line in src.splitlines())
    assert acc_in_flight == (name == "fused_mlp")
    plain = gemm_converted_b.trace(meta(4096, 4096, dtype=F16), meta(4096, 64, dtype=F16), meta(4096, 64))
    assert "warpgroup_mma_wait(1" in be.source(plain, be.Options(num_warps=4))
