"""Round 10's held-out kernels (test_heldout_round10*.py) compiled for Hopper (sm_90a) on this CPU, by the Triton
backend and, where it lowers them, Gluon: no spills, at most 255 registers. Arguments are meta tensors (no memory)
of serving-sized shapes."""

import pytest
import torch
from heldout_support import BF, I32, I64, meta
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round10 import kv_append, paged_decode, rmsnorm_fp8, rope_partial, scalar_powers, swiglu_bwd
from test_heldout_round10_linalg import bitonic_argsort, cho_solve, nan_constants, neg_zero_constants
from test_heldout_round10_more import (
    bilinear_resize,
    ce_zloss_fwd_bwd,
    conv2d_igemm,
    csr_spmm,
    ln_bwd_partial,
    ln_bwd_reduce,
)
from test_heldout_round10_quant import fp8_block_gemm, gumbel_sample, int4_zp_gemm
from test_heldout_round10_varlen import chunked_prefill, varlen_causal

_T = 4096
F8 = torch.float8_e4m3fn
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "paged_decode": (paged_decode, (meta(8, 8, 4, 128, dtype=BF), meta(512, 8, 16, 128, dtype=BF),
                                    meta(512, 8, 16, 128, dtype=BF), meta(8, 4, 64, dtype=I32), meta(8, 4, dtype=I32),
                                    meta(8, 8, 4, 128, dtype=BF), 0.088), dict(BG=16, BS=16, NBT=64, D=128)),
    "kv_append": (kv_append, (meta(8, 8, _T, 128, dtype=BF), meta(8, 8, 16, 128, dtype=BF), meta(8, 64, dtype=I32)),
                  dict(BM=64, BT=16, D=128)),
    "rope_partial": (rope_partial, (meta(32, _T, 128, dtype=BF), meta(32, _T, dtype=I32), meta(32, _T, 128, dtype=BF),
                                    13.3), dict(RD=64, BT=16)),
    "rmsnorm_fp8": (rmsnorm_fp8, (meta(_T, _T, dtype=BF), meta(_T), meta(_T, _T, dtype=torch.float8_e4m3fn),
                                  meta(_T), 1e-6), dict(BM=4, BN=512)),
    "swiglu_bwd": (swiglu_bwd, (meta(_T, _T, dtype=BF),) * 5, dict(BM=64, BN=64)),
    "conv2d_igemm": (conv2d_igemm, (meta(16, 56, 3, 3, 56, 64, dtype=BF), meta(3, 3, 64, 128, dtype=BF), meta(128),
                                    meta(16, 56, 56, 128, dtype=BF)), dict(BM=128, BN=64, BK=32)),
    "bilinear_resize": (bilinear_resize, (meta(64, 112, 112, dtype=BF), meta(64, 224, 224, dtype=BF), 0.5, 0.5),
                        dict(BM=32, BN=32, BK=32)),
    "csr_spmm": (csr_spmm, (meta(_T, dtype=I64), meta(_T, dtype=I64), meta(65536, dtype=I32), meta(65536),
                            meta(_T, 256, dtype=BF), meta(_T, 256, dtype=BF)), dict(BM=32, BN=64, BE=32, BK=32)),
    "ce_zloss": (ce_zloss_fwd_bwd, (meta(_T, 32000, dtype=BF), meta(_T, dtype=I64), meta(_T), 1e-4, 1 / _T),
                 dict(BM=4, BN=1024)),
    "ln_bwd_partial": (ln_bwd_partial, (meta(_T, _T, dtype=BF),) * 2 + (meta(_T, dtype=BF), meta(_T), meta(_T),
                                        meta(_T, _T, dtype=BF), meta(_T // 8, _T), meta(_T // 8, _T)),
                       dict(BM=8, BN=256)),
    "ln_bwd_reduce": (ln_bwd_reduce, (meta(_T // 8, _T), meta(_T // 8, _T), meta(_T, dtype=BF), meta(_T, dtype=BF)),
                      dict(BR=32, BN=128)),
    "fp8_block_gemm": (fp8_block_gemm, (meta(_T, _T, dtype=F8), meta(_T, _T, dtype=F8), meta(32, _T),
                                        meta(32, 32, 128), meta(_T, _T, dtype=BF)), dict(QB=128, BM=64, BN=128)),
    "int4_zp_gemm": (int4_zp_gemm, (meta(_T, _T, dtype=BF).as_strided((_T, _T // 2), (_T, 2)),
                                    meta(_T, _T, dtype=BF).as_strided((_T, _T // 2), (_T, 2), 1),
                                    meta(_T // 2, _T, dtype=torch.uint8), meta(_T // 128, _T, dtype=torch.float16),
                                    meta(_T // 128, _T, dtype=torch.uint8), meta(_T, _T, dtype=BF)),
                     dict(G=128, BM=128, BN=64, BK2=32)),
    "gumbel_sample": (gumbel_sample, (meta(_T, 32000), meta(_T, dtype=I64), meta(_T, 32000), 1.0, 1234),
                      dict(BM=4, BN=256)),
    "varlen_causal": (varlen_causal, (meta(32, _T, 128, dtype=BF),) * 3 + (meta(64, dtype=I32),
                                                                          meta(32, _T, 128, dtype=BF), 0.088),
                      dict(BM=64, BN=64, NS=64, D=128)),
    "chunked_prefill": (chunked_prefill, (meta(8, 32, 512, 128, dtype=BF), meta(8, 32, _T, 128, dtype=BF),
                                          meta(8, 32, _T, 128, dtype=BF), meta(8, 64, dtype=I32),
                                          meta(8, 64, dtype=I32), meta(8, 32, 512, 128, dtype=BF), 0.088),
                        dict(BM=64, BN=64, D=128)),
    "scalar_powers": (scalar_powers, (meta(128), meta(128), 2.0), dict(BN=128)),
    "bitonic_argsort": (bitonic_argsort, (meta(_T, 32), meta(_T, 32), meta(_T, 32, dtype=I64)), dict(NP=32)),
    "nan_constants": (nan_constants, (meta(128), meta(128)), dict(BN=128)),
    "neg_zero_constants": (neg_zero_constants, (meta(128, dtype=torch.float16),) * 3, dict(BN=128)),
    "neg_zero_constants_f64": (neg_zero_constants, (meta(128, dtype=torch.float64),) * 3, dict(BN=128)),
    "cho_solve": (cho_solve, (meta(1024, 16, 16), meta(1024, 16, 64), meta(1024, 16, 16), meta(1024, 16, 64)),
                  dict(BN=16, BR=64)),
}


# Gluon's wgmma gives each of its 8 warps 16 accumulator rows: products of 128 rows there
GLUON_CONSTS = {"paged_decode": dict(BG=128), "kv_append": dict(BM=128), "fp8_block_gemm": dict(BM=128),
                "varlen_causal": dict(BM=128), "chunked_prefill": dict(BM=128)}


@pytest.mark.parametrize("name", [n for n in AOT_CASES if n not in ("rope_partial", "swiglu_bwd", "ln_bwd_reduce")])
def test_round10_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


def test_rope_with_sin_and_cos_compiles_for_sm90a_with_triton():
    """sin and cos made in the kernel: libdevice's sinf / cosf keep a few words on the stack (local memory, counted
    with spills) for the reduction of huge arguments; no more than that."""
    from tilestack.tune import aot
    if aot.missing_tools():
        pytest.skip(aot.missing_tools())
    r = aot.resources(*AOT_CASES["rope_partial"], {}, cache=False, timeout_s=None)
    assert r.ok and r.registers <= 255 and r.spills <= 8, r


def test_a_global_of_six_dimensions_is_read_through_pointers():
    """The conv's (N, OH, KH, KW, OW, C) window view: Triton's and Gluon's copy engines address at most 5 dimensions
    (their compiles failed: "TMA copies must have between 1 and 5 coordinates"); W and Y (4-D) keep their
    descriptors."""
    from tilestack.backends.triton import codegen
    kernel, args, consts = AOT_CASES["conv2d_igemm"]
    low = codegen.generate(kernel.trace(*args, **consts).ir, tma=True)
    assert [name for name, _ in low.descriptors] == ["W", "Y"]


# (Not the resize and the SpMM: their products take f32 operands, exact for the one-hot and interpolation matrices,
# which wgmma does not multiply; Gluon refuses them by name. The rest: those that use what no earlier round compiled
# with Gluon, to keep the round's time down.)
GLUON_CASES = ("paged_decode", "conv2d_igemm", "fp8_block_gemm", "int4_zp_gemm", "varlen_causal", "cho_solve",
               "bitonic_argsort", "scalar_powers", "nan_constants", "rmsnorm_fp8", "neg_zero_constants",
               "neg_zero_constants_f64")


@pytest.mark.parametrize("name", GLUON_CASES)
def test_round10_compiles_for_sm90a_with_gluon(name):
    kernel, args, consts = AOT_CASES[name]
    compile_gluon_sm90a(kernel, args, {**consts, **GLUON_CONSTS.get(name, {})})


def test_gluon_refuses_an_async_load_from_a_global_of_six_dimensions_by_name():
    """Before: Triton's MLIR verifier failed deep in the compile; now the legalizer names the line and the rank."""
    import tilestack.lang as ts
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError

    @ts.kernel(grid=lambda X: (1,))
    def ring6(X, Y, *, BM: int = 64, BK: int = 64):
        buf = ts.SharedStages[X.dtype, 2, BM, BK]()
        a = ts.SharedTile[X.dtype, BM, BK]()
        r = ts.RegTile[X.dtype, BM, BK]()
        ts.async_load(buf, 0, X, at=(0, 0, 0, 0, 0, 0))
        ts.wait_load(a, buf, 0)
        ts.copy(r, a)
        ts.store(Y, r, at=(0, 0))

    be = get_backend("gluon")
    traced = ring6.trace(meta(2, 2, 2, 2, 64, 64, dtype=BF), meta(64, 64, dtype=BF))
    with pytest.raises(BackendError, match=r"test_heldout_round10_aot.py:\d+: .*at most 5 dimensions.*rank-6"):
        be.generate(traced)
