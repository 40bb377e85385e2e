"""Round 22's held-out kernels (test_heldout_round22.py, test_heldout_round22_more.py) compiled for Hopper (sm_90a) on
this CPU through the Triton backend (triton.compile for GPUTarget("cuda", 90, 32) through tilestack's AOT path: no
spills, at most 255 registers) and the Gluon backend (one warpgroup; no spills, no serialized wgmma), at serving-sized
meta arguments: RecurrentGemma-9B's RG-LRU (4096 channels, 8192 steps) and its reverse-time backward, ResNet's 7x7
adaptive pool of 2048 channels from 56x56, xLSTM-7B's mLSTM (32 heads of 128 over 4096 tokens), 1-D neighborhood
attention with a window of 13 over 4096 tokens, a fused linear cross-entropy over Llama 3's 128256-word vocabulary,
a batched GEMM of 16 x 4096^2 with its transposed store (bf16, f8e4m3, and A transposed in its last two axes: no unit
stride, so no copy engine); and the four f8 product forms.

What this round found. No kernel gave a wrong answer on the reference executor or Triton's interpreter, nor on an
H100 through Triton (scripts/gpu/run_heldout_on_gpu.py). Fixed, each kept as its test here:
- Gluon: an f8e4m3 product whose shared B tile is (K, N) (mma_AB; likewise mma_AtB's (K, M) A) aborted Triton's LLVM
  lowering ("WGMMA type or shape is not supported", a C++ assertion): wgmma reads 8-bit operands K-major only. The
  new kmajor_8bit pass (backends.gluon.passes) transposes such an operand through registers first (B into an (N, K)
  shared tile read transposed, A into registers): test_gluon_reads_8bit_operands_k_major (on an H100 every form,
  warp-specialized or not, 1 or 3 stages, ragged and whole tiles, within bf16's rounding of float64 torch; so were the
  mLSTM, the neighborhood attention, the fused cross-entropy and the batched GEMM through Gluon at 64-row tiles,
  against the reference executor); an async mma (explicit
  kernels), which reads its stage in flight, is refused instead, naming mma_ABt_async:
  test_gluon_refuses_an_async_8bit_product_reading_b_as_k_by_n.
Met and named, not changed: the gluon backend refuses the cross-entropy's dW product for a vocabulary tile of 32 (a
wgmma accumulates at least 64 rows), naming it; at hidden size 128 one warpgroup spills 92 to 116 bytes where Triton's
4 warps spill none (its GLUON_CASES entry uses 64). The mLSTM at D = 128 spills at Triton's 4 warps, none at 8.
"""

import pytest
import torch
from heldout_support import BF, I64, close, gluon_resources_one_warpgroup, launch, meta
from sm90a_compile import check_triton_sm90a
from test_heldout_round22 import adaptive_avg_pool2d, linear_recurrence_bwd, mlstm_parallel, rglru_scan
from test_heldout_round22_more import bmm_bias_t, linear_ce, neighborhood_attn1d

import tilestack.lang as ts

F32, F8 = torch.float32, torch.float8_e4m3fn


def _bmm(dtype=BF, a_transposed=False, c_view=False):
    a, c = meta(16, 4096, 4096, dtype=dtype), meta(16, 4096, 4096, dtype=BF)
    return (bmm_bias_t, (a.transpose(1, 2) if a_transposed else a, meta(16, 4096, 4096, dtype=dtype), meta(4096),
                         c.transpose(1, 2) if c_view else c), dict(BM=128, BN=128, BK=64))


