"""Round 12's held-out kernels (test_heldout_round12*.py) compiled for Hopper (sm_90a) on this CPU, by the Triton
backend and, where it lowers them, Gluon: no spills, at most 255 registers. Arguments are meta tensors (no memory)
of serving-sized shapes."""

import pytest
import torch
from heldout_support import BF, I32, I64, meta
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round12 import minp_sample, rfft_rows, sink_window_attention
from test_heldout_round12_more import bn_apply, bn_stats, depthwise3x3, safe_l2_normalize, ssd_scan

_T = 4096


def _nhwc(n, h, w, c, dtype=BF):
    return meta(n, c, h, w, dtype=dtype).permute(0, 2, 3, 1)


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "minp_sample": (minp_sample, (meta(64, 32000, dtype=BF), meta(64), meta(64, dtype=I64), meta(64),
                                  meta(64, dtype=I32), 1.4, -3.0), dict(BM=4, BN=64)),
    "sink_window_attention": (sink_window_attention, (meta(2, _T, 64, 64, dtype=BF).transpose(1, 2),
                                                      meta(2, 8, _T, 64, dtype=BF), meta(2, 8, _T, 64, dtype=BF),
                                                      meta(64), meta(2, 64, _T, 64, dtype=BF), 0.125, 128),
                              dict(BM=64, BN=64, D=64)),
    "rfft_rows": (rfft_rows, (meta(_T, 1024), meta(_T, 513), meta(_T, 513)), dict(BM=16, BF=32, BK=32)),
    "depthwise3x3": (depthwise3x3, (meta(8, 58, 58, 256, dtype=BF),) * 3 + (meta(3, 3, 256, dtype=BF), meta(256),
                                                                             meta(8, 56, 56, 256, dtype=BF)),
                     dict(BW=32, BC=64)),
    "ssd_scan": (ssd_scan, (meta(4, 32, _T, 64, dtype=BF), meta(4, 32, _T), meta(4, _T, 32), meta(4, _T, 32),
                            meta(4, 32, 32, 64), meta(4, 32, _T, 64, dtype=BF), meta(4, 32, 32, 64)),
                 dict(BT=32, N=32, BP=16)),
    "safe_l2_normalize": (safe_l2_normalize, (meta(_T, _T, dtype=BF).t(), meta(_T, _T, dtype=BF), meta(_T),
                                              meta(_T, dtype=torch.bool), 1e-12), dict(BM=16, BN=256)),
    "bn_stats": (bn_stats, (_nhwc(32, 56, 56, 256), meta(256), meta(256)), dict(BW=32, BC=64)),
    "bn_apply": (bn_apply, (_nhwc(32, 56, 56, 256), meta(256), meta(256), meta(256), meta(256), meta(256), meta(256),
                            _nhwc(32, 56, 56, 256), 1e-5, 0.1), dict(BW=32, BC=64)),
}


@pytest.mark.parametrize("name", [n for n in AOT_CASES if n != "rfft_rows"])
def test_round12_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


def test_rfft_with_sin_and_cos_compiles_for_sm90a_with_triton():
    """The DFT's twiddles made in the kernel: libdevice's sinf / cosf keep a few words on the stack (local memory,
    counted with spills) for the reduction of huge arguments (as round 10's RoPE); no more than that."""
    from tilestack.tune import aot
    if aot.missing_tools():
        pytest.skip(aot.missing_tools())
    r = aot.resources(*AOT_CASES["rfft_rows"], {}, cache=False, timeout_s=None)
    assert r.ok and r.registers <= 255 and r.spills <= 8, r


# Gluon's wgmma gives each of its 8 warps 16 accumulator rows: products of 128 rows there; f32 operands (the sampling
# step's prefix sums, the DFT, the scan's f32 products) wgmma does not multiply, and Gluon refuses them by name.
GLUON_CASES = {"sink_window_attention": dict(BM=128), "depthwise3x3": {}, "safe_l2_normalize": {}, "bn_stats": {},
               "bn_apply": {}}


@pytest.mark.parametrize("name", list(GLUON_CASES))
def test_round12_compiles_for_sm90a_with_gluon(name):
    kernel, args, consts = AOT_CASES[name]
    compile_gluon_sm90a(kernel, args, {**consts, **GLUON_CASES[name]})
