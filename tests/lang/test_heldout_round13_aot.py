"""Round 13's held-out kernels (test_heldout_round13*.py: loop bounds and coordinates read with ts.load_scalar)
compiled for Hopper (sm_90a) on this CPU by the Triton backend and, where it lowers them, Gluon: no spills, at most 255
registers. Arguments are meta tensors (no memory) of serving-sized shapes; index tensors of int32 and int64 (an int64
element as a copy-engine coordinate and a loop counter bounded by one were refused by both DSLs before 64c4471)."""

import pytest
import torch
from heldout_support import BF, I32, I64, meta
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round13 import csr_spmm, moe_grouped_gemm, paged_decode, varlen_attention
from test_heldout_round13_more import (
    bincount,
    embedding_bag,
    gather_flat_pages,
    select_rows,
    temperature_softmax,
    weighted_bincount,
)

_T, _H, _HKV, _D = 16384, 32, 8, 128


def _varlen(idx):
    q = meta(_T, _H, _D, dtype=BF).transpose(0, 1)
    kv = meta(_T, _HKV, _D, dtype=BF).transpose(0, 1)
    return (varlen_attention, (q, kv, kv, meta(65, dtype=idx), meta(_T, _H, _D, dtype=BF).transpose(0, 1), 0.088),
            dict(BM=64, BN=64, D=_D, STEPS=7))


def _paged(idx):
    B, pages, P = 64, 8192, 16
    q = meta(B, _HKV, _H // _HKV, _D, dtype=BF)
    kc = meta(pages, P, _HKV, _D, dtype=BF).permute(0, 2, 1, 3)
    o = meta(B, _HKV, _H // _HKV, _D, dtype=BF)
    return paged_decode, (q, kc, kc, meta(B, 256, dtype=idx), meta(B, dtype=idx), o, 0.088), dict(G=16, P=P, D=_D)


def _moe(idx):
    E, K, N, Tpad = 64, 2048, 1408, 16384
    return (moe_grouped_gemm, (meta(Tpad, K, dtype=BF), meta(E, K, N, dtype=BF), meta(Tpad // 64, dtype=idx),
                               meta(E, dtype=idx), meta(Tpad, N, dtype=BF)), dict(BM=64, BN=128, BK=64))


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "varlen_attention_i32": _varlen(I32), "varlen_attention_i64": _varlen(I64),
    "paged_decode_i32": _paged(I32), "paged_decode_i64": _paged(I64),
    "moe_grouped_gemm_i32": _moe(I32), "moe_grouped_gemm_i64": _moe(I64),
    "csr_spmm": (csr_spmm, (meta(4097, dtype=I64), meta(1 << 20, dtype=I32), meta(1 << 20, dtype=BF),
                            meta(8192, 512), meta(4096, 512)), dict(BN=128)),
    "embedding_bag": (embedding_bag, (meta(50000, 1024, dtype=BF), meta(1 << 18, dtype=I64), meta(4097, dtype=I64),
                                      meta(4096, 1024, dtype=BF), 1), dict(BD=256)),
    "bincount": (bincount, (meta(1 << 24, dtype=I64), meta(4096, dtype=I32)), dict(BM=64)),
    "weighted_bincount": (weighted_bincount, (meta(1 << 24, dtype=I32), meta(1 << 24, dtype=BF), meta(4096)),
                          dict(BM=64)),
    "temperature_softmax": (temperature_softmax, (meta(256, 1000, dtype=BF), meta(256, dtype=BF),
                                                  torch.empty((), dtype=BF, device="meta"), meta(256, 1000, dtype=BF)),
                            dict(BN=1024)),
    "select_rows": (select_rows, (meta(1 << 20, 256), meta(8192, dtype=I64), meta(8192, dtype=torch.uint8),
                                  meta(8192, 256), 0), dict(D=256)),
    "gather_flat_pages": (gather_flat_pages, (meta(1 << 20, 128, dtype=BF), meta(8192, dtype=I64),
                                              meta(8192 * 16, 128, dtype=BF)), dict(P=16, D=128)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round13_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


# Gluon's wgmma gives each of its 8 warps 16 accumulator rows: products of 128 rows there (the attention's query
# tile; the decode's 16 grouped heads and the sparse rows do not fill one, and stay with Triton).
GLUON_CASES = {"varlen_attention_i32": dict(BM=128), "varlen_attention_i64": dict(BM=128),
               "moe_grouped_gemm_i32": dict(BM=128), "moe_grouped_gemm_i64": dict(BM=128),
               "embedding_bag": {}, "bincount": {}, "temperature_softmax": {}, "gather_flat_pages": {}}


@pytest.mark.parametrize("name", list(GLUON_CASES))
def test_round13_compiles_for_sm90a_with_gluon(name):
    kernel, args, consts = AOT_CASES[name]
    compile_gluon_sm90a(kernel, args, {**consts, **GLUON_CASES[name]})