def _ce(D, BV=64):
    """A fused linear cross-entropy over Llama 3's 128256 words for 8192 tokens of hidden size D."""
    return (linear_ce, (meta(8192, D, dtype=BF), meta(128256, D, dtype=BF), meta(8192, dtype=I64), meta(8192),
                        meta(8192, D, dtype=BF), meta(128256, D), 1.0 / 8192), dict(D=D, BM=64, BV=BV, CAP=30.0))


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "rglru_scan": (rglru_scan, (*(meta(4, 8192, 4096, dtype=BF) for _ in range(3)), meta(1, 4096, dtype=BF),
                                meta(4, 4096), meta(4, 8192, 4096, dtype=BF), meta(4, 4096), 8.0), dict(BD=256)),
    "linear_recurrence_bwd": (linear_recurrence_bwd, (meta(4, 8192, 4096, dtype=BF), meta(4, 8192, 4096, dtype=BF),
                                                      meta(4, 4096), meta(4, 8192, 4096, dtype=BF), meta(4, 4096)),
                              dict(BD=256)),
    "adaptive_avg_pool2d": (adaptive_avg_pool2d, (meta(32, 2048, 56, 56, dtype=BF).permute(0, 2, 3, 1),
                                                  meta(32, 2048, 7, 7, dtype=BF).permute(0, 2, 3, 1)), dict(BC=128)),
    "mlstm_parallel": (mlstm_parallel, (*(meta(64, 4096, 128, dtype=BF) for _ in range(3)), meta(64, 4096),
                                        meta(64, 4096), meta(64, 4096, 128, dtype=BF), 1e-6),
                       dict(D=128, BM=64, num_warps=8)),
    "neighborhood_attn1d": (neighborhood_attn1d, (*(meta(64, 4096, 64, dtype=BF) for _ in range(3)), meta(8, 25),
                                                  meta(64, 4096, 64, dtype=BF), 0.125),
                            dict(KS=13, D=64, BM=64, BN=64)),
    "linear_ce": _ce(128),
    "bmm_bias_t": _bmm(),
    "bmm_bias_t_f8": _bmm(F8),
    "bmm_bias_t_a_transposed": _bmm(a_transposed=True),
    "bmm_bias_t_into_a_transposed_view": _bmm(c_view=True),      # the transpose of a transpose: C itself, M-major
}


# one warpgroup holds the fused cross-entropy's (64, D) f32 dX accumulator beside its logits tiles for D = 64 (244
# registers; D = 128 spills 92 to 116 bytes at 255 registers, where Triton's 4 warps fit it with none)
GLUON_CASES = {**AOT_CASES, "linear_ce": _ce(64)}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round22_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round22_compiles_for_sm90a_with_gluon(name):
    """One warpgroup (num_warps=4: the 64-row wgmma accumulators take it); no spills, no serialized wgmma."""
    res = gluon_resources_one_warpgroup(*GLUON_CASES[name])
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]


# ---- 8-bit products whose shared operand is not K-major (the fix this round made) ----------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def f8_gemm_forms(A, B, C, *, BM: int = 64, BN: int = 64, BK: int = 64, TA: bool = False, TB: bool = False):
    """C (M, N) = op(A) @ op(B) with A (M, K) or, TA, (K, M); B (K, N) or, TB, (N, K): the four products of
    ts.mma_*. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BK, BM]() if TA else ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]() if TB else ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    mma = {(False, False): ts.mma_AB, (False, True): ts.mma_ABt, (True, False): ts.mma_AtB,
           (True, True): ts.mma_AtBt}[TA, TB]
    K = A.shape[0] if TA else A.shape[1]
    for k in ts.range(ts.cdiv(K, BK)):
        ts.load(a, A, at=(k, i) if TA else (i, k))
        ts.load(b, B, at=(j, k) if TB else (k, j))
        mma(acc, a, b, acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


FORMS = [(False, False), (False, True), (True, False), (True, True)]


def _f8_args(ta, tb, M=4096, N=4096, K=4096, make=meta):
    return (make(K, M, dtype=F8) if ta else make(M, K, dtype=F8), make(N, K, dtype=F8) if tb else make(K, N, dtype=F8),
            make(M, N, dtype=BF))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("ta", "tb"), FORMS)
def test_f8_gemm_forms(backend, ta, tb):
    """Each form on both executors against float64 torch of the f8 values: M = 70, N = 50, K = 100 (ragged)."""
    g = torch.Generator().manual_seed(2203)
    a, b, _ = _f8_args(ta, tb, 70, 50, 100, make=lambda *s, dtype: (torch.randn(*s, generator=g) * 4).to(dtype))
    c = torch.full((70, 50), float("nan"), dtype=BF)
    launch(f8_gemm_forms, backend, a, b, c, TA=ta, TB=tb)
    want = (a.double().T if ta else a.double()) @ (b.double().T if tb else b.double())
    close(c, want, scale=want.abs().max().item() / 8)


@pytest.mark.parametrize(("ta", "tb"), FORMS)
def test_f8_gemm_forms_compile_for_sm90a_with_triton(ta, tb):
    check_triton_sm90a(f8_gemm_forms, _f8_args(ta, tb), dict(TA=ta, TB=tb))


@pytest.mark.parametrize("specialize", [False, True])
@pytest.mark.parametrize(("ta", "tb"), FORMS)
def test_gluon_reads_8bit_operands_k_major(ta, tb, specialize):
    """wgmma reads 8-bit operands K-major only: an f8 mma_AB's (K, N) B tile made Triton's LLVM lowering abort
    ("WGMMA type or shape is not supported"). The gluon backend's kmajor_8bit pass transposes such a B (and mma_AtB's
    (K, M) A) through registers first; every form compiles for sm_90a with no spills, warp-specialized or not, and
    only the operands that need it are transposed."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    be = get_backend("gluon")
    traced = f8_gemm_forms.trace(*_f8_args(ta, tb), TA=ta, TB=tb)
    opts = be.Options(num_warps=4, warp_specialize=specialize)
    src = be.source(traced, opts)
    assert ("a_kmajor" in src) == ta and ("b_kmajor" in src) == (not tb)
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    res = gaot.resources(be.aot(traced, opts))
    assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]


