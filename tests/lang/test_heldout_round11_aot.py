"""Round 11's held-out kernels (test_heldout_round11*.py) compiled for Hopper (sm_90a) on this CPU, by the Triton
backend and, where it lowers them, Gluon: no spills, at most 255 registers. Arguments are meta tensors (no memory)
of serving-sized shapes."""

import pytest
import torch
from heldout_support import BF, I8, I32, meta
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round11 import distill_kl, geglu_bwd, lion_step, row_cumprod, topk_router
from test_heldout_round11_api import gem_pool, powers
from test_heldout_round11_fp8 import fp8_amax_dequant, fp8_gemm
from test_heldout_round11_models import group_router, sigmoid_attention, w8a8_gemm
from test_heldout_round11_more import hadamard_rows, newton_schulz, retention, sparsemax, wide_topk

_T = 4096
F8 = torch.float8_e4m3fn
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "lion_step": (lion_step, (meta(_T, _T, dtype=BF).t(), meta(_T, _T, dtype=BF), meta(_T, _T), 1e-4, 0.9, 0.99,
                              0.1), dict(BM=64, BN=64)),
    "topk_router": (topk_router, (meta(_T, 64, dtype=BF), meta(_T, 8), meta(_T, 8, dtype=I32), meta(64, dtype=I32)),
                    dict(K=8, BM=64, BE=64)),
    "row_cumprod": (row_cumprod, (meta(_T, _T), meta(_T, _T)), dict(BM=16, BN=32)),
    "distill_kl": (distill_kl, (meta(_T, 32000, dtype=BF), meta(_T, 32000, dtype=BF), meta(_T, dtype=I32), meta(_T),
                                meta(_T, 32000, dtype=BF), 2.0, 1 / _T), dict(BM=4, BV=512)),
    "geglu_bwd": (geglu_bwd, (meta(_T, 2 * _T, dtype=BF)[:, :_T], meta(_T, 2 * _T, dtype=BF)[:, _T:],
                              meta(_T, _T, dtype=BF), meta(_T, 2 * _T, dtype=BF)[:, :_T],
                              meta(_T, 2 * _T, dtype=BF)[:, _T:]), dict(BM=64, BN=64)),
    "hadamard_rows": (hadamard_rows, (meta(_T, 1024, dtype=BF), meta(_T, 1024, dtype=BF)), dict(BM=64, BN=64, BK=64)),
    "sparsemax": (sparsemax, (meta(_T, 128), meta(_T, 128)), dict(BM=16, BN=128)),
    "newton_schulz": (newton_schulz, (meta(64, 64, 128), meta(64, 64, 128)), dict(OPS="bf16", BM=64, BN=128)),
    "retention": (retention, (meta(8, 16, _T, 128, dtype=BF),) * 3 + (meta(16, 64), meta(8, 16, _T, 128, dtype=BF),
                                                                       0.088), dict(BM=64, BN=64, D=128)),
    "wide_topk": (wide_topk, (meta(_T, 32000), meta(_T, 8), meta(_T, 8, dtype=I32)), dict(K=8, BM=16, BN=256)),
    "gem_pool": (gem_pool, (meta(_T, 2048, dtype=BF), meta(_T)), dict(P=3.0, BM=16, BN=128)),
    "powers": (powers, (meta(_T),) * 8, dict(BN=256)),
    "fp8_amax_dequant": (fp8_amax_dequant, (meta(_T, _T, dtype=F8), meta(_T), meta(_T), meta(_T, _T, dtype=BF)),
                         dict(BM=16, BN=128)),
    "fp8_gemm": (fp8_gemm, (meta(_T, _T, dtype=F8), meta(_T, _T, dtype=F8), meta(_T, _T, dtype=BF), 0.5),
                 dict(BM=128, BN=128, BK=64)),
    "w8a8_gemm": (w8a8_gemm, (meta(_T, _T, dtype=I8), meta(_T, _T, dtype=I8), meta(_T), meta(_T), meta(_T),
                              meta(_T, _T, dtype=BF)), dict(BM=128, BN=128, BK=64)),
    "group_router": (group_router, (meta(_T, 256, dtype=BF), meta(256), meta(_T, 8), meta(_T, 8, dtype=I32), 2.5),
                     dict(G=8, TG=4, K=8, BM=16, E=256)),
    "sigmoid_attention": (sigmoid_attention, (meta(8, 16, _T, 128, dtype=BF),) * 4 + (0.088, -8.3),
                          dict(BM=64, BN=64, D=128)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round11_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


# Gluon's wgmma gives each of its 8 warps 16 accumulator rows: products of 128 rows there. (The products of f32
# operands, Newton-Schulz's f32 variant, wgmma does not multiply: Gluon refuses them by name.)
GLUON_CASES = {"hadamard_rows": dict(BM=128), "retention": dict(BM=128), "w8a8_gemm": dict(BM=128, BN=64, BK=32),
               "fp8_gemm": {},
               "sigmoid_attention": dict(BM=128), "powers": {}, "lion_step": {}}


@pytest.mark.parametrize("name", list(GLUON_CASES))
def test_round11_compiles_for_sm90a_with_gluon(name):
    kernel, args, consts = AOT_CASES[name]
    compile_gluon_sm90a(kernel, args, {**consts, **GLUON_CASES[name]})


@pytest.mark.parametrize("names", [("tl", "Y", "s"), ("X", "X_d0", "s"), ("X", "t1_o0", "float")])
def test_parameters_renamed_in_the_source_compile_for_sm90a_with_triton(names):
    """The renamed parameters (backends.python_dsl.param_names) as the compiled path reads the source's signature."""
    from test_heldout_round11_limits import _kernel_named
    check_triton_sm90a(_kernel_named(*names), (meta(_T), meta(_T), 2.0), dict(BN=128))