def test_gluon_names_the_rows_a_narrow_vocabulary_tile_gives_dw():
    """The fused cross-entropy's dW product g^T x accumulates BV rows: a vocabulary tile of 32 is refused by the gluon
    backend when traced, naming the kernel's line and the rows a wgmma needs; the triton backend compiles it."""
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError
    kernel, args, consts = _ce(64, BV=32)
    with pytest.raises(BackendError, match=r"test_heldout_round22_more\.py:\d+: the gluon backend gives each of the 4 "
                                           r"warps .* mma accumulates 32 rows \(need a multiple of 64"):
        get_backend("gluon").source(kernel.trace(*args, **consts), get_backend("gluon").Options(num_warps=4))
    check_triton_sm90a(kernel, args, consts)


@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def f8_gemm_async(A, B, C, *, BM: int = 64, BN: int = 64, BK: int = 64, STAGES: int = 2, TB: bool = False):
    """C (M, N) = A (M, K) @ B, B (K, N) or, TB, (N, K), with the explicit ops: a ring of STAGES shared buffers per
    operand filled by async loads, an async mma waited in its trip. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BN, BK]() if TB else ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]() if TB else ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        s = k % STAGES
        ts.async_load(a_ring, s, A, at=(i, k))
        ts.async_load(b_ring, s, B, at=(j, k) if TB else (k, j))
        ts.wait_load(a, a_ring, s)
        ts.wait_load(b, b_ring, s)
        (ts.mma_ABt_async if TB else ts.mma_AB_async)(acc, a, b, acc)
        ts.mma_wait(acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


def test_gluon_refuses_an_async_8bit_product_reading_b_as_k_by_n():
    """An async mma reads its stage in flight until its wait, so kmajor_8bit does not transpose it: an f8
    mma_AB_async of a (K, N) stage is refused when traced, naming the line and mma_ABt_async (it aborted in Triton's
    LLVM lowering); the (N, K) form compiles, and the triton backend (which erases the async ops) takes both."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    from tilestack.errors import BackendError
    be = get_backend("gluon")
    opts = be.Options(num_warps=4)
    args = (meta(4096, 4096, dtype=F8), meta(4096, 4096, dtype=F8), meta(4096, 4096, dtype=BF))
    with pytest.raises(BackendError, match=r"test_heldout_round22_hw\.py:\d+: the gluon backend gives wgmma 8-bit "
                                           r"operands K-major only; mma_async .* use mma_ABt_async"):
        be.source(f8_gemm_async.trace(*args), opts)
    check_triton_sm90a(f8_gemm_async, args, {})
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    res = gaot.resources(be.aot(f8_gemm_async.trace(*args, TB=True), opts))
    assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]
